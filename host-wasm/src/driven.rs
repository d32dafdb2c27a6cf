//! `SenderMachine`: the raw machine as the npm package (`npm/`) uses it.
//!
//! The same JSON facade as [`crate::FederationSender`], plus the per-destination figures. It is
//! a separate class so that the visualiser's `FederationSender` stays exactly as it is, while
//! the package can grow what a homeserver needs. The package's driven `FederationSender` runs
//! its loop in JavaScript over this class (`npm/src/sender.js` says why).

use fedsend_core::wire::JsonSender;
use wasm_bindgen::prelude::*;

use crate::ms::{ms_from_js, ms_to_js};

/// The sans-IO machine behind JSON text: inputs in, outputs out, one deadline.
#[wasm_bindgen]
pub struct SenderMachine {
    inner: JsonSender,
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
        let inner = JsonSender::new(config_json, recovered_json).map_err(|e| JsError::new(&e))?;
        Ok(Self { inner })
    }

    /// Feeds one input (JSON) at `nowMs` (whole Unix ms). A refused input throws and changes
    /// nothing.
    #[wasm_bindgen(js_name = handleInput)]
    pub fn handle_input(
        &mut self,
        #[wasm_bindgen(js_name = nowMs)] now_ms: f64,
        #[wasm_bindgen(js_name = inputJson)] input_json: &str,
    ) -> Result<(), JsError> {
        let now_ms = ms_from_js("nowMs", now_ms).map_err(|e| JsError::new(&e))?;
        self.inner.handle_input(now_ms, input_json).map_err(|e| JsError::new(&e))
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
        self.inner.poll_timeout().map(ms_to_js)
    }

    /// Per-destination figures as a JSON array, sorted by destination.
    #[wasm_bindgen(js_name = destinationStats)]
    pub fn destination_stats(&self) -> String {
        self.inner.destination_stats()
    }
}
