//! A storage node on a real block device: a loop device over a file, formatted and served
//! through the same io_uring/O_DIRECT path as a raw NVMe device (size from BLKGETSIZE64).

use std::fs;
use std::process::Command;

use ballast_tests::{end_to_end_available, test_root, LocalNode};

/// Detaches the loop device even when the test fails.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn node_serves_a_loop_device() {
    if !end_to_end_available() {
        return;
    }
    let directory = tempfile::Builder::new()
        .prefix("ballast-loop-")
        .tempdir_in(test_root())
        .unwrap();
    let backing = directory.path().join("backing.img");
    fs::File::create(&backing)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let output = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let loop_device = LoopDevice(String::from_utf8(output.stdout).unwrap().trim().to_owned());
    let mut node = LocalNode::start_on_device(directory, loop_device.0.clone().into()).unwrap();
    node.create_volume("on-loop", "128MiB").unwrap();
    let mount = node.mount("on-loop").unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(mount.join("data"), &payload).unwrap();
    fs::File::open(mount.join("data"))
        .unwrap()
        .sync_all()
        .unwrap();
    node.kill_node();
    node.restart_node().unwrap();
    node.remount_all().unwrap();
    assert_eq!(
        fs::read(mount.join("data")).unwrap(),
        payload,
        "data on the loop device survives kill -9"
    );
    let status = node.cli(&["status"]).unwrap();
    assert!(
        status.contains(&loop_device.0),
        "status names the block device:\n{status}"
    );
    node.unmount_all();
    node.kill_node();
}
