//! Harness for the CSI end-to-end tests: a real `ballast-csi` process on a unix socket next to a
//! real `ballast-node`, and a CSI client that speaks to it the way kubelet and the
//! external-provisioner do (gRPC over the socket).
//!
//! Owns: the plugin process lifecycle (start, `kill -9`, restart) and the cleanup of everything a
//! test may leave behind: mounts under the test directory and `ballast-fuse` daemons whose
//! mountpoint is under it (found through `/proc/<pid>/cmdline` and killed by pid).
//! Must not depend on: the plugin's internals. Only the generated CSI wire types of
//! `ballast-csi-plugin` are used, as any CO would use the CSI proto.
//! Invariants: every wait is bounded; cleanup runs on drop, also when a test fails.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ballast_csi_plugin::csi::v1 as csi;
use ballast_csi_plugin::csi::v1::controller_client::ControllerClient;
use ballast_csi_plugin::csi::v1::identity_client::IdentityClient;
use ballast_csi_plugin::csi::v1::node_client::NodeClient;
use ballast_csi_plugin::csi::v1::volume_capability::access_mode::Mode;
use ballast_tests::{binary, wait_until, LocalNode};
use tonic::transport::{Channel, Endpoint};

pub use csi::*;

pub const PLUGIN_BINARY: &str = "ballast-csi";
pub const NODE_ID: &str = "test-node-1";

/// Whether `ballast-csi` is built; like `end_to_end_available`, missing it fails in CI.
pub fn plugin_available() -> bool {
    if binary(PLUGIN_BINARY).exists() {
        return true;
    }
    let message = format!(
        "binary {} (run `cargo build --workspace --bins` first)",
        binary(PLUGIN_BINARY).display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("end-to-end preconditions missing in CI: {message}");
    }
    eprintln!("SKIPPED: end-to-end preconditions missing: {message}");
    false
}

/// A running `ballast-csi --mode all` for one storage node.
pub struct CsiPlugin {
    /// Everything of this plugin lives under here: socket, state, staging and target paths.
    pub root: PathBuf,
    pub socket: PathBuf,
    pub state_directory: PathBuf,
    pub log_path: PathBuf,
    ballast_endpoint: String,
    process: Option<Child>,
    /// `ballast-csi-mounter` owning the daemons, when started with [`CsiPlugin::start_with_mounter`].
    pub mounter: Option<MounterProcess>,
}

/// A `ballast-csi-mounter serve` process on the host, in its own process group.
pub struct MounterProcess {
    pub socket: PathBuf,
    pub state_directory: PathBuf,
    pub log_path: PathBuf,
    mount_root: PathBuf,
    ballast_endpoint: String,
    process: Option<Child>,
}

