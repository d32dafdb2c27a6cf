//! `FederationSender`: the core's JSON facade as a JavaScript class.

use fedsend_core::wire::JsonSender;
use wasm_bindgen::prelude::*;

use crate::ms::{ms_from_js, ms_to_js};

/// The federation sender: a deterministic sans-IO state machine, driven with JSON.
///
/// ```js
/// const sender = new FederationSender(configJson, recoveredJson); // throws Error on bad config
/// sender.handleInput(Date.now(), inputJson);                      // throws Error on bad input
/// for (let out; (out = sender.pollOutput()) !== undefined; ) perform(JSON.parse(out));
/// const deadline = sender.pollTimeout();                          // Unix ms, or undefined
/// ```
///
/// Times are whole Unix milliseconds as numbers. An error thrown by `handleInput` leaves the
/// machine running: the input is refused, nothing else changes.
#[wasm_bindgen]
pub struct FederationSender {
    inner: JsonSender,
}

#[wasm_bindgen]
impl FederationSender {
    /// Builds a machine from its configuration and the state recovered from storage, both
    /// JSON. Throws an `Error` whose message says what is wrong with them.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(js_name = configJson)] config_json: &str,
        #[wasm_bindgen(js_name = recoveredJson)] recovered_json: &str,
    ) -> Result<Self, JsError> {
        let inner = JsonSender::new(config_json, recovered_json).map_err(|e| JsError::new(&e))?;
        Ok(Self { inner })
    }

    /// Feeds one input (JSON) at `nowMs`. Throws an `Error` for a malformed or uncorrelated
    /// input, or a time that is not a whole number of milliseconds in 0..=2^53-1.
    #[wasm_bindgen(js_name = handleInput)]
    pub fn handle_input(
        &mut self,
        #[wasm_bindgen(js_name = nowMs)] now_ms: f64,
        #[wasm_bindgen(js_name = inputJson)] input_json: &str,
    ) -> Result<(), JsError> {
        let now_ms = ms_from_js("nowMs", now_ms).map_err(|e| JsError::new(&e))?;
        self.inner.handle_input(now_ms, input_json).map_err(|e| JsError::new(&e))
    }

    /// The next output (JSON), or `undefined` when there is none for now. Drain it after
    /// every input.
    #[wasm_bindgen(js_name = pollOutput)]
    pub fn poll_output(&mut self) -> Option<String> {
        self.inner.poll_output()
    }

    /// The next deadline in Unix milliseconds, or `undefined` when nothing is scheduled.
    /// Deliver a timeout input at or after it (early is harmless). A deadline beyond
    /// 2^53-1 ms ("never") is returned as `Number.MAX_SAFE_INTEGER`.
    #[wasm_bindgen(js_name = pollTimeout)]
    pub fn poll_timeout(&self) -> Option<f64> {
        self.inner.poll_timeout().map(ms_to_js)
    }
}

impl FederationSender {
    /// The facade underneath, for [`crate::SenderMachine`]'s extra figures (not exported to JS).
    pub(crate) fn json_sender(&self) -> &JsonSender {
        &self.inner
    }
}
