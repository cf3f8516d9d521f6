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
//! 2. An apply writes its blocks to the device (awaiting completion) before it writes the
//!    RocksDB batch that references them.
//! 3. A checkpoint, under the apply lock, flushes the device first and RocksDB second, then
//!    releases deferred frees. After it, the state is durable without the log.
//! 4. While an [`ExportView`] exists, checkpoints keep deferred frees deferred: the view's state
//!    references blocks that later applies may free, and they must keep their bytes until the
//!    export that reads them has ended.
//!
//! Must not depend on: Raft types beyond log ids, the gRPC layer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ballast_device::{
    AlignedBuffer, BlockAllocator, BlockStore, DeviceError, Extent, BLOCK_SIZE_BYTES,
};
use rocksdb::WriteBatch;

use crate::error::{FsError, NodeError, NodeResult};
use crate::keys;
use crate::records::BlockRef;
use crate::snapshot_spool::SpoolDirectory;
use crate::state_store::{StateStore, StateView};

/// The most blocks read or written by one device request (1 MiB).
pub const BLOCKS_PER_REQUEST_MAX: u64 = 256;
/// Snapshot exports a node runs at once; each reads a whole container and fills a spool file.
pub const EXPORTS_IN_FLIGHT_MAX: usize = 2;

pub struct NodeStorage {
    pub state: StateStore,
    pub block_store: BlockStore,
    allocator: Mutex<BlockAllocator>,
    /// Serialises state batch writes with checkpoints (see rule 3).
    apply_lock: tokio::sync::Mutex<()>,
    checksum_error_count: AtomicU64,
    checkpoint_count: AtomicU64,
    /// Live [`ExportView`]s (rule 4).
    export_view_count: AtomicUsize,
    /// Bounds concurrent exports (`EXPORTS_IN_FLIGHT_MAX`).
    export_slots: Arc<tokio::sync::Semaphore>,
    /// Where snapshots are spooled while they are exported or received.
    pub spool: SpoolDirectory,
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

impl NodeStorage {
    /// Opens the storage, restoring the allocator from the bitmap groups persisted in RocksDB.
    /// Cost: one read per 32768-block group, independent of how much data is stored.
    pub fn open(
        state: StateStore,
        block_store: BlockStore,
        block_count: u64,
        spool: SpoolDirectory,
    ) -> NodeResult<Self> {
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
            allocator: Mutex::new(allocator),
            apply_lock: tokio::sync::Mutex::new(()),
            checksum_error_count: AtomicU64::new(0),
            checkpoint_count: AtomicU64::new(0),
            export_view_count: AtomicUsize::new(0),
            export_slots: Arc::new(tokio::sync::Semaphore::new(EXPORTS_IN_FLIGHT_MAX)),
            spool,
        })
    }

    pub fn free_block_count(&self) -> u64 {
        self.allocator
            .lock()
            .expect("allocator lock")
            .free_block_count()
    }

    pub fn checksum_error_count(&self) -> u64 {
        self.checksum_error_count.load(Ordering::Relaxed)
    }

    pub fn checkpoint_count(&self) -> u64 {
        self.checkpoint_count.load(Ordering::Relaxed)
    }

    /// Allocates `block_count` new blocks and writes `data` (exactly `block_count` blocks) to
    /// them. Returns the device block of each file block, in order.
    pub async fn write_new_blocks(&self, data: AlignedBuffer) -> NodeResult<Vec<u64>> {
        assert_eq!(data.len() % BLOCK_SIZE_BYTES, 0);
        let block_count = (data.len() / BLOCK_SIZE_BYTES) as u64;
        assert!(block_count > 0);
        let extents = {
            let mut allocator = self.allocator.lock().expect("allocator lock");
            match allocator.allocate(block_count) {
                Ok(extents) => extents,
                Err(DeviceError::NoSpace {
                    requested_blocks,
                    free_blocks,
                }) => {
                    return Err(FsError::no_space(format!(
                        "device full: {requested_blocks} blocks requested, {free_blocks} free"
                    ))
                    .into())
                }
                Err(source) => return Err(NodeError::device("allocate blocks", source)),
            }
        };
        let mut device_blocks = Vec::with_capacity(block_count as usize);
        let mut result = Ok(());
        if extents.len() == 1 && extents[0].block_count <= BLOCKS_PER_REQUEST_MAX {
            let extent = extents[0];
            result = self
                .block_store
                .write_blocks(extent.first_block, data)
                .await
                .map(|_| ())
                .map_err(|source| NodeError::device("write blocks", source));
        } else {
            let mut consumed_blocks = 0usize;
            'extents: for extent in &extents {
                let mut written = 0;
                while written < extent.block_count {
                    let piece = (extent.block_count - written).min(BLOCKS_PER_REQUEST_MAX);
                    let start = consumed_blocks * BLOCK_SIZE_BYTES;
                    let end = start + piece as usize * BLOCK_SIZE_BYTES;
                    let buffer = AlignedBuffer::from_slice_padded(&data[start..end]);
                    if let Err(source) = self
                        .block_store
                        .write_blocks(extent.first_block + written, buffer)
                        .await
                    {
                        result = Err(NodeError::device("write blocks", source));
                        break 'extents;
                    }
                    written += piece;
                    consumed_blocks += piece as usize;
                }
            }
        }
        if let Err(error) = result {
            // The blocks were never referenced; give them back (deferred: harmless and simple).
            let mut allocator = self.allocator.lock().expect("allocator lock");
            for extent in extents {
                if let Err(free_error) = allocator.free_deferred(extent) {
                    tracing::error!(%free_error, "returning blocks of a failed write");
                }
            }
            return Err(error);
        }
        for extent in &extents {
            device_blocks.extend(extent.first_block..extent.first_block + extent.block_count);
        }
        assert_eq!(device_blocks.len() as u64, block_count);
        Ok(device_blocks)
    }

    /// Reads the given blocks, verifying each against its checksum. Contiguous device blocks are
    /// read with one request. A mismatch is an error, logged loudly; wrong bytes are never
    /// returned.
    pub async fn read_verified(
        &self,
        references: &[BlockRef],
        context: &str,
    ) -> NodeResult<Vec<u8>> {
        let mut output = vec![0u8; references.len() * BLOCK_SIZE_BYTES];
        let mut index = 0;
        while index < references.len() {
            let first = references[index].device_block;
            let mut run = 1;
            while index + run < references.len()
                && (run as u64) < BLOCKS_PER_REQUEST_MAX
                && references[index + run].device_block == first + run as u64
            {
                run += 1;
            }
            let buffer = self
                .block_store
                .read_blocks(first, run as u32)
                .await
                .map_err(|source| {
                    NodeError::device(format!("read blocks for {context}"), source)
                })?;
            for offset in 0..run {
                let block = &buffer[offset * BLOCK_SIZE_BYTES..(offset + 1) * BLOCK_SIZE_BYTES];
                let reference = references[index + offset];
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
                output
                    [(index + offset) * BLOCK_SIZE_BYTES..(index + offset + 1) * BLOCK_SIZE_BYTES]
                    .copy_from_slice(block);
            }
            index += run;
        }
        Ok(output)
    }

    /// Writes a state batch under the apply lock, together with the blocks it stops
    /// referencing (freed deferred) and every allocator group changed so far. Freeing here, under
    /// the lock, guarantees no checkpoint can persist a "free" bit while the durable state still
    /// references the block.
    ///
    /// Known weakness: a group changed by another container's in-flight allocation may be
    /// persisted before that container's references; a crash in that window leaks those blocks
    /// (allocated, unreferenced). It never corrupts. A free-space audit is future work.
    pub async fn commit_batch(
        &self,
        mut batch: WriteBatch,
        freed_device_blocks: &[u64],
    ) -> NodeResult<()> {
        let _guard = self.apply_lock.lock().await;
        {
            let mut allocator = self.allocator.lock().expect("allocator lock");
            for &device_block in freed_device_blocks {
                allocator
                    .free_deferred(Extent {
                        first_block: device_block,
                        block_count: 1,
                    })
                    .map_err(|source| NodeError::device("free block", source))?;
            }
            for (group_index, bitmap) in allocator.take_dirty_groups() {
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
        let mut allocator = self.allocator.lock().expect("allocator lock");
        for &device_block in device_blocks {
            if let Err(error) = allocator.free_deferred(Extent {
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
        let value = before_flush(&self.state)?;
        {
            let mut allocator = self.allocator.lock().expect("allocator lock");
            let dirty = allocator.take_dirty_groups();
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
            self.allocator
                .lock()
                .expect("allocator lock")
                .release_deferred();
        }
        self.checkpoint_count.fetch_add(1, Ordering::Relaxed);
        Ok(value)
    }
}
