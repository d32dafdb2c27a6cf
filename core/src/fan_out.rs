//! Fan-out: new events are fetched from the homeserver in batches, each is routed to the
//! destinations that should get it (a `destination_rooms` row for each, and the PDU in their
//! memory queue), and the events-stream position advances only as far as the rows are
//! durable, so a crash never loses an event's rows.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::config::Config;
use crate::destination::Destination;
use crate::directory::{DestId, Directory};
use crate::effects::{Effects, PendingRequest};
use crate::event::Event;
use crate::io::{Changes, DestinationRoom, Output, PduInfo};
use crate::transaction::PduEntry;
use crate::types::{ServerName, server_of};

/// Where fan-out stands in the homeserver's events stream.
#[derive(Debug)]
pub(crate) struct FanOut {
    /// Events up to here are fanned out in memory (`events_out_pos`).
    pub(crate) position: u64,
    /// The highest stream ordering the homeserver announced.
    last_notified: u64,
    fetching: bool,
    /// Start positions of fan-out batches not yet durable (a multiset): the stored position
    /// never passes the smallest, so a crash cannot lose rows of claimed events.
    unflushed: BTreeMap<u64, u32>,
    /// The highest position written so far.
    claimed: u64,
    /// The position before the fan-out handled in the current input, if any.
    batch_from: Option<u64>,
}

impl FanOut {
    pub(crate) fn new(recovered_position: u64) -> Self {
        Self {
            position: recovered_position,
            last_notified: recovered_position,
            fetching: false,
            unflushed: BTreeMap::new(),
            claimed: recovered_position,
            batch_from: None,
        }
    }

    /// The homeserver persisted events up to `up_to`; fetch them unless a fetch is under way
    /// (its answer fetches again if needed).
    pub(crate) fn notified(&mut self, up_to: u64, fx: &mut Effects, config: &Config) {
        self.last_notified = self.last_notified.max(up_to);
        if !self.fetching && self.last_notified > self.position {
            self.fetch(fx, config);
        }
    }

    pub(crate) fn fetch(&mut self, fx: &mut Effects, config: &Config) {
        let after = self.position;
        let request = fx.request(PendingRequest::FetchEvents { after, known: self.last_notified });
        self.fetching = true;
        fx.output(Output::FetchEvents { request, after, limit: config.events_batch_max });
    }

    /// A fetch failed; it is issued again.
    pub(crate) fn fetch_again(&mut self, fx: &mut Effects, config: &Config) {
        self.fetching = false;
        self.fetch(fx, config);
    }

    /// A batch from `after` was routed, its last event at `last` (if any). A short batch
    /// proves storage had nothing more up to `known`, what was announced when it was asked.
    /// Fetches the next batch if there may be one.
    pub(crate) fn batch_routed(
        &mut self,
        after: u64,
        known: u64,
        last: Option<u64>,
        full_batch: bool,
        fx: &mut Effects,
        config: &Config,
    ) {
        let mut position = last.unwrap_or(after);
        if !full_batch {
            position = position.max(known);
        }
        self.last_notified = self.last_notified.max(position);
        self.position = position;
        // In the same batch as the rows: the position never gets ahead of durable rows.
        fx.changes.events_out_pos = Some(position);
        self.batch_from = Some(self.batch_from.unwrap_or(after).min(after));
        self.fetching = false;
        if full_batch || self.last_notified > self.position {
            self.fetch(fx, config);
        }
    }

    /// The highest position that may be persisted: the current one, unless an earlier
    /// fan-out write still has to become durable.
    fn claimable(&self) -> u64 {
        self.unflushed.keys().next().map_or(self.position, |from| (*from).min(self.position))
    }

    /// Storage holds every row of events up to here: none sits in a batch of the current
    /// input (not yet emitted) or in an earlier batch not yet durable (in flight, or failed
    /// and awaiting its retry). Never decreases.
    pub(crate) fn rows_stored_to(&self) -> u64 {
        self.batch_from.map_or(self.claimable(), |from| from.min(self.claimable()))
    }

