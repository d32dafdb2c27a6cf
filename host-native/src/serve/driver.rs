//! The driver: one tokio task that owns the engine and the store, feeds the engine its inputs,
//! drains its outputs and performs them (transactions on the transport, with a bound on how
//! many are on the wire; persists and queries on the store), and sleeps until the engine's
//! deadline or the next input.
//!
//! The engine is any [`fedsend_sim::Engine`] (the core linked natively, or in wasmtime), used
//! through the same JSON boundary as the scenarios; the store is any [`Store`]; the transport
//! is any [`Transport`], so tests can run the whole loop against an in-process fake.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedsend_core::nesting::check_value_depth;
use fedsend_core::{
    CatchUpRoom, DestinationStats, Input, OutgoingTransaction, Output, PduInfo, RequestId, ServerName,
    TransactionResult,
};
use fedsend_sim::Engine;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::metrics::Metrics;
use super::slots::{SendSlots, SlotLimits};
use super::store::{Added, NewEvent, Store, StoreError};
use fedsend_core::Changes;

/// One HTTP attempt of a transaction. Retry policy is the core's, never the transport's.
pub trait Transport: Send + Sync + 'static {
    /// `PUT /_matrix/federation/v1/send/{txn_id}` to `destination` with `body`.
    fn send<'a>(
        &'a self,
        destination: &'a str,
        txn_id: &'a str,
        body: &'a str,
    ) -> Pin<Box<dyn Future<Output = TransactionResult> + Send + 'a>>;
}

impl Transport for crate::transport::HttpsTransport {
    fn send<'a>(
        &'a self,
        destination: &'a str,
        txn_id: &'a str,
        body: &'a str,
    ) -> Pin<Box<dyn Future<Output = TransactionResult> + Send + 'a>> {
        Box::pin(self.send_transaction(destination, txn_id, body))
    }
}

/// Why the driver refused a request; the API turns it into `{errcode, error}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status.
    pub status: u16,
    /// Matrix errcode.
    pub errcode: &'static str,
    /// What was wrong, for a human.
    pub error: String,
}

impl Rejection {
    /// 400 with `errcode`.
    pub fn bad(errcode: &'static str, error: impl Into<String>) -> Self {
        Self { status: 400, errcode, error: error.into() }
    }

    fn from_store(error: StoreError) -> Self {
        match error {
            StoreError::UnknownRoom(_) => Self { status: 404, errcode: "M_NOT_FOUND", error: error.to_string() },
            StoreError::Invalid(_) => Self::bad("M_INVALID_PARAM", error.to_string()),
            StoreError::Backend(_) => Self { status: 503, errcode: "M_UNKNOWN", error: error.to_string() },
        }
    }

    fn stopped() -> Self {
        Self { status: 503, errcode: "M_UNKNOWN", error: "the sender is shutting down".into() }
    }
}

type Reply<T> = oneshot::Sender<Result<T, Rejection>>;

/// What the API asks of the driver.
#[derive(Debug)]
pub enum Command {
    /// Feed a core input as is (JSON with its `type`). Acknowledged when the core accepted it.
    Input { input: Value, reply: Reply<()> },
    /// Feed an input whose effect must survive a crash once acknowledged (`to_device`,
    /// `device_list_update`, `signing_key_update`): acknowledged once every batch of changes
    /// it caused is durable, refused with 503 if storing one fails.
    Durable { input: Value, reply: Reply<()> },
    /// Record an event (durably), then tell the core about it.
    Event { event: Box<NewEvent>, reply: Reply<Added> },
    /// Mark a room partial-state or fully joined.
    PartialState { room_id: String, servers: Option<Vec<ServerName>>, reply: Reply<()> },
    /// Per-destination figures.
    Stats { reply: oneshot::Sender<Vec<DestinationStats>> },
}

/// Sends commands to the driver task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    commands: mpsc::Sender<Command>,
}

impl DriverHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Rejection> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| Rejection::stopped())?;
        answer.await.map_err(|_| Rejection::stopped())?
    }

    /// See [`Command::Input`].
    pub async fn input(&self, input: Value) -> Result<(), Rejection> {
        self.ask(|reply| Command::Input { input, reply }).await
    }

    /// See [`Command::Durable`].
    pub async fn durable_input(&self, input: Value) -> Result<(), Rejection> {
        self.ask(|reply| Command::Durable { input, reply }).await
    }

    /// See [`Command::Event`].
    pub async fn event(&self, event: NewEvent) -> Result<Added, Rejection> {
        self.ask(|reply| Command::Event { event: Box::new(event), reply }).await
    }

    /// See [`Command::PartialState`].
    pub async fn partial_state(&self, room_id: String, servers: Option<Vec<ServerName>>) -> Result<(), Rejection> {
        self.ask(|reply| Command::PartialState { room_id, servers, reply }).await
    }

    /// See [`Command::Stats`].
    pub async fn stats(&self) -> Result<Vec<DestinationStats>, Rejection> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Stats { reply }).await.map_err(|_| Rejection::stopped())?;
        answer.await.map_err(|_| Rejection::stopped())
    }
}

