//! `WriteData`: the bytes of one file write as they reach the node, and how a device write
//! takes them without another copy.
//!
//! Why: a write that a FUSE driver on this host puts in a shared slot must be copied out once
//! (the driver could change the slot at any time; `shared_regions.rs`). Copied into a `Bytes`,
//! it was copied a second time into aligned buffers for the device. Copied straight into an
//! aligned buffer instead, the device writes it from where it lies, and the same memory then
//! becomes the `Bytes` of the Raft entry. Perf of a 1 MiB sequential FUSE write
//! (2026-12-06): the node's two copies were 11 % of the machine's samples, one copy about half
//! of that.
//!
//! Owns: the two forms of a write's bytes, lending an owned aligned buffer to device requests in
//! windows, and turning the buffer into `Bytes` afterwards.
//! Must not depend on: Raft, the gRPC layer.
//! Invariants:
//! - An `Aligned` write's bytes are the first `length_bytes` of a buffer the node owns alone;
//!   the bytes past them are never written to the device nor seen in the `Bytes`.
//! - While windows of a buffer are lent to the device, nothing else touches the buffer: it sits
//!   in an `Arc` that only the windows hold, and it comes back only when every window has been
//!   dropped ([`write_lent_windows`]).

use std::any::Any;
use std::future::Future;
use std::ptr::NonNull;
use std::sync::Arc;

use ballast_device::{AlignedBuffer, DeviceError, BLOCK_SIZE_BYTES};

use crate::buffer_pool::{bytes_returning_to, BufferPool};
use crate::error::{NodeError, NodeResult};

/// The bytes of one write.
#[derive(Debug)]
pub enum WriteData {
    /// Bytes from a gRPC request (not aligned for `O_DIRECT`).
    Bytes(bytes::Bytes),
    /// The first `length_bytes` of `buffer`, the node's own copy of a shared slot; the buffer
    /// goes back to `pool` when the last `Bytes` made of it is dropped.
    Aligned {
        buffer: AlignedBuffer,
        length_bytes: usize,
        pool: Arc<BufferPool>,
    },
}

impl WriteData {
    /// The first `length_bytes` of `buffer`, which came from `pool`.
    pub fn aligned(buffer: AlignedBuffer, length_bytes: usize, pool: Arc<BufferPool>) -> WriteData {
        assert!(
            length_bytes <= buffer.len(),
            "a write of {length_bytes} bytes in a buffer of {}",
            buffer.len()
        );
        WriteData::Aligned {
            buffer,
            length_bytes,
            pool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            WriteData::Bytes(bytes) => bytes.len(),
            WriteData::Aligned { length_bytes, .. } => *length_bytes,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The write's bytes, as they are.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            WriteData::Bytes(bytes) => bytes,
            WriteData::Aligned {
                buffer,
                length_bytes,
                ..
            } => &buffer[..*length_bytes],
        }
    }

    /// The write's bytes as `Bytes`, without a copy.
    pub fn into_bytes(self) -> bytes::Bytes {
        match self {
            WriteData::Bytes(bytes) => bytes,
            WriteData::Aligned {
                buffer,
                length_bytes,
                pool,
            } => bytes_returning_to(buffer, &pool).slice(..length_bytes),
        }
    }
}

