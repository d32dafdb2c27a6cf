//! Transaction bodies: `{"edus":[…],"origin":…,"origin_server_ts":…,"pdus":[…]}`.
//!
//! Keys are written in canonical-JSON order and PDUs are embedded as the exact text the host
//! gave (serialized once, shared by every destination), so a frozen body is byte-stable and a
//! host may sign it as it is.

use alloc::string::String;
use alloc::sync::Arc;

use crate::types::ServerName;

/// A PDU queued for one or more destinations; shared, never copied per destination.
#[derive(Debug)]
pub struct PduEntry {
    /// The event id.
    pub event_id: String,
    /// Its position in the events stream.
    pub stream_ordering: u64,
    /// The federation JSON, compact, keys sorted.
    pub json: Arc<str>,
    /// When it was queued (Unix ms), for the oldest-pending-age figure.
    pub queued_at_ms: u64,
}

/// Builds a transaction body from already-serialized PDUs and EDUs.
pub fn build_body(origin: &ServerName, origin_server_ts: u64, pdus: &[&str], edus: &[&str]) -> String {
    let payload: usize = pdus.iter().chain(edus).map(|item| item.len() + 1).sum();
    let mut body = String::with_capacity(64 + origin.as_str().len() + payload);
    body.push('{');
    if !edus.is_empty() {
        body.push_str("\"edus\":[");
        push_joined(&mut body, edus);
        body.push_str("],");
    }
    body.push_str("\"origin\":");
    // A server name is ASCII without quotes or backslashes (validated), so it needs no escaping.
    body.push('"');
    body.push_str(origin.as_str());
    body.push('"');
    body.push_str(",\"origin_server_ts\":");
    push_decimal(&mut body, origin_server_ts);
    body.push_str(",\"pdus\":[");
    push_joined(&mut body, pdus);
    body.push_str("]}");
    body
}

/// Length of a body with no PDUs and no EDUs, computed without building it: transaction
/// assembly needs it for every transaction to apply the byte cap.
pub fn empty_body_len(origin: &ServerName, origin_server_ts: u64) -> u64 {
    const FIXED: &str = r#"{"origin":"","origin_server_ts":,"pdus":[]}"#;
    let mut digits = 1;
    let mut rest = origin_server_ts / 10;
    while rest > 0 {
        digits += 1;
        rest /= 10;
    }
    (FIXED.len() + origin.as_str().len() + digits) as u64
}

/// Appends `value` in decimal: what `write!` prints, without the formatting machinery, which
/// costs as much as the rest of a small body (two numbers per transaction).
pub(crate) fn push_decimal(out: &mut String, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for &digit in &digits[at..] {
        out.push(char::from(digit));
    }
}

fn push_joined(body: &mut String, items: &[&str]) {
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_canonical_json() {
        let origin = ServerName::parse("test").unwrap();
        let body =
            build_body(&origin, 1000000, &[r#"{"a":1}"#, r#"{"b":2}"#], &[r#"{"content":{},"edu_type":"m.typing"}"#]);
        assert_eq!(
            body,
            r#"{"edus":[{"content":{},"edu_type":"m.typing"}],"origin":"test","origin_server_ts":1000000,"pdus":[{"a":1},{"b":2}]}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), body, "keys must already be sorted");
        assert_eq!(build_body(&origin, 5, &[], &[]), r#"{"origin":"test","origin_server_ts":5,"pdus":[]}"#);
        for ts in [0, 5, 9, 10, 1_000_000, u64::MAX] {
            assert_eq!(empty_body_len(&origin, ts), build_body(&origin, ts, &[], &[]).len() as u64, "{ts}");
            let mut text = String::from("x");
            push_decimal(&mut text, ts);
            assert_eq!(text, alloc::format!("x{ts}"));
        }
    }
}
