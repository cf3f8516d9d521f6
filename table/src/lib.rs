//! Tables: key-value tablets in containers, applied to RocksDB with the Raft log as WAL — not
//! built yet.
//!
//! Will own: tablet state machines, splits, and the table gRPC API.
//! Must not depend on: the `stream` crate. The namespace already reserves the `Table` entry kind.
