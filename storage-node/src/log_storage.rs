//! `ContainerLog`: openraft's log storage for one container, on the device log store.
//!
//! Owns: the mapping of one Raft group onto the shared device log (`ballast_device::LogStore`,
//! where many groups' appends are group-committed into one write), the vote and purge marks
//! (RocksDB, WAL + fsync), and an in-memory cache of recent entries.
//!
//! Design:
//! - Every mutation of the group's log (append, truncate, purge) goes through one writer task per
//!   container, so they reach the device in the order openraft issued them even though `append`
//!   returns before the entries are durable (openraft is told through `LogFlushed`).
//! - When the device log is full, the writer asks the node for a checkpoint (which lets openraft
//!   purge) and retries with a bounded wait, instead of failing the group: a full log is
//!   back-pressure, not a fatal error.
//! - Entries are appended *buffered*: written to the device but flushed only by the next
//!   durability barrier (`StorageNode::flush_log`, called by `fsync`, or a checkpoint). Like a
//!   local filesystem's journal, a write is durable once fsync returns, and the barrier is group
//!   committed: one device flush covers every container's appends. A process crash keeps
//!   buffered appends; a power loss may lose the unflushed tail, never anything fsync'd.
//! - A *replicated* group (more than one member) appends durably instead (RWF_DSYNC, still
//!   group-committed with every other group's appends): a follower's acknowledgement counts
//!   towards a commit, and Raft is only safe if what a majority acknowledged survives any crash.
//!   A group becomes replicated when the node starts it so, or when its log carries a
//!   membership with more than one node; it never goes back.
//! - Recently appended entries stay in memory (bounded by bytes) so that applying them right
//!   after commit does not read them back from the device.
//!
//! Invariant: the cache never holds an entry that the device log does not (eventually) hold in
//! the same order: cache updates happen in the same order as writer operations.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_device::{DeviceError, LogRecord, LogStore};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError};
use rocksdb::WriteBatch;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::keys;
use crate::records::encode;
use crate::state_store::StateStore;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Bytes of recent entries kept in memory per container.
const ENTRY_CACHE_BYTES_MAX: usize = 64 << 20;
/// Queued log operations per container before `append` waits.
const WRITER_QUEUE_DEPTH: usize = 256;
/// How long an append waits for log space (checkpoints free it) before failing.
const LOG_FULL_WAIT_MS_MAX: u64 = 120_000;
const LOG_FULL_RETRY_INTERVAL_MS: u64 = 10;

enum LogOperation {
    Append {
        records: Vec<LogRecord>,
        durable: bool,
        callback: LogFlushed<TypeConfig>,
    },
    Truncate {
        index_from: u64,
        done: oneshot::Sender<Result<(), DeviceError>>,
    },
    Purge {
        index_upto: u64,
        term: u64,
        done: oneshot::Sender<Result<(), DeviceError>>,
    },
}

#[derive(Default)]
struct EntryCache {
    entries: BTreeMap<u64, (Entry, usize)>,
    size_bytes: usize,
}

impl EntryCache {
    fn insert(&mut self, entry: Entry, size_bytes: usize) {
        let index = entry.log_id.index;
        if let Some((_, old)) = self.entries.insert(index, (entry, size_bytes)) {
            self.size_bytes -= old;
        }
        self.size_bytes += size_bytes;
        while self.size_bytes > ENTRY_CACHE_BYTES_MAX {
            let Some((_, (_, evicted))) = self.entries.pop_first() else {
                break;
            };
            self.size_bytes -= evicted;
        }
    }

    fn remove_from(&mut self, index_from: u64) {
        for (_, (_, size)) in self.entries.split_off(&index_from) {
            self.size_bytes -= size;
        }
    }

    fn remove_upto(&mut self, index_upto: u64) {
        let kept = self.entries.split_off(&(index_upto + 1));
        for (_, (_, size)) in std::mem::replace(&mut self.entries, kept) {
            self.size_bytes -= size;
        }
    }
}

struct Shared {
    container_id: u64,
    log_store: LogStore,
    state: Arc<crate::storage::NodeStorage>,
    cache: Mutex<EntryCache>,
    writer: mpsc::Sender<LogOperation>,
    /// Appends are durable before they are acknowledged (see the module doc).
    durable: AtomicBool,
}

/// Log storage of one container; cheap to clone (the reader is a clone).
#[derive(Clone)]
pub struct ContainerLog {
    shared: Arc<Shared>,
}

