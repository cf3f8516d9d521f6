//! Quiescence: idle replicated groups stop their own Raft heartbeats, and one node-level
//! heartbeat per peer node stands in for all of them.
//!
//! Why: openraft heartbeats every group every 150 ms. Measured, that is about 0.05 % of a core
//! per idle rf=3 container on each node, so half a core for 1,000 idle volumes. Most volumes are
//! idle most of the time.
//!
//! Leader side, per filesystem container this node leads: the group quiesces once, for
//! [`QuiescenceConfig::idle_ms`], its log has not grown, every voter has matched the whole log and
//! answered recently, and the membership is plain (no learners, no joint change). Quiescing turns
//! openraft's heartbeat timer off. It wakes (timer back on) as soon as the log grows, the term or
//! membership changes, or a follower stops acknowledging the node heartbeat. New entries are
//! replicated at once whatever the timer says, and reads still confirm leadership with their own
//! round of AppendEntries, so neither waits for the wake-up.
//!
//! Node heartbeat: every [`NODE_HEARTBEAT_INTERVAL_MS`] the node sends each peer the quiesced
//! groups that have a voter there, with term and last log index. The peer acknowledges the groups
//! whose local replica follows that leader in that term with exactly that log, and pauses those
//! replicas' election timers. An acknowledgement also counts as Raft contact for the
//! minimum-replication check, which otherwise would see quiet followers as gone.
//!
//! Follower side: a paused replica resumes its election timer when the leader's node has not
//! been heard for [`LEADER_NODE_SILENCE_MS`] (the leader died or is cut off: the group elects as
//! usual, about as fast as with heartbeats), when the leader stops listing the group (it woke up;
//! resumed after a short grace so its own heartbeats arrive first), or at once after any
//! AppendEntries of the group (the leader is active again).
//!
//! Leader balancing rides on the same heartbeat: it carries the sender's count of groups it leads.
//! A follower that leads at least [`LEADER_IMBALANCE_MIN`] fewer takes over one group quiesced
//! under the sender for over [`TAKEOVER_QUIET_MS`], at most one per [`TAKEOVER_INTERVAL_MS`]: it
//! calls an election (`trigger().elect()`, which a paused timer does not block). In a quiet group
//! every lease has lapsed, so the voters, and the old leader itself, grant the higher term, and
//! with equal logs (the follower acknowledged exactly the leader's log) the follower wins in one
//! round. Each takeover lowers the sum of squared leader counts, so leaders spread out after
//! failovers and node restarts without a coordinator. openraft 0.9 has no leadership transfer;
//! this needs none. A draining node never takes over, and neither does a node short of device
//! space. A sender short of space (it says so in its heartbeat) is taken over from whatever the
//! counts: its admission refuses the writes of the groups it leads (`space.rs`) while its
//! followers may have room. The same quiet-group takeover serves an operator's `ballast volume
//! lead` ([`Quiescence::quiet_for`], `handover.rs`).
//!
//! Safety: quiescence only switches openraft's timers. It never touches votes, logs or commits,
//! so Raft's safety does not depend on it; a wrong decision costs at most an election, or a
//! failover delayed by [`LEADER_NODE_SILENCE_MS`]. The metadata group never quiesces: its
//! heartbeats are the cluster's node liveness.
//!
//! Owns: the quiescence state and decisions of every group on this node ([`Quiescence`], pure:
//! time is passed in, so the rules are unit-tested), and the loop that applies them and sends
//! node heartbeats.
//! Must not depend on: the gRPC services (the receiving side calls [`Quiescence`] methods).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_proto::cluster_v1 as proto;
use ballast_proto::cluster_v1::raft_transport_client::RaftTransportClient;
use openraft::ServerState;

use crate::node::StorageNode;
use crate::types::{NodeId, Raft, METADATA_CONTAINER_ID};

