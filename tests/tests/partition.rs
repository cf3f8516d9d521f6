//! A real network partition: three `ballast-node` processes, each in its own network namespace
//! joined by a bridge, and the leader of an rf=3 volume cut off by taking its bridge port down
//! (packets are dropped at the link; nothing is mocked).
//!
//! What must hold:
//! - the minority side (the old leader alone) commits nothing: a client that can reach only it
//!   gets errors, and what it tried never appears;
//! - the majority side elects a new leader and keeps acknowledging writes;
//! - there is no split brain: after healing, every acknowledged file reads back exactly and the
//!   replicas agree.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ballast_tests::cluster::TestCluster;
use ballast_tests::netns::TestNetwork;
use ballast_tests::{end_to_end_available, read_uncached};

fn write_file(directory: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(directory.join(name))?;
    file.write_all(data)?;
    file.sync_all()
}

#[test]
fn a_minority_leader_commits_nothing_and_the_majority_goes_on() {
    if !end_to_end_available() {
        return;
    }
    let network = TestNetwork::create(3).expect("network namespaces");
    let mut cluster =
        TestCluster::start_in_network(&network, 3, 2 << 30, &[]).expect("cluster in namespaces");
    cluster
        .cli(&["volume", "create", "data", "--quota", "1GiB"])
        .expect("create volume");
    let endpoints = cluster.endpoints();
    // The majority's client: every node as an endpoint, short attempts so a silent node is
    // skipped quickly.
    let majority = cluster
        .node_mut(1)
        .mount_with(
            "data",
            &endpoints,
            None,
            &["--request-timeout-ms", "3000"],
            "-all",
        )
        .expect("mount through every node");
    let mut acknowledged = BTreeMap::new();
    for index in 0..4 {
        let data = vec![index as u8 + 1; 64 * 1024 + index * 4096];
        let name = format!("before-{index}");
        write_file(&majority, &name, &data).expect("write before the partition");
        acknowledged.insert(name, data);
    }
    let leader = cluster.leader_of("data").expect("leader") as usize;
    // The minority's client: in the leader's namespace, reaching only the leader.
    let leader_endpoint = cluster.nodes[leader - 1].endpoint();
    let namespace = format!("/var/run/netns/{}", network.namespace(leader));
    let minority = cluster
        .node_mut(1)
        .mount_with(
            "data",
            &leader_endpoint,
            Some(&namespace),
            &["--request-timeout-ms", "2000", "--attempt-count-max", "3"],
            "-minority",
        )
        .expect("mount through the leader only");
    assert_eq!(
        read_uncached(&minority.join("before-0")).expect("minority reads before the partition"),
        acknowledged["before-0"]
    );

    eprintln!("isolating node {leader}, the leader");
    network.isolate(leader).expect("isolate");
    cluster.nodes[leader - 1].is_running();
    // Minority: creating a file needs a commit, which the isolated leader cannot get.
    let minority_result = write_file(&minority, "minority-write", b"must never appear");
    assert!(
        minority_result.is_err(),
        "the isolated leader acknowledged a write"
    );
    // Majority: a new leader is elected and writes are acknowledged.
    for index in 0..4 {
        let data = vec![0xA0 + index as u8; 32 * 1024 + index * 4096];
        let name = format!("during-{index}");
        if let Err(error) = write_file(&majority, &name, &data) {
            let log = std::fs::read_to_string(
                cluster.nodes[0].directory.path().join("fuse-data-all.log"),
            )
            .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "the majority must keep acknowledging writes: {error}; driver log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        acknowledged.insert(name, data);
    }
    let new_leader = cluster
        .nodes
        .iter()
        .filter(|node| node.node_id as usize != leader)
        .find_map(|node| {
            cluster
                .progress(node.node_id)
                .ok()?
                .into_iter()
                .find(|row| row.volume == "data")
                .map(|row| row.leader_node_id)
        })
        .expect("the majority reports a leader");
    assert_ne!(
        new_leader as usize, leader,
        "the majority elected a new leader"
    );

    eprintln!("healing node {leader}");
    network.heal(leader).expect("heal");
    cluster
        .wait_caught_up("data", Duration::from_secs(60))
        .expect("the old leader rejoins and catches up");
    let minority_path = minority.clone();
    cluster.node_mut(1).unmount(&minority_path);
    for (name, expected) in &acknowledged {
        let actual = read_uncached(&majority.join(name)).expect("acknowledged file present");
        assert_eq!(&actual, expected, "{name} reads back exactly");
    }
    assert!(
        !majority.join("minority-write").exists(),
        "a write refused on the minority side appeared after healing (split brain)"
    );
    eprintln!(
        "partition: acknowledged {}, lost 0, wrong 0; the minority's write was refused and never appeared",
        acknowledged.len()
    );
}
