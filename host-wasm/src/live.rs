//! `LiveSimulation` and `ScenarioStepper`: the simulated world and the core, both inside the
//! wasm module, driven one step at a time from JavaScript (the browser visualiser).
//!
//! The engine is `fedsend_sim::NativeEngine` (the core linked into the same module), which the
//! world drives with typed inputs and outputs, so nothing between the world and the core is
//! encoded, let alone crosses the JavaScript boundary; JavaScript only sends steps in and takes
//! trace lines and per-destination figures out (the visualiser does so from a Web Worker).
//!
//! ```js
//! const sim = new LiveSimulation(headerJson);      // {"server_name":…,"seed":…,"config":{…},"steps":[…]}
//! sim.apply('{"op":"advance","ms":100}');           // one scenario step (spec: scenarios.md)
//! sim.applyLines(stepsJsonl);                      // several steps, one JSON object per line
//! const lines = sim.takeTrace();                   // trace lines since the last call, '\n'-joined
//! const stats = JSON.parse(sim.destinationStats()); // DestinationStats[] (D12), by name
//! ```

use fedsend_sim::{Engine, LiveRun, NativeEngine, ScenarioRun};
use wasm_bindgen::prelude::*;

use crate::ms::ms_to_js;

/// Joins `lines` with `\n` and empties the vector (keeping its capacity).
fn take_joined(lines: &mut Vec<String>) -> String {
    let text = lines.join("\n");
    lines.clear();
    text
}

/// A live world: started from a scenario header, then driven by steps given as JSON.
#[wasm_bindgen]
pub struct LiveSimulation {
    run: LiveRun,
    engine: NativeEngine,
    trace: Vec<String>,
}

impl LiveSimulation {
    /// Starts the world (the Rust side of the constructor; errors as text).
    pub fn start(header_json: &str) -> Result<Self, String> {
        let mut engine = NativeEngine::default();
        let mut trace = Vec::new();
        let run = LiveRun::start(header_json, &mut engine, &mut |line: &str| trace.push(String::from(line)))
            .map_err(|e| e.to_string())?;
        Ok(Self { run, engine, trace })
    }

    /// Applies one step (the Rust side of `apply`).
    pub fn apply_step(&mut self, step_json: &str) -> Result<(), String> {
        let trace = &mut self.trace;
        self.run
            .apply(step_json, &mut self.engine, &mut |line: &str| trace.push(String::from(line)))
            .map_err(|e| e.to_string())
    }

    /// Applies every non-blank line as a step, stopping at the first error.
    pub fn apply_step_lines(&mut self, steps_jsonl: &str) -> Result<(), String> {
        for step in steps_jsonl.lines().filter(|l| !l.trim().is_empty()) {
            self.apply_step(step)?;
        }
        Ok(())
    }

    /// The trace lines written since the last call, without newlines.
    pub fn drain_trace(&mut self) -> Vec<String> {
        core::mem::take(&mut self.trace)
    }
}

#[wasm_bindgen]
impl LiveSimulation {
    /// Starts the world from a scenario header (its `steps`, often empty, run at once). Throws
    /// an `Error` naming the problem when the header or one of its steps is malformed.
    #[wasm_bindgen(constructor)]
    pub fn new(#[wasm_bindgen(js_name = headerJson)] header_json: &str) -> Result<Self, JsError> {
        Self::start(header_json).map_err(|e| JsError::new(&e))
    }

    /// Applies one scenario step (`{"op": …}`). Throws an `Error` naming the step (counted
    /// from 0 across the header's steps and every applied one) and the problem.
    pub fn apply(&mut self, #[wasm_bindgen(js_name = stepJson)] step_json: &str) -> Result<(), JsError> {
        self.apply_step(step_json).map_err(|e| JsError::new(&e))
    }

    /// Applies several steps, one JSON object per line; stops at the first error and throws it
    /// (the steps before it stay applied).
    #[wasm_bindgen(js_name = applyLines)]
    pub fn apply_lines(&mut self, #[wasm_bindgen(js_name = stepsJsonl)] steps_jsonl: &str) -> Result<(), JsError> {
        self.apply_step_lines(steps_jsonl).map_err(|e| JsError::new(&e))
    }

    /// The trace lines written since the last call, joined with `\n` (empty string if none).
    #[wasm_bindgen(js_name = takeTrace)]
    pub fn take_trace(&mut self) -> String {
        take_joined(&mut self.trace)
    }

    /// Per-destination figures of the running core (JSON array of `DestinationStats`).
    #[wasm_bindgen(js_name = destinationStats)]
    pub fn destination_stats(&mut self) -> String {
        self.engine.destination_stats().unwrap_or_else(|| String::from("[]"))
    }

    /// Virtual time now, Unix ms.
    #[wasm_bindgen(js_name = nowMs)]
    pub fn now_ms(&self) -> f64 {
        ms_to_js(self.run.now_ms())
    }

    /// Steps applied so far (the header's included).
    #[wasm_bindgen(js_name = stepsApplied)]
    pub fn steps_applied(&self) -> usize {
        self.run.steps_applied()
    }
}

