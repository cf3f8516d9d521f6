//! Tests of the filesystem state machine on real storage (no Raft, no FUSE): every command's
//! effect and error, the accounting invariants, and checksum verification.

use ballast_common::Errno;
use bytes::Bytes;

use crate::command::{
    AttributeChanges, CommandResponse, FilesystemCommand, FALLOCATE_KEEP_SIZE, FALLOCATE_PUNCH_HOLE,
};
use crate::error::NodeError;
use crate::filesystem::{self, FILE_SIZE_BYTES_MAX};
use crate::records::{BlockRef, EntryKind, ROOT_INODE};
use crate::test_support::TestStorage;

const CONTAINER: u64 = 7;

async fn initialized(quota_bytes: u64) -> TestStorage {
    TestStorage::initialized(CONTAINER, quota_bytes).await
}

async fn create(storage: &mut TestStorage, parent: u64, name: &str, kind: EntryKind) -> u64 {
    let command = FilesystemCommand::Create {
        parent,
        name: name.into(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        symlink_target: (kind == EntryKind::Symlink).then(|| "target".to_owned()),
        exclusive: true,
        now_ns: 2,
    };
    match storage.apply(CONTAINER, command).await.unwrap() {
        CommandResponse::Attributes { inode, .. } => inode,
        other => panic!("unexpected {other:?}"),
    }
}

fn errno(result: Result<CommandResponse, NodeError>) -> Errno {
    match result {
        Err(NodeError::Fs(error)) => error.errno,
        other => panic!("expected a filesystem error, got {other:?}"),
    }
}

async fn write(
    storage: &mut TestStorage,
    inode: u64,
    offset_bytes: u64,
    data: &[u8],
) -> Result<CommandResponse, NodeError> {
    storage
        .apply(
            CONTAINER,
            FilesystemCommand::Write {
                inode,
                offset_bytes,
                data: Bytes::copy_from_slice(data),
                now_ns: 3,
                prewritten: Default::default(),
            },
        )
        .await
}

async fn read(storage: &TestStorage, inode: u64, offset_bytes: u64, length_bytes: u32) -> Vec<u8> {
    filesystem::read(
        &storage.storage,
        CONTAINER,
        inode,
        offset_bytes,
        length_bytes,
    )
    .await
    .unwrap()
    .to_vec()
}

fn used_blocks(storage: &TestStorage) -> u64 {
    filesystem::container_state(&storage.storage, CONTAINER)
        .unwrap()
        .used_block_count
}

#[tokio::test]
async fn write_read_unaligned_and_holes() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 5000, b"hello").await.unwrap();
    write(&mut storage, file, 4094, b"abcd").await.unwrap();
    let content = read(&storage, file, 0, 10_000).await;
    assert_eq!(content.len(), 5005);
    assert!(content[..4094].iter().all(|&b| b == 0));
    assert_eq!(&content[4094..4098], b"abcd");
    assert!(content[4098..5000].iter().all(|&b| b == 0));
    assert_eq!(&content[5000..], b"hello");
    assert_eq!(used_blocks(&storage), 2);
    let attributes = filesystem::get_inode(&storage.storage, CONTAINER, file).unwrap();
    assert_eq!((attributes.size_bytes, attributes.block_count), (5005, 2));
}

#[tokio::test]
async fn truncate_zeroes_the_tail_and_frees_blocks() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 0, &vec![7u8; 3 * 4096])
        .await
        .unwrap();
    assert_eq!(used_blocks(&storage), 3);
    let shrink = AttributeChanges {
        size_bytes: Some(100),
        ..Default::default()
    };
    storage
        .apply(
            CONTAINER,
            FilesystemCommand::SetAttributes {
                inode: file,
                changes: shrink,
                now_ns: 4,
            },
        )
        .await
        .unwrap();
    assert_eq!(used_blocks(&storage), 1);
    let grow = AttributeChanges {
        size_bytes: Some(8192),
        ..Default::default()
    };
    storage
        .apply(
            CONTAINER,
            FilesystemCommand::SetAttributes {
                inode: file,
                changes: grow,
                now_ns: 5,
            },
        )
        .await
        .unwrap();
    let content = read(&storage, file, 0, 8192).await;
    assert!(content[..100].iter().all(|&b| b == 7));
    assert!(
        content[100..].iter().all(|&b| b == 0),
        "no stale bytes after shrink and grow"
    );
}

