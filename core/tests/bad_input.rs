//! Bad input gets an error or a logged refusal, never a panic, and the machine keeps serving.

use std::sync::Arc;

use fedsend_core::wire::JsonSender;
use fedsend_core::{
    Event, FederationSender, Input, InputError, Output, Prng, RequestId, ServerName, Timestamp, TransactionResult,
};
mod common;

use common::{name, pdu};

const NOW: Timestamp = Timestamp(1_000_000);

fn started() -> (FederationSender, RequestId) {
    common::started(NOW)
}

fn drain(sender: &mut FederationSender) -> Vec<Output> {
    let mut outputs = Vec::new();
    while let Some(output) = sender.poll_output() {
        outputs.push(output);
    }
    outputs
}

#[test]
fn unknown_and_mismatched_requests_are_refused_and_change_nothing() {
    let (mut sender, fetch) = started();
    assert_eq!(
        sender.handle_input(NOW, Input::Persisted { request: RequestId(999) }),
        Err(InputError::UnknownRequest(RequestId(999)))
    );
    let wrong = Input::TransactionDone { request: fetch, result: TransactionResult::Unreachable };
    assert!(matches!(sender.handle_input(NOW, wrong), Err(InputError::WrongCompletion { .. })));
    // The fetch is still outstanding and answerable.
    let events = vec![pdu("$1", "!r:test", 1, &["host2"])];
    sender.handle_input(NOW, Input::EventsFetched { request: fetch, events }).unwrap();
    assert!(
        drain(&mut sender).iter().any(|o| matches!(o, Output::SendTransaction(t) if t.destination == name("host2")))
    );
}

#[test]
fn events_without_a_room_are_skipped_and_the_rest_is_sent() {
    let (mut sender, fetch) = started();
    // A room version 12 id has no server part and is routed like any other.
    let events = vec![
        pdu("$bad", "", 1, &["host2"]),
        pdu("$good", "!r:test", 2, &["host3"]),
        pdu("$v12", "!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM", 3, &["host4"]),
    ];
    sender.handle_input(NOW, Input::EventsFetched { request: fetch, events }).unwrap();
    let outputs = drain(&mut sender);
    assert!(
        outputs
            .iter()
            .any(|o| matches!(o, Output::Event { event: Event::EventSkipped { event_id, .. } } if event_id == "$bad"))
    );
    assert!(
        outputs.iter().any(|o| matches!(o, Output::SendTransaction(t) if t.pdu_ids == [Arc::<str>::from("$good")]))
    );
    assert!(outputs.iter().any(|o| matches!(o, Output::SendTransaction(t) if t.pdu_ids == [Arc::<str>::from("$v12")])));
    assert!(!outputs.iter().any(|o| matches!(o, Output::SendTransaction(t) if t.destination == name("host2"))));
}

#[test]
fn contradictory_storage_answers_are_refused_and_can_be_corrected() {
    let (mut sender, fetch) = started();
    let descending = vec![pdu("$2", "!r:test", 2, &["host2"]), pdu("$1", "!r:test", 1, &["host2"])];
    let refused = sender.handle_input(NOW, Input::EventsFetched { request: fetch, events: descending });
    assert!(matches!(refused, Err(InputError::InconsistentAnswer(_))), "{refused:?}");
    assert!(drain(&mut sender).is_empty(), "a refused input changes nothing");
    let ascending = vec![pdu("$1", "!r:test", 1, &["host2"]), pdu("$2", "!r:test", 2, &["host2"])];
    sender.handle_input(NOW, Input::EventsFetched { request: fetch, events: ascending }).unwrap();
    assert!(drain(&mut sender).iter().any(|o| matches!(o, Output::SendTransaction(_))));
}

#[test]
fn time_going_backwards_is_clamped_and_counted() {
    let (mut sender, _) = started();
    sender.handle_input(Timestamp(5_000_000), Input::Timeout).unwrap();
    sender.handle_input(Timestamp(4_000_000), Input::Timeout).unwrap();
    assert_eq!(sender.time_regressions(), 1);
}

#[test]
fn invalid_server_names_and_malformed_json_are_errors() {
    assert!(ServerName::parse("bad name").is_err());
    let mut sender = JsonSender::new(r#"{"server_name":"test"}"#, "{}").unwrap();
    let error = sender.handle_input(1, r#"{"type":"wake_destination","destination":"not a server"}"#).unwrap_err();
    assert!(error.contains("invalid server name"), "{error}");
    let error = sender.handle_input(1, r#"{"type":"no_such_input"}"#).unwrap_err();
    assert!(error.starts_with("malformed input"), "{error}");
    let error = sender.handle_input(1, "{").unwrap_err();
    assert!(error.starts_with("malformed input"), "{error}");
    assert!(
        JsonSender::new(r#"{"server_name":"test","retry_multiplier":0}"#, "{}")
            .unwrap_err()
            .contains("retry_multiplier")
    );
    assert!(JsonSender::new(r#"{"server_name":"test","bogus":1}"#, "{}").unwrap_err().contains("unknown field"));
    // Still serving.
    sender.handle_input(2, r#"{"type":"timeout"}"#).unwrap();
}

/// Mutated inputs — valid ones with bytes flipped, fields swapped, ids reused — never panic.
#[test]
fn ten_thousand_mangled_inputs_never_panic() {
    let valid = [
        r#"{"type":"new_events","up_to":5}"#,
        r#"{"type":"wake_destination","destination":"host2"}"#,
        r#"{"type":"remote_up","destination":"host2"}"#,
        r#"{"type":"persisted","request":1}"#,
        r#"{"type":"storage_failed","request":2,"error":"disk"}"#,
        r#"{"type":"transaction_done","request":3,"result":{"outcome":"status","status":429,"retry_after_ms":5}}"#,
        r#"{"type":"events_fetched","request":2,"events":[{"event_id":"$1","room_id":"!r:test","stream_ordering":1,"sender":"@a:test","hosts":["host2"],"pdu":{}}]}"#,
        r#"{"type":"catch_up_loaded","request":4,"rooms":[{"room_id":"!r:test","stream_ordering":1,"event_id":"$1","pdu":{},"extremities":[]}]}"#,
        r#"{"type":"outstanding_loaded","request":5,"destinations":["host2","host3"]}"#,
        r#"{"type":"set_destination_state","state":{"destination":"host2","retry_last_ts":1,"retry_interval":99999999999999}}"#,
        r#"{"type":"timeout"}"#,
    ];
    let mut prng = Prng::from_seed(11);
    let mut sender = JsonSender::new(r#"{"server_name":"test"}"#, "{}").unwrap();
    let mut now = 1u64;
    for round in 0..10_000u64 {
        let mut text = valid[prng.range_inclusive(0, valid.len() as u64 - 1) as usize].as_bytes().to_vec();
        for _ in 0..prng.range_inclusive(0, 3) {
            let at = prng.range_inclusive(0, text.len() as u64 - 1) as usize;
            text[at] = b"0123456789{}[]\":,ax-"[prng.range_inclusive(0, 19) as usize];
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        // Request ids 1..=40 so that some mangled completions hit real requests.
        let text = text.replace("\"request\":1", &format!("\"request\":{}", prng.range_inclusive(1, 40)));
        now += prng.range_inclusive(0, 100_000);
        if round % 97 == 0 {
            now = now.saturating_sub(50_000);
        }
        let _ = sender.handle_input(now, &text);
        while sender.poll_output().is_some() {}
        let _ = sender.poll_timeout();
    }
}
