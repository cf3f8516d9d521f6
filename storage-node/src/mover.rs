//! The replica mover: restores replication after a node is lost, empties draining nodes, and
//! spreads replicas onto new nodes. It runs on every node and acts only on the metadata leader.
//!
//! Owns: deciding when a node is down (no answer to the metadata group's heartbeats for the grace
//! period) and which replicas are lost with it or on their own (reported failing, see
//! `failing_replicas`), running replica moves to completion (up to `MOVES_IN_FLIGHT_MAX` at once,
//! of distinct containers), resuming moves a crash or a lost leadership interrupted, and keeping
//! the metadata group at its voter count.
//! Must not depend on: the gRPC services. What to move is `placement::plan_move`'s decision;
//! this module only carries it out.
//!
//! A move of container C from node X to node Y is four steps, each idempotent, so whichever
//! metadata leader comes next simply repeats the unfinished ones:
//! 1. The cluster map records the intent (`MoveReplica`): Y joins `replicas`, X becomes
//!    `retiring`. Y's reconcile loop starts an empty replica.
//! 2. C's leader adds Y as a learner and waits until it caught up (log or snapshot).
//! 3. C's leader replaces the voters with `replicas` (joint consensus), removing X.
//! 4. The cluster map records the end (`FinishMove`); X then drops its copy.
//!
//! Invariants:
//! - A node's copy is dropped only after the group's committed membership no longer has it
//!   (step 4 follows a successful step 3).
//! - Only the metadata leader moves replicas, and it plans from its own applied cluster map.
//! - A node counts as down only after the grace period, measured from the later of its last
//!   answer and the start of this node's leadership (a new leader knows nothing older).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState};

use crate::cluster::METADATA_VOTER_COUNT_MAX;
use crate::command::{Command, MetadataCommand};
use crate::error::{NodeError, NodeResult};
use crate::node::StorageNode;
use crate::records::{ContainerRecord, NodeRecord};
use crate::types::{NodeId, RaftNode, METADATA_CONTAINER_ID};
use crate::{metadata, placement};

/// How often the mover looks at the cluster map.
const MOVER_INTERVAL_MS: u64 = 1_000;
/// Moves planned per pass (a pass ends early when leadership is lost).
const MOVE_COUNT_PER_PASS_MAX: usize = 64;
/// Moves of distinct containers copied at the same time. Each copy is a learner catch-up, by log
/// or by snapshot; a node runs at most `storage::EXPORTS_IN_FLIGHT_MAX` snapshot exports at once.
pub const MOVES_IN_FLIGHT_MAX: usize = 4;
/// Limit on a new replica catching up, and on the membership change after it. A container
/// larger than this allows at the copy rate stays in flight and is resumed on the next pass.
pub const CATCH_UP_TIMEOUT_MS: u64 = 300_000;
const MEMBERSHIP_CHANGE_TIMEOUT_MS: u64 = 30_000;
/// Nodes tried when looking for a container's leader.
const LEADER_SEARCH_ATTEMPT_COUNT_MAX: usize = 8;
/// Default grace period before a silent node's replicas are re-created elsewhere.
pub const DOWN_GRACE_MS_DEFAULT: u64 = 300_000;

/// The nodes the metadata leader has not heard from for the grace period. Empty on any other
/// node: only the leader sends heartbeats to everyone.
pub fn down_nodes(node: &StorageNode, nodes: &[NodeRecord]) -> BTreeSet<NodeId> {
    let Some(leading_for) = node.metadata_leading_for() else {
        return BTreeSet::new();
    };
    let grace = Duration::from_millis(node.config.down_grace_ms);
    nodes
        .iter()
        .filter(|record| record.node_id != node.node_id)
        .filter(|record| {
            let silent_for = node
                .peers
                .since_contact(METADATA_CONTAINER_ID, record.node_id)
                .map_or(leading_for, |since| since.min(leading_for));
            silent_for > grace
        })
        .map(|record| record.node_id)
        .collect()
}

/// What the mover routes around now: [`down_nodes`], and the replicas their nodes reported as
/// failing (`failing_replicas`). Empty on any node but the metadata leader.
pub fn faults(node: &StorageNode, nodes: &[NodeRecord]) -> placement::Faults {
    if node.metadata_leading_for().is_none() {
        return placement::Faults::default();
    }
    placement::Faults {
        down_nodes: down_nodes(node, nodes),
        failing_replicas: node.failing_replicas_now(),
    }
}

