//! `NodeStorage`: the node's two stores and the rule that keeps them consistent.
//!
//! Owns: the state store (RocksDB), the device block store, the block allocator, the apply lock
//! and checkpoints.
//!
//! Consistency rules (see `docs/architecture.md`, "What is durable when"):
//! 1. File data is copy-on-write: an apply always writes new blocks and frees the old ones
//!    *deferred*. A freed block cannot be reused before the next checkpoint, so every block
//!    referenced by the last durable RocksDB state keeps its bytes until a newer state is
//!    durable. This is what makes replaying the Raft log after a crash safe.
//! 2. An apply submits the write of its new blocks and registers them as pending
//!    (`pending_writes.rs`) before it writes the RocksDB batch that references them; it does not
//!    wait for the write. Every read of referenced blocks waits for their pending writes, and a
//!    failed block write aborts the process (the log still holds the data; replay rewrites it).
//! 3. A checkpoint, under the apply lock, waits for every pending block write, flushes the
//!    device, then RocksDB, then releases deferred frees. After it, the state is durable without
//!    the log. (A pending block can only be freed by a batch, under the apply lock, so it was
//!    registered before the checkpoint's wait and is written before its release.)
//! 4. While an [`ExportView`] exists, checkpoints keep deferred frees deferred: the view's state
//!    references blocks that later applies may free, and they must keep their bytes until the
//!    export that reads them has ended.
//! 5. Detached write data (`detached.rs`): blocks reserved for a log record are *held* and
//!    pinned; the record's apply *claims* them in `commit_batch`, in the same RocksDB batch as the
//!    rows that reference them; the pin ends when the record is purged or truncated. Pins and
//!    the allocator share one mutex, so no checkpoint can release a block between its
//!    reservation and its pin.
//! 6. The log is never purged past a snapshot record that is not durable. RocksDB is written
//!    without its WAL, so a record read back may still sit in the memtable: a checkpoint or
//!    install writes its snapshot record before the flush that makes it durable. Purges consult
//!    [`NodeStorage::durable_snapshot`] (set after that flush, and loaded from the stored record
//!    when the container's log opens, when all that is stored is durable), never the stored
//!    record. Seen in the nemesis (2026-12-05): a purge read an installed snapshot's record
//!    before its checkpoint's flush, the node was killed, and on restart openraft refused the
//!    container ("purged 9272 > snapshot 8770") on every start.
//!
//! Must not depend on: Raft types beyond log ids, the gRPC layer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ballast_device::{
    AlignedBuffer, BlockAllocator, BlockStore, DeviceError, Extent, BLOCK_SIZE_BYTES,
};
use rocksdb::WriteBatch;

use crate::buffer_pool::BufferPool;
use crate::detached::{DetachedBlocks, DetachedClaim, DetachedRecord, Pin, PinRegistry};
use crate::error::{NodeError, NodeResult};
use crate::keys;
use crate::pending_writes::PendingWrites;
use crate::prewritten::{Prewritten, ReleaseReservation};
use crate::records::BlockRef;
use crate::snapshot_spool::SpoolDirectory;
use crate::space::{BlockPromise, Shortfall, SpaceLedger};
use crate::state_store::{StateStore, StateView};
use crate::types::LogId;
use crate::write_data::WriteData;

/// The most blocks read or written by one device request (1 MiB).
pub const BLOCKS_PER_REQUEST_MAX: u64 = 256;
/// Snapshot exports a node runs at once; each reads a whole container and fills a spool file.
pub const EXPORTS_IN_FLIGHT_MAX: usize = 2;
/// Pieces of shared reads staged at once in the node's own buffers (`filesystem::read_shared`):
/// each holds a 1 MiB buffer on a 2 MiB huge page until it is copied into its slot, so this
/// bounds that memory at 64 MiB whatever the number of drivers and reads. A cold sequential
/// read keeps 5-10 in flight.
pub const STAGED_READ_PIECES_MAX: usize = 32;

pub struct NodeStorage {
    pub state: StateStore,
    pub block_store: BlockStore,
    /// The allocator and the pins of detached records, under one lock (rule 5).
    blocks: Mutex<Blocks>,
    /// Serialises state batch writes with checkpoints (see rule 3).
    apply_lock: tokio::sync::Mutex<()>,
    checksum_error_count: AtomicU64,
    checkpoint_count: AtomicU64,
    /// Live [`ExportView`]s (rule 4).
    export_view_count: AtomicUsize,
    /// Bounds concurrent exports (`EXPORTS_IN_FLIGHT_MAX`).
    export_slots: Arc<tokio::sync::Semaphore>,
    /// Bounds the pieces of shared reads staged at once (`STAGED_READ_PIECES_MAX`).
    staged_read_pieces: tokio::sync::Semaphore,
    /// Where snapshots are spooled while they are exported or received.
    pub spool: SpoolDirectory,
    /// Bytes of detached write data reserved since the last checkpoint (a checkpoint trigger).
    detached_bytes_since_checkpoint: AtomicU64,
    /// Blocks referenced by applies whose device write is still in flight (rules 2 and 3).
    pub(crate) pending_writes: Arc<PendingWrites>,
    /// Aligned buffers reused for copies of write data (`buffer_pool.rs`).
    buffer_pool: Arc<BufferPool>,
    /// Blocks promised to admitted commands (`space.rs`).
    space: Arc<SpaceLedger>,
    /// Blocks admission leaves free for the containers this node follows (`space.rs`).
    reserve_blocks: u64,
    /// Per container, the log id of the latest snapshot record known to be durable (rule 6).
    /// Entries are never removed while the process runs: at most one per container it held.
    durable_snapshots: Mutex<std::collections::HashMap<u64, LogId>>,
}

