//! Early acknowledgement of buffered appends (`log_storage.rs`, "Early acknowledgement"),
//! through the real parts: the container's log writer, the device log store, the state machine
//! and RocksDB, on a device file.
//!
//! What these tests pin down: a buffered append is acknowledged before it is written, but its
//! entry is applied (and answered) only once it is; the stored commit point never passes what
//! is written; an append that fails after its early acknowledgement fails the apply that waits
//! for it, and nothing is acknowledged early after that; and at most
//! `EARLY_ACKNOWLEDGED_BYTES_MAX` bytes are acknowledged before they are written.

use std::sync::Arc;
use std::time::Duration;

use ballast_device::{LogStore, BLOCK_SIZE_BYTES};
use bytes::Bytes;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use tokio::sync::{oneshot, Notify, Semaphore};

use crate::command::{Command, CommandResponse, FilesystemCommand};
use crate::detached::DETACHED_WRITE_BYTES_MIN_DEFAULT;
use crate::log_storage::ContainerLog;
use crate::state_machine::ContainerStateMachine;
use crate::test_support::TestStorage;
use crate::types::Entry;

const CONTAINER: u64 = 6;
/// How long a step that must not finish is given to finish anyway: long enough for a writer
/// and an apply that are not held to run many times over (they take microseconds here).
const HELD_MS: u64 = 200;

/// A single-voter container with one empty file (indexes 1 and 2 applied), whose log writer
/// waits for a permit of the returned gate before each batch it writes.
struct Setup {
    test: TestStorage,
    log_store: LogStore,
    log: ContainerLog,
    machine: ContainerStateMachine,
    gate: Arc<Semaphore>,
    inode: u64,
}

async fn setup() -> Setup {
    let mut test = TestStorage::initialized(CONTAINER, 0).await;
    let inode = test.create_file(CONTAINER, "file").await;
    let log_store = LogStore::open(test.device.engine(), test.device.superblock()).unwrap();
    let log = ContainerLog::new(
        CONTAINER,
        log_store.clone(),
        Arc::clone(&test.storage),
        Arc::new(Notify::new()),
        false,
        DETACHED_WRITE_BYTES_MIN_DEFAULT,
    );
    let gate = log.hold_appends();
    let machine = ContainerStateMachine::new(CONTAINER, Arc::clone(&test.storage))
        .applying(log.written_log());
    Setup {
        test,
        log_store,
        log,
        machine,
        gate,
        inode,
    }
}

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// A write of `length_bytes` of `fill` at `offset_bytes` (detachable when both are whole
/// blocks).
fn write(index: u64, inode: u64, offset_bytes: u64, length_bytes: usize, fill: u8) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Filesystem(FilesystemCommand::Write {
            inode,
            offset_bytes,
            data: Bytes::from(vec![fill; length_bytes]),
            now_ns: 10 + index as i64,
            prewritten: Default::default(),
        })),
    }
}

/// Queues the append of `entry`; the receiver gets the acknowledgement.
async fn append(log: &ContainerLog, entry: Entry) -> oneshot::Receiver<std::io::Result<()>> {
    let (acknowledged, acknowledgement) = oneshot::channel();
    log.append_acknowledged(vec![entry], move |result| {
        let _ = acknowledged.send(result);
    })
    .await
    .unwrap();
    acknowledgement
}

/// Whether `future` finishes within [`HELD_MS`].
async fn finishes<F: std::future::Future>(future: F) -> Option<F::Output> {
    tokio::time::timeout(Duration::from_millis(HELD_MS), future)
        .await
        .ok()
}

#[tokio::test]
async fn a_buffered_append_is_acknowledged_before_it_is_written_and_applied_only_once_written() {
    let mut setup = setup().await;
    let entry = write(3, setup.inode, 0, 16 * BLOCK_SIZE_BYTES, 0x5a);
    let mut acknowledgement = append(&setup.log, entry.clone()).await;
    // Acknowledged while the writer is held: openraft may go on to the next client write.
    assert!(
        matches!(acknowledgement.try_recv(), Ok(Ok(()))),
        "a buffered append is acknowledged when it is queued"
    );
    assert!(setup.log_store.retained_entries(CONTAINER).is_empty());
    // The apply waits for the entry to be written.
    let machine = &mut setup.machine;
    let mut apply = Box::pin(machine.apply(vec![entry.clone()]));
    assert!(
        finishes(apply.as_mut()).await.is_none(),
        "an entry acknowledged early was applied before it was written"
    );
    setup.gate.add_permits(1);
    let responses = apply.await.unwrap();
    assert!(
        matches!(responses[0], CommandResponse::Written { .. }),
        "{responses:?}"
    );
    assert_eq!(setup.log_store.retained_entries(CONTAINER).len(), 1);
    let data = crate::filesystem::read(
        &setup.test.storage,
        CONTAINER,
        setup.inode,
        0,
        16 * BLOCK_SIZE_BYTES as u32,
    )
    .await
    .unwrap();
    assert!(data.iter().all(|&byte| byte == 0x5a));
}

