//! EDUs queued for one destination: presence, read receipts, to-device messages, device-list
//! updates, plain and keyed EDUs, and how they are taken into a transaction, in the order of
//! Synapse's `_prepare_main_queue_transaction` (`federation/sender/per_destination_queue.py`).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Presence states per `m.presence` EDU (Synapse's `MAX_PRESENCE_STATES_PER_EDU`).
pub const PRESENCE_STATES_PER_EDU_MAX: usize = 50;
/// EDU slots kept free for device-list updates (Synapse's `NUMBER_OF_RESERVED_EDUS_PER_TRANSACTION`).
pub(crate) const DEVICE_LIST_RESERVED_EDUS: usize = 10;
/// Soft maximum of one to-device EDU's content, in bytes of JSON (Synapse's `SOFT_MAX_EDU_SIZE`).
pub const TO_DEVICE_EDU_BYTES_MAX: usize = 65_536;
/// Read-receipt EDUs per transaction.
pub const RECEIPT_EDUS_PER_TRANSACTION_MAX: usize = 5;

/// A local user's read receipt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct Receipt {
    /// The room.
    pub room_id: String,
    /// `m.read` (never `m.read.private`, which is not federated).
    pub receipt_type: String,
    /// The local user.
    pub user_id: String,
    /// The event read.
    pub event_id: String,
    /// The thread, for threaded receipts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// The receipt's `data` (holds `ts`).
    #[cfg_attr(feature = "ts", ts(type = "JsonObject"))]
    pub data: Map<String, Value>,
}

/// One local user's presence, as sent in `m.presence`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub struct PresenceState {
    /// The local user.
    pub user_id: String,
    /// `online`, `unavailable` or `offline`.
    pub presence: String,
    /// Status message, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_msg: Option<String>,
    /// Last activity (Unix ms); 0 or absent when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_ts: Option<u64>,
    /// Whether the user is active right now (sent only when online).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currently_active: Option<bool>,
}

impl PresenceState {
    /// The federation form, computed when the transaction is built (`last_active_ago`).
    fn to_json(&self, now_ms: u64) -> Value {
        let mut object = Map::new();
        object.insert("presence".into(), Value::String(self.presence.clone()));
        object.insert("user_id".into(), Value::String(self.user_id.clone()));
        if let Some(ts) = self.last_active_ts.filter(|ts| *ts != 0) {
            object.insert("last_active_ago".into(), Value::from(now_ms.saturating_sub(ts)));
        }
        if let Some(message) = &self.status_msg {
            object.insert("status_msg".into(), Value::String(message.clone()));
        }
        if self.presence == "online" {
            object.insert("currently_active".into(), Value::Bool(self.currently_active.unwrap_or(false)));
        }
        Value::Object(object)
    }
}

/// An EDU ready for a transaction body: its type (for traces, metrics and poison isolation)
/// and its JSON `{"content":…,"edu_type":…}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EduEntry {
    /// The EDU type.
    pub(crate) edu_type: String,
    /// The serialized EDU.
    pub(crate) json: Arc<str>,
    /// For a to-device EDU: its row in the durable outbox, deleted once delivered.
    pub(crate) outbox_id: Option<u64>,
    /// For a device-list EDU: the poke it carries, settled once delivered.
    pub(crate) device_list: Option<PokeRef>,
}

/// The version of a device-list poke that a built EDU carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PokeRef {
    /// The local user.
    pub(crate) user_id: String,
    /// The device; `None` for cross-signing keys.
    pub(crate) device_id: Option<String>,
    /// The poke's stream id.
    pub(crate) stream_id: u64,
}

/// A device-list change waiting for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Poke {
    pub(crate) stream_id: u64,
    pub(crate) queued_ts: u64,
    /// The EDU content without `prev_id`.
    pub(crate) content: Value,
}

/// Device-list pokes by (user, device); `None` is the user's cross-signing keys.
type PokeKey = (String, Option<String>);

impl EduEntry {
    /// Serializes an EDU.
    pub(crate) fn new(edu_type: &str, content: &Value) -> Self {
        let edu = json!({ "content": content, "edu_type": edu_type });
        // serde_json::Value always serializes.
        Self {
            edu_type: String::from(edu_type),
            json: Arc::from(serde_json::to_string(&edu).unwrap_or_default()),
            outbox_id: None,
            device_list: None,
        }
    }
}

