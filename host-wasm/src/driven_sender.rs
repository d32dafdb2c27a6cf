//! `DrivenSender`: the one run loop (`fedsend-driver`) on JavaScript's event loop.
//!
//! The npm package's `FederationSender` is a thin wrapper over this class: it turns each user
//! callback into an adapter that never throws (a throw, a rejection or a malformed answer is
//! reported as a typed error where it happens, and becomes a failed promise here), and this
//! module performs the machine's outputs through those adapters with the driver's guarantees
//! (persist order, durable acknowledgements, timers, every request answered once).
//!
//! Values cross as JavaScript objects ([`crate::js_value`]), never as JSON text.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use fedsend_core::{
    CatchUpRoom, Changes, Config, Event, FederationSender as Core, Input, OutgoingTransaction, PduInfo, Recovered,
    ServerName, TransactionResult,
};
use fedsend_driver::{
    Answered, Clock, Driver, DriverOptions, MemoryStore, Observer, Rejected, Storage, StorageError, Transport,
};
use futures::FutureExt;
use js_sys::{Function, Promise};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::ReferenceMemoryStore;
use crate::js_value::{from_js, input_from_js, to_js};
use crate::ms::{ms_from_js, ms_to_js};

/// Longest delay `setTimeout` takes: it stores delays as 32-bit signed integers and fires
/// longer ones at once. A later deadline is reached in hops.
const TIMER_DELAY_MAX_MS: u64 = (1 << 31) - 1;

#[wasm_bindgen]
extern "C" {
    /// What the JavaScript wrapper hands the driver: adapters over the user's callbacks that
    /// never throw (they report, then reject) and always return promises.
    pub type DrivenHost;

    #[wasm_bindgen(method, catch, js_name = applyChanges)]
    fn apply_changes(this: &DrivenHost, changes: JsValue) -> Result<Promise, JsValue>;
    #[wasm_bindgen(method, catch, js_name = fetchEvents)]
    fn fetch_events(this: &DrivenHost, after: f64, limit: u32) -> Result<Promise, JsValue>;
    #[wasm_bindgen(method, catch, js_name = loadCatchUp)]
    fn load_catch_up(
        this: &DrivenHost,
        destination: &str,
        after: f64,
        up_to: f64,
        limit: u32,
    ) -> Result<Promise, JsValue>;
    #[wasm_bindgen(method, catch, js_name = loadOutstanding)]
    fn load_outstanding(this: &DrivenHost, after: Option<String>, limit: u32) -> Result<Promise, JsValue>;
    /// Starts one attempt; the request's `abort()` cancels it.
    #[wasm_bindgen(method, catch, js_name = sendTransaction)]
    fn send_transaction(this: &DrivenHost, transaction: JsValue) -> Result<Request, JsValue>;
    #[wasm_bindgen(method, catch, js_name = onEvent)]
    fn on_event(this: &DrivenHost, event: JsValue) -> Result<(), JsValue>;
    /// A callback answered with data the core's types refuse: the wrapper reports it as that
    /// callback's error.
    #[wasm_bindgen(method, catch)]
    fn refused(this: &DrivenHost, callback: &str, why: &str) -> Result<(), JsValue>;
    #[wasm_bindgen(method, catch, js_name = engineProblem)]
    fn engine_problem(this: &DrivenHost, what: &str) -> Result<(), JsValue>;
    /// Whether `homeserver.loadOutstanding` answers instead of the store.
    #[wasm_bindgen(method, getter, js_name = outstandingFromHomeserver)]
    fn outstanding_from_homeserver(this: &DrivenHost) -> bool;
    /// `{now, setTimeout, clearTimeout}`, or undefined for the platform's own timers.
    #[wasm_bindgen(method, getter)]
    fn clock(this: &DrivenHost) -> JsValue;

    /// One transaction attempt under way.
    pub type Request;
    #[wasm_bindgen(method, getter)]
    fn done(this: &Request) -> Promise;
    #[wasm_bindgen(method, catch)]
    fn abort(this: &Request) -> Result<(), JsValue>;

    type HostClock;
    #[wasm_bindgen(method, catch)]
    fn now(this: &HostClock) -> Result<f64, JsValue>;
    #[wasm_bindgen(method, catch, js_name = setTimeout)]
    fn set_timeout(this: &HostClock, callback: &Function, delay_ms: f64) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, catch, js_name = clearTimeout)]
    fn clear_timeout(this: &HostClock, handle: &JsValue) -> Result<(), JsValue>;
}

/// The host's clock object, or the platform's (`Date.now`, gloo-timers).
#[derive(Clone)]
pub(crate) struct JsClock(Option<Rc<HostClock>>);

