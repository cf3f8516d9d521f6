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
//! - Large aligned writes are *detached* (`detached.rs`): the writer reserves blocks, writes the
//!   data there (all of an append's data in flight together), and only then appends a small
//!   retained record naming the blocks and their checksums; the apply installs those blocks
//!   instead of writing the data a second time. When the group is replicated, such an append
//!   is made durable by one device flush after the data and the record are written, not by
//!   writing each with `RWF_DSYNC` (two synchronous writes in series; and on a block device an
//!   `RWF_DSYNC` write is a FUA write, durable for its own range only).
//!   Reading such an entry back rebuilds it from the blocks, verifying every checksum. The
//!   record's pin is registered before openraft hears of the append, and ends after a truncate
//!   or purge is durable in the log, so no block a live record names is ever reused.
//!
//! - *Early acknowledgement.* openraft 0.9's core waits for each append's callback before it
//!   takes the next client write, so a callback that waits for the device makes every write of
//!   the container wait for the one before it; under a sequential write each small record
//!   waited in the disk's queue behind megabytes of data. A *buffered* append (no guard, not
//!   replicated: the appends whose durability waits for the next barrier anyway) is therefore
//!   acknowledged when it is queued, while at most [`EARLY_ACKNOWLEDGED_BYTES_MAX`] bytes are
//!   acknowledged and unwritten; the writer then appends everything queued in one device
//!   append. openraft may commit such an entry (a single voter's own acknowledgement is a
//!   quorum), but nothing observable runs ahead of the device: the state machine applies an
//!   entry only once it is written ([`WrittenLog`]), so a client is answered exactly when it
//!   was before; a read of the log from the device waits the same way; the commit point is
//!   stored only up to what is written (after a crash openraft re-applies up to it); and an
//!   append that fails after its acknowledgement fails every apply that waits for it (the
//!   Raft core stops, as it did when the callback carried the error), after which nothing is
//!   acknowledged early.
//!
//! Invariant: the cache never holds an entry that the device log does not (eventually) hold in
//! the same order: cache updates happen in the same order as writer operations. An entry is
//! applied only once the device log holds it (written, flushed or not).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_device::{DeviceError, LogRecord, LogStore};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError};
use rocksdb::WriteBatch;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::detached::{block_checksums, detachable_data, prewritten_of, DetachedRecord, Pin};
use crate::keys;
use crate::prewritten::Prewritten;
use crate::records::{encode, BlockRef};
use crate::state_store::StateStore;
use crate::storage::NodeStorage;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Bytes of recent entries kept in memory per container.
const ENTRY_CACHE_BYTES_MAX: usize = 64 << 20;
/// Queued log operations per container before `append` waits.
const WRITER_QUEUE_DEPTH: usize = 256;
/// Appends the writer takes from its queue into one device append.
const APPEND_BATCH_OPERATIONS_MAX: usize = 64;
/// Bytes of entries acknowledged to openraft before they are written (see "Early
/// acknowledgement" in the module doc); an append past it is acknowledged once written. Well
/// under the entry cache, so such entries are always still cached when they are applied.
const EARLY_ACKNOWLEDGED_BYTES_MAX: usize = 32 << 20;
const _: () = assert!(EARLY_ACKNOWLEDGED_BYTES_MAX * 2 <= ENTRY_CACHE_BYTES_MAX);
/// How long an append waits for log space (checkpoints free it) before failing.
const LOG_FULL_WAIT_MS_MAX: u64 = 120_000;
const LOG_FULL_RETRY_INTERVAL_MS: u64 = 10;

/// An entry on its way to the device log.
enum PendingRecord {
    /// Encoded; appended as it is.
    Ready(LogRecord),
    /// A detachable write: the writer puts its data in blocks and appends a retained record.
    Detachable(Entry),
}

impl PendingRecord {
    /// The bytes the entry cache counts for this record's entry.
    fn cached_bytes(&self) -> usize {
        match self {
            PendingRecord::Ready(LogRecord::Entry { payload, .. }) => payload.len(),
            PendingRecord::Ready(_) => 0,
            PendingRecord::Detachable(entry) => crate::detached::write_data_length_bytes(entry),
        }
    }

    /// The log index of the entry this record holds (0 for records that hold none).
    fn index(&self) -> u64 {
        match self {
            PendingRecord::Ready(LogRecord::Entry { index, .. }) => *index,
            PendingRecord::Ready(_) => 0,
            PendingRecord::Detachable(entry) => entry.log_id.index,
        }
    }
}

