//! Elasticity end to end, with real `ballast-node` processes: re-replication after a node is
//! lost for good, rebalancing onto a new node ("explode"), and draining a node ("fold").
//!
//! What must hold after each: every container has exactly its rf replicas, none on the lost or
//! drained node and none still moving; the replicas of every container have the same applied
//! index and digest (no divergence); every file written before (fsync'd) reads back with its
//! exact bytes from the cluster; writes keep working while replicas move. Seeds are logged so a
//! failure can be replayed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_tests::cluster::TestCluster;
use ballast_tests::{
    end_to_end_available, read_uncached, seed, wait_until, write_fsync, Generator,
};

const DEVICE_SIZE_BYTES: u64 = 2 << 30;
/// A short grace period, so a lost node is replaced within the test's time.
const DOWN_GRACE_MS: &str = "3000";
const VOLUMES: [&str; 3] = ["alpha", "beta", "gamma"];

/// Files written so far: path → bytes.
#[derive(Default)]
struct Written(BTreeMap<PathBuf, Vec<u8>>);

impl Written {
    /// Writes `count` files of up to 3 MiB into `directory`.
    fn write(&mut self, directory: &Path, generator: &mut Generator, count: usize) {
        for _ in 0..count {
            let path = directory.join(format!("file-{:04}", self.0.len()));
            let length = 4096 + generator.below(3 << 20) as usize;
            let data = generator.bytes(length);
            write_fsync(&path, &data);
            self.0.insert(path, data);
        }
    }

    fn verify(&self) {
        let mut bad = Vec::new();
        for (path, expected) in &self.0 {
            match read_uncached(path) {
                Ok(actual) if actual == *expected => {}
                Ok(actual) => bad.push(format!("{path:?}: {} bytes differ", actual.len())),
                Err(error) => bad.push(format!("{path:?}: {error}")),
            }
        }
        assert!(bad.is_empty(), "files lost or wrong: {bad:?}");
    }
}

fn start(node_count: usize) -> TestCluster {
    TestCluster::start(
        node_count,
        DEVICE_SIZE_BYTES,
        &["--down-grace-ms", DOWN_GRACE_MS],
    )
    .expect("cluster")
}

/// Creates the volumes (rf=3) and mounts each through node `mount_node` with every endpoint.
fn create_and_mount(cluster: &mut TestCluster, mount_node: u64) -> Vec<PathBuf> {
    let endpoints = cluster.endpoints();
    VOLUMES
        .iter()
        .map(|volume| {
            cluster
                .create_replicated_volume(volume, "1GiB", 3)
                .expect("create volume");
            cluster
                .node_mut(mount_node)
                .mount_via(volume, &endpoints)
                .expect("mount")
        })
        .collect()
}

/// Waits until every volume has 3 replicas, none moving and none on `excluded`, and the
/// replicas converged; returns the placements.
fn wait_fully_replicated(cluster: &TestCluster, excluded: &[u64]) -> BTreeMap<String, Vec<u64>> {
    let mut placements = BTreeMap::new();
    for volume in VOLUMES {
        let mut last = (Vec::new(), Vec::new());
        let settled = wait_until(
            &format!("{volume} back at rf=3 without nodes {excluded:?}"),
            Duration::from_secs(180),
            || {
                let Ok(placement) = cluster.placement(volume) else {
                    return false;
                };
                last = placement;
                let (replicas, moving) = &last;
                replicas.len() == 3
                    && moving.is_empty()
                    && replicas.iter().all(|replica| !excluded.contains(replica))
            },
        );
        if let Err(error) = settled {
            let logs: Vec<String> = cluster
                .nodes
                .iter()
                .filter(|node| node.is_running())
                .map(|node| format!("node {} log tail:\n{}", node.node_id, node.log_tail()))
                .collect();
            panic!(
                "{error}; last placement {last:?}\n{}\n{}",
                cluster.cli(&["node", "list"]).unwrap_or_default(),
                logs.join("\n")
            );
        }
        let replicas = last.0;
        let digest = cluster
            .wait_converged_on(volume, &replicas, Duration::from_secs(60))
            .expect("replicas converge");
        eprintln!("{volume}: replicas {replicas:?}, digest {digest}");
        placements.insert(volume.to_owned(), replicas);
    }
    placements
}

/// The node's `ballast status` lists no container of a volume (its copies were dropped).
fn wait_holds_no_volume(cluster: &TestCluster, node_id: u64) {
    wait_until(
        &format!("node {node_id} dropped its copies"),
        Duration::from_secs(30),
        || {
            cluster
                .progress(node_id)
                .map(|rows| rows.iter().all(|row| row.volume == "(metadata)"))
                .unwrap_or(false)
        },
    )
    .unwrap_or_else(|error| panic!("{error}: {:?}", cluster.progress(node_id)));
}

