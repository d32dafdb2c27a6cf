//! The seeded simulator (TigerBeetle's VOPR is the model): a random world and workload drawn
//! from one seed, faults everywhere during a safety phase with invariants checked on every
//! step, then healing and a liveness phase that demands convergence within a budget.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use fedsend_core::nesting::DOCUMENT_DEPTH_MAX;
use fedsend_core::{Config, Prng};
use serde_json::{Value, json};

use crate::Engine;
use crate::checker::{Checker, Counts};
use crate::faults::{FaultCounts, FaultRates, Faults};
use crate::odd::OddInputs;
use crate::scenario::{Respond, Scenario, Step, Visibility};
use crate::world::World;

const SERVER_NAME: &str = "origin.sim";

/// Deepest event content drawn. Beyond the core's limit, so fan-out and catch-up must skip
/// such events with a reason, but within what the world can hand the engine: a catch-up
/// answer wraps the content in six levels (input, rooms, room, extremities, extremity, pdu)
/// and the engine's parser stops at `DOCUMENT_DEPTH_MAX`. (The real hosts screen deeper
/// events out before they reach the core.)
const PDU_CONTENT_DEPTH_MAX: usize = DOCUMENT_DEPTH_MAX - 12;

/// Deepest value drawn for a command: past the parser's limit, so some are refused as
/// malformed rather than by the nesting check.
const COMMAND_VALUE_DEPTH_MAX: usize = DOCUMENT_DEPTH_MAX + 20;

/// Everything a seed decides about a run, printed in the banner.
#[derive(Clone, Debug)]
pub struct Options {
    /// The seed.
    pub seed: u64,
    /// Remote servers.
    pub remotes: u32,
    /// Rooms.
    pub rooms: u32,
    /// Workload actions in the safety phase.
    pub actions: u32,
    /// Fault rates of the network and storage.
    pub rates: FaultRates,
    /// Per-mille of actions that change a remote's behaviour (outages, 5xx, 429, 410).
    pub outage_permille: u64,
    /// Per-mille of actions that crash the sender.
    pub crash_permille: u64,
    /// Per-mille of local events a remote rejects as poison.
    pub poison_permille: u64,
    /// Per-mille of actions (and of remotes and rooms at setup) drawn the way a fuzzer draws
    /// inputs: nesting around the core's limit, sizes around the byte limits, unusual server
    /// names, unicode ids, empty objects and nulls. Zero leaves the workload as it was.
    pub odd_input_permille: u64,
    /// The sender's configuration overrides.
    pub config: serde_json::Map<String, Value>,
    /// Put the core's events into the trace too (`x-event` lines).
    pub trace_events: bool,
}

impl Options {
    /// Draws every option from `seed` (swarm testing: each seed gets its own mix).
    pub fn swarm(seed: u64) -> Self {
        let mut prng = Prng::from_seed(seed ^ 0x005E_ED0F_F00D);
        let mut pick = |low: u64, high: u64| prng.range_inclusive(low, high);
        let retry_interval_min_ms = pick(1_000, 60_000);
        let retry_interval_max_ms = retry_interval_min_ms * pick(2, 60);
        let config = json!({
            "retry_interval_min_ms": retry_interval_min_ms,
            "retry_interval_max_ms": retry_interval_max_ms,
            "retry_multiplier": pick(1, 3),
            "catch_up_threshold_ms": pick(5_000, 3_600_000),
            "http_retries_max": pick(0, 3),
            "http_retry_delay_max_ms": pick(1_000, 60_000),
            "request_timeout_ms": pick(1_000, 60_000),
            "transactions_in_flight_max": pick(1, 8),
            "pdus_per_transaction_max": pick(1, 50),
            "transaction_bytes_max": pick(2_048, 65_536),
            "pending_pdus_max": pick(3, 200),
            "poison_rejections_max": pick(1, 3),
            "events_batch_max": pick(1, 100),
            "catch_up_batch_max": pick(1, 50),
            "catch_up_waker_period_ms": pick(5_000, 60_000),
            "catch_up_waker_page_max": pick(1, 25),
            "catch_up_waker_interval_ms": pick(10, 5_000),
        });
        let Value::Object(config) = config else { unreachable!("literal object") };
        Self {
            seed,
            remotes: pick(1, 10) as u32,
            rooms: pick(1, 5) as u32,
            actions: pick(20, 250) as u32,
            rates: FaultRates {
                drop_permille: pick(0, 150),
                error_permille: pick(0, 150),
                rate_limit_permille: pick(0, 100),
                latency_max_ms: pick(0, 3_000),
                storage_latency_max_ms: pick(0, 2_000),
                storage_failure_permille: pick(0, 100),
            },
            outage_permille: pick(0, 120),
            crash_permille: pick(0, 40),
            poison_permille: pick(0, 40),
            // A third of the seeds keep ordinary inputs, so odd ones never crowd out the rest.
            odd_input_permille: match pick(0, 2) {
                0 => 0,
                _ => pick(1, 300),
            },
            config,
            trace_events: false,
        }
    }

