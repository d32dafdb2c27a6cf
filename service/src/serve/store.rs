//! Storage of `fedsend serve`: the core's sender-owned tables (applied from
//! [`Output::Persist`](fedsend_core::Output::Persist) batches, loaded back as [`Recovered`]) and,
//! because the service runs standalone, the homeserver-owned facts the core queries: ingested
//! events with their routing facts, forward extremities per room, partial-state rooms.
//!
//! [`Store`] has two implementations that must behave identically (one conformance suite,
//! `tests/store.rs`, runs against both): [`SqliteStore`], the durable default, and
//! [`MemoryStore`], for tests and throwaway runs. The sender-owned half of [`MemoryStore`] *is*
//! the simulator's reference store, so the semantics cannot drift from the simulator's.
//!
//! Visibility of forward extremities for catch-up (the standalone rule, also in the README): an
//! extremity is visible to a destination exactly when that destination was in the hosts list
//! submitted with the event (`partial_state_servers` instead, when given), and never when the
//! event is a remote one in a room that is partial-state on our side. The service has no room
//! state to judge history visibility with, so it trusts the homeserver's routing facts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use fedsend_core::{
    CatchUpRoom, Changes, DestinationState, DeviceListPoke, DeviceListPosition, Extremity, PduInfo, Recovered,
    ServerName,
};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::Value;

/// Extremities offered per catch-up room (the core's contract: up to 10, highest depth first).
pub const EXTREMITIES_PER_ROOM_MAX: usize = 10;

/// Why a store operation failed. Nothing was written when it is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The event names a room the store has never seen and is not a create event.
    UnknownRoom(String),
    /// An input the store cannot represent (e.g. a number beyond SQLite's signed 64 bits).
    Invalid(String),
    /// The database failed (disk full, read-only, corrupt, …).
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownRoom(room) => write!(f, "unknown room {room}: submit its create event first"),
            Self::Invalid(why) => write!(f, "invalid for storage: {why}"),
            Self::Backend(why) => write!(f, "storage failed: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Backend(error.to_string())
    }
}

/// An event to record, local or remote.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Routing facts; `stream_ordering` is ignored (the store assigns it).
    pub info: PduInfo,
    /// The event's depth (orders extremities).
    pub depth: u64,
    /// Its `prev_events`: these stop being forward extremities.
    pub prev_events: Vec<String>,
    /// Sent by one of our users (remote events only extend rooms).
    pub local: bool,
}

/// Result of [`Store::add_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Added {
    /// The event's stream ordering.
    pub stream_ordering: u64,
    /// False when the event id was already stored (the submission is idempotent).
    pub new: bool,
}

