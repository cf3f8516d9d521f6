//! `ballast local up|down`: a local Ballast cluster on this machine (3 nodes by default, each its
//! own process with its own device file), for development and demos.
//!
//! Owns: the layout of the local directory and the supervision of the node and FUSE processes.
//! Must not depend on: server code. It runs the sibling binaries `ballast-node` and
//! `ballast-fuse` found next to the running `ballast` executable.
//! Layout (all under `--dir`, made absolute first), for every node i:
//!   node<i>/device.img  sparse device file       node<i>/state/   node state directory
//!   node<i>/node.log    node stdout and stderr   node<i>/node.pid node process id
//!   join-secret         the cluster's join secret (random, made once)
//!   mnt/<volume>/       mountpoint               mnt-<volume>.log, fuse-<volume>.pid
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
/// Most nodes a local cluster runs (each is a process with its own device file).
const NODE_COUNT_MAX: u32 = 7;
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
        /// Address node 1 serves gRPC on; node i listens on the next port i-1 above it.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
        /// Storage nodes to run, each its own process with its own device file.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
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
            nodes,
        } => {
            let settings = Settings {
                device_size_bytes: device_size,
                volume,
                quota_bytes: quota,
                listen,
                node_count: nodes,
            };
            up(&absolute(&dir)?, &settings).await
        }
        LocalCommand::Down { dir } => down(&absolute(&dir)?).await,
    }
}

/// What `local up` was asked for.
struct Settings {
    device_size_bytes: u64,
    volume: String,
    quota_bytes: u64,
    listen: String,
    node_count: u32,
}

/// Paths of the local layout: `<dir>/node<i>/` per node, mounts under `<dir>/mnt/`.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn node_dir(&self, node_id: u32) -> PathBuf {
        self.dir.join(format!("node{node_id}"))
    }

    fn device(&self, node_id: u32) -> PathBuf {
        self.node_dir(node_id).join("device.img")
    }

    fn state_dir(&self, node_id: u32) -> PathBuf {
        self.node_dir(node_id).join("state")
    }

    fn node_log(&self, node_id: u32) -> PathBuf {
        self.node_dir(node_id).join("node.log")
    }

    fn node_pid(&self, node_id: u32) -> PathBuf {
        self.node_dir(node_id).join("node.pid")
    }

    /// The cluster's join secret, made once per local setup.
    fn join_secret(&self) -> PathBuf {
        self.dir.join("join-secret")
    }

    /// Node ids with a directory in the layout (for `down`).
    fn node_ids(&self) -> Vec<u32> {
        (1..=NODE_COUNT_MAX)
            .filter(|node_id| self.node_dir(*node_id).exists())
            .collect()
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

/// The listen address of node `node_id`: node 1 at `listen`, the others on the following ports.
fn node_listen(listen: &str, node_id: u32) -> anyhow::Result<String> {
    let address: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?}"))?;
    let port = u32::from(address.port()) + node_id - 1;
    let port = u16::try_from(port).with_context(|| format!("port {port} of node {node_id}"))?;
    Ok(std::net::SocketAddr::new(address.ip(), port).to_string())
}

