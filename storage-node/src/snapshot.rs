//! Container snapshots for transfer between nodes: a logical, checksummed export of one
//! container's state, streamed through a spool file, and its import on another node.
//!
//! Owns: the snapshot stream format (see `docs/on-disk-format.md`, "Snapshot stream"), the rules
//! of what a container's state is, and the export and import pipelines.
//! Must not depend on: Raft beyond log ids and membership, the network.
//!
//! Format: the magic `BLSNAP02`, then frames of `[length u32 LE][crc32 u32 LE][item]`. An item is
//! a kind byte and its fields, little-endian:
//! - `1` row: `[key length u32][key][value]` (the value runs to the end of the frame);
//! - `2` block: `[key length u32][key][block CRC-32 u32][4096 bytes of data]`;
//! - `3` end: `[row count u64][block count u64]`, the last frame;
//! - `4` unwritten block: `[key length u32][key]`, a block reference with no data (from
//!   `fallocate`), which reads as zeros. It counts in the end's block count.
//!
//! Block items (kinds 2 and 4) come in strictly increasing key order, as the export scans them;
//! the importer refuses anything else, so no key is imported twice.
//!
//! Block references are *logical* (inode, file block): device block numbers are private to a
//! node, so the importer allocates its own blocks and writes new references. The items are
//! coded by hand rather than with postcard, which codes a byte vector one byte at a time.
//!
//! Memory stays bounded on both sides, whatever the container's size: the export reads rows and
//! blocks page by page (`EXPORT_PAGE_ROWS_MAX`, `EXPORT_PAGE_BLOCKS_MAX`) into a buffer of at
//! most `OUTPUT_BUFFER_BYTES` before it goes to the spool file, and the import reads frames in
//! groups of at most `EXPORT_PAGE_BLOCKS_MAX` blocks. The one thing that grows with the
//! container is the import's RocksDB batch: the container's rows and chunk rows (about 1.3 KB
//! per MiB of data, built as the block items arrive in key order, `block_map::ChunkRowsBuilder`),
//! which must land in one atomic write.
//!
//! Invariants:
//! - Export reads an [`ExportView`]: a RocksDB snapshot taken between two applies, whose blocks
//!   keep their bytes until the view is dropped (rule 4 of `storage.rs`). So rows and blocks are
//!   one consistent state while applies go on.
//! - Every block is verified against its CRC when the export reads it: a corrupt local block is
//!   never shipped to another replica.
//! - Import checks everything before the state changes: magic, every frame's CRC, every key lies
//!   inside this container's ranges, every block's data matches its CRC, the counts, and nothing
//!   after the end. New blocks are written as frames arrive but stay unreferenced until the one
//!   batch that replaces the state; any failure gives them back and leaves the old state.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ballast_device::{AlignedBuffer, BLOCK_SIZE_BYTES};
use rocksdb::WriteBatch;
use tokio::sync::oneshot;

use crate::block_map;
use crate::error::{NodeError, NodeResult};
use crate::keys;
use crate::records::{decode, encode, BlockRef, ContainerState};
use crate::snapshot_spool::{ExportProgress, SpooledSnapshot};
use crate::state_store::StateView;
use crate::storage::{NodeStorage, BLOCKS_PER_REQUEST_MAX};
use crate::types::METADATA_CONTAINER_ID;

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"BLSNAP02";
/// Largest frame payload: a block item with a generous key, or a row. Rows of this store are far
/// smaller; the limit keeps a damaged length from asking for gigabytes.
const FRAME_BYTES_MAX: usize = 1 << 20;
const FRAME_HEADER_BYTES: usize = 8;
const KIND_ROW: u8 = 1;
const KIND_BLOCK: u8 = 2;
const KIND_END: u8 = 3;
const KIND_UNWRITTEN: u8 = 4;
/// Device requests (of up to `BLOCKS_PER_REQUEST_MAX` blocks each) an export or import keeps in
/// flight; well under the engine's 128, so other containers' I/O still gets through.
const DEVICE_REQUESTS_IN_FLIGHT_MAX: usize = 8;
/// Blocks read (export) or written (import) per page: 8 MiB of data.
const EXPORT_PAGE_BLOCKS_MAX: usize =
    BLOCKS_PER_REQUEST_MAX as usize * DEVICE_REQUESTS_IN_FLIGHT_MAX;
/// Rows read per page of the export.
const EXPORT_PAGE_ROWS_MAX: usize = 4096;
/// The export's output buffer is written out once it holds this much.
const OUTPUT_BUFFER_BYTES: usize = 8 << 20;
/// The import's read buffer on the spool file.
const INPUT_BUFFER_BYTES: usize = 4 << 20;

/// One decoded item, borrowing the frame it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotItem<'frame> {
    Row {
        key: &'frame [u8],
        value: &'frame [u8],
    },
    Block {
        key: &'frame [u8],
        checksum: u32,
        data: &'frame [u8],
    },
    End {
        row_count: u64,
        block_count: u64,
    },
    Unwritten {
        key: &'frame [u8],
    },
}

/// Row tables exported whole for a container (its state row comes separately).
fn row_ranges(container_id: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    if container_id == METADATA_CONTAINER_ID {
        [keys::TAG_VOLUME, keys::TAG_NODE, keys::TAG_CONTAINER_RECORD]
            .into_iter()
            .map(|tag| (vec![tag], vec![tag + 1]))
            .collect()
    } else {
        [
            keys::TAG_INODE,
            keys::TAG_DIRENT,
            keys::TAG_DIRENT_COOKIE,
            keys::TAG_ORPHAN,
            keys::TAG_SESSION,
        ]
        .into_iter()
        .map(|tag| keys::container_range(tag, container_id))
        .collect()
    }
}

fn in_ranges(key: &[u8], ranges: &[(Vec<u8>, Vec<u8>)]) -> bool {
    ranges
        .iter()
        .any(|(start, end)| key >= start.as_slice() && key < end.as_slice())
}

/// The bytes `push_frame` appends for `item`: the frame header and the item's payload.
pub fn frame_length_bytes(item: &SnapshotItem<'_>) -> usize {
    const KEY_LENGTH_BYTES: usize = 4;
    const CHECKSUM_BYTES: usize = 4;
    const COUNTS_BYTES: usize = 16;
    let payload_bytes = 1 + match *item {
        SnapshotItem::Row { key, value } => KEY_LENGTH_BYTES + key.len() + value.len(),
        SnapshotItem::Block { key, data, .. } => {
            KEY_LENGTH_BYTES + key.len() + CHECKSUM_BYTES + data.len()
        }
        SnapshotItem::End { .. } => COUNTS_BYTES,
        SnapshotItem::Unwritten { key } => KEY_LENGTH_BYTES + key.len(),
    };
    FRAME_HEADER_BYTES + payload_bytes
}

