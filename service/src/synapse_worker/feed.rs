//! What Synapse's replication stream announces, turned into the core's inputs.
//!
//! Replication is mostly a doorbell: for the events, to-device and device-list streams the
//! rows only say that something new is in PostgreSQL, and the durable work is read from
//! there (so a missed line costs nothing: the next doorbell, a POSITION or a reconnection
//! reads it). Typing, receipts and presence travel in the rows themselves and are fed as
//! they come, like Synapse's own sender does; receipts replication lost (a gap, e.g. while
//! Redis was down) are read back from `receipts_linearized`, as Synapse's worker does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fedsend_core::{Event, ServerName, server_of};
use fedsend_synapse::config::InstanceLocation;
use fedsend_synapse::http_gap::StreamUpdatesClient;
use fedsend_synapse::pg::{DeviceListOptions, Ownership, PgError, SynapseDb};
use fedsend_synapse::redis_link::{LinkEvent, Publisher};
use fedsend_synapse::replication::{
    CachesRow, EventsRow, GapSource, PresenceFederationRow, PresenceRow, ReceiptRow, Stream, StreamRow, Token,
    TypingRow, Update,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::serve::driver::{DriverHandle, now_ms};
use crate::serve::metrics::Metrics;
use crate::synapse_worker::presence::PresenceChanges;
use crate::synapse_worker::store::AnnouncedEvents;

/// Rows read from PostgreSQL per query when a doorbell rings.
const ROWS_PER_READ: u32 = 500;
/// How often reads that failed (PostgreSQL down) are tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Turns replication into inputs of one driver.
pub struct Feeder {
    db: SynapseDb,
    ownership: Ownership,
    devices: DeviceListOptions,
    server_name: String,
    driver: DriverHandle,
    publisher: Publisher,
    /// Highest `device_federation_outbox` stream id handed to the core.
    to_device_after: u64,
    /// Highest `device_lists_outbound_pokes` stream id handed to the core.
    device_lists_after: u64,
    /// Who is typing in each room, as the typing stream last said (it sends whole sets).
    typing: BTreeMap<String, BTreeSet<String>>,
    /// Which presence rows are worth sending.
    presence: PresenceChanges,
    /// How far the store may read events.
    announced: AnnouncedEvents,
    /// The newest events position for `announce_events` to tell the core.
    events_announcer: watch::Sender<u64>,
    /// A read failed: read everything again at the next retry tick.
    retry_reads: bool,
    /// Receipts replication lost, per writer: (after, up_to] still to be read from the
    /// database (kept across a failed read, so PostgreSQL being down loses none).
    receipt_gaps: BTreeMap<String, (Token, Token)>,
    /// Where the writers of in-memory streams answer for rows a gap lost (`instance_map`).
    writers: BTreeMap<String, InstanceLocation>,
    /// `worker_replication_secret`.
    replication_secret: Option<String>,
    /// Where problems are reported for `/health`.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Feeder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feeder").field("instance", &self.ownership.instance).finish_non_exhaustive()
    }
}

impl Feeder {
    /// A feeder for `driver`.
    #[allow(clippy::too_many_arguments)] // each is a distinct collaborator
    pub fn new(
        db: SynapseDb,
        ownership: Ownership,
        devices: DeviceListOptions,
        server_name: String,
        driver: DriverHandle,
        publisher: Publisher,
        writers: BTreeMap<String, InstanceLocation>,
        replication_secret: Option<String>,
        metrics: Arc<Metrics>,
        announced: AnnouncedEvents,
    ) -> Self {
        Self {
            db,
            ownership,
            devices,
            server_name,
            driver,
            publisher,
            to_device_after: 0,
            device_lists_after: 0,
            typing: BTreeMap::new(),
            presence: PresenceChanges::default(),
            announced,
            events_announcer: watch::Sender::new(0),
            retry_reads: false,
            receipt_gaps: BTreeMap::new(),
            writers,
            replication_secret,
            metrics,
        }
    }

