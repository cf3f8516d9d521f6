//! Fuzzes `ballast_storage_node::snapshot::check_stream`, the checker every received snapshot
//! passes through before any of it is applied.
//!
//! Must hold, for any bytes: checking never panics and never allocates from an unchecked length;
//! it returns a summary or an error. An accepted stream's counts match what it holds.
//!
//! Each input is tried two ways: as is, behind the magic; and as a sequence of frame payloads
//! whose lengths come from the input, with the magic, frame headers and CRCs written correctly,
//! so that item decoding and the key, block and count checks behind the CRC are explored.

#![no_main]

use ballast_storage_node::snapshot::{check_stream, SNAPSHOT_MAGIC};
use libfuzzer_sys::fuzz_target;

const CONTAINER_ID: u64 = 5;

fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut stream = SNAPSHOT_MAGIC.to_vec();
    let mut rest = bytes;
    while let Some((&length, tail)) = rest.split_first() {
        // Lengths up to 255 reach every item kind; longer frames are covered by the raw input.
        let length = usize::from(length).min(tail.len());
        let (payload, tail) = tail.split_at(length);
        stream.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        stream.extend_from_slice(&ballast_common::checksum(payload).to_le_bytes());
        stream.extend_from_slice(payload);
        rest = tail;
    }
    stream
}

fuzz_target!(|bytes: &[u8]| {
    let mut raw = SNAPSHOT_MAGIC.to_vec();
    raw.extend_from_slice(bytes);
    for stream in [raw, framed(bytes)] {
        if let Ok(summary) = check_stream(CONTAINER_ID, &stream) {
            assert_eq!(summary.size_bytes, stream.len() as u64);
            assert!(
                summary.row_count >= 1,
                "an accepted stream has its state row"
            );
        }
    }
});
