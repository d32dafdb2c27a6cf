//! Building transactions: what goes into the next one (EDUs in Synapse's order, then PDUs,
//! within the count and byte limits), its id, and its body
//! `{"edus":[…],"origin":…,"origin_server_ts":…,"pdus":[…]}`.
//!
//! Keys are written in canonical-JSON order and PDUs are embedded as the exact text the host
//! gave (serialized once, shared by every destination), so a frozen body is byte-stable and a
//! host may sign it as it is. A built transaction is frozen: retried with the same id and the
//! same bytes until the destination answers (docs/design.md, "Frozen transactions").

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::config::Config;
use crate::destination::Destination;
use crate::device_lists::NO_POSITIONS;
use crate::edu::{EduEntry, Fit};
use crate::effects::Effects;
use crate::io::{CatchUpRoom, OutgoingTransaction};
use crate::types::{RequestId, ServerName};

/// A built transaction: retried byte for byte until the destination answers 2xx.
#[derive(Debug)]
pub(crate) struct FrozenTransaction {
    pub(crate) txn_id: TxnId,
    pub(crate) body: Arc<str>,
    /// Shared, like the body, by the destinations that froze the same PDUs at the same instant.
    pub(crate) items: Arc<[Arc<PduEntry>]>,
    pub(crate) edus: Vec<EduEntry>,
    pub(crate) attempts: u32,
    /// Permanent rejections (4xx other than 401/408/429) of this exact transaction.
    pub(crate) rejections: u32,
    /// Every `destination_rooms` row up to this stream ordering is delivered on success.
    pub(crate) delivered_up_to: Option<u64>,
    /// For a catch-up transaction: the room it catches up, kept to fall back to the owed
    /// event alone if the destination rejects the extremities. Boxed: every queue holds room
    /// for a frozen transaction, and most are not catch-up ones.
    pub(crate) catch_up: Option<Box<CatchUpRoom>>,
}

impl FrozenTransaction {
    /// Event ids of the PDUs, in body order: built for each attempt's output only, so a
    /// transaction copies its ids once, not twice.
    pub(crate) fn pdu_ids(&self) -> Vec<Arc<str>> {
        self.items.iter().map(|p| p.event_id.clone()).collect()
    }

    /// The next HTTP attempt of this transaction.
    pub(crate) fn attempt(&mut self, request: RequestId, destination: &ServerName) -> OutgoingTransaction {
        self.attempts += 1;
        OutgoingTransaction {
            request,
            destination: destination.clone(),
            txn_id: self.txn_id.to_text(),
            attempt: self.attempts,
            pdu_ids: self.pdu_ids(),
            body: self.body.clone(),
        }
    }
}

/// A transaction id, `{incarnation}.{counter}`, kept as its two numbers and written out only
/// for an attempt's output or a report: a fan-out freezes a transaction for every destination,
/// most of which wait for an in-flight slot before they are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TxnId {
    incarnation: u64,
    counter: u64,
}

impl TxnId {
    pub(crate) fn to_text(self) -> String {
        let mut id = String::with_capacity(41);
        push_decimal(&mut id, self.incarnation);
        id.push('.');
        push_decimal(&mut id, self.counter);
        id
    }
}

/// The PDU-only body built last, with its time and PDUs.
type SharedBody = (u64, Arc<[Arc<PduEntry>]>, Arc<str>);

/// Transaction ids and bodies. Ids are `{incarnation}.{counter}`: the incarnation is
/// persisted before any transaction leaves, so ids never repeat across restarts.
#[derive(Debug)]
pub(crate) struct TransactionBuilder {
    incarnation: u64,
    counter: u64,
    /// A body names no destination: when an event fans out to many destinations at once,
    /// they all freeze the same PDUs at the same instant and share one body.
    last_body: Option<SharedBody>,
    /// The PDUs of the transaction being built, taken from a queue: kept between builds so
    /// that a transaction sharing the last body (and its PDU list) allocates nothing for them.
    taking: Vec<Arc<PduEntry>>,
}

