//! Outbound federation transport: one HTTPS attempt of a transaction, X-Matrix signed.
//!
//! The core owns every retry and backoff decision; this module turns one
//! [`Output::SendTransaction`](fedsend_core::Output) into one `PUT
//! /_matrix/federation/v1/send/{txnId}` and maps what happened onto
//! [`TransactionResult`]:
//!
//! | what happened | result |
//! |---|---|
//! | 2xx | `Ok { pdu_errors }` from the body's `pdus` entries that have an `error` |
//! | any other status (410 included) | `Status { status, retry_after_ms, errcode }` |
//! | invalid name, DNS, denylist, TCP connect, TLS failure | `Unreachable` |
//! | no complete answer within `request_timeout_ms`, or the connection dropped after the request went out | `Timeout` |
//!
//! A dropped connection after sending maps to `Timeout`, not `Unreachable`: the server may
//! have processed the transaction, and the core treats both the same anyway.
//!
//! Server discovery ([`HttpsTransport::resolve_server`], giving a [`Resolved`]) follows the
//! spec's "Resolving server names"; the `Host` header and TLS name are the
//! (delegated) server name, never an SRV target. Connections are HTTP/1.1 over rustls, kept
//! open and reused per destination.
//!
//! [`HttpsTransport`] is `Clone + Send + Sync` (an `Arc` inside) and must be used inside a
//! tokio runtime.

mod conn;
mod discovery;
mod ipfilter;
pub mod key_server;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fedsend_core::TransactionResult;
use fedsend_sign::SigningKey;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use serde_json::Value;

pub use discovery::{DEFAULT_FEDERATION_PORT, Resolved, ResolvedVia};
pub use ipfilter::{IpNet, default_denylist};

use conn::Sender;
use discovery::{Host, ServerName, WellKnownCache};
use ipfilter::IpFilter;

/// A federation response body we parse is small (`pdus` results, an error); anything past
/// this is cut off rather than buffered.
const RESPONSE_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Idle connections kept per destination; the core has one transaction in flight per
/// destination, so more than a couple would only hold sockets open.
const IDLE_CONNECTIONS_PER_DESTINATION_MAX: usize = 2;
/// Redirects followed when fetching a well-known document; more means a loop or abuse.
const WELL_KNOWN_REDIRECTS_MAX: usize = 5;
/// A destination's undelivered transactions are logged with their reason at most once per
/// this period (the others go to debug and are counted in the next line): a server that is
/// down for a day must not flood the log, but its operator must see why.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Destinations whose last failure line is remembered; beyond this (a storm of distinct
/// failing names) further failures go to debug only.
const FAILURE_LOG_DESTINATIONS_MAX: usize = 10_000;

/// Per address: TCP connect plus TLS handshake.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Synapse's federation request timeout.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 60_000;
/// Where `/.well-known/matrix/server` lives outside tests.
pub const DEFAULT_WELL_KNOWN_PORT: u16 = 443;

/// Everything the transport needs; [`TransportConfig::new`] fills in production defaults.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Our server name: the `origin` of every request.
    pub origin: String,
    /// The key that signs the `X-Matrix` header.
    pub signing_key: SigningKey,
    /// Per address: TCP connect plus TLS handshake.
    pub connect_timeout_ms: u64,
    /// From sending the request to having the whole response.
    pub request_timeout_ms: u64,
    /// Verify certificates (webpki roots plus `extra_ca_file`). `false` is for test setups only.
    pub verify_tls: bool,
    /// PEM file with extra trusted CA certificates (e.g. a private federation's CA).
    pub extra_ca_file: Option<PathBuf>,
    /// Refuse addresses in [`default_denylist`] (SSRF protection); on by default.
    pub ip_denylist_enabled: bool,
    /// Ranges allowed even when the denylist covers them.
    pub ip_allowlist: Vec<IpNet>,
    /// Use this DNS server instead of the system's (`/etc/resolv.conf`); tests point it at a
    /// fixture.
    pub dns_nameserver: Option<SocketAddr>,
    /// Port for `https://<name>/.well-known/matrix/server`; 443 except in tests, which cannot
    /// bind a privileged port.
    pub well_known_port: u16,
}