impl Clock for JsClock {
    type Sleep = Sleep;

    fn now_ms(&self) -> u64 {
        // The wrapper's `now` checks the user's clock and reports a bad reading; a throw that
        // slips through still must not take the driver down.
        let reading = match &self.0 {
            Some(clock) => clock.now().unwrap_or_else(|_| js_sys::Date::now()),
            None => js_sys::Date::now(),
        };
        ms_from_js("clock.now", reading).unwrap_or_else(|_| ms_from_js("Date.now", js_sys::Date::now()).unwrap_or(0))
    }

    fn sleep_until(&self, deadline_ms: u64) -> Sleep {
        Sleep { clock: self.clone(), deadline_ms, timer: None }
    }
}

/// Completes once the clock reads `deadline_ms`; dropping it clears its timer.
pub(crate) struct Sleep {
    clock: JsClock,
    deadline_ms: u64,
    timer: Option<Timer>,
}

enum Timer {
    Host {
        clock: Rc<HostClock>,
        handle: JsValue,
        fired: Rc<Fired>,
        _callback: Closure<dyn FnMut()>,
    },
    Platform(gloo_timers::future::TimeoutFuture),
    /// The host's clock could not set a timer (its adapter reported why): never fires,
    /// rather than have the driver spin on a deadline it cannot sleep until.
    Unavailable,
}

#[derive(Default)]
struct Fired {
    done: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Self::Host { clock, handle, fired, .. } = self
            && !fired.done.get()
        {
            let _ = clock.clear_timeout(handle);
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let fired = match self.timer.as_mut() {
                None => true,
                Some(Timer::Unavailable) => false,
                Some(Timer::Platform(timeout)) => Pin::new(timeout).poll(cx).is_ready(),
                Some(Timer::Host { fired, .. }) => {
                    *fired.waker.borrow_mut() = Some(cx.waker().clone());
                    fired.done.get()
                }
            };
            if !fired {
                return Poll::Pending;
            }
            self.timer = None;
            let now_ms = self.clock.now_ms();
            if now_ms >= self.deadline_ms {
                return Poll::Ready(());
            }
            let delay_ms = (self.deadline_ms - now_ms).min(TIMER_DELAY_MAX_MS);
            self.timer = Some(self.arm(delay_ms));
        }
    }
}

impl Sleep {
    fn arm(&self, delay_ms: u64) -> Timer {
        let Some(clock) = &self.clock.0 else {
            // Exact: the delay is at most 2^31 - 1.
            return Timer::Platform(gloo_timers::future::TimeoutFuture::new(delay_ms as u32));
        };
        let fired = Rc::new(Fired::default());
        let on_fire = Rc::clone(&fired);
        let callback = Closure::<dyn FnMut()>::new(move || {
            on_fire.done.set(true);
            if let Some(waker) = on_fire.waker.borrow_mut().take() {
                waker.wake();
            }
        });
        match clock.set_timeout(callback.as_ref().unchecked_ref(), delay_ms as f64) {
            Ok(handle) if !handle.is_null() => {
                Timer::Host { clock: Rc::clone(clock), handle, fired, _callback: callback }
            }
            _ => Timer::Unavailable,
        }
    }
}

/// The wrapper's storage and homeserver adapters; with the package's own MemoryStore, its
/// tables directly, so a write never leaves wasm.
pub(crate) struct JsStorage {
    host: Rc<DrivenHost>,
    tables: Option<Rc<RefCell<MemoryStore>>>,
}

impl JsStorage {
    /// Awaits an adapter's promise; a rejection was reported by the adapter already.
    async fn call(&self, started: Result<Promise, JsValue>) -> Result<JsValue, StorageError> {
        let promise = started.map_err(|e| StorageError(describe(&e)))?;
        JsFuture::from(promise).await.map_err(|e| StorageError(describe(&e)))
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, callback: &str, value: &JsValue) -> Result<T, StorageError> {
        from_js(value).map_err(|e| {
            let why = format!("malformed input: {e}");
            let _ = self.host.refused(callback, &why);
            StorageError(format!("{callback}: returned data the sender refused: {why}"))
        })
    }
}

impl Storage for JsStorage {
    async fn load_recovered(&self) -> Result<Recovered, StorageError> {
        // The wrapper loads the recovered state before the driver exists.
        Err(StorageError(String::from("the recovered state is loaded by the JavaScript wrapper")))
    }