    /// One line naming every option, so a failure can be understood from its output alone.
    pub fn banner(&self) -> String {
        format!(
            "SEED={} remotes={} rooms={} actions={} outages={}‰ crashes={}‰ poison={}‰ odd={}‰ rates={:?} config={}",
            self.seed,
            self.remotes,
            self.rooms,
            self.actions,
            self.outage_permille,
            self.crash_permille,
            self.poison_permille,
            self.odd_input_permille,
            self.rates,
            Value::Object(self.config.clone())
        )
    }
}

/// What a passing run exercised.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Steps run (safety and liveness).
    pub steps: u64,
    /// Events persisted.
    pub events: u64,
    /// Boundary counts.
    pub counts: Counts,
    /// Fault counts.
    pub faults: FaultCounts,
    /// Virtual ms from healing to convergence.
    pub convergence_ms: u64,
}

/// Sums of many reports, for a sweep's summary.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Seeds run.
    pub seeds: u64,
    /// Events persisted.
    pub events: u64,
    /// Boundary counts.
    pub counts: Counts,
    /// Fault counts.
    pub faults: FaultCounts,
}

impl Totals {
    /// Adds one passing run.
    pub fn add(&mut self, report: &Report) {
        self.seeds += 1;
        self.events += report.events;
        let (c, r) = (&mut self.counts, &report.counts);
        c.attempts += r.attempts;
        c.accepted += r.accepted;
        c.retries += r.retries;
        c.dropped += r.dropped;
        c.catch_ups += r.catch_ups;
        c.recoveries += r.recoveries;
        c.edus += r.edus;
        c.to_device_repeats += r.to_device_repeats;
        c.device_list_edus += r.device_list_edus;
        c.refused_inputs += r.refused_inputs;
        c.events_skipped += r.events_skipped;
        c.ephemeral_owed += r.ephemeral_owed;
        c.ephemeral_lost_to_catch_up += r.ephemeral_lost_to_catch_up;
        c.ephemeral_lost_to_crash += r.ephemeral_lost_to_crash;
        let (f, r) = (&mut self.faults, &report.faults);
        f.drops += r.drops;
        f.errors += r.errors;
        f.rate_limits += r.rate_limits;
        f.storage_failures += r.storage_failures;
        f.storage_delays += r.storage_delays;
        f.remote_outages += r.remote_outages;
        f.poisons += r.poisons;
        f.crashes += r.crashes;
        f.lost_writes += r.lost_writes;
    }

