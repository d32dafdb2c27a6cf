//! The driver on a single-threaded executor with a virtual clock: hours of retries pass in
//! milliseconds, and every guarantee of the loop is checked against the real core.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use fedsend_core::{Config, FederationSender, Input, OutgoingTransaction, Recovered, ServerName, TransactionResult};
use fedsend_driver::memory_storage::MemoryStorage;
use fedsend_driver::{Clock, Driver, DriverOptions, Observer, Rejected, Transport};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use serde_json::json;

const START_MS: u64 = 1_700_000_000_000;
const HOUR_MS: u64 = 3_600_000;

#[derive(Default)]
struct ClockState {
    now_ms: Cell<u64>,
    sleepers: RefCell<Vec<(u64, Waker)>>,
}

/// Time moves only when the test says so.
#[derive(Clone, Default)]
struct VirtualClock(Rc<ClockState>);

impl VirtualClock {
    fn starting_at(now_ms: u64) -> Self {
        let clock = Self::default();
        clock.0.now_ms.set(now_ms);
        clock
    }

    fn now(&self) -> u64 {
        self.0.now_ms.get()
    }

    /// Jumps to the earliest armed timer and fires it; false when none is armed.
    fn advance_to_next_timer(&self) -> bool {
        let next = self.0.sleepers.borrow().iter().map(|(deadline, _)| *deadline).min();
        let Some(next) = next else { return false };
        self.0.now_ms.set(self.now().max(next));
        let now = self.now();
        let due: Vec<Waker> = {
            let mut sleepers = self.0.sleepers.borrow_mut();
            let (due, later): (Vec<_>, Vec<_>) = sleepers.drain(..).partition(|(deadline, _)| *deadline <= now);
            *sleepers = later;
            due.into_iter().map(|(_, waker)| waker).collect()
        };
        due.into_iter().for_each(Waker::wake);
        true
    }
}

struct Sleep {
    clock: VirtualClock,
    deadline_ms: u64,
}

impl Future for Sleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.clock.now() >= self.deadline_ms {
            return Poll::Ready(());
        }
        self.clock.0.sleepers.borrow_mut().push((self.deadline_ms, cx.waker().clone()));
        Poll::Pending
    }
}

impl Clock for VirtualClock {
    type Sleep = Sleep;
    fn now_ms(&self) -> u64 {
        self.now()
    }
    fn sleep_until(&self, deadline_ms: u64) -> Sleep {
        Sleep { clock: self.clone(), deadline_ms }
    }
}

/// Answers at once: unreachable for the first `failures` attempts, then 200.
struct FlakyRemote {
    clock: VirtualClock,
    failures: Cell<u32>,
    attempts: RefCell<Vec<(u64, OutgoingTransaction)>>,
}

impl Transport for FlakyRemote {
    async fn send(&self, transaction: &OutgoingTransaction) -> TransactionResult {
        self.attempts.borrow_mut().push((self.clock.now(), transaction.clone()));
        if self.failures.get() > 0 {
            self.failures.set(self.failures.get() - 1);
            return TransactionResult::Unreachable;
        }
        TransactionResult::Ok { pdu_errors: BTreeMap::new() }
    }
}

type TestDriver = Driver<FederationSender, Rc<MemoryStorage>, Rc<FlakyRemote>, VirtualClock, Rc<Watcher>>;

/// Submits an EDU from inside the driver's own call, the first time a transaction finishes.
#[derive(Default)]
struct Watcher {
    driver: RefCell<Weak<TestDriver>>,
    resubmitted: Cell<bool>,
    storage_failures: Cell<u32>,
}

impl Observer for Watcher {
    fn transaction_done(&self, _transaction: &OutgoingTransaction, _result: &TransactionResult) {
        if self.resubmitted.replace(true) {
            return;
        }
        let driver = self.driver.borrow().upgrade().expect("the test keeps the driver");
        let _immediate = driver.submit(edu("m.from_a_callback")).expect("accepted from inside a callback");
    }
    fn storage_failed(&self, _what: &str, _error: &fedsend_driver::StorageError) {
        self.storage_failures.set(self.storage_failures.get() + 1);
    }
}

fn remote() -> ServerName {
    ServerName::parse("remote.test").unwrap()
}

fn edu(edu_type: &str) -> Input {
    Input::Edu { destination: remote(), edu_type: edu_type.into(), content: json!({}), key: None }
}

fn to_device() -> Input {
    serde_json::from_value(json!({
        "type": "to_device", "sender": "@alice:origin.test", "message_type": "m.test", "message_id": "m1",
        "messages": { "@bob:remote.test": { "DEVICE": { "hello": 1 } } }
    }))
    .unwrap()
}

struct World {
    pool: LocalPool,
    clock: VirtualClock,
    storage: Rc<MemoryStorage>,
    remote: Rc<FlakyRemote>,
    watcher: Rc<Watcher>,
    driver: Rc<TestDriver>,
}

impl World {
    fn new(failures: u32, options: DriverOptions) -> Self {
        let clock = VirtualClock::starting_at(START_MS);
        let storage = Rc::new(MemoryStorage::new());
        let remote =
            Rc::new(FlakyRemote { clock: clock.clone(), failures: Cell::new(failures), attempts: RefCell::default() });
        let watcher = Rc::new(Watcher::default());
        let config = Config::new(ServerName::parse("origin.test").unwrap());
        let machine = FederationSender::new(config, Recovered::default()).unwrap();
        let driver =
            Rc::new(Driver::new(machine, storage.clone(), remote.clone(), clock.clone(), watcher.clone(), options));
        *watcher.driver.borrow_mut() = Rc::downgrade(&driver);
        let pool = LocalPool::new();
        let running = driver.clone();
        pool.spawner().spawn_local(async move { running.run(futures::stream::pending()).await }).unwrap();
        let mut world = Self { pool, clock, storage, remote, watcher, driver };
        world.settle();
        world
    }

