//! `fedsend demo`: the whole service stack against a small federation it starts itself.
//!
//! SQLite in a temporary directory, the real HTTPS client (certificate checks off for the
//! self-signed remotes, loopback allowlisted), the real ingest API over loopback HTTP, and a
//! handful of loopback remote servers ([`remote`]) that verify every `X-Matrix` signature and
//! misbehave on purpose: flaky ones, one down for the first seconds, one rate-limiting. A
//! workload of signed PDUs in a few rooms, read receipts, typing and to-device messages goes in;
//! progress is printed every second; the run ends with a delivery report and fails unless every
//! remote converged: it has the newest event of each room it shares and every to-device
//! message meant for it, exactly once.

pub mod remote;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedsend_sign::SigningKey;
use serde_json::{Value, json};

use crate::serve::client::IngestClient;
use crate::serve::config::{EngineKind, ServeConfig};
use crate::serve::store::SqliteStore;
use crate::serve::{self, make_engine, make_transport};
use remote::{Behaviour, Remote};

/// Our server name in the demo.
pub const ORIGIN: &str = "fedsend-demo.localhost";
const TOKEN: &str = "demo-ingest-token-not-secret";

/// Command-line arguments of `fedsend demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Which engine runs the core.
    #[arg(long, default_value = "native", value_parser = ["native", "wasm"])]
    pub engine: String,
    /// Events per room.
    #[arg(long, default_value_t = 25)]
    pub events_per_room: u32,
    /// Give up (and fail) if not converged after this many seconds.
    #[arg(long, default_value_t = 50)]
    pub timeout_s: u64,
}

/// The sender settings of the demo: seconds instead of Synapse's minutes, so outages and
/// catch-up play out while you watch.
pub fn demo_sender_settings() -> &'static str {
    "retry_interval_min_ms = 1000\n\
     retry_interval_max_ms = 4000\n\
     http_retry_delay_max_ms = 500\n\
     catch_up_waker_period_ms = 1000\n\
     catch_up_waker_interval_ms = 100\n"
}

/// A demo signing key; the seed only needs to differ between runs, not be secret.
pub fn demo_key() -> SigningKey {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = (nanos.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i as u128 * 1_442_695_040_888_963_407)
            >> (i % 16 * 4)) as u8;
    }
    // Invariant: the key id literal has the required shape.
    SigningKey::generate_from_seed_bytes("ed25519:demo", seed).expect("valid key id")
}

/// What the workload promised each remote.
#[derive(Debug, Default)]
struct Expected {
    /// room → newest event id, per remote name.
    newest: BTreeMap<String, BTreeMap<String, String>>,
    /// to-device message ids, per remote name.
    to_device: BTreeMap<String, Vec<String>>,
}

