//! `fedsend-service-bench`: the service end to end. `fedsend serve` (the real binary, its own
//! process: SQLite in a temporary directory, the HTTPS client with X-Matrix signing, the
//! ingest API) delivers a burst of E events in one room to R loopback HTTPS remotes, each of
//! them the demo's remote (`fedsend_service::demo::remote`: self-signed TLS, every X-Matrix
//! signature verified, 200 at once). The events go in through the ingest API, as a homeserver
//! would send them; the clock stops when every remote has every event.
//!
//! ```text
//! fedsend-service-bench [--events E] [--remotes R] [--fedsend PATH] [--engine native|wasm]
//!                       [--clients N] [--sends-in-flight N] [--timeout-s S] [--perf FILE]
//!                       [--json FILE] [--log FILE] [--check]
//! fedsend-service-bench --perf-report FILE     # the grouped split of an earlier --perf FILE
//! ```
//!
//! The remotes, the submitting clients and the checks run in this process and the service in
//! its own, so the service's CPU time and memory are read from `/proc/<pid>` of that process
//! alone. `--perf FILE` samples the service with `perf record` during the burst only and
//! prints where its user-space time went, grouped (signing, TLS, SQLite, JSON, ...).
//! `--check` exits non-zero unless every remote received every event exactly once, no
//! signature failed and nothing was refused; it never judges timings.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedsend_service::demo::remote::{Behaviour, Remote};
use fedsend_service::serve::client::IngestClient;
use fedsend_sign::SigningKey;
use serde_json::{Value, json};

const ORIGIN: &str = "fedsend-bench.localhost";
const ROOM: &str = "!burst:fedsend-bench.localhost";
const TOKEN: &str = "service-bench-ingest-token";
/// bench/src/lib.rs `T0`, so the PDUs are those of workload WS and of Synapse's side.
const T0_MS: u64 = 1_700_000_000_000;

struct Args {
    events: u64,
    remotes: usize,
    fedsend: Option<PathBuf>,
    engine: String,
    clients: usize,
    sends_in_flight: usize,
    timeout_s: u64,
    perf: Option<PathBuf>,
    json: Option<PathBuf>,
    log: Option<PathBuf>,
    perf_report: Option<PathBuf>,
    check: bool,
}

