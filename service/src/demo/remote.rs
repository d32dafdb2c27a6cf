//! Loopback "remote servers" for the demo and the crash test: HTTPS with a self-signed
//! certificate, `PUT /_matrix/federation/v1/send/{txnId}` only. Each checks the `X-Matrix`
//! signature of every request with fedsend-sign against our public key, records what it
//! received (deduplicating transactions by id, as real servers do), and misbehaves as told:
//! flaky 500s, down (connections dropped) until a given time, or 429 with `Retry-After`.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How a remote misbehaves.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Percentage of requests answered 500.
    pub fail_percent: u32,
    /// Connections are dropped before TLS until this instant.
    pub down_until: Option<Instant>,
    /// Every n-th request is answered 429 with `Retry-After: 1`.
    pub rate_limit_every: Option<u32>,
}

impl Behaviour {
    /// A one-word description for reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.fail_percent > 0 {
            parts.push(format!("flaky {}%", self.fail_percent));
        }
        if self.down_until.is_some() {
            parts.push("down at first".to_owned());
        }
        if let Some(n) = self.rate_limit_every {
            parts.push(format!("429 every {n}"));
        }
        if parts.is_empty() { "healthy".to_owned() } else { parts.join(", ") }
    }
}

/// What a remote has received.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// Accepted transaction ids (duplicates of these were not counted again).
    pub txn_ids: BTreeSet<String>,
    /// Event ids of PDUs received, per room.
    pub events: BTreeMap<String, BTreeSet<String>>,
    /// To-device `message_id` → how many distinct transactions carried it.
    pub to_device: BTreeMap<String, u32>,
    /// Other EDUs by type.
    pub edus: BTreeMap<String, u64>,
    /// Requests answered with an error on purpose (500, 429) or dropped.
    pub refused: u64,
    /// Requests whose signature did not verify (must stay 0).
    pub bad_signatures: u64,
}

struct Shared {
    name: String,
    origin: String,
    key_id: String,
    public_key: String,
    behaviour: Mutex<Behaviour>,
    received: Mutex<Received>,
    requests: Mutex<u64>,
    /// PDUs in accepted transactions, repeats across transactions included: with the
    /// distinct events received, tells "exactly once" from "at least once" without a copy
    /// of [`Received`] (the service bench polls a thousand remotes).
    pdus_delivered: AtomicU64,
    distinct_events: AtomicU64,
}

/// A running remote; the server stops when the runtime does.
#[derive(Clone)]
pub struct Remote {
    shared: Arc<Shared>,
    /// Its address; the server name is `127.0.0.1:<port>`.
    pub addr: SocketAddr,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("name", &self.shared.name).finish_non_exhaustive()
    }
}

fn tls_config() -> Result<Arc<rustls::ServerConfig>, String> {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .map_err(|e| format!("self-signed certificate: {e}"))?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(vec![cert], key))
        .map_err(|e| format!("TLS server setup: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Remote {
    /// Starts a remote on a free loopback port that accepts requests from `origin` signed with
    /// `key_id` / `public_key` (unpadded base64).
    pub async fn start(origin: &str, key_id: &str, public_key: &str, behaviour: Behaviour) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("remote listener: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            name: format!("127.0.0.1:{}", addr.port()),
            origin: origin.to_owned(),
            key_id: key_id.to_owned(),
            public_key: public_key.to_owned(),
            behaviour: Mutex::new(behaviour),
            received: Mutex::new(Received::default()),
            requests: Mutex::new(0),
            pdus_delivered: AtomicU64::new(0),
            distinct_events: AtomicU64::new(0),
        });
        let acceptor = TlsAcceptor::from(tls_config()?);
        let accepting = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let down = accepting.behaviour.lock().expect("lock").down_until.is_some_and(|t| Instant::now() < t);
                if down {
                    accepting.received.lock().expect("lock").refused += 1;
                    drop(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let shared = Arc::clone(&accepting);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = service_fn(move |request| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(&shared, request).await) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        Ok(Self { shared, addr })
    }

    /// The server name (`127.0.0.1:<port>`).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A copy of what it received so far.
    pub fn received(&self) -> Received {
        self.shared.received.lock().expect("lock").clone()
    }

    /// PDUs in accepted (first-seen) transactions, an event sent twice counted twice.
    pub fn pdus_delivered(&self) -> u64 {
        self.shared.pdus_delivered.load(Ordering::Relaxed)
    }

    /// Distinct events received, over all rooms.
    pub fn distinct_events(&self) -> u64 {
        self.shared.distinct_events.load(Ordering::Relaxed)
    }

    /// Its behaviour.
    pub fn behaviour(&self) -> Behaviour {
        self.shared.behaviour.lock().expect("lock").clone()
    }

    /// Changes its behaviour (e.g. heals it).
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock().expect("lock") = behaviour;
    }
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}

