//! The data region: `BlockStore` moves 4096-byte blocks, `BlockAllocator` decides which are free.
//!
//! Design: the block store is a thin bounds-checked window onto the engine; blocks are numbered
//! `0..data_block_count` from the start of the data region. Checksums of data blocks are NOT
//! stored here: the storage node keeps a CRC-32 per block in its index and verifies it on read, so
//! the data region holds raw payload and needs no read-modify-write of checksum blocks.
//!
//! The allocator is pure in-memory state (no I/O, deterministic): a bitmap in groups of 32768
//! blocks, each persisted as one 4096-byte bitmap (bit `i % 8` of byte `i / 8` is block
//! `group * 32768 + i`; 1 = allocated). The storage node writes the groups returned by
//! `take_dirty_groups` into RocksDB in the same batch as the state change they belong to.
//! Copy-on-write safety comes from deferred frees: a freed extent is immediately shown free in the
//! persisted bitmap, but stays unallocatable until `release_deferred` (called after the next
//! durable checkpoint), so a block the last durable checkpoint still references is never reused.
//! Allocation is next-fit from a cursor, first looking (within a bounded window) for one run that
//! satisfies the whole request, else gathering runs in address order.
//!
//! Detached writes (the storage node writes large file data once, to blocks named by a log
//! record, before the record is applied) add two states on the same bitmaps:
//! - *held*: reserved for a log record not applied yet: deferred and pinned but not on the
//!   deferred list, so the persisted view shows it free and a crash leaks nothing. `claim` turns
//!   a held block into an allocated one when the record is applied.
//! - *pinned*: a live log record names the block's bytes (a lagging follower or a replay may
//!   still read them), so a deferred pinned block stays deferred at `release_deferred`. `unpin`
//!   ends it once the record is purged or truncated; a block still held goes on the deferred
//!   list then.
//!
//! Owns: data region addressing and the free-space bitmap.
//! Must not depend on: the log store or any index of what the blocks contain.
//! Invariants: no block is handed out twice; `free_block_count` equals the number of blocks that
//! are neither allocated nor deferred; a deferred block is never allocated before release; a
//! pinned block is never released.

use std::collections::BTreeSet;

use crate::{AlignedBuffer, DeviceError, Engine, BLOCK_SIZE_BYTES};

/// Blocks covered by one persisted 4096-byte bitmap.
pub const BLOCKS_PER_GROUP: u64 = (BLOCK_SIZE_BYTES * 8) as u64;
const WORDS_PER_GROUP: usize = (BLOCKS_PER_GROUP / 64) as usize;
/// How far (in 64-block words) allocation looks ahead for one run covering a whole request.
const CONTIGUOUS_SEARCH_WORDS_MAX: usize = 4 * WORDS_PER_GROUP;

/// Handle on the data region; cheap to clone.
#[derive(Debug, Clone)]
pub struct BlockStore {
    engine: Engine,
    data_region_offset_bytes: u64,
    data_block_count: u64,
}

impl BlockStore {
    pub fn new(engine: Engine, data_region_offset_bytes: u64, data_block_count: u64) -> BlockStore {
        assert!(data_region_offset_bytes % BLOCK_SIZE_BYTES as u64 == 0);
        BlockStore {
            engine,
            data_region_offset_bytes,
            data_block_count,
        }
    }

    pub fn block_count(&self) -> u64 {
        self.data_block_count
    }

    fn offset_bytes(&self, first_block: u64, block_count: u64) -> Result<u64, DeviceError> {
        let inside = first_block
            .checked_add(block_count)
            .is_some_and(|end_block| end_block <= self.data_block_count);
        if !inside || block_count == 0 {
            return Err(DeviceError::BlockOutOfBounds {
                first_block,
                block_count,
                data_block_count: self.data_block_count,
            });
        }
        Ok(self.data_region_offset_bytes + first_block * BLOCK_SIZE_BYTES as u64)
    }

