//! The core's JSON boundary (`fedsend_core::wire::JsonSender`), which every non-Rust host and
//! the scenario runner feed.
//!
//! The input is a script, one item per line: a line `@N` moves the clock N ms forward (so the
//! fuzzer can reach deadlines), every other line is fed as one input JSON. After each item the
//! outputs are drained, and every output must decode as `fedsend_core::Output` — the hosts
//! decode them, and one they cannot decode is silently lost work (issue 14, item 2) — and
//! re-encode to the same text. Any panic is a bug in the core: it must refuse bad input with
//! an error and change nothing.
#![no_main]

use fedsend_core::Output;
use fedsend_core::wire::JsonSender;
use libfuzzer_sys::fuzz_target;

/// `test` is the server name of the scenario files the seeds come from (examples/seeds.rs).
/// Small backoff and retry figures so that short clock moves reach retries and catch-up.
const CONFIG: &str = r#"{"server_name": "test", "retry_interval_min_ms": 1000,
    "retry_interval_max_ms": 60000, "catch_up_threshold_ms": 30000, "http_retries_max": 1,
    "pending_pdus_max": 20, "presence_enabled": true}"#;
const START_MS: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut sender = JsonSender::new(CONFIG, "{}").expect("the fixed config is valid");
    let mut now = START_MS;
    for line in text.split('\n') {
        if let Some(ms) = line.strip_prefix('@').and_then(|ms| ms.trim().parse::<u64>().ok()) {
            now = now.saturating_add(ms);
            continue;
        }
        // Refusals are fine; what matters is that nothing panics and the outputs stay decodable.
        let _ = sender.handle_input(now, line);
        drain(&mut sender);
    }
    // Whatever the machine wants to do next must also be reachable: fire its deadline.
    if let Some(deadline) = sender.poll_timeout() {
        let _ = sender.handle_input(deadline.max(now), r#"{"type": "timeout"}"#);
        drain(&mut sender);
    }
    let stats = sender.destination_stats();
    serde_json::from_str::<serde_json::Value>(&stats).expect("destination stats are JSON");
});

fn drain(sender: &mut JsonSender) {
    while let Some(text) = sender.poll_output() {
        let output: Output = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the core emitted an output the host cannot decode ({e}): {text}"));
        let again = serde_json::to_string(&output).expect("outputs serialize");
        assert_eq!(again, text, "an output does not survive decode + encode");
    }
}
