//! Local frames: the requests a FUSE driver sends to the storage node on its own host, and the
//! node's answers, over the Unix socket that keeps the driver's shared region attached
//! (`shared_region`).
//!
//! Why not gRPC: a cold sequential read of a FUSE volume kept the kernel's ten 1 MiB reads in
//! flight but the device only 2.6 of them; about 3 ms of each 7.7 ms request went to the
//! HTTP/2 round trip and to waiting for runtime threads (`docs/benchmarks.md`, "What bounds the
//! cold read"). A request on the local socket is one small write by the task that asks, read
//! by a thread of the node that only waits for frames; the answer is one small write read by a
//! thread of the driver that only waits for answers. The bytes themselves never travel: they
//! are in the shared region.
//!
//! Wire form (little endian): a 24-byte header, then `body_length` bytes of body.
//!
//! | bytes | field |
//! |-------|-------|
//! | 0..4 | magic `BLF1` |
//! | 4 | kind ([`LocalFrameKind`]) |
//! | 5..8 | zero |
//! | 8..16 | request id (an answer repeats its request's) |
//! | 16..20 | body length, at most [`LOCAL_FRAME_BODY_BYTES_MAX`] |
//! | 20..24 | zero |
//!
//! A request's body is the protobuf message of the gRPC call it stands for (`ReadShared`,
//! `WriteShared`); an [`LocalFrameKind::Answer`] carries that call's response message, and a
//! [`LocalFrameKind::Failure`] a [`LocalFailure`]. This module knows nothing of protobuf: the
//! callers encode and decode bodies.
//!
//! Owns: the frame header, the failure body, reading a frame from a blocking stream (async
//! readers read the header, decode it with [`LocalFrameHeader::decode`], then read the body).
//! Must not depend on: protobuf, any runtime, the node or the driver.
//! Invariants:
//! - Nothing is allocated for a body before its length is checked against the limit: a hostile
//!   or broken peer cannot make the reader allocate more than [`LOCAL_FRAME_BODY_BYTES_MAX`].
//! - A frame is refused whole (magic, kind, reserved bytes, length) before its body is read;
//!   after a refusal the stream is out of step, and the reader closes it.
//! - `read_from` followed by `encode` gives back the bytes read, for every accepted frame.

use std::io::Read;

/// Bytes of a frame header.
pub const LOCAL_FRAME_HEADER_BYTES: usize = 24;
/// Largest body: requests name a volume (at most 255 bytes) and a few numbers; answers hold a
/// few numbers and an attribute set, or a failure.
pub const LOCAL_FRAME_BODY_BYTES_MAX: usize = 4096;
/// Longest failure message carried; longer ones are cut (at a character boundary).
pub const LOCAL_FAILURE_MESSAGE_BYTES_MAX: usize = 1024;

const LOCAL_FRAME_MAGIC: u32 = u32::from_le_bytes(*b"BLF1");

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LocalFrameKind {
    /// Driver to node: a `ReadSharedRequest`.
    ReadShared = 1,
    /// Driver to node: a `WriteSharedRequest`.
    WriteShared = 2,
    /// Node to driver: the request succeeded; the body is its response message.
    Answer = 0x80,
    /// Node to driver: the request failed; the body is a [`LocalFailure`].
    Failure = 0x81,
}

impl LocalFrameKind {
    fn from_byte(byte: u8) -> Option<LocalFrameKind> {
        match byte {
            1 => Some(LocalFrameKind::ReadShared),
            2 => Some(LocalFrameKind::WriteShared),
            0x80 => Some(LocalFrameKind::Answer),
            0x81 => Some(LocalFrameKind::Failure),
            _ => None,
        }
    }

    /// True for the kinds a driver sends.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            LocalFrameKind::ReadShared | LocalFrameKind::WriteShared
        )
    }
}

/// What a frame's header says. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalFrameHeader {
    pub kind: LocalFrameKind,
    pub request_id: u64,
    /// At most [`LOCAL_FRAME_BODY_BYTES_MAX`].
    pub body_length_bytes: usize,
}

/// One frame. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFrame {
    pub kind: LocalFrameKind,
    pub request_id: u64,
    pub body: Vec<u8>,
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

