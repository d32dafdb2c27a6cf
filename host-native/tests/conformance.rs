//! Scenario conformance across engines (`docs/scenarios.md`).
//!
//! For every `tests/scenarios/*.json` of the workspace, the trace must be byte-identical on
//! - the core linked natively, run in this process (`fedsend_sim::run_scenario`);
//! - the `fedsend scenario` command (native engine);
//! - `fedsend scenario --engine wasm` (the core in wasmtime);
//! - `node www/bin/fedsend-scenario.mjs` (the core in Node through wasm-bindgen);
//!
//! and equal, ignoring `x-` kinds, to the checked-in `tests/scenarios/NAME.trace.jsonl`.
//! `FEDSEND_BLESS=1` writes those files from the native trace instead of comparing.
//!
//! Every `tests/scenarios/bad/*.json` must fail on every engine with a one-line message, the
//! same on every engine once the runner's `prog: FILE: ` prefix is removed.
//!
//! The wasm module and the Node package are build products: run `scripts/build-wasm.sh` first
//! (CI does). `FEDSEND_WASM` overrides where the wasm module is looked for.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use fedsend_sim::NativeEngine;

mod common;
use common::{guest_path, staleness_hint, workspace_root};

const NODE_RUNNER: &str = "www/bin/fedsend-scenario.mjs";
const BLESS_ENV: &str = "FEDSEND_BLESS";

#[test]
fn traces_are_identical_across_engines() {
    let root = workspace_root();
    let files = scenario_files(&root, "tests/scenarios");
    if files.is_empty() {
        println!("note: no scenarios in tests/scenarios; nothing to compare");
        return;
    }
    let runners = Runners::find(&root);
    let bless = std::env::var(BLESS_ENV).is_ok_and(|v| v == "1");
    let failures = for_each_parallel(&files, |file| runners.check_trace(file, bless));
    runners.report(files.len(), "scenarios", failures);
}

#[test]
fn bad_scenarios_fail_alike_on_every_engine() {
    let root = workspace_root();
    let files = scenario_files(&root, "tests/scenarios/bad");
    if files.is_empty() {
        println!("note: no malformed scenarios in tests/scenarios/bad; nothing to compare");
        return;
    }
    let runners = Runners::find(&root);
    let failures = for_each_parallel(&files, |file| runners.check_rejection(file));
    runners.report(files.len(), "malformed scenarios", failures);
}

/// What the engines are, once found. Paths of scenario files are relative to `root`, which is
/// every runner's working directory, so that their messages name the file the same way.
struct Runners {
    root: PathBuf,
    fedsend: PathBuf,
    wasm: PathBuf,
}

impl Runners {
    /// Fails the test, saying how to build them, when the wasm module or the Node runner is missing.
    fn find(root: &Path) -> Self {
        let wasm = guest_path();
        let mut missing = Vec::new();
        if !wasm.is_file() {
            missing.push(format!("the wasm guest {}", wasm.display()));
        }
        if !root.join(NODE_RUNNER).is_file() {
            missing.push(format!("the Node runner {NODE_RUNNER}"));
        }
        if Command::new("node").arg("--version").output().is_err() {
            missing.push("`node` on PATH".to_owned());
        }
        assert!(
            missing.is_empty(),
            "cannot compare engines: missing {}. Run scripts/build-wasm.sh first (CI does).",
            missing.join(" and ")
        );
        let runners = Self { root: root.to_owned(), fedsend: PathBuf::from(env!("CARGO_BIN_EXE_fedsend")), wasm };
        println!(
            "engines: native (in-process), native ({} scenario), wasm ({} scenario --engine wasm --wasm {}), node (node {NODE_RUNNER})",
            runners.fedsend.display(),
            runners.fedsend.display(),
            runners.wasm.display(),
        );
        runners
    }

    fn report(&self, count: usize, what: &str, failures: Vec<String>) {
        println!("{count} {what} checked, {} failed", failures.len());
        if failures.is_empty() {
            return;
        }
        let hints: Vec<String> = [self.wasm.clone(), self.root.join("host-wasm/pkg/node/fedsend_wasm_bg.wasm")]
            .iter()
            .filter_map(|product| staleness_hint(product))
            .collect();
        panic!("{} of {count} {what} failed:\n{}\n{}", failures.len(), failures.join("\n"), hints.join("\n"));
    }

