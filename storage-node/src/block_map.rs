//! The block map: for every block of every file, the device block that holds it and its CRC-32
//! (a [`BlockRef`]). It is stored as chunk rows (`chunk_row.rs`, `docs/chunk-rows.md`): one
//! state row per 1 MiB chunk of a file, key [`keys::chunk`] (container, inode, chunk index),
//! value a [`ChunkRow`].
//!
//! The rest of the node sees the map as `(file block, BlockRef)` pairs, and names one block by
//! its logical key [`keys::block`] (container, inode, file block): in scrub cursors, snapshot
//! streams and [`page`]s. No row is stored under a logical key. Stores of format version 1 held
//! one row per block there; [`convert_block_rows`] turns them into chunk rows at start-up.
//!
//! Why chunks: one row per block cost the node a RocksDB row per 4 KiB written (memtable
//! inserts and flushes were a fifth of its CPU in a sequential write), 256 rows per 1 MiB read,
//! and about 5.8 MB of SST per GiB of data. A chunk row is one row per MiB, and rows of a fixed
//! span never overlap, so a change touches exactly the rows its range names.
//!
//! Owns: the row layout of the map, the per-transaction overlay of changed chunks
//! ([`StagedChunks`]), the conversion of per-block rows, and the format version row.
//! Must not depend on: the device, the filesystem's rules (holes, quota, which blocks to free
//! belong to the caller).
//! Invariants:
//! - A chunk row is decoded and checked ([`ChunkRow::decode`]) every time it is read; a row
//!   whose bytes break an invariant is an error, never a map.
//! - Every change goes through [`ChunkRow::from_dense`], so rows stay maximal, and a chunk left
//!   without references has no row.
//! - A transaction reads its own staged chunk changes ([`StagedChunks`]): two changes of one
//!   command to blocks of the same chunk (a punched hole and its zeroed edge) both land.
//! - Scans are bounded: by the blocks asked for, or by a page's limit.

use std::collections::BTreeMap;

use crate::chunk_row::{ChunkRow, DenseChunk, CHUNK_BLOCK_COUNT};
use crate::error::{NodeError, NodeResult};
use crate::keys;
use crate::records::{decode, BlockRef};
use crate::state_store::{StateStore, StateView};
use crate::transaction::RowChange;

/// Format version of a store whose block map is chunk rows.
pub const FORMAT_VERSION_CHUNK_ROWS: u64 = 2;
/// Per-block rows converted per RocksDB batch at start-up (whole chunks only): about 1 MiB of
/// keys and values per batch.
const CONVERSION_BATCH_BLOCKS_MAX: usize = 16 * 1024;

/// Called with each (key, value) of a scan; returns false to stop.
pub type RowVisitor<'visit> = dyn FnMut(&[u8], &[u8]) -> NodeResult<bool> + 'visit;

/// Where rows are read from: the live store or a consistent view of it.
pub trait RowSource {
    fn get_row(&self, key: &[u8]) -> NodeResult<Option<Vec<u8>>>;
    /// Visits the rows of `[start, end)` in key order until `visit` returns false.
    fn scan_rows(&self, start: &[u8], end: &[u8], visit: &mut RowVisitor<'_>) -> NodeResult<()>;
}

impl RowSource for StateStore {
    fn get_row(&self, key: &[u8]) -> NodeResult<Option<Vec<u8>>> {
        self.get_raw(key)
    }

    fn scan_rows(&self, start: &[u8], end: &[u8], visit: &mut RowVisitor<'_>) -> NodeResult<()> {
        self.scan(start, end, usize::MAX, visit)
    }
}

impl RowSource for StateView<'_> {
    fn get_row(&self, key: &[u8]) -> NodeResult<Option<Vec<u8>>> {
        self.get_raw(key)
    }

    fn scan_rows(&self, start: &[u8], end: &[u8], visit: &mut RowVisitor<'_>) -> NodeResult<()> {
        self.scan(start, end, usize::MAX, visit)
    }
}

/// The chunk of `file_block` and the block's place in it.
fn chunk_of(file_block: u64) -> (u64, u16) {
    (
        file_block / CHUNK_BLOCK_COUNT,
        (file_block % CHUNK_BLOCK_COUNT) as u16,
    )
}

/// The key range of `inode`'s chunk rows `first_chunk..=last_chunk`.
fn chunk_key_range(
    container_id: u64,
    inode: u64,
    first_chunk: u64,
    last_chunk: u64,
) -> (Vec<u8>, Vec<u8>) {
    let start = keys::chunk(container_id, inode, first_chunk);
    let end = match last_chunk.checked_add(1) {
        Some(end) => keys::chunk(container_id, inode, end),
        None => keys::prefix_end(&keys::chunk_prefix(container_id, inode)),
    };
    (start, end)
}

/// Decodes a stored chunk row, naming its key in the error.
fn decode_row(key: &[u8], value: &[u8]) -> NodeResult<ChunkRow> {
    ChunkRow::decode(value).map_err(|error| {
        NodeError::InvalidState(format!(
            "the chunk row at key {key:02x?} is broken: {error}"
        ))
    })
}

