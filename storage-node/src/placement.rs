//! Replica placement: which nodes hold a new container, and which of them bootstraps (and so
//! usually leads) it.
//!
//! Owns: the placement policy, as a pure function of the cluster map, so it is unit- and
//! property-tested without a cluster and every replica of the metadata group would reach the
//! same answer.
//! Must not depend on: storage, Raft or the network.
//!
//! Policy, in order:
//! 1. Only nodes carrying every label of the volume's node selector are candidates.
//! 2. Replicas spread over failure domains: the `zone` label, else the `rack` label, else the node
//!    itself. A domain gets a second replica only when every candidate domain has one.
//! 3. Within that, nodes holding fewer containers come first, then nodes with more free blocks,
//!    then lower node ids (a deterministic tie-break).
//! 4. The bootstrap node is the replica that bootstraps the fewest containers, which spreads
//!    leaders over the nodes.
//! 5. Draining nodes, and nodes short of space by their last reported free blocks
//!    (`space::short_of_space`), get no new replicas and are no target of a move.
//!
//! [`plan_move`] decides the replica mover's next step by the same rules: first replicas on down
//! or draining nodes, and replicas their own node reported as failing, move to the best eligible
//! node (repair and drain), then, once nothing is degraded, one replica at a time:
//! - moves off a node short of space to a node with room (relief, unless the policy turns it
//!   off), never losing failure-domain spread: a node that fills up gives replicas away before
//!   its device is full, rather than failing its applies and having them replaced;
//! - else moves from the fullest node to a node holding at least two fewer and with room to
//!   spare (`space::has_room_to_spare`: twice the short line, so relief and rebalancing never
//!   move the same replicas back and forth), never losing failure-domain spread (rebalance).
//!
//! Every move strictly improves the cluster, so a sequence of plans always ends: relief lowers
//! the replica count of nodes short of space, which are never a target; rebalance lowers the
//! sum of squared counts.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::FsError;
use crate::records::{ContainerRecord, NodeRecord};

/// Labels naming failure domains, most significant first.
pub const DOMAIN_LABELS: [&str; 2] = ["zone", "rack"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub replicas: Vec<u64>,
    pub bootstrap_node_id: u64,
}

/// Whether `node` carries every label of `selector`.
pub fn matches_selector(node: &NodeRecord, selector: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| node.labels.get(key) == Some(value))
}

fn failure_domain(node: &NodeRecord) -> String {
    for label in DOMAIN_LABELS {
        if let Some(value) = node.labels.get(label) {
            return format!("{label}={value}");
        }
    }
    format!("node={}", node.node_id)
}

/// Chooses `replication_factor` nodes for a new container.
pub fn place(
    nodes: &[NodeRecord],
    containers: &[ContainerRecord],
    replication_factor: u32,
    selector: &BTreeMap<String, String>,
) -> Result<Placement, FsError> {
    let replication_factor = replication_factor as usize;
    let mut candidates: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|node| !node.draining && matches_selector(node, selector) && has_room(node))
        .collect();
    if candidates.len() < replication_factor {
        return Err(FsError::no_space(format!(
            "replication factor {replication_factor} needs {replication_factor} nodes matching \
             selector {selector:?} with free space; the cluster has {} ({} nodes in all)",
            candidates.len(),
            nodes.len()
        )));
    }
    let mut hosted: BTreeMap<u64, usize> = BTreeMap::new();
    let mut bootstrapped: BTreeMap<u64, usize> = BTreeMap::new();
    for container in containers {
        for replica in &container.replicas {
            *hosted.entry(*replica).or_default() += 1;
        }
        *bootstrapped.entry(container.bootstrap_node_id).or_default() += 1;
    }
    candidates.sort_by_key(|node| {
        (
            hosted.get(&node.node_id).copied().unwrap_or(0),
            std::cmp::Reverse(node.data_block_free_count),
            node.node_id,
        )
    });
    let domain_count = candidates
        .iter()
        .map(|node| failure_domain(node))
        .collect::<BTreeSet<_>>()
        .len();
    let mut replicas: Vec<u64> = Vec::with_capacity(replication_factor);
    let mut used_domains: BTreeMap<String, usize> = BTreeMap::new();
    while replicas.len() < replication_factor {
        // The fewest replicas any domain holds so far, among domains that still have nodes left.
        let round = replicas.len() / domain_count;
        let choice = candidates
            .iter()
            .find(|node| {
                !replicas.contains(&node.node_id)
                    && used_domains
                        .get(&failure_domain(node))
                        .copied()
                        .unwrap_or(0)
                        <= round
            })
            .or_else(|| {
                candidates
                    .iter()
                    .find(|node| !replicas.contains(&node.node_id))
            })
            .expect("enough candidates were checked above");
        replicas.push(choice.node_id);
        *used_domains.entry(failure_domain(choice)).or_default() += 1;
    }
    let bootstrap_node_id = *replicas
        .iter()
        .min_by_key(|node_id| (bootstrapped.get(node_id).copied().unwrap_or(0), **node_id))
        .expect("at least one replica");
    Ok(Placement {
        replicas,
        bootstrap_node_id,
    })
}

