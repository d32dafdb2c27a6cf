//! # fedsend-core: a sans-IO Matrix federation sender
//!
//! This crate is the whole sending logic of a Matrix homeserver's federation sender — which
//! remote servers get which events, per-destination queues, `/send` transactions, backoff,
//! catch-up after outages — as a deterministic state machine. It performs no I/O, reads no
//! clock and draws no OS randomness, so the same code runs natively, inside wasmtime, in Node
//! and in the browser, and a simulator can drive it through years of virtual time.
//!
//! ## The run-loop contract
//!
//! A host owns one [`FederationSender`] and repeats:
//!
//! 1. **Feed** any number of inputs with [`FederationSender::handle_input`]`(now, input)`:
//!    commands (new events, wake a destination, a remote contacted us), completions of
//!    earlier outputs, and [`Input::Timeout`].
//! 2. **Drain** [`FederationSender::poll_output`] until it returns `None`, performing each
//!    [`Output`]. Outputs that need an answer carry a [`RequestId`]; the host answers later
//!    with the input that carries the same id ([`Input::TransactionDone`],
//!    [`Input::EventsFetched`], [`Input::Persisted`], …), in any order.
//! 3. **Sleep** until [`FederationSender::poll_timeout`] or the next input, whichever comes
//!    first, then deliver [`Input::Timeout`] if the deadline passed. A timeout delivered early
//!    or twice is harmless.
//!
//! **Mutate, then drain:** after every `handle_input` the host drains before it waits, or
//! outputs pile up unseen. `now` is Unix milliseconds and must not go backwards; a regression
//! is clamped and counted, never a panic.
//!
//! ```
//! use fedsend_core::{Config, FederationSender, Input, Output, Recovered, ServerName, Timestamp};
//!
//! let config = Config::new(ServerName::parse("example.org").unwrap());
//! let mut sender = FederationSender::new(config, Recovered::default()).unwrap();
//! let now = Timestamp(1_700_000_000_000);
//! sender.handle_input(now, Input::Timeout).unwrap();
//! while let Some(output) = sender.poll_output() {
//!     match output {
//!         Output::Persist { request, .. } => {
//!             // write the changes durably, then:
//!             sender.handle_input(now, Input::Persisted { request }).unwrap();
//!         }
//!         _ => { /* send transactions, answer queries, log events */ }
//!     }
//! }
//! let _next_deadline = sender.poll_timeout();
//! ```
//!
//! ## The storage boundary
//!
//! Storage is I/O, so it is expressed as outputs and inputs, never as a trait the core awaits.
//!
//! *Sender-owned state* is defined here and only stored by the host. It leaves as
//! [`Output::Persist`] batches of [`Changes`] (apply atomically; `incarnation`,
//! `events_out_pos` and `destination_rooms` are max-upserts, `destinations` rows plain
//! upserts) and comes back at start-up as [`Recovered`]:
//! - `destinations` — per destination: `retry_last_ts`, `retry_interval`, `failure_ts`,
//!   `last_successful_stream_ordering`;
//! - `destination_rooms` — (destination, room) → stream ordering of the newest event owed;
//! - `events_out_pos` — the events-stream position up to which fan-out is durable;
//! - `incarnation` — bumped and persisted at every start, before any transaction leaves, and
//!   carried by every batch until it is durable, so transaction ids (`{incarnation}.{counter}`)
//!   and outbox ids never repeat;
//! - `to_device_outbox` — to-device EDUs not yet delivered ([`OutboxRow`]; inserted with
//!   [`Changes::to_device_outbox`], deleted with [`Changes::to_device_deleted`]). A host
//!   acknowledges a to-device submission to its client once the batch holding its rows is
//!   durable.
//! - `device_list_pokes` — device-list changes not yet delivered, one row per (destination,
//!   user, device) ([`DeviceListPoke`]; upserted keeping the higher stream id, deleted with
//!   [`Changes::device_list_pokes_deleted`] only if not newer than the key given);
//! - `device_list_positions` — per (destination, user), the newest device-list stream id the
//!   destination acknowledged ([`DeviceListPosition`]; upserted or deleted, in order).
//!
//! *Homeserver-owned facts* are queries the host answers:
//! - [`Output::FetchEvents`] → [`Input::EventsFetched`]: new events with their routing facts
//!   ([`PduInfo`]: hosts joined before the event, partial-state servers, flags, the PDU JSON);
//! - [`Output::LoadCatchUp`] → [`Input::CatchUpLoaded`]: a destination's `destination_rooms`
//!   rows between two positions, joined with the event, the room's partial-state flag and its
//!   forward extremities with their visibility to that destination ([`CatchUpRoom`]);
//! - [`Output::LoadOutstanding`] → [`Input::OutstandingLoaded`]: destinations with rows above
//!   their last successful position, or with to-device rows.
//!
//! Ephemeral data arrives as commands carrying the facts it needs: [`Input::Receipt`] (the
//! room's servers, the receipted event's sender and arrival), [`Input::Typing`] (the room's
//! servers), [`Input::Presence`] (interested servers), [`Input::ToDevice`], [`Input::Edu`],
//! [`Input::DeviceListUpdate`] and [`Input::SigningKeyUpdate`] (the homeserver's device-list
//! stream id, the device's keys, and the servers sharing a room with the user).
//!
//! A storage failure is answered with [`Input::StorageFailed`]; the machine retries.
//!
//! ## Errors and bugs
//!
//! Malformed or uncorrelated inputs return [`InputError`] and change nothing. Remote failures
//! are data: they drive backoff, catch-up and [`Event`]s. A panic is a bug in this crate:
//! each `expect` states the invariant it relies on.
//!
//! ## Configuration
//!
//! [`Config`] documents every key with its default.

// The `ts` feature (only the TypeScript declaration generator enables it) links std, because
// ts-rs's derive expands to code that relies on std's prelude.
#![cfg_attr(not(feature = "ts"), no_std)]
// With std's prelude in scope, the `alloc::` paths the crate spells out look redundant.
#![cfg_attr(feature = "ts", allow(unused_qualifications))]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

extern crate alloc;
// libtest needs std; the crate itself never uses it (with `ts`, std is linked already).
#[cfg(all(test, not(feature = "ts")))]
extern crate std;

mod backoff;
mod catch_up;
mod catch_up_scan;
mod config;
mod destination;
mod device_lists;
mod directory;
mod edu;
mod effects;
mod error;
mod event;
mod fan_out;
mod io;
mod limiter;
pub mod nesting;
mod outcome;
mod rng;
mod sender;
mod shard;
mod time;
mod transaction;
mod types;
mod wake_up_queue;
pub mod wire;

pub use config::Config;
pub use edu::{
    PRESENCE_STATES_PER_EDU_MAX, PresenceState, RECEIPT_EDUS_PER_TRANSACTION_MAX, Receipt, TO_DEVICE_EDU_BYTES_MAX,
    split_to_device,
};
pub use error::{ConfigError, InputError};
pub use event::Event;
pub use io::{
    CatchUpRoom, Changes, DestinationPhase, DestinationRoom, DestinationState, DestinationStats, DeviceListPoke,
    DeviceListPokeKey, DeviceListPosition, Extremity, Input, OutboxKey, OutboxRow, OutgoingTransaction, Output,
    PduInfo, ReceiptedEvent, Recovered, TransactionResult,
};
pub use rng::Prng;
pub use sender::FederationSender;
pub use shard::should_handle;
pub use time::Timestamp;
pub use types::{RequestId, ServerName, server_of};
