//! Catch-up: sending what storage holds for a destination, room by room, before anything
//! queued in memory. Storage has a `destination_rooms` row for every event owed; a
//! destination catches up after an outage, after a restart, when its memory queue overflowed,
//! and whenever it is woken with nothing in memory (docs/design.md, "Catch-up whenever
//! storage may be ahead").

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::config::Config;
use crate::destination::{Activity, Destination};
use crate::effects::{Effects, PendingRequest};
use crate::event::Event;
use crate::io::{CatchUpRoom, Output};
use crate::transaction::{FrozenTransaction, PduEntry, TransactionBuilder, empty_body_len};
use crate::types::{RequestId, ServerName};

/// Whether a destination sends from storage, kept in its compact record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CatchUp {
    /// Storage may hold rows for this destination that memory does not: send from storage
    /// before anything queued in memory.
    pub(crate) active: bool,
    /// The newest PDU fanned out (or dropped from memory) while catching up: its row may sit
    /// in a write not yet stored, so catch-up cannot end before storage holds every row up to
    /// it.
    pub(crate) last_skipped: u64,
}

impl CatchUp {
    /// A scan found no rooms up to `searched_to`, below which storage holds every row.
    /// Returns whether catch-up is over: not while a skipped PDU's row may still be on its way
    /// to storage. Once past it, an empty scan ends catch-up even if that PDU's room left no
    /// row (purged), a case Synapse's `_catch_up_transmission_loop` in
    /// `per_destination_queue.py` spins on.
    pub(crate) fn scan_found_nothing(&mut self, searched_to: u64) -> bool {
        if self.last_skipped > searched_to {
            return false;
        }
        self.last_skipped = 0;
        self.active = false;
        true
    }
}

/// The rooms of the current catch-up scan, kept in the queue.
#[derive(Debug, Default)]
pub(crate) struct CatchUpRooms {
    /// Rooms loaded and not yet sent, ascending by stream ordering.
    pub(crate) rooms: VecDeque<CatchUpRoom>,
    /// Where the scan stands; `None` until it starts from the last successful position.
    pub(crate) position: Option<u64>,
    /// How far the last scan that found nothing looked: no use asking again before storage
    /// holds rows beyond it.
    pub(crate) searched_to: Option<u64>,
}

impl CatchUpRooms {
    /// The scan's position, started at `last_successful` if it has none yet.
    pub(crate) fn position_from(&mut self, last_successful: Option<u64>) -> u64 {
        *self.position.get_or_insert(last_successful.unwrap_or(0))
    }

    /// A room up to `up_to` is settled: the scan continues after it.
    pub(crate) fn room_done(&mut self, up_to: u64) {
        self.position = Some(self.position.unwrap_or(0).max(up_to));
    }
}

/// Issues the query for a destination's rows in `(after, up_to]`.
fn query_rows(fx: &mut Effects, config: &Config, destination: &ServerName, after: u64, up_to: u64) -> RequestId {
    let request = fx.request(PendingRequest::CatchUp { destination: destination.clone(), after, up_to });
    let limit = config.catch_up_batch_max;
    fx.output(Output::LoadCatchUp { request, destination: destination.clone(), after, up_to, limit });
    request
}

impl Destination {
    /// Drops the in-memory PDU queue; storage drives delivery from now on. After a long
    /// outage (`drop_ephemeral`) queued presence, receipts and typing are stale and go too,
    /// as in Synapse.
    pub(crate) fn start_catching_up(&mut self, name: &ServerName, fx: &mut Effects, drop_ephemeral: bool) {
        self.catch_up.active = true;
        if let Some(queue) = self.queue.as_mut() {
            // PDUs dropped from memory count as skipped: their rows may sit in a write not yet
            // emitted, so catch-up must look again until it has seen them.
            let newest_dropped = queue
                .pending_pdus
                .iter()
                .chain(queue.frozen.iter().flat_map(|f| f.items.iter()))
                .map(|p| p.stream_ordering)
                .max()
                .unwrap_or(0);
            self.catch_up.last_skipped = self.catch_up.last_skipped.max(newest_dropped);
            let mut stale = if drop_ephemeral { queue.edus.clear_ephemeral() } else { Vec::new() };
            queue.pending_pdus.clear();
            queue.isolation = Default::default();
            // The abandoned transaction's PDUs are covered by storage, its to-device messages by
            // the outbox and its device-list changes by their pokes. Its plain and keyed EDUs
            // go back to the queue, to go first, unless stale. Its receipts, presence and typing
            // go with it: requeued as opaque EDUs they could overtake newer ones.
            if let Some(frozen) = queue.frozen.take() {
                for edu in frozen.edus.into_iter().rev() {
                    if edu.outbox_id.is_some() || (!drop_ephemeral && !edu.is_state()) {
                        queue.edus.push_front(edu);
                    } else if drop_ephemeral && edu.device_list.is_none() && !edu.is_state() {
                        stale.push(edu);
                    }
                }
            }
            queue.catch_up_rooms = CatchUpRooms::default();
            queue.http_failures = 0;
            // Accepted and never to be sent: reported, as every given-up item is.
            for edu in stale {
                self.give_up_edu(name, fx, &edu, String::from("stale: the destination was unreachable for long"));
            }
        }
        fx.report(Event::CatchUpStarted { destination: name.clone() });
    }

