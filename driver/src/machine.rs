//! The sans-IO machine as the driver sees it: the core linked in ([`FederationSender`], typed,
//! no encoding at all), or any engine behind the JSON boundary ([`JsonMachine`] over a
//! [`JsonEngine`], e.g. the core compiled to wasm inside wasmtime).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fedsend_core::{DestinationStats, FederationSender, Input, Output, Timestamp};

/// A sender machine: fed inputs, drained of outputs, asked for its deadline.
pub trait Machine {
    /// Feeds one input at `now_ms`. A refused input changes nothing.
    fn handle_input(&mut self, now_ms: u64, input: Input) -> Result<(), String>;
    /// The next output; `Err` when the engine emitted one this host cannot decode (whatever
    /// it asked for is not done, which the driver reports).
    fn poll_output(&mut self) -> Option<Result<Output, String>>;
    /// The next deadline in Unix ms. (`&mut`: for an engine across a boundary, asking is a
    /// call into it.)
    fn poll_timeout(&mut self) -> Option<u64>;
    /// Per-destination figures, sorted by destination (empty when the engine offers none).
    fn destination_stats(&mut self) -> Vec<DestinationStats>;
}

impl Machine for FederationSender {
    fn handle_input(&mut self, now_ms: u64, input: Input) -> Result<(), String> {
        Self::handle_input(self, Timestamp(now_ms), input).map_err(|e| e.to_string())
    }

    fn poll_output(&mut self) -> Option<Result<Output, String>> {
        Self::poll_output(self).map(Ok)
    }

    fn poll_timeout(&mut self) -> Option<u64> {
        Self::poll_timeout(self).map(Timestamp::as_ms)
    }

    fn destination_stats(&mut self) -> Vec<DestinationStats> {
        Self::destination_stats(self)
    }
}

/// A sender engine seen through its JSON boundary: the shape every engine shares (the core
/// linked natively through [`fedsend_core::wire::JsonSender`], the wasmtime guest, the
/// JavaScript bindings), so that scenario runs can compare their traces byte for byte.
pub trait JsonEngine {
    /// (Re)creates the machine from config and recovered state (both JSON).
    fn start(&mut self, config_json: &str, recovered_json: &str) -> Result<(), String>;
    /// Feeds one input (JSON) at `now_ms`.
    fn handle_input(&mut self, now_ms: u64, input_json: &str) -> Result<(), String>;
    /// Next output (JSON), if any.
    fn poll_output(&mut self) -> Option<String>;
    /// Next deadline (Unix ms), if any.
    fn poll_timeout(&mut self) -> Option<u64>;
    /// Per-destination figures as JSON (`DestinationStats` array), if the engine offers them.
    fn destination_stats(&mut self) -> Option<String> {
        None
    }
    /// The core itself when it is linked into this process, so that a host holding typed
    /// values (the simulated world) feeds and drains it without encoding anything. Engines
    /// behind a real boundary (wasm, JavaScript) keep the default.
    fn linked_core(&mut self) -> Option<&mut FederationSender> {
        None
    }
}

/// A [`JsonEngine`] as a typed [`Machine`]: inputs encoded, outputs decoded.
#[derive(Debug)]
pub struct JsonMachine<E> {
    engine: E,
}

impl<E: JsonEngine> JsonMachine<E> {
    /// Starts `engine` with `config_json` and the recovered state.
    pub fn start(mut engine: E, config_json: &str, recovered: &fedsend_core::Recovered) -> Result<Self, String> {
        let recovered_json = serde_json::to_string(recovered).map_err(|e| e.to_string())?;
        engine.start(config_json, &recovered_json)?;
        Ok(Self { engine })
    }

    /// The engine inside.
    pub fn engine_mut(&mut self) -> &mut E {
        &mut self.engine
    }
}

impl<E: JsonEngine> Machine for JsonMachine<E> {
    fn handle_input(&mut self, now_ms: u64, input: Input) -> Result<(), String> {
        // Inputs are plain data (strings, integers, JSON values): encoding cannot fail.
        let json = serde_json::to_string(&input).map_err(|e| e.to_string())?;
        self.engine.handle_input(now_ms, &json)
    }

    fn poll_output(&mut self) -> Option<Result<Output, String>> {
        let text = self.engine.poll_output()?;
        Some(serde_json::from_str(&text).map_err(|e| {
            let start: String = text.chars().take(300).collect();
            format!("an output this host cannot decode ({e}): {start}")
        }))
    }

    fn poll_timeout(&mut self) -> Option<u64> {
        self.engine.poll_timeout()
    }

    fn destination_stats(&mut self) -> Vec<DestinationStats> {
        self.engine.destination_stats().and_then(|json| serde_json::from_str(&json).ok()).unwrap_or_default()
    }
}

// A host choosing its engine at run time (typed core or wasm) holds it boxed.
impl<M: Machine + ?Sized> Machine for alloc::boxed::Box<M> {
    fn handle_input(&mut self, now_ms: u64, input: Input) -> Result<(), String> {
        (**self).handle_input(now_ms, input)
    }
    fn poll_output(&mut self) -> Option<Result<Output, String>> {
        (**self).poll_output()
    }
    fn poll_timeout(&mut self) -> Option<u64> {
        (**self).poll_timeout()
    }
    fn destination_stats(&mut self) -> Vec<DestinationStats> {
        (**self).destination_stats()
    }
}
