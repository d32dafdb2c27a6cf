//! A minimal HTTPS responder for `GET /_matrix/key/v2/server`, so that remote servers can
//! fetch our verify key and check the `X-Matrix` signatures of what we send them.
//!
//! It serves nothing else (every other path is a Matrix `M_UNRECOGNIZED` 404); a full
//! homeserver normally publishes the key itself and this is for standalone setups and tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fedsend_sign::SigningKey;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::TransportError;

/// How long a served key response says it is valid: Synapse's default key refresh interval.
pub const KEY_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// A TLS handshake plus one request should never take longer; slower clients are dropped so
/// they cannot hold tasks open.
const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running key server; dropping the handle does not stop it, [`KeyServer::abort`] does.
#[derive(Debug)]
pub struct KeyServer {
    /// The address it listens on (useful with port 0).
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl KeyServer {
    /// Stops accepting connections.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// A rustls server configuration from PEM files (certificate chain, then private key).
pub fn tls_server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TransportError::Config(format!("certificate file {}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(TransportError::Config(format!(
            "certificate file {} holds no PEM certificate",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TransportError::Config(format!("key file {}: {e}", key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| TransportError::Config(format!("TLS server setup: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `origin`'s signed key document on `listener` until aborted.
pub fn spawn_key_server(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    origin: String,
    key: SigningKey,
) -> Result<KeyServer, TransportError> {
    let local_addr = listener.local_addr().map_err(|e| TransportError::Config(format!("key server listener: {e}")))?;
    let acceptor = TlsAcceptor::from(tls);
    let state = Arc::new((origin, key));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let acceptor = acceptor.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let serve = async {
                    let Ok(tls_stream) = acceptor.accept(tcp).await else { return };
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(respond(&request, &state.0, &state.1)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls_stream), service)
                        .await;
                };
                let _ = tokio::time::timeout(CONNECTION_IDLE_TIMEOUT, serve).await;
            });
        }
    });
    Ok(KeyServer { local_addr, task })
}

fn respond(request: &Request<Incoming>, origin: &str, key: &SigningKey) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let (status, body) = if request.method() == Method::GET
        && (path == "/_matrix/key/v2/server" || path.starts_with("/_matrix/key/v2/server/"))
    {
        let valid_until = SystemTime::now() + KEY_VALIDITY;
        let valid_until_ms =
            valid_until.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match fedsend_sign::server_keys_json(origin, key, valid_until_ms) {
            Ok(body) => (StatusCode::OK, body),
            Err(e) => {
                (StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({"errcode": "M_UNKNOWN", "error": e.to_string()}))
            }
        }
    } else {
        (
            StatusCode::NOT_FOUND,
            serde_json::json!({"errcode": "M_UNRECOGNIZED", "error": "only /_matrix/key/v2/server is served here"}),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
