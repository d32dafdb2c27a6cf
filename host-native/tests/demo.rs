//! `fedsend demo` end to end, on both engines: the real binary, real HTTPS to loopback
//! remotes, SQLite; it must converge and say so.

use std::process::Command;

mod common;

fn demo(engine: &str) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fedsend"));
    command.args(["demo", "--engine", engine, "--events-per-room", "12"]);
    if engine == "wasm" {
        command.env("FEDSEND_WASM", common::existing_guest_path());
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo --engine {engine} failed\n{stdout}\n{stderr}");
    let report = stdout.split("delivery report").nth(1).unwrap_or_else(|| panic!("no report in\n{stdout}"));
    let rows: Vec<&str> = report
        .lines()
        .filter(|l| l.trim_start().strip_prefix('r').is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit())))
        .collect();
    assert_eq!(rows.len(), 6, "{report}");
    assert!(rows.iter().all(|r| r.ends_with("converged") && !r.contains("NOT")), "{report}");
    assert!(stdout.contains("down at first") && stdout.contains("429 every") && stdout.contains("flaky"), "{stdout}");
    assert!(report.contains("synapse_federation_client_sent_transactions_total"), "{report}");
}

#[test]
fn demo_converges_on_the_native_engine() {
    demo("native");
}

#[test]
fn demo_converges_on_the_wasm_engine() {
    demo("wasm");
}
