//! What an answer to a transaction means for its destination: delivered, rejected (with
//! poison isolation: the item the destination refuses is found and given up alone), or a
//! failure that is retried and then backs the destination off.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::backoff::retry_delay_ms;
use crate::config::Config;
use crate::destination::Destination;
use crate::edu::{EduEntry, PokeRef};
use crate::effects::Effects;
use crate::event::Event;
use crate::io::{OutboxKey, TransactionResult};
use crate::transaction::FrozenTransaction;
use crate::types::ServerName;

/// An answer, classified by what the destination does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// 2xx: the transaction is done, per-PDU errors are only reported.
    Delivered { pdu_errors: BTreeMap<String, String> },
    /// 410: wait as long as we ever wait, until the destination contacts us.
    Gone,
    /// 5xx, 429, a timeout or no connection: retry the same transaction, then back off.
    Retryable { retry_after_ms: Option<u64> },
    /// A permanent refusal (413, or 4xx other than 401/408/429) of this exact transaction.
    Rejected { status: u16 },
    /// 3xx, 401, 408: not retried at the HTTP level; the destination backs off.
    Failed,
}

impl Outcome {
    pub(crate) fn of(result: TransactionResult) -> Self {
        match result {
            TransactionResult::Ok { pdu_errors } => Self::Delivered { pdu_errors },
            TransactionResult::Status { status, .. } if (200..300).contains(&status) => {
                Self::Delivered { pdu_errors: BTreeMap::new() }
            }
            TransactionResult::Status { status: 410, .. } => Self::Gone,
            TransactionResult::Status { status, retry_after_ms, .. } if status == 429 || status >= 500 => {
                Self::Retryable { retry_after_ms }
            }
            TransactionResult::Unreachable | TransactionResult::Timeout => Self::Retryable { retry_after_ms: None },
            TransactionResult::Status { status, .. }
                if status == 413 || (400..500).contains(&status) && !matches!(status, 401 | 408) =>
            {
                Self::Rejected { status }
            }
            TransactionResult::Status { .. } => Self::Failed,
        }
    }
}

/// Poison isolation: after a transaction is refused for good, the queue sends ever smaller
/// transactions (halving each time) until the refused item travels alone and is given up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Isolation {
    /// At most this many items per transaction while isolating.
    split_limit: Option<u32>,
    /// Items still under suspicion: isolation ends when they have all been settled.
    suspects: u32,
}

impl Isolation {
    pub(crate) fn limit(&self) -> Option<u32> {
        self.split_limit
    }

    pub(crate) fn active(&self) -> bool {
        self.split_limit.is_some()
    }

    /// A transaction of `count` items was refused: split it.
    fn split(&mut self, count: u32) {
        self.split_limit = Some((count / 2).max(1));
        self.suspects = self.suspects.max(count);
    }

    /// `count` suspects were delivered or given up.
    fn settled(&mut self, count: u32) {
        if self.split_limit.is_some() {
            self.suspects = self.suspects.saturating_sub(count);
            if self.suspects == 0 {
                self.split_limit = None;
            }
        }
    }
}

/// EDUs counted as the items poison isolation splits: a signing-key pair is one item, since
/// it always travels whole (splitting it again would never isolate anything).
fn edu_units(edus: &[EduEntry]) -> usize {
    edus.iter().filter(|e| !(e.device_list.is_some() && e.edu_type == "org.matrix.signing_key_update")).count()
}

impl Destination {
    /// The answer to the attempt in flight.
    pub(crate) fn attempt_finished(
        &mut self,
        name: &ServerName,
        fx: &mut Effects,
        config: &Config,
        result: TransactionResult,
    ) {
        match Outcome::of(result) {
            Outcome::Delivered { pdu_errors } => self.delivered(name, fx, pdu_errors),
            Outcome::Gone => self.record_failure(name, fx, config, Some(config.retry_interval_max_ms)),
            Outcome::Retryable { retry_after_ms } => self.retryable_failure(name, fx, config, retry_after_ms),
            Outcome::Rejected { status } => self.rejected(name, fx, config, status),
            Outcome::Failed => self.record_failure(name, fx, config, None),
        }
    }