    async fn apply(&self, batches: &[&Changes]) -> Result<(), StorageError> {
        if let Some(tables) = &self.tables {
            let mut tables = tables.borrow_mut();
            batches.iter().for_each(|changes| tables.apply(changes));
            return Ok(());
        }
        // One store call per batch, in order: a JavaScript store applies one batch atomically.
        for changes in batches {
            self.call(self.host.apply_changes(to_js(changes))).await?;
        }
        Ok(())
    }

    async fn fetch_events(&self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StorageError> {
        let events = self.call(self.host.fetch_events(ms_to_js(after), limit)).await?;
        self.decode("homeserver.fetchEvents", &events)
    }

    async fn load_catch_up(
        &self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StorageError> {
        let started = self.host.load_catch_up(destination.as_str(), ms_to_js(after), ms_to_js(up_to), limit);
        let rooms = self.call(started).await?;
        self.decode("homeserver.loadCatchUp", &rooms)
    }

    async fn load_outstanding(&self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StorageError> {
        if let Some(tables) = &self.tables
            && !self.host.outstanding_from_homeserver()
        {
            return Ok(tables.borrow().outstanding(after, limit));
        }
        let after = after.map(|name| name.as_str().to_owned());
        let destinations = self.call(self.host.load_outstanding(after, limit)).await?;
        self.decode("loadOutstanding", &destinations)
    }
}

/// The wrapper's transport adapter (signing, the request timeout and the mapping of answers
/// and errors to a result are JavaScript's).
pub(crate) struct JsTransport(Rc<DrivenHost>);

/// Aborts the request unless it finished: the driver drops a transaction's future at stop.
struct Abortable {
    request: Request,
    finished: bool,
}

impl Drop for Abortable {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.request.abort();
        }
    }
}

impl Transport for JsTransport {
    async fn send(&self, transaction: &OutgoingTransaction) -> TransactionResult {
        let Ok(request) = self.0.send_transaction(to_js(transaction)) else {
            let _ = self.0.engine_problem("the transport adapter threw");
            return TransactionResult::Unreachable;
        };
        let mut under_way = Abortable { request, finished: false };
        let answer = JsFuture::from(under_way.request.done()).await;
        under_way.finished = true;
        match answer.map_err(|e| describe(&e)).and_then(|result| from_js(&result)) {
            Ok(result) => result,
            Err(why) => {
                // The adapter answers only well-formed results; if not, it is unknown whether
                // the remote got the transaction, which is what a timeout means.
                let _ = self.0.engine_problem(&format!("the transport adapter answered {why}"));
                TransactionResult::Timeout
            }
        }
    }
}

/// The wrapper's `onEvent` and error reporting.
pub(crate) struct JsObserver(Rc<DrivenHost>);

impl Observer for JsObserver {
    fn event(&self, event: Event) {
        let _ = self.0.on_event(to_js(&event));
    }

    fn storage_failed(&self, _what: &str, _error: &StorageError) {
        // Reported where it happened: by the adapter (throw, rejection, wrong shape) or by
        // `JsStorage::decode` (data the core's types refuse), with the callback's name.
    }

    fn engine_problem(&self, what: &str) {
        let _ = self.0.engine_problem(what);
    }

