//! Synapse's own YAML configuration, read the way a Synapse worker reads it, reduced to what a
//! federation sender instance needs.
//!
//! Synapse merges its `-c` files shallowly: a top-level key in a later file replaces the whole
//! value from an earlier one (nested maps are not merged). Relative file paths inside the
//! configuration are opened relative to the working directory, as Python's `open` does; only
//! the default signing key path is derived from the directory of the last file.
//!
//! Loading refuses, with a one-line reason naming the key, every deployment fedsend cannot
//! serve faithfully instead of half-working in it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

/// The instance name the main process uses on the wire; `instance_map` calls it `main`.
pub const MAIN_PROCESS_INSTANCE_NAME: &str = "master";
const MAIN_PROCESS_INSTANCE_MAP_KEY: &str = "main";

/// Synapse always adds these to an IP blocklist, whatever the configuration says.
const ALWAYS_BLOCKED_IPS: [&str; 2] = ["0.0.0.0", "::"];

/// Synapse's default `ip_range_blacklist`: loopback, private, carrier-grade NAT, link-local,
/// documentation, benchmarking and multicast ranges that a federation request must never reach.
pub const DEFAULT_IP_RANGE_BLOCKLIST: [&str; 19] = [
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
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
];

/// Why a configuration cannot be used: the key at fault and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { key: key.into(), reason: reason.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The ed25519 key this server signs federation requests with.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// The part after `ed25519:` in the key id, e.g. `a_AbCd`.
    pub version: String,
    pub seed: [u8; 32],
}

impl SigningKey {
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.version)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The seed is a secret: never let it reach a log line.
        f.debug_struct("SigningKey").field("version", &self.version).finish_non_exhaustive()
    }
}

/// Connection settings of Synapse's PostgreSQL database (`database.args`, which Synapse hands
/// to psycopg2 as libpq keywords).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub user: Option<String>,
    pub password: Option<String>,
    pub dbname: Option<String>,
    /// A host name, an IP address, or a directory holding the Unix socket (starts with `/`).
    pub host: Option<String>,
    pub port: Option<u16>,
    pub sslmode: Option<String>,
    pub application_name: Option<String>,
    pub connect_timeout_s: Option<u64>,
    /// Every other libpq keyword, as text. Synapse's own pool settings (`cp_*`) are left out.
    pub other_args: BTreeMap<String, String>,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("sslmode", &self.sslmode)
            .field("application_name", &self.application_name)
            .field("connect_timeout_s", &self.connect_timeout_s)
            .field("other_args", &self.other_args)
            .finish()
    }
}

impl DatabaseConfig {
    /// A tokio-postgres configuration with the same connection target and credentials.
    ///
    /// Without a TLS connector tokio-postgres can only do `disable` and `prefer` (which falls
    /// back to plain text); `require` and stricter modes are refused rather than silently
    /// downgraded.
    pub fn to_pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let mut pg = tokio_postgres::Config::new();
        if let Some(user) = &self.user {
            pg.user(user);
        }
        if let Some(password) = &self.password {
            pg.password(password);
        }
        if let Some(dbname) = &self.dbname {
            pg.dbname(dbname);
        }
        match &self.host {
            Some(host) => {
                pg.host(host);
            }
            // libpq's default: the Unix socket in the usual Debian directory.
            None => {
                pg.host_path("/var/run/postgresql");
            }
        }
        if let Some(port) = self.port {
            pg.port(port);
        }
        if let Some(name) = &self.application_name {
            pg.application_name(name);
        }
        if let Some(timeout_s) = self.connect_timeout_s {
            pg.connect_timeout(std::time::Duration::from_secs(timeout_s));
        }
        match self.sslmode.as_deref() {
            None | Some("prefer") | Some("allow") => {}
            Some("disable") => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "database.args.sslmode",
                    format!(
                        "sslmode {other:?} needs TLS to PostgreSQL, which fedsend does not support; use disable or prefer"
                    ),
                ));
            }
        }
        Ok(pg)
    }
}

/// Where and how to reach Redis (`redis:`).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub host: String,
    pub port: u16,
    /// A Unix socket path; when set it wins over host and port, as in Synapse.
    pub path: Option<PathBuf>,
    pub dbid: Option<i64>,
    pub username: Option<String>,
    /// From `password`, or the trimmed contents of `password_path`.
    pub password: Option<String>,
    pub use_tls: bool,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path", &self.path)
            .field("dbid", &self.dbid)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("use_tls", &self.use_tls)
            .finish()
    }
}

/// How to reach another Synapse process's HTTP replication listener (`instance_map` entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceLocation {
    Tcp { host: String, port: u16, tls: bool },
    Unix { path: PathBuf },
}

/// The instances writing each stream a federation sender reads (`stream_writers`), by wire
/// name. Streams with several writers have a current token that is the minimum over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamWriters {
    pub events: Vec<String>,
    pub typing: Vec<String>,
    pub to_device: Vec<String>,
    pub receipts: Vec<String>,
    pub presence: Vec<String>,
    pub device_lists: Vec<String>,
}

/// Outbound federation client settings shared with the rest of the deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationClientConfig {
    pub verify_certificates: bool,
    /// `None`: federate with everyone. `Some`: only with these server names.
    pub domain_whitelist: Option<Vec<String>>,
    /// Glob patterns of server names whose certificates are not verified.
    pub certificate_verification_whitelist: Vec<String>,
    /// Addresses federation requests must not reach, unless `ip_range_allowlist` has them.
    pub ip_range_blocklist: IpRangeSet,
    pub ip_range_allowlist: IpRangeSet,
    /// Extra CA files (PEM) trusted instead of the system roots; `None` when unset.
    pub custom_ca_files: Option<Vec<PathBuf>>,
    pub minimum_tls_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_0,
    V1_1,
    V1_2,
    V1_3,
}

/// The settings of Synapse's own sender that fedsend follows, with Synapse's defaults: the
/// `federation:` section (request timeout, retries within a request, per-destination backoff),
/// `presence.enabled` and `allow_device_name_lookup_over_federation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderSettings {
    pub client_timeout_ms: u64,
    pub max_long_retry_delay_ms: u64,
    pub max_long_retries: u32,
    pub destination_min_retry_interval_ms: u64,
    pub destination_retry_multiplier: u64,
    pub destination_max_retry_interval_ms: u64,
    pub presence_enabled: bool,
    pub allow_device_name_lookup_over_federation: bool,
}

