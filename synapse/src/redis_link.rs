//! The Redis side of Synapse replication: one connection subscribed to the channel named
//! after the server, another publishing on it, re-established with capped exponential backoff.
//!
//! On every (re)connection the subscription comes first, so that nothing published in answer
//! to our `REPLICATE` can be missed; then `REPLICATE` asks every instance to announce its
//! stream positions, and this instance announces its own.
//!
//! The only stream a federation sender writes is `caches`: when it changes a destination's
//! retry timings it records a cache invalidation in the database and publishes it as RDATA,
//! so that the other processes drop their cached copy. Synapse processes announce the
//! position of every stream they write when they connect and whenever they see `REPLICATE`;
//! doing the same for `caches` lets any process that missed one of our invalidation rows
//! notice the gap and read it back from the database.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{RedisConfig, WorkerConfig};
use crate::replication::{Command, ReplicationState, Token, Update};

/// Synapse's Redis keepalive period.
const DEFAULT_PING_INTERVAL_MS: u64 = 30_000;
/// Synapse's reconnecting factory never waits longer than this between attempts.
const DEFAULT_MAX_BACKOFF_MS: u64 = 5_000;
const DEFAULT_INITIAL_BACKOFF_MS: u64 = 100;
const EVENT_QUEUE_CAPACITY: usize = 4096;

/// How much of a skipped replication line, and of the reason (which may quote it), is logged:
/// whoever can publish on the channel must not be able to write without bound into every
/// instance's log.
const LOGGED_CHARS_MAX: usize = 300;

/// The first [`LOGGED_CHARS_MAX`] characters of `text` (all of it when shorter).
fn log_prefix(text: &str) -> &str {
    text.char_indices().nth(LOGGED_CHARS_MAX).map_or(text, |(end, _)| &text[..end])
}

#[derive(Debug)]
pub enum RedisLinkError {
    /// Synapse can talk TLS to Redis; this build cannot.
    TlsUnsupported,
    Redis(redis::RedisError),
    /// Nothing is connected right now; Synapse drops outgoing commands in that state too.
    NotConnected,
    /// A cached value that is not what Synapse writes under that key.
    BadCacheValue {
        key: String,
        reason: String,
    },
}

impl std::fmt::Display for RedisLinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TlsUnsupported => {
                write!(f, "`redis.use_tls`: TLS to Redis is not supported by this build of fedsend")
            }
            Self::Redis(e) => write!(f, "redis: {e}"),
            Self::NotConnected => write!(f, "not connected to redis"),
            Self::BadCacheValue { key, reason } => write!(f, "redis key {key}: {reason}"),
        }
    }
}

impl std::error::Error for RedisLinkError {}

impl From<redis::RedisError> for RedisLinkError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

/// Connection parameters as Synapse applies them: a Unix socket path wins over host and port.
pub fn connection_info(redis: &RedisConfig) -> Result<redis::ConnectionInfo, RedisLinkError> {
    if redis.use_tls {
        return Err(RedisLinkError::TlsUnsupported);
    }
    let address = match &redis.path {
        Some(path) => ConnectionAddr::Unix(path.clone()),
        None => ConnectionAddr::Tcp(redis.host.clone(), redis.port),
    };
    let mut settings = RedisConnectionInfo::default().set_db(redis.dbid.unwrap_or(0));
    if let Some(username) = &redis.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &redis.password {
        settings = settings.set_password(password);
    }
    Ok(address.into_connection_info()?.set_redis_settings(settings))
}

#[derive(Debug, Clone)]
pub struct RedisLinkConfig {
    /// Also the name of the Redis channel.
    pub server_name: String,
    pub instance_name: String,
    pub redis: RedisConfig,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub ping_interval_ms: u64,
    /// The highest `caches` stream id this instance has written, announced on connection.
    pub caches_position: Token,
}

