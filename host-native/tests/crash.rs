//! Crash safety: the built `fedsend serve` is killed with SIGKILL at seeded pseudo-random
//! points while the test feeds it events and to-device messages and it sends them to flaky
//! loopback remotes, then restarted each time. Some kill points fall while its storage fails:
//! every file write of the process fails as on a full disk, so submissions are answered 503
//! and the core's failed batches wait for their retry when the kill lands; at others storage
//! recovers first. The test resubmits whatever was not acknowledged, with the same id, until it
//! is. At the end every remote must have the newest event of each room it shares and every
//! acknowledged to-device message (exactly once after the receiver's deduplication by message
//! id), and the database must hold every event the ingest API ever acknowledged.
//!
//! Storage fails for real, through SQLite's own error paths, with nothing compiled into the
//! service for it: the test lowers the running service's file size limit (`RLIMIT_FSIZE`, set
//! with util-linux `prlimit`) to 0, so the kernel refuses every write to a regular file with
//! EFBIG, which SQLite reports as a disk I/O error; raising the limit heals it. Reads go on
//! working, as on a full disk (failing reads are the simulator's storage faults). Needs no
//! privilege beyond owning the process, unlike a full filesystem (a mount) or an unwritable
//! file (which root writes anyway).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
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
/// Pause before resubmitting what was answered 503, as a client backing off would.
const RESUBMIT_AFTER_503_MS: u64 = 50;
/// The core re-issues a failed storage request this long after the failure
/// (`STORAGE_RETRY_DELAY_MS` in the core); recovery points outlast it, so the retries land.
const CORE_STORAGE_RETRY_MS: u64 = 1000;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }

    fn between_ms(&mut self, low_ms: u64, high_ms: u64) -> Duration {
        Duration::from_millis(low_ms + self.below(high_ms - low_ms))
    }
}

/// Starts the service and returns it with its API address (from its "listening on" line).
fn start_service(config: &Path, log: &Path) -> (Child, SocketAddr) {
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    // A write beyond the file size limit also raises SIGXFSZ, whose default action kills the
    // process: ignored (an ignored signal stays ignored across exec), the write just fails
    // with EFBIG for SQLite to report, as on a full disk.
    let mut child = Command::new("sh")
        .args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_fedsend"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The test writes the service's log, not the service: its own file writes fail on purpose
    // at times, and its log of those failures is what explains a failed run.
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut log));
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (child, addr.parse().unwrap())
}

/// Makes every file write of the running service fail (file size limit 0), or work again.
fn set_writes_failing(service: &Child, failing: bool) {
    let soft_limit = if failing { "--fsize=0:" } else { "--fsize=unlimited:" };
    let status = Command::new("prlimit")
        .args(["--pid", &service.id().to_string(), soft_limit])
        .status()
        .unwrap_or_else(|e| panic!("cannot run prlimit (util-linux): {e}"));
    assert!(status.success(), "prlimit {soft_limit} on the service failed: {status}");
}

/// Storage failures the service counted (`fedsend_storage_failures_total`).
async fn storage_failures_counted(client: &IngestClient) -> u64 {
    let answer = client.call("GET", "/metrics", None).await.expect("the service answers /metrics");
    let text = answer.body.as_str().unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("fedsend_storage_failures_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fedsend_storage_failures_total in /metrics: {text}"))
}

/// How one run of the service ends.
#[derive(Clone, Copy, Debug)]
enum KillPoint {
    /// Killed while storage works.
    Healthy { running: Duration },
    /// Writes fail from `healthy` on, and the kill lands while they still fail: submissions
    /// meanwhile are answered 503 and the core's failed batches are waiting for their retry.
    DuringStorageFailure { healthy: Duration, failing: Duration },
    /// Writes fail for a while, then work again before the kill: the same process takes the
    /// resubmissions and its core's retries land.
    AfterStorageRecovery { healthy: Duration, failing: Duration, recovered: Duration },
}

