//! The container image, really built and started: `scripts/build-image.sh` makes it with
//! mmdebstrap and podman from Debian's packages (no registry, no Docker engine), then this test
//! runs it the way the Helm chart does: `ballast-node-prepare` formats a file-backed device in one
//! container (the chart's init container), `ballast-node run` serves it in another, and the
//! host's `ballast` CLI talks to it over host networking. It checks that a restart keeps the data
//! (the device is not formatted twice), that a non-Ballast device is never formatted, and that
//! the FUSE driver mounts a volume inside the image.
//!
//! Runs podman with `--runtime runc` (crun fails on this VM's hybrid cgroups) and explicit
//! ulimits; seccomp is unconfined because the default profile refuses io_uring (ENOSYS), as the
//! chart's storage node does. Every container is named and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ballast_tests::podman::{build_image, podman_run_arguments, preconditions_met, run, text};
use ballast_tests::{binary, binary_directory, free_port, test_root, wait_until};

/// Whether the image can be built and run here; in CI a missing precondition is a failure.
fn image_tools_available() -> bool {
    preconditions_met(
        "image test",
        &["podman", "runc", "mmdebstrap"],
        &[],
        &["ballast-node", "ballast-fuse", "ballast"],
    )
}

/// podman arguments shared by every container of this test: seccomp is unconfined because the
/// default profile refuses io_uring (ENOSYS), as the chart's storage node does.
fn storage_run_arguments() -> Vec<String> {
    let mut arguments = podman_run_arguments();
    arguments.extend(["--security-opt".into(), "seccomp=unconfined".into()]);
    arguments
}

/// A named container, removed (forcibly) when dropped.
struct Container {
    name: String,
}

