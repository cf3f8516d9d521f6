//! The one error type of the device crate.
//!
//! Owns: `DeviceError`, every failure the device layer can report, each with enough context
//! (offsets, paths, counts) to act on it from a log line alone.
//! Must not depend on: anything above the device layer.
//! Invariants: the type is `Clone` (I/O errors are shared behind `Arc`) so one failed group-commit
//! write can be reported to every caller whose records were in it.

use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open {path:?}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },

    #[error("{operation} on {path:?} at offset {offset_bytes} failed: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        offset_bytes: u64,
        #[source]
        source: Arc<std::io::Error>,
    },

    #[error("invalid engine options: {reason}")]
    InvalidOptions { reason: String },

    #[error(
        "I/O of {length_bytes} bytes at offset {offset_bytes} is outside the device of {device_size_bytes} bytes"
    )]
    OutOfBounds {
        offset_bytes: u64,
        length_bytes: u64,
        device_size_bytes: u64,
    },

    #[error(
        "blocks {first_block}..+{block_count} are outside the data region of {data_block_count} blocks"
    )]
    BlockOutOfBounds {
        first_block: u64,
        block_count: u64,
        data_block_count: u64,
    },

    #[error("the I/O engine thread of {path:?} has stopped")]
    EngineStopped { path: PathBuf },

    #[error("device {path:?} is {size_bytes} bytes; at least {minimum_bytes} bytes are required")]
    DeviceTooSmall {
        path: PathBuf,
        size_bytes: u64,
        minimum_bytes: u64,
    },

    #[error("bad magic at offset {offset_bytes}: not a Ballast structure")]
    BadMagic { offset_bytes: u64 },

    #[error(
        "unsupported on-disk format version {found} (this build reads version {}); the node's \
         data cannot be read by this build: format the device again (its data is lost) or run \
         the build that wrote it",
        crate::superblock::FORMAT_VERSION
    )]
    UnsupportedFormatVersion { found: u32 },

    #[error(
        "checksum mismatch at offset {offset_bytes}: stored {stored:#010x}, computed {computed:#010x}"
    )]
    ChecksumMismatch {
        offset_bytes: u64,
        stored: u32,
        computed: u32,
    },

    #[error("inconsistent on-disk layout: {reason}")]
    InconsistentLayout { reason: String },

    #[error(
        "no valid superblock on {path:?}: copy 0: {primary_reason}; copy 1: {secondary_reason}"
    )]
    NoValidSuperblock {
        path: PathBuf,
        primary_reason: String,
        secondary_reason: String,
    },

    #[error("not enough free blocks: requested {requested_blocks}, free {free_blocks}")]
    NoSpace {
        requested_blocks: u64,
        free_blocks: u64,
    },

    #[error("block allocator invariant violated at block {block}: {reason}")]
    AllocatorInvariant { block: u64, reason: &'static str },

    #[error(
        "bitmap for block group {group_index} is invalid ({length_bytes} bytes, expected {expected_length_bytes}): {reason}"
    )]
    InvalidBitmap {
        group_index: u64,
        length_bytes: usize,
        expected_length_bytes: usize,
        reason: &'static str,
    },

    #[error("log corrupted at offset {offset_bytes}: {reason}")]
    LogCorrupted { offset_bytes: u64, reason: String },

    #[error("log full: {used_bytes} of {region_bytes} bytes in use; checkpoint and purge")]
    LogFull { used_bytes: u64, region_bytes: u64 },

    #[error("log request of {length_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    LogRequestTooLarge { length_bytes: u64, limit_bytes: u64 },

    #[error("the log writer has stopped")]
    LogStopped,
}

impl DeviceError {
    pub(crate) fn io(
        operation: &'static str,
        path: &std::path::Path,
        offset_bytes: u64,
        source: std::io::Error,
    ) -> Self {
        DeviceError::Io {
            operation,
            path: path.to_owned(),
            offset_bytes,
            source: Arc::new(source),
        }
    }
}
