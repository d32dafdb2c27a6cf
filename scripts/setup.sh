#!/usr/bin/env bash
# scripts/setup.sh — idempotent setup of the build/test toolchain on Debian 12 (bookworm).
#
# Installs only what is missing, so a second run takes a second or two. Installing needs root;
# a machine that already has everything can run it as any user.
# Expects rustup's stable toolchain (native builds) and Node >= 20 with npm to be present.
# Model and reasons: docs/toolchain.md, 'The setup script'.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WASM_BINDGEN_VERSION=0.2.130   # must equal the `wasm-bindgen = "=…"` pin of host-wasm
PREFIX=/usr/local              # wasm-bindgen, wasm-bindgen-test-runner -> $PREFIX/bin
WASM_TOOLS_BIN="${WASM_TOOLS_BIN:-$PREFIX/lib/wasm-toolchain/bin}"   # only scripts/wasm-cargo puts it on PATH
NODE_TOOLS_DIR="$root/tools/node"
export DEBIAN_FRONTEND=noninteractive
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "$1 is missing; run scripts/setup.sh as root to install it"; }

# 1. Debian packages:
#    rustc-web cargo-web rust-web-src  rustc/cargo 1.96 + std sources for -Zbuild-std (wasm builds)
#    lld-19                            wasm-ld / lld for the symlinks below
#    chromium chromium-driver          browser tests (Playwright, wasm-bindgen-test-runner)
#    NOT `binaryen`: its wasm-opt 108 silently breaks wasm-bindgen 0.2.130 output.
pkgs=(rustc-web cargo-web rust-web-src lld-19 chromium chromium-driver)
command -v cc >/dev/null || pkgs+=(gcc libc6-dev)   # rustup's native rustc links with cc
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  need_root "apt packages (${missing[*]})"
  say "apt: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  say "apt: ${pkgs[*]} already installed"
fi

