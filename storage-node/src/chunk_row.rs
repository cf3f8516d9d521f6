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

use crate::error::{FsError, NodeResult};
use crate::records::BlockRef;

/// File blocks in one chunk (1 MiB of 4 KiB blocks).
pub const CHUNK_BLOCK_COUNT: u64 = 256;

/// One run of a chunk: `block_count` file blocks from `first_block_in_chunk`, on the device
/// blocks from `device_first_block` ([`BlockRef::UNWRITTEN_DEVICE_BLOCK`] for unwritten blocks).
/// Its checksums are in its row's [`ChunkRow`] checksum list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRun {
    pub first_block_in_chunk: u16,
    pub block_count: u16,
    pub device_first_block: u64,
}

impl ChunkRun {
    fn is_unwritten(&self) -> bool {
        self.device_first_block == BlockRef::UNWRITTEN_DEVICE_BLOCK
    }

    /// The reference of the run's `offset`-th block, whose checksum is `checksum`.
    fn reference(&self, offset: u16, checksum: u32) -> BlockRef {
        let device_block = if self.is_unwritten() {
            BlockRef::UNWRITTEN_DEVICE_BLOCK
        } else {
            self.device_first_block + u64::from(offset)
        };
        BlockRef {
            device_block,
            checksum,
        }
    }

    fn end(&self) -> u16 {
        self.first_block_in_chunk + self.block_count
    }
}

/// The references of one chunk. See the module documentation.
///
/// In memory the checksums of all runs sit in one list, in run order, so a row is two
/// allocations whatever its shape. Why: a chunk fragmented by random 4 KiB writes has up to
/// 256 runs, and one checksum vector per run made decoding and rebuilding such a row the
/// largest use of the allocator on the apply path of an fsync'd 4 KiB write (perf,
/// 2026-12-06: about 5 % of the node's samples in malloc and free).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRow {
    runs: Vec<ChunkRun>,
    /// One per block of every run, in run order.
    checksums: Vec<u32>,
}

/// Every block of a chunk: its reference, or `None` for a hole.
pub type DenseChunk = [Option<BlockRef>; CHUNK_BLOCK_COUNT as usize];

impl ChunkRow {
    /// The row of `dense`; `None` when the chunk holds no reference at all (no row).
    pub fn from_dense(dense: &DenseChunk) -> Option<ChunkRow> {
        let mut runs: Vec<ChunkRun> = Vec::new();
        let mut checksums = Vec::new();
        for (index, reference) in dense.iter().enumerate() {
            let Some(reference) = reference else {
                continue;
            };
            let index = index as u16;
            checksums.push(reference.checksum);
            if let Some(last) = runs.last_mut() {
                let continues = if last.is_unwritten() {
                    reference.is_unwritten()
                } else {
                    !reference.is_unwritten()
                        && last
                            .device_first_block
                            .checked_add(u64::from(last.block_count))
                            == Some(reference.device_block)
                };
                if last.end() == index && continues {
                    last.block_count += 1;
                    continue;
                }
            }
            runs.push(ChunkRun {
                first_block_in_chunk: index,
                block_count: 1,
                device_first_block: reference.device_block,
            });
        }
        let row = (!runs.is_empty()).then_some(ChunkRow { runs, checksums });
        if let Some(row) = &row {
            debug_assert!(row.check().is_ok(), "a built row breaks its invariants");
        }
        row
    }

    /// The runs with the checksums of their blocks, in block order.
    fn runs_with_checksums(&self) -> impl Iterator<Item = (&ChunkRun, &[u32])> {
        let mut checksums = self.checksums.as_slice();
        self.runs.iter().map(move |run| {
            let (of_run, rest) = checksums.split_at(run.block_count as usize);
            checksums = rest;
            (run, of_run)
        })
    }

