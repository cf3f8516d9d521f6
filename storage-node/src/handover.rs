//! Handover: this node takes over the leadership of one replicated group on request (an
//! operator's `ballast volume lead`).
//!
//! Why: openraft 0.9 has no leadership transfer, and it draws each replica's election timeout
//! once, when the replica starts. A long-running replica whose draw was high loses every
//! election race to a replica restarted since; it may never lead by chance. Seen in CI
//! (2026-12-05): the scrub test needed its repaired follower to lead, and it lost 24 races in a
//! row. An operator (or a test) who wants a given node to lead needs a way that does not depend
//! on luck.
//!
//! How: the same quiet-group takeover as leader balancing (`quiescence.rs`). Once the group has
//! been quiet here for [`TAKEOVER_QUIET_MS`] (every lease has lapsed, and this replica holds
//! exactly its leader's log), this replica calls an election, which it wins in one round. A busy
//! group is waited for until the deadline: its leader's AppendEntries keep the followers' leases
//! alive, and an election then would only unseat the leader without electing this node.
//!
//! Refused up front (nothing happens): the node holds no replica of the group, its replica is
//! not a voter, it is draining, it is short of device space (it would refuse the group's
//! writes), or its replica's elections are held after failures (`election_hold.rs`).
//! Leadership is not pinned: leader balancing may move it later.
//!
//! Owns: the wait-and-elect loop ([`take_leadership`]).
//! Must not depend on: the gRPC services (the `Admin` service calls this).
//! Invariants: bounded in time (at most [`LEAD_TIMEOUT_MS_MAX`]) and in elections called (at
//! most [`ELECTION_COUNT_MAX`]); only ever calls an election of a voter replica on this node,
//! so Raft's safety is untouched: the worst outcome is one election.

use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::error::{NodeError, NodeResult};
use crate::node::StorageNode;
use crate::quiescence::TAKEOVER_QUIET_MS;

/// The longest a caller may ask to wait for a group to go quiet.
pub const LEAD_TIMEOUT_MS_MAX: u64 = 600_000;
/// Elections one request calls at most (a lost round is retried once the group is quiet again).
pub const ELECTION_COUNT_MAX: u32 = 5;
/// How long one called election has to make this node the leader.
const ELECTION_WAIT_MS: u64 = 3_000;
/// How often the group's state is looked at while waiting.
const POLL_INTERVAL_MS: u64 = 100;

/// What a successful request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// Time from the request until this node led.
    pub waited: Duration,
    /// Elections this node called (0: it led already, or won one it started itself).
    pub election_count: u32,
}

fn refused(container_id: u64, reason: impl Into<String>) -> NodeError {
    NodeError::HandoverRefused {
        container_id,
        reason: reason.into(),
    }
}

/// Makes this node the leader of `container_id` (module doc), waiting at most `timeout`.
pub async fn take_leadership(
    node: &StorageNode,
    container_id: u64,
    timeout: Duration,
) -> NodeResult<Handover> {
    let started = Instant::now();
    let deadline = started + timeout.min(Duration::from_millis(LEAD_TIMEOUT_MS_MAX));
    let mut election_count = 0;
    loop {
        let raft = node
            .raft(container_id)
            .await
            .ok_or(NodeError::UnknownContainer { container_id })?;
        let (state, voter) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            let voter = metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == node.node_id());
            (metrics.state, voter)
        };
        if state == ServerState::Leader {
            return Ok(Handover {
                waited: started.elapsed(),
                election_count,
            });
        }
        refuse_if_unfit(node, container_id, voter)?;
        let now = Instant::now();
        if now >= deadline {
            return Err(refused(
                container_id,
                format!(
                    "the group did not go quiet within {} ms (writes keep its leader's lease \
                     alive; a quiet group is taken over {TAKEOVER_QUIET_MS} ms after it quiesces)",
                    timeout.as_millis()
                ),
            ));
        }
        let quiet = node
            .quiescence()
            .quiet_for(container_id, now)
            .is_some_and(|(_, quiet)| quiet >= Duration::from_millis(TAKEOVER_QUIET_MS));
        if quiet {
            if election_count >= ELECTION_COUNT_MAX {
                return Err(refused(
                    container_id,
                    format!("{election_count} elections called here were all lost"),
                ));
            }
            election_count += 1;
            tracing::info!(
                container = container_id,
                election = election_count,
                "taking over leadership of a quiet group on request"
            );
            raft.trigger()
                .elect()
                .await
                .map_err(|error| NodeError::Raft(format!("election trigger: {error}")))?;
            wait_for_leadership(&raft, deadline).await;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// The up-front refusals (module doc).
fn refuse_if_unfit(node: &StorageNode, container_id: u64, voter: bool) -> NodeResult<()> {
    if !voter {
        return Err(refused(
            container_id,
            "this node's replica is not a voter (it is still catching up, or being removed)",
        ));
    }
    let draining = crate::metadata::get_node(node.storage(), node.node_id())?
        .is_none_or(|record| record.draining);
    if draining {
        return Err(refused(container_id, "this node is draining"));
    }
    if node.storage().short_of_space() {
        return Err(refused(
            container_id,
            "this node is short of device space and would refuse the group's writes",
        ));
    }
    if node.election_held(container_id) {
        return Err(refused(
            container_id,
            "this node's replica failed recently and may not start elections yet",
        ));
    }
    if !node.quiescence().is_enabled() {
        return Err(refused(
            container_id,
            "quiescence is off on this node (--quiesce-idle-ms 0), so no group is ever quiet \
             enough to take over",
        ));
    }
    Ok(())
}

/// Waits until this replica leads, or [`ELECTION_WAIT_MS`] or the deadline has passed.
async fn wait_for_leadership(raft: &crate::types::Raft, deadline: Instant) {
    let until = deadline.min(Instant::now() + Duration::from_millis(ELECTION_WAIT_MS));
    while Instant::now() < until {
        if raft.metrics().borrow().state == ServerState::Leader {
            return;
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS / 2)).await;
    }
}