impl TransactionBuilder {
    pub(crate) fn new(incarnation: u64) -> Self {
        Self { incarnation, counter: 0, last_body: None, taking: Vec::new() }
    }

    pub(crate) fn next_txn_id(&mut self) -> TxnId {
        self.counter += 1;
        TxnId { incarnation: self.incarnation, counter: self.counter }
    }

    /// Freezes a transaction of `items` (drained) and `edus` at `now_ms`.
    pub(crate) fn freeze(
        &mut self,
        origin: &ServerName,
        now_ms: u64,
        items: &mut Vec<Arc<PduEntry>>,
        edus: Vec<EduEntry>,
        delivered_up_to: Option<u64>,
        catch_up: Option<CatchUpRoom>,
    ) -> FrozenTransaction {
        let shared = match &self.last_body {
            Some((ts, last_items, body))
                if edus.is_empty()
                    && *ts == now_ms
                    && last_items.len() == items.len()
                    && last_items.iter().zip(items.iter()).all(|(a, b)| Arc::ptr_eq(a, b)) =>
            {
                Some((last_items.clone(), body.clone()))
            }
            _ => None,
        };
        let (items, body) = match shared {
            Some(shared) => {
                items.clear();
                shared
            }
            None => {
                let jsons: Vec<&str> = items.iter().map(|p| &*p.json).collect();
                let edu_jsons: Vec<&str> = edus.iter().map(|e| &*e.json).collect();
                let body: Arc<str> = Arc::from(build_body(origin, now_ms, &jsons, &edu_jsons));
                let items: Arc<[Arc<PduEntry>]> = items.drain(..).collect();
                if edus.is_empty() {
                    self.last_body = Some((now_ms, items.clone(), body.clone()));
                }
                (items, body)
            }
        };
        FrozenTransaction {
            txn_id: self.next_txn_id(),
            body,
            items,
            edus,
            attempts: 0,
            rejections: 0,
            delivered_up_to,
            catch_up: catch_up.map(Box::new),
        }
    }
}

impl Destination {
    /// Builds the next transaction from memory: EDUs in Synapse's order, then the head of the
    /// PDU queue (if `with_pdus`), within the count and byte limits. Items that can never fit
    /// are given up here.
    pub(crate) fn build_from_queue(
        &mut self,
        name: &ServerName,
        fx: &mut Effects,
        config: &Config,
        builder: &mut TransactionBuilder,
        with_pdus: bool,
    ) -> Option<FrozenTransaction> {
        const EDUS_WRAPPER_BYTES: u64 = "\"edus\":[],".len() as u64;
        let now_ms = fx.now.as_ms();
        let overhead = empty_body_len(&config.server_name, now_ms);
        let bytes_max = config.transaction_bytes_max;
        let queue = self.queue.as_mut()?;
        // While isolating a poison item, EDUs and PDUs are not mixed and batches shrink.
        let isolating = queue.isolation.limit();
        let edu_max = config.edus_per_transaction_max;
        let edu_limit = isolating.map_or(edu_max, |limit| limit.min(edu_max)) as usize;
        let mut bytes = overhead;
        let mut edu_count = 0u64;
        let positions = self.device_lists.as_ref().map_or(NO_POSITIONS, |d| &d.positions);
        let taken_edus = queue.edus.take(edu_limit, now_ms, positions, &mut |size| {
            let extra = size as u64 + if edu_count == 0 { EDUS_WRAPPER_BYTES } else { 1 };
            if overhead + EDUS_WRAPPER_BYTES + size as u64 > bytes_max {
                Fit::Never
            } else if bytes + extra > bytes_max {
                Fit::NotNow
            } else {
                bytes += extra;
                edu_count += 1;
                Fit::Yes
            }
        });
        let edus = taken_edus.edus;
        // These users' chains restart in this transaction; its delivery sets their position.
        if let Some(chains) = self.device_lists.as_mut() {
            for poke in edus.iter().filter_map(|e| e.device_list.as_ref()) {
                chains.resets.remove(&poke.user_id);
            }
        }
        let with_pdus = with_pdus && (isolating.is_none() || edus.is_empty());
        // The isolation limit halves a transaction of PDUs and EDUs together, so it may
        // exceed either count limit on its own.
        let pdu_max = config.pdus_per_transaction_max;
        let count_max = if with_pdus { isolating.map_or(pdu_max, |limit| limit.min(pdu_max)) as usize } else { 0 };
        let mut taken = core::mem::take(&mut builder.taking);
        let mut too_large: Vec<Arc<PduEntry>> = Vec::new();
        while taken.len() < count_max {
            let Some(next) = queue.pending_pdus.front() else { break };
            let size = next.json.len() as u64 + u64::from(!taken.is_empty());
            if bytes + size > bytes_max {
                if overhead + next.json.len() as u64 > bytes_max {
                    too_large.extend(queue.pending_pdus.pop_front());
                    continue;
                }
                break;
            }
            bytes += size;
            taken.extend(queue.pending_pdus.pop_front());
        }
        let reason = || String::from("larger than transaction_bytes_max on its own");
        for entry in too_large {
            self.give_up(name, fx, &entry, reason());
        }
        for edu in &taken_edus.too_large {
            self.give_up_edu(name, fx, edu, reason());
        }
        if taken.is_empty() && edus.is_empty() {
            builder.taking = taken;
            return None;
        }
        let delivered_up_to = taken.iter().map(|p| p.stream_ordering).max();
        let frozen = builder.freeze(&config.server_name, now_ms, &mut taken, edus, delivered_up_to, None);
        builder.taking = taken;
        Some(frozen)
    }
}

