//! The outbound federation transport against real local servers: HTTPS servers with
//! certificates from a test CA, a hand-written DNS server on a loopback UDP port, and the
//! X-Matrix signature checked by Python `signedjson` (an independent implementation).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fedsend_core::TransactionResult;
use fedsend_host_native::transport::key_server;
use fedsend_host_native::transport::{
    DEFAULT_FEDERATION_PORT, HttpsTransport, IpNet, ResolvedVia, TransportConfig, TransportError,
};
use fedsend_sign::SigningKey;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record};
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::{Value, json};
use tokio::net::{TcpListener, UdpSocket};
use tokio_rustls::TlsAcceptor;

const ORIGIN: &str = "origin.test";

// ----- certificates -----

/// A CA and a server certificate it issued for `names` (DNS names or IP literals).
struct Pki {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki(names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "fedsend test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let cert_file = dir.path().join("server.pem");
    let key_file = dir.path().join("server.key");
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    let server = key_server::tls_server_config(&cert_file, &key_file).unwrap();
    Pki { _dir: dir, ca_file, server }
}

// ----- HTTPS test server -----

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: HashMap<String, String>,
    body: String,
}

enum Reply {
    Json(u16, Vec<(&'static str, String)>, Value),
    /// Never answer (the client must time out).
    Hang,
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

struct TestServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

async fn https_server(tls: Arc<rustls::ServerConfig>, handler: Handler) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let acceptor = TlsAcceptor::from(tls);
    let (seen2, connections2) = (seen.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            connections2.fetch_add(1, Ordering::SeqCst);
            let (acceptor, handler, seen) = (acceptor.clone(), handler.clone(), seen2.clone());
            tokio::spawn(async move {
                // A failed handshake is what some tests expect; the client reports it.
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (handler, seen) = (handler.clone(), seen.clone());
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let record = Seen {
                            method: parts.method.to_string(),
                            uri: parts.uri.to_string(),
                            headers: parts
                                .headers
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                                .collect(),
                            body: String::from_utf8(body.to_vec()).unwrap(),
                        };
                        seen.lock().unwrap().push(record.clone());
                        match handler(&record) {
                            Reply::Hang => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                unreachable!()
                            }
                            Reply::Json(status, headers, body) => {
                                let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
                                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                                for (k, v) in headers {
                                    response.headers_mut().insert(k, v.parse().unwrap());
                                }
                                Ok::<_, Infallible>(response)
                            }
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    TestServer { addr, seen, connections }
}

fn txn_ok() -> Handler {
    Arc::new(|_| Reply::Json(200, vec![], json!({"pdus": {}})))
}

// ----- DNS fixture -----

/// A tiny authoritative DNS server on a loopback UDP port: answers A and SRV from a table,
/// NXDOMAIN for names it does not know, an empty answer for other types of known names.
async fn dns_server(records: Vec<(&'static str, RData)>) -> SocketAddr {
    dns_server_logged(records).await.0
}

/// [`dns_server`], also returning every name it was asked about.
async fn dns_server_logged(records: Vec<(&'static str, RData)>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let asked_log = asked.clone();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let records: Vec<(Name, RData)> =
        records.into_iter().map(|(name, rdata)| (Name::from_str(name).unwrap(), rdata)).collect();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (len, peer) = socket.recv_from(&mut buf).await.unwrap();
            let Ok(query) = Message::from_vec(&buf[..len]) else { continue };
            let mut response = Message::new();
            response
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_op_code(query.op_code())
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true)
                .set_authoritative(true);
            for q in query.queries() {
                asked_log.lock().unwrap().push(q.name().to_string());
                response.add_query(q.clone());
                let known = records.iter().any(|(n, _)| n == q.name());
                for (name, rdata) in &records {
                    if name == q.name() && rdata.record_type() == q.query_type() {
                        response.add_answer(Record::from_rdata(name.clone(), 60, rdata.clone()));
                    }
                }
                if !known {
                    response.set_response_code(ResponseCode::NXDomain);
                }
            }
            let _ = socket.send_to(&response.to_vec().unwrap(), peer).await;
        }
    });
    (addr, asked)
}

fn a(ip: [u8; 4]) -> RData {
    RData::A(A(Ipv4Addr::from(ip)))
}

fn srv(port: u16, target: &str) -> RData {
    RData::SRV(SRV::new(10, 5, port, Name::from_str(target).unwrap()))
}

// ----- signature check by Python signedjson -----

fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = root.join("tools/python/sign-venv/bin/python");
    assert!(
        python.is_file(),
        "missing {}: the X-Matrix signature is checked with Python signedjson in that venv. \
         Run scripts/setup.sh to create it.",
        python.display()
    );
    python
}

/// Verifies a recorded request's X-Matrix header with signedjson; returns its output.
fn verify_with_signedjson(seen: &Seen, destination: &str, key: &SigningKey) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/verify_xmatrix.py");
    let input = json!({
        "method": seen.method,
        "uri": seen.uri,
        "destination": destination,
        "authorization": seen.headers["authorization"],
        "body": seen.body,
        "public_key": key.public_key_base64(),
    });
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "signedjson rejected the request: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

// ----- helpers -----

fn signing_key() -> SigningKey {
    SigningKey::generate_from_seed_bytes("ed25519:a_Test", [9; 32]).unwrap()
}

fn loopback_allowed() -> Vec<IpNet> {
    vec!["127.0.0.0/8".parse().unwrap()]
}

fn config(pki: &Pki) -> TransportConfig {
    let mut config = TransportConfig::new(ORIGIN, signing_key());
    config.extra_ca_file = Some(pki.ca_file.clone());
    config.ip_allowlist = loopback_allowed();
    config.connect_timeout_ms = 2_000;
    config.request_timeout_ms = 5_000;
    config
}

fn body(txn: &str) -> String {
    // Canonical JSON as the core produces it, with non-ASCII text to check nothing re-encodes it.
    fedsend_sign::canonical_json(&json!({
        "origin": ORIGIN, "origin_server_ts": 1_700_000_000_000_u64,
        "pdus": [{"type": "m.room.message", "content": {"body": format!("héllo ☃ {txn}")}}],
        "edus": [],
    }))
    .unwrap()
}

// ----- tests -----

#[tokio::test]
async fn transaction_is_signed_canonical_and_reuses_the_connection() {
    let pki = pki(&["127.0.0.1"]);
    let server = https_server(
        pki.server.clone(),
        Arc::new(|_| Reply::Json(200, vec![], json!({"pdus": {"$good": {}, "$bad": {"error": "Forbidden"}}}))),
    )
    .await;
    let transport = HttpsTransport::new(config(&pki)).unwrap();
    let destination = format!("127.0.0.1:{}", server.addr.port());

    let report = transport.send_transaction_detailed(&destination, "txn/1 ü", &body("a")).await;
    let expected = TransactionResult::Ok { pdu_errors: BTreeMap::from([("$bad".to_owned(), "Forbidden".to_owned())]) };
    assert_eq!(report.result, expected, "{}", report.detail);
    assert_eq!(report.peer, Some(server.addr));
    let result = transport.send_transaction(&destination, "2", &body("b")).await;
    assert_eq!(result, expected);

    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "PUT");
    assert_eq!(seen[0].uri, "/_matrix/federation/v1/send/txn%2F1%20%C3%BC");
    assert_eq!(seen[1].uri, "/_matrix/federation/v1/send/2");
    assert_eq!(seen[0].body, body("a"), "the body goes out byte for byte");
    assert_eq!(seen[0].headers["host"], destination);
    assert_eq!(seen[0].headers["content-type"], "application/json");
    for request in &seen {
        let out = verify_with_signedjson(request, &destination, &signing_key());
        assert_eq!(out.trim(), "ok origin.test ed25519:a_Test");
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 1, "the second send reuses the connection");

    // A tampered request must fail the same independent check (the check can fail).
    let mut forged = seen[0].clone();
    forged.body = body("tampered");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/verify_xmatrix.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = json!({"method": forged.method, "uri": forged.uri, "destination": destination,
        "authorization": forged.headers["authorization"], "body": forged.body,
        "public_key": signing_key().public_key_base64()});
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not verify"));
}

#[tokio::test]
async fn statuses_map_to_core_results() {
    let pki = pki(&["127.0.0.1"]);
    let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
    let handler: Handler = Arc::new(move |seen: &Seen| {
        let txn = seen.uri.rsplit('/').next().unwrap().to_owned();
        let limit = json!({"errcode": "M_LIMIT_EXCEEDED", "error": "slow down"});
        match txn.as_str() {
            "h429" => Reply::Json(429, vec![("retry-after", "7".into())], limit),
            "b429" => Reply::Json(429, vec![], json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1234})),
            "d503" => Reply::Json(503, vec![("retry-after", in_a_minute.clone())], json!({})),
            "g410" => Reply::Json(410, vec![], json!({"errcode": "M_UNKNOWN", "error": "gone"})),
            "e500" => Reply::Json(500, vec![], json!("not an object")),
            "hang" => Reply::Hang,
            _ => Reply::Json(200, vec![], json!({})),
        }
    });
    let server = https_server(pki.server.clone(), handler).await;
    let mut config = config(&pki);
    config.request_timeout_ms = 400;
    let transport = HttpsTransport::new(config).unwrap();
    let dest = format!("127.0.0.1:{}", server.addr.port());
    let send = |txn: &'static str| {
        let (transport, dest) = (transport.clone(), dest.clone());
        async move { transport.send_transaction_detailed(&dest, txn, &body(txn)).await }
    };
    let status = |status, retry_after_ms, errcode: Option<&str>| TransactionResult::Status {
        status,
        retry_after_ms,
        errcode: errcode.map(str::to_owned),
    };

    assert_eq!(send("h429").await.result, status(429, Some(7_000), Some("M_LIMIT_EXCEEDED")));
    assert_eq!(send("b429").await.result, status(429, Some(1_234), Some("M_LIMIT_EXCEEDED")));
    match send("d503").await.result {
        TransactionResult::Status { status: 503, retry_after_ms: Some(ms), errcode: None } => {
            // HTTP dates have one-second resolution.
            assert!((58_000..=60_000).contains(&ms), "{ms}");
        }
        other => panic!("d503: {other:?}"),
    }
    assert_eq!(send("g410").await.result, status(410, None, Some("M_UNKNOWN")));
    assert_eq!(send("e500").await.result, status(500, None, None));
    assert_eq!(send("fine").await.result, TransactionResult::Ok { pdu_errors: BTreeMap::new() });

    let started = Instant::now();
    let report = send("hang").await;
    assert_eq!(report.result, TransactionResult::Timeout, "{}", report.detail);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert!(report.detail.contains("400 ms"), "{}", report.detail);
    // The hung connection is not reused: the next send works on a fresh one.
    assert_eq!(send("after").await.result, TransactionResult::Ok { pdu_errors: BTreeMap::new() });
}