/// Everything the service stores. Every mutating call is atomic and, for [`SqliteStore`],
/// durable when it returns `Ok`.
pub trait Store: Send {
    /// The sender-owned state a starting core needs.
    fn recovered(&mut self) -> Result<Recovered, StoreError>;
    /// Applies one `Persist` batch atomically: `incarnation`, `events_out_pos` and
    /// `destination_rooms` as max-upserts, `destinations` as whole-row upserts, outbox inserts
    /// and deletes.
    fn apply(&mut self, changes: &Changes) -> Result<(), StoreError>;
    /// Records an event (idempotent by event id) and assigns its stream ordering.
    fn add_event(&mut self, event: &NewEvent) -> Result<Added, StoreError>;
    /// Applies several batches with one durable write (group commit). Batches may be applied
    /// in any order (see [`Store::apply`]), so a failure may leave some applied: the core
    /// retries them all, which is harmless.
    fn apply_all(&mut self, batches: &[&Changes]) -> Result<(), StoreError> {
        batches.iter().try_for_each(|changes| self.apply(changes))
    }
    /// Records several events with one durable write where the store can; each gets its own
    /// result, in order.
    fn add_events(&mut self, events: &[NewEvent]) -> Vec<Result<Added, StoreError>> {
        events.iter().map(|event| self.add_event(event)).collect()
    }
    /// Marks a room partial-state (with the servers known at join) or, with `None`, fully joined.
    fn set_partial_state(&mut self, room_id: &str, servers: Option<&[ServerName]>) -> Result<(), StoreError>;
    /// Highest stream ordering stored (0 when empty).
    fn max_stream_ordering(&mut self) -> Result<u64, StoreError>;
    /// Events with stream ordering > `after`, ascending, at most `limit` (answers `FetchEvents`).
    fn fetch_events(&mut self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StoreError>;
    /// Answers `LoadCatchUp` (see the core's storage boundary).
    fn load_catch_up(
        &mut self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StoreError>;
    /// Answers `LoadOutstanding`.
    fn outstanding(&mut self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StoreError>;
}

/// Who may see an event in catch-up: see the module docs.
fn visible_to(info: &PduInfo, local: bool, partial_state: bool, destination: &ServerName) -> bool {
    if partial_state && !local {
        return false;
    }
    info.partial_state_servers.as_ref().unwrap_or(&info.hosts).contains(destination)
}

fn is_create(event: &NewEvent) -> bool {
    event.prev_events.is_empty()
}

// ---------------------------------------------------------------------------------------------
// in memory

#[derive(Clone, Debug)]
struct StoredEvent {
    info: PduInfo,
    depth: u64,
    local: bool,
}

#[derive(Clone, Debug, Default)]
struct RoomFacts {
    partial_state: Option<Vec<ServerName>>,
    extremities: BTreeSet<String>,
}

/// The in-memory store: the simulator's sender-owned reference plus homeserver facts.
#[derive(Debug, Default)]
pub struct MemoryStore {
    sender: fedsend_driver::MemoryStore,
    /// By stream ordering.
    events: BTreeMap<u64, StoredEvent>,
    by_id: BTreeMap<String, u64>,
    rooms: BTreeMap<String, RoomFacts>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn recovered(&mut self) -> Result<Recovered, StoreError> {
        Ok(self.sender.recovered())
    }

    fn apply(&mut self, changes: &Changes) -> Result<(), StoreError> {
        check_representable(changes)?;
        self.sender.apply(changes);
        Ok(())
    }

    fn add_event(&mut self, event: &NewEvent) -> Result<Added, StoreError> {
        if let Some(&stream_ordering) = self.by_id.get(&event.info.event_id) {
            return Ok(Added { stream_ordering, new: false });
        }
        let room_id = &event.info.room_id;
        if !self.rooms.contains_key(room_id) && !is_create(event) {
            return Err(StoreError::UnknownRoom(room_id.clone()));
        }
        let stream_ordering = self.events.keys().next_back().copied().unwrap_or(0) + 1;
        let mut info = event.info.clone();
        info.stream_ordering = stream_ordering;
        let room = self.rooms.entry(room_id.clone()).or_default();
        for prev in &event.prev_events {
            room.extremities.remove(prev);
        }
        room.extremities.insert(info.event_id.clone());
        self.by_id.insert(info.event_id.clone(), stream_ordering);
        self.events.insert(stream_ordering, StoredEvent { info, depth: event.depth, local: event.local });
        Ok(Added { stream_ordering, new: true })
    }

    fn set_partial_state(&mut self, room_id: &str, servers: Option<&[ServerName]>) -> Result<(), StoreError> {
        let room = self.rooms.get_mut(room_id).ok_or_else(|| StoreError::UnknownRoom(room_id.to_owned()))?;
        room.partial_state = servers.map(<[ServerName]>::to_vec);
        Ok(())
    }

    fn max_stream_ordering(&mut self) -> Result<u64, StoreError> {
        Ok(self.events.keys().next_back().copied().unwrap_or(0))
    }

    fn fetch_events(&mut self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StoreError> {
        Ok(self.events.range(after.saturating_add(1)..).take(limit as usize).map(|(_, e)| e.info.clone()).collect())
    }

    fn load_catch_up(
        &mut self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StoreError> {
        let mut rooms = Vec::new();
        for (room_id, stream_ordering) in self.sender.catch_up_rows(destination, after, up_to, limit) {
            // Purged (or never ingested) events are omitted, as the core's contract allows.
            let Some(event) = self.events.get(&stream_ordering) else { continue };
            let facts = self.rooms.get(&room_id).cloned().unwrap_or_default();
            let partial_state = facts.partial_state.is_some();
            let mut extremities: Vec<&StoredEvent> =
                facts.extremities.iter().filter_map(|id| self.by_id.get(id).and_then(|s| self.events.get(s))).collect();
            extremities.sort_by(|a, b| b.depth.cmp(&a.depth).then(b.info.stream_ordering.cmp(&a.info.stream_ordering)));
            extremities.truncate(EXTREMITIES_PER_ROOM_MAX);
            rooms.push(CatchUpRoom {
                room_id,
                stream_ordering,
                event_id: event.info.event_id.clone(),
                pdu: event.info.pdu.clone(),
                partial_state,
                extremities: extremities
                    .into_iter()
                    .map(|x| Extremity {
                        event_id: x.info.event_id.clone(),
                        stream_ordering: x.info.stream_ordering,
                        visible: visible_to(&x.info, x.local, partial_state, destination),
                        pdu: x.info.pdu.clone(),
                    })
                    .collect(),
                undeliverable: None,
            });
        }
        Ok(rooms)
    }

    fn outstanding(&mut self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StoreError> {
        Ok(self.sender.outstanding(after, limit))
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite

/// Schema migrations, in order; `schema_version` holds how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: the sender-owned tables (core storage boundary) and the standalone homeserver facts.
    "CREATE TABLE sender_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     CREATE TABLE destinations (
         destination TEXT PRIMARY KEY,
         retry_last_ts INTEGER NOT NULL,
         retry_interval INTEGER NOT NULL,
         failure_ts INTEGER,
         last_successful_stream_ordering INTEGER);
     CREATE TABLE destination_rooms (
         destination TEXT NOT NULL,
         room_id TEXT NOT NULL,
         stream_ordering INTEGER NOT NULL,
         PRIMARY KEY (destination, room_id));
     CREATE INDEX destination_rooms_by_stream ON destination_rooms (destination, stream_ordering);
     CREATE TABLE to_device_outbox (
         destination TEXT NOT NULL,
         outbox_id INTEGER NOT NULL,
         queued_ts INTEGER NOT NULL,
         edu TEXT NOT NULL,
         PRIMARY KEY (destination, outbox_id));
     CREATE TABLE events (
         stream_ordering INTEGER PRIMARY KEY,
         event_id TEXT NOT NULL UNIQUE,
         room_id TEXT NOT NULL,
         depth INTEGER NOT NULL,
         local INTEGER NOT NULL,
         info TEXT NOT NULL);
     CREATE TABLE rooms (room_id TEXT PRIMARY KEY, partial_state_servers TEXT);
     CREATE TABLE forward_extremities (
         room_id TEXT NOT NULL,
         event_id TEXT NOT NULL,
         PRIMARY KEY (room_id, event_id));",
    // 2: device-list pokes (one row per destination, user and device; NULL device = the
    // user's cross-signing keys) and the per (destination, user) acknowledged positions.
    "CREATE TABLE device_list_pokes (
         destination TEXT NOT NULL,
         user_id TEXT NOT NULL,
         device_id TEXT,
         stream_id INTEGER NOT NULL,
         queued_ts INTEGER NOT NULL,
         content TEXT NOT NULL);
     CREATE UNIQUE INDEX device_list_pokes_key ON device_list_pokes (destination, user_id, coalesce(device_id, ''), device_id IS NULL);
     CREATE TABLE device_list_positions (
         destination TEXT NOT NULL,
         user_id TEXT NOT NULL,
         stream_id INTEGER NOT NULL,
         PRIMARY KEY (destination, user_id));",
];

/// The durable store: one SQLite file in WAL mode with `synchronous=FULL`, so a call that
/// returned `Ok` survives a crash or power loss (NORMAL would be crash-safe but could lose the
/// last commits on power loss, and we acknowledge submissions on commit).
#[derive(Debug)]
pub struct SqliteStore {
    connection: Connection,
}

fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Invalid(format!("{what} {value} exceeds 2^63-1")))
}

fn to_u64(value: i64) -> u64 {
    // Only values written through `to_i64` are read back, so they are never negative.
    u64::try_from(value).unwrap_or(0)
}

fn check_representable(changes: &Changes) -> Result<(), StoreError> {
    let numbers = changes
        .incarnation
        .iter()
        .map(|v| (*v, "incarnation"))
        .chain(changes.events_out_pos.iter().map(|v| (*v, "events_out_pos")))
        .chain(changes.destination_rooms.iter().map(|r| (r.stream_ordering, "stream ordering")))
        .chain(changes.to_device_outbox.iter().map(|r| (r.outbox_id, "outbox id")))
        .chain(changes.to_device_outbox.iter().map(|r| (r.queued_ts, "queued_ts")))
        .chain(
            changes
                .device_list_pokes
                .iter()
                .flat_map(|p| [(p.stream_id, "device-list stream id"), (p.queued_ts, "queued_ts")]),
        )
        .chain(changes.device_list_pokes_deleted.iter().map(|p| (p.stream_id, "device-list stream id")))
        .chain(changes.device_list_positions.iter().filter_map(|p| p.stream_id).map(|v| (v, "device-list stream id")));
    for (value, what) in numbers {
        to_i64(value, what)?;
    }
    for row in &changes.destinations {
        to_i64(row.retry_last_ts, "retry_last_ts")?;
        to_i64(row.retry_interval, "retry_interval")?;
        for value in row.failure_ts.iter().chain(row.last_successful_stream_ordering.iter()) {
            to_i64(*value, "destination timestamp or position")?;
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and runs pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let connection = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open database {}: {e}", path.display())))?;
        Self::setup(connection).map_err(|e| match e {
            StoreError::Backend(why) => StoreError::Backend(format!("database {}: {why}", path.display())),
            other => other,
        })
    }

    /// A private in-memory SQLite database (tests: the same SQL without a file).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(connection: Connection) -> Result<Self, StoreError> {
        // Another process holding the write lock (e.g. a previous instance shutting down)
        // is waited for rather than failing the first write.
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = connection.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
        if mode != "wal" && mode != "memory" {
            return Err(StoreError::Backend(format!("cannot enable WAL (journal_mode is {mode})")));
        }
        connection.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        // Every statement is prepared once and kept: parsing the SQL of each row's statement
        // again was most of SQLite's share of the service's CPU (BENCHMARKS.md, "Service end
        // to end"). Room for all of this file's statements.
        connection.set_prepared_statement_cache_capacity(64);
        let mut store = Self { connection };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self.connection.transaction()?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let current: Option<i64> =
            tx.prepare_cached("SELECT version FROM schema_version")?.query_row([], |r| r.get(0)).optional()?;
        let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
        if current > MIGRATIONS.len() {
            return Err(StoreError::Backend(format!(
                "schema version {current} is newer than this fedsend knows ({}); refusing to touch it",
                MIGRATIONS.len()
            )));
        }
        for migration in &MIGRATIONS[current..] {
            tx.execute_batch(migration)?;
        }
        tx.prepare_cached("DELETE FROM schema_version")?.execute([])?;
        tx.prepare_cached("INSERT INTO schema_version (version) VALUES (?1)")?.execute([MIGRATIONS.len() as i64])?;
        tx.commit()?;
        Ok(())
    }

    /// The schema version after migrations.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        Ok(to_u64(self.connection.prepare_cached("SELECT version FROM schema_version")?.query_row([], |r| r.get(0))?))
    }

    fn max_meta(tx: &Transaction<'_>, key: &str, value: u64) -> Result<(), StoreError> {
        tx.prepare_cached(
            "INSERT INTO sender_meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        )?
        .execute(params![key, to_i64(value, key)?])?;
        Ok(())
    }

    /// The event at `stream_ordering`: its id and either its facts or why they cannot be read.
    fn event_at(&self, stream_ordering: u64) -> Result<Option<(String, ReadEvent)>, StoreError> {
        let row: Option<(String, String)> = self
            .connection
            .prepare_cached("SELECT event_id, info FROM events WHERE stream_ordering = ?1")?
            .query_row([to_i64(stream_ordering, "stream ordering")?], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row.map(|(event_id, info)| (event_id, decode_info(&info))))
    }
}

/// A stored event's facts, or why they cannot be read.
type ReadEvent = Result<PduInfo, String>;

/// Records one event inside an open transaction (see [`Store::add_event`]).
fn insert_event(tx: &Connection, event: &NewEvent) -> Result<Added, StoreError> {
    to_i64(event.depth, "depth")?;
    let existing: Option<i64> = tx
        .prepare_cached("SELECT stream_ordering FROM events WHERE event_id = ?1")?
        .query_row([&event.info.event_id], |r| r.get(0))
        .optional()?;
    if let Some(stream_ordering) = existing {
        return Ok(Added { stream_ordering: to_u64(stream_ordering), new: false });
    }
    let room_id = &event.info.room_id;
    let known: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM rooms WHERE room_id = ?1)")?
        .query_row([room_id], |r| r.get(0))?;
    if !known {
        if !is_create(event) {
            return Err(StoreError::UnknownRoom(room_id.clone()));
        }
        tx.prepare_cached("INSERT INTO rooms (room_id) VALUES (?1)")?.execute([room_id])?;
    }
    let max: i64 =
        tx.prepare_cached("SELECT coalesce(max(stream_ordering), 0) FROM events")?.query_row([], |r| r.get(0))?;
    let stream_ordering = to_u64(max) + 1;
    let mut info = event.info.clone();
    info.stream_ordering = stream_ordering;
    tx.prepare_cached(
        "INSERT INTO events (stream_ordering, event_id, room_id, depth, local, info) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        max + 1,
        info.event_id,
        room_id,
        to_i64(event.depth, "depth")?,
        event.local,
        encode(&info)
    ])?;
    for prev in &event.prev_events {
        tx.prepare_cached("DELETE FROM forward_extremities WHERE room_id = ?1 AND event_id = ?2")?
            .execute(params![room_id, prev])?;
    }
    tx.prepare_cached("INSERT INTO forward_extremities (room_id, event_id) VALUES (?1, ?2)")?
        .execute(params![room_id, info.event_id])?;
    Ok(Added { stream_ordering, new: true })
}

/// A stored event's facts. Rows stored before the ingest API checked nesting may be too deep to
/// parse; they are reported per event instead of failing the whole query, which would be
/// retried forever.
fn decode_info(text: &str) -> Result<PduInfo, String> {
    serde_json::from_str(text).map_err(|e| format!("the stored event cannot be read: {e}"))
}

/// Stands in for an event that cannot be read, so that the events stream still moves past it:
/// out of band, so the core sends it nowhere.
fn unreadable_event(stream_ordering: u64, event_id: String, room_id: String, reason: &str) -> PduInfo {
    tracing::warn!(event_id, stream_ordering, "skipping a stored event: {reason}");
    PduInfo {
        event_id,
        room_id,
        stream_ordering,
        sender: String::new(),
        has_prev_events: true,
        hosts: Vec::new(),
        partial_state_servers: None,
        invitee_server: None,
        proactively_send: false,
        out_of_band: true,
        send_on_behalf_of: None,
        received_ts: None,
        pdu: Value::Object(serde_json::Map::new()),
    }
}

fn encode<T: serde::Serialize>(value: &T) -> String {
    // Our own records: string keys, integers, strings, JSON values.
    serde_json::to_string(value).expect("records always serialize")
}

impl Store for SqliteStore {
    fn recovered(&mut self) -> Result<Recovered, StoreError> {
        let meta = |key: &str| -> Result<Option<u64>, StoreError> {
            let value: Option<i64> = self
                .connection
                .prepare_cached("SELECT value FROM sender_meta WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()?;
            Ok(value.map(to_u64))
        };
        let incarnation = meta("incarnation")?.unwrap_or(0);
        let events_out_pos = meta("events_out_pos")?;
        let mut statement = self.connection.prepare_cached(
            "SELECT destination, retry_last_ts, retry_interval, failure_ts, last_successful_stream_ordering
             FROM destinations ORDER BY destination",
        )?;
        let rows = statement.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })?;
        let mut destinations = Vec::new();
        for row in rows {
            let (name, retry_last_ts, retry_interval, failure_ts, last) = row?;
            let destination = ServerName::parse(&name)
                .map_err(|e| StoreError::Backend(format!("stored destination {name:?} is invalid: {e}")))?;
            destinations.push(DestinationState {
                destination,
                retry_last_ts: to_u64(retry_last_ts),
                retry_interval: to_u64(retry_interval),
                failure_ts: failure_ts.map(to_u64),
                last_successful_stream_ordering: last.map(to_u64),
            });
        }
        let mut statement = self.connection.prepare_cached(
            "SELECT destination, outbox_id, queued_ts, edu FROM to_device_outbox ORDER BY destination, outbox_id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
        })?;
        let mut to_device_outbox = Vec::new();
        for row in rows {
            let (name, outbox_id, queued_ts, edu) = row?;
            to_device_outbox.push(fedsend_core::OutboxRow {
                destination: ServerName::parse(&name)
                    .map_err(|e| StoreError::Backend(format!("stored destination {name:?} is invalid: {e}")))?,
                outbox_id: to_u64(outbox_id),
                queued_ts: to_u64(queued_ts),
                edu: serde_json::from_str(&edu)
                    .map_err(|e| StoreError::Backend(format!("stored outbox row is not JSON: {e}")))?,
            });
        }
        let parse_name = |name: String| {
            ServerName::parse(&name)
                .map_err(|e| StoreError::Backend(format!("stored destination {name:?} is invalid: {e}")))
        };
        let mut statement = self.connection.prepare_cached(
            "SELECT destination, user_id, device_id, stream_id, queued_ts, content FROM device_list_pokes
             ORDER BY destination, user_id, device_id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut device_list_pokes = Vec::new();
        for row in rows {
            let (name, user_id, device_id, stream_id, queued_ts, content) = row?;
            device_list_pokes.push(DeviceListPoke {
                destination: parse_name(name)?,
                user_id,
                device_id,
                stream_id: to_u64(stream_id),
                queued_ts: to_u64(queued_ts),
                content: serde_json::from_str(&content)
                    .map_err(|e| StoreError::Backend(format!("stored device-list poke is not JSON: {e}")))?,
            });
        }
        let mut statement = self.connection.prepare_cached(
            "SELECT destination, user_id, stream_id FROM device_list_positions ORDER BY destination, user_id",
        )?;
        let rows =
            statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
        let mut device_list_positions = Vec::new();
        for row in rows {
            let (name, user_id, stream_id) = row?;
            device_list_positions.push(DeviceListPosition {
                destination: parse_name(name)?,
                user_id,
                stream_id: Some(to_u64(stream_id)),
            });
        }
        Ok(Recovered {
            incarnation,
            events_out_pos,
            destinations,
            to_device_outbox,
            device_list_pokes,
            device_list_positions,
        })
    }

