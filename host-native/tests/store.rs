//! The store conformance suite: every case runs against the SQLite store and the in-memory
//! store, and a randomized differential run checks they answer every query identically.

use fedsend_core::{
    Changes, DestinationRoom, DestinationState, DeviceListPoke, DeviceListPokeKey, DeviceListPosition, OutboxKey,
    OutboxRow, PduInfo, ServerName,
};
use fedsend_host_native::serve::store::{MemoryStore, NewEvent, SqliteStore, Store, StoreError};
use serde_json::json;

fn name(s: &str) -> ServerName {
    ServerName::parse(s).unwrap()
}

fn sqlite() -> Box<dyn Store> {
    Box::new(SqliteStore::open_in_memory().unwrap())
}

fn memory() -> Box<dyn Store> {
    Box::new(MemoryStore::new())
}

/// Runs `case` on both stores.
fn both(case: impl Fn(&mut dyn Store)) {
    case(&mut *sqlite());
    case(&mut *memory());
}

fn event(id: &str, room: &str, sender: &str, depth: u64, prev: &[&str], hosts: &[&str]) -> NewEvent {
    let local = sender.ends_with(":us.example");
    NewEvent {
        info: PduInfo {
            event_id: id.into(),
            room_id: room.into(),
            stream_ordering: 0,
            sender: sender.into(),
            has_prev_events: !prev.is_empty(),
            hosts: hosts.iter().map(|h| name(h)).collect(),
            partial_state_servers: None,
            invitee_server: None,
            proactively_send: true,
            out_of_band: false,
            send_on_behalf_of: None,
            received_ts: Some(1),
            pdu: json!({"room_id": room, "sender": sender, "depth": depth, "prev_events": prev, "id": id}),
        },
        depth,
        prev_events: prev.iter().map(|s| (*s).to_owned()).collect(),
        local,
    }
}

fn room_row(dest: &str, room: &str, stream_ordering: u64) -> DestinationRoom {
    DestinationRoom { destination: name(dest), room_id: room.into(), stream_ordering }
}

fn outbox(dest: &str, outbox_id: u64) -> OutboxRow {
    OutboxRow {
        destination: name(dest),
        outbox_id,
        queued_ts: 7,
        edu: json!({"edu_type": "m.direct_to_device", "n": outbox_id}),
    }
}

#[test]
fn growing_values_are_max_upserts() {
    both(|store| {
        store
            .apply(&Changes {
                incarnation: Some(5),
                events_out_pos: Some(10),
                destination_rooms: vec![room_row("a.example", "!r:us.example", 9)],
                ..Changes::default()
            })
            .unwrap();
        store
            .apply(&Changes {
                incarnation: Some(3),
                events_out_pos: Some(4),
                destination_rooms: vec![room_row("a.example", "!r:us.example", 2)],
                ..Changes::default()
            })
            .unwrap();
        let recovered = store.recovered().unwrap();
        assert_eq!(recovered.incarnation, 5);
        assert_eq!(recovered.events_out_pos, Some(10));
        // The row for a new destination created a bare destinations row.
        assert_eq!(
            recovered.destinations,
            vec![DestinationState { destination: name("a.example"), ..Default::default() }]
        );
        // The smaller stream ordering did not win: only the row at 9 is above 5.
        let rows = store.load_catch_up(&name("a.example"), 0, 100, 10).unwrap();
        assert!(rows.is_empty(), "no event stored at 9, so the row is omitted");
        assert_eq!(store.outstanding(None, 10).unwrap(), vec![name("a.example")]);
    });
}

#[test]
fn fresh_store_recovers_nothing() {
    both(|store| {
        let recovered = store.recovered().unwrap();
        assert_eq!(recovered, fedsend_core::Recovered::default());
        assert_eq!(store.max_stream_ordering().unwrap(), 0);
    });
}

