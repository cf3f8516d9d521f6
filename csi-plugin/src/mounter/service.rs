//! `ballast-csi-mounter`'s service: the long-lived owner of the node's `ballast-fuse` daemons.
//!
//! Owns: starting a daemon per staged volume (through [`FuseLauncher`]), the record of the
//! daemons it owns (`<state-dir>/mounter-state.json`), stopping them, reporting on them, and the
//! unix socket it serves the node plugin on.
//! Must not depend on: the CSI services or the node plugin's state file; the plugin keeps its own
//! record (what kubelet staged and published) and asks for daemons only through `protocol`.
//! Invariants:
//! - Every daemon it started and that may still run is in the record before `Mounted` is
//!   answered; a daemon it cannot record is unmounted and stopped again.
//! - Mountpoints are confined to `--mount-root` (the kubelet directory): the socket cannot be
//!   used to mount over arbitrary host paths. Paths with `..` are refused.
//! - One request per volume at a time (`OperationLocks`; a second one is `Busy`), and at most
//!   [`CONNECTION_COUNT_MAX`] connections in flight; every read, write and wait is bounded.
//! - A restarted mounter re-adopts every recorded daemon that still runs (same pid and start
//!   time) and reports the others as not running, with their logs, until the plugin replaces or
//!   stops them. Nothing is remounted behind the plugin's back: a dead FUSE connection cannot be
//!   revived, and pods holding it must be restarted anyway.
//! - Stopping the mounter (SIGTERM) stops serving only; daemons and mounts are left alone (in a
//!   container they die with it, which is why the chart never restarts it on its own).

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use super::protocol::{
    read_message, write_message, DaemonIdentity, DaemonReport, FailureKind, MounterRequest,
    MounterResponse, LOG_TAIL_LENGTH_BYTES_MAX, MOUNT_TIMEOUT_MS_MAX, REQUEST_LENGTH_BYTES_MAX,
    RESPONSE_LENGTH_BYTES_MAX,
};
use crate::fuse::{self, FuseDaemon, FuseLauncher};
use crate::mounts;
use crate::operations::OperationLocks;
use crate::state::write_atomically;
use crate::CsiError;

/// File name of the mounter's record inside its state directory.
pub const RECORD_FILE_NAME: &str = "mounter-state.json";
/// Version of the record format; bump on incompatible changes.
pub const RECORD_VERSION: u32 = 1;
/// Connections served at once; more wait in the socket's backlog.
pub const CONNECTION_COUNT_MAX: usize = 32;
/// Time a client gets to send its request once connected.
const REQUEST_READ_TIMEOUT_MS: u64 = 5_000;
/// Time a client gets to take the answer.
const RESPONSE_WRITE_TIMEOUT_MS: u64 = 5_000;
/// Time a daemon gets to exit on its own after its mount is gone, before it is signalled.
const DAEMON_EXIT_WAIT_MS: u64 = 10_000;
/// Bound on unmounts at one path (mounts can be stacked).
const UNMOUNT_COUNT_MAX: usize = 8;
/// Daemons one mounter may own (matches the node plugin's `MAX_VOLUMES_PER_NODE`).
pub const DAEMON_COUNT_MAX: usize = 256;
/// Longest mountpoint accepted.
const MOUNTPOINT_LENGTH_BYTES_MAX: usize = 4_096;

/// Everything the mounter is started with.
#[derive(Debug, Clone)]
pub struct MounterConfig {
    /// The unix socket to serve on.
    pub socket: PathBuf,
    /// Where the record and the daemons' logs live; must survive restarts (a hostPath).
    pub state_directory: PathBuf,
    /// Every mountpoint must lie below this directory (the kubelet directory).
    pub mount_root: PathBuf,
    pub fuse_binary: PathBuf,
    /// The storage node endpoint the daemons connect to.
    pub ballast_endpoint: String,
}

/// The record of the daemons the mounter owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MounterRecord {
    version: u32,
    /// By volume name: one daemon per volume on a node.
    daemons: BTreeMap<String, DaemonRecord>,
}

