//! The TOML configuration of `fedsend serve`. Every key, its default and its meaning are
//! listed in `docs/serve-config.md`; unknown keys are refused so a typo is an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::ingest_server::IngestLimits;
use crate::transport::{self, IpNet, default_denylist};

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Our homeserver's name (the `origin` of every transaction).
    pub server_name: String,
    /// Synapse-format signing key file (`ed25519 <version> <seed>`).
    pub signing_key_file: PathBuf,
    /// The SQLite database file; created if missing.
    #[serde(default = "default_database")]
    pub database: PathBuf,
    /// `native` (core linked in) or `wasm` (core in wasmtime).
    #[serde(default)]
    pub engine: EngineKind,
    /// The wasm guest for `engine = "wasm"`; found like `fedsend scenario --engine wasm` when absent.
    #[serde(default)]
    pub wasm_path: Option<PathBuf>,
    /// The ingest API.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// The outbound HTTPS client.
    #[serde(default)]
    pub transport: TransportSection,
    /// Keys of the core's `Config` (see the fedsend-core docs), passed through as they are.
    #[serde(default)]
    pub sender: toml::Table,
}

/// Which engine runs the core.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// The core linked natively.
    #[default]
    Native,
    /// The core compiled to wasm, in wasmtime.
    Wasm,
}

/// `[ingest]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Address of the ingest API, `/metrics` and `/health`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token the homeserver must present.
    #[serde(default)]
    pub token: Option<String>,
    /// File holding the token (first line), instead of `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted.
    #[serde(default = "default_body_bytes_max")]
    pub body_bytes_max: usize,
    /// Largest EDU content accepted on `/edu` (encoded JSON bytes).
    #[serde(default = "default_edu_bytes_max")]
    pub edu_bytes_max: usize,
    /// Open connections to the API at once; further ones wait in the listen backlog.
    #[serde(default = "default_connections_max")]
    pub connections_max: usize,
    /// A connection that has not sent a whole request head within this long is closed (an
    /// idle keep-alive connection too).
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A request whose body has not fully arrived within this long is refused with 408.
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: None,
            token_file: None,
            body_bytes_max: default_body_bytes_max(),
            edu_bytes_max: default_edu_bytes_max(),
            connections_max: default_connections_max(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
        }
    }
}

/// `[transport]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    /// TCP connect plus TLS handshake, per address.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// From sending a request to having the whole response.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Verify server certificates. Turn off only in test setups.
    #[serde(default = "yes")]
    pub verify_tls: bool,
    /// PEM file of extra trusted CAs.
    #[serde(default)]
    pub extra_ca_file: Option<PathBuf>,
    /// Refuse private, loopback and link-local addresses (SSRF protection).
    #[serde(default = "yes")]
    pub ip_denylist_enabled: bool,
    /// CIDR ranges allowed despite the denylist, e.g. `"127.0.0.0/8"`.
    #[serde(default)]
    pub ip_allowlist: Vec<String>,
    /// DNS server to use instead of the system's.
    #[serde(default)]
    pub dns_nameserver: Option<SocketAddr>,
    /// Port of `/.well-known/matrix/server` lookups (443 outside tests).
    #[serde(default = "default_well_known_port")]
    pub well_known_port: u16,
    /// Transactions on the wire at once, all destinations together (slow ones excepted).
    #[serde(default = "default_sends_in_flight_max")]
    pub sends_in_flight_max: usize,
    /// Transactions on the wire to one host (a server name without its port) at once.
    #[serde(default = "default_sends_per_host_max")]
    pub sends_per_host_max: usize,
    /// An unanswered transaction turns slow after this long and gives its slot back.
    #[serde(default = "default_slow_send_after_ms")]
    pub slow_send_after_ms: u64,
    /// Slow transactions waiting at once; one more is ended as timed out.
    #[serde(default = "default_slow_sends_max")]
    pub slow_sends_max: usize,
}