#[test]
fn destination_rows_are_whole_row_upserts() {
    both(|store| {
        let full = DestinationState {
            destination: name("b.example"),
            retry_last_ts: 100,
            retry_interval: 600_000,
            failure_ts: Some(90),
            last_successful_stream_ordering: Some(12),
        };
        store.apply(&Changes { destinations: vec![full.clone()], ..Changes::default() }).unwrap();
        assert_eq!(store.recovered().unwrap().destinations, vec![full]);
        let healthy = DestinationState {
            destination: name("b.example"),
            last_successful_stream_ordering: Some(3),
            ..Default::default()
        };
        store.apply(&Changes { destinations: vec![healthy.clone()], ..Changes::default() }).unwrap();
        // Plain upsert: the position may even go down when the core says so.
        assert_eq!(store.recovered().unwrap().destinations, vec![healthy]);
    });
}

#[test]
fn outbox_rows_insert_and_delete() {
    both(|store| {
        store
            .apply(&Changes {
                to_device_outbox: vec![outbox("b.example", 2), outbox("a.example", 1), outbox("b.example", 1)],
                ..Changes::default()
            })
            .unwrap();
        store
            .apply(&Changes {
                to_device_deleted: vec![OutboxKey { destination: name("b.example"), outbox_id: 1 }],
                ..Changes::default()
            })
            .unwrap();
        let rows = store.recovered().unwrap().to_device_outbox;
        assert_eq!(rows, vec![outbox("a.example", 1), outbox("b.example", 2)]);
        assert_eq!(store.outstanding(None, 10).unwrap(), vec![name("a.example"), name("b.example")]);
        assert_eq!(store.outstanding(Some(&name("a.example")), 10).unwrap(), vec![name("b.example")]);
    });
}

fn poke(dest: &str, user: &str, device: Option<&str>, stream_id: u64) -> DeviceListPoke {
    DeviceListPoke {
        destination: name(dest),
        user_id: user.into(),
        device_id: device.map(str::to_owned),
        stream_id,
        queued_ts: 5,
        content: json!({"user_id": user, "stream_id": stream_id}),
    }
}

fn poke_done(dest: &str, user: &str, device: Option<&str>, stream_id: u64) -> DeviceListPokeKey {
    DeviceListPokeKey { destination: name(dest), user_id: user.into(), device_id: device.map(str::to_owned), stream_id }
}

#[test]
fn device_list_pokes_keep_the_newest_and_positions_upsert_or_delete() {
    both(|store| {
        let position = |dest: &str, stream_id: Option<u64>| DeviceListPosition {
            destination: name(dest),
            user_id: "@u:us.example".into(),
            stream_id,
        };
        store
            .apply(&Changes {
                device_list_pokes: vec![
                    poke("a.example", "@u:us.example", Some("D1"), 4),
                    poke("a.example", "@u:us.example", None, 2),
                    poke("b.example", "@u:us.example", Some("D1"), 3),
                ],
                device_list_positions: vec![position("a.example", Some(1)), position("b.example", Some(1))],
                ..Changes::default()
            })
            .unwrap();
        store
            .apply(&Changes {
                // Older than the stored row: ignored. Newer: replaces.
                device_list_pokes: vec![
                    poke("a.example", "@u:us.example", Some("D1"), 3),
                    poke("b.example", "@u:us.example", Some("D1"), 6),
                ],
                // Delivered up to 5: b's row (now 6) stays; a's key row (2) goes.
                device_list_pokes_deleted: vec![
                    poke_done("b.example", "@u:us.example", Some("D1"), 5),
                    poke_done("a.example", "@u:us.example", None, 2),
                ],
                device_list_positions: vec![position("a.example", Some(4)), position("b.example", None)],
                ..Changes::default()
            })
            .unwrap();
        let recovered = store.recovered().unwrap();
        assert_eq!(
            recovered.device_list_pokes,
            vec![poke("a.example", "@u:us.example", Some("D1"), 4), poke("b.example", "@u:us.example", Some("D1"), 6)]
        );
        assert_eq!(recovered.device_list_positions, vec![position("a.example", Some(4))]);
    });
}

#[test]
fn a_batch_that_cannot_be_stored_changes_nothing() {
    both(|store| {
        let result = store.apply(&Changes {
            incarnation: Some(2),
            destination_rooms: vec![room_row("a.example", "!r:us.example", u64::MAX)],
            ..Changes::default()
        });
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
        assert_eq!(store.recovered().unwrap().incarnation, 0);
    });
}

