//! The simulator's scenario parser (`fedsend_sim::Scenario::parse`), then the run of whatever
//! it accepts. Scenario files are hand-written and also come from the browser visualiser, so
//! any text must give a scenario or a one-line error, never a panic; and a scenario that
//! parses must run to its end or stop with a `ScenarioError`, writing only JSON trace lines.
#![no_main]

use fedsend_sim::{NativeEngine, Scenario, ScenarioRun};
use libfuzzer_sys::fuzz_target;

/// Longer scenarios are only parsed: each step may run many deliveries, and the fuzzer
/// should spend its time on many different scenarios rather than a few long ones.
const RUN_STEPS_MAX: usize = 40;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let scenario = match Scenario::parse(text) {
        Ok(scenario) => scenario,
        Err(error) => {
            // The runner prints it as one line whatever serde put in it.
            assert!(!error.to_string().contains('\n'), "a multi-line scenario error: {error}");
            return;
        }
    };
    if scenario.steps.len() > RUN_STEPS_MAX {
        return;
    }
    let mut engine = NativeEngine::default();
    let mut emit = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("a trace line that is not JSON ({e}): {line}"));
    };
    let Ok(mut run) = ScenarioRun::start(text, &mut engine, &mut emit) else { return };
    while let Ok(true) = run.step(&mut engine, &mut emit) {}
});
