//! `WriteThrough`: which files the driver may answer an fsync for by itself, because every change
//! it made to them since their last fsync is already durable on the node.
//!
//! Why: a database commit is a small write to its journal and an fsync of it. Each was a round
//! trip through the node, and the fsync a device flush there; under sysbench the fsync was a
//! third of the commit's time (fuse tracepoints, 2026-12-04). For a file that is fsync'd after
//! every few writes, the driver instead asks the node to answer each write only once it is
//! durable (`WriteRequest.durable`: applied, then one log flush on the node), and the fsync that
//! follows has nothing left to do. One round trip per commit instead of two; the flush happens
//! either way.
//!
//! Owns: a bounded map inode -> what the driver knows about that file's durability.
//! Must not depend on: the network or FUSE; callers report what they send and what comes back.
//! Invariants:
//! - An fsync is answered locally only when the map shows, for that inode, that every change
//!   the driver saw complete since the last forwarded fsync that succeeded was answered durable,
//!   and that no change that may come back non-durable is in flight.
//! - Callers report a change as started before sending it and as finished before answering the
//!   kernel, so an fsync the kernel sends after that answer always sees it.
//! - An inode not in the map (never seen, or dropped to stay within capacity) is unknown, and
//!   its fsync is forwarded. A new entry starts with one uncovered change: its history before
//!   the entry is unknown.
//! - Directories are never answered here: their changes (entries created, renamed, removed) are
//!   not tracked. Callers forward every directory fsync.
//! - Write-through (durable writes) is asked for only while the bytes written since the file's
//!   last fsync stay within [`WRITE_THROUGH_BYTES_MAX`], so bulk writes are never flushed one
//!   by one.
//! - At most `capacity` entries; a full map drops its least recently used half.

use std::collections::HashMap;

/// Inodes remembered at once.
pub const WRITE_THROUGH_CAPACITY: usize = 4096;

/// A file whose fsyncs come after at most this many bytes of writes has its writes made durable
/// one by one; more than this between fsyncs, and its writes are plain again.
pub const WRITE_THROUGH_BYTES_MAX: u64 = 256 * 1024;

/// How a write is to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Ask the node to answer once the write is durable.
    Durable,
    /// An ordinary write: durable at the next forwarded fsync.
    Plain,
}

/// What to do with an fsync of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPlan {
    /// Every change the driver made is already durable: answer the kernel now.
    AlreadyDurable,
    /// Send it to the node; on success report [`WriteThrough::fsync_succeeded`] with this.
    Forward(FsyncCoverage),
}

/// Which changes a forwarded fsync covers: those counted when it was sent, of the entry that
/// existed then (a dropped and re-made entry counts from scratch, and an older fsync must not
/// cover its changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsyncCoverage {
    entry_created_tick: u64,
    change_count: u64,
}

#[derive(Debug, Clone)]
struct InodeSync {
    /// When this entry was made (unique per entry).
    created_tick: u64,
    /// Changes that completed without being known durable, counted since the entry was made.
    uncovered_change_count: u64,
    /// How many of those the last successful forwarded fsync covered.
    covered_change_count: u64,
    /// Changes sent that may complete non-durable and have not completed yet.
    plain_changes_in_flight: u32,
    /// Bytes of all writes since the last fsync.
    written_since_fsync_bytes: u64,
    /// Writes are sent durable.
    write_through: bool,
    /// Last use, for dropping the least recently used half when full.
    last_used_tick: u64,
}

#[derive(Debug)]
pub struct WriteThrough {
    entries: HashMap<u64, InodeSync>,
    capacity: usize,
    tick: u64,
}