#[test]
fn events_get_increasing_stream_orderings_idempotently() {
    both(|store| {
        let create = event("$c", "!r:us.example", "@u:us.example", 1, &[], &[]);
        let a = store.add_event(&create).unwrap();
        assert_eq!((a.stream_ordering, a.new), (1, true));
        let b = store.add_event(&event("$m", "!r:us.example", "@u:us.example", 2, &["$c"], &["a.example"])).unwrap();
        assert_eq!((b.stream_ordering, b.new), (2, true));
        let again = store.add_event(&create).unwrap();
        assert_eq!((again.stream_ordering, again.new), (1, false));
        assert_eq!(store.max_stream_ordering().unwrap(), 2);
        let fetched = store.fetch_events(0, 10).unwrap();
        assert_eq!(
            fetched.iter().map(|e| (e.event_id.as_str(), e.stream_ordering)).collect::<Vec<_>>(),
            [("$c", 1), ("$m", 2)]
        );
        assert_eq!(fetched[1].hosts, vec![name("a.example")]);
        assert_eq!(store.fetch_events(1, 10).unwrap().len(), 1);
        assert_eq!(store.fetch_events(0, 1).unwrap().len(), 1);
        assert!(store.fetch_events(2, 10).unwrap().is_empty());
    });
}

#[test]
fn a_group_of_events_is_stored_together_and_a_refused_one_leaves_the_others() {
    both(|store| {
        let batch = [
            event("$c", "!r:us.example", "@a:us.example", 1, &[], &[]),
            event("$orphan", "!unknown:us.example", "@a:us.example", 2, &["$x"], &[]),
            event("$m", "!r:us.example", "@a:us.example", 2, &["$c"], &["b.example"]),
            event("$c", "!r:us.example", "@a:us.example", 1, &[], &[]),
        ];
        let results = store.add_events(&batch);
        assert_eq!(results.len(), 4);
        assert_eq!(results[0].as_ref().map(|a| (a.stream_ordering, a.new)), Ok((1, true)));
        assert!(matches!(results[1], Err(StoreError::UnknownRoom(_))), "{:?}", results[1]);
        assert_eq!(results[2].as_ref().map(|a| (a.stream_ordering, a.new)), Ok((2, true)));
        assert_eq!(
            results[3].as_ref().map(|a| (a.stream_ordering, a.new)),
            Ok((1, false)),
            "idempotent within a batch"
        );
        let stored: Vec<String> = store.fetch_events(0, 10).unwrap().into_iter().map(|e| e.event_id).collect();
        assert_eq!(stored, ["$c", "$m"]);
        // Several batches of changes in one write, as the driver groups them.
        let first =
            Changes { destination_rooms: vec![room_row("b.example", "!r:us.example", 2)], ..Changes::default() };
        let second = Changes { events_out_pos: Some(2), ..Changes::default() };
        store.apply_all(&[&first, &second]).unwrap();
        assert_eq!(store.recovered().unwrap().events_out_pos, Some(2));
        assert_eq!(store.outstanding(None, 10).unwrap(), [name("b.example")]);
    });
}

#[test]
fn unknown_rooms_are_refused() {
    both(|store| {
        let result = store.add_event(&event("$x", "!nowhere:us.example", "@u:us.example", 3, &["$p"], &[]));
        assert_eq!(result, Err(StoreError::UnknownRoom("!nowhere:us.example".into())));
        assert_eq!(store.max_stream_ordering().unwrap(), 0);
        let result = store.set_partial_state("!nowhere:us.example", None);
        assert!(matches!(result, Err(StoreError::UnknownRoom(_))));
    });
}

