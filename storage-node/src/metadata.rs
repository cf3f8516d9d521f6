//! The metadata state machine (container 0): the cluster map. It records the nodes, the volumes
//! and, for each volume's container, the nodes holding its replicas.
//!
//! Owns: the meaning of every [`MetadataCommand`], and lookups of nodes, volumes and containers.
//! Must not depend on: filesystem internals. Starting and stopping containers is the node's job
//! (`node.rs`), and choosing replicas is `placement.rs`'s; this module only records decisions
//! after checking they are consistent with the map.
//! Invariants:
//! - Every container record names exactly `replication_factor` distinct registered nodes in
//!   `replicas`, and no node is both a replica and retiring.
//! - At creation the bootstrap node is one of the replicas; the first move sets it to 0 (the
//!   group exists, so no node may ever initialise it again).
//! - A node id stays bound to the device it registered with.

use ballast_common::validate_volume_name;

use crate::command::{CommandResponse, MetadataCommand};
use crate::error::{FsError, NodeResult};
use crate::keys;
use crate::records::{decode, encode, ContainerRecord, NodeRecord, VolumeRecord};
use crate::storage::NodeStorage;
use crate::transaction::Transaction;
use crate::types::FIRST_VOLUME_CONTAINER_ID;

/// Most volumes one cluster records (bounds listings and the container count per node).
pub const VOLUME_COUNT_MAX: usize = 4096;
/// Most nodes one cluster records.
pub const NODE_COUNT_MAX: usize = 1024;
/// Highest replication factor a volume may ask for.
pub const REPLICATION_FACTOR_MAX: u32 = 5;

pub fn apply(
    transaction: &mut Transaction<'_>,
    command: MetadataCommand,
) -> NodeResult<CommandResponse> {
    match command {
        MetadataCommand::CreateVolume {
            name,
            quota_bytes,
            replication_factor,
            replication_minimum,
            now_ns,
            replicas,
            bootstrap_node_id,
            node_selector,
            labels,
        } => {
            validate_volume_name(&name)
                .map_err(|error| FsError::invalid(format!("volume name: {error}")))?;
            if replication_factor == 0 || replication_factor > REPLICATION_FACTOR_MAX {
                return Err(FsError::invalid(format!(
                    "replication factor {replication_factor} must be between 1 and {REPLICATION_FACTOR_MAX}"
                ))
                .into());
            }
            if replication_minimum == 0 || replication_minimum > replication_factor {
                return Err(FsError::invalid(format!(
                    "replication minimum {replication_minimum} must be between 1 and the replication factor"
                ))
                .into());
            }
            check_replicas(transaction.storage, &replicas, replication_factor)?;
            if !replicas.contains(&bootstrap_node_id) {
                return Err(FsError::invalid(format!(
                    "bootstrap node {bootstrap_node_id} is not one of the replicas {replicas:?}"
                ))
                .into());
            }
            let key = keys::volume(&name);
            if transaction.storage.state.get_raw(&key)?.is_some() {
                return Err(FsError::exists(format!("volume {name:?} exists")).into());
            }
            if list_volumes(transaction.storage)?.len() >= VOLUME_COUNT_MAX {
                return Err(
                    FsError::no_space(format!("at most {VOLUME_COUNT_MAX} volumes")).into(),
                );
            }
            let state = &mut transaction.state;
            let volume_id = state.volume_id_next.max(1);
            let container_id = state.container_id_next.max(FIRST_VOLUME_CONTAINER_ID);
            state.volume_id_next = volume_id + 1;
            state.container_id_next = container_id + 1;
            let record = VolumeRecord {
                name: name.clone(),
                volume_id,
                container_id,
                quota_bytes,
                replication_factor,
                replication_minimum,
                created_ns: now_ns,
                labels,
            };
            let container = ContainerRecord {
                container_id,
                volume_name: name,
                replicas,
                bootstrap_node_id,
                node_selector,
                retiring: Vec::new(),
            };
            transaction.batch().put(key, encode(&record));
            transaction
                .batch()
                .put(keys::container_record(container_id), encode(&container));
            Ok(CommandResponse::Volume(record))
        }
        MetadataCommand::DeleteVolume { name } => {
            let key = keys::volume(&name);
            let record = transaction
                .storage
                .state
                .get::<VolumeRecord>(&key, "volume")?
                .ok_or_else(|| FsError::not_found(format!("volume {name:?} does not exist")))?;
            transaction.batch().delete(key);
            transaction
                .batch()
                .delete(keys::container_record(record.container_id));
            Ok(CommandResponse::Volume(record))
        }
        MetadataCommand::ResizeVolume { name, quota_bytes } => {
            let key = keys::volume(&name);
            let mut record = transaction
                .storage
                .state
                .get::<VolumeRecord>(&key, "volume")?
                .ok_or_else(|| FsError::not_found(format!("volume {name:?} does not exist")))?;
            record.quota_bytes = quota_bytes;
            transaction.batch().put(key, encode(&record));
            Ok(CommandResponse::Volume(record))
        }
        MetadataCommand::RegisterNode(mut node) => {
            if node.node_id == 0 {
                return Err(FsError::invalid("node id 0 is reserved").into());
            }
            match get_node(transaction.storage, node.node_id)? {
                Some(existing) if existing.device_uuid != node.device_uuid => {
                    return Err(FsError::exists(format!(
                        "node id {} is already registered with another device; format the new \
                         device with a new node id",
                        node.node_id
                    ))
                    .into());
                }
                // Draining is the operator's decision; a restart does not undo it.
                Some(existing) => node.draining = existing.draining,
                None => {
                    if list_nodes(transaction.storage)?.len() >= NODE_COUNT_MAX {
                        return Err(
                            FsError::no_space(format!("at most {NODE_COUNT_MAX} nodes")).into()
                        );
                    }
                }
            }
            transaction
                .batch()
                .put(keys::node(node.node_id), encode(&node));
            Ok(CommandResponse::Done)
        }
        MetadataCommand::SetNodeFreeBlocks {
            node_id,
            data_block_free_count,
        } => {
            let mut node = get_node(transaction.storage, node_id)?
                .ok_or_else(|| FsError::not_found(format!("node {node_id} is not registered")))?;
            node.data_block_free_count = data_block_free_count.min(node.data_block_count);
            transaction.batch().put(keys::node(node_id), encode(&node));
            Ok(CommandResponse::Done)
        }
        MetadataCommand::SetNodeDraining { node_id, draining } => {
            let mut node = get_node(transaction.storage, node_id)?
                .ok_or_else(|| FsError::not_found(format!("node {node_id} is not registered")))?;
            node.draining = draining;
            transaction.batch().put(keys::node(node_id), encode(&node));
            Ok(CommandResponse::Done)
        }
        MetadataCommand::MoveReplica {
            container_id,
            from_node_id,
            to_node_id,
        } => {
            let mut record =
                get_container(transaction.storage, container_id)?.ok_or_else(|| {
                    FsError::not_found(format!("container {container_id} does not exist"))
                })?;
            let Some(position) = record
                .replicas
                .iter()
                .position(|&replica| replica == from_node_id)
            else {
                return Err(FsError::invalid(format!(
                    "node {from_node_id} holds no replica of container {container_id}"
                ))
                .into());
            };
            if record.replicas.contains(&to_node_id) {
                return Err(FsError::exists(format!(
                    "node {to_node_id} already holds a replica of container {container_id}"
                ))
                .into());
            }
            if get_node(transaction.storage, to_node_id)?.is_none() {
                return Err(
                    FsError::invalid(format!("node {to_node_id} is not registered")).into(),
                );
            }
            record.replicas[position] = to_node_id;
            record.retiring.retain(|&node| node != to_node_id);
            if !record.retiring.contains(&from_node_id) {
                record.retiring.push(from_node_id);
            }
            record.bootstrap_node_id = 0;
            transaction
                .batch()
                .put(keys::container_record(container_id), encode(&record));
            Ok(CommandResponse::Done)
        }
        MetadataCommand::FinishMove {
            container_id,
            node_id,
        } => {
            let mut record =
                get_container(transaction.storage, container_id)?.ok_or_else(|| {
                    FsError::not_found(format!("container {container_id} does not exist"))
                })?;
            record.retiring.retain(|&node| node != node_id);
            transaction
                .batch()
                .put(keys::container_record(container_id), encode(&record));
            Ok(CommandResponse::Done)
        }
    }
}

