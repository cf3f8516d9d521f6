//! Values stored in the state store (RocksDB), encoded with postcard.
//!
//! Owns: the persistent shape of inodes, directory entries, block references, container state
//! and volume records. Every change here is an on-disk format change: add fields only at the end
//! of a struct and bump `docs/on-disk-format.md`.
//! Invariant: decoding never panics on bad bytes; it returns a codec error naming the key.

use std::collections::BTreeMap;

use openraft::{LogId, StoredMembership};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{NodeError, NodeResult};
use crate::types::{NodeId, RaftNode};

/// The root directory of every volume.
pub const ROOT_INODE: u64 = 1;

/// The kind of a namespace entry. Tables and streams are reserved now so that adding them does
/// not change the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Directory,
    File,
    Symlink,
    Table,
    Stream,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub kind: EntryKind,
    /// Permission bits only (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size_bytes: u64,
    /// Device blocks referenced by this inode.
    pub block_count: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub generation: u64,
    pub symlink_target: Option<String>,
    /// Directories: parent directory inode (for `..` and rename loop checks).
    pub parent: u64,
    /// Directories: number of entries (rmdir needs zero).
    pub entry_count: u64,
    /// Directories: next readdir cookie to hand out (cookies are never reused).
    pub cookie_next: u64,
}

/// A directory entry, keyed by (parent, name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirentValue {
    pub inode: u64,
    pub kind: EntryKind,
    pub cookie: u64,
}

/// Where one 4 KiB file block lives on the device, and its CRC-32.
///
/// An *unwritten* reference (from `fallocate`) has no device block: `device_block` is
/// [`BlockRef::UNWRITTEN_DEVICE_BLOCK`] and `checksum` is the CRC-32 of a zero block. It reads
/// as zeros, counts against the quota like any block, and is never read from, freed on, or
/// written to the device. Device block numbers are far below `u64::MAX`, so the sentinel cannot
/// name a real block, and the encoding stays that of every other reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    pub device_block: u64,
    pub checksum: u32,
}

impl BlockRef {
    /// The `device_block` of an unwritten reference.
    pub const UNWRITTEN_DEVICE_BLOCK: u64 = u64::MAX;

    /// A reference to a block of zeros that holds no device block.
    pub fn unwritten() -> BlockRef {
        BlockRef {
            device_block: Self::UNWRITTEN_DEVICE_BLOCK,
            checksum: zero_block_checksum(),
        }
    }

    /// Whether this reference holds no device block (reads as zeros).
    pub fn is_unwritten(&self) -> bool {
        self.device_block == Self::UNWRITTEN_DEVICE_BLOCK
    }

    /// The device block this reference holds, if any.
    pub fn written_device_block(&self) -> Option<u64> {
        (!self.is_unwritten()).then_some(self.device_block)
    }
}

/// CRC-32 of a 4096-byte block of zeros (computed once).
pub fn zero_block_checksum() -> u32 {
    static CHECKSUM: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CHECKSUM.get_or_init(|| ballast_common::checksum(&[0u8; 4096]))
}

/// The state-machine header of one container, written atomically with every apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContainerState {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, RaftNode>,
    /// Filesystem containers: the next inode number to hand out.
    pub inode_next: u64,
    /// Filesystem containers: live inodes.
    pub inode_count: u64,
    /// Filesystem containers: device blocks referenced by this container's files.
    pub used_block_count: u64,
    /// Filesystem containers: the volume this container belongs to.
    pub volume_id: u64,
    /// Filesystem containers: quota in bytes (copied from the volume at creation/resize).
    pub quota_bytes: u64,
    /// Metadata container: the next volume id.
    pub volume_id_next: u64,
    /// Metadata container: the next container id.
    pub container_id_next: u64,
}

/// A volume, as recorded by the metadata container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub volume_id: u64,
    pub container_id: u64,
    pub quota_bytes: u64,
    pub replication_factor: u32,
    pub replication_minimum: u32,
    pub created_ns: i64,
    /// Free-form labels given at creation (the CSI plugin records the PVC's namespace and name,
    /// which the scheduler extender looks up).
    pub labels: BTreeMap<String, String>,
}

/// A storage node, as recorded by the metadata container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: u64,
    /// gRPC address ("http://host:port") for clients and other nodes.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub device_uuid: [u8; 16],
    pub data_block_count: u64,
    /// Free blocks when the node last registered (placement prefers emptier nodes).
    pub data_block_free_count: u64,
    pub registered_ns: i64,
    /// Set by `ballast node drain`: the node holds no new replicas and its replicas move away.
    /// Re-registration keeps it.
    pub draining: bool,
}

/// Where one container lives: its replica nodes. Decided by the metadata leader at creation and
/// changed by replica moves (re-replication, drain, rebalance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub container_id: u64,
    pub volume_name: String,
    /// Nodes holding a replica, in placement order.
    pub replicas: Vec<u64>,
    /// The one replica allowed to initialise the Raft group (only while it has no Raft state).
    pub bootstrap_node_id: u64,
    /// Placement selector: replicas only on nodes carrying all these labels.
    pub node_selector: BTreeMap<String, String>,
    /// Nodes being moved off: no longer in `replicas`, but possibly still voters of the group
    /// until the move finishes. A node keeps its copy while it is listed here.
    pub retiring: Vec<u64>,
}

impl ContainerRecord {
    /// Whether `node_id` keeps a copy: a replica, or retiring until its move finishes.
    pub fn holds(&self, node_id: u64) -> bool {
        self.replicas.contains(&node_id) || self.retiring.contains(&node_id)
    }
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for our plain data types.
    postcard::to_allocvec(value).expect("postcard encodes plain data into a Vec")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> NodeResult<T> {
    postcard::from_bytes(bytes).map_err(|source| NodeError::codec(format!("decode {what}"), source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inode_strategy() -> impl Strategy<Value = Inode> {
        (
            any::<u32>(),
            any::<u64>(),
            any::<i64>(),
            proptest::option::of(".{0,40}"),
        )
            .prop_map(|(mode, size_bytes, time_ns, symlink_target)| Inode {
                kind: EntryKind::File,
                mode,
                uid: mode / 2,
                gid: mode / 3,
                nlink: 1,
                size_bytes,
                block_count: size_bytes / 4096,
                atime_ns: time_ns,
                mtime_ns: time_ns,
                ctime_ns: time_ns,
                generation: 1,
                symlink_target,
                parent: 1,
                entry_count: 0,
                cookie_next: 1,
            })
    }

    proptest! {
        #[test]
        fn inode_round_trip(inode in inode_strategy()) {
            let bytes = encode(&inode);
            prop_assert_eq!(decode::<Inode>(&bytes, "inode").unwrap(), inode);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Inode>(&bytes, "inode");
            let _ = decode::<ContainerState>(&bytes, "container state");
            let _ = decode::<VolumeRecord>(&bytes, "volume");
        }
    }
}
