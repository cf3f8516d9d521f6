//! POSIX semantics of a Ballast FUSE mount, one test per promise, each able to fail. These run
//! against real processes: a `ballast-node` on a file-backed device and a `ballast-fuse` mount.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use ballast_tests::{end_to_end_available, LocalNode};

const DEVICE_SIZE_BYTES: u64 = 2 << 30;

fn setup(quota: &str) -> Option<(LocalNode, PathBuf)> {
    if !end_to_end_available() {
        return None;
    }
    let mut node = LocalNode::start(DEVICE_SIZE_BYTES).expect("start node");
    node.create_volume("posix", quota).expect("create volume");
    let mountpoint = node.mount("posix").expect("mount");
    Some((node, mountpoint))
}

fn errno_of(error: &std::io::Error) -> i32 {
    error
        .raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {error}"))
}

fn expect_errno<T: std::fmt::Debug>(result: std::io::Result<T>, errno: i32, what: &str) {
    match result {
        Ok(value) => panic!("{what}: expected errno {errno}, got success {value:?}"),
        Err(error) => assert_eq!(errno_of(&error), errno, "{what}: wrong errno ({error})"),
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn pread_and_pwrite_at_any_offset() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("data");
    let file = create_read_write(&path);
    let mut model = vec![0u8; 300_000];
    for (offset, length, seed) in [
        (0usize, 100usize, 1u8),
        (4090, 20, 2),
        (8192, 4096, 3),
        (12_345, 70_001, 4),
        (299_000, 1000, 5),
        (1, 1, 6),
    ] {
        let data = pattern(length, seed);
        file.write_all_at(&data, offset as u64).unwrap();
        model[offset..offset + length].copy_from_slice(&data);
    }
    let mut read_back = vec![0u8; model.len()];
    file.read_exact_at(&mut read_back, 0).unwrap();
    assert_eq!(read_back, model, "pread after pwrite");
    // Through a fresh descriptor, bypassing nothing but the handle.
    drop(file);
    assert_eq!(fs::read(&path).unwrap(), model);
    let mut tail = vec![0u8; 10];
    let file = File::open(&path).unwrap();
    assert_eq!(
        file.read_at(&mut tail, model.len() as u64 - 4).unwrap(),
        4,
        "short read at end of file"
    );
}

#[test]
fn fsync_and_fdatasync_survive_node_kill() {
    let Some((mut node, mount)) = setup("1GiB") else {
        return;
    };
    let first = mount.join("synced");
    let second = mount.join("datasynced");
    let payload = pattern(1 << 20, 7);
    let mut file = File::create(&first).unwrap();
    file.write_all(&payload).unwrap();
    file.sync_all().unwrap();
    let mut file = File::create(&second).unwrap();
    file.write_all(&payload[..65_536]).unwrap();
    file.sync_data().unwrap();
    node.kill_node();
    node.restart_node().unwrap();
    node.remount_all().unwrap();
    assert_eq!(
        fs::read(&first).unwrap(),
        payload,
        "fsync'd data after kill -9 of the node"
    );
    assert_eq!(
        fs::read(&second).unwrap(),
        &payload[..65_536],
        "fdatasync'd data after kill -9"
    );
}

/// Creates (or opens) `path` for reading and writing with `O_DIRECT`, as InnoDB opens its files.
fn create_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("O_DIRECT open must succeed")
}

#[test]
fn o_direct_open_reads_and_writes() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("direct");
    let file = create_direct(&path);
    // An aligned buffer, as O_DIRECT users (InnoDB) provide.
    let layout = std::alloc::Layout::from_size_align(16_384, 4096).unwrap();
    // SAFETY: the layout has non-zero size; the buffer is freed below with the same layout.
    let buffer = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buffer.is_null());
    // SAFETY: buffer points to 16384 initialised bytes that we own until dealloc.
    let slice = unsafe { std::slice::from_raw_parts_mut(buffer, 16_384) };
    slice.copy_from_slice(&pattern(16_384, 9));
    file.write_all_at(slice, 16_384).unwrap();
    slice.fill(0);
    file.read_exact_at(slice, 16_384).unwrap();
    assert_eq!(slice, &pattern(16_384, 9)[..]);
    // SAFETY: same pointer and layout as the allocation above.
    unsafe { std::alloc::dealloc(buffer, layout) };
    assert_eq!(fs::metadata(&path).unwrap().len(), 32_768);
}

#[test]
fn large_o_direct_transfers_go_as_concurrent_requests_and_land_whole() {
    // With FUSE_ASYNC_DIO the kernel splits one large O_DIRECT transfer into requests of at
    // most 1 MiB and sends them all at once (an extending write still goes one at a time).
    // The pieces must land at their own offsets: the file reads back byte for byte, directly
    // and through the page cache, and a second driver sees the same bytes.
    const TRANSFER_BYTES: usize = (8 << 20) + 3 * 4096;
    let Some((mut node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("direct-large");
    let file = create_direct(&path);
    file.set_len(16 << 20).unwrap();
    let layout = std::alloc::Layout::from_size_align(TRANSFER_BYTES, 4096).unwrap();
    // SAFETY: the layout has non-zero size; the buffer is freed below with the same layout.
    let buffer = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buffer.is_null());
    // SAFETY: `buffer` points to TRANSFER_BYTES initialised bytes that we own until dealloc.
    let slice = unsafe { std::slice::from_raw_parts_mut(buffer, TRANSFER_BYTES) };
    let expected_part = pattern(TRANSFER_BYTES, 41);
    slice.copy_from_slice(&expected_part);
    let offset_bytes = 5 * 4096;
    file.write_all_at(slice, offset_bytes as u64).unwrap();
    slice.fill(0);
    file.read_exact_at(slice, offset_bytes as u64).unwrap();
    assert!(
        slice == &expected_part[..],
        "a direct read returned other bytes"
    );
    // SAFETY: same pointer and layout as the allocation above.
    unsafe { std::alloc::dealloc(buffer, layout) };
    file.sync_all().unwrap();
    drop(file);

    let mut expected = vec![0u8; 16 << 20];
    expected[offset_bytes..offset_bytes + TRANSFER_BYTES].copy_from_slice(&expected_part);
    assert!(
        fs::read(&path).unwrap() == expected,
        "buffered read differs"
    );
    let endpoint = node.endpoint();
    let second = node
        .mount_with("posix", &endpoint, None, &[], "-second")
        .unwrap();
    assert!(
        fs::read(second.join("direct-large")).unwrap() == expected,
        "a second driver reads other bytes"
    );
}

fn fallocate(file: &File, mode: i32, offset: i64, length: i64) -> std::io::Result<()> {
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, length) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn fallocate_modes() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("preallocated");
    let file = create_read_write(&path);
    fallocate(&file, 0, 0, 1 << 20).unwrap();
    let metadata = file.metadata().unwrap();
    assert_eq!(metadata.len(), 1 << 20, "mode 0 extends the size");
    assert!(
        metadata.blocks() >= (1 << 20) / 512,
        "blocks are allocated: {}",
        metadata.blocks()
    );
    fallocate(&file, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20).unwrap();
    assert_eq!(
        file.metadata().unwrap().len(),
        1 << 20,
        "KEEP_SIZE keeps the size"
    );
    file.write_all_at(&pattern(3 * 4096, 1), 0).unwrap();
    fallocate(
        &file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        100,
        8000,
    )
    .unwrap();
    let mut read_back = vec![0u8; 3 * 4096];
    file.read_exact_at(&mut read_back, 0).unwrap();
    let mut expected = pattern(3 * 4096, 1);
    expected[100..8100].fill(0);
    assert_eq!(
        read_back, expected,
        "punched range reads as zeros, the rest is intact"
    );
    expect_errno(
        fallocate(&file, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096),
        libc::EOPNOTSUPP,
        "unsupported mode",
    );
    expect_errno(fallocate(&file, 0, 0, 0), libc::EINVAL, "zero length");
}

