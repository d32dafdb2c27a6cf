//! # fedsend-driver: the one run loop around the sans-IO core
//!
//! The core ([`fedsend_core::FederationSender`]) decides everything and performs nothing. A
//! host has to feed it inputs, perform its outputs and sleep until its deadline (the run-loop
//! contract in the core's crate documentation). This crate is that loop, written once for
//! every host: [`Driver`] owns the machine and performs its outputs through three traits the
//! host implements —
//!
//! - [`Clock`]: the time, and a future that completes at a deadline;
//! - [`Storage`]: one durable write of a group of [`Changes`] batches, the recovered state,
//!   and the homeserver queries (events, catch-up rows, outstanding destinations);
//! - [`Transport`]: one attempt of one transaction.
//!
//! It runs on any executor (tokio natively, the browser's or Node's event loop through
//! wasm-bindgen), needs only `alloc` and `futures`, and holds nothing across an await that a
//! callback re-entering the driver could trip over: [`Driver::submit`] may be called from
//! inside a storage, transport or observer call.
//!
//! What the loop guarantees, whatever the host:
//! - every request is answered exactly once: a failed storage call as
//!   [`Input::StorageFailed`] (the core retries), and an answer the machine refuses is
//!   replaced by that failure rather than leaving the request waiting forever;
//! - persist batches are written in the order the core emitted them, grouped into one durable
//!   write while an earlier write is under way;
//! - to-device messages and device-list updates are acknowledged ([`Receipt`]) only once every
//!   row they queued is durable, whichever write (a first attempt, or a retry the core issued
//!   under a new request id) made it so;
//! - a timer is armed for the machine's deadline only, and a wake-up for the host's statistics
//!   never reaches the machine as a spurious timeout;
//! - [`Driver::run`] returns after a stop request once the write under way is finished and
//!   the batches that piled up behind it are written; transactions and queries under way are
//!   dropped (a transport's future cancels its request when dropped), and receipts still
//!   waiting are refused.
//!
//! The simulator, the scenario engines and the visualiser keep driving the machine directly in
//! virtual time: this loop is for hosts that do real I/O.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

extern crate alloc;

mod driver;
mod machine;
pub mod memory_storage;
mod memory_store;
mod receipt;

pub use driver::{Command, Driver, DriverOptions};
pub use machine::{JsonEngine, JsonMachine, Machine};
pub use memory_store::MemoryStore;
pub use receipt::{Receipt, Rejected};

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::future::Future;

use fedsend_core::{
    CatchUpRoom, Changes, DestinationStats, Event, Input, OutgoingTransaction, PduInfo, Recovered, ServerName,
    TransactionResult,
};

/// The host's time.
pub trait Clock {
    /// Completes at (or after) a deadline; dropping it cancels the timer.
    type Sleep: Future<Output = ()>;
    /// Now, in Unix milliseconds.
    fn now_ms(&self) -> u64;
    /// A future that completes once [`Clock::now_ms`] has reached `deadline_ms`.
    fn sleep_until(&self, deadline_ms: u64) -> Self::Sleep;
}

/// Why a storage call failed. Nothing was written when a write returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageError(pub String);

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the sender-owned state lives, and the homeserver facts the core asks about.
///
/// Methods take `&self` because the driver keeps several calls under way at once (a write,
/// catch-up queries of several destinations); an implementation serialises what it must.
#[allow(async_fn_in_trait)] // Hosts are single-threaded or spawn their own tasks: no Send bound wanted.
pub trait Storage {
    /// The state a restarted sender resumes from.
    async fn load_recovered(&self) -> Result<Recovered, StorageError>;
    /// Applies `batches` in order, atomically: all of them are durable when this returns
    /// `Ok`, none of them when it returns `Err`.
    async fn apply(&self, batches: &[&Changes]) -> Result<(), StorageError>;
    /// [`fedsend_core::Output::FetchEvents`].
    async fn fetch_events(&self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StorageError>;
    /// [`fedsend_core::Output::LoadCatchUp`].
    async fn load_catch_up(
        &self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StorageError>;
    /// [`fedsend_core::Output::LoadOutstanding`].
    async fn load_outstanding(&self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StorageError>;
}

/// One HTTP attempt of one transaction. Retry policy is the core's, never the transport's:
/// every failure is reported as its [`TransactionResult`], and a future dropped before it
/// completes must cancel its request.
#[allow(async_fn_in_trait)] // As for Storage.
pub trait Transport {
    /// `PUT /_matrix/federation/v1/send/{txn_id}` of `transaction` to its destination.
    async fn send(&self, transaction: &OutgoingTransaction) -> TransactionResult;
}

/// Which request of the machine an answer was to (see [`Observer::answer_refused`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// [`fedsend_core::Output::FetchEvents`].
    FetchEvents,
    /// [`fedsend_core::Output::LoadCatchUp`].
    LoadCatchUp,
    /// [`fedsend_core::Output::LoadOutstanding`].
    LoadOutstanding,
    /// [`fedsend_core::Output::Persist`].
    Persist,
    /// [`fedsend_core::Output::SendTransaction`].
    SendTransaction,
    /// A failure report or a timeout, which name no query.
    Other,
}

impl Answered {
    /// The request in words, for logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FetchEvents => "fetching events",
            Self::LoadCatchUp => "loading catch-up rows",
            Self::LoadOutstanding => "loading outstanding destinations",
            Self::Persist => "persisting",
            Self::SendTransaction => "sending a transaction",
            Self::Other => "a failure or a timeout",
        }
    }
}