impl ContainerLog {
    /// Starts the container's log writer. `checkpoint_wanted` is notified when the device log is
    /// full, so the node can checkpoint and let openraft purge.
    pub fn new(
        container_id: u64,
        log_store: LogStore,
        state: Arc<crate::storage::NodeStorage>,
        checkpoint_wanted: Arc<Notify>,
        replicated: bool,
    ) -> Self {
        let (writer, queue) = mpsc::channel(WRITER_QUEUE_DEPTH);
        tokio::spawn(run_writer(
            container_id,
            log_store.clone(),
            queue,
            checkpoint_wanted,
        ));
        Self {
            shared: Arc::new(Shared {
                container_id,
                log_store,
                state,
                cache: Mutex::new(EntryCache::default()),
                writer,
                durable: AtomicBool::new(replicated),
            }),
        }
    }

    fn state_store(&self) -> &StateStore {
        &self.shared.state.state
    }

    // openraft's StorageError is large by design; it is the trait's error type.
    #[allow(clippy::result_large_err)]
    fn read_log_id(&self, tag: u8, what: &str) -> Result<Option<LogId>, StorageError> {
        self.state_store()
            .get::<LogId>(
                &keys::container_singleton(tag, self.shared.container_id),
                what,
            )
            .map_err(|error| StorageIOError::read_logs(&error).into())
    }

    async fn send(&self, operation: LogOperation) -> Result<(), StorageError> {
        self.shared.writer.send(operation).await.map_err(|_| {
            StorageIOError::write_logs(&std::io::Error::other("log writer stopped")).into()
        })
    }
}

async fn run_writer(
    container_id: u64,
    log_store: LogStore,
    mut queue: mpsc::Receiver<LogOperation>,
    checkpoint_wanted: Arc<Notify>,
) {
    while let Some(operation) = queue.recv().await {
        match operation {
            LogOperation::Append {
                records,
                durable,
                callback,
            } => {
                let mut result = Ok(());
                // One device request holds at most a segment; a follower may receive a batch of
                // large entries in one go, so split it (order is kept: chunks go one by one).
                for chunk in split_records(records, log_store.request_length_bytes_max() / 2) {
                    result =
                        append_with_retry(&log_store, chunk, durable, &checkpoint_wanted).await;
                    if result.is_err() {
                        break;
                    }
                }
                if let Err(error) = &result {
                    tracing::error!(container = container_id, %error, "log append failed");
                }
                callback.log_io_completed(result.map_err(std::io::Error::other));
            }
            LogOperation::Truncate { index_from, done } => {
                let result = log_store
                    .append(vec![LogRecord::Truncate {
                        group: container_id,
                        index_from,
                    }])
                    .await;
                let _ = done.send(result);
            }
            LogOperation::Purge {
                index_upto,
                term,
                done,
            } => {
                let result = log_store
                    .append(vec![LogRecord::Purge {
                        group: container_id,
                        index_upto,
                        term,
                    }])
                    .await;
                let _ = done.send(result);
            }
        }
    }
}

/// Bytes a log record adds beyond its payload (generous: headers, index, term, group).
const RECORD_OVERHEAD_BYTES: u64 = 64;

/// Splits records into runs whose estimated encoded size stays under `chunk_bytes_max` (a single
/// larger record travels alone; the log store then refuses it with a clear error).
fn split_records(records: Vec<LogRecord>, chunk_bytes_max: u64) -> Vec<Vec<LogRecord>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut chunk_bytes = 0u64;
    for record in records {
        let record_bytes = match &record {
            LogRecord::Entry { payload, .. } | LogRecord::RetainedEntry { payload, .. } => {
                payload.len() as u64
            }
            _ => 0,
        } + RECORD_OVERHEAD_BYTES;
        if !chunk.is_empty() && chunk_bytes + record_bytes > chunk_bytes_max {
            chunks.push(std::mem::take(&mut chunk));
            chunk_bytes = 0;
        }
        chunk_bytes += record_bytes;
        chunk.push(record);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// Appends one chunk, waiting (bounded) for checkpoints to free space when the log is full.
async fn append_with_retry(
    log_store: &LogStore,
    records: Vec<LogRecord>,
    durable: bool,
    checkpoint_wanted: &Notify,
) -> Result<(), DeviceError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(LOG_FULL_WAIT_MS_MAX);
    // Shared, so a retry does not copy the payloads (up to megabytes per entry).
    let records = std::sync::Arc::new(records);
    loop {
        let attempt = log_store.append_shared(records.clone(), durable).await;
        match attempt {
            Err(DeviceError::LogFull { .. }) if tokio::time::Instant::now() < deadline => {
                checkpoint_wanted.notify_one();
                tokio::time::sleep(Duration::from_millis(LOG_FULL_RETRY_INTERVAL_MS)).await;
            }
            other => return other,
        }
    }
}

