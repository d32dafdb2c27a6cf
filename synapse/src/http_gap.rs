//! Filling gaps in the streams that live only in their writer's memory (typing, presence,
//! presence_federation, federation) from that writer's replication HTTP listener, as Synapse
//! workers do.
//!
//! `GET /_synapse/replication/get_repl_stream_updates/<stream>/<txn id>?from_token=F&upto_token=U`
//! answers `{"updates": [[token, row], …], "upto_token": U', "limited": bool}`; while
//! `limited`, ask again from `U'`. The listener caches answers by transaction id, so every
//! request needs a fresh one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::InstanceLocation;
use crate::replication::{RowError, Stream, StreamRow, Token, parse_row};

const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 60_000;
const TXN_ID_LENGTH: usize = 10;

#[derive(Debug)]
pub enum GapError {
    /// `instance_map` says TLS; this client speaks plain HTTP only.
    TlsUnsupported {
        instance: String,
    },
    Connect(std::io::Error),
    Http(String),
    Timeout,
    Status {
        status: u16,
        body: String,
    },
    BadResponse(String),
    Row(RowError),
    /// The writer said `limited` without moving forward; asking again would loop forever.
    NoProgress {
        from: Token,
    },
}

impl std::fmt::Display for GapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TlsUnsupported { instance } => {
                write!(
                    f,
                    "instance_map.{instance}.tls: HTTPS replication is not supported; use plain HTTP or a Unix socket"
                )
            }
            Self::Connect(e) => write!(f, "cannot connect to the replication listener: {e}"),
            Self::Http(e) => write!(f, "replication request failed: {e}"),
            Self::Timeout => write!(f, "replication request timed out"),
            Self::Status { status, body } => write!(f, "replication listener answered {status}: {body}"),
            Self::BadResponse(e) => write!(f, "unexpected replication response: {e}"),
            Self::Row(e) => e.fmt(f),
            Self::NoProgress { from } => {
                write!(f, "replication listener reported more rows after {from} but returned none")
            }
        }
    }
}

impl std::error::Error for GapError {}

#[derive(Deserialize)]
struct UpdatesPage {
    updates: Vec<(Token, Value)>,
    upto_token: Token,
    limited: bool,
}

/// A client for one Synapse instance's replication listener.
#[derive(Debug, Clone)]
pub struct StreamUpdatesClient {
    instance: String,
    location: InstanceLocation,
    secret: Option<String>,
    pub request_timeout_ms: u64,
}

impl StreamUpdatesClient {
    /// `instance` is the writer's wire name (for error messages); `secret` is
    /// `worker_replication_secret`.
    pub fn new(instance: &str, location: InstanceLocation, secret: Option<String>) -> Result<Self, GapError> {
        if matches!(location, InstanceLocation::Tcp { tls: true, .. }) {
            let instance = if instance == crate::config::MAIN_PROCESS_INSTANCE_NAME { "main" } else { instance };
            return Err(GapError::TlsUnsupported { instance: instance.to_owned() });
        }
        Ok(Self { instance: instance.to_owned(), location, secret, request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS })
    }

    /// The rows of `stream` in `(from, upto]`, in order, each with its token. Fewer than
    /// asked for only if the writer itself has no more (its position reset, for example).
    pub async fn fetch_rows(
        &self,
        stream: Stream,
        from: Token,
        upto: Token,
    ) -> Result<Vec<(Token, StreamRow)>, GapError> {
        let mut rows = Vec::new();
        let mut position = from;
        // Synapse skips the request entirely when there is nothing to ask for.
        while position != upto {
            let page = self.fetch_page(stream, position, upto).await?;
            for (token, row) in &page.updates {
                rows.push((*token, parse_row(stream, row).map_err(GapError::Row)?));
            }
            if !page.limited {
                break;
            }
            if page.upto_token <= position {
                return Err(GapError::NoProgress { from: position });
            }
            position = page.upto_token;
        }
        Ok(rows)
    }