impl KillPoint {
    fn draw(rng: &mut Rng) -> Self {
        match rng.below(6) {
            0 | 1 => {
                Self::DuringStorageFailure { healthy: rng.between_ms(50, 300), failing: rng.between_ms(300, 1300) }
            }
            2 => Self::AfterStorageRecovery {
                healthy: rng.between_ms(50, 300),
                failing: rng.between_ms(300, 800),
                recovered: rng.between_ms(CORE_STORAGE_RETRY_MS + 100, CORE_STORAGE_RETRY_MS + 600),
            },
            _ => Self::Healthy { running: rng.between_ms(50, 500) },
        }
    }
}

/// One event submission, retried with the same id until acknowledged.
#[derive(Clone, Debug)]
struct Submission {
    event_id: String,
    body: Value,
}

/// One to-device submission, retried with the same message id until acknowledged.
#[derive(Clone, Debug)]
struct ToDevice {
    remote: String,
    message_id: String,
    body: Value,
}

/// What became of one submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Acknowledged,
    /// 503: storage failed; nothing may have been stored, so the same submission is due again.
    Unavailable,
    /// No answer: the service went away (killed); whether it was stored is unknown.
    NoAnswer,
}

#[derive(Default)]
struct Ledger {
    /// Events acknowledged by the API.
    acked_events: BTreeSet<String>,
    /// Submitted but not (yet) acknowledged, in order; resubmitted before any new event, so a
    /// room's create event is always stored before the room's other events.
    unacked: VecDeque<Submission>,
    /// Events some submission of which got no answer: they may be stored already.
    unanswered_events: BTreeSet<String>,
    /// Events answered 503 at least once.
    refused_events: BTreeSet<String>,
    /// To-device messages acknowledged, per remote name.
    acked_to_device: BTreeMap<String, BTreeSet<String>>,
    /// To-device messages submitted but not (yet) acknowledged, in order.
    unacked_to_device: VecDeque<ToDevice>,
    /// Every to-device message id ever submitted.
    submitted_to_device: BTreeSet<String>,
    /// To-device messages answered 503 at least once.
    refused_to_device: BTreeSet<String>,
    /// 503 answers to event submissions.
    event_answers_503: u64,
    /// 503 answers to to-device submissions.
    to_device_answers_503: u64,
    /// Acknowledgements of submissions answered 503 before.
    acked_after_503: u64,
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

    fn new_to_device(&mut self, remote: &str) -> ToDevice {
        self.next += 1;
        let message_id = format!("td-{}", self.next);
        self.submitted_to_device.insert(message_id.clone());
        let body = json!({
            "sender": format!("@u:{ORIGIN}"), "message_type": "m.test", "message_id": message_id,
            "messages": {format!("@v:{remote}"): {"*": {"n": self.next}}},
        });
        ToDevice { remote: remote.to_owned(), message_id, body }
    }

    /// Submits the oldest unacknowledged event; it stays first in line unless acknowledged.
    async fn submit_oldest_event(&mut self, client: &IngestClient) -> Outcome {
        let Some(submission) = self.unacked.front() else { return Outcome::Acknowledged };
        let event_id = submission.event_id.clone();
        match client.call("POST", "/_fedsend/v1/events", Some(&submission.body)).await {
            Ok(answer) if answer.status == 200 => {
                if self.refused_events.contains(&event_id) {
                    self.acked_after_503 += 1;
                    // A 503 promises that nothing was stored: unless an unanswered attempt
                    // may have stored it, the event must be new to the store now.
                    if !self.unanswered_events.contains(&event_id) {
                        assert_eq!(
                            answer.body["new"],
                            json!(true),
                            "{event_id} was answered 503 yet had been stored: {answer:?}"
                        );
                    }
                }
                self.unacked.pop_front();
                self.acked_events.insert(event_id);
                Outcome::Acknowledged
            }
            Ok(answer) if answer.status == 503 => {
                self.event_answers_503 += 1;
                self.refused_events.insert(event_id);
                Outcome::Unavailable
            }
            Ok(answer) => panic!("event {event_id} refused: {answer:?}"),
            Err(_) => {
                self.unanswered_events.insert(event_id);
                Outcome::NoAnswer
            }
        }
    }

