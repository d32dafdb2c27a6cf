//! The native fedsend host.
//!
//! - [`scenario`]: `fedsend scenario`, which runs a scenario file (`docs/scenarios.md`) on the
//!   natively linked core or on the core inside wasmtime, and prints its trace;
//! - [`wasm_engine`]: [`WasmEngine`](wasm_engine::WasmEngine), the core compiled to wasm
//!   (`fedsend-guest`, a plain C-ABI module without imports) behind the [`fedsend_sim::Engine`]
//!   boundary, usable by tests and drivers alike;
//! - [`human`]: the `--human` rendering of a trace;
//! - [`transport`]: the outbound HTTPS federation transport (X-Matrix signing, server
//!   discovery, SSRF denylist).
//!
//! - [`serve`]: `fedsend serve`, the federation sender service (driver, SQLite store, ingest
//!   API, metrics);
//! - [`demo`]: `fedsend demo`, the service against loopback remote servers it starts itself.
//!
//! The binary (`src/main.rs`) only parses the command line.

pub mod demo;
pub mod human;
pub mod scenario;
pub mod serve;
pub mod synapse_worker;
pub mod transport;
pub mod wasm_engine;
