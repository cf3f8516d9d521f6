//! The node's mount table and the mount operations the node service needs: reading
//! `/proc/self/mountinfo`, bind mounts, unmounts, and `statvfs` with a time limit.
//!
//! Owns: every mount-related system call of the plugin.
//! Must not depend on: the state file; `/proc/self/mountinfo` is the only truth for "is it
//! mounted", because mounts outlive the plugin and anything recorded may be stale.
//! Invariants:
//! - Mount operations use `mount(2)`/`umount2(2)` directly (through libc), not the `mount` and
//!   `umount` commands: the plugin image needs no util-linux, errors come back as exact errno
//!   values instead of text to parse, and no helper can rewrite options or touch `/etc/mtab`.
//! - A publish is `nosuid,nodev` always: a bind remount replaces the per-mount flags, so these
//!   are re-applied explicitly rather than inherited.
//! - Calls that touch a FUSE mount (`statvfs`) run on a blocking thread under a timeout: a hung
//!   daemon must not hang a CSI call. The stuck thread is abandoned, which is bounded by the
//!   number of such calls the CO makes (it has its own deadline and backs off).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::CsiError;

/// Where the kernel describes this process's mounts.
pub const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";

/// The source (first field after the separator's fs type) that `ballast-fuse` gives its mount.
pub fn mount_source_for(volume: &str) -> String {
    format!("ballast:{volume}")
}

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u64,
    /// `major:minor` of the mounted file system; equal for a mount and its bind mounts.
    pub device: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`/`rw`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    /// Whether this is a FUSE mount of Ballast volume `volume` (a staging mount or a bind of it).
    pub fn is_ballast_volume(&self, volume: &str) -> bool {
        self.fs_type.starts_with("fuse") && self.source == mount_source_for(volume)
    }

    pub fn read_only(&self) -> bool {
        self.mount_options.iter().any(|option| option == "ro")
    }
}

/// Parses mountinfo text (see proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = fields.iter().position(|field| *field == "-")?;
    if separator < 6 || fields.len() < separator + 3 {
        return None;
    }
    Some(MountEntry {
        mount_id: fields[0].parse().ok()?,
        device: fields[2].to_owned(),
        mount_point: PathBuf::from(unescape(fields[4])),
        mount_options: fields[5].split(',').map(str::to_owned).collect(),
        fs_type: fields[separator + 1].to_owned(),
        source: unescape(fields[separator + 2]),
    })
}

/// Decodes the octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash) the
/// kernel uses in mountinfo paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && index + 4 <= bytes.len() {
            let digits = &bytes[index + 1..index + 4];
            if digits.iter().all(|digit| (b'0'..=b'7').contains(digit)) {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    decoded.push(byte);
                    index += 4;
                    continue;
                }
            }
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The current mount table of this process.
pub fn read_mountinfo() -> Result<Vec<MountEntry>, CsiError> {
    let text = std::fs::read_to_string(MOUNTINFO_PATH)
        .map_err(|error| CsiError::io("reading", MOUNTINFO_PATH, error))?;
    Ok(parse_mountinfo(&text))
}

/// The top-most mount at `path` (the last one listed wins when mounts are stacked).
pub fn find<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|entry| entry.mount_point == path)
}

/// `path` with its parent directory resolved (symlinks, `..`), as mountinfo spells it. Only the
/// parent is resolved: the path itself may be a dead FUSE mount that cannot be stat'ed.
pub fn resolve(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|parent| parent.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

fn c_path(path: &Path) -> Result<CString, CsiError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| CsiError::InvalidArgument(format!("path {} contains NUL", path.display())))
}

/// The `MS_*` bits of accepted mount flags (see `capabilities::MOUNT_FLAGS_ACCEPTED`).
fn mount_flag_bits(read_only: bool, mount_flags: &[String]) -> libc::c_ulong {
    let mut bits = libc::MS_NOSUID | libc::MS_NODEV;
    for flag in mount_flags {
        match flag.as_str() {
            "noexec" => bits |= libc::MS_NOEXEC,
            "exec" => bits &= !libc::MS_NOEXEC,
            "noatime" => bits |= libc::MS_NOATIME,
            "relatime" => bits |= libc::MS_RELATIME,
            "nodiratime" => bits |= libc::MS_NODIRATIME,
            // ro/rw are folded into `read_only`; nosuid/nodev are always on.
            _ => {}
        }
    }
    if read_only {
        bits |= libc::MS_RDONLY;
    }
    bits
}

/// Bind-mounts `source` at `target`, then applies read-only and the mount flags with a bind
/// remount (a bind mount ignores flags given with it). On failure nothing stays mounted.
pub fn bind_mount(
    source: &Path,
    target: &Path,
    read_only: bool,
    mount_flags: &[String],
) -> Result<(), CsiError> {
    let source_c = c_path(source)?;
    let target_c = c_path(target)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; a NULL fs type
    // and data are allowed for MS_BIND.
    let result = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(CsiError::io(
            "bind-mounting onto",
            target,
            std::io::Error::last_os_error(),
        ));
    }
    let bits = mount_flag_bits(read_only, mount_flags);
    // SAFETY: as above; MS_REMOUNT|MS_BIND changes only the per-mount flags of `target`.
    let result = unsafe {
        libc::mount(
            std::ptr::null(),
            target_c.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | bits,
            std::ptr::null(),
        )
    };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        // Never leave a writable mount behind where a read-only one was asked for.
        let _ = unmount(target);
        return Err(CsiError::io("applying mount flags to", target, error));
    }
    Ok(())
}

/// What [`unmount`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// The mount is gone.
    Unmounted,
    /// It was busy, so it was detached (MNT_DETACH): gone from the tree, released when the last
    /// user lets go.
    Detached,
    /// Nothing was mounted there (or the path does not exist).
    NotMounted,
}

/// Unmounts the top mount at `path`, detaching lazily if it is busy. Symlinks are not followed.
pub fn unmount(path: &Path) -> Result<Unmounted, CsiError> {
    let path_c = c_path(path)?;
    // SAFETY: `path_c` is a valid NUL-terminated string that outlives the call.
    let result = unsafe { libc::umount2(path_c.as_ptr(), libc::UMOUNT_NOFOLLOW) };
    if result == 0 {
        return Ok(Unmounted::Unmounted);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(Unmounted::NotMounted),
        Some(libc::EBUSY) => {
            // SAFETY: as above.
            let result =
                unsafe { libc::umount2(path_c.as_ptr(), libc::UMOUNT_NOFOLLOW | libc::MNT_DETACH) };
            if result == 0 {
                Ok(Unmounted::Detached)
            } else {
                Err(CsiError::io(
                    "detaching",
                    path,
                    std::io::Error::last_os_error(),
                ))
            }
        }
        _ => Err(CsiError::io("unmounting", path, error)),
    }
}

/// Capacity and usage of a mounted file system, from `statvfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesystemUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

