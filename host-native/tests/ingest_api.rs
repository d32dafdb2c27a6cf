//! The ingest API's edges (issue 14, items 6, 7, 8, 11, 13): connection limits and read
//! timeouts, numbers the store cannot hold, unreachable server names, refusals exactly as
//! `docs/serve-config.md` states them, and warnings for risky settings. The real driver, API
//! and SQLite store run in process with a transport that accepts everything.

use std::future::Future;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedsend_core::TransactionResult;
use fedsend_host_native::serve::client::{Answer, IngestClient};
use fedsend_host_native::serve::config::{EngineKind, ServeConfig};
use fedsend_host_native::serve::driver::Transport;
use fedsend_host_native::serve::store::SqliteStore;
use fedsend_host_native::serve::{self, Running};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TOKEN: &str = "test-token-0123456789";

struct AcceptAll;

impl Transport for AcceptAll {
    fn send<'a>(
        &'a self,
        _destination: &'a str,
        _txn_id: &'a str,
        _body: &'a str,
    ) -> Pin<Box<dyn Future<Output = TransactionResult> + Send + 'a>> {
        Box::pin(async { TransactionResult::Ok { pdu_errors: Default::default() } })
    }
}

struct Service {
    running: Running,
    client: IngestClient,
    _dir: tempfile::TempDir,
}

/// The service with `ingest_toml` added to its `[ingest]` section.
async fn start_service(ingest_toml: &str) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig::parse(&format!(
        "server_name = \"us.example\"\nsigning_key_file = \"unused\"\n\
         [ingest]\nlisten = \"127.0.0.1:0\"\n{ingest_toml}\n"
    ))
    .unwrap();
    let store = SqliteStore::open(&dir.path().join("fedsend.db")).unwrap();
    let engine = serve::make_engine(EngineKind::Native, None).unwrap();
    let running =
        serve::start(&config, engine, Box::new(store), std::sync::Arc::new(AcceptAll), TOKEN.into()).await.unwrap();
    let client = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
    Service { running, client, _dir: dir }
}

fn pdu(id: &str, room: &str, depth: u64, prev: &[&str]) -> Value {
    json!({"id": id, "room_id": room, "sender": "@alice:us.example", "depth": depth, "prev_events": prev,
        "type": "m.room.message", "content": {}})
}

/// Asserts a refusal in the documented shape: `status`, `errcode`, and a reason that
/// mentions `reason_part`.
fn assert_refused(answer: &Answer, status: u16, errcode: &str, reason_part: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(answer.body["errcode"], errcode, "{what}: {answer:?}");
    let reason = answer.body["error"].as_str().unwrap_or_else(|| panic!("{what}: no error text: {answer:?}"));
    assert!(reason.contains(reason_part), "{what}: {reason:?} should mention {reason_part:?}");
}