    /// The dense view of the row.
    pub fn to_dense(&self) -> DenseChunk {
        let mut dense = [None; CHUNK_BLOCK_COUNT as usize];
        for (run, checksums) in self.runs_with_checksums() {
            for (offset, &checksum) in (0..run.block_count).zip(checksums) {
                dense[(run.first_block_in_chunk + offset) as usize] =
                    Some(run.reference(offset, checksum));
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
        for (run, checksums) in self.runs_with_checksums() {
            let from = run.first_block_in_chunk.max(first);
            let to = run.end().min(last + 1);
            for block in from..to {
                let offset = block - run.first_block_in_chunk;
                references.push((block, run.reference(offset, checksums[offset as usize])));
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
        let mut block_total: usize = 0;
        for run in &self.runs {
            let end = u64::from(run.first_block_in_chunk) + u64::from(run.block_count);
            if run.block_count == 0 || end > CHUNK_BLOCK_COUNT {
                return invalid(format!(
                    "a run of {} blocks at {} does not fit the chunk",
                    run.block_count, run.first_block_in_chunk
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
                let adjacent = previous.end() == run.first_block_in_chunk;
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
            block_total += run.block_count as usize;
        }
        if self.checksums.len() != block_total {
            return invalid(format!(
                "{} checksums for {block_total} blocks",
                self.checksums.len()
            ));
        }
        Ok(())
    }

    /// The stored form: the bytes of `postcard`'s encoding of
    /// `struct { runs: Vec<struct { first_block_in_chunk: u16, block_count: u16,
    /// device_first_block: u64, checksums: Vec<u32> }> }`, the form the rows were first
    /// written in: LEB128 varints for every number and every length. Written by hand so the
    /// in-memory form can keep one checksum list (a test holds the two encodings equal).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.check().is_ok());
        // At most 10 bytes for the run count, 3 + 3 + 10 + 3 per run header, 5 per checksum.
        let mut bytes = Vec::with_capacity(10 + self.runs.len() * 19 + self.checksums.len() * 5);
        put_varint(&mut bytes, self.runs.len() as u64);
        for (run, checksums) in self.runs_with_checksums() {
            put_varint(&mut bytes, u64::from(run.first_block_in_chunk));
            put_varint(&mut bytes, u64::from(run.block_count));
            put_varint(&mut bytes, run.device_first_block);
            put_varint(&mut bytes, checksums.len() as u64);
            for &checksum in checksums {
                put_varint(&mut bytes, u64::from(checksum));
            }
        }
        bytes
    }

    /// Decodes and checks a stored row: bytes that break an invariant, or that do not end
    /// where the row does, are an error, never a row.
    pub fn decode(bytes: &[u8]) -> NodeResult<ChunkRow> {
        let mut reader = VarintReader { bytes };
        let run_count = reader.take("run count", usize::MAX as u64)?;
        // Every run holds at least one block: more runs than blocks is no row (and bounds the
        // allocation below).
        if run_count == 0 || run_count > CHUNK_BLOCK_COUNT {
            return Err(FsError::invalid(format!("chunk row: {run_count} runs in a chunk")).into());
        }
        let mut runs = Vec::with_capacity(run_count as usize);
        let mut checksums = Vec::new();
        for _ in 0..run_count {
            let first_block_in_chunk = reader.take("first block", u64::from(u16::MAX))? as u16;
            let block_count = reader.take("block count", u64::from(u16::MAX))? as u16;
            let device_first_block = reader.take("device block", u64::MAX)?;
            let checksum_count = reader.take("checksum count", usize::MAX as u64)?;
            if checksum_count != u64::from(block_count)
                || checksums.len() as u64 + checksum_count > CHUNK_BLOCK_COUNT
            {
                return Err(FsError::invalid(format!(
                    "chunk row: {checksum_count} checksums for a run of {block_count} blocks"
                ))
                .into());
            }
            for _ in 0..checksum_count {
                checksums.push(reader.take("checksum", u64::from(u32::MAX))? as u32);
            }
            runs.push(ChunkRun {
                first_block_in_chunk,
                block_count,
                device_first_block,
            });
        }
        if !reader.bytes.is_empty() {
            return Err(FsError::invalid(format!(
                "chunk row: {} bytes after the row",
                reader.bytes.len()
            ))
            .into());
        }
        let row = ChunkRow { runs, checksums };
        row.check()?;
        Ok(row)
    }
}

/// Appends `value` as a LEB128 varint (7 bits a byte, low first), as `postcard` writes
/// unsigned numbers and lengths.
fn put_varint(bytes: &mut Vec<u8>, mut value: u64) {
    // Bounded: a u64 takes at most 10 bytes.
    while value >= 0x80 {
        bytes.push((value as u8 & 0x7F) | 0x80);
        value >>= 7;
    }
    bytes.push(value as u8);
}

/// Reads LEB128 varints off the front of a byte slice.
struct VarintReader<'bytes> {
    bytes: &'bytes [u8],
}

impl VarintReader<'_> {
    /// The next varint, refused when the bytes end first, when it runs past 10 bytes, when it
    /// is not in its shortest form, or when it is over `maximum` (`what` names it in the
    /// error).
    fn take(&mut self, what: &str, maximum: u64) -> NodeResult<u64> {
        let mut value: u64 = 0;
        // Bounded: at most 10 bytes of a u64.
        for (index, &byte) in self.bytes.iter().enumerate().take(10) {
            let bits = u64::from(byte & 0x7F);
            let shift = 7 * index as u32;
            // The tenth byte may carry only the top bit of a u64.
            if shift == 63 && bits > 1 {
                break;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                // A last byte of zero adds nothing: the same number has a shorter form, and a
                // row has exactly one encoding.
                if byte == 0 && index > 0 {
                    return Err(FsError::invalid(format!(
                        "chunk row: {what} is not in its shortest form"
                    ))
                    .into());
                }
                self.bytes = &self.bytes[index + 1..];
                if value > maximum {
                    return Err(FsError::invalid(format!(
                        "chunk row: {what} {value} is over {maximum}"
                    ))
                    .into());
                }
                return Ok(value);
            }
        }
        Err(FsError::invalid(format!("chunk row: {what} is not a varint")).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Serialize;

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

    /// The form rows were first written in (`postcard` of these structs): the stored bytes
    /// must stay exactly these.
    #[derive(Serialize)]
    struct LegacyRun {
        first_block_in_chunk: u16,
        block_count: u16,
        device_first_block: u64,
        checksums: Vec<u32>,
    }

    #[derive(Serialize)]
    struct LegacyRow {
        runs: Vec<LegacyRun>,
    }

    fn legacy_of(row: &ChunkRow) -> LegacyRow {
        LegacyRow {
            runs: row
                .runs_with_checksums()
                .map(|(run, checksums)| LegacyRun {
                    first_block_in_chunk: run.first_block_in_chunk,
                    block_count: run.block_count,
                    device_first_block: run.device_first_block,
                    checksums: checksums.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn decode_refuses_rows_that_break_an_invariant() {
        let run = |first: u16, count: u16, device: u64, checksums: usize| LegacyRun {
            first_block_in_chunk: first,
            block_count: count,
            device_first_block: device,
            checksums: vec![1; checksums],
        };
        let refused = |runs: Vec<LegacyRun>| {
            let bytes = crate::records::encode(&LegacyRow { runs });
            ChunkRow::decode(&bytes).is_err()
        };
        assert!(refused(vec![]), "no runs");
        assert!(refused(vec![run(0, 0, 5, 0)]), "an empty run");
        assert!(refused(vec![run(200, 57, 5, 57)]), "past the chunk");
        assert!(refused(vec![run(0, 2, 5, 3)]), "checksum count");
        assert!(refused(vec![run(0, 3, 5, 2)]), "too few checksums");
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
        assert!(
            refused(
                (0..257)
                    .map(|block| run(block, 1, 10 * u64::from(block), 1))
                    .collect()
            ),
            "more runs than blocks"
        );
        assert!(!refused(vec![run(0, 2, 5, 2), run(2, 1, 8, 1)]));
        let valid = crate::records::encode(&LegacyRow {
            runs: vec![run(0, 2, 5, 2)],
        });
        let mut trailing = valid.clone();
        trailing.push(0);
        assert!(ChunkRow::decode(&valid).is_ok());
        assert!(ChunkRow::decode(&trailing).is_err(), "a byte after the row");
        assert!(
            ChunkRow::decode(&valid[..valid.len() - 1]).is_err(),
            "cut short"
        );
        assert!(ChunkRow::decode(&[0xFF, 0xFF, 0xFF]).is_err(), "not a row");
        assert!(
            ChunkRow::decode(&[0xFF; 11]).is_err(),
            "a varint longer than a u64"
        );
    }

    #[test]
    fn varints_round_trip_at_their_edges() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut bytes = Vec::new();
            put_varint(&mut bytes, value);
            assert_eq!(bytes, postcard::to_allocvec(&value).unwrap(), "{value}");
            let mut reader = VarintReader { bytes: &bytes };
            assert_eq!(reader.take("value", u64::MAX).unwrap(), value);
            assert!(reader.bytes.is_empty());
        }
        let mut reader = VarintReader {
            bytes: &[0x80, 0x80, 0x04],
        };
        assert!(
            reader.take("u16", u64::from(u16::MAX)).is_err(),
            "65,536 is no u16"
        );
        let mut reader = VarintReader {
            bytes: &[0x81, 0x00],
        };
        assert!(reader.take("value", u64::MAX).is_err(), "1 in two bytes");
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
                        let encoded = row.encode();
                        prop_assert_eq!(
                            &encoded,
                            &crate::records::encode(&legacy_of(row)),
                            "the stored bytes changed"
                        );
                        let decoded = ChunkRow::decode(&encoded).unwrap();
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

        /// A stored row with one byte changed, cut short or lengthened is refused or decodes
        /// to a valid row (never a panic), and an accepted row encodes to the bytes it came
        /// from: random bytes rarely get past the run count, damaged rows reach every check.
        #[test]
        fn damaged_rows_are_refused_or_valid(
            changes in proptest::collection::vec(change_strategy(), 1..8),
            position in any::<proptest::sample::Index>(),
            damage in 0u8..3,
            byte in any::<u8>(),
        ) {
            let mut row: Option<ChunkRow> = None;
            for (start, references) in &changes {
                row = ChunkRow::with_blocks(row.as_ref(), *start, references);
            }
            let Some(row) = row else { return Ok(()); };
            let mut bytes = row.encode();
            let index = position.index(bytes.len());
            match damage {
                0 => bytes[index] = byte,
                1 => bytes.truncate(index),
                _ => bytes.insert(index, byte),
            }
            if let Ok(decoded) = ChunkRow::decode(&bytes) {
                prop_assert!(decoded.check().is_ok());
                prop_assert_eq!(decoded.encode(), bytes);
            }
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
