#!/usr/bin/env bash
# CPU benchmarks of the training stages, side by side with their peers in one run:
#   1. GRPO step: TRL GRPOTrainer vs recflow `grpo` (B=4 prompts x G=4 x 64 tokens, LoRA off,
#      beta 0, loss_type dapo) on a tiny Qwen2 (hidden 128, 2 layers, vocab 49,152) and on SmolLM2-135M;
#   2. SFT step: plain PyTorch/transformers vs recflow `sft` on SmolLM2-135M, 16 x 320 tokens, full FT.
# Prints per-step medians (s), ratios peer/recflow and peak RSS (each side its own process,
# /usr/bin/time's maximum resident set size).
# usage: benches/train_vs_trl.sh [STEPS]      (default 4; the first step is warm-up)
# Env: BENCH_MODELS="tiny_qwen2 smollm2" picks the GRPO rows ("" for none), BENCH_SFT=0 skips
# the SFT row; RECFLOW_WORKER=path uses that worker binary instead of building the release one.
# BENCH_MODELS=smollm2_real adds a row with learning signal: SmolLM2 after the SFT of
# pipelines/real_fashion_smollm2.yaml (it writes valid <rate> answers, so rewards vary), on that
# pipeline's real Amazon Fashion prompts (214-392 tokens), 128 completion tokens. It reads the
# model and prompts from that pipeline's last run (runs/real_fashion_smollm2/): run
# `recflow run pipelines/real_fashion_smollm2.yaml` first (CPU, about 20 minutes).
#
# The peers (TRL, datasets, accelerate, pyarrow) are pinned and go into a git-ignored bench venv,
# .bench/train-venv, never into the project's test venv .venv: the bench venv sees .venv's torch
# and transformers through a .pth file (so torch is not installed twice and the peer runs the same
# torch as recflow's libtorch) and installs only what .venv lacks into its own site-packages.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STEPS=${1:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MODELS=${BENCH_MODELS-"tiny_qwen2 smollm2"}
VENV="$ROOT/.bench/train-venv"
if [ ! -x "$VENV/bin/python" ]; then
  .venv/bin/python3 -m venv "$VENV"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  .venv/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/recflow-test-venv.pth"
fi
PY="$VENV/bin/python"
# transformers is pinned by scripts/setup.sh (4.57.1); naming it here makes pip keep that one.
PEERS=("pyarrow==21.0.0" "transformers==4.57.1")
[ -n "$MODELS" ] && PEERS+=("trl==0.24.0" "datasets==4.0.0" "accelerate==1.10.1")
"$PY" -m pip install -q "${PEERS[@]}"
if [ -z "${RECFLOW_WORKER:-}" ]; then
  cargo build --release -q -p recflow-ml --bin recflow-worker
fi
WORKER=${RECFLOW_WORKER:-$ROOT/target/release/recflow-worker}
WORK=${BENCH_WORK:-$ROOT/target/bench-train}
mkdir -p "$WORK"
# SmolLM2-135M in HF layout, f32, converted from the GGUF by our own importer;
# both sides of every SmolLM2 row load this directory.
[ -f "$WORK/smollm2/config.json" ] || "$WORKER" model import models/SmolLM2-135M-Instruct.Q4_1.gguf "$WORK/smollm2"
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

ratio() { $PY - "$1" "$2" "$3" <<'PY'
import json, sys
p, r, name = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print(f"{name}: peer {p['step_s_median']:.3f} s/step ({p['peak_rss_mb']:.0f} MB)  recflow {r['step_s_median']:.3f} s/step "
      f"({r['peak_rss_mb']:.0f} MB)  peer/recflow = {p['step_s_median']/r['step_s_median']:.2f}x  "
      f"recflow/peer = {r['step_s_median']/p['step_s_median']:.2f}x")
# CPU time per step (user + system, all threads): what a step costs when the machine is shared.
if p.get("step_cpu_s_median") and r.get("step_cpu_s_median"):
    print(f"  CPU per step: peer {p['step_cpu_s_median']:.1f} s  recflow {r['step_cpu_s_median']:.1f} s  "
          f"recflow/peer = {r['step_cpu_s_median']/p['step_cpu_s_median']:.2f}x")
PY
}

# The real-prompts row's model and samples, from that pipeline's last run (runs/PIPELINE/STAGE,
# the engine's symlinks into the store): the SFT'd model (its dir lacks a tokenizer_config.json,
# so both sides get one naming the ChatML template the model was fine-tuned with: recflow's
# fallback, CHATML_TEMPLATE in ml/src/llm/tokenizer.rs, copied here because TRL needs it spelled
# out) and the prompts stage's train/valid Parquet.
prepare_real() {
  $PY - "$ROOT/runs/real_fashion_smollm2" "$WORK" <<'PY'
import json, os, sys
run, work = sys.argv[1:3]
model = os.path.join(run, "sft", "model")
files = {k: os.path.join(run, "prompts", f"{k}.parquet") for k in ["train", "valid"]}
if not os.path.isfile(os.path.join(model, "model.safetensors")) or not all(map(os.path.isfile, files.values())):
    sys.exit(f"smollm2_real: {model} or the prompts are missing; run `recflow run pipelines/real_fashion_smollm2.yaml` first")
d = os.path.join(work, "smollm2_real")
os.makedirs(d, exist_ok=True)
for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]:
    if not os.path.lexists(os.path.join(d, f)):
        os.symlink(os.path.realpath(os.path.join(model, f)), os.path.join(d, f))
