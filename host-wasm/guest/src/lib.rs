//! The fedsend core as a plain C-ABI WebAssembly module: the "wasm plugin" that
//! `fedsend scenario --engine wasm` (and any other wasm runtime) loads.
//!
//! The module has **no imports**: no WASI, no wasm-bindgen, no host functions. Everything crosses
//! the boundary as UTF-8 JSON in the module's linear memory, with the same encoding as
//! [`fedsend_core::wire::JsonSender`], so a host sees exactly what a natively linked core would
//! say.
//!
//! # ABI, version 1
//!
//! All integers are wasm `i32`/`i64`; `u32`/`u64` below are those bit patterns read as unsigned.
//!
//! | export | signature | meaning |
//! |---|---|---|
//! | `memory` | memory | the linear memory all pointers refer to |
//! | `fs_abi_version` | `() -> u32` | `1` for this ABI. A host checks it before anything else |
//! | `fs_alloc` | `(len: u32) -> u32` | a guest buffer of `len` bytes for the host to write into |
//! | `fs_free` | `(ptr: u32, len: u32)` | frees a buffer from `fs_alloc` or from a packed return; `ptr == 0` is a no-op |
//! | `fs_start` | `(cfg_ptr: u32, cfg_len: u32, rec_ptr: u32, rec_len: u32) -> u64` | creates the machine from config and recovered-state JSON, replacing any previous one. `0` = ok, else an error message |
//! | `fs_handle_input` | `(now_ms: u64, ptr: u32, len: u32) -> u64` | feeds one input JSON at virtual time `now_ms`. `0` = ok, else an error message |
//! | `fs_poll_output` | `() -> u64` | the next output JSON, or `0` when there is none |
//! | `fs_poll_timeout` | `() -> i64` | the next deadline in ms, or `-1` when there is none |
//! | `fs_destination_stats` | `() -> u64` | per-destination figures as a JSON array (`JsonSender::destination_stats`), or `0` when there is no machine |
//! | `fs_last_panic` | `() -> u64` | after a trap: the guest's panic message, or `0` when it has not panicked |
//!
//! **Packed strings.** A non-zero `u64` return is `(ptr << 32) | len`: a UTF-8 buffer of `len`
//! bytes at `ptr`, allocated by the guest and owned by the host from then on, which must give it
//! back with `fs_free(ptr, len)`. `0` means "ok" or "none"; a real buffer never has `ptr == 0`,
//! not even an empty one.
//!
//! **Arguments.** String arguments are buffers the host got from `fs_alloc`, filled, and passed by
//! pointer and length; they stay the host's, to free (or reuse) after the call returns. A
//! non-UTF-8 argument is an error, reported like any other.
//!
//! **Machine.** One instance holds at most one machine. Before the first `fs_start`,
//! `fs_handle_input` returns an error, `fs_poll_output` returns `0` and `fs_poll_timeout` `-1`.
//! A simulated restart is a fresh instance (or `fs_start` again).
//!
//! **Failure.** A panic in the guest is a bug, never a reaction to input: the module is built
//! with `panic = "abort"`, so it surfaces as a wasm trap. The message is kept for
//! `fs_last_panic`; the instance should not be used for anything else afterwards.
//!
//! # Building
//!
//! `scripts/build-wasm.sh` builds it (target `wasm32-unknown-unknown`, profile `wasm-release`,
//! `-Zbuild-std=std,panic_abort`, see `scripts/wasm-cargo`). On other targets the exports are
//! compiled out, so native `cargo test --workspace` only builds and tests the safe layer.

use std::cell::RefCell;

use fedsend_core::wire::JsonSender;

/// The version of the ABI described in the crate docs, returned by `fs_abi_version`.
pub const ABI_VERSION: u32 = 1;

