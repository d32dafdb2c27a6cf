//! `fedsend synapse`: fedsend as a `federation_sender` instance of a Synapse deployment on
//! PostgreSQL and Redis, in place of Synapse's own Python sender.
//!
//! It reads Synapse's configuration files, follows the replication stream on Redis
//! ([`feed`]), and answers the core's storage boundary from Synapse's tables ([`store`]); the
//! driver, the core (native or in wasmtime), the HTTPS transport and the operations API are
//! those of `fedsend serve`. The README says how an operator switches a deployment over.

pub mod feed;
pub mod presence;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedsend_core::{Config, ServerName};
use fedsend_synapse::config::{DatabaseConfig, TlsVersion, WorkerConfig};
use fedsend_synapse::pg::{DeviceListOptions, Ownership, PgArgs, PgError, SchemaVersion, SynapseDb};
use fedsend_synapse::redis_link::{ExternalCache, RedisLink, RedisLinkConfig};
use fedsend_synapse::replication::{ReplicationState, Stream};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::serve::config::EngineKind;
use crate::serve::driver::DriverOptions;
use crate::serve::slots::SlotLimits;
use crate::serve::{ApiSettings, init_logging, make_engine, start_parts, wait_for_signal};
use crate::transport::{HttpsTransport, TransportConfig};
use crate::transport::{IpNet, default_denylist};
use feed::Feeder;
use store::{AnnouncedEvents, SynapseStore};

/// Command-line arguments of `fedsend synapse`.
#[derive(Debug, clap::Args)]
pub struct SynapseArgs {
    /// Synapse's configuration files, merged in order as Synapse merges them (e.g. the shared
    /// homeserver.yaml, then a worker file).
    #[arg(long, short, required = true)]
    pub config: Vec<PathBuf>,
    /// This instance's name: one of `federation_sender_instances`.
    #[arg(long)]
    pub instance: String,
    /// Address of `/health`, `/metrics` and the destinations API.
    #[arg(long, default_value = "127.0.0.1:9109")]
    pub listen: SocketAddr,
    /// File holding the bearer token of the destinations API (first line); without it the
    /// API gets a random token and only `/health` and `/metrics` are usable.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Run the core natively or in wasmtime.
    #[arg(long, value_parser = ["native", "wasm"], default_value = "native")]
    pub engine: String,
}

/// How long start-up waits for PostgreSQL before giving up, and how often it asks.
const DATABASE_WAIT: Duration = Duration::from_secs(60);
const DATABASE_RETRY: Duration = Duration::from_secs(2);

fn pg_args(database: &DatabaseConfig) -> PgArgs {
    let defaults = PgArgs::from_psycopg2(&serde_json::json!({})).expect("empty arguments take every default");
    PgArgs {
        host: database.host.clone().unwrap_or(defaults.host),
        port: database.port.unwrap_or(defaults.port),
        user: database.user.clone().unwrap_or(defaults.user),
        password: database.password.clone(),
        dbname: database.dbname.clone().unwrap_or(defaults.dbname),
        pool_size: defaults.pool_size,
    }
}

fn random_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    // Without /dev/urandom the API is still protected by a token nobody knows.
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn core_config_json(worker: &WorkerConfig, server_name: ServerName) -> Result<String, String> {
    let mut config = Config::new(server_name);
    config.instance_name = worker.instance_name.clone();
    config.instances = worker.federation_sender_instances.clone();
    let sender = &worker.sender;
    config.request_timeout_ms = sender.client_timeout_ms.max(1);
    config.http_retries_max = sender.max_long_retries;
    config.http_retry_delay_max_ms = sender.max_long_retry_delay_ms.max(1);
    config.retry_interval_min_ms = sender.destination_min_retry_interval_ms.max(1);
    config.retry_multiplier = sender.destination_retry_multiplier.max(1);
    config.retry_interval_max_ms = sender.destination_max_retry_interval_ms.max(config.retry_interval_min_ms);
    config.presence_enabled = sender.presence_enabled;
    if let Some(allowed) = &worker.federation.domain_whitelist {
        let names = allowed.iter().map(|name| {
            ServerName::parse(name).map_err(|e| format!("federation_domain_whitelist entry {name:?}: {e}"))
        });
        config.domain_whitelist = Some(names.collect::<Result<_, String>>()?);
    }
    config.validate().map_err(|e| e.to_string())?;
    serde_json::to_string(&config).map_err(|e| e.to_string())
}