    /// Asks storage for the next rooms owed, up to `up_to`, below which storage holds every row
    /// this process fanned out.
    pub(crate) fn load_catch_up(&mut self, name: &ServerName, fx: &mut Effects, config: &Config, up_to: u64) {
        let last_successful = self.last_successful;
        let after = self.queue().catch_up_rooms.position_from(last_successful);
        let request = query_rows(fx, config, name, after, up_to);
        self.queue().activity = Activity::LoadingCatchUp(request);
    }

    /// Storage answered a catch-up query up to `up_to`: send its rooms, or finish if there are
    /// none and no row may still be on its way.
    pub(crate) fn catch_up_loaded(&mut self, name: &ServerName, fx: &mut Effects, rooms: Vec<CatchUpRoom>, up_to: u64) {
        let Some(queue) = self.queue.as_mut() else { return };
        queue.activity = Activity::Idle;
        if rooms.is_empty() {
            if self.catch_up.scan_found_nothing(up_to) {
                queue.catch_up_rooms.position = None;
                queue.catch_up_rooms.searched_to = None;
                fx.report(Event::CatchUpFinished { destination: name.clone() });
            } else {
                queue.catch_up_rooms.searched_to = Some(up_to);
            }
        } else {
            queue.catch_up_rooms.searched_to = None;
            queue.catch_up_rooms.rooms.extend(rooms);
        }
        fx.mark_dirty(name.clone());
    }

    /// A catch-up room is settled (sent or given up): storage's row for it is behind us.
    pub(crate) fn catch_up_room_done(&mut self, name: &ServerName, fx: &mut Effects, up_to: u64) {
        if let Some(queue) = self.queue.as_mut() {
            queue.catch_up_rooms.room_done(up_to);
        }
        self.advance_last_successful(name, fx, up_to);
    }

    /// The last successful position only grows (docs/design.md, "A last successful position
    /// that never moves backwards").
    pub(crate) fn advance_last_successful(&mut self, name: &ServerName, fx: &mut Effects, up_to: u64) {
        if self.last_successful.is_none_or(|current| up_to > current) {
            self.last_successful = Some(up_to);
            fx.mark_state_changed(name);
        }
    }

