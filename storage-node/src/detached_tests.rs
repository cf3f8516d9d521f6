//! Detached write data through the real parts: the container's log writer, the device log store,
//! the state machine, RocksDB and the allocator, on a device file (`detached.rs`).
//!
//! What these tests pin down: the data of a detached write reaches the device once; the apply
//! installs the blocks the log writer wrote; a record's blocks keep their bytes while the record
//! is live, even after the file was overwritten and a checkpoint released other frees; a purge
//! gives them back; a restart re-pins every live record and the replay claims the unapplied ones;
//! a flipped bit in detached data is an error when the entry is read back, never data; and a
//! failed apply claims nothing.

use std::sync::Arc;

use ballast_device::{LogStore, BLOCK_SIZE_BYTES};
use bytes::Bytes;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder};
use tokio::sync::Notify;

use crate::command::{Command, CommandResponse, FilesystemCommand};
use crate::detached::DETACHED_WRITE_BYTES_MIN_DEFAULT;
use crate::filesystem;
use crate::log_storage::ContainerLog;
use crate::state_machine::ContainerStateMachine;
use crate::storage::NodeStorage;
use crate::test_support::TestStorage;
use crate::types::Entry;
use crate::write_data::WriteData;

const CONTAINER: u64 = 4;
/// 64 KiB: 16 blocks.
const WRITE_BYTES: usize = 16 * BLOCK_SIZE_BYTES;
const WRITE_BLOCKS: u64 = 16;

/// A container with one empty file, its log on the same device, and its state machine. Indexes
/// 1 and 2 (initialise, create) are applied; entries start at 3.
struct Setup {
    test: TestStorage,
    log_store: LogStore,
    log: ContainerLog,
    machine: ContainerStateMachine,
    inode: u64,
}

async fn setup() -> Setup {
    let mut test = TestStorage::initialized(CONTAINER, 0).await;
    let inode = test.create_file(CONTAINER, "file").await;
    let log_store = LogStore::open(test.device.engine(), test.device.superblock()).unwrap();
    let (log, machine) = container(&log_store, &test.storage, false);
    Setup {
        test,
        log_store,
        log,
        machine,
        inode,
    }
}

/// The container's log (`replicated`: appends are durable) and state machine.
fn container(
    log_store: &LogStore,
    storage: &Arc<NodeStorage>,
    replicated: bool,
) -> (ContainerLog, ContainerStateMachine) {
    let log = ContainerLog::new(
        CONTAINER,
        log_store.clone(),
        Arc::clone(storage),
        Arc::new(Notify::new()),
        replicated,
        DETACHED_WRITE_BYTES_MIN_DEFAULT,
    );
    let state_machine =
        ContainerStateMachine::new(CONTAINER, Arc::clone(storage)).applying(log.written_log());
    (log, state_machine)
}

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn write(index: u64, inode: u64, offset_bytes: u64, fill: u8) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Filesystem(FilesystemCommand::Write {
            inode,
            offset_bytes,
            data: Bytes::from(pattern(fill)),
            now_ns: 10 + index as i64,
            prewritten: Default::default(),
        })),
    }
}

/// Every block different, so a block in the wrong place is seen.
fn pattern(fill: u8) -> Vec<u8> {
    (0..WRITE_BYTES)
        .map(|position| fill ^ (position / BLOCK_SIZE_BYTES) as u8)
        .collect()
}

async fn read_back(log: &ContainerLog, index: u64) -> Result<Entry, crate::types::StorageError> {
    log.forget_cached_entries();
    let mut reader = log.clone();
    let mut entries = reader.try_get_log_entries(index..=index).await?;
    assert_eq!(entries.len(), 1, "entry {index} is in the log");
    Ok(entries.remove(0))
}

async fn file_bytes(storage: &NodeStorage, inode: u64, offset_bytes: u64) -> Vec<u8> {
    filesystem::read(storage, CONTAINER, inode, offset_bytes, WRITE_BYTES as u32)
        .await
        .unwrap()
        .to_vec()
}