    /// Writes `buffer` (n whole blocks) to blocks `first_block..first_block + n`.
    pub async fn write_blocks(
        &self,
        first_block: u64,
        buffer: AlignedBuffer,
    ) -> Result<AlignedBuffer, DeviceError> {
        let block_count = (buffer.len() / BLOCK_SIZE_BYTES) as u64;
        let offset_bytes = self.offset_bytes(first_block, block_count)?;
        self.engine.write(offset_bytes, buffer).await
    }

    /// Reads `block_count` contiguous blocks starting at `first_block`.
    pub async fn read_blocks(
        &self,
        first_block: u64,
        block_count: u32,
    ) -> Result<AlignedBuffer, DeviceError> {
        let offset_bytes = self.offset_bytes(first_block, block_count as u64)?;
        self.engine
            .read(offset_bytes, block_count as usize * BLOCK_SIZE_BYTES)
            .await
    }

    /// Reads `block_count` blocks from `first_block` into `buffer`, from block
    /// `buffer_first_block` of the buffer on (the rest of it untouched), and gives it back.
    pub async fn read_blocks_into(
        &self,
        first_block: u64,
        block_count: u32,
        buffer: AlignedBuffer,
        buffer_first_block: usize,
    ) -> Result<AlignedBuffer, DeviceError> {
        let offset_bytes = self.offset_bytes(first_block, block_count as u64)?;
        let start = buffer_first_block * BLOCK_SIZE_BYTES;
        let window = start..start + block_count as usize * BLOCK_SIZE_BYTES;
        self.engine
            .read_into_window(offset_bytes, buffer, window)
            .await
    }

    /// Makes every completed block write durable.
    pub async fn flush(&self) -> Result<(), DeviceError> {
        self.engine.flush().await
    }
}

/// A run of contiguous blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    pub first_block: u64,
    pub block_count: u64,
}

/// In-memory free-space bitmap of the data region; see the module doc.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_count: u64,
    /// The persisted view: 1 = allocated. Deferred frees are already 0 here.
    allocated: Vec<u64>,
    /// 1 = freed but not yet released; never allocatable while set.
    deferred: Vec<u64>,
    deferred_extents: Vec<Extent>,
    /// 1 = a live log record names the block's bytes (see the module doc).
    pinned: Vec<u64>,
    free_block_count: u64,
    /// Next-fit position (block number).
    cursor: u64,
    dirty_groups: BTreeSet<u64>,
}

impl BlockAllocator {
    /// An allocator over `block_count` blocks, all free.
    pub fn new_empty(block_count: u64) -> BlockAllocator {
        let group_count = block_count.div_ceil(BLOCKS_PER_GROUP);
        let word_count = group_count as usize * WORDS_PER_GROUP;
        BlockAllocator {
            block_count,
            allocated: vec![0; word_count],
            deferred: vec![0; word_count],
            deferred_extents: Vec::new(),
            pinned: vec![0; word_count],
            free_block_count: block_count,
            cursor: 0,
            dirty_groups: BTreeSet::new(),
        }
    }

    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    pub fn group_count(&self) -> u64 {
        self.block_count.div_ceil(BLOCKS_PER_GROUP)
    }

    /// Blocks that can be allocated now (not allocated, not waiting for release).
    pub fn free_block_count(&self) -> u64 {
        self.free_block_count
    }

    /// Blocks freed and waiting for `release_deferred` (pinned ones among them stay deferred
    /// even then). Walks the deferred list: for reports and slow paths, not per request.
    pub fn deferred_block_count(&self) -> u64 {
        self.deferred_extents
            .iter()
            .map(|extent| extent.block_count)
            .sum()
    }

    /// Whether `block` is allocated in the persisted view (deferred frees are not).
    pub fn is_allocated(&self, block: u64) -> bool {
        assert!(block < self.block_count, "block {block} out of range");
        bit(&self.allocated, block)
    }

    /// Whether `block` was freed and awaits `release_deferred`.
    pub fn is_deferred(&self, block: u64) -> bool {
        assert!(block < self.block_count, "block {block} out of range");
        bit(&self.deferred, block)
    }

