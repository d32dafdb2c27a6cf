//! Which remote addresses we may connect to (SSRF protection).
//!
//! A server name comes from other servers (room membership, well-known answers, SRV records),
//! so without a filter anyone could make us send requests to our own loopback or LAN. The
//! default denylist mirrors Synapse's `ip_range_blacklist` defaults; the allowlist wins over it
//! so that test setups and private federations can open the ranges they need.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use fedsend_synapse::config::DEFAULT_IP_RANGE_BLOCKLIST;

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

    /// The first address of the range.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// How many leading bits are fixed.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether the two ranges share any address (ranges of different families never do).
    pub fn overlaps(&self, other: &Self) -> bool {
        let shorter = self.prefix_len.min(other.prefix_len);
        match (self.addr, other.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => prefix_eq(&a.octets(), &b.octets(), shorter),
            (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(&a.octets(), &b.octets(), shorter),
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
        // An IPv4-mapped range (`::ffff:10.0.0.0/104`) is the IPv4 range it maps: addresses
        // are compared in that form (see `contains`), so kept as IPv6 it would match nothing.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix_len >= 96
        {
            return Ok(Self { addr: IpAddr::V4(v4), prefix_len: prefix_len - 96 });
        }
        Ok(Self { addr, prefix_len })
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The IPv4 addresses an IPv6 address carries and that packets to it end up at: NAT64
/// (`64:ff9b::/96`), IPv4-compatible (`::a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`),
/// 6to4 (`2002:AABB:CCDD::/48`) and Teredo (`2001::/32`: the server, and the client's public
/// address stored inverted). A gateway on the path unwraps these, so a denylisted IPv4
/// address must not slip through dressed as IPv6. (IPv4-mapped addresses are compared as IPv4
/// directly, see [`IpNet::contains`].)
fn embedded_ipv4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let o = ip.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let segments = ip.segments();
    let mut carried = Vec::new();
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || segments[..6] == [0, 0, 0, 0, 0, 0] {
        carried.push(last32);
    }
    if segments[..6] == [0, 0, 0, 0, 0xffff, 0] {
        carried.push(last32);
    }
    if segments[0] == 0x2002 {
        carried.push(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if segments[..2] == [0x2001, 0] {
        carried.push(Ipv4Addr::new(o[4], o[5], o[6], o[7]));
        carried.push(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]));
    }
    carried
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

/// The addresses refused by default: Synapse's default `ip_range_blacklist`
/// ([`DEFAULT_IP_RANGE_BLOCKLIST`], one list for both modes), the unspecified addresses, which
/// some systems route to the local host, and local-use NAT64 (RFC 8215), whose embedded IPv4
/// address sits where the operator chose, so it cannot be checked (such prefixes only lead
/// into private networks anyway).
pub fn default_denylist() -> impl Iterator<Item = &'static str> + Clone {
    ["0.0.0.0/8", "::/128"].into_iter().chain(DEFAULT_IP_RANGE_BLOCKLIST).chain(["64:ff9b:1::/48"])
}

/// Why an address is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Denied {
    /// The denylist entry that matched.
    pub(crate) range: IpNet,
    /// The IPv4 address the refused IPv6 address carries, when that is what matched.
    pub(crate) carried: Option<Ipv4Addr>,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.carried {
            None => write!(f, "in {}", self.range),
            Some(v4) => write!(f, "carries {v4}, in {}", self.range),
        }
    }
}

/// The compiled filter: denylist (if enabled) minus allowlist.
#[derive(Clone, Debug)]
pub(crate) struct IpFilter {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

impl IpFilter {
    pub(crate) fn new(denylist_enabled: bool, allow: &[IpNet]) -> Self {
        let deny = if denylist_enabled {
            default_denylist()
                // The list is constant and covered by a test; a typo would panic there.
                .map(|s| s.parse().expect("default denylist entries are valid"))
                .collect()
        } else {
            Vec::new()
        };
        Self { deny, allow: allow.to_vec() }
    }