#[tokio::test]
async fn fallocate_and_punch_hole() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    let allocate = FilesystemCommand::Fallocate {
        inode: file,
        offset_bytes: 0,
        length_bytes: 10_000,
        mode: 0,
        now_ns: 6,
    };
    storage.apply(CONTAINER, allocate).await.unwrap();
    assert_eq!(used_blocks(&storage), 3);
    assert_eq!(
        filesystem::get_inode(&storage.storage, CONTAINER, file)
            .unwrap()
            .size_bytes,
        10_000
    );
    write(&mut storage, file, 0, &vec![9u8; 10_000])
        .await
        .unwrap();
    let punch = FilesystemCommand::Fallocate {
        inode: file,
        offset_bytes: 100,
        length_bytes: 8192,
        mode: FALLOCATE_PUNCH_HOLE | FALLOCATE_KEEP_SIZE,
        now_ns: 7,
    };
    storage.apply(CONTAINER, punch).await.unwrap();
    let content = read(&storage, file, 0, 10_000).await;
    assert!(content[..100].iter().all(|&b| b == 9));
    assert!(content[100..8292].iter().all(|&b| b == 0));
    assert!(content[8292..].iter().all(|&b| b == 9));
    assert_eq!(used_blocks(&storage), 2, "the whole middle block was freed");
    let bad_mode = FilesystemCommand::Fallocate {
        inode: file,
        offset_bytes: 0,
        length_bytes: 1,
        mode: 0x8,
        now_ns: 8,
    };
    assert_eq!(
        errno(storage.apply(CONTAINER, bad_mode).await),
        Errno::EOPNOTSUPP
    );
}

async fn fallocate(
    storage: &mut TestStorage,
    inode: u64,
    offset_bytes: u64,
    length_bytes: u64,
    mode: u32,
) -> Result<CommandResponse, NodeError> {
    let command = FilesystemCommand::Fallocate {
        inode,
        offset_bytes,
        length_bytes,
        mode,
        now_ns: 6,
    };
    storage.apply(CONTAINER, command).await
}

fn block_reference(storage: &TestStorage, inode: u64, file_block: u64) -> Option<BlockRef> {
    crate::block_map::reference_at(
        &storage.storage.state,
        &crate::keys::block(CONTAINER, inode, file_block),
    )
    .unwrap()
}

/// fallocate gives holes unwritten references: quota and st_blocks count them, they read as
/// zeros, and no device block is taken until a write lands on them.
#[tokio::test]
async fn fallocate_takes_quota_but_no_device_blocks() {
    const BLOCK: u64 = 4096;
    let mut storage = initialized(16 * BLOCK).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 0, &[5u8; 4096]).await.unwrap();
    let free_start = storage.storage.free_block_count();

    fallocate(&mut storage, file, 0, 10 * BLOCK, 0)
        .await
        .unwrap();
    assert_eq!(used_blocks(&storage), 10);
    let inode = filesystem::get_inode(&storage.storage, CONTAINER, file).unwrap();
    assert_eq!((inode.size_bytes, inode.block_count), (10 * BLOCK, 10));
    assert_eq!(
        storage.storage.free_block_count(),
        free_start,
        "no device block taken"
    );
    assert_eq!(block_reference(&storage, file, 0).unwrap().checksum, {
        ballast_common::checksum(&[5u8; 4096])
    });
    assert!(block_reference(&storage, file, 1).unwrap().is_unwritten());
    let mut expected = vec![0u8; 10 * BLOCK as usize];
    expected[..4096].fill(5);
    assert_eq!(read(&storage, file, 0, 10 * BLOCK as u32).await, expected);

    // Past the quota: refused, nothing changes.
    assert_eq!(
        errno(fallocate(&mut storage, file, 0, 20 * BLOCK, 0).await),
        Errno::ENOSPC
    );
    assert_eq!(used_blocks(&storage), 10);
    assert_eq!(
        filesystem::get_inode(&storage.storage, CONTAINER, file)
            .unwrap()
            .size_bytes,
        10 * BLOCK
    );

    // A partial write over two unwritten blocks merges with zeros and takes two device blocks,
    // but no more quota; a whole-block write takes one.
    write(&mut storage, file, 2 * BLOCK - 50, &[7u8; 100])
        .await
        .unwrap();
    write(&mut storage, file, 4 * BLOCK, &[8u8; 4096])
        .await
        .unwrap();
    assert_eq!(used_blocks(&storage), 10);
    assert_eq!(storage.storage.free_block_count(), free_start - 3);
    expected[2 * BLOCK as usize - 50..2 * BLOCK as usize + 50].fill(7);
    expected[4 * BLOCK as usize..5 * BLOCK as usize].fill(8);
    assert_eq!(read(&storage, file, 0, 10 * BLOCK as u32).await, expected);
    // Unaligned, across written, unwritten and partly written blocks.
    assert_eq!(
        read(&storage, file, 4000, 20_000).await,
        &expected[4000..24_000]
    );
    assert!(!block_reference(&storage, file, 2).unwrap().is_unwritten());

    // Punching unwritten blocks gives back quota; dropping the file gives back every device
    // block it took, and none it did not.
    fallocate(
        &mut storage,
        file,
        6 * BLOCK,
        3 * BLOCK,
        FALLOCATE_PUNCH_HOLE | FALLOCATE_KEEP_SIZE,
    )
    .await
    .unwrap();
    assert_eq!(used_blocks(&storage), 7);
    assert_eq!(read(&storage, file, 0, 10 * BLOCK as u32).await, expected);
    let truncate = FilesystemCommand::SetAttributes {
        inode: file,
        changes: AttributeChanges {
            size_bytes: Some(0),
            ..Default::default()
        },
        now_ns: 9,
    };
    storage.apply(CONTAINER, truncate).await.unwrap();
    assert_eq!(used_blocks(&storage), 0);
    storage.storage.checkpoint(|_| Ok(())).await.unwrap();
    assert_eq!(storage.storage.free_block_count(), free_start + 1);
}