    fn delivered(&mut self, name: &ServerName, fx: &mut Effects, pdu_errors: BTreeMap<String, String>) {
        let queue = self.queue();
        queue.http_failures = 0;
        // The frozen transaction is gone if catch-up started while it was in flight.
        let frozen = queue.frozen.take();
        if let (false, Some(frozen)) = (pdu_errors.is_empty(), &frozen) {
            fx.report(Event::PduErrors {
                destination: name.clone(),
                txn_id: frozen.txn_id.to_text(),
                errors: pdu_errors,
            });
        }
        self.last_success_ts = Some(fx.now.as_ms());
        self.clear_backoff(name, fx);
        let Some(frozen) = frozen else { return };
        for edu in &frozen.edus {
            if let Some(outbox_id) = edu.outbox_id {
                fx.changes.to_device_deleted.push(OutboxKey { destination: name.clone(), outbox_id });
            }
        }
        let mut settled: Vec<&PokeRef> = frozen.edus.iter().filter_map(|e| e.device_list.as_ref()).collect();
        settled.dedup();
        for poke in settled {
            self.device_list_settled(name, fx, poke);
            self.device_list_acknowledged(name, fx, poke);
        }
        match &frozen.catch_up {
            Some(room) => self.catch_up_room_done(name, fx, room.stream_ordering),
            None => self.settle_normal(name, fx, &frozen),
        }
    }

    /// A normal transaction is settled (delivered or its item given up): every row up to its
    /// newest PDU is behind us.
    fn settle_normal(&mut self, name: &ServerName, fx: &mut Effects, frozen: &FrozenTransaction) {
        if let Some(queue) = self.queue.as_mut() {
            queue.isolation.settled((frozen.items.len() + frozen.edus.len()) as u32);
        }
        if let Some(up_to) = frozen.delivered_up_to {
            self.advance_last_successful(name, fx, up_to);
        }
    }

    /// A permanent rejection of the frozen transaction. The destination is up — it answered —
    /// so its backoff does not grow; the same transaction is retried a few times (a 413 not at
    /// all), then split to isolate the item it refuses, which is given up alone.
    fn rejected(&mut self, name: &ServerName, fx: &mut Effects, config: &Config, status: u16) {
        let queue = self.queue();
        let isolating = queue.isolation.active();
        let Some(frozen) = queue.frozen.as_mut() else { return };
        frozen.rejections += 1;
        let rejections = frozen.rejections;
        // While isolating a poison item the rejection is already known to be permanent.
        let isolating = isolating || frozen.catch_up.is_some() && rejections > 1;
        let threshold = if status == 413 || isolating { 1 } else { config.poison_rejections_max };
        if rejections < threshold {
            let until = fx.now.plus_ms(retry_delay_ms(&mut fx.rng, rejections, config));
            self.sleep_until(name, until, fx);
            return;
        }
        let Some(frozen) = queue.frozen.take() else { return };
        let reason = format!("rejected by the destination with HTTP {status}");
        match frozen.catch_up {
            Some(mut room)
                if frozen.items.len() > 1 || frozen.items.first().is_some_and(|p| *p.event_id != *room.event_id) =>
            {
                // Fall back to the event we owe, without the extremities.
                room.extremities.clear();
                queue.catch_up_rooms.rooms.push_front(*room);
            }
            Some(room) => {
                for item in frozen.items.iter() {
                    self.give_up(name, fx, item, reason.clone());
                }
                self.catch_up_room_done(name, fx, room.stream_ordering);
            }
            None if frozen.items.len() + edu_units(&frozen.edus) > 1 => {
                let count = (frozen.items.len() + edu_units(&frozen.edus)) as u32;
                for item in frozen.items.iter().rev() {
                    queue.pending_pdus.push_front(item.clone());
                }
                for edu in frozen.edus.into_iter().rev() {
                    queue.edus.push_front(edu);
                }
                queue.isolation.split(count);
            }
            None => {
                for item in frozen.items.iter() {
                    self.give_up(name, fx, item, reason.clone());
                }
                for edu in &frozen.edus {
                    self.give_up_edu(name, fx, edu, reason.clone());
                }
                self.settle_normal(name, fx, &frozen);
            }
        }
    }

