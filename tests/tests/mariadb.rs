//! MariaDB from Debian's packages with its datadir on a Ballast FUSE volume: it initialises,
//! runs transactions with a ledger of confirmed commits, survives `kill -9` of mariadbd, and
//! survives `kill -9` of the storage node during the load.

use std::collections::BTreeSet;

use ballast_tests::mariadb::{self, ledger_ids, MariaDb};
use ballast_tests::{end_to_end_available, LocalNode};

const ROWS_PER_TRANSACTION: u64 = 10;

fn setup() -> Option<(LocalNode, MariaDb)> {
    if !end_to_end_available() {
        return None;
    }
    if !mariadb::available() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "mariadb-server is not installed (scripts/install-prerequisites.sh installs it)"
            );
        }
        eprintln!("SKIPPED: mariadb-server not installed");
        return None;
    }
    let mut node = LocalNode::start(8 << 30).unwrap();
    node.create_volume("mysql", "6GiB").unwrap();
    let mount = node.mount("mysql").unwrap();
    let run_directory = node.directory.path().join("mariadb-run");
    std::fs::create_dir_all(&run_directory).unwrap();
    let mut database = MariaDb::install(&mount.join("datadir"), &run_directory).unwrap();
    database.start().unwrap();
    database
        .query("CREATE DATABASE IF NOT EXISTS test")
        .unwrap();
    database
        .query(
            "CREATE TABLE test.ledger (id BIGINT PRIMARY KEY, payload VARCHAR(255)) ENGINE=InnoDB",
        )
        .unwrap();
    Some((node, database))
}

/// Inserts transactions of ids starting at `first_id` until `count` transactions were attempted
/// or one fails; returns the ids whose COMMIT was confirmed.
fn insert_load(database: &MariaDb, first_id: u64, transaction_count: u64) -> BTreeSet<u64> {
    let mut session = database.session("test").unwrap();
    let mut confirmed = BTreeSet::new();
    for transaction in 0..transaction_count {
        let start = first_id + transaction * ROWS_PER_TRANSACTION;
        let ids: Vec<u64> = (start..start + ROWS_PER_TRANSACTION).collect();
        if !session.insert_transaction(&ids) {
            break;
        }
        confirmed.extend(ids);
    }
    confirmed
}

fn assert_ledger_present(database: &MariaDb, ledger: &BTreeSet<u64>, context: &str) {
    let present = ledger_ids(database).unwrap();
    let missing: Vec<&u64> = ledger.difference(&present).collect();
    assert!(
        missing.is_empty(),
        "{context}: {} committed rows missing, first {:?}",
        missing.len(),
        missing.first()
    );
    let check = database.query("CHECK TABLE test.ledger").unwrap();
    assert!(
        check.contains("status\tOK") || check.trim_end().ends_with("OK"),
        "{context}: CHECK TABLE: {check}"
    );
}

#[test]
fn mariadb_survives_kill_of_mariadbd_and_of_the_node() {
    let Some((mut node, mut database)) = setup() else {
        return;
    };
    // 1. At least 10,000 rows in transactions, each commit confirmed.
    let mut ledger = insert_load(&database, 1, 1_000);
    assert_eq!(
        ledger.len(),
        10_000,
        "every transaction of the first load commits"
    );
    assert_ledger_present(&database, &ledger, "after the first load");

    // 2. kill -9 of mariadbd while a load runs, then InnoDB recovery.
    let concurrent = std::thread::scope(|scope| {
        let database_ref = &database;
        let load = scope.spawn(move || insert_load(database_ref, 100_001, 100_000));
        std::thread::sleep(std::time::Duration::from_secs(3));
        // SIGKILL through the pid file: the load thread holds a shared borrow.
        let pid: i32 = std::fs::read_to_string(database_ref.socket.with_extension("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) on the mariadbd pid we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        load.join().unwrap()
    });
    assert!(
        !concurrent.is_empty(),
        "some commits confirmed before the kill"
    );
    ledger.extend(&concurrent);
    database.kill(); // reap
    database.start().unwrap();
    assert_ledger_present(&database, &ledger, "after kill -9 of mariadbd");

    // 3. kill -9 of the storage node during the load; restart node, mount and mariadbd.
    let concurrent = std::thread::scope(|scope| {
        let database_ref = &database;
        let load = scope.spawn(move || insert_load(database_ref, 1_000_001, 100_000));
        std::thread::sleep(std::time::Duration::from_secs(3));
        node.kill_node();
        load.join().unwrap()
    });
    assert!(
        !concurrent.is_empty(),
        "some commits confirmed before the node was killed"
    );
    ledger.extend(&concurrent);
    database.kill();
    node.restart_node().unwrap();
    node.remount_all().unwrap();
    database.start().unwrap();
    assert_ledger_present(&database, &ledger, "after kill -9 of the storage node");
    eprintln!("mariadb ledger: {} committed rows verified", ledger.len());
}