/// Synapse's durations: an integer is milliseconds, a string may end in s, m, h, d, w or y.
pub fn parse_duration_ms(value: &Value, key: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::new(key, "must be a duration: milliseconds, or a number with s, m, h, d, w or y");
    match value {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(text) => {
            let text = text.trim();
            let (digits, unit_ms) = match text.char_indices().last() {
                Some((at, 's')) => (&text[..at], 1_000),
                Some((at, 'm')) => (&text[..at], 60_000),
                Some((at, 'h')) => (&text[..at], 3_600_000),
                Some((at, 'd')) => (&text[..at], 86_400_000),
                Some((at, 'w')) => (&text[..at], 604_800_000),
                Some((at, 'y')) => (&text[..at], 31_536_000_000),
                _ => (text, 1),
            };
            digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit_ms)).ok_or_else(bad)
        }
        _ => Err(bad()),
    }
}

fn read_sender_settings(root: &Section<'_>) -> Result<SenderSettings, ConfigError> {
    let empty = Mapping::new();
    let federation = root.section("federation", "federation")?.unwrap_or(Section { map: &empty, prefix: "federation" });
    let duration = |key: &str, default_ms: u64| -> Result<u64, ConfigError> {
        federation.get(key).map_or(Ok(default_ms), |v| parse_duration_ms(v, &federation.key_path(key)))
    };
    let count = |key: &str, default: u64| -> Result<u64, ConfigError> {
        match federation.get(key) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                n.as_u64().ok_or_else(|| ConfigError::new(federation.key_path(key), "must be a non-negative integer"))
            }
            Some(_) => Err(ConfigError::new(federation.key_path(key), "must be a non-negative integer")),
        }
    };
    let presence_enabled = match root.section("presence", "presence")? {
        Some(presence) => presence.bool_or("enabled", true)?,
        None => root.bool_or("use_presence", true)?,
    };
    Ok(SenderSettings {
        client_timeout_ms: duration("client_timeout", 60_000)?,
        max_long_retry_delay_ms: duration("max_long_retry_delay", 60_000)?,
        max_long_retries: u32::try_from(count("max_long_retries", 10)?)
            .map_err(|_| ConfigError::new("federation.max_long_retries", "is too large"))?,
        destination_min_retry_interval_ms: duration("destination_min_retry_interval", 600_000)?,
        destination_retry_multiplier: count("destination_retry_multiplier", 2)?,
        // Synapse caps it so that the database column cannot overflow.
        destination_max_retry_interval_ms: duration("destination_max_retry_interval", 604_800_000)?.min(1 << 62),
        presence_enabled,
        allow_device_name_lookup_over_federation: root.bool_or("allow_device_name_lookup_over_federation", false)?,
    })
}

/// Everything a federation sender instance needs from Synapse's configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This instance's name on the wire (Synapse's `worker_name`).
    pub instance_name: String,
    pub server_name: String,
    pub signing_key: SigningKey,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    /// All federation sender instances, in configuration order: the order decides sharding.
    pub federation_sender_instances: Vec<String>,
    /// Keyed by wire name: the `main` entry is stored under `master`.
    pub instance_map: BTreeMap<String, InstanceLocation>,
    /// Sent as `Authorization: Bearer` on replication HTTP requests when set.
    pub replication_secret: Option<String>,
    pub stream_writers: StreamWriters,
    pub federation: FederationClientConfig,
    /// How Synapse's own sender would behave: retries, backoff, presence, device names.
    pub sender: SenderSettings,
}

impl WorkerConfig {
    /// Reads and merges Synapse's YAML files (later files' top-level keys win) and extracts
    /// the configuration of `instance_name` as a federation sender.
    pub fn load(paths: &[PathBuf], instance_name: &str) -> Result<Self, ConfigError> {
        let Some(last_path) = paths.last() else {
            return Err(ConfigError::new("config", "no configuration file given"));
        };
        let mut merged = Mapping::new();
        for path in paths {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new("config", format!("cannot read {}: {e}", path.display())))?;
            merge_document(&mut merged, &text, &path.display().to_string())?;
        }
        let config_dir = absolute_parent(last_path);
        Self::from_mapping(&merged, &config_dir, instance_name)
    }

    /// Like [`WorkerConfig::load`] on already merged YAML; `config_dir` is the directory the
    /// default signing key path is derived from.
    pub fn from_mapping(config: &Mapping, config_dir: &Path, instance_name: &str) -> Result<Self, ConfigError> {
        if instance_name.is_empty() || instance_name == MAIN_PROCESS_INSTANCE_NAME {
            return Err(ConfigError::new(
                "worker_name",
                format!("the instance name must name a worker, not be empty or {MAIN_PROCESS_INSTANCE_NAME:?}"),
            ));
        }
        let root = Section { map: config, prefix: "" };
        let server_name = root.required_string("server_name")?;
        refuse_removed_replication_keys(&root)?;
        if root.is_truthy("outbound_federation_restricted_to") {
            return Err(ConfigError::new(
                "outbound_federation_restricted_to",
                "proxying other processes' outbound federation through this instance is not supported; remove the key",
            ));
        }
        let federation_sender_instances = read_federation_sender_instances(&root, instance_name)?;
        let instance_map = read_instance_map(&root)?;
        let replication_secret = read_replication_secret(&root)?;
        let stream_writers = read_stream_writers(&root, &instance_map)?;
        Ok(Self {
            instance_name: instance_name.to_owned(),
            signing_key: read_signing_key(&root, &server_name, config_dir)?,
            database: read_database(&root)?,
            redis: read_redis(&root)?,
            federation: read_federation_client(&root)?,
            sender: read_sender_settings(&root)?,
            server_name,
            federation_sender_instances,
            instance_map,
            replication_secret,
            stream_writers,
        })
    }

    /// Whether this instance sends to `destination`, by Synapse's sharding rule.
    pub fn should_handle(&self, destination: &str) -> bool {
        fedsend_core::should_handle(&self.federation_sender_instances, &self.instance_name, destination)
    }

    /// The main process's replication HTTP listener.
    pub fn main_location(&self) -> &InstanceLocation {
        // `from_mapping` refuses configurations without it.
        &self.instance_map[MAIN_PROCESS_INSTANCE_NAME]
    }
}

fn absolute_parent(path: &Path) -> PathBuf {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
}

/// Synapse ignores (with a warning) a file that is empty or not a map, so this does too.
fn merge_document(merged: &mut Mapping, text: &str, origin: &str) -> Result<(), ConfigError> {
    let document: Value = serde_norway::from_str(text)
        .map_err(|e| ConfigError::new("config", format!("{origin} is not valid YAML: {e}")))?;
    match document {
        Value::Mapping(map) => {
            for (key, value) in map {
                merged.insert(key, value);
            }
        }
        _ => tracing::warn!("{origin} is empty or not a key-value map; ignoring it, as Synapse does"),
    }
    Ok(())
}

/// A view of one YAML map that knows its dotted path for error messages.
#[derive(Clone, Copy)]
struct Section<'a> {
    map: &'a Mapping,
    prefix: &'a str,
}

