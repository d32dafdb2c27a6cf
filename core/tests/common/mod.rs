//! Helpers shared by the core's integration tests.

#![allow(dead_code)] // each test file uses a different part

use fedsend_core::{PduInfo, ServerName};
use serde_json::json;

pub(crate) fn name(s: &str) -> ServerName {
    ServerName::parse(s).unwrap()
}

/// A local event by `@alice:test` in `room`, routed to `hosts`.
pub(crate) fn pdu(id: &str, room: &str, stream: u64, hosts: &[&str]) -> PduInfo {
    PduInfo {
        event_id: id.into(),
        room_id: room.into(),
        stream_ordering: stream,
        sender: "@alice:test".into(),
        has_prev_events: true,
        hosts: hosts.iter().map(|h| name(h)).collect(),
        partial_state_servers: None,
        invitee_server: None,
        proactively_send: true,
        out_of_band: false,
        send_on_behalf_of: None,
        received_ts: None,
        pdu: json!({ "event_id": id, "room_id": room }),
    }
}
