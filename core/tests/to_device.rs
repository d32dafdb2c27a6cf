//! Synapse's `test_transaction_splitting` (`tests/rest/client/test_sendtodevice.py`): 101
//! recipients of 64 KiB − 1000 B each leave as 101 to-device EDUs over several transactions, every one within the limits.

use std::collections::BTreeMap;

use fedsend_core::{Config, FederationSender, Input, Output, Recovered, ServerName, Timestamp, TransactionResult};
use serde_json::{Value, json};

#[test]
fn a_hundred_and_one_large_messages_split_across_transactions() {
    let now = Timestamp(1_000_000);
    let mut sender =
        FederationSender::new(Config::new(ServerName::parse("test").unwrap()), Recovered::default()).unwrap();
    let body = "a".repeat(65_536 - 1000);
    let messages: BTreeMap<String, BTreeMap<String, Value>> = (0..101)
        .map(|i| (format!("@user{i}:secondserver"), BTreeMap::from([(String::from("D"), json!({ "x": body }))])))
        .collect();
    let input = Input::ToDevice {
        sender: "@alice:test".into(),
        message_type: "m.test".into(),
        message_id: Some("big".into()),
        messages,
    };
    let mut transactions = 0;
    let mut edus = 0;
    let mut pending = vec![input];
    while let Some(input) = pending.pop() {
        sender.handle_input(now, input).unwrap();
        while let Some(output) = sender.poll_output() {
            match output {
                Output::Persist { request, .. } => pending.push(Input::Persisted { request }),
                Output::SendTransaction(txn) => {
                    transactions += 1;
                    let parsed: Value = serde_json::from_str(&txn.body).unwrap();
                    let count = parsed["edus"].as_array().map_or(0, Vec::len);
                    assert!(count <= 100, "{count} EDUs in one transaction");
                    assert!(txn.body.len() as u64 <= sender.config().transaction_bytes_max);
                    edus += count;
                    let result = TransactionResult::Ok { pdu_errors: BTreeMap::new() };
                    pending.push(Input::TransactionDone { request: txn.request, result });
                }
                _ => {}
            }
        }
    }
    assert!(transactions >= 2, "{transactions} transactions");
    assert_eq!(edus, 101);
}
