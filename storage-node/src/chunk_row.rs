//! `ChunkRow`: the block references of one 1 MiB chunk of a file (256 blocks) as runs, the
//! value of a chunk row (tag `F`, `docs/on-disk-format.md`, `docs/chunk-rows.md`). The block
//! map (`block_map.rs`) stores and reads them; this module is the codec and its operations.
//!
//! A run is a range of file blocks of the chunk on consecutive device blocks (or all
//! unwritten: fallocated, reading as zeros), with one CRC-32 per block. A block in no run is a
//! hole. Changes go through a dense view of the chunk's 256 references and the runs are built
//! again from it, always maximal, so one set of references has exactly one encoding.
//!
//! Owns: the run encoding and its checks.
//! Must not depend on: RocksDB, keys, or anything async; it is plain data.
//! Invariants (checked by `decode`, kept by every operation): runs sorted by their first
//! block, not overlapping, inside the chunk, each of 1 to 256 blocks with exactly one checksum
//! per block; a written run's device blocks do not wrap past `u64::MAX` and never reach the
//! unwritten sentinel; two runs that could be one are one (maximal); a row has at least one
//! run (an empty chunk has no row).

use serde::{Deserialize, Serialize};

use crate::error::{FsError, NodeResult};
use crate::records::BlockRef;

/// File blocks in one chunk (1 MiB of 4 KiB blocks).
pub const CHUNK_BLOCK_COUNT: u64 = 256;

/// One run of a chunk: `block_count` file blocks from `first_block_in_chunk`, on the device
/// blocks from `device_first_block` ([`BlockRef::UNWRITTEN_DEVICE_BLOCK`] for unwritten blocks),
/// with their checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRun {
    pub first_block_in_chunk: u16,
    pub block_count: u16,
    pub device_first_block: u64,
    pub checksums: Vec<u32>,
}

impl ChunkRun {
    fn is_unwritten(&self) -> bool {
        self.device_first_block == BlockRef::UNWRITTEN_DEVICE_BLOCK
    }

    /// The reference of the run's `offset`-th block.
    fn reference(&self, offset: u16) -> BlockRef {
        let device_block = if self.is_unwritten() {
            BlockRef::UNWRITTEN_DEVICE_BLOCK
        } else {
            self.device_first_block + u64::from(offset)
        };
        BlockRef {
            device_block,
            checksum: self.checksums[offset as usize],
        }
    }
}

/// The references of one chunk. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRow {
    runs: Vec<ChunkRun>,
}

/// Every block of a chunk: its reference, or `None` for a hole.
pub type DenseChunk = [Option<BlockRef>; CHUNK_BLOCK_COUNT as usize];

impl ChunkRow {
    /// The row of `dense`; `None` when the chunk holds no reference at all (no row).
    pub fn from_dense(dense: &DenseChunk) -> Option<ChunkRow> {
        let mut runs: Vec<ChunkRun> = Vec::new();
        for (index, reference) in dense.iter().enumerate() {
            let Some(reference) = reference else {
                continue;
            };
            let index = index as u16;
            if let Some(last) = runs.last_mut() {
                let follows = last.first_block_in_chunk + last.block_count == index;
                let continues = if last.is_unwritten() {
                    reference.is_unwritten()
                } else {
                    !reference.is_unwritten()
                        && last
                            .device_first_block
                            .checked_add(u64::from(last.block_count))
                            == Some(reference.device_block)
                };
                if follows && continues {
                    last.block_count += 1;
                    last.checksums.push(reference.checksum);
                    continue;
                }
            }
            runs.push(ChunkRun {
                first_block_in_chunk: index,
                block_count: 1,
                device_first_block: reference.device_block,
                checksums: vec![reference.checksum],
            });
        }
        let row = (!runs.is_empty()).then_some(ChunkRow { runs });
        if let Some(row) = &row {
            debug_assert!(row.check().is_ok(), "a built row breaks its invariants");
        }
        row
    }

    /// The dense view of the row.
    pub fn to_dense(&self) -> DenseChunk {
        let mut dense = [None; CHUNK_BLOCK_COUNT as usize];
        for run in &self.runs {
            for offset in 0..run.block_count {
                dense[(run.first_block_in_chunk + offset) as usize] = Some(run.reference(offset));
            }
        }
        dense
    }

    /// The runs, in block order.
    pub fn runs(&self) -> &[ChunkRun] {
        &self.runs
    }

    /// The references of the blocks `first..=last` of the chunk that are not holes, as
    /// `(block in chunk, reference)` in block order.
    pub fn references_between(&self, first: u16, last: u16) -> Vec<(u16, BlockRef)> {
        assert!(first <= last && u64::from(last) < CHUNK_BLOCK_COUNT);
        let mut references = Vec::new();
        for run in &self.runs {
            let run_end = run.first_block_in_chunk + run.block_count;
            let from = run.first_block_in_chunk.max(first);
            let to = run_end.min(last + 1);
            for block in from..to {
                references.push((block, run.reference(block - run.first_block_in_chunk)));
            }
        }
        references
    }

