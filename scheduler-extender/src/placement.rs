//! Where a pod's Ballast data lives, and what that makes each candidate node worth.
//!
//! Owns: the mapping pod → PersistentVolumeClaims → Ballast volumes (by the volume labels the
//! CSI plugin records), Kubernetes node name → Ballast nodes (by a storage-node label, default
//! `kubernetes.io/hostname`), the score of a node and the `require` filter rule.
//! Must not depend on: the network (it works on one listing of volumes and nodes), the HTTP
//! server or the wire protocol.
//! Invariants:
//! - Pure: the same listing and pod always give the same scores.
//! - A volume counts on a node only through replicas that will stay there: retiring replicas
//!   (being moved away) and replicas on storage nodes reported down do not count.
//! - For each volume a node holding its leader earns [`LEADER_POINTS`], one holding only a
//!   replica [`REPLICA_POINTS`]; volumes are weighted by their used bytes (at least
//!   [`VOLUME_WEIGHT_BYTES_MIN`], so new, empty volumes still count). The score is the weighted
//!   share of the best possible, scaled to 0..=[`SCORE_MAX`]; any data at all scores at least 1,
//!   so "some data" never ties with "none".
//! - Claims without a Ballast volume (other storage, or not provisioned yet under
//!   `WaitForFirstConsumer`) constrain nothing.

use std::collections::{BTreeSet, HashMap};

use ballast_client::proto;
use ballast_client::volume_labels;
use k8s_openapi::api::core::v1::Pod;

use crate::protocol::SCORE_MAX;

/// Points for a node that holds a volume's leader (reads and writes are served there).
pub const LEADER_POINTS: u64 = 2;
/// Points for a node that holds a replica but not the leader.
pub const REPLICA_POINTS: u64 = 1;
/// Smallest weight of a volume, so an empty volume still counts.
pub const VOLUME_WEIGHT_BYTES_MIN: u64 = 1 << 20;

/// Storage-node state that means unreachable (`NodeInfo.state`).
const NODE_STATE_DOWN: &str = "down";

/// A PersistentVolumeClaim by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ClaimKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.namespace, self.name)
    }
}

/// The claims a pod uses: `persistentVolumeClaim` volumes, and generic ephemeral volumes (whose
/// claim Kubernetes names `<pod name>-<volume name>`). Each claim once, in the pod's order.
pub fn claims_of(pod: &Pod) -> Vec<ClaimKey> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let pod_name = pod.metadata.name.as_deref().unwrap_or("");
    let mut claims: Vec<ClaimKey> = Vec::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.volumes.as_ref())
        .into_iter()
        .flatten();
    for volume in volumes {
        let name = if let Some(source) = &volume.persistent_volume_claim {
            source.claim_name.clone()
        } else if volume.ephemeral.is_some() && !pod_name.is_empty() {
            format!("{pod_name}-{}", volume.name)
        } else {
            continue;
        };
        let claim = ClaimKey {
            namespace: namespace.to_owned(),
            name,
        };
        if !claim.name.is_empty() && !claims.contains(&claim) {
            claims.push(claim);
        }
    }
    claims
}

/// Where one Ballast volume's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLocation {
    pub volume_name: String,
    /// The leader, when known and on a live, non-retiring replica.
    pub leader_node_id: Option<u64>,
    /// Live replicas that stay (the leader included).
    pub holder_node_ids: BTreeSet<u64>,
    pub weight_bytes: u64,
    created_ns: u64,
}

/// One listing of the cluster, indexed for scheduling decisions.
#[derive(Debug, Clone, Default)]
pub struct ClusterPlacement {
    ballast_nodes_by_kubernetes_node: HashMap<String, BTreeSet<u64>>,
    volumes_by_claim: HashMap<ClaimKey, VolumeLocation>,
}

