#!/usr/bin/env bash
# Teacher client throughput: 2,000 requests at concurrency 64 against the
# project's Rust test server answering after 20 ms (ideal: 2000 / 64 × 20 ms
# = 625 ms; goal ≤ 690 ms wall including the response-cache writes).
# Prints, per run and as medians: wall time, ratio to the ideal, client CPU
# time per request, journal fsyncs per answer.
#
# Usage: benches/teacher_throughput.sh [RUNS=5]
# PROFILE=release builds with the release profile (slow to build on 2 cores);
# the default is the dev profile (dependencies at opt-level 3, recflow at 1).
# BIN=path/to/teacher_bench skips the build. PIN="taskset -c 0,1" pins server and client.
# TIMER=tokio times the server's delay with tokio's millisecond timer (which
# holds "20 ms" answers ~21 ms) instead of the precise default, to compare.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
N=${N:-2000}
CONC=${CONC:-64}
DELAY_MS=${DELAY_MS:-20}
PROFILE=${PROFILE:-dev}
TIMER=${TIMER:-precise}
if [ -n "${BIN:-}" ]; then
  : # a prebuilt teacher_bench (e.g. copied to another machine)
elif [ "$PROFILE" = release ]; then
  cargo build -q --release -p recflow --example teacher_bench
  BIN=target/release/examples/teacher_bench
else
  cargo build -q -p recflow --example teacher_bench
  BIN=target/debug/examples/teacher_bench
fi
WORK=$(mktemp -d)
FIFO="$WORK/stdin"
mkfifo "$FIFO"
# The server runs until its stdin closes (we hold the fifo open on fd 9).
${PIN:-} "$BIN" server "$DELAY_MS" "$TIMER" < "$FIFO" > "$WORK/url" &
SERVER=$!
exec 9> "$FIFO"
trap 'exec 9>&-; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do [ -s "$WORK/url" ] && break; sleep 0.05; done
URL=$(cat "$WORK/url")
IDEAL=$(python3 -c "print($N / $CONC * $DELAY_MS / 1000)")
echo "server $URL ($TIMER timer), $N requests, concurrency $CONC, delay ${DELAY_MS} ms, ideal ${IDEAL} s, profile $PROFILE"
echo "$(nproc) cores; before: $(uptime)"
for i in $(seq "$RUNS"); do
  ${PIN:-} "$BIN" client "$URL" "$N" "$CONC" "$WORK/run" | tee -a "$WORK/results.jsonl"
done
echo "after: $(uptime)"
python3 - "$WORK/results.jsonl" "$IDEAL" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ideal = float(sys.argv[2])
med = lambda k: statistics.median(r[k] for r in rows)
w = med("wall_s")
print(f"median wall {w*1000:.0f} ms (ideal {ideal*1000:.0f} ms, ratio {w/ideal:.3f}, goal <= 690 ms: {'PASS' if w <= 0.690 else 'FAIL'})")
print(f"median client CPU {med('cpu_ms_per_request'):.3f} ms/request; median fsyncs/answer {med('fsyncs_per_answer'):.4f}")
print(f"median phases: setup {med('setup_ms'):.1f} ms, requests {med('requests_ms'):.1f} ms, outputs {med('outputs_ms'):.1f} ms")
PY
# The server prints how long it held answers when its stdin closes.
exec 9>&-
wait $SERVER 2>/dev/null || true