/// How often node heartbeats go out (and the decisions are re-evaluated).
pub const NODE_HEARTBEAT_INTERVAL_MS: u64 = 250;
/// A paused follower resumes elections when its leader's node was silent this long: the election
/// timeout's lower bound (750 ms) plus a heartbeat, so a quiet group fails over about as fast as
/// one with heartbeats.
pub const LEADER_NODE_SILENCE_MS: u64 = 1_000;
/// A leader wakes a group whose follower has not acknowledged the node heartbeat this long.
const ACKNOWLEDGEMENT_SILENCE_MS: u64 = 1_000;
/// A follower whose leader stopped listing the group resumes elections after this grace, unless
/// an AppendEntries resumes them first.
const UNLISTED_GRACE_MS: u64 = 500;
/// Bound on one node heartbeat round trip.
const NODE_HEARTBEAT_TIMEOUT_MS: u64 = 500;
/// Default idle time before a group quiesces.
pub const QUIESCE_IDLE_MS_DEFAULT: u64 = 3_000;
/// A follower takes over leadership only when it leads at least this many fewer groups than the
/// leader's node (2: a move from a to b keeps the counts' difference from flipping sign).
pub const LEADER_IMBALANCE_MIN: u64 = 2;
/// A group is taken over only after it has been quiet this long here: longer than the leader
/// lease (the election timeout's upper bound, 1.5 s), so every voter grants the new term.
pub const TAKEOVER_QUIET_MS: u64 = 2_500;
/// At most one takeover per node in this time, so counts seen in heartbeats catch up.
pub const TAKEOVER_INTERVAL_MS: u64 = 3_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuiescenceConfig {
    /// Idle time before a group quiesces; 0 turns quiescence off.
    pub idle_ms: u64,
}

/// What the loop reads of one group's Raft metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub container_id: u64,
    pub leading: bool,
    pub following: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub voters: Vec<NodeId>,
    /// Learners or a joint configuration: a change is in progress.
    pub changing_membership: bool,
    /// Leader only: each voter's matched log index.
    pub matched: BTreeMap<NodeId, u64>,
}

impl GroupView {
    pub fn of(container_id: u64, raft: &Raft) -> GroupView {
        // Borrowed, not cloned: this runs for every group every 250 ms.
        let receiver = raft.metrics();
        let metrics = receiver.borrow();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let changing_membership =
            membership.learner_ids().next().is_some() || membership.get_joint_config().len() > 1;
        let matched = metrics
            .replication
            .as_ref()
            .map(|replication| {
                replication
                    .iter()
                    .map(|(node, matched)| (*node, matched.map_or(0, |log_id| log_id.index)))
                    .collect()
            })
            .unwrap_or_default();
        GroupView {
            container_id,
            leading: metrics.state == ServerState::Leader,
            following: metrics.state == ServerState::Follower,
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            voters,
            changing_membership,
            matched,
        }
    }
}

/// A timer switch the loop must apply to a group's Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerChange {
    /// Leader: heartbeat timer on (`true`) or off.
    Heartbeat { container_id: u64, enabled: bool },
    /// Follower: election timer on (`true`) or off.
    Elect { container_id: u64, enabled: bool },
}

#[derive(Debug, Clone)]
struct Leading {
    term: u64,
    last_log_index: u64,
    idle_since: Instant,
    quiesced: bool,
    /// When each follower last acknowledged this group in a node heartbeat.
    acknowledged_at: HashMap<NodeId, Instant>,
}

#[derive(Debug, Clone)]
struct Following {
    leader: NodeId,
    term: u64,
    /// Since when this replica's election timer is paused.
    paused_at: Instant,
    /// When the leader's node heartbeat first left this group out.
    unlisted_since: Option<Instant>,
}

impl Following {
    /// How long the group has been quiet here; `None` once its leader stopped listing it (it
    /// woke up).
    fn quiet_for(&self, now: Instant) -> Option<Duration> {
        match self.unlisted_since {
            Some(_) => None,
            None => Some(now.saturating_duration_since(self.paused_at)),
        }
    }
}

#[derive(Debug, Default)]
struct QuiescenceState {
    leading: HashMap<u64, Leading>,
    /// Present: this replica's election timer is paused.
    following: HashMap<u64, Following>,
    node_heard_at: HashMap<NodeId, Instant>,
    last_takeover_at: Option<Instant>,
}

/// The quiescence decisions of one node (see the module doc).
#[derive(Debug)]
pub struct Quiescence {
    node_id: NodeId,
    config: QuiescenceConfig,
    state: Mutex<QuiescenceState>,
}

