//! A storage node whose state directory (RocksDB) lives on a filesystem that fills up: a small
//! loop-mounted ext4, filled by a filler file while the node runs.
//!
//! What must hold: the node stays up and keeps serving what is stored; nothing acknowledged
//! (fsync'd) is lost, while the filesystem is full, after space comes back, and across a kill -9
//! and restart; once space comes back, writes succeed again without a restart.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ballast_tests::{end_to_end_available, read_uncached, write_fsync, LocalNode};

const DEVICE_SIZE_BYTES: u64 = 1 << 30;
/// The state filesystem: room for RocksDB's files of a small volume and little more.
const STATE_FILESYSTEM_BYTES: u64 = 64 << 20;
const CHUNK_BYTES: usize = 256 << 10;
/// Chunks written (each fsync'd) while the state filesystem is full.
const CHUNKS_WHILE_FULL: usize = 24;

/// Unmounts the state filesystem even when the test fails (after the node is gone).
struct LoopMount(PathBuf);

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|index| (index as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

/// Fills the filesystem of `path` with one file there, in one `fallocate` of all the space
/// left: another program that filled the disk and stopped. (One that keeps writing would also
/// eat the node's reserve; no reserve protects against that, only a filesystem of its own.)
fn fill(path: &Path) {
    let filler = File::create(path).unwrap();
    let directory =
        std::ffi::CString::new(path.parent().unwrap().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `statvfs` is plain old data, filled by the call before it is read.
    let mut statistics: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a live local.
    let result = unsafe { libc::statvfs(directory.as_ptr(), &mut statistics) };
    assert_eq!(result, 0, "statvfs");
    let free_bytes = statistics.f_bavail as u64 * statistics.f_frsize as u64;
    // The filesystem needs a few blocks of its own for the file's extents: asked for all the
    // free space, fallocate fails, so ask for 64 KiB less each time (bounded by the size).
    let mut length_bytes = free_bytes;
    while length_bytes > 0 {
        // SAFETY: fallocate on a descriptor owned by `filler`.
        let result = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&filler),
                0,
                0,
                length_bytes as libc::off_t,
            )
        };
        if result == 0 {
            return;
        }
        let error = std::io::Error::last_os_error();
        assert_eq!(
            error.raw_os_error(),
            Some(libc::ENOSPC),
            "fallocate: {error}"
        );
        length_bytes = length_bytes.saturating_sub(64 << 10);
    }
    panic!("could not fill the state filesystem ({free_bytes} bytes free)");
}