    /// Submits the oldest unacknowledged to-device message; it stays first in line unless
    /// acknowledged.
    async fn submit_oldest_to_device(&mut self, client: &IngestClient) -> Outcome {
        let Some(message) = self.unacked_to_device.front() else { return Outcome::Acknowledged };
        match client.call("POST", "/_fedsend/v1/to_device", Some(&message.body)).await {
            Ok(answer) if answer.status == 200 => {
                if self.refused_to_device.contains(&message.message_id) {
                    self.acked_after_503 += 1;
                }
                let message = self.unacked_to_device.pop_front().unwrap();
                self.acked_to_device.entry(message.remote).or_default().insert(message.message_id);
                Outcome::Acknowledged
            }
            Ok(answer) if answer.status == 503 => {
                self.to_device_answers_503 += 1;
                self.refused_to_device.insert(message.message_id.clone());
                Outcome::Unavailable
            }
            Ok(answer) => panic!("to-device {} refused: {answer:?}", message.message_id),
            Err(_) => Outcome::NoAnswer,
        }
    }

    /// Resubmits everything not acknowledged, once each, to a service whose storage works.
    async fn resubmit_all(&mut self, client: &IngestClient) {
        while !self.unacked.is_empty() {
            let outcome = self.submit_oldest_event(client).await;
            assert_eq!(outcome, Outcome::Acknowledged, "resubmitting {:?}", self.unacked.front());
        }
        while !self.unacked_to_device.is_empty() {
            let outcome = self.submit_oldest_to_device(client).await;
            assert_eq!(outcome, Outcome::Acknowledged, "resubmitting {:?}", self.unacked_to_device.front());
        }
    }
}

/// Feeds events and to-device messages until the service stops answering. What was not
/// acknowledged is resubmitted, same id, before anything new: a client that got 503 retries.
async fn ingest(client: IngestClient, mut ledger: Ledger, names: Vec<String>, seed: u64) -> Ledger {
    let mut rng = Rng(seed);
    let rooms = rooms(&names);
    loop {
        if ledger.unacked.is_empty() {
            let (room, members) = &rooms[rng.below(rooms.len() as u64) as usize];
            let submission = ledger.new_event(room, members);
            ledger.unacked.push_back(submission);
        }
        let mut outcome = ledger.submit_oldest_event(&client).await;
        // After a 503 always: a to-device message refused then proves that a batch of the
        // core's failed and awaits its retry.
        if outcome == Outcome::Unavailable || (outcome == Outcome::Acknowledged && rng.below(4) == 0) {
            if ledger.unacked_to_device.is_empty() {
                let message = ledger.new_to_device(&names[rng.below(names.len() as u64) as usize]);
                ledger.unacked_to_device.push_back(message);
            }
            outcome = match ledger.submit_oldest_to_device(&client).await {
                Outcome::Acknowledged => outcome,
                other => other,
            };
        }
        match outcome {
            Outcome::Acknowledged => {}
            Outcome::Unavailable => tokio::time::sleep(Duration::from_millis(RESUBMIT_AFTER_503_MS)).await,
            Outcome::NoAnswer => return ledger,
        }
    }
}

