//! Lifetime of the `ballast-fuse` daemons that serve staged volumes.
//!
//! Owns: starting a daemon so that it outlives the plugin, waiting (bounded) until its mount
//! appears, identifying a daemon by pid *and* start time, and stopping it.
//! Must not depend on: the state file or the CSI types; the node service records what this
//! returns.
//! Invariants:
//! - A daemon runs in its own session (`setsid` before exec): no signal aimed at the plugin's
//!   process group or terminal reaches it, and it keeps serving when the plugin exits or is
//!   killed. Its stdout and stderr go to `<state-dir>/fuse/<volume>.log`, never to a pipe the
//!   plugin would have to keep draining (a full pipe would block the daemon; a closed one would
//!   kill it with SIGPIPE).
//! - While the plugin runs, a thread waits for each daemon it started, so an exited daemon never
//!   lingers as a zombie; daemons inherited from an earlier plugin instance are reaped by init.
//! - A pid is only ever signalled after its start time matched the recorded one.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::mounts;
use crate::CsiError;

/// How often a wait polls mountinfo or `/proc`.
const POLL_INTERVAL_MS: u64 = 50;
/// How long a daemon may take to exit on SIGTERM before it is killed.
const TERMINATE_WAIT_MS: u64 = 5_000;
/// Lines of a daemon's log quoted in an error.
const LOG_TAIL_LINE_COUNT: usize = 15;

/// A running (or recorded) daemon: pid plus start time, so pid reuse is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuseDaemon {
    pub pid: i32,
    pub start_ticks: u64,
}

/// Starts `ballast-fuse` daemons with a fixed binary, storage node endpoint and log directory.
#[derive(Debug, Clone)]
pub struct FuseLauncher {
    binary: PathBuf,
    ballast_endpoint: String,
    log_directory: PathBuf,
}

impl FuseLauncher {
    /// `binary` is a path or a name looked up on PATH; logs go to `<state_directory>/fuse/`.
    pub fn new(
        binary: PathBuf,
        ballast_endpoint: String,
        state_directory: &Path,
    ) -> Result<Self, CsiError> {
        let log_directory = state_directory.join("fuse");
        std::fs::create_dir_all(&log_directory)
            .map_err(|error| CsiError::io("creating log directory", &log_directory, error))?;
        Ok(Self {
            binary,
            ballast_endpoint,
            log_directory,
        })
    }

    /// The log file of `volume`'s daemon.
    pub fn log_path(&self, volume: &str) -> PathBuf {
        self.log_directory.join(format!("{volume}.log"))
    }