/// Tells whoever appended that the append is written (openraft's `LogFlushed`, or a test's).
type Acknowledgement = Box<dyn FnOnce(std::io::Result<()>) + Send>;

enum LogOperation {
    Append {
        records: Vec<PendingRecord>,
        durable: bool,
        /// `None` when the appender was told already (an early acknowledgement).
        acknowledgement: Option<Acknowledgement>,
        /// Bytes of this append counted in [`Shared::early_acknowledged_bytes`] (0 if none).
        early_acknowledged_bytes: usize,
        /// When openraft handed the entries over (for the `ballast::timing` events).
        queued_at: std::time::Instant,
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
    /// Live [`DurableAppendGuard`]s: while any exists, every append is durable too.
    durable_append_requests: AtomicU64,
    /// Writes at least this long (and aligned) are detached; 0: never.
    detached_write_bytes_min: u64,
    /// How far the log is written, and what openraft was told early (see [`WrittenLog`]).
    written: Arc<watch::Sender<Written>>,
    /// Bytes of entries acknowledged early and not yet written
    /// ([`EARLY_ACKNOWLEDGED_BYTES_MAX`]).
    early_acknowledged_bytes: Arc<AtomicUsize>,
    /// Tests only ([`ContainerLog::hold_appends`]); shared with the writer, which reads it.
    #[cfg_attr(not(test), allow(dead_code))]
    append_gate: AppendGate,
}

/// Once set, each batch of appends takes a permit of it before it goes to the device.
type AppendGate = Arc<std::sync::OnceLock<Arc<tokio::sync::Semaphore>>>;

/// How far a container's log is on the device (written, flushed or not), and how far openraft
/// was told it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Written {
    /// The last index written (`None`: nothing yet).
    upto_index: Option<u64>,
    /// The last index acknowledged to openraft before it was written.
    early_upto_index: Option<u64>,
    /// An append failed: what was acknowledged early may never be written.
    failed: bool,
}

impl Written {
    /// After a truncate from `index_from`: nothing at or past it is written or acknowledged.
    fn truncate(&mut self, index_from: u64) {
        let below = index_from.checked_sub(1);
        self.upto_index = self.upto_index.min(below);
        self.early_upto_index = self.early_upto_index.min(below);
    }
}

/// Waits, for the apply and the reader, until entries acknowledged to openraft before they were
/// written are written (see "Early acknowledgement" in the module doc). Cheap to clone.
#[derive(Clone, Debug)]
pub struct WrittenLog {
    written: watch::Receiver<Written>,
}

impl WrittenLog {
    /// Returns once every entry up to `index` that was acknowledged early is written; at once
    /// for entries that were not (they were written before openraft heard of them). An error
    /// when an append failed before that or the writer stopped: an early-acknowledged entry may
    /// then never be in the log, so it must not be applied or served.
    pub async fn wait_until_written(&self, index: u64) -> Result<(), String> {
        let settled = |written: &Written| {
            written.failed
                || written.upto_index >= Some(index)
                || written.upto_index >= written.early_upto_index
        };
        let mut receiver = self.written.clone();
        let written = match receiver.wait_for(settled).await {
            Ok(written) => *written,
            Err(_) => return Err("the log writer stopped".to_owned()),
        };
        if written.failed && written.upto_index < Some(index) {
            return Err(format!(
                "log index {index} was acknowledged before it was written, and an append failed"
            ));
        }
        Ok(())
    }
}

/// See [`ContainerLog::request_durable_appends`].
pub struct DurableAppendGuard {
    shared: Arc<Shared>,
}

