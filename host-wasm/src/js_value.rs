//! Core values as JavaScript objects, without JSON text in between.
//!
//! Out of Rust: `serde-wasm-bindgen`'s JSON-compatible serializer (maps as plain objects,
//! `None` as `null`), so a host sees exactly the objects `JSON.parse` of the core's JSON gave.
//!
//! Into Rust: a JavaScript value becomes a [`serde_json::Value`] the way `JSON.stringify`
//! would write it, then the core's `Deserialize` runs on that value. Not
//! `serde_wasm_bindgen::from_value` directly: it reads a struct by looking up the struct's own
//! field names, so `deny_unknown_fields` never sees a misspelt key; it turns an `undefined`
//! member into `null` where JSON drops it (`{user_id: undefined}` must stay "missing field",
//! not "invalid type: null"); and it recurses without a limit, where a deep object must be
//! refused like the JSON parsers refuse it rather than overflow the wasm stack.

use fedsend_core::nesting::DOCUMENT_DEPTH_MAX;
use js_sys::{Array, Object, Reflect};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};
use wasm_bindgen::{JsCast, JsValue};

/// Integral numbers below this print as digits in `JSON.stringify` (and so parse as integers);
/// from here on they print in exponent notation (and parse as floats).
const DIGITS_BELOW: f64 = 1e21;

/// Decodes a JavaScript value as `T`; the error is serde's sentence (no "at line …": there
/// is no text).
pub(crate) fn from_js<T: DeserializeOwned>(value: &JsValue) -> Result<T, String> {
    let json = json_of(value, 0)?;
    serde_json::from_value(json).map_err(|e| e.to_string())
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

/// `value` as JSON.stringify sees it: members that are `undefined` (or functions, or symbols)
/// left out of objects and written as `null` in arrays.
fn json_of(value: &JsValue, depth: usize) -> Result<Value, String> {
    if let Some(text) = value.as_string() {
        return Ok(Value::String(text));
    }
    if let Some(number) = value.as_f64() {
        return Ok(number_of(number));
    }
    if let Some(flag) = value.as_bool() {
        return Ok(Value::Bool(flag));
    }
    if value.is_null() || value.is_undefined() {
        return Ok(Value::Null);
    }
    if value.is_bigint() {
        return Err(String::from("a BigInt cannot be encoded as JSON"));
    }
    if !value.is_object() {
        // Functions and symbols: JSON has no such value.
        return Ok(Value::Null);
    }
    if depth >= DOCUMENT_DEPTH_MAX {
        return Err(format!("nested deeper than {DOCUMENT_DEPTH_MAX} levels"));
    }
    if Array::is_array(value) {
        let array: &Array = value.unchecked_ref();
        let mut items = Vec::with_capacity(array.length() as usize);
        for item in array.iter() {
            items.push(if omitted(&item) { Value::Null } else { json_of(&item, depth + 1)? });
        }
        return Ok(Value::Array(items));
    }
    let object: &Object = value.unchecked_ref();
    let mut members = Map::new();
    for key in Object::keys(object).iter() {
        let member = Reflect::get(object, &key).map_err(|e| format!("reading a member failed: {e:?}"))?;
        if omitted(&member) {
            continue;
        }
        let Some(key) = key.as_string() else { continue };
        members.insert(key, json_of(&member, depth + 1)?);
    }
    Ok(Value::Object(members))
}

fn omitted(member: &JsValue) -> bool {
    member.is_undefined() || member.is_function() || member.is_symbol()
}

/// A JavaScript number as JSON text of it would parse: whole numbers below 1e21 as integers
/// (so `u64` fields take them), others as floats; NaN and infinities as `null`.
fn number_of(number: f64) -> Value {
    if number.fract() == 0.0 && number.abs() < DIGITS_BELOW {
        // Whole and below 1e21: exact in u64 / i64 when in their ranges.
        if number >= 0.0 && number < u64::MAX as f64 {
            return Value::Number(Number::from(number as u64));
        }
        if number < 0.0 && number >= i64::MIN as f64 {
            return Value::Number(Number::from(number as i64));
        }
    }
    Number::from_f64(number).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::number_of;
    use serde_json::json;

    #[test]
    fn whole_numbers_become_integers_like_json_text_does() {
        assert_eq!(number_of(0.0), json!(0));
        assert_eq!(number_of(-0.0), json!(0));
        assert_eq!(number_of(1_700_000_000_123.0), json!(1_700_000_000_123_u64));
        assert_eq!(number_of(-5.0), json!(-5));
        assert_eq!(number_of(4_294_967_297.0), json!(4_294_967_297_u64));
        // 2^53: JSON.stringify writes its digits, serde_json reads them as an integer.
        assert_eq!(number_of(9_007_199_254_740_992.0), json!(9_007_199_254_740_992_u64));
    }

    #[test]
    fn other_numbers_stay_floats_or_become_null() {
        assert_eq!(number_of(1.5), json!(1.5));
        assert_eq!(number_of(1e21), json!(1e21));
        assert_eq!(number_of(f64::NAN), json!(null));
        assert_eq!(number_of(f64::INFINITY), json!(null));
    }
}
