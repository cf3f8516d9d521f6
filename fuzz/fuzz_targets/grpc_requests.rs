//! Fuzzes what a storage node does first with bytes from the network: prost decoding of every
//! `ballast_proto::v1` request message (and every response message, which clients decode), and
//! the name validators every name passes before it reaches a state machine
//! (`ballast_common::validate_entry_name` / `validate_volume_name`), on arbitrary UTF-8 and on
//! the names inside decoded requests.
//!
//! Must hold, for any bytes:
//! - decoding never panics; a decoded message re-encodes to bytes that decode to an equal
//!   message;
//! - the validators never panic, and accept exactly what their documentation says: an entry name
//!   is 1..=255 bytes, not `.` or `..`, without `/` or NUL; a volume name is 1..=63 bytes of
//!   `[a-z0-9-]` not starting or ending with `-` (so it is also a valid entry name).

#![no_main]

use std::fmt::Debug;

use ballast_common::{validate_entry_name, validate_volume_name};
use ballast_proto::v1::*;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Decodes `bytes` as `M`; if that works, checks the round trip and returns the message.
fn check_message<M>(bytes: &[u8]) -> Option<M>
where
    M: Message + Default + PartialEq + Debug,
{
    let message = M::decode(bytes).ok()?;
    let encoded = message.encode_to_vec();
    assert_eq!(encoded.len(), message.encoded_len());
    let again = M::decode(encoded.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again, message, "decode(encode(message)) != message");
    Some(message)
}

fn check_entry_name(name: &str) {
    let accepted = validate_entry_name(name).is_ok();
    let expected = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    assert_eq!(
        accepted, expected,
        "validate_entry_name({name:?}) = {accepted}"
    );
}

fn check_volume_name(name: &str) {
    let accepted = validate_volume_name(name).is_ok();
    let expected = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    assert_eq!(
        accepted, expected,
        "validate_volume_name({name:?}) = {accepted}"
    );
    if accepted {
        assert!(
            validate_entry_name(name).is_ok(),
            "volume name {name:?} is not an entry name"
        );
    }
}

fn check_names(volume_names: &[&str], entry_names: &[&str]) {
    for name in volume_names {
        check_volume_name(name);
    }
    for name in entry_names {
        check_entry_name(name);
    }
}

fuzz_target!(|data: &[u8]| {
    // Names as arbitrary UTF-8.
    let text = String::from_utf8_lossy(data);
    check_names(&[&text], &[&text]);

    // Admin requests.
    if let Some(request) = check_message::<CreateVolumeRequest>(data) {
        check_names(&[&request.name], &[]);
    }
    if let Some(request) = check_message::<DeleteVolumeRequest>(data) {
        check_names(&[&request.name], &[]);
    }
    check_message::<ListVolumesRequest>(data);
    if let Some(request) = check_message::<GetVolumeRequest>(data) {
        check_names(&[&request.name], &[]);
    }
    check_message::<StatusRequest>(data);
    check_message::<ScrubRequest>(data);
    // Node-to-node: the scrub repair's block fetch.
    check_message::<ballast_proto::cluster_v1::ReadBlockRequest>(data);

    // Filesystem requests.
    if let Some(request) = check_message::<LookupRequest>(data) {
        check_names(&[&request.volume], &[&request.name]);
    }
    if let Some(request) = check_message::<GetAttrRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<SetAttrRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<CreateRequest>(data) {
        check_names(&[&request.volume], &[&request.name]);
        let _ = EntryKind::try_from(request.kind);
    }
    if let Some(request) = check_message::<LinkRequest>(data) {
        check_names(&[&request.volume], &[&request.new_name]);
    }
    if let Some(request) = check_message::<UnlinkRequest>(data) {
        check_names(&[&request.volume], &[&request.name]);
    }
    if let Some(request) = check_message::<RenameRequest>(data) {
        check_names(&[&request.volume], &[&request.name, &request.new_name]);
    }
    if let Some(request) = check_message::<ReadDirRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<ReadLinkRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<ReadRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<WriteRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<FallocateRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<FsyncRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<StatFsRequest>(data) {
        check_names(&[&request.volume], &[]);
    }
    if let Some(request) = check_message::<PurgeOrphansRequest>(data) {
        check_names(&[&request.volume], &[]);
    }

    // Responses (decoded by clients).
    check_message::<Volume>(data);
    check_message::<DeleteVolumeResponse>(data);
    check_message::<ListVolumesResponse>(data);
    check_message::<StatusResponse>(data);
    check_message::<ContainerStatus>(data);
    check_message::<Attr>(data);
    check_message::<EntryResponse>(data);
    check_message::<AttrResponse>(data);
    check_message::<UnlinkResponse>(data);
    check_message::<RenameResponse>(data);
    check_message::<DirEntry>(data);
    check_message::<ReadDirResponse>(data);
    check_message::<ReadLinkResponse>(data);
    check_message::<ReadResponse>(data);
    check_message::<WriteResponse>(data);
    check_message::<FsyncResponse>(data);
    check_message::<StatFsResponse>(data);
    check_message::<PurgeOrphansResponse>(data);
    check_message::<ScrubResponse>(data);
    check_message::<ScrubPass>(data);
    check_message::<ScrubStatus>(data);
    check_message::<ballast_proto::cluster_v1::ReadBlockResponse>(data);
});
