//! `SynapseDb` against Synapse's real schema: each test copies the template database made by
//! Synapse's own tooling and fills it with rows shaped like the ones Synapse writes.

use std::collections::HashMap;

use fedsend_core::{
    Changes, DestinationRoom, DestinationState, DeviceListPoke, DeviceListPokeKey, DeviceListPosition, OutboxKey,
    OutboxRow, ServerName,
};
use fedsend_synapse::pg::{DeviceListOptions, Ownership, PgArgs, PgError, SchemaVersion, SynapseDb};
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

const LOCAL: &str = "hs1.test";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the test services (scripts/services.sh start DIR) and source DIR/env")
    })
}

async fn admin(dbname: &str) -> Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host(env("FEDSEND_TEST_PG_HOST"))
        .port(env("FEDSEND_TEST_PG_PORT").parse().expect("FEDSEND_TEST_PG_PORT is a port"))
        .user(env("FEDSEND_TEST_PG_USER"))
        .dbname(dbname)
        .connect(NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A fresh copy of the Synapse template, a `SynapseDb` on it and a raw client for fixtures.
async fn fresh(test: &str) -> (SynapseDb, Client) {
    // A stable name: the next run drops what this one left (one run of this suite at a time).
    let name = format!("fedsend_pg_{test}");
    let template = env("FEDSEND_TEST_SYNAPSE_TEMPLATE");
    let postgres = admin("postgres").await;
    postgres.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
    postgres.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}")).await.unwrap();
    let args = PgArgs::from_psycopg2(&json!({
        "host": env("FEDSEND_TEST_PG_HOST"),
        "port": env("FEDSEND_TEST_PG_PORT"),
        "user": env("FEDSEND_TEST_PG_USER"),
        "dbname": name,
        "cp_max": 3,
    }))
    .unwrap();
    let db = SynapseDb::connect(&args, server(LOCAL)).unwrap();
    (db, admin(&name).await)
}

fn server(name: &str) -> ServerName {
    ServerName::parse(name).unwrap()
}

fn solo(instance: &str) -> Ownership {
    Ownership { instance: instance.into(), instances: vec![instance.into()] }
}

const ROOM: &str = "!room:hs1.test";
const ALICE: &str = "@alice:hs1.test";
const BOB: &str = "@bob:remote.test";
const CAROL: &str = "@carol:other.test";

struct Ev<'a> {
    so: i64,
    id: &'a str,
    kind: &'a str,
    state_key: Option<&'a str>,
    sender: &'a str,
    prev: &'a [&'a str],
    auth: &'a [&'a str],
    membership: Option<&'a str>,
    state_group: i64,
    metadata: Value,
}

/// Writes an event the way Synapse persists one: `events`, `event_json` (room version 10
/// JSON without `event_id`, `age_ts` in `unsigned`), `room_memberships` for members, and the
/// state group after it.
async fn put(c: &Client, e: Ev<'_>) {
    let json = json!({
        "auth_events": e.auth, "prev_events": e.prev, "content": {"membership": e.membership, "body": "x"},
        "depth": e.so, "hashes": {"sha256": "h"}, "origin_server_ts": 1_000 + e.so, "room_id": ROOM,
        "sender": e.sender, "type": e.kind, "state_key": e.state_key,
        "signatures": {"hs1.test": {"ed25519:a": "sig"}},
        "unsigned": {"age_ts": 1_000 + e.so, "transaction_id": "t", "redacted_because": {}, "replaces_state": "$old"},
    });
    let mut json = json;
    if e.state_key.is_none() {
        json.as_object_mut().unwrap().remove("state_key");
    }
    c.execute(
        "INSERT INTO events (topological_ordering, event_id, type, room_id, processed, outlier, depth, stream_ordering,
             sender, state_key, received_ts, origin_server_ts, instance_name)
         VALUES ($1, $2, $3, $4, true, false, $1, $1, $5, $6, $7, $7, 'master')",
        &[&e.so, &e.id, &e.kind, &ROOM, &e.sender, &e.state_key, &(5_000 + e.so)],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO event_json (event_id, room_id, internal_metadata, json, format_version) VALUES ($1, $2, $3, $4, 3)",
        &[&e.id, &ROOM, &e.metadata.to_string(), &json.to_string()],
    )
    .await
    .unwrap();
    if let (Some(membership), Some(user)) = (e.membership, e.state_key) {
        c.execute(
            "INSERT INTO room_memberships (event_id, user_id, sender, room_id, membership, event_stream_ordering)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&e.id, &user, &e.sender, &ROOM, &membership, &e.so],
        )
        .await
        .unwrap();
    }
    c.execute("INSERT INTO event_to_state_groups (event_id, state_group) VALUES ($1, $2)", &[&e.id, &e.state_group])
        .await
        .unwrap();
}