impl TransportConfig {
    /// Production defaults: 10 s connect, 60 s request (Synapse's federation request
    /// timeout), TLS verified, denylist on, system DNS.
    pub fn new(origin: impl Into<String>, signing_key: SigningKey) -> Self {
        Self {
            origin: origin.into(),
            signing_key,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            verify_tls: true,
            extra_ca_file: None,
            ip_denylist_enabled: true,
            ip_allowlist: Vec::new(),
            dns_nameserver: None,
            well_known_port: DEFAULT_WELL_KNOWN_PORT,
        }
    }
}

/// Why a request could not be made or completed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    /// Bad configuration (CA file, resolver setup).
    Config(String),
    /// The destination (or a delegation) is not a valid server name.
    InvalidServerName(String),
    /// DNS resolution failed.
    Dns(String),
    /// Every address is refused by the IP denylist.
    Denied(String),
    /// TCP connect failed or timed out.
    Connect(String),
    /// The TLS handshake failed (e.g. certificate verification).
    Tls(String),
    /// No complete response within the request timeout.
    Timeout(String),
    /// The connection failed after the request was sent.
    Http(String),
    /// The request could not be signed (the body holds a number canonical JSON forbids) or
    /// is not JSON.
    Request(String),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, reason) = match self {
            Self::Config(r) => ("configuration", r),
            Self::InvalidServerName(r) => ("invalid server name", r),
            Self::Dns(r) => ("DNS", r),
            Self::Denied(r) => ("denied", r),
            Self::Connect(r) => ("connect", r),
            Self::Tls(r) => ("TLS", r),
            Self::Timeout(r) => ("timeout", r),
            Self::Http(r) => ("HTTP", r),
            Self::Request(r) => ("bad request", r),
        };
        write!(f, "{kind}: {reason}")
    }
}

impl std::error::Error for TransportError {}

impl TransportError {
    /// The core's view of this failure.
    pub fn to_result(&self) -> TransactionResult {
        match self {
            Self::Timeout(_) | Self::Http(_) => TransactionResult::Timeout,
            _ => TransactionResult::Unreachable,
        }
    }
}

/// One attempt with what a log line needs besides the result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReport {
    /// What to hand to the core.
    pub result: TransactionResult,
    /// Human-readable: the status line and peer, or why nothing was delivered.
    pub detail: String,
    /// The address that answered (or was last tried), if a connection was made.
    pub peer: Option<SocketAddr>,
    /// Wall time of the attempt, discovery included.
    pub elapsed_ms: u64,
}

/// A whole response, as the transport saw it.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body, at most 4 MiB.
    pub body: Bytes,
    /// The address that answered.
    pub peer: SocketAddr,
}

struct Pooled {
    sender: Sender,
    peer: SocketAddr,
    host_header: String,
}

struct Inner {
    config: TransportConfig,
    tls: Arc<rustls::ClientConfig>,
    resolver: TokioResolver,
    filter: IpFilter,
    well_known: WellKnownCache,
    idle: Mutex<HashMap<String, Vec<Pooled>>>,
    failure_logs: Mutex<HashMap<String, FailureLog>>,
}

/// When a destination's failure was last logged at warn level, and how many were not since.
struct FailureLog {
    logged_at: Instant,
    not_logged: u64,
}

/// The HTTPS federation client. Cheap to clone; clones share connections and caches.
#[derive(Clone)]
pub struct HttpsTransport {
    inner: Arc<Inner>,
}

impl fmt::Debug for HttpsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsTransport").field("origin", &self.inner.config.origin).finish()
    }
}

