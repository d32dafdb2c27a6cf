//! To-device messages and device-list changes that Synapse has made durable for remote
//! servers, read in the core's shapes.

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::GenericClient;
use fedsend_core::{DeviceListPoke, DeviceListPosition, OutboxRow};
use serde_json::{Map, Value, json};
use tracing::warn;

use super::{Batch, Ownership, PgError, SynapseDb, parse_server, to_i64, to_u64};

/// How device-list EDU bodies are built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceListOptions {
    /// Synapse's `allow_device_name_lookup_over_federation` (off by default): whether the
    /// device's display name goes into `m.device_list_update`.
    pub share_display_names: bool,
}

/// Reads up to `limit` rows of `table` after `after` in stream order, extended to the end of
/// the last stream id so that no stream id is split between two pages.
fn page_query(table: &str, columns: &str) -> String {
    format!(
        "WITH page AS (SELECT stream_id FROM {table} WHERE stream_id > $1 ORDER BY stream_id LIMIT $2)
         SELECT {columns} FROM {table}
         WHERE stream_id > $1 AND stream_id <= (SELECT COALESCE(MAX(stream_id), $1) FROM page)
         ORDER BY stream_id",
    )
}

fn limit_i64(limit: u32) -> i64 {
    i64::from(limit)
}

