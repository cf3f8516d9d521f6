//! The openraft type configuration shared by every container group on a node.
//!
//! One type config for all container kinds: the payload is [`Command`], whose variant says which
//! state machine applies it. Keeping a single config means one log store, one network and one
//! set of metrics code for metadata, file, and later stream and table containers.

use crate::command::{Command, CommandResponse};
use crate::snapshot_spool::SpooledSnapshot;

pub type NodeId = u64;
pub type RaftNode = openraft::BasicNode;

openraft::declare_raft_types!(
    /// Raft types of a Ballast container.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SpooledSnapshot,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// The metadata container: cluster map, volumes.
pub const METADATA_CONTAINER_ID: u64 = 0;
/// The first container id handed to a volume.
pub const FIRST_VOLUME_CONTAINER_ID: u64 = 1;