fn range_bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&end) => end + 1,
        Bound::Excluded(&end) => end,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for ContainerLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = range_bounds(&range);
        if start >= end {
            return Ok(Vec::new());
        }
        // Entries below the cache come from the device; the rest from the cache.
        let cached: Vec<Entry> = {
            let cache = self.shared.cache.lock().expect("cache lock");
            cache
                .entries
                .range(start..end)
                .map(|(_, (entry, _))| entry.clone())
                .collect()
        };
        let device_end = cached
            .first()
            .map(|entry| entry.log_id.index)
            .unwrap_or(end);
        let mut entries = Vec::new();
        if start < device_end {
            let stored = self
                .shared
                .log_store
                .read_entries(self.shared.container_id, start, device_end)
                .await
                .map_err(|error| StorageError::from(StorageIOError::read_logs(&error)))?;
            for stored_entry in stored {
                let entry: Entry =
                    postcard::from_bytes(&stored_entry.payload).map_err(|error| {
                        StorageError::from(StorageIOError::read_log_at_index(
                            stored_entry.index,
                            &error,
                        ))
                    })?;
                if entry.log_id.index != stored_entry.index {
                    // The record's checksum held but its content names another index: a bug or
                    // a misdirected write. Refuse it rather than feed Raft the wrong entry.
                    let message = format!(
                        "log entry stored at index {} decodes as index {}",
                        stored_entry.index, entry.log_id.index
                    );
                    tracing::error!(container = self.shared.container_id, "{message}");
                    let error = std::io::Error::other(message);
                    return Err(
                        StorageIOError::read_log_at_index(stored_entry.index, &error).into(),
                    );
                }
                entries.push(entry);
            }
            if entries
                .last()
                .map(|entry| entry.log_id.index + 1)
                .unwrap_or(start)
                != device_end
            {
                // A gap between device and cache: return only the contiguous prefix.
                return Ok(entries);
            }
        }
        entries.extend(cached);
        Ok(entries)
    }
}

/// How long a purge waits for the snapshot it relies on to become durable.
const PURGE_SNAPSHOT_WAIT_MS_MAX: u64 = 2_000;

impl ContainerLog {
    /// The last log id of the durable snapshot (checkpoint or installed snapshot).
    #[allow(clippy::result_large_err)]
    fn durable_snapshot(&self) -> Result<Option<LogId>, StorageError> {
        let meta = self
            .state_store()
            .get::<openraft::SnapshotMeta<crate::types::NodeId, crate::types::RaftNode>>(
                &keys::container_singleton(keys::TAG_SNAPSHOT, self.shared.container_id),
                "snapshot meta",
            )
            .map_err(|error| StorageError::from(StorageIOError::read_snapshot(None, &error)))?;
        Ok(meta.and_then(|meta| meta.last_log_id))
    }