    /// The answer came from a user callback (through its adapter), so it is that callback's
    /// error: well-formed data the core still refuses (an event past the range asked for, say).
    fn answer_refused(&self, answered: Answered, refusal: &str) {
        let callback = match answered {
            Answered::FetchEvents => "homeserver.fetchEvents",
            Answered::LoadCatchUp => "homeserver.loadCatchUp",
            Answered::LoadOutstanding => "loadOutstanding",
            Answered::SendTransaction => "transport.sendTransaction",
            // Answers the driver makes itself: a disagreement with the engine.
            Answered::Persist | Answered::Other => {
                let _ =
                    self.0.engine_problem(&format!("the engine refused an answer ({}): {refusal}", answered.as_str()));
                return;
            }
        };
        let _ = self.0.refused(callback, refusal);
    }
}

type JsDriver = Driver<Core, JsStorage, JsTransport, JsClock, JsObserver>;

/// The sender's run loop with JavaScript callbacks: see `npm/src/sender.js`.
#[wasm_bindgen]
pub struct DrivenSender {
    driver: Rc<JsDriver>,
    finished: Promise,
}

#[wasm_bindgen]
impl DrivenSender {
    /// Builds the machine from `config` and `recovered` (objects) and starts the loop: its
    /// first step (the start-up timeout) has run when this returns. Throws an `Error` whose
    /// message starts with "invalid config" or "invalid recovered state". `tables`: the
    /// package's own MemoryStore (unsubclassed), which the driver then writes to directly.
    #[wasm_bindgen(constructor)]
    pub fn new(
        config: JsValue,
        recovered: JsValue,
        host: DrivenHost,
        tables: Option<ReferenceMemoryStore>,
    ) -> Result<Self, JsError> {
        let config: Config = from_js(&config).map_err(|e| JsError::new(&format!("invalid config: {e}")))?;
        let recovered: Recovered =
            from_js(&recovered).map_err(|e| JsError::new(&format!("invalid recovered state: {e}")))?;
        let machine = Core::new(config, recovered).map_err(|e| JsError::new(&e.to_string()))?;
        let host = Rc::new(host);
        let clock = host.clock();
        let clock = JsClock((!clock.is_undefined() && !clock.is_null()).then(|| Rc::new(clock.unchecked_into())));
        let options = DriverOptions {
            // One store call per write: a JavaScript store's applyChanges is atomic per batch.
            batches_per_write_max: 1,
            // A promise simply resolves later, once the core's retry of the write lands.
            refuse_receipts_on_storage_failure: false,
        };
        let driver = Rc::new(Driver::new(
            machine,
            JsStorage { host: Rc::clone(&host), tables: tables.map(|tables| tables.tables()) },
            JsTransport(Rc::clone(&host)),
            clock,
            JsObserver(host),
            options,
        ));
        let running = Rc::clone(&driver);
        let mut run: Pin<Box<dyn Future<Output = ()>>> =
            Box::pin(async move { running.run(futures::stream::pending()).await });
        // The first step now, so that commands submitted next come after the start-up
        // timeout, as the machine's contract has it. Whatever it registered with this waker
        // is registered again with the executor's at the next poll.
        let finished_now = run.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_ready();
        let (done, when_done) = futures::channel::oneshot::channel::<()>();
        if finished_now {
            let _ = done.send(());
        } else {
            wasm_bindgen_futures::spawn_local(async move {
                run.await;
                let _ = done.send(());
            });
        }
        let finished = wasm_bindgen_futures::future_to_promise(async move {
            let _ = when_done.await;
            Ok(JsValue::UNDEFINED)
        });
        Ok(Self { driver, finished })
    }

    /// Feeds a command input (an object). Returns `undefined` when it is acknowledged at once,
    /// or a promise that resolves once its rows are durable. A refusal throws an `Error` with
    /// `kind` "refused" (or "stopped" after `stop()`); called from inside a callback, a refusal
    /// rejects the promise instead.
    pub fn submit(&self, input: JsValue) -> Result<JsValue, JsValue> {
        let input: Input =
            input_from_js(&input).map_err(|e| rejection(&Rejected::Refused(format!("malformed input: {e}"))))?;
        let receipt = self.driver.submit(input).map_err(|why| rejection(&why))?;
        if receipt.is_settled() {
            return match receipt.now_or_never() {
                Some(Ok(())) | None => Ok(JsValue::UNDEFINED),
                Some(Err(why)) => Ok(Promise::reject(&rejection(&why)).into()),
            };
        }
        let promise = wasm_bindgen_futures::future_to_promise(async move {
            receipt.await.map(|()| JsValue::UNDEFINED).map_err(|why| rejection(&why))
        });
        Ok(promise.into())
    }

    /// Per-destination figures (objects), sorted by destination.
    #[wasm_bindgen(js_name = destinationStats)]
    pub fn destination_stats(&self) -> JsValue {
        to_js(&self.driver.destination_stats())
    }

    /// Stops the loop: timers cleared, transactions aborted, the write under way finished,
    /// receipts still waiting rejected with `kind` "stopped". Returns `finished()`.
    pub fn stop(&self) -> Promise {
        self.driver.stop();
        self.finished.clone()
    }

    /// Resolves once the loop has returned.
    pub fn finished(&self) -> Promise {
        self.finished.clone()
    }
}

/// A JavaScript `Error` for a refused or unacknowledged submission; `kind` says which.
fn rejection(why: &Rejected) -> JsValue {
    let kind = match why {
        Rejected::Refused(_) => "refused",
        Rejected::NotStored(_) => "not_stored",
        Rejected::Stopped => "stopped",
    };
    let error = js_sys::Error::new(&why.to_string());
    let _ = js_sys::Reflect::set(&error, &JsValue::from_str("kind"), &JsValue::from_str(kind));
    error.into()
}

/// One line for a thrown or rejected JavaScript value.
fn describe(value: &JsValue) -> String {
    if let Some(error) = value.dyn_ref::<js_sys::Error>() {
        return String::from(error.message());
    }
    value.as_string().unwrap_or_else(|| format!("{value:?}"))
}
