//! Fuzzes the device log store's on-disk decoders that recovery runs over whatever it finds in
//! the log region: the batch decoder (`decode_batch`), the segment header decoder
//! (`SegmentHeader::decode`) and the segment trailer decoder (`decode_trailer`), reached through
//! the `ballast_device::log_store::fuzzing` wrappers.
//!
//! Must hold, for any bytes:
//! - no decoder panics (a bad batch is `NotABatch` or `Malformed`, a bad header an error);
//! - a decoded batch re-encodes (with `encode_batch`) to a batch no longer than the original that
//!   decodes to the same sequence and records;
//! - a decoded segment header or trailer re-encodes to bytes that decode to the same value.
//!
//! Each input is tried raw, and then framed: magic, length and CRC (and, for batches, every
//! record's payload CRC) written over it, so the parsers behind the checksums see arbitrary
//! record tables and group tables.

#![no_main]

use ballast_device::log_store::fuzzing::{
    decode_batch_for_fuzzing, decode_segment_header_for_fuzzing, decode_trailer_for_fuzzing,
    encode_batch_for_fuzzing, encode_segment_header_for_fuzzing, encode_trailer_for_fuzzing,
};
use ballast_device::BLOCK_SIZE_BYTES;
use libfuzzer_sys::fuzz_target;

use ballast_device::log_store::fuzzing::{
    BATCH_HEADER_BYTES, BATCH_MAGIC, GROUP_TABLE_ENTRY_BYTES, RECORD_HEADER_BYTES,
    SEGMENT_HEADER_FIXED_BYTES, SEGMENT_MAGIC, TRAILER_MAGIC,
};
/// Most records whose payload CRC the framing fixes up (keeps one iteration cheap).
const FIXED_RECORDS_MAX: usize = 256;

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// `data` copied into a zeroed buffer of whole blocks, at least `minimum` bytes long.
fn blocks_holding(data: &[u8], minimum: usize) -> Vec<u8> {
    let length = data.len().max(minimum).div_ceil(BLOCK_SIZE_BYTES) * BLOCK_SIZE_BYTES;
    let mut buffer = vec![0u8; length];
    buffer[..data.len()].copy_from_slice(data);
    buffer
}

fn check_batch(bytes: &[u8]) {
    let Ok((sequence, length_bytes, records)) = decode_batch_for_fuzzing(bytes) else {
        return;
    };
    assert!(
        length_bytes > 0 && length_bytes % BLOCK_SIZE_BYTES == 0 && length_bytes <= bytes.len()
    );
    let encoded = encode_batch_for_fuzzing(sequence, &records);
    assert!(
        encoded.len() <= length_bytes,
        "re-encoded batch ({} bytes) longer than the decoded one ({length_bytes} bytes)",
        encoded.len()
    );
    let (sequence_again, length_again, records_again) =
        decode_batch_for_fuzzing(&encoded).expect("an encoded batch decodes");
    assert_eq!(sequence_again, sequence);
    assert_eq!(length_again, encoded.len());
    assert_eq!(records_again, records, "decode(encode(batch)) != batch");
}

fn check_segment_header(bytes: &[u8]) {
    let Ok(header) = decode_segment_header_for_fuzzing(bytes) else {
        return;
    };
    let (segment_sequence, oldest_live, first_batch, length_bytes, purged) = &header;
    assert!(*length_bytes <= bytes.len());
    let encoded =
        encode_segment_header_for_fuzzing(*segment_sequence, *oldest_live, *first_batch, purged);
    assert_eq!(encoded.len(), *length_bytes);
    let again = decode_segment_header_for_fuzzing(&encoded).expect("an encoded header decodes");
    assert_eq!(again, header, "decode(encode(header)) != header");
}

fn check_trailer(bytes: &[u8]) {
    let Some((segment_sequence, oldest_live)) = decode_trailer_for_fuzzing(bytes) else {
        return;
    };
    let encoded = encode_trailer_for_fuzzing(segment_sequence, oldest_live);
    assert_eq!(
        decode_trailer_for_fuzzing(&encoded),
        Some((segment_sequence, oldest_live)),
        "decode(encode(trailer)) != trailer"
    );
}

