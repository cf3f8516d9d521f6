//! `ballast local up|down`: a single-node Ballast on this machine, for development and demos.
//!
//! Owns: the layout of the local directory and the supervision of the node and FUSE processes.
//! Must not depend on: server code. It runs the sibling binaries `ballast-node` and
//! `ballast-fuse` found next to the running `ballast` executable.
//! Layout (all under `--dir`, made absolute first):
//!   node1/device.img  sparse device file       node1/state/   node state directory
//!   node1/node.log    node stdout and stderr   node1/node.pid node process id
//!   mnt/<volume>/     mountpoint               mnt-<volume>.log, fuse-<volume>.pid
//! Invariants: children run in their own session (setsid), so they survive this command and a
//! Ctrl-C in its terminal; every wait is bounded; pid files are removed only once the process
//! is gone.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ballast_client::{BallastClient, ClientOptions, RetryPolicy};
use clap::Subcommand;

use crate::size::{format_size, parse_size_bytes};

const NODE_BINARY: &str = "ballast-node";
const FUSE_BINARY: &str = "ballast-fuse";
const NODE_ID: u64 = 1;
const NODE_READY_TIMEOUT_MS: u64 = 60_000;
const MOUNT_READY_TIMEOUT_MS: u64 = 30_000;
const FORMAT_TIMEOUT_MS: u64 = 300_000;
const PROCESS_EXIT_TIMEOUT_MS: u64 = 30_000;
const UNMOUNT_TIMEOUT_MS: u64 = 10_000;
const POLL_INTERVAL_MS: u64 = 200;
/// Lines of a child's log shown when it fails to start.
const LOG_TAIL_LINE_COUNT: usize = 20;

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Format (first time), start the node, create the volume and mount it.
    Up {
        /// Directory holding the device, state, logs and mountpoints.
        #[arg(long, default_value = ".ballast")]
        dir: PathBuf,
        /// Size of the sparse device file created on first use.
        #[arg(long, default_value = "4GiB", value_parser = parse_size_bytes)]
        device_size: u64,
        /// Volume to create (if missing) and mount.
        #[arg(long, default_value = "demo")]
        volume: String,
        /// Quota of the volume when it is created.
        #[arg(long, default_value = "1GiB", value_parser = parse_size_bytes)]
        quota: u64,
        /// Address the node serves gRPC on.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
    },
    /// Unmount every volume under the directory and stop the node.
    Down {
        /// Directory given to `ballast local up`.
        #[arg(long, default_value = ".ballast")]
        dir: PathBuf,
    },
}

pub async fn run(command: LocalCommand) -> anyhow::Result<()> {
    match command {
        LocalCommand::Up {
            dir,
            device_size,
            volume,
            quota,
            listen,
        } => up(&absolute(&dir)?, device_size, &volume, quota, &listen).await,
        LocalCommand::Down { dir } => down(&absolute(&dir)?).await,
    }
}

/// Paths of the local layout.
struct Layout {
    dir: PathBuf,
    node_dir: PathBuf,
    device: PathBuf,
    state_dir: PathBuf,
    node_log: PathBuf,
    node_pid: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        let node_dir = dir.join("node1");
        Self {
            dir: dir.to_path_buf(),
            device: node_dir.join("device.img"),
            state_dir: node_dir.join("state"),
            node_log: node_dir.join("node.log"),
            node_pid: node_dir.join("node.pid"),
            node_dir,
        }
    }

    fn mountpoint(&self, volume: &str) -> PathBuf {
        self.dir.join("mnt").join(volume)
    }

    fn fuse_log(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("mnt-{volume}.log"))
    }

    fn fuse_pid(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("fuse-{volume}.pid"))
    }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))
}