    /// Prepares a batch about to be emitted: caps the position it claims, and records it
    /// as unflushed if it carries rows. Returns the batch's fan-out start, if any.
    pub(crate) fn claim(&mut self, changes: &mut Changes) -> Option<u64> {
        // Only a batch with rows has to become durable before later positions are claimed.
        let batch_from = self.batch_from.take().filter(|_| !changes.destination_rooms.is_empty());
        if changes.events_out_pos.is_some() {
            // A batch is atomic, so it may claim its own events; but never events whose rows
            // sit in an earlier batch not yet durable: a crash would lose them.
            let claimable = self.claimable();
            changes.events_out_pos = (claimable > self.claimed).then_some(claimable);
            if let Some(claimed) = changes.events_out_pos {
                self.claimed = claimed;
            }
        }
        if let Some(from) = batch_from {
            *self.unflushed.entry(from).or_insert(0) += 1;
        }
        batch_from
    }

    /// The batch that started at `from` is durable. Returns a position held back behind it
    /// that may be claimed now.
    pub(crate) fn batch_durable(&mut self, from: u64) -> Option<u64> {
        if let Some(count) = self.unflushed.get_mut(&from) {
            *count -= 1;
            if *count == 0 {
                self.unflushed.remove(&from);
            }
        }
        let claimable = self.claimable();
        (claimable > self.claimed).then_some(claimable)
    }
}

/// What became of a PDU offered to a destination.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// Not held in memory: the destination is backed off for long, or catching up, and its
    /// `destination_rooms` row makes catch-up send it.
    LeftToStorage,
    Queued,
    /// Queued, and the queue is now over `pending_pdus_max`.
    Overflowing,
}

impl Destination {
    pub(crate) fn enqueue_pdu(&mut self, entry: &Arc<PduEntry>, fx: &Effects, config: &Config) -> Enqueued {
        if !self.backoff.due_within(fx.now, config.catch_up_threshold_ms) {
            // Not worth holding in memory while it is down for long.
            self.catch_up.active = true;
            self.catch_up.last_skipped = entry.stream_ordering;
            if let Some(queue) = self.queue.as_mut() {
                queue.pending_pdus.clear();
            }
            return Enqueued::LeftToStorage;
        }
        if self.catch_up.active {
            self.catch_up.last_skipped = entry.stream_ordering;
            return Enqueued::Queued;
        }
        let queue = self.queue();
        queue.pending_pdus.push_back(entry.clone());
        if queue.pending_pdus.len() > config.pending_pdus_max as usize {
            Enqueued::Overflowing
        } else {
            Enqueued::Queued
        }
    }
}

/// Routing state kept between events: the destinations the last host list resolved to, and
/// where the last event's rows sit in the batch being built.
#[derive(Debug, Default)]
pub(crate) struct Router {
    /// The last event's candidate servers as handed in (hosts or partial-state servers, then
    /// the invitee's server) and the server it was sent on behalf of.
    last_candidates: Vec<ServerName>,
    last_on_behalf_of: Option<ServerName>,
    /// What they resolved to: sorted by name, deduplicated, filtered.
    last_targets: Vec<DestId>,
    /// The last event's room and its rows in `Changes::destination_rooms`, one per target in
    /// target order, while the batch holding them is being built.
    last_rows: Option<(Arc<str>, usize)>,
}

impl Router {
    /// A new batch of changes is being built: rows of earlier batches are out of reach.
    pub(crate) fn batch_started(&mut self) {
        self.last_rows = None;
    }

