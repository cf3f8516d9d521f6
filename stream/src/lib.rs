//! Streams: Kafka-compatible topic partitions kept in containers — not built yet.
//!
//! Will own: the partition log (the Raft log *is* the data), offsets, consumer groups, and the
//! Kafka wire protocol front end (codecs from the `kafka-protocol` crate).
//! Must not depend on: the `table` crate. The namespace already reserves the `Stream` entry kind.