impl RedisLinkConfig {
    pub fn new(worker: &WorkerConfig, caches_position: Token) -> Self {
        Self {
            server_name: worker.server_name.clone(),
            instance_name: worker.instance_name.clone(),
            redis: worker.redis.clone(),
            initial_backoff_ms: DEFAULT_INITIAL_BACKOFF_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            ping_interval_ms: DEFAULT_PING_INTERVAL_MS,
            caches_position,
        }
    }
}

/// What the link tells its owner, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// Subscribed again. After a reconnection (`reconnection: true`) anything published
    /// meanwhile was lost: the POSITIONs that follow report the gaps to fill.
    Connected {
        reconnection: bool,
    },
    Disconnected,
    Update(Update),
}

/// Publishes on the replication channel through the link's current publishing connection.
#[derive(Clone)]
pub struct Publisher {
    channel: String,
    instance_name: String,
    connection: watch::Receiver<Option<MultiplexedConnection>>,
    caches_position: Arc<AtomicI64>,
}

impl Publisher {
    pub async fn publish(&self, command: &Command) -> Result<(), RedisLinkError> {
        let connection = self.connection.borrow().clone();
        let mut connection = connection.ok_or(RedisLinkError::NotConnected)?;
        publish_line(&mut connection, &self.channel, &command.to_line()).await
    }

    /// Tells the main process this instance has handled the `federation` stream up to `token`.
    pub async fn federation_ack(&self, token: Token) -> Result<(), RedisLinkError> {
        self.publish(&Command::FederationAck { instance: self.instance_name.clone(), token }).await
    }

    /// Tells every process that `server` answers again, so they stop backing off from it.
    pub async fn remote_server_up(&self, server: &str) -> Result<(), RedisLinkError> {
        self.publish(&Command::RemoteServerUp { server: server.to_owned() }).await
    }

    /// Announces a cache invalidation already committed to
    /// `cache_invalidation_stream_by_instance` under `stream_id`.
    pub async fn cache_invalidated(
        &self,
        stream_id: Token,
        cache_func: &str,
        keys: Option<&[Value]>,
        invalidation_ts_ms: i64,
    ) -> Result<(), RedisLinkError> {
        self.caches_position.fetch_max(stream_id, Ordering::SeqCst);
        let row = serde_json::json!([cache_func, keys, invalidation_ts_ms]);
        self.publish(&Command::Rdata {
            stream: "caches".to_owned(),
            instance: self.instance_name.clone(),
            token: Some(stream_id),
            row,
        })
        .await
    }

    pub fn caches_position(&self) -> Token {
        self.caches_position.load(Ordering::SeqCst)
    }
}

async fn publish_line(connection: &mut MultiplexedConnection, channel: &str, line: &str) -> Result<(), RedisLinkError> {
    let _receivers: i64 = connection.publish(channel, line).await?;
    Ok(())
}

/// The running link: its events, a publisher, and the replication state it updates.
pub struct RedisLink {
    pub events: mpsc::Receiver<LinkEvent>,
    pub publisher: Publisher,
    pub state: Arc<Mutex<ReplicationState>>,
    task: JoinHandle<()>,
}

impl RedisLink {
    /// Starts connecting in the background; must be called inside a tokio runtime.
    pub fn spawn(config: RedisLinkConfig, state: ReplicationState) -> Result<Self, RedisLinkError> {
        let client = redis::Client::open(connection_info(&config.redis)?)?;
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE_CAPACITY);
        let (connection_tx, connection_rx) = watch::channel(None);
        let caches_position = Arc::new(AtomicI64::new(config.caches_position));
        let state = Arc::new(Mutex::new(state));
        let publisher = Publisher {
            channel: config.server_name.clone(),
            instance_name: config.instance_name.clone(),
            connection: connection_rx,
            caches_position: caches_position.clone(),
        };
        let driver = Driver {
            config,
            client,
            events: events_tx,
            connection: connection_tx,
            caches_position,
            state: state.clone(),
        };
        let task = tokio::spawn(driver.run());
        Ok(Self { events, publisher, state, task })
    }

    pub fn shutdown(self) {
        self.task.abort();
    }
}