/// Reads until the server closes the connection; `Err` if it is still open after `within`.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> Result<(), String> {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(format!("still open after {within:?}")),
            // A reset counts as closed: the server let go of the connection.
            Ok(Ok(0) | Err(_)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

// ----- item 6: connection cap and read timeouts -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_and_health_still_answers() {
    let service = start_service("connections_max = 16\nheader_read_timeout_ms = 300\nbody_read_timeout_ms = 300").await;
    let addr = service.client.addr;
    let started = Instant::now();
    // Each sends half a request head and then nothing, as a slowloris client does.
    let mut half_sent = Vec::new();
    for _ in 0..120 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"POST /_fedsend/v1/events HTTP/1.1\r\nHost: fedsend\r\nContent-Le").await.unwrap();
        half_sent.push(stream);
    }
    // While they are all connected, a health check waits at most for a few rounds of header
    // timeouts (120 connections, 16 at a time, 300 ms each) rather than forever.
    let health = tokio::time::timeout(Duration::from_secs(20), service.client.call("GET", "/health", None))
        .await
        .expect("/health answers while half-sent connections are open")
        .unwrap();
    assert_eq!(health.status, 200, "{health:?}");
    for (i, stream) in half_sent.iter_mut().enumerate() {
        closed_by_server(stream, Duration::from_secs(20)).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    let all_closed_after = started.elapsed();
    assert!(all_closed_after < Duration::from_secs(20), "{all_closed_after:?}");
    assert_eq!(service.client.call("GET", "/health", None).await.unwrap().status, 200);
    service.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_place() {
    let service = start_service("connections_max = 4\nheader_read_timeout_ms = 600").await;
    let addr = service.client.addr;
    // Four silent connections take every place until their header timeout ends them.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let health = service.client.call("GET", "/health", None).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(health.status, 200, "{health:?}");
    // Served only once a place came free: not before the silent connections timed out
    // (600 ms after they were accepted, 100 ms of which had passed).
    assert!(waited >= Duration::from_millis(350), "answered after {waited:?}: the cap did not hold");
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    for stream in &mut silent {
        closed_by_server(stream, Duration::from_secs(5)).await.unwrap();
    }
    service.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_is_answered_408() {
    let service = start_service("body_read_timeout_ms = 300").await;
    let mut stream = TcpStream::connect(service.client.addr).await.unwrap();
    let head = format!(
        "POST /_fedsend/v1/typing HTTP/1.1\r\nHost: fedsend\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"room_id\": "
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed within the body timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_read_timeout_ms"), "{answer}");
    service.running.stop().await;
}

#[test]
fn ingest_limits_must_be_positive() {
    for key in ["connections_max", "header_read_timeout_ms", "body_read_timeout_ms"] {
        let error =
            ServeConfig::parse(&format!("server_name = \"us.example\"\nsigning_key_file = \"k\"\n[ingest]\n{key} = 0"))
                .unwrap_err();
        assert!(error.contains(key) && error.contains("at least 1"), "{key}: {error}");
    }
}

// ----- item 7: numbers the store cannot hold -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integers_beyond_i64_are_refused_at_the_edge() {
    let service = start_service("").await;
    let c = &service.client;
    let device_list = |stream_id: Value| {
        json!({"user_id": "@alice:us.example", "device_id": "D1", "stream_id": stream_id,
            "deleted": false, "keys": {}, "destinations": ["a.example"]})
    };
    let answer =
        c.call("POST", "/_fedsend/v1/device_list_update", Some(&device_list(json!(1u64 << 63)))).await.unwrap();
    assert_refused(&answer, 400, "M_INVALID_PARAM", "stream_id is 9223372036854775808", "stream_id 2^63");
    let answer = c.call("POST", "/_fedsend/v1/device_list_update", Some(&device_list(json!(u64::MAX)))).await.unwrap();
    assert_refused(&answer, 400, "M_INVALID_PARAM", "9223372036854775807", "stream_id 2^64-1");
    let signing = json!({"user_id": "@alice:us.example", "stream_id": 1u64 << 63, "master_key": {},
        "self_signing_key": {}, "destinations": ["a.example"]});
    let answer = c.call("POST", "/_fedsend/v1/signing_key_update", Some(&signing)).await.unwrap();
    assert_refused(&answer, 400, "M_INVALID_PARAM", "stream_id", "signing-key stream_id 2^63");
    // Nested values are named by their path.
    let to_device = json!({"sender": "@alice:us.example", "message_type": "m.test", "message_id": "big",
        "messages": {"@bob:a.example": {"D": {"n": [1, 1u64 << 63]}}}});
    let answer = c.call("POST", "/_fedsend/v1/to_device", Some(&to_device)).await.unwrap();
    assert_refused(&answer, 400, "M_INVALID_PARAM", "messages.@bob:a.example.D.n[1]", "nested 2^63");

    // The largest storable value is accepted, durably, and the service stays healthy.
    let answer = c.call("POST", "/_fedsend/v1/device_list_update", Some(&device_list(json!(i64::MAX)))).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let health = c.call("GET", "/health", None).await.unwrap();
    assert_eq!(health.status, 200, "{health:?}");
    service.running.stop().await;
}

// ----- item 8: server names no HTTPS client can reach -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_names_are_refused_where_they_enter() {
    let service = start_service("").await;
    let c = &service.client;
    let room = "!room:us.example";
    let create = json!({"event_id": "$create", "pdu": pdu("$create", room, 1, &[])});
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&create)).await.unwrap().status, 200);
    for (i, name) in ["a..b", "-.-", "x:0", "x:99999", "[:::::]:1"].into_iter().enumerate() {
        let id = format!("$m{i}");
        let event = json!({"event_id": id, "pdu": pdu(&id, room, 2, &["$create"]), "hosts": ["ok.example", name]});
        let answer = c.call("POST", "/_fedsend/v1/events", Some(&event)).await.unwrap();
        assert_refused(&answer, 400, "M_BAD_JSON", "invalid server name", &format!("event hosts {name}"));
        let typing = json!({"room_id": room, "user_id": "@alice:us.example", "typing": true, "hosts": [name]});
        let answer = c.call("POST", "/_fedsend/v1/typing", Some(&typing)).await.unwrap();
        assert_refused(&answer, 400, "M_INVALID_PARAM", "server name", &format!("typing hosts {name}"));
        let path = format!("/_fedsend/v1/destinations/{}/reset", name.replace('[', "%5B").replace(']', "%5D"));
        let answer = c.call("POST", &path, None).await.unwrap();
        assert_refused(&answer, 400, "M_INVALID_PARAM", "not a server name", &format!("reset {name}"));
    }
    let destinations = c.call("GET", "/_fedsend/v1/destinations", None).await.unwrap();
    assert_eq!(destinations.body["total"], 0, "nothing was queued for any of them: {destinations:?}");
    service.running.stop().await;
}