    /// Whether a live log record names `block` (see the module doc).
    pub fn is_pinned(&self, block: u64) -> bool {
        assert!(block < self.block_count, "block {block} out of range");
        bit(&self.pinned, block)
    }

    fn is_unavailable(&self, block: u64) -> bool {
        bit(&self.allocated, block) || bit(&self.deferred, block)
    }

    /// Restores one persisted group (4096 bytes). Replaces that group's allocated bits.
    pub fn load_group(&mut self, group_index: u64, bitmap: &[u8]) -> Result<(), DeviceError> {
        let invalid = |reason| DeviceError::InvalidBitmap {
            group_index,
            length_bytes: bitmap.len(),
            expected_length_bytes: BLOCK_SIZE_BYTES,
            reason,
        };
        if bitmap.len() != BLOCK_SIZE_BYTES {
            return Err(invalid("wrong length"));
        }
        if group_index >= self.group_count() {
            return Err(invalid("group index past the end of the data region"));
        }
        let first_word = group_index as usize * WORDS_PER_GROUP;
        let mut words = [0u64; WORDS_PER_GROUP];
        for (word, chunk) in words.iter_mut().zip(bitmap.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        // Bits for blocks past the end of the region must be clear.
        let group_first_block = group_index * BLOCKS_PER_GROUP;
        for block in self.block_count.max(group_first_block)..group_first_block + BLOCKS_PER_GROUP {
            let local = (block - group_first_block) as usize;
            if words[local / 64] & (1 << (local % 64)) != 0 {
                return Err(invalid(
                    "bit set for a block past the end of the data region",
                ));
            }
        }
        for (local_word, &word) in words.iter().enumerate() {
            let index = first_word + local_word;
            if word & self.deferred[index] != 0 {
                return Err(invalid(
                    "allocated bit set for a block awaiting deferred release",
                ));
            }
            let unavailable_before = (self.allocated[index] | self.deferred[index]).count_ones();
            let unavailable_after = (word | self.deferred[index]).count_ones();
            self.free_block_count =
                self.free_block_count + unavailable_before as u64 - unavailable_after as u64;
            self.allocated[index] = word;
        }
        Ok(())
    }

    /// Allocates `block_count` blocks, all or nothing, as few extents as next-fit finds.
    pub fn allocate(&mut self, block_count: u64) -> Result<Vec<Extent>, DeviceError> {
        let extents = self.take_free(block_count)?;
        for extent in &extents {
            for block in extent.first_block..extent.first_block + extent.block_count {
                set_bit(&mut self.allocated, block, true);
            }
            self.mark_dirty(*extent);
        }
        Ok(extents)
    }

    /// Reserves `block_count` blocks for a log record that is not applied yet: *held* and
    /// pinned (module doc). All or nothing. The persisted view does not change.
    pub fn hold(&mut self, block_count: u64) -> Result<Vec<Extent>, DeviceError> {
        let extents = self.take_free(block_count)?;
        for extent in &extents {
            for block in extent.first_block..extent.first_block + extent.block_count {
                set_bit(&mut self.deferred, block, true);
                set_bit(&mut self.pinned, block, true);
            }
        }
        Ok(extents)
    }

    /// Turns held blocks into allocated ones (they stay pinned). All or nothing: a block that is
    /// not held is a caller bug, reported as `AllocatorInvariant` without changing anything.
    pub fn claim(&mut self, extent: Extent) -> Result<(), DeviceError> {
        self.check_inside(extent)?;
        let end_block = extent.first_block + extent.block_count;
        if let Some(block) = (extent.first_block..end_block).find(|&block| !self.is_held(block)) {
            return Err(DeviceError::AllocatorInvariant {
                block,
                reason: "claiming a block that is not held",
            });
        }
        for block in extent.first_block..end_block {
            set_bit(&mut self.deferred, block, false);
            set_bit(&mut self.allocated, block, true);
        }
        self.mark_dirty(extent);
        Ok(())
    }

    /// Ends the pin of `extent` (its log record is gone). `still_held`: the record was never
    /// applied, so its blocks are still held; they go on the deferred list and become free at
    /// the next release. Otherwise they are allocated or already on the deferred list.
    pub fn unpin(&mut self, extent: Extent, still_held: bool) -> Result<(), DeviceError> {
        self.check_inside(extent)?;
        let end_block = extent.first_block + extent.block_count;
        let wrong = (extent.first_block..end_block)
            .find(|&block| !bit(&self.pinned, block) || (still_held && !self.is_held(block)));
        if let Some(block) = wrong {
            return Err(DeviceError::AllocatorInvariant {
                block,
                reason: "unpinning a block that is not pinned (or not held)",
            });
        }
        for block in extent.first_block..end_block {
            set_bit(&mut self.pinned, block, false);
        }
        if still_held && extent.block_count > 0 {
            self.deferred_extents.push(extent);
        }
        Ok(())
    }

    /// Pins `extent` again at start-up, for a live log record found in the recovered log.
    /// `applied`: the record is applied in the durable state, so its blocks are allocated
    /// (claimed and still referenced) or free (freed since, or never claimed); free ones become
    /// deferred, so they keep their bytes until the record goes. Otherwise every block must be
    /// free, and becomes held, to be claimed by the replay. A block already pinned, or (when not
    /// applied) not free, is an `AllocatorInvariant` error and changes nothing.
    pub fn pin_recovered(&mut self, extent: Extent, applied: bool) -> Result<(), DeviceError> {
        self.check_inside(extent)?;
        let end_block = extent.first_block + extent.block_count;
        let wrong = (extent.first_block..end_block)
            .find(|&block| bit(&self.pinned, block) || (!applied && self.is_unavailable(block)));
        if let Some(block) = wrong {
            return Err(DeviceError::AllocatorInvariant {
                block,
                reason: "a recovered log record names a block that is pinned or in use",
            });
        }
        for block in extent.first_block..end_block {
            set_bit(&mut self.pinned, block, true);
            if self.is_unavailable(block) {
                continue;
            }
            set_bit(&mut self.deferred, block, true);
            self.free_block_count -= 1;
            if applied {
                self.push_deferred_block(block);
            }
        }
        Ok(())
    }

    /// Deferred and pinned but not allocated: reserved for a record (or freed while pinned; the
    /// caller knows which, by whether the record was applied).
    fn is_held(&self, block: u64) -> bool {
        bit(&self.deferred, block) && bit(&self.pinned, block) && !bit(&self.allocated, block)
    }

    /// Adds one block to the deferred list, extending the last extent when it is adjacent.
    fn push_deferred_block(&mut self, block: u64) {
        if let Some(last) = self.deferred_extents.last_mut() {
            if last.first_block + last.block_count == block {
                last.block_count += 1;
                return;
            }
        }
        self.deferred_extents.push(Extent {
            first_block: block,
            block_count: 1,
        });
    }

    fn check_inside(&self, extent: Extent) -> Result<(), DeviceError> {
        let inside = extent
            .first_block
            .checked_add(extent.block_count)
            .is_some_and(|end_block| end_block <= self.block_count);
        if inside {
            Ok(())
        } else {
            Err(DeviceError::AllocatorInvariant {
                block: extent.first_block,
                reason: "extent is outside the data region",
            })
        }
    }

    /// Finds and counts out `block_count` free blocks (all or nothing); the caller marks them.
    fn take_free(&mut self, block_count: u64) -> Result<Vec<Extent>, DeviceError> {
        if block_count == 0 {
            return Ok(Vec::new());
        }
        if block_count > self.free_block_count {
            return Err(DeviceError::NoSpace {
                requested_blocks: block_count,
                free_blocks: self.free_block_count,
            });
        }
        let extents = match self.find_contiguous(block_count) {
            Some(first_block) => vec![Extent {
                first_block,
                block_count,
            }],
            None => self.gather_runs(block_count),
        };
        debug_assert_eq!(
            extents.iter().map(|extent| extent.block_count).sum::<u64>(),
            block_count
        );
        for extent in &extents {
            for block in extent.first_block..extent.first_block + extent.block_count {
                debug_assert!(
                    !self.is_unavailable(block),
                    "block {block} handed out twice"
                );
            }
        }
        self.free_block_count -= block_count;
        let last = extents.last().expect("non-empty");
        self.cursor = (last.first_block + last.block_count) % self.block_count;
        Ok(extents)
    }

    /// Frees `extent` in the persisted view now; its blocks become allocatable at the next
    /// `release_deferred`. Freeing a block that is not allocated (including a double free) is a
    /// caller bug: it panics in debug builds and returns `AllocatorInvariant` otherwise, without
    /// changing anything.
    pub fn free_deferred(&mut self, extent: Extent) -> Result<(), DeviceError> {
        let inside = extent
            .first_block
            .checked_add(extent.block_count)
            .is_some_and(|end_block| end_block <= self.block_count);
        if !inside {
            debug_assert!(false, "freeing {extent:?} outside the data region");
            return Err(DeviceError::AllocatorInvariant {
                block: extent.first_block,
                reason: "freed extent is outside the data region",
            });
        }
        let end_block = extent.first_block + extent.block_count;
        if let Some(block) =
            (extent.first_block..end_block).find(|&block| !bit(&self.allocated, block))
        {
            debug_assert!(
                false,
                "freeing block {block} which is not allocated (double free?)"
            );
            return Err(DeviceError::AllocatorInvariant {
                block,
                reason: "freeing a block that is not allocated (double free?)",
            });
        }
        for block in extent.first_block..end_block {
            set_bit(&mut self.allocated, block, false);
            set_bit(&mut self.deferred, block, true);
        }
        if extent.block_count > 0 {
            self.deferred_extents.push(extent);
            self.mark_dirty(extent);
        }
        Ok(())
    }

    /// Makes every deferred free allocatable (call once the state that freed them is durable),
    /// except pinned blocks, which stay deferred until they are unpinned.
    pub fn release_deferred(&mut self) {
        for extent in std::mem::take(&mut self.deferred_extents) {
            for block in extent.first_block..extent.first_block + extent.block_count {
                debug_assert!(bit(&self.deferred, block));
                if bit(&self.pinned, block) {
                    self.push_deferred_block(block);
                    continue;
                }
                set_bit(&mut self.deferred, block, false);
                self.free_block_count += 1;
            }
        }
    }

    /// Persisted form (4096 bytes each) of every group changed since the last call.
    pub fn take_dirty_groups(&mut self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.dirty_groups)
            .into_iter()
            .map(|group_index| {
                let first_word = group_index as usize * WORDS_PER_GROUP;
                let bitmap = self.allocated[first_word..first_word + WORDS_PER_GROUP]
                    .iter()
                    .flat_map(|word| word.to_le_bytes())
                    .collect();
                (group_index, bitmap)
            })
            .collect()
    }