/// Appends one frame holding `item` to `output`. The payload is written in place and checksummed
/// there: no intermediate copy. An item over `FRAME_BYTES_MAX` is refused (and not appended):
/// no importer would accept it.
pub fn push_frame(output: &mut Vec<u8>, item: &SnapshotItem<'_>) -> NodeResult<()> {
    let header_at = output.len();
    output.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    match *item {
        SnapshotItem::Row { key, value } => {
            output.push(KIND_ROW);
            output.extend_from_slice(&(key.len() as u32).to_le_bytes());
            output.extend_from_slice(key);
            output.extend_from_slice(value);
        }
        SnapshotItem::Block {
            key,
            checksum,
            data,
        } => {
            output.push(KIND_BLOCK);
            output.extend_from_slice(&(key.len() as u32).to_le_bytes());
            output.extend_from_slice(key);
            output.extend_from_slice(&checksum.to_le_bytes());
            output.extend_from_slice(data);
        }
        SnapshotItem::End {
            row_count,
            block_count,
        } => {
            output.push(KIND_END);
            output.extend_from_slice(&row_count.to_le_bytes());
            output.extend_from_slice(&block_count.to_le_bytes());
        }
        SnapshotItem::Unwritten { key } => {
            output.push(KIND_UNWRITTEN);
            output.extend_from_slice(&(key.len() as u32).to_le_bytes());
            output.extend_from_slice(key);
        }
    }
    assert_eq!(
        output.len() - header_at,
        frame_length_bytes(item),
        "a frame's length is what planning counts"
    );
    let payload = &output[header_at + FRAME_HEADER_BYTES..];
    if payload.len() > FRAME_BYTES_MAX {
        let length = payload.len();
        output.truncate(header_at);
        return Err(NodeError::InvalidState(format!(
            "a snapshot item of {length} bytes exceeds the frame limit of {FRAME_BYTES_MAX}"
        )));
    }
    let length = payload.len() as u32;
    let checksum = ballast_common::checksum(payload);
    output[header_at..header_at + 4].copy_from_slice(&length.to_le_bytes());
    output[header_at + 4..header_at + 8].copy_from_slice(&checksum.to_le_bytes());
    Ok(())
}

/// Decodes one item's payload; any shape error is `None`.
fn decode_item(payload: &[u8]) -> Option<SnapshotItem<'_>> {
    let (&kind, rest) = payload.split_first()?;
    fn split_key(rest: &[u8]) -> Option<(&[u8], &[u8])> {
        let length = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let rest = &rest[4..];
        (length <= rest.len()).then(|| rest.split_at(length))
    }
    match kind {
        KIND_ROW => {
            let (key, value) = split_key(rest)?;
            Some(SnapshotItem::Row { key, value })
        }
        KIND_BLOCK => {
            let (key, rest) = split_key(rest)?;
            let checksum = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
            Some(SnapshotItem::Block {
                key,
                checksum,
                data: &rest[4..],
            })
        }
        KIND_END if rest.len() == 16 => Some(SnapshotItem::End {
            row_count: u64::from_le_bytes(rest[..8].try_into().ok()?),
            block_count: u64::from_le_bytes(rest[8..].try_into().ok()?),
        }),
        KIND_UNWRITTEN => match split_key(rest)? {
            (key, []) => Some(SnapshotItem::Unwritten { key }),
            _ => None,
        },
        _ => None,
    }
}

/// Where an export's frames go.
enum OutputTarget {
    /// Positional writes into a spool file, each published to the reader behind the export.
    Spool(Arc<std::fs::File>, Arc<ExportProgress>),
    /// Only a CRC-32 of the stream, for comparing replicas.
    Digest(crc32fast::Hasher),
}

/// The export's output: frames gather in a bounded buffer, written out when it fills.
struct FrameOutput {
    buffer: Vec<u8>,
    target: OutputTarget,
    written_bytes: u64,
}

impl FrameOutput {
    fn new(target: OutputTarget) -> Self {
        let mut buffer = Vec::with_capacity(OUTPUT_BUFFER_BYTES + FRAME_BYTES_MAX);
        buffer.extend_from_slice(SNAPSHOT_MAGIC);
        Self {
            buffer,
            target,
            written_bytes: 0,
        }
    }

    async fn push(&mut self, item: &SnapshotItem<'_>) -> NodeResult<()> {
        push_frame(&mut self.buffer, item)?;
        if self.buffer.len() >= OUTPUT_BUFFER_BYTES {
            self.write_out().await?;
        }
        Ok(())
    }

    async fn write_out(&mut self) -> NodeResult<()> {
        match &mut self.target {
            OutputTarget::Digest(hasher) => hasher.update(&self.buffer),
            OutputTarget::Spool(file, progress) => {
                let file = Arc::clone(file);
                let progress = Arc::clone(progress);
                let buffer = std::mem::take(&mut self.buffer);
                let offset = self.written_bytes;
                let (buffer, result) = tokio::task::spawn_blocking(move || {
                    let result = file.write_all_at(&buffer, offset);
                    (buffer, result)
                })
                .await
                .map_err(|error| NodeError::InvalidState(format!("spool write task: {error}")))?;
                result.map_err(|source| NodeError::Io {
                    context: format!("write snapshot spool at byte {offset}"),
                    source,
                })?;
                progress.advance(offset + buffer.len() as u64);
                self.buffer = buffer;
            }
        }
        self.written_bytes += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Writes what is left; returns the stream's size and, for a digest, its CRC.
    async fn finish(mut self) -> NodeResult<(u64, u32)> {
        self.write_out().await?;
        let digest = match self.target {
            OutputTarget::Digest(hasher) => hasher.finalize(),
            OutputTarget::Spool(..) => 0,
        };
        Ok((self.written_bytes, digest))
    }
}

/// The container's state row as the view holds it.
fn read_state(view: &StateView<'_>, container_id: u64) -> NodeResult<(Vec<u8>, ContainerState)> {
    let state_key = keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id);
    let state_bytes = view
        .get_raw(&state_key)?
        .unwrap_or_else(|| encode(&ContainerState::default()));
    let state = decode(&state_bytes, "container state")?;
    Ok((state_bytes, state))
}

/// Collects up to `limit` rows of `[start, end)` from the view.
fn scan_page(
    view: &StateView<'_>,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> NodeResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut rows = Vec::new();
    view.scan(start, end, limit, |key, value| {
        rows.push((key.to_vec(), value.to_vec()));
        Ok(true)
    })?;
    Ok(rows)
}

/// The smallest key after `key`.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// The item of one block reference: an unwritten one travels as its key only.
fn block_item<'item>(
    key: &'item [u8],
    reference: &BlockRef,
    data: &'item [u8],
) -> SnapshotItem<'item> {
    if reference.is_unwritten() {
        SnapshotItem::Unwritten { key }
    } else {
        SnapshotItem::Block {
            key,
            checksum: reference.checksum,
            data,
        }
    }
}

/// The exact length of the stream [`write_stream`] writes for `container_id` from `view`, counted
/// from the rows and block references alone (no block is read), so the reader behind the export
/// knows the end before the export gets there. Both walk the same view, so they see the same
/// rows; the export checks that it wrote exactly this much.
fn planned_stream_length_bytes(
    view: &StateView<'_>,
    container_id: u64,
    state_bytes: &[u8],
) -> NodeResult<u64> {
    let state_key = keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id);
    let mut length_bytes = (SNAPSHOT_MAGIC.len()
        + frame_length_bytes(&SnapshotItem::Row {
            key: &state_key,
            value: state_bytes,
        })) as u64;
    let mut row_count = 1u64;
    for (start, end) in row_ranges(container_id) {
        view.scan(&start, &end, usize::MAX, |key, value| {
            length_bytes += frame_length_bytes(&SnapshotItem::Row { key, value }) as u64;
            row_count += 1;
            Ok(true)
        })?;
    }
    let mut block_count = 0u64;
    if container_id != METADATA_CONTAINER_ID {
        let data = [0u8; BLOCK_SIZE_BYTES];
        block_map::visit_container(view, container_id, |key, reference| {
            length_bytes += frame_length_bytes(&block_item(key, reference, &data)) as u64;
            block_count += 1;
            Ok(())
        })?;
    }
    length_bytes += frame_length_bytes(&SnapshotItem::End {
        row_count,
        block_count,
    }) as u64;
    Ok(length_bytes)
}