    /// A 5xx, 429, timeout or connection failure: retry the same transaction on the long
    /// schedule, then back the destination off.
    fn retryable_failure(&mut self, name: &ServerName, fx: &mut Effects, config: &Config, retry_after_ms: Option<u64>) {
        let queue = self.queue();
        queue.http_failures += 1;
        let retry = queue.http_failures;
        if retry <= config.http_retries_max {
            let delay_ms = retry_delay_ms(&mut fx.rng, retry, config).max(retry_after_ms.unwrap_or(0));
            let until = fx.now.plus_ms(delay_ms);
            self.sleep_until(name, until, fx);
        } else {
            self.record_failure(name, fx, config, retry_after_ms);
        }
    }

    /// Grows the destination's backoff, at least to `floor_ms`, as Synapse's
    /// `RetryDestinationLimiter` does on a failed request.
    fn record_failure(&mut self, name: &ServerName, fx: &mut Effects, config: &Config, floor_ms: Option<u64>) {
        self.queue().http_failures = 0;
        let interval = self.backoff.grow(fx.now, &mut fx.rng, config, floor_ms);
        fx.mark_state_changed(name);
        let until_ts = fx.now.plus_ms(interval).as_ms();
        fx.report(Event::BackingOff { destination: name.clone(), retry_interval_ms: interval, until_ts });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::Activity;
    use crate::destination::tests::{config, drive_once, name, pdu};
    use crate::io::Output;
    use crate::time::Timestamp;

    fn status(status: u16) -> TransactionResult {
        TransactionResult::Status { status, retry_after_ms: Some(7), errcode: None }
    }

    #[test]
    fn answers_are_classified_like_synapse_classifies_them() {
        assert_eq!(Outcome::of(status(204)), Outcome::Delivered { pdu_errors: BTreeMap::new() });
        assert_eq!(Outcome::of(status(410)), Outcome::Gone);
        assert_eq!(Outcome::of(status(429)), Outcome::Retryable { retry_after_ms: Some(7) });
        assert_eq!(Outcome::of(status(503)), Outcome::Retryable { retry_after_ms: Some(7) });
        assert_eq!(Outcome::of(TransactionResult::Timeout), Outcome::Retryable { retry_after_ms: None });
        assert_eq!(Outcome::of(status(400)), Outcome::Rejected { status: 400 });
        assert_eq!(Outcome::of(status(413)), Outcome::Rejected { status: 413 });
        for failed in [301, 401, 408] {
            assert_eq!(Outcome::of(status(failed)), Outcome::Failed, "{failed}");
        }
    }

    #[test]
    fn isolation_halves_and_ends_when_the_suspects_are_settled() {
        let mut isolation = Isolation::default();
        isolation.split(5);
        assert_eq!(isolation.limit(), Some(2));
        isolation.split(2);
        assert_eq!(isolation.limit(), Some(1));
        isolation.settled(4);
        assert!(isolation.active());
        isolation.settled(1);
        assert!(!isolation.active());
    }

    /// Sends the queue's next transaction and answers it with `result`.
    fn answer(
        destination: &mut Destination,
        fx: &mut Effects,
        config: &Config,
        result: TransactionResult,
    ) -> Vec<String> {
        let outputs = drive_once(destination, fx, config);
        let Some(Output::SendTransaction(sent)) = outputs.last() else { panic!("nothing sent: {outputs:?}") };
        destination.queue().activity = Activity::Idle;
        destination.attempt_finished(&name("a.test"), fx, config, result);
        sent.pdu_ids.iter().map(|id| String::from(&**id)).collect()
    }

    #[test]
    fn a_poison_pdu_is_isolated_and_given_up_alone() {
        let mut config = config();
        config.poison_rejections_max = 1;
        let mut fx = Effects::new(0);
        fx.now = Timestamp(1_000);
        let mut destination = Destination::default();
        for (index, id) in ["$1", "$2", "$bad", "$4"].iter().enumerate() {
            destination.queue().pending_pdus.push_back(pdu(id, index as u64 + 1));
        }
        let mut sent = Vec::new();
        for _ in 0..8 {
            if destination.queue.as_ref().is_none_or(|q| q.pending_pdus.is_empty()) {
                break;
            }
            let ids = answer(&mut destination, &mut fx, &config, TransactionResult::Ok { pdu_errors: BTreeMap::new() });
            let poisoned = ids.iter().any(|id| id == "$bad");
            if poisoned {
                destination.queue().frozen = None;
            }
            sent.push(ids);
        }
        assert_eq!(sent, [["$1", "$2", "$bad", "$4"]], "delivered at once when nobody refuses");
        let mut fx = Effects::new(0);
        let mut destination = Destination::default();
        for (index, id) in ["$1", "$2", "$bad", "$4"].iter().enumerate() {
            destination.queue().pending_pdus.push_back(pdu(id, index as u64 + 1));
        }
        let mut attempts = Vec::new();
        while destination.queue.as_ref().is_some_and(|q| !q.pending_pdus.is_empty()) && attempts.len() < 10 {
            let next: Vec<String> =
                destination.queue().pending_pdus.iter().map(|p| String::from(&*p.event_id)).collect();
            let limit = destination.queue().isolation.limit().map_or(next.len(), |l| l as usize);
            let refused = next.iter().take(limit).any(|id| id == "$bad");
            let result = if refused { status(400) } else { TransactionResult::Ok { pdu_errors: BTreeMap::new() } };
            attempts.push(answer(&mut destination, &mut fx, &config, result));
        }
        assert_eq!(attempts.first().unwrap().len(), 4);
        assert_eq!(attempts.last().unwrap(), &["$4"]);
        assert_eq!(destination.dropped_items, 1, "only the poison PDU is given up");
        assert!(!destination.queue().isolation.active());
        assert_eq!(destination.last_successful, Some(4));
        assert!(!destination.backoff.is_failing(), "a refusal is an answer: no backoff");
    }

    #[test]
    fn retryable_failures_retry_the_same_transaction_then_back_off() {
        let config = config();
        let mut fx = Effects::new(0);
        fx.now = Timestamp(1_000);
        let mut destination = Destination::default();
        destination.queue().pending_pdus.push_back(pdu("$1", 1));
        for _ in 0..config.http_retries_max {
            answer(&mut destination, &mut fx, &config, TransactionResult::Unreachable);
            let Activity::Sleeping(until) = destination.activity() else { panic!("not sleeping") };
            fx.now = until;
            assert!(destination.sleep_over(fx.now));
        }
        answer(&mut destination, &mut fx, &config, TransactionResult::Unreachable);
        assert_eq!(destination.backoff.retry_interval_ms, config.retry_interval_min_ms);
        assert_eq!(destination.queue().frozen.as_ref().map(|f| f.attempts), Some(config.http_retries_max + 1));
        answer_after_backoff(&mut destination, &mut fx, &config);
    }

    fn answer_after_backoff(destination: &mut Destination, fx: &mut Effects, config: &Config) {
        fx.now = destination.backoff.retry_at().unwrap();
        destination.sleep_over(fx.now);
        answer(destination, fx, config, status(200));
        assert!(!destination.backoff.is_failing());
        assert!(destination.queue().frozen.is_none());
        assert_eq!(destination.last_successful, Some(1));
    }
}