    /// One room of catch-up, as Synapse's `_catch_up_transmission_loop` builds it: the newest
    /// visible forward extremities, or the event we owe if it is one of them, if the room is
    /// partial-state, or if none is visible. `owed_only` is the fallback after the destination
    /// rejected the extremities. `None` when the room was given up.
    pub(crate) fn build_catch_up(
        &mut self,
        name: &ServerName,
        fx: &mut Effects,
        config: &Config,
        builder: &mut TransactionBuilder,
        room: CatchUpRoom,
        owed_only: bool,
    ) -> Option<FrozenTransaction> {
        let position = self.queue.as_ref().and_then(|q| q.catch_up_rooms.position).unwrap_or(0);
        let owed_is_extremity = room.extremities.iter().any(|e| e.event_id == room.event_id);
        let entry = |event_id: &str, stream_ordering: u64, pdu: &serde_json::Value| {
            Arc::new(PduEntry {
                event_id: Arc::from(event_id),
                stream_ordering,
                // serde_json::Value always serializes.
                json: Arc::from(serde_json::to_string(pdu).unwrap_or_default()),
                queued_at_ms: 0,
            })
        };
        let now_ms = fx.now.as_ms();
        let overhead = empty_body_len(&config.server_name, now_ms);
        let bytes_max = config.transaction_bytes_max;
        // Why a PDU can never leave: too large for any transaction, or nested too deeply for
        // the parsers on its way.
        let undeliverable = |p: &PduEntry, pdu: &serde_json::Value| {
            if overhead + p.json.len() as u64 > bytes_max {
                return Some(String::from("larger than transaction_bytes_max on its own"));
            }
            crate::nesting::pdu_too_deep(pdu)
        };
        let mut chosen: Vec<Arc<PduEntry>> = Vec::new();
        if !owed_is_extremity && !room.partial_state && !owed_only {
            for extremity in &room.extremities {
                if extremity.stream_ordering >= position && extremity.visible {
                    let candidate = entry(&extremity.event_id, extremity.stream_ordering, &extremity.pdu);
                    match undeliverable(&candidate, &extremity.pdu) {
                        None => chosen.push(candidate),
                        Some(reason) => self.give_up(name, fx, &candidate, reason),
                    }
                }
            }
        }
        if chosen.is_empty() {
            let owed = entry(&room.event_id, room.stream_ordering, &room.pdu);
            if let Some(reason) = room.undeliverable.clone().or_else(|| undeliverable(&owed, &room.pdu)) {
                self.give_up(name, fx, &owed, reason);
                self.catch_up_room_done(name, fx, room.stream_ordering);
                return None;
            }
            chosen.push(owed);
        }
        // Newest first, as many as the count and byte limits allow; the first always fits.
        let mut bytes = overhead;
        let mut fitting = 0;
        for candidate in &chosen {
            bytes += candidate.json.len() as u64 + u64::from(fitting > 0);
            if bytes > bytes_max || fitting >= config.pdus_per_transaction_max as usize {
                break;
            }
            fitting += 1;
        }
        chosen.truncate(fitting.max(1));
        let up_to = room.stream_ordering;
        Some(builder.freeze(&config.server_name, now_ms, &mut chosen, Vec::new(), Some(up_to), Some(room)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::Driving;
    use crate::destination::tests::{config, drive_once, name, pdu};
    use crate::directory::DestId;
    use crate::io::Extremity;
    use crate::limiter::InFlightLimiter;
    use crate::time::Timestamp;
    use alloc::collections::BTreeSet;
    use serde_json::json;

    fn room(event_id: &str, stream_ordering: u64, extremities: &[(&str, u64, bool)]) -> CatchUpRoom {
        CatchUpRoom {
            room_id: "!r".into(),
            stream_ordering,
            event_id: event_id.into(),
            pdu: json!({ "event_id": event_id }),
            partial_state: false,
            extremities: extremities
                .iter()
                .map(|(id, so, visible)| Extremity {
                    event_id: (*id).into(),
                    stream_ordering: *so,
                    visible: *visible,
                    pdu: json!({ "event_id": id }),
                })
                .collect(),
            undeliverable: None,
        }
    }

    #[test]
    fn an_empty_scan_ends_catch_up_only_past_the_last_skipped_pdu() {
        let mut catch_up = CatchUp { active: true, last_skipped: 9 };
        assert!(!catch_up.scan_found_nothing(5), "the skipped PDU's row may not be stored yet");
        assert!(!catch_up.scan_found_nothing(5), "nor on a second look at the same rows");
        assert!(catch_up.active);
        assert!(catch_up.scan_found_nothing(9), "its row is stored and was not found: purged");
        assert!(!catch_up.active);
        assert_eq!(catch_up.last_skipped, 0);
        let mut rooms = CatchUpRooms::default();
        assert_eq!(rooms.position_from(Some(3)), 3);
        rooms.room_done(2);
        assert_eq!(rooms.position, Some(3), "the position never moves back");
    }

    #[test]
    fn a_room_sends_its_visible_extremities_or_else_the_owed_event() {
        let config = config();
        let mut fx = Effects::new(0);
        let mut builder = TransactionBuilder::new(1);
        let mut destination = Destination::default();
        let a = name("a.test");
        let frozen = destination
            .build_catch_up(
                &a,
                &mut fx,
                &config,
                &mut builder,
                room("$owed", 5, &[("$x", 6, true), ("$y", 7, false)]),
                false,
            )
            .unwrap();
        assert_eq!(frozen.pdu_ids(), [Arc::<str>::from("$x")]);
        assert_eq!(frozen.delivered_up_to, Some(5));
        let frozen = destination
            .build_catch_up(&a, &mut fx, &config, &mut builder, room("$owed", 5, &[("$x", 6, true)]), true)
            .unwrap();
        assert_eq!(frozen.pdu_ids(), [Arc::<str>::from("$owed")], "the fallback after a rejection");
        let mut given_up = room("$owed", 8, &[]);
        given_up.undeliverable = Some("purged".into());
        assert!(destination.build_catch_up(&a, &mut fx, &config, &mut builder, given_up, false).is_none());
        assert_eq!(destination.dropped_items, 1);
        assert_eq!(destination.last_successful, Some(8));
    }

    #[test]
    fn catching_up_drops_memory_and_finishes_on_an_empty_scan() {
        let config = config();
        let mut fx = Effects::new(0);
        fx.now = Timestamp(1);
        let mut destination = Destination::default();
        destination.queue().pending_pdus.push_back(pdu("$1", 4));
        destination.start_catching_up(&name("a.test"), &mut fx, false);
        assert!(destination.queue().pending_pdus.is_empty());
        assert_eq!(destination.catch_up.last_skipped, 4);
        let outputs = drive_once(&mut destination, &mut fx, &config);
        assert!(matches!(&outputs[..], [Output::Event { .. }, Output::LoadCatchUp { after: 0, .. }]));
        destination.catch_up_loaded(&name("a.test"), &mut fx, Vec::new(), 0);
        assert!(destination.catch_up.active, "the skipped PDU at 4 is beyond the rows stored");
        let mut builder = TransactionBuilder::new(1);
        let mut limiter = InFlightLimiter::default();
        let mut awaiting_rows = BTreeSet::new();
        let mut ctx = Driving {
            id: DestId(0),
            config: &config,
            builder: &mut builder,
            limiter: &mut limiter,
            rows_stored_to: 0,
            awaiting_rows: &mut awaiting_rows,
        };
        destination.drive(&name("a.test"), &mut fx, &mut ctx);
        assert_eq!(fx.poll_output(), None, "no second query before more rows are stored");
        assert!(ctx.awaiting_rows.contains(&name("a.test")));
        ctx.rows_stored_to = 4;
        destination.drive(&name("a.test"), &mut fx, &mut ctx);
        assert!(matches!(fx.poll_output(), Some(Output::LoadCatchUp { after: 0, up_to: 4, .. })));
        destination.catch_up_loaded(&name("a.test"), &mut fx, Vec::new(), 4);
        assert!(!destination.catch_up.active);
    }

    #[test]
    fn an_abandoned_transaction_requeues_its_edus_or_reports_them_when_stale() {
        for drop_ephemeral in [false, true] {
            let mut fx = Effects::new(0);
            let mut destination = Destination::default();
            let plain = crate::edu::EduEntry::new("org.example.test", &json!({"n": 1}));
            let typing = crate::edu::EduEntry::new("m.typing", &json!({"n": 2}));
            destination.queue().frozen = Some(FrozenTransaction {
                txn_id: TransactionBuilder::new(1).next_txn_id(),
                body: Arc::from("{}"),
                items: Arc::new([]),
                edus: alloc::vec![plain, typing],
                attempts: 3,
                rejections: 0,
                delivered_up_to: None,
                catch_up: None,
            });
            destination.start_catching_up(&name("a.test"), &mut fx, drop_ephemeral);
            let outputs: Vec<Output> = core::iter::from_fn(|| fx.poll_output()).collect();
            let dropped: Vec<&str> = outputs
                .iter()
                .filter_map(|output| match output {
                    Output::Event { event: Event::Dropped { item, .. } } => Some(item.as_str()),
                    _ => None,
                })
                .collect();
            let queued = destination.queue().edus.len();
            if drop_ephemeral {
                assert_eq!((dropped, queued), (alloc::vec!["org.example.test"], 0), "stale: reported");
                assert_eq!(destination.dropped_items, 1);
            } else {
                assert_eq!((dropped.len(), queued), (0, 1), "the plain EDU goes back, the typing notice goes");
            }
        }
    }
}