#[tokio::test]
async fn fallocate_is_bounded_per_command_and_refuses_a_damaged_unwritten_reference() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    let too_long = (filesystem::FALLOCATE_BLOCK_COUNT_MAX + 1) * 4096;
    assert_eq!(
        errno(fallocate(&mut storage, file, 0, too_long, 0).await),
        Errno::EOPNOTSUPP
    );
    assert_eq!(used_blocks(&storage), 0);
    fallocate(&mut storage, file, 0, 4096, 0).await.unwrap();
    // The sentinel with any other CRC is a damaged row: an error, never zeros.
    let damaged = crate::chunk_row::ChunkRow::with_blocks(
        None,
        0,
        &[Some(BlockRef {
            device_block: BlockRef::UNWRITTEN_DEVICE_BLOCK,
            checksum: 1,
        })],
    )
    .unwrap();
    let mut batch = rocksdb::WriteBatch::default();
    batch.put(crate::keys::chunk(CONTAINER, file, 0), damaged.encode());
    storage.storage.state.write_unlogged(batch).unwrap();
    let result = filesystem::read(&storage.storage, CONTAINER, file, 0, 4096).await;
    assert!(
        matches!(result, Err(NodeError::ChecksumMismatch(_))),
        "got {result:?}"
    );
}

#[tokio::test]
async fn quota_refuses_without_damage() {
    let mut storage = initialized(8 * 4096).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 0, &vec![1u8; 6 * 4096])
        .await
        .unwrap();
    assert_eq!(
        errno(write(&mut storage, file, 6 * 4096, &vec![2u8; 3 * 4096]).await),
        Errno::ENOSPC
    );
    assert_eq!(read(&storage, file, 0, 6 * 4096).await, vec![1u8; 6 * 4096]);
    assert_eq!(used_blocks(&storage), 6);
    // Overwriting in place needs no new quota.
    write(&mut storage, file, 0, &vec![3u8; 6 * 4096])
        .await
        .unwrap();
    assert_eq!(
        errno(write(&mut storage, file, FILE_SIZE_BYTES_MAX, b"x").await),
        Errno::EFBIG
    );
}

#[tokio::test]
async fn quota_changes_are_refused_below_usage() {
    let mut storage = initialized(8 * 4096).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 0, &vec![1u8; 6 * 4096])
        .await
        .unwrap();
    let set_quota = |quota_bytes| FilesystemCommand::SetQuota { quota_bytes };
    assert_eq!(
        errno(storage.apply(CONTAINER, set_quota(5 * 4096)).await),
        Errno::EINVAL
    );
    storage
        .apply(CONTAINER, set_quota(16 * 4096))
        .await
        .unwrap();
    // The grown quota admits what the old one refused.
    write(&mut storage, file, 6 * 4096, &vec![2u8; 9 * 4096])
        .await
        .unwrap();
    assert_eq!(used_blocks(&storage), 15);
    assert_eq!(
        errno(write(&mut storage, file, 15 * 4096, &vec![3u8; 2 * 4096]).await),
        Errno::ENOSPC
    );
}

