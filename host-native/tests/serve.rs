//! The service in process: the real driver, API and store (SQLite in a temp dir) with an
//! in-process fake transport, driven through the ingest API over loopback HTTP.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedsend_core::TransactionResult;
use fedsend_host_native::serve::client::{Answer, IngestClient};
use fedsend_host_native::serve::config::{EngineKind, ServeConfig};
use fedsend_host_native::serve::driver::Transport;
use fedsend_host_native::serve::store::{Added, MemoryStore, NewEvent, SqliteStore, Store, StoreError};
use fedsend_host_native::serve::{self, Running};
use serde_json::{Value, json};

mod common;

const TOKEN: &str = "test-token-0123456789";

/// Records every attempt; answers `ok` unless the destination is listed in `failing`, or
/// never (until a long timeout) if it is listed in `silent`.
#[derive(Default)]
struct FakeTransport {
    sent: Mutex<Vec<(String, String, Value)>>,
    failing: Mutex<Vec<String>>,
    silent: Mutex<Vec<String>>,
}

impl Transport for FakeTransport {
    fn send<'a>(
        &'a self,
        destination: &'a str,
        txn_id: &'a str,
        body: &'a str,
    ) -> Pin<Box<dyn Future<Output = TransactionResult> + Send + 'a>> {
        Box::pin(async move {
            if self.silent.lock().unwrap().iter().any(|d| d == destination) {
                tokio::time::sleep(Duration::from_secs(120)).await;
                return TransactionResult::Timeout;
            }
            self.sent.lock().unwrap().push((destination.into(), txn_id.into(), serde_json::from_str(body).unwrap()));
            if self.failing.lock().unwrap().iter().any(|d| d == destination) {
                TransactionResult::Status { status: 500, retry_after_ms: None, errcode: None }
            } else {
                TransactionResult::Ok { pdu_errors: Default::default() }
            }
        })
    }
}

impl FakeTransport {
    /// The items of `field` (`pdus` or `edus`) of every transaction sent to `destination`.
    fn sent_to(&self, destination: &str, field: &str) -> Vec<Value> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _, _)| d == destination)
            .flat_map(|(_, _, body)| body[field].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn pdus_to(&self, destination: &str) -> Vec<String> {
        self.sent_to(destination, "pdus").iter().map(|pdu| pdu["id"].as_str().unwrap_or_default().to_owned()).collect()
    }

    fn edus_to(&self, destination: &str, edu_type: &str) -> Vec<Value> {
        self.sent_to(destination, "edus").into_iter().filter(|edu| edu["edu_type"] == edu_type).collect()
    }
}

struct Service {
    running: Running,
    client: IngestClient,
    transport: Arc<FakeTransport>,
    _dir: tempfile::TempDir,
}

async fn start_service() -> Service {
    start_service_with(EngineKind::Native, "", |_| {}).await
}

/// The service on `engine`, with `transport_toml` as its `[transport]` section and the store
/// prepared by `prepare` before it starts.
async fn start_service_with(
    engine: EngineKind,
    transport_toml: &str,
    prepare: impl FnOnce(&mut SqliteStore),
) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig::parse(&format!(
        r#"
        server_name = "us.example"
        signing_key_file = "unused"
        [ingest]
        listen = "127.0.0.1:0"
        edu_bytes_max = 1000
        [transport]
        {transport_toml}
        [sender]
        retry_interval_min_ms = 200
        http_retries_max = 0
        "#,
    ))
    .unwrap();
    let mut store = SqliteStore::open(&dir.path().join("fedsend.db")).unwrap();
    prepare(&mut store);
    let transport = Arc::new(FakeTransport::default());
    let wasm = (engine == EngineKind::Wasm).then(common::existing_guest_path);
    let engine = serve::make_engine(engine, wasm.as_deref()).unwrap();
    let running = serve::start(&config, engine, Box::new(store), transport.clone(), TOKEN.into()).await.unwrap();
    let client = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
    Service { running, client, transport, _dir: dir }
}

