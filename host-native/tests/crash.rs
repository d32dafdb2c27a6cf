//! Crash safety: the built `fedsend serve` is killed with SIGKILL at seeded pseudo-random
//! points while the test feeds it events and to-device messages and it sends them to flaky
//! loopback remotes, then restarted each time. At the end every remote must have the newest
//! event of each room it shares and every acknowledged to-device message (exactly once after
//! the receiver's deduplication by message id), and the database must hold every event the
//! ingest API ever acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedsend_host_native::demo::remote::{Behaviour, Remote};
use fedsend_host_native::serve::client::IngestClient;
use fedsend_host_native::serve::store::{SqliteStore, Store};
use fedsend_sign::SigningKey;
use serde_json::{Value, json};

const ORIGIN: &str = "crash.localhost";
const TOKEN: &str = "crash-test-token-0123456789";
/// Kill points of the run in the test command; `FEDSEND_CRASH_POINTS=100` is the long run.
const KILL_POINTS_DEFAULT: u32 = 24;
const SEED: u64 = 0x5eed_f00d;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Starts the service and returns it with its API address (from its "listening on" line).
fn start_service(config: &Path, log: &Path) -> (Child, SocketAddr) {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedsend"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (child, addr.parse().unwrap())
}

/// One event submission, retried with the same id until acknowledged.
#[derive(Clone, Debug)]
struct Submission {
    event_id: String,
    body: Value,
}

#[derive(Default)]
struct Ledger {
    /// Events acknowledged by the API.
    acked_events: BTreeSet<String>,
    /// Submitted but not (yet) acknowledged, in order.
    unacked: Vec<Submission>,
    /// To-device messages acknowledged, per remote name.
    acked_to_device: BTreeMap<String, BTreeSet<String>>,
    /// Every to-device message id ever submitted.
    submitted_to_device: BTreeSet<String>,
    next: u64,
    last_in_room: BTreeMap<String, String>,
}

fn rooms(names: &[String]) -> Vec<(String, Vec<String>)> {
    vec![
        (format!("!a:{ORIGIN}"), names.to_vec()),
        (format!("!b:{ORIGIN}"), vec![names[0].clone(), names[1].clone()]),
        (format!("!c:{ORIGIN}"), vec![names[2].clone(), names[3].clone()]),
    ]
}

impl Ledger {
    fn new_event(&mut self, room: &str, members: &[String]) -> Submission {
        self.next += 1;
        let event_id = format!("$crash-{}", self.next);
        let prev: Vec<String> = self.last_in_room.get(room).cloned().into_iter().collect();
        let pdu = json!({
            "event_id": event_id, "room_id": room, "sender": format!("@u:{ORIGIN}"), "depth": self.next,
            "prev_events": prev, "type": if prev.is_empty() { "m.room.create" } else { "m.room.message" }, "content": {},
        });
        let mut hosts = members.to_vec();
        hosts.push(ORIGIN.into());
        self.last_in_room.insert(room.to_owned(), event_id.clone());
        Submission { event_id: event_id.clone(), body: json!({"event_id": event_id, "pdu": pdu, "hosts": hosts}) }
    }

    /// Submits `submission`; true when acknowledged.
    async fn submit(&mut self, client: &IngestClient, submission: Submission) -> bool {
        match client.call("POST", "/_fedsend/v1/events", Some(&submission.body)).await {
            Ok(answer) if answer.status == 200 => {
                self.acked_events.insert(submission.event_id);
                true
            }
            Ok(answer) => panic!("event refused: {answer:?}"),
            Err(_) => {
                self.unacked.push(submission);
                false
            }
        }
    }

    async fn send_to_device(&mut self, client: &IngestClient, remote: &str) -> bool {
        self.next += 1;
        let message_id = format!("td-{}", self.next);
        self.submitted_to_device.insert(message_id.clone());
        let body = json!({
            "sender": format!("@u:{ORIGIN}"), "message_type": "m.test", "message_id": message_id,
            "messages": {format!("@v:{remote}"): {"*": {"n": self.next}}},
        });
        match client.call("POST", "/_fedsend/v1/to_device", Some(&body)).await {
            Ok(answer) if answer.status == 200 => {
                self.acked_to_device.entry(remote.to_owned()).or_default().insert(message_id);
                true
            }
            Ok(answer) => panic!("to-device refused: {answer:?}"),
            Err(_) => false,
        }
    }

    /// Re-submits what was not acknowledged; false if the service went away meanwhile.
    async fn retry_unacked(&mut self, client: &IngestClient) -> bool {
        for submission in std::mem::take(&mut self.unacked) {
            if !self.submit(client, submission).await {
                return false;
            }
        }
        true
    }
}

