//! `SenderMachine`: the raw machine as the npm package (`npm/`) uses it.
//!
//! The same JSON facade as [`crate::FederationSender`], plus the per-destination figures. It is
//! a separate class so that the visualiser's `FederationSender` stays exactly as it is, while
//! the package can grow what a homeserver needs. The package's driven `FederationSender` runs
//! its loop in JavaScript over this class (`npm/src/sender.js` says why).

use wasm_bindgen::prelude::*;

use crate::FederationSender;

/// The sans-IO machine behind JSON text: inputs in, outputs out, one deadline.
#[wasm_bindgen]
pub struct SenderMachine {
    // Delegates to the visualiser's class so the time checks and error mapping live once.
    inner: FederationSender,
}

#[wasm_bindgen]
impl SenderMachine {
    /// Builds a machine from its configuration and recovered state, both JSON. Throws an
    /// `Error` whose message names what is wrong.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(js_name = configJson)] config_json: &str,
        #[wasm_bindgen(js_name = recoveredJson)] recovered_json: &str,
    ) -> Result<Self, JsError> {
        Ok(Self { inner: FederationSender::new(config_json, recovered_json)? })
    }

    /// Feeds one input (JSON) at `nowMs` (whole Unix ms). A refused input throws and changes
    /// nothing.
    #[wasm_bindgen(js_name = handleInput)]
    pub fn handle_input(
        &mut self,
        #[wasm_bindgen(js_name = nowMs)] now_ms: f64,
        #[wasm_bindgen(js_name = inputJson)] input_json: &str,
    ) -> Result<(), JsError> {
        self.inner.handle_input(now_ms, input_json)
    }

    /// The next output (JSON), or `undefined`.
    #[wasm_bindgen(js_name = pollOutput)]
    pub fn poll_output(&mut self) -> Option<String> {
        self.inner.poll_output()
    }

    /// The next deadline in Unix ms, or `undefined`; "never" saturates at
    /// `Number.MAX_SAFE_INTEGER`.
    #[wasm_bindgen(js_name = pollTimeout)]
    pub fn poll_timeout(&self) -> Option<f64> {
        self.inner.poll_timeout()
    }

    /// Per-destination figures as a JSON array, sorted by destination.
    #[wasm_bindgen(js_name = destinationStats)]
    pub fn destination_stats(&self) -> String {
        self.inner.json_sender().destination_stats()
    }
}