fn pdu(id: &str, room: &str, sender: &str, depth: u64, prev: &[&str]) -> Value {
    json!({"id": id, "room_id": room, "sender": sender, "depth": depth, "prev_events": prev, "type": "m.room.message", "content": {}})
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_to_device_are_delivered_and_reported() {
    let service = start_service().await;
    let c = &service.client;
    let room = "!room:us.example";
    let create = json!({"event_id": "$create", "pdu": pdu("$create", room, "@alice:us.example", 1, &[])});
    let answer = c.call("POST", "/_fedsend/v1/events", Some(&create)).await.unwrap();
    assert_eq!((answer.status, answer.body["stream_ordering"].clone()), (200, json!(1)), "{answer:?}");
    let message = json!({
        "event_id": "$m1",
        "pdu": pdu("$m1", room, "@alice:us.example", 2, &["$create"]),
        "hosts": ["a.example", "b.example", "us.example"],
    });
    let answer = c.call("POST", "/_fedsend/v1/events", Some(&message)).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    // Resubmitting is idempotent: same position, not new.
    let again = c.call("POST", "/_fedsend/v1/events", Some(&message)).await.unwrap();
    assert_eq!(again.body, json!({"stream_ordering": 2, "new": false}));
    let t = service.transport.clone();
    eventually("$m1 at both remotes", || t.pdus_to("a.example") == ["$m1"] && t.pdus_to("b.example") == ["$m1"]).await;
    assert!(t.pdus_to("us.example").is_empty(), "never sent to ourselves");

    let to_device = json!({
        "sender": "@alice:us.example",
        "message_type": "m.room_key_request",
        "message_id": "msg-1",
        "messages": {"@bob:a.example": {"DEVICE": {"hello": 1}}},
    });
    let answer = c.call("POST", "/_fedsend/v1/to_device", Some(&to_device)).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    eventually("the to-device EDU", || !t.edus_to("a.example", "m.direct_to_device").is_empty()).await;
    assert_eq!(t.edus_to("a.example", "m.direct_to_device")[0]["content"]["message_id"], "msg-1");

    let typing = json!({"room_id": room, "user_id": "@alice:us.example", "typing": true, "hosts": ["b.example"]});
    assert_eq!(c.call("POST", "/_fedsend/v1/typing", Some(&typing)).await.unwrap().status, 200);
    eventually("the typing EDU", || !t.edus_to("b.example", "m.typing").is_empty()).await;

    let list = c.call("GET", "/_fedsend/v1/destinations", None).await.unwrap();
    assert_eq!(list.status, 200);
    let names: Vec<&str> =
        list.body["destinations"].as_array().unwrap().iter().map(|d| d["destination"].as_str().unwrap()).collect();
    assert!(names.contains(&"a.example") && names.contains(&"b.example"), "{names:?}");
    let one = c.call("GET", "/_fedsend/v1/destinations/a.example", None).await.unwrap();
    assert_eq!(
        (one.status, one.body["state"].clone(), one.body["queued_pdus"].clone()),
        (200, json!("idle"), json!(0)),
        "{one:?}"
    );

    let metrics = c.call("GET", "/metrics", None).await.unwrap();
    let text = metrics.body.as_str().unwrap().to_owned();
    assert!(text.contains("synapse_federation_client_sent_transactions_total"), "{text}");
    assert!(text.contains("fedsend_destination_queued_pdus{destination=\"a.example\"} 0"), "{text}");
    let sent: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("synapse_federation_client_sent_pdu_destinations_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sent, 2.0, "one PDU to two destinations");
    assert_eq!(c.call("GET", "/health", None).await.unwrap().status, 200);
    service.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_backs_off_and_shows_it() {
    let service = start_service().await;
    let c = &service.client;
    service.transport.failing.lock().unwrap().push("down.example".into());
    let room = "!r:us.example";
    c.call(
        "POST",
        "/_fedsend/v1/events",
        Some(&json!({"event_id": "$c", "pdu": pdu("$c", room, "@a:us.example", 1, &[])})),
    )
    .await
    .unwrap();
    let m = json!({"event_id": "$m", "pdu": pdu("$m", room, "@a:us.example", 2, &["$c"]), "hosts": ["down.example"]});
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&m)).await.unwrap().status, 200);
    let mut state = Value::Null;
    for _ in 0..200 {
        state = c.call("GET", "/_fedsend/v1/destinations/down.example", None).await.unwrap().body;
        if state["retry_interval_ms"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(state["retry_interval_ms"].as_u64().unwrap() > 0, "{state}");
    assert!(state["failure_ts"].is_u64(), "{state}");
    // Healed and reset: delivered.
    service.transport.failing.lock().unwrap().clear();
    let reset = c.call("POST", "/_fedsend/v1/destinations/down.example/reset", None).await.unwrap();
    assert_eq!(reset.status, 200, "{reset:?}");
    let t = service.transport.clone();
    eventually("delivery after reset", || t.pdus_to("down.example").len() >= 2).await;
    service.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_reason() {
    let service = start_service().await;
    let c = &service.client;
    let anonymous = IngestClient { token: None, ..c.clone() };
    let wrong = IngestClient { token: Some("wrong-token-0123456789".into()), ..c.clone() };
    let cases: Vec<(u16, &str, String, Answer)> = vec![
        (401, "M_MISSING_TOKEN", "no token".into(), anonymous.call("GET", "/_fedsend/v1/destinations", None).await.unwrap()),
        (401, "M_UNKNOWN_TOKEN", "wrong token".into(), wrong.call("GET", "/_fedsend/v1/destinations", None).await.unwrap()),
        (400, "M_NOT_JSON", "not JSON".into(), c.call_raw("POST", "/_fedsend/v1/events", Some("{nope")).await.unwrap()),
        (
            400,
            "M_BAD_JSON",
            "missing pdu".into(),
            c.call("POST", "/_fedsend/v1/events", Some(&json!({"event_id": "$x"}))).await.unwrap(),
        ),
        (
            404,
            "M_NOT_FOUND",
            "unknown room".into(),
            c.call("POST", "/_fedsend/v1/events", Some(&json!({"event_id": "$x", "pdu": pdu("$x", "!nope:us.example", "@a:us.example", 2, &["$p"])})))
                .await
                .unwrap(),
        ),
        (
            400,
            "M_BAD_JSON",
            "invalid server name".into(),
            c.call(
                "POST",
                "/_fedsend/v1/events",
                Some(&json!({"event_id": "$x", "pdu": pdu("$x", "!r:us.example", "@a:us.example", 1, &[]), "hosts": ["bad name!"]})),
            )
            .await
            .unwrap(),
        ),
        (
            400,
            "M_BAD_JSON",
            "remote sender on /events".into(),
            c.call("POST", "/_fedsend/v1/events", Some(&json!({"event_id": "$x", "pdu": pdu("$x", "!r:us.example", "@a:them.example", 1, &[])})))
                .await
                .unwrap(),
        ),
        (
            413,
            "M_TOO_LARGE",
            "oversized EDU".into(),
            c.call(
                "POST",
                "/_fedsend/v1/edu",
                Some(&json!({"destination": "a.example", "edu_type": "m.x", "content": {"big": "x".repeat(2000)}})),
            )
            .await
            .unwrap(),
        ),
        (
            404,
            "M_UNRECOGNIZED",
            "unknown command type".into(),
            c.call("POST", "/_fedsend/v1/bogus_thing", Some(&json!({}))).await.unwrap(),
        ),
        (
            404,
            "M_UNRECOGNIZED",
            "driver-only input".into(),
            c.call("POST", "/_fedsend/v1/persisted", Some(&json!({"request": 1}))).await.unwrap(),
        ),
        (
            400,
            "M_INVALID_PARAM",
            "invalid destination".into(),
            c.call("GET", "/_fedsend/v1/destinations/bad%20name", None).await.unwrap(),
        ),
        (
            400,
            "M_INVALID_PARAM",
            "typing for a remote user".into(),
            c.call(
                "POST",
                "/_fedsend/v1/typing",
                Some(&json!({"room_id": "!r:us.example", "user_id": "@x:them.example", "typing": true, "hosts": []})),
            )
            .await
            .unwrap(),
        ),
    ];
    for (status, errcode, what, answer) in cases {
        assert_eq!(answer.status, status, "{what}: {answer:?}");
        assert_eq!(answer.body["errcode"], errcode, "{what}: {answer:?}");
        assert!(answer.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {answer:?}");
    }
    // Still serving after all that.
    assert_eq!(c.call("GET", "/health", None).await.unwrap().status, 200);
    service.running.stop().await;
}

#[test]
fn bad_config_files_name_the_problem() {
    let cases = [
        ("server_name = \"us.example\"", "signing_key_file"),
        ("server_name = \"not a name\"\nsigning_key_file = \"k\"", "not a valid server name"),
        ("server_name = \"us.example\"\nsigning_key_file = \"k\"\ntypo_key = 1", "typo_key"),
        ("server_name = \"us.example\"\nsigning_key_file = \"k\"\n[sender]\nretry_multipler = 2", "retry_multipler"),
        (
            "server_name = \"us.example\"\nsigning_key_file = \"k\"\n[transport]\nsends_in_flight_max = 0",
            "sends_in_flight_max",
        ),
        ("server_name = [", "expected"),
    ];
    for (text, expected) in cases {
        let error = ServeConfig::parse(text).unwrap_err();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
}

#[test]
fn serve_binary_reports_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = |config: &str| {
        let path = dir.path().join("fedsend.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedsend"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let missing_config = std::process::Command::new(env!("CARGO_BIN_EXE_fedsend"))
        .args(["serve", "--config", "no-such-file.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing_config.stderr).contains("cannot read config file no-such-file.toml"));
    let stderr = run(
        "server_name = \"us.example\"\nsigning_key_file = \"missing.key\"\n[ingest]\ntoken = \"0123456789abcdef\"\n",
    );
    assert!(stderr.contains("cannot read signing key file") && stderr.contains("missing.key"), "{stderr}");
    std::fs::write(dir.path().join("bad.key"), "not a key\n").unwrap();
    let stderr =
        run("server_name = \"us.example\"\nsigning_key_file = \"bad.key\"\n[ingest]\ntoken = \"0123456789abcdef\"\n");
    assert!(stderr.contains("signing key file") && stderr.contains("bad.key"), "{stderr}");
    let stderr = run("server_name = \"us.example\"\nsigning_key_file = \"bad.key\"\n");
    assert!(stderr.contains("token"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_core_commands_pass_through_generically() {
    let service = start_service().await;
    let c = &service.client;
    let update = json!({
        "user_id": "@alice:us.example", "device_id": "DEV", "stream_id": 1,
        "keys": {"algorithms": []}, "destinations": ["a.example"],
    });
    let answer = c.call("POST", "/_fedsend/v1/device_list_update", Some(&update)).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let t = service.transport.clone();
    eventually("the device-list EDU", || !t.edus_to("a.example", "m.device_list_update").is_empty()).await;
    assert_eq!(t.edus_to("a.example", "m.device_list_update")[0]["content"]["device_id"], "DEV");
    service.running.stop().await;
}

#[test]
fn serve_binary_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let key = fedsend_sign::SigningKey::generate_from_seed_bytes("ed25519:t", [3; 32]).unwrap();
    std::fs::write(dir.path().join("k.key"), key.to_synapse_key_file()).unwrap();
    let config = dir.path().join("fedsend.toml");
    std::fs::write(
        &config,
        format!("server_name = \"us.example\"\nsigning_key_file = \"k.key\"\n[ingest]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fedsend"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line:?}");
    assert!(dir.path().join("fedsend.db").is_file(), "database created beside the config");
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status after SIGTERM: {status}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no exit within 10 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A store whose writes fail while `failing` is set, like a full disk, and whose event
/// answers come in the wrong order while `disordered` is set, which the engine refuses.
struct FailingStore {
    inner: MemoryStore,
    failing: Arc<std::sync::atomic::AtomicBool>,
    disordered: Arc<std::sync::atomic::AtomicBool>,
}

impl FailingStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Backend("database or disk is full".into()))
        } else {
            Ok(())
        }
    }
}

impl Store for FailingStore {
    fn recovered(&mut self) -> Result<fedsend_core::Recovered, StoreError> {
        self.inner.recovered()
    }
    fn apply(&mut self, changes: &fedsend_core::Changes) -> Result<(), StoreError> {
        self.check()?;
        self.inner.apply(changes)
    }
    fn add_event(&mut self, event: &NewEvent) -> Result<Added, StoreError> {
        self.check()?;
        self.inner.add_event(event)
    }
    fn set_partial_state(
        &mut self,
        room_id: &str,
        servers: Option<&[fedsend_core::ServerName]>,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.set_partial_state(room_id, servers)
    }
    fn max_stream_ordering(&mut self) -> Result<u64, StoreError> {
        self.inner.max_stream_ordering()
    }
    fn fetch_events(&mut self, after: u64, limit: u32) -> Result<Vec<fedsend_core::PduInfo>, StoreError> {
        let mut events = self.inner.fetch_events(after, limit)?;
        if self.disordered.load(std::sync::atomic::Ordering::SeqCst) {
            events.reverse();
        }
        Ok(events)
    }
    fn load_catch_up(
        &mut self,
        destination: &fedsend_core::ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<fedsend_core::CatchUpRoom>, StoreError> {
        self.inner.load_catch_up(destination, after, up_to, limit)
    }
    fn outstanding(
        &mut self,
        after: Option<&fedsend_core::ServerName>,
        limit: u32,
    ) -> Result<Vec<fedsend_core::ServerName>, StoreError> {
        self.inner.outstanding(after, limit)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_are_reported_and_survived() {
    let config = ServeConfig::parse(
        "server_name = \"us.example\"\nsigning_key_file = \"unused\"\n[ingest]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = FailingStore { inner: MemoryStore::new(), failing: failing.clone(), disordered: Arc::default() };
    let transport = Arc::new(FakeTransport::default());
    let engine = serve::make_engine(config.engine, None).unwrap();
    let running = serve::start(&config, engine, Box::new(store), transport.clone(), TOKEN.into()).await.unwrap();
    let c = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
    let room = "!r:us.example";
    let create = json!({"event_id": "$c", "pdu": pdu("$c", room, "@a:us.example", 1, &[])});
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&create)).await.unwrap().status, 200);

    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    // An event cannot be made durable: refused, not acknowledged, with the reason.
    let m1 = json!({"event_id": "$m1", "pdu": pdu("$m1", room, "@a:us.example", 2, &["$c"]), "hosts": ["a.example"]});
    let answer = c.call("POST", "/_fedsend/v1/events", Some(&m1)).await.unwrap();
    assert_eq!((answer.status, answer.body["errcode"].clone()), (503, json!("M_UNKNOWN")), "{answer:?}");
    assert!(answer.body["error"].as_str().unwrap().contains("disk is full"), "{answer:?}");
    // A to-device message is not acknowledged while its outbox rows cannot be written.
    let to_device = json!({
        "sender": "@a:us.example", "message_type": "m.test", "message_id": "td-1",
        "messages": {"@b:a.example": {"D": {}}},
    });
    let answer =
        tokio::time::timeout(Duration::from_secs(10), c.call("POST", "/_fedsend/v1/to_device", Some(&to_device)))
            .await
            .expect("a to-device submission is answered while storage fails")
            .unwrap();
    assert_eq!((answer.status, answer.body["errcode"].clone()), (503, json!("M_UNKNOWN")), "{answer:?}");
    let health = c.call("GET", "/health", None).await.unwrap();
    assert_eq!((health.status, health.body["status"].clone()), (503, json!("degraded")), "{health:?}");
    assert!(health.body["problem"].as_str().unwrap().contains("disk is full"), "{health:?}");

    // Healed: resubmitted, acknowledged (the core's retried batch lands too; receivers
    // deduplicate the message id), things flow.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let answer = c.call("POST", "/_fedsend/v1/to_device", Some(&to_device)).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&m1)).await.unwrap().status, 200);
    let t = transport.clone();
    eventually("delivery after the storage healed", || {
        t.pdus_to("a.example") == ["$m1"] && !t.edus_to("a.example", "m.direct_to_device").is_empty()
    })
    .await;
    let metrics = c.call("GET", "/metrics", None).await.unwrap();
    assert!(!metrics.body.as_str().unwrap().contains("fedsend_storage_failures_total 0"), "failures counted");
    running.stop().await;
}

const ENGINES: [EngineKind; 2] = [EngineKind::Native, EngineKind::Wasm];

/// `[[…[1]…]]` with `depth` levels.
fn nested(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = Value::Array(vec![value]);
    }
    value
}

/// A local event in `room` whose content is `content`, routed to `hosts`.
fn event_with(id: &str, room: &str, depth: u64, prev: &[&str], content: Value, hosts: &[&str]) -> Value {
    let mut pdu = pdu(id, room, "@a:us.example", depth, prev);
    pdu["content"] = content;
    json!({"event_id": id, "pdu": pdu, "hosts": hosts})
}

/// Issue: a 250-byte message nested ~125 levels was accepted, then refused by the engine
/// inside the driver's answer, and no event reached any destination again. Every depth from
/// 100 to what the API's parser takes is refused at the edge now, with the reason, and
/// everything after it flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_submissions_are_refused_and_sending_goes_on() {
    for engine in ENGINES {
        let service = start_service_with(engine, "", |_| {}).await;
        let c = &service.client;
        let t = service.transport.clone();
        let room = "!r:us.example";
        let create = json!({"event_id": "$c", "pdu": pdu("$c", room, "@a:us.example", 1, &[])});
        assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&create)).await.unwrap().status, 200);
        let refused = |answer: &Answer, what: &str| {
            assert_eq!(answer.status, 400, "{engine:?} {what}: {answer:?}");
            assert!(answer.body["error"].as_str().unwrap().contains("levels of arrays and objects"), "{answer:?}");
        };
        // The PDU object adds a level around its content; the API's parser takes bodies of
        // up to 127 levels.
        for pdu_depth in 100..=126 {
            let event = event_with("$deep", room, 2, &["$c"], nested(pdu_depth - 1), &["a.example"]);
            refused(&c.call("POST", "/_fedsend/v1/events", Some(&event)).await.unwrap(), &format!("event {pdu_depth}"));
        }
        for depth in 100..=124 {
            let to_device = json!({"sender": "@a:us.example", "message_type": "m.test", "message_id": "deep",
                                   "messages": {"@b:a.example": {"D": nested(depth)}}});
            refused(
                &c.call("POST", "/_fedsend/v1/to_device", Some(&to_device)).await.unwrap(),
                &format!("to-device {depth}"),
            );
        }
        for depth in 100..=126 {
            let edu = json!({"destination": "a.example", "edu_type": "m.x", "content": nested(depth)});
            refused(&c.call("POST", "/_fedsend/v1/edu", Some(&edu)).await.unwrap(), &format!("EDU {depth}"));
            let keys = json!({"user_id": "@a:us.example", "device_id": "D", "stream_id": 7, "keys": nested(depth),
                              "destinations": ["a.example"]});
            refused(
                &c.call("POST", "/_fedsend/v1/device_list_update", Some(&keys)).await.unwrap(),
                &format!("device keys {depth}"),
            );
        }
        // At the limit: accepted and delivered, and so is what follows.
        let at_limit = event_with("$limit", room, 2, &["$c"], nested(63), &["a.example"]);
        assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&at_limit)).await.unwrap().status, 200);
        let next = event_with("$next", room, 3, &["$limit"], json!({}), &["a.example"]);
        assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&next)).await.unwrap().status, 200);
        let to_device = json!({"sender": "@a:us.example", "message_type": "m.test", "message_id": "ok",
                               "messages": {"@b:a.example": {"D": nested(60)}}});
        assert_eq!(c.call("POST", "/_fedsend/v1/to_device", Some(&to_device)).await.unwrap().status, 200);
        eventually("the events and the message after the refusals", || {
            t.pdus_to("a.example") == ["$limit", "$next"]
                && t.edus_to("a.example", "m.direct_to_device").iter().any(|e| e["content"]["message_id"] == "ok")
        })
        .await;
        assert!(t.edus_to("a.example", "m.x").is_empty(), "nothing refused was sent");
        assert_eq!(c.call("GET", "/health", None).await.unwrap().status, 200);
        service.running.stop().await;
    }
}