/// Applies one write entry, which must succeed.
async fn apply_write(machine: &mut ContainerStateMachine, entry: Entry) {
    let responses = machine.apply(vec![entry]).await.unwrap();
    assert!(
        matches!(responses[0], CommandResponse::Written { .. }),
        "{responses:?}"
    );
}

async fn checkpoint(machine: &mut ContainerStateMachine) {
    let mut builder = machine.get_snapshot_builder().await;
    builder.build_snapshot().await.unwrap();
}

#[tokio::test]
async fn a_detached_write_reaches_the_device_once_and_its_apply_installs_those_blocks() {
    let Setup {
        test,
        log_store,
        log,
        mut machine,
        inode,
    } = setup().await;
    let storage = &test.storage;
    let free_before = storage.free_block_count();
    let written_before = test.device.engine().statistics().bytes_written;
    let entry = write(3, inode, 8 * BLOCK_SIZE_BYTES as u64, 0x5a);
    log.append_now(vec![entry.clone()]).await.unwrap();
    let retained = log_store.retained_entries(CONTAINER);
    assert_eq!(retained.len(), 1, "the write went into a retained record");
    assert!(
        retained[0].payload.len() < 512,
        "the record is small: {} bytes",
        retained[0].payload.len()
    );
    assert_eq!(storage.pinned_counts(), (1, WRITE_BLOCKS));
    assert_eq!(
        storage.free_block_count(),
        free_before - WRITE_BLOCKS,
        "held"
    );
    assert_eq!(
        read_back(&log, 3).await.unwrap(),
        entry,
        "rebuilt from the blocks"
    );

    apply_write(&mut machine, entry).await;
    assert_eq!(
        storage.free_block_count(),
        free_before - WRITE_BLOCKS,
        "the apply claimed the held blocks instead of allocating new ones"
    );
    assert!(
        storage.detached_blocks(CONTAINER, 3, 1).is_none(),
        "claimed"
    );
    assert_eq!(
        file_bytes(storage, inode, 8 * BLOCK_SIZE_BYTES as u64).await,
        pattern(0x5a)
    );
    let written = test.device.engine().statistics().bytes_written - written_before;
    // Data once (64 KiB) plus one small log batch; written twice it would be over 128 KiB.
    assert!(
        written < (WRITE_BYTES + WRITE_BYTES / 2) as u64,
        "{written} bytes written to the device for a {WRITE_BYTES}-byte write"
    );
}

#[tokio::test]
async fn a_prewritten_write_reaches_the_device_once_and_its_append_only_names_the_blocks() {
    prewritten_write_reaches_the_device_once(false).await;
}

#[tokio::test]
async fn a_prewritten_aligned_write_is_written_from_its_buffer_which_becomes_the_entrys_bytes() {
    prewritten_write_reaches_the_device_once(true).await;
}

