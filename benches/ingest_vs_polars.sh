#!/usr/bin/env bash
# Ingest benchmark: recflow `ingest` (release, torch-free worker) vs polars
# read_ndjson → write_parquet on the same Amazon-format JSON lines.
# Usage: benches/ingest_vs_polars.sh [SIZES_GB=0.5,2] [REPEAT=1]
# Env: PROFILE=release (default) | dev-o3 (the dev profile's already built
# dependencies, our crate at opt-level 3: what a busy 2-core box can build in
# minutes) | dev; RECFLOW_DATA_DIR (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="${1:-0.5,2}"
REPEAT="${2:-1}"
PROFILE="${PROFILE:-release}"
DATA="${RECFLOW_DATA_DIR:-../shared/data}"
# The peer lives in its own git-ignored venv (never the project's test venv,
# whose packages other tests depend on), created here on first use, with the
# peer's version pinned so numbers stay comparable across runs.
POLARS_VERSION=2.1.0
VENV=.bench/venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import polars, sys; sys.exit(polars.__version__ != '$POLARS_VERSION')" 2>/dev/null \
  || "$VENV/bin/pip" install --quiet "polars==$POLARS_VERSION"
if [ "$PROFILE" = release ]; then
  cargo build --release -p recflow --example torch_free_worker
  WORKER=target/release/examples/torch_free_worker
elif [ "$PROFILE" = dev-o3 ]; then
  CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo build -p recflow --example torch_free_worker
  WORKER=target/debug/examples/torch_free_worker
else
  cargo build -p recflow --example torch_free_worker
  WORKER=target/debug/examples/torch_free_worker
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); profile $PROFILE"
"$VENV/bin/python" benches/ingest_vs_polars.py --worker "$WORKER" --data "$DATA" --work .bench/ingest --sizes "$SIZES" --repeat "$REPEAT"
