//! [`Driver`]: owns the machine, performs its outputs through the host's traits.

use alloc::boxed::Box;
use alloc::collections::{BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::future::{Future, poll_fn};
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use fedsend_core::{
    Changes, DestinationStats, Input, OutgoingTransaction, Output, RequestId, ServerName, TransactionResult,
};
use futures::channel::oneshot;
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, Stream, StreamExt};

use crate::receipt::{Receipt, Rejected};
use crate::{
    Answered, Clock, Machine, Observer, Storage, StorageError, Transport, is_completion, needs_durable_acknowledgement,
};

/// How a driver behaves where hosts legitimately differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverOptions {
    /// Batches of changes written in one durable write at most (a group commit of whatever
    /// piled up while the previous write was under way).
    pub batches_per_write_max: usize,
    /// When a write holding a submission's rows fails: refuse its [`Receipt`] at once (an HTTP
    /// client hears 503 now and may resubmit) rather than keep it waiting for the core's
    /// retry of the write (a JavaScript promise simply resolves later).
    pub refuse_receipts_on_storage_failure: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self { batches_per_write_max: 64, refuse_receipts_on_storage_failure: false }
    }
}

/// A request to a driver from another task or thread (see [`Driver::run`]).
#[derive(Debug)]
pub enum Command {
    /// [`Driver::submit`], answered with the submission's receipt.
    Submit {
        /// The core input.
        input: Input,
        /// Receives the receipt, or the refusal.
        reply: oneshot::Sender<Result<Receipt, Rejected>>,
    },
    /// [`Driver::destination_stats`].
    Stats {
        /// Receives the figures.
        reply: oneshot::Sender<Vec<DestinationStats>>,
    },
    /// [`Driver::stop`].
    Stop,
}

/// A row whose durability a submission waits for. Keys, not request ids: a failed batch is
/// re-issued by the core under a new request id, carrying the same rows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DurableKey {
    Outbox(ServerName, u64),
    Poke { destination: ServerName, user_id: String, device_id: Option<String>, stream_id: u64 },
}

fn durable_keys(changes: &Changes) -> BTreeSet<DurableKey> {
    let outbox = changes.to_device_outbox.iter().map(|row| DurableKey::Outbox(row.destination.clone(), row.outbox_id));
    let pokes = changes.device_list_pokes.iter().map(|poke| DurableKey::Poke {
        destination: poke.destination.clone(),
        user_id: poke.user_id.clone(),
        device_id: poke.device_id.clone(),
        stream_id: poke.stream_id,
    });
    outbox.chain(pokes).collect()
}

struct Waiter {
    keys: BTreeSet<DurableKey>,
    reply: oneshot::Sender<Result<(), Rejected>>,
}

/// Everything the machine's outputs have become that is not yet under way.
struct State<M> {
    machine: M,
    /// Outputs drained but not yet performed (the run loop starts them outside this borrow,
    /// so that host code it calls may submit again).
    outputs: VecDeque<Result<Output, String>>,
    /// Persist batches not yet handed to storage, in emission order.
    batches: VecDeque<(RequestId, Changes)>,
    waiters: Vec<Waiter>,
}

impl<M: Machine> State<M> {
    /// Moves every output of the machine into the queues; returns the durable keys of the
    /// persist batches among them, and whether an output could not be decoded.
    fn drain(&mut self) -> (BTreeSet<DurableKey>, bool) {
        let mut keys = BTreeSet::new();
        let mut undecodable = false;
        while let Some(output) = self.machine.poll_output() {
            match output {
                Ok(Output::Persist { request, changes }) => {
                    keys.extend(durable_keys(&changes));
                    self.batches.push_back((request, changes));
                }
                Err(what) => {
                    undecodable = true;
                    self.outputs.push_back(Err(what));
                }
                Ok(output) => self.outputs.push_back(Ok(output)),
            }
        }
        (keys, undecodable)
    }

    /// Marks `keys` durable: receipts with nothing left to wait for complete.
    fn durable(&mut self, keys: &BTreeSet<DurableKey>) {
        self.waiters.retain_mut(|waiter| {
            waiter.keys.retain(|key| !keys.contains(key));
            if !waiter.keys.is_empty() {
                return true;
            }
            // The receipt may have been dropped: nobody to tell, nothing to do.
            let reply = core::mem::replace(&mut waiter.reply, oneshot::channel().0);
            let _ = reply.send(Ok(()));
            false
        });
    }