/// A write prewritten from `Bytes`, or (`aligned`) from the node's aligned copy of a slot.
async fn prewritten_write_reaches_the_device_once(aligned: bool) {
    let Setup {
        test,
        log_store,
        log,
        mut machine,
        inode,
    } = setup().await;
    let storage = &test.storage;
    let free_before = storage.free_block_count();
    let written_before = test.device.engine().statistics().bytes_written;
    let offset_bytes = 4 * BLOCK_SIZE_BYTES as u64;
    let (write_data, buffer_address) = if aligned {
        let pool = Arc::clone(storage.buffer_pool());
        let buffer = pool.for_copy(&pattern(0x3c));
        let address = buffer.as_ptr() as usize;
        (WriteData::aligned(buffer, WRITE_BYTES, pool), Some(address))
    } else {
        (WriteData::Bytes(Bytes::from(pattern(0x3c))), None)
    };
    let (prewritten, data) = storage
        .prewrite(offset_bytes, write_data, DETACHED_WRITE_BYTES_MIN_DEFAULT)
        .await
        .unwrap();
    assert_eq!(&data[..], &pattern(0x3c)[..]);
    if let Some(address) = buffer_address {
        assert_eq!(
            data.as_ptr() as usize,
            address,
            "the entry's bytes are the buffer the device wrote from"
        );
    }
    let prewritten_bytes = test.device.engine().statistics().bytes_written - written_before;
    assert_eq!(
        prewritten_bytes, WRITE_BYTES as u64,
        "the proposer wrote the data"
    );
    assert_eq!(storage.free_block_count(), free_before - WRITE_BLOCKS);
    let entry = Entry {
        log_id: log_id(3),
        payload: EntryPayload::Normal(Command::Filesystem(FilesystemCommand::Write {
            inode,
            offset_bytes,
            data,
            now_ns: 13,
            prewritten,
        })),
    };
    log.append_now(vec![entry.clone()]).await.unwrap();
    let retained = log_store.retained_entries(CONTAINER);
    assert_eq!(retained.len(), 1, "the write went into a retained record");
    assert_eq!(storage.pinned_counts(), (1, WRITE_BLOCKS));
    assert_eq!(
        storage.free_block_count(),
        free_before - WRITE_BLOCKS,
        "the log writer used the prewritten blocks, it reserved no others"
    );
    let appended_bytes =
        test.device.engine().statistics().bytes_written - written_before - prewritten_bytes;
    assert!(
        appended_bytes < (WRITE_BYTES / 2) as u64,
        "the append wrote {appended_bytes} bytes: it must only write the small record"
    );
    assert_eq!(
        read_back(&log, 3).await.unwrap(),
        entry,
        "rebuilt from the prewritten blocks"
    );
    apply_write(&mut machine, entry).await;
    assert_eq!(storage.free_block_count(), free_before - WRITE_BLOCKS);
    assert_eq!(
        file_bytes(storage, inode, offset_bytes).await,
        pattern(0x3c)
    );
}

#[tokio::test]
async fn a_prewrite_that_is_never_appended_gives_its_blocks_back() {
    let Setup {
        test, mut machine, ..
    } = setup().await;
    let storage = &test.storage;
    let free_before = storage.free_block_count();
    let data = Bytes::from(pattern(0x11));
    let (prewritten, _) = storage
        .prewrite(0, WriteData::Bytes(data), DETACHED_WRITE_BYTES_MIN_DEFAULT)
        .await
        .unwrap();
    let clone = prewritten.clone();
    assert_eq!(storage.free_block_count(), free_before - WRITE_BLOCKS);
    // A proposal refused (not the leader, below minimum replication) drops its command.
    drop(prewritten);
    assert_eq!(
        storage.free_block_count(),
        free_before - WRITE_BLOCKS,
        "a clone lives"
    );
    drop(clone);
    assert_eq!(storage.pinned_counts(), (0, 0));
    // Given back as deferred frees, as any reservation whose record was never appended: usable
    // again after the next checkpoint.
    checkpoint(&mut machine).await;
    assert_eq!(storage.free_block_count(), free_before);

    // Not detachable (unaligned, or shorter than the minimum): nothing is reserved or written.
    let written_before = test.device.engine().statistics().bytes_written;
    for (offset_bytes, length_bytes) in [(0, BLOCK_SIZE_BYTES), (512, WRITE_BYTES)] {
        let data = Bytes::from(vec![1u8; length_bytes]);
        let (prewritten, returned) = storage
            .prewrite(
                offset_bytes,
                WriteData::Bytes(data.clone()),
                DETACHED_WRITE_BYTES_MIN_DEFAULT,
            )
            .await
            .unwrap();
        assert_eq!(prewritten.take(), None);
        assert_eq!(returned, data, "the data comes back as it was");
    }
    assert_eq!(storage.free_block_count(), free_before);
    assert_eq!(
        test.device.engine().statistics().bytes_written,
        written_before
    );
}

