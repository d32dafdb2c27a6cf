//! The sender's configuration: every limit, interval and policy knob, with Synapse's defaults.
//!
//! Names match the scenario format (docs/scenarios.md) and the native service's TOML
//! config; units are the last word of each name.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::types::ServerName;

/// Hard protocol limit: the Matrix spec forbids more than 50 PDUs per transaction.
pub(crate) const PDUS_PER_TRANSACTION_LIMIT: u32 = 50;
/// Hard protocol limit: the Matrix spec forbids more than 100 EDUs per transaction.
pub(crate) const EDUS_PER_TRANSACTION_LIMIT: u32 = 100;

/// Configuration of a [`crate::FederationSender`].
///
/// | key | default | meaning |
/// |---|---|---|
/// | `server_name` | required | our homeserver's name; events from other servers are never sent |
/// | `instance_name` | `"main"` | this sender's name among `instances` |
/// | `instances` | `["main"]` | all sender instances; destinations are sharded by SHA-256 (little-endian) of the name modulo their count |
/// | `seed` | `0` | seeds the PRNG behind every jitter |
/// | `retry_interval_min_ms` | 600 000 (10 min) | first per-destination backoff after a failed transaction |
/// | `retry_multiplier` | 2 | growth of the backoff per further failure, before jitter of ×0.8–1.4 |
/// | `retry_interval_max_ms` | 604 800 000 (7 days) | cap of the backoff |
/// | `catch_up_threshold_ms` | 3 600 000 (1 h) | a destination backed off for longer drops its in-memory queue and is caught up from storage; also the look-ahead of the retry filter |
/// | `rr_transactions_per_room_per_second` | 50 | staggering of low-priority wake-ups: at most one per 1/value seconds |
/// | `domain_whitelist` | `null` | if a list, only these servers get anything |
/// | `presence_enabled` | `true` | presence is sent only when enabled |
/// | `transactions_in_flight_max` | 128 | global cap on transactions awaiting an answer (D11) |
/// | `transaction_bytes_max` | 4 194 304 | cap on one transaction body (D8); an item too large on its own is dropped |
/// | `pdus_per_transaction_max` | 50 | at most 50 (spec) |
/// | `edus_per_transaction_max` | 100 | at most 100 (spec) |
/// | `http_retries_max` | 10 | retries of one transaction after a 5xx, 429, timeout or connection failure before the destination backs off |
/// | `http_retry_delay_max_ms` | 60 000 | cap of the delay before retry k, which is min(4^k s, cap) × jitter |
/// | `request_timeout_ms` | 60 000 | how long the transport waits for an answer (hosts enforce it; the core only documents it) |
/// | `poison_rejections_max` | 2 | after this many permanent rejections (4xx other than 401/408/429, or any 413) of one frozen transaction it is split to isolate the poison item (D7) |
/// | `pending_pdus_max` | 10 000 | PDUs held in memory per destination; beyond that the queue is dropped and the destination is caught up from storage, so memory stays bounded while a server is down |
/// | `to_device_prune_after_ms` | `null` (off) | to-device messages for a destination failing for longer than this are dropped (D14) |
/// | `device_list_prune_after_ms` | 86 400 000 (24 h) | a user with several device-list changes queued for one destination, the oldest queued longer ago than this, keeps only the newest and the destination resynchronises the user's list (Synapse's hourly pruning of outbound pokes); `null` turns it off |
/// | `events_batch_max` | 100 | events fetched per fan-out query |
/// | `catch_up_batch_max` | 50 | rooms fetched per catch-up query |
/// | `catch_up_waker_period_ms` | 60 000 | period of the scan for destinations with outstanding catch-up |
/// | `catch_up_waker_page_max` | 25 | destinations per page of that scan |
/// | `catch_up_waker_interval_ms` | 5 000 | pause between two destinations woken by the scan |
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // each key is documented in the table above, with its default
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct Config {
    pub server_name: ServerName,
    #[serde(default = "d::instance_name")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub instance_name: String,
    #[serde(default = "d::instances")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub instances: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub seed: u64,
    #[serde(default = "d::retry_interval_min_ms")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub retry_interval_min_ms: u64,
    #[serde(default = "d::retry_multiplier")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub retry_multiplier: u64,
    #[serde(default = "d::retry_interval_max_ms")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub retry_interval_max_ms: u64,
    #[serde(default = "d::catch_up_threshold_ms")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub catch_up_threshold_ms: u64,
    #[serde(default = "d::rr_transactions_per_room_per_second")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub rr_transactions_per_room_per_second: u64,
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub domain_whitelist: Option<Vec<ServerName>>,
    #[serde(default = "d::yes")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub presence_enabled: bool,
    #[serde(default = "d::transactions_in_flight_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub transactions_in_flight_max: u32,
    #[serde(default = "d::transaction_bytes_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub transaction_bytes_max: u64,
    #[serde(default = "d::pdus_per_transaction_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub pdus_per_transaction_max: u32,
    #[serde(default = "d::edus_per_transaction_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub edus_per_transaction_max: u32,
    #[serde(default = "d::http_retries_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub http_retries_max: u32,
    #[serde(default = "d::http_retry_delay_max_ms")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub http_retry_delay_max_ms: u64,
    #[serde(default = "d::request_timeout_ms")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub request_timeout_ms: u64,
    #[serde(default = "d::poison_rejections_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub poison_rejections_max: u32,
    #[serde(default = "d::pending_pdus_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub pending_pdus_max: u32,
    #[serde(default)]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub to_device_prune_after_ms: Option<u64>,
    #[serde(default = "d::device_list_prune_after_ms")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub device_list_prune_after_ms: Option<u64>,
    #[serde(default = "d::events_batch_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub events_batch_max: u32,
    #[serde(default = "d::catch_up_batch_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub catch_up_batch_max: u32,
    #[serde(default = "d::catch_up_waker_period_ms")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub catch_up_waker_period_ms: u64,
    #[serde(default = "d::catch_up_waker_page_max")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub catch_up_waker_page_max: u32,
    #[serde(default = "d::catch_up_waker_interval_ms")]
    #[cfg_attr(feature = "ts", ts(optional = nullable))]
    pub catch_up_waker_interval_ms: u64,
}