    fn mark_dirty(&mut self, extent: Extent) {
        if extent.block_count == 0 {
            return;
        }
        let first_group = extent.first_block / BLOCKS_PER_GROUP;
        let last_group = (extent.first_block + extent.block_count - 1) / BLOCKS_PER_GROUP;
        self.dirty_groups.extend(first_group..=last_group);
    }

    /// Length of the free run starting at `block`, capped at `limit`.
    fn free_run_length(&self, block: u64, limit: u64) -> u64 {
        let mut length = 0;
        while length < limit
            && block + length < self.block_count
            && !self.is_unavailable(block + length)
        {
            length += 1;
        }
        length
    }

    /// Next-fit search, within a bounded window from the cursor, for one run of `block_count`.
    fn find_contiguous(&self, block_count: u64) -> Option<u64> {
        let window_blocks = (CONTIGUOUS_SEARCH_WORDS_MAX as u64 * 64).min(self.block_count);
        let mut scanned = 0;
        let mut block = self.cursor;
        while scanned < window_blocks {
            if block >= self.block_count {
                block = 0;
            }
            if block % 64 == 0 {
                let word =
                    self.allocated[(block / 64) as usize] | self.deferred[(block / 64) as usize];
                if word == u64::MAX {
                    block += 64;
                    scanned += 64;
                    continue;
                }
            }
            if self.is_unavailable(block) {
                block += 1;
                scanned += 1;
                continue;
            }
            let run = self.free_run_length(block, block_count);
            if run == block_count {
                return Some(block);
            }
            block += run;
            scanned += run;
        }
        None
    }