    fn settle(&mut self) {
        self.pool.run_until_stalled();
    }

    /// Lets virtual time pass timer by timer until `until_ms`, or nothing is armed.
    fn run_until(&mut self, until_ms: u64) {
        self.settle();
        while self.clock.now() < until_ms && self.clock.advance_to_next_timer() {
            self.settle();
        }
    }

    fn delivered_edu_types(&self) -> Vec<String> {
        let attempts = self.remote.attempts.borrow();
        let last_ok = attempts.len().saturating_sub(0);
        attempts[..last_ok]
            .iter()
            .flat_map(|(_, txn)| {
                let body: serde_json::Value = serde_json::from_str(&txn.body).unwrap();
                body["edus"].as_array().cloned().unwrap_or_default()
            })
            .map(|edu| edu["edu_type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

const FAILURES: u32 = 30;

#[test]
fn an_hour_of_backoff_passes_in_virtual_time_and_the_edu_arrives() {
    let mut world = World::new(FAILURES, DriverOptions::default());
    let _immediate = world.driver.submit(edu("m.first")).unwrap();
    world.run_until(START_MS + 48 * HOUR_MS);
    let attempts: Vec<u64> = world.remote.attempts.borrow().iter().map(|(at, _)| *at).collect();
    let failures = FAILURES as usize;
    assert!(attempts.len() > failures, "{FAILURES} failures then a success, got {} attempts", attempts.len());
    let gaps: Vec<u64> = attempts.windows(2).take(failures).map(|pair| pair[1] - pair[0]).collect();
    assert!(attempts[failures] - attempts[0] > 50 * 60_000, "the retries spanned most of an hour: {gaps:?}");
    let delivered = world.delivered_edu_types();
    assert!(delivered.contains(&"m.first".to_owned()), "{delivered:?}");
    // The callback's submission went through the same loop.
    assert!(delivered.contains(&"m.from_a_callback".to_owned()), "{delivered:?}");
}

#[test]
fn a_to_device_receipt_completes_once_its_rows_are_durable_even_after_a_failed_write() {
    let mut world = World::new(0, DriverOptions::default());
    world.storage.fail_next_writes(1);
    let mut receipt = Box::pin(world.driver.submit(to_device()).unwrap());
    let waker = futures::task::noop_waker();
    assert!(receipt.as_mut().poll(&mut Context::from_waker(&waker)).is_pending(), "nothing is durable yet");
    world.settle();
    assert_eq!(world.watcher.storage_failures.get(), 1, "the failed write was reported");
    assert!(receipt.as_mut().poll(&mut Context::from_waker(&waker)).is_pending(), "the first write failed");
    assert!(world.storage.tables().to_device_outbox.is_empty());
    world.run_until(START_MS + HOUR_MS);
    assert_eq!(receipt.as_mut().poll(&mut Context::from_waker(&waker)), Poll::Ready(Ok(())));
}

#[test]
fn a_failed_write_refuses_the_receipt_when_the_host_asks_for_that() {
    let options = DriverOptions { refuse_receipts_on_storage_failure: true, ..DriverOptions::default() };
    let mut world = World::new(0, options);
    world.storage.fail_next_writes(1);
    let receipt = world.driver.submit(to_device()).unwrap();
    world.settle();
    let answer = futures::executor::block_on(receipt);
    assert!(matches!(answer, Err(Rejected::NotStored(_))), "{answer:?}");
}

#[test]
fn refused_inputs_and_completions_are_refused_at_once() {
    let mut world = World::new(0, DriverOptions::default());
    let ourselves = Input::Edu {
        destination: ServerName::parse("origin.test").unwrap(),
        edu_type: "m.x".into(),
        content: json!({}),
        key: None,
    };
    assert!(matches!(world.driver.submit(ourselves), Err(Rejected::Refused(_))));
    let completion = Input::Persisted { request: fedsend_core::RequestId(1) };
    assert!(matches!(world.driver.submit(completion), Err(Rejected::Refused(why)) if why.contains("completion")));
    world.settle();
    assert!(world.remote.attempts.borrow().is_empty());
}

#[test]
fn stop_refuses_waiting_receipts_and_returns() {
    let mut world = World::new(u32::MAX, DriverOptions::default());
    world.storage.fail_next_writes(u32::MAX);
    let writes_before = world.storage.writes();
    let receipt = world.driver.submit(to_device()).unwrap();
    world.settle();
    world.driver.stop();
    world.settle();
    assert_eq!(futures::executor::block_on(receipt), Err(Rejected::Stopped));
    assert_eq!(world.driver.submit(edu("m.late")).unwrap_err(), Rejected::Stopped);
    assert_eq!(world.storage.writes(), writes_before);
}

#[test]
fn stop_writes_the_batches_that_piled_up_and_acknowledges_them() {
    let mut world = World::new(0, DriverOptions::default());
    // Queued by the machine, not yet handed to storage: the loop has not run since.
    let receipt = world.driver.submit(to_device()).unwrap();
    world.driver.stop();
    world.settle();
    assert_eq!(futures::executor::block_on(receipt), Ok(()));
    assert_eq!(world.storage.tables().to_device_outbox.len(), 1, "the row was written at the stop");
}
