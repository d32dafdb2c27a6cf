//! Outbox ids embed the incarnation (`incarnation << 32 | counter`), so they are unique only
//! if no outbox row becomes durable without the incarnation that made it. The start-up write
//! of the incarnation can fail and be re-issued after later batches; a crash in between used
//! to restart from the old incarnation, hand out the same ids again and overwrite an
//! undelivered message's row (found by the simulator, seed 26143).

use std::collections::BTreeMap;

use fedsend_core::{Changes, Config, FederationSender, Input, Output, Recovered, Timestamp, TransactionResult};
use fedsend_driver::MemoryStore;
use serde_json::{Value, json};

mod common;

use common::name;

const NOW: Timestamp = Timestamp(1_000_000);

/// The reference store, and what this test reads of it.
#[derive(Default)]
struct Store(MemoryStore);

impl Store {
    fn apply(&mut self, changes: &Changes) {
        self.0.apply(changes);
    }

    fn recovered(&self) -> Recovered {
        self.0.recovered()
    }

    /// Message ids of the stored outbox rows.
    fn message_ids(&self) -> Vec<String> {
        self.0.to_device_outbox.values().map(|row| row.edu["content"]["message_id"].as_str().unwrap().into()).collect()
    }
}

fn to_device(message_id: &str) -> Input {
    Input::ToDevice {
        sender: "@alice:test".into(),
        message_type: "m.room_key".into(),
        message_id: Some(message_id.into()),
        messages: BTreeMap::from([(
            String::from("@bob:remote"),
            BTreeMap::from([(String::from("DEVICE"), json!({ "key": message_id }))]),
        )]),
    }
}

#[test]
fn an_outbox_row_durable_before_its_incarnation_is_not_overwritten_after_a_crash() {
    let mut store = Store::default();

    // First process: the incarnation write fails (its re-issue is a second away), and the
    // batch holding a to-device message's outbox row lands meanwhile. Then the process dies.
    let mut first = FederationSender::new(Config::new(name("test")), Recovered::default()).unwrap();
    while let Some(output) = first.poll_output() {
        if let Output::Persist { request, changes } = output {
            assert_eq!(changes.incarnation, Some(1));
            first.handle_input(NOW, Input::StorageFailed { request, error: "disk full".into() }).unwrap();
        }
    }
    first.handle_input(NOW, to_device("first")).unwrap();
    while let Some(output) = first.poll_output() {
        if let Output::Persist { request, changes } = output {
            store.apply(&changes);
            first.handle_input(NOW, Input::Persisted { request }).unwrap();
        }
    }
    assert_eq!(store.message_ids(), ["first"], "the first message's row is durable");
    drop(first);

    // Second process, from what storage holds: it queues a message of its own, its writes
    // land, and it dies before any transaction is answered.
    let mut second = FederationSender::new(Config::new(name("test")), store.recovered()).unwrap();
    second.handle_input(NOW, to_device("second")).unwrap();
    persist_only(&mut second, &mut store);
    drop(second);
    let mut stored = store.message_ids();
    stored.sort();
    assert_eq!(stored, ["first", "second"], "the second message's row took no other row's place");

    // Third process: delivers what storage holds.
    let mut third = FederationSender::new(Config::new(name("test")), store.recovered()).unwrap();
    let mut sent: Vec<Value> = Vec::new();
    let mut pending = Vec::new();
    loop {
        while let Some(output) = third.poll_output() {
            match output {
                Output::Persist { request, changes } => {
                    store.apply(&changes);
                    pending.push(Input::Persisted { request });
                }
                Output::SendTransaction(txn) => {
                    let body: Value = serde_json::from_str(&txn.body).unwrap();
                    sent.extend(body["edus"].as_array().cloned().unwrap_or_default());
                    let result = TransactionResult::Ok { pdu_errors: BTreeMap::new() };
                    pending.push(Input::TransactionDone { request: txn.request, result });
                }
                _ => {}
            }
        }
        let Some(input) = pending.pop() else { break };
        third.handle_input(NOW, input).unwrap();
    }
    let delivered: Vec<&str> = sent
        .iter()
        .filter(|edu| edu["edu_type"] == "m.direct_to_device")
        .map(|edu| edu["content"]["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(delivered, ["first", "second"], "both messages reach the remote, in order");
    assert!(store.0.to_device_outbox.is_empty(), "both rows are deleted once delivered: {:?}", store.message_ids());
}

/// Lets every write land and answers nothing else.
fn persist_only(sender: &mut FederationSender, store: &mut Store) {
    let mut landed = Vec::new();
    loop {
        while let Some(output) = sender.poll_output() {
            if let Output::Persist { request, changes } = output {
                store.apply(&changes);
                landed.push(request);
            }
        }
        let Some(request) = landed.pop() else { break };
        sender.handle_input(NOW, Input::Persisted { request }).unwrap();
    }
}
