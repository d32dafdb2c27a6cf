//! Device-list updates at the core's boundary: refusals, `prev_id` chains across a failed
//! transaction and a restart, stale updates, and the durable rows behind them.

mod common;

use std::collections::BTreeMap;

use common::name;
use fedsend_core::{
    Config, DeviceListPosition, FederationSender, Input, InputError, Output, Recovered, Timestamp, TransactionResult,
};
use fedsend_driver::MemoryStore;
use serde_json::{Value, json};

/// A host with the reference store: applies every batch, answers transactions with `answer`.
struct Host {
    sender: FederationSender,
    now: Timestamp,
    store: MemoryStore,
    answer: TransactionResult,
    /// Every EDU sent, in order, with the transaction id.
    sent: Vec<(String, Value)>,
}

impl Host {
    fn start(store: MemoryStore) -> Self {
        let sender = FederationSender::new(Config::new(name("test")), store.recovered()).unwrap();
        let mut host = Self {
            sender,
            now: Timestamp(1_000_000),
            store,
            answer: TransactionResult::Ok { pdu_errors: BTreeMap::new() },
            sent: Vec::new(),
        };
        host.input(Input::Timeout).unwrap();
        host
    }

    fn restart(self) -> Self {
        let mut host = Self::start(self.store);
        host.now = self.now;
        host
    }

    /// What a restart would load.
    fn stored(&self) -> Recovered {
        self.store.recovered()
    }

    fn input(&mut self, input: Input) -> Result<(), InputError> {
        let mut pending = vec![input];
        let mut first = Ok(());
        while let Some(input) = pending.pop() {
            let result = self.sender.handle_input(self.now, input);
            if first.is_ok() {
                first = result;
            }
            while let Some(output) = self.sender.poll_output() {
                match output {
                    Output::Persist { request, changes } => {
                        self.store.apply(&changes);
                        pending.push(Input::Persisted { request });
                    }
                    Output::SendTransaction(txn) => {
                        // A sender that never stops sending would hang the test instead.
                        assert!(self.sent.len() < 10_000, "the sender sends without end");
                        let body: Value = serde_json::from_str(&txn.body).unwrap();
                        for edu in body["edus"].as_array().unwrap() {
                            self.sent.push((txn.txn_id.clone(), edu.clone()));
                        }
                        pending.push(Input::TransactionDone { request: txn.request, result: self.answer.clone() });
                    }
                    Output::LoadOutstanding { request, .. } => {
                        pending.push(Input::OutstandingLoaded { request, destinations: Vec::new() })
                    }
                    Output::LoadCatchUp { request, .. } => {
                        pending.push(Input::CatchUpLoaded { request, rooms: vec![] })
                    }
                    Output::FetchEvents { request, .. } => {
                        pending.push(Input::EventsFetched { request, events: vec![] })
                    }
                    _ => {}
                }
            }
        }
        first
    }

    fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_ms(ms);
        self.input(Input::Timeout).unwrap();
    }

    fn device(&mut self, device: &str, stream_id: u64) -> Result<(), InputError> {
        self.input(Input::DeviceListUpdate {
            user_id: "@alice:test".into(),
            device_id: device.into(),
            stream_id,
            deleted: false,
            keys: Some(json!({ "device_id": device })),
            device_display_name: None,
            destinations: vec![name("host2")],
        })
    }

    /// (device, stream id, prev_id) of every `m.device_list_update` sent so far.
    fn device_edus(&self) -> Vec<(String, u64, Vec<u64>)> {
        self.sent
            .iter()
            .filter(|(_, edu)| edu["edu_type"] == "m.device_list_update")
            .map(|(_, edu)| {
                let c = &edu["content"];
                let prev = c["prev_id"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
                (c["device_id"].as_str().unwrap().into(), c["stream_id"].as_u64().unwrap(), prev)
            })
            .collect()
    }
}

#[test]
fn device_updates_for_remote_users_and_empty_signing_keys_are_refused() {
    let mut host = Host::start(MemoryStore::default());
    let remote = host.input(Input::DeviceListUpdate {
        user_id: "@bob:host2".into(),
        device_id: "D1".into(),
        stream_id: 1,
        deleted: false,
        keys: None,
        device_display_name: None,
        destinations: vec![name("host3")],
    });
    assert!(matches!(remote, Err(InputError::Refused(ref why)) if why.contains("not a local user")), "{remote:?}");
    let empty = host.input(Input::SigningKeyUpdate {
        user_id: "@alice:test".into(),
        stream_id: 2,
        master_key: None,
        self_signing_key: None,
        destinations: vec![name("host2")],
    });
    assert!(matches!(empty, Err(InputError::Refused(_))), "{empty:?}");
    assert!(host.sent.is_empty(), "nothing may be sent for refused inputs: {:?}", host.sent);
    assert!(host.stored().device_list_pokes.is_empty());
}