async fn state_group(c: &Client, group: i64, prev: Option<i64>, rows: &[(&str, &str, &str)]) {
    c.execute("INSERT INTO state_groups (id, room_id, event_id) VALUES ($1, $2, $3)", &[&group, &ROOM, &"$x"])
        .await
        .unwrap();
    if let Some(prev) = prev {
        c.execute("INSERT INTO state_group_edges (state_group, prev_state_group) VALUES ($1, $2)", &[&group, &prev])
            .await
            .unwrap();
    }
    for (kind, key, event) in rows {
        c.execute(
            "INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id) VALUES ($1, $2, $3, $4, $5)",
            &[&group, &ROOM, kind, key, event],
        )
        .await
        .unwrap();
    }
}

/// A room with a local and a remote member, an invite to a third server that is rescinded,
/// a rejected event and an event whose JSON is damaged.
async fn room_fixture(c: &Client) {
    c.execute(
        "INSERT INTO rooms (room_id, is_public, creator, room_version) VALUES ($1, false, $2, '10')",
        &[&ROOM, &ALICE],
    )
    .await
    .unwrap();
    state_group(c, 1, None, &[("m.room.create", "", "$create"), ("m.room.member", ALICE, "$ja")]).await;
    state_group(c, 2, Some(1), &[("m.room.member", BOB, "$jb")]).await;
    state_group(c, 3, Some(2), &[("m.room.member", CAROL, "$ic")]).await;
    state_group(c, 4, Some(3), &[("m.room.member", CAROL, "$kc")]).await;
    let none = json!({});
    let events = [
        Ev {
            so: 1,
            id: "$create",
            kind: "m.room.create",
            state_key: Some(""),
            sender: ALICE,
            prev: &[],
            auth: &[],
            membership: None,
            state_group: 1,
            metadata: none.clone(),
        },
        Ev {
            so: 2,
            id: "$ja",
            kind: "m.room.member",
            state_key: Some(ALICE),
            sender: ALICE,
            prev: &["$create"],
            auth: &["$create"],
            membership: Some("join"),
            state_group: 1,
            metadata: none.clone(),
        },
        Ev {
            so: 3,
            id: "$jb",
            kind: "m.room.member",
            state_key: Some(BOB),
            sender: BOB,
            prev: &["$ja"],
            auth: &["$create"],
            membership: Some("join"),
            state_group: 2,
            metadata: none.clone(),
        },
        Ev {
            so: 4,
            id: "$m1",
            kind: "m.room.message",
            state_key: None,
            sender: ALICE,
            prev: &["$jb"],
            auth: &["$create", "$ja"],
            membership: None,
            state_group: 2,
            metadata: json!({"txn_id": "t1", "device_id": "ADEV"}),
        },
        Ev {
            so: 5,
            id: "$ic",
            kind: "m.room.member",
            state_key: Some(CAROL),
            sender: ALICE,
            prev: &["$m1"],
            auth: &["$create", "$ja"],
            membership: Some("invite"),
            state_group: 3,
            metadata: none.clone(),
        },
        Ev {
            so: 6,
            id: "$rej",
            kind: "m.room.message",
            state_key: None,
            sender: ALICE,
            prev: &["$ic"],
            auth: &["$create"],
            membership: None,
            state_group: 3,
            metadata: none.clone(),
        },
        Ev {
            so: 7,
            id: "$kc",
            kind: "m.room.member",
            state_key: Some(CAROL),
            sender: ALICE,
            prev: &["$ic"],
            auth: &["$create", "$ja", "$ic"],
            membership: Some("leave"),
            state_group: 4,
            metadata: none.clone(),
        },
        Ev {
            so: 8,
            id: "$bad",
            kind: "m.room.message",
            state_key: None,
            sender: ALICE,
            prev: &["$kc"],
            auth: &["$create"],
            membership: None,
            state_group: 4,
            metadata: none.clone(),
        },
        Ev {
            so: 9,
            id: "$obo",
            kind: "m.room.member",
            state_key: Some(BOB),
            sender: BOB,
            prev: &["$kc"],
            auth: &["$create"],
            membership: Some("join"),
            state_group: 4,
            metadata: json!({"send_on_behalf_of": "remote.test", "proactively_send": false}),
        },
    ];
    for event in events {
        put(c, event).await;
    }
    c.execute("INSERT INTO rejections (event_id, reason, last_check) VALUES ('$rej', 'auth_error', '1')", &[])
        .await
        .unwrap();
    c.execute("UPDATE event_json SET json = '{not json' WHERE event_id = '$bad'", &[]).await.unwrap();
    for (key, event, membership) in [(ALICE, "$ja", "join"), (BOB, "$obo", "join"), (CAROL, "$kc", "leave")] {
        c.execute(
            "INSERT INTO current_state_events (event_id, room_id, type, state_key, membership) VALUES ($1, $2, 'm.room.member', $3, $4)",
            &[&event, &ROOM, &key, &membership],
        )
        .await
        .unwrap();
    }
    c.execute("INSERT INTO event_forward_extremities (event_id, room_id) VALUES ('$obo', $1)", &[&ROOM]).await.unwrap();
}

