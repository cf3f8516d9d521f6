//! `RecentAttributes`: the attributes the node last returned for recently written inodes.
//!
//! Why: with the writeback cache the kernel sends a SETATTR of mtime (and ctime) before every
//! fsync and fdatasync. The driver skips it when the node's mtime is already at least as new,
//! which it used to learn with a GetAttr: a third round trip for every write + fsync, the path
//! a database's commit takes. Every Write already answers with the node's attributes after the
//! write, so the newest of those answers the question without asking.
//!
//! Owns: a bounded map inode -> (attributes, when they were seen).
//! Must not depend on: the network or FUSE; the caller passes the time.
//! Invariants:
//! - An entry is used only while younger than the attribute TTL, so the answer is never older
//!   than what the kernel itself caches.
//! - Write answers only raise an entry's mtime (concurrent writes may answer out of order, and a
//!   write's mtime is a lower bound of the node's); any other answer (SetAttr, GetAttr) replaces
//!   the entry, because an explicit time may move mtime back.
//! - At most `capacity` entries: inserting into a full map first drops expired entries, then the
//!   older half (amortised O(1) per insert).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ballast_client::proto;

/// Inodes remembered at once.
pub const RECENT_ATTRIBUTES_CAPACITY: usize = 4096;

#[derive(Debug)]
pub struct RecentAttributes {
    entries: HashMap<u64, (proto::Attr, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl RecentAttributes {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        assert!(capacity > 0);
        Self {
            entries: HashMap::new(),
            capacity,
            ttl,
        }
    }

    /// A Write answered with `attr`: keep it if its mtime is at least the remembered one.
    pub fn record_write(&mut self, attr: &proto::Attr, now: Instant) {
        if let Some((known, seen)) = self.entries.get_mut(&attr.inode) {
            if attr.mtime_ns >= known.mtime_ns {
                *known = *attr;
                *seen = now;
            }
            return;
        }
        self.insert(attr, now);
    }

    /// Any other answer carrying the node's current attributes: it replaces the entry.
    pub fn record_current(&mut self, attr: &proto::Attr, now: Instant) {
        if let Some(entry) = self.entries.get_mut(&attr.inode) {
            *entry = (*attr, now);
            return;
        }
        self.insert(attr, now);
    }

    /// The remembered attributes of `inode` if they are fresh and their mtime is at least
    /// `mtime_ns`: the node's mtime is then known to be as new, and the SETATTR can be skipped.
    pub fn covering(&self, inode: u64, mtime_ns: i64, now: Instant) -> Option<proto::Attr> {
        let (attr, seen) = self.entries.get(&inode)?;
        let fresh = now.saturating_duration_since(*seen) < self.ttl;
        (fresh && attr.mtime_ns >= mtime_ns).then_some(*attr)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn insert(&mut self, attr: &proto::Attr, now: Instant) {
        if self.entries.len() >= self.capacity {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < ttl);
        }
        if self.entries.len() >= self.capacity {
            // Still full of fresh entries (writes to more files than the capacity within one
            // TTL): drop the older half at once, so inserts stay O(1) on average instead of a
            // scan of the whole map each. A dropped inode only costs a GetAttr later.
            let mut seen_times: Vec<Instant> =
                self.entries.values().map(|(_, seen)| *seen).collect();
            let middle = seen_times.len() / 2;
            let (_, median, _) = seen_times.select_nth_unstable(middle);
            let median = *median;
            self.entries.retain(|_, (_, seen)| *seen > median);
            if self.entries.len() >= self.capacity {
                // Every entry was seen at the same instant: drop any one.
                let any = self.entries.keys().next().copied();
                if let Some(inode) = any {
                    self.entries.remove(&inode);
                }
            }
        }
        self.entries.insert(attr.inode, (*attr, now));
        assert!(self.entries.len() <= self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(inode: u64, mtime_ns: i64) -> proto::Attr {
        proto::Attr {
            inode,
            mtime_ns,
            ..Default::default()
        }
    }

    const TTL: Duration = Duration::from_secs(1);

    #[test]
    fn a_fresh_write_answer_covers_older_times_only() {
        let start = Instant::now();
        let mut recent = RecentAttributes::new(8, TTL);
        recent.record_write(&attr(5, 100), start);
        assert_eq!(recent.covering(5, 100, start).unwrap().mtime_ns, 100);
        assert!(recent.covering(5, 99, start).is_some());
        assert!(
            recent.covering(5, 101, start).is_none(),
            "newer than the node's"
        );
        assert!(recent.covering(6, 1, start).is_none(), "unknown inode");
        assert!(
            recent.covering(5, 1, start + TTL).is_none(),
            "expired with the attribute TTL"
        );
    }

    #[test]
    fn writes_only_raise_but_other_answers_replace() {
        let start = Instant::now();
        let mut recent = RecentAttributes::new(8, TTL);
        recent.record_write(&attr(5, 200), start);
        // An earlier write answering late does not lower what is known.
        recent.record_write(&attr(5, 150), start);
        assert!(recent.covering(5, 200, start).is_some());
        // utimes moved mtime back: the SetAttr answer replaces the entry.
        recent.record_current(&attr(5, 10), start);
        assert!(recent.covering(5, 200, start).is_none());
        assert!(recent.covering(5, 10, start).is_some());
    }

    #[test]
    fn the_map_is_bounded_and_drops_expired_then_the_older_half() {
        let start = Instant::now();
        let mut recent = RecentAttributes::new(3, TTL);
        for inode in 1..=3 {
            recent.record_write(&attr(inode, 1), start + Duration::from_millis(inode * 10));
        }
        recent.record_write(&attr(4, 1), start + Duration::from_millis(40));
        assert!(recent.len() <= 3);
        assert!(
            recent
                .covering(1, 1, start + Duration::from_millis(40))
                .is_none(),
            "oldest went"
        );
        assert!(recent
            .covering(4, 1, start + Duration::from_millis(40))
            .is_some());
        // Full again, then all expired: a new entry clears them all.
        recent.record_write(&attr(5, 1), start + Duration::from_millis(50));
        assert_eq!(recent.len(), 3);
        let later = start + Duration::from_secs(5);
        recent.record_write(&attr(9, 1), later);
        assert_eq!(recent.len(), 1);
    }

    #[test]
    fn many_fresh_inserts_into_a_full_map_keep_it_bounded_and_keep_the_newest() {
        let start = Instant::now();
        let mut recent = RecentAttributes::new(64, TTL);
        for inode in 1..=10_000u64 {
            let now = start + Duration::from_micros(inode);
            recent.record_write(&attr(inode, 1), now);
            assert!(recent.len() <= 64);
            assert!(
                recent.covering(inode, 1, now).is_some(),
                "the newest entry is kept"
            );
        }
        // Same instant for all: still bounded.
        let mut same = RecentAttributes::new(4, TTL);
        for inode in 1..=20 {
            same.record_write(&attr(inode, 1), start);
            assert!(same.len() <= 4);
        }
    }
}