fn make_transport(worker: &WorkerConfig) -> Result<HttpsTransport, String> {
    let key_id = worker.signing_key.key_id();
    let key = fedsend_sign::SigningKey::generate_from_seed_bytes(&key_id, worker.signing_key.seed)
        .map_err(|e| format!("signing key: {e}"))?;
    let mut transport = TransportConfig::new(worker.server_name.clone(), key);
    let federation = &worker.federation;
    transport.verify_tls = federation.verify_certificates;
    transport.extra_ca_file = federation.custom_ca_files.as_ref().and_then(|files| files.first().cloned());
    // The transport's own denylist covers Synapse's default blocklist and more; Synapse's
    // allowlist opens holes in it.
    transport.ip_denylist_enabled = true;
    transport.ip_allowlist = federation
        .ip_range_allowlist
        .cidrs()
        .iter()
        .map(|range| range.parse().map_err(|e| format!("ip_range_whitelist entry {range:?}: {e}")))
        .collect::<Result<_, String>>()?;
    HttpsTransport::new(transport).map_err(|e| format!("transport: {e}"))
}

/// Waits for PostgreSQL (it may start after us) and checks that we know its schema.
async fn connect_database(
    worker: &WorkerConfig,
    server_name: ServerName,
) -> Result<(SynapseDb, SchemaVersion), String> {
    let db = SynapseDb::connect(&pg_args(&worker.database), server_name).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + DATABASE_WAIT;
    loop {
        match db.check_schema().await {
            Ok(schema) => {
                if let Some(why) = schema.refusal() {
                    return Err(format!("database schema: {why}"));
                }
                return Ok((db, schema));
            }
            Err(e @ PgError::Unavailable(_)) if tokio::time::Instant::now() < deadline => {
                warn!("PostgreSQL not reachable yet ({e}); retrying");
                tokio::time::sleep(DATABASE_RETRY).await;
            }
            Err(e) => return Err(format!("database: {e}")),
        }
    }
}

