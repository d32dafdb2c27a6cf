//! The values that cross the boundary: [`Input`] in, [`Output`] out, and the records they carry.
//!
//! Every type here has one serde encoding, tagged JSON, shared by the wasmtime plugin ABI,
//! the JavaScript bindings and scenario traces. Unknown fields are refused, so a typo in a
//! host is an error rather than a silently ignored value.
//!
//! With the `ts` feature these types, and those of event.rs, edu.rs, config.rs and types.rs,
//! also derive their TypeScript declarations for the npm package (npm/types.d.ts); the `ts(…)`
//! attributes follow the conventions listed in core/tests/typescript.rs.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::edu::{PresenceState, Receipt};
use crate::types::{RequestId, ServerName};

fn yes() -> bool {
    true
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Everything the host tells the machine. See the crate docs for the run-loop contract.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub enum Input {
    // ----- commands -----
    /// The homeserver persisted events up to this stream ordering (inclusive). The machine
    /// fetches and fans them out with [`Output::FetchEvents`]; notifications may be coalesced.
    NewEvents {
        /// Highest stream ordering now persisted.
        up_to: u64,
    },
    /// An operator asks to retry `destination` now: its backoff is cleared and it is woken,
    /// like Synapse's admin `reset_connection`.
    WakeDestination {
        /// The server to retry.
        destination: ServerName,
    },
    /// `destination` made an authenticated request to us, so it is up: its backoff is cleared
    /// and anything owed to it is sent (including after HTTP 410).
    RemoteUp {
        /// The server that contacted us.
        destination: ServerName,
    },
    /// An EDU for one destination, sent at once. With a `key`, a newer EDU of the same type
    /// and key replaces a queued older one (keyed EDUs leave oldest first).
    Edu {
        /// Where it goes; ourselves is refused.
        destination: ServerName,
        /// The EDU type.
        edu_type: String,
        /// The EDU content.
        #[cfg_attr(feature = "ts", ts(type = "Json"))]
        content: Value,
        /// Replacement key, for keyed EDUs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// A local user started or stopped typing: an `m.typing` EDU, keyed by (room, user), to
    /// the room's servers that are not backing off right now.
    Typing {
        /// The room.
        room_id: String,
        /// The local user.
        user_id: String,
        /// Typing or not.
        typing: bool,
        /// The servers in the room.
        hosts: Vec<ServerName>,
    },
    /// A local user's read receipt, for the room's servers. Sent at once to rooms with fewer
    /// than 10 other servers, for events received in the last minute, and to the event
    /// sender's server; otherwise staggered (it rides along earlier if anything else goes).
    Receipt {
        /// The receipt (one per room, type, user and thread: a newer one replaces).
        receipt: Receipt,
        /// The servers in the room.
        hosts: Vec<ServerName>,
        /// The receipted event's sender and arrival, if the homeserver knows the event; an
        /// unknown event in a big room is treated as old (staggered to everyone).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<ReceiptedEvent>,
    },
    /// To-device messages from a local user to remote users: grouped per server, split into
    /// EDUs of at most 64 KiB, written to the durable outbox ([`Changes::to_device_outbox`])
    /// and sent at once. Delivered exactly once per `message_id` by receivers that
    /// deduplicate, across retries and restarts.
    ToDevice {
        /// The local sender.
        sender: String,
        /// The event type (e.g. `m.room_key_request`).
        message_type: String,
        /// Id of the message (chunks after the first get `.N`); generated when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        /// Recipient user → device id (or `*`) → content.
        #[cfg_attr(feature = "ts", ts(type = "{ [userId: string]: { [deviceId: string]: Json } }"))]
        messages: BTreeMap<String, BTreeMap<String, Value>>,
    },
    /// Presence of local users for the given servers (staggered; ignored when presence is
    /// disabled).
    Presence {
        /// The states.
        states: Vec<PresenceState>,
        /// The servers interested in them.
        destinations: Vec<ServerName>,
    },
    /// A local user's device was added, changed or deleted (homeserver device-list stream
    /// position `stream_id`), to be announced to `destinations` — every server sharing a room
    /// with the user, which only the homeserver knows. Durable and staggered through the
    /// wake-up queue; per (destination, user) the `m.device_list_update` EDUs form a `prev_id`
    /// chain across failures and restarts, and several changes to one device not yet sent
    /// collapse into the newest.
    DeviceListUpdate {
        /// The local user.
        user_id: String,
        /// The device.
        device_id: String,
        /// Position in the homeserver's device-list stream; increases per user. An update not
        /// newer than one already queued or delivered for the destination is ignored.
        stream_id: u64,
        /// The device is gone.
        #[serde(default, skip_serializing_if = "is_false")]
        deleted: bool,
        /// The device's current keys (omitted for a deleted device).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "ts", ts(type = "Json"))]
        keys: Option<Value>,
        /// The device's display name, if the homeserver shares it over federation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_display_name: Option<String>,
        /// The servers to tell.
        destinations: Vec<ServerName>,
    },
    /// A local user's cross-signing keys changed: sent as an `m.signing_key_update` and
    /// `org.matrix.signing_key_update` pair (costing two EDU slots), otherwise handled like
    /// [`Input::DeviceListUpdate`].
    SigningKeyUpdate {
        /// The local user.
        user_id: String,
        /// Position in the homeserver's device-list stream.
        stream_id: u64,
        /// The new master key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "ts", ts(type = "Json"))]
        master_key: Option<Value>,
        /// The new self-signing key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "ts", ts(type = "Json"))]
        self_signing_key: Option<Value>,
        /// The servers to tell.
        destinations: Vec<ServerName>,
    },
    /// To-device EDUs the homeserver already keeps durably in an outbox of its own (Synapse's
    /// `device_federation_outbox`): queued and sent at once like [`Input::ToDevice`], but not
    /// persisted again. A delivered row is deleted through [`Changes::to_device_deleted`]
    /// under its `outbox_id`, which is the homeserver's id. Hosts feed each row once, in id
    /// order per destination; a row still queued or in flight is ignored.
    StoredToDevice {
        /// The rows.
        rows: Vec<OutboxRow>,
    },
    /// Device-list changes the homeserver already keeps durably (Synapse's
    /// `device_lists_outbound_pokes`): queued like [`Input::DeviceListUpdate`] but not
    /// persisted again; delivered ones are deleted through
    /// [`Changes::device_list_pokes_deleted`].
    StoredDeviceListPokes {
        /// The pokes, with the content of their EDU minus `prev_id`.
        pokes: Vec<DeviceListPoke>,
    },
    /// An operator overwrote the stored state of a destination (backoff timings and last
    /// successful stream position); the machine adopts it as is.
    SetDestinationState {
        /// The new state.
        state: DestinationState,
    },
    // ----- completions of earlier outputs -----
    /// Answer to [`Output::FetchEvents`]: events after `after`, ascending, at most `limit`.
    EventsFetched {
        /// The request answered.
        request: RequestId,
        /// The events with what fan-out needs to know about them.
        events: Vec<PduInfo>,
    },
    /// Answer to [`Output::LoadCatchUp`].
    CatchUpLoaded {
        /// The request answered.
        request: RequestId,
        /// One entry per room, ascending by `stream_ordering`.
        rooms: Vec<CatchUpRoom>,
    },
    /// Answer to [`Output::LoadOutstanding`]: destinations after the cursor, sorted by name.
    OutstandingLoaded {
        /// The request answered.
        request: RequestId,
        /// Destinations with catch-up work in storage.
        destinations: Vec<ServerName>,
    },
    /// A [`Output::Persist`] is durable.
    Persisted {
        /// The request answered.
        request: RequestId,
    },
    /// A storage request (persist or query) failed; the machine retries it later.
    StorageFailed {
        /// The request answered.
        request: RequestId,
        /// What went wrong, for logs.
        error: String,
    },
    /// How one attempt of a [`Output::SendTransaction`] ended.
    TransactionDone {
        /// The request answered.
        request: RequestId,
        /// The outcome of the attempt.
        result: TransactionResult,
    },
    // ----- time -----
    /// The deadline from [`crate::FederationSender::poll_timeout`] has passed (early or
    /// repeated timeouts are harmless).
    Timeout,
}

/// What the receipt rules need to know about the event a receipt points at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct ReceiptedEvent {
    /// The event's sender.
    pub sender: String,
    /// When our server received it (Unix ms).
    pub received_ts: u64,
}

/// The outcome of one HTTP attempt of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub enum TransactionResult {
    /// 2xx. Per-PDU errors are logged and reported but cause no retry (the spec's contract).
    Ok {
        /// Event id to error text, from the response's `pdus` object.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pdu_errors: BTreeMap<String, String>,
    },
    /// Any non-2xx HTTP status.
    Status {
        /// The HTTP status.
        status: u16,
        /// From a `Retry-After` header or a `retry_after_ms` body field, on 429/503.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// The Matrix `errcode`, if the body had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        errcode: Option<String>,
    },
    /// Connection refused, DNS or TLS failure: nothing reached the server.
    Unreachable,
    /// No answer within the request timeout.
    Timeout,
}