impl<'a> Section<'a> {
    fn key_path(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_owned() } else { format!("{}.{key}", self.prefix) }
    }

    /// The value, with an explicit YAML `null` treated as absent (Python's `dict.get`).
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Python truthiness: absent, null, false, 0, "" and empty collections are false.
    fn is_truthy(&self, key: &str) -> bool {
        match self.get(key) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Sequence(s)) => !s.is_empty(),
            Some(Value::Mapping(m)) => !m.is_empty(),
            Some(_) => true,
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ConfigError::new(self.key_path(key), "must be a string")),
        }
    }

    fn required_string(&self, key: &str) -> Result<String, ConfigError> {
        self.string(key)?.ok_or_else(|| ConfigError::new(self.key_path(key), "is required"))
    }

    /// Scalars that libpq takes as text; YAML may have written them as numbers or booleans.
    fn scalar_text(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(if *b { "1" } else { "0" }.to_owned())),
            Some(_) => Err(ConfigError::new(self.key_path(key), "must be a scalar")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ConfigError::new(self.key_path(key), "must be true or false")),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                n.as_i64().map(Some).ok_or_else(|| ConfigError::new(self.key_path(key), "must be an integer"))
            }
            Some(_) => Err(ConfigError::new(self.key_path(key), "must be an integer")),
        }
    }

    fn port(&self, key: &str) -> Result<Option<u16>, ConfigError> {
        let text = self.scalar_text(key)?;
        text.map(|t| {
            t.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ConfigError::new(self.key_path(key), format!("{t:?} is not a TCP port")))
        })
        .transpose()
    }

    fn string_list(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(ConfigError::new(self.key_path(key), "must be a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(ConfigError::new(self.key_path(key), "must be a list of strings")),
        }
    }

    fn section(&self, key: &'a str, path: &'a str) -> Result<Option<Self>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Mapping(map)) => Ok(Some(Self { map, prefix: path })),
            Some(_) => Err(ConfigError::new(self.key_path(key), "must be a map")),
        }
    }
}

fn read_text_file(path: &str, key: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::new(key, format!("cannot read {path}: {e}")))
}

fn refuse_removed_replication_keys(root: &Section<'_>) -> Result<(), ConfigError> {
    // Synapse refuses the port whenever present, the others only when set to something.
    if root.contains("worker_replication_port") {
        return Err(ConfigError::new(
            "worker_replication_port",
            "direct TCP replication was removed from Synapse; workers replicate over Redis",
        ));
    }
    for key in ["worker_replication_host", "worker_replication_http_port", "worker_replication_http_tls"] {
        if root.is_truthy(key) {
            return Err(ConfigError::new(
                key,
                "is no longer supported by Synapse; describe the main process under instance_map.main instead",
            ));
        }
    }
    Ok(())
}

fn read_federation_sender_instances(root: &Section<'_>, instance_name: &str) -> Result<Vec<String>, ConfigError> {
    const KEY: &str = "federation_sender_instances";
    let instances = match root.get(KEY) {
        Some(Value::Sequence(_)) => root.string_list(KEY)?.unwrap_or_default(),
        Some(_) => return Err(ConfigError::new(KEY, "must be a list of instance names")),
        // The legacy form: `send_federation: false` on the main process plus one worker
        // running the federation_sender app, which this instance stands in for.
        None if !root.bool_or("send_federation", true)? => vec![instance_name.to_owned()],
        None => {
            return Err(ConfigError::new(
                KEY,
                "is not set and send_federation is not false, so the main process sends federation itself",
            ));
        }
    };
    if !instances.iter().any(|i| i == instance_name) {
        return Err(ConfigError::new(KEY, format!("does not list this instance {instance_name:?}")));
    }
    Ok(instances)
}

fn read_instance_map(root: &Section<'_>) -> Result<BTreeMap<String, InstanceLocation>, ConfigError> {
    let mut locations = BTreeMap::new();
    if let Some(map) = root.section("instance_map", "instance_map")? {
        for (name, entry) in map.map {
            let Value::String(name) = name else {
                return Err(ConfigError::new("instance_map", "instance names must be strings"));
            };
            let key = format!("instance_map.{name}");
            let Value::Mapping(entry) = entry else {
                return Err(ConfigError::new(key, "must be a map with host and port, or path"));
            };
            let entry = Section { map: entry, prefix: &key };
            let location = match entry.string("path")? {
                Some(path) => InstanceLocation::Unix { path: PathBuf::from(path) },
                None => {
                    let host = entry.required_string("host")?;
                    // Synapse's schema wants a real integer here, not a quoted one.
                    let port = entry
                        .integer("port")?
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0)
                        .ok_or_else(|| ConfigError::new(entry.key_path("port"), "must be a TCP port number"))?;
                    InstanceLocation::Tcp { host, port, tls: entry.bool_or("tls", false)? }
                }
            };
            let wire_name =
                if name == MAIN_PROCESS_INSTANCE_MAP_KEY { MAIN_PROCESS_INSTANCE_NAME } else { name.as_str() };
            locations.insert(wire_name.to_owned(), location);
        }
    }
    if !root.section("instance_map", "instance_map")?.is_some_and(|m| m.map.contains_key(MAIN_PROCESS_INSTANCE_MAP_KEY))
    {
        return Err(ConfigError::new(
            "instance_map.main",
            "is required: workers reach the main process's replication listener through it",
        ));
    }
    Ok(locations)
}

fn read_replication_secret(root: &Section<'_>) -> Result<Option<String>, ConfigError> {
    let inline = root.string("worker_replication_secret")?;
    match root.string("worker_replication_secret_path")? {
        Some(_) if inline.is_some() => Err(ConfigError::new(
            "worker_replication_secret_path",
            "conflicts with worker_replication_secret; set only one",
        )),
        Some(path) => Ok(Some(read_text_file(&path, "worker_replication_secret_path")?.trim().to_owned())),
        None => Ok(inline),
    }
}

fn read_stream_writers(
    root: &Section<'_>,
    instance_map: &BTreeMap<String, InstanceLocation>,
) -> Result<StreamWriters, ConfigError> {
    let writers = root.section("stream_writers", "stream_writers")?;
    let list = |stream: &str| -> Result<Vec<String>, ConfigError> {
        let Some(section) = writers else { return Ok(vec![MAIN_PROCESS_INSTANCE_NAME.to_owned()]) };
        let names = match section.get(stream) {
            None => vec![MAIN_PROCESS_INSTANCE_NAME.to_owned()],
            Some(Value::String(one)) => vec![one.clone()],
            Some(_) => section.string_list(stream)?.unwrap_or_default(),
        };
        if names.is_empty() {
            return Err(ConfigError::new(section.key_path(stream), "must name at least one instance"));
        }
        if let Some(unknown) = names.iter().find(|n| *n != MAIN_PROCESS_INSTANCE_NAME && !instance_map.contains_key(*n))
        {
            return Err(ConfigError::new(
                section.key_path(stream),
                format!("instance {unknown:?} is not in instance_map"),
            ));
        }
        Ok(names)
    };
    Ok(StreamWriters {
        events: list("events")?,
        typing: list("typing")?,
        to_device: list("to_device")?,
        receipts: list("receipts")?,
        presence: list("presence")?,
        device_lists: list("device_lists")?,
    })
}