/// Events stored before the edge checked nesting (or written by another producer) cannot
/// stop the events stream or a destination's catch-up: they are skipped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_events_already_stored_are_skipped_in_fan_out_and_catch_up() {
    use fedsend_core::{Changes, DestinationRoom, DestinationState, PduInfo, ServerName};
    for engine in ENGINES {
        let room = "!r:us.example";
        let stored = |id: &str, depth: u64, prev: &[&str], content: Value| NewEvent {
            info: PduInfo {
                event_id: id.into(),
                room_id: room.into(),
                stream_ordering: 0,
                sender: "@a:us.example".into(),
                has_prev_events: !prev.is_empty(),
                hosts: vec![ServerName::parse("a.example").unwrap()],
                partial_state_servers: None,
                invitee_server: None,
                proactively_send: true,
                out_of_band: false,
                send_on_behalf_of: None,
                received_ts: None,
                pdu: {
                    let mut p = pdu(id, room, "@a:us.example", depth, prev);
                    p["content"] = content;
                    p
                },
            },
            depth,
            prev_events: prev.iter().map(|p| (*p).to_owned()).collect(),
            local: true,
        };
        let service = start_service_with(engine, "", |store| {
            store.add_event(&stored("$c", 1, &[], json!({}))).unwrap();
            // Too deep for the store to read back; too deep for the engine's answer.
            store.add_event(&stored("$unreadable", 2, &["$c"], nested(126))).unwrap();
            store.add_event(&stored("$deep", 3, &["$unreadable"], nested(121))).unwrap();
            store.add_event(&stored("$after", 4, &["$deep"], json!({}))).unwrap();
            // A destination owed the deep event from before (catch-up from storage).
            let late = ServerName::parse("late.example").unwrap();
            let changes = Changes {
                events_out_pos: Some(4),
                destination_rooms: vec![DestinationRoom {
                    destination: late.clone(),
                    room_id: room.into(),
                    stream_ordering: 3,
                }],
                destinations: vec![DestinationState {
                    destination: late,
                    last_successful_stream_ordering: Some(1),
                    ..Default::default()
                }],
                ..Changes::default()
            };
            store.apply(&changes).unwrap();
        })
        .await;
        let c = &service.client;
        let t = service.transport.clone();
        let news = event_with("$news", room, 5, &["$after"], json!({}), &["a.example", "late.example"]);
        assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&news)).await.unwrap().status, 200);
        eventually("the events around the deep ones, and catch-up past them", || {
            t.pdus_to("late.example").contains(&"$news".to_owned())
                && t.pdus_to("a.example").contains(&"$news".to_owned())
        })
        .await;
        assert!(!t.pdus_to("late.example").iter().any(|id| id == "$deep" || id == "$unreadable"));
        let metrics = c.call("GET", "/metrics", None).await.unwrap();
        assert!(
            metrics.body.as_str().unwrap().contains("fedsend_undeliverable_events_total 1"),
            "{engine:?}: {metrics:?}"
        );
        service.running.stop().await;
    }
}