async fn run_worker(args: SynapseArgs, worker: WorkerConfig) -> Result<(), String> {
    let server_name =
        ServerName::parse(&worker.server_name).map_err(|e| format!("server_name {:?}: {e}", worker.server_name))?;
    let (db, schema) = connect_database(&worker, server_name.clone()).await?;
    info!(version = schema.version, compat = ?schema.compat_version, "Synapse database schema accepted");
    let ownership =
        Ownership { instance: worker.instance_name.clone(), instances: worker.federation_sender_instances.clone() };
    let devices = DeviceListOptions { share_display_names: worker.sender.allow_device_name_lookup_over_federation };
    // Receipts travel in their rows; ones replication lost are read back from the database
    // (a gap), so the stream must start where the database is, not at zero.
    let receipts_position =
        db.receipts_position().await.map_err(|e| format!("database: reading the receipts position: {e}"))?;
    let mut replication = ReplicationState::new(&worker.instance_name);
    replication.seed_floor(Stream::Receipts, receipts_position);
    let link = RedisLink::spawn(RedisLinkConfig::new(&worker, 0), replication).map_err(|e| format!("redis: {e}"))?;
    let cache = ExternalCache::new(&worker.redis).map_err(|e| format!("redis: {e}"))?;
    let announced = AnnouncedEvents::default();
    let store =
        SynapseStore::new(db.clone(), ownership.clone(), devices, cache, link.publisher.clone(), announced.clone());
    let (core_events_tx, core_events) = mpsc::unbounded_channel();
    let options = DriverOptions {
        core_config_json: core_config_json(&worker, server_name.clone())?,
        slot_limits: SlotLimits {
            in_flight_max: 64,
            per_host_max: 8,
            slow_after: Duration::from_secs(5),
            slow_max: 1024,
        },
        events: Some(core_events_tx),
    };
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        None => random_token(),
    };
    let api = ApiSettings {
        listen: args.listen,
        token,
        server_name: server_name.clone(),
        body_bytes_max: 1024 * 1024,
        edu_bytes_max: 64 * 1024,
    };
    let engine_kind = if args.engine == "wasm" { EngineKind::Wasm } else { EngineKind::Native };
    let engine = make_engine(engine_kind, None)?;
    let transport = make_transport(&worker)?;
    let running = start_parts(&options, api, engine, Box::new(store), Arc::new(transport)).await?;
    // Read by tests and scripts.
    println!("listening on {}", running.local_addr);
    info!(instance = worker.instance_name, instances = ?worker.federation_sender_instances, "federation sender running");
    let (stop, stopped) = watch::channel(false);
    let mut link = link;
    let link_events = std::mem::replace(&mut link.events, mpsc::channel(1).1);
    let feeder = Feeder::new(
        db,
        ownership,
        devices,
        worker.server_name.clone(),
        running.handle.clone(),
        link.publisher.clone(),
        worker.instance_map.clone(),
        worker.replication_secret.clone(),
        Arc::clone(&running.metrics),
        announced,
    );
    let feeding = tokio::spawn(feeder.run(link_events, core_events, stopped));
    wait_for_signal().await;
    info!("shutting down");
    let _ = stop.send(true);
    let _ = feeding.await;
    link.shutdown();
    running.stop().await;
    Ok(())
}

/// Whether the transport's denylist already refuses every address of `range` (`a.b.c.d/n`).
fn covered_by_denylist(range: &str) -> bool {
    let Some((address, prefix_len)) = range.split_once('/') else { return false };
    let (Ok(address), Ok(prefix_len)) = (address.parse::<std::net::IpAddr>(), prefix_len.parse::<u8>()) else {
        return false;
    };
    default_denylist().any(|deny| {
        let wider =
            deny.split_once('/').and_then(|(_, len)| len.parse::<u8>().ok()).is_some_and(|len| len <= prefix_len);
        wider && deny.parse::<IpNet>().is_ok_and(|net| net.contains(address))
    })
}

/// Federation client settings this sender cannot honour yet. Each is refused with a reason
/// rather than ignored: ignoring would make the sender weaker (a blocklist not enforced) or
/// fail in ways the operator did not ask for.
fn refuse_unsupported(worker: &WorkerConfig) -> Result<(), String> {
    let federation = &worker.federation;
    if let Some(range) = federation.ip_range_blocklist.cidrs().into_iter().find(|range| !covered_by_denylist(range)) {
        return Err(format!(
            "ip_range_blacklist / federation_ip_range_blacklist: {range} is outside fedsend's own denylist, which is \
             what it enforces (Synapse's default ranges and more, with ip_range_whitelist as exceptions)"
        ));
    }
    if federation.custom_ca_files.as_ref().is_some_and(|files| files.len() > 1) {
        return Err(
            "federation_custom_ca_list: fedsend takes one CA file; concatenate the certificates into one".into()
        );
    }
    if federation.minimum_tls_version == TlsVersion::V1_3 {
        return Err(
            "federation_client_minimum_tls_version 1.3 is not supported yet (fedsend allows TLS 1.2 and 1.3)".into()
        );
    }
    if !federation.certificate_verification_whitelist.is_empty() {
        return Err("federation_certificate_verification_whitelist is not supported: fedsend verifies every \
                    certificate unless federation_verify_certificates is false"
            .into());
    }
    Ok(())
}

