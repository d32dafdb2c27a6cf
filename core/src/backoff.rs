//! A destination's backoff, the way Synapse's retry limiter keeps it (`retry_last_ts`,
//! `retry_interval`, `failure_ts`, in wall-clock milliseconds so operators can read them),
//! and the one retry-delay schedule for attempts of a frozen transaction.

use crate::config::Config;
use crate::io::DestinationState;
use crate::rng::Prng;
use crate::time::Timestamp;
use crate::types::ServerName;

/// Jitter applied to every delay: ×0.8 to ×1.4, as Synapse's retry limiter does.
const JITTER_LOW_PERMILLE: u64 = 800;
const JITTER_HIGH_PERMILLE: u64 = 1_400;

/// Delay before attempt `attempt + 1` of the same transaction: 4^attempt seconds, capped at
/// `http_retry_delay_max_ms`, jittered. Used both for HTTP-level retries after a 5xx or a
/// timeout and for the few retries of a transaction the destination rejected.
pub(crate) fn retry_delay_ms(rng: &mut Prng, attempt: u32, config: &Config) -> u64 {
    let schedule_ms = 4u64.saturating_pow(attempt).saturating_mul(1000).min(config.http_retry_delay_max_ms);
    rng.jitter(schedule_ms, JITTER_LOW_PERMILLE, JITTER_HIGH_PERMILLE)
}

/// The stored backoff of one destination. All zero/`None` means healthy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) retry_last_ts: u64,
    pub(crate) retry_interval_ms: u64,
    /// First failure of the current outage.
    pub(crate) failure_ts: Option<u64>,
}

impl Backoff {
    pub(crate) fn from_state(state: &DestinationState) -> Self {
        Self {
            retry_last_ts: state.retry_last_ts,
            retry_interval_ms: state.retry_interval,
            failure_ts: state.failure_ts,
        }
    }

    /// The stored row of a destination with this backoff.
    pub(crate) fn state(&self, name: &ServerName, last_successful: Option<u64>) -> DestinationState {
        DestinationState {
            destination: name.clone(),
            retry_last_ts: self.retry_last_ts,
            retry_interval: self.retry_interval_ms,
            failure_ts: self.failure_ts,
            last_successful_stream_ordering: last_successful,
        }
    }

    /// When the backoff ends, if the destination has one.
    pub(crate) fn retry_at(&self) -> Option<Timestamp> {
        (self.retry_last_ts != 0).then(|| Timestamp(self.retry_last_ts).plus_ms(self.retry_interval_ms))
    }

    /// Synapse's limiter: backed off while `retry_last_ts + retry_interval > now`.
    pub(crate) fn active(&self, now: Timestamp) -> bool {
        self.retry_at().is_some_and(|at| at > now)
    }

    /// Synapse's filter for ephemeral data: worth queueing for if due within `window_ms`.
    pub(crate) fn due_within(&self, now: Timestamp, window_ms: u64) -> bool {
        self.retry_at().is_none_or(|at| at <= now.plus_ms(window_ms))
    }

    pub(crate) fn is_failing(&self) -> bool {
        self.retry_last_ts != 0 || self.retry_interval_ms != 0 || self.failure_ts.is_some()
    }

    /// Forgets the outage (a 2xx, or the destination contacted us). Returns whether there
    /// was one, so the caller stores and reports the change only then.
    pub(crate) fn clear(&mut self) -> bool {
        let was_failing = self.is_failing();
        *self = Self::default();
        was_failing
    }

    /// Grows the backoff after a failure: `retry_interval_min_ms` the first time, then
    /// × `retry_multiplier` with jitter, within `[floor_ms, retry_interval_max_ms]`. Returns the
    /// new interval.
    pub(crate) fn grow(&mut self, now: Timestamp, rng: &mut Prng, config: &Config, floor_ms: Option<u64>) -> u64 {
        let interval = if self.retry_interval_ms > 0 {
            let grown = self.retry_interval_ms.saturating_mul(config.retry_multiplier);
            rng.jitter(grown, JITTER_LOW_PERMILLE, JITTER_HIGH_PERMILLE).min(config.retry_interval_max_ms)
        } else {
            config.retry_interval_min_ms
        };
        let interval = interval.max(floor_ms.unwrap_or(0)).min(config.retry_interval_max_ms);
        self.retry_interval_ms = interval;
        self.retry_last_ts = now.as_ms();
        self.failure_ts = self.failure_ts.or(Some(now.as_ms()));
        interval
    }

    /// Backed off for the longest interval there is: the destination waits until it
    /// contacts us.
    pub(crate) fn at_maximum(&self, config: &Config) -> bool {
        self.retry_interval_ms >= config.retry_interval_max_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new(ServerName::parse("us.test").unwrap())
    }

    #[test]
    fn retry_delays_grow_fourfold_with_jitter_up_to_the_cap() {
        let config = config();
        let mut rng = Prng::from_seed(1);
        for attempt in 1..6 {
            let base = 4u64.pow(attempt) * 1000;
            let expected = base.min(config.http_retry_delay_max_ms);
            let delay = retry_delay_ms(&mut rng, attempt, &config);
            assert!((expected * 8 / 10..=expected * 14 / 10).contains(&delay), "attempt {attempt}: {delay}");
        }
        assert!(retry_delay_ms(&mut rng, u32::MAX, &config) <= config.http_retry_delay_max_ms * 14 / 10);
    }

    #[test]
    fn backoff_grows_from_the_minimum_to_the_maximum_and_clears_once() {
        let config = config();
        let mut rng = Prng::from_seed(2);
        let mut backoff = Backoff::default();
        assert!(!backoff.is_failing() && !backoff.active(Timestamp(5)));
        let first = backoff.grow(Timestamp(1_000), &mut rng, &config, None);
        assert_eq!(first, config.retry_interval_min_ms);
        assert_eq!(backoff.failure_ts, Some(1_000));
        assert!(backoff.active(Timestamp(1_000)) && !backoff.active(Timestamp(1_000 + first)));
        assert!(!backoff.due_within(Timestamp(1_000), 0) && backoff.due_within(Timestamp(1_000), first));
        for step in 0..100 {
            backoff.grow(Timestamp(2_000 + step), &mut rng, &config, None);
        }
        assert_eq!(backoff.failure_ts, Some(1_000), "the outage started at the first failure");
        assert!(backoff.at_maximum(&config));
        assert!(backoff.clear());
        assert!(!backoff.clear(), "clearing a healthy destination changes nothing");
        assert_eq!(backoff, Backoff::default());
    }

    #[test]
    fn a_floor_lifts_the_interval_but_never_past_the_maximum() {
        let config = config();
        let mut rng = Prng::from_seed(3);
        let mut backoff = Backoff::default();
        let interval = backoff.grow(Timestamp(1), &mut rng, &config, Some(u64::MAX));
        assert_eq!(interval, config.retry_interval_max_ms);
        let state = backoff.state(&ServerName::parse("a.test").unwrap(), Some(7));
        assert_eq!(Backoff::from_state(&state), backoff);
        assert_eq!(state.last_successful_stream_ordering, Some(7));
    }
}
