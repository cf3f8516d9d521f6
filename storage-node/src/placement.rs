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
        .filter(|node| matches_selector(node, selector))
        .collect();
    if candidates.len() < replication_factor {
        return Err(FsError::no_space(format!(
            "replication factor {replication_factor} needs {replication_factor} nodes matching \
             selector {selector:?}; the cluster has {} ({} nodes in all)",
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(node_id: u64, labels: &[(&str, &str)], free: u64) -> NodeRecord {
        NodeRecord {
            node_id,
            address: format!("http://node{node_id}:7400"),
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            device_uuid: [node_id as u8; 16],
            data_block_count: 1000,
            data_block_free_count: free,
            registered_ns: 0,
        }
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
}
