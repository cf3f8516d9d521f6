//! Conversions between the Ballast wire types and the kernel's FUSE types.
//!
//! Must not depend on: the network or any state; everything here is a pure function so it can be
//! unit-tested without a mount.
//! Invariant: every proto `Attr` becomes a valid `FileAttr`; unknown or future entry kinds show
//! as regular files rather than failing the request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ballast_client::proto::{self, EntryKind};
use fuser::{FileAttr, FileType, INodeNo};

/// Block size reported to `stat()`: the page size, so tools size their buffers sensibly.
pub const STAT_BLOCK_SIZE_BYTES: u32 = 4096;

/// Permission bits (including setuid, setgid and sticky); everything else in a mode is the type.
pub const PERMISSION_BITS: u32 = 0o7777;

/// The kernel's file type for a Ballast entry kind. Tables and streams are shown as regular
/// files for now: they have no POSIX data view yet, and a regular file lets `ls` and `stat`
/// work on them.
pub fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Directory => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::File | EntryKind::Table | EntryKind::Stream | EntryKind::Unspecified => {
            FileType::RegularFile
        }
    }
}

/// The kernel's file type for a raw enum value from the wire.
pub fn file_type_from_wire(kind: i32) -> FileType {
    file_type(EntryKind::try_from(kind).unwrap_or(EntryKind::Unspecified))
}

/// Nanoseconds since the Unix epoch (negative: before it) as a `SystemTime`.
pub fn system_time_from_ns(time_ns: i64) -> SystemTime {
    let magnitude = Duration::from_nanos(time_ns.unsigned_abs());
    if time_ns >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

/// A `SystemTime` as nanoseconds since the Unix epoch, saturating at the `i64` range.
pub fn ns_from_system_time(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |ns| -ns),
    }
}

/// A proto `Attr` as the kernel's `FileAttr`.
pub fn file_attr(attr: &proto::Attr) -> FileAttr {
    let ctime = system_time_from_ns(attr.ctime_ns);
    FileAttr {
        ino: INodeNo(attr.inode),
        size: attr.size_bytes,
        blocks: attr.blocks,
        atime: system_time_from_ns(attr.atime_ns),
        mtime: system_time_from_ns(attr.mtime_ns),
        ctime,
        // Only macOS reports a creation time; ctime is the closest thing we have.
        crtime: ctime,
        kind: file_type(attr.kind()),
        perm: (attr.mode & PERMISSION_BITS) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: STAT_BLOCK_SIZE_BYTES,
        flags: 0,
    }
}

/// Mode bits named by their meaning (Linux values, as on the wire).
const SETUID_BIT: u32 = 0o4000;
const SETGID_BIT: u32 = 0o2000;
const GROUP_EXECUTE_BIT: u32 = 0o0010;

/// The permission bits a new entry gets: the requested mode without its type bits, masked by
/// the creator's umask. (Without FUSE_DONT_MASK the kernel has usually applied the umask
/// already; applying it twice is harmless.)
pub fn creation_mode(mode: u32, umask: u32) -> u32 {
    mode & !umask & PERMISSION_BITS
}

/// The permission bits left after a write, truncate or chown by an unprivileged caller, or
/// `None` if nothing needs clearing: setuid always goes, setgid only when group-execute is set
/// (setgid without group-execute marks mandatory locking, not privilege), as in Linux.
pub fn mode_without_privileges(mode: u32) -> Option<u32> {
    let mut cleared = mode & PERMISSION_BITS;
    cleared &= !SETUID_BIT;
    let setgid_and_group_execute = SETGID_BIT | GROUP_EXECUTE_BIT;
    if mode & setgid_and_group_execute == setgid_and_group_execute {
        cleared &= !SETGID_BIT;
    }
    (cleared != mode & PERMISSION_BITS).then_some(cleared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for time_ns in [0, 1, 1_700_000_000_123_456_789, -1_500_000_000] {
            assert_eq!(ns_from_system_time(system_time_from_ns(time_ns)), time_ns);
        }
    }

    #[test]
    fn attr_conversion() {
        let attr = proto::Attr {
            inode: 42,
            kind: EntryKind::Directory as i32,
            mode: 0o40755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            size_bytes: 4096,
            blocks: 8,
            atime_ns: 1,
            mtime_ns: 2,
            ctime_ns: 3,
            generation: 7,
        };
        let converted = file_attr(&attr);
        assert_eq!(converted.ino, INodeNo(42));
        assert_eq!(converted.kind, FileType::Directory);
        assert_eq!(converted.perm, 0o755);
        assert_eq!(converted.blocks, 8);
        assert_eq!(converted.blksize, 4096);
        assert_eq!(ns_from_system_time(converted.mtime), 2);
        let table = proto::Attr {
            kind: EntryKind::Table as i32,
            ..attr
        };
        assert_eq!(file_attr(&table).kind, FileType::RegularFile);
        assert_eq!(file_type_from_wire(99), FileType::RegularFile);
    }

    #[test]
    fn modes() {
        assert_eq!(creation_mode(0o100666, 0o022), 0o644);
        assert_eq!(mode_without_privileges(0o755), None);
        assert_eq!(mode_without_privileges(0o4755), Some(0o755));
        assert_eq!(mode_without_privileges(0o2755), Some(0o755));
        // setgid without group-execute is a locking marker, not a privilege.
        assert_eq!(mode_without_privileges(0o2745), None);
        assert_eq!(mode_without_privileges(0o6711), Some(0o711));
    }
}