    fn refuse_waiters(&mut self, keys: &BTreeSet<DurableKey>, why: &Rejected) {
        self.waiters.retain_mut(|waiter| {
            if waiter.keys.is_disjoint(keys) {
                return true;
            }
            let reply = core::mem::replace(&mut waiter.reply, oneshot::channel().0);
            let _ = reply.send(Err(why.clone()));
            false
        });
    }
}

/// A submission made while the driver was busy with the machine (from inside host code it
/// called): handled by the run loop, in order, right after.
struct Deferred {
    input: Input,
    reply: oneshot::Sender<Result<(), Rejected>>,
}

/// What feeding a command came to.
enum Fed {
    /// Known now: refused, acknowledged, or never to be acknowledged.
    Settled(Result<(), Rejected>),
    /// Acknowledged once these rows are durable.
    Waits(BTreeSet<DurableKey>),
}

enum Done {
    Transaction(OutgoingTransaction, TransactionResult),
    Answer { request: RequestId, what: Answered, answer: Result<Input, StorageError> },
}

type Write<'a> = LocalBoxFuture<'a, (Vec<(RequestId, Changes)>, Result<(), StorageError>)>;

/// What [`Driver::run`] has under way.
struct Running<'a, S> {
    tasks: FuturesUnordered<LocalBoxFuture<'a, Done>>,
    write: Option<Write<'a>>,
    sleep: Option<(u64, Pin<Box<S>>)>,
    commands_ended: bool,
}

/// The run loop around one sans-IO machine. See the crate documentation for what it
/// guarantees; [`Driver::run`] is the loop, [`Driver::submit`] feeds it.
pub struct Driver<M, S, T, C, O> {
    state: RefCell<State<M>>,
    deferred: RefCell<VecDeque<Deferred>>,
    waker: RefCell<Option<Waker>>,
    stopping: Cell<bool>,
    storage: S,
    transport: T,
    clock: C,
    observer: O,
    options: DriverOptions,
}

impl<M, S, T, C, O> core::fmt::Debug for Driver<M, S, T, C, O> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Driver").field("stopping", &self.stopping.get()).finish_non_exhaustive()
    }
}

impl<M: Machine, S: Storage, T: Transport, C: Clock, O: Observer> Driver<M, S, T, C, O> {
    /// A driver around `machine` (built from the state [`Storage::load_recovered`] returned).
    /// Nothing happens until [`Driver::run`] is polled.
    pub fn new(machine: M, storage: S, transport: T, clock: C, observer: O, options: DriverOptions) -> Self {
        let state = State { machine, outputs: VecDeque::new(), batches: VecDeque::new(), waiters: Vec::new() };
        Self {
            state: RefCell::new(state),
            deferred: RefCell::new(VecDeque::new()),
            waker: RefCell::new(None),
            stopping: Cell::new(false),
            storage,
            transport,
            clock,
            observer,
            options,
        }
    }