/// The fuzzer's bytes as a batch with a valid envelope; with `fix_payloads`, every record's
/// payload CRC is also made to match (as far as the records' lengths stay inside the batch).
fn framed_batch(data: &[u8], fix_payloads: bool) -> Vec<u8> {
    let mut batch = blocks_holding(data, BATCH_HEADER_BYTES);
    batch[0..8].copy_from_slice(&BATCH_MAGIC);
    let length_bytes = batch.len();
    put_u32(&mut batch, 12, length_bytes as u32);
    if fix_payloads {
        let record_count = (read_u32(&batch, 24) as usize).min(FIXED_RECORDS_MAX);
        let mut position = BATCH_HEADER_BYTES;
        for _ in 0..record_count {
            if position + RECORD_HEADER_BYTES > length_bytes {
                break;
            }
            let payload_offset = position + RECORD_HEADER_BYTES;
            let payload_length = read_u32(&batch, position + 4) as usize;
            let Some(payload_end) = payload_offset
                .checked_add(payload_length)
                .filter(|&end| end <= length_bytes)
            else {
                break;
            };
            let crc = ballast_common::checksum(&batch[payload_offset..payload_end]);
            put_u32(&mut batch, position + 32, crc);
            position = payload_end;
        }
    }
    let crc = ballast_common::checksum(&batch[12..]);
    put_u32(&mut batch, 8, crc);
    batch
}

/// The fuzzer's bytes as a segment header with a valid envelope and a group count that fits.
fn framed_segment_header(data: &[u8]) -> Vec<u8> {
    let mut header = blocks_holding(data, SEGMENT_HEADER_FIXED_BYTES);
    let length_bytes = header.len();
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    put_u32(&mut header, 12, length_bytes as u32);
    // Group counts whose table rounds up to exactly `length_bytes`.
    let blocks = length_bytes / BLOCK_SIZE_BYTES;
    let count_min = if blocks == 1 {
        0
    } else {
        ((blocks - 1) * BLOCK_SIZE_BYTES - SEGMENT_HEADER_FIXED_BYTES) / GROUP_TABLE_ENTRY_BYTES + 1
    };
    let count_max = (length_bytes - SEGMENT_HEADER_FIXED_BYTES) / GROUP_TABLE_ENTRY_BYTES;
    let count = count_min + read_u32(&header, 40) as usize % (count_max - count_min + 1);
    put_u32(&mut header, 40, count as u32);
    let crc = ballast_common::checksum(&header[12..]);
    put_u32(&mut header, 8, crc);
    header
}

fn framed_trailer(data: &[u8]) -> Vec<u8> {
    let mut trailer = vec![0u8; BLOCK_SIZE_BYTES];
    let copied = data.len().min(BLOCK_SIZE_BYTES);
    trailer[..copied].copy_from_slice(&data[..copied]);
    trailer[0..8].copy_from_slice(&TRAILER_MAGIC);
    let crc = ballast_common::checksum(&trailer[12..]);
    put_u32(&mut trailer, 8, crc);
    trailer
}

fuzz_target!(|data: &[u8]| {
    check_batch(data);
    check_segment_header(data);
    check_trailer(data);

    let batch = framed_batch(data, false);
    let batch_fixed = framed_batch(data, true);
    let segment_header = framed_segment_header(data);
    let trailer = framed_trailer(data);
    if data.is_empty() {
        // libFuzzer runs the empty input first: proves the framing (and so this harness) valid.
        decode_batch_for_fuzzing(&batch).expect("an empty framed batch decodes");
        decode_segment_header_for_fuzzing(&segment_header).expect("an empty framed header decodes");
        decode_trailer_for_fuzzing(&trailer).expect("an empty framed trailer decodes");
    }
    check_batch(&batch);
    check_batch(&batch_fixed);
    check_segment_header(&segment_header);
    check_trailer(&trailer);
});
