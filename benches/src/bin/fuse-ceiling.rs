//! `ballast-fuse-ceiling`: a FUSE filesystem of one read-only file whose bytes come from memory,
//! answered at once. It measures what the kernel's FUSE transport alone costs on this machine:
//! a cold sequential read through it (page cache dropped, so every page is asked for) is the
//! fastest any FUSE driver here can serve, before it has done any work of its own.
//!
//! Why it exists: the FUSE cold read of `run.sh` is compared with the disk read natively. When
//! the disk is fast, that ratio mixes two things: what the FUSE transport costs (a copy into the
//! page cache per page, a request per `max_pages`, wake-ups of the driver) and what Ballast adds
//! on top (the node, its checksums, its hand-offs). This filesystem has only the first, so
//! `Ballast / ceiling` says how much of the gap is ours.
//!
//! It asks the kernel for what the Ballast driver asks for (`fuse-driver/src/filesystem.rs`,
//! `init`): asynchronous reads, `max_pages`, a 1 MiB `max_write` (which sets `max_pages`), a
//! 4 MiB readahead. `run.sh` raises the mount's `read_ahead_kb` as the driver does. With
//! `--hand-off` each read is answered from a task on a multi-thread tokio runtime, as the Ballast
//! driver answers every request, so the cost of that one hand-off shows too.
//!
//! Owns: nothing that outlives the process. Must not depend on: any Ballast crate; it is a
//! yardstick. Invariants: the file's bytes are a fixed function of the offset (every byte is
//! `offset % 251`), so a reader can check them; reads past the end answer no bytes.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};

#[derive(Debug, Parser)]
#[command(
    name = "ballast-fuse-ceiling",
    about = "Serve one file from memory over FUSE, to measure the FUSE transport alone"
)]
struct Arguments {
    /// Where to mount (created if missing).
    #[arg(long)]
    mountpoint: PathBuf,
    /// Size of the one file, `data.bin`, in MiB.
    #[arg(long, default_value_t = 1024)]
    file_size_mib: u64,
    /// Answer each read from a tokio task instead of on the session thread.
    #[arg(long)]
    hand_off: bool,
    /// Session threads reading `/dev/fuse` (each with its own cloned descriptor).
    #[arg(long, default_value_t = 1)]
    session_thread_count: usize,
}

/// Largest read the kernel sends (`max_pages` of 4 KiB, set from `max_write`).
const READ_BYTES_MAX: usize = 1 << 20;
const READAHEAD_BYTES: u32 = 4 << 20;
/// The pattern's period: a prime, so no power-of-two read lines up with it.
const PATTERN_PERIOD_BYTES: usize = 251;
const FILE_INODE: INodeNo = INodeNo(2);
const FILE_NAME: &str = "data.bin";
const TIME_TO_LIVE: Duration = Duration::from_secs(3600);
/// Upper bound of the file size: 64 GiB.
const FILE_SIZE_MIB_MAX: u64 = 64 << 10;

struct CeilingFilesystem {
    file_size_bytes: u64,
    /// The pattern for any offset: bytes `offset % 251 ..` of it, up to `READ_BYTES_MAX` long.
    pattern: Arc<Vec<u8>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CeilingFilesystem {
    fn attributes(&self, inode: INodeNo) -> FileAttr {
        let (kind, size, perm, nlink) = if inode == FILE_INODE {
            (FileType::RegularFile, self.file_size_bytes, 0o444, 1)
        } else {
            (FileType::Directory, 0, 0o555, 2)
        };
        FileAttr {
            ino: inode,
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// The bytes of the file at `offset_bytes`, `length_bytes` long (already clipped to the file).
fn file_bytes(pattern: &[u8], offset_bytes: u64, length_bytes: usize) -> &[u8] {
    let start = (offset_bytes % PATTERN_PERIOD_BYTES as u64) as usize;
    &pattern[start..start + length_bytes]
}

impl Filesystem for CeilingFilesystem {
    fn init(&mut self, _request: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [InitFlags::FUSE_ASYNC_READ, InitFlags::FUSE_MAX_PAGES] {
            if config.add_capabilities(flag).is_err() {
                eprintln!("kernel does not offer {flag:?}");
            }
        }
        if let Err(nearest_bytes) = config.set_max_write(READ_BYTES_MAX as u32) {
            let _ = config.set_max_write(nearest_bytes);
        }
        let _ = config.set_max_background(64);
        if let Err(nearest_bytes) = config.set_max_readahead(READAHEAD_BYTES) {
            let _ = config.set_max_readahead(nearest_bytes);
        }
        Ok(())
    }

    fn lookup(&self, _request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == FILE_NAME {
            reply.entry(&TIME_TO_LIVE, &self.attributes(FILE_INODE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        if inode == FILE_INODE || inode == INodeNo::ROOT {
            reply.attr(&TIME_TO_LIVE, &self.attributes(inode));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _request: &Request, inode: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if inode == FILE_INODE {
            reply.opened(FileHandle(1), FopenFlags::empty());
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _request: &Request,
        _inode: INodeNo,
        _file_handle: FileHandle,
        offset_bytes: u64,
        length_bytes: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = offset_bytes
            .saturating_add(u64::from(length_bytes))
            .min(self.file_size_bytes);
        let length = end.saturating_sub(offset_bytes) as usize;
        if length > READ_BYTES_MAX {
            reply.error(Errno::EINVAL);
            return;
        }
        match &self.runtime {
            None => reply.data(file_bytes(&self.pattern, offset_bytes, length)),
            Some(runtime) => {
                let pattern = self.pattern.clone();
                runtime.spawn(async move {
                    reply.data(file_bytes(&pattern, offset_bytes, length));
                });
            }
        }
    }

    fn readdir(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if inode != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INODE, FileType::RegularFile, FILE_NAME),
        ];
        for (index, (entry_inode, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*entry_inode, (index + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() -> Result<()> {
    let arguments = Arguments::parse();
    anyhow::ensure!(
        (1..=FILE_SIZE_MIB_MAX).contains(&arguments.file_size_mib),
        "--file-size-mib must be between 1 and {FILE_SIZE_MIB_MAX}"
    );
    anyhow::ensure!(
        (1..=16).contains(&arguments.session_thread_count),
        "--session-thread-count must be between 1 and 16"
    );
    let pattern: Vec<u8> = (0..READ_BYTES_MAX + PATTERN_PERIOD_BYTES)
        .map(|index| (index % PATTERN_PERIOD_BYTES) as u8)
        .collect();
    let runtime = if arguments.hand_off {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .thread_name("ceiling-io")
                .build()
                .context("starting the runtime")?,
        )
    } else {
        None
    };
    std::fs::create_dir_all(&arguments.mountpoint)
        .with_context(|| format!("creating {}", arguments.mountpoint.display()))?;
    let filesystem = CeilingFilesystem {
        file_size_bytes: arguments.file_size_mib << 20,
        pattern: Arc::new(pattern),
        runtime,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("ballast-fuse-ceiling".to_owned()),
        MountOption::RO,
    ];
    config.n_threads = Some(arguments.session_thread_count);
    config.clone_fd = arguments.session_thread_count > 1;
    let session = fuser::Session::new(filesystem, &arguments.mountpoint, &config)
        .with_context(|| format!("mounting {}", arguments.mountpoint.display()))?;
    println!("mounted {}", arguments.mountpoint.display());
    // Until `fusermount3 -u` (or `umount`) ends the session.
    session.run().context("FUSE session")?;
    Ok(())
}
