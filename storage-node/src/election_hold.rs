//! Election holds: a replica whose Raft core stopped with a fatal error, and was restarted, may
//! not start elections for a while.
//!
//! Why: a replica that fails again and again (a snapshot it cannot install because its device
//! is full, say) is restarted each time by the reconcile loop. Each restart comes back as a
//! follower that has not heard its leader, so after the election timeout it campaigns with a
//! higher term, and the healthy leader steps down. openraft 0.9 has no pre-vote to stop that.
//! Seen in the nemesis test (seed 1796407093065620211): a follower that could not install a
//! snapshot unseated its leader every few seconds, and the group never restored rf=3.
//!
//! A held replica still votes, replicates and applies; it only never becomes a candidate. The
//! other voters elect without it if the leader goes. Holds grow with repeated failures
//! (10 s, doubling, at most 5 min) and are forgotten after 10 min without a failure.
//!
//! A replica may also fail to *start*: openraft applies the committed entries it finds while it
//! starts, and an apply that fails there (a full device) fails the start. Such a failure counts
//! in the same row, and the next start waits (2 s, doubling, at most 5 min): every Raft message
//! from the leader would otherwise try again at once, each a failing apply. Seen in the test
//! `a_follower_whose_device_fills_up_is_replaced_and_no_replica_differs`: the restarts failed
//! this way, were never counted, and the replica was never reported.
//!
//! Owns: the hold decisions ([`ElectionHolds`], pure: time is passed in).
//! Must not depend on: Raft or the node; the node applies what this decides.
//! Invariants: a container is held from its restart until its hold ends; the hold of its n-th
//! failure in a row is `min(HOLD_FIRST_MS * 2^(n-1), HOLD_MAX_MS)`, and after a failed start
//! the next start waits `min(START_RETRY_FIRST_MS * 2^(n-1), HOLD_MAX_MS)`; at most one entry
//! per container that failed in the last [`FAILURE_MEMORY_MS`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The hold after a first failure.
pub const HOLD_FIRST_MS: u64 = 10_000;
/// The longest hold, however many failures came before.
pub const HOLD_MAX_MS: u64 = 300_000;
/// A failure this long after the previous one counts as a first failure again.
pub const FAILURE_MEMORY_MS: u64 = 600_000;
/// The wait before starting again after a first failed start (doubling, at most
/// [`HOLD_MAX_MS`]).
pub const START_RETRY_FIRST_MS: u64 = 2_000;

#[derive(Debug, Clone)]
struct Hold {
    failures_in_a_row: u32,
    last_failure_at: Instant,
    /// Present while elections are held.
    held_until: Option<Instant>,
    /// Present after a failed start: no start before then.
    start_retry_at: Option<Instant>,
}

/// What a restart after a failure decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldDecision {
    /// How long the restarted replica may not start elections.
    pub hold: Duration,
    /// Failures of this replica in a row, this one included (none forgotten in between).
    pub failures_in_a_row: u32,
}

/// `first_ms` after a first failure, doubling with each one in a row, at most [`HOLD_MAX_MS`].
fn doubling(first_ms: u64, failures_in_a_row: u32) -> Duration {
    let doublings = failures_in_a_row.saturating_sub(1).min(16);
    Duration::from_millis(first_ms.saturating_mul(1 << doublings).min(HOLD_MAX_MS))
}

#[derive(Debug, Default)]
pub struct ElectionHolds {
    holds: HashMap<u64, Hold>,
}

impl ElectionHolds {
    /// The container was restarted after a fatal error at `now`: how long it is held, and how
    /// many failures in a row that makes.
    pub fn on_restart_after_failure(&mut self, container_id: u64, now: Instant) -> HoldDecision {
        self.on_failure(container_id, now, false)
    }

    /// The container failed to start at `now`: the failure counts like a restart's, and the
    /// next start waits (module doc).
    pub fn on_start_failure(&mut self, container_id: u64, now: Instant) -> HoldDecision {
        self.on_failure(container_id, now, true)
    }

    /// Whether the container may be started at `now` (no failed start is waiting it out).
    pub fn may_start(&self, container_id: u64, now: Instant) -> bool {
        self.holds
            .get(&container_id)
            .and_then(|hold| hold.start_retry_at)
            .is_none_or(|at| now >= at)
    }

    /// The container started: a later start need not wait. Its failures stay counted.
    pub fn on_started(&mut self, container_id: u64) {
        if let Some(hold) = self.holds.get_mut(&container_id) {
            hold.start_retry_at = None;
        }
    }

    fn on_failure(&mut self, container_id: u64, now: Instant, start_failed: bool) -> HoldDecision {
        let memory = Duration::from_millis(FAILURE_MEMORY_MS);
        let failures_in_a_row = match self.holds.get(&container_id) {
            Some(hold) if now.saturating_duration_since(hold.last_failure_at) < memory => {
                hold.failures_in_a_row.saturating_add(1)
            }
            _ => 1,
        };
        let hold = doubling(HOLD_FIRST_MS, failures_in_a_row);
        let start_retry_at =
            start_failed.then(|| now + doubling(START_RETRY_FIRST_MS, failures_in_a_row));
        self.holds.insert(
            container_id,
            Hold {
                failures_in_a_row,
                last_failure_at: now,
                held_until: Some(now + hold),
                start_retry_at,
            },
        );
        HoldDecision {
            hold,
            failures_in_a_row,
        }
    }

