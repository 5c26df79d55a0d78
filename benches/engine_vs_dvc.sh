#!/usr/bin/env bash
# Engine benchmark: recflow vs DVC on the same 10-stage chained shell
# pipeline over a 200 MB input file (issue 2), side by side in one run:
#   * no-op rerun wall time (median of RUNS), both tools, and the ratio
#   * first-time hashing of the 200 MB file (fresh store each repeat, page
#     cache warm) by recflow vs `openssl dgst -sha256`, alternating, medians
#     of wall time and of CPU time (user + sys). On a shared, loaded machine
#     wall time measures the load; CPU time measures the hashing.
# Usage: benches/engine_vs_dvc.sh [RUNS=7]
# Env: PROFILE=release (default) | dev (the shared test profile: dependencies
# -O3 — sha2 included —, our code -O1); RECFLOW_BIN=path uses that binary
# instead of building one.
# The peer, DVC, is pinned and installed by this script into a git-ignored
# bench venv (.bench/venv), never into the project's test venv.
set -euo pipefail
RUNS=${1:-7}
DVC_VERSION=3.67.1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source benches/common.sh
recflow_bin
bench_peer dvc "$DVC_VERSION"
DVC="$VENV/bin/dvc"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ns() { date +%s%N; }

head -c 200000000 /dev/urandom > "$WORK/big.bin"
pipeline() { # the same 10 chained stages for both tools
  prev=""
  for i in $(seq 1 10); do
    echo "  s$i:"
    if [ -z "$prev" ]; then
      echo "    cmd: wc -c < big.bin > out$i.txt"
      echo "    deps: [big.bin]"
    else
      echo "    cmd: cat $prev > out$i.txt; echo $i >> out$i.txt"
      echo "    deps: [big.bin, $prev]"
    fi
    echo "    outs: [out$i.txt]"
    prev="out$i.txt"
  done
}
setup() { mkdir -p "$1"; cd "$1"; git init -q .; cp "$WORK/big.bin" big.bin; }

# ---- recflow
setup "$WORK/rf"
{ echo "name: bench"; echo "stages:"; pipeline; } > pipeline.yaml
t0=$(ns); "$RECFLOW" run pipeline.yaml -q; t1=$(ns)
rf_first=$(( (t1 - t0) / 1000000 ))
rf_noop=$(for r in $(seq 1 "$RUNS"); do t0=$(ns); "$RECFLOW" run pipeline.yaml -q; t1=$(ns); echo $(( (t1 - t0) / 1000 )); done | median)

# ---- DVC
setup "$WORK/dvc"
"$DVC" init -q
{ echo "stages:"; pipeline; } > dvc.yaml
t0=$(ns); "$DVC" repro -q > /dev/null; t1=$(ns)
dvc_first=$(( (t1 - t0) / 1000000 ))
dvc_noop=$(for r in $(seq 1 "$RUNS"); do t0=$(ns); "$DVC" repro -q > /dev/null; t1=$(ns); echo $(( (t1 - t0) / 1000 )); done | median)

# ---- first-time hashing: one stage depending on the file, a fresh store each time
mkdir -p "$WORK/hash" && cd "$WORK/hash" && touch recflow.toml && cp "$WORK/big.bin" big.bin
printf 'stages:\n  h:\n    cmd: "true"\n    deps: [big.bin]\n' > p.yaml
cat big.bin > /dev/null # page cache warm for both tools
for r in $(seq 1 "$RUNS"); do
  rm -rf cache p.lock
  timed "$WORK/rf.hash" "$RECFLOW" run p.yaml -q
  timed "$WORK/ossl.hash" openssl dgst -sha256 big.bin
done
col() { awk -v c="$2" '{print $c}' "$1" | median; }
rf_w=$(col "$WORK/rf.hash" 1); rf_c=$(col "$WORK/rf.hash" 2)
os_w=$(col "$WORK/ossl.hash" 1); os_c=$(col "$WORK/ossl.hash" 2)
gbps() { awk -v s="$1" 'BEGIN{ if (s > 0) printf "%.2f", 0.2 / s; else print "inf" }'; }

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), sha_ni: $(grep -q sha_ni /proc/cpuinfo && echo yes || echo no); load: $(cut -d' ' -f1-3 /proc/loadavg); recflow $PROFILE build, dvc $DVC_VERSION"
echo "first run (10 stages, 200 MB input): recflow ${rf_first} ms, dvc ${dvc_first} ms, ratio $(awk "BEGIN{printf \"%.1f\", $dvc_first/$rf_first}")x"
echo "no-op rerun, median of $RUNS: recflow $(awk "BEGIN{printf \"%.1f\", $rf_noop/1000}") ms, dvc $(awk "BEGIN{printf \"%.1f\", $dvc_noop/1000}") ms, ratio $(awk "BEGIN{printf \"%.1f\", $dvc_noop/$rf_noop}")x"
echo "first-time hashing of 200 MB, median of $RUNS (recflow: a whole \`run\`, start-up included):"
echo "  wall: recflow $(gbps "$rf_w") GB/s (${rf_w} s), openssl $(gbps "$os_w") GB/s (${os_w} s), ratio $(awk "BEGIN{printf \"%.2f\", $os_w/$rf_w}")x"
echo "  cpu:  recflow $(gbps "$rf_c") GB/s (${rf_c} s), openssl $(gbps "$os_c") GB/s (${os_c} s), ratio $(awk "BEGIN{printf \"%.2f\", $os_c/$rf_c}")x"
