//! Open-handle counts per inode, and the orphans waiting for their last handle to close.
//!
//! Must not depend on: the network; callers do the `PurgeOrphans` call this table asks for.
//! Invariants: an inode is in `orphaned` only while its open count is above zero; when the last
//! handle of an orphan is released, the table says so exactly once.

use std::collections::{HashMap, HashSet};

/// Per-mount bookkeeping of open files. Guarded by one mutex in the driver: every operation is
/// a few hash-map steps, never I/O.
#[derive(Debug, Default)]
pub struct OpenFileTable {
    open_handle_count_by_inode: HashMap<u64, u64>,
    orphaned: HashSet<u64>,
}

/// What the caller must do about an inode that just lost its last link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanAction {
    /// No handle is open: purge it now.
    PurgeNow,
    /// Handles are open: the table will ask for the purge on the last release.
    Deferred,
}

impl OpenFileTable {
    /// Records one more open handle on `inode`.
    pub fn open(&mut self, inode: u64) {
        *self.open_handle_count_by_inode.entry(inode).or_insert(0) += 1;
    }

    /// Records the release of one handle; true when it was the last handle of an orphan, which
    /// the caller must now purge.
    pub fn release(&mut self, inode: u64) -> bool {
        let Some(count) = self.open_handle_count_by_inode.get_mut(&inode) else {
            // A release without an open (for example after a driver restart): nothing tracked.
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        self.open_handle_count_by_inode.remove(&inode);
        self.orphaned.remove(&inode)
    }

    /// Records that `inode` lost its last link.
    pub fn orphan(&mut self, inode: u64) -> OrphanAction {
        if self.open_handle_count_by_inode.contains_key(&inode) {
            self.orphaned.insert(inode);
            OrphanAction::Deferred
        } else {
            OrphanAction::PurgeNow
        }
    }

    /// Number of handles open on `inode`.
    #[cfg(test)]
    pub fn open_handle_count(&self, inode: u64) -> u64 {
        self.open_handle_count_by_inode
            .get(&inode)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphan_without_handles_is_purged_now() {
        let mut table = OpenFileTable::default();
        assert_eq!(table.orphan(5), OrphanAction::PurgeNow);
        assert!(!table.release(5));
    }

    #[test]
    fn orphan_with_handles_is_purged_on_last_release() {
        let mut table = OpenFileTable::default();
        table.open(5);
        table.open(5);
        assert_eq!(table.orphan(5), OrphanAction::Deferred);
        assert!(!table.release(5));
        assert_eq!(table.open_handle_count(5), 1);
        assert!(table.release(5));
        assert_eq!(table.open_handle_count(5), 0);
        // Only once.
        assert!(!table.release(5));
    }

    #[test]
    fn linked_files_are_never_purged() {
        let mut table = OpenFileTable::default();
        table.open(7);
        assert!(!table.release(7));
    }
}
