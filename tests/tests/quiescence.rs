//! Quiescence end to end, with real `ballast-node` processes: idle rf=3 groups stop their own
//! heartbeats on every node, a write to a quiesced group is accepted at once (its followers
//! still count as in contact for minimum replication) and wakes it, and `kill -9` of a quiesced
//! group's leader still fails over: the followers notice the leader's node went silent and elect.
//! Without the follower side resuming elections, the last write could never be acknowledged.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ballast_tests::cluster::TestCluster;
use ballast_tests::{end_to_end_available, read_uncached, wait_until};

const DEVICE_SIZE_BYTES: u64 = 2 << 30;
const VOLUMES: [&str; 2] = ["quiet", "still"];

fn write_fsync(path: &Path, data: &[u8]) {
    let mut file = File::create(path).unwrap_or_else(|error| panic!("create {path:?}: {error}"));
    file.write_all(data)
        .unwrap_or_else(|error| panic!("write {path:?}: {error}"));
    file.sync_all()
        .unwrap_or_else(|error| panic!("fsync {path:?}: {error}"));
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
    let mut cluster = TestCluster::start(
        3,
        DEVICE_SIZE_BYTES,
        // Quiesce quickly; never move replicas during the test.
        &["--quiesce-idle-ms", "1000", "--down-grace-ms", "600000"],
    )
    .expect("cluster");
    let endpoints = cluster.endpoints();
    let mut mounts = Vec::new();
    for volume in VOLUMES {
        cluster
            .cli(&[
                "volume",
                "create",
                volume,
                "--quota",
                "1GiB",
                "--replication-factor",
                "3",
            ])
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