/// A whole scenario file run one step at a time, with the core in the same module: its trace
/// is byte-identical to `fedsend scenario FILE` (the native engine).
#[wasm_bindgen]
pub struct ScenarioStepper {
    run: ScenarioRun,
    engine: NativeEngine,
    trace: Vec<String>,
}

impl ScenarioStepper {
    /// Parses the scenario and starts the engine (the Rust side of the constructor).
    pub fn start(scenario_json: &str) -> Result<Self, String> {
        let mut engine = NativeEngine::default();
        let mut trace = Vec::new();
        let run = ScenarioRun::start(scenario_json, &mut engine, &mut |line: &str| trace.push(String::from(line)))
            .map_err(|e| e.to_string())?;
        Ok(Self { run, engine, trace })
    }

    /// Runs the next step (the Rust side of `step`).
    pub fn run_next(&mut self) -> Result<bool, String> {
        let trace = &mut self.trace;
        self.run.step(&mut self.engine, &mut |line: &str| trace.push(String::from(line))).map_err(|e| e.to_string())
    }

    /// The trace lines written since the last call.
    pub fn drain_trace(&mut self) -> Vec<String> {
        core::mem::take(&mut self.trace)
    }
}

#[wasm_bindgen]
impl ScenarioStepper {
    /// Parses a scenario file (JSON text) and starts the engine. Throws an `Error` with the
    /// same one-line message as `fedsend scenario` for a malformed file.
    #[wasm_bindgen(constructor)]
    pub fn new(#[wasm_bindgen(js_name = scenarioJson)] scenario_json: &str) -> Result<Self, JsError> {
        Self::start(scenario_json).map_err(|e| JsError::new(&e))
    }

    /// Runs the next step; after the last one writes the `end` line and returns `false`.
    /// Throws an `Error` naming the step when it is malformed or the engine fails.
    pub fn step(&mut self) -> Result<bool, JsError> {
        self.run_next().map_err(|e| JsError::new(&e))
    }

    /// Index of the next step to run.
    #[wasm_bindgen(js_name = nextStep)]
    pub fn next_step(&self) -> usize {
        self.run.next_step()
    }

    /// Number of steps in the scenario.
    #[wasm_bindgen(js_name = stepCount)]
    pub fn step_count(&self) -> usize {
        self.run.step_count()
    }

    /// The trace lines written since the last call, joined with `\n` (empty string if none).
    #[wasm_bindgen(js_name = takeTrace)]
    pub fn take_trace(&mut self) -> String {
        take_joined(&mut self.trace)
    }

    /// Per-destination figures of the running core (JSON array of `DestinationStats`).
    #[wasm_bindgen(js_name = destinationStats)]
    pub fn destination_stats(&mut self) -> String {
        self.engine.destination_stats().unwrap_or_else(|| String::from("[]"))
    }

    /// Virtual time now, Unix ms.
    #[wasm_bindgen(js_name = nowMs)]
    pub fn now_ms(&self) -> f64 {
        ms_to_js(self.run.now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"{"server_name":"home.test","seed":1,"config":{"http_retries_max":1,"http_retry_delay_max_ms":1000},"steps":[
        {"op":"create_room","room":"!r:home.test","creator":"@a:home.test"},
        {"op":"join","room":"!r:home.test","user":"@b:far.test"}]}"#;

    #[test]
    fn a_live_world_sends_backs_off_and_reports_stats() {
        let mut sim = LiveSimulation::start(HEADER).unwrap();
        assert!(sim.drain_trace().iter().all(|l| l.contains("\"persisted\"")));
        sim.apply_step_lines(
            "{\"op\":\"remote\",\"host\":\"far.test\",\"respond\":\"unreachable\"}\n\n\
             {\"op\":\"send\",\"room\":\"!r:home.test\",\"sender\":\"@a:home.test\",\"content\":{}}\n\
             {\"op\":\"advance\",\"ms\":1000}\n{\"op\":\"advance\",\"ms\":60000}",
        )
        .unwrap();
        let trace = sim.drain_trace();
        assert!(trace.iter().any(|l| l.contains("\"kind\":\"send\"")), "{trace:?}");
        assert!(trace.iter().any(|l| l.contains("\"unreachable\"")), "{trace:?}");
        assert!(sim.destination_stats().contains("\"backing_off\""), "{}", sim.destination_stats());
        assert_eq!(sim.steps_applied(), 6);
        let err = sim.apply_step("{\"op\":\"nope\"}").unwrap_err();
        assert!(err.starts_with("step 6"), "{err}");
    }

    #[test]
    fn a_stepper_runs_to_the_end_line() {
        let mut stepper = ScenarioStepper::start(HEADER).unwrap();
        assert_eq!(stepper.run.step_count(), 2);
        while stepper.run_next().unwrap() {}
        let trace = stepper.drain_trace();
        assert!(trace.last().unwrap().contains("\"end\""), "{trace:?}");
        assert!(!stepper.run_next().unwrap());
    }
}
