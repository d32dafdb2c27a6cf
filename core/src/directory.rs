//! The destinations the machine knows, each interned once: a server name maps to a dense
//! [`DestId`], and the per-destination records live in a vector indexed by it. The hot paths
//! (fan-out, driving, answers) work on ids and never compare names.
//!
//! Outputs are ordered by destination name (the driven set is drained in name order, and
//! traces depend on it), so every destination also carries an order key: an integer that sorts
//! as its name does. Keys are spaced out and a new name takes the midpoint of its neighbours'
//! keys; when no gap is left, every key is reassigned.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::destination::Destination;
use crate::types::ServerName;

/// A destination's index in the [`Directory`]. Ids are never reused: a record, once created,
/// is kept for the life of the machine (docs/design.md, "Memory").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct DestId(pub(crate) u32);

impl DestId {
    fn chunk(self) -> usize {
        self.0 as usize / CHUNK_ENTRIES
    }

    fn offset(self) -> usize {
        self.0 as usize % CHUNK_ENTRIES
    }
}

const CHUNK_ENTRIES: usize = 256;

/// Gap between neighbouring order keys after they are reassigned: 32 halvings before a run
/// of names inserted between the same two neighbours forces the next reassignment.
const ORDER_SPACING: u64 = 1 << 32;

#[derive(Debug)]
struct Entry {
    name: ServerName,
    order: u64,
    destination: Destination,
}

#[derive(Debug, Default)]
pub(crate) struct Directory {
    ids: BTreeMap<ServerName, DestId>,
    /// Records by id, in chunks of [`CHUNK_ENTRIES`]: every known destination keeps a record,
    /// so growth must not copy them all or leave a doubled vector's slack (in wasm, linear
    /// memory keeps the high-water mark of both copies).
    chunks: Vec<Vec<Entry>>,
    len: usize,
    /// Bumped whenever order keys are reassigned; keys read before then are stale.
    order_generation: u64,
}

impl Directory {
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    // Ids are minted only by `intern`/`insert_new` below and records are never removed, so an id
    // always indexes a record: an index out of range would be a broken invariant, never input.
    fn entry(&self, id: DestId) -> &Entry {
        &self.chunks[id.chunk()][id.offset()]
    }

    fn entry_mut(&mut self, id: DestId) -> &mut Entry {
        &mut self.chunks[id.chunk()][id.offset()]
    }

    pub(crate) fn id(&self, name: &ServerName) -> Option<DestId> {
        self.ids.get(name).copied()
    }

    /// The id of `name`, a fresh default record created for it if it is new.
    pub(crate) fn intern(&mut self, name: &ServerName) -> DestId {
        // Routing interns a sorted host list, so new names mostly sort after every known one:
        // one comparison proves them new.
        let after_all = self.ids.last_key_value().is_none_or(|(last, _)| name > last);
        if !after_all && let Some(id) = self.ids.get(name) {
            return *id;
        }
        self.insert_new(name.clone(), Destination::default())
    }

    /// Adds a destination not known yet. The caller checked that `name` is new.
    pub(crate) fn insert_new(&mut self, name: ServerName, destination: Destination) -> DestId {
        // Ids fit in u32: four billion records would exhaust memory long before.
        let id = DestId(self.len as u32);
        let order = self.order_between(&name);
        if id.offset() == 0 {
            self.chunks.push(Vec::with_capacity(CHUNK_ENTRIES));
        }
        let entry = Entry { name: name.clone(), order: order.unwrap_or(0), destination };
        self.chunks[id.chunk()].push(entry);
        self.len += 1;
        self.ids.insert(name, id);
        if order.is_none() {
            self.reassign_order();
        }
        id
    }