    async fn fetch_page(&self, stream: Stream, from: Token, upto: Token) -> Result<UpdatesPage, GapError> {
        let path = format!(
            "/_synapse/replication/get_repl_stream_updates/{}/{}?from_token={from}&upto_token={upto}",
            stream.name(),
            fresh_txn_id()
        );
        let exchange = self.get(&path);
        let (status, body) = tokio::time::timeout(Duration::from_millis(self.request_timeout_ms), exchange)
            .await
            .map_err(|_| GapError::Timeout)??;
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            let excerpt: String = text.chars().take(200).collect();
            return Err(GapError::Status { status: status.as_u16(), body: excerpt });
        }
        serde_json::from_slice(&body).map_err(|e| GapError::BadResponse(e.to_string()))
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), GapError> {
        let (authority, io) = match &self.location {
            InstanceLocation::Tcp { host, port, .. } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(GapError::Connect)?;
                (format!("{host}:{port}"), Io::Tcp(stream))
            }
            InstanceLocation::Unix { path } => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(GapError::Connect)?;
                // Any name will do over a socket file; Synapse uses the instance's.
                (self.instance.clone(), Io::Unix(stream))
            }
        };
        let mut request = Request::get(path).header(HOST, authority);
        if let Some(secret) = &self.secret {
            request = request.header(AUTHORIZATION, format!("Bearer {secret}"));
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| GapError::Http(e.to_string()))?;
        let response = match io {
            Io::Tcp(stream) => send(stream, request).await?,
            Io::Unix(stream) => send(stream, request).await?,
        };
        Ok(response)
    }
}

enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn send<S>(stream: S, request: Request<Empty<Bytes>>) -> Result<(StatusCode, Bytes), GapError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| GapError::Http(e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(http)?.to_bytes();
    driver.abort();
    Ok((status, body))
}

