//! The periodic catch-up scan, Synapse's `_wake_destinations_needing_catchup` in
//! `federation/sender/__init__.py`: every `catch_up_waker_period_ms`, page through the
//! destinations storage says are owed something (`LoadOutstanding`) and wake them one per
//! `catch_up_waker_interval_ms`, so a destination nobody wakes (no new events for it, no
//! contact) still gets what it missed. Each run also prunes to-device messages and device-list
//! changes that waited too long.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::vec::Vec;

use crate::config::Config;
use crate::destination::{Activity, Destination};
use crate::effects::{Effects, PendingRequest, Timer};
use crate::io::Output;
use crate::time::Timestamp;
use crate::types::ServerName;

#[derive(Debug)]
pub(crate) struct CatchUpScan {
    step: ScanStep,
    /// The last destination of the page loaded; the next page starts after it.
    cursor: Option<ServerName>,
    to_wake: VecDeque<ServerName>,
    run_started: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScanStep {
    /// The next run starts at this time.
    Scheduled(Timestamp),
    /// A page of destinations is being loaded.
    Loading,
    /// The next destination of the page is woken at this time.
    Waking(Timestamp),
}

/// What the sender does for the scan when its timer fires.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ScanAction {
    Nothing,
    /// A run starts: prune, then load the first page.
    StartRun,
    Wake(ServerName),
    LoadNextPage,
}

impl Default for CatchUpScan {
    /// The first run starts at once.
    fn default() -> Self {
        Self {
            step: ScanStep::Scheduled(Timestamp(0)),
            cursor: None,
            to_wake: VecDeque::new(),
            run_started: Timestamp(0),
        }
    }
}

impl CatchUpScan {
    pub(crate) fn tick(&mut self, fx: &mut Effects, config: &Config) -> ScanAction {
        let now = fx.now;
        match self.step {
            ScanStep::Scheduled(at) if at <= now => {
                self.run_started = now;
                self.cursor = None;
                ScanAction::StartRun
            }
            ScanStep::Waking(at) if at <= now => match self.to_wake.pop_front() {
                Some(name) => {
                    let next = now.plus_ms(config.catch_up_waker_interval_ms);
                    self.step = ScanStep::Waking(next);
                    fx.set_timer(next, Timer::CatchUpScan);
                    ScanAction::Wake(name)
                }
                None => ScanAction::LoadNextPage,
            },
            _ => ScanAction::Nothing,
        }
    }

    pub(crate) fn load_page(&mut self, fx: &mut Effects, config: &Config) {
        let after = self.cursor.clone();
        let request = fx.request(PendingRequest::Outstanding { after: after.clone() });
        self.step = ScanStep::Loading;
        let limit = config.catch_up_waker_page_max;
        fx.output(Output::LoadOutstanding { request, after, limit });
    }

    /// A page arrived. An empty page ends the run; otherwise the eligible destinations are
    /// woken in turn, the first at once: returns whether to tick now.
    pub(crate) fn page_loaded(
        &mut self,
        names: Vec<ServerName>,
        fx: &mut Effects,
        config: &Config,
        eligible: impl Fn(&ServerName) -> bool,
    ) -> bool {
        if names.is_empty() {
            let next = self.run_started.plus_ms(config.catch_up_waker_period_ms).max(fx.now);
            self.step = ScanStep::Scheduled(next);
            fx.set_timer(next, Timer::CatchUpScan);
            return false;
        }
        let cursor = self.cursor.clone();
        self.cursor = names.iter().max().cloned().max(cursor);
        self.to_wake.extend(names.into_iter().filter(|name| eligible(name)));
        self.step = ScanStep::Waking(fx.now);
        true
    }
}

impl Destination {
    /// A destination the scan found owed something: woken unless it is backed off or already
    /// on its way (maybe sleeping before an HTTP retry, which the scan must not cut short).
    /// Returns whether to drive it.
    pub(crate) fn wake_for_catch_up(&mut self, now: Timestamp) -> bool {
        if self.backoff.active(now) || self.holds_pdu_work() {
            return false;
        }
        self.wake();
        true
    }

    /// To-device messages for a destination failing longer than `to_device_prune_after_ms`
    /// are given up, so a dead server does not keep its outbox forever (docs/design.md,
    /// "Pruning to-device messages").
    pub(crate) fn prune_to_device(&mut self, name: &ServerName, fx: &mut Effects) {
        let in_flight = matches!(self.activity(), Activity::Sending(_));
        let frozen_to_device = self
            .queue
            .as_ref()
            .and_then(|q| q.frozen.as_ref())
            .is_some_and(|f| f.edus.iter().any(|e| e.outbox_id.is_some()));
        if frozen_to_device && !in_flight {
            // The frozen transaction cannot lose items: abandon it as catch-up does, which
            // puts its to-device messages back in the queue to be pruned below.
            self.start_catching_up(name, fx, true);
        }
        let pruned = self.queue.as_mut().map(|q| q.edus.take_all_to_device()).unwrap_or_default();
        let since = self.backoff.failure_ts.unwrap_or(0);
        for edu in &pruned {
            let reason = format!("pruned: the destination has been failing since {since}");
            self.give_up_edu(name, fx, edu, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::tests::{config, name};

    #[test]
    fn a_run_pages_through_destinations_and_wakes_them_in_turn() {
        let config = config();
        let mut fx = Effects::new(0);
        fx.now = Timestamp(1_000);
        let mut scan = CatchUpScan::default();
        assert_eq!(scan.tick(&mut fx, &config), ScanAction::StartRun);
        scan.load_page(&mut fx, &config);
        assert!(matches!(fx.poll_output(), Some(Output::LoadOutstanding { after: None, .. })));
        assert_eq!(scan.tick(&mut fx, &config), ScanAction::Nothing, "loading");
        let page = alloc::vec![name("a.test"), name("b.test"), name("c.test")];
        assert!(scan.page_loaded(page, &mut fx, &config, |n| *n != name("b.test")));
        assert_eq!(scan.tick(&mut fx, &config), ScanAction::Wake(name("a.test")));
        assert_eq!(scan.tick(&mut fx, &config), ScanAction::Nothing, "one per interval");
        fx.now = fx.now.plus_ms(config.catch_up_waker_interval_ms);
        assert_eq!(scan.tick(&mut fx, &config), ScanAction::Wake(name("c.test")));
        fx.now = fx.now.plus_ms(config.catch_up_waker_interval_ms);
        assert_eq!(scan.tick(&mut fx, &config), ScanAction::LoadNextPage);
        scan.load_page(&mut fx, &config);
        assert!(
            matches!(fx.poll_output(), Some(Output::LoadOutstanding { after: Some(a), .. }) if a == name("c.test"))
        );
        assert!(!scan.page_loaded(Vec::new(), &mut fx, &config, |_| true));
        assert_eq!(scan.step, ScanStep::Scheduled(Timestamp(1_000).plus_ms(config.catch_up_waker_period_ms)));
    }

    #[test]
    fn the_scan_never_cuts_a_retry_sleep_short() {
        let mut destination = Destination::default();
        destination.queue().activity = Activity::Sleeping(Timestamp(50));
        assert!(!destination.wake_for_catch_up(Timestamp(10)));
        assert_eq!(destination.activity(), Activity::Sleeping(Timestamp(50)));
        let mut idle = Destination::default();
        assert!(idle.wake_for_catch_up(Timestamp(10)));
        assert!(idle.catch_up.active, "woken with nothing in memory: look in storage");
    }
}
