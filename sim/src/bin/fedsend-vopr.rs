//! `fedsend-vopr`: run the seeded simulator.
//!
//! ```text
//! fedsend-vopr --seed N [--trace]        one seed, with its banner (and trace)
//! fedsend-vopr --seeds A..B              a range of seeds, with a progress line
//! fedsend-vopr --sweep [--from N]        seeds from N on, until interrupted
//!   [--jobs J]                           on J threads (ranges and sweeps)
//!   [--keep-going]                       past failures, listing them all at the end
//!   [--odd PERMILLE]                     odd inputs at this rate instead of the seed's own
//! ```
//! Every failure prints the command that reproduces it, and the process exits 1.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use fedsend_sim::NativeEngine;
use fedsend_sim::vopr::{Options, Report, Totals, reproduce_command, run};

fn usage() -> ! {
    eprintln!(
        "usage: fedsend-vopr --seed N [--trace] | --seeds A..B | --sweep [--from N] [--jobs J] [--keep-going] [--odd PERMILLE]"
    );
    std::process::exit(2);
}

fn parse_seed(text: &str) -> u64 {
    // A 40-hex commit id works as a seed too, as in TigerBeetle's VOPR.
    if text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return u64::from_str_radix(&text[..16], 16).unwrap_or_else(|_| usage());
    }
    text.parse().unwrap_or_else(|_| usage())
}

/// What the command line changes in every seed's options.
#[derive(Clone, Copy)]
struct Overrides {
    odd_input_permille: Option<u64>,
}

fn options(seed: u64, overrides: Overrides) -> Options {
    let mut options = Options::swarm(seed);
    if let Some(permille) = overrides.odd_input_permille {
        options.odd_input_permille = permille;
    }
    options
}

fn one(seed: u64, trace: bool, overrides: Overrides) -> Result<Report, String> {
    let mut options = options(seed, overrides);
    options.trace_events = trace;
    let mut engine = NativeEngine::default();
    // Locked only when tracing: parallel workers would otherwise take turns.
    let mut out = trace.then(|| std::io::stdout().lock());
    let mut emit = |line: &str| {
        if let Some(out) = out.as_mut() {
            let _ = writeln!(out, "{line}");
        }
    };
    run(&options, &mut engine, &mut emit).map_err(|f| format!("{}\n  {}", f.reason, options.banner()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed = None;
    let mut range = None;
    let mut sweep_from = None;
    let mut trace = false;
    let mut jobs = 1u64;
    let mut keep_going = false;
    let mut overrides = Overrides { odd_input_permille: None };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--seed" => {
                i += 1;
                seed = Some(parse_seed(args.get(i).unwrap_or_else(|| usage())));
            }
            "--seeds" => {
                i += 1;
                let text = args.get(i).unwrap_or_else(|| usage());
                let (a, b) = text.split_once("..").unwrap_or_else(|| usage());
                range = Some((parse_seed(a), parse_seed(b)));
            }
            "--sweep" => sweep_from = Some(sweep_from.unwrap_or(0)),
            "--from" => {
                i += 1;
                sweep_from = Some(parse_seed(args.get(i).unwrap_or_else(|| usage())));
            }
            "--trace" => trace = true,
            "--jobs" => {
                i += 1;
                jobs = args.get(i).and_then(|j| j.parse().ok()).filter(|j| *j > 0).unwrap_or_else(|| usage());
            }
            "--keep-going" => keep_going = true,
            "--odd" => {
                i += 1;
                let permille = args.get(i).and_then(|p| p.parse().ok()).filter(|p| *p <= 1000);
                overrides.odd_input_permille = Some(permille.unwrap_or_else(|| usage()));
            }
            _ => usage(),
        }
        i += 1;
    }
    if let Some(seed) = seed {
        eprintln!("{}", options(seed, overrides).banner());
        match one(seed, trace, overrides) {
            Ok(report) => eprintln!("seed {seed}: ok {report:?}"),
            Err(reason) => {
                eprintln!("seed {seed}: FAILED: {reason}\nreproduce: {}", reproduce_command(seed));
                std::process::exit(1);
            }
        }
        return;
    }
    let (from, to) = match (range, sweep_from) {
        (Some(r), _) => r,
        (None, Some(from)) => (from, u64::MAX),
        (None, None) => usage(),
    };
    let started = Instant::now();
    // Workers take seeds in turn; results come back in completion order, and failures are
    // listed sorted, so the summary does not depend on scheduling.
    let next_seed = AtomicU64::new(from);
    let stop = AtomicBool::new(false);
    let (results, received) = mpsc::channel::<(u64, Result<Report, String>)>();
    let mut passed = 0u64;
    let mut totals = Totals::default();
    let mut failures: Vec<(u64, String)> = Vec::new();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let results = results.clone();
            let (next_seed, stop) = (&next_seed, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                    if seed >= to || results.send((seed, one(seed, false, overrides))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(results);
        for (seed, result) in received {
            match result {
                Ok(report) => totals.add(&report),
                Err(reason) => {
                    eprintln!("\nseed {seed}: FAILED: {reason}\nreproduce: {}", reproduce_command(seed));
                    failures.push((seed, reason));
                    if !keep_going {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    continue;
                }
            }
            passed += 1;
            if passed.is_multiple_of(100) {
                let rate = passed as f64 / started.elapsed().as_secs_f64();
                // One updating line on a terminal; whole lines in CI logs.
                if std::io::stderr().is_terminal() {
                    eprint!("\r{passed} seeds passed (latest {seed}), {rate:.0} seeds/s   ");
                } else if passed.is_multiple_of(if to - from > 100_000 { 50_000 } else { 500 }) {
                    eprintln!("{passed} seeds passed (latest {seed}), {rate:.0} seeds/s");
                }
            }
        }
    });
    let elapsed_s = started.elapsed().as_secs();
    if !failures.is_empty() {
        failures.sort();
        let seeds: Vec<String> = failures.iter().map(|(seed, _)| seed.to_string()).collect();
        eprintln!("\n{} seeds failed: {}", failures.len(), seeds.join(" "));
        std::process::exit(1);
    }
    eprintln!(
        "\n{passed} seeds passed ({from}..{to}) in {elapsed_s} s on {jobs} thread(s), {} events simulated",
        totals.events
    );
    for (name, value) in totals.exercised() {
        eprintln!("  {name}: {value}");
    }
    eprintln!("  accepted items neither delivered nor superseded, by how they were settled:");
    for (name, value) in totals.settled_otherwise() {
        eprintln!("    {name}: {value}");
    }
}