    /// The last lines of `volume`'s daemon log, for error messages.
    pub fn log_tail(&self, volume: &str) -> String {
        let log = std::fs::read_to_string(self.log_path(volume)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINE_COUNT)..].join("\n")
    }

    /// Starts a daemon mounting `volume` at `mountpoint` (already resolved) and waits until the
    /// mount is in mountinfo, at most `timeout_ms`. On failure the daemon is killed and nothing
    /// stays mounted.
    pub async fn mount(
        &self,
        volume: &str,
        mountpoint: &Path,
        timeout_ms: u64,
    ) -> Result<FuseDaemon, CsiError> {
        let log_path = self.log_path(volume);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|error| CsiError::io("opening daemon log", &log_path, error))?;
        let _ = writeln!(
            log,
            "--- ballast-csi: starting {} for volume {volume} at {}",
            self.binary.display(),
            mountpoint.display()
        );
        let stdout = log
            .try_clone()
            .map_err(|error| CsiError::io("duplicating daemon log", &log_path, error))?;
        let mut command = Command::new(&self.binary);
        command
            .args([
                "--node",
                &self.ballast_endpoint,
                "--volume",
                volume,
                "--mountpoint",
            ])
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log);
        // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
        // calls are allowed; setsid is one, and the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|error| {
            CsiError::Internal(format!(
                "cannot start the FUSE daemon {}: {error}",
                self.binary.display()
            ))
        })?;
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let failure = loop {
            let mounted = mounts::read_mountinfo()?;
            if mounts::find(&mounted, mountpoint)
                .is_some_and(|entry| entry.is_ballast_volume(volume))
            {
                break None;
            }
            match child.try_wait() {
                Ok(Some(status)) => break Some(format!("the FUSE daemon exited ({status})")),
                Ok(None) => {}
                Err(error) => break Some(format!("cannot watch the FUSE daemon: {error}")),
            }
            if Instant::now() >= deadline {
                break Some(format!(
                    "the FUSE mount did not appear within {timeout_ms} ms"
                ));
            }
            tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
        };
        if let Some(reason) = failure {
            let _ = child.kill();
            let _ = child.wait();
            let _ = mounts::unmount(mountpoint);
            return Err(CsiError::Internal(format!(
                "mounting volume {volume} at {}: {reason}; daemon log ({}):\n{}",
                mountpoint.display(),
                log_path.display(),
                self.log_tail(volume)
            )));
        }
        let start_ticks = process_start_ticks(pid).unwrap_or(0);
        // Reap the daemon whenever it exits, so it never stays a zombie while we run.
        let reaper = std::thread::Builder::new()
            .name(format!("reap-fuse-{pid}"))
            .spawn(move || {
                let _ = child.wait();
            });
        if let Err(error) = reaper {
            tracing::warn!(pid, %error,
                "cannot start a reaper thread; init reaps the daemon after the plugin exits");
        }
        Ok(FuseDaemon { pid, start_ticks })
    }
}

/// Start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22), or
/// `None` if there is no such process or it is a zombie.
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state), so field 22 is fields[19].
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether `daemon` is still the same live process.
pub fn is_running(daemon: &FuseDaemon) -> bool {
    daemon.pid > 0 && process_start_ticks(daemon.pid) == Some(daemon.start_ticks)
}

/// Waits up to `exit_wait_ms` for `daemon` to exit on its own (it does once its mount is gone),
/// then sends SIGTERM, then SIGKILL. Every signal is preceded by an identity check.
pub async fn stop(daemon: &FuseDaemon, exit_wait_ms: u64) {
    if !wait_for_exit(daemon, exit_wait_ms).await {
        signal(daemon, libc::SIGTERM);
        if !wait_for_exit(daemon, TERMINATE_WAIT_MS).await {
            tracing::warn!(pid = daemon.pid, "FUSE daemon ignored SIGTERM; killing it");
            signal(daemon, libc::SIGKILL);
            wait_for_exit(daemon, TERMINATE_WAIT_MS).await;
        }
    }
}

fn signal(daemon: &FuseDaemon, signal: i32) {
    if is_running(daemon) {
        // SAFETY: kill(2) with a pid whose start time we just verified; at worst ESRCH.
        unsafe {
            libc::kill(daemon.pid, signal);
        }
    }
}

async fn wait_for_exit(daemon: &FuseDaemon, timeout_ms: u64) -> bool {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        if !is_running(daemon) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_identify_this_process() {
        let pid = std::process::id() as i32;
        let ticks = process_start_ticks(pid).expect("own stat");
        assert!(is_running(&FuseDaemon {
            pid,
            start_ticks: ticks
        }));
        assert!(!is_running(&FuseDaemon {
            pid,
            start_ticks: ticks + 1
        }));
        assert!(!is_running(&FuseDaemon {
            pid: 0,
            start_ticks: 0
        }));
    }

    #[tokio::test]
    async fn stop_terminates_a_process_and_waits_for_it() {
        let mut child = Command::new("sleep").arg("600").spawn().unwrap();
        let pid = child.id() as i32;
        let daemon = FuseDaemon {
            pid,
            start_ticks: process_start_ticks(pid).unwrap(),
        };
        let reaper = std::thread::spawn(move || child.wait());
        stop(&daemon, 0).await;
        assert!(!is_running(&daemon));
        assert!(!reaper.join().unwrap().unwrap().success());
    }
}
