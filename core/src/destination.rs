//! One destination: its compact record, kept for every destination ever seen, and its queue,
//! kept only while there is something to send. One transaction is in flight at a time; a
//! built transaction is frozen and retried byte for byte until answered (see
//! docs/design.md, "Frozen transactions").
//!
//! The destination's logic is spread over the files of its parts, each an `impl Destination`
//! block: catch-up (`catch_up.rs`), transaction building (`transaction.rs`), attempt outcomes
//! (`outcome.rs`) and device-list chains (`device_lists.rs`). This file holds the record,
//! the queue, the driving loop and what the other parts share.

use alloc::boxed::Box;
use alloc::collections::{BTreeSet, VecDeque};
use alloc::string::String;
use alloc::sync::Arc;

use crate::backoff::Backoff;
use crate::catch_up::{CatchUp, CatchUpRooms};
use crate::config::Config;
use crate::device_lists::DeviceListChains;
use crate::directory::DestId;
use crate::edu::{EduEntry, EduQueue};
use crate::effects::{Effects, PendingRequest, Timer};
use crate::event::Event;
use crate::io::{DestinationPhase, DestinationState, DestinationStats, OutboxKey, Output};
use crate::limiter::InFlightLimiter;
use crate::outcome::Isolation;
use crate::time::Timestamp;
use crate::transaction::{FrozenTransaction, PduEntry, TransactionBuilder};
use crate::types::{RequestId, ServerName};

/// Compact per-destination record, kept for every known destination; the queue itself is
/// dropped from memory whenever it is idle (docs/design.md, "Memory").
#[derive(Debug, Default)]
pub(crate) struct Destination {
    pub(crate) backoff: Backoff,
    /// The newest stream ordering every `destination_rooms` row up to which is delivered.
    pub(crate) last_successful: Option<u64>,
    pub(crate) catch_up: CatchUp,
    /// Figures for operators, kept while the queue itself may be dropped.
    pub(crate) last_success_ts: Option<u64>,
    pub(crate) dropped_items: u64,
    /// Device-list chain state, boxed: most destinations never get a device-list update, and
    /// every known destination keeps this record.
    pub(crate) device_lists: Option<Box<DeviceListChains>>,
    pub(crate) queue: Option<Box<Queue>>,
}

/// What a destination holds in memory while it has something to send.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub(crate) pending_pdus: PduQueue,
    pub(crate) isolation: Isolation,
    pub(crate) frozen: Option<FrozenTransaction>,
    pub(crate) activity: Activity,
    /// Failed attempts of the frozen transaction since it was last backed off.
    pub(crate) http_failures: u32,
    pub(crate) catch_up_rooms: CatchUpRooms,
    pub(crate) edus: EduQueue,
}

/// A destination's PDUs waiting for a transaction, oldest first. The oldest sits beside the
/// deque: a fan-out queues one PDU for each destination and takes it into a transaction in
/// the same input, so for the usual queue of one PDU there is no buffer to allocate (the queue
/// itself is dropped when it is idle, D6, so the buffer would be made again for every event).
#[derive(Debug, Default)]
pub(crate) struct PduQueue {
    /// The oldest; `None` only when the queue is empty.
    first: Option<Arc<PduEntry>>,
    rest: VecDeque<Arc<PduEntry>>,
}

impl PduQueue {
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub(crate) fn front(&self) -> Option<&Arc<PduEntry>> {
        self.first.as_ref()
    }

    pub(crate) fn push_back(&mut self, entry: Arc<PduEntry>) {
        if self.first.is_none() {
            self.first = Some(entry);
        } else {
            self.rest.push_back(entry);
        }
    }