/// Receipt identity under D3: one receipt per (room, type, user, thread).
type ReceiptKey = (String, String, String, Option<String>);

/// Everything ephemeral waiting for one destination.
#[derive(Debug, Default)]
pub(crate) struct EduQueue {
    /// Latest state per user, in first-insertion order.
    presence: VecDeque<PresenceState>,
    /// Latest receipt per (room, type, user, thread), in first-insertion order.
    receipts: VecDeque<(ReceiptKey, Receipt)>,
    /// To-device EDUs from the durable outbox, by outbox id (they survive restarts).
    to_device: VecDeque<EduEntry>,
    /// Device-list changes (durable), newest per (user, device). A poke stays here until a
    /// transaction carrying it is delivered, so an abandoned transaction loses nothing.
    device_lists: BTreeMap<PokeKey, Poke>,
    /// EDUs of a split poison transaction (D7), put back to go first: a receipt or
    /// presence among them must not be overtaken by a newer one queued meanwhile.
    requeued: VecDeque<EduEntry>,
    /// Plain EDUs, FIFO.
    plain: VecDeque<EduEntry>,
    /// Keyed EDUs: a newer one replaces an older one with the same (type, key) in place;
    /// drained oldest first (Synapse's `_pop_pending_edus` drains newest first; docs/design.md, "Smaller differences").
    keyed: VecDeque<((String, String), EduEntry)>,
}

impl EduEntry {
    /// Presence, receipts and typing carry state that a newer update supersedes: stale after
    /// a long outage, and unsafe to requeue behind newer ones.
    pub(crate) fn is_state(&self) -> bool {
        matches!(self.edu_type.as_str(), "m.presence" | "m.receipt" | "m.typing")
    }
}

impl EduQueue {
    pub(crate) fn is_empty(&self) -> bool {
        self.presence.is_empty()
            && self.receipts.is_empty()
            && self.to_device.is_empty()
            && self.device_lists.is_empty()
            && self.requeued.is_empty()
            && self.plain.is_empty()
            && self.keyed.is_empty()
    }

    /// Items waiting, for stats.
    pub(crate) fn len(&self) -> usize {
        self.presence.len()
            + self.receipts.len()
            + self.to_device.len()
            + self.device_lists.len()
            + self.requeued.len()
            + self.plain.len()
            + self.keyed.len()
    }

    pub(crate) fn push_presence(&mut self, state: PresenceState) {
        match self.presence.iter_mut().find(|s| s.user_id == state.user_id) {
            Some(slot) => *slot = state,
            None => self.presence.push_back(state),
        }
    }