#[tokio::test]
async fn namespace_errors_and_rename() {
    let mut storage = initialized(0).await;
    let directory = create(&mut storage, ROOT_INODE, "d", EntryKind::Directory).await;
    let file = create(&mut storage, directory, "f", EntryKind::File).await;
    let duplicate = FilesystemCommand::Create {
        parent: directory,
        name: "f".into(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        symlink_target: None,
        exclusive: true,
        now_ns: 9,
    };
    assert_eq!(
        errno(storage.apply(CONTAINER, duplicate).await),
        Errno::EEXIST
    );
    let rmdir = FilesystemCommand::Unlink {
        parent: ROOT_INODE,
        name: "d".into(),
        directory: true,
        now_ns: 9,
    };
    assert_eq!(
        errno(storage.apply(CONTAINER, rmdir).await),
        Errno::ENOTEMPTY
    );
    let unlink_directory = FilesystemCommand::Unlink {
        parent: ROOT_INODE,
        name: "d".into(),
        directory: false,
        now_ns: 9,
    };
    assert_eq!(
        errno(storage.apply(CONTAINER, unlink_directory).await),
        Errno::EISDIR
    );
    let into_itself = FilesystemCommand::Rename {
        parent: ROOT_INODE,
        name: "d".into(),
        new_parent: directory,
        new_name: "loop".into(),
        flags: 0,
        now_ns: 9,
    };
    assert_eq!(
        errno(storage.apply(CONTAINER, into_itself).await),
        Errno::EINVAL
    );
    let through_file = FilesystemCommand::Create {
        parent: file,
        name: "x".into(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        symlink_target: None,
        exclusive: true,
        now_ns: 9,
    };
    assert_eq!(
        errno(storage.apply(CONTAINER, through_file).await),
        Errno::ENOTDIR
    );
    let moved = FilesystemCommand::Rename {
        parent: directory,
        name: "f".into(),
        new_parent: ROOT_INODE,
        new_name: "g".into(),
        flags: 0,
        now_ns: 10,
    };
    storage.apply(CONTAINER, moved).await.unwrap();
    let (found, _) = filesystem::lookup(&storage.storage, CONTAINER, ROOT_INODE, "g").unwrap();
    assert_eq!(found, file);
    let root = filesystem::get_inode(&storage.storage, CONTAINER, ROOT_INODE).unwrap();
    assert_eq!((root.entry_count, root.nlink), (2, 3));
    let (entries, end) =
        filesystem::read_directory(&storage.storage, CONTAINER, ROOT_INODE, 0, 100).unwrap();
    assert!(end);
    let names: Vec<&str> = entries.iter().map(|(_, row)| row.name.as_str()).collect();
    assert_eq!(names, vec![".", "..", "d", "g"]);
}

#[tokio::test]
async fn orphans_keep_data_until_purged() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 0, &vec![5u8; 8192])
        .await
        .unwrap();
    let unlink = FilesystemCommand::Unlink {
        parent: ROOT_INODE,
        name: "f".into(),
        directory: false,
        now_ns: 11,
    };
    assert_eq!(
        storage.apply(CONTAINER, unlink).await.unwrap(),
        CommandResponse::Unlinked {
            inode: file,
            orphaned: true
        }
    );
    assert_eq!(
        read(&storage, file, 0, 8192).await,
        vec![5u8; 8192],
        "orphan still readable"
    );
    assert_eq!(used_blocks(&storage), 2);
    let purge = FilesystemCommand::PurgeOrphans { inode: 0 };
    assert_eq!(
        storage.apply(CONTAINER, purge).await.unwrap(),
        CommandResponse::Purged { purged_count: 1 }
    );
    assert_eq!(used_blocks(&storage), 0);
    assert!(filesystem::get_inode(&storage.storage, CONTAINER, file).is_err());
}

#[tokio::test]
async fn corrupted_block_is_an_error() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 0, &vec![0xA5u8; 4096])
        .await
        .unwrap();
    let reference = block_reference(&storage, file, 0).expect("block row");
    // Flip one bit of the block on the device through the block store, after the apply's own
    // write of it (which may still be in flight) has landed.
    storage.storage.pending_writes.wait_for_all().await;
    let mut block = storage
        .storage
        .block_store
        .read_blocks(reference.device_block, 1)
        .await
        .unwrap();
    block[17] ^= 0x01;
    storage
        .storage
        .block_store
        .write_blocks(reference.device_block, block)
        .await
        .unwrap();
    let result = filesystem::read(&storage.storage, CONTAINER, file, 0, 4096).await;
    assert!(
        matches!(result, Err(NodeError::ChecksumMismatch(_))),
        "got {result:?}"
    );
    assert_eq!(storage.storage.checksum_error_count(), 1);
    // A partial overwrite must not build on the corrupt block either.
    assert_eq!(errno(write(&mut storage, file, 10, b"x").await), Errno::EIO);
}