    /// Decides the destinations of one event, as Synapse's `handle_event` in
    /// `federation/sender/__init__.py` does, and queues it for them.
    pub(crate) fn route(&mut self, destinations: &mut Directory, fx: &mut Effects, config: &Config, info: PduInfo) {
        // Since room version 12 a room id is `!` and an opaque hash, without a server part.
        if !info.room_id.starts_with('!') || info.room_id.len() < 2 {
            let reason = format!("invalid room id {:?}", info.room_id);
            fx.report(Event::EventSkipped { event_id: info.event_id, reason });
            return;
        }
        let is_local = server_of(&info.sender) == Some(config.server_name.as_str());
        if !is_local && info.send_on_behalf_of.is_none() {
            return;
        }
        if info.out_of_band || !info.proactively_send || !info.has_prev_events {
            return;
        }
        if let Some(reason) = crate::nesting::pdu_too_deep(&info.pdu) {
            fx.report(Event::EventSkipped { event_id: info.event_id, reason });
            return;
        }
        let mut candidates: Vec<ServerName> = info.partial_state_servers.unwrap_or(info.hosts);
        candidates.extend(info.invitee_server);
        // Events of one room come with the same servers: resolving them (a sort, a lookup per
        // name) once per host list instead of once per event is most of routing's cost.
        let same_targets = candidates == self.last_candidates && info.send_on_behalf_of == self.last_on_behalf_of;
        if !same_targets {
            self.resolve(destinations, config, &candidates, info.send_on_behalf_of.as_ref());
            self.last_candidates = candidates;
            self.last_on_behalf_of = info.send_on_behalf_of;
        }
        if self.last_targets.is_empty() {
            return;
        }
        let Ok(json) = serde_json::to_string(&info.pdu) else {
            // serde_json::Value always serializes; keep the machine alive regardless.
            return;
        };
        let entry = Arc::new(PduEntry {
            event_id: Arc::from(info.event_id),
            stream_ordering: info.stream_ordering,
            json: Arc::from(json),
            queued_at_ms: fx.now.as_ms(),
        });
        self.write_rows(fx, same_targets, destinations, info.room_id, info.stream_ordering);
        let mut overflowing: Vec<DestId> = Vec::new();
        for &id in &self.last_targets {
            match destinations.at_mut(id).1.enqueue_pdu(&entry, fx, config) {
                Enqueued::LeftToStorage => continue,
                Enqueued::Queued => {}
                Enqueued::Overflowing => overflowing.push(id),
            }
            fx.mark_dirty_id(id);
        }
        for id in overflowing {
            // Memory stays bounded while a server is slow or down: storage has every row.
            let (name, destination) = destinations.at_mut(id);
            destination.start_catching_up(name, fx, false);
        }
    }

    /// Sorted and deduplicated (the order a set would give), then filtered, then interned.
    fn resolve(
        &mut self,
        destinations: &mut Directory,
        config: &Config,
        candidates: &[ServerName],
        on_behalf_of: Option<&ServerName>,
    ) {
        let mut names: Vec<&ServerName> = candidates.iter().collect();
        names.sort_unstable();
        names.dedup();
        names.retain(|name| Some(*name) != on_behalf_of && **name != config.server_name && config.handles(name));
        self.last_rows = None;
        self.last_targets.clear();
        self.last_targets.extend(names.into_iter().map(|name| destinations.intern(name)));
    }