/// What the mover routes around: whole nodes down past the grace period, and single replicas
/// that their own node reported as failing again and again (`failing_replicas`). A failing
/// replica is treated like a down node for its container alone: it is repaired, it does not
/// count towards the group's quorum, and its node gets no new copy of that container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub down_nodes: BTreeSet<u64>,
    /// `(container, node)` pairs.
    pub failing_replicas: BTreeSet<(u64, u64)>,
}

impl Faults {
    /// Only whole nodes down.
    pub fn nodes_down(down_nodes: BTreeSet<u64>) -> Self {
        Self {
            down_nodes,
            failing_replicas: BTreeSet::new(),
        }
    }

    /// Whether `node_id`'s replica of `container_id` cannot serve: its node is down, or the
    /// replica was reported failing.
    pub fn replica_lost(&self, container_id: u64, node_id: u64) -> bool {
        self.down_nodes.contains(&node_id)
            || self.failing_replicas.contains(&(container_id, node_id))
    }
}

/// Why a replica moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveReason {
    /// Its node is down past the grace period, or the replica itself keeps failing.
    Repair,
    /// Its node is draining.
    Drain,
    /// Its node holds at least two more replicas than the target.
    Rebalance,
    /// Its node is short of device space; the target has room.
    Relieve,
}

/// What the replica mover may do besides repairs, drains and rebalancing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovePolicy {
    /// Move replicas off nodes short of space (relief). Off only in tests of what happens when a
    /// device fills up regardless.
    pub relieve_short_of_space: bool,
}

impl Default for MovePolicy {
    fn default() -> Self {
        MovePolicy {
            relieve_short_of_space: true,
        }
    }
}

/// One replica move: the replica mover's unit of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMove {
    pub container_id: u64,
    pub from_node_id: u64,
    pub to_node_id: u64,
    pub reason: MoveReason,
}

/// Replicas per node, counting only `replicas` (retiring copies are on their way out).
fn hosted_counts(containers: &[ContainerRecord]) -> BTreeMap<u64, usize> {
    let mut hosted = BTreeMap::new();
    for container in containers {
        for replica in &container.replicas {
            *hosted.entry(*replica).or_default() += 1;
        }
    }
    hosted
}

fn distinct_domains<'a>(nodes: &[NodeRecord], replicas: impl Iterator<Item = &'a u64>) -> usize {
    replicas
        .map(
            |replica| match nodes.iter().find(|node| node.node_id == *replica) {
                Some(node) => failure_domain(node),
                None => format!("node={replica}"),
            },
        )
        .collect::<BTreeSet<_>>()
        .len()
}

/// Whether `node` may receive a replica of `container`.
/// Whether `node` may take a new replica: not short of space by its last reported free blocks
/// (`space::short_of_space`).
fn has_room(node: &NodeRecord) -> bool {
    !crate::space::short_of_space(node.data_block_count, node.data_block_free_count)
}