/// An answer the engine refuses is reported (metric, `/health`, log) and failed back to the
/// core, which asks again: nothing waits forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_answers_are_reported_and_retried() {
    let config = ServeConfig::parse(
        "server_name = \"us.example\"\nsigning_key_file = \"unused\"\n[ingest]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let disordered = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut inner = MemoryStore::new();
    let room = "!r:us.example";
    for (id, depth, prev) in [("$c", 1, vec![]), ("$1", 2, vec!["$c"]), ("$2", 3, vec!["$1"])] {
        let info: fedsend_core::PduInfo = serde_json::from_value(json!({
            "event_id": id, "room_id": room, "stream_ordering": 0, "sender": "@a:us.example",
            "has_prev_events": !prev.is_empty(), "hosts": ["a.example"],
            "pdu": pdu(id, room, "@a:us.example", depth, &prev)}))
        .unwrap();
        let prev_events = prev.iter().map(|p| (*p).to_owned()).collect();
        inner.add_event(&NewEvent { info, depth, prev_events, local: true }).unwrap();
    }
    let store = FailingStore { inner, failing: Arc::default(), disordered: disordered.clone() };
    let transport = Arc::new(FakeTransport::default());
    let engine = serve::make_engine(config.engine, None).unwrap();
    let running = serve::start(&config, engine, Box::new(store), transport.clone(), TOKEN.into()).await.unwrap();
    let c = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
    let health = c.call("GET", "/health", None).await.unwrap();
    assert_eq!((health.status, health.body["status"].clone()), (503, json!("degraded")), "{health:?}");
    assert!(health.body["problem"].as_str().unwrap().contains("refused"), "{health:?}");
    let metrics = c.call("GET", "/metrics", None).await.unwrap();
    assert!(!metrics.body.as_str().unwrap().contains("fedsend_engine_refusals_total 0"), "{metrics:?}");
    assert!(transport.pdus_to("a.example").is_empty());
    disordered.store(false, std::sync::atomic::Ordering::SeqCst);
    let t = transport.clone();
    eventually("delivery once the store answers properly", || t.pdus_to("a.example") == ["$1", "$2"]).await;
    running.stop().await;
}

