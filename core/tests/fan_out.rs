//! Fan-out of one event to many destinations builds its transaction body once.

use std::sync::Arc;

use fedsend_core::{Input, Output, Timestamp};
mod common;

use common::{pdu, started};

const NOW: Timestamp = Timestamp(1_000_000);

#[test]
fn destinations_sent_the_same_event_at_once_share_one_body() {
    let (mut sender, fetch) = started(NOW);
    let hosts = ["host1", "host2", "host3"];
    let events = vec![pdu("$1", "!r:test", 1, &hosts)];
    sender.handle_input(NOW, Input::EventsFetched { request: fetch, events }).unwrap();
    let mut sends = Vec::new();
    while let Some(output) = sender.poll_output() {
        if let Output::SendTransaction(txn) = output {
            sends.push(txn);
        }
    }
    assert_eq!(sends.len(), hosts.len());
    assert!(sends.iter().all(|t| Arc::ptr_eq(&t.body, &sends[0].body)), "one body for all: {sends:?}");
    // Transaction ids still differ per destination.
    assert_ne!(sends[0].txn_id, sends[1].txn_id);
}