#[tokio::test]
async fn an_overwritten_record_keeps_its_bytes_until_purged() {
    let Setup {
        test,
        log,
        mut machine,
        inode,
        ..
    } = setup().await;
    let storage = &test.storage;
    let free_before = storage.free_block_count();
    let first = write(3, inode, 0, 0x11);
    let second = write(4, inode, 0, 0x22);
    log.append_now(vec![first.clone()]).await.unwrap();
    machine.apply(vec![first.clone()]).await.unwrap();
    log.append_now(vec![second.clone()]).await.unwrap();
    machine.apply(vec![second]).await.unwrap();
    // The first write's blocks are free in the state now; the checkpoint releases frees, but
    // not blocks a live record names: a lagging follower may still need entry 3.
    checkpoint(&mut machine).await;
    assert_eq!(storage.free_block_count(), free_before - 2 * WRITE_BLOCKS);
    // Take every free block of the device and overwrite it: if entry 3's blocks were
    // allocatable, they would be among them.
    let free = storage.free_block_count() as usize;
    let filler =
        ballast_device::AlignedBuffer::from_slice_padded(&vec![0xee; free * BLOCK_SIZE_BYTES]);
    storage.write_new_blocks(filler).await.unwrap();
    assert_eq!(storage.free_block_count(), 0);
    assert_eq!(
        read_back(&log, 3).await.unwrap(),
        first,
        "still rebuilt after the overwrite"
    );
    assert_eq!(file_bytes(storage, inode, 0).await, pattern(0x22));

    // Purged: the pins go, and the next checkpoint gives entry 3's blocks back.
    let mut log_storage = log.clone();
    log_storage.purge(log_id(4)).await.unwrap();
    assert_eq!(storage.pinned_counts(), (0, 0));
    checkpoint(&mut machine).await;
    assert_eq!(storage.free_block_count(), WRITE_BLOCKS);
}

#[tokio::test]
async fn a_restart_repins_live_records_and_the_replay_claims_the_unapplied_one() {
    let Setup {
        test,
        log_store,
        log,
        mut machine,
        inode,
    } = setup().await;
    let first = write(3, inode, 0, 0x31);
    let second = write(4, inode, 64 * BLOCK_SIZE_BYTES as u64, 0x42);
    log.append_now(vec![first.clone(), second.clone()])
        .await
        .unwrap();
    machine.apply(vec![first]).await.unwrap();
    checkpoint(&mut machine).await;
    let free_before_crash = test.storage.free_block_count();
    // The process dies with entry 4 appended but not applied.
    let TestStorage {
        directory,
        device,
        storage,
        ..
    } = test;
    drop((log, machine, log_store, storage, device));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    let (device, storage) = crate::test_support::open(directory.path());
    let log_store = LogStore::open(device.engine(), device.superblock()).unwrap();
    crate::node::repin_detached_records(&log_store, &storage).unwrap();
    assert_eq!(storage.pinned_counts(), (2, 2 * WRITE_BLOCKS));
    assert_eq!(
        storage.free_block_count(),
        free_before_crash,
        "entry 3's blocks are in use, entry 4's held again"
    );
    assert!(
        storage.detached_blocks(CONTAINER, 3, 1).is_none(),
        "applied before the crash"
    );
    assert!(
        storage.detached_blocks(CONTAINER, 4, 1).is_some(),
        "waiting for its replay"
    );
    let (log, mut machine) = container(&log_store, &storage, false);
    let replayed = read_back(&log, 4).await.unwrap();
    assert_eq!(replayed, second);
    machine.apply(vec![replayed]).await.unwrap();
    assert!(
        storage.detached_blocks(CONTAINER, 4, 1).is_none(),
        "claimed by the replay"
    );
    assert_eq!(
        storage.free_block_count(),
        free_before_crash,
        "no new blocks"
    );
    assert_eq!(file_bytes(&storage, inode, 0).await, pattern(0x31));
    assert_eq!(
        file_bytes(&storage, inode, 64 * BLOCK_SIZE_BYTES as u64).await,
        pattern(0x42)
    );
}

#[tokio::test]
async fn a_flipped_bit_in_detached_data_is_an_error_never_data() {
    let Setup {
        test, log, inode, ..
    } = setup().await;
    let entry = write(3, inode, 0, 0x77);
    log.append_now(vec![entry]).await.unwrap();
    let pinned = test
        .storage
        .detached_blocks(CONTAINER, 3, 1)
        .expect("pinned");
    let device_block = pinned.device_blocks[5];
    let mut block = test
        .storage
        .block_store
        .read_blocks(device_block, 1)
        .await
        .unwrap();
    block[99] ^= 0x08;
    test.storage
        .block_store
        .write_blocks(device_block, block)
        .await
        .unwrap();
    let errors_before = test.storage.checksum_error_count();
    let error = read_back(&log, 3)
        .await
        .expect_err("a corrupt entry is refused");
    assert!(error.to_string().contains("checksum"), "{error}");
    assert_eq!(test.storage.checksum_error_count(), errors_before + 1);
}