impl ClusterPlacement {
    /// Indexes a listing. `node_name_label` is the storage-node label whose value is the
    /// Kubernetes node name.
    pub fn from_listing(
        volumes: &[proto::Volume],
        nodes: &[proto::NodeInfo],
        node_name_label: &str,
    ) -> Self {
        let mut ballast_nodes_by_kubernetes_node: HashMap<String, BTreeSet<u64>> = HashMap::new();
        let mut down_node_ids = BTreeSet::new();
        for node in nodes {
            if node.state == NODE_STATE_DOWN {
                down_node_ids.insert(node.node_id);
            }
            if let Some(kubernetes_node) = node.labels.get(node_name_label) {
                ballast_nodes_by_kubernetes_node
                    .entry(kubernetes_node.clone())
                    .or_default()
                    .insert(node.node_id);
            }
        }
        let mut volumes_by_claim: HashMap<ClaimKey, VolumeLocation> = HashMap::new();
        for volume in volumes {
            let (Some(namespace), Some(name)) = (
                volume.labels.get(volume_labels::PVC_NAMESPACE),
                volume.labels.get(volume_labels::PVC_NAME),
            ) else {
                continue;
            };
            let holder_node_ids: BTreeSet<u64> = volume
                .replica_node_ids
                .iter()
                .copied()
                .filter(|id| !volume.retiring_node_ids.contains(id) && !down_node_ids.contains(id))
                .collect();
            let leader_node_id = if volume.leader_node_id != 0 {
                Some(volume.leader_node_id)
            } else if volume.replica_node_ids.len() == 1 {
                // A single-replica group always leads itself; the answering node may just not
                // host it and so not know.
                volume.replica_node_ids.first().copied()
            } else {
                None
            }
            .filter(|id| holder_node_ids.contains(id));
            let location = VolumeLocation {
                volume_name: volume.name.clone(),
                leader_node_id,
                holder_node_ids,
                weight_bytes: volume.used_bytes.max(VOLUME_WEIGHT_BYTES_MIN),
                created_ns: volume.created_ns,
            };
            let claim = ClaimKey {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            // A claim deleted and created again may leave an older (retained) volume with the
            // same labels: the newest volume is the one bound to the claim that exists now.
            match volumes_by_claim.get(&claim) {
                Some(existing) if existing.created_ns > location.created_ns => {}
                _ => {
                    volumes_by_claim.insert(claim, location);
                }
            }
        }
        Self {
            ballast_nodes_by_kubernetes_node,
            volumes_by_claim,
        }
    }

    /// The Ballast volumes behind `claims` (claims without one are left out).
    pub fn volumes_of(&self, claims: &[ClaimKey]) -> Vec<&VolumeLocation> {
        let mut volumes: Vec<&VolumeLocation> = Vec::new();
        for claim in claims {
            if let Some(volume) = self.volumes_by_claim.get(claim) {
                if !volumes
                    .iter()
                    .any(|seen| seen.volume_name == volume.volume_name)
                {
                    volumes.push(volume);
                }
            }
        }
        volumes
    }

    /// The Ballast nodes running on Kubernetes node `kubernetes_node` (usually one).
    pub fn ballast_nodes_on(&self, kubernetes_node: &str) -> Option<&BTreeSet<u64>> {
        self.ballast_nodes_by_kubernetes_node.get(kubernetes_node)
    }

    /// What `volume` earns node `kubernetes_node`: leader, replica or nothing.
    pub fn points(&self, volume: &VolumeLocation, kubernetes_node: &str) -> u64 {
        let Some(ballast_nodes) = self.ballast_nodes_on(kubernetes_node) else {
            return 0;
        };
        if volume
            .leader_node_id
            .is_some_and(|leader| ballast_nodes.contains(&leader))
        {
            LEADER_POINTS
        } else if volume
            .holder_node_ids
            .iter()
            .any(|holder| ballast_nodes.contains(holder))
        {
            REPLICA_POINTS
        } else {
            0
        }
    }

    /// The score 0..=[`SCORE_MAX`] of `kubernetes_node` for a pod using `volumes`.
    pub fn score(&self, volumes: &[&VolumeLocation], kubernetes_node: &str) -> i64 {
        let best: u128 = volumes
            .iter()
            .map(|volume| u128::from(volume.weight_bytes) * u128::from(LEADER_POINTS))
            .sum();
        let held: u128 = volumes
            .iter()
            .map(|volume| {
                u128::from(volume.weight_bytes) * u128::from(self.points(volume, kubernetes_node))
            })
            .sum();
        if held == 0 || best == 0 {
            return 0;
        }
        let scaled = held * SCORE_MAX as u128 / best;
        (scaled as i64).clamp(1, SCORE_MAX)
    }

    /// Why `kubernetes_node` fails the `require` policy (it lacks a replica of one of
    /// `volumes`), or `None` when it holds a replica of every one.
    pub fn missing_replicas(
        &self,
        volumes: &[&VolumeLocation],
        kubernetes_node: &str,
    ) -> Option<String> {
        let missing: Vec<&str> = volumes
            .iter()
            .filter(|volume| self.points(volume, kubernetes_node) == 0)
            .map(|volume| volume.volume_name.as_str())
            .collect();
        if missing.is_empty() {
            return None;
        }
        Some(if self.ballast_nodes_on(kubernetes_node).is_none() {
            format!(
                "no Ballast storage node runs here; the pod's data is in Ballast volume(s) {}",
                missing.join(", ")
            )
        } else {
            format!(
                "holds no replica of Ballast volume(s) {} (filter policy require)",
                missing.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTNAME: &str = "kubernetes.io/hostname";

    fn node(node_id: u64, kubernetes_node: &str, state: &str) -> proto::NodeInfo {
        proto::NodeInfo {
            node_id,
            labels: [(HOSTNAME.to_owned(), kubernetes_node.to_owned())]
                .into_iter()
                .collect(),
            state: state.to_owned(),
            ..Default::default()
        }
    }

    fn volume(
        name: &str,
        claim: &str,
        replicas: &[u64],
        leader: u64,
        used_bytes: u64,
    ) -> proto::Volume {
        proto::Volume {
            name: name.to_owned(),
            replica_node_ids: replicas.to_vec(),
            leader_node_id: leader,
            used_bytes,
            labels: [
                (volume_labels::PVC_NAMESPACE.to_owned(), "shop".to_owned()),
                (volume_labels::PVC_NAME.to_owned(), claim.to_owned()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    fn claim(name: &str) -> ClaimKey {
        ClaimKey {
            namespace: "shop".to_owned(),
            name: name.to_owned(),
        }
    }

    fn cluster(volumes: &[proto::Volume]) -> ClusterPlacement {
        let nodes = [
            node(1, "k1", "up"),
            node(2, "k2", "up"),
            node(3, "k3", "up"),
            node(4, "k4", "up"),
        ];
        ClusterPlacement::from_listing(volumes, &nodes, HOSTNAME)
    }

    #[test]
    fn leader_beats_replica_beats_nothing() {
        let placement = cluster(&[volume("pvc-a", "data", &[1, 2, 3], 2, 0)]);
        let volumes = placement.volumes_of(&[claim("data")]);
        assert_eq!(volumes.len(), 1);
        assert_eq!(placement.score(&volumes, "k2"), 10);
        assert_eq!(placement.score(&volumes, "k1"), 5);
        assert_eq!(placement.score(&volumes, "k3"), 5);
        assert_eq!(placement.score(&volumes, "k4"), 0);
        assert_eq!(placement.score(&volumes, "not-a-storage-node"), 0);
        assert!(placement.missing_replicas(&volumes, "k1").is_none());
        assert!(placement
            .missing_replicas(&volumes, "k4")
            .unwrap()
            .contains("pvc-a"));
        assert!(placement
            .missing_replicas(&volumes, "elsewhere")
            .unwrap()
            .contains("no Ballast storage node"));
    }

    #[test]
    fn volumes_are_weighted_by_used_bytes() {
        let gib = 1u64 << 30;
        // Big volume led on 1 (replica on 2), small volume led on 3 (replica on 2).
        let placement = cluster(&[
            volume("pvc-big", "big", &[1, 2], 1, 9 * gib),
            volume("pvc-small", "small", &[3, 2], 3, gib),
        ]);
        let volumes = placement.volumes_of(&[claim("big"), claim("small")]);
        // k1: 9 GiB * 2 of 10 GiB * 2 = 0.9 → 9; k2: (9+1)*1 / 20 → 5; k3: 1*2/20 → 1.
        assert_eq!(placement.score(&volumes, "k1"), 9);
        assert_eq!(placement.score(&volumes, "k2"), 5);
        assert_eq!(placement.score(&volumes, "k3"), 1);
        assert_eq!(placement.score(&volumes, "k4"), 0);
        // Require: only k2 holds both.
        assert!(placement.missing_replicas(&volumes, "k2").is_none());
        assert!(placement.missing_replicas(&volumes, "k1").is_some());
    }

    #[test]
    fn any_data_scores_at_least_one() {
        let placement = cluster(&[
            volume("pvc-huge", "huge", &[1], 1, 1 << 40),
            volume("pvc-tiny", "tiny", &[2], 2, 0),
        ]);
        let volumes = placement.volumes_of(&[claim("huge"), claim("tiny")]);
        assert_eq!(placement.score(&volumes, "k2"), 1);
        assert_eq!(placement.score(&volumes, "k1"), 9);
    }

    #[test]
    fn retiring_down_and_unknown_leaders() {
        let mut moving = volume("pvc-m", "moving", &[1, 2, 3], 1, 0);
        moving.retiring_node_ids = vec![1];
        let nodes = [
            node(1, "k1", "up"),
            node(2, "k2", "down"),
            node(3, "k3", "up"),
        ];
        let placement = ClusterPlacement::from_listing(&[moving], &nodes, HOSTNAME);
        let volumes = placement.volumes_of(&[claim("moving")]);
        // The retiring leader and the down replica do not count; the live replica does.
        assert_eq!(volumes[0].leader_node_id, None);
        assert_eq!(placement.score(&volumes, "k1"), 0);
        assert_eq!(placement.score(&volumes, "k2"), 0);
        assert_eq!(placement.score(&volumes, "k3"), 5);

        // rf=1 with the leader unknown to the answering node: the only replica leads.
        let placement = cluster(&[volume("pvc-one", "one", &[4], 0, 0)]);
        let volumes = placement.volumes_of(&[claim("one")]);
        assert_eq!(placement.score(&volumes, "k4"), 10);
        // rf=3 with the leader unknown: replicas only.
        let placement = cluster(&[volume("pvc-three", "three", &[1, 2, 3], 0, 0)]);
        let volumes = placement.volumes_of(&[claim("three")]);
        assert_eq!(placement.score(&volumes, "k1"), 5);
    }

    #[test]
    fn claims_without_ballast_volumes_constrain_nothing() {
        let mut unlabelled = volume("plain", "ignored", &[1], 1, 0);
        unlabelled.labels.clear();
        let placement = cluster(&[unlabelled]);
        assert!(placement
            .volumes_of(&[claim("ignored"), claim("other")])
            .is_empty());
        assert_eq!(placement.score(&[], "k1"), 0);
    }

    #[test]
    fn the_newest_volume_of_a_claim_wins_and_label_key_is_configurable() {
        let mut old = volume("pvc-old", "data", &[1], 1, 0);
        old.created_ns = 10;
        let mut new = volume("pvc-new", "data", &[2], 2, 0);
        new.created_ns = 20;
        for order in [[old.clone(), new.clone()], [new.clone(), old.clone()]] {
            let placement = cluster(&order);
            assert_eq!(
                placement.volumes_of(&[claim("data")])[0].volume_name,
                "pvc-new"
            );
        }
        let mut labelled = node(1, "ignored", "up");
        labelled
            .labels
            .insert("example.com/node".to_owned(), "custom".to_owned());
        let placement = ClusterPlacement::from_listing(&[old], &[labelled], "example.com/node");
        let volumes = placement.volumes_of(&[claim("data")]);
        assert_eq!(placement.score(&volumes, "custom"), 10);
        assert_eq!(placement.score(&volumes, "ignored"), 0);
    }

    #[test]
    fn pod_claims_in_both_volume_forms() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "job-1", "namespace": "ml"},
            "spec": {
                "containers": [{"name": "train"}],
                "volumes": [
                    {"name": "data", "persistentVolumeClaim": {"claimName": "training-set"}},
                    {"name": "again", "persistentVolumeClaim": {"claimName": "training-set"}},
                    {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {
                        "spec": {"accessModes": ["ReadWriteOnce"]}}}},
                    {"name": "tmp", "emptyDir": {}}
                ]
            }
        }))
        .unwrap();
        let names: Vec<String> = claims_of(&pod).iter().map(ToString::to_string).collect();
        assert_eq!(names, ["ml/training-set", "ml/job-1-scratch"]);
        let bare: Pod = serde_json::from_value(serde_json::json!({"metadata": {}})).unwrap();
        assert!(claims_of(&bare).is_empty());
    }
}