impl SynapseDb {
    /// The to-device EDUs waiting in `device_federation_outbox` for destinations this
    /// instance owns, with stream id above `after_stream_id`, ascending; `limit` rows are
    /// scanned (owned or not), plus the rest of the last stream id.
    pub async fn to_device_rows(
        &self,
        ownership: &Ownership,
        after_stream_id: u64,
        limit: u32,
    ) -> Result<Batch<OutboxRow>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&page_query("device_federation_outbox", "destination, stream_id, queued_ts, messages_json"))
            .await?;
        let after = to_i64(after_stream_id, "stream id")?;
        let rows = client.query(&stmt, &[&after, &limit_i64(limit)]).await?;
        let mut batch = Batch { rows: Vec::new(), next_after: after_stream_id, more: rows.len() >= limit as usize };
        for row in rows {
            let stream_id = to_u64(row.get(1)).unwrap_or(0);
            batch.next_after = batch.next_after.max(stream_id);
            let name: String = row.get(0);
            if !ownership.owns(&name) {
                continue;
            }
            let Ok(destination) = parse_server(&name, "to-device destination") else {
                // Synapse's background update deletes these; they can never be delivered.
                warn!(destination = %name, stream_id, "skipping a to-device row for an invalid server name");
                continue;
            };
            let text: String = row.get(3);
            // The stored JSON is the EDU content Synapse sends as is.
            let content: Value = match serde_json::from_str(&text) {
                Ok(content) => content,
                Err(e) => {
                    warn!(destination = %name, stream_id, error = %e, "skipping a to-device row that is not JSON");
                    continue;
                }
            };
            batch.rows.push(OutboxRow {
                destination,
                outbox_id: stream_id,
                queued_ts: to_u64(row.get(2)).unwrap_or(0),
                edu: json!({"edu_type": "m.direct_to_device", "content": content}),
            });
        }
        Ok(batch)
    }

    /// Device-list changes in `device_lists_outbound_pokes` for destinations this instance
    /// owns, with stream id above `after_stream_id`, collapsed to the newest per (destination,
    /// user, device), with the EDU content Synapse would send (without `prev_id`). Paged like
    /// [`Self::to_device_rows`].
    pub async fn device_list_pokes(
        &self,
        ownership: &Ownership,
        after_stream_id: u64,
        limit: u32,
        options: &DeviceListOptions,
    ) -> Result<Batch<DeviceListPoke>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&page_query(
                "device_lists_outbound_pokes",
                "destination, user_id, device_id, stream_id, ts",
            ))
            .await?;
        let after = to_i64(after_stream_id, "stream id")?;
        let rows = client.query(&stmt, &[&after, &limit_i64(limit)]).await?;
        let mut batch = Batch { rows: Vec::new(), next_after: after_stream_id, more: rows.len() >= limit as usize };
        // (destination, user, device) → (stream id, queued ts); later rows are newer.
        let mut newest: BTreeMap<(String, String, String), (u64, u64)> = BTreeMap::new();
        for row in rows {
            let stream_id = to_u64(row.get(3)).unwrap_or(0);
            batch.next_after = batch.next_after.max(stream_id);
            let destination: String = row.get(0);
            if !ownership.owns(&destination) {
                continue;
            }
            newest.insert((destination, row.get(1), row.get(2)), (stream_id, to_u64(row.get(4)).unwrap_or(0)));
        }
        let mut users: Vec<&str> = newest.keys().map(|(_, user, _)| user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        let mut facts: HashMap<String, UserDevices> = HashMap::new();
        for user in users {
            facts.insert(user.to_owned(), user_devices(&client, user).await?);
        }
        for ((name, user_id, device_id), (stream_id, queued_ts)) in newest {
            let Ok(destination) = parse_server(&name, "device-list destination") else {
                warn!(destination = %name, stream_id, "skipping a device-list poke for an invalid server name");
                continue;
            };
            let user = &facts[&user_id];
            let poke = if let Some(key) = user.cross_signing.iter().find(|k| k.id == device_id) {
                let mut content = Map::new();
                content.insert("user_id".into(), Value::String(user_id.clone()));
                // Synapse sends the user's current key of each type that a poke names.
                content.insert(key.field.into(), key.data.clone());
                DeviceListPoke {
                    destination,
                    user_id,
                    device_id: None,
                    stream_id,
                    queued_ts,
                    content: Value::Object(content),
                }
            } else {
                let mut content = Map::new();
                content.insert("user_id".into(), Value::String(user_id.clone()));
                content.insert("device_id".into(), Value::String(device_id.clone()));
                content.insert("stream_id".into(), Value::from(stream_id));
                match user.devices.get(&device_id) {
                    Some(device) => {
                        if let Some(keys) = &device.keys {
                            content.insert("keys".into(), keys.clone());
                        }
                        if options.share_display_names
                            && let Some(name) = device.display_name.as_ref().filter(|n| !n.is_empty())
                        {
                            content.insert("device_display_name".into(), Value::String(name.clone()));
                        }
                    }
                    None => {
                        content.insert("deleted".into(), Value::Bool(true));
                    }
                }
                DeviceListPoke {
                    destination,
                    user_id,
                    device_id: Some(device_id),
                    stream_id,
                    queued_ts,
                    content: Value::Object(content),
                }
            };
            batch.rows.push(poke);
        }
        merge_cross_signing(&mut batch.rows);
        Ok(batch)
    }

    /// `device_lists_outbound_last_success` rows of destinations this instance owns.
    pub async fn device_list_positions(&self, ownership: &Ownership) -> Result<Vec<DeviceListPosition>, PgError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT destination, user_id, stream_id FROM device_lists_outbound_last_success
                 ORDER BY destination, user_id",
            )
            .await?;
        let mut positions = Vec::new();
        for row in client.query(&stmt, &[]).await? {
            let name: String = row.get(0);
            if !ownership.owns(&name) {
                continue;
            }
            let Ok(destination) = parse_server(&name, "device-list destination") else { continue };
            positions.push(DeviceListPosition { destination, user_id: row.get(1), stream_id: to_u64(row.get(2)) });
        }
        Ok(positions)
    }
}

/// A master and a self-signing poke for one (destination, user) are one cross-signing
/// update (Synapse sends one `m.signing_key_update` holding both), kept at the newer id.
fn merge_cross_signing(pokes: &mut Vec<DeviceListPoke>) {
    let mut merged: Vec<DeviceListPoke> = Vec::with_capacity(pokes.len());
    for poke in pokes.drain(..) {
        if poke.device_id.is_none()
            && let Some(existing) = merged
                .iter_mut()
                .find(|p| p.device_id.is_none() && p.destination == poke.destination && p.user_id == poke.user_id)
        {
            if let (Some(into), Value::Object(from)) = (existing.content.as_object_mut(), poke.content) {
                into.extend(from);
            }
            existing.stream_id = existing.stream_id.max(poke.stream_id);
            existing.queued_ts = existing.queued_ts.max(poke.queued_ts);
            continue;
        }
        merged.push(poke);
    }
    *pokes = merged;
}