    /// `Err` names the denylist entry that refuses `ip`, or the IPv4 address it carries. An
    /// allowlisted address is allowed as a whole; otherwise every IPv4 address it carries must
    /// pass on its own.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        if self.allowed(ip) {
            return Ok(());
        }
        if let Some(range) = self.denied_by(ip) {
            return Err(Denied { range, carried: None });
        }
        let IpAddr::V6(v6) = ip else { return Ok(()) };
        for carried in embedded_ipv4(v6) {
            if let Some(range) = self.denied_by(IpAddr::V4(carried)).filter(|_| !self.allowed(IpAddr::V4(carried))) {
                return Err(Denied { range, carried: Some(carried) });
            }
        }
        Ok(())
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|net| net.contains(ip))
    }

    fn denied_by(&self, ip: IpAddr) -> Option<IpNet> {
        self.deny.iter().find(|net| net.contains(ip)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_mapped_range_matches_what_it_maps() {
        let range: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(range.to_string(), "10.0.0.0/8");
        assert!(range.contains("10.1.2.3".parse().unwrap()));
        assert!(range.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!range.contains("11.0.0.1".parse().unwrap()));
        let single: IpNet = "::ffff:127.0.0.1".parse().unwrap();
        assert!(single.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn default_denylist_parses_and_matches() {
        let filter = IpFilter::new(true, &[]);
        assert_eq!(filter.deny.len(), default_denylist().count());
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
        assert_eq!(
            filter.check("127.0.0.4".parse().unwrap()),
            Err(Denied { range: "127.0.0.0/8".parse().unwrap(), carried: None })
        );
        assert!(IpFilter::new(false, &[]).check("127.0.0.1".parse().unwrap()).is_ok());
    }

    /// Issue 14, item 9: IPv6 forms that carry a denylisted IPv4 address.
    #[test]
    fn ipv6_carrying_a_denied_ipv4_is_denied() {
        let filter = IpFilter::new(true, &[]);
        for (ip, carried, range) in [
            ("64:ff9b::127.0.0.1", "127.0.0.1", "127.0.0.0/8"),
            ("64:ff9b::a00:1", "10.0.0.1", "10.0.0.0/8"),
            ("2002:7f00:1::", "127.0.0.1", "127.0.0.0/8"),
            ("2002:c0a8:101:5::1", "192.168.1.1", "192.168.0.0/16"),
            ("::127.0.0.1", "127.0.0.1", "127.0.0.0/8"),
            ("::169.254.169.254", "169.254.169.254", "169.254.0.0/16"),
            ("::ffff:0:127.0.0.1", "127.0.0.1", "127.0.0.0/8"),
            ("::ffff:0:a9fe:a9fe", "169.254.169.254", "169.254.0.0/16"),
            // Teredo: server 10.1.2.3; client 8.8.8.8 (stored inverted).
            ("2001:0:a01:203::f7f7:f7f7", "10.1.2.3", "10.0.0.0/8"),
            // Teredo: public server 8.8.8.8; client 127.0.0.1 stored inverted.
            ("2001:0:808:808::80ff:fffe", "127.0.0.1", "127.0.0.0/8"),
        ] {
            let denied = filter.check(ip.parse().unwrap()).expect_err(ip);
            assert_eq!(denied.range, range.parse().unwrap(), "{ip}");
            assert_eq!(denied.carried, Some(carried.parse().unwrap()), "{ip}");
            assert!(denied.to_string().contains(carried), "{ip}: {denied}");
        }
        assert!(filter.check("64:ff9b:1::1".parse().unwrap()).is_err(), "local-use NAT64");
        for public in ["64:ff9b::808:808", "2002:808:808::1", "::ffff:0:808:808", "2001:0:808:808::f7f7:f7f7"] {
            assert!(filter.check(public.parse().unwrap()).is_ok(), "{public} carries only public addresses");
        }
        // An allowlisted IPv4 address stays allowed inside IPv6, and an allowlisted IPv6
        // range is allowed whatever it carries.
        let loopback_allowed = IpFilter::new(true, &["127.0.0.0/8".parse().unwrap()]);
        assert!(loopback_allowed.check("64:ff9b::127.0.0.1".parse().unwrap()).is_ok());
        let six_to_four_allowed = IpFilter::new(true, &["2002::/16".parse().unwrap()]);
        assert!(six_to_four_allowed.check("2002:7f00:1::".parse().unwrap()).is_ok());
        assert!(IpFilter::new(false, &[]).check("64:ff9b::127.0.0.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn ranges_overlap() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(net("0.0.0.0/0").overlaps(&net("127.0.0.0/8")));
        assert!(net("127.0.0.1").overlaps(&net("127.0.0.0/8")));
        assert!(net("127.0.0.0/8").overlaps(&net("127.0.0.1")));
        assert!(!net("8.8.8.0/24").overlaps(&net("127.0.0.0/8")));
        assert!(!net("::/0").overlaps(&net("127.0.0.0/8")));
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!("10.0.0.0/33".parse::<IpNet>().unwrap_err().contains("0..=32"));
        assert!("nope/8".parse::<IpNet>().unwrap_err().contains("not an IP"));
        assert_eq!("::1".parse::<IpNet>().unwrap().to_string(), "::1/128");
        assert!(IpNet::new("1.2.3.4".parse().unwrap(), 33).is_none());
    }
}