/// What fan-out needs to know about one persisted event (homeserver-owned facts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct PduInfo {
    /// The event id.
    pub event_id: String,
    /// The room; an event without one is skipped with [`crate::Event::EventSkipped`].
    pub room_id: String,
    /// Position in the homeserver's events stream.
    pub stream_ordering: u64,
    /// The sender's user id; only events of local senders are sent (or on-behalf-of ones).
    pub sender: String,
    /// False for a room's create event, which goes nowhere.
    #[serde(default = "yes")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub has_prev_events: bool,
    /// Servers with a member joined in the room state *before* this event, so that a server
    /// whose last member is kicked still receives the kick.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub hosts: Vec<ServerName>,
    /// For a partial-state room: the servers recorded at join time, used instead of `hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_state_servers: Option<Vec<ServerName>>,
    /// For a kick or rescind of an invite: the invitee's server, which must learn of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitee_server: Option<ServerName>,
    /// Synapse's `proactively_send` internal flag.
    #[serde(default = "yes")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub proactively_send: bool,
    /// An out-of-band membership (outlier invite, rejection, knock): never sent.
    #[serde(default, skip_serializing_if = "is_false")]
    pub out_of_band: bool,
    /// Sent on behalf of this server, which is then not sent the event itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_on_behalf_of: Option<ServerName>,
    /// When our server received the event (Unix ms); read-receipt rules use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_ts: Option<u64>,
    /// The event in federation format, exactly as it goes into a transaction.
    #[cfg_attr(feature = "ts", ts(type = "Json"))]
    pub pdu: Value,
}

