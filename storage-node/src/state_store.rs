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

use rocksdb::{
    Direction, ErrorKind, IteratorMode, Options, ReadOptions, ReadTier, WriteBatch, WriteOptions,
    DB,
};
use serde::de::DeserializeOwned;

use crate::error::{NodeError, NodeResult};
use crate::records::decode;

/// The memtable is made large so RocksDB never flushes on its own between our checkpoints (an
/// unplanned flush could persist block references before the device flush). Checkpoints run
/// long before this fills: see `CHECKPOINT_*` in `node.rs`.
const MEMTABLE_SIZE_BYTES: usize = 512 << 20;

/// Default [`StateStore::open`] block cache: the block map of about 180 GiB of file data
/// written in large pieces (a GiB of such data has about 1.4 MB of chunk rows; it had 6 MB of
/// per-block rows before 2026-12-06).
pub const BLOCK_CACHE_BYTES_DEFAULT: usize = 256 << 20;
/// Smallest and largest block cache the node accepts.
pub const BLOCK_CACHE_BYTES_MIN: usize = 8 << 20;
pub const BLOCK_CACHE_BYTES_MAX: usize = 64 << 30;

#[derive(Debug)]
pub struct StateStore {
    database: DB,
}

impl StateStore {
    /// Opens (creating if missing) the store at `path` with the default block cache.
    pub fn open(path: &Path) -> NodeResult<Self> {
        Self::open_with_block_cache(path, BLOCK_CACHE_BYTES_DEFAULT)
    }

    /// Opens the store with a block cache of `block_cache_bytes` (clamped to
    /// [`BLOCK_CACHE_BYTES_MIN`]..=[`BLOCK_CACHE_BYTES_MAX`]).
    pub fn open_with_block_cache(path: &Path, block_cache_bytes: usize) -> NodeResult<Self> {
        let block_cache_bytes =
            block_cache_bytes.clamp(BLOCK_CACHE_BYTES_MIN, BLOCK_CACHE_BYTES_MAX);
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_write_buffer_size(MEMTABLE_SIZE_BYTES);
        options.set_max_write_buffer_number(4);
        options.set_min_write_buffer_number_to_merge(1);
        options.set_max_background_jobs(2);
        options.set_keep_log_file_num(4);
        options.set_paranoid_checks(true);
        // Insert hints: for each 17-byte key prefix (tag, container, inode: one file's chunk
        // rows, one directory's entries) the memtable remembers where it last inserted, so a
        // file written in order costs no search of the skip list per row. (Measured below with
        // one row per 4 KiB block, before chunk rows cut the rows 256-fold.) Searching it
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
        // The block cache is sized by the node (RocksDB's own default is 32 MiB), and a flush
        // puts the blocks it writes into it (`prepopulate_block_cache=kFlushOnly`): a read of
        // recently written data finds its block rows in memory, until a compaction rewrites
        // them into files whose blocks are not cached (RocksDB prepopulates on flush only; the
        // binding has no compaction listener to warm the cache). Without that, the
        // first read of a file after its rows were flushed fetched every 4 KiB block of rows
        // from the state filesystem with a synchronous `pread` on a runtime thread: a cold
        // 1 GiB read through FUSE made about 880 such reads, beside 1,250 of data (block
        // tracepoints, 2026-12-06). The C API has no setter for the prepopulation, so both go
        // by name.
        let options = options
            .get_options_from_string(format!(
                "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.17;\
                 allow_concurrent_memtable_write=false;allow_fallocate=false;\
                 block_based_table_factory={{block_cache={block_cache_bytes};\
                 prepopulate_block_cache=kFlushOnly}}"
            ))
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

    /// As [`Self::scan`], but from memory only (memtables and the block cache): never waits for
    /// the state filesystem. Returns false, having visited a prefix of the rows or none, when a
    /// row it needed is not in memory; the caller then scans again with [`Self::scan`], off the
    /// runtime's threads. RocksDB also starts no readahead for such a scan.
    pub fn scan_in_memory(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        visit: impl FnMut(&[u8], &[u8]) -> NodeResult<bool>,
    ) -> NodeResult<bool> {
        let mut read_options = ReadOptions::default();
        read_options.set_read_tier(ReadTier::BlockCache);
        let iterator = self
            .database
            .iterator_opt(IteratorMode::From(start, Direction::Forward), read_options);
        match visit_range(iterator, end, limit, visit) {
            Ok(()) => Ok(true),
            Err(NodeError::Rocksdb { source, .. }) if source.kind() == ErrorKind::Incomplete => {
                Ok(false)
            }
            Err(other) => Err(other),
        }
    }

    /// The capacity of the block cache, as RocksDB reports it (`None`: it reports none).
    pub fn block_cache_capacity_bytes(&self) -> NodeResult<Option<u64>> {
        self.database
            .property_int_value("rocksdb.block-cache-capacity")
            .map_err(|source| NodeError::rocksdb("block cache capacity", source))
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
        assert!(options.contains("prepopulate_block_cache=kFlushOnly"));
    }

    /// Rows a flush wrote are in the block cache (the prepopulation), so an in-memory scan
    /// finds them; after a reopen the cache is empty and the same scan says so instead of
    /// reading the state filesystem, and a normal scan still finds every row.
    #[test]
    fn flushed_rows_stay_in_memory_until_the_store_is_reopened() {
        let directory = tempfile::tempdir().unwrap();
        let rows = |store: &StateStore, in_memory: bool| {
            let mut keys = Vec::new();
            let complete = if in_memory {
                store
                    .scan_in_memory(&[0], &[0xFF], usize::MAX, |key, _| {
                        keys.push(key.to_vec());
                        Ok(true)
                    })
                    .unwrap()
            } else {
                store
                    .scan(&[0], &[0xFF], usize::MAX, |key, _| {
                        keys.push(key.to_vec());
                        Ok(true)
                    })
                    .unwrap();
                true
            };
            (complete, keys.len())
        };
        {
            let store = StateStore::open_with_block_cache(directory.path(), 16 << 20).unwrap();
            assert_eq!(store.block_cache_capacity_bytes().unwrap(), Some(16 << 20));
            let mut batch = WriteBatch::default();
            for block in 0..10_000u64 {
                batch.put(crate::keys::block(1, 7, block), [0u8; 12]);
            }
            store.write_unlogged(batch).unwrap();
            assert_eq!(rows(&store, true), (true, 10_000), "rows in the memtable");
            store.flush().unwrap();
            assert_eq!(
                rows(&store, true),
                (true, 10_000),
                "rows prepopulated at flush"
            );
        }
        let store = StateStore::open_with_block_cache(directory.path(), 1).unwrap();
        assert_eq!(
            store.block_cache_capacity_bytes().unwrap(),
            Some(BLOCK_CACHE_BYTES_MIN as u64),
            "clamped to the minimum"
        );
        let (complete, _) = rows(&store, true);
        assert!(!complete, "a reopened store has nothing cached");
        assert_eq!(rows(&store, false), (true, 10_000));
        assert_eq!(
            rows(&store, true),
            (true, 10_000),
            "the normal scan filled the cache"
        );
    }
}