    /// A `destination_rooms` row per target. An event in the same room as the previous one,
    /// for the same targets, in the same batch, only moves those rows forward: the batch keeps
    /// the newest position per (destination, room) anyway, and a burst in one room would
    /// otherwise write a row per (event, destination) to be sorted and dropped at the flush.
    fn write_rows(
        &mut self,
        fx: &mut Effects,
        same_targets: bool,
        destinations: &Directory,
        room_id: String,
        stream_ordering: u64,
    ) {
        let rows = &mut fx.changes.destination_rooms;
        if same_targets
            && let Some((room, start)) = &self.last_rows
            && **room == *room_id
            && let Some(previous) = rows.get_mut(*start..*start + self.last_targets.len())
        {
            for row in previous {
                row.stream_ordering = row.stream_ordering.max(stream_ordering);
            }
            return;
        }
        let start = rows.len();
        rows.reserve(self.last_targets.len());
        let room_id: Arc<str> = Arc::from(room_id);
        for &id in &self.last_targets {
            rows.push(DestinationRoom {
                destination: destinations.name(id).clone(),
                room_id: room_id.clone(),
                stream_ordering,
            });
        }
        self.last_rows = Some((room_id, start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::tests::{config, name, pdu};
    use crate::time::Timestamp;
    use serde_json::json;

    fn info(stream_ordering: u64, hosts: &[&str]) -> PduInfo {
        serde_json::from_value(json!({
            "event_id": format!("${stream_ordering}"),
            "room_id": "!room",
            "stream_ordering": stream_ordering,
            "sender": "@alice:us.test",
            "hosts": hosts,
            "pdu": {"type": "m.room.message"},
        }))
        .unwrap()
    }

    #[test]
    fn the_stored_position_waits_for_earlier_batches_with_rows() {
        let config = config();
        let mut fx = Effects::new(0);
        let mut fan_out = FanOut::new(10);
        fan_out.notified(20, &mut fx, &config);
        assert!(matches!(fx.poll_output(), Some(Output::FetchEvents { after: 10, .. })));
        fan_out.batch_routed(10, 20, Some(15), false, &mut fx, &config);
        assert_eq!(fan_out.position, 20, "a short batch proves nothing more up to what was known");
        let mut first = core::mem::take(&mut fx.changes);
        first.destination_rooms.push(DestinationRoom {
            destination: name("a.test"),
            room_id: "!r".into(),
            stream_ordering: 15,
        });
        assert_eq!(fan_out.claim(&mut first), Some(10));
        assert_eq!(first.events_out_pos, Some(20), "a batch is atomic: it may claim its own events");
        fan_out.notified(30, &mut fx, &config);
        fan_out.batch_routed(20, 30, None, false, &mut fx, &config);
        let mut second = core::mem::take(&mut fx.changes);
        assert_eq!(fan_out.claim(&mut second), None);
        assert_eq!(second.events_out_pos, None, "held back behind the first batch");
        assert_eq!(fan_out.batch_durable(10), Some(30));
    }

    #[test]
    fn an_event_is_queued_for_its_remote_hosts_and_a_row_written_for_each() {
        let config = config();
        let mut fx = Effects::new(0);
        fx.now = Timestamp(5);
        let mut destinations = Directory::default();
        let mut router = Router::default();
        router.route(&mut destinations, &mut fx, &config, info(1, &["b.test", "us.test", "a.test", "b.test"]));
        let rows: Vec<_> = fx.changes.destination_rooms.iter().map(|r| r.destination.as_str()).collect();
        assert_eq!(rows, ["a.test", "b.test"]);
        assert_eq!(destinations.len(), 2);
        let mut popped = || fx.pop_dirty(&destinations).map(|id| destinations.name(id).clone());
        assert_eq!((popped(), popped()), (Some(name("a.test")), Some(name("b.test"))));
        // The same room and servers again in the same batch: the rows move forward.
        router.route(&mut destinations, &mut fx, &config, info(2, &["b.test", "us.test", "a.test", "b.test"]));
        let rows: Vec<_> = fx.changes.destination_rooms.iter().map(|r| r.stream_ordering).collect();
        assert_eq!(rows, [2, 2]);
        router.batch_started();
        router.route(&mut destinations, &mut fx, &config, info(3, &["b.test", "us.test", "a.test", "b.test"]));
        assert_eq!(fx.changes.destination_rooms.len(), 4, "rows of an emitted batch are not touched");
    }

    #[test]
    fn a_long_backed_off_or_overflowing_destination_is_left_to_storage() {
        let mut config = config();
        config.pending_pdus_max = 1;
        let mut fx = Effects::new(0);
        fx.now = Timestamp(1_000);
        let mut down = Destination::default();
        down.backoff.retry_last_ts = 1_000;
        down.backoff.retry_interval_ms = config.catch_up_threshold_ms + 1;
        assert_eq!(down.enqueue_pdu(&pdu("$1", 1), &fx, &config), Enqueued::LeftToStorage);
        assert!(down.catch_up.active);
        let mut slow = Destination::default();
        assert_eq!(slow.enqueue_pdu(&pdu("$1", 1), &fx, &config), Enqueued::Queued);
        assert_eq!(slow.enqueue_pdu(&pdu("$2", 2), &fx, &config), Enqueued::Overflowing);
    }
}