/// One room owed to a destination, as found by a catch-up query (sender-owned
/// `destination_rooms` joined with homeserver-owned event data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct CatchUpRoom {
    /// The room.
    pub room_id: String,
    /// The `destination_rooms` stream ordering for (destination, room).
    pub stream_ordering: u64,
    /// The event at that stream ordering.
    pub event_id: String,
    /// That event in federation format (redactions applied).
    #[cfg_attr(feature = "ts", ts(type = "Json"))]
    pub pdu: Value,
    /// The room is partial-state on our side: extremities cannot be judged.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub partial_state: bool,
    /// Up to 10 current forward extremities of the room, highest depth first.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub extremities: Vec<Extremity>,
    /// Set by a host that cannot hand over the event (unreadable, or nested deeper than any
    /// parser on the way accepts; `pdu` is then `{}`): the machine gives it up with this
    /// reason, so the destination's catch-up moves past it instead of waiting forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undeliverable: Option<String>,
}

/// A forward extremity offered for catch-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct Extremity {
    /// The event id.
    pub event_id: String,
    /// Its stream ordering.
    pub stream_ordering: u64,
    /// Whether the destination may see it (server-level history visibility; false for
    /// erased senders and for remote events in partial-state rooms).
    pub visible: bool,
    /// The event in federation format.
    #[cfg_attr(feature = "ts", ts(type = "Json"))]
    pub pdu: Value,
}

