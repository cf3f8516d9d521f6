//! Detached write data: large aligned file writes whose bytes are written to data blocks once, by
//! each replica's log writer, and named by a small log record, instead of going into the log and
//! then a second time into blocks when the entry is applied.
//!
//! Owns: which entries are detachable ([`detachable_data`]), the envelope of the retained log
//! record that names the blocks ([`DetachedRecord`], payload of device log record kind 4), and
//! the pin registry ([`PinRegistry`]): which live log records name which blocks and whether their
//! apply has claimed them. `NodeStorage` keeps the registry under the allocator's mutex.
//! Must not depend on: the gRPC layer, the allocator's internals (it only passes extents).
//!
//! Invariants (`docs/architecture.md`, "Detached write data"):
//! - A record is appended only after its data is on the device (written with `RWF_DSYNC` when
//!   the group is replicated), so a record never names bytes that were not written.
//! - Every block of a record carries the CRC-32 of the data written to it; reading the record
//!   back verifies every block and refuses the entry on a mismatch.
//! - A record's blocks stay pinned while the record is live in the device log (until it is
//!   purged or truncated), so a lagging follower or a replay can always rebuild the entry.
//! - An apply claims a record's blocks at most once, and only when the data it applies has the
//!   record's checksums.

use std::collections::BTreeMap;

use ballast_device::{Extent, BLOCK_SIZE_BYTES};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::command::{Command, FilesystemCommand};
use crate::types::Entry;

/// Writes at least this long (and aligned) are detached by default; 0 turns detaching off.
pub const DETACHED_WRITE_BYTES_MIN_DEFAULT: u64 = 16 * 1024;
/// The most blocks one record names: 16 MiB, the largest write request a node accepts.
pub const DETACHED_BLOCKS_MAX: usize = 4096;
/// Detached bytes since the last checkpoint that trigger one (overwritten pinned blocks are
/// unusable until the purge that follows a checkpoint); also at most an eighth of the device.
pub const DETACHED_BYTES_PER_CHECKPOINT_MAX: u64 = 1 << 30;

/// The data of `entry` when it is a detachable write (bare or with a request id): offset and
/// length multiples of a block, length at least `length_bytes_min` (0: never) and at most
/// [`DETACHED_BLOCKS_MAX`] blocks. Such a write never merges with old block content.
pub fn detachable_data(entry: &Entry, length_bytes_min: u64) -> Option<&Bytes> {
    if length_bytes_min == 0 {
        return None;
    }
    let FilesystemCommand::Write {
        offset_bytes, data, ..
    } = write_command(entry)?
    else {
        return None;
    };
    detachable_range(*offset_bytes, data.len() as u64, length_bytes_min).then_some(data)
}

/// The length of the data of the `Write` command inside `entry` (0 for any other entry): what
/// dominates the entry's encoded size.
pub fn write_data_length_bytes(entry: &Entry) -> usize {
    match write_command(entry) {
        Some(FilesystemCommand::Write { data, .. }) => data.len(),
        _ => 0,
    }
}

/// The `Write` command inside `entry` (bare or with a request id), if it is one.
fn write_command(entry: &Entry) -> Option<&FilesystemCommand> {
    let openraft::EntryPayload::Normal(command) = &entry.payload else {
        return None;
    };
    let command = match command {
        Command::Once { command, .. } => command.as_ref(),
        other => other,
    };
    match command {
        Command::Filesystem(write @ FilesystemCommand::Write { .. }) => Some(write),
        _ => None,
    }
}

/// Whether a write of `length_bytes` at `offset_bytes` is detachable: see [`detachable_data`].
pub fn detachable_range(offset_bytes: u64, length_bytes: u64, length_bytes_min: u64) -> bool {
    let block = BLOCK_SIZE_BYTES as u64;
    length_bytes_min > 0
        && length_bytes >= length_bytes_min
        && length_bytes % block == 0
        && offset_bytes % block == 0
        && length_bytes / block <= DETACHED_BLOCKS_MAX as u64
}

/// The node-local prewritten blocks of a write entry (`prewritten.rs`), if any.
pub fn prewritten_of(entry: &Entry) -> Option<&crate::prewritten::Prewritten> {
    match write_command(entry)? {
        FilesystemCommand::Write { prewritten, .. } => Some(prewritten),
        _ => None,
    }
}