impl WriteThrough {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity >= 2);
        Self {
            entries: HashMap::new(),
            capacity,
            tick: 0,
        }
    }

    /// A write of `length_bytes` to `inode` is about to be sent: how to send it. Report its end
    /// with [`Self::write_finished`] and the same mode.
    pub fn write_started(&mut self, inode: u64, length_bytes: u64) -> WriteMode {
        let entry = self.entry(inode);
        entry.written_since_fsync_bytes =
            entry.written_since_fsync_bytes.saturating_add(length_bytes);
        if entry.written_since_fsync_bytes > WRITE_THROUGH_BYTES_MAX {
            entry.write_through = false;
        }
        if entry.write_through {
            WriteMode::Durable
        } else {
            entry.plain_changes_in_flight += 1;
            WriteMode::Plain
        }
    }

    /// A write sent with `mode` completed (or failed: `answered_durable` false).
    pub fn write_finished(&mut self, inode: u64, mode: WriteMode, answered_durable: bool) {
        let entry = self.entry(inode);
        if mode == WriteMode::Plain {
            entry.plain_changes_in_flight = entry.plain_changes_in_flight.saturating_sub(1);
        }
        if mode == WriteMode::Plain || !answered_durable {
            entry.uncovered_change_count += 1;
        }
    }

    /// Any other change of `inode` (attributes, size, allocation, links) is about to be sent.
    pub fn change_started(&mut self, inode: u64) {
        self.entry(inode).plain_changes_in_flight += 1;
    }

    /// The change reported by [`Self::change_started`] completed or failed.
    pub fn change_finished(&mut self, inode: u64) {
        let entry = self.entry(inode);
        entry.plain_changes_in_flight = entry.plain_changes_in_flight.saturating_sub(1);
        entry.uncovered_change_count += 1;
    }

    /// The kernel asks to fsync the file `inode` (never a directory).
    pub fn fsync_started(&mut self, inode: u64) -> FsyncPlan {
        let entry = self.entry(inode);
        // A file fsync'd after few bytes of writes is a journal: make its writes durable.
        entry.write_through = entry.written_since_fsync_bytes <= WRITE_THROUGH_BYTES_MAX;
        entry.written_since_fsync_bytes = 0;
        let all_covered = entry.plain_changes_in_flight == 0
            && entry.uncovered_change_count == entry.covered_change_count;
        if all_covered {
            FsyncPlan::AlreadyDurable
        } else {
            FsyncPlan::Forward(FsyncCoverage {
                entry_created_tick: entry.created_tick,
                change_count: entry.uncovered_change_count,
            })
        }
    }

    /// A forwarded fsync succeeded: the changes counted when it was sent are durable.
    pub fn fsync_succeeded(&mut self, inode: u64, coverage: FsyncCoverage) {
        // Only the entry that existed when the fsync was planned has the counts `coverage`
        // refers to; a later one (after being dropped) starts over and stays uncovered.
        if let Some(entry) = self.entries.get_mut(&inode) {
            if entry.created_tick == coverage.entry_created_tick {
                assert!(coverage.change_count <= entry.uncovered_change_count);
                entry.covered_change_count = entry.covered_change_count.max(coverage.change_count);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn entry(&mut self, inode: u64) -> &mut InodeSync {
        self.tick += 1;
        let tick = self.tick;
        if !self.entries.contains_key(&inode) && self.entries.len() >= self.capacity {
            self.drop_least_recently_used_half();
        }
        let entry = self.entries.entry(inode).or_insert(InodeSync {
            created_tick: tick,
            uncovered_change_count: 1,
            covered_change_count: 0,
            plain_changes_in_flight: 0,
            written_since_fsync_bytes: 0,
            write_through: false,
            last_used_tick: tick,
        });
        entry.last_used_tick = tick;
        entry
    }

    /// Amortised: a full map drops half its entries at once, so each insert costs O(1) on
    /// average. A dropped inode is unknown again, which only means its next fsync is forwarded.
    fn drop_least_recently_used_half(&mut self) {
        let mut ticks: Vec<u64> = self
            .entries
            .values()
            .map(|entry| entry.last_used_tick)
            .collect();
        let middle = ticks.len() / 2;
        let (_, median, _) = ticks.select_nth_unstable(middle);
        let median = *median;
        self.entries
            .retain(|_, entry| entry.last_used_tick > median);
        assert!(self.entries.len() < self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INODE: u64 = 7;

    /// One forwarded fsync that succeeds.
    fn forward_and_succeed(tracker: &mut WriteThrough, inode: u64) {
        match tracker.fsync_started(inode) {
            FsyncPlan::Forward(coverage) => tracker.fsync_succeeded(inode, coverage),
            FsyncPlan::AlreadyDurable => panic!("expected a forwarded fsync"),
        }
    }

    #[test]
    fn an_unknown_file_is_forwarded_and_a_journal_then_goes_write_through() {
        let mut tracker = WriteThrough::new(16);
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
        let mut tracker = WriteThrough::new(16);
        // First writes are plain: nothing is known about the file yet.
        assert_eq!(tracker.write_started(INODE, 4096), WriteMode::Plain);
        tracker.write_finished(INODE, WriteMode::Plain, false);
        forward_and_succeed(&mut tracker, INODE);
        // Fsync'd after 4 KiB: its writes are now durable, and its fsyncs need no round trip.
        for _ in 0..10 {
            assert_eq!(tracker.write_started(INODE, 8192), WriteMode::Durable);
            tracker.write_finished(INODE, WriteMode::Durable, true);
            assert_eq!(tracker.fsync_started(INODE), FsyncPlan::AlreadyDurable);
        }
    }

    #[test]
    fn a_write_that_came_back_not_durable_or_failed_needs_a_forwarded_fsync() {
        let mut tracker = WriteThrough::new(16);
        tracker.write_finished(INODE, WriteMode::Plain, false);
        forward_and_succeed(&mut tracker, INODE);
        assert_eq!(tracker.write_started(INODE, 4096), WriteMode::Durable);
        // A node that does not know the field, or an error: not known durable.
        tracker.write_finished(INODE, WriteMode::Durable, false);
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
    }

    #[test]
    fn a_plain_change_in_flight_or_completed_after_the_fsync_was_sent_stays_uncovered() {
        let mut tracker = WriteThrough::new(16);
        forward_and_succeed(&mut tracker, INODE);
        assert_eq!(tracker.fsync_started(INODE), FsyncPlan::AlreadyDurable);
        // A truncate is sent, and an fsync arrives before it completes: forwarded.
        tracker.change_started(INODE);
        let FsyncPlan::Forward(coverage) = tracker.fsync_started(INODE) else {
            panic!("a change in flight must not be answered locally");
        };
        // The change completes after the fsync was sent, then the fsync succeeds: the flush
        // may have run before the change was applied, so the change is still uncovered.
        tracker.change_finished(INODE);
        tracker.fsync_succeeded(INODE, coverage);
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
    }

    #[test]
    fn a_failed_forwarded_fsync_covers_nothing() {
        let mut tracker = WriteThrough::new(16);
        tracker.write_started(INODE, 4096);
        tracker.write_finished(INODE, WriteMode::Plain, false);
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
        // No fsync_succeeded: the next fsync is forwarded again.
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
    }

    #[test]
    fn bulk_writes_between_fsyncs_are_plain() {
        let mut tracker = WriteThrough::new(16);
        forward_and_succeed(&mut tracker, INODE);
        assert_eq!(tracker.write_started(INODE, 4096), WriteMode::Durable);
        tracker.write_finished(INODE, WriteMode::Durable, true);
        // Going past the threshold before the next fsync turns write-through off at once.
        assert_eq!(
            tracker.write_started(INODE, WRITE_THROUGH_BYTES_MAX),
            WriteMode::Plain
        );
        tracker.write_finished(INODE, WriteMode::Plain, false);
        forward_and_succeed(&mut tracker, INODE);
        // That fsync came after too many bytes: the file is not a journal.
        assert_eq!(tracker.write_started(INODE, 4096), WriteMode::Plain);
    }

    #[test]
    fn a_dropped_entry_is_unknown_again_and_stays_bounded() {
        let mut tracker = WriteThrough::new(8);
        forward_and_succeed(&mut tracker, INODE);
        assert_eq!(tracker.fsync_started(INODE), FsyncPlan::AlreadyDurable);
        for other in 100..200 {
            tracker.write_started(other, 1);
            assert!(tracker.len() <= 8);
        }
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
    }

    #[test]
    fn an_fsync_planned_before_the_entry_was_dropped_covers_nothing_after() {
        let mut tracker = WriteThrough::new(2);
        let FsyncPlan::Forward(coverage) = tracker.fsync_started(INODE) else {
            panic!("unknown inode must be forwarded");
        };
        // The entry is dropped before the fsync succeeds: the success finds nothing to cover.
        tracker.write_started(1, 1);
        tracker.write_started(2, 1);
        tracker.write_started(3, 1);
        tracker.fsync_succeeded(INODE, coverage);
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
        let FsyncPlan::Forward(stale) = tracker.fsync_started(INODE) else {
            panic!("still unknown");
        };
        tracker.write_started(4, 1);
        tracker.write_started(5, 1);
        tracker.write_started(6, 1);
        // A new entry, with as many uncovered changes as the stale fsync counted.
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
        tracker.fsync_succeeded(INODE, stale);
        assert!(matches!(
            tracker.fsync_started(INODE),
            FsyncPlan::Forward(_)
        ));
    }
}