/// Stored state of one destination (the `destinations` table).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct DestinationState {
    /// The destination.
    pub destination: ServerName,
    /// Time of the last failed attempt (Unix ms), 0 when healthy.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub retry_last_ts: u64,
    /// Current backoff interval (ms), 0 when healthy.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub retry_interval: u64,
    /// First failure of the current outage, null when healthy.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub failure_ts: Option<u64>,
    /// Highest stream ordering known delivered: every `destination_rooms` row at or below it
    /// has been sent. Null when nothing was ever delivered.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub last_successful_stream_ordering: Option<u64>,
}

impl Default for ServerName {
    /// Only for `#[derive(Default)]` of records that are always filled in; not a valid peer.
    fn default() -> Self {
        // Invariant: "localhost" satisfies the server-name grammar.
        Self::parse("localhost").expect("literal is a valid server name")
    }
}

/// A `destination_rooms` row: the newest local event in `room` owed to `destination`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct DestinationRoom {
    /// The destination.
    pub destination: ServerName,
    /// The room.
    // Shared text: a fan-out writes a row for every destination of the room, and the batch is
    // kept for a retry, so a clone is a reference-count bump, not a copy.
    pub room_id: Arc<str>,
    /// Stream ordering of the newest event for that pair.
    pub stream_ordering: u64,
}

/// One atomic batch of writes to sender-owned storage.
///
/// Hosts apply a batch all-or-nothing, and batches in the order they are emitted.
/// `incarnation`, `events_out_pos` and `destination_rooms` only ever grow, so hosts apply them
/// as *max*-upserts (keep the larger value); `destinations` rows are plain upserts of the
/// whole row. A batch that failed is issued again later, after newer ones: the max-upserts
/// make that safe, and the machine rewrites the `destinations` rows of a re-issued batch from
/// its current state (docs/design.md, "The storage boundary").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct Changes {
    /// The sender's incarnation counter (transaction ids and outbox ids embed it). Every
    /// batch carries it until one carrying it is durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "ts", ts(optional))]
    pub incarnation: Option<u64>,
    /// Position in the events stream up to which fan-out is durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "ts", ts(optional))]
    pub events_out_pos: Option<u64>,
    /// `destination_rooms` upserts. A row for an unknown destination creates a bare
    /// `destinations` row for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_rooms: Vec<DestinationRoom>,
    /// Whole-row upserts of `destinations`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<DestinationState>,
    /// New rows of the to-device outbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_device_outbox: Vec<OutboxRow>,
    /// Outbox rows delivered (or pruned), to delete: (destination, outbox id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_device_deleted: Vec<OutboxKey>,
    /// Device-list pokes to upsert by (destination, user, device), keeping the row with the
    /// higher `stream_id`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_list_pokes: Vec<DeviceListPoke>,
    /// Pokes delivered or given up: delete the (destination, user, device) row if its
    /// stream id is at most the given one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_list_pokes_deleted: Vec<DeviceListPokeKey>,
    /// Whole-row upserts (or deletions) of the per (destination, user) acknowledged
    /// position, applied in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_list_positions: Vec<DeviceListPosition>,
}

