//! The liveness invariant under inputs drawn like a fuzzer's: every item the core accepts is
//! delivered after healing or reported dropped with a reason, every input it refuses changes
//! nothing, and the sender keeps working.

use fedsend_sim::NativeEngine;
use fedsend_sim::vopr::{Options, Totals, reproduce_command, run};

#[test]
fn odd_inputs_are_delivered_dropped_with_a_reason_or_refused_without_effect() {
    let mut totals = Totals::default();
    for seed in 0..300u64 {
        let mut options = Options::swarm(seed);
        options.odd_input_permille = 500;
        match run(&options, &mut NativeEngine::default(), &mut |_| {}) {
            Ok(report) => totals.add(&report),
            Err(failure) => panic!(
                "seed {seed} failed with odd inputs forced on: {}\n  {}\nreproduce: {} (with odd_input_permille = 500)",
                failure.reason,
                options.banner(),
                reproduce_command(seed)
            ),
        }
    }
    for (name, value) in totals.exercised().into_iter().chain(totals.settled_otherwise()) {
        println!("  {name}: {value}");
    }
    let counts = &totals.counts;
    assert!(counts.refused_inputs > 0, "no odd input was refused");
    assert!(counts.events_skipped > 0, "no event was nested too deeply to send");
    assert!(counts.ephemeral_owed > 0 && counts.dropped > 0);
}

/// Seed 317 (an ordinary workload: no odd inputs) is where the core once lost two EDUs
/// without a report: the abandoned transaction's plain EDUs and the queue cleared when the
/// destination started catching up. They are now requeued, or reported `Dropped` when stale,
/// and the checker holds every accepted EDU to that.
#[test]
fn edus_abandoned_when_catch_up_starts_are_sent_or_reported() {
    let options = Options::swarm(317);
    assert_eq!(options.odd_input_permille, 0);
    let report = run(&options, &mut NativeEngine::default(), &mut |_| {}).expect("every accepted EDU is settled");
    assert!(report.counts.catch_ups > 0, "the seed still starts a catch-up");
}
