//! `Device`: formatting and opening a Ballast device.
//!
//! Design: formatting is the only operation that writes the superblock. It zeroes the first block
//! of every log segment (so no stale log from a previous life is ever replayed), flushes, and only
//! then writes both superblock copies and flushes again: a device with a valid superblock always
//! has a clean or live log. Opening never rebuilds anything: it validates the superblock (taking
//! the valid copy, preferring block 0) and hands out the engine and block store; the log store is
//! opened separately with `LogStore::open`.
//!
//! `format` and `open` are synchronous (they block the calling thread on the engine); call them at
//! startup or from a blocking task.
//!
//! Owns: the device layout decision. Must not depend on: the log record format.
//! Invariants: the layout written is exactly what `Superblock::validate` accepts.

use std::path::Path;

use ballast_common::Clock;

use crate::engine::block_on;
use crate::superblock::{FORMAT_VERSION, LOG_REGION_OFFSET_BYTES, REGION_ALIGNMENT_BYTES};
use crate::{
    AlignedBuffer, BlockStore, DeviceError, Engine, EngineOptions, Superblock, BLOCK_SIZE_BYTES,
};

/// Smallest device we format.
pub const DEVICE_SIZE_BYTES_MIN: u64 = 64 << 20;
/// Default size of one log segment.
pub const LOG_SEGMENT_SIZE_BYTES_DEFAULT: u64 = 16 << 20;
/// Upper bound of the automatic log region size.
pub const LOG_REGION_SIZE_BYTES_DEFAULT_MAX: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatOptions {
    pub node_id: u64,
    /// Size of the log region; 0 = automatic: min(1 GiB, device / 8) rounded down to whole
    /// segments, at least two segments.
    pub log_region_size_bytes: u64,
    pub log_segment_size_bytes: u64,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            node_id: 0,
            log_region_size_bytes: 0,
            log_segment_size_bytes: LOG_SEGMENT_SIZE_BYTES_DEFAULT,
        }
    }
}

/// An open device: engine plus validated superblock.
#[derive(Debug, Clone)]
pub struct Device {
    engine: Engine,
    superblock: Superblock,
    block_store: BlockStore,
}

fn round_up(value: u64, multiple: u64) -> u64 {
    value.div_ceil(multiple) * multiple
}

impl Device {
    /// Lays out and initialises `path`; returns the superblock written.
    pub fn format(path: &Path, options: &FormatOptions) -> Result<Superblock, DeviceError> {
        let segment_bytes = options.log_segment_size_bytes;
        assert!(
            segment_bytes >= crate::superblock::LOG_SEGMENT_SIZE_BYTES_MIN
                && segment_bytes % BLOCK_SIZE_BYTES as u64 == 0,
            "log segment size {segment_bytes} must be a multiple of 4096 of at least 64 KiB"
        );
        assert!(
            options.log_region_size_bytes % segment_bytes == 0,
            "log region size {} must be a whole number of segments",
            options.log_region_size_bytes
        );
        let engine = Engine::open(path, EngineOptions::default())?;
        let device_size_bytes = engine.size_bytes();
        if device_size_bytes < DEVICE_SIZE_BYTES_MIN {
            return Err(DeviceError::DeviceTooSmall {
                path: path.to_owned(),
                size_bytes: device_size_bytes,
                minimum_bytes: DEVICE_SIZE_BYTES_MIN,
            });
        }
        let log_region_size_bytes = if options.log_region_size_bytes == 0 {
            let target = LOG_REGION_SIZE_BYTES_DEFAULT_MAX.min(device_size_bytes / 8);
            (target / segment_bytes).max(2) * segment_bytes
        } else {
            options.log_region_size_bytes
        };
        let data_region_offset_bytes = round_up(
            LOG_REGION_OFFSET_BYTES + log_region_size_bytes,
            REGION_ALIGNMENT_BYTES,
        );
        let data_block_count =
            device_size_bytes.saturating_sub(data_region_offset_bytes) / BLOCK_SIZE_BYTES as u64;
        let superblock = Superblock {
            format_version: FORMAT_VERSION,
            device_uuid: random_uuid().map_err(|source| DeviceError::Open {
                path: path.to_owned(),
                source: std::sync::Arc::new(source),
            })?,
            node_id: options.node_id,
            device_size_bytes,
            block_size_bytes: BLOCK_SIZE_BYTES as u32,
            log_region_offset_bytes: LOG_REGION_OFFSET_BYTES,
            log_region_size_bytes,
            log_segment_size_bytes: segment_bytes,
            data_region_offset_bytes,
            data_block_count,
            formatted_at_ns: ballast_common::SystemClock.now_ns(),
        };
        superblock.validate()?;

        block_on(async {
            // Log first, superblock last: a valid superblock never points at a stale log.
            let mut zero_block = AlignedBuffer::new_zeroed(BLOCK_SIZE_BYTES);
            for segment in 0..superblock.log_segment_count() {
                let offset_bytes = LOG_REGION_OFFSET_BYTES + segment * segment_bytes;
                zero_block = engine.write(offset_bytes, zero_block).await?;
            }
            engine.flush().await?;
            let encoded = superblock.encode();
            let encoded = engine.write(0, encoded).await?;
            engine.write(BLOCK_SIZE_BYTES as u64, encoded).await?;
            engine.flush().await
        })?;
        tracing::info!(
            ?path,
            device_size_bytes,
            log_region_size_bytes,
            data_block_count,
            node_id = options.node_id,
            "formatted device"
        );
        Ok(superblock)
    }