/// Splits `X-Matrix origin="a",destination="b",key="k",sig="s"` into its parameters.
fn x_matrix_params(header: &str) -> Option<BTreeMap<String, String>> {
    let rest = header.strip_prefix("X-Matrix ")?;
    let mut params = BTreeMap::new();
    for part in rest.split(',') {
        let (key, value) = part.split_once('=')?;
        params.insert(key.trim().to_owned(), value.trim().trim_matches('"').to_owned());
    }
    Some(params)
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let uri = request.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let Some(txn_id) = uri.strip_prefix("/_matrix/federation/v1/send/").map(str::to_owned) else {
        return reply(StatusCode::NOT_FOUND, &json!({"errcode": "M_UNRECOGNIZED", "error": "not served"}));
    };
    let authorization = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Ok(body) = request.into_body().collect().await.map(|b| b.to_bytes()) else {
        return reply(StatusCode::BAD_REQUEST, &json!({"errcode": "M_UNKNOWN", "error": "unreadable body"}));
    };
    let Ok(content) = serde_json::from_slice::<Value>(&body) else {
        return reply(StatusCode::BAD_REQUEST, &json!({"errcode": "M_NOT_JSON", "error": "body is not JSON"}));
    };
    // The signature covers method, URI, origin, destination and the body (spec: Request
    // Authentication); verify it exactly as a receiving server would.
    let verified = x_matrix_params(&authorization).is_some_and(|p| {
        let signed = json!({
            "method": "PUT",
            "uri": uri,
            "origin": p.get("origin").cloned().unwrap_or_default(),
            "destination": p.get("destination").cloned().unwrap_or_default(),
            "content": content,
            "signatures": {
                p.get("origin").cloned().unwrap_or_default(): {
                    p.get("key").cloned().unwrap_or_default(): p.get("sig").cloned().unwrap_or_default()
                }
            }
        });
        p.get("origin") == Some(&shared.origin)
            && p.get("destination") == Some(&shared.name)
            && p.get("key") == Some(&shared.key_id)
            && fedsend_sign::verify_json(&signed, &shared.origin, &shared.key_id, &shared.public_key).is_ok()
    });
    if !verified {
        shared.received.lock().expect("lock").bad_signatures += 1;
        return reply(
            StatusCode::UNAUTHORIZED,
            &json!({"errcode": "M_UNAUTHORIZED", "error": "bad X-Matrix signature"}),
        );
    }
    let count = {
        let mut requests = shared.requests.lock().expect("lock");
        *requests += 1;
        *requests
    };
    let behaviour = shared.behaviour.lock().expect("lock").clone();
    if behaviour.rate_limit_every.is_some_and(|n| count % u64::from(n.max(1)) == 0) {
        shared.received.lock().expect("lock").refused += 1;
        let mut response =
            reply(StatusCode::TOO_MANY_REQUESTS, &json!({"errcode": "M_LIMIT_EXCEEDED", "error": "slow down"}));
        response.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
        return response;
    }
    // A cheap deterministic spread of failures over request numbers.
    let roll = (count.wrapping_mul(2_654_435_761) >> 7) % 100;
    if roll < u64::from(behaviour.fail_percent) {
        shared.received.lock().expect("lock").refused += 1;
        return reply(StatusCode::INTERNAL_SERVER_ERROR, &json!({"errcode": "M_UNKNOWN", "error": "flaky on purpose"}));
    }
    let mut received = shared.received.lock().expect("lock");
    if received.txn_ids.insert(txn_id) {
        for pdu in content["pdus"].as_array().into_iter().flatten() {
            if let (Some(room), Some(id)) = (pdu["room_id"].as_str(), pdu["event_id"].as_str()) {
                shared.pdus_delivered.fetch_add(1, Ordering::Relaxed);
                if received.events.entry(room.to_owned()).or_default().insert(id.to_owned()) {
                    shared.distinct_events.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for edu in content["edus"].as_array().into_iter().flatten() {
            let edu_type = edu["edu_type"].as_str().unwrap_or_default().to_owned();
            if edu_type == "m.direct_to_device" {
                let id = edu["content"]["message_id"].as_str().unwrap_or_default().to_owned();
                *received.to_device.entry(id).or_default() += 1;
            } else {
                *received.edus.entry(edu_type).or_default() += 1;
            }
        }
    }
    reply(StatusCode::OK, &json!({"pdus": {}}))
}
