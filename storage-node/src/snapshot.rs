//! Container snapshots for transfer between nodes: a logical, checksummed export of one
//! container's state, and its import on another node.
//!
//! Owns: the snapshot stream format (see `docs/on-disk-format.md`, "Snapshot stream") and the
//! rules of what a container's state is.
//! Must not depend on: Raft beyond log ids and membership, the network.
//!
//! Format: the magic `BLSNAP01`, then frames of `[length u32 LE][crc32 u32 LE][postcard item]`.
//! Items are rows (key, value) and file blocks (key, CRC-32, 4 KiB of data), ended by an `End`
//! item that counts them. Block references are *logical* (inode, file block): device block
//! numbers are private to a node, so the importer allocates its own blocks and writes new
//! references.
//!
//! Invariants:
//! - Export runs under the apply lock, so rows and blocks are one consistent state; copy-on-write
//!   keeps every referenced block intact while it runs (frees wait for a checkpoint, which
//!   needs the same lock).
//! - Import checks everything before it changes anything: magic, every frame's CRC, every key
//!   lies inside this container's ranges, every block's data matches its CRC, and the counts.
//!   A damaged or foreign snapshot is refused and the old state stays.

use ballast_device::{AlignedBuffer, BLOCK_SIZE_BYTES};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::error::{NodeError, NodeResult};
use crate::keys;
use crate::records::{decode, encode, BlockRef, ContainerState};
use crate::storage::{NodeStorage, BLOCKS_PER_REQUEST_MAX};
use crate::types::METADATA_CONTAINER_ID;

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"BLSNAP01";
/// Largest snapshot held in memory. Streaming snapshots that lift this limit are future work.
pub const SNAPSHOT_BYTES_MAX: usize = 4 << 30;
/// Largest frame (a block item plus its key).
const FRAME_BYTES_MAX: usize = 1 << 20;
/// Device requests (of up to `BLOCKS_PER_REQUEST_MAX` blocks each) an export or import keeps in
/// flight; well under the engine's 128, so other containers' I/O still gets through.
const DEVICE_REQUESTS_IN_FLIGHT_MAX: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotItem {
    Row {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Block {
        key: Vec<u8>,
        checksum: u32,
        data: Vec<u8>,
    },
    End {
        row_count: u64,
        block_count: u64,
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

fn push_frame(output: &mut Vec<u8>, item: &SnapshotItem) -> NodeResult<()> {
    let payload = encode(item);
    output.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    output.extend_from_slice(&ballast_common::checksum(&payload).to_le_bytes());
    output.extend_from_slice(&payload);
    if output.len() > SNAPSHOT_BYTES_MAX {
        return Err(NodeError::InvalidState(format!(
            "snapshot exceeds {SNAPSHOT_BYTES_MAX} bytes; streaming snapshots are not built yet"
        )));
    }
    Ok(())
}

/// Exports a container's whole state. Returns the stream and the state row it contains.
pub async fn export(
    storage: &NodeStorage,
    container_id: u64,
) -> NodeResult<(Vec<u8>, ContainerState)> {
    let _applies_paused = storage.pause_applies().await;
    let mut output = SNAPSHOT_MAGIC.to_vec();
    let state_key = keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id);
    let state_bytes = storage
        .state
        .get_raw(&state_key)?
        .unwrap_or_else(|| encode(&ContainerState::default()));
    let state: ContainerState = decode(&state_bytes, "container state")?;
    let mut row_count = 0u64;
    push_frame(
        &mut output,
        &SnapshotItem::Row {
            key: state_key,
            value: state_bytes,
        },
    )?;
    row_count += 1;
    for (start, end) in row_ranges(container_id) {
        let mut rows = Vec::new();
        storage.state.scan(&start, &end, usize::MAX, |key, value| {
            rows.push((key.to_vec(), value.to_vec()));
            Ok(true)
        })?;
        for (key, value) in rows {
            push_frame(&mut output, &SnapshotItem::Row { key, value })?;
            row_count += 1;
        }
    }
    let mut block_count = 0u64;
    if container_id != METADATA_CONTAINER_ID {
        let (start, end) = keys::container_range(keys::TAG_BLOCK, container_id);
        let mut references = Vec::new();
        storage.state.scan(&start, &end, usize::MAX, |key, value| {
            references.push((key.to_vec(), decode::<BlockRef>(value, "block reference")?));
            Ok(true)
        })?;
        // Several device reads in flight: one at a time left the disk idle between them.
        for group in
            references.chunks(BLOCKS_PER_REQUEST_MAX as usize * DEVICE_REQUESTS_IN_FLIGHT_MAX)
        {
            let reads = group.chunks(BLOCKS_PER_REQUEST_MAX as usize).map(|chunk| {
                let refs: Vec<BlockRef> = chunk.iter().map(|(_, reference)| *reference).collect();
                // Verified: a corrupt local block is never shipped to another replica.
                async move { storage.read_verified(&refs, "snapshot export").await }
            });
            let read = futures::future::try_join_all(reads).await?;
            for (chunk, data) in group.chunks(BLOCKS_PER_REQUEST_MAX as usize).zip(read) {
                for (index, (key, reference)) in chunk.iter().enumerate() {
                    let block = &data[index * BLOCK_SIZE_BYTES..(index + 1) * BLOCK_SIZE_BYTES];
                    push_frame(
                        &mut output,
                        &SnapshotItem::Block {
                            key: key.clone(),
                            checksum: reference.checksum,
                            data: block.to_vec(),
                        },
                    )?;
                    block_count += 1;
                }
            }
        }
    }
    push_frame(
        &mut output,
        &SnapshotItem::End {
            row_count,
            block_count,
        },
    )?;
    Ok((output, state))
}

/// A parsed and fully checked snapshot.
#[derive(Debug)]
pub struct ParsedSnapshot {
    pub state: ContainerState,
    pub rows: Vec<(Vec<u8>, Vec<u8>)>,
    pub blocks: Vec<(Vec<u8>, u32, Vec<u8>)>,
}

/// Parses and checks a snapshot of `container_id` (see the module invariants).
pub fn parse(container_id: u64, bytes: &[u8]) -> NodeResult<ParsedSnapshot> {
    let corrupt = |message: String| {
        NodeError::InvalidState(format!("snapshot of container {container_id}: {message}"))
    };
    if bytes.len() < SNAPSHOT_MAGIC.len() || &bytes[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let state_key = keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id);
    let ranges = row_ranges(container_id);
    let block_range = [keys::container_range(keys::TAG_BLOCK, container_id)];
    let mut offset = SNAPSHOT_MAGIC.len();
    let mut state = None;
    let mut rows = Vec::new();
    let mut blocks = Vec::new();
    loop {
        if bytes.len() - offset < 8 {
            return Err(corrupt(format!("truncated at byte {offset}")));
        }
        let length =
            u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        let checksum =
            u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().expect("4 bytes"));
        offset += 8;
        if length > FRAME_BYTES_MAX || length > bytes.len() - offset {
            return Err(corrupt(format!(
                "frame of {length} bytes at byte {offset} does not fit"
            )));
        }
        let payload = &bytes[offset..offset + length];
        offset += length;
        if ballast_common::checksum(payload) != checksum {
            return Err(corrupt(format!(
                "frame ending at byte {offset} fails its checksum"
            )));
        }
        match decode::<SnapshotItem>(payload, "snapshot item")? {
            SnapshotItem::Row { key, value } => {
                if key == state_key {
                    state = Some(decode::<ContainerState>(&value, "container state")?);
                } else if in_ranges(&key, &ranges) {
                    rows.push((key, value));
                } else {
                    return Err(corrupt(format!("row key {key:?} is outside the container")));
                }
            }
            SnapshotItem::Block {
                key,
                checksum,
                data,
            } => {
                if !in_ranges(&key, &block_range) || key.len() != 25 {
                    return Err(corrupt(format!(
                        "block key {key:?} is outside the container"
                    )));
                }
                if data.len() != BLOCK_SIZE_BYTES || ballast_common::checksum(&data) != checksum {
                    return Err(corrupt(format!("block {key:?} fails its checksum")));
                }
                blocks.push((key, checksum, data));
            }
            SnapshotItem::End {
                row_count,
                block_count,
            } => {
                let rows_seen = rows.len() as u64 + u64::from(state.is_some());
                if row_count != rows_seen || block_count != blocks.len() as u64 {
                    return Err(corrupt(format!(
                        "end says {row_count} rows and {block_count} blocks, found {rows_seen} and {}",
                        blocks.len()
                    )));
                }
                if offset != bytes.len() {
                    return Err(corrupt("bytes after the end".into()));
                }
                let state = state.ok_or_else(|| corrupt("no state row".into()))?;
                return Ok(ParsedSnapshot {
                    state,
                    rows,
                    blocks,
                });
            }
        }
    }
}

/// Replaces a container's state with a checked snapshot. `state` is the state row to store
/// (the caller sets the applied log id and membership from the snapshot's metadata).
pub async fn install(
    storage: &NodeStorage,
    container_id: u64,
    snapshot: ParsedSnapshot,
    state: ContainerState,
) -> NodeResult<()> {
    // New blocks first (rule 2 of `storage`): nothing references them until the batch lands.
    let mut batch = WriteBatch::default();
    let mut written = Vec::with_capacity(snapshot.blocks.len());
    for group in snapshot
        .blocks
        .chunks(BLOCKS_PER_REQUEST_MAX as usize * DEVICE_REQUESTS_IN_FLIGHT_MAX)
    {
        // Several device writes in flight: one at a time left the disk idle between them.
        let writes = group.chunks(BLOCKS_PER_REQUEST_MAX as usize).map(|chunk| {
            let mut data = AlignedBuffer::new_zeroed(chunk.len() * BLOCK_SIZE_BYTES);
            for (index, (_, _, block)) in chunk.iter().enumerate() {
                data[index * BLOCK_SIZE_BYTES..(index + 1) * BLOCK_SIZE_BYTES]
                    .copy_from_slice(block);
            }
            storage.write_new_blocks(data)
        });
        // Every write runs to its end (no cancellation half-way through a device write).
        let device_blocks = futures::future::join_all(writes)
            .await
            .into_iter()
            .collect::<NodeResult<Vec<_>>>()?;
        for (chunk, device_blocks) in group
            .chunks(BLOCKS_PER_REQUEST_MAX as usize)
            .zip(device_blocks)
        {
            for ((key, checksum, _), device_block) in chunk.iter().zip(device_blocks) {
                written.push((
                    key.clone(),
                    BlockRef {
                        device_block,
                        checksum: *checksum,
                    },
                ));
            }
        }
    }
    let mut freed = Vec::new();
    if container_id != METADATA_CONTAINER_ID {
        let (start, end) = keys::container_range(keys::TAG_BLOCK, container_id);
        storage.state.scan(&start, &end, usize::MAX, |_, value| {
            freed.push(decode::<BlockRef>(value, "block reference")?.device_block);
            Ok(true)
        })?;
        batch.delete_range(start, end);
    }
    for (start, end) in row_ranges(container_id) {
        batch.delete_range(start, end);
    }
    for (key, value) in snapshot.rows {
        batch.put(key, value);
    }
    for (key, reference) in written {
        batch.put(key, encode(&reference));
    }
    batch.put(
        keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id),
        encode(&state),
    );
    storage.commit_batch(batch, &freed).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(item: &SnapshotItem) -> Vec<u8> {
        let mut output = Vec::new();
        push_frame(&mut output, item).unwrap();
        output
    }

    fn valid_stream(container_id: u64) -> Vec<u8> {
        let mut stream = SNAPSHOT_MAGIC.to_vec();
        stream.extend(frame(&SnapshotItem::Row {
            key: keys::container_singleton(keys::TAG_CONTAINER_STATE, container_id),
            value: encode(&ContainerState::default()),
        }));
        stream.extend(frame(&SnapshotItem::Row {
            key: keys::inode(container_id, 1),
            value: vec![1, 2, 3],
        }));
        let data = vec![7u8; BLOCK_SIZE_BYTES];
        stream.extend(frame(&SnapshotItem::Block {
            key: keys::block(container_id, 1, 0),
            checksum: ballast_common::checksum(&data),
            data,
        }));
        stream.extend(frame(&SnapshotItem::End {
            row_count: 2,
            block_count: 1,
        }));
        stream
    }

    #[test]
    fn a_valid_stream_parses() {
        let parsed = parse(5, &valid_stream(5)).unwrap();
        assert_eq!(parsed.rows.len(), 1);
        assert_eq!(parsed.blocks.len(), 1);
    }

    #[test]
    fn a_foreign_container_is_refused() {
        let error = parse(6, &valid_stream(5)).unwrap_err().to_string();
        assert!(
            error.contains("outside the container") || error.contains("no state row"),
            "{error}"
        );
    }

    #[test]
    fn a_bad_block_checksum_is_refused() {
        let mut stream = SNAPSHOT_MAGIC.to_vec();
        stream.extend(frame(&SnapshotItem::Block {
            key: keys::block(5, 1, 0),
            checksum: 1,
            data: vec![7u8; BLOCK_SIZE_BYTES],
        }));
        assert!(parse(5, &stream)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }

    proptest! {
        #[test]
        fn any_damage_is_detected(position in 0usize..5000, flip in 1u8..=255, cut in any::<bool>()) {
            let mut stream = valid_stream(5);
            let position = position % stream.len();
            if cut {
                stream.truncate(position);
            } else {
                stream[position] ^= flip;
            }
            prop_assert!(parse(5, &stream).is_err());
        }
    }
}