impl Default for MounterRecord {
    fn default() -> Self {
        Self {
            version: RECORD_VERSION,
            daemons: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DaemonRecord {
    mountpoint: PathBuf,
    pid: i32,
    start_ticks: u64,
}

impl DaemonRecord {
    fn daemon(&self) -> FuseDaemon {
        FuseDaemon {
            pid: self.pid,
            start_ticks: self.start_ticks,
        }
    }

    fn identity(&self) -> DaemonIdentity {
        DaemonIdentity {
            pid: self.pid,
            start_ticks: self.start_ticks,
        }
    }
}

/// The mounter: daemons, their record, and per-volume serialisation.
#[derive(Debug)]
pub struct Mounter {
    launcher: FuseLauncher,
    record_path: PathBuf,
    record: tokio::sync::Mutex<MounterRecord>,
    locks: OperationLocks,
    mount_root: PathBuf,
}

fn failure_kind(error: &CsiError) -> FailureKind {
    match error {
        CsiError::InvalidArgument(_) | CsiError::NotFound(_) | CsiError::OutOfRange(_) => {
            FailureKind::InvalidArgument
        }
        CsiError::AlreadyExists(_) | CsiError::FailedPrecondition(_) => {
            FailureKind::FailedPrecondition
        }
        CsiError::Aborted(_) => FailureKind::Busy,
        _ => FailureKind::Internal,
    }
}

fn mounted_volume<'a>(
    entries: &'a [mounts::MountEntry],
    path: &Path,
    volume: &str,
) -> Option<&'a mounts::MountEntry> {
    mounts::find(entries, path).filter(|entry| entry.is_ballast_volume(volume))
}

impl Mounter {
    /// Loads the record and re-adopts the daemons that still run.
    pub fn open(config: &MounterConfig) -> Result<Self, CsiError> {
        std::fs::create_dir_all(&config.state_directory).map_err(|error| {
            CsiError::io("creating state directory", &config.state_directory, error)
        })?;
        let mount_root = config
            .mount_root
            .canonicalize()
            .map_err(|error| CsiError::io("resolving the mount root", &config.mount_root, error))?;
        let launcher = FuseLauncher::new(
            config.fuse_binary.clone(),
            config.ballast_endpoint.clone(),
            &config.state_directory,
        )?;
        let record_path = config.state_directory.join(RECORD_FILE_NAME);
        let record = load_record(&record_path)?;
        let entries = mounts::read_mountinfo()?;
        for (volume, daemon) in &record.daemons {
            let running = fuse::is_running(&daemon.daemon());
            let mounted = mounted_volume(&entries, &daemon.mountpoint, volume).is_some();
            if running && mounted {
                tracing::info!(volume, mountpoint = %daemon.mountpoint.display(), pid = daemon.pid,
                    "re-adopted a running FUSE daemon");
            } else {
                tracing::warn!(volume, mountpoint = %daemon.mountpoint.display(), pid = daemon.pid,
                    running, mounted,
                    "the FUSE daemon of this volume is gone (or lost its mount): its pods see \
                     ENOTCONN until the volume is staged again and the pods are restarted; log: {}",
                    launcher.log_path(volume).display());
            }
        }
        Ok(Self {
            launcher,
            record_path,
            record: tokio::sync::Mutex::new(record),
            locks: OperationLocks::default(),
            mount_root,
        })
    }

    /// Answers one request; failures become `Failed` answers.
    pub async fn handle(&self, request: MounterRequest) -> MounterResponse {
        let result = match request {
            MounterRequest::Mount {
                volume,
                mountpoint,
                timeout_ms,
            } => self.mount(&volume, &mountpoint, timeout_ms).await,
            MounterRequest::Stop { volume, mountpoint } => self.stop(&volume, &mountpoint).await,
            MounterRequest::Status { volume } => self.status(&volume).await,
            MounterRequest::List {} => self.list().await,
        };
        result.unwrap_or_else(|error| MounterResponse::Failed {
            kind: failure_kind(&error),
            message: error.to_string(),
        })
    }

    fn validate_volume(volume: &str) -> Result<(), CsiError> {
        ballast_common::validate_volume_name(volume)
            .map_err(|error| CsiError::InvalidArgument(format!("volume {volume:?}: {error}")))
    }