/// Writes the whole stream of `container_id` as `view` sees it. `keep_going` is asked between
/// pages; when it says no, the export stops with an error.
async fn write_stream(
    storage: &NodeStorage,
    view: &StateView<'_>,
    container_id: u64,
    state_bytes: &[u8],
    output: &mut FrameOutput,
    keep_going: impl Fn() -> bool,
) -> NodeResult<()> {
    let stopped = || NodeError::InvalidState("snapshot export abandoned by its reader".into());
    let state_key = keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id);
    output
        .push(&SnapshotItem::Row {
            key: &state_key,
            value: state_bytes,
        })
        .await?;
    let mut row_count = 1u64;
    for (start, end) in row_ranges(container_id) {
        let mut from = start;
        loop {
            let rows = scan_page(view, &from, &end, EXPORT_PAGE_ROWS_MAX)?;
            for (key, value) in &rows {
                output.push(&SnapshotItem::Row { key, value }).await?;
                row_count += 1;
            }
            match rows.last() {
                Some((key, _)) if rows.len() == EXPORT_PAGE_ROWS_MAX => from = key_after(key),
                _ => break,
            }
            if !keep_going() {
                return Err(stopped());
            }
        }
    }
    let mut block_count = 0u64;
    if container_id != METADATA_CONTAINER_ID {
        let (mut from, _) = keys::container_range(keys::TAG_BLOCK, container_id);
        loop {
            let page = block_map::page(view, container_id, &from, EXPORT_PAGE_BLOCKS_MAX)?;
            let references: Vec<BlockRef> = page.iter().map(|(_, reference)| *reference).collect();
            // Several device reads in flight: one at a time left the disk idle between them.
            let reads = references
                .chunks(BLOCKS_PER_REQUEST_MAX as usize)
                .map(|chunk| storage.read_verified(chunk, "snapshot export"));
            let data = futures::future::try_join_all(reads).await?;
            let blocks = data.iter().flat_map(|piece| piece.chunks(BLOCK_SIZE_BYTES));
            for (((key, _), reference), block) in page.iter().zip(&references).zip(blocks) {
                output.push(&block_item(key, reference, block)).await?;
                block_count += 1;
            }
            match page.last() {
                Some((key, _)) if page.len() == EXPORT_PAGE_BLOCKS_MAX => from = key_after(key),
                _ => break,
            }
            if !keep_going() {
                return Err(stopped());
            }
        }
    }
    output
        .push(&SnapshotItem::End {
            row_count,
            block_count,
        })
        .await
}

/// Starts exporting a container's current state into a spool file. Returns as soon as the
/// consistent view is taken, with the state row it holds (whose applied log id names the
/// snapshot) and the snapshot data, which reads behind the export (the export first counts the
/// stream's length, then writes it). The export stops early if the snapshot data is dropped.
pub async fn start_export(
    storage: &Arc<NodeStorage>,
    container_id: u64,
) -> NodeResult<(ContainerState, SpooledSnapshot)> {
    let file = storage.spool.create_file("export")?;
    let writer = Arc::new(file.try_clone().map_err(|source| NodeError::Io {
        context: "duplicate a spool file".into(),
        source,
    })?);
    let (state_sender, state_receiver) = oneshot::channel();
    let (snapshot, progress) = SpooledSnapshot::exporting(file);
    let progress = Arc::new(progress);
    let storage = Arc::clone(storage);
    tokio::spawn(async move {
        let view = storage.export_view().await;
        let state_bytes = match read_state(&view.state, container_id) {
            Ok((state_bytes, state)) => {
                let _ = state_sender.send(Ok(state));
                state_bytes
            }
            Err(error) => {
                let _ = state_sender.send(Err(error));
                return;
            }
        };
        let _slot = storage.export_slot().await;
        let started = std::time::Instant::now();
        let written = match planned_stream_length_bytes(&view.state, container_id, &state_bytes) {
            Ok(planned_bytes) => {
                progress.plan(planned_bytes);
                let mut output =
                    FrameOutput::new(OutputTarget::Spool(writer, Arc::clone(&progress)));
                write_stream(
                    &storage,
                    &view.state,
                    container_id,
                    &state_bytes,
                    &mut output,
                    || !progress.abandoned(),
                )
                .await
                .map(|()| output)
            }
            Err(error) => Err(error),
        };
        drop(view);
        let outcome = match written {
            Ok(output) => output.finish().await.map(|(size_bytes, _)| size_bytes),
            Err(error) => Err(error),
        };
        match &outcome {
            Ok(size_bytes) => tracing::info!(
                container = container_id,
                size_bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot exported to the spool"
            ),
            Err(error) => {
                tracing::warn!(container = container_id, %error, "snapshot export failed")
            }
        }
        progress.finish(outcome.map_err(|error| error.to_string()));
    });
    let state = state_receiver
        .await
        .map_err(|_| NodeError::InvalidState("the export task ended early".into()))??;
    Ok((state, snapshot))
}

/// A replica's content digest: the CRC-32 of its snapshot stream, its size, and the state it
/// was taken at. Streams through the same code as an export, without a spool file.
pub async fn digest(
    storage: &NodeStorage,
    container_id: u64,
) -> NodeResult<(u32, u64, ContainerState)> {
    let view = storage.export_view().await;
    let (state_bytes, state) = read_state(&view.state, container_id)?;
    let mut output = FrameOutput::new(OutputTarget::Digest(crc32fast::Hasher::new()));
    write_stream(
        storage,
        &view.state,
        container_id,
        &state_bytes,
        &mut output,
        || true,
    )
    .await?;
    drop(view);
    let (size_bytes, digest) = output.finish().await?;
    Ok((digest, size_bytes, state))
}

/// Reads and checks a snapshot stream frame by frame (see the module invariants).
pub struct SnapshotReader<R> {
    input: R,
    container_id: u64,
    offset: u64,
    payload: Vec<u8>,
    state_key: Vec<u8>,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    block_range: [(Vec<u8>, Vec<u8>); 1],
    state: Option<ContainerState>,
    row_count: u64,
    block_count: u64,
    /// The last block item's key: block keys must increase strictly.
    block_key_last: Vec<u8>,
    ended: bool,
}

/// One group of checked items, owned, for the import to apply.
#[derive(Debug, Default)]
pub struct ItemGroup {
    pub rows: Vec<(Vec<u8>, Vec<u8>)>,
    /// Key and CRC of each block, in order, and the device block this node already holds with
    /// that content (reused, not written again), if any.
    pub blocks: Vec<(Vec<u8>, u32, Option<u64>)>,
    /// Keys of the unwritten blocks (from `fallocate`, no data), in order.
    pub unwritten: Vec<Vec<u8>>,
    /// The data of the blocks not reused, in order, in device requests of at most
    /// `BLOCKS_PER_REQUEST_MAX` blocks.
    pub data: Vec<AlignedBuffer>,
}

/// What a fully read stream held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    pub state: ContainerState,
    pub row_count: u64,
    pub block_count: u64,
    pub size_bytes: u64,
}

