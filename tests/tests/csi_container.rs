//! The node plugin's restart at container level: `ballast-csi` and `ballast-csi-mounter` run from
//! the real image in two separate podman containers, the way the chart runs them in two pods.
//! They share a "kubelet" directory bind-mounted with shared (rshared) propagation, the host side
//! of the chart's Bidirectional hostPath, and the mounter's socket directory. A storage node runs
//! on the host. The test publishes a volume through the plugin's CSI socket like kubelet,
//! starts a writer on the host that appends and fsyncs through the pod's target path, and then
//! stops, starts, kills and starts the *plugin container* (the container runtime kills every
//! process in it). The writer must never fail and every line must read back; after the restarts
//! the new plugin answers kubelet's repeated stage/publish idempotently and tears everything down.
//!
//! A second test shows what still breaks, on purpose: restarting the *mounter* container ends its
//! FUSE daemons; the volume condition says so (naming the mounter's view), and a repeated
//! NodeStage and NodePublish (what kubelet does when the pod is restarted) bring the volume back
//! with its data.
//!
//! Runs podman with `--runtime runc` and explicit ulimits (crun fails on this VM's hybrid
//! cgroups), both containers privileged as in the chart (mounts with Bidirectional propagation
//! require it). Skips only when root, podman, runc, mmdebstrap, python3 or /dev/fuse are missing,
//! and fails instead in CI (`CI=true`).

mod csi_support;

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ballast_csi_plugin::csi::v1::volume_capability::access_mode::Mode;
use ballast_tests::podman::{build_image, podman_run_arguments, preconditions_met, run, run_ok};
use ballast_tests::{test_root, wait_until, LocalNode};
use csi_support::*;

const DEVICE_SIZE_BYTES: u64 = 2 << 30;
const MIB: i64 = 1 << 20;

/// Whether containers can be built and run here; in CI a missing precondition is a failure.
fn container_tools_available() -> bool {
    preconditions_met(
        "container test",
        &["podman", "runc", "mmdebstrap", "python3"],
        &["/dev/fuse"],
        &[
            "ballast-node",
            "ballast-fuse",
            "ballast",
            "ballast-csi",
            "ballast-csi-mounter",
        ],
    )
}

/// A detached, privileged container from the image, removed (forcibly) when dropped.
struct Container {
    name: String,
}

impl Container {
    fn start(name: String, image: &str, volumes: &[(&Path, &str)], command: &[String]) -> Self {
        let mut podman = Command::new("podman");
        podman
            .args(podman_run_arguments())
            .args(["--detach", "--name", &name, "--privileged"])
            .args(["--env", "RUST_LOG=info"]);
        for (host_path, options) in volumes {
            let path = host_path.display();
            podman.args(["--volume", &format!("{path}:{path}{options}")]);
        }
        let container = Container { name };
        run_ok(podman.arg(image).args(command));
        container
    }

