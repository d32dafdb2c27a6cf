//! `fedsend serve`: the standalone federation sender service.
//!
//! - [`config`]: the TOML file (`docs/serve-config.md` lists every key);
//! - [`store`]: SQLite (and in-memory) storage of the core's sender-owned state and of the
//!   homeserver-owned facts the core queries;
//! - [`driver`]: the single-owner tokio task around the engine;
//! - [`api`]: the ingest API, `/metrics`, `/health`;
//! - [`ingest_server`]: the API's accept loop, connection cap and read timeouts;
//! - [`metrics`]: Prometheus metrics;
//! - [`client`]: a minimal ingest API client (demo, tests).

pub mod api;
pub mod client;
pub mod config;
pub mod driver;
pub mod ingest_server;
pub mod metrics;
pub mod slots;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedsend_core::ServerName;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::transport::{HttpsTransport, TransportConfig};
use crate::wasm_engine::{WasmEngine, locate_guest};
use config::{EngineKind, ServeConfig};
use driver::{DriverOptions, EngineChoice, Transport};
use ingest_server::IngestLimits;
use metrics::Metrics;
use store::SqliteStore;

/// Command-line arguments of `fedsend serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The TOML configuration file (see docs/serve-config.md).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Overrides `engine` in the file.
    #[arg(long, value_parser = ["native", "wasm"])]
    pub engine: Option<String>,
}

/// Builds the engine of `kind`.
pub fn make_engine(kind: EngineKind, wasm_path: Option<&Path>) -> Result<EngineChoice, String> {
    Ok(match kind {
        EngineKind::Native => EngineChoice::Native,
        EngineKind::Wasm => {
            let path = locate_guest(wasm_path).map_err(|e| e.to_string())?;
            EngineChoice::Wasm(Box::new(WasmEngine::from_file(&path).map_err(|e| format!("wasm engine: {e}"))?))
        }
    })
}

/// Reads the signing key file (Synapse format).
pub fn load_signing_key(path: &Path) -> Result<fedsend_sign::SigningKey, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read signing key file {}: {e}", path.display()))?;
    fedsend_sign::SigningKey::parse_synapse_key_file(&text)
        .map_err(|e| format!("signing key file {}: {e}", path.display()))
}

/// Builds the HTTPS transport from the config.
pub fn make_transport(config: &ServeConfig, key: fedsend_sign::SigningKey) -> Result<HttpsTransport, String> {
    let section = &config.transport;
    let mut transport = TransportConfig::new(config.server_name.clone(), key);
    transport.connect_timeout_ms = section.connect_timeout_ms;
    transport.request_timeout_ms = section.request_timeout_ms;
    transport.verify_tls = section.verify_tls;
    transport.extra_ca_file = section.extra_ca_file.clone();
    transport.ip_denylist_enabled = section.ip_denylist_enabled;
    transport.ip_allowlist = section
        .ip_allowlist
        .iter()
        .map(|range| range.parse().map_err(|e| format!("[transport] ip_allowlist entry {range:?}: {e}")))
        .collect::<Result<_, String>>()?;
    transport.dns_nameserver = section.dns_nameserver;
    transport.well_known_port = section.well_known_port;
    HttpsTransport::new(transport).map_err(|e| format!("transport: {e}"))
}

/// A running service: its API address and how to stop it.
#[derive(Debug)]
pub struct Running {
    /// Where the ingest API listens.
    pub local_addr: SocketAddr,
    /// Feeds the driver (worker mode feeds what replication announces).
    pub handle: driver::DriverHandle,
    /// The metrics and health state the API serves (worker mode reports its own reads' problems).
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting requests, stops the driver and waits for both.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.driver.await;
        let _ = self.server.await;
    }
}