/// Runs forever: one mover pass per interval while this node leads the metadata group.
pub async fn mover_loop(node: Arc<StorageNode>) {
    loop {
        tokio::time::sleep(Duration::from_millis(MOVER_INTERVAL_MS)).await;
        let Some(raft) = node.raft(METADATA_CONTAINER_ID).await else {
            continue;
        };
        let leads = raft.metrics().borrow().current_leader == Some(node.node_id);
        node.set_metadata_leading(leads);
        if !leads {
            continue;
        }
        if let Err(error) = mover_pass(&node).await {
            tracing::warn!(%error, "replica mover pass failed; retrying");
        }
    }
}

async fn mover_pass(node: &Arc<StorageNode>) -> NodeResult<()> {
    let nodes = metadata::list_nodes(&node.storage)?;
    let down = down_nodes(node, &nodes);
    if let Err(error) = maintain_metadata_voters(node, &nodes, &down).await {
        tracing::warn!(%error, "metadata voters not changed");
    }
    // Finish the moves a previous pass (or leader) started, several at once.
    let unfinished: Vec<ContainerRecord> = metadata::list_containers(&node.storage)?
        .into_iter()
        .filter(|record| !record.retiring.is_empty())
        .collect();
    futures::stream::iter(unfinished)
        .for_each_concurrent(MOVES_IN_FLIGHT_MAX, |record| async move {
            if let Err(error) = complete_move(node, &record).await {
                tracing::warn!(container = record.container_id, %error, "move not finished yet");
            }
        })
        .await;
    for _ in 0..MOVE_COUNT_PER_PASS_MAX.div_ceil(MOVES_IN_FLIGHT_MAX) {
        if node.metadata_leading_for().is_none() {
            break;
        }
        // Plan and record up to `MOVES_IN_FLIGHT_MAX` moves of distinct containers. Each plan
        // sees the map with the moves recorded before it, so no replica is planned twice.
        let mut started = Vec::new();
        while started.len() < MOVES_IN_FLIGHT_MAX {
            let nodes = metadata::list_nodes(&node.storage)?;
            let containers = metadata::list_containers(&node.storage)?;
            let faults = faults(node, &nodes);
            let Some(planned) =
                placement::plan_move(&nodes, &containers, &faults, &node.config.move_policy)
            else {
                break;
            };
            if started
                .iter()
                .any(|(container_id, _)| *container_id == planned.container_id)
            {
                // A second replica of a container moving now: the next round takes it.
                break;
            }
            if containers.iter().any(|record| {
                record.container_id == planned.container_id && !record.retiring.is_empty()
            }) {
                // Repairing a container whose earlier move is unfinished: record it, then
                // finish both together.
                tracing::info!(
                    ?planned,
                    "moving a replica of a container with a move in flight"
                );
            }
            tracing::info!(
                container = planned.container_id,
                from = planned.from_node_id,
                to = planned.to_node_id,
                reason = ?planned.reason,
                "moving a replica"
            );
            node.propose(
                METADATA_CONTAINER_ID,
                Command::Metadata(MetadataCommand::MoveReplica {
                    container_id: planned.container_id,
                    from_node_id: planned.from_node_id,
                    to_node_id: planned.to_node_id,
                }),
            )
            .await?;
            started.push((planned.container_id, Instant::now()));
        }
        if started.is_empty() {
            break;
        }
        let results = futures::future::join_all(started.iter().map(
            |&(container_id, started_at)| async move {
                let record = metadata::get_container(&node.storage, container_id)?
                    .ok_or(NodeError::UnknownContainer { container_id })?;
                complete_move(node, &record).await?;
                tracing::info!(
                    container = container_id,
                    move_ms = started_at.elapsed().as_millis() as u64,
                    "replica moved"
                );
                NodeResult::Ok(())
            },
        ))
        .await;
        // Every move ran to its end (finished or failed); the first failure ends the pass and
        // the next pass resumes what is unfinished.
        results.into_iter().collect::<NodeResult<Vec<()>>>()?;
    }
    Ok(())
}

/// Steps 2-4 of a move: the group's voters become the record's replicas, then every retiring
/// node is released.
async fn complete_move(node: &Arc<StorageNode>, record: &ContainerRecord) -> NodeResult<()> {
    change_replicas_anywhere(node, record).await?;
    for &retired in &record.retiring {
        node.propose(
            METADATA_CONTAINER_ID,
            Command::Metadata(MetadataCommand::FinishMove {
                container_id: record.container_id,
                node_id: retired,
            }),
        )
        .await?;
    }
    Ok(())
}

