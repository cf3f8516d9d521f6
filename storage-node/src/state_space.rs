//! `StateSpace`: keeps the filesystem of the node's state directory (RocksDB, the snapshot
//! spool) from filling up under RocksDB.
//!
//! Why: state rows are written without RocksDB's WAL (the Raft log is the WAL), so a memtable
//! flush that meets a full filesystem puts RocksDB into its background error state: every
//! later write fails, the containers' Raft cores stop on the failed applies, reads fail for
//! want of a leader, and nothing recovers until the node restarts. That is what
//! `tests/full_state_filesystem.rs` found before this module existed: every write and read
//! through the mount failed with EIO after 15 s, also after space came back.
//!
//! So the node keeps a *reserve file* in the state directory and watches the filesystem's free
//! space (`statvfs`, at most every [`STATE_SPACE_CHECK_INTERVAL_MS`], and before each
//! checkpoint). When the free space falls below the low mark, the node is *full*: it gives the
//! reserve back to the filesystem, so the flushes and Raft metadata writes of what was already
//! admitted find room, and it refuses commands that add state (writes, creates, links,
//! allocations) with ENOSPC before they are proposed. Removals still go through, so a user can
//! free space. Once the free space is back above the high mark, it takes the reserve again and
//! admits everything.
//!
//! Owns: the reserve file and the full/not-full decision.
//! Must not depend on: RocksDB, Raft (the node asks before it proposes).
//! Invariants:
//! - The decision ([`next_full`]) is a pure function of the free space and the marks, with a
//!   gap between the marks so the node does not flap around one value.
//! - A failure to read the free space or to recreate the reserve never refuses writes by
//!   itself: it is logged, and the last decision stands.
//! - Bounded: one `statvfs` per interval, whatever the request rate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{FsError, NodeResult};

/// Least time between two looks at the free space.
pub const STATE_SPACE_CHECK_INTERVAL_MS: u64 = 100;
/// Name of the reserve file in the state directory.
const RESERVE_FILE_NAME: &str = "space-reserve";
/// Bounds of the reserve: a 32nd of the filesystem, within these.
const RESERVE_BYTES_MIN: u64 = 1 << 20;
const RESERVE_BYTES_MAX: u64 = 64 << 20;

/// The marks the decision is taken on, in bytes of free space as `statvfs` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSpaceMarks {
    /// Size of the reserve file.
    pub reserve_bytes: u64,
    /// Below this much free space (with the reserve held) the node is full.
    pub low_free_bytes: u64,
    /// At or above this much free space (with the reserve given back) the node is no longer
    /// full: enough to take the reserve again and stay above the low mark.
    pub high_free_bytes: u64,
}

impl StateSpaceMarks {
    /// The marks for a filesystem of `filesystem_bytes`.
    pub fn for_filesystem(filesystem_bytes: u64) -> StateSpaceMarks {
        let reserve_bytes = (filesystem_bytes / 32).clamp(RESERVE_BYTES_MIN, RESERVE_BYTES_MAX);
        StateSpaceMarks {
            reserve_bytes,
            low_free_bytes: reserve_bytes,
            high_free_bytes: reserve_bytes * 3,
        }
    }
}

