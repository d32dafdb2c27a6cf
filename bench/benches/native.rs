//! `cargo bench -p fedsend-bench`: W1–W3 on the natively linked core (typed API and JSON
//! boundary) at a tenth of the sizes, with warm-up and medians. The full table, with
//! the wasmtime and Node engines and the memory figures, is `target/release/fedsend-bench`.

use fedsend_bench::{Core, JsonCore, JsonMemory, Sizes, TypedCore, Workload, median_run, repeat};
use fedsend_sim::NativeEngine;

fn main() {
    let scale = std::env::var("FEDSEND_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(0.1);
    let sizes = Sizes::at_scale(scale);
    for workload in Workload::ALL {
        let engines: [(&str, Box<dyn Core>); 2] = [
            ("typed", Box::new(TypedCore::default())),
            ("json", Box::new(JsonCore::new(NativeEngine::default(), JsonMemory::Heap))),
        ];
        for (name, mut core) in engines {
            let r = median_run(&repeat(workload, &sizes, 1, 5, &mut *core));
            let per_sec = |n: u64| n as f64 * 1e9 / r.core_ns.max(1) as f64;
            println!(
                "{}/{name}: core {:.2} ms, {:.2} M pairs/s, {:.1} k txns/s, p50 {} ns, p99 {} ns",
                workload.name(),
                r.core_ns as f64 / 1e6,
                per_sec(r.pairs) / 1e6,
                per_sec(r.txns) / 1e3,
                r.median_ns,
                r.p99_ns
            );
        }
    }
}