/// A device-list change owed to one destination, durable until delivered (Synapse's
/// `device_lists_outbound_pokes`, collapsed: one row per (destination, user, device)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct DeviceListPoke {
    /// Where it goes.
    pub destination: ServerName,
    /// The local user.
    pub user_id: String,
    /// The device; `None` for the user's cross-signing keys.
    pub device_id: Option<String>,
    /// Position in the homeserver's device-list stream.
    pub stream_id: u64,
    /// When it was queued (Unix ms), for pruning.
    pub queued_ts: u64,
    /// The EDU content without `prev_id` (added when the EDU is built): for a device
    /// `{user_id, device_id, stream_id, deleted?, keys?, device_display_name?}`, for
    /// cross-signing keys `{user_id, master_key?, self_signing_key?}`.
    #[cfg_attr(feature = "ts", ts(type = "Json"))]
    pub content: Value,
}

/// Identifies the version of a [`DeviceListPoke`] that was delivered or given up.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct DeviceListPokeKey {
    /// The destination.
    pub destination: ServerName,
    /// The user.
    pub user_id: String,
    /// The device; `None` for cross-signing keys.
    pub device_id: Option<String>,
    /// The row is deleted only if its stream id is at most this: a newer change that
    /// replaced it meanwhile stays.
    pub stream_id: u64,
}

/// The newest device-list stream id a destination acknowledged for a user: the `prev_id` of
/// the next `m.device_list_update` EDU for that user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct DeviceListPosition {
    /// The destination.
    pub destination: ServerName,
    /// The user.
    pub user_id: String,
    /// The stream id; `None` deletes the row, so the next EDU has an empty `prev_id` and
    /// the destination resynchronises the user's whole device list.
    pub stream_id: Option<u64>,
}

/// A to-device EDU waiting in the durable outbox for its destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct OutboxRow {
    /// Where it goes.
    pub destination: ServerName,
    /// Unique, increasing id (`incarnation × 2^32 + counter`): the order of sending.
    pub outbox_id: u64,
    /// When it was queued (Unix ms), for pruning (D14).
    pub queued_ts: u64,
    /// The whole EDU, `{"content":…,"edu_type":"m.direct_to_device"}`.
    #[cfg_attr(feature = "ts", ts(type = "Json"))]
    pub edu: Value,
}

/// Identifies an outbox row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct OutboxKey {
    /// The destination.
    pub destination: ServerName,
    /// The row.
    pub outbox_id: u64,
}

impl Changes {
    /// True when the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.incarnation.is_none()
            && self.events_out_pos.is_none()
            && self.destination_rooms.is_empty()
            && self.destinations.is_empty()
            && self.to_device_outbox.is_empty()
            && self.to_device_deleted.is_empty()
            && self.device_list_pokes.is_empty()
            && self.device_list_pokes_deleted.is_empty()
            && self.device_list_positions.is_empty()
    }
}

/// What the host loaded from sender-owned storage at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct Recovered {
    /// The last persisted incarnation (0 if none). The machine persists `incarnation + 1`
    /// before it sends anything, so transaction ids never repeat across restarts.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub incarnation: u64,
    /// Events-stream position up to which fan-out is durable; fan-out resumes after it.
    /// None on a fresh install: the host should then set it to its current stream position
    /// unless it wants all history sent.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub events_out_pos: Option<u64>,
    /// Every stored `destinations` row.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub destinations: Vec<DestinationState>,
    /// Every row of the to-device outbox, in any order.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub to_device_outbox: Vec<OutboxRow>,
    /// Every device-list poke not yet delivered, in any order.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub device_list_pokes: Vec<DeviceListPoke>,
    /// Every stored (destination, user) device-list position, in any order.
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub device_list_positions: Vec<DeviceListPosition>,
}

