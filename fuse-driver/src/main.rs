//! `ballast-fuse`: mounts one Ballast volume at a directory through FUSE and serves it until the
//! filesystem is unmounted or the process receives SIGTERM/SIGINT (then it unmounts cleanly).
//!
//! Owns: the mount's lifetime, the kernel session, and the mount-time cleanup of orphans.
//! Must not depend on: any server crate; the node is reached only through `ballast-client`.
//! Invariants:
//! - The volume is checked to exist before anything is mounted, so a typo fails with a clear
//!   message instead of an empty mount.
//! - At mount every orphan of the volume is purged (PurgeOrphans with inode 0): no handle can be
//!   open on a fresh mount, so any orphan left by a previous driver is garbage.
//! - Locks are kernel-local (see `filesystem`): correct for one mount of a volume per node.

mod convert;
mod filesystem;
mod open_files;
mod recent_attributes;
mod shared_memory;
mod write_combiner;
mod write_through;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_client::{BallastClient, ClientOptions};
use clap::Parser;
use fuser::{Config, MountOption, SessionACL};

use crate::filesystem::{BallastFilesystem, MountSettings};

/// Largest FUSE write the kernel may send; fuser's session buffer allows 16 MiB.
const MAX_WRITE_BYTES_LIMIT: u32 = 16 * 1024 * 1024;

/// Time allowed for in-flight requests to finish after the session ends.
const RUNTIME_SHUTDOWN_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Parser)]
#[command(
    name = "ballast-fuse",
    version,
    about = "Mount a Ballast volume through FUSE"
)]
struct Arguments {
    /// gRPC address of a storage node; several nodes of one cluster comma-separated (the
    /// driver follows the volume's leader and fails over between them).
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    node: String,
    /// Name of the volume to mount.
    #[arg(long)]
    volume: String,
    /// Directory to mount the volume on (created if missing).
    #[arg(long)]
    mountpoint: PathBuf,
    /// How long the kernel may cache attributes and directory entries.
    #[arg(long, default_value_t = 1000)]
    attribute_ttl_ms: u64,
    /// Largest single write the kernel sends.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_write_bytes: u32,
    /// Limit on one attempt of one request to a node.
    #[arg(long, default_value_t = ClientOptions::default().request_timeout_ms)]
    request_timeout_ms: u64,
    /// Attempts of a request before the application gets EIO (failover needs several).
    #[arg(long, default_value_t = ClientOptions::default().retry.attempt_count_max)]
    attempt_count_max: u32,
    /// Share (percent) of the kernel's dirty page limit the mount may hold before writers are
    /// paused (the kernel's default for FUSE is 1).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=100))]
    dirty_ratio_percent: u8,
    /// Read and write through memory shared with the node (attached over the local socket its
    /// status names) when the first `--node` is on this host (for reads: and leads the volume);
    /// reads and writes go over gRPC otherwise, and whenever a shared one fails.
    /// `--shared-reads` is the older name.
    #[arg(long, alias = "shared-reads", default_value_t = true, action = clap::ArgAction::Set)]
    shared_memory: bool,
    /// Send the requests of shared reads and writes as local frames on the node's local socket
    /// when the node serves them (its status says so); `false` sends them over gRPC (for
    /// comparison, or with a node that misbehaves).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    local_frames: bool,
}