impl Drop for DurableAppendGuard {
    fn drop(&mut self) {
        let previous = self
            .shared
            .durable_append_requests
            .fetch_sub(1, Ordering::SeqCst);
        assert!(previous > 0, "durable append requests underflow");
    }
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
        detached_write_bytes_min: u64,
    ) -> Self {
        if let Err(error) = state.load_durable_snapshot(container_id, || {
            Self::stored_snapshot(&state.state, container_id)
        }) {
            // Nothing counts as durable then: purges wait, and purge only what a checkpoint of
            // this process makes durable.
            tracing::error!(container = container_id, %error, "reading the stored snapshot record");
        }
        let (writer, queue) = mpsc::channel(WRITER_QUEUE_DEPTH);
        // Everything already in the device log is written.
        let written = Arc::new(watch::Sender::new(Written {
            upto_index: log_store
                .group_state(container_id)
                .last
                .map(|(_, index)| index),
            ..Written::default()
        }));
        let early_acknowledged_bytes = Arc::new(AtomicUsize::new(0));
        let append_gate = Arc::new(std::sync::OnceLock::new());
        tokio::spawn(run_writer(
            Writer {
                container_id,
                log_store: log_store.clone(),
                storage: Arc::clone(&state),
                checkpoint_wanted,
                written: Arc::clone(&written),
                early_acknowledged_bytes: Arc::clone(&early_acknowledged_bytes),
                append_gate: Arc::clone(&append_gate),
            },
            queue,
        ));
        Self {
            shared: Arc::new(Shared {
                container_id,
                log_store,
                state,
                cache: Mutex::new(EntryCache::default()),
                writer,
                durable: AtomicBool::new(replicated),
                durable_append_requests: AtomicU64::new(0),
                detached_write_bytes_min,
                written,
                early_acknowledged_bytes,
                append_gate,
            }),
        }
    }

    fn state_store(&self) -> &StateStore {
        &self.shared.state.state
    }

    /// Makes every append of this log durable (flushed before it is reported) while the guard
    /// lives. A caller that needs one proposal durable takes a guard before proposing and keeps
    /// it until the proposal is answered: the proposal's entry is appended in between, so it is
    /// flushed by its own append instead of by a separate flush afterwards (one device request
    /// and two thread hand-offs fewer).
    pub fn request_durable_appends(&self) -> DurableAppendGuard {
        self.shared
            .durable_append_requests
            .fetch_add(1, Ordering::SeqCst);
        DurableAppendGuard {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Whether an append now must be durable before it is reported: always on a replicated
    /// group, and while a [`DurableAppendGuard`] lives.
    fn appends_durable(&self) -> bool {
        self.shared.durable.load(Ordering::Acquire)
            || self.shared.durable_append_requests.load(Ordering::SeqCst) > 0
    }

    /// Counts `records` as acknowledged early if that stays within
    /// [`EARLY_ACKNOWLEDGED_BYTES_MAX`]; returns the bytes counted (0: acknowledge once
    /// written). A record of no bytes still counts one, so the writer gives back what was taken.
    fn reserve_early_acknowledgement(&self, records: &[PendingRecord]) -> usize {
        let bytes = records
            .iter()
            .map(PendingRecord::cached_bytes)
            .sum::<usize>()
            .max(1);
        let counter = &self.shared.early_acknowledged_bytes;
        let reserved = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            (current + bytes <= EARLY_ACKNOWLEDGED_BYTES_MAX).then_some(current + bytes)
        });
        if reserved.is_ok() {
            bytes
        } else {
            0
        }
    }

    /// Stages `entries` and queues their append. `acknowledge` is called once they are written
    /// (flushed too when appends are durable), or at once when the append may be acknowledged
    /// early (module doc, "Early acknowledgement").
    // openraft's StorageError is large by design; it is the trait's error type.
    #[allow(clippy::result_large_err)]
    async fn queue_append(
        &self,
        entries: impl IntoIterator<Item = Entry>,
        acknowledge: Acknowledgement,
    ) -> Result<(), StorageError> {
        let records = self.stage(entries)?;
        if records.is_empty() {
            acknowledge(Ok(()));
            return Ok(());
        }
        let durable = self.appends_durable();
        let early_acknowledged_bytes = if durable || self.shared.written.borrow().failed {
            0
        } else {
            self.reserve_early_acknowledgement(&records)
        };
        if early_acknowledged_bytes == 0 {
            return self
                .send(LogOperation::Append {
                    records,
                    durable,
                    acknowledgement: Some(acknowledge),
                    early_acknowledged_bytes: 0,
                    queued_at: std::time::Instant::now(),
                })
                .await;
        }
        let last_index = records.last().map(PendingRecord::index);
        // Queued first, so the writer (the only one to give the bytes back) owns them.
        self.send(LogOperation::Append {
            records,
            durable,
            acknowledgement: None,
            early_acknowledged_bytes,
            queued_at: std::time::Instant::now(),
        })
        .await?;
        self.shared.written.send_modify(|written| {
            written.early_upto_index = written.early_upto_index.max(last_index);
        });
        acknowledge(Ok(()));
        Ok(())
    }

    /// What the state machine waits on before it applies entries of this log.
    pub fn written_log(&self) -> WrittenLog {
        WrittenLog {
            written: self.shared.written.subscribe(),
        }
    }

    /// Whether `guard` was taken on this log (and not on one it replaced).
    pub fn guarded_by(&self, guard: &DurableAppendGuard) -> bool {
        Arc::ptr_eq(&self.shared, &guard.shared)
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

/// What a container's log writer works with.
struct Writer {
    container_id: u64,
    log_store: LogStore,
    storage: Arc<NodeStorage>,
    checkpoint_wanted: Arc<Notify>,
    written: Arc<watch::Sender<Written>>,
    early_acknowledged_bytes: Arc<AtomicUsize>,
    /// Tests only: each batch of appends takes a permit before it goes to the device.
    append_gate: AppendGate,
}

/// A record ready for the device, with the pin to register once it is there.
struct Prepared {
    record: LogRecord,
    pin: Option<(u64, Pin)>,
}

impl Writer {
    /// Appends the records of `batch` in order, each run of appends of the same durability as
    /// one device append, then tells the appenders not acknowledged early and moves the written
    /// mark. A durable append is written as it was alone (a buffered one queued beside it is
    /// not made durable with it: a durable run of detached writes costs a write and a flush in
    /// series where a durable run of inline records costs one synchronous write). After a
    /// failure nothing more of the batch is written, nothing more is acknowledged early, and
    /// every apply that waits on an early-acknowledged entry fails.
    async fn append_batch(&self, batch: Vec<QueuedAppend>) {
        if let Some(gate) = self.append_gate.get() {
            // Tests hold appends here; a closed gate lets everything through.
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
        let mut failure: Option<(std::io::ErrorKind, String)> = None;
        let mut batch = batch.into_iter().peekable();
        while let Some(first) = batch.next() {
            let durable = first.durable;
            let mut queued_at = first.queued_at;
            let mut records = first.records;
            let mut acknowledgements: Vec<Acknowledgement> =
                first.acknowledgement.into_iter().collect();
            let mut early_acknowledged_bytes = first.early_acknowledged_bytes;
            while let Some(next) = batch.next_if(|next| next.durable == durable) {
                queued_at = queued_at.min(next.queued_at);
                records.extend(next.records);
                acknowledgements.extend(next.acknowledgement);
                early_acknowledged_bytes += next.early_acknowledged_bytes;
            }
            let last_index = records.last().map(PendingRecord::index);
            if failure.is_none() {
                match self.append(records, durable, queued_at).await {
                    Ok(()) => self.written.send_modify(|written| {
                        written.upto_index = written.upto_index.max(last_index);
                    }),
                    Err(error) => {
                        tracing::error!(container = self.container_id, %error, "log append failed");
                        self.written.send_modify(|written| written.failed = true);
                        failure = Some((error.kind(), error.to_string()));
                    }
                }
            }
            self.early_acknowledged_bytes
                .fetch_sub(early_acknowledged_bytes, Ordering::AcqRel);
            for acknowledge in acknowledgements {
                acknowledge(match &failure {
                    None => Ok(()),
                    Some((kind, message)) => Err(std::io::Error::new(*kind, message.clone())),
                });
            }
        }
    }

    /// Appends `records` in order: detachable writes first get their data written to reserved
    /// blocks. Each chunk's pins are registered once the chunk is in the log; after a failure,
    /// the reservations of everything not appended are given back.
    async fn append(
        &self,
        records: Vec<PendingRecord>,
        durable: bool,
        queued_at: std::time::Instant,
    ) -> std::io::Result<()> {
        // Detached data and its records are written plainly; a durable append then flushes the
        // device once (module doc), which covers both.
        let flush_at_end = durable
            && records
                .iter()
                .any(|record| matches!(record, PendingRecord::Detachable(_)));
        let durable = durable && !flush_at_end;
        let started = std::time::Instant::now();
        let record_count = records.len();
        let first_index = records.first().map(PendingRecord::index);
        let prepared = self.detach(records).await.map_err(std::io::Error::other)?;
        let detached = started.elapsed();
        // One device request holds at most a segment; a follower may receive a batch of large
        // entries in one go, so split it (order is kept: chunks go one by one).
        let mut chunks =
            split_records(prepared, self.log_store.request_length_bytes_max() / 2).into_iter();
        while let Some(chunk) = chunks.next() {
            let (records, pins): (Vec<LogRecord>, Vec<Option<(u64, Pin)>>) = chunk
                .into_iter()
                .map(|prepared| (prepared.record, prepared.pin))
                .unzip();
            let result =
                append_with_retry(&self.log_store, records, durable, &self.checkpoint_wanted).await;
            match result {
                Ok(()) => {
                    for (index, pin) in pins.into_iter().flatten() {
                        self.storage
                            .register_detached(self.container_id, index, pin);
                    }
                }
                Err(error) => {
                    let unappended = pins
                        .into_iter()
                        .flatten()
                        .chain(chunks.flatten().filter_map(|prepared| prepared.pin));
                    for (_, pin) in unappended {
                        self.storage.release_reservation(&pin.extents);
                    }
                    return Err(std::io::Error::other(error));
                }
            }
        }
        let appended = started.elapsed();
        if flush_at_end {
            // A failure here leaves records in the log that were never acknowledged: like an
            // append that failed half-way, the group's Raft core stops on the error.
            self.log_store
                .flush()
                .await
                .map_err(std::io::Error::other)?;
        }
        tracing::debug!(
            target: "ballast::timing",
            container = self.container_id,
            record_count,
            first_index,
            durable,
            flush_at_end,
            queue_us = (started - queued_at).as_micros() as u64,
            detach_us = detached.as_micros() as u64,
            append_us = (appended - detached).as_micros() as u64,
            flush_us = (started.elapsed() - appended).as_micros() as u64,
            "log append"
        );
        Ok(())
    }

    /// Encodes every record; detachable writes get blocks reserved and their data written (all
    /// in flight together). A write that finds no room is logged inline instead.
    async fn detach(
        &self,
        records: Vec<PendingRecord>,
    ) -> Result<Vec<Prepared>, crate::error::NodeError> {
        enum Slot {
            Ready(LogRecord),
            Reserved {
                entry: Entry,
                extents: Vec<ballast_device::Extent>,
                /// The checksums of what the proposer already wrote there (`prewritten.rs`).
                prewritten_checksums: Option<Vec<u32>>,
            },
        }
        let mut slots = Vec::with_capacity(records.len());
        let mut reserved_failure = None;
        for record in records {
            let entry = match record {
                PendingRecord::Ready(record) => {
                    slots.push(Slot::Ready(record));
                    continue;
                }
                PendingRecord::Detachable(entry) => entry,
            };
            let data =
                detachable_data(&entry, 1).expect("only detachable writes are pending as such");
            let data_length = data.len();
            if let Some(taken) = prewritten_of(&entry).and_then(Prewritten::take) {
                // Written before the proposal; its checksums become the record's (below).
                let block_count: u64 = taken.extents.iter().map(|extent| extent.block_count).sum();
                assert_eq!(
                    block_count * ballast_device::BLOCK_SIZE_BYTES as u64,
                    data_length as u64,
                    "prewritten blocks cover the write's data"
                );
                slots.push(Slot::Reserved {
                    entry,
                    extents: taken.extents,
                    prewritten_checksums: Some(taken.checksums),
                });
                continue;
            }
            let reservation = self
                .storage
                .reserve_detached((data_length / ballast_device::BLOCK_SIZE_BYTES) as u64);
            let slot = match reservation {
                Ok(Some(extents)) => Ok(Slot::Reserved {
                    entry,
                    extents,
                    prewritten_checksums: None,
                }),
                Ok(None) => inline_record(self.container_id, &entry).map(Slot::Ready),
                Err(error) => Err(error),
            };
            match slot {
                Ok(slot) => slots.push(slot),
                // Stop here; what was reserved so far is given back below.
                Err(error) => {
                    reserved_failure = Some(error);
                    break;
                }
            }
        }
        let reserved = || {
            slots.iter().filter_map(|slot| match slot {
                Slot::Reserved {
                    entry,
                    extents,
                    prewritten_checksums,
                } => Some((entry, extents, prewritten_checksums.is_some())),
                Slot::Ready(_) => None,
            })
        };
        let writes = reserved()
            .filter(|(_, _, written)| !written)
            .map(|(entry, extents, _)| {
                let data = detachable_data(entry, 1).expect("checked above");
                self.storage.write_extents(extents, data)
            });
        let written = futures::future::join_all(writes).await;
        let failure = reserved_failure.or(written.into_iter().find_map(Result::err));
        if let Some(error) = failure {
            for (_, extents, _) in reserved() {
                self.storage.release_reservation(extents);
            }
            return Err(error);
        }
        Ok(slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Ready(record) => Prepared { record, pin: None },
                Slot::Reserved {
                    entry,
                    extents,
                    prewritten_checksums,
                } => {
                    let data = detachable_data(&entry, 1).expect("checked above");
                    let checksums = match prewritten_checksums {
                        // The prewrite computed them from this very buffer (the annotation
                        // travels inside the command it describes, and `Bytes` is immutable),
                        // so a second pass over 1 MiB only re-proves that: about 5 % of the
                        // node's CPU per byte written. Test builds still check it; the apply
                        // checks the record against the entry's data again in every build.
                        Some(prewritten_checksums) => {
                            debug_assert_eq!(
                                block_checksums(data),
                                prewritten_checksums,
                                "the data of index {} is not what was prewritten",
                                entry.log_id.index
                            );
                            prewritten_checksums
                        }
                        None => block_checksums(data),
                    };
                    let index = entry.log_id.index;
                    let term = entry.log_id.leader_id.term;
                    let payload = DetachedRecord::new(&entry, &extents, checksums.clone()).encode();
                    Prepared {
                        record: LogRecord::RetainedEntry {
                            group: self.container_id,
                            index,
                            term,
                            payload,
                        },
                        pin: Some((
                            index,
                            Pin {
                                term,
                                extents,
                                checksums,
                                claimed: false,
                            },
                        )),
                    }
                }
            })
            .collect())
    }
}