impl<R: Read> SnapshotReader<R> {
    /// Checks the magic and gets ready to read frames.
    pub fn new(mut input: R, container_id: u64) -> NodeResult<Self> {
        let mut magic = [0u8; SNAPSHOT_MAGIC.len()];
        let corrupt = |message: &str| {
            NodeError::InvalidState(format!("snapshot of container {container_id}: {message}"))
        };
        read_fully(&mut input, &mut magic).map_err(|_| corrupt("bad magic"))?;
        if &magic != SNAPSHOT_MAGIC {
            return Err(corrupt("bad magic"));
        }
        Ok(Self {
            input,
            container_id,
            offset: SNAPSHOT_MAGIC.len() as u64,
            payload: Vec::new(),
            state_key: keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id),
            ranges: row_ranges(container_id),
            block_range: [keys::container_range(keys::TAG_BLOCK, container_id)],
            state: None,
            row_count: 0,
            block_count: 0,
            block_key_last: Vec::new(),
            ended: false,
        })
    }

    fn corrupt(&self, message: String) -> NodeError {
        NodeError::InvalidState(format!(
            "snapshot of container {}: {message}",
            self.container_id
        ))
    }

    /// Reads checked items into a group until it holds `blocks_max` blocks (or as many rows'
    /// worth of bytes), or the stream ends. Returns `None` after the end.
    /// `reusable` names the device block this node already holds for a block's key with the
    /// same CRC, if any: that block is not copied into the group's data.
    pub fn read_group(
        &mut self,
        blocks_max: usize,
        reusable: &dyn Fn(&[u8], u32) -> Option<u64>,
    ) -> NodeResult<Option<ItemGroup>> {
        if self.ended {
            return Ok(None);
        }
        let mut group = ItemGroup::default();
        let mut group_bytes = 0usize;
        let mut request: Option<AlignedBuffer> = None;
        let mut request_blocks = 0usize;
        let bytes_max = blocks_max * BLOCK_SIZE_BYTES;
        while group.blocks.len() < blocks_max && group_bytes < bytes_max && !self.ended {
            let Some(item) = self.next_item()? else {
                break;
            };
            match item {
                CheckedItem::Row { key, value } => {
                    group_bytes += key.len() + value.len();
                    group.rows.push((key, value));
                }
                CheckedItem::Block {
                    key,
                    checksum,
                    data,
                } => {
                    group_bytes += BLOCK_SIZE_BYTES;
                    if let Some(device_block) = reusable(&key, checksum) {
                        group.blocks.push((key, checksum, Some(device_block)));
                        continue;
                    }
                    let buffer = request.get_or_insert_with(|| {
                        AlignedBuffer::new_zeroed(
                            BLOCKS_PER_REQUEST_MAX as usize * BLOCK_SIZE_BYTES,
                        )
                    });
                    buffer[request_blocks * BLOCK_SIZE_BYTES
                        ..(request_blocks + 1) * BLOCK_SIZE_BYTES]
                        .copy_from_slice(&data);
                    request_blocks += 1;
                    if request_blocks == BLOCKS_PER_REQUEST_MAX as usize {
                        group.data.extend(request.take());
                        request_blocks = 0;
                    }
                    group.blocks.push((key, checksum, None));
                }
                CheckedItem::Unwritten { key } => {
                    // No data to write: only the reference.
                    group_bytes += key.len();
                    group.unwritten.push(key);
                }
                CheckedItem::State | CheckedItem::End => {}
            }
        }
        if let Some(buffer) = request {
            group.data.push(AlignedBuffer::from_slice_padded(
                &buffer[..request_blocks * BLOCK_SIZE_BYTES],
            ));
        }
        Ok(Some(group))
    }

    /// Reads the next frame and checks its item; `None` once the end has been read.
    fn next_item(&mut self) -> NodeResult<Option<CheckedItem>> {
        if self.ended {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        read_fully(&mut self.input, &mut header)
            .map_err(|message| self.corrupt(format!("{message} at byte {}", self.offset)))?;
        let length = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if length > FRAME_BYTES_MAX {
            return Err(self.corrupt(format!(
                "frame of {length} bytes at byte {} is too large",
                self.offset
            )));
        }
        self.offset += FRAME_HEADER_BYTES as u64;
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(length, 0);
        read_fully(&mut self.input, &mut payload).map_err(|message| {
            self.corrupt(format!("{message} in the frame at byte {}", self.offset))
        })?;
        self.offset += length as u64;
        let checked = self.check(&payload, checksum);
        self.payload = payload;
        checked.map(Some)
    }

    fn check(&mut self, payload: &[u8], checksum: u32) -> NodeResult<CheckedItem> {
        if ballast_common::checksum(payload) != checksum {
            return Err(self.corrupt(format!(
                "frame ending at byte {} fails its checksum",
                self.offset
            )));
        }
        let Some(item) = decode_item(payload) else {
            return Err(self.corrupt(format!(
                "frame ending at byte {} holds no valid item",
                self.offset
            )));
        };
        match item {
            SnapshotItem::Row { key, value } => {
                self.row_count += 1;
                if key == self.state_key.as_slice() {
                    if self.state.is_some() {
                        return Err(self.corrupt("two state rows".into()));
                    }
                    self.state = Some(decode::<ContainerState>(value, "container state")?);
                    // Not a row to copy: the importer stores its own, from the snapshot's meta.
                    return Ok(CheckedItem::State);
                }
                if !in_ranges(key, &self.ranges) {
                    return Err(self.corrupt(format!("row key {key:?} is outside the container")));
                }
                Ok(CheckedItem::Row {
                    key: key.to_vec(),
                    value: value.to_vec(),
                })
            }
            SnapshotItem::Block {
                key,
                checksum,
                data,
            } => {
                self.check_block_key(key)?;
                if data.len() != BLOCK_SIZE_BYTES || ballast_common::checksum(data) != checksum {
                    return Err(self.corrupt(format!("block {key:?} fails its checksum")));
                }
                self.block_count += 1;
                Ok(CheckedItem::Block {
                    key: key.to_vec(),
                    checksum,
                    data: data.to_vec(),
                })
            }
            SnapshotItem::End {
                row_count,
                block_count,
            } => {
                if row_count != self.row_count || block_count != self.block_count {
                    return Err(self.corrupt(format!(
                        "end says {row_count} rows and {block_count} blocks, found {} and {}",
                        self.row_count, self.block_count
                    )));
                }
                if self.state.is_none() {
                    return Err(self.corrupt("no state row".into()));
                }
                let mut extra = [0u8; 1];
                loop {
                    match self.input.read(&mut extra) {
                        Ok(0) => break,
                        Ok(_) => return Err(self.corrupt("bytes after the end".into())),
                        Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(error) => {
                            return Err(self.corrupt(format!("read after the end: {error}")))
                        }
                    }
                }
                self.ended = true;
                Ok(CheckedItem::End)
            }
            SnapshotItem::Unwritten { key } => {
                self.check_block_key(key)?;
                self.block_count += 1;
                Ok(CheckedItem::Unwritten { key: key.to_vec() })
            }
        }
    }

    /// A block item's key lies in this container's block range and after the previous one.
    fn check_block_key(&mut self, key: &[u8]) -> NodeResult<()> {
        if !in_ranges(key, &self.block_range) || key.len() != 25 {
            return Err(self.corrupt(format!("block key {key:?} is outside the container")));
        }
        if key <= self.block_key_last.as_slice() {
            return Err(self.corrupt(format!(
                "block key {key:?} does not follow the previous block's"
            )));
        }
        self.block_key_last.clear();
        self.block_key_last.extend_from_slice(key);
        Ok(())
    }

    /// The checked totals, once the whole stream has been read.
    pub fn summary(&self) -> NodeResult<StreamSummary> {
        match (&self.state, self.ended) {
            (Some(state), true) => Ok(StreamSummary {
                state: state.clone(),
                row_count: self.row_count,
                block_count: self.block_count,
                size_bytes: self.offset,
            }),
            _ => Err(self.corrupt("the stream has not been read to its end".into())),
        }
    }
}

