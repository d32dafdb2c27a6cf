//! Which remote addresses we may connect to (SSRF protection).
//!
//! A server name comes from other servers (room membership, well-known answers, SRV records),
//! so without a filter anyone could make us send requests to our own loopback or LAN. The
//! default denylist mirrors Synapse's `ip_range_blacklist` defaults; the allowlist wins over it
//! so that test setups and private federations can open the ranges they need.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address range in CIDR notation (`10.0.0.0/8`, `fc00::/7`); a bare address is a single host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    /// The range `addr/prefix_len`; `None` if the prefix is longer than the address.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        (prefix_len <= bits).then_some(Self { addr, prefix_len })
    }

    /// Whether `ip` is inside the range. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are
    /// compared as the IPv4 address they carry, so they cannot slip past an IPv4 rule.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix_len),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix_len),
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr =
            addr.trim().parse().map_err(|_| format!("invalid IP range {s:?}: {addr:?} is not an IP address"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => bits,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("invalid IP range {s:?}: prefix must be 0..={bits}"))?,
        };
        Ok(Self { addr, prefix_len })
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix_len: u8) -> bool {
    let full_bytes = usize::from(prefix_len / 8);
    let rest_bits = prefix_len % 8;
    if a[..full_bytes] != b[..full_bytes] {
        return false;
    }
    if rest_bits == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest_bits);
    (a[full_bytes] & mask) == (b[full_bytes] & mask)
}

/// Synapse's default `ip_range_blacklist`, plus the unspecified addresses (`0.0.0.0/8`, `::`),
/// which some systems route to the local host.
pub const DEFAULT_DENYLIST: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::/128",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
];

/// The compiled filter: denylist (if enabled) minus allowlist.
#[derive(Clone, Debug)]
pub(crate) struct IpFilter {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

impl IpFilter {
    pub(crate) fn new(denylist_enabled: bool, allow: &[IpNet]) -> Self {
        let deny = if denylist_enabled {
            DEFAULT_DENYLIST
                .iter()
                // The table above is constant and covered by a test; a typo would panic there.
                .map(|s| s.parse().expect("DEFAULT_DENYLIST entries are valid"))
                .collect()
        } else {
            Vec::new()
        };
        Self { deny, allow: allow.to_vec() }
    }

    /// `Err(range)` names the denylist entry that refuses `ip`.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), IpNet> {
        if self.allow.iter().any(|net| net.contains(ip)) {
            return Ok(());
        }
        match self.deny.iter().find(|net| net.contains(ip)) {
            Some(net) => Err(*net),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_denylist_parses_and_matches() {
        let filter = IpFilter::new(true, &[]);
        assert_eq!(filter.deny.len(), DEFAULT_DENYLIST.len());
        for denied in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "fd00::5",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "::",
        ] {
            assert!(filter.check(denied.parse().unwrap()).is_err(), "{denied}");
        }
        for allowed in ["8.8.8.8", "172.32.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(filter.check(allowed.parse().unwrap()).is_ok(), "{allowed}");
        }
    }

    #[test]
    fn allowlist_overrides_denylist() {
        let filter = IpFilter::new(true, &["127.0.0.0/30".parse().unwrap()]);
        assert!(filter.check("127.0.0.3".parse().unwrap()).is_ok());
        assert_eq!(filter.check("127.0.0.4".parse().unwrap()), Err("127.0.0.0/8".parse().unwrap()));
        assert!(IpFilter::new(false, &[]).check("127.0.0.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!("10.0.0.0/33".parse::<IpNet>().unwrap_err().contains("0..=32"));
        assert!("nope/8".parse::<IpNet>().unwrap_err().contains("not an IP"));
        assert_eq!("::1".parse::<IpNet>().unwrap().to_string(), "::1/128");
        assert!(IpNet::new("1.2.3.4".parse().unwrap(), 33).is_none());
    }
}