struct Blocks {
    allocator: BlockAllocator,
    pins: PinRegistry,
}

impl Blocks {
    /// Ends pins whose records left the log: held blocks (never claimed) go on the deferred
    /// list, claimed ones are allocated or deferred already.
    fn unpin(&mut self, pins: Vec<Pin>, context: &str) {
        for pin in pins {
            for extent in pin.extents {
                if let Err(error) = self.allocator.unpin(extent, !pin.claimed) {
                    tracing::error!(%error, ?extent, claimed = pin.claimed, "unpinning detached blocks ({context})");
                }
            }
        }
    }
}

/// A consistent view of the state for a snapshot export, taken between two applies. While it
/// lives, every block its state references keeps its bytes (rule 4), so the export may read
/// them without holding up applies.
pub struct ExportView<'storage> {
    storage: &'storage NodeStorage,
    pub state: StateView<'storage>,
}

impl Drop for ExportView<'_> {
    fn drop(&mut self) {
        let previous = self
            .storage
            .export_view_count
            .fetch_sub(1, Ordering::AcqRel);
        assert!(previous > 0, "export view count underflow");
    }
}

impl std::fmt::Debug for NodeStorage {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NodeStorage")
            .finish_non_exhaustive()
    }
}

impl ReleaseReservation for NodeStorage {
    fn release_reservation(&self, extents: &[Extent]) {
        NodeStorage::release_reservation(self, extents);
    }
}

