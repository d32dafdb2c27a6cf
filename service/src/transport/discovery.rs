//! Server discovery: from a server name to the addresses, `Host` header and TLS name to use,
//! following the Matrix server-server API's "Resolving server names".

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;

use super::TransportError;

/// The port a server listens on when neither its name, nor well-known, nor SRV gives one.
pub const DEFAULT_FEDERATION_PORT: u16 = 8448;

/// Synapse's bounds for caching `/.well-known/matrix/server` answers: without a usable
/// `Cache-Control` an answer lives a day; a server cannot make us refetch more often than every
/// five minutes or keep a stale answer more than two days; failures are retried after an hour.
pub(crate) const WELL_KNOWN_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
pub(crate) const WELL_KNOWN_MIN_TTL: Duration = Duration::from_secs(5 * 60);
pub(crate) const WELL_KNOWN_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
pub(crate) const WELL_KNOWN_ERROR_TTL: Duration = Duration::from_secs(3600);
/// Bounds memory when many distinct names are resolved; expired entries go first.
const WELL_KNOWN_CACHE_ENTRIES_MAX: usize = 10_000;
/// A well-known document is a few dozen bytes; Synapse also caps it at 50 KiB.
pub(crate) const WELL_KNOWN_BODY_BYTES_MAX: usize = 50 * 1024;

/// How a server name was resolved (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResolvedVia {
    /// The name (or its delegation) is an IP literal.
    IpLiteral,
    /// The name (or its delegation) has an explicit port; its A/AAAA records were used.
    ExplicitPort,
    /// An `_matrix-fed._tcp` SRV record.
    Srv,
    /// A deprecated `_matrix._tcp` SRV record.
    LegacySrv,
    /// No port anywhere: A/AAAA records on port 8448.
    DefaultPort,
}

/// Where to send requests for a server name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Addresses to try, in order.
    pub addrs: Vec<SocketAddr>,
    /// The `Host` header value (a name or IP literal, with the port when the name had one).
    pub host_header: String,
    /// The TLS server name (SNI and certificate check): the host part of `host_header`.
    pub sni: String,
    /// The `m.server` delegation from `/.well-known/matrix/server`, if one was used.
    pub delegated: Option<String>,
    /// Which step of the algorithm produced the addresses.
    pub via: ResolvedVia,
}

/// A server name split into host and optional port (`host[:port]`, `[v6][:port]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerName {
    pub(crate) host: Host,
    pub(crate) port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Host {
    Ip(IpAddr),
    Name(String),
}

impl ServerName {
    /// Parses per the spec's server name grammar; anything else is a clear error.
    pub(crate) fn parse(name: &str) -> Result<Self, TransportError> {
        let invalid = |why: &str| TransportError::InvalidServerName(format!("{name:?}: {why}"));
        if name.is_empty() || name.len() > 255 {
            return Err(invalid("length must be 1..=255"));
        }
        let (host, port) = if let Some(rest) = name.strip_prefix('[') {
            let (v6, after) = rest.split_once(']').ok_or_else(|| invalid("unclosed '['"))?;
            let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| invalid("not an IPv6 literal"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| invalid("junk after ']'"))?),
            };
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = match name.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (name, None),
            };
            let host = if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
                Host::Ip(IpAddr::V4(ip))
            } else {
                let valid = host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
                if !valid {
                    return Err(invalid("not a DNS name, IPv4 literal or [IPv6] literal"));
                }
                Host::Name(host.to_ascii_lowercase())
            };
            (host, port)
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                // Digits only: `u16::from_str` would also take a leading '+'.
                Some(p)
                    .filter(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid("port must be 1..=65535"))?,
            ),
        };
        Ok(Self { host, port })
    }

    /// The host as it appears in a `Host` header (IPv6 in brackets).
    pub(crate) fn host_text(&self) -> String {
        match &self.host {
            Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]"),
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        }
    }

    fn host_header(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host_text()),
            None => self.host_text(),
        }
    }

    fn sni(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        }
    }
}

/// Cached well-known answers: `Some(delegation)` or `None` for "no usable well-known".
#[derive(Default)]
pub(crate) struct WellKnownCache {
    entries: Mutex<HashMap<String, (Instant, Option<String>)>>,
}