#[tokio::test]
async fn schema_of_synapse_is_accepted_and_unknown_ones_refused() {
    let (db, c) = fresh("schema").await;
    let version = db.check_schema().await.unwrap();
    assert_eq!(version, SchemaVersion { version: 94, compat_version: Some(84), upgraded: true });
    c.execute("UPDATE schema_compat_version SET compat_version = 95", &[]).await.unwrap();
    let refused = db.check_schema().await.unwrap_err();
    assert!(matches!(&refused, PgError::Schema(why) if why.contains("95")), "{refused}");
    assert!(!refused.is_transient());
    assert!(SchemaVersion { version: 93, compat_version: Some(84), upgraded: true }.refusal().is_some());
    assert!(SchemaVersion { version: 97, compat_version: Some(90), upgraded: true }.refusal().is_none());
    assert!(SchemaVersion { version: 94, compat_version: Some(84), upgraded: false }.refusal().is_some());
}

#[tokio::test]
async fn startup_reset_inherits_the_old_senders_position() {
    let (db, c) = fresh("reset").await;
    // Synapse's own sender (master) got to 57 before the deployment switched to fedsend.
    c.execute("UPDATE federation_stream_position SET stream_id = 57 WHERE type = 'events'", &[]).await.unwrap();
    let recovered = db.recovered(&solo("fedsend1"), &DeviceListOptions::default()).await.unwrap();
    assert_eq!(recovered.events_out_pos, Some(57));
    assert_eq!(recovered.incarnation, 0);
    let rows: Vec<(String, String, i64)> = c
        .query("SELECT type, instance_name, stream_id FROM federation_stream_position ORDER BY type", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows, vec![("events".into(), "fedsend1".into(), 57), ("federation".into(), "fedsend1".into(), -1)]);
    // Two instances now: the new one starts from the minimum, the old one keeps its row.
    db.apply(&Changes { events_out_pos: Some(80), ..Changes::default() }, "fedsend1", 1).await.unwrap();
    let two = Ownership { instance: "fedsend2".into(), instances: vec!["fedsend1".into(), "fedsend2".into()] };
    assert_eq!(db.recovered(&two, &DeviceListOptions::default()).await.unwrap().events_out_pos, Some(80));
    let count: i64 = c.query_one("SELECT COUNT(*) FROM federation_stream_position", &[]).await.unwrap().get(0);
    assert_eq!(count, 4);
    // Synapse's -1 (nothing sent yet) reads as no position.
    let (db, _c) = fresh("reset_none").await;
    assert_eq!(db.recovered(&solo("fedsend1"), &DeviceListOptions::default()).await.unwrap().events_out_pos, None);
}

