//! Pending block writes: device blocks that an apply has already referenced in its state batch
//! while their device write is still in flight.
//!
//! Why: an apply used to wait for its new blocks to be written before committing the batch that
//! references them, and the client's answer waited for the apply. That wait was a device write
//! plus two thread hand-offs (about 150 µs of a 4 KiB write's 0.8 ms here) on the path of every
//! small write, although the data is already in the Raft log, which is what recovery replays.
//! Now the apply submits the write, registers the blocks here, and commits; a task removes them
//! when the write completes.
//!
//! Owns: the set of pending extents, the wake-up of those who wait for them, and the budget
//! that bounds how much data may be pending.
//! Must not depend on: the state store or Raft.
//! Invariants:
//! - Blocks are registered before the batch that references them is committed, and removed
//!   only after their write completed, so a reader that found a reference and then waited for
//!   the blocks here never reads bytes older than the write.
//! - Every read of referenced blocks (file reads, snapshot export, scrub, repair) waits for the
//!   pending writes of the blocks it reads; a checkpoint waits until none are pending before it
//!   flushes the device, so a durable state never references unwritten blocks.
//! - At most [`PENDING_WRITE_BLOCKS_MAX`] blocks are pending; an apply past that waits for
//!   earlier writes to complete (its buffer memory is bounded the same way).

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Blocks whose write may be pending at once (64 MiB of buffers).
pub const PENDING_WRITE_BLOCKS_MAX: u32 = 16_384;

#[derive(Debug)]
pub struct PendingWrites {
    /// First block -> block count, for every extent whose write is in flight.
    extents: Mutex<BTreeMap<u64, u64>>,
    /// Woken whenever an extent leaves the map.
    completed: Notify,
    /// One permit per pending block.
    budget: std::sync::Arc<Semaphore>,
}

impl Default for PendingWrites {
    fn default() -> Self {
        Self {
            extents: Mutex::new(BTreeMap::new()),
            completed: Notify::new(),
            budget: std::sync::Arc::new(Semaphore::new(PENDING_WRITE_BLOCKS_MAX as usize)),
        }
    }
}

impl PendingWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        // Each operation is one map step: a poisoned lock is still consistent.
        self.extents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Room for `block_count` more pending blocks (waits while the budget is spent). The permit
    /// lives until the write has completed.
    pub async fn reserve(&self, block_count: u64) -> OwnedSemaphorePermit {
        let permits = u32::try_from(block_count)
            .unwrap_or(u32::MAX)
            .min(PENDING_WRITE_BLOCKS_MAX);
        assert!(permits > 0);
        self.budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .expect("the pending-write budget is never closed")
    }

    /// The write of these extents was submitted (or is about to be): readers must wait for it.
    pub fn insert(&self, extents: &[(u64, u64)]) {
        let mut map = self.lock();
        for &(first_block, block_count) in extents {
            assert!(block_count > 0);
            assert!(
                !overlaps(&map, first_block, block_count),
                "block {first_block} written twice while pending: it was allocated twice"
            );
            map.insert(first_block, block_count);
        }
    }

    /// The write of these extents completed: they hold their new bytes.
    pub fn complete(&self, extents: &[(u64, u64)]) {
        {
            let mut map = self.lock();
            for &(first_block, block_count) in extents {
                let removed = map.remove(&first_block);
                assert_eq!(
                    removed,
                    Some(block_count),
                    "completing an extent never inserted"
                );
            }
        }
        self.completed.notify_waiters();
    }

    pub fn is_pending(&self, first_block: u64, block_count: u64) -> bool {
        overlaps(&self.lock(), first_block, block_count)
    }

    pub fn pending_block_count(&self) -> u64 {
        self.lock().values().sum()
    }

    /// Returns once no block of `first_block..first_block + block_count` is pending.
    pub async fn wait_for(&self, first_block: u64, block_count: u64) {
        self.wait_until(|map| !overlaps(map, first_block, block_count))
            .await
    }

    /// Returns once nothing is pending (a checkpoint, under the apply lock, so no new write can
    /// be registered meanwhile).
    pub async fn wait_for_all(&self) {
        self.wait_until(|map| map.is_empty()).await
    }

    async fn wait_until(&self, done: impl Fn(&BTreeMap<u64, u64>) -> bool) {
        loop {
            let notified = self.completed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a completion between the check and the await is
            // not missed.
            notified.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            notified.await;
        }
    }
}

/// Whether any extent of `map` overlaps `first_block..first_block + block_count`.
fn overlaps(map: &BTreeMap<u64, u64>, first_block: u64, block_count: u64) -> bool {
    let end = first_block.saturating_add(block_count);
    // Extents do not overlap each other, so only the last one starting before `end` can reach
    // into the range.
    map.range(..end)
        .next_back()
        .is_some_and(|(&start, &count)| start + count > first_block)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn overlap_is_exact_at_the_edges() {
        let mut map = BTreeMap::new();
        map.insert(10, 5); // 10..15
        map.insert(20, 1); // 20..21
        assert!(!overlaps(&map, 0, 10));
        assert!(overlaps(&map, 0, 11));
        assert!(overlaps(&map, 14, 1));
        assert!(!overlaps(&map, 15, 5));
        assert!(overlaps(&map, 15, 6));
        assert!(!overlaps(&map, 21, 100));
        assert!(overlaps(&map, 0, u64::MAX));
    }

    #[tokio::test]
    async fn a_reader_waits_for_the_write_of_its_blocks_only() {
        let pending = Arc::new(PendingWrites::default());
        pending.insert(&[(100, 4)]);
        assert!(pending.is_pending(103, 1));
        // Blocks outside the extent do not wait.
        tokio::time::timeout(Duration::from_secs(5), pending.wait_for(104, 10))
            .await
            .expect("unrelated blocks must not wait");
        let waiter = {
            let pending = Arc::clone(&pending);
            tokio::spawn(async move { pending.wait_for(102, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "returned before the write completed");
        pending.complete(&[(100, 4)]);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the completion")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), pending.wait_for_all())
            .await
            .expect("nothing pending");
        assert_eq!(pending.pending_block_count(), 0);
    }

    #[tokio::test]
    async fn the_budget_bounds_pending_blocks() {
        let pending = PendingWrites::default();
        let first = pending.reserve(u64::from(PENDING_WRITE_BLOCKS_MAX)).await;
        let blocked = tokio::time::timeout(Duration::from_millis(50), pending.reserve(1)).await;
        assert!(blocked.is_err(), "reserved past the budget");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), pending.reserve(1))
            .await
            .expect("room again after the permit is dropped");
        assert_eq!(second.num_permits(), 1);
    }

    #[test]
    #[should_panic(expected = "written twice while pending")]
    fn a_block_registered_twice_is_a_bug() {
        let pending = PendingWrites::default();
        pending.insert(&[(5, 2)]);
        pending.insert(&[(6, 1)]);
    }
}