    pub(crate) fn push_receipt(&mut self, receipt: Receipt) {
        let key =
            (receipt.room_id.clone(), receipt.receipt_type.clone(), receipt.user_id.clone(), receipt.thread_id.clone());
        match self.receipts.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = receipt,
            None => self.receipts.push_back((key, receipt)),
        }
    }

    pub(crate) fn push_plain(&mut self, edu: EduEntry) {
        self.plain.push_back(edu);
    }

    /// Puts an EDU back at the head of its queue (after a poison split). A device-list EDU
    /// is not put back: its poke never left, and the EDU is rebuilt from it.
    pub(crate) fn push_front(&mut self, edu: EduEntry) {
        if edu.device_list.is_some() {
            return;
        }
        if edu.outbox_id.is_some() {
            self.to_device.push_front(edu);
        } else {
            self.requeued.push_front(edu);
        }
    }

    /// Queues a to-device EDU that is (or is being made) durable in the outbox.
    pub(crate) fn push_to_device(&mut self, edu: EduEntry) {
        self.to_device.push_back(edu);
    }

    /// Whether the outbox row `outbox_id` is queued here.
    pub(crate) fn has_to_device(&self, outbox_id: u64) -> bool {
        self.to_device.iter().any(|edu| edu.outbox_id == Some(outbox_id))
    }

    /// Removes every queued to-device row (pruning a destination, D14) and returns them.
    pub(crate) fn take_all_to_device(&mut self) -> Vec<EduEntry> {
        self.to_device.drain(..).collect()
    }

    /// Queues a device-list change; a newer one for the same (user, device) replaces it.
    /// Returns false (and changes nothing) when the queued one is as new or newer.
    pub(crate) fn push_device_list(&mut self, user_id: &str, device_id: Option<&str>, poke: Poke) -> bool {
        let key = (String::from(user_id), device_id.map(String::from));
        match self.device_lists.get_mut(&key) {
            Some(queued) if queued.stream_id >= poke.stream_id => false,
            Some(queued) => {
                *queued = poke;
                true
            }
            None => {
                self.device_lists.insert(key, poke);
                true
            }
        }
    }

    /// A transaction carrying this poke was delivered (or the poke was given up): it leaves
    /// unless a newer change to the same device replaced it meanwhile.
    pub(crate) fn device_list_settled(&mut self, poke: &PokeRef) {
        let key = (poke.user_id.clone(), poke.device_id.clone());
        if self.device_lists.get(&key).is_some_and(|queued| queued.stream_id <= poke.stream_id) {
            self.device_lists.remove(&key);
        }
    }

    /// Synapse's pruning of old pokes: a user with several device changes queued, the
    /// oldest queued before `cutoff_ms`, keeps only the newest device change (and its
    /// cross-signing keys, which Synapse could prune in favour of a device change; a
    /// receiver resynchronises devices, not keys, on an empty `prev_id`). Returns the pokes
    /// removed; their users' `prev_id` chains must restart empty, so that receivers fetch
    /// the whole list.
    pub(crate) fn prune_device_lists(&mut self, cutoff_ms: u64) -> Vec<PokeRef> {
        // Per user: device pokes, oldest queued time, newest device stream id.
        let mut per_user: BTreeMap<&str, (usize, u64, u64)> = BTreeMap::new();
        for ((user, device), poke) in &self.device_lists {
            if device.is_none() {
                continue;
            }
            let entry = per_user.entry(user.as_str()).or_insert((0, u64::MAX, 0));
            entry.0 += 1;
            entry.1 = entry.1.min(poke.queued_ts);
            entry.2 = entry.2.max(poke.stream_id);
        }
        let doomed: BTreeMap<String, u64> = per_user
            .into_iter()
            .filter(|(_, (count, oldest, _))| *count > 1 && *oldest < cutoff_ms)
            .map(|(user, (_, _, newest))| (String::from(user), newest))
            .collect();
        let mut pruned = Vec::new();
        self.device_lists.retain(|(user, device), poke| match doomed.get(user) {
            Some(newest) if device.is_some() && poke.stream_id != *newest => {
                pruned.push(PokeRef { user_id: user.clone(), device_id: device.clone(), stream_id: poke.stream_id });
                false
            }
            _ => true,
        });
        pruned
    }

    /// True when device-list changes are queued.
    pub(crate) fn has_device_lists(&self) -> bool {
        !self.device_lists.is_empty()
    }

    pub(crate) fn push_keyed(&mut self, key: String, edu: EduEntry) {
        let full_key = (edu.edu_type.clone(), key);
        match self.keyed.iter_mut().find(|(k, _)| *k == full_key) {
            Some(slot) => slot.1 = edu,
            None => self.keyed.push_back((full_key, edu)),
        }
    }

    /// Drops the ephemeral data (presence, receipts, typing, plain and keyed EDUs); durable
    /// to-device messages and device-list changes stay. Returns the dropped EDUs that carry
    /// no superseded state (plain and keyed, other than typing), to be reported.
    pub(crate) fn clear_ephemeral(&mut self) -> Vec<EduEntry> {
        let to_device = core::mem::take(&mut self.to_device);
        let device_lists = core::mem::take(&mut self.device_lists);
        let old = core::mem::replace(self, Self { to_device, device_lists, ..Self::default() });
        old.requeued
            .into_iter()
            .chain(old.plain)
            .chain(old.keyed.into_iter().map(|(_, edu)| edu))
            .filter(|edu| !edu.is_state())
            .collect()
    }

    /// Takes EDUs for one transaction: those of a split poison transaction first, then
    /// Synapse's order — presence (one EDU of at most 50 states), receipts (at most 5 EDUs),
    /// to-device, device lists, plain, keyed — up to
    /// `limit` EDUs and while `fits(bytes)` accepts each one. An EDU too large for any
    /// transaction is returned in `too_large` to be reported and dropped.
    ///
    /// Device-list EDUs are built here, in stream order, each user's `prev_id` chaining to
    /// the previous one in this transaction or else to `positions` (what the destination
    /// acknowledged). Their pokes stay queued until [`Self::device_list_settled`].
    pub(crate) fn take(
        &mut self,
        limit: usize,
        now_ms: u64,
        positions: &BTreeMap<String, u64>,
        fits: &mut dyn FnMut(usize) -> Fit,
    ) -> Taken {
        let mut taken = Taken::default();
        if limit == 0 || self.is_empty() {
            return taken;
        }
        if !take_front(&mut self.requeued, limit, &mut taken, fits) {
            return taken;
        }
        if !self.presence.is_empty() {
            let count = self.presence.len().min(PRESENCE_STATES_PER_EDU_MAX);
            let push: Vec<Value> = self.presence.iter().take(count).map(|s| s.to_json(now_ms)).collect();
            let edu = EduEntry::new("m.presence", &json!({ "push": push }));
            match fits(edu.json.len()) {
                Fit::Yes => {
                    self.presence.drain(..count);
                    taken.edus.push(edu);
                }
                Fit::Never => {
                    self.presence.drain(..count);
                    taken.too_large.push(edu);
                }
                Fit::NotNow => return taken,
            }
        }
        let mut receipt_edus = 0;
        while !self.receipts.is_empty() && receipt_edus < RECEIPT_EDUS_PER_TRANSACTION_MAX && taken.edus.len() < limit {
            // One EDU holds at most one receipt per (room, type, user); another thread of the
            // same user waits for the next EDU.
            let mut content: Map<String, Value> = Map::new();
            let mut used: Vec<usize> = Vec::new();
            for (index, ((room, kind, user, _), receipt)) in self.receipts.iter().enumerate() {
                let by_type = content.entry(room.clone()).or_insert_with(|| Value::Object(Map::new()));
                let Some(by_type) = by_type.as_object_mut() else { continue };
                let by_user = by_type.entry(kind.clone()).or_insert_with(|| Value::Object(Map::new()));
                let Some(by_user) = by_user.as_object_mut() else { continue };
                if by_user.contains_key(user) {
                    continue;
                }
                let mut data = receipt.data.clone();
                if let Some(thread) = &receipt.thread_id {
                    data.insert("thread_id".into(), Value::String(thread.clone()));
                }
                by_user.insert(user.clone(), json!({ "data": data, "event_ids": [receipt.event_id] }));
                used.push(index);
            }
            let edu = EduEntry::new("m.receipt", &Value::Object(content));
            let fit = fits(edu.json.len());
            if fit == Fit::NotNow {
                break;
            }
            for index in used.into_iter().rev() {
                self.receipts.remove(index);
            }
            if fit == Fit::Never {
                taken.too_large.push(edu);
            } else {
                taken.edus.push(edu);
                receipt_edus += 1;
            }
        }
        // To-device messages, leaving room for device-list updates, as Synapse does.
        // A small limit (while isolating a poison item) must not starve to-device entirely.
        let to_device_limit = limit.saturating_sub(DEVICE_LIST_RESERVED_EDUS).max(limit.min(1));
        if !take_front(&mut self.to_device, to_device_limit, &mut taken, fits)
            || !self.take_device_lists(&mut taken, limit, positions, fits)
        {
            return taken;
        }
        if take_front(&mut self.plain, limit, &mut taken, fits) {
            take_front(&mut self.keyed, limit, &mut taken, fits);
        }
        taken
    }
}

