#!/usr/bin/env bash
# Device checks on a lent CUDA machine, which has PyTorch 2.11.0+cu130 but no
# Rust toolchain: build here (`cargo build --release -p recflow-ml --bin
# recflow-worker`), copy the stripped binary to .gpu/recflow-worker (git-ignored),
# carry `.gpu` and run this script there. Prints `doctor`, bf16 generation
# throughput (benches/llm_cuda.sh) and 3 GRPO steps with LoRA + gradient
# checkpointing (benches/train_cuda.sh) on a Qwen2-0.5B-architecture model,
# and data-parallel training on c10d (benches/ddp.sh gpus 1: NCCL with
# world_size 1, 2 Gloo ranks on CUDA tensors sharing the GPU; ≤ 3 min) on a
# tiny Qwen2 whose inputs `benches/ddp.sh prepare .gpu/ddp` writes here first.
# The worker must be built after scripts/setup.sh installed the NCCL/CUDA
# headers (its build log warns `recflow_dist ... not built` otherwise).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(command -v python3)"
TORCH_LIB="$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
W="$PWD/.gpu/recflow-worker"
LOG="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$W" doctor 2>&1 | tee "$LOG/doctor.txt"
echo "=== generation (bf16)"
WORKER="$W" PYTHON="$PY" bash benches/llm_cuda.sh 2>&1 | tee "$LOG/llm_cuda.txt"
echo "=== GRPO (bf16, LoRA, gradient checkpointing)"
[ -d .gpu/smol_tok ] && export BENCH_TOKENIZER="$PWD/.gpu/smol_tok"
WORKER="$W" PY="$PY" BENCH_WORK=/tmp/train_cuda bash benches/train_cuda.sh cuda 2>&1 | tee "$LOG/train_cuda.txt"
echo "=== data parallelism (c10d: NCCL world_size 1, 2 Gloo ranks on CUDA tensors)"
if [ -f .gpu/ddp/tiny_qwen2/config.json ]; then
  WORKER="$W" PY="$PY" BENCH_WORK="$PWD/.gpu/ddp" STEPS=4 timeout 180 bash benches/ddp.sh gpus 1 2>&1 | tee "$LOG/ddp_cuda.txt"
else
  echo "skipped: .gpu/ddp missing (run benches/ddp.sh prepare .gpu/ddp before carrying .gpu)"
fi