/// Runs the demo; `Ok(true)` when every remote converged.
pub fn run(args: &DemoArgs) -> Result<bool, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &DemoArgs) -> Result<bool, String> {
    let started = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let key = demo_key();
    let behaviours = [
        Behaviour::default(),
        Behaviour::default(),
        Behaviour { fail_percent: 30, ..Behaviour::default() },
        Behaviour { fail_percent: 50, ..Behaviour::default() },
        Behaviour { down_until: Some(Instant::now() + Duration::from_secs(8)), ..Behaviour::default() },
        Behaviour { rate_limit_every: Some(3), ..Behaviour::default() },
    ];
    let mut remotes = Vec::new();
    for behaviour in behaviours {
        remotes.push(Remote::start(ORIGIN, key.key_id(), &key.public_key_base64(), behaviour).await?);
    }
    println!("fedsend demo: {} loopback remote servers (self-signed TLS, X-Matrix verified):", remotes.len());
    for (i, r) in remotes.iter().enumerate() {
        println!("  r{i} {:<17} {}", r.name(), r.behaviour().describe());
    }

    let config_text = format!(
        "server_name = \"{ORIGIN}\"\nsigning_key_file = \"unused\"\nengine = \"{}\"\n\
         [ingest]\nlisten = \"127.0.0.1:0\"\n\
         [transport]\nverify_tls = false\nip_allowlist = [\"127.0.0.0/8\"]\nconnect_timeout_ms = 2000\nrequest_timeout_ms = 5000\n\
         [sender]\n{}",
        args.engine,
        demo_sender_settings()
    );
    let config = ServeConfig::parse(&config_text)?;
    let database = dir.path().join("fedsend.db");
    let store = SqliteStore::open(&database).map_err(|e| e.to_string())?;
    let transport = make_transport(&config, key.clone())?;
    let engine = make_engine(if args.engine == "wasm" { EngineKind::Wasm } else { EngineKind::Native }, None)?;
    let running = serve::start(&config, engine, Box::new(store), Arc::new(transport), TOKEN.into()).await?;
    let client = IngestClient { addr: running.local_addr, token: Some(TOKEN.into()) };
    println!(
        "service: engine {}, SQLite {}, ingest API http://{}\n",
        args.engine,
        database.display(),
        running.local_addr
    );

    // Rooms and who is in them.
    let names: Vec<String> = remotes.iter().map(|r| r.name().to_owned()).collect();
    let rooms: Vec<(String, Vec<String>)> = vec![
        ("!lobby:fedsend-demo.localhost".into(), names.clone()),
        ("!dev:fedsend-demo.localhost".into(), vec![names[0].clone(), names[2].clone(), names[4].clone()]),
        ("!ops:fedsend-demo.localhost".into(), vec![names[1].clone(), names[3].clone(), names[5].clone()]),
        ("!random:fedsend-demo.localhost".into(), vec![names[2].clone(), names[4].clone(), names[5].clone()]),
    ];
    let workload = {
        let client = client.clone();
        let key = key.clone();
        let rooms = rooms.clone();
        let names = names.clone();
        let events_per_room = args.events_per_room;
        tokio::spawn(async move { workload(&client, &key, &rooms, &names, events_per_room).await })
    };

    let deadline = started + Duration::from_secs(args.timeout_s);
    let mut expected: Option<Expected> = None;
    let mut workload = Some(workload);
    let converged = loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        if workload.as_ref().is_some_and(tokio::task::JoinHandle::is_finished) {
            let finished = workload.take().ok_or("workload vanished")?;
            expected = Some(finished.await.map_err(|e| format!("workload task: {e}"))??);
        }
        let stats = client.call("GET", "/_fedsend/v1/destinations", None).await?;
        progress(started, &remotes, &stats.body, expected.as_ref());
        if expected.as_ref().is_some_and(|e| remotes.iter().all(|r| missing(r, e).is_empty())) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    let metrics = client.call("GET", "/metrics", None).await?;
    running.stop().await;
    let expected = expected.unwrap_or_default();
    report(started, &remotes, &expected, metrics.body.as_str().unwrap_or_default());
    let clean = remotes.iter().all(|r| {
        let got = r.received();
        got.bad_signatures == 0 && got.to_device.values().all(|n| *n == 1)
    });
    Ok(converged && clean)
}

async fn post(client: &IngestClient, path: &str, body: &Value) -> Result<Value, String> {
    let answer = client.call("POST", path, Some(body)).await?;
    if answer.status != 200 {
        return Err(format!("POST {path} refused ({}): {}", answer.status, answer.body));
    }
    Ok(answer.body)
}

