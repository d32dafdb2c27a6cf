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
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
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

/// The grammar of the spec, tightened to names an HTTPS client can reach: a name the
/// transport could never connect to would otherwise be accepted, queued for and backed off
/// forever. So a DNS name is dot-separated labels of 1..=63 letters, digits and hyphens, not
/// starting or ending with a hyphen (RFC 1123); a bracketed literal must parse as an IPv6
/// address; a port is 1..=65535.
fn is_valid_server_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 + 6 {
        return false;
    }
    let (host_is_valid, port) = if let Some(rest) = name.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else { return false };
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return false,
        };
        (literal.parse::<core::net::Ipv6Addr>().is_ok(), port)
    } else {
        let (host, port) = match name.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name, None),
        };
        (is_valid_dns_name(host), port)
    };
    host_is_valid && port.is_none_or(is_valid_port)
}

/// Also covers IPv4 literals, whose labels are digits.
fn is_valid_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Digits only (`u16::from_str` would also take a leading `+`), and never port 0.
fn is_valid_port(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|port| port != 0)
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
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
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
        // Names no HTTPS client can reach (issue 14, item 8): empty or hyphen-edged labels,
        // port 0 or past 65535, bracketed text that is not an IPv6 address.
        for unreachable in [
            "a..b",
            "-.-",
            "-a.example",
            "a-.example",
            "example.org.",
            ".example.org",
            "x:0",
            "x:99999",
            "x:65536",
            "x:+80",
            "[:::::]:1",
            "[1.2.3.4]",
            "[::1]x",
            "[::1]:",
            &alloc::format!("{}.example", "a".repeat(64)),
        ] {
            assert!(ServerName::parse(unreachable).is_err(), "{unreachable}");
            assert!(serde_json::from_value::<ServerName>(serde_json::json!(unreachable)).is_err(), "{unreachable}");
        }
        for reachable in
            ["x:65535", "x-y.example", "[::ffff:1.2.3.4]:8448", &alloc::format!("{}.example", "a".repeat(63))]
        {
            assert!(ServerName::parse(reachable).is_ok(), "{reachable}");
        }
        assert_eq!(server_of("@a:b.c:8448"), Some("b.c:8448"));
        assert_eq!(server_of("@a"), None);
    }
}
