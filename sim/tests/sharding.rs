//! T-S2: with two sender instances, every destination is served by exactly one of them.

use std::collections::BTreeMap;

use fedsend_sim::{NativeEngine, run_scenario};

fn destinations_sent_to(file: &str) -> Vec<String> {
    let path = format!("{}/../tests/scenarios/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("scenario file");
    let mut sent = Vec::new();
    run_scenario(&text, &mut NativeEngine::default(), &mut |line| {
        let value: serde_json::Value = serde_json::from_str(line).expect("trace lines are JSON");
        if value["kind"] == "send" {
            sent.push(value["dest"].as_str().expect("dest").to_string());
        }
    })
    .expect("scenario runs");
    sent
}

#[test]
fn two_instances_split_the_destinations_between_them() {
    let mut owners: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (instance, file) in [("sender1", "t-s2-sharded-sender1.json"), ("sender2", "t-s2-sharded-sender2.json")] {
        let mut seen = destinations_sent_to(file);
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