/// Has the container's leader make the group's voters equal to `record.replicas`, searching for
/// the leader among the record's nodes and following redirects (bounded).
async fn change_replicas_anywhere(
    node: &Arc<StorageNode>,
    record: &ContainerRecord,
) -> NodeResult<()> {
    let container_id = record.container_id;
    let voter_ids: BTreeSet<NodeId> = record.replicas.iter().copied().collect();
    let mut candidates: Vec<String> = Vec::new();
    for holder in record.replicas.iter().chain(&record.retiring) {
        if let Some(holder) = metadata::get_node(&node.storage, *holder)? {
            candidates.push(holder.address);
        }
    }
    let mut last_error = NodeError::Cluster(format!(
        "container {container_id}: no replica holder is registered"
    ));
    let mut next: Option<String> = None;
    for attempt in 0..LEADER_SEARCH_ATTEMPT_COUNT_MAX {
        let Some(address) = next
            .take()
            .or_else(|| (!candidates.is_empty()).then(|| candidates.remove(0)))
        else {
            break;
        };
        let result = if address == node.config.advertise_address {
            node.change_replicas(container_id, &voter_ids).await
        } else {
            crate::cluster::forward_change_replicas(node, &address, container_id, &voter_ids).await
        };
        match result {
            Ok(()) => return Ok(()),
            Err(NodeError::NotLeader {
                leader_address: Some(leader),
                ..
            }) if leader != address => {
                next = Some(leader);
            }
            Err(error) => {
                tracing::debug!(container = container_id, attempt, %address, %error, "change replicas");
                last_error = error;
            }
        }
    }
    Err(last_error)
}

impl StorageNode {
    /// On the container's leader: makes the group's voters exactly `voter_ids`. New voters are
    /// added as learners first and caught up (bounded by [`CATCH_UP_TIMEOUT_MS`]); the change
    /// itself goes through joint consensus. Idempotent.
    pub async fn change_replicas(
        &self,
        container_id: u64,
        voter_ids: &BTreeSet<NodeId>,
    ) -> NodeResult<()> {
        if voter_ids.is_empty() {
            return Err(NodeError::Cluster(format!(
                "container {container_id}: a group needs at least one voter"
            )));
        }
        let raft = self.leading_raft(container_id).await?;
        let metrics = raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            // Still leading, but already removed by an earlier change that is not committed yet
            // (openraft keeps such a leader until then). Another membership change from it
            // breaks openraft's invariants; the next leader takes over.
            return Err(NodeError::NotLeader {
                container_id,
                leader_address: None,
            });
        }
        let membership = metrics.membership_config.membership().clone();
        let voters_now: BTreeSet<NodeId> = membership.voter_ids().collect();
        let settled = membership.get_joint_config().len() == 1;
        if voters_now == *voter_ids && settled {
            return Ok(());
        }
        for &new_voter in voter_ids.difference(&voters_now) {
            let record = metadata::get_node(&self.storage, new_voter)?
                .ok_or_else(|| NodeError::Cluster(format!("node {new_voter} is not registered")))?;
            let started = Instant::now();
            let deadline = Duration::from_millis(CATCH_UP_TIMEOUT_MS);
            // Not openraft's blocking mode: it calls a learner "up to date" when it is within
            // `replication_lag_threshold` (5000) entries, which for a volume written in 1 MiB
            // entries means gigabytes behind. The old copy must not go before the new one holds
            // everything up to the moment it was added.
            let added = raft
                .add_learner(new_voter, BasicNode::new(record.address), false)
                .await
                .map_err(|error| {
                    NodeError::Raft(format!(
                        "container {container_id}: add learner {new_voter}: {error}"
                    ))
                })?;
            let target_index = added.log_id.index;
            let waited = raft
                .wait(Some(deadline))
                .metrics(
                    |metrics| {
                        metrics.replication.is_none()
                            || learner_caught_up(metrics, new_voter, target_index)
                    },
                    "new replica caught up",
                )
                .await
                .map_err(|_| {
                    NodeError::Raft(format!(
                        "container {container_id}: node {new_voter} did not catch up to index \
                         {target_index} within {CATCH_UP_TIMEOUT_MS} ms"
                    ))
                })?;
            if waited.replication.is_none() {
                return Err(NodeError::NotLeader {
                    container_id,
                    leader_address: None,
                });
            }
            tracing::info!(
                container = container_id,
                node = new_voter,
                catch_up_ms = started.elapsed().as_millis() as u64,
                "new replica caught up"
            );
        }
        let changed = tokio::time::timeout(
            Duration::from_millis(MEMBERSHIP_CHANGE_TIMEOUT_MS),
            raft.change_membership(ChangeMembers::ReplaceAllVoters(voter_ids.clone()), false),
        )
        .await
        .map_err(|_| {
            NodeError::Raft(format!(
                "container {container_id}: membership change not committed within \
                 {MEMBERSHIP_CHANGE_TIMEOUT_MS} ms"
            ))
        })?;
        changed.map_err(|error| {
            NodeError::Raft(format!(
                "container {container_id}: change voters to {voter_ids:?}: {error}"
            ))
        })?;
        tracing::info!(container = container_id, voters = ?voter_ids, "replicas changed");
        Ok(())
    }
}

