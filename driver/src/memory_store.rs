//! An in-memory implementation of the sender-owned storage: the reference for what every
//! store (SQLite, JavaScript) must do with [`Changes`] and the storage queries.

use alloc::collections::BTreeMap;
use alloc::collections::btree_map::Entry;
use alloc::string::String;
use alloc::vec::Vec;

use fedsend_core::{
    Changes, DestinationRoom, DestinationState, DeviceListPoke, DeviceListPosition, OutboxRow, Recovered, ServerName,
};

/// Sender-owned tables: `destinations`, `destination_rooms`, stream position, incarnation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryStore {
    /// Last persisted incarnation.
    pub incarnation: u64,
    /// Events-stream position up to which fan-out is durable.
    pub events_out_pos: Option<u64>,
    /// `destinations` rows by name.
    pub destinations: BTreeMap<ServerName, DestinationState>,
    /// `destination_rooms`: (destination, room) → stream ordering.
    pub destination_rooms: BTreeMap<(ServerName, String), u64>,
    /// The to-device outbox: (destination, outbox id) → row.
    pub to_device_outbox: BTreeMap<(ServerName, u64), OutboxRow>,
    /// Device-list pokes: (destination, user, device) → row.
    pub device_list_pokes: BTreeMap<(ServerName, String, Option<String>), DeviceListPoke>,
    /// Device-list positions: (destination, user) → stream id.
    pub device_list_positions: BTreeMap<(ServerName, String), u64>,
}

impl MemoryStore {
    /// Applies one batch: max-upserts for the growing values, whole-row upserts otherwise.
    pub fn apply(&mut self, changes: &Changes) {
        if let Some(incarnation) = changes.incarnation {
            self.incarnation = self.incarnation.max(incarnation);
        }
        if let Some(position) = changes.events_out_pos {
            self.events_out_pos = Some(self.events_out_pos.map_or(position, |p| p.max(position)));
        }
        for DestinationRoom { destination, room_id, stream_ordering } in &changes.destination_rooms {
            self.destinations.entry(destination.clone()).or_insert_with(|| DestinationState {
                destination: destination.clone(),
                ..DestinationState::default()
            });
            let slot = self.destination_rooms.entry((destination.clone(), String::from(&**room_id))).or_insert(0);
            *slot = (*slot).max(*stream_ordering);
        }
        for row in &changes.destinations {
            self.destinations.insert(row.destination.clone(), row.clone());
        }
        for row in &changes.to_device_outbox {
            self.to_device_outbox.insert((row.destination.clone(), row.outbox_id), row.clone());
        }
        for key in &changes.to_device_deleted {
            self.to_device_outbox.remove(&(key.destination.clone(), key.outbox_id));
        }
        for poke in &changes.device_list_pokes {
            let key = (poke.destination.clone(), poke.user_id.clone(), poke.device_id.clone());
            if self.device_list_pokes.get(&key).is_none_or(|stored| stored.stream_id < poke.stream_id) {
                self.device_list_pokes.insert(key, poke.clone());
            }
        }
        for done in &changes.device_list_pokes_deleted {
            let key = (done.destination.clone(), done.user_id.clone(), done.device_id.clone());
            if self.device_list_pokes.get(&key).is_some_and(|stored| stored.stream_id <= done.stream_id) {
                self.device_list_pokes.remove(&key);
            }
        }
        for position in &changes.device_list_positions {
            let key = (position.destination.clone(), position.user_id.clone());
            match position.stream_id {
                Some(stream_id) => self.device_list_positions.insert(key, stream_id),
                None => self.device_list_positions.remove(&key),
            };
        }
    }

