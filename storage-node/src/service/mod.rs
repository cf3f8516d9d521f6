//! gRPC services of a storage node: `Admin` and `Filesystem` (see `proto/ballast.proto`).
//!
//! Owns: translating requests into node operations and results into protobuf, and the error
//! contract — every filesystem error carries its errno in the `ballast-errno` metadata.
//! Must not contain storage logic: every decision lives in the node and state machines.

pub mod admin;
pub mod cluster;
pub mod filesystem;
pub mod local;

use ballast_common::Errno;
use ballast_proto::v1 as proto;
use tonic::{Code, Status};

use crate::error::{FsError, NodeError};
use crate::records::{EntryKind, Inode};

fn status_code(errno: Errno) -> Code {
    match errno {
        Errno::ENOENT => Code::NotFound,
        Errno::EEXIST => Code::AlreadyExists,
        Errno::EINVAL | Errno::ENAMETOOLONG => Code::InvalidArgument,
        Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG => Code::ResourceExhausted,
        Errno::EPERM | Errno::EACCES => Code::PermissionDenied,
        Errno::EIO => Code::DataLoss,
        _ => Code::FailedPrecondition,
    }
}

fn with_errno(code: Code, errno: Errno, message: String) -> Status {
    let mut status = Status::new(code, format!("{}: {message}", errno.name()));
    let value = errno
        .0
        .to_string()
        .parse()
        .expect("a decimal number is valid metadata");
    status
        .metadata_mut()
        .insert(ballast_proto::ERRNO_METADATA_KEY, value);
    status
}

pub fn fs_status(error: FsError) -> Status {
    with_errno(status_code(error.errno), error.errno, error.message)
}

/// Every node error becomes a status a client can act on.
pub fn node_status(error: NodeError) -> Status {
    match error {
        NodeError::Fs(error) => fs_status(error),
        NodeError::ChecksumMismatch(message) => with_errno(
            Code::DataLoss,
            Errno::EIO,
            format!("checksum mismatch, refusing to serve corrupt data: {message}"),
        ),
        NodeError::UnknownVolume { name } => with_errno(
            Code::NotFound,
            Errno::ENOENT,
            format!("volume {name:?} does not exist"),
        ),
        NodeError::Raft(message) => with_errno(Code::Unavailable, Errno::EIO, message),
        NodeError::NotLeader {
            container_id,
            leader_address,
        } => {
            // Unavailable, so an old client retries idempotent calls; the metadata says that
            // nothing was applied and where the leader is.
            let mut status = with_errno(
                Code::Unavailable,
                Errno::EIO,
                format!(
                    "container {container_id} is led by {}",
                    leader_address
                        .as_deref()
                        .unwrap_or("an unknown node (election in progress)")
                ),
            );
            status.metadata_mut().insert(
                ballast_proto::NOT_APPLIED_METADATA_KEY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            if let Some(address) = leader_address
                .and_then(|address| tonic::metadata::MetadataValue::try_from(address).ok())
            {
                status
                    .metadata_mut()
                    .insert(ballast_proto::LEADER_METADATA_KEY, address);
            }
            status
        }
        error @ NodeError::BelowMinimumReplication { .. } => {
            // Nothing was applied; the condition may heal (a replica returns), so the client may
            // retry within its failover window before reporting EIO.
            let mut status = with_errno(Code::Unavailable, Errno::EIO, error.to_string());
            status.metadata_mut().insert(
                ballast_proto::NOT_APPLIED_METADATA_KEY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            status
        }
        NodeError::Cluster(message) => with_errno(Code::PermissionDenied, Errno::EPERM, message),
        error @ NodeError::HandoverRefused { .. } => {
            with_errno(Code::FailedPrecondition, Errno::EBUSY, error.to_string())
        }
        error @ NodeError::DeadlinePassed { .. } => {
            with_errno(Code::DeadlineExceeded, Errno::EIO, error.to_string())
        }
        error @ NodeError::DeviceFull { .. } => {
            with_errno(Code::ResourceExhausted, Errno::ENOSPC, error.to_string())
        }
        other => {
            tracing::error!(error = %other, "request failed inside the node");
            with_errno(Code::Internal, Errno::EIO, other.to_string())
        }
    }
}

pub fn entry_kind(kind: EntryKind) -> proto::EntryKind {
    match kind {
        EntryKind::Directory => proto::EntryKind::Directory,
        EntryKind::File => proto::EntryKind::File,
        EntryKind::Symlink => proto::EntryKind::Symlink,
        EntryKind::Table => proto::EntryKind::Table,
        EntryKind::Stream => proto::EntryKind::Stream,
    }
}

pub fn entry_kind_from_proto(kind: i32) -> Result<EntryKind, Status> {
    match proto::EntryKind::try_from(kind) {
        Ok(proto::EntryKind::Directory) => Ok(EntryKind::Directory),
        Ok(proto::EntryKind::File) => Ok(EntryKind::File),
        Ok(proto::EntryKind::Symlink) => Ok(EntryKind::Symlink),
        Ok(proto::EntryKind::Table) => Ok(EntryKind::Table),
        Ok(proto::EntryKind::Stream) => Ok(EntryKind::Stream),
        _ => Err(fs_status(FsError::invalid(format!(
            "unknown entry kind {kind}"
        )))),
    }
}

pub fn attr(inode_number: u64, inode: &Inode) -> proto::Attr {
    proto::Attr {
        inode: inode_number,
        kind: entry_kind(inode.kind) as i32,
        mode: inode.mode,
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        size_bytes: inode.size_bytes,
        blocks: inode.block_count * 8,
        atime_ns: inode.atime_ns,
        mtime_ns: inode.mtime_ns,
        ctime_ns: inode.ctime_ns,
        generation: inode.generation,
    }
}