/// What a FIFO of EDUs holds per entry.
trait Queued {
    fn edu(&self) -> &EduEntry;
    fn into_edu(self) -> EduEntry;
}

impl Queued for EduEntry {
    fn edu(&self) -> &EduEntry {
        self
    }
    fn into_edu(self) -> EduEntry {
        self
    }
}

impl Queued for ((String, String), EduEntry) {
    fn edu(&self) -> &EduEntry {
        &self.1
    }
    fn into_edu(self) -> EduEntry {
        self.1
    }
}

/// Moves EDUs from the front of `queue` into `taken` while fewer than `limit` are taken and
/// each fits; false when one does not fit this transaction (it is full by bytes).
fn take_front<T: Queued>(
    queue: &mut VecDeque<T>,
    limit: usize,
    taken: &mut Taken,
    fits: &mut dyn FnMut(usize) -> Fit,
) -> bool {
    while taken.edus.len() < limit {
        let Some(next) = queue.front() else { break };
        let fit = fits(next.edu().json.len());
        if fit == Fit::NotNow {
            return false;
        }
        let Some(edu) = queue.pop_front().map(Queued::into_edu) else { break };
        if fit == Fit::Never { taken.too_large.push(edu) } else { taken.edus.push(edu) }
    }
    true
}

impl EduQueue {
    /// The device-list part of [`Self::take`]; false when the transaction is full by bytes.
    fn take_device_lists(
        &mut self,
        taken: &mut Taken,
        limit: usize,
        positions: &BTreeMap<String, u64>,
        fits: &mut dyn FnMut(usize) -> Fit,
    ) -> bool {
        if self.device_lists.is_empty() || taken.edus.len() >= limit {
            return true;
        }
        let mut order: Vec<(u64, &PokeKey)> = self.device_lists.iter().map(|(key, p)| (p.stream_id, key)).collect();
        order.sort();
        let order: Vec<PokeKey> = order.into_iter().map(|(_, key)| key.clone()).collect();
        // The prev_id of each user's next EDU in this transaction.
        let mut chain: BTreeMap<String, Option<u64>> = BTreeMap::new();
        for key in order {
            let Some(poke) = self.device_lists.get(&key) else { continue };
            let (user, device) = &key;
            let slots = if device.is_some() { 1 } else { 2 };
            // A cross-signing pair goes whole; alone in a transaction it may exceed a tiny
            // limit (poison isolation), or it would never go.
            if taken.edus.len() + slots > limit && !taken.edus.is_empty() {
                break;
            }
            let poke_ref = PokeRef { user_id: user.clone(), device_id: device.clone(), stream_id: poke.stream_id };
            let mut edus: Vec<EduEntry> = match device {
                Some(_) => {
                    let prev = *chain.entry(user.clone()).or_insert_with(|| positions.get(user).copied());
                    let mut content = poke.content.clone();
                    if let Some(object) = content.as_object_mut() {
                        object.insert("prev_id".into(), prev.map_or_else(|| json!([]), |p| json!([p])));
                    }
                    alloc::vec![EduEntry::new("m.device_list_update", &content)]
                }
                None => ["m.signing_key_update", "org.matrix.signing_key_update"]
                    .into_iter()
                    .map(|edu_type| EduEntry::new(edu_type, &poke.content))
                    .collect(),
            };
            for edu in &mut edus {
                edu.device_list = Some(poke_ref.clone());
            }
            // The pair is measured as one item so that it never splits across transactions.
            let bytes = edus.iter().map(|e| e.json.len()).sum::<usize>() + edus.len() - 1;
            match fits(bytes) {
                Fit::NotNow => return false,
                Fit::Yes => {
                    if device.is_some() {
                        chain.insert(user.clone(), Some(poke_ref.stream_id));
                    }
                    taken.edus.extend(edus);
                }
                Fit::Never => {
                    // The receiver misses this change: restart the user's chain so it
                    // resynchronises the whole list.
                    if device.is_some() {
                        chain.insert(user.clone(), None);
                    }
                    self.device_lists.remove(&key);
                    taken.too_large.extend(edus.into_iter().take(1));
                }
            }
        }
        true
    }
}