#[tokio::test]
async fn reads_and_checkpoints_wait_for_a_pending_block_write() {
    // An apply does not wait for its block write (`pending_writes.rs`). Holding one block's
    // write pending by hand: a read of that block and a checkpoint must both wait for it, and
    // a read of another file must not.
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    let other = create(&mut storage, ROOT_INODE, "g", EntryKind::File).await;
    write(&mut storage, file, 0, &vec![0x5Au8; 4096])
        .await
        .unwrap();
    write(&mut storage, other, 0, b"other").await.unwrap();
    storage.storage.pending_writes.wait_for_all().await;
    let reference = block_reference(&storage, file, 0).expect("block row");
    let extent = [(reference.device_block, 1)];
    storage.storage.pending_writes.insert(&extent);
    let unrelated = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        filesystem::read(&storage.storage, CONTAINER, other, 0, 5),
    )
    .await
    .expect("a read of other blocks does not wait")
    .unwrap();
    assert_eq!(&unrelated[..], b"other");
    let shared = std::sync::Arc::clone(&storage.storage);
    let read =
        tokio::spawn(async move { filesystem::read(&shared, CONTAINER, file, 0, 4096).await });
    let shared = std::sync::Arc::clone(&storage.storage);
    let checkpoint = tokio::spawn(async move { shared.checkpoint(|_| Ok(())).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !read.is_finished(),
        "the read did not wait for the pending write"
    );
    assert!(
        !checkpoint.is_finished(),
        "the checkpoint did not wait for the pending write"
    );
    storage.storage.pending_writes.complete(&extent);
    let data = read.await.unwrap().unwrap();
    assert_eq!(&data[..], &vec![0x5Au8; 4096][..]);
    checkpoint.await.unwrap().unwrap();
}

#[tokio::test]
async fn state_survives_reopen_after_checkpoint() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 0, b"durable").await.unwrap();
    storage.storage.checkpoint(|_| Ok(())).await.unwrap();
    let directory = storage.directory.path().to_path_buf();
    let free_before = storage.storage.free_block_count();
    drop(storage.storage);
    drop(storage.device);
    let (_device, reopened) = crate::test_support::open(&directory);
    assert_eq!(
        filesystem::read(&reopened, CONTAINER, file, 0, 100)
            .await
            .unwrap(),
        &b"durable"[..]
    );
    assert_eq!(
        reopened.free_block_count(),
        free_before,
        "allocator restored from its bitmap groups"
    );
}

#[tokio::test]
async fn a_full_device_fails_the_apply_as_a_node_failure_and_records_nothing() {
    // Whether a device has room depends on the node, not on the replicated state: recording
    // "ENOSPC" as the command's result would leave this replica without data its peers hold.
    // The apply must fail as this node's failure instead: nothing recorded, not even the
    // applied index (the entry is applied again later), and no block kept.
    const BLOCK: u64 = 4096;
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    write(&mut storage, file, 0, &vec![1u8; 3 * BLOCK as usize])
        .await
        .unwrap();
    let state_before = filesystem::container_state(&storage.storage, CONTAINER).unwrap();
    // Leave exactly one free block.
    let filler_bytes = (storage.storage.free_block_count() - 1) * BLOCK;
    let filler =
        ballast_device::AlignedBuffer::from_slice_padded(&vec![0xee; filler_bytes as usize]);
    let filler = storage.storage.write_new_blocks(filler).await.unwrap();
    assert_eq!(storage.storage.free_block_count(), 1);

    // A punched hole with two partial edges rewrites two blocks: the first gets the last free
    // block, the second finds none.
    let punch = FilesystemCommand::Fallocate {
        inode: file,
        offset_bytes: 100,
        length_bytes: 2 * BLOCK,
        mode: FALLOCATE_PUNCH_HOLE | FALLOCATE_KEEP_SIZE,
        now_ns: 9,
    };
    let result = storage.apply(CONTAINER, punch.clone()).await;
    assert!(
        matches!(result, Err(NodeError::DeviceFull { .. })),
        "a full device must fail the apply as a node failure, got {result:?}"
    );
    let state_after = filesystem::container_state(&storage.storage, CONTAINER).unwrap();
    assert_eq!(
        state_after.last_applied, state_before.last_applied,
        "the entry must not be recorded as applied"
    );
    assert_eq!(state_after.used_block_count, 3);
    assert_eq!(
        read(&storage, file, 0, 3 * BLOCK as u32).await,
        vec![1u8; 3 * BLOCK as usize]
    );
    // The block the first edge took comes back at the next checkpoint.
    storage.storage.checkpoint(|_| Ok(())).await.unwrap();
    assert_eq!(storage.storage.free_block_count(), 1, "no block leaked");

    // With room again (the filler given back), the same command applies.
    storage.storage.discard_new_blocks(&filler);
    storage.storage.checkpoint(|_| Ok(())).await.unwrap();
    storage.apply(CONTAINER, punch).await.unwrap();
    let mut expected = vec![0u8; 3 * BLOCK as usize];
    expected[..100].fill(1);
    expected[(2 * BLOCK + 100) as usize..].fill(1);
    assert_eq!(read(&storage, file, 0, 3 * BLOCK as u32).await, expected);
}

