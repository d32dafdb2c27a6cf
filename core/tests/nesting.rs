//! Every value the machine accepts crosses every JSON boundary after it: the input that
//! carries it, the outputs a host decodes (persisted rows included), the transaction body.
//! Deeper values are refused as commands and skipped as storage answers, and never stop
//! anything else. Driven through the JSON machine, as the wasm engine and the service are.

use fedsend_core::nesting::{DOCUMENT_DEPTH_MAX, VALUE_DEPTH_MAX};
use fedsend_core::wire::JsonSender;
use fedsend_core::{Config, Output};
use serde_json::{Value, json};

mod common;

const NOW_MS: u64 = 1_000_000;

/// `[[…[1]…]]` with `depth` levels.
fn nested(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = Value::Array(vec![value]);
    }
    value
}

/// A JSON machine with every output decoded the way a host decodes it.
struct Host {
    machine: JsonSender,
    /// Bodies of the transactions sent, parsed.
    bodies: Vec<Value>,
    /// `event` outputs.
    events: Vec<Value>,
    /// The first fetch, answered by the test.
    fetch: Option<u64>,
}

impl Host {
    fn new() -> Self {
        let config = serde_json::to_string(&Config::new(common::name("test"))).unwrap();
        let machine = JsonSender::new(&config, "{}").unwrap();
        let mut host = Self { machine, bodies: Vec::new(), events: Vec::new(), fetch: None };
        host.run();
        host
    }

    fn input(&mut self, input: &Value) -> Result<(), String> {
        let result = self.machine.handle_input(NOW_MS, &input.to_string());
        self.run();
        result
    }

    /// Performs outputs until none is left: persists succeed, transactions are delivered.
    fn run(&mut self) {
        while let Some(text) = self.machine.poll_output() {
            let output: Output = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("a host cannot decode this output ({e}): {:.200}", text));
            let answer = match output {
                Output::Persist { request, .. } => json!({"type": "persisted", "request": request}),
                Output::SendTransaction(txn) => {
                    let body: Value = serde_json::from_str(&txn.body)
                        .unwrap_or_else(|e| panic!("a signer cannot parse this body ({e})"));
                    self.bodies.push(body);
                    json!({"type": "transaction_done", "request": txn.request, "result": {"outcome": "ok"}})
                }
                Output::FetchEvents { request, .. } => {
                    self.fetch = Some(request.0);
                    continue;
                }
                Output::Event { event } => {
                    self.events.push(serde_json::to_value(event).unwrap());
                    continue;
                }
                _ => continue,
            };
            self.machine.handle_input(NOW_MS, &answer.to_string()).unwrap();
        }
    }

    fn delivered_pdu_ids(&self) -> Vec<String> {
        self.bodies
            .iter()
            .flat_map(|b| b["pdus"].as_array().cloned().unwrap_or_default())
            .map(|p| p["event_id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn delivered_edu_types(&self) -> Vec<String> {
        self.bodies
            .iter()
            .flat_map(|b| b["edus"].as_array().cloned().unwrap_or_default())
            .map(|e| e["edu_type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// Every command that carries a homeserver-supplied value, with `value` in it.
fn commands_carrying(value: &Value) -> Vec<(&'static str, Value)> {
    vec![
        ("m.test", json!({"type": "edu", "destination": "remote", "edu_type": "m.test", "content": {"v": value}})),
        (
            "m.direct_to_device",
            json!({"type": "to_device", "sender": "@alice:test", "message_type": "m.test", "message_id": "m1",
                   "messages": {"@bob:remote": {"DEV": {"v": value}}}}),
        ),
        (
            "m.receipt",
            json!({"type": "receipt", "hosts": ["remote"],
                   "receipt": {"room_id": "!r:test", "receipt_type": "m.read", "user_id": "@alice:test",
                               "event_id": "$e", "data": {"ts": 1, "v": value}}}),
        ),
        (
            "m.device_list_update",
            json!({"type": "device_list_update", "user_id": "@alice:test", "device_id": "D", "stream_id": 5,
                   "keys": {"v": value}, "destinations": ["remote"]}),
        ),
        (
            "m.signing_key_update",
            json!({"type": "signing_key_update", "user_id": "@alice:test", "stream_id": 6,
                   "master_key": {"v": value}, "destinations": ["remote"]}),
        ),
    ]
}

#[test]
fn commands_at_the_limit_cross_every_boundary_and_are_delivered() {
    // Each command wraps the value in one object, so it reaches the limit exactly.
    for (edu_type, command) in commands_carrying(&nested(VALUE_DEPTH_MAX - 1)) {
        let mut host = Host::new();
        host.input(&command).unwrap_or_else(|e| panic!("{edu_type} at the limit refused: {e}"));
        // Staggered kinds leave on the next timeouts.
        for step in 1..=40 {
            host.machine.handle_input(NOW_MS + step * 1_000, r#"{"type":"timeout"}"#).unwrap();
            host.run();
        }
        assert!(host.delivered_edu_types().iter().any(|t| t == edu_type), "{edu_type} was not delivered");
    }
}

#[test]
fn deeper_commands_are_refused_at_every_depth_the_parser_accepts() {
    for depth in VALUE_DEPTH_MAX..=DOCUMENT_DEPTH_MAX {
        for (edu_type, command) in commands_carrying(&nested(depth)) {
            let mut host = Host::new();
            let text = command.to_string();
            if serde_json::from_str::<Value>(&text).is_err() {
                continue; // no host could have parsed the submission either
            }
            let error = host.input(&command).expect_err(&format!("{edu_type} nested {depth} accepted"));
            assert!(error.contains("levels of arrays and objects"), "{edu_type} at {depth}: {error}");
            assert!(host.bodies.is_empty(), "a refused command sends nothing");
        }
    }
}

#[test]
fn a_deep_event_is_skipped_and_the_events_after_it_are_sent() {
    let event = |id: &str, stream: u64, content: Value| {
        json!({"event_id": id, "room_id": "!r:test", "stream_ordering": stream, "sender": "@alice:test",
               "hosts": ["remote"], "pdu": {"event_id": id, "room_id": "!r:test", "content": content}})
    };
    // The answer wraps the event in four levels; deeper answers cannot be parsed by anybody.
    for depth in (VALUE_DEPTH_MAX - 1)..=(DOCUMENT_DEPTH_MAX - 6) {
        let mut host = Host::new();
        host.input(&json!({"type": "new_events", "up_to": 2})).unwrap();
        let request = host.fetch.take().expect("a fetch");
        let answer = json!({"type": "events_fetched", "request": request,
                            "events": [event("$deep", 1, nested(depth)), event("$next", 2, json!({}))]});
        host.input(&answer).unwrap_or_else(|e| panic!("depth {depth}: the answer was refused: {e}"));
        let sent = host.delivered_pdu_ids();
        assert!(sent.contains(&"$next".to_owned()), "depth {depth}: the next event was not sent");
        let deep_sent = sent.contains(&"$deep".to_owned());
        // The PDU object is one level around the nested content.
        assert_eq!(deep_sent, depth + 1 <= VALUE_DEPTH_MAX, "depth {depth}");
        if !deep_sent {
            assert!(
                host.events.iter().any(|e| e["event"] == "event_skipped" && e["event_id"] == "$deep"),
                "depth {depth}: the skip is not reported: {:?}",
                host.events
            );
        }
    }
}
