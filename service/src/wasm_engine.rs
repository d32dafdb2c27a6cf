//! [`WasmEngine`]: the core compiled to wasm (`fedsend-guest`, ABI v1) running inside wasmtime,
//! behind the same [`JsonEngine`] boundary as the natively linked core.
//!
//! The module is compiled once; every [`JsonEngine::start`] (the first one and each simulated
//! restart) instantiates it afresh, so a restart loses all guest memory exactly as a process
//! restart would.

use std::fmt;
use std::path::{Path, PathBuf};

use fedsend_driver::JsonEngine;
use wasmtime::{Instance, Memory, Module, Store, Trap, TypedFunc};

/// The guest ABI version this host speaks (`fs_abi_version`).
pub const ABI_VERSION: u32 = 1;

/// The file name `scripts/build-wasm.sh` gives the guest module, in the workspace's `target/`.
pub const GUEST_FILE_NAME: &str = "fedsend_guest.wasm";

/// Environment variable naming the guest module, when `--wasm` is not given.
pub const GUEST_ENV: &str = "FEDSEND_WASM";

/// Why a guest module could not be loaded.
#[derive(Debug)]
pub struct LoadError(String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

/// Finds the guest module: `explicit` (from `--wasm`), else `$FEDSEND_WASM`, else
/// `target/fedsend_guest.wasm` of the workspace, looked up next to the running executable
/// (`target/<profile>/fedsend` → `target/fedsend_guest.wasm`) and then from the current directory.
pub fn locate_guest(explicit: Option<&Path>) -> Result<PathBuf, LoadError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os(GUEST_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let beside_exe = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.parent()?.join(GUEST_FILE_NAME)));
    let from_cwd = Path::new("target").join(GUEST_FILE_NAME);
    let candidates: Vec<PathBuf> = beside_exe.into_iter().chain([from_cwd]).collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(LoadError(format!(
        "no wasm guest module found (looked for {}); build it with scripts/build-wasm.sh, \
         or pass --wasm PATH or set {GUEST_ENV}",
        looked.join(", ")
    )))
}

/// The core as a wasm guest in wasmtime. See the module docs.
///
/// The core's errors come back as `Err` with the same text as natively. A trap (a panic in the
/// guest: a bug) in `start` or `handle_input` is an `Err` naming the export and the panic message,
/// and the instance is discarded; in `poll_output`, `poll_timeout` or `destination_stats`, which
/// cannot report errors, it panics, as the natively linked core would have.
pub struct WasmEngine {
    engine: wasmtime::Engine,
    module: Module,
    /// `None` before the first `start`, and after the guest trapped (it is not trusted again).
    guest: Option<Guest>,
}

impl fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmEngine").field("started", &self.guest.is_some()).finish_non_exhaustive()
    }
}

impl WasmEngine {
    /// Loads and compiles the guest module at `path`.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let bytes =
            std::fs::read(path).map_err(|e| LoadError(format!("cannot read wasm guest {}: {e}", path.display())))?;
        Self::from_bytes(&bytes).map_err(|LoadError(e)| LoadError(format!("wasm guest {}: {e}", path.display())))
    }

    /// Compiles a guest module and checks that it speaks ABI v1 and imports nothing.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LoadError> {
        let engine = wasmtime::Engine::default();
        let module =
            Module::new(&engine, bytes).map_err(|e| LoadError(format!("not a valid wasm module: {}", one_line(&e))))?;
        let imports: Vec<String> = module.imports().map(|i| format!("{}::{}", i.module(), i.name())).collect();
        if !imports.is_empty() {
            return Err(LoadError(format!(
                "the guest ABI allows no imports, but the module imports {}",
                imports.join(", ")
            )));
        }
        // Instantiate once now, so that a wrong module fails here with a clear message rather
        // than at the first `start`.
        let mut probe = Guest::instantiate(&engine, &module).map_err(|e| LoadError(one_line(&e)))?;
        let version = probe.abi_version.call(&mut probe.store, ()).map_err(|e| LoadError(one_line(&e)))?;
        if version != ABI_VERSION {
            return Err(LoadError(format!("guest ABI version {version}, this host speaks {ABI_VERSION}")));
        }
        Ok(Self { engine, module, guest: None })
    }
}

