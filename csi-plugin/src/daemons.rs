//! Who starts and stops the FUSE daemons of staged volumes, as the node service sees it.
//!
//! Owns: the choice between starting daemons in the plugin's own process tree (no mounter
//! configured: they survive a restart of the plugin *process* but not of its container) and
//! asking `ballast-csi-mounter` over its socket (they survive restarts, crashes and upgrades of
//! the plugin container), and stopping a recorded daemon through whichever owner started it.
//! Must not depend on: the CSI types or the node plugin's state file format beyond
//! [`StagedVolume`]; the node service records what this returns.
//! Invariants:
//! - The plugin signals only daemons it started itself ([`DaemonOwner::Plugin`]), after their
//!   start time matched; a mounter's daemon has a pid of the mounter's pid namespace and is
//!   stopped only by the mounter.
//! - With a mounter, a mount it reports is also checked in the plugin's own mount table: a
//!   missing one means the kubelet directory lacks shared (Bidirectional) propagation, and the
//!   daemon is stopped again rather than left serving a mount nobody can use.

use std::path::{Path, PathBuf};

use crate::fuse::{self, FuseDaemon, FuseLauncher};
use crate::mounter::MounterClient;
use crate::mounts;
use crate::state::{DaemonOwner, StagedVolume};
use crate::CsiError;

/// The owner of new daemons.
#[derive(Debug)]
pub enum FuseDaemons {
    /// The plugin starts `ballast-fuse` itself (in a session of its own).
    InProcess(FuseLauncher),
    /// `ballast-csi-mounter` starts and stops them.
    Mounter(MounterClient),
}

/// A daemon that serves a new staging mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartedDaemon {
    pub daemon: FuseDaemon,
    pub owner: DaemonOwner,
}

impl FuseDaemons {
    /// Mounts `volume` at `staging_path` (resolved, existing) through a new daemon, and returns
    /// once the mount is in this process's mount table.
    pub async fn start(
        &self,
        volume: &str,
        staging_path: &Path,
        timeout_ms: u64,
    ) -> Result<StartedDaemon, CsiError> {
        match self {
            FuseDaemons::InProcess(launcher) => Ok(StartedDaemon {
                daemon: launcher.mount(volume, staging_path, timeout_ms).await?,
                owner: DaemonOwner::Plugin,
            }),
            FuseDaemons::Mounter(client) => {
                let (identity, already_running) =
                    client.mount(volume, staging_path, timeout_ms).await?;
                let entries = mounts::read_mountinfo()?;
                let visible = mounts::find(&entries, staging_path)
                    .is_some_and(|entry| entry.is_ballast_volume(volume));
                if !visible {
                    let stopped = client.stop(volume, staging_path).await;
                    return Err(CsiError::Internal(format!(
                        "the mounter mounted volume {volume} at {}, but the mount does not reach \
                         the node plugin: the kubelet directory must be shared with \
                         Bidirectional mount propagation in both the plugin and the mounter \
                         (the mounter's daemon was stopped again: {stopped:?})",
                        staging_path.display()
                    )));
                }
                tracing::info!(volume, staging_path = %staging_path.display(),
                    mounter_pid = identity.pid, already_running, "the mounter serves the volume");
                Ok(StartedDaemon {
                    daemon: FuseDaemon {
                        pid: identity.pid,
                        start_ticks: identity.start_ticks,
                    },
                    owner: DaemonOwner::Mounter,
                })
            }
        }
    }

    /// Stops the daemon of `volume` at `staging_path` (already unmounted by the caller):
    /// `recorded` is the plugin's record of it, if any. Waits at most `exit_wait_ms` for it to
    /// exit on its own before signalling.
    pub async fn stop(
        &self,
        volume: &str,
        staging_path: &Path,
        recorded: Option<&StagedVolume>,
        exit_wait_ms: u64,
    ) -> Result<(), CsiError> {
        if let Some(staged) = recorded.filter(|staged| staged.fuse_owner == DaemonOwner::Plugin) {
            let daemon = FuseDaemon {
                pid: staged.fuse_pid,
                start_ticks: staged.fuse_start_ticks,
            };
            if fuse::is_running(&daemon) {
                fuse::stop(&daemon, exit_wait_ms).await;
            }
        }
        match self {
            // The mounter is asked even without a record of ours: the record may have been
            // lost, and stopping what it does not own is a no-op there.
            FuseDaemons::Mounter(client) => {
                let was_running = client.stop(volume, staging_path).await?;
                tracing::info!(
                    volume,
                    was_running,
                    "the mounter stopped the volume's daemon"
                );
            }
            FuseDaemons::InProcess(_) => {
                if recorded.is_some_and(|staged| staged.fuse_owner == DaemonOwner::Mounter) {
                    tracing::warn!(
                        volume,
                        "this daemon belongs to ballast-csi-mounter, but the plugin runs without \
                         --mounter-socket; it ends on its own now that its mount is gone"
                    );
                }
            }
        }
        Ok(())
    }

    /// Whether a recorded daemon is known to run, for logs: `None` when only the mounter can
    /// tell.
    pub fn is_running_here(staged: &StagedVolume) -> Option<bool> {
        (staged.fuse_owner == DaemonOwner::Plugin).then(|| {
            fuse::is_running(&FuseDaemon {
                pid: staged.fuse_pid,
                start_ticks: staged.fuse_start_ticks,
            })
        })
    }

    /// What the daemon's owner knows about a volume whose FUSE connection is gone, for a volume
    /// condition; `None` when there is nothing to add.
    pub async fn explain_dead_connection(&self, volume: &str) -> Option<String> {
        let FuseDaemons::Mounter(client) = self else {
            return None;
        };
        Some(match client.status(volume).await {
            Ok(Some(report)) => {
                let last_line = report.log_tail.lines().last().unwrap_or("").to_owned();
                format!(
                    "mounter: daemon pid {} for {} {} (last log line: {last_line:?})",
                    report.daemon.pid,
                    report.mountpoint.display(),
                    if report.running {
                        "still runs"
                    } else {
                        "has exited"
                    },
                )
            }
            Ok(None) => "mounter: it owns no daemon of this volume".to_owned(),
            Err(error) => format!("mounter: {error}"),
        })
    }

    /// The mounter's socket, if daemons are delegated.
    pub fn mounter_socket(&self) -> Option<PathBuf> {
        match self {
            FuseDaemons::Mounter(client) => Some(client.socket().to_path_buf()),
            FuseDaemons::InProcess(_) => None,
        }
    }
}
