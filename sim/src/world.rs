//! The simulated world around one sender engine: our homeserver (rooms, events, membership),
//! the remote servers and the network between us, and sender-owned storage that survives
//! restarts. It answers the engine's outputs in virtual time and writes the trace.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use fedsend_core::{
    CatchUpRoom, Config, DestinationState, Event as CoreEvent, Extremity, Input, Output, PduInfo, ServerName,
    Timestamp, TransactionResult, server_of,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::checker::Checker;
use crate::faults::{Faults, Mishap};
use crate::scenario::{Flags, Respond, Scenario, Step, Visibility};
use crate::{Engine, ScenarioError};
use fedsend_driver::MemoryStore;

/// How many deliveries one `settle`/`advance` may make before the world calls it a livelock.
const DELIVERIES_PER_STEP_MAX: u64 = 5_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Membership {
    Join,
    Invite,
    Leave,
}

#[derive(Debug)]
struct Room {
    visibility: Visibility,
    members: BTreeMap<String, Membership>,
    /// Forward extremities: events without a successor.
    extremities: BTreeSet<usize>,
    partial_state: Option<Vec<String>>,
}

/// A device-list change announced while one of its user's rooms was partial-state: the
/// servers that turn up once the room is full-state are told too (Synapse's
/// `test_local_device_changes_sent_to_new_servers_on_un_partial_state`).
#[derive(Debug)]
struct DeviceChange {
    /// The input, with `destinations` filled in per announcement.
    input: Input,
    user: String,
    partial_rooms: BTreeSet<String>,
    told: BTreeSet<String>,
}

#[derive(Debug)]
struct EventRecord {
    id: String,
    room: String,
    stream: u64,
    sender: String,
    depth: u64,
    pdu: Value,
    info: PduInfo,
    /// Servers with a joined (resp. joined or invited) member in the state after the event.
    joined_after: BTreeSet<String>,
    invited_after: BTreeSet<String>,
}

#[derive(Debug)]
struct Remote {
    respond: Respond,
    latency_ms: u64,
    /// Transactions this remote accepted, by id, with their body: a repeat is answered from
    /// here, as the spec asks receivers to do.
    accepted: BTreeMap<String, alloc::sync::Arc<str>>,
}

impl Default for Remote {
    fn default() -> Self {
        Self { respond: Respond::Ok, latency_ms: 0, accepted: BTreeMap::new() }
    }
}

#[derive(Debug)]
struct RejectRule {
    host: String,
    pdus: BTreeSet<String>,
    edu_types: BTreeSet<String>,
    status: u16,
}

/// Something the world will deliver to the engine later.
#[derive(Debug)]
struct Scheduled {
    /// Which engine incarnation it belongs to: a restart drops answers to a dead process.
    generation: u64,
    delivery: Delivery,
}

#[derive(Debug)]
enum Delivery {
    Input(Input),
    TransactionResult { destination: String, txn_id: String, outcome: String, input: Input },
    PersistAck { request: fedsend_core::RequestId, changes: fedsend_core::Changes },
}

#[derive(Serialize)]
struct PersistedLine<'a> {
    t: u64,
    kind: &'static str,
    event: &'a str,
    room: &'a str,
    stream: u64,
    sender: &'a str,
}

/// A `send` line up to its `pdus`; `edus` (JSON text) and `bytes` follow (see [`send_line`]).
#[derive(Serialize)]
struct SendHead<'a> {
    t: u64,
    kind: &'static str,
    dest: &'a str,
    txn_id: &'a str,
    pdus: &'a [alloc::sync::Arc<str>],
}

#[derive(Serialize)]
struct ResultLine<'a> {
    t: u64,
    kind: &'static str,
    dest: &'a str,
    txn_id: &'a str,
    outcome: &'a str,
}

#[derive(Serialize)]
struct DroppedLine<'a> {
    t: u64,
    kind: &'static str,
    dest: &'a str,
    item: &'a str,
    reason: &'a str,
}

#[derive(Serialize)]
struct SnapshotRoom<'a> {
    destination: &'a str,
    room: &'a str,
    stream_ordering: u64,
}

#[derive(Serialize)]
struct SnapshotLine<'a> {
    t: u64,
    kind: &'static str,
    destinations: Vec<&'a DestinationState>,
    destination_rooms: Vec<SnapshotRoom<'a>>,
    events_out_pos: Option<u64>,
}

#[derive(Serialize)]
struct EndLine {
    t: u64,
    kind: &'static str,
}

/// A scenario in progress: call [`ScenarioRun::step`] until it returns `false`.
pub struct ScenarioRun {
    world: World,
    steps: Vec<Step>,
    next: usize,
    ended: bool,
}

impl ScenarioRun {
    /// Parses `scenario_json` and starts the engine.
    pub fn start(
        scenario_json: &str,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
    ) -> Result<Self, ScenarioError> {
        let scenario = Scenario::parse(scenario_json)?;
        let steps = scenario.steps.clone();
        let world = World::start(&scenario, engine, emit)?;
        Ok(Self { world, steps, next: 0, ended: false })
    }

    /// Runs the next step; after the last one it writes the `end` line and returns `false`.
    pub fn step(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> Result<bool, ScenarioError> {
        if self.ended {
            return Ok(false);
        }
        let Some(step) = self.steps.get(self.next).cloned() else {
            self.ended = true;
            emit(&line(&EndLine { t: self.world.now, kind: "end" }));
            return Ok(false);
        };
        let index = self.next;
        self.next += 1;
        self.world.run_numbered(index, &step, engine, emit)?;
        Ok(true)
    }

    /// Index of the next step to run.
    pub fn next_step(&self) -> usize {
        self.next
    }

    /// Number of steps in the scenario.
    pub fn step_count(&self) -> usize {
        self.steps.len()
    }

    /// Virtual time now (Unix ms).
    pub fn now_ms(&self) -> u64 {
        self.world.now
    }
}

/// A world driven one step at a time by its caller (the browser visualiser, interactive
/// tools): start from a scenario header (its `steps` may be empty), then apply steps as JSON.
pub struct LiveRun {
    world: World,
    applied: usize,
}

impl LiveRun {
    /// Parses the scenario header, starts the engine and runs the header's own steps.
    pub fn start(
        scenario_json: &str,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
    ) -> Result<Self, ScenarioError> {
        let scenario = Scenario::parse(scenario_json)?;
        let world = World::start(&scenario, engine, emit)?;
        let mut run = Self { world, applied: 0 };
        for step in &scenario.steps {
            run.run(step, engine, emit)?;
        }
        Ok(run)
    }

    /// Applies one step, given as the JSON of a scenario step (`{"op": …}`).
    pub fn apply(
        &mut self,
        step_json: &str,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
    ) -> Result<(), ScenarioError> {
        let index = self.applied;
        let step: Step =
            serde_json::from_str(step_json).map_err(|e| ScenarioError::new(format!("step {index}: {e}")))?;
        self.run(&step, engine, emit)
    }

