//! `ReferenceMemoryStore`: `fedsend_driver::MemoryStore`, the reference store every other
//! store follows, for the npm package's `MemoryStore` (`npm/src/memory-store.js`, which keeps
//! the JavaScript API and its checks of a batch's shape).

use std::cell::RefCell;
use std::rc::Rc;

use fedsend_core::{Changes, ServerName};
use fedsend_driver::MemoryStore;
use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::js_value::{from_js, to_js};
use crate::ms::ms_from_js;

/// Whether `name` is a server name the core accepts. Every JavaScript store refuses a batch
/// naming anything else (`npm/src/store-common.js`), as this one does: the core never emits
/// such a row, so a store holding one has been handed something that is not the core's.
#[wasm_bindgen(js_name = isServerName)]
pub fn is_server_name(name: &str) -> bool {
    ServerName::parse(name).is_ok()
}

/// Sender-owned tables in wasm memory.
#[wasm_bindgen]
#[derive(Default)]
pub struct ReferenceMemoryStore(Rc<RefCell<MemoryStore>>);

#[derive(Serialize)]
struct CatchUpRow {
    room_id: String,
    stream_ordering: u64,
}

#[wasm_bindgen]
impl ReferenceMemoryStore {
    /// An empty store (a fresh install).
    #[wasm_bindgen(constructor)]
    pub fn new() -> Self {
        Self::default()
    }

    /// Another handle on the same tables, for `DrivenSender` to write to without leaving wasm
    /// (passing a handle to Rust consumes it, so the wrapper keeps its own).
    pub fn share(&self) -> Self {
        Self(Rc::clone(&self.0))
    }

    /// Applies one batch (an object), all or nothing: a batch the core's types refuse throws
    /// an `Error` and changes nothing.
    #[wasm_bindgen(js_name = applyChanges)]
    pub fn apply_changes(&mut self, changes: JsValue) -> Result<(), JsError> {
        let changes: Changes = from_js(&changes).map_err(|e| JsError::new(&e))?;
        self.0.borrow_mut().apply(&changes);
        Ok(())
    }

    /// What a restarted sender loads (an object).
    #[wasm_bindgen(js_name = loadRecovered)]
    pub fn load_recovered(&self) -> JsValue {
        to_js(&self.0.borrow().recovered())
    }

    /// `[{room_id, stream_ordering}]` of `destination` in (`after`, `upTo`], ascending, at
    /// most `limit`.
    #[wasm_bindgen(js_name = catchUpRows)]
    pub fn catch_up_rows(
        &self,
        destination: &str,
        after: f64,
        #[wasm_bindgen(js_name = upTo)] up_to: f64,
        limit: u32,
    ) -> Result<JsValue, JsError> {
        // A name the core would refuse has no rows: the store holds only names it accepted.
        let Ok(destination) = ServerName::parse(destination) else { return Ok(to_js::<[CatchUpRow]>(&[])) };
        let after = ms_from_js("after", after).map_err(|e| JsError::new(&e))?;
        let up_to = ms_from_js("up_to", up_to).map_err(|e| JsError::new(&e))?;
        let rows: Vec<CatchUpRow> = self
            .0
            .borrow()
            .catch_up_rows(&destination, after, up_to, limit)
            .into_iter()
            .map(|(room_id, stream_ordering)| CatchUpRow { room_id, stream_ordering })
            .collect();
        Ok(to_js(&rows))
    }

    /// Destinations after `after` (byte order) with work owed, sorted, at most `limit`.
    #[wasm_bindgen(js_name = loadOutstanding)]
    pub fn load_outstanding(&self, after: Option<String>, limit: u32) -> Result<JsValue, JsError> {
        let after = after.map(|name| ServerName::parse(&name)).transpose().map_err(|e| JsError::new(&e.to_string()))?;
        Ok(to_js(&self.0.borrow().outstanding(after.as_ref(), limit)))
    }
}

impl ReferenceMemoryStore {
    /// The tables, for the driver's storage.
    pub(crate) fn tables(&self) -> Rc<RefCell<MemoryStore>> {
        Rc::clone(&self.0)
    }
}
