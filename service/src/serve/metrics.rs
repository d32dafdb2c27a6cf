//! Prometheus metrics. Counters use Synapse's names where the meaning matches, so existing
//! dashboards keep working; per-destination gauges are set from the core's figures (D12) at
//! every scrape.

use std::sync::{Arc, Mutex};

use fedsend_core::{DestinationPhase, DestinationStats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of per-destination gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabel {
    /// The destination server.
    pub destination: String,
}

/// How long one problem keeps `/health` degraded. Problems that persist (a wedged request
/// retried, storage down) are reported again on every retry, so the state lasts as long as
/// they do.
pub const HEALTH_PROBLEM_WINDOW_MS: u64 = 60_000;

/// How old the per-destination figures on `/metrics` may be.
pub const STATS_REFRESH_MS: u64 = 1_000;
/// How long after a scrape the driver keeps the figures fresh: taking them costs a pass over
/// every destination, not worth paying when nobody scrapes.
pub const STATS_WANTED_FOR_MS: u64 = 600_000;

/// The per-destination figures last taken by the driver, for `/metrics`.
#[derive(Debug, Default)]
struct StatsSnapshot {
    taken_at_ms: Option<u64>,
    stats: Arc<Vec<DestinationStats>>,
    wanted_at_ms: Option<u64>,
}

/// Something that went wrong and that an operator should see on `/health`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// When it was last seen (Unix ms).
    pub at_ms: u64,
    /// What it was.
    pub what: String,
}