/// An item that passed every check, owned.
enum CheckedItem {
    State,
    Row {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Block {
        key: Vec<u8>,
        checksum: u32,
        data: Vec<u8>,
    },
    Unwritten {
        key: Vec<u8>,
    },
    End,
}

/// `read_exact`, with a message instead of an error kind: "truncated" or the I/O error.
fn read_fully(input: &mut impl Read, buffer: &mut [u8]) -> Result<(), String> {
    input
        .read_exact(buffer)
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "truncated".to_owned(),
            _ => format!("read failed: {error}"),
        })
}

/// Reads and checks a whole stream held in memory, without applying it (tests and fuzzing).
pub fn check_stream(container_id: u64, bytes: &[u8]) -> NodeResult<StreamSummary> {
    let mut reader = SnapshotReader::new(bytes, container_id)?;
    while reader
        .read_group(EXPORT_PAGE_BLOCKS_MAX, &|_, _| None)?
        .is_some()
    {}
    reader.summary()
}

/// Replaces a container's state with the snapshot in `file`. `finish_state` turns the stream's
/// state row into the one to store (the caller sets the applied log id and membership from the
/// snapshot's metadata). On any error the old state stays and new blocks are given back.
pub async fn import(
    storage: &Arc<NodeStorage>,
    container_id: u64,
    mut file: std::fs::File,
    finish_state: impl FnOnce(ContainerState) -> ContainerState,
) -> NodeResult<StreamSummary> {
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))
        .map_err(|source| NodeError::Io {
            context: "rewind a received snapshot".into(),
            source,
        })?;
    stage_import(Arc::clone(storage), container_id, file)
        .await?
        .commit(finish_state)
        .await
}

/// A snapshot stream read to its end and checked, its blocks written to newly allocated device
/// blocks and its rows gathered in one batch: everything of an import except the write that
/// replaces the container's state. Dropped without [`StagedImport::commit`], it gives its blocks
/// back, so an abandoned transfer leaks nothing.
pub struct StagedImport {
    storage: Arc<NodeStorage>,
    container_id: u64,
    batch: WriteBatch,
    summary: Option<StreamSummary>,
    /// Device blocks written so far and referenced by nothing yet.
    written: Vec<u64>,
    /// Blocks of the current state taken over as they are (same key, same CRC): their key and
    /// device block. They are neither written again nor freed by the commit.
    reused: Vec<(Vec<u8>, u64)>,
}

impl std::fmt::Debug for StagedImport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StagedImport")
            .field("container_id", &self.container_id)
            .field("summary", &self.summary)
            .field("written_blocks", &self.written.len())
            .field("reused_blocks", &self.reused.len())
            .finish()
    }
}

impl StagedImport {
    /// Replaces the container's state with the staged one in one batch (the blocks of the old
    /// state are freed with it). `finish_state` turns the stream's state row into the one to
    /// store.
    pub async fn commit(
        mut self,
        finish_state: impl FnOnce(ContainerState) -> ContainerState,
    ) -> NodeResult<StreamSummary> {
        let summary = self
            .summary
            .take()
            .expect("a staged import holds its summary until committed");
        let mut batch = std::mem::take(&mut self.batch);
        batch.put(
            keys::container_singleton(keys::TAG_CONTAINER_STATE, self.container_id),
            encode(&finish_state(summary.state.clone())),
        );
        let (storage, container_id, reused) = (&self.storage, self.container_id, &self.reused);
        // Under the apply lock, so no repair or apply can move a reused block between the check
        // and the batch.
        storage
            .commit_prepared(|| {
                for (key, device_block) in reused {
                    let current = block_map::reference_at(&storage.state, key)?
                        .and_then(|reference| reference.written_device_block());
                    if current != Some(*device_block) {
                        return Err(NodeError::InvalidState(format!(
                            "container {container_id}: block {key:?} changed while a snapshot \
                             reusing it was received"
                        )));
                    }
                }
                let freed = if container_id != METADATA_CONTAINER_ID {
                    let kept: std::collections::HashSet<u64> = reused
                        .iter()
                        .map(|(_, device_block)| *device_block)
                        .collect();
                    let mut freed = storage.container_device_blocks(container_id)?;
                    freed.retain(|device_block| !kept.contains(device_block));
                    freed
                } else {
                    Vec::new()
                };
                Ok((batch, freed))
            })
            .await?;
        self.reused.clear();
        // Referenced by the state now: no longer ours to give back.
        self.written.clear();
        Ok(summary)
    }
}

impl Drop for StagedImport {
    fn drop(&mut self) {
        if !self.written.is_empty() {
            self.storage.discard_new_blocks(&self.written);
        }
    }
}