#[tokio::test]
async fn connection_refused_is_unreachable() {
    let pki = pki(&["127.0.0.1"]);
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let transport = HttpsTransport::new(config(&pki)).unwrap();
    let report = transport.send_transaction_detailed(&format!("127.0.0.1:{port}"), "t", &body("t")).await;
    assert_eq!(report.result, TransactionResult::Unreachable);
    assert!(report.detail.contains("connect"), "{}", report.detail);
    // An invalid server name is refused before any I/O.
    let report = transport.send_transaction_detailed("bad name!", "t", &body("t")).await;
    assert_eq!(report.result, TransactionResult::Unreachable);
    assert!(report.detail.contains("invalid server name"), "{}", report.detail);
}

#[tokio::test]
async fn denylist_refuses_loopback_unless_allowlisted() {
    let pki = pki(&["127.0.0.1"]);
    let server = https_server(pki.server.clone(), txn_ok()).await;
    let dest = format!("127.0.0.1:{}", server.addr.port());

    let mut denied = config(&pki);
    denied.ip_allowlist = Vec::new(); // the production default: denylist on, nothing allowed
    assert!(denied.ip_denylist_enabled);
    let report = HttpsTransport::new(denied.clone()).unwrap().send_transaction_detailed(&dest, "t", &body("t")).await;
    assert_eq!(report.result, TransactionResult::Unreachable);
    assert!(report.detail.contains("denylist") && report.detail.contains("127.0.0.0/8"), "{}", report.detail);
    assert_eq!(server.connections.load(Ordering::SeqCst), 0, "a denied address is never contacted");

    denied.ip_allowlist = vec!["127.0.0.1".parse().unwrap()];
    let transport = HttpsTransport::new(denied).unwrap();
    assert_eq!(
        transport.send_transaction(&dest, "t", &body("t")).await,
        TransactionResult::Ok { pdu_errors: BTreeMap::new() }
    );
}

