//! `ContainerStateMachine`: openraft's state machine for one container.
//!
//! Owns: applying committed entries (dispatching to the metadata or filesystem state machine),
//! the applied log id and membership, and snapshots.
//!
//! A snapshot is a *checkpoint*: the device and RocksDB are flushed, after which the container's
//! state up to the snapshot's log id is durable without its log, and openraft may purge the log.
//! Snapshot *transfer* to another node is not implemented yet (single-member groups never need
//! it); `install_snapshot` refuses clearly. That is the clustering issue's job.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError, StoredMembership,
};

use crate::command::{Command, CommandResponse};
use crate::error::{NodeError, NodeResult};
use crate::records::{encode, ContainerState};
use crate::storage::NodeStorage;
use crate::transaction::Transaction;
use crate::types::{Entry, NodeId, RaftNode, StorageError, TypeConfig, METADATA_CONTAINER_ID};
use crate::{filesystem, keys, metadata};

#[derive(Debug, Clone)]
pub struct ContainerStateMachine {
    container_id: u64,
    storage: Arc<NodeStorage>,
}

impl ContainerStateMachine {
    pub fn new(container_id: u64, storage: Arc<NodeStorage>) -> Self {
        Self {
            container_id,
            storage,
        }
    }

    fn state(&self) -> NodeResult<ContainerState> {
        filesystem::container_state(&self.storage, self.container_id)
    }

    async fn apply_entry(&self, entry: Entry) -> NodeResult<CommandResponse> {
        let log_id = entry.log_id;
        let mut transaction = Transaction::begin(&self.storage, self.container_id)?;
        let outcome = match entry.payload {
            EntryPayload::Blank => Ok(CommandResponse::Done),
            EntryPayload::Membership(membership) => {
                transaction.state.membership = StoredMembership::new(Some(log_id), membership);
                Ok(CommandResponse::Done)
            }
            EntryPayload::Normal(Command::Metadata(command)) => {
                if self.container_id == METADATA_CONTAINER_ID {
                    metadata::apply(&mut transaction, command)
                } else {
                    Err(NodeError::InvalidState(format!(
                        "metadata command in filesystem container {}",
                        self.container_id
                    )))
                }
            }
            EntryPayload::Normal(Command::Filesystem(command)) => {
                if self.container_id != METADATA_CONTAINER_ID {
                    filesystem::apply(&mut transaction, command).await
                } else {
                    Err(NodeError::InvalidState(
                        "filesystem command in the metadata container".into(),
                    ))
                }
            }
        };
        match outcome {
            Ok(response) => {
                transaction.commit(Some(log_id)).await?;
                Ok(response)
            }
            Err(NodeError::Fs(error)) => {
                transaction.commit_failure(Some(log_id)).await?;
                Ok(CommandResponse::Failed(error))
            }
            Err(other) => Err(other),
        }
    }
}

fn storage_error(error: NodeError) -> StorageError {
    StorageIOError::write_state_machine(&error).into()
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
        let mut responses = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let response = self.apply_entry(entry).await.map_err(|error| {
                tracing::error!(container = self.container_id, %log_id, %error, "apply failed");
                StorageError::from(StorageIOError::apply(log_id, &error))
            })?;
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Err(storage_error(NodeError::InvalidState(
            "receiving snapshots from other nodes is not implemented yet (single-member containers)".into(),
        )))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeId, RaftNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        Err(storage_error(NodeError::InvalidState(
            "installing snapshots from other nodes is not implemented yet (single-member containers)".into(),
        )))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta = self
            .storage
            .state
            .get::<SnapshotMeta<NodeId, RaftNode>>(
                &keys::container_singleton(keys::TAG_SNAPSHOT, self.container_id),
                "snapshot meta",
            )
            .map_err(|error| StorageError::from(StorageIOError::read_snapshot(None, &error)))?;
        Ok(meta.map(|meta| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ContainerStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let container_id = self.container_id;
        let meta = self
            .storage
            .checkpoint(|state| {
                let container = filesystem::container_state_from(state, container_id)?;
                let snapshot_id = match container.last_applied {
                    Some(log_id) => {
                        format!("{container_id}-{}-{}", log_id.leader_id.term, log_id.index)
                    }
                    None => format!("{container_id}-empty"),
                };
                let meta = SnapshotMeta {
                    last_log_id: container.last_applied,
                    last_membership: container.membership,
                    snapshot_id,
                };
                let mut batch = rocksdb::WriteBatch::default();
                batch.put(
                    keys::container_singleton(keys::TAG_SNAPSHOT, container_id),
                    encode(&meta),
                );
                state.write_unlogged(batch)?;
                Ok(meta)
            })
            .await
            .map_err(|error| StorageError::from(StorageIOError::write_snapshot(None, &error)))?;
        tracing::debug!(container = container_id, snapshot = %meta.snapshot_id, "checkpoint taken");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}
