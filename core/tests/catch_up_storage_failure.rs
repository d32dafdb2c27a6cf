//! Catch-up never moves the last successful position past a `destination_rooms` row that
//! storage does not hold yet. Two ways the simulator found it could:
//! - a catch-up query that failed was re-issued at once, while a failed write still held rows
//!   for the destination; storage answered without them, the scan sent a later room, and the
//!   missing row's room was never sent (seed 28818);
//! - after a restart, a catch-up query went out in the same input as the fan-out whose rows
//!   were not yet emitted, and storage answered with a later room's row written before the
//!   crash (seed 78704).
//! Catch-up now looks only as far as storage holds every row fanned out.

use std::collections::BTreeMap;

use fedsend_core::{
    CatchUpRoom, Changes, Config, DestinationState, Extremity, FederationSender, Input, Output, PduInfo, Timestamp,
    TransactionResult,
};
use fedsend_driver::MemoryStore;
use serde_json::Value;

mod common;

use common::{name, pdu};

const NOW: Timestamp = Timestamp(1_000_000);

/// The homeserver's events beside the reference store of the sender-owned tables.
struct Store {
    events: Vec<PduInfo>,
    tables: MemoryStore,
}

impl Store {
    /// Two events for `remote`, in rooms A and B, and the state of a sender that stopped
    /// before fanning either out (incarnation 1, nothing delivered).
    fn two_rooms() -> Self {
        let mut tables = MemoryStore::default();
        tables.apply(&Changes {
            incarnation: Some(1),
            events_out_pos: Some(0),
            destinations: vec![DestinationState {
                destination: name("remote"),
                last_successful_stream_ordering: Some(0),
                ..DestinationState::default()
            }],
            ..Changes::default()
        });
        let events = vec![pdu("$a", "!a:test", 1, &["remote"]), pdu("$b", "!b:test", 2, &["remote"])];
        Self { events, tables }
    }

    fn start_sender(&self) -> FederationSender {
        FederationSender::new(Config::new(name("test")), self.tables.recovered()).unwrap()
    }

    fn apply(&mut self, changes: &Changes) {
        self.tables.apply(changes);
    }

    /// `LoadCatchUp`: the rows in (`after`, `up_to`], each room's only event its extremity.
    fn catch_up(&self, destination: &str, after: u64, up_to: u64) -> Vec<CatchUpRoom> {
        let rows = self.tables.catch_up_rows(&name(destination), after, up_to, u32::MAX);
        rows.into_iter()
            .map(|(room_id, stream)| {
                let event = &self.events[stream as usize - 1];
                let extremity = Extremity {
                    event_id: event.event_id.clone(),
                    stream_ordering: stream,
                    visible: true,
                    pdu: event.pdu.clone(),
                };
                CatchUpRoom {
                    room_id,
                    stream_ordering: stream,
                    event_id: event.event_id.clone(),
                    pdu: event.pdu.clone(),
                    partial_state: false,
                    extremities: vec![extremity],
                    undeliverable: None,
                }
            })
            .collect()
    }

    /// `LoadOutstanding`: destinations with a row above their last successful position.
    fn outstanding(&self) -> Vec<fedsend_core::ServerName> {
        self.tables.outstanding(None, u32::MAX)
    }
}

fn drain(sender: &mut FederationSender) -> Vec<Output> {
    std::iter::from_fn(|| sender.poll_output()).collect()
}

