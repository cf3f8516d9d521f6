//! The node's state store: one RocksDB instance in the node's state directory holding every
//! container's state-machine index (inodes, directory entries, block references), the device
//! allocator bitmap, and the Raft vote and purge marks.
//!
//! Owns: RocksDB options and the two write paths.
//! - State-machine applies are written **without the RocksDB WAL**: the Raft log on the device is
//!   the WAL. After a crash RocksDB comes back at its last flush, which is always a prefix of the
//!   applies, and Raft replays the rest from the log. The container's applied log id is written
//!   in the same batch as the data, so the two can never disagree.
//! - Raft's vote and purge marks are written **with the WAL and synced**, because Raft requires
//!   them durable before it acts on them. They live under their own keys, so recovering them from
//!   the WAL never mixes with the unlogged state rows.
//!
//! Invariant: a flush (checkpoint) happens only after the device has been flushed, so a flushed
//! block reference never points at data that is not yet durable (see `storage.rs`).

use std::path::Path;

use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;

use crate::error::{NodeError, NodeResult};
use crate::records::decode;

/// The memtable is made large so RocksDB never flushes on its own between our checkpoints (an
/// unplanned flush could persist block references before the device flush). Checkpoints run
/// long before this fills: see `CHECKPOINT_*` in `node.rs`.
const MEMTABLE_SIZE_BYTES: usize = 512 << 20;

#[derive(Debug)]
pub struct StateStore {
    database: DB,
}

impl StateStore {
    pub fn open(path: &Path) -> NodeResult<Self> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_write_buffer_size(MEMTABLE_SIZE_BYTES);
        options.set_max_write_buffer_number(4);
        options.set_min_write_buffer_number_to_merge(1);
        options.set_max_background_jobs(2);
        options.set_keep_log_file_num(4);
        options.set_paranoid_checks(true);
        // Insert hints: for each 17-byte key prefix (tag, container, inode: one file's block
        // rows, one directory's entries) the memtable remembers where it last inserted, so a
        // file written in order costs no search of the skip list per block row. Searching it
        // (key comparisons, `FindSpliceForLevel`) was about a fifth of the node's CPU while
        // writing sequentially; with hints the node spent 0.99-1.14 s of CPU per GiB written
        // through FUSE against 1.09-1.29 s (`seqw.sh`, six alternating runs each, 2026-12-05).
        // RocksDB uses hints only when memtable writes are not concurrent; the state store's
        // writes are batches from a few apply tasks, which RocksDB's write group still
        // batches. Keys shorter than the prefix are inserted without a hint. The options are
        // set by name because the C API has no setter for the hint extractor.
        // No preallocation of the files RocksDB writes: it sizes a flush's file by the memtable
        // limit (over 500 MiB here) whatever the few MiB a checkpoint flushes, and on a nearly
        // full state filesystem that preallocation took the room the node had kept for the
        // flush itself (`state_space.rs`; `tests/full_state_filesystem.rs`).
        let options = options
            .get_options_from_string(
                "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.17;\
                 allow_concurrent_memtable_write=false;allow_fallocate=false",
            )
            .map_err(|source| NodeError::rocksdb("options", source))?;
        let database = DB::open(&options, path)
            .map_err(|source| NodeError::rocksdb(format!("open {}", path.display()), source))?;
        Ok(Self { database })
    }

    pub fn get_raw(&self, key: &[u8]) -> NodeResult<Option<Vec<u8>>> {
        self.database
            .get(key)
            .map_err(|source| NodeError::rocksdb("get", source))
    }

    pub fn get<T: DeserializeOwned>(&self, key: &[u8], what: &str) -> NodeResult<Option<T>> {
        match self.get_raw(key)? {
            Some(bytes) => Ok(Some(decode(&bytes, what)?)),
            None => Ok(None),
        }
    }

    /// Writes a state-machine batch: no WAL, no sync (the Raft log is the WAL).
    pub fn write_unlogged(&self, batch: WriteBatch) -> NodeResult<()> {
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        self.database
            .write_opt(batch, &options)
            .map_err(|source| NodeError::rocksdb("write state batch", source))
    }

    /// Writes Raft metadata that must be durable before Raft acts on it: WAL and fsync.
    pub fn write_synced(&self, batch: WriteBatch) -> NodeResult<()> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.database
            .write_opt(batch, &options)
            .map_err(|source| NodeError::rocksdb("write synced batch", source))
    }

    /// Flushes every memtable to SST files and waits: makes all unlogged writes durable.
    pub fn flush(&self) -> NodeResult<()> {
        self.database
            .flush()
            .map_err(|source| NodeError::rocksdb("flush", source))?;
        self.database
            .flush_wal(true)
            .map_err(|source| NodeError::rocksdb("flush wal", source))
    }

    /// Calls `visit` for each (key, value) with `start <= key < end`, in key order, until it
    /// returns false or `limit` rows were visited.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        visit: impl FnMut(&[u8], &[u8]) -> NodeResult<bool>,
    ) -> NodeResult<()> {
        let iterator = self
            .database
            .iterator(IteratorMode::From(start, Direction::Forward));
        visit_range(iterator, end, limit, visit)
    }

    /// A consistent, read-only view of the whole store as it is now; writes made after this call
    /// are invisible to it. Holding a view pins RocksDB's old versions, so keep it short-lived.
    pub fn view(&self) -> StateView<'_> {
        StateView {
            snapshot: self.database.snapshot(),
        }
    }

    /// Collects (key, value) with `start <= key < end`, at most `limit` rows.
    pub fn scan_collect(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> NodeResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut rows = Vec::new();
        self.scan(start, end, limit, |key, value| {
            rows.push((key.to_vec(), value.to_vec()));
            Ok(true)
        })?;
        Ok(rows)
    }
}