// ----- item 11: refusals as documented -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_match_the_documentation() {
    let service = start_service("").await;
    let c = &service.client;

    let answer = c.call("DELETE", "/_fedsend/v1/events", None).await.unwrap();
    assert_refused(&answer, 405, "M_UNRECOGNIZED", "DELETE", "DELETE /events");
    let answer = c.call("GET", "/_fedsend/v1/typing", None).await.unwrap();
    assert_refused(&answer, 405, "M_UNRECOGNIZED", "GET", "GET /typing");

    let answer = c.call("POST", "/_fedsend/v1/bogus_thing", Some(&json!({}))).await.unwrap();
    assert_refused(&answer, 404, "M_UNRECOGNIZED", "bogus_thing", "unknown command");
    // A known command with a bad body is still a 400.
    let answer = c.call("POST", "/_fedsend/v1/typing", Some(&json!({"room_id": "!r:us.example"}))).await.unwrap();
    assert_refused(&answer, 400, "M_INVALID_PARAM", "missing field", "incomplete typing");

    let huge = "x".repeat(70 * 1024);
    let to_device = json!({"sender": "@alice:us.example", "message_type": "m.test", "message_id": "huge",
        "messages": {"@bob:a.example": {"D": {"body": huge}}}});
    let answer = c.call("POST", "/_fedsend/v1/to_device", Some(&to_device)).await.unwrap();
    assert_refused(&answer, 413, "M_TOO_LARGE", "65536", "to-device over 64 KiB");

    let create = json!({"event_id": "$create", "pdu": pdu("$create", "!room:us.example", 1, &[])});
    assert_eq!(c.call("POST", "/_fedsend/v1/events", Some(&create)).await.unwrap().status, 200);
    let path = "/_fedsend/v1/rooms/!room:us.example/partial_state";
    let answer = c.call("PUT", path, Some(&json!({}))).await.unwrap();
    assert_refused(&answer, 400, "M_BAD_JSON", "servers", "partial_state {}");
    for body in [json!({"servers": ["a.example"]}), json!({"servers": null})] {
        let answer = c.call("PUT", path, Some(&body)).await.unwrap();
        assert_eq!(answer.status, 200, "{body}: {answer:?}");
    }
    service.running.stop().await;
}

