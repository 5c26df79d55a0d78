#!/usr/bin/env bash
# Does the quickstart recipe learn whatever the trajectory? Runs
# pipelines/quickstart.yaml from an empty store for 3 training seeds
# (params.train_seed: model init, SFT, GRPO and sampling; the synthetic data
# stays the same) under 2 numerics profiles (ATen's CPU capability pinned to
# avx2, and the machine's native one), then prints one table: every method's
# RMSE, MAE and invalid rate, and each learning gate of scripts/gates.py per
# run with PASS/FAIL. Outside CI (about 6 × the quickstart's time).
#
# Usage: scripts/robustness.sh [SEEDS] [PROFILES]
#   SEEDS     default "42 43 44"
#   PROFILES  default "aten=avx2,mkl=compatible aten=native,mkl=off" (RECFLOW_NUMERICS
#             values: the portable default profile, and the machine's native code paths)
# Each run lives in its own scratch project under target/robustness/ (a copy
# of the pipeline, the repo's stages/), so the committed lock is untouched.
# The scratch stores are kept between invocations: a rerun is a cache hit for
# every finished cell and resumes an interrupted one where it stopped
# (`rm -rf target/robustness` to start over).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
cargo build -q --workspace --bins   # the feature set of the test build: no dependency rebuilt
SEEDS=${1:-"42 43 44"}
PROFILES=${2:-"aten=avx2,mkl=compatible aten=native,mkl=off"}
R="$ROOT/target/debug/recflow"
OUT="$ROOT/target/robustness"
mkdir -p "$OUT"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
t_all=$(date +%s)
for profile in $PROFILES; do
  for seed in $SEEDS; do
    label="seed=$seed,$profile"
    dir="$OUT/${seed}_${profile//[=,]/_}"
    mkdir -p "$dir/pipelines"
    : > "$dir/recflow.toml"           # the scratch project's root
    cp pipelines/quickstart.yaml "$dir/pipelines/"
    ln -sfn "$ROOT/stages" "$dir/stages"
    echo "--- $label"
    t0=$(date +%s)
    RECFLOW_NUMERICS="$profile" RECFLOW_CACHE="$dir/cache" \
      "$R" run -q "$dir/pipelines/quickstart.yaml" --set "params.train_seed=$seed" > "$dir/run.log" 2>&1 ||
      { echo "run failed: see $dir/run.log"; tail -5 "$dir/run.log"; }
    echo "wall $(( $(date +%s) - t0 )) s"
    python3 scripts/gates.py "$dir/pipelines/quickstart.lock" --json "$dir/gates.json" --label "$label" \
      > "$dir/gates.txt" 2>&1 || true
  done
done
echo "all runs: $(( $(date +%s) - t_all )) s"
python3 - "$OUT" <<'PY'
import glob, json, sys
runs = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/*/gates.json"))]
if not runs:
    sys.exit("no run produced gates.json")
methods = list(runs[0]["methods"])
f = lambda x, nd=3: "—" if x is None else f"{x:.{nd}f}"
print("\n| run | " + " | ".join(f"{m} RMSE / MAE / invalid" for m in methods) + " |")
print("|---|" + "---|" * len(methods))
for r in runs:
    cells = [f"{f(r['methods'][m]['rmse'])} / {f(r['methods'][m]['mae'])} / {f(r['methods'][m]['invalid_rate'], 2)}" for m in methods]
    print(f"| {r['label']} | " + " | ".join(cells) + " |")
gates = [g["gate"] for g in runs[0]["gates"]]
print("\n| run | " + " | ".join(gates) + " |")
print("|---|" + "---|" * len(gates))
for r in runs:
    print(f"| {r['label']} | " + " | ".join("PASS" if g["pass"] else "FAIL" for g in r["gates"]) + " |")
print("\nper gate, the measured values:")
for r in runs:
    print(r["label"])
    for g in r["gates"]:
        print(f"  [{'PASS' if g['pass'] else 'FAIL'}] {g['what']}")
bad = sum(not g["pass"] for r in runs for g in r["gates"])
print(f"\n{len(runs)} runs, {bad} failed gate(s)")
sys.exit(1 if bad else 0)
PY
