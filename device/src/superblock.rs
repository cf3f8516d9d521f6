//! The on-disk superblock, format version 1.
//!
//! Design: one fixed little-endian record in block 0 with an identical copy in block 1, so a torn
//! or corrupted write of one copy is survivable (the device layer prefers block 0 and warns when
//! a copy is bad). Fields are at fixed offsets and the CRC-32 covers every byte before it; decode
//! checks magic, then version (so a future layout is reported as such), then the checksum, then
//! every layout field for sanity, so a valid superblock always describes a usable device.
//!
//! Byte layout (little-endian, rest of the 4096-byte block is zero):
//! ```text
//!   0  magic                     [u8; 8] = "BALLAST\0"
//!   8  format_version            u32     = 2
//!  12  block_size_bytes          u32     = 4096
//!  16  device_uuid               [u8; 16]
//!  32  node_id                   u64
//!  40  device_size_bytes         u64
//!  48  log_region_offset_bytes   u64     = 1 MiB
//!  56  log_region_size_bytes     u64
//!  64  log_segment_size_bytes    u64
//!  72  data_region_offset_bytes  u64
//!  80  data_block_count          u64
//!  88  formatted_at_ns           i64
//!  96  crc32                     u32     over bytes 0..96
//! ```
//!
//! Owns: encoding, decoding and validation of that block. Must not depend on: the engine (pure).
//! Invariants: a decoded superblock passed every check in `validate`.

use crate::{AlignedBuffer, DeviceError, BLOCK_SIZE_BYTES};

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"BALLAST\0";
/// Version 2: the cluster-map records in the state store gained fields (volume labels, node
/// draining, container moves); a node formatted by version 1 cannot decode them.
pub const FORMAT_VERSION: u32 = 2;
/// Where the log region starts; everything before it is reserved for the superblock copies.
pub const LOG_REGION_OFFSET_BYTES: u64 = 1 << 20;
/// Alignment of the regions.
pub const REGION_ALIGNMENT_BYTES: u64 = 1 << 20;
/// Smallest segment we accept: one header block, one batch block, one trailer block, room to grow.
pub const LOG_SEGMENT_SIZE_BYTES_MIN: u64 = 64 * 1024;
const CHECKSUM_OFFSET: usize = 96;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub format_version: u32,
    pub device_uuid: [u8; 16],
    pub node_id: u64,
    pub device_size_bytes: u64,
    pub block_size_bytes: u32,
    pub log_region_offset_bytes: u64,
    pub log_region_size_bytes: u64,
    pub log_segment_size_bytes: u64,
    pub data_region_offset_bytes: u64,
    pub data_block_count: u64,
    pub formatted_at_ns: i64,
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}

fn inconsistent(reason: String) -> DeviceError {
    DeviceError::InconsistentLayout { reason }
}

impl Superblock {
    /// Number of segments in the log region.
    pub fn log_segment_count(&self) -> u64 {
        self.log_region_size_bytes / self.log_segment_size_bytes
    }

