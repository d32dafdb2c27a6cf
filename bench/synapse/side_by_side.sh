#!/usr/bin/env bash
# bench/synapse/side_by_side.sh [side_by_side.py options] — fedsend and Synapse's own federation
# sender on the same Synapse-shaped burst, one table with the ratio (BENCHMARKS.md). Runs
# side_by_side.py with the pinned Synapse of scripts/setup.sh's virtualenv; fedsend-bench is
# $FEDSEND_BENCH or target/release/fedsend-bench (build it first: cargo build --release --workspace,
# and scripts/build-wasm.sh for the wasmtime and Node engines).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="$root/tools/python/synapse-venv/bin/python"
[ -x "$py" ] || { echo "side_by_side.sh: $py is missing; run scripts/setup.sh" >&2; exit 1; }
exec "$py" "$root/bench/synapse/side_by_side.py" "$@"