async fn up(
    dir: &Path,
    device_size_bytes: u64,
    volume: &str,
    quota_bytes: u64,
    listen: &str,
) -> anyhow::Result<()> {
    ballast_common::validate_volume_name(volume)
        .with_context(|| format!("invalid volume name {volume:?}"))?;
    let layout = Layout::new(dir);
    let endpoint = format!("http://{listen}");
    let node_binary = sibling_binary(NODE_BINARY)?;
    let fuse_binary = sibling_binary(FUSE_BINARY)?;
    let mountpoint = layout.mountpoint(volume);

    // Already running? Then only what is missing is started.
    let node_running = match read_pid(&layout.node_pid) {
        Some(pid) if process_alive(pid) => ready_client(&endpoint).await.is_some(),
        _ => false,
    };
    let mounted = is_mounted(&mountpoint)?;
    if node_running && mounted {
        println!("Ballast is already running in {}:", dir.display());
        print_summary(&layout, &endpoint, volume, &mountpoint);
        return Ok(());
    }

    std::fs::create_dir_all(&layout.node_dir)
        .with_context(|| format!("creating {}", layout.node_dir.display()))?;

    // 1. Device: created and formatted once.
    if !layout.device.exists() {
        create_sparse_file(&layout.device, device_size_bytes)?;
        println!(
            "created {} device {}",
            format_size(device_size_bytes),
            layout.device.display()
        );
        if let Err(error) = format_device(&node_binary, &layout) {
            // Without this, the next run would take the unformatted image for a formatted one.
            let _ = std::fs::remove_file(&layout.device);
            return Err(error);
        }
        println!("formatted {} as node {NODE_ID}", layout.device.display());
    }

    // 2. Node.
    let client = if node_running {
        println!("node already running at {endpoint}");
        connect(&endpoint).await?
    } else {
        remove_stale_pid_file(&layout.node_pid);
        std::fs::create_dir_all(&layout.state_dir)
            .with_context(|| format!("creating {}", layout.state_dir.display()))?;
        let mut node = Command::new(&node_binary);
        node.arg("run")
            .arg("--device")
            .arg(&layout.device)
            .arg("--state-dir")
            .arg(&layout.state_dir)
            .arg("--listen")
            .arg(listen);
        let mut child = spawn_detached(node, &layout.node_log, &layout.node_pid)?;
        println!(
            "started node (pid {}), waiting for it to answer at {endpoint}",
            child.id()
        );
        wait_for_node(&mut child, &endpoint, &layout.node_log).await?
    };

    // 3. Volume.
    match client.get_volume(volume).await {
        Ok(_) => println!("volume {volume} exists"),
        Err(error) if error.is_not_found() => {
            client
                .create_volume(volume, quota_bytes, 1, 1)
                .await
                .with_context(|| format!("creating volume {volume:?}"))?;
            println!(
                "created volume {volume} (quota {})",
                format_size(quota_bytes)
            );
        }
        Err(error) => return Err(error).with_context(|| format!("looking up volume {volume:?}")),
    }

    // 4. Mount.
    if mounted {
        println!("{} already mounted", mountpoint.display());
    } else {
        let fuse_pid = layout.fuse_pid(volume);
        remove_stale_pid_file(&fuse_pid);
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("creating mountpoint {}", mountpoint.display()))?;
        let mut fuse = Command::new(&fuse_binary);
        fuse.arg("--node")
            .arg(&endpoint)
            .arg("--volume")
            .arg(volume)
            .arg("--mountpoint")
            .arg(&mountpoint);
        let fuse_log = layout.fuse_log(volume);
        let mut child = spawn_detached(fuse, &fuse_log, &fuse_pid)?;
        println!(
            "started FUSE driver (pid {}), waiting for {}",
            child.id(),
            mountpoint.display()
        );
        wait_for_mount(&mut child, &mountpoint, &fuse_log).await?;
    }

    // 5. Summary.
    println!();
    println!("Ballast is running in {}:", dir.display());
    print_summary(&layout, &endpoint, volume, &mountpoint);
    Ok(())
}

fn print_summary(layout: &Layout, endpoint: &str, volume: &str, mountpoint: &Path) {
    println!(
        "  node       {endpoint} (log {})",
        layout.node_log.display()
    );
    println!("  device     {}", layout.device.display());
    println!("  volume     {volume} mounted at {}", mountpoint.display());
    println!("  fuse log   {}", layout.fuse_log(volume).display());
    println!("  try        ballast --node {endpoint} status");
    println!(
        "  stop with  ballast local down --dir {}",
        layout.dir.display()
    );
}