/// The write data inside `entry` (bare or with a request id), for stripping and restoring.
fn write_data_mut(entry: &mut Entry) -> Option<&mut Bytes> {
    let openraft::EntryPayload::Normal(command) = &mut entry.payload else {
        return None;
    };
    let command = match command {
        Command::Once { command, .. } => command.as_mut(),
        other => other,
    };
    match command {
        Command::Filesystem(FilesystemCommand::Write { data, .. }) => Some(data),
        _ => None,
    }
}

/// The CRC-32 of every block of `data` (a whole number of blocks).
pub fn block_checksums(data: &[u8]) -> Vec<u32> {
    assert_eq!(data.len() % BLOCK_SIZE_BYTES, 0, "data is whole blocks");
    data.chunks(BLOCK_SIZE_BYTES)
        .map(ballast_common::checksum)
        .collect()
}

/// Payload of a retained log record: the entry without its write data, where the data is, and
/// the checksum of every block. Encoded with postcard; decoded defensively (it comes from the
/// device).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetachedRecord {
    /// The entry with empty write data.
    pub entry: Entry,
    /// `(first_block, block_count)` runs holding the data, in file order.
    pub extents: Vec<(u64, u64)>,
    /// One CRC-32 per block of data, in file order.
    pub checksums: Vec<u32>,
}

impl DetachedRecord {
    /// The record of a detachable `entry` whose data was written to `extents`.
    pub fn new(entry: &Entry, extents: &[Extent], checksums: Vec<u32>) -> Self {
        let mut entry = entry.clone();
        let data = write_data_mut(&mut entry).expect("only writes are detached");
        assert_eq!(data.len(), checksums.len() * BLOCK_SIZE_BYTES);
        *data = Bytes::new();
        let record = Self {
            entry,
            extents: extents
                .iter()
                .map(|extent| (extent.first_block, extent.block_count))
                .collect(),
            checksums,
        };
        debug_assert_eq!(record.check(record.entry.log_id.index), Ok(()));
        record
    }

    pub fn encode(&self) -> Vec<u8> {
        crate::records::encode(self)
    }

    /// Decodes and checks a record stored for log index `index`.
    pub fn decode(bytes: &[u8], index: u64) -> Result<Self, String> {
        let record: Self = postcard::from_bytes(bytes)
            .map_err(|error| format!("detached record at index {index}: {error}"))?;
        record.check(index)?;
        Ok(record)
    }

    /// The record's own consistency: it names its index, holds a write with no data, and its
    /// extents cover exactly one block per checksum, within the limits.
    fn check(&self, index: u64) -> Result<(), String> {
        let fail = |reason: &str| Err(format!("detached record at index {index}: {reason}"));
        if self.entry.log_id.index != index {
            return fail(&format!("names index {}", self.entry.log_id.index));
        }
        let mut entry = self.entry.clone();
        match write_data_mut(&mut entry) {
            Some(data) if data.is_empty() => {}
            Some(_) => return fail("carries write data"),
            None => return fail("is not a write"),
        }
        if self.checksums.is_empty() || self.checksums.len() > DETACHED_BLOCKS_MAX {
            return fail(&format!("{} blocks", self.checksums.len()));
        }
        let mut block_total = 0u64;
        for &(first_block, block_count) in &self.extents {
            if block_count == 0 || first_block.checked_add(block_count).is_none() {
                return fail("has an empty or overflowing extent");
            }
            block_total = block_total.saturating_add(block_count);
        }
        if block_total != self.checksums.len() as u64 {
            return fail(&format!(
                "extents cover {block_total} blocks, checksums {}",
                self.checksums.len()
            ));
        }
        Ok(())
    }

    pub fn extents(&self) -> Vec<Extent> {
        self.extents
            .iter()
            .map(|&(first_block, block_count)| Extent {
                first_block,
                block_count,
            })
            .collect()
    }

    /// Every device block of the data, in file order.
    pub fn device_blocks(&self) -> Vec<u64> {
        self.extents
            .iter()
            .flat_map(|&(first_block, block_count)| first_block..first_block + block_count)
            .collect()
    }

    /// The full entry, with `data` (already verified against the checksums) put back.
    pub fn into_entry(mut self, data: Bytes) -> Entry {
        assert_eq!(data.len(), self.checksums.len() * BLOCK_SIZE_BYTES);
        *write_data_mut(&mut self.entry).expect("checked: a write") = data;
        self.entry
    }
}

