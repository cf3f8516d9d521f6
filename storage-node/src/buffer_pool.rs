//! Reused aligned buffers for the copies of write data into device requests.
//!
//! Why: every detached write copies its data (a `Bytes` from the gRPC decoder, not aligned for
//! `O_DIRECT`) into aligned 1 MiB buffers, one per device request. A fresh buffer each time
//! means fresh pages from the kernel: page faults and the kernel zeroing each page before the
//! copy overwrites it (perf of a sequential FUSE write, 2026-12-05: `clear_page_rep` and
//! faults under the prewrite, about 2 % of the node's CPU). The engine hands a written buffer
//! back, so it can serve the next request.
//!
//! Owns: idle buffers of exactly [`POOLED_BUFFER_BYTES`].
//! Must not depend on: anything but the device crate's `AlignedBuffer`.
//! Invariants: at most [`POOLED_BUFFER_COUNT_MAX`] idle buffers (16 MiB); a buffer handed out
//! is owned by its taker alone; every byte of a returned buffer is overwritten by its next user
//! (`filled_from` copies a whole buffer's worth), so stale data never reaches the device.

use std::sync::Mutex;

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

#[cfg(test)]
mod tests {
    use super::*;

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
