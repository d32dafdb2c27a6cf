//! `runScenario`: a scenario file run by `fedsend-sim` against an engine object written in
//! JavaScript.

use core::cell::RefCell;

use fedsend_sim::Engine;
use js_sys::{Function, Reflect};
use wasm_bindgen::prelude::*;

use crate::ms::{MAX_SAFE_INTEGER, ms_from_js, ms_to_js};

#[wasm_bindgen(typescript_custom_section)]
const ENGINE_TS: &'static str = r#"
/**
 * A sender engine as `runScenario` drives it: usually a thin wrapper that creates a
 * `FederationSender` in `start` and forwards the other three calls to it. Times are whole
 * Unix milliseconds; inputs and outputs are JSON strings. Throw an `Error` to refuse an input.
 */
export interface Engine {
  /** Creates the machine, or re-creates it on a simulated restart (all memory lost). */
  start(configJson: string, recoveredJson: string): void;
  handleInput(nowMs: number, inputJson: string): void;
  pollOutput(): string | undefined;
  pollTimeout(): number | undefined;
}
"#;

#[wasm_bindgen]
extern "C" {
    /// Any JavaScript object with the four methods of the `Engine` interface above.
    #[wasm_bindgen(typescript_type = "Engine")]
    pub type EngineObject;

    #[wasm_bindgen(method, catch)]
    fn start(this: &EngineObject, config_json: &str, recovered_json: &str) -> Result<(), JsValue>;

    #[wasm_bindgen(method, catch, js_name = handleInput)]
    fn handle_input(this: &EngineObject, now_ms: f64, input_json: &str) -> Result<(), JsValue>;

    #[wasm_bindgen(method, catch, js_name = pollOutput)]
    fn poll_output(this: &EngineObject) -> Result<JsValue, JsValue>;

    #[wasm_bindgen(method, catch, js_name = pollTimeout)]
    fn poll_timeout(this: &EngineObject) -> Result<JsValue, JsValue>;
}

/// Runs a scenario (JSON text, `docs/scenarios.md`) against `engine`, calling `emit` with each
/// trace line (one JSON object, no newline) in order. Throws an `Error` whose message is one
/// line naming the step and the problem when the scenario is malformed or the engine fails.
///
/// The trace is the same, byte for byte, as the native `fedsend scenario FILE` prints for an
/// engine wrapping `FederationSender`.
#[wasm_bindgen(js_name = runScenario)]
pub fn run_scenario(
    #[wasm_bindgen(js_name = scenarioJson)] scenario_json: &str,
    engine: &EngineObject,
    #[wasm_bindgen(unchecked_param_type = "(line: string) => void")] emit: &Function,
) -> Result<(), JsError> {
    check_callable(emit, "emit")?;
    for method in ["start", "handleInput", "pollOutput", "pollTimeout"] {
        let value = Reflect::get(engine, &JsValue::from_str(method)).unwrap_or(JsValue::UNDEFINED);
        check_callable(&value, &format!("engine.{method}"))?;
    }

    // The first failure the simulator could not be told about directly (an exception from
    // `emit`, `pollOutput` or `pollTimeout`, which return no error). Once set, emitting stops
    // and every later `start`/`handleInput` fails with it, so the simulator stops at the
    // current step and names it.
    let fault = RefCell::new(None::<String>);
    let mut js_engine = JsEngine { object: engine, fault: &fault };
    let mut emit_line = |line: &str| {
        if fault.borrow().is_some() {
            return;
        }
        if let Err(e) = emit.call1(&JsValue::NULL, &JsValue::from_str(line)) {
            *fault.borrow_mut() = Some(format!("emit threw: {}", error_message(&e)));
        }
    };
    let result = fedsend_sim::run_scenario(scenario_json, &mut js_engine, &mut emit_line);

    let fault = fault.into_inner();
    let message = match (result, fault) {
        (Ok(()), None) => return Ok(()),
        (Ok(()), Some(fault)) => fault,
        (Err(e), None) => e.to_string(),
        (Err(e), Some(fault)) => {
            let message = e.to_string();
            if message.contains(&fault) { message } else { format!("{message} (after: {fault})") }
        }
    };
    Err(JsError::new(&message))
}

/// [`Engine`] over a JavaScript object.
struct JsEngine<'a> {
    object: &'a EngineObject,
    fault: &'a RefCell<Option<String>>,
}

impl JsEngine<'_> {
    fn check_fault(&self) -> Result<(), String> {
        self.fault.borrow().as_ref().map_or(Ok(()), |fault| Err(fault.clone()))
    }

    fn set_fault(&self, fault: String) {
        self.fault.borrow_mut().get_or_insert(fault);
    }
}

impl Engine for JsEngine<'_> {
    fn start(&mut self, config_json: &str, recovered_json: &str) -> Result<(), String> {
        self.check_fault()?;
        self.object.start(config_json, recovered_json).map_err(|e| error_message(&e))
    }

    fn handle_input(&mut self, now_ms: u64, input_json: &str) -> Result<(), String> {
        self.check_fault()?;
        if now_ms > MAX_SAFE_INTEGER {
            return Err(format!("time {now_ms} ms is beyond 2^53-1 ms, which a JavaScript number cannot hold exactly"));
        }
        self.object.handle_input(ms_to_js(now_ms), input_json).map_err(|e| error_message(&e))
    }

    fn poll_output(&mut self) -> Option<String> {
        if self.fault.borrow().is_some() {
            return None;
        }
        match self.object.poll_output() {
            Ok(value) if value.is_undefined() || value.is_null() => None,
            Ok(value) => value.as_string().or_else(|| {
                self.set_fault(format!("engine.pollOutput returned {value:?}, not a string or undefined"));
                None
            }),
            Err(e) => {
                self.set_fault(format!("engine.pollOutput threw: {}", error_message(&e)));
                None
            }
        }
    }

    fn poll_timeout(&mut self) -> Option<u64> {
        if self.fault.borrow().is_some() {
            return None;
        }
        match self.object.poll_timeout() {
            Ok(value) if value.is_undefined() || value.is_null() => None,
            Ok(value) => {
                let ms = value
                    .as_f64()
                    .ok_or_else(|| format!("{value:?} is not a number"))
                    .and_then(|n| ms_from_js("engine.pollTimeout()", n));
                ms.map_err(|e| self.set_fault(format!("engine.pollTimeout returned a bad deadline: {e}"))).ok()
            }
            Err(e) => {
                self.set_fault(format!("engine.pollTimeout threw: {}", error_message(&e)));
                None
            }
        }
    }
}

fn check_callable(value: &JsValue, what: &str) -> Result<(), JsError> {
    if value.is_function() { Ok(()) } else { Err(JsError::new(&format!("{what} must be a function, got {value:?}"))) }
}

/// The text of a thrown JavaScript value. A plain `Error` gives just its message, so that the
/// core's own error messages (thrown by `FederationSender` as `Error`) reach the simulator
/// unchanged, as they do natively; other errors keep their name (`TypeError: …`).
fn error_message(thrown: &JsValue) -> String {
    if let Some(error) = thrown.dyn_ref::<js_sys::Error>() {
        let name = String::from(error.name());
        let message = String::from(error.message());
        if name == "Error" { message } else { format!("{name}: {message}") }
    } else if let Some(text) = thrown.as_string() {
        text
    } else {
        format!("{thrown:?}")
    }
}
