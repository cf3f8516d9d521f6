//! `ContainerStateMachine`: openraft's state machine for one container.
//!
//! Owns: applying committed entries (dispatching to the metadata or filesystem state machine),
//! the applied log id and membership, and snapshots.
//!
//! Building a snapshot is a *checkpoint*: the device and RocksDB are flushed, after which the
//! container's state up to the snapshot's log id is durable without its log, and openraft may
//! purge the log. No copy is made.
//!
//! Sending a snapshot to a lagging replica exports the container's *current* state (see
//! `snapshot.rs`) when openraft asks for it: the state is always at least as new as the last
//! checkpoint, and its applied log id becomes the snapshot's id. The one exception is the call
//! openraft makes while starting the group, which only wants the metadata; answering it with the
//! stored checkpoint metadata keeps start-up independent of the data size.
//!
//! The export runs in the background into a spool file: `get_current_snapshot` returns once a
//! consistent view is taken, so this group's applies (which openraft runs on the same worker)
//! are not held up for the length of a copy. openraft's sender then waits on the data's first
//! seek until the export has finished.

use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError, StoredMembership,
};

use crate::command::{Command, CommandResponse};
use crate::error::{NodeError, NodeResult};
use crate::log_storage::WrittenLog;
use crate::records::{encode, ContainerState};
use crate::snapshot::StagedImport;
use crate::snapshot_spool::SpooledSnapshot;
use crate::storage::NodeStorage;
use crate::transaction::Transaction;
use crate::types::{Entry, NodeId, RaftNode, StorageError, TypeConfig, METADATA_CONTAINER_ID};
use crate::{deduplication, filesystem, keys, metadata};

/// Set in a node's environment (any value), every snapshot install on that node fails: a
/// failpoint for tests only (`tests/tests/cluster.rs`, election holds).
pub const SNAPSHOT_INSTALL_FAILPOINT: &str = "BALLAST_FAILPOINT_SNAPSHOT_INSTALL";

/// The import that follows a snapshot being received: the snapshot's receive id and the task
/// staging it.
type ReceivingImport = (u64, tokio::task::JoinHandle<NodeResult<StagedImport>>);

#[derive(Debug, Clone)]
pub struct ContainerStateMachine {
    container_id: u64,
    storage: Arc<NodeStorage>,
    /// Whether openraft's start-up call of `get_current_snapshot` has happened (see the module
    /// doc).
    started: bool,
    /// The import reading behind the snapshot being received, if any. Replacing it abandons the
    /// old one (its snapshot data is dropped too, so its tail fails and its blocks go back).
    receiving: Arc<std::sync::Mutex<Option<ReceivingImport>>>,
    /// The log whose entries this applies: an entry acknowledged to openraft before it was
    /// written is applied only once it is (`log_storage.rs`, "Early acknowledgement"). `None`
    /// for a state machine fed by hand (tests).
    written_log: Option<WrittenLog>,
}

impl ContainerStateMachine {
    pub fn new(container_id: u64, storage: Arc<NodeStorage>) -> Self {
        Self {
            container_id,
            storage,
            started: false,
            receiving: Arc::default(),
            written_log: None,
        }
    }

    /// Applies only entries that `written_log` holds on the device.
    pub fn applying(mut self, written_log: WrittenLog) -> Self {
        self.written_log = Some(written_log);
        self
    }

    fn stored_snapshot_meta(&self) -> NodeResult<Option<SnapshotMeta<NodeId, RaftNode>>> {
        self.storage.state.get::<SnapshotMeta<NodeId, RaftNode>>(
            &keys::container_singleton(keys::TAG_SNAPSHOT, self.container_id),
            "snapshot meta",
        )
    }

    /// Records `meta` as the latest checkpoint after making the state durable.
    async fn checkpoint(
        &self,
        meta_for: impl FnOnce(ContainerState) -> SnapshotMeta<NodeId, RaftNode>,
    ) -> NodeResult<SnapshotMeta<NodeId, RaftNode>> {
        let container_id = self.container_id;
        let meta = self
            .storage
            .checkpoint(|state| {
                let container = filesystem::container_state_from(state, container_id)?;
                let meta = meta_for(container);
                let mut batch = rocksdb::WriteBatch::default();
                batch.put(
                    keys::container_singleton(keys::TAG_SNAPSHOT, container_id),
                    encode(&meta),
                );
                state.write_unlogged(batch)?;
                Ok(meta)
            })
            .await?;
        // Flushed: the log may now be purged up to it (storage rule 6).
        self.storage
            .record_durable_snapshot(container_id, meta.last_log_id);
        Ok(meta)
    }