/// The blocks a live record names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub term: u64,
    pub extents: Vec<Extent>,
    pub checksums: Vec<u32>,
    /// The apply of the record took the blocks over (they are allocated, or freed since).
    /// Unclaimed blocks are still *held* (see `ballast_device::block_store`).
    pub claimed: bool,
}

impl Pin {
    pub fn device_blocks(&self) -> Vec<u64> {
        self.extents
            .iter()
            .flat_map(|extent| extent.first_block..extent.first_block + extent.block_count)
            .collect()
    }
}

/// Names the record whose blocks an apply claims (`NodeStorage::commit_batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetachedClaim {
    pub container_id: u64,
    pub index: u64,
    pub term: u64,
}

/// What an apply may use instead of writing new blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedBlocks {
    pub claim: DetachedClaim,
    pub device_blocks: Vec<u64>,
    pub checksums: Vec<u32>,
}

/// Live detached records by `(container, index)`. Pure bookkeeping: the caller changes the
/// allocator for every pin that goes.
#[derive(Debug, Default)]
pub struct PinRegistry {
    pins: BTreeMap<(u64, u64), Pin>,
}

impl PinRegistry {
    /// Records the pin of a record just appended at `index`. An append replaces the entry at
    /// `index` and every later one (the device log's rule), so their pins are returned, to be
    /// unpinned.
    pub fn insert(&mut self, container_id: u64, index: u64, pin: Pin) -> Vec<Pin> {
        let displaced = self.remove_from(container_id, index);
        self.pins.insert((container_id, index), pin);
        displaced
    }

    /// The unclaimed pin of the record at `index` with `term`, for its apply.
    pub fn unclaimed(&self, container_id: u64, index: u64, term: u64) -> Option<&Pin> {
        self.pins
            .get(&(container_id, index))
            .filter(|pin| pin.term == term && !pin.claimed)
    }

    pub fn get_mut(&mut self, container_id: u64, index: u64) -> Option<&mut Pin> {
        self.pins.get_mut(&(container_id, index))
    }

    /// Removes the pins of records at `index_from` and later (a truncate).
    pub fn remove_from(&mut self, container_id: u64, index_from: u64) -> Vec<Pin> {
        let keys: Vec<(u64, u64)> = self
            .pins
            .range((container_id, index_from)..=(container_id, u64::MAX))
            .map(|(&key, _)| key)
            .collect();
        keys.iter()
            .filter_map(|key| self.pins.remove(key))
            .collect()
    }

    /// Removes the pins of records at `index_upto` and earlier (a purge).
    pub fn remove_upto(&mut self, container_id: u64, index_upto: u64) -> Vec<Pin> {
        let keys: Vec<(u64, u64)> = self
            .pins
            .range((container_id, 0)..=(container_id, index_upto))
            .map(|(&key, _)| key)
            .collect();
        keys.iter()
            .filter_map(|key| self.pins.remove(key))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.pins.len()
    }

    /// Blocks pinned by live records (claimed or not).
    pub fn block_count(&self) -> u64 {
        self.pins
            .values()
            .map(|pin| pin.checksums.len() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};
    use proptest::prelude::*;

    use super::*;
    use crate::deduplication::RequestId;

    fn write_entry(index: u64, offset_bytes: u64, length_bytes: usize, once: bool) -> Entry {
        let write = Command::Filesystem(FilesystemCommand::Write {
            inode: 5,
            offset_bytes,
            data: Bytes::from(vec![7u8; length_bytes]),
            now_ns: 3,
            prewritten: Default::default(),
        });
        let command = if once {
            Command::Once {
                request: RequestId {
                    session: 1,
                    sequence: index,
                    floor: 1,
                },
                command: Box::new(write),
            }
        } else {
            write
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    #[test]
    fn only_aligned_long_writes_are_detachable() {
        let minimum = DETACHED_WRITE_BYTES_MIN_DEFAULT;
        assert!(detachable_data(&write_entry(1, 0, 16384, false), minimum).is_some());
        assert!(detachable_data(&write_entry(1, 8192, 1 << 20, true), minimum).is_some());
        assert!(detachable_data(&write_entry(1, 0, 12288, false), minimum).is_none());
        assert!(detachable_data(&write_entry(1, 100, 16384, false), minimum).is_none());
        assert!(detachable_data(&write_entry(1, 0, 16385, false), minimum).is_none());
        assert!(detachable_data(&write_entry(1, 0, 16384, false), 0).is_none());
        let too_long = (DETACHED_BLOCKS_MAX + 1) * BLOCK_SIZE_BYTES;
        assert!(detachable_data(&write_entry(1, 0, too_long, false), minimum).is_none());
        let blank = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), 1),
            payload: EntryPayload::Blank,
        };
        assert!(detachable_data(&blank, minimum).is_none());
    }

