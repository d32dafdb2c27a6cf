//! `fedsend-bench`: runs the standard workloads on every engine and prints one table.
//!
//! ```text
//! fedsend-bench [--scale F] [--runs N] [--warmup N] [--engines typed,native,wasm,node]
//!               [--workloads W1,W2,W3,W4,W5,WS] [--wasm PATH] [--node-script PATH] [--check] [--no-probes]
//!               [--w2-events N] [--ws-events N] [--ws-destinations N] [--json FILE] [--transcript FILE]
//! ```
//!
//! `--scale 1` (the default) is the issue's sizes, except that W2 runs 10 000 of its 100 000
//! events unless `--w2-events 100000`; `--scale 0.01` is the tiny CI run.
//! `--check` exits non-zero unless the numbers are sane (all engines agree on every count, W3
//! sends at most one transaction per (destination, room), W4 and W5 deliver everything,
//! memory figures are plausible).
//!
//! WS is the Synapse-shaped burst (`--ws-events` × `--ws-destinations`, default 1 000 × 1 000 at
//! scale 1). `--json FILE` writes every cell's median result as JSON, and `--transcript FILE`
//! runs WS once more on the native JSON engine and writes each transaction it sent (destination,
//! PDU ids, body) as JSON lines: `bench/synapse/side_by_side.py` reads both to compare with
//! Synapse's sender on the same burst.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use fedsend_bench::{
    Core, JsonCore, JsonMemory, ProbeResult, RunResult, Sizes, TypedCore, Workload, counting::CountingAlloc,
    median_run, probes, repeat, run_recorded,
};
use fedsend_host_native::wasm_engine::{WasmEngine, locate_guest};
use fedsend_sim::NativeEngine;
use serde::Deserialize;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EngineKind {
    Typed,
    Native,
    Wasm,
    Node,
}

impl EngineKind {
    fn label(self) -> &'static str {
        match self {
            Self::Typed => "native typed (ref)",
            Self::Native => "native (JSON)",
            Self::Wasm => "wasmtime",
            Self::Node => "node",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "typed" => Some(Self::Typed),
            "native" => Some(Self::Native),
            "wasm" | "wasmtime" => Some(Self::Wasm),
            "node" => Some(Self::Node),
            _ => None,
        }
    }
}