    /// Opens a formatted device: starts the engine and validates the superblock.
    pub fn open(path: &Path, options: EngineOptions) -> Result<Device, DeviceError> {
        let engine = Engine::open(path, options)?;
        if engine.size_bytes() < 2 * BLOCK_SIZE_BYTES as u64 {
            return Err(DeviceError::DeviceTooSmall {
                path: path.to_owned(),
                size_bytes: engine.size_bytes(),
                minimum_bytes: DEVICE_SIZE_BYTES_MIN,
            });
        }
        let blocks = block_on(engine.read(0, 2 * BLOCK_SIZE_BYTES))?;
        let primary = Superblock::decode(&blocks[..BLOCK_SIZE_BYTES]);
        let secondary = Superblock::decode(&blocks[BLOCK_SIZE_BYTES..]);
        let superblock = match (primary, secondary) {
            (Ok(primary), Ok(secondary)) => {
                if primary != secondary {
                    tracing::warn!(?path, "superblock copies differ; using copy 0");
                }
                primary
            }
            (Ok(primary), Err(error)) => {
                tracing::warn!(?path, %error, "superblock copy 1 is bad; using copy 0");
                primary
            }
            (Err(error), Ok(secondary)) => {
                tracing::warn!(?path, %error, "superblock copy 0 is bad; using copy 1");
                secondary
            }
            (Err(primary), Err(secondary)) => {
                return Err(DeviceError::NoValidSuperblock {
                    path: path.to_owned(),
                    primary_reason: primary.to_string(),
                    secondary_reason: secondary.to_string(),
                })
            }
        };
        if superblock.device_size_bytes > engine.size_bytes() {
            return Err(DeviceError::InconsistentLayout {
                reason: format!(
                    "superblock describes {} bytes but {path:?} has only {}",
                    superblock.device_size_bytes,
                    engine.size_bytes()
                ),
            });
        }
        let block_store = BlockStore::new(
            engine.clone(),
            superblock.data_region_offset_bytes,
            superblock.data_block_count,
        );
        tracing::info!(?path, node_id = superblock.node_id, "opened device");
        Ok(Device {
            engine,
            superblock,
            block_store,
        })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn engine(&self) -> Engine {
        self.engine.clone()
    }

    pub fn block_store(&self) -> BlockStore {
        self.block_store.clone()
    }
}

/// 16 random bytes from the kernel, shaped as a version-4 UUID.
fn random_uuid() -> std::io::Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    let mut filled = 0;
    while filled < uuid.len() {
        // SAFETY: the pointer and length describe the unfilled tail of a live local array.
        let result =
            unsafe { libc::getrandom(uuid[filled..].as_mut_ptr().cast(), uuid.len() - filled, 0) };
        if result < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(error);
        }
        filled += result as usize;
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::scratch_file;

    #[test]
    fn format_then_open() {
        let file = scratch_file(256 << 20);
        let options = FormatOptions {
            node_id: 9,
            ..FormatOptions::default()
        };
        let formatted = Device::format(file.path(), &options).unwrap();
        assert_eq!(formatted.log_region_size_bytes, 32 << 20);
        assert_eq!(formatted.data_region_offset_bytes, 33 << 20);
        let device = Device::open(file.path(), EngineOptions::default()).unwrap();
        assert_eq!(device.superblock(), &formatted);
        assert_eq!(
            device.block_store().block_count(),
            formatted.data_block_count
        );
    }

    #[test]
    fn too_small_is_refused() {
        let file = scratch_file(32 << 20);
        assert!(matches!(
            Device::format(file.path(), &FormatOptions::default()),
            Err(DeviceError::DeviceTooSmall { .. })
        ));
    }

    #[test]
    fn one_bad_superblock_copy_is_survivable() {
        let file = scratch_file(128 << 20);
        let options = FormatOptions {
            log_segment_size_bytes: 1 << 20,
            ..FormatOptions::default()
        };
        let formatted = Device::format(file.path(), &options).unwrap();
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        let garbage = AlignedBuffer::from_slice_padded(b"garbage");
        block_on(engine.write(0, garbage.clone())).unwrap();
        let device = Device::open(file.path(), EngineOptions::default()).unwrap();
        assert_eq!(device.superblock(), &formatted);
        block_on(engine.write(4096, garbage)).unwrap();
        assert!(matches!(
            Device::open(file.path(), EngineOptions::default()),
            Err(DeviceError::NoValidSuperblock { .. })
        ));
    }

    #[tokio::test]
    async fn block_store_round_trip_and_bounds() {
        let file = scratch_file(128 << 20);
        let options = FormatOptions {
            log_segment_size_bytes: 1 << 20,
            ..FormatOptions::default()
        };
        Device::format(file.path(), &options).unwrap();
        let device = Device::open(file.path(), EngineOptions::default()).unwrap();
        let store = device.block_store();
        let mut buffer = AlignedBuffer::new_zeroed(3 * 4096);
        buffer[4096] = 42;
        store.write_blocks(10, buffer).await.unwrap();
        store.flush().await.unwrap();
        let read = store.read_blocks(11, 1).await.unwrap();
        assert_eq!(read[0], 42);
        let last = store.block_count() - 1;
        assert!(store.read_blocks(last, 1).await.is_ok());
        assert!(matches!(
            store.read_blocks(last, 2).await,
            Err(DeviceError::BlockOutOfBounds { .. })
        ));
        assert!(matches!(
            store
                .write_blocks(last + 1, AlignedBuffer::new_zeroed(4096))
                .await,
            Err(DeviceError::BlockOutOfBounds { .. })
        ));
    }
}
