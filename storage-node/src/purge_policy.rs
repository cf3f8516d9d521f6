//! `purge_policy`: how far a container's Raft log may be purged now.
//!
//! Why: openraft purges a leader's log up to its latest snapshot as soon as no replication
//! request is in flight over those entries. A follower that is merely behind then finds the
//! entries it needs gone and is sent the whole container as a snapshot instead. Under a large
//! write that is the common case, not the rare one: a follower's append of 16 entries of 1 MiB
//! often takes longer than the heartbeat interval (openraft's timeout for `AppendEntries`) on
//! this disk, so replication keeps failing and starting over, and between two attempts nothing
//! is in flight. Measured on 2026-12-06 (three local nodes, 1 GiB written to an rf=3 volume):
//! the leader exported a 1.08 GB snapshot right after the write, and two nodes then spent more
//! than 30 s of CPU shipping and installing it; the snapshot grows with the container, not with
//! the lag.
//!
//! So openraft never purges by itself (`max_in_snapshot_log_to_keep` is `u64::MAX`, see
//! `node::raft_config`), and the node's checkpoint loop purges what [`purge_upto`] allows:
//! - on a follower: everything its snapshot covers (it replicates to nobody);
//! - on a leader: what its snapshot covers, but not past the lowest matched entry of any
//!   follower that answered within [`PURGE_HOLD_CONTACT_MS`]; and nothing more at all while
//!   such a follower lacks entries already purged (it is being sent a snapshot, which must
//!   still meet the log when it lands);
//! - under log pressure (the device log past its checkpoint fill level, a writer waiting for
//!   room, or detached data bytes past their bound): everything the snapshot covers. The log's
//!   room wins over a slow follower, which then gets a snapshot, as before.
//!
//! Owns: that decision, from plain numbers.
//! Must not depend on: openraft, the clock or the node (the caller reads metrics and contact
//! ages), so it is tested alone.
//! Invariant: the answer never passes the snapshot (only what a snapshot covers may go), and
//! is only given when it purges something new.

/// A follower that answered within this long is held for: the log keeps what it still needs.
/// Two of the longest election timeouts (`node::raft_config`): a follower silent for longer is
/// down or cut off, and a snapshot is the way back for it anyway.
pub const PURGE_HOLD_CONTACT_MS: u64 = 3_000;

/// What a leader knows of one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerProgress {
    /// The last entry it is known to hold (None: nothing yet).
    pub matched_index: Option<u64>,
    /// Since it last answered a Raft request of this container (None: never).
    pub since_contact_ms: Option<u64>,
}

/// The container's state, as the caller read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeState {
    /// The last entry the latest snapshot covers (None: no snapshot yet).
    pub snapshot_index: Option<u64>,
    /// The last entry purged so far.
    pub purged_index: Option<u64>,
    /// The followers, when this node leads the container; empty otherwise.
    pub followers: Vec<FollowerProgress>,
    /// The device log or the detached data need room now.
    pub log_pressure: bool,
}

