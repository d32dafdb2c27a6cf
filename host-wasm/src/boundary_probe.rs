//! `BoundaryProbe`: what one value costs to cross the JavaScript boundary as JSON text versus
//! as objects, for `bench/node/driven.mjs` (BENCHMARKS.md). Not part of the npm API.

use fedsend_core::{Config, FederationSender, Input, Output, PduInfo, Recovered, Timestamp};
use wasm_bindgen::prelude::*;

use crate::js_value::{input_from_js, to_js};

const START_MS: u64 = 1_700_000_000_000;

/// Holds one output to encode, and decodes inputs, each way.
#[wasm_bindgen]
#[doc(hidden)]
pub struct BoundaryProbe {
    output: Output,
}

#[wasm_bindgen]
impl BoundaryProbe {
    /// Keeps the transaction a fresh sender with `configJson` makes of one event (`eventJson`,
    /// a `PduInfo`): the largest output of a PDU's fan-out. Made by the core rather than
    /// decoded, so that the module carries no decoder of outputs just for this probe.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(js_name = configJson)] config_json: &str,
        #[wasm_bindgen(js_name = eventJson)] event_json: &str,
    ) -> Result<Self, JsError> {
        let config: Config = serde_json::from_str(config_json).map_err(|e| JsError::new(&e.to_string()))?;
        let event: PduInfo = serde_json::from_str(event_json).map_err(|e| JsError::new(&e.to_string()))?;
        let mut core = FederationSender::new(config, Recovered::default()).map_err(|e| JsError::new(&e.to_string()))?;
        let now = Timestamp(START_MS);
        let feed = |core: &mut FederationSender, input: Input| {
            core.handle_input(now, input).map_err(|e| JsError::new(&e.to_string()))?;
            Ok::<Vec<Output>, JsError>(std::iter::from_fn(|| core.poll_output()).collect())
        };
        // Start-up persists the incarnation and asks for events; the event is fanned out at
        // once and sent once the incarnation is durable.
        let mut answers = Vec::new();
        for output in feed(&mut core, Input::Timeout)? {
            match output {
                Output::FetchEvents { request, .. } => {
                    answers.push(Input::EventsFetched { request, events: vec![event.clone()] });
                }
                Output::Persist { request, .. } => answers.push(Input::Persisted { request }),
                _ => {}
            }
        }
        for answer in answers {
            if let Some(output) =
                feed(&mut core, answer)?.into_iter().find(|output| matches!(output, Output::SendTransaction(_)))
            {
                return Ok(Self { output });
            }
        }
        Err(JsError::new("the event made no transaction (is a remote server in its hosts?)"))
    }

    /// Decodes an input from JSON text (what `SenderMachine.handleInput` does first).
    #[wasm_bindgen(js_name = inputFromJson)]
    pub fn input_from_json(&self, text: &str) -> Result<(), JsError> {
        fedsend_core::wire::input_from_json(text).map(drop).map_err(|e| JsError::new(&e.to_string()))
    }

    /// Decodes an input from an object (what `DrivenSender.submit` does first: through
    /// `JSON.stringify`, see js_value.rs).
    #[wasm_bindgen(js_name = inputFromObject)]
    pub fn input_from_object(&self, value: JsValue) -> Result<(), JsError> {
        input_from_js(&value).map(drop).map_err(|e| JsError::new(&e))
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