/// Appends the references of `row` (chunk `chunk_index`) for file blocks `first..=last`.
fn push_references(
    row: &ChunkRow,
    chunk_index: u64,
    first: u64,
    last: u64,
    references: &mut Vec<(u64, BlockRef)>,
) {
    let chunk_first = chunk_index * CHUNK_BLOCK_COUNT;
    let chunk_last = chunk_first + (CHUNK_BLOCK_COUNT - 1);
    if last < chunk_first || first > chunk_last {
        return;
    }
    let from = (first.max(chunk_first) - chunk_first) as u16;
    let to = (last.min(chunk_last) - chunk_first) as u16;
    references.extend(
        row.references_between(from, to)
            .into_iter()
            .map(|(block, reference)| (chunk_first + u64::from(block), reference)),
    );
}

/// Visits the stored chunk rows of `inode` that cover file blocks `first..=last`.
fn visit_chunks(
    scan: impl FnOnce(&[u8], &[u8], &mut RowVisitor<'_>) -> NodeResult<bool>,
    container_id: u64,
    inode: u64,
    first: u64,
    last: u64,
    mut visit: impl FnMut(u64, ChunkRow),
) -> NodeResult<bool> {
    assert!(first <= last);
    let (start, end) = chunk_key_range(
        container_id,
        inode,
        first / CHUNK_BLOCK_COUNT,
        last / CHUNK_BLOCK_COUNT,
    );
    scan(&start, &end, &mut |key, value| {
        let (_, chunk_index) = keys::chunk_key_parts(key).ok_or_else(|| {
            NodeError::InvalidState(format!("a chunk row has a malformed key {key:02x?}"))
        })?;
        visit(chunk_index, decode_row(key, value)?);
        Ok(true)
    })
}

/// The references of `inode`'s file blocks `first..=last` (holes left out), in block order.
pub fn references(
    source: &impl RowSource,
    container_id: u64,
    inode: u64,
    first: u64,
    last: u64,
) -> NodeResult<Vec<(u64, BlockRef)>> {
    let scan = |start: &[u8], end: &[u8], visit: &mut RowVisitor<'_>| {
        source.scan_rows(start, end, visit).map(|()| true)
    };
    let references = collect_references(scan, container_id, inode, first, last)?;
    Ok(references.expect("a scan that may read the state filesystem is complete"))
}

/// As [`references`], from memory alone (memtables and block cache): `None` when a row is not
/// in memory (see [`StateStore::scan_in_memory`]).
pub fn references_in_memory(
    store: &StateStore,
    container_id: u64,
    inode: u64,
    first: u64,
    last: u64,
) -> NodeResult<Option<Vec<(u64, BlockRef)>>> {
    let scan = |start: &[u8], end: &[u8], visit: &mut RowVisitor<'_>| {
        store.scan_in_memory(start, end, usize::MAX, visit)
    };
    collect_references(scan, container_id, inode, first, last)
}

