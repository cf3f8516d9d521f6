//! Quiescence end to end, with real `ballast-node` processes: idle rf=3 groups stop their own
//! heartbeats on every node, a write to a quiesced group is accepted at once (its followers
//! still count as in contact for minimum replication) and wakes it, and `kill -9` of a quiesced
//! group's leader still fails over: the followers notice the leader's node went silent and elect.
//! Without the follower side resuming elections, the last write could never be acknowledged.
//! Leader balancing rides on the node heartbeat: after a node restart, quiet groups move their
//! leadership to it until no node leads two more than another.

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_tests::cluster::TestCluster;
use ballast_tests::{end_to_end_available, read_uncached, wait_until, write_fsync};

const DEVICE_SIZE_BYTES: u64 = 2 << 30;
const VOLUMES: [&str; 2] = ["quiet", "still"];

/// Three nodes that quiesce after 1 s idle and never move replicas during a test.
fn start_cluster() -> TestCluster {
    TestCluster::start(
        3,
        DEVICE_SIZE_BYTES,
        &["--quiesce-idle-ms", "1000", "--down-grace-ms", "600000"],
    )
    .expect("cluster")
}

/// Every running node's replica of `volume` is quiesced.
fn quiesced_everywhere(cluster: &TestCluster, volume: &str) -> bool {
    let running: Vec<u64> = cluster
        .nodes
        .iter()
        .filter(|node| node.is_running())
        .map(|node| node.node_id)
        .collect();
    running.iter().all(|node_id| {
        cluster
            .progress(*node_id)
            .is_ok_and(|rows| rows.iter().any(|row| row.volume == volume && row.quiesced))
    })
}

fn wait_quiesced(cluster: &TestCluster, volume: &str) {
    if let Err(error) = wait_until(
        &format!("{volume} quiesced on every node"),
        Duration::from_secs(60),
        || quiesced_everywhere(cluster, volume),
    ) {
        let statuses: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| node.cli(&["status"]).unwrap_or_default())
            .collect();
        panic!("{error}\n{}", statuses.join("\n"));
    }
}

#[test]
fn idle_groups_quiesce_accept_writes_and_fail_over() {
    if !end_to_end_available() {
        return;
    }
    let mut cluster = start_cluster();
    let endpoints = cluster.endpoints();
    let mut mounts = Vec::new();
    for volume in VOLUMES {
        cluster
            .create_replicated_volume(volume, "1GiB", 3)
            .expect("create volume");
        mounts.push(
            cluster
                .node_mut(1)
                .mount_via(volume, &endpoints)
                .expect("mount"),
        );
    }
    let mut written = Vec::new();
    for (mount, volume) in mounts.iter().zip(VOLUMES) {
        let path = mount.join("first");
        let data = format!("{volume}: written before quiescing\n").repeat(500);
        write_fsync(&path, data.as_bytes());
        written.push((path, data));
    }
    for volume in VOLUMES {
        wait_quiesced(&cluster, volume);
    }

    // A write to a quiesced group: accepted (minimum replication 2 of 3 still holds), and the
    // group wakes; idle again, it quiesces again.
    let path = mounts[0].join("second");
    let data = "written to a quiesced group\n".repeat(300);
    write_fsync(&path, data.as_bytes());
    written.push((path, data));
    wait_quiesced(&cluster, VOLUMES[0]);

    // kill -9 the leader of a quiesced group: its followers must elect a new leader on their own.
    let old_leader = cluster.leader_of(VOLUMES[1]).expect("leader");
    assert!(quiesced_everywhere(&cluster, VOLUMES[1]));
    eprintln!(
        "killing node {old_leader}, leader of quiesced {}",
        VOLUMES[1]
    );
    if old_leader == 1 {
        // The mounts talk to every endpoint; killing node 1 leaves them working through the
        // others, like any node loss.
        eprintln!("(node 1 serves the mounts too; the driver fails over to the others)");
    }
    cluster.node_mut(old_leader).kill_node();
    let path = mounts[1].join("after-failover");
    let data = "written after the quiesced leader was killed\n".repeat(300);
    write_fsync(&path, data.as_bytes());
    written.push((path, data));
    let new_leader = cluster.leader_of(VOLUMES[1]).expect("new leader");
    assert_ne!(new_leader, old_leader, "the killed node cannot lead");

    for (path, data) in &written {
        let actual = read_uncached(path).unwrap_or_else(|error| panic!("read {path:?}: {error}"));
        assert_eq!(actual, data.as_bytes(), "{path:?} differs");
    }
}

/// How many of `volumes` each running node leads, once the running nodes agree on every leader.
fn leader_counts(cluster: &TestCluster, volumes: &[String]) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = cluster
        .nodes
        .iter()
        .filter(|node| node.is_running())
        .map(|node| (node.node_id, 0))
        .collect();
    for volume in volumes {
        let leader = cluster.leader_of(volume).expect("leader");
        *counts.entry(leader).or_default() += 1;
    }
    counts
}

#[test]
fn leaders_spread_back_onto_a_restarted_node() {
    if !end_to_end_available() {
        return;
    }
    let mut cluster = start_cluster();
    let volumes: Vec<String> = (0..6).map(|number| format!("lead{number}")).collect();
    for volume in &volumes {
        cluster
            .create_replicated_volume(volume, "256MiB", 3)
            .expect("create volume");
    }
    let endpoints = cluster.endpoints();
    let mount = cluster
        .node_mut(1)
        .mount_via(&volumes[0], &endpoints)
        .expect("mount");
    let before = mount.join("before");
    write_fsync(&before, b"written before the restart\n");
    eprintln!("leaders at start: {:?}", leader_counts(&cluster, &volumes));

    // Node 3 dies: its groups fail over to nodes 1 and 2. Back, it leads nothing at first.
    cluster.node_mut(3).kill_node();
    let during = leader_counts(&cluster, &volumes);
    eprintln!("leaders with node 3 down: {during:?}");
    assert!(!during.contains_key(&3));
    cluster.node_mut(3).restart_node().expect("restart node 3");

    // Quiet groups move to node 3 until no node leads 2 more than another.
    let mut last = BTreeMap::new();
    let balanced = wait_until(
        "leaders balanced over 3 nodes",
        Duration::from_secs(90),
        || {
            last = leader_counts(&cluster, &volumes);
            let counts: Vec<usize> = last.values().copied().collect();
            counts.len() == 3 && counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1
        },
    );
    if let Err(error) = balanced {
        panic!("{error}; last counts {last:?}\n{}", cluster.log_tails());
    }
    eprintln!("leaders after balancing: {last:?}");

    // Everything still works: the old file reads back and a new write is accepted.
    assert_eq!(
        read_uncached(&before).unwrap(),
        b"written before the restart\n"
    );
    let after = mount.join("after");
    write_fsync(&after, b"written after balancing\n");
    assert_eq!(read_uncached(&after).unwrap(), b"written after balancing\n");
}