#[tokio::test]
async fn a_failed_apply_claims_nothing_and_the_purge_gives_the_blocks_back() {
    let Setup {
        test,
        log,
        mut machine,
        ..
    } = setup().await;
    let storage = &test.storage;
    let free_before = storage.free_block_count();
    // No such inode: the apply fails (ENOENT) after the data was written.
    let entry = write(3, 999, 0, 0x01);
    log.append_now(vec![entry.clone()]).await.unwrap();
    let responses = machine.apply(vec![entry]).await.unwrap();
    assert!(
        matches!(&responses[0], CommandResponse::Failed(_)),
        "{responses:?}"
    );
    assert!(
        storage.detached_blocks(CONTAINER, 3, 1).is_some(),
        "not claimed"
    );
    checkpoint(&mut machine).await;
    let mut log_storage = log.clone();
    log_storage.purge(log_id(3)).await.unwrap();
    checkpoint(&mut machine).await;
    assert_eq!(storage.pinned_counts(), (0, 0));
    assert_eq!(storage.free_block_count(), free_before, "nothing leaked");
}

#[tokio::test]
async fn a_replicated_append_of_detached_writes_is_made_durable_by_one_flush() {
    let mut test = TestStorage::initialized(CONTAINER, 0).await;
    let inode = test.create_file(CONTAINER, "file").await;
    let log_store = LogStore::open(test.device.engine(), test.device.superblock()).unwrap();
    let (log, _) = container(&log_store, &test.storage, true);
    let engine = test.device.engine();
    let before = engine.statistics();
    let entries = vec![
        write(3, inode, 0, 0x3c),
        write(4, inode, WRITE_BYTES as u64, 0x4d),
    ];
    log.append_now(entries.clone()).await.unwrap();
    let after = engine.statistics();
    // Both entries' data and their records are written, then one flush covers them all (not a
    // synchronous write per piece of data and another for the records).
    assert_eq!(after.flushes - before.flushes, 1);
    assert_eq!(log_store.retained_entries(CONTAINER).len(), 2);
    assert_eq!(read_back(&log, 3).await.unwrap(), entries[0]);
    assert_eq!(read_back(&log, 4).await.unwrap(), entries[1]);
}

#[tokio::test]
async fn a_single_voter_append_is_durable_only_while_a_guard_lives() {
    // A durable write request takes a guard around its proposal (`request_durable_appends`),
    // so its own append is flushed; other appends of a single-voter group stay buffered.
    let mut test = TestStorage::initialized(CONTAINER, 0).await;
    let inode = test.create_file(CONTAINER, "journal").await;
    let log_store = LogStore::open(test.device.engine(), test.device.superblock()).unwrap();
    let (log, _) = container(&log_store, &test.storage, false);
    let engine = test.device.engine();
    let syncs = || {
        let statistics = engine.statistics();
        statistics.flushes + statistics.durable_writes
    };
    // Small, so it is logged inline (not detached).
    let small_write = |index: u64| Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Filesystem(FilesystemCommand::Write {
            inode,
            offset_bytes: index * 4096,
            data: Bytes::from(vec![index as u8; 4096]),
            now_ns: 10 + index as i64,
            prewritten: Default::default(),
        })),
    };
    // The first batch of a segment flushes its predecessors; start measuring after it.
    log.append_now(vec![small_write(2)]).await.unwrap();
    let before = syncs();
    log.append_now(vec![small_write(3)]).await.unwrap();
    assert_eq!(syncs(), before, "a single-voter append is buffered");
    let guard = log.request_durable_appends();
    assert!(log.guarded_by(&guard));
    log.append_now(vec![small_write(4)]).await.unwrap();
    let with_guard = syncs();
    assert!(
        with_guard > before,
        "the guarded append was not made durable"
    );
    drop(guard);
    log.append_now(vec![small_write(5)]).await.unwrap();
    assert_eq!(syncs(), with_guard, "buffered again after the guard");
    // A guard of another log (a replaced group) is not this log's.
    let (other, _) = container(&log_store, &test.storage, false);
    assert!(!log.guarded_by(&other.request_durable_appends()));
}

