//! The service around the one run loop of `fedsend-driver`: the loop runs on a thread of its
//! own (it owns the machine, which is not `Send`), entered into the service's tokio runtime so
//! that its timers and transactions use that runtime. This module supplies the loop's parts —
//! the tokio [`Clock`], the [`Store`] as the loop's [`Storage`], the HTTPS (or any
//! [`Transport`]) with its request slots, [`Metrics`] as its [`Observer`] — and the
//! [`DriverHandle`] the API and the worker-mode feed talk to it through.
//!
//! The machine is the core linked natively (typed, no encoding), or the core compiled to wasm
//! inside wasmtime behind the JSON boundary ([`EngineChoice`]).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedsend_core::nesting::check_value_depth;
use fedsend_core::{
    CatchUpRoom, Changes, Config, DestinationStats, Event, FederationSender, Input, OutgoingTransaction, PduInfo,
    Recovered, ServerName, TransactionResult,
};
use fedsend_driver::{Clock, JsonMachine, Machine, Observer, Rejected, Storage, StorageError};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::metrics::Metrics;
use super::slots::{SendSlots, SlotLimits};
use super::store::{Added, NewEvent, Store, StoreError};
use crate::wasm_engine::WasmEngine;

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

    fn from_rejected(rejected: Rejected) -> Self {
        match rejected {
            Rejected::Refused(why) => Self::bad("M_INVALID_PARAM", why),
            not_stored @ Rejected::NotStored(_) => {
                Self { status: 503, errcode: "M_UNKNOWN", error: not_stored.to_string() }
            }
            Rejected::Stopped => Self::stopped(),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, Rejection>>;

/// What the API asks of the driver.
#[derive(Debug)]
pub enum Command {
    /// Feed a core input (JSON with its `type`). Acknowledged when the core accepted it or, for
    /// an input whose effect must survive a crash once acknowledged (`to_device`,
    /// `device_list_update`, `signing_key_update`), once every row it queued is durable;
    /// refused with 503 if storing one fails.
    Input { input: Value, reply: Reply<()> },
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

    /// See [`Command::Input`]: the same command, named for the callers that rely on the
    /// durable acknowledgement.
    pub async fn durable_input(&self, input: Value) -> Result<(), Rejection> {
        self.input(input).await
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

/// Events stored in one durable write at most.
const EVENTS_PER_COMMIT_MAX: usize = 512;
/// The core's batches of changes written in one durable write at most.
const PERSISTS_PER_COMMIT_MAX: usize = 64;

/// Runs a storage call so that the runtime keeps serving the API and the transactions in
/// flight meanwhile: the driver's thread is inside the runtime's `block_on`, where blocking
/// is announced with `block_in_place`.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        _ => call(),
    }
}

/// A storage call from inside the loop: [`blocking`], and then one pass round the loop.
///
/// The loop and the command loop are one `block_on` on the driver's thread, which sleeps on
/// the thread's parker between polls. A store that blocks on a future of its own (the Synapse
/// store runs each query with the runtime's `block_on`) parks that same parker, so a wake-up
/// that arrives during the call (a command sent, a transaction finished) is taken by the inner
/// `block_on` and lost to the outer one: the command would wait for the loop's next timer
/// (seen as a minute's stall, the catch-up waker's period). Waking ourselves once after the
/// call makes the outer `block_on` poll everything again.
async fn store_call<T>(call: impl FnOnce() -> T) -> T {
    let value = blocking(call);
    PollAgain::default().await;
    value
}

/// Ready on its second poll, having woken its task on the first.
#[derive(Default)]
struct PollAgain {
    woken: bool,
}

impl Future for PollAgain {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.woken {
            return Poll::Ready(());
        }
        self.woken = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Counts the EDUs of a transaction body, for Synapse's `sent_edus` counter. The core writes
/// `edus` as the first key and only when there are some, so most bodies (PDUs only) are
/// answered without a parse; a whole-body parse per transaction was a tenth of the service's
/// CPU in the end-to-end bench. The others are scanned without building a tree.
fn edus_in(body: &str) -> u64 {
    #[derive(serde::Deserialize)]
    struct EdusOnly {
        #[serde(default)]
        edus: Vec<serde::de::IgnoredAny>,
    }
    if !body.starts_with("{\"edus\":") {
        return 0;
    }
    serde_json::from_str::<EdusOnly>(body).map_or(0, |parsed| parsed.edus.len() as u64)
}

/// Options of a driver.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// The core's `Config` as JSON.
    pub core_config_json: String,
    /// How transactions share the request slots.
    pub slot_limits: SlotLimits,
    /// Receives the core's events (worker mode announces recovered destinations).
    pub events: Option<mpsc::UnboundedSender<Event>>,
}

/// Which machine the driver runs.
#[derive(Debug)]
pub enum EngineChoice {
    /// The core linked in: typed inputs and outputs, no encoding.
    Native,
    /// The core compiled to wasm, inside wasmtime, behind the JSON boundary.
    Wasm(Box<WasmEngine>),
}

impl EngineChoice {
    fn start(self, config_json: &str, recovered: Recovered) -> Result<Box<dyn Machine>, String> {
        Ok(match self {
            Self::Native => {
                // The same wording as the JSON boundary's, whichever engine runs.
                let config: Config = serde_json::from_str(config_json).map_err(|e| format!("invalid config: {e}"))?;
                Box::new(FederationSender::new(config, recovered).map_err(|e| e.to_string())?)
            }
            Self::Wasm(engine) => Box::new(JsonMachine::start(*engine, config_json, &recovered)?),
        })
    }
}

/// Tokio's timers, in wall-clock Unix milliseconds.
#[derive(Clone, Copy, Debug)]
struct TokioClock;

impl Clock for TokioClock {
    type Sleep = tokio::time::Sleep;

    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn sleep_until(&self, deadline_ms: u64) -> tokio::time::Sleep {
        tokio::time::sleep(Duration::from_millis(deadline_ms.saturating_sub(now_ms())))
    }
}

/// The service's [`Store`] as the loop's storage. The store is also the homeserver side of
/// the service (events submitted through the API), so the driver's thread shares it with the
/// command loop; neither holds it across an await.
struct StoreStorage {
    store: Rc<RefCell<Box<dyn Store>>>,
    metrics: Arc<Metrics>,
}

fn storage_error(error: StoreError) -> StorageError {
    StorageError(error.to_string())
}

impl StoreStorage {
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
}

impl Storage for StoreStorage {
    async fn load_recovered(&self) -> Result<Recovered, StorageError> {
        store_call(|| self.store.borrow_mut().recovered()).await.map_err(storage_error)
    }

    async fn apply(&self, batches: &[&Changes]) -> Result<(), StorageError> {
        store_call(|| self.store.borrow_mut().apply_all(batches)).await.map_err(storage_error)
    }

    async fn fetch_events(&self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StorageError> {
        let mut events =
            store_call(|| self.store.borrow_mut().fetch_events(after, limit)).await.map_err(storage_error)?;
        self.screen_events(&mut events);
        Ok(events)
    }

    async fn load_catch_up(
        &self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StorageError> {
        let mut rooms = store_call(|| self.store.borrow_mut().load_catch_up(destination, after, up_to, limit))
            .await
            .map_err(storage_error)?;
        self.screen_catch_up(&mut rooms);
        Ok(rooms)
    }

    async fn load_outstanding(&self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StorageError> {
        store_call(|| self.store.borrow_mut().outstanding(after, limit)).await.map_err(storage_error)
    }
}

/// A [`Transport`] as the loop's: each attempt runs as a task of its own on the runtime
/// (TLS and signing use its workers, not the driver's thread), within the request slots,
/// and is aborted when the loop drops it (at shutdown).
struct SlottedTransport {
    transport: Arc<dyn Transport>,
    slots: Arc<SendSlots>,
}

/// Aborts the task when dropped before it finished.
struct AbortOnDrop(tokio::task::JoinHandle<TransactionResult>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl fedsend_driver::Transport for SlottedTransport {
    async fn send(&self, transaction: &OutgoingTransaction) -> TransactionResult {
        debug!(destination = %transaction.destination, txn_id = transaction.txn_id, attempt = transaction.attempt,
            pdus = transaction.pdu_ids.len(), "sending transaction");
        let transport = Arc::clone(&self.transport);
        let slots = Arc::clone(&self.slots);
        let destination = transaction.destination.clone();
        let txn_id = transaction.txn_id.clone();
        let body = Arc::clone(&transaction.body);
        let mut task = AbortOnDrop(tokio::spawn(async move {
            slots.run(destination.as_str(), transport.send(destination.as_str(), &txn_id, &body)).await
        }));
        // A task that panicked or was aborted sent nothing we know of: as if it timed out.
        (&mut task.0).await.unwrap_or(TransactionResult::Timeout)
    }
}

/// Logs, metrics and the worker mode's event feed: what the service hears from the loop.
struct ServiceObserver {
    metrics: Arc<Metrics>,
    events: Option<mpsc::UnboundedSender<Event>>,
}

impl Observer for ServiceObserver {
    fn event(&self, event: Event) {
        debug!(?event, "core event");
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }

    fn transaction_done(&self, transaction: &OutgoingTransaction, result: &TransactionResult) {
        let destination = &transaction.destination;
        let txn_id = &transaction.txn_id;
        if let TransactionResult::Ok { .. } = result {
            let pdus = transaction.pdu_ids.len() as u64;
            let edus = edus_in(&transaction.body);
            // One line per transaction, as Synapse logs each request: operators (and the
            // sharding test) can tell who sent what.
            info!(%destination, txn_id, pdus, edus, "sent transaction");
            self.metrics.sent_transactions.inc();
            self.metrics.sent_pdu_destinations.inc_by(pdus);
            self.metrics.sent_edus.inc_by(edus);
        } else {
            info!(%destination, txn_id, ?result, "transaction attempt failed");
            self.metrics.failed_transactions.inc();
        }
    }

    fn storage_failed(&self, what: &str, error: &StorageError) {
        error!("{what}: {error}");
        self.metrics.storage_failures.inc();
        self.metrics.report_problem(now_ms(), format!("{what}: {error}"));
    }

    fn engine_problem(&self, what: &str) {
        error!("{what}");
        self.metrics.engine_refusals.inc();
        self.metrics.report_problem(now_ms(), what);
    }

    fn stats_due_ms(&self) -> Option<u64> {
        let now = now_ms();
        self.metrics.stats_due_in_ms(now).map(|wait_ms| now.saturating_add(wait_ms))
    }

    fn publish_stats(&self, now_ms: u64, stats: Vec<DestinationStats>) {
        self.metrics.publish_stats(now_ms, stats);
    }
}

type ServiceDriver =
    fedsend_driver::Driver<Box<dyn Machine>, StoreStorage, SlottedTransport, TokioClock, ServiceObserver>;

/// Starts the loop on a thread of its own: loads the recovered state from `store`, starts the
/// engine with it and tells it about every stored event. Returns once started (or why it
/// could not), with the loop's thread and the handle the API uses. The loop stops when
/// `shutdown` turns true or every handle is dropped.
pub async fn start(
    engine: EngineChoice,
    store: Box<dyn Store>,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    options: &DriverOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(tokio::task::JoinHandle<()>, DriverHandle), String> {
    let (commands_tx, commands) = mpsc::channel(1024);
    let (started_tx, started) = oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let options = options.clone();
    let thread = tokio::task::spawn_blocking(move || {
        runtime.block_on(async move {
            let store = Rc::new(RefCell::new(store));
            let driver = match build(engine, &store, transport, metrics, &options) {
                Ok(driver) => driver,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let _ = started_tx.send(Ok(()));
            let commanding = CommandLoop { driver: &driver, store: &store };
            tokio::join!(driver.run(futures::stream::pending()), commanding.run(commands, shutdown));
            info!("driver stopped");
        });
    });
    match started.await {
        Ok(Ok(())) => Ok((thread, DriverHandle { commands: commands_tx })),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(thread.await.err().map_or_else(|| "the driver did not start".into(), |e| e.to_string())),
    }
}

fn build(
    engine: EngineChoice,
    store: &Rc<RefCell<Box<dyn Store>>>,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    options: &DriverOptions,
) -> Result<ServiceDriver, String> {
    let recovered =
        blocking(|| store.borrow_mut().recovered()).map_err(|e| format!("loading the sender state: {e}"))?;
    info!(
        incarnation = recovered.incarnation,
        destinations = recovered.destinations.len(),
        to_device_rows = recovered.to_device_outbox.len(),
        "recovered sender state"
    );
    let machine = engine.start(&options.core_config_json, recovered)?;
    let up_to =
        blocking(|| store.borrow_mut().max_stream_ordering()).map_err(|e| format!("reading the events stream: {e}"))?;
    let storage = StoreStorage { store: Rc::clone(store), metrics: Arc::clone(&metrics) };
    let slotted = SlottedTransport { transport, slots: Arc::new(SendSlots::new(options.slot_limits)) };
    let observer = ServiceObserver { metrics, events: options.events.clone() };
    let loop_options = fedsend_driver::DriverOptions {
        batches_per_write_max: PERSISTS_PER_COMMIT_MAX,
        // An HTTP client hears 503 at once and may resubmit (deduplicated by message id and
        // stream id), rather than hang on a disk that may stay full.
        refuse_receipts_on_storage_failure: true,
    };
    let driver = fedsend_driver::Driver::new(machine, storage, slotted, TokioClock, observer, loop_options);
    if up_to > 0 {
        // Refused only by a broken engine: the first timeout would then fail the same way.
        drop(driver.submit(Input::NewEvents { up_to }).map_err(|e| e.to_string())?);
    }
    Ok(driver)
}

/// The service's commands, on the driver's thread: core inputs go to the loop, events and
/// partial-state marks to the store first.
struct CommandLoop<'a> {
    driver: &'a ServiceDriver,
    store: &'a Rc<RefCell<Box<dyn Store>>>,
}

impl CommandLoop<'_> {
    async fn run(self, mut commands: mpsc::Receiver<Command>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => {
                        if self.on_command(command, &mut commands) {
                            // It blocked on the store: see `store_call`.
                            PollAgain::default().await;
                        }
                    }
                    None => break,
                },
            }
        }
        self.driver.stop();
    }

    /// Performs `command`; true if it called the store (which blocks the thread).
    fn on_command(&self, command: Command, commands: &mut mpsc::Receiver<Command>) -> bool {
        match command {
            Command::Input { input, reply } => self.submit(input, reply),
            Command::Event { event, reply } => {
                self.on_events(vec![(*event, reply)], commands);
                return true;
            }
            Command::PartialState { room_id, servers, reply } => {
                let result = blocking(|| self.store.borrow_mut().set_partial_state(&room_id, servers.as_deref()))
                    .map_err(Rejection::from_store);
                let _ = reply.send(result);
                return true;
            }
            Command::Stats { reply } => {
                let stats = self.driver.destination_stats();
                self.driver.observer().metrics.publish_stats(now_ms(), stats.clone());
                let _ = reply.send(stats);
            }
        }
        false
    }

    fn submit(&self, input: Value, reply: Reply<()>) {
        // The same wording as the JSON boundary's, whichever engine runs.
        let input: Input = match serde_json::from_value(input) {
            Ok(input) => input,
            Err(e) => {
                let _ = reply.send(Err(Rejection::bad("M_INVALID_PARAM", format!("malformed input: {e}"))));
                return;
            }
        };
        debug!(input = ?std::mem::discriminant(&input), "submitting");
        match self.driver.submit(input) {
            Err(rejected) => {
                let _ = reply.send(Err(Rejection::from_rejected(rejected)));
            }
            Ok(receipt) => {
                // Waiting for durability happens off this loop: later commands go on meanwhile.
                tokio::spawn(async move {
                    let _ = reply.send(receipt.await.map_err(Rejection::from_rejected));
                });
            }
        }
    }

    /// Group commit: the events waiting in the queue behind the first are stored with it in
    /// one durable write, and the core hears of them once.
    fn on_events(&self, mut batch: Vec<(NewEvent, Reply<Added>)>, commands: &mut mpsc::Receiver<Command>) {
        let mut deferred = None;
        while batch.len() < EVENTS_PER_COMMIT_MAX {
            match commands.try_recv() {
                Ok(Command::Event { event, reply }) => batch.push((*event, reply)),
                Ok(other) => {
                    deferred = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let (events, replies): (Vec<NewEvent>, Vec<Reply<Added>>) = batch.into_iter().unzip();
        let results = blocking(|| self.store.borrow_mut().add_events(&events));
        let metrics = &self.driver.observer().metrics;
        let mut up_to = 0;
        for ((event, reply), result) in events.iter().zip(replies).zip(results) {
            match result {
                Ok(added) => {
                    if added.new {
                        metrics.ingested_events.inc();
                        up_to = up_to.max(added.stream_ordering);
                    }
                    let _ = reply.send(Ok(added));
                }
                Err(e) => {
                    if matches!(e, StoreError::Backend(_)) {
                        error!(event_id = event.info.event_id, "storing an event: {e}");
                        metrics.storage_failures.inc();
                        metrics.report_problem(now_ms(), format!("storing an event: {e}"));
                    }
                    let _ = reply.send(Err(Rejection::from_store(e)));
                }
            }
        }
        if up_to > 0 {
            // Refused only by a broken engine, which the next timeout reports too.
            drop(self.driver.submit(Input::NewEvents { up_to }));
        }
        if let Some(command) = deferred {
            self.on_command(command, commands);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::serve::slots::SlotLimits;
    use crate::serve::store::{Added, MemoryStore, NewEvent, StoreError};

    /// A store that, like the Synapse one, runs each write as a future with the runtime's
    /// `block_on` (here a pause, as a query takes).
    #[derive(Debug, Default)]
    struct BlocksOnAFuture(MemoryStore);

    impl Store for BlocksOnAFuture {
        fn recovered(&mut self) -> Result<Recovered, StoreError> {
            self.0.recovered()
        }
        fn apply(&mut self, changes: &Changes) -> Result<(), StoreError> {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| runtime.block_on(tokio::time::sleep(Duration::from_millis(300))));
            self.0.apply(changes)
        }
        fn add_event(&mut self, event: &NewEvent) -> Result<Added, StoreError> {
            self.0.add_event(event)
        }
        fn set_partial_state(&mut self, room_id: &str, servers: Option<&[ServerName]>) -> Result<(), StoreError> {
            self.0.set_partial_state(room_id, servers)
        }
        fn max_stream_ordering(&mut self) -> Result<u64, StoreError> {
            self.0.max_stream_ordering()
        }
        fn fetch_events(&mut self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StoreError> {
            self.0.fetch_events(after, limit)
        }
        fn load_catch_up(
            &mut self,
            destination: &ServerName,
            after: u64,
            up_to: u64,
            limit: u32,
        ) -> Result<Vec<CatchUpRoom>, StoreError> {
            self.0.load_catch_up(destination, after, up_to, limit)
        }
        fn outstanding(&mut self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StoreError> {
            self.0.outstanding(after, limit)
        }
    }

    /// Remotes that never answer, so that nothing they do wakes the loop.
    #[derive(Default)]
    struct Silent(std::sync::Mutex<Vec<String>>);

    impl Silent {
        fn destinations(&self) -> Vec<String> {
            let mut seen = self.0.lock().unwrap().clone();
            seen.sort();
            seen
        }
    }

    impl Transport for Silent {
        fn send<'a>(
            &'a self,
            destination: &'a str,
            _txn_id: &'a str,
            _body: &'a str,
        ) -> Pin<Box<dyn Future<Output = TransactionResult> + Send + 'a>> {
            self.0.lock().unwrap().push(destination.to_owned());
            Box::pin(std::future::pending())
        }
    }

    // The worker-mode stall: what happened while the store was inside its own `block_on` (a
    // command sent, a write finished) waited for the core's next timer, a minute later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_sent_while_the_store_blocks_on_a_future_is_taken_at_once() {
        let options = DriverOptions {
            core_config_json: json!({"server_name": "origin.test"}).to_string(),
            slot_limits: SlotLimits {
                in_flight_max: 8,
                per_host_max: 8,
                slow_after: Duration::from_secs(5),
                slow_max: 8,
            },
            events: None,
        };
        let (_shutdown_tx, shutdown) = watch::channel(false);
        let transport = Arc::new(Silent::default());
        let (_thread, handle) = start(
            EngineChoice::Native,
            Box::new(BlocksOnAFuture::default()),
            transport.clone(),
            Arc::new(Metrics::new()),
            &options,
            shutdown,
        )
        .await
        .unwrap();
        // Whether the command loop or the driver is polled first alternates, and only one order
        // lost the wake-up: several rounds meet both.
        for round in 0..8 {
            let to_device = json!({"type": "to_device", "sender": "@a:origin.test", "message_type": "m.t",
                "message_id": format!("m{round}"), "messages": {"@b:remote.test": {"D": {"x": round}}}});
            let writing = tokio::spawn({
                let handle = handle.clone();
                async move { handle.input(to_device).await }
            });
            // Sent while the write blocks.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let sent_at = Instant::now();
            let edu =
                json!({"type": "edu", "destination": format!("other{round}.test"), "edu_type": "m.x", "content": {}});
            tokio::time::timeout(Duration::from_secs(20), handle.input(edu)).await.expect("answered").unwrap();
            let waited = sent_at.elapsed();
            assert!(waited < Duration::from_secs(5), "round {round}: the command waited {waited:?} for an answer");
            tokio::time::timeout(Duration::from_secs(20), writing).await.expect("durable").unwrap().unwrap();
            // The EDU's transaction leaves within seconds, not at the core's next timer.
            let deadline = Instant::now() + Duration::from_secs(5);
            let wanted = format!("other{round}.test");
            while !transport.destinations().contains(&wanted) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(transport.destinations().contains(&wanted), "round {round}: {:?}", transport.destinations());
        }
    }

    #[test]
    fn edus_are_counted_from_the_body() {
        assert_eq!(
            edus_in(
                r#"{"edus":[{"content":{},"edu_type":"m.typing"},{"content":{"edus":[1]},"edu_type":"m.x"}],"origin":"o","origin_server_ts":1,"pdus":[]}"#
            ),
            2
        );
        // A PDU mentioning "edus" is no EDU.
        assert_eq!(edus_in(r#"{"origin":"o","origin_server_ts":1,"pdus":[{"content":{"edus":[1,2,3]}}]}"#), 0);
        assert_eq!(edus_in(r#"{"edus":[],"origin":"o","origin_server_ts":1,"pdus":[]}"#), 0);
        assert_eq!(edus_in(r#"{"edus":[{}"#), 0, "a body that is not JSON counts nothing");
    }
}
