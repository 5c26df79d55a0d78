#!/usr/bin/env bash
# End-to-end checks through the real binaries (called by scripts/test.sh):
#  0. the README's results tables match the committed locks they are
#     generated from (`recflow readme --check`), before anything reruns;
#  1. `status --check` of the quickstart against its committed lock, before
#     anything runs: code or configs changed without regenerating the lock
#     fail here (the data is absent; the lock's recorded hashes are trusted);
#  2. every shipped pipeline validates with `run --dry-run --allow-missing`;
#  3. the quickstart pipeline runs every stage kind end to end
#     (synthetic → … → SFT → GRPO → eval + baselines → report);
#  4. a rerun is all cache hits (asserted on its end-of-run table, then
#     `status --check`; the rerun's time is printed, not asserted);
#  5. `verify --stage sft --stage eval_sft` re-executes training and eval
#     into a scratch store and compares output bytes with the lock (under the
#     lock's numerics profile; under another it compares metrics within the
#     stated tolerance and says so);
#  6. the learning gates (scripts/gates.py): SFT greedy valid rate, GRPO's
#     greedy RMSE below SFT's by a margin and both below the global mean,
#     non-constant answers that correlate with the targets, GRPO's reward
#     rise and no collapse; the table of every method is printed with them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
R=./target/debug/recflow
export RECFLOW_CACHE="${RECFLOW_E2E_CACHE:-$ROOT/target/e2e-cache}"
rm -rf "$RECFLOW_CACHE"

echo "--- README results tables against the committed locks (before running)"
"$R" readme --check README.md

echo "--- status --check against the committed lock (before running)"
"$R" status --check pipelines/quickstart.yaml "$@"

echo "--- dry-run of every shipped pipeline"
for p in pipelines/*.yaml; do
  "$R" run --dry-run --allow-missing "$p" > /dev/null
  echo "ok  $p"
done

echo "--- quickstart: first run"
start=$(date +%s)
"$R" run -q pipelines/quickstart.yaml "$@"
echo "first run: $(( $(date +%s) - start )) s"

echo "--- quickstart: rerun must be all cache hits"
start=$(date +%s%N)
table=$("$R" run pipelines/quickstart.yaml "$@")
echo "rerun: $(( ($(date +%s%N) - start) / 1000000 )) ms"
# Every row of the end-of-run table must say `cached`.
echo "$table" | awk 'NR > 1 && $2 != "cached" { print "not a cache hit: " $0; bad = 1 } END { exit bad }'
echo "all $(( $(echo "$table" | wc -l) - 1 )) stages cached"
"$R" status --check pipelines/quickstart.yaml "$@"

echo "--- verify: eval re-executed in a scratch store"
"$R" verify pipelines/quickstart.yaml --stage sft --stage eval_sft "$@"

echo "--- show"
"$R" show pipelines/quickstart.yaml

echo "--- learning gates"
python3 scripts/gates.py pipelines/quickstart.lock