    fn run(&mut self, step: &Step, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> Result<(), ScenarioError> {
        let index = self.applied;
        self.applied += 1;
        self.world.run_numbered(index, step, engine, emit)
    }

    /// Virtual time now (Unix ms).
    pub fn now_ms(&self) -> u64 {
        self.world.now
    }

    /// Steps applied so far.
    pub fn steps_applied(&self) -> usize {
        self.applied
    }
}

fn line<T: Serialize>(value: &T) -> String {
    // Trace records are plain structs of strings, integers and JSON values.
    serde_json::to_string(value).expect("trace lines always serialize")
}

pub(crate) struct World {
    /// Also write the core's events into the trace (`x-event`), for debugging simulations.
    pub(crate) trace_events: bool,
    /// Commands the engine refuses are counted and checked to change nothing, instead of
    /// failing the step (the simulator feeds odd inputs on purpose; scenarios never do).
    pub(crate) refusals_allowed: bool,
    pub(crate) faults: Option<Faults>,
    pub(crate) checker: Option<Checker>,
    server_name: String,
    config: Config,
    config_json: String,
    now: u64,
    step: usize,
    next_stream: u64,
    rooms: BTreeMap<String, Room>,
    events: Vec<EventRecord>,
    event_index: BTreeMap<String, usize>,
    remotes: BTreeMap<String, Remote>,
    rejects: Vec<RejectRule>,
    /// What storage holds durably (survives restarts).
    durable: MemoryStore,
    /// What queries see: durable plus writes not yet acknowledged.
    visible: MemoryStore,
    agenda: BTreeMap<(u64, u64), Scheduled>,
    /// The homeserver's device-list stream position.
    device_stream: u64,
    /// Local users' devices: user → device → (keys, display name).
    devices: BTreeMap<String, BTreeMap<String, (Option<Value>, Option<String>)>>,
    /// Remote users' devices we were told about (never announced by us).
    remote_devices: BTreeSet<(String, String)>,
    device_changes: Vec<DeviceChange>,
    next_seq: u64,
    generation: u64,
    engine_deadline: Option<u64>,
}

type StepResult = Result<(), String>;

impl World {
    pub(crate) fn start(
        scenario: &Scenario,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
    ) -> Result<Self, ScenarioError> {
        let server =
            ServerName::parse(&scenario.server_name).map_err(|e| ScenarioError::new(format!("server_name: {e}")))?;
        let mut config = serde_json::Map::new();
        config.insert("server_name".into(), Value::String(server.as_str().to_string()));
        config.insert("seed".into(), Value::from(scenario.seed));
        config.insert("instance_name".into(), Value::String(scenario.instance.clone()));
        config.insert("instances".into(), json!(scenario.instances));
        for (key, value) in &scenario.config {
            if matches!(key.as_str(), "server_name" | "seed" | "instance_name" | "instances") {
                return Err(ScenarioError::new(format!(
                    "config: `{key}` is set by the scenario's top level, not in `config`"
                )));
            }
            config.insert(key.clone(), value.clone());
        }
        let config_value = Value::Object(config);
        let parsed: Config =
            serde_json::from_value(config_value.clone()).map_err(|e| ScenarioError::new(format!("config: {e}")))?;
        parsed.validate().map_err(|e| ScenarioError::new(format!("config: {e}")))?;
        let mut world = Self {
            trace_events: false,
            refusals_allowed: false,
            faults: None,
            checker: None,
            server_name: scenario.server_name.clone(),
            config: parsed,
            config_json: config_value.to_string(),
            now: scenario.start_ms,
            step: 0,
            next_stream: 1,
            rooms: BTreeMap::new(),
            events: Vec::new(),
            event_index: BTreeMap::new(),
            remotes: BTreeMap::new(),
            rejects: Vec::new(),
            durable: MemoryStore::default(),
            visible: MemoryStore::default(),
            agenda: BTreeMap::new(),
            device_stream: 0,
            devices: BTreeMap::new(),
            remote_devices: BTreeSet::new(),
            device_changes: Vec::new(),
            next_seq: 0,
            generation: 0,
            engine_deadline: None,
        };
        world.boot(engine, emit).map_err(|e| ScenarioError::new(format!("engine start: {e}")))?;
        Ok(world)
    }

