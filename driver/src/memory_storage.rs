//! [`MemoryStorage`]: the reference [`MemoryStore`] behind the [`Storage`] trait, with the
//! homeserver's events beside it, for tests, benchmarks and throwaway runs.

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use fedsend_core::{CatchUpRoom, Changes, PduInfo, Recovered, ServerName};

use crate::{MemoryStore, Storage, StorageError};

/// Sender-owned tables and the homeserver's events, in memory. Writes can be made to fail, to
/// exercise the paths a full disk takes.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    tables: RefCell<MemoryStore>,
    events: RefCell<Vec<PduInfo>>,
    failing_writes: Cell<u32>,
    writes: Cell<u64>,
}

impl MemoryStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Storage holding what an earlier run left.
    pub fn with_tables(tables: MemoryStore) -> Self {
        Self { tables: RefCell::new(tables), ..Self::default() }
    }

    /// Records an event the homeserver persisted; its stream ordering must be above every
    /// earlier one (events are fetched by position).
    pub fn add_event(&self, event: PduInfo) {
        self.events.borrow_mut().push(event);
    }

    /// The next `count` writes fail (and write nothing).
    pub fn fail_next_writes(&self, count: u32) {
        self.failing_writes.set(count);
    }

    /// Writes that succeeded so far.
    pub fn writes(&self) -> u64 {
        self.writes.get()
    }

    /// A copy of the sender-owned tables.
    pub fn tables(&self) -> MemoryStore {
        self.tables.borrow().clone()
    }
}

impl Storage for MemoryStorage {
    async fn load_recovered(&self) -> Result<Recovered, StorageError> {
        Ok(self.tables.borrow().recovered())
    }

    async fn apply(&self, batches: &[&Changes]) -> Result<(), StorageError> {
        if self.failing_writes.get() > 0 {
            self.failing_writes.set(self.failing_writes.get() - 1);
            return Err(StorageError(String::from("the write failed (as the test asked)")));
        }
        let mut tables = self.tables.borrow_mut();
        for changes in batches {
            tables.apply(changes);
        }
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }

    async fn fetch_events(&self, after: u64, limit: u32) -> Result<Vec<PduInfo>, StorageError> {
        let events = self.events.borrow();
        Ok(events.iter().filter(|event| event.stream_ordering > after).take(limit as usize).cloned().collect())
    }

    async fn load_catch_up(
        &self,
        destination: &ServerName,
        after: u64,
        up_to: u64,
        limit: u32,
    ) -> Result<Vec<CatchUpRoom>, StorageError> {
        let rows = self.tables.borrow().catch_up_rows(destination, after, up_to, limit);
        let events = self.events.borrow();
        // A row whose event is gone (purged) is left out, as the contract says.
        Ok(rows
            .into_iter()
            .filter_map(|(room_id, stream_ordering)| {
                let event = events.iter().find(|event| event.stream_ordering == stream_ordering)?;
                Some(CatchUpRoom {
                    room_id,
                    stream_ordering,
                    event_id: event.event_id.clone(),
                    pdu: event.pdu.clone(),
                    partial_state: false,
                    extremities: Vec::new(),
                    undeliverable: None,
                })
            })
            .collect())
    }

    async fn load_outstanding(&self, after: Option<&ServerName>, limit: u32) -> Result<Vec<ServerName>, StorageError> {
        Ok(self.tables.borrow().outstanding(after, limit))
    }
}
