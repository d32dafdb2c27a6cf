//! Homeserver-owned facts about events: what fan-out needs ([`PduInfo`]), catch-up rooms,
//! destinations with outstanding work, and the hosts EDUs go to.
//!
//! Hosts at an event: Synapse resolves the state at all of the event's `prev_events`. Here,
//! with one prev event (the common case) the result is the same — the joined members in the
//! state group after that prev event. With several, the union of the joined hosts of each
//! prev event's state is used, which may include a server that state resolution would have
//! removed; it then receives an event it is not entitled to route, never misses one.
//!
//! Catch-up visibility (simplified): an extremity is visible to a destination when its
//! sender is not erased, it is not a remote event in a partial-state room, and either the
//! room's history is `world_readable` in the state after it or the destination has a member
//! joined or invited in that state. Anything not visible is replaced by the owed event
//! itself, so the rule can only cost a destination some history it could have had.

use std::collections::{BTreeSet, HashMap};

use deadpool_postgres::GenericClient;
use fedsend_core::{CatchUpRoom, Extremity, PduInfo, PresenceState, ServerName, server_of};
use serde_json::{Map, Value};
use tracing::warn;

use super::{Ownership, PgError, SynapseDb, parse_server, to_i64, to_u64};
use crate::replication::ReceiptRow;

/// Extremities offered per catch-up room, as Synapse picks them for new events.
pub const EXTREMITIES_PER_ROOM_MAX: i64 = 10;

/// The `unsigned` keys Synapse's `get_pdu_json` keeps; everything else there (redaction
/// details, transaction ids, relations) is local to our clients.
const UNSIGNED_FOR_FEDERATION: [&str; 6] =
    ["age_ts", "invite_room_state", "knock_room_state", "prev_content", "prev_sender", "replaces_state"];

/// An event newer than a position: enough to look up cached routing facts before
/// [`SynapseDb::fetch_events`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEventId {
    /// Its stream ordering.
    pub stream_ordering: u64,
    /// Its id.
    pub event_id: String,
}

/// The stored form of one event, as read from `events` and `event_json`.
struct StoredEvent {
    stream_ordering: u64,
    event_id: String,
    room_id: String,
    kind: String,
    state_key: Option<String>,
    sender: String,
    received_ts: Option<u64>,
    rejected: Option<String>,
    internal_metadata: Option<String>,
    json: Option<String>,
    membership: Option<String>,
}

const EVENT_COLUMNS: &str = "e.stream_ordering, e.event_id, e.room_id, e.type, e.state_key, e.sender, e.received_ts,
     COALESCE(rej.reason, e.rejection_reason), ej.internal_metadata, ej.json, rm.membership";

const EVENT_JOINS: &str = "FROM events e
     LEFT JOIN event_json ej USING (event_id)
     LEFT JOIN rejections rej USING (event_id)
     LEFT JOIN room_memberships rm USING (event_id)";

fn stored(row: &tokio_postgres::Row) -> StoredEvent {
    StoredEvent {
        stream_ordering: to_u64(row.get(0)).unwrap_or(0),
        event_id: row.get(1),
        room_id: row.get(2),
        kind: row.get(3),
        state_key: row.get(4),
        sender: row.get::<_, Option<String>>(5).unwrap_or_default(),
        received_ts: row.get::<_, Option<i64>>(6).and_then(to_u64),
        rejected: row.get(7),
        internal_metadata: row.get(8),
        json: row.get(9),
        membership: row.get(10),
    }
}

