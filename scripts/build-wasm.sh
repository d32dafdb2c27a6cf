#!/usr/bin/env bash
# scripts/build-wasm.sh — builds both wasm artifacts (needs scripts/setup.sh first):
#   host-wasm/pkg/node/   wasm-bindgen --target nodejs bindings of fedsend-wasm (Node)
#   www/pkg/              wasm-bindgen --target web bindings of fedsend-wasm (browser)
#   target/fedsend_guest.wasm   plain C-ABI module of fedsend-guest (wasmtime in the native host)
#   npm/dist/             wasm-bindgen --target web bindings of fedsend-wasm (the npm package, Node + browser)
#
# Both crates are built in ONE cargo invocation so that std is compiled once (cold: 1.5-2.5 min on 2 cores).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="/usr/local/bin:$PATH"   # wasm-bindgen from scripts/setup.sh

out=target/wasm/wasm32-unknown-unknown/wasm-release
# cargo re-links these on every build (even when fresh) but never deletes them; removing them
# first means a crate that stopped being a cdylib fails below instead of shipping a stale module.
rm -f "$out/fedsend_wasm.wasm" "$out/fedsend_guest.wasm"
# Both modules ship without their function-name sections (the guest's 138 KB of 923 KB, the
# wasm-bindgen module's 541 KB of 2.75 MB; BENCHMARKS.md, "wasm size (issue 17)"): the names
# only label the frames of a wasm stack trace after a panic, which is a bug. To debug one,
# FEDSEND_WASM_NAMES=1 keeps them (the code is the same either way).
names=()
bindgen=(wasm-bindgen --remove-name-section --remove-producers-section)
if [ "${FEDSEND_WASM_NAMES:-0}" = 1 ]; then
  names=(--config 'profile.wasm-release.package.fedsend-guest.strip="none"')
  bindgen=(wasm-bindgen)
fi
scripts/wasm-cargo build --target wasm32-unknown-unknown --profile wasm-release \
  -p fedsend-wasm -p fedsend-guest "${names[@]}"

for crate in fedsend_wasm fedsend_guest; do
  [ -f "$out/$crate.wasm" ] || {
    echo "build-wasm: $out/$crate.wasm was not produced: its crate needs crate-type = [\"cdylib\", \"rlib\"] under [lib]" >&2
    exit 1
  }
done

rm -rf host-wasm/pkg/node www/pkg   # generated only (git-ignored); no stale files from older builds
"${bindgen[@]}" --target nodejs --out-dir host-wasm/pkg/node "$out/fedsend_wasm.wasm"
"${bindgen[@]}" --target web --out-dir www/pkg "$out/fedsend_wasm.wasm"
cp "$out/fedsend_guest.wasm" target/fedsend_guest.wasm

# The npm package (npm/): one ES-module build serves Node (which instantiates it synchronously
# from the file) and browsers/bundlers (which fetch it); npm/dist/ is generated, git-ignored.
rm -rf npm/dist
"${bindgen[@]}" --target web --out-dir npm/dist "$out/fedsend_wasm.wasm"

echo "build-wasm: host-wasm/pkg/node, www/pkg, npm/dist ($(wc -c < www/pkg/fedsend_wasm_bg.wasm) B), target/fedsend_guest.wasm ($(wc -c < target/fedsend_guest.wasm) B)"
