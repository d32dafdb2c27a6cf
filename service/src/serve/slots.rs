//! Request slots shared fairly among destinations.
//!
//! The bound on transactions on the wire protects this process and the network, but a slot
//! held for a whole request timeout lets a few silent servers starve everyone: 64
//! destinations that accept connections and never answer would hold every slot for a minute.
//! Two rules keep healthy destinations flowing:
//!
//! - one host (the server name without its port) holds at most `per_host_max` slots, so one
//!   machine cannot pose as many destinations (`evil.example:1` … `:64`) to take them all;
//! - a request unanswered after `slow_after` gives its slot back and waits on among the slow
//!   requests, whose number is bounded separately; when that bound is reached too the attempt
//!   ends as timed out, and the core backs off from that destination as for any timeout.
//!
//! A healthy destination therefore waits at most about `slow_after` for a slot, however many
//! silent ones there are.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fedsend_core::TransactionResult;
use tokio::sync::Semaphore;

/// Limits of [`SendSlots`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLimits {
    /// Requests on the wire that are not yet slow, all destinations together.
    pub in_flight_max: usize,
    /// Slots one host may hold at once.
    pub per_host_max: usize,
    /// When an unanswered request counts as slow and gives its slot back.
    pub slow_after: Duration,
    /// Slow requests waiting at once; beyond it a request that turns slow is ended.
    pub slow_max: usize,
}

/// The slots. Shared by every send task.
#[derive(Debug)]
pub struct SendSlots {
    limits: SlotLimits,
    in_flight: Arc<Semaphore>,
    slow: Arc<Semaphore>,
    per_host: Mutex<BTreeMap<String, Arc<Semaphore>>>,
}

/// The host part of a server name: `[::1]:8448` → `[::1]`, `a.example:1` → `a.example`.
fn host_of(destination: &str) -> &str {
    if destination.starts_with('[') {
        return destination.find(']').map_or(destination, |end| &destination[..=end]);
    }
    destination.rsplit_once(':').map_or(destination, |(host, _)| host)
}

impl SendSlots {
    /// Slots with these limits (each at least 1).
    pub fn new(limits: SlotLimits) -> Self {
        Self {
            limits,
            in_flight: Arc::new(Semaphore::new(limits.in_flight_max.max(1))),
            slow: Arc::new(Semaphore::new(limits.slow_max.max(1))),
            per_host: Mutex::new(BTreeMap::new()),
        }
    }

    fn host_semaphore(&self, host: &str) -> Arc<Semaphore> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        let mut map = self.per_host.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            map.entry(host.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.limits.per_host_max.max(1)))),
        )
    }

    /// Forgets a host's semaphore once nobody holds or waits for it, so the map stays as
    /// small as the set of hosts with requests.
    fn release_host(&self, host: &str, semaphore: Arc<Semaphore>) {
        let mut map = self.per_host.lock().unwrap_or_else(PoisonError::into_inner);
        drop(semaphore);
        if map.get(host).is_some_and(|s| Arc::strong_count(s) == 1) {
            map.remove(host);
        }
    }

    /// Runs one attempt to `destination` under the slot rules.
    pub async fn run<F>(&self, destination: &str, attempt: F) -> TransactionResult
    where
        F: Future<Output = TransactionResult>,
    {
        let host = host_of(destination);
        let host_semaphore = self.host_semaphore(host);
        let result = {
            // Semaphores here are never closed, so acquiring only waits.
            let _host_slot = host_semaphore.acquire().await.expect("never closed");
            let in_flight = Arc::clone(&self.in_flight).acquire_owned().await.expect("never closed");
            let mut attempt = std::pin::pin!(attempt);
            tokio::select! {
                result = &mut attempt => result,
                () = tokio::time::sleep(self.limits.slow_after) => {
                    match Arc::clone(&self.slow).try_acquire_owned() {
                        Ok(slow) => {
                            drop(in_flight);
                            let result = attempt.await;
                            drop(slow);
                            result
                        }
                        Err(_) => TransactionResult::Timeout,
                    }
                }
            }
        };
        self.release_host(host, host_semaphore);
        result
    }

    /// Requests currently holding a not-yet-slow slot.
    pub fn in_flight(&self) -> usize {
        self.limits.in_flight_max.max(1) - self.in_flight.available_permits()
    }

    /// Hosts with requests holding or waiting for a slot.
    pub fn hosts(&self) -> usize {
        self.per_host.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn limits(in_flight_max: usize, per_host_max: usize, slow_max: usize) -> SlotLimits {
        SlotLimits { in_flight_max, per_host_max, slow_after: Duration::from_secs(5), slow_max }
    }

    fn ok() -> TransactionResult {
        TransactionResult::Ok { pdu_errors: BTreeMap::new() }
    }

    #[test]
    fn the_host_is_the_name_without_its_port() {
        assert_eq!(host_of("a.example:1"), "a.example");
        assert_eq!(host_of("a.example"), "a.example");
        assert_eq!(host_of("[::1]:8448"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
        assert_eq!(host_of("127.0.0.1:8448"), "127.0.0.1");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_servers_give_their_slots_to_a_healthy_one_after_the_slow_limit() {
        let slots = Arc::new(SendSlots::new(limits(4, 8, 100)));
        for i in 0..20 {
            let slots = Arc::clone(&slots);
            tokio::spawn(async move { slots.run(&format!("silent{i}.example"), pending()).await });
        }
        tokio::task::yield_now().await;
        assert_eq!(slots.in_flight(), 4, "the silent servers took every slot");
        let started = tokio::time::Instant::now();
        assert_eq!(slots.run("healthy.example", async { ok() }).await, ok());
        let waited = started.elapsed();
        // 20 silent servers through 4 slots turn slow in 5 rounds of 5 s at most.
        assert!(waited <= Duration::from_secs(25), "waited {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_host_cannot_take_every_slot_with_many_ports() {
        let slots = Arc::new(SendSlots::new(limits(64, 8, 100)));
        for port in 1..=64 {
            let slots = Arc::clone(&slots);
            tokio::spawn(async move { slots.run(&format!("evil.example:{port}"), pending()).await });
        }
        tokio::task::yield_now().await;
        assert_eq!(slots.in_flight(), 8, "one host holds at most its share");
        let started = tokio::time::Instant::now();
        assert_eq!(slots.run("healthy.example", async { ok() }).await, ok());
        assert_eq!(started.elapsed(), Duration::ZERO, "a free slot is taken at once");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_requests_beyond_their_bound_end_as_timeouts() {
        let slots = Arc::new(SendSlots::new(limits(2, 8, 1)));
        let ended = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (slots, ended) = (Arc::clone(&slots), Arc::clone(&ended));
            tasks.push(tokio::spawn(async move {
                let result = slots.run(&format!("silent{i}.example"), pending()).await;
                ended.fetch_add(1, Ordering::SeqCst);
                result
            }));
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        // One slow request may wait on; the others were ended.
        assert_eq!(ended.load(Ordering::SeqCst), 2);
        for task in tasks.into_iter().filter(|t| t.is_finished()) {
            assert_eq!(task.await.unwrap(), TransactionResult::Timeout);
        }
        assert_eq!(slots.in_flight(), 0, "slow requests hold no in-flight slot");
    }

    #[tokio::test(start_paused = true)]
    async fn answered_requests_release_everything() {
        let slots = SendSlots::new(limits(2, 1, 1));
        for _ in 0..10 {
            assert_eq!(slots.run("a.example:1", async { ok() }).await, ok());
        }
        assert_eq!(slots.in_flight(), 0);
        assert_eq!(slots.hosts(), 0, "idle hosts are forgotten");
    }
}
