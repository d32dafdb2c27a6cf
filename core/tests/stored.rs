//! Work the homeserver already stored durably in tables of its own (Synapse's outbox and
//! device-list pokes): sent like the same work handed in directly, never persisted again,
//! and deleted under the homeserver's own ids once delivered.

use fedsend_core::{Changes, DeviceListPoke, FederationSender, Input, OutboxRow, Output, Timestamp, TransactionResult};
use serde_json::json;

mod common;

use common::name;

const NOW: Timestamp = Timestamp(1_000_000);

/// Runs the machine until it is idle: persists succeed, transactions are delivered. Returns
/// the batches persisted and the EDUs sent.
fn run(sender: &mut FederationSender, until: Timestamp) -> (Vec<Changes>, Vec<serde_json::Value>) {
    let (mut persisted, mut edus) = (Vec::new(), Vec::new());
    let mut now = NOW;
    loop {
        while let Some(output) = sender.poll_output() {
            let answer = match output {
                Output::Persist { request, changes } => {
                    persisted.push(changes);
                    Input::Persisted { request }
                }
                Output::SendTransaction(txn) => {
                    let body: serde_json::Value = serde_json::from_str(&txn.body).unwrap();
                    edus.extend(body["edus"].as_array().cloned().unwrap_or_default());
                    Input::TransactionDone {
                        request: txn.request,
                        result: TransactionResult::Ok { pdu_errors: Default::default() },
                    }
                }
                _ => continue,
            };
            sender.handle_input(now, answer).unwrap();
        }
        match sender.poll_timeout() {
            Some(deadline) if deadline <= until => {
                now = deadline.max(now);
                sender.handle_input(now, Input::Timeout).unwrap();
            }
            _ => return (persisted, edus),
        }
    }
}

fn row(outbox_id: u64, message_id: &str) -> OutboxRow {
    OutboxRow {
        destination: name("remote"),
        outbox_id,
        queued_ts: 1,
        edu: json!({"edu_type": "m.direct_to_device",
                    "content": {"message_id": message_id, "sender": "@a:test", "type": "m.x", "messages": {}}}),
    }
}

#[test]
fn stored_to_device_rows_are_sent_once_and_deleted_by_their_own_id() {
    let (mut sender, _) = common::started(NOW);
    let rows = vec![row(41, "m41"), row(40, "m40")];
    sender.handle_input(NOW, Input::StoredToDevice { rows: rows.clone() }).unwrap();
    // Fed again while still queued: ignored.
    sender.handle_input(NOW, Input::StoredToDevice { rows }).unwrap();
    let (persisted, edus) = run(&mut sender, Timestamp(NOW.0 + 60_000));
    let ids: Vec<&str> = edus.iter().map(|e| e["content"]["message_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["m40", "m41"], "in id order, once each");
    assert!(persisted.iter().all(|c| c.to_device_outbox.is_empty()), "the homeserver's rows are not written again");
    let mut deleted: Vec<u64> =
        persisted.iter().flat_map(|c| c.to_device_deleted.iter().map(|k| k.outbox_id)).collect();
    deleted.sort_unstable();
    assert_eq!(deleted, [40, 41]);
}

#[test]
fn stored_device_list_pokes_are_sent_and_deleted_not_persisted() {
    let (mut sender, _) = common::started(NOW);
    let poke = DeviceListPoke {
        destination: name("remote"),
        user_id: "@a:test".into(),
        device_id: Some("DEV".into()),
        stream_id: 7,
        queued_ts: NOW.0,
        content: json!({"user_id": "@a:test", "device_id": "DEV", "stream_id": 7}),
    };
    sender.handle_input(NOW, Input::StoredDeviceListPokes { pokes: vec![poke] }).unwrap();
    let (persisted, edus) = run(&mut sender, Timestamp(NOW.0 + 120_000));
    let updates: Vec<_> = edus.iter().filter(|e| e["edu_type"] == "m.device_list_update").collect();
    assert_eq!(updates.len(), 1, "{edus:?}");
    assert_eq!(updates[0]["content"]["stream_id"], 7);
    assert!(persisted.iter().all(|c| c.device_list_pokes.is_empty()), "not written again");
    assert!(persisted.iter().any(|c| c.device_list_pokes_deleted.iter().any(|k| k.stream_id == 7)));
    assert!(persisted.iter().any(|c| c.device_list_positions.iter().any(|p| p.stream_id == Some(7))));
}

#[test]
fn stored_work_for_ourselves_or_other_instances_is_ignored() {
    let (mut sender, _) = common::started(NOW);
    let mut ours = row(1, "self");
    ours.destination = name("test");
    sender.handle_input(NOW, Input::StoredToDevice { rows: vec![ours] }).unwrap();
    let (_, edus) = run(&mut sender, Timestamp(NOW.0 + 60_000));
    assert!(edus.is_empty());
}
