#!/usr/bin/env bash
# scripts/run.sh — the main command: set up, build everything, then run `fedsend demo`: the
# federation sender service (SQLite, real HTTPS with X-Matrix signing, the ingest API) against
# loopback remote servers it starts itself (flaky, down for a while, rate-limiting), with live
# progress and a delivery report; it exits non-zero unless every remote converged.
#
#   scripts/run.sh                         fedsend demo
#   scripts/run.sh tests/scenarios/X.json  a scenario file instead, printed for humans
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:/usr/local/bin:$PATH"   # rustup's cargo; wasm-bindgen

# Resolve a caller's relative path before leaving their cwd.
scenario="${1:-}"
[ -z "$scenario" ] || scenario="$(realpath -- "$scenario")"
cd "$root"

echo "==== setup";  scripts/setup.sh
echo "==== wasm";   scripts/build-wasm.sh
# Same selection as scripts/test.sh, so both share one set of release artifacts.
echo "==== native"; cargo build --release --workspace
if [ -n "$scenario" ]; then
  echo "==== fedsend scenario --human $scenario"
  exec target/release/fedsend scenario --human "$scenario"
fi
echo "==== fedsend demo"
exec target/release/fedsend demo