fn eligible_target(node: &NodeRecord, container: &ContainerRecord, faults: &Faults) -> bool {
    !node.draining
        && has_room(node)
        && !faults.replica_lost(container.container_id, node.node_id)
        && !container.replicas.contains(&node.node_id)
        && !container.retiring.contains(&node.node_id)
        && matches_selector(node, &container.node_selector)
}

/// Whether a container has a lost replica (down node, failing replica), a replica on a draining
/// node, or a move in progress.
pub fn is_degraded(nodes: &[NodeRecord], container: &ContainerRecord, faults: &Faults) -> bool {
    !container.retiring.is_empty()
        || container.replicas.iter().any(|replica| {
            faults.replica_lost(container.container_id, *replica)
                || nodes
                    .iter()
                    .any(|node| node.node_id == *replica && node.draining)
        })
}

/// The replica mover's next move, or `None` when the cluster is settled (or nothing that needs
/// doing can be done now).
pub fn plan_move(
    nodes: &[NodeRecord],
    containers: &[ContainerRecord],
    faults: &Faults,
    policy: &MovePolicy,
) -> Option<ReplicaMove> {
    let hosted = hosted_counts(containers);
    let load = |node_id: u64| hosted.get(&node_id).copied().unwrap_or(0);
    let draining = |node_id: u64| {
        nodes
            .iter()
            .any(|node| node.node_id == node_id && node.draining)
    };
    let mut any_down_replica = false;
    // Repair and drain first.
    for container in containers {
        let live_count = container
            .replicas
            .iter()
            .filter(|replica| !faults.replica_lost(container.container_id, **replica))
            .count();
        for &replica in &container.replicas {
            let reason = if faults.replica_lost(container.container_id, replica) {
                any_down_replica = true;
                MoveReason::Repair
            } else if draining(replica) {
                MoveReason::Drain
            } else {
                continue;
            };
            // A membership change needs the group's quorum.
            if live_count < container.replicas.len() / 2 + 1 {
                continue;
            }
            let remaining: Vec<u64> = container
                .replicas
                .iter()
                .copied()
                .filter(|&other| other != replica)
                .collect();
            let used_domains: BTreeSet<String> = remaining
                .iter()
                .filter_map(|other| nodes.iter().find(|node| node.node_id == *other))
                .map(failure_domain)
                .collect();
            let target = nodes
                .iter()
                .filter(|node| eligible_target(node, container, faults))
                .min_by_key(|node| {
                    (
                        used_domains.contains(&failure_domain(node)),
                        load(node.node_id),
                        std::cmp::Reverse(node.data_block_free_count),
                        node.node_id,
                    )
                });
            if let Some(target) = target {
                return Some(ReplicaMove {
                    container_id: container.container_id,
                    from_node_id: replica,
                    to_node_id: target.node_id,
                    reason,
                });
            }
        }
    }
    // Rebalance only a healthy, quiet cluster: one move at a time, never while repairs wait.
    if any_down_replica
        || containers
            .iter()
            .any(|container| !container.retiring.is_empty())
    {
        return None;
    }
    let live = |node: &&NodeRecord| !node.draining && !faults.down_nodes.contains(&node.node_id);
    if policy.relieve_short_of_space {
        // Relief: the node with the smallest share free first.
        let mut short: Vec<&NodeRecord> = nodes
            .iter()
            .filter(live)
            .filter(|node| !has_room(node))
            .collect();
        short.sort_by_key(|node| {
            (
                free_share_per_million(node.data_block_free_count, node.data_block_count),
                node.node_id,
            )
        });
        for source in short {
            if let Some(planned) = move_off(nodes, containers, faults, source, &load, |_| true) {
                return Some(ReplicaMove {
                    reason: MoveReason::Relieve,
                    ..planned
                });
            }
        }
    }
    let mut sources: Vec<&NodeRecord> = nodes.iter().filter(live).collect();
    sources.sort_by_key(|node| (std::cmp::Reverse(load(node.node_id)), node.node_id));
    sources.into_iter().find_map(|source| {
        move_off(nodes, containers, faults, source, &load, |target| {
            load(target.node_id) + 2 <= load(source.node_id)
                && crate::space::has_room_to_spare(
                    target.data_block_count,
                    target.data_block_free_count,
                )
        })
    })
}