    fn apply(&mut self, changes: &Changes) -> Result<(), StoreError> {
        self.apply_all(&[changes])
    }

    fn apply_all(&mut self, batches: &[&Changes]) -> Result<(), StoreError> {
        batches.iter().try_for_each(|changes| check_representable(changes))?;
        let tx = self.connection.transaction()?;
        for &changes in batches {
            // Every field named: a field the core adds later fails this build instead of being
            // acknowledged as durable without being written.
            let Changes {
                incarnation: _,
                events_out_pos: _,
                destination_rooms: _,
                destinations: _,
                to_device_outbox: _,
                to_device_deleted: _,
                device_list_pokes: _,
                device_list_pokes_deleted: _,
                device_list_positions: _,
            } = changes;
            if let Some(incarnation) = changes.incarnation {
                Self::max_meta(&tx, "incarnation", incarnation)?;
            }
            if let Some(position) = changes.events_out_pos {
                Self::max_meta(&tx, "events_out_pos", position)?;
            }
            for row in &changes.destination_rooms {
                tx.prepare_cached(
                    "INSERT INTO destinations (destination, retry_last_ts, retry_interval) VALUES (?1, 0, 0)
                     ON CONFLICT (destination) DO NOTHING",
                )?
                .execute([row.destination.as_str()])?;
                tx.prepare_cached(
                    "INSERT INTO destination_rooms (destination, room_id, stream_ordering) VALUES (?1, ?2, ?3)
                     ON CONFLICT (destination, room_id) DO UPDATE
                     SET stream_ordering = max(stream_ordering, excluded.stream_ordering)",
                )?
                .execute(params![
                    row.destination.as_str(),
                    &*row.room_id,
                    to_i64(row.stream_ordering, "stream ordering")?
                ])?;
            }
            for row in &changes.destinations {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO destinations
                     (destination, retry_last_ts, retry_interval, failure_ts, last_successful_stream_ordering)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    row.destination.as_str(),
                    to_i64(row.retry_last_ts, "retry_last_ts")?,
                    to_i64(row.retry_interval, "retry_interval")?,
                    row.failure_ts.map(|v| to_i64(v, "failure_ts")).transpose()?,
                    row.last_successful_stream_ordering.map(|v| to_i64(v, "stream ordering")).transpose()?,
                ])?;
            }
            for row in &changes.to_device_outbox {
                tx.prepare_cached("INSERT OR REPLACE INTO to_device_outbox (destination, outbox_id, queued_ts, edu) VALUES (?1, ?2, ?3, ?4)")?.execute(params![
                        row.destination.as_str(),
                        to_i64(row.outbox_id, "outbox id")?,
                        to_i64(row.queued_ts, "queued_ts")?,
                        encode(&row.edu)
                    ],
                )?;
            }
            for key in &changes.to_device_deleted {
                tx.prepare_cached("DELETE FROM to_device_outbox WHERE destination = ?1 AND outbox_id = ?2")?
                    .execute(params![key.destination.as_str(), to_i64(key.outbox_id, "outbox id")?])?;
            }
            for poke in &changes.device_list_pokes {
                // Keep whichever version of the (destination, user, device) row is newer.
                let stored: Option<i64> = tx
                    .query_row(
                        "SELECT stream_id FROM device_list_pokes WHERE destination = ?1 AND user_id = ?2 AND device_id IS ?3",
                        params![poke.destination.as_str(), poke.user_id, poke.device_id],
                        |r| r.get(0),
                    )
                    .optional()?;
                let stream_id = to_i64(poke.stream_id, "device-list stream id")?;
                if stored.is_some_and(|stored| stored >= stream_id) {
                    continue;
                }
                tx.prepare_cached(
                    "DELETE FROM device_list_pokes WHERE destination = ?1 AND user_id = ?2 AND device_id IS ?3",
                )?
                .execute(params![poke.destination.as_str(), poke.user_id, poke.device_id])?;
                tx.prepare_cached(
                    "INSERT INTO device_list_pokes (destination, user_id, device_id, stream_id, queued_ts, content)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    poke.destination.as_str(),
                    poke.user_id,
                    poke.device_id,
                    stream_id,
                    to_i64(poke.queued_ts, "queued_ts")?,
                    encode(&poke.content)
                ])?;
            }
            for done in &changes.device_list_pokes_deleted {
                tx.prepare_cached(
                    "DELETE FROM device_list_pokes
                     WHERE destination = ?1 AND user_id = ?2 AND device_id IS ?3 AND stream_id <= ?4",
                )?
                .execute(params![
                    done.destination.as_str(),
                    done.user_id,
                    done.device_id,
                    to_i64(done.stream_id, "device-list stream id")?
                ])?;
            }
            for position in &changes.device_list_positions {
                match position.stream_id {
                    Some(stream_id) => tx.prepare_cached("INSERT OR REPLACE INTO device_list_positions (destination, user_id, stream_id) VALUES (?1, ?2, ?3)")?.execute(params![position.destination.as_str(), position.user_id, to_i64(stream_id, "device-list stream id")?],
                    )?,
                    None => tx.prepare_cached("DELETE FROM device_list_positions WHERE destination = ?1 AND user_id = ?2")?.execute(params![position.destination.as_str(), position.user_id],
                    )?,
                };
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn add_event(&mut self, event: &NewEvent) -> Result<Added, StoreError> {
        self.add_events(std::slice::from_ref(event))
            .pop()
            .unwrap_or_else(|| Err(StoreError::Backend("no result".into())))
    }

    fn add_events(&mut self, events: &[NewEvent]) -> Vec<Result<Added, StoreError>> {
        let mut tx = match self.connection.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                let e = StoreError::from(e);
                return events.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let mut results = Vec::with_capacity(events.len());
        for event in events {
            // A savepoint per event: one refused event leaves the others of the batch alone.
            let result = tx.savepoint().map_err(StoreError::from).and_then(|savepoint| {
                let added = insert_event(&savepoint, event)?;
                savepoint.commit()?;
                Ok(added)
            });
            results.push(result);
        }
        if let Err(e) = tx.commit() {
            let e = StoreError::from(e);
            return results.into_iter().map(|r| r.and(Err(e.clone()))).collect();
        }
        results
    }

    fn set_partial_state(&mut self, room_id: &str, servers: Option<&[ServerName]>) -> Result<(), StoreError> {
        let encoded = servers.map(|s| encode(&s));
        let changed = self
            .connection
            .execute("UPDATE rooms SET partial_state_servers = ?2 WHERE room_id = ?1", params![room_id, encoded])?;
        if changed == 0 {
            return Err(StoreError::UnknownRoom(room_id.to_owned()));
        }
        Ok(())
    }

    fn max_stream_ordering(&mut self) -> Result<u64, StoreError> {
        Ok(to_u64(
            self.connection
                .prepare_cached("SELECT coalesce(max(stream_ordering), 0) FROM events")?
                .query_row([], |r| r.get(0))?,
        ))
    }

    fn fetch_events(&mut self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let mut statement = self
            .connection
            .prepare_cached("SELECT stream_ordering, event_id, room_id, info FROM events WHERE stream_ordering > ?1 ORDER BY stream_ordering LIMIT ?2")?;
        let rows = statement.query_map(params![after, i64::from(limit)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
        })?;
        rows.map(|row| {
            let (stream_ordering, event_id, room_id, info) = row?;
            Ok(decode_info(&info)
                .unwrap_or_else(|reason| unreadable_event(to_u64(stream_ordering), event_id, room_id, &reason)))
        })
        .collect()
    }

    fn load_catch_up(
        &mut self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StoreError> {
        let rows: Vec<(String, i64)> = {
            let mut statement = self.connection.prepare_cached(
                "SELECT room_id, stream_ordering FROM destination_rooms
                 WHERE destination = ?1 AND stream_ordering > ?2 AND stream_ordering <= ?3
                 ORDER BY stream_ordering, room_id LIMIT ?4",
            )?;
            let rows = statement.query_map(
                params![
                    destination.as_str(),
                    i64::try_from(after).unwrap_or(i64::MAX),
                    i64::try_from(up_to).unwrap_or(i64::MAX),
                    i64::from(limit)
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.collect::<Result<_, _>>()?
        };
        let mut rooms = Vec::new();
        for (room_id, stream_ordering) in rows {
            let stream_ordering = to_u64(stream_ordering);
            let Some((event_id, event)) = self.event_at(stream_ordering)? else { continue };
            let (pdu, undeliverable) = match event {
                Ok(info) => (info.pdu, None),
                Err(reason) => (Value::Object(serde_json::Map::new()), Some(reason)),
            };
            let partial_state: bool = self
                .connection
                .query_row("SELECT partial_state_servers IS NOT NULL FROM rooms WHERE room_id = ?1", [&room_id], |r| {
                    r.get(0)
                })
                .optional()?
                .unwrap_or(false);
            let mut statement = self.connection.prepare_cached(
                "SELECT e.info, e.local FROM forward_extremities x JOIN events e ON e.event_id = x.event_id
                 WHERE x.room_id = ?1 ORDER BY e.depth DESC, e.stream_ordering DESC LIMIT ?2",
            )?;
            let extremities = statement
                .query_map(params![room_id, EXTREMITIES_PER_ROOM_MAX as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
                })?
                .filter_map(|row| {
                    let (info, local) = match row {
                        Ok(row) => row,
                        Err(e) => return Some(Err(StoreError::from(e))),
                    };
                    // An unreadable extremity is left out: the owed event goes instead.
                    let info = decode_info(&info).ok()?;
                    Some(Ok(Extremity {
                        event_id: info.event_id.clone(),
                        stream_ordering: info.stream_ordering,
                        visible: visible_to(&info, local, partial_state, destination),
                        pdu: info.pdu,
                    }))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            rooms.push(CatchUpRoom {
                room_id,
                stream_ordering,
                event_id,
                pdu,
                partial_state,
                extremities,
                undeliverable,
            });
        }
        Ok(rooms)
    }

    fn outstanding(&mut self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StoreError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT destination FROM (
                 SELECT destination FROM to_device_outbox
                 UNION
                 SELECT r.destination FROM destination_rooms r LEFT JOIN destinations d USING (destination)
                 WHERE r.stream_ordering > coalesce(d.last_successful_stream_ordering, 0))
             WHERE ?1 IS NULL OR destination > ?1
             ORDER BY destination LIMIT ?2",
        )?;
        let rows =
            statement.query_map(params![after.map(ServerName::as_str), i64::from(limit)], |r| r.get::<_, String>(0))?;
        rows.map(|row| {
            let name = row?;
            ServerName::parse(&name)
                .map_err(|e| StoreError::Backend(format!("stored destination {name:?} is invalid: {e}")))
        })
        .collect()
    }
}
