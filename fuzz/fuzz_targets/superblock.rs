//! Fuzzes `ballast_device::Superblock::decode`, the first thing read from a device at open.
//!
//! Must hold, for any bytes:
//! - decoding never panics (it returns `BadMagic`, `UnsupportedFormatVersion`,
//!   `ChecksumMismatch` or `InconsistentLayout` instead);
//! - a decoded superblock passes `validate`, encodes to a block that decodes to an equal value,
//!   and that block's first 100 bytes (every field and the CRC) equal the input's.
//!
//! Each input is tried three ways: as is; with a valid magic, format version and CRC written over
//! it; and as byte patches `(offset, value)` applied to a valid superblock (CRC then fixed), so
//! that both the field checks behind the checksum and the accepting paths near their limits are
//! explored.

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

/// A small valid superblock: two 64 KiB log segments, one data block.
fn baseline() -> Superblock {
    Superblock {
        format_version: FORMAT_VERSION,
        device_uuid: [7; 16],
        node_id: 1,
        device_size_bytes: (2 << 20) + 4096,
        block_size_bytes: 4096,
        log_region_offset_bytes: 1 << 20,
        log_region_size_bytes: 128 << 10,
        log_segment_size_bytes: 64 << 10,
        data_region_offset_bytes: 2 << 20,
        data_block_count: 1,
        formatted_at_ns: 0,
    }
}

fn fix_checksum(block: &mut [u8]) {
    let crc = ballast_common::checksum(&block[..CHECKSUM_OFFSET]);
    block[CHECKSUM_OFFSET..ENCODED_PREFIX_BYTES].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    check(data);

    let mut block = data.to_vec();
    if block.len() < ENCODED_PREFIX_BYTES {
        block.resize(ENCODED_PREFIX_BYTES, 0);
    }
    block[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
    block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    fix_checksum(&mut block);
    check(&block);

    let mut patched = baseline().encode().to_vec();
    for patch in data.chunks_exact(2) {
        // Patch the fields only (12..96): magic and version are covered above.
        let offset = 12 + patch[0] as usize % (CHECKSUM_OFFSET - 12);
        patched[offset] = patch[1];
    }
    fix_checksum(&mut patched);
    if data.is_empty() {
        // libFuzzer runs the empty input first: proves the baseline (and so this harness) valid.
        Superblock::decode(&patched).expect("the baseline superblock is valid");
    }
    check(&patched);
});
