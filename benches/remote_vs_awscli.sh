#!/usr/bin/env bash
# Remote store throughput (issue 16): `recflow push` / `recflow pull` vs the
# AWS CLI (`aws s3 cp --recursive`) moving the same files to and from one
# moto_server on this machine, side by side, alternating, REPS repeats;
# prints the median MB/s (wall) and CPU seconds of each and the ratio; then
# the no-op rerun of a 10-stage pipeline with the remote configured and off.
#
# moto is a single Python process: it bounds both clients here, so the
# numbers compare the clients' overheads against the same server on the same
# machine, not what a real S3 service delivers.
#
# Data: one stage writing MB megabytes of random bytes, 3/4 in one file (a
# multipart upload) and 1/4 in 64 small files (a directory output). Both
# tools use 8 MiB parts (the AWS CLI's default multipart_threshold and
# chunksize); recflow runs 8 transfers at once (its default --jobs), the AWS
# CLI 10 (its default max_concurrent_requests). Each push goes to a fresh
# prefix; each pull into an empty store / directory.
# Usage: benches/remote_vs_awscli.sh [REPS=3] [MB=256]
# Env: PROFILE=release (default) | dev; RECFLOW_BIN=path uses that binary.
# The peer is pinned and installed by this script into the git-ignored bench
# venv (.bench/venv), never into the project's venv; moto_server comes from
# the project venv (scripts/setup.sh installs it).
set -euo pipefail
REPS=${1:-3}
MB=${2:-256}
AWSCLI_VERSION=1.46.3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/setup.sh
source benches/common.sh
recflow_bin
bench_peer awscli "$AWSCLI_VERSION"
AWS="$VENV/bin/aws"

WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$PORT" > "$WORK/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null; wait $MOTO 2>/dev/null; rm -rf "$WORK"' EXIT
EP="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do curl -sf "$EP/" > /dev/null && break; sleep 0.1; done
curl -sf -X PUT "$EP/bench" > /dev/null
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1
unset AWS_ENDPOINT_URL RECFLOW_CACHE || true

# The data, produced by a recflow stage (so it is in a store to push).
mkdir -p "$WORK/src" && cd "$WORK/src"
printf '[remote]\nurl = "s3://bench/unused"\nendpoint = "%s"\n' "$EP" > recflow.toml
big=$((MB * 3 / 4)); small_kb=$((MB * 1024 / 4 / 64))
cat > p.yaml <<EOF
stages:
  data:
    cmd: "head -c ${big}000000 /dev/urandom > big.bin; mkdir -p small; for i in \$(seq 1 64); do head -c ${small_kb}000 /dev/urandom > small/f\$i.bin; done"
    outs: [big.bin, small]
EOF
RECFLOW_REMOTE=off "$RECFLOW" run p.yaml -q
BYTES=$(du -sb --apparent-size big.bin small | awk '{s += $1} END {print s}')
mkdir -p "$WORK/aws-src" && cp -r big.bin small "$WORK/aws-src/"


for r in $(seq 1 "$REPS"); do
  # recflow push to a fresh prefix, then pull into an empty project.
  cd "$WORK/src"
  RECFLOW_REMOTE="s3://bench/rf$r" timed "$WORK/rf_push" "$RECFLOW" push p.yaml
  rm -rf "$WORK/dst" && mkdir -p "$WORK/dst" && cp recflow.toml p.yaml p.lock "$WORK/dst/" && cd "$WORK/dst"
  RECFLOW_REMOTE="s3://bench/rf$r" timed "$WORK/rf_pull" "$RECFLOW" pull p.yaml
  cmp -s "$WORK/src/big.bin" big.bin || { echo "recflow pull: big.bin differs" >&2; exit 1; }
  # The AWS CLI on the same files.
  timed "$WORK/aws_push" "$AWS" --endpoint-url "$EP" s3 cp --recursive --quiet "$WORK/aws-src" "s3://bench/aws$r"
  rm -rf "$WORK/aws-dst"
  timed "$WORK/aws_pull" "$AWS" --endpoint-url "$EP" s3 cp --recursive --quiet "s3://bench/aws$r" "$WORK/aws-dst"
  cmp -s "$WORK/src/big.bin" "$WORK/aws-dst/big.bin" || { echo "aws pull: big.bin differs" >&2; exit 1; }
  # Free moto's memory before the next round.
  "$AWS" --endpoint-url "$EP" s3 rm --recursive --quiet "s3://bench/rf$r"
  "$AWS" --endpoint-url "$EP" s3 rm --recursive --quiet "s3://bench/aws$r"
done

# No-op rerun of a 10-stage chain with the remote configured (it must not be
# contacted: every key is local) against the same with RECFLOW_REMOTE=off.
mkdir -p "$WORK/noop" && cd "$WORK/noop" && cp "$WORK/src/recflow.toml" .
{ echo "stages:"; prev=""; for i in $(seq 1 10); do
    echo "  s$i:"; echo "    cmd: echo $i $([ -n "$prev" ] && echo "| cat - $prev") > o$i.txt"
    [ -n "$prev" ] && echo "    deps: [$prev]"; echo "    outs: [o$i.txt]"; prev="o$i.txt"; done; } > n.yaml
RECFLOW_REMOTE=s3://bench/noop "$RECFLOW" run n.yaml -q
us() { local t0 t1; t0=$(date +%s%N); "$@" > /dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000 )); }
for r in $(seq 1 9); do
  us env RECFLOW_REMOTE=s3://bench/noop "$RECFLOW" run n.yaml -q >> "$WORK/noop_remote"
  us env RECFLOW_REMOTE=off "$RECFLOW" run n.yaml -q >> "$WORK/noop_off"
done

col() { awk -v c="$2" '{print $c}' "$WORK/$1" | median; }
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "recflow: $PROFILE; peer: awscli $AWSCLI_VERSION; server: moto $("$ROOT/.venv/bin/python" -c 'import moto; print(moto.__version__)') on 127.0.0.1"
echo "data: $(awk -v b="$BYTES" 'BEGIN {printf "%.1f MB", b / 1e6}') (one $big MB file + 64 files); medians of $REPS"
printf '%-5s %-22s %-22s %s\n' "" "recflow (wall, cpu)" "aws s3 cp (wall, cpu)" "ratio (aws wall / recflow wall)"
for op in push pull; do
  rw=$(col "rf_$op" 1); rc=$(col "rf_$op" 2); aw=$(col "aws_$op" 1); ac=$(col "aws_$op" 2)
  awk -v op="$op" -v b="$BYTES" -v rw="$rw" -v rc="$rc" -v aw="$aw" -v ac="$ac" 'BEGIN {
    printf "%-5s %6.1f MB/s %5.2fs cpu  %6.1f MB/s %5.2fs cpu  %.2fx\n", op, b/1e6/rw, rc, b/1e6/aw, ac, aw/rw }'
done
echo "no-op rerun, 10 stages, median of 9: remote configured $(median < "$WORK/noop_remote" | awk '{printf "%.1f", $1/1000}') ms, RECFLOW_REMOTE=off $(median < "$WORK/noop_off" | awk '{printf "%.1f", $1/1000}') ms"
