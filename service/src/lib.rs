//! # fedsend-service: the federation sender as a service
//!
//! Everything `fedsend serve`, `fedsend synapse` and `fedsend demo` run, around the one run
//! loop of `fedsend-driver`: the SQLite and in-memory stores ([`serve::store`]), the Synapse
//! worker mode's PostgreSQL store and replication feed ([`synapse_worker`]), the HTTPS
//! transport ([`transport`]), the ingest API and metrics, and the wasmtime engine
//! ([`wasm_engine`]). The scenario runner and the simulator are not part of it: the `fedsend`
//! command (crate `fedsend-host-native`) adds them.

pub mod demo;
pub mod serve;
pub mod synapse_worker;
pub mod transport;
pub mod wasm_engine;