#[test]
fn a_node_whose_state_filesystem_fills_up_loses_nothing_acknowledged_and_recovers() {
    if !end_to_end_available() {
        return;
    }
    // Checkpoints (which flush RocksDB's memtables into files) every 200 ms, so the full
    // filesystem is met within the test's writes.
    let mut node = LocalNode::start_member(
        DEVICE_SIZE_BYTES,
        1,
        vec!["--checkpoint-interval-ms".to_owned(), "200".to_owned()],
    )
    .unwrap();
    node.create_volume("full", "512MiB").unwrap();
    let mount = node.mount("full").unwrap();
    let before = pattern(2 << 20, 1);
    write_fsync(&mount.join("before"), &before);

    // Move the state directory onto a small ext4 of its own.
    node.stop_node().unwrap();
    let image = node.directory.path().join("state.ext4");
    File::create(&image)
        .unwrap()
        .set_len(STATE_FILESYSTEM_BYTES)
        .unwrap();
    // No blocks reserved for root: the node runs as root and would write into them.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(&image));
    let filesystem = node.directory.path().join("state-filesystem");
    fs::create_dir_all(&filesystem).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&filesystem));
    let _loop_mount = LoopMount(filesystem.clone());
    let state = filesystem.join("state");
    // The node's space reserve is sized for the old filesystem; it takes a new one at start.
    fs::remove_file(node.state_directory.join("space-reserve")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(&node.state_directory)
        .arg(&state));
    node.state_directory = state;
    node.restart_node().unwrap();
    node.remount_all().unwrap();
    assert!(read_uncached(&mount.join("before")).unwrap() == before);

    // Fill it, then write chunks through the mount into a file created before, fsync'ing
    // each; remember which fsyncs returned success (those bytes are acknowledged). Creating a
    // file is refused while full, as writing is.
    let during_path = mount.join("during");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&during_path)
        .unwrap();
    let filler = filesystem.join("filler");
    fill(&filler);
    let during = pattern(CHUNKS_WHILE_FULL * CHUNK_BYTES, 2);
    let mut acknowledged = [false; CHUNKS_WHILE_FULL];
    let mut refusals = Vec::new();
    for (index, chunk) in during.chunks(CHUNK_BYTES).enumerate() {
        let started = Instant::now();
        let result = file
            .write_all_at(chunk, (index * CHUNK_BYTES) as u64)
            .and_then(|()| file.sync_all());
        match &result {
            Ok(()) => acknowledged[index] = true,
            Err(error) => {
                assert_eq!(
                    error.raw_os_error(),
                    Some(libc::ENOSPC),
                    "chunk {index}: a write on a full state filesystem failed otherwise ({error}); log tail:\n{}",
                    node.log_tail()
                );
                refusals.push(error.to_string());
            }
        }
        eprintln!(
            "chunk {index}: {:?} in {} ms",
            result.as_ref().err(),
            started.elapsed().as_millis()
        );
        // Lets a checkpoint or two run between the writes.
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(file);
    let created = File::create(mount.join("created-while-full"));
    assert_eq!(
        created
            .as_ref()
            .err()
            .and_then(std::io::Error::raw_os_error),
        Some(libc::ENOSPC),
        "creating a file on a full state filesystem: {created:?}"
    );
    let log = node.log_contents();
    assert!(
        log.contains("the state filesystem is full"),
        "the node never noticed the full state filesystem; log tail:\n{}",
        node.log_tail()
    );
    assert!(
        !refusals.is_empty(),
        "every write was acknowledged on a full state filesystem"
    );
    // RocksDB never met the full filesystem: a failed flush would stop the Raft cores.
    let first_errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("ERROR"))
        .take(3)
        .collect();
    assert!(
        !log.contains("Raft core stopped"),
        "a container's Raft core stopped; first errors:\n{}",
        first_errors.join("\n")
    );
    assert!(
        node.is_running(),
        "the node died on a full state filesystem"
    );
    let read_while_full = read_uncached(&mount.join("before")).unwrap_or_else(|error| {
        panic!(
            "reading data stored before the filesystem filled up: {error}; log tail:\n{}",
            node.log_tail()
        )
    });
    assert!(
        read_while_full == before,
        "data stored before the filesystem filled up reads back otherwise"
    );
    eprintln!(
        "while full: {} of {CHUNKS_WHILE_FULL} fsync'd writes acknowledged; refusals: {refusals:?}",
        acknowledged.iter().filter(|&&done| done).count()
    );

    // Space comes back: writes must succeed again, without a restart (bounded: 60 s).
    fs::remove_file(&filler).unwrap();
    let after = pattern(1 << 20, 3);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_error = String::new();
    let recovered = loop {
        let attempt = File::create(mount.join("after")).and_then(|mut file| {
            file.write_all(&after)?;
            file.sync_all()
        });
        match attempt {
            Ok(()) => break true,
            Err(error) => last_error = error.to_string(),
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        recovered,
        "writes still fail 60 s after space came back ({last_error}); log tail:\n{}",
        node.log_tail()
    );

    // Everything acknowledged is there, now and after kill -9 and restart.
    let check = |node: &LocalNode, when: &str| {
        assert!(
            read_uncached(&mount.join("before")).unwrap() == before,
            "{when}: `before` differs"
        );
        assert!(
            read_uncached(&mount.join("after")).unwrap() == after,
            "{when}: `after` differs"
        );
        let content = read_uncached(&during_path).unwrap();
        for (index, chunk) in during.chunks(CHUNK_BYTES).enumerate() {
            if !acknowledged[index] {
                continue;
            }
            let start = index * CHUNK_BYTES;
            assert!(
                content.get(start..start + CHUNK_BYTES) == Some(chunk),
                "{when}: acknowledged chunk {index} of `during` differs; log tail:\n{}",
                node.log_tail()
            );
        }
    };
    check(&node, "after space came back");
    node.kill_node();
    node.restart_node().unwrap();
    node.remount_all().unwrap();
    check(&node, "after kill -9 and restart");
    node.unmount_all();
    node.kill_node();
}
