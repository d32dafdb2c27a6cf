//! The sender-owned state: loaded at start-up as [`Recovered`], written from `Persist`
//! batches as [`Changes`], both in Synapse's tables.

use fedsend_core::{Changes, DestinationState, DeviceListPokeKey, Recovered, ServerName};
use serde_json::{Value, json};
use tracing::warn;

use super::devices::{self, DeviceListOptions};
use super::{Ownership, PgError, SynapseDb, to_i64, to_u64};

/// The cache Synapse's other processes keep of `destinations` rows, invalidated whenever this
/// instance writes retry timings.
const RETRY_TIMINGS_CACHE: &str = "get_destination_retry_timings";

/// A cache invalidation written to `cache_invalidation_stream_by_instance` in the same
/// transaction as the write it announces; publish it as
/// `RDATA caches <instance> <stream_id> <row>` once the transaction committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheInvalidation {
    /// Position in Synapse's `caches` stream.
    pub stream_id: i64,
    /// The cached function whose entries are stale.
    pub cache_func: String,
    /// The stale entry's key.
    pub keys: Vec<String>,
    /// When it was written (Unix ms).
    pub invalidation_ts: u64,
}

impl CacheInvalidation {
    /// The `caches` stream row: `[cache_func, keys, invalidation_ts]`.
    pub fn row(&self) -> Value {
        json!([self.cache_func, self.keys, self.invalidation_ts])
    }
}

