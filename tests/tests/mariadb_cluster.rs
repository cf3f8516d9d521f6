//! MariaDB on an rf=3 volume while the node leading it is killed and later restarted.
//!
//! sysbench `oltp_read_write` and a ledger load (transactions whose COMMIT is recorded) run
//! against one mariadbd whose datadir is on a FUSE mount that knows all three nodes. The leader
//! of the volume's container is killed with SIGKILL mid-load and restarted a little later.
//! What must hold: mariadbd never fails (queries may stall during the failover, none fails for
//! good: sysbench finishes without errors, every ledger transaction commits), `CHECK TABLE`
//! passes, and every committed ledger row is there.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use ballast_tests::cluster::TestCluster;
use ballast_tests::end_to_end_available;
use ballast_tests::mariadb::{self, ledger_ids, MariaDb};

const ROWS_PER_TRANSACTION: u64 = 10;

fn sysbench(socket: &std::path::Path, phase: &str, seconds: u64) -> std::process::Output {
    Command::new("timeout")
        .arg((seconds + 300).to_string())
        .arg("sysbench")
        .args([
            "oltp_read_write",
            "--db-driver=mysql",
            "--mysql-user=root",
            "--mysql-db=sbtest",
            "--tables=2",
            "--table-size=10000",
            "--threads=2",
            "--rand-seed=1",
            "--report-interval=0",
        ])
        .arg(format!("--mysql-socket={}", socket.display()))
        .arg(format!("--time={seconds}"))
        .arg(phase)
        .output()
        .expect("running sysbench")
}

#[test]
fn mariadb_keeps_working_when_the_leader_node_dies() {
    if !end_to_end_available() {
        return;
    }
    if !mariadb::available() || !std::path::Path::new("/usr/bin/sysbench").exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("mariadb-server or sysbench missing (scripts/install-prerequisites.sh)");
        }
        eprintln!("SKIPPED: mariadb-server or sysbench not installed");
        return;
    }
    let mut cluster = TestCluster::start(3, 6 << 30, &[]).expect("cluster");
    cluster
        .cli(&["volume", "create", "mysql", "--quota", "4GiB"])
        .expect("create volume");
    let endpoints = cluster.endpoints();
    let mount = cluster
        .node_mut(1)
        .mount_with(
            "mysql",
            &endpoints,
            None,
            &["--request-timeout-ms", "5000"],
            "",
        )
        .expect("mount");
    let run_directory = cluster.nodes[0].directory.path().join("mariadb-run");
    std::fs::create_dir_all(&run_directory).unwrap();
    let mut database = MariaDb::install(&mount.join("datadir"), &run_directory).unwrap();
    database.start().unwrap();
    database
        .query("CREATE DATABASE test; CREATE DATABASE sbtest")
        .unwrap();
    database
        .query(
            "CREATE TABLE test.ledger (id BIGINT PRIMARY KEY, payload VARCHAR(255)) ENGINE=InnoDB",
        )
        .unwrap();
    let prepare = sysbench(&database.socket, "prepare", 0);
    assert!(
        prepare.status.success(),
        "sysbench prepare: {}",
        String::from_utf8_lossy(&prepare.stderr)
    );

    let leader = cluster.leader_of("mysql").expect("leader");
    let (ledger, attempted, sysbench_run) = std::thread::scope(|scope| {
        let database_ref = &database;
        let load = scope.spawn(move || {
            let mut session = database_ref.session("test").unwrap();
            let mut confirmed = BTreeSet::new();
            let mut attempted = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                let start = 1 + attempted * ROWS_PER_TRANSACTION;
                let ids: Vec<u64> = (start..start + ROWS_PER_TRANSACTION).collect();
                attempted += 1;
                if !session.insert_transaction(&ids) {
                    break;
                }
                confirmed.extend(ids);
            }
            (confirmed, attempted)
        });
        let socket = database_ref.socket.clone();
        let bench = scope.spawn(move || sysbench(&socket, "run", 20));
        std::thread::sleep(Duration::from_secs(5));
        eprintln!("killing node {leader}, the leader of the volume");
        cluster.node_mut(leader).kill_node();
        std::thread::sleep(Duration::from_secs(6));
        eprintln!("restarting node {leader}");
        cluster.node_mut(leader).restart_node().expect("restart");
        let (confirmed, attempted) = load.join().unwrap();
        (confirmed, attempted, bench.join().unwrap())
    });
    let sysbench_output = String::from_utf8_lossy(&sysbench_run.stdout);
    if !sysbench_run.status.success() {
        let fuse_log =
            std::fs::read_to_string(cluster.nodes[0].directory.path().join("fuse-mysql.log"))
                .unwrap_or_default();
        let fuse_tail: Vec<&str> = fuse_log.lines().rev().take(20).collect();
        panic!(
            "sysbench failed across the failover: {}\n{}\nmariadbd log:\n{}\nFUSE driver log:\n{}",
            String::from_utf8_lossy(&sysbench_run.stderr),
            sysbench_output,
            database.log_tail(),
            fuse_tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let transactions = sysbench_output
        .lines()
        .find(|line| line.contains("transactions:"))
        .unwrap_or("")
        .trim()
        .to_owned();
    assert_eq!(
        ledger.len() as u64,
        attempted * ROWS_PER_TRANSACTION,
        "every ledger transaction committed across the failover"
    );
    let present = ledger_ids(&database).unwrap();
    let missing = ledger.difference(&present).count();
    assert_eq!(missing, 0, "committed ledger rows missing");
    for table in ["test.ledger", "sbtest.sbtest1", "sbtest.sbtest2"] {
        let check = database.query(&format!("CHECK TABLE {table}")).unwrap();
        assert!(
            check.trim_end().ends_with("OK"),
            "CHECK TABLE {table}: {check}"
        );
    }
    cluster
        .wait_caught_up("mysql", Duration::from_secs(120))
        .expect("the restarted node catches up");
    eprintln!(
        "mariadb on rf=3: sysbench {transactions}; ledger {} rows in {attempted} transactions, all committed and present; node {leader} killed and restarted",
        ledger.len()
    );
    database.kill();
}
