#!/usr/bin/env bash
# Real data, outside CI (issue 7): RecOne on the shared Amazon 2018 Fashion
# sample with the real SmolLM2-135M-Instruct on CPU
# (pipelines/real_fashion_smollm2.yaml), about 30 minutes on 2 cores. Prints
# the methods table (n, RMSE / MAE with 95% intervals, invalid rate) and the
# report's path. The data folder comes from RECFLOW_DATA_DIR (default
# ../shared/data next to the checkout); it is read in place, never copied.
# Extra arguments go to `recflow run` (e.g. --set params.test_samples=50).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
DATA="$(cd "${RECFLOW_DATA_DIR:-$ROOT/../shared/data}" 2>/dev/null && pwd)" || {
  echo "error: the shared review samples are not at ${RECFLOW_DATA_DIR:-$ROOT/../shared/data}; set RECFLOW_DATA_DIR to the folder holding amazon_fashion/" >&2
  exit 2
}
cargo build --workspace --bins
P=pipelines/real_fashion_smollm2.yaml
start=$(date +%s)
# Relative to the pipeline's directory, as the pipeline spells it: the data
# usually lies outside the project, where the lock would keep an absolute path.
REVIEWS="$(realpath --relative-to="$(dirname "$P")" "$DATA/amazon_fashion/AMAZON_FASHION_5.json.gz")"
./target/debug/recflow run "$P" --set "params.reviews=$REVIEWS" "$@"
echo "wall: $(( $(date +%s) - start )) s on $(nproc) cores"
./target/debug/recflow show "$P"
echo "report: $ROOT/runs/real_fashion_smollm2/report/report/index.html"
