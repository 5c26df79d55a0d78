#!/usr/bin/env bash
# The main job on the built-in default pipeline: set-up, build, then
# `recflow run pipelines/quickstart.yaml` (synthetic data → prompts → cf
# teacher → tiny model → SFT → GRPO → eval + baselines → report), on CPU, no
# API key. Prints the results table and the report's path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
cargo build --workspace --bins
./target/debug/recflow run pipelines/quickstart.yaml "$@"
./target/debug/recflow show pipelines/quickstart.yaml
echo "report: $ROOT/runs/quickstart/report/report/index.html"
