//! Invariants checked on every step of a simulation, and the convergence target.
//!
//! The checker watches the boundary only — what left the engine and what the world answered
//! — so it judges every engine the same way and knows nothing of the core's internals.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fedsend_core::{Changes, Config, Event, Input, OutgoingTransaction, TransactionResult};
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
    /// Commands the engine refused at input (each checked to have changed nothing).
    pub refused_inputs: u64,
    /// Events fan-out skipped with a reason (nested too deeply to be sent).
    pub events_skipped: u64,
    /// Ephemeral items (typing, receipts, presence, plain and keyed EDUs) the engine accepted
    /// and queued for a destination, each then owed until delivered or superseded.
    pub ephemeral_owed: u64,
    /// Of those, typing, receipts and presence lost when their destination started catching
    /// up (Synapse drops them too; docs/design.md, section 4).
    pub ephemeral_lost_to_catch_up: u64,
    /// Of those, items lost with the memory of a crashed sender (only to-device messages and
    /// device lists are durable).
    pub ephemeral_lost_to_crash: u64,
}

/// Identity of an ephemeral item for one destination: a newer accepted item with the same
/// identity supersedes an older one still owed (keyed EDUs, D3 receipts, presence per user).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum EphemeralKey {
    /// An EDU without a key: every one is owed on its own, numbered by acceptance.
    Plain { edu_type: String, accepted: u64 },
    /// A keyed EDU (typing is one, keyed by room and user as the core keys it).
    Keyed { edu_type: String, key: String },
    /// A read receipt under D3.
    Receipt { room: String, receipt_type: String, user: String, thread: Option<String> },
    /// A user's presence.
    Presence { user: String },
}

impl EphemeralKey {
    fn edu_type(&self) -> &str {
        match self {
            Self::Plain { edu_type, .. } | Self::Keyed { edu_type, .. } => edu_type,
            Self::Receipt { .. } => "m.receipt",
            Self::Presence { .. } => "m.presence",
        }
    }

    /// Typing, receipts and presence are what a destination loses when it starts catching up
    /// (`EduQueue::clear_ephemeral`, and the abandoned transaction's ephemeral EDUs, as
    /// Synapse's `_catch_up_transmission_loop` entry drops its pending EDUs); an EDU the
    /// homeserver addressed to one destination is promised "sent at once" (`Input::Edu`).
    fn lost_to_catch_up(&self) -> bool {
        match self {
            Self::Plain { .. } => false,
            Self::Keyed { edu_type, .. } => edu_type == "m.typing",
            Self::Receipt { .. } | Self::Presence { .. } => true,
        }
    }
}

/// What must reach the destination for an owed ephemeral item to be settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Expected {
    /// This EDU content, exactly.
    Content(Value),
    /// A receipt of the same identity at least this new (`data.ts`).
    ReceiptTs(u64),
    /// This presence state of the user.
    Presence(String),
}

