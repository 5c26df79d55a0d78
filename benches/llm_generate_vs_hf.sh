#!/usr/bin/env bash
# CPU generation benchmark: recflow-worker vs HF transformers (see the .py).
# usage: benches/llm_generate_vs_hf.sh [--quick]
# Env: THREADS (default 2), WORKER (default: target/release/recflow-worker,
# built here if missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
THREADS="${THREADS:-2}"
export OMP_NUM_THREADS="$THREADS"
WORKER="${WORKER:-target/release/recflow-worker}"
if [ ! -x "$WORKER" ]; then
  cargo build --release -p recflow-ml --bin recflow-worker
fi
WORK=.bench/llm
mkdir -p "$WORK"
if [ ! -f "$WORK/smollm2/config.json" ]; then
  "$WORKER" model import models/SmolLM2-135M-Instruct.Q4_1.gguf "$WORK/smollm2" >/dev/null
fi
.venv/bin/python3 benches/llm_generate_vs_hf.py "$WORKER" "$WORK/smollm2" "$WORK" --threads "$THREADS" "$@"