    pub fn is_held(&self, container_id: u64) -> bool {
        self.holds
            .get(&container_id)
            .is_some_and(|hold| hold.held_until.is_some())
    }

    /// Ends the holds that are over at `now` and forgets old failures; returns the containers
    /// whose hold just ended (their elections may be switched back on).
    pub fn release_due(&mut self, now: Instant) -> Vec<u64> {
        let mut released = Vec::new();
        for (container_id, hold) in &mut self.holds {
            if hold.held_until.is_some_and(|until| now >= until) {
                hold.held_until = None;
                released.push(*container_id);
            }
        }
        let memory = Duration::from_millis(FAILURE_MEMORY_MS);
        self.holds.retain(|_, hold| {
            hold.held_until.is_some()
                || now.saturating_duration_since(hold.last_failure_at) < memory
        });
        released.sort_unstable();
        released
    }

    /// The container is gone from this node: nothing to hold.
    pub fn forget(&mut self, container_id: u64) {
        self.holds.remove(&container_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_failed_start_waits_longer_each_time_and_counts_in_the_row() {
        let mut holds = ElectionHolds::default();
        let start = Instant::now();
        assert!(holds.may_start(5, start));
        let first = holds.on_start_failure(5, start);
        assert_eq!(first.failures_in_a_row, 1);
        assert!(!holds.may_start(5, after(start, START_RETRY_FIRST_MS - 1)));
        assert!(holds.may_start(5, after(start, START_RETRY_FIRST_MS)));
        assert!(holds.may_start(6, start), "per container");
        let second_at = after(start, START_RETRY_FIRST_MS);
        assert_eq!(holds.on_start_failure(5, second_at).failures_in_a_row, 2);
        assert!(!holds.may_start(5, after(second_at, 2 * START_RETRY_FIRST_MS - 1)));
        assert!(holds.may_start(5, after(second_at, 2 * START_RETRY_FIRST_MS)));
        // A start that works clears the wait; a later restart's failure continues the row.
        holds.on_started(5);
        assert!(holds.may_start(5, second_at));
        let third = holds.on_restart_after_failure(5, after(second_at, 1));
        assert_eq!(third.failures_in_a_row, 3);
        assert!(
            holds.may_start(5, after(second_at, 1)),
            "a restart sets no wait"
        );
        assert!(holds.is_held(5));
    }

    #[test]
    fn a_restarted_replica_is_held_then_released() {
        let mut holds = ElectionHolds::default();
        let start = Instant::now();
        assert!(!holds.is_held(5));
        let decision = holds.on_restart_after_failure(5, start);
        assert_eq!(decision.hold, Duration::from_millis(HOLD_FIRST_MS));
        assert_eq!(decision.failures_in_a_row, 1);
        assert!(holds.is_held(5));
        assert!(!holds.is_held(6));
        assert!(holds
            .release_due(after(start, HOLD_FIRST_MS - 1))
            .is_empty());
        assert!(holds.is_held(5));
        assert_eq!(holds.release_due(after(start, HOLD_FIRST_MS)), vec![5]);
        assert!(!holds.is_held(5));
        // Released once only.
        assert!(holds
            .release_due(after(start, HOLD_FIRST_MS + 1))
            .is_empty());
    }

    #[test]
    fn repeated_failures_double_the_hold_up_to_the_maximum_and_are_forgotten() {
        let mut holds = ElectionHolds::default();
        let start = Instant::now();
        let mut now = start;
        let mut expected = HOLD_FIRST_MS;
        for failures in 1..=10 {
            let decision = holds.on_restart_after_failure(1, now);
            assert_eq!(decision.failures_in_a_row, failures);
            let hold = decision.hold;
            assert_eq!(hold, Duration::from_millis(expected.min(HOLD_MAX_MS)));
            expected *= 2;
            // The next failure comes soon after the hold ends.
            now += hold + Duration::from_millis(1_000);
            holds.release_due(now);
        }
        assert_eq!(
            holds.on_restart_after_failure(1, now).hold,
            Duration::from_millis(HOLD_MAX_MS)
        );
        // Quiet for longer than the memory: the hold ends, the failures are forgotten, and
        // the next failure is a first one again.
        now += Duration::from_millis(HOLD_MAX_MS + FAILURE_MEMORY_MS);
        assert_eq!(holds.release_due(now), vec![1]);
        assert!(holds.holds.is_empty());
        assert_eq!(
            holds.on_restart_after_failure(1, now),
            HoldDecision {
                hold: Duration::from_millis(HOLD_FIRST_MS),
                failures_in_a_row: 1,
            }
        );
    }

    #[test]
    fn a_forgotten_container_is_not_held() {
        let mut holds = ElectionHolds::default();
        let start = Instant::now();
        holds.on_restart_after_failure(3, start);
        holds.forget(3);
        assert!(!holds.is_held(3));
        assert!(holds.release_due(after(start, HOLD_MAX_MS)).is_empty());
    }
}
