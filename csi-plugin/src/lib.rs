//! `ballast-csi-plugin`: the CSI (Container Storage Interface v1) driver `csi.ballast.io`, serving
//! the Identity, Controller and Node services on a unix socket so that Kubernetes (kubelet and the
//! CSI sidecars) can provision Ballast volumes and mount them into pods.
//!
//! Owns: translating CSI calls into Ballast volume operations (through `ballast-client`) and into
//! FUSE mounts (by launching the `ballast-fuse` binary, itself or through `ballast-csi-mounter`)
//! plus bind mounts on the node; and the mounter itself ([`mounter`], binary
//! `ballast-csi-mounter`).
//! Must not depend on: `ballast-storage-node`, `ballast-device` or any server internals; the
//! storage node is reached only over gRPC through `ballast-client`.
//!
//! # Mapping
//! - CSI volume id = Ballast volume name ([`names`]); capacity = the volume's quota;
//!   StorageClass parameters `replication`, `replicationMinimum`, `nodeSelector`
//!   ([`parameters`]).
//! - NodeStageVolume starts one `ballast-fuse` daemon that mounts the volume at the staging path;
//!   NodePublishVolume bind-mounts the staging path at each pod's target path (read-only when
//!   asked); unpublish and unstage undo this ([`node`], [`mounts`], [`fuse`]).
//! - Topology: the node plugin reports `topology.ballast.io/node=<node id>`. The controller
//!   advertises VOLUME_ACCESSIBILITY_CONSTRAINTS and validates `accessibility_requirements`, but
//!   returns no `accessible_topology`: every node plugin reaches the storage node over the
//!   network, so a volume is equally usable from every node (see [`controller`]).
//!
//! # Invariant: a restart of the node plugin never breaks the mounts of running pods
//! The FUSE daemon of a staged volume is not the plugin's lifetime-bound child: it runs in its own
//! session (`setsid`), writes its log to `<state-dir>/fuse/`, and keeps serving when the plugin
//! dies (even by `kill -9`). What was staged and published is recorded in
//! `<state-dir>/node-state.json` (written atomically: temp file, fsync, rename, fsync of the
//! directory) with the daemon's pid and start time. A restarted plugin reloads that file, checks
//! every entry against `/proc/self/mountinfo` (the only truth for "is it mounted"), and answers
//! repeated NodeStage/NodePublish calls for live mounts as the idempotent successes they are;
//! NodeUnpublish/NodeUnstage later stop the daemon it did not start, by recorded pid (verified by
//! start time, so a reused pid is never signalled).
//!
//! # In Kubernetes: the daemons belong to `ballast-csi-mounter`
//! `setsid` protects the daemons from the plugin *process* dying. A container restart is
//! different: the container runtime kills every process of the container's cgroup and pid
//! namespace, daemons included. So in a cluster the plugin runs with `--mounter-socket` and
//! delegates the daemons to `ballast-csi-mounter` ([`mounter`], [`daemons`]), which runs in a
//! DaemonSet of its own that is not restarted with the plugin; the staging and target paths sit
//! on the kubelet directory with Bidirectional propagation in both pods, so the mounter's FUSE
//! mounts and the plugin's bind mounts reach each other, the host and the pods. A restart of the
//! mounter still ends its daemons; so does a daemon's own death: the kernel aborts its connection
//! and the pods' bind mounts of it answer ENOTCONN until the pod is restarted. The node reports
//! this as an abnormal volume condition (with the mounter's view of the daemon), and a repeated
//! NodeStage replaces a dead staging mount. See `docs/kubernetes.md`, "Node plugin restarts and
//! FUSE mounts".

pub mod capabilities;
pub mod controller;
pub mod daemons;
pub mod error;
pub mod fuse;
pub mod identity;
pub mod mounter;
pub mod mounts;
pub mod names;
pub mod node;
pub mod operations;
pub mod paging;
pub mod parameters;
pub mod server;
pub mod signals;
pub mod state;

pub use error::CsiError;

/// The generated CSI v1 types and service stubs (`proto/csi.proto`, compiled by protox).
pub mod csi {
    /// CSI spec version 1 (`package csi.v1`).
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// The CSI driver name (CSIDriver object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.ballast.io";

/// Version reported by GetPluginInfo.
pub const VENDOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Topology key reported by NodeGetInfo; its value is the node id given on the command line.
pub const TOPOLOGY_NODE_KEY: &str = "topology.ballast.io/node";