#[tokio::test]
async fn the_stored_commit_point_never_passes_what_is_written() {
    let mut setup = setup().await;
    setup.gate.add_permits(1);
    let first = write(3, setup.inode, 0, 16 * BLOCK_SIZE_BYTES, 1);
    let _acknowledged = append(&setup.log, first).await;
    let written_log = setup.log.written_log();
    written_log.wait_until_written(3).await.unwrap();
    setup.log.save_committed(Some(log_id(3))).await.unwrap();
    assert_eq!(setup.log.read_committed().await.unwrap(), Some(log_id(3)));
    let second = write(4, setup.inode, 0, 16 * BLOCK_SIZE_BYTES, 2);
    let _acknowledged = append(&setup.log, second).await;
    // Committed (a single voter's own acknowledgement is a quorum), not written.
    setup.log.save_committed(Some(log_id(4))).await.unwrap();
    assert_eq!(
        setup.log.read_committed().await.unwrap(),
        Some(log_id(3)),
        "a commit point past the written log was stored: a restart would re-apply an entry \
         that may not be in the log"
    );
    setup.gate.add_permits(1);
    written_log.wait_until_written(4).await.unwrap();
    setup.log.save_committed(Some(log_id(4))).await.unwrap();
    assert_eq!(setup.log.read_committed().await.unwrap(), Some(log_id(4)));
}

#[tokio::test]
async fn an_append_that_fails_after_its_early_acknowledgement_fails_its_apply() {
    let mut setup = setup().await;
    // Not detachable (not at a block boundary), so logged inline, and larger than one device
    // log request: the log store refuses it. Small enough to be acknowledged early.
    let too_large = setup.log_store.request_length_bytes_max() as usize + 1;
    assert!(
        too_large < 32 << 20,
        "the test device's log requests are small"
    );
    let entry = write(3, setup.inode, 1, too_large, 2);
    let mut acknowledgement = append(&setup.log, entry.clone()).await;
    assert!(matches!(acknowledgement.try_recv(), Ok(Ok(()))));
    setup.gate.close();
    let applied = setup.machine.apply(vec![entry]).await;
    assert!(
        applied.is_err(),
        "an entry whose append failed was applied: {applied:?}"
    );
    // After a failure nothing is acknowledged early: the next append is answered with its
    // own outcome once written.
    let next = write(4, setup.inode, 0, 16 * BLOCK_SIZE_BYTES, 3);
    let acknowledgement = append(&setup.log, next).await;
    assert!(matches!(acknowledgement.await, Ok(Ok(()))));
}

#[tokio::test]
async fn no_more_than_the_bound_is_acknowledged_before_it_is_written() {
    let setup = setup().await;
    // Two 16 MiB writes fill the 32 MiB bound; the third is acknowledged once written.
    let length_bytes = 16 << 20;
    let mut acknowledgements = Vec::new();
    for index in 3..=5 {
        let offset_bytes = (index - 3) * length_bytes as u64;
        let entry = write(index, setup.inode, offset_bytes, length_bytes, index as u8);
        acknowledgements.push(append(&setup.log, entry).await);
    }
    let mut third = acknowledgements.pop().unwrap();
    for mut acknowledgement in acknowledgements {
        assert!(matches!(acknowledgement.try_recv(), Ok(Ok(()))));
    }
    assert!(
        finishes(&mut third).await.is_none(),
        "more than the bound was acknowledged before it was written"
    );
    // The first batch (the two acknowledged appends, or only the first) and then the rest.
    setup.gate.add_permits(2);
    assert!(matches!(third.await, Ok(Ok(()))));
    assert_eq!(setup.log_store.retained_entries(CONTAINER).len(), 3);
}

#[tokio::test]
async fn a_durable_append_queued_behind_buffered_ones_is_written_as_if_alone() {
    // Found with sysbench (0.52x of the local datadir instead of 0.57x): when the writer wrote a
    // durable redo-log append in one device append with the buffered page writes queued before
    // it, the whole batch was durable, and a durable batch holding detached writes is written
    // and then flushed in series, where a durable inline record alone is one synchronous write.
    let setup = setup().await;
    let engine = setup.test.device.engine();
    // Warm: the first batch of a segment flushes its predecessors.
    setup.gate.add_permits(1);
    let warm = write(3, setup.inode, 0, 16 * BLOCK_SIZE_BYTES, 1);
    let _warm_acknowledgement = append(&setup.log, warm).await;
    setup.log.written_log().wait_until_written(3).await.unwrap();
    let before = engine.statistics();
    // Held: a buffered detached write, then a durable inline one (4 KiB: under the detached
    // minimum), both queued before the writer takes either.
    let buffered = write(4, setup.inode, 0, 16 * BLOCK_SIZE_BYTES, 2);
    let mut buffered_acknowledgement = append(&setup.log, buffered).await;
    assert!(matches!(buffered_acknowledgement.try_recv(), Ok(Ok(()))));
    let guard = setup.log.request_durable_appends();
    let durable = write(5, setup.inode, 1 << 20, BLOCK_SIZE_BYTES, 3);
    let durable_acknowledgement = append(&setup.log, durable).await;
    setup.gate.add_permits(1);
    assert!(matches!(durable_acknowledgement.await, Ok(Ok(()))));
    drop(guard);
    let after = engine.statistics();
    assert!(
        after.durable_writes > before.durable_writes,
        "the durable append was not written synchronously: flushes {} -> {}, durable writes \
         {} -> {}",
        before.flushes,
        after.flushes,
        before.durable_writes,
        after.durable_writes
    );
    assert_eq!(setup.log_store.retained_entries(CONTAINER).len(), 2);
}
