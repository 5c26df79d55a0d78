#!/usr/bin/env bash
# The README's results tables are generated from the committed locks: every
# block between `<!-- results: LOCK -->` and `<!-- /results -->` is what
# `recflow show LOCK --format markdown` prints (the lock alone, no store).
#   scripts/readme_tables.sh           rewrite the blocks from the locks
#   scripts/readme_tables.sh --check   exit 1, with a diff, when a block differs
# Arguments go to `recflow readme [--check] [FILE]` (FILE: README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
R=./target/debug/recflow
cargo build -q -p recflow --bin recflow   # torch-free; a no-op when up to date
exec "$R" readme "$@"   # FILE defaults to README.md