impl MounterProcess {
    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(binary("ballast-csi-mounter"))
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_directory)
            .arg("--mount-root")
            .arg(&self.mount_root)
            .args(["--ballast-endpoint", &self.ballast_endpoint])
            .arg("--fuse-binary")
            .arg(binary("ballast-fuse"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting ballast-csi-mounter")?;
        self.process = Some(child);
        // A connection, not the file: a killed mounter leaves a stale socket file behind.
        let socket = self.socket.clone();
        if wait_until("the mounter's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .is_err()
        {
            bail!(
                "ballast-csi-mounter did not start; log:\n{}",
                std::fs::read_to_string(&self.log_path).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `kill -9` of the mounter's process group; its daemons run in sessions of their own.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            // SAFETY: kill(2) on the process group our child leads; at worst ESRCH.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        // A killed mounter leaves its socket file; the new one replaces it.
        self.spawn()
    }

    /// `ballast-csi-mounter list` against this mounter: its answer as JSON.
    pub fn list(&self) -> Result<serde_json::Value> {
        let output = Command::new(binary("ballast-csi-mounter"))
            .arg("list")
            .arg("--socket")
            .arg(&self.socket)
            .output()?;
        if !output.status.success() {
            bail!("list: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }
}

impl CsiPlugin {
    /// Starts the plugin for `node` and waits until it answers GetPluginInfo.
    pub fn start(node: &LocalNode) -> Result<Self> {
        let root = node.directory.path().join("csi");
        std::fs::create_dir_all(&root)?;
        let mut plugin = Self {
            socket: root.join("csi.sock"),
            state_directory: root.join("state"),
            log_path: root.join("plugin.log"),
            ballast_endpoint: node.endpoint(),
            root,
            process: None,
            mounter: None,
        };
        plugin.spawn()?;
        Ok(plugin)
    }

    /// Like [`CsiPlugin::start`], with a `ballast-csi-mounter` on the host owning the FUSE
    /// daemons (mount root: this plugin's root).
    pub fn start_with_mounter(node: &LocalNode) -> Result<Self> {
        let root = node.directory.path().join("csi");
        std::fs::create_dir_all(&root)?;
        let mut mounter = MounterProcess {
            socket: root.join("mounter.sock"),
            state_directory: root.join("mounter"),
            log_path: root.join("mounter.log"),
            mount_root: root.clone(),
            ballast_endpoint: node.endpoint(),
            process: None,
        };
        mounter.spawn()?;
        let mut plugin = Self {
            socket: root.join("csi.sock"),
            state_directory: root.join("state"),
            log_path: root.join("plugin.log"),
            ballast_endpoint: node.endpoint(),
            root,
            process: None,
            mounter: Some(mounter),
        };
        plugin.spawn()?;
        Ok(plugin)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(binary(PLUGIN_BINARY))
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--mode", "all", "--node-id", NODE_ID])
            .args(["--ballast-endpoint", &self.ballast_endpoint])
            .arg("--state-dir")
            .arg(&self.state_directory)
            .arg("--fuse-binary")
            .arg(binary("ballast-fuse"))
            .args(
                self.mounter
                    .as_ref()
                    .map(|mounter| vec![format!("--mounter-socket={}", mounter.socket.display())])
                    .unwrap_or_default(),
            )
            .env(
                "RUST_LOG",
                std::env::var("BALLAST_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group, so `kill` can take the whole group down, as a supervisor
            // or a terminal would; the FUSE daemons must not be in it.
            .process_group(0)
            .spawn()
            .context("starting ballast-csi")?;
        self.process = Some(child);
        let client = self.client()?;
        let ready = wait_until("ballast-csi to answer", Duration::from_secs(30), || {
            let mut identity = client.identity();
            client
                .run(identity.get_plugin_info(GetPluginInfoRequest {}))
                .is_ok()
        });
        if ready.is_err() {
            bail!("ballast-csi did not start; log:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// A client on the plugin's socket (reconnects by itself after a plugin restart).
    pub fn client(&self) -> Result<CsiClient> {
        CsiClient::connect(&self.socket)
    }

    /// `kill -9` of the plugin's whole process group. The FUSE daemons it started survive only
    /// because they run in sessions of their own.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            // SAFETY: kill(2) on the process group our child leads (process_group(0) made its
            // pid the group id); at worst ESRCH.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// SIGTERM to the plugin (a clean stop, as kubelet stops a container); waits at most 30 s
    /// for it to exit and returns its exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.process.take() else {
            bail!("the plugin is not running");
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                self.process = Some(child);
                bail!("the plugin did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A fresh path for a staging or target directory under this plugin's root.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl Drop for CsiPlugin {
    fn drop(&mut self) {
        self.kill();
        if let Some(mounter) = &mut self.mounter {
            mounter.kill();
        }
        // Mounts first (deepest first), so the daemons see their session end; then the daemons.
        let mut mountpoints = mountpoints_under(&self.root);
        mountpoints.sort_by_key(|path| std::cmp::Reverse(path.as_os_str().len()));
        for mountpoint in mountpoints {
            detach(&mountpoint);
        }
        for pid in fuse_daemons_under(&self.root) {
            // SAFETY: kill(2) on a ballast-fuse pid whose mountpoint lies in our test directory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Mount points in this process's mount table at or below `root`.
pub fn mountpoints_under(root: &Path) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .filter(|path| path.starts_with(root))
        .collect()
}

/// The mount source and per-mount options at `path`, if something is mounted there.
pub fn mount_at(path: &Path) -> Option<(String, String)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(4).map(Path::new) != Some(path) {
            return None;
        }
        let separator = fields.iter().position(|field| *field == "-")?;
        Some((
            fields.get(separator + 2)?.to_string(),
            fields.get(5)?.to_string(),
        ))
    })
}

fn detach(path: &Path) {
    if let Ok(path) = CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        unsafe {
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Pids of `ballast-fuse` processes whose `--mountpoint` lies under `root`.
pub fn fuse_daemons_under(root: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let arguments: Vec<&[u8]> = cmdline.split(|&byte| byte == 0).collect();
            let is_fuse = arguments
                .first()
                .is_some_and(|program| program.ends_with(b"ballast-fuse"));
            is_fuse
                && arguments.windows(2).any(|pair| {
                    pair[0] == b"--mountpoint"
                        && Path::new(std::ffi::OsStr::from_bytes(pair[1])).starts_with(root)
                })
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_name = &stat[stat.rfind(')')? + 1..];
            after_name
                .split_whitespace()
                .next()
                .map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// A CSI client over the plugin's unix socket, with a private runtime so tests stay synchronous.
pub struct CsiClient {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

impl CsiClient {
    pub fn connect(socket: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Every call is bounded; a hung plugin fails the test instead of hanging it.
        let endpoint = Endpoint::from_shared(format!("unix:{}", socket.display()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120));
        let channel = {
            let _guard = runtime.enter();
            endpoint.connect_lazy()
        };
        Ok(Self { runtime, channel })
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// Runs one call to completion: the answer, or the gRPC status.
    pub fn run<T>(
        &self,
        call: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> std::result::Result<T, tonic::Status> {
        self.runtime.block_on(call).map(tonic::Response::into_inner)
    }

    // --- The calls as kubelet and the external-provisioner make them. ----------------------

    pub fn create_volume(
        &self,
        name: &str,
        required_bytes: i64,
        mode: Mode,
        parameters: &[(&str, &str)],
    ) -> std::result::Result<Volume, tonic::Status> {
        let request = CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(CapacityRange {
                required_bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability(mode)],
            parameters: parameters
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            ..Default::default()
        };
        let response = self.run(self.controller().create_volume(request))?;
        Ok(response.volume.expect("CreateVolumeResponse.volume"))
    }

    pub fn delete_volume(&self, volume_id: &str) -> std::result::Result<(), tonic::Status> {
        self.run(self.controller().delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.to_owned(),
            secrets: HashMap::new(),
        }))
        .map(|_| ())
    }

    pub fn stage(
        &self,
        volume_id: &str,
        staging_path: &Path,
        mode: Mode,
    ) -> std::result::Result<(), tonic::Status> {
        self.run(self.node().node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: staging_path.display().to_string(),
            volume_capability: Some(mount_capability(mode)),
            ..Default::default()
        }))
        .map(|_| ())
    }

    pub fn unstage(
        &self,
        volume_id: &str,
        staging_path: &Path,
    ) -> std::result::Result<(), tonic::Status> {
        self.run(self.node().node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: staging_path.display().to_string(),
        }))
        .map(|_| ())
    }

    pub fn publish(
        &self,
        volume_id: &str,
        staging_path: &Path,
        target_path: &Path,
        mode: Mode,
        readonly: bool,
    ) -> std::result::Result<(), tonic::Status> {
        self.run(self.node().node_publish_volume(NodePublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: staging_path.display().to_string(),
            target_path: target_path.display().to_string(),
            volume_capability: Some(mount_capability(mode)),
            readonly,
            ..Default::default()
        }))
        .map(|_| ())
    }

    pub fn unpublish(
        &self,
        volume_id: &str,
        target_path: &Path,
    ) -> std::result::Result<(), tonic::Status> {
        self.run(
            self.node()
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    target_path: target_path.display().to_string(),
                }),
        )
        .map(|_| ())
    }

    pub fn volume_stats(
        &self,
        volume_id: &str,
        volume_path: &Path,
    ) -> std::result::Result<NodeGetVolumeStatsResponse, tonic::Status> {
        self.run(
            self.node()
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: volume_id.to_owned(),
                    volume_path: volume_path.display().to_string(),
                    staging_target_path: String::new(),
                }),
        )
    }
}

/// A mount-access capability with `mode`.
pub fn mount_capability(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume::default(),
        )),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// Bytes of `unit` in a stats answer: (total, used, available).
pub fn usage_of(stats: &NodeGetVolumeStatsResponse, unit: volume_usage::Unit) -> (i64, i64, i64) {
    let usage = stats
        .usage
        .iter()
        .find(|usage| usage.unit == unit as i32)
        .unwrap_or_else(|| panic!("no {unit:?} usage in {stats:?}"));
    (usage.total, usage.used, usage.available)
}

/// Asserts that `result` failed with `code`.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: std::result::Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got success {value:?}"),
        Err(status) => assert_eq!(
            status.code(),
            code,
            "{what}: wrong code ({})",
            status.message()
        ),
    }
}

/// A pod that appends numbered lines and fsyncs each one, until a stop file appears; prints
/// how many it wrote. Any failed write or fsync ends it with an error.
pub const WRITER_SCRIPT: &str = r#"
import os, sys
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
count = 0
while count < 2_000_000 and not os.path.exists(stop):
    os.write(fd, b"%09d\n" % count)
    os.fsync(fd)
    count += 1
os.close(fd)
print(count)
"#;

/// A process appending and fsyncing numbered lines through a target path.
pub struct Writer {
    child: Child,
    log: PathBuf,
    stop: PathBuf,
}

impl Writer {
    pub fn start(target: &Path, stop: PathBuf) -> Self {
        let log = target.join("writer.log");
        let child = Command::new("python3")
            .args(["-c", WRITER_SCRIPT])
            .arg(&log)
            .arg(&stop)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        Self { child, log, stop }
    }

    pub fn lines(&self) -> usize {
        line_count(&self.log)
    }

    /// Waits until at least `count` more lines than now are written; fails if the writer exits.
    pub fn wait_for_more(&mut self, what: &str, count: usize) {
        let goal = self.lines() + count;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.lines() < goal {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                let _ = self
                    .child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr);
                panic!("{what}: the writer exited ({status}):\n{stderr}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: no progress in 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the writer; checks it never failed and every fsync'd line is in the file, in order.
    pub fn finish(mut self) -> usize {
        File::create(&self.stop).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "writer did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(status.success(), "writer failed: {status}\n{stderr}");
        let written: usize = stdout.trim().parse().unwrap();
        let text = std::fs::read_to_string(&self.log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), written, "every fsync'd line is in the file");
        for (index, line) in lines.iter().enumerate() {
            assert_eq!(*line, format!("{index:09}"), "line {index}");
        }
        written
    }
}

impl Drop for Writer {
    /// Kills a writer still running when a test fails half-way (after `finish` it has exited).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Lines in the file at `path` (0 when it cannot be read).
pub fn line_count(path: &Path) -> usize {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut file| file.read_to_string(&mut text))
        .map(|_| text.lines().count())
        .unwrap_or(0)
}
