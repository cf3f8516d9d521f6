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

/// gRPC metadata key carrying the numeric POSIX errno of a filesystem error.
pub const ERRNO_METADATA_KEY: &str = "ballast-errno";