/// Free blocks per million blocks of the device (0 for a device without data blocks).
fn free_share_per_million(free_blocks: u64, data_blocks: u64) -> u64 {
    free_blocks.saturating_mul(1_000_000) / data_blocks.max(1)
}

/// The first container with a replica on `source` that may move to an eligible node accepted
/// by `accept` without losing failure-domain spread, and the best such node (fewest replicas,
/// then most free blocks, then lowest id). The reason given is [`MoveReason::Rebalance`].
fn move_off(
    nodes: &[NodeRecord],
    containers: &[ContainerRecord],
    faults: &Faults,
    source: &NodeRecord,
    load: &impl Fn(u64) -> usize,
    accept: impl Fn(&NodeRecord) -> bool,
) -> Option<ReplicaMove> {
    containers
        .iter()
        .filter(|container| container.replicas.contains(&source.node_id))
        .find_map(|container| {
            let domains_now = distinct_domains(nodes, container.replicas.iter());
            let target = nodes
                .iter()
                .filter(|node| eligible_target(node, container, faults))
                .filter(|node| accept(node))
                .filter(|node| {
                    let moved = container
                        .replicas
                        .iter()
                        .map(|&replica| {
                            if replica == source.node_id {
                                node.node_id
                            } else {
                                replica
                            }
                        })
                        .collect::<Vec<_>>();
                    distinct_domains(nodes, moved.iter()) >= domains_now
                })
                .min_by_key(|node| {
                    (
                        load(node.node_id),
                        std::cmp::Reverse(node.data_block_free_count),
                        node.node_id,
                    )
                })?;
            Some(ReplicaMove {
                container_id: container.container_id,
                from_node_id: source.node_id,
                to_node_id: target.node_id,
                reason: MoveReason::Rebalance,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `plan_move` with the default policy (relief on).
    fn plan(
        nodes: &[NodeRecord],
        containers: &[ContainerRecord],
        faults: &Faults,
    ) -> Option<ReplicaMove> {
        plan_move(nodes, containers, faults, &MovePolicy::default())
    }

    fn node(node_id: u64, labels: &[(&str, &str)], free: u64) -> NodeRecord {
        NodeRecord {
            node_id,
            address: format!("http://node{node_id}:7400"),
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            device_uuid: [node_id as u8; 16],
            // Small enough that no fixture counts as short of space; the test of that sets its
            // own.
            data_block_count: 10,
            data_block_free_count: free,
            registered_ns: 0,
            draining: false,
        }
    }

    fn container(container_id: u64, replicas: &[u64]) -> ContainerRecord {
        ContainerRecord {
            container_id,
            volume_name: format!("v{container_id}"),
            replicas: replicas.to_vec(),
            bootstrap_node_id: replicas[0],
            node_selector: BTreeMap::new(),
            retiring: Vec::new(),
        }
    }

    /// What the mover does with a plan once the group's membership changed.
    fn apply(containers: &mut [ContainerRecord], planned: &ReplicaMove) {
        let record = containers
            .iter_mut()
            .find(|c| c.container_id == planned.container_id)
            .unwrap();
        for replica in record.replicas.iter_mut() {
            if *replica == planned.from_node_id {
                *replica = planned.to_node_id;
            }
        }
    }

    #[test]
    fn a_down_node_is_replaced_by_a_live_one_in_a_new_zone() {
        let nodes = vec![
            node(1, &[("zone", "a")], 10),
            node(2, &[("zone", "b")], 10),
            node(3, &[("zone", "c")], 10),
            node(4, &[("zone", "a")], 900),
            node(5, &[("zone", "c")], 10),
        ];
        let containers = vec![container(7, &[1, 2, 3])];
        let planned = plan(
            &nodes,
            &containers,
            &Faults::nodes_down(BTreeSet::from([3])),
        )
        .unwrap();
        assert_eq!(
            planned,
            ReplicaMove {
                container_id: 7,
                from_node_id: 3,
                to_node_id: 5,
                reason: MoveReason::Repair
            },
            "zone c lost its replica; node 5 is the only other node in zone c"
        );
    }

    #[test]
    fn a_node_short_of_space_gets_no_replica_and_is_no_target() {
        // 10,000 blocks: short of space below 1,000 free.
        let sized = |node_id: u64, free: u64| NodeRecord {
            data_block_count: 10_000,
            ..node(node_id, &[], free)
        };
        let nodes = vec![
            sized(1, 5_000),
            sized(2, 5_000),
            sized(3, 5_000),
            sized(4, 999),
            sized(5, 1_000),
        ];
        // Node 4 holds nothing, so it would come first; it is short of space.
        let placement = place(&nodes, &[container(9, &[1, 2, 3])], 1, &BTreeMap::new()).unwrap();
        assert_eq!(placement.replicas, vec![5]);
        let error = place(&nodes[..4], &[], 4, &BTreeMap::new()).unwrap_err();
        assert!(error.message.contains("free space"), "{error}");
        // Repair: node 3 is down; node 4 (emptiest, short of space) is passed over for node 5.
        let containers = vec![container(7, &[1, 2, 3])];
        let faults = Faults::nodes_down(BTreeSet::from([3]));
        assert_eq!(
            plan(&nodes, &containers, &faults).map(|planned| planned.to_node_id),
            Some(5)
        );
        // With no other node, nothing moves (rather than onto a node that would soon fail).
        assert_eq!(plan(&nodes[..4], &containers, &faults), None);
        // Rebalance never fills a node short of space either.
        let busy = vec![container(7, &[1, 2, 3]), container(8, &[1, 2, 3])];
        assert_eq!(plan(&nodes[..4], &busy, &Faults::default()), None);
    }

    #[test]
    fn a_node_short_of_space_gives_replicas_away_to_nodes_with_room() {
        // 10,000 blocks: short of space below 1,000 free. Node 2 is short.
        let sized = |node_id: u64, free: u64| NodeRecord {
            data_block_count: 10_000,
            ..node(node_id, &[], free)
        };
        let nodes = vec![
            sized(1, 5_000),
            sized(2, 500),
            sized(3, 5_000),
            sized(4, 4_000),
            sized(5, 6_000),
        ];
        let mut pinned = container(9, &[2]);
        pinned.node_selector = BTreeMap::from([("zone".to_owned(), "z2".to_owned())]);
        // Two replicas on every node: count-based rebalancing has nothing to do.
        let mut containers = vec![
            pinned,
            container(7, &[1, 2, 3]),
            container(8, &[3, 4, 5]),
            container(10, &[1, 4, 5]),
        ];
        // The pinned container has nowhere else to go; 7 moves to the node with the most room
        // among those holding the fewest replicas.
        let first = plan(&nodes, &containers, &Faults::default()).expect("a relief move");
        assert_eq!(
            first,
            ReplicaMove {
                container_id: 7,
                from_node_id: 2,
                to_node_id: 5,
                reason: MoveReason::Relieve
            }
        );
        // Turned off: only count-based rebalancing, which leaves these counts alone.
        let off = MovePolicy {
            relieve_short_of_space: false,
        };
        assert_eq!(
            plan_move(&nodes, &containers, &Faults::default(), &off),
            None
        );
        // Not while anything is degraded: repairs come first.
        let faults = Faults::nodes_down(BTreeSet::from([4]));
        assert_eq!(
            plan(&nodes, &containers, &faults).map(|planned| planned.reason),
            Some(MoveReason::Repair)
        );
        // Followed to the end (free counts as last reported): node 2 keeps only the pinned
        // container, is never a target, and the sequence ends.
        let mut moves = 0;
        while let Some(planned) = plan(&nodes, &containers, &Faults::default()) {
            assert_ne!(planned.to_node_id, 2, "{planned:?}");
            apply(&mut containers, &planned);
            moves += 1;
            assert!(moves <= 10, "relief must end");
        }
        let on_two: Vec<u64> = containers
            .iter()
            .filter(|container| container.replicas.contains(&2))
            .map(|container| container.container_id)
            .collect();
        assert_eq!(on_two, vec![9]);

        // Back over the short line but without room to spare (15 % free), node 2 is no
        // balancing target although it holds two fewer replicas than others; a repair may
        // still use it.
        let mut recovered = nodes.clone();
        recovered[1].data_block_free_count = 1_500;
        let crowded = vec![
            container(11, &[1, 3, 4]),
            container(12, &[1, 3, 5]),
            container(13, &[1, 4, 5]),
        ];
        assert_eq!(plan(&recovered, &crowded, &Faults::default()), None);
        recovered[1].data_block_free_count = 2_000;
        assert_eq!(
            plan(&recovered, &crowded, &Faults::default()).map(|planned| planned.to_node_id),
            Some(2)
        );
        recovered[1].data_block_free_count = 1_500;
        let faults = Faults::nodes_down(BTreeSet::from([5]));
        assert_eq!(
            plan(&recovered, &crowded, &faults).map(|planned| (planned.to_node_id, planned.reason)),
            Some((2, MoveReason::Repair))
        );
    }

    #[test]
    fn a_failing_replica_is_replaced_for_its_container_alone() {
        let nodes = vec![
            node(1, &[], 10),
            node(2, &[], 10),
            node(3, &[], 10),
            node(4, &[], 10),
        ];
        let containers = vec![container(7, &[1, 2, 3]), container(8, &[2, 3, 4])];
        let faults = Faults {
            down_nodes: BTreeSet::new(),
            failing_replicas: BTreeSet::from([(7, 3)]),
        };
        assert!(is_degraded(&nodes, &containers[0], &faults));
        assert!(!is_degraded(&nodes, &containers[1], &faults));
        assert_eq!(
            plan(&nodes, &containers, &faults),
            Some(ReplicaMove {
                container_id: 7,
                from_node_id: 3,
                to_node_id: 4,
                reason: MoveReason::Repair
            })
        );
        // Node 3's replica of 8 is fine: nothing else moves, and node 3 is never a target of 7.
        let mut moved = containers.clone();
        apply(&mut moved, &plan(&nodes, &containers, &faults).unwrap());
        assert_eq!(plan(&nodes, &moved, &faults), None);
        let without_spare = vec![container(7, &[1, 2, 4]), container(8, &[2, 3, 4])];
        let faults_on_4 = Faults {
            down_nodes: BTreeSet::new(),
            failing_replicas: BTreeSet::from([(7, 4), (7, 3)]),
        };
        assert_eq!(
            plan(&nodes, &without_spare, &faults_on_4),
            None,
            "the only node without a replica of 7 reported failing it"
        );
        // A failing replica does not count towards the quorum a membership change needs.
        let two_failing = Faults {
            down_nodes: BTreeSet::new(),
            failing_replicas: BTreeSet::from([(7, 2), (7, 3)]),
        };
        assert_eq!(plan(&nodes, &containers[..1], &two_failing), None);
    }

    #[test]
    fn no_move_without_a_quorum_or_a_target() {
        let nodes = vec![
            node(1, &[], 10),
            node(2, &[], 10),
            node(3, &[], 10),
            node(4, &[], 10),
        ];
        let containers = vec![container(7, &[1, 2, 3])];
        assert_eq!(
            plan(
                &nodes,
                &containers,
                &Faults::nodes_down(BTreeSet::from([2, 3]))
            ),
            None
        );
        let three = &nodes[..3];
        assert_eq!(
            plan(three, &containers, &Faults::nodes_down(BTreeSet::from([3]))),
            None
        );
    }

    #[test]
    fn a_draining_node_is_emptied() {
        let mut nodes = vec![
            node(1, &[], 10),
            node(2, &[], 10),
            node(3, &[], 10),
            node(4, &[], 10),
        ];
        nodes[1].draining = true;
        let mut containers = vec![container(1, &[1, 2, 3]), container(2, &[2, 3, 4])];
        let mut steps = 0;
        while let Some(planned) = plan(&nodes, &containers, &Faults::default()) {
            assert_ne!(planned.to_node_id, 2);
            apply(&mut containers, &planned);
            steps += 1;
            assert!(steps < 10, "plans keep coming");
        }
        assert!(containers.iter().all(|c| !c.replicas.contains(&2)));
    }

    #[test]
    fn a_new_node_receives_replicas() {
        let nodes = vec![
            node(1, &[], 10),
            node(2, &[], 10),
            node(3, &[], 10),
            node(4, &[], 10),
        ];
        let mut containers: Vec<ContainerRecord> =
            (1..=4).map(|id| container(id, &[1, 2, 3])).collect();
        let mut steps = 0;
        while let Some(planned) = plan(&nodes, &containers, &Faults::default()) {
            assert_eq!(planned.reason, MoveReason::Rebalance);
            apply(&mut containers, &planned);
            steps += 1;
            assert!(steps < 10, "plans keep coming");
        }
        let hosted = hosted_counts(&containers);
        assert_eq!(
            hosted.values().copied().collect::<Vec<_>>(),
            vec![3, 3, 3, 3]
        );
    }

    #[test]
    fn spreads_over_zones_before_doubling_up() {
        let nodes = vec![
            node(1, &[("zone", "a")], 900),
            node(2, &[("zone", "a")], 800),
            node(3, &[("zone", "b")], 100),
            node(4, &[("zone", "c")], 50),
        ];
        let placement = place(&nodes, &[], 3, &BTreeMap::new()).unwrap();
        let mut replicas = placement.replicas.clone();
        replicas.sort();
        assert_eq!(replicas, vec![1, 3, 4], "one replica per zone");
    }

    #[test]
    fn honours_the_selector_and_refuses_when_too_few_match() {
        let nodes = vec![
            node(1, &[("gpu", "true")], 10),
            node(2, &[], 900),
            node(3, &[("gpu", "true")], 20),
        ];
        let selector = BTreeMap::from([("gpu".to_owned(), "true".to_owned())]);
        let placement = place(&nodes, &[], 2, &selector).unwrap();
        let mut replicas = placement.replicas;
        replicas.sort();
        assert_eq!(replicas, vec![1, 3]);
        let error = place(&nodes, &[], 3, &selector).unwrap_err();
        assert!(error.message.contains("needs 3 nodes"), "{}", error.message);
    }

    #[test]
    fn bootstrap_nodes_rotate() {
        let nodes = vec![node(1, &[], 10), node(2, &[], 10), node(3, &[], 10)];
        let mut containers = Vec::new();
        let mut bootstraps = Vec::new();
        for container_id in 1..=6 {
            let placement = place(&nodes, &containers, 3, &BTreeMap::new()).unwrap();
            bootstraps.push(placement.bootstrap_node_id);
            containers.push(ContainerRecord {
                container_id,
                volume_name: format!("v{container_id}"),
                replicas: placement.replicas,
                bootstrap_node_id: placement.bootstrap_node_id,
                node_selector: BTreeMap::new(),
                retiring: Vec::new(),
            });
        }
        for node_id in 1..=3 {
            assert_eq!(bootstraps.iter().filter(|&&b| b == node_id).count(), 2);
        }
    }

    proptest! {
        #[test]
        fn replicas_are_distinct_matching_and_spread(
            zones in proptest::collection::vec(0u8..4, 1..9),
            gpu in proptest::collection::vec(any::<bool>(), 9),
            replication_factor in 1u32..5,
            want_gpu in any::<bool>(),
        ) {
            let nodes: Vec<NodeRecord> = zones.iter().enumerate().map(|(index, zone)| {
                let zone = format!("z{zone}");
                let mut labels = vec![("zone", zone.as_str())];
                if gpu[index] { labels.push(("gpu", "yes")); }
                node(index as u64 + 1, &labels, (index as u64 * 37) % 11)
            }).collect();
            let selector = if want_gpu {
                BTreeMap::from([("gpu".to_owned(), "yes".to_owned())])
            } else {
                BTreeMap::new()
            };
            let matching: Vec<&NodeRecord> =
                nodes.iter().filter(|n| matches_selector(n, &selector)).collect();
            match place(&nodes, &[], replication_factor, &selector) {
                Err(_) => prop_assert!(matching.len() < replication_factor as usize),
                Ok(placement) => {
                    prop_assert_eq!(placement.replicas.len(), replication_factor as usize);
                    let distinct: BTreeSet<u64> = placement.replicas.iter().copied().collect();
                    prop_assert_eq!(distinct.len(), placement.replicas.len());
                    prop_assert!(placement.replicas.contains(&placement.bootstrap_node_id));
                    for replica in &placement.replicas {
                        let record = nodes.iter().find(|n| n.node_id == *replica).unwrap();
                        prop_assert!(matches_selector(record, &selector));
                    }
                    // Spread: the used domains are as many as possible.
                    let available: BTreeSet<String> =
                        matching.iter().map(|n| failure_domain(n)).collect();
                    let used: BTreeSet<String> = placement.replicas.iter()
                        .map(|r| failure_domain(nodes.iter().find(|n| n.node_id == *r).unwrap()))
                        .collect();
                    prop_assert_eq!(used.len(), available.len().min(replication_factor as usize));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn plans_are_valid_and_end(
            zones in proptest::collection::vec(0u8..3, 2..8),
            placements in proptest::collection::vec(proptest::collection::btree_set(0usize..8, 1..4), 1..12),
            down_mask in proptest::collection::vec(any::<bool>(), 8),
            draining_mask in proptest::collection::vec(any::<bool>(), 8),
            failing_mask in proptest::collection::vec(any::<bool>(), 12),
        ) {
            let mut nodes: Vec<NodeRecord> = zones.iter().enumerate().map(|(index, zone)| {
                let zone = format!("z{zone}");
                node(index as u64 + 1, &[("zone", zone.as_str())], 10)
            }).collect();
            for (index, node) in nodes.iter_mut().enumerate() {
                node.draining = draining_mask[index] && index % 3 == 0;
            }
            let down: BTreeSet<u64> = (0..nodes.len())
                .filter(|index| down_mask[*index] && index % 2 == 1)
                .map(|index| index as u64 + 1)
                .collect();
            let mut containers: Vec<ContainerRecord> = placements.iter().enumerate()
                .map(|(index, set)| {
                    let replicas: Vec<u64> = set.iter()
                        .map(|slot| (*slot % nodes.len()) as u64 + 1)
                        .collect::<BTreeSet<u64>>().into_iter().collect();
                    container(index as u64 + 1, &replicas)
                })
                .collect();
            // Some containers have their first replica reported failing.
            let failing_replicas: BTreeSet<(u64, u64)> = containers.iter().enumerate()
                .filter(|(index, _)| failing_mask[*index])
                .map(|(_, record)| (record.container_id, record.replicas[0]))
                .collect();
            let faults = Faults { down_nodes: down, failing_replicas };
            let step_max = containers.len() * 4 * nodes.len() + 1;
            let mut steps = 0;
            while let Some(planned) = plan(&nodes, &containers, &faults) {
                let record = containers.iter().find(|c| c.container_id == planned.container_id).unwrap();
                prop_assert!(record.replicas.contains(&planned.from_node_id));
                prop_assert!(!record.replicas.contains(&planned.to_node_id));
                let target = nodes.iter().find(|n| n.node_id == planned.to_node_id).unwrap();
                prop_assert!(!target.draining
                    && !faults.replica_lost(planned.container_id, target.node_id));
                apply(&mut containers, &planned);
                steps += 1;
                prop_assert!(steps <= step_max, "the plans never end");
            }
            // Settled: no replica is lost or sits on a draining node while a live, non-draining
            // node without a replica of that container exists and a quorum is alive.
            for record in &containers {
                let lost = |r: &u64| faults.replica_lost(record.container_id, *r);
                let live = record.replicas.iter().filter(|r| !lost(r)).count();
                let bad = record.replicas.iter().any(|r| {
                    lost(r) || nodes.iter().any(|n| n.node_id == *r && n.draining)
                });
                let spare = nodes.iter().any(|n| eligible_target(n, record, &faults));
                prop_assert!(!(bad && spare && live > record.replicas.len() / 2),
                    "container {} left degraded: {:?}", record.container_id, record.replicas);
            }
        }
    }
}