#[test]
fn chains_survive_a_failed_transaction_and_a_restart() {
    let mut host = Host::start(MemoryStore::default());
    host.device("D1", 1).unwrap();
    assert_eq!(host.device_edus(), vec![("D1".into(), 1, vec![])]);
    assert_eq!(
        host.stored().device_list_positions,
        vec![DeviceListPosition { destination: name("host2"), user_id: "@alice:test".into(), stream_id: Some(1) }]
    );
    assert!(host.stored().device_list_pokes.is_empty(), "a delivered poke leaves storage");

    // host2 goes down: D2 is frozen into a failing transaction, its poke stays durable.
    host.answer = TransactionResult::Unreachable;
    host.device("D2", 2).unwrap();
    // Device lists are staggered: the wake-up queue still sleeps after waking host2 for D1.
    host.advance(20);
    assert_eq!(host.device_edus().last(), Some(&("D2".into(), 2, vec![1])));
    assert_eq!(host.stored().device_list_pokes.len(), 1);

    // The sender dies; host2 comes back; D3 is announced after the restart.
    let mut host = host.restart();
    host.device("D3", 3).unwrap();
    host.input(Input::RemoteUp { destination: name("host2") }).unwrap();
    host.advance(60_000);
    assert_eq!(host.device_edus(), vec![("D2".into(), 2, vec![1]), ("D3".into(), 3, vec![2])]);
    assert!(host.stored().device_list_pokes.is_empty());
    assert_eq!(host.stored().device_list_positions[0].stream_id, Some(3));
}

#[test]
fn stale_and_repeated_updates_change_nothing() {
    let mut host = Host::start(MemoryStore::default());
    host.device("D1", 5).unwrap();
    let sent = host.sent.len();
    // The same stream id again (a homeserver re-feeding after its own restart), then an older one.
    host.device("D1", 5).unwrap();
    host.device("D1", 4).unwrap();
    host.advance(60_000);
    assert_eq!(host.sent.len(), sent, "{:?}", host.sent);
    assert!(host.stored().device_list_pokes.is_empty());
}

#[test]
fn collapsed_changes_and_signing_key_pairs() {
    let mut host = Host::start(MemoryStore::default());
    host.answer = TransactionResult::Unreachable;
    host.device("D1", 1).unwrap();
    // Everything below waits behind the failing transaction of D1@1; D1 changes twice more.
    host.device("D1", 2).unwrap();
    host.device("D1", 3).unwrap();
    host.input(Input::SigningKeyUpdate {
        user_id: "@alice:test".into(),
        stream_id: 4,
        master_key: Some(json!({ "keys": { "ed25519:M": "M" } })),
        self_signing_key: None,
        destinations: vec![name("host2")],
    })
    .unwrap();
    assert_eq!(host.stored().device_list_pokes.len(), 2, "one row per (destination, user, device)");
    host.answer = TransactionResult::Ok { pdu_errors: BTreeMap::new() };
    host.input(Input::RemoteUp { destination: name("host2") }).unwrap();
    host.advance(60_000);
    let kinds: Vec<&str> = host.sent.iter().map(|(_, e)| e["edu_type"].as_str().unwrap()).collect();
    let (first_txn, _) = &host.sent[0];
    let delivered: Vec<&str> =
        host.sent.iter().filter(|(txn, _)| txn != first_txn).map(|(_, e)| e["edu_type"].as_str().unwrap()).collect();
    assert_eq!(
        delivered,
        ["m.device_list_update", "m.signing_key_update", "org.matrix.signing_key_update"],
        "all sent: {kinds:?}"
    );
    // D1@2 was collapsed into D1@3, which chains to D1@1 from the frozen transaction.
    assert_eq!(host.device_edus().last(), Some(&("D1".into(), 3, vec![1])));
    assert!(host.stored().device_list_pokes.is_empty());
}

#[test]
fn a_rejected_signing_key_pair_is_given_up_whole() {
    let mut host = Host::start(MemoryStore::default());
    host.answer = TransactionResult::Status { status: 400, retry_after_ms: None, errcode: None };
    host.input(Input::SigningKeyUpdate {
        user_id: "@alice:test".into(),
        stream_id: 1,
        master_key: Some(json!({ "keys": { "ed25519:M": "M" } })),
        self_signing_key: None,
        destinations: vec![name("host2")],
    })
    .unwrap();
    // The first rejection is retried after a pause (poison_rejections_max = 2), then the pair,
    // alone in its transaction, is given up instead of being split forever.
    for _ in 0..5 {
        host.advance(60_000);
    }
    assert!(host.sent.len() <= 8, "the pair keeps being sent: {} EDUs", host.sent.len());
    assert!(host.stored().device_list_pokes.is_empty(), "the given-up poke leaves storage");
    let sent_before = host.sent.len();
    host.advance(600_000);
    assert_eq!(host.sent.len(), sent_before, "nothing more is sent once it is given up");
}