impl NodeStorage {
    /// Opens the storage, restoring the allocator from the bitmap groups persisted in RocksDB.
    /// Cost: one read per 32768-block group, independent of how much data is stored.
    pub fn open(
        state: StateStore,
        block_store: BlockStore,
        block_count: u64,
        spool: SpoolDirectory,
    ) -> NodeResult<Self> {
        // Before anything reads the block map: a store of per-block rows becomes chunk rows.
        crate::block_map::convert_block_rows(&state)?;
        let mut allocator = BlockAllocator::new_empty(block_count);
        let start = vec![keys::TAG_ALLOCATOR_GROUP];
        let end = keys::prefix_end(&start);
        state.scan(&start, &end, usize::MAX, |key, value| {
            allocator
                .load_group(keys::allocator_group_index(key), value)
                .map_err(|source| NodeError::device("load allocator group", source))?;
            Ok(true)
        })?;
        // Loading marks nothing dirty that is not already persisted.
        let _ = allocator.take_dirty_groups();
        Ok(Self {
            state,
            block_store,
            blocks: Mutex::new(Blocks {
                allocator,
                pins: PinRegistry::default(),
            }),
            apply_lock: tokio::sync::Mutex::new(()),
            checksum_error_count: AtomicU64::new(0),
            checkpoint_count: AtomicU64::new(0),
            export_view_count: AtomicUsize::new(0),
            export_slots: Arc::new(tokio::sync::Semaphore::new(EXPORTS_IN_FLIGHT_MAX)),
            staged_read_pieces: tokio::sync::Semaphore::new(STAGED_READ_PIECES_MAX),
            spool,
            detached_bytes_since_checkpoint: AtomicU64::new(0),
            pending_writes: Arc::new(PendingWrites::default()),
            buffer_pool: Arc::new(BufferPool::default()),
            space: Arc::new(SpaceLedger::default()),
            reserve_blocks: crate::space::reserve_blocks(block_count),
            durable_snapshots: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The log id of `container_id`'s latest durable snapshot record (rule 6), if any.
    pub fn durable_snapshot(&self, container_id: u64) -> Option<LogId> {
        self.lock_durable_snapshots().get(&container_id).copied()
    }

    /// A snapshot record of `container_id` for `log_id` was flushed: it is durable. Never moves
    /// backwards.
    pub fn record_durable_snapshot(&self, container_id: u64, log_id: Option<LogId>) {
        let Some(log_id) = log_id else {
            return;
        };
        let mut durable = self.lock_durable_snapshots();
        let known = durable.entry(container_id).or_insert(log_id);
        if log_id.index > known.index {
            *known = log_id;
        }
    }

    /// Called when the container's log opens, with a reader of its stored snapshot record's
    /// log id: that record is durable unless this process wrote it, and then the entry made
    /// when it was flushed is kept (rule 6).
    pub fn load_durable_snapshot(
        &self,
        container_id: u64,
        stored: impl FnOnce() -> NodeResult<Option<LogId>>,
    ) -> NodeResult<()> {
        let mut durable = self.lock_durable_snapshots();
        if durable.contains_key(&container_id) {
            return Ok(());
        }
        if let Some(log_id) = stored()? {
            durable.insert(container_id, log_id);
        }
        Ok(())
    }

    fn lock_durable_snapshots(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, LogId>> {
        self.durable_snapshots
            .lock()
            .expect("durable snapshots lock")
    }

    fn lock_blocks(&self) -> std::sync::MutexGuard<'_, Blocks> {
        self.blocks.lock().expect("allocator lock")
    }

    pub fn free_block_count(&self) -> u64 {
        self.lock_blocks().allocator.free_block_count()
    }

    /// Blocks freed since the last checkpoint: free again after the next one (unless a log
    /// record or an export still needs them).
    pub fn deferred_block_count(&self) -> u64 {
        self.lock_blocks().allocator.deferred_block_count()
    }

    /// Whether this node is short of space (`space::short_of_space`): it should not take on
    /// leading more groups, whose writes it would soon refuse.
    pub fn short_of_space(&self) -> bool {
        let allocator = &self.lock_blocks().allocator;
        crate::space::short_of_space(allocator.block_count(), allocator.free_block_count())
    }

    /// Admits a command that may allocate `needed_blocks` on this node's device (`space.rs`):
    /// a promise held until the command was applied here, or the shortfall.
    pub fn promise_blocks(&self, needed_blocks: u64) -> Result<BlockPromise, Shortfall> {
        let free_blocks = self.free_block_count();
        self.space
            .promise(needed_blocks, free_blocks, self.reserve_blocks)
    }

    /// Live detached records and the blocks they pin.
    pub fn pinned_counts(&self) -> (usize, u64) {
        let blocks = self.lock_blocks();
        (blocks.pins.count(), blocks.pins.block_count())
    }

    pub fn detached_bytes_since_checkpoint(&self) -> u64 {
        self.detached_bytes_since_checkpoint.load(Ordering::Relaxed)
    }

    /// Reserves `block_count` blocks for the data of a detached record: held and pinned (rule
    /// 5). `None` when the device has no room outside the promised blocks and the reserve
    /// (`space.rs`); the caller then logs the entry inline, and the apply allocates (or, when
    /// there is truly no room, fails as a node failure).
    pub fn reserve_detached(&self, block_count: u64) -> NodeResult<Option<Vec<Extent>>> {
        let mut blocks = self.lock_blocks();
        let fits = crate::space::admits(
            block_count,
            blocks.allocator.free_block_count(),
            self.space.promised_blocks(),
            self.reserve_blocks,
        );
        if !fits {
            return Ok(None);
        }
        match blocks.allocator.hold(block_count) {
            Ok(extents) => {
                self.detached_bytes_since_checkpoint
                    .fetch_add(block_count * BLOCK_SIZE_BYTES as u64, Ordering::Relaxed);
                Ok(Some(extents))
            }
            Err(DeviceError::NoSpace { .. }) => Ok(None),
            Err(source) => Err(NodeError::device("reserve detached blocks", source)),
        }
    }

    /// Writes the data of a detachable write (`offset_bytes`, `data`; see
    /// [`crate::detached::detachable_range`]) to newly reserved blocks before it is proposed, so
    /// the container's log writer only appends the record (`prewritten.rs`). `Prewritten::none()`
    /// when the write is not detachable or the device has no room: the log writer then handles
    /// it as before. Also gives back the data as `Bytes` for the Raft entry: an aligned write's
    /// buffer is written from where it lies and becomes those bytes, with no copy
    /// (`write_data.rs`).
    ///
    /// The write runs in its own task: a caller that goes away (a cancelled request) cannot
    /// leave a device write in flight to blocks already given back.
    pub async fn prewrite(
        self: &Arc<Self>,
        offset_bytes: u64,
        data: WriteData,
        detached_write_bytes_min: u64,
    ) -> NodeResult<(Prewritten, bytes::Bytes)> {
        if !crate::detached::detachable_range(
            offset_bytes,
            data.len() as u64,
            detached_write_bytes_min,
        ) {
            return Ok((Prewritten::none(), data.into_bytes()));
        }
        let block_count = (data.len() / BLOCK_SIZE_BYTES) as u64;
        let Some(extents) = self.reserve_detached(block_count)? else {
            return Ok((Prewritten::none(), data.into_bytes()));
        };
        let storage = Arc::clone(self);
        let task = tokio::spawn(async move {
            // From the node's own copy, which nobody else can change.
            let checksums = crate::detached::block_checksums(data.as_slice());
            let written = match data {
                WriteData::Bytes(bytes) => storage
                    .write_extents(&extents, &bytes)
                    .await
                    .map(|()| bytes),
                WriteData::Aligned {
                    buffer,
                    length_bytes,
                    pool,
                } => storage
                    .write_extents_lent(&extents, buffer, length_bytes)
                    .await
                    .map(|buffer| WriteData::aligned(buffer, length_bytes, pool).into_bytes()),
            };
            match written {
                Ok(bytes) => Ok((Prewritten::new(extents, checksums, storage), bytes)),
                Err(error) => {
                    storage.release_reservation(&extents);
                    Err(error)
                }
            }
        });
        task.await
            .map_err(|error| NodeError::InvalidState(format!("prewrite task: {error}")))?
    }

    /// Writes the first `length_bytes` of `buffer` (whole blocks, exactly what `extents` hold)
    /// to `extents`, from the buffer itself: each device request is lent its window
    /// (`write_data.rs`). Gives the buffer back. Not durable on return.
    async fn write_extents_lent(
        &self,
        extents: &[Extent],
        buffer: AlignedBuffer,
        length_bytes: usize,
    ) -> NodeResult<AlignedBuffer> {
        let requests = extent_requests(extents);
        assert_eq!(
            requests
                .last()
                .map_or(0, |request| request.data_offset_bytes
                    + request.length_bytes),
            length_bytes,
            "the extents hold the write exactly"
        );
        assert!(length_bytes <= buffer.len(), "the write lies in its buffer");
        let windows: Vec<(usize, usize)> = requests
            .iter()
            .map(|request| (request.data_offset_bytes, request.length_bytes))
            .collect();
        crate::write_data::write_lent_windows(buffer, &windows, |index, window| {
            self.block_store
                .write_blocks(requests[index].first_block, window)
        })
        .await
    }

    /// Gives back a reservation whose record was never appended.
    pub fn release_reservation(&self, extents: &[Extent]) {
        let mut blocks = self.lock_blocks();
        for &extent in extents {
            if let Err(error) = blocks.allocator.unpin(extent, true) {
                tracing::error!(%error, ?extent, "releasing a detached reservation");
            }
        }
    }

    /// The pool of aligned buffers: copies of write data, whole reads (`buffer_pool.rs`).
    pub fn buffer_pool(&self) -> &Arc<BufferPool> {
        &self.buffer_pool
    }

    /// Writes `data` (whole blocks) to `extents`, in order, in pieces of at most
    /// `BLOCKS_PER_REQUEST_MAX` blocks, all in flight together. Not durable on return: the
    /// caller flushes when it needs that.
    pub async fn write_extents(&self, extents: &[Extent], data: &[u8]) -> NodeResult<()> {
        write_extents_to(&self.block_store, &self.buffer_pool, extents, data).await
    }

    /// Records the pin of a detached record once it is in the device log (before its append is
    /// reported, so before any apply can look for it).
    pub fn register_detached(&self, container_id: u64, index: u64, pin: Pin) {
        let mut blocks = self.lock_blocks();
        let displaced = blocks.pins.insert(container_id, index, pin);
        if !displaced.is_empty() {
            // openraft truncates before it overwrites, so this is not expected; handled anyway.
            tracing::warn!(
                container = container_id,
                index,
                count = displaced.len(),
                "an append replaced detached records that were not truncated"
            );
            blocks.unpin(displaced, "replaced by an append");
        }
    }

    /// The blocks of the unclaimed detached record at `(index, term)`, for its apply.
    pub fn detached_blocks(
        &self,
        container_id: u64,
        index: u64,
        term: u64,
    ) -> Option<DetachedBlocks> {
        let blocks = self.lock_blocks();
        let pin = blocks.pins.unclaimed(container_id, index, term)?;
        Some(DetachedBlocks {
            claim: DetachedClaim {
                container_id,
                index,
                term,
            },
            device_blocks: pin.device_blocks(),
            checksums: pin.checksums.clone(),
        })
    }

    /// Ends the pins of records at `index_from` and later, after a truncate is in the log.
    pub fn unpin_detached_from(&self, container_id: u64, index_from: u64) {
        let mut blocks = self.lock_blocks();
        let pins = blocks.pins.remove_from(container_id, index_from);
        blocks.unpin(pins, "truncate");
    }

    /// Ends the pins of records at `index_upto` and earlier, after a purge is in the log.
    pub fn unpin_detached_upto(&self, container_id: u64, index_upto: u64) {
        let mut blocks = self.lock_blocks();
        let pins = blocks.pins.remove_upto(container_id, index_upto);
        blocks.unpin(pins, "purge");
    }

    /// Pins again, at start-up, the blocks of every detached record still live in the log of
    /// `container_id` (rule 5). Records at or below the durable `applied_index` count as claimed
    /// (their blocks are allocated, or free since and then kept deferred); later ones become
    /// held again, for the replay to claim. A record whose blocks break that (a bug) is logged
    /// and pinned as applied, so the replay writes new blocks for it.
    pub fn repin_recovered(
        &self,
        container_id: u64,
        records: Vec<(u64, u64, DetachedRecord)>,
        applied_index: Option<u64>,
    ) {
        let mut blocks = self.lock_blocks();
        for (index, term, record) in records {
            let extents = record.extents();
            let mut applied = Some(index) <= applied_index;
            let mut pinned = Vec::new();
            for &extent in &extents {
                let mut result = blocks.allocator.pin_recovered(extent, applied);
                if result.is_err() && !applied {
                    tracing::error!(
                        container = container_id,
                        index,
                        ?extent,
                        "a detached record's blocks are in use; its replay writes new blocks"
                    );
                    // Undo the held pins of this record and pin it as applied instead.
                    for &done in &pinned {
                        if let Err(error) = blocks.allocator.unpin(done, true) {
                            tracing::error!(%error, "undoing a recovered pin");
                        }
                    }
                    pinned.clear();
                    applied = true;
                    result = blocks.allocator.pin_recovered(extent, true);
                }
                match result {
                    Ok(()) => pinned.push(extent),
                    Err(error) => {
                        tracing::error!(container = container_id, index, ?extent, %error,
                            "a recovered detached record names blocks pinned by another");
                    }
                }
            }
            let pin = Pin {
                term,
                extents: pinned,
                checksums: record.checksums,
                claimed: applied,
            };
            let displaced = blocks.pins.insert(container_id, index, pin);
            assert!(
                displaced.is_empty(),
                "recovered records come in index order"
            );
        }
    }

    pub fn checksum_error_count(&self) -> u64 {
        self.checksum_error_count.load(Ordering::Relaxed)
    }

    pub fn checkpoint_count(&self) -> u64 {
        self.checkpoint_count.load(Ordering::Relaxed)
    }

    /// Allocates `block_count` new blocks and starts writing `data` (exactly `block_count`
    /// blocks) to them. Returns the device block of each file block, in order, once the blocks
    /// are registered as pending and their write is handed to a task (rule 2), not when the
    /// write completed.
    pub async fn write_new_blocks(&self, data: AlignedBuffer) -> NodeResult<Vec<u64>> {
        assert_eq!(data.len() % BLOCK_SIZE_BYTES, 0);
        let block_count = (data.len() / BLOCK_SIZE_BYTES) as u64;
        assert!(block_count > 0);
        let permit = self.pending_writes.reserve(block_count).await;
        let extents = {
            let mut blocks = self.lock_blocks();
            match blocks.allocator.allocate(block_count) {
                Ok(extents) => extents,
                Err(DeviceError::NoSpace {
                    requested_blocks,
                    free_blocks,
                }) => {
                    // This node's failure, never a command's result (`space.rs`).
                    return Err(NodeError::DeviceFull {
                        requested_blocks,
                        free_blocks,
                    });
                }
                Err(source) => return Err(NodeError::device("allocate blocks", source)),
            }
        };
        let mut device_blocks = Vec::with_capacity(block_count as usize);
        let pending: Vec<(u64, u64)> = extents
            .iter()
            .map(|extent| (extent.first_block, extent.block_count))
            .collect();
        self.pending_writes.insert(&pending);
        let block_store = self.block_store.clone();
        let pending_writes = Arc::clone(&self.pending_writes);
        let buffer_pool = Arc::clone(&self.buffer_pool);
        let written_extents = extents.clone();
        tokio::spawn(async move {
            // One extent of one request: written from `data` itself, without a copy.
            let result = if written_extents.len() == 1
                && written_extents[0].block_count <= BLOCKS_PER_REQUEST_MAX
            {
                block_store
                    .write_blocks(written_extents[0].first_block, data)
                    .await
                    .map(|_| ())
                    .map_err(|source| NodeError::device("write blocks", source))
            } else {
                write_extents_to(&block_store, &buffer_pool, &written_extents, &data).await
            };
            if let Err(NodeError::Device {
                source: DeviceError::EngineStopped { .. },
                ..
            }) = &result
            {
                // The node is shutting down (or a test dropped its device): no checkpoint can
                // follow, and the log replays the data at the next start. Readers waiting for
                // these blocks stay waiting until the runtime ends.
                tracing::warn!(
                    ?written_extents,
                    "device engine stopped before applied blocks were written"
                );
                return;
            }
            if let Err(error) = result {
                // A state batch may already reference these blocks, and no checkpoint may
                // persist it: stop here. The data is in the Raft log; the restart replays it into
                // new blocks (the RocksDB state in memory, never flushed, is dropped).
                tracing::error!(%error, ?written_extents, "writing applied blocks failed; aborting so the log is replayed");
                std::process::abort();
            }
            pending_writes.complete(&pending);
            drop(permit);
        });
        for extent in &extents {
            device_blocks.extend(extent.first_block..extent.first_block + extent.block_count);
        }
        assert_eq!(device_blocks.len() as u64, block_count);
        Ok(device_blocks)
    }

    /// Deletes every row of `container_id` (its state, its Raft vote, commit and purge marks,
    /// its snapshot record) and frees its blocks, durably: the replica is gone from this node.
    /// Its Raft group must be stopped. Also forgets its durable snapshot: a replica added here
    /// later starts with no state, and a snapshot of the old one must not let its log purge
    /// (seen in the moves nemesis: a replica moved back to a node purged its log past a state
    /// it did not have, and openraft refused to start it).
    pub async fn drop_container_state(self: &Arc<Self>, container_id: u64) -> NodeResult<()> {
        let freed = self.container_device_blocks(container_id)?;
        let mut batch = WriteBatch::default();
        for tag in [
            keys::TAG_CONTAINER_STATE,
            keys::TAG_INODE,
            keys::TAG_DIRENT,
            keys::TAG_DIRENT_COOKIE,
            keys::TAG_CHUNK,
            keys::TAG_ORPHAN,
            keys::TAG_SESSION,
            keys::TAG_VOTE,
            keys::TAG_COMMITTED,
            keys::TAG_PURGED,
            keys::TAG_SNAPSHOT,
        ] {
            let (start, end) = keys::container_range(tag, container_id);
            batch.delete_range(start, end);
        }
        self.commit_batch(batch, &freed, None).await?;
        // Make the drop durable now, so a restart never resurrects half of it.
        self.checkpoint(|_| Ok(())).await?;
        self.lock_durable_snapshots().remove(&container_id);
        Ok(())
    }

    /// Every device block the block rows of `container_id` hold (unwritten references hold
    /// none): what dropping or replacing the container's state frees.
    pub fn container_device_blocks(&self, container_id: u64) -> NodeResult<Vec<u64>> {
        let mut device_blocks = Vec::new();
        crate::block_map::visit_container(&self.state, container_id, |_, reference| {
            device_blocks.extend(reference.written_device_block());
            Ok(())
        })?;
        Ok(device_blocks)
    }

    /// Reads the given blocks, verifying each against its checksum. Contiguous device blocks are
    /// read with one request; unwritten references read as zeros without I/O. A mismatch is an
    /// error, logged loudly; wrong bytes are never returned.
    pub async fn read_verified(
        &self,
        references: &[BlockRef],
        context: &str,
    ) -> NodeResult<Vec<u8>> {
        let Some(last) = references.len().checked_sub(1) else {
            return Ok(Vec::new());
        };
        let numbered: Vec<(u64, BlockRef)> = references
            .iter()
            .enumerate()
            .map(|(index, reference)| (index as u64, *reference))
            .collect();
        let blocks = self
            .read_file_blocks(&numbered, 0, last as u64, context)
            .await?;
        Ok(blocks.to_vec())
    }

    /// A permit to stage one piece of a shared read (`STAGED_READ_PIECES_MAX`); waits while
    /// that many are staged.
    pub(crate) async fn staged_read_piece(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.staged_read_pieces
            .acquire()
            .await
            .expect("the staged read semaphore is never closed")
    }

    /// Staged shared-read pieces that could start now without waiting.
    pub fn staged_read_pieces_free(&self) -> usize {
        self.staged_read_pieces.available_permits()
    }

    /// A buffer of `length_bytes` (whole blocks) for a read that overwrites all of it: an idle
    /// pooled one (on a huge page, stale bytes and all) at the pooled length, else a new one.
    pub(crate) fn buffer_for_whole_read(&self, length_bytes: usize) -> AlignedBuffer {
        if length_bytes == crate::buffer_pool::POOLED_BUFFER_BYTES {
            self.buffer_pool.for_whole_read()
        } else {
            AlignedBuffer::new_zeroed(length_bytes)
        }
    }

    /// Gives a buffer back to the pool (kept if its length is pooled and there is room).
    pub(crate) fn give_back_buffer(&self, buffer: AlignedBuffer) {
        self.buffer_pool.give_back(buffer);
    }

    /// The verified bytes of file blocks `first..=last`, whose block references are
    /// `references` (sorted by file block, all inside the range; a block without one is a hole
    /// and reads as zeros). One buffer, pooled when it is one device request long, with each
    /// run of consecutive device blocks read straight into its place: the answer costs no copy
    /// (2026-12-05; before, every read filled a zeroed buffer by copying each run's own).
    pub async fn read_file_blocks(
        &self,
        references: &[(u64, BlockRef)],
        first: u64,
        last: u64,
        context: &str,
    ) -> NodeResult<bytes::Bytes> {
        assert!(first <= last);
        let length_bytes = ((last - first + 1) as usize) * BLOCK_SIZE_BYTES;
        // A pooled buffer holds stale bytes: every block of it is overwritten below, by a
        // device read or with zeros.
        let buffer = self.buffer_for_whole_read(length_bytes);
        let buffer = self
            .read_file_blocks_into(references, first, last, buffer, context)
            .await?;
        Ok(crate::buffer_pool::bytes_returning_to(
            buffer,
            &self.buffer_pool,
        ))
    }

    /// [`Self::read_file_blocks`] into `buffer`, exactly the blocks' length, whose every byte
    /// is overwritten (a device read or zeros) before it is given back.
    pub(crate) async fn read_file_blocks_into(
        &self,
        references: &[(u64, BlockRef)],
        first: u64,
        last: u64,
        mut buffer: AlignedBuffer,
        context: &str,
    ) -> NodeResult<AlignedBuffer> {
        assert!(first <= last);
        assert_eq!(
            buffer.len(),
            ((last - first + 1) as usize) * BLOCK_SIZE_BYTES,
            "one buffer block per file block"
        );
        let position_bytes = |file_block: u64| ((file_block - first) as usize) * BLOCK_SIZE_BYTES;
        let mut next_block = first;
        let mut index = 0;
        while index < references.len() {
            let (file_block, reference) = references[index];
            assert!(
                (next_block..=last).contains(&file_block),
                "block references out of order or outside {first}..={last}"
            );
            buffer[position_bytes(next_block)..position_bytes(file_block)].fill(0);
            if reference.is_unwritten() {
                check_unwritten(&reference, context)?;
                buffer[position_bytes(file_block)..position_bytes(file_block + 1)].fill(0);
                next_block = file_block + 1;
                index += 1;
                continue;
            }
            let mut run = 1;
            while index + run < references.len()
                && (run as u64) < BLOCKS_PER_REQUEST_MAX
                && references[index + run].0 == file_block + run as u64
                && !references[index + run].1.is_unwritten()
                && references[index + run].1.device_block == reference.device_block + run as u64
            {
                run += 1;
            }
            self.pending_writes
                .wait_for(reference.device_block, run as u64)
                .await;
            buffer = self
                .block_store
                .read_blocks_into(
                    reference.device_block,
                    run as u32,
                    buffer,
                    (file_block - first) as usize,
                )
                .await
                .map_err(|source| {
                    NodeError::device(format!("read blocks for {context}"), source)
                })?;
            let window = position_bytes(file_block)..position_bytes(file_block + run as u64);
            self.verify_blocks(&references[index..index + run], &buffer[window], context)?;
            next_block = file_block + run as u64;
            index += run;
        }
        buffer[position_bytes(next_block)..].fill(0);
        Ok(buffer)
    }

    /// Checks each block of `buffer` (one per reference) against its reference's CRC: a
    /// mismatch is counted, logged and returned as an error, never served.
    fn verify_blocks(
        &self,
        references: &[(u64, BlockRef)],
        buffer: &[u8],
        context: &str,
    ) -> NodeResult<()> {
        assert_eq!(
            buffer.len(),
            references.len() * BLOCK_SIZE_BYTES,
            "one block per reference"
        );
        for (block, (_, reference)) in buffer.chunks(BLOCK_SIZE_BYTES).zip(references) {
            let actual = ballast_common::checksum(block);
            if actual != reference.checksum {
                self.checksum_error_count.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    device_block = reference.device_block,
                    expected = reference.checksum,
                    actual,
                    "checksum mismatch reading {context}: data on the device is corrupt; \
                     refusing to serve it"
                );
                return Err(NodeError::ChecksumMismatch(format!(
                    "{context}: device block {} expected crc {:#010x}, found {:#010x}",
                    reference.device_block, reference.checksum, actual
                )));
            }
        }
        Ok(())
    }

    /// Writes a state batch under the apply lock, together with the blocks it stops
    /// referencing (freed deferred) and every allocator group changed so far. Freeing here, under
    /// the lock, guarantees no checkpoint can persist a "free" bit while the durable state still
    /// references the block.
    ///
    /// Known weakness: a group changed by another container's in-flight allocation may be
    /// persisted before that container's references; a crash in that window leaks those blocks
    /// (allocated, unreferenced). It never corrupts. A free-space audit is future work.
    ///
    /// `claim`: the apply uses the blocks of its detached record (rule 5); they become allocated
    /// in this batch.
    pub async fn commit_batch(
        &self,
        batch: WriteBatch,
        freed_device_blocks: &[u64],
        claim: Option<DetachedClaim>,
    ) -> NodeResult<()> {
        let _guard = self.apply_lock.lock().await;
        self.commit_batch_locked(batch, freed_device_blocks, claim)
    }

    /// [`Self::commit_batch`] of a batch that `prepare` builds, with the blocks it frees, from
    /// the state as it is under the apply lock (nothing changes it between the two).
    pub async fn commit_prepared(
        &self,
        prepare: impl FnOnce() -> NodeResult<(WriteBatch, Vec<u64>)>,
    ) -> NodeResult<()> {
        let _guard = self.apply_lock.lock().await;
        let (batch, freed_device_blocks) = prepare()?;
        self.commit_batch_locked(batch, &freed_device_blocks, None)
    }

    /// The body of [`Self::commit_batch`]; the caller holds the apply lock.
    fn commit_batch_locked(
        &self,
        mut batch: WriteBatch,
        freed_device_blocks: &[u64],
        claim: Option<DetachedClaim>,
    ) -> NodeResult<()> {
        {
            let mut guard = self.lock_blocks();
            let blocks = &mut *guard;
            if let Some(claim) = claim {
                let Some(pin) = blocks.pins.get_mut(claim.container_id, claim.index) else {
                    return Err(NodeError::InvalidState(format!(
                        "claiming the detached blocks of {claim:?}, which are not pinned"
                    )));
                };
                if pin.claimed || pin.term != claim.term {
                    return Err(NodeError::InvalidState(format!(
                        "claiming the detached blocks of {claim:?} twice or for another term"
                    )));
                }
                for &extent in &pin.extents {
                    blocks
                        .allocator
                        .claim(extent)
                        .map_err(|source| NodeError::device("claim detached blocks", source))?;
                }
                pin.claimed = true;
            }
            for &device_block in freed_device_blocks {
                blocks
                    .allocator
                    .free_deferred(Extent {
                        first_block: device_block,
                        block_count: 1,
                    })
                    .map_err(|source| NodeError::device("free block", source))?;
            }
            for (group_index, bitmap) in blocks.allocator.take_dirty_groups() {
                batch.put(keys::allocator_group(group_index), bitmap);
            }
        }
        self.state.write_unlogged(batch)
    }

    /// Holds back every apply (and checkpoint) until the guard is dropped.
    pub async fn pause_applies(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.apply_lock.lock().await
    }

    /// A consistent view of the state and of the blocks it references (rule 4), taken between
    /// two applies; applies go on while it lives.
    pub async fn export_view(&self) -> ExportView<'_> {
        let _guard = self.apply_lock.lock().await;
        self.export_view_count.fetch_add(1, Ordering::AcqRel);
        ExportView {
            storage: self,
            state: self.state.view(),
        }
    }

    /// Waits for one of the node's export slots.
    pub async fn export_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        Arc::clone(&self.export_slots)
            .acquire_owned()
            .await
            .expect("the export semaphore is never closed")
    }

