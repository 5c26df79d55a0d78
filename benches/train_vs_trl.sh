#!/usr/bin/env bash
# CPU benchmarks of the training stages, side by side with their peers in one run:
#   1. GRPO step: TRL GRPOTrainer vs recflow `grpo` (B=4 prompts x G=4 x 64 tokens, LoRA off,
#      beta 0, loss_type dapo) on a tiny Qwen2 (hidden 128, 2 layers, vocab 49,152) and on SmolLM2-135M;
#   2. SFT step: plain PyTorch/transformers vs recflow `sft` on SmolLM2-135M, 16 x 320 tokens, full FT.
# Prints per-step medians (s), ratios peer/recflow and peak RSS. Peers go into .venv (pip).
# usage: benches/train_vs_trl.sh [STEPS]      (default 4; the first step is warm-up)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STEPS=${1:-4}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Pinned so the peers never move the project's test dependencies (transformers 4.57.1, see scripts/setup.sh).
.venv/bin/pip install -q "trl==0.24.0" "transformers==4.57.1" "datasets==4.0.0" accelerate pyarrow
source .venv/bin/activate
# RECFLOW_WORKER=path uses an existing worker binary instead of building the release one.
if [ -z "${RECFLOW_WORKER:-}" ]; then
  cargo build --release -q -p recflow-ml --bin recflow-worker
fi
WORKER=${RECFLOW_WORKER:-$ROOT/target/release/recflow-worker}
# BENCH_MODELS / BENCH_SFT select rows (default: both GRPO rows and the SFT row).
MODELS=${BENCH_MODELS:-"tiny_qwen2 smollm2"}
WORK=${BENCH_WORK:-$ROOT/target/bench-train}
mkdir -p "$WORK"
$PY benches/train_bench.py prepare "$WORK"

# Runs one recflow stage through the worker's exec-stage protocol; prints its metrics.json.
run_stage() { # KIND NAME CONFIG_JSON INPUTS_JSON
  local d="$WORK/run_$2"
  rm -rf "$d"; mkdir -p "$d/work"
  cat > "$d/spec.json" <<JSON
{"kind": "$1", "stage": "$2", "config": $3, "inputs": $4, "out_dir": "$d/out", "work_dir": "$d/work", "seed": 0, "device": "cpu"}
JSON
  /usr/bin/time -v "$WORKER" exec-stage "$d/spec.json" > "$d/events.jsonl" 2> "$d/time.txt"
  local rss_kb
  rss_kb=$(grep "Maximum resident" "$d/time.txt" | awk '{print $NF}')
  $PY -c "import json,sys; m=json.load(open('$d/out/metrics.json')); m['peak_rss_mb']=$rss_kb/1024; print(json.dumps(m))"
}

ratio() { $PY -c "import json,sys; p=json.loads(sys.argv[1]); r=json.loads(sys.argv[2]); print(f\"{sys.argv[3]}: peer {p['step_s_median']:.3f} s/step ({p['peak_rss_mb']:.0f} MB)  recflow {r['step_s_median']:.3f} s/step ({r['peak_rss_mb']:.0f} MB)  peer/recflow = {p['step_s_median']/r['step_s_median']:.2f}x\")" "$1" "$2" "$3"; }

GRPO_CFG="{\"prompts_per_step\": 4, \"num_generations\": 4, \"max_completion_length\": 64, \"max_prompt_length\": 64, \"max_steps\": $STEPS, \"learning_rate\": 1e-6, \"beta\": 0.0, \"loss_type\": \"dapo\", \"eval_steps\": 0, \"eval_max_samples\": 0, \"save_steps\": 1000}"
for M in $MODELS; do
  IN="{\"model\": [\"$WORK/$M\"], \"samples\": [\"$WORK/samples.parquet\"], \"valid\": [\"$WORK/valid.parquet\"]}"
  OURS=$(run_stage grpo "grpo_$M" "$GRPO_CFG" "$IN")
  PEER=$($PY benches/train_bench.py trl "$WORK/$M" "$WORK" "$STEPS" 2>/dev/null | tail -1)
  echo "$OURS" > "$WORK/grpo_$M.recflow.json"; echo "$PEER" > "$WORK/grpo_$M.trl.json"
  ratio "$PEER" "$OURS" "GRPO $M (TRL GRPOTrainer vs recflow grpo)"
done

[ "${BENCH_SFT:-1}" = 1 ] || exit 0
SFT_CFG="{\"per_device_train_batch_size\": 16, \"max_length\": 320, \"max_steps\": $STEPS, \"learning_rate\": 1e-5, \"eval_steps\": 0, \"eval_max_samples\": 0, \"val_fraction\": 0.0, \"group_by_length\": false, \"save_steps\": 1000}"
IN="{\"model\": [\"$WORK/smollm2\"], \"data\": [\"$WORK/coldstart.parquet\"], \"valid\": [\"$WORK/valid.parquet\"]}"
OURS=$(run_stage sft sft_smollm2 "$SFT_CFG" "$IN")
PEER=$($PY benches/train_bench.py sft "$WORK/smollm2" "$WORK" "$STEPS" | tail -1)
ratio "$PEER" "$OURS" "SFT smollm2 16x320 full FT (PyTorch vs recflow sft)"