/// Default values, one function per key because serde's field defaults take functions.
mod d {
    use super::*;
    pub(super) fn instance_name() -> String {
        String::from("main")
    }
    pub(super) fn instances() -> Vec<String> {
        vec![instance_name()]
    }
    pub(super) fn retry_interval_min_ms() -> u64 {
        10 * 60 * 1000
    }
    pub(super) fn retry_multiplier() -> u64 {
        2
    }
    pub(super) fn retry_interval_max_ms() -> u64 {
        7 * 24 * 60 * 60 * 1000
    }
    pub(super) fn catch_up_threshold_ms() -> u64 {
        60 * 60 * 1000
    }
    pub(super) fn rr_transactions_per_room_per_second() -> u64 {
        50
    }
    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn transactions_in_flight_max() -> u32 {
        128
    }
    pub(super) fn transaction_bytes_max() -> u64 {
        4 * 1024 * 1024
    }
    pub(super) fn pdus_per_transaction_max() -> u32 {
        PDUS_PER_TRANSACTION_LIMIT
    }
    pub(super) fn edus_per_transaction_max() -> u32 {
        EDUS_PER_TRANSACTION_LIMIT
    }
    pub(super) fn http_retries_max() -> u32 {
        10
    }
    pub(super) fn http_retry_delay_max_ms() -> u64 {
        60_000
    }
    pub(super) fn request_timeout_ms() -> u64 {
        60_000
    }
    pub(super) fn poison_rejections_max() -> u32 {
        2
    }
    pub(super) fn pending_pdus_max() -> u32 {
        10_000
    }
    pub(super) fn device_list_prune_after_ms() -> Option<u64> {
        Some(86_400_000)
    }
    pub(super) fn events_batch_max() -> u32 {
        100
    }
    pub(super) fn catch_up_batch_max() -> u32 {
        50
    }
    pub(super) fn catch_up_waker_period_ms() -> u64 {
        60_000
    }
    pub(super) fn catch_up_waker_page_max() -> u32 {
        25
    }
    pub(super) fn catch_up_waker_interval_ms() -> u64 {
        5_000
    }
}