#[tokio::test]
async fn incarnation_and_position_only_grow() {
    let (db, _c) = fresh("grow").await;
    let ownership = solo("fedsend1");
    db.recovered(&ownership, &DeviceListOptions::default()).await.unwrap();
    db.apply(&Changes { incarnation: Some(3), events_out_pos: Some(20), ..Changes::default() }, "fedsend1", 1)
        .await
        .unwrap();
    db.apply(&Changes { incarnation: Some(2), events_out_pos: Some(10), ..Changes::default() }, "fedsend1", 1)
        .await
        .unwrap();
    let recovered = db.recovered(&ownership, &DeviceListOptions::default()).await.unwrap();
    assert_eq!((recovered.incarnation, recovered.events_out_pos), (3, Some(20)));
}

fn timings(dest: &str, last_ts: u64, interval: u64, lsso: Option<u64>) -> DestinationState {
    DestinationState {
        destination: server(dest),
        retry_last_ts: last_ts,
        retry_interval: interval,
        failure_ts: (interval > 0).then_some(last_ts),
        last_successful_stream_ordering: lsso,
    }
}

#[tokio::test]
async fn retry_timings_move_forward_only_and_invalidate_caches() {
    let (db, c) = fresh("timings").await;
    let apply = |rows: Vec<DestinationState>| {
        let db = db.clone();
        async move { db.apply(&Changes { destinations: rows, ..Changes::default() }, "fedsend1", 777).await.unwrap() }
    };
    async fn read(c: &Client) -> (Option<i64>, Option<i64>, Option<i64>) {
        let r = c
            .query_one(
                "SELECT retry_last_ts, retry_interval, last_successful_stream_ordering FROM destinations WHERE destination = 'remote.test'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    }
    let written = apply(vec![timings("remote.test", 1000, 60_000, Some(40))]).await;
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].cache_func, "get_destination_retry_timings");
    assert_eq!(written[0].keys, vec!["remote.test".to_owned()]);
    assert_eq!(written[0].row(), json!(["get_destination_retry_timings", ["remote.test"], 777]));
    // Another process already wrote a longer backoff at the same time: a shorter one loses.
    apply(vec![timings("remote.test", 1000, 10_000, Some(30))]).await;
    assert_eq!(read(&c).await, (Some(1000), Some(60_000), Some(40)));
    // A newer failure wins even with a shorter interval (Synapse's rule), and a reset always.
    apply(vec![timings("remote.test", 2000, 10_000, None)]).await;
    assert_eq!(read(&c).await, (Some(2000), Some(10_000), Some(40)));
    assert!(!db.retry_timings_cleared("remote.test").await.unwrap(), "backing off");
    apply(vec![timings("remote.test", 0, 0, Some(50))]).await;
    assert_eq!(read(&c).await, (Some(0), Some(0), Some(50)));
    assert!(db.retry_timings_cleared("remote.test").await.unwrap(), "marked up");
    assert!(db.retry_timings_cleared("never-seen.test").await.unwrap(), "no row: nothing to wait for");
    let rows: Vec<(i64, String, String, Vec<String>, i64)> = c
        .query(
            "SELECT stream_id, instance_name, cache_func, keys, invalidation_ts FROM cache_invalidation_stream_by_instance ORDER BY stream_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].0, written[0].stream_id);
    assert!(rows.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(
        rows.iter().all(|r| r.1 == "fedsend1"
            && r.2 == "get_destination_retry_timings"
            && r.3 == ["remote.test"]
            && r.4 == 777)
    );
}

#[tokio::test]
async fn destination_rooms_keep_the_newest_and_create_destinations() {
    let (db, c) = fresh("rooms").await;
    room_fixture(&c).await;
    let row = |so| DestinationRoom { destination: server("new.test"), room_id: ROOM.into(), stream_ordering: so };
    db.apply(&Changes { destination_rooms: vec![row(7)], ..Changes::default() }, "fedsend1", 1).await.unwrap();
    db.apply(&Changes { destination_rooms: vec![row(4)], ..Changes::default() }, "fedsend1", 1).await.unwrap();
    let so: i64 = c.query_one("SELECT stream_ordering FROM destination_rooms", &[]).await.unwrap().get(0);
    assert_eq!(so, 7);
    let recovered = db.recovered(&solo("fedsend1"), &DeviceListOptions::default()).await.unwrap();
    assert_eq!(recovered.destinations, vec![timings("new.test", 0, 0, None)]);
}

#[tokio::test]
async fn fetched_events_keep_rejected_and_broken_ones_as_placeholders() {
    let (db, c) = fresh("fetch").await;
    room_fixture(&c).await;
    let events = db.fetch_events(0, 100, 100, &HashMap::new()).await.unwrap();
    assert_eq!(events.iter().map(|e| e.stream_ordering).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
    let by_id: HashMap<&str, _> = events.iter().map(|e| (e.event_id.as_str(), e)).collect();
    assert!(!by_id["$create"].has_prev_events);
    let message = by_id["$m1"];
    assert_eq!(message.hosts, vec![server("hs1.test"), server("remote.test")]);
    assert_eq!(message.received_ts, Some(5_004));
    assert!(message.proactively_send && !message.out_of_band);
    assert!(message.pdu.get("event_id").is_none(), "room v3+ PDUs carry no event_id");
    assert_eq!(message.pdu["unsigned"], json!({"age_ts": 1004, "replaces_state": "$old"}));
    assert_eq!(message.pdu["signatures"], json!({"hs1.test": {"ed25519:a": "sig"}}));
    for placeholder in ["$rej", "$bad"] {
        assert!(by_id[placeholder].out_of_band, "{placeholder}");
        assert_eq!(by_id[placeholder].pdu, json!({}));
    }
    // The rescinded invite goes to the invitee's server too; hosts are those before it.
    let rescind = by_id["$kc"];
    assert_eq!(rescind.invitee_server, Some(server("other.test")));
    assert_eq!(rescind.hosts, vec![server("hs1.test"), server("remote.test")]);
    assert_eq!(by_id["$ic"].invitee_server, None);
    let obo = by_id["$obo"];
    assert_eq!(obo.send_on_behalf_of, Some(server("remote.test")));
    assert!(!obo.proactively_send);
    // A page that ends on a rejected event is still full, so the core keeps fetching.
    let page = db.fetch_events(5, 100, 2, &HashMap::new()).await.unwrap();
    assert_eq!(page.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(), ["$rej", "$kc"]);
    // Cached hosts win over the state walk; partial-state rooms use their join-time servers.
    let cached = HashMap::from([("$m1".to_owned(), vec![server("cached.test")])]);
    assert_eq!(db.fetch_events(3, 100, 1, &cached).await.unwrap()[0].hosts, vec![server("cached.test")]);
    c.execute("INSERT INTO partial_state_rooms (room_id) VALUES ($1)", &[&ROOM]).await.unwrap();
    c.execute("INSERT INTO partial_state_rooms_servers (room_id, server_name) VALUES ($1, 'seed.test')", &[&ROOM])
        .await
        .unwrap();
    let partial = &db.fetch_events(3, 100, 1, &HashMap::new()).await.unwrap()[0];
    assert_eq!(partial.partial_state_servers, Some(vec![server("seed.test")]));
    assert_eq!(db.max_stream_ordering().await.unwrap(), 9);
    let ids = db.new_event_ids(7, 100, 10).await.unwrap();
    assert_eq!(ids.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(), ["$bad", "$obo"]);
    // Nothing past the announced position, though it is there: a row below it may not be yet.
    let bounded = db.fetch_events(0, 4, 100, &HashMap::new()).await.unwrap();
    assert_eq!(bounded.iter().map(|e| e.stream_ordering).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(db.new_event_ids(0, 4, 100).await.unwrap().len(), 4);
    assert!(db.fetch_events(4, 4, 100, &HashMap::new()).await.unwrap().is_empty());
}

#[tokio::test]
async fn catch_up_and_outstanding_read_destination_rooms() {
    let (db, c) = fresh("catchup").await;
    room_fixture(&c).await;
    let rows = vec![
        DestinationRoom { destination: server("remote.test"), room_id: ROOM.into(), stream_ordering: 4 },
        DestinationRoom { destination: server("other.test"), room_id: ROOM.into(), stream_ordering: 6 },
    ];
    let mut done = timings("remote.test", 0, 0, Some(4));
    done.failure_ts = None;
    db.apply(&Changes { destination_rooms: rows, ..Changes::default() }, "fedsend1", 1).await.unwrap();
    let ownership = solo("fedsend1");
    assert_eq!(db.outstanding(&ownership, None, 10).await.unwrap(), vec![server("other.test"), server("remote.test")]);
    db.apply(&Changes { destinations: vec![done], ..Changes::default() }, "fedsend1", 1).await.unwrap();
    assert_eq!(db.outstanding(&ownership, None, 10).await.unwrap(), vec![server("other.test")]);
    assert_eq!(db.outstanding(&ownership, Some(&server("other.test")), 10).await.unwrap(), vec![]);
    let nobody = Ownership { instance: "x".into(), instances: vec!["y".into()] };
    assert_eq!(db.outstanding(&nobody, None, 10).await.unwrap(), vec![]);

    let rooms = db.load_catch_up(&server("remote.test"), 0, 9, 10).await.unwrap();
    assert_eq!(rooms.len(), 1);
    assert_eq!((rooms[0].event_id.as_str(), rooms[0].stream_ordering), ("$m1", 4));
    assert!(!rooms[0].partial_state && rooms[0].undeliverable.is_none());
    // bob is joined in the state after the extremity.
    assert_eq!(rooms[0].extremities.len(), 1);
    assert!(rooms[0].extremities[0].visible);
    assert!(db.load_catch_up(&server("remote.test"), 4, 9, 10).await.unwrap().is_empty());
    // carol's server was only invited then left: the extremity is not visible to it, and
    // the owed event is rejected, so it is handed over as undeliverable.
    let rooms = db.load_catch_up(&server("other.test"), 0, 9, 10).await.unwrap();
    assert_eq!(rooms[0].event_id, "$rej");
    assert!(rooms[0].undeliverable.is_some());
    let bystander = db.load_catch_up(&server("remote.test"), 0, 3, 10).await.unwrap();
    assert!(bystander.is_empty(), "up_to bounds the rows");
}

#[tokio::test]
async fn hosts_and_presence_for_edus() {
    let (db, c) = fresh("hosts").await;
    room_fixture(&c).await;
    assert_eq!(db.hosts_in_room(ROOM).await.unwrap(), vec![server("hs1.test"), server("remote.test")]);
    assert_eq!(db.hosts_sharing_room_with(ALICE).await.unwrap(), vec![server("hs1.test"), server("remote.test")]);
    assert_eq!(db.hosts_sharing_room_with(CAROL).await.unwrap(), vec![]);
    assert_eq!(db.presence_state(ALICE).await.unwrap(), None);
    for (id, state) in [(1i64, "online"), (2, "unavailable")] {
        c.execute(
            "INSERT INTO presence_stream (stream_id, user_id, state, last_active_ts, last_federation_update_ts,
                 last_user_sync_ts, status_msg, currently_active, instance_name)
             VALUES ($1, $2, $3, 123, 0, 0, 'lunch', false, 'master')",
            &[&id, &ALICE, &state],
        )
        .await
        .unwrap();
    }
    let presence = db.presence_state(ALICE).await.unwrap().unwrap();
    assert_eq!(presence.presence, "unavailable");
    assert_eq!(presence.last_active_ts, Some(123));
    assert_eq!(presence.status_msg.as_deref(), Some("lunch"));
}

#[tokio::test]
async fn to_device_rows_are_read_and_deleted_by_stream_id() {
    let (db, c) = fresh("todevice").await;
    let content = json!({"sender": ALICE, "type": "m.room_key_request", "message_id": "m1",
        "messages": {BOB: {"DEV": {"a": 1}}}, "org.matrix.opentracing_context": "{}"});
    for (dest, id) in [("remote.test", 5i64), ("other.test", 5), ("remote.test", 9)] {
        c.execute(
            "INSERT INTO device_federation_outbox (destination, stream_id, queued_ts, messages_json, instance_name)
             VALUES ($1, $2, 4242, $3, 'master')",
            &[&dest, &id, &content.to_string()],
        )
        .await
        .unwrap();
    }
    let ownership = solo("fedsend1");
    let recovered = db.recovered(&ownership, &DeviceListOptions::default()).await.unwrap();
    assert_eq!(recovered.to_device_outbox.len(), 3);
    assert_eq!(
        recovered.to_device_outbox[0],
        OutboxRow {
            destination: server("remote.test"),
            outbox_id: 5,
            queued_ts: 4242,
            edu: json!({"edu_type": "m.direct_to_device", "content": content}),
        }
    );
    // A page of one row still holds the whole of stream id 5 (two destinations).
    let page = db.to_device_rows(&ownership, 0, 1).await.unwrap();
    assert_eq!((page.rows.len(), page.next_after, page.more), (2, 5, true));
    let rest = db.to_device_rows(&ownership, 5, 10).await.unwrap();
    assert_eq!((rest.rows.len(), rest.next_after, rest.more), (1, 9, false));
    let gone = OutboxKey { destination: server("remote.test"), outbox_id: 5 };
    db.apply(&Changes { to_device_deleted: vec![gone], ..Changes::default() }, "fedsend1", 1).await.unwrap();
    let left: Vec<(String, i64)> = c
        .query("SELECT destination, stream_id FROM device_federation_outbox ORDER BY destination, stream_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(left, vec![("other.test".into(), 5), ("remote.test".into(), 9)]);
    let insert = Changes { to_device_outbox: recovered.to_device_outbox, ..Changes::default() };
    assert_eq!(db.apply(&insert, "fedsend1", 1).await.unwrap_err(), PgError::Unsupported("to_device_outbox inserts"));
}

#[tokio::test]
async fn device_list_pokes_collapse_and_are_marked_sent() {
    let (db, c) = fresh("pokes").await;
    let keys = json!({"user_id": ALICE, "device_id": "ADEV", "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {"ed25519:ADEV": "abc"}, "signatures": {ALICE: {"ed25519:ADEV": "s"}}});
    c.execute("INSERT INTO devices (user_id, device_id, display_name) VALUES ($1, 'ADEV', 'Phone')", &[&ALICE])
        .await
        .unwrap();
    c.execute(
        "INSERT INTO e2e_device_keys_json (user_id, device_id, ts_added_ms, key_json) VALUES ($1, 'ADEV', 1, $2)",
        &[&ALICE, &keys.to_string()],
    )
    .await
    .unwrap();
    let master = json!({"user_id": ALICE, "usage": ["master"], "keys": {"ed25519:MASTERPUB": "MASTERPUB"}});
    c.execute(
        "INSERT INTO e2e_cross_signing_keys (user_id, keytype, keydata, stream_id) VALUES ($1, 'master', $2, 1)",
        &[&ALICE, &master.to_string()],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO e2e_cross_signing_signatures (user_id, key_id, target_user_id, target_device_id, signature)
         VALUES ($1, 'ed25519:SSK', $1, 'ADEV', 'xsig')",
        &[&ALICE],
    )
    .await
    .unwrap();
    for (id, device) in [(10i64, "ADEV"), (11, "GONE"), (12, "ADEV"), (13, "MASTERPUB")] {
        c.execute(
            "INSERT INTO device_lists_outbound_pokes (destination, stream_id, user_id, device_id, sent, ts, opentracing_context)
             VALUES ('remote.test', $1, $2, $3, false, 700, '{}')",
            &[&id, &ALICE, &device],
        )
        .await
        .unwrap();
    }
    c.execute(
        "INSERT INTO device_lists_outbound_last_success (destination, user_id, stream_id) VALUES ('remote.test', $1, 8)",
        &[&ALICE],
    )
    .await
    .unwrap();
    let shared = DeviceListOptions { share_display_names: true };
    let recovered = db.recovered(&solo("fedsend1"), &shared).await.unwrap();
    assert_eq!(
        recovered.device_list_positions,
        vec![DeviceListPosition { destination: server("remote.test"), user_id: ALICE.into(), stream_id: Some(8) }]
    );
    let pokes: HashMap<Option<&str>, &DeviceListPoke> =
        recovered.device_list_pokes.iter().map(|p| (p.device_id.as_deref(), p)).collect();
    assert_eq!(pokes.len(), 3);
    let mut signed = keys.clone();
    signed["signatures"][ALICE]["ed25519:SSK"] = json!("xsig");
    assert_eq!(pokes[&Some("ADEV")].stream_id, 12);
    assert_eq!(
        pokes[&Some("ADEV")].content,
        json!({"user_id": ALICE, "device_id": "ADEV", "stream_id": 12, "keys": signed, "device_display_name": "Phone"})
    );
    assert_eq!(
        pokes[&Some("GONE")].content,
        json!({"user_id": ALICE, "device_id": "GONE", "stream_id": 11, "deleted": true})
    );
    assert_eq!(pokes[&None].content, json!({"user_id": ALICE, "master_key": master}));
    assert_eq!((pokes[&None].stream_id, pokes[&None].queued_ts), (13, 700));
    let hidden = db.device_list_pokes(&solo("fedsend1"), 11, 10, &DeviceListOptions::default()).await.unwrap();
    assert!(hidden.rows.iter().all(|p| p.content.get("device_display_name").is_none()));

    let key = |device: Option<&str>, stream_id| DeviceListPokeKey {
        destination: server("remote.test"),
        user_id: ALICE.into(),
        device_id: device.map(str::to_owned),
        stream_id,
    };
    let sent = Changes {
        device_list_pokes_deleted: vec![key(Some("ADEV"), 12), key(None, 13), key(Some("GONE"), 10)],
        device_list_positions: vec![DeviceListPosition {
            destination: server("remote.test"),
            user_id: ALICE.into(),
            stream_id: Some(13),
        }],
        ..Changes::default()
    };
    db.apply(&sent, "fedsend1", 1).await.unwrap();
    let left: Vec<(i64, String)> = c
        .query("SELECT stream_id, device_id FROM device_lists_outbound_pokes ORDER BY stream_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(left, vec![(11, "GONE".into())], "a key older than the row leaves it");
    let position: i64 =
        c.query_one("SELECT stream_id FROM device_lists_outbound_last_success", &[]).await.unwrap().get(0);
    assert_eq!(position, 13);
    let reset = Changes {
        device_list_positions: vec![DeviceListPosition {
            destination: server("remote.test"),
            user_id: ALICE.into(),
            stream_id: None,
        }],
        ..Changes::default()
    };
    db.apply(&reset, "fedsend1", 1).await.unwrap();
    let count: i64 = c.query_one("SELECT COUNT(*) FROM device_lists_outbound_last_success", &[]).await.unwrap().get(0);
    assert_eq!(count, 0);
    let upsert = Changes { device_list_pokes: recovered.device_list_pokes, ..Changes::default() };
    assert!(matches!(db.apply(&upsert, "fedsend1", 1).await, Err(PgError::Unsupported(_))));
}

#[tokio::test]
async fn lost_connections_are_transient() {
    let args =
        PgArgs::from_psycopg2(&json!({"host": "127.0.0.1", "port": 1, "user": "nobody", "dbname": "none"})).unwrap();
    let db = SynapseDb::connect(&args, server(LOCAL)).unwrap();
    let error = db.max_stream_ordering().await.unwrap_err();
    assert!(error.is_transient(), "{error}");
}