impl HttpsTransport {
    /// Builds the TLS configuration and the resolver. Fails on an unreadable CA file or an
    /// unreadable system DNS configuration.
    pub fn new(config: TransportConfig) -> Result<Self, TransportError> {
        if config.connect_timeout_ms == 0 || config.request_timeout_ms == 0 {
            return Err(TransportError::Config("timeouts must be at least 1 ms".into()));
        }
        let tls = conn::tls_config(config.verify_tls, config.extra_ca_file.as_deref())?;
        let mut builder = match config.dns_nameserver {
            Some(server) => {
                let group = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], group),
                    TokioConnectionProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| TransportError::Config(format!("system DNS configuration: {e}")))?,
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = Duration::from_millis(config.connect_timeout_ms);
        options.attempts = 2;
        if config.dns_nameserver.is_some() {
            // The fixture has no /etc/hosts entries to honour.
            options.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        }
        let resolver = builder.build();
        let filter = IpFilter::new(config.ip_denylist_enabled, &config.ip_allowlist);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                tls,
                resolver,
                filter,
                well_known: WellKnownCache::default(),
                idle: Mutex::new(HashMap::new()),
                failure_logs: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The configuration this transport was built with.
    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    /// One attempt (the core owns retries): `PUT /_matrix/federation/v1/send/{txnId}` with
    /// the body bytes as given (already canonical JSON from the core), X-Matrix signed.
    pub async fn send_transaction(&self, destination: &str, txn_id: &str, body: &str) -> TransactionResult {
        self.send_transaction_detailed(destination, txn_id, body).await.result
    }

    /// [`send_transaction`](Self::send_transaction) with the reason and peer, for logs.
    pub async fn send_transaction_detailed(&self, destination: &str, txn_id: &str, body: &str) -> SendReport {
        let started = Instant::now();
        let path = format!("/_matrix/federation/v1/send/{}", percent_encode(txn_id));
        let outcome = self.request(destination, Method::PUT, &path, Some(body)).await;
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match outcome {
            Ok(response) => {
                let result = map_response(&response);
                let detail = format!("{} from {} for {destination} txn {txn_id}", response.status, response.peer);
                SendReport { result, detail, peer: Some(response.peer), elapsed_ms }
            }
            Err(error) => {
                // The core only learns `Unreachable` or `Timeout`; the reason (TLS, DNS,
                // denylist, ...) is what an operator needs, so it is logged here.
                self.log_failure(destination, txn_id, &error);
                SendReport {
                    result: error.to_result(),
                    detail: format!("{destination} txn {txn_id}: {error}"),
                    peer: None,
                    elapsed_ms,
                }
            }
        }
    }

    /// Logs why a transaction was not delivered: at warn level once per destination per
    /// [`FAILURE_LOG_INTERVAL`], otherwise at debug level.
    fn log_failure(&self, destination: &str, txn_id: &str, error: &TransportError) {
        let now = Instant::now();
        let not_logged_since_last_warning = {
            let mut logs = self.inner.failure_logs.lock().unwrap_or_else(|p| p.into_inner());
            match logs.get_mut(destination) {
                Some(log) if now.duration_since(log.logged_at) < FAILURE_LOG_INTERVAL => {
                    log.not_logged += 1;
                    None
                }
                Some(log) => Some(std::mem::replace(log, FailureLog { logged_at: now, not_logged: 0 }).not_logged),
                None => {
                    if logs.len() >= FAILURE_LOG_DESTINATIONS_MAX {
                        logs.retain(|_, log| now.duration_since(log.logged_at) < FAILURE_LOG_INTERVAL);
                    }
                    (logs.len() < FAILURE_LOG_DESTINATIONS_MAX).then(|| {
                        logs.insert(destination.to_owned(), FailureLog { logged_at: now, not_logged: 0 });
                        0
                    })
                }
            }
        };
        match not_logged_since_last_warning {
            Some(not_logged) => tracing::warn!(
                destination,
                txn_id,
                failures_not_logged = not_logged,
                "transaction not delivered: {error}"
            ),
            None => tracing::debug!(destination, txn_id, "transaction not delivered: {error}"),
        }
    }