/// Reads `file` at several offsets and lengths and compares each with `model`.
async fn check_reads(storage: &TestStorage, file: u64, model: &[u8]) {
    const BLOCK: usize = 4096;
    for (offset, length) in [
        (0, 8 * BLOCK),
        (1, 100),
        (BLOCK - 1, BLOCK + 2),
        (3 * BLOCK, 3 * BLOCK),
    ] {
        assert_eq!(
            read(storage, file, offset as u64, length as u32).await,
            model[offset..offset + length],
            "offset {offset} length {length}"
        );
    }
}

#[tokio::test]
async fn reads_agree_whether_the_blocks_are_one_device_run_or_not() {
    // A range of written blocks on consecutive device blocks is answered from the device buffer
    // itself; any other range is assembled run by run. Both must give the same bytes.
    const BLOCK: usize = 4096;
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    let mut model: Vec<u8> = (0..8 * BLOCK).map(|index| (index % 251) as u8).collect();
    write(&mut storage, file, 0, &model).await.unwrap();
    check_reads(&storage, file, &model).await;
    // Copy-on-write moves block 4 elsewhere: ranges over it are no longer one device run.
    model[4 * BLOCK..5 * BLOCK].fill(0xab);
    write(&mut storage, file, 4 * BLOCK as u64, &vec![0xab; BLOCK])
        .await
        .unwrap();
    check_reads(&storage, file, &model).await;
    // A hole inside the range (a punched block) reads as zeros.
    let punch = FilesystemCommand::Fallocate {
        inode: file,
        offset_bytes: BLOCK as u64,
        length_bytes: BLOCK as u64,
        mode: FALLOCATE_PUNCH_HOLE | FALLOCATE_KEEP_SIZE,
        now_ns: 4,
    };
    storage.apply(CONTAINER, punch).await.unwrap();
    model[BLOCK..2 * BLOCK].fill(0);
    check_reads(&storage, file, &model).await;
}

/// A shared region of `region_bytes` attached to a fresh `SharedRegions`, as a driver would.
fn attached_region(
    directory: &std::path::Path,
    region_bytes: usize,
) -> (
    std::sync::Arc<crate::shared_regions::SharedRegions>,
    ballast_common::shared_region::SharedRegion,
    u64,
    std::os::unix::net::UnixStream,
) {
    let regions = std::sync::Arc::new(crate::shared_regions::SharedRegions::default());
    let socket = directory.join("local.sock");
    regions.serve(&socket, 1).unwrap();
    let region = ballast_common::shared_region::SharedRegion::create("test", region_bytes).unwrap();
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let (region_id, _) = region.send(&mut stream).unwrap();
    (regions, region, region_id, stream)
}

#[tokio::test]
async fn a_shared_read_of_several_device_requests_lands_whole_in_the_slot() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    // 3 MiB + 20 KiB with every kind of block: data written out of order (so device blocks
    // are not contiguous across pieces), a hole, and an allocated but unwritten range.
    let size_bytes = (3 << 20) + 20 * 4096;
    let pattern: Vec<u8> = (0..size_bytes).map(|index| (index % 251) as u8).collect();
    for (start, end) in [(2 << 20, size_bytes), (0, 600 << 10), (1 << 20, 2 << 20)] {
        write(&mut storage, file, start as u64, &pattern[start..end])
            .await
            .unwrap();
    }
    let allocate = FilesystemCommand::Fallocate {
        inode: file,
        offset_bytes: 700 << 10,
        length_bytes: 100 << 10,
        mode: 0,
        now_ns: 6,
    };
    storage.apply(CONTAINER, allocate).await.unwrap();

    let directory = tempfile::tempdir().unwrap();
    let slot_bytes = (4 << 20) + 4096;
    let (regions, region, region_id, _stream) = attached_region(directory.path(), 2 * slot_bytes);
    let offset_bytes = 4096 + 123;
    let length_bytes = 4 << 20;
    let slot = regions
        .slot(region_id, slot_bytes as u64, slot_bytes as u32)
        .unwrap();
    let (start, length) = filesystem::read_shared(
        &storage.storage,
        CONTAINER,
        file,
        offset_bytes,
        length_bytes,
        slot,
    )
    .await
    .unwrap();
    let expected = read(&storage, file, offset_bytes, length_bytes).await;
    assert_eq!(
        expected.len(),
        size_bytes - offset_bytes as usize,
        "read stops at the end"
    );
    assert_eq!(length, expected.len());
    assert_eq!((start, length), (123, size_bytes - offset_bytes as usize));
    let landed = region
        .with_bytes(slot_bytes + start, length, |bytes| bytes.to_vec())
        .unwrap();
    assert!(
        landed == expected,
        "the slot holds other bytes than a plain read"
    );
    assert!(expected[(600 << 10) - 4219..(1 << 20) - 4219]
        .iter()
        .all(|&byte| byte == 0));
    let untouched = region.with_bytes(0, slot_bytes, |bytes| bytes.iter().all(|&byte| byte == 0));
    assert_eq!(untouched, Some(true), "the read wrote outside its slot");

    // A slot too small for the blocks is refused before anything is written into it.
    let small = regions.slot(region_id, 0, 1 << 20).unwrap();
    let refused =
        filesystem::read_shared(&storage.storage, CONTAINER, file, 0, 2 << 20, small).await;
    assert!(refused.is_err(), "2 MiB of blocks went into a 1 MiB slot");
    let untouched = region.with_bytes(0, slot_bytes, |bytes| bytes.iter().all(|&byte| byte == 0));
    assert_eq!(untouched, Some(true), "a refused read wrote into the slot");
}