impl WellKnownCache {
    pub(crate) fn get(&self, host: &str, now: Instant) -> Option<Option<String>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(host).filter(|(expires, _)| *expires > now).map(|(_, delegated)| delegated.clone())
    }

    pub(crate) fn put(&self, host: &str, now: Instant, ttl: Duration, delegated: Option<String>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= WELL_KNOWN_CACHE_ENTRIES_MAX {
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= WELL_KNOWN_CACHE_ENTRIES_MAX {
                // Still full of live entries: drop one arbitrary entry rather than grow.
                if let Some(victim) = entries.keys().next().cloned() {
                    entries.remove(&victim);
                }
            }
        }
        entries.insert(host.to_owned(), (now + ttl, delegated));
    }
}

/// The cache lifetime from a `Cache-Control` header, within Synapse's bounds.
pub(crate) fn well_known_ttl(cache_control: Option<&str>) -> Duration {
    let Some(header) = cache_control else {
        return WELL_KNOWN_DEFAULT_TTL;
    };
    let mut ttl = None;
    for directive in header.split(',') {
        let directive = directive.trim().to_ascii_lowercase();
        if directive == "no-store" || directive == "no-cache" {
            return WELL_KNOWN_MIN_TTL;
        }
        if let Some(secs) = directive.strip_prefix("max-age=") {
            ttl = secs.trim_matches('"').parse::<u64>().ok().map(Duration::from_secs);
        }
    }
    ttl.unwrap_or(WELL_KNOWN_DEFAULT_TTL).clamp(WELL_KNOWN_MIN_TTL, WELL_KNOWN_MAX_TTL)
}

/// Extracts and validates `m.server` from a well-known body.
pub(crate) fn parse_well_known(body: &[u8]) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let server = value.get("m.server").and_then(|s| s.as_str()).ok_or("no \"m.server\" string")?;
    ServerName::parse(server).map_err(|e| format!("bad m.server: {e}"))?;
    Ok(server.to_owned())
}