fn read_signing_key(root: &Section<'_>, server_name: &str, config_dir: &Path) -> Result<SigningKey, ConfigError> {
    if let Some(inline) = root.get("signing_key") {
        let Value::String(line) = inline else {
            return Err(ConfigError::new("signing_key", "must be a string `ed25519 <version> <base64 seed>`"));
        };
        return parse_signing_key_line(line).map_err(|reason| ConfigError::new("signing_key", reason));
    }
    let path = match root.string("signing_key_path")? {
        Some(path) => PathBuf::from(path),
        None => config_dir.join(format!("{server_name}.signing.key")),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::new("signing_key_path", format!("cannot read {}: {e}", path.display())))?;
    // Every line must be a valid key, as in Synapse; the first one signs.
    let mut keys = text.lines().filter(|line| !line.trim().is_empty()).map(|line| {
        parse_signing_key_line(line)
            .map_err(|reason| ConfigError::new("signing_key_path", format!("{}: {reason}", path.display())))
    });
    let first = keys
        .next()
        .ok_or_else(|| ConfigError::new("signing_key_path", format!("no signing keys in {}", path.display())))??;
    keys.try_for_each(|key| key.map(drop))?;
    Ok(first)
}

fn parse_signing_key_line(line: &str) -> Result<SigningKey, String> {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let [algorithm, version, seed_base64] = parts[..] else {
        return Err("a signing key line is `ed25519 <version> <base64 seed>`".to_owned());
    };
    if algorithm != "ed25519" {
        return Err(format!("unsupported signing algorithm {algorithm:?}"));
    }
    let seed_bytes = decode_unpadded_base64(seed_base64).ok_or("the seed is not valid base64")?;
    let seed: [u8; 32] = seed_bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| format!("the seed is {} bytes, an ed25519 seed is 32", bytes.len()))?;
    Ok(SigningKey { version: version.to_owned(), seed })
}

/// Standard or URL-safe alphabet, with or without `=` padding, as Synapse accepts.
fn decode_unpadded_base64(text: &str) -> Option<Vec<u8>> {
    let symbols = text.trim_end_matches('=').as_bytes();
    if symbols.len() % 4 == 1 {
        return None;
    }
    let sextet = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(symbols.len() * 3 / 4);
    for chunk in symbols.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | sextet(c)?;
        }
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

fn read_database(root: &Section<'_>) -> Result<DatabaseConfig, ConfigError> {
    if root.get("database").is_some() && root.get("databases").is_some() {
        return Err(ConfigError::new("databases", "conflicts with database; set only one"));
    }
    let (key, section) = if let Some(section) = root.section("database", "database")? {
        ("database", section)
    } else if let Some(databases) = root.section("databases", "databases")? {
        main_of_multiple_databases(databases)?
    } else if root.get("database_path").is_some() {
        return Err(ConfigError::new("database_path", "SQLite databases are not supported; fedsend needs PostgreSQL"));
    } else {
        return Err(ConfigError::new("database", "is required and must be a PostgreSQL (psycopg2) database"));
    };
    // Synapse's default engine is SQLite when `name` is left out.
    let engine = section.string("name")?.unwrap_or_else(|| "sqlite3".to_owned());
    match engine.as_str() {
        "psycopg2" => {}
        "sqlite3" => {
            return Err(ConfigError::new(
                format!("{key}.name"),
                "SQLite databases are not supported; fedsend needs Synapse on PostgreSQL (psycopg2)",
            ));
        }
        other => return Err(ConfigError::new(format!("{key}.name"), format!("unknown database engine {other:?}"))),
    }
    let Some(args) = section.section("args", "")? else {
        return Ok(DatabaseConfig::default());
    };
    let args_path = format!("{key}.args");
    let args = Section { map: args.map, prefix: &args_path };
    let mut config = DatabaseConfig {
        user: args.scalar_text("user")?,
        password: args.scalar_text("password")?,
        // psycopg2 accepts both spellings.
        dbname: args.scalar_text("dbname")?.or(args.scalar_text("database")?),
        host: args.scalar_text("host")?,
        port: args.port("port")?,
        sslmode: args.scalar_text("sslmode")?,
        application_name: args.scalar_text("application_name")?,
        connect_timeout_s: args
            .scalar_text("connect_timeout")?
            .map(|t| {
                t.parse().map_err(|_| ConfigError::new(args.key_path("connect_timeout"), "must be a number of seconds"))
            })
            .transpose()?,
        other_args: BTreeMap::new(),
    };
    const READ: [&str; 8] = ["user", "password", "dbname", "database", "host", "port", "sslmode", "application_name"];
    for (name, _) in args.map {
        let Value::String(name) = name else { continue };
        if READ.contains(&name.as_str()) || name == "connect_timeout" || name.starts_with("cp_") {
            continue;
        }
        if let Some(text) = args.scalar_text(name)? {
            config.other_args.insert(name.clone(), text);
        }
    }
    Ok(config)
}

/// With `databases:`, the one holding the `main` data store; a separate `state` database is
/// refused because state groups would then need a second connection pool.
fn main_of_multiple_databases<'a>(databases: Section<'a>) -> Result<(&'static str, Section<'a>), ConfigError> {
    let mut main = None;
    let mut state_elsewhere = false;
    for (name, entry) in databases.map {
        let Value::Mapping(entry) = entry else {
            return Err(ConfigError::new("databases", "every entry must be a map"));
        };
        let entry = Section { map: entry, prefix: "databases" };
        let stores = entry.string_list("data_stores")?.unwrap_or_else(|| vec!["main".to_owned(), "state".to_owned()]);
        let has_main = stores.iter().any(|s| s == "main");
        let has_state = stores.iter().any(|s| s == "state");
        if has_main {
            state_elsewhere = !has_state;
            main = Some(entry);
        }
        if has_state && !has_main {
            tracing::debug!("state database {name:?} is separate from main");
        }
    }
    let main = main.ok_or_else(|| ConfigError::new("databases", "no database holds the main data store"))?;
    if state_elsewhere {
        return Err(ConfigError::new(
            "databases",
            "the state data store lives in a separate database, which fedsend does not support",
        ));
    }
    Ok(("databases", main))
}