impl LocalFrame {
    /// The frame's wire form. Panics on a body over [`LOCAL_FRAME_BODY_BYTES_MAX`]: callers
    /// build bodies from bounded messages, so a longer one is a bug on this side.
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.body.len() <= LOCAL_FRAME_BODY_BYTES_MAX,
            "a local frame body of {} bytes",
            self.body.len()
        );
        let mut bytes = Vec::with_capacity(LOCAL_FRAME_HEADER_BYTES + self.body.len());
        bytes.extend_from_slice(&LOCAL_FRAME_MAGIC.to_le_bytes());
        bytes.push(self.kind as u8);
        bytes.extend_from_slice(&[0; 3]);
        bytes.extend_from_slice(&self.request_id.to_le_bytes());
        bytes.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        debug_assert_eq!(bytes.len(), LOCAL_FRAME_HEADER_BYTES);
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// Reads the next frame from `reader`: `None` when the stream ends cleanly between frames;
    /// an `InvalidData` error for a frame that breaks the wire form, an `UnexpectedEof` error
    /// for a stream that ends inside a frame.
    pub fn read_from(reader: &mut impl Read) -> std::io::Result<Option<LocalFrame>> {
        let mut header = [0u8; LOCAL_FRAME_HEADER_BYTES];
        let mut filled = 0;
        // Bounded: each pass fills at least one byte or returns.
        while filled < header.len() {
            match reader.read(&mut header[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the stream ended {filled} bytes into a local frame header"),
                    ))
                }
                Ok(read) => filled += read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        let LocalFrameHeader {
            kind,
            request_id,
            body_length_bytes: body_length,
        } = LocalFrameHeader::decode(&header)?;
        let mut body = vec![0u8; body_length];
        reader.read_exact(&mut body).map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!("reading a {body_length}-byte local frame body: {error}"),
            )
        })?;
        Ok(Some(LocalFrame {
            kind,
            request_id,
            body,
        }))
    }
}

impl LocalFrameHeader {
    /// The header in `header`, or why it is refused (an `InvalidData` error): a wrong magic,
    /// an unknown kind, set reserved bytes, or a body over the limit.
    pub fn decode(header: &[u8; LOCAL_FRAME_HEADER_BYTES]) -> std::io::Result<LocalFrameHeader> {
        decode_header(header)
    }
}

fn decode_header(header: &[u8; LOCAL_FRAME_HEADER_BYTES]) -> std::io::Result<LocalFrameHeader> {
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let magic = word(0);
    if magic != LOCAL_FRAME_MAGIC {
        return Err(invalid(format!("not a local frame: magic {magic:#010x}")));
    }
    let kind = LocalFrameKind::from_byte(header[4])
        .ok_or_else(|| invalid(format!("unknown local frame kind {:#04x}", header[4])))?;
    if header[5..8] != [0; 3] || header[20..24] != [0; 4] {
        return Err(invalid(
            "reserved bytes of a local frame header are set".to_owned(),
        ));
    }
    let request_id = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let body_length = word(16) as usize;
    if body_length > LOCAL_FRAME_BODY_BYTES_MAX {
        return Err(invalid(format!(
            "a local frame body of {body_length} bytes is over the {LOCAL_FRAME_BODY_BYTES_MAX}-byte \
             limit"
        )));
    }
    Ok(LocalFrameHeader {
        kind,
        request_id,
        body_length_bytes: body_length,
    })
}

/// Why a request failed: the gRPC status code and errno it would have carried, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFailure {
    /// A gRPC status code (`tonic::Code` as a number).
    pub code: i32,
    /// The errno for the kernel, 0 when none was attached.
    pub errno: i32,
    pub message: String,
}

