//! Core values to and from JavaScript values.
//!
//! Out of Rust: `serde-wasm-bindgen`'s JSON-compatible serializer (maps as plain objects,
//! `None` as `null`), so a host gets exactly the objects `JSON.parse` of the core's JSON gave,
//! without the text: bench/node/driven.mjs measured a transaction output at ~1.6× less than
//! `serde_json::to_string` plus `JSON.parse` (BENCHMARKS.md, "The npm package's driven sender").
//!
//! Into Rust: the host's object goes through the engine's own `JSON.stringify`, called from
//! here, and the core's `Deserialize` reads the text. Reading the object member by member
//! (`serde_wasm_bindgen::from_value`, or a walker of our own) costs one boundary call and one
//! string copy per member, and measured slower than one `JSON.stringify` and one copy (the same
//! benchmark); it would also change what an input means, since `from_value` reads a struct by
//! its own field names (`deny_unknown_fields` never sees a misspelt key), turns an `undefined`
//! member into `null` (`{user_id: undefined}` must stay "missing field"), and recurses without
//! the depth limit the JSON parser has. Through the text, an input means what it meant with
//! the raw `Machine`, with the same error messages.

use fedsend_core::Input;
use fedsend_core::wire::input_from_json;
use serde::Serialize;
use serde::de::DeserializeOwned;
use wasm_bindgen::JsValue;

/// Decodes a JavaScript value as `T`; the error is serde_json's sentence.
pub(crate) fn from_js<T: DeserializeOwned>(value: &JsValue) -> Result<T, String> {
    serde_json::from_str(&json_text(value)?).map_err(|e| e.to_string())
}

/// [`from_js`] for an [`Input`], through the core's own decoder: `from_js::<Input>` would
/// compile a second copy of it and its nested types into the module (182 KB; BENCHMARKS.md,
/// "wasm size (issue 17)").
pub(crate) fn input_from_js(value: &JsValue) -> Result<Input, String> {
    input_from_json(&json_text(value)?).map_err(|e| e.to_string())
}

fn json_text(value: &JsValue) -> Result<String, String> {
    // JSON.stringify answers undefined (not a string) for undefined, functions and symbols.
    js_sys::JSON::stringify(value)
        .ok()
        .and_then(|text| text.as_string())
        .ok_or_else(|| String::from("expected a JSON value"))
}

/// Encodes `value` as plain JavaScript objects.
pub(crate) fn to_js<T: Serialize + ?Sized>(value: &T) -> JsValue {
    let serializer = serde_wasm_bindgen::Serializer::json_compatible();
    value.serialize(&serializer).unwrap_or_else(|_| {
        // Only an integer beyond 2^53 gets here (no JavaScript number holds it exactly): give
        // what JSON.parse of the core's JSON gives, the nearest number, as before.
        let text = serde_json::to_string(value).unwrap_or_else(|_| String::from("null"));
        js_sys::JSON::parse(&text).unwrap_or(JsValue::NULL)
    })
}