fn main() -> anyhow::Result<()> {
    // Before any thread starts: large data-path buffers are reused instead of re-faulted.
    let allocator_tuned = ballast_common::allocator::keep_large_buffers_in_heap();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if !allocator_tuned {
        tracing::debug!("allocator thresholds not set (not glibc)");
    }
    let arguments = Arguments::parse();
    if arguments.max_write_bytes < 4096 || arguments.max_write_bytes > MAX_WRITE_BYTES_LIMIT {
        bail!("--max-write-bytes must be between 4096 and {MAX_WRITE_BYTES_LIMIT}");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ballast-fuse-io")
        .build()
        .context("starting the async runtime")?;

    let client = runtime.block_on(prepare_volume(&arguments))?;
    let mountpoint = prepare_mountpoint(&arguments.mountpoint)?;

    let settings = MountSettings {
        volume: arguments.volume.clone(),
        attribute_ttl: Duration::from_millis(arguments.attribute_ttl_ms),
        max_write_bytes: arguments.max_write_bytes,
        shared_memory: arguments.shared_memory,
        local_frames: arguments.local_frames,
    };
    let filesystem = BallastFilesystem::new(client, settings, runtime.handle().clone());

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("ballast:{}", arguments.volume)),
        MountOption::Subtype("ballast".to_owned()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    // allow_other: the volume is shared storage for every user and container on the node;
    // DefaultPermissions makes the kernel enforce the modes.
    config.acl = SessionACL::All;

    let mut session = fuser::Session::new(filesystem, &mountpoint, &config)
        .with_context(|| format!("mounting {}", mountpoint.display()))?;
    tracing::info!(volume = %arguments.volume, mountpoint = %mountpoint.display(), node = %arguments.node,
        "mounted");

    let mut unmounter = session.unmount_callable();
    let signal_mountpoint = mountpoint.clone();
    runtime.spawn(async move {
        if let Err(error) = wait_for_termination().await {
            tracing::error!(%error, "cannot listen for signals; unmount with fusermount3 -u");
            return;
        }
        tracing::info!("termination requested; unmounting");
        let unmount = tokio::task::spawn_blocking(move || {
            if let Err(error) = unmounter.unmount() {
                // Usually EBUSY: something still has files open. Detach lazily so the mount
                // disappears now and the session ends when the last user lets go.
                tracing::warn!(%error, "unmount failed; detaching lazily");
                if let Err(error) = lazy_unmount(&signal_mountpoint) {
                    tracing::error!(%error, "lazy unmount failed");
                }
            }
        });
        let _ = unmount.await;
    });

    // The kernel caps FUSE readahead at its default (128 KiB) regardless of what init asks; a
    // larger window halves the round trips of sequential reads. And it lets a FUSE mount hold
    // only 1 % of the dirty page limit (strictly enforced): a sequential writer then spends a
    // quarter of its time paused in balance_dirty_pages while the node has room for more
    // (measured: 1 GiB written 507 MB/s at 1 %, 567-590 MB/s at 10 %). The strict limit stays, so
    // the mount's dirty pages remain bounded. Both are set through the mount's backing device
    // info once the session answers (the stat below goes through FUSE).
    let tuning_mountpoint = mountpoint.clone();
    let tuning = BackingDeviceTuning {
        readahead_kib: READAHEAD_KIB,
        dirty_ratio_percent: arguments.dirty_ratio_percent,
    };
    std::thread::spawn(move || tune_backing_device(&tuning_mountpoint, tuning));

    // Serves kernel requests until the filesystem is unmounted (by us or by fusermount3 -u).
    let result = session.run();
    runtime.shutdown_timeout(Duration::from_millis(RUNTIME_SHUTDOWN_TIMEOUT_MS));
    result.context("FUSE session failed")?;
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
    Ok(())
}

/// Connects, checks the volume exists, and purges the orphans a previous mount left behind.
async fn prepare_volume(arguments: &Arguments) -> anyhow::Result<BallastClient> {
    let defaults = ClientOptions::default();
    let options = ClientOptions {
        request_timeout_ms: arguments.request_timeout_ms.max(1),
        retry: ballast_client::RetryPolicy {
            attempt_count_max: arguments.attempt_count_max.max(1),
            ..defaults.retry
        },
        ..defaults
    };
    let client = BallastClient::connect_with_options(&arguments.node, options)
        .await
        .with_context(|| format!("connecting to the storage node at {}", arguments.node))?;
    match client.get_volume(&arguments.volume).await {
        Ok(volume) => {
            tracing::info!(volume = %volume.name, volume_id = volume.volume_id, "volume found");
        }
        Err(error) if error.is_not_found() => bail!(
            "volume {:?} does not exist on {} (create it with `ballast volume create {}`)",
            arguments.volume,
            arguments.node,
            arguments.volume
        ),
        Err(error) => {
            return Err(error).with_context(|| format!("looking up volume {:?}", arguments.volume))
        }
    }
    let purged_count = client
        .purge_orphans(&arguments.volume, 0)
        .await
        .context("purging orphans left by a previous mount")?;
    if purged_count > 0 {
        tracing::info!(purged_count, "purged orphans left by a previous mount");
    }
    Ok(client)
}

/// Makes the mountpoint exist and returns its absolute path.
fn prepare_mountpoint(mountpoint: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("creating mountpoint {}", mountpoint.display()))?;
    let absolute = mountpoint
        .canonicalize()
        .with_context(|| format!("resolving mountpoint {}", mountpoint.display()))?;
    if !absolute.is_dir() {
        bail!("mountpoint {} is not a directory", absolute.display());
    }
    Ok(absolute)
}