/// A room with two branches: local `$a` (depth 3, seen by a.example) and remote `$b` (depth 5,
/// seen by a.example and b.example), both forward extremities.
fn branching_room(store: &mut dyn Store) {
    store.add_event(&event("$c", "!r:us.example", "@u:us.example", 1, &[], &[])).unwrap();
    store.add_event(&event("$a", "!r:us.example", "@u:us.example", 3, &["$c"], &["a.example"])).unwrap();
    store.add_event(&event("$b", "!r:us.example", "@x:b.example", 5, &["$c"], &["a.example", "b.example"])).unwrap();
    store
        .apply(&Changes {
            destination_rooms: vec![
                room_row("a.example", "!r:us.example", 2),
                room_row("b.example", "!r:us.example", 2),
            ],
            ..Changes::default()
        })
        .unwrap();
}

#[test]
fn catch_up_joins_events_and_extremities_with_visibility() {
    both(|store| {
        branching_room(store);
        let rooms = store.load_catch_up(&name("a.example"), 0, 10, 10).unwrap();
        assert_eq!(rooms.len(), 1);
        let room = &rooms[0];
        assert_eq!((room.room_id.as_str(), room.stream_ordering, room.event_id.as_str()), ("!r:us.example", 2, "$a"));
        assert!(!room.partial_state);
        let extremities: Vec<(&str, u64, bool)> =
            room.extremities.iter().map(|x| (x.event_id.as_str(), x.stream_ordering, x.visible)).collect();
        assert_eq!(extremities, [("$b", 3, true), ("$a", 2, true)], "highest depth first");
        // b.example was not in $a's hosts.
        let rooms = store.load_catch_up(&name("b.example"), 0, 10, 10).unwrap();
        let visible: Vec<bool> = rooms[0].extremities.iter().map(|x| x.visible).collect();
        assert_eq!(visible, [true, false]);
        // Partial state: remote extremities are never visible; local ones still are.
        store.set_partial_state("!r:us.example", Some(&[name("b.example")])).unwrap();
        let rooms = store.load_catch_up(&name("a.example"), 0, 10, 10).unwrap();
        assert!(rooms[0].partial_state);
        let visible: Vec<bool> = rooms[0].extremities.iter().map(|x| x.visible).collect();
        assert_eq!(visible, [false, true]);
        store.set_partial_state("!r:us.example", None).unwrap();
        assert!(!store.load_catch_up(&name("a.example"), 0, 10, 10).unwrap()[0].partial_state);
        // A child of both branches is the only extremity left.
        store.add_event(&event("$d", "!r:us.example", "@u:us.example", 6, &["$a", "$b"], &["a.example"])).unwrap();
        let rooms = store.load_catch_up(&name("a.example"), 0, 10, 10).unwrap();
        assert_eq!(rooms[0].extremities.iter().map(|x| x.event_id.as_str()).collect::<Vec<_>>(), ["$d"]);
    });
}

#[test]
fn catch_up_respects_bounds_order_and_limit() {
    both(|store| {
        store.add_event(&event("$c1", "!one:us.example", "@u:us.example", 1, &[], &[])).unwrap(); // 1
        store.add_event(&event("$c2", "!two:us.example", "@u:us.example", 1, &[], &[])).unwrap(); // 2
        store.add_event(&event("$c3", "!three:us.example", "@u:us.example", 1, &[], &[])).unwrap(); // 3
        store
            .apply(&Changes {
                destination_rooms: vec![
                    room_row("a.example", "!three:us.example", 3),
                    room_row("a.example", "!one:us.example", 1),
                    room_row("a.example", "!two:us.example", 2),
                    room_row("z.example", "!one:us.example", 1),
                ],
                ..Changes::default()
            })
            .unwrap();
        let streams =
            |rooms: Vec<fedsend_core::CatchUpRoom>| rooms.iter().map(|r| r.stream_ordering).collect::<Vec<_>>();
        assert_eq!(streams(store.load_catch_up(&name("a.example"), 0, 3, 10).unwrap()), [1, 2, 3]);
        assert_eq!(streams(store.load_catch_up(&name("a.example"), 1, 3, 10).unwrap()), [2, 3]);
        assert_eq!(streams(store.load_catch_up(&name("a.example"), 0, 2, 10).unwrap()), [1, 2]);
        assert_eq!(streams(store.load_catch_up(&name("a.example"), 0, 3, 2).unwrap()), [1, 2]);
        assert_eq!(streams(store.load_catch_up(&name("nobody.example"), 0, 3, 2).unwrap()), Vec::<u64>::new());
    });
}