struct Completion {
    request: RequestId,
    destination: ServerName,
    txn_id: String,
    pdus: u64,
    edus: u64,
    result: TransactionResult,
}

/// A submission waiting for the batches of changes it caused to become durable.
struct DurableWaiter {
    persists: BTreeSet<RequestId>,
    reply: Reply<()>,
}

/// The engine's owner. Build with [`Driver::start`], then [`Driver::run`] it on a task.
pub struct Driver {
    engine: Box<dyn Engine + Send>,
    store: Box<dyn Store>,
    transport: Arc<dyn Transport>,
    slots: Arc<SendSlots>,
    commands: mpsc::Receiver<Command>,
    completions_tx: mpsc::UnboundedSender<Completion>,
    completions: mpsc::UnboundedReceiver<Completion>,
    durable_waiters: Vec<DurableWaiter>,
    metrics: Arc<Metrics>,
    in_flight: HashMap<RequestId, ServerName>,
    events: Option<mpsc::UnboundedSender<fedsend_core::Event>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("in_flight", &self.in_flight.len()).finish_non_exhaustive()
    }
}

/// Events stored in one durable write at most.
const EVENTS_PER_COMMIT_MAX: usize = 512;
/// The core's batches of changes written in one durable write at most.
const PERSISTS_PER_COMMIT_MAX: usize = 64;

/// Runs a storage call off the async runtime's worker (SQLite and fsync block), so the API
/// and the transactions in flight keep being served meanwhile.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        _ => call(),
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Counts the EDUs of a transaction body, for Synapse's `sent_edus` counter.
fn edus_in(body: &str) -> u64 {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("edus").and_then(Value::as_array).map(|a| a.len() as u64))
        .unwrap_or(0)
}

/// Options of a driver.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// The core's `Config` as JSON.
    pub core_config_json: String,
    /// How transactions share the request slots.
    pub slot_limits: SlotLimits,
    /// Receives the core's events (worker mode announces recovered destinations).
    pub events: Option<mpsc::UnboundedSender<fedsend_core::Event>>,
}

impl Driver {
    /// Loads the recovered state from `store`, starts `engine` with it and tells the engine
    /// about every stored event. Returns the driver and the handle the API uses.
    pub fn start(
        mut engine: Box<dyn Engine + Send>,
        mut store: Box<dyn Store>,
        transport: Arc<dyn Transport>,
        metrics: Arc<Metrics>,
        options: &DriverOptions,
    ) -> Result<(Self, DriverHandle), String> {
        let recovered = store.recovered().map_err(|e| format!("loading the sender state: {e}"))?;
        let recovered_json = serde_json::to_string(&recovered).map_err(|e| e.to_string())?;
        engine.start(&options.core_config_json, &recovered_json)?;
        info!(
            incarnation = recovered.incarnation,
            destinations = recovered.destinations.len(),
            to_device_rows = recovered.to_device_outbox.len(),
            "recovered sender state"
        );
        let (commands_tx, commands) = mpsc::channel(1024);
        let (completions_tx, completions) = mpsc::unbounded_channel();
        let mut driver = Self {
            engine,
            store,
            transport,
            slots: Arc::new(SendSlots::new(options.slot_limits)),
            commands,
            completions_tx,
            completions,
            durable_waiters: Vec::new(),
            metrics,
            in_flight: HashMap::new(),
            events: options.events.clone(),
        };
        let up_to = driver.store.max_stream_ordering().map_err(|e| format!("reading the events stream: {e}"))?;
        if up_to > 0 {
            driver.feed(&Input::NewEvents { up_to }).map_err(|e| e.error)?;
        }
        driver.feed(&Input::Timeout).map_err(|e| e.error)?;
        Ok((driver, DriverHandle { commands: commands_tx }))
    }