async fn wait_for_termination() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

/// Detaches the mount even while files are open (MNT_DETACH).
fn lazy_unmount(mountpoint: &Path) -> std::io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call; umount2 reads it
    // and touches no other memory of ours.
    let result = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Readahead window for the mount: 4 MiB, so sequential reads arrive as large requests.
const READAHEAD_KIB: u32 = 4096;

/// What the driver sets on the mount's backing device info (`/sys/class/bdi/MAJOR:MINOR`).
struct BackingDeviceTuning {
    readahead_kib: u32,
    /// `max_ratio`: the share (percent) of the kernel's dirty page limit this mount may hold.
    dirty_ratio_percent: u8,
}

/// Sets `read_ahead_kb` and `max_ratio` of the mount's backing device info. Best effort:
/// without them the mount is correct, only slower.
///
/// The mount's device number comes from `/proc/self/mountinfo`, never from a `stat` of the
/// mountpoint: a `stat` goes through FUSE to this very process, and when the session ended
/// before the answer (the driver stopped while its node was down, so the request was still
/// being retried), the stat could never return. A thread stuck in it kept the process from
/// exiting, and the kernel kept the request, waiting for the process: found by
/// `tests/full_state_filesystem.rs`, whose driver hung as a zombie.
fn tune_backing_device(mountpoint: &std::path::Path, tuning: BackingDeviceTuning) {
    // Bounded wait for the mount to appear.
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let Some((major, minor)) = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|mountinfo| fuse_mount_device(&mountinfo, mountpoint))
        else {
            continue;
        };
        let directory = format!("/sys/class/bdi/{major}:{minor}");
        for (file, value) in [
            ("read_ahead_kb", tuning.readahead_kib.to_string()),
            ("max_ratio", tuning.dirty_ratio_percent.to_string()),
        ] {
            let path = format!("{directory}/{file}");
            match std::fs::write(&path, &value) {
                Ok(()) => tracing::info!(%path, %value, "backing device tuned"),
                Err(error) => {
                    tracing::info!(%path, %value, %error, "could not tune the backing device")
                }
            }
        }
        return;
    }
}

/// The device number (major, minor) of the FUSE filesystem mounted at `mountpoint`, from the
/// text of `/proc/self/mountinfo` (fields: id, parent, major:minor, root, mount point, ...,
/// `-`, type, ...; the mount point with spaces, tabs, newlines and backslashes escaped in
/// octal). The last such mount wins: it is the one on top.
fn fuse_mount_device(mountinfo: &str, mountpoint: &std::path::Path) -> Option<(u32, u32)> {
    let wanted = mountpoint.to_str()?;
    let escaped = wanted
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().position(|field| *field == "-")?;
        let filesystem_type = fields.get(separator + 1)?;
        if fields.get(4) != Some(&escaped.as_str()) || !filesystem_type.starts_with("fuse") {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuse_mount_device_is_found_in_mountinfo_without_touching_the_mount() {
        let mountinfo = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
41 22 0:45 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:2 - fuse.ballast ballast:v rw,user_id=0
42 22 0:46 / /tmp/plain rw,relatime shared:3 - ext4 /dev/vdb rw
43 22 0:47 / /tmp/plain rw,relatime shared:4 - fuse.ballast ballast:w rw,user_id=0
";
        let device = |path: &str| fuse_mount_device(mountinfo, std::path::Path::new(path));
        assert_eq!(device("/tmp/a b"), Some((0, 45)));
        assert_eq!(device("/tmp/plain"), Some((0, 47)), "the FUSE mount on top");
        assert_eq!(device("/"), None, "not a FUSE mount");
        assert_eq!(device("/tmp/a"), None);
        assert_eq!(
            fuse_mount_device("garbage\n- -\n", std::path::Path::new("/x")),
            None
        );
    }
}