#[tokio::test]
async fn tls_verification_failure_is_unreachable() {
    let trusted = pki(&["127.0.0.1"]);
    let untrusted = pki(&["127.0.0.1"]); // another CA, not in our trust store
    let server = https_server(untrusted.server.clone(), txn_ok()).await;
    let dest = format!("127.0.0.1:{}", server.addr.port());

    let report = HttpsTransport::new(config(&trusted)).unwrap().send_transaction_detailed(&dest, "t", &body("t")).await;
    assert_eq!(report.result, TransactionResult::Unreachable);
    assert!(report.detail.contains("TLS") && report.detail.to_lowercase().contains("certificate"), "{}", report.detail);
    assert!(server.seen.lock().unwrap().is_empty());

    // A certificate for another name fails too, even from the trusted CA.
    let wrong_name = pki(&["other.test"]);
    let server2 = https_server(wrong_name.server.clone(), txn_ok()).await;
    let report = HttpsTransport::new(config(&wrong_name))
        .unwrap()
        .send_transaction_detailed(&format!("127.0.0.1:{}", server2.addr.port()), "t", &body("t"))
        .await;
    assert_eq!(report.result, TransactionResult::Unreachable, "{}", report.detail);

    // Test setups can turn verification off.
    let mut insecure = config(&trusted);
    insecure.verify_tls = false;
    insecure.extra_ca_file = None;
    let result = HttpsTransport::new(insecure).unwrap().send_transaction(&dest, "t", &body("t")).await;
    assert_eq!(result, TransactionResult::Ok { pdu_errors: BTreeMap::new() });
}