    /// Starts (or restarts) the engine from durable storage.
    fn boot(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> StepResult {
        self.generation += 1;
        if let Some(faults) = self.faults.as_mut() {
            let lost = self.agenda.values().filter(|s| matches!(s.delivery, Delivery::PersistAck { .. })).count();
            faults.counts.lost_writes += lost as u64;
        }
        if let Some(checker) = self.checker.as_mut() {
            let stored = fedsend_core::Changes {
                destinations: self.durable.destinations.values().cloned().collect(),
                device_list_pokes: self.durable.device_list_pokes.values().cloned().collect(),
                ..fedsend_core::Changes::default()
            };
            checker.on_restart(&stored);
        }
        self.agenda.retain(|_, s| s.generation == self.generation);
        self.visible = self.durable.clone();
        self.engine_deadline = None;
        let recovered = serde_json::to_string(&self.durable.recovered()).map_err(|e| e.to_string())?;
        engine.start(&self.config_json, &recovered)?;
        self.drain(engine, emit)
    }

    /// Runs step number `index`; an error names the step and its op.
    fn run_numbered(
        &mut self,
        index: usize,
        step: &Step,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
    ) -> Result<(), ScenarioError> {
        self.step = index;
        self.run_step(step, engine, emit)
            .map_err(|message| ScenarioError::new(format!("step {index} ({}): {message}", step.op())))
    }

    pub(crate) fn run_step(&mut self, step: &Step, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> StepResult {
        match step {
            Step::CreateRoom { room, creator, visibility } => {
                check_id(room, '!', "room")?;
                self.check_local_user(creator)?;
                if self.rooms.contains_key(room) {
                    return Err(format!("room {room} already exists"));
                }
                self.rooms.insert(
                    room.clone(),
                    Room {
                        visibility: *visibility,
                        members: BTreeMap::new(),
                        extremities: BTreeSet::new(),
                        partial_state: None,
                    },
                );
                let content = json!({ "creator": creator });
                self.persist_event(room, creator, "m.room.create", content, Some(""), None, None, Some(vec![]), emit)?;
                // The spec's world joins the creator without a separate event.
                self.room_mut(room)?.members.insert(creator.clone(), Membership::Join);
                self.notify(engine, emit)
            }
            Step::Join { room, user, id } => {
                check_id(user, '@', "user")?;
                let content = json!({ "membership": "join" });
                self.persist_event(room, user, "m.room.member", content, Some(user), id.as_deref(), None, None, emit)?;
                self.notify(engine, emit)
            }
            Step::Leave { room, user, by, id } => {
                check_id(user, '@', "user")?;
                let sender = by.as_deref().unwrap_or(user);
                check_id(sender, '@', "user")?;
                let content = json!({ "membership": "leave" });
                self.persist_event(
                    room,
                    sender,
                    "m.room.member",
                    content,
                    Some(user),
                    id.as_deref(),
                    None,
                    None,
                    emit,
                )?;
                self.notify(engine, emit)
            }
            Step::Send { room, sender, event_type, content, state_key, id, flags, prev } => {
                check_id(sender, '@', "user")?;
                if prev.is_some() && self.is_local(sender) {
                    return Err(String::from("`prev` is only for remote senders"));
                }
                self.persist_event(
                    room,
                    sender,
                    event_type,
                    content.clone(),
                    state_key.as_deref(),
                    id.as_deref(),
                    flags.as_ref(),
                    prev.clone(),
                    emit,
                )?;
                self.notify(engine, emit)
            }
            Step::PartialState { room, servers } => {
                for server in servers {
                    ServerName::parse(server).map_err(|e| e.to_string())?;
                }
                self.room_mut(room)?.partial_state = Some(servers.clone());
                Ok(())
            }
            Step::FullState { room } => {
                self.room_mut(room)?.partial_state = None;
                self.announce_after_full_state(room, engine, emit)
            }
            Step::Remote { host, respond, latency_ms } => {
                let host = self.remote_name(host)?;
                let remote = self.remotes.entry(host).or_default();
                remote.respond = respond.clone();
                remote.latency_ms = latency_ms.unwrap_or(0);
                Ok(())
            }
            Step::Reject { host, pdus, edu_types, status } => {
                let host = self.remote_name(host)?;
                if !(100..=599).contains(status) {
                    return Err(format!("status {status} is not an HTTP status"));
                }
                // Poison ids may name events that do not exist yet (they are matched on send).
                for pdu in pdus {
                    check_id(pdu, '$', "event")?;
                }
                self.rejects.push(RejectRule {
                    host,
                    pdus: pdus.iter().cloned().collect(),
                    edu_types: edu_types.iter().cloned().collect(),
                    status: *status,
                });
                Ok(())
            }
            Step::Inbound { host } => {
                let destination = ServerName::parse(&self.remote_name(host)?).map_err(|e| e.to_string())?;
                self.contact(host);
                self.input(engine, emit, Input::RemoteUp { destination })
            }
            Step::Wake { host } => {
                let destination = ServerName::parse(&self.remote_name(host)?).map_err(|e| e.to_string())?;
                self.contact(host);
                self.input(engine, emit, Input::WakeDestination { destination })
            }
            Step::Advance { ms } => {
                let target = self.now.checked_add(*ms).ok_or("time overflows")?;
                self.run_until(target, engine, emit)
            }
            Step::Settle {} => self.run_until(self.now, engine, emit),
            Step::Restart {} => self.boot(engine, emit),
            Step::SetRetryTimings { host, failure_ts, retry_last_ts, retry_interval_ms } => {
                let name = ServerName::parse(&self.remote_name(host)?).map_err(|e| e.to_string())?;
                let mut state = self.stored_state(&name);
                state.failure_ts = *failure_ts;
                state.retry_last_ts = *retry_last_ts;
                state.retry_interval = *retry_interval_ms;
                self.overwrite_state(state, engine, emit)
            }
            Step::SetLastSuccessful { host, event } => {
                let name = ServerName::parse(&self.remote_name(host)?).map_err(|e| e.to_string())?;
                let stream = self.events[self.event(event)?].stream;
                let mut state = self.stored_state(&name);
                state.last_successful_stream_ordering = Some(stream);
                self.overwrite_state(state, engine, emit)
            }
            Step::Snapshot {} => {
                self.snapshot(emit);
                Ok(())
            }
            Step::Receipt { room, user, event, receipt_type, thread, ts } => {
                let hosts = self.room_hosts(room)?;
                let index = self.event(event)?;
                let record = &self.events[index];
                if record.room != *room {
                    return Err(format!("event {event} is not in {room}"));
                }
                let mut data = serde_json::Map::new();
                data.insert("ts".into(), Value::from(*ts));
                let receipt = fedsend_core::Receipt {
                    room_id: room.clone(),
                    receipt_type: receipt_type.clone().unwrap_or_else(|| String::from("m.read")),
                    user_id: user.clone(),
                    event_id: event.clone(),
                    thread_id: thread.clone(),
                    data,
                };
                let event = Some(fedsend_core::ReceiptedEvent {
                    sender: record.sender.clone(),
                    received_ts: record.info.received_ts.unwrap_or(0),
                });
                self.input(engine, emit, Input::Receipt { receipt, hosts, event })
            }
            Step::Presence { user, presence, status_msg, last_active_ts, currently_active, destinations } => {
                let destinations = destinations
                    .iter()
                    .map(|d| ServerName::parse(d))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let state = fedsend_core::PresenceState {
                    user_id: user.clone(),
                    presence: presence.clone(),
                    status_msg: status_msg.clone(),
                    last_active_ts: *last_active_ts,
                    currently_active: *currently_active,
                };
                self.input(engine, emit, Input::Presence { states: vec![state], destinations })
            }
            Step::Typing { room, user, typing, timeout_ms: _ } => {
                let hosts = self.room_hosts(room)?;
                let input = Input::Typing { room_id: room.clone(), user_id: user.clone(), typing: *typing, hosts };
                self.input(engine, emit, input)
            }
            Step::Edu { destination, edu_type, content, key } => {
                let destination = ServerName::parse(destination).map_err(|e| e.to_string())?;
                let input =
                    Input::Edu { destination, edu_type: edu_type.clone(), content: content.clone(), key: key.clone() };
                self.input(engine, emit, input)
            }
            Step::ToDevice { sender, event_type, messages, message_id } => {
                let input = Input::ToDevice {
                    sender: sender.clone(),
                    message_type: event_type.clone(),
                    message_id: message_id.clone(),
                    messages: messages.clone(),
                };
                self.input(engine, emit, input)
            }
            Step::DeviceUpdate { user, device, deleted, keys, display_name } => {
                check_id(user, '@', "user")?;
                if device.is_empty() {
                    return Err(String::from("`device` is empty"));
                }
                if !self.is_local(user) {
                    // A remote server told us about its user's device: ours to cache, never
                    // to announce (Synapse's `test_dont_send_device_updates_for_remote_users`).
                    self.remote_devices.insert((user.clone(), device.clone()));
                    return Ok(());
                }
                let deleted = deleted.unwrap_or(false);
                let devices = self.devices.entry(user.clone()).or_default();
                let (device_keys, device_name) = if deleted {
                    if devices.remove(device).is_none() {
                        return Err(format!("{user} has no device {device} to delete"));
                    }
                    (None, None)
                } else {
                    let record = devices.entry(device.clone()).or_default();
                    if keys.is_some() {
                        record.0 = keys.clone();
                    }
                    if display_name.is_some() {
                        record.1 = display_name.clone();
                    }
                    record.clone()
                };
                self.device_stream += 1;
                let input = Input::DeviceListUpdate {
                    user_id: user.clone(),
                    device_id: device.clone(),
                    stream_id: self.device_stream,
                    deleted,
                    keys: device_keys,
                    device_display_name: device_name,
                    destinations: Vec::new(),
                };
                self.announce_device_change(user, input, engine, emit)
            }
            Step::SigningKeyUpdate { user, master_key, self_signing_key } => {
                self.check_local_user(user)?;
                self.device_stream += 1;
                let input = Input::SigningKeyUpdate {
                    user_id: user.clone(),
                    stream_id: self.device_stream,
                    master_key: master_key.clone(),
                    self_signing_key: self_signing_key.clone(),
                    destinations: Vec::new(),
                };
                self.announce_device_change(user, input, engine, emit)
            }
        }
    }

    // ----- the homeserver: device lists -----

    /// Announces a device-list change to every server sharing a room with `user`: for a
    /// partial-state room, the servers it was joined through (the only ones known yet).
    fn announce_device_change(
        &mut self,
        user: &str,
        input: Input,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
    ) -> StepResult {
        let mut told = BTreeSet::new();
        let mut partial_rooms = BTreeSet::new();
        for (room_id, room) in &self.rooms {
            if room.members.get(user) != Some(&Membership::Join) {
                continue;
            }
            match &room.partial_state {
                Some(servers) => {
                    told.extend(servers.iter().cloned());
                    partial_rooms.insert(room_id.clone());
                }
                None => told.extend(servers_with(room, &[Membership::Join])),
            }
        }
        told.remove(&self.server_name);
        let change = DeviceChange { input, user: String::from(user), partial_rooms, told };
        let input = with_destinations(&change.input, &change.told)?;
        if !change.partial_rooms.is_empty() {
            self.device_changes.push(change);
        }
        self.input(engine, emit, input)
    }

    /// `room` became full-state: its servers that were not known while it was partial hear of
    /// the device-list changes made meanwhile.
    fn announce_after_full_state(
        &mut self,
        room_id: &str,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
    ) -> StepResult {
        let Some(room) = self.rooms.get(room_id) else { return Ok(()) };
        let hosts = servers_with(room, &[Membership::Join]);
        let mut inputs = Vec::new();
        for change in &mut self.device_changes {
            if !change.partial_rooms.remove(room_id) || room.members.get(&change.user) != Some(&Membership::Join) {
                continue;
            }
            let new: BTreeSet<String> =
                hosts.iter().filter(|h| **h != self.server_name && !change.told.contains(*h)).cloned().collect();
            if new.is_empty() {
                continue;
            }
            inputs.push(with_destinations(&change.input, &new)?);
            change.told.extend(new);
        }
        self.device_changes.retain(|c| !c.partial_rooms.is_empty());
        for input in inputs {
            self.input(engine, emit, input)?;
        }
        Ok(())
    }

    // ----- the homeserver: rooms and events -----

    fn is_local(&self, user: &str) -> bool {
        server_of(user) == Some(self.server_name.as_str())
    }

    fn check_local_user(&self, user: &str) -> StepResult {
        check_id(user, '@', "user")?;
        if self.is_local(user) { Ok(()) } else { Err(format!("{user} is not a local user")) }
    }

    /// The servers with a member joined to `room` now.
    fn room_hosts(&self, room: &str) -> Result<Vec<ServerName>, String> {
        let room = self.rooms.get(room).ok_or_else(|| format!("unknown room {room}"))?;
        Ok(servers_with(room, &[Membership::Join]).iter().filter_map(|s| ServerName::parse(s).ok()).collect())
    }

    fn room_mut(&mut self, room: &str) -> Result<&mut Room, String> {
        self.rooms.get_mut(room).ok_or_else(|| format!("unknown room {room}"))
    }

    fn event(&self, id: &str) -> Result<usize, String> {
        self.event_index.get(id).copied().ok_or_else(|| format!("unknown event id {id}"))
    }

    fn remote_name(&self, host: &str) -> Result<String, String> {
        ServerName::parse(host).map_err(|e| e.to_string())?;
        if host == self.server_name {
            return Err(format!("{host} is our own server"));
        }
        Ok(host.to_string())
    }

    #[allow(clippy::too_many_arguments)]
    fn persist_event(
        &mut self,
        room_id: &str,
        sender: &str,
        event_type: &str,
        content: Value,
        state_key: Option<&str>,
        id: Option<&str>,
        flags: Option<&Flags>,
        prev: Option<Vec<String>>,
        emit: &mut dyn FnMut(&str),
    ) -> StepResult {
        let stream = self.next_stream;
        let event_id = match id {
            Some(id) => {
                check_id(id, '$', "event")?;
                if self.event_index.contains_key(id) {
                    return Err(format!("event id {id} already exists"));
                }
                id.to_string()
            }
            None => format!("${stream}"),
        };
        if self.event_index.contains_key(&event_id) {
            return Err(format!("event id {event_id} already exists"));
        }
        let is_create = event_type == "m.room.create";
        let now = self.now;
        let room = self.rooms.get(room_id).ok_or_else(|| format!("unknown room {room_id}"))?;
        let is_membership = event_type == "m.room.member" && state_key.is_some();
        let joining_self = is_membership
            && state_key == Some(sender)
            && content.get("membership").and_then(Value::as_str) == Some("join");
        if !is_create && !joining_self && room.members.get(sender) != Some(&Membership::Join) {
            return Err(format!("{sender} is not joined to {room_id}"));
        }
        let prev_indices: Vec<usize> = match prev {
            Some(ids) => ids.iter().map(|id| self.event(id)).collect::<Result<_, _>>()?,
            None => {
                let mut extremities: Vec<usize> = room.extremities.iter().copied().collect();
                extremities.sort_by(|a, b| self.events[*b].depth.cmp(&self.events[*a].depth).then(b.cmp(a)));
                extremities.truncate(10);
                extremities
            }
        };
        for &p in &prev_indices {
            if self.events[p].room != room_id {
                return Err(format!("prev event {} is in another room", self.events[p].id));
            }
        }
        let depth = prev_indices.iter().map(|&p| self.events[p].depth).max().map_or(1, |d| d + 1);
        let prev_ids: Vec<String> = prev_indices.iter().map(|&p| self.events[p].id.clone()).collect();
        let hosts_before = servers_with(room, &[Membership::Join]);
        let flags = flags.cloned();
        let on_behalf_of = match flags.as_ref().and_then(|f| f.send_on_behalf_of.clone()) {
            Some(name) => Some(ServerName::parse(&name).map_err(|e| e.to_string())?),
            None => None,
        };

        let mut pdu = json!({
            "auth_events": [],
            "content": content,
            "depth": depth,
            "event_id": event_id,
            "hashes": { "sha256": "" },
            "origin_server_ts": now,
            "prev_events": prev_ids,
            "room_id": room_id,
            "sender": sender,
            "type": event_type,
        });
        if let (Some(key), Some(object)) = (state_key, pdu.as_object_mut()) {
            object.insert("state_key".into(), Value::String(key.to_string()));
        }

        // Membership changes apply after routing was decided from the state before the event.
        let mut invitee_server = None;
        let room = self.rooms.get_mut(room_id).ok_or_else(|| format!("unknown room {room_id}"))?;
        if is_membership {
            let target = state_key.unwrap_or_default();
            check_id(target, '@', "user")?;
            let membership = match content.get("membership").and_then(Value::as_str) {
                Some("join") => Membership::Join,
                Some("invite") => Membership::Invite,
                Some("leave") | Some("ban") => Membership::Leave,
                other => return Err(format!("unsupported membership {other:?}")),
            };
            let previous = room.members.get(target).copied();
            if membership == Membership::Leave && previous == Some(Membership::Invite) && sender != target {
                invitee_server = server_of(target).and_then(|s| ServerName::parse(s).ok());
            }
            room.members.insert(target.to_string(), membership);
        }
        for &p in &prev_indices {
            room.extremities.remove(&p);
        }
        let index = self.events.len();
        room.extremities.insert(index);
        let joined_after = servers_with(room, &[Membership::Join]);
        let invited_after = servers_with(room, &[Membership::Join, Membership::Invite]);
        let partial_state_servers = match &room.partial_state {
            Some(servers) => Some(
                servers
                    .iter()
                    .map(|s| ServerName::parse(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };

        let hosts: Vec<ServerName> = hosts_before.iter().filter_map(|s| ServerName::parse(s).ok()).collect();
        let info = PduInfo {
            event_id: event_id.clone(),
            room_id: room_id.to_string(),
            stream_ordering: stream,
            sender: sender.to_string(),
            has_prev_events: !prev_indices.is_empty(),
            hosts,
            partial_state_servers,
            invitee_server,
            proactively_send: flags.as_ref().is_none_or(|f| f.proactively_send),
            out_of_band: flags.as_ref().is_some_and(|f| f.out_of_band),
            send_on_behalf_of: on_behalf_of,
            received_ts: Some(now),
            pdu: pdu.clone(),
        };
        self.events.push(EventRecord {
            id: event_id.clone(),
            room: room_id.to_string(),
            stream,
            sender: sender.to_string(),
            depth,
            pdu,
            info,
            joined_after,
            invited_after,
        });
        self.event_index.insert(event_id.clone(), index);
        self.next_stream += 1;
        emit(&line(&PersistedLine { t: now, kind: "persisted", event: &event_id, room: room_id, stream, sender }));
        Ok(())
    }

    fn notify(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> StepResult {
        let up_to = self.next_stream - 1;
        self.input(engine, emit, Input::NewEvents { up_to })
    }

    fn visible_to(&self, index: usize, destination: &str) -> bool {
        let event = &self.events[index];
        let Some(room) = self.rooms.get(&event.room) else { return false };
        if room.partial_state.is_some() && !self.is_local(&event.sender) {
            return false;
        }
        match room.visibility {
            Visibility::Shared | Visibility::WorldReadable => true,
            Visibility::Joined => event.joined_after.contains(destination),
            Visibility::Invited => event.invited_after.contains(destination),
        }
    }

    // ----- storage -----

    fn stored_state(&self, name: &ServerName) -> DestinationState {
        self.durable
            .destinations
            .get(name)
            .cloned()
            .unwrap_or_else(|| DestinationState { destination: name.clone(), ..DestinationState::default() })
    }

    /// An operator edit of storage, which the running sender is told about.
    fn overwrite_state(
        &mut self,
        state: DestinationState,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
    ) -> StepResult {
        self.contact(state.destination.as_str());
        self.durable.destinations.insert(state.destination.clone(), state.clone());
        self.visible.destinations.insert(state.destination.clone(), state.clone());
        self.input(engine, emit, Input::SetDestinationState { state })
    }

    pub(crate) fn now(&self) -> u64 {
        self.now
    }

    /// For every (destination, room): the newest event fan-out owed that destination, as
    /// (destination, room, event id, stream ordering). Events fan-out `skipped` with a
    /// reason (nested too deeply for any parser on the way) are owed to nobody.
    pub(crate) fn owed(&self, skipped: &BTreeSet<String>) -> Vec<(String, String, String, u64)> {
        let mut owed: BTreeMap<(String, String), (String, u64)> = BTreeMap::new();
        for event in &self.events {
            if skipped.contains(&event.id) {
                continue;
            }
            let info = &event.info;
            let sendable = (self.is_local(&info.sender) || info.send_on_behalf_of.is_some())
                && info.has_prev_events
                && info.proactively_send
                && !info.out_of_band;
            if !sendable {
                continue;
            }
            let targets =
                info.partial_state_servers.as_ref().unwrap_or(&info.hosts).iter().chain(info.invitee_server.iter());
            for target in targets {
                if target.as_str() == self.server_name || info.send_on_behalf_of.as_ref() == Some(target) {
                    continue;
                }
                owed.insert((String::from(target.as_str()), event.room.clone()), (event.id.clone(), event.stream));
            }
        }
        owed.into_iter().map(|((dest, room), (id, stream))| (dest, room, id, stream)).collect()
    }

    /// The newest event of `room`, if any.
    pub(crate) fn latest_event_in(&self, room: &str) -> Option<String> {
        self.events.iter().rev().find(|e| e.room == room).map(|e| e.id.clone())
    }

    /// Whether `event_id` is in `room` at or after `stream`.
    pub(crate) fn event_in_room_at_or_after(&self, event_id: &str, room: &str, stream: u64) -> bool {
        self.event_index.get(event_id).is_some_and(|&i| self.events[i].room == room && self.events[i].stream >= stream)
    }

    fn contact(&mut self, host: &str) {
        if let Some(checker) = self.checker.as_mut() {
            checker.on_contact(host);
        }
    }

    /// When a storage answer arrives, or `None` if storage fails the request.
    fn storage_answer_at(&mut self) -> Option<u64> {
        let Some(faults) = self.faults.as_mut() else { return Some(self.now) };
        if faults.storage_fails() {
            return None;
        }
        Some(self.now + faults.storage_delay_ms())
    }

    fn answer(&mut self, request: fedsend_core::RequestId, input: Input) {
        match self.storage_answer_at() {
            Some(at) => self.schedule(at, Delivery::Input(input)),
            None => {
                let error = String::from("injected storage failure");
                self.schedule(self.now, Delivery::Input(Input::StorageFailed { request, error }));
            }
        }
    }

    fn snapshot(&self, emit: &mut dyn FnMut(&str)) {
        let destination_rooms = self
            .durable
            .destination_rooms
            .iter()
            .map(|((destination, room), stream)| SnapshotRoom {
                destination: destination.as_str(),
                room,
                stream_ordering: *stream,
            })
            .collect();
        emit(&line(&SnapshotLine {
            t: self.now,
            kind: "snapshot",
            destinations: self.durable.destinations.values().collect(),
            destination_rooms,
            events_out_pos: self.durable.events_out_pos,
        }));
    }

    // ----- the engine boundary -----

    fn input(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str), input: Input) -> StepResult {
        // Inputs that queue staggered data must not release several destinations at once;
        // any other input may (see `Checker::check_stagger`).
        let staggered = matches!(
            input,
            Input::Presence { .. }
                | Input::Receipt { .. }
                | Input::DeviceListUpdate { .. }
                | Input::SigningKeyUpdate { .. }
        );
        if let (false, Some(checker)) = (staggered, self.checker.as_mut()) {
            checker.on_delivery(self.now);
        }
        let refusable = self.refusals_allowed && is_command(&input);
        let before = refusable.then(|| (engine.destination_stats(), engine.poll_timeout()));
        // Name a refused input by its type only: a whole input can be megabytes.
        let (refused, input) = match engine.linked_core() {
            // The core in this process takes the value itself, which encoding it and parsing it
            // back would only copy; the checker still needs it afterwards.
            Some(core) => {
                let kept = self.checker.is_some().then(|| input.clone());
                let kind = VariantName::of(&input);
                let refused = core.handle_input(Timestamp(self.now), input).err().map(|e| (e.to_string(), kind));
                (refused, kept)
            }
            None => {
                let text = serde_json::to_string(&input).map_err(|e| e.to_string())?;
                match engine.handle_input(self.now, &text) {
                    Ok(()) => (None, Some(input)),
                    Err(e) => (Some((e, VariantName::of(&input))), None),
                }
            }
        };
        if let Some((e, kind)) = refused {
            let kind = kind.as_str();
            let Some((stats_before, deadline_before)) = before else {
                return Err(format!("engine refused a {kind} input: {e}"));
            };
            return self.check_refusal(engine, kind, &e, stats_before, deadline_before);
        }
        if let (Some(checker), Some(input)) = (self.checker.as_mut(), input.as_ref()) {
            checker.on_input_accepted(self.now, input);
        }
        self.drain(engine, emit)
    }

    /// A refused command must leave the machine as it was: no output, the same deadline, the
    /// same queues and destination records.
    fn check_refusal(
        &mut self,
        engine: &mut dyn Engine,
        kind: &str,
        error: &str,
        stats_before: Option<String>,
        deadline_before: Option<u64>,
    ) -> StepResult {
        if error.trim().is_empty() {
            return Err(format!("engine refused a {kind} input without saying why"));
        }
        if let Some(output) = engine.poll_output() {
            let head: String = output.chars().take(300).collect();
            return Err(format!("a refused {kind} input ({error}) still produced output {head}"));
        }
        if engine.poll_timeout() != deadline_before {
            return Err(format!("a refused {kind} input ({error}) moved the engine's deadline"));
        }
        let stats_after = engine.destination_stats();
        if let (Some(before), Some(after)) = (stats_before, stats_after)
            && stats_without_clock(&before)? != stats_without_clock(&after)?
        {
            return Err(format!("a refused {kind} input ({error}) changed the destinations: {before} -> {after}"));
        }
        if let Some(checker) = self.checker.as_mut() {
            checker.on_input_refused();
        }
        Ok(())
    }

    fn schedule(&mut self, at: u64, delivery: Delivery) {
        self.next_seq += 1;
        self.agenda.insert((at, self.next_seq), Scheduled { generation: self.generation, delivery });
    }

    fn drain(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> StepResult {
        loop {
            let (output, linked) = match engine.linked_core() {
                Some(core) => match core.poll_output() {
                    Some(output) => (output, true),
                    None => break,
                },
                None => match engine.poll_output() {
                    Some(text) => (
                        serde_json::from_str(&text)
                            .map_err(|e| format!("engine produced an undecodable output {text}: {e}"))?,
                        false,
                    ),
                    None => break,
                },
            };
            self.perform(output, linked, emit)?;
        }
        self.engine_deadline = engine.poll_timeout();
        Ok(())
    }

    /// Does what `output` asks; `linked`: it came from the core in this process (see `transmit`).
    fn perform(&mut self, output: Output, linked: bool, emit: &mut dyn FnMut(&str)) -> StepResult {
        let now = self.now;
        match output {
            Output::SendTransaction(txn) => self.transmit(txn, linked, emit),
            Output::FetchEvents { request, after, limit } => {
                // Stream orderings are 1-based positions in `events`.
                let from = usize::try_from(after).unwrap_or(usize::MAX).min(self.events.len());
                let events: Vec<PduInfo> =
                    self.events[from..].iter().take(limit as usize).map(|e| e.info.clone()).collect();
                self.answer(request, Input::EventsFetched { request, events });
                Ok(())
            }
            Output::LoadCatchUp { request, destination, after, up_to, limit } => {
                let rows = self.visible.catch_up_rows(&destination, after, up_to, limit);
                let mut rooms = Vec::with_capacity(rows.len());
                for (room_id, stream) in rows {
                    let Some(index) = usize::try_from(stream).ok().and_then(|s| s.checked_sub(1)) else { continue };
                    if index >= self.events.len() {
                        continue;
                    }
                    let event = &self.events[index];
                    let room =
                        self.rooms.get(&room_id).ok_or_else(|| format!("storage names unknown room {room_id}"))?;
                    let mut extremities: Vec<usize> = room.extremities.iter().copied().collect();
                    extremities.sort_by(|a, b| self.events[*b].depth.cmp(&self.events[*a].depth).then(b.cmp(a)));
                    extremities.truncate(10);
                    rooms.push(CatchUpRoom {
                        room_id: room_id.clone(),
                        stream_ordering: stream,
                        event_id: event.id.clone(),
                        pdu: event.pdu.clone(),
                        partial_state: room.partial_state.is_some(),
                        extremities: extremities
                            .into_iter()
                            .map(|x| Extremity {
                                event_id: self.events[x].id.clone(),
                                stream_ordering: self.events[x].stream,
                                visible: self.visible_to(x, destination.as_str()),
                                pdu: self.events[x].pdu.clone(),
                            })
                            .collect(),
                        undeliverable: None,
                    });
                }
                if self.trace_events {
                    let summary: Vec<(String, u64, String)> =
                        rooms.iter().map(|r| (r.room_id.clone(), r.stream_ordering, r.event_id.clone())).collect();
                    emit(&line(
                        &json!({"t": now, "kind": "x-catch-up", "dest": destination.as_str(), "after": after, "rooms": summary}),
                    ));
                }
                if let Some(checker) = self.checker.as_mut() {
                    let offered = rooms.iter().flat_map(|room| {
                        core::iter::once(room.event_id.clone())
                            .chain(room.extremities.iter().filter(|x| x.visible).map(|x| x.event_id.clone()))
                    });
                    checker.on_offered(destination.as_str(), offered);
                }
                self.answer(request, Input::CatchUpLoaded { request, rooms });
                Ok(())
            }
            Output::LoadOutstanding { request, after, limit } => {
                let destinations = self.visible.outstanding(after.as_ref(), limit);
                self.answer(request, Input::OutstandingLoaded { request, destinations });
                Ok(())
            }
            Output::Persist { request, changes } => {
                if let Some(checker) = self.checker.as_mut() {
                    checker.on_persist(&changes);
                }
                match self.storage_answer_at() {
                    Some(at) => {
                        self.visible.apply(&changes);
                        self.schedule(at, Delivery::PersistAck { request, changes });
                    }
                    None => {
                        let error = String::from("injected storage failure");
                        self.schedule(now, Delivery::Input(Input::StorageFailed { request, error }));
                    }
                }
                Ok(())
            }
            Output::Event { event } => {
                if let Some(checker) = self.checker.as_mut() {
                    checker.on_event(&event)?;
                }
                if self.trace_events {
                    #[derive(Serialize)]
                    struct EventLine<'a> {
                        t: u64,
                        kind: &'static str,
                        event: &'a CoreEvent,
                    }
                    emit(&line(&EventLine { t: now, kind: "x-event", event: &event }));
                }
                if let CoreEvent::Dropped { destination, item, reason } = event {
                    emit(&line(&DroppedLine {
                        t: now,
                        kind: "dropped",
                        dest: destination.as_str(),
                        item: &item,
                        reason: &reason,
                    }));
                }
                Ok(())
            }
            other => Err(format!("the world cannot perform {other:?}")),
        }
    }

    /// A transaction leaves: trace it, let the remote decide, schedule the answer.
    ///
    /// The trace shows its EDUs as they are. A body built by the core in this process (`linked`)
    /// has them as serde_json wrote them, which is exactly the text re-encoding them after
    /// parsing gives, so their text is cut out of the body; the EDUs are parsed only when a
    /// checker or a reject rule reads them. Any other engine's body is parsed, as a receiver
    /// would.
    fn transmit(
        &mut self,
        txn: fedsend_core::OutgoingTransaction,
        linked: bool,
        emit: &mut dyn FnMut(&str),
    ) -> StepResult {
        let now = self.now;
        let host = txn.destination.as_str().to_string();
        let needs_values =
            self.checker.is_some() || self.rejects.iter().any(|rule| rule.host == host && !rule.edu_types.is_empty());
        let cut = if linked { edus_text(&txn.body) } else { None };
        let (edus_json, edus): (String, Vec<Value>) = match cut {
            Some(text) if !needs_values => (String::from(text), Vec::new()),
            _ => {
                let body: Value =
                    serde_json::from_str(&txn.body).map_err(|e| format!("transaction body is not JSON: {e}"))?;
                let edus: Vec<Value> = body.get("edus").and_then(Value::as_array).cloned().unwrap_or_default();
                let text = match cut {
                    Some(text) => String::from(text),
                    None => serde_json::to_string(&edus).map_err(|e| e.to_string())?,
                };
                (text, edus)
            }
        };
        let head =
            SendHead { t: now, kind: "send", dest: txn.destination.as_str(), txn_id: &txn.txn_id, pdus: &txn.pdu_ids };
        emit(&send_line(&head, &edus_json, txn.body.len()));
        if host == self.server_name {
            return Err(String::from("the sender sent a transaction to ourselves"));
        }
        if let Some(mut checker) = self.checker.take() {
            let events = &self.events;
            let index = &self.event_index;
            let routed = |event_id: &str| {
                index.get(event_id).is_some_and(|&i| {
                    let info = &events[i].info;
                    info.partial_state_servers.as_ref().unwrap_or(&info.hosts).iter().any(|h| h.as_str() == host)
                        || info.invitee_server.as_ref().is_some_and(|h| h.as_str() == host)
                })
            };
            let kinds: Vec<&str> =
                edus.iter().map(|e| e.get("edu_type").and_then(Value::as_str).unwrap_or("")).collect();
            let verdict = checker.on_send(now, &self.server_name, &txn, &kinds, &routed);
            self.checker = Some(checker);
            verdict?;
        }
        let edu_types: BTreeSet<String> =
            edus.iter().filter_map(|e| e.get("edu_type").and_then(Value::as_str)).map(String::from).collect();
        let rejected = self.rejects.iter().find(|rule| {
            rule.host == host
                && (txn.pdu_ids.iter().any(|id| rule.pdus.contains(&**id))
                    || edu_types.iter().any(|t| rule.edu_types.contains(t)))
        });
        let timeout_ms = self.config.request_timeout_ms;
        let mishap = self.faults.as_mut().map_or(Mishap::None, Faults::mishap);
        let extra_latency = self.faults.as_mut().map_or(0, Faults::latency_ms);
        let remote = self.remotes.entry(host.clone()).or_default();
        let respond = match rejected {
            Some(rule) => Respond::Status {
                status: rule.status,
                retry_after_ms: None,
                errcode: None,
                pdu_errors: BTreeMap::new(),
            },
            None => remote.respond.clone(),
        };
        let latency = remote.latency_ms + extra_latency;
        let respond = match (mishap, &respond) {
            (Mishap::Error, Respond::Ok) => {
                Respond::Status { status: 500, retry_after_ms: None, errcode: None, pdu_errors: BTreeMap::new() }
            }
            (Mishap::RateLimit { retry_after_ms }, Respond::Ok) => Respond::Status {
                status: 429,
                retry_after_ms: Some(retry_after_ms),
                errcode: Some(String::from("M_LIMIT_EXCEEDED")),
                pdu_errors: BTreeMap::new(),
            },
            _ => respond,
        };
        let (at, outcome, result) = match respond {
            Respond::Ok => (now + latency, String::from("ok"), TransactionResult::Ok { pdu_errors: BTreeMap::new() }),
            Respond::Unreachable => (now + latency, String::from("unreachable"), TransactionResult::Unreachable),
            Respond::Timeout => (now + timeout_ms, String::from("timeout"), TransactionResult::Timeout),
            Respond::Status { status, pdu_errors, .. } if (200..300).contains(&status) => {
                let outcome = if pdu_errors.is_empty() { "ok" } else { "ok_with_pdu_errors" };
                (now + latency, String::from(outcome), TransactionResult::Ok { pdu_errors })
            }
            Respond::Status { status, retry_after_ms, errcode, .. } => (
                now + latency,
                format!("status {status}"),
                TransactionResult::Status { status, retry_after_ms, errcode },
            ),
        };
        if matches!(result, TransactionResult::Ok { .. }) {
            match remote.accepted.get(&txn.txn_id) {
                // A repeat is answered from the receiver's memory of the transaction id.
                Some(previous) if **previous != *txn.body => {
                    return Err(format!("txn id {} was reused with a different body", txn.txn_id));
                }
                Some(_) => {}
                None => {
                    remote.accepted.insert(txn.txn_id.clone(), txn.body.clone());
                    if let Some(checker) = self.checker.as_mut() {
                        checker.on_accepted(&host, &txn.pdu_ids, &edus)?;
                    }
                }
            }
        }
        // A lost answer: the remote did the work, the sender hears nothing until its timeout.
        let (at, outcome, result) = if mishap == Mishap::Drop && matches!(result, TransactionResult::Ok { .. }) {
            (now + timeout_ms, String::from("timeout"), TransactionResult::Timeout)
        } else {
            (at, outcome, result)
        };
        let input = Input::TransactionDone { request: txn.request, result };
        self.schedule(at, Delivery::TransactionResult { destination: host, txn_id: txn.txn_id, outcome, input });
        Ok(())
    }

    /// Delivers everything due up to `target` in time order, then sets the clock to `target`.
    fn run_until(&mut self, target: u64, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> StepResult {
        let mut deliveries = 0u64;
        loop {
            deliveries += 1;
            if deliveries > DELIVERIES_PER_STEP_MAX {
                return Err(format!("no quiescence after {DELIVERIES_PER_STEP_MAX} deliveries (livelock?)"));
            }
            let next_scheduled = self.agenda.keys().next().map(|(at, _)| *at);
            let deadline = self.engine_deadline.map(|d| d.max(self.now));
            let due_scheduled = next_scheduled.filter(|at| *at <= target);
            let due_deadline = deadline.filter(|at| *at <= target);
            match (due_scheduled, due_deadline) {
                (Some(at), deadline) if deadline.is_none_or(|d| at <= d) => {
                    self.now = self.now.max(at);
                    let Some((_, scheduled)) = self.agenda.pop_first() else { break };
                    self.deliver(scheduled.delivery, engine, emit)?;
                }
                (_, Some(at)) => {
                    self.now = self.now.max(at);
                    self.engine_deadline = None;
                    self.input(engine, emit, Input::Timeout)?;
                    if self.engine_deadline.is_some_and(|d| d <= at)
                        && self.agenda.keys().next().is_none_or(|k| k.0 > at)
                    {
                        return Err(format!("engine asked for a timeout at {at} again right after it was delivered"));
                    }
                }
                _ => break,
            }
        }
        self.now = target;
        Ok(())
    }

    fn deliver(&mut self, delivery: Delivery, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> StepResult {
        match delivery {
            Delivery::Input(input) => self.input(engine, emit, input),
            Delivery::TransactionResult { destination, txn_id, outcome, input } => {
                if let (Some(checker), Input::TransactionDone { result, .. }) = (self.checker.as_mut(), &input) {
                    checker.on_result(&destination, &txn_id, result);
                }
                emit(&line(&ResultLine {
                    t: self.now,
                    kind: "result",
                    dest: &destination,
                    txn_id: &txn_id,
                    outcome: &outcome,
                }));
                self.input(engine, emit, input)
            }
            Delivery::PersistAck { request, changes } => {
                if let Some(checker) = self.checker.as_mut() {
                    checker.on_durable(&changes);
                }
                self.durable.apply_owned(changes);
                self.input(engine, emit, Input::Persisted { request })
            }
        }
    }
}

/// Commands from the homeserver, which the engine may refuse; answers and timeouts are
/// never refused when the world is consistent.
fn is_command(input: &Input) -> bool {
    matches!(
        input,
        Input::Edu { .. }
            | Input::Typing { .. }
            | Input::Receipt { .. }
            | Input::Presence { .. }
            | Input::ToDevice { .. }
            | Input::DeviceListUpdate { .. }
            | Input::SigningKeyUpdate { .. }
    )
}

/// An input's `type` as it is encoded (its variant's name in snake_case), read from the head of
/// its `Debug` text: the typed path has handed the input over by the time a refusal needs the
/// name, and formatting stops after the name, so it costs nothing worth avoiding.
struct VariantName {
    text: [u8; 40],
    len: usize,
}

impl VariantName {
    fn of(input: &Input) -> Self {
        use core::fmt::Write;
        let mut name = Self { text: [0; 40], len: 0 };
        // Stops with an error at the first character after the name.
        let _ = write!(name, "{input:?}");
        name
    }

    fn as_str(&self) -> &str {
        // Only ASCII letters, digits and '_' are ever written.
        core::str::from_utf8(&self.text[..self.len]).unwrap_or_default()
    }
}

impl core::fmt::Write for VariantName {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.bytes() {
            if !c.is_ascii_alphanumeric() || self.len + 2 > self.text.len() {
                return Err(core::fmt::Error);
            }
            if c.is_ascii_uppercase() && self.len > 0 {
                self.text[self.len] = b'_';
                self.len += 1;
            }
            self.text[self.len] = c.to_ascii_lowercase();
            self.len += 1;
        }
        Ok(())
    }
}

/// A `send` trace line: `head`'s members, then `edus` (JSON text of the array) and `bytes`,
/// the order the line always had.
fn send_line(head: &SendHead<'_>, edus: &str, bytes: usize) -> String {
    let mut text = line(head);
    text.pop(); // the head's closing brace
    text.push_str(",\"edus\":");
    text.push_str(edus);
    // Writing to a String cannot fail.
    let _ = core::fmt::Write::write_fmt(&mut text, format_args!(",\"bytes\":{bytes}}}"));
    text
}

/// The text of the `edus` array of a body the core built (`{"edus":[…],"origin":…`, or no
/// `edus` member when it has none), found by matching brackets outside strings; `None` for
/// any other layout.
fn edus_text(body: &str) -> Option<&str> {
    let Some(rest) = body.strip_prefix("{\"edus\":") else {
        return body.starts_with("{\"origin\":").then_some("[]");
    };
    let bytes = rest.as_bytes();
    if bytes.first() != Some(&b'[') {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return rest.get(..=i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Destination figures without those the clock alone changes (a refused input still moves
/// the engine's clock to its `now`, so a backoff may have ended in the meantime).
fn stats_without_clock(stats_json: &str) -> Result<Vec<fedsend_core::DestinationStats>, String> {
    let mut stats: Vec<fedsend_core::DestinationStats> =
        serde_json::from_str(stats_json).map_err(|e| format!("engine stats are not decodable: {e}"))?;
    for stat in &mut stats {
        stat.state = fedsend_core::DestinationPhase::Idle;
        stat.backoff_until_ts = None;
        stat.oldest_pending_age_ms = None;
    }
    Ok(stats)
}

/// A device-list input addressed to `servers`.
fn with_destinations(input: &Input, servers: &BTreeSet<String>) -> Result<Input, String> {
    let names =
        servers.iter().map(|s| ServerName::parse(s)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let mut input = input.clone();
    match &mut input {
        Input::DeviceListUpdate { destinations, .. } | Input::SigningKeyUpdate { destinations, .. } => {
            *destinations = names;
        }
        _ => {}
    }
    Ok(input)
}

fn servers_with(room: &Room, memberships: &[Membership]) -> BTreeSet<String> {
    room.members
        .iter()
        .filter(|(_, m)| memberships.contains(m))
        .filter_map(|(user, _)| server_of(user).map(String::from))
        .collect()
}

fn check_id(id: &str, sigil: char, what: &str) -> StepResult {
    let valid = id.starts_with(sigil)
        && id.len() > 1
        && match sigil {
            '$' => true,
            _ => server_of(id).is_some_and(|s| ServerName::parse(s).is_ok()),
        };
    if valid { Ok(()) } else { Err(format!("invalid {what} id {id:?}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_name_is_the_encoded_type() {
        let destination = ServerName::parse("far.test").unwrap();
        let inputs = [
            Input::Timeout,
            Input::NewEvents { up_to: 3 },
            Input::RemoteUp { destination: destination.clone() },
            Input::Persisted { request: fedsend_core::RequestId(1) },
            Input::StoredDeviceListPokes { pokes: Vec::new() },
            Input::TransactionDone { request: fedsend_core::RequestId(2), result: TransactionResult::Timeout },
        ];
        for input in &inputs {
            let encoded = serde_json::to_value(input).unwrap();
            assert_eq!(VariantName::of(input).as_str(), encoded["type"].as_str().unwrap());
        }
    }

    #[test]
    fn the_edus_of_a_body_are_cut_out_as_encoded() {
        let edus = json!([
            {"content": {"a]": "}\"[", "n": [1.5, -0.0, {"x": "\\\"]"}], "u": "é\u{1}"}, "edu_type": "m.x"},
            {"content": {}, "edu_type": "m.typing"}
        ]);
        let text = serde_json::to_string(&edus).unwrap();
        let body = format!("{{\"edus\":{text},\"origin\":\"h.test\",\"origin_server_ts\":1,\"pdus\":[]}}");
        assert_eq!(edus_text(&body), Some(text.as_str()));
        let parsed: Value = serde_json::from_str(edus_text(&body).unwrap()).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), text);
        assert_eq!(edus_text("{\"origin\":\"h.test\",\"origin_server_ts\":1,\"pdus\":[]}"), Some("[]"));
        assert_eq!(edus_text("{ \"edus\": []}"), None);
        assert_eq!(edus_text("{\"edus\":[{\"a\":1}"), None);
    }
}