    /// Gives back blocks from `write_new_blocks` that no state references, after an import
    /// failed half-way. Deferred, like every free: harmless and simple.
    pub fn discard_new_blocks(&self, device_blocks: &[u64]) {
        let mut blocks = self.lock_blocks();
        for &device_block in device_blocks {
            if let Err(error) = blocks.allocator.free_deferred(Extent {
                first_block: device_block,
                block_count: 1,
            }) {
                tracing::error!(%error, device_block, "returning a block of a failed import");
            }
        }
    }

    /// Makes everything applied so far durable without the log: device flush, then RocksDB
    /// flush, then deferred frees become reusable. `before_flush` runs under the apply lock
    /// (to record snapshot metadata consistent with the flushed state).
    pub async fn checkpoint<T>(
        self: &Arc<Self>,
        before_flush: impl FnOnce(&StateStore) -> NodeResult<T>,
    ) -> NodeResult<T> {
        let _guard = self.apply_lock.lock().await;
        // Rule 3: no state that references an unwritten block becomes durable.
        self.pending_writes.wait_for_all().await;
        let value = before_flush(&self.state)?;
        {
            let dirty = self.lock_blocks().allocator.take_dirty_groups();
            if !dirty.is_empty() {
                let mut batch = WriteBatch::default();
                for (group_index, bitmap) in dirty {
                    batch.put(keys::allocator_group(group_index), bitmap);
                }
                self.state.write_unlogged(batch)?;
            }
        }
        self.block_store
            .flush()
            .await
            .map_err(|source| NodeError::device("flush device before checkpoint", source))?;
        let storage = Arc::clone(self);
        tokio::task::spawn_blocking(move || storage.state.flush())
            .await
            .map_err(|error| NodeError::InvalidState(format!("checkpoint task: {error}")))??;
        // Rule 4: an export still reads blocks that later applies freed. They are released by
        // the first checkpoint after the last view has gone.
        if self.export_view_count.load(Ordering::Acquire) == 0 {
            self.lock_blocks().allocator.release_deferred();
        }
        self.detached_bytes_since_checkpoint
            .store(0, Ordering::Relaxed);
        self.checkpoint_count.fetch_add(1, Ordering::Relaxed);
        Ok(value)
    }
}

