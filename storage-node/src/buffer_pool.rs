//! Reused aligned buffers for device requests: copies of write data, and whole-request reads.
//!
//! Why: every detached write copies its data (a `Bytes` from the gRPC decoder, not aligned for
//! `O_DIRECT`) into aligned 1 MiB buffers, one per device request. A fresh buffer each time
//! means fresh pages from the kernel: page faults and the kernel zeroing each page before the
//! copy overwrites it (perf of a sequential FUSE write, 2026-12-05: `clear_page_rep` and
//! faults under the prewrite, about 2 % of the node's CPU). The engine hands a written buffer
//! back, so it can serve the next request. A 1 MiB file read (`NodeStorage::read_file_blocks`)
//! is read into a pooled buffer that becomes the answer, and goes back to the pool when the
//! answer's `Bytes` is dropped ([`bytes_returning_to`]).
//!
//! Owns: idle buffers of exactly [`POOLED_BUFFER_BYTES`].
//! Must not depend on: anything but the device crate's `AlignedBuffer` and `bytes`.
//! Invariants: at most [`POOLED_BUFFER_COUNT_MAX`] idle buffers (16 MiB); a buffer handed out
//! is owned by its taker alone; every byte of a returned buffer is overwritten by its next user
//! (`filled_from` copies a whole buffer's worth), so stale data never reaches the device.

use std::sync::{Arc, Mutex};

use ballast_device::{AlignedBuffer, BLOCK_SIZE_BYTES};

use crate::storage::BLOCKS_PER_REQUEST_MAX;

/// The one size pooled: a whole device request.
pub const POOLED_BUFFER_BYTES: usize = BLOCKS_PER_REQUEST_MAX as usize * BLOCK_SIZE_BYTES;
/// Idle buffers kept; more are dropped when given back.
pub const POOLED_BUFFER_COUNT_MAX: usize = 16;

#[derive(Debug, Default)]
pub struct BufferPool {
    idle: Mutex<Vec<AlignedBuffer>>,
}

impl BufferPool {
    /// An aligned copy of `data` (whole blocks). Uses an idle buffer when `data` is exactly one
    /// pooled size; any other length gets a new buffer.
    pub fn filled_from(&self, data: &[u8]) -> AlignedBuffer {
        assert_eq!(data.len() % BLOCK_SIZE_BYTES, 0, "whole blocks only");
        if data.len() == POOLED_BUFFER_BYTES {
            if let Some(mut buffer) = self.lock().pop() {
                assert_eq!(buffer.len(), POOLED_BUFFER_BYTES);
                buffer.copy_from_slice(data);
                return buffer;
            }
        }
        AlignedBuffer::from_slice_padded(data)
    }

    /// A buffer of the pooled size for a read that overwrites every byte of it (a whole-buffer
    /// device read): an idle one, stale contents and all, or a new one.
    pub fn for_whole_read(&self) -> AlignedBuffer {
        self.lock()
            .pop()
            .unwrap_or_else(|| AlignedBuffer::new_zeroed(POOLED_BUFFER_BYTES))
    }

    /// Keeps `buffer` for a later [`BufferPool::filled_from`] if it is the pooled size and the
    /// pool has room; drops it otherwise.
    pub fn give_back(&self, buffer: AlignedBuffer) {
        if buffer.len() != POOLED_BUFFER_BYTES {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < POOLED_BUFFER_COUNT_MAX {
            idle.push(buffer);
        }
    }

    /// Idle buffers now.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuffer>> {
        // Each operation is one push or pop: a poisoned lock is still consistent.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The owner of a `Bytes` made from a buffer: gives the buffer back to its pool when the last
/// `Bytes` of it is dropped.
struct ReturnsToPool {
    buffer: Option<AlignedBuffer>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for ReturnsToPool {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_deref().expect("present until dropped")
    }
}

impl Drop for ReturnsToPool {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}

/// `buffer` as `Bytes`, without a copy; the buffer goes back to `pool` once no `Bytes` of it
/// is left.
pub fn bytes_returning_to(buffer: AlignedBuffer, pool: &Arc<BufferPool>) -> bytes::Bytes {
    bytes::Bytes::from_owner(ReturnsToPool {
        buffer: Some(buffer),
        pool: Arc::clone(pool),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_answers_give_their_buffer_back_when_the_last_bytes_go() {
        let pool = Arc::new(BufferPool::default());
        let mut buffer = pool.for_whole_read();
        buffer.fill(7);
        let address = buffer.as_ptr();
        let bytes = bytes_returning_to(buffer, &pool);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle_count(), 0, "a slice still holds the buffer");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(pool.for_whole_read().as_ptr(), address, "reused");
    }

    #[test]
    fn a_returned_buffer_is_reused_and_fully_overwritten() {
        let pool = BufferPool::default();
        let first = pool.filled_from(&vec![1u8; POOLED_BUFFER_BYTES]);
        let address = first.as_ptr();
        pool.give_back(first);
        assert_eq!(pool.idle_count(), 1);
        let second = pool.filled_from(&vec![2u8; POOLED_BUFFER_BYTES]);
        assert_eq!(second.as_ptr(), address, "the idle buffer was reused");
        assert!(
            second.iter().all(|&byte| byte == 2),
            "no stale byte is left"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    #[test]
    fn other_sizes_are_not_pooled_and_the_pool_is_bounded() {
        let pool = BufferPool::default();
        let small = pool.filled_from(&vec![3u8; BLOCK_SIZE_BYTES]);
        assert_eq!(&small[..], &vec![3u8; BLOCK_SIZE_BYTES][..]);
        pool.give_back(small);
        assert_eq!(pool.idle_count(), 0);
        for _ in 0..POOLED_BUFFER_COUNT_MAX + 3 {
            pool.give_back(AlignedBuffer::new_zeroed(POOLED_BUFFER_BYTES));
        }
        assert_eq!(pool.idle_count(), POOLED_BUFFER_COUNT_MAX);
    }
}