    pub(crate) fn push_front(&mut self, entry: Arc<PduEntry>) {
        if let Some(previous) = self.first.replace(entry) {
            self.rest.push_front(previous);
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<Arc<PduEntry>> {
        let first = self.first.take();
        self.first = self.rest.pop_front();
        first
    }

    pub(crate) fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<PduEntry>> {
        self.first.iter().chain(&self.rest)
    }
}

impl Extend<Arc<PduEntry>> for PduQueue {
    fn extend<I: IntoIterator<Item = Arc<PduEntry>>>(&mut self, entries: I) {
        for entry in entries {
            self.push_back(entry);
        }
    }
}

/// What a queue is doing right now. (The reported [`DestinationPhase`] is derived from it
/// and from the backoff; the stored [`DestinationState`] is the backoff and position row.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Activity {
    #[default]
    Idle,
    /// Sleeping until an HTTP retry or the end of the backoff.
    Sleeping(Timestamp),
    /// Waiting for a slot under `transactions_in_flight_max`.
    AwaitingSlot,
    Sending(RequestId),
    LoadingCatchUp(RequestId),
}

/// What driving a destination needs from the rest of the sender.
#[derive(Debug)]
pub(crate) struct Driving<'a> {
    /// The destination driven.
    pub(crate) id: DestId,
    pub(crate) config: &'a Config,
    pub(crate) builder: &'a mut TransactionBuilder,
    pub(crate) limiter: &'a mut InFlightLimiter,
    /// Storage holds every row this process fanned out up to here; rows above may sit in a
    /// write not yet stored (in flight, failed and awaiting its retry, or not yet emitted),
    /// while others above exist from before a crash. Catch-up looks no further, so the last
    /// successful position never passes a row storage does not have yet.
    pub(crate) rows_stored_to: u64,
    /// Destinations whose catch-up waits for more rows to be stored.
    pub(crate) awaiting_rows: &'a mut BTreeSet<ServerName>,
}

impl Destination {
    pub(crate) fn from_state(state: &DestinationState) -> Self {
        Self {
            backoff: Backoff::from_state(state),
            last_successful: state.last_successful_stream_ordering,
            ..Self::default()
        }
    }

    /// The stored row, as memory holds it now.
    pub(crate) fn state(&self, name: &ServerName) -> DestinationState {
        self.backoff.state(name, self.last_successful)
    }

    /// An operator overwrote the stored row: adopt it, and look in storage before trusting
    /// memory, since the position may have moved back.
    pub(crate) fn adopt_state(&mut self, state: &DestinationState) {
        self.backoff = Backoff::from_state(state);
        self.last_successful = state.last_successful_stream_ordering;
        self.wake();
    }

    pub(crate) fn queue(&mut self) -> &mut Queue {
        self.queue.get_or_insert_with(Box::default)
    }

    pub(crate) fn activity(&self) -> Activity {
        self.queue.as_ref().map_or(Activity::Idle, |q| q.activity)
    }

    /// Anything at all held in memory for this destination, EDUs included.
    pub(crate) fn has_work_in_memory(&self) -> bool {
        self.holds_pdu_work() || self.queue.as_ref().is_some_and(|q| !q.edus.is_empty())
    }

    /// PDU work in memory, or an attempt under way: while there is some, the queue is on its
    /// way and a wake must not send it to storage to look for more.
    pub(crate) fn holds_pdu_work(&self) -> bool {
        self.queue.as_ref().is_some_and(|q| {
            q.frozen.is_some()
                || !q.pending_pdus.is_empty()
                || !q.catch_up_rooms.rooms.is_empty()
                || q.activity != Activity::Idle
        })
    }

    /// Makes the destination send now: cuts a retry sleep short, and if memory holds nothing
    /// for it, looks in storage rather than trusting the queue's mode. The caller drives it.
    pub(crate) fn wake(&mut self) {
        if !self.holds_pdu_work() {
            self.catch_up.active = true;
            if let Some(queue) = self.queue.as_mut() {
                queue.catch_up_rooms.position = None;
            }
        }
        if let Some(queue) = self.queue.as_mut()
            && matches!(queue.activity, Activity::Sleeping(_))
        {
            queue.activity = Activity::Idle;
        }
    }

    /// Forgets the backoff (a 2xx, or the destination contacted us), stored and reported
    /// only if there was one.
    pub(crate) fn clear_backoff(&mut self, name: &ServerName, fx: &mut Effects) {
        if self.backoff.clear() {
            fx.mark_state_changed(name);
            fx.report(Event::DestinationUp { destination: name.clone() });
        }
    }

    pub(crate) fn sleep_until(&mut self, name: &ServerName, until: Timestamp, fx: &mut Effects) {
        self.queue().activity = Activity::Sleeping(until);
        fx.set_timer(until, Timer::Destination(name.clone()));
    }