    /// The midpoint between the order keys of `name`'s neighbours, if there is room.
    fn order_between(&self, name: &ServerName) -> Option<u64> {
        use core::ops::Bound::{Excluded, Unbounded};
        match self.ids.last_key_value() {
            None => return Some(u64::MAX / 2),
            // The usual case (names interned in order), without the two searches below.
            Some((last, id)) if name > last => return self.entry(*id).order.checked_add(ORDER_SPACING),
            Some(_) => {}
        }
        let below = self.ids.range::<ServerName, _>((Unbounded, Excluded(name))).next_back();
        let above = self.ids.range::<ServerName, _>((Excluded(name), Unbounded)).next();
        let below = below.map(|(_, id)| self.entry(*id).order);
        let above = above.map(|(_, id)| self.entry(*id).order);
        match (below, above) {
            (None, None) => Some(u64::MAX / 2),
            (Some(low), None) => low.checked_add(ORDER_SPACING),
            (None, Some(high)) => high.checked_sub(ORDER_SPACING).or((high > 0).then_some(high / 2)),
            (Some(low), Some(high)) => (high - low >= 2).then_some(low + (high - low) / 2),
        }
    }

    fn reassign_order(&mut self) {
        let count = self.len as u64 + 1;
        let spacing = (u64::MAX / 2 / count).clamp(1, ORDER_SPACING);
        let mut order = u64::MAX / 4;
        for id in self.ids.values() {
            self.chunks[id.chunk()][id.offset()].order = order;
            order += spacing;
        }
        self.order_generation += 1;
    }

    pub(crate) fn order(&self, id: DestId) -> u64 {
        self.entry(id).order
    }

    pub(crate) fn order_generation(&self) -> u64 {
        self.order_generation
    }

    pub(crate) fn name(&self, id: DestId) -> &ServerName {
        &self.entry(id).name
    }

    /// Ids come only from this directory, so they always index a record.
    pub(crate) fn at(&self, id: DestId) -> &Destination {
        &self.entry(id).destination
    }

    pub(crate) fn at_mut(&mut self, id: DestId) -> (&ServerName, &mut Destination) {
        let entry = self.entry_mut(id);
        (&entry.name, &mut entry.destination)
    }

    pub(crate) fn get(&self, name: &ServerName) -> Option<&Destination> {
        self.id(name).map(|id| self.at(id))
    }

    pub(crate) fn get_mut(&mut self, name: &ServerName) -> Option<&mut Destination> {
        self.id(name).map(|id| self.at_mut(id).1)
    }

    /// `name`'s record, a fresh default one if it is new.
    pub(crate) fn or_default(&mut self, name: &ServerName) -> &mut Destination {
        let id = self.intern(name);
        self.at_mut(id).1
    }

    /// Every destination, in name order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ServerName, &Destination)> {
        self.ids.iter().map(|(name, id)| (name, &self.entry(*id).destination))
    }

    /// Every destination's id, in name order.
    pub(crate) fn ids_in_name_order(&self) -> Vec<DestId> {
        self.ids.values().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> ServerName {
        ServerName::parse(text).unwrap()
    }

    fn assert_order_follows_names(directory: &Directory) {
        let orders: Vec<u64> = directory.ids.values().map(|id| directory.order(*id)).collect();
        assert!(orders.windows(2).all(|pair| pair[0] < pair[1]), "{orders:?}");
    }

    #[test]
    fn ids_are_dense_and_stable_and_order_keys_sort_as_names() {
        let mut directory = Directory::default();
        let b = directory.intern(&name("b.test"));
        let a = directory.intern(&name("a.test"));
        let c = directory.intern(&name("c.test"));
        assert_eq!((b, a, c), (DestId(0), DestId(1), DestId(2)));
        assert_eq!(directory.intern(&name("a.test")), a);
        assert_eq!(directory.name(c), &name("c.test"));
        assert_order_follows_names(&directory);
        let names: Vec<&str> = directory.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.test", "b.test", "c.test"]);
    }

    #[test]
    fn keys_are_reassigned_when_a_gap_runs_out() {
        let mut directory = Directory::default();
        directory.intern(&name("a"));
        directory.intern(&name("b"));
        // Each name sorts just after "a" and before the previous one: the gap halves each time.
        let mut text = alloc::string::String::from("a.z");
        for _ in 0..100 {
            directory.intern(&name(&text));
            text.insert_str(2, "a.");
            assert_order_follows_names(&directory);
        }
        assert!(directory.order_generation() > 0);
        for i in (0..300).rev() {
            directory.intern(&name(&alloc::format!("s{i:03}")));
        }
        for i in 0..300 {
            directory.intern(&name(&alloc::format!("t{i:03}")));
        }
        assert_order_follows_names(&directory);
        assert_eq!(directory.len(), 702);
    }
}
