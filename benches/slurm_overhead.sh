#!/usr/bin/env bash
# Per-stage overhead of the Slurm executor vs the local one (issue 16): the
# same 20-stage matrix of trivial shell stages run from an empty store by
# `recflow run --executor local` and `--executor slurm` on a private
# single-node cluster (scripts/slurm_cluster.sh: Debian's slurmctld/slurmd/
# munge, started here, stopped at exit), alternating, RUNS times each. The
# Slurm runs move data through a `file://` remote and give every job a fresh
# node store, as a cluster without a shared file system would. Prints the
# median wall time of each, the per-stage overhead (difference / 20) and the
# ratio slurm / local.
# Both use the same --jobs (the node's CPU count: Slurm runs that many jobs
# at once, one CPU each). The cluster's scheduler latency is part of what is
# measured: defer_batch and sched_min_interval=0.1 s (slurm_cluster.sh), a
# 0.2 s squeue poll in the runner.
# Usage: benches/slurm_overhead.sh [RUNS=3]   (root; scripts/setup_slurm.sh
# installs the packages). Env: RECFLOW_BIN=path (default: a dev build).
set -euo pipefail
RUNS=${1:-3}
STAGES=20
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -n "${RECFLOW_BIN:-}" ]; then
  RECFLOW=$(cd "$(dirname "$RECFLOW_BIN")" && pwd)/$(basename "$RECFLOW_BIN")
else
  cargo build -q -p recflow --bin recflow
  RECFLOW="$ROOT/target/debug/recflow"
fi

WORK=$(mktemp -d)
chmod 0755 "$WORK" # mktemp's 0700 would keep the munge user out of the cluster dir below
CLUSTER="$WORK/cluster"
cleanup() { bash "$ROOT/scripts/slurm_cluster.sh" stop "$CLUSTER" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
START=$(bash "$ROOT/scripts/slurm_cluster.sh" start "$CLUSTER") || { echo "error: the test cluster did not start" >&2; exit 1; }
eval "$START"
JOBS=$(nproc)

# One project per executor; the pipeline: 20 expansions of one shell stage.
for ex in local slurm; do
  mkdir -p "$WORK/$ex/remote"
  {
    echo "stages:"
    echo "  s:"
    echo "    matrix:"
    echo "      i: [$(seq -s ', ' 1 $STAGES)]"
    echo "    cmd: \"echo \${matrix.i} > out_\${matrix.i}.txt\""
    echo "    outs: [\"out_\${matrix.i}.txt\"]"
  } > "$WORK/$ex/p.yaml"
done
: > "$WORK/local/recflow.toml"
cat > "$WORK/slurm/recflow.toml" <<EOF
[remote]
url = "file://$WORK/slurm/remote"

[executor.slurm]
poll_s = 0.2
node_store = "$CLUSTER/node-\$SLURM_JOB_ID"
output = "$CLUSTER/slurm-%j.out"
EOF

ns() { date +%s%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
one_run() { # EXECUTOR: wall seconds of a run from an empty store and remote
  local ex=$1 d="$WORK/$1"
  rm -rf "$d/cache" "$d/remote" "$d"/out_*.txt "$d/p.lock" "$d/runs" "$CLUSTER"/node-*
  mkdir -p "$d/remote"
  local t0 t1
  t0=$(ns)
  (cd "$d" && env -u RECFLOW_CACHE -u RECFLOW_REMOTE "$RECFLOW" run p.yaml -q --jobs "$JOBS" --executor "$ex" --progress-interval 0)
  t1=$(ns)
  [ "$(cat "$d"/out_*.txt | wc -l)" = "$STAGES" ] || { echo "error: $ex run did not write $STAGES outputs" >&2; exit 1; }
  awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", (b - a) / 1e9}'
}

: > "$WORK/t.local"
: > "$WORK/t.slurm"
one_run local >/dev/null # warm the page cache and the binary
for r in $(seq 1 "$RUNS"); do
  one_run local >> "$WORK/t.local"
  one_run slurm >> "$WORK/t.slurm"
done
L=$(median < "$WORK/t.local")
S=$(median < "$WORK/t.slurm")
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs; $RUNS runs each, alternating; --jobs $JOBS"
echo "local  runs (s): $(tr '\n' ' ' < "$WORK/t.local")-> median $L"
echo "slurm  runs (s): $(tr '\n' ' ' < "$WORK/t.slurm")-> median $S"
awk -v l="$L" -v s="$S" -v n="$STAGES" 'BEGIN {
  printf "%d stages: local %.2f s, slurm %.2f s; per-stage overhead of slurm %.3f s; ratio slurm/local %.1fx\n", n, l, s, (s - l) / n, s / l }'