    /// The storage (e.g. for the host's own queries between runs).
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The observer.
    pub fn observer(&self) -> &O {
        &self.observer
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Feeds a command input. A refusal by the machine is returned at once when the driver is
    /// not inside the machine; when called from host code the driver is running (a callback
    /// submitting again), the input is handled right after the current step and a refusal
    /// comes through the receipt. The receipt completes once the rows the input queued are
    /// durable ([`needs_durable_acknowledgement`]), at once for other inputs.
    pub fn submit(&self, input: Input) -> Result<Receipt, Rejected> {
        if self.stopping.get() {
            return Err(Rejected::Stopped);
        }
        if is_completion(&input) {
            return Err(Rejected::Refused(String::from(
                "a completion answers a request of the machine; the driver delivers those itself",
            )));
        }
        let now_ms = self.clock.now_ms();
        let Ok(mut state) = self.state.try_borrow_mut() else {
            let (reply, receipt) = Receipt::waiting();
            self.deferred.borrow_mut().push_back(Deferred { input, reply });
            self.wake();
            return Ok(receipt);
        };
        let fed = Self::feed_command(&mut state, now_ms, input);
        let receipt = match fed {
            Fed::Settled(Err(Rejected::Refused(why))) => Err(Rejected::Refused(why)),
            Fed::Settled(result) => Ok(Receipt::done(result)),
            Fed::Waits(keys) => {
                let (reply, receipt) = Receipt::waiting();
                state.waiters.push(Waiter { keys, reply });
                Ok(receipt)
            }
        };
        drop(state);
        self.wake();
        receipt
    }

    fn feed_command(state: &mut State<M>, now_ms: u64, input: Input) -> Fed {
        let durable = needs_durable_acknowledgement(&input);
        if let Err(why) = state.machine.handle_input(now_ms, input) {
            return Fed::Settled(Err(Rejected::Refused(why)));
        }
        // Every earlier output was drained when its input was fed, so what comes out now
        // was caused by this input alone.
        let (keys, undecodable) = state.drain();
        if !durable || (keys.is_empty() && !undecodable) {
            Fed::Settled(Ok(()))
        } else if undecodable {
            // Whatever the core asked to store may be what is lost: never acknowledge that.
            let why = String::from("the submission was accepted but its effects could not be stored");
            Fed::Settled(Err(Rejected::NotStored(why)))
        } else {
            Fed::Waits(keys)
        }
    }

    /// Per-destination figures, sorted by destination (empty when called from inside the
    /// machine's step, which host code never sees).
    pub fn destination_stats(&self) -> Vec<DestinationStats> {
        self.state.try_borrow_mut().map(|mut state| state.machine.destination_stats()).unwrap_or_default()
    }

    /// Asks [`Driver::run`] to return: no new work starts, transactions and queries under
    /// way are dropped, the write under way is finished and what piled up behind it written,
    /// then the receipts still waiting are refused.
    pub fn stop(&self) {
        self.stopping.set(true);
        self.wake();
    }

    fn wake(&self) {
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }

    /// Runs the loop until [`Driver::stop`], a [`Command::Stop`], or the end of `commands`
    /// (pass [`futures::stream::pending`] when everything comes through [`Driver::submit`]).
    /// The machine's first input is a timeout: it persists its new incarnation and looks for
    /// work.
    pub async fn run<Commands>(&self, mut commands: Commands)
    where
        Commands: Stream<Item = Command> + Unpin,
    {
        self.answer(Input::Timeout);
        let mut running = Running { tasks: FuturesUnordered::new(), write: None, sleep: None, commands_ended: false };
        poll_fn(|cx| self.poll_running(cx, &mut running, &mut commands)).await;
        // Only writes are awaited: a transaction or a query writes nothing of ours. The write
        // under way is finished, then whatever piled up behind it goes out in one more, so
        // that a clean stop leaves storage as current as the machine.
        drop(running.tasks);
        if let Some(write) = running.write.take() {
            let (batches, result) = write.await;
            self.written(batches, result);
        }
        let mut last = Running { tasks: FuturesUnordered::new(), write: None, sleep: None, commands_ended: true };
        let batches_left = self.state.borrow().batches.len();
        if batches_left > 0 && self.start_write_of(&mut last, batches_left) {
            if let Some(write) = last.write.take() {
                let (batches, result) = write.await;
                self.written(batches, result);
            }
        }
        let mut state = self.state.borrow_mut();
        for waiter in state.waiters.drain(..) {
            let _ = waiter.reply.send(Err(Rejected::Stopped));
        }
        drop(state);
        for deferred in self.deferred.borrow_mut().drain(..) {
            let _ = deferred.reply.send(Err(Rejected::Stopped));
        }
    }

    /// One turn of the loop; `Ready` when it should stop.
    fn poll_running<'a, Commands>(
        &'a self,
        cx: &mut Context<'_>,
        running: &mut Running<'a, C::Sleep>,
        commands: &mut Commands,
    ) -> Poll<()>
    where
        Commands: Stream<Item = Command> + Unpin,
    {
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        loop {
            if self.stopping.get() || running.commands_ended {
                return Poll::Ready(());
            }
            let mut progress = false;
            while !running.commands_ended {
                match commands.poll_next_unpin(cx) {
                    Poll::Ready(Some(command)) => {
                        progress = true;
                        self.on_command(command);
                    }
                    Poll::Ready(None) => running.commands_ended = true,
                    Poll::Pending => break,
                }
            }
            progress |= self.run_deferred();
            progress |= self.start_outputs(running);
            progress |= self.start_write(running);
            if let Some(write) = running.write.as_mut()
                && let Poll::Ready((batches, result)) = write.as_mut().poll(cx)
            {
                running.write = None;
                self.written(batches, result);
                progress = true;
            }
            while let Poll::Ready(Some(done)) = running.tasks.poll_next_unpin(cx) {
                self.finished(done);
                progress = true;
            }
            progress |= self.poll_timer(cx, running);
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn on_command(&self, command: Command) {
        match command {
            Command::Submit { input, reply } => {
                let _ = reply.send(self.submit(input));
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.destination_stats());
            }
            Command::Stop => self.stopping.set(true),
        }
    }

    fn run_deferred(&self) -> bool {
        let mut progress = false;
        loop {
            let Some(Deferred { input, reply }) = self.deferred.borrow_mut().pop_front() else { return progress };
            progress = true;
            let now_ms = self.clock.now_ms();
            let mut state = self.state.borrow_mut();
            match Self::feed_command(&mut state, now_ms, input) {
                Fed::Settled(result) => {
                    let _ = reply.send(result);
                }
                Fed::Waits(keys) => state.waiters.push(Waiter { keys, reply }),
            }
        }
    }

    /// Starts every queued output: transactions and queries become tasks, events go to the
    /// observer. Host code runs here, with the machine free for it to submit to.
    fn start_outputs<'a>(&'a self, running: &mut Running<'a, C::Sleep>) -> bool {
        let mut progress = false;
        loop {
            let Some(output) = self.state.borrow_mut().outputs.pop_front() else { return progress };
            progress = true;
            match output {
                Err(what) => self.observer.engine_problem(&what),
                Ok(Output::SendTransaction(transaction)) => running.tasks.push(Box::pin(async move {
                    let result = self.transport.send(&transaction).await;
                    Done::Transaction(transaction, result)
                })),
                Ok(Output::FetchEvents { request, after, limit }) => running.tasks.push(Box::pin(async move {
                    let answer = self.storage.fetch_events(after, limit).await;
                    let answer = answer.map(|events| Input::EventsFetched { request, events });
                    Done::Answer { request, what: Answered::FetchEvents, answer }
                })),
                Ok(Output::LoadCatchUp { request, destination, after, up_to, limit }) => {
                    running.tasks.push(Box::pin(async move {
                        let answer = self.storage.load_catch_up(&destination, after, up_to, limit).await;
                        let answer = answer.map(|rooms| Input::CatchUpLoaded { request, rooms });
                        Done::Answer { request, what: Answered::LoadCatchUp, answer }
                    }));
                }
                Ok(Output::LoadOutstanding { request, after, limit }) => running.tasks.push(Box::pin(async move {
                    let answer = self.storage.load_outstanding(after.as_ref(), limit).await;
                    let answer = answer.map(|destinations| Input::OutstandingLoaded { request, destinations });
                    Done::Answer { request, what: Answered::LoadOutstanding, answer }
                })),
                Ok(Output::Event { event }) => self.observer.event(event),
                // Drained into `batches`, never queued here.
                Ok(Output::Persist { .. }) => {}
                // A newer core with an output this driver does not know: whatever it asked for
                // is not done, which an operator should hear about.
                Ok(other) => {
                    self.observer.engine_problem(&format!("an output this driver does not perform: {other:?}"))
                }
            }
        }
    }