impl Drop for RedisLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Driver {
    config: RedisLinkConfig,
    client: redis::Client,
    events: mpsc::Sender<LinkEvent>,
    connection: watch::Sender<Option<MultiplexedConnection>>,
    caches_position: Arc<AtomicI64>,
    state: Arc<Mutex<ReplicationState>>,
}

/// Why a session ended.
enum SessionEnd {
    /// The owner dropped the event receiver: stop for good.
    OwnerGone,
    Lost(String),
}

impl Driver {
    async fn run(self) {
        let mut backoff_ms = self.config.initial_backoff_ms.max(1);
        let mut attempt: u64 = 0;
        let mut ever_connected = false;
        loop {
            attempt += 1;
            match self.session(&mut ever_connected, &mut backoff_ms).await {
                SessionEnd::OwnerGone => return,
                SessionEnd::Lost(reason) => {
                    tracing::warn!(
                        attempt,
                        retry_in_ms = backoff_ms,
                        "redis replication connection to {}: {reason}",
                        self.describe_target()
                    );
                }
            }
            self.connection.send_replace(None);
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = backoff_ms.saturating_mul(2).min(self.config.max_backoff_ms.max(1));
        }
    }

    fn describe_target(&self) -> String {
        match &self.config.redis.path {
            Some(path) => path.display().to_string(),
            None => format!("{}:{}", self.config.redis.host, self.config.redis.port),
        }
    }

    async fn session(&self, ever_connected: &mut bool, backoff_ms: &mut u64) -> SessionEnd {
        let channel = self.config.server_name.as_str();
        let mut pubsub = match self.client.get_async_pubsub().await {
            Ok(pubsub) => pubsub,
            Err(e) => return SessionEnd::Lost(format!("cannot connect: {e}")),
        };
        if let Err(e) = pubsub.subscribe(channel).await {
            return SessionEnd::Lost(format!("SUBSCRIBE failed: {e}"));
        }
        let mut publishing = match self.client.get_multiplexed_async_connection().await {
            Ok(connection) => connection,
            Err(e) => return SessionEnd::Lost(format!("cannot open the publishing connection: {e}")),
        };
        // Connected: the next failure starts the backoff afresh.
        *backoff_ms = self.config.initial_backoff_ms.max(1);
        if let Ok(mut state) = self.state.lock() {
            state.connection_lost();
        }
        self.connection.send_replace(Some(publishing.clone()));
        let reconnection = std::mem::replace(ever_connected, true);
        if self.events.send(LinkEvent::Connected { reconnection }).await.is_err() {
            return SessionEnd::OwnerGone;
        }
        if let Err(e) = publish_line(&mut publishing, channel, &Command::Replicate.to_line()).await {
            return self.lost(format!("PUBLISH REPLICATE failed: {e}")).await;
        }
        if let Err(e) = self.announce_positions(&mut publishing).await {
            return self.lost(format!("announcing positions failed: {e}")).await;
        }
        tracing::info!("subscribed to redis channel {channel:?} and sent REPLICATE");

        let (mut sink, mut messages) = pubsub.split();
        let mut keepalive = tokio::time::interval(Duration::from_millis(self.config.ping_interval_ms.max(1)));
        keepalive.tick().await;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        return self.lost("connection closed".to_owned()).await;
                    };
                    let Ok(line) = std::str::from_utf8(message.get_payload_bytes()) else {
                        tracing::warn!("skipping a replication message that is not UTF-8");
                        continue;
                    };
                    if let Some(end) = self.handle_line(line, &mut publishing).await {
                        return end;
                    }
                }
                _ = keepalive.tick() => {
                    if let Err(e) = sink.ping::<redis::Value>().await {
                        return self.lost(format!("PING on the subscription failed: {e}")).await;
                    }
                    if let Err(e) = redis::cmd("PING").query_async::<redis::Value>(&mut publishing).await {
                        return self.lost(format!("PING on the publishing connection failed: {e}")).await;
                    }
                }
                () = self.events.closed() => return SessionEnd::OwnerGone,
            }
        }
    }

    async fn lost(&self, reason: String) -> SessionEnd {
        // Before the owner hears of it, so that nothing it does next sees a live connection.
        self.connection.send_replace(None);
        if let Ok(mut state) = self.state.lock() {
            state.connection_lost();
        }
        if self.events.send(LinkEvent::Disconnected).await.is_err() {
            return SessionEnd::OwnerGone;
        }
        SessionEnd::Lost(reason)
    }

    async fn announce_positions(&self, publishing: &mut MultiplexedConnection) -> Result<(), RedisLinkError> {
        let position = self.caches_position.load(Ordering::SeqCst);
        let command = Command::Position {
            stream: "caches".to_owned(),
            instance: self.config.instance_name.clone(),
            prev_token: position,
            new_token: position,
        };
        publish_line(publishing, &self.config.server_name, &command.to_line()).await
    }

    /// `Some` when the session must end.
    async fn handle_line(&self, line: &str, publishing: &mut MultiplexedConnection) -> Option<SessionEnd> {
        let result = match self.state.lock() {
            Ok(mut state) => state.handle_line(line),
            Err(_) => return Some(SessionEnd::OwnerGone),
        };
        let update = match result {
            Ok(Some(update)) => update,
            Ok(None) => return None,
            Err(e) => {
                let (reason, bytes) = (e.to_string(), line.len());
                tracing::warn!(bytes, "skipping replication line {:?}: {}", log_prefix(line), log_prefix(&reason));
                return None;
            }
        };
        if update == Update::Replicate
            && let Err(e) = self.announce_positions(publishing).await
        {
            return Some(self.lost(format!("answering REPLICATE failed: {e}")).await);
        }
        if let Update::Other { name, .. } = &update {
            tracing::debug!("ignoring replication command {}", log_prefix(name));
        }
        match self.events.send(LinkEvent::Update(update)).await {
            Ok(()) => None,
            Err(_) => Some(SessionEnd::OwnerGone),
        }
    }
}