impl LocalFailure {
    /// The body of a [`LocalFrameKind::Failure`]: code, errno, then the message, cut to
    /// [`LOCAL_FAILURE_MESSAGE_BYTES_MAX`] bytes at a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(LOCAL_FAILURE_MESSAGE_BYTES_MAX);
        // Bounded: at most 3 steps back to a character boundary.
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = Vec::with_capacity(8 + end);
        bytes.extend_from_slice(&self.code.to_le_bytes());
        bytes.extend_from_slice(&self.errno.to_le_bytes());
        bytes.extend_from_slice(&self.message.as_bytes()[..end]);
        bytes
    }

    /// Decodes a failure body, refusing one that is short, too long or not UTF-8.
    pub fn decode(body: &[u8]) -> std::io::Result<LocalFailure> {
        let Some((numbers, message)) = body.split_at_checked(8) else {
            return Err(invalid(format!(
                "a local failure of {} bytes is shorter than its code and errno",
                body.len()
            )));
        };
        if message.len() > LOCAL_FAILURE_MESSAGE_BYTES_MAX {
            return Err(invalid(format!(
                "a local failure message of {} bytes is over the limit",
                message.len()
            )));
        }
        let message = std::str::from_utf8(message)
            .map_err(|error| invalid(format!("a local failure message is not UTF-8: {error}")))?;
        Ok(LocalFailure {
            code: i32::from_le_bytes(numbers[..4].try_into().expect("4 bytes")),
            errno: i32::from_le_bytes(numbers[4..].try_into().expect("4 bytes")),
            message: message.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: LocalFrameKind, request_id: u64, body: &[u8]) -> LocalFrame {
        LocalFrame {
            kind,
            request_id,
            body: body.to_vec(),
        }
    }

    #[test]
    fn frames_read_back_as_written_and_the_stream_ends_cleanly_between_them() {
        let frames = [
            frame(LocalFrameKind::ReadShared, 1, b"read"),
            frame(LocalFrameKind::WriteShared, u64::MAX, &[]),
            frame(
                LocalFrameKind::Answer,
                7,
                &[0xAB; LOCAL_FRAME_BODY_BYTES_MAX],
            ),
            frame(LocalFrameKind::Failure, 0, b"\0\0\0\0\0\0\0\0"),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(LocalFrame::encode).collect();
        let mut reader = bytes.as_slice();
        for expected in &frames {
            assert_eq!(
                LocalFrame::read_from(&mut reader).unwrap().as_ref(),
                Some(expected)
            );
        }
        assert_eq!(LocalFrame::read_from(&mut reader).unwrap(), None);
    }

    #[test]
    fn broken_frames_are_refused_before_their_body_is_read() {
        let good = frame(LocalFrameKind::ReadShared, 9, b"body").encode();
        let refused = |bytes: &[u8]| {
            let mut reader = bytes;
            LocalFrame::read_from(&mut reader).unwrap_err().kind()
        };
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert_eq!(refused(&bad_magic), std::io::ErrorKind::InvalidData);
        for kind in [0u8, 3, 0x7F, 0x82, 0xFF] {
            let mut bad_kind = good.clone();
            bad_kind[4] = kind;
            assert_eq!(refused(&bad_kind), std::io::ErrorKind::InvalidData);
        }
        for reserved in [5, 6, 7, 20, 21, 22, 23] {
            let mut bad_reserved = good.clone();
            bad_reserved[reserved] = 1;
            assert_eq!(refused(&bad_reserved), std::io::ErrorKind::InvalidData);
        }
        // A length over the limit is refused from the header alone (no body follows here).
        let mut too_long = good[..LOCAL_FRAME_HEADER_BYTES].to_vec();
        too_long[16..20].copy_from_slice(&(LOCAL_FRAME_BODY_BYTES_MAX as u32 + 1).to_le_bytes());
        assert_eq!(refused(&too_long), std::io::ErrorKind::InvalidData);
        too_long[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(refused(&too_long), std::io::ErrorKind::InvalidData);
        // Ends inside the header or the body.
        for cut in [1, LOCAL_FRAME_HEADER_BYTES - 1, good.len() - 1] {
            assert_eq!(refused(&good[..cut]), std::io::ErrorKind::UnexpectedEof);
        }
    }

    /// Reads frames from `bytes` until the end or a refusal, checking that each accepted frame
    /// is exactly the bytes it came from (the fuzz target `local_frames` checks the same).
    fn read_all_checked(bytes: &[u8]) -> usize {
        let mut reader = bytes;
        let mut accepted = 0;
        // Bounded: each accepted frame consumes at least a header.
        loop {
            let start = bytes.len() - reader.len();
            match LocalFrame::read_from(&mut reader) {
                Ok(Some(frame)) => {
                    let end = bytes.len() - reader.len();
                    assert!(frame.body.len() <= LOCAL_FRAME_BODY_BYTES_MAX);
                    assert_eq!(frame.encode(), &bytes[start..end]);
                    accepted += 1;
                }
                Ok(None) => {
                    assert!(reader.is_empty());
                    return accepted;
                }
                Err(_) => return accepted,
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_read_or_refused_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            read_all_checked(&bytes);
        }

        #[test]
        fn valid_frames_with_flipped_bytes_are_read_back_or_refused(
            frames in proptest::collection::vec(
                (0usize..4, proptest::prelude::any::<u64>(),
                 proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
                1..6,
            ),
            flips in proptest::collection::vec(
                (proptest::prelude::any::<usize>(), 1u8..=255), 0..3),
        ) {
            let kinds = [
                LocalFrameKind::ReadShared,
                LocalFrameKind::WriteShared,
                LocalFrameKind::Answer,
                LocalFrameKind::Failure,
            ];
            let mut bytes = Vec::new();
            for (kind, request_id, body) in &frames {
                bytes.extend(LocalFrame { kind: kinds[*kind], request_id: *request_id, body: body.clone() }.encode());
            }
            if flips.is_empty() {
                proptest::prop_assert_eq!(read_all_checked(&bytes), frames.len());
            } else {
                for (position, mask) in flips {
                    let index = position % bytes.len();
                    bytes[index] ^= mask;
                }
                read_all_checked(&bytes);
            }
        }
    }

    #[test]
    fn failures_keep_code_errno_and_a_bounded_message() {
        let failure = LocalFailure {
            code: 9,
            errno: 5,
            message: "EIO: checksum mismatch".to_owned(),
        };
        assert_eq!(LocalFailure::decode(&failure.encode()).unwrap(), failure);
        // A long message of two-byte characters is cut at a character boundary.
        let long = LocalFailure {
            code: 13,
            errno: 0,
            message: "é".repeat(LOCAL_FAILURE_MESSAGE_BYTES_MAX),
        };
        let decoded = LocalFailure::decode(&long.encode()).unwrap();
        assert_eq!(decoded.message.len(), LOCAL_FAILURE_MESSAGE_BYTES_MAX);
        assert!(long.message.starts_with(&decoded.message));
        assert!(LocalFailure::decode(&[0; 7]).is_err(), "short");
        assert!(
            LocalFailure::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 0xFF]).is_err(),
            "not UTF-8"
        );
        let over = vec![b'a'; 8 + LOCAL_FAILURE_MESSAGE_BYTES_MAX + 1];
        assert!(LocalFailure::decode(&over).is_err(), "too long");
    }
}
