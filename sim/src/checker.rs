//! Invariants checked on every step of a simulation, and the convergence target.
//!
//! The checker watches the boundary only — what left the engine and what the world answered
//! — so it judges every engine the same way and knows nothing of the core's internals.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use fedsend_core::{Changes, Config, Event, OutgoingTransaction, TransactionResult};
use serde_json::Value;

/// Counts of what a run exercised, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Transactions attempted (including retries).
    pub attempts: u64,
    /// Attempts answered 2xx.
    pub accepted: u64,
    /// Retries of a frozen transaction (same txn id sent again).
    pub retries: u64,
    /// Items given up (poison, oversized).
    pub dropped: u64,
    /// EDUs accepted by remotes.
    pub edus: u64,
    /// To-device messages a remote got again (after a crash; receivers drop them by id).
    pub to_device_repeats: u64,
    /// Times a destination's queue was dropped for catch-up.
    pub catch_ups: u64,
    /// Times a destination answered after failing.
    pub recoveries: u64,
    /// Device-list EDUs (`m.device_list_update`, and signing-key pairs) accepted by remotes.
    pub device_list_edus: u64,
}

/// The invariants of `spec`/issue 3, checked as the world runs.
#[derive(Debug)]
pub(crate) struct Checker {
    config: Config,
    /// Every txn id ever sent, with its body: an id never carries two bodies, across restarts.
    bodies: BTreeMap<String, String>,
    /// Attempts awaiting an answer, per destination, in the current engine generation.
    in_flight: BTreeMap<String, u32>,
    /// No attempt before this time unless the destination was woken since.
    backoff_until: BTreeMap<String, u64>,
    /// The txn id of the last failed attempt per destination: the next attempt must reuse it
    /// unless the destination entered catch-up or the transaction was split as poison.
    last_failed: BTreeMap<String, String>,
    /// Destinations that entered catch-up since their last attempt left: that attempt's
    /// transaction is abandoned, so its failure does not oblige a retry.
    abandoned: BTreeSet<String>,
    /// (destination, event) pairs catch-up may send because storage offered them.
    offered: BTreeSet<(String, String)>,
    /// (destination, event) pairs given up.
    pub(crate) dropped: BTreeSet<(String, String)>,
    /// Outbox rows seen: (destination, outbox id) → (destination, sender, message id).
    outbox: BTreeMap<(String, u64), (String, String, String)>,
    /// To-device messages whose row was deleted (delivered, or given up with a `Dropped`).
    pub(crate) to_device_deleted: BTreeSet<(String, String, String)>,
    /// To-device messages whose outbox row became durable: (destination, sender, message id).
    pub(crate) to_device_owed: BTreeSet<(String, String, String)>,
    /// To-device messages received per (destination, sender, message id): receivers drop
    /// repeats by message id, so at least once here is exactly once for them.
    pub(crate) to_device: BTreeMap<(String, String, String), u32>,
    /// Device-list stream ids accepted per (destination, user): every `prev_id` must name
    /// one of them (or be empty, which makes the receiver resynchronise).
    pub(crate) device_lists_seen: BTreeMap<(String, String), BTreeSet<u64>>,
    /// The newest device-list stream id per (destination, user) whose poke became durable:
    /// what the destination's chain must end at once healed.
    pub(crate) device_lists_owed: BTreeMap<(String, String), u64>,
    /// Staggered wake-ups: the time of the last fresh send carrying only staggered EDUs
    /// (presence, device lists) to a destination that never failed.
    last_staggered_send: Option<(u64, String)>,
    /// Destinations that failed an attempt or were contacted: their sends are driven by
    /// timers and contact, not only by the wake-up queue.
    unstaggered: BTreeSet<String>,
    /// When the world last gave the engine an input other than staggered data (an answer, an
    /// acknowledged write, a query result, an event or message): any of them may release
    /// several destinations at once.
    last_delivery: u64,
    /// Newest receipt ts delivered per (destination, room, type, user, thread).
    receipts: BTreeMap<(String, String, String, String, Option<String>), u64>,
    /// Per destination, the event ids it accepted.
    pub(crate) received: BTreeMap<String, BTreeSet<String>>,
    pub(crate) counts: Counts,
}

