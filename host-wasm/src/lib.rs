//! The fedsend core for JavaScript, through wasm-bindgen.
//!
//! JavaScript sees two things (camelCase, as the generated `.d.ts` shows):
//!
//! - [`FederationSender`]: the sans-IO machine itself. Inputs go in and outputs come out as
//!   JSON strings, in the same encoding as every other boundary (`fedsend_core::wire`).
//! - [`run_scenario`] (`runScenario`): runs a scenario file (`spec/scenarios.md`) in the
//!   simulated world of `fedsend-sim`, against an engine object written in JavaScript. The
//!   browser demo and the Node runner (`www/bin/fedsend-scenario.mjs`) hand it an object that
//!   wraps a `FederationSender`, so the core is driven across the JS boundary as JSON, exactly
//!   as a JavaScript homeserver drives it.
//! - [`LiveSimulation`] and [`ScenarioStepper`]: the world and the core both inside the module,
//!   driven one step at a time (the browser visualiser): a live world fed steps as JSON, and a
//!   scenario file stepped through, each with its trace and per-destination figures.
//!
//! Times cross the boundary as JavaScript numbers (`f64`) holding whole Unix milliseconds, not
//! `BigInt`; [`ms`] does the checked conversions.
//!
//! The bindings compile on every target, so native `cargo test --workspace` and clippy cover
//! them; only on wasm32 do they talk to a JavaScript engine (natively, calling an imported JS
//! function panics, and nothing native calls them).

mod bindings;
mod live;
pub mod ms;
mod scenario;

pub use bindings::FederationSender;
pub use live::{LiveSimulation, ScenarioStepper};
pub use scenario::{EngineObject, run_scenario};
