//! The node plugin's record of what it staged and published, in `<state-dir>/node-state.json`.
//!
//! Owns: the file format and its atomic replacement.
//! Must not depend on: the mount table; this is a record of intent and of daemon pids, while
//! `/proc/self/mountinfo` stays the truth for what is mounted (see `mounts`).
//! Invariants:
//! - The file is replaced atomically: written to a temporary file in the same directory,
//!   fsync'd, renamed over the old one, and the directory fsync'd. A crash at any moment leaves
//!   either the old or the new complete file, never a torn one.
//! - A file that cannot be parsed (or has an unknown version) is moved aside, not deleted, and the
//!   plugin starts from an empty record: live mounts are still recognised through mountinfo, only
//!   their daemon pids are unknown (unstage then unmounts without signalling a daemon).
//! - Pids are stored with the process start time (clock ticks since boot, from
//!   `/proc/<pid>/stat`), so a pid reused by an unrelated process is never signalled.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CsiError;

/// Version of the file format; bump on incompatible changes.
pub const STATE_VERSION: u32 = 1;

/// File name of the state inside the state directory.
pub const STATE_FILE_NAME: &str = "node-state.json";

/// Everything the node plugin needs to recover after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub version: u32,
    /// Staged volumes by volume id (the CO stages a volume at one path per node).
    pub staged: BTreeMap<String, StagedVolume>,
    /// Published volumes by target path.
    pub published: BTreeMap<PathBuf, PublishedVolume>,
}

impl Default for NodeState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            staged: BTreeMap::new(),
            published: BTreeMap::new(),
        }
    }
}

/// A volume mounted by a `ballast-fuse` daemon at its staging path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedVolume {
    pub staging_path: PathBuf,
    /// The daemon's pid; 0 when unknown (a mount adopted after the state was lost).
    pub fuse_pid: i32,
    /// The daemon's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub fuse_start_ticks: u64,
    /// Who started the daemon and so who may stop it. Absent in files written before the
    /// mounter existed, which means the plugin.
    #[serde(default)]
    pub fuse_owner: DaemonOwner,
}

/// Which process owns a staged volume's FUSE daemon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonOwner {
    /// The plugin started it itself (no `--mounter-socket`); the pid is in the plugin's pid
    /// namespace and the plugin signals it.
    #[default]
    Plugin,
    /// `ballast-csi-mounter` started it; the pid is in the mounter's pid namespace, so only the
    /// mounter may stop it.
    Mounter,
}

/// A bind mount of a staged volume at a pod's target path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedVolume {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub read_only: bool,
    pub mount_flags: Vec<String>,
}

/// The state file of one state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file inside `state_directory` (created if missing).
    pub fn open(state_directory: &Path) -> Result<Self, CsiError> {
        std::fs::create_dir_all(state_directory)
            .map_err(|error| CsiError::io("creating state directory", state_directory, error))?;
        Ok(Self {
            path: state_directory.join(STATE_FILE_NAME),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state; a missing file is an empty state, an unreadable one is moved aside.
    pub fn load(&self) -> Result<NodeState, CsiError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(NodeState::default())
            }
            Err(error) => return Err(CsiError::io("reading state file", &self.path, error)),
        };
        match serde_json::from_str::<NodeState>(&text) {
            Ok(state) if state.version == STATE_VERSION => Ok(state),
            Ok(state) => {
                self.set_aside(&format!("unknown version {}", state.version))?;
                Ok(NodeState::default())
            }
            Err(error) => {
                self.set_aside(&error.to_string())?;
                Ok(NodeState::default())
            }
        }
    }

    fn set_aside(&self, reason: &str) -> Result<(), CsiError> {
        let aside = self.path.with_extension(format!(
            "json.unreadable-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or(0)
        ));
        tracing::error!(path = %self.path.display(), aside = %aside.display(), reason,
            "state file unreadable; moved aside, starting from an empty record (live mounts are \
             still recognised through mountinfo)");
        std::fs::rename(&self.path, &aside)
            .map_err(|error| CsiError::io("moving aside state file", &self.path, error))
    }

    /// Replaces the state file atomically (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, state: &NodeState) -> Result<(), CsiError> {
        let text = serde_json::to_vec_pretty(state)
            .map_err(|error| CsiError::Internal(format!("encoding node state: {error}")))?;
        write_atomically(&self.path, &text)
    }
}

