//! [`FederationSender`]: the composite machine. Fan-out of events to destinations, one queue
//! per destination with one transaction in flight, frozen transactions, backoff, catch-up and
//! the periodic catch-up waker.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::config::Config;
use crate::edu::{EduEntry, EduQueue, Fit, Poke, PokeRef, split_to_device};
use crate::error::{ConfigError, InputError};
use crate::event::Event;
use crate::io::{
    CatchUpRoom, Changes, DestinationPhase, DestinationRoom, DestinationState, DestinationStats, DeviceListPoke,
    DeviceListPokeKey, DeviceListPosition, Input, OutboxKey, OutboxRow, OutgoingTransaction, Output, PduInfo,
    Recovered, TransactionResult,
};
use crate::rng::Prng;
use crate::shard::should_handle;
use crate::time::Timestamp;
use crate::transaction::{PduEntry, build_body, empty_body_len, push_decimal};
use crate::types::{RequestId, ServerName, server_of};

/// Receipts go to everyone at once in rooms with fewer other servers than this.
const RECEIPT_SMALL_ROOM_SERVERS: usize = 10;
/// Receipts for events received this recently go to everyone at once.
const RECEIPT_RECENT_EVENT_MS: u64 = 60_000;

/// Pause before a failed storage request is issued again.
const STORAGE_RETRY_DELAY_MS: u64 = 1_000;

/// The federation sender as a deterministic state machine.
///
/// Drive it as the crate docs describe: feed [`handle_input`](Self::handle_input), drain
/// [`poll_output`](Self::poll_output) until `None`, sleep until
/// [`poll_timeout`](Self::poll_timeout) or the next input. A restart is "drop it and build
/// a new one from what storage recovered".
#[derive(Debug)]
pub struct FederationSender {
    config: Config,
    rng: Prng,
    now: Timestamp,
    time_regressions: u64,
    incarnation: u64,
    incarnation_durable: bool,
    txn_counter: u64,
    next_request_id: u64,
    requests: BTreeMap<RequestId, Pending>,
    outputs: VecDeque<Output>,
    /// Writes made while handling the current input, flushed as one batch.
    changes: Changes,
    /// Destinations whose queue should be driven once the current input is handled.
    dirty: BTreeSet<ServerName>,
    /// Destinations with `destination_rooms` rows in a failed write not yet retried
    /// successfully (count of such writes). Their catch-up waits, or it could advance the
    /// last successful position past a row storage does not have yet.
    unapplied_rows: BTreeMap<ServerName, u32>,
    /// Start positions of fan-out batches not yet durable (a multiset): `events_out_pos` is
    /// never persisted beyond the smallest, so a crash cannot lose rows of claimed events.
    pending_fanouts: BTreeMap<u64, u32>,
    /// The highest `events_out_pos` written so far.
    claimed_position: u64,
    /// The position before the fan-out handled in the current input, if any.
    batch_fanout_from: Option<u64>,
    /// Destinations whose stored row changed while handling the current input.
    state_changed: BTreeSet<ServerName>,
    events_out_pos: u64,
    last_poked: u64,
    fetch: FetchState,
    destinations: BTreeMap<ServerName, Destination>,
    timers: BTreeSet<(Timestamp, Timer)>,
    in_flight: u32,
    slot_waiters: VecDeque<ServerName>,
    waker: Waker,
    wakeup: Wakeup,
    storage_retries: Vec<Pending>,
    /// Counter behind outbox ids (`incarnation << 32 | counter`).
    outbox_counter: u64,
    /// The last PDU-only body built, with its time and PDUs, for destinations freezing the
    /// same PDUs at the same instant.
    last_body: Option<(u64, Vec<Arc<PduEntry>>, Arc<str>)>,
}

/// The staggered wake-up queue (reference §7): low-priority data (delayed receipts,
/// presence) wakes destinations one at a time, every queued one within 30 s, at most one per
/// 1/`rr_transactions_per_room_per_second`.
#[derive(Debug, Default)]
struct Wakeup {
    queue: VecDeque<ServerName>,
    members: BTreeSet<ServerName>,
    processing: bool,
    sleep_ms: u64,
}

/// Longest a destination waits in the wake-up queue.
const WAKEUP_TIME_IN_QUEUE_MAX_MS: u64 = 30_000;

/// What an outstanding request is waiting for.
#[derive(Clone, Debug)]
enum Pending {
    /// `known` is the highest stream ordering notified when the query was issued: a short
    /// answer proves storage holds nothing more up to it.
    FetchEvents {
        after: u64,
        known: u64,
    },
    CatchUp {
        destination: ServerName,
        after: u64,
        up_to: u64,
    },
    Outstanding {
        after: Option<ServerName>,
    },
    /// `reissued`: a retry of a failed batch, whose destinations wait for it (see
    /// `FederationSender::unapplied_rows`).
    /// `fanout_from`: for a batch that advances `events_out_pos`, the position before it.
    Persist {
        changes: Changes,
        reissued: bool,
        fanout_from: Option<u64>,
    },
    Transaction {
        destination: ServerName,
    },
}