const USAGE: &str = "fedsend-service-bench [--events E (300)] [--remotes R (1000)] [--fedsend PATH] \
[--engine native|wasm] [--clients N (16)] [--sends-in-flight N (64)] [--timeout-s S (600)] [--perf FILE] \
[--json FILE] [--log FILE] [--check] | --perf-report FILE";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        events: 300,
        remotes: 1000,
        fedsend: None,
        engine: "native".into(),
        clients: 16,
        sends_in_flight: 64,
        timeout_s: 600,
        perf: None,
        json: None,
        log: None,
        perf_report: None,
        check: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |text: String| text.parse::<u64>().map_err(|e| format!("{flag} {text:?}: {e}"));
        match flag.as_str() {
            "--events" => args.events = number(value()?)?,
            "--remotes" => args.remotes = usize::try_from(number(value()?)?).map_err(|e| e.to_string())?,
            "--fedsend" => args.fedsend = Some(value()?.into()),
            "--engine" => args.engine = value()?,
            "--clients" => args.clients = usize::try_from(number(value()?)?).map_err(|e| e.to_string())?,
            "--sends-in-flight" => {
                args.sends_in_flight = usize::try_from(number(value()?)?).map_err(|e| e.to_string())?;
            }
            "--timeout-s" => args.timeout_s = number(value()?)?,
            "--perf" => args.perf = Some(value()?.into()),
            "--json" => args.json = Some(value()?.into()),
            "--log" => args.log = Some(value()?.into()),
            "--perf-report" => args.perf_report = Some(value()?.into()),
            "--check" => args.check = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.events == 0 || args.remotes == 0 || args.clients == 0 || args.sends_in_flight == 0 {
        return Err("--events, --remotes, --clients and --sends-in-flight must be at least 1".into());
    }
    if !matches!(args.engine.as_str(), "native" | "wasm") {
        return Err(format!("--engine {:?}: native or wasm", args.engine));
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("fedsend-service-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(file) = &args.perf_report {
        return match perf_split(file) {
            Ok(split) => {
                split.iter().for_each(|(group, percent)| println!("{percent:5.1}%  {group}"));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fedsend-service-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fedsend-service-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fedsend-service-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// R remotes hold a listener and a connection each, and so does the service per remote: far
/// past the usual soft limit of 1 024 descriptors. The child inherits the raised limit.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The PDU of workload WS (bench/src/lib.rs `pdu`, and Synapse's side), plus `event_id`,
/// which the remote reads to record what it got.
fn pdu(k: u64) -> Value {
    json!({
        "auth_events": ["$create-event-id-000000000000000000000000000", "$power-levels-event-id-0000000000000000000000", "$member-event-id-0000000000000000000000000000"],
        "content": {"body": format!("benchmark message number {k}"), "msgtype": "m.text"},
        "depth": k,
        "event_id": format!("$ev{k}"),
        "hashes": {"sha256": "ThisIsAFakeContentHashOfFortyThreeCharacter"},
        "origin_server_ts": T0_MS + k,
        "prev_events": if k == 0 { json!([]) } else { json!([format!("$ev{}", k - 1)]) },
        "room_id": ROOM,
        "sender": format!("@alice:{ORIGIN}"),
        "signatures": {ORIGIN: {"ed25519:a_key": "ThisIsAFakeSignatureOfEightySixCharactersThisIsAFakeSignatureOfEightySixCharactersXX"}},
        "type": if k == 0 { "m.room.create" } else { "m.room.message" },
    })
}

/// CPU time of a process in ms (user, system), from `/proc/<pid>/stat`.
fn process_cpu_ms(pid: u32) -> Result<(u64, u64), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name may hold spaces; the fields after it are plain numbers.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or("unreadable /proc stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or("unreadable /proc stat");
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    Ok((ticks(11)? * 1000 / per_second, ticks(12)? * 1000 / per_second))
}

/// A `VmHWM`/`VmRSS` line of `/proc/<pid>/status`, in bytes.
fn process_memory_bytes(pid: u32, field: &str) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// This process's CPU time in ms (user + system): the remotes and the clients.
fn own_cpu_ms() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let ms =
        |t: libc::timeval| u64::try_from(t.tv_sec).unwrap_or(0) * 1000 + u64::try_from(t.tv_usec).unwrap_or(0) / 1000;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

fn fedsend_binary(args: &Args) -> Result<PathBuf, String> {
    if let Some(path) = &args.fedsend {
        return Ok(path.clone());
    }
    // Built together: target/release/fedsend beside target/release/fedsend-service-bench.
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let beside = exe.with_file_name("fedsend");
    if beside.is_file() {
        Ok(beside)
    } else {
        Err(format!(
            "{} not found; build it (cargo build --release -p fedsend-host-native) or pass --fedsend",
            beside.display()
        ))
    }
}

/// The service, stopped (SIGTERM, then waited for) when dropped.
struct Service {
    child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signals our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

fn start_service(
    binary: &Path,
    dir: &Path,
    config: &str,
    log_path: &Path,
) -> Result<(Service, std::net::SocketAddr), String> {
    let config_path = dir.join("fedsend.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("writing the config: {e}"))?;
    let log = std::fs::File::create(log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config_path)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let service = Service { child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(|e| format!("reading the service's stdout: {e}"))?;
    let addr = line.trim().strip_prefix("listening on ").and_then(|a| a.parse().ok()).ok_or_else(|| {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        format!("the service did not start (first line {line:?}); its log:\n{log}")
    })?;
    Ok((service, addr))
}

/// `perf record` on the service during the burst; stopped with SIGINT so it writes its file.
struct Perf {
    child: Child,
}

impl Perf {
    fn start(pid: u32, out: &Path) -> Result<Self, String> {
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting perf: {e}"))?;
        // perf needs a moment to attach; samples before that would be lost.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child })
    }

    fn stop(mut self) -> Result<(), String> {
        let pid = i32::try_from(self.child.id()).map_err(|e| e.to_string())?;
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        self.child.wait().map_err(|e| format!("perf: {e}"))?;
        Ok(())
    }
}

/// Where the service's user-space samples fell, by what the code does. Symbols are matched by
/// name, so inlined code counts where it was inlined (serde_json inlined into the transport
/// counts as the transport's); kernel time is not sampled (see system CPU instead).
const PERF_GROUPS: &[(&str, &[&str])] = &[
    ("kernel (syscalls, loopback TCP, scheduling)", &["[k]"]),
    ("signing (ed25519, SHA-512)", &["curve25519", "ed25519", "sha2::", "sha512"]),
    ("canonical JSON for signing (fedsend_sign)", &["fedsend_sign::"]),
    ("TLS (rustls, ring)", &["rustls", "ring::", "ring_core", "aes_", "gcm_", "ecp_nistz256", "x25519"]),
    ("SQLite", &["sqlite3", "rusqlite", "yy_", "pcache", "keywordCode", "Vdbe", "vdbe"]),
    ("JSON (serde_json, Value trees)", &["serde_json", "serde::", "serde_core"]),
    ("core and driver", &["fedsend_core", "fedsend_driver"]),
    ("HTTP (hyper, axum)", &["hyper", "axum", "http::", "httparse", "h2::"]),
    ("logging (tracing)", &["tracing"]),
    ("async runtime (tokio)", &["tokio", "mio::"]),
    (
        "malloc, free, memcpy, memcmp",
        &["malloc", "free", "realloc", "memcpy", "memmove", "memset", "memcmp", "_int_", "unlink_chunk"],
    ),
];

fn perf_split(file: &Path) -> Result<Vec<(String, f64)>, String> {
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "dso,sym", "-q", "--percent-limit", "0", "-i"])
        .arg(file)
        .output()
        .map_err(|e| format!("perf report: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut groups: BTreeMap<&str, f64> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(percent) = words.next().and_then(|p| p.strip_suffix('%')).and_then(|p| p.parse::<f64>().ok()) else {
            continue;
        };
        let rest: String = words.collect::<Vec<_>>().join(" ");
        let group = PERF_GROUPS
            .iter()
            .find(|(_, needles)| needles.iter().any(|n| rest.contains(n)))
            .map_or("other (std, BTreeMap, the service's own code, ...)", |(name, _)| name);
        *groups.entry(group).or_default() += percent;
    }
    let mut split: Vec<(String, f64)> = groups.into_iter().map(|(g, p)| (g.to_owned(), p)).collect();
    split.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(split)
}

async fn post(client: &IngestClient, body: &Value) -> Result<(), String> {
    let answer = client.call("POST", "/_fedsend/v1/events", Some(body)).await?;
    if answer.status != 200 {
        return Err(format!("POST /_fedsend/v1/events refused ({}): {}", answer.status, answer.body));
    }
    Ok(())
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn run(args: &Args) -> Result<bool, String> {
    let binary = fedsend_binary(args)?;
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let key = SigningKey::generate_from_seed_bytes(
        "ed25519:bench",
        std::array::from_fn(|i| (nanos >> (i % 16 * 8)) as u8 ^ i as u8),
    )
    .map_err(|e| e.to_string())?;
    let key_path = dir.path().join("signing.key");
    std::fs::write(&key_path, key.to_synapse_key_file()).map_err(|e| format!("key file: {e}"))?;
    // The service warns about a key file others can read; this one is not secret, but the
    // warning would be noise in its log.
    std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("key file: {e}"))?;

    let setup = Instant::now();
    let mut remotes = Vec::with_capacity(args.remotes);
    for _ in 0..args.remotes {
        remotes.push(Remote::start(ORIGIN, key.key_id(), &key.public_key_base64(), Behaviour::default()).await?);
    }
    // Every remote is 127.0.0.1:<port>, one host to the request slots: without raising the
    // per-host bound to the global one, the loopback setup alone would cap the service at 8
    // requests in flight, which a real federation of distinct hosts never does.
    let config = format!(
        "server_name = \"{ORIGIN}\"\nsigning_key_file = \"signing.key\"\ndatabase = \"fedsend.db\"\nengine = \"{}\"\n\
         [ingest]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\
         [transport]\nverify_tls = false\nip_allowlist = [\"127.0.0.0/8\"]\n\
         sends_in_flight_max = {in_flight}\nsends_per_host_max = {in_flight}\n",
        args.engine,
        in_flight = args.sends_in_flight,
    );
    let log_path = args.log.clone().unwrap_or_else(|| dir.path().join("fedsend.log"));
    let (service, addr) = start_service(&binary, dir.path(), &config, &log_path)?;
    let pid = service.child.id();
    let client = IngestClient { addr, token: Some(TOKEN.into()) };
    let mut hosts: Vec<String> = remotes.iter().map(|r| r.name().to_owned()).collect();
    hosts.push(ORIGIN.to_owned());
    let hosts = Arc::new(hosts);
    // The room's create event first (the store refuses events in unknown rooms); the core
    // sends a create event nowhere, which the checks below confirm.
    post(&client, &json!({"event_id": "$ev0", "pdu": pdu(0), "hosts": *hosts})).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = process_memory_bytes(pid, "VmRSS")?;
    eprintln!(
        "fedsend-service-bench: {} remotes and `fedsend serve` (pid {pid}) up in {:.1} s; burst of {} events",
        remotes.len(),
        setup.elapsed().as_secs_f64(),
        args.events
    );

    let perf = args.perf.as_deref().map(|out| Perf::start(pid, out)).transpose()?;
    let (user0, system0) = process_cpu_ms(pid)?;
    let own0 = own_cpu_ms();
    let started = Instant::now();
    // The burst through the API from a few concurrent clients, as a homeserver's event
    // persisters would hand them over; the service commits whatever queued up together.
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let (client, hosts, next, events) = (client.clone(), Arc::clone(&hosts), Arc::clone(&next), args.events);
        clients.spawn(async move {
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if k > events {
                    return Ok::<(), String>(());
                }
                post(&client, &json!({"event_id": format!("$ev{k}"), "pdu": pdu(k), "hosts": *hosts})).await?;
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.map_err(|e| format!("client task: {e}"))??;
    }
    let ingested = started.elapsed();
    let deadline = started + Duration::from_secs(args.timeout_s);
    let events = args.events;
    let delivered = loop {
        if remotes.iter().all(|r| r.distinct_events() >= events) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let wall = started.elapsed();
    // A remote counts a transaction before its answer reaches the service: the service's CPU
    // is read once it has heard every answer (its own count of transactions sent has caught
    // up), so the handling of the answers is in it.
    let accepted = || remotes.iter().map(|r| r.received().txn_ids.len() as u64).sum::<u64>();
    let expected_sent = accepted();
    let settle = Instant::now() + Duration::from_secs(10);
    let mut metrics = String::new();
    while Instant::now() < settle {
        let answer = client.call("GET", "/metrics", None).await?;
        metrics = answer.body.as_str().unwrap_or_default().to_owned();
        if metric(&metrics, "synapse_federation_client_sent_transactions_total") >= expected_sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (user1, system1) = process_cpu_ms(pid)?;
    let own = own_cpu_ms() - own0;
    if let Some(perf) = perf {
        perf.stop()?;
    }
    let peak_rss = process_memory_bytes(pid, "VmHWM")?;
    drop(service);

    let received: Vec<_> = remotes.iter().map(Remote::received).collect();
    let txns: Vec<usize> = received.iter().map(|r| r.txn_ids.len()).collect();
    let transactions: usize = txns.iter().sum();
    let deliveries = events * remotes.len() as u64;
    let incomplete = remotes.iter().filter(|r| r.distinct_events() != events).count();
    let repeated = remotes.iter().filter(|r| r.pdus_delivered() != r.distinct_events()).count();
    let bad_signatures: u64 = received.iter().map(|r| r.bad_signatures).sum();
    let refused: u64 = received.iter().map(|r| r.refused).sum();
    let create_sent = received.iter().filter(|r| r.events.values().any(|ids| ids.contains("$ev0"))).count();
    let user_ms = user1 - user0;
    let system_ms = system1 - system0;
    let cpu_ms = user_ms + system_ms;
    let wall_s = wall.as_secs_f64();
    let split = args.perf.as_deref().map(perf_split).transpose()?;

    println!(
        "service end to end: {} events x {} remotes = {deliveries} deliveries, engine {}, {} clients, {} sends in flight",
        events,
        remotes.len(),
        args.engine,
        args.clients,
        args.sends_in_flight
    );
    println!(
        "  delivered: {} ({incomplete} remotes incomplete, {repeated} with a repeated event, create event sent to {create_sent}, {bad_signatures} bad signatures, {refused} refused)",
        if delivered { "all" } else { "NOT ALL (timed out)" }
    );
    println!(
        "  transactions: {transactions} ({}..{} per remote; the service counted {} sent)",
        txns.iter().min().unwrap_or(&0),
        txns.iter().max().unwrap_or(&0),
        metric(&metrics, "synapse_federation_client_sent_transactions_total")
    );
    println!(
        "  wall: {:.0} ms (all events acknowledged by the ingest API after {:.0} ms)",
        wall_s * 1e3,
        ingested.as_secs_f64() * 1e3
    );
    println!("  deliveries/s: {:.0}   transactions/s: {:.0}", deliveries as f64 / wall_s, transactions as f64 / wall_s);
    println!(
        "  service CPU: {cpu_ms} ms ({user_ms} user, {system_ms} system) = {:.0} us per transaction, {:.2} us per delivery; {:.0}% of one core",
        cpu_ms as f64 * 1e3 / transactions.max(1) as f64,
        cpu_ms as f64 * 1e3 / deliveries as f64,
        cpu_ms as f64 / (wall_s * 10.0)
    );
    println!(
        "  service memory: peak RSS {:.1} MiB (RSS before the burst {:.1} MiB)",
        peak_rss as f64 / 1048576.0,
        rss_before as f64 / 1048576.0
    );
    println!("  this process (remotes verifying every signature, TLS servers, clients): {own} ms CPU");
    if let Some(split) = &split {
        println!("  service user-space samples (perf, cpu-clock 999 Hz, flat by symbol):");
        for (group, percent) in split {
            println!("    {percent:5.1}%  {group}");
        }
    }
    if let Some(path) = &args.json {
        let out = json!({
            "events": events,
            "remotes": remotes.len(),
            "engine": args.engine,
            "clients": args.clients,
            "sends_in_flight": args.sends_in_flight,
            "deliveries": deliveries,
            "transactions": transactions,
            "transactions_per_remote_min": txns.iter().min(),
            "transactions_per_remote_max": txns.iter().max(),
            "all_delivered": delivered,
            "incomplete_remotes": incomplete,
            "remotes_with_repeats": repeated,
            "bad_signatures": bad_signatures,
            "refused": refused,
            "wall_ms": wall_s * 1e3,
            "ingest_ms": ingested.as_secs_f64() * 1e3,
            "deliveries_per_s": deliveries as f64 / wall_s,
            "transactions_per_s": transactions as f64 / wall_s,
            "service_cpu_ms": cpu_ms,
            "service_user_ms": user_ms,
            "service_system_ms": system_ms,
            "service_cpu_us_per_transaction": cpu_ms as f64 * 1e3 / transactions.max(1) as f64,
            "service_peak_rss_bytes": peak_rss,
            "service_rss_before_bytes": rss_before,
            "bench_process_cpu_ms": own,
            "perf_split_percent": split.map(|s| s.into_iter().collect::<BTreeMap<_, _>>()),
        });
        std::fs::write(path, format!("{out}\n")).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let clean =
        delivered && incomplete == 0 && repeated == 0 && bad_signatures == 0 && refused == 0 && create_sent == 0;
    if args.check && !clean {
        eprintln!("fedsend-service-bench: check failed");
        return Ok(false);
    }
    Ok(delivered)
}