/// Free data blocks of the node's device, from `ballast status` ("data blocks N free of M").
fn device_free_blocks(node: &LocalNode) -> u64 {
    let status = node.cli(&["status"]).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("data blocks"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|free| free.parse().ok())
        .unwrap_or_else(|| panic!("no data blocks line in {status}"))
}

#[test]
fn fallocate_reserves_quota_not_device_space() {
    // 3 GiB on a 2 GiB device: fallocate writes nothing, so only the quota limits it; the
    // client sends it as three 1 GiB requests.
    let Some((mut node, mount)) = setup("4GiB") else {
        return;
    };
    let free_before = device_free_blocks(&node);
    let path = mount.join("laid-out");
    let file = create_read_write(&path);
    const LENGTH: i64 = 3 << 30;
    fallocate(&file, 0, 0, LENGTH).unwrap();
    file.sync_all().unwrap();
    let metadata = file.metadata().unwrap();
    assert_eq!(metadata.len(), LENGTH as u64);
    assert_eq!(
        metadata.blocks(),
        LENGTH as u64 / 512,
        "st_blocks counts the range"
    );
    assert_eq!(
        volume_used_bytes(&node),
        LENGTH as u64,
        "the quota counts the range"
    );
    assert_eq!(
        device_free_blocks(&node),
        free_before,
        "no device block taken"
    );
    let mut middle = vec![1u8; 1 << 20];
    file.read_exact_at(&mut middle, 2 << 30).unwrap();
    assert!(middle.iter().all(|&byte| byte == 0), "reads as zeros");

    // Writing into the range takes device blocks for what is written, and no more quota.
    file.write_all_at(&pattern(1 << 20, 5), 1 << 30).unwrap();
    file.sync_all().unwrap();
    assert_eq!(free_before - device_free_blocks(&node), (1 << 20) / 4096);
    assert_eq!(volume_used_bytes(&node), LENGTH as u64);
    let mut written = vec![0u8; 1 << 20];
    file.read_exact_at(&mut written, 1 << 30).unwrap();
    assert_eq!(written, pattern(1 << 20, 5));

    // Past the quota: ENOSPC, and the size stays. The first 1 GiB piece fitted the quota
    // exactly and stays allocated past the end, as Linux allows of a failed fallocate; nothing
    // past the quota was taken.
    expect_errno(
        fallocate(&file, 0, LENGTH, 2 << 30),
        libc::ENOSPC,
        "fallocate past the quota",
    );
    assert_eq!(file.metadata().unwrap().len(), LENGTH as u64);
    assert_eq!(volume_used_bytes(&node), 4 << 30);
    // The node agrees (a fresh mount has no size cached from before).
    drop(file);
    node.remount_all().unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), LENGTH as u64);
    fs::remove_file(&path).unwrap();
    assert_eq!(volume_used_bytes(&node), 0, "unlink gives the quota back");
}

#[test]
fn truncate_and_ftruncate() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("truncated");
    fs::write(&path, pattern(10_000, 3)).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(5000).unwrap(); // ftruncate
    assert_eq!(fs::metadata(&path).unwrap().len(), 5000);
    file.set_len(9000).unwrap();
    let content = fs::read(&path).unwrap();
    assert_eq!(&content[..5000], &pattern(10_000, 3)[..5000]);
    assert!(
        content[5000..].iter().all(|&byte| byte == 0),
        "extended range must read as zeros, never old bytes"
    );
    let c = c_path(&path);
    // SAFETY: truncate(2) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 0) }, 0);
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    // On a directory: must fail with EISDIR.
    let directory = c_path(&mount);
    // SAFETY: truncate(2) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::truncate(directory.as_ptr(), 0) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EISDIR)
    );
}

fn rename_with_flags(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (from, to) = (c_path(from), c_path(to));
    // SAFETY: renameat2 with valid NUL-terminated paths relative to the current directory.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn rename_over_existing_is_atomic_and_checked() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let (a, b) = (mount.join("a"), mount.join("b"));
    fs::write(&a, b"new contents").unwrap();
    fs::write(&b, b"old contents").unwrap();
    let held = File::open(&b).unwrap();
    fs::rename(&a, &b).unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"new contents");
    expect_errno(fs::metadata(&a), libc::ENOENT, "source is gone");
    // The replaced file stays readable through its open handle.
    let mut old = String::new();
    (&held).read_to_string(&mut old).unwrap();
    assert_eq!(old, "old contents");
    fs::write(&a, b"x").unwrap();
    expect_errno(
        rename_with_flags(&a, &b, libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE",
    );
    rename_with_flags(&a, &b, libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(&a).unwrap(), b"new contents");
    assert_eq!(fs::read(&b).unwrap(), b"x");
    let (directory, full) = (mount.join("dir"), mount.join("full"));
    fs::create_dir(&directory).unwrap();
    fs::create_dir(&full).unwrap();
    fs::write(full.join("f"), b"1").unwrap();
    expect_errno(
        fs::rename(&directory, &full),
        libc::ENOTEMPTY,
        "dir over non-empty dir",
    );
    expect_errno(fs::rename(&a, &directory), libc::EISDIR, "file over dir");
    expect_errno(fs::rename(&directory, &a), libc::ENOTDIR, "dir over file");
    expect_errno(
        fs::rename(&full, full.join("inside")),
        libc::EINVAL,
        "dir into itself",
    );
    expect_errno(
        fs::rename(mount.join("missing"), &a),
        libc::ENOENT,
        "missing source",
    );
    fs::rename(&directory, mount.join("moved")).unwrap();
    assert!(mount.join("moved").is_dir());
}