/// Reads the joined-hosts cache the event creator writes to Redis, so that a PDU's
/// destinations need no state resolution while the entries live (an hour).
pub struct ExternalCache {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl ExternalCache {
    pub fn new(redis: &RedisConfig) -> Result<Self, RedisLinkError> {
        Ok(Self { client: redis::Client::open(connection_info(redis)?)?, connection: tokio::sync::Mutex::new(None) })
    }

    /// The state group before `event_id`, if the creator cached it.
    pub async fn prev_state_group(&self, event_id: &str) -> Result<Option<i64>, RedisLinkError> {
        let key = format!("cache_v1:event_to_prev_state_group:{event_id}");
        decode_state_group(&key, self.get(&key).await?)
    }

    /// The servers with joined members in state group `state_group`, if cached.
    pub async fn joined_hosts(&self, state_group: i64) -> Result<Option<Vec<String>>, RedisLinkError> {
        let key = format!("cache_v1:get_joined_hosts:{state_group}");
        decode_joined_hosts(&key, self.get(&key).await?)
    }

    /// Both lookups in a row, as Synapse's sender does before falling back to the database.
    pub async fn joined_hosts_before_event(&self, event_id: &str) -> Result<Option<Vec<String>>, RedisLinkError> {
        match self.prev_state_group(event_id).await? {
            Some(state_group) => self.joined_hosts(state_group).await,
            None => Ok(None),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RedisLinkError> {
        let mut slot = self.connection.lock().await;
        let mut connection = match slot.as_ref() {
            Some(connection) => connection.clone(),
            None => {
                let connection = self.client.get_multiplexed_async_connection().await?;
                *slot = Some(connection.clone());
                connection
            }
        };
        drop(slot);
        match connection.get::<_, Option<Vec<u8>>>(key).await {
            Ok(value) => Ok(value),
            Err(e) => {
                // Reconnect on the next lookup rather than reuse a broken connection.
                if e.is_io_error() || e.is_connection_dropped() {
                    *self.connection.lock().await = None;
                }
                Err(e.into())
            }
        }
    }
}

/// Synapse stores the value JSON-encoded, uncompressed: here a bare integer. An empty value
/// or a zero state group counts as a miss, as in Synapse.
pub fn decode_state_group(key: &str, raw: Option<Vec<u8>>) -> Result<Option<i64>, RedisLinkError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else { return Ok(None) };
    let bad = |reason: String| RedisLinkError::BadCacheValue { key: key.to_owned(), reason };
    match serde_json::from_slice::<Value>(&raw).map_err(|e| bad(e.to_string()))? {
        Value::Number(n) => Ok(n.as_i64().filter(|sg| *sg != 0)),
        other => Err(bad(format!("expected a state group number, got {other}"))),
    }
}

/// A JSON list of server names.
pub fn decode_joined_hosts(key: &str, raw: Option<Vec<u8>>) -> Result<Option<Vec<String>>, RedisLinkError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else { return Ok(None) };
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| RedisLinkError::BadCacheValue { key: key.to_owned(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Stream;
    use std::net::TcpListener;
    use std::process::{Child, Stdio};
    use std::time::Instant;

    const CHANNEL: &str = "hs1.example:8448";
    const WAIT: Duration = Duration::from_secs(10);

    /// A throwaway `redis-server` on a loopback port, killed when dropped.
    struct RedisServer {
        port: u16,
        child: Child,
    }

    impl RedisServer {
        fn start() -> Self {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            Self::start_on(port)
        }

        fn start_on(port: u16) -> Self {
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start redis-server ({e}); install it (Debian: apt-get install redis-server){}",
                        if std::env::var_os("CI").is_some() { " — required in CI" } else { "" }
                    )
                });
            let deadline = Instant::now() + WAIT;
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not listen on port {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Self { port, child }
        }

        fn stop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        fn config(&self) -> RedisConfig {
            RedisConfig {
                host: "127.0.0.1".into(),
                port: self.port,
                path: None,
                dbid: None,
                username: None,
                password: None,
                use_tls: false,
            }
        }

        fn link_config(&self) -> RedisLinkConfig {
            RedisLinkConfig {
                server_name: CHANNEL.into(),
                instance_name: "fedsend1".into(),
                redis: self.config(),
                initial_backoff_ms: 20,
                max_backoff_ms: 200,
                ping_interval_ms: 200,
                caches_position: 7,
            }
        }

        fn client(&self) -> redis::Client {
            redis::Client::open(connection_info(&self.config()).unwrap()).unwrap()
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.stop();
        }
    }

