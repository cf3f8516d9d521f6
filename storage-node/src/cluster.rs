//! Cluster membership and container reconciliation of one node.
//!
//! Owns: joining a cluster (and re-registering on every start), the metadata leader's handling of
//! a join (register the node, add it to the metadata group), forwarding proposals and container
//! initialisation to other nodes, and the reconcile loop that makes the containers running here
//! match the cluster map.
//! Must not depend on: the gRPC services (they call in here); the Raft transport is
//! `raft_network`.
//!
//! The metadata group has at most [`METADATA_VOTER_COUNT_MAX`] voters; every further node joins
//! it as a learner, so every node has a local, eventually consistent copy of the cluster map for
//! routing and reconciliation, while writes to it stay cheap.
//!
//! Invariants:
//! - Every loop here is bounded in attempts or paced by a fixed interval.
//! - A node joins only with the cluster's join secret, and a node id stays bound to its device.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::cluster_v1 as proto;
use ballast_proto::cluster_v1::cluster_client::ClusterClient;
use openraft::{BasicNode, ChangeMembers};
use tonic::transport::Channel;

use crate::command::{Command, CommandResponse, MetadataCommand};
use crate::error::{NodeError, NodeResult};
use crate::node::StorageNode;
use crate::records::{NodeRecord, ROOT_INODE};
use crate::types::{NodeId, METADATA_CONTAINER_ID};
use crate::{filesystem, metadata};

/// Voters of the metadata group; further nodes are learners.
pub const METADATA_VOTER_COUNT_MAX: usize = 3;
/// How often the reconcile loop runs.
const RECONCILE_INTERVAL_MS: u64 = 500;
/// How often a node compares its free blocks with its cluster map record.
const FREE_SPACE_REPORT_INTERVAL_MS: u64 = 2_000;
/// How often, and how many times, a starting node tries to (re-)register with the cluster.
const JOIN_RETRY_INTERVAL_MS: u64 = 1_000;
const JOIN_ATTEMPT_COUNT_MAX: u32 = 3_600;
/// Limit on one forwarded call to another node.
const FORWARD_TIMEOUT_MS: u64 = 30_000;
/// Metadata key marking a join already forwarded once (a join is forwarded at most once).
const FORWARDED_METADATA_KEY: &str = "ballast-forwarded";

fn cluster_client(node: &StorageNode, address: &str) -> NodeResult<ClusterClient<Channel>> {
    let channel = node
        .peers
        .channel(address)
        .map_err(|error| NodeError::Cluster(format!("address {address:?}: {error}")))?;
    Ok(ClusterClient::new(channel)
        .max_decoding_message_size(crate::raft_network::RAFT_MESSAGE_SIZE_BYTES_MAX)
        .max_encoding_message_size(crate::raft_network::RAFT_MESSAGE_SIZE_BYTES_MAX))
}

/// Turns a status from another node back into the error it stood for.
fn error_from_status(status: tonic::Status, container_id: u64) -> NodeError {
    if let Some(address) = status
        .metadata()
        .get(ballast_proto::LEADER_METADATA_KEY)
        .and_then(|value| value.to_str().ok())
    {
        return NodeError::NotLeader {
            container_id,
            leader_address: Some(address.to_owned()),
        };
    }
    if status
        .metadata()
        .get(ballast_proto::NOT_APPLIED_METADATA_KEY)
        .is_some()
    {
        return NodeError::NotLeader {
            container_id,
            leader_address: None,
        };
    }
    match status.code() {
        tonic::Code::PermissionDenied => NodeError::Cluster(status.message().to_owned()),
        _ => NodeError::Raft(format!("forwarded call: {}", status.message())),
    }
}

/// Sends a proposal to the node at `address`, which proposes it only if it leads the container.
pub async fn forward_proposal(
    node: &StorageNode,
    address: &str,
    container_id: u64,
    command: &Command,
) -> NodeResult<CommandResponse> {
    let mut client = cluster_client(node, address)?;
    let mut request = tonic::Request::new(proto::ProposeRequest {
        container_id,
        command: postcard::to_allocvec(command)
            .map_err(|source| NodeError::codec("encode forwarded command", source))?
            .into(),
    });
    request.set_timeout(Duration::from_millis(FORWARD_TIMEOUT_MS));
    let reply = client
        .propose(request)
        .await
        .map_err(|status| error_from_status(status, container_id))?
        .into_inner();
    crate::records::decode::<CommandResponse>(&reply.response, "forwarded command response")
}

