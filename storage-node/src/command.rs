//! Commands replicated through a container's Raft log, and their responses.
//!
//! Owns: the log payload format of every container kind.
//! Invariant: applying a command is a pure function of (state, command). Anything
//! non-deterministic — the current time, a new inode's owner — is decided by the proposer and
//! carried in the command, so every replica and every replay reaches the same state.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::FsError;
use crate::records::{EntryKind, Inode, NodeRecord, VolumeRecord};

/// A command for the metadata container (container 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    CreateVolume {
        name: String,
        quota_bytes: u64,
        replication_factor: u32,
        replication_minimum: u32,
        now_ns: i64,
        /// Placement decided by the proposer (the metadata leader), so every replica applies
        /// the same decision.
        replicas: Vec<u64>,
        bootstrap_node_id: u64,
        node_selector: std::collections::BTreeMap<String, String>,
        labels: std::collections::BTreeMap<String, String>,
    },
    DeleteVolume {
        name: String,
    },
    /// Adds or updates a node of the cluster map.
    RegisterNode(NodeRecord),
    /// Records a new quota; the volume's container enforces it after its own `SetQuota`.
    ResizeVolume {
        name: String,
        quota_bytes: u64,
    },
    /// Marks a node draining (or active again).
    SetNodeDraining {
        node_id: u64,
        draining: bool,
    },
    /// Starts moving a container's replica from one node to another: `to` joins `replicas` and
    /// `from` becomes retiring. Refused unless the record still has `from` and not `to`.
    MoveReplica {
        container_id: u64,
        from_node_id: u64,
        to_node_id: u64,
    },
    /// Ends a move once the group's membership no longer has the node: it stops retiring, and
    /// its copy may be dropped.
    FinishMove {
        container_id: u64,
        node_id: u64,
    },
    /// Records a node's free data blocks, as the node reported them (placement reads them:
    /// `space::short_of_space`). Appended last: the log format keeps older variants' tags.
    SetNodeFreeBlocks {
        node_id: u64,
        data_block_free_count: u64,
    },
}

/// Attribute changes of a SetAttr command; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributeChanges {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size_bytes: Option<u64>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
}

/// A command for a filesystem container (one volume's namespace and file data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilesystemCommand {
    /// Creates the root directory if absent; idempotent.
    Initialize {
        volume_id: u64,
        quota_bytes: u64,
        now_ns: i64,
    },
    Create {
        parent: u64,
        name: String,
        kind: EntryKind,
        mode: u32,
        uid: u32,
        gid: u32,
        symlink_target: Option<String>,
        exclusive: bool,
        now_ns: i64,
    },
    Link {
        inode: u64,
        new_parent: u64,
        new_name: String,
        now_ns: i64,
    },
    Unlink {
        parent: u64,
        name: String,
        directory: bool,
        now_ns: i64,
    },
    Rename {
        parent: u64,
        name: String,
        new_parent: u64,
        new_name: String,
        flags: u32,
        now_ns: i64,
    },
    SetAttributes {
        inode: u64,
        changes: AttributeChanges,
        now_ns: i64,
    },
    Write {
        inode: u64,
        offset_bytes: u64,
        data: Bytes,
        now_ns: i64,
        /// Node-local: blocks the proposer already wrote `data` to (`prewritten.rs`). Never
        /// serialized, so the log, replication and snapshots never see it.
        #[serde(skip)]
        prewritten: crate::prewritten::Prewritten,
    },
    Fallocate {
        inode: u64,
        offset_bytes: u64,
        length_bytes: u64,
        mode: u32,
        now_ns: i64,
    },
    /// Frees orphan inodes (nlink 0): one, or all when `inode` is 0.
    PurgeOrphans { inode: u64 },
    /// Sets the quota; refused below the bytes in use (0 means unlimited).
    SetQuota { quota_bytes: u64 },
}

/// Anything a container log may carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Metadata(MetadataCommand),
    Filesystem(FilesystemCommand),
    /// A command applied at most once per request id (see `deduplication`); a repeat gets the
    /// first response back.
    Once {
        request: crate::deduplication::RequestId,
        command: Box<Command>,
    },
}

