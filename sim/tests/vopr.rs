//! The simulator's CI run: at least 1 000 seeds, every fault kind, invariants on every step
//! and convergence after healing. `FEDSIM_SEEDS=A..B` picks another range.

use fedsend_sim::vopr::{reproduce_command, run, Options};
use fedsend_sim::NativeEngine;

#[test]
fn a_thousand_seeds_hold_every_invariant_and_converge() {
    let (from, to) = match std::env::var("FEDSIM_SEEDS") {
        Ok(range) => {
            let (a, b) = range.split_once("..").expect("FEDSIM_SEEDS=A..B");
            (a.parse().expect("seed"), b.parse().expect("seed"))
        }
        Err(_) => (0u64, 1000u64),
    };
    let mut totals = fedsend_sim::FaultCounts::default();
    let mut counts = fedsend_sim::Counts::default();
    let mut events = 0;
    for seed in from..to {
        let options = Options::swarm(seed);
        let mut engine = NativeEngine::default();
        match run(&options, &mut engine, &mut |_| {}) {
            Ok(report) => {
                events += report.events;
                let f = report.faults;
                totals.drops += f.drops;
                totals.errors += f.errors;
                totals.rate_limits += f.rate_limits;
                totals.storage_failures += f.storage_failures;
                totals.storage_delays += f.storage_delays;
                totals.remote_outages += f.remote_outages;
                totals.poisons += f.poisons;
                totals.crashes += f.crashes;
                totals.lost_writes += f.lost_writes;
                let c = report.counts;
                counts.attempts += c.attempts;
                counts.accepted += c.accepted;
                counts.retries += c.retries;
                counts.dropped += c.dropped;
                counts.catch_ups += c.catch_ups;
                counts.recoveries += c.recoveries;
            }
            Err(failure) => panic!(
                "seed {seed} failed: {}\n  {}\nreproduce: {}",
                failure.reason,
                options.banner(),
                reproduce_command(seed)
            ),
        }
    }
    println!("simulated {} seeds ({from}..{to}), {events} events", to - from);
    println!("faults exercised: {totals:?}");
    println!("boundary: {counts:?}");
    // Every fault kind must actually have been exercised, or the sweep proves less than it says.
    for (name, value) in [
        ("lost answers", totals.drops),
        ("5xx", totals.errors),
        ("429", totals.rate_limits),
        ("storage failures", totals.storage_failures),
        ("storage delays", totals.storage_delays),
        ("remote outages", totals.remote_outages),
        ("poison items", totals.poisons),
        ("crashes", totals.crashes),
        ("writes lost in crashes", totals.lost_writes),
        ("HTTP retries", counts.retries),
        ("dropped items", counts.dropped),
        ("catch-ups", counts.catch_ups),
        ("recoveries", counts.recoveries),
    ] {
        assert!(to - from < 100 || value > 0, "the sweep never exercised {name}");
    }
}
