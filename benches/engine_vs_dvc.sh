#!/usr/bin/env bash
# Engine benchmark: recflow vs DVC on the same 10-stage chained shell
# pipeline over a 200 MB input file (issue 2).
#   * no-op rerun wall time (median of N runs), both tools, and the ratio
#   * first-time hashing throughput of recflow vs `openssl dgst -sha256`
# Usage: benches/engine_vs_dvc.sh [RUNS]   (builds release; PROFILE=dev uses
# the shared test profile instead: dependencies -O3, our code -O1)
set -euo pipefail
RUNS=${1:-7}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source .venv/bin/activate
if [ "${PROFILE:-release}" = dev ]; then
  cargo build -q -p recflow --bin recflow
  RECFLOW="$ROOT/target/debug/recflow"
else
  cargo build --release -q -p recflow --bin recflow
  RECFLOW="$ROOT/target/release/recflow"
fi
# DVC is the named peer: installed into the project venv by this script only.
if ! .venv/bin/python -c "import dvc" 2>/dev/null; then
  .venv/bin/pip install -q dvc
fi
DVC="$ROOT/.venv/bin/dvc"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ms() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

setup() { # $1 = dir
  mkdir -p "$1"; cd "$1"
  git init -q .
  head -c 200000000 /dev/urandom > big.bin 2>/dev/null || dd if=/dev/urandom of=big.bin bs=1M count=200 status=none
}

# ---- recflow
setup "$WORK/rf"
{
  echo "name: bench"
  echo "stages:"
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
} > pipeline.yaml
t0=$(ms); "$RECFLOW" run pipeline.yaml -q; t1=$(ms)
rf_first=$(( (t1 - t0) / 1000000 ))
rf_noop=$(for r in $(seq 1 "$RUNS"); do t0=$(ms); "$RECFLOW" run pipeline.yaml -q; t1=$(ms); echo $(( (t1 - t0) / 1000 )); done | median)

# first-time hashing: a fresh store, one stage depending on the 200 MB file
mkdir -p "$WORK/hash" && cp --reflink=auto big.bin "$WORK/hash/" 2>/dev/null || cp big.bin "$WORK/hash/"
cd "$WORK/hash" && touch recflow.toml
printf 'stages:\n  h:\n    cmd: "true"\n    deps: [big.bin]\n' > p.yaml
cat big.bin > /dev/null # warm page cache for both tools
t0=$(ms); "$RECFLOW" run p.yaml -q; t1=$(ms); rf_hash_ms=$(( (t1 - t0) / 1000000 ))
t0=$(ms); openssl dgst -sha256 big.bin > /dev/null; t1=$(ms); ossl_ms=$(( (t1 - t0) / 1000000 ))

# ---- DVC (same pipeline as dvc.yaml)
setup "$WORK/dvc"
"$DVC" init -q
{
  echo "stages:"
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
} > dvc.yaml
t0=$(ms); "$DVC" repro -q > /dev/null; t1=$(ms)
dvc_first=$(( (t1 - t0) / 1000000 ))
dvc_noop=$(for r in $(seq 1 "$RUNS"); do t0=$(ms); "$DVC" repro -q > /dev/null; t1=$(ms); echo $(( (t1 - t0) / 1000 )); done | median)

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "first run (10 stages, 200 MB input): recflow ${rf_first} ms, dvc ${dvc_first} ms"
echo "no-op rerun median of $RUNS: recflow $(awk "BEGIN{printf \"%.1f\", $rf_noop/1000}") ms, dvc $(awk "BEGIN{printf \"%.1f\", $dvc_noop/1000}") ms, ratio $(awk "BEGIN{printf \"%.1f\", $dvc_noop/$rf_noop}")x"
echo "first-time hashing of 200 MB: recflow $(awk "BEGIN{printf \"%.2f\", 200/$rf_hash_ms}") GB/s (${rf_hash_ms} ms incl. start-up), openssl dgst -sha256 $(awk "BEGIN{printf \"%.2f\", 200/$ossl_ms}") GB/s (${ossl_ms} ms)"
