//! The visualiser's live world run natively, for profilers and callgrind:
//!
//! ```sh
//! node www/bin/live-steps.mjs 'seed=1&n=1000&rate=2' 600 > steps.jsonl
//! cargo run --release -p fedsend-wasm --example live_world -- steps.jsonl [SYNC_TICKS]
//! ```
//!
//! Replays the steps through `LiveSimulation` as the page does: one tick (its steps, ending
//! with `advance`) at a time, the trace taken after every tick, and the core's figures read
//! every SYNC_TICKS ticks (default 33: the page at 100× reads them every 33 ms). Prints the
//! ticks, sends, the trace's size and FNV-1a digest (the same steps must give the same digest
//! whatever the engine boundary), and the time per virtual second.

use std::time::Instant;

use fedsend_wasm::LiveSimulation;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: live_world STEPS.jsonl [SYNC_TICKS]");
    let sync_ticks: u64 = args.next().map_or(33, |s| s.parse().expect("SYNC_TICKS is a number"));
    let text = std::fs::read_to_string(&path).expect("readable steps file");
    let mut lines = text.lines();
    let header = lines.next().expect("a header line");

    let started = Instant::now();
    let mut sim = LiveSimulation::start(header).expect("the header starts a world");
    let mut digest = 0xcbf2_9ce4_8422_2325_u64;
    let mut trace_bytes = 0usize;
    let mut sends = 0usize;
    let mut stats_bytes = 0usize;
    let mut fold = |sim: &mut LiveSimulation, digest: &mut u64| {
        for line in sim.drain_trace() {
            *digest = fnv(fnv(*digest, line.as_bytes()), b"\n");
            trace_bytes += line.len() + 1;
            sends += usize::from(line.contains("\"kind\":\"send\""));
        }
    };
    fold(&mut sim, &mut digest);
    let t0 = Instant::now();
    let v0 = sim.now_ms();
    let mut ticks = 0u64;
    for step in lines.filter(|l| !l.trim().is_empty()) {
        sim.apply_step(step).unwrap_or_else(|e| panic!("{e}"));
        if step.starts_with("{\"op\":\"advance\"") {
            ticks += 1;
            fold(&mut sim, &mut digest);
            if ticks.is_multiple_of(sync_ticks) {
                stats_bytes += sim.destination_stats().len();
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let virt_s = (sim.now_ms() - v0) / 1000.0;
    println!(
        "{ticks} ticks ({virt_s} virtual s), {sends} sends, trace {trace_bytes} B digest {digest:016x}, stats read {stats_bytes} B; \
         start {:.1} ms, run {:.1} ms = {:.2} ms per virtual second ({:.1}x)",
        (t0 - started).as_secs_f64() * 1e3,
        secs * 1e3,
        secs * 1e3 / virt_s,
        virt_s / secs,
    );
}
