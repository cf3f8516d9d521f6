//! Device space admission: which commands a leader proposes when its device is nearly full.
//!
//! Why: a write's data lands on each replica's own device when that replica applies the write.
//! Whether a device has room depends on the node, not on the replicated state, so running out
//! of blocks at apply must never be an outcome of the command: one replica would record "failed"
//! where the others recorded the data, and the replicas would differ for good. Two rules keep
//! that from happening:
//! - Before it proposes a command, the leader checks that its device has room for every block
//!   the command may allocate, on top of the blocks commands admitted earlier may still allocate
//!   ("promised") and a *reserve* left for the containers this node follows (their leaders
//!   admit writes by their own devices). If not, the client gets ENOSPC and nothing is proposed.
//! - An apply that still finds no free block (a follower whose device is fuller than its
//!   leader's, or a reserve used up) is a failure of this node (`NodeError::DeviceFull`), never a
//!   result: the container's Raft core stops, the node restarts it, and a replica that keeps
//!   failing is replaced on another node (`failing_replicas.rs`).
//!
//! Owns: the size of the reserve, the admission arithmetic, the count of promised blocks, and
//! when a node counts as short of space.
//! Must not depend on: Raft or the allocator (the caller passes the free block count in).
//! Invariants: `promised_blocks` is the sum of the live [`BlockPromise`]s; a promise is given
//! only if, with it, `promised + reserve <= free`.

use std::sync::{Arc, Mutex};

use crate::error::FsError;

/// The reserve is this fraction of the device's data blocks (1/64, about 1.6 %)...
pub const RESERVE_FRACTION_DENOMINATOR: u64 = 64;
/// ...but at most 64 MiB of 4 KiB blocks: on a large device that is still many seconds of
/// writes for the containers this node follows, and more would only strand space.
pub const RESERVE_BLOCKS_MAX: u64 = 16_384;

/// Below this share of free blocks (or twice the reserve, if more) a node is *short of space*:
/// it gets no new replicas, is no target of a replica move, and takes over no group to balance
/// leaders (whose writes it would soon refuse). Ceph's `backfillfull_ratio` (90 %) is the same
/// idea.
pub const SHORT_OF_SPACE_FREE_PERCENT: u64 = 10;

/// The blocks a node keeps free for the containers it follows, on a data region of
/// `data_block_count` blocks.
pub fn reserve_blocks(data_block_count: u64) -> u64 {
    (data_block_count / RESERVE_FRACTION_DENOMINATOR).min(RESERVE_BLOCKS_MAX)
}

/// Whether a node with `free_blocks` of `data_block_count` free is short of space (see
/// [`SHORT_OF_SPACE_FREE_PERCENT`]).
pub fn short_of_space(data_block_count: u64, free_blocks: u64) -> bool {
    free_blocks < short_of_space_floor(data_block_count)
}

/// Whether a node with `free_blocks` of `data_block_count` free has room to spare: twice the
/// short-of-space floor. Count balancing moves replicas only onto such nodes. The gap between
/// the two lines is hysteresis: a node that relief (`placement.rs`) just brought back over the
/// short line is not filled again by balancing, which would move the same replicas back and
/// forth.
pub fn has_room_to_spare(data_block_count: u64, free_blocks: u64) -> bool {
    free_blocks >= short_of_space_floor(data_block_count).saturating_mul(2)
}

/// Free blocks below which a node is short of space.
fn short_of_space_floor(data_block_count: u64) -> u64 {
    (data_block_count / 100 * SHORT_OF_SPACE_FREE_PERCENT)
        .max(reserve_blocks(data_block_count).saturating_mul(2))
}

/// Whether a node whose cluster map record says `recorded_free_blocks` should report that it
/// now has `free_blocks`: a change of at least 1 % of the device, or across the short-of-space
/// line. Bounds the reports to about a hundred per fill of the device.
pub fn worth_reporting(data_block_count: u64, recorded_free_blocks: u64, free_blocks: u64) -> bool {
    let step = (data_block_count / 100).max(1);
    recorded_free_blocks.abs_diff(free_blocks) >= step
        || short_of_space(data_block_count, recorded_free_blocks)
            != short_of_space(data_block_count, free_blocks)
}

/// Why a command was not admitted: the numbers the decision was taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall {
    pub needed_blocks: u64,
    pub free_blocks: u64,
    pub promised_blocks: u64,
    pub reserve_blocks: u64,
}

impl Shortfall {
    /// The error the client sees (ENOSPC, as a full local disk gives).
    pub fn to_fs_error(self) -> FsError {
        FsError::no_space(format!(
            "device full on this node: {} blocks needed, {} free, {} promised to writes in \
             flight, {} reserved for replicas of other containers",
            self.needed_blocks, self.free_blocks, self.promised_blocks, self.reserve_blocks
        ))
    }
}

/// Whether `needed_blocks` more fit: `free >= promised + needed + reserve`.
pub fn admits(
    needed_blocks: u64,
    free_blocks: u64,
    promised_blocks: u64,
    reserve_blocks: u64,
) -> bool {
    promised_blocks
        .checked_add(needed_blocks)
        .and_then(|sum| sum.checked_add(reserve_blocks))
        .is_some_and(|total| total <= free_blocks)
}