struct Args {
    scale: f64,
    runs: u32,
    warmup: u32,
    engines: Vec<EngineKind>,
    workloads: Vec<Workload>,
    wasm: Option<PathBuf>,
    node_script: PathBuf,
    check: bool,
    probes: bool,
    w2_events: Option<u64>,
    ws_events: Option<u64>,
    ws_destinations: Option<u64>,
    json: Option<PathBuf>,
    transcript: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        scale: 1.0,
        runs: 3,
        warmup: 1,
        engines: vec![EngineKind::Typed, EngineKind::Native, EngineKind::Wasm, EngineKind::Node],
        workloads: Workload::ALL.to_vec(),
        wasm: None,
        node_script: default_node_script(),
        check: false,
        probes: true,
        w2_events: None,
        ws_events: None,
        ws_destinations: None,
        json: None,
        transcript: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--scale" => args.scale = value()?.parse().map_err(|e| format!("--scale: {e}"))?,
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--warmup" => args.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--engines" => {
                args.engines = value()?
                    .split(',')
                    .map(|s| {
                        EngineKind::parse(s).ok_or_else(|| format!("unknown engine {s:?} (typed, native, wasm, node)"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--workloads" => {
                args.workloads = value()?
                    .split(',')
                    .map(|s| {
                        Workload::ALL
                            .into_iter()
                            .find(|w| w.name().eq_ignore_ascii_case(s))
                            .ok_or_else(|| format!("unknown workload {s:?} (W1, W2, W3, W4, W5, WS)"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--wasm" => args.wasm = Some(PathBuf::from(value()?)),
            "--node-script" => args.node_script = PathBuf::from(value()?),
            "--check" => args.check = true,
            "--no-probes" => args.probes = false,
            "--w2-events" => args.w2_events = Some(value()?.parse().map_err(|e| format!("--w2-events: {e}"))?),
            "--ws-events" => args.ws_events = Some(value()?.parse().map_err(|e| format!("--ws-events: {e}"))?),
            "--ws-destinations" => {
                args.ws_destinations = Some(value()?.parse().map_err(|e| format!("--ws-destinations: {e}"))?);
            }
            "--json" => args.json = Some(PathBuf::from(value()?)),
            "--transcript" => args.transcript = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!(
                    "fedsend-bench [--scale F] [--runs N] [--warmup N] [--engines typed,native,wasm,node] \
                     [--workloads W1,W2,W3,W4,W5,WS] [--wasm PATH] [--node-script PATH] [--check] [--no-probes] [--w2-events N] \
                     [--ws-events N] [--ws-destinations N] [--json FILE] [--transcript FILE]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.scale <= 0.0 || args.runs == 0 {
        return Err("--scale must be positive and --runs at least 1".into());
    }
    if args.ws_events == Some(0) || args.ws_destinations == Some(0) {
        return Err("--ws-events and --ws-destinations must be at least 1".into());
    }
    Ok(args)
}

/// `bench/node/bench.mjs` of the workspace: beside the executable's `target/`, else from the cwd.
fn default_node_script() -> PathBuf {
    let rel = PathBuf::from("bench/node/bench.mjs");
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join(&rel)))
        .filter(|p| p.is_file())
        .unwrap_or(rel)
}

fn wasm_engine(args: &Args) -> Result<WasmEngine, String> {
    let path = locate_guest(args.wasm.as_deref()).map_err(|e| e.to_string())?;
    WasmEngine::from_file(&path).map_err(|e| e.to_string())
}

fn make_core(kind: EngineKind, args: &Args) -> Result<Box<dyn Core>, String> {
    Ok(match kind {
        EngineKind::Typed => Box::new(TypedCore::default()),
        EngineKind::Native => Box::new(JsonCore::new(NativeEngine::default(), JsonMemory::Heap)),
        EngineKind::Wasm => Box::new(JsonCore::new(wasm_engine(args)?, JsonMemory::WasmLinear)),
        EngineKind::Node => unreachable!("node runs in its own process"),
    })
}

#[derive(Deserialize)]
struct NodeRuns {
    runs: Vec<RunResult>,
}

fn node(args: &Args, sizes: &Sizes, extra: &[&str]) -> Result<String, String> {
    let sizes_json = serde_json::to_string(sizes).expect("sizes serialize");
    let output = Command::new("node")
        .arg("--max-old-space-size=8192")
        .arg(&args.node_script)
        .args(["--sizes", &sizes_json])
        .args(extra)
        .output()
        .map_err(|e| format!("cannot run node: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "node {} {} failed: {}",
            args.node_script.display(),
            extra.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn node_runs(args: &Args, sizes: &Sizes, workload: Workload) -> Result<Vec<RunResult>, String> {
    let (runs, warmup) = (args.runs.to_string(), args.warmup.to_string());
    let text = node(args, sizes, &["--workload", workload.name(), "--runs", &runs, "--warmup", &warmup])?;
    let parsed: NodeRuns = serde_json::from_str(&text).map_err(|e| format!("node printed {text:?}: {e}"))?;
    Ok(parsed.runs)
}

fn node_probes(args: &Args, sizes: &Sizes) -> Result<ProbeResult, String> {
    // Linear memory only grows, so every measurement gets a fresh process.
    let number = |probe: &str| -> Result<f64, String> {
        let text = node(args, sizes, &["--probe", probe])?;
        text.trim().parse().map_err(|e| format!("node probe {probe} printed {text:?}: {e}"))
    };
    let idle_per_destination = number("idle")?;
    let [da, db] = sizes.queued_destinations;
    let (a, b) = (number("queued-a")?, number("queued-b")?);
    let per_pair = (a - b) / (da - db) as f64;
    Ok(ProbeResult { idle_per_destination, queued_per_pair: per_pair, shared_per_pdu: b - per_pair * db as f64 })
}

struct Row {
    workload: Workload,
    engine: EngineKind,
    result: RunResult,
}

fn rate(count: u64, ns: u64) -> f64 {
    if ns == 0 { 0.0 } else { count as f64 * 1e9 / ns as f64 }
}

fn si(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2} G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn bytes(x: f64) -> String {
    if x >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", x / 1024.0 / 1024.0)
    } else if x >= 1024.0 {
        format!("{:.1} KiB", x / 1024.0)
    } else {
        format!("{x:.0} B")
    }
}

fn dur(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let node = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    format!(
        "{cpu}, {cores} cores, {} {}, node {}",
        std::env::consts::OS,
        std::env::consts::ARCH,
        node.unwrap_or_else(|| "absent".into())
    )
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fedsend-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fedsend-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool, String> {
    let mut sizes = Sizes::at_scale(args.scale);
    if let Some(events) = args.w2_events {
        sizes.w2_events = events.div_ceil(100).max(1) * 100;
    }
    if let Some(events) = args.ws_events {
        sizes.ws_events = events;
    }
    if let Some(destinations) = args.ws_destinations {
        sizes.ws_destinations = destinations;
    }
    let started = Instant::now();
    println!(
        "fedsend-bench: scale {}, {} warm-up + {} measured runs per cell (medians)",
        args.scale, args.warmup, args.runs
    );
    println!("machine: {}", machine());
    let mut rows: Vec<Row> = Vec::new();
    for &workload in &args.workloads {
        for &engine in &args.engines {
            eprint!("  {} on {} ... ", workload.name(), engine.label());
            let t = Instant::now();
            let runs = match engine {
                EngineKind::Node => node_runs(args, &sizes, workload)?,
                _ => repeat(workload, &sizes, args.warmup, args.runs, &mut *make_core(engine, args)?),
            };
            eprintln!("{:.1} s", t.elapsed().as_secs_f64());
            rows.push(Row { workload, engine, result: median_run(&runs) });
        }
    }
    let mut probe_rows: Vec<(EngineKind, ProbeResult)> = Vec::new();
    for &engine in args.engines.iter().filter(|_| args.probes) {
        eprint!("  memory probes on {} ... ", engine.label());
        let t = Instant::now();
        let probe = match engine {
            EngineKind::Node => node_probes(args, &sizes)?,
            _ => {
                let mut make = || make_core(engine, args).expect("engine was created before");
                probes(&sizes, &mut make)
            }
        };
        eprintln!("{:.1} s", t.elapsed().as_secs_f64());
        probe_rows.push((engine, probe));
    }

    let transcript_counts = match &args.transcript {
        Some(path) => Some(write_transcript(args, &sizes, path)?),
        None => None,
    };
    print_tables(args, &sizes, &rows, &probe_rows);
    if let Some(path) = &args.json {
        write_json(path, &sizes, &rows)?;
    }
    let ok = targets(&sizes, &rows, &probe_rows);
    println!("\ntotal bench time {:.0} s", started.elapsed().as_secs_f64());
    if args.check {
        let problems = sanity(&sizes, &rows, &probe_rows);
        if problems.is_empty() {
            println!("check: all engines agree on every count; numbers are sane");
        } else {
            for p in &problems {
                println!("check FAILED: {p}");
            }
            return Ok(false);
        }
    }
    let _ = ok;
    if let Some(transcribed) = transcript_counts {
        let measured = rows.iter().find(|r| r.workload == Workload::WS).map(|r| &r.result);
        if let Some(m) = measured.filter(|m| (m.txns, m.pairs) != transcribed) {
            println!(
                "check FAILED: the transcribed WS run sent (transactions, pairs) = {transcribed:?}, the measured ones ({}, {})",
                m.txns, m.pairs
            );
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs WS once more on the native JSON engine, writes its transactions as JSON lines, and
/// returns (transactions, pairs) of that run.
fn write_transcript(args: &Args, sizes: &Sizes, path: &std::path::Path) -> Result<(u64, u64), String> {
    let mut core = make_core(EngineKind::Native, args)?;
    let (result, transcript) = run_recorded(Workload::WS, sizes, &mut *core);
    let mut text = String::new();
    for t in &transcript {
        text.push_str(&serde_json::to_string(t).expect("transactions serialize"));
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((result.txns, result.pairs))
}

/// Every cell's median result with the sizes and this process's peak RSS, for other tools.
fn write_json(path: &std::path::Path, sizes: &Sizes, rows: &[Row]) -> Result<(), String> {
    let cells: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "workload": r.workload.name(),
                "engine": r.engine.label(),
                "result": r.result,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "sizes": sizes,
        "machine": machine(),
        "peak_rss_bytes": peak_rss_bytes(),
        "cells": cells,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// This process's peak resident set size (VmHWM), 0 without `/proc`.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn native_of(rows: &[Row], workload: Workload) -> Option<&RunResult> {
    rows.iter().find(|r| r.workload == workload && r.engine == EngineKind::Native).map(|r| &r.result)
}

fn print_tables(args: &Args, sizes: &Sizes, rows: &[Row], probe_rows: &[(EngineKind, ProbeResult)]) {
    println!();
    println!("Rates are per second of core time (handle_input + draining its outputs; host work excluded).");
    println!("'vs native' is core time relative to the native JSON engine (lower is better).");
    println!(
        "node: runs share one wasm instance per process, so measured runs reuse the linear memory the warm-up \
         grew (a cold first run pays for growth: see BENCHMARKS.md)."
    );
    println!();
    println!(
        "| workload | engine | pairs/s | txns/s | body bytes/s | core time | per input p50 | p99 | peak memory | vs native | wall |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &workload in &args.workloads {
        for row in rows.iter().filter(|r| r.workload == workload) {
            let r = &row.result;
            let ratio = native_of(rows, workload)
                .filter(|n| n.core_ns > 0)
                .map_or_else(|| "—".to_owned(), |n| format!("{:.2}×", r.core_ns as f64 / n.core_ns as f64));
            println!(
                "| {} | {} | {} | {} | {}B | {} | {} | {} | {} | {} | {} |",
                workload.name(),
                row.engine.label(),
                si(rate(r.pairs, r.core_ns)),
                si(rate(r.txns, r.core_ns)),
                si(rate(r.bytes, r.core_ns)),
                dur(r.core_ns),
                dur(r.median_ns),
                dur(r.p99_ns),
                bytes(r.peak_memory as f64),
                ratio,
                dur(r.wall_ns),
            );
        }
    }
    println!();
    for &workload in &args.workloads {
        let any = rows.iter().find(|r| r.workload == workload).map(|r| &r.result);
        if let Some(r) = any {
            let (pairs, enqueued) = match workload {
                Workload::W4 => ("(EDU, destination) pairs sent", "(item, destination) pairs handed in"),
                Workload::W5 => ("to-device EDUs sent", "messages handed in"),
                _ => ("(event, destination) pairs sent", "enqueued"),
            };
            println!(
                "{}: {} — {} transactions, {} {pairs}, {} {enqueued}, {} inputs{}",
                workload.name(),
                workload.describe(sizes),
                r.txns,
                r.pairs,
                r.enqueued,
                r.inputs,
                match workload {
                    Workload::W3 => format!(", {} (destination, room) rows owed", r.rows_owed),
                    Workload::W4 => format!(", {} servers missing a kind of EDU", r.incomplete),
                    Workload::W5 => format!(", {} outbox rows left undelivered", r.incomplete),
                    Workload::WS => format!(
                        ", {}–{} transactions per destination, {} destinations missing an event or out of order",
                        r.txns_per_destination_min, r.txns_per_destination_max, r.incomplete
                    ),
                    _ => String::new(),
                }
            );
        }
    }
    println!();
    println!(
        "Memory (native: the core's heap via a counting allocator; wasmtime: linear memory; node: wasm linear memory):"
    );
    println!();
    println!("| engine | per idle destination | per queued (PDU, destination) pair | per queued PDU (shared) |");
    println!("|---|---:|---:|---:|");
    for (engine, p) in probe_rows {
        println!(
            "| {} | {:.0} B | {:.1} B | {:.0} B |",
            engine.label(),
            p.idle_per_destination,
            p.queued_per_pair,
            p.shared_per_pdu
        );
    }
}

fn targets(sizes: &Sizes, rows: &[Row], probe_rows: &[(EngineKind, ProbeResult)]) -> bool {
    println!();
    println!("Targets:");
    let mut all = true;
    let mut line = |met: Option<bool>, text: String| {
        let mark = match met {
            Some(true) => "met   ",
            Some(false) => {
                all = false;
                "MISSED"
            }
            None => "n/a   ",
        };
        println!("  [{mark}] {text}");
    };
    for engine in [EngineKind::Typed, EngineKind::Native] {
        if let Some(r) = rows.iter().find(|r| r.workload == Workload::W1 && r.engine == engine).map(|r| &r.result) {
            let enq = rate(r.enqueued, r.fanout_ns);
            line(
                Some(enq >= 5e6),
                format!(
                    "W1 ≥ 5 M (event, destination) enqueues/s/core natively: {} ({}/s counting fan-out inputs only; {}/s end to end)",
                    engine.label(),
                    si(enq),
                    si(rate(r.enqueued, r.core_ns))
                ),
            );
        }
    }
    for (engine, limit) in [(EngineKind::Wasm, 1.5), (EngineKind::Node, 2.0)] {
        for workload in Workload::ALL {
            let (Some(n), Some(r)) = (
                native_of(rows, workload),
                rows.iter().find(|r| r.workload == workload && r.engine == engine).map(|r| &r.result),
            ) else {
                continue;
            };
            let ratio = r.core_ns as f64 / n.core_ns.max(1) as f64;
            line(
                Some(ratio <= limit),
                format!("{} {} ≤ {limit}× native time: {ratio:.2}×", workload.name(), engine.label()),
            );
        }
    }
    for (engine, p) in probe_rows {
        line(
            Some(p.idle_per_destination <= 256.0),
            format!("≤ 256 B per idle destination, {}: {:.0} B", engine.label(), p.idle_per_destination),
        );
        line(
            Some(p.queued_per_pair <= 16.0),
            format!("≤ 16 B per queued pair beyond the shared PDU, {}: {:.1} B", engine.label(), p.queued_per_pair),
        );
    }
    if let Some(r) = rows.iter().find(|r| r.workload == Workload::W3).map(|r| &r.result) {
        line(
            Some(r.txns <= r.rows_owed),
            format!(
                "W3 ≤ 1 transaction per (destination, room) plus EDUs owed (W3 owes none): {} transactions for {} rows ({} destinations)",
                r.txns, r.rows_owed, sizes.w3_destinations
            ),
        );
    }
    for (workload, what) in
        [(Workload::W4, "room servers missing a kind of EDU"), (Workload::W5, "to-device rows undelivered")]
    {
        if let Some(r) = rows.iter().find(|r| r.workload == workload).map(|r| &r.result) {
            line(Some(r.incomplete == 0), format!("{} delivers everything: {} {what}", workload.name(), r.incomplete));
        }
    }
    all
}

fn sanity(sizes: &Sizes, rows: &[Row], probe_rows: &[(EngineKind, ProbeResult)]) -> Vec<String> {
    let mut problems = Vec::new();
    for workload in Workload::ALL {
        let cells: Vec<&Row> = rows.iter().filter(|r| r.workload == workload).collect();
        let Some(first) = cells.first() else { continue };
        let key = |r: &RunResult| {
            (
                (r.txns, r.attempts, r.pairs, r.enqueued, r.bytes, r.inputs, r.catch_ups_finished, r.incomplete),
                (r.txns_per_destination_min, r.txns_per_destination_max),
            )
        };
        for row in &cells {
            if key(&row.result) != key(&first.result) {
                problems.push(format!(
                    "{}: {} counted ((txns, attempts, pairs, enqueued, bytes, inputs, catch-ups, incomplete), (txns per destination min, max)) = {:?} but {} counted {:?}",
                    workload.name(),
                    row.engine.label(),
                    key(&row.result),
                    first.engine.label(),
                    key(&first.result)
                ));
            }
            let r = &row.result;
            // A PDU is ~600 bytes, the smallest EDU (typing) ~100.
            let bytes_per_pair_min = if matches!(workload, Workload::W4 | Workload::W5) { 50 } else { 100 };
            if r.core_ns == 0
                || r.txns == 0
                || r.pairs == 0
                || r.bytes < r.pairs * bytes_per_pair_min
                || r.median_ns > r.p99_ns
            {
                problems.push(format!("{} on {}: implausible {r:?}", workload.name(), row.engine.label()));
            }
            if r.peak_memory == 0 || r.peak_memory > 16 << 30 {
                problems.push(format!(
                    "{} on {}: peak memory {} B",
                    workload.name(),
                    row.engine.label(),
                    r.peak_memory
                ));
            }
        }
        let r = &first.result;
        match workload {
            Workload::W1 if r.pairs != sizes.w1_destinations * sizes.w1_repeats => {
                problems.push(format!(
                    "W1 sent {} pairs, expected {}",
                    r.pairs,
                    sizes.w1_destinations * sizes.w1_repeats
                ));
            }
            Workload::W3 if r.txns > r.rows_owed || r.catch_ups_finished != sizes.w3_destinations => {
                problems.push(format!(
                    "W3: {} transactions for {} rows, {} of {} destinations finished catching up",
                    r.txns, r.rows_owed, r.catch_ups_finished, sizes.w3_destinations
                ));
            }
            Workload::W4 if r.incomplete != 0 => {
                problems
                    .push(format!("W4: {} servers of the room missed a receipt, presence or typing EDU", r.incomplete));
            }
            Workload::W5 if r.incomplete != 0 || r.enqueued != sizes.w5_messages || r.pairs <= r.enqueued => {
                problems.push(format!(
                    "W5: {} of {} messages handed in, {} EDUs sent (large messages must add chunks), {} outbox rows left",
                    r.enqueued, sizes.w5_messages, r.pairs, r.incomplete
                ));
            }
            Workload::WS => {
                let pairs = sizes.ws_events * sizes.ws_destinations;
                // A transaction carries at most 50 PDUs, so no destination can do with fewer.
                let fewest = sizes.ws_events.div_ceil(50);
                if r.pairs != pairs
                    || r.enqueued != pairs
                    || r.incomplete != 0
                    || r.txns_per_destination_min < fewest
                    || r.txns_per_destination_max > sizes.ws_events
                {
                    problems.push(format!(
                        "WS: {} of {pairs} pairs sent ({} enqueued), {} destinations incomplete, {}–{} transactions per destination (at least {fewest})",
                        r.pairs, r.enqueued, r.incomplete, r.txns_per_destination_min, r.txns_per_destination_max
                    ));
                }
            }
            _ => {}
        }
    }
    for (engine, p) in probe_rows {
        // Native figures are exact live bytes; wasm ones are linear-memory high-water marks that
        // move in 64 KiB pages, so at tiny sizes they are only required to be numbers.
        let plausible = match engine {
            EngineKind::Typed | EngineKind::Native => {
                (16.0..=4096.0).contains(&p.idle_per_destination) && (0.0..=256.0).contains(&p.queued_per_pair)
            }
            EngineKind::Wasm | EngineKind::Node => p.idle_per_destination.is_finite() && p.queued_per_pair.is_finite(),
        };
        if !plausible {
            problems.push(format!("memory probes on {}: implausible {p:?}", engine.label()));
        }
    }
    problems
}
