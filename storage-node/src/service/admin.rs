//! The `Admin` service: volumes and node status.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ballast_proto::v1 as proto;
use ballast_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::node_status;
use crate::error::NodeError;
use crate::filesystem::container_state;
use crate::metadata;
use crate::node::StorageNode;
use crate::records::VolumeRecord;

/// Replicas of a volume that does not ask for a number.
const DEFAULT_REPLICATION_FACTOR: u32 = 3;
/// `LeadVolume` with no timeout waits this long for the group to go quiet.
const LEAD_TIMEOUT_MS_DEFAULT: u64 = 60_000;

#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<StorageNode>,
}

impl AdminService {
    pub fn new(node: Arc<StorageNode>) -> Self {
        Self { node }
    }

    async fn volume_message(&self, volume: &VolumeRecord) -> proto::Volume {
        let state = container_state(self.node.storage(), volume.container_id).unwrap_or_default();
        let record = metadata::get_container(self.node.storage(), volume.container_id)
            .ok()
            .flatten();
        let leader_node_id = match self.node.raft(volume.container_id).await {
            Some(raft) => raft.metrics().borrow().current_leader.unwrap_or(0),
            None => 0,
        };
        proto::Volume {
            replica_node_ids: record
                .as_ref()
                .map(|record| record.replicas.clone())
                .unwrap_or_default(),
            leader_node_id,
            retiring_node_ids: record
                .as_ref()
                .map(|record| record.retiring.clone())
                .unwrap_or_default(),
            node_selector: record
                .map(|record| record.node_selector.into_iter().collect())
                .unwrap_or_default(),
            labels: volume.labels.clone().into_iter().collect(),
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
        // The defaults: rf=3 (or every node of a smaller cluster), and a majority of it.
        let node_count = metadata::list_nodes(self.node.storage())
            .map_err(node_status)?
            .len()
            .max(1) as u32;
        let replication_factor = match request.replication_factor {
            0 => node_count.min(DEFAULT_REPLICATION_FACTOR),
            explicit => explicit,
        };
        let replication_minimum = match request.replication_minimum {
            0 => replication_factor / 2 + 1,
            explicit => explicit,
        };
        let volume = self
            .node
            .create_volume(
                &request.name,
                request.quota_bytes,
                replication_factor,
                replication_minimum,
                request.node_selector.into_iter().collect(),
                request.labels.into_iter().collect(),
            )
            .await
            .map_err(node_status)?;
        Ok(Response::new(self.volume_message(&volume).await))
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
        let mut messages = Vec::with_capacity(volumes.len());
        for volume in &volumes {
            messages.push(self.volume_message(volume).await);
        }
        Ok(Response::new(proto::ListVolumesResponse {
            volumes: messages,
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
        Ok(Response::new(self.volume_message(&volume).await))
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
        Ok(Response::new(self.volume_message(&volume).await))
    }

    async fn volume_digest(
        &self,
        request: Request<proto::VolumeDigestRequest>,
    ) -> Result<Response<proto::VolumeDigestResponse>, Status> {
        let volume = self
            .node
            .volume(&request.into_inner().name)
            .map_err(node_status)?;
        if self.node.raft(volume.container_id).await.is_none() {
            return Err(node_status(crate::error::NodeError::UnknownContainer {
                container_id: volume.container_id,
            }));
        }
        let (digest, content_bytes, state) =
            crate::snapshot::digest(self.node.storage(), volume.container_id)
                .await
                .map_err(node_status)?;
        Ok(Response::new(proto::VolumeDigestResponse {
            container_id: volume.container_id,
            applied_index: state.last_applied.map(|log_id| log_id.index).unwrap_or(0),
            digest,
            content_bytes,
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        // Only the metadata leader sees every node's replication progress (up or down): send the
        // client there when it is known; without a leader, answer with this node's view.
        if let Some(raft) = self.node.raft(crate::types::METADATA_CONTAINER_ID).await {
            let metrics = raft.metrics().borrow().clone();
            if let Some(leader) = metrics
                .current_leader
                .filter(|&leader| leader != self.node.node_id())
            {
                if let Some(leader_node) = metrics.membership_config.membership().get_node(&leader)
                {
                    return Err(node_status(crate::error::NodeError::NotLeader {
                        container_id: crate::types::METADATA_CONTAINER_ID,
                        leader_address: Some(leader_node.addr.clone()),
                    }));
                }
            }
        }
        let storage = self.node.storage();
        let nodes = metadata::list_nodes(storage).map_err(node_status)?;
        let containers = metadata::list_containers(storage).map_err(node_status)?;
        let metadata_metrics = self
            .node
            .raft(crate::types::METADATA_CONTAINER_ID)
            .await
            .map(|raft| raft.metrics().borrow().clone());
        let mut leaders = std::collections::BTreeMap::<u64, u32>::new();
        for (_, raft) in self.node.container_rafts().await {
            if let Some(leader) = raft.metrics().borrow().current_leader {
                *leaders.entry(leader).or_default() += 1;
            }
        }
        let block_size = ballast_device::BLOCK_SIZE_BYTES as u64;
        let leads_metadata = metadata_metrics
            .as_ref()
            .is_some_and(|metrics| metrics.current_leader == Some(self.node.node_id()));
        let faults = crate::mover::faults(&self.node, &nodes);
        let down = &faults.down_nodes;
        let messages = nodes
            .iter()
            .map(|node| {
                let (role, state) = match &metadata_metrics {
                    Some(metrics) => {
                        let membership = metrics.membership_config.membership();
                        let role = if membership.voter_ids().any(|id| id == node.node_id) {
                            "voter"
                        } else if membership.learner_ids().any(|id| id == node.node_id) {
                            "learner"
                        } else {
                            "removed"
                        };
                        // The metadata leader hears from every node; other nodes only know
                        // themselves and the leader.
                        // "down": silent past the grace period (its replicas are re-created
                        // elsewhere); "unreachable": silent, still within it.
                        let state = if node.node_id == self.node.node_id()
                            || metrics.current_leader == Some(node.node_id)
                        {
                            "up"
                        } else if !leads_metadata {
                            "unknown"
                        } else if down.contains(&node.node_id) {
                            "down"
                        } else if self
                            .node
                            .in_contact(crate::types::METADATA_CONTAINER_ID, node.node_id)
                        {
                            "up"
                        } else {
                            "unreachable"
                        };
                        (role, state)
                    }
                    None => ("unknown", "unknown"),
                };
                proto::NodeInfo {
                    node_id: node.node_id,
                    address: node.address.clone(),
                    labels: node.labels.clone().into_iter().collect(),
                    metadata_role: role.to_owned(),
                    state: state.to_owned(),
                    capacity_bytes: node.data_block_count * block_size,
                    free_bytes: if node.node_id == self.node.node_id() {
                        storage.free_block_count() * block_size
                    } else {
                        node.data_block_free_count * block_size
                    },
                    container_ids: containers
                        .iter()
                        .filter(|container| container.holds(node.node_id))
                        .map(|container| container.container_id)
                        .collect(),
                    leader_count: leaders.get(&node.node_id).copied().unwrap_or(0),
                    draining: node.draining,
                }
            })
            .collect();
        let container_degraded_count = containers
            .iter()
            .filter(|container| crate::placement::is_degraded(&nodes, container, &faults))
            .count() as u32;
        let settled = leads_metadata
            && container_degraded_count == 0
            && crate::placement::plan_move(
                &nodes,
                &containers,
                &faults,
                &self.node.config().move_policy,
            )
            .is_none();
        Ok(Response::new(proto::ListNodesResponse {
            nodes: messages,
            container_count: containers.len() as u32,
            container_degraded_count,
            settled,
            down_grace_ms: self.node.config().down_grace_ms,
        }))
    }

    async fn drain_node(
        &self,
        request: Request<proto::DrainNodeRequest>,
    ) -> Result<Response<proto::DrainNodeResponse>, Status> {
        let request = request.into_inner();
        self.node
            .set_node_draining(request.node_id, request.draining)
            .await
            .map_err(node_status)?;
        Ok(Response::new(proto::DrainNodeResponse {}))
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
                quiesced: node.quiescence().is_quiesced(container_id),
                term: metrics.current_term,
            });
        }
        let (detached_record_count, detached_pinned_block_count) = node.storage().pinned_counts();
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
            scrub: Some(crate::scrub::status_message(node.scrubber())),
            detached_record_count: detached_record_count as u64,
            detached_pinned_block_count,
            fsync_request_count: node
                .sync_counters()
                .fsync_request_count
                .load(Ordering::Relaxed),
            durable_write_count: node
                .sync_counters()
                .durable_write_count
                .load(Ordering::Relaxed),
            device_sync_count: {
                let statistics = node.device().engine().statistics();
                statistics.flushes + statistics.durable_writes
            },
            shared_region_count: node.shared_regions().attached_count() as u32,
            shared_read_count: node.shared_regions().read_count(),
            shared_write_count: node.shared_regions().write_count(),
            local_socket_path: node
                .shared_regions()
                .socket_path()
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
            local_frames: node.shared_regions().serves_local_requests(),
            local_request_count: node.shared_regions().local_request_count(),
        }))
    }

    async fn scrub(
        &self,
        request: Request<proto::ScrubRequest>,
    ) -> Result<Response<proto::ScrubResponse>, Status> {
        let rate_bytes_per_second = request.into_inner().rate_bytes_per_second;
        // In its own task: a caller that gives up waiting does not cut the pass short.
        let node = Arc::clone(&self.node);
        let report = tokio::spawn(async move {
            crate::scrub::run_pass(
                &node,
                rate_bytes_per_second,
                crate::scrub::PassKind::OnDemand,
            )
            .await
        })
        .await
        .map_err(|error| Status::internal(format!("scrub task: {error}")))?
        .map_err(node_status)?;
        Ok(Response::new(proto::ScrubResponse {
            pass: Some(report.into()),
        }))
    }

    async fn lead_volume(
        &self,
        request: Request<proto::LeadVolumeRequest>,
    ) -> Result<Response<proto::LeadVolumeResponse>, Status> {
        let request = request.into_inner();
        let volume = metadata::get_volume(self.node.storage(), &request.name)
            .map_err(node_status)?
            .ok_or_else(|| {
                node_status(NodeError::UnknownVolume {
                    name: request.name.clone(),
                })
            })?;
        let timeout_ms = match request.timeout_ms {
            0 => LEAD_TIMEOUT_MS_DEFAULT,
            timeout_ms => timeout_ms,
        };
        let handover = crate::handover::take_leadership(
            &self.node,
            volume.container_id,
            std::time::Duration::from_millis(timeout_ms),
        )
        .await
        .map_err(node_status)?;
        Ok(Response::new(proto::LeadVolumeResponse {
            waited_ms: u64::try_from(handover.waited.as_millis()).unwrap_or(u64::MAX),
            election_count: handover.election_count,
        }))
    }
}