#[test]
fn a_failed_catch_up_query_waits_for_the_failed_write_holding_its_rows() {
    let mut store = Store::two_rooms();
    let mut sender = store.start_sender();

    // Start-up: the incarnation lands; the fetch is answered with the first event only.
    let mut fetch = None;
    for output in drain(&mut sender) {
        match output {
            Output::Persist { request, .. } => sender.handle_input(NOW, Input::Persisted { request }).unwrap(),
            Output::FetchEvents { request, .. } => fetch = Some(request),
            _ => {}
        }
    }
    let events = vec![store.events[0].clone()];
    sender.handle_input(NOW, Input::EventsFetched { request: fetch.unwrap(), events }).unwrap();

    // The restarted destination looks in storage, and the write holding its row for room A
    // is emitted after that query. Both fail.
    let mut failed = Vec::new();
    for output in drain(&mut sender) {
        match output {
            Output::LoadCatchUp { request, .. } => failed.push(request),
            Output::Persist { request, changes } => {
                assert!(changes.destination_rooms.iter().any(|r| &*r.room_id == "!a:test"), "{changes:?}");
                failed.push(request);
            }
            _ => {}
        }
    }
    assert_eq!(failed.len(), 2, "a catch-up query, then the write of room A's row");
    for request in failed {
        sender.handle_input(NOW, Input::StorageFailed { request, error: "injected".into() }).unwrap();
    }

    // A second event, in room B, is fanned out and its row lands.
    sender.handle_input(NOW, Input::NewEvents { up_to: 2 }).unwrap();
    let fetch = drain(&mut sender).into_iter().find_map(|output| match output {
        Output::FetchEvents { request, .. } => Some(request),
        _ => None,
    });
    let events = vec![store.events[1].clone()];
    sender.handle_input(NOW, Input::EventsFetched { request: fetch.unwrap(), events }).unwrap();
    for output in drain(&mut sender) {
        if let Output::Persist { request, changes } = output {
            store.apply(&changes);
            sender.handle_input(NOW, Input::Persisted { request }).unwrap();
        }
    }

    // From here storage works.
    let sent = run_until_quiet(&mut sender, &mut store);
    assert!(sent.contains(&String::from("$b")), "room B is caught up: {sent:?}");
    assert!(sent.contains(&String::from("$a")), "room A is caught up too, once its row lands: {sent:?}");
}

#[test]
fn catch_up_after_a_restart_waits_for_the_rows_of_the_events_fanned_out_again() {
    let mut store = Store::two_rooms();
    // Before the crash, the row for room B landed but the stored events position did not.
    store.tables.destination_rooms.insert((name("remote"), "!b:test".into()), 2);
    let mut sender = store.start_sender();
    let sent = run_until_quiet(&mut sender, &mut store);
    assert!(sent.contains(&String::from("$b")), "room B is caught up: {sent:?}");
    assert!(sent.contains(&String::from("$a")), "room A's row was in the batch after the query: {sent:?}");
}

/// Performs every output in the order it was emitted, so each query sees exactly the writes
/// emitted before it (storage and remote work), until nothing is left to do. Returns the ids
/// of the PDUs sent.
fn run_until_quiet(sender: &mut FederationSender, store: &mut Store) -> Vec<String> {
    let mut sent = Vec::new();
    let mut now = NOW;
    let until = Timestamp(NOW.0 + 600_000);
    loop {
        let mut answers = Vec::new();
        for output in drain(sender) {
            match output {
                Output::Persist { request, changes } => {
                    store.apply(&changes);
                    answers.push(Input::Persisted { request });
                }
                Output::LoadCatchUp { request, destination, after, up_to, .. } => {
                    let rooms = store.catch_up(destination.as_str(), after, up_to);
                    answers.push(Input::CatchUpLoaded { request, rooms });
                }
                Output::LoadOutstanding { request, .. } => {
                    answers.push(Input::OutstandingLoaded { request, destinations: store.outstanding() });
                }
                Output::FetchEvents { request, after, .. } => {
                    let events = store.events.iter().skip(after as usize).cloned().collect();
                    answers.push(Input::EventsFetched { request, events });
                }
                Output::SendTransaction(txn) => {
                    let body: Value = serde_json::from_str(&txn.body).unwrap();
                    for pdu in body["pdus"].as_array().cloned().unwrap_or_default() {
                        sent.push(String::from(pdu["event_id"].as_str().unwrap()));
                    }
                    let result = TransactionResult::Ok { pdu_errors: BTreeMap::new() };
                    answers.push(Input::TransactionDone { request: txn.request, result });
                }
                _ => {}
            }
        }
        if !answers.is_empty() {
            for input in answers {
                sender.handle_input(now, input).unwrap();
            }
            continue;
        }
        match sender.poll_timeout() {
            Some(deadline) if deadline <= until => {
                now = deadline.max(now);
                sender.handle_input(now, Input::Timeout).unwrap();
            }
            _ => break,
        }
    }
    sent
}
