//! The reference store's queries against the plain reading of the contract, on many generated
//! tables: paging through `outstanding` visits exactly the owed destinations, in order.

use fedsend_core::{
    Changes, DestinationRoom, DestinationState, DeviceListPoke, DeviceListPokeKey, DeviceListPosition, OutboxKey,
    OutboxRow, Prng, ServerName,
};
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

/// A batch of every kind of row, over few destinations, users and devices so that rows meet.
fn batch(rng: &mut Prng) -> Changes {
    let user = |rng: &mut Prng| format!("@u{}:home.test", below(rng, 2));
    let device = |rng: &mut Prng| (below(rng, 3) > 0).then(|| format!("D{}", below(rng, 2)));
    let mut changes = Changes {
        incarnation: (below(rng, 3) == 0).then(|| below(rng, 5)),
        events_out_pos: (below(rng, 2) == 0).then(|| below(rng, 20)),
        ..Changes::default()
    };
    for _ in 0..below(rng, 4) {
        let destination = name(below(rng, 5));
        let room_id = format!("!r{}:test", below(rng, 3));
        changes.destination_rooms.push(DestinationRoom {
            destination,
            room_id: room_id.into(),
            stream_ordering: below(rng, 20),
        });
    }
    for _ in 0..below(rng, 3) {
        let delivered = (below(rng, 2) == 0).then(|| below(rng, 20));
        let destination = name(below(rng, 5));
        changes.destinations.push(DestinationState {
            destination,
            retry_interval: below(rng, 3),
            last_successful_stream_ordering: delivered,
            ..DestinationState::default()
        });
    }
    for _ in 0..below(rng, 3) {
        let destination = name(below(rng, 5));
        let edu = json!({ "n": below(rng, 9) });
        changes.to_device_outbox.push(OutboxRow { destination, outbox_id: below(rng, 4), queued_ts: 0, edu });
    }
    for _ in 0..below(rng, 2) {
        changes.to_device_deleted.push(OutboxKey { destination: name(below(rng, 5)), outbox_id: below(rng, 4) });
    }
    for _ in 0..below(rng, 4) {
        let (user_id, device_id, stream_id) = (user(rng), device(rng), below(rng, 6));
        let content = json!({ "stream_id": stream_id });
        let destination = name(below(rng, 5));
        changes.device_list_pokes.push(DeviceListPoke {
            destination,
            user_id,
            device_id,
            stream_id,
            queued_ts: 0,
            content,
        });
    }
    for _ in 0..below(rng, 3) {
        let (user_id, device_id, stream_id) = (user(rng), device(rng), below(rng, 6));
        let destination = name(below(rng, 5));
        changes.device_list_pokes_deleted.push(DeviceListPokeKey { destination, user_id, device_id, stream_id });
    }
    for _ in 0..below(rng, 3) {
        let stream_id = (below(rng, 3) > 0).then(|| below(rng, 6));
        let destination = name(below(rng, 5));
        changes.device_list_positions.push(DeviceListPosition { destination, user_id: user(rng), stream_id });
    }
    changes
}

#[test]
fn a_batch_applied_owned_leaves_the_tables_it_leaves_applied_by_reference() {
    for seed in 1..300 {
        let mut rng = Prng::from_seed(seed);
        let (mut by_ref, mut owned) = (MemoryStore::default(), MemoryStore::default());
        for _ in 0..below(&mut rng, 12) {
            let changes = batch(&mut rng);
            by_ref.apply(&changes);
            owned.apply_owned(changes);
            assert_eq!(owned, by_ref, "seed {seed}");
        }
    }
}
