//! The global in-flight limit: at most `transactions_in_flight_max` transactions await an
//! answer at once, across all destinations (docs/design.md, "A global in-flight limit").
//! Destinations that find no free slot wait in line and are woken one per freed slot.

use alloc::collections::VecDeque;

use crate::directory::DestId;

#[derive(Debug, Default)]
pub(crate) struct InFlightLimiter {
    in_flight: u32,
    waiters: VecDeque<DestId>,
}

impl InFlightLimiter {
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Takes a slot for `name`, or puts it in line when all `max` are taken.
    pub(crate) fn try_acquire(&mut self, id: DestId, max: u32) -> bool {
        if self.in_flight >= max {
            self.waiters.push_back(id);
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// Frees a slot and hands it to the first in line that still waits (`claim` returns
    /// whether the destination was still waiting, and takes the slot for it if so).
    pub(crate) fn release(&mut self, claim: impl FnMut(DestId) -> bool) -> Option<DestId> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.wake_next(claim)
    }

    /// Whether a slot is free while destinations wait in line: one woken for a freed slot
    /// found nothing left to send (its transaction was abandoned for catch-up meanwhile).
    pub(crate) fn slot_idle(&self, max: u32) -> bool {
        self.in_flight < max && !self.waiters.is_empty()
    }

    /// Wakes the first in line that still waits, without freeing a slot.
    pub(crate) fn wake_next(&mut self, mut claim: impl FnMut(DestId) -> bool) -> Option<DestId> {
        while let Some(id) = self.waiters.pop_front() {
            if claim(id) {
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_handed_to_the_first_still_waiting() {
        let (a, b, c) = (DestId(0), DestId(1), DestId(2));
        let mut limiter = InFlightLimiter::default();
        assert!(limiter.try_acquire(a, 1));
        assert!(!limiter.try_acquire(b, 1));
        assert!(!limiter.try_acquire(c, 1));
        assert_eq!(limiter.in_flight(), 1);
        // b stopped waiting meanwhile (e.g. it was reset): the slot goes to c.
        assert_eq!(limiter.release(|id| id != b), Some(c));
        assert_eq!(limiter.in_flight(), 0, "the woken destination takes the slot when it sends");
        assert_eq!(limiter.release(|_| true), None);
        assert_eq!(limiter.in_flight(), 0, "never below zero");
    }
}