    /// Hands the batches that piled up to storage, unless a write is under way: writes are
    /// one at a time, so batches become durable in the order the core emitted them.
    fn start_write<'a>(&'a self, running: &mut Running<'a, C::Sleep>) -> bool {
        self.start_write_of(running, self.options.batches_per_write_max.max(1))
    }

    fn start_write_of<'a>(&'a self, running: &mut Running<'a, C::Sleep>, batches_max: usize) -> bool {
        if running.write.is_some() {
            return false;
        }
        let batches: Vec<(RequestId, Changes)> = {
            let mut state = self.state.borrow_mut();
            let count = state.batches.len().min(batches_max);
            state.batches.drain(..count).collect()
        };
        if batches.is_empty() {
            return false;
        }
        running.write = Some(Box::pin(async move {
            let changes: Vec<&Changes> = batches.iter().map(|(_, changes)| changes).collect();
            let result = self.storage.apply(&changes).await;
            drop(changes);
            (batches, result)
        }));
        true
    }

    fn written(&self, batches: Vec<(RequestId, Changes)>, result: Result<(), StorageError>) {
        match result {
            Ok(()) => {
                for (request, changes) in batches {
                    self.state.borrow_mut().durable(&durable_keys(&changes));
                    self.answer(Input::Persisted { request });
                }
            }
            Err(error) => {
                self.observer.storage_failed("persisting sender state", &error);
                for (request, changes) in batches {
                    if self.options.refuse_receipts_on_storage_failure {
                        let why = Rejected::NotStored(error.to_string());
                        self.state.borrow_mut().refuse_waiters(&durable_keys(&changes), &why);
                    }
                    self.answer(Input::StorageFailed { request, error: error.to_string() });
                }
            }
        }
    }

    fn finished(&self, done: Done) {
        match done {
            Done::Transaction(transaction, result) => {
                self.observer.transaction_done(&transaction, &result);
                self.answer(Input::TransactionDone { request: transaction.request, result });
            }
            Done::Answer { answer: Ok(input), .. } => self.answer(input),
            Done::Answer { request, what, answer: Err(error) } => {
                self.observer.storage_failed(what.as_str(), &error);
                self.answer(Input::StorageFailed { request, error: error.0 });
            }
        }
    }

    /// Feeds a completion (or a timeout). An answer the machine refuses would leave its request
    /// waiting forever, so the request is failed instead: the core retries queries and writes
    /// after a delay, and treats a transaction as timed out.
    fn answer(&self, input: Input) {
        // What to feed instead if the answer is refused, decided before the answer is moved in:
        // only its request id is needed, so the answer (a page of events, say) is never copied.
        enum Fallback {
            StorageFailed(RequestId),
            TimedOut(RequestId),
            Nothing,
        }
        let (fallback, answered) = match &input {
            Input::EventsFetched { request, .. } => (Fallback::StorageFailed(*request), Answered::FetchEvents),
            Input::CatchUpLoaded { request, .. } => (Fallback::StorageFailed(*request), Answered::LoadCatchUp),
            Input::OutstandingLoaded { request, .. } => (Fallback::StorageFailed(*request), Answered::LoadOutstanding),
            Input::Persisted { request } => (Fallback::StorageFailed(*request), Answered::Persist),
            Input::TransactionDone { request, result } if *result != TransactionResult::Timeout => {
                (Fallback::TimedOut(*request), Answered::SendTransaction)
            }
            Input::TransactionDone { .. } => (Fallback::Nothing, Answered::SendTransaction),
            _ => (Fallback::Nothing, Answered::Other),
        };
        let Err(refusal) = self.feed(input) else { return };
        self.observer.answer_refused(answered, &refusal);
        let fallback = match fallback {
            Fallback::StorageFailed(request) => {
                Input::StorageFailed { request, error: format!("the engine refused the answer: {refusal}") }
            }
            Fallback::TimedOut(request) => Input::TransactionDone { request, result: TransactionResult::Timeout },
            // Nothing else to offer: the refusal is on record.
            Fallback::Nothing => return,
        };
        if let Err(again) = self.feed(fallback) {
            self.observer.engine_problem(&format!("the engine refused the failure of a request too: {again}"));
        }
    }

    fn feed(&self, input: Input) -> Result<(), String> {
        let now_ms = self.clock.now_ms();
        let mut state = self.state.borrow_mut();
        state.machine.handle_input(now_ms, input)?;
        // Rows that complete no receipt: only command submissions wait for theirs.
        let _ = state.drain();
        Ok(())
    }

    /// Delivers a timeout when the machine's deadline has passed, publishes statistics when
    /// the observer wants them, and otherwise sleeps until the earlier of the two.
    fn poll_timer(&self, cx: &mut Context<'_>, running: &mut Running<'_, C::Sleep>) -> bool {
        let now_ms = self.clock.now_ms();
        let deadline_ms = self.state.borrow_mut().machine.poll_timeout();
        if deadline_ms.is_some_and(|deadline| deadline <= now_ms) {
            self.answer(Input::Timeout);
            return true;
        }
        let stats_due_ms = self.observer.stats_due_ms();
        if stats_due_ms.is_some_and(|due| due <= now_ms) {
            let stats = self.state.borrow_mut().machine.destination_stats();
            self.observer.publish_stats(now_ms, stats);
            return true;
        }
        let Some(wake_ms) = [deadline_ms, stats_due_ms].into_iter().flatten().min() else {
            running.sleep = None;
            return false;
        };
        if running.sleep.as_ref().is_none_or(|(armed_ms, _)| *armed_ms != wake_ms) {
            running.sleep = Some((wake_ms, Box::pin(self.clock.sleep_until(wake_ms))));
        }
        let Some((_, sleep)) = running.sleep.as_mut() else { return false };
        if sleep.as_mut().poll(cx).is_ready() {
            running.sleep = None;
            return true;
        }
        false
    }
}