impl JsonEngine for WasmEngine {
    fn start(&mut self, config_json: &str, recovered_json: &str) -> Result<(), String> {
        let mut guest = Guest::instantiate(&self.engine, &self.module).map_err(|e| one_line(&e))?;
        guest.start(config_json, recovered_json)?;
        // Like the native engine, a failed start leaves the previous machine in place.
        self.guest = Some(guest);
        Ok(())
    }

    fn handle_input(&mut self, now_ms: u64, input_json: &str) -> Result<(), String> {
        // The native engine's words, so that misuse reads the same on both.
        let guest = self.guest.as_mut().ok_or("engine used before start")?;
        match guest.handle_input(now_ms, input_json) {
            Ok(reply) => reply,
            Err(Fault(fault)) => {
                self.guest = None;
                Err(fault)
            }
        }
    }

    fn poll_output(&mut self) -> Option<String> {
        let guest = self.guest.as_mut()?;
        // A trap here is a bug in the core (or the guest); natively it would be a panic too.
        guest.poll_output().unwrap_or_else(|Fault(fault)| panic!("{fault}"))
    }

    fn poll_timeout(&mut self) -> Option<u64> {
        let guest = self.guest.as_mut()?;
        guest.poll_timeout().unwrap_or_else(|Fault(fault)| panic!("{fault}"))
    }

    fn destination_stats(&mut self) -> Option<String> {
        let guest = self.guest.as_mut()?;
        guest.destination_stats().unwrap_or_else(|Fault(fault)| panic!("{fault}"))
    }
}

/// The guest misbehaved (trapped, or broke the ABI): a bug, not a reply. One line.
struct Fault(String);

/// One instance of the guest module and its exports.
struct Guest {
    store: Store<()>,
    memory: Memory,
    abi_version: TypedFunc<(), u32>,
    alloc: TypedFunc<u32, u32>,
    free: TypedFunc<(u32, u32), ()>,
    start: TypedFunc<(u32, u32, u32, u32), u64>,
    handle_input: TypedFunc<(u64, u32, u32), u64>,
    poll_output: TypedFunc<(), u64>,
    poll_timeout: TypedFunc<(), i64>,
    destination_stats: TypedFunc<(), u64>,
    last_panic: TypedFunc<(), u64>,
    /// A guest buffer reused for arguments, grown as needed: `(ptr, len)`, `len == 0` when none.
    scratch: (u32, u32),
}

