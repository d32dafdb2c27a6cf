//! Synapse's `test_send_event_sharded` and `test_send_typing_sharded`: with two sender
//! instances, every destination is served by exactly one of them, for events and for typing EDUs alike.

use std::collections::BTreeMap;

use fedsend_sim::{NativeEngine, run_scenario};

fn destinations_sent_to(file: &str, edus_only: bool) -> Vec<String> {
    let path = format!("{}/../tests/scenarios/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("scenario file");
    let mut sent = Vec::new();
    run_scenario(&text, &mut NativeEngine::default(), &mut |line| {
        let value: serde_json::Value = serde_json::from_str(line).expect("trace lines are JSON");
        let has_edus = value["edus"].as_array().is_some_and(|e| !e.is_empty());
        if value["kind"] == "send" && (!edus_only || has_edus) {
            sent.push(value["dest"].as_str().expect("dest").to_string());
        }
    })
    .expect("scenario runs");
    sent
}

#[test]
fn two_instances_split_the_destinations_between_them() {
    check_split("t-s2-sharded", false);
}

#[test]
fn two_instances_split_typing_between_them() {
    check_split("t-s3-typing-sharded", true);
}

fn check_split(prefix: &str, edus_only: bool) {
    let mut owners: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for instance in ["sender1", "sender2"] {
        let file = format!("{prefix}-{instance}.json");
        let mut seen = destinations_sent_to(&file, edus_only);
        assert!(!seen.is_empty(), "{instance} sent nothing: both instances must be used");
        seen.dedup();
        for dest in seen {
            owners.entry(dest).or_default().push(instance);
        }
    }
    assert_eq!(owners.len(), 20, "every one of the 20 servers gets its event: {owners:?}");
    for (dest, by) in &owners {
        assert_eq!(by.len(), 1, "{dest} was sent to by {by:?}");
    }
}