    /// Runs until `shutdown` turns true or every handle is dropped.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.drain();
            let now = now_ms();
            if self.metrics.stats_due_in_ms(now) == Some(0) {
                let stats = self.destination_stats();
                self.metrics.publish_stats(now, stats);
            }
            let engine_wait_ms = self.engine.poll_timeout().map(|deadline| deadline.saturating_sub(now));
            // Nothing scheduled: wake now and then anyway, harmlessly.
            let wait_ms = [engine_wait_ms, self.metrics.stats_due_in_ms(now)].into_iter().flatten().min();
            let wait = Duration::from_millis(wait_ms.unwrap_or(60_000));
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
                Some(done) = self.completions.recv() => self.on_completion(done),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                () = tokio::time::sleep(wait) => {
                    let _ = self.feed(&Input::Timeout);
                }
            }
        }
        info!(in_flight = self.in_flight.len(), "driver stopped");
    }

    fn destination_stats(&mut self) -> Vec<DestinationStats> {
        self.engine.destination_stats().and_then(|json| serde_json::from_str(&json).ok()).unwrap_or_default()
    }

    fn feed(&mut self, input: &Input) -> Result<(), Rejection> {
        // Inputs we build always serialize.
        let json = serde_json::to_string(input).expect("inputs always serialize");
        self.feed_json(&json)
    }

    fn feed_json(&mut self, json: &str) -> Result<(), Rejection> {
        self.engine.handle_input(now_ms(), json).map_err(|e| Rejection::bad("M_INVALID_PARAM", e))
    }

    fn drain(&mut self) {
        let mut persists = Vec::new();
        while let Some(text) = self.engine.poll_output() {
            match self.decode_output(&text) {
                Some(Output::Persist { request, changes }) => persists.push((request, changes)),
                Some(output) => {
                    // In output order: batches asked for before this output are written first.
                    self.persist_all(std::mem::take(&mut persists));
                    self.perform(output);
                }
                None => {}
            }
            if persists.len() >= PERSISTS_PER_COMMIT_MAX {
                self.persist_all(std::mem::take(&mut persists));
            }
        }
        self.persist_all(persists);
    }

    /// Group commit of the core's batches of changes: one durable write for all of them,
    /// then each is answered.
    fn persist_all(&mut self, persists: Vec<(RequestId, Changes)>) {
        if persists.is_empty() {
            return;
        }
        let store = &mut self.store;
        let result = blocking(|| store.apply_all(&persists.iter().map(|(_, changes)| changes).collect::<Vec<_>>()));
        match result {
            Ok(()) => {
                for (request, _) in persists {
                    self.answer(Input::Persisted { request });
                    self.release_durable_waiters(request);
                }
            }
            Err(e) => {
                for (request, _) in persists {
                    self.storage_failed(request, "persisting sender state", &e);
                }
            }
        }
    }

    fn decode_output(&mut self, text: &str) -> Option<Output> {
        match serde_json::from_str(text) {
            Ok(output) => Some(output),
            Err(e) => {
                // A newer core may have outputs this host does not know yet: worth an
                // operator's attention, since whatever the output asked for is not done.
                warn!(output = %text.chars().take(300).collect::<String>(), "an output this host cannot decode: {e}");
                self.engine_mismatch(format!("an output the host cannot decode: {e}"));
                None
            }
        }
    }

    fn engine_mismatch(&mut self, what: String) {
        self.metrics.engine_refusals.inc();
        self.metrics.report_problem(now_ms(), what);
    }

    /// Feeds the answer to a request. An answer the engine refuses would leave the request
    /// waiting forever, so it is reported and the request is failed instead: the core retries
    /// queries and persists after a delay, and a transaction as timed out.
    fn answer(&mut self, input: Input) {
        let Err(refusal) = self.feed(&input) else { return };
        error!("the engine refused the answer to a request: {}", refusal.error);
        self.engine_mismatch(format!("the engine refused an answer: {}", refusal.error));
        let fallback = match input {
            Input::EventsFetched { request, .. }
            | Input::CatchUpLoaded { request, .. }
            | Input::OutstandingLoaded { request, .. }
            | Input::Persisted { request } => {
                Input::StorageFailed { request, error: format!("the engine refused the answer: {}", refusal.error) }
            }
            Input::TransactionDone { request, result } if result != TransactionResult::Timeout => {
                Input::TransactionDone { request, result: TransactionResult::Timeout }
            }
            // Nothing else to offer: the refusal is on record.
            _ => return,
        };
        if let Err(e) = self.feed(&fallback) {
            error!("the engine refused the failure of a request too: {}", e.error);
        }
    }

    fn storage_failed(&mut self, request: RequestId, what: &str, e: &StoreError) {
        error!(%request, "{what}: {e}");
        self.metrics.storage_failures.inc();
        self.metrics.report_problem(now_ms(), format!("{what}: {e}"));
        self.fail_durable_waiters(request, &format!("{what}: {e}"));
        self.answer(Input::StorageFailed { request, error: e.to_string() });
    }

    /// Events from storage that no JSON parser between here and the remote could take are
    /// handed over as out-of-band stand-ins, so the stream moves past them.
    fn screen_events(&self, events: &mut [PduInfo]) {
        for event in events {
            if let Err(reason) = check_value_depth("the event", &event.pdu) {
                warn!(event_id = event.event_id, "not sending an event: {reason}");
                self.metrics.undeliverable_events.inc();
                event.pdu = Value::Object(serde_json::Map::new());
                event.out_of_band = true;
            }
        }
    }

    /// The same for catch-up: a too-deep owed event is marked undeliverable (the core gives
    /// it up and moves on), a too-deep extremity is left out.
    fn screen_catch_up(&self, rooms: &mut [CatchUpRoom]) {
        for room in rooms {
            room.extremities.retain(|x| check_value_depth("an extremity", &x.pdu).is_ok());
            if let Err(reason) = check_value_depth("the event", &room.pdu) {
                warn!(event_id = room.event_id, "not sending an event in catch-up: {reason}");
                self.metrics.undeliverable_events.inc();
                room.pdu = Value::Object(serde_json::Map::new());
                room.undeliverable = Some(reason);
            }
        }
    }

    fn perform(&mut self, output: Output) {
        match output {
            Output::SendTransaction(txn) => self.send(txn),
            Output::FetchEvents { request, after, limit } => match blocking(|| self.store.fetch_events(after, limit)) {
                Ok(mut events) => {
                    self.screen_events(&mut events);
                    self.answer(Input::EventsFetched { request, events });
                }
                Err(e) => self.storage_failed(request, "fetching events", &e),
            },
            Output::LoadCatchUp { request, destination, after, up_to, limit } => {
                match blocking(|| self.store.load_catch_up(&destination, after, up_to, limit)) {
                    Ok(mut rooms) => {
                        self.screen_catch_up(&mut rooms);
                        self.answer(Input::CatchUpLoaded { request, rooms });
                    }
                    Err(e) => self.storage_failed(request, "loading catch-up rows", &e),
                }
            }
            Output::LoadOutstanding { request, after, limit } => {
                match blocking(|| self.store.outstanding(after.as_ref(), limit)) {
                    Ok(destinations) => self.answer(Input::OutstandingLoaded { request, destinations }),
                    Err(e) => self.storage_failed(request, "loading outstanding destinations", &e),
                }
            }
            Output::Persist { request, changes } => self.persist_all(vec![(request, changes)]),
            Output::Event { event } => {
                debug!(?event, "core event");
                if let Some(events) = &self.events {
                    let _ = events.send(event);
                }
            }
            other => warn!(?other, "ignoring an output this host does not handle"),
        }
    }

    fn release_durable_waiters(&mut self, persisted: RequestId) {
        for mut waiter in std::mem::take(&mut self.durable_waiters) {
            waiter.persists.remove(&persisted);
            if waiter.persists.is_empty() {
                let _ = waiter.reply.send(Ok(()));
            } else {
                self.durable_waiters.push(waiter);
            }
        }
    }

    /// The submission is not durable: the client hears so and may resubmit (to-device
    /// messages are deduplicated by message id, device-list updates by stream id). The core
    /// still retries the batch.
    fn fail_durable_waiters(&mut self, failed: RequestId, why: &str) {
        for waiter in std::mem::take(&mut self.durable_waiters) {
            if waiter.persists.contains(&failed) {
                let error = format!("storing the submission failed: {why}");
                let _ = waiter.reply.send(Err(Rejection { status: 503, errcode: "M_UNKNOWN", error }));
            } else {
                self.durable_waiters.push(waiter);
            }
        }
    }

    fn send(&mut self, txn: OutgoingTransaction) {
        let OutgoingTransaction { request, destination, txn_id, attempt, pdu_ids, body } = txn;
        debug!(%destination, txn_id, attempt, pdus = pdu_ids.len(), "sending transaction");
        self.in_flight.insert(request, destination.clone());
        let transport = Arc::clone(&self.transport);
        let slots = Arc::clone(&self.slots);
        let completions = self.completions_tx.clone();
        let edus = edus_in(&body);
        let pdus = pdu_ids.len() as u64;
        tokio::spawn(async move {
            let result = slots.run(destination.as_str(), transport.send(destination.as_str(), &txn_id, &body)).await;
            let _ = completions.send(Completion { request, destination, txn_id, pdus, edus, result });
        });
    }

    fn on_completion(&mut self, done: Completion) {
        self.in_flight.remove(&done.request);
        match &done.result {
            TransactionResult::Ok { .. } => {
                // One line per transaction, as Synapse logs each request: operators (and the
                // sharding test) can tell who sent what.
                info!(destination = %done.destination, txn_id = done.txn_id, pdus = done.pdus, edus = done.edus, "sent transaction");
                self.metrics.sent_transactions.inc();
                self.metrics.sent_pdu_destinations.inc_by(done.pdus);
                self.metrics.sent_edus.inc_by(done.edus);
            }
            other => {
                info!(destination = %done.destination, txn_id = done.txn_id, result = ?other, "transaction attempt failed");
                self.metrics.failed_transactions.inc();
            }
        }
        self.answer(Input::TransactionDone { request: done.request, result: done.result });
    }

    /// Group commit: the events waiting in the queue behind the first are stored with it in
    /// one durable write, and the core hears of them once.
    fn on_events(&mut self, mut batch: Vec<(NewEvent, Reply<Added>)>) {
        let mut deferred = None;
        while batch.len() < EVENTS_PER_COMMIT_MAX {
            match self.commands.try_recv() {
                Ok(Command::Event { event, reply }) => batch.push((*event, reply)),
                Ok(other) => {
                    deferred = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let (events, replies): (Vec<NewEvent>, Vec<Reply<Added>>) = batch.into_iter().unzip();
        let store = &mut self.store;
        let results = blocking(|| store.add_events(&events));
        let mut up_to = 0;
        for ((event, reply), result) in events.iter().zip(replies).zip(results) {
            match result {
                Ok(added) => {
                    if added.new {
                        self.metrics.ingested_events.inc();
                        up_to = up_to.max(added.stream_ordering);
                    }
                    let _ = reply.send(Ok(added));
                }
                Err(e) => {
                    if matches!(e, StoreError::Backend(_)) {
                        error!(event_id = event.info.event_id, "storing an event: {e}");
                        self.metrics.storage_failures.inc();
                        self.metrics.report_problem(now_ms(), format!("storing an event: {e}"));
                    }
                    let _ = reply.send(Err(Rejection::from_store(e)));
                }
            }
        }
        if up_to > 0 {
            let _ = self.feed(&Input::NewEvents { up_to });
        }
        if let Some(command) = deferred {
            self.on_command(command);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Input { input, reply } => {
                let _ = reply.send(self.feed_json(&input.to_string()));
            }
            Command::Durable { input, reply } => {
                // Outputs of earlier inputs are performed first, so that whatever comes out
                // after this input is caused by it.
                self.drain();
                if let Err(e) = self.feed_json(&input.to_string()) {
                    let _ = reply.send(Err(e));
                    return;
                }
                // The core emits the batch of changes an input caused before any other input
                // is fed: collect those batches before performing anything.
                let mut outputs = Vec::new();
                let mut persists = BTreeSet::new();
                let mut undecodable = false;
                while let Some(text) = self.engine.poll_output() {
                    let Some(output) = self.decode_output(&text) else {
                        undecodable = true;
                        continue;
                    };
                    if let Output::Persist { request, .. } = &output {
                        persists.insert(*request);
                    }
                    outputs.push(output);
                }
                if undecodable {
                    // Whatever the core asked to store is not stored: never acknowledge that.
                    let error = "the submission was accepted but its effects could not be stored".to_owned();
                    let _ = reply.send(Err(Rejection { status: 500, errcode: "M_UNKNOWN", error }));
                } else if persists.is_empty() {
                    // Nothing to store (e.g. only local recipients).
                    let _ = reply.send(Ok(()));
                } else {
                    self.durable_waiters.push(DurableWaiter { persists, reply });
                }
                for output in outputs {
                    self.perform(output);
                }
            }
            Command::Event { event, reply } => self.on_events(vec![(*event, reply)]),
            Command::PartialState { room_id, servers, reply } => {
                let store = &mut self.store;
                let result =
                    blocking(|| store.set_partial_state(&room_id, servers.as_deref())).map_err(Rejection::from_store);
                let _ = reply.send(result);
            }
            Command::Stats { reply } => {
                let stats = self.destination_stats();
                self.metrics.publish_stats(now_ms(), stats.clone());
                let _ = reply.send(stats);
            }
        }
    }
}
