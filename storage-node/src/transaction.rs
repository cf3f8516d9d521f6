//! `Transaction`: the changes one command makes to one container, staged in memory and written
//! as a single RocksDB batch together with the container's applied log id.
//!
//! Owns: read-your-writes overlays for inodes, directory entries and the block map's chunk rows
//! (`block_map::StagedChunks`) during one apply, the list
//! of blocks allocated and freed, and the final atomic commit.
//! Invariant: nothing reaches RocksDB before `commit`; a failed command commits only the new
//! applied log id (and gives back any blocks it had allocated), so a failure is also a
//! deterministic, replayable outcome. A failure of the node instead (`abandon`) commits
//! nothing, not even the applied id: the entry is applied again.

use std::collections::BTreeMap;

use ballast_device::BLOCK_SIZE_BYTES;
use rocksdb::WriteBatch;

use crate::block_map::StagedChunks;
use crate::detached::{DetachedBlocks, DetachedClaim};
use crate::error::{FsError, NodeResult};
use crate::keys;
use crate::records::{encode, BlockRef, ContainerState, DirentValue, Inode};
use crate::storage::NodeStorage;
use crate::types::LogId;

/// A row of the readdir index: what readdir returns without a second lookup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CookieRow {
    pub name: String,
    pub inode: u64,
    pub kind: crate::records::EntryKind,
}

/// One staged row change: a value to put, or `None` to delete the key.
pub type RowChange = (Vec<u8>, Option<Vec<u8>>);

/// Row changes staged by a transaction; turned into a RocksDB `WriteBatch` at commit (a
/// `WriteBatch` is not `Sync`, and the transaction is held across awaits).
#[derive(Debug, Default)]
pub struct StagedRows {
    rows: Vec<RowChange>,
}

impl StagedRows {
    pub fn put(&mut self, key: Vec<u8>, value: impl Into<Vec<u8>>) {
        self.rows.push((key, Some(value.into())));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.rows.push((key, None));
    }

    fn into_batch(self, mut batch: WriteBatch) -> WriteBatch {
        for (key, value) in self.rows {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        batch
    }
}

pub struct Transaction<'storage> {
    pub storage: &'storage NodeStorage,
    pub container_id: u64,
    pub state: ContainerState,
    inodes: BTreeMap<u64, Option<Inode>>,
    dirents: BTreeMap<(u64, String), Option<DirentValue>>,
    chunks: StagedChunks,
    batch: StagedRows,
    /// Blocks this command stops referencing.
    freed_device_blocks: Vec<u64>,
    /// Blocks this command wrote; given back if the command fails.
    allocated_device_blocks: Vec<u64>,
    /// Blocks the entry's log writer already wrote this command's data to (`detached.rs`).
    detached: Option<DetachedBlocks>,
    /// Set when the command uses `detached`: claimed only if the command commits.
    claim: Option<DetachedClaim>,
}

