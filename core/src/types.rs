//! Identifiers and small value types shared by inputs, outputs and state.
//!
//! Identifiers are validated when they are deserialized or constructed, so the machine never
//! holds a server name it could not put in a URL.

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use core::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::InputError;

/// A Matrix server name: `host[:port]`, where host is a DNS name, an IPv4 literal or a
/// bracketed IPv6 literal (Matrix spec, appendices, "Server Name").
///
/// Shared text: the sender keeps a name in many places per destination (its map key, the
/// driven set, rows, requests, timers), so a clone is a reference-count bump, not a copy.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServerName(Arc<str>);

impl ServerName {
    /// Validates `name` as a server name.
    pub fn parse(name: &str) -> Result<Self, InputError> {
        if is_valid_server_name(name) {
            Ok(Self(Arc::from(name)))
        } else {
            Err(InputError::InvalidServerName(name.to_string()))
        }
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_valid_server_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 + 6 {
        return false;
    }
    let (host, port) = if let Some(rest) = name.strip_prefix('[') {
        let Some(close) = rest.find(']') else { return false };
        let literal = &rest[..close];
        if literal.is_empty() || !literal.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return false;
        }
        let after = &rest[close + 1..];
        match after.strip_prefix(':') {
            Some(port) => ("v6", Some(port)),
            None if after.is_empty() => ("v6", None),
            None => return false,
        }
    } else {
        match name.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    host == "v6"
        || (!host.is_empty()
            && host.len() <= 255
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
}

impl<'de> Deserialize<'de> for ServerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        if is_valid_server_name(&raw) {
            Ok(Self(Arc::from(raw)))
        } else {
            Err(serde::de::Error::custom(alloc::format!("invalid server name {raw:?}")))
        }
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The server part of a Matrix identifier such as `@user:server` or `!room:server`.
pub fn server_of(id: &str) -> Option<&str> {
    id.split_once(':').map(|(_, server)| server).filter(|s| !s.is_empty())
}

/// Correlates an output that needs an answer with the input that answers it.
///
/// Ids come from a counter that starts at 1 for every machine instance; they are not
/// meaningful across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for good in
            ["test", "host2", "matrix.org", "example.com:8448", "1.2.3.4:80", "[::1]", "[::1]:8448", "127.0.0.1:1"]
        {
            assert!(ServerName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "host:", "host:123456", "[::1", "[zz]", "host:port", "ex_ample.com", "@user:test"] {
            assert!(ServerName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(server_of("@a:b.c:8448"), Some("b.c:8448"));
        assert_eq!(server_of("@a"), None);
    }
}
