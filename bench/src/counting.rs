//! A counting global allocator that attributes memory to the core.
//!
//! Allocations and frees count only while the bench is *inside the core* ([`scoped`]): the
//! engine's `handle_input` and the draining of its outputs, and the dropping of those outputs.
//! Everything the harness itself holds (the event list, the in-memory store, parsed answers) is
//! made outside and is not counted, so [`live`] is the core's heap and [`peak`] its high-water
//! mark. The binary installs it with `#[global_allocator]`; without that, both read 0.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// The allocator; install it with `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.
#[derive(Debug)]
pub struct CountingAlloc;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

/// Inside the core. A plain static, not a thread-local: the bench is single-threaded and the
/// check runs on every allocation, so it must cost next to nothing next to the core's own work.
static IN_CORE: AtomicBool = AtomicBool::new(false);

fn counting() -> bool {
    IN_CORE.load(Ordering::Relaxed)
}

fn add(delta: i64) {
    // Plain loads and stores, no read-modify-write: only the one bench thread counts (the flag is
    // set only around calls into the core), and this runs on every allocation of the core.
    let now = LIVE.load(Ordering::Relaxed) + delta;
    LIVE.store(now, Ordering::Relaxed);
    if now > PEAK.load(Ordering::Relaxed) {
        PEAK.store(now, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's layout unchanged; the counters
// are plain atomics and a thread-local flag, none of which allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() && counting() {
            add(layout.size() as i64);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() && counting() {
            add(layout.size() as i64);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        if counting() {
            add(-(layout.size() as i64));
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() && counting() {
            add(new_size as i64 - layout.size() as i64);
        }
        new
    }
}

/// Runs `f` with allocations attributed to the core.
pub fn scoped<R>(f: impl FnOnce() -> R) -> R {
    let before = IN_CORE.swap(true, Ordering::Relaxed);
    let result = f();
    IN_CORE.store(before, Ordering::Relaxed);
    result
}

/// Forgets everything counted so far (call with no core alive).
pub fn reset() {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
}

/// Bytes the core holds now.
pub fn live() -> u64 {
    LIVE.load(Ordering::Relaxed).max(0) as u64
}

/// The most the core held since [`reset`].
pub fn peak() -> u64 {
    PEAK.load(Ordering::Relaxed).max(0) as u64
}