thread_local! {
    /// The one machine of this instance. wasm32-unknown-unknown has one thread, so this is a
    /// plain static there; natively each test thread gets its own.
    static SENDER: RefCell<Option<JsonSender>> = const { RefCell::new(None) };
    /// The message of the last panic, for `fs_last_panic`.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The safe half of `fs_start`: creates (or re-creates) the machine.
pub fn start(config_json: &[u8], recovered_json: &[u8]) -> Result<(), String> {
    let config = utf8(config_json, "config")?;
    let recovered = utf8(recovered_json, "recovered state")?;
    // Like the natively linked engine: the old machine is replaced only by a new one that exists.
    let new = JsonSender::new(config, recovered)?;
    SENDER.set(Some(new));
    Ok(())
}

/// The safe half of `fs_handle_input`.
pub fn handle_input(now_ms: u64, input_json: &[u8]) -> Result<(), String> {
    let input = utf8(input_json, "input")?;
    SENDER.with_borrow_mut(|sender| match sender {
        Some(sender) => sender.handle_input(now_ms, input),
        None => Err("no machine: fs_start was not called".into()),
    })
}

/// The safe half of `fs_poll_output`.
pub fn poll_output() -> Option<String> {
    SENDER.with_borrow_mut(|sender| sender.as_mut()?.poll_output())
}

/// The safe half of `fs_poll_timeout`: `-1` when there is no deadline. A deadline beyond
/// `i64::MAX` ms (some 292 million years) saturates.
pub fn poll_timeout() -> i64 {
    SENDER.with_borrow(|sender| match sender.as_ref().and_then(JsonSender::poll_timeout) {
        Some(deadline) => i64::try_from(deadline).unwrap_or(i64::MAX),
        None => -1,
    })
}

/// The safe half of `fs_destination_stats`.
pub fn destination_stats() -> Option<String> {
    SENDER.with_borrow(|sender| sender.as_ref().map(JsonSender::destination_stats))
}

/// Takes the message of the last panic, if any.
pub fn take_last_panic() -> Option<String> {
    LAST_PANIC.with_borrow_mut(Option::take)
}

/// Remembers panic messages for `fs_last_panic`. Idempotent.
pub fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // `try_with`/`try_borrow_mut`: a panic while the slot is in use must not panic again.
            let _ = LAST_PANIC.try_with(|slot| {
                if let Ok(mut slot) = slot.try_borrow_mut() {
                    *slot = Some(info.to_string().replace('\n', " "));
                }
            });
            previous(info);
        }));
    });
}

/// Packs a guest buffer into the `u64` return convention: `(ptr << 32) | len`.
pub const fn pack(ptr: u32, len: u32) -> u64 {
    ((ptr as u64) << 32) | len as u64
}

/// Splits a packed return into `(ptr, len)`.
pub const fn unpack(packed: u64) -> (u32, u32) {
    ((packed >> 32) as u32, packed as u32)
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("{what} is not UTF-8: {e}"))
}

/// Buffers handed across the boundary. A buffer is a `Box<[u8]>`, whose allocation size is
/// exactly its length, so `(ptr, len)` alone is enough to give it back to the allocator.
pub mod buffer {
    /// A zeroed buffer of `len` bytes, leaked to the caller as a raw pointer.
    pub fn alloc(len: usize) -> *mut u8 {
        leak(vec![0; len])
    }

    /// Leaks `bytes` (shrunk to fit) to the caller; `bytes.len()` is the length to free with.
    pub fn leak(bytes: Vec<u8>) -> *mut u8 {
        // Never null, even when empty (then it is dangling, which `free` accepts).
        Box::into_raw(bytes.into_boxed_slice()).cast::<u8>()
    }

    /// Gives back a buffer from [`alloc`] or [`leak`]. A null `ptr` is ignored.
    ///
    /// # Safety
    ///
    /// `ptr` and `len` must come from one earlier `alloc`/`leak` that has not been freed yet.
    pub unsafe fn free(ptr: *mut u8, len: usize) {
        if ptr.is_null() {
            return;
        }
        // SAFETY: by the contract above, this is exactly the `Box<[u8]>` that was leaked.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
    }
}

/// The `extern "C"` exports: thin, unsafe shims over the safe functions above. On
/// wasm32, `usize` and pointers are 32 bits wide, so the `as u32` / `as usize` casts are lossless.
#[cfg(target_arch = "wasm32")]
pub mod exports {
    use super::{buffer, pack};

    /// Moves a string to the host as a packed buffer.
    fn give(text: String) -> u64 {
        let len = text.len() as u32;
        pack(buffer::leak(text.into_bytes()) as u32, len)
    }

    fn give_error(result: Result<(), String>) -> u64 {
        result.err().map_or(0, give)
    }

    /// Borrows a host-written argument buffer for the duration of a call.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be initialised guest memory that nothing else mutates during the
    /// call: a buffer the host got from `fs_alloc` and filled, as the ABI requires.
    unsafe fn arg<'a>(ptr: u32, len: u32) -> &'a [u8] {
        if len == 0 {
            return &[];
        }
        // SAFETY: see the function's contract.
        unsafe { std::slice::from_raw_parts(ptr as usize as *const u8, len as usize) }
    }

    /// ABI version, see the crate docs.
    #[unsafe(no_mangle)]
    pub extern "C" fn fs_abi_version() -> u32 {
        super::ABI_VERSION
    }

    /// Allocates a buffer for the host to write an argument into.
    #[unsafe(no_mangle)]
    pub extern "C" fn fs_alloc(len: u32) -> u32 {
        buffer::alloc(len as usize) as u32
    }

    /// Frees a buffer from `fs_alloc` or from a packed return.
    ///
    /// # Safety
    ///
    /// `(ptr, len)` must be such a buffer, not freed before (the host's side of the ABI).
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn fs_free(ptr: u32, len: u32) {
        // SAFETY: forwarded contract.
        unsafe { buffer::free(ptr as usize as *mut u8, len as usize) }
    }

