# Shared by the benchmark scripts (sourced after `cd "$ROOT"`):
#   recflow_bin            sets RECFLOW to the runner to time: RECFLOW_BIN=path, else a
#                          build in PROFILE=release (default) or dev (the test profile);
#                          PROFILE then names what was timed.
#   bench_peer PKG VERSION installs PKG==VERSION into the git-ignored bench venv
#                          (.bench/venv, never the project's test venv); sets VENV.
#   median                 the median of numbers on stdin, one a line.
#   timed OUT CMD...       runs CMD (output discarded), appends "wall_s cpu_s" to OUT.
recflow_bin() {
  PROFILE=${PROFILE:-release}
  if [ -n "${RECFLOW_BIN:-}" ]; then
    RECFLOW=$(cd "$(dirname "$RECFLOW_BIN")" && pwd)/$(basename "$RECFLOW_BIN")
    PROFILE="given ($RECFLOW_BIN)"
  elif [ "$PROFILE" = dev ]; then
    cargo build -q -p recflow --bin recflow
    RECFLOW="$ROOT/target/debug/recflow"
  else
    cargo build --release -q -p recflow --bin recflow
    RECFLOW="$ROOT/target/release/recflow"
  fi
}
bench_peer() {
  VENV="$ROOT/.bench/venv"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  if [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" != "$2" ]; then
    "$VENV/bin/pip" install -q "$1==$2"
  fi
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
timed() { local out=$1; shift; /usr/bin/time -f "%e %U %S" -o "$out.t" "$@" > /dev/null 2>&1; awk '{print $1, $2 + $3}' "$out.t" >> "$out"; }
