#!/usr/bin/env bash
# 3 GRPO steps on CUDA with LoRA + gradient checkpointing on a random-weight
# Qwen2-0.5B-architecture model (494M parameters, vocab 151,936), bf16.
# Prints the median step time, generated tokens/s and peak GPU memory. < 5 min.
# usage: benches/train_cuda.sh [DEVICE]    (default cuda)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEV=${1:-cuda}
# WORKER / PY: a pre-built worker and a python with torch + transformers
# (e.g. on a lent GPU machine with no toolchain); default: build here.
if [ -z "${WORKER:-}" ]; then
  source scripts/setup.sh
  cargo build --release -q -p recflow-ml --bin recflow-worker
  WORKER=target/release/recflow-worker
fi
PY=${PY:-.venv/bin/python}
WORK=${BENCH_WORK:-$ROOT/target/bench-train-cuda}
mkdir -p "$WORK"
$PY benches/train_bench.py cuda_model "$WORK"
D="$WORK/run"
rm -rf "$D"; mkdir -p "$D/work"
cat > "$D/spec.json" <<JSON
{"kind": "grpo", "stage": "grpo_cuda_bench", "seed": 0, "device": "$DEV",
 "config": {"device": "$DEV", "dtype": "bfloat16", "use_peft": true, "lora_r": 16, "lora_alpha": 32,
            "gradient_checkpointing": true, "prompts_per_step": 8, "num_generations": 8,
            "max_prompt_length": 256, "max_completion_length": 256, "max_steps": 3, "learning_rate": 1e-5,
            "beta": 0.04, "eval_steps": 0, "eval_max_samples": 4, "save_steps": 1000},
 "inputs": {"model": ["$WORK/qwen2_0p5b_random"], "samples": ["$WORK/samples.parquet"], "valid": ["$WORK/valid.parquet"]},
 "out_dir": "$D/out", "work_dir": "$D/work"}
JSON
# Peak GPU memory two ways: the allocator's per-step peak from the stage's
# metrics (ml/src/cuda), and nvidia-smi polled while the worker runs (all
# the process holds: CUDA context, cuBLAS workspaces, allocator cache).
PEAK_FILE="$D/gpu_mem.txt"; echo 0 > "$PEAK_FILE"
( while sleep 0.5; do
    m=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 || echo 0)
    p=$(cat "$PEAK_FILE"); [ "${m:-0}" -gt "$p" ] && echo "$m" > "$PEAK_FILE"
  done ) &
POLL=$!
trap 'kill $POLL 2>/dev/null || true' EXIT
BASE=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
timeout 280 "$WORKER" exec-stage "$D/spec.json" > "$D/events.jsonl"
kill $POLL 2>/dev/null || true
$PY - "$D/out/metrics.json" "$PEAK_FILE" "$BASE" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
peak = int(open(sys.argv[2]).read().strip() or 0) - int(sys.argv[3])
print(f"GRPO CUDA (Qwen2-0.5B arch, LoRA r16 + grad ckpt, bf16, 8x8x256): "
      f"step {m['step_s_median']:.2f} s (median of 3), generation {m['generated_tokens_per_s']:.0f} tok/s, "
      f"split gen/ref/train {m['generation_s']:.1f}/{m['reference_s']:.1f}/{m['training_s']:.1f} s, "
      f"peak GPU memory {peak} MiB (nvidia-smi, above the idle baseline)")
mib = lambda k: f"{m[k] / 2**20:.0f} MiB" if m.get(k) is not None else "n/a"
print(f"  allocator per step: peak allocated {mib('step_peak_cuda_allocated_bytes_max')} (max), "
      f"{mib('step_peak_cuda_allocated_bytes_median')} (median); peak reserved {mib('step_peak_cuda_reserved_bytes_max')}"
      + (f"  [{m['note_cuda_memory']}]" if 'note_cuda_memory' in m else ""))
PYEOF
