//! The JSON boundary: the same machine, fed and drained as tagged-JSON text.
//!
//! Every non-Rust host (the wasmtime plugin, the JavaScript bindings) and the scenario runner
//! go through this type, so all engines share one encoding and one set of error messages.

use alloc::format;
use alloc::string::{String, ToString};

use crate::config::Config;
use crate::io::{Input, Recovered};
use crate::sender::FederationSender;
use crate::time::Timestamp;

/// Decodes one [`Input`] from JSON text, as [`JsonSender::handle_input`] does.
///
/// Not generic, so a crate that decodes inputs itself (the JavaScript bindings) calls this one
/// compiled decoder: `serde_json::from_str::<Input>` called there compiles a second copy of
/// the derived decoders, which LTO does not merge (182 KB of the npm module at opt-level 3;
/// BENCHMARKS.md, "wasm size (issue 17)").
pub fn input_from_json(text: &str) -> Result<Input, serde_json::Error> {
    serde_json::from_str(text)
}

/// A [`FederationSender`] behind JSON text.
#[derive(Debug)]
pub struct JsonSender {
    inner: FederationSender,
}

impl JsonSender {
    /// Builds a machine from a JSON [`Config`] and JSON [`Recovered`] state.
    pub fn new(config_json: &str, recovered_json: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config_json).map_err(|e| format!("invalid config: {e}"))?;
        let recovered: Recovered =
            serde_json::from_str(recovered_json).map_err(|e| format!("invalid recovered state: {e}"))?;
        let inner = FederationSender::new(config, recovered).map_err(|e| e.to_string())?;
        Ok(Self { inner })
    }

    /// Decodes and applies one [`Input`] at `now_ms` (Unix ms).
    pub fn handle_input(&mut self, now_ms: u64, input_json: &str) -> Result<(), String> {
        let input = input_from_json(input_json).map_err(|e| format!("malformed input: {e}"))?;
        self.inner.handle_input(Timestamp(now_ms), input).map_err(|e| e.to_string())
    }

    /// The next [`crate::Output`] as JSON, or `None`.
    pub fn poll_output(&mut self) -> Option<String> {
        // Serializing our own output types cannot fail: no maps with non-string keys, no floats.
        self.inner.poll_output().map(|output| serde_json::to_string(&output).expect("outputs always serialize"))
    }

    /// The next deadline in Unix ms, or `None`.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.inner.poll_timeout().map(Timestamp::as_ms)
    }

    /// Per-destination figures (D12) as a JSON array, sorted by destination.
    pub fn destination_stats(&self) -> String {
        // Stats are plain strings, integers and booleans.
        serde_json::to_string(&self.inner.destination_stats()).expect("stats always serialize")
    }

    /// The machine itself, for hosts that also want typed access.
    pub fn machine(&self) -> &FederationSender {
        &self.inner
    }

    /// The machine itself, to feed and drain typed values when the host is in the same
    /// process (the simulated world), with no encoding either way.
    pub fn machine_mut(&mut self) -> &mut FederationSender {
        &mut self.inner
    }
}