#[test]
fn outstanding_compares_rows_with_last_success() {
    both(|store| {
        store
            .apply(&Changes {
                destination_rooms: vec![
                    room_row("a.example", "!r:x", 5),
                    room_row("b.example", "!r:x", 5),
                    room_row("c.example", "!r:x", 5),
                ],
                destinations: vec![
                    DestinationState {
                        destination: name("a.example"),
                        last_successful_stream_ordering: Some(5),
                        ..Default::default()
                    },
                    DestinationState {
                        destination: name("b.example"),
                        last_successful_stream_ordering: Some(4),
                        ..Default::default()
                    },
                ],
                ..Changes::default()
            })
            .unwrap();
        assert_eq!(store.outstanding(None, 10).unwrap(), vec![name("b.example"), name("c.example")]);
        assert_eq!(store.outstanding(None, 1).unwrap(), vec![name("b.example")]);
        assert_eq!(store.outstanding(Some(&name("b.example")), 10).unwrap(), vec![name("c.example")]);
    });
}

/// A tiny deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn sqlite_and_memory_answer_identically_under_random_operations() {
    let servers = ["a.example", "b.example", "c.example", "d.example"];
    let rooms = ["!r1:us.example", "!r2:us.example", "!r3:us.example"];
    for seed in 0..20 {
        let mut rng = Rng(seed);
        let mut stores: [Box<dyn Store>; 2] = [sqlite(), memory()];
        let mut events = 0u64;
        for step in 0..150 {
            let op = rng.below(6);
            let results: Vec<String> = stores
                .iter_mut()
                .map(|store| {
                    let mut rng = Rng(seed * 1000 + step);
                    let pick = |rng: &mut Rng, items: &[&'static str]| items[rng.below(items.len() as u64) as usize];
                    match op {
                        0 => {
                            let room = pick(&mut rng, &rooms);
                            let sender = if rng.below(3) == 0 { "@x:b.example" } else { "@u:us.example" };
                            let prev: Vec<&str> = if rng.below(4) == 0 { vec![] } else { vec!["$e0", "$e1", "$e2"] };
                            let hosts: Vec<&str> = servers.iter().copied().filter(|_| rng.below(2) == 0).collect();
                            let depth = rng.below(20);
                            let id = format!("$e{}", rng.below(events + 3));
                            format!("{:?}", store.add_event(&event(&id, room, sender, depth, &prev, &hosts)))
                        }
                        1 => {
                            let changes = Changes {
                                incarnation: Some(rng.below(10)),
                                events_out_pos: Some(rng.below(50)),
                                destination_rooms: (0..rng.below(4))
                                    .map(|_| room_row(pick(&mut rng, &servers), pick(&mut rng, &rooms), rng.below(60)))
                                    .collect(),
                                destinations: (0..rng.below(2))
                                    .map(|_| DestinationState {
                                        destination: name(pick(&mut rng, &servers)),
                                        retry_last_ts: rng.below(100),
                                        retry_interval: rng.below(100),
                                        failure_ts: Some(rng.below(100)).filter(|v| v % 2 == 0),
                                        last_successful_stream_ordering: Some(rng.below(60)).filter(|v| v % 3 != 0),
                                    })
                                    .collect(),
                                to_device_outbox: (0..rng.below(3))
                                    .map(|_| outbox(pick(&mut rng, &servers), rng.below(8)))
                                    .collect(),
                                to_device_deleted: (0..rng.below(2))
                                    .map(|_| OutboxKey {
                                        destination: name(pick(&mut rng, &servers)),
                                        outbox_id: rng.below(8),
                                    })
                                    .collect(),
                                device_list_pokes: (0..rng.below(3))
                                    .map(|_| {
                                        let device = [Some("D1"), Some("D2"), None][rng.below(3) as usize];
                                        poke(pick(&mut rng, &servers), "@u:us.example", device, rng.below(10))
                                    })
                                    .collect(),
                                device_list_pokes_deleted: (0..rng.below(2))
                                    .map(|_| {
                                        let device = [Some("D1"), Some("D2"), None][rng.below(3) as usize];
                                        poke_done(pick(&mut rng, &servers), "@u:us.example", device, rng.below(10))
                                    })
                                    .collect(),
                                device_list_positions: (0..rng.below(2))
                                    .map(|_| DeviceListPosition {
                                        destination: name(pick(&mut rng, &servers)),
                                        user_id: "@u:us.example".into(),
                                        stream_id: Some(rng.below(10)).filter(|v| v % 4 != 0),
                                    })
                                    .collect(),
                            };
                            format!("{:?}", store.apply(&changes))
                        }
                        2 => {
                            let servers: Vec<ServerName> = vec![name(pick(&mut rng, &servers))];
                            let partial = rng.below(2) == 0;
                            format!(
                                "{:?}",
                                store.set_partial_state(pick(&mut rng, &rooms), partial.then_some(&servers[..]))
                            )
                        }
                        3 => format!("{:?}", store.fetch_events(rng.below(30), 1 + rng.below(10) as u32)),
                        4 => format!(
                            "{:?}",
                            store.load_catch_up(
                                &name(pick(&mut rng, &servers)),
                                rng.below(20),
                                rng.below(80),
                                1 + rng.below(5) as u32
                            )
                        ),
                        _ => {
                            let after = (rng.below(2) == 0).then(|| name(pick(&mut rng, &servers)));
                            format!(
                                "{:?} {:?}",
                                store.outstanding(after.as_ref(), 1 + rng.below(4) as u32),
                                store.recovered()
                            )
                        }
                    }
                })
                .collect();
            assert_eq!(results[0], results[1], "seed {seed} step {step}: sqlite (left) and memory (right) differ");
            if op == 0 && results[0].contains("new: true") {
                events += 1;
            }
        }
    }
}

