//! `fedsend-vopr`: run the seeded simulator.
//!
//! ```text
//! fedsend-vopr --seed N [--trace]        one seed, with its banner (and trace)
//! fedsend-vopr --seeds A..B              a range of seeds, with a progress line
//! fedsend-vopr --sweep [--from N]        seeds from N on, until interrupted
//! ```
//! Every failure prints the command that reproduces it, and the process exits 1.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use fedsend_sim::NativeEngine;
use fedsend_sim::vopr::{Options, Report, Totals, reproduce_command, run};

fn usage() -> ! {
    eprintln!("usage: fedsend-vopr --seed N [--trace] | --seeds A..B | --sweep [--from N]");
    std::process::exit(2);
}

fn parse_seed(text: &str) -> u64 {
    // A 40-hex commit id works as a seed too, as in TigerBeetle's VOPR.
    if text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return u64::from_str_radix(&text[..16], 16).unwrap_or_else(|_| usage());
    }
    text.parse().unwrap_or_else(|_| usage())
}

fn one(seed: u64, trace: bool) -> Result<Report, String> {
    let mut options = Options::swarm(seed);
    options.trace_events = trace;
    let mut engine = NativeEngine::default();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut emit = |line: &str| {
        if trace {
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
            _ => usage(),
        }
        i += 1;
    }
    if let Some(seed) = seed {
        eprintln!("{}", Options::swarm(seed).banner());
        match one(seed, trace) {
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
    let mut passed = 0u64;
    let mut totals = Totals::default();
    for seed in from..to {
        match one(seed, false) {
            Ok(report) => totals.add(&report),
            Err(reason) => {
                eprintln!("\nseed {seed}: FAILED: {reason}\nreproduce: {}", reproduce_command(seed));
                std::process::exit(1);
            }
        }
        passed += 1;
        if passed.is_multiple_of(100) {
            let rate = passed as f64 / started.elapsed().as_secs_f64();
            // One updating line on a terminal; whole lines in CI logs.
            if std::io::stderr().is_terminal() {
                eprint!("\r{passed} seeds passed (up to {seed}), {rate:.0} seeds/s   ");
            } else if passed.is_multiple_of(500) {
                eprintln!("{passed} seeds passed (up to {seed}), {rate:.0} seeds/s");
            }
        }
    }
    eprintln!("\n{passed} seeds passed ({from}..{to}), {} events simulated", totals.events);
    for (name, value) in totals.exercised() {
        eprintln!("  {name}: {value}");
    }
}