impl Guest {
    fn instantiate(engine: &wasmtime::Engine, module: &Module) -> wasmtime::Result<Self> {
        let mut store = Store::new(engine, ());
        let instance = Instance::new(&mut store, module, &[])?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| wasmtime::format_err!("the guest exports no memory named `memory`"))?;
        Ok(Self {
            abi_version: instance.get_typed_func(&mut store, "fs_abi_version")?,
            alloc: instance.get_typed_func(&mut store, "fs_alloc")?,
            free: instance.get_typed_func(&mut store, "fs_free")?,
            start: instance.get_typed_func(&mut store, "fs_start")?,
            handle_input: instance.get_typed_func(&mut store, "fs_handle_input")?,
            poll_output: instance.get_typed_func(&mut store, "fs_poll_output")?,
            poll_timeout: instance.get_typed_func(&mut store, "fs_poll_timeout")?,
            destination_stats: instance.get_typed_func(&mut store, "fs_destination_stats")?,
            last_panic: instance.get_typed_func(&mut store, "fs_last_panic")?,
            memory,
            store,
            scratch: (0, 0),
        })
    }

    /// The core's error and a fault look alike to the caller: either way there is no new machine.
    fn start(&mut self, config: &str, recovered: &str) -> Result<(), String> {
        let result = (|| {
            let (ptr, _) = self.write_args(&[config.as_bytes(), recovered.as_bytes()])?;
            let config_len = config.len() as u32; // fits: write_args checked the total
            let args = (ptr, config_len, ptr + config_len, recovered.len() as u32);
            let packed = self.call("fs_start", |g| g.start.call(&mut g.store, args))?;
            self.take_string(packed)
        })();
        match result {
            Ok(None) => Ok(()),
            Ok(Some(message)) => Err(message),
            Err(Fault(fault)) => Err(fault),
        }
    }

    /// `Ok(Err(message))` is the core's own error; `Err` a fault.
    fn handle_input(&mut self, now_ms: u64, input: &str) -> Result<Result<(), String>, Fault> {
        let (ptr, len) = self.write_args(&[input.as_bytes()])?;
        let packed = self.call("fs_handle_input", |g| g.handle_input.call(&mut g.store, (now_ms, ptr, len)))?;
        Ok(self.take_string(packed)?.map_or(Ok(()), Err))
    }

    fn poll_output(&mut self) -> Result<Option<String>, Fault> {
        let packed = self.call("fs_poll_output", |g| g.poll_output.call(&mut g.store, ()))?;
        self.take_string(packed)
    }

    fn poll_timeout(&mut self) -> Result<Option<u64>, Fault> {
        let deadline = self.call("fs_poll_timeout", |g| g.poll_timeout.call(&mut g.store, ()))?;
        // -1 is "none"; no other negative value is ever returned.
        Ok(u64::try_from(deadline).ok())
    }

    fn destination_stats(&mut self) -> Result<Option<String>, Fault> {
        let packed = self.call("fs_destination_stats", |g| g.destination_stats.call(&mut g.store, ()))?;
        self.take_string(packed)
    }

    /// Copies `args` back to back into the scratch buffer; returns its pointer and the total length.
    fn write_args(&mut self, args: &[&[u8]]) -> Result<(u32, u32), Fault> {
        let total: usize = args.iter().map(|a| a.len()).sum();
        let len = u32::try_from(total)
            .map_err(|_| Fault(format!("arguments of {total} bytes exceed the 4 GiB guest memory")))?;
        if len > self.scratch.1 {
            let (old_ptr, old_len) = self.scratch;
            if old_len > 0 {
                self.call("fs_free", |g| g.free.call(&mut g.store, (old_ptr, old_len)))?;
                self.scratch = (0, 0);
            }
            let new_len = len.max(old_len.saturating_mul(2)).max(4096);
            let ptr = self.call("fs_alloc", |g| g.alloc.call(&mut g.store, new_len))?;
            self.scratch = (ptr, new_len);
        }
        let mut at = self.scratch.0 as usize;
        for arg in args {
            self.memory
                .write(&mut self.store, at, arg)
                .map_err(|e| Fault(format!("wasm guest: fs_alloc returned a buffer outside its memory: {e}")))?;
            at += arg.len();
        }
        Ok((self.scratch.0, len))
    }

    /// Reads and frees a packed string return; `0` is `None`.
    fn take_string(&mut self, packed: u64) -> Result<Option<String>, Fault> {
        if packed == 0 {
            return Ok(None);
        }
        let (ptr, len) = ((packed >> 32) as u32, packed as u32);
        let bytes = self
            .memory
            .data(&self.store)
            .get(ptr as usize..ptr as usize + len as usize)
            .ok_or_else(|| Fault(format!("wasm guest returned a buffer outside its memory ({ptr}, {len})")))?
            .to_vec();
        self.call("fs_free", |g| g.free.call(&mut g.store, (ptr, len)))?;
        String::from_utf8(bytes).map(Some).map_err(|e| Fault(format!("wasm guest returned invalid UTF-8: {e}")))
    }

    /// Calls into the guest; a trap becomes a one-line [`Fault`] naming the export and, when the
    /// guest panicked, its panic message.
    fn call<R>(&mut self, export: &str, f: impl FnOnce(&mut Self) -> wasmtime::Result<R>) -> Result<R, Fault> {
        f(self).map_err(|e| {
            let mut fault = format!("wasm guest failed in {export}: {}", one_line(&e));
            if let Some(panic) = self.last_panic() {
                fault.push_str(&format!(" ({panic})"));
            }
            Fault(fault)
        })
    }

    /// The guest's panic message after a trap, if it left one (best effort: the guest may be broken).
    fn last_panic(&mut self) -> Option<String> {
        let packed = self.last_panic.call(&mut self.store, ()).ok().filter(|&p| p != 0)?;
        let (ptr, len) = ((packed >> 32) as usize, packed as u32 as usize);
        let bytes = self.memory.data(&self.store).get(ptr..ptr + len)?;
        Some(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// A wasmtime error as one line: the trap when there is one (not the multi-line backtrace),
/// else the chain of causes.
fn one_line(error: &wasmtime::Error) -> String {
    let text = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(), // "wasm trap: …"
        None => error.chain().map(|cause| cause.to_string()).collect::<Vec<_>>().join(": "),
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
