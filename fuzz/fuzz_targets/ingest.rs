//! The ingest API down to the store and the core: the real service (`serve::start`: API,
//! driver, native engine) on loopback with an in-memory store and an in-memory transport that
//! accepts every transaction.
//!
//! The input is one HTTP request: the first line `METHOD PATH`, the rest the body (sent with
//! the right Content-Length and the valid token). Whatever the answer, the sender must stay
//! live: after every input a valid event for `live.example`, submitted through the API, must
//! be acknowledged and reach the transport within `DELIVERY_BOUND` (5 s) — an input that wedges
//! the sender (issue 14, item 1: a fetch answer the engine refuses, a persist it cannot write)
//! fails the run. A panic anywhere, in the handlers or the driver task, aborts too
//! (libfuzzer-sys's panic hook).
//!
//! One service lives for the whole run (starting one per input would dominate the time), so
//! state accumulates across inputs as it does in production.
#![no_main]

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use fedsend_core::TransactionResult;
use fedsend_host_native::serve::client::IngestClient;
use fedsend_host_native::serve::config::{EngineKind, ServeConfig};
use fedsend_host_native::serve::driver::Transport;
use fedsend_host_native::serve::store::MemoryStore;
use fedsend_host_native::serve::{self, Running};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const TOKEN: &str = "fuzz-token-0123456789";
const LIVE_DESTINATION: &str = "live.example";
const LIVE_ROOM: &str = "!live:us.example";
/// Generous against a loaded 2-core machine (a healthy service delivers in about a millisecond),
/// and below fuzz.sh's per-input `-timeout` of 10 s so that a wedge reports as this assertion.
const DELIVERY_BOUND: Duration = Duration::from_secs(5);

/// Accepts every transaction; remembers the liveness events that reached `live.example`.
#[derive(Default)]
struct AcceptingTransport {
    delivered: Mutex<HashSet<String>>,
}

impl Transport for AcceptingTransport {
    fn send<'a>(
        &'a self,
        destination: &'a str,
        _txn_id: &'a str,
        body: &'a str,
    ) -> Pin<Box<dyn Future<Output = TransactionResult> + Send + 'a>> {
        Box::pin(async move {
            let body: Value = serde_json::from_str(body).expect("the driver sends JSON bodies");
            if destination == LIVE_DESTINATION {
                let pdus = body["pdus"].as_array().into_iter().flatten();
                let ids = pdus.filter_map(|pdu| pdu["event_id"].as_str()).filter(|id| id.starts_with("$live"));
                self.delivered.lock().unwrap().extend(ids.map(str::to_owned));
            }
            TransactionResult::Ok { pdu_errors: Default::default() }
        })
    }
}

struct Service {
    runtime: tokio::runtime::Runtime,
    client: IngestClient,
    transport: Arc<AcceptingTransport>,
    next_live: AtomicU64,
    /// The newest liveness event: the next one's `prev_events` (an event without any is taken
    /// as a room's create event, which is sent to nobody).
    last_live: Mutex<String>,
    _running: Running,
}

fn service() -> &'static Service {
    static SERVICE: OnceLock<Service> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let config = ServeConfig::parse(
            r#"
            server_name = "us.example"
            signing_key_file = "unused"
            [ingest]
            listen = "127.0.0.1:0"
            [sender]
            retry_interval_min_ms = 200
            http_retries_max = 0
            "#,
        )
        .expect("the fixed config is valid");
        let transport = Arc::new(AcceptingTransport::default());
        let running = runtime.block_on(async {
            let engine = serve::make_engine(EngineKind::Native, None).expect("the native engine");
            serve::start(&config, engine, Box::new(MemoryStore::new()), transport.clone(), TOKEN.into())
                .await
                .expect("the service starts")
        });
        let client = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
        // The liveness room must exist before its partial-state flag can be reset.
        let create = json!({
            "event_id": "$create-live",
            "pdu": {"event_id": "$create-live", "room_id": LIVE_ROOM, "sender": "@alice:us.example", "depth": 0,
                    "prev_events": [], "type": "m.room.create", "content": {}},
            "hosts": ["us.example"],
        });
        let answer =
            runtime.block_on(client.call("POST", "/_fedsend/v1/events", Some(&create))).expect("the API answers");
        assert_eq!(answer.status, 200, "creating the liveness room: {answer:?}");
        Service {
            runtime,
            client,
            transport,
            next_live: AtomicU64::new(1),
            last_live: Mutex::new("$create-live".into()),
            _running: running,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let service = service();
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once('\n').unwrap_or((&text, ""));
    let (method, path) = head.split_once(' ').unwrap_or(("POST", head));
    // A request line the client cannot frame is not interesting: the server never sees it.
    if method.is_empty() || method.contains(char::is_whitespace) || !path.starts_with('/') || path.contains(['\r', ' '])
    {
        return;
    }
    service.runtime.block_on(async {
        // Any answer is fine (refusals are the API's job); no answer at all is not.
        let _ = service.client.call_raw(method, path, Some(body)).await;
        assert_live(service).await;
    });
});

/// Submits a fresh event for `live.example` and waits until the transport has it.
async fn assert_live(service: &Service) {
    let n = service.next_live.fetch_add(1, Ordering::Relaxed);
    let event_id = format!("$live{n}");
    // The fuzzed request may have marked the room partial-state; the check is about the sender.
    let full = service
        .client
        .call("PUT", &format!("/_fedsend/v1/rooms/{LIVE_ROOM}/partial_state"), Some(&json!({"servers": null})))
        .await
        .expect("the API answers");
    assert_eq!(full.status, 200, "resetting the liveness room: {full:?}");
    let prev = std::mem::replace(&mut *service.last_live.lock().unwrap(), event_id.clone());
    let event = json!({
        "event_id": event_id,
        "pdu": {"event_id": event_id, "room_id": LIVE_ROOM, "sender": "@alice:us.example", "depth": n,
                "prev_events": [prev], "type": "m.room.message", "content": {"body": "live"}},
        "hosts": [LIVE_DESTINATION, "us.example"],
    });
    let answer = service.client.call("POST", "/_fedsend/v1/events", Some(&event)).await.expect("the API answers");
    assert_eq!(answer.status, 200, "a valid event was refused after the previous input: {answer:?}");
    let start = Instant::now();
    loop {
        if service.transport.delivered.lock().unwrap().remove(&event_id) {
            return;
        }
        assert!(
            start.elapsed() < DELIVERY_BOUND,
            "the sender is wedged: {event_id} not delivered in {DELIVERY_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}