/// An unwritten reference must carry the zero block's CRC: a damaged row (the sentinel with
/// another CRC) is refused rather than read as zeros.
fn check_unwritten(reference: &BlockRef, context: &str) -> NodeResult<()> {
    if reference.checksum != crate::records::zero_block_checksum() {
        return Err(NodeError::ChecksumMismatch(format!(
            "{context}: unwritten block reference with crc {:#010x} instead of the zero block's",
            reference.checksum
        )));
    }
    Ok(())
}

/// Writes `data` (whole blocks) to `extents`, in order, in pieces of at most
/// `BLOCKS_PER_REQUEST_MAX` blocks, all in flight together. Not durable on return.
async fn write_extents_to(
    block_store: &BlockStore,
    buffer_pool: &BufferPool,
    extents: &[Extent],
    data: &[u8],
) -> NodeResult<()> {
    let requests = extent_requests(extents);
    assert_eq!(
        requests
            .last()
            .map_or(0, |request| request.data_offset_bytes
                + request.length_bytes),
        data.len(),
        "the extents hold the data exactly"
    );
    let writes = requests.iter().map(|request| {
        let start_bytes = request.data_offset_bytes;
        let buffer =
            buffer_pool.filled_from(&data[start_bytes..start_bytes + request.length_bytes]);
        block_store.write_blocks(request.first_block, buffer)
    });
    for result in futures::future::join_all(writes).await {
        let written = result.map_err(|source| NodeError::device("write blocks", source))?;
        buffer_pool.give_back(written);
    }
    Ok(())
}

/// One device request of a write to extents: `length_bytes` of the data from
/// `data_offset_bytes`, to blocks from `first_block`.
struct ExtentRequest {
    first_block: u64,
    data_offset_bytes: usize,
    length_bytes: usize,
}

/// The device requests that write data to `extents` in order: one per extent, split into
/// pieces of at most [`BLOCKS_PER_REQUEST_MAX`] blocks.
fn extent_requests(extents: &[Extent]) -> Vec<ExtentRequest> {
    let mut requests = Vec::new();
    let mut data_offset_bytes = 0usize;
    for extent in extents {
        let mut written = 0;
        while written < extent.block_count {
            let piece = (extent.block_count - written).min(BLOCKS_PER_REQUEST_MAX);
            let length_bytes = piece as usize * BLOCK_SIZE_BYTES;
            requests.push(ExtentRequest {
                first_block: extent.first_block + written,
                data_offset_bytes,
                length_bytes,
            });
            written += piece;
            data_offset_bytes += length_bytes;
        }
    }
    requests
}
