//! The `fedsend` command: the service (crate `fedsend-service`, re-exported here so that one
//! path names everything) plus what only a developer's command needs —
//!
//! - [`scenario`]: `fedsend scenario`, which runs a scenario file (`docs/scenarios.md`) on the
//!   natively linked core or on the core inside wasmtime, through the simulator, and prints
//!   its trace;
//! - [`human`]: the `--human` rendering of a trace.

pub use fedsend_service::{demo, serve, synapse_worker, transport, wasm_engine};

pub mod human;
pub mod scenario;
