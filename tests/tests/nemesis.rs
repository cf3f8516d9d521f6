//! The nemesis: concurrent writers on an rf=3 volume while real faults hit the cluster, round
//! after round, then a checker.
//!
//! Three `ballast-node` processes run in their own network namespaces. Each round the nemesis
//! picks a node and a fault from the seed: `kill -9` and restart, `SIGSTOP` then `SIGCONT`, or a
//! packet-level partition (its bridge port down) then heal. Two writer threads meanwhile create
//! files through a FUSE mount that knows every node, fsync each, and record what was
//! acknowledged. After the last round the checker verifies:
//! - every acknowledged file reads back (from the cluster, not the page cache) with its bytes;
//! - every replica reaches the same applied index with the same content digest (no divergence);
//! - all three replicas are back (rf restored).
//!
//! It prints the totals. Rounds: `BALLAST_NEMESIS_ROUNDS` (20 by default, as in CI); replay a
//! run with `BALLAST_SEED`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_tests::cluster::TestCluster;
use ballast_tests::netns::TestNetwork;
use ballast_tests::{end_to_end_available, read_uncached, seed, Generator};

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Pause,
    Partition,
}

#[derive(Default)]
struct Ledger {
    acknowledged: Mutex<BTreeMap<String, Vec<u8>>>,
    failed_attempts: AtomicU64,
}

fn writer(
    mountpoint: PathBuf,
    writer_id: u64,
    seed: u64,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) {
    let mut generator = Generator(seed ^ (writer_id << 48));
    let mut sequence = 0u64;
    // Bounded: stops when told, and never runs more than 10 minutes.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        sequence += 1;
        let name = format!("w{writer_id}-{sequence:05}");
        let length = 1 + generator.below(256 * 1024) as usize;
        let data = generator.bytes(length);
        let result = File::create(mountpoint.join(&name)).and_then(|mut file| {
            file.write_all(&data)?;
            file.sync_all()
        });
        match result {
            Ok(()) => {
                ledger.acknowledged.lock().unwrap().insert(name, data);
            }
            Err(_) => {
                ledger.failed_attempts.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[test]
fn acknowledged_writes_survive_kills_pauses_and_partitions() {
    if !end_to_end_available() {
        return;
    }
    let rounds: usize = std::env::var("BALLAST_NEMESIS_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20);
    let seed = seed("nemesis");
    let mut generator = Generator(seed);
    let network = TestNetwork::create(3).expect("network namespaces");
    let mut cluster =
        TestCluster::start_in_network(&network, 3, 2 << 30, &["--checkpoint-interval-ms", "2000"])
            .expect("cluster");
    cluster
        .cli(&["volume", "create", "data", "--quota", "2GiB"])
        .expect("create volume");
    let endpoints = cluster.endpoints();
    let mountpoint = cluster
        .node_mut(1)
        .mount_with(
            "data",
            &endpoints,
            None,
            &["--request-timeout-ms", "3000"],
            "",
        )
        .expect("mount");
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|writer_id| {
            let (mountpoint, ledger, stop) =
                (mountpoint.clone(), Arc::clone(&ledger), Arc::clone(&stop));
            std::thread::spawn(move || writer(mountpoint, writer_id, seed, ledger, stop))
        })
        .collect();

    for round in 0..rounds {
        let node_id = 1 + generator.below(3);
        let fault = match generator.below(3) {
            0 => Fault::Kill,
            1 => Fault::Pause,
            _ => Fault::Partition,
        };
        let hold = Duration::from_millis(500 + generator.below(2500));
        let before = ledger.acknowledged.lock().unwrap().len();
        let node = cluster.node_mut(node_id);
        match fault {
            Fault::Kill => {
                node.kill_node();
                std::thread::sleep(hold);
                node.restart_node().expect("restart after kill");
            }
            Fault::Pause => {
                node.signal(libc::SIGSTOP);
                std::thread::sleep(hold);
                node.signal(libc::SIGCONT);
            }
            Fault::Partition => {
                network.isolate(node_id as usize).expect("isolate");
                std::thread::sleep(hold);
                network.heal(node_id as usize).expect("heal");
            }
        }
        // Let the cluster settle a little before the next fault, so faults do not pile up on
        // two nodes at once (rf=3 tolerates one).
        std::thread::sleep(Duration::from_millis(1500));
        let after = ledger.acknowledged.lock().unwrap().len();
        eprintln!(
            "round {round}: {fault:?} node {node_id} for {} ms; acknowledged {before} -> {after}",
            hold.as_millis()
        );
    }
    // Writes must resume once the faults stop.
    let resumed_from = ledger.acknowledged.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger.acknowledged.lock().unwrap().len() < resumed_from + 5 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer thread");
    }
    let acknowledged = ledger.acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= resumed_from + 5,
        "writes did not resume after the faults stopped"
    );
    let (mut lost, mut wrong) = (0, 0);
    for (name, expected) in &acknowledged {
        match read_uncached(&mountpoint.join(name)) {
            Err(error) => {
                eprintln!("LOST {name}: {error}");
                lost += 1;
            }
            Ok(actual) if actual != *expected => {
                eprintln!(
                    "WRONG {name}: {} bytes, expected {}",
                    actual.len(),
                    expected.len()
                );
                wrong += 1;
            }
            Ok(_) => {}
        }
    }
    let digest = cluster
        .wait_converged("data", Duration::from_secs(60))
        .expect("replicas converge");
    let replicas = cluster.cli(&["volume", "list", "--bytes"]).unwrap();
    eprintln!(
        "nemesis: rounds {rounds}, writes acknowledged {}, failed attempts {}, lost {lost}, wrong bytes {wrong}, replicas converged at digest {digest}",
        acknowledged.len(),
        ledger.failed_attempts.load(Ordering::Relaxed)
    );
    eprintln!("{replicas}");
    assert_eq!((lost, wrong), (0, 0), "acknowledged writes lost or wrong");
}
