//! `BoundaryProbe`: what one value costs to cross the JavaScript boundary as JSON text versus
//! as objects, for `bench/node/driven.mjs` (BENCHMARKS.md). Not part of the npm API.

use fedsend_core::{Input, Output};
use wasm_bindgen::prelude::*;

use crate::js_value::{from_js, to_js};

/// Holds one output to encode, and decodes inputs, each way.
#[wasm_bindgen]
#[doc(hidden)]
pub struct BoundaryProbe {
    output: Output,
}

#[wasm_bindgen]
impl BoundaryProbe {
    /// Keeps `output` (JSON text) for the encoding probes.
    #[wasm_bindgen(constructor)]
    pub fn new(#[wasm_bindgen(js_name = outputJson)] output_json: &str) -> Result<Self, JsError> {
        let output = serde_json::from_str(output_json).map_err(|e| JsError::new(&e.to_string()))?;
        Ok(Self { output })
    }

    /// Decodes an input from JSON text (what `SenderMachine.handleInput` does first).
    #[wasm_bindgen(js_name = inputFromJson)]
    pub fn input_from_json(&self, text: &str) -> Result<(), JsError> {
        serde_json::from_str::<Input>(text).map(drop).map_err(|e| JsError::new(&e.to_string()))
    }

    /// Decodes an input from an object (what `DrivenSender.submit` does first: through
    /// `JSON.stringify`, see js_value.rs).
    #[wasm_bindgen(js_name = inputFromObject)]
    pub fn input_from_object(&self, value: JsValue) -> Result<(), JsError> {
        from_js::<Input>(&value).map(drop).map_err(|e| JsError::new(&e))
    }

    /// The output as JSON text (what `SenderMachine.pollOutput` returns).
    #[wasm_bindgen(js_name = outputJson)]
    pub fn output_json(&self) -> String {
        serde_json::to_string(&self.output).unwrap_or_default()
    }

    /// The output as an object (what the driven sender hands its callbacks).
    #[wasm_bindgen(js_name = outputObject)]
    pub fn output_object(&self) -> JsValue {
        to_js(&self.output)
    }
}
