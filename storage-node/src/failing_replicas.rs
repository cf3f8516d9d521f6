//! Failing replicas: replicas whose own node reported that they keep failing, so the replica
//! mover replaces them as if their node were down for that container alone.
//!
//! Why: a replica that can never catch up (a snapshot it cannot install because its device is
//! full, say) is restarted by its node after every failure and held from elections
//! (`election_hold`), so it no longer hurts its group, but it does not count either: the group
//! runs on the other replicas and the cluster would look settled while one copy is missing.
//! Its node knows; the metadata leader, which plans moves, does not. So after
//! [`FAILURES_IN_A_ROW_REPORTED_MIN`] failures in a row the node reports the replica to the
//! metadata leader (again on every later failure), and the leader keeps the reports here.
//!
//! Reports live only in memory: a new metadata leader starts empty and learns of a replica that
//! still fails on its next failure. A report expires after [`REPORT_MEMORY_MS`] without a new
//! one, so a replica that recovered (space was freed) is left alone again.
//!
//! Owns: the reports ([`FailingReplicas`], pure: time is passed in).
//! Must not depend on: Raft, storage or the network.
//! Invariants: at most [`REPORT_COUNT_MAX`] reports (the oldest go first); a report older than
//! [`REPORT_MEMORY_MS`] is never returned.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// Failures in a row after which a node reports its replica. One failure may be bad luck (a
/// crash in the middle of an install); three within the election hold's failure memory are not.
pub const FAILURES_IN_A_ROW_REPORTED_MIN: u32 = 3;
/// A report is forgotten this long after it was last made.
pub const REPORT_MEMORY_MS: u64 = 600_000;
/// Most reports kept: far above a real cluster's failing replicas, and a bound on memory.
pub const REPORT_COUNT_MAX: usize = 4_096;

#[derive(Debug, Default)]
pub struct FailingReplicas {
    /// `(container, node)` → when it was last reported.
    reports: HashMap<(u64, NodeId), Instant>,
}

impl FailingReplicas {
    /// Records that `node_id`'s replica of `container_id` keeps failing, as of `now`.
    pub fn record(&mut self, container_id: u64, node_id: NodeId, now: Instant) {
        self.forget_expired(now);
        if self.reports.len() >= REPORT_COUNT_MAX
            && !self.reports.contains_key(&(container_id, node_id))
        {
            let oldest = self
                .reports
                .iter()
                .min_by_key(|(_, reported_at)| **reported_at)
                .map(|(key, _)| *key);
            if let Some(oldest) = oldest {
                self.reports.remove(&oldest);
            }
        }
        self.reports.insert((container_id, node_id), now);
        assert!(self.reports.len() <= REPORT_COUNT_MAX);
    }

    /// The replicas reported within the last [`REPORT_MEMORY_MS`], as `(container, node)`.
    pub fn current(&mut self, now: Instant) -> BTreeSet<(u64, NodeId)> {
        self.forget_expired(now);
        self.reports.keys().copied().collect()
    }

    fn forget_expired(&mut self, now: Instant) {
        let memory = Duration::from_millis(REPORT_MEMORY_MS);
        self.reports
            .retain(|_, reported_at| now.saturating_duration_since(*reported_at) < memory);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_report_lasts_until_its_memory_runs_out_and_a_new_report_renews_it() {
        let mut failing = FailingReplicas::default();
        let start = Instant::now();
        assert!(failing.current(start).is_empty());
        failing.record(7, 2, start);
        assert_eq!(failing.current(after(start, 1)), BTreeSet::from([(7, 2)]));
        failing.record(7, 2, after(start, REPORT_MEMORY_MS / 2));
        assert_eq!(
            failing.current(after(start, REPORT_MEMORY_MS)),
            BTreeSet::from([(7, 2)]),
            "the second report renewed the first"
        );
        assert!(failing
            .current(after(start, REPORT_MEMORY_MS / 2 + REPORT_MEMORY_MS))
            .is_empty());
    }

    #[test]
    fn reports_are_per_replica_and_bounded() {
        let mut failing = FailingReplicas::default();
        let start = Instant::now();
        failing.record(1, 2, start);
        failing.record(1, 3, after(start, 1));
        failing.record(4, 2, after(start, 2));
        assert_eq!(
            failing.current(after(start, 3)),
            BTreeSet::from([(1, 2), (1, 3), (4, 2)])
        );
        for index in 0..REPORT_COUNT_MAX as u64 {
            failing.record(100 + index, 9, after(start, 10 + index));
        }
        let current = failing.current(after(start, 10 + REPORT_COUNT_MAX as u64));
        assert_eq!(current.len(), REPORT_COUNT_MAX);
        // The three oldest went first.
        assert!(
            !current.contains(&(1, 2)) && !current.contains(&(1, 3)) && !current.contains(&(4, 2))
        );
        assert!(current.contains(&(100, 9)));
    }
}
