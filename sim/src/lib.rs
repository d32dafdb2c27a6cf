//! # fedsend-sim: the simulated world around a fedsend engine
//!
//! One world model — our homeserver (rooms, events, membership), remote servers, the network
//! between us, and sender-owned storage that survives restarts — that drives *any* engine
//! through the JSON boundary of [`Engine`]. Because the world is this one `no_std` crate, the
//! native CLI, the wasmtime engine (world native, core in wasm), the Node runner and the
//! browser (world and core both in wasm) all run the very same world code; only the engine
//! differs, which is what makes their traces comparable byte for byte.
//!
//! [`run_scenario`] runs a scenario file (docs/scenarios.md) and emits its trace.

#![no_std]
#![warn(missing_docs)]

extern crate alloc;

mod checker;
mod faults;
mod odd;
mod scenario;

pub mod vopr;
mod world;

use alloc::string::String;
use core::fmt;

pub use checker::Counts;
pub use faults::{FaultCounts, FaultRates};
pub use fedsend_driver::MemoryStore;
pub use scenario::{Respond, Scenario, Step, Visibility};
pub use world::{LiveRun, ScenarioRun};

/// A sender engine seen through its JSON boundary (defined beside the driver, which runs the
/// same engines for real).
pub use fedsend_driver::JsonEngine as Engine;

/// The core linked natively, through the same JSON facade every other engine uses; the world
/// drives it typed ([`Engine::linked_core`]), with the same trace as through the facade.
#[derive(Debug, Default)]
pub struct NativeEngine(Option<fedsend_core::wire::JsonSender>);

impl NativeEngine {
    fn machine(&mut self) -> Result<&mut fedsend_core::wire::JsonSender, String> {
        self.0.as_mut().ok_or_else(|| String::from("engine used before start"))
    }
}

impl Engine for NativeEngine {
    fn start(&mut self, config_json: &str, recovered_json: &str) -> Result<(), String> {
        self.0 = Some(fedsend_core::wire::JsonSender::new(config_json, recovered_json)?);
        Ok(())
    }
    fn handle_input(&mut self, now_ms: u64, input_json: &str) -> Result<(), String> {
        self.machine()?.handle_input(now_ms, input_json)
    }
    fn poll_output(&mut self) -> Option<String> {
        self.0.as_mut()?.poll_output()
    }
    fn poll_timeout(&mut self) -> Option<u64> {
        self.0.as_ref()?.poll_timeout()
    }
    fn destination_stats(&mut self) -> Option<String> {
        Some(self.0.as_ref()?.destination_stats())
    }
    fn linked_core(&mut self) -> Option<&mut fedsend_core::FederationSender> {
        Some(self.0.as_mut()?.machine_mut())
    }
}

/// Why a scenario could not run: one line naming the step (0-based) and the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioError(String);

impl ScenarioError {
    pub(crate) fn new(message: String) -> Self {
        Self(message)
    }

    /// The message, one line.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keep it on one line whatever an engine put in its error text.
        for (index, part) in self.0.split('\n').enumerate() {
            if index > 0 {
                f.write_str(" ")?;
            }
            f.write_str(part)?;
        }
        Ok(())
    }
}

/// Runs a whole scenario, calling `emit` with each trace line (no trailing newline).
pub fn run_scenario(
    scenario_json: &str,
    engine: &mut dyn Engine,
    emit: &mut dyn FnMut(&str),
) -> Result<(), ScenarioError> {
    let mut run = ScenarioRun::start(scenario_json, engine, emit)?;
    while run.step(engine, emit)? {}
    Ok(())
}