impl Config {
    /// A configuration with every default, for `server_name`.
    pub fn new(server_name: ServerName) -> Self {
        Self {
            server_name,
            instance_name: d::instance_name(),
            instances: d::instances(),
            seed: 0,
            retry_interval_min_ms: d::retry_interval_min_ms(),
            retry_multiplier: d::retry_multiplier(),
            retry_interval_max_ms: d::retry_interval_max_ms(),
            catch_up_threshold_ms: d::catch_up_threshold_ms(),
            rr_transactions_per_room_per_second: d::rr_transactions_per_room_per_second(),
            domain_whitelist: None,
            presence_enabled: true,
            transactions_in_flight_max: d::transactions_in_flight_max(),
            transaction_bytes_max: d::transaction_bytes_max(),
            pdus_per_transaction_max: d::pdus_per_transaction_max(),
            edus_per_transaction_max: d::edus_per_transaction_max(),
            http_retries_max: d::http_retries_max(),
            http_retry_delay_max_ms: d::http_retry_delay_max_ms(),
            request_timeout_ms: d::request_timeout_ms(),
            poison_rejections_max: d::poison_rejections_max(),
            pending_pdus_max: d::pending_pdus_max(),
            to_device_prune_after_ms: None,
            device_list_prune_after_ms: d::device_list_prune_after_ms(),
            events_batch_max: d::events_batch_max(),
            catch_up_batch_max: d::catch_up_batch_max(),
            catch_up_waker_period_ms: d::catch_up_waker_period_ms(),
            catch_up_waker_page_max: d::catch_up_waker_page_max(),
            catch_up_waker_interval_ms: d::catch_up_waker_interval_ms(),
        }
    }

    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, why: &'static str| Err(ConfigError { key, why });
        if !self.instances.is_empty() && !self.instances.contains(&self.instance_name) {
            return bad("instance_name", "must be one of `instances`");
        }
        if self.retry_interval_min_ms == 0 {
            return bad("retry_interval_min_ms", "must be at least 1");
        }
        if self.retry_multiplier == 0 {
            return bad("retry_multiplier", "must be at least 1");
        }
        if self.retry_interval_max_ms < self.retry_interval_min_ms {
            return bad("retry_interval_max_ms", "must not be below retry_interval_min_ms");
        }
        if self.rr_transactions_per_room_per_second == 0 {
            return bad("rr_transactions_per_room_per_second", "must be at least 1");
        }
        if self.transactions_in_flight_max == 0 {
            return bad("transactions_in_flight_max", "must be at least 1");
        }
        if self.transaction_bytes_max < 1024 {
            return bad("transaction_bytes_max", "must be at least 1024");
        }
        if !(1..=PDUS_PER_TRANSACTION_LIMIT).contains(&self.pdus_per_transaction_max) {
            return bad("pdus_per_transaction_max", "must be between 1 and 50");
        }
        if !(11..=EDUS_PER_TRANSACTION_LIMIT).contains(&self.edus_per_transaction_max) {
            return bad(
                "edus_per_transaction_max",
                "must be between 11 and 100 (10 slots are reserved for device lists)",
            );
        }
        if self.http_retry_delay_max_ms == 0 {
            return bad("http_retry_delay_max_ms", "must be at least 1 ms");
        }
        if self.request_timeout_ms == 0 {
            return bad("request_timeout_ms", "must be at least 1 ms");
        }
        if self.poison_rejections_max == 0 {
            return bad("poison_rejections_max", "must be at least 1");
        }
        if self.pending_pdus_max == 0 {
            return bad("pending_pdus_max", "must be at least 1");
        }
        for (key, size) in [
            ("events_batch_max", self.events_batch_max),
            ("catch_up_batch_max", self.catch_up_batch_max),
            ("catch_up_waker_page_max", self.catch_up_waker_page_max),
        ] {
            if size == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if self.catch_up_waker_period_ms == 0 {
            return bad("catch_up_waker_period_ms", "must be at least 1 ms");
        }
        if self.catch_up_waker_interval_ms == 0 {
            return bad("catch_up_waker_interval_ms", "must be at least 1 ms");
        }
        Ok(())
    }

    /// The pause between two staggered wake-ups: 1/`rr_transactions_per_room_per_second` s.
    pub(crate) fn wake_up_interval_ms(&self) -> u64 {
        (1000 / self.rr_transactions_per_room_per_second).max(1)
    }

    /// Whether this instance sends to `name`: within the whitelist, if any, and ours under
    /// the sharding of `instances`.
    pub(crate) fn handles(&self, name: &ServerName) -> bool {
        if let Some(whitelist) = &self.domain_whitelist
            && !whitelist.contains(name)
        {
            return false;
        }
        crate::shard::should_handle(&self.instances, &self.instance_name, name.as_str())
    }
}
