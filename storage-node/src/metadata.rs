//! The metadata state machine (container 0): the volumes of the cluster and the container each
//! one lives in. Later also nodes, labels and replica placement (the cluster map).
//!
//! Owns: the meaning of every [`MetadataCommand`] and volume lookups.
//! Must not depend on: filesystem internals. Starting and stopping the container of a volume is
//! the node's job (`node.rs`); this module only records the decision.

use ballast_common::validate_volume_name;

use crate::command::{CommandResponse, MetadataCommand};
use crate::error::{FsError, NodeResult};
use crate::keys;
use crate::records::{encode, VolumeRecord};
use crate::storage::NodeStorage;
use crate::transaction::Transaction;
use crate::types::FIRST_VOLUME_CONTAINER_ID;

/// Most volumes one node records (bounds listings and the container count per node).
pub const VOLUME_COUNT_MAX: usize = 4096;

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
        } => {
            validate_volume_name(&name)
                .map_err(|error| FsError::invalid(format!("volume name: {error}")))?;
            if replication_factor != 1 {
                return Err(FsError::invalid(format!(
                    "replication factor {replication_factor} needs a cluster; this node serves rf=1 only"
                ))
                .into());
            }
            if replication_minimum == 0 || replication_minimum > replication_factor {
                return Err(FsError::invalid(format!(
                    "replication minimum {replication_minimum} must be between 1 and the replication factor"
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
                name,
                volume_id,
                container_id,
                quota_bytes,
                replication_factor,
                replication_minimum,
                created_ns: now_ns,
            };
            transaction.batch().put(key, encode(&record));
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
    }
}

pub fn get_volume(storage: &NodeStorage, name: &str) -> NodeResult<Option<VolumeRecord>> {
    storage
        .state
        .get::<VolumeRecord>(&keys::volume(name), "volume")
}

pub fn list_volumes(storage: &NodeStorage) -> NodeResult<Vec<VolumeRecord>> {
    let start = vec![keys::TAG_VOLUME];
    let end = keys::prefix_end(&start);
    storage
        .state
        .scan_collect(&start, &end, VOLUME_COUNT_MAX)?
        .into_iter()
        .map(|(_, value)| crate::records::decode::<VolumeRecord>(&value, "volume"))
        .collect()
}