/// The blocks promised to commands admitted and not yet applied on this node.
#[derive(Debug, Default)]
pub struct SpaceLedger {
    promised_blocks: Mutex<u64>,
}

impl SpaceLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.promised_blocks.lock().expect("space ledger lock")
    }

    pub fn promised_blocks(&self) -> u64 {
        *self.lock()
    }

    /// Promises `needed_blocks` if they fit (see [`admits`]); the promise lasts until dropped.
    pub fn promise(
        self: &Arc<Self>,
        needed_blocks: u64,
        free_blocks: u64,
        reserve_blocks: u64,
    ) -> Result<BlockPromise, Shortfall> {
        let mut promised_blocks = self.lock();
        if !admits(needed_blocks, free_blocks, *promised_blocks, reserve_blocks) {
            return Err(Shortfall {
                needed_blocks,
                free_blocks,
                promised_blocks: *promised_blocks,
                reserve_blocks,
            });
        }
        *promised_blocks += needed_blocks;
        Ok(BlockPromise {
            ledger: Arc::clone(self),
            block_count: needed_blocks,
        })
    }
}

/// Blocks a command admitted on this node may still allocate. Dropped once the command was
/// applied here (its blocks are then allocated, and counted as no longer free) or abandoned.
#[derive(Debug)]
pub struct BlockPromise {
    ledger: Arc<SpaceLedger>,
    block_count: u64,
}

impl Drop for BlockPromise {
    fn drop(&mut self) {
        let mut promised_blocks = self.ledger.lock();
        assert!(
            *promised_blocks >= self.block_count,
            "space ledger underflow: {} promised, releasing {}",
            *promised_blocks,
            self.block_count
        );
        *promised_blocks -= self.block_count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_fraction_of_the_device_up_to_a_limit() {
        assert_eq!(reserve_blocks(0), 0);
        assert_eq!(reserve_blocks(64 * 1000), 1000);
        assert_eq!(reserve_blocks(u64::MAX), RESERVE_BLOCKS_MAX);
    }

    #[test]
    fn short_of_space_is_under_a_tenth_free_or_twice_the_reserve() {
        assert!(!short_of_space(0, 0), "an empty device is not short");
        assert!(short_of_space(100_000, 9_999));
        assert!(!short_of_space(100_000, 10_000));
        // On a small device twice the reserve is more than a tenth? Never: 2/64 < 10/100. On a
        // huge one the reserve is capped, so the tenth decides.
        assert!(short_of_space(1 << 40, (1 << 40) / 10 - 1_000_000));
    }

    #[test]
    fn room_to_spare_is_twice_the_short_line() {
        assert!(has_room_to_spare(0, 0));
        assert!(has_room_to_spare(100_000, 20_000));
        assert!(!has_room_to_spare(100_000, 19_999));
        // Between the lines: not short, but no balancing target either.
        assert!(!short_of_space(100_000, 15_000) && !has_room_to_spare(100_000, 15_000));
    }

    #[test]
    fn free_space_is_reported_by_the_percent_and_across_the_line() {
        assert!(!worth_reporting(100_000, 50_000, 49_001));
        assert!(worth_reporting(100_000, 50_000, 49_000));
        assert!(worth_reporting(100_000, 50_000, 51_000));
        // 10,000 is the line: a small step across it is reported.
        assert!(worth_reporting(100_000, 10_100, 9_900));
        assert!(worth_reporting(100_000, 9_900, 10_100));
        assert!(!worth_reporting(100_000, 9_900, 9_500));
        assert!(
            !worth_reporting(50, 7, 7),
            "tiny devices report changes of one block"
        );
        assert!(worth_reporting(50, 7, 6));
    }

    #[test]
    fn promises_count_until_dropped_and_never_dip_into_the_reserve() {
        let ledger = Arc::new(SpaceLedger::default());
        // 100 free, 10 reserved: 90 can be promised.
        let first = ledger.promise(60, 100, 10).expect("60 of 90 fit");
        assert_eq!(ledger.promised_blocks(), 60);
        let refused = ledger
            .promise(31, 100, 10)
            .expect_err("91 of 90 do not fit");
        assert_eq!(
            refused,
            Shortfall {
                needed_blocks: 31,
                free_blocks: 100,
                promised_blocks: 60,
                reserve_blocks: 10,
            }
        );
        assert_eq!(refused.to_fs_error().errno, ballast_common::Errno::ENOSPC);
        let second = ledger.promise(30, 100, 10).expect("exactly 90 fit");
        assert_eq!(ledger.promised_blocks(), 90);
        drop(first);
        assert_eq!(ledger.promised_blocks(), 30);
        drop(second);
        assert_eq!(ledger.promised_blocks(), 0);
        // Nothing fits when the free blocks are all reserved; a promise of nothing always does.
        assert!(ledger.promise(1, 10, 10).is_err());
        assert!(ledger.promise(0, 10, 10).is_ok());
        assert!(!admits(u64::MAX, u64::MAX, 1, 0), "no overflow");
    }
}