    fn state(&self) -> NodeResult<ContainerState> {
        filesystem::container_state(&self.storage, self.container_id)
    }

    /// Applies one entry in one transaction. A command's own failure (`NodeError::Fs`) is its
    /// deterministic result, committed with the applied id; any other error (this node's: a
    /// full device, I/O) commits nothing, so the entry is applied again after the restart.
    pub(crate) async fn apply_entry(&self, entry: Entry) -> NodeResult<CommandResponse> {
        let log_id = entry.log_id;
        let mut transaction = Transaction::begin(&self.storage, self.container_id)?;
        // A write whose data the log writer already put in blocks (`detached.rs`).
        transaction.offer_detached(self.storage.detached_blocks(
            self.container_id,
            log_id.index,
            log_id.leader_id.term,
        ));
        let (command, request) = match entry.payload {
            EntryPayload::Blank => (None, None),
            EntryPayload::Membership(membership) => {
                transaction.state.membership = StoredMembership::new(Some(log_id), membership);
                (None, None)
            }
            EntryPayload::Normal(Command::Once { request, command }) => {
                if let Some(response) =
                    deduplication::lookup(&self.storage, self.container_id, &request)?
                {
                    // A repeat of an applied request: answer as the first time, change nothing.
                    transaction.commit_failure(Some(log_id)).await?;
                    return Ok(response);
                }
                (Some(*command), Some(request))
            }
            EntryPayload::Normal(command) => (Some(command), None),
        };
        let outcome = match command {
            None => Ok(CommandResponse::Done),
            Some(command) => self.dispatch(&mut transaction, command).await,
        };
        // The command's own result, success or deterministic failure; a node failure ends here.
        let result = match outcome {
            Ok(response) => Ok(response),
            Err(NodeError::Fs(error)) => Err(error),
            Err(node_failure) => {
                transaction.abandon();
                return Err(node_failure);
            }
        };
        let response = match &result {
            Ok(response) => response.clone(),
            Err(error) => CommandResponse::Failed(error.clone()),
        };
        let stored = match &request {
            Some(request) => {
                deduplication::rows(&self.storage, self.container_id, request, &response)?
            }
            None => Vec::new(),
        };
        match result {
            Ok(_) => {
                for (key, value) in stored {
                    match value {
                        Some(value) => transaction.batch().put(key, value),
                        None => transaction.batch().delete(key),
                    }
                }
                transaction.commit(Some(log_id)).await?;
            }
            Err(_) => {
                transaction
                    .commit_failure_with(Some(log_id), stored)
                    .await?;
            }
        }
        Ok(response)
    }

    async fn dispatch(
        &self,
        transaction: &mut Transaction<'_>,
        command: Command,
    ) -> NodeResult<CommandResponse> {
        match command {
            Command::Metadata(command) if self.container_id == METADATA_CONTAINER_ID => {
                metadata::apply(transaction, command)
            }
            Command::Filesystem(command) if self.container_id != METADATA_CONTAINER_ID => {
                filesystem::apply(transaction, command).await
            }
            Command::Once { .. } => Err(NodeError::InvalidState(
                "a request id inside a request id".into(),
            )),
            other => Err(NodeError::InvalidState(format!(
                "command {other:?} does not belong in container {}",
                self.container_id
            ))),
        }
    }
}