/// Whether the leader's replication to `learner` has reached `target_index` (everything up to the
/// entry that added it).
fn learner_caught_up(
    metrics: &RaftMetrics<NodeId, RaftNode>,
    learner: NodeId,
    target_index: u64,
) -> bool {
    metrics
        .replication
        .as_ref()
        .and_then(|replication| replication.get(&learner))
        .and_then(|matched| matched.as_ref())
        .is_some_and(|matched| matched.index >= target_index)
}

/// Keeps the metadata group at [`METADATA_VOTER_COUNT_MAX`] voters on live, non-draining nodes:
/// a down or draining voter is replaced by a live learner (it stays a learner, so it still gets
/// the cluster map when it returns), and missing voters are filled from live learners. Without a
/// replacement a voter stays: removing it would not make the group more available.
async fn maintain_metadata_voters(
    node: &StorageNode,
    nodes: &[NodeRecord],
    down: &BTreeSet<NodeId>,
) -> NodeResult<()> {
    let Some(raft) = node.raft(METADATA_CONTAINER_ID).await else {
        return Ok(());
    };
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    if membership.get_joint_config().len() != 1 || metrics.state != ServerState::Leader {
        return Ok(()); // A change is in progress, or this leader is already being removed.
    }
    let healthy = |node_id: &NodeId| {
        !down.contains(node_id)
            && !nodes
                .iter()
                .any(|record| record.node_id == *node_id && record.draining)
    };
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let mut spares: Vec<NodeId> = membership.learner_ids().filter(healthy).collect();
    spares.sort_unstable();
    let mut wanted: BTreeSet<NodeId> = voters.clone();
    for voter in voters.iter().filter(|voter| !healthy(voter)) {
        if spares.is_empty() {
            break;
        }
        wanted.remove(voter);
        wanted.insert(spares.remove(0));
    }
    while wanted.len() < METADATA_VOTER_COUNT_MAX && !spares.is_empty() {
        wanted.insert(spares.remove(0));
    }
    if wanted == voters {
        return Ok(());
    }
    tracing::info!(from = ?voters, to = ?wanted, "changing the metadata voters");
    tokio::time::timeout(
        Duration::from_millis(MEMBERSHIP_CHANGE_TIMEOUT_MS),
        raft.change_membership(ChangeMembers::ReplaceAllVoters(wanted), true),
    )
    .await
    .map_err(|_| NodeError::Raft("metadata voter change timed out".into()))?
    .map_err(|error| NodeError::Raft(format!("metadata voter change: {error}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId};

    fn metrics_with(
        replication: Option<Vec<(NodeId, Option<u64>)>>,
    ) -> RaftMetrics<NodeId, RaftNode> {
        let mut metrics = RaftMetrics::new_initial(1);
        metrics.replication = replication.map(|entries| {
            entries
                .into_iter()
                .map(|(node, index)| {
                    (
                        node,
                        index.map(|index| LogId::new(CommittedLeaderId::new(1, 1), index)),
                    )
                })
                .collect()
        });
        metrics
    }

    #[test]
    fn a_learner_is_caught_up_only_at_the_target_index() {
        assert!(!learner_caught_up(
            &metrics_with(Some(vec![(4, None)])),
            4,
            10
        ));
        assert!(!learner_caught_up(
            &metrics_with(Some(vec![(4, Some(9))])),
            4,
            10
        ));
        assert!(learner_caught_up(
            &metrics_with(Some(vec![(4, Some(10))])),
            4,
            10
        ));
        assert!(!learner_caught_up(
            &metrics_with(Some(vec![(5, Some(99))])),
            4,
            10
        ));
        assert!(!learner_caught_up(&metrics_with(None), 4, 10));
    }
}
