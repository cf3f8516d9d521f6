//! The Ballast storage node: one daemon per device set, serving the namespace, file data and
//! (later) tables and streams of the containers placed on it.
//!
//! Owns: containers as openraft groups (log on the device log store, state in RocksDB and the
//! device block store), the metadata and filesystem state machines, checkpoints, and the gRPC
//! services.
//! Must not depend on: any client crate (client, fuse-driver, csi-plugin, cli). Front ends reach
//! it only through `ballast-proto`.
//!
//! Invariants:
//! - A mutation is acknowledged only after its Raft entry is durable on the device and applied.
//! - State-machine writes to RocksDB bypass its WAL; the Raft log is the WAL. Checkpoints flush
//!   the device before RocksDB.
//! - File data is copy-on-write with deferred frees; every block carries a CRC-32 that is
//!   verified on every read.

pub mod block_map;
pub mod buffer_pool;
pub mod chunk_row;
pub mod cluster;
pub mod command;
pub mod deduplication;
pub mod detached;
pub mod election_hold;
pub mod error;
pub mod failing_replicas;
pub mod filesystem;
pub mod handover;
pub mod keys;
pub mod log_storage;
pub mod metadata;
pub mod mover;
pub mod node;
pub mod pending_writes;
pub mod placement;
pub mod prewritten;
pub mod purge_policy;
pub mod quiescence;
pub mod raft_network;
pub mod read_barrier;
pub mod records;
pub mod scrub;
pub mod service;
pub mod shared_regions;
pub mod snapshot;
pub mod snapshot_spool;
pub mod space;
pub mod state_machine;
pub mod state_space;
pub mod state_store;
pub mod storage;
pub mod transaction;
pub mod types;
pub mod write_data;

pub use error::{FsError, NodeError, NodeResult};
pub use node::{NodeConfig, StorageNode};

#[cfg(test)]
mod detached_tests;
#[cfg(test)]
mod early_acknowledgement_tests;
#[cfg(test)]
mod filesystem_tests;
#[cfg(test)]
pub mod test_support;
