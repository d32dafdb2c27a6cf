//! `WasmEngine` against the natively linked core: same answers, same traces, restarts included.
//! Needs the guest module (`scripts/build-wasm.sh`, or `$FEDSEND_WASM`).

use fedsend_host_native::wasm_engine::WasmEngine;
use fedsend_sim::{Engine, NativeEngine};

mod common;

/// A small world with a failure, a restart (a second `start`, so a fresh wasm instance) and an
/// input bigger than the host's first argument buffer.
fn scenario() -> String {
    let big = "x".repeat(20_000);
    format!(
        r#"{{
  "server_name": "test",
  "config": {{ "http_retries_max": 0 }},
  "steps": [
    {{ "op": "create_room", "room": "!a:test", "creator": "@alice:test" }},
    {{ "op": "join", "room": "!a:test", "user": "@bob:host2" }},
    {{ "op": "join", "room": "!a:test", "user": "@carol:host3" }},
    {{ "op": "remote", "host": "host2", "respond": "unreachable" }},
    {{ "op": "send", "room": "!a:test", "sender": "@alice:test", "content": {{ "body": "{big}" }} }},
    {{ "op": "settle" }},
    {{ "op": "restart" }},
    {{ "op": "remote", "host": "host2", "respond": "ok" }},
    {{ "op": "inbound", "host": "host2" }},
    {{ "op": "advance", "ms": 60000 }},
    {{ "op": "snapshot" }}
  ]
}}"#
    )
}

fn trace(engine: &mut dyn Engine, scenario: &str) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    fedsend_sim::run_scenario(scenario, engine, &mut |line| lines.push(line.to_owned())).map_err(|e| e.to_string())?;
    Ok(lines)
}