/// Shared reads stage their pieces in the node's own buffers only while a permit of the
/// node-wide bound is free (`storage::STAGED_READ_PIECES_MAX`): with none free a read waits,
/// and it completes, intact, once permits come back; each piece gives its permit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_reads_stage_at_most_the_node_bound_of_pieces() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    let size_bytes = 3 << 20;
    let pattern: Vec<u8> = (0..size_bytes).map(|index| (index % 249) as u8).collect();
    write(&mut storage, file, 0, &pattern).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let slot_bytes = (4 << 20) + 4096;
    let (regions, region, region_id, _stream) = attached_region(directory.path(), slot_bytes);
    let bound = crate::storage::STAGED_READ_PIECES_MAX;
    assert_eq!(storage.storage.staged_read_pieces_free(), bound);

    let mut held = Vec::new();
    for _ in 0..bound {
        held.push(storage.storage.staged_read_piece().await);
    }
    let slot = regions.slot(region_id, 0, slot_bytes as u32).unwrap();
    let shared = &storage.storage;
    let mut read = Box::pin(filesystem::read_shared(
        shared,
        CONTAINER,
        file,
        0,
        size_bytes as u32,
        slot,
    ));
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut read).await;
    assert!(
        early.is_err(),
        "a shared read staged a piece with no permit free"
    );
    // One permit back: the three pieces go one at a time.
    held.pop();
    let (start, length) = read.await.unwrap();
    assert_eq!((start, length), (0, size_bytes));
    let landed = region
        .with_bytes(0, length, |bytes| bytes.to_vec())
        .unwrap();
    assert!(
        landed == pattern,
        "the slot holds other bytes than were written"
    );
    assert_eq!(
        shared.staged_read_pieces_free(),
        1,
        "a piece kept its permit"
    );
    drop(held);
    assert_eq!(shared.staged_read_pieces_free(), bound);
}

#[test]
fn read_pieces_cover_the_range_once_in_device_requests() {
    let piece_blocks = filesystem::SHARED_READ_PIECE_BLOCKS;
    for (first, last) in [
        (0, 0),
        (0, 127),
        (0, 128),
        (7, 1030),
        (5, 5 + 1023),
        (u64::MAX - 300, u64::MAX),
    ] {
        let pieces: Vec<(u64, u64)> = filesystem::pieces_of(first, last, piece_blocks).collect();
        assert_eq!(pieces.first().unwrap().0, first);
        assert_eq!(pieces.last().unwrap().1, last);
        for (piece_first, piece_last) in &pieces {
            assert!(piece_first <= piece_last && piece_last - piece_first < piece_blocks);
        }
        for pair in pieces.windows(2) {
            assert_eq!(pair[0].1 + 1, pair[1].0, "pieces leave a gap or overlap");
        }
    }
}

