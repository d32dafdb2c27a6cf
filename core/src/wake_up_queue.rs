//! The staggered wake-up queue, Synapse's `_DestinationWakeupQueue` in
//! `federation/sender/__init__.py`: low-priority data (receipts in big rooms, presence,
//! device-list changes) wakes destinations one at a time, so a receipt in a room with
//! thousands of servers does not open thousands of connections at once. Every queued
//! destination is woken within 30 s, at most one per 1/`rr_transactions_per_room_per_second`.

use alloc::collections::{BTreeSet, VecDeque};

use crate::effects::{Effects, Timer};
use crate::types::ServerName;

/// Longest a destination waits in the queue.
const TIME_IN_QUEUE_MAX_MS: u64 = 30_000;

#[derive(Debug, Default)]
pub(crate) struct WakeUpQueue {
    queue: VecDeque<ServerName>,
    members: BTreeSet<ServerName>,
    /// A wake is scheduled: the queue drains on its timer.
    processing: bool,
    sleep_ms: u64,
}

impl WakeUpQueue {
    /// Queues `name` (once) and starts draining if idle. `has_work` tells whether a
    /// destination still has something to send when its turn comes.
    pub(crate) fn add(
        &mut self,
        name: ServerName,
        interval_ms: u64,
        fx: &mut Effects,
        has_work: impl Fn(&ServerName) -> bool,
    ) {
        if self.members.insert(name.clone()) {
            self.queue.push_back(name);
        }
        if !self.processing {
            self.processing = true;
            let spread_ms = TIME_IN_QUEUE_MAX_MS / self.queue.len().max(1) as u64;
            self.sleep_ms = interval_ms.min(spread_ms);
            self.step(fx, has_work);
        }
    }

    /// Wakes the oldest queued destination that still has something to send, then sleeps.
    pub(crate) fn step(&mut self, fx: &mut Effects, has_work: impl Fn(&ServerName) -> bool) {
        while let Some(name) = self.queue.pop_front() {
            self.members.remove(&name);
            // Someone else's transaction already took the data: no sleep for this one.
            if !has_work(&name) {
                continue;
            }
            fx.mark_dirty(name);
            // Sleep after every wake, even the last: a destination queued meanwhile waits its
            // turn instead of starting a new burst.
            if !self.queue.is_empty() {
                let spread_ms = TIME_IN_QUEUE_MAX_MS / self.queue.len() as u64;
                self.sleep_ms = self.sleep_ms.min(spread_ms);
            }
            self.sleep_ms = self.sleep_ms.max(1);
            fx.set_timer(fx.now.plus_ms(self.sleep_ms), Timer::WakeUpQueue);
            return;
        }
        self.processing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;

    fn name(text: &str) -> ServerName {
        ServerName::parse(text).unwrap()
    }

    #[test]
    fn destinations_are_woken_one_per_interval_and_empty_ones_skipped() {
        let mut fx = Effects::new(0);
        let mut queue = WakeUpQueue::default();
        let has_work = |n: &ServerName| *n != name("empty.test");
        queue.add(name("a.test"), 100, &mut fx, has_work);
        assert_eq!(fx.pop_dirty_name(), Some(name("a.test")), "the first goes at once");
        queue.add(name("empty.test"), 100, &mut fx, has_work);
        queue.add(name("b.test"), 100, &mut fx, has_work);
        queue.add(name("b.test"), 100, &mut fx, has_work);
        assert_eq!(fx.pop_dirty_name(), None, "the others wait for the timer");
        assert_eq!(fx.next_deadline(), Some(Timestamp(100)));
        fx.now = Timestamp(100);
        assert_eq!(fx.pop_due_timer(), Some(Timer::WakeUpQueue));
        queue.step(&mut fx, has_work);
        assert_eq!(fx.pop_dirty_name(), Some(name("b.test")), "the empty one is skipped without a sleep");
        fx.now = Timestamp(200);
        assert_eq!(fx.pop_due_timer(), Some(Timer::WakeUpQueue));
        queue.step(&mut fx, has_work);
        assert_eq!(fx.next_deadline(), None, "drained: no more timers");
        assert!(!queue.processing);
    }

    #[test]
    fn a_long_queue_is_spread_over_thirty_seconds() {
        let mut fx = Effects::new(0);
        let mut queue = WakeUpQueue::default();
        queue.queue.extend((0..600).map(|i| name(&alloc::format!("s{i}.test"))));
        queue.add(name("last.test"), 1_000, &mut fx, |_| true);
        assert_eq!(fx.next_deadline(), Some(Timestamp(TIME_IN_QUEUE_MAX_MS / 601)));
    }
}