/// The last entry to purge now, inclusive, or None when nothing new may go.
pub fn purge_upto(state: &PurgeState) -> Option<u64> {
    let snapshot_index = state.snapshot_index?;
    let mut upto = snapshot_index;
    if !state.log_pressure {
        for follower in &state.followers {
            let in_contact = follower
                .since_contact_ms
                .is_some_and(|since| since <= PURGE_HOLD_CONTACT_MS);
            if !in_contact {
                continue;
            }
            match follower.matched_index {
                // It needs every entry after its last one.
                Some(matched) if Some(matched) >= state.purged_index => upto = upto.min(matched),
                // It lacks entries already purged (or has none), so it is being sent a
                // snapshot, which covers at least the purge point: purge no further, so the
                // entries after that snapshot are still here when it lands. Purging on made it
                // need another snapshot after each one (a nemesis run of 2026-12-06: a follower
                // installed a 1.87 GB snapshot every 7-8 s for a minute, and writes stopped).
                _ => return None,
            }
        }
    }
    assert!(
        upto <= snapshot_index,
        "only what a snapshot covers is purged"
    );
    (Some(upto) > state.purged_index).then_some(upto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn follower(matched_index: Option<u64>, since_contact_ms: Option<u64>) -> FollowerProgress {
        FollowerProgress {
            matched_index,
            since_contact_ms,
        }
    }

    fn state(
        snapshot: Option<u64>,
        purged: Option<u64>,
        followers: Vec<FollowerProgress>,
    ) -> PurgeState {
        PurgeState {
            snapshot_index: snapshot,
            purged_index: purged,
            followers,
            log_pressure: false,
        }
    }

    #[test]
    fn a_follower_purges_all_its_snapshot_covers() {
        assert_eq!(purge_upto(&state(Some(100), Some(10), vec![])), Some(100));
        assert_eq!(
            purge_upto(&state(Some(100), Some(100), vec![])),
            None,
            "nothing new"
        );
        assert_eq!(purge_upto(&state(None, None, vec![])), None, "no snapshot");
    }

    #[test]
    fn a_leader_keeps_what_a_follower_in_contact_still_needs() {
        let behind = follower(Some(40), Some(200));
        let current = follower(Some(120), Some(10));
        assert_eq!(
            purge_upto(&state(Some(100), Some(10), vec![behind, current])),
            Some(40),
            "entries after 40 stay for the follower behind"
        );
        assert_eq!(
            purge_upto(&state(Some(100), Some(40), vec![behind, current])),
            None,
            "already purged that far"
        );
        assert_eq!(
            purge_upto(&state(Some(100), None, vec![follower(None, Some(5))])),
            None,
            "a follower with nothing, when nothing was purged yet, needs the whole log"
        );
    }

    #[test]
    fn a_silent_follower_is_not_held_for() {
        let silent = follower(Some(40), Some(PURGE_HOLD_CONTACT_MS + 1));
        let never = follower(Some(40), None);
        let silent_past_the_log = follower(Some(5), Some(PURGE_HOLD_CONTACT_MS + 1));
        for other in [silent, never, silent_past_the_log] {
            assert_eq!(
                purge_upto(&state(Some(100), Some(10), vec![other])),
                Some(100),
                "{other:?}"
            );
        }
    }

    #[test]
    fn nothing_more_is_purged_while_a_follower_in_contact_is_sent_a_snapshot() {
        // Matched 5, purged 10: it needs a snapshot (of at least 10). Purging to 100 now would
        // leave it short again once that snapshot lands.
        let past_the_log = follower(Some(5), Some(10));
        let current = follower(Some(120), Some(10));
        assert_eq!(
            purge_upto(&state(Some(100), Some(10), vec![past_the_log, current])),
            None
        );
        assert_eq!(
            purge_upto(&state(Some(100), Some(10), vec![follower(None, Some(10))])),
            None,
            "one with nothing at all"
        );
        // Once it has installed a snapshot at 60, what follows 60 is kept for it.
        let installed = follower(Some(60), Some(10));
        assert_eq!(
            purge_upto(&state(Some(100), Some(10), vec![installed, current])),
            Some(60)
        );
        let mut pressed = state(Some(100), Some(10), vec![past_the_log]);
        pressed.log_pressure = true;
        assert_eq!(
            purge_upto(&pressed),
            Some(100),
            "the log's room comes first"
        );
    }

    #[test]
    fn log_pressure_purges_all_the_snapshot_covers() {
        let mut pressed = state(Some(100), Some(10), vec![follower(Some(40), Some(1))]);
        pressed.log_pressure = true;
        assert_eq!(purge_upto(&pressed), Some(100));
    }

    proptest! {
        #[test]
        fn never_past_the_snapshot_nor_what_a_held_follower_needs(
            snapshot in proptest::option::of(0u64..1_000),
            purged in proptest::option::of(0u64..1_000),
            followers in proptest::collection::vec(
                (proptest::option::of(0u64..1_200), proptest::option::of(0u64..6_000)),
                0..4,
            ),
            log_pressure in any::<bool>(),
        ) {
            let followers: Vec<FollowerProgress> = followers
                .into_iter()
                .map(|(matched, since)| follower(matched, since))
                .collect();
            let input = PurgeState {
                snapshot_index: snapshot,
                purged_index: purged,
                followers: followers.clone(),
                log_pressure,
            };
            if let Some(upto) = purge_upto(&input) {
                prop_assert!(Some(upto) <= snapshot);
                prop_assert!(Some(upto) > purged);
                if !log_pressure {
                    for held in followers.iter().filter(|progress| {
                        progress.since_contact_ms.is_some_and(|since| since <= PURGE_HOLD_CONTACT_MS)
                    }) {
                        // Every follower in contact keeps what follows its last entry (so one
                        // being sent a snapshot stops the purge altogether).
                        prop_assert!(Some(upto) <= held.matched_index, "{held:?} loses entries");
                        prop_assert!(held.matched_index >= purged, "{held:?} past the log");
                    }
                }
            } else if let Some(snapshot) = snapshot {
                // Nothing purged although the snapshot is ahead: only for a held follower.
                if Some(snapshot) > purged {
                    prop_assert!(!log_pressure);
                }
            }
        }
    }
}