/// Issue: 64 destinations that accept connections and never answer held every request slot
/// for the whole request timeout. With 100 of them, a healthy remote still gets its event
/// within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_remotes_do_not_starve_a_healthy_one() {
    let service = start_service_with(EngineKind::Native, "slow_send_after_ms = 500", |_| {}).await;
    let c = &service.client;
    let t = service.transport.clone();
    let silent: Vec<String> = (1..=100).map(|i| format!("silent{i}.example")).collect();
    t.silent.lock().unwrap().extend(silent.iter().cloned());
    let room = "!r:us.example";
    let create = json!({"event_id": "$c", "pdu": pdu("$c", room, "@a:us.example", 1, &[])});
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&create)).await.unwrap().status, 200);
    let to_silent =
        event_with("$1", room, 2, &["$c"], json!({}), &silent.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&to_silent)).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let healthy = event_with("$2", room, 3, &["$1"], json!({}), &["healthy.example"]);
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&healthy)).await.unwrap().status, 200);
    eventually("the healthy remote's event", || t.pdus_to("healthy.example") == ["$2"]).await;
    println!("healthy remote served {:?} after its event, beside 100 silent remotes", started.elapsed());
    service.running.stop().await;
}

/// A store whose event writes block while its gate is closed, as a slow disk would.
struct GatedStore {
    inner: MemoryStore,
    closed: Arc<std::sync::atomic::AtomicBool>,
    blocked: Arc<std::sync::atomic::AtomicBool>,
}

