//! Errors of the storage node.
//!
//! Two kinds, kept apart on purpose:
//! - [`FsError`] is a *result* of a command: deterministic, computed by the state machine from
//!   the replicated state (ENOENT, EEXIST, ENOSPC, ...). It travels inside the Raft response and
//!   reaches the client as a POSIX errno.
//! - [`NodeError`] is a *failure* of this node: device I/O, RocksDB, Raft. It never enters the
//!   replicated state.

use ballast_common::Errno;

/// A filesystem-level error with the errno the client must see.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("{}: {message}", errno.name())]
pub struct FsError {
    pub errno: Errno,
    pub message: String,
}

impl FsError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

/// Shorthand constructors, named after the errno they carry.
macro_rules! fs_error_constructors {
    ($($function:ident => $errno:ident),* $(,)?) => {
        impl FsError {
            $(
                pub fn $function(message: impl Into<String>) -> Self {
                    Self::new(Errno::$errno, message)
                }
            )*
        }
    };
}

fs_error_constructors!(
    not_found => ENOENT,
    exists => EEXIST,
    not_directory => ENOTDIR,
    is_directory => EISDIR,
    not_empty => ENOTEMPTY,
    invalid => EINVAL,
    no_space => ENOSPC,
    io => EIO,
    not_permitted => EPERM,
    not_supported => EOPNOTSUPP,
    file_too_big => EFBIG,
    name_too_long => ENAMETOOLONG,
);

/// A failure of this node (not of the request).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("device: {context}: {source}")]
    Device {
        context: String,
        #[source]
        source: ballast_device::DeviceError,
    },
    #[error("rocksdb: {context}: {source}")]
    Rocksdb {
        context: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("codec: {context}: {source}")]
    Codec {
        context: String,
        #[source]
        source: postcard::Error,
    },
    #[error("checksum mismatch: {0}")]
    ChecksumMismatch(String),
    /// This node's device has no free block for an apply. A failure of the node, not a result
    /// of the command: other replicas may have room (`space.rs`).
    #[error("device full: {requested_blocks} blocks requested, {free_blocks} free")]
    DeviceFull {
        requested_blocks: u64,
        free_blocks: u64,
    },
    /// This node was asked to lead a group and cannot (`handover.rs`); nothing changed.
    #[error("container {container_id}: this node cannot take over its leadership: {reason}")]
    HandoverRefused { container_id: u64, reason: String },
    #[error("container {container_id} is not served by this node")]
    UnknownContainer { container_id: u64 },
    /// This node does not lead the container; nothing was applied. `leader_address` is where to
    /// go instead, when known.
    #[error("container {container_id} is led by {}", leader_address.as_deref().unwrap_or("an unknown node (election in progress)"))]
    NotLeader {
        container_id: u64,
        leader_address: Option<String>,
    },
    /// A write to a container with fewer replicas in contact than its volume's minimum was
    /// refused; nothing was applied.
    #[error("volume {volume:?} has {in_sync} of the {minimum} replicas it requires in contact; write refused")]
    BelowMinimumReplication {
        volume: String,
        in_sync: usize,
        minimum: u32,
    },
    /// A shared-memory request reached the point of no return after the deadline its driver
    /// named (`ballast_common::shared_deadline`); nothing was done.
    #[error("{what} refused: its deadline passed {late_ms} ms ago")]
    DeadlinePassed { what: &'static str, late_ms: u64 },
    /// A cluster operation was refused (bad join secret, conflicting node id, ...).
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("volume {name:?} not found")]
    UnknownVolume { name: String },
    #[error("{0}")]
    Fs(#[from] FsError),
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// A peer node failed a node-to-node call (or could not be reached).
    #[error("peer node {node_id}: {message}")]
    Peer { node_id: u64, message: String },
    #[error("io: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl NodeError {
    pub fn device(context: impl Into<String>, source: ballast_device::DeviceError) -> Self {
        Self::Device {
            context: context.into(),
            source,
        }
    }

    pub fn rocksdb(context: impl Into<String>, source: rocksdb::Error) -> Self {
        Self::Rocksdb {
            context: context.into(),
            source,
        }
    }

    pub fn codec(context: impl Into<String>, source: postcard::Error) -> Self {
        Self::Codec {
            context: context.into(),
            source,
        }
    }
}

pub type NodeResult<T> = Result<T, NodeError>;