/// The ordinary log record of `entry`: the whole entry, encoded.
fn inline_record(container_id: u64, entry: &Entry) -> Result<LogRecord, crate::error::NodeError> {
    let payload = postcard::to_allocvec(entry)
        .map_err(|source| crate::error::NodeError::codec("encode a log entry", source))?;
    Ok(LogRecord::Entry {
        group: container_id,
        index: entry.log_id.index,
        term: entry.log_id.leader_id.term,
        payload,
    })
}

/// One append taken from the queue.
struct QueuedAppend {
    records: Vec<PendingRecord>,
    durable: bool,
    acknowledgement: Option<Acknowledgement>,
    early_acknowledged_bytes: usize,
    queued_at: std::time::Instant,
}

async fn run_writer(writer: Writer, mut queue: mpsc::Receiver<LogOperation>) {
    let container_id = writer.container_id;
    let log_store = writer.log_store.clone();
    // An operation taken while gathering appends, to run after them (order is kept).
    let mut held = None;
    loop {
        let operation = match held.take() {
            Some(operation) => operation,
            None => match queue.recv().await {
                Some(operation) => operation,
                None => return,
            },
        };
        match operation {
            LogOperation::Append {
                records,
                durable,
                acknowledgement,
                early_acknowledged_bytes,
                queued_at,
            } => {
                // The appends queued behind this one go to the device with it: entries
                // acknowledged early arrive faster than one device append each.
                let mut batch = vec![QueuedAppend {
                    records,
                    durable,
                    acknowledgement,
                    early_acknowledged_bytes,
                    queued_at,
                }];
                while batch.len() < APPEND_BATCH_OPERATIONS_MAX {
                    match queue.try_recv() {
                        Ok(LogOperation::Append {
                            records,
                            durable,
                            acknowledgement,
                            early_acknowledged_bytes,
                            queued_at,
                        }) => batch.push(QueuedAppend {
                            records,
                            durable,
                            acknowledgement,
                            early_acknowledged_bytes,
                            queued_at,
                        }),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                writer.append_batch(batch).await;
            }
            LogOperation::Truncate { index_from, done } => {
                let result = log_store
                    .append(vec![LogRecord::Truncate {
                        group: container_id,
                        index_from,
                    }])
                    .await;
                if result.is_ok() {
                    writer
                        .written
                        .send_modify(|written| written.truncate(index_from));
                }
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
fn split_records(records: Vec<Prepared>, chunk_bytes_max: u64) -> Vec<Vec<Prepared>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut chunk_bytes = 0u64;
    for record in records {
        let record_bytes = match &record.record {
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
            // An entry acknowledged early is read from the device only once it is there (it is
            // normally still cached then: `EARLY_ACKNOWLEDGED_BYTES_MAX`).
            self.written_log()
                .wait_until_written(device_end - 1)
                .await
                .map_err(|error| {
                    StorageError::from(StorageIOError::read_logs(&std::io::Error::other(error)))
                })?;
            let _timing = DeviceReadTiming {
                container_id: self.shared.container_id,
                entry_count: device_end - start,
                started: std::time::Instant::now(),
            };
            let stored = self
                .shared
                .log_store
                .read_entries(self.shared.container_id, start, device_end)
                .await
                .map_err(|error| StorageError::from(StorageIOError::read_logs(&error)))?;
            for stored_entry in stored {
                let entry: Entry = if stored_entry.retained {
                    self.rebuild_detached(&stored_entry.payload, stored_entry.index)
                        .await?
                } else {
                    postcard::from_bytes(&stored_entry.payload).map_err(|error| {
                        StorageError::from(StorageIOError::read_log_at_index(
                            stored_entry.index,
                            &error,
                        ))
                    })?
                };
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

/// Logs (at debug, target `ballast::timing`) how long a read of entries from the device took,
/// when dropped: replication reads them there once they have left the entry cache.
struct DeviceReadTiming {
    container_id: u64,
    entry_count: u64,
    started: std::time::Instant,
}

impl Drop for DeviceReadTiming {
    fn drop(&mut self) {
        tracing::debug!(
            target: "ballast::timing",
            container = self.container_id,
            entry_count = self.entry_count,
            read_us = self.started.elapsed().as_micros() as u64,
            "log entries read from the device"
        );
    }
}

impl ContainerLog {
    /// Puts `entries` in the cache and turns them into records for the writer.
    #[allow(clippy::result_large_err)]
    fn stage(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Vec<PendingRecord>, StorageError> {
        let mut records = Vec::new();
        {
            let mut cache = self.shared.cache.lock().expect("cache lock");
            for entry in entries {
                if let openraft::EntryPayload::Membership(membership) = &entry.payload {
                    if membership.nodes().count() > 1 {
                        self.shared.durable.store(true, Ordering::Release);
                    }
                }
                if let Some(data) = detachable_data(&entry, self.shared.detached_write_bytes_min) {
                    // Cloning shares the data (`Bytes`) with the cache.
                    let size = data.len();
                    records.push(PendingRecord::Detachable(entry.clone()));
                    cache.insert(entry, size);
                    continue;
                }
                let record = inline_record(self.shared.container_id, &entry).map_err(|error| {
                    StorageError::from(StorageIOError::write_log_entry(entry.log_id, &error))
                })?;
                let size = match &record {
                    LogRecord::Entry { payload, .. } => payload.len(),
                    _ => 0,
                };
                records.push(PendingRecord::Ready(record));
                cache.insert(entry, size);
            }
        }
        Ok(records)
    }

    /// The entry of a retained (detached) record: its data read back from the blocks it names,
    /// every block verified against the record's checksum. A mismatch is an error, never data.
    // openraft's StorageError is large by design; it is the trait's error type.
    #[allow(clippy::result_large_err)]
    async fn rebuild_detached(&self, payload: &[u8], index: u64) -> Result<Entry, StorageError> {
        let fail = |message: String| {
            tracing::error!(container = self.shared.container_id, index, "{message}");
            StorageError::from(StorageIOError::read_log_at_index(
                index,
                &std::io::Error::other(message),
            ))
        };
        let record = DetachedRecord::decode(payload, index).map_err(fail)?;
        let references: Vec<BlockRef> = record
            .device_blocks()
            .into_iter()
            .zip(&record.checksums)
            .map(|(device_block, &checksum)| BlockRef {
                device_block,
                checksum,
            })
            .collect();
        let context = format!(
            "detached data of container {} log index {index}",
            self.shared.container_id
        );
        let data = self
            .shared
            .state
            .read_verified(&references, &context)
            .await
            .map_err(|error| fail(error.to_string()))?;
        Ok(record.into_entry(bytes::Bytes::from(data)))
    }
}

/// How long a purge waits for the snapshot it relies on to become durable.
const PURGE_SNAPSHOT_WAIT_MS_MAX: u64 = 2_000;

impl ContainerLog {
    /// The last log id of the stored snapshot record (checkpoint or installed snapshot), which
    /// may not be durable yet (storage rule 6): read only when the log opens.
    fn stored_snapshot(
        state: &StateStore,
        container_id: u64,
    ) -> crate::error::NodeResult<Option<LogId>> {
        let meta = state
            .get::<openraft::SnapshotMeta<crate::types::NodeId, crate::types::RaftNode>>(
                &keys::container_singleton(keys::TAG_SNAPSHOT, container_id),
                "snapshot meta",
            )?;
        Ok(meta.and_then(|meta| meta.last_log_id))
    }

    /// The last log id of the durable snapshot (checkpoint or installed snapshot; storage rule
    /// 6).
    #[allow(clippy::result_large_err)]
    fn durable_snapshot(&self) -> Result<Option<LogId>, StorageError> {
        Ok(self.shared.state.durable_snapshot(self.shared.container_id))
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
        // A commit point past what is written is not stored: after a crash openraft would
        // re-apply entries up to it, and an entry acknowledged early may not be in the log. A
        // commit point older than the applied one is fine (openraft starts from the applied).
        let written_upto = self.shared.written.borrow().upto_index;
        if committed.map(|log_id| log_id.index) > written_upto {
            return Ok(());
        }
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
        self.queue_append(
            entries,
            Box::new(move |result| callback.log_io_completed(result)),
        )
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
            .map_err(|error| StorageError::from(StorageIOError::write_logs(&error)))?;
        // The truncate is durable: the records it removed can never come back, so their blocks
        // may be reused.
        self.shared
            .state
            .unpin_detached_from(self.shared.container_id, log_id.index);
        Ok(())
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
            .map_err(|error| StorageError::from(StorageIOError::write_logs(&error)))?;
        // The purge is durable (see the truncate above).
        self.shared
            .state
            .unpin_detached_upto(self.shared.container_id, log_id.index);
        Ok(())
    }
}

#[cfg(test)]
impl ContainerLog {
    /// Appends `entries` as the writer does, without openraft's flush callback (which only
    /// openraft can make); for tests.
    pub(crate) async fn append_now(&self, entries: Vec<Entry>) -> std::io::Result<()> {
        let records = self.stage(entries).map_err(std::io::Error::other)?;
        let last_index = records.last().map(PendingRecord::index);
        let writer = Writer {
            container_id: self.shared.container_id,
            log_store: self.shared.log_store.clone(),
            storage: Arc::clone(&self.shared.state),
            checkpoint_wanted: Arc::new(Notify::new()),
            written: Arc::clone(&self.shared.written),
            early_acknowledged_bytes: Arc::clone(&self.shared.early_acknowledged_bytes),
            append_gate: Arc::default(),
        };
        writer
            .append(records, self.appends_durable(), std::time::Instant::now())
            .await?;
        self.shared.written.send_modify(|written| {
            written.upto_index = written.upto_index.max(last_index);
        });
        Ok(())
    }

    /// Appends `entries` through the writer, as openraft's `append` does; `acknowledge` is
    /// called as openraft's callback would be.
    pub(crate) async fn append_acknowledged(
        &self,
        entries: Vec<Entry>,
        acknowledge: impl FnOnce(std::io::Result<()>) + Send + 'static,
    ) -> Result<(), StorageError> {
        self.queue_append(entries, Box::new(acknowledge)).await
    }

    /// From now on every batch of appends waits for a permit of the returned gate before it
    /// goes to the device (none at first); for tests.
    pub(crate) fn hold_appends(&self) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        assert!(
            self.shared.append_gate.set(Arc::clone(&gate)).is_ok(),
            "appends are held once"
        );
        gate
    }

    /// Forgets the cached entries, so reads come from the device; for tests.
    pub(crate) fn forget_cached_entries(&self) {
        self.shared.cache.lock().expect("cache lock").remove_from(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, payload_bytes: usize) -> Prepared {
        Prepared {
            record: LogRecord::Entry {
                group: 1,
                index,
                term: 1,
                payload: vec![0; payload_bytes],
            },
            pin: None,
        }
    }

    #[test]
    fn chunks_keep_order_and_stay_under_the_limit() {
        let records: Vec<Prepared> = (1..=10).map(|index| entry(index, 1000)).collect();
        let chunks = split_records(records, 3_000);
        let indexes: Vec<u64> = chunks
            .iter()
            .flatten()
            .map(|prepared| match prepared.record {
                LogRecord::Entry { index, .. } => index,
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