    /// Creates the machine; `0` or an error message.
    ///
    /// # Safety
    ///
    /// Both arguments must be `fs_alloc` buffers the host filled (the ABI's "Arguments").
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn fs_start(cfg_ptr: u32, cfg_len: u32, rec_ptr: u32, rec_len: u32) -> u64 {
        super::install_panic_hook();
        // SAFETY: forwarded contract.
        let (config, recovered) = unsafe { (arg(cfg_ptr, cfg_len), arg(rec_ptr, rec_len)) };
        give_error(super::start(config, recovered))
    }

    /// Feeds one input; `0` or an error message.
    ///
    /// # Safety
    ///
    /// The argument must be an `fs_alloc` buffer the host filled (the ABI's "Arguments").
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn fs_handle_input(now_ms: u64, ptr: u32, len: u32) -> u64 {
        // SAFETY: forwarded contract.
        give_error(super::handle_input(now_ms, unsafe { arg(ptr, len) }))
    }

    /// The next output, or `0`.
    #[unsafe(no_mangle)]
    pub extern "C" fn fs_poll_output() -> u64 {
        super::poll_output().map_or(0, give)
    }

    /// The next deadline, or `-1`.
    #[unsafe(no_mangle)]
    pub extern "C" fn fs_poll_timeout() -> i64 {
        super::poll_timeout()
    }

    /// Per-destination figures, or `0`.
    #[unsafe(no_mangle)]
    pub extern "C" fn fs_destination_stats() -> u64 {
        super::destination_stats().map_or(0, give)
    }

    /// The last panic's message, or `0`.
    #[unsafe(no_mangle)]
    pub extern "C" fn fs_last_panic() -> u64 {
        super::take_last_panic().map_or(0, give)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_zero_is_none() {
        assert_eq!(unpack(pack(0x0011_2233, 0xffff_fffe)), (0x0011_2233, 0xffff_fffe));
        assert_eq!(pack(0, 0), 0);
        // An empty buffer still has a non-zero pointer, so it is never mistaken for "none".
        assert_ne!(pack(1, 0), 0);
    }

    #[test]
    fn buffers_round_trip() {
        let p = buffer::alloc(5);
        assert!(!p.is_null());
        // SAFETY: `p` is a fresh 5-byte allocation.
        unsafe {
            p.copy_from_nonoverlapping(b"hello".as_ptr(), 5);
            assert_eq!(std::slice::from_raw_parts(p, 5), b"hello");
            buffer::free(p, 5);
        }
        let text = String::from("déjà");
        let len = text.len();
        let p = buffer::leak(text.into_bytes());
        // SAFETY: `p` is the leaked buffer of `len` bytes.
        unsafe {
            assert_eq!(std::str::from_utf8(std::slice::from_raw_parts(p, len)), Ok("déjà"));
            buffer::free(p, len);
        }
        let empty = buffer::alloc(0);
        assert!(!empty.is_null());
        // SAFETY: empty buffer from `alloc(0)`; null is documented as a no-op.
        unsafe {
            buffer::free(empty, 0);
            buffer::free(std::ptr::null_mut(), 0);
        }
    }

    const CONFIG: &str = r#"{"server_name":"test"}"#;

    #[test]
    fn machine_lifecycle_matches_the_core() {
        // Each test runs on its own thread, so this machine is private to the test.
        assert_eq!(poll_output(), None);
        assert_eq!(poll_timeout(), -1);
        assert_eq!(destination_stats(), None);
        assert!(handle_input(0, b"{}").unwrap_err().contains("fs_start"));

        assert_eq!(start(b"{}", b"{}"), JsonSender::new("{}", "{}").map(drop));
        start(CONFIG.as_bytes(), b"{}").unwrap();
        let mut native = JsonSender::new(CONFIG, "{}").unwrap();
        for input in [r#"{"type":"new_events","up_to":3}"#, r#"{"type":"no_such_input"}"#] {
            assert_eq!(handle_input(1_000, input.as_bytes()), native.handle_input(1_000, input));
        }
        let mut outputs = 0;
        loop {
            let ours = poll_output();
            assert_eq!(ours, native.poll_output());
            let Some(_) = ours else { break };
            outputs += 1;
        }
        assert!(outputs > 0, "new events make the machine fetch them");
        assert_eq!(destination_stats(), Some(native.destination_stats()));
        let expected = native.poll_timeout().map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX));
        assert_eq!(poll_timeout(), expected);
    }

    #[test]
    fn bad_utf8_is_an_error_not_a_panic() {
        assert_eq!(
            start(b"\xff", b"{}").unwrap_err(),
            "config is not UTF-8: invalid utf-8 sequence of 1 bytes from index 0"
        );
        start(CONFIG.as_bytes(), b"{}").unwrap();
        assert!(handle_input(0, b"\xc3").unwrap_err().starts_with("input is not UTF-8"));
    }

    #[test]
    fn panic_message_is_kept() {
        install_panic_hook();
        assert_eq!(take_last_panic(), None);
        let _ = std::panic::catch_unwind(|| panic!("boom\nsecond line"));
        let message = take_last_panic().unwrap();
        assert!(message.contains("boom second line"), "{message}");
        assert_eq!(take_last_panic(), None);
    }
}
