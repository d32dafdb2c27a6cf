//! Helpers shared by the core's integration tests.

#![allow(dead_code)] // each test file uses a different part

use fedsend_core::{Config, FederationSender, Input, Output, PduInfo, Recovered, RequestId, ServerName, Timestamp};
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

/// A machine past start-up at `now`: incarnation persisted, first fetch still outstanding.
pub(crate) fn started(now: Timestamp) -> (FederationSender, RequestId) {
    let mut sender = FederationSender::new(Config::new(name("test")), Recovered::default()).unwrap();
    let mut fetch = None;
    while let Some(output) = sender.poll_output() {
        match output {
            Output::Persist { request, .. } => sender.handle_input(now, Input::Persisted { request }).unwrap(),
            Output::FetchEvents { request, .. } => fetch = Some(request),
            _ => {}
        }
    }
    (sender, fetch.expect("the machine fetches events at start"))
}
