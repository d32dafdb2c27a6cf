//! The native fedsend host.
//!
//! - [`scenario`]: `fedsend scenario`, which runs a scenario file (`spec/scenarios.md`) on the
//!   natively linked core or on the core inside wasmtime, and prints its trace;
//! - [`wasm_engine`]: [`WasmEngine`](wasm_engine::WasmEngine), the core compiled to wasm
//!   (`fedsend-guest`, a plain C-ABI module without imports) behind the [`fedsend_sim::Engine`]
//!   boundary, usable by tests and drivers alike;
//! - [`human`]: the `--human` rendering of a trace.
//!
//! The binary (`src/main.rs`) only parses the command line.

pub mod human;
pub mod scenario;
pub mod wasm_engine;
