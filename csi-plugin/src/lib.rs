//! CSI plugin (Identity, Controller and Node services on a unix socket) — not built yet.
//!
//! Will own: translating kubelet's and external-provisioner's CSI calls into Ballast volume
//! operations and FUSE mounts, through `ballast-client`.
//! Must not depend on: `ballast-storage-node` or any server internals; only the client crate.
//! Invariant to keep: a restart of the node plugin never breaks the mounts of running pods.
