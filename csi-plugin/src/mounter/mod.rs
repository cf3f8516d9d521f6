//! `ballast-csi-mounter`: a separate, long-lived process that owns the node's `ballast-fuse`
//! daemons, so that the node plugin (`ballast-csi --mode node`) can be restarted, crash or be
//! upgraded without taking the pods' FUSE mounts with it.
//!
//! Why a separate process: a container runtime kills every process in a container's cgroup when
//! the container stops. Daemons started by the node plugin would die with the plugin's container
//! however they are detached (`setsid` only protects them from the plugin *process*). Moving them
//! into the host's scope (`nsenter -t 1` plus `systemd-run --scope`) needs systemd as the host's
//! init and puts unaccounted processes on the host; a mounter in a pod of its own keeps them
//! inside Kubernetes' accounting, needs no host init system, and is restarted only when an
//! operator chooses to (its DaemonSet uses `updateStrategy: OnDelete`).
//!
//! Owns: the protocol between plugin and mounter ([`protocol`]), the plugin's client
//! ([`client`]) and the mounter's service ([`service`]).
//! Must not depend on: the CSI services; the node service uses [`client`] only.
//! Invariants: see each module. In short: the mounter starts, records, re-adopts and stops
//! daemons and nothing else; the plugin keeps deciding what is staged and published, and makes
//! the bind mounts itself. Mounts reach each other through shared mount propagation of the kubelet
//! directory (Bidirectional in both pods).

pub mod client;
pub mod protocol;
pub mod service;

pub use client::MounterClient;