/// Writes windows of `buffer` to the device, all in flight together, without copying: each
/// `(window start, window length)` of `windows` (whole blocks, inside the buffer, not
/// overlapping) is lent to the request that `write_window` makes of it, in order. Gives the
/// buffer back once every request has finished and dropped its window.
///
/// A window the engine still holds after its request failed (an engine that stopped with the
/// request queued) keeps the buffer alive; the buffer is then not given back, and the error is
/// returned.
pub async fn write_lent_windows<Write, Written>(
    mut buffer: AlignedBuffer,
    windows: &[(usize, usize)],
    mut write_window: Write,
) -> NodeResult<AlignedBuffer>
where
    Write: FnMut(usize, AlignedBuffer) -> Written,
    Written: Future<Output = Result<AlignedBuffer, DeviceError>>,
{
    let mut covered_end_bytes = 0;
    for &(start_bytes, length_bytes) in windows {
        assert!(
            start_bytes >= covered_end_bytes
                && length_bytes > 0
                && start_bytes % BLOCK_SIZE_BYTES == 0
                && length_bytes % BLOCK_SIZE_BYTES == 0
                && start_bytes + length_bytes <= buffer.len(),
            "window {start_bytes}+{length_bytes} of a {}-byte buffer (after {covered_end_bytes})",
            buffer.len()
        );
        covered_end_bytes = start_bytes + length_bytes;
    }
    // The pointer is taken from the exclusive borrow, before the buffer moves into the `Arc`
    // (its heap memory does not move with it); it does not live past this block.
    let (owner, writes) = {
        let base = NonNull::new(buffer.as_mut_ptr()).expect("buffers are never null");
        let owner = Arc::new(buffer);
        let lender: Arc<dyn Any + Send + Sync> = owner.clone();
        let writes: Vec<Written> = windows
            .iter()
            .enumerate()
            .map(|(window_index, &(start_bytes, length_bytes))| {
                // SAFETY: `start_bytes` is inside the buffer and a multiple of 4096 of a
                // 4096-aligned allocation (asserted above), so the pointer is aligned and the
                // window lies inside the initialised allocation. The windows do not overlap
                // (asserted above), and nothing else uses the buffer while they exist: `owner`
                // is only unwrapped below, after every window is gone. Each window holds
                // `lender`, which keeps the allocation alive.
                let window = unsafe {
                    AlignedBuffer::lent(base.add(start_bytes), length_bytes, Arc::clone(&lender))
                };
                write_window(window_index, window)
            })
            .collect();
        (owner, writes)
    };
    let mut failure = None;
    for result in futures::future::join_all(writes).await {
        match result {
            // The window goes; only the memory's owner remains.
            Ok(window) => drop(window),
            Err(source) => {
                failure.get_or_insert(NodeError::device("write blocks", source));
            }
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    Arc::try_unwrap(owner).map_err(|_| {
        NodeError::InvalidState("a written window of a write buffer is still held".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_data_becomes_bytes_of_its_length_only() {
        let mut buffer = AlignedBuffer::new_zeroed(3 * BLOCK_SIZE_BYTES);
        buffer.fill(9);
        buffer[..5].copy_from_slice(b"hello");
        let pool = Arc::new(BufferPool::default());
        let data = WriteData::aligned(buffer, 2 * BLOCK_SIZE_BYTES + 1, pool);
        assert_eq!(data.len(), 2 * BLOCK_SIZE_BYTES + 1);
        assert_eq!(&data.as_slice()[..5], b"hello");
        let bytes = data.into_bytes();
        assert_eq!(bytes.len(), 2 * BLOCK_SIZE_BYTES + 1);
        assert_eq!(&bytes[..5], b"hello");
        assert_eq!(bytes[bytes.len() - 1], 9);
    }

    #[tokio::test]
    async fn windows_are_written_from_the_buffer_itself_and_it_comes_back() {
        let mut buffer = AlignedBuffer::new_zeroed(4 * BLOCK_SIZE_BYTES);
        for (block, bytes) in buffer.chunks_mut(BLOCK_SIZE_BYTES).enumerate() {
            bytes.fill(block as u8 + 1);
        }
        let base = buffer.as_ptr() as usize;
        let seen = std::sync::Mutex::new(Vec::new());
        let buffer = write_lent_windows(
            buffer,
            &[
                (0, BLOCK_SIZE_BYTES),
                (2 * BLOCK_SIZE_BYTES, 2 * BLOCK_SIZE_BYTES),
            ],
            |index, window| {
                seen.lock().unwrap().push((
                    index,
                    window.as_ptr() as usize - base,
                    window.len(),
                    window[0],
                    window[window.len() - 1],
                ));
                async move { Ok(window) }
            },
        )
        .await
        .unwrap();
        assert_eq!(
            seen.into_inner().unwrap(),
            vec![
                (0, 0, BLOCK_SIZE_BYTES, 1, 1),
                (1, 2 * BLOCK_SIZE_BYTES, 2 * BLOCK_SIZE_BYTES, 3, 4),
            ]
        );
        assert_eq!(buffer.as_ptr() as usize, base, "the same memory, no copy");
    }

    #[tokio::test]
    async fn a_failed_window_fails_the_write() {
        let buffer = AlignedBuffer::new_zeroed(2 * BLOCK_SIZE_BYTES);
        let result = write_lent_windows(
            buffer,
            &[(0, BLOCK_SIZE_BYTES), (BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES)],
            |index, window| async move {
                if index == 1 {
                    drop(window);
                    Err(DeviceError::EngineStopped {
                        path: "test".into(),
                    })
                } else {
                    Ok(window)
                }
            },
        )
        .await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn a_window_still_held_after_a_failure_keeps_the_memory_alive() {
        let buffer = AlignedBuffer::new_zeroed(BLOCK_SIZE_BYTES);
        let kept = std::sync::Mutex::new(None);
        let result = write_lent_windows(buffer, &[(0, BLOCK_SIZE_BYTES)], |_, window| {
            *kept.lock().unwrap() = Some(window);
            async {
                Err(DeviceError::EngineStopped {
                    path: "test".into(),
                })
            }
        })
        .await;
        assert!(result.is_err());
        let window = kept.into_inner().unwrap().expect("kept");
        assert_eq!(window.len(), BLOCK_SIZE_BYTES, "still readable");
        assert!(window.iter().all(|&byte| byte == 0));
    }

    #[test]
    #[should_panic(expected = "window")]
    fn overlapping_windows_are_refused() {
        let buffer = AlignedBuffer::new_zeroed(2 * BLOCK_SIZE_BYTES);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _ = runtime.block_on(write_lent_windows(
            buffer,
            &[
                (0, 2 * BLOCK_SIZE_BYTES),
                (BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES),
            ],
            |_, window| async move { Ok(window) },
        ));
    }
}
