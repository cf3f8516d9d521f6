//! The node-to-node services (`proto/cluster.proto`): `RaftTransport`, the receiving side of
//! `raft_network`, and `Cluster` (join, container initialisation, forwarded proposals).
//!
//! Owns: decoding peer messages defensively (a malformed payload is `InvalidArgument`, never a
//! panic) and routing them to the right container's Raft group.
//! Must not contain cluster logic: that is `cluster.rs` and `node.rs`.
//!
//! A Raft message for a container this node does not run yet starts the replica on demand when
//! the local cluster map places it here; otherwise the sender is told `Unavailable` and retries.

use std::sync::Arc;

use ballast_proto::cluster_v1 as proto;
use ballast_proto::cluster_v1::cluster_server::Cluster;
use ballast_proto::cluster_v1::raft_transport_server::RaftTransport;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::node_status;
use crate::command::Command;
use crate::error::NodeError;
use crate::metadata;
use crate::node::StorageNode;
use crate::quiescence;
use crate::types::{NodeId, Raft, TypeConfig};

#[derive(Debug, Clone)]
pub struct RaftTransportService {
    node: Arc<StorageNode>,
}

impl RaftTransportService {
    pub fn new(node: Arc<StorageNode>) -> Self {
        Self { node }
    }

    async fn raft(&self, container_id: u64) -> Result<Raft, Status> {
        if let Some(raft) = self.node.raft(container_id).await {
            return Ok(raft);
        }
        let record = metadata::get_container(self.node.storage(), container_id)
            .map_err(node_status)?
            .filter(|record| record.holds(self.node.node_id()))
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "container {container_id} is not placed on node {} (yet)",
                    self.node.node_id()
                ))
            })?;
        self.node.start_replica(&record).await.map_err(node_status)
    }
}

fn decode<T: DeserializeOwned>(message: &proto::RaftMessage, what: &str) -> Result<T, Status> {
    postcard::from_bytes(&message.payload).map_err(|error| {
        Status::invalid_argument(format!(
            "malformed {what} for container {}: {error}",
            message.container_id
        ))
    })
}

fn encode<T: Serialize>(
    container_id: u64,
    value: &T,
) -> Result<Response<proto::RaftMessage>, Status> {
    let payload = postcard::to_allocvec(value)
        .map_err(|error| Status::internal(format!("encode Raft reply: {error}")))?;
    Ok(Response::new(proto::RaftMessage {
        container_id,
        payload: payload.into(),
        snapshot_data: Default::default(),
    }))
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(
        &self,
        request: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftMessage>, Status> {
        let started = std::time::Instant::now();
        let message = request.into_inner();
        let append: AppendEntriesRequest<TypeConfig> = decode(&message, "append entries")?;
        let decoded = started.elapsed();
        let entry_count = append.entries.len();
        let raft = self.raft(message.container_id).await?;
        let result = raft.append_entries(append).await;
        tracing::debug!(
            target: "ballast::timing",
            container = message.container_id,
            entry_count,
            payload_bytes = message.payload.len(),
            decode_us = decoded.as_micros() as u64,
            append_us = (started.elapsed() - decoded).as_micros() as u64,
            "append entries handled"
        );
        // Handled (so the replica's leader lease is fresh): a paused election timer may resume.
        if let Some(change) = self
            .node
            .quiescence()
            .on_append_entries(message.container_id)
        {
            quiescence::apply_changes(&self.node, vec![change]).await;
        }
        encode(message.container_id, &result)
    }

    async fn vote(
        &self,
        request: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftMessage>, Status> {
        let message = request.into_inner();
        let vote: VoteRequest<NodeId> = decode(&message, "vote")?;
        let raft = self.raft(message.container_id).await?;
        let result = raft.vote(vote).await;
        encode(message.container_id, &result)
    }

    async fn install_snapshot(
        &self,
        request: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftMessage>, Status> {
        let message = request.into_inner();
        let mut chunk: InstallSnapshotRequest<TypeConfig> = decode(&message, "snapshot chunk")?;
        if !message.snapshot_data.is_empty() {
            if !chunk.data.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk for container {} carries data twice",
                    message.container_id
                )));
            }
            chunk.data = message.snapshot_data.to_vec();
        }
        if chunk.data.len() > crate::snapshot_spool::RECEIVE_CHUNK_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "snapshot chunk for container {} holds {} bytes, more than {}",
                message.container_id,
                chunk.data.len(),
                crate::snapshot_spool::RECEIVE_CHUNK_BYTES_MAX
            )));
        }
        let raft = self.raft(message.container_id).await?;
        // Run to the end even if the sender gives up on this RPC (its deadline, a dropped
        // connection): a chunk handled halfway would leave openraft's receiving offset and the
        // snapshot data apart, and a last chunk dropped during its install would throw the whole
        // transfer away. openraft handles one chunk of a container at a time, so a resent chunk
        // waits for this one.
        let result = tokio::spawn(async move { raft.install_snapshot(chunk).await })
            .await
            .map_err(|error| {
                Status::internal(format!(
                    "snapshot chunk for container {}: {error}",
                    message.container_id
                ))
            })?;
        encode(message.container_id, &result)
    }

    async fn node_heartbeat(
        &self,
        request: Request<proto::NodeHeartbeatRequest>,
    ) -> Result<Response<proto::NodeHeartbeatResponse>, Status> {
        let request = request.into_inner();
        if request.groups.len() > NODE_HEARTBEAT_GROUP_COUNT_MAX {
            return Err(Status::invalid_argument(format!(
                "node heartbeat lists {} groups, more than {NODE_HEARTBEAT_GROUP_COUNT_MAX}",
                request.groups.len()
            )));
        }
        let mut views = std::collections::HashMap::new();
        for group in &request.groups {
            if let Some(raft) = self.node.raft(group.container_id).await {
                views.insert(
                    group.container_id,
                    quiescence::GroupView::of(group.container_id, &raft),
                );
            }
        }
        let (acknowledged, changes) = self.node.quiescence().on_node_heartbeat(
            request.from_node_id,
            &request.groups,
            &views,
            std::time::Instant::now(),
        );
        quiescence::apply_changes(&self.node, changes).await;
        let draining = crate::metadata::get_node(self.node.storage(), self.node.node_id())
            .ok()
            .flatten()
            .is_none_or(|record| record.draining);
        // A node short of device space would refuse the writes of a group it took over.
        let unwilling = draining || self.node.storage().short_of_space();
        let takeover = self
            .node
            .quiescence()
            .choose_takeover(
                request.from_node_id,
                request.leader_count,
                request.short_of_space,
                unwilling,
                std::time::Instant::now(),
            )
            // A replica restarted after a fatal error does not campaign, not even to balance.
            .filter(|container_id| !self.node.election_held(*container_id));
        if let Some(container_id) = takeover {
            let node = Arc::clone(&self.node);
            let (own, theirs) = (node.quiescence().leader_count(), request.leader_count);
            tokio::spawn(async move {
                let Some(raft) = node.raft(container_id).await else {
                    return;
                };
                tracing::info!(
                    container = container_id,
                    from_node = request.from_node_id,
                    leaders_here = own,
                    leaders_there = theirs,
                    leader_short_of_space = request.short_of_space,
                    "taking over leadership of a quiet group to balance leaders"
                );
                if let Err(error) = raft.trigger().elect().await {
                    tracing::debug!(container = container_id, %error, "election trigger");
                }
            });
        }
        Ok(Response::new(proto::NodeHeartbeatResponse {
            acknowledged_container_ids: acknowledged,
        }))
    }
}