/// What the host wants to hear about. Every method has a default that ignores it.
pub trait Observer {
    /// An event of the core (backoff, drops, destinations coming up …).
    fn event(&self, event: Event) {
        let _ = event;
    }
    /// A transaction attempt finished.
    fn transaction_done(&self, transaction: &OutgoingTransaction, result: &TransactionResult) {
        let _ = (transaction, result);
    }
    /// A storage call failed (`what` names it); the core will retry.
    fn storage_failed(&self, what: &str, error: &StorageError) {
        let _ = (what, error);
    }
    /// The machine refused an answer, or emitted an output the host cannot decode: the host
    /// and the engine disagree, which an operator should hear about.
    fn engine_problem(&self, what: &str) {
        let _ = what;
    }
    /// The machine refused the answer to one of its requests: what the host's storage or
    /// transport returned was well-formed but not acceptable (`refusal` says why). The driver
    /// fails the request instead, so the machine retries it. A host that hands those answers
    /// over from someone else's code (the JavaScript host's callbacks) blames that code here;
    /// by default it is an engine problem.
    fn answer_refused(&self, answered: Answered, refusal: &str) {
        self.engine_problem(&format!("the engine refused an answer ({}): {refusal}", answered.as_str()));
    }
    /// When the host next wants [`Observer::publish_stats`] (Unix ms), if at all.
    fn stats_due_ms(&self) -> Option<u64> {
        None
    }
    /// Per-destination figures, taken when [`Observer::stats_due_ms`] came.
    fn publish_stats(&self, now_ms: u64, stats: Vec<DestinationStats>) {
        let _ = (now_ms, stats);
    }
}

/// An observer that wants nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unobserved;

impl Observer for Unobserved {}

/// Inputs whose effect a host may acknowledge to its client only once durable.
pub fn needs_durable_acknowledgement(input: &Input) -> bool {
    matches!(input, Input::ToDevice { .. } | Input::DeviceListUpdate { .. } | Input::SigningKeyUpdate { .. })
}

/// Inputs that answer a request of the machine: the driver delivers those itself, and one
/// submitted by the host could claim a write was durable when it is not.
pub fn is_completion(input: &Input) -> bool {
    matches!(
        input,
        Input::EventsFetched { .. }
            | Input::CatchUpLoaded { .. }
            | Input::OutstandingLoaded { .. }
            | Input::Persisted { .. }
            | Input::StorageFailed { .. }
            | Input::TransactionDone { .. }
    )
}

// Shared handles: a host keeps its store, transport or observer in an `Rc` to reach it from
// outside the driver too (tests inspecting it, a page showing it).
impl<S: Storage + ?Sized> Storage for alloc::rc::Rc<S> {
    async fn load_recovered(&self) -> Result<Recovered, StorageError> {
        (**self).load_recovered().await
    }
    async fn apply(&self, batches: &[&Changes]) -> Result<(), StorageError> {
        (**self).apply(batches).await
    }
    async fn fetch_events(&self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StorageError> {
        (**self).fetch_events(after, limit).await
    }
    async fn load_catch_up(
        &self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StorageError> {
        (**self).load_catch_up(destination, after, up_to, limit).await
    }
    async fn load_outstanding(&self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StorageError> {
        (**self).load_outstanding(after, limit).await
    }
}

impl<T: Transport + ?Sized> Transport for alloc::rc::Rc<T> {
    async fn send(&self, transaction: &OutgoingTransaction) -> TransactionResult {
        (**self).send(transaction).await
    }
}

/// An observer shared through a pointer: one the host keeps in an `Rc` on a single thread, or
/// in an `Arc` when its figures are read from other threads (the service's metrics).
macro_rules! observer_through {
    ($pointer:ty) => {
        impl<O: Observer + ?Sized> Observer for $pointer {
            fn event(&self, event: Event) {
                (**self).event(event);
            }
            fn transaction_done(&self, transaction: &OutgoingTransaction, result: &TransactionResult) {
                (**self).transaction_done(transaction, result);
            }
            fn storage_failed(&self, what: &str, error: &StorageError) {
                (**self).storage_failed(what, error);
            }
            fn engine_problem(&self, what: &str) {
                (**self).engine_problem(what);
            }
            fn answer_refused(&self, answered: Answered, refusal: &str) {
                (**self).answer_refused(answered, refusal);
            }
            fn stats_due_ms(&self) -> Option<u64> {
                (**self).stats_due_ms()
            }
            fn publish_stats(&self, now_ms: u64, stats: Vec<DestinationStats>) {
                (**self).publish_stats(now_ms, stats);
            }
        }
    };
}

observer_through!(alloc::rc::Rc<O>);
observer_through!(alloc::sync::Arc<O>);
