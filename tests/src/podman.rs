//! Shared pieces of the tests that build the container image and run it under podman
//! (`image`, `csi_container`): preconditions, running commands with readable failures, the
//! image build, and the podman arguments this machine needs.
//!
//! Owns: nothing a test asserts about; only the plumbing both container tests share.
//! Must not depend on: any Ballast library crate.
//! Invariants: a missing precondition skips a test only outside CI (`CI=true` makes it a
//! failure); podman always runs with `--runtime runc` (crun fails on this VM's hybrid cgroups)
//! and ulimits capped by this process's hard limits.

use std::path::Path;
use std::process::{Command, Output};

use crate::{binary, binary_directory};

use crate::repository_root;

/// Whether root, `tools`, `paths` and the Ballast `binaries` are all here. When something is
/// missing, the test skips (returns false) outside CI and fails in CI.
pub fn preconditions_met(test: &str, tools: &[&str], paths: &[&str], binaries: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_owned());
    }
    for path in paths {
        if !Path::new(path).exists() {
            missing.push((*path).to_owned());
        }
    }
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|output| output.status.success())
            .unwrap_or(false);
        if !found {
            missing.push(format!(
                "{tool} (scripts/install-prerequisites.sh installs it)"
            ));
        }
    }
    for name in binaries {
        if !binary(name).exists() {
            missing.push(format!("binary {}", binary(name).display()));
        }
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} preconditions missing in CI: {}", missing.join(", "));
    }
    eprintln!(
        "SKIPPED: {test} preconditions missing: {}",
        missing.join(", ")
    );
    false
}

/// A command's status and both outputs, for failure messages.
pub fn text(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|error| panic!("running {command:?}: {error}"))
}

/// Runs `command`, which must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    assert!(output.status.success(), "{command:?}: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Builds the image from this build's binaries (`scripts/build-image.sh`); returns its reference.
pub fn build_image() -> String {
    let output = run(Command::new("bash")
        .arg(repository_root().join("scripts/build-image.sh"))
        .env("BALLAST_BIN_DIR", binary_directory()));
    assert!(
        output.status.success(),
        "build-image.sh failed: {}",
        text(&output)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let image = stdout.lines().last().unwrap_or_default().trim().to_owned();
    assert!(
        image.starts_with("localhost/ballast:"),
        "build-image.sh printed no image reference: {}",
        text(&output)
    );
    image
}

/// A limit for podman's --ulimit: the wanted value, capped by this process's hard limit (a
/// container cannot raise it; asking for more fails with EPERM).
fn capped_limit(resource: libc::__rlimit_resource_t, wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return 1024;
    }
    wanted.min(limit.rlim_max)
}

/// `podman run` arguments every container of these tests needs here: the runc runtime, capped
/// ulimits, host networking and the k8s-file log driver.
pub fn podman_run_arguments() -> Vec<String> {
    let nofile = capped_limit(libc::RLIMIT_NOFILE, 65_536);
    let nproc = capped_limit(libc::RLIMIT_NPROC, 8_192);
    vec![
        "run".into(),
        "--runtime".into(),
        "runc".into(),
        "--ulimit".into(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".into(),
        format!("nproc={nproc}:{nproc}"),
        "--network".into(),
        "host".into(),
        "--log-driver".into(),
        "k8s-file".into(),
    ]
}
