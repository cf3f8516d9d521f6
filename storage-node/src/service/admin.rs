//! The `Admin` service: volumes and node status.

use std::sync::Arc;

use ballast_proto::v1 as proto;
use ballast_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::node_status;
use crate::filesystem::container_state;
use crate::metadata;
use crate::node::StorageNode;
use crate::records::VolumeRecord;

#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<StorageNode>,
}

impl AdminService {
    pub fn new(node: Arc<StorageNode>) -> Self {
        Self { node }
    }

    fn volume_message(&self, volume: &VolumeRecord) -> proto::Volume {
        let state = container_state(self.node.storage(), volume.container_id).unwrap_or_default();
        proto::Volume {
            name: volume.name.clone(),
            volume_id: volume.volume_id,
            quota_bytes: volume.quota_bytes,
            used_bytes: state.used_block_count * ballast_device::BLOCK_SIZE_BYTES as u64,
            replication_factor: volume.replication_factor,
            replication_minimum: volume.replication_minimum,
            container_id: volume.container_id,
            inode_count: state.inode_count,
            created_ns: volume.created_ns.max(0) as u64,
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::Volume>, Status> {
        let request = request.into_inner();
        let replication_factor = if request.replication_factor == 0 {
            1
        } else {
            request.replication_factor
        };
        let replication_minimum = if request.replication_minimum == 0 {
            1
        } else {
            request.replication_minimum
        };
        let volume = self
            .node
            .create_volume(
                &request.name,
                request.quota_bytes,
                replication_factor,
                replication_minimum,
            )
            .await
            .map_err(node_status)?;
        Ok(Response::new(self.volume_message(&volume)))
    }

    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        self.node
            .delete_volume(&request.into_inner().name)
            .await
            .map_err(node_status)?;
        Ok(Response::new(proto::DeleteVolumeResponse {}))
    }

    async fn list_volumes(
        &self,
        _request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let volumes = metadata::list_volumes(self.node.storage()).map_err(node_status)?;
        Ok(Response::new(proto::ListVolumesResponse {
            volumes: volumes
                .iter()
                .map(|volume| self.volume_message(volume))
                .collect(),
        }))
    }

    async fn get_volume(
        &self,
        request: Request<proto::GetVolumeRequest>,
    ) -> Result<Response<proto::Volume>, Status> {
        let volume = self
            .node
            .volume(&request.into_inner().name)
            .map_err(node_status)?;
        Ok(Response::new(self.volume_message(&volume)))
    }

    async fn resize_volume(
        &self,
        request: Request<proto::ResizeVolumeRequest>,
    ) -> Result<Response<proto::Volume>, Status> {
        let request = request.into_inner();
        let volume = self
            .node
            .resize_volume(&request.name, request.quota_bytes)
            .await
            .map_err(node_status)?;
        Ok(Response::new(self.volume_message(&volume)))
    }

    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let node = &self.node;
        let superblock = node.device().superblock();
        let volumes = metadata::list_volumes(node.storage()).map_err(node_status)?;
        let mut containers = Vec::new();
        for (container_id, raft) in node.container_rafts().await {
            let metrics = raft.metrics().borrow().clone();
            let volume_name = volumes
                .iter()
                .find(|volume| volume.container_id == container_id)
                .map(|volume| volume.name.clone())
                .unwrap_or_else(|| "(metadata)".to_owned());
            containers.push(proto::ContainerStatus {
                container_id,
                volume_name,
                leader_node_id: metrics.current_leader.unwrap_or(0),
                last_applied_index: metrics.last_applied.map(|log_id| log_id.index).unwrap_or(0),
                last_log_index: metrics.last_log_index.unwrap_or(0),
                member_count: metrics.membership_config.membership().voter_ids().count() as u32,
            });
        }
        Ok(Response::new(proto::StatusResponse {
            node_id: node.node_id(),
            device_path: node.config().device_path.display().to_string(),
            format_version: superblock.format_version,
            device_size_bytes: superblock.device_size_bytes,
            data_block_count: superblock.data_block_count,
            data_block_free_count: node.storage().free_block_count(),
            log_region_size_bytes: superblock.log_region_size_bytes,
            log_used_bytes: node.log_store().used_bytes(),
            container_count: containers.len() as u32,
            volume_count: volumes.len() as u32,
            uptime_ms: node.uptime().as_millis() as u64,
            checksum_error_count: node.storage().checksum_error_count(),
            containers,
        }))
    }
}