// ---- SQLite only: files, migrations, failures ----

#[test]
fn sqlite_state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fedsend.db");
    {
        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), 2);
        branching_room(&mut store);
        store
            .apply(&Changes {
                incarnation: Some(4),
                to_device_outbox: vec![outbox("a.example", 9)],
                ..Changes::default()
            })
            .unwrap();
    }
    let mut store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    let recovered = store.recovered().unwrap();
    assert_eq!(recovered.incarnation, 4);
    assert_eq!(recovered.to_device_outbox, vec![outbox("a.example", 9)]);
    assert_eq!(store.max_stream_ordering().unwrap(), 3);
    assert_eq!(store.load_catch_up(&name("a.example"), 0, 10, 10).unwrap()[0].extremities.len(), 2);
    let journal: String =
        rusqlite::Connection::open(&path).unwrap().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(journal, "wal");
}

#[test]
fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fedsend.db");
    drop(SqliteStore::open(&path).unwrap());
    rusqlite::Connection::open(&path).unwrap().execute("UPDATE schema_version SET version = 99", []).unwrap();
    let error = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(error.contains("schema version 99 is newer"), "{error}");
}

#[test]
fn sqlite_open_failure_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("fedsend.db");
    let error = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(error.contains("missing-dir"), "{error}");
}

#[test]
fn sqlite_write_failure_is_an_error_and_reads_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fedsend.db");
    let mut store = SqliteStore::open(&path).unwrap();
    store.apply(&Changes { incarnation: Some(1), ..Changes::default() }).unwrap();
    // Another connection holds the write lock: writes fail (after the busy timeout would be
    // too slow for a test, so take an exclusive lock the store cannot wait out quickly)…
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("PRAGMA busy_timeout=0; BEGIN IMMEDIATE; INSERT INTO sender_meta VALUES ('x', 1);").unwrap();
    let started = std::time::Instant::now();
    let result = store.apply(&Changes { incarnation: Some(2), ..Changes::default() });
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // …and reads still answer with the last committed state.
    assert_eq!(store.recovered().unwrap().incarnation, 1);
    blocker.execute_batch("ROLLBACK").unwrap();
    store.apply(&Changes { incarnation: Some(2), ..Changes::default() }).unwrap();
    assert_eq!(store.recovered().unwrap().incarnation, 2);
}