/// A/AAAA lookup of `host` (a DNS name), each address paired with `port`.
pub(crate) async fn lookup_addrs(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, TransportError> {
    let lookup =
        resolver.lookup_ip(fqdn(host)).await.map_err(|e| TransportError::Dns(format!("A/AAAA {host}: {e}")))?;
    let addrs: Vec<SocketAddr> = lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
    if addrs.is_empty() {
        return Err(TransportError::Dns(format!("A/AAAA {host}: no addresses")));
    }
    Ok(addrs)
}

/// The addresses of a URL's host (a well-known redirect target), which may be an IP literal
/// (`10.0.0.1`, `[::1]`): a literal is its own address. Asked as a DNS name it would get the
/// trailing dot of [`fqdn`] and be looked up as a name that cannot exist.
pub(crate) async fn url_host_addrs(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, TransportError> {
    let unbracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match unbracketed.parse::<IpAddr>() {
        Ok(ip) => Ok(vec![SocketAddr::new(ip, port)]),
        Err(_) => lookup_addrs(resolver, host, port).await,
    }
}

/// SRV lookup: `Ok(None)` when the name has no such record (the caller falls through to the
/// next step), `Ok(Some(addrs))` with targets in priority order (heavier weight first within
/// a priority), an error only when the records exist but none of their targets resolves.
pub(crate) async fn lookup_srv(
    resolver: &TokioResolver,
    service_name: &str,
) -> Result<Option<Vec<SocketAddr>>, TransportError> {
    let Ok(lookup) = resolver.srv_lookup(fqdn(service_name)).await else {
        // NXDOMAIN, no records, or a DNS failure: the spec says to go on to the next step,
        // and Synapse does the same for errors.
        return Ok(None);
    };
    let mut records: Vec<_> =
        lookup.iter().map(|srv| (srv.priority(), srv.weight(), srv.port(), srv.target().to_utf8())).collect();
    // A lone "." target means "the service is decidedly not available here" (RFC 2782).
    if records.len() == 1 && records[0].3 == "." {
        return Ok(None);
    }
    records.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut addrs = Vec::new();
    let mut errors = Vec::new();
    for (_, _, port, target) in records {
        let target = target.trim_end_matches('.');
        match lookup_addrs(resolver, target, port).await {
            Ok(found) => addrs.extend(found),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if addrs.is_empty() {
        return Err(TransportError::Dns(format!("SRV {service_name}: no target resolves: {}", errors.join("; "))));
    }
    Ok(Some(addrs))
}

/// The name with a trailing dot, so the resolver never appends search domains: server names
/// are always fully qualified.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') { name.to_owned() } else { format!("{name}.") }
}

/// Steps that follow once the name (original or delegated) is known not to be an IP literal
/// or to carry a port: SRV, deprecated SRV, then port 8448.
pub(crate) async fn resolve_without_port(
    resolver: &TokioResolver,
    name: &ServerName,
    delegated: Option<String>,
) -> Result<Resolved, TransportError> {
    let host = name.host_text();
    let base = |addrs, via| Resolved {
        addrs,
        host_header: name.host_header(),
        sni: name.sni(),
        delegated: delegated.clone(),
        via,
    };
    if let Some(addrs) = lookup_srv(resolver, &format!("_matrix-fed._tcp.{host}")).await? {
        return Ok(base(addrs, ResolvedVia::Srv));
    }
    if let Some(addrs) = lookup_srv(resolver, &format!("_matrix._tcp.{host}")).await? {
        return Ok(base(addrs, ResolvedVia::LegacySrv));
    }
    let addrs = lookup_addrs(resolver, &host, DEFAULT_FEDERATION_PORT).await?;
    Ok(base(addrs, ResolvedVia::DefaultPort))
}

/// The steps that need no network beyond A/AAAA: IP literals and explicit ports.
/// `Ok(None)` means the name needs well-known/SRV discovery.
pub(crate) async fn resolve_direct(
    resolver: &TokioResolver,
    name: &ServerName,
    delegated: Option<String>,
) -> Result<Option<Resolved>, TransportError> {
    let port = name.port.unwrap_or(DEFAULT_FEDERATION_PORT);
    match &name.host {
        Host::Ip(ip) => Ok(Some(Resolved {
            addrs: vec![SocketAddr::new(*ip, port)],
            host_header: name.host_header(),
            sni: name.sni(),
            delegated,
            via: ResolvedVia::IpLiteral,
        })),
        Host::Name(host) if name.port.is_some() => Ok(Some(Resolved {
            addrs: lookup_addrs(resolver, host, port).await?,
            host_header: name.host_header(),
            sni: name.sni(),
            delegated,
            via: ResolvedVia::ExplicitPort,
        })),
        Host::Name(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_parse() {
        let p = |s: &str| ServerName::parse(s).unwrap();
        assert_eq!(p("example.org"), ServerName { host: Host::Name("example.org".into()), port: None });
        assert_eq!(p("Example.ORG:8449").port, Some(8449));
        assert_eq!(p("Example.ORG:8449").host_header(), "example.org:8449");
        assert_eq!(p("1.2.3.4").host, Host::Ip("1.2.3.4".parse().unwrap()));
        assert_eq!(p("[::1]:80").host_header(), "[::1]:80");
        assert_eq!(p("[::1]").sni(), "::1");
        for bad in ["", "a..b", "a b", "x:0", "x:65536", "x:", "[::1", "[zz]", "[::1]x", "ex_ample.org"] {
            assert!(ServerName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn cache_control_is_bounded() {
        assert_eq!(well_known_ttl(None), WELL_KNOWN_DEFAULT_TTL);
        assert_eq!(well_known_ttl(Some("max-age=3600")), Duration::from_secs(3600));
        assert_eq!(well_known_ttl(Some("public, max-age=1")), WELL_KNOWN_MIN_TTL);
        assert_eq!(well_known_ttl(Some("max-age=99999999")), WELL_KNOWN_MAX_TTL);
        assert_eq!(well_known_ttl(Some("no-store")), WELL_KNOWN_MIN_TTL);
    }

    #[test]
    fn well_known_bodies() {
        assert_eq!(parse_well_known(br#"{"m.server": "b.example:443"}"#).unwrap(), "b.example:443");
        assert!(parse_well_known(b"{}").unwrap_err().contains("m.server"));
        assert!(parse_well_known(b"<html>").unwrap_err().contains("not JSON"));
        assert!(parse_well_known(br#"{"m.server": "bad name"}"#).unwrap_err().contains("bad m.server"));
    }

    #[test]
    fn cache_expires() {
        let cache = WellKnownCache::default();
        let now = Instant::now();
        cache.put("a", now, Duration::from_secs(10), Some("b".into()));
        assert_eq!(cache.get("a", now), Some(Some("b".into())));
        assert_eq!(cache.get("a", now + Duration::from_secs(11)), None);
    }
}