impl Store for GatedStore {
    fn recovered(&mut self) -> Result<fedsend_core::Recovered, StoreError> {
        self.inner.recovered()
    }
    fn apply(&mut self, changes: &fedsend_core::Changes) -> Result<(), StoreError> {
        self.inner.apply(changes)
    }
    fn add_event(&mut self, event: &NewEvent) -> Result<Added, StoreError> {
        while self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            self.blocked.store(true, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
        self.inner.add_event(event)
    }
    fn set_partial_state(
        &mut self,
        room_id: &str,
        servers: Option<&[fedsend_core::ServerName]>,
    ) -> Result<(), StoreError> {
        self.inner.set_partial_state(room_id, servers)
    }
    fn max_stream_ordering(&mut self) -> Result<u64, StoreError> {
        self.inner.max_stream_ordering()
    }
    fn fetch_events(&mut self, after: u64, limit: u32) -> Result<Vec<fedsend_core::PduInfo>, StoreError> {
        self.inner.fetch_events(after, limit)
    }
    fn load_catch_up(
        &mut self,
        destination: &fedsend_core::ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<fedsend_core::CatchUpRoom>, StoreError> {
        self.inner.load_catch_up(destination, after, up_to, limit)
    }
    fn outstanding(
        &mut self,
        after: Option<&fedsend_core::ServerName>,
        limit: u32,
    ) -> Result<Vec<fedsend_core::ServerName>, StoreError> {
        self.inner.outstanding(after, limit)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_while_the_driver_is_busy() {
    let config = ServeConfig::parse(
        "server_name = \"us.example\"\nsigning_key_file = \"unused\"\n[ingest]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = GatedStore { inner: MemoryStore::new(), closed: closed.clone(), blocked: blocked.clone() };
    let transport = Arc::new(FakeTransport::default());
    let engine = serve::make_engine(config.engine, None).unwrap();
    let running = serve::start(&config, engine, Box::new(store), transport, TOKEN.into()).await.unwrap();
    let c = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
    let room = "!r:us.example";
    let create = json!({"event_id": "$c", "pdu": pdu("$c", room, "@a:us.example", 1, &[])});
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&create)).await.unwrap().status, 200);
    let first =
        json!({"event_id": "$m1", "pdu": pdu("$m1", room, "@a:us.example", 2, &["$c"]), "hosts": ["a.example"]});
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&first)).await.unwrap().status, 200);
    let a_example = "fedsend_destination_queued_pdus{destination=\"a.example\"}";
    // The first scrape asks the driver; later ones see what it takes every second.
    let mut scrapes = 0;
    loop {
        let text = c.call("GET", "/metrics", None).await.unwrap().body.as_str().unwrap().to_owned();
        if text.contains(a_example) {
            break;
        }
        scrapes += 1;
        assert!(scrapes < 100, "a.example never showed up on /metrics: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The driver is stuck in a slow write for as long as the gate stays closed.
    closed.store(true, std::sync::atomic::Ordering::SeqCst);
    let second =
        json!({"event_id": "$m2", "pdu": pdu("$m2", room, "@a:us.example", 3, &["$m1"]), "hosts": ["a.example"]});
    let submitter = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
    let submission = tokio::spawn(async move { submitter.call("POST", "/_fedsend/v1/events", Some(&second)).await });
    eventually("the driver is inside the slow write", || blocked.load(std::sync::atomic::Ordering::SeqCst)).await;

    let scrape = tokio::time::timeout(Duration::from_secs(10), c.call("GET", "/metrics", None)).await;
    closed.store(false, std::sync::atomic::Ordering::SeqCst);
    let scrape = scrape.expect("/metrics answered while the driver was busy").unwrap();
    assert_eq!(scrape.status, 200, "{scrape:?}");
    let text = scrape.body.as_str().unwrap();
    assert!(text.contains(a_example), "{text}");
    assert_eq!(submission.await.unwrap().unwrap().status, 200, "the slow write completes");
    running.stop().await;
}