    async fn next_event(link: &mut RedisLink) -> LinkEvent {
        tokio::time::timeout(WAIT, link.events.recv()).await.expect("no link event in time").expect("link stopped")
    }

    async fn publish(server: &RedisServer, lines: &[&str]) {
        let mut connection = server.client().get_multiplexed_async_connection().await.unwrap();
        for line in lines {
            let _: i64 = connection.publish(CHANNEL, *line).await.unwrap();
        }
    }

    async fn observer(server: &RedisServer) -> redis::aio::PubSubStream {
        let mut pubsub = server.client().get_async_pubsub().await.unwrap();
        pubsub.subscribe(CHANNEL).await.unwrap();
        pubsub.into_on_message()
    }

    async fn observed(messages: &mut redis::aio::PubSubStream) -> String {
        let message = tokio::time::timeout(WAIT, messages.next()).await.expect("nothing published in time").unwrap();
        message.get_payload::<String>().unwrap()
    }

    #[tokio::test]
    async fn subscribes_then_publishes_replicate_and_its_caches_position() {
        let server = RedisServer::start();
        let mut watched = observer(&server).await;
        let mut link = RedisLink::spawn(server.link_config(), ReplicationState::new("fedsend1")).unwrap();
        assert_eq!(next_event(&mut link).await, LinkEvent::Connected { reconnection: false });
        assert_eq!(observed(&mut watched).await, "REPLICATE ");
        assert_eq!(observed(&mut watched).await, "POSITION caches fedsend1 7 7");
        // Subscribed before publishing: our own REPLICATE comes back, and is answered again.
        assert_eq!(next_event(&mut link).await, LinkEvent::Update(Update::Replicate));
        assert_eq!(observed(&mut watched).await, "POSITION caches fedsend1 7 7");
    }

