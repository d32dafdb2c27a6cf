//! Which rows of the presence stream are news to other servers.
//!
//! The presence writer persists a user's state far more often than it changes in a way anyone
//! needs to hear: each sync bumps `last_active_ts`, and the writer flushes such rows to the
//! stream periodically. Synapse's own sender compares each row with the last it saw of that user
//! and sends only a new state, a new status message, a change of `currently_active` while
//! online, or a `last_active_ts` that moved by more than a minute (while online only when the
//! user is not active, since an active user's is implied). fedsend does the same, so a busy
//! deployment's presence traffic is what it is with Synapse's sender, not one EDU per flush.

use std::collections::BTreeMap;

use fedsend_synapse::replication::PresenceRow;

/// How far `last_active_ts` must move to be worth telling (Synapse's granularity).
const LAST_ACTIVE_GRANULARITY_MS: i64 = 60_000;

/// The last presence row seen of each local user; see the module's account.
#[derive(Debug, Default)]
pub struct PresenceChanges {
    last_seen: BTreeMap<String, PresenceRow>,
}

impl PresenceChanges {
    /// Whether `row` is news to remote servers. The row becomes the one later rows of its user
    /// are compared with, news or not, as Synapse does: a slow drift of `last_active_ts` is then
    /// never sent, and a user's first row after a restart always is.
    pub fn is_news(&mut self, row: &PresenceRow) -> bool {
        let news = self.last_seen.get(&row.user_id).is_none_or(|old| worth_telling(old, row));
        self.last_seen.insert(row.user_id.clone(), row.clone());
        news
    }
}

fn worth_telling(old: &PresenceRow, new: &PresenceRow) -> bool {
    if old.state != new.state || old.status_msg != new.status_msg {
        return true;
    }
    let last_active_moved = new.last_active_ts.saturating_sub(old.last_active_ts) > LAST_ACTIVE_GRANULARITY_MS;
    if new.state == "online" {
        old.currently_active != new.currently_active || (last_active_moved && !new.currently_active)
    } else {
        last_active_moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str, last_active_ts: i64, currently_active: bool, status_msg: Option<&str>) -> PresenceRow {
        PresenceRow {
            user_id: "@alice:hs1.test".into(),
            state: state.into(),
            last_active_ts,
            last_federation_update_ts: 0,
            last_user_sync_ts: last_active_ts,
            status_msg: status_msg.map(str::to_owned),
            currently_active,
        }
    }

    #[test]
    fn a_users_first_row_is_news_and_a_repeat_is_not() {
        let mut changes = PresenceChanges::default();
        assert!(changes.is_news(&row("online", 1_000, true, None)));
        assert!(!changes.is_news(&row("online", 1_000, true, None)));
        let mut bob = row("online", 1_000, true, None);
        bob.user_id = "@bob:hs1.test".into();
        assert!(changes.is_news(&bob), "users are told apart");
    }

    #[test]
    fn a_new_state_or_status_is_news() {
        let mut changes = PresenceChanges::default();
        changes.is_news(&row("online", 1_000, true, None));
        assert!(changes.is_news(&row("unavailable", 1_000, true, None)));
        assert!(changes.is_news(&row("unavailable", 1_000, true, Some("lunch"))));
        assert!(!changes.is_news(&row("unavailable", 1_000, true, Some("lunch"))));
    }

    #[test]
    fn while_online_activity_bumps_are_news_only_for_an_idle_user() {
        let mut changes = PresenceChanges::default();
        changes.is_news(&row("online", 0, true, None));
        // An active user syncing: every flush moves last_active_ts, nobody needs to hear it.
        assert!(!changes.is_news(&row("online", 30_000, true, None)));
        assert!(!changes.is_news(&row("online", 200_000, true, None)));
        // Becoming idle is news, and so is a later bump of more than a minute while idle.
        assert!(changes.is_news(&row("online", 200_000, false, None)));
        assert!(!changes.is_news(&row("online", 250_000, false, None)));
        assert!(changes.is_news(&row("online", 320_001, false, None)));
    }

    #[test]
    fn when_not_online_a_bump_of_more_than_a_minute_is_news() {
        let mut changes = PresenceChanges::default();
        changes.is_news(&row("unavailable", 0, false, None));
        assert!(!changes.is_news(&row("unavailable", 60_000, false, None)));
        assert!(changes.is_news(&row("unavailable", 120_001, false, None)));
    }
}