fn check_replicas(
    storage: &NodeStorage,
    replicas: &[u64],
    replication_factor: u32,
) -> NodeResult<()> {
    if replicas.len() != replication_factor as usize {
        return Err(FsError::invalid(format!(
            "placement names {} replicas for replication factor {replication_factor}",
            replicas.len()
        ))
        .into());
    }
    for (index, node_id) in replicas.iter().enumerate() {
        if replicas[..index].contains(node_id) {
            return Err(FsError::invalid(format!("node {node_id} holds two replicas")).into());
        }
        if get_node(storage, *node_id)?.is_none() {
            return Err(
                FsError::invalid(format!("replica node {node_id} is not registered")).into(),
            );
        }
    }
    Ok(())
}

pub fn get_volume(storage: &NodeStorage, name: &str) -> NodeResult<Option<VolumeRecord>> {
    storage
        .state
        .get::<VolumeRecord>(&keys::volume(name), "volume")
}

pub fn list_volumes(storage: &NodeStorage) -> NodeResult<Vec<VolumeRecord>> {
    list(storage, keys::TAG_VOLUME, VOLUME_COUNT_MAX, "volume")
}

pub fn get_node(storage: &NodeStorage, node_id: u64) -> NodeResult<Option<NodeRecord>> {
    storage
        .state
        .get::<NodeRecord>(&keys::node(node_id), "node")
}

pub fn list_nodes(storage: &NodeStorage) -> NodeResult<Vec<NodeRecord>> {
    list(storage, keys::TAG_NODE, NODE_COUNT_MAX, "node")
}

pub fn get_container(
    storage: &NodeStorage,
    container_id: u64,
) -> NodeResult<Option<ContainerRecord>> {
    storage
        .state
        .get::<ContainerRecord>(&keys::container_record(container_id), "container record")
}

pub fn list_containers(storage: &NodeStorage) -> NodeResult<Vec<ContainerRecord>> {
    list(
        storage,
        keys::TAG_CONTAINER_RECORD,
        VOLUME_COUNT_MAX,
        "container record",
    )
}

fn list<T: serde::de::DeserializeOwned>(
    storage: &NodeStorage,
    tag: u8,
    count_max: usize,
    what: &str,
) -> NodeResult<Vec<T>> {
    let start = vec![tag];
    let end = keys::prefix_end(&start);
    storage
        .state
        .scan_collect(&start, &end, count_max)?
        .into_iter()
        .map(|(_, value)| decode::<T>(&value, what))
        .collect()
}