/// Everything the machine asks the host to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub enum Output {
    /// Make one HTTP attempt: `PUT /_matrix/federation/v1/send/{txn_id}` with `body`.
    /// Answer with [`Input::TransactionDone`].
    SendTransaction(OutgoingTransaction),
    /// Fetch up to `limit` events with stream ordering > `after`, ascending.
    /// Answer with [`Input::EventsFetched`].
    FetchEvents {
        /// Correlates the answer.
        request: RequestId,
        /// Exclusive lower bound.
        after: u64,
        /// At most this many events.
        limit: u32,
    },
    /// For `destination`: its `destination_rooms` rows with `after` < stream ordering ≤
    /// `up_to`, ascending, at most `limit`, joined with the events (purged events omitted), the
    /// room's partial-state flag and its forward extremities. Answer with
    /// [`Input::CatchUpLoaded`].
    LoadCatchUp {
        /// Correlates the answer.
        request: RequestId,
        /// The destination being caught up.
        destination: ServerName,
        /// Exclusive lower bound on stream ordering.
        after: u64,
        /// Inclusive upper bound: how far this process has fanned out.
        up_to: u64,
        /// At most this many rooms.
        limit: u32,
    },
    /// Destinations named after `after` (or all, if null), sorted, at most `limit`, that have
    /// a `destination_rooms` row above their last successful stream ordering (null counts as
    /// 0) or pending to-device messages. Answer with [`Input::OutstandingLoaded`].
    LoadOutstanding {
        /// Correlates the answer.
        request: RequestId,
        /// Exclusive cursor.
        after: Option<ServerName>,
        /// At most this many destinations.
        limit: u32,
    },
    /// Apply `changes` atomically and durably, then answer [`Input::Persisted`].
    Persist {
        /// Correlates the answer.
        request: RequestId,
        /// The writes.
        changes: Changes,
    },
    /// Something worth reporting (logs, metrics, the visualiser). Needs no answer.
    Event {
        /// What happened.
        event: crate::Event,
    },
}

/// One HTTP attempt of a transaction. Retries of a frozen transaction carry the same
/// `txn_id` and a byte-identical `body`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct OutgoingTransaction {
    /// Correlates the answer.
    pub request: RequestId,
    /// Where to send it.
    pub destination: ServerName,
    /// The transaction id for the URL path.
    pub txn_id: String,
    /// Attempt number of this transaction, starting at 1.
    pub attempt: u32,
    /// Event ids of the PDUs, in body order.
    pub pdu_ids: Vec<Arc<str>>,
    /// The JSON body, keys in canonical order.
    pub body: Arc<str>,
}

/// What a destination is doing, at a glance (D12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub enum DestinationPhase {
    /// Nothing to send.
    Idle,
    /// A transaction is in flight or waiting for a slot.
    Sending,
    /// Sleeping before an HTTP retry of the frozen transaction.
    Retrying,
    /// Backed off after failures.
    BackingOff,
    /// Being caught up from storage.
    CatchingUp,
    /// Answered 410 or backed off for the maximum interval: waits until it contacts us.
    Gone,
}

/// Per-destination figures for operators (D12).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct DestinationStats {
    /// The destination.
    pub destination: ServerName,
    /// What it is doing.
    pub state: DestinationPhase,
    /// PDUs held in memory for it (queued and in the frozen transaction).
    pub queued_pdus: u64,
    /// EDUs (and presence states, receipts) queued in memory for it.
    pub queued_edus: u64,
    /// Age of the oldest PDU held in memory for it.
    pub oldest_pending_age_ms: Option<u64>,
    /// A transaction is awaiting an answer.
    pub in_flight: bool,
    /// No attempt before this time unless woken.
    pub backoff_until_ts: Option<u64>,
    /// Storage may hold rows memory does not; they are sent first.
    pub catching_up: bool,
    /// Last 2xx from it during this process's life.
    pub last_success_ts: Option<u64>,
    /// Items given up for it (poison, oversized).
    pub dropped_items: u64,
    /// Current backoff interval.
    pub retry_interval_ms: u64,
    /// First failure of the current outage.
    pub failure_ts: Option<u64>,
    /// Highest stream ordering known delivered.
    pub last_successful_stream_ordering: Option<u64>,
}