#[test]
fn unlink_while_open_keeps_data_until_close() {
    let Some((node, mount)) = setup("64MiB") else {
        return;
    };
    let path = mount.join("temporary");
    let payload = pattern(8 << 20, 5);
    fs::write(&path, &payload).unwrap();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    fs::remove_file(&path).unwrap();
    expect_errno(fs::metadata(&path), libc::ENOENT, "name is gone");
    assert_eq!(
        file.metadata().unwrap().nlink(),
        0,
        "fstat of an unlinked file"
    );
    let mut read_back = Vec::new();
    file.read_to_end(&mut read_back).unwrap();
    assert_eq!(read_back, payload, "data readable through the open handle");
    file.seek(SeekFrom::Start(0)).unwrap();
    file.write_all(b"still writable").unwrap();
    file.sync_all().unwrap();
    let used_while_open = volume_used_bytes(&node);
    assert!(
        used_while_open >= 8 << 20,
        "space is held while open: {used_while_open}"
    );
    drop(file);
    ballast_tests::wait_until(
        "space of the closed orphan to be freed",
        std::time::Duration::from_secs(10),
        || volume_used_bytes(&node) < 1 << 20,
    )
    .unwrap();
}

fn volume_used_bytes(node: &LocalNode) -> u64 {
    let listing = node.cli(&["volume", "list", "--bytes"]).unwrap();
    let row = listing
        .lines()
        .find(|line| line.starts_with("posix "))
        .expect("volume row");
    // NAME ID QUOTA USED RF INODES
    row.split_whitespace()
        .nth(3)
        .expect("USED column")
        .parse()
        .expect("bytes")
}

#[test]
fn flock_and_fcntl_locks() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("locked");
    fs::write(&path, vec![0u8; 4096]).unwrap();
    let first = File::open(&path).unwrap();
    let second = File::open(&path).unwrap();
    assert_eq!(flock(&first, libc::LOCK_EX), 0);
    assert_eq!(flock(&second, libc::LOCK_EX | libc::LOCK_NB), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EWOULDBLOCK)
    );
    assert_eq!(flock(&first, libc::LOCK_UN), 0);
    assert_eq!(flock(&second, libc::LOCK_EX | libc::LOCK_NB), 0);

    // fcntl byte-range locks are per process: hold bytes 0..100 here, probe from another process.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 100,
        l_pid: 0,
    };
    // SAFETY: F_SETLK on an open descriptor with a valid flock structure.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) };
    assert_eq!(result, 0);
    let probe = |start: u64, length: u64| -> String {
        let script = format!(
            "import fcntl,sys\nf=open(sys.argv[1],'r+')\ntry:\n fcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB,{length},{start})\n print('acquired')\nexcept OSError as e:\n print('blocked',e.errno)"
        );
        let output = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert!(
        probe(50, 10).starts_with("blocked"),
        "overlapping range must be refused"
    );
    assert_eq!(probe(200, 10), "acquired", "a disjoint range is free");
}

/// Creates (or truncates) `path` open for reading and writing.
fn create_read_write(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap()
}

fn flock(file: &File, operation: i32) -> i32 {
    // SAFETY: flock(2) on a descriptor owned by `file` for the duration of the call.
    unsafe { libc::flock(file.as_raw_fd(), operation) }
}

fn statvfs(path: &Path) -> libc::statvfs {
    let c = c_path(path);
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-parameter.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut stat) }, 0);
    stat
}

#[test]
fn statfs_shows_quota_and_usage() {
    let Some((_node, mount)) = setup("100MiB") else {
        return;
    };
    let before = statvfs(&mount);
    assert_eq!(
        before.f_blocks * before.f_frsize,
        100 << 20,
        "total = quota"
    );
    fs::write(mount.join("ten"), pattern(10 << 20, 1)).unwrap();
    File::open(mount.join("ten")).unwrap().sync_all().unwrap();
    let after = statvfs(&mount);
    let used = (before.f_bfree - after.f_bfree) * after.f_frsize;
    assert!(
        (10 << 20..=11 << 20).contains(&used),
        "10 MiB written shows as used: {used}"
    );
}

#[test]
fn hard_links_and_symlinks() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let original = mount.join("original");
    fs::write(&original, b"shared").unwrap();
    fs::hard_link(&original, mount.join("alias")).unwrap();
    let (first, second) = (
        fs::metadata(&original).unwrap(),
        fs::metadata(mount.join("alias")).unwrap(),
    );
    assert_eq!(first.ino(), second.ino());
    assert_eq!(second.nlink(), 2);
    fs::write(mount.join("alias"), b"changed").unwrap();
    assert_eq!(fs::read(&original).unwrap(), b"changed");
    fs::remove_file(&original).unwrap();
    assert_eq!(fs::metadata(mount.join("alias")).unwrap().nlink(), 1);
    expect_errno(
        fs::hard_link(mount.join("alias"), mount.join("alias")),
        libc::EEXIST,
        "link onto existing",
    );
    fs::create_dir(mount.join("d")).unwrap();
    expect_errno(
        fs::hard_link(mount.join("d"), mount.join("d2")),
        libc::EPERM,
        "link to a directory",
    );
    std::os::unix::fs::symlink("alias", mount.join("pointer")).unwrap();
    assert_eq!(
        fs::read_link(mount.join("pointer")).unwrap(),
        PathBuf::from("alias")
    );
    assert_eq!(
        fs::read(mount.join("pointer")).unwrap(),
        b"changed",
        "symlink resolves"
    );
    assert!(fs::symlink_metadata(mount.join("pointer"))
        .unwrap()
        .file_type()
        .is_symlink());
    std::os::unix::fs::symlink("nowhere", mount.join("dangling")).unwrap();
    expect_errno(
        fs::read(mount.join("dangling")),
        libc::ENOENT,
        "dangling symlink",
    );
}

