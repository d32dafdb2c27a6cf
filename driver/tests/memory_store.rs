//! The reference store's queries against the plain reading of the contract, on many generated
//! tables: paging through `outstanding` visits exactly the owed destinations, in order.

use fedsend_core::{DestinationState, OutboxRow, Prng, ServerName};
use fedsend_driver::MemoryStore;
use serde_json::json;

fn name(i: u64) -> ServerName {
    ServerName::parse(&format!("d{i}.test")).unwrap()
}

/// Destinations with a row above their last successful position or an outbox row, sorted.
fn owed_by_definition(store: &MemoryStore) -> Vec<ServerName> {
    let mut names: Vec<ServerName> = store.to_device_outbox.keys().map(|(d, _)| d.clone()).collect();
    for ((destination, _), stream) in &store.destination_rooms {
        let delivered =
            store.destinations.get(destination).and_then(|d| d.last_successful_stream_ordering).unwrap_or(0);
        if *stream > delivered {
            names.push(destination.clone());
        }
    }
    names.sort();
    names.dedup();
    names
}

fn below(rng: &mut Prng, bound: u64) -> u64 {
    rng.range_inclusive(0, bound - 1)
}

#[test]
fn paging_through_outstanding_visits_every_owed_destination_once_in_order() {
    for seed in 1..200 {
        let mut rng = Prng::from_seed(seed);
        let mut store = MemoryStore::default();
        for _ in 0..below(&mut rng, 60) {
            let destination = name(below(&mut rng, 25));
            let room = format!("!r{}:test", below(&mut rng, 4));
            store.destination_rooms.insert((destination, room), 1 + below(&mut rng, 10));
        }
        for i in 0..below(&mut rng, 25) {
            let destination = name(i);
            let delivered = if below(&mut rng, 3) == 0 { None } else { Some(below(&mut rng, 11)) };
            let state = DestinationState {
                destination: destination.clone(),
                last_successful_stream_ordering: delivered,
                ..DestinationState::default()
            };
            store.destinations.insert(destination, state);
        }
        for outbox_id in 0..below(&mut rng, 8) {
            let destination = name(below(&mut rng, 25));
            let row = OutboxRow { destination: destination.clone(), outbox_id, queued_ts: 0, edu: json!({}) };
            store.to_device_outbox.insert((destination, outbox_id), row);
        }
        let want = owed_by_definition(&store);
        let limit = 1 + below(&mut rng, 5) as u32;
        let mut got = Vec::new();
        let mut after: Option<ServerName> = None;
        loop {
            let page = store.outstanding(after.as_ref(), limit);
            assert!(page.len() <= limit as usize, "seed {seed}: a page longer than its limit");
            if page.is_empty() {
                break;
            }
            after = page.last().cloned();
            got.extend(page);
        }
        assert_eq!(got, want, "seed {seed}, limit {limit}");
    }
}