    /// Runs until `link` closes or `stop` turns true. `core_events` are the core's events:
    /// a destination that answers again is announced to every process (`REMOTE_SERVER_UP`).
    pub async fn run(
        mut self,
        mut link: mpsc::Receiver<LinkEvent>,
        mut core_events: mpsc::UnboundedReceiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) {
        let announcing = tokio::spawn(announce_events(self.driver.clone(), self.events_announcer.subscribe()));
        // Work stored while no sender ran is read at once, not at the next event.
        self.read_all().await;
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    if *stop.borrow() {
                        break;
                    }
                }
                event = link.recv() => match event {
                    Some(event) => self.on_link(event).await,
                    None => break,
                },
                Some(event) = core_events.recv() => self.on_core_event(event).await,
                _ = retry.tick() => {
                    if self.retry_reads {
                        self.read_all().await;
                    }
                }
            }
        }
        announcing.abort();
    }

    async fn on_core_event(&mut self, event: Event) {
        if let Event::DestinationUp { destination } = event {
            if let Err(e) = self.publisher.remote_server_up(destination.as_str()).await {
                debug!(%destination, "REMOTE_SERVER_UP not published: {e}");
            }
        }
    }

    async fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected { reconnection } => {
                info!(reconnection, "replication connected");
                // Anything published while disconnected is lost on Redis: read it back.
                self.read_all().await;
            }
            LinkEvent::Disconnected => warn!("replication disconnected; reconnecting"),
            LinkEvent::Update(update) => self.on_update(update).await,
        }
    }

    async fn on_update(&mut self, update: Update) {
        match update {
            Update::Rows { stream, token, rows, .. } => self.on_rows(stream, token, rows).await,
            Update::Gap { stream, instance, from, to } if stream.gap_source() == GapSource::WriterHttp => {
                self.fill_gap(stream, &instance, from, to).await;
            }
            Update::Gap { stream: Stream::Receipts, instance, from, to } => {
                // A writer's gaps are merged while one waits (PostgreSQL down): receipts that came
                // in between are then sent twice, which a remote takes as the same receipt.
                let gap = self.receipt_gaps.entry(instance).or_insert((from, to));
                gap.1 = gap.1.max(to);
                self.read_receipt_gaps().await;
            }
            Update::Position { stream, token, .. } | Update::Gap { stream, to: token, .. } => {
                self.doorbell(stream, token).await;
            }
            Update::Reset { stream: Stream::Typing, .. } => self.typing.clear(),
            Update::RemoteServerUp { server } => match ServerName::parse(&server) {
                Ok(destination) => self.feed(json!({"type": "remote_up", "destination": destination})).await,
                Err(e) => debug!(server, "REMOTE_SERVER_UP for an invalid name: {e}"),
            },
            other => debug!(?other, "replication update not needed by a sender"),
        }
    }

    /// Rows of an in-memory stream lost while disconnected: only their writer has them, on its
    /// replication listener. Without an answer they are lost, as they are for Synapse's worker
    /// (typing and presence are refreshed by their next change).
    async fn fill_gap(&mut self, stream: Stream, instance: &str, from: Token, to: Token) {
        if stream == Stream::Federation {
            // Nothing a sender must send travels on it; acknowledging keeps the writer's queue short.
            return self.acknowledge_federation(to).await;
        }
        let Some(location) = self.writers.get(instance).cloned() else {
            return warn!(instance, ?stream, "no instance_map entry for the writer; rows {from}..{to} are lost");
        };
        let rows = match StreamUpdatesClient::new(instance, location, self.replication_secret.clone()) {
            Ok(client) => client.fetch_rows(stream, from, to).await,
            Err(e) => return warn!(instance, ?stream, "cannot ask the writer for rows {from}..{to}: {e}"),
        };
        match rows {
            Ok(rows) => {
                debug!(instance, ?stream, rows = rows.len(), "filled a replication gap {from}..{to}");
                for (token, row) in rows {
                    self.on_rows(stream, token, vec![row]).await;
                }
            }
            Err(e) => warn!(instance, ?stream, "rows {from}..{to} could not be fetched and are lost: {e}"),
        }
    }

    /// Something new may be stored for `stream` up to `token`.
    async fn doorbell(&mut self, stream: Stream, token: Token) {
        match stream {
            Stream::Events => self.new_events(token).await,
            Stream::ToDevice => self.read_to_device().await,
            Stream::DeviceLists => self.read_device_lists().await,
            Stream::Federation => self.acknowledge_federation(token).await,
            _ => {}
        }
    }

    async fn on_rows(&mut self, stream: Stream, token: Token, rows: Vec<StreamRow>) {
        match stream {
            Stream::Events | Stream::ToDevice | Stream::DeviceLists | Stream::Federation => {
                self.doorbell(stream, token).await;
            }
            _ => {
                for row in rows {
                    match row {
                        StreamRow::Typing(row) => self.typing(row).await,
                        StreamRow::Receipts(row) => self.receipt(row).await,
                        StreamRow::Presence(row) => self.presence(row).await,
                        StreamRow::PresenceFederation(row) => self.presence_to_one(row).await,
                        StreamRow::Caches(row) => self.cache_invalidated(row).await,
                        StreamRow::Events(EventsRow::Event(_)) => self.new_events(token).await,
                        _ => {}
                    }
                }
            }
        }
    }

    /// Another process (a federation reader, the main process) heard from a destination and
    /// cleared its backoff in the database, invalidating the cache of it: wake it here at
    /// once rather than when the backoff would have expired. Synapse's own sender waits for
    /// its timer or for new traffic.
    async fn cache_invalidated(&mut self, row: CachesRow) {
        if row.cache_func != "get_destination_retry_timings" {
            return;
        }
        let names = row.keys.unwrap_or_default();
        for name in names.iter().filter_map(Value::as_str) {
            let Ok(destination) = ServerName::parse(name) else { continue };
            if !self.ownership.owns(name) || name == self.server_name {
                continue;
            }
            match self.db.retry_timings_cleared(name).await {
                Ok(true) => self.feed(json!({"type": "remote_up", "destination": destination})).await,
                Ok(false) => {}
                Err(e) => self.failed("reading a destination's retry timings", &e),
            }
        }
    }

    async fn feed(&self, input: Value) {
        if let Err(e) = self.driver.input(input).await {
            warn!("the core refused a replicated item: {}", e.error);
        }
    }

    fn is_local(&self, user_id: &str) -> bool {
        server_of(user_id) == Some(self.server_name.as_str())
    }

    fn failed(&mut self, what: &str, error: &PgError) {
        warn!("{what}: {error}; trying again in {} s", RETRY_INTERVAL.as_secs());
        self.metrics.report_problem(now_ms(), format!("{what}: {error}"));
        self.retry_reads = true;
    }

    async fn read_all(&mut self) {
        self.retry_reads = false;
        // No events here: they are read only as far as replication announced them persisted
        // (`AnnouncedEvents`), the POSITION that answers our REPLICATE brings what was stored
        // while no sender ran, and a failed fetch is retried by the core itself.
        self.read_to_device().await;
        self.read_device_lists().await;
        self.read_receipt_gaps().await;
    }

    /// Receipts announced while replication was down are sent as Synapse's own worker sends
    /// them after a reconnection: read from `receipts_linearized`, oldest first.
    async fn read_receipt_gaps(&mut self) {
        while let Some((instance, (after, up_to))) = self.receipt_gaps.pop_first() {
            match self.db.receipts_between(&instance, after, up_to, ROWS_PER_READ).await {
                Ok(rows) => {
                    let read_up_to = if rows.len() < ROWS_PER_READ as usize {
                        up_to
                    } else {
                        rows.last().map_or(up_to, |(stream_id, _)| *stream_id)
                    };
                    debug!(
                        instance,
                        rows = rows.len(),
                        "receipts read back for a replication gap {after}..{read_up_to}"
                    );
                    for (_, row) in rows {
                        self.receipt(row).await;
                    }
                    if read_up_to < up_to {
                        self.receipt_gaps.insert(instance, (read_up_to, up_to));
                    }
                }
                Err(e) => {
                    self.receipt_gaps.insert(instance, (after, up_to));
                    return self.failed("reading receipts replication missed", &e);
                }
            }
        }
    }

    /// The events writer announced everything up to `token` persisted. With one writer (the
    /// main process, or one event persister) that is the stream's position; several event
    /// persisters each announce their own, and the lowest would be the safe one.
    ///
    /// Raised at once and told to the core by a task of its own (`announce_events`), so the
    /// position keeps up with replication while the core is busy: the store reads up to it, and
    /// a position that moved one event per storage call would make every fetch one event long.
    async fn new_events(&self, token: Token) {
        if let Ok(up_to) = u64::try_from(token)
            && up_to > 0
        {
            // Raised before the core hears of it, so the store never refuses what it asks for.
            let up_to = self.announced.raise(up_to);
            self.events_announcer.send_if_modified(|told| {
                let newer = up_to > *told;
                *told = (*told).max(up_to);
                newer
            });
        }
    }

    async fn read_to_device(&mut self) {
        loop {
            match self.db.to_device_rows(&self.ownership, self.to_device_after, ROWS_PER_READ).await {
                Ok(batch) => {
                    self.to_device_after = self.to_device_after.max(batch.next_after);
                    if !batch.rows.is_empty() {
                        self.feed(json!({"type": "stored_to_device", "rows": batch.rows})).await;
                    }
                    if !batch.more {
                        return;
                    }
                }
                Err(e) => return self.failed("reading to-device messages", &e),
            }
        }
    }

    async fn read_device_lists(&mut self) {
        loop {
            match self
                .db
                .device_list_pokes(&self.ownership, self.device_lists_after, ROWS_PER_READ, &self.devices)
                .await
            {
                Ok(batch) => {
                    self.device_lists_after = self.device_lists_after.max(batch.next_after);
                    if !batch.rows.is_empty() {
                        self.feed(json!({"type": "stored_device_list_pokes", "pokes": batch.rows})).await;
                    }
                    if !batch.more {
                        return;
                    }
                }
                Err(e) => return self.failed("reading device-list changes", &e),
            }
        }
    }

    /// The `federation` stream carries nothing a sender must send today, but the main
    /// process keeps its queue until every sender acknowledges.
    async fn acknowledge_federation(&self, token: Token) {
        if let Err(e) = self.publisher.federation_ack(token).await {
            debug!("FEDERATION_ACK not published: {e}");
        }
    }

    async fn typing(&mut self, row: TypingRow) {
        let now: BTreeSet<String> = row.user_ids.into_iter().filter(|u| self.is_local(u)).collect();
        let before = self.typing.insert(row.room_id.clone(), now.clone()).unwrap_or_default();
        let changes: Vec<(String, bool)> = now
            .difference(&before)
            .map(|u| (u.clone(), true))
            .chain(before.difference(&now).map(|u| (u.clone(), false)))
            .collect();
        if changes.is_empty() {
            return;
        }
        let Some(hosts) = self.hosts_in_room(&row.room_id).await else { return };
        for (user_id, typing) in changes {
            self.feed(json!({"type": "typing", "room_id": row.room_id, "user_id": user_id, "typing": typing,
                             "hosts": hosts}))
                .await;
        }
    }

    async fn receipt(&mut self, row: ReceiptRow) {
        // Private receipts never leave the server; remote users' receipts are not ours to send.
        if !self.is_local(&row.user_id) || row.receipt_type == "m.read.private" {
            return;
        }
        let Some(hosts) = self.hosts_in_room(&row.room_id).await else { return };
        let mut receipt = json!({"room_id": row.room_id, "receipt_type": row.receipt_type, "user_id": row.user_id,
                                 "event_id": row.event_id, "data": row.data});
        if let Some(thread_id) = row.thread_id {
            receipt["thread_id"] = Value::String(thread_id);
        }
        self.feed(json!({"type": "receipt", "receipt": receipt, "hosts": hosts})).await;
    }

    async fn presence(&mut self, row: PresenceRow) {
        if !self.is_local(&row.user_id) || !self.presence.is_news(&row) {
            return;
        }
        let destinations = match self.db.hosts_sharing_room_with(&row.user_id).await {
            Ok(hosts) => hosts,
            Err(e) => return self.failed("reading who shares a room for presence", &e),
        };
        let mut state =
            json!({"user_id": row.user_id, "presence": row.state, "currently_active": row.currently_active});
        if let Ok(ts) = u64::try_from(row.last_active_ts)
            && ts > 0
        {
            state["last_active_ts"] = json!(ts);
        }
        if let Some(status_msg) = row.status_msg {
            state["status_msg"] = Value::String(status_msg);
        }
        self.feed(json!({"type": "presence", "states": [state], "destinations": destinations})).await;
    }

    async fn presence_to_one(&mut self, row: PresenceFederationRow) {
        let Ok(destination) = ServerName::parse(&row.destination) else { return };
        match self.db.presence_state(&row.user_id).await {
            Ok(Some(state)) => {
                self.feed(json!({"type": "presence", "states": [state], "destinations": [destination]})).await;
            }
            Ok(None) => {}
            Err(e) => self.failed("reading a presence state", &e),
        }
    }

    async fn hosts_in_room(&mut self, room_id: &str) -> Option<Vec<ServerName>> {
        match self.db.hosts_in_room(room_id).await {
            Ok(hosts) => Some(hosts),
            Err(e) => {
                self.failed("reading the servers in a room", &e);
                None
            }
        }
    }
}

/// Tells the core the newest announced events position; announcements that came while it was
/// busy become one input.
async fn announce_events(driver: DriverHandle, mut position: watch::Receiver<u64>) {
    while position.changed().await.is_ok() {
        let up_to = *position.borrow_and_update();
        if let Err(e) = driver.input(json!({"type": "new_events", "up_to": up_to})).await {
            warn!("the core refused an events position: {}", e.error);
        }
    }
}