#[test]
fn attributes_are_correct() {
    let Some((mut node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("attributes");
    fs::write(&path, b"12345").unwrap();
    let created = fs::metadata(&path).unwrap();
    assert_eq!(created.len(), 5);
    assert!(created.is_file());
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let changed = fs::metadata(&path).unwrap();
    assert_eq!(changed.mode() & 0o7777, 0o640);
    assert!(
        changed.ctime_nsec() != created.ctime_nsec() || changed.ctime() > created.ctime(),
        "chmod updates ctime"
    );
    assert_eq!(changed.mtime(), created.mtime(), "chmod leaves mtime");
    std::thread::sleep(std::time::Duration::from_millis(20));
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"678")
        .unwrap();
    let written = fs::metadata(&path).unwrap();
    assert_eq!(written.len(), 8);
    assert!(
        (written.mtime(), written.mtime_nsec()) > (changed.mtime(), changed.mtime_nsec()),
        "write updates mtime"
    );
    std::os::unix::fs::chown(&path, Some(1234), Some(5678)).unwrap();
    let owned = fs::metadata(&path).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
    fs::create_dir(mount.join("sub")).unwrap();
    let directory = fs::metadata(mount.join("sub")).unwrap();
    assert!(directory.is_dir());
    assert_eq!(directory.nlink(), 2);
    assert_eq!(
        fs::metadata(&mount).unwrap().nlink(),
        3,
        "root: . + .. + sub/.."
    );
    // Attributes persist across a remount (no kernel cache involved).
    let before = fs::metadata(&path).unwrap();
    node.remount_all().unwrap();
    let after = fs::metadata(&path).unwrap();
    assert_eq!(
        (after.len(), after.mode(), after.uid(), after.gid()),
        (before.len(), before.mode(), before.uid(), before.gid())
    );
    // Times persist too, but with the kernel's writeback cache the kernel keeps its own mtime
    // and ctime and hands them to the node later, so the two views can differ by the time
    // between a write and its flush (milliseconds). Known gap; see the issue note.
    let nanoseconds = |seconds: i64, nanos: i64| seconds as i128 * 1_000_000_000 + nanos as i128;
    let drift = |a: i128, b: i128| (a - b).abs();
    assert!(
        drift(
            nanoseconds(after.mtime(), after.mtime_nsec()),
            nanoseconds(before.mtime(), before.mtime_nsec())
        ) < 1_000_000_000
    );
    assert!(
        drift(
            nanoseconds(after.ctime(), after.ctime_nsec()),
            nanoseconds(before.ctime(), before.ctime_nsec())
        ) < 1_000_000_000
    );
}

#[test]
fn directory_with_100000_entries() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let directory = mount.join("many");
    fs::create_dir(&directory).unwrap();
    const ENTRY_COUNT: usize = 100_000;
    const THREAD_COUNT: usize = 8;
    std::thread::scope(|scope| {
        for thread in 0..THREAD_COUNT {
            let directory = &directory;
            scope.spawn(move || {
                for index in (thread..ENTRY_COUNT).step_by(THREAD_COUNT) {
                    File::create(directory.join(format!("entry-{index:06}"))).unwrap();
                }
            });
        }
    });
    let mut names: Vec<String> = fs::read_dir(&directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        ENTRY_COUNT,
        "readdir returns every entry exactly once"
    );
    names.sort();
    names.dedup();
    assert_eq!(names.len(), ENTRY_COUNT, "no duplicates");
    assert!(fs::metadata(directory.join("entry-054321"))
        .unwrap()
        .is_file());
}

#[test]
fn files_larger_than_a_request_and_sparse_files() {
    let Some((_node, mount)) = setup("2GiB") else {
        return;
    };
    let path = mount.join("large");
    let mut file = File::create(&path).unwrap();
    let block = pattern(1 << 20, 11);
    for index in 0..96u8 {
        let mut chunk = block.clone();
        chunk[0] = index;
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    let content = fs::read(&path).unwrap();
    assert_eq!(content.len(), 96 << 20);
    for index in 0..96usize {
        assert_eq!(content[index << 20], index as u8);
        assert_eq!(&content[(index << 20) + 1..(index + 1) << 20], &block[1..]);
    }
    let sparse = mount.join("sparse");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&sparse)
        .unwrap();
    file.write_all_at(b"end", 1 << 30).unwrap();
    let metadata = file.metadata().unwrap();
    assert_eq!(metadata.len(), (1 << 30) + 3);
    assert!(
        metadata.blocks() <= 16,
        "a sparse file allocates only what was written: {} blocks",
        metadata.blocks()
    );
    let mut hole = vec![1u8; 65_536];
    file.read_exact_at(&mut hole, 500 << 20).unwrap();
    assert!(hole.iter().all(|&byte| byte == 0), "holes read as zeros");
}

#[test]
fn quota_exceeded_gives_enospc_and_damages_nothing() {
    let Some((_node, mount)) = setup("16MiB") else {
        return;
    };
    let keep = mount.join("keep");
    fs::write(&keep, pattern(4 << 20, 2)).unwrap();
    let path = mount.join("too-big");
    let mut file = File::create(&path).unwrap();
    let chunk = pattern(1 << 20, 3);
    let mut failure = None;
    for _ in 0..32 {
        if let Err(error) = file.write_all(&chunk).and_then(|_| file.sync_all()) {
            failure = Some(error);
            break;
        }
    }
    let error = failure.expect("writing past the quota must fail");
    assert!(
        [libc::ENOSPC, libc::EDQUOT].contains(&errno_of(&error)),
        "quota error must be ENOSPC or EDQUOT, got {error}"
    );
    drop(file);
    assert_eq!(
        fs::read(&keep).unwrap(),
        pattern(4 << 20, 2),
        "existing data intact"
    );
    fs::remove_file(&path).unwrap();
    fs::write(mount.join("after"), pattern(1 << 20, 4)).unwrap();
    assert_eq!(
        fs::read(mount.join("after")).unwrap(),
        pattern(1 << 20, 4),
        "space is usable again"
    );
}

/// Writes `data` to a new file `path` and fsyncs it; the first error, whichever call gave it.
fn try_write_fsync(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(data)?;
    file.sync_all()
}

