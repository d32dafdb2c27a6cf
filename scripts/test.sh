#!/usr/bin/env bash
# scripts/test.sh — every test, from a fresh clone, at any cwd. CI runs this (.ci/run).
#
#   scripts/test.sh              all stages, in order
#   scripts/test.sh no-std node  only the named stages (they assume the earlier ones ran once)
#
# Stages:
#   setup         scripts/setup.sh (idempotent; installs only what is missing)
#   services      scripts/services.sh: private PostgreSQL + Redis on free loopback ports in a temp
#                 dir, stopped (and the dir removed) when test.sh exits. Their FEDSEND_TEST_*
#                 variables (see scripts/services.sh) are exported to every later stage, cargo
#                 tests included. Started automatically before the first stage that uses them
#                 (native-test, bench, interop, worker) even when `services` is not named, e.g. by
#                 `scripts/test.sh native-test`. When FEDSEND_TEST_PG_PORT is already set (a dev
#                 instance: `. DIR/env` after `scripts/services.sh start DIR`), those are used and left running.
#   wasm          scripts/build-wasm.sh (Node + web bindings, target/fedsend_guest.wasm)
#   native-build  cargo build --release --workspace
#   native-test   cargo test --release --workspace (same selection as the build, so the test step
#                 only compiles test harnesses; see docs/toolchain.md, 'Same package selection for build and test');
#                 then npm/types.d.ts regenerated from the core's Rust types and compared with the committed file
#   simulate      target/release/fedsend-vopr --seeds 1000..3000 (prints what the faults exercised)
#   bench         target/release/fedsend-bench at a tiny size on every engine (native, wasmtime,
#                 Node): checks that it runs, that all engines agree on every count and that the
#                 numbers are sane; no timing thresholds (BENCHMARKS.md has the real run); then
#                 Synapse's own sender beside fedsend on a 120-event x 20-server burst (bench/synapse/);
#                 then the service end to end (`fedsend serve`, 20 events to 5 loopback HTTPS remotes)
#                 beside Synapse's sender with signing on: every remote must get every event exactly
#                 once with every signature verified; then Synapse's own federation-sender worker
#                 and `fedsend synapse` on one deployment (hs1 on the services' PostgreSQL + Redis,
#                 5 loopback remotes joined over federation, 20 events each): every remote must
#                 get every event of both bursts exactly once
#   fuzz          fuzz/fuzz.sh ci: builds the libFuzzer targets of fuzz/ (stable rustc, no nightly)
#                 and runs each for 10 s from the committed corpus; one line per target (time,
#                 executions, exec/s, coverage); fails on any crash (fuzz/README.md)
#   no-std        tests/no-std-check built against a core + alloc sysroot: fails if std leaks into
#                 fedsend-core
#   node          node --test over www/test/**/*.test.{mjs,cjs,js} and npm/test/ (the npm package:
#                 scenarios, stores, driven API, errors, the HTTPS example, npm pack + tsc)
#   e2e           node www/test/e2e.mjs, headless Chromium through Playwright (if present)
#   interop       interop/test_interop.py: a real Synapse (PyPI, venv made by setup) on loopback as
#                 the federation peer, judging what Synapse's /sync, database and log show (issue 6);
#                 first the harness sends signed transactions itself, then `fedsend serve` does
#   worker        interop/worker/test_worker.py --sender fedsend: a Synapse main process on
#                 PostgreSQL + Redis whose federation sender instances are target/release/fedsend
#                 (two, sharded), against three other Synapses; Synapse's own worker first, then the
#                 switch to fedsend, an outage, kill -9 during a burst, PostgreSQL stopped, Redis
#                 killed and restarted, malformed replication lines (~2 min, a minute of it waiting
#                 for /health to recover after PostgreSQL)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:/usr/local/bin:$PATH"   # rustup's cargo; wasm-bindgen