/// Whether the node is full after seeing `free_bytes`, given whether it was.
pub fn next_full(was_full: bool, free_bytes: u64, marks: StateSpaceMarks) -> bool {
    if was_full {
        free_bytes < marks.high_free_bytes
    } else {
        free_bytes < marks.low_free_bytes
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct StateSpace {
    reserve_path: PathBuf,
    directory: PathBuf,
    full: AtomicBool,
    /// When the free space was last looked at; held while looking, so one caller looks.
    last_check: Mutex<Option<Instant>>,
}

impl StateSpace {
    /// Watches the filesystem of `directory` (which exists), taking the reserve now if there
    /// is room for it.
    pub fn open(directory: &Path) -> StateSpace {
        let space = StateSpace {
            reserve_path: directory.join(RESERVE_FILE_NAME),
            directory: directory.to_owned(),
            full: AtomicBool::new(false),
            last_check: Mutex::new(None),
        };
        space.check(true);
        space
    }

    /// True while the node refuses commands that add state.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Refuses (ENOSPC) a command that adds state while the state filesystem is full.
    pub fn admit(&self, adds_state: bool) -> NodeResult<()> {
        if !adds_state {
            return Ok(());
        }
        self.check(false);
        if self.is_full() {
            return Err(FsError::no_space(format!(
                "the node's state filesystem ({}) is full; remove files or free space there",
                self.directory.display()
            ))
            .into());
        }
        Ok(())
    }

    /// Looks at the free space (at most once per interval, unless `now`) and acts on it.
    pub fn check(&self, now: bool) {
        let mut last_check = self
            .last_check
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let due = last_check
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(STATE_SPACE_CHECK_INTERVAL_MS));
        if !now && !due {
            return;
        }
        *last_check = Some(Instant::now());
        let (free_bytes, filesystem_bytes) = match free_space(&self.directory) {
            Ok(space) => space,
            Err(error) => {
                tracing::warn!(%error, directory = %self.directory.display(), "cannot read the state filesystem's free space");
                return;
            }
        };
        let marks = StateSpaceMarks::for_filesystem(filesystem_bytes);
        let reserve_held = self.reserve_path.exists();
        let was_full = self.is_full();
        // Without the reserve held, the free space counts it: compare as if it were held,
        // except when deciding to leave the full state (the high mark includes room for it).
        let full = if reserve_held || was_full {
            next_full(was_full, free_bytes, marks)
        } else {
            next_full(
                was_full,
                free_bytes.saturating_sub(marks.reserve_bytes),
                marks,
            )
        };
        if full {
            if reserve_held {
                match std::fs::remove_file(&self.reserve_path) {
                    Ok(()) => {}
                    Err(error) => tracing::warn!(%error, "cannot give the state reserve back"),
                }
            }
            if !was_full {
                tracing::error!(
                    free_bytes,
                    low_free_bytes = marks.low_free_bytes,
                    directory = %self.directory.display(),
                    "the state filesystem is full: refusing writes with ENOSPC until space comes back"
                );
            }
        } else {
            if !reserve_held {
                if let Err(error) = take_reserve(&self.reserve_path, marks.reserve_bytes) {
                    tracing::warn!(%error, "cannot take the state reserve");
                }
            }
            if was_full {
                tracing::info!(
                    free_bytes,
                    "the state filesystem has room again; writes admitted"
                );
            }
        }
        self.full.store(full, Ordering::Relaxed);
    }
}

/// Free bytes (for an unprivileged writer) and total bytes of the filesystem of `directory`.
fn free_space(directory: &Path) -> std::io::Result<(u64, u64)> {
    let path = std::ffi::CString::new(directory.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("state directory path contains a NUL byte"))?;
    // SAFETY: `statvfs` is plain old data, filled by the call before it is read.
    let mut statistics: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a live local.
    if unsafe { libc::statvfs(path.as_ptr(), &mut statistics) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fragment_bytes = statistics.f_frsize as u64;
    Ok((
        (statistics.f_bavail as u64).saturating_mul(fragment_bytes),
        (statistics.f_blocks as u64).saturating_mul(fragment_bytes),
    ))
}

/// Creates the reserve file with `reserve_bytes` allocated (not sparse) and synced.
fn take_reserve(path: &Path, reserve_bytes: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    // SAFETY: fallocate on a descriptor owned by `file`.
    let result = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            0,
            reserve_bytes as libc::off_t,
        )
    };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        drop(file);
        // A half-taken reserve would be counted as held.
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_full_below_the_low_mark_and_again_not_above_the_high_one() {
        let marks = StateSpaceMarks::for_filesystem(64 << 20);
        assert_eq!(marks.reserve_bytes, 2 << 20);
        assert!(marks.low_free_bytes < marks.high_free_bytes);
        assert!(marks.high_free_bytes >= marks.reserve_bytes + marks.low_free_bytes);
        assert!(!next_full(false, marks.low_free_bytes, marks));
        assert!(next_full(false, marks.low_free_bytes - 1, marks));
        // Between the marks the state stays what it was.
        let between = marks.high_free_bytes - 1;
        assert!(next_full(true, between, marks));
        assert!(!next_full(false, between, marks));
        assert!(!next_full(true, marks.high_free_bytes, marks));
        // The reserve's bounds.
        assert_eq!(
            StateSpaceMarks::for_filesystem(0).reserve_bytes,
            RESERVE_BYTES_MIN
        );
        assert_eq!(
            StateSpaceMarks::for_filesystem(u64::MAX).reserve_bytes,
            RESERVE_BYTES_MAX
        );
    }

    #[test]
    fn a_roomy_filesystem_holds_the_reserve_and_admits_everything() {
        let directory = tempfile::tempdir().unwrap();
        let space = StateSpace::open(directory.path());
        assert!(!space.is_full());
        let reserve = std::fs::metadata(directory.path().join(RESERVE_FILE_NAME)).unwrap();
        assert!(reserve.len() >= RESERVE_BYTES_MIN);
        space.admit(true).unwrap();
        space.admit(false).unwrap();
    }
}
