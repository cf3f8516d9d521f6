//! Generated gRPC types and service stubs for the Ballast API (`proto/ballast.proto`).
//!
//! Owns: the wire contract between storage nodes and every front end.
//! Must not depend on: any other Ballast crate; it is the bottom of the client side.
//! Invariant: the proto is compiled by `protox` at build time, so no `protoc` is needed.
#![allow(clippy::all)]
#![allow(missing_docs)]

/// Version 1 of the API (`package ballast.v1`).
pub mod v1 {
    tonic::include_proto!("ballast.v1");
}

/// Node-to-node API (`package ballast.cluster.v1`): Raft transport and membership. Front ends
/// never use it.
pub mod cluster_v1 {
    tonic::include_proto!("ballast.cluster.v1");
}

/// HTTP/2 flow-control window per stream, for every Ballast client and server. The 64 KiB
/// default makes a sender stop for a window update every 64 KiB, which capped 1 MiB writes and
/// snapshot chunks on a busy machine; 8 MiB keeps a few messages in flight. It bounds the bytes
/// a peer may buffer in this process per stream.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// HTTP/2 flow-control window per connection (all streams together): the bound on buffered bytes
/// per peer connection.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest HTTP/2 frame a Ballast client or server accepts. The 16 KiB default cut every 1 MiB
/// write or read into 64 frames; per-frame work was a visible share of the node's CPU per GiB
/// (measured: 1.65-2.02 s → 1.24-1.68 s per GiB written through the mount).
pub const HTTP2_FRAME_BYTES_MAX: u32 = 1 << 20;

/// gRPC metadata key of a request id (`session:sequence:floor`, hex) on side-effecting calls:
/// the node applies a tagged request at most once and answers repeats with the first response.
pub const REQUEST_ID_METADATA_KEY: &str = "ballast-request-id";

/// gRPC metadata key carrying the address ("http://host:port") of the node that leads the
/// container a refused request was meant for. Its presence also promises that the refusing node
/// applied nothing, so the client may resend any request there.
pub const LEADER_METADATA_KEY: &str = "ballast-leader";

/// gRPC metadata key marking a failure that provably applied nothing (for example "no leader
/// yet"), so even side-effecting requests may be retried.
pub const NOT_APPLIED_METADATA_KEY: &str = "ballast-not-applied";

/// gRPC metadata key carrying the numeric POSIX errno of a filesystem error.
pub const ERRNO_METADATA_KEY: &str = "ballast-errno";