/// The event as it goes into a transaction: the stored JSON (which for room versions 3 and
/// later has no `event_id`) with `unsigned` cut to what Synapse sends. `age_ts` stays as
/// stored: Synapse serialises transactions without a time, so it never becomes `age`.
fn pdu_json(text: &str) -> Result<Map<String, Value>, String> {
    let mut pdu: Map<String, Value> = match serde_json::from_str(text) {
        Ok(Value::Object(pdu)) => pdu,
        Ok(_) => return Err("event JSON is not an object".into()),
        Err(e) => return Err(format!("event JSON does not parse: {e}")),
    };
    let unsigned = match pdu.remove("unsigned") {
        Some(Value::Object(unsigned)) => {
            unsigned.into_iter().filter(|(key, _)| UNSIGNED_FOR_FEDERATION.contains(&key.as_str())).collect()
        }
        _ => Map::new(),
    };
    pdu.insert("unsigned".into(), Value::Object(unsigned));
    Ok(pdu)
}

#[derive(Default)]
struct Flags {
    send_on_behalf_of: Option<String>,
    out_of_band_membership: bool,
    proactively_send: bool,
}

fn flags(text: Option<&str>) -> Flags {
    let metadata: Map<String, Value> = text.and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default();
    Flags {
        send_on_behalf_of: metadata.get("send_on_behalf_of").and_then(Value::as_str).map(str::to_owned),
        out_of_band_membership: metadata.get("out_of_band_membership").and_then(Value::as_bool).unwrap_or(false),
        proactively_send: metadata.get("proactively_send").and_then(Value::as_bool).unwrap_or(true),
    }
}

/// Event ids in `prev_events` or `auth_events`: plain strings from room version 3, `[id,
/// hashes]` pairs before.
fn event_refs(pdu: &Map<String, Value>, key: &str) -> Vec<String> {
    pdu.get(key)
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.as_str().or_else(|| r.get(0).and_then(Value::as_str)))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn placeholder(event: &StoredEvent) -> PduInfo {
    PduInfo {
        event_id: event.event_id.clone(),
        room_id: event.room_id.clone(),
        stream_ordering: event.stream_ordering,
        sender: event.sender.clone(),
        has_prev_events: true,
        hosts: Vec::new(),
        partial_state_servers: None,
        invitee_server: None,
        proactively_send: false,
        out_of_band: true,
        send_on_behalf_of: None,
        received_ts: event.received_ts,
        pdu: Value::Object(Map::new()),
    }
}

fn servers(names: impl IntoIterator<Item = String>) -> Vec<ServerName> {
    let set: BTreeSet<ServerName> = names
        .into_iter()
        .filter_map(|name| match ServerName::parse(&name) {
            Ok(server) => Some(server),
            Err(_) => {
                warn!(server = %name, "ignoring a member whose server name is invalid");
                None
            }
        })
        .collect();
    set.into_iter().collect()
}

/// Servers with a joined member in the state after `state_group`: the group's rows plus
/// its ancestors' (each ancestor holds a delta), nearest first per state key.
const JOINED_HOSTS_AT_GROUP: &str = "WITH RECURSIVE chain(state_group, depth) AS (
         SELECT $1::bigint, 0
         UNION ALL
         SELECT e.prev_state_group, c.depth + 1 FROM state_group_edges e JOIN chain c ON e.state_group = c.state_group
     ), members AS (
         SELECT DISTINCT ON (s.state_key) s.state_key, s.event_id
         FROM state_groups_state s JOIN chain c USING (state_group)
         WHERE s.type = 'm.room.member'
         ORDER BY s.state_key, c.depth
     )
     SELECT DISTINCT substring(m.state_key FROM '@[^:]*:(.*)$')
     FROM members m JOIN room_memberships rm USING (event_id)
     WHERE rm.membership = ANY($2)";

/// The same walk for one state key: the event that holds it in the state after the group.
const STATE_AT_GROUP: &str = "WITH RECURSIVE chain(state_group, depth) AS (
         SELECT $1::bigint, 0
         UNION ALL
         SELECT e.prev_state_group, c.depth + 1 FROM state_group_edges e JOIN chain c ON e.state_group = c.state_group
     )
     SELECT s.event_id FROM state_groups_state s JOIN chain c USING (state_group)
     WHERE s.type = $2 AND s.state_key = $3
     ORDER BY c.depth LIMIT 1";

