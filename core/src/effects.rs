//! The side effects of handling inputs, gathered in one place: outputs for the host, writes
//! to persist, timers, outstanding requests, and the destinations to drive before the input
//! returns. Every part of the machine gets `&mut Effects` instead of the whole sender, which
//! is what lets a destination's logic be methods on the destination.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};

use alloc::vec::Vec;

use crate::directory::{DestId, Directory};
use crate::error::InputError;
use crate::event::Event;
use crate::io::{Changes, Output};
use crate::rng::Prng;
use crate::time::Timestamp;
use crate::types::{RequestId, ServerName};

/// What fires when a deadline passes. Timers due at the same instant fire in the order of
/// these variants (the set is ordered by time, then variant), which traces depend on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// A destination's retry sleep or backoff ends.
    Destination(ServerName),
    /// The periodic catch-up scan's next step.
    CatchUpScan,
    /// The staggered wake-up queue's next wake.
    WakeUpQueue,
    /// Failed storage requests are issued again.
    StorageRetry,
}

/// What an outstanding request is waiting for.
#[derive(Clone, Debug)]
pub(crate) enum PendingRequest {
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
    /// `fanout_from`: for a batch that advances `events_out_pos`, the position before it.
    Persist {
        changes: Changes,
        fanout_from: Option<u64>,
    },
    Transaction {
        destination: DestId,
    },
}

impl PendingRequest {
    /// The input that answers this request, for the error naming a wrong answer.
    fn answered_by(&self) -> &'static str {
        match self {
            Self::FetchEvents { .. } => "events_fetched",
            Self::CatchUp { .. } => "catch_up_loaded",
            Self::Outstanding { .. } => "outstanding_loaded",
            Self::Persist { .. } => "persisted",
            Self::Transaction { .. } => "transaction_done",
        }
    }
}

/// The effects, plus the two things every part reads alongside them: the current time and
/// the seeded randomness behind jitter.
#[derive(Debug)]
pub(crate) struct Effects {
    pub(crate) now: Timestamp,
    pub(crate) rng: Prng,
    /// Writes made while handling the current input, flushed as one batch.
    pub(crate) changes: Changes,
    outputs: VecDeque<Output>,
    timers: BTreeSet<(Timestamp, Timer)>,
    requests: BTreeMap<RequestId, PendingRequest>,
    next_request_id: u64,
    /// Destinations whose queue should be driven once the current input is handled: marked
    /// by id on the hot paths, by name elsewhere, and drained in name order (`driving`).
    dirty_ids: Vec<DestId>,
    dirty_names: Vec<ServerName>,
    /// One bit per destination: marked and not yet driven, so a destination marked once per
    /// event of a batch is queued once.
    dirty_flags: Vec<u64>,
    /// The marked destinations by order key, descending (the first by name is last), and the
    /// directory's order generation the keys were read in. A vector, not a set: it empties
    /// and fills again on every input, and keeps its memory meanwhile.
    driving: Vec<(u64, DestId)>,
    driving_generation: u64,
    /// Destinations whose stored row changed while handling the current input (sorted and
    /// deduplicated when taken).
    state_changed: Vec<ServerName>,
}