impl Container {
    fn logs(&self) -> String {
        let output = run(Command::new("podman").args(["logs", &self.name]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    fn is_running(&self) -> bool {
        let output = run(Command::new("podman").args([
            "inspect",
            "--format",
            "{{.State.Running}}",
            &self.name,
        ]));
        String::from_utf8_lossy(&output.stdout).trim() == "true"
    }

    /// SIGTERM, then up to 60 s for a clean shutdown.
    fn stop(&self) -> String {
        let output = run(Command::new("podman").args(["stop", "--time", "60", &self.name]));
        assert!(output.status.success(), "podman stop: {}", text(&output));
        self.logs()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--time", "10", &self.name])
            .output();
    }
}

/// The image test's fixture: a host directory standing for the chart's hostPath
/// (/var/lib/ballast) and one for its emptyDir (/run/ballast).
struct NodeFixture {
    image: String,
    directory: tempfile::TempDir,
    port: u16,
    serial: u32,
}

impl NodeFixture {
    fn host_path(&self) -> PathBuf {
        self.directory.path().join("var-lib-ballast")
    }

    fn run_path(&self) -> PathBuf {
        self.directory.path().join("run-ballast")
    }

    fn volume_arguments(&self) -> Vec<String> {
        vec![
            "--volume".into(),
            format!("{}:/var/lib/ballast", self.host_path().display()),
            "--volume".into(),
            format!("{}:/run/ballast", self.run_path().display()),
        ]
    }

    /// The chart's init container: `ballast-node-prepare` with the chart's environment.
    fn prepare(&self, extra_environment: &[&str]) -> Output {
        let mut command = Command::new("podman");
        command
            .args(storage_run_arguments())
            .arg("--rm")
            .args(self.volume_arguments())
            .args(["--env", "BALLAST_NODE_NAME=image-test-node"])
            .args(["--env", "BALLAST_DEVICE_TYPE=file"])
            .args(["--env", "BALLAST_DEVICE_PATH=/var/lib/ballast/device.img"])
            .args(["--env", "BALLAST_DEVICE_SIZE=1GiB"]);
        for variable in extra_environment {
            command.args(["--env", variable]);
        }
        run(command.arg(&self.image).arg("ballast-node-prepare"))
    }

    /// The chart's node container, detached; waits until the host CLI gets a status.
    fn start_node(&mut self) -> Container {
        self.serial += 1;
        let container = Container {
            name: format!("ballast-image-test-{}-{}", std::process::id(), self.serial),
        };
        let script = format!(
            "exec ballast-node run --device \"$(cat /run/ballast/device)\" \
             --state-dir /var/lib/ballast/state --listen 127.0.0.1:{}",
            self.port
        );
        let output = run(Command::new("podman")
            .args(storage_run_arguments())
            .args(["--detach", "--name", &container.name])
            .args(self.volume_arguments())
            .arg(&self.image)
            .args(["sh", "-c", &script]));
        assert!(output.status.success(), "podman run: {}", text(&output));
        let mut exited = false;
        let served = wait_until(
            "the node in the container",
            Duration::from_secs(120),
            || {
                if !container.is_running() {
                    exited = true;
                    return true;
                }
                self.cli(&["status"]).status.success()
            },
        );
        assert!(
            served.is_ok() && !exited,
            "the node in the image did not serve (exited: {exited}); logs:\n{}",
            container.logs()
        );
        container
    }

    fn cli(&self, arguments: &[&str]) -> Output {
        run(Command::new(binary("ballast"))
            .args(["--node", &format!("http://127.0.0.1:{}", self.port)])
            .args(arguments))
    }

    fn cli_ok(&self, arguments: &[&str]) -> String {
        let output = self.cli(arguments);
        assert!(
            output.status.success(),
            "ballast {arguments:?}: {}",
            text(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

#[test]
fn image_builds_and_serves_a_storage_node() {
    if !image_tools_available() {
        return;
    }
    let image = build_image();

    // Every ballast* binary of the build is in the image, and each one starts (its shared
    // libraries resolve inside the image).
    let mut expected: Vec<String> = std::fs::read_dir(binary_directory())
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let is_file = entry.file_type().ok()?.is_file();
            (name.starts_with("ballast") && !name.contains('.') && is_file).then_some(name)
        })
        .collect();
    expected.sort();
    let script = format!(
        "set -e; ls /usr/local/bin; for b in {}; do \"$b\" --version; done; \
         command -v fusermount3; test -x /usr/local/bin/ballast-node-prepare",
        ["ballast-node", "ballast-fuse", "ballast"].join(" ")
    );
    let output = run(Command::new("podman")
        .args(storage_run_arguments())
        .arg("--rm")
        .arg(&image)
        .args(["sh", "-c", &script]));
    assert!(
        output.status.success(),
        "binaries in the image: {}",
        text(&output)
    );
    let listing = String::from_utf8_lossy(&output.stdout);
    for name in &expected {
        assert!(
            listing.lines().any(|line| line == name),
            "{name} from {} is missing in the image:\n{listing}",
            binary_directory().display()
        );
    }

    let directory = tempfile::Builder::new()
        .prefix("ballast-image-")
        .tempdir_in(test_root())
        .unwrap();
    let mut fixture = NodeFixture {
        image,
        directory,
        port: free_port(),
        serial: 0,
    };
    std::fs::create_dir_all(fixture.host_path()).unwrap();
    std::fs::create_dir_all(fixture.run_path()).unwrap();

    // First start: the device file is created and formatted.
    let prepared = fixture.prepare(&[]);
    assert!(prepared.status.success(), "prepare: {}", text(&prepared));
    let prepare_log = String::from_utf8_lossy(&prepared.stderr);
    assert!(
        prepare_log.contains("is blank; formatting"),
        "{prepare_log}"
    );
    assert_eq!(
        std::fs::metadata(fixture.host_path().join("device.img"))
            .unwrap()
            .len(),
        1 << 30
    );

    let node = fixture.start_node();
    let status = fixture.cli_ok(&["status"]);
    assert!(
        status.contains("/var/lib/ballast/device.img"),
        "status names the device inside the container:\n{status}"
    );
    fixture.cli_ok(&["volume", "create", "from-image", "--quota", "64MiB"]);

    // The FUSE driver works inside the image too (the CSI node plugin's path): mount the
    // volume in a second container with /dev/fuse, write, read back, unmount.
    if Path::new("/dev/fuse").exists() {
        let script = format!(
            "set -e; ballast-fuse --node http://127.0.0.1:{} --volume from-image \
             --mountpoint /mnt/v & driver=$!; \
             for i in $(seq 300); do grep -q ' /mnt/v ' /proc/self/mountinfo && break; sleep 0.1; done; \
             echo written-inside-the-image > /mnt/v/probe; sync /mnt/v/probe; cat /mnt/v/probe; \
             kill $driver; wait $driver",
            fixture.port
        );
        let output = run(Command::new("podman")
            .args(storage_run_arguments())
            .args(["--rm", "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN"])
            .arg(&fixture.image)
            .args(["bash", "-c", &script]));
        assert!(
            output.status.success(),
            "FUSE in the image: {}",
            text(&output)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("written-inside-the-image"));
    }

    let logs = node.stop();
    assert!(
        logs.contains("stopped cleanly"),
        "SIGTERM stops the node cleanly:\n{logs}"
    );
    drop(node);

    // Second start: the superblock is found, nothing is formatted, the volume is still there.
    let prepared = fixture.prepare(&[]);
    assert!(
        prepared.status.success(),
        "prepare again: {}",
        text(&prepared)
    );
    let prepare_log = String::from_utf8_lossy(&prepared.stderr);
    assert!(
        prepare_log.contains("already holds a Ballast superblock")
            && !prepare_log.contains("formatting as node"),
        "a formatted device is never formatted again:\n{prepare_log}"
    );
    let node = fixture.start_node();
    let volumes = fixture.cli_ok(&["volume", "list"]);
    assert!(
        volumes.contains("from-image"),
        "the volume survives the restart:\n{volumes}"
    );
    node.stop();
    drop(node);

    // A device that holds something else (here: bytes at 1 KiB, where ext4 keeps its
    // superblock) is refused, and left as it was.
    let foreign = fixture.host_path().join("device.img");
    std::fs::remove_file(&foreign).unwrap();
    let file = std::fs::File::create(&foreign).unwrap();
    file.set_len(1 << 30).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"NOT-BALLAST", 1024).unwrap();
    drop(file);
    let first_mebibyte = |path: &Path| {
        let mut bytes = vec![0u8; 1 << 20];
        std::io::Read::read_exact(&mut std::fs::File::open(path).unwrap(), &mut bytes).unwrap();
        bytes
    };
    let before = first_mebibyte(&foreign);
    let refused = fixture.prepare(&[]);
    assert!(
        !refused.status.success(),
        "prepare must refuse a foreign device: {}",
        text(&refused)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refusing to format"));
    assert_eq!(
        first_mebibyte(&foreign),
        before,
        "a refused device is untouched"
    );
    // Unless the operator says so.
    let forced = fixture.prepare(&["BALLAST_FORMAT_NONEMPTY=true"]);
    assert!(forced.status.success(), "formatNonEmpty: {}", text(&forced));
}
