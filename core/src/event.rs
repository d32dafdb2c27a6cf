//! Reports the machine makes for logs, metrics and visualisation. They need no answer.
//!
//! [`Event`] is a report about the sender ("a destination backed off"), emitted as
//! [`crate::Output::Event`]; it is not a room event. Room events are PDUs, and the code calls
//! them that (`PduInfo`, `PduEntry`).

use alloc::collections::BTreeMap;
use alloc::string::String;

use serde::{Deserialize, Serialize};

use crate::types::ServerName;

/// Something that happened, emitted as [`crate::Output::Event`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
pub enum Event {
    // ----- delivery -----
    /// An item was given up for `destination` (a poison item, or one too large to send).
    Dropped {
        /// Who will not receive it.
        destination: ServerName,
        /// An event id, or an EDU type.
        item: String,
        /// Why it was given up.
        reason: String,
    },
    /// The destination accepted a transaction but reported errors for some PDUs.
    PduErrors {
        /// The destination.
        destination: ServerName,
        /// The transaction.
        txn_id: String,
        /// Event id to error text.
        errors: BTreeMap<String, String>,
    },
    // ----- destination health -----
    /// A failure grew the destination's backoff.
    BackingOff {
        /// The destination.
        destination: ServerName,
        /// The new backoff interval.
        retry_interval_ms: u64,
        /// No attempt before this time, unless woken.
        until_ts: u64,
    },
    /// A destination that was failing answered, or contacted us.
    DestinationUp {
        /// The destination.
        destination: ServerName,
    },
    /// The destination's in-memory queue was dropped; it will be caught up from storage.
    CatchUpStarted {
        /// The destination.
        destination: ServerName,
    },
    /// Catch-up found nothing more to send; normal sending resumes.
    CatchUpFinished {
        /// The destination.
        destination: ServerName,
    },
    // ----- input problems -----
    /// An event could not be fanned out (e.g. no room id) and was skipped.
    EventSkipped {
        /// The event.
        event_id: String,
        /// Why.
        reason: String,
    },
    /// A storage request failed and will be retried.
    StorageRetry {
        /// What failed.
        error: String,
        /// When it is retried.
        retry_at_ts: u64,
    },
}