impl RaftStateMachine<TypeConfig> for ContainerStateMachine {
    type SnapshotBuilder = ContainerStateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<crate::types::LogId>,
            StoredMembership<NodeId, RaftNode>,
        ),
        StorageError,
    > {
        let state = self
            .state()
            .map_err(|error| StorageError::from(StorageIOError::read_state_machine(&error)))?;
        Ok((state.last_applied, state.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let started = std::time::Instant::now();
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let (Some(written_log), Some(last)) = (&self.written_log, entries.last()) {
            let index = last.log_id.index;
            written_log
                .wait_until_written(index)
                .await
                .map_err(|error| {
                    tracing::error!(container = self.container_id, index, %error, "apply refused");
                    StorageError::from(StorageIOError::write_logs(&std::io::Error::other(error)))
                })?;
        }
        let waited = started.elapsed();
        let mut responses = Vec::new();
        let mut first_index = None;
        for entry in entries {
            let log_id = entry.log_id;
            first_index.get_or_insert(log_id.index);
            let response = self.apply_entry(entry).await.map_err(|error| {
                tracing::error!(container = self.container_id, %log_id, %error, "apply failed");
                StorageError::from(StorageIOError::apply(log_id, &error))
            })?;
            responses.push(response);
        }
        tracing::debug!(
            target: "ballast::timing",
            container = self.container_id,
            entry_count = responses.len(),
            first_index,
            written_wait_us = waited.as_micros() as u64,
            apply_us = started.elapsed().as_micros() as u64,
            "entries applied"
        );
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SpooledSnapshot>, StorageError> {
        let write_error =
            |error: NodeError| StorageError::from(StorageIOError::write_snapshot(None, &error));
        let file = self
            .storage
            .spool
            .create_file("receive")
            .map_err(write_error)?;
        // The import reads behind the transfer: blocks reach the device while later chunks are
        // still on the way, and only the final batch waits for `install_snapshot`.
        let (snapshot, tail) = SpooledSnapshot::receiving(file).map_err(write_error)?;
        let receive_id = snapshot
            .receive_id()
            .expect("a receiving snapshot has an id");
        let task = tokio::spawn(crate::snapshot::stage_import(
            Arc::clone(&self.storage),
            self.container_id,
            tail,
        ));
        *self.receiving.lock().expect("receiving import lock") = Some((receive_id, task));
        Ok(Box::new(snapshot))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RaftNode>,
        snapshot: Box<SpooledSnapshot>,
    ) -> Result<(), StorageError> {
        let container_id = self.container_id;
        let snapshot_error = |error: NodeError| {
            tracing::error!(container = container_id, snapshot = %meta.snapshot_id, %error, "snapshot refused");
            StorageError::from(StorageIOError::write_snapshot(
                Some(meta.signature()),
                &error,
            ))
        };
        let started = std::time::Instant::now();
        let finish_state = |mut state: ContainerState| {
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state
        };
        let receiving = self.receiving.lock().expect("receiving import lock").take();
        // Failpoint for the end-to-end test of election holds: a replica that can never
        // install a snapshot (as on a full device), whose Raft core therefore stops again and
        // again. Read per install (rare), so a test sets it on one node's process only.
        if std::env::var_os(SNAPSHOT_INSTALL_FAILPOINT).is_some() {
            drop(receiving);
            return Err(snapshot_error(NodeError::InvalidState(format!(
                "snapshot install refused by the failpoint {SNAPSHOT_INSTALL_FAILPOINT}"
            ))));
        }
        let summary = match (snapshot.receive_id(), receiving) {
            (Some(receive_id), Some((task_receive_id, task))) if receive_id == task_receive_id => {
                snapshot.finish_receiving().await.map_err(snapshot_error)?;
                let staged = task
                    .await
                    .map_err(|error| {
                        snapshot_error(NodeError::InvalidState(format!(
                            "snapshot import task: {error}"
                        )))
                    })?
                    .map_err(snapshot_error)?;
                staged.commit(finish_state).await.map_err(snapshot_error)?
            }
            _ => {
                // Not followed by an import (none started, or another snapshot's): read it whole.
                let file = snapshot
                    .into_file()
                    .await
                    .map_err(snapshot_error)?
                    .ok_or_else(|| {
                        snapshot_error(NodeError::InvalidState(
                            "a snapshot to install holds no data".into(),
                        ))
                    })?;
                crate::snapshot::import(&self.storage, container_id, file, finish_state)
                    .await
                    .map_err(snapshot_error)?
            }
        };
        let installed = meta.clone();
        self.checkpoint(|_| installed)
            .await
            .map_err(snapshot_error)?;
        tracing::info!(container = container_id, snapshot = %meta.snapshot_id,
            size_bytes = summary.size_bytes, row_count = summary.row_count,
            block_count = summary.block_count, elapsed_ms = started.elapsed().as_millis() as u64,
            "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let read_error =
            |error: NodeError| StorageError::from(StorageIOError::read_snapshot(None, &error));
        if !self.started {
            self.started = true;
            let meta = self.stored_snapshot_meta().map_err(read_error)?;
            return Ok(meta.map(|meta| Snapshot {
                meta,
                snapshot: Box::new(SpooledSnapshot::empty()),
            }));
        }
        let (state, data) = crate::snapshot::start_export(&self.storage, self.container_id)
            .await
            .map_err(read_error)?;
        let Some(last_log_id) = state.last_applied else {
            return Ok(None);
        };
        let meta = SnapshotMeta {
            last_log_id: Some(last_log_id),
            last_membership: state.membership,
            snapshot_id: format!(
                "{}-{}-{}-export",
                self.container_id, last_log_id.leader_id.term, last_log_id.index
            ),
        };
        tracing::info!(container = self.container_id, snapshot = %meta.snapshot_id,
            "exporting a snapshot for a lagging replica");
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(data),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ContainerStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let container_id = self.container_id;
        let meta = self
            .checkpoint(|container| {
                let snapshot_id = match container.last_applied {
                    Some(log_id) => {
                        format!("{container_id}-{}-{}", log_id.leader_id.term, log_id.index)
                    }
                    None => format!("{container_id}-empty"),
                };
                SnapshotMeta {
                    last_log_id: container.last_applied,
                    last_membership: container.membership,
                    snapshot_id,
                }
            })
            .await
            .map_err(|error| StorageError::from(StorageIOError::write_snapshot(None, &error)))?;
        tracing::debug!(container = container_id, snapshot = %meta.snapshot_id, "checkpoint taken");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SpooledSnapshot::empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::*;
    use crate::command::FilesystemCommand;
    use crate::deduplication::RequestId;
    use crate::records::{EntryKind, ROOT_INODE};
    use crate::test_support::TestStorage;

    const CONTAINER: u64 = 3;

    fn entry(index: u64, command: Command) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    fn create(name: &str, session: u64, sequence: u64) -> Command {
        Command::Once {
            request: RequestId {
                session,
                sequence,
                floor: sequence,
            },
            command: Box::new(Command::Filesystem(FilesystemCommand::Create {
                parent: ROOT_INODE,
                name: name.to_owned(),
                kind: EntryKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                symlink_target: None,
                exclusive: true,
                now_ns: 1,
            })),
        }
    }

    #[tokio::test]
    async fn a_repeated_request_is_applied_once_and_answered_the_same() {
        let test = TestStorage::new(64 << 20);
        let mut machine = ContainerStateMachine::new(CONTAINER, Arc::clone(&test.storage));
        let initialize = Command::Filesystem(FilesystemCommand::Initialize {
            volume_id: 1,
            quota_bytes: 0,
            now_ns: 1,
        });
        let responses = machine
            .apply(vec![
                entry(1, initialize),
                entry(2, create("a", 7, 1)),
                // The same request again (a resend after a lost answer): the same answer.
                entry(3, create("a", 7, 1)),
                // A new request for the same exclusive name fails as it should.
                entry(4, create("a", 7, 2)),
                // Another session's request is independent.
                entry(5, create("b", 8, 1)),
            ])
            .await
            .unwrap();
        assert!(matches!(responses[1], CommandResponse::Attributes { .. }));
        assert_eq!(
            responses[2], responses[1],
            "a repeat returns the first response"
        );
        assert!(
            matches!(&responses[3], CommandResponse::Failed(error) if error.errno == ballast_common::Errno::EEXIST),
            "{:?}",
            responses[3]
        );
        assert!(matches!(responses[4], CommandResponse::Attributes { .. }));
        let state = filesystem::container_state(&test.storage, CONTAINER).unwrap();
        assert_eq!(state.inode_count, 3, "root, a and b: nothing created twice");
        // A request below the floor of a later one was forgotten; the failure is remembered.
        let responses = machine
            .apply(vec![entry(6, create("a", 7, 2))])
            .await
            .unwrap();
        assert!(matches!(&responses[0], CommandResponse::Failed(_)));
        assert!(deduplication::lookup(
            &test.storage,
            CONTAINER,
            &RequestId {
                session: 7,
                sequence: 1,
                floor: 1
            }
        )
        .unwrap()
        .is_none());
    }
}