impl<'storage> Transaction<'storage> {
    pub fn begin(storage: &'storage NodeStorage, container_id: u64) -> NodeResult<Self> {
        let state = storage
            .state
            .get::<ContainerState>(
                &keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id),
                "container state",
            )?
            .unwrap_or_default();
        Ok(Self {
            storage,
            container_id,
            state,
            inodes: BTreeMap::new(),
            dirents: BTreeMap::new(),
            chunks: StagedChunks::default(),
            batch: StagedRows::default(),
            freed_device_blocks: Vec::new(),
            allocated_device_blocks: Vec::new(),
            detached: None,
            claim: None,
        })
    }

    /// Offers the blocks holding this entry's write data (its detached record's).
    pub fn offer_detached(&mut self, detached: Option<DetachedBlocks>) {
        self.detached = detached;
    }

    /// The offered detached blocks and their checksums, if they hold `data` (the write data
    /// being applied); using them claims them at commit. A mismatch is logged and refused: the
    /// caller then writes new blocks, as for a write that was not detached.
    ///
    /// How much of `data` is checked: the record was found by this entry's exact log id, and
    /// its checksums were computed from this very data when it was logged (or verified against
    /// the device blocks when the log was replayed), so a full pass over every block here only
    /// re-proves that, at about 5 % of the node's CPU per byte written (measured 2026-12-05).
    /// Release builds check the length and the first and last blocks, which catches data of
    /// another write; test builds check every block. What the blocks hold is verified on every
    /// read against the checksums installed here, so no check here is what keeps wrong bytes
    /// from being served.
    pub fn use_detached(&mut self, data: &[u8]) -> Option<(Vec<u64>, Vec<u32>)> {
        let detached = self.detached.take()?;
        if !detached_data_agrees(data, &detached.checksums, cfg!(debug_assertions)) {
            tracing::error!(
                container = detached.claim.container_id,
                index = detached.claim.index,
                "the data applied differs from its detached record's; writing new blocks"
            );
            return None;
        }
        self.claim = Some(detached.claim);
        Some((detached.device_blocks, detached.checksums))
    }

    pub fn inode(&mut self, inode: u64) -> NodeResult<Option<Inode>> {
        if let Some(staged) = self.inodes.get(&inode) {
            return Ok(staged.clone());
        }
        self.storage
            .state
            .get::<Inode>(&keys::inode(self.container_id, inode), "inode")
    }

    /// The inode, or ENOENT.
    pub fn require_inode(&mut self, inode: u64) -> NodeResult<Inode> {
        self.inode(inode)?
            .ok_or_else(|| FsError::not_found(format!("inode {inode} does not exist")).into())
    }

    /// The inode, which must be a live directory (ENOENT, ENOTDIR otherwise).
    pub fn require_directory(&mut self, inode: u64) -> NodeResult<Inode> {
        let directory = self.require_inode(inode)?;
        if directory.kind != crate::records::EntryKind::Directory {
            return Err(FsError::not_directory(format!("inode {inode} is not a directory")).into());
        }
        if directory.nlink == 0 {
            return Err(FsError::not_found(format!("directory {inode} was removed")).into());
        }
        Ok(directory)
    }

    pub fn put_inode(&mut self, inode: u64, value: Inode) {
        self.inodes.insert(inode, Some(value));
    }

    pub fn delete_inode(&mut self, inode: u64) {
        self.inodes.insert(inode, None);
    }

    pub fn dirent(&mut self, parent: u64, name: &str) -> NodeResult<Option<DirentValue>> {
        if let Some(staged) = self.dirents.get(&(parent, name.to_owned())) {
            return Ok(staged.clone());
        }
        self.storage
            .state
            .get::<DirentValue>(&keys::dirent(self.container_id, parent, name), "dirent")
    }

    /// Stages a directory entry and its readdir row.
    pub fn put_dirent(&mut self, parent: u64, name: &str, value: DirentValue) {
        let row = CookieRow {
            name: name.to_owned(),
            inode: value.inode,
            kind: value.kind,
        };
        self.batch.put(
            keys::dirent_cookie(self.container_id, parent, value.cookie),
            encode(&row),
        );
        self.dirents.insert((parent, name.to_owned()), Some(value));
    }

    pub fn delete_dirent(&mut self, parent: u64, name: &str, cookie: u64) {
        self.batch
            .delete(keys::dirent_cookie(self.container_id, parent, cookie));
        self.dirents.insert((parent, name.to_owned()), None);
    }

    /// The block references of `inode`'s file blocks `first..=last` (holes left out), with this
    /// transaction's own changes.
    pub fn block_references(
        &mut self,
        inode: u64,
        first: u64,
        last: u64,
    ) -> NodeResult<Vec<(u64, BlockRef)>> {
        self.chunks
            .references(&self.storage.state, self.container_id, inode, first, last)
    }

    /// Stages new references (`None`: a hole) for the named blocks of `inode`, in block order.
    pub fn set_block_references(
        &mut self,
        inode: u64,
        changes: impl IntoIterator<Item = (u64, Option<BlockRef>)>,
    ) -> NodeResult<()> {
        self.chunks
            .set(&self.storage.state, self.container_id, inode, changes)
    }

    pub fn batch(&mut self) -> &mut StagedRows {
        &mut self.batch
    }

    /// Frees (deferred, at commit) the device block a dropped or replaced reference held; an
    /// unwritten reference holds none.
    pub fn free_reference(&mut self, reference: &BlockRef) {
        if let Some(device_block) = reference.written_device_block() {
            self.freed_device_blocks.push(device_block);
        }
    }

    pub fn record_allocated(&mut self, device_blocks: &[u64]) {
        self.allocated_device_blocks
            .extend_from_slice(device_blocks);
    }

    /// Writes every staged change plus the applied log id, atomically.
    pub async fn commit(mut self, applied: Option<LogId>) -> NodeResult<()> {
        self.state.last_applied = applied;
        for (inode, value) in std::mem::take(&mut self.inodes) {
            let key = keys::inode(self.container_id, inode);
            match value {
                Some(value) => self.batch.put(key, encode(&value)),
                None => self.batch.delete(key),
            }
        }
        for ((parent, name), value) in std::mem::take(&mut self.dirents) {
            let key = keys::dirent(self.container_id, parent, &name);
            match value {
                Some(value) => self.batch.put(key, encode(&value)),
                None => self.batch.delete(key),
            }
        }
        for (key, value) in std::mem::take(&mut self.chunks).into_rows(self.container_id) {
            match value {
                Some(value) => self.batch.put(key, value),
                None => self.batch.delete(key),
            }
        }
        self.batch.put(
            keys::container_singleton(keys::TAG_CONTAINER_STATE, self.container_id),
            encode(&self.state),
        );
        let batch = std::mem::take(&mut self.batch).into_batch(WriteBatch::default());
        self.storage
            .commit_batch(batch, &self.freed_device_blocks, self.claim)
            .await
    }

    /// Drops every staged change *without* recording the entry as applied: this node failed
    /// to apply it (a full device, an I/O error), so it must be applied again later, here or
    /// on a replacement replica. The blocks it wrote go back (deferred, like every free).
    pub fn abandon(self) {
        if !self.allocated_device_blocks.is_empty() {
            self.storage
                .discard_new_blocks(&self.allocated_device_blocks);
        }
    }

    /// Discards every staged change of a failed command and commits only the applied log id,
    /// returning any blocks the command had written.
    pub async fn commit_failure(self, applied: Option<LogId>) -> NodeResult<()> {
        self.commit_failure_with(applied, Vec::new()).await
    }

    /// Like `commit_failure`, also writing `rows` (a failure's stored response must persist
    /// with the applied id, so a repeat returns the same failure).
    pub async fn commit_failure_with(
        self,
        applied: Option<LogId>,
        rows: Vec<RowChange>,
    ) -> NodeResult<()> {
        let mut state = self
            .storage
            .state
            .get::<ContainerState>(
                &keys::container_singleton(keys::TAG_CONTAINER_STATE, self.container_id),
                "container state",
            )?
            .unwrap_or_default();
        state.last_applied = applied;
        let mut batch = StagedRows { rows }.into_batch(WriteBatch::default());
        batch.put(
            keys::container_singleton(keys::TAG_CONTAINER_STATE, self.container_id),
            encode(&state),
        );
        self.storage
            .commit_batch(batch, &self.allocated_device_blocks, None)
            .await
    }
}