impl SynapseDb {
    /// Creates the `fedsend` schema and its table if missing (idempotent).
    async fn ensure_own_schema(&self) -> Result<(), PgError> {
        let client = self.pool.get().await?;
        client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS fedsend;
                 CREATE TABLE IF NOT EXISTS fedsend.sender_instances (
                     instance_name TEXT PRIMARY KEY,
                     incarnation BIGINT NOT NULL)",
            )
            .await?;
        Ok(())
    }

    /// Makes `federation_stream_position` hold exactly one row per type for each configured
    /// instance, as Synapse does at start-up: when the instances in the table differ from the
    /// configured ones, every type restarts from the lowest position any instance reached, so
    /// an instance taking over from another (or from Synapse's own sender) resends rather than
    /// skips. Does nothing when this instance is not configured.
    pub async fn reset_federation_positions(&self, ownership: &Ownership) -> Result<(), PgError> {
        let configured: Vec<String> =
            if ownership.instances.is_empty() { vec![ownership.instance.clone()] } else { ownership.instances.clone() };
        if !configured.contains(&ownership.instance) {
            return Ok(());
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Two instances starting together must not both see the old set and race.
        tx.batch_execute("LOCK TABLE federation_stream_position IN SHARE ROW EXCLUSIVE MODE").await?;
        let stmt = tx.prepare_cached("SELECT DISTINCT instance_name FROM federation_stream_position").await?;
        let mut in_table: Vec<String> = tx.query(&stmt, &[]).await?.iter().map(|r| r.get(0)).collect();
        in_table.sort();
        let mut wanted = configured.clone();
        wanted.sort();
        wanted.dedup();
        if in_table == wanted {
            return Ok(());
        }
        let stmt =
            tx.prepare_cached("SELECT type, MIN(stream_id) FROM federation_stream_position GROUP BY type").await?;
        let minimums: Vec<(String, i64)> = tx.query(&stmt, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
        if minimums.is_empty() {
            return Err(PgError::Data(
                "federation_stream_position is empty: Synapse seeds it when creating its schema".into(),
            ));
        }
        let stmt =
            tx.prepare_cached("DELETE FROM federation_stream_position WHERE NOT (instance_name = ANY($1))").await?;
        tx.execute(&stmt, &[&configured]).await?;
        let stmt = tx
            .prepare_cached(
                "INSERT INTO federation_stream_position (type, stream_id, instance_name) VALUES ($1, $2, $3)
                 ON CONFLICT (type, instance_name) DO UPDATE SET stream_id = EXCLUDED.stream_id",
            )
            .await?;
        for (kind, position) in &minimums {
            tx.execute(&stmt, &[kind, position, &ownership.instance]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Whether `destination`'s stored backoff is cleared (no row, or a row without retry
    /// timings): another process heard from it and marked it up.
    pub async fn retry_timings_cleared(&self, destination: &str) -> Result<bool, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT coalesce(retry_last_ts, 0), coalesce(retry_interval, 0) FROM destinations WHERE destination = $1")
            .await?;
        Ok(client.query_opt(&stmt, &[&destination]).await?.is_none_or(|row| {
            let (last_ts, interval): (i64, i64) = (row.get(0), row.get(1));
            last_ts == 0 && interval == 0
        }))
    }

    /// Everything a starting core needs, for the destinations this instance owns. Runs the
    /// start-up position reset first.
    pub async fn recovered(&self, ownership: &Ownership, options: &DeviceListOptions) -> Result<Recovered, PgError> {
        self.ensure_own_schema().await?;
        self.reset_federation_positions(ownership).await?;
        let client = self.pool.get().await?;
        let stmt =
            client.prepare_cached("SELECT incarnation FROM fedsend.sender_instances WHERE instance_name = $1").await?;
        let incarnation =
            client.query_opt(&stmt, &[&ownership.instance]).await?.and_then(|r| to_u64(r.get(0))).unwrap_or(0);
        let stmt = client
            .prepare_cached(
                "SELECT stream_id FROM federation_stream_position WHERE type = 'events' AND instance_name = $1",
            )
            .await?;
        let events_out_pos = client.query_opt(&stmt, &[&ownership.instance]).await?.and_then(|r| to_u64(r.get(0)));
        let stmt = client
            .prepare_cached(
                "SELECT destination, retry_last_ts, retry_interval, failure_ts, last_successful_stream_ordering
                 FROM destinations ORDER BY destination",
            )
            .await?;
        let mut destinations = Vec::new();
        for row in client.query(&stmt, &[]).await? {
            let name: String = row.get(0);
            if !ownership.owns(&name) {
                continue;
            }
            let Ok(destination) = ServerName::parse(&name) else {
                warn!(destination = %name, "skipping a destinations row whose name is not a server name");
                continue;
            };
            let number = |i: usize| row.get::<_, Option<i64>>(i).and_then(to_u64);
            destinations.push(DestinationState {
                destination,
                retry_last_ts: number(1).unwrap_or(0),
                retry_interval: number(2).unwrap_or(0),
                failure_ts: number(3),
                last_successful_stream_ordering: number(4),
            });
        }
        drop(client);
        let to_device_outbox = self.to_device_rows(ownership, 0, u32::MAX).await?.rows;
        let device_list_pokes = self.device_list_pokes(ownership, 0, u32::MAX, options).await?.rows;
        let device_list_positions = self.device_list_positions(ownership).await?;
        Ok(Recovered {
            incarnation,
            events_out_pos,
            destinations,
            to_device_outbox,
            device_list_pokes,
            device_list_positions,
        })
    }

    /// Applies one `Persist` batch in one transaction as instance `instance_name`. Returns
    /// the cache invalidations written for destinations whose retry timings changed, to
    /// publish on the replication stream after the commit.
    pub async fn apply(
        &self,
        changes: &Changes,
        instance_name: &str,
        now_ms: u64,
    ) -> Result<Vec<CacheInvalidation>, PgError> {
        // Every field named: a field the core adds later fails this build instead of being
        // acknowledged as durable without being written.
        let Changes {
            incarnation,
            events_out_pos,
            destination_rooms,
            destinations,
            to_device_outbox,
            to_device_deleted,
            device_list_pokes,
            device_list_pokes_deleted,
            device_list_positions,
        } = changes;
        // Synapse's main process writes these when a client submits them; a sender instance
        // only delivers and deletes them.
        if !to_device_outbox.is_empty() {
            return Err(PgError::Unsupported("to_device_outbox inserts"));
        }
        if !device_list_pokes.is_empty() {
            return Err(PgError::Unsupported("device_list_pokes upserts"));
        }
        let now = to_i64(now_ms, "now")?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if let Some(incarnation) = incarnation {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO fedsend.sender_instances (instance_name, incarnation) VALUES ($1, $2)
                     ON CONFLICT (instance_name) DO UPDATE
                     SET incarnation = GREATEST(fedsend.sender_instances.incarnation, EXCLUDED.incarnation)",
                )
                .await?;
            tx.execute(&stmt, &[&instance_name, &to_i64(*incarnation, "incarnation")?]).await?;
        }
        if let Some(position) = events_out_pos {
            // Synapse's own update requires the row, which the start-up reset guarantees;
            // the upsert also covers an instance that was never reset.
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO federation_stream_position (type, stream_id, instance_name) VALUES ('events', $1, $2)
                     ON CONFLICT (type, instance_name) DO UPDATE
                     SET stream_id = GREATEST(federation_stream_position.stream_id, EXCLUDED.stream_id)",
                )
                .await?;
            tx.execute(&stmt, &[&to_i64(*position, "events_out_pos")?, &instance_name]).await?;
        }
        if !destination_rooms.is_empty() {
            let bare = tx
                .prepare_cached(
                    "INSERT INTO destinations (destination) VALUES ($1) ON CONFLICT (destination) DO NOTHING",
                )
                .await?;
            let upsert = tx
                .prepare_cached(
                    "INSERT INTO destination_rooms (destination, room_id, stream_ordering) VALUES ($1, $2, $3)
                     ON CONFLICT (destination, room_id) DO UPDATE
                     SET stream_ordering = GREATEST(destination_rooms.stream_ordering, EXCLUDED.stream_ordering)",
                )
                .await?;
            for row in destination_rooms {
                tx.execute(&bare, &[&row.destination.as_str()]).await?;
                tx.execute(
                    &upsert,
                    &[&row.destination.as_str(), &&*row.room_id, &to_i64(row.stream_ordering, "stream ordering")?],
                )
                .await?;
            }
        }
        let mut invalidations = Vec::new();
        if !destinations.is_empty() {
            // Other processes write retry timings too (a federation reader resets them when
            // the server contacts us); Synapse's rule keeps the newest failure and any reset.
            let timings = tx
                .prepare_cached(
                    "INSERT INTO destinations (destination, failure_ts, retry_last_ts, retry_interval)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (destination) DO UPDATE SET
                         failure_ts = EXCLUDED.failure_ts,
                         retry_last_ts = EXCLUDED.retry_last_ts,
                         retry_interval = EXCLUDED.retry_interval
                     WHERE EXCLUDED.retry_interval = 0
                         OR EXCLUDED.retry_last_ts = 0
                         OR destinations.retry_interval IS NULL
                         OR destinations.retry_interval < EXCLUDED.retry_interval
                         OR destinations.retry_last_ts < EXCLUDED.retry_last_ts",
                )
                .await?;
            let position = tx
                .prepare_cached(
                    "UPDATE destinations SET last_successful_stream_ordering =
                         GREATEST(COALESCE(last_successful_stream_ordering, $2), $2)
                     WHERE destination = $1",
                )
                .await?;
            let next_id = tx.prepare_cached("SELECT nextval('cache_invalidation_stream_seq')").await?;
            let announce = tx
                .prepare_cached(
                    "INSERT INTO cache_invalidation_stream_by_instance
                         (stream_id, instance_name, cache_func, keys, invalidation_ts)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .await?;
            for row in destinations {
                let name = row.destination.as_str();
                let failure_ts = row.failure_ts.map(|v| to_i64(v, "failure_ts")).transpose()?;
                tx.execute(
                    &timings,
                    &[
                        &name,
                        &failure_ts,
                        &to_i64(row.retry_last_ts, "retry_last_ts")?,
                        &to_i64(row.retry_interval, "retry_interval")?,
                    ],
                )
                .await?;
                if let Some(last) = row.last_successful_stream_ordering {
                    tx.execute(&position, &[&name, &to_i64(last, "last_successful_stream_ordering")?]).await?;
                }
                let stream_id: i64 = tx.query_one(&next_id, &[]).await?.get(0);
                let keys = vec![name.to_owned()];
                tx.execute(&announce, &[&stream_id, &instance_name, &RETRY_TIMINGS_CACHE, &keys, &now]).await?;
                invalidations.push(CacheInvalidation {
                    stream_id,
                    cache_func: RETRY_TIMINGS_CACHE.into(),
                    keys,
                    invalidation_ts: now_ms,
                });
            }
        }
        if !to_device_deleted.is_empty() {
            let stmt = tx
                .prepare_cached("DELETE FROM device_federation_outbox WHERE destination = $1 AND stream_id = $2")
                .await?;
            for key in to_device_deleted {
                tx.execute(&stmt, &[&key.destination.as_str(), &to_i64(key.outbox_id, "outbox id")?]).await?;
            }
        }
        for key in device_list_pokes_deleted {
            delete_pokes(&tx, key).await?;
        }
        if !device_list_positions.is_empty() {
            let upsert = tx
                .prepare_cached(
                    "INSERT INTO device_lists_outbound_last_success (destination, user_id, stream_id) VALUES ($1, $2, $3)
                     ON CONFLICT (destination, user_id) DO UPDATE SET stream_id = EXCLUDED.stream_id",
                )
                .await?;
            let delete = tx
                .prepare_cached(
                    "DELETE FROM device_lists_outbound_last_success WHERE destination = $1 AND user_id = $2",
                )
                .await?;
            for row in device_list_positions {
                match row.stream_id {
                    Some(id) => {
                        tx.execute(
                            &upsert,
                            &[&row.destination.as_str(), &row.user_id, &to_i64(id, "device-list stream id")?],
                        )
                        .await?
                    }
                    None => tx.execute(&delete, &[&row.destination.as_str(), &row.user_id]).await?,
                };
            }
        }
        tx.commit().await?;
        Ok(invalidations)
    }
}

/// Deletes the delivered version of one collapsed poke: every row of Synapse's for that
/// (destination, user, device) up to the stream id, since the collapsed poke stood for all of
/// them. A cross-signing poke (`device_id` None) stands for the rows naming the user's
/// current master or self-signing public key, which is how Synapse records those.
async fn delete_pokes(tx: &deadpool_postgres::Transaction<'_>, key: &DeviceListPokeKey) -> Result<(), PgError> {
    let stream_id = to_i64(key.stream_id, "device-list stream id")?;
    let destination = key.destination.as_str();
    match &key.device_id {
        Some(device_id) => {
            let stmt = tx
                .prepare_cached(
                    "DELETE FROM device_lists_outbound_pokes
                     WHERE destination = $1 AND user_id = $2 AND device_id = $3 AND stream_id <= $4",
                )
                .await?;
            tx.execute(&stmt, &[&destination, &key.user_id, device_id, &stream_id]).await?;
        }
        None => {
            let ids = devices::cross_signing_ids(tx, &key.user_id).await?;
            let stmt = tx
                .prepare_cached(
                    "DELETE FROM device_lists_outbound_pokes
                     WHERE destination = $1 AND user_id = $2 AND device_id = ANY($3) AND stream_id <= $4",
                )
                .await?;
            tx.execute(&stmt, &[&destination, &key.user_id, &ids, &stream_id]).await?;
        }
    }
    Ok(())
}