    /// The destination's timer fired: end the sleep if it is over. Returns whether to drive.
    pub(crate) fn sleep_over(&mut self, now: Timestamp) -> bool {
        if let Some(queue) = self.queue.as_mut()
            && let Activity::Sleeping(until) = queue.activity
            && until <= now
        {
            queue.activity = Activity::Idle;
            return true;
        }
        false
    }

    /// Runs the destination's loop as far as it can go without an answer from the host:
    /// ephemeral data first while catching up (it does not wait behind storage), then a
    /// catch-up room or a catch-up query, or the next transaction from memory; then an attempt,
    /// if a slot is free.
    pub(crate) fn drive(&mut self, name: &ServerName, fx: &mut Effects, ctx: &mut Driving<'_>) {
        if self.activity() != Activity::Idle {
            return;
        }
        let config = ctx.config;
        if self.backoff.active(fx.now) {
            if self.backoff.retry_interval_ms > config.catch_up_threshold_ms && !self.catch_up.active {
                self.start_catching_up(name, fx, true);
            }
            if self.has_work_in_memory() || self.catch_up.active {
                // Invariant: an active backoff has a retry time.
                let until = self.backoff.retry_at().expect("backed off implies a retry time");
                self.sleep_until(name, until, fx);
            } else {
                self.queue = None;
            }
            return;
        }
        let catching_up = self.catch_up.active;
        let queue = self.queue();
        // Ephemeral data does not wait behind catch-up (docs/design.md, D9).
        if queue.frozen.is_none()
            && catching_up
            && !queue.edus.is_empty()
            && let Some(frozen) = self.build_from_queue(name, fx, config, ctx.builder, false)
        {
            self.queue().frozen = Some(frozen);
        }
        if self.queue().frozen.is_none() {
            if self.catch_up.active {
                if let Some(room) = self.queue().catch_up_rooms.rooms.pop_front() {
                    match self.build_catch_up(name, fx, config, ctx.builder, room, false) {
                        Some(frozen) => self.queue().frozen = Some(frozen),
                        None => {
                            // The room was given up; go on with the next one.
                            fx.mark_dirty_id(ctx.id);
                            return;
                        }
                    }
                } else if self.queue().catch_up_rooms.searched_to.is_some_and(|to| to >= ctx.rows_stored_to) {
                    // Driven again when storage holds more rows.
                    ctx.awaiting_rows.insert(name.clone());
                    return;
                } else {
                    self.load_catch_up(name, fx, config, ctx.rows_stored_to);
                    return;
                }
            } else {
                match self.build_from_queue(name, fx, config, ctx.builder, true) {
                    Some(frozen) => self.queue().frozen = Some(frozen),
                    None => {
                        // Idle with nothing to send: drop the queue from memory.
                        self.queue = None;
                        return;
                    }
                }
            }
        }
        if !ctx.limiter.try_acquire(ctx.id, config.transactions_in_flight_max) {
            self.queue().activity = Activity::AwaitingSlot;
            return;
        }
        self.send_attempt(ctx.id, name, fx);
    }

    /// One HTTP attempt of the frozen transaction; the caller holds an in-flight slot.
    fn send_attempt(&mut self, id: DestId, name: &ServerName, fx: &mut Effects) {
        let request = fx.request(PendingRequest::Transaction { destination: id });
        let queue = self.queue();
        // Invariant: drive only sends when a frozen transaction exists.
        let frozen = queue.frozen.as_mut().expect("send_attempt needs a frozen transaction");
        let attempt = frozen.attempt(request, name);
        queue.activity = Activity::Sending(request);
        fx.output(Output::SendTransaction(attempt));
    }

    /// Reports an item given up for this destination and counts it.
    pub(crate) fn give_up(&mut self, name: &ServerName, fx: &mut Effects, entry: &PduEntry, reason: String) {
        self.dropped_items += 1;
        fx.report(Event::Dropped { destination: name.clone(), item: String::from(&*entry.event_id), reason });
    }