#[test]
fn a_full_device_gives_enospc_and_damages_nothing() {
    // The quota (1 GiB) is larger than the device (256 MiB), so the device fills first. A
    // full device must give ENOSPC (the leader refuses what its device cannot hold, and nothing
    // is proposed), must not stop the volume or lose anything written, and space freed by
    // deletes must be usable again at once. Before 2026-12-05 the ENOSPC came from the apply,
    // recorded as the command's result, which on a replicated volume left replicas differing.
    if !end_to_end_available() {
        return;
    }
    const FILE_BYTES: usize = 8 << 20;
    let mut node = LocalNode::start(256 << 20).expect("start node");
    node.create_volume("full", "1GiB").expect("create volume");
    let mount = node.mount("full").expect("mount");
    let mut written: Vec<(String, u8)> = Vec::new();
    let mut failure = None;
    // 64 files of 8 MiB are twice the device.
    for index in 0..64u8 {
        let name = format!("file-{index:02}");
        match try_write_fsync(&mount.join(&name), &pattern(FILE_BYTES, index)) {
            Ok(()) => written.push((name, index)),
            Err(error) => {
                failure = Some((name, error));
                break;
            }
        }
    }
    let (failed_name, error) = failure.expect("writing twice the device's size must fail");
    assert_eq!(
        errno_of(&error),
        libc::ENOSPC,
        "a full device must give ENOSPC, got {error}"
    );
    assert!(
        written.len() >= 16,
        "only {} files of 8 MiB fitted on a 256 MiB device",
        written.len()
    );
    let _ = fs::remove_file(mount.join(&failed_name));
    let verify = |mount: &Path, written: &[(String, u8)]| {
        for (name, seed) in written {
            let data = ballast_tests::read_uncached(&mount.join(name))
                .unwrap_or_else(|error| panic!("{name}: {error}"));
            assert!(data == pattern(FILE_BYTES, *seed), "{name}: wrong bytes");
        }
    };
    verify(&mount, &written);
    let log = node.log_contents();
    assert!(
        !log.contains("apply failed") && !log.contains("Raft core stopped"),
        "a refused write must not fail an apply; node log tail:\n{}",
        node.log_tail()
    );

    // Deleting gives the space back at once (the blocks are free after the next checkpoint,
    // which a write short of space asks for).
    for (name, _) in written.drain(..4) {
        fs::remove_file(mount.join(name)).unwrap();
    }
    for index in 100..103u8 {
        let name = format!("file-{index}");
        try_write_fsync(&mount.join(&name), &pattern(FILE_BYTES, index))
            .unwrap_or_else(|error| panic!("{name} after deleting 32 MiB: {error}"));
        written.push((name, index));
    }
    verify(&mount, &written);

    // And all of it survives a kill -9 of the node.
    node.kill_node();
    node.restart_node().unwrap();
    node.remount_all().unwrap();
    verify(&mount, &written);
    eprintln!(
        "a_full_device_gives_enospc_and_damages_nothing: {} files of 8 MiB kept",
        written.len()
    );
}

#[test]
fn error_codes_of_bad_calls() {
    let Some((mut node, mount)) = setup("1GiB") else {
        return;
    };
    expect_errno(
        File::open(mount.join("missing")),
        libc::ENOENT,
        "open missing",
    );
    fs::create_dir(mount.join("d")).unwrap();
    expect_errno(
        fs::create_dir(mount.join("d")),
        libc::EEXIST,
        "mkdir existing",
    );
    fs::write(mount.join("f"), b"x").unwrap();
    expect_errno(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(mount.join("f")),
        libc::EEXIST,
        "O_EXCL",
    );
    fs::write(mount.join("d").join("inner"), b"x").unwrap();
    expect_errno(
        fs::remove_dir(mount.join("d")),
        libc::ENOTEMPTY,
        "rmdir non-empty",
    );
    expect_errno(
        fs::remove_file(mount.join("d")),
        libc::EISDIR,
        "unlink a directory",
    );
    expect_errno(
        fs::remove_dir(mount.join("f")),
        libc::ENOTDIR,
        "rmdir a file",
    );
    expect_errno(
        File::open(mount.join("f").join("below")),
        libc::ENOTDIR,
        "path through a file",
    );
    expect_errno(
        fs::write(mount.join("x".repeat(256)), b"x"),
        libc::ENAMETOOLONG,
        "name too long",
    );
    expect_errno(
        fs::read_link(mount.join("f")),
        libc::EINVAL,
        "readlink on a file",
    );
    // EXDEV: rename across two volumes (two mounts).
    node.create_volume("other", "1GiB").unwrap();
    let other = node.mount("other").unwrap();
    let error = fs::rename(mount.join("f"), other.join("f")).unwrap_err();
    assert_eq!(errno_of(&error), libc::EXDEV, "rename across volumes");
    assert_eq!(error.kind(), ErrorKind::CrossesDevices);
}