impl Pending {
    fn kind(&self) -> &'static str {
        match self {
            Self::FetchEvents { .. } => "events_fetched",
            Self::CatchUp { .. } => "catch_up_loaded",
            Self::Outstanding { .. } => "outstanding_loaded",
            Self::Persist { .. } => "persisted",
            Self::Transaction { .. } => "transaction_done",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Destination(ServerName),
    Waker,
    Wakeup,
    StorageRetry,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FetchState {
    Idle,
    InFlight,
}

/// Compact per-destination record, kept for every known destination; the queue itself is
/// dropped from memory whenever it is idle (D6).
#[derive(Debug)]
struct Destination {
    retry_last_ts: u64,
    retry_interval_ms: u64,
    failure_ts: Option<u64>,
    last_successful: Option<u64>,
    /// Storage may hold rows for this destination that memory does not: send from storage
    /// (catch-up) before anything queued in memory.
    catching_up: bool,
    catch_up_last_skipped: u64,
    /// D12 figures kept while the queue itself may be dropped.
    last_success_ts: Option<u64>,
    dropped_items: u64,
    /// Device-list chain state, boxed: most destinations never get a device-list update, and
    /// every known destination keeps this record.
    device_lists: Option<Box<DeviceListChains>>,
    queue: Option<Box<Queue>>,
}

/// Per local user, what a destination knows of the user's device-list chain.
#[derive(Debug, Default)]
struct DeviceListChains {
    /// The newest device-list stream id the destination acknowledged: the `prev_id` of the
    /// next `m.device_list_update` for that user.
    positions: BTreeMap<String, u64>,
    /// Users whose chain was restarted (pruning, a dropped update) while a transaction built
    /// earlier may still be delivered: that delivery must not set their position again.
    resets: BTreeSet<String>,
}

/// The positions of a destination without device-list state.
const NO_POSITIONS: &BTreeMap<String, u64> = &BTreeMap::new();

#[derive(Debug, Default)]
struct Queue {
    pending_pdus: VecDeque<Arc<PduEntry>>,
    /// While isolating a poison item (D7): at most this many PDUs per transaction, for the
    /// next `suspects` PDUs.
    split_limit: Option<u32>,
    suspects: u32,
    frozen: Option<Frozen>,
    phase: Phase,
    /// Failed attempts of the frozen transaction since it was last backed off.
    http_failures: u32,
    catch_up_rooms: VecDeque<CatchUpRoom>,
    catch_up_pos: Option<u64>,
    edus: EduQueue,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    /// Sleeping until an HTTP retry or the end of the backoff.
    Waiting(Timestamp),
    /// Waiting for a slot under `transactions_in_flight_max`.
    SlotWait,
    Sending(RequestId),
    Querying(RequestId),
}

/// A built transaction: retried byte for byte until the destination answers 2xx (D1).
#[derive(Debug)]
struct Frozen {
    txn_id: String,
    body: Arc<str>,
    items: Vec<Arc<PduEntry>>,
    edus: Vec<EduEntry>,
    pdu_ids: Vec<String>,
    attempts: u32,
    /// Permanent rejections (4xx other than 401/408/429) of this exact transaction.
    rejections: u32,
    /// Every `destination_rooms` row up to this stream ordering is delivered on success.
    delivered_up_to: Option<u64>,
    /// For a catch-up transaction: the room it catches up, kept to fall back to the owed
    /// event alone if the destination rejects the extremities.
    catch_up: Option<CatchUpRoom>,
}

#[derive(Debug)]
struct Waker {
    phase: WakerPhase,
    cursor: Option<ServerName>,
    to_wake: VecDeque<ServerName>,
    run_started: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WakerPhase {
    Scheduled(Timestamp),
    Querying,
    Waking(Timestamp),
}

impl Destination {
    fn from_state(state: &DestinationState) -> Self {
        Self {
            retry_last_ts: state.retry_last_ts,
            retry_interval_ms: state.retry_interval,
            failure_ts: state.failure_ts,
            last_successful: state.last_successful_stream_ordering,
            catching_up: false,
            catch_up_last_skipped: 0,
            last_success_ts: None,
            dropped_items: 0,
            device_lists: None,
            queue: None,
        }
    }

    fn healthy() -> Self {
        Self {
            retry_last_ts: 0,
            retry_interval_ms: 0,
            failure_ts: None,
            last_successful: None,
            catching_up: false,
            catch_up_last_skipped: 0,
            last_success_ts: None,
            dropped_items: 0,
            device_lists: None,
            queue: None,
        }
    }

    fn state(&self, name: &ServerName) -> DestinationState {
        DestinationState {
            destination: name.clone(),
            retry_last_ts: self.retry_last_ts,
            retry_interval: self.retry_interval_ms,
            failure_ts: self.failure_ts,
            last_successful_stream_ordering: self.last_successful,
        }
    }

    fn retry_at(&self) -> Option<Timestamp> {
        (self.retry_last_ts != 0).then(|| Timestamp(self.retry_last_ts).plus_ms(self.retry_interval_ms))
    }

    /// Synapse's limiter: backed off while `retry_last_ts + retry_interval > now`.
    fn backed_off(&self, now: Timestamp) -> bool {
        self.retry_at().is_some_and(|at| at > now)
    }

    /// Synapse's filter: worth queueing for if due within `window_ms`.
    fn due_within(&self, now: Timestamp, window_ms: u64) -> bool {
        self.retry_at().is_none_or(|at| at <= now.plus_ms(window_ms))
    }

    fn is_failing(&self) -> bool {
        self.retry_last_ts != 0 || self.retry_interval_ms != 0 || self.failure_ts.is_some()
    }

    fn device_list_position(&self, user_id: &str) -> Option<u64> {
        self.device_lists.as_ref().and_then(|d| d.positions.get(user_id).copied())
    }

    fn device_lists(&mut self) -> &mut DeviceListChains {
        self.device_lists.get_or_insert_with(Box::default)
    }

    fn queue(&mut self) -> &mut Queue {
        self.queue.get_or_insert_with(Box::default)
    }

    /// Work held in memory that is not yet delivered.
    /// Anything at all held in memory for this destination, EDUs included.
    fn has_any_work(&self) -> bool {
        self.has_memory_work() || self.queue.as_ref().is_some_and(|q| !q.edus.is_empty())
    }

    /// PDU work held in memory (what D5 must not second-guess).
    fn has_memory_work(&self) -> bool {
        self.queue.as_ref().is_some_and(|q| {
            q.frozen.is_some() || !q.pending_pdus.is_empty() || !q.catch_up_rooms.is_empty() || q.phase != Phase::Idle
        })
    }
}

impl FederationSender {
    /// Builds the machine from a validated config and the state recovered from storage.
    ///
    /// The first outputs persist the next incarnation (no transaction leaves before it is
    /// durable), fetch events after the recovered position, and start the catch-up waker.
    pub fn new(config: Config, recovered: Recovered) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut destinations = BTreeMap::new();
        for state in &recovered.destinations {
            let mut destination = Destination::from_state(state);
            // Storage may hold rows this process never saw in memory; check before sending.
            destination.catching_up = true;
            destinations.insert(state.destination.clone(), destination);
        }
        let events_out_pos = recovered.events_out_pos.unwrap_or(0);
        let incarnation = recovered.incarnation.saturating_add(1);
        let mut sender = Self {
            rng: Prng::from_seed(config.seed),
            config,
            now: Timestamp(0),
            time_regressions: 0,
            incarnation,
            incarnation_durable: false,
            txn_counter: 0,
            next_request_id: 1,
            requests: BTreeMap::new(),
            outputs: VecDeque::new(),
            changes: Changes::default(),
            dirty: BTreeSet::new(),
            state_changed: BTreeSet::new(),
            unapplied_rows: BTreeMap::new(),
            pending_fanouts: BTreeMap::new(),
            claimed_position: events_out_pos,
            batch_fanout_from: None,
            events_out_pos,
            last_poked: events_out_pos,
            fetch: FetchState::Idle,
            destinations,
            timers: BTreeSet::new(),
            in_flight: 0,
            slot_waiters: VecDeque::new(),
            waker: Waker {
                phase: WakerPhase::Scheduled(Timestamp(0)),
                cursor: None,
                to_wake: VecDeque::new(),
                run_started: Timestamp(0),
            },
            wakeup: Wakeup::default(),
            storage_retries: Vec::new(),
            outbox_counter: 0,
            last_body: None,
        };
        // The outbox survives restarts: its rows go first, in id order.
        let mut rows = recovered.to_device_outbox;
        rows.sort_by_key(|row| row.outbox_id);
        for row in rows {
            let Some(content) = row.edu.get("content") else { continue };
            let mut edu = EduEntry::new("m.direct_to_device", content);
            edu.outbox_id = Some(row.outbox_id);
            let destination = sender.destinations.entry(row.destination).or_insert_with(Destination::healthy);
            destination.queue().edus.push_to_device(edu);
        }
        for position in recovered.device_list_positions {
            let Some(stream_id) = position.stream_id else { continue };
            let destination = sender.destinations.entry(position.destination).or_insert_with(Destination::healthy);
            destination.device_lists().positions.insert(position.user_id, stream_id);
        }
        for row in recovered.device_list_pokes {
            let destination = sender.destinations.entry(row.destination.clone()).or_insert_with(Destination::healthy);
            if row.device_id.is_some()
                && destination.device_list_position(&row.user_id).is_some_and(|p| p >= row.stream_id)
            {
                // Delivered before the crash; only its deletion was lost.
                sender.changes.device_list_pokes_deleted.push(DeviceListPokeKey {
                    destination: row.destination,
                    user_id: row.user_id,
                    device_id: row.device_id,
                    stream_id: row.stream_id,
                });
                continue;
            }
            let poke = Poke { stream_id: row.stream_id, queued_ts: row.queued_ts, content: row.content };
            destination.queue().edus.push_device_list(&row.user_id, row.device_id.as_deref(), poke);
        }
        sender.changes.incarnation = Some(incarnation);
        sender.flush_changes();
        sender.start_fetch();
        sender.timers.insert((Timestamp(0), Timer::Waker));
        Ok(sender)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many times the host handed in a time earlier than one seen before (clamped).
    pub fn time_regressions(&self) -> u64 {
        self.time_regressions
    }

    /// Transactions currently awaiting an answer (never above `transactions_in_flight_max`).
    pub fn transactions_in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Applies one input at time `now`.
    ///
    /// A time earlier than one seen before is clamped to it. A malformed or uncorrelated input
    /// returns an error and changes nothing; the machine keeps running.
    pub fn handle_input(&mut self, now: Timestamp, input: Input) -> Result<(), InputError> {
        if now < self.now {
            self.time_regressions += 1;
        } else {
            self.now = now;
        }
        let result = self.apply(input);
        self.drive_dirty();
        self.flush_changes();
        result
    }

    /// The next thing for the host to do, or `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The earliest time at which [`Input::Timeout`] should be delivered, if any.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Per-destination figures (D12), sorted by destination name.
    pub fn destination_stats(&self) -> Vec<DestinationStats> {
        self.destinations.iter().map(|(name, d)| self.stats_of(name, d)).collect()
    }

    /// Per-destination figures (D12) of one destination.
    pub fn stats_for(&self, destination: &ServerName) -> Option<DestinationStats> {
        self.destinations.get(destination).map(|d| self.stats_of(destination, d))
    }

    fn stats_of(&self, name: &ServerName, d: &Destination) -> DestinationStats {
        let queue = d.queue.as_deref();
        let phase = queue.map_or(Phase::Idle, |q| q.phase);
        let queued_pdus =
            queue.map_or(0, |q| q.pending_pdus.len() as u64 + q.frozen.as_ref().map_or(0, |f| f.items.len() as u64));
        let oldest_queued_at = queue.and_then(|q| {
            let frozen =
                q.frozen.as_ref().and_then(|f| f.items.iter().map(|p| p.queued_at_ms).filter(|t| *t > 0).min());
            let pending = q.pending_pdus.front().map(|p| p.queued_at_ms);
            frozen.into_iter().chain(pending).min()
        });
        let backoff_until_ts = d.retry_at().filter(|at| *at > self.now).map(Timestamp::as_ms);
        let state = if d.retry_interval_ms >= self.config.retry_interval_max_ms && backoff_until_ts.is_some() {
            DestinationPhase::Gone
        } else {
            match phase {
                Phase::Sending(_) | Phase::Querying(_) | Phase::SlotWait if d.catching_up => {
                    DestinationPhase::CatchingUp
                }
                Phase::Sending(_) | Phase::SlotWait => DestinationPhase::Sending,
                Phase::Querying(_) => DestinationPhase::CatchingUp,
                Phase::Waiting(_) if backoff_until_ts.is_some() => DestinationPhase::BackingOff,
                Phase::Waiting(_) => DestinationPhase::Retrying,
                Phase::Idle if backoff_until_ts.is_some() => DestinationPhase::BackingOff,
                Phase::Idle if d.catching_up && d.has_memory_work() => DestinationPhase::CatchingUp,
                Phase::Idle => DestinationPhase::Idle,
            }
        };
        DestinationStats {
            destination: name.clone(),
            state,
            queued_pdus,
            queued_edus: queue.map_or(0, |q| q.edus.len() as u64),
            oldest_pending_age_ms: oldest_queued_at.map(|at| self.now.as_ms().saturating_sub(at)),
            in_flight: matches!(phase, Phase::Sending(_)),
            backoff_until_ts,
            catching_up: d.catching_up,
            last_success_ts: d.last_success_ts,
            dropped_items: d.dropped_items,
            retry_interval_ms: d.retry_interval_ms,
            failure_ts: d.failure_ts,
            last_successful_stream_ordering: d.last_successful,
        }
    }

    /// The stored-state view of one destination, as the machine currently holds it.
    pub fn destination_state(&self, destination: &ServerName) -> Option<DestinationState> {
        self.destinations.get(destination).map(|d| d.state(destination))
    }

    // ------------------------------------------------------------------------------------
    // inputs

    fn apply(&mut self, input: Input) -> Result<(), InputError> {
        crate::nesting::check_input(&input)?;
        match input {
            Input::NewEvents { up_to } => {
                self.last_poked = self.last_poked.max(up_to);
                if self.fetch == FetchState::Idle && self.last_poked > self.events_out_pos {
                    self.start_fetch();
                }
                Ok(())
            }
            Input::WakeDestination { destination } | Input::RemoteUp { destination } => {
                self.destination_contacted(&destination);
                Ok(())
            }
            Input::Edu { destination, edu_type, content, key } => {
                if destination == self.config.server_name {
                    return Err(InputError::Refused(format!("an EDU ({edu_type}) addressed to ourselves")));
                }
                if !self.handles(&destination) {
                    return Ok(());
                }
                let edu = EduEntry::new(&edu_type, &content);
                let queue = self.destinations.entry(destination.clone()).or_insert_with(Destination::healthy).queue();
                match key {
                    Some(key) => queue.edus.push_keyed(key, edu),
                    None => queue.edus.push_plain(edu),
                }
                self.dirty.insert(destination);
                Ok(())
            }
            Input::Typing { room_id, user_id, typing, hosts } => {
                self.check_local(&user_id)?;
                let content = serde_json::json!({ "room_id": room_id, "typing": typing, "user_id": user_id });
                let edu = EduEntry::new("m.typing", &content);
                let key = format!("{room_id} {user_id}");
                let now = self.now;
                for host in self.ephemeral_targets(hosts, 0) {
                    let destination = self.destinations.entry(host.clone()).or_insert_with(Destination::healthy);
                    if destination.backed_off(now) {
                        continue;
                    }
                    destination.queue().edus.push_keyed(key.clone(), edu.clone());
                    self.dirty.insert(host);
                }
                Ok(())
            }
            Input::Receipt { receipt, hosts, event } => {
                self.check_local(&receipt.user_id)?;
                if receipt.receipt_type == "m.read.private" {
                    return Err(InputError::Refused(String::from("private read receipts are not federated")));
                }
                let window_ms = self.config.catch_up_threshold_ms;
                let targets = self.ephemeral_targets(hosts, window_ms);
                let everyone_now = targets.len() < RECEIPT_SMALL_ROOM_SERVERS
                    || event
                        .as_ref()
                        .is_some_and(|e| self.now.as_ms().saturating_sub(e.received_ts) < RECEIPT_RECENT_EVENT_MS);
                let sender_server = event.as_ref().and_then(|e| server_of(&e.sender)).map(String::from);
                for host in targets {
                    let destination = self.destinations.entry(host.clone()).or_insert_with(Destination::healthy);
                    destination.queue().edus.push_receipt(receipt.clone());
                    if everyone_now || sender_server.as_deref() == Some(host.as_str()) {
                        self.dirty.insert(host);
                    } else {
                        self.wakeup_add(host);
                    }
                }
                Ok(())
            }
            Input::StoredToDevice { rows } => {
                self.stored_to_device(rows);
                Ok(())
            }
            Input::StoredDeviceListPokes { pokes } => {
                self.stored_device_list_pokes(pokes);
                Ok(())
            }
            Input::ToDevice { sender, message_type, message_id, messages } => {
                self.check_local(&sender)?;
                let message_id =
                    message_id.unwrap_or_else(|| format!("{}-{}", self.incarnation, self.outbox_counter + 1));
                // Group by server and split first, so a refusal changes nothing.
                let mut per_server: BTreeMap<ServerName, BTreeMap<String, BTreeMap<String, serde_json::Value>>> =
                    BTreeMap::new();
                for (user, devices) in messages {
                    let server = server_of(&user)
                        .and_then(|s| ServerName::parse(s).ok())
                        .ok_or_else(|| InputError::Refused(format!("invalid recipient {user:?}")))?;
                    if server != self.config.server_name && self.handles(&server) {
                        per_server.entry(server).or_default().insert(user, devices);
                    }
                }
                let mut contents = Vec::new();
                for (server, messages) in per_server {
                    let chunks =
                        split_to_device(&sender, &message_type, &message_id, &messages).map_err(InputError::Refused)?;
                    contents.push((server, chunks));
                }
                let now_ms = self.now.as_ms();
                for (server, chunks) in contents {
                    for content in chunks {
                        self.outbox_counter += 1;
                        let outbox_id = (self.incarnation << 32) | self.outbox_counter;
                        let mut edu = EduEntry::new("m.direct_to_device", &content);
                        edu.outbox_id = Some(outbox_id);
                        let row_edu = serde_json::json!({ "content": content, "edu_type": "m.direct_to_device" });
                        self.changes.to_device_outbox.push(OutboxRow {
                            destination: server.clone(),
                            outbox_id,
                            queued_ts: now_ms,
                            edu: row_edu,
                        });
                        let destination = self.destinations.entry(server.clone()).or_insert_with(Destination::healthy);
                        destination.queue().edus.push_to_device(edu);
                    }
                    self.dirty.insert(server);
                }
                Ok(())
            }
            Input::DeviceListUpdate {
                user_id,
                device_id,
                stream_id,
                deleted,
                keys,
                device_display_name,
                destinations,
            } => {
                self.check_local(&user_id)?;
                let mut content = serde_json::Map::new();
                content.insert("device_id".into(), device_id.clone().into());
                content.insert("stream_id".into(), stream_id.into());
                content.insert("user_id".into(), user_id.clone().into());
                if deleted {
                    content.insert("deleted".into(), true.into());
                } else {
                    if let Some(keys) = keys {
                        content.insert("keys".into(), keys);
                    }
                    if let Some(name) = device_display_name {
                        content.insert("device_display_name".into(), name.into());
                    }
                }
                let content = serde_json::Value::Object(content);
                self.queue_device_list(&user_id, Some(&device_id), stream_id, content, destinations);
                Ok(())
            }
            Input::SigningKeyUpdate { user_id, stream_id, master_key, self_signing_key, destinations } => {
                self.check_local(&user_id)?;
                if master_key.is_none() && self_signing_key.is_none() {
                    return Err(InputError::Refused(String::from(
                        "a signing key update needs a master_key or a self_signing_key",
                    )));
                }
                let mut content = serde_json::Map::new();
                content.insert("user_id".into(), user_id.clone().into());
                if let Some(key) = master_key {
                    content.insert("master_key".into(), key);
                }
                if let Some(key) = self_signing_key {
                    content.insert("self_signing_key".into(), key);
                }
                let content = serde_json::Value::Object(content);
                self.queue_device_list(&user_id, None, stream_id, content, destinations);
                Ok(())
            }
            Input::Presence { states, destinations } => {
                for state in &states {
                    self.check_local(&state.user_id)?;
                }
                if !self.config.presence_enabled || states.is_empty() {
                    return Ok(());
                }
                let window_ms = self.config.catch_up_threshold_ms;
                for host in self.ephemeral_targets(destinations, window_ms) {
                    let destination = self.destinations.entry(host.clone()).or_insert_with(Destination::healthy);
                    let queue = destination.queue();
                    for state in &states {
                        queue.edus.push_presence(state.clone());
                    }
                    self.wakeup_add(host);
                }
                Ok(())
            }
            Input::SetDestinationState { state } => {
                let name = state.destination.clone();
                let destination = self.destinations.entry(name.clone()).or_insert_with(Destination::healthy);
                destination.retry_last_ts = state.retry_last_ts;
                destination.retry_interval_ms = state.retry_interval;
                destination.failure_ts = state.failure_ts;
                destination.last_successful = state.last_successful_stream_ordering;
                if !destination.has_memory_work() {
                    destination.catching_up = true;
                    if let Some(queue) = destination.queue.as_mut() {
                        queue.catch_up_pos = None;
                    }
                }
                if let Some(queue) = destination.queue.as_mut()
                    && matches!(queue.phase, Phase::Waiting(_))
                {
                    queue.phase = Phase::Idle;
                }
                self.changes.destinations.push(state);
                self.dirty.insert(name);
                Ok(())
            }
            Input::Timeout => {
                self.handle_timeout();
                Ok(())
            }
            Input::EventsFetched { request, events } => {
                let (after, known) = match self.take_request(request)? {
                    Pending::FetchEvents { after, known } => (after, known),
                    other => return Err(self.wrong(request, other)),
                };
                if let Err(error) = check_events(after, &events) {
                    self.requests.insert(request, Pending::FetchEvents { after, known });
                    return Err(error);
                }
                self.fan_out(after, known, events);
                Ok(())
            }
            Input::CatchUpLoaded { request, rooms } => {
                let (destination, after, up_to) = match self.take_request(request)? {
                    Pending::CatchUp { destination, after, up_to } => (destination, after, up_to),
                    other => return Err(self.wrong(request, other)),
                };
                if let Err(error) = check_catch_up(after, up_to, &rooms) {
                    self.requests.insert(request, Pending::CatchUp { destination, after, up_to });
                    return Err(error);
                }
                self.catch_up_loaded(&destination, rooms);
                Ok(())
            }
            Input::OutstandingLoaded { request, destinations } => {
                match self.take_request(request)? {
                    Pending::Outstanding { .. } => {}
                    other => return Err(self.wrong(request, other)),
                }
                self.outstanding_loaded(destinations);
                Ok(())
            }
            Input::Persisted { request } => {
                match self.take_request(request)? {
                    Pending::Persist { changes, reissued, fanout_from } => {
                        if reissued {
                            self.rows_applied(&changes);
                        }
                        if let Some(from) = fanout_from {
                            remove_one(&mut self.pending_fanouts, from);
                            // Positions held back behind this batch may be claimed now.
                            let claimable = self.claimable_position();
                            if claimable > self.claimed_position {
                                self.changes.events_out_pos = Some(claimable);
                            }
                        }
                        if changes.incarnation == Some(self.incarnation) && !self.incarnation_durable {
                            self.incarnation_durable = true;
                            // Queues held back until transaction ids were safe may go now.
                            let names: Vec<ServerName> = self
                                .destinations
                                .iter()
                                .filter(|(_, d)| d.queue.is_some())
                                .map(|(n, _)| n.clone())
                                .collect();
                            self.dirty.extend(names);
                        }
                    }
                    other => return Err(self.wrong(request, other)),
                }
                Ok(())
            }
            Input::StorageFailed { request, error } => {
                let pending = self.take_request(request)?;
                if matches!(pending, Pending::Transaction { .. }) {
                    return Err(self.wrong(request, pending));
                }
                if let Pending::Persist { changes, reissued: false, .. } = &pending {
                    // Until the retry lands, storage lacks these rows: catch-up must not
                    // conclude anything for their destinations meanwhile.
                    let names: BTreeSet<ServerName> =
                        changes.destination_rooms.iter().map(|row| row.destination.clone()).collect();
                    for name in names {
                        *self.unapplied_rows.entry(name).or_insert(0) += 1;
                    }
                }
                let retry_at = self.now.plus_ms(STORAGE_RETRY_DELAY_MS);
                self.push_event(Event::StorageRetry { error, retry_at_ts: retry_at.as_ms() });
                self.storage_retries.push(pending);
                self.timers.insert((retry_at, Timer::StorageRetry));
                Ok(())
            }
            Input::TransactionDone { request, result } => {
                let destination = match self.take_request(request)? {
                    Pending::Transaction { destination } => destination,
                    other => return Err(self.wrong(request, other)),
                };
                self.transaction_done(destination, request, result);
                Ok(())
            }
        }
    }

    fn take_request(&mut self, request: RequestId) -> Result<Pending, InputError> {
        self.requests.remove(&request).ok_or(InputError::UnknownRequest(request))
    }

    /// Puts back a request answered with the wrong kind of completion and names the right one.
    fn wrong(&mut self, request: RequestId, pending: Pending) -> InputError {
        let expected = pending.kind();
        self.requests.insert(request, pending);
        InputError::WrongCompletion { request, expected }
    }

    /// The highest events-stream position that may be persisted: the current one, unless an
    /// earlier fan-out write still has to become durable.
    fn claimable_position(&self) -> u64 {
        self.pending_fanouts.keys().next().map_or(self.events_out_pos, |from| (*from).min(self.events_out_pos))
    }

    fn rows_applied(&mut self, changes: &Changes) {
        let names: BTreeSet<ServerName> = changes.destination_rooms.iter().map(|row| row.destination.clone()).collect();
        for name in names {
            if let Some(count) = self.unapplied_rows.get_mut(&name) {
                *count -= 1;
                if *count == 0 {
                    self.unapplied_rows.remove(&name);
                    self.dirty.insert(name);
                }
            }
        }
    }

    fn handle_timeout(&mut self) {
        while let Some((at, _)) = self.timers.first() {
            if *at > self.now {
                break;
            }
            let Some((_, timer)) = self.timers.pop_first() else { break };
            match timer {
                Timer::Destination(name) => {
                    if let Some(queue) = self.destinations.get_mut(&name).and_then(|d| d.queue.as_mut())
                        && let Phase::Waiting(until) = queue.phase
                        && until <= self.now
                    {
                        queue.phase = Phase::Idle;
                        self.dirty.insert(name);
                    }
                }
                Timer::Waker => self.waker_tick(),
                Timer::Wakeup => self.wakeup_step(),
                Timer::StorageRetry => {
                    for pending in core::mem::take(&mut self.storage_retries) {
                        self.reissue(pending);
                    }
                }
            }
        }
    }

    /// Issues a failed storage request again; a failed write is re-sent with the current
    /// in-memory state of its destinations, so a late retry never writes stale timings.
    fn reissue(&mut self, pending: Pending) {
        match pending {
            Pending::FetchEvents { .. } => {
                self.fetch = FetchState::Idle;
                self.start_fetch();
            }
            Pending::CatchUp { destination, after, .. } => {
                let up_to = self.events_out_pos;
                let request = self.request(Pending::CatchUp { destination: destination.clone(), after, up_to });
                if let Some(queue) = self.destinations.get_mut(&destination).and_then(|d| d.queue.as_mut()) {
                    queue.phase = Phase::Querying(request);
                }
                let limit = self.config.catch_up_batch_max;
                self.outputs.push_back(Output::LoadCatchUp { request, destination, after, up_to, limit });
            }
            Pending::Outstanding { after } => {
                let request = self.request(Pending::Outstanding { after: after.clone() });
                let limit = self.config.catch_up_waker_page_max;
                self.outputs.push_back(Output::LoadOutstanding { request, after, limit });
            }
            Pending::Persist { mut changes, fanout_from, .. } => {
                // Claimed again, capped, once this batch lands.
                changes.events_out_pos = None;
                for row in &mut changes.destinations {
                    if let Some(current) = self.destinations.get(&row.destination) {
                        *row = current.state(&row.destination);
                    }
                }
                let request = self.request(Pending::Persist { changes: changes.clone(), reissued: true, fanout_from });
                self.outputs.push_back(Output::Persist { request, changes });
            }
            Pending::Transaction { .. } => {}
        }
    }

    // ------------------------------------------------------------------------------------
    // fan-out

    fn start_fetch(&mut self) {
        let after = self.events_out_pos;
        let request = self.request(Pending::FetchEvents { after, known: self.last_poked });
        self.fetch = FetchState::InFlight;
        let limit = self.config.events_batch_max;
        self.outputs.push_back(Output::FetchEvents { request, after, limit });
    }

    fn fan_out(&mut self, after: u64, known: u64, events: Vec<PduInfo>) {
        let full_batch = events.len() >= self.config.events_batch_max as usize;
        let mut position = after;
        for info in events {
            position = info.stream_ordering;
            self.route(info);
        }
        // A short batch means storage had nothing more up to what was known at query time.
        if !full_batch {
            position = position.max(known);
        }
        self.last_poked = self.last_poked.max(position);
        self.events_out_pos = position;
        // In the same batch as the rows: the position never gets ahead of durable rows.
        self.changes.events_out_pos = Some(position);
        self.batch_fanout_from = Some(self.batch_fanout_from.unwrap_or(after).min(after));
        self.fetch = FetchState::Idle;
        if full_batch || self.last_poked > self.events_out_pos {
            self.start_fetch();
        }
    }

    /// Decides the destinations of one event (reference §5.2) and queues it for them.
    fn route(&mut self, info: PduInfo) {
        // Since room version 12 a room id is `!` and an opaque hash, without a server part.
        if !info.room_id.starts_with('!') || info.room_id.len() < 2 {
            let reason = format!("invalid room id {:?}", info.room_id);
            self.push_event(Event::EventSkipped { event_id: info.event_id, reason });
            return;
        }
        let is_local = server_of(&info.sender) == Some(self.config.server_name.as_str());
        if !is_local && info.send_on_behalf_of.is_none() {
            return;
        }
        if info.out_of_band || !info.proactively_send || !info.has_prev_events {
            return;
        }
        if let Some(reason) = crate::nesting::pdu_too_deep(&info.pdu) {
            self.push_event(Event::EventSkipped { event_id: info.event_id, reason });
            return;
        }
        // Sorted and deduplicated in place (the order a set would give), without copying names.
        let mut targets: Vec<ServerName> = info.partial_state_servers.unwrap_or(info.hosts);
        targets.extend(info.invitee_server);
        targets.sort_unstable();
        targets.dedup();
        let on_behalf_of = info.send_on_behalf_of.as_ref();
        targets.retain(|name| Some(name) != on_behalf_of && *name != self.config.server_name && self.handles(name));
        if targets.is_empty() {
            return;
        }
        let Ok(json) = serde_json::to_string(&info.pdu) else {
            // serde_json::Value always serializes; keep the machine alive regardless.
            return;
        };
        let entry = Arc::new(PduEntry {
            event_id: info.event_id,
            stream_ordering: info.stream_ordering,
            json: Arc::from(json),
            queued_at_ms: self.now.as_ms(),
        });
        let now = self.now;
        let window_ms = self.config.catch_up_threshold_ms;
        let pending_max = self.config.pending_pdus_max as usize;
        let mut overflowing: Vec<ServerName> = Vec::new();
        for name in targets {
            self.changes.destination_rooms.push(DestinationRoom {
                destination: name.clone(),
                room_id: info.room_id.clone(),
                stream_ordering: info.stream_ordering,
            });
            let destination = self.destinations.entry(name.clone()).or_insert_with(Destination::healthy);
            if !destination.due_within(now, window_ms) {
                // Not worth holding in memory: the row above makes catch-up send it (D5).
                destination.catching_up = true;
                destination.catch_up_last_skipped = info.stream_ordering;
                if let Some(queue) = destination.queue.as_mut() {
                    queue.pending_pdus.clear();
                }
                continue;
            }
            if destination.catching_up {
                destination.catch_up_last_skipped = info.stream_ordering;
            } else {
                let queue = destination.queue();
                queue.pending_pdus.push_back(entry.clone());
                if queue.pending_pdus.len() > pending_max {
                    overflowing.push(name.clone());
                }
            }
            self.dirty.insert(name);
        }
        for name in overflowing {
            // Memory stays bounded while a server is slow or down: storage has every row.
            if let Some(mut destination) = self.destinations.remove(&name) {
                self.start_catching_up(&name, &mut destination, false);
                self.destinations.insert(name, destination);
            }
        }
    }

    fn check_local(&self, user_id: &str) -> Result<(), InputError> {
        if server_of(user_id) == Some(self.config.server_name.as_str()) {
            Ok(())
        } else {
            Err(InputError::Refused(format!("{user_id} is not a local user")))
        }
    }

    /// The servers ephemeral data for `hosts` goes to: not ourselves, ours to handle, and
    /// (with a window) due for a retry within it.
    fn ephemeral_targets(&self, hosts: Vec<ServerName>, window_ms: u64) -> BTreeSet<ServerName> {
        let now = self.now;
        hosts
            .into_iter()
            .filter(|host| *host != self.config.server_name && self.handles(host))
            .filter(|host| window_ms == 0 || self.destinations.get(host).is_none_or(|d| d.due_within(now, window_ms)))
            .collect()
    }

    /// Queues a device-list change for each destination, durably, and wakes them through
    /// the staggered queue (reference §6.4, `immediate=false`). A destination backed off for
    /// longer than the catch-up threshold still gets the poke; it goes when the destination
    /// is next contacted or retried.
    fn queue_device_list(
        &mut self,
        user_id: &str,
        device_id: Option<&str>,
        stream_id: u64,
        content: serde_json::Value,
        destinations: Vec<ServerName>,
    ) {
        let now = self.now;
        let window_ms = self.config.catch_up_threshold_ms;
        for host in self.ephemeral_targets(destinations, 0) {
            let destination = self.destinations.entry(host.clone()).or_insert_with(Destination::healthy);
            if device_id.is_some() && destination.device_list_position(user_id).is_some_and(|p| p >= stream_id) {
                // Not newer than what the destination already acknowledged.
                continue;
            }
            let poke = Poke { stream_id, queued_ts: now.as_ms(), content: content.clone() };
            if !destination.queue().edus.push_device_list(user_id, device_id, poke) {
                continue;
            }
            self.changes.device_list_pokes.push(DeviceListPoke {
                destination: host.clone(),
                user_id: String::from(user_id),
                device_id: device_id.map(String::from),
                stream_id,
                queued_ts: now.as_ms(),
                content: content.clone(),
            });
            if destination.due_within(now, window_ms) {
                self.wakeup_add(host);
            }
        }
    }

    /// Rows already durable in the homeserver's outbox: queued, sent at once, not persisted.
    fn stored_to_device(&mut self, mut rows: Vec<OutboxRow>) {
        rows.sort_by_key(|row| row.outbox_id);
        for row in rows {
            if row.destination == self.config.server_name || !self.handles(&row.destination) {
                continue;
            }
            let Some(content) = row.edu.get("content") else { continue };
            let destination = self.destinations.entry(row.destination.clone()).or_insert_with(Destination::healthy);
            let queue = destination.queue();
            let in_flight = queue.frozen.as_ref().is_some_and(|f| f.edus.iter().any(|e| e.outbox_id == Some(row.outbox_id)));
            if in_flight || queue.edus.has_to_device(row.outbox_id) {
                continue;
            }
            let mut edu = EduEntry::new("m.direct_to_device", content);
            edu.outbox_id = Some(row.outbox_id);
            destination.queue().edus.push_to_device(edu);
            self.dirty.insert(row.destination);
        }
    }

    /// Pokes already durable in the homeserver's tables: queued and staggered like
    /// [`Input::DeviceListUpdate`], not persisted again.
    fn stored_device_list_pokes(&mut self, pokes: Vec<DeviceListPoke>) {
        let now = self.now;
        let window_ms = self.config.catch_up_threshold_ms;
        for row in pokes {
            if row.destination == self.config.server_name || !self.handles(&row.destination) {
                continue;
            }
            let destination = self.destinations.entry(row.destination.clone()).or_insert_with(Destination::healthy);
            if row.device_id.is_some()
                && destination.device_list_position(&row.user_id).is_some_and(|p| p >= row.stream_id)
            {
                // Already acknowledged by the destination: only its deletion is owed.
                self.changes.device_list_pokes_deleted.push(DeviceListPokeKey {
                    destination: row.destination,
                    user_id: row.user_id,
                    device_id: row.device_id,
                    stream_id: row.stream_id,
                });
                continue;
            }
            let poke = Poke { stream_id: row.stream_id, queued_ts: row.queued_ts, content: row.content };
            if destination.queue().edus.push_device_list(&row.user_id, row.device_id.as_deref(), poke)
                && destination.due_within(now, window_ms)
            {
                self.wakeup_add(row.destination);
            }
        }
    }

    fn wakeup_add(&mut self, name: ServerName) {
        if self.wakeup.members.insert(name.clone()) {
            self.wakeup.queue.push_back(name);
        }
        if !self.wakeup.processing {
            self.wakeup.processing = true;
            let spread_ms = WAKEUP_TIME_IN_QUEUE_MAX_MS / self.wakeup.queue.len().max(1) as u64;
            self.wakeup.sleep_ms = self.config.wakeup_interval_ms().min(spread_ms);
            self.wakeup_step();
        }
    }

    /// Wakes the oldest queued destination that still has something to send, then sleeps.
    fn wakeup_step(&mut self) {
        while let Some(name) = self.wakeup.queue.pop_front() {
            self.wakeup.members.remove(&name);
            // Someone else's transaction already took the data: no sleep for this one.
            if !self.destinations.get(&name).is_some_and(Destination::has_any_work) {
                continue;
            }
            self.dirty.insert(name);
            // Sleep after every wake, even the last: a destination queued meanwhile waits its
            // turn instead of starting a new burst.
            if !self.wakeup.queue.is_empty() {
                let spread_ms = WAKEUP_TIME_IN_QUEUE_MAX_MS / self.wakeup.queue.len() as u64;
                self.wakeup.sleep_ms = self.wakeup.sleep_ms.min(spread_ms);
            }
            self.wakeup.sleep_ms = self.wakeup.sleep_ms.max(1);
            self.timers.insert((self.now.plus_ms(self.wakeup.sleep_ms), Timer::Wakeup));
            return;
        }
        self.wakeup.processing = false;
    }

    fn handles(&self, name: &ServerName) -> bool {
        if let Some(whitelist) = &self.config.domain_whitelist
            && !whitelist.contains(name)
        {
            return false;
        }
        should_handle(&self.config.instances, &self.config.instance_name, name.as_str())
    }

    // ------------------------------------------------------------------------------------
    // per-destination transmission

    fn drive_dirty(&mut self) {
        while let Some(name) = self.dirty.pop_first() {
            self.drive(&name);
        }
    }

    /// Runs one destination's loop as far as it can go without an answer from the host.
    fn drive(&mut self, name: &ServerName) {
        let Some(mut destination) = self.take_destination(name) else { return };
        self.drive_destination(name, &mut destination);
        self.put_destination(name, destination);
    }

    /// Moves a destination's record out of the map so it can be changed alongside `self`,
    /// leaving a placeholder in its slot: cheaper than removing and re-inserting the key on
    /// every drive and every answer. Nothing between take and put looks the name up.
    fn take_destination(&mut self, name: &ServerName) -> Option<Destination> {
        self.destinations.get_mut(name).map(|slot| core::mem::replace(slot, Destination::healthy()))
    }

    /// Puts back what [`Self::take_destination`] took.
    fn put_destination(&mut self, name: &ServerName, destination: Destination) {
        match self.destinations.get_mut(name) {
            Some(slot) => *slot = destination,
            None => {
                self.destinations.insert(name.clone(), destination);
            }
        }
    }

    fn drive_destination(&mut self, name: &ServerName, destination: &mut Destination) {
        let now = self.now;
        if destination.queue.as_ref().is_some_and(|q| q.phase != Phase::Idle) {
            return;
        }
        if !self.incarnation_durable {
            destination.queue();
            return;
        }
        if destination.backed_off(now) {
            if destination.retry_interval_ms > self.config.catch_up_threshold_ms && !destination.catching_up {
                self.start_catching_up(name, destination, true);
            }
            if destination.has_any_work() || destination.catching_up {
                // Invariant: backed_off() implies retry_at() is Some.
                let until = destination.retry_at().expect("backed off implies a retry time");
                destination.queue().phase = Phase::Waiting(until);
                self.timers.insert((until, Timer::Destination(name.clone())));
            } else {
                destination.queue = None;
            }
            return;
        }
        let catching_up = destination.catching_up;
        let queue = destination.queue();
        if queue.frozen.is_none() && catching_up && !queue.edus.is_empty() {
            // D9: ephemeral data does not wait behind catch-up.
            if let Some(frozen) = self.freeze_pending(name, destination, false) {
                destination.queue().frozen = Some(frozen);
            }
        }
        let queue = destination.queue();
        if queue.frozen.is_none() {
            if destination.catching_up {
                let queue = destination.queue.as_mut().expect("created above");
                if let Some(room) = queue.catch_up_rooms.pop_front() {
                    match self.freeze_catch_up(name, destination, room, false) {
                        Some(frozen) => destination.queue().frozen = Some(frozen),
                        None => {
                            // The room was given up; go on with the next one.
                            self.dirty.insert(name.clone());
                            return;
                        }
                    }
                } else if self.unapplied_rows.contains_key(name) {
                    // Driven again when the failed write finally lands.
                    return;
                } else {
                    let after = *queue.catch_up_pos.get_or_insert(destination.last_successful.unwrap_or(0));
                    // Rows above the fan-out position may exist from before a crash while rows
                    // below it are still being rewritten: stay at or below what this process
                    // has fanned out, so the last successful position never skips a row.
                    let up_to = self.events_out_pos;
                    let request = self.request(Pending::CatchUp { destination: name.clone(), after, up_to });
                    queue.phase = Phase::Querying(request);
                    let limit = self.config.catch_up_batch_max;
                    self.outputs.push_back(Output::LoadCatchUp {
                        request,
                        destination: name.clone(),
                        after,
                        up_to,
                        limit,
                    });
                    return;
                }
            } else {
                match self.freeze_pending(name, destination, true) {
                    Some(frozen) => destination.queue().frozen = Some(frozen),
                    None => {
                        // Idle with nothing to send: drop the queue from memory (D6).
                        destination.queue = None;
                        return;
                    }
                }
            }
        }
        if self.in_flight >= self.config.transactions_in_flight_max {
            destination.queue().phase = Phase::SlotWait;
            self.slot_waiters.push_back(name.clone());
            return;
        }
        self.send_attempt(name, destination);
    }

    fn send_attempt(&mut self, name: &ServerName, destination: &mut Destination) {
        let request = self.request(Pending::Transaction { destination: name.clone() });
        let queue = destination.queue();
        // Invariant: callers only send when a frozen transaction exists.
        let frozen = queue.frozen.as_mut().expect("send_attempt needs a frozen transaction");
        frozen.attempts += 1;
        queue.phase = Phase::Sending(request);
        self.in_flight += 1;
        self.outputs.push_back(Output::SendTransaction(OutgoingTransaction {
            request,
            destination: name.clone(),
            txn_id: frozen.txn_id.clone(),
            attempt: frozen.attempts,
            pdu_ids: frozen.pdu_ids.clone(),
            body: frozen.body.clone(),
        }));
    }

    fn next_txn_id(&mut self) -> String {
        self.txn_counter += 1;
        // `{incarnation}.{counter}`, built without `format!` (once per transaction).
        let mut id = String::with_capacity(24);
        push_decimal(&mut id, self.incarnation);
        id.push('.');
        push_decimal(&mut id, self.txn_counter);
        id
    }

    /// Builds the next transaction from memory: EDUs in Synapse's order, then the head of
    /// the PDU queue (if `with_pdus`), within the count and byte limits (D8).
    fn freeze_pending(&mut self, name: &ServerName, destination: &mut Destination, with_pdus: bool) -> Option<Frozen> {
        const EDUS_WRAPPER_BYTES: u64 = "\"edus\":[],".len() as u64;
        let overhead = empty_body_len(&self.config.server_name, self.now.as_ms());
        let bytes_max = self.config.transaction_bytes_max;
        let now_ms = self.now.as_ms();
        let queue = destination.queue.as_mut()?;
        // While isolating a poison item (D7), EDUs and PDUs are not mixed and batches shrink.
        let isolating = queue.split_limit;
        let edu_max = self.config.edus_per_transaction_max;
        let edu_limit = isolating.map_or(edu_max, |limit| limit.min(edu_max)) as usize;
        let mut bytes = overhead;
        let mut edu_count = 0u64;
        let positions = destination.device_lists.as_ref().map_or(NO_POSITIONS, |d| &d.positions);
        let taken_edus = queue.edus.take(edu_limit, now_ms, positions, &mut |size| {
            let extra = size as u64 + if edu_count == 0 { EDUS_WRAPPER_BYTES } else { 1 };
            if overhead + EDUS_WRAPPER_BYTES + size as u64 > bytes_max {
                Fit::Never
            } else if bytes + extra > bytes_max {
                Fit::NotNow
            } else {
                bytes += extra;
                edu_count += 1;
                Fit::Yes
            }
        });
        let edus = taken_edus.edus;
        // These users' chains restart in this transaction; its delivery sets their position.
        for poke in edus.iter().filter_map(|e| e.device_list.as_ref()) {
            if let Some(chains) = destination.device_lists.as_mut() {
                chains.resets.remove(&poke.user_id);
            }
        }
        let with_pdus = with_pdus && (isolating.is_none() || edus.is_empty());
        // The isolation limit halves a transaction of PDUs and EDUs together, so it may
        // exceed either count limit on its own.
        let pdu_max = self.config.pdus_per_transaction_max;
        let count_max = if with_pdus { isolating.map_or(pdu_max, |limit| limit.min(pdu_max)) as usize } else { 0 };
        let mut taken: Vec<Arc<PduEntry>> = Vec::new();
        let mut too_large: Vec<Arc<PduEntry>> = Vec::new();
        while taken.len() < count_max {
            let Some(next) = queue.pending_pdus.front() else { break };
            let size = next.json.len() as u64 + u64::from(!taken.is_empty());
            if bytes + size > bytes_max {
                if overhead + next.json.len() as u64 > bytes_max {
                    too_large.extend(queue.pending_pdus.pop_front());
                    continue;
                }
                break;
            }
            bytes += size;
            taken.extend(queue.pending_pdus.pop_front());
        }
        let reason = || String::from("larger than transaction_bytes_max on its own");
        for entry in too_large {
            self.give_up(name, destination, &entry, reason());
        }
        for edu in &taken_edus.too_large {
            self.give_up_edu(name, destination, edu, reason());
        }
        if taken.is_empty() && edus.is_empty() {
            return None;
        }
        let delivered_up_to = taken.iter().map(|p| p.stream_ordering).max();
        Some(self.freeze(taken, edus, delivered_up_to, None))
    }

    fn freeze(
        &mut self,
        items: Vec<Arc<PduEntry>>,
        edus: Vec<EduEntry>,
        delivered_up_to: Option<u64>,
        catch_up: Option<CatchUpRoom>,
    ) -> Frozen {
        let now_ms = self.now.as_ms();
        // A body names no destination: when an event fans out to many destinations at once,
        // they all freeze the same PDUs at the same time, and share one body.
        let shared = edus.is_empty()
            && self.last_body.as_ref().is_some_and(|(ts, last_items, _)| {
                *ts == now_ms
                    && last_items.len() == items.len()
                    && last_items.iter().zip(&items).all(|(a, b)| Arc::ptr_eq(a, b))
            });
        let body = match &self.last_body {
            Some((_, _, body)) if shared => body.clone(),
            _ => {
                let jsons: Vec<&str> = items.iter().map(|p| &*p.json).collect();
                let edu_jsons: Vec<&str> = edus.iter().map(|e| &*e.json).collect();
                let body: Arc<str> = Arc::from(build_body(&self.config.server_name, now_ms, &jsons, &edu_jsons));
                if edus.is_empty() {
                    self.last_body = Some((now_ms, items.clone(), body.clone()));
                }
                body
            }
        };
        let pdu_ids = items.iter().map(|p| p.event_id.clone()).collect();
        Frozen {
            txn_id: self.next_txn_id(),
            body,
            items,
            edus,
            pdu_ids,
            attempts: 0,
            rejections: 0,
            delivered_up_to,
            catch_up,
        }
    }

    /// One room of catch-up (reference §9.2 step 6): the newest visible extremities, or the
    /// event we owe if it is one of them, if the room is partial-state, or if none is visible.
    /// `owed_only` is the fallback after the destination rejected the extremities (D7).
    fn freeze_catch_up(
        &mut self,
        name: &ServerName,
        destination: &mut Destination,
        room: CatchUpRoom,
        owed_only: bool,
    ) -> Option<Frozen> {
        let catch_up_pos = destination.queue.as_ref().and_then(|q| q.catch_up_pos).unwrap_or(0);
        let owed_is_extremity = room.extremities.iter().any(|e| e.event_id == room.event_id);
        let entry = |event_id: &str, stream_ordering: u64, pdu: &serde_json::Value| {
            Arc::new(PduEntry {
                event_id: String::from(event_id),
                stream_ordering,
                // serde_json::Value always serializes.
                json: Arc::from(serde_json::to_string(pdu).unwrap_or_default()),
                queued_at_ms: 0,
            })
        };
        let overhead = empty_body_len(&self.config.server_name, self.now.as_ms());
        let bytes_max = self.config.transaction_bytes_max;
        // Why a PDU can never leave: too large for any transaction, or nested too deeply for
        // the parsers on its way.
        let undeliverable = |p: &PduEntry, pdu: &serde_json::Value| {
            if overhead + p.json.len() as u64 > bytes_max {
                return Some(String::from("larger than transaction_bytes_max on its own"));
            }
            crate::nesting::pdu_too_deep(pdu)
        };
        let mut chosen: Vec<Arc<PduEntry>> = Vec::new();
        if !owed_is_extremity && !room.partial_state && !owed_only {
            for extremity in &room.extremities {
                if extremity.stream_ordering >= catch_up_pos && extremity.visible {
                    let candidate = entry(&extremity.event_id, extremity.stream_ordering, &extremity.pdu);
                    match undeliverable(&candidate, &extremity.pdu) {
                        None => chosen.push(candidate),
                        Some(reason) => self.give_up(name, destination, &candidate, reason),
                    }
                }
            }
        }
        if chosen.is_empty() {
            let owed = entry(&room.event_id, room.stream_ordering, &room.pdu);
            if let Some(reason) = room.undeliverable.clone().or_else(|| undeliverable(&owed, &room.pdu)) {
                self.give_up(name, destination, &owed, reason);
                self.catch_up_room_done(name, destination, room.stream_ordering);
                return None;
            }
            chosen.push(owed);
        }
        // Newest first, as many as the count and byte limits allow; the first always fits.
        let mut bytes = overhead;
        let mut fitting = 0;
        for candidate in &chosen {
            bytes += candidate.json.len() as u64 + u64::from(fitting > 0);
            if bytes > bytes_max || fitting >= self.config.pdus_per_transaction_max as usize {
                break;
            }
            fitting += 1;
        }
        chosen.truncate(fitting.max(1));
        let up_to = room.stream_ordering;
        Some(self.freeze(chosen, Vec::new(), Some(up_to), Some(room)))
    }

    /// Reports an item given up for a destination and counts it (D7, D8, D12).
    fn give_up(&mut self, name: &ServerName, destination: &mut Destination, entry: &PduEntry, reason: String) {
        destination.dropped_items += 1;
        self.push_event(Event::Dropped { destination: name.clone(), item: entry.event_id.clone(), reason });
    }

    /// Reports an EDU given up for a destination; a to-device one also leaves the outbox, and
    /// a device-list one restarts its user's `prev_id` chain so the receiver resynchronises.
    fn give_up_edu(&mut self, name: &ServerName, destination: &mut Destination, edu: &EduEntry, reason: String) {
        destination.dropped_items += 1;
        if let Some(outbox_id) = edu.outbox_id {
            self.changes.to_device_deleted.push(OutboxKey { destination: name.clone(), outbox_id });
        }
        if let Some(poke) = &edu.device_list {
            self.device_list_settled(name, destination, poke);
            self.restart_device_list_chain(name, destination, &poke.user_id);
        }
        self.push_event(Event::Dropped { destination: name.clone(), item: edu.edu_type.clone(), reason });
    }

    /// A device-list poke left the destination (delivered or given up): memory and storage
    /// forget it unless a newer change replaced it.
    fn device_list_settled(&mut self, name: &ServerName, destination: &mut Destination, poke: &PokeRef) {
        if let Some(queue) = destination.queue.as_mut() {
            queue.edus.device_list_settled(poke);
        }
        self.changes.device_list_pokes_deleted.push(DeviceListPokeKey {
            destination: name.clone(),
            user_id: poke.user_id.clone(),
            device_id: poke.device_id.clone(),
            stream_id: poke.stream_id,
        });
    }

    /// The destination will miss some of `user_id`'s device-list changes: the next EDU for
    /// the user carries an empty `prev_id`, which makes the receiver fetch the whole list.
    fn restart_device_list_chain(&mut self, name: &ServerName, destination: &mut Destination, user_id: &str) {
        let chains = destination.device_lists();
        chains.resets.insert(String::from(user_id));
        if chains.positions.remove(user_id).is_some() {
            self.changes.device_list_positions.push(DeviceListPosition {
                destination: name.clone(),
                user_id: String::from(user_id),
                stream_id: None,
            });
        }
    }

    /// A catch-up room is settled (sent or given up): storage's row for it is behind us.
    fn catch_up_room_done(&mut self, name: &ServerName, destination: &mut Destination, up_to: u64) {
        if let Some(queue) = destination.queue.as_mut() {
            queue.catch_up_pos = Some(queue.catch_up_pos.unwrap_or(0).max(up_to));
        }
        if destination.last_successful.is_none_or(|current| up_to > current) {
            destination.last_successful = Some(up_to);
            self.state_changed.insert(name.clone());
        }
    }

    /// Drops the in-memory PDU queue; storage drives delivery from now on. After a long
    /// outage (`drop_ephemeral`) queued presence, receipts and typing are stale and go too,
    /// as in Synapse.
    fn start_catching_up(&mut self, name: &ServerName, destination: &mut Destination, drop_ephemeral: bool) {
        destination.catching_up = true;
        if let Some(queue) = destination.queue.as_mut() {
            // PDUs dropped from memory count as skipped: their rows may sit in a write not yet
            // emitted, so catch-up must look again until it has seen them.
            let newest_dropped = queue
                .pending_pdus
                .iter()
                .chain(queue.frozen.iter().flat_map(|f| f.items.iter()))
                .map(|p| p.stream_ordering)
                .max()
                .unwrap_or(0);
            destination.catch_up_last_skipped = destination.catch_up_last_skipped.max(newest_dropped);
            if drop_ephemeral {
                queue.edus.clear_ephemeral();
            }
            queue.pending_pdus.clear();
            queue.split_limit = None;
            queue.suspects = 0;
            // The abandoned transaction's PDUs are covered by storage and its to-device
            // messages by the outbox, so those go back to the queue. Its receipts, presence and
            // typing go with it: requeued as opaque EDUs they could overtake newer ones.
            if let Some(frozen) = queue.frozen.take() {
                for edu in frozen.edus.into_iter().rev().filter(|edu| edu.outbox_id.is_some()) {
                    queue.edus.push_front(edu);
                }
            }
            queue.catch_up_rooms.clear();
            queue.catch_up_pos = None;
            queue.http_failures = 0;
        }
        self.push_event(Event::CatchUpStarted { destination: name.clone() });
    }

    fn transaction_done(&mut self, name: ServerName, request: RequestId, result: TransactionResult) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.release_slot();
        let Some(mut destination) = self.take_destination(&name) else { return };
        let sending = destination.queue.as_ref().is_some_and(|q| q.phase == Phase::Sending(request));
        if sending {
            destination.queue().phase = Phase::Idle;
            self.attempt_finished(&name, &mut destination, result);
        }
        self.put_destination(&name, destination);
        self.dirty.insert(name);
    }

    fn attempt_finished(&mut self, name: &ServerName, destination: &mut Destination, result: TransactionResult) {
        match result {
            TransactionResult::Ok { pdu_errors } => self.delivered(name, destination, pdu_errors),
            TransactionResult::Status { status, .. } if (200..300).contains(&status) => {
                self.delivered(name, destination, BTreeMap::new());
            }
            TransactionResult::Status { status: 410, .. } => {
                // Gone: wait as long as we ever wait, until it contacts us (D10).
                let max = self.config.retry_interval_max_ms;
                self.record_failure(name, destination, Some(max));
            }
            TransactionResult::Status { status, retry_after_ms, .. } if status == 429 || status >= 500 => {
                self.retryable_failure(name, destination, retry_after_ms);
            }
            TransactionResult::Unreachable | TransactionResult::Timeout => {
                self.retryable_failure(name, destination, None);
            }
            TransactionResult::Status { status, .. }
                if status == 413 || (400..500).contains(&status) && !matches!(status, 401 | 408) =>
            {
                self.rejected(name, destination, status);
            }
            TransactionResult::Status { .. } => {
                // 3xx, 401 and 408 are not retried at the HTTP level; the destination backs off.
                self.record_failure(name, destination, None);
            }
        }
    }

    /// A permanent rejection of the frozen transaction (D7). The destination is up — it
    /// answered — so its backoff does not grow; the same transaction is retried a few times
    /// (a 413 not at all), then split to isolate the item it refuses, which is given up alone.
    fn rejected(&mut self, name: &ServerName, destination: &mut Destination, status: u16) {
        let queue = destination.queue();
        let Some(frozen) = queue.frozen.as_mut() else { return };
        frozen.rejections += 1;
        let rejections = frozen.rejections;
        // While isolating a poison item the rejection is already known to be permanent.
        let isolating = queue.split_limit.is_some() || frozen.catch_up.is_some() && frozen.rejections > 1;
        let threshold = if status == 413 || isolating { 1 } else { self.config.poison_rejections_max };
        if rejections < threshold {
            let schedule_ms =
                4u64.saturating_pow(rejections).saturating_mul(1000).min(self.config.http_retry_delay_max_ms);
            let until = self.now.plus_ms(self.rng.jitter(schedule_ms, 800, 1400));
            queue.phase = Phase::Waiting(until);
            self.timers.insert((until, Timer::Destination(name.clone())));
            return;
        }
        let Some(frozen) = queue.frozen.take() else { return };
        let reason = format!("rejected by the destination with HTTP {status}");
        match frozen.catch_up {
            Some(mut room)
                if frozen.items.len() > 1 || frozen.items.first().is_some_and(|p| p.event_id != room.event_id) =>
            {
                // Fall back to the event we owe, without the extremities.
                room.extremities.clear();
                queue.catch_up_rooms.push_front(room);
            }
            Some(room) => {
                for item in &frozen.items {
                    self.give_up(name, destination, item, reason.clone());
                }
                self.catch_up_room_done(name, destination, room.stream_ordering);
            }
            None if frozen.items.len() + edu_units(&frozen.edus) > 1 => {
                let count = (frozen.items.len() + edu_units(&frozen.edus)) as u32;
                for item in frozen.items.into_iter().rev() {
                    queue.pending_pdus.push_front(item);
                }
                for edu in frozen.edus.into_iter().rev() {
                    queue.edus.push_front(edu);
                }
                queue.split_limit = Some((count / 2).max(1));
                queue.suspects = queue.suspects.max(count);
            }
            None => {
                for item in &frozen.items {
                    self.give_up(name, destination, item, reason.clone());
                }
                for edu in &frozen.edus {
                    self.give_up_edu(name, destination, edu, reason.clone());
                }
                self.settle_normal(name, destination, &frozen);
            }
        }
    }

    fn delivered(&mut self, name: &ServerName, destination: &mut Destination, pdu_errors: BTreeMap<String, String>) {
        let queue = destination.queue();
        queue.http_failures = 0;
        // The frozen transaction is gone if catch-up started while it was in flight.
        let frozen = queue.frozen.take();
        if let (false, Some(frozen)) = (pdu_errors.is_empty(), &frozen) {
            self.push_event(Event::PduErrors {
                destination: name.clone(),
                txn_id: frozen.txn_id.clone(),
                errors: pdu_errors,
            });
        }
        destination.last_success_ts = Some(self.now.as_ms());
        if destination.is_failing() {
            destination.retry_last_ts = 0;
            destination.retry_interval_ms = 0;
            destination.failure_ts = None;
            self.state_changed.insert(name.clone());
            self.push_event(Event::DestinationUp { destination: name.clone() });
        }
        if let Some(frozen) = &frozen {
            for edu in &frozen.edus {
                if let Some(outbox_id) = edu.outbox_id {
                    self.changes.to_device_deleted.push(OutboxKey { destination: name.clone(), outbox_id });
                }
            }
            let mut settled: Vec<&PokeRef> = frozen.edus.iter().filter_map(|e| e.device_list.as_ref()).collect();
            settled.dedup();
            for poke in settled {
                self.device_list_settled(name, destination, poke);
                if poke.device_id.is_some()
                    && !destination.device_lists.as_ref().is_some_and(|d| d.resets.contains(&poke.user_id))
                    && destination.device_list_position(&poke.user_id).is_none_or(|p| p < poke.stream_id)
                {
                    destination.device_lists().positions.insert(poke.user_id.clone(), poke.stream_id);
                    self.changes.device_list_positions.push(DeviceListPosition {
                        destination: name.clone(),
                        user_id: poke.user_id.clone(),
                        stream_id: Some(poke.stream_id),
                    });
                }
            }
        }
        match frozen {
            Some(Frozen { catch_up: Some(room), .. }) => {
                self.catch_up_room_done(name, destination, room.stream_ordering)
            }
            Some(frozen) => self.settle_normal(name, destination, &frozen),
            None => {}
        }
    }

    /// A normal transaction is settled (delivered or its item given up): every row up to its
    /// newest PDU is behind us (D4: the position only grows, memory follows storage).
    fn settle_normal(&mut self, name: &ServerName, destination: &mut Destination, frozen: &Frozen) {
        if let Some(queue) = destination.queue.as_mut()
            && queue.split_limit.is_some()
        {
            queue.suspects = queue.suspects.saturating_sub((frozen.items.len() + frozen.edus.len()) as u32);
            if queue.suspects == 0 {
                queue.split_limit = None;
            }
        }
        if let Some(up_to) = frozen.delivered_up_to
            && destination.last_successful.is_none_or(|current| up_to > current)
        {
            destination.last_successful = Some(up_to);
            self.state_changed.insert(name.clone());
        }
    }

    /// A 5xx, 429, timeout or connection failure: retry the same transaction on the long
    /// schedule, then back the destination off.
    fn retryable_failure(&mut self, name: &ServerName, destination: &mut Destination, retry_after_ms: Option<u64>) {
        let queue = destination.queue();
        queue.http_failures += 1;
        let retry = queue.http_failures;
        if retry <= self.config.http_retries_max {
            let schedule_ms = 4u64.saturating_pow(retry).saturating_mul(1000).min(self.config.http_retry_delay_max_ms);
            let delay_ms = self.rng.jitter(schedule_ms, 800, 1400).max(retry_after_ms.unwrap_or(0));
            let until = self.now.plus_ms(delay_ms);
            destination.queue().phase = Phase::Waiting(until);
            self.timers.insert((until, Timer::Destination(name.clone())));
        } else {
            self.record_failure(name, destination, retry_after_ms);
        }
    }

    /// Grows the destination's backoff (reference §10.3), at least to `floor_ms`.
    fn record_failure(&mut self, name: &ServerName, destination: &mut Destination, floor_ms: Option<u64>) {
        destination.queue().http_failures = 0;
        let config = &self.config;
        let interval = if destination.retry_interval_ms > 0 {
            let grown = destination.retry_interval_ms.saturating_mul(config.retry_multiplier);
            self.rng.jitter(grown, 800, 1400).min(config.retry_interval_max_ms)
        } else {
            config.retry_interval_min_ms
        };
        let interval = interval.max(floor_ms.unwrap_or(0)).min(config.retry_interval_max_ms);
        destination.retry_interval_ms = interval;
        destination.retry_last_ts = self.now.as_ms();
        destination.failure_ts = destination.failure_ts.or(Some(self.now.as_ms()));
        self.state_changed.insert(name.clone());
        let until_ts = self.now.plus_ms(interval).as_ms();
        self.push_event(Event::BackingOff { destination: name.clone(), retry_interval_ms: interval, until_ts });
    }

    fn release_slot(&mut self) {
        while let Some(name) = self.slot_waiters.pop_front() {
            if let Some(queue) = self.destinations.get_mut(&name).and_then(|d| d.queue.as_mut())
                && queue.phase == Phase::SlotWait
            {
                queue.phase = Phase::Idle;
                self.dirty.insert(name);
                return;
            }
        }
    }

    /// Inbound contact or an operator's wake: forget the backoff and send what is owed.
    fn destination_contacted(&mut self, name: &ServerName) {
        if !self.handles(name) || *name == self.config.server_name {
            return;
        }
        let Some(destination) = self.destinations.get_mut(name) else { return };
        if destination.is_failing() {
            destination.retry_last_ts = 0;
            destination.retry_interval_ms = 0;
            destination.failure_ts = None;
            self.state_changed.insert(name.clone());
            self.push_event(Event::DestinationUp { destination: name.clone() });
        }
        self.wake(name);
    }

    /// Makes a destination send now: cuts a retry sleep short, and if memory holds nothing
    /// for it, looks in storage (D5) rather than trusting the queue's mode.
    fn wake(&mut self, name: &ServerName) {
        let Some(destination) = self.destinations.get_mut(name) else { return };
        if !destination.has_memory_work() {
            destination.catching_up = true;
            if let Some(queue) = destination.queue.as_mut() {
                queue.catch_up_pos = None;
            }
        }
        if let Some(queue) = destination.queue.as_mut()
            && matches!(queue.phase, Phase::Waiting(_))
        {
            queue.phase = Phase::Idle;
        }
        self.dirty.insert(name.clone());
    }

    fn catch_up_loaded(&mut self, name: &ServerName, rooms: Vec<CatchUpRoom>) {
        let Some(destination) = self.destinations.get_mut(name) else { return };
        let Some(queue) = destination.queue.as_mut() else { return };
        queue.phase = Phase::Idle;
        if rooms.is_empty() {
            let pos = queue.catch_up_pos.unwrap_or(0);
            if destination.catch_up_last_skipped != 0 && destination.catch_up_last_skipped > pos {
                // A PDU was skipped while the query ran; look again (once: the reset stops a
                // hot loop when its room was purged, Synapse #18491).
                destination.catch_up_last_skipped = 0;
            } else {
                destination.catching_up = false;
                destination.catch_up_last_skipped = 0;
                queue.catch_up_pos = None;
                self.push_event(Event::CatchUpFinished { destination: name.clone() });
            }
        } else {
            queue.catch_up_rooms.extend(rooms);
        }
        self.dirty.insert(name.clone());
    }

    // ------------------------------------------------------------------------------------
    // the periodic catch-up waker (reference §9.5)

    fn waker_tick(&mut self) {
        match self.waker.phase {
            WakerPhase::Scheduled(at) if at <= self.now => {
                self.prune_to_device();
                self.prune_device_lists();
                self.waker.run_started = self.now;
                self.waker.cursor = None;
                self.waker_query();
            }
            WakerPhase::Waking(at) if at <= self.now => {
                if let Some(name) = self.waker.to_wake.pop_front() {
                    self.wake_for_catch_up(&name);
                    let next = self.now.plus_ms(self.config.catch_up_waker_interval_ms);
                    self.waker.phase = WakerPhase::Waking(next);
                    self.timers.insert((next, Timer::Waker));
                } else {
                    self.waker_query();
                }
            }
            _ => {}
        }
    }

    /// D14: to-device messages for a destination failing longer than
    /// `to_device_prune_after_ms` are dropped (off by default), so a dead server does not keep
    /// its outbox forever.
    fn prune_to_device(&mut self) {
        let Some(after_ms) = self.config.to_device_prune_after_ms else { return };
        let now_ms = self.now.as_ms();
        let names: Vec<ServerName> = self
            .destinations
            .iter()
            .filter(|(_, d)| d.failure_ts.is_some_and(|since| now_ms.saturating_sub(since) > after_ms))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let Some(mut destination) = self.destinations.remove(&name) else { continue };
            let in_flight = destination.queue.as_ref().is_some_and(|q| matches!(q.phase, Phase::Sending(_)));
            let frozen_to_device = destination
                .queue
                .as_ref()
                .and_then(|q| q.frozen.as_ref())
                .is_some_and(|f| f.edus.iter().any(|e| e.outbox_id.is_some()));
            if frozen_to_device && !in_flight {
                // The frozen transaction cannot lose items (D1): abandon it as catch-up does,
                // which puts its to-device messages back in the queue to be pruned below.
                self.start_catching_up(&name, &mut destination, true);
            }
            let pruned = destination.queue.as_mut().map(|q| q.edus.take_all_to_device()).unwrap_or_default();
            let since = destination.failure_ts.unwrap_or(0);
            for edu in &pruned {
                let reason = format!("pruned: the destination has been failing since {since}");
                self.give_up_edu(&name, &mut destination, edu, reason);
            }
            self.destinations.insert(name, destination);
        }
    }

    /// Synapse's pruning of outbound device-list pokes (reference §11.4): a user with several
    /// changes queued for a destination since before `device_list_prune_after_ms` keeps only
    /// the newest, and its chain restarts so the destination resynchronises the whole list.
    fn prune_device_lists(&mut self) {
        let Some(after_ms) = self.config.device_list_prune_after_ms else { return };
        let cutoff_ms = self.now.as_ms().saturating_sub(after_ms);
        let names: Vec<ServerName> = self
            .destinations
            .iter()
            .filter(|(_, d)| d.queue.as_ref().is_some_and(|q| q.edus.has_device_lists()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let Some(mut destination) = self.destinations.remove(&name) else { continue };
            let pruned = destination.queue.as_mut().map(|q| q.edus.prune_device_lists(cutoff_ms)).unwrap_or_default();
            let mut users: BTreeSet<String> = BTreeSet::new();
            for poke in &pruned {
                self.device_list_settled(&name, &mut destination, poke);
                users.insert(poke.user_id.clone());
            }
            for user in users {
                self.restart_device_list_chain(&name, &mut destination, &user);
            }
            self.destinations.insert(name, destination);
        }
    }

    fn waker_query(&mut self) {
        let after = self.waker.cursor.clone();
        let request = self.request(Pending::Outstanding { after: after.clone() });
        self.waker.phase = WakerPhase::Querying;
        let limit = self.config.catch_up_waker_page_max;
        self.outputs.push_back(Output::LoadOutstanding { request, after, limit });
    }

    fn outstanding_loaded(&mut self, names: Vec<ServerName>) {
        if names.is_empty() {
            let next = self.waker.run_started.plus_ms(self.config.catch_up_waker_period_ms).max(self.now);
            self.waker.phase = WakerPhase::Scheduled(next);
            self.timers.insert((next, Timer::Waker));
            return;
        }
        let cursor = self.waker.cursor.clone();
        self.waker.cursor = names.iter().max().cloned().max(cursor);
        let now = self.now;
        for name in names {
            let eligible = self.handles(&name)
                && name != self.config.server_name
                && self.destinations.get(&name).is_none_or(|d| !d.backed_off(now));
            if eligible {
                self.waker.to_wake.push_back(name);
            }
        }
        // The first destination is woken at once; waker_tick schedules the next.
        self.waker.phase = WakerPhase::Waking(now);
        self.waker_tick();
    }

    fn wake_for_catch_up(&mut self, name: &ServerName) {
        let destination = self.destinations.entry(name.clone()).or_insert_with(|| {
            let mut fresh = Destination::healthy();
            fresh.catching_up = true;
            fresh
        });
        // A queue with work in memory is already on its way (maybe sleeping before an HTTP
        // retry, which the periodic scan must not cut short).
        if destination.backed_off(self.now) || destination.has_memory_work() {
            return;
        }
        self.wake(name);
    }

    // ------------------------------------------------------------------------------------
    // plumbing

    fn request(&mut self, pending: Pending) -> RequestId {
        let id = RequestId(self.next_request_id);
        self.next_request_id += 1;
        self.requests.insert(id, pending);
        id
    }

    fn push_event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event { event });
    }