fn read_redis(root: &Section<'_>) -> Result<RedisConfig, ConfigError> {
    let not_enabled = || ConfigError::new("redis.enabled", "must be true: a worker replicates over Redis");
    let redis = root.section("redis", "redis")?.ok_or_else(not_enabled)?;
    if !redis.bool_or("enabled", false)? {
        return Err(not_enabled());
    }
    let inline_password = redis.scalar_text("password")?;
    let password = match redis.string("password_path")? {
        Some(_) if inline_password.is_some() => {
            return Err(ConfigError::new("redis.password_path", "conflicts with redis.password; set only one"));
        }
        Some(path) => Some(read_text_file(&path, "redis.password_path")?.trim().to_owned()),
        None => inline_password,
    };
    let username = redis.string("username")?;
    if username.is_some() && password.is_none() {
        return Err(ConfigError::new("redis.username", "needs redis.password or redis.password_path too"));
    }
    Ok(RedisConfig {
        host: redis.string("host")?.unwrap_or_else(|| "localhost".to_owned()),
        port: redis.port("port")?.unwrap_or(6379),
        path: redis.string("path")?.map(PathBuf::from),
        dbid: redis.integer("dbid")?,
        username,
        password,
        use_tls: redis.bool_or("use_tls", false)?,
    })
}

fn read_federation_client(root: &Section<'_>) -> Result<FederationClientConfig, ConfigError> {
    let ip_list = |key: &str| -> Result<Option<Vec<String>>, ConfigError> { root.string_list(key) };
    let with_always_blocked = |mut ranges: Vec<String>| {
        ranges.extend(ALWAYS_BLOCKED_IPS.iter().map(|s| (*s).to_owned()));
        ranges
    };
    // The legacy federation-only blocklist, when present, replaces the general pair for
    // federation and comes without an allowlist; otherwise the general pair applies.
    let (blocklist, allowlist) = match ip_list("federation_ip_range_blacklist")? {
        Some(legacy) => {
            (IpRangeSet::parse(&with_always_blocked(legacy), "federation_ip_range_blacklist")?, IpRangeSet::default())
        }
        None => {
            let blocked = ip_list("ip_range_blacklist")?
                .unwrap_or_else(|| DEFAULT_IP_RANGE_BLOCKLIST.iter().map(|s| (*s).to_owned()).collect());
            (
                IpRangeSet::parse(&with_always_blocked(blocked), "ip_range_blacklist")?,
                IpRangeSet::parse(&ip_list("ip_range_whitelist")?.unwrap_or_default(), "ip_range_whitelist")?,
            )
        }
    };
    let custom_ca_files = match root.string_list("federation_custom_ca_list")? {
        Some(files) if files.is_empty() => {
            return Err(ConfigError::new("federation_custom_ca_list", "is set but lists no certificate files"));
        }
        files => files.map(|f| f.into_iter().map(PathBuf::from).collect()),
    };
    let minimum_tls_version = match root.scalar_text("federation_client_minimum_tls_version")?.as_deref() {
        None | Some("1") => TlsVersion::V1_0,
        Some("1.1") => TlsVersion::V1_1,
        Some("1.2") => TlsVersion::V1_2,
        Some("1.3") => TlsVersion::V1_3,
        Some(other) => {
            return Err(ConfigError::new(
                "federation_client_minimum_tls_version",
                format!("{other:?} is not one of 1, 1.1, 1.2, 1.3"),
            ));
        }
    };
    Ok(FederationClientConfig {
        verify_certificates: root.bool_or("federation_verify_certificates", true)?,
        domain_whitelist: root.string_list("federation_domain_whitelist")?,
        certificate_verification_whitelist: root
            .string_list("federation_certificate_verification_whitelist")?
            .unwrap_or_default(),
        ip_range_blocklist: blocklist,
        ip_range_allowlist: allowlist,
        custom_ca_files,
        minimum_tls_version,
    })
}

/// A set of CIDR ranges. An IPv4 range also covers that range's IPv4-compatible,
/// IPv4-mapped and 6to4 IPv6 forms, as Synapse adds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRangeSet {
    ranges: Vec<IpRange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpRange {
    network: IpAddr,
    prefix_len: u8,
}

impl IpRangeSet {
    /// The ranges as CIDR text (`10.0.0.0/8`), for clients that take them so.
    pub fn cidrs(&self) -> Vec<String> {
        self.ranges.iter().map(|r| format!("{}/{}", r.network, r.prefix_len)).collect()
    }

    pub fn parse(ranges: &[String], key: &str) -> Result<Self, ConfigError> {
        ranges
            .iter()
            .map(|text| IpRange::parse(text).ok_or_else(|| ConfigError::new(key, format!("invalid IP range {text:?}"))))
            .collect::<Result<Vec<_>, _>>()
            .map(|ranges| Self { ranges })
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let embedded_v4 = match address {
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) => embedded_ipv4(v6),
        };
        self.ranges
            .iter()
            .any(|range| range.contains(address) || embedded_v4.is_some_and(|v4| range.contains(IpAddr::V4(v4))))
    }
}

/// The IPv4 address inside an IPv4-compatible (`::a.b.c.d`), IPv4-mapped
/// (`::ffff:a.b.c.d`) or 6to4 (`2002:aabb:ccdd::/48`) IPv6 address.
fn embedded_ipv4(address: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = address.segments();
    let octets = address.octets();
    if segments[..5] == [0; 5] && (segments[5] == 0 || segments[5] == 0xffff) {
        // `::` and `::1` are IPv6 addresses in their own right, not IPv4-compatible ones.
        if segments[5] == 0 && segments[6] == 0 {
            return None;
        }
        return Some(Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]));
    }
    if segments[0] == 0x2002 {
        return Some(Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]));
    }
    None
}