#[derive(Clone, Debug)]
pub(crate) struct OwedEphemeral {
    /// When the engine accepted it, on the checker's own sequence.
    pub(crate) accepted: u64,
    pub(crate) expected: Expected,
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
    /// Events fan-out skipped with a reason: owed to nobody.
    pub(crate) skipped_events: BTreeSet<String>,
    /// Per destination, the ephemeral items accepted and not yet delivered, superseded or
    /// lost as the design allows.
    pub(crate) ephemeral: BTreeMap<String, BTreeMap<EphemeralKey, OwedEphemeral>>,
    /// `Dropped` reports per (destination, EDU type), each covering one plain EDU.
    dropped_edus: BTreeMap<(String, String), u64>,
    /// Orders acceptances against later reports.
    sequence: u64,
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
            skipped_events: BTreeSet::new(),
            ephemeral: BTreeMap::new(),
            dropped_edus: BTreeMap::new(),
            sequence: 0,
            counts: Counts::default(),
        }
    }

    /// The engine accepted a command: the ephemeral data it queued is now owed, to the
    /// destinations the core's own rules queue it for. Those rules hinge on backoff, which
    /// the checker knows from the rows the engine persisted (and contact clearing them).
    pub(crate) fn on_input_accepted(&mut self, now: u64, input: &Input) {
        self.sequence += 1;
        let accepted = self.sequence;
        let us = self.config.server_name.as_str();
        let threshold_ms = self.config.catch_up_threshold_ms;
        let retry_at = |dest: &str| self.backoff_until.get(dest).copied();
        // `Backoff::active` and `Backoff::due_within`.
        let not_backing_off = |dest: &str| retry_at(dest).is_none_or(|at| at <= now);
        let due_soon = |dest: &str| retry_at(dest).is_none_or(|at| at <= now.saturating_add(threshold_ms));
        let mut owed: Vec<(String, EphemeralKey, Expected)> = Vec::new();
        match input {
            Input::Edu { destination, edu_type, content, key } => {
                let edu_type = edu_type.clone();
                let identity = match key {
                    Some(key) => EphemeralKey::Keyed { edu_type, key: key.clone() },
                    None => EphemeralKey::Plain { edu_type, accepted },
                };
                owed.push((String::from(destination.as_str()), identity, Expected::Content(content.clone())));
            }
            Input::Typing { room_id, user_id, typing, hosts } => {
                let content = serde_json::json!({ "room_id": room_id, "typing": typing, "user_id": user_id });
                for host in hosts.iter().map(|h| h.as_str()).filter(|h| *h != us && not_backing_off(h)) {
                    let key =
                        EphemeralKey::Keyed { edu_type: String::from("m.typing"), key: format!("{room_id} {user_id}") };
                    owed.push((String::from(host), key, Expected::Content(content.clone())));
                }
            }
            Input::Receipt { receipt, hosts, .. } => {
                let ts = receipt.data.get("ts").and_then(Value::as_u64).unwrap_or(0);
                for host in hosts.iter().map(|h| h.as_str()).filter(|h| *h != us && due_soon(h)) {
                    let key = EphemeralKey::Receipt {
                        room: receipt.room_id.clone(),
                        receipt_type: receipt.receipt_type.clone(),
                        user: receipt.user_id.clone(),
                        thread: receipt.thread_id.clone(),
                    };
                    owed.push((String::from(host), key, Expected::ReceiptTs(ts)));
                }
            }
            Input::Presence { states, destinations } if self.config.presence_enabled => {
                for host in destinations.iter().map(|h| h.as_str()).filter(|h| *h != us && due_soon(h)) {
                    for state in states {
                        let key = EphemeralKey::Presence { user: state.user_id.clone() };
                        owed.push((String::from(host), key, Expected::Presence(state.presence.clone())));
                    }
                }
            }
            _ => {}
        }
        for (dest, key, expected) in owed {
            self.counts.ephemeral_owed += 1;
            self.ephemeral.entry(dest).or_default().insert(key, OwedEphemeral { accepted, expected });
        }
    }

    /// The engine refused a command (the world checked that it changed nothing).
    pub(crate) fn on_input_refused(&mut self) {
        self.counts.refused_inputs += 1;
    }

    /// A remote got an EDU: it settles the owed item it matches, if any.
    fn settle_edu(&mut self, dest: &str, edu_type: &str, content: &Value) {
        let Some(owed) = self.ephemeral.get_mut(dest) else { return };
        let matches = |key: &EphemeralKey, item: &OwedEphemeral| {
            key.edu_type() == edu_type && item.expected == Expected::Content(content.clone())
        };
        // One delivery settles one plain EDU (the oldest alike), or the keyed one it carries.
        let plain = owed.iter().find(|(k, item)| matches!(k, EphemeralKey::Plain { .. }) && matches(k, item));
        if let Some((key, _)) = plain {
            let key = key.clone();
            owed.remove(&key);
            return;
        }
        owed.retain(|key, item| !(matches!(key, EphemeralKey::Keyed { .. }) && matches(key, item)));
    }

    /// Whatever accepted ephemeral item is still owed to a destination: `None` when every one
    /// arrived, was superseded by a newer one that arrived, or was given up with a `Dropped`
    /// report (or lost in a crash or at the start of catch-up, where the design allows it).
    pub(crate) fn ephemeral_unsettled(&self) -> Option<String> {
        for (dest, owed) in &self.ephemeral {
            let mut plain_left: BTreeMap<&str, u64> = BTreeMap::new();
            for key in owed.keys() {
                if let EphemeralKey::Plain { edu_type, .. } = key {
                    *plain_left.entry(edu_type.as_str()).or_insert(0) += 1;
                }
            }
            for (key, item) in owed {
                if let EphemeralKey::Plain { edu_type, .. } = key {
                    let dropped = self.dropped_edus.get(&(dest.clone(), edu_type.clone())).copied().unwrap_or(0);
                    if plain_left.get(edu_type.as_str()).copied().unwrap_or(0) <= dropped {
                        continue;
                    }
                }
                return Some(format!(
                    "{dest} lacks {key:?} = {:?} accepted at #{}, and it was neither delivered nor reported dropped",
                    ShortExpected(&item.expected),
                    item.accepted
                ));
            }
        }
        None
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
            if !routed(event) && !self.offered.contains(&(String::from(dest), String::from(&**event))) {
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
    pub(crate) fn on_accepted(
        &mut self,
        dest: &str,
        pdu_ids: &[alloc::sync::Arc<str>],
        edus: &[Value],
    ) -> Result<(), String> {
        self.counts.accepted += 1;
        self.received.entry(String::from(dest)).or_default().extend(pdu_ids.iter().map(|id| String::from(&**id)));
        for (index, edu) in edus.iter().enumerate() {
            let (Some(kind), Some(content)) = (edu.get("edu_type").and_then(Value::as_str), edu.get("content")) else {
                return Err(format!("malformed EDU sent to {dest}: {edu}"));
            };
            self.counts.edus += 1;
            match kind {
                "m.presence" => {
                    let pushed = content.get("push").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
                    let states = pushed.len();
                    if states == 0 || states > fedsend_core::PRESENCE_STATES_PER_EDU_MAX {
                        return Err(format!("presence EDU to {dest} with {states} states"));
                    }
                    self.settle_presence(dest, pushed);
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
                _ => self.settle_edu(dest, kind, content),
            }
        }
        Ok(())
    }

    fn settle_presence(&mut self, dest: &str, pushed: &[Value]) {
        let Some(owed) = self.ephemeral.get_mut(dest) else { return };
        for state in pushed {
            let (Some(user), Some(presence)) =
                (state.get("user_id").and_then(Value::as_str), state.get("presence").and_then(Value::as_str))
            else {
                continue;
            };
            let key = EphemeralKey::Presence { user: String::from(user) };
            if owed.get(&key).is_some_and(|item| item.expected == Expected::Presence(String::from(presence))) {
                owed.remove(&key);
            }
        }
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
                    let owed_key = EphemeralKey::Receipt {
                        room: room.clone(),
                        receipt_type: kind.clone(),
                        user: user.clone(),
                        thread: data.and_then(|d| d.get("thread_id")).and_then(Value::as_str).map(String::from),
                    };
                    if let Some(owed) = self.ephemeral.get_mut(dest)
                        && owed
                            .get(&owed_key)
                            .is_some_and(|item| matches!(item.expected, Expected::ReceiptTs(t) if t <= ts))
                    {
                        owed.remove(&owed_key);
                    }
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

    /// A report from the engine. Giving something up without saying why is a failure: the
    /// reason is all an operator gets.
    pub(crate) fn on_event(&mut self, event: &Event) -> Result<(), String> {
        self.sequence += 1;
        match event {
            Event::Dropped { destination, item, reason } => {
                if reason.trim().is_empty() {
                    return Err(format!("{item} dropped for {destination} without a reason"));
                }
                self.counts.dropped += 1;
                let dest = String::from(destination.as_str());
                self.dropped.insert((dest.clone(), item.clone()));
                *self.dropped_edus.entry((dest.clone(), item.clone())).or_insert(0) += 1;
                // A non-plain EDU given up settles every owed item of its type accepted before.
                if let Some(owed) = self.ephemeral.get_mut(&dest) {
                    owed.retain(|key, _| matches!(key, EphemeralKey::Plain { .. }) || key.edu_type() != item);
                }
            }
            Event::EventSkipped { event_id, reason } => {
                if reason.trim().is_empty() {
                    return Err(format!("event {event_id} skipped without a reason"));
                }
                self.counts.events_skipped += 1;
                self.skipped_events.insert(event_id.clone());
            }
            Event::CatchUpStarted { destination } => {
                if let Some(owed) = self.ephemeral.get_mut(destination.as_str()) {
                    let before = owed.len();
                    owed.retain(|key, _| !key.lost_to_catch_up());
                    self.counts.ephemeral_lost_to_catch_up += (before - owed.len()) as u64;
                }
                self.counts.catch_ups += 1;
                self.unstaggered.insert(String::from(destination.as_str()));
                self.last_failed.remove(destination.as_str());
                self.abandoned.insert(String::from(destination.as_str()));
            }
            Event::DestinationUp { .. } => self.counts.recoveries += 1,
            _ => {}
        }
        Ok(())
    }

    /// The destination contacted us or an operator woke it: it may be tried at once.
    pub(crate) fn on_contact(&mut self, dest: &str) {
        self.backoff_until.remove(dest);
        self.unstaggered.insert(String::from(dest));
    }

    /// The sender process died: its attempts in flight are gone with it, and it restarts
    /// with the backoff that storage kept (writes it had not acknowledged are lost).
    pub(crate) fn on_restart(&mut self, stored: &Changes) {
        let lost: usize = self.ephemeral.values().map(BTreeMap::len).sum();
        self.counts.ephemeral_lost_to_crash += lost as u64;
        self.ephemeral.clear();
        self.dropped_edus.clear();
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

/// An expected item for a failure message: a huge EDU content is cut short.
struct ShortExpected<'a>(&'a Expected);

impl core::fmt::Debug for ShortExpected<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Expected::Content(content) => {
                let text = content.to_string();
                let head: String = text.chars().take(200).collect();
                let more = if head.len() < text.len() { "…" } else { "" };
                write!(f, "{head}{more} ({} bytes)", text.len())
            }
            other => write!(f, "{other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use fedsend_core::ServerName;
    use serde_json::json;

    fn name(text: &str) -> ServerName {
        ServerName::parse(text).unwrap()
    }

    fn checker() -> Checker {
        Checker::new(Config::new(name("origin.sim")))
    }

    fn edu(edu_type: &str, content: Value, key: Option<&str>) -> Input {
        Input::Edu { destination: name("r0.sim"), edu_type: edu_type.into(), content, key: key.map(String::from) }
    }

    fn deliver(checker: &mut Checker, dest: &str, edus: Vec<Value>) {
        checker.on_accepted(dest, &[], &edus).unwrap();
    }

    #[test]
    fn an_accepted_edu_neither_delivered_nor_dropped_is_reported() {
        let mut checker = checker();
        checker.on_input_accepted(0, &edu("org.example.test", json!({ "n": 1 }), None));
        let unsettled = checker.ephemeral_unsettled().expect("an accepted EDU is owed");
        assert!(unsettled.starts_with("r0.sim lacks Plain"), "{unsettled}");
        // Another destination getting it does not settle it.
        deliver(&mut checker, "r1.sim", vec![json!({ "edu_type": "org.example.test", "content": { "n": 1 } })]);
        assert!(checker.ephemeral_unsettled().is_some());
        deliver(&mut checker, "r0.sim", vec![json!({ "edu_type": "org.example.test", "content": { "n": 1 } })]);
        assert_eq!(checker.ephemeral_unsettled(), None);
    }

    #[test]
    fn each_plain_edu_needs_its_own_delivery_or_drop_report() {
        let mut checker = checker();
        for _ in 0..2 {
            checker.on_input_accepted(0, &edu("org.example.test", json!({}), None));
        }
        deliver(&mut checker, "r0.sim", vec![json!({ "edu_type": "org.example.test", "content": {} })]);
        assert!(checker.ephemeral_unsettled().is_some(), "two alike were accepted, one arrived");
        let dropped = |reason: &str| Event::Dropped {
            destination: name("r0.sim"),
            item: "org.example.test".into(),
            reason: reason.into(),
        };
        assert!(checker.on_event(&dropped(" ")).is_err(), "a drop must say why");
        checker.on_event(&dropped("larger than transaction_bytes_max on its own")).unwrap();
        assert_eq!(checker.ephemeral_unsettled(), None);
    }

    #[test]
    fn a_keyed_edu_is_settled_by_the_newest_of_its_key() {
        let mut checker = checker();
        checker.on_input_accepted(0, &edu("org.example.test", json!({ "n": 1 }), Some("k")));
        checker.on_input_accepted(0, &edu("org.example.test", json!({ "n": 2 }), Some("k")));
        deliver(&mut checker, "r0.sim", vec![json!({ "edu_type": "org.example.test", "content": { "n": 1 } })]);
        assert!(checker.ephemeral_unsettled().is_some(), "the older one does not settle the newer");
        deliver(&mut checker, "r0.sim", vec![json!({ "edu_type": "org.example.test", "content": { "n": 2 } })]);
        assert_eq!(checker.ephemeral_unsettled(), None);
    }

    #[test]
    fn catch_up_forgives_typing_but_not_an_edu() {
        let typing = Input::Typing {
            room_id: "!r:origin.sim".into(),
            user_id: "@u:origin.sim".into(),
            typing: true,
            hosts: vec![name("r0.sim"), name("origin.sim")],
        };
        let started = Event::CatchUpStarted { destination: name("r0.sim") };
        let mut checker = checker();
        checker.on_input_accepted(0, &typing);
        checker.on_input_accepted(0, &edu("org.example.test", json!(null), None));
        assert_eq!(checker.counts.ephemeral_owed, 2, "nothing is owed to ourselves");
        checker.on_event(&started).unwrap();
        assert_eq!(checker.counts.ephemeral_lost_to_catch_up, 1, "the typing notice");
        let unsettled = checker.ephemeral_unsettled().expect("the EDU was promised");
        assert!(unsettled.contains("org.example.test"), "{unsettled}");
    }

    #[test]
    fn typing_is_not_owed_to_a_destination_backing_off() {
        let mut checker = checker();
        let mut changes = Changes::default();
        changes.destinations.push(fedsend_core::DestinationState {
            destination: name("r0.sim"),
            retry_last_ts: 1_000,
            retry_interval: 60_000,
            failure_ts: Some(1_000),
            last_successful_stream_ordering: None,
        });
        checker.on_persist(&changes);
        let typing = Input::Typing {
            room_id: "!r:origin.sim".into(),
            user_id: "@u:origin.sim".into(),
            typing: true,
            hosts: vec![name("r0.sim")],
        };
        checker.on_input_accepted(2_000, &typing);
        assert_eq!(checker.ephemeral_unsettled(), None, "the core skips typing for a destination backing off");
        checker.on_input_accepted(61_000, &typing);
        assert!(checker.ephemeral_unsettled().is_some(), "the backoff has ended");
    }
}