    /// One 4096-byte block holding the encoded superblock.
    pub fn encode(&self) -> AlignedBuffer {
        let mut buffer = AlignedBuffer::new_zeroed(BLOCK_SIZE_BYTES);
        buffer[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        buffer[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        buffer[12..16].copy_from_slice(&self.block_size_bytes.to_le_bytes());
        buffer[16..32].copy_from_slice(&self.device_uuid);
        buffer[32..40].copy_from_slice(&self.node_id.to_le_bytes());
        buffer[40..48].copy_from_slice(&self.device_size_bytes.to_le_bytes());
        buffer[48..56].copy_from_slice(&self.log_region_offset_bytes.to_le_bytes());
        buffer[56..64].copy_from_slice(&self.log_region_size_bytes.to_le_bytes());
        buffer[64..72].copy_from_slice(&self.log_segment_size_bytes.to_le_bytes());
        buffer[72..80].copy_from_slice(&self.data_region_offset_bytes.to_le_bytes());
        buffer[80..88].copy_from_slice(&self.data_block_count.to_le_bytes());
        buffer[88..96].copy_from_slice(&self.formatted_at_ns.to_le_bytes());
        let crc = ballast_common::checksum(&buffer[..CHECKSUM_OFFSET]);
        buffer[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        buffer
    }

    /// Decodes and validates one copy (at least the first 100 bytes of its block).
    pub fn decode(bytes: &[u8]) -> Result<Superblock, DeviceError> {
        if bytes.len() < CHECKSUM_OFFSET + 4 || bytes[0..8] != SUPERBLOCK_MAGIC {
            return Err(DeviceError::BadMagic { offset_bytes: 0 });
        }
        let format_version = read_u32(bytes, 8);
        if format_version != FORMAT_VERSION {
            return Err(DeviceError::UnsupportedFormatVersion {
                found: format_version,
            });
        }
        let stored = read_u32(bytes, CHECKSUM_OFFSET);
        let computed = ballast_common::checksum(&bytes[..CHECKSUM_OFFSET]);
        if stored != computed {
            return Err(DeviceError::ChecksumMismatch {
                offset_bytes: CHECKSUM_OFFSET as u64,
                stored,
                computed,
            });
        }
        let superblock = Superblock {
            format_version,
            block_size_bytes: read_u32(bytes, 12),
            device_uuid: bytes[16..32].try_into().expect("16 bytes"),
            node_id: read_u64(bytes, 32),
            device_size_bytes: read_u64(bytes, 40),
            log_region_offset_bytes: read_u64(bytes, 48),
            log_region_size_bytes: read_u64(bytes, 56),
            log_segment_size_bytes: read_u64(bytes, 64),
            data_region_offset_bytes: read_u64(bytes, 72),
            data_block_count: read_u64(bytes, 80),
            formatted_at_ns: read_u64(bytes, 88) as i64,
        };
        superblock.validate()?;
        Ok(superblock)
    }

    /// Checks that the regions are aligned, inside the device, in order and non-overlapping, and
    /// that the log has at least two whole segments.
    pub fn validate(&self) -> Result<(), DeviceError> {
        let block = BLOCK_SIZE_BYTES as u64;
        if self.block_size_bytes as u64 != block {
            return Err(inconsistent(format!(
                "block size {} is not {block}",
                self.block_size_bytes
            )));
        }
        if self.log_region_offset_bytes < LOG_REGION_OFFSET_BYTES
            || self.log_region_offset_bytes % REGION_ALIGNMENT_BYTES != 0
        {
            return Err(inconsistent(format!(
                "log region offset {} is not a 1 MiB multiple at or after 1 MiB",
                self.log_region_offset_bytes
            )));
        }
        if self.log_segment_size_bytes < LOG_SEGMENT_SIZE_BYTES_MIN
            || self.log_segment_size_bytes % block != 0
        {
            return Err(inconsistent(format!(
                "log segment size {} is not a multiple of {block} of at least {LOG_SEGMENT_SIZE_BYTES_MIN}",
                self.log_segment_size_bytes
            )));
        }
        if self.log_region_size_bytes % self.log_segment_size_bytes != 0
            || self.log_segment_count() < 2
        {
            return Err(inconsistent(format!(
                "log region of {} bytes is not at least two whole segments of {} bytes",
                self.log_region_size_bytes, self.log_segment_size_bytes
            )));
        }
        let log_end_bytes = self
            .log_region_offset_bytes
            .checked_add(self.log_region_size_bytes)
            .ok_or_else(|| inconsistent("log region end overflows".to_owned()))?;
        if self.data_region_offset_bytes < log_end_bytes
            || self.data_region_offset_bytes % REGION_ALIGNMENT_BYTES != 0
        {
            return Err(inconsistent(format!(
                "data region offset {} overlaps the log (ending at {log_end_bytes}) or is not 1 MiB aligned",
                self.data_region_offset_bytes
            )));
        }
        let data_end_bytes = self
            .data_block_count
            .checked_mul(block)
            .and_then(|data_bytes| data_bytes.checked_add(self.data_region_offset_bytes))
            .ok_or_else(|| inconsistent("data region end overflows".to_owned()))?;
        if data_end_bytes > self.device_size_bytes {
            return Err(inconsistent(format!(
                "data region ends at {data_end_bytes}, past the device size {}",
                self.device_size_bytes
            )));
        }
        if self.data_block_count == 0 {
            return Err(inconsistent("data region is empty".to_owned()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            format_version: FORMAT_VERSION,
            device_uuid: [7; 16],
            node_id: 3,
            device_size_bytes: 256 << 20,
            block_size_bytes: 4096,
            log_region_offset_bytes: 1 << 20,
            log_region_size_bytes: 32 << 20,
            log_segment_size_bytes: 16 << 20,
            data_region_offset_bytes: 33 << 20,
            data_block_count: (256 - 33) * 256,
            formatted_at_ns: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let superblock = sample();
        assert_eq!(
            Superblock::decode(&superblock.encode()).unwrap(),
            superblock
        );
    }

    #[test]
    fn corruption_is_detected() {
        let mut bytes = sample().encode().to_vec();
        bytes[40] ^= 1;
        assert!(matches!(
            Superblock::decode(&bytes),
            Err(DeviceError::ChecksumMismatch { .. })
        ));
        bytes[0] = b'X';
        assert!(matches!(
            Superblock::decode(&bytes),
            Err(DeviceError::BadMagic { .. })
        ));
        let mut bytes = sample().encode().to_vec();
        bytes[8] = 1;
        assert!(matches!(
            Superblock::decode(&bytes),
            Err(DeviceError::UnsupportedFormatVersion { found: 1 })
        ));
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mutations: Vec<fn(&mut Superblock)> = vec![
            |s| s.data_region_offset_bytes = 16 << 20,
            |s| s.log_region_size_bytes = 16 << 20,
            |s| s.log_segment_size_bytes = 12 << 20,
            |s| s.data_block_count += 1,
            |s| s.log_region_offset_bytes = 4096,
            |s| s.block_size_bytes = 512,
            |s| s.data_block_count = u64::MAX,
        ];
        for mutate in mutations {
            let mut superblock = sample();
            mutate(&mut superblock);
            assert!(matches!(
                Superblock::decode(&superblock.encode()),
                Err(DeviceError::InconsistentLayout { .. })
            ));
        }
    }
}