    /// [`Self::apply`] for a batch its caller is done with: rows are moved into the tables
    /// rather than copied (a simulated world applies every batch twice, once when it is
    /// written and once when it is durable, and the second copy was a tenth of its time).
    pub fn apply_owned(&mut self, changes: Changes) {
        let Changes {
            incarnation,
            events_out_pos,
            destination_rooms,
            destinations,
            to_device_outbox,
            to_device_deleted,
            device_list_pokes,
            device_list_pokes_deleted,
            device_list_positions,
        } = changes;
        if let Some(incarnation) = incarnation {
            self.incarnation = self.incarnation.max(incarnation);
        }
        if let Some(position) = events_out_pos {
            self.events_out_pos = Some(self.events_out_pos.map_or(position, |p| p.max(position)));
        }
        for DestinationRoom { destination, room_id, stream_ordering } in destination_rooms {
            if !self.destinations.contains_key(&destination) {
                let row = DestinationState { destination: destination.clone(), ..DestinationState::default() };
                self.destinations.insert(destination.clone(), row);
            }
            let slot = self.destination_rooms.entry((destination, String::from(&*room_id))).or_insert(0);
            *slot = (*slot).max(stream_ordering);
        }
        for row in destinations {
            self.destinations.insert(row.destination.clone(), row);
        }
        for row in to_device_outbox {
            self.to_device_outbox.insert((row.destination.clone(), row.outbox_id), row);
        }
        for key in to_device_deleted {
            self.to_device_outbox.remove(&(key.destination, key.outbox_id));
        }
        for poke in device_list_pokes {
            let key = (poke.destination.clone(), poke.user_id.clone(), poke.device_id.clone());
            match self.device_list_pokes.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(poke);
                }
                Entry::Occupied(mut slot) => {
                    if slot.get().stream_id < poke.stream_id {
                        slot.insert(poke);
                    }
                }
            }
        }
        for done in device_list_pokes_deleted {
            let key = (done.destination, done.user_id, done.device_id);
            if self.device_list_pokes.get(&key).is_some_and(|stored| stored.stream_id <= done.stream_id) {
                self.device_list_pokes.remove(&key);
            }
        }
        for position in device_list_positions {
            let key = (position.destination, position.user_id);
            match position.stream_id {
                Some(stream_id) => self.device_list_positions.insert(key, stream_id),
                None => self.device_list_positions.remove(&key),
            };
        }
    }

    /// What a restarted sender loads.
    pub fn recovered(&self) -> Recovered {
        Recovered {
            incarnation: self.incarnation,
            events_out_pos: self.events_out_pos,
            destinations: self.destinations.values().cloned().collect(),
            to_device_outbox: self.to_device_outbox.values().cloned().collect(),
            device_list_pokes: self.device_list_pokes.values().cloned().collect(),
            device_list_positions: self
                .device_list_positions
                .iter()
                .map(|((destination, user_id), stream_id)| DeviceListPosition {
                    destination: destination.clone(),
                    user_id: user_id.clone(),
                    stream_id: Some(*stream_id),
                })
                .collect(),
        }
    }

    /// Rows of `destination` in (`after`, `up_to`], ascending by stream ordering, at most
    /// `limit`.
    pub fn catch_up_rows(&self, destination: &ServerName, after: u64, up_to: u64, limit: u32) -> Vec<(String, u64)> {
        // Keys are (destination, room): one destination's rows are one range of the tree.
        let mut rows: Vec<(String, u64)> = self
            .destination_rooms
            .range((destination.clone(), String::new())..)
            .take_while(|((dest, _), _)| dest == destination)
            .filter(|(_, stream)| **stream > after && **stream <= up_to)
            .map(|((_, room), stream)| (room.clone(), *stream))
            .collect();
        rows.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        rows.truncate(limit as usize);
        rows
    }

    /// Destinations after `after` with a row above their last successful position, or with
    /// to-device messages in the outbox; sorted, at most `limit`.
    pub fn outstanding(&self, after: Option<&ServerName>, limit: u32) -> Vec<ServerName> {
        let limit = limit as usize;
        let after_cursor = |destination: &ServerName| after.is_none_or(|a| destination > a);
        // Both tables are ordered by destination: each gives its first `limit` names after the
        // cursor, and the answer is the first `limit` of the two merged, so a page costs what it
        // returns, not the size of the tables.
        let mut names: Vec<ServerName> = Vec::new();
        let outbox = match after {
            Some(a) => self.to_device_outbox.range((a.clone(), u64::MAX)..),
            None => self.to_device_outbox.range(..),
        };
        for ((destination, _), _) in outbox {
            if names.len() >= limit {
                break;
            }
            if after_cursor(destination) && names.last() != Some(destination) {
                names.push(destination.clone());
            }
        }
        let from_outbox = names.len();
        let rows = match after {
            Some(a) => self.destination_rooms.range((a.clone(), String::new())..),
            None => self.destination_rooms.range(..),
        };
        for ((destination, _), stream) in rows {
            if names.len() - from_outbox >= limit {
                break;
            }
            if !after_cursor(destination) || names[from_outbox..].last() == Some(destination) {
                continue;
            }
            let delivered =
                self.destinations.get(destination).and_then(|d| d.last_successful_stream_ordering).unwrap_or(0);
            if *stream > delivered {
                names.push(destination.clone());
            }
        }
        names.sort();
        names.dedup();
        names.truncate(limit);
        names
    }
}