    /// One signed federation request to `destination`: `path` is the path and query exactly
    /// as sent (already percent-encoded), `body` a JSON text. Returns any complete HTTP
    /// response, whatever its status. Useful for other federation endpoints (e.g. key queries).
    pub async fn request(
        &self,
        destination: &str,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<HttpResponse, TransportError> {
        let config = &self.inner.config;
        // The core's bodies are canonical JSON already, so they are signed as they are, not
        // parsed into a tree and encoded again (a third of the service's CPU per
        // transaction before; BENCHMARKS.md, "Service end to end").
        let authorization = fedsend_sign::x_matrix_authorization_for_text(
            &config.origin,
            destination,
            method.as_str(),
            path,
            body,
            &config.signing_key,
        )
        .map_err(|e| match e {
            fedsend_sign::SignError::NotJson(why) => TransportError::Request(format!("body is not JSON: {why}")),
            other => TransportError::Request(other.to_string()),
        })?;
        let authorization = HeaderValue::from_str(&authorization)
            .map_err(|e| TransportError::Request(format!("Authorization header: {e}")))?;
        let body = Bytes::copy_from_slice(body.unwrap_or_default().as_bytes());

        // A pooled connection may have been closed by the server while idle, and that is only
        // noticed when the request fails; then one fresh connection is tried. Federation
        // requests are idempotent (a transaction is deduplicated by its txn id), so a repeat
        // is harmless even if the first one got through.
        let mut allow_pooled = true;
        loop {
            let pooled = if allow_pooled { self.take_idle(destination) } else { None };
            let reused = pooled.is_some();
            let conn = match pooled {
                Some(conn) => conn,
                None => self.open(destination).await?,
            };
            let mut request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(header::HOST, &conn.host_header)
                .header(header::AUTHORIZATION, authorization.clone())
                .header(header::USER_AGENT, concat!("fedsend/", env!("CARGO_PKG_VERSION")));
            if !body.is_empty() || method == Method::PUT || method == Method::POST {
                request = request.header(header::CONTENT_TYPE, "application/json");
            }
            let request =
                request.body(Full::new(body.clone())).map_err(|e| TransportError::Request(format!("{path}: {e}")))?;
            match self.exchange(conn, request, RESPONSE_BODY_BYTES_MAX).await {
                Ok((response, conn)) => {
                    self.put_idle(destination, conn);
                    return Ok(response);
                }
                Err(Exchange::StaleConnection(_)) if reused => allow_pooled = false,
                Err(Exchange::StaleConnection(e) | Exchange::Failed(e)) => return Err(e),
            }
        }
    }

    /// Resolves a server name per the spec: IP literal, explicit port, well-known delegation
    /// (then the same steps for the delegated name), SRV `_matrix-fed._tcp`, SRV
    /// `_matrix._tcp`, port 8448.
    pub async fn resolve_server(&self, server_name: &str) -> Result<Resolved, TransportError> {
        let resolver = &self.inner.resolver;
        let name = ServerName::parse(server_name)?;
        if let Some(resolved) = discovery::resolve_direct(resolver, &name, None).await? {
            return Ok(resolved);
        }
        let Host::Name(host) = &name.host else {
            unreachable!("resolve_direct handles every IP literal");
        };
        if let Some(delegated) = self.well_known(host).await {
            let delegated_name = ServerName::parse(&delegated)?;
            if let Some(resolved) =
                discovery::resolve_direct(resolver, &delegated_name, Some(delegated.clone())).await?
            {
                return Ok(resolved);
            }
            return discovery::resolve_without_port(resolver, &delegated_name, Some(delegated)).await;
        }
        discovery::resolve_without_port(resolver, &name, None).await
    }

    /// The cached or freshly fetched `m.server` delegation of `host`, if it has a usable one.
    async fn well_known(&self, host: &str) -> Option<String> {
        let now = Instant::now();
        if let Some(cached) = self.inner.well_known.get(host, now) {
            return cached;
        }
        let (delegated, ttl) = match self.fetch_well_known(host).await {
            Ok((delegated, ttl)) => (Some(delegated), ttl),
            Err(_) => (None, discovery::WELL_KNOWN_ERROR_TTL),
        };
        self.inner.well_known.put(host, Instant::now(), ttl, delegated.clone());
        delegated
    }

    /// Fetches `https://{host}/.well-known/matrix/server`, following up to
    /// [`WELL_KNOWN_REDIRECTS_MAX`] HTTPS redirects (the spec asks clients to follow them).
    async fn fetch_well_known(&self, host: &str) -> Result<(String, Duration), TransportError> {
        let config = &self.inner.config;
        let mut target_host = host.to_owned();
        let mut target_port = config.well_known_port;
        let mut path = "/.well-known/matrix/server".to_owned();
        for _ in 0..=WELL_KNOWN_REDIRECTS_MAX {
            let addrs = discovery::url_host_addrs(&self.inner.resolver, &target_host, target_port).await?;
            let (sender, peer) = conn::connect(
                &addrs,
                &target_host,
                &self.inner.tls,
                &self.inner.filter,
                Duration::from_millis(config.connect_timeout_ms),
            )
            .await?;
            let host_header = if target_port == config.well_known_port {
                target_host.clone()
            } else {
                format!("{target_host}:{target_port}")
            };
            let request = Request::builder()
                .method(Method::GET)
                .uri(path.as_str())
                .header(header::HOST, &host_header)
                .header(header::USER_AGENT, concat!("fedsend/", env!("CARGO_PKG_VERSION")))
                .body(Full::new(Bytes::new()))
                .map_err(|e| TransportError::Request(e.to_string()))?;
            let conn = Pooled { sender, peer, host_header };
            // Not pooled: a well-known fetch happens at most once per cache period.
            let response = match self.exchange(conn, request, discovery::WELL_KNOWN_BODY_BYTES_MAX).await {
                Ok((response, _)) => response,
                Err(Exchange::StaleConnection(e) | Exchange::Failed(e)) => return Err(e),
            };
            if response.status.is_redirection() {
                let location = response
                    .headers
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<hyper::Uri>().ok())
                    .ok_or_else(|| {
                        TransportError::Http(format!(
                            "well-known of {host}: {} without a usable Location",
                            response.status
                        ))
                    })?;
                if let Some(authority) = location.authority() {
                    if location.scheme_str() != Some("https") {
                        return Err(TransportError::Http(format!(
                            "well-known of {host}: redirect to a non-HTTPS URL {location}"
                        )));
                    }
                    target_host = authority.host().to_owned();
                    target_port = authority.port_u16().unwrap_or(443);
                }
                path = location.path_and_query().map_or("/", |p| p.as_str()).to_owned();
                continue;
            }
            if response.status != StatusCode::OK {
                return Err(TransportError::Http(format!("well-known of {host}: {}", response.status)));
            }
            let delegated = discovery::parse_well_known(&response.body)
                .map_err(|e| TransportError::Http(format!("well-known of {host}: {e}")))?;
            let cache_control = response.headers.get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok());
            return Ok((delegated, discovery::well_known_ttl(cache_control)));
        }
        Err(TransportError::Http(format!("well-known of {host}: more than {WELL_KNOWN_REDIRECTS_MAX} redirects")))
    }

    fn take_idle(&self, destination: &str) -> Option<Pooled> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(destination)?;
        while let Some(conn) = conns.pop() {
            if !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        idle.remove(destination);
        None
    }

    fn put_idle(&self, destination: &str, conn: Pooled) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.entry(destination.to_owned()).or_default();
        conns.retain(|c| !c.sender.is_closed());
        if conns.len() < IDLE_CONNECTIONS_PER_DESTINATION_MAX {
            conns.push(conn);
        }
    }

    async fn open(&self, destination: &str) -> Result<Pooled, TransportError> {
        let resolved = self.resolve_server(destination).await?;
        let (sender, peer) = conn::connect(
            &resolved.addrs,
            &resolved.sni,
            &self.inner.tls,
            &self.inner.filter,
            Duration::from_millis(self.inner.config.connect_timeout_ms),
        )
        .await?;
        Ok(Pooled { sender, peer, host_header: resolved.host_header })
    }

    /// Sends one request on `conn` and reads the whole response within the request timeout;
    /// hands the connection back for reuse.
    async fn exchange(
        &self,
        mut conn: Pooled,
        request: Request<Full<Bytes>>,
        body_bytes_max: usize,
    ) -> Result<(HttpResponse, Pooled), Exchange> {
        let timeout = Duration::from_millis(self.inner.config.request_timeout_ms);
        let peer = conn.peer;
        let attempt = async {
            conn.sender.ready().await.map_err(|e| (true, e.to_string()))?;
            let response = conn
                .sender
                .send_request(request)
                .await
                // Nothing was read: either the request never left (a stale pooled
                // connection) or the server dropped it unanswered.
                .map_err(|e| (true, e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, body_bytes_max)
                .collect()
                .await
                .map_err(|e| (false, format!("reading the {} response body: {e}", parts.status)))?
                .to_bytes();
            Ok::<_, (bool, String)>(HttpResponse { status: parts.status, headers: parts.headers, body, peer })
        };
        let response = match tokio::time::timeout(timeout, attempt).await {
            Err(_) => {
                return Err(Exchange::Failed(TransportError::Timeout(format!(
                    "no complete answer from {peer} within {} ms",
                    timeout.as_millis()
                ))));
            }
            Ok(Err((before_response, reason))) => {
                let error = TransportError::Http(format!("{peer}: {reason}"));
                return Err(if before_response { Exchange::StaleConnection(error) } else { Exchange::Failed(error) });
            }
            Ok(Ok(response)) => response,
        };
        Ok((response, conn))
    }
}