    /// Reports an EDU given up for this destination; a to-device one also leaves the outbox,
    /// and a device-list one restarts its user's `prev_id` chain so the receiver
    /// resynchronises.
    pub(crate) fn give_up_edu(&mut self, name: &ServerName, fx: &mut Effects, edu: &EduEntry, reason: String) {
        self.dropped_items += 1;
        if let Some(outbox_id) = edu.outbox_id {
            fx.changes.to_device_deleted.push(OutboxKey { destination: name.clone(), outbox_id });
        }
        if let Some(poke) = &edu.device_list {
            self.device_list_settled(name, fx, poke);
            self.restart_device_list_chain(name, fx, &poke.user_id);
        }
        fx.report(Event::Dropped { destination: name.clone(), item: edu.edu_type.clone(), reason });
    }

    /// Per-destination figures for operators.
    pub(crate) fn stats(&self, name: &ServerName, now: Timestamp, config: &Config) -> DestinationStats {
        let queue = self.queue.as_deref();
        let activity = self.activity();
        let queued_pdus =
            queue.map_or(0, |q| q.pending_pdus.len() as u64 + q.frozen.as_ref().map_or(0, |f| f.items.len() as u64));
        let oldest_queued_at = queue.and_then(|q| {
            let frozen =
                q.frozen.as_ref().and_then(|f| f.items.iter().map(|p| p.queued_at_ms).filter(|t| *t > 0).min());
            let pending = q.pending_pdus.front().map(|p| p.queued_at_ms);
            frozen.into_iter().chain(pending).min()
        });
        let backoff_until_ts = self.backoff.retry_at().filter(|at| *at > now).map(Timestamp::as_ms);
        let backing_off = backoff_until_ts.is_some();
        let catching_up = self.catch_up.active;
        let state = if self.backoff.at_maximum(config) && backing_off {
            DestinationPhase::Gone
        } else {
            match activity {
                Activity::Sending(_) | Activity::LoadingCatchUp(_) | Activity::AwaitingSlot if catching_up => {
                    DestinationPhase::CatchingUp
                }
                Activity::Sending(_) | Activity::AwaitingSlot => DestinationPhase::Sending,
                Activity::LoadingCatchUp(_) => DestinationPhase::CatchingUp,
                Activity::Sleeping(_) if backing_off => DestinationPhase::BackingOff,
                Activity::Sleeping(_) => DestinationPhase::Retrying,
                Activity::Idle if backing_off => DestinationPhase::BackingOff,
                Activity::Idle if catching_up && self.holds_pdu_work() => DestinationPhase::CatchingUp,
                Activity::Idle => DestinationPhase::Idle,
            }
        };
        DestinationStats {
            destination: name.clone(),
            state,
            queued_pdus,
            queued_edus: queue.map_or(0, |q| q.edus.len() as u64),
            oldest_pending_age_ms: oldest_queued_at.map(|at| now.as_ms().saturating_sub(at)),
            in_flight: matches!(activity, Activity::Sending(_)),
            backoff_until_ts,
            catching_up,
            last_success_ts: self.last_success_ts,
            dropped_items: self.dropped_items,
            retry_interval_ms: self.backoff.retry_interval_ms,
            failure_ts: self.backoff.failure_ts,
            last_successful_stream_ordering: self.last_successful,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::transaction::PduEntry;
    use alloc::vec::Vec;

    pub(crate) fn name(text: &str) -> ServerName {
        ServerName::parse(text).unwrap()
    }

    pub(crate) fn config() -> Config {
        Config::new(name("us.test"))
    }

    pub(crate) fn pdu(id: &str, stream_ordering: u64) -> Arc<PduEntry> {
        Arc::new(PduEntry {
            event_id: id.into(),
            stream_ordering,
            json: Arc::from(alloc::format!("{{\"event_id\":\"{id}\"}}")),
            queued_at_ms: 1,
        })
    }

    #[test]
    fn the_pdu_queue_is_first_in_first_out_with_its_oldest_beside_the_deque() {
        let ids = |queue: &PduQueue| queue.iter().map(|p| p.stream_ordering).collect::<Vec<_>>();
        let mut queue = PduQueue::default();
        assert!(queue.is_empty() && queue.front().is_none() && queue.pop_front().is_none());
        queue.extend([pdu("$1", 1), pdu("$2", 2), pdu("$3", 3)]);
        assert_eq!((ids(&queue), queue.len()), (alloc::vec![1, 2, 3], 3));
        assert_eq!(queue.pop_front().map(|p| p.stream_ordering), Some(1));
        queue.push_front(pdu("$0", 0));
        assert_eq!(ids(&queue), [0, 2, 3]);
        assert_eq!(queue.front().map(|p| p.stream_ordering), Some(0));
        while queue.pop_front().is_some() {}
        assert!(queue.is_empty() && queue.len() == 0);
        queue.push_front(pdu("$4", 4));
        queue.push_back(pdu("$5", 5));
        assert_eq!(ids(&queue), [4, 5]);
        queue.clear();
        assert!(queue.is_empty() && queue.iter().next().is_none());
    }

    /// Drives `destination` once with a fresh builder and limiter; returns the outputs.
    pub(crate) fn drive_once(destination: &mut Destination, fx: &mut Effects, config: &Config) -> Vec<Output> {
        let mut builder = TransactionBuilder::new(1);
        let mut limiter = InFlightLimiter::default();
        let mut awaiting_rows = BTreeSet::new();
        let mut ctx = Driving {
            id: DestId(0),
            config,
            builder: &mut builder,
            limiter: &mut limiter,
            rows_stored_to: 0,
            awaiting_rows: &mut awaiting_rows,
        };
        destination.drive(&name("a.test"), fx, &mut ctx);
        core::iter::from_fn(|| fx.poll_output()).collect()
    }

    #[test]
    fn a_queue_sends_its_pdus_and_is_dropped_when_idle() {
        let config = config();
        let mut fx = Effects::new(0);
        fx.now = Timestamp(5_000);
        let mut destination = Destination::default();
        destination.queue().pending_pdus.push_back(pdu("$1", 1));
        let outputs = drive_once(&mut destination, &mut fx, &config);
        assert!(
            matches!(&outputs[..], [Output::SendTransaction(t)] if t.pdu_ids == [Arc::<str>::from("$1")] && t.txn_id == "1.1")
        );
        assert!(matches!(destination.activity(), Activity::Sending(_)));
        destination.queue().activity = Activity::Idle;
        destination.queue().frozen = None;
        assert!(drive_once(&mut destination, &mut fx, &config).is_empty());
        assert!(destination.queue.is_none(), "nothing to send: the queue leaves memory");
    }

    #[test]
    fn a_backed_off_destination_sleeps_until_its_retry_time() {
        let config = config();
        let mut fx = Effects::new(0);
        fx.now = Timestamp(10_000);
        let backoff = Backoff { retry_last_ts: 9_000, retry_interval_ms: 5_000, failure_ts: Some(9_000) };
        let mut destination = Destination { backoff, ..Destination::default() };
        destination.queue().pending_pdus.push_back(pdu("$1", 1));
        assert!(drive_once(&mut destination, &mut fx, &config).is_empty());
        assert_eq!(destination.activity(), Activity::Sleeping(Timestamp(14_000)));
        assert_eq!(fx.next_deadline(), Some(Timestamp(14_000)));
        fx.now = Timestamp(14_000);
        assert!(destination.sleep_over(fx.now));
        assert_eq!(destination.stats(&name("a.test"), fx.now, &config).state, DestinationPhase::Idle);
    }

    #[test]
    fn waking_an_empty_destination_makes_it_look_in_storage() {
        let config = config();
        let mut fx = Effects::new(0);
        let mut destination = Destination::default();
        destination.wake();
        assert!(destination.catch_up.active);
        let outputs = drive_once(&mut destination, &mut fx, &config);
        assert!(matches!(&outputs[..], [Output::LoadCatchUp { after: 0, .. }]));
        assert_eq!(destination.stats(&name("a.test"), fx.now, &config).state, DestinationPhase::CatchingUp);
    }

    #[test]
    fn clearing_a_backoff_is_stored_and_reported_once() {
        let mut fx = Effects::new(0);
        let mut destination = Destination::default();
        destination.backoff.failure_ts = Some(1);
        destination.clear_backoff(&name("a.test"), &mut fx);
        destination.clear_backoff(&name("a.test"), &mut fx);
        assert_eq!(fx.take_state_changed().len(), 1);
        assert!(matches!(fx.poll_output(), Some(Output::Event { event: Event::DestinationUp { .. } })));
        assert!(fx.poll_output().is_none());
    }
}