#[tokio::test]
async fn a_purge_never_passes_a_snapshot_record_that_is_not_durable() {
    // Storage rule 6. Seen in the nemesis: an install wrote its snapshot record, a purge read
    // it before the checkpoint's flush and purged, the node was killed, and on every restart
    // openraft refused the container (purged past the snapshot).
    let Setup {
        test,
        log,
        mut machine,
        inode,
        ..
    } = setup().await;
    append_and_apply_writes(&log, &mut machine, inode, 3..=4).await;
    checkpoint(&mut machine).await;
    append_and_apply_writes(&log, &mut machine, inode, 5..=6).await;
    // A record for 6 that is not flushed: what a checkpoint or an install leaves between
    // writing its record and the flush that makes it durable.
    let meta = openraft::SnapshotMeta::<u64, crate::types::RaftNode> {
        last_log_id: Some(log_id(6)),
        last_membership: Default::default(),
        snapshot_id: "not-durable-yet".into(),
    };
    let mut batch = rocksdb::WriteBatch::default();
    batch.put(
        crate::keys::container_singleton(crate::keys::TAG_SNAPSHOT, CONTAINER),
        crate::records::encode(&meta),
    );
    test.storage.state.write_unlogged(batch).unwrap();
    let mut log_storage = log.clone();
    log_storage.purge(log_id(6)).await.unwrap();
    let purged = log_storage
        .get_log_state()
        .await
        .unwrap()
        .last_purged_log_id;
    assert_eq!(
        purged,
        Some(log_id(4)),
        "only what the durable checkpoint covers"
    );
    // Once a checkpoint has flushed a record for 6, the purge goes all the way.
    checkpoint(&mut machine).await;
    log_storage.purge(log_id(6)).await.unwrap();
    let purged = log_storage
        .get_log_state()
        .await
        .unwrap()
        .last_purged_log_id;
    assert_eq!(purged, Some(log_id(6)));
}

#[tokio::test]
async fn a_replica_added_back_after_a_drop_purges_nothing_its_state_does_not_cover() {
    // Seen in the moves nemesis: a replica moved away from a node and later back kept the old
    // replica's durable snapshot in memory; the new replica's log purged up to it while its
    // state was empty, and openraft refused to start the group (purged above committed).
    let mut first = setup().await;
    append_and_apply_writes(&first.log, &mut first.machine, first.inode, 3..=4).await;
    checkpoint(&mut first.machine).await;
    let storage = Arc::clone(&first.test.storage);
    assert_eq!(storage.durable_snapshot(CONTAINER), Some(log_id(4)));
    // The replica's Raft parts are gone before its state is dropped, as in `drop_container`.
    drop((first.log, first.machine));
    storage.drop_container_state(CONTAINER).await.unwrap();
    assert_eq!(storage.durable_snapshot(CONTAINER), None);
    let (mut added_back, mut machine) = container(&first.log_store, &storage, true);
    assert_eq!(machine.applied_state().await.unwrap().0, None);
    added_back.purge(log_id(4)).await.unwrap();
    let purged = added_back.get_log_state().await.unwrap().last_purged_log_id;
    assert_eq!(purged, None, "the new replica's state covers nothing yet");
}

/// Appends and applies one write of the whole file per index, in order.
async fn append_and_apply_writes(
    log: &ContainerLog,
    machine: &mut ContainerStateMachine,
    inode: u64,
    indexes: std::ops::RangeInclusive<u64>,
) {
    for index in indexes {
        let entry = write(index, inode, 0, index as u8);
        log.append_now(vec![entry.clone()]).await.unwrap();
        apply_write(machine, entry).await;
    }
}