    /// `row` (or no row) with the blocks `first..` of the chunk set to `references` (one per
    /// block, `None` to make a hole); the result again `None` when nothing is left.
    pub fn with_blocks(
        row: Option<&ChunkRow>,
        first: u16,
        references: &[Option<BlockRef>],
    ) -> Option<ChunkRow> {
        assert!(u64::from(first) + references.len() as u64 <= CHUNK_BLOCK_COUNT);
        let mut dense = row.map_or([None; CHUNK_BLOCK_COUNT as usize], ChunkRow::to_dense);
        for (offset, reference) in references.iter().enumerate() {
            dense[first as usize + offset] = *reference;
        }
        ChunkRow::from_dense(&dense)
    }

    /// Checks every invariant of the module documentation.
    pub fn check(&self) -> NodeResult<()> {
        let invalid = |reason: String| Err(FsError::invalid(format!("chunk row: {reason}")).into());
        if self.runs.is_empty() {
            return invalid("no runs".to_owned());
        }
        let mut next_free: u16 = 0;
        let mut previous: Option<&ChunkRun> = None;
        for run in &self.runs {
            let end = u64::from(run.first_block_in_chunk) + u64::from(run.block_count);
            if run.block_count == 0 || end > CHUNK_BLOCK_COUNT {
                return invalid(format!(
                    "a run of {} blocks at {} does not fit the chunk",
                    run.block_count, run.first_block_in_chunk
                ));
            }
            if run.checksums.len() != run.block_count as usize {
                return invalid(format!(
                    "{} checksums for {} blocks",
                    run.checksums.len(),
                    run.block_count
                ));
            }
            if run.first_block_in_chunk < next_free {
                return invalid(format!(
                    "runs out of order or overlapping at block {}",
                    run.first_block_in_chunk
                ));
            }
            // The run's last device block is `end - 1`: below the sentinel exactly when `end`
            // itself does not overflow.
            if !run.is_unwritten()
                && run
                    .device_first_block
                    .checked_add(u64::from(run.block_count))
                    .is_none()
            {
                return invalid(format!(
                    "device blocks from {} run past the last block",
                    run.device_first_block
                ));
            }
            if let Some(previous) = previous {
                let adjacent = previous.first_block_in_chunk + previous.block_count
                    == run.first_block_in_chunk;
                let joinable = if previous.is_unwritten() {
                    run.is_unwritten()
                } else {
                    previous.device_first_block + u64::from(previous.block_count)
                        == run.device_first_block
                };
                if adjacent && joinable {
                    return invalid(format!(
                        "the runs at {} and {} are one run",
                        previous.first_block_in_chunk, run.first_block_in_chunk
                    ));
                }
            }
            next_free = end as u16;
            previous = Some(run);
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.check().is_ok());
        crate::records::encode(self)
    }