/// Feeds the workload through the ingest API and returns what each remote is owed.
async fn workload(
    client: &IngestClient,
    key: &SigningKey,
    rooms: &[(String, Vec<String>)],
    names: &[String],
    events_per_room: u32,
) -> Result<Expected, String> {
    let mut expected = Expected::default();
    let mut previous: BTreeMap<String, String> = BTreeMap::new();
    let alice = format!("@alice:{ORIGIN}");
    for round in 0..=events_per_room {
        for (index, (room, members)) in rooms.iter().enumerate() {
            let event_id = format!("$demo-{index}-{round}");
            let prev: Vec<String> = previous.get(room).cloned().into_iter().collect();
            let mut pdu = json!({
                "event_id": event_id,
                "room_id": room,
                "sender": alice,
                "origin": ORIGIN,
                "origin_server_ts": 0,
                "depth": round + 1,
                "prev_events": prev,
                "auth_events": [],
                "type": if round == 0 { "m.room.create" } else { "m.room.message" },
                "content": if round == 0 { json!({"creator": alice}) } else { json!({"msgtype": "m.text", "body": format!("message {round}")}) },
            });
            fedsend_sign::sign_json(&mut pdu, ORIGIN, key).map_err(|e| format!("signing a PDU: {e}"))?;
            let mut hosts: Vec<&str> = members.iter().map(String::as_str).collect();
            hosts.push(ORIGIN);
            // The create event goes nowhere (the core knows); its hosts are the room's anyway.
            post(client, "/_fedsend/v1/events", &json!({"event_id": event_id, "pdu": pdu, "hosts": hosts})).await?;
            if round > 0 {
                for member in members {
                    expected.newest.entry(member.clone()).or_default().insert(room.clone(), event_id.clone());
                }
            }
            previous.insert(room.clone(), event_id.clone());
            if round % 5 == 1 {
                post(
                    client,
                    "/_fedsend/v1/typing",
                    &json!({"room_id": room, "user_id": alice, "typing": round % 10 == 1, "hosts": members}),
                )
                .await?;
                post(
                    client,
                    "/_fedsend/v1/receipt",
                    &json!({
                        "receipt": {"room_id": room, "receipt_type": "m.read", "user_id": alice, "event_id": event_id, "data": {"ts": 0}},
                        "hosts": members,
                    }),
                )
                .await?;
            }
        }
        if round % 8 == 3 {
            for name in names {
                let message_id = format!("td-{round}-{name}");
                post(
                    client,
                    "/_fedsend/v1/to_device",
                    &json!({
                        "sender": alice,
                        "message_type": "m.room_key_request",
                        "message_id": message_id,
                        "messages": {format!("@bob:{name}"): {"*": {"round": round}}},
                    }),
                )
                .await?;
                expected.to_device.entry(name.clone()).or_default().push(message_id);
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    Ok(expected)
}

/// What `remote` still lacks: newest events and to-device ids.
fn missing(remote: &Remote, expected: &Expected) -> Vec<String> {
    let got = remote.received();
    let mut lacking = Vec::new();
    for (room, newest) in expected.newest.get(remote.name()).into_iter().flatten() {
        if !got.events.get(room).is_some_and(|ids| ids.contains(newest)) {
            lacking.push(newest.clone());
        }
    }
    for id in expected.to_device.get(remote.name()).into_iter().flatten() {
        if !got.to_device.contains_key(id) {
            lacking.push(id.clone());
        }
    }
    lacking
}

fn progress(started: Instant, remotes: &[Remote], stats: &Value, expected: Option<&Expected>) {
    let empty = Vec::new();
    let rows = stats["destinations"].as_array().unwrap_or(&empty);
    let now_ms = serve::driver::now_ms();
    let mut line = format!("[{:>5.1}s]", started.elapsed().as_secs_f64());
    let (mut queued, mut backing_off) = (0, 0);
    for (i, remote) in remotes.iter().enumerate() {
        let row = rows.iter().find(|r| r["destination"] == remote.name());
        let state = row.and_then(|r| r["state"].as_str()).unwrap_or("-");
        let q = row.and_then(|r| r["queued_pdus"].as_u64()).unwrap_or(0)
            + row.and_then(|r| r["queued_edus"].as_u64()).unwrap_or(0);
        queued += q;
        let wait = row
            .and_then(|r| r["backoff_until_ts"].as_u64())
            .map(|until| until.saturating_sub(now_ms))
            .filter(|ms| *ms > 0);
        if matches!(state, "backing_off" | "gone") {
            backing_off += 1;
        }
        let got: usize = remote.received().events.values().map(|ids| ids.len()).sum();
        let done = expected.is_some_and(|e| missing(remote, e).is_empty());
        let wait = wait.map(|ms| format!(" {:.1}s", ms as f64 / 1000.0)).unwrap_or_default();
        line.push_str(&format!(" | r{i} {state}{wait} q{q} got{got}{}", if done { " ✓" } else { "" }));
    }
    println!("{line} || queued {queued}, backing off {backing_off}");
    let _ = std::io::stdout().flush();
}

fn report(started: Instant, remotes: &[Remote], expected: &Expected, metrics: &str) {
    println!("\ndelivery report after {:.1}s", started.elapsed().as_secs_f64());
    println!(
        "  remote                   behaviour         newest event/room  to-device (exactly once)  refused  bad sigs  result"
    );
    for (i, remote) in remotes.iter().enumerate() {
        let got = remote.received();
        let rooms = expected.newest.get(remote.name()).map_or(0, BTreeMap::len);
        let lacking = missing(remote, expected);
        let td_expected = expected.to_device.get(remote.name()).map_or(0, Vec::len);
        let td_once = got.to_device.values().filter(|n| **n == 1).count();
        let td_dup = got.to_device.values().filter(|n| **n > 1).count();
        let newest_missing = lacking.iter().filter(|id| id.starts_with('$')).count();
        let ok = lacking.is_empty() && td_dup == 0 && got.bad_signatures == 0;
        println!(
            "  r{i} {:<21} {:<17} {:>2}/{:<2} rooms        {:>2}/{:<2} ({} duplicated)       {:>5}  {:>8}  {}",
            remote.name(),
            remote.behaviour().describe(),
            rooms - newest_missing,
            rooms,
            td_once,
            td_expected,
            td_dup,
            got.refused,
            got.bad_signatures,
            if ok { "converged" } else { "NOT CONVERGED" }
        );
    }
    for line in metrics.lines() {
        if line.starts_with("synapse_federation_client_sent_") && !line.starts_with('#') {
            println!("  {line}");
        }
    }
}