/// Replaces `path` with `contents` atomically: a temporary file in the same directory
/// (`<path>.tmp`), fsync'd, renamed over `path`, then the directory fsync'd. A crash at any moment
/// leaves either the old or the new complete file.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), CsiError> {
    let mut temporary_name = path.as_os_str().to_owned();
    temporary_name.push(".tmp");
    let temporary = PathBuf::from(temporary_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)
        .map_err(|error| CsiError::io("creating temporary file", &temporary, error))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|error| CsiError::io("writing temporary file", &temporary, error))?;
    drop(file);
    std::fs::rename(&temporary, path)
        .map_err(|error| CsiError::io("renaming into place", path, error))?;
    // The rename is durable only once the directory entry is.
    let directory = path.parent().unwrap_or(Path::new("."));
    File::open(directory)
        .and_then(|directory_file| directory_file.sync_all())
        .map_err(|error| CsiError::io("syncing directory", directory, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeState {
        let mut state = NodeState::default();
        state.staged.insert(
            "pvc-1".into(),
            StagedVolume {
                staging_path: "/var/lib/kubelet/plugins/x/globalmount".into(),
                fuse_pid: 4242,
                fuse_start_ticks: 123_456,
                fuse_owner: DaemonOwner::Mounter,
            },
        );
        state.published.insert(
            "/var/lib/kubelet/pods/p/volumes/v/mount".into(),
            PublishedVolume {
                volume_id: "pvc-1".into(),
                staging_path: "/var/lib/kubelet/plugins/x/globalmount".into(),
                read_only: true,
                mount_flags: vec!["noatime".into()],
            },
        );
        state
    }

    #[test]
    fn round_trip() {
        let directory = tempfile::tempdir().unwrap();
        let file = StateFile::open(directory.path()).unwrap();
        assert_eq!(
            file.load().unwrap(),
            NodeState::default(),
            "missing = empty"
        );
        file.save(&sample()).unwrap();
        assert_eq!(file.load().unwrap(), sample());
        // Overwrite leaves no temporary file behind.
        file.save(&NodeState::default()).unwrap();
        assert_eq!(file.load().unwrap(), NodeState::default());
        let names: Vec<_> = std::fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [STATE_FILE_NAME]);
    }

    #[test]
    fn files_without_an_owner_mean_the_plugin() {
        let directory = tempfile::tempdir().unwrap();
        let file = StateFile::open(directory.path()).unwrap();
        std::fs::write(
            file.path(),
            br#"{"version":1,"staged":{"a":{"staging_path":"/s","fuse_pid":7,
                "fuse_start_ticks":9}},"published":{}}"#,
        )
        .unwrap();
        assert_eq!(
            file.load().unwrap().staged["a"].fuse_owner,
            DaemonOwner::Plugin
        );
    }

    #[test]
    fn unreadable_or_unknown_version_files_are_set_aside() {
        let directory = tempfile::tempdir().unwrap();
        let file = StateFile::open(directory.path()).unwrap();
        std::fs::write(file.path(), b"{ torn").unwrap();
        assert_eq!(file.load().unwrap(), NodeState::default());
        assert!(!file.path().exists());
        let mut future = sample();
        future.version = 99;
        file.save(&future).unwrap();
        assert_eq!(file.load().unwrap(), NodeState::default());
        let aside_count = std::fs::read_dir(directory.path())
            .unwrap()
            .filter(|entry| {
                entry
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("unreadable")
            })
            .count();
        assert!(aside_count >= 1);
    }
}