    /// The mountpoint as mountinfo spells it, confined to the mount root.
    fn validate_mountpoint(&self, mountpoint: &Path) -> Result<PathBuf, CsiError> {
        let refuse = |reason: &str| {
            CsiError::InvalidArgument(format!("mountpoint {}: {reason}", mountpoint.display()))
        };
        if mountpoint.as_os_str().len() > MOUNTPOINT_LENGTH_BYTES_MAX {
            return Err(refuse("too long"));
        }
        if !mountpoint.is_absolute() {
            return Err(refuse("must be absolute"));
        }
        if mountpoint
            .components()
            .any(|component| matches!(component, Component::ParentDir))
        {
            return Err(refuse("must not contain .."));
        }
        let resolved = mounts::resolve(mountpoint);
        if !resolved.starts_with(&self.mount_root) || resolved == self.mount_root {
            return Err(refuse(&format!(
                "must lie below the mount root {}",
                self.mount_root.display()
            )));
        }
        Ok(resolved)
    }

    async fn save(&self, record: &MounterRecord) -> Result<(), CsiError> {
        let text = serde_json::to_vec_pretty(record)
            .map_err(|error| CsiError::Internal(format!("encoding the mounter record: {error}")))?;
        write_atomically(&self.record_path, &text)
    }

    async fn mount(
        &self,
        volume: &str,
        mountpoint: &Path,
        timeout_ms: u64,
    ) -> Result<MounterResponse, CsiError> {
        Self::validate_volume(volume)?;
        let mountpoint = self.validate_mountpoint(mountpoint)?;
        if timeout_ms == 0 || timeout_ms > MOUNT_TIMEOUT_MS_MAX {
            return Err(CsiError::InvalidArgument(format!(
                "timeout_ms {timeout_ms} must be within 1..={MOUNT_TIMEOUT_MS_MAX}"
            )));
        }
        let _guard = self.locks.begin(volume)?;
        let entries = mounts::read_mountinfo()?;
        let existing = self.record.lock().await.daemons.get(volume).cloned();
        if let Some(existing) = existing {
            let running = fuse::is_running(&existing.daemon());
            let live_mount = mounted_volume(&entries, &existing.mountpoint, volume).is_some();
            if running && live_mount && existing.mountpoint == mountpoint {
                return Ok(MounterResponse::Mounted {
                    daemon: existing.identity(),
                    already_running: true,
                });
            }
            if running && live_mount {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {volume} is already mounted at {} by daemon {}",
                    existing.mountpoint.display(),
                    existing.pid
                )));
            }
            if running {
                tracing::warn!(
                    volume,
                    pid = existing.pid,
                    "a daemon of this volume runs without its mount; stopping it"
                );
                fuse::stop(&existing.daemon(), 0).await;
            }
            let mut record = self.record.lock().await;
            let mut next = record.clone();
            next.daemons.remove(volume);
            self.save(&next).await?;
            *record = next;
        }
        if let Some(entry) = mounts::find(&entries, &mountpoint) {
            return Err(CsiError::FailedPrecondition(format!(
                "{} already has a mount of {} ({}) that this mounter does not own",
                mountpoint.display(),
                entry.source,
                entry.fs_type
            )));
        }
        if self.record.lock().await.daemons.len() >= DAEMON_COUNT_MAX {
            return Err(CsiError::FailedPrecondition(format!(
                "this mounter already owns {DAEMON_COUNT_MAX} daemons"
            )));
        }
        let daemon = self.launcher.mount(volume, &mountpoint, timeout_ms).await?;
        let entry = DaemonRecord {
            mountpoint: mountpoint.clone(),
            pid: daemon.pid,
            start_ticks: daemon.start_ticks,
        };
        let mut record = self.record.lock().await;
        let mut next = record.clone();
        next.daemons.insert(volume.to_owned(), entry.clone());
        if let Err(error) = self.save(&next).await {
            // Never leave a daemon nobody knows about.
            let _ = mounts::unmount(&mountpoint);
            fuse::stop(&daemon, DAEMON_EXIT_WAIT_MS).await;
            return Err(error);
        }
        *record = next;
        tracing::info!(volume, mountpoint = %mountpoint.display(), pid = daemon.pid,
            "FUSE daemon started");
        Ok(MounterResponse::Mounted {
            daemon: entry.identity(),
            already_running: false,
        })
    }

    async fn stop(&self, volume: &str, mountpoint: &Path) -> Result<MounterResponse, CsiError> {
        Self::validate_volume(volume)?;
        let mountpoint = self.validate_mountpoint(mountpoint)?;
        let _guard = self.locks.begin(volume)?;
        let existing = self.record.lock().await.daemons.get(volume).cloned();
        let Some(existing) = existing.filter(|existing| existing.mountpoint == mountpoint) else {
            return Ok(MounterResponse::Stopped { was_running: false });
        };
        for _ in 0..UNMOUNT_COUNT_MAX {
            let entries = mounts::read_mountinfo()?;
            if mounted_volume(&entries, &mountpoint, volume).is_none() {
                break;
            }
            let outcome = mounts::unmount(&mountpoint)?;
            tracing::info!(volume, mountpoint = %mountpoint.display(), ?outcome, "unmounted");
        }
        let entries = mounts::read_mountinfo()?;
        if mounted_volume(&entries, &mountpoint, volume).is_some() {
            return Err(CsiError::Internal(format!(
                "{} is still mounted after {UNMOUNT_COUNT_MAX} unmounts",
                mountpoint.display()
            )));
        }
        let was_running = fuse::is_running(&existing.daemon());
        if was_running {
            fuse::stop(&existing.daemon(), DAEMON_EXIT_WAIT_MS).await;
        }
        let mut record = self.record.lock().await;
        let mut next = record.clone();
        next.daemons.remove(volume);
        self.save(&next).await?;
        *record = next;
        tracing::info!(volume, mountpoint = %mountpoint.display(), pid = existing.pid,
            was_running, "FUSE daemon stopped");
        Ok(MounterResponse::Stopped { was_running })
    }

    fn report(
        &self,
        volume: &str,
        daemon: &DaemonRecord,
        entries: &[mounts::MountEntry],
        with_log: bool,
    ) -> DaemonReport {
        let log_tail = if with_log {
            let tail = self.launcher.log_tail(volume);
            let start = tail.len().saturating_sub(LOG_TAIL_LENGTH_BYTES_MAX);
            let start = (start..=tail.len())
                .find(|&index| tail.is_char_boundary(index))
                .unwrap_or(tail.len());
            tail[start..].to_owned()
        } else {
            String::new()
        };
        DaemonReport {
            volume: volume.to_owned(),
            mountpoint: daemon.mountpoint.clone(),
            daemon: daemon.identity(),
            running: fuse::is_running(&daemon.daemon()),
            mounted: mounted_volume(entries, &daemon.mountpoint, volume).is_some(),
            log_tail,
        }
    }

    async fn status(&self, volume: &str) -> Result<MounterResponse, CsiError> {
        Self::validate_volume(volume)?;
        let entries = mounts::read_mountinfo()?;
        let record = self.record.lock().await;
        Ok(MounterResponse::Status {
            daemon: record
                .daemons
                .get(volume)
                .map(|daemon| self.report(volume, daemon, &entries, true)),
        })
    }

    async fn list(&self) -> Result<MounterResponse, CsiError> {
        let entries = mounts::read_mountinfo()?;
        let record = self.record.lock().await;
        Ok(MounterResponse::List {
            daemons: record
                .daemons
                .iter()
                .map(|(volume, daemon)| self.report(volume, daemon, &entries, false))
                .collect(),
        })
    }
}