/// A PDU queued for one or more destinations; shared, never copied per destination.
#[derive(Debug)]
pub(crate) struct PduEntry {
    /// Shared with every attempt's `pdu_ids`: an attempt copies a pointer, not the id.
    pub(crate) event_id: Arc<str>,
    /// Its position in the events stream.
    pub(crate) stream_ordering: u64,
    /// The federation JSON, compact, keys sorted.
    pub(crate) json: Arc<str>,
    /// When it was queued (Unix ms), for the oldest-pending-age figure.
    pub(crate) queued_at_ms: u64,
}

/// Builds a transaction body from already-serialized PDUs and EDUs.
pub(crate) fn build_body(origin: &ServerName, origin_server_ts: u64, pdus: &[&str], edus: &[&str]) -> String {
    let payload: usize = pdus.iter().chain(edus).map(|item| item.len() + 1).sum();
    let mut body = String::with_capacity(64 + origin.as_str().len() + payload);
    body.push('{');
    if !edus.is_empty() {
        body.push_str("\"edus\":[");
        push_joined(&mut body, edus);
        body.push_str("],");
    }
    body.push_str("\"origin\":");
    // A server name is ASCII without quotes or backslashes (validated), so it needs no escaping.
    body.push('"');
    body.push_str(origin.as_str());
    body.push('"');
    body.push_str(",\"origin_server_ts\":");
    push_decimal(&mut body, origin_server_ts);
    body.push_str(",\"pdus\":[");
    push_joined(&mut body, pdus);
    body.push_str("]}");
    body
}

/// Length of a body with no PDUs and no EDUs, computed without building it: transaction
/// assembly needs it for every transaction to apply the byte cap.
pub(crate) fn empty_body_len(origin: &ServerName, origin_server_ts: u64) -> u64 {
    const FIXED: &str = r#"{"origin":"","origin_server_ts":,"pdus":[]}"#;
    let digits = origin_server_ts.checked_ilog10().unwrap_or(0) as usize + 1;
    (FIXED.len() + origin.as_str().len() + digits) as u64
}

/// Appends `value` in decimal: what `write!` prints, without the formatting machinery, which
/// costs as much as the rest of a small body (two numbers per transaction).
pub(crate) fn push_decimal(out: &mut String, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    // ASCII digits: always UTF-8, so this never falls back.
    out.push_str(core::str::from_utf8(&digits[at..]).unwrap_or_default());
}