impl IpRange {
    fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().ok()?;
        let max_len = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = prefix.unwrap_or(max_len);
        (prefix_len <= max_len).then_some(Self { network, prefix_len })
    }

    fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A 32-byte seed whose unpadded standard base64 is 43 characters.
    const SEED_B64: &str = "FCRCzVRq+8Qmd2nrCLOq02uCAdB+nqu2teOaZ6jtLmk";

    fn seed_bytes() -> [u8; 32] {
        decode_unpadded_base64(SEED_B64).unwrap().try_into().unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            Self { dir: tempfile::tempdir().unwrap() }
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
            path
        }

        fn base(&self) -> String {
            format!(
                r#"
server_name: "hs1.example"
report_stats: false
signing_key: "ed25519 a_key {SEED_B64}"
database:
  name: psycopg2
  args: {{user: synapse, password: pw, dbname: synapse, host: 127.0.0.1, port: 5432, cp_min: 5, sslmode: disable, keepalives_idle: 10}}
redis: {{enabled: true, host: 127.0.0.1, port: 6390}}
instance_map:
  main: {{host: 127.0.0.1, port: 9093}}
federation_sender_instances: [fedsend1, fedsend2]
"#
            )
        }

        fn load_with(&self, extra: &str) -> Result<WorkerConfig, ConfigError> {
            let path = self.write("homeserver.yaml", &format!("{}\n{extra}", self.base()));
            WorkerConfig::load(&[path], "fedsend1")
        }
    }

    fn refused_key(result: Result<WorkerConfig, ConfigError>) -> String {
        let error = result.expect_err("configuration should be refused");
        assert!(!error.reason.contains('\n'), "reason is one line: {error}");
        error.key
    }

    #[test]
    fn sender_settings_follow_synapse_defaults_and_overrides() {
        let fixture = Fixture::new();
        let defaults = fixture.load_with("").unwrap().sender;
        assert_eq!(
            defaults,
            SenderSettings {
                client_timeout_ms: 60_000,
                max_long_retry_delay_ms: 60_000,
                max_long_retries: 10,
                destination_min_retry_interval_ms: 600_000,
                destination_retry_multiplier: 2,
                destination_max_retry_interval_ms: 604_800_000,
                presence_enabled: true,
                allow_device_name_lookup_over_federation: false,
            }
        );
        let set = fixture
            .load_with(
                "federation: {client_timeout: 30s, max_long_retries: 2, max_long_retry_delay: 1500, \
                 destination_min_retry_interval: 5s, destination_retry_multiplier: 3, destination_max_retry_interval: 1d}\n\
                 presence: {enabled: false}\nallow_device_name_lookup_over_federation: true",
            )
            .unwrap()
            .sender;
        assert_eq!(set.client_timeout_ms, 30_000);
        assert_eq!(set.max_long_retries, 2);
        assert_eq!(set.max_long_retry_delay_ms, 1_500);
        assert_eq!(set.destination_min_retry_interval_ms, 5_000);
        assert_eq!(set.destination_retry_multiplier, 3);
        assert_eq!(set.destination_max_retry_interval_ms, 86_400_000);
        assert!(!set.presence_enabled);
        assert!(set.allow_device_name_lookup_over_federation);
        assert_eq!(refused_key(fixture.load_with("federation: {client_timeout: soon}")), "federation.client_timeout");
        assert!(!fixture.load_with("use_presence: false").unwrap().sender.presence_enabled);
    }

    #[test]
    fn a_complete_configuration_is_read() {
        let fixture = Fixture::new();
        let config = fixture.load_with("worker_replication_secret: repl-secret").unwrap();
        assert_eq!(config.server_name, "hs1.example");
        assert_eq!(config.instance_name, "fedsend1");
        assert_eq!(config.signing_key.key_id(), "ed25519:a_key");
        assert_eq!(config.signing_key.seed, seed_bytes());
        assert_eq!(config.database.user.as_deref(), Some("synapse"));
        assert_eq!(config.database.password.as_deref(), Some("pw"));
        assert_eq!(config.database.dbname.as_deref(), Some("synapse"));
        assert_eq!(config.database.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(config.database.port, Some(5432));
        assert_eq!(config.database.sslmode.as_deref(), Some("disable"));
        assert_eq!(config.database.other_args.get("keepalives_idle").map(String::as_str), Some("10"));
        assert!(!config.database.other_args.contains_key("cp_min"));
        assert_eq!(config.redis.host, "127.0.0.1");
        assert_eq!(config.redis.port, 6390);
        assert_eq!(config.federation_sender_instances, ["fedsend1", "fedsend2"]);
        assert_eq!(config.main_location(), &InstanceLocation::Tcp { host: "127.0.0.1".into(), port: 9093, tls: false });
        assert!(!config.instance_map.contains_key("main"));
        assert_eq!(config.replication_secret.as_deref(), Some("repl-secret"));
        assert_eq!(config.stream_writers.events, ["master"]);
        assert!(config.federation.verify_certificates);
        assert_eq!(config.federation.domain_whitelist, None);
        assert_eq!(config.federation.minimum_tls_version, TlsVersion::V1_0);
        let pg = config.database.to_pg_config().unwrap();
        assert_eq!(pg.get_user(), Some("synapse"));
        assert_eq!(pg.get_ports(), [5432]);
        assert!(format!("{config:?}").contains("<redacted>"));
        assert!(!format!("{config:?}").contains("\"pw\""));
    }

    #[test]
    fn later_files_replace_whole_top_level_sections() {
        let fixture = Fixture::new();
        let first = fixture.write("a.yaml", &fixture.base());
        let second = fixture.write(
            "b.yaml",
            "redis: {enabled: true, path: /run/redis.sock}\nworker_name: fedsend1\nworker_app: synapse.app.generic_worker\n",
        );
        let config = WorkerConfig::load(&[first, second], "fedsend1").unwrap();
        assert_eq!(config.redis.path.as_deref(), Some(Path::new("/run/redis.sock")));
        // The host and port of the first file's redis section are gone, not merged.
        assert_eq!(config.redis.host, "localhost");
        assert_eq!(config.redis.port, 6379);
    }

    #[test]
    fn the_default_signing_key_path_is_beside_the_last_config_file() {
        let fixture = Fixture::new();
        let base = fixture.base().replace(&format!("signing_key: \"ed25519 a_key {SEED_B64}\""), "");
        fixture.write(
            "hs1.example.signing.key",
            &format!("\ned25519 first {SEED_B64}\ned25519 second AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"),
        );
        let path = fixture.write("homeserver.yaml", &base);
        let config = WorkerConfig::load(std::slice::from_ref(&path), "fedsend1").unwrap();
        assert_eq!(config.signing_key.key_id(), "ed25519:first");
        assert_eq!(config.signing_key.seed, seed_bytes());

        fixture.write("hs1.example.signing.key", &format!("ed25519 first {SEED_B64}\nnot a key\n"));
        assert_eq!(refused_key(WorkerConfig::load(std::slice::from_ref(&path), "fedsend1")), "signing_key_path");
        fixture.write("hs1.example.signing.key", "\n\n");
        assert_eq!(refused_key(WorkerConfig::load(std::slice::from_ref(&path), "fedsend1")), "signing_key_path");
        std::fs::remove_file(fixture.dir.path().join("hs1.example.signing.key")).unwrap();
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "signing_key_path");
    }

    #[test]
    fn an_explicit_signing_key_path_is_used() {
        let fixture = Fixture::new();
        let key_path = fixture.write("k.key", &format!("ed25519 explicit {}\n", SEED_B64.replace('+', "-")));
        let base = fixture.base().replace(
            &format!("signing_key: \"ed25519 a_key {SEED_B64}\""),
            &format!("signing_key_path: {}", key_path.display()),
        );
        let path = fixture.write("homeserver.yaml", &base);
        let config = WorkerConfig::load(&[path], "fedsend1").unwrap();
        assert_eq!(config.signing_key.key_id(), "ed25519:explicit");
        // The URL-safe alphabet decodes to the same seed.
        assert_eq!(config.signing_key.seed, seed_bytes());
    }

    #[test]
    fn malformed_signing_keys_are_refused() {
        for bad in ["ed25519 v", "rsa v AAAA", "ed25519 v AAAA", "ed25519 v !!!!", "ed25519 v A"] {
            assert!(parse_signing_key_line(bad).is_err(), "{bad}");
        }
        let padded = parse_signing_key_line(&format!("ed25519 v {SEED_B64}=")).unwrap();
        assert_eq!(padded.seed, seed_bytes());
    }

    #[test]
    fn base64_decoding_matches_known_vectors() {
        assert_eq!(decode_unpadded_base64("").unwrap(), b"");
        assert_eq!(decode_unpadded_base64("Zg").unwrap(), b"f");
        assert_eq!(decode_unpadded_base64("Zm8").unwrap(), b"fo");
        assert_eq!(decode_unpadded_base64("Zm9v").unwrap(), b"foo");
        assert_eq!(decode_unpadded_base64("Zm9vYg==").unwrap(), b"foob");
        assert_eq!(decode_unpadded_base64("-_8").unwrap(), [0xfb, 0xff]);
        assert_eq!(decode_unpadded_base64("+/8").unwrap(), [0xfb, 0xff]);
        assert!(decode_unpadded_base64("Zm9vY").is_none());
    }

    #[test]
    fn sqlite_and_missing_databases_are_refused() {
        let fixture = Fixture::new();
        let sqlite = fixture.base().replace("name: psycopg2", "name: sqlite3");
        let path = fixture.write("homeserver.yaml", &sqlite);
        let error = WorkerConfig::load(&[path], "fedsend1").unwrap_err();
        assert_eq!(error.key, "database.name");
        assert!(error.reason.contains("SQLite"), "{error}");

        let unnamed = fixture.base().replace("name: psycopg2", "");
        let path = fixture.write("homeserver.yaml", &unnamed);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "database.name");

        let both = format!("{}\ndatabases: {{main: {{name: psycopg2}}}}\n", fixture.base());
        let path = fixture.write("homeserver.yaml", &both);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "databases");
    }

    #[test]
    fn the_multi_database_form_is_read_when_one_database_holds_everything() {
        let fixture = Fixture::new();
        let base = fixture.base();
        let start = base.find("database:").unwrap();
        let end = base.find("redis:").unwrap();
        let without_database = format!("{}{}", &base[..start], &base[end..]);
        let single = format!(
            "{without_database}\ndatabases:\n  db1: {{name: psycopg2, args: {{database: syn, host: /run/postgresql}}}}\n"
        );
        let path = fixture.write("homeserver.yaml", &single);
        let config = WorkerConfig::load(&[path], "fedsend1").unwrap();
        assert_eq!(config.database.dbname.as_deref(), Some("syn"));
        assert_eq!(config.database.host.as_deref(), Some("/run/postgresql"));

        let split = format!(
            "{without_database}\ndatabases:\n  a: {{name: psycopg2, data_stores: [main], args: {{}}}}\n  b: {{name: psycopg2, data_stores: [state], args: {{}}}}\n"
        );
        let path = fixture.write("homeserver.yaml", &split);
        let error = WorkerConfig::load(&[path], "fedsend1").unwrap_err();
        assert_eq!(error.key, "databases");
        assert!(error.reason.contains("state"), "{error}");

        let no_db = without_database;
        let path = fixture.write("homeserver.yaml", &no_db);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "database");
    }

    #[test]
    fn tls_to_postgres_is_refused_when_required() {
        let config = DatabaseConfig { sslmode: Some("require".into()), ..Default::default() };
        assert_eq!(config.to_pg_config().unwrap_err().key, "database.args.sslmode");
        let unix = DatabaseConfig { host: Some("/run/postgresql".into()), ..Default::default() };
        assert!(matches!(unix.to_pg_config().unwrap().get_hosts()[0], tokio_postgres::config::Host::Unix(_)));
    }

    #[test]
    fn redis_must_be_enabled_and_its_options_are_read() {
        let fixture = Fixture::new();
        let disabled = fixture.base().replace("enabled: true", "enabled: false");
        let path = fixture.write("homeserver.yaml", &disabled);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "redis.enabled");

        let password_file = fixture.write("redis.pw", "s3cret\n");
        let full = fixture.base().replace(
            "redis: {enabled: true, host: 127.0.0.1, port: 6390}",
            &format!(
                "redis: {{enabled: true, host: redis.internal, port: 6391, dbid: 2, use_tls: true, username: u, password_path: {}}}",
                password_file.display()
            ),
        );
        let path = fixture.write("homeserver.yaml", &full);
        let redis = WorkerConfig::load(&[path], "fedsend1").unwrap().redis;
        assert_eq!(
            (redis.host.as_str(), redis.port, redis.dbid, redis.use_tls),
            ("redis.internal", 6391, Some(2), true)
        );
        assert_eq!(redis.password.as_deref(), Some("s3cret"));
        assert_eq!(redis.username.as_deref(), Some("u"));

        let conflicting = fixture.base().replace(
            "redis: {enabled: true, host: 127.0.0.1, port: 6390}",
            "redis: {enabled: true, password: a, password_path: /nonexistent}",
        );
        let path = fixture.write("homeserver.yaml", &conflicting);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "redis.password_path");
    }

    #[test]
    fn sender_instances_must_include_this_instance() {
        let fixture = Fixture::new();
        let path = fixture.write("homeserver.yaml", &fixture.base());
        let error = WorkerConfig::load(&[path], "fedsend3").unwrap_err();
        assert_eq!(error.key, "federation_sender_instances");
        assert!(error.reason.contains("fedsend3"));

        let without = fixture.base().replace("federation_sender_instances: [fedsend1, fedsend2]", "");
        let path = fixture.write("homeserver.yaml", &without);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "federation_sender_instances");

        let legacy = format!("{without}\nsend_federation: false\n");
        let path = fixture.write("homeserver.yaml", &legacy);
        let config = WorkerConfig::load(&[path], "fedsend1").unwrap();
        assert_eq!(config.federation_sender_instances, ["fedsend1"]);

        let as_string = fixture.base().replace("[fedsend1, fedsend2]", "fedsend1");
        let path = fixture.write("homeserver.yaml", &as_string);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "federation_sender_instances");
    }

    #[test]
    fn unsupported_worker_settings_are_refused_by_name() {
        let fixture = Fixture::new();
        for (extra, key) in [
            ("outbound_federation_restricted_to: [fedsend1]", "outbound_federation_restricted_to"),
            ("worker_replication_host: 127.0.0.1", "worker_replication_host"),
            ("worker_replication_http_port: 9093", "worker_replication_http_port"),
            ("worker_replication_port: 9092", "worker_replication_port"),
            ("worker_replication_http_tls: true", "worker_replication_http_tls"),
            ("worker_replication_secret: a\nworker_replication_secret_path: /x", "worker_replication_secret_path"),
            ("federation_client_minimum_tls_version: 1.4", "federation_client_minimum_tls_version"),
            ("federation_custom_ca_list: []", "federation_custom_ca_list"),
            ("ip_range_whitelist: [not-an-ip]", "ip_range_whitelist"),
            ("stream_writers: {events: [writer9]}", "stream_writers.events"),
        ] {
            assert_eq!(refused_key(fixture.load_with(extra)), key, "{extra}");
        }
        // An empty restriction list is falsy in Synapse too.
        assert!(fixture.load_with("outbound_federation_restricted_to: []").is_ok());
        let error = fixture.load_with("outbound_federation_restricted_to: [fedsend1]").unwrap_err();
        assert!(error.reason.contains("not supported"), "{error}");
    }

    #[test]
    fn instance_map_main_is_required_and_renamed() {
        let fixture = Fixture::new();
        let without_main =
            fixture.base().replace("main: {host: 127.0.0.1, port: 9093}", "other: {path: /run/other.sock}");
        let path = fixture.write("homeserver.yaml", &without_main);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "instance_map.main");

        let unix_main = fixture.base().replace(
            "main: {host: 127.0.0.1, port: 9093}",
            "main: {path: /run/main.sock}\n  writer1: {host: w1, port: 9100, tls: true}",
        );
        let path =
            fixture.write("homeserver.yaml", &format!("{unix_main}\nstream_writers: {{events: [master, writer1]}}\n"));
        let config = WorkerConfig::load(&[path], "fedsend1").unwrap();
        assert_eq!(config.main_location(), &InstanceLocation::Unix { path: "/run/main.sock".into() });
        assert_eq!(config.instance_map["writer1"], InstanceLocation::Tcp { host: "w1".into(), port: 9100, tls: true });
        assert_eq!(config.stream_writers.events, ["master", "writer1"]);

        let quoted_port = fixture.base().replace("port: 9093", "port: \"9093\"");
        let path = fixture.write("homeserver.yaml", &quoted_port);
        assert_eq!(refused_key(WorkerConfig::load(&[path], "fedsend1")), "instance_map.main.port");
    }

    #[test]
    fn the_replication_secret_can_come_from_a_file() {
        let fixture = Fixture::new();
        let secret = fixture.write("secret", "  from-file \n");
        let config = fixture.load_with(&format!("worker_replication_secret_path: {}", secret.display())).unwrap();
        assert_eq!(config.replication_secret.as_deref(), Some("from-file"));
        assert_eq!(fixture.load_with("").unwrap().replication_secret, None);
    }

    #[test]
    fn federation_client_settings_follow_synapse_precedence() {
        let fixture = Fixture::new();
        let defaults = fixture.load_with("").unwrap().federation;
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let public: IpAddr = "8.8.8.8".parse().unwrap();
        assert!(defaults.ip_range_blocklist.contains(loopback));
        assert!(defaults.ip_range_blocklist.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(defaults.ip_range_blocklist.contains("2002:c0a8:0101::1".parse().unwrap()), "6to4 of 192.168.1.1");
        assert!(defaults.ip_range_blocklist.contains("::".parse().unwrap()));
        assert!(defaults.ip_range_blocklist.contains("0.0.0.0".parse().unwrap()));
        assert!(!defaults.ip_range_blocklist.contains(public));
        assert!(!defaults.ip_range_blocklist.contains("2001:4860::8888".parse().unwrap()));
        assert!(defaults.ip_range_allowlist.is_empty());

        let general = fixture
            .load_with("ip_range_blacklist: [8.8.8.0/24]\nip_range_whitelist: [127.0.0.1]\nfederation_verify_certificates: false\nfederation_domain_whitelist: [a.example, b.example]\nfederation_client_minimum_tls_version: 1.2\nfederation_custom_ca_list: [ca.pem]")
            .unwrap()
            .federation;
        assert!(general.ip_range_blocklist.contains(public));
        assert!(!general.ip_range_blocklist.contains(loopback), "an explicit list replaces the default");
        assert!(general.ip_range_allowlist.contains(loopback));
        assert!(!general.verify_certificates);
        assert_eq!(general.domain_whitelist, Some(vec!["a.example".to_owned(), "b.example".to_owned()]));
        assert_eq!(general.minimum_tls_version, TlsVersion::V1_2);
        assert_eq!(general.custom_ca_files, Some(vec![PathBuf::from("ca.pem")]));

        let legacy = fixture
            .load_with("ip_range_blacklist: [8.8.8.0/24]\nip_range_whitelist: [127.0.0.1]\nfederation_ip_range_blacklist: [10.0.0.0/8]")
            .unwrap()
            .federation;
        assert!(legacy.ip_range_blocklist.contains("10.9.9.9".parse().unwrap()));
        assert!(!legacy.ip_range_blocklist.contains(public));
        assert!(legacy.ip_range_allowlist.is_empty(), "the legacy key comes without an allowlist");
    }

    #[test]
    fn sharding_vectors_match_synapse() {
        let fixture = Fixture::new();
        let config = fixture.load_with("").unwrap();
        assert_eq!(config.federation_sender_instances.len(), 2);
        let expected = [("matrix.org", [1, 2, 3, 4]), ("example.com", [1, 0, 3, 1]), ("localhost:8482", [0, 1, 0, 3])];
        for (destination, owners) in expected {
            for (count, owner) in (2..=5).zip(owners) {
                let instances: Vec<String> = (0..count).map(|i| format!("fedsend{i}")).collect();
                for (index, instance) in instances.iter().enumerate() {
                    assert_eq!(
                        fedsend_core::should_handle(&instances, instance, destination),
                        index == owner,
                        "{destination} with {count} instances belongs to #{owner}"
                    );
                }
            }
        }
        // And through the loaded configuration (two instances: matrix.org → index 1).
        assert!(!config.should_handle("matrix.org"));
        assert!(config.should_handle("localhost:8482"));
    }

    #[test]
    fn non_map_documents_are_skipped_and_server_name_is_required() {
        let fixture = Fixture::new();
        let empty = fixture.write("empty.yaml", "");
        let list = fixture.write("list.yaml", "- a\n- b\n");
        let main = fixture.write("homeserver.yaml", &fixture.base());
        assert!(WorkerConfig::load(&[main, empty.clone(), list], "fedsend1").is_ok());
        assert_eq!(refused_key(WorkerConfig::load(&[empty], "fedsend1")), "server_name");
        let broken = fixture.write("broken.yaml", "a: [\n");
        assert_eq!(refused_key(WorkerConfig::load(&[broken], "fedsend1")), "config");
        assert_eq!(refused_key(WorkerConfig::load(&[], "fedsend1")), "config");
        let main = fixture.write("homeserver.yaml", &fixture.base());
        assert_eq!(refused_key(WorkerConfig::load(&[main], "master")), "worker_name");
    }
}