    /// Runs `file` everywhere: the in-process result first, then each runner's name and output.
    fn run_all(&self, file: &str) -> (Result<String, String>, Vec<(&'static str, Output)>) {
        let scenario = std::fs::read_to_string(self.root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut trace = String::new();
        let in_process = fedsend_sim::run_scenario(&scenario, &mut NativeEngine::default(), &mut |line| {
            trace.push_str(line);
            trace.push('\n');
        })
        .map(|()| trace)
        .map_err(|e| e.to_string());

        let wasm = self.wasm.to_str().expect("wasm path is UTF-8");
        let commands: [(&str, &Path, Vec<&str>); 3] = [
            ("native (fedsend)", &self.fedsend, vec!["scenario", file]),
            ("wasm (fedsend --engine wasm)", &self.fedsend, vec!["scenario", "--engine", "wasm", "--wasm", wasm, file]),
            ("node", Path::new("node"), vec![NODE_RUNNER, file]),
        ];
        let outputs = commands
            .into_iter()
            .map(|(name, program, args)| {
                let output = Command::new(program)
                    .args(&args)
                    .current_dir(&self.root)
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
                (name, output)
            })
            .collect();
        (in_process, outputs)
    }

    fn check_trace(&self, file: &str, bless: bool) -> Result<(), String> {
        let (in_process, outputs) = self.run_all(file);
        let native = in_process.map_err(|e| format!("{file}: native (in-process) failed: {e}"))?;
        let mut problems = Vec::new();
        for (name, output) in &outputs {
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() {
                problems.push(format!(
                    "{name} exited with {}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim_end()
                ));
            } else if stdout != native {
                problems
                    .push(format!("{name} differs from native (in-process): {}", first_difference(&native, &stdout)));
            }
        }

        let expected_file = format!("{}.trace.jsonl", file.strip_suffix(".json").expect("listed as *.json"));
        let expected_path = self.root.join(&expected_file);
        if bless {
            std::fs::write(&expected_path, &native).unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        } else {
            match std::fs::read_to_string(&expected_path) {
                Ok(expected) => {
                    let (expected, actual) = (without_extensions(&expected), without_extensions(&native));
                    if expected != actual {
                        problems.push(format!(
                            "trace differs from {expected_file} (x- kinds ignored): {}; if the change is intended, rerun with {BLESS_ENV}=1",
                            first_difference(&expected, &actual)
                        ));
                    }
                }
                Err(e) => problems
                    .push(format!("no expected trace {expected_file} ({e}); write it with {BLESS_ENV}=1 and check it")),
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(format!("{file}:\n  {}", problems.join("\n  "))) }
    }

    fn check_rejection(&self, file: &str) -> Result<(), String> {
        let (in_process, outputs) = self.run_all(file);
        let Err(native_message) = in_process else {
            return Err(format!("{file}: native (in-process) accepted a malformed scenario"));
        };
        let mut problems = Vec::new();
        if native_message.contains('\n') || native_message.is_empty() {
            problems.push(format!("native (in-process) message is not one line: {native_message:?}"));
        }
        for (name, output) in &outputs {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
            if output.status.success() {
                problems.push(format!("{name} exited 0"));
            } else if line.is_empty() || line.contains('\n') {
                problems.push(format!("{name} did not print exactly one line on stderr: {stderr:?}"));
            } else {
                match line.split_once(&format!("{file}: ")) {
                    Some((_, message)) if message == native_message => {}
                    Some((_, message)) => {
                        problems.push(format!("{name} says {message:?}, native says {native_message:?}"))
                    }
                    None => {
                        problems.push(format!("{name}'s message does not start with `PROGRAM: {file}: `: {line:?}"))
                    }
                }
            }
        }
        // A trace printed before the error is part of the behaviour too.
        let stdouts: Vec<_> = outputs.iter().map(|(name, o)| (name, String::from_utf8_lossy(&o.stdout))).collect();
        for (name, stdout) in &stdouts[1..] {
            if *stdout != stdouts[0].1 {
                problems.push(format!(
                    "{name}'s stdout differs from {}'s: {}",
                    stdouts[0].0,
                    first_difference(&stdouts[0].1, stdout)
                ));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(format!("{file}:\n  {}", problems.join("\n  "))) }
    }
}

/// `*.json` directly in `dir` (relative to `root`), as relative paths, sorted.
fn scenario_files(root: &Path, dir: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
        return Vec::new();
    };
    let mut files: Vec<String> = entries
        .map(|entry| entry.expect("readable directory").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .map(|name| format!("{dir}/{name}"))
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file, a few at a time (each spawns three processes); collects failures.
fn for_each_parallel(files: &[String], check: impl Fn(&str) -> Result<(), String> + Sync) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(files.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut failures = Vec::new();
                    while let Some(file) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if let Err(failure) = check(file) {
                            failures.push(failure);
                        }
                    }
                    failures
                })
            })
            .collect();
        let mut failures: Vec<String> = handles.into_iter().flat_map(|h| h.join().expect("worker panicked")).collect();
        failures.sort();
        failures
    })
}

/// The trace without lines whose kind starts with `x-` (engine extensions, `docs/scenarios.md`).
fn without_extensions(trace: &str) -> String {
    trace
        .lines()
        .filter(|line| {
            let kind = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("kind")?.as_str().map(str::to_owned));
            !kind.is_some_and(|k| k.starts_with("x-"))
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// Where two traces first differ, as a short message.
fn first_difference(expected: &str, actual: &str) -> String {
    let (mut a, mut b) = (expected.lines(), actual.lines());
    for number in 1.. {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => return format!("line {number}: expected {x}, got {y}"),
            (Some(x), None) => return format!("line {number}: expected {x}, got end of trace"),
            (None, Some(y)) => return format!("line {number}: expected end of trace, got {y}"),
            (None, None) => break,
        }
    }
    "same lines, different line endings".to_owned()
}