    /// `wanted`, or the durable snapshot's log id if that is lower (after a bounded wait), or
    /// nothing when no more than what is already purged is covered.
    async fn purge_point(&self, wanted: LogId) -> Result<Option<LogId>, StorageError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(PURGE_SNAPSHOT_WAIT_MS_MAX);
        loop {
            let snapshot = self.durable_snapshot()?;
            if snapshot.map(|log_id| log_id.index) >= Some(wanted.index) {
                return Ok(Some(wanted));
            }
            if tokio::time::Instant::now() >= deadline {
                let purged = self.read_log_id(keys::TAG_PURGED, "purged log id")?;
                tracing::warn!(container = self.shared.container_id, wanted = %wanted,
                    snapshot = ?snapshot, "purging only what the durable snapshot covers");
                return Ok(snapshot.filter(|snapshot| Some(*snapshot) > purged));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl RaftLogStorage<TypeConfig> for ContainerLog {
    type LogReader = ContainerLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.read_log_id(keys::TAG_PURGED, "purged log id")?;
        let cached_last = {
            let cache = self.shared.cache.lock().expect("cache lock");
            cache
                .entries
                .last_key_value()
                .map(|(_, (entry, _))| entry.log_id)
        };
        let last_log_id = match cached_last {
            Some(log_id) => Some(log_id),
            None => match self
                .shared
                .log_store
                .group_state(self.shared.container_id)
                .last
            {
                Some((_, index)) if Some(index) > last_purged_log_id.map(|log_id| log_id.index) => {
                    let mut reader = self.clone();
                    let entries = reader.try_get_log_entries(index..=index).await?;
                    entries
                        .first()
                        .map(|entry| entry.log_id)
                        .or(last_purged_log_id)
                }
                _ => last_purged_log_id,
            },
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put(
            keys::container_singleton(keys::TAG_VOTE, self.shared.container_id),
            encode(vote),
        );
        self.state_store()
            .write_synced(batch)
            .map_err(|error| StorageIOError::write_vote(&error).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.state_store()
            .get::<Vote>(
                &keys::container_singleton(keys::TAG_VOTE, self.shared.container_id),
                "vote",
            )
            .map_err(|error| StorageIOError::read_vote(&error).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing it only means re-deriving the commit point after a restart.
        let mut batch = WriteBatch::default();
        batch.put(
            keys::container_singleton(keys::TAG_COMMITTED, self.shared.container_id),
            encode(&committed),
        );
        self.state_store()
            .write_unlogged(batch)
            .map_err(|error| StorageIOError::write_logs(&error).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .state_store()
            .get::<Option<LogId>>(
                &keys::container_singleton(keys::TAG_COMMITTED, self.shared.container_id),
                "committed log id",
            )
            .map_err(|error| StorageError::from(StorageIOError::read_logs(&error)))?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut records = Vec::new();
        {
            let mut cache = self.shared.cache.lock().expect("cache lock");
            for entry in entries {
                if let openraft::EntryPayload::Membership(membership) = &entry.payload {
                    if membership.nodes().count() > 1 {
                        self.shared.durable.store(true, Ordering::Release);
                    }
                }
                let payload = postcard::to_allocvec(&entry).map_err(|error| {
                    StorageError::from(StorageIOError::write_log_entry(entry.log_id, &error))
                })?;
                let size = payload.len();
                records.push(LogRecord::Entry {
                    group: self.shared.container_id,
                    index: entry.log_id.index,
                    term: entry.log_id.leader_id.term,
                    payload,
                });
                cache.insert(entry, size);
            }
        }
        if records.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let durable = self.shared.durable.load(Ordering::Acquire);
        self.send(LogOperation::Append {
            records,
            durable,
            callback,
        })
        .await
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.shared
            .cache
            .lock()
            .expect("cache lock")
            .remove_from(log_id.index);
        let (done, wait) = oneshot::channel();
        self.send(LogOperation::Truncate {
            index_from: log_id.index,
            done,
        })
        .await?;
        wait.await
            .map_err(|_| {
                StorageError::from(StorageIOError::write_logs(&std::io::Error::other(
                    "log writer stopped",
                )))
            })?
            .map_err(|error| StorageIOError::write_logs(&error).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Never purge past the durable snapshot: openraft may ask to purge what a snapshot being
        // installed covers before that install is durable, and a crash in between would leave a
        // purged log with no state to stand for it (openraft refuses to start on
        // "purged > snapshot"). Wait a little for the install, then purge only what is covered.
        let Some(log_id) = self.purge_point(log_id).await? else {
            return Ok(());
        };
        // The purge mark is durable before any space is reused.
        let mut batch = WriteBatch::default();
        batch.put(
            keys::container_singleton(keys::TAG_PURGED, self.shared.container_id),
            encode(&log_id),
        );
        self.state_store()
            .write_synced(batch)
            .map_err(|error| StorageError::from(StorageIOError::write_logs(&error)))?;
        self.shared
            .cache
            .lock()
            .expect("cache lock")
            .remove_upto(log_id.index);
        let (done, wait) = oneshot::channel();
        self.send(LogOperation::Purge {
            index_upto: log_id.index,
            term: log_id.leader_id.term,
            done,
        })
        .await?;
        wait.await
            .map_err(|_| {
                StorageError::from(StorageIOError::write_logs(&std::io::Error::other(
                    "log writer stopped",
                )))
            })?
            .map_err(|error| StorageIOError::write_logs(&error).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, payload_bytes: usize) -> LogRecord {
        LogRecord::Entry {
            group: 1,
            index,
            term: 1,
            payload: vec![0; payload_bytes],
        }
    }

    #[test]
    fn chunks_keep_order_and_stay_under_the_limit() {
        let records: Vec<LogRecord> = (1..=10).map(|index| entry(index, 1000)).collect();
        let chunks = split_records(records, 3_000);
        let indexes: Vec<u64> = chunks
            .iter()
            .flatten()
            .map(|record| match record {
                LogRecord::Entry { index, .. } => *index,
                _ => 0,
            })
            .collect();
        assert_eq!(indexes, (1..=10).collect::<Vec<_>>());
        assert!(
            chunks.iter().all(|chunk| chunk.len() == 2),
            "{}",
            chunks.len()
        );
        // A record larger than the limit goes alone.
        let chunks = split_records(vec![entry(1, 10), entry(2, 5000), entry(3, 10)], 3_000);
        assert_eq!(chunks.len(), 3);
    }
}