fn statvfs(path: &Path) -> std::io::Result<FilesystemUsage> {
    let path_c = CString::new(path.as_os_str().as_bytes())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut buffer: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path_c` is NUL-terminated and `buffer` is a valid, writable statvfs.
    let result = unsafe { libc::statvfs(path_c.as_ptr(), &mut buffer) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fragment_bytes = buffer.f_frsize;
    Ok(FilesystemUsage {
        total_bytes: buffer.f_blocks.saturating_mul(fragment_bytes),
        available_bytes: buffer.f_bavail.saturating_mul(fragment_bytes),
        used_bytes: buffer
            .f_blocks
            .saturating_sub(buffer.f_bfree)
            .saturating_mul(fragment_bytes),
        total_inodes: buffer.f_files,
        free_inodes: buffer.f_ffree,
        used_inodes: buffer.f_files.saturating_sub(buffer.f_ffree),
    })
}

/// How a mount answered a `statvfs`.
#[derive(Debug)]
pub enum MountHealth {
    Answering(FilesystemUsage),
    /// The call failed, e.g. ENOTCONN when the FUSE daemon is gone.
    Failed(std::io::Error),
    /// No answer within the timeout (a hung daemon, or a storage node that does not answer).
    NoAnswer {
        timeout_ms: u64,
    },
}

impl MountHealth {
    /// Whether the FUSE connection behind the mount is gone for good: the kernel answers
    /// ECONNABORTED (first, for an aborted connection) or ENOTCONN once the daemon has exited. No
    /// later call on this mount can succeed; only a new mount helps.
    pub fn connection_gone(&self) -> bool {
        matches!(self, MountHealth::Failed(error)
            if matches!(error.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)))
    }

    /// A sentence for a volume condition or an error message.
    pub fn describe(&self) -> String {
        match self {
            MountHealth::Answering(_) => "mounted and answering".to_owned(),
            MountHealth::Failed(error) if self.connection_gone() => format!(
                "the FUSE connection is gone ({error}): the ballast-fuse daemon has exited; \
                 the volume must be staged again and its pods restarted"
            ),
            MountHealth::Failed(error) => format!("statfs failed: {error}"),
            MountHealth::NoAnswer { timeout_ms } => format!(
                "statfs did not answer within {timeout_ms} ms (daemon hung or storage node \
                 unreachable)"
            ),
        }
    }
}

/// `statvfs(path)` on a blocking thread, bounded by `timeout_ms`.
pub async fn probe(path: &Path, timeout_ms: u64) -> MountHealth {
    let path = path.to_path_buf();
    let call = tokio::task::spawn_blocking(move || statvfs(&path));
    match tokio::time::timeout(Duration::from_millis(timeout_ms), call).await {
        Ok(Ok(Ok(usage))) => MountHealth::Answering(usage),
        Ok(Ok(Err(error))) => MountHealth::Failed(error),
        Ok(Err(join_error)) => MountHealth::Failed(std::io::Error::other(join_error.to_string())),
        Err(_elapsed) => MountHealth::NoAnswer { timeout_ms },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
42 22 0:39 / /var/lib/kubelet/plugins/globalmount rw,nosuid,nodev,relatime shared:2 - fuse ballast:pvc-1 rw,user_id=0,group_id=0
43 22 0:39 / /var/lib/kubelet/pods/a\\040b/mount ro,nosuid,nodev,relatime - fuse ballast:pvc-1 rw,user_id=0
44 22 0:40 / /mnt/other rw - tmpfs tmpfs rw
garbage line
45 22 0:41 / /var/lib/kubelet/plugins/globalmount rw - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes_and_optional_fields() {
        let entries = parse_mountinfo(SAMPLE);
        assert_eq!(entries.len(), 5);
        let staging = &entries[1];
        assert_eq!(staging.device, "0:39");
        assert!(staging.is_ballast_volume("pvc-1"));
        assert!(!staging.is_ballast_volume("pvc-2"));
        assert!(!staging.read_only());
        let published = &entries[2];
        assert_eq!(
            published.mount_point,
            Path::new("/var/lib/kubelet/pods/a b/mount")
        );
        assert!(published.read_only());
        assert!(!entries[3].is_ballast_volume("pvc-1"));
    }

    #[test]
    fn the_top_mount_of_a_stack_wins() {
        let entries = parse_mountinfo(SAMPLE);
        let top = find(&entries, Path::new("/var/lib/kubelet/plugins/globalmount")).unwrap();
        assert_eq!(top.fs_type, "tmpfs");
        assert!(find(&entries, Path::new("/nowhere")).is_none());
    }

    #[test]
    fn unescape_handles_edges() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("tail\\04"), "tail\\04");
        assert_eq!(unescape("\\011"), "\t");
        assert_eq!(unescape("plain"), "plain");
    }

    #[test]
    fn flags_always_include_nosuid_and_nodev() {
        let bits = mount_flag_bits(true, &["noexec".to_owned(), "noatime".to_owned()]);
        for bit in [
            libc::MS_NOSUID,
            libc::MS_NODEV,
            libc::MS_RDONLY,
            libc::MS_NOEXEC,
            libc::MS_NOATIME,
        ] {
            assert_ne!(bits & bit, 0);
        }
        assert_eq!(mount_flag_bits(false, &[]) & libc::MS_RDONLY, 0);
    }
}
