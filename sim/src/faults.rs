//! Seeded fault injection for the simulator: the network and storage misbehave on purpose.

use fedsend_core::Prng;

/// How often each fault strikes, in per-mille of the opportunities, and how hard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRates {
    /// An answer is lost on the way back (the remote did process the request): a timeout.
    pub drop_permille: u64,
    /// The remote answers 500.
    pub error_permille: u64,
    /// The remote answers 429 with a `retry_after_ms`.
    pub rate_limit_permille: u64,
    /// Extra latency of an answer, up to this.
    pub latency_max_ms: u64,
    /// Storage answers (acks and queries) arrive up to this late, so a crash can lose writes.
    pub storage_latency_max_ms: u64,
    /// Storage fails a request.
    pub storage_failure_permille: u64,
}

/// What the faults did, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Answers lost (timeouts).
    pub drops: u64,
    /// Injected 500s.
    pub errors: u64,
    /// Injected 429s.
    pub rate_limits: u64,
    /// Storage requests failed.
    pub storage_failures: u64,
    /// Storage answers delayed.
    pub storage_delays: u64,
    /// Scenario-level faults: unreachable periods, timeouts, 5xx/429/410 phases.
    pub remote_outages: u64,
    /// Poison items injected.
    pub poisons: u64,
    /// Sender crashes.
    pub crashes: u64,
    /// Writes lost in crashes.
    pub lost_writes: u64,
}

/// The live fault injector of a world.
#[derive(Debug)]
pub(crate) struct Faults {
    pub(crate) rates: FaultRates,
    pub(crate) prng: Prng,
    /// Off once the simulation heals.
    pub(crate) active: bool,
    pub(crate) counts: FaultCounts,
}

/// What happens to one answer of a remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mishap {
    None,
    Drop,
    Error,
    RateLimit { retry_after_ms: u64 },
}

impl Faults {
    pub(crate) fn new(rates: FaultRates, seed: u64) -> Self {
        Self { rates, prng: Prng::from_seed(seed), active: true, counts: FaultCounts::default() }
    }

    fn roll(&mut self, permille: u64) -> bool {
        self.active && permille > 0 && self.prng.range_inclusive(0, 999) < permille
    }

    pub(crate) fn mishap(&mut self) -> Mishap {
        if self.roll(self.rates.drop_permille) {
            self.counts.drops += 1;
            Mishap::Drop
        } else if self.roll(self.rates.error_permille) {
            self.counts.errors += 1;
            Mishap::Error
        } else if self.roll(self.rates.rate_limit_permille) {
            self.counts.rate_limits += 1;
            Mishap::RateLimit { retry_after_ms: self.prng.range_inclusive(100, 30_000) }
        } else {
            Mishap::None
        }
    }

    pub(crate) fn latency_ms(&mut self) -> u64 {
        if !self.active || self.rates.latency_max_ms == 0 {
            return 0;
        }
        self.prng.range_inclusive(0, self.rates.latency_max_ms)
    }

    pub(crate) fn storage_delay_ms(&mut self) -> u64 {
        if !self.active || self.rates.storage_latency_max_ms == 0 {
            return 0;
        }
        let delay = self.prng.range_inclusive(0, self.rates.storage_latency_max_ms);
        if delay > 0 {
            self.counts.storage_delays += 1;
        }
        delay
    }

    pub(crate) fn storage_fails(&mut self) -> bool {
        let fails = self.roll(self.rates.storage_failure_permille);
        if fails {
            self.counts.storage_failures += 1;
        }
        fails
    }
}
