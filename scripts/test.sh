#!/usr/bin/env bash
# Runs every test of recflow on a fresh machine: set-up (venv with torch
# 2.11.0, test peers, SmolLM2 GGUF), one build in one profile shared by tests
# and binaries, the unit and integration tests, then the end-to-end checks on
# the quickstart pipeline (scripts/e2e.sh). `.ci/run` calls this script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# A fresh clone needs ~14 GB: the venv (torch with its CUDA libraries, 5 GB),
# the build (~7 GB) and the stores of the tests. A full disk fails the build
# minutes in with "No space left on device"; say so up front instead.
FREE_KB=$(df -Pk "$ROOT" | awk 'NR==2 {print $4}')
if [ "${FREE_KB:-0}" -lt $((16 * 1024 * 1024)) ]; then
  echo "warning: $((FREE_KB / 1024 / 1024)) GB free on the disk of $ROOT; the tests need ~14 GB (venv, build, stores). Free space (old clones' target/ and .venv/) if the build fails with 'No space left on device'." >&2
fi

source scripts/setup.sh

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "build (dev profile, shared by tests and binaries)"
cargo build --workspace --all-targets

step "unit and integration tests"
# Fixed thread count: libtorch intra-op threads and the test harness share 2 cores.
cargo test --workspace -- --test-threads=2

step "end-to-end: quickstart pipeline"
bash scripts/e2e.sh