struct Device {
    display_name: Option<String>,
    keys: Option<Value>,
}

struct CrossSigningKey {
    /// The public key, which Synapse writes as the poke's device id.
    id: String,
    /// `master_key` or `self_signing_key`.
    field: &'static str,
    data: Value,
}

struct UserDevices {
    devices: HashMap<String, Device>,
    cross_signing: Vec<CrossSigningKey>,
}

/// The user's visible devices with their keys (cross-signing signatures on them merged in,
/// as Synapse serves them) and current cross-signing keys. Hidden devices count as deleted.
async fn user_devices<C: GenericClient>(client: &C, user_id: &str) -> Result<UserDevices, PgError> {
    let stmt = client
        .prepare_cached(
            "SELECT d.device_id, d.display_name, k.key_json FROM devices d
             LEFT JOIN e2e_device_keys_json k USING (user_id, device_id)
             WHERE d.user_id = $1 AND NOT COALESCE(d.hidden, FALSE)",
        )
        .await?;
    let mut devices = HashMap::new();
    for row in client.query(&stmt, &[&user_id]).await? {
        let device_id: String = row.get(0);
        let keys = row
            .get::<_, Option<String>>(2)
            .filter(|text| !text.is_empty())
            .and_then(|text| match serde_json::from_str::<Value>(&text) {
                Ok(keys) => Some(keys),
                Err(e) => {
                    warn!(user_id, device_id = %device_id, error = %e, "device keys are not JSON; announcing without them");
                    None
                }
            })
            .filter(|keys| keys.as_object().is_some_and(|o| !o.is_empty()));
        devices.insert(device_id, Device { display_name: row.get(1), keys });
    }
    let stmt = client
        .prepare_cached(
            "SELECT target_device_id, key_id, signature FROM e2e_cross_signing_signatures
             WHERE target_user_id = $1 AND user_id = $1",
        )
        .await?;
    for row in client.query(&stmt, &[&user_id]).await? {
        let target: String = row.get(0);
        if let Some(Some(Value::Object(keys))) = devices.get_mut(&target).map(|d| d.keys.as_mut()) {
            let signatures = keys.entry("signatures").or_insert_with(|| json!({}));
            if let Some(by_user) =
                signatures.as_object_mut().and_then(|s| s.entry(user_id).or_insert_with(|| json!({})).as_object_mut())
            {
                by_user.insert(row.get(1), Value::String(row.get(2)));
            }
        }
    }
    let cross_signing = current_cross_signing(client, user_id).await?;
    Ok(UserDevices { devices, cross_signing })
}

async fn current_cross_signing<C: GenericClient>(client: &C, user_id: &str) -> Result<Vec<CrossSigningKey>, PgError> {
    let stmt = client
        .prepare_cached(
            "SELECT DISTINCT ON (keytype) keytype, keydata FROM e2e_cross_signing_keys
             WHERE user_id = $1 AND keytype IN ('master', 'self_signing')
             ORDER BY keytype, stream_id DESC",
        )
        .await?;
    let mut keys = Vec::new();
    for row in client.query(&stmt, &[&user_id]).await? {
        let keytype: String = row.get(0);
        let text: String = row.get(1);
        let Ok(data) = serde_json::from_str::<Value>(&text) else {
            warn!(user_id, keytype = %keytype, "cross-signing key is not JSON; its pokes read as device pokes");
            continue;
        };
        // Synapse accepts only keys with exactly one `ed25519:<public key>` entry.
        let id = data
            .get("keys")
            .and_then(Value::as_object)
            .filter(|k| k.len() == 1)
            .and_then(|k| k.keys().next())
            .and_then(|key_id| key_id.strip_prefix("ed25519:"))
            .map(str::to_owned);
        let Some(id) = id else { continue };
        let field = if keytype == "master" { "master_key" } else { "self_signing_key" };
        keys.push(CrossSigningKey { id, field, data });
    }
    Ok(keys)
}

/// The device ids under which Synapse records pokes for `user_id`'s current cross-signing
/// keys.
pub(super) async fn cross_signing_ids<C: GenericClient>(client: &C, user_id: &str) -> Result<Vec<String>, PgError> {
    Ok(current_cross_signing(client, user_id).await?.into_iter().map(|k| k.id).collect())
}