/// A point-in-time view of the state store (a RocksDB snapshot).
pub struct StateView<'store> {
    snapshot: rocksdb::Snapshot<'store>,
}

impl std::fmt::Debug for StateView<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("StateView").finish_non_exhaustive()
    }
}

impl StateView<'_> {
    pub fn get_raw(&self, key: &[u8]) -> NodeResult<Option<Vec<u8>>> {
        self.snapshot
            .get(key)
            .map_err(|source| NodeError::rocksdb("get from a view", source))
    }

    /// As [`StateStore::scan`], over the view.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        visit: impl FnMut(&[u8], &[u8]) -> NodeResult<bool>,
    ) -> NodeResult<()> {
        let iterator = self
            .snapshot
            .iterator(IteratorMode::From(start, Direction::Forward));
        visit_range(iterator, end, limit, visit)
    }
}

fn visit_range<Key: AsRef<[u8]>, Value: AsRef<[u8]>>(
    iterator: impl Iterator<Item = Result<(Key, Value), rocksdb::Error>>,
    end: &[u8],
    limit: usize,
    mut visit: impl FnMut(&[u8], &[u8]) -> NodeResult<bool>,
) -> NodeResult<()> {
    for (visited, item) in iterator.enumerate() {
        if visited >= limit {
            break;
        }
        let (key, value) = item.map_err(|source| NodeError::rocksdb("scan", source))?;
        if key.as_ref() >= end {
            break;
        }
        if !visit(key.as_ref(), value.as_ref())? {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The insert hints are set by name, so a typo or a RocksDB that renamed them would fail
    /// only here: RocksDB records the options it really runs with in its OPTIONS file.
    #[test]
    fn the_store_runs_with_insert_hints_and_keeps_every_row() {
        let directory = tempfile::tempdir().unwrap();
        let store = StateStore::open(directory.path()).unwrap();
        let mut batch = WriteBatch::default();
        // Rows of two files, interleaved and out of order, and a key shorter than the prefix.
        for block in [3u64, 1, 2, 0] {
            for inode in [9u64, 8] {
                batch.put(crate::keys::block(1, inode, block), block.to_be_bytes());
            }
        }
        batch.put(b"short", b"row");
        store.write_unlogged(batch).unwrap();
        let rows = store.scan_collect(&[0], &[0xFF], usize::MAX).unwrap();
        assert_eq!(rows.len(), 9);
        assert!(
            rows.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "rows out of order"
        );
        store.flush().unwrap();
        let options_file = std::fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("OPTIONS-")
            })
            .max()
            .expect("RocksDB writes an OPTIONS file");
        let options = std::fs::read_to_string(options_file).unwrap();
        assert!(
            options.contains("memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.17")
        );
        assert!(options.contains("allow_concurrent_memtable_write=false"));
    }
}
