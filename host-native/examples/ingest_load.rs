//! Ingest load: how many events per second `fedsend serve` makes durable on a real disk, and
//! how `/health` answers meanwhile. A benchmark, not a test: it prints figures.
//!
//! ```sh
//! cargo run --release -p fedsend-host-native --example ingest_load -- [DIR] [EVENTS] [CLIENTS]
//! ```
//!
//! The service runs in process with its SQLite store in DIR (default: a temporary directory
//! under the current directory, so on the same disk as the checkout rather than a tmpfs), the
//! native engine and a transport that accepts every transaction at once. CLIENTS concurrent
//! clients submit EVENTS events in all (one room, each event routed to one remote), while a
//! prober asks `/health` every 10 ms. Printed: events per second, the share of submissions
//! answered 200, and `/health` latency (median, p99, max).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fedsend_core::TransactionResult;
use fedsend_host_native::serve::client::IngestClient;
use fedsend_host_native::serve::config::ServeConfig;
use fedsend_host_native::serve::driver::Transport;
use fedsend_host_native::serve::store::SqliteStore;
use fedsend_host_native::serve::{self};
use serde_json::json;

const TOKEN: &str = "load-test-token-0123456789";

/// Every transaction accepted at once: the cost measured is ingest and storage.
struct Accepting(AtomicU64);

impl Transport for Accepting {
    fn send<'a>(
        &'a self,
        _destination: &'a str,
        _txn_id: &'a str,
        _body: &'a str,
    ) -> Pin<Box<dyn Future<Output = TransactionResult> + Send + 'a>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { TransactionResult::Ok { pdu_errors: Default::default() } })
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = match args.first() {
        Some(dir) => std::path::PathBuf::from(dir),
        None => tempfile::tempdir_in(".").expect("a temporary directory here").keep(),
    };
    let events: u64 = args.get(1).map_or(5_000, |n| n.parse().expect("EVENTS is a number"));
    let clients: u64 = args.get(2).map_or(32, |n| n.parse().expect("CLIENTS is a number"));
    std::fs::create_dir_all(&dir).expect("the database directory");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(run(&dir, events, clients));
    let _ = std::fs::remove_dir_all(&dir);
}

async fn run(dir: &std::path::Path, events: u64, clients: u64) {
    let config = ServeConfig::parse(
        "server_name = \"us.example\"\nsigning_key_file = \"unused\"\n[ingest]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("config");
    let store = SqliteStore::open(&dir.join("fedsend.db")).expect("the SQLite store");
    let transport = Arc::new(Accepting(AtomicU64::new(0)));
    let engine = serve::make_engine(config.engine, None).expect("engine");
    let running =
        serve::start(&config, engine, Box::new(store), transport.clone(), TOKEN.into()).await.expect("service");
    let client = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
    const ROOM: &str = "!load:us.example";
    let pdu = |id: &str, depth: u64, prev: &[&str]| {
        json!({"event_id": id, "room_id": ROOM, "sender": "@a:us.example", "depth": depth, "prev_events": prev,
               "type": "m.room.message", "content": {"body": "load"}})
    };
    let create = json!({"event_id": "$create", "pdu": pdu("$create", 1, &[])});
    assert_eq!(client.call("POST", "/_fedsend/v1/events", Some(&create)).await.expect("create").status, 200);

    let done = Arc::new(AtomicBool::new(false));
    let prober = {
        let (client, done) = (client.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let answer = client.call("GET", "/health", None).await;
                latencies.push(asked.elapsed());
                assert!(answer.is_ok(), "/health answered");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            latencies
        })
    };
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, next, accepted) = (client.clone(), Arc::clone(&next), Arc::clone(&accepted));
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= events {
                    break;
                }
                let id = format!("$e{k}");
                let event = json!({"event_id": id, "pdu": pdu(&id, 2, &["$create"]), "hosts": ["remote.example"]});
                if client.call("POST", "/_fedsend/v1/events", Some(&event)).await.is_ok_and(|a| a.status == 200) {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("a client task");
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut latencies = prober.await.expect("the prober");
    latencies.sort();
    let accepted = accepted.load(Ordering::Relaxed);
    println!(
        "ingest: {events} events from {clients} clients in {:.2} s: {:.0} events/s durable, {accepted} answered 200; \
         /health over {} probes: median {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} transactions sent",
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64(),
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        transport.0.load(Ordering::Relaxed),
    );
    running.stop().await;
}