fn push_joined(body: &mut String, items: &[&str]) {
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_canonical_json() {
        let origin = ServerName::parse("test").unwrap();
        let body =
            build_body(&origin, 1000000, &[r#"{"a":1}"#, r#"{"b":2}"#], &[r#"{"content":{},"edu_type":"m.typing"}"#]);
        assert_eq!(
            body,
            r#"{"edus":[{"content":{},"edu_type":"m.typing"}],"origin":"test","origin_server_ts":1000000,"pdus":[{"a":1},{"b":2}]}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), body, "keys must already be sorted");
        assert_eq!(build_body(&origin, 5, &[], &[]), r#"{"origin":"test","origin_server_ts":5,"pdus":[]}"#);
        for ts in [0, 5, 9, 10, 99, 100, 999_999, 1_000_000, 1_764_000_000_000, u64::MAX] {
            assert_eq!(empty_body_len(&origin, ts), build_body(&origin, ts, &[], &[]).len() as u64, "{ts}");
            let mut text = String::from("x");
            push_decimal(&mut text, ts);
            assert_eq!(text, alloc::format!("x{ts}"));
        }
    }

    fn pdu(id: &str, size: usize) -> Arc<PduEntry> {
        let padding = "x".repeat(size.saturating_sub(20));
        let json = alloc::format!("{{\"event_id\":\"{id}\",\"p\":\"{padding}\"}}");
        Arc::new(PduEntry { event_id: id.into(), stream_ordering: 1, json: Arc::from(json), queued_at_ms: 0 })
    }

    #[test]
    fn ids_count_up_within_an_incarnation_and_identical_pdus_share_one_body() {
        let origin = ServerName::parse("us.test").unwrap();
        let mut builder = TransactionBuilder::new(7);
        let shared = alloc::vec![pdu("$1", 30)];
        let a = builder.freeze(&origin, 5, &mut shared.clone(), Vec::new(), Some(1), None);
        let b = builder.freeze(&origin, 5, &mut shared.clone(), Vec::new(), Some(1), None);
        let later = builder.freeze(&origin, 6, &mut shared.clone(), Vec::new(), Some(1), None);
        let ids = [a.txn_id, b.txn_id, later.txn_id].map(TxnId::to_text);
        assert_eq!(ids, ["7.1", "7.2", "7.3"]);
        assert!(Arc::ptr_eq(&a.body, &b.body), "same PDUs at the same instant: one body");
        assert!(Arc::ptr_eq(&a.items, &b.items), "and one list of them");
        assert!(!Arc::ptr_eq(&a.body, &later.body));
        let mut frozen = a;
        let first = frozen.attempt(RequestId(1), &origin);
        let second = frozen.attempt(RequestId(2), &origin);
        assert_eq!((first.attempt, second.attempt), (1, 2));
        assert_eq!((first.txn_id, first.body), (second.txn_id, second.body), "retried byte for byte");
    }

    #[test]
    fn a_queue_is_cut_at_the_byte_cap_and_a_pdu_too_large_alone_is_given_up() {
        let mut config = Config::new(ServerName::parse("us.test").unwrap());
        config.transaction_bytes_max = 1024;
        let mut fx = Effects::new(0);
        let mut builder = TransactionBuilder::new(1);
        let mut destination = Destination::default();
        let queue = destination.queue();
        queue.pending_pdus.extend([pdu("$a", 500), pdu("$huge", 2000), pdu("$b", 400), pdu("$c", 400)]);
        let name = ServerName::parse("a.test").unwrap();
        let frozen = destination.build_from_queue(&name, &mut fx, &config, &mut builder, true).unwrap();
        assert_eq!(frozen.pdu_ids(), [Arc::<str>::from("$a"), Arc::from("$b")]);
        assert!(frozen.body.len() <= 1024);
        assert_eq!(destination.dropped_items, 1);
        let frozen = destination.build_from_queue(&name, &mut fx, &config, &mut builder, true).unwrap();
        assert_eq!(frozen.pdu_ids(), [Arc::<str>::from("$c")]);
        assert!(destination.build_from_queue(&name, &mut fx, &config, &mut builder, true).is_none());
    }
}
