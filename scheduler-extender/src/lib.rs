//! `ballast-scheduler-extender`: a kube-scheduler extender (HTTP `filter` and `prioritize`)
//! that steers pods towards the nodes holding their Ballast data.
//!
//! Owns: the extender protocol ([`protocol`]), the pod → volumes → nodes mapping and the
//! scores ([`placement`]), the cached view of the Ballast cluster ([`source`]) and the HTTP
//! service ([`server`]).
//! Must not depend on: storage-node internals or the CSI plugin. Ballast is reached only through
//! `ballast-client`; Kubernetes objects are `k8s-openapi` types; the Kubernetes API is never
//! called (a pod's volumes are found by the PVC labels the CSI plugin records on each volume,
//! and nodes by a storage-node label carrying the Kubernetes node name).
//! Invariants: every request is bounded (body size, Ballast deadline, cached listing), and
//! Ballast trouble degrades locality without failing scheduling.

pub mod error;
pub mod placement;
pub mod protocol;
pub mod server;
pub mod source;

pub use error::ExtenderError;
