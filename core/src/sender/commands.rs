//! Commands that queue data for destinations: EDUs of every kind, to-device messages and
//! device-list changes, including the rows a homeserver already keeps durably.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde_json::Value;

use super::FederationSender;
use crate::destination::Destination;
use crate::edu::{EduEntry, Poke, PresenceState, Receipt, split_to_device};
use crate::error::InputError;
use crate::io::{DeviceListPoke, OutboxRow, ReceiptedEvent};
use crate::types::{ServerName, server_of};

/// Receipts go to everyone at once in rooms with fewer other servers than this.
const RECEIPT_SMALL_ROOM_SERVERS: usize = 10;
/// Receipts for events received this recently go to everyone at once.
const RECEIPT_RECENT_EVENT_MS: u64 = 60_000;

impl FederationSender {
    pub(super) fn edu(
        &mut self,
        destination: ServerName,
        edu_type: &str,
        content: &Value,
        key: Option<String>,
    ) -> Result<(), InputError> {
        if destination == self.config.server_name {
            return Err(InputError::Refused(format!("an EDU ({edu_type}) addressed to ourselves")));
        }
        if !self.config.handles(&destination) {
            return Ok(());
        }
        let edu = EduEntry::new(edu_type, content);
        let queue = self.destinations.or_default(&destination).queue();
        match key {
            Some(key) => queue.edus.push_keyed(key, edu),
            None => queue.edus.push_plain(edu),
        }
        self.fx.mark_dirty(destination);
        Ok(())
    }

    pub(super) fn typing(
        &mut self,
        room_id: &str,
        user_id: &str,
        typing: bool,
        hosts: Vec<ServerName>,
    ) -> Result<(), InputError> {
        self.check_local(user_id)?;
        let content = serde_json::json!({ "room_id": room_id, "typing": typing, "user_id": user_id });
        let edu = EduEntry::new("m.typing", &content);
        let key = format!("{room_id} {user_id}");
        let now = self.fx.now;
        for host in self.ephemeral_targets(hosts, 0) {
            let destination = self.destinations.or_default(&host);
            if destination.backoff.active(now) {
                continue;
            }
            destination.queue().edus.push_keyed(key.clone(), edu.clone());
            self.fx.mark_dirty(host);
        }
        Ok(())
    }

    pub(super) fn receipt(
        &mut self,
        receipt: Receipt,
        hosts: Vec<ServerName>,
        event: Option<ReceiptedEvent>,
    ) -> Result<(), InputError> {
        self.check_local(&receipt.user_id)?;
        if receipt.receipt_type == "m.read.private" {
            return Err(InputError::Refused(String::from("private read receipts are not federated")));
        }
        let targets = self.ephemeral_targets(hosts, self.config.catch_up_threshold_ms);
        let now_ms = self.fx.now.as_ms();
        let everyone_now = targets.len() < RECEIPT_SMALL_ROOM_SERVERS
            || event.as_ref().is_some_and(|e| now_ms.saturating_sub(e.received_ts) < RECEIPT_RECENT_EVENT_MS);
        let sender_server = event.as_ref().and_then(|e| server_of(&e.sender)).map(String::from);
        for host in targets {
            self.destinations.or_default(&host).queue().edus.push_receipt(receipt.clone());
            if everyone_now || sender_server.as_deref() == Some(host.as_str()) {
                self.fx.mark_dirty(host);
            } else {
                self.wake_up_later(host);
            }
        }
        Ok(())
    }

    pub(super) fn presence(&mut self, states: Vec<PresenceState>, hosts: Vec<ServerName>) -> Result<(), InputError> {
        for state in &states {
            self.check_local(&state.user_id)?;
        }
        if !self.config.presence_enabled || states.is_empty() {
            return Ok(());
        }
        for host in self.ephemeral_targets(hosts, self.config.catch_up_threshold_ms) {
            let queue = self.destinations.or_default(&host).queue();
            for state in &states {
                queue.edus.push_presence(state.clone());
            }
            self.wake_up_later(host);
        }
        Ok(())
    }

