//! Replication end to end: three real `ballast-node` processes, an rf=3 volume mounted through
//! FUSE with every node as an endpoint, and real `kill -9` of the leader, round after round.
//!
//! What must hold: every file that was fsync'd before a kill reads back with exactly its bytes
//! (read from the cluster, not the page cache) while one node is down and after it returns; a
//! restarted node catches up (from the log, or from a snapshot when the log was purged); writes
//! keep working with any one node down. Seeds are logged so a failure can be replayed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ballast_tests::cluster::TestCluster;
use ballast_tests::{end_to_end_available, read_uncached, seed, Generator};

const DEVICE_SIZE_BYTES: u64 = 2 << 30;

/// Writes `files` new files with fsync; every one that returns is recorded as acknowledged.
fn write_files(
    mountpoint: &Path,
    generator: &mut Generator,
    acknowledged: &mut BTreeMap<String, Vec<u8>>,
    files: usize,
) {
    for _ in 0..files {
        let name = format!("file-{:04}", acknowledged.len());
        let length = 4096 + (generator.next_u64() % (2 << 20)) as usize;
        let data = generator.bytes(length);
        if let Err(error) = write_fsync(mountpoint, &name, &data) {
            // The driver's log says which call failed and why (ballast_client logs at debug).
            let log_path = mountpoint
                .parent()
                .expect("mountpoint has a parent")
                .join("fuse-data.log");
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            panic!(
                "writing {name}: {error}; driver log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        acknowledged.insert(name, data);
    }
}

/// Reads every acknowledged file from the cluster (the page cache is dropped first) and counts
/// files that are missing or wrong.
fn verify(mountpoint: &Path, acknowledged: &BTreeMap<String, Vec<u8>>) -> (usize, usize) {
    let (mut lost, mut wrong) = (0, 0);
    for (name, expected) in acknowledged {
        match read_uncached(&mountpoint.join(name)) {
            Err(error) => {
                eprintln!("LOST: {name}: {error}");
                lost += 1;
            }
            Ok(actual) if actual != *expected => {
                eprintln!(
                    "WRONG: {name} ({} bytes, expected {})",
                    actual.len(),
                    expected.len()
                );
                wrong += 1;
            }
            Ok(_) => {}
        }
    }
    (lost, wrong)
}

/// `rounds` times: kill the volume's leader, write files while it is down (for at least
/// `down_at_least`), check every acknowledged file, restart it and wait until all replicas agree.
fn kill_leader_rounds(
    extra_arguments: &[&str],
    rounds: usize,
    down_at_least: Duration,
    test: &str,
) -> TestCluster {
    let seed = seed(test);
    let mut generator = Generator(seed);
    let mut cluster = TestCluster::start(3, DEVICE_SIZE_BYTES, extra_arguments).expect("cluster");
    let listing = cluster.cli(&["node", "list"]).unwrap();
    assert_eq!(listing.matches("voter").count(), 3, "{listing}");
    cluster
        .cli(&["volume", "create", "data", "--quota", "1GiB"])
        .expect("create volume");
    let volumes = cluster.cli(&["volume", "list", "--bytes"]).unwrap();
    let row = volumes
        .lines()
        .find(|line| line.starts_with("data"))
        .unwrap();
    assert_eq!(
        row.split_whitespace().nth(4),
        Some("3"),
        "rf=3 by default: {volumes}"
    );
    let endpoints = cluster.endpoints();
    let mountpoint = cluster
        .node_mut(1)
        .mount_via("data", &endpoints)
        .expect("mount");
    let mut acknowledged = BTreeMap::new();
    write_files(&mountpoint, &mut generator, &mut acknowledged, 6);
    for round in 0..rounds {
        let leader = cluster.leader_of("data").expect("leader");
        eprintln!("round {round}: killing the leader, node {leader}");
        let killed = std::time::Instant::now();
        cluster.node_mut(leader).kill_node();
        write_files(&mountpoint, &mut generator, &mut acknowledged, 4);
        // Bounded: a file every 100 ms (so the volume's quota is never the limit) until the
        // node has been down long enough.
        for _ in 0..1_000 {
            if killed.elapsed() >= down_at_least {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            write_files(&mountpoint, &mut generator, &mut acknowledged, 1);
        }
        let (lost, wrong) = verify(&mountpoint, &acknowledged);
        assert_eq!((lost, wrong), (0, 0), "round {round}, node {leader} down");
        cluster.node_mut(leader).restart_node().expect("restart");
        let applied = cluster
            .wait_caught_up("data", Duration::from_secs(60))
            .expect("the restarted node catches up");
        eprintln!("round {round}: all replicas at index {applied}");
    }
    let (lost, wrong) = verify(&mountpoint, &acknowledged);
    eprintln!(
        "{test}: files acknowledged {}, lost {lost}, wrong {wrong}",
        acknowledged.len()
    );
    assert_eq!((lost, wrong), (0, 0));
    cluster
}

#[test]
fn acknowledged_files_survive_leader_kills() {
    if !end_to_end_available() {
        return;
    }
    kill_leader_rounds(
        &[],
        3,
        Duration::ZERO,
        "acknowledged_files_survive_leader_kills",
    );
}

#[test]
fn a_node_behind_a_purged_log_catches_up_from_a_snapshot() {
    if !end_to_end_available() {
        return;
    }
    // Checkpoints every 300 ms purge the log quickly, so a node that was down must be sent a
    // snapshot of the container instead of log entries. The leader keeps what a follower that
    // answered within the last 3 s still needs (`PURGE_HOLD_CONTACT_MS`, purge_policy.rs), so
    // the node stays down longer than that while writes go on: when the writes of a round took
    // less, it caught up from the log and no snapshot was sent (seen once in the suite).
    let cluster = kill_leader_rounds(
        &["--checkpoint-interval-ms", "300"],
        2,
        Duration::from_millis(4_500),
        "a_node_behind_a_purged_log_catches_up_from_a_snapshot",
    );
    let installed: usize = cluster
        .nodes
        .iter()
        .map(|node| {
            node.log_contents()
                .matches("installed a snapshot from the leader container=1 ")
                .count()
        })
        .sum();
    assert!(
        installed > 0,
        "no node installed a snapshot of the volume's container"
    );
}

#[test]
fn a_follower_briefly_behind_catches_up_from_the_log_not_a_snapshot() {
    // A follower that falls behind while it stays in contact (paused for 1 s with SIGSTOP
    // while writes go on, three times, with checkpoints every 300 ms) must be sent the entries
    // it lacks, not the whole container: the leader keeps what it still needs
    // (`storage-node/src/purge_policy.rs`). Before, openraft purged up to each checkpoint
    // whenever no append was in flight, and such a follower was sent a snapshot of the
    // container; after a 1 GiB write to an rf=3 volume that was a 1.08 GB snapshot.
    if !end_to_end_available() {
        return;
    }
    const TEST: &str = "a_follower_briefly_behind_catches_up_from_the_log_not_a_snapshot";
    let mut generator = Generator(seed(TEST));
    let mut cluster = start_purging_often(3);
    cluster
        .cli(&["volume", "create", "data", "--quota", "1GiB"])
        .expect("create volume");
    let leader = cluster.leader_of("data").expect("leader");
    let follower = if leader == 3 { 2 } else { 3 };
    let endpoints = cluster.endpoints();
    let mountpoint = cluster
        .node_mut(leader)
        .mount_via("data", &endpoints)
        .expect("mount");
    let mut acknowledged = BTreeMap::new();
    write_files(&mountpoint, &mut generator, &mut acknowledged, 2);
    for round in 0..3 {
        let paused = std::time::Instant::now();
        cluster.node_mut(follower).signal(libc::SIGSTOP);
        write_files(&mountpoint, &mut generator, &mut acknowledged, 4);
        std::thread::sleep(Duration::from_secs(1).saturating_sub(paused.elapsed()));
        cluster.node_mut(follower).signal(libc::SIGCONT);
        eprintln!(
            "{TEST}: round {round}: node {follower} paused {} ms",
            paused.elapsed().as_millis()
        );
        write_files(&mountpoint, &mut generator, &mut acknowledged, 2);
    }
    cluster
        .wait_converged("data", Duration::from_secs(60))
        .expect("the replicas converge");
    let follower_log = cluster.nodes[follower as usize - 1].log_contents();
    assert!(
        !follower_log.contains("installed a snapshot from the leader"),
        "node {follower} was sent a snapshot although it stayed in contact; its log:\n{}",
        cluster.nodes[follower as usize - 1].log_tail()
    );
    let (lost, wrong) = verify(&mountpoint, &acknowledged);
    assert_eq!((lost, wrong), (0, 0));
}

#[test]
fn a_follower_behind_by_more_than_one_raft_message_catches_up_from_the_log() {
    // Ten writes of 16 MiB (the largest a node takes, sent over gRPC) while a follower is
    // paused: when it resumes it lacks 160 MiB, and openraft would send it all in one append
    // (up to 16 entries), more than the 128 MiB a Raft message may hold. The leader must cut
    // the append to the entries that fit (`raft_network::entries_that_fit`, openraft's
    // `PayloadTooLarge`). Before, the follower refused every such message and never caught up.
    if !end_to_end_available() {
        return;
    }
    const TEST: &str = "a_follower_behind_by_more_than_one_raft_message_catches_up_from_the_log";
    const WRITE_BYTES: usize = 16 << 20;
    const WRITE_COUNT: usize = 10;
    let mut cluster = TestCluster::start(3, DEVICE_SIZE_BYTES, &[]).expect("cluster");
    cluster
        .cli(&["volume", "create", "data", "--quota", "1GiB"])
        .expect("create volume");
    let leader = cluster.leader_of("data").expect("leader");
    let follower = if leader == 3 { 2 } else { 3 };
    let endpoint = cluster.nodes[leader as usize - 1].endpoint();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = runtime
        .block_on(ballast_client::BallastClient::connect(&endpoint))
        .expect("connect");
    let inode = runtime
        .block_on(client.create(ballast_client::proto::CreateRequest {
            volume: "data".to_owned(),
            parent: 1,
            name: "large-writes".to_owned(),
            kind: ballast_client::proto::EntryKind::File as i32,
            mode: 0o644,
            exclusive: true,
            ..Default::default()
        }))
        .expect("create")
        .inode;
    let paused = std::time::Instant::now();
    cluster.node_mut(follower).signal(libc::SIGSTOP);
    for index in 0..WRITE_COUNT {
        let data = bytes::Bytes::from(vec![index as u8 + 1; WRITE_BYTES]);
        runtime
            .block_on(client.write("data", inode, (index * WRITE_BYTES) as u64, data, false))
            .unwrap_or_else(|error| panic!("write {index}: {error}"));
    }
    cluster.node_mut(follower).signal(libc::SIGCONT);
    eprintln!(
        "{TEST}: node {follower} paused {} ms for {WRITE_COUNT} writes of 16 MiB",
        paused.elapsed().as_millis()
    );
    cluster
        .wait_converged("data", Duration::from_secs(60))
        .unwrap_or_else(|error| {
            panic!(
                "node {follower} did not catch up: {error}; its log:\n{}",
                cluster.nodes[follower as usize - 1].log_tail()
            )
        });
    let follower_log = cluster.nodes[follower as usize - 1].log_contents();
    assert!(
        !follower_log.contains("installed a snapshot from the leader"),
        "node {follower} was sent a snapshot; the logs:\n{}",
        cluster.log_tails()
    );
    // Converged means the same applied index and the same digest of the container's state
    // (file data checksums included) on every replica.
}

/// The term of `volume`'s replica on `node_id` (from its `ballast status`).
fn term_on(cluster: &TestCluster, node_id: u64, volume: &str) -> u64 {
    cluster
        .progress(node_id)
        .expect("status")
        .into_iter()
        .find(|row| row.volume == volume)
        .unwrap_or_else(|| panic!("node {node_id} holds no replica of {volume}"))
        .term
}

/// A cluster whose checkpoints every 300 ms purge the log, so a follower that was down needs a
/// snapshot to catch up.
fn start_purging_often(node_count: usize) -> TestCluster {
    TestCluster::start(
        node_count,
        DEVICE_SIZE_BYTES,
        &["--checkpoint-interval-ms", "300"],
    )
    .expect("cluster")
}

/// Mounts `volume` through `leader`, writes while `follower` is down (the 300 ms checkpoints
/// purge the log, so it will need a snapshot), then restarts `follower` with every snapshot
/// install failing there (`BALLAST_FAILPOINT_SNAPSHOT_INSTALL`). Returns the mountpoint.
fn restart_with_failing_installs(
    cluster: &mut TestCluster,
    leader: u64,
    follower: u64,
    generator: &mut Generator,
    acknowledged: &mut BTreeMap<String, Vec<u8>>,
) -> std::path::PathBuf {
    let endpoints = cluster.endpoints();
    let mountpoint = cluster
        .node_mut(leader)
        .mount_via("data", &endpoints)
        .expect("mount");
    write_files(&mountpoint, generator, acknowledged, 2);
    cluster.node_mut(follower).kill_node();
    write_files(&mountpoint, generator, acknowledged, 6);
    // The leader keeps the log for a follower that answered within the last 3 s
    // (`purge_policy`); past that, and a 300 ms checkpoint later, the entries written since
    // the kill are purged, so the follower needs a snapshot.
    std::thread::sleep(Duration::from_secs(5));
    cluster.node_mut(follower).environment.push((
        "BALLAST_FAILPOINT_SNAPSHOT_INSTALL".to_owned(),
        "1".to_owned(),
    ));
    cluster.node_mut(follower).restart_node().expect("restart");
    mountpoint
}

#[test]
fn a_replica_that_cannot_install_snapshots_does_not_unseat_its_leader() {
    // A follower that can never install a snapshot (a failpoint; on a full device this is
    // ENOSPC) has its Raft core stop again and again, and the node restarts the group each
    // time. What must hold: nothing acknowledged is lost, and the leader keeps its leadership
    // and its term while the follower keeps failing.
    //
    // What makes the election hold matter: after a failed snapshot stream the leader goes
    // silent toward the follower for 8 s (the second failpoint, on every node: no snapshot and
    // no heartbeat, as when openraft's replication backs off after `Unreachable` errors, which
    // is what the nemesis run that led to the hold showed). A restarted follower that hears
    // nothing for that long campaigns with a higher term. Delaying only the snapshot was not
    // enough: heartbeats kept reaching the follower. Checked on 2026-12-05 with the hold
    // switched off (the restarted replica left electable): the term rose from 4 to 10 and the
    // test failed, twice; with the hold on it passed (3 runs of this file).
    if !end_to_end_available() {
        return;
    }
    const TEST: &str = "a_replica_that_cannot_install_snapshots_does_not_unseat_its_leader";
    let mut generator = Generator(seed(TEST));
    let mut cluster = start_purging_often(3);
    cluster
        .cli(&["volume", "create", "data", "--quota", "1GiB"])
        .expect("create volume");
    // Every node gets the resend delay (whichever leads the volume after this rolling restart).
    for node in 1..=3u64 {
        cluster.node_mut(node).environment.push((
            "BALLAST_FAILPOINT_SNAPSHOT_RESEND_DELAY_MS".to_owned(),
            "8000".to_owned(),
        ));
        cluster.node_mut(node).kill_node();
        cluster.node_mut(node).restart_node().expect("restart");
        cluster
            .leader_of("data")
            .unwrap_or_else(|error| panic!("no leader after restarting node {node}: {error}"));
    }
    let leader = cluster.leader_of("data").expect("leader");
    let follower = if leader == 3 { 2 } else { 3 };
    let mut acknowledged = BTreeMap::new();
    let mountpoint = restart_with_failing_installs(
        &mut cluster,
        leader,
        follower,
        &mut generator,
        &mut acknowledged,
    );
    const HOLD_MESSAGE: &str = "restarted replica may not start elections";
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !cluster.nodes[follower as usize - 1]
        .log_contents()
        .contains(HOLD_MESSAGE)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower's snapshot install never failed; its log:\n{}",
            cluster.nodes[follower as usize - 1].log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Leadership may have moved while the follower was away or coming back (leader balancing);
    // what must hold from here on, while it keeps failing, is no further change.
    let leader = cluster.leader_of("data").expect("leader");
    let term_before = term_on(&cluster, leader, "data");
    // Keep writing for a while: the follower keeps being sent snapshots, keeps failing them and
    // keeps being restarted.
    for _ in 0..10 {
        write_files(&mountpoint, &mut generator, &mut acknowledged, 1);
        std::thread::sleep(Duration::from_secs(2));
    }
    let holds = cluster.nodes[follower as usize - 1]
        .log_contents()
        .matches(HOLD_MESSAGE)
        .count();
    assert!(
        holds >= 2,
        "the follower failed only {holds} time(s); the test saw too little"
    );
    let term_after = term_on(&cluster, leader, "data");
    let new_leader = cluster.leader_of("data").expect("leader");
    if new_leader != leader || term_after != term_before {
        for node in 1..=3u64 {
            eprintln!(
                "node {node} log tail:\n{}",
                cluster.nodes[node as usize - 1].log_tail()
            );
        }
    }
    assert_eq!(
        new_leader, leader,
        "the leader changed while the follower kept failing"
    );
    assert_eq!(
        term_after, term_before,
        "the term rose from {term_before} to {term_after} while the follower kept failing \
         ({holds} restarts)"
    );
    let (lost, wrong) = verify(&mountpoint, &acknowledged);
    assert_eq!((lost, wrong), (0, 0));
}

#[test]
fn a_replica_that_keeps_failing_is_replaced_on_another_node() {
    // A follower that can never install a snapshot (the failpoint; on a full device this is
    // ENOSPC) is not down: its node answers every heartbeat, so the grace period (300 s by
    // default) never starts. Its node reports the replica after 3 failures in a row, and the
    // metadata leader's mover re-creates it on the fourth node. Without the report the
    // placement never changes and this test times out.
    if !end_to_end_available() {
        return;
    }
    const TEST: &str = "a_replica_that_keeps_failing_is_replaced_on_another_node";
    let mut generator = Generator(seed(TEST));
    let mut cluster = start_purging_often(4);
    let (replicas, leader, follower, spare) = create_data_on_three_of_four(&cluster);
    eprintln!("{TEST}: replicas {replicas:?}, leader {leader}, failing {follower}, spare {spare}");
    let mut acknowledged = BTreeMap::new();
    let mountpoint = restart_with_failing_installs(
        &mut cluster,
        leader,
        follower,
        &mut generator,
        &mut acknowledged,
    );
    // The failing follower keeps being sent snapshots meanwhile.
    wait_replaced_while_writing(
        &cluster,
        &mountpoint,
        &mut generator,
        &mut acknowledged,
        (&replicas, follower, spare),
    );
    write_files(&mountpoint, &mut generator, &mut acknowledged, 1);
    let (lost, wrong) = verify(&mountpoint, &acknowledged);
    eprintln!(
        "{TEST}: {} files acknowledged, {lost} lost, {wrong} wrong",
        acknowledged.len()
    );
    assert_eq!((lost, wrong), (0, 0));
}

#[test]
fn a_follower_whose_device_fills_up_is_replaced_and_no_replica_differs() {
    // Whether a device has room depends on the node, not on the replicated state. Four nodes
    // with 512 MiB devices; an rf=3 volume "data" on three of them; a second volume, rf=1 and
    // pinned by its selector to one follower of "data", fills that follower's device up to
    // the reserve its admission keeps. Writes to "data" go on: its leader has room, so it
    // admits them, and the full follower's applies find no free block.
    // What must hold: no write to "data" fails; the full follower never records a write as
    // failed (before 2026-12-05 it recorded ENOSPC as the write's result, and its replica
    // silently lacked data its peers held); it fails the apply as a node failure, reports its
    // replica, and the mover re-creates it on the fourth node; the new replica set converges
    // (same index and digest); every acknowledged file reads back, on both volumes; and the
    // full node gets its space back once the replica is gone.
    a_device_fills_up(
        "a_follower_whose_device_fills_up_is_replaced_and_no_replica_differs",
        Filled::Follower,
    );
}

#[test]
fn a_leader_whose_device_fills_up_hands_over_and_no_write_is_lost() {
    // As above, but the device that fills up is the leader's. A leader short of space would
    // refuse the group's writes (its admission keeps a reserve) while its followers have room.
    // What must hold besides: while the group is idle, a follower with room takes its
    // leadership over (the full node's heartbeats say it is short of space, and a node with
    // room takes over from it whatever the leader counts), so writes to "data" succeed again
    // without an operator; the full node, now a follower, is replaced as above.
    a_device_fills_up(
        "a_leader_whose_device_fills_up_hands_over_and_no_write_is_lost",
        Filled::Leader,
    );
}

#[test]
fn a_follower_filling_up_gives_its_replica_away_before_it_fails() {
    // As the follower test above, with the replica mover's relief on (the default): once the
    // follower's node reports itself short of space, the mover moves its replica of "data" to
    // the node with room, with no write to "data" meanwhile, so nothing ever fails on the full
    // node: it never reports a failing replica. With relief off, the replica stays until writes
    // make the full node's applies fail (the test above).
    a_device_fills_up(
        "a_follower_filling_up_gives_its_replica_away_before_it_fails",
        Filled::FollowerRelieved,
    );
}

/// Which replica of "data" [`a_device_fills_up`] fills the device of, and how the cluster is
/// to cope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filled {
    /// The leader's; relief off: the leadership goes, then the replica once it fails.
    Leader,
    /// A follower's; relief off: the replica is replaced once its applies fail.
    Follower,
    /// A follower's; relief on: the replica moves away before anything fails.
    FollowerRelieved,
}

fn a_device_fills_up(test: &str, filled: Filled) {
    if !end_to_end_available() {
        return;
    }
    const FILLER_FILE_BYTES: usize = 8 << 20;
    let mut generator = Generator(seed(test));
    let relief = filled == Filled::FollowerRelieved;
    let arguments: &[&str] = if relief {
        &[]
    } else {
        &["--space-relief", "false"]
    };
    let mut cluster = TestCluster::start(4, 512 << 20, arguments).expect("cluster");
    let (replicas, leader, follower, spare) = create_data_on_three_of_four(&cluster);
    let full = match filled {
        Filled::Leader => leader,
        Filled::Follower | Filled::FollowerRelieved => follower,
    };
    eprintln!("{test}: replicas {replicas:?}, leader {leader}, filling {full}, spare {spare}");
    // A node without a replica cannot be made to lead it; it says why.
    let refusal = cluster.nodes[spare as usize - 1]
        .cli(&["volume", "lead", "data", "--timeout-seconds", "5"])
        .expect_err("the spare holds no replica of data");
    assert!(
        format!("{refusal:#}").contains("not served by this node"),
        "{refusal:#}"
    );
    let endpoints = cluster.endpoints();
    // Mounted through the spare: the FUSE driver's own node is never the one filled.
    let mountpoint = cluster
        .node_mut(spare)
        .mount_via("data", &endpoints)
        .expect("mount data");
    let mut acknowledged = BTreeMap::new();
    write_files(&mountpoint, &mut generator, &mut acknowledged, 2);
    // 16 MiB the full node gets back when its replica is gone (checked at the end).
    let base = generator.bytes(16 << 20);
    write_fsync(&mountpoint, "base", &base).expect("write base");
    acknowledged.insert("base".to_owned(), base);

    // One rf=1 volume on the full node and one on the spare keep the replica counts within one
    // of each other, so no rebalance moves the replica before the device fills (one did, in the
    // first run of this test).
    for (volume, node) in [("ballast", spare), ("filler", full)] {
        cluster
            .cli(&[
                "volume",
                "create",
                volume,
                "--quota",
                "1GiB",
                "--replication-factor",
                "1",
                "--selector",
                &format!("zone=z{node}"),
            ])
            .unwrap_or_else(|error| panic!("create volume {volume}: {error}"));
        assert_eq!(cluster.placement(volume).expect("placement").0, vec![node]);
    }
    if filled == Filled::Leader {
        // And one on each follower of "data": the full node then leads only one group more
        // than each of them, too few for leader balancing to take "data" over on its own
        // account. Only the full node's shortage of space may hand it over.
        for &node in replicas.iter().filter(|&&node| node != full) {
            let volume = format!("own-{node}");
            cluster
                .cli(&[
                    "volume",
                    "create",
                    &volume,
                    "--quota",
                    "64MiB",
                    "--replication-factor",
                    "1",
                    "--selector",
                    &format!("zone=z{node}"),
                ])
                .unwrap_or_else(|error| panic!("create volume {volume}: {error}"));
        }
    }
    let filler_mount = cluster
        .node_mut(full)
        .mount_via("filler", &endpoints)
        .expect("mount filler");
    let mut filler_files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut refused = None;
    for index in 0..64 {
        let name = format!("filler-{index:02}");
        let data = generator.bytes(FILLER_FILE_BYTES);
        match write_fsync(&filler_mount, &name, &data) {
            Ok(()) => {
                filler_files.insert(name, data);
            }
            Err(error) => {
                let _ = std::fs::remove_file(filler_mount.join(&name));
                refused = Some(error);
                break;
            }
        }
    }
    let error = refused.expect("512 MiB of filler must fill a 512 MiB device");
    assert_eq!(
        error.raw_os_error(),
        Some(libc::ENOSPC),
        "the full node's own volume must get ENOSPC: {error}"
    );
    eprintln!("{test}: {} filler files fitted", filler_files.len());
    // The cluster map learns the full node's free space: `node list` answered by another node
    // shows the recorded value (a node shows its own live). Placement passes the node over.
    let mut listing = String::new();
    let reported = ballast_tests::wait_until(
        "the full node's free space in the cluster map",
        Duration::from_secs(30),
        || {
            listing = cluster.nodes[spare as usize - 1]
                .cli(&["node", "list"])
                .unwrap_or_default();
            listed_free_share(&listing, full).is_some_and(|share| share < 0.1)
        },
    );
    if let Err(error) = reported {
        panic!("{error}; last listing:\n{listing}");
    }
    if filled == Filled::Leader {
        // No write to "data" since it filled up: the group is quiet, and a follower with room
        // takes it over (3 s to quiesce, 2.5 s quiet, then one election).
        let mut led_by = leader;
        let handed_over = ballast_tests::wait_until(
            "a follower with room leads data",
            Duration::from_secs(60),
            || {
                led_by = cluster.leader_of("data").unwrap_or(leader);
                led_by != leader
            },
        );
        if let Err(error) = handed_over {
            panic!("{error}\n{}", cluster.log_tails());
        }
        assert!(
            cluster.nodes[led_by as usize - 1]
                .log_contents()
                .contains("leader_short_of_space=true"),
            "node {led_by} leads data, but not by taking over from the full leader"
        );
        eprintln!("{test}: node {led_by} took data over from the full node {leader}");
    }

    if relief {
        wait_relieved(&cluster, (&replicas, full, spare));
    } else {
        // Each file is up to 2 MiB: the full node's reserve (about 7 MiB) is gone after a few.
        wait_replaced_while_writing(
            &cluster,
            &mountpoint,
            &mut generator,
            &mut acknowledged,
            (&replicas, full, spare),
        );
        assert!(
            cluster.nodes[full as usize - 1]
                .log_contents()
                .contains("device full"),
            "the full node never found its device full; the test saw too little"
        );
    }
    write_files(&mountpoint, &mut generator, &mut acknowledged, 1);
    let (lost, wrong) = verify(&mountpoint, &acknowledged);
    let (filler_lost, filler_wrong) = verify(&filler_mount, &filler_files);
    eprintln!(
        "{test}: data: {} files acknowledged, {lost} lost, {wrong} wrong; filler: {} files, \
         {filler_lost} lost, {filler_wrong} wrong",
        acknowledged.len(),
        filler_files.len()
    );
    assert_eq!((lost, wrong, filler_lost, filler_wrong), (0, 0, 0, 0));
    // The replica's blocks go back to the full node once it drops the replica (its reconcile
    // loop does, soon after the move): its own volume then takes a file again.
    let data = generator.bytes(FILLER_FILE_BYTES);
    ballast_tests::wait_until(
        "the full node has room again once the replica moved away",
        Duration::from_secs(60),
        || write_fsync(&filler_mount, "after-replacement", &data).is_ok(),
    )
    .expect("room again");
    assert!(read_uncached(&filler_mount.join("after-replacement")).unwrap() == data);
}

/// Creates the rf=3 volume "data" on a 4-node cluster: its replicas, its leader, one follower
/// and the node without a replica.
fn create_data_on_three_of_four(cluster: &TestCluster) -> (Vec<u64>, u64, u64, u64) {
    cluster
        .create_replicated_volume("data", "1GiB", 3)
        .expect("create volume");
    let (replicas, _) = cluster.placement("data").expect("placement");
    let leader = cluster.leader_of("data").expect("leader");
    let follower = *replicas
        .iter()
        .find(|&&replica| replica != leader)
        .expect("a follower");
    let spare = (1..=4u64)
        .find(|node| !replicas.contains(node))
        .expect("a node without a replica");
    (replicas, leader, follower, spare)
}

/// Keeps writing one file every 2 s (at most 90) until the placement of "data" is `replicas`
/// with `replaced` swapped for `spare` and no move in flight; then checks that `replaced`'s
/// node reported its replica and that the new replica set converges.
fn wait_replaced_while_writing(
    cluster: &TestCluster,
    mountpoint: &Path,
    generator: &mut Generator,
    acknowledged: &mut BTreeMap<String, Vec<u8>>,
    (replicas, replaced, spare): (&[u64], u64, u64),
) {
    let expected = swapped(replicas, replaced, spare);
    wait_placement(
        cluster,
        &expected,
        "the failing replica replaced on the spare node",
        Duration::from_secs(180),
        || {
            write_files(mountpoint, generator, acknowledged, 1);
            std::thread::sleep(Duration::from_secs(2));
        },
    );
    assert!(
        cluster.nodes[replaced as usize - 1]
            .log_contents()
            .contains("reporting it for replacement"),
        "node {replaced} never reported its replica"
    );
    cluster
        .wait_converged_on("data", &expected, Duration::from_secs(60))
        .expect("the new replica set converges");
}

/// `replicas` with `from` swapped for `to`, sorted.
fn swapped(replicas: &[u64], from: u64, to: u64) -> Vec<u64> {
    let mut swapped: Vec<u64> = replicas
        .iter()
        .map(|&replica| if replica == from { to } else { replica })
        .collect();
    swapped.sort_unstable();
    swapped
}

/// Waits until the placement of "data" is `expected` (sorted) with no move in flight, calling
/// `between` before each look; panics with every node's log tail when `timeout` passes.
fn wait_placement(
    cluster: &TestCluster,
    expected: &[u64],
    what: &str,
    timeout: Duration,
    mut between: impl FnMut(),
) {
    let mut last = (Vec::new(), Vec::new());
    let done = ballast_tests::wait_until(what, timeout, || {
        between();
        let Ok((mut now, moving)) = cluster.placement("data") else {
            return false;
        };
        now.sort_unstable();
        last = (now, moving);
        last.0 == expected && last.1.is_empty()
    });
    if let Err(error) = done {
        panic!(
            "{error}; last placement {last:?}, expected {expected:?}\n{}",
            cluster.log_tails()
        );
    }
}

/// Waits, writing nothing, until the placement of "data" is `replicas` with `relieved` swapped
/// for `spare` and no move in flight; then checks that the mover moved it for lack of space,
/// that `relieved`'s node never failed its replica, and that the new replica set converges.
fn wait_relieved(cluster: &TestCluster, (replicas, relieved, spare): (&[u64], u64, u64)) {
    let expected = swapped(replicas, relieved, spare);
    wait_placement(
        cluster,
        &expected,
        "the replica on the node short of space moved to the spare node",
        Duration::from_secs(120),
        || std::thread::sleep(Duration::from_millis(500)),
    );
    let relieving = cluster
        .nodes
        .iter()
        .any(|node| node.log_contents().contains("reason=Relieve"));
    assert!(relieving, "no node's mover logged a relief move");
    let log = cluster.nodes[relieved as usize - 1].log_contents();
    assert!(
        !log.contains("reporting it for replacement"),
        "node {relieved} failed its replica before it was moved"
    );
    cluster
        .wait_converged_on("data", &expected, Duration::from_secs(60))
        .expect("the new replica set converges");
}

/// The share of its capacity node `node_id` has free, by a `ballast node list` table (sizes
/// such as `7.5 MiB` are two fields).
fn listed_free_share(listing: &str, node_id: u64) -> Option<f64> {
    let row = listing
        .lines()
        .find(|line| line.split_whitespace().next() == Some(&node_id.to_string()))?;
    let fields: Vec<&str> = row.split_whitespace().collect();
    let size = |value: &str, unit: &str| -> Option<f64> {
        let power = ["B", "KiB", "MiB", "GiB", "TiB"]
            .iter()
            .position(|known| *known == unit)?;
        Some(value.parse::<f64>().ok()? * 1024f64.powi(power as i32))
    };
    let capacity = size(fields.get(4)?, fields.get(5)?)?;
    let free = size(fields.get(6)?, fields.get(7)?)?;
    Some(free / capacity)
}

fn write_fsync(directory: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(directory.join(name))?;
    file.write_all(data)?;
    file.sync_all()
}

#[test]
fn writes_below_minimum_replication_are_refused() {
    if !end_to_end_available() {
        return;
    }
    let mut cluster = TestCluster::start(3, DEVICE_SIZE_BYTES, &[]).expect("cluster");
    cluster
        .cli(&[
            "volume",
            "create",
            "strict",
            "--quota",
            "256MiB",
            "--replication-factor",
            "3",
            "--replication-minimum",
            "3",
        ])
        .expect("create volume");
    let endpoints = cluster.endpoints();
    let mountpoint = cluster
        .node_mut(1)
        .mount_via("strict", &endpoints)
        .expect("mount");
    write_fsync(&mountpoint, "before", b"three replicas in contact").expect("write with 3 of 3");
    let leader = cluster.leader_of("strict").expect("leader");
    let follower = (1..=3).find(|&node| node != leader).expect("a follower");
    cluster.node_mut(follower).kill_node();
    // Past the contact window (5 s), the leader knows only 2 of 3 replicas answer.
    std::thread::sleep(Duration::from_secs(6));
    let refused = write_fsync(&mountpoint, "below", b"must be refused");
    assert!(
        refused.is_err(),
        "a write with 2 of the 3 required replicas was accepted"
    );
    cluster.node_mut(follower).restart_node().expect("restart");
    cluster
        .wait_caught_up("strict", Duration::from_secs(60))
        .expect("the follower catches up");
    // Back in contact: writes are accepted again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut accepted = write_fsync(&mountpoint, "after", b"three again");
    while accepted.is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        accepted = write_fsync(&mountpoint, "after", b"three again");
    }
    accepted.expect("writes resume once the replica is back");
    assert_eq!(
        read_uncached(&mountpoint.join("before")).unwrap(),
        b"three replicas in contact"
    );
    assert_eq!(
        read_uncached(&mountpoint.join("after")).unwrap(),
        b"three again"
    );
    assert!(
        !mountpoint.join("below").exists(),
        "the refused write left a file behind"
    );
}