/// Reads a whole snapshot stream from `input` (blocking reads, on blocking threads), checking
/// every frame, and writes its blocks to new device blocks while it reads the next group. The
/// input may still be arriving: the reader behind a received transfer waits for its bytes.
pub async fn stage_import(
    storage: Arc<NodeStorage>,
    container_id: u64,
    input: impl Read + Send + 'static,
) -> NodeResult<StagedImport> {
    let mut staged = StagedImport {
        storage: Arc::clone(&storage),
        container_id,
        batch: WriteBatch::default(),
        summary: None,
        written: Vec::new(),
        reused: Vec::new(),
    };
    let input = std::io::BufReader::with_capacity(INPUT_BUFFER_BYTES, input);
    let reader = tokio::task::spawn_blocking(move || SnapshotReader::new(input, container_id))
        .await
        .map_err(|error| NodeError::InvalidState(format!("snapshot read task: {error}")))??;
    // The old state goes first in the batch, so the snapshot's rows written after it win.
    if container_id != METADATA_CONTAINER_ID {
        let (start, end) = keys::container_range(keys::TAG_CHUNK, container_id);
        staged.batch.delete_range(start, end);
    }
    for (start, end) in row_ranges(container_id) {
        staged.batch.delete_range(start, end);
    }
    // A block this node already holds under the same key with the same CRC (a returning
    // replica holds most of them) is taken over instead of written again: less I/O, and an
    // install needs room only for what changed. The commit checks each one is still in place.
    let lookup_storage = Arc::clone(&storage);
    // Keys come in order, so the lookup reads each chunk row once.
    let lookup = std::sync::Mutex::new(block_map::ReferenceLookup::default());
    let reusable = Arc::new(move |key: &[u8], checksum: u32| -> Option<u64> {
        let reference = lookup
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .reference_at(&lookup_storage.state, key)
            .ok()??;
        (reference.checksum == checksum)
            .then(|| reference.written_device_block())
            .flatten()
    });
    let read_next = |mut reader: SnapshotReader<_>| {
        let reusable = Arc::clone(&reusable);
        async move {
            tokio::task::spawn_blocking(move || {
                let group = reader.read_group(EXPORT_PAGE_BLOCKS_MAX, &*reusable);
                (reader, group)
            })
            .await
            .map_err(|error| NodeError::InvalidState(format!("snapshot read task: {error}")))
        }
    };
    let (mut reader, mut group) = read_next(reader).await?;
    // Block references arrive in key order; whole chunks become rows as the stream goes.
    let mut chunk_rows = block_map::ChunkRowsBuilder::new(container_id);
    while let Some(current) = group? {
        for (key, value) in &current.rows {
            staged.batch.put(key, value);
        }
        // The next group is read while this one's blocks are written.
        let writes = futures::future::join_all(
            current
                .data
                .into_iter()
                .map(|data| storage.write_new_blocks(data)),
        );
        let (next, device_blocks) = tokio::join!(read_next(reader), writes);
        let mut device_blocks_in_order = Vec::with_capacity(current.blocks.len());
        let mut failure = None;
        // Every write ran to its end (no cancellation half-way through a device write); keep
        // each one's blocks, even after a failure, so they can be given back.
        for result in device_blocks {
            match result {
                Ok(blocks) => {
                    staged.written.extend_from_slice(&blocks);
                    device_blocks_in_order.extend(blocks);
                }
                Err(error) => failure = Some(error),
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        let (next_reader, next_group) = next?;
        let written_count = current
            .blocks
            .iter()
            .filter(|(_, _, reused)| reused.is_none())
            .count();
        assert_eq!(device_blocks_in_order.len(), written_count);
        let mut written_blocks = device_blocks_in_order.into_iter();
        let mut key_last: Option<Vec<u8>> = None;
        for (key, checksum, reused) in current.blocks {
            let device_block = match reused {
                Some(device_block) => {
                    staged.reused.push((key.clone(), device_block));
                    device_block
                }
                None => written_blocks
                    .next()
                    .expect("one written block per block not reused"),
            };
            let reference = BlockRef {
                device_block,
                checksum,
            };
            chunk_rows.add(&key, reference);
            key_last = key_last.max(Some(key));
        }
        for key in current.unwritten {
            chunk_rows.add(&key, BlockRef::unwritten());
            key_last = key_last.max(Some(key));
        }
        if let Some(key_last) = key_last {
            for (key, value) in chunk_rows.complete_before(&key_last) {
                staged.batch.put(key, value);
            }
        }
        reader = next_reader;
        group = next_group;
    }
    for (key, value) in chunk_rows.finish() {
        staged.batch.put(key, value);
    }
    staged.summary = Some(reader.summary()?);
    Ok(staged)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::command::FilesystemCommand;
    use crate::filesystem;
    use crate::records::ROOT_INODE;
    use crate::test_support::TestStorage;

    const CONTAINER: u64 = 5;

    fn framed(output: &mut Vec<u8>, item: &SnapshotItem<'_>) {
        push_frame(output, item).unwrap();
    }

    fn valid_stream(container_id: u64) -> Vec<u8> {
        let mut stream = SNAPSHOT_MAGIC.to_vec();
        let state_key = keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id);
        let state = encode(&ContainerState::default());
        framed(
            &mut stream,
            &SnapshotItem::Row {
                key: &state_key,
                value: &state,
            },
        );
        framed(
            &mut stream,
            &SnapshotItem::Row {
                key: &keys::inode(container_id, 1),
                value: &[1, 2, 3],
            },
        );
        let data = vec![7u8; BLOCK_SIZE_BYTES];
        framed(
            &mut stream,
            &SnapshotItem::Block {
                key: &keys::block(container_id, 1, 0),
                checksum: ballast_common::checksum(&data),
                data: &data,
            },
        );
        framed(
            &mut stream,
            &SnapshotItem::End {
                row_count: 2,
                block_count: 1,
            },
        );
        stream
    }

    #[test]
    fn a_valid_stream_checks() {
        let summary = check_stream(CONTAINER, &valid_stream(CONTAINER)).unwrap();
        assert_eq!((summary.row_count, summary.block_count), (2, 1));
        assert_eq!(summary.size_bytes, valid_stream(CONTAINER).len() as u64);
    }

    #[test]
    fn a_foreign_container_is_refused() {
        let error = check_stream(6, &valid_stream(CONTAINER))
            .unwrap_err()
            .to_string();
        assert!(error.contains("outside the container"), "{error}");
    }

    #[test]
    fn a_bad_block_checksum_is_refused() {
        let mut stream = SNAPSHOT_MAGIC.to_vec();
        framed(
            &mut stream,
            &SnapshotItem::Block {
                key: &keys::block(CONTAINER, 1, 0),
                checksum: 1,
                data: &[7u8; BLOCK_SIZE_BYTES],
            },
        );
        let error = check_stream(CONTAINER, &stream).unwrap_err().to_string();
        assert!(error.contains("checksum"), "{error}");
    }

    #[test]
    fn block_keys_out_of_order_or_repeated_are_refused() {
        let later = keys::block(CONTAINER, 1, 5);
        let earlier = keys::block(CONTAINER, 1, 4);
        for (first, second) in [(&later, &earlier), (&later, &later)] {
            let mut stream = SNAPSHOT_MAGIC.to_vec();
            framed(&mut stream, &SnapshotItem::Unwritten { key: first });
            let data = [3u8; BLOCK_SIZE_BYTES];
            framed(
                &mut stream,
                &SnapshotItem::Block {
                    key: second,
                    checksum: ballast_common::checksum(&data),
                    data: &data,
                },
            );
            let error = check_stream(CONTAINER, &stream).unwrap_err().to_string();
            assert!(error.contains("does not follow"), "{error}");
        }
    }

    #[test]
    fn items_decode_as_they_were_framed() {
        let items = [
            SnapshotItem::Row {
                key: b"k",
                value: b"",
            },
            SnapshotItem::Block {
                key: b"key",
                checksum: 9,
                data: &[1, 2, 3],
            },
            SnapshotItem::End {
                row_count: u64::MAX,
                block_count: 3,
            },
            SnapshotItem::Unwritten { key: b"key" },
        ];
        for item in items {
            let mut frame = Vec::new();
            framed(&mut frame, &item);
            assert_eq!(decode_item(&frame[FRAME_HEADER_BYTES..]), Some(item));
        }
        assert_eq!(decode_item(&[KIND_END, 1, 2]), None);
        assert_eq!(decode_item(&[KIND_ROW, 200, 0, 0, 0, 1]), None);
        assert_eq!(decode_item(&[9]), None);
        // An unwritten block carries its key and nothing after it.
        assert_eq!(decode_item(&[KIND_UNWRITTEN, 1, 0, 0, 0, b'k', 0]), None);
        let mut output = b"before".to_vec();
        let huge = vec![0u8; FRAME_BYTES_MAX];
        assert!(push_frame(
            &mut output,
            &SnapshotItem::Row {
                key: b"k",
                value: &huge
            }
        )
        .is_err());
        assert_eq!(output, b"before", "a refused item leaves nothing behind");
    }

    proptest! {
        #[test]
        fn any_damage_is_detected(position in 0usize..5000, flip in 1u8..=255, cut in any::<bool>()) {
            let mut stream = valid_stream(CONTAINER);
            let position = position % stream.len();
            if cut {
                stream.truncate(position);
            } else {
                stream[position] ^= flip;
            }
            prop_assert!(check_stream(CONTAINER, &stream).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut stream = SNAPSHOT_MAGIC.to_vec();
            stream.extend(bytes);
            let _ = check_stream(CONTAINER, &stream);
        }
    }

    async fn initialized() -> TestStorage {
        TestStorage::initialized(CONTAINER, 0).await
    }

    async fn create_file(storage: &mut TestStorage, name: &str) -> u64 {
        storage.create_file(CONTAINER, name).await
    }

    /// Writes `data` in pieces of 1 MiB, as the FUSE driver would.
    async fn write(storage: &mut TestStorage, inode: u64, offset_bytes: u64, data: Vec<u8>) {
        for (index, piece) in data.chunks(1 << 20).enumerate() {
            storage
                .apply(
                    CONTAINER,
                    FilesystemCommand::Write {
                        inode,
                        offset_bytes: offset_bytes + (index << 20) as u64,
                        data: Bytes::copy_from_slice(piece),
                        now_ns: 3,
                        prewritten: Default::default(),
                    },
                )
                .await
                .unwrap();
        }
    }

    /// A pattern that differs in every block and every round.
    fn pattern(length_bytes: usize, round: u8) -> Vec<u8> {
        (0..length_bytes)
            .map(|index| (index / 4096) as u8 ^ (index as u8).wrapping_mul(31) ^ round)
            .collect()
    }

    async fn read_all(storage: &TestStorage, inode: u64, length_bytes: u32) -> Vec<u8> {
        filesystem::read(&storage.storage, CONTAINER, inode, 0, length_bytes)
            .await
            .unwrap()
            .to_vec()
    }

    /// Exports `CONTAINER` into a spool and returns the stream's bytes.
    async fn export_bytes(storage: &TestStorage) -> (ContainerState, Vec<u8>) {
        let (state, mut data) = start_export(&storage.storage, CONTAINER).await.unwrap();
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes).await.unwrap();
        (state, bytes)
    }

    fn spool_file(storage: &TestStorage, bytes: &[u8]) -> std::fs::File {
        let file = storage.storage.spool.create_file("test").unwrap();
        file.write_all_at(bytes, 0).unwrap();
        file
    }

    /// Imports a whole stream into `CONTAINER` of `target`, keeping the stream's state row.
    async fn import_all(target: &TestStorage, bytes: &[u8]) -> StreamSummary {
        import(
            &target.storage,
            CONTAINER,
            spool_file(target, bytes),
            |state| state,
        )
        .await
        .unwrap()
    }

    // Larger than one export page (2048 blocks) and one output buffer, so paging is exercised.
    const FILE_BYTES: usize = 9 << 20;

    #[tokio::test]
    async fn an_export_imports_to_the_same_content_on_another_node() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "big").await;
        write(&mut source, inode, 0, pattern(FILE_BYTES, 1)).await;
        let (_, bytes) = export_bytes(&source).await;
        let summary = check_stream(CONTAINER, &bytes).unwrap();
        assert_eq!(summary.block_count, (FILE_BYTES / BLOCK_SIZE_BYTES) as u64);

        // The target holds other data for the container already: the import replaces it.
        let mut target = initialized().await;
        let other = create_file(&mut target, "stale").await;
        write(&mut target, other, 0, pattern(3 << 20, 9)).await;
        let imported = import_all(&target, &bytes).await;
        assert_eq!(imported, summary);
        assert_eq!(
            digest(&target.storage, CONTAINER).await.unwrap().0,
            digest(&source.storage, CONTAINER).await.unwrap().0
        );
        assert_eq!(
            read_all(&target, inode, FILE_BYTES as u32).await,
            pattern(FILE_BYTES, 1)
        );
        assert!(filesystem::lookup(&target.storage, CONTAINER, ROOT_INODE, "stale").is_err());
        assert!(filesystem::lookup(&target.storage, CONTAINER, ROOT_INODE, "big").is_ok());
    }

    /// Unwritten (fallocated) blocks travel as keys only and arrive unwritten: the target takes
    /// device blocks for the written ones alone.
    #[tokio::test]
    async fn unwritten_blocks_travel_without_data_and_stay_unwritten() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "laid-out").await;
        let allocate = FilesystemCommand::Fallocate {
            inode,
            offset_bytes: 0,
            length_bytes: FILE_BYTES as u64,
            mode: 0,
            now_ns: 2,
        };
        source.apply(CONTAINER, allocate).await.unwrap();
        let written = pattern(1 << 20, 4);
        write(&mut source, inode, 3 << 20, written.clone()).await;
        let (_, bytes) = export_bytes(&source).await;
        let summary = check_stream(CONTAINER, &bytes).unwrap();
        let block_total = (FILE_BYTES / BLOCK_SIZE_BYTES) as u64;
        assert_eq!(summary.block_count, block_total);
        assert!(
            (bytes.len() as u64) < 2 * (1 << 20),
            "only the written MiB carries data: {} bytes",
            bytes.len()
        );

        let target = initialized().await;
        let free_before = target.storage.free_block_count();
        import_all(&target, &bytes).await;
        assert_eq!(
            free_before - target.storage.free_block_count(),
            (1 << 20) / BLOCK_SIZE_BYTES as u64
        );
        let mut expected = vec![0u8; FILE_BYTES];
        expected[3 << 20..4 << 20].copy_from_slice(&written);
        assert_eq!(read_all(&target, inode, FILE_BYTES as u32).await, expected);
        assert_eq!(
            digest(&target.storage, CONTAINER).await.unwrap().0,
            digest(&source.storage, CONTAINER).await.unwrap().0
        );
        let reference =
            block_map::reference_at(&target.storage.state, &keys::block(CONTAINER, inode, 0))
                .unwrap()
                .unwrap();
        assert!(reference.is_unwritten());
    }

    #[tokio::test]
    async fn a_damaged_spool_changes_nothing_and_gives_its_blocks_back() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "big").await;
        write(&mut source, inode, 0, pattern(FILE_BYTES, 1)).await;
        let (_, mut bytes) = export_bytes(&source).await;
        // Damage the last block frame: every block before it has been written by then.
        let at = bytes.len() - 100;
        bytes[at] ^= 0x40;

        let mut target = initialized().await;
        let kept = create_file(&mut target, "kept").await;
        write(&mut target, kept, 0, pattern(1 << 20, 7)).await;
        let digest_before = digest(&target.storage, CONTAINER).await.unwrap();
        target.storage.checkpoint(|_| Ok(())).await.unwrap();
        let free_before = target.storage.free_block_count();
        let error = import(
            &target.storage,
            CONTAINER,
            spool_file(&target, &bytes),
            |state| state,
        )
        .await
        .unwrap_err();
        assert!(error.to_string().contains("checksum"), "{error}");
        assert_unchanged_and_blocks_free(&target, digest_before, free_before).await;
    }

    /// A snapshot being received into `target`, and its import reading behind it.
    fn receive_with_import(
        target: &TestStorage,
    ) -> (
        SpooledSnapshot,
        tokio::task::JoinHandle<NodeResult<StagedImport>>,
    ) {
        let file = target.storage.spool.create_file("receive").unwrap();
        let (snapshot, tail) = SpooledSnapshot::receiving(file).unwrap();
        let staging = tokio::spawn(stage_import(Arc::clone(&target.storage), CONTAINER, tail));
        (snapshot, staging)
    }

    /// After a failed import: the state is as it was and every block it wrote is free again.
    async fn assert_unchanged_and_blocks_free(
        target: &TestStorage,
        digest_before: (u32, u64, ContainerState),
        free_before: u64,
    ) {
        assert_eq!(
            digest(&target.storage, CONTAINER).await.unwrap(),
            digest_before
        );
        target.storage.checkpoint(|_| Ok(())).await.unwrap();
        assert_eq!(
            target.storage.free_block_count(),
            free_before,
            "the blocks the failed import wrote are free again"
        );
    }

    /// Sends `bytes` into a snapshot being received, in chunks, as openraft's receiver does.
    async fn send_chunks(snapshot: &mut SpooledSnapshot, bytes: &[u8], chunk_bytes: usize) {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        for (index, chunk) in bytes.chunks(chunk_bytes).enumerate() {
            snapshot
                .seek(std::io::SeekFrom::Start((index * chunk_bytes) as u64))
                .await
                .unwrap();
            snapshot.write_all(chunk).await.unwrap();
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_import_reads_behind_a_transfer_and_commits_at_install() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "big").await;
        let data = pattern(FILE_BYTES, 5);
        write(&mut source, inode, 0, data.clone()).await;
        let (_, bytes) = export_bytes(&source).await;

        let target = initialized().await;
        let (mut snapshot, staging) = receive_with_import(&target);
        send_chunks(&mut snapshot, &bytes, 1 << 20).await;
        assert!(
            !staging.is_finished(),
            "the import waits for the end of the transfer"
        );
        snapshot.finish_receiving().await.unwrap();
        let staged = staging.await.unwrap().unwrap();
        let summary = staged.commit(|state| state).await.unwrap();
        assert_eq!(summary.size_bytes, bytes.len() as u64);
        assert_eq!(
            digest(&target.storage, CONTAINER).await.unwrap(),
            digest(&source.storage, CONTAINER).await.unwrap()
        );
        assert_eq!(read_all(&target, inode, FILE_BYTES as u32).await, data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_transfer_changes_nothing_and_gives_its_blocks_back() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "big").await;
        write(&mut source, inode, 0, pattern(FILE_BYTES, 6)).await;
        let (_, bytes) = export_bytes(&source).await;

        let target = initialized().await;
        let digest_before = digest(&target.storage, CONTAINER).await.unwrap();
        target.storage.checkpoint(|_| Ok(())).await.unwrap();
        let free_before = target.storage.free_block_count();
        let (mut snapshot, staging) = receive_with_import(&target);
        // Most of the stream arrives (so blocks are written), then the transfer is dropped.
        send_chunks(&mut snapshot, &bytes[..bytes.len() * 3 / 4], 1 << 20).await;
        drop(snapshot);
        let error = staging.await.unwrap().unwrap_err();
        assert!(error.to_string().contains("abandoned"), "{error}");
        assert_unchanged_and_blocks_free(&target, digest_before, free_before).await;

        // Staged to the end but never installed: dropping it gives the blocks back too.
        let (mut snapshot, staging) = receive_with_import(&target);
        send_chunks(&mut snapshot, &bytes, 1 << 20).await;
        snapshot.finish_receiving().await.unwrap();
        let staged = staging.await.unwrap().unwrap();
        assert!(target.storage.free_block_count() < free_before);
        drop(staged);
        target.storage.checkpoint(|_| Ok(())).await.unwrap();
        assert_eq!(target.storage.free_block_count(), free_before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_that_holds_most_blocks_reuses_them_and_writes_only_the_rest() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "big").await;
        write(&mut source, inode, 0, pattern(FILE_BYTES, 8)).await;
        let (_, bytes) = export_bytes(&source).await;
        let target = initialized().await;
        import_all(&target, &bytes).await;
        target.storage.checkpoint(|_| Ok(())).await.unwrap();
        let free_before = target.storage.free_block_count();

        // The source moves on: 1 MiB (256 blocks) of the file is overwritten.
        let changed = pattern(1 << 20, 9);
        write(&mut source, inode, 2 << 20, changed.clone()).await;
        let (_, bytes) = export_bytes(&source).await;
        let (mut snapshot, staging) = receive_with_import(&target);
        send_chunks(&mut snapshot, &bytes, 1 << 20).await;
        snapshot.finish_receiving().await.unwrap();
        let staged = staging.await.unwrap().unwrap();
        let file_blocks = FILE_BYTES / BLOCK_SIZE_BYTES;
        assert_eq!(staged.reused.len(), file_blocks - 256);
        assert_eq!(staged.written.len(), 256);
        staged.commit(|state| state).await.unwrap();
        target.storage.checkpoint(|_| Ok(())).await.unwrap();
        assert_eq!(
            target.storage.free_block_count(),
            free_before,
            "the 256 replaced blocks were freed, the reused ones kept"
        );
        assert_eq!(
            digest(&target.storage, CONTAINER).await.unwrap(),
            digest(&source.storage, CONTAINER).await.unwrap()
        );
        let mut expected = pattern(FILE_BYTES, 8);
        expected[2 << 20..3 << 20].copy_from_slice(&changed);
        assert_eq!(read_all(&target, inode, FILE_BYTES as u32).await, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reused_block_that_moved_before_the_commit_refuses_the_install() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "big").await;
        write(&mut source, inode, 0, pattern(FILE_BYTES, 10)).await;
        let (_, bytes) = export_bytes(&source).await;
        let mut target = initialized().await;
        import_all(&target, &bytes).await;

        let (mut snapshot, staging) = receive_with_import(&target);
        send_chunks(&mut snapshot, &bytes, 1 << 20).await;
        snapshot.finish_receiving().await.unwrap();
        let staged = staging.await.unwrap().unwrap();
        assert_eq!(staged.reused.len(), FILE_BYTES / BLOCK_SIZE_BYTES);
        // The same bytes written again land in new device blocks (copy-on-write): the blocks
        // the staged import took over are no longer the ones referenced.
        write(&mut target, inode, 0, pattern(1 << 20, 10)).await;
        let digest_before = digest(&target.storage, CONTAINER).await.unwrap();
        let error = staged.commit(|state| state).await.unwrap_err();
        assert!(error.to_string().contains("changed while"), "{error}");
        assert_eq!(
            digest(&target.storage, CONTAINER).await.unwrap(),
            digest_before
        );
    }

    #[tokio::test]
    async fn an_export_sees_one_state_while_writes_go_on() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "big").await;
        write(&mut source, inode, 0, pattern(FILE_BYTES, 1)).await;
        let (state, mut data) = start_export(&source.storage, CONTAINER).await.unwrap();
        // Overwrites and checkpoints while the export runs: applies are not held up, and the
        // blocks the view references keep their bytes although the overwrites freed them.
        for round in 2..5u8 {
            write(&mut source, inode, 0, pattern(FILE_BYTES, round)).await;
            source.storage.checkpoint(|_| Ok(())).await.unwrap();
        }
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes).await.unwrap();
        let summary = check_stream(CONTAINER, &bytes).unwrap();
        assert_eq!(summary.state, state);

        let target = initialized().await;
        import_all(&target, &bytes).await;
        assert_eq!(
            read_all(&target, inode, FILE_BYTES as u32).await,
            pattern(FILE_BYTES, 1),
            "the export holds the state it started at"
        );
        assert_eq!(
            read_all(&source, inode, FILE_BYTES as u32).await,
            pattern(FILE_BYTES, 4)
        );
    }

    #[tokio::test]
    async fn frees_stay_deferred_while_an_export_view_lives() {
        let mut source = initialized().await;
        let inode = create_file(&mut source, "file").await;
        write(&mut source, inode, 0, pattern(1 << 20, 1)).await;
        source.storage.checkpoint(|_| Ok(())).await.unwrap();
        let free_before = source.storage.free_block_count();
        let overwritten_blocks = (1 << 20) / BLOCK_SIZE_BYTES as u64;
        {
            let storage = std::sync::Arc::clone(&source.storage);
            let _view = storage.export_view().await;
            write(&mut source, inode, 0, pattern(1 << 20, 2)).await;
            source.storage.checkpoint(|_| Ok(())).await.unwrap();
            assert_eq!(
                source.storage.free_block_count(),
                free_before - overwritten_blocks,
                "the old blocks are not reusable while a view may read them"
            );
        }
        source.storage.checkpoint(|_| Ok(())).await.unwrap();
        assert_eq!(source.storage.free_block_count(), free_before);
    }
}