/// Reads the record; a missing file is empty, an unreadable one is moved aside (its daemons then
/// keep running unowned: the plugin's unstage still unmounts them, and they exit on their own).
fn load_record(path: &Path) -> Result<MounterRecord, CsiError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(MounterRecord::default())
        }
        Err(error) => return Err(CsiError::io("reading the mounter record", path, error)),
    };
    let reason = match serde_json::from_str::<MounterRecord>(&text) {
        Ok(record) if record.version == RECORD_VERSION => return Ok(record),
        Ok(record) => format!("unknown version {}", record.version),
        Err(error) => error.to_string(),
    };
    let mut aside = path.as_os_str().to_owned();
    aside.push(".unreadable");
    tracing::error!(path = %path.display(), reason,
        "mounter record unreadable; moved aside, starting from an empty record");
    std::fs::rename(path, &aside)
        .map_err(|error| CsiError::io("moving aside the mounter record", path, error))?;
    Ok(MounterRecord::default())
}

/// Serves one connection: one request, one answer.
async fn serve_connection(mounter: &Mounter, stream: UnixStream) {
    let (reader, writer) = stream.into_split();
    let response = match read_message::<MounterRequest>(
        reader,
        REQUEST_LENGTH_BYTES_MAX,
        REQUEST_READ_TIMEOUT_MS,
    )
    .await
    {
        Ok(request) => mounter.handle(request).await,
        Err(error) => {
            tracing::warn!(%error, "refusing a malformed request");
            MounterResponse::Failed {
                kind: FailureKind::InvalidArgument,
                message: format!("malformed request: {error}"),
            }
        }
    };
    if let Err(error) = write_message(
        writer,
        &response,
        RESPONSE_LENGTH_BYTES_MAX,
        RESPONSE_WRITE_TIMEOUT_MS,
    )
    .await
    {
        tracing::warn!(%error, "the client did not take its answer");
    }
}

