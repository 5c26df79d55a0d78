#!/usr/bin/env bash
# Data-parallel training (docs/train.md "Data parallelism"): one process vs
# ranks on c10d, on a tiny Qwen2 (hidden 128, 2 layers, vocab 49,152).
#
#   benches/ddp.sh [cpu]        this machine, Gloo: 1 process (all threads) vs
#                               2 ranks (threads ÷ 2 each) vs the serial emulation;
#                               SFT 16 × 320 tokens full FT, GRPO 4 × 4 × 64.
#                               Prints step medians, the collectives' share of a
#                               step, and whether 2 ranks = serial bit for bit.
#   benches/ddp.sh gpus N       CUDA: world_size 1 (no group) vs N NCCL ranks
#                               (N = 1: a NCCL group of one, so the collectives'
#                               own cost shows); with N = 1 also 2 Gloo ranks on
#                               CUDA tensors sharing the GPU vs the serial
#                               emulation. N must divide 16 and 4.
#   benches/ddp.sh prepare DIR  only write the model and data into DIR (to carry
#                               to a GPU machine without a toolchain).
#
# WORKER / PY: a pre-built worker and a python with torch + transformers (a
# lent GPU machine); default: build here. BENCH_WORK: where inputs and runs go.
# STEPS (default 6): optimizer steps per run; the first is warm-up.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=${1:-cpu}
if [ "$MODE" = prepare ]; then
  WORK=$2
else
  WORK=${BENCH_WORK:-$ROOT/target/bench-ddp}
fi
PY=${PY:-$ROOT/.venv/bin/python}
STEPS=${STEPS:-6}
if [ -z "${WORKER:-}" ]; then
  # The workspace's one profile (dev: dependencies at -O3, ours at -O1), as
  # CI builds it: both sides of every ratio run the same binary.
  source scripts/setup.sh
  cargo build -q --workspace --all-targets
  WORKER=$ROOT/target/debug/recflow-worker
fi
mkdir -p "$WORK"
if [ ! -f "$WORK/tiny_qwen2/config.json" ] || [ ! -f "$WORK/coldstart.parquet" ]; then
  # The tokenizer comes from SmolLM2, converted from the GGUF by our importer.
  [ -f "$WORK/smollm2/config.json" ] || "$WORKER" model import models/SmolLM2-135M-Instruct.Q4_1.gguf "$WORK/smollm2" >/dev/null
  PREP=$PY
  if ! "$PREP" -c 'import pyarrow' 2>/dev/null; then
    # pyarrow writes the bench's parquet inputs; as benches/train_vs_trl.sh,
    # a git-ignored venv on top of .venv holds it.
    VENV="$ROOT/.bench/train-venv"
    if [ ! -x "$VENV/bin/python" ]; then
      .venv/bin/python3 -m venv "$VENV"
      site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      .venv/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/recflow-test-venv.pth"
    fi
    "$VENV/bin/python" -c 'import pyarrow' 2>/dev/null || "$VENV/bin/python" -m pip install -q "pyarrow==21.0.0"
    PREP=$VENV/bin/python
  fi
  "$PREP" benches/train_bench.py prepare "$WORK" >/dev/null
fi
[ "$MODE" = prepare ] && { echo "inputs in $WORK"; exit 0; }

# run NAME KIND DEVICE THREADS CONFIG-JSON: one exec-stage run, metrics in $WORK/NAME/out.
run() {
  local name=$1 kind=$2 dev=$3 threads=$4 cfg=$5 d="$WORK/runs/$1" inputs
  rm -rf "$d"; mkdir -p "$d"
  if [ "$kind" = sft ]; then
    inputs="\"model\": [\"$WORK/tiny_qwen2\"], \"data\": [\"$WORK/coldstart.parquet\"], \"valid\": [\"$WORK/valid.parquet\"]"
  else
    inputs="\"model\": [\"$WORK/tiny_qwen2\"], \"samples\": [\"$WORK/samples.parquet\"], \"valid\": [\"$WORK/valid.parquet\"]"
  fi
  cat > "$d/spec.json" <<JSON
{"kind": "$kind", "stage": "$name", "seed": 0, "device": "$dev", "config": $cfg,
 "inputs": {$inputs}, "out_dir": "$d/out", "work_dir": "$d/work"}
JSON
  # The numerics profile as the runner applies it (src/numerics.rs `Resolved::env`).
  RECFLOW_NUMERICS="aten=avx2,mkl=compatible,threads=$threads" ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE \
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 \
    "$WORKER" exec-stage "$d/spec.json" > "$d/events.jsonl" 2> "$d/stderr.txt" \
    || { echo "run $name failed:"; tail -20 "$d/stderr.txt"; exit 1; }
}