enum Exchange {
    /// Failed before any response byte: worth one retry on a fresh connection if the
    /// connection came from the pool.
    StaleConnection(TransportError),
    Failed(TransportError),
}

/// Maps a complete response to the core's result.
fn map_response(response: &HttpResponse) -> TransactionResult {
    let body: Option<Value> = serde_json::from_slice(&response.body).ok();
    if response.status.is_success() {
        let mut pdu_errors = BTreeMap::new();
        if let Some(pdus) = body.as_ref().and_then(|b| b.get("pdus")).and_then(Value::as_object) {
            for (event_id, result) in pdus {
                if let Some(error) = result.get("error") {
                    let text = match error {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    pdu_errors.insert(event_id.clone(), text);
                }
            }
        }
        return TransactionResult::Ok { pdu_errors };
    }
    let errcode = body.as_ref().and_then(|b| b.get("errcode")).and_then(Value::as_str).map(str::to_owned);
    let retry_after_ms = response
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after_ms(v, SystemTime::now()))
        .or_else(|| body.as_ref().and_then(|b| b.get("retry_after_ms")).and_then(Value::as_u64));
    TransactionResult::Status { status: response.status.as_u16(), retry_after_ms, errcode }
}

/// `Retry-After` is either delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a date in the
/// past means "now".
pub fn parse_retry_after_ms(value: &str, now: SystemTime) -> Option<u64> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a txn id is always one
/// path segment and the signed `uri` equals the one on the wire.
pub fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after_ms("7", now), Some(7_000));
        assert_eq!(parse_retry_after_ms(" 0 ", now), Some(0));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after_ms(&later, now), Some(90_000));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after_ms(&earlier, now), Some(0));
        assert_eq!(parse_retry_after_ms("soon", now), None);
        assert_eq!(parse_retry_after_ms("-5", now), None);
    }

    #[test]
    fn txn_ids_are_one_path_segment() {
        assert_eq!(percent_encode("abc-1.2_3~"), "abc-1.2_3~");
        assert_eq!(percent_encode("a/b c?d#é"), "a%2Fb%20c%3Fd%23%C3%A9");
    }

    #[test]
    fn errors_map_to_core_results() {
        assert_eq!(TransportError::Timeout("x".into()).to_result(), TransactionResult::Timeout);
        assert_eq!(TransportError::Http("x".into()).to_result(), TransactionResult::Timeout);
        for unreachable in [
            TransportError::Dns("x".into()),
            TransportError::Denied("x".into()),
            TransportError::Tls("x".into()),
            TransportError::Connect("x".into()),
            TransportError::InvalidServerName("x".into()),
        ] {
            assert_eq!(unreachable.to_result(), TransactionResult::Unreachable);
        }
    }
}