    #[tokio::test]
    async fn received_lines_become_ordered_updates_and_own_echoes_are_dropped() {
        let server = RedisServer::start();
        let mut watched = observer(&server).await;
        let mut link = RedisLink::spawn(server.link_config(), ReplicationState::new("fedsend1")).unwrap();
        assert_eq!(next_event(&mut link).await, LinkEvent::Connected { reconnection: false });
        assert_eq!(next_event(&mut link).await, LinkEvent::Update(Update::Replicate));
        publish(
            &server,
            &[
                "POSITION events master 0 0",
                "POSITION caches fedsend1 0 50",
                r#"RDATA caches fedsend1 51 ["get_destination_retry_timings",["x"],1]"#,
                "not a command line at all",
                r#"RDATA events master batch ["state-all",["!a"]]"#,
                r#"RDATA events master 1 ["state-all",["!b"]]"#,
                "REMOTE_SERVER_UP remote.example",
            ],
        )
        .await;
        assert_eq!(
            next_event(&mut link).await,
            LinkEvent::Update(Update::Position { stream: Stream::Events, instance: "master".into(), token: 0 })
        );
        assert_eq!(
            next_event(&mut link).await,
            LinkEvent::Update(Update::Other { name: "not".into(), rest: "a command line at all".into() })
        );
        let LinkEvent::Update(Update::Rows { stream, token, rows, .. }) = next_event(&mut link).await else {
            panic!("expected rows")
        };
        assert_eq!((stream, token, rows.len()), (Stream::Events, 1, 2));
        assert_eq!(
            next_event(&mut link).await,
            LinkEvent::Update(Update::RemoteServerUp { server: "remote.example".into() })
        );
        assert_eq!(link.state.lock().unwrap().position(Stream::Caches, "fedsend1"), 0);

        // Our own publications reach others but not ourselves (except REMOTE_SERVER_UP).
        while observed(&mut watched).await != "REMOTE_SERVER_UP remote.example" {}
        link.publisher
            .cache_invalidated(60, "get_destination_retry_timings", Some(&[Value::from("d")]), 5)
            .await
            .unwrap();
        link.publisher.federation_ack(3).await.unwrap();
        assert_eq!(
            observed(&mut watched).await,
            r#"RDATA caches fedsend1 60 ["get_destination_retry_timings",["d"],5]"#
        );
        assert_eq!(observed(&mut watched).await, "FEDERATION_ACK fedsend1 3");
        assert_eq!(link.publisher.caches_position(), 60);
        assert_eq!(
            next_event(&mut link).await,
            LinkEvent::Update(Update::FederationAck { instance: "fedsend1".into(), token: 3 })
        );
    }

    #[tokio::test]
    async fn reconnects_after_redis_restarts_and_replicates_again() {
        let mut server = RedisServer::start();
        let port = server.port;
        let mut link = RedisLink::spawn(server.link_config(), ReplicationState::new("fedsend1")).unwrap();
        assert_eq!(next_event(&mut link).await, LinkEvent::Connected { reconnection: false });
        assert_eq!(next_event(&mut link).await, LinkEvent::Update(Update::Replicate));
        publish(&server, &["POSITION typing master 0 0"]).await;
        assert!(matches!(next_event(&mut link).await, LinkEvent::Update(Update::Position { .. })));
        assert!(link.state.lock().unwrap().is_connected(Stream::Typing));

        server.stop();
        assert_eq!(next_event(&mut link).await, LinkEvent::Disconnected);
        assert!(link.publisher.remote_server_up("x").await.is_err());
        assert!(!link.state.lock().unwrap().is_connected(Stream::Typing));
        // Let a few attempts fail before the server comes back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _server = RedisServer::start_on(port);
        assert_eq!(next_event(&mut link).await, LinkEvent::Connected { reconnection: true });
        assert_eq!(next_event(&mut link).await, LinkEvent::Update(Update::Replicate));
        link.publisher.remote_server_up("back.example").await.unwrap();
        assert_eq!(
            next_event(&mut link).await,
            LinkEvent::Update(Update::RemoteServerUp { server: "back.example".into() })
        );
    }

