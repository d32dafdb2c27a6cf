//! The driver's [`Store`] over Synapse's PostgreSQL tables.
//!
//! The driver performs storage calls one at a time from its own task, synchronously; this
//! adapter runs each asynchronous query to completion on the runtime from inside that task
//! (`block_in_place`, so the runtime's other workers keep serving requests and replication).
//! Cache invalidations that a write produced are announced on Redis afterwards, as Synapse's
//! own streamer does for rows already committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fedsend_core::{CatchUpRoom, Changes, PduInfo, Recovered, ServerName};
use fedsend_synapse::pg::{DeviceListOptions, Ownership, PgError, SynapseDb};
use fedsend_synapse::redis_link::{ExternalCache, Publisher};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::serve::driver::now_ms;
use crate::serve::store::{Added, NewEvent, Store, StoreError};

/// Longest a storage call may take before it counts as failed.
const STORE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The newest events position the writer announced on replication, shared by the feeder
/// (which raises it before telling the core) and the store (which never reads past it).
///
/// Synapse persists events in concurrent transactions, so `events` can show a row while one
/// below it is still uncommitted; the position replication announces is one below which
/// everything is persisted. Reading past it, the core would move beyond the late event for
/// good: with 4 rooms written by 8 clients at once, about 1 event in 100 never left.
#[derive(Clone, Debug, Default)]
pub struct AnnouncedEvents(Arc<AtomicU64>);

impl AnnouncedEvents {
    /// The position, 0 before the first announcement.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Raises the position to `up_to` (never lowers it); returns the position now.
    pub fn raise(&self, up_to: u64) -> u64 {
        self.0.fetch_max(up_to, Ordering::AcqRel).max(up_to)
    }
}

/// Synapse's tables seen through the core's storage boundary.
pub struct SynapseStore {
    db: SynapseDb,
    ownership: Ownership,
    devices: DeviceListOptions,
    joined_hosts_cache: ExternalCache,
    publisher: Publisher,
    announced: AnnouncedEvents,
    runtime: Handle,
}

impl std::fmt::Debug for SynapseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynapseStore").field("instance", &self.ownership.instance).finish_non_exhaustive()
    }
}

fn backend(error: PgError) -> StoreError {
    StoreError::Backend(error.to_string())
}

impl SynapseStore {
    /// The store of `ownership.instance`; must be built inside the runtime.
    pub fn new(
        db: SynapseDb,
        ownership: Ownership,
        devices: DeviceListOptions,
        joined_hosts_cache: ExternalCache,
        publisher: Publisher,
        announced: AnnouncedEvents,
    ) -> Self {
        Self { db, ownership, devices, joined_hosts_cache, publisher, announced, runtime: Handle::current() }
    }

    /// Runs a query to completion, with a bound: a storage call that never returns would
    /// stop the whole sender, one that fails is retried by the core.
    fn wait<T>(&self, future: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        tokio::task::block_in_place(|| {
            self.runtime.block_on(async {
                tokio::time::timeout(STORE_CALL_TIMEOUT, future).await.unwrap_or_else(|_| {
                    Err(StoreError::Backend(format!(
                        "no answer from PostgreSQL within {} s",
                        STORE_CALL_TIMEOUT.as_secs()
                    )))
                })
            })
        })
    }
}

impl Store for SynapseStore {
    fn recovered(&mut self) -> Result<Recovered, StoreError> {
        self.wait(async { self.db.recovered(&self.ownership, &self.devices).await.map_err(backend) })
    }

    fn apply(&mut self, changes: &Changes) -> Result<(), StoreError> {
        let invalidations =
            self.wait(async { self.db.apply(changes, &self.ownership.instance, now_ms()).await.map_err(backend) })?;
        if invalidations.is_empty() {
            return Ok(());
        }
        // Committed already: announcing is best effort, as other processes also read the
        // invalidation stream back from the database when they notice a gap.
        let publisher = self.publisher.clone();
        self.runtime.spawn(async move {
            for invalidation in invalidations {
                let keys: Vec<serde_json::Value> =
                    invalidation.keys.iter().map(|k| serde_json::Value::String(k.clone())).collect();
                let ts = i64::try_from(invalidation.invalidation_ts).unwrap_or(i64::MAX);
                if let Err(e) =
                    publisher.cache_invalidated(invalidation.stream_id, &invalidation.cache_func, Some(&keys), ts).await
                {
                    debug!("cache invalidation {} not announced: {e}", invalidation.stream_id);
                }
            }
        });
        Ok(())
    }

    fn add_event(&mut self, _event: &NewEvent) -> Result<Added, StoreError> {
        Err(StoreError::Invalid("a Synapse worker reads events from Synapse's database; nothing is submitted".into()))
    }

    fn set_partial_state(&mut self, _room_id: &str, _servers: Option<&[ServerName]>) -> Result<(), StoreError> {
        Err(StoreError::Invalid("a Synapse worker reads partial-state rooms from Synapse's database".into()))
    }

    /// What replication announced (0 before it did): the newest row of `events` may have
    /// uncommitted ones below it (see [`AnnouncedEvents`]).
    fn max_stream_ordering(&mut self) -> Result<u64, StoreError> {
        Ok(self.announced.get())
    }

    fn fetch_events(&mut self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StoreError> {
        let up_to = self.announced.get();
        if up_to <= after {
            return Ok(Vec::new());
        }
        let db = self.db.clone();
        let cache = &self.joined_hosts_cache;
        self.wait(async move {
            // The event creator caches who was joined before each event for an hour; state
            // groups are the fallback.
            let mut cached_hosts = HashMap::new();
            for event in db.new_event_ids(after, up_to, limit).await.map_err(backend)? {
                match cache.joined_hosts_before_event(&event.event_id).await {
                    Ok(Some(hosts)) => {
                        let hosts: Vec<ServerName> = hosts.iter().filter_map(|h| ServerName::parse(h).ok()).collect();
                        cached_hosts.insert(event.event_id, hosts);
                    }
                    Ok(None) => {}
                    Err(e) => warn!("joined-hosts cache unavailable, using state groups: {e}"),
                }
            }
            db.fetch_events(after, up_to, limit, &cached_hosts).await.map_err(backend)
        })
    }

    fn load_catch_up(
        &mut self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StoreError> {
        self.wait(async { self.db.load_catch_up(destination, after, up_to, limit).await.map_err(backend) })
    }

    fn outstanding(&mut self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StoreError> {
        self.wait(async { self.db.outstanding(&self.ownership, after, limit).await.map_err(backend) })
    }
}
