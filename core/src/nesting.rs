//! How deeply the JSON values a homeserver hands the machine may nest.
//!
//! Every such value (an event, EDU content, a to-device message, device keys, receipt data)
//! is later wrapped in the machine's own records: the input that carries it, the `Persist`
//! output a host decodes, the transaction body the signer parses. Each wrapper adds levels,
//! and every JSON parser on the way refuses documents nested deeper than
//! [`DOCUMENT_DEPTH_MAX`] (serde_json's default, which the wasm boundary, the hosts and the
//! signer all use). A value accepted at the edge but refused inside would wedge whatever
//! waits for it, so the machine accepts values nested at most [`VALUE_DEPTH_MAX`] levels and
//! its records add at most [`WRAPPER_DEPTH_MAX`]: every accepted value crosses every
//! boundary. Hosts check the same limit at their own edge ([`value_depth`]) so that they can
//! refuse a submission before storing it.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde_json::Value;

use crate::error::InputError;
use crate::io::Input;

/// Deepest nesting of arrays and objects accepted in a homeserver-supplied value.
pub const VALUE_DEPTH_MAX: usize = 64;

/// Most levels the machine's records put around a homeserver-supplied value. The deepest
/// today is a to-device message inside a `Persist` output
/// (`output → changes → to_device_outbox → [row] → edu → content → messages → user → device`);
/// the tests check every record against this bound.
pub const WRAPPER_DEPTH_MAX: usize = 16;

/// Deepest document the JSON parsers between the machine and its hosts accept.
pub const DOCUMENT_DEPTH_MAX: usize = 127;

const _: () = assert!(VALUE_DEPTH_MAX + WRAPPER_DEPTH_MAX <= DOCUMENT_DEPTH_MAX);

/// Levels of arrays and objects in `value`: 0 for a scalar, 1 for `[]` or `{"a":1}`.
///
/// Iterative, so a host may call it on anything its parser produced.
pub fn value_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending: Vec<(&Value, usize)> = Vec::from([(value, 0)]);
    while let Some((value, above)) = pending.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(above + 1);
                pending.extend(items.iter().map(|item| (item, above + 1)));
            }
            Value::Object(members) => {
                deepest = deepest.max(above + 1);
                pending.extend(members.values().map(|member| (member, above + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// `Err` with a sentence naming `what` when `value` nests deeper than [`VALUE_DEPTH_MAX`].
pub fn check_value_depth(what: &str, value: &Value) -> Result<(), String> {
    let depth = value_depth(value);
    if depth > VALUE_DEPTH_MAX {
        return Err(format!(
            "{what} nests {depth} levels of arrays and objects; at most {VALUE_DEPTH_MAX} are accepted"
        ));
    }
    Ok(())
}

/// Refuses a command whose homeserver-supplied values nest too deeply. Storage answers are
/// not refused here: one deep event must not stop the others, so fan-out and catch-up skip it
/// on their own (see [`pdu_too_deep`]).
pub(crate) fn check_input(input: &Input) -> Result<(), InputError> {
    let refuse = |what: &str, value: &Value| check_value_depth(what, value).map_err(InputError::Refused);
    match input {
        Input::Edu { content, .. } => refuse("the EDU content", content),
        Input::ToDevice { messages, .. } => messages
            .values()
            .flat_map(|devices| devices.values())
            .try_for_each(|message| refuse("a to-device message", message)),
        Input::Receipt { receipt, .. } => {
            // The map itself is one level.
            let depth = 1 + receipt.data.values().map(value_depth).max().unwrap_or(0);
            if depth > VALUE_DEPTH_MAX {
                return Err(InputError::Refused(format!(
                    "the receipt data nests {depth} levels of arrays and objects; at most {VALUE_DEPTH_MAX} are accepted"
                )));
            }
            Ok(())
        }
        Input::DeviceListUpdate { keys, .. } => keys.iter().try_for_each(|keys| refuse("the device keys", keys)),
        Input::SigningKeyUpdate { master_key, self_signing_key, .. } => {
            master_key.iter().chain(self_signing_key).try_for_each(|key| refuse("the cross-signing key", key))
        }
        Input::StoredToDevice { rows } => rows.iter().try_for_each(|row| refuse("a to-device row", &row.edu)),
        Input::StoredDeviceListPokes { pokes } => {
            pokes.iter().try_for_each(|poke| refuse("a device-list change", &poke.content))
        }
        _ => Ok(()),
    }
}

/// Why an event from storage cannot be sent, when it nests too deeply.
pub(crate) fn pdu_too_deep(pdu: &Value) -> Option<String> {
    check_value_depth("the event", pdu).err()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use serde_json::json;

    /// `[[…[1]…]]` with `depth` levels.
    pub(crate) fn nested(depth: usize) -> Value {
        let mut value = json!(1);
        for _ in 0..depth {
            value = Value::Array(Vec::from([value]));
        }
        value
    }

    #[test]
    fn depth_counts_containers_not_scalars() {
        assert_eq!(value_depth(&json!(1)), 0);
        assert_eq!(value_depth(&json!("x")), 0);
        assert_eq!(value_depth(&json!([])), 1);
        assert_eq!(value_depth(&json!({"a": 1})), 1);
        assert_eq!(value_depth(&json!({"a": [1, {"b": []}], "c": 2})), 4);
        assert_eq!(value_depth(&nested(100)), 100);
    }

    #[test]
    fn the_limit_is_inclusive() {
        assert!(check_value_depth("content", &nested(VALUE_DEPTH_MAX)).is_ok());
        let error = check_value_depth("content", &nested(VALUE_DEPTH_MAX + 1)).unwrap_err();
        assert!(error.starts_with("content nests 65 levels"), "{error}");
    }

    #[test]
    fn the_parsers_limit_is_what_this_module_assumes() {
        let text = |depth: usize| nested(depth).to_string();
        assert!(serde_json::from_str::<Value>(&text(DOCUMENT_DEPTH_MAX)).is_ok());
        assert!(serde_json::from_str::<Value>(&text(DOCUMENT_DEPTH_MAX + 1)).is_err());
    }
}