async fn down(dir: &Path) -> anyhow::Result<()> {
    let layout = Layout::new(dir);
    if !dir.exists() {
        println!("nothing to stop: {} does not exist", dir.display());
        return Ok(());
    }

    // Mounts: those we started (pid files) and any other Ballast mount under <dir>/mnt.
    let mut volumes: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let file_name = entry?.file_name();
        let file_name = file_name.to_string_lossy();
        if let Some(volume) = file_name
            .strip_prefix("fuse-")
            .and_then(|rest| rest.strip_suffix(".pid"))
        {
            volumes.push(volume.to_owned());
        }
    }
    for volume in &volumes {
        let mountpoint = layout.mountpoint(volume);
        let pid_file = layout.fuse_pid(volume);
        if let Some(pid) = read_pid(&pid_file) {
            if process_alive(pid) {
                send_signal(pid, libc::SIGTERM);
                // The driver unmounts itself on SIGTERM; give it a bounded time to do so.
                wait_until(UNMOUNT_TIMEOUT_MS, || !process_alive(pid)).await;
            }
        }
        if is_mounted(&mountpoint)? {
            force_unmount(&mountpoint)?;
        }
        if let Some(pid) = read_pid(&pid_file) {
            stop_process(pid, FUSE_BINARY).await;
        }
        let _ = std::fs::remove_file(&pid_file);
        println!("unmounted {}", mountpoint.display());
    }
    let mount_root = dir.join("mnt");
    for mountpoint in ballast_mounts_under(&mount_root)? {
        force_unmount(&mountpoint)?;
        println!("unmounted {}", mountpoint.display());
    }

    // Node.
    match read_pid(&layout.node_pid) {
        Some(pid) if process_alive(pid) => {
            stop_process(pid, NODE_BINARY).await;
            println!("stopped node (pid {pid})");
        }
        Some(_) => println!("node was not running"),
        None => println!("no node pid file in {}", layout.node_dir.display()),
    }
    let _ = std::fs::remove_file(&layout.node_pid);
    Ok(())
}

/// The binary `name` in the directory of the running executable.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let executable = std::env::current_exe().context("locating the ballast executable")?;
    let directory = executable
        .parent()
        .context("the ballast executable has no directory")?;
    let path = directory.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found at {} (it must sit next to {}; build all binaries with \
             `cargo build -p ballast-storage-node -p ballast-fuse-driver -p ballast-cli`)",
            path.display(),
            executable.display()
        );
    }
    Ok(path)
}

fn create_sparse_file(path: &Path, size_bytes: u64) -> anyhow::Result<()> {
    if size_bytes == 0 {
        bail!("the device size must be above zero");
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // set_len extends without writing, so the file takes no space until the node writes.
    file.set_len(size_bytes)
        .with_context(|| format!("sizing {}", path.display()))?;
    Ok(())
}

fn format_device(node_binary: &Path, layout: &Layout) -> anyhow::Result<()> {
    let mut child = Command::new(node_binary)
        .arg("format")
        .arg("--device")
        .arg(&layout.device)
        .arg("--node-id")
        .arg(NODE_ID.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", node_binary.display()))?;
    let deadline = Instant::now() + Duration::from_millis(FORMAT_TIMEOUT_MS);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the format")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{NODE_BINARY} format did not finish within {FORMAT_TIMEOUT_MS} ms");
        }
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    };
    if !status.success() {
        let mut output = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut output);
        }
        if let Some(mut stdout) = child.stdout.take() {
            let _ = stdout.read_to_string(&mut output);
        }
        bail!(
            "{NODE_BINARY} format failed ({status}):\n{}",
            output.trim_end()
        );
    }
    Ok(())
}

