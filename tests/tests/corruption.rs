//! Flipped bits on the device are detected: the read fails with EIO instead of returning wrong
//! bytes, and the node logs the checksum mismatch.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};

use ballast_tests::{end_to_end_available, LocalNode};

#[test]
fn flipped_bit_is_an_error_not_wrong_bytes() {
    if !end_to_end_available() {
        return;
    }
    let mut node = LocalNode::start(256 << 20).unwrap();
    node.create_volume("corrupt", "64MiB").unwrap();
    let mount = node.mount("corrupt").unwrap();
    // A recognisable 64 KiB pattern.
    let marker: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(mount.join("victim"), &marker).unwrap();
    fs::write(mount.join("bystander"), b"unharmed").unwrap();
    fs::File::open(mount.join("victim"))
        .unwrap()
        .sync_all()
        .unwrap();
    node.unmount_all();
    node.stop_node().unwrap(); // clean stop: checkpoint, data in the block store

    // Find the last copy of the pattern (the block store lies after the log region) and flip
    // one bit in its middle.
    let mut image = fs::File::options()
        .read(true)
        .write(true)
        .open(&node.device_path)
        .unwrap();
    let mut bytes = Vec::new();
    image.read_to_end(&mut bytes).unwrap();
    let needle = &marker[..4096];
    let position = bytes
        .windows(needle.len())
        .rposition(|window| window == needle)
        .expect("the written data is on the device");
    let target = position + 1000;
    image.seek(SeekFrom::Start(target as u64)).unwrap();
    image.write_all(&[bytes[target] ^ 0x10]).unwrap();
    image.sync_all().unwrap();
    drop(bytes);

    node.restart_node().unwrap();
    let mount = node.mount("corrupt").unwrap();
    let error = fs::read(mount.join("victim")).expect_err("a corrupt block must not be served");
    assert_eq!(
        error.raw_os_error(),
        Some(libc::EIO),
        "corruption reads as EIO: {error}"
    );
    assert_eq!(
        fs::read(mount.join("bystander")).unwrap(),
        b"unharmed",
        "other files still readable"
    );
    let log = node.log_contents();
    assert!(
        log.contains("checksum mismatch"),
        "the node logs the corruption; log:\n{}",
        node.log_tail()
    );
    let status = node.cli(&["status"]).unwrap();
    assert!(
        status.to_lowercase().contains("checksum"),
        "status reports checksum errors:\n{status}"
    );
}
