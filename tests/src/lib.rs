//! Test harness for end-to-end tests: real `ballast-node` and `ballast-fuse` processes on a
//! file-backed device, a real FUSE mount, `kill -9` and restart.
//!
//! Owns: process lifecycle for tests (start, wait until serving, mount, kill, restart, unmount)
//! and the preconditions check (root, /dev/fuse, built binaries).
//! Must not depend on: any Ballast library crate except `ballast-common`: the tests see the
//! system from outside, as a user does.
//! Invariants: every wait is bounded in time; every process and mount is cleaned up on drop.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod cluster;
pub mod mariadb;
pub mod netns;
pub mod podman;

/// Where `cargo build` put the binaries: the directory above this test executable's `deps/`.
pub fn binary_directory() -> PathBuf {
    if let Ok(directory) = std::env::var("BALLAST_BIN_DIR") {
        return PathBuf::from(directory);
    }
    let executable = std::env::current_exe().expect("test executable path");
    let deps = executable.parent().expect("deps directory");
    deps.parent().expect("profile directory").to_path_buf()
}

/// The checkout these tests run in. Read when the test runs (cargo sets `CARGO_MANIFEST_DIR` for
/// every test process), not baked in when it is compiled: a target directory shared between
/// checkouts (CI's clone and a developer's tree) may serve a test binary built from another
/// checkout, whose compile-time path no longer exists.
pub fn repository_root() -> PathBuf {
    let manifest_directory = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_directory
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    binary_directory().join(name)
}