    #[tokio::test]
    async fn reads_the_joined_hosts_cache_as_synapse_writes_it() {
        let server = RedisServer::start();
        let mut connection = server.client().get_multiplexed_async_connection().await.unwrap();
        let _: () = connection.set("cache_v1:event_to_prev_state_group:$ev", "42").await.unwrap();
        let _: () = connection.set("cache_v1:get_joined_hosts:42", r#"["hs1.example","hs2.example"]"#).await.unwrap();
        let _: () = connection.set("cache_v1:event_to_prev_state_group:$orphan", "43").await.unwrap();
        let _: () = connection.set("cache_v1:event_to_prev_state_group:$bad", "\"x\"").await.unwrap();
        let cache = ExternalCache::new(&server.config()).unwrap();
        assert_eq!(
            cache.joined_hosts_before_event("$ev").await.unwrap(),
            Some(vec!["hs1.example".to_owned(), "hs2.example".to_owned()])
        );
        assert_eq!(cache.prev_state_group("$missing").await.unwrap(), None);
        assert_eq!(cache.joined_hosts_before_event("$orphan").await.unwrap(), None);
        assert!(matches!(cache.prev_state_group("$bad").await, Err(RedisLinkError::BadCacheValue { .. })));
    }

    #[test]
    fn logged_parts_of_lines_are_bounded_and_cut_between_characters() {
        assert_eq!(log_prefix("RDATA events master x []"), "RDATA events master x []");
        let long = "X".repeat(100_000);
        assert_eq!(log_prefix(&long).len(), LOGGED_CHARS_MAX);
        // Multi-byte characters: cut after a whole character, counted in characters.
        let wide = "é".repeat(LOGGED_CHARS_MAX + 1);
        assert_eq!(log_prefix(&wide).chars().count(), LOGGED_CHARS_MAX);
        assert_eq!(log_prefix(&wide).len(), 2 * LOGGED_CHARS_MAX);
    }

    #[test]
    fn cache_values_decode_like_synapse() {
        assert_eq!(decode_state_group("k", Some(b"17".to_vec())).unwrap(), Some(17));
        assert_eq!(decode_state_group("k", Some(b"0".to_vec())).unwrap(), None);
        assert_eq!(decode_state_group("k", Some(Vec::new())).unwrap(), None);
        assert_eq!(decode_state_group("k", None).unwrap(), None);
        assert!(decode_state_group("k", Some(b"[1]".to_vec())).is_err());
        assert!(decode_state_group("k", Some(b"\x1f\x8b".to_vec())).is_err());
        assert_eq!(decode_joined_hosts("k", Some(br#"["a"]"#.to_vec())).unwrap(), Some(vec!["a".to_owned()]));
        assert_eq!(decode_joined_hosts("k", Some(b"[]".to_vec())).unwrap(), Some(vec![]));
        assert!(decode_joined_hosts("k", Some(b"{}".to_vec())).is_err());
    }

    #[test]
    fn tls_is_refused_and_unix_sockets_win() {
        let mut config = RedisConfig {
            host: "h".into(),
            port: 1,
            path: None,
            dbid: Some(3),
            username: Some("u".into()),
            password: Some("p".into()),
            use_tls: true,
        };
        assert!(matches!(connection_info(&config), Err(RedisLinkError::TlsUnsupported)));
        assert!(RedisLinkError::TlsUnsupported.to_string().contains("redis.use_tls"));
        config.use_tls = false;
        config.path = Some("redis.sock".into());
        let info = connection_info(&config).unwrap();
        assert_eq!(info.addr(), &ConnectionAddr::Unix("redis.sock".into()));
        assert_eq!(info.redis_settings().password(), Some("p"));
        assert_eq!(info.redis_settings().username(), Some("u"));
        assert_eq!(info.redis_settings().db(), 3);
    }
}