impl SynapseDb {
    /// Highest stream ordering of any persisted event (0 when there is none).
    pub async fn max_stream_ordering(&self) -> Result<u64, PgError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached("SELECT COALESCE(MAX(stream_ordering), 0) FROM events").await?;
        Ok(to_u64(client.query_one(&stmt, &[]).await?.get(0)).unwrap_or(0))
    }

    /// The ids of the events [`Self::fetch_events`] would answer with, for looking up cached
    /// hosts first.
    pub async fn new_event_ids(&self, after: u64, up_to: u64, limit: u32) -> Result<Vec<NewEventId>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT stream_ordering, event_id FROM events WHERE stream_ordering > $1 AND stream_ordering <= $2
                 ORDER BY stream_ordering LIMIT $3",
            )
            .await?;
        let (after, up_to) = (to_i64(after, "stream ordering")?, to_i64(up_to, "stream ordering")?);
        let rows = client.query(&stmt, &[&after, &up_to, &i64::from(limit)]).await?;
        Ok(rows
            .iter()
            .map(|r| NewEventId { stream_ordering: to_u64(r.get(0)).unwrap_or(0), event_id: r.get(1) })
            .collect())
    }

    /// Answers `FetchEvents`: one [`PduInfo`] per row of `events` with stream ordering in
    /// (`after`, `up_to`], ascending, at most `limit`. `up_to` must be a position the writer
    /// announced as persisted: Synapse persists events in concurrent transactions, so a row can
    /// be visible while one below it is not yet, and reading past the announced position would
    /// move the sender beyond an event that commits later, which then never leaves. A rejected event, or one whose JSON cannot be
    /// used, is answered as an out-of-band placeholder so the batch keeps its length.
    /// `cached_hosts` maps event ids to their hosts already known (Synapse's joined-hosts
    /// cache); other events' hosts are computed from state groups.
    pub async fn fetch_events(
        &self,
        after: u64,
        up_to: u64,
        limit: u32,
        cached_hosts: &HashMap<String, Vec<ServerName>>,
    ) -> Result<Vec<PduInfo>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} {EVENT_JOINS}
                 WHERE e.stream_ordering > $1 AND e.stream_ordering <= $2 ORDER BY e.stream_ordering LIMIT $3"
            ))
            .await?;
        let (after, up_to) = (to_i64(after, "stream ordering")?, to_i64(up_to, "stream ordering")?);
        let rows = client.query(&stmt, &[&after, &up_to, &i64::from(limit)]).await?;
        let mut group_hosts: HashMap<i64, Vec<String>> = HashMap::new();
        let mut partial: HashMap<String, Option<Vec<ServerName>>> = HashMap::new();
        let mut infos = Vec::with_capacity(rows.len());
        for row in &rows {
            let event = stored(row);
            if let Some(reason) = &event.rejected {
                tracing::debug!(event_id = %event.event_id, reason = %reason, "rejected event: not sent");
                infos.push(placeholder(&event));
                continue;
            }
            let Some(text) = &event.json else {
                warn!(event_id = %event.event_id, "event has no JSON row: not sent");
                infos.push(placeholder(&event));
                continue;
            };
            let pdu = match pdu_json(text) {
                Ok(pdu) => pdu,
                Err(why) => {
                    warn!(event_id = %event.event_id, reason = %why, "event cannot be sent");
                    infos.push(placeholder(&event));
                    continue;
                }
            };
            let flags = flags(event.internal_metadata.as_deref());
            let prev_events = event_refs(&pdu, "prev_events");
            let local = server_of(&event.sender) == Some(self.server_name.as_str());
            let send_on_behalf_of =
                match flags.send_on_behalf_of.as_deref().map(|s| parse_server(s, "send_on_behalf_of")) {
                    Some(Ok(server)) => Some(server),
                    Some(Err(e)) => {
                        warn!(event_id = %event.event_id, error = %e, "ignoring send_on_behalf_of");
                        None
                    }
                    None => None,
                };
            // Routing facts cost queries; only events the core will send need them.
            let routed = (local || send_on_behalf_of.is_some())
                && !flags.out_of_band_membership
                && flags.proactively_send
                && !prev_events.is_empty();
            let mut info = PduInfo {
                event_id: event.event_id.clone(),
                room_id: event.room_id.clone(),
                stream_ordering: event.stream_ordering,
                sender: event.sender.clone(),
                has_prev_events: !prev_events.is_empty(),
                hosts: Vec::new(),
                partial_state_servers: None,
                invitee_server: None,
                proactively_send: flags.proactively_send,
                out_of_band: flags.out_of_band_membership,
                send_on_behalf_of,
                received_ts: event.received_ts,
                pdu: Value::Null,
            };
            if routed {
                if !partial.contains_key(&event.room_id) {
                    let servers = partial_state_servers(&client, &event.room_id).await?;
                    partial.insert(event.room_id.clone(), servers);
                }
                info.partial_state_servers = partial[&event.room_id].clone();
                if info.partial_state_servers.is_none() {
                    info.hosts = match cached_hosts.get(&event.event_id) {
                        Some(hosts) => hosts.clone(),
                        None => hosts_before(&client, &prev_events, &mut group_hosts).await?,
                    };
                }
                info.invitee_server = invitee_server(&client, &event, &pdu).await?;
            }
            info.pdu = Value::Object(pdu);
            infos.push(info);
        }
        Ok(infos)
    }

    /// Answers `LoadCatchUp`: `destination`'s `destination_rooms` rows with `after` <
    /// stream ordering ≤ `up_to`, ascending, at most `limit`, joined with their events
    /// (purged events omitted; rejected or unreadable ones marked undeliverable), the room's partial-state flag and up to
    /// [`EXTREMITIES_PER_ROOM_MAX`] forward extremities, deepest first.
    pub async fn load_catch_up(
        &self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM destination_rooms dr
                 JOIN events e USING (stream_ordering)
                 LEFT JOIN event_json ej USING (event_id)
                 LEFT JOIN rejections rej USING (event_id)
                 LEFT JOIN room_memberships rm USING (event_id)
                 WHERE dr.destination = $1 AND dr.stream_ordering > $2 AND dr.stream_ordering <= $3
                 ORDER BY dr.stream_ordering LIMIT $4"
            ))
            .await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &destination.as_str(),
                    &to_i64(after, "stream ordering")?,
                    &to_i64(up_to, "stream ordering")?,
                    &i64::from(limit),
                ],
            )
            .await?;
        let extremities_stmt = client
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM event_forward_extremities f
                 JOIN events e USING (event_id)
                 LEFT JOIN event_json ej USING (event_id)
                 LEFT JOIN rejections rej USING (event_id)
                 LEFT JOIN room_memberships rm USING (event_id)
                 WHERE f.room_id = $1
                 ORDER BY e.depth DESC, e.stream_ordering DESC LIMIT {EXTREMITIES_PER_ROOM_MAX}"
            ))
            .await?;
        let mut rooms = Vec::new();
        for row in &rows {
            let event = stored(row);
            let usable = match (&event.rejected, event.json.as_deref()) {
                (Some(reason), _) => Err(format!("rejected: {reason}")),
                (None, None) => Err("no event_json row".to_owned()),
                (None, Some(text)) => pdu_json(text),
            };
            let pdu = match usable {
                Ok(pdu) => pdu,
                Err(why) => {
                    // Handed over as undeliverable so the destination's catch-up moves past it.
                    warn!(event_id = %event.event_id, reason = %why, "catch-up event cannot be sent");
                    rooms.push(CatchUpRoom {
                        room_id: event.room_id,
                        stream_ordering: event.stream_ordering,
                        event_id: event.event_id,
                        pdu: Value::Object(Map::new()),
                        partial_state: false,
                        extremities: Vec::new(),
                        undeliverable: Some(why),
                    });
                    continue;
                }
            };
            let partial_state = partial_state_servers(&client, &event.room_id).await?.is_some();
            let mut extremities = Vec::new();
            for row in client.query(&extremities_stmt, &[&event.room_id]).await? {
                let extremity = stored(&row);
                if extremity.rejected.is_some() {
                    continue;
                }
                let Some(x_pdu) = extremity.json.as_deref().and_then(|text| pdu_json(text).ok()) else { continue };
                let local = server_of(&extremity.sender) == Some(self.server_name.as_str());
                let visible = (local || !partial_state)
                    && visible_to(&client, &extremity.event_id, &extremity.sender, destination).await?;
                extremities.push(Extremity {
                    event_id: extremity.event_id,
                    stream_ordering: extremity.stream_ordering,
                    visible,
                    pdu: Value::Object(x_pdu),
                });
            }
            rooms.push(CatchUpRoom {
                room_id: event.room_id,
                stream_ordering: event.stream_ordering,
                event_id: event.event_id,
                pdu: Value::Object(pdu),
                partial_state,
                extremities,
                undeliverable: None,
            });
        }
        Ok(rooms)
    }

    /// Answers `LoadOutstanding` for this instance: destinations it owns, named after
    /// `after`, sorted, at most `limit`, with a `destination_rooms` row above their last
    /// successful stream ordering or a to-device row. Backoff is not applied here (Synapse's
    /// query does): the core knows each destination's backoff and decides itself.
    pub async fn outstanding(
        &self,
        ownership: &Ownership,
        after: Option<&ServerName>,
        limit: u32,
    ) -> Result<Vec<ServerName>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT destination FROM (
                     SELECT DISTINCT dr.destination FROM destination_rooms dr
                     LEFT JOIN destinations d USING (destination)
                     WHERE dr.destination > $1
                       AND dr.stream_ordering > COALESCE(d.last_successful_stream_ordering, 0)
                     UNION
                     SELECT DISTINCT destination FROM device_federation_outbox WHERE destination > $1
                 ) owed ORDER BY destination LIMIT $2",
            )
            .await?;
        let mut cursor = after.map_or_else(String::new, |s| s.as_str().to_owned());
        let page = i64::from(limit.clamp(1, 1000));
        let mut found = Vec::new();
        // Ownership is a hash, not SQL: page until enough owned names or the end.
        loop {
            let rows = client.query(&stmt, &[&cursor, &page]).await?;
            let full = rows.len() as i64 == page;
            for row in &rows {
                let name: String = row.get(0);
                cursor.clone_from(&name);
                if !ownership.owns(&name) {
                    continue;
                }
                match ServerName::parse(&name) {
                    Ok(server) => found.push(server),
                    Err(_) => warn!(destination = %name, "skipping an outstanding destination with an invalid name"),
                }
                if found.len() >= limit as usize {
                    return Ok(found);
                }
            }
            if !full {
                return Ok(found);
            }
        }
    }

    /// Servers with a member joined to the room now (typing, receipts).
    pub async fn hosts_in_room(&self, room_id: &str) -> Result<Vec<ServerName>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT DISTINCT substring(state_key FROM '@[^:]*:(.*)$') FROM current_state_events
                 WHERE type = 'm.room.member' AND membership = 'join' AND room_id = $1",
            )
            .await?;
        let rows = client.query(&stmt, &[&room_id]).await?;
        Ok(servers(rows.iter().filter_map(|r| r.get::<_, Option<String>>(0))))
    }

    /// Servers sharing a room with `user_id` now: a joined member in a room where the user is
    /// joined (presence).
    pub async fn hosts_sharing_room_with(&self, user_id: &str) -> Result<Vec<ServerName>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT DISTINCT substring(other.state_key FROM '@[^:]*:(.*)$')
                 FROM current_state_events mine
                 JOIN current_state_events other ON other.room_id = mine.room_id
                 WHERE mine.type = 'm.room.member' AND mine.state_key = $1 AND mine.membership = 'join'
                   AND other.type = 'm.room.member' AND other.membership = 'join'",
            )
            .await?;
        let rows = client.query(&stmt, &[&user_id]).await?;
        Ok(servers(rows.iter().filter_map(|r| r.get::<_, Option<String>>(0))))
    }

    /// The receipts stream's newest id: where replication of receipts starts, so that the first
    /// POSITION after start-up is not read as everything since the beginning having been missed.
    pub async fn receipts_position(&self) -> Result<i64, PgError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached("SELECT COALESCE(MAX(stream_id), 0) FROM receipts_linearized").await?;
        Ok(client.query_one(&stmt, &[]).await?.get(0))
    }

    /// Receipts `instance` wrote with stream ids in (`after`, `up_to`], ascending, at most
    /// `limit`: rows replication announced while this process was not listening (a gap).
    pub async fn receipts_between(
        &self,
        instance: &str,
        after: i64,
        up_to: i64,
        limit: u32,
    ) -> Result<Vec<(i64, ReceiptRow)>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT stream_id, room_id, receipt_type, user_id, event_id, thread_id, data FROM receipts_linearized
                 WHERE stream_id > $1 AND stream_id <= $2 AND instance_name = $3 ORDER BY stream_id LIMIT $4",
            )
            .await?;
        let rows = client.query(&stmt, &[&after, &up_to, &instance, &i64::from(limit)]).await?;
        Ok(rows
            .iter()
            .map(|row| {
                let data: Option<String> = row.get(6);
                // A row whose data is not JSON still says who read what; its data is dropped.
                let data =
                    data.and_then(|text| serde_json::from_str(&text).ok()).unwrap_or_else(|| Value::Object(Map::new()));
                let receipt = ReceiptRow {
                    room_id: row.get(1),
                    receipt_type: row.get(2),
                    user_id: row.get(3),
                    event_id: row.get(4),
                    thread_id: row.get(5),
                    data,
                };
                (row.get(0), receipt)
            })
            .collect())
    }

    /// The user's newest row in `presence_stream`, if any.
    pub async fn presence_state(&self, user_id: &str) -> Result<Option<PresenceState>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT state, last_active_ts, status_msg, currently_active FROM presence_stream
                 WHERE user_id = $1 ORDER BY stream_id DESC LIMIT 1",
            )
            .await?;
        Ok(client.query_opt(&stmt, &[&user_id]).await?.map(|row| PresenceState {
            user_id: user_id.to_owned(),
            presence: row.get::<_, Option<String>>(0).unwrap_or_else(|| "offline".into()),
            last_active_ts: row.get::<_, Option<i64>>(1).and_then(to_u64),
            status_msg: row.get(2),
            currently_active: row.get(3),
        }))
    }
}