#[test]
fn a_node_lost_for_good_is_replaced_and_every_container_returns_to_rf3() {
    if !end_to_end_available() {
        return;
    }
    let test = "a_node_lost_for_good_is_replaced";
    let mut generator = Generator(seed(test));
    let mut cluster = start(4);
    let mountpoints = create_and_mount(&mut cluster, 1);
    let mut written = Written::default();
    for mountpoint in &mountpoints {
        written.write(mountpoint, &mut generator, 4);
    }
    // The victim: a metadata voter holding replicas, not the node serving the mounts.
    let before = wait_fully_replicated(&cluster, &[]);
    let victim = (2..=3)
        .max_by_key(|node| before.values().filter(|r| r.contains(node)).count())
        .expect("a victim");
    let held = before.values().filter(|r| r.contains(&victim)).count();
    assert!(held > 0, "node {victim} holds no replica: {before:?}");
    eprintln!("{test}: killing node {victim} for good; it holds {held} replicas");
    cluster.node_mut(victim).kill_node();
    // Writes keep working with the node gone, before and during re-replication.
    for mountpoint in &mountpoints {
        written.write(mountpoint, &mut generator, 2);
    }
    let after = wait_fully_replicated(&cluster, &[victim]);
    for (volume, replicas) in &after {
        let kept: Vec<&u64> = before[volume]
            .iter()
            .filter(|node| **node != victim)
            .collect();
        assert!(
            kept.iter().all(|node| replicas.contains(node)),
            "{volume}: only the lost replica moves ({:?} → {replicas:?})",
            before[volume]
        );
    }
    // The lost node is down and holds nothing in the cluster map; the metadata group has three
    // voters again, all on live nodes.
    let listing = cluster.cli(&["node", "list"]).unwrap();
    eprintln!("{listing}");
    let victim_row = listing
        .lines()
        .find(|line| line.split_whitespace().next() == Some(&victim.to_string()))
        .expect("victim listed");
    assert!(victim_row.contains(" down "), "{listing}");
    let counts = cluster.replica_counts().unwrap();
    assert!(
        counts.contains(&(victim, 0)),
        "node {victim} still holds replicas: {counts:?}"
    );
    wait_until(
        "three live metadata voters",
        Duration::from_secs(30),
        || {
            cluster
                .cli(&["node", "list"])
                .map(|listing| {
                    listing
                        .lines()
                        .filter(|line| line.contains(" voter ") && line.contains(" up"))
                        .count()
                        == 3
                })
                .unwrap_or(false)
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", cluster.cli(&["node", "list"]).unwrap()));
    for mountpoint in &mountpoints {
        written.write(mountpoint, &mut generator, 1);
    }
    written.verify();
    eprintln!(
        "{test}: {} files verified after re-replication",
        written.0.len()
    );
}

#[test]
fn a_new_node_receives_replicas_and_a_drained_node_is_emptied() {
    if !end_to_end_available() {
        return;
    }
    let test = "a_new_node_receives_replicas_and_a_drained_node_is_emptied";
    let mut generator = Generator(seed(test));
    let mut cluster = start(3);
    let mountpoints = create_and_mount(&mut cluster, 1);
    let mut written = Written::default();
    for mountpoint in &mountpoints {
        written.write(mountpoint, &mut generator, 3);
    }
    // Explode: a fourth node joins and takes a share of the replicas.
    let new_node = cluster
        .add_node(DEVICE_SIZE_BYTES, &["--down-grace-ms", DOWN_GRACE_MS])
        .expect("add a node");
    let settled = cluster
        .cli(&["node", "wait", "--timeout-seconds", "180"])
        .unwrap_or_else(|error| panic!("{error}\n{:?}", cluster.cli(&["node", "list"])));
    eprintln!("{settled}");
    let placements = wait_fully_replicated(&cluster, &[]);
    let counts = cluster.replica_counts().unwrap();
    eprintln!("{test}: after adding node {new_node}: {counts:?}");
    let new_count = counts
        .iter()
        .find(|(node, _)| *node == new_node)
        .map(|(_, count)| *count)
        .unwrap();
    assert_eq!(new_count, 2, "9 replicas over 4 nodes: {counts:?}");
    let (most, least) = (
        counts.iter().map(|(_, count)| *count).max().unwrap(),
        counts.iter().map(|(_, count)| *count).min().unwrap(),
    );
    assert!(most - least <= 1, "balanced: {counts:?}");
    assert!(placements.values().any(|r| r.contains(&new_node)));
    written.verify();
    // Fold: drain node 2 while writing; the CLI waits for it with progress.
    let drained = 2;
    let drain = std::thread::scope(|scope| {
        let drain = scope.spawn(|| {
            cluster.cli(&[
                "node",
                "drain",
                &drained.to_string(),
                "--timeout-seconds",
                "180",
            ])
        });
        for mountpoint in &mountpoints {
            written.write(mountpoint, &mut generator, 2);
        }
        drain.join().expect("drain thread")
    });
    let drain =
        drain.unwrap_or_else(|error| panic!("{error}\n{:?}", cluster.cli(&["node", "list"])));
    eprintln!("{drain}");
    assert!(drain.contains("holds no replicas"), "{drain}");
    wait_fully_replicated(&cluster, &[drained]);
    let listing = cluster.cli(&["node", "list"]).unwrap();
    eprintln!("{listing}");
    assert!(listing.contains("draining"), "{listing}");
    wait_holds_no_volume(&cluster, drained);
    written.verify();
    eprintln!("{test}: {} files verified", written.0.len());
}