impl Command {
    /// The most new device blocks applying this command may allocate on a replica: what a
    /// leader admits it by (`space.rs`). Copy-on-write makes every written block new; a zeroed
    /// partial edge (truncate, punched hole) is one new block each; a write whose data the
    /// proposer already put in blocks (`prewritten.rs`) needs none more.
    pub fn device_blocks_needed_max(&self) -> u64 {
        const BLOCK_SIZE_BYTES: u64 = ballast_device::BLOCK_SIZE_BYTES as u64;
        match self {
            Command::Once { command, .. } => command.device_blocks_needed_max(),
            Command::Metadata(_) => 0,
            Command::Filesystem(command) => match command {
                FilesystemCommand::Write {
                    offset_bytes,
                    data,
                    prewritten,
                    ..
                } => {
                    if data.is_empty() || prewritten.is_present() {
                        return 0;
                    }
                    let end_bytes = offset_bytes.saturating_add(data.len() as u64);
                    end_bytes.div_ceil(BLOCK_SIZE_BYTES) - offset_bytes / BLOCK_SIZE_BYTES
                }
                FilesystemCommand::SetAttributes { changes, .. } => {
                    u64::from(changes.size_bytes.is_some())
                }
                FilesystemCommand::Fallocate { .. } => 2,
                FilesystemCommand::Initialize { .. }
                | FilesystemCommand::Create { .. }
                | FilesystemCommand::Link { .. }
                | FilesystemCommand::Unlink { .. }
                | FilesystemCommand::Rename { .. }
                | FilesystemCommand::PurgeOrphans { .. }
                | FilesystemCommand::SetQuota { .. } => 0,
            },
        }
    }
}

impl Command {
    /// True for commands that add state rows (data, entries, allocations): the ones refused
    /// while the state filesystem is full (`state_space.rs`). Removals and attribute changes
    /// pass, so space can be freed.
    pub fn adds_state(&self) -> bool {
        match self {
            Command::Once { command, .. } => command.adds_state(),
            Command::Metadata(_) => false,
            Command::Filesystem(command) => matches!(
                command,
                FilesystemCommand::Write { .. }
                    | FilesystemCommand::Create { .. }
                    | FilesystemCommand::Link { .. }
                    | FilesystemCommand::Fallocate { .. }
            ),
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResponse {
    /// Blank and membership entries, and commands with nothing to return.
    #[default]
    Done,
    Volume(VolumeRecord),
    Attributes {
        inode: u64,
        attributes: Inode,
    },
    Unlinked {
        inode: u64,
        orphaned: bool,
    },
    Renamed {
        replaced_inode: u64,
        replaced_orphaned: bool,
    },
    Written {
        written_bytes: u32,
        inode: u64,
        attributes: Inode,
    },
    Purged {
        purged_count: u64,
    },
    Failed(FsError),
}

/// Linux rename(2) flags.
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
/// Linux fallocate(2) mode bits.
pub const FALLOCATE_KEEP_SIZE: u32 = 1;
pub const FALLOCATE_PUNCH_HOLE: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn write(offset_bytes: u64, length_bytes: usize) -> Command {
        Command::Filesystem(FilesystemCommand::Write {
            inode: 2,
            offset_bytes,
            data: Bytes::from(vec![0u8; length_bytes]),
            now_ns: 1,
            prewritten: crate::prewritten::Prewritten::none(),
        })
    }

    #[test]
    fn device_blocks_needed_cover_every_block_a_write_touches() {
        assert_eq!(write(0, 0).device_blocks_needed_max(), 0);
        assert_eq!(write(0, 1).device_blocks_needed_max(), 1);
        assert_eq!(write(0, 4096).device_blocks_needed_max(), 1);
        assert_eq!(write(4095, 2).device_blocks_needed_max(), 2);
        assert_eq!(write(100, 8192).device_blocks_needed_max(), 3);
        assert_eq!(write(u64::MAX - 1, 4096).device_blocks_needed_max(), 1);
        let once = Command::Once {
            request: crate::deduplication::RequestId {
                session: 1,
                sequence: 1,
                floor: 0,
            },
            command: Box::new(write(0, 3 * 4096)),
        };
        assert_eq!(once.device_blocks_needed_max(), 3);
        let truncate = Command::Filesystem(FilesystemCommand::SetAttributes {
            inode: 2,
            changes: AttributeChanges {
                size_bytes: Some(10),
                ..Default::default()
            },
            now_ns: 1,
        });
        assert_eq!(truncate.device_blocks_needed_max(), 1);
        let chmod = Command::Filesystem(FilesystemCommand::SetAttributes {
            inode: 2,
            changes: AttributeChanges {
                mode: Some(0o600),
                ..Default::default()
            },
            now_ns: 1,
        });
        assert_eq!(chmod.device_blocks_needed_max(), 0);
    }
}
