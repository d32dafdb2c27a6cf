//! Writes the seed corpus of the `json_sender` target from the scenario files: each scenario
//! is run through a recording engine, and the inputs the simulated world fed the core, with
//! `@N` clock moves between them, become one script (the target's input format). Scripts are
//! cut at a line boundary to stay small; one more file per input type holds its first example.
//!
//!   cargo run --release --manifest-path fuzz/Cargo.toml --example seeds -- tests/scenarios fuzz/corpus/json_sender
//!
//! Built without the fuzzing flags (it is an example, not a target).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use fedsend_sim::{Engine, NativeEngine, run_scenario};

/// libFuzzer's default `-max_len` when the corpus has nothing longer; longer seeds would also
/// make the fuzzer's mutations slower.
const SCRIPT_BYTES_MAX: usize = 4096;

#[derive(Default)]
struct Recording {
    inner: NativeEngine,
    script: String,
    now: Option<u64>,
    first_of_type: BTreeMap<String, String>,
}

impl Engine for Recording {
    fn start(&mut self, config_json: &str, recovered_json: &str) -> Result<(), String> {
        self.inner.start(config_json, recovered_json)
    }
    fn handle_input(&mut self, now_ms: u64, input_json: &str) -> Result<(), String> {
        if let Some(before) = self.now.filter(|before| now_ms > *before) {
            self.script.push_str(&format!("@{}\n", now_ms - before));
        }
        self.now = Some(now_ms);
        self.script.push_str(input_json);
        self.script.push('\n');
        let kind = serde_json::from_str::<serde_json::Value>(input_json)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_owned))
            .unwrap_or_default();
        self.first_of_type.entry(kind).or_insert_with(|| input_json.to_owned());
        self.inner.handle_input(now_ms, input_json)
    }
    fn poll_output(&mut self) -> Option<String> {
        self.inner.poll_output()
    }
    fn poll_timeout(&mut self) -> Option<u64> {
        self.inner.poll_timeout()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, scenarios, out] = args.as_slice() else {
        eprintln!("usage: seeds SCENARIO_DIR OUT_DIR");
        std::process::exit(2);
    };
    fs::create_dir_all(out).expect("create the output dir");
    let mut first_of_type = BTreeMap::new();
    let mut paths: Vec<_> = fs::read_dir(scenarios)
        .expect("read the scenario dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let text = fs::read_to_string(&path).expect("read a scenario");
        let mut engine = Recording::default();
        // Scenarios that end in an error still fed useful inputs before it.
        let _ = run_scenario(&text, &mut engine, &mut |_| {});
        let mut script = engine.script.as_str();
        if script.len() > SCRIPT_BYTES_MAX {
            let cut = script[..SCRIPT_BYTES_MAX].rfind('\n').map_or(0, |i| i + 1);
            script = &script[..cut];
        }
        let name = path.file_stem().and_then(|s| s.to_str()).expect("a UTF-8 file name");
        fs::write(Path::new(out).join(format!("script-{name}")), script).expect("write a seed");
        for (kind, input) in engine.first_of_type {
            first_of_type.entry(kind).or_insert(input);
        }
    }
    for (kind, input) in first_of_type {
        fs::write(Path::new(out).join(format!("input-{kind}")), input).expect("write a seed");
    }
}
