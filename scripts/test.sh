#!/usr/bin/env bash
# Runs every test of recflow on a fresh machine: set-up (venv with torch
# 2.11.0, test peers, SmolLM2 GGUF), one build in one profile shared by tests
# and binaries, the unit and integration tests, then the end-to-end checks on
# the quickstart pipeline (scripts/e2e.sh). `.ci/run` calls this script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "build (dev profile, shared by tests and binaries)"
cargo build --workspace --all-targets

step "unit and integration tests"
# Fixed thread count: libtorch intra-op threads and the test harness share 2 cores.
cargo test --workspace -- --test-threads=2

step "end-to-end: quickstart pipeline"
bash scripts/e2e.sh
