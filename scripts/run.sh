#!/usr/bin/env bash
# scripts/run.sh — the main command: set up, build everything, then run one scenario through the
# native engine and print its trace for humans.
#
#   scripts/run.sh                         tests/scenarios/retry-frozen.json (retries, backoff, recovery)
#   scripts/run.sh tests/scenarios/X.json  another scenario file
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:/usr/local/bin:$PATH"   # rustup's cargo; wasm-bindgen

# Resolve a caller's relative path before leaving their cwd.
scenario="${1:-}"
[ -z "$scenario" ] || scenario="$(realpath -- "$scenario")"
cd "$root"
if [ -z "$scenario" ]; then
  scenario=tests/scenarios/retry-frozen.json
fi

echo "==== setup";  scripts/setup.sh
echo "==== wasm";   scripts/build-wasm.sh
# Same selection as scripts/test.sh, so both share one set of release artifacts.
echo "==== native"; cargo build --release --workspace
echo "==== fedsend scenario --human $scenario"
exec target/release/fedsend scenario --human "$scenario"
