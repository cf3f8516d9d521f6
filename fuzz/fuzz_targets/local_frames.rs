//! Fuzzes `ballast_common::local_frame`: `LocalFrame::read_from`, which both the storage node
//! (requests from a FUSE driver on its host) and the driver (the node's answers) run on bytes
//! from another process, and `LocalFailure::decode`, which the driver runs on a failure's body.
//!
//! Must hold, for any bytes:
//! - reading never panics and never allocates a body over the limit;
//! - frames are read one after another until the stream ends cleanly or a frame is refused;
//!   every accepted frame re-encodes to exactly the bytes it was read from;
//! - an accepted failure body re-encodes to itself.

#![no_main]

use ballast_common::local_frame::{
    LocalFailure, LocalFrame, LOCAL_FRAME_BODY_BYTES_MAX, LOCAL_FRAME_HEADER_BYTES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    // Bounded: each accepted frame consumes at least a header.
    loop {
        let before = reader.len();
        match LocalFrame::read_from(&mut reader) {
            Ok(Some(frame)) => {
                assert!(frame.body.len() <= LOCAL_FRAME_BODY_BYTES_MAX);
                let consumed = before - reader.len();
                assert_eq!(consumed, LOCAL_FRAME_HEADER_BYTES + frame.body.len());
                let start = data.len() - before;
                assert_eq!(
                    frame.encode(),
                    &data[start..start + consumed],
                    "an accepted frame re-encodes otherwise"
                );
                if let Ok(failure) = LocalFailure::decode(&frame.body) {
                    assert_eq!(
                        failure.encode(),
                        frame.body,
                        "a failure re-encodes otherwise"
                    );
                }
            }
            Ok(None) => {
                assert!(reader.is_empty(), "a clean end with bytes left");
                break;
            }
            Err(_) => break,
        }
    }
    if let Ok(failure) = LocalFailure::decode(data) {
        assert_eq!(failure.encode(), data);
    }
});