// ----- item 13: risky settings are announced -----

fn write_with_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn key_file_text() -> String {
    fedsend_sign::SigningKey::generate_from_seed_bytes("ed25519:risky", [3; 32]).unwrap().to_synapse_key_file()
}

/// `[ingest]` and `[transport]` text for a config whose files live in `dir`.
fn config_text(dir: &Path, ingest: &str, transport: &str) -> String {
    format!(
        "server_name = \"us.example\"\nsigning_key_file = \"{}\"\ndatabase = \"{}\"\n[ingest]\n{ingest}\n[transport]\n{transport}\n",
        dir.join("signing.key").display(),
        dir.join("fedsend.db").display(),
    )
}

#[test]
fn risky_settings_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    write_with_mode(&dir.path().join("signing.key"), &key_file_text(), 0o600);
    write_with_mode(&dir.path().join("token"), "test-token-0123456789\n", 0o600);
    let token_file = format!("token_file = \"{}\"", dir.path().join("token").display());
    let safe = ServeConfig::parse(&config_text(dir.path(), &token_file, "ip_allowlist = [\"8.8.8.0/24\"]")).unwrap();
    assert_eq!(safe.risky_settings(), Vec::<String>::new());

    write_with_mode(&dir.path().join("signing.key"), &key_file_text(), 0o644);
    write_with_mode(&dir.path().join("token"), "test-token-0123456789\n", 0o666);
    let risky = ServeConfig::parse(&config_text(
        dir.path(),
        &format!("listen = \"0.0.0.0:8009\"\n{token_file}"),
        "verify_tls = false\nip_allowlist = [\"0.0.0.0/0\", \"8.8.8.0/24\"]",
    ))
    .unwrap();
    let risks = risky.risky_settings();
    let expected: [&[&str]; 5] = [
        &["listen = \"0.0.0.0:8009\"", "clear text"],
        &["signing_key_file", "mode 0644", "signing key"],
        &["token_file", "mode 0666", "read (and replace) the ingest token"],
        &["verify_tls = false", "impersonate"],
        &["ip_allowlist entry \"0.0.0.0/0\"", "127.0.0.0/8", "10.0.0.0/8"],
    ];
    assert_eq!(risks.len(), expected.len(), "{risks:#?}");
    for (risk, parts) in risks.iter().zip(expected) {
        for part in parts {
            assert!(risk.contains(part), "{risk:?} should mention {part:?}");
        }
    }

    let no_denylist = ServeConfig::parse(&config_text(dir.path(), &token_file, "ip_denylist_enabled = false")).unwrap();
    let risks = no_denylist.risky_settings();
    assert!(risks.iter().any(|r| r.contains("ip_denylist_enabled = false") && r.contains("SSRF")), "{risks:#?}");
}

/// `fedsend serve` logs each risky setting as a warning when it starts.
#[test]
fn serve_warns_about_risky_settings_at_start() {
    let dir = tempfile::tempdir().unwrap();
    write_with_mode(&dir.path().join("signing.key"), &key_file_text(), 0o644);
    let config = dir.path().join("fedsend.toml");
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            "listen = \"127.0.0.1:0\"\ntoken = \"test-token-0123456789\"",
            "verify_tls = false\nip_denylist_enabled = false",
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedsend"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(first_line.starts_with("listening on"), "{first_line:?}\n{log}");
    for part in ["signing_key_file", "mode 0644", "verify_tls = false", "ip_denylist_enabled = false"] {
        assert!(log.lines().any(|l| l.contains("WARN") && l.contains(part)), "no warning about {part:?} in:\n{log}");
    }
}