/// Starts `command` in its own session with stdin closed and stdout+stderr appended to `log`,
/// and records its pid in `pid_file`.
fn spawn_detached(mut command: Command, log: &Path, pid_file: &Path) -> anyhow::Result<Child> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let log_file_for_stderr = log_file
        .try_clone()
        .with_context(|| format!("duplicating log {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_file_for_stderr);
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed; setsid is one, and the closure allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))?;
    std::fs::write(pid_file, format!("{}\n", child.id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    Ok(child)
}

/// A client for `endpoint` if the node answers Status right now.
async fn ready_client(endpoint: &str) -> Option<BallastClient> {
    let options = ClientOptions {
        connect_timeout_ms: 1_000,
        request_timeout_ms: 2_000,
        retry: RetryPolicy {
            attempt_count_max: 1,
            ..RetryPolicy::default()
        },
    };
    let client = BallastClient::connect_with_options(endpoint, options)
        .await
        .ok()?;
    client.status().await.ok()?;
    Some(client)
}

async fn connect(endpoint: &str) -> anyhow::Result<BallastClient> {
    BallastClient::connect_with_options(endpoint, ClientOptions::default())
        .await
        .with_context(|| format!("connecting to {endpoint}"))
}

async fn wait_for_node(
    child: &mut Child,
    endpoint: &str,
    log: &Path,
) -> anyhow::Result<BallastClient> {
    let deadline = Instant::now() + Duration::from_millis(NODE_READY_TIMEOUT_MS);
    loop {
        if let Some(status) = child.try_wait().context("checking the node process")? {
            bail!(
                "{NODE_BINARY} exited ({status}) before answering; {}",
                log_tail(log)
            );
        }
        if ready_client(endpoint).await.is_some() {
            // A client with the normal timeouts and retries for what follows.
            return connect(endpoint).await;
        }
        if Instant::now() >= deadline {
            bail!(
                "{NODE_BINARY} (pid {}) did not answer at {endpoint} within {NODE_READY_TIMEOUT_MS} \
                 ms; it is still running, stop it with `ballast local down`; {}",
                child.id(),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

async fn wait_for_mount(child: &mut Child, mountpoint: &Path, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(MOUNT_READY_TIMEOUT_MS);
    loop {
        if is_mounted(mountpoint)? {
            return Ok(());
        }
        if let Some(status) = child
            .try_wait()
            .context("checking the FUSE driver process")?
        {
            bail!(
                "{FUSE_BINARY} exited ({status}) before mounting; {}",
                log_tail(log)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not mounted within {MOUNT_READY_TIMEOUT_MS} ms; {}",
                mountpoint.display(),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// The last lines of a log, for error messages.
fn log_tail(log: &Path) -> String {
    let Ok(mut file) = File::open(log) else {
        return format!("no log at {}", log.display());
    };
    let mut text = String::new();
    if file.read_to_string(&mut text).is_err() {
        return format!("log at {} is unreadable", log.display());
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINE_COUNT)..].join("\n");
    format!("last lines of {}:\n{tail}", log.display())
}

fn read_pid(pid_file: &Path) -> Option<libc::pid_t> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    text.trim()
        .parse()
        .ok()
        .filter(|pid: &libc::pid_t| *pid > 0)
}

fn remove_stale_pid_file(pid_file: &Path) {
    if read_pid(pid_file).is_some_and(|pid| !process_alive(pid)) {
        let _ = std::fs::remove_file(pid_file);
    }
}

fn process_alive(pid: libc::pid_t) -> bool {
    // Reap it first if it is our own exited child, so a zombie does not count as alive.
    let mut wait_status = 0;
    // SAFETY: waitpid with WNOHANG only inspects the process table and writes `wait_status`,
    // a valid local; on a pid that is not our child it fails harmlessly with ECHILD.
    unsafe { libc::waitpid(pid, &mut wait_status, libc::WNOHANG) };
    // SAFETY: signal 0 performs only the existence and permission check; nothing is delivered.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn send_signal(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill has no memory effects in this process; pid comes from a pid file we wrote
    // and is checked to be positive, so it never addresses a process group.
    unsafe { libc::kill(pid, signal) };
}

/// Polls `done` every POLL_INTERVAL_MS until it holds or `timeout_ms` passes; returns whether
/// it held.
async fn wait_until(timeout_ms: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// SIGTERM, a bounded wait, then SIGKILL with a warning.
async fn stop_process(pid: libc::pid_t, name: &str) {
    if !process_alive(pid) {
        return;
    }
    send_signal(pid, libc::SIGTERM);
    if wait_until(PROCESS_EXIT_TIMEOUT_MS, || !process_alive(pid)).await {
        return;
    }
    eprintln!(
        "warning: {name} (pid {pid}) did not exit within {PROCESS_EXIT_TIMEOUT_MS} ms of SIGTERM; \
         killing it"
    );
    send_signal(pid, libc::SIGKILL);
    wait_until(PROCESS_EXIT_TIMEOUT_MS, || !process_alive(pid)).await;
}

/// Unmounts with fusermount3, then umount, then a lazy umount as the last resort.
fn force_unmount(mountpoint: &Path) -> anyhow::Result<()> {
    let attempts: [(&str, &[&str]); 3] = [
        ("fusermount3", &["-u"]),
        ("umount", &[]),
        ("umount", &["-l"]),
    ];
    for (program, flags) in attempts {
        let _ = Command::new(program)
            .args(flags)
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !is_mounted(mountpoint)? {
            return Ok(());
        }
    }
    bail!("could not unmount {}", mountpoint.display())
}

/// Mount points and sources listed in /proc/self/mountinfo.
fn mounts() -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(mountinfo.lines().filter_map(parse_mountinfo_line).collect())
}

/// The mount point and mount source of one mountinfo line.
fn parse_mountinfo_line(line: &str) -> Option<(PathBuf, String)> {
    let fields: Vec<&str> = line.split(' ').collect();
    let mount_point = unescape_mountinfo(fields.get(4)?);
    // The filesystem type and then the source follow the "-" that ends the optional fields.
    let separator = fields.iter().position(|field| *field == "-")?;
    let source = unescape_mountinfo(fields.get(separator + 2)?);
    Some((PathBuf::from(mount_point), source))
}

/// Undoes the octal escapes (\040 for space, \011, \012, \134) of mountinfo paths.
fn unescape_mountinfo(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut output = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && index + 3 < bytes.len() {
            let digits = &bytes[index + 1..index + 4];
            let octal = digits.iter().all(|digit| (b'0'..=b'7').contains(digit));
            let value = std::str::from_utf8(digits)
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok());
            if let (true, Some(value)) = (octal, value) {
                output.push(value);
                index += 4;
                continue;
            }
        }
        output.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&output).into_owned()
}

fn is_mounted(mountpoint: &Path) -> anyhow::Result<bool> {
    Ok(mounts()?
        .iter()
        .any(|(mount_point, _)| mount_point == mountpoint))
}

/// Ballast FUSE mounts at or below `root`, recognised by their source "ballast:<volume>" (the
/// filesystem type is plain "fuse" when the driver mounts directly as root).
fn ballast_mounts_under(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .filter(|(mount_point, source)| {
            source.starts_with("ballast:") && mount_point.starts_with(root)
        })
        .map(|(mount_point, _)| mount_point)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let line = "36 35 0:40 / /work/.ballast/mnt/my\\040demo rw,nosuid shared:1 - fuse.ballast \
                    ballast:demo rw,user_id=0";
        let (mount_point, source) = parse_mountinfo_line(line).unwrap();
        assert_eq!(mount_point, PathBuf::from("/work/.ballast/mnt/my demo"));
        assert_eq!(source, "ballast:demo");
        let line = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw";
        assert_eq!(parse_mountinfo_line(line).unwrap().1, "/dev/sda1");
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn unescapes_only_octal_escapes() {
        assert_eq!(unescape_mountinfo("a\\134b"), "a\\b");
        assert_eq!(unescape_mountinfo("tail\\04"), "tail\\04");
        assert_eq!(unescape_mountinfo("x\\9zz"), "x\\9zz");
    }

    #[test]
    fn layout_paths() {
        let layout = Layout::new(Path::new("/tmp/b"));
        assert_eq!(layout.device, PathBuf::from("/tmp/b/node1/device.img"));
        assert_eq!(layout.mountpoint("demo"), PathBuf::from("/tmp/b/mnt/demo"));
        assert_eq!(
            layout.fuse_pid("demo"),
            PathBuf::from("/tmp/b/fuse-demo.pid")
        );
        assert_eq!(
            layout.fuse_log("demo"),
            PathBuf::from("/tmp/b/mnt-demo.log")
        );
    }

    #[test]
    fn pid_files() {
        let dir = std::env::temp_dir().join(format!("ballast-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("x.pid");
        std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
        let pid = read_pid(&pid_file).unwrap();
        assert!(process_alive(pid));
        std::fs::write(&pid_file, "-3").unwrap();
        assert_eq!(read_pid(&pid_file), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