/// Asks the node at `address` (which must lead the container) to make its voters `voter_ids`.
pub async fn forward_change_replicas(
    node: &StorageNode,
    address: &str,
    container_id: u64,
    voter_ids: &BTreeSet<NodeId>,
) -> NodeResult<()> {
    let mut client = cluster_client(node, address)?;
    let mut request = tonic::Request::new(proto::ChangeReplicasRequest {
        container_id,
        voter_ids: voter_ids.iter().copied().collect(),
    });
    request.set_timeout(Duration::from_millis(
        crate::mover::CATCH_UP_TIMEOUT_MS + FORWARD_TIMEOUT_MS,
    ));
    client
        .change_replicas(request)
        .await
        .map_err(|status| error_from_status(status, container_id))?;
    Ok(())
}

/// Limit on one failing-replica report (it is sent from the reconcile loop, which must go on).
const REPORT_TIMEOUT_MS: u64 = 5_000;
/// Longest failure reason a report carries (the rest is cut).
pub const REPORT_REASON_BYTES_MAX: usize = 1_024;

/// Tells the metadata leader that this node's replica of `container_id` failed
/// `failures_in_a_row` times in a row, so its mover replaces it (`failing_replicas.rs`). Best
/// effort: a report that does not arrive is made again on the next failure.
pub async fn report_failing_replica(
    node: &StorageNode,
    container_id: u64,
    failures_in_a_row: u32,
    reason: &str,
) {
    let Some(raft) = node.raft(METADATA_CONTAINER_ID).await else {
        return;
    };
    let metrics = raft.metrics().borrow().clone();
    let Some(leader) = metrics.current_leader else {
        tracing::warn!(
            container = container_id,
            "replica keeps failing; no metadata leader known to report it to"
        );
        return;
    };
    tracing::warn!(
        container = container_id,
        failures_in_a_row,
        metadata_leader = leader,
        "replica keeps failing; reporting it for replacement"
    );
    if leader == node.node_id {
        node.record_failing_replica(container_id, node.node_id);
        return;
    }
    let Some(address) = metrics
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|leader_node| leader_node.addr.clone())
    else {
        return;
    };
    let mut reason = reason.to_owned();
    if reason.len() > REPORT_REASON_BYTES_MAX {
        let mut end = REPORT_REASON_BYTES_MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let sent = async {
        let mut client = cluster_client(node, &address)?;
        let mut request = tonic::Request::new(proto::ReportFailingReplicaRequest {
            container_id,
            node_id: node.node_id,
            failures_in_a_row,
            reason,
        });
        request.set_timeout(Duration::from_millis(REPORT_TIMEOUT_MS));
        client
            .report_failing_replica(request)
            .await
            .map_err(|status| error_from_status(status, METADATA_CONTAINER_ID))
    };
    match tokio::time::timeout(Duration::from_millis(REPORT_TIMEOUT_MS), sent).await {
        Ok(Ok(response)) if response.get_ref().leads_metadata => {}
        Ok(Ok(_)) => tracing::info!(
            container = container_id,
            %address,
            "failing replica reported to a node that no longer leads the metadata group"
        ),
        Ok(Err(error)) => {
            tracing::warn!(container = container_id, %address, %error, "failing replica not reported")
        }
        Err(_) => tracing::warn!(
            container = container_id,
            %address,
            "failing replica report timed out"
        ),
    }
}

/// Asks the bootstrap node of a new container to initialise it.
pub async fn initialize_remote_container(
    node: &StorageNode,
    bootstrap_node_id: NodeId,
    container_id: u64,
) -> NodeResult<NodeId> {
    let record = metadata::get_node(&node.storage, bootstrap_node_id)?.ok_or_else(|| {
        NodeError::Cluster(format!(
            "bootstrap node {bootstrap_node_id} is not registered"
        ))
    })?;
    let mut client = cluster_client(node, &record.address)?;
    let mut request = tonic::Request::new(proto::InitializeContainerRequest { container_id });
    request.set_timeout(Duration::from_millis(FORWARD_TIMEOUT_MS));
    let reply = client
        .initialize_container(request)
        .await
        .map_err(|status| error_from_status(status, container_id))?
        .into_inner();
    Ok(reply.leader_node_id)
}