    /// Emits the writes of the current input as one atomic batch.
    fn flush_changes(&mut self) {
        for name in core::mem::take(&mut self.state_changed) {
            if let Some(destination) = self.destinations.get(&name) {
                self.changes.destinations.push(destination.state(&name));
            }
        }
        if self.changes.is_empty() {
            return;
        }
        let mut changes = core::mem::take(&mut self.changes);
        // One row per key, sorted by key, so hosts write less: the newest position of a
        // (destination, room), the last write of a destination. A stable sort is linear on the
        // usual already-sorted batch (one event's rows come in destination order).
        changes
            .destination_rooms
            .sort_by(|a, b| a.destination.cmp(&b.destination).then_with(|| a.room_id.cmp(&b.room_id)));
        changes.destination_rooms.dedup_by(|later, kept| {
            let same = later.destination == kept.destination && later.room_id == kept.room_id;
            if same {
                kept.stream_ordering = kept.stream_ordering.max(later.stream_ordering);
            }
            same
        });
        changes.destinations.sort_by(|a, b| a.destination.cmp(&b.destination));
        changes.destinations.dedup_by(|later, kept| {
            let same = later.destination == kept.destination;
            if same {
                core::mem::swap(later, kept);
            }
            same
        });
        // Only a batch with rows has to become durable before later positions are claimed.
        let fanout_from = self.batch_fanout_from.take().filter(|_| !changes.destination_rooms.is_empty());
        if changes.events_out_pos.is_some() {
            // A batch is atomic, so it may claim its own events; but never events whose rows
            // sit in an earlier batch not yet durable: a crash would lose them (design §4).
            let claimable = self.claimable_position();
            changes.events_out_pos = (claimable > self.claimed_position).then_some(claimable);
            if let Some(claimed) = changes.events_out_pos {
                self.claimed_position = claimed;
            }
        }
        if let Some(from) = fanout_from {
            *self.pending_fanouts.entry(from).or_insert(0) += 1;
        }
        if changes.is_empty() {
            return;
        }
        let request = self.request(Pending::Persist { changes: changes.clone(), reissued: false, fanout_from });
        self.outputs.push_back(Output::Persist { request, changes });
    }
}