    #[test]
    fn a_record_rebuilds_its_entry_and_refuses_inconsistencies() {
        let entry = write_entry(9, 4096, 5 * BLOCK_SIZE_BYTES, true);
        let data = detachable_data(&entry, 1).unwrap().clone();
        let extents = [
            Extent {
                first_block: 100,
                block_count: 2,
            },
            Extent {
                first_block: 7,
                block_count: 3,
            },
        ];
        let record = DetachedRecord::new(&entry, &extents, block_checksums(&data));
        let bytes = record.encode();
        assert!(
            bytes.len() < 200,
            "the record is small: {} bytes",
            bytes.len()
        );
        let decoded = DetachedRecord::decode(&bytes, 9).unwrap();
        assert_eq!(decoded.device_blocks(), [100, 101, 7, 8, 9]);
        assert_eq!(decoded.extents(), extents);
        assert_eq!(decoded.into_entry(data), entry);
        assert!(DetachedRecord::decode(&bytes, 10).is_err(), "wrong index");
        let mut short = record.clone();
        short.checksums.pop();
        assert!(DetachedRecord::decode(&short.encode(), 9).is_err());
        let mut empty_extent = record.clone();
        empty_extent.extents.push((3, 0));
        assert!(DetachedRecord::decode(&empty_extent.encode(), 9).is_err());
        let mut with_data = record;
        with_data.entry = entry;
        assert!(DetachedRecord::decode(&with_data.encode(), 9).is_err());
    }

    #[test]
    fn registry_follows_appends_truncates_and_purges() {
        let pin = |term| Pin {
            term,
            extents: vec![Extent {
                first_block: term,
                block_count: 1,
            }],
            checksums: vec![0],
            claimed: false,
        };
        let mut registry = PinRegistry::default();
        for index in 1..=5 {
            assert!(registry.insert(1, index, pin(1)).is_empty());
        }
        registry.insert(2, 3, pin(1));
        assert!(registry.unclaimed(1, 3, 1).is_some());
        assert!(registry.unclaimed(1, 3, 2).is_none(), "another term");
        // Appending index 4 again replaces 4 and 5.
        assert_eq!(registry.insert(1, 4, pin(2)).len(), 2);
        registry.get_mut(1, 4).unwrap().claimed = true;
        assert!(registry.unclaimed(1, 4, 2).is_none(), "claimed");
        assert_eq!(registry.remove_upto(1, 2).len(), 2);
        assert_eq!(registry.remove_from(1, 3).len(), 2);
        assert_eq!(registry.count(), 1, "the other container's pin stays");
        assert_eq!(registry.block_count(), 1);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), index in 0u64..4) {
            let _ = DetachedRecord::decode(&bytes, index);
        }

        #[test]
        fn records_round_trip(index in 1u64..1000, block_count in 1usize..64, first_block in 0u64..1_000_000, split in 0usize..64, once in any::<bool>()) {
            let entry = write_entry(index, 0, block_count * BLOCK_SIZE_BYTES, once);
            let split = (split % block_count) as u64;
            let mut extents = vec![Extent { first_block, block_count: block_count as u64 - split }];
            if split > 0 {
                extents.push(Extent { first_block: first_block + 10_000, block_count: split });
            }
            let data = detachable_data(&entry, 1).unwrap().clone();
            let record = DetachedRecord::new(&entry, &extents, block_checksums(&data));
            let decoded = DetachedRecord::decode(&record.encode(), index).unwrap();
            prop_assert_eq!(decoded.device_blocks().len(), block_count);
            prop_assert_eq!(decoded.into_entry(data), entry);
        }
    }
}