/// Whether end-to-end tests can run here. In CI (`CI=true`) a missing precondition is a failure,
/// not a skip.
pub fn end_to_end_available() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_owned());
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse".to_owned());
    }
    for name in ["ballast-node", "ballast-fuse", "ballast"] {
        if !binary(name).exists() {
            missing.push(format!(
                "binary {} (run `cargo build --workspace --bins` first)",
                binary(name).display()
            ));
        }
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI")
        .map(|value| value == "true")
        .unwrap_or(false)
    {
        panic!(
            "end-to-end preconditions missing in CI: {}",
            missing.join(", ")
        );
    }
    eprintln!(
        "SKIPPED: end-to-end preconditions missing: {}",
        missing.join(", ")
    );
    false
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Waits until `condition` holds, polling every 20 ms, for at most `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

pub fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = mountpoint.to_string_lossy();
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(&*wanted))
}

fn kill(child: &mut Child, signal: i32) {
    // SAFETY: kill(2) on a pid we own; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

/// One storage node process on a file-backed device, plus FUSE mounts of its volumes.
pub struct LocalNode {
    pub directory: tempfile::TempDir,
    pub device_path: PathBuf,
    pub state_directory: PathBuf,
    pub address: String,
    pub log_path: PathBuf,
    pub node_id: u64,
    /// Extra `ballast-node run` arguments (cluster membership, labels, tuning).
    pub run_arguments: Vec<String>,
    /// The network namespace (`/var/run/netns/<name>`) the node runs in, if not the test's own.
    pub net_namespace: Option<String>,
    /// Extra environment of the node process (failpoints), applied at the next (re)start.
    pub environment: Vec<(String, String)>,
    node: Option<Child>,
    mounts: Vec<Mount>,
}

pub struct Mount {
    pub volume: String,
    pub mountpoint: PathBuf,
    pub log_path: PathBuf,
    net_namespace: Option<String>,
    driver_arguments: Vec<String>,
    process: Option<Child>,
}

/// A command for `program`, run inside the network namespace at `net_namespace` when given
/// (`nsenter --net`: the mount namespace stays the test's, so FUSE mounts stay visible).
fn in_namespace(net_namespace: Option<&str>, program: &Path) -> Command {
    match net_namespace {
        Some(path) => {
            let mut command = Command::new("nsenter");
            command.arg(format!("--net={path}")).arg("--").arg(program);
            command
        }
        None => Command::new(program),
    }
}

impl LocalNode {
    /// Formats a sparse device file of `device_size_bytes` and starts a node on it.
    pub fn start(device_size_bytes: u64) -> Result<Self> {
        Self::start_member(device_size_bytes, 1, Vec::new())
    }

    /// Like [`LocalNode::start`], as node `node_id` with extra `run` arguments (for example
    /// `--join`).
    pub fn start_member(
        device_size_bytes: u64,
        node_id: u64,
        run_arguments: Vec<String>,
    ) -> Result<Self> {
        let address = format!("127.0.0.1:{}", free_port());
        Self::start_member_at(device_size_bytes, node_id, run_arguments, address, None)
    }

    /// Like [`LocalNode::start_member`], listening on `address`, inside the network namespace
    /// `net_namespace` (a path such as `/var/run/netns/x`) when given.
    pub fn start_member_at(
        device_size_bytes: u64,
        node_id: u64,
        run_arguments: Vec<String>,
        address: String,
        net_namespace: Option<String>,
    ) -> Result<Self> {
        let directory = tempfile::Builder::new()
            .prefix("ballast-test-")
            .tempdir_in(test_root())?;
        let device_path = directory.path().join("device.img");
        let file = File::create(&device_path)?;
        // Preallocated like a real device: writes into holes of a sparse file make the
        // filesystem allocate at submission, which pushes every io_uring write to a worker.
        // SAFETY: fallocate(2) on a descriptor owned by `file`.
        let result = unsafe {
            libc::fallocate(
                std::os::unix::io::AsRawFd::as_raw_fd(&file),
                0,
                0,
                device_size_bytes as i64,
            )
        };
        if result != 0 {
            file.set_len(device_size_bytes)?; // A filesystem without fallocate: sparse it is.
        }
        drop(file);
        Self::start_on_device_as(
            directory,
            device_path,
            node_id,
            run_arguments,
            address,
            net_namespace,
        )
    }

    /// Formats `device_path` (a file or a block device such as a loop device) and starts a node
    /// on it; `directory` holds the node's state and logs.
    pub fn start_on_device(directory: tempfile::TempDir, device_path: PathBuf) -> Result<Self> {
        let address = format!("127.0.0.1:{}", free_port());
        Self::start_on_device_as(directory, device_path, 1, Vec::new(), address, None)
    }

    fn start_on_device_as(
        directory: tempfile::TempDir,
        device_path: PathBuf,
        node_id: u64,
        run_arguments: Vec<String>,
        address: String,
        net_namespace: Option<String>,
    ) -> Result<Self> {
        let status = Command::new(binary("ballast-node"))
            .args(["format", "--device"])
            .arg(&device_path)
            .args(["--node-id", &node_id.to_string()])
            .stdout(Stdio::null())
            .status()
            .context("running ballast-node format")?;
        if !status.success() {
            bail!("ballast-node format failed: {status}");
        }
        let mut node = Self {
            state_directory: directory.path().join("state"),
            log_path: directory.path().join("node.log"),
            address,
            directory,
            device_path,
            node_id,
            run_arguments,
            net_namespace,
            environment: Vec::new(),
            node: None,
            mounts: Vec::new(),
        };
        node.start_process()?;
        Ok(node)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Files this test process holds open on the node's own mounts. The node's child process
    /// inherits every descriptor and closes it at `execve` (close-on-exec); a FUSE close
    /// flushes the file and waits for its writeback. When the file has unwritten pages and this
    /// node is the only one serving the mount, that writeback needs the very node being started:
    /// the exec then waits until the old driver's requests time out (seen as a 60-76 s
    /// "restart" in the first version of the posix crash test). Open files are common and
    /// mostly harmless (fsync'd, or a cluster still serving the mount), so they are named, not
    /// refused: a start that takes long says why.
    pub fn files_open_on_mounts(&self) -> Vec<PathBuf> {
        let Ok(descriptors) = std::fs::read_dir("/proc/self/fd") else {
            return Vec::new();
        };
        descriptors
            .flatten()
            .filter_map(|descriptor| std::fs::read_link(descriptor.path()).ok())
            .filter(|target| {
                self.mounts
                    .iter()
                    .any(|mount| target.starts_with(&mount.mountpoint))
            })
            .collect()
    }

    fn start_process(&mut self) -> Result<()> {
        let open_on_mounts = self.files_open_on_mounts();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = in_namespace(self.net_namespace.as_deref(), &binary("ballast-node"))
            .arg("run")
            .arg("--device")
            .arg(&self.device_path)
            .arg("--state-dir")
            .arg(&self.state_directory)
            .args(["--listen", &self.address])
            .args(&self.run_arguments)
            .envs(self.environment.iter().map(|(name, value)| (name, value)))
            .env(
                "RUST_LOG",
                std::env::var("BALLAST_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting ballast-node")?;
        let mut child = child;
        let stdout = child.stdout.take().expect("piped stdout");
        self.node = Some(child);
        // The node prints one line when it serves.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        match receiver.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.contains("serving on") => Ok(()),
            Ok(line) => bail!(
                "node did not start (printed {line:?}); log:\n{}",
                self.log_tail()
            ),
            Err(_) => bail!(
                "node did not start within 120 s (this process held {} file(s) open on the \
                 node's mounts when it spawned the node, first {:?}: their flush at exec waits \
                 for writeback that may need this node); log:\n{}",
                open_on_mounts.len(),
                open_on_mounts.first(),
                self.log_tail()
            ),
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs the `ballast` CLI against this node.
    pub fn cli(&self, arguments: &[&str]) -> Result<String> {
        run_cli(&self.endpoint(), arguments)
    }

    pub fn create_volume(&self, name: &str, quota: &str) -> Result<()> {
        self.cli(&["volume", "create", name, "--quota", quota])
            .map(|_| ())
    }

    /// Mounts a volume with the FUSE driver and waits until the mount is live.
    pub fn mount(&mut self, volume: &str) -> Result<PathBuf> {
        let endpoint = self.endpoint();
        self.mount_via(volume, &endpoint)
    }

    /// Mounts a volume through `endpoints` (several nodes of a cluster, comma-separated).
    pub fn mount_via(&mut self, volume: &str, endpoints: &str) -> Result<PathBuf> {
        self.mount_with(volume, endpoints, None, &[], "")
    }

    /// Mounts a volume at `mnt-<volume><suffix>` through `endpoints`, with the driver in the
    /// network namespace `net_namespace` (when given) and extra driver arguments.
    pub fn mount_with(
        &mut self,
        volume: &str,
        endpoints: &str,
        net_namespace: Option<&str>,
        driver_arguments: &[&str],
        suffix: &str,
    ) -> Result<PathBuf> {
        let mountpoint = self.directory.path().join(format!("mnt-{volume}{suffix}"));
        std::fs::create_dir_all(&mountpoint)?;
        let log_path = self
            .directory
            .path()
            .join(format!("fuse-{volume}{suffix}.log"));
        let mut mount = Mount {
            volume: volume.to_owned(),
            mountpoint: mountpoint.clone(),
            log_path,
            net_namespace: net_namespace.map(str::to_owned),
            driver_arguments: driver_arguments.iter().map(|a| a.to_string()).collect(),
            process: None,
        };
        mount.start(endpoints)?;
        self.mounts.push(mount);
        Ok(mountpoint)
    }

    /// SIGKILLs the node (mounts stay; their requests fail until the node is back).
    pub fn kill_node(&mut self) {
        if let Some(mut child) = self.node.take() {
            kill(&mut child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Stops the node with SIGTERM (a clean shutdown), bounded.
    pub fn stop_node(&mut self) -> Result<()> {
        if let Some(mut child) = self.node.take() {
            kill(&mut child, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    kill(&mut child, libc::SIGKILL);
                    let _ = child.wait();
                    bail!("node did not stop within 60 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn restart_node(&mut self) -> Result<()> {
        self.start_process()
    }

    /// Sends `signal` to the node process (for SIGSTOP/SIGCONT pauses).
    pub fn signal(&mut self, signal: i32) {
        if let Some(child) = self.node.as_mut() {
            kill(child, signal);
        }
    }

    /// Whether the node process is running (not killed or stopped by the test).
    pub fn is_running(&self) -> bool {
        self.node.is_some()
    }

    /// Unmounts and remounts every volume (after a node restart the old driver keeps working
    /// too, since it reconnects; remounting is what a pod restart does).
    pub fn remount_all(&mut self) -> Result<()> {
        let endpoint = self.endpoint();
        for mount in &mut self.mounts {
            mount.stop();
            mount.start(&endpoint)?;
        }
        Ok(())
    }

    /// Unmounts (and stops the driver of) the mount at `mountpoint`.
    pub fn unmount(&mut self, mountpoint: &Path) {
        if let Some(index) = self.mounts.iter().position(|m| m.mountpoint == mountpoint) {
            let mut mount = self.mounts.remove(index);
            mount.stop();
        }
    }

    pub fn unmount_all(&mut self) {
        for mount in &mut self.mounts {
            mount.stop();
        }
        self.mounts.clear();
    }
}

impl Mount {
    fn start(&mut self, endpoint: &str) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = in_namespace(self.net_namespace.as_deref(), &binary("ballast-fuse"))
            .args(["--node", endpoint, "--volume", &self.volume, "--mountpoint"])
            .arg(&self.mountpoint)
            .args(&self.driver_arguments)
            .env(
                "RUST_LOG",
                std::env::var("BALLAST_TEST_FUSE_LOG")
                    .unwrap_or_else(|_| "warn,ballast_client=debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ballast-fuse")?;
        self.process = Some(child);
        let mountpoint = self.mountpoint.clone();
        let result = wait_until("the FUSE mount", Duration::from_secs(30), || {
            is_mounted(&mountpoint)
        });
        if result.is_err() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            bail!("mount of {} failed; driver log:\n{log}", self.volume);
        }
        Ok(())
    }

    fn stop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .status();
        }
        if let Some(mut child) = self.process.take() {
            kill(&mut child, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill(&mut child, libc::SIGKILL);
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.unmount_all();
        self.kill_node();
    }
}

/// Creates (or truncates) `path`, writes `data` and fsyncs it; panics with the path on failure.
pub fn write_fsync(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut file = File::create(path).unwrap_or_else(|error| panic!("create {path:?}: {error}"));
    file.write_all(data)
        .unwrap_or_else(|error| panic!("write {path:?}: {error}"));
    file.sync_all()
        .unwrap_or_else(|error| panic!("fsync {path:?}: {error}"));
}

/// Reads a whole file after dropping its cached pages, so the bytes come from the storage
/// (through the FUSE driver), not from this machine's page cache.
pub fn read_uncached(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = File::open(path)?;
    // SAFETY: posix_fadvise on a descriptor we own; it only drops cached pages.
    unsafe {
        libc::posix_fadvise(
            std::os::unix::io::AsRawFd::as_raw_fd(&file),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        );
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(data)
}

/// SplitMix64: a tiny deterministic generator for randomised tests (the logged seed is what
/// makes a run replayable).
#[derive(Debug, Clone)]
pub struct Generator(pub u64);

impl Generator {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut value = self.0;
        value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        value ^ (value >> 31)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }

    pub fn bytes(&mut self, length: usize) -> Vec<u8> {
        let mut output = Vec::with_capacity(length + 8);
        while output.len() < length {
            output.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        output.truncate(length);
        output
    }
}

/// Runs the `ballast` CLI against `endpoints` (comma-separated) and returns its stdout.
pub fn run_cli(endpoints: &str, arguments: &[&str]) -> Result<String> {
    let output = Command::new(binary("ballast"))
        .args(["--node", endpoints])
        .args(arguments)
        .output()
        .context("running ballast")?;
    if !output.status.success() {
        bail!(
            "ballast {arguments:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Where test directories go: `BALLAST_TEST_DIR` or the system temp directory.
pub fn test_root() -> PathBuf {
    std::env::var("BALLAST_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
}

/// The seed for a randomized test: `BALLAST_SEED` to replay, otherwise from the clock. Always
/// printed, so any failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("BALLAST_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {seed} (replay with BALLAST_SEED={seed})");
    seed
}