    fn logs(&self) -> String {
        let output = run(Command::new("podman").args(["logs", &self.name]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    fn id(&self) -> String {
        run_ok(Command::new("podman").args(["inspect", "--format", "{{.Id}}", &self.name]))
            .trim()
            .to_owned()
    }

    fn podman(&self, verb: &[&str]) {
        run_ok(Command::new("podman").args(verb).arg(&self.name));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--time", "5", &self.name])
            .output();
    }
}

fn detach(path: &Path) {
    if let Ok(path) = CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        unsafe {
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// The test's directories; on drop, every mount and daemon under them goes, then the shared
/// bind of the kubelet directory.
struct Directories {
    root: tempfile::TempDir,
}

impl Directories {
    fn kubelet(&self) -> PathBuf {
        self.root.path().join("kubelet")
    }
    fn csi_socket_directory(&self) -> PathBuf {
        self.root.path().join("csi")
    }
    fn plugin_state(&self) -> PathBuf {
        self.root.path().join("plugin-state")
    }
    fn mounter_directory(&self) -> PathBuf {
        self.root.path().join("mounter")
    }
    fn mounter_socket(&self) -> PathBuf {
        self.mounter_directory().join("mounter.sock")
    }
}

impl Drop for Directories {
    fn drop(&mut self) {
        let mut mountpoints = mountpoints_under(&self.kubelet());
        mountpoints.sort_by_key(|path| std::cmp::Reverse(path.as_os_str().len()));
        for mountpoint in mountpoints {
            detach(&mountpoint);
        }
        for pid in fuse_daemons_under(&self.kubelet()) {
            // SAFETY: kill(2) on a ballast-fuse pid whose mountpoint lies in our test directory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A storage node on the host, the mounter and the plugin in containers, a CSI client.
/// Field order is drop order: client, plugin, mounter, mounts, storage node.
struct Fixture {
    csi: CsiClient,
    plugin: Container,
    mounter: Container,
    directories: Directories,
    /// Kept alive (and stopped last) for the fixture's lifetime.
    _storage_node: LocalNode,
}

fn setup(test: &str) -> Option<Fixture> {
    if !container_tools_available() {
        return None;
    }
    // Built once per test binary: the two tests must not run build-image.sh concurrently.
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let image = IMAGE.get_or_init(build_image).clone();
    let node = LocalNode::start(DEVICE_SIZE_BYTES).expect("start storage node");
    let root = tempfile::Builder::new()
        .prefix("ballast-csi-container-")
        .tempdir_in(test_root())
        .unwrap();
    let directories = Directories { root };
    for directory in [
        directories.kubelet(),
        directories.csi_socket_directory(),
        directories.plugin_state(),
        directories.mounter_directory(),
    ] {
        fs::create_dir_all(&directory).unwrap();
    }
    // The kubelet directory must be a shared mount point for rshared binds (on a real node,
    // /var/lib/kubelet is, since systemd makes / shared).
    let kubelet = directories.kubelet();
    run_ok(
        Command::new("mount")
            .arg("--bind")
            .arg(&kubelet)
            .arg(&kubelet),
    );
    run_ok(Command::new("mount").arg("--make-rshared").arg(&kubelet));
    let serial = format!("{}-{test}", std::process::id());
    let mounter = start_mounter(&image, &directories, &node, &serial);
    let plugin = start_plugin(&image, &directories, &node, &serial);
    let csi = CsiClient::connect(&directories.csi_socket_directory().join("csi.sock")).unwrap();
    wait_for_plugin(&csi, &plugin);
    Some(Fixture {
        csi,
        plugin,
        mounter,
        directories,
        _storage_node: node,
    })
}

fn start_mounter(
    image: &str,
    directories: &Directories,
    node: &LocalNode,
    serial: &str,
) -> Container {
    let kubelet = directories.kubelet();
    let mounter_directory = directories.mounter_directory();
    let command: Vec<String> = vec![
        "ballast-csi-mounter".into(),
        "serve".into(),
        format!("--socket={}", directories.mounter_socket().display()),
        format!("--state-dir={}", mounter_directory.display()),
        format!("--mount-root={}", kubelet.display()),
        format!("--ballast-endpoint={}", node.endpoint()),
        "--fuse-binary=/usr/local/bin/ballast-fuse".into(),
    ];
    let container = Container::start(
        format!("ballast-csi-mounter-{serial}"),
        image,
        &[(&kubelet, ":rshared"), (&mounter_directory, "")],
        &command,
    );
    let socket = directories.mounter_socket();
    let up = wait_until("the mounter's socket", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    assert!(up.is_ok(), "mounter did not start:\n{}", container.logs());
    container
}

fn start_plugin(
    image: &str,
    directories: &Directories,
    node: &LocalNode,
    serial: &str,
) -> Container {
    let kubelet = directories.kubelet();
    let csi_directory = directories.csi_socket_directory();
    let plugin_state = directories.plugin_state();
    let mounter_directory = directories.mounter_directory();
    let command: Vec<String> = vec![
        "ballast-csi".into(),
        format!("--endpoint=unix://{}/csi.sock", csi_directory.display()),
        "--mode=all".into(),
        format!("--node-id={NODE_ID}"),
        format!("--ballast-endpoint={}", node.endpoint()),
        format!("--state-dir={}", plugin_state.display()),
        format!(
            "--mounter-socket={}",
            directories.mounter_socket().display()
        ),
    ];
    Container::start(
        format!("ballast-csi-plugin-{serial}"),
        image,
        &[
            (&kubelet, ":rshared"),
            (&csi_directory, ""),
            (&plugin_state, ""),
            (&mounter_directory, ""),
        ],
        &command,
    )
}

fn wait_for_plugin(csi: &CsiClient, plugin: &Container) {
    let ready = wait_until("the plugin to answer", Duration::from_secs(60), || {
        csi.run(csi.identity().get_plugin_info(GetPluginInfoRequest {}))
            .is_ok()
    });
    assert!(ready.is_ok(), "plugin did not answer:\n{}", plugin.logs());
}

/// Mount points strictly below `root` (not the shared bind of `root` itself).
fn mounts_below(root: &Path) -> Vec<PathBuf> {
    mountpoints_under(root)
        .into_iter()
        .filter(|path| path != root)
        .collect()
}

/// The container (by full id) whose cgroup holds process `pid`.
fn cgroup_of(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

#[test]
fn plugin_container_restarts_do_not_break_a_writing_pod() {
    let Some(mut fixture) = setup("plugin") else {
        return;
    };
    let kubelet = fixture.directories.kubelet();
    let name = "pvc-container-restart";
    let mode = Mode::SingleNodeWriter;
    let staging = kubelet.join("plugins/kubernetes.io/csi/csi.ballast.io/staging/globalmount");
    let target = kubelet.join("pods/pod-1/volumes/kubernetes.io~csi/data/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    {
        let csi = &fixture.csi;
        csi.create_volume(name, 256 * MIB, mode, &[]).unwrap();
        csi.stage(name, &staging, mode).unwrap();
        csi.publish(name, &staging, &target, mode, false).unwrap();
    }
    // The host (kubelet, the pods) sees both mounts.
    let source = |path: &Path| mount_at(path).map(|(source, _)| source);
    assert_eq!(
        source(&staging).as_deref(),
        Some("ballast:pvc-container-restart")
    );
    assert_eq!(
        source(&target).as_deref(),
        Some("ballast:pvc-container-restart")
    );
    // One daemon, and it lives in the mounter's container, not the plugin's.
    let daemons = fuse_daemons_under(&kubelet);
    assert_eq!(daemons.len(), 1, "one FUSE daemon: {daemons:?}");
    let daemon_cgroup = cgroup_of(daemons[0]);
    assert!(
        daemon_cgroup.contains(&fixture.mounter.id()),
        "the daemon runs in the mounter's container: {daemon_cgroup}"
    );
    assert!(!daemon_cgroup.contains(&fixture.plugin.id()));

    let mut writer = Writer::start(&target, fixture.directories.root.path().join("stop-writer"));
    writer.wait_for_more("the writer to start", 50);

    // 1. A clean stop of the plugin container (SIGTERM, then the runtime ends everything in its
    //    cgroup), as kubelet does when it restarts a container. The pod keeps writing while no
    //    plugin runs at all.
    fixture.plugin.podman(&["stop", "--time", "10"]);
    let lines_at_stop = writer.lines();
    writer.wait_for_more("writes with the plugin container stopped", 100);
    assert!(
        process_alive(daemons[0]),
        "the FUSE daemon outlived the plugin container"
    );
    fixture.plugin.podman(&["start"]);
    fixture.csi =
        CsiClient::connect(&fixture.directories.csi_socket_directory().join("csi.sock")).unwrap();
    wait_for_plugin(&fixture.csi, &fixture.plugin);
    writer.wait_for_more("writes after the first restart", 100);

    // 2. SIGKILL of the plugin container (a crash or an OOM kill), then a start.
    fixture.plugin.podman(&["kill", "--signal", "KILL"]);
    writer.wait_for_more("writes with the plugin container killed", 100);
    fixture.plugin.podman(&["start"]);
    fixture.csi =
        CsiClient::connect(&fixture.directories.csi_socket_directory().join("csi.sock")).unwrap();
    wait_for_plugin(&fixture.csi, &fixture.plugin);
    let lines_after_restarts = writer.lines();

    // kubelet repeats stage and publish for running pods: both are no-ops on the live mounts.
    let csi = &fixture.csi;
    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    assert_eq!(
        fuse_daemons_under(&kubelet),
        daemons,
        "the same daemon serves; nothing was remounted"
    );
    let condition = csi
        .volume_stats(name, &target)
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(!condition.abnormal, "{}", condition.message);
    writer.wait_for_more("writes after the restarts", 100);
    let written = writer.finish();
    eprintln!(
        "writer: {written} fsync'd appends; {lines_at_stop} when the plugin container was \
         stopped, {lines_after_restarts} after it was stopped, started, killed and started"
    );

    // The restarted plugin tears everything down through the mounter.
    csi.unpublish(name, &target).unwrap();
    csi.unstage(name, &staging).unwrap();
    assert_eq!(mounts_below(&kubelet), Vec::<PathBuf>::new());
    wait_until("the daemon to exit", Duration::from_secs(30), || {
        !process_alive(daemons[0])
    })
    .unwrap();
    let listing = run_ok(
        Command::new("podman")
            .args(["exec", &fixture.mounter.name, "ballast-csi-mounter", "list"])
            .arg(format!(
                "--socket={}",
                fixture.directories.mounter_socket().display()
            )),
    );
    assert_eq!(listing.trim(), "[]", "the mounter owns nothing any more");
    csi.delete_volume(name).unwrap();
}

/// What still breaks: the mounter's container owns the daemons, so restarting it ends them.
/// The plugin reports it, and kubelet's repeated stage and publish (a pod restart) recover.
#[test]
fn mounter_container_restart_is_reported_and_recovered_by_restaging() {
    let Some(fixture) = setup("mounter") else {
        return;
    };
    let kubelet = fixture.directories.kubelet();
    let name = "pvc-mounter-restart";
    let mode = Mode::SingleNodeWriter;
    let staging = kubelet.join("plugins/kubernetes.io/csi/csi.ballast.io/staging2/globalmount");
    let target = kubelet.join("pods/pod-2/volumes/kubernetes.io~csi/data/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    let csi = &fixture.csi;
    csi.create_volume(name, 64 * MIB, mode, &[]).unwrap();
    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    let contents = b"written before the mounter restarted".to_vec();
    {
        let mut file = File::create(target.join("kept")).unwrap();
        std::io::Write::write_all(&mut file, &contents).unwrap();
        file.sync_all().unwrap();
    }
    let daemons = fuse_daemons_under(&kubelet);
    assert_eq!(daemons.len(), 1);

    fixture.mounter.podman(&["restart", "--time", "10"]);
    wait_until(
        "the daemon to die with its container",
        Duration::from_secs(30),
        || !process_alive(daemons[0]),
    )
    .unwrap();
    let socket = fixture.directories.mounter_socket();
    wait_until("the mounter's socket", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .unwrap();
    let condition = csi
        .volume_stats(name, &target)
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(
        condition.abnormal,
        "a dead daemon is abnormal: {}",
        condition.message
    );
    assert!(
        condition.message.contains("has exited"),
        "the condition carries the mounter's view: {}",
        condition.message
    );

    // A pod restart: kubelet stages and publishes again; both replace the dead mounts.
    csi.stage(name, &staging, mode).unwrap();
    csi.publish(name, &staging, &target, mode, false).unwrap();
    let new_daemons = fuse_daemons_under(&kubelet);
    assert_eq!(new_daemons.len(), 1);
    assert_ne!(new_daemons, daemons);
    assert!(cgroup_of(new_daemons[0]).contains(&fixture.mounter.id()));
    assert_eq!(fs::read(target.join("kept")).unwrap(), contents);
    let condition = csi
        .volume_stats(name, &target)
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(!condition.abnormal, "{}", condition.message);

    csi.unpublish(name, &target).unwrap();
    csi.unstage(name, &staging).unwrap();
    assert_eq!(mounts_below(&kubelet), Vec::<PathBuf>::new());
    csi.delete_volume(name).unwrap();
}