    /// How accepted items that were not delivered were settled, for the summary: these may
    /// be zero in a short sweep.
    pub fn settled_otherwise(&self) -> [(&'static str, u64); 3] {
        [
            ("events skipped with a reason (nested too deeply to send)", self.counts.events_skipped),
            (
                "typing, receipts, presence lost when catch-up started (as designed)",
                self.counts.ephemeral_lost_to_catch_up,
            ),
            ("ephemeral items lost in sender crashes (in memory only)", self.counts.ephemeral_lost_to_crash),
        ]
    }

    /// Every fault kind and boundary behaviour with how often the sweep exercised it.
    pub fn exercised(&self) -> [(&'static str, u64); 18] {
        [
            ("lost answers", self.faults.drops),
            ("5xx", self.faults.errors),
            ("429", self.faults.rate_limits),
            ("storage failures", self.faults.storage_failures),
            ("storage delays", self.faults.storage_delays),
            ("remote outages (unreachable, timeout, 503, 429, 410 phases)", self.faults.remote_outages),
            ("poison items", self.faults.poisons),
            ("sender crashes", self.faults.crashes),
            ("writes lost in crashes", self.faults.lost_writes),
            ("retried attempts", self.counts.retries),
            ("items given up", self.counts.dropped),
            ("catch-ups", self.counts.catch_ups),
            ("recoveries", self.counts.recoveries),
            ("EDUs delivered", self.counts.edus),
            ("device-list EDUs delivered (chains checked)", self.counts.device_list_edus),
            ("to-device repeats after crashes (dropped by receivers by message id)", self.counts.to_device_repeats),
            ("odd inputs refused at the edge (each changing nothing)", self.counts.refused_inputs),
            ("ephemeral items owed once accepted (typing, receipts, presence, EDUs)", self.counts.ephemeral_owed),
        ]
    }
}

/// A failing run: the reason and what to run to see it again.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What broke.
    pub reason: String,
}

struct Sim {
    world: World,
    prng: Prng,
    options: Options,
    remotes: Vec<String>,
    rooms: Vec<String>,
    /// Remote users and the rooms they are joined to.
    members: BTreeMap<String, Vec<String>>,
    gone: Vec<String>,
    /// The local user's devices.
    devices: BTreeSet<String>,
    odd: OddInputs,
    steps: u64,
    events: u64,
}

/// Runs one seed against `engine`; `emit` receives the trace.
pub fn run(options: &Options, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> Result<Report, Failure> {
    let fail = |reason: String| Failure { seed: options.seed, reason };
    let scenario = Scenario {
        server_name: String::from(SERVER_NAME),
        seed: options.seed,
        start_ms: 1_600_000_000_000,
        config: options.config.clone(),
        instance: String::from("main"),
        instances: alloc::vec![String::from("main")],
        steps: Vec::new(),
    };
    let config: Config = {
        let mut full = options.config.clone();
        full.insert("server_name".into(), Value::String(String::from(SERVER_NAME)));
        serde_json::from_value(Value::Object(full)).map_err(|e| fail(format!("swarm drew a bad config: {e}")))?
    };
    let mut world = World::start(&scenario, engine, emit).map_err(|e| fail(format!("{e}")))?;
    world.faults = Some(Faults::new(options.rates.clone(), options.seed.wrapping_mul(31).wrapping_add(7)));
    world.checker = Some(Checker::new(config.clone()));
    world.trace_events = options.trace_events;
    world.refusals_allowed = true;
    let mut odd = OddInputs::new(options.seed, options.odd_input_permille, config.transaction_bytes_max);
    let remotes =
        (0..options.remotes).map(|i| if odd.strike() { odd.server_name(i) } else { format!("r{i}.sim") }).collect();
    let mut sim = Sim {
        world,
        prng: Prng::from_seed(options.seed),
        options: options.clone(),
        remotes,
        rooms: Vec::new(),
        members: BTreeMap::new(),
        gone: Vec::new(),
        devices: BTreeSet::new(),
        odd,
        steps: 0,
        events: 0,
    };
    sim.setup(engine, emit).map_err(&fail)?;
    for _ in 0..options.actions {
        sim.action(engine, emit).map_err(&fail)?;
    }
    let healed_at = sim.world_now();
    sim.heal(engine, emit)?;
    // Budget: the longest backoff, plus a waker period and retries' worth of slack.
    let budget_ms = config.retry_interval_max_ms * 2 + config.catch_up_waker_period_ms * 3 + 600_000;
    let chunk_ms = (config.retry_interval_min_ms / 2).max(5_000);
    loop {
        sim.run(engine, emit, &Step::Advance { ms: chunk_ms })?;
        match sim.unconverged() {
            None => break,
            Some(reason) if sim.world_now() - healed_at > budget_ms => {
                return Err(fail(format!("no convergence within {budget_ms} ms after healing: {reason}")));
            }
            Some(_) => {}
        }
    }
    let checker = sim.world.checker.take().expect("installed above");
    let faults = sim.world.faults.take().expect("installed above");
    Ok(Report {
        steps: sim.steps,
        events: sim.events,
        counts: checker.counts,
        faults: faults.counts,
        convergence_ms: sim.world_now() - healed_at,
    })
}

impl Sim {
    fn world_now(&self) -> u64 {
        self.world.now()
    }

    fn run(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str), step: &Step) -> Result<(), Failure> {
        self.steps += 1;
        let seed = self.options.seed;
        let at = self.steps;
        if matches!(step, Step::Join { .. } | Step::Leave { .. } | Step::Send { .. } | Step::CreateRoom { .. }) {
            self.events += 1;
        }
        self.world
            .run_step(step, engine, emit)
            .map_err(|reason| Failure { seed, reason: format!("step {at} ({}): {reason}", step.op()) })?;
        if let (Some(stats), Some(checker)) = (engine.destination_stats(), self.world.checker.as_ref()) {
            checker.check_stats(&stats).map_err(|reason| Failure { seed, reason: format!("step {at}: {reason}") })?;
        }
        Ok(())
    }

    fn pick(&mut self, count: usize) -> usize {
        self.prng.range_inclusive(0, count as u64 - 1) as usize
    }

    fn random_room(&mut self) -> String {
        let index = self.pick(self.rooms.len());
        self.rooms[index].clone()
    }

    fn random_remote(&mut self) -> String {
        let index = self.pick(self.remotes.len());
        self.remotes[index].clone()
    }

    fn chance(&mut self, permille: u64) -> bool {
        self.prng.range_inclusive(0, 999) < permille
    }

    fn setup(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> Result<(), String> {
        for index in 0..self.options.rooms {
            let room = if self.odd.strike() {
                format!("!{}:{SERVER_NAME}", self.odd.localpart(u64::from(index)))
            } else {
                format!("!room{index}:{SERVER_NAME}")
            };
            let visibility = match self.pick(4) {
                0 => Visibility::Joined,
                1 => Visibility::Invited,
                2 => Visibility::WorldReadable,
                _ => Visibility::Shared,
            };
            let creator = format!("@local:{SERVER_NAME}");
            self.run(engine, emit, &Step::CreateRoom { room: room.clone(), creator, visibility })
                .map_err(|f| f.reason)?;
            self.rooms.push(room);
        }
        for remote in self.remotes.clone() {
            let user = format!("@user:{remote}");
            let room = self.random_room();
            self.join(engine, emit, &user, &room)?;
        }
        Ok(())
    }

    fn join(
        &mut self,
        engine: &mut dyn Engine,
        emit: &mut dyn FnMut(&str),
        user: &str,
        room: &str,
    ) -> Result<(), String> {
        let joined = self.members.entry(String::from(user)).or_default();
        if joined.iter().any(|r| r == room) {
            return Ok(());
        }
        joined.push(String::from(room));
        let step = Step::Join { room: String::from(room), user: String::from(user), id: None };
        self.run(engine, emit, &step).map_err(|f| f.reason)
    }

    fn action(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> Result<(), String> {
        let roll = self.pick(1000) as u64;
        let outage = self.options.outage_permille;
        let crash = self.options.crash_permille;
        let step = if roll < outage {
            let host = self.random_remote();
            if let Some(faults) = self.world.faults.as_mut() {
                faults.counts.remote_outages += 1;
            }
            let respond = match self.pick(8) {
                0 | 1 => Respond::Unreachable,
                2 => Respond::Timeout,
                3 => Respond::Status { status: 503, retry_after_ms: None, errcode: None, pdu_errors: BTreeMap::new() },
                4 => Respond::Status {
                    status: 429,
                    retry_after_ms: Some(self.prng.range_inclusive(0, 120_000)),
                    errcode: None,
                    pdu_errors: BTreeMap::new(),
                },
                5 => {
                    self.gone.push(host.clone());
                    Respond::Status { status: 410, retry_after_ms: None, errcode: None, pdu_errors: BTreeMap::new() }
                }
                _ => Respond::Ok,
            };
            let latency_ms = Some(self.prng.range_inclusive(0, 2_000));
            Step::Remote { host, respond, latency_ms }
        } else if roll < outage + crash {
            if let Some(faults) = self.world.faults.as_mut() {
                faults.counts.crashes += 1;
            }
            Step::Restart {}
        } else if roll < outage + crash + 60 {
            let ms = match self.pick(4) {
                0 => self.prng.range_inclusive(1, 100),
                1 => self.prng.range_inclusive(100, 10_000),
                2 => self.prng.range_inclusive(10_000, 600_000),
                _ => self.prng.range_inclusive(600_000, 7_200_000),
            };
            Step::Advance { ms }
        } else if roll < outage + crash + 90 {
            let user = {
                let n = self.pick(3);
                let remote = self.random_remote();
                if self.odd.strike() {
                    format!("@{}:{remote}", self.odd.localpart(n as u64))
                } else {
                    format!("@user{n}:{remote}")
                }
            };
            let room = self.random_room();
            return self.join(engine, emit, &user, &room);
        } else if roll < outage + crash + 105 {
            // A remote user leaves, or is kicked by our local user.
            let candidates: Vec<(String, String)> = self
                .members
                .iter()
                .flat_map(|(user, rooms)| rooms.iter().map(move |room| (user.clone(), room.clone())))
                .collect();
            if candidates.is_empty() {
                return Ok(());
            }
            let (user, room) = candidates[self.pick(candidates.len())].clone();
            if let Some(rooms) = self.members.get_mut(&user) {
                rooms.retain(|r| *r != room);
            }
            let by = self.chance(500).then(|| format!("@local:{SERVER_NAME}"));
            Step::Leave { room, user, by, id: None }
        } else if roll < outage + crash + 125 {
            let host = self.random_remote();
            if self.chance(500) { Step::Inbound { host } } else { Step::Wake { host } }
        } else if roll < outage + crash + 145 {
            Step::Settle {}
        } else if roll < outage + crash + 205 {
            // Ephemeral traffic: typing, read receipts, presence, to-device, device lists,
            // plain EDUs.
            let room = self.random_room();
            let local = format!("@local:{SERVER_NAME}");
            let kind = self.pick(7);
            if self.odd.strike() {
                let Some(step) = self.odd_ephemeral(kind, room) else { return Ok(()) };
                return self.run(engine, emit, &step).map_err(|f| f.reason);
            }
            match kind {
                0 => Step::Typing { room, user: local, typing: self.chance(500), timeout_ms: None },
                1 => {
                    let Some(event) = self.world.latest_event_in(&room) else { return Ok(()) };
                    let thread = self.chance(300).then(|| String::from("thread"));
                    let ts = self.world_now();
                    Step::Receipt { room, user: local, event, receipt_type: None, thread, ts }
                }
                2 => {
                    let count = self.pick(self.remotes.len()) + 1;
                    let destinations = (0..count).map(|_| self.random_remote()).collect();
                    let presence = String::from(if self.chance(500) { "online" } else { "unavailable" });
                    let user = format!("@user{}:{SERVER_NAME}", self.pick(80));
                    let last_active_ts = Some(self.world_now());
                    Step::Presence {
                        user,
                        presence,
                        status_msg: None,
                        last_active_ts,
                        currently_active: None,
                        destinations,
                    }
                }
                3 => {
                    // A to-device message: durable, exactly once per message id, across crashes.
                    let remote = self.random_remote();
                    let message_id = format!("td{}", self.steps);
                    let size = if self.chance(100) { 20_000 } else { self.pick(300) };
                    let body: String = core::iter::repeat_n('k', size).collect();
                    let mut devices = BTreeMap::new();
                    devices.insert(String::from("DEVICE"), json!({ "key": body }));
                    let mut messages = BTreeMap::new();
                    messages.insert(format!("@user:{remote}"), devices);
                    Step::ToDevice {
                        sender: local,
                        event_type: String::from("m.room_key"),
                        messages,
                        message_id: Some(message_id),
                    }
                }
                4 => {
                    // A device of the local user changes: durable, staggered, chained.
                    let device = format!("D{}", self.pick(4));
                    let deleted = self.devices.contains(&device) && self.chance(250);
                    if deleted {
                        self.devices.remove(&device);
                    } else {
                        self.devices.insert(device.clone());
                    }
                    let keys = (!deleted).then(|| json!({ "n": self.steps }));
                    Step::DeviceUpdate { user: local, device, deleted: Some(deleted), keys, display_name: None }
                }
                5 => Step::SigningKeyUpdate {
                    user: local,
                    master_key: Some(json!({ "n": self.steps })),
                    self_signing_key: self.chance(500).then(|| json!({ "s": self.steps })),
                },
                _ => {
                    let destination = self.random_remote();
                    let key = self.chance(500).then(|| format!("k{}", self.pick(5)));
                    let content = json!({ "n": self.steps });
                    Step::Edu { destination, edu_type: String::from("org.example.test"), content, key }
                }
            }
        } else if roll < outage + crash + 165 {
            let candidates: Vec<(String, String)> = self
                .members
                .iter()
                .flat_map(|(user, rooms)| rooms.iter().map(move |room| (user.clone(), room.clone())))
                .collect();
            if candidates.is_empty() {
                return Ok(());
            }
            let (user, room) = candidates[self.pick(candidates.len())].clone();
            let body = format!("remote {}", self.steps);
            Step::Send {
                room,
                sender: user,
                event_type: String::from("m.room.message"),
                content: json!({ "body": body }),
                state_key: None,
                id: None,
                flags: None,
                prev: None,
            }
        } else {
            let room = self.random_room();
            let size = if self.chance(30) { self.pick(70_000) } else { self.pick(200) };
            let body: String = core::iter::repeat_n('x', size).collect();
            let (id, content) = if self.odd.strike() {
                let id = if self.odd.sometimes(500) {
                    format!("${}{}", self.odd.text(), self.steps)
                } else {
                    format!("$e{}", self.steps)
                };
                (id, self.odd.object(PDU_CONTENT_DEPTH_MAX))
            } else {
                (format!("$e{}", self.steps), json!({ "body": body }))
            };
            let poison = self.chance(self.options.poison_permille);
            let step = Step::Send {
                room,
                sender: format!("@local:{SERVER_NAME}"),
                event_type: String::from("m.room.message"),
                content,
                state_key: None,
                id: Some(id.clone()),
                flags: None,
                prev: None,
            };
            self.run(engine, emit, &step).map_err(|f| f.reason)?;
            if poison {
                if let Some(faults) = self.world.faults.as_mut() {
                    faults.counts.poisons += 1;
                }
                let host = self.random_remote();
                let status = if self.chance(300) { 413 } else { 400 };
                // Sometimes the poison is a kind of EDU instead: the signing-key pair must be
                // isolated whole, presence and plain EDUs one by one.
                let (pdus, edu_types) = if self.chance(250) {
                    let kinds = ["m.signing_key_update", "m.presence", "org.example.test"];
                    (Vec::new(), alloc::vec![String::from(kinds[self.pick(kinds.len())])])
                } else {
                    (alloc::vec![id], Vec::new())
                };
                let reject = Step::Reject { host, pdus, edu_types, status };
                return self.run(engine, emit, &reject).map_err(|f| f.reason);
            }
            return Ok(());
        };
        self.run(engine, emit, &step).map_err(|f| f.reason)
    }

    /// The odd variant of ephemeral action `kind` (see [`OddInputs`]): some the core accepts,
    /// some it must refuse (a user of another server where a local one is required, a
    /// private receipt, a signing-key update without keys, an EDU to ourselves, an invalid
    /// recipient, nesting past the limit, a to-device message over 64 KiB on its own).
    fn odd_ephemeral(&mut self, kind: usize, room: String) -> Option<Step> {
        let local = format!("@{}:{SERVER_NAME}", self.odd.localpart(self.steps));
        let user = if self.odd.sometimes(150) { format!("@user:{}", self.random_remote()) } else { local.clone() };
        let step = match kind {
            0 => Step::Typing { room, user, typing: self.odd.sometimes(500), timeout_ms: None },
            1 => {
                let event = self.world.latest_event_in(&room)?;
                let receipt_type = match self.odd.pick(4) {
                    0 => None,
                    1 => Some(String::from("m.read.private")),
                    2 => Some(self.odd.text()),
                    _ => Some(String::from("m.read")),
                };
                let thread = self.odd.sometimes(500).then(|| self.odd.text());
                Step::Receipt { room, user, event, receipt_type, thread, ts: self.world_now() }
            }
            2 => {
                let count = self.odd.pick(4) + 1;
                let destinations = (0..count)
                    .map(|_| {
                        if self.odd.sometimes(300) {
                            let index = self.odd.pick(254) as u32;
                            self.odd.server_name(index)
                        } else {
                            self.random_remote()
                        }
                    })
                    .collect();
                let status_msg = match self.odd.pick(4) {
                    0 => None,
                    1 => Some(String::new()),
                    2 => Some(self.odd.huge_string()),
                    _ => Some(self.odd.text()),
                };
                let presence = if self.odd.sometimes(500) { self.odd.text() } else { String::from("online") };
                let last_active_ts = self.odd.sometimes(500).then(|| self.world_now());
                let currently_active = self.odd.sometimes(500).then(|| self.odd.sometimes(500));
                Step::Presence { user, presence, status_msg, last_active_ts, currently_active, destinations }
            }
            3 => {
                let server =
                    if self.odd.sometimes(150) { self.odd.invalid_server_name() } else { self.random_remote() };
                let recipient = format!("@{}:{server}", self.odd.localpart(self.steps));
                let device = match self.odd.pick(3) {
                    0 => String::from("*"),
                    1 => self.odd.text(),
                    _ => String::from("DEVICE"),
                };
                let mut devices = BTreeMap::new();
                if !self.odd.sometimes(100) {
                    devices.insert(device, self.odd.value(COMMAND_VALUE_DEPTH_MAX));
                }
                let mut messages = BTreeMap::new();
                if !self.odd.sometimes(50) {
                    messages.insert(recipient, devices);
                }
                // Without an id the core makes one up; the checker reads ids from the outbox.
                let message_id = (!self.odd.sometimes(300)).then(|| format!("td{}{}", self.steps, self.odd.text()));
                let event_type = if self.odd.sometimes(500) { self.odd.text() } else { String::from("m.room_key") };
                Step::ToDevice { sender: user, event_type, messages, message_id }
            }
            4 => {
                // Always the same local user: the world refuses to delete a device it never had.
                let device = if self.odd.sometimes(300) { self.odd.text() } else { format!("D{}", self.odd.pick(4)) };
                let deleted = self.devices.contains(&device) && self.odd.sometimes(250);
                if deleted {
                    self.devices.remove(&device);
                } else {
                    self.devices.insert(device.clone());
                }
                let keys = (!deleted && !self.odd.sometimes(200)).then(|| self.odd.object(COMMAND_VALUE_DEPTH_MAX));
                let display_name = match self.odd.pick(3) {
                    0 => None,
                    1 => Some(self.odd.text()),
                    _ => Some(self.odd.huge_string()),
                };
                Step::DeviceUpdate {
                    user: format!("@local:{SERVER_NAME}"),
                    device,
                    deleted: Some(deleted),
                    keys,
                    display_name,
                }
            }
            5 => {
                let (master_key, self_signing_key) = match self.odd.pick(3) {
                    0 => (None, None),
                    1 => (Some(self.odd.object(COMMAND_VALUE_DEPTH_MAX)), None),
                    _ => (None, Some(self.odd.object(COMMAND_VALUE_DEPTH_MAX))),
                };
                Step::SigningKeyUpdate { user: local, master_key, self_signing_key }
            }
            _ => {
                let destination = match self.odd.pick(4) {
                    0 => String::from(SERVER_NAME),
                    1 => {
                        let index = self.odd.pick(254) as u32;
                        self.odd.server_name(index)
                    }
                    _ => self.random_remote(),
                };
                let key = self.odd.sometimes(400).then(|| self.odd.text());
                let edu_type = if self.odd.sometimes(500) {
                    String::from("org.example.test")
                } else {
                    format!("org.example.{}", self.odd.text())
                };
                Step::Edu { destination, edu_type, content: self.odd.value(COMMAND_VALUE_DEPTH_MAX), key }
            }
        };
        Some(step)
    }

    /// Ends the fault phase: every remote answers, links are quick, storage is reliable,
    /// the sender no longer crashes; servers that said 410 contact us again.
    fn heal(&mut self, engine: &mut dyn Engine, emit: &mut dyn FnMut(&str)) -> Result<(), Failure> {
        if let Some(faults) = self.world.faults.as_mut() {
            faults.active = false;
        }
        for host in self.remotes.clone() {
            self.run(engine, emit, &Step::Remote { host, respond: Respond::Ok, latency_ms: Some(0) })?;
        }
        let mut gone = core::mem::take(&mut self.gone);
        gone.sort();
        gone.dedup();
        for host in gone {
            self.run(engine, emit, &Step::Inbound { host })?;
        }
        Ok(())
    }

    /// `None` once every destination has, for every room it shares, the newest event it was
    /// owed (or something newer in that room), unless that event was given up as poison.
    fn unconverged(&self) -> Option<String> {
        let checker = self.world.checker.as_ref()?;
        // Owed: every to-device message whose outbox row became durable (what a homeserver
        // acknowledges to its client); one lost with an unacknowledged write was never promised.
        for key in &checker.to_device_owed {
            let given_up = checker.to_device_deleted.contains(key)
                && checker.dropped.contains(&(key.0.clone(), String::from("m.direct_to_device")));
            if !checker.to_device.contains_key(key) && !given_up {
                return Some(format!("{} lacks to-device message {} from {}", key.0, key.2, key.1));
            }
        }
        // Owed: per (destination, user), the newest device change whose poke became durable;
        // the destination's chain must have reached it (or gone past it).
        for ((dest, user), owed) in &checker.device_lists_owed {
            let seen = checker.device_lists_seen.get(&(dest.clone(), user.clone()));
            let reached = seen.is_some_and(|s| s.contains(owed) || s.last().is_some_and(|last| last > owed));
            let given_up = checker.dropped.contains(&(dest.clone(), String::from("m.device_list_update")));
            if !reached && !given_up {
                return Some(format!("{dest} lacks device-list update {owed} of {user} (it has {seen:?})"));
            }
        }
        if let Some(unsettled) = checker.ephemeral_unsettled() {
            return Some(unsettled);
        }
        for (dest, room, event, stream) in self.world.owed(&checker.skipped_events) {
            if checker.dropped.contains(&(dest.clone(), event.clone())) {
                continue;
            }
            let received = checker.received.get(&dest);
            let has_newer = received
                .is_some_and(|ids| ids.iter().any(|id| self.world.event_in_room_at_or_after(id, &room, stream)));
            if !has_newer {
                return Some(format!("{dest} lacks {event} (room {room}, stream {stream})"));
            }
        }
        None
    }
}

/// The command that reproduces a seed.
pub fn reproduce_command(seed: u64) -> String {
    format!("cargo run -p fedsend-sim --release --bin fedsend-vopr -- --seed {seed}")
}