    pub(super) fn send_to_device(
        &mut self,
        sender: &str,
        message_type: &str,
        message_id: Option<String>,
        messages: BTreeMap<String, BTreeMap<String, Value>>,
    ) -> Result<(), InputError> {
        self.check_local(sender)?;
        let message_id = message_id.unwrap_or_else(|| format!("{}-{}", self.incarnation, self.outbox_counter + 1));
        // Group by server and split first, so a refusal changes nothing.
        let mut per_server: BTreeMap<ServerName, BTreeMap<String, BTreeMap<String, Value>>> = BTreeMap::new();
        for (user, devices) in messages {
            let server = server_of(&user)
                .and_then(|s| ServerName::parse(s).ok())
                .ok_or_else(|| InputError::Refused(format!("invalid recipient {user:?}")))?;
            if server != self.config.server_name && self.config.handles(&server) {
                per_server.entry(server).or_default().insert(user, devices);
            }
        }
        let mut contents = Vec::new();
        for (server, messages) in per_server {
            let chunks = split_to_device(sender, message_type, &message_id, &messages).map_err(InputError::Refused)?;
            contents.push((server, chunks));
        }
        let now_ms = self.fx.now.as_ms();
        for (server, chunks) in contents {
            for content in chunks {
                self.outbox_counter += 1;
                let outbox_id = (self.incarnation << 32) | self.outbox_counter;
                let mut edu = EduEntry::new("m.direct_to_device", &content);
                edu.outbox_id = Some(outbox_id);
                let row_edu = serde_json::json!({ "content": content, "edu_type": "m.direct_to_device" });
                self.fx.changes.to_device_outbox.push(OutboxRow {
                    destination: server.clone(),
                    outbox_id,
                    queued_ts: now_ms,
                    edu: row_edu,
                });
                self.destinations.or_default(&server).queue().edus.push_to_device(edu);
            }
            self.fx.mark_dirty(server);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // the fields of `Input::DeviceListUpdate`
    pub(super) fn device_list_update(
        &mut self,
        user_id: &str,
        device_id: &str,
        stream_id: u64,
        deleted: bool,
        keys: Option<Value>,
        device_display_name: Option<String>,
        destinations: Vec<ServerName>,
    ) -> Result<(), InputError> {
        self.check_local(user_id)?;
        let mut content = serde_json::Map::new();
        content.insert("device_id".into(), device_id.into());
        content.insert("stream_id".into(), stream_id.into());
        content.insert("user_id".into(), user_id.into());
        if deleted {
            content.insert("deleted".into(), true.into());
        } else {
            if let Some(keys) = keys {
                content.insert("keys".into(), keys);
            }
            if let Some(name) = device_display_name {
                content.insert("device_display_name".into(), name.into());
            }
        }
        self.queue_device_list(user_id, Some(device_id), stream_id, Value::Object(content), destinations);
        Ok(())
    }

    pub(super) fn signing_key_update(
        &mut self,
        user_id: &str,
        stream_id: u64,
        master_key: Option<Value>,
        self_signing_key: Option<Value>,
        destinations: Vec<ServerName>,
    ) -> Result<(), InputError> {
        self.check_local(user_id)?;
        if master_key.is_none() && self_signing_key.is_none() {
            return Err(InputError::Refused(String::from(
                "a signing key update needs a master_key or a self_signing_key",
            )));
        }
        let mut content = serde_json::Map::new();
        content.insert("user_id".into(), user_id.into());
        if let Some(key) = master_key {
            content.insert("master_key".into(), key);
        }
        if let Some(key) = self_signing_key {
            content.insert("self_signing_key".into(), key);
        }
        self.queue_device_list(user_id, None, stream_id, Value::Object(content), destinations);
        Ok(())
    }

    /// Queues a device-list change for each destination, durably, and wakes them through
    /// the staggered queue (Synapse's `send_device_messages(..., immediate=False)`). A
    /// destination backed off for longer than the catch-up threshold still gets the poke; it
    /// goes when the destination is next contacted or retried.
    fn queue_device_list(
        &mut self,
        user_id: &str,
        device_id: Option<&str>,
        stream_id: u64,
        content: Value,
        destinations: Vec<ServerName>,
    ) {
        let now = self.fx.now;
        let window_ms = self.config.catch_up_threshold_ms;
        for host in self.ephemeral_targets(destinations, 0) {
            let destination = self.destinations.or_default(&host);
            if !destination.device_list_is_new(user_id, device_id, stream_id) {
                continue;
            }
            let poke = Poke { stream_id, queued_ts: now.as_ms(), content: content.clone() };
            if !destination.queue().edus.push_device_list(user_id, device_id, poke) {
                continue;
            }
            let due = destination.backoff.due_within(now, window_ms);
            self.fx.changes.device_list_pokes.push(DeviceListPoke {
                destination: host.clone(),
                user_id: String::from(user_id),
                device_id: device_id.map(String::from),
                stream_id,
                queued_ts: now.as_ms(),
                content: content.clone(),
            });
            if due {
                self.wake_up_later(host);
            }
        }
    }

    /// Rows already durable in the homeserver's outbox: queued, sent at once, not persisted.
    pub(super) fn stored_to_device(&mut self, mut rows: Vec<OutboxRow>) {
        rows.sort_by_key(|row| row.outbox_id);
        for row in rows {
            if row.destination == self.config.server_name || !self.config.handles(&row.destination) {
                continue;
            }
            let Some(content) = row.edu.get("content") else { continue };
            let queue = self.destinations.or_default(&row.destination).queue();
            let in_flight =
                queue.frozen.as_ref().is_some_and(|f| f.edus.iter().any(|e| e.outbox_id == Some(row.outbox_id)));
            if in_flight || queue.edus.has_to_device(row.outbox_id) {
                continue;
            }
            let mut edu = EduEntry::new("m.direct_to_device", content);
            edu.outbox_id = Some(row.outbox_id);
            queue.edus.push_to_device(edu);
            self.fx.mark_dirty(row.destination);
        }
    }

    /// Pokes already durable in the homeserver's tables: queued and staggered like
    /// `Input::DeviceListUpdate`, not persisted again.
    pub(super) fn stored_device_list_pokes(&mut self, pokes: Vec<DeviceListPoke>) {
        let now = self.fx.now;
        let window_ms = self.config.catch_up_threshold_ms;
        for row in pokes {
            if row.destination == self.config.server_name || !self.config.handles(&row.destination) {
                continue;
            }
            let name = row.destination.clone();
            let destination = self.destinations.or_default(&name);
            if destination.queue_stored_poke(&mut self.fx, row) && destination.backoff.due_within(now, window_ms) {
                self.wake_up_later(name);
            }
        }
    }

    fn check_local(&self, user_id: &str) -> Result<(), InputError> {
        if server_of(user_id) == Some(self.config.server_name.as_str()) {
            Ok(())
        } else {
            Err(InputError::Refused(format!("{user_id} is not a local user")))
        }
    }

    /// The servers ephemeral data for `hosts` goes to: not ourselves, ours to handle, and
    /// (with a window) due for a retry within it.
    fn ephemeral_targets(&self, hosts: Vec<ServerName>, window_ms: u64) -> BTreeSet<ServerName> {
        let now = self.fx.now;
        hosts
            .into_iter()
            .filter(|host| *host != self.config.server_name && self.config.handles(host))
            .filter(|host| {
                window_ms == 0 || self.destinations.get(host).is_none_or(|d| d.backoff.due_within(now, window_ms))
            })
            .collect()
    }

    /// Wakes `name` through the staggered wake-up queue.
    fn wake_up_later(&mut self, name: ServerName) {
        let destinations = &self.destinations;
        let has_work = |name: &ServerName| destinations.get(name).is_some_and(Destination::has_work_in_memory);
        self.wake_up_queue.add(name, self.config.wake_up_interval_ms(), &mut self.fx, has_work);
    }
}