#[tokio::test]
async fn bad_configuration_is_a_clear_error() {
    let mut config = TransportConfig::new(ORIGIN, signing_key());
    config.extra_ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
    let err = HttpsTransport::new(config.clone()).unwrap_err();
    assert!(matches!(err, TransportError::Config(_)) && err.to_string().contains("ca.pem"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    config.extra_ca_file = Some(empty);
    let err = HttpsTransport::new(config).unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}

/// Every discovery step against the DNS fixture and a well-known server that answers by
/// `Host`; then one transaction end to end through a delegation.
#[tokio::test]
async fn server_discovery_follows_the_spec() {
    let names = [
        "wk-port.test",
        "wk-srv.test",
        "wk-ip.test",
        "wk-bad.test",
        "srv.test",
        "legacy.test",
        "plain.test",
        "e2e.test",
        "e2e-target.test",
        "wk-redirect.test",
        "wk-loop.test",
    ];
    let pki = pki(&names);
    let well_known_fetches = Arc::new(Mutex::new(Vec::<String>::new()));
    let fetches = well_known_fetches.clone();
    let txn_port = Arc::new(AtomicUsize::new(0));
    let txn_port2 = txn_port.clone();
    let handler: Handler = Arc::new(move |seen: &Seen| {
        let host = seen.headers["host"].clone();
        if seen.uri == "/moved" {
            fetches.lock().unwrap().push(format!("moved:{host}"));
            return Reply::Json(200, vec![], json!({"m.server": "delegated.test:6666"}));
        }
        if seen.uri == "/.well-known/matrix/server" {
            fetches.lock().unwrap().push(host.clone());
            let cache = vec![("cache-control", "max-age=3600".to_owned())];
            return match host.as_str() {
                "wk-port.test" => Reply::Json(200, cache, json!({"m.server": "delegated.test:5555"})),
                "wk-srv.test" => Reply::Json(200, cache, json!({"m.server": "deleg-srv.test"})),
                "wk-ip.test" => Reply::Json(200, cache, json!({"m.server": "10.9.9.9:4444"})),
                "wk-bad.test" => Reply::Json(200, cache, json!({"m.server": 5})),
                // Redirected to another host, which answers on another path.
                "wk-redirect.test" => Reply::Json(
                    302,
                    vec![("location", format!("https://e2e-target.test:{}/moved", txn_port2.load(Ordering::SeqCst)))],
                    json!({}),
                ),
                "wk-loop.test" => Reply::Json(301, vec![("location", "/.well-known/matrix/server".into())], json!({})),
                "e2e.test" => Reply::Json(
                    200,
                    cache,
                    json!({"m.server": format!("e2e-target.test:{}", txn_port2.load(Ordering::SeqCst))}),
                ),
                _ => Reply::Json(404, vec![], json!({"errcode": "M_NOT_FOUND"})),
            };
        }
        Reply::Json(200, vec![], json!({"pdus": {}}))
    });
    let server = https_server(pki.server.clone(), handler).await;
    txn_port.store(usize::from(server.addr.port()), Ordering::SeqCst);
    let dns = dns_server(vec![
        ("explicit.test.", a([10, 0, 0, 1])),
        ("wk-port.test.", a([127, 0, 0, 1])),
        ("delegated.test.", a([10, 0, 0, 2])),
        ("wk-srv.test.", a([127, 0, 0, 1])),
        ("_matrix-fed._tcp.deleg-srv.test.", srv(7777, "t1.test.")),
        ("deleg-srv.test.", a([10, 0, 0, 99])),
        ("t1.test.", a([10, 0, 0, 3])),
        ("wk-ip.test.", a([127, 0, 0, 1])),
        ("wk-bad.test.", a([127, 0, 0, 1])),
        ("srv.test.", a([127, 0, 0, 1])),
        ("_matrix-fed._tcp.srv.test.", srv(8450, "target.test.")),
        ("_matrix._tcp.srv.test.", srv(1, "wrong.test.")),
        ("target.test.", a([10, 0, 0, 4])),
        ("legacy.test.", a([127, 0, 0, 1])),
        ("_matrix._tcp.legacy.test.", srv(8451, "target2.test.")),
        ("target2.test.", a([10, 0, 0, 5])),
        ("plain.test.", a([127, 0, 0, 1])),
        ("e2e.test.", a([127, 0, 0, 1])),
        ("e2e-target.test.", a([127, 0, 0, 1])),
        ("wk-redirect.test.", a([127, 0, 0, 1])),
        ("wk-loop.test.", a([127, 0, 0, 1])),
    ])
    .await;
    let mut config = config(&pki);
    config.dns_nameserver = Some(dns);
    config.well_known_port = server.addr.port();
    let transport = HttpsTransport::new(config).unwrap();

    let check = |name: &'static str, addrs: Vec<SocketAddr>, host: &'static str, via: ResolvedVia| {
        let transport = transport.clone();
        async move {
            let resolved = transport.resolve_server(name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(resolved.addrs, addrs, "{name}");
            assert_eq!(resolved.host_header, host, "{name}");
            assert_eq!(resolved.sni, host.rsplit_once(':').map_or(host, |(h, _)| h).trim_matches(['[', ']']), "{name}");
            assert_eq!(resolved.via, via, "{name}");
            resolved
        }
    };
    let sa = |ip: [u8; 4], port: u16| SocketAddr::new(IpAddr::from(ip), port);

    check("1.2.3.4", vec![sa([1, 2, 3, 4], DEFAULT_FEDERATION_PORT)], "1.2.3.4", ResolvedVia::IpLiteral).await;
    check("1.2.3.4:99", vec![sa([1, 2, 3, 4], 99)], "1.2.3.4:99", ResolvedVia::IpLiteral).await;
    let v6 = check(
        "[2001:db8::1]:99",
        vec!["[2001:db8::1]:99".parse().unwrap()],
        "[2001:db8::1]:99",
        ResolvedVia::IpLiteral,
    )
    .await;
    assert_eq!(v6.sni, "2001:db8::1");
    check("explicit.test:1234", vec![sa([10, 0, 0, 1], 1234)], "explicit.test:1234", ResolvedVia::ExplicitPort).await;
    let r =
        check("wk-port.test", vec![sa([10, 0, 0, 2], 5555)], "delegated.test:5555", ResolvedVia::ExplicitPort).await;
    assert_eq!(r.delegated.as_deref(), Some("delegated.test:5555"));
    check("wk-srv.test", vec![sa([10, 0, 0, 3], 7777)], "deleg-srv.test", ResolvedVia::Srv).await;
    check("wk-ip.test", vec![sa([10, 9, 9, 9], 4444)], "10.9.9.9:4444", ResolvedVia::IpLiteral).await;
    // An invalid well-known is ignored: the name itself goes on to SRV and then port 8448.
    check("wk-bad.test", vec![sa([127, 0, 0, 1], 8448)], "wk-bad.test", ResolvedVia::DefaultPort).await;
    let r = check("srv.test", vec![sa([10, 0, 0, 4], 8450)], "srv.test", ResolvedVia::Srv).await;
    assert_eq!(r.delegated, None);
    check("legacy.test", vec![sa([10, 0, 0, 5], 8451)], "legacy.test", ResolvedVia::LegacySrv).await;
    check("plain.test", vec![sa([127, 0, 0, 1], 8448)], "plain.test", ResolvedVia::DefaultPort).await;
    check("wk-redirect.test", vec![sa([10, 0, 0, 2], 6666)], "delegated.test:6666", ResolvedVia::ExplicitPort).await;
    // A redirect loop is given up after a few hops; the name then resolves without delegation.
    check("wk-loop.test", vec![sa([127, 0, 0, 1], 8448)], "wk-loop.test", ResolvedVia::DefaultPort).await;
    let loop_fetches = well_known_fetches.lock().unwrap().iter().filter(|h| *h == "wk-loop.test").count();
    assert_eq!(loop_fetches, 6, "the first request and five redirects");
    let err = transport.resolve_server("missing.test").await.unwrap_err();
    assert!(matches!(err, TransportError::Dns(_)), "{err}");
    assert!(matches!(transport.resolve_server("bad_name").await, Err(TransportError::InvalidServerName(_))));

    // Well-known answers (and failures) are cached: resolving again fetches nothing.
    let fetched_once = well_known_fetches.lock().unwrap().clone();
    for name in ["wk-port.test", "wk-srv.test", "plain.test"] {
        transport.resolve_server(name).await.unwrap();
    }
    assert_eq!(*well_known_fetches.lock().unwrap(), fetched_once);
    for name in ["wk-port.test", "wk-srv.test", "wk-ip.test", "srv.test", "legacy.test", "plain.test"] {
        assert_eq!(fetched_once.iter().filter(|h| *h == name).count(), 1, "{name}: {fetched_once:?}");
    }
    assert!(!fetched_once.iter().any(|h| h.starts_with("explicit")), "an explicit port skips well-known");

    // Addresses found through SRV are filtered too: 10.0.0.4 is private and not allowlisted.
    let report = transport.send_transaction_detailed("srv.test", "t", &body("t")).await;
    assert_eq!(report.result, TransactionResult::Unreachable);
    assert!(report.detail.contains("10.0.0.4 (in 10.0.0.0/8)"), "{}", report.detail);

    // End to end: delegated to a name with the server's port; Host and TLS name are the
    // delegated name, the X-Matrix destination the original one.
    let report = transport.send_transaction_detailed("e2e.test", "e2e", &body("e2e")).await;
    assert_eq!(report.result, TransactionResult::Ok { pdu_errors: BTreeMap::new() }, "{}", report.detail);
    let seen = server.seen.lock().unwrap().clone();
    let sent = seen.iter().find(|s| s.uri.ends_with("/send/e2e")).unwrap();
    assert_eq!(sent.headers["host"], format!("e2e-target.test:{}", server.addr.port()));
    verify_with_signedjson(sent, "e2e.test", &signing_key());
}

#[tokio::test]
async fn key_server_serves_a_verifiable_key() {
    let pki = pki(&["127.0.0.1"]);
    let key = signing_key();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = key_server::spawn_key_server(listener, pki.server.clone(), ORIGIN.into(), key.clone()).unwrap();
    let transport = HttpsTransport::new(config(&pki)).unwrap();
    let dest = format!("127.0.0.1:{}", server.local_addr.port());
    let response = transport.request(&dest, hyper::Method::GET, "/_matrix/key/v2/server", None).await.unwrap();
    assert_eq!(response.status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["server_name"], ORIGIN);
    fedsend_sign::verify_json(&body, ORIGIN, key.key_id(), &key.public_key_base64()).unwrap();
    let now_ms = u64::try_from(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis()).unwrap();
    assert!(body["valid_until_ts"].as_u64().unwrap() > now_ms);
    let missing = transport.request(&dest, hyper::Method::GET, "/other", None).await.unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    server.abort();
}

/// Issue 14, item 10: an IP literal reached through well-known (a redirect to
/// `https://127.0.0.1:PORT/...`, or an `m.server` literal) is used as an address, never asked
/// of DNS as a name with a trailing dot.
#[tokio::test]
async fn well_known_ip_literals_skip_dns() {
    let pki = pki(&["redirect-ip.test", "deleg-ip.test", "127.0.0.1"]);
    let port = Arc::new(AtomicUsize::new(0));
    let port_in_handler = port.clone();
    let handler: Handler = Arc::new(move |seen: &Seen| {
        let port = port_in_handler.load(Ordering::SeqCst);
        match (seen.headers["host"].as_str(), seen.uri.as_str()) {
            ("redirect-ip.test", "/.well-known/matrix/server") => {
                Reply::Json(302, vec![("location", format!("https://127.0.0.1:{port}/moved"))], json!({}))
            }
            (_, "/moved") => Reply::Json(200, vec![], json!({"m.server": "delegated.test:6666"})),
            ("deleg-ip.test", "/.well-known/matrix/server") => {
                Reply::Json(200, vec![], json!({"m.server": format!("127.0.0.1:{port}")}))
            }
            _ => Reply::Json(200, vec![], json!({"pdus": {}})),
        }
    });
    let server = https_server(pki.server.clone(), handler).await;
    port.store(usize::from(server.addr.port()), Ordering::SeqCst);
    let (dns, asked) = dns_server_logged(vec![
        ("redirect-ip.test.", a([127, 0, 0, 1])),
        ("deleg-ip.test.", a([127, 0, 0, 1])),
        ("delegated.test.", a([10, 0, 0, 2])),
    ])
    .await;
    let mut config = config(&pki);
    config.dns_nameserver = Some(dns);
    config.well_known_port = server.addr.port();
    let transport = HttpsTransport::new(config).unwrap();

    let redirected = transport.resolve_server("redirect-ip.test").await.unwrap();
    assert_eq!(redirected.delegated.as_deref(), Some("delegated.test:6666"), "{redirected:?}");
    assert_eq!(redirected.addrs, vec![SocketAddr::from(([10, 0, 0, 2], 6666))]);
    let delegated = transport.resolve_server("deleg-ip.test").await.unwrap();
    assert_eq!(delegated.via, ResolvedVia::IpLiteral, "{delegated:?}");
    assert_eq!(delegated.addrs, vec![server.addr]);
    let report = transport.send_transaction_detailed("deleg-ip.test", "t", &body("t")).await;
    assert_eq!(report.result, TransactionResult::Ok { pdu_errors: BTreeMap::new() }, "{}", report.detail);

    let asked = asked.lock().unwrap().clone();
    assert!(!asked.iter().any(|name| name.starts_with("127.")), "DNS was asked about an IP literal: {asked:?}");
    assert!(asked.iter().any(|name| name == "delegated.test."), "the fixture saw the queries: {asked:?}");
}

/// Issue 14, item 9, end to end: IPv6 forms that carry a denylisted IPv4 address are refused
/// before any connection attempt, and the reason names what they carry.
#[tokio::test]
async fn ipv6_carrying_a_denied_ipv4_is_refused() {
    let pki = pki(&["127.0.0.1"]);
    let mut config = config(&pki);
    config.ip_allowlist = Vec::new();
    let transport = HttpsTransport::new(config).unwrap();
    for destination in [
        "[64:ff9b::7f00:1]:8448",
        "[2002:7f00:1::1]:8448",
        "[::7f00:1]:8448",
        "[::ffff:0:7f00:1]:8448",
        "[2001:0:808:808::80ff:fffe]:8448",
    ] {
        let report = transport.send_transaction_detailed(destination, "t", &body("t")).await;
        assert_eq!(report.result, TransactionResult::Unreachable, "{destination}: {}", report.detail);
        assert!(report.detail.contains("denylist"), "{destination}: {}", report.detail);
        assert!(report.detail.contains("carries 127.0.0.1, in 127.0.0.0/8"), "{destination}: {}", report.detail);
    }
}