/// Starts the driver and the API with explicit parts (the demo and tests use this).
pub async fn start(
    config: &ServeConfig,
    engine: EngineChoice,
    store: Box<dyn store::Store>,
    transport: Arc<dyn Transport>,
    token: String,
) -> Result<Running, String> {
    let server_name = ServerName::parse(&config.server_name).map_err(|e| e.to_string())?;
    let options = DriverOptions {
        core_config_json: config.core_config_json()?,
        slot_limits: slots::SlotLimits {
            in_flight_max: config.transport.sends_in_flight_max,
            per_host_max: config.transport.sends_per_host_max,
            slow_after: std::time::Duration::from_millis(config.transport.slow_send_after_ms),
            slow_max: config.transport.slow_sends_max,
        },
        events: None,
    };
    let api = ApiSettings {
        listen: config.ingest.listen,
        token,
        server_name,
        body_bytes_max: config.ingest.body_bytes_max,
        edu_bytes_max: config.ingest.edu_bytes_max,
    };
    let limits = IngestLimits {
        connections_max: config.ingest.connections_max,
        header_read_timeout: std::time::Duration::from_millis(config.ingest.header_read_timeout_ms),
        body_read_timeout: std::time::Duration::from_millis(config.ingest.body_read_timeout_ms),
    };
    start_parts_with_limits(&options, api, limits, engine, store, transport).await
}

/// What the HTTP API needs besides the driver.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Address of the API, `/metrics` and `/health`.
    pub listen: SocketAddr,
    /// Bearer token of the API.
    pub token: String,
    /// Our server name.
    pub server_name: ServerName,
    /// Largest request body accepted.
    pub body_bytes_max: usize,
    /// Largest EDU content accepted.
    pub edu_bytes_max: usize,
}

/// Starts the driver and the API from their parts (worker mode), with the default
/// [`IngestLimits`].
pub async fn start_parts(
    options: &DriverOptions,
    api: ApiSettings,
    engine: EngineChoice,
    store: Box<dyn store::Store>,
    transport: Arc<dyn Transport>,
) -> Result<Running, String> {
    start_parts_with_limits(options, api, IngestLimits::default(), engine, store, transport).await
}

/// Starts the driver and the API from their parts, the API held to `limits`.
pub async fn start_parts_with_limits(
    options: &DriverOptions,
    api: ApiSettings,
    limits: IngestLimits,
    engine: EngineChoice,
    store: Box<dyn store::Store>,
    transport: Arc<dyn Transport>,
) -> Result<Running, String> {
    let metrics = Arc::new(Metrics::new());
    let listener = TcpListener::bind(api.listen).await.map_err(|e| format!("cannot listen on {}: {e}", api.listen))?;
    let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (driver, handle) =
        driver::start(engine, store, transport, Arc::clone(&metrics), options, shutdown_rx.clone()).await?;
    let state = Arc::new(api::ApiState {
        driver: handle.clone(),
        metrics: Arc::clone(&metrics),
        token: api.token,
        server_name: api.server_name,
        body_bytes_max: api.body_bytes_max,
        edu_bytes_max: api.edu_bytes_max,
        body_read_timeout: limits.body_read_timeout,
    });
    let app = api::router(state);
    let server = tokio::spawn(ingest_server::serve(listener, app, limits, shutdown_rx));
    info!(%local_addr, "ingest API listening");
    Ok(Running { local_addr, handle, metrics, shutdown, driver, server })
}

/// `fedsend serve`: runs until SIGTERM or Ctrl-C.
pub fn run(args: &ServeArgs) -> Result<(), String> {
    init_logging();
    let mut config = ServeConfig::load(&args.config)?;
    if let Some(engine) = &args.engine {
        config.engine = if engine == "wasm" { EngineKind::Wasm } else { EngineKind::Native };
    }
    for risk in config.risky_settings() {
        warn!("risky setting: {risk}");
    }
    let token = config.ingest_token()?;
    let key = load_signing_key(&config.signing_key_file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let transport = make_transport(&config, key)?;
        let engine = make_engine(config.engine, config.wasm_path.as_deref())?;
        let store = SqliteStore::open(&config.database).map_err(|e| e.to_string())?;
        info!(database = %config.database.display(), engine = ?config.engine, "starting");
        let running = start(&config, engine, Box::new(store), Arc::new(transport), token).await?;
        // Watching before announcing the address: whoever read it may send SIGTERM at once,
        // and before the handler is in place that would kill the process uncleanly.
        let stop = watch_for_signal();
        // Read by tests and scripts that start on port 0.
        println!("listening on {}", running.local_addr);
        stop.await;
        info!("shutting down");
        running.stop().await;
        Ok(())
    })
}

/// Waits for SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    watch_for_signal().await;
}

/// Starts watching for SIGTERM and SIGINT (Ctrl-C) now, so that from this call on they stop
/// the service cleanly; the future completes on the first of them.
pub fn watch_for_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                error!("cannot watch SIGTERM and SIGINT ({e}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: log files and collectors get plain key=value.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