/// What the storage-failure kill points did, for the summary and its checks.
#[derive(Default)]
struct FailureTally {
    /// Each after a to-device message was answered 503 in that run: the core's batch holding
    /// it had failed, and with writes failing since, its retry was still pending at the kill.
    kills_while_failing: u32,
    kills_after_recovery: u32,
    /// `fedsend_storage_failures_total` of the processes killed while failing, just before.
    storage_failures_counted: u64,
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
    let mut tally = FailureTally::default();
    for point in 0..kill_points {
        let (mut child, addr) = start_service(&config, &log);
        let client = IngestClient { addr, token: Some(TOKEN.into()) };
        let event_answers_503_before = ledger.event_answers_503;
        let to_device_answers_503_before = ledger.to_device_answers_503;
        let acked_after_503_before = ledger.acked_after_503;
        let feeding = tokio::spawn(ingest(client.clone(), ledger, names.clone(), SEED + u64::from(point)));
        let kill_point = KillPoint::draw(&mut rng);
        match kill_point {
            KillPoint::Healthy { running } => tokio::time::sleep(running).await,
            KillPoint::DuringStorageFailure { healthy, failing } => {
                tokio::time::sleep(healthy).await;
                set_writes_failing(&child, true);
                tokio::time::sleep(failing).await;
                tally.storage_failures_counted += storage_failures_counted(&client).await;
            }
            KillPoint::AfterStorageRecovery { healthy, failing, recovered } => {
                tokio::time::sleep(healthy).await;
                set_writes_failing(&child, true);
                tokio::time::sleep(failing).await;
                set_writes_failing(&child, false);
                tokio::time::sleep(recovered).await;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        ledger = feeding.await.unwrap();
        let log_hint = format!("kill point {point} ({kill_point:?}); log in {}", log.display());
        match kill_point {
            KillPoint::Healthy { .. } => {}
            KillPoint::DuringStorageFailure { .. } => {
                assert!(ledger.event_answers_503 > event_answers_503_before, "no event was answered 503: {log_hint}");
                assert!(
                    ledger.to_device_answers_503 > to_device_answers_503_before,
                    "no to-device message was answered 503, so no batch of the core's is known to await its retry: {log_hint}"
                );
                tally.kills_while_failing += 1;
            }
            KillPoint::AfterStorageRecovery { .. } => {
                assert!(ledger.event_answers_503 > event_answers_503_before, "no event was answered 503: {log_hint}");
                assert!(
                    ledger.acked_after_503 > acked_after_503_before,
                    "nothing answered 503 was acknowledged once storage worked again: {log_hint}"
                );
                tally.kills_after_recovery += 1;
            }
        }
    }
    println!(
        "crash test: {kill_points} kill -9 points (seed {SEED:#x}); {} events and {} to-device messages acknowledged so far",
        ledger.acked_events.len(),
        ledger.acked_to_device.values().map(BTreeSet::len).sum::<usize>()
    );
    if tally.kills_while_failing > 0 {
        assert!(
            tally.storage_failures_counted > 0,
            "the service counted no storage failure while its writes failed; log in {}",
            log.display()
        );
    }

    // Last start, storage working: everything not acknowledged is submitted again (same ids),
    // so the newest event of each room is acknowledged; no fresh event is added, so delivering
    // those relies on recovery and catch-up alone.
    let (mut child, addr) = start_service(&config, &log);
    let client = IngestClient { addr, token: Some(TOKEN.into()) };
    ledger.resubmit_all(&client).await;
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
        "crash test: writes failing at {} kills, each with a core storage retry pending; recovered before {} more; \
         {} events and {} to-device messages answered 503 ({} and {} answers), all resubmitted with the same id and \
         acknowledged; the services killed while failing had counted {} storage failures",
        tally.kills_while_failing,
        tally.kills_after_recovery,
        ledger.refused_events.len(),
        ledger.refused_to_device.len(),
        ledger.event_answers_503,
        ledger.to_device_answers_503,
        tally.storage_failures_counted
    );
    println!(
        "crash test: converged after {kill_points} kill points in {:.1}s; {} acknowledged events all stored; \
         {} to-device redeliveries (crashes, resubmissions after 503) deduplicated by message id",
        started.elapsed().as_secs_f64(),
        ledger.acked_events.len(),
        redelivered
    );
}