# SFT: 16 rows × ~320 tokens per step (batch 4 × accumulation 4), full FT, f32.
sft_cfg() { # WORLD BACKEND DEVICE
  echo "{\"device\": \"$3\", \"dtype\": \"float32\", \"max_steps\": $STEPS, \"per_device_train_batch_size\": 4,
    \"gradient_accumulation_steps\": 4, \"learning_rate\": 1e-4, \"max_length\": 384, \"eval_steps\": 0,
    \"eval_max_samples\": 1, \"eval_max_new_tokens\": 4, \"val_fraction\": 0.0, \"save_steps\": 1000,
    \"world_size\": $1, \"distributed\": {\"backend\": \"$2\"}}"
}
# GRPO: 4 prompts × 4 completions × 64 tokens, every row trained, full FT.
grpo_cfg() { # WORLD BACKEND DEVICE
  echo "{\"device\": \"$3\", \"dtype\": \"float32\", \"max_steps\": $STEPS, \"prompts_per_step\": 4, \"num_generations\": 4,
    \"max_completion_length\": 64, \"max_prompt_length\": 64, \"learning_rate\": 1e-5, \"eval_steps\": 0,
    \"eval_max_samples\": 1, \"save_steps\": 1000, \"skip_zero_advantage\": false,
    \"world_size\": $1, \"distributed\": {\"backend\": \"$2\"}}"
}

report() { # LABEL BASE RANKS [SERIAL]
  "$PY" - "$WORK/runs" "$@" <<'PY'
import filecmp, json, os, sys
runs, label, base, ranks = sys.argv[1:5]
serial = sys.argv[5] if len(sys.argv) > 5 else None
m = lambda n: json.load(open(os.path.join(runs, n, "out", "metrics.json")))
b, r = m(base), m(ranks)
steps = r["steps"]
coll = r.get("collective_s", 0.0) / steps
line = (f"{label}: 1 process {b['step_s_median']:.3f} s/step (CPU {b['step_cpu_s_median']:.2f} s); "
        f"{r.get('world_size', 1)} rank(s) × {r.get('rank_threads', '?')} thread(s) {r['step_s_median']:.3f} s/step "
        f"→ ratio {b['step_s_median'] / r['step_s_median']:.2f}×; collectives {coll * 1000:.1f} ms/step "
        f"({100 * coll / r['step_s_median']:.1f}% of a step, waiting included)")
if serial:
    same = all(filecmp.cmp(os.path.join(runs, ranks, "out", f), os.path.join(runs, serial, "out", f), shallow=False)
               for f in ["log.parquet", "model/model.safetensors"])
    s = m(serial)
    line += f"; serial emulation {s['step_s_median']:.3f} s/step, ranks = serial: {'bit-identical' if same else 'DIFFERENT'}"
    if "final_loss" in r:
        line += f" (final loss {r['final_loss']:.6f} vs {s['final_loss']:.6f})"
print(line)
PY
}

T=$(nproc)
case "$MODE" in
  cpu)
    echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $T CPUs; STEPS=$STEPS (medians over steps)"
    run sft1 sft cpu "$T" "$(sft_cfg 1 auto cpu)"
    run sft2 sft cpu "$T" "$(sft_cfg 2 gloo cpu)"
    run sfts sft cpu "$T" "$(sft_cfg 2 serial cpu)"
    report "SFT tiny Qwen2 16×320 full FT" sft1 sft2 sfts
    run grpo1 grpo cpu "$T" "$(grpo_cfg 1 auto cpu)"
    run grpo2 grpo cpu "$T" "$(grpo_cfg 2 gloo cpu)"
    run grpos grpo cpu "$T" "$(grpo_cfg 2 serial cpu)"
    report "GRPO tiny Qwen2 4×4×64 full FT" grpo1 grpo2 grpos
    ;;
  gpus)
    N=${2:?usage: benches/ddp.sh gpus N}
    nvidia-smi --query-gpu=name --format=csv,noheader | head -"$N"
    run sft1 sft cuda "$T" "$(sft_cfg 1 auto cuda)"
    run sftn sft cuda "$T" "$(sft_cfg "$N" nccl cuda)"
    report "SFT CUDA, $N NCCL rank(s)" sft1 sftn
    run grpo1 grpo cuda "$T" "$(grpo_cfg 1 auto cuda)"
    run grpon grpo cuda "$T" "$(grpo_cfg "$N" nccl cuda)"
    report "GRPO CUDA, $N NCCL rank(s)" grpo1 grpon
    if [ "$N" = 1 ]; then
      run sftg sft cuda "$T" "$(sft_cfg 2 gloo cuda)"
      run sftgs sft cuda "$T" "$(sft_cfg 2 serial cuda)"
      report "SFT CUDA, 2 Gloo ranks on CUDA tensors (one GPU)" sft1 sftg sftgs
    fi
    ;;
  *) echo "usage: benches/ddp.sh [cpu | gpus N | prepare DIR]" >&2; exit 2 ;;
esac