tc = json.load(open(os.path.join(work, "smollm2", "tokenizer_config.json")))
tc["chat_template"] = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
json.dump(tc, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
for k, f in files.items():
    dst = os.path.join(work, f"real_{k}.parquet")
    if not os.path.lexists(dst):
        os.symlink(os.path.realpath(f), dst)
PY
}

for M in $MODELS; do
  COMPLETION=64; PROMPT=64; SAMPLES="$WORK/samples.parquet"; VALID="$WORK/valid.parquet"; TRL_EXTRA=()
  if [ "$M" = smollm2_real ]; then
    prepare_real || continue
    COMPLETION=128; PROMPT=1024; SAMPLES="$WORK/real_train.parquet"; VALID="$WORK/real_valid.parquet"
    TRL_EXTRA=("$SAMPLES" "$COMPLETION" "$PROMPT")
  fi
  GRPO_CFG="{\"prompts_per_step\": 4, \"num_generations\": 4, \"max_completion_length\": $COMPLETION, \"max_prompt_length\": $PROMPT, \"max_steps\": $STEPS, \"learning_rate\": 1e-6, \"beta\": 0.0, \"loss_type\": \"dapo\", \"eval_steps\": 0, \"eval_max_samples\": 0, \"save_steps\": 1000}"
  IN="{\"model\": [\"$WORK/$M\"], \"samples\": [\"$SAMPLES\"], \"valid\": [\"$VALID\"]}"
  OURS=$(run_stage grpo "grpo_$M" "$GRPO_CFG" "$IN")
  # The same computing what TRL computes (each prompt once per completion,
  # zero-advantage rows through forward and backward): what the two
  # shortcuts buy, and the plain-compute comparison.
  PLAIN=$(run_stage grpo "grpo_${M}_plain" "${GRPO_CFG%\}}, \"share_prompt_prefix\": false, \"skip_zero_advantage\": false}" "$IN")
  # Prompts shared, every row trained: the cost when every group has signal.
  SHARE=$(run_stage grpo "grpo_${M}_share" "${GRPO_CFG%\}}, \"skip_zero_advantage\": false}" "$IN")
  PEER=$($PY benches/train_bench.py trl "$WORK/$M" "$WORK" "$STEPS" "${TRL_EXTRA[@]}" 2>/dev/null | tail -1)
  echo "$OURS" > "$WORK/grpo_$M.recflow.json"; echo "$PLAIN" > "$WORK/grpo_$M.plain.json"; echo "$SHARE" > "$WORK/grpo_$M.share.json"; echo "$PEER" > "$WORK/grpo_$M.trl.json"
  ratio "$PEER" "$OURS" "GRPO $M (TRL GRPOTrainer vs recflow grpo)"
  ratio "$PEER" "$SHARE" "GRPO $M (TRL GRPOTrainer vs recflow grpo, skip_zero_advantage off)"
  ratio "$PEER" "$PLAIN" "GRPO $M (TRL GRPOTrainer vs recflow grpo, share_prompt_prefix and skip_zero_advantage off)"
  $PY - "$OURS" "$PLAIN" "$PEER" "$STEPS" "$SHARE" <<'PY'
import json, sys
o, n, p, steps, sh = *(json.loads(a) for a in sys.argv[1:4]), int(sys.argv[4]), json.loads(sys.argv[5])
split = lambda m: f"generation {m['generation_s']/steps:.2f} s + training {m['training_s']/steps:.2f} s per step, {m['generated_tokens_per_s']*m['generation_s']/(steps*16):.1f} tok/completion, frac_reward_zero_std {m['frac_reward_zero_std_mean']:.3f}"
print(f"  recflow: {split(o)}, {o['skipped_rows_fraction']:.0%} of rows skipped (zero advantage)")
print(f"  recflow, skip off: {split(sh)}; both off: {split(n)}")
print(f"  TRL: generation {p['generation_s_per_step']:.2f} s per step, {p['completion_mean_length']:.1f} tok/completion, frac_reward_zero_std {p.get('frac_reward_zero_std_mean')}")
PY
done

[ "${BENCH_SFT:-1}" = 1 ] || exit 0
SFT_CFG="{\"per_device_train_batch_size\": 16, \"max_length\": 320, \"max_steps\": $STEPS, \"learning_rate\": 1e-5, \"eval_steps\": 0, \"eval_max_samples\": 0, \"val_fraction\": 0.0, \"group_by_length\": false, \"save_steps\": 1000}"
IN="{\"model\": [\"$WORK/smollm2\"], \"data\": [\"$WORK/coldstart.parquet\"], \"valid\": [\"$WORK/valid.parquet\"]}"
OURS=$(run_stage sft sft_smollm2 "$SFT_CFG" "$IN")
PEER=$($PY benches/train_bench.py sft "$WORK/smollm2" "$WORK" "$STEPS" | tail -1)
ratio "$PEER" "$OURS" "SFT smollm2 16x320 full FT (PyTorch vs recflow sft)"
