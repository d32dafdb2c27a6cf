//! Device-list chains: per (destination, local user), the `m.device_list_update` EDUs form a
//! chain through `prev_id`, the stream id the destination last acknowledged. A receiver that
//! sees a gap resynchronises the user's whole device list, so the chain must survive failures
//! and restarts, and must be restarted (an empty `prev_id`) whenever the destination will miss
//! a change: pruned, given up, or dropped.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;

use crate::destination::Destination;
use crate::edu::{Poke, PokeRef};
use crate::effects::Effects;
use crate::io::{DeviceListPoke, DeviceListPokeKey, DeviceListPosition};
use crate::types::ServerName;

/// Per local user, what a destination knows of the user's device-list chain.
#[derive(Debug, Default)]
pub(crate) struct DeviceListChains {
    /// The newest device-list stream id the destination acknowledged: the `prev_id` of the
    /// next `m.device_list_update` for that user.
    pub(crate) positions: BTreeMap<String, u64>,
    /// Users whose chain was restarted (pruning, a dropped update) while a transaction built
    /// earlier may still be delivered: that delivery must not set their position again.
    pub(crate) resets: BTreeSet<String>,
}

/// The positions of a destination without device-list state.
pub(crate) const NO_POSITIONS: &BTreeMap<String, u64> = &BTreeMap::new();

impl DeviceListChains {
    /// Records that the destination acknowledged `stream_id` for `user_id`. Returns whether
    /// the position moved (a restarted chain, or an older acknowledgement, leaves it).
    fn acknowledge(&mut self, user_id: &str, stream_id: u64) -> bool {
        if self.resets.contains(user_id) || self.positions.get(user_id).is_some_and(|p| *p >= stream_id) {
            return false;
        }
        self.positions.insert(String::from(user_id), stream_id);
        true
    }

    /// Restarts `user_id`'s chain. Returns whether a stored position has to be deleted.
    fn restart(&mut self, user_id: &str) -> bool {
        self.resets.insert(String::from(user_id));
        self.positions.remove(user_id).is_some()
    }
}

impl Destination {
    pub(crate) fn device_list_position(&self, user_id: &str) -> Option<u64> {
        self.device_lists.as_ref().and_then(|d| d.positions.get(user_id).copied())
    }

    pub(crate) fn device_lists(&mut self) -> &mut DeviceListChains {
        self.device_lists.get_or_insert_with(Default::default)
    }

    /// Whether a device's change at `stream_id` is news to the destination. Cross-signing keys
    /// (no device) always are.
    pub(crate) fn device_list_is_new(&self, user_id: &str, device_id: Option<&str>, stream_id: u64) -> bool {
        device_id.is_none() || self.device_list_position(user_id).is_none_or(|p| p < stream_id)
    }

    /// Queues a change already durable (a recovered or a stored row). A device change the
    /// destination already acknowledged only owes its deletion. Returns whether it was queued.
    pub(crate) fn queue_stored_poke(&mut self, fx: &mut Effects, row: DeviceListPoke) -> bool {
        if !self.device_list_is_new(&row.user_id, row.device_id.as_deref(), row.stream_id) {
            fx.changes.device_list_pokes_deleted.push(DeviceListPokeKey {
                destination: row.destination,
                user_id: row.user_id,
                device_id: row.device_id,
                stream_id: row.stream_id,
            });
            return false;
        }
        let poke = Poke { stream_id: row.stream_id, queued_ts: row.queued_ts, content: row.content };
        self.queue().edus.push_device_list(&row.user_id, row.device_id.as_deref(), poke)
    }

    /// A device-list poke left the destination (delivered or given up): memory and storage
    /// forget it unless a newer change replaced it.
    pub(crate) fn device_list_settled(&mut self, name: &ServerName, fx: &mut Effects, poke: &PokeRef) {
        if let Some(queue) = self.queue.as_mut() {
            queue.edus.device_list_settled(poke);
        }
        fx.changes.device_list_pokes_deleted.push(DeviceListPokeKey {
            destination: name.clone(),
            user_id: poke.user_id.clone(),
            device_id: poke.device_id.clone(),
            stream_id: poke.stream_id,
        });
    }

