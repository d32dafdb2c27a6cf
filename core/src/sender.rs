//! [`FederationSender`]: the machine as a whole. It owns the parts — one [`Destination`] per
//! remote server, fan-out, the transaction builder, the in-flight limiter, the wake-up queue,
//! the catch-up scan — and the [`Effects`] they write to. `handle_input` dispatches an input to
//! the part it concerns, then drives every destination the input touched, then emits the
//! input's writes as one batch. Commands that queue data (EDUs, to-device, device lists) are
//! in `sender/commands.rs`.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use crate::catch_up::CatchUp;
use crate::catch_up_scan::{CatchUpScan, ScanAction};
use crate::config::Config;
use crate::destination::{Activity, Destination, Driving};
use crate::directory::{DestId, Directory};
use crate::edu::EduEntry;
use crate::effects::{Effects, PendingRequest, Timer, compact};
use crate::error::{ConfigError, InputError};
use crate::event::Event;
use crate::fan_out::{FanOut, Router};
use crate::io::{
    CatchUpRoom, DestinationState, DestinationStats, Input, Output, PduInfo, Recovered, TransactionResult,
};
use crate::limiter::InFlightLimiter;
use crate::time::Timestamp;
use crate::transaction::TransactionBuilder;
use crate::types::{RequestId, ServerName};
use crate::wake_up_queue::WakeUpQueue;

mod commands;

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
    fx: Effects,
    time_regressions: u64,
    incarnation: u64,
    /// No transaction leaves before this process's incarnation is durable: its ids would
    /// repeat after a crash.
    incarnation_durable: bool,
    builder: TransactionBuilder,
    destinations: Directory,
    fan_out: FanOut,
    router: Router,
    limiter: InFlightLimiter,
    wake_up_queue: WakeUpQueue,
    catch_up_scan: CatchUpScan,
    /// Destinations whose catch-up waits for more rows to be stored, and how far storage held
    /// them when they began to wait; see [`Driving::rows_stored_to`].
    awaiting_rows: BTreeSet<ServerName>,
    awaiting_rows_stored_to: u64,
    storage_retries: Vec<PendingRequest>,
    /// Counter behind outbox ids (`incarnation << 32 | counter`).
    outbox_counter: u64,
}