/// `fedsend synapse`: runs until SIGTERM or Ctrl-C.
pub fn run(args: SynapseArgs) -> Result<(), String> {
    init_logging();
    let worker = WorkerConfig::load(&args.config, &args.instance).map_err(|e| e.to_string())?;
    refuse_unsupported(&worker)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    // On a worker thread: the store's synchronous calls step out of the runtime there.
    runtime.block_on(async move { tokio::spawn(run_worker(args, worker)).await.map_err(|e| e.to_string())? })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_B64: &str = "FCRCzVRq+8Qmd2nrCLOq02uCAdB+nqu2teOaZ6jtLmk";

    fn load(extra: &str) -> Result<WorkerConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("homeserver.yaml");
        let text = format!(
            "server_name: hs1.example\nsigning_key: \"ed25519 a {SEED_B64}\"\n\
             database: {{name: psycopg2, args: {{user: synapse, dbname: synapse, host: 127.0.0.1}}}}\n\
             redis: {{enabled: true}}\ninstance_map: {{main: {{host: 127.0.0.1, port: 9093}}}}\n\
             federation_sender_instances: [fedsend1, fedsend2]\n{extra}\n"
        );
        std::fs::write(&path, text).unwrap();
        WorkerConfig::load(&[path], "fedsend1").map_err(|e| e.to_string())
    }

    #[test]
    fn synapse_sender_settings_become_the_core_config() {
        let worker = load(
            "federation: {client_timeout: 20s, max_long_retries: 2, max_long_retry_delay: 1s, \
             destination_min_retry_interval: 5s, destination_retry_multiplier: 3}\n\
             presence: {enabled: false}\nfederation_domain_whitelist: [a.example, b.example]",
        )
        .unwrap();
        let json = core_config_json(&worker, ServerName::parse("hs1.example").unwrap()).unwrap();
        let config: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(config.instance_name, "fedsend1");
        assert_eq!(config.instances, ["fedsend1", "fedsend2"]);
        assert_eq!(config.request_timeout_ms, 20_000);
        assert_eq!(config.http_retries_max, 2);
        assert_eq!(config.http_retry_delay_max_ms, 1_000);
        assert_eq!(config.retry_interval_min_ms, 5_000);
        assert_eq!(config.retry_multiplier, 3);
        assert!(!config.presence_enabled);
        let allowed: Vec<&str> = config.domain_whitelist.iter().flatten().map(ServerName::as_str).collect();
        assert_eq!(allowed, ["a.example", "b.example"]);
    }

    #[test]
    fn settings_fedsend_cannot_honour_are_refused_with_the_key() {
        assert!(refuse_unsupported(&load("").unwrap()).is_ok(), "Synapse's defaults are accepted");
        assert!(refuse_unsupported(&load("ip_range_whitelist: ['127.0.0.1']").unwrap()).is_ok());
        assert!(refuse_unsupported(&load("ip_range_blacklist: ['10.0.0.0/8', '10.1.0.0/16']").unwrap()).is_ok());
        for (extra, key) in [
            ("ip_range_blacklist: ['10.0.0.0/8', '8.8.8.0/24']", "ip_range_blacklist"),
            ("federation_custom_ca_list: [a.pem, b.pem]", "federation_custom_ca_list"),
            ("federation_client_minimum_tls_version: 1.3", "federation_client_minimum_tls_version"),
            (
                "federation_certificate_verification_whitelist: ['*.example']",
                "federation_certificate_verification_whitelist",
            ),
        ] {
            let error = refuse_unsupported(&load(extra).unwrap()).expect_err(extra);
            assert!(error.contains(key) && !error.contains('\n'), "{extra}: {error}");
        }
        // Refused by the configuration reader already, naming the key.
        for (extra, key) in [
            ("database: {name: sqlite3, args: {database: x.db}}", "database"),
            ("outbound_federation_restricted_to: [fedsend1]", "outbound_federation_restricted_to"),
        ] {
            let error = load(extra).expect_err(extra);
            assert!(error.contains(key), "{extra}: {error}");
        }
    }
}