/// Serves the mounter socket until `shutdown` completes. Daemons and mounts stay.
pub async fn serve(
    config: MounterConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CsiError> {
    let mounter = Arc::new(Mounter::open(&config)?);
    let listener = crate::server::bind(&config.socket)?;
    // Only root (the node plugin) may ask for mounts.
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|error| CsiError::io("restricting the socket", &config.socket, error))?;
    tracing::info!(socket = %config.socket.display(), mount_root = %mounter.mount_root.display(),
        ballast_endpoint = %config.ballast_endpoint, "FUSE mounter serving");
    println!("ballast-csi-mounter serving on {}", config.socket.display());
    let permits = Arc::new(Semaphore::new(CONNECTION_COUNT_MAX));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => permit
                .map_err(|error| CsiError::Internal(format!("connection limit: {error}")))?,
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _address)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let mounter = Arc::clone(&mounter);
        tokio::spawn(async move {
            serve_connection(&mounter, stream).await;
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&config.socket);
    let running_count = mounter
        .record
        .lock()
        .await
        .daemons
        .values()
        .filter(|daemon| fuse::is_running(&daemon.daemon()))
        .count();
    tracing::warn!(
        running_count,
        "mounter stopping; its FUSE daemons are left running (inside a container they end with \
         it, and their pods then see ENOTCONN)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounter_in(directory: &Path) -> Mounter {
        let mount_root = directory.join("kubelet");
        std::fs::create_dir_all(mount_root.join("plugins")).unwrap();
        Mounter::open(&MounterConfig {
            socket: directory.join("mounter.sock"),
            state_directory: directory.join("state"),
            mount_root,
            fuse_binary: "/nonexistent/ballast-fuse".into(),
            ballast_endpoint: "http://127.0.0.1:1".into(),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn requests_outside_the_mount_root_or_with_bad_names_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let mounter = mounter_in(directory.path());
        let root = directory.path().join("kubelet");
        for (volume, mountpoint) in [
            ("pvc-1", PathBuf::from("/etc")),
            ("pvc-1", root.clone()),
            ("pvc-1", root.join("plugins/../../escape")),
            ("pvc-1", PathBuf::from("relative/path")),
            ("Not A Volume", root.join("plugins/x")),
        ] {
            let answer = mounter
                .handle(MounterRequest::Mount {
                    volume: volume.into(),
                    mountpoint: mountpoint.clone(),
                    timeout_ms: 1_000,
                })
                .await;
            assert!(
                matches!(
                    answer,
                    MounterResponse::Failed {
                        kind: FailureKind::InvalidArgument,
                        ..
                    }
                ),
                "{volume} at {}: {answer:?}",
                mountpoint.display()
            );
        }
        let answer = mounter
            .handle(MounterRequest::Mount {
                volume: "pvc-1".into(),
                mountpoint: root.join("plugins/x"),
                timeout_ms: MOUNT_TIMEOUT_MS_MAX + 1,
            })
            .await;
        assert!(
            matches!(answer, MounterResponse::Failed { .. }),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn a_daemon_that_cannot_start_is_reported_and_not_recorded() {
        let directory = tempfile::tempdir().unwrap();
        let mounter = mounter_in(directory.path());
        let mountpoint = directory.path().join("kubelet/plugins/x");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let answer = mounter
            .handle(MounterRequest::Mount {
                volume: "pvc-1".into(),
                mountpoint,
                timeout_ms: 1_000,
            })
            .await;
        assert!(
            matches!(
                &answer,
                MounterResponse::Failed {
                    kind: FailureKind::Internal,
                    message
                } if message.contains("cannot start the FUSE daemon")
            ),
            "{answer:?}"
        );
        assert_eq!(
            mounter.handle(MounterRequest::List {}).await,
            MounterResponse::List {
                daemons: Vec::new()
            }
        );
    }

    #[tokio::test]
    async fn recorded_daemons_are_re_adopted_or_reported_dead_after_a_restart() {
        let directory = tempfile::tempdir().unwrap();
        let state_directory = directory.path().join("state");
        std::fs::create_dir_all(&state_directory).unwrap();
        // A live process stands in for a daemon whose mount vanished; pid 0 for a dead one.
        let pid = std::process::id() as i32;
        let mut record = MounterRecord::default();
        record.daemons.insert(
            "alive".into(),
            DaemonRecord {
                mountpoint: directory.path().join("kubelet/plugins/a"),
                pid,
                start_ticks: fuse::process_start_ticks(pid).unwrap(),
            },
        );
        record.daemons.insert(
            "dead".into(),
            DaemonRecord {
                mountpoint: directory.path().join("kubelet/plugins/d"),
                pid: 0,
                start_ticks: 0,
            },
        );
        write_atomically(
            &state_directory.join(RECORD_FILE_NAME),
            &serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let mounter = mounter_in(directory.path());
        let MounterResponse::List { daemons } = mounter.handle(MounterRequest::List {}).await
        else {
            panic!("list");
        };
        let states: Vec<(&str, bool, bool)> = daemons
            .iter()
            .map(|report| (report.volume.as_str(), report.running, report.mounted))
            .collect();
        assert_eq!(states, [("alive", true, false), ("dead", false, false)]);
        // Stopping what is dead succeeds and forgets it.
        let answer = mounter
            .handle(MounterRequest::Stop {
                volume: "dead".into(),
                mountpoint: directory.path().join("kubelet/plugins/d"),
            })
            .await;
        assert_eq!(answer, MounterResponse::Stopped { was_running: false });
        let MounterResponse::Status { daemon } = mounter
            .handle(MounterRequest::Status {
                volume: "dead".into(),
            })
            .await
        else {
            panic!("status");
        };
        assert!(daemon.is_none());
    }

    #[tokio::test]
    async fn the_socket_serves_one_request_per_connection_and_refuses_garbage() {
        use tokio::io::AsyncWriteExt;
        let directory = tempfile::tempdir().unwrap();
        let mount_root = directory.path().join("kubelet");
        std::fs::create_dir_all(&mount_root).unwrap();
        let config = MounterConfig {
            socket: directory.path().join("mounter.sock"),
            state_directory: directory.path().join("state"),
            mount_root,
            fuse_binary: "/nonexistent/ballast-fuse".into(),
            ballast_endpoint: "http://127.0.0.1:1".into(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(config.clone(), async {
            let _ = stopped.await;
        }));
        let client = super::super::client::MounterClient::new(config.socket.clone());
        let mut listed = None;
        for _ in 0..100 {
            match client.list().await {
                Ok(daemons) => {
                    listed = Some(daemons);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        assert_eq!(listed, Some(Vec::new()));
        let mut raw = UnixStream::connect(&config.socket).await.unwrap();
        raw.write_all(b"{\"request\":\"format\"}\n").await.unwrap();
        let answer: MounterResponse = read_message(raw, RESPONSE_LENGTH_BYTES_MAX, 5_000)
            .await
            .unwrap();
        assert!(matches!(
            answer,
            MounterResponse::Failed {
                kind: FailureKind::InvalidArgument,
                ..
            }
        ));
        let error = client.status("Bad Name").await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(!config.socket.exists(), "the socket is removed on shutdown");
        let error = client.list().await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    }
}