fn check_events(after: u64, events: &[PduInfo]) -> Result<(), InputError> {
    let mut previous = after;
    for event in events {
        if event.stream_ordering <= previous {
            return Err(InputError::InconsistentAnswer(format!(
                "event {} has stream ordering {} after {}; events must ascend above `after`",
                event.event_id, event.stream_ordering, previous
            )));
        }
        previous = event.stream_ordering;
    }
    Ok(())
}

fn check_catch_up(after: u64, up_to: u64, rooms: &[CatchUpRoom]) -> Result<(), InputError> {
    let mut previous = after;
    for room in rooms {
        if room.stream_ordering > up_to {
            return Err(InputError::InconsistentAnswer(format!(
                "catch-up room {} has stream ordering {} above `up_to` {up_to}",
                room.room_id, room.stream_ordering
            )));
        }
        if room.stream_ordering <= previous {
            return Err(InputError::InconsistentAnswer(format!(
                "catch-up room {} has stream ordering {} after {}; rooms must ascend above `after`",
                room.room_id, room.stream_ordering, previous
            )));
        }
        previous = room.stream_ordering;
    }
    Ok(())
}

/// EDUs counted as the items poison isolation splits: a signing-key pair is one item, since
/// it always travels whole (splitting it again would never isolate anything).
fn edu_units(edus: &[EduEntry]) -> usize {
    edus.iter().filter(|e| !(e.device_list.is_some() && e.edu_type == "org.matrix.signing_key_update")).count()
}

fn remove_one(multiset: &mut BTreeMap<u64, u32>, key: u64) {
    if let Some(count) = multiset.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            multiset.remove(&key);
        }
    }
}
