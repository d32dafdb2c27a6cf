//! The `fedsend scenario` command: stdout carries the trace and nothing else, problems are one
//! line on stderr, and the exit code says which kind of problem it was.

use std::path::PathBuf;
use std::process::{Command, Output};

use fedsend_sim::NativeEngine;

fn fedsend(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedsend")).args(args).output().expect("runs fedsend")
}

/// Writes a scenario file for one test.
fn scenario_file(name: &str, text: &str) -> String {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}.json"));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The trace lines (with newlines) and the error of running `text` in process.
fn in_process(text: &str) -> (String, Result<(), String>) {
    let mut trace = String::new();
    let result = fedsend_sim::run_scenario(text, &mut NativeEngine::default(), &mut |line| {
        trace.push_str(line);
        trace.push('\n');
    });
    (trace, result.map_err(|e| e.to_string()))
}

const SCENARIO: &str = r#"{
  "server_name": "test",
  "steps": [
    { "op": "create_room", "room": "!a:test", "creator": "@alice:test" },
    { "op": "join", "room": "!a:test", "user": "@bob:host2" },
    { "op": "send", "room": "!a:test", "sender": "@alice:test", "content": { "body": "hi" } },
    { "op": "advance", "ms": 1500 },
    { "op": "snapshot" }
  ]
}"#;

#[test]
fn stdout_is_exactly_the_trace() {
    let file = scenario_file("ok", SCENARIO);
    let (trace, result) = in_process(SCENARIO);
    result.unwrap();
    let out = fedsend(&["scenario", &file]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), trace);
    assert_eq!(String::from_utf8(out.stderr).unwrap(), "");
}

#[test]
fn human_output_is_a_table_of_the_same_trace() {
    let file = scenario_file("human", SCENARIO);
    let (trace, _) = in_process(SCENARIO);
    let out = fedsend(&["scenario", "--human", &file]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].trim_start().starts_with("TIME  KIND  "), "{table}");
    assert!(rows.len() > trace.lines().count(), "a header and a row per trace line (snapshots add more):\n{table}");
    assert!(rows.iter().any(|r| r.starts_with("+1.500s  end")), "{table}");
    assert!(rows.iter().any(|r| r.contains("send") && r.contains("host2") && r.contains("1 PDU 0 EDU")), "{table}");
}

#[test]
fn a_malformed_scenario_exits_1_with_one_line_naming_the_file() {
    let text = r#"{ "server_name": "test", "steps": [ { "op": "advance", "ms": 10 }, { "op": "no_such_op" } ] }"#;
    let file = scenario_file("bad", text);
    let (trace, result) = in_process(text);
    let error = result.expect_err("an unknown op is an error");
    let out = fedsend(&["scenario", &file]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stderr).unwrap(), format!("fedsend: {file}: {error}\n"));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), trace, "what was traced before the error is printed");
}

#[test]
fn an_unreadable_file_exits_2() {
    let out = fedsend(&["scenario", "no/such/scenario.json"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("fedsend: no/such/scenario.json: cannot read: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_missing_wasm_module_exits_2() {
    let file = scenario_file("wasm-missing", SCENARIO);
    let out = fedsend(&["scenario", "--engine", "wasm", "--wasm", "no/such/guest.wasm", &file]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("fedsend: cannot read wasm guest no/such/guest.wasm: "), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(fedsend(&["scenario"]).status.code(), Some(2));
    assert_eq!(fedsend(&["scenario", "--engine", "jvm", "x.json"]).status.code(), Some(2));
}