#[test]
fn wasm_engine_answers_like_the_native_engine() {
    let mut wasm = WasmEngine::from_file(&common::existing_guest_path()).unwrap();
    let mut native = NativeEngine::default();

    // Before any start: nothing to poll, and inputs are refused rather than panicking.
    assert_eq!(wasm.poll_output(), None);
    assert_eq!(wasm.poll_timeout(), None);
    assert_eq!(wasm.destination_stats(), None);
    assert_eq!(wasm.handle_input(0, "{}"), native.handle_input(0, "{}"));

    // The core's own errors come through unchanged.
    let bad_config = wasm.start("{}", "{}");
    assert!(bad_config.is_err());
    assert_eq!(bad_config, native.start("{}", "{}"));

    let scenario = scenario();
    let native_trace = trace(&mut native, &scenario).unwrap();
    assert!(native_trace.iter().any(|l| l.contains(r#""kind":"send""#)), "the scenario sends something");
    assert_eq!(trace(&mut wasm, &scenario).unwrap(), native_trace);
    assert_eq!(wasm.destination_stats(), native.destination_stats());

    // Malformed inputs are errors with the core's message, and the guest keeps working after one.
    let input = r#"{"type":"no_such_input"}"#;
    let error = wasm.handle_input(2_000_000, input);
    assert!(error.is_err());
    assert_eq!(error, native.handle_input(2_000_000, input));
    assert_eq!(wasm.poll_timeout(), native.poll_timeout());

    // The same engine runs a second scenario from scratch.
    assert_eq!(trace(&mut wasm, &scenario).unwrap(), native_trace);
}

/// Minimal hand-assembled modules (no `wat` feature needed).
const EMPTY_MODULE: &[u8] = b"\0asm\x01\0\0\0";
const MODULE_IMPORTING_ENV_F: &[u8] = &[
    0, b'a', b's', b'm', 1, 0, 0, 0, // header
    1, 4, 1, 0x60, 0, 0, // type section: one type, () -> ()
    2, 9, 1, 3, b'e', b'n', b'v', 1, b'f', 0, 0, // import section: env::f, a function of type 0
];

#[test]
fn modules_that_do_not_speak_the_abi_are_refused() {
    let error = |bytes: &[u8]| WasmEngine::from_bytes(bytes).unwrap_err().to_string();
    assert!(error(b"not wasm").starts_with("not a valid wasm module: "), "{}", error(b"not wasm"));
    assert_eq!(error(MODULE_IMPORTING_ENV_F), "the guest ABI allows no imports, but the module imports env::f");
    assert!(error(EMPTY_MODULE).contains("memory"), "{}", error(EMPTY_MODULE));

    let missing = std::path::Path::new("no/such/guest.wasm");
    let message = WasmEngine::from_file(missing).unwrap_err().to_string();
    assert!(message.starts_with("cannot read wasm guest no/such/guest.wasm: "), "{message}");
}

/// A hand-written guest whose `fs_handle_input` and `fs_poll_output` run the given bodies and
/// whose last panic message is "boom".
fn fake_guest_module(version: u32, handle_input: &str, poll_output: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  (memory (export "memory") 1)
  (data (i32.const 16) "boom")
  (func (export "fs_abi_version") (result i32) i32.const {version})
  (func (export "fs_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "fs_free") (param i32 i32))
  (func (export "fs_start") (param i32 i32 i32 i32) (result i64) i64.const 0)
  (func (export "fs_handle_input") (param i64 i32 i32) (result i64) {handle_input})
  (func (export "fs_poll_output") (result i64) {poll_output})
  (func (export "fs_poll_timeout") (result i64) i64.const -1)
  (func (export "fs_destination_stats") (result i64) i64.const 0)
  (func (export "fs_last_panic") (result i64) i64.const 0x0000001000000004))"#
    );
    wat::parse_str(text).unwrap()
}

/// [`fake_guest_module`] speaking ABI v1, started.
fn fake_guest(handle_input: &str, poll_output: &str) -> WasmEngine {
    let mut engine = WasmEngine::from_bytes(&fake_guest_module(1, handle_input, poll_output)).unwrap();
    engine.start("{}", "{}").unwrap();
    engine
}

#[test]
fn a_trap_in_handle_input_is_a_one_line_error_and_discards_the_instance() {
    let mut engine = fake_guest("unreachable", "i64.const 0");
    let error = engine.handle_input(1, "{}").unwrap_err();
    assert_eq!(
        error,
        "wasm guest failed in fs_handle_input: wasm trap: wasm `unreachable` instruction executed (boom)"
    );
    assert_eq!(engine.handle_input(1, "{}").unwrap_err(), "engine used before start");
    assert_eq!(engine.poll_output(), None);
    // A restart brings a fresh instance.
    engine.start("{}", "{}").unwrap();
    assert_eq!(engine.poll_output(), None);
}

#[test]
fn a_trap_or_a_bad_buffer_while_polling_panics_like_the_native_core() {
    let panic_of = |poll_output: &str| {
        let mut engine = fake_guest("i64.const 0", poll_output);
        let payload = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.poll_output())).unwrap_err();
        payload.downcast_ref::<String>().cloned().unwrap()
    };
    assert_eq!(
        panic_of("unreachable"),
        "wasm guest failed in fs_poll_output: wasm trap: wasm `unreachable` instruction executed (boom)"
    );
    // A buffer at 64 KiB - 2 of length 4 runs past the one-page memory.
    assert_eq!(panic_of("i64.const 0x0000fffe00000004"), "wasm guest returned a buffer outside its memory (65534, 4)");
}

#[test]
fn another_abi_version_is_refused() {
    let text = r#"(module (memory (export "memory") 1) (func (export "fs_abi_version") (result i32) i32.const 2))"#;
    let error = WasmEngine::from_bytes(&wat::parse_str(text).unwrap()).unwrap_err().to_string();
    // The exports are checked first, then the version.
    assert!(error.contains("fs_alloc"), "{error}");
    let version_2 = fake_guest_module(2, "i64.const 0", "i64.const 0");
    assert_eq!(WasmEngine::from_bytes(&version_2).unwrap_err().to_string(), "guest ABI version 2, this host speaks 1");
}
