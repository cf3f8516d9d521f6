//! Fuzzes `ballast_device::Superblock::decode`, the first thing read from a device at open.
//!
//! Must hold, for any bytes:
//! - decoding never panics (it returns `BadMagic`, `UnsupportedFormatVersion`,
//!   `ChecksumMismatch` or `InconsistentLayout` instead);
//! - a decoded superblock passes `validate`, encodes to a block that decodes to an equal value,
//!   and that block's first 100 bytes (every field and the CRC) equal the input's.
//!
//! Each input is tried twice: as is, and with a valid magic, format version and CRC written over
//! it, so that the field checks behind the checksum are explored too.

#![no_main]

use ballast_device::superblock::{FORMAT_VERSION, SUPERBLOCK_MAGIC};
use ballast_device::Superblock;
use libfuzzer_sys::fuzz_target;

/// Offset of the CRC-32 over every byte before it; the encoded prefix is 100 bytes.
const CHECKSUM_OFFSET: usize = 96;
const ENCODED_PREFIX_BYTES: usize = CHECKSUM_OFFSET + 4;

fn check(bytes: &[u8]) {
    let Ok(superblock) = Superblock::decode(bytes) else {
        return;
    };
    superblock
        .validate()
        .expect("a decoded superblock passes validate");
    let encoded = superblock.encode();
    let again = Superblock::decode(&encoded).expect("an encoded superblock decodes");
    assert_eq!(again, superblock, "decode(encode(x)) != x");
    assert_eq!(
        &encoded[..ENCODED_PREFIX_BYTES],
        &bytes[..ENCODED_PREFIX_BYTES],
        "re-encoding changed the superblock bytes"
    );
}

fuzz_target!(|data: &[u8]| {
    check(data);

    let mut block = data.to_vec();
    if block.len() < ENCODED_PREFIX_BYTES {
        block.resize(ENCODED_PREFIX_BYTES, 0);
    }
    block[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
    block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = ballast_common::checksum(&block[..CHECKSUM_OFFSET]);
    block[CHECKSUM_OFFSET..ENCODED_PREFIX_BYTES].copy_from_slice(&crc.to_le_bytes());
    check(&block);
});