impl Quiescence {
    pub fn new(node_id: NodeId, config: QuiescenceConfig) -> Quiescence {
        Quiescence {
            node_id,
            config,
            state: Mutex::new(QuiescenceState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QuiescenceState> {
        self.state.lock().expect("quiescence lock")
    }

    /// Whether groups quiesce at all (`idle_ms` > 0).
    pub fn is_enabled(&self) -> bool {
        self.config.idle_ms > 0
    }

    /// Filesystem groups this node led at the last tick (what node heartbeats announce).
    pub fn leader_count(&self) -> u64 {
        self.state().leading.len() as u64
    }

    /// Whether the group is quiesced on this node (as leader or as follower).
    pub fn is_quiesced(&self, container_id: u64) -> bool {
        let state = self.state();
        state.following.contains_key(&container_id)
            || state
                .leading
                .get(&container_id)
                .is_some_and(|leading| leading.quiesced)
    }

    /// Re-evaluates every group from fresh views; returns the timer switches to apply. Groups not
    /// in `views` (stopped or dropped here) are forgotten.
    pub fn tick(
        &self,
        views: &[GroupView],
        since_contact: impl Fn(u64, NodeId) -> Option<Duration>,
        now: Instant,
    ) -> Vec<TimerChange> {
        let mut changes = Vec::new();
        let mut state = self.state();
        let present: HashSet<u64> = views.iter().map(|view| view.container_id).collect();
        state
            .leading
            .retain(|container_id, _| present.contains(container_id));
        state
            .following
            .retain(|container_id, _| present.contains(container_id));
        let node_heard_at = state.node_heard_at.clone();
        for view in views {
            let container_id = view.container_id;
            if container_id == METADATA_CONTAINER_ID || self.config.idle_ms == 0 {
                continue;
            }
            // Leader side.
            if view.leading {
                let leading = state.leading.entry(container_id).or_insert(Leading {
                    term: view.term,
                    last_log_index: view.last_log_index,
                    idle_since: now,
                    quiesced: false,
                    acknowledged_at: HashMap::new(),
                });
                let followers: Vec<NodeId> = view
                    .voters
                    .iter()
                    .copied()
                    .filter(|voter| *voter != self.node_id)
                    .collect();
                let busy = leading.term != view.term
                    || leading.last_log_index != view.last_log_index
                    || view.changing_membership
                    || followers.is_empty()
                    || followers.iter().any(|follower| {
                        view.matched.get(follower).copied() != Some(view.last_log_index)
                    });
                let unacknowledged = leading.quiesced
                    && followers.iter().any(|follower| {
                        leading.acknowledged_at.get(follower).is_none_or(|at| {
                            now.saturating_duration_since(*at)
                                > Duration::from_millis(ACKNOWLEDGEMENT_SILENCE_MS)
                        })
                    });
                leading.term = view.term;
                leading.last_log_index = view.last_log_index;
                if busy || unacknowledged {
                    leading.idle_since = now;
                    if leading.quiesced {
                        leading.quiesced = false;
                        changes.push(TimerChange::Heartbeat {
                            container_id,
                            enabled: true,
                        });
                    }
                } else if !leading.quiesced {
                    let idle = now.saturating_duration_since(leading.idle_since)
                        >= Duration::from_millis(self.config.idle_ms);
                    // Only while every follower is answering Raft: a dead one keeps it awake.
                    let all_in_contact = followers.iter().all(|follower| {
                        since_contact(container_id, *follower).is_some_and(|since| {
                            since < Duration::from_millis(ACKNOWLEDGEMENT_SILENCE_MS)
                        })
                    });
                    if idle && all_in_contact {
                        leading.quiesced = true;
                        // Each follower gets a full silence window to acknowledge first.
                        leading.acknowledged_at =
                            followers.iter().map(|follower| (*follower, now)).collect();
                        changes.push(TimerChange::Heartbeat {
                            container_id,
                            enabled: false,
                        });
                    }
                }
            } else if let Some(leading) = state.leading.remove(&container_id) {
                // No longer leading: a new leader's Raft starts with its timers on, and so must a
                // deposed leader's replica.
                if leading.quiesced {
                    changes.push(TimerChange::Heartbeat {
                        container_id,
                        enabled: true,
                    });
                }
            }
            // Follower side.
            if let Some(following) = state.following.get(&container_id) {
                let leader_silent = node_heard_at.get(&following.leader).is_none_or(|at| {
                    now.saturating_duration_since(*at)
                        > Duration::from_millis(LEADER_NODE_SILENCE_MS)
                });
                let unlisted_long = following.unlisted_since.is_some_and(|since| {
                    now.saturating_duration_since(since) > Duration::from_millis(UNLISTED_GRACE_MS)
                });
                let leader_changed = !view.following
                    || view.leader != Some(following.leader)
                    || view.term != following.term;
                if leader_silent || unlisted_long || leader_changed {
                    state.following.remove(&container_id);
                    changes.push(TimerChange::Elect {
                        container_id,
                        enabled: true,
                    });
                }
            }
        }
        changes
    }

    /// The quiesced groups to announce, per peer node: each group goes to its other voters.
    pub fn announcements(
        &self,
        views: &[GroupView],
    ) -> BTreeMap<NodeId, Vec<proto::QuiescedGroup>> {
        let state = self.state();
        let mut announcements: BTreeMap<NodeId, Vec<proto::QuiescedGroup>> = BTreeMap::new();
        for view in views {
            let Some(leading) = state.leading.get(&view.container_id) else {
                continue;
            };
            if !leading.quiesced || !view.leading {
                continue;
            }
            for voter in view.voters.iter().filter(|voter| **voter != self.node_id) {
                announcements
                    .entry(*voter)
                    .or_default()
                    .push(proto::QuiescedGroup {
                        container_id: view.container_id,
                        term: view.term,
                        last_log_index: view.last_log_index,
                    });
            }
        }
        announcements
    }

    /// A peer acknowledged some of its announced groups.
    pub fn on_acknowledged(
        &self,
        peer: NodeId,
        acknowledged: &[u64],
        record_contact: impl Fn(u64, NodeId),
        now: Instant,
    ) {
        let mut state = self.state();
        for container_id in acknowledged {
            if let Some(leading) = state.leading.get_mut(container_id) {
                if leading.quiesced {
                    leading.acknowledged_at.insert(peer, now);
                    record_contact(*container_id, peer);
                }
            }
        }
    }

    /// A node heartbeat from `from` announcing `groups`; `views` are this node's replicas of
    /// them. Returns the acknowledged container ids and the timer switches to apply.
    pub fn on_node_heartbeat(
        &self,
        from: NodeId,
        groups: &[proto::QuiescedGroup],
        views: &HashMap<u64, GroupView>,
        now: Instant,
    ) -> (Vec<u64>, Vec<TimerChange>) {
        let mut state = self.state();
        state.node_heard_at.insert(from, now);
        let mut acknowledged = Vec::new();
        let mut changes = Vec::new();
        let listed: HashSet<u64> = groups.iter().map(|group| group.container_id).collect();
        for group in groups {
            let container_id = group.container_id;
            let agrees = self.config.idle_ms > 0
                && container_id != METADATA_CONTAINER_ID
                && views.get(&container_id).is_some_and(|view| {
                    view.following
                        && view.leader == Some(from)
                        && view.term == group.term
                        && view.last_log_index == group.last_log_index
                });
            if agrees {
                acknowledged.push(container_id);
                let previous = state.following.get(&container_id).cloned();
                let paused_at = previous
                    .as_ref()
                    .filter(|previous| previous.leader == from && previous.term == group.term)
                    .map_or(now, |previous| previous.paused_at);
                state.following.insert(
                    container_id,
                    Following {
                        leader: from,
                        term: group.term,
                        paused_at,
                        unlisted_since: None,
                    },
                );
                if previous.is_none() {
                    changes.push(TimerChange::Elect {
                        container_id,
                        enabled: false,
                    });
                }
            } else if state.following.remove(&container_id).is_some() {
                changes.push(TimerChange::Elect {
                    container_id,
                    enabled: true,
                });
            }
        }
        for (container_id, following) in state.following.iter_mut() {
            if following.leader == from && !listed.contains(container_id) {
                following.unlisted_since.get_or_insert(now);
            }
        }
        (acknowledged, changes)
    }

    /// Leader balancing (module doc): the group to take over from `from`, which leads
    /// `sender_leader_count` groups, if this node should take one now; never when `unwilling`
    /// (draining, or short of device space). A chosen group counts as taken: no other is chosen
    /// within [`TAKEOVER_INTERVAL_MS`].
    pub fn choose_takeover(
        &self,
        from: NodeId,
        sender_leader_count: u64,
        sender_short_of_space: bool,
        unwilling: bool,
        now: Instant,
    ) -> Option<u64> {
        if unwilling || self.config.idle_ms == 0 {
            return None;
        }
        let mut state = self.state();
        let own_leader_count = state.leading.len() as u64;
        let imbalanced = sender_leader_count >= own_leader_count + LEADER_IMBALANCE_MIN;
        if !imbalanced && !sender_short_of_space {
            return None;
        }
        if state.last_takeover_at.is_some_and(|at| {
            now.saturating_duration_since(at) < Duration::from_millis(TAKEOVER_INTERVAL_MS)
        }) {
            return None;
        }
        let chosen = state
            .following
            .iter()
            .filter(|(_, following)| {
                following.leader == from
                    && following
                        .quiet_for(now)
                        .is_some_and(|quiet| quiet >= Duration::from_millis(TAKEOVER_QUIET_MS))
            })
            .map(|(container_id, _)| *container_id)
            .min()?;
        state.last_takeover_at = Some(now);
        Some(chosen)
    }

    /// The leader of a group this replica follows quietly, and for how long it has been quiet
    /// here; `None` unless the replica is paused under a leader that still lists the group. A
    /// group quiet for [`TAKEOVER_QUIET_MS`] is taken over in one election round (module doc).
    pub fn quiet_for(&self, container_id: u64, now: Instant) -> Option<(NodeId, Duration)> {
        let state = self.state();
        let following = state.following.get(&container_id)?;
        Some((following.leader, following.quiet_for(now)?))
    }

    /// An AppendEntries of the group was handled here: its leader is active, so a paused
    /// replica resumes its election timer (its lease was just refreshed by that request).
    pub fn on_append_entries(&self, container_id: u64) -> Option<TimerChange> {
        self.state()
            .following
            .remove(&container_id)
            .map(|_| TimerChange::Elect {
                container_id,
                enabled: true,
            })
    }
}

/// Applies timer switches to the node's Rafts.
pub async fn apply_changes(node: &StorageNode, changes: Vec<TimerChange>) {
    for change in changes {
        let (container_id, heartbeat, enabled) = match change {
            TimerChange::Heartbeat {
                container_id,
                enabled,
            } => (container_id, true, enabled),
            TimerChange::Elect {
                container_id,
                enabled,
            } => (container_id, false, enabled),
        };
        let Some(raft) = node.raft(container_id).await else {
            continue;
        };
        if heartbeat {
            raft.runtime_config().heartbeat(enabled);
            if enabled {
                // Tell the followers at once rather than at the next tick. A failure means the
                // Raft core stopped; the reconcile loop restarts it.
                if let Err(error) = raft.trigger().heartbeat().await {
                    tracing::debug!(container = container_id, %error, "heartbeat trigger");
                }
            }
        } else if enabled && node.election_held(container_id) {
            // Restarted after a fatal error: the hold switches elections back on when it ends.
            continue;
        } else {
            raft.runtime_config().elect(enabled);
        }
        tracing::debug!(container = container_id, ?change, "quiescence");
    }
}

/// Views of every group on the node.
pub async fn group_views(node: &StorageNode) -> Vec<GroupView> {
    let containers = node.containers.read().await;
    containers
        .iter()
        .map(|(container_id, container)| GroupView::of(*container_id, &container.raft))
        .collect()
}

/// Re-evaluates the node's groups and sends node heartbeats, every
/// [`NODE_HEARTBEAT_INTERVAL_MS`], for the node's lifetime.
pub async fn quiescence_loop(node: Arc<StorageNode>) {
    let mut interval = tokio::time::interval(Duration::from_millis(NODE_HEARTBEAT_INTERVAL_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let views = group_views(&node).await;
        let changes = node.quiescence().tick(
            &views,
            |container_id, peer| node.peers.since_contact(container_id, peer),
            Instant::now(),
        );
        apply_changes(&node, changes).await;
        let announcements = node.quiescence().announcements(&views);
        if announcements.is_empty() {
            continue;
        }
        let addresses = peer_addresses(&node).await;
        let sends = announcements.into_iter().filter_map(|(peer, groups)| {
            let address = addresses.get(&peer)?.clone();
            let node = Arc::clone(&node);
            Some(async move { send_node_heartbeat(&node, peer, &address, groups).await })
        });
        // One round trip per peer, all at once; bounded by the peer count and the timeout.
        futures::future::join_all(sends).await;
    }
}

/// The address of every node that appears in a group's membership here.
async fn peer_addresses(node: &StorageNode) -> HashMap<NodeId, String> {
    let containers = node.containers.read().await;
    let mut addresses = HashMap::new();
    for container in containers.values() {
        let receiver = container.raft.metrics();
        let metrics = receiver.borrow();
        for (peer, peer_node) in metrics.membership_config.membership().nodes() {
            addresses
                .entry(*peer)
                .or_insert_with(|| peer_node.addr.clone());
        }
    }
    addresses
}

async fn send_node_heartbeat(
    node: &StorageNode,
    peer: NodeId,
    address: &str,
    groups: Vec<proto::QuiescedGroup>,
) {
    let channel = match node.peers.channel(address) {
        Ok(channel) => channel,
        Err(error) => {
            tracing::debug!(peer, %error, "node heartbeat: no channel");
            return;
        }
    };
    let mut client = RaftTransportClient::new(channel);
    let request = proto::NodeHeartbeatRequest {
        from_node_id: node.node_id(),
        groups,
        leader_count: node.quiescence().leader_count(),
        short_of_space: node.storage().short_of_space(),
    };
    let sent = tokio::time::timeout(
        Duration::from_millis(NODE_HEARTBEAT_TIMEOUT_MS),
        client.node_heartbeat(request),
    )
    .await;
    match sent {
        Ok(Ok(response)) => node.quiescence().on_acknowledged(
            peer,
            &response.into_inner().acknowledged_container_ids,
            |container_id, peer| node.peers.record_contact(container_id, peer),
            Instant::now(),
        ),
        // No acknowledgement: the groups wake after ACKNOWLEDGEMENT_SILENCE_MS.
        Ok(Err(status)) => tracing::debug!(peer, %status, "node heartbeat refused"),
        Err(_) => tracing::debug!(peer, "node heartbeat timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEADER: NodeId = 1;

    fn quiescence(node_id: NodeId) -> Quiescence {
        Quiescence::new(node_id, QuiescenceConfig { idle_ms: 3_000 })
    }

    fn leader_view(container_id: u64, last_log_index: u64) -> GroupView {
        GroupView {
            container_id,
            leading: true,
            following: false,
            leader: Some(LEADER),
            term: 4,
            last_log_index,
            voters: vec![1, 2, 3],
            changing_membership: false,
            matched: [
                (1, last_log_index),
                (2, last_log_index),
                (3, last_log_index),
            ]
            .into(),
        }
    }

    fn follower_view(container_id: u64, last_log_index: u64) -> GroupView {
        GroupView {
            leading: false,
            following: true,
            matched: BTreeMap::new(),
            ..leader_view(container_id, last_log_index)
        }
    }

    fn in_contact(_: u64, _: NodeId) -> Option<Duration> {
        Some(Duration::from_millis(10))
    }

    fn at(start: Instant, milliseconds: u64) -> Instant {
        start + Duration::from_millis(milliseconds)
    }

    #[test]
    fn an_idle_group_quiesces_after_the_idle_time_and_wakes_when_its_log_grows() {
        let leader = quiescence(LEADER);
        let start = Instant::now();
        let views = [leader_view(5, 10)];
        assert!(leader.tick(&views, in_contact, start).is_empty());
        assert!(leader.tick(&views, in_contact, at(start, 2_999)).is_empty());
        assert_eq!(
            leader.tick(&views, in_contact, at(start, 3_000)),
            vec![TimerChange::Heartbeat {
                container_id: 5,
                enabled: false
            }]
        );
        assert!(leader.is_quiesced(5));
        let announced = leader.announcements(&views);
        assert_eq!(announced.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(announced[&2][0].last_log_index, 10);
        // A write: the log grows, the group wakes at once.
        assert_eq!(
            leader.tick(&[leader_view(5, 11)], in_contact, at(start, 3_100)),
            vec![TimerChange::Heartbeat {
                container_id: 5,
                enabled: true
            }]
        );
        assert!(!leader.is_quiesced(5));
        assert!(leader.announcements(&views).is_empty());
    }

    #[test]
    fn a_lagging_follower_a_membership_change_or_a_dead_follower_keeps_the_group_awake() {
        let start = Instant::now();
        let mut lagging = leader_view(5, 10);
        lagging.matched.insert(3, 9);
        let mut changing = leader_view(6, 10);
        changing.changing_membership = true;
        let views = [lagging, changing, leader_view(7, 10)];
        let leader = quiescence(LEADER);
        let out_of_contact = |container_id: u64, peer: NodeId| {
            (container_id != 7 || peer != 3).then_some(Duration::from_millis(10))
        };
        for step in 0..10 {
            assert!(leader
                .tick(&views, out_of_contact, at(start, step * 1_000))
                .is_empty());
        }
        let metadata = leader_view(METADATA_CONTAINER_ID, 10);
        assert!(leader
            .tick(&[metadata], in_contact, at(start, 20_000))
            .is_empty());
        assert!(!leader.is_quiesced(METADATA_CONTAINER_ID));
    }

    #[test]
    fn a_follower_that_stops_acknowledging_wakes_the_group() {
        let leader = quiescence(LEADER);
        let start = Instant::now();
        let views = [leader_view(5, 10)];
        leader.tick(&views, in_contact, start);
        assert_eq!(leader.tick(&views, in_contact, at(start, 3_000)).len(), 1);
        for step in 1..=4 {
            let now = at(start, 3_000 + step * 250);
            leader.on_acknowledged(2, &[5], |_, _| {}, now);
            leader.on_acknowledged(3, &[5], |_, _| {}, now);
            assert!(leader.tick(&views, in_contact, now).is_empty());
        }
        // Follower 3 goes quiet; follower 2 keeps acknowledging.
        for step in 5..=9 {
            let now = at(start, 3_000 + step * 250);
            leader.on_acknowledged(2, &[5], |_, _| {}, now);
            let changes = leader.tick(&views, in_contact, now);
            // Last acknowledged at 4,000 ms: silent for more than 1,000 ms only at 5,250 ms.
            if step < 9 {
                assert!(changes.is_empty(), "step {step}: {changes:?}");
            } else {
                assert_eq!(
                    changes,
                    vec![TimerChange::Heartbeat {
                        container_id: 5,
                        enabled: true
                    }]
                );
            }
        }
    }

    #[test]
    fn acknowledgements_count_as_raft_contact() {
        let leader = quiescence(LEADER);
        let start = Instant::now();
        let views = [leader_view(5, 10)];
        leader.tick(&views, in_contact, start);
        leader.tick(&views, in_contact, at(start, 3_000));
        let recorded = Mutex::new(Vec::new());
        leader.on_acknowledged(
            2,
            &[5, 99],
            |container_id, peer| recorded.lock().unwrap().push((container_id, peer)),
            at(start, 3_250),
        );
        assert_eq!(*recorded.lock().unwrap(), vec![(5, 2)]);
    }

    #[test]
    fn a_follower_pauses_only_when_it_agrees_and_resumes_when_the_leader_node_is_silent() {
        let follower = quiescence(2);
        let start = Instant::now();
        let views: HashMap<u64, GroupView> = [
            (5, follower_view(5, 10)),
            (6, follower_view(6, 9)), // behind the leader
        ]
        .into();
        let groups = [
            proto::QuiescedGroup {
                container_id: 5,
                term: 4,
                last_log_index: 10,
            },
            proto::QuiescedGroup {
                container_id: 6,
                term: 4,
                last_log_index: 10,
            },
            proto::QuiescedGroup {
                container_id: 7, // not here
                term: 4,
                last_log_index: 10,
            },
        ];
        let (acknowledged, changes) = follower.on_node_heartbeat(LEADER, &groups, &views, start);
        assert_eq!(acknowledged, vec![5]);
        assert_eq!(
            changes,
            vec![TimerChange::Elect {
                container_id: 5,
                enabled: false
            }]
        );
        let local: Vec<GroupView> = views.values().cloned().collect();
        // Heard within the silence bound: stays paused.
        for step in 1..=4 {
            let now = at(start, step * 250);
            follower.on_node_heartbeat(LEADER, &groups, &views, now);
            assert!(follower.tick(&local, in_contact, now).is_empty());
        }
        // The leader's node goes silent.
        assert!(follower
            .tick(&local, in_contact, at(start, 1_900))
            .is_empty());
        assert_eq!(
            follower.tick(&local, in_contact, at(start, 2_001)),
            vec![TimerChange::Elect {
                container_id: 5,
                enabled: true
            }]
        );
        assert!(!follower.is_quiesced(5));
    }

    #[test]
    fn a_follower_resumes_on_append_entries_on_unlisting_and_on_a_new_leader() {
        let start = Instant::now();
        let views: HashMap<u64, GroupView> =
            [(5, follower_view(5, 10)), (6, follower_view(6, 10))].into();
        let local: Vec<GroupView> = views.values().cloned().collect();
        let groups: Vec<proto::QuiescedGroup> = [5, 6]
            .into_iter()
            .map(|container_id| proto::QuiescedGroup {
                container_id,
                term: 4,
                last_log_index: 10,
            })
            .collect();
        let follower = quiescence(2);
        follower.on_node_heartbeat(LEADER, &groups, &views, start);
        assert_eq!(
            follower.on_append_entries(5),
            Some(TimerChange::Elect {
                container_id: 5,
                enabled: true
            })
        );
        assert_eq!(follower.on_append_entries(5), None);
        // Group 6 is no longer listed: resumed after the grace, not before.
        follower.on_node_heartbeat(LEADER, &groups[..0], &views, at(start, 250));
        assert!(follower.tick(&local, in_contact, at(start, 500)).is_empty());
        follower.on_node_heartbeat(LEADER, &groups[..0], &views, at(start, 750));
        assert_eq!(follower.tick(&local, in_contact, at(start, 800)).len(), 1);
        // A new term: resumed at the next tick.
        follower.on_node_heartbeat(LEADER, &groups, &views, at(start, 1_000));
        let mut new_term = follower_view(5, 10);
        new_term.term = 5;
        let changes = follower.tick(
            &[new_term, follower_view(6, 10)],
            in_contact,
            at(start, 1_100),
        );
        assert_eq!(
            changes,
            vec![TimerChange::Elect {
                container_id: 5,
                enabled: true
            }]
        );
    }

    fn quiesced_group(container_id: u64) -> proto::QuiescedGroup {
        proto::QuiescedGroup {
            container_id,
            term: 4,
            last_log_index: 10,
        }
    }

    #[test]
    fn a_follower_leading_fewer_takes_over_one_long_quiet_group_at_a_time() {
        let start = Instant::now();
        let views: HashMap<u64, GroupView> = (5..9)
            .map(|container_id| (container_id, follower_view(container_id, 10)))
            .collect();
        let groups: Vec<proto::QuiescedGroup> = (5..9).map(quiesced_group).collect();
        let follower = quiescence(2);
        follower.on_node_heartbeat(LEADER, &groups, &views, start);
        // Quiet, but not yet long enough for every lease to have lapsed.
        follower.on_node_heartbeat(LEADER, &groups, &views, at(start, 2_000));
        assert_eq!(
            follower.choose_takeover(LEADER, 4, false, false, at(start, 2_000)),
            None
        );
        follower.on_node_heartbeat(LEADER, &groups, &views, at(start, 2_500));
        // Balanced enough, or draining: nothing.
        assert_eq!(
            follower.choose_takeover(LEADER, 1, false, false, at(start, 2_500)),
            None
        );
        assert_eq!(
            follower.choose_takeover(LEADER, 4, false, true, at(start, 2_500)),
            None
        );
        assert_eq!(
            follower.choose_takeover(LEADER, 4, false, false, at(start, 2_500)),
            Some(5)
        );
        // One at a time.
        assert_eq!(
            follower.choose_takeover(LEADER, 4, false, false, at(start, 3_000)),
            None
        );
        assert_eq!(
            follower.choose_takeover(LEADER, 3, false, false, at(start, 5_500)),
            Some(5)
        );
        // Another sender's groups are not taken on this sender's account.
        assert_eq!(
            follower.choose_takeover(3, 9, false, false, at(start, 9_000)),
            None
        );
    }

    #[test]
    fn a_node_leading_its_share_takes_nothing() {
        let start = Instant::now();
        let follower = quiescence(2);
        // This node leads two groups itself.
        follower.tick(&[leader_view(1, 10), leader_view(2, 10)], in_contact, start);
        assert_eq!(follower.leader_count(), 2);
        let views: HashMap<u64, GroupView> = [(5, follower_view(5, 10))].into();
        follower.on_node_heartbeat(LEADER, &[quiesced_group(5)], &views, start);
        let later = at(start, 5_000);
        follower.on_node_heartbeat(LEADER, &[quiesced_group(5)], &views, later);
        assert_eq!(
            follower.choose_takeover(LEADER, 3, false, false, later),
            None
        );
        assert_eq!(
            follower.choose_takeover(LEADER, 4, false, false, later),
            Some(5)
        );
    }

    #[test]
    fn a_leader_short_of_space_is_taken_over_from_whatever_the_counts() {
        let start = Instant::now();
        let follower = quiescence(2);
        // This node leads three groups, the sender only one: no balancing takeover.
        follower.tick(
            &[leader_view(1, 10), leader_view(2, 10), leader_view(3, 10)],
            in_contact,
            start,
        );
        let views: HashMap<u64, GroupView> = [(5, follower_view(5, 10))].into();
        follower.on_node_heartbeat(LEADER, &[quiesced_group(5)], &views, start);
        assert_eq!(follower.quiet_for(5, start), Some((LEADER, Duration::ZERO)));
        let later = at(start, 2_500);
        follower.on_node_heartbeat(LEADER, &[quiesced_group(5)], &views, later);
        assert_eq!(
            follower.quiet_for(5, later),
            Some((LEADER, Duration::from_millis(2_500)))
        );
        assert_eq!(
            follower.choose_takeover(LEADER, 1, false, false, later),
            None
        );
        // Not before the group has been quiet long enough, and never by an unwilling node.
        assert_eq!(
            follower.choose_takeover(LEADER, 1, true, false, at(start, 1_000)),
            None
        );
        assert_eq!(follower.choose_takeover(LEADER, 1, true, true, later), None);
        assert_eq!(
            follower.choose_takeover(LEADER, 1, true, false, later),
            Some(5)
        );
        // A group its leader stopped listing (it woke up) is not quiet.
        follower.on_node_heartbeat(LEADER, &[], &views, at(start, 2_750));
        assert_eq!(follower.quiet_for(5, at(start, 2_750)), None);
        assert_eq!(follower.quiet_for(6, at(start, 2_750)), None);
    }

    #[test]
    fn turned_off_it_never_quiesces() {
        let leader = Quiescence::new(LEADER, QuiescenceConfig { idle_ms: 0 });
        let start = Instant::now();
        let views = [leader_view(5, 10)];
        for step in 0..20 {
            assert!(leader
                .tick(&views, in_contact, at(start, step * 1_000))
                .is_empty());
        }
        let follower = Quiescence::new(2, QuiescenceConfig { idle_ms: 0 });
        let (acknowledged, changes) = follower.on_node_heartbeat(
            LEADER,
            &[proto::QuiescedGroup {
                container_id: 5,
                term: 4,
                last_log_index: 10,
            }],
            &[(5, follower_view(5, 10))].into(),
            start,
        );
        assert!(acknowledged.is_empty() && changes.is_empty());
    }
}