impl FederationSender {
    /// Builds the machine from a validated config and the state recovered from storage.
    ///
    /// The first outputs persist the next incarnation (no transaction leaves before it is
    /// durable), fetch events after the recovered position, and start the catch-up scan.
    pub fn new(config: Config, recovered: Recovered) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut destinations = Directory::default();
        for state in &recovered.destinations {
            let mut destination = Destination::from_state(state);
            // Storage may hold rows this process never saw in memory; check before sending.
            destination.catch_up.active = true;
            match destinations.get_mut(&state.destination) {
                Some(known) => *known = destination,
                None => {
                    destinations.insert_new(state.destination.clone(), destination);
                }
            }
        }
        let incarnation = recovered.incarnation.saturating_add(1);
        let mut sender = Self {
            fx: Effects::new(config.seed),
            config,
            time_regressions: 0,
            incarnation,
            incarnation_durable: false,
            builder: TransactionBuilder::new(incarnation),
            destinations,
            fan_out: FanOut::new(recovered.events_out_pos.unwrap_or(0)),
            router: Router::default(),
            limiter: InFlightLimiter::default(),
            wake_up_queue: WakeUpQueue::default(),
            catch_up_scan: CatchUpScan::default(),
            awaiting_rows: BTreeSet::new(),
            awaiting_rows_stored_to: 0,
            storage_retries: Vec::new(),
            outbox_counter: 0,
        };
        // The outbox survives restarts: its rows go first, in id order.
        let mut rows = recovered.to_device_outbox;
        rows.sort_by_key(|row| row.outbox_id);
        for row in rows {
            let Some(content) = row.edu.get("content") else { continue };
            let mut edu = EduEntry::new("m.direct_to_device", content);
            edu.outbox_id = Some(row.outbox_id);
            sender.destinations.or_default(&row.destination).queue().edus.push_to_device(edu);
        }
        for position in recovered.device_list_positions {
            let Some(stream_id) = position.stream_id else { continue };
            let destination = sender.destinations.or_default(&position.destination);
            destination.device_lists().positions.insert(position.user_id, stream_id);
        }
        for row in recovered.device_list_pokes {
            let destination = sender.destinations.or_default(&row.destination);
            destination.queue_stored_poke(&mut sender.fx, row);
        }
        sender.fx.changes.incarnation = Some(incarnation);
        sender.flush_changes();
        sender.fan_out.fetch(&mut sender.fx, &sender.config);
        sender.fx.set_timer(Timestamp(0), Timer::CatchUpScan);
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
        self.limiter.in_flight()
    }

    /// Applies one input at time `now`.
    ///
    /// A time earlier than one seen before is clamped to it. A malformed or uncorrelated input
    /// returns an error and changes nothing; the machine keeps running.
    pub fn handle_input(&mut self, now: Timestamp, input: Input) -> Result<(), InputError> {
        if now < self.fx.now {
            self.time_regressions += 1;
        } else {
            self.fx.now = now;
        }
        let result = self.apply(input);
        self.drive_dirty();
        self.flush_changes();
        result
    }

    /// The next thing for the host to do, or `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.fx.poll_output()
    }

    /// The earliest time at which [`Input::Timeout`] should be delivered, if any.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.fx.next_deadline()
    }

    /// Per-destination figures for operators, sorted by destination name.
    pub fn destination_stats(&self) -> Vec<DestinationStats> {
        self.destinations.iter().map(|(name, d)| d.stats(name, self.fx.now, &self.config)).collect()
    }

    /// Per-destination figures for operators, of one destination.
    pub fn stats_for(&self, destination: &ServerName) -> Option<DestinationStats> {
        self.destinations.get(destination).map(|d| d.stats(destination, self.fx.now, &self.config))
    }

    /// The stored-state view of one destination, as the machine currently holds it.
    pub fn destination_state(&self, destination: &ServerName) -> Option<DestinationState> {
        self.destinations.get(destination).map(|d| d.state(destination))
    }

    fn apply(&mut self, input: Input) -> Result<(), InputError> {
        crate::nesting::check_input(&input)?;
        match input {
            Input::NewEvents { up_to } => self.fan_out.notified(up_to, &mut self.fx, &self.config),
            Input::WakeDestination { destination } | Input::RemoteUp { destination } => {
                self.destination_contacted(&destination);
            }
            Input::Edu { destination, edu_type, content, key } => self.edu(destination, &edu_type, &content, key)?,
            Input::Typing { room_id, user_id, typing, hosts } => self.typing(&room_id, &user_id, typing, hosts)?,
            Input::Receipt { receipt, hosts, event } => self.receipt(receipt, hosts, event)?,
            Input::StoredToDevice { rows } => self.stored_to_device(rows),
            Input::StoredDeviceListPokes { pokes } => self.stored_device_list_pokes(pokes),
            Input::ToDevice { sender, message_type, message_id, messages } => {
                self.send_to_device(&sender, &message_type, message_id, messages)?;
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
                self.device_list_update(
                    &user_id,
                    &device_id,
                    stream_id,
                    deleted,
                    keys,
                    device_display_name,
                    destinations,
                )?;
            }
            Input::SigningKeyUpdate { user_id, stream_id, master_key, self_signing_key, destinations } => {
                self.signing_key_update(&user_id, stream_id, master_key, self_signing_key, destinations)?;
            }
            Input::Presence { states, destinations } => self.presence(states, destinations)?,
            Input::SetDestinationState { state } => self.set_destination_state(state),
            Input::Timeout => self.timeout(),
            Input::EventsFetched { request, events } => self.events_fetched(request, events)?,
            Input::CatchUpLoaded { request, rooms } => self.catch_up_loaded(request, rooms)?,
            Input::OutstandingLoaded { request, destinations } => self.outstanding_loaded(request, destinations)?,
            Input::Persisted { request } => self.persisted(request)?,
            Input::StorageFailed { request, error } => self.storage_failed(request, error)?,
            Input::TransactionDone { request, result } => self.transaction_done(request, result)?,
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // completions

    fn events_fetched(&mut self, request: RequestId, events: Vec<PduInfo>) -> Result<(), InputError> {
        let (after, known) = match self.fx.take_request(request)? {
            PendingRequest::FetchEvents { after, known } => (after, known),
            other => return Err(self.fx.wrong_answer(request, other)),
        };
        if let Err(error) = check_events(after, &events) {
            self.fx.restore_request(request, PendingRequest::FetchEvents { after, known });
            return Err(error);
        }
        let full_batch = events.len() >= self.config.events_batch_max as usize;
        let last = events.last().map(|event| event.stream_ordering);
        for info in events {
            self.router.route(&mut self.destinations, &mut self.fx, &self.config, info);
        }
        self.fan_out.batch_routed(after, known, last, full_batch, &mut self.fx, &self.config);
        Ok(())
    }

    fn catch_up_loaded(&mut self, request: RequestId, rooms: Vec<CatchUpRoom>) -> Result<(), InputError> {
        let (name, after, up_to) = match self.fx.take_request(request)? {
            PendingRequest::CatchUp { destination, after, up_to } => (destination, after, up_to),
            other => return Err(self.fx.wrong_answer(request, other)),
        };
        if let Err(error) = check_catch_up(after, up_to, &rooms) {
            self.fx.restore_request(request, PendingRequest::CatchUp { destination: name, after, up_to });
            return Err(error);
        }
        if let Some(destination) = self.destinations.get_mut(&name) {
            destination.catch_up_loaded(&name, &mut self.fx, rooms, up_to);
        }
        Ok(())
    }

    fn outstanding_loaded(&mut self, request: RequestId, names: Vec<ServerName>) -> Result<(), InputError> {
        match self.fx.take_request(request)? {
            PendingRequest::Outstanding { .. } => {}
            other => return Err(self.fx.wrong_answer(request, other)),
        }
        let (config, destinations, now) = (&self.config, &self.destinations, self.fx.now);
        let eligible = |name: &ServerName| {
            config.handles(name)
                && *name != config.server_name
                && destinations.get(name).is_none_or(|d| !d.backoff.active(now))
        };
        if self.catch_up_scan.page_loaded(names, &mut self.fx, config, eligible) {
            self.catch_up_scan_tick();
        }
        Ok(())
    }

    fn persisted(&mut self, request: RequestId) -> Result<(), InputError> {
        let (changes, fanout_from) = match self.fx.take_request(request)? {
            PendingRequest::Persist { changes, fanout_from } => (changes, fanout_from),
            other => return Err(self.fx.wrong_answer(request, other)),
        };
        // Positions held back behind this batch may be claimed now.
        if let Some(claimable) = fanout_from.and_then(|from| self.fan_out.batch_durable(from)) {
            self.fx.changes.events_out_pos = Some(claimable);
        }
        if changes.incarnation == Some(self.incarnation) && !self.incarnation_durable {
            self.incarnation_durable = true;
            // Queues held back until transaction ids were safe may go now.
            for id in self.destinations.ids_in_name_order() {
                if self.destinations.at(id).queue.is_some() {
                    self.fx.mark_dirty_id(id);
                }
            }
        }
        Ok(())
    }

    fn storage_failed(&mut self, request: RequestId, error: alloc::string::String) -> Result<(), InputError> {
        let pending = self.fx.take_request(request)?;
        if matches!(pending, PendingRequest::Transaction { .. }) {
            return Err(self.fx.wrong_answer(request, pending));
        }
        let retry_at = self.fx.now.plus_ms(STORAGE_RETRY_DELAY_MS);
        self.fx.report(Event::StorageRetry { error, retry_at_ts: retry_at.as_ms() });
        self.storage_retries.push(pending);
        self.fx.set_timer(retry_at, Timer::StorageRetry);
        Ok(())
    }

    fn transaction_done(&mut self, request: RequestId, result: TransactionResult) -> Result<(), InputError> {
        let id = match self.fx.take_request(request)? {
            PendingRequest::Transaction { destination } => destination,
            other => return Err(self.fx.wrong_answer(request, other)),
        };
        let destinations = &mut self.destinations;
        let next = self.limiter.release(|waiting| claim_slot(destinations, waiting));
        if let Some(next) = next {
            self.fx.mark_dirty_id(next);
        }
        let (name, destination) = self.destinations.at_mut(id);
        if destination.activity() == Activity::Sending(request) {
            destination.queue().activity = Activity::Idle;
            destination.attempt_finished(name, &mut self.fx, &self.config, result);
        }
        self.fx.mark_dirty_id(id);
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // timers

    fn timeout(&mut self) {
        while let Some(timer) = self.fx.pop_due_timer() {
            match timer {
                Timer::Destination(name) => {
                    if self.destinations.get_mut(&name).is_some_and(|d| d.sleep_over(self.fx.now)) {
                        self.fx.mark_dirty(name);
                    }
                }
                Timer::CatchUpScan => self.catch_up_scan_tick(),
                Timer::WakeUpQueue => {
                    let destinations = &self.destinations;
                    let has_work =
                        |name: &ServerName| destinations.get(name).is_some_and(Destination::has_work_in_memory);
                    self.wake_up_queue.step(&mut self.fx, has_work);
                }
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
    fn reissue(&mut self, pending: PendingRequest) {
        match pending {
            PendingRequest::FetchEvents { .. } => self.fan_out.fetch_again(&mut self.fx, &self.config),
            PendingRequest::CatchUp { destination, .. } => {
                // The destination's loop asks again, up to where storage holds every row by
                // then.
                if let Some(queue) = self.destinations.get_mut(&destination).and_then(|d| d.queue.as_mut())
                    && matches!(queue.activity, Activity::LoadingCatchUp(_))
                {
                    queue.activity = Activity::Idle;
                }
                self.fx.mark_dirty(destination);
            }
            PendingRequest::Outstanding { after } => {
                let request = self.fx.request(PendingRequest::Outstanding { after: after.clone() });
                let limit = self.config.catch_up_waker_page_max;
                self.fx.output(Output::LoadOutstanding { request, after, limit });
            }
            PendingRequest::Persist { mut changes, fanout_from, .. } => {
                // Claimed again, capped, once this batch lands.
                changes.events_out_pos = None;
                for row in &mut changes.destinations {
                    if let Some(current) = self.destinations.get(&row.destination) {
                        *row = current.state(&row.destination);
                    }
                }
                let pending = PendingRequest::Persist { changes: changes.clone(), fanout_from };
                let request = self.fx.request(pending);
                self.fx.output(Output::Persist { request, changes });
            }
            PendingRequest::Transaction { .. } => {}
        }
    }

    fn catch_up_scan_tick(&mut self) {
        match self.catch_up_scan.tick(&mut self.fx, &self.config) {
            ScanAction::Nothing => {}
            ScanAction::StartRun => {
                self.prune_to_device();
                self.prune_device_lists();
                self.catch_up_scan.load_page(&mut self.fx, &self.config);
            }
            ScanAction::Wake(name) => {
                let destination = match self.destinations.id(&name) {
                    Some(id) => self.destinations.at_mut(id).1,
                    None => {
                        let fresh = Destination {
                            catch_up: CatchUp { active: true, last_skipped: 0 },
                            ..Destination::default()
                        };
                        let id = self.destinations.insert_new(name.clone(), fresh);
                        self.destinations.at_mut(id).1
                    }
                };
                if destination.wake_for_catch_up(self.fx.now) {
                    self.fx.mark_dirty(name);
                }
            }
            ScanAction::LoadNextPage => self.catch_up_scan.load_page(&mut self.fx, &self.config),
        }
    }

    fn prune_to_device(&mut self) {
        let Some(after_ms) = self.config.to_device_prune_after_ms else { return };
        let now_ms = self.fx.now.as_ms();
        for id in self.destinations.ids_in_name_order() {
            let (name, destination) = self.destinations.at_mut(id);
            if destination.backoff.failure_ts.is_some_and(|since| now_ms.saturating_sub(since) > after_ms) {
                destination.prune_to_device(name, &mut self.fx);
            }
        }
    }

    fn prune_device_lists(&mut self) {
        let Some(after_ms) = self.config.device_list_prune_after_ms else { return };
        let cutoff_ms = self.fx.now.as_ms().saturating_sub(after_ms);
        for id in self.destinations.ids_in_name_order() {
            let (name, destination) = self.destinations.at_mut(id);
            if destination.queue.as_ref().is_some_and(|q| q.edus.has_device_lists()) {
                destination.prune_device_lists(name, &mut self.fx, cutoff_ms);
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // destinations

    /// Inbound contact or an operator's wake: forget the backoff and send what is owed.
    fn destination_contacted(&mut self, name: &ServerName) {
        if !self.config.handles(name) || *name == self.config.server_name {
            return;
        }
        let Some(destination) = self.destinations.get_mut(name) else { return };
        destination.clear_backoff(name, &mut self.fx);
        destination.wake();
        self.fx.mark_dirty(name.clone());
    }

    fn set_destination_state(&mut self, state: DestinationState) {
        let name = state.destination.clone();
        self.destinations.or_default(&name).adopt_state(&state);
        self.fx.changes.destinations.push(state);
        self.fx.mark_dirty(name);
    }

    fn drive_dirty(&mut self) {
        let rows_stored_to = self.fan_out.rows_stored_to();
        if rows_stored_to > self.awaiting_rows_stored_to {
            self.awaiting_rows_stored_to = rows_stored_to;
            for name in core::mem::take(&mut self.awaiting_rows) {
                self.fx.mark_dirty(name);
            }
        }
        self.drive_dirty_once(rows_stored_to);
        // A slot handed to a destination that then had nothing to send (its transaction was
        // abandoned for catch-up) would otherwise stay free while others wait in line forever.
        while self.limiter.slot_idle(self.config.transactions_in_flight_max) {
            let destinations = &mut self.destinations;
            let Some(next) = self.limiter.wake_next(|waiting| claim_slot(destinations, waiting)) else { break };
            self.fx.mark_dirty_id(next);
            self.drive_dirty_once(rows_stored_to);
        }
    }

    fn drive_dirty_once(&mut self, rows_stored_to: u64) {
        while let Some(id) = self.fx.pop_dirty(&self.destinations) {
            let (name, destination) = self.destinations.at_mut(id);
            if !self.incarnation_durable {
                // Kept in memory, so the incarnation's `Persisted` drives it.
                destination.queue();
                continue;
            }
            let mut ctx = Driving {
                id,
                config: &self.config,
                builder: &mut self.builder,
                limiter: &mut self.limiter,
                rows_stored_to,
                awaiting_rows: &mut self.awaiting_rows,
            };
            destination.drive(name, &mut self.fx, &mut ctx);
        }
    }

    /// Emits the writes of the current input as one atomic batch.
    fn flush_changes(&mut self) {
        for name in self.fx.take_state_changed() {
            if let Some(destination) = self.destinations.get(&name) {
                self.fx.changes.destinations.push(destination.state(&name));
            }
        }
        if self.fx.changes.is_empty() {
            return;
        }
        let mut changes = core::mem::take(&mut self.fx.changes);
        self.router.batch_started();
        compact(&mut changes);
        let fanout_from = self.fan_out.claim(&mut changes);
        if changes.is_empty() {
            return;
        }
        if !self.incarnation_durable {
            // This process's writes embed its incarnation (outbox ids, generated message ids),
            // and the start-up write of the incarnation may fail and be re-issued after this
            // batch. A batch is atomic and the incarnation a max-upsert, so carrying it here
            // means nothing of this process becomes durable without its incarnation: a crash
            // meanwhile cannot let the next process reuse the incarnation, and with it ids
            // of rows still stored (it would overwrite an undelivered message).
            changes.incarnation = Some(self.incarnation);
        }
        let request = self.fx.request(PendingRequest::Persist { changes: changes.clone(), fanout_from });
        self.fx.output(Output::Persist { request, changes });
    }
}

fn check_events(after: u64, events: &[PduInfo]) -> Result<(), InputError> {
    let mut previous = after;
    for event in events {
        if event.stream_ordering <= previous {
            return Err(InputError::InconsistentAnswer(alloc::format!(
                "event {} has stream ordering {} after {}; events must ascend above `after`",
                event.event_id,
                event.stream_ordering,
                previous
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
            return Err(InputError::InconsistentAnswer(alloc::format!(
                "catch-up room {} has stream ordering {} above `up_to` {up_to}",
                room.room_id,
                room.stream_ordering
            )));
        }
        if room.stream_ordering <= previous {
            return Err(InputError::InconsistentAnswer(alloc::format!(
                "catch-up room {} has stream ordering {} after {}; rooms must ascend above `after`",
                room.room_id,
                room.stream_ordering,
                previous
            )));
        }
        previous = room.stream_ordering;
    }
    Ok(())
}

/// Hands a freed slot to `waiting` if it still waits for one.
fn claim_slot(destinations: &mut Directory, waiting: DestId) -> bool {
    let queue = destinations.at_mut(waiting).1.queue.as_mut();
    let claimed = queue.as_ref().is_some_and(|q| q.activity == Activity::AwaitingSlot);
    if let (true, Some(queue)) = (claimed, queue) {
        queue.activity = Activity::Idle;
    }
    claimed
}
