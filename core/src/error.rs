//! Errors returned for bad input. Remote failures are never errors: they are data that drive
//! backoff, catch-up and [`crate::Event`]s.

use alloc::string::String;
use core::fmt;

use crate::types::RequestId;

/// Why an input was refused. The machine is unchanged by a refused input and keeps running.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputError {
    /// The input could not be decoded (wire format only): the message says where.
    Malformed(String),
    /// A server name that is not `host[:port]`.
    InvalidServerName(String),
    /// A completion for a request this machine never issued or already saw answered.
    UnknownRequest(RequestId),
    /// A completion of the wrong kind for its request (e.g. a transaction result for a query).
    WrongCompletion {
        /// The request that was answered.
        request: RequestId,
        /// What the machine expected for it.
        expected: &'static str,
    },
    /// A storage answer that contradicts itself or the request (e.g. events out of order).
    InconsistentAnswer(String),
    /// A command that makes no sense (e.g. an EDU addressed to ourselves).
    Refused(String),
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed input: {why}"),
            Self::InvalidServerName(name) => write!(f, "invalid server name {name:?}"),
            Self::UnknownRequest(id) => write!(f, "unknown request id {id}"),
            Self::WrongCompletion { request, expected } => {
                write!(f, "request {request} expects {expected}")
            }
            Self::InconsistentAnswer(why) => write!(f, "inconsistent storage answer: {why}"),
            Self::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// A configuration value outside its allowed range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The offending key.
    pub key: &'static str,
    /// What is wrong with it.
    pub why: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config `{}` {}", self.key, self.why)
    }
}