/// Whether `data` has one block per checksum and its blocks match them: every block when
/// `every_block`, else the first and the last (see `Transaction::use_detached`).
fn detached_data_agrees(data: &[u8], checksums: &[u32], every_block: bool) -> bool {
    if data.len() % BLOCK_SIZE_BYTES != 0 || data.len() / BLOCK_SIZE_BYTES != checksums.len() {
        return false;
    }
    let matches = |block: usize| {
        let start = block * BLOCK_SIZE_BYTES;
        ballast_common::checksum(&data[start..start + BLOCK_SIZE_BYTES]) == checksums[block]
    };
    match checksums.len() {
        0 => true,
        count if every_block => (0..count).all(matches),
        count => matches(0) && matches(count - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(count: usize) -> (Vec<u8>, Vec<u32>) {
        let data: Vec<u8> = (0..count * BLOCK_SIZE_BYTES)
            .map(|index| (index / 7) as u8)
            .collect();
        let checksums = crate::detached::block_checksums(&data);
        (data, checksums)
    }

    #[test]
    fn detached_data_agrees_only_with_its_own_checksums() {
        let (data, checksums) = blocks(4);
        assert!(detached_data_agrees(&data, &checksums, true));
        assert!(detached_data_agrees(&data, &checksums, false));
        // Another length, or a block count that does not match: refused in every mode.
        assert!(!detached_data_agrees(
            &data[..3 * BLOCK_SIZE_BYTES],
            &checksums,
            false
        ));
        assert!(!detached_data_agrees(&data[..100], &checksums[..1], false));
        // A changed first or last block is caught by the spot check too.
        for block in [0, 3] {
            let mut changed = data.clone();
            changed[block * BLOCK_SIZE_BYTES + 5] ^= 1;
            assert!(
                !detached_data_agrees(&changed, &checksums, false),
                "{block}"
            );
            assert!(!detached_data_agrees(&changed, &checksums, true), "{block}");
        }
        // A changed middle block only by the full check (test builds).
        let mut changed = data.clone();
        changed[BLOCK_SIZE_BYTES + 5] ^= 1;
        assert!(detached_data_agrees(&changed, &checksums, false));
        assert!(!detached_data_agrees(&changed, &checksums, true));
        assert!(detached_data_agrees(&[], &[], false));
    }
}