/// Every metric of the service.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Synapse: transactions answered 2xx.
    pub sent_transactions: Counter,
    /// Synapse: PDUs times destinations delivered.
    pub sent_pdu_destinations: Counter,
    /// Synapse: EDUs delivered.
    pub sent_edus: Counter,
    /// Transaction attempts that failed (non-2xx, unreachable, timeout).
    pub failed_transactions: Counter,
    /// Events accepted by the ingest API.
    pub ingested_events: Counter,
    /// Store operations that failed.
    pub storage_failures: Counter,
    /// Answers the engine refused and outputs the host could not decode: a mismatch between
    /// what the host and the core exchange, which would otherwise leave a request unanswered.
    pub engine_refusals: Counter,
    /// Events from storage that can never be sent (unreadable, or nested too deeply).
    pub undeliverable_events: Counter,
    /// The newest problem that makes `/health` report degraded.
    problem: Mutex<Option<Problem>>,
    /// Taken by the driver between its other work, so a scrape never queues behind
    /// submissions.
    stats: Mutex<StatsSnapshot>,
    queued_pdus: Family<DestinationLabel, Gauge>,
    queued_edus: Family<DestinationLabel, Gauge>,
    oldest_pending_age_ms: Family<DestinationLabel, Gauge>,
    backoff_remaining_ms: Family<DestinationLabel, Gauge>,
    retry_interval_ms: Family<DestinationLabel, Gauge>,
    catching_up: Family<DestinationLabel, Gauge>,
    backing_off: Family<DestinationLabel, Gauge>,
    pending_destinations: Gauge,
    pending_pdus: Gauge,
    pending_edus: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sent_transactions = Counter::default();
        let sent_pdu_destinations = Counter::default();
        let sent_edus = Counter::default();
        let failed_transactions = Counter::default();
        let ingested_events = Counter::default();
        let storage_failures = Counter::default();
        let engine_refusals = Counter::default();
        let undeliverable_events = Counter::default();
        registry.register(
            "synapse_federation_client_sent_transactions",
            "Transactions delivered (2xx)",
            sent_transactions.clone(),
        );
        registry.register(
            "synapse_federation_client_sent_pdu_destinations",
            "PDUs delivered, counted once per destination",
            sent_pdu_destinations.clone(),
        );
        registry.register("synapse_federation_client_sent_edus", "EDUs delivered", sent_edus.clone());
        registry.register(
            "fedsend_failed_transaction_attempts",
            "Transaction attempts that failed",
            failed_transactions.clone(),
        );
        registry.register("fedsend_ingested_events", "Events accepted by the ingest API", ingested_events.clone());
        registry.register("fedsend_storage_failures", "Store operations that failed", storage_failures.clone());
        registry.register(
            "fedsend_engine_refusals",
            "Answers the engine refused or outputs the host could not decode",
            engine_refusals.clone(),
        );
        registry.register(
            "fedsend_undeliverable_events",
            "Stored events that can never be sent (unreadable or nested too deeply)",
            undeliverable_events.clone(),
        );
        let family = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<DestinationLabel, Gauge>::default();
            registry.register(name, help, family.clone());
            family
        };
        let queued_pdus =
            family(&mut registry, "fedsend_destination_queued_pdus", "PDUs held in memory per destination");
        let queued_edus =
            family(&mut registry, "fedsend_destination_queued_edus", "EDUs queued in memory per destination");
        let oldest_pending_age_ms =
            family(&mut registry, "fedsend_destination_oldest_pending_age_ms", "Age of the oldest queued PDU");
        let backoff_remaining_ms =
            family(&mut registry, "fedsend_destination_backoff_remaining_ms", "Time until the next attempt is allowed");
        let retry_interval_ms =
            family(&mut registry, "fedsend_destination_retry_interval_ms", "Current backoff interval");
        let catching_up = family(&mut registry, "fedsend_destination_catching_up", "1 while caught up from storage");
        let backing_off = family(&mut registry, "fedsend_destination_backing_off", "1 while backing off or gone");
        let pending_destinations = Gauge::default();
        let pending_pdus = Gauge::default();
        let pending_edus = Gauge::default();
        registry.register(
            "synapse_federation_transaction_queue_pending_destinations",
            "Destinations with a transaction in flight",
            pending_destinations.clone(),
        );
        registry.register(
            "synapse_federation_transaction_queue_pending_pdus",
            "PDUs queued in memory",
            pending_pdus.clone(),
        );
        registry.register(
            "synapse_federation_transaction_queue_pending_edus",
            "EDUs queued in memory",
            pending_edus.clone(),
        );
        Self {
            registry,
            sent_transactions,
            sent_pdu_destinations,
            sent_edus,
            failed_transactions,
            ingested_events,
            storage_failures,
            engine_refusals,
            undeliverable_events,
            problem: Mutex::new(None),
            stats: Mutex::new(StatsSnapshot::default()),
            queued_pdus,
            queued_edus,
            oldest_pending_age_ms,
            backoff_remaining_ms,
            retry_interval_ms,
            catching_up,
            backing_off,
            pending_destinations,
            pending_pdus,
            pending_edus,
        }
    }

    /// Records a problem for `/health`: it reports degraded until [`HEALTH_PROBLEM_WINDOW_MS`]
    /// pass without another.
    pub fn report_problem(&self, now_ms: u64, what: impl Into<String>) {
        let problem = Problem { at_ms: now_ms, what: what.into() };
        // A poisoned lock only means a panic elsewhere while holding it; the value is plain data.
        *self.problem.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(problem);
    }

    /// The problem `/health` reports at `now_ms`, if any is recent.
    pub fn recent_problem(&self, now_ms: u64) -> Option<Problem> {
        let problem = self.problem.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()?;
        (now_ms.saturating_sub(problem.at_ms) < HEALTH_PROBLEM_WINDOW_MS).then_some(problem)
    }

    /// A scrape at `now_ms` wants the per-destination figures: the latest the driver took, if
    /// it took any yet. From now on the driver keeps them fresh.
    pub fn want_stats(&self, now_ms: u64) -> Option<Arc<Vec<DestinationStats>>> {
        let mut snapshot = self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        snapshot.wanted_at_ms = Some(now_ms);
        snapshot.taken_at_ms.map(|_| Arc::clone(&snapshot.stats))
    }

    /// When the driver should take the figures again: `None` while nobody scrapes, else in
    /// how many milliseconds (0: now).
    pub fn stats_due_in_ms(&self, now_ms: u64) -> Option<u64> {
        let snapshot = self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wanted_at_ms = snapshot.wanted_at_ms?;
        if now_ms.saturating_sub(wanted_at_ms) > STATS_WANTED_FOR_MS {
            return None;
        }
        let age_ms = snapshot.taken_at_ms.map_or(u64::MAX, |taken| now_ms.saturating_sub(taken));
        Some(STATS_REFRESH_MS.saturating_sub(age_ms))
    }

    /// The driver took the figures at `now_ms`.
    pub fn publish_stats(&self, now_ms: u64, stats: Vec<DestinationStats>) {
        let mut snapshot = self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        snapshot.taken_at_ms = Some(now_ms);
        snapshot.stats = Arc::new(stats);
    }

    /// The text exposition, with gauges taken from `stats` at `now_ms`.
    pub fn render(&self, stats: &[DestinationStats], now_ms: u64) -> String {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (mut in_flight, mut pdus, mut edus) = (0, 0, 0);
        for s in stats {
            let label = DestinationLabel { destination: s.destination.to_string() };
            self.queued_pdus.get_or_create(&label).set(gauge(s.queued_pdus));
            self.queued_edus.get_or_create(&label).set(gauge(s.queued_edus));
            self.oldest_pending_age_ms.get_or_create(&label).set(gauge(s.oldest_pending_age_ms.unwrap_or(0)));
            let remaining = s.backoff_until_ts.map_or(0, |until| until.saturating_sub(now_ms));
            self.backoff_remaining_ms.get_or_create(&label).set(gauge(remaining));
            self.retry_interval_ms.get_or_create(&label).set(gauge(s.retry_interval_ms));
            self.catching_up.get_or_create(&label).set(i64::from(s.catching_up));
            let backing_off = matches!(s.state, DestinationPhase::BackingOff | DestinationPhase::Gone);
            self.backing_off.get_or_create(&label).set(i64::from(backing_off));
            in_flight += i64::from(s.in_flight);
            pdus += gauge(s.queued_pdus);
            edus += gauge(s.queued_edus);
        }
        self.pending_destinations.set(in_flight);
        self.pending_pdus.set(pdus);
        self.pending_edus.set(edus);
        let mut text = String::new();
        // Writing into a String cannot fail.
        encode(&mut text, &self.registry).expect("encoding into a String");
        text
    }
}