/// A read whose block map rows are not in memory (a reopened store: an empty block cache) scans
/// the state filesystem on a thread made blocking, on a runtime of several threads, and gets
/// every byte right; the rows are in memory afterwards. The file is 48 MiB, so its chunk rows
/// span many RocksDB data blocks and the ones read (in the middle) are not among those that
/// opening the store reads (the allocator's rows and the format version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_rows_are_not_in_memory_scans_off_the_runtime() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    let model: Vec<u8> = (0..48 << 20u32).map(|index| (index % 241) as u8).collect();
    for (index, piece) in model.chunks(4 << 20).enumerate() {
        write(&mut storage, file, (index as u64) << 22, piece)
            .await
            .unwrap();
    }
    storage.storage.checkpoint(|_| Ok(())).await.unwrap();
    let directory = storage.directory.path().to_path_buf();
    drop(storage.storage);
    drop(storage.device);
    let (_device, reopened) = crate::test_support::open(&directory);
    // The chunk rows a 1 MiB read at 24 MiB + 20,487 bytes needs: chunks 24 and 25.
    let start = crate::keys::chunk(CONTAINER, file, 24);
    let end = crate::keys::chunk(CONTAINER, file, 26);
    let rows_in_memory = || {
        reopened
            .state
            .scan_in_memory(&start, &end, usize::MAX, |_, _| Ok(true))
            .unwrap()
    };
    assert!(
        !rows_in_memory(),
        "a reopened store starts with nothing cached"
    );
    let offset = (24 << 20) + 4096 * 5 + 7;
    let read = filesystem::read(&reopened, CONTAINER, file, offset as u64, 1 << 20)
        .await
        .unwrap();
    assert_eq!(&read[..], &model[offset..offset + (1 << 20)]);
    assert!(rows_in_memory(), "the scan filled the block cache");
}

/// A store of format version 1 (one state row per block) opens as chunk rows with every byte,
/// hole and fallocated block where it was. The version 1 store is made by writing through
/// today's code and turning its chunk rows back into per-block rows, as version 1 kept them.
#[tokio::test]
async fn a_store_of_per_block_rows_converts_at_open_and_reads_back_every_byte() {
    let mut storage = initialized(0).await;
    let file = create(&mut storage, ROOT_INODE, "f", EntryKind::File).await;
    let model: Vec<u8> = (0..(3 << 20) + 5000u32)
        .map(|index| (index % 251) as u8)
        .collect();
    write(&mut storage, file, 8192, &model).await.unwrap();
    fallocate(&mut storage, file, 5 << 20, 64 << 10, 0)
        .await
        .unwrap();
    let sparse = create(&mut storage, ROOT_INODE, "g", EntryKind::File).await;
    write(&mut storage, sparse, 40 << 20, b"far out")
        .await
        .unwrap();
    let contents = |storage: std::sync::Arc<crate::storage::NodeStorage>| async move {
        let whole = filesystem::read(&storage, CONTAINER, file, 0, 6 << 20)
            .await
            .unwrap();
        let far = filesystem::read(&storage, CONTAINER, sparse, (40 << 20) - 3, 10)
            .await
            .unwrap();
        (whole, far)
    };
    let before = contents(std::sync::Arc::clone(&storage.storage)).await;
    assert_eq!(&before.0[8192..8192 + model.len()], &model[..]);
    assert_eq!(&before.1[..], b"\0\0\0far out");
    let file_references_before =
        crate::block_map::references(&storage.storage.state, CONTAINER, file, 0, u64::MAX).unwrap();
    storage.storage.checkpoint(|_| Ok(())).await.unwrap();
    {
        let state = &storage.storage.state;
        let chunk_rows = state
            .scan_collect(
                &[crate::keys::TAG_CHUNK],
                &[crate::keys::TAG_CHUNK + 1],
                usize::MAX,
            )
            .unwrap();
        assert!(chunk_rows.len() >= 5, "{} chunk rows", chunk_rows.len());
        let mut batch = rocksdb::WriteBatch::default();
        for (key, value) in chunk_rows {
            let container_id = u64::from_be_bytes(key[1..9].try_into().unwrap());
            let (inode, chunk_index) = crate::keys::chunk_key_parts(&key).unwrap();
            let row = crate::chunk_row::ChunkRow::decode(&value).unwrap();
            for (block, reference) in row.references_between(0, 255) {
                batch.put(
                    crate::keys::block(container_id, inode, chunk_index * 256 + u64::from(block)),
                    crate::records::encode(&reference),
                );
            }
            batch.delete(key);
        }
        batch.delete(crate::keys::format_version());
        state.write_synced(batch).unwrap();
    }
    let directory = storage.directory.path().to_path_buf();
    drop(storage.storage);
    drop(storage.device);
    let (_device, reopened) = crate::test_support::open(&directory);
    assert_eq!(
        crate::block_map::format_version(&reopened.state).unwrap(),
        Some(crate::block_map::FORMAT_VERSION_CHUNK_ROWS)
    );
    let block_rows_left = reopened
        .state
        .scan_collect(&[crate::keys::TAG_BLOCK], &[crate::keys::TAG_BLOCK + 1], 1)
        .unwrap();
    assert!(block_rows_left.is_empty());
    assert_eq!(
        crate::block_map::references(&reopened.state, CONTAINER, file, 0, u64::MAX).unwrap(),
        file_references_before
    );
    assert_eq!(contents(reopened).await, before);
}
