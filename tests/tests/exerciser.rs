//! Random file-operation exerciser: write, read, truncate, fallocate, rename and fsync in random
//! order on a Ballast mount, each checked against a reference file on local disk. The seed is
//! printed; replay with `BALLAST_SEED=<seed>`. `BALLAST_EXERCISER_OPERATIONS` sets the count.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use ballast_common::{Random, SplitMix64};
use ballast_tests::{end_to_end_available, seed, LocalNode};

const FILE_NAMES: [&str; 4] = ["file-a", "file-b", "file-c", "file-d"];
/// Small files and requests keep 100,000 operations within minutes while still crossing block
/// boundaries, holes and end-of-file in every way.
const FILE_SIZE_BYTES_MAX: u64 = 4 << 20;
const IO_LENGTH_BYTES_MAX: u64 = 64 << 10;

/// Operations of the long run; `BALLAST_EXERCISER_OPERATIONS` overrides.
fn operation_count() -> u64 {
    std::env::var("BALLAST_EXERCISER_OPERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn fallocate(file: &File, mode: i32, offset: u64, length: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an open descriptor with integer arguments.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, length as i64) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The same operation applied to the mount and to the reference directory.
struct Pair {
    mount: PathBuf,
    reference: PathBuf,
}

#[derive(Debug, Default)]
struct Totals {
    writes: u64,
    reads: u64,
    truncates: u64,
    fallocates: u64,
    renames: u64,
    fsyncs: u64,
    mismatches: u64,
}

impl Pair {
    fn open(&self, name: &str) -> (File, File) {
        let open = |directory: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(directory.join(name))
                .unwrap()
        };
        (open(&self.mount), open(&self.reference))
    }

    fn compare_whole(&self, name: &str, context: &str) -> bool {
        let actual = fs::read(self.mount.join(name)).ok();
        let expected = fs::read(self.reference.join(name)).ok();
        if actual != expected {
            eprintln!(
                "MISMATCH {context}: {name}: mount {:?} bytes, reference {:?} bytes",
                actual.as_ref().map(Vec::len),
                expected.as_ref().map(Vec::len)
            );
            if let (Some(actual), Some(expected)) = (&actual, &expected) {
                if let Some(position) = actual.iter().zip(expected.iter()).position(|(a, b)| a != b)
                {
                    eprintln!("  first differing byte at {position}");
                }
            }
            return false;
        }
        true
    }

    /// One random operation. Returns false on a mismatch.
    fn step(&self, random: &mut SplitMix64, totals: &mut Totals) -> bool {
        let name = FILE_NAMES[random.below(FILE_NAMES.len() as u64) as usize];
        let (mount_file, reference_file) = self.open(name);
        let size = reference_file.metadata().unwrap().len();
        match random.below(100) {
            0..=39 => {
                let offset = random.below(FILE_SIZE_BYTES_MAX);
                let length =
                    1 + random.below(IO_LENGTH_BYTES_MAX.min(FILE_SIZE_BYTES_MAX - offset));
                let mut data = vec![0u8; length as usize];
                random.fill(&mut data);
                mount_file.write_all_at(&data, offset).unwrap();
                reference_file.write_all_at(&data, offset).unwrap();
                totals.writes += 1;
            }
            40..=69 => {
                let offset = random.below(size.max(1) + 4096);
                let length = 1 + random.below(IO_LENGTH_BYTES_MAX);
                let mut actual = vec![0u8; length as usize];
                let mut expected = vec![0u8; length as usize];
                let actual_count = read_fully(&mount_file, &mut actual, offset);
                let expected_count = read_fully(&reference_file, &mut expected, offset);
                totals.reads += 1;
                if actual_count != expected_count
                    || actual[..actual_count] != expected[..expected_count]
                {
                    eprintln!("MISMATCH read {name} offset {offset} length {length}: {actual_count} vs {expected_count} bytes");
                    return false;
                }
            }
            70..=79 => {
                let new_size = random.below(FILE_SIZE_BYTES_MAX);
                mount_file.set_len(new_size).unwrap();
                reference_file.set_len(new_size).unwrap();
                totals.truncates += 1;
            }
            80..=87 => {
                let offset = random.below(FILE_SIZE_BYTES_MAX);
                let length = 1 + random.below((1 << 20).min(FILE_SIZE_BYTES_MAX - offset));
                let mode = match random.below(3) {
                    0 => 0,
                    1 => libc::FALLOC_FL_KEEP_SIZE,
                    _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                };
                fallocate(&mount_file, mode, offset, length).unwrap();
                fallocate(&reference_file, mode, offset, length).unwrap();
                totals.fallocates += 1;
            }
            88..=93 => {
                let target = FILE_NAMES[random.below(FILE_NAMES.len() as u64) as usize];
                drop((mount_file, reference_file));
                fs::rename(self.mount.join(name), self.mount.join(target)).unwrap();
                fs::rename(self.reference.join(name), self.reference.join(target)).unwrap();
                totals.renames += 1;
            }
            _ => {
                if random.below(2) == 0 {
                    mount_file.sync_all().unwrap()
                } else {
                    mount_file.sync_data().unwrap()
                }
                totals.fsyncs += 1;
            }
        }
        true
    }
}

fn read_fully(file: &File, buffer: &mut [u8], offset: u64) -> usize {
    let mut total = 0;
    while total < buffer.len() {
        match file
            .read_at(&mut buffer[total..], offset + total as u64)
            .unwrap()
        {
            0 => break,
            count => total += count,
        }
    }
    total
}

fn setup(name: &str) -> Option<(LocalNode, Pair, tempfile::TempDir)> {
    if !end_to_end_available() {
        return None;
    }
    let mut node = LocalNode::start(4 << 30).unwrap();
    node.create_volume(name, "2GiB").unwrap();
    let mount = node.mount(name).unwrap();
    let reference = tempfile::Builder::new()
        .prefix("ballast-reference-")
        .tempdir_in(ballast_tests::test_root())
        .unwrap();
    let pair = Pair {
        mount,
        reference: reference.path().to_path_buf(),
    };
    Some((node, pair, reference))
}

#[test]
fn random_operations_match_reference() {
    let Some((node, pair, _reference)) = setup("exerciser") else {
        return;
    };
    let seed = seed("random_operations_match_reference");
    let mut random = SplitMix64::new(seed);
    let mut totals = Totals::default();
    let count = operation_count();
    for operation in 0..count {
        if !pair.step(&mut random, &mut totals) {
            totals.mismatches += 1;
            break;
        }
        if operation % 10_000 == 9_999 {
            for name in FILE_NAMES {
                if !pair.compare_whole(name, &format!("after {} operations", operation + 1)) {
                    totals.mismatches += 1;
                }
            }
            eprintln!("{} operations: {totals:?}", operation + 1);
        }
    }
    for name in FILE_NAMES {
        if !pair.compare_whole(name, "at the end") {
            totals.mismatches += 1;
        }
    }
    eprintln!("exerciser totals (seed {seed}): {totals:?}");
    assert_eq!(
        totals.mismatches,
        0,
        "seed {seed}: mismatches; node log:\n{}",
        node.log_tail()
    );
}

/// Runs random operations per file, fsyncs and seals each file, kills the node with SIGKILL at a
/// random moment, restarts, and checks that every sealed (fsync'd) file matches exactly.
#[test]
fn fsynced_files_survive_kill_during_random_operations() {
    let Some((mut node, pair, _reference)) = setup("exerciser-kill") else {
        return;
    };
    let seed = seed("fsynced_files_survive_kill_during_random_operations");
    let mut random = SplitMix64::new(seed);
    let mut totals = Totals::default();
    let mut sealed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let rounds = 3;
    for round in 0..rounds {
        let kill_after_files = 2 + random.below(4);
        for file_index in 0..kill_after_files {
            let operations = 50 + random.below(150);
            for _ in 0..operations {
                assert!(
                    pair.step(&mut random, &mut totals),
                    "seed {seed}: mismatch before the kill"
                );
            }
            // Seal: fsync every working file, record its content under a unique name.
            for name in FILE_NAMES {
                let source = pair.reference.join(name);
                if !source.exists() {
                    continue;
                }
                let sealed_name = format!("sealed-{round}-{file_index}-{name}");
                fs::copy(pair.mount.join(name), pair.mount.join(&sealed_name)).unwrap();
                File::open(pair.mount.join(&sealed_name))
                    .unwrap()
                    .sync_all()
                    .unwrap();
                sealed.insert(sealed_name, fs::read(&source).unwrap());
            }
        }
        // Unsynced work in flight at the moment of the kill.
        for _ in 0..random.below(50) {
            pair.step(&mut random, &mut totals);
        }
        node.kill_node();
        node.restart_node().unwrap();
        node.remount_all().unwrap();
        let mut lost = 0;
        let mut wrong = 0;
        for (name, expected) in &sealed {
            match fs::read(pair.mount.join(name)) {
                Ok(actual) if &actual == expected => {}
                Ok(_) => wrong += 1,
                Err(error) => {
                    eprintln!("sealed file {name} lost: {error}");
                    lost += 1
                }
            }
        }
        eprintln!(
            "round {round}: {} sealed files checked, lost {lost}, wrong {wrong}; {totals:?}",
            sealed.len()
        );
        assert_eq!(
            (lost, wrong),
            (0, 0),
            "seed {seed}: fsync'd data must survive kill -9\n{}",
            node.log_tail()
        );
        // Resynchronise the working files with the reference (unsynced writes may be lost).
        for name in FILE_NAMES {
            let _ = fs::remove_file(pair.reference.join(name));
            if pair.mount.join(name).exists() {
                fs::copy(pair.mount.join(name), pair.reference.join(name)).unwrap();
            }
        }
    }
}
