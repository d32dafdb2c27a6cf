//! Issue 14, item 12: why a transaction was not delivered reaches the log. The core only
//! learns `Unreachable` or `Timeout`, so the transport logs the reason (denylist, connect,
//! DNS, TLS) with destination and txn id at warn level, once per destination per minute; the
//! repeats go to debug level. Its own test binary: the log subscriber is process-wide.

use std::sync::{Arc, Mutex};

use fedsend_core::TransactionResult;
use fedsend_host_native::transport::{HttpsTransport, TransportConfig};
use fedsend_sign::SigningKey;

#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap()).lines().map(str::to_owned).collect()
    }
}

const BODY: &str = r#"{"edus":[],"origin":"origin.test","origin_server_ts":1,"pdus":[]}"#;

fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn failure_reasons_are_logged_once_per_destination() {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let key = SigningKey::generate_from_seed_bytes("ed25519:a_Test", [9; 32]).unwrap();
    let mut config = TransportConfig::new("origin.test", key);
    config.ip_allowlist = vec!["127.0.0.1".parse().unwrap()];
    config.connect_timeout_ms = 300;
    // Nothing answers there: every DNS question times out.
    config.dns_nameserver = Some(std::net::SocketAddr::from(([127, 0, 0, 1], unused_port())));
    let transport = HttpsTransport::new(config).unwrap();
    let refused = format!("127.0.0.1:{}", unused_port());

    for txn in ["deny-1", "deny-2", "deny-3"] {
        assert_eq!(transport.send_transaction("127.0.0.2:8448", txn, BODY).await, TransactionResult::Unreachable);
    }
    assert_eq!(transport.send_transaction(&refused, "refused-1", BODY).await, TransactionResult::Unreachable);
    assert_eq!(transport.send_transaction("nowhere.test:8448", "dns-1", BODY).await, TransactionResult::Unreachable);

    let lines = log.lines();
    let warnings: Vec<&String> = lines.iter().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 3, "one warning per destination: {lines:#?}");
    let expected: [&[&str]; 3] = [
        &["127.0.0.2:8448", "txn_id=\"deny-1\"", "denylist", "127.0.0.0/8"],
        &[&refused, "txn_id=\"refused-1\"", "connect"],
        &["nowhere.test:8448", "txn_id=\"dns-1\"", "DNS"],
    ];
    for (warning, parts) in warnings.iter().zip(expected) {
        for part in parts {
            assert!(warning.contains(part), "{warning:?} should mention {part:?}");
        }
    }
    let repeats: Vec<&String> = lines.iter().filter(|l| l.contains("DEBUG") && l.contains("not delivered")).collect();
    assert_eq!(repeats.len(), 2, "later failures of a destination go to debug: {lines:#?}");
    for (repeat, txn) in repeats.iter().zip(["deny-2", "deny-3"]) {
        assert!(repeat.contains("127.0.0.2:8448") && repeat.contains(txn) && repeat.contains("denylist"), "{repeat}");
    }
}