impl Effects {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            now: Timestamp(0),
            rng: Prng::from_seed(seed),
            changes: Changes::default(),
            outputs: VecDeque::new(),
            timers: BTreeSet::new(),
            requests: BTreeMap::new(),
            next_request_id: 1,
            dirty_ids: Vec::new(),
            dirty_names: Vec::new(),
            dirty_flags: Vec::new(),
            driving: Vec::new(),
            driving_generation: 0,
            state_changed: Vec::new(),
        }
    }

    pub(crate) fn output(&mut self, output: Output) {
        self.outputs.push_back(output);
    }

    pub(crate) fn report(&mut self, event: Event) {
        self.outputs.push_back(Output::Event { event });
    }

    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Registers a request and returns the id its output and answer carry.
    pub(crate) fn request(&mut self, pending: PendingRequest) -> RequestId {
        let id = RequestId(self.next_request_id);
        self.next_request_id += 1;
        self.requests.insert(id, pending);
        id
    }

    pub(crate) fn take_request(&mut self, request: RequestId) -> Result<PendingRequest, InputError> {
        self.requests.remove(&request).ok_or(InputError::UnknownRequest(request))
    }

    /// Puts back a request answered by the wrong input (or with an inconsistent answer), so
    /// a correct answer still finds it.
    pub(crate) fn restore_request(&mut self, request: RequestId, pending: PendingRequest) {
        self.requests.insert(request, pending);
    }

    /// Puts back a request answered with the wrong kind of completion and names the right one.
    pub(crate) fn wrong_answer(&mut self, request: RequestId, pending: PendingRequest) -> InputError {
        let expected = pending.answered_by();
        self.requests.insert(request, pending);
        InputError::WrongCompletion { request, expected }
    }

    pub(crate) fn set_timer(&mut self, at: Timestamp, timer: Timer) {
        self.timers.insert((at, timer));
    }

    pub(crate) fn next_deadline(&self) -> Option<Timestamp> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// The earliest timer due at or before now, removed.
    pub(crate) fn pop_due_timer(&mut self) -> Option<Timer> {
        let (at, _) = self.timers.first()?;
        if *at > self.now {
            return None;
        }
        self.timers.pop_first().map(|(_, timer)| timer)
    }

    /// Asks for `name`'s queue to be driven before the current input returns (nothing
    /// happens if it has no record by then).
    pub(crate) fn mark_dirty(&mut self, name: ServerName) {
        self.dirty_names.push(name);
    }

    /// Asks for a destination's queue to be driven before the current input returns.
    pub(crate) fn mark_dirty_id(&mut self, id: DestId) {
        let (word, bit) = (id.0 as usize / 64, 1u64 << (id.0 % 64));
        if word >= self.dirty_flags.len() {
            self.dirty_flags.resize(word + 1, 0);
        }
        if self.dirty_flags[word] & bit == 0 {
            self.dirty_flags[word] |= bit;
            self.dirty_ids.push(id);
        }
    }

    /// The marked destination first by name, unmarked: it may be marked again while driven.
    pub(crate) fn pop_dirty(&mut self, directory: &Directory) -> Option<DestId> {
        if !self.dirty_names.is_empty() {
            for name in core::mem::take(&mut self.dirty_names) {
                if let Some(id) = directory.id(&name) {
                    self.mark_dirty_id(id);
                }
            }
        }
        let generation = directory.order_generation();
        if self.driving_generation != generation {
            // Keys were reassigned (a new destination) while some were waiting.
            for (order, id) in &mut self.driving {
                *order = directory.order(*id);
            }
            self.driving.sort_unstable_by(|a, b| b.cmp(a));
            self.driving_generation = generation;
        }
        if self.driving.is_empty() {
            self.driving.extend(self.dirty_ids.drain(..).map(|id| (directory.order(id), id)));
            self.driving.sort_unstable_by(|a, b| b.cmp(a));
        } else {
            // Marked while others wait: rare (a destination driving itself again, a freed slot).
            for id in self.dirty_ids.drain(..) {
                let key = (directory.order(id), id);
                let at = self.driving.partition_point(|waiting| *waiting > key);
                self.driving.insert(at, key);
            }
        }
        let (_, id) = self.driving.pop()?;
        if let Some(word) = self.dirty_flags.get_mut(id.0 as usize / 64) {
            *word &= !(1u64 << (id.0 % 64));
        }
        Some(id)
    }

    /// The first destination marked by name, for tests of parts that mark by name.
    #[cfg(test)]
    pub(crate) fn pop_dirty_name(&mut self) -> Option<ServerName> {
        self.dirty_names.sort();
        self.dirty_names.dedup();
        (!self.dirty_names.is_empty()).then(|| self.dirty_names.remove(0))
    }

    /// `name`'s stored row changed: it is written with the current batch.
    pub(crate) fn mark_state_changed(&mut self, name: &ServerName) {
        self.state_changed.push(name.clone());
    }

    /// The destinations whose stored row changed, in name order, each once.
    pub(crate) fn take_state_changed(&mut self) -> Vec<ServerName> {
        let mut names = core::mem::take(&mut self.state_changed);
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// One row per key, sorted by key, so hosts write less: the newest position of a
/// (destination, room), the last write of a destination. A stable sort is linear on the usual
/// already-sorted batch (one event's rows come in destination order).
pub(crate) fn compact(changes: &mut Changes) {
    changes.destination_rooms.sort_by(|a, b| a.destination.cmp(&b.destination).then_with(|| a.room_id.cmp(&b.room_id)));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{DestinationRoom, DestinationState};

    fn name(text: &str) -> ServerName {
        ServerName::parse(text).unwrap()
    }

    #[test]
    fn timers_fire_by_time_then_kind_and_only_when_due() {
        let mut fx = Effects::new(0);
        fx.set_timer(Timestamp(20), Timer::StorageRetry);
        fx.set_timer(Timestamp(10), Timer::WakeUpQueue);
        fx.set_timer(Timestamp(10), Timer::Destination(name("b.test")));
        fx.set_timer(Timestamp(10), Timer::CatchUpScan);
        assert_eq!(fx.next_deadline(), Some(Timestamp(10)));
        assert_eq!(fx.pop_due_timer(), None, "nothing is due at time 0");
        fx.now = Timestamp(10);
        assert_eq!(fx.pop_due_timer(), Some(Timer::Destination(name("b.test"))));
        assert_eq!(fx.pop_due_timer(), Some(Timer::CatchUpScan));
        assert_eq!(fx.pop_due_timer(), Some(Timer::WakeUpQueue));
        assert_eq!(fx.pop_due_timer(), None);
        assert_eq!(fx.next_deadline(), Some(Timestamp(20)));
    }

    #[test]
    fn requests_are_numbered_from_one_and_a_wrong_answer_keeps_them() {
        let mut fx = Effects::new(0);
        let first = fx.request(PendingRequest::Outstanding { after: None });
        let second = fx.request(PendingRequest::Transaction { destination: DestId(0) });
        assert_eq!((first, second), (RequestId(1), RequestId(2)));
        let pending = fx.take_request(second).unwrap();
        assert!(matches!(
            fx.wrong_answer(second, pending),
            InputError::WrongCompletion { expected: "transaction_done", .. }
        ));
        assert!(fx.take_request(second).is_ok(), "put back");
        assert!(matches!(fx.take_request(second), Err(InputError::UnknownRequest(_))));
    }

    #[test]
    fn compaction_keeps_one_row_per_key() {
        let room =
            |d: &str, r: &str, s| DestinationRoom { destination: name(d), room_id: r.into(), stream_ordering: s };
        let state = |d: &str, interval| DestinationState {
            destination: name(d),
            retry_last_ts: 0,
            retry_interval: interval,
            failure_ts: None,
            last_successful_stream_ordering: None,
        };
        let mut changes = Changes {
            destination_rooms: alloc::vec![room("b.test", "!r", 5), room("a.test", "!r", 3), room("b.test", "!r", 4)],
            destinations: alloc::vec![state("b.test", 1), state("a.test", 1), state("b.test", 2)],
            ..Changes::default()
        };
        compact(&mut changes);
        assert_eq!(changes.destination_rooms, alloc::vec![room("a.test", "!r", 3), room("b.test", "!r", 5)]);
        assert_eq!(changes.destinations, alloc::vec![state("a.test", 1), state("b.test", 2)], "the last write wins");
    }
}