all_stages=(setup services wasm native-build native-test simulate bench fuzz no-std node e2e interop worker)
extra_stages=()                         # valid names, run only when named
uses_services=(native-test bench interop worker)
stages=("$@")
((${#stages[@]})) || stages=("${all_stages[@]}")
for s in "${stages[@]}"; do
  [[ " ${all_stages[*]} ${extra_stages[*]} " == *" $s "* ]] || { echo "test.sh: unknown stage '$s' (stages: ${all_stages[*]} ${extra_stages[*]})" >&2; exit 2; }
done
# Put `services` before the first stage that uses them, unless it is already there.
if [[ " ${stages[*]} " != *" services "* ]]; then
  with=()
  for s in "${stages[@]}"; do
    if [[ " ${with[*]} " != *" services "* && " ${uses_services[*]} " == *" $s "* ]]; then with+=(services); fi
    with+=("$s")
  done
  stages=("${with[@]}")
fi

stage_setup() { scripts/setup.sh; }
svc_dir=""   # the services' temp dir, stopped by the EXIT trap
stage_services() {
  if [ -n "${FEDSEND_TEST_PG_PORT:-}" ]; then
    echo "services: using the ones in the environment (postgres port $FEDSEND_TEST_PG_PORT, redis ${FEDSEND_TEST_REDIS_URL:-?})"
    return 0
  fi
  svc_dir="$(mktemp -d "${TMPDIR:-/tmp}/fedsend-services.XXXXXX")"
  chmod 755 "$svc_dir"   # the postgres user must reach its data dir inside
  scripts/services.sh start "$svc_dir"
  set -a
  # shellcheck disable=SC1091
  . "$svc_dir/env"
  set +a
}
stage_wasm() { scripts/build-wasm.sh; }
stage_native-build() { cargo build --release --workspace; }
stage_native-test() {
  cargo test --release --workspace
  # The generator needs fedsend-core's `ts` feature. Asked for on its own, that builds a second
  # copy of the core beside the first and leaves the workspace's binaries as they were built.
  cargo test --release -p fedsend-core --features ts --test typescript
}
# A further 2 000 simulator seeds beyond the 1 000 of `cargo test`, with the fault summary.
stage_simulate() { target/release/fedsend-vopr --seeds 1000..3000; }
stage_bench() {
  target/release/fedsend-bench --scale 0.01 --runs 1 --warmup 0 --check
  # Synapse's own sender (the setup stage's venv) on a small WS burst: same deliveries, documented
  # transaction counts, bodies PDU for PDU (bench/synapse/side_by_side.py; ~3 s).
  tools/python/synapse-venv/bin/python bench/synapse/side_by_side.py --events 120 --destinations 20 \
    --runs 1 --warmup 0 --engines native --check
  # The service end to end beside Synapse's sender signing every request (BENCHMARKS.md,
  # "Service end to end"; ~3 s): counts only.
  tools/python/synapse-venv/bin/python bench/synapse/service_side_by_side.py --events 20 --remotes 5 \
    --synapse-runs 1 --check
  # Worker mode (BENCHMARKS.md, "Worker mode"; ~20 s, most of it Synapse starting): counts only.
  tools/python/synapse-venv/bin/python bench/synapse/worker_side_by_side.py --events 20 --remotes 5 \
    --rooms 2 --fedsend target/release/fedsend --check
}
# Its own workspace and target dir (fuzz/target): the instrumented build shares nothing with
# target/release.
stage_fuzz() { fuzz/fuzz.sh ci 10; }
stage_no-std() {
  # The check crate is its own workspace; starting from the main lock gives core's dependencies
  # the same versions (cargo prunes the rest). Its own target dir keeps the std build of
  # target/wasm valid.
  cp Cargo.lock tests/no-std-check/Cargo.lock
  WASM_TARGET_DIR="$root/target/wasm-nostd" scripts/wasm-cargo build \
    --manifest-path tests/no-std-check/Cargo.toml --target wasm32-unknown-unknown -Zbuild-std=core,alloc
}
stage_node() {
  local files=()
  local dirs=()
  for d in www/test npm/test; do [ -d "$d" ] && dirs+=("$d"); done
  ((${#dirs[@]})) && mapfile -t files < <(find "${dirs[@]}" -type f \
    \( -name '*.test.mjs' -o -name '*.test.cjs' -o -name '*.test.js' \) -not -path '*/node_modules/*' | sort)
  ((${#files[@]})) || { skipped+=(node); echo "skipped: no {www,npm}/test/**/*.test.{mjs,cjs,js}"; return 0; }
  node --test "${files[@]}"
}
stage_e2e() {
  [ -f www/test/e2e.mjs ] || { skipped+=(e2e); echo "skipped: no www/test/e2e.mjs"; return 0; }
  node www/test/e2e.mjs
}
stage_interop() {
  local py=tools/python/synapse-venv/bin/python
  [ -x "$py" ] || { echo "test.sh: $py is missing; run scripts/setup.sh" >&2; return 1; }
  "$py" interop/test_interop.py --mode harness
  # Synapse's default room version (12: room ids without a server part, create events without
  # a room_id).
  "$py" interop/test_interop.py --mode fedsend
}
# fedsend as Synapse's federation_sender worker instance (interop/worker/README.md).
stage_worker() {
  local py=tools/python/synapse-venv/bin/python
  [ -x "$py" ] || { echo "test.sh: $py is missing; run scripts/setup.sh" >&2; return 1; }
  # The fault checks kill and restart Redis and PostgreSQL: they get the services this run
  # started, or (services from the environment may be shared) a private pair of their own.
  local services=(--private-services)
  [ -z "$svc_dir" ] || services=(--services-env "$svc_dir/env")
  "$py" interop/worker/test_worker.py --sender fedsend --fedsend target/release/fedsend \
    --instances 2 --remotes 3 --kill9 --switch-from-python --pg-outage --redis-restart --bad-replication \
    "${services[@]}"
}

start=$SECONDS
current=""
summary=()
skipped=()
on_exit() {
  local rc=$1
  if [ -n "$current" ] && [ "$rc" -ne 0 ]; then
    echo "test.sh: FAILED in stage $current (exit $rc) after $((SECONDS - start))s"
  fi
  if [ -n "$svc_dir" ]; then scripts/services.sh stop "$svc_dir" >/dev/null 2>&1 || true; fi
}
trap 'on_exit $?' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for s in "${stages[@]}"; do
  current=$s
  t0=$SECONDS
  echo
  echo "==== [$s] (at $((t0 - start))s)"
  "stage_$s"
  if [[ " ${skipped[*]} " == *" $s "* ]]; then summary+=("$s skipped"); else summary+=("$s $((SECONDS - t0))s"); fi
  echo "==== [$s] ok in $((SECONDS - t0))s"
done
current=""
echo
echo "test.sh: PASSED in $((SECONDS - start))s: $(printf '%s, ' "${summary[@]}" | sed 's/, $//')"
