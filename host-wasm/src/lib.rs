//! The fedsend core for JavaScript, through wasm-bindgen.
//!
//! JavaScript sees these (camelCase, as the generated `.d.ts` shows):
//!
//! - [`FederationSender`]: the sans-IO machine itself. Inputs go in and outputs come out as
//!   JSON strings, in the same encoding as every other boundary (`fedsend_core::wire`).
//! - [`SenderMachine`]: the same machine plus its per-destination figures: the npm package's
//!   raw `Machine`.
//! - [`DrivenSender`]: the one run loop (`fedsend-driver`) over JavaScript callbacks, with
//!   values crossing as objects: the npm package's driven `FederationSender` wraps it.
//! - [`ReferenceMemoryStore`]: `fedsend_driver::MemoryStore` for the npm `MemoryStore`, and
//!   [`is_server_name`] (`isServerName`) for every npm store's check of a batch.
//! - signing ([`WasmSigningKey`], [`x_matrix_authorization`], …): `fedsend-sign` for the npm
//!   package, so JavaScript homeservers sign requests with the native host's code.
//! - [`run_scenario`] (`runScenario`): runs a scenario file (`docs/scenarios.md`) in the
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
mod boundary_probe;
mod driven;
mod driven_sender;
mod js_value;
mod live;
mod memory_store;
pub mod ms;
mod scenario;
mod sign;

pub use bindings::FederationSender;
pub use boundary_probe::BoundaryProbe;
pub use driven::SenderMachine;
pub use driven_sender::{DrivenHost, DrivenSender};
pub use live::{LiveSimulation, ScenarioStepper};
pub use memory_store::{ReferenceMemoryStore, is_server_name};
pub use scenario::{EngineObject, run_scenario};
pub use sign::{WasmSigningKey, canonical_json, sign_json, verify_json, x_matrix_authorization};
