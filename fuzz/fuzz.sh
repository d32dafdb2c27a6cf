#!/usr/bin/env bash
# fuzz/fuzz.sh — builds and runs the libFuzzer targets of fuzz/ on rustup's stable toolchain.
#
#   fuzz/fuzz.sh build [--host]             build the targets (--host: also `transport` and
#                                           `ingest`, which need fedsend-host-native)
#   fuzz/fuzz.sh run TARGET SECONDS [ARGS]  fuzz TARGET for SECONDS, starting from the committed
#                                           corpus; ARGS go to libFuzzer (e.g. -jobs=2)
#   fuzz/fuzz.sh ci [SECONDS]               build, then run every built target SECONDS (default
#                                           8) each; one summary line per target; fails on any crash
#   fuzz/fuzz.sh targets [--host]           list the targets
#
# No cargo-fuzz and no nightly: the instrumentation cargo-fuzz asks rustc for (sanitizer
# coverage through `-Cpasses=sancov-module` and LLVM options) is available on stable rustc,
# and the libfuzzer-sys crate compiles libFuzzer itself with the system C++ compiler. No
# AddressSanitizer (that needs -Zsanitizer): the fuzzed crates are safe Rust, and a sanitizer
# would halve the executions. `--target` is passed so that the flags reach only the fuzzed code,
# not build scripts and proc macros, which must link without libFuzzer.
#
# New corpus entries found by `run` go to fuzz/target/corpus/TARGET (not committed); crashes
# to fuzz/artifacts/TARGET/. To keep a useful new entry, copy it to fuzz/corpus/TARGET.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$here/target}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="$CARGO_TARGET_DIR/$triple/release"

light_targets=(json_sender scenario replication server_name)
host_targets=(transport ingest)

rustflags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  --cfg fuzzing
)

targets() {
  local all=("${light_targets[@]}")
  [ "${1:-}" = --host ] && all+=("${host_targets[@]}")
  printf '%s\n' "${all[@]}"
}

build() {
  local features=()
  [ "${1:-}" = --host ] && features=(--features host)
  # Not --locked: fuzz/Cargo.lock pins what it has, but a dependency newly added to a fuzzed
  # crate must not break this build before someone refreshes the lock.
  RUSTFLAGS="${rustflags[*]}" cargo +stable build --release --target "$triple" \
    --manifest-path "$here/Cargo.toml" "${features[@]}" --bins
}

# run TARGET SECONDS [libFuzzer args]: the log goes to fuzz/target/logs/TARGET.log.
run() {
  local target=$1 seconds=$2
  shift 2
  local work="$CARGO_TARGET_DIR/corpus/$target" artifacts="$here/artifacts/$target"
  mkdir -p "$work" "$artifacts" "$CARGO_TARGET_DIR/logs"
  # -timeout: one input taking this long is reported as a hang; -rss_limit_mb: as a leak.
  local rc=0
  "$bin_dir/$target" "$work" "$here/corpus/$target" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$@" >"$CARGO_TARGET_DIR/logs/$target.log" 2>&1 || rc=$?
  grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|==[0-9]+== ERROR|SUMMARY|thread .* panicked)' "$CARGO_TARGET_DIR/logs/$target.log" >&2 || true
  return "$rc"
}

# One line per target from its log: time, executions, exec/s, coverage, corpus.
summary() {
  local target=$1 seconds=$2 log="$CARGO_TARGET_DIR/logs/$1.log"
  local done_line
  done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)"
  local execs rate cov ft
  execs="$(grep -Eo '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || true)"
  rate="$(grep -Eo '^stat::average_exec_per_sec: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || true)"
  cov="$(grep -Eo 'cov: [0-9]+' <<<"$done_line" | grep -Eo '[0-9]+' || true)"
  ft="$(grep -Eo 'ft: [0-9]+' <<<"$done_line" | grep -Eo '[0-9]+' || true)"
  printf 'fuzz: %-12s %4ss  %9s execs  %6s exec/s  cov %5s  ft %6s  crashes 0\n' \
    "$target" "$seconds" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}"
}

ci() {
  local seconds=${1:-8} host=""
  [ "${FUZZ_HOST:-0}" = 1 ] && host=--host
  build $host
  local lines=() target
  while read -r target; do
    local t0=$SECONDS
    if ! run "$target" "$seconds" </dev/null 2>/dev/null; then
      echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/ (reproduce: fuzz/fuzz.sh repro $target FILE)" >&2
      tail -40 "$CARGO_TARGET_DIR/logs/$target.log" >&2
      return 1
    fi
    lines+=("$(summary "$target" "$((SECONDS - t0))")")
  done < <(targets $host)
  printf '%s\n' "${lines[@]}"
}

# repro TARGET FILE...: runs the inputs once each (a crash reproduces with its backtrace).
repro() {
  local target=$1
  shift
  RUST_BACKTRACE=1 "$bin_dir/$target" "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
  build) build "$@" ;;
  run) run "$@" ;;
  ci) ci "$@" ;;
  repro) repro "$@" ;;
  targets) targets "$@" ;;
  *) sed -n '2,20p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