/// The references of blocks `first..=last` from the rows `scan` visits; `None` when the scan
/// says it could not see them all.
fn collect_references(
    scan: impl FnOnce(&[u8], &[u8], &mut RowVisitor<'_>) -> NodeResult<bool>,
    container_id: u64,
    inode: u64,
    first: u64,
    last: u64,
) -> NodeResult<Option<Vec<(u64, BlockRef)>>> {
    let mut references = Vec::new();
    let complete = visit_chunks(
        scan,
        container_id,
        inode,
        first,
        last,
        |chunk_index, row| push_references(&row, chunk_index, first, last, &mut references),
    )?;
    Ok(complete.then_some(references))
}

/// The reference of one block named by its logical key ([`keys::block`], 25 bytes), if any:
/// one read of its chunk row.
pub fn reference_at(source: &impl RowSource, block_key: &[u8]) -> NodeResult<Option<BlockRef>> {
    ReferenceLookup::default().reference_at(source, block_key)
}

/// [`reference_at`] for many blocks in key order, as a snapshot import asks: the last chunk
/// read is kept, so the blocks of one chunk cost one row read and one decode, not 256.
#[derive(Debug, Default)]
pub struct ReferenceLookup {
    /// The chunk last read (container, inode, chunk index) and its blocks.
    last: Option<((u64, u64, u64), Box<DenseChunk>)>,
}

impl ReferenceLookup {
    /// The reference of the block at logical key `block_key` (25 bytes), if any.
    pub fn reference_at(
        &mut self,
        source: &impl RowSource,
        block_key: &[u8],
    ) -> NodeResult<Option<BlockRef>> {
        let container_id = u64::from_be_bytes(block_key[1..9].try_into().expect("8 bytes"));
        let inode = keys::block_key_inode(block_key);
        let (chunk_index, offset) = chunk_of(keys::block_key_file_block(block_key));
        let chunk = (container_id, inode, chunk_index);
        if self.last.as_ref().is_none_or(|(last, _)| *last != chunk) {
            let key = keys::chunk(container_id, inode, chunk_index);
            let dense = match source.get_row(&key)? {
                Some(value) => decode_row(&key, &value)?.to_dense(),
                None => [None; CHUNK_BLOCK_COUNT as usize],
            };
            self.last = Some((chunk, Box::new(dense)));
        }
        let (_, dense) = self.last.as_ref().expect("set just above");
        Ok(dense[offset as usize])
    }
}

/// The first (inode, file block) whose logical key is at or after `from`, within
/// `container_id`'s logical key range; `None` when none can be. `from` may be any key: the
/// range's start, a logical key, or a logical key with bytes appended (the key after it).
fn position_at_or_after(container_id: u64, from: &[u8]) -> Option<(u64, u64)> {
    let (start, end) = keys::container_range(keys::TAG_BLOCK, container_id);
    if from >= end.as_slice() {
        return None;
    }
    if from <= start.as_slice() {
        return Some((0, 0));
    }
    // `from` starts with `start` (it lies inside the range): pad or cut it to 25 bytes.
    let mut padded = [0u8; 25];
    let taken = from.len().min(25);
    padded[..taken].copy_from_slice(&from[..taken]);
    let inode = keys::block_key_inode(&padded);
    let file_block = keys::block_key_file_block(&padded);
    if from.len() <= 25 {
        return Some((inode, file_block));
    }
    // Bytes past a whole key: the position after that key.
    match file_block.checked_add(1) {
        Some(next) => Some((inode, next)),
        None => inode.checked_add(1).map(|next| (next, 0)),
    }
}

/// Up to `limit` references of `container_id`, in logical key order, from the first block whose
/// logical key is at or after `from`: `(logical key, reference)`. Fewer than `limit` means the
/// container has no more.
pub fn page(
    source: &impl RowSource,
    container_id: u64,
    from: &[u8],
    limit: usize,
) -> NodeResult<Vec<(Vec<u8>, BlockRef)>> {
    let mut page = Vec::new();
    let Some((from_inode, from_block)) = position_at_or_after(container_id, from) else {
        return Ok(page);
    };
    if limit == 0 {
        return Ok(page);
    }
    let start = keys::chunk(container_id, from_inode, from_block / CHUNK_BLOCK_COUNT);
    let (_, end) = keys::container_range(keys::TAG_CHUNK, container_id);
    source.scan_rows(&start, &end, &mut |key, value| {
        let (inode, chunk_index) = keys::chunk_key_parts(key).ok_or_else(|| {
            NodeError::InvalidState(format!("a chunk row has a malformed key {key:02x?}"))
        })?;
        let row = decode_row(key, value)?;
        let first = if inode == from_inode { from_block } else { 0 };
        let mut references = Vec::new();
        push_references(&row, chunk_index, first, u64::MAX, &mut references);
        for (file_block, reference) in references {
            page.push((keys::block(container_id, inode, file_block), reference));
            if page.len() == limit {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    Ok(page)
}

/// Every reference of `container_id`, page by page, handed to `visit` (bounded memory: one
/// page at a time).
pub fn visit_container(
    source: &impl RowSource,
    container_id: u64,
    mut visit: impl FnMut(&[u8], &BlockRef) -> NodeResult<()>,
) -> NodeResult<()> {
    const PAGE_BLOCKS: usize = 16 * 1024;
    let (mut from, _) = keys::container_range(keys::TAG_BLOCK, container_id);
    // Bounded by the container's blocks: every page moves `from` past its last key.
    loop {
        let page = page(source, container_id, &from, PAGE_BLOCKS)?;
        for (key, reference) in &page {
            visit(key, reference)?;
        }
        match page.last() {
            Some((key, _)) if page.len() == PAGE_BLOCKS => {
                from = key.clone();
                from.push(0);
            }
            _ => return Ok(()),
        }
    }
}

/// The chunk-row changes of one transaction, read back by it before they are written: a
/// chunk's new row, or `None` when the chunk lost its last reference.
#[derive(Debug, Default)]
pub struct StagedChunks {
    chunks: BTreeMap<(u64, u64), Option<ChunkRow>>,
    /// Stored rows (or their absence) that [`Self::references`] read for a small range, kept
    /// so that the change that usually follows does not read and decode them again. The store
    /// does not change under a transaction: applies of a container run one at a time.
    loaded: BTreeMap<(u64, u64), Option<ChunkRow>>,
}

/// Ranges of at most this many chunks keep their stored rows in [`StagedChunks::loaded`].
const LOADED_CHUNKS_MAX: u64 = 4;

impl StagedChunks {
    /// The references of `inode`'s file blocks `first..=last` as the transaction sees them.
    pub fn references(
        &mut self,
        store: &StateStore,
        container_id: u64,
        inode: u64,
        first: u64,
        last: u64,
    ) -> NodeResult<Vec<(u64, BlockRef)>> {
        assert!(first <= last);
        let (first_chunk, last_chunk) = (first / CHUNK_BLOCK_COUNT, last / CHUNK_BLOCK_COUNT);
        let keep_loaded = last_chunk - first_chunk < LOADED_CHUNKS_MAX;
        let mut references = Vec::new();
        let mut loaded = Vec::new();
        visit_chunks(
            |start, end, visit| store.scan_rows(start, end, visit).map(|()| true),
            container_id,
            inode,
            first,
            last,
            |chunk_index, row| {
                if !self.chunks.contains_key(&(inode, chunk_index)) {
                    push_references(&row, chunk_index, first, last, &mut references);
                    if keep_loaded {
                        loaded.push((chunk_index, row));
                    }
                }
            },
        )?;
        if keep_loaded {
            for chunk_index in first_chunk..=last_chunk {
                self.loaded.insert((inode, chunk_index), None);
            }
            for (chunk_index, row) in loaded {
                self.loaded.insert((inode, chunk_index), Some(row));
            }
        }
        let staged = self
            .chunks
            .range((inode, first_chunk)..=(inode, last_chunk));
        let mut staged_any = false;
        for (&(_, chunk_index), row) in staged {
            staged_any = true;
            if let Some(row) = row {
                push_references(row, chunk_index, first, last, &mut references);
            }
        }
        if staged_any {
            references.sort_unstable_by_key(|(file_block, _)| *file_block);
        }
        Ok(references)
    }

    /// Sets the references of `inode`'s blocks named in `changes` (`None`: make a hole). Each
    /// touched chunk is read once (staged, else stored), changed, and staged again.
    pub fn set(
        &mut self,
        store: &StateStore,
        container_id: u64,
        inode: u64,
        changes: impl IntoIterator<Item = (u64, Option<BlockRef>)>,
    ) -> NodeResult<()> {
        let mut current: Option<(u64, DenseChunk)> = None;
        for (file_block, reference) in changes {
            let (chunk_index, offset) = chunk_of(file_block);
            if current
                .as_ref()
                .is_none_or(|(index, _)| *index != chunk_index)
            {
                if let Some((index, dense)) = current.take() {
                    self.chunks
                        .insert((inode, index), ChunkRow::from_dense(&dense));
                }
                let dense = self.dense_chunk(store, container_id, inode, chunk_index)?;
                current = Some((chunk_index, dense));
            }
            let (_, dense) = current.as_mut().expect("set just above");
            dense[offset as usize] = reference;
        }
        if let Some((index, dense)) = current {
            self.chunks
                .insert((inode, index), ChunkRow::from_dense(&dense));
        }
        Ok(())
    }

    /// Every block of one chunk as the transaction sees it: staged, else loaded, else stored.
    /// A loaded row is used up: the caller stages the chunk's new row.
    fn dense_chunk(
        &mut self,
        store: &StateStore,
        container_id: u64,
        inode: u64,
        chunk_index: u64,
    ) -> NodeResult<DenseChunk> {
        let empty = [None; CHUNK_BLOCK_COUNT as usize];
        if let Some(staged) = self.chunks.get(&(inode, chunk_index)) {
            return Ok(staged.as_ref().map_or(empty, ChunkRow::to_dense));
        }
        if let Some(loaded) = self.loaded.remove(&(inode, chunk_index)) {
            return Ok(loaded.as_ref().map_or(empty, ChunkRow::to_dense));
        }
        let key = keys::chunk(container_id, inode, chunk_index);
        Ok(match store.get_row(&key)? {
            Some(value) => decode_row(&key, &value)?.to_dense(),
            None => empty,
        })
    }

    /// The row changes to write at commit.
    pub fn into_rows(self, container_id: u64) -> impl Iterator<Item = RowChange> {
        self.chunks
            .into_iter()
            .map(move |((inode, chunk_index), row)| {
                let key = keys::chunk(container_id, inode, chunk_index);
                (key, row.map(|row| row.encode()))
            })
    }
}

/// Builds chunk rows from references that arrive by logical key, as a snapshot stream carries
/// them: keys increase across [`Self::complete_before`] calls, so every chunk before the chunk
/// of the last key seen is whole and can be written. Memory: the chunks still open, a few per
/// group of a stream.
#[derive(Debug)]
pub struct ChunkRowsBuilder {
    container_id: u64,
    open: BTreeMap<(u64, u64), DenseChunk>,
}

impl ChunkRowsBuilder {
    pub fn new(container_id: u64) -> ChunkRowsBuilder {
        ChunkRowsBuilder {
            container_id,
            open: BTreeMap::new(),
        }
    }

    /// Adds the reference of the block at logical key `block_key` (25 bytes, checked by the
    /// caller to lie in this container's range).
    pub fn add(&mut self, block_key: &[u8], reference: BlockRef) {
        let inode = keys::block_key_inode(block_key);
        let (chunk_index, offset) = chunk_of(keys::block_key_file_block(block_key));
        let dense = self
            .open
            .entry((inode, chunk_index))
            .or_insert([None; CHUNK_BLOCK_COUNT as usize]);
        dense[offset as usize] = Some(reference);
    }

    /// The rows of the chunks before `block_key`'s chunk, which no later key can change.
    pub fn complete_before(&mut self, block_key: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let inode = keys::block_key_inode(block_key);
        let (chunk_index, _) = chunk_of(keys::block_key_file_block(block_key));
        let still_open = self.open.split_off(&(inode, chunk_index));
        let complete = std::mem::replace(&mut self.open, still_open);
        self.rows_of(complete)
    }

    /// The rows of every chunk still open.
    pub fn finish(mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let open = std::mem::take(&mut self.open);
        self.rows_of(open)
    }

    fn rows_of(&self, chunks: BTreeMap<(u64, u64), DenseChunk>) -> Vec<(Vec<u8>, Vec<u8>)> {
        chunks
            .into_iter()
            .filter_map(|((inode, chunk_index), dense)| {
                let row = ChunkRow::from_dense(&dense)?;
                Some((
                    keys::chunk(self.container_id, inode, chunk_index),
                    row.encode(),
                ))
            })
            .collect()
    }
}

/// The store's format version: `None` for a store that never recorded one (version 1, or an
/// empty store not yet stamped).
pub fn format_version(store: &StateStore) -> NodeResult<Option<u64>> {
    store.get::<u64>(&keys::format_version(), "format version")
}

/// Converts a store's per-block rows (format version 1) into chunk rows and stamps the version.
/// Runs at start-up before any container starts. Each batch converts whole chunks: it writes
/// their chunk rows and deletes their block rows atomically (with the WAL, as the Raft log
/// cannot replay this), so a crash in the middle leaves whole chunks of either format, and the
/// next start goes on with the block rows left. Refuses a store of a newer version. Returns
/// the number of block rows converted.
pub fn convert_block_rows(store: &StateStore) -> NodeResult<u64> {
    convert_block_rows_up_to(store, usize::MAX)
}

/// [`convert_block_rows`], stopping after `batches_max` batches (tests: a conversion cut
/// short, as by a crash).
fn convert_block_rows_up_to(store: &StateStore, batches_max: usize) -> NodeResult<u64> {
    match format_version(store)? {
        Some(FORMAT_VERSION_CHUNK_ROWS) => return Ok(0),
        Some(newer) if newer > FORMAT_VERSION_CHUNK_ROWS => {
            return Err(NodeError::InvalidState(format!(
                "the state store has format version {newer}; this node knows versions up to \
                 {FORMAT_VERSION_CHUNK_ROWS}"
            )));
        }
        _ => {}
    }
    let start = vec![keys::TAG_BLOCK];
    let end = vec![keys::TAG_BLOCK + 1];
    let mut converted = 0u64;
    // Bounded: each pass deletes the block rows it read, so the range shrinks to nothing.
    for batch_index in 0.. {
        if batch_index == batches_max {
            return Ok(converted);
        }
        let mut rows: Vec<(Vec<u8>, BlockRef)> = Vec::new();
        let mut last_chunk: Option<(u64, u64, u64)> = None;
        store.scan_rows(&start, &end, &mut |key, value| {
            if key.len() != 25 {
                return Err(NodeError::InvalidState(format!(
                    "a block row has a malformed key {key:02x?}"
                )));
            }
            let container_id = u64::from_be_bytes(key[1..9].try_into().expect("8 bytes"));
            let chunk = (
                container_id,
                keys::block_key_inode(key),
                keys::block_key_file_block(key) / CHUNK_BLOCK_COUNT,
            );
            // Stop at a chunk boundary once the batch is full: batches hold whole chunks.
            if rows.len() >= CONVERSION_BATCH_BLOCKS_MAX && last_chunk != Some(chunk) {
                return Ok(false);
            }
            last_chunk = Some(chunk);
            rows.push((key.to_vec(), decode::<BlockRef>(value, "block reference")?));
            Ok(true)
        })?;
        if rows.is_empty() {
            break;
        }
        let mut batch = rocksdb::WriteBatch::default();
        let mut chunks: BTreeMap<(u64, u64, u64), DenseChunk> = BTreeMap::new();
        for (key, reference) in &rows {
            let container_id = u64::from_be_bytes(key[1..9].try_into().expect("8 bytes"));
            let inode = keys::block_key_inode(key);
            let (chunk_index, offset) = chunk_of(keys::block_key_file_block(key));
            let dense = match chunks.entry((container_id, inode, chunk_index)) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(entry) => {
                    // A chunk row already there (never expected: batches are whole chunks) is
                    // merged, so no reference is lost either way.
                    let chunk_key = keys::chunk(container_id, inode, chunk_index);
                    let existing = store
                        .get_row(&chunk_key)?
                        .map(|value| decode_row(&chunk_key, &value))
                        .transpose()?;
                    entry.insert(
                        existing.map_or([None; CHUNK_BLOCK_COUNT as usize], |row| row.to_dense()),
                    )
                }
            };
            dense[offset as usize] = Some(*reference);
            batch.delete(key);
        }
        for ((container_id, inode, chunk_index), dense) in &chunks {
            let row =
                ChunkRow::from_dense(dense).expect("a chunk with a block row has a reference");
            batch.put(
                keys::chunk(*container_id, *inode, *chunk_index),
                row.encode(),
            );
        }
        store.write_synced(batch)?;
        converted += rows.len() as u64;
        tracing::info!(
            block_rows = rows.len(),
            chunk_rows = chunks.len(),
            converted,
            "converted per-block rows into chunk rows"
        );
    }
    stamp_format_version(store)?;
    if converted > 0 {
        tracing::info!(
            converted,
            "the state store now holds chunk rows (format version 2)"
        );
    }
    Ok(converted)
}

/// Records that the store's block map is chunk rows.
fn stamp_format_version(store: &StateStore) -> NodeResult<()> {
    let mut batch = rocksdb::WriteBatch::default();
    batch.put(
        keys::format_version(),
        crate::records::encode(&FORMAT_VERSION_CHUNK_ROWS),
    );
    store.write_synced(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(device_block: u64) -> BlockRef {
        BlockRef {
            device_block,
            checksum: device_block as u32 ^ 0x5a5a,
        }
    }

    fn store() -> (tempfile::TempDir, StateStore) {
        let directory = tempfile::tempdir().unwrap();
        let store = StateStore::open(directory.path()).unwrap();
        (directory, store)
    }

    fn commit(store: &StateStore, staged: StagedChunks, container_id: u64) {
        let mut batch = rocksdb::WriteBatch::default();
        for (key, value) in staged.into_rows(container_id) {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        store.write_synced(batch).unwrap();
    }

    #[test]
    fn a_transaction_reads_its_own_changes_across_chunk_edges() {
        let (_directory, store) = store();
        let mut staged = StagedChunks::default();
        // Blocks 250..=260 span chunks 0 and 1.
        staged
            .set(
                &store,
                7,
                3,
                (250..=260).map(|block| (block, Some(written(1000 + block)))),
            )
            .unwrap();
        let seen = staged.references(&store, 7, 3, 0, 600).unwrap();
        assert_eq!(seen.len(), 11);
        assert_eq!(seen[0], (250, written(1250)));
        assert_eq!(seen[10], (260, written(1260)));
        // A second change to the same chunk in the same transaction keeps the first.
        staged
            .set(&store, 7, 3, [(255, None), (256, None)])
            .unwrap();
        let seen = staged.references(&store, 7, 3, 250, 260).unwrap();
        let blocks: Vec<u64> = seen.iter().map(|(block, _)| *block).collect();
        assert_eq!(blocks, vec![250, 251, 252, 253, 254, 257, 258, 259, 260]);
        // Nothing stored before the commit; everything after it.
        assert!(references(&store, 7, 3, 0, 600).unwrap().is_empty());
        commit(&store, staged, 7);
        assert_eq!(references(&store, 7, 3, 0, 600).unwrap(), seen);
        // Another inode and another container see nothing.
        assert!(references(&store, 7, 4, 0, 600).unwrap().is_empty());
        assert!(references(&store, 8, 3, 0, 600).unwrap().is_empty());
    }

    #[test]
    fn a_chunk_that_loses_its_last_reference_loses_its_row() {
        let (_directory, store) = store();
        let mut staged = StagedChunks::default();
        staged.set(&store, 1, 2, [(5, Some(written(9)))]).unwrap();
        commit(&store, staged, 1);
        let mut staged = StagedChunks::default();
        staged.set(&store, 1, 2, [(5, None)]).unwrap();
        commit(&store, staged, 1);
        let (start, end) = keys::container_range(keys::TAG_CHUNK, 1);
        assert!(store.scan_collect(&start, &end, 10).unwrap().is_empty());
    }

    #[test]
    fn pages_walk_a_container_in_logical_key_order_from_any_key() {
        let (_directory, store) = store();
        let mut staged = StagedChunks::default();
        let blocks: Vec<(u64, u64)> = vec![(2, 0), (2, 1), (2, 255), (2, 256), (2, 9000), (5, 3)];
        for &(inode, block) in &blocks {
            staged
                .set(
                    &store,
                    4,
                    inode,
                    [(block, Some(written(inode * 100_000 + block)))],
                )
                .unwrap();
        }
        commit(&store, staged, 4);
        let expected: Vec<Vec<u8>> = blocks
            .iter()
            .map(|&(inode, block)| keys::block(4, inode, block))
            .collect();
        let (start, _) = keys::container_range(keys::TAG_BLOCK, 4);
        // Pages of every size cover everything once, each page from the key after the last.
        for limit in 1..=7 {
            let mut from = start.clone();
            let mut seen = Vec::new();
            for _ in 0..20 {
                let page = page(&store, 4, &from, limit).unwrap();
                seen.extend(page.iter().map(|(key, _)| key.clone()));
                match page.last() {
                    Some((key, _)) if page.len() == limit => {
                        from = key.clone();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            assert_eq!(seen, expected, "limit {limit}");
        }
        // From a logical key itself: that block first.
        let from_key = page(&store, 4, &keys::block(4, 2, 256), 2).unwrap();
        assert_eq!(from_key[0].0, keys::block(4, 2, 256));
        assert_eq!(from_key[1].0, keys::block(4, 2, 9000));
        assert_eq!(
            reference_at(&store, &keys::block(4, 5, 3)).unwrap(),
            Some(written(500_003))
        );
        assert_eq!(reference_at(&store, &keys::block(4, 5, 4)).unwrap(), None);
        // Other containers' rows are not in the page.
        assert!(
            page(&store, 3, &keys::container_range(keys::TAG_BLOCK, 3).0, 10)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_builder_fed_in_key_order_writes_the_rows_a_transaction_would() {
        let (_directory, store) = store();
        let blocks: Vec<(u64, u64, BlockRef)> = (0..700u64)
            .filter(|block| block % 5 != 2)
            .map(|block| {
                let reference = if block % 9 == 0 {
                    BlockRef::unwritten()
                } else {
                    written(40 + block)
                };
                (1 + block / 600, block % 600, reference)
            })
            .collect();
        let mut builder = ChunkRowsBuilder::new(6);
        let mut rows = Vec::new();
        for group in blocks.chunks(97) {
            for (inode, block, reference) in group {
                builder.add(&keys::block(6, *inode, *block), *reference);
            }
            let (inode, block, _) = group.last().unwrap();
            rows.extend(builder.complete_before(&keys::block(6, *inode, *block)));
        }
        rows.extend(builder.finish());
        let mut batch = rocksdb::WriteBatch::default();
        for (key, value) in &rows {
            batch.put(key, value);
        }
        store.write_synced(batch).unwrap();
        // Each chunk row written once, and the map equals what was fed.
        let mut keys_written: Vec<&Vec<u8>> = rows.iter().map(|(key, _)| key).collect();
        keys_written.dedup();
        assert_eq!(keys_written.len(), rows.len());
        for inode in [1u64, 2] {
            let want: Vec<(u64, BlockRef)> = blocks
                .iter()
                .filter(|(i, _, _)| *i == inode)
                .map(|(_, block, reference)| (*block, *reference))
                .collect();
            assert_eq!(references(&store, 6, inode, 0, u64::MAX).unwrap(), want);
        }
    }

    /// One step of the model test: a change of a range of blocks (each written on consecutive
    /// device blocks from `device_first`, unwritten, or made a hole), a commit, or nothing.
    #[derive(Debug, Clone)]
    enum Step {
        Change {
            inode: u64,
            first: u64,
            count: u64,
            kind: u8,
            device_first: u64,
        },
        Commit,
    }

    fn step_strategy() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1u64..=2, 0u64..700, 1u64..300, 0u8..3, 0u64..1_000_000).prop_map(
                |(inode, first, count, kind, device_first)| Step::Change {
                    inode,
                    first,
                    count,
                    kind,
                    device_first,
                }
            ),
            1 => Just(Step::Commit),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Changes across chunk edges, read back through the transaction before and after
        /// commits, and walked page by page, always equal a model of one reference per block.
        #[test]
        fn the_block_map_equals_a_model_of_one_reference_per_block(
            steps in proptest::collection::vec(step_strategy(), 1..25),
            windows in proptest::collection::vec((0u64..1000, 0u64..400), 4),
        ) {
            let (_directory, store) = store();
            let mut model: BTreeMap<(u64, u64), BlockRef> = BTreeMap::new();
            let mut staged = StagedChunks::default();
            let check = |staged: &mut StagedChunks, model: &BTreeMap<(u64, u64), BlockRef>| {
                for inode in 1u64..=2 {
                    for &(first, length) in &windows {
                        let last = first + length;
                        let want: Vec<(u64, BlockRef)> = model
                            .range((inode, first)..=(inode, last))
                            .map(|(&(_, block), &reference)| (block, reference))
                            .collect();
                        let seen = staged.references(&store, 9, inode, first, last).unwrap();
                        assert_eq!(seen, want, "inode {inode} blocks {first}..={last}");
                    }
                }
            };
            for step in steps {
                match step {
                    Step::Change { inode, first, count, kind, device_first } => {
                        let changes: Vec<(u64, Option<BlockRef>)> = (0..count)
                            .map(|offset| {
                                let reference = match kind {
                                    0 => Some(written(device_first + offset)),
                                    1 => Some(BlockRef::unwritten()),
                                    _ => None,
                                };
                                (first + offset, reference)
                            })
                            .collect();
                        for &(block, reference) in &changes {
                            match reference {
                                Some(reference) => model.insert((inode, block), reference),
                                None => model.remove(&(inode, block)),
                            };
                        }
                        staged.set(&store, 9, inode, changes).unwrap();
                    }
                    Step::Commit => {
                        commit(&store, std::mem::take(&mut staged), 9);
                    }
                }
                check(&mut staged, &model);
            }
            commit(&store, staged, 9);
            // Stored, page by page from the container's start: the whole model in key order.
            let (start, _) = keys::container_range(keys::TAG_BLOCK, 9);
            let mut from = start;
            let mut walked = Vec::new();
            for _ in 0..10_000 {
                let page = page(&store, 9, &from, 97).unwrap();
                walked.extend(page.iter().map(|(key, reference)| {
                    ((keys::block_key_inode(key), keys::block_key_file_block(key)), *reference)
                }));
                match page.last() {
                    Some((key, _)) if page.len() == 97 => {
                        from = key.clone();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            let want: Vec<((u64, u64), BlockRef)> =
                model.iter().map(|(&position, &reference)| (position, reference)).collect();
            assert_eq!(walked, want);
            // Every stored row is a valid, non-empty chunk row.
            let (rows_start, rows_end) = keys::container_range(keys::TAG_CHUNK, 9);
            for (key, value) in store.scan_collect(&rows_start, &rows_end, usize::MAX).unwrap() {
                ChunkRow::decode(&value).unwrap_or_else(|error| panic!("{key:02x?}: {error}"));
            }
        }
    }

    #[test]
    fn a_lookup_in_key_order_agrees_with_single_reads() {
        let (_directory, store) = store();
        let mut staged = StagedChunks::default();
        staged
            .set(
                &store,
                2,
                7,
                (100..700).map(|block| (block, Some(written(block * 3)))),
            )
            .unwrap();
        staged
            .set(
                &store,
                2,
                7,
                [(300, None), (301, Some(BlockRef::unwritten()))],
            )
            .unwrap();
        commit(&store, staged, 2);
        let mut lookup = ReferenceLookup::default();
        for (inode, block) in [
            (7, 0),
            (7, 100),
            (7, 300),
            (7, 301),
            (7, 699),
            (7, 700),
            (8, 5),
        ] {
            let key = keys::block(2, inode, block);
            assert_eq!(
                lookup.reference_at(&store, &key).unwrap(),
                reference_at(&store, &key).unwrap(),
                "inode {inode} block {block}"
            );
        }
    }

    #[test]
    fn a_broken_chunk_row_is_an_error_not_a_map() {
        let (_directory, store) = store();
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(keys::chunk(1, 2, 0), vec![1, 2, 3]);
        store.write_synced(batch).unwrap();
        assert!(references(&store, 1, 2, 0, 10).is_err());
        assert!(page(&store, 1, &keys::container_range(keys::TAG_BLOCK, 1).0, 10).is_err());
    }

    #[test]
    fn per_block_rows_convert_into_the_same_map_and_the_version_is_stamped() {
        let (_directory, store) = store();
        let mut batch = rocksdb::WriteBatch::default();
        let mut expected = Vec::new();
        // More rows than one conversion batch, over several inodes and containers, with holes
        // and unwritten blocks.
        for container_id in [3u64, 9] {
            for inode in [1u64, 2] {
                for block in (0..(CONVERSION_BATCH_BLOCKS_MAX as u64 + 700)).filter(|b| b % 7 != 3)
                {
                    let reference = if block % 11 == 0 {
                        BlockRef::unwritten()
                    } else {
                        written(block * 3 + inode)
                    };
                    batch.put(
                        keys::block(container_id, inode, block),
                        crate::records::encode(&reference),
                    );
                    expected.push((container_id, inode, block, reference));
                }
            }
        }
        store.write_synced(batch).unwrap();
        assert_eq!(format_version(&store).unwrap(), None);
        // Cut short after one batch, as by a crash: whole chunks converted, the rest left as
        // block rows, no version yet. The next start goes on from there.
        let first_batch = convert_block_rows_up_to(&store, 1).unwrap();
        assert!(first_batch >= CONVERSION_BATCH_BLOCKS_MAX as u64);
        assert!(first_batch < expected.len() as u64);
        assert_eq!(format_version(&store).unwrap(), None);
        let converted = first_batch + convert_block_rows(&store).unwrap();
        assert_eq!(converted, expected.len() as u64);
        assert_eq!(
            format_version(&store).unwrap(),
            Some(FORMAT_VERSION_CHUNK_ROWS)
        );
        let left = store
            .scan_collect(&[keys::TAG_BLOCK], &[keys::TAG_BLOCK + 1], 1)
            .unwrap();
        assert!(left.is_empty(), "no per-block row is left");
        for container_id in [3u64, 9] {
            for inode in [1u64, 2] {
                let want: Vec<(u64, BlockRef)> = expected
                    .iter()
                    .filter(|(c, i, _, _)| *c == container_id && *i == inode)
                    .map(|(_, _, block, reference)| (*block, *reference))
                    .collect();
                assert_eq!(
                    references(&store, container_id, inode, 0, u64::MAX).unwrap(),
                    want
                );
            }
        }
        // Running it again changes nothing.
        assert_eq!(convert_block_rows(&store).unwrap(), 0);
    }

    #[test]
    fn a_store_of_a_newer_format_is_refused() {
        let (_directory, store) = store();
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(keys::format_version(), crate::records::encode(&9u64));
        store.write_synced(batch).unwrap();
        let error = convert_block_rows(&store).unwrap_err();
        assert!(error.to_string().contains("format version 9"), "{error}");
    }
}