/// Handles a join: on the metadata leader, registers the node and adds it to the metadata group;
/// elsewhere, forwards it (once) to the leader.
pub async fn handle_join(
    node: &Arc<StorageNode>,
    request: proto::JoinRequest,
    forwarded: bool,
) -> NodeResult<proto::JoinResponse> {
    if !constant_time_equal(
        request.join_secret.as_bytes(),
        node.config.join_secret.as_bytes(),
    ) {
        return Err(NodeError::Cluster(format!(
            "node {} presented a wrong join secret",
            request.node_id
        )));
    }
    let device_uuid: [u8; 16] = request.device_uuid.as_ref().try_into().map_err(|_| {
        NodeError::Cluster(format!(
            "device uuid of node {} has {} bytes, not 16",
            request.node_id,
            request.device_uuid.len()
        ))
    })?;
    let raft = node
        .raft(METADATA_CONTAINER_ID)
        .await
        .ok_or(NodeError::UnknownContainer {
            container_id: METADATA_CONTAINER_ID,
        })?;
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader != Some(node.node_id) {
        let leader_address = metrics.current_leader.and_then(|leader| {
            metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|leader_node| leader_node.addr.clone())
        });
        let Some(address) = leader_address.clone().filter(|_| !forwarded) else {
            return Err(NodeError::NotLeader {
                container_id: METADATA_CONTAINER_ID,
                leader_address,
            });
        };
        let mut client = cluster_client(node, &address)?;
        let mut forward = tonic::Request::new(request);
        forward.metadata_mut().insert(
            FORWARDED_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        forward.set_timeout(Duration::from_millis(FORWARD_TIMEOUT_MS));
        return client
            .join(forward)
            .await
            .map(|reply| reply.into_inner())
            .map_err(|status| error_from_status(status, METADATA_CONTAINER_ID));
    }
    let record = NodeRecord {
        node_id: request.node_id,
        address: request.address.clone(),
        labels: request.labels.into_iter().collect(),
        device_uuid,
        data_block_count: request.data_block_count,
        data_block_free_count: request.data_block_free_count,
        registered_ns: node.now_ns(),
        draining: false,
    };
    node.propose(
        METADATA_CONTAINER_ID,
        Command::Metadata(MetadataCommand::RegisterNode(record)),
    )
    .await?;
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let known = membership.get_node(&request.node_id).cloned();
    if known.as_ref().map(|known| known.addr.as_str()) != Some(request.address.as_str()) {
        // New, or back under another address: (re-)add it as a learner with its address.
        raft.add_learner(
            request.node_id,
            BasicNode::new(request.address.clone()),
            true,
        )
        .await
        .map_err(|error| NodeError::Raft(format!("add learner {}: {error}", request.node_id)))?;
    }
    let mut voter = voters.contains(&request.node_id);
    if !voter && voters.len() < METADATA_VOTER_COUNT_MAX {
        raft.change_membership(
            ChangeMembers::AddVoterIds(BTreeSet::from([request.node_id])),
            false,
        )
        .await
        .map_err(|error| NodeError::Raft(format!("promote node {}: {error}", request.node_id)))?;
        voter = true;
    }
    tracing::info!(node = request.node_id, address = %request.address, voter, "node joined");
    Ok(proto::JoinResponse {
        leader_node_id: node.node_id,
        voter,
    })
}

fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// Registers this node with the cluster, through the configured join address or any known
/// metadata member, until it succeeds (bounded).
pub async fn join_loop(node: Arc<StorageNode>) {
    for attempt in 0..JOIN_ATTEMPT_COUNT_MAX {
        let mut targets: Vec<String> = node.config.join_address.iter().cloned().collect();
        if let Some(raft) = node.raft(METADATA_CONTAINER_ID).await {
            let metrics = raft.metrics().borrow().clone();
            for (member, member_node) in metrics.membership_config.membership().nodes() {
                if *member != node.node_id && !targets.contains(&member_node.addr) {
                    targets.push(member_node.addr.clone());
                }
            }
        }
        let superblock = node.device().superblock();
        let request = proto::JoinRequest {
            node_id: node.node_id,
            address: node.config.advertise_address.clone(),
            labels: node.config.labels.clone().into_iter().collect(),
            join_secret: node.config.join_secret.clone(),
            data_block_count: superblock.data_block_count,
            data_block_free_count: node.storage.free_block_count(),
            device_uuid: superblock.device_uuid.to_vec().into(),
        };
        for target in &targets {
            let result = if *target == node.config.advertise_address {
                handle_join(&node, request.clone(), false).await
            } else {
                match cluster_client(&node, target) {
                    Ok(mut client) => {
                        let mut call = tonic::Request::new(request.clone());
                        call.set_timeout(Duration::from_millis(FORWARD_TIMEOUT_MS));
                        client
                            .join(call)
                            .await
                            .map(|reply| reply.into_inner())
                            .map_err(|status| error_from_status(status, METADATA_CONTAINER_ID))
                    }
                    Err(error) => Err(error),
                }
            };
            match result {
                Ok(response) => {
                    tracing::info!(via = %target, leader = response.leader_node_id, voter = response.voter,
                        "registered with the cluster");
                    return;
                }
                Err(NodeError::Cluster(message)) => {
                    // A refusal (wrong secret, node id bound to another device) does not heal by
                    // retrying; say so loudly and keep serving what this node has.
                    tracing::error!(via = %target, "the cluster refused this node: {message}");
                    return;
                }
                Err(error) => {
                    if attempt % 10 == 0 {
                        tracing::warn!(via = %target, attempt, %error, "joining the cluster");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(JOIN_RETRY_INTERVAL_MS)).await;
    }
    tracing::error!("gave up joining the cluster after {JOIN_ATTEMPT_COUNT_MAX} attempts");
}

/// Keeps this node's free blocks in the cluster map current enough for placement and
/// `ballast node list` (`space::worth_reporting`): a change of 1 % of the device, or across the
/// short-of-space line, is proposed to the metadata group, checked every few seconds.
pub async fn free_space_report_loop(node: Arc<StorageNode>) {
    loop {
        tokio::time::sleep(Duration::from_millis(FREE_SPACE_REPORT_INTERVAL_MS)).await;
        let recorded = match metadata::get_node(&node.storage, node.node_id) {
            Ok(Some(recorded)) => recorded,
            Ok(None) => continue, // Not registered yet: the join reports the free space.
            Err(error) => {
                tracing::warn!(%error, "reading this node's record");
                continue;
            }
        };
        let free_blocks = node.storage.free_block_count();
        if !crate::space::worth_reporting(
            recorded.data_block_count,
            recorded.data_block_free_count,
            free_blocks,
        ) {
            continue;
        }
        let command = Command::Metadata(MetadataCommand::SetNodeFreeBlocks {
            node_id: node.node_id,
            data_block_free_count: free_blocks,
        });
        match node.propose_anywhere(METADATA_CONTAINER_ID, command).await {
            Ok(_) => tracing::debug!(free_blocks, "free space reported"),
            Err(error) => tracing::debug!(%error, "free space not reported; retrying"),
        }
    }
}

/// Makes the containers running here match the cluster map: starts replicas placed here, drops
/// replicas of deleted volumes and replicas moved away (once their move finished), and creates
/// the root directory of volumes whose group this node leads but which never got one.
pub async fn reconcile_loop(node: Arc<StorageNode>) {
    loop {
        tokio::time::sleep(Duration::from_millis(RECONCILE_INTERVAL_MS)).await;
        if let Err(error) = reconcile_once(&node).await {
            tracing::debug!(%error, "reconcile pass failed; retrying");
        }
    }
}

async fn reconcile_once(node: &Arc<StorageNode>) -> NodeResult<()> {
    node.restart_failed_containers().await;
    let records = metadata::list_containers(&node.storage)?;
    for record in &records {
        if !record.holds(node.node_id) {
            continue;
        }
        let raft = match node.raft(record.container_id).await {
            Some(raft) => raft,
            None => match node.start_replica(record).await {
                Ok(raft) => raft,
                Err(error) => {
                    tracing::debug!(container = record.container_id, %error, "replica not started");
                    continue;
                }
            },
        };
        let leads = raft.metrics().borrow().current_leader == Some(node.node_id);
        if leads && filesystem::get_inode(&node.storage, record.container_id, ROOT_INODE).is_err() {
            if let Ok(volume) = node.volume(&record.volume_name) {
                let command = crate::command::FilesystemCommand::Initialize {
                    volume_id: volume.volume_id,
                    quota_bytes: volume.quota_bytes,
                    now_ns: node.now_ns(),
                };
                node.propose(record.container_id, Command::Filesystem(command))
                    .await?;
            }
        }
    }
    let running: Vec<u64> = node
        .container_rafts()
        .await
        .into_iter()
        .map(|(container_id, _)| container_id)
        .filter(|container_id| *container_id != METADATA_CONTAINER_ID)
        .collect();
    for container_id in running {
        // A container starts here only after its record was seen, and the map only moves
        // forward, so a missing record means the volume was deleted.
        if !records
            .iter()
            .any(|record| record.container_id == container_id)
        {
            tracing::info!(
                container = container_id,
                "dropping the replica of a deleted volume"
            );
            node.drop_container(container_id).await?;
        }
    }
    // A copy whose move away has finished: the group's committed membership no longer has this
    // node (`FinishMove` follows the membership change), so nothing depends on it. This also
    // clears a stale copy on a node that returns after being replaced.
    for container_id in node.local_container_ids().await? {
        let moved_away = records
            .iter()
            .any(|record| record.container_id == container_id && !record.holds(node.node_id));
        if moved_away {
            tracing::info!(
                container = container_id,
                "dropping a replica that moved away"
            );
            node.drop_container(container_id).await?;
        }
    }
    Ok(())
}