impl Default for TransportSection {
    fn default() -> Self {
        Self {
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            verify_tls: true,
            extra_ca_file: None,
            ip_denylist_enabled: true,
            ip_allowlist: Vec::new(),
            dns_nameserver: None,
            well_known_port: default_well_known_port(),
            sends_in_flight_max: default_sends_in_flight_max(),
            sends_per_host_max: default_sends_per_host_max(),
            slow_send_after_ms: default_slow_send_after_ms(),
            slow_sends_max: default_slow_sends_max(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_database() -> PathBuf {
    PathBuf::from("fedsend.db")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8009))
}
fn default_body_bytes_max() -> usize {
    4 * 1024 * 1024
}
fn default_edu_bytes_max() -> usize {
    64 * 1024
}
fn default_connections_max() -> usize {
    IngestLimits::default().connections_max
}
fn default_header_read_timeout_ms() -> u64 {
    duration_ms(IngestLimits::default().header_read_timeout)
}
fn default_body_read_timeout_ms() -> u64 {
    duration_ms(IngestLimits::default().body_read_timeout)
}
fn duration_ms(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
fn default_connect_timeout_ms() -> u64 {
    transport::DEFAULT_CONNECT_TIMEOUT_MS
}
fn default_request_timeout_ms() -> u64 {
    transport::DEFAULT_REQUEST_TIMEOUT_MS
}
fn default_well_known_port() -> u16 {
    transport::DEFAULT_WELL_KNOWN_PORT
}
fn default_sends_in_flight_max() -> usize {
    64
}
fn default_sends_per_host_max() -> usize {
    8
}
fn default_slow_send_after_ms() -> u64 {
    5_000
}
fn default_slow_sends_max() -> usize {
    1_024
}

impl ServeConfig {
    /// Reads and checks the file; relative paths in it are taken from the file's directory.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let mut config = Self::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut config.signing_key_file);
        rebase(&mut config.database);
        if let Some(p) = config.wasm_path.as_mut() {
            rebase(p);
        }
        if let Some(p) = config.ingest.token_file.as_mut() {
            rebase(p);
        }
        if let Some(p) = config.transport.extra_ca_file.as_mut() {
            rebase(p);
        }
        Ok(config)
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " "))?;
        fedsend_core::ServerName::parse(&config.server_name)
            .map_err(|e| format!("server_name {:?} is not a valid server name: {e}", config.server_name))?;
        if config.ingest.token.is_some() && config.ingest.token_file.is_some() {
            return Err("[ingest] sets both token and token_file; keep one".into());
        }
        for (key, value) in [
            ("connections_max", config.ingest.connections_max as u64),
            ("header_read_timeout_ms", config.ingest.header_read_timeout_ms),
            ("body_read_timeout_ms", config.ingest.body_read_timeout_ms),
        ] {
            if value == 0 {
                return Err(format!("[ingest] {key} must be at least 1"));
            }
        }
        for (key, value) in [
            ("sends_in_flight_max", config.transport.sends_in_flight_max),
            ("sends_per_host_max", config.transport.sends_per_host_max),
            ("slow_sends_max", config.transport.slow_sends_max),
        ] {
            if value == 0 {
                return Err(format!("[transport] {key} must be at least 1"));
            }
        }
        if config.transport.slow_send_after_ms == 0 {
            return Err("[transport] slow_send_after_ms must be at least 1".into());
        }
        config.core_config_json()?;
        Ok(config)
    }

    /// The core's `Config` as JSON: `[sender]` plus `server_name`, checked by the core's own
    /// decoder so errors name the key.
    pub fn core_config_json(&self) -> Result<String, String> {
        let mut object = serde_json::Map::new();
        for (key, value) in &self.sender {
            if key == "server_name" {
                return Err("[sender] must not set server_name; it is the top-level key".into());
            }
            let value = serde_json::to_value(value).map_err(|e| format!("[sender] {key}: {e}"))?;
            object.insert(key.clone(), value);
        }
        object.insert("server_name".into(), Value::String(self.server_name.clone()));
        let json = Value::Object(object).to_string();
        let _: fedsend_core::Config = serde_json::from_str(&json).map_err(|e| format!("[sender]: {e}"))?;
        Ok(json)
    }

    /// Settings that work but weaken security, each a sentence for the start-up log: an
    /// operator may mean them (test setups, a trusted network), but should not get them
    /// silently.
    pub fn risky_settings(&self) -> Vec<String> {
        let mut risks = Vec::new();
        let listen = self.ingest.listen;
        if !listen.ip().is_loopback() {
            risks.push(format!(
                "[ingest] listen = \"{listen}\" is reachable beyond this host, and the API has no TLS: the \
                 bearer token and every submission cross the network in clear text"
            ));
        }
        risks.extend(readable_by_others(&self.signing_key_file, "signing_key_file", "the signing key"));
        if let Some(token_file) = &self.ingest.token_file {
            risks.extend(readable_by_others(token_file, "[ingest] token_file", "the ingest token"));
        }
        let transport = &self.transport;
        if !transport.verify_tls {
            risks.push(
                "[transport] verify_tls = false: remote certificates are not checked, so anyone on the \
                 path can impersonate a remote server"
                    .into(),
            );
        }
        if !transport.ip_denylist_enabled {
            risks.push(
                "[transport] ip_denylist_enabled = false: any server name can point fedsend at loopback \
                 and private addresses (SSRF)"
                    .into(),
            );
        } else {
            for entry in &transport.ip_allowlist {
                let Ok(allowed) = entry.parse::<IpNet>() else { continue };
                let reopened: Vec<&str> = default_denylist()
                    .filter(|denied| denied.parse::<IpNet>().is_ok_and(|denied| allowed.overlaps(&denied)))
                    .collect();
                if !reopened.is_empty() {
                    risks.push(format!(
                        "[transport] ip_allowlist entry \"{entry}\" reopens denylisted ranges ({}): server \
                         names can point fedsend at them",
                        reopened.join(", ")
                    ));
                }
            }
        }
        risks
    }

    /// The ingest token, from `token` or `token_file`.
    pub fn ingest_token(&self) -> Result<String, String> {
        let token = match (&self.ingest.token, &self.ingest.token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read [ingest] token_file {}: {e}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            (None, None) => return Err("[ingest] needs token or token_file".into()),
        };
        if token.len() < 16 {
            return Err("[ingest] token must be at least 16 characters".into());
        }
        Ok(token)
    }
}

/// A warning when `path` grants anything to group or others (a secret should be 0600 or
/// 0400); nothing when it cannot be read, which loading reports on its own.
fn readable_by_others(path: &Path, key: &str, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then(|| {
        let writable = if mode & 0o022 != 0 { " (and replace)" } else { "" };
        format!(
            "{key} {} has mode {mode:04o}: other local users can read{writable} {what}; chmod 600 it",
            path.display()
        )
    })
}