    /// A delivered device change moves the user's chain forward, durably.
    pub(crate) fn device_list_acknowledged(&mut self, name: &ServerName, fx: &mut Effects, poke: &PokeRef) {
        if poke.device_id.is_none() {
            return;
        }
        if self.device_lists().acknowledge(&poke.user_id, poke.stream_id) {
            fx.changes.device_list_positions.push(DeviceListPosition {
                destination: name.clone(),
                user_id: poke.user_id.clone(),
                stream_id: Some(poke.stream_id),
            });
        }
    }

    /// The destination will miss some of `user_id`'s device-list changes: the next EDU for
    /// the user carries an empty `prev_id`, which makes the receiver fetch the whole list.
    pub(crate) fn restart_device_list_chain(&mut self, name: &ServerName, fx: &mut Effects, user_id: &str) {
        if self.device_lists().restart(user_id) {
            fx.changes.device_list_positions.push(DeviceListPosition {
                destination: name.clone(),
                user_id: String::from(user_id),
                stream_id: None,
            });
        }
    }

    /// Synapse's pruning of outbound device-list pokes (`_prune_old_outbound_device_pokes` in
    /// `storage/databases/main/devices.py`): a user with several changes queued since before
    /// `cutoff_ms` keeps only the newest, and the chain restarts so the destination
    /// resynchronises the whole list.
    pub(crate) fn prune_device_lists(&mut self, name: &ServerName, fx: &mut Effects, cutoff_ms: u64) {
        let pruned = self.queue.as_mut().map(|q| q.edus.prune_device_lists(cutoff_ms)).unwrap_or_default();
        let mut users: BTreeSet<String> = BTreeSet::new();
        for poke in &pruned {
            self.device_list_settled(name, fx, poke);
            users.insert(poke.user_id.clone());
        }
        for user in users {
            self.restart_device_list_chain(name, fx, &user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn poke_ref(device: Option<&str>, stream_id: u64) -> PokeRef {
        PokeRef { user_id: "@u:us.test".into(), device_id: device.map(String::from), stream_id }
    }

    #[test]
    fn acknowledgements_move_the_chain_forward_only() {
        let name = ServerName::parse("a.test").unwrap();
        let mut fx = Effects::new(0);
        let mut destination = Destination::default();
        destination.device_list_acknowledged(&name, &mut fx, &poke_ref(Some("D"), 5));
        destination.device_list_acknowledged(&name, &mut fx, &poke_ref(Some("D"), 3));
        destination.device_list_acknowledged(&name, &mut fx, &poke_ref(None, 9));
        assert_eq!(destination.device_list_position("@u:us.test"), Some(5));
        assert_eq!(fx.changes.device_list_positions.len(), 1);
        assert!(!destination.device_list_is_new("@u:us.test", Some("D"), 5));
        assert!(destination.device_list_is_new("@u:us.test", None, 1), "cross-signing keys always go");
    }

    #[test]
    fn a_restarted_chain_is_not_moved_by_a_transaction_built_before() {
        let name = ServerName::parse("a.test").unwrap();
        let mut fx = Effects::new(0);
        let mut destination = Destination::default();
        destination.device_list_acknowledged(&name, &mut fx, &poke_ref(Some("D"), 5));
        destination.restart_device_list_chain(&name, &mut fx, "@u:us.test");
        assert_eq!(fx.changes.device_list_positions.last().unwrap().stream_id, None, "the stored position goes");
        destination.device_list_acknowledged(&name, &mut fx, &poke_ref(Some("D"), 7));
        assert_eq!(destination.device_list_position("@u:us.test"), None);
        destination.restart_device_list_chain(&name, &mut fx, "@u:us.test");
        assert_eq!(fx.changes.device_list_positions.len(), 2, "nothing stored to delete the second time");
    }

    #[test]
    fn a_stored_poke_already_acknowledged_only_owes_its_deletion() {
        let name = ServerName::parse("a.test").unwrap();
        let mut fx = Effects::new(0);
        let mut destination = Destination::default();
        destination.device_list_acknowledged(&name, &mut fx, &poke_ref(Some("D"), 5));
        let row = |stream_id| DeviceListPoke {
            destination: name.clone(),
            user_id: "@u:us.test".into(),
            device_id: Some("D".into()),
            stream_id,
            queued_ts: 0,
            content: json!({}),
        };
        assert!(!destination.queue_stored_poke(&mut fx, row(5)));
        assert_eq!(fx.changes.device_list_pokes_deleted.len(), 1);
        assert!(destination.queue_stored_poke(&mut fx, row(6)));
        assert!(destination.has_work_in_memory());
    }
}