impl Checker {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            bodies: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            backoff_until: BTreeMap::new(),
            last_failed: BTreeMap::new(),
            abandoned: BTreeSet::new(),
            offered: BTreeSet::new(),
            device_lists_seen: BTreeMap::new(),
            device_lists_owed: BTreeMap::new(),
            last_staggered_send: None,
            unstaggered: BTreeSet::new(),
            last_delivery: 0,
            dropped: BTreeSet::new(),
            received: BTreeMap::new(),
            receipts: BTreeMap::new(),
            to_device: BTreeMap::new(),
            to_device_owed: BTreeSet::new(),
            outbox: BTreeMap::new(),
            to_device_deleted: BTreeSet::new(),
            counts: Counts::default(),
        }
    }

    /// Checks an attempt as it leaves. `routed` says whether fan-out could have chosen this
    /// destination for the event.
    pub(crate) fn on_send(
        &mut self,
        now: u64,
        server_name: &str,
        txn: &OutgoingTransaction,
        edu_kinds: &[&str],
        routed: &dyn Fn(&str) -> bool,
    ) -> Result<(), String> {
        let edu_count = edu_kinds.len();
        let dest = txn.destination.as_str();
        self.counts.attempts += 1;
        if dest == server_name {
            return Err(format!("transaction {} sent to ourselves", txn.txn_id));
        }
        let mine = self.in_flight.entry(String::from(dest)).or_insert(0);
        if *mine > 0 {
            return Err(format!("second transaction in flight to {dest}: {}", txn.txn_id));
        }
        *mine += 1;
        let total: u32 = self.in_flight.values().sum();
        if total > self.config.transactions_in_flight_max {
            return Err(format!(
                "{total} transactions in flight, above the cap {}",
                self.config.transactions_in_flight_max
            ));
        }
        if txn.pdu_ids.len() > self.config.pdus_per_transaction_max as usize {
            return Err(format!("transaction {} has {} PDUs", txn.txn_id, txn.pdu_ids.len()));
        }
        let receipts = edu_kinds.iter().filter(|kind| **kind == "m.receipt").count();
        if receipts > fedsend_core::RECEIPT_EDUS_PER_TRANSACTION_MAX {
            return Err(format!("transaction {} has {receipts} receipt EDUs", txn.txn_id));
        }
        if edu_count > self.config.edus_per_transaction_max as usize {
            return Err(format!("transaction {} has {edu_count} EDUs", txn.txn_id));
        }
        if txn.body.len() as u64 > self.config.transaction_bytes_max {
            return Err(format!("transaction {} has {} bytes, above the cap", txn.txn_id, txn.body.len()));
        }
        match self.bodies.get(&txn.txn_id) {
            Some(previous) if **previous != *txn.body => {
                return Err(format!("txn id {} reused with a different body", txn.txn_id));
            }
            Some(_) => self.counts.retries += 1,
            None => {
                self.bodies.insert(txn.txn_id.clone(), String::from(&*txn.body));
            }
        }
        if let Some(until) = self.backoff_until.get(dest)
            && now < *until
        {
            return Err(format!("attempt to {dest} at {now}, before its backoff ends at {until}"));
        }
        if let Some(failed) = self.last_failed.get(dest)
            && *failed != txn.txn_id
        {
            return Err(format!(
                "{dest}: transaction {} sent while the failed {failed} was neither retried nor abandoned",
                txn.txn_id
            ));
        }
        self.abandoned.remove(dest);
        self.check_stagger(now, dest, txn, edu_kinds)?;
        for event in &txn.pdu_ids {
            if !routed(event) && !self.offered.contains(&(String::from(dest), event.clone())) {
                return Err(format!("event {event} sent to {dest}, which was not in the room before it"));
            }
        }
        Ok(())
    }

    /// The wake-up queue (Synapse's `_DestinationWakeupQueue`) wakes one destination at a time: two fresh sends of
    /// nothing but staggered EDUs (presence, device lists) to healthy destinations never
    /// leave at the same instant. Sends at the instant of a delivery from the world,
    /// retries, and destinations driven by backoff timers, catch-up or contact are not the
    /// queue's doing.
    fn check_stagger(&mut self, now: u64, dest: &str, txn: &OutgoingTransaction, kinds: &[&str]) -> Result<(), String> {
        const STAGGERED: [&str; 4] =
            ["m.presence", "m.device_list_update", "m.signing_key_update", "org.matrix.signing_key_update"];
        let staggered_only =
            txn.pdu_ids.is_empty() && !kinds.is_empty() && kinds.iter().all(|kind| STAGGERED.contains(kind));
        // Whatever the world delivers may release several destinations at one instant: an
        // answer frees a slot under `transactions_in_flight_max`, the durable incarnation
        // releases every queue after a start, fetched events fan out.
        let fresh = txn.attempt == 1 && !self.unstaggered.contains(dest) && self.last_delivery < now;
        if !(staggered_only && fresh) {
            return Ok(());
        }
        if let Some((at, other)) = &self.last_staggered_send
            && *at == now
            && other != dest
        {
            return Err(format!("the wake-up queue woke {other} and {dest} at the same instant {now}"));
        }
        self.last_staggered_send = Some((now, String::from(dest)));
        Ok(())
    }

    /// A remote accepted a transaction (whether or not its answer reaches the sender).
    pub(crate) fn on_accepted(&mut self, dest: &str, pdu_ids: &[String], edus: &[Value]) -> Result<(), String> {
        self.counts.accepted += 1;
        self.received.entry(String::from(dest)).or_default().extend(pdu_ids.iter().cloned());
        for (index, edu) in edus.iter().enumerate() {
            let (Some(kind), Some(content)) = (edu.get("edu_type").and_then(Value::as_str), edu.get("content")) else {
                return Err(format!("malformed EDU sent to {dest}: {edu}"));
            };
            self.counts.edus += 1;
            match kind {
                "m.presence" => {
                    let states = content.get("push").and_then(Value::as_array).map_or(0, Vec::len);
                    if states == 0 || states > fedsend_core::PRESENCE_STATES_PER_EDU_MAX {
                        return Err(format!("presence EDU to {dest} with {states} states"));
                    }
                }
                "m.receipt" => self.check_receipts(dest, content)?,
                "m.device_list_update" => {
                    self.counts.device_list_edus += 1;
                    self.check_device_list(dest, content)?;
                }
                "m.signing_key_update" => {
                    self.counts.device_list_edus += 1;
                    let partner = edus.get(index + 1);
                    let paired = partner.is_some_and(|p| {
                        p.get("edu_type").and_then(Value::as_str) == Some("org.matrix.signing_key_update")
                            && p.get("content") == Some(content)
                    });
                    if !paired {
                        return Err(format!("{dest} got an m.signing_key_update without its org.matrix twin"));
                    }
                }
                "org.matrix.signing_key_update" => {
                    let paired = index > 0
                        && edus[index - 1].get("edu_type").and_then(Value::as_str) == Some("m.signing_key_update");
                    if !paired {
                        return Err(format!("{dest} got an org.matrix.signing_key_update without its m. twin"));
                    }
                }
                "m.direct_to_device" => {
                    let bytes = serde_json::to_string(content).map_or(0, |c| c.len());
                    if bytes > fedsend_core::TO_DEVICE_EDU_BYTES_MAX {
                        return Err(format!("to-device EDU of {bytes} bytes to {dest}, above the 64 KiB split size"));
                    }
                    let sender = content.get("sender").and_then(Value::as_str).unwrap_or_default();
                    let id = content.get("message_id").and_then(Value::as_str).unwrap_or_default();
                    let key = (String::from(dest), String::from(sender), String::from(id));
                    let seen = self.to_device.entry(key).or_insert(0);
                    *seen += 1;
                    if *seen > 1 {
                        self.counts.to_device_repeats += 1;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// D3 and ordering: no receipt for a (room, type, user, thread) older than one delivered.
    fn check_receipts(&mut self, dest: &str, content: &Value) -> Result<(), String> {
        let rooms = content.as_object().ok_or("receipt content is not an object")?;
        for (room, by_type) in rooms {
            for (kind, by_user) in by_type.as_object().into_iter().flatten() {
                for (user, receipt) in by_user.as_object().into_iter().flatten() {
                    let data = receipt.get("data");
                    let ts = data.and_then(|d| d.get("ts")).and_then(Value::as_u64).unwrap_or(0);
                    let thread = data.and_then(|d| d.get("thread_id")).and_then(Value::as_str).map(String::from);
                    let key = (String::from(dest), room.clone(), kind.clone(), user.clone(), thread);
                    let newest = self.receipts.entry(key).or_insert(0);
                    if ts < *newest {
                        return Err(format!(
                            "{dest} got a receipt of {user} in {room} older ({ts}) than one delivered ({newest})"
                        ));
                    }
                    *newest = ts;
                }
            }
        }
        Ok(())
    }

    /// Device lists: each `prev_id` names a stream id this destination accepted for the user
    /// (or is empty: a resync), and is older than the update.
    fn check_device_list(&mut self, dest: &str, content: &Value) -> Result<(), String> {
        let user = content.get("user_id").and_then(Value::as_str).ok_or("device-list update without user_id")?;
        let stream_id =
            content.get("stream_id").and_then(Value::as_u64).ok_or("device-list update without stream_id")?;
        let prev = content.get("prev_id").and_then(Value::as_array).ok_or("device-list update without prev_id")?;
        let seen = self.device_lists_seen.entry((String::from(dest), String::from(user))).or_default();
        match prev.as_slice() {
            [] => {}
            [prev] => {
                let prev = prev.as_u64().ok_or("prev_id holds a non-integer")?;
                if !seen.contains(&prev) || prev >= stream_id {
                    return Err(format!(
                        "{dest}: device-list update {stream_id} of {user} chains to {prev}, \
                         which it never received (it has {seen:?}) or which is not older"
                    ));
                }
            }
            more => return Err(format!("{dest}: device-list update with {} prev_ids", more.len())),
        }
        seen.insert(stream_id);
        Ok(())
    }

    /// An answer reached the sender.
    /// The world gives the engine an input that may drive several destinations at `now`.
    pub(crate) fn on_delivery(&mut self, now: u64) {
        self.last_delivery = now;
    }

    pub(crate) fn on_result(&mut self, dest: &str, txn_id: &str, result: &TransactionResult) {
        if let Some(count) = self.in_flight.get_mut(dest) {
            *count = count.saturating_sub(1);
        }
        if !matches!(result, TransactionResult::Ok { .. }) {
            self.unstaggered.insert(String::from(dest));
        }
        match result {
            TransactionResult::Ok { .. } => {
                self.last_failed.remove(dest);
            }
            TransactionResult::Status { status, .. } if (200..300).contains(status) => {
                self.last_failed.remove(dest);
            }
            // A permanent rejection may split the transaction (D7).
            TransactionResult::Status { status, .. }
                if *status == 413 || (400..500).contains(status) && !matches!(status, 401 | 408 | 429) =>
            {
                self.last_failed.remove(dest);
            }
            _ if self.abandoned.contains(dest) => {}
            _ => {
                self.last_failed.insert(String::from(dest), String::from(txn_id));
            }
        }
    }

    /// Stored backoff tells when the next attempt may come; outbox rows tell which to-device
    /// message each row holds, and deletions which rows are settled.
    pub(crate) fn on_persist(&mut self, changes: &Changes) {
        for row in &changes.to_device_outbox {
            if let Some(key) = to_device_key(row) {
                self.outbox.insert((String::from(row.destination.as_str()), row.outbox_id), key);
            }
        }
        for key in &changes.to_device_deleted {
            if let Some(message) = self.outbox.get(&(String::from(key.destination.as_str()), key.outbox_id)) {
                self.to_device_deleted.insert(message.clone());
            }
        }
        for row in &changes.destinations {
            let dest = String::from(row.destination.as_str());
            if row.retry_last_ts == 0 {
                self.backoff_until.remove(&dest);
            } else {
                self.backoff_until.insert(dest, row.retry_last_ts.saturating_add(row.retry_interval));
            }
        }
    }

    /// A write became durable: its to-device rows are now promised.
    pub(crate) fn on_durable(&mut self, changes: &Changes) {
        for row in &changes.to_device_outbox {
            if let Some(key) = to_device_key(row) {
                self.to_device_owed.insert(key);
            }
        }
        for poke in changes.device_list_pokes.iter().filter(|p| p.device_id.is_some()) {
            let owed = self
                .device_lists_owed
                .entry((String::from(poke.destination.as_str()), poke.user_id.clone()))
                .or_insert(0);
            *owed = (*owed).max(poke.stream_id);
        }
    }

    /// Storage offered these events to catch-up for `dest`.
    pub(crate) fn on_offered(&mut self, dest: &str, events: impl Iterator<Item = String>) {
        for event in events {
            self.offered.insert((String::from(dest), event));
        }
    }

    pub(crate) fn on_event(&mut self, event: &Event) {
        match event {
            Event::Dropped { destination, item, .. } => {
                self.counts.dropped += 1;
                self.dropped.insert((String::from(destination.as_str()), item.clone()));
            }
            Event::CatchUpStarted { destination } => {
                self.counts.catch_ups += 1;
                self.unstaggered.insert(String::from(destination.as_str()));
                self.last_failed.remove(destination.as_str());
                self.abandoned.insert(String::from(destination.as_str()));
            }
            Event::DestinationUp { .. } => self.counts.recoveries += 1,
            _ => {}
        }
    }

    /// The destination contacted us or an operator woke it: it may be tried at once.
    pub(crate) fn on_contact(&mut self, dest: &str) {
        self.backoff_until.remove(dest);
        self.unstaggered.insert(String::from(dest));
    }

    /// The sender process died: its attempts in flight are gone with it, and it restarts
    /// with the backoff that storage kept (writes it had not acknowledged are lost).
    pub(crate) fn on_restart(&mut self, stored: &Changes) {
        self.in_flight.clear();
        self.last_failed.clear();
        self.abandoned.clear();
        self.backoff_until.clear();
        // A restarted sender catches every known destination up, and drives every one with
        // recovered pokes at once.
        for row in &stored.destinations {
            self.unstaggered.insert(String::from(row.destination.as_str()));
        }
        for poke in &stored.device_list_pokes {
            self.unstaggered.insert(String::from(poke.destination.as_str()));
        }
        self.on_persist(stored);
    }

    /// Memory stays bounded while destinations are down (from the engine's own figures).
    pub(crate) fn check_stats(&self, stats_json: &str) -> Result<(), String> {
        let stats: Vec<fedsend_core::DestinationStats> =
            serde_json::from_str(stats_json).map_err(|e| format!("engine stats are not decodable: {e}"))?;
        let bound = u64::from(self.config.pending_pdus_max) + u64::from(self.config.pdus_per_transaction_max);
        for stat in stats {
            if stat.queued_pdus > bound {
                return Err(format!(
                    "{} holds {} PDUs in memory, above pending_pdus_max + one transaction ({bound})",
                    stat.destination, stat.queued_pdus
                ));
            }
        }
        Ok(())
    }
}

/// (destination, sender, message id) of an outbox row.
fn to_device_key(row: &fedsend_core::OutboxRow) -> Option<(String, String, String)> {
    let content = row.edu.get("content")?;
    let sender = content.get("sender").and_then(Value::as_str)?;
    let id = content.get("message_id").and_then(Value::as_str)?;
    Some((String::from(row.destination.as_str()), String::from(sender), String::from(id)))
}
