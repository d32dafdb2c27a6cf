//! TLS client configuration and HTTP/1.1-over-TLS connections.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::TransportError;
use super::ipfilter::IpFilter;

pub(crate) type Sender = SendRequest<Full<Bytes>>;

/// Builds the client TLS configuration: webpki roots plus `extra_ca_file`, or no verification
/// at all when `verify_tls` is false (test setups only).
pub(crate) fn tls_config(verify_tls: bool, extra_ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TransportError> {
    // An explicit provider rather than the process default: another crate in the binary may
    // install a different one, and rustls panics if none or two are installed implicitly.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Config(format!("TLS setup: {e}")))?;
    let mut config = if verify_tls {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| TransportError::Config(format!("extra CA file {}: {e}", path.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TransportError::Config(format!("extra CA file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(TransportError::Config(format!(
                    "extra CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    TransportError::Config(format!("extra CA file {}: unusable certificate: {e}", path.display()))
                })?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(provider))).with_no_client_auth()
    };
    // Only HTTP/1.1 is spoken; saying so lets servers that default to h2 pick the right one.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any certificate but still checks handshake signatures, so the TLS session is
/// sound against a passive observer. Only reachable with `verify_tls: false`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens an HTTP/1.1 connection over TLS to the first of `addrs` that the filter allows and
/// that answers within `connect_timeout` (TCP and TLS handshake together, per address).
pub(crate) async fn connect(
    addrs: &[SocketAddr],
    sni: &str,
    tls: &Arc<ClientConfig>,
    filter: &IpFilter,
    connect_timeout: Duration,
) -> Result<(Sender, SocketAddr), TransportError> {
    let server_name = ServerName::try_from(sni.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|e| TransportError::InvalidServerName(format!("{sni:?} as TLS name: {e}")))?
        .to_owned();
    let mut failures: Vec<String> = Vec::new();
    let mut denied: Vec<String> = Vec::new();
    let mut tls_failure = false;
    for &addr in addrs {
        if let Err(why) = filter.check(addr.ip()) {
            denied.push(format!("{} ({why})", addr.ip()));
            continue;
        }
        let attempt = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| (false, format!("{addr}: connect: {e}")))?;
            // Requests are small and latency-bound; Nagle would delay each one by an RTT.
            let _ = tcp.set_nodelay(true);
            let tls_stream = TlsConnector::from(tls.clone())
                .connect(server_name.clone(), tcp)
                .await
                .map_err(|e| (true, format!("{addr}: TLS handshake with {sni}: {e}")))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls_stream))
                .await
                .map_err(|e| (false, format!("{addr}: HTTP handshake: {e}")))?;
            tokio::spawn(async move {
                // The connection ends when the peer closes it or every sender is dropped;
                // either way the pool notices through `is_closed`.
                let _ = connection.await;
            });
            Ok::<_, (bool, String)>(sender)
        };
        match tokio::time::timeout(connect_timeout, attempt).await {
            Ok(Ok(sender)) => return Ok((sender, addr)),
            Ok(Err((is_tls, reason))) => {
                tls_failure |= is_tls;
                failures.push(reason);
            }
            Err(_) => failures.push(format!("{addr}: no connection within {} ms", connect_timeout.as_millis())),
        }
    }
    if failures.is_empty() && !denied.is_empty() {
        return Err(TransportError::Denied(format!(
            "every address of {sni} is denied by the IP denylist: {}",
            denied.join(", ")
        )));
    }
    if failures.is_empty() {
        return Err(TransportError::Dns(format!("no address for {sni}")));
    }
    if !denied.is_empty() {
        failures.push(format!("denied by the IP denylist: {}", denied.join(", ")));
    }
    let reason = failures.join("; ");
    Err(if tls_failure { TransportError::Tls(reason) } else { TransportError::Connect(reason) })
}