/// Extended attributes are unsupported and the mount says so once: the driver answers getxattr
/// with ENOSYS, after which the kernel answers EOPNOTSUPP itself. (With ENODATA the kernel asked
/// the driver for `security.capability` before every write.) Everyday tools stay quiet.
#[test]
fn extended_attributes_are_unsupported_without_warnings() {
    let Some((_node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("plain");
    fs::write(&path, b"no attributes here").unwrap();
    let file = c_path(&path);
    for name in ["security.capability", "user.comment"] {
        let name = CString::new(name).unwrap();
        // Twice: the second answer comes from the kernel's memory of the first.
        for attempt in 0..2 {
            // SAFETY: both strings are NUL-terminated and live across the call; a null buffer
            // with size 0 asks only for the length.
            let result =
                unsafe { libc::getxattr(file.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
            let error = std::io::Error::last_os_error();
            assert_eq!(result, -1, "getxattr {name:?} attempt {attempt} succeeded");
            assert_eq!(
                errno_of(&error),
                libc::EOPNOTSUPP,
                "getxattr {name:?} attempt {attempt}: {error}"
            );
        }
    }
    // SAFETY: as above; a null list with size 0 asks only for the length.
    let listed = unsafe { libc::listxattr(file.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(listed, 0, "listxattr: {}", std::io::Error::last_os_error());
    // Writes keep working after the kernel stopped asking.
    let mut appended = OpenOptions::new().append(true).open(&path).unwrap();
    appended.write_all(b", still").unwrap();
    appended.sync_all().unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"no attributes here, still");

    let listing = Command::new("ls").arg("-l").arg(&mount).output().unwrap();
    assert!(listing.status.success(), "ls -l failed: {listing:?}");
    assert!(listing.stderr.is_empty(), "ls -l warned: {listing:?}");
    let copy_directory = tempfile::tempdir().unwrap();
    for (source, target) in [
        (path.clone(), copy_directory.path().join("out")),
        (path.clone(), mount.join("copied")),
    ] {
        let copy = Command::new("cp")
            .arg("-a")
            .arg(&source)
            .arg(&target)
            .output()
            .unwrap();
        assert!(copy.status.success(), "cp -a failed: {copy:?}");
        assert!(copy.stderr.is_empty(), "cp -a warned: {copy:?}");
        assert_eq!(fs::read(&target).unwrap(), b"no attributes here, still");
    }
}

/// The applied index of the `posix` volume's container, from `ballast status`.
fn applied_index(node: &LocalNode) -> u64 {
    let status = node.cli(&["status"]).unwrap();
    // CONTAINER VOLUME LEADER APPLIED LAST-LOG ...
    status
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| {
            fields.len() >= 4 && fields[1] == "posix" && fields[0].parse::<u64>().is_ok()
        })
        .and_then(|fields| fields[3].parse().ok())
        .unwrap_or_else(|| panic!("no container row for posix in {status}"))
}

/// `ballast status`'s durability line: (fsync requests, durable writes, device syncs: flushes
/// plus self-durable writes).
fn durability_counts(node: &LocalNode) -> (u64, u64, u64) {
    let status = node.cli(&["status"]).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("durability"))
        .unwrap_or_else(|| panic!("no durability line in {status}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 3, "durability line: {line}");
    (numbers[0], numbers[1], numbers[2])
}

#[test]
fn fsyncs_of_a_journal_are_answered_by_the_driver_after_durable_writes() {
    // A file fsync'd after every small write is a journal: once the driver has seen that, it
    // asks the node to answer each write only when it is durable (one device flush each), and
    // answers the fsyncs itself. A bulk write between fsyncs turns that off again.
    let Some((node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("redo");
    let file = create_read_write(&path);
    file.write_all_at(b"first", 0).unwrap();
    file.sync_data().unwrap();
    let (fsyncs_before, durable_before, syncs_before) = durability_counts(&node);
    const ROUNDS: u64 = 20;
    for round in 0..ROUNDS {
        file.write_all_at(&pattern(4096, round as u8), round * 4096)
            .unwrap();
        if round % 2 == 0 {
            file.sync_data().unwrap();
        } else {
            file.sync_all().unwrap();
        }
    }
    let (fsyncs, durable, syncs) = durability_counts(&node);
    assert_eq!(
        fsyncs - fsyncs_before,
        0,
        "every fsync of the journal reached the node"
    );
    assert!(
        durable - durable_before >= ROUNDS,
        "{} durable writes for {ROUNDS} rounds",
        durable - durable_before
    );
    assert!(
        syncs - syncs_before >= ROUNDS,
        "{} device syncs for {ROUNDS} durable writes",
        syncs - syncs_before
    );
    // A bulk write (1 MiB, past the 256 KiB write-through limit) is sent plain, so the fsync
    // after it must reach the node.
    let bulk = pattern(1 << 20, 77);
    file.write_all_at(&bulk, ROUNDS * 4096).unwrap();
    file.sync_all().unwrap();
    let (fsyncs_after_bulk, _, _) = durability_counts(&node);
    assert_eq!(
        fsyncs_after_bulk - fsyncs,
        1,
        "the fsync after a bulk write"
    );
    drop(file);
    let mut expected: Vec<u8> = (0..ROUNDS)
        .flat_map(|round| pattern(4096, round as u8))
        .collect();
    expected.extend_from_slice(&bulk);
    assert_eq!(fs::read(&path).unwrap(), expected);
}

#[test]
fn fdatasync_after_a_write_costs_one_log_entry_not_two() {
    // With the writeback cache, every fsync and fdatasync first sends a SETATTR with the
    // kernel's mtime and ctime. The node's mtime, set by the write itself, is already at least
    // as new, so the driver does not propose that change: a write and its fdatasync are one
    // Raft entry, not two.
    let Some((node, mount)) = setup("1GiB") else {
        return;
    };
    let file = create_read_write(&mount.join("journal"));
    file.write_all_at(b"first", 0).unwrap();
    file.sync_data().unwrap();
    let before = applied_index(&node);
    const ROUNDS: u64 = 20;
    for round in 0..ROUNDS {
        file.write_all_at(&pattern(4096, round as u8), round * 4096)
            .unwrap();
        file.sync_data().unwrap();
    }
    let entries = applied_index(&node) - before;
    assert!(
        (ROUNDS..=ROUNDS + 4).contains(&entries),
        "{ROUNDS} write + fdatasync rounds took {entries} log entries"
    );
    drop(file);
    assert_eq!(
        fs::read(mount.join("journal")).unwrap(),
        (0..ROUNDS)
            .flat_map(|round| pattern(4096, round as u8))
            .collect::<Vec<_>>()
    );
}

#[test]
fn sequential_page_cache_writes_are_combined_and_read_back_intact() {
    // The kernel's writeback sends at most 1 MiB per WRITE; the driver joins contiguous ones that
    // arrive while earlier writes of the file are in flight (`write_combiner`), so a 64 MiB
    // sequential write takes fewer Raft entries than its 64 requests. What the node stored is
    // then read back with O_DIRECT (past the page cache): every byte where it was written.
    let Some((node, mount)) = setup("1GiB") else {
        return;
    };
    const CHUNK_BYTES: usize = 1 << 20;
    const CHUNK_COUNT: usize = 64;
    let path = mount.join("sequential");
    let mut file = File::create(&path).unwrap();
    file.sync_all().unwrap();
    let before = applied_index(&node);
    for index in 0..CHUNK_COUNT {
        file.write_all(&pattern(CHUNK_BYTES, index as u8)).unwrap();
    }
    // Nothing has been written back yet (64 MiB is far below the mount's dirty limit); the
    // fsync sends all of it at once.
    file.sync_all().unwrap();
    let entries = applied_index(&node) - before;
    assert!(
        entries < CHUNK_COUNT as u64,
        "{CHUNK_COUNT} sequential 1 MiB writes took {entries} log entries: none were combined"
    );
    drop(file);

    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(CHUNK_BYTES, 4096).unwrap();
    // SAFETY: the layout has non-zero size; the buffer is freed below with the same layout.
    let buffer = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buffer.is_null());
    // SAFETY: `buffer` points to CHUNK_BYTES initialised bytes that we own until dealloc.
    let chunk = unsafe { std::slice::from_raw_parts_mut(buffer, CHUNK_BYTES) };
    for index in 0..CHUNK_COUNT {
        chunk.fill(0);
        file.read_exact_at(chunk, (index * CHUNK_BYTES) as u64)
            .unwrap();
        assert!(
            chunk == &pattern(CHUNK_BYTES, index as u8)[..],
            "chunk {index} differs after {entries} entries"
        );
    }
    // SAFETY: same pointer and layout as the allocation above.
    unsafe { std::alloc::dealloc(buffer, layout) };
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        (CHUNK_COUNT * CHUNK_BYTES) as u64
    );
}

/// The numbers on the line of `ballast status` that starts with `label`.
fn status_numbers(node: &LocalNode, label: &str) -> Vec<u64> {
    let status = node.cli(&["status"]).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in {status}"));
    line.split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect()
}

/// `ballast status`'s shared-reads line: (reads served into shared regions, regions attached).
fn shared_read_counts(node: &LocalNode) -> (u64, u64) {
    let numbers = status_numbers(node, "shared reads");
    assert_eq!(numbers.len(), 2, "shared reads line: {numbers:?}");
    (numbers[0], numbers[1])
}

/// `ballast status`'s shared-writes line: writes whose bytes came from shared regions.
fn shared_write_count(node: &LocalNode) -> u64 {
    let numbers = status_numbers(node, "shared writes");
    assert_eq!(numbers.len(), 1, "shared writes line: {numbers:?}");
    numbers[0]
}

/// `ballast status`'s local-frames line: requests answered as local frames on the node's local
/// socket instead of gRPC.
fn local_request_count(node: &LocalNode) -> u64 {
    let numbers = status_numbers(node, "local frames");
    assert_eq!(numbers.len(), 1, "local frames line: {numbers:?}");
    numbers[0]
}

/// Reads all of `path` with O_DIRECT (every read goes to the driver) in 1 MiB requests.
fn read_direct(path: &Path) -> Vec<u8> {
    const CHUNK_BYTES: usize = 1 << 20;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(CHUNK_BYTES, 4096).unwrap();
    // SAFETY: the layout has non-zero size; the buffer is freed below with the same layout.
    let buffer = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buffer.is_null());
    // SAFETY: `buffer` points to CHUNK_BYTES initialised bytes that we own until dealloc.
    let chunk = unsafe { std::slice::from_raw_parts_mut(buffer, CHUNK_BYTES) };
    let mut content = Vec::new();
    // Bounded by the file's size: each pass reads at least one byte or ends.
    loop {
        let read = file.read_at(chunk, content.len() as u64).unwrap();
        if read == 0 {
            break;
        }
        content.extend_from_slice(&chunk[..read]);
    }
    // SAFETY: same pointer and layout as the allocation above.
    unsafe { std::alloc::dealloc(buffer, layout) };
    content
}

#[test]
fn reads_go_through_memory_shared_with_the_node_and_match_what_was_written() {
    // The driver shares a region of memory with its node (the node's local socket); the node
    // reads file blocks into it and the driver answers the kernel from it. The bytes must be
    // exactly those written, holes and a short tail included; with `--shared-memory false` the
    // same reads go over gRPC and the node's count of shared reads stays where it was.
    let Some((mut node, mount)) = setup("1GiB") else {
        return;
    };
    let path = mount.join("shared");
    let mut expected: Vec<u8> = (0..12u8)
        .flat_map(|index| pattern(1 << 20, index))
        .collect();
    expected.extend_from_slice(&pattern(5000, 99));
    let file = File::create(&path).unwrap();
    file.write_all_at(&expected, 0).unwrap();
    // A hole from the end of that to 20 MiB, then a few bytes.
    file.write_all_at(b"tail", 20 << 20).unwrap();
    file.sync_all().unwrap();
    drop(file);
    expected.resize(20 << 20, 0);
    expected.extend_from_slice(b"tail");

    let (reads_before, _) = shared_read_counts(&node);
    let frames_before = local_request_count(&node);
    let content = read_direct(&path);
    assert!(content == expected, "shared reads returned other bytes");
    let (reads, regions) = shared_read_counts(&node);
    assert_eq!(regions, 1, "the driver attached one region");
    assert!(
        reads - reads_before >= 21,
        "21 MiB read in 1 MiB requests, {} through shared memory",
        reads - reads_before
    );
    // The requests went as local frames on the attach socket, not over gRPC.
    let frames = local_request_count(&node);
    assert!(
        frames - frames_before >= 21,
        "21 MiB read through shared memory, {} requests as local frames",
        frames - frames_before
    );

    let endpoint = node.endpoint();
    let plain = node
        .mount_with(
            "posix",
            &endpoint,
            None,
            &["--shared-memory", "false"],
            "-plain",
        )
        .unwrap();
    let content = read_direct(&plain.join("shared"));
    assert!(content == expected, "reads over gRPC returned other bytes");
    assert_eq!(
        shared_read_counts(&node).0,
        reads,
        "a driver with shared reads off read through shared memory"
    );
    assert_eq!(
        local_request_count(&node),
        frames,
        "a driver with shared memory off sent local frames"
    );

    // With `--local-frames false` the reads still go through shared memory, their requests
    // over gRPC.
    let grpc_requests = node
        .mount_with(
            "posix",
            &endpoint,
            None,
            &["--local-frames", "false"],
            "-grpc-requests",
        )
        .unwrap();
    let content = read_direct(&grpc_requests.join("shared"));
    assert!(
        content == expected,
        "shared reads asked over gRPC returned other bytes"
    );
    let (reads_over_grpc, regions) = shared_read_counts(&node);
    assert_eq!(regions, 2, "the second driver attached a region too");
    assert!(
        reads_over_grpc - reads >= 21,
        "21 MiB read, {} through shared memory",
        reads_over_grpc - reads
    );
    assert_eq!(
        local_request_count(&node),
        frames,
        "a driver with local frames off sent local frames"
    );
}

#[test]
fn writes_go_through_memory_shared_with_the_node_and_read_back_intact() {
    // The driver copies a write's bytes into a write slot of the region it shares with its
    // node, and the node copies them out once. Sequential page-cache writes (combined up to
    // 4 MiB), unaligned writes and a durable file's writes must all land exactly, as a second
    // driver with `--shared-memory false` (reads over gRPC) sees them; its own writes do not
    // count as shared.
    let Some((mut node, mount)) = setup("1GiB") else {
        return;
    };
    let writes_before = shared_write_count(&node);
    let frames_before = local_request_count(&node);
    let path = mount.join("shared-writes");
    let mut expected: Vec<u8> = (0..24u8)
        .flat_map(|index| pattern(1 << 20, index))
        .collect();
    let file = File::create(&path).unwrap();
    for (index, chunk) in expected.chunks(1 << 20).enumerate() {
        file.write_all_at(chunk, (index << 20) as u64).unwrap();
    }
    // Unaligned, overlapping two chunks, and a tail past the end.
    let odd = pattern(70_001, 200);
    file.write_all_at(&odd, 3_000_123).unwrap();
    expected[3_000_123..3_000_123 + odd.len()].copy_from_slice(&odd);
    file.write_all_at(b"end", expected.len() as u64 + 10)
        .unwrap();
    expected.extend_from_slice(&[0; 10]);
    expected.extend_from_slice(b"end");
    file.sync_all().unwrap();
    drop(file);
    let shared_writes = shared_write_count(&node) - writes_before;
    assert!(
        shared_writes >= 6,
        "24 MiB written in page-cache writes of up to 4 MiB, {shared_writes} through shared memory"
    );
    let frames = local_request_count(&node) - frames_before;
    assert!(
        frames >= shared_writes,
        "{shared_writes} writes through shared memory, {frames} requests as local frames"
    );

    let endpoint = node.endpoint();
    let plain = node
        .mount_with(
            "posix",
            &endpoint,
            None,
            &["--shared-memory", "false"],
            "-plain",
        )
        .unwrap();
    let content = read_direct(&plain.join("shared-writes"));
    assert!(
        content == expected,
        "bytes written through shared memory read back otherwise over gRPC"
    );

    // The other way: written over gRPC, read through shared memory.
    let counted = shared_write_count(&node);
    let other = pattern(3 << 20, 7);
    fs::write(plain.join("grpc-writes"), &other).unwrap();
    File::open(plain.join("grpc-writes"))
        .unwrap()
        .sync_all()
        .unwrap();
    assert_eq!(
        shared_write_count(&node),
        counted,
        "a driver with shared memory off wrote through it"
    );
    assert!(read_direct(&mount.join("grpc-writes")) == other);
}

#[test]
fn the_mount_writes_back_until_its_background_queue_is_full() {
    // The kernel's background writeback of a FUSE file stops while the mount is "congested"
    // (`fuse_writepages`), and by default that is at 3/4 of the background queue: the driver
    // sets it to the whole queue (fuse-driver `init`). Read from the FUSE control filesystem.
    let Some((_node, mount)) = setup("64MiB") else {
        return;
    };
    let connections = Path::new("/sys/fs/fuse/connections");
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some("/sys/fs/fuse/connections"));
    if !mounted {
        let status = Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status()
            .unwrap();
        assert!(status.success(), "mounting the FUSE control filesystem");
    }
    // A connection is named by its superblock's device number (major 0 for FUSE).
    let device = std::fs::metadata(&mount).unwrap().dev();
    let connection = connections.join(libc::minor(device).to_string());
    let read = |name: &str| -> u32 {
        std::fs::read_to_string(connection.join(name))
            .unwrap_or_else(|error| panic!("{}: {error}", connection.join(name).display()))
            .trim()
            .parse()
            .unwrap()
    };
    let max_background = read("max_background");
    assert_eq!(max_background, 64);
    assert_eq!(
        read("congestion_threshold"),
        max_background,
        "the mount counts as congested before its background queue is full"
    );
}

#[test]
fn a_node_killed_during_buffered_writes_restarts_with_everything_fsynced() {
    // Buffered page-cache writes of a one-node volume are acknowledged to Raft when queued to
    // the log writer and applied once written (`log_storage.rs`, "Early acknowledgement"); a
    // SIGKILL then finds some acknowledged and unwritten. The node must come back (a stored
    // commit point past its log would make openraft re-apply entries that are not there),
    // keep everything fsync'd, and hold for the rest only whole writes that were made.
    let Some((mut node, mount)) = setup("1GiB") else {
        return;
    };
    const CHUNK_BYTES: usize = 1 << 20;
    let synced = pattern(32 * CHUNK_BYTES, 5);
    ballast_tests::write_fsync(&mount.join("synced"), &synced);
    let streaming = mount.join("streaming");
    let before = applied_index(&node);
    const CHUNK_COUNT: u32 = 512;
    // The writer is its own process, as an application is: a node spawned by a process that
    // holds a file open on the node's mount would wait in `execve` for that file's writeback
    // (see `LocalNode::files_open_on_mounts`). Chunk `c` holds `pattern(CHUNK_BYTES, c)`
    // (period 256). `sync_file_range` starts each chunk's writeback (nothing is made durable),
    // so writes reach the node while the test waits instead of sitting in the page cache under
    // the mount's dirty limit. It prints each chunk's number once written.
    const WRITER: &str = "import ctypes, os, sys\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        SYNC_FILE_RANGE_WRITE = 2\n\
        path, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n\
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n\
        for chunk in range(count):\n\
        \x20   data = memoryview(bytes((i * 31 + chunk) & 255 for i in range(256)) * (size // 256))\n\
        \x20   while data:\n\
        \x20       data = data[os.write(fd, data):]\n\
        \x20   offset, length = ctypes.c_int64(chunk * size), ctypes.c_int64(size)\n\
        \x20   if libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) != 0:\n\
        \x20       raise OSError(ctypes.get_errno(), 'sync_file_range')\n\
        \x20   print(chunk, flush=True)\n";
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(WRITER)
        .arg(&streaming)
        .arg(CHUNK_COUNT.to_string())
        .arg(CHUNK_BYTES.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 writer");
    let chunks_written = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    {
        let output = writer.stdout.take().expect("piped stdout");
        let chunks_written = std::sync::Arc::clone(&chunks_written);
        // Ends when the writer exits (its end of the pipe closes).
        std::thread::spawn(move || {
            for _line in
                std::io::BufRead::lines(std::io::BufReader::new(output)).map_while(Result::ok)
            {
                chunks_written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    // Killed while writeback is flowing: an eighth of the file written, the rest to come.
    ballast_tests::wait_until(
        "an eighth of the file written",
        std::time::Duration::from_secs(60),
        || {
            chunks_written.load(std::sync::atomic::Ordering::Relaxed) >= CHUNK_COUNT / 8
                || writer.try_wait().map_or(true, |status| status.is_some())
        },
    )
    .unwrap();
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the writer failed before the kill"
    );
    node.kill_node();
    // No more writes; the writer's exit flushes its file, which completes (or fails) once the
    // node is back.
    let _ = writer.kill();
    // The writer's unwritten pages need this node: if this process held the file, the node's
    // exec would wait for them (`LocalNode::files_open_on_mounts`).
    assert_eq!(
        node.files_open_on_mounts(),
        Vec::<PathBuf>::new(),
        "the test process holds files on the mount it restarts the node under"
    );
    node.restart_node().unwrap();
    ballast_tests::wait_until(
        "the writer exits",
        std::time::Duration::from_secs(120),
        || writer.try_wait().map_or(true, |status| status.is_some()),
    )
    .unwrap();
    node.remount_all().unwrap();
    assert_eq!(
        ballast_tests::read_uncached(&mount.join("synced")).unwrap(),
        synced,
        "fsync'd data after SIGKILL during buffered writes"
    );
    // Whatever of the unsynced file survived holds, in each 4 KiB page, what was written there
    // or nothing (zeros): writeback does not go in file order, and a write that failed while
    // the node was down is dropped by the kernel, so a later page's write may have been
    // applied (and set the size) where an earlier one never reached the node.
    let survived = ballast_tests::read_uncached(&streaming).unwrap_or_default();
    const PAGE_BYTES: usize = 4096;
    let mut zero_pages = 0;
    for (page, bytes) in survived.chunks(PAGE_BYTES).enumerate() {
        let offset_bytes = page * PAGE_BYTES;
        let chunk = offset_bytes / CHUNK_BYTES;
        let expected = pattern(CHUNK_BYTES, chunk as u8);
        let in_chunk = offset_bytes % CHUNK_BYTES;
        if bytes.iter().all(|&byte| byte == 0) {
            zero_pages += 1;
            continue;
        }
        assert!(
            bytes == &expected[in_chunk..in_chunk + bytes.len()],
            "the page at byte {offset_bytes} of the unsynced file holds bytes that were never \
             written there ({} bytes survived)",
            survived.len()
        );
    }
    eprintln!(
        "{} KiB of the unsynced file survived, {zero_pages} pages of them never written",
        survived.len() / 1024
    );
    assert!(
        applied_index(&node) >= before,
        "the container came back behind what was fsync'd"
    );
}
