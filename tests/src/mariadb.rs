//! A real MariaDB server (Debian's `mariadbd`) with its datadir on a path, driven through the
//! real `mariadb` command-line client, for end-to-end tests. No mocks: InnoDB does its own
//! fsyncs, O_DIRECT and fallocate calls on the Ballast mount.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::wait_until;

pub fn available() -> bool {
    Path::new("/usr/sbin/mariadbd").exists() && Path::new("/usr/bin/mariadb-install-db").exists()
}

pub struct MariaDb {
    pub datadir: PathBuf,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    process: Option<Child>,
}

impl MariaDb {
    /// Initialises a datadir (mariadb-install-db) on `datadir`.
    pub fn install(datadir: &Path, run_directory: &Path) -> Result<Self> {
        std::fs::create_dir_all(datadir)?;
        let output = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                "--user=root",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ])
            .arg(format!("--datadir={}", datadir.display()))
            .output()
            .context("running mariadb-install-db")?;
        if !output.status.success() {
            bail!(
                "mariadb-install-db failed: {}\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(Self {
            datadir: datadir.to_path_buf(),
            socket: run_directory.join("mariadb.sock"),
            log_path: run_directory.join("mariadb.log"),
            process: None,
        })
    }

    /// A server for a datadir initialised earlier (e.g. by another mount of the same volume).
    pub fn existing(datadir: &Path, run_directory: &Path) -> Self {
        Self {
            datadir: datadir.to_path_buf(),
            socket: run_directory.join("mariadb.sock"),
            log_path: run_directory.join("mariadb.log"),
            process: None,
        }
    }

    pub fn start(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults",
                "--user=root",
                "--skip-networking",
                "--innodb-buffer-pool-size=128M",
                "--innodb-log-file-size=64M",
                "--innodb-flush-log-at-trx-commit=1",
                "--sync-binlog=1",
                "--skip-log-bin",
            ])
            .arg(format!("--datadir={}", self.datadir.display()))
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!(
                "--pid-file={}",
                self.socket.with_extension("pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting mariadbd")?;
        self.process = Some(child);
        let socket = self.socket.clone();
        if wait_until(
            "mariadbd to accept connections",
            Duration::from_secs(180),
            || {
                socket.exists()
                    && self
                        .query("SELECT 1")
                        .map(|out| out.trim() == "1")
                        .unwrap_or(false)
            },
        )
        .is_err()
        {
            bail!("mariadbd did not start; log:\n{}", self.log_tail());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs SQL with the `mariadb` client; returns tab-separated rows.
    pub fn query(&self, sql: &str) -> Result<String> {
        let output = Command::new("mariadb")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "-N", "-B", "-e", sql])
            .output()
            .context("running mariadb")?;
        if !output.status.success() {
            bail!(
                "query {sql:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// SIGKILL, no shutdown: InnoDB must recover on the next start.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// A long-lived client session whose COMMITs are confirmed one by one.
    pub fn session(&self, database: &str) -> Result<Session> {
        let mut child = Command::new("mariadb")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "-N", "-B", "--unbuffered", database])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting mariadb client")?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Session {
            child,
            stdin,
            lines,
        })
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Session {
    /// Runs one transaction inserting `ids`; returns true only when the client printed the
    /// marker that follows a successful COMMIT (the ledger's evidence).
    pub fn insert_transaction(&mut self, ids: &[u64]) -> bool {
        let values: Vec<String> = ids
            .iter()
            .map(|id| format!("({id}, REPEAT('x', 200))"))
            .collect();
        let marker = format!("committed-{}", ids[0]);
        let sql = format!(
            "BEGIN; INSERT INTO ledger (id, payload) VALUES {}; COMMIT; SELECT '{marker}';\n",
            values.join(",")
        );
        if self
            .stdin
            .write_all(sql.as_bytes())
            .and_then(|_| self.stdin.flush())
            .is_err()
        {
            return false;
        }
        match self.lines.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line == marker,
            Err(_) => false,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ids present in the ledger table.
pub fn ledger_ids(database: &MariaDb) -> Result<BTreeSet<u64>> {
    Ok(database
        .query("SELECT id FROM test.ledger")?
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect())
}