/// The servers recorded when we joined a room with partial state, or None when the room has
/// full state.
async fn partial_state_servers<C: GenericClient>(
    client: &C,
    room_id: &str,
) -> Result<Option<Vec<ServerName>>, PgError> {
    let stmt = client.prepare_cached("SELECT 1 FROM partial_state_rooms WHERE room_id = $1").await?;
    if client.query_opt(&stmt, &[&room_id]).await?.is_none() {
        return Ok(None);
    }
    let stmt = client.prepare_cached("SELECT server_name FROM partial_state_rooms_servers WHERE room_id = $1").await?;
    let rows = client.query(&stmt, &[&room_id]).await?;
    Ok(Some(servers(rows.iter().map(|r| r.get(0)))))
}

/// Joined hosts in the state before an event with these prev events (see the module docs).
async fn hosts_before<C: GenericClient>(
    client: &C,
    prev_events: &[String],
    cache: &mut HashMap<i64, Vec<String>>,
) -> Result<Vec<ServerName>, PgError> {
    let stmt = client
        .prepare_cached("SELECT DISTINCT state_group FROM event_to_state_groups WHERE event_id = ANY($1)")
        .await?;
    let groups: Vec<i64> = client.query(&stmt, &[&prev_events]).await?.iter().map(|r| r.get(0)).collect();
    if groups.is_empty() {
        warn!(?prev_events, "no state group for any prev event: the event goes to no server");
    }
    let walk = client.prepare_cached(JOINED_HOSTS_AT_GROUP).await?;
    let joined = vec!["join".to_owned()];
    let mut hosts = Vec::new();
    for group in groups {
        if let Some(known) = cache.get(&group) {
            hosts.extend(known.iter().cloned());
            continue;
        }
        let rows = client.query(&walk, &[&group, &joined]).await?;
        let found: Vec<String> = rows.iter().filter_map(|r| r.get::<_, Option<String>>(0)).collect();
        hosts.extend(found.iter().cloned());
        cache.insert(group, found);
    }
    Ok(servers(hosts))
}

