//! Ballast's device engine: owns one raw block device or file and everything on it.
//!
//! Layout of a device: two superblock copies (blocks 0 and 1, reserved up to 1 MiB), the log
//! region (a circular multi-group Raft log in segments, from 1 MiB), then the data region of
//! 4096-byte blocks. All I/O goes through io_uring with `O_DIRECT`: the shared engine thread,
//! rings of the tokio threads that ask for transfers (`thread_ring`), and the log writer's own
//! ring (`DirectRing`).
//!
//! Owns: the superblock, the log store, the block store and block allocator, the I/O engine.
//! Must not depend on: Raft, RocksDB or any service crate; callers bring their own meaning.
//! Invariants: all I/O is aligned to 4096 bytes in memory, offset and length; every record on the
//! device is checksummed (CRC-32); recovery reads only the superblock and the live log, never the
//! data region.

pub mod aligned_buffer;
pub mod block_store;
pub mod device;
pub mod direct_ring;
pub mod engine;
pub mod error;
pub mod log_store;
pub mod superblock;
#[cfg(test)]
mod test_support;
pub mod thread_ring;

/// The unit of every transfer and of the data region.
pub const BLOCK_SIZE_BYTES: usize = 4096;

pub use aligned_buffer::AlignedBuffer;
pub use block_store::{BlockAllocator, BlockStore, Extent, BLOCKS_PER_GROUP};
pub use device::{Device, FormatOptions};
pub use direct_ring::DirectRing;
pub use engine::{Engine, EngineOptions, EngineStatistics};
pub use error::DeviceError;
pub use log_store::{GroupLogState, LogEntry, LogRecord, LogStore};
pub use superblock::Superblock;
pub use thread_ring::ThreadRingStatistics;