/// Ten letters that no earlier request of this process used, and that another process is
/// vanishingly unlikely to use at the same moment.
fn fresh_txn_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = Sha256::new();
    hasher.update(std::process::id().to_le_bytes());
    hasher.update(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos().to_le_bytes());
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    const LETTERS: &[u8; 52] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    hasher.finalize().iter().take(TXN_ID_LENGTH).map(|b| char::from(LETTERS[usize::from(*b) % LETTERS.len()])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::TypingRow;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Seen {
        requests: Vec<(String, Option<String>)>,
    }

    /// A stand-in for Synapse's replication listener serving typing updates in two pages.
    async fn spawn_listener(seen: Arc<Mutex<Seen>>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let seen = seen.clone();
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let uri = request.uri().to_string();
                        let bearer = request.headers().get(AUTHORIZATION).map(|v| v.to_str().unwrap().to_owned());
                        seen.lock().unwrap().requests.push((uri.clone(), bearer.clone()));
                        let (status, body) = answer(&uri, bearer.as_deref());
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        port
    }

    fn answer(uri: &str, bearer: Option<&str>) -> (u16, String) {
        if bearer != Some("Bearer repl-secret") {
            return (403, r#"{"errcode":"M_FORBIDDEN"}"#.to_owned());
        }
        let Some(rest) = uri.strip_prefix("/_synapse/replication/get_repl_stream_updates/typing/") else {
            return (404, "{}".to_owned());
        };
        let (txn_id, query) = rest.split_once('?').unwrap();
        assert_eq!(txn_id.len(), TXN_ID_LENGTH, "{uri}");
        match query {
            "from_token=3&upto_token=10" => {
                (200, r#"{"updates":[[4,["!a",["@u:x"]]],[5,["!b",[]]]],"upto_token":5,"limited":true}"#.to_owned())
            }
            "from_token=5&upto_token=10" => {
                (200, r#"{"updates":[[7,["!a",[]]]],"upto_token":10,"limited":false}"#.to_owned())
            }
            "from_token=0&upto_token=1" => (200, r#"{"updates":[],"upto_token":0,"limited":true}"#.to_owned()),
            "from_token=0&upto_token=2" => {
                (200, r#"{"updates":[[1,["!a"]]],"upto_token":2,"limited":false}"#.to_owned())
            }
            "from_token=0&upto_token=3" => (200, "not json".to_owned()),
            _ => (400, r#"{"error":"unexpected query"}"#.to_owned()),
        }
    }

    fn client(port: u16, secret: Option<&str>) -> StreamUpdatesClient {
        let location = InstanceLocation::Tcp { host: "127.0.0.1".into(), port, tls: false };
        StreamUpdatesClient::new("master", location, secret.map(str::to_owned)).unwrap()
    }

    fn typing(room: &str, users: &[&str]) -> StreamRow {
        StreamRow::Typing(TypingRow { room_id: room.into(), user_ids: users.iter().map(|u| (*u).to_owned()).collect() })
    }

    #[tokio::test]
    async fn follows_limited_pages_with_the_bearer_secret() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let port = spawn_listener(seen.clone()).await;
        let rows = client(port, Some("repl-secret")).fetch_rows(Stream::Typing, 3, 10).await.unwrap();
        assert_eq!(rows, vec![(4, typing("!a", &["@u:x"])), (5, typing("!b", &[])), (7, typing("!a", &[]))]);
        let requests = &seen.lock().unwrap().requests;
        assert_eq!(requests.len(), 2);
        let txn_ids: HashSet<&str> = requests.iter().map(|(uri, _)| uri.split('/').nth(5).unwrap()).collect();
        assert_eq!(txn_ids.len(), 2, "every request has its own transaction id");
        assert!(requests.iter().all(|(_, bearer)| bearer.as_deref() == Some("Bearer repl-secret")));
    }

    #[tokio::test]
    async fn listener_errors_are_reported() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let port = spawn_listener(seen.clone()).await;
        let forbidden = client(port, None).fetch_rows(Stream::Typing, 3, 10).await.unwrap_err();
        assert!(matches!(forbidden, GapError::Status { status: 403, .. }), "{forbidden}");
        let wrong = client(port, Some("nope")).fetch_rows(Stream::Typing, 3, 10).await.unwrap_err();
        assert!(matches!(wrong, GapError::Status { status: 403, .. }));
        let authorised = client(port, Some("repl-secret"));
        assert!(matches!(authorised.fetch_rows(Stream::Typing, 0, 1).await, Err(GapError::NoProgress { from: 0 })));
        assert!(matches!(authorised.fetch_rows(Stream::Typing, 0, 2).await, Err(GapError::Row(_))));
        assert!(matches!(authorised.fetch_rows(Stream::Typing, 0, 3).await, Err(GapError::BadResponse(_))));
        assert!(matches!(
            authorised.fetch_rows(Stream::Presence, 0, 3).await,
            Err(GapError::Status { status: 404, .. })
        ));
        // Nothing to ask for: no request at all.
        let before = seen.lock().unwrap().requests.len();
        assert_eq!(authorised.fetch_rows(Stream::Typing, 4, 4).await.unwrap(), vec![]);
        assert_eq!(seen.lock().unwrap().requests.len(), before);
    }

    #[tokio::test]
    async fn unreachable_listeners_and_tls_are_errors() {
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(matches!(client(closed_port, None).fetch_rows(Stream::Typing, 0, 1).await, Err(GapError::Connect(_))));
        let tls = InstanceLocation::Tcp { host: "h".into(), port: 1, tls: true };
        let error = StreamUpdatesClient::new("master", tls, None).unwrap_err();
        assert!(error.to_string().starts_with("instance_map.main.tls"), "{error}");
        let missing = InstanceLocation::Unix { path: "/nonexistent/replication.sock".into() };
        let unix = StreamUpdatesClient::new("master", missing, None).unwrap();
        assert!(matches!(unix.fetch_rows(Stream::Typing, 0, 1).await, Err(GapError::Connect(_))));
    }

    #[tokio::test]
    async fn talks_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("replication.sock");
        let listener = tokio::net::UnixListener::bind(&socket_path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let body = if request.uri().query() == Some("from_token=0&upto_token=1") {
                    r#"{"updates":[[1,["remote.example","@u:x"]]],"upto_token":1,"limited":false}"#
                } else {
                    "{}"
                };
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
        let client = StreamUpdatesClient::new("master", InstanceLocation::Unix { path: socket_path }, None).unwrap();
        let rows = client.fetch_rows(Stream::PresenceFederation, 0, 1).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert!(matches!(&rows[0].1, StreamRow::PresenceFederation(r) if r.destination == "remote.example"));
    }

    #[test]
    fn transaction_ids_are_fresh_letters() {
        let ids: HashSet<String> = (0..1000).map(|_| fresh_txn_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| id.len() == TXN_ID_LENGTH && id.chars().all(|c| c.is_ascii_alphabetic())));
    }
}