/// Reads the join secret, creating a random one the first time.
fn join_secret(layout: &Layout) -> anyhow::Result<String> {
    let path = layout.join_secret();
    if let Ok(secret) = std::fs::read_to_string(&path) {
        return Ok(secret.trim().to_owned());
    }
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom for the join secret")?;
    let secret: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(&path, format!("{secret}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))
}

async fn up(dir: &Path, settings: &Settings) -> anyhow::Result<()> {
    let volume = settings.volume.as_str();
    ballast_common::validate_volume_name(volume)
        .with_context(|| format!("invalid volume name {volume:?}"))?;
    if settings.node_count == 0 || settings.node_count > NODE_COUNT_MAX {
        bail!("--nodes must be between 1 and {NODE_COUNT_MAX}");
    }
    let layout = Layout::new(dir);
    let node_binary = sibling_binary(NODE_BINARY)?;
    let fuse_binary = sibling_binary(FUSE_BINARY)?;
    let mountpoint = layout.mountpoint(volume);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let secret = join_secret(&layout)?;
    let mut endpoints = Vec::new();
    for node_id in 1..=settings.node_count {
        endpoints.push(format!(
            "http://{}",
            node_listen(&settings.listen, node_id)?
        ));
    }
    let all_endpoints = endpoints.join(",");

    // 1. Devices: created and formatted once each.
    for node_id in 1..=settings.node_count {
        std::fs::create_dir_all(layout.node_dir(node_id))
            .with_context(|| format!("creating {}", layout.node_dir(node_id).display()))?;
        let device = layout.device(node_id);
        if !device.exists() {
            create_sparse_file(&device, settings.device_size_bytes)?;
            if let Err(error) = format_device(&node_binary, &device, node_id) {
                // Without this, the next run would take the unformatted image for a formatted one.
                let _ = std::fs::remove_file(&device);
                return Err(error);
            }
            println!(
                "formatted {} device {} as node {node_id}",
                format_size(settings.device_size_bytes),
                device.display()
            );
        }
    }

    // 2. Nodes: node 1 founds the cluster, the others join it. Only missing ones are started,
    // so running `up` again restarts a node that was stopped or killed.
    for node_id in 1..=settings.node_count {
        let endpoint = &endpoints[node_id as usize - 1];
        let pid_file = layout.node_pid(node_id);
        let running = match read_pid(&pid_file) {
            Some(pid) if process_alive(pid) => ready_client(endpoint).await.is_some(),
            _ => false,
        };
        if running {
            println!("node {node_id} already running at {endpoint}");
            continue;
        }
        remove_stale_pid_file(&pid_file);
        std::fs::create_dir_all(layout.state_dir(node_id))
            .with_context(|| format!("creating {}", layout.state_dir(node_id).display()))?;
        let mut node = Command::new(&node_binary);
        node.arg("run")
            .arg("--device")
            .arg(layout.device(node_id))
            .arg("--state-dir")
            .arg(layout.state_dir(node_id))
            .arg("--listen")
            .arg(node_listen(&settings.listen, node_id)?)
            .arg("--label")
            .arg(format!("zone=local-{node_id}"))
            .env("BALLAST_JOIN_SECRET", &secret);
        if node_id > 1 {
            node.arg("--join").arg(&endpoints[0]);
        }
        let mut child = spawn_detached(node, &layout.node_log(node_id), &pid_file)?;
        println!(
            "started node {node_id} (pid {}), waiting for it to answer at {endpoint}",
            child.id()
        );
        wait_for_node(&mut child, endpoint, &layout.node_log(node_id)).await?;
    }
    let client = connect(&all_endpoints).await?;
    wait_for_members(&client, settings.node_count).await?;

    // 3. Volume (replicated on every node, up to 3).
    match client.get_volume(volume).await {
        Ok(_) => println!("volume {volume} exists"),
        Err(error) if error.is_not_found() => {
            let created = client
                .create_volume(volume, settings.quota_bytes, 0, 0)
                .await
                .with_context(|| format!("creating volume {volume:?}"))?;
            println!(
                "created volume {volume} (quota {}, {} replicas on nodes {:?})",
                format_size(settings.quota_bytes),
                created.replication_factor,
                created.replica_node_ids
            );
        }
        Err(error) => return Err(error).with_context(|| format!("looking up volume {volume:?}")),
    }

    // 4. Mount, through every node: the driver follows the leader and survives a node's death.
    if is_mounted(&mountpoint)? {
        println!("{} already mounted", mountpoint.display());
    } else {
        let fuse_pid = layout.fuse_pid(volume);
        remove_stale_pid_file(&fuse_pid);
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("creating mountpoint {}", mountpoint.display()))?;
        let mut fuse = Command::new(&fuse_binary);
        fuse.arg("--node")
            .arg(&all_endpoints)
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
    print_summary(
        &layout,
        settings.node_count,
        &all_endpoints,
        volume,
        &mountpoint,
    );
    Ok(())
}

/// Waits (bounded) until the cluster map lists `node_count` nodes.
async fn wait_for_members(client: &BallastClient, node_count: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(NODE_READY_TIMEOUT_MS);
    loop {
        let listed = client
            .list_nodes()
            .await
            .map(|nodes| nodes.len())
            .unwrap_or(0);
        if listed >= node_count as usize {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("only {listed} of {node_count} nodes joined within {NODE_READY_TIMEOUT_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

fn print_summary(
    layout: &Layout,
    node_count: u32,
    endpoints: &str,
    volume: &str,
    mountpoint: &Path,
) {
    for node_id in 1..=node_count {
        println!(
            "  node {node_id}     log {}, device {}",
            layout.node_log(node_id).display(),
            layout.device(node_id).display()
        );
    }
    println!("  volume     {volume} mounted at {}", mountpoint.display());
    println!("  fuse log   {}", layout.fuse_log(volume).display());
    println!("  try        ballast --node {endpoints} node list");
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

    // Nodes.
    for node_id in layout.node_ids() {
        let pid_file = layout.node_pid(node_id);
        match read_pid(&pid_file) {
            Some(pid) if process_alive(pid) => {
                stop_process(pid, NODE_BINARY).await;
                println!("stopped node {node_id} (pid {pid})");
            }
            Some(_) => println!("node {node_id} was not running"),
            None => println!("no pid file for node {node_id}"),
        }
        let _ = std::fs::remove_file(&pid_file);
    }
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

fn format_device(node_binary: &Path, device: &Path, node_id: u32) -> anyhow::Result<()> {
    let mut child = Command::new(node_binary)
        .arg("format")
        .arg("--device")
        .arg(device)
        .arg("--node-id")
        .arg(node_id.to_string())
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
            failover_window_ms: 0,
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
        assert_eq!(layout.device(1), PathBuf::from("/tmp/b/node1/device.img"));
        assert_eq!(layout.node_pid(3), PathBuf::from("/tmp/b/node3/node.pid"));
        assert_eq!(node_listen("127.0.0.1:7400", 3).unwrap(), "127.0.0.1:7402");
        assert!(node_listen("127.0.0.1:65535", 2).is_err());
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