/// Most groups one node heartbeat may list: far above any node's container count, low enough
/// that a malformed request cannot make the receiver do unbounded work.
const NODE_HEARTBEAT_GROUP_COUNT_MAX: usize = 100_000;

#[derive(Debug, Clone)]
pub struct ClusterService {
    node: Arc<StorageNode>,
}

impl ClusterService {
    pub fn new(node: Arc<StorageNode>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn join(
        &self,
        request: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        let forwarded = request.metadata().get("ballast-forwarded").is_some();
        crate::cluster::handle_join(&self.node, request.into_inner(), forwarded)
            .await
            .map(Response::new)
            .map_err(node_status)
    }

    async fn initialize_container(
        &self,
        request: Request<proto::InitializeContainerRequest>,
    ) -> Result<Response<proto::InitializeContainerResponse>, Status> {
        let container_id = request.into_inner().container_id;
        let leader_node_id = self
            .node
            .initialize_container(container_id)
            .await
            .map_err(node_status)?;
        Ok(Response::new(proto::InitializeContainerResponse {
            leader_node_id,
        }))
    }

    async fn propose(
        &self,
        request: Request<proto::ProposeRequest>,
    ) -> Result<Response<proto::ProposeResponse>, Status> {
        let request = request.into_inner();
        let command: Command = postcard::from_bytes(&request.command).map_err(|error| {
            Status::invalid_argument(format!("malformed forwarded command: {error}"))
        })?;
        // Deterministic failures travel inside the response, so the forwarding node reports
        // exactly what a local proposal would.
        let response = match self.node.propose(request.container_id, command).await {
            Ok(response) => response,
            Err(NodeError::Fs(error)) => crate::command::CommandResponse::Failed(error),
            Err(error) => return Err(node_status(error)),
        };
        Ok(Response::new(proto::ProposeResponse {
            response: crate::records::encode(&response).into(),
        }))
    }

    async fn change_replicas(
        &self,
        request: Request<proto::ChangeReplicasRequest>,
    ) -> Result<Response<proto::ChangeReplicasResponse>, Status> {
        let request = request.into_inner();
        let voter_ids = request.voter_ids.into_iter().collect();
        self.node
            .change_replicas(request.container_id, &voter_ids)
            .await
            .map_err(node_status)?;
        Ok(Response::new(proto::ChangeReplicasResponse {}))
    }

    async fn report_failing_replica(
        &self,
        request: Request<proto::ReportFailingReplicaRequest>,
    ) -> Result<Response<proto::ReportFailingReplicaResponse>, Status> {
        let request = request.into_inner();
        if request.reason.len() > crate::cluster::REPORT_REASON_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "failure reason of {} bytes, more than {}",
                request.reason.len(),
                crate::cluster::REPORT_REASON_BYTES_MAX
            )));
        }
        let leads_metadata = self.node.metadata_leading_for().is_some();
        tracing::warn!(
            container = request.container_id,
            node = request.node_id,
            failures_in_a_row = request.failures_in_a_row,
            reason = %request.reason,
            leads_metadata,
            "a node reports its replica keeps failing"
        );
        // Kept even by a follower: it may lead next, and the mover only reads it when leading.
        self.node
            .record_failing_replica(request.container_id, request.node_id);
        Ok(Response::new(proto::ReportFailingReplicaResponse {
            leads_metadata,
        }))
    }

    async fn read_block(
        &self,
        request: Request<proto::ReadBlockRequest>,
    ) -> Result<Response<proto::ReadBlockResponse>, Status> {
        crate::scrub::serve_block(&self.node, &request.into_inner())
            .await
            .map(Response::new)
            .map_err(node_status)
    }
}