/// Feeds events and to-device messages until the service stops answering.
async fn ingest(client: IngestClient, mut ledger: Ledger, names: Vec<String>, seed: u64) -> Ledger {
    let mut rng = Rng(seed);
    if !ledger.retry_unacked(&client).await {
        return ledger;
    }
    let rooms = rooms(&names);
    loop {
        let (room, members) = &rooms[rng.below(rooms.len() as u64) as usize];
        let submission = ledger.new_event(room, members);
        if !ledger.submit(&client, submission).await {
            return ledger;
        }
        if rng.below(4) == 0 {
            let remote = &names[rng.below(names.len() as u64) as usize];
            if !ledger.send_to_device(&client, remote).await {
                return ledger;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_at_random_points_loses_nothing_acknowledged() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate_from_seed_bytes("ed25519:crash", [7; 32]).unwrap();
    std::fs::write(dir.path().join("signing.key"), key.to_synapse_key_file()).unwrap();
    let mut remotes = Vec::new();
    for behaviour in [
        Behaviour::default(),
        Behaviour { fail_percent: 30, ..Behaviour::default() },
        Behaviour { fail_percent: 30, ..Behaviour::default() },
        Behaviour { rate_limit_every: Some(4), ..Behaviour::default() },
    ] {
        remotes.push(Remote::start(ORIGIN, key.key_id(), &key.public_key_base64(), behaviour).await.unwrap());
    }
    let names: Vec<String> = remotes.iter().map(|r| r.name().to_owned()).collect();
    let config = dir.path().join("fedsend.toml");
    std::fs::write(
        &config,
        format!(
            "server_name = \"{ORIGIN}\"\nsigning_key_file = \"signing.key\"\ndatabase = \"fedsend.db\"\n\
             [ingest]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\
             [transport]\nverify_tls = false\nip_allowlist = [\"127.0.0.0/8\"]\nconnect_timeout_ms = 2000\nrequest_timeout_ms = 5000\n\
             [sender]\n{}",
            fedsend_host_native::demo::demo_sender_settings()
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");

    let kill_points: u32 = match std::env::var("FEDSEND_CRASH_POINTS") {
        Ok(text) => text.parse().expect("FEDSEND_CRASH_POINTS is a number of kill points"),
        Err(_) => KILL_POINTS_DEFAULT,
    };
    let mut rng = Rng(SEED);
    let mut ledger = Ledger::default();
    for point in 0..kill_points {
        let (mut child, addr) = start_service(&config, &log);
        let client = IngestClient { addr, token: Some(TOKEN.into()) };
        let feeding = tokio::spawn(ingest(client, ledger, names.clone(), SEED + u64::from(point)));
        tokio::time::sleep(Duration::from_millis(50 + rng.below(450))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        ledger = feeding.await.unwrap();
    }
    println!(
        "crash test: {kill_points} kill -9 points (seed {SEED:#x}); {} events and {} to-device messages acknowledged so far",
        ledger.acked_events.len(),
        ledger.acked_to_device.values().map(BTreeSet::len).sum::<usize>()
    );

    // Last start: everything not acknowledged is submitted again (same ids), so the newest
    // event of each room is acknowledged; no fresh event is added, so delivering those relies
    // on recovery and catch-up alone.
    let (mut child, addr) = start_service(&config, &log);
    let client = IngestClient { addr, token: Some(TOKEN.into()) };
    assert!(ledger.retry_unacked(&client).await, "service answered after the last restart");
    let mut newest: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (room, members) in rooms(&names) {
        let id = ledger.last_in_room[&room].clone();
        assert!(ledger.acked_events.contains(&id));
        for member in members {
            newest.entry(member).or_default().insert(room.clone(), id.clone());
        }
    }
    let missing = |remotes: &[Remote], ledger: &Ledger| -> Vec<String> {
        let mut lacking = Vec::new();
        for remote in remotes {
            let got = remote.received();
            for (room, id) in newest.get(remote.name()).into_iter().flatten() {
                if !got.events.get(room).is_some_and(|ids| ids.contains(id)) {
                    lacking.push(format!("{} lacks {id} in {room}", remote.name()));
                }
            }
            for id in ledger.acked_to_device.get(remote.name()).into_iter().flatten() {
                if !got.to_device.contains_key(id) {
                    lacking.push(format!("{} lacks to-device {id}", remote.name()));
                }
            }
        }
        lacking
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lacking = missing(&remotes, &ledger);
    while !lacking.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        lacking = missing(&remotes, &ledger);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lacking.is_empty(), "not converged: {lacking:?}; log in {}", log.display());

    let mut redelivered = 0;
    for remote in &remotes {
        let got = remote.received();
        assert_eq!(got.bad_signatures, 0);
        for (id, count) in &got.to_device {
            assert!(
                ledger.submitted_to_device.contains(id),
                "{} got a to-device message nobody sent: {id}",
                remote.name()
            );
            redelivered += count - 1;
        }
    }
    // Nothing acknowledged was lost: every acknowledged event is in the database.
    let mut store = SqliteStore::open(&dir.path().join("fedsend.db")).unwrap();
    let stored: BTreeSet<String> = store.fetch_events(0, u32::MAX).unwrap().into_iter().map(|e| e.event_id).collect();
    let lost: Vec<&String> = ledger.acked_events.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged events lost: {lost:?}");
    println!(
        "crash test: converged after {kill_points} kill points in {:.1}s; {} acknowledged events all stored; \
         {} to-device redeliveries across crashes, deduplicated by message id",
        started.elapsed().as_secs_f64(),
        ledger.acked_events.len(),
        redelivered
    );
}