    /// Takes free runs in address order from the cursor (wrapping) until `block_count` are found.
    /// The caller has checked that enough blocks are free.
    fn gather_runs(&self, block_count: u64) -> Vec<Extent> {
        let mut extents = Vec::new();
        let mut needed = block_count;
        let mut block = self.cursor;
        let mut scanned = 0;
        while needed > 0 {
            assert!(
                scanned <= self.block_count,
                "free block count out of sync with the bitmap"
            );
            if block >= self.block_count {
                block = 0;
            }
            if block % 64 == 0
                && (self.allocated[(block / 64) as usize] | self.deferred[(block / 64) as usize])
                    == u64::MAX
            {
                block += 64;
                scanned += 64;
                continue;
            }
            if self.is_unavailable(block) {
                block += 1;
                scanned += 1;
                continue;
            }
            let run = self.free_run_length(block, needed);
            extents.push(Extent {
                first_block: block,
                block_count: run,
            });
            needed -= run;
            block += run;
            scanned += run;
        }
        extents
    }
}

fn bit(words: &[u64], block: u64) -> bool {
    words[(block / 64) as usize] & (1 << (block % 64)) != 0
}

fn set_bit(words: &mut [u64], block: u64, value: bool) {
    let word = &mut words[(block / 64) as usize];
    if value {
        *word |= 1 << (block % 64);
    } else {
        *word &= !(1 << (block % 64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    #[test]
    fn allocate_is_contiguous_and_next_fit() {
        let mut allocator = BlockAllocator::new_empty(100);
        assert_eq!(
            allocator.allocate(10).unwrap(),
            vec![Extent {
                first_block: 0,
                block_count: 10
            }]
        );
        assert_eq!(
            allocator.allocate(5).unwrap(),
            vec![Extent {
                first_block: 10,
                block_count: 5
            }]
        );
        allocator
            .free_deferred(Extent {
                first_block: 0,
                block_count: 10,
            })
            .unwrap();
        assert_eq!(allocator.free_block_count(), 85);
        // Deferred blocks are skipped even though the persisted view shows them free.
        assert!(!allocator.is_allocated(0));
        assert_eq!(
            allocator.allocate(85).unwrap(),
            vec![Extent {
                first_block: 15,
                block_count: 85
            }]
        );
        assert!(matches!(
            allocator.allocate(1),
            Err(DeviceError::NoSpace {
                requested_blocks: 1,
                free_blocks: 0
            })
        ));
        allocator.release_deferred();
        assert_eq!(
            allocator.allocate(10).unwrap(),
            vec![Extent {
                first_block: 0,
                block_count: 10
            }]
        );
    }

    #[test]
    fn fragmented_allocation_gathers_runs() {
        let mut allocator = BlockAllocator::new_empty(20);
        allocator.allocate(20).unwrap();
        for first_block in [2, 8, 14] {
            allocator
                .free_deferred(Extent {
                    first_block,
                    block_count: 2,
                })
                .unwrap();
        }
        allocator.release_deferred();
        let extents = allocator.allocate(5).unwrap();
        assert_eq!(
            extents.iter().map(|extent| extent.block_count).sum::<u64>(),
            5
        );
        assert_eq!(extents.len(), 3);
        assert_eq!(allocator.free_block_count(), 1);
    }

    fn extent(first_block: u64, block_count: u64) -> Extent {
        Extent {
            first_block,
            block_count,
        }
    }

    #[test]
    fn held_blocks_are_claimed_or_freed_and_pins_outlive_releases() {
        let mut allocator = BlockAllocator::new_empty(256);
        let held = allocator.hold(8).unwrap();
        assert_eq!(held, [extent(0, 8)]);
        assert_eq!(allocator.free_block_count(), 248);
        // Held blocks show free in the persisted view and are never allocated or released.
        assert!(allocator.take_dirty_groups().is_empty());
        assert!(!allocator.is_allocated(0) && allocator.is_deferred(0) && allocator.is_pinned(0));
        allocator.release_deferred();
        assert_eq!(allocator.allocate(248).unwrap(), [extent(8, 248)]);
        assert_eq!(allocator.free_block_count(), 0);
        for block in 8..256 {
            allocator.free_deferred(extent(block, 1)).unwrap();
        }
        allocator.release_deferred();
        assert_eq!(allocator.free_block_count(), 248);

        // Claimed: allocated and dirty, still pinned. Freed while pinned: stays deferred.
        allocator.claim(extent(0, 4)).unwrap();
        assert!(allocator.is_allocated(3) && !allocator.is_deferred(3) && allocator.is_pinned(3));
        assert_eq!(allocator.take_dirty_groups().len(), 1);
        assert!(allocator.claim(extent(0, 4)).is_err(), "claimed twice");
        allocator.free_deferred(extent(0, 4)).unwrap();
        allocator.release_deferred();
        assert!(allocator.is_deferred(0), "a pinned block was released");
        assert_eq!(allocator.free_block_count(), 248);
        allocator.unpin(extent(0, 4), false).unwrap();
        allocator.release_deferred();
        assert!(!allocator.is_deferred(0) && !allocator.is_pinned(0));
        assert_eq!(allocator.free_block_count(), 252);

        // Never claimed: unpinning puts the held blocks on the deferred list.
        assert!(
            allocator.unpin(extent(0, 8), true).is_err(),
            "half not held"
        );
        allocator.unpin(extent(4, 4), true).unwrap();
        assert!(allocator.is_deferred(4));
        assert!(
            allocator.unpin(extent(4, 4), true).is_err(),
            "unpinned twice"
        );
        allocator.release_deferred();
        assert_eq!(allocator.free_block_count(), 256);
        assert!((0..256).all(|block| !allocator.is_unavailable(block)));
    }

    #[test]
    fn recovered_pins_keep_or_hold_blocks() {
        let mut allocator = BlockAllocator::new_empty(128);
        assert_eq!(allocator.allocate(4).unwrap(), [extent(0, 4)]);
        // Applied: allocated blocks stay allocated, free ones become deferred, all pinned.
        allocator.pin_recovered(extent(2, 4), true).unwrap();
        assert!(allocator.is_allocated(2) && !allocator.is_deferred(2));
        assert!(allocator.is_deferred(4) && allocator.is_deferred(5));
        assert_eq!(allocator.free_block_count(), 122);
        assert!(
            allocator.pin_recovered(extent(5, 1), true).is_err(),
            "pinned twice"
        );
        // Not applied: the blocks must be free, and become held for the replay to claim.
        assert!(
            allocator.pin_recovered(extent(0, 1), false).is_err(),
            "in use"
        );
        allocator.pin_recovered(extent(10, 2), false).unwrap();
        assert_eq!(allocator.free_block_count(), 120);
        allocator.release_deferred();
        assert_eq!(allocator.free_block_count(), 120, "pinned blocks released");
        allocator.claim(extent(10, 2)).unwrap();
        allocator.unpin(extent(2, 4), false).unwrap();
        allocator.release_deferred();
        // Blocks 4 and 5 are free again; 0..4 and 10..12 are allocated.
        assert_eq!(allocator.free_block_count(), 122);
        assert!(allocator.is_allocated(10) && allocator.is_pinned(10));
    }

    #[test]
    fn no_space_changes_nothing() {
        let mut allocator = BlockAllocator::new_empty(10);
        allocator.allocate(4).unwrap();
        let before = allocator.clone();
        assert!(allocator.allocate(7).is_err());
        assert_eq!(allocator.allocated, before.allocated);
        assert_eq!(allocator.free_block_count(), 6);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "double free"))]
    fn double_free_is_an_invariant_violation() {
        let mut allocator = BlockAllocator::new_empty(10);
        allocator.allocate(4).unwrap();
        allocator
            .free_deferred(Extent {
                first_block: 0,
                block_count: 2,
            })
            .unwrap();
        let result = allocator.free_deferred(Extent {
            first_block: 1,
            block_count: 2,
        });
        assert!(matches!(
            result,
            Err(DeviceError::AllocatorInvariant { block: 1, .. })
        ));
        assert!(allocator.is_allocated(2), "a refused free changes nothing");
    }

    #[test]
    fn load_group_validates() {
        let mut allocator = BlockAllocator::new_empty(BLOCKS_PER_GROUP + 10);
        assert!(allocator.load_group(0, &[0; 100]).is_err());
        assert!(allocator.load_group(2, &[0; 4096]).is_err());
        let mut bitmap = vec![0u8; 4096];
        bitmap[2] = 1; // block 16 of group 1 is past the end (10 blocks)
        assert!(allocator.load_group(1, &bitmap).is_err());
        bitmap[2] = 0;
        bitmap[0] = 0b101;
        allocator.load_group(1, &bitmap).unwrap();
        assert!(allocator.is_allocated(BLOCKS_PER_GROUP));
        assert!(!allocator.is_allocated(BLOCKS_PER_GROUP + 1));
        assert_eq!(allocator.free_block_count(), BLOCKS_PER_GROUP + 8);
    }

    #[derive(Debug, Clone)]
    enum Operation {
        Allocate(u64),
        Free(usize),
        Release,
        Persist,
    }

    fn operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            4 => (1u64..3000).prop_map(Operation::Allocate),
            3 => any::<usize>().prop_map(Operation::Free),
            1 => Just(Operation::Release),
            1 => Just(Operation::Persist),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn allocator_matches_model(
            block_count in 1u64..(2 * BLOCKS_PER_GROUP + 500),
            operations in proptest::collection::vec(operation(), 1..120),
        ) {
            let mut allocator = BlockAllocator::new_empty(block_count);
            let mut allocated: HashSet<u64> = HashSet::new();
            let mut deferred: HashSet<u64> = HashSet::new();
            let mut live_extents: Vec<Extent> = Vec::new();
            let mut persisted: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for operation in operations {
                match operation {
                    Operation::Allocate(count) => {
                        let free = block_count - allocated.len() as u64 - deferred.len() as u64;
                        match allocator.allocate(count) {
                            Ok(extents) => {
                                prop_assert!(count <= free);
                                for extent in extents {
                                    for block in extent.first_block..extent.first_block + extent.block_count {
                                        prop_assert!(block < block_count);
                                        prop_assert!(!deferred.contains(&block), "deferred block reused");
                                        prop_assert!(allocated.insert(block), "block handed out twice");
                                    }
                                    live_extents.push(extent);
                                }
                            }
                            Err(DeviceError::NoSpace { free_blocks, .. }) => {
                                prop_assert!(count > free);
                                prop_assert_eq!(free_blocks, free);
                            }
                            Err(other) => prop_assert!(false, "unexpected {other}"),
                        }
                    }
                    Operation::Free(pick) => {
                        if !live_extents.is_empty() {
                            let extent = live_extents.swap_remove(pick % live_extents.len());
                            allocator.free_deferred(extent).unwrap();
                            for block in extent.first_block..extent.first_block + extent.block_count {
                                allocated.remove(&block);
                                deferred.insert(block);
                            }
                        }
                    }
                    Operation::Release => {
                        allocator.release_deferred();
                        deferred.clear();
                    }
                    Operation::Persist => {
                        persisted.extend(allocator.take_dirty_groups());
                        let mut reloaded = BlockAllocator::new_empty(block_count);
                        for (group_index, bitmap) in &persisted {
                            reloaded.load_group(*group_index, bitmap).unwrap();
                        }
                        for block in 0..block_count {
                            prop_assert_eq!(reloaded.is_allocated(block), allocated.contains(&block));
                        }
                        prop_assert_eq!(reloaded.free_block_count(), block_count - allocated.len() as u64);
                    }
                }
                prop_assert_eq!(
                    allocator.free_block_count(),
                    block_count - allocated.len() as u64 - deferred.len() as u64
                );
            }
        }
    }
}