/// Splits one sender's to-device messages for one destination into EDU contents of at most
/// [`TO_DEVICE_EDU_BYTES_MAX`] bytes: whole recipients where they fit, else device by device.
/// A single device message too large on its own is refused (Synapse answers 413 M_TOO_LARGE
/// at its client API). Chunks after the first get `message_id.N`.
pub fn split_to_device(
    sender: &str,
    message_type: &str,
    message_id: &str,
    messages: &BTreeMap<String, BTreeMap<String, Value>>,
) -> Result<Vec<Value>, String> {
    let content = |messages: &Map<String, Value>, id: &str| json!({ "message_id": id, "messages": messages, "sender": sender, "type": message_type });
    let size = |messages: &Map<String, Value>| {
        serde_json::to_string(&content(messages, message_id)).map_or(usize::MAX, |t| t.len())
    };
    let mut chunks: Vec<Map<String, Value>> = Vec::new();
    let mut current: Map<String, Value> = Map::new();
    for (user, devices) in messages {
        let mut whole = current.clone();
        whole.insert(user.clone(), json!(devices));
        if size(&whole) <= TO_DEVICE_EDU_BYTES_MAX {
            current = whole;
            continue;
        }
        for (device, body) in devices {
            let mut with = current.clone();
            let entry = with.entry(user.clone()).or_insert_with(|| Value::Object(Map::new()));
            if let Some(by_device) = entry.as_object_mut() {
                by_device.insert(device.clone(), body.clone());
            }
            if size(&with) <= TO_DEVICE_EDU_BYTES_MAX {
                current = with;
                continue;
            }
            let mut alone = Map::new();
            alone.insert(user.clone(), json!({ device: body }));
            if size(&alone) > TO_DEVICE_EDU_BYTES_MAX {
                return Err(alloc::format!(
                    "M_TOO_LARGE: the to-device message for {user} device {device} exceeds {TO_DEVICE_EDU_BYTES_MAX} bytes"
                ));
            }
            if !current.is_empty() {
                chunks.push(core::mem::take(&mut current));
            }
            current = alone;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    let count = chunks.len();
    Ok(chunks
        .iter()
        .enumerate()
        .map(|(index, messages)| {
            let id = if count == 1 || index == 0 {
                String::from(message_id)
            } else {
                alloc::format!("{message_id}.{index}")
            };
            content(messages, &id)
        })
        .collect())
}

/// Whether one more item of some size fits the transaction being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fit {
    Yes,
    /// Not in this transaction, but in a fresh one.
    NotNow,
    /// Not even alone in a transaction.
    Never,
}

#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub(crate) edus: Vec<EduEntry>,
    pub(crate) too_large: Vec<EduEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn receipt(user: &str, thread: Option<&str>, event: &str) -> Receipt {
        let mut data = Map::new();
        data.insert("ts".into(), Value::from(1234));
        Receipt {
            room_id: "!r:test".into(),
            receipt_type: "m.read".into(),
            user_id: user.into(),
            event_id: event.into(),
            thread_id: thread.map(ToString::to_string),
            data,
        }
    }

    #[test]
    fn receipts_one_per_room_type_user_thread() {
        let mut queue = EduQueue::default();
        queue.push_receipt(receipt("@alice:test", None, "$1"));
        queue.push_receipt(receipt("@alice:test", Some("thread"), "$1"));
        queue.push_receipt(receipt("@bob:test", None, "$1"));
        queue.push_receipt(receipt("@bob:test", Some("diff-thread"), "$1"));
        queue.push_receipt(receipt("@alice:test", None, "$2")); // replaces alice's unthreaded one
        let taken = queue.take(100, 0, &BTreeMap::new(), &mut |_| Fit::Yes);
        assert_eq!(taken.edus.len(), 2);
        assert!(taken.edus[0].json.contains("\"@alice:test\":{\"data\":{\"ts\":1234},\"event_ids\":[\"$2\"]}"));
        assert!(taken.edus[0].json.contains("\"@bob:test\":{\"data\":{\"ts\":1234},\"event_ids\":[\"$1\"]}"));
        assert!(taken.edus[1].json.contains("\"thread_id\":\"thread\""));
        assert!(taken.edus[1].json.contains("\"thread_id\":\"diff-thread\""));
        assert!(queue.is_empty());
    }

    #[test]
    fn keyed_edus_replace_in_place_and_drain_oldest_first() {
        let mut queue = EduQueue::default();
        queue.push_keyed("a".into(), EduEntry::new("m.typing", &json!({"n": 1})));
        queue.push_keyed("b".into(), EduEntry::new("m.typing", &json!({"n": 2})));
        queue.push_keyed("a".into(), EduEntry::new("m.typing", &json!({"n": 3})));
        let taken = queue.take(1, 0, &BTreeMap::new(), &mut |_| Fit::Yes);
        assert_eq!(&*taken.edus[0].json, r#"{"content":{"n":3},"edu_type":"m.typing"}"#);
        let taken = queue.take(5, 0, &BTreeMap::new(), &mut |_| Fit::Yes);
        assert_eq!(&*taken.edus[0].json, r#"{"content":{"n":2},"edu_type":"m.typing"}"#);
    }

    #[test]
    fn presence_batches_fifty_states_per_edu() {
        let mut queue = EduQueue::default();
        for i in 0..120 {
            queue.push_presence(PresenceState {
                user_id: alloc::format!("@user{i}:test"),
                presence: "offline".into(),
                status_msg: None,
                last_active_ts: None,
                currently_active: None,
            });
        }
        for expected in [50, 50, 20] {
            let taken = queue.take(100, 0, &BTreeMap::new(), &mut |_| Fit::Yes);
            assert_eq!(taken.edus.len(), 1, "one presence EDU per transaction");
            assert_eq!(taken.edus[0].json.matches("\"user_id\"").count(), expected);
        }
    }
}