# 1b. Private database services for the worker tests (scripts/services.sh starts its own instances
#     on free loopback ports): postgresql-15 (initdb/pg_ctl in /usr/lib/postgresql/15/bin) and
#     redis-server. The packages' own system-wide services (port 5432, port 6379) must not run:
#     a policy-rc.d that refuses every start is in place while apt installs (Docker images
#     usually have one already), and anything that started anyway is stopped afterwards.
svc_pkgs=(postgresql-15 redis-server)
svc_missing=()
for p in "${svc_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || svc_missing+=("$p")
done
if ((${#svc_missing[@]})); then
  need_root "apt packages (${svc_missing[*]})"
  say "apt: installing ${svc_missing[*]} (system services kept stopped)"
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if ! [ -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${svc_missing[@]}" >/dev/null
  if ((own_policy)); then rm -f "$policy"; fi
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
      pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
  fi
  service redis-server stop >/dev/null 2>&1 || true
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now postgresql redis-server >/dev/null 2>&1 || true
  fi
else
  say "apt: ${svc_pkgs[*]} already installed"
fi

# 2. Linker names Debian's rustc looks for on PATH (the package ships neither):
#    rust-lld = default linker of wasm32-unknown-unknown, wasm32v1-none, wasm32-wasip1
#    wasm-ld  = what wasm-component-ld (wasm32-wasip2) spawns
links_ok=1
[ "$(readlink "$WASM_TOOLS_BIN/rust-lld" 2>/dev/null)" = /usr/bin/lld-19 ] || links_ok=0
[ "$(readlink "$WASM_TOOLS_BIN/wasm-ld" 2>/dev/null)" = /usr/bin/wasm-ld-19 ] || links_ok=0
if ((links_ok)); then
  say "linker symlinks: already in $WASM_TOOLS_BIN"
else
  need_root "the rust-lld/wasm-ld symlinks in $WASM_TOOLS_BIN"
  mkdir -p "$WASM_TOOLS_BIN"
  ln -sfn /usr/bin/lld-19 "$WASM_TOOLS_BIN/rust-lld"
  ln -sfn /usr/bin/wasm-ld-19 "$WASM_TOOLS_BIN/wasm-ld"
  say "linker symlinks: created rust-lld, wasm-ld in $WASM_TOOLS_BIN"
fi

# 3. wasm-bindgen-cli, pinned; built by rustup's stable cargo (~3 min cold on 2 cores).
#    No --locked: the CLI's lockfile pins a yanked webpki-roots and fails to resolve.
have="$("$PREFIX/bin/wasm-bindgen" --version 2>/dev/null || true)"
if [ "$have" = "wasm-bindgen $WASM_BINDGEN_VERSION" ]; then
  say "wasm-bindgen-cli: $WASM_BINDGEN_VERSION already in $PREFIX/bin"
else
  need_root "wasm-bindgen-cli $WASM_BINDGEN_VERSION (found: ${have:-none})"
  command -v cargo >/dev/null || die "cargo not found: install rustup's stable toolchain first"
  cargo_cmd=(cargo)
  command -v rustup >/dev/null && cargo_cmd=(cargo +stable)
  say "wasm-bindgen-cli: installing $WASM_BINDGEN_VERSION (found: ${have:-none}; takes ~3 min)"
  "${cargo_cmd[@]}" install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --root "$PREFIX" --force
fi

# 4. npm tools (playwright-core; better-sqlite3 and typescript for npm/; pinned by the committed lock). Never `npx playwright install`:
#    tests drive Debian's /usr/bin/chromium. The stamp skips `npm ci` while the lock is unchanged
#    (`npm ci` deletes node_modules, which also deletes the stamp).
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm (Node >= 20) are required"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
((node_major >= 20)) || die "Node >= 20 is required (found $(node --version))"
stamp="$NODE_TOOLS_DIR/node_modules/.setup-stamp"
want="$(cat "$NODE_TOOLS_DIR/package.json" "$NODE_TOOLS_DIR/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  say "npm: tools/node already installed"
else
  # ---- npm package (npm/) tests: better-sqlite3 and typescript in tools/node ----
  # better-sqlite3's prebuilt binaries live on GitHub, which CI cannot reach: it is compiled
  # (~1 min) with node-gyp against the headers of the installed Node (nodedir, so node-gyp
  # downloads nothing), which needs python3, make and g++.
  build_pkgs=()
  command -v python3 >/dev/null || build_pkgs+=(python3)
  command -v make >/dev/null || build_pkgs+=(make)
  command -v g++ >/dev/null || build_pkgs+=(g++)
  if ((${#build_pkgs[@]})); then
    need_root "build tools for better-sqlite3 (${build_pkgs[*]})"
    say "apt: installing ${build_pkgs[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${build_pkgs[@]}"
  fi
  node_prefix="$(node -p 'process.config.variables.node_prefix || ""')"
  for dir in "$node_prefix" /usr /usr/local; do
    if [ -n "$dir" ] && [ -f "$dir/include/node/node_api.h" ]; then export npm_config_nodedir="$dir"; break; fi
  done
  [ -n "${npm_config_nodedir:-}" ] || die "Node's headers (include/node/node_api.h) are missing: install the nodejs package with headers"
  export npm_config_build_from_source=true
  # ---- end npm package block ----
  say "npm: npm ci in tools/node (compiles better-sqlite3, ~1 min)"
  (cd "$NODE_TOOLS_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
fi

# ---- 5. Python virtualenvs: the Synapse interop peer (issue 6) and signedjson (issue 5) --------
#    Each venv has every package pinned in a requirements file, is installed from wheels only,
#    and runs on Debian's own Python 3.11 (not whatever python3 comes first on PATH, so the venv
#    is the same everywhere). A stamp skips pip while the pins and the interpreter are
#    unchanged; a changed pin rebuilds the venv from scratch so nothing unpinned lingers.
SYSTEM_PYTHON=/usr/bin/python3
if ! [ -x "$SYSTEM_PYTHON" ] || ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'install ok installed'; then
  need_root "python3 / python3-venv (for the Python test virtualenvs)"
  say "apt: installing python3 python3-venv"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 python3-venv
fi
# python_venv NAME REQUIREMENTS IMPORTS WHAT: tools/python/NAME from REQUIREMENTS, checked by
# importing IMPORTS (a Python import statement).
python_venv() {
  local name=$1 requirements=$2 imports=$3 what=$4
  local venv="$root/tools/python/$name"
  local want
  want="$( (cat "$requirements"; "$SYSTEM_PYTHON" --version) | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$venv/.setup-stamp" 2>/dev/null)" = "$want" ]; then
    say "$name: already in tools/python/$name"
    return
  fi
  say "$name: creating tools/python/$name ($what; pip, wheels only)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$SYSTEM_PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check --no-input -q \
    --only-binary :all: --no-deps -r "$requirements"
  "$venv/bin/python" -c "$imports" || die "$name: the installed packages do not import"
  echo "$want" > "$venv/.setup-stamp"
}
# Synapse as the federation peer of interop/ and interop/worker/ (~30 s, 240 MB).
# Also psycopg2 and txredisapi: interop/worker/ runs Synapse on PostgreSQL + Redis.
python_venv synapse-venv "$root/interop/requirements.txt" \
  'import synapse, signedjson, requests, psycopg2, txredisapi, hiredis' \
  "matrix-synapse for the interop peer, ~30 s"
# host-native/tests/transport.rs checks our X-Matrix signatures with this independent
# implementation.
python_venv sign-venv "$root/host-native/tests/fixtures/sign-requirements.txt" \
  'import signedjson.sign, canonicaljson' "signedjson for the transport tests, ~10 s"
# ---- end of Python virtualenvs -------------------------------------------------------------------

# ---- 6. Fuzzing (fuzz/, `scripts/test.sh fuzz`) -------------------------------------------------
#    No cargo-fuzz and no nightly: fuzz/fuzz.sh passes stable rustc the coverage flags itself,
#    and the libfuzzer-sys crate (pinned in fuzz/Cargo.lock) compiles libFuzzer's C++ sources
#    at build time, which needs a C++ compiler and libstdc++: Debian's g++ (12 on bookworm).
if command -v g++ >/dev/null; then
  say "fuzz: g++ $(g++ -dumpversion) already installed (libFuzzer is built by the libfuzzer-sys crate)"
else
  need_root "g++ (libFuzzer's C++ sources, for fuzz/)"
  say "apt: installing g++ (libFuzzer, for fuzz/)"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi
# ---- end of fuzzing --------------------------------------------------------------------------------

say "ok: $(/usr/bin/rustc --version | cut -d' ' -f1-2) (wasm), $(rustc --version | cut -d' ' -f1-2) (native), $("$PREFIX/bin/wasm-bindgen" --version), node $(node --version)"