    /// Decodes and checks a stored row: bytes that break an invariant are an error, never a
    /// row.
    pub fn decode(bytes: &[u8]) -> NodeResult<ChunkRow> {
        let row: ChunkRow = crate::records::decode(bytes, "chunk row")?;
        row.check()?;
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn written(device_block: u64, checksum: u32) -> Option<BlockRef> {
        Some(BlockRef {
            device_block,
            checksum,
        })
    }

    #[test]
    fn consecutive_device_blocks_make_one_run_and_a_gap_splits_it() {
        let mut dense = [None; CHUNK_BLOCK_COUNT as usize];
        for block in 0..4u64 {
            dense[block as usize] = written(100 + block, block as u32);
        }
        dense[4] = written(500, 9);
        dense[6] = Some(BlockRef::unwritten());
        dense[7] = Some(BlockRef::unwritten());
        let row = ChunkRow::from_dense(&dense).unwrap();
        let shape: Vec<(u16, u16, u64)> = row
            .runs()
            .iter()
            .map(|run| {
                (
                    run.first_block_in_chunk,
                    run.block_count,
                    run.device_first_block,
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 4, 100),
                (4, 1, 500),
                (6, 2, BlockRef::UNWRITTEN_DEVICE_BLOCK)
            ]
        );
        assert_eq!(row.to_dense(), dense);
        assert_eq!(ChunkRow::decode(&row.encode()).unwrap(), row);
        assert_eq!(
            ChunkRow::from_dense(&[None; 256]),
            None,
            "no references, no row"
        );
    }

    #[test]
    fn a_whole_chunk_on_consecutive_blocks_is_a_small_row() {
        let dense: DenseChunk =
            std::array::from_fn(|index| written(1_000_000 + index as u64, u32::MAX));
        let row = ChunkRow::from_dense(&dense).unwrap();
        assert_eq!(row.runs().len(), 1);
        // 256 checksums of 5 bytes each (postcard varints of large values), and a few bytes.
        assert!(row.encode().len() <= 256 * 5 + 16, "{}", row.encode().len());
    }

    #[test]
    fn decode_refuses_rows_that_break_an_invariant() {
        let run = |first: u16, count: u16, device: u64, checksums: usize| ChunkRun {
            first_block_in_chunk: first,
            block_count: count,
            device_first_block: device,
            checksums: vec![1; checksums],
        };
        let refused = |runs: Vec<ChunkRun>| {
            let bytes = crate::records::encode(&ChunkRow { runs });
            ChunkRow::decode(&bytes).is_err()
        };
        assert!(refused(vec![]), "no runs");
        assert!(refused(vec![run(0, 0, 5, 0)]), "an empty run");
        assert!(refused(vec![run(200, 57, 5, 57)]), "past the chunk");
        assert!(refused(vec![run(0, 2, 5, 3)]), "checksum count");
        assert!(refused(vec![run(4, 2, 5, 2), run(5, 1, 90, 1)]), "overlap");
        assert!(refused(vec![run(4, 1, 5, 1), run(0, 1, 90, 1)]), "order");
        assert!(
            refused(vec![run(0, 2, 5, 2), run(2, 1, 7, 1)]),
            "not maximal"
        );
        assert!(
            refused(vec![run(0, 2, u64::MAX - 1, 2)]),
            "device blocks reach the sentinel"
        );
        assert!(!refused(vec![run(0, 2, 5, 2), run(2, 1, 8, 1)]));
        assert!(
            ChunkRow::decode(&[0xFF, 0xFF, 0xFF]).is_err(),
            "not postcard"
        );
    }

    fn reference_strategy() -> impl Strategy<Value = Option<BlockRef>> {
        prop_oneof![
            2 => Just(None),
            1 => Just(Some(BlockRef::unwritten())),
            // Few distinct device blocks, so neighbours often continue a run.
            4 => (0u64..8, any::<u32>()).prop_map(|(device_block, checksum)| written(device_block, checksum)),
        ]
    }

    /// Writes of a range with blocks on consecutive device blocks (as a write allocates them),
    /// unwritten ranges (fallocate) and holes (punch, truncate), in any order.
    fn change_strategy() -> impl Strategy<Value = (u16, Vec<Option<BlockRef>>)> {
        (0u16..256).prop_flat_map(|first| {
            let room = 256 - first as usize;
            (
                Just(first),
                prop_oneof![
                    (1..=room, 0u64..1_000, any::<u32>()).prop_map(|(count, device, checksum)| {
                        (0..count as u64)
                            .map(|offset| written(device + offset, checksum))
                            .collect::<Vec<_>>()
                    }),
                    (1..=room).prop_map(|count| vec![Some(BlockRef::unwritten()); count]),
                    (1..=room).prop_map(|count| vec![None; count]),
                    proptest::collection::vec(reference_strategy(), 1..=room),
                ],
            )
        })
    }

    proptest! {
        /// Any sequence of changes leaves a row equal to a plain array of references changed
        /// the same way, always valid, maximal, and stable through its encoding.
        #[test]
        fn changes_match_a_model_of_one_reference_per_block(
            changes in proptest::collection::vec(change_strategy(), 1..40),
            first in 0u16..256,
            length in 1u16..=256,
        ) {
            let mut model: DenseChunk = [None; CHUNK_BLOCK_COUNT as usize];
            let mut row: Option<ChunkRow> = None;
            for (start, references) in &changes {
                row = ChunkRow::with_blocks(row.as_ref(), *start, references);
                for (offset, reference) in references.iter().enumerate() {
                    model[*start as usize + offset] = *reference;
                }
                match &row {
                    None => prop_assert!(model.iter().all(Option::is_none)),
                    Some(row) => {
                        prop_assert!(row.check().is_ok());
                        prop_assert_eq!(row.to_dense(), model);
                        let decoded = ChunkRow::decode(&row.encode()).unwrap();
                        prop_assert_eq!(&decoded, row);
                        prop_assert_eq!(Some(decoded), ChunkRow::from_dense(&model));
                    }
                }
            }
            let last = (first + length - 1).min(255);
            let expected: Vec<(u16, BlockRef)> = (first..=last)
                .filter_map(|block| model[block as usize].map(|reference| (block, reference)))
                .collect();
            let actual = row.map(|row| row.references_between(first, last)).unwrap_or_default();
            prop_assert_eq!(actual, expected);
        }

        /// Decoding any bytes never panics; what it accepts is a valid row that decodes again,
        /// equal, from its own encoding.
        #[test]
        fn decode_never_panics_and_accepts_only_canonical_rows(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            if let Ok(row) = ChunkRow::decode(&bytes) {
                prop_assert!(row.check().is_ok());
                prop_assert_eq!(ChunkRow::decode(&row.encode()).unwrap(), row);
            }
        }
    }
}