/// The invitee's server when `event` rescinds an invite: a leave sent by someone else whose
/// auth events hold the invite. A kick of a joined member has no invite there.
async fn invitee_server<C: GenericClient>(
    client: &C,
    event: &StoredEvent,
    pdu: &Map<String, Value>,
) -> Result<Option<ServerName>, PgError> {
    let Some(target) = event.state_key.as_deref() else { return Ok(None) };
    if event.kind != "m.room.member" || event.membership.as_deref() != Some("leave") || target == event.sender {
        return Ok(None);
    }
    let auth_events = event_refs(pdu, "auth_events");
    let stmt = client
        .prepare_cached(
            "SELECT 1 FROM room_memberships WHERE event_id = ANY($1) AND user_id = $2 AND membership = 'invite'",
        )
        .await?;
    if client.query_opt(&stmt, &[&auth_events, &target]).await?.is_none() {
        return Ok(None);
    }
    Ok(server_of(target).and_then(|s| ServerName::parse(s).ok()))
}

/// The simplified server visibility of one event (see the module docs).
async fn visible_to<C: GenericClient>(
    client: &C,
    event_id: &str,
    sender: &str,
    destination: &ServerName,
) -> Result<bool, PgError> {
    let stmt = client.prepare_cached("SELECT 1 FROM erased_users WHERE user_id = $1").await?;
    if client.query_opt(&stmt, &[&sender]).await?.is_some() {
        return Ok(false);
    }
    let stmt = client.prepare_cached("SELECT state_group FROM event_to_state_groups WHERE event_id = $1").await?;
    let Some(group) = client.query_opt(&stmt, &[&event_id]).await?.map(|r| r.get::<_, i64>(0)) else {
        return Ok(false);
    };
    let state = client.prepare_cached(STATE_AT_GROUP).await?;
    let history: Option<String> =
        client.query_opt(&state, &[&group, &"m.room.history_visibility", &""]).await?.map(|r| r.get(0));
    if let Some(history_event) = history {
        let stmt = client.prepare_cached("SELECT json FROM event_json WHERE event_id = $1").await?;
        if let Some(row) = client.query_opt(&stmt, &[&history_event]).await? {
            let json: Value = serde_json::from_str(&row.get::<_, String>(0)).unwrap_or(Value::Null);
            if json.pointer("/content/history_visibility").and_then(Value::as_str) == Some("world_readable") {
                return Ok(true);
            }
        }
    }
    let walk = client.prepare_cached(JOINED_HOSTS_AT_GROUP).await?;
    let memberships = vec!["join".to_owned(), "invite".to_owned()];
    let rows = client.query(&walk, &[&group, &memberships]).await?;
    Ok(rows.iter().filter_map(|r| r.get::<_, Option<String>>(0)).any(|host| host == destination.as_str()))
}
