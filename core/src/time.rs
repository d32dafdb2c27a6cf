//! Time as the core sees it: a value the host passes in, never read from a clock.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as given by the host with every input.
///
/// The core uses one clock for both timers and protocol fields (`origin_server_ts`,
/// `retry_last_ts`), because Synapse stores backoff in wall-clock milliseconds and operators
/// read them that way. The host must never hand the core a time earlier than one it handed
/// before; the core clamps such a regression to the latest time seen (see
/// [`crate::FederationSender::handle_input`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp as Unix milliseconds.
    pub const fn as_ms(self) -> u64 {
        self.0
    }

    /// `self + duration_ms`, saturating at the end of time instead of overflowing.
    pub const fn plus_ms(self, duration_ms: u64) -> Self {
        Self(self.0.saturating_add(duration_ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn since_ms(self, earlier: Self) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}
