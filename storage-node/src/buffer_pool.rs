//! Reused aligned buffers for device requests: copies of write data, and whole-request reads.
//!
//! Why: every detached write copies its data (a `Bytes` from the gRPC decoder, not aligned for
//! `O_DIRECT`) into aligned 1 MiB buffers, one per device request. A fresh buffer each time
//! means fresh pages from the kernel: page faults and the kernel zeroing each page before the
//! copy overwrites it (perf of a sequential FUSE write, 2026-12-05: `clear_page_rep` and
//! faults under the prewrite, about 2 % of the node's CPU). The engine hands a written buffer
//! back, so it can serve the next request. A 1 MiB file read (`NodeStorage::read_file_blocks`)
//! is read into a pooled buffer that becomes the answer, and goes back to the pool when the
//! answer's `Bytes` is dropped ([`bytes_returning_to`]). A write copied out of a shared slot
//! is copied into a pooled buffer of its length rounded up to whole MiB
//! ([`BufferPool::for_copy`]), which becomes the Raft entry's bytes and comes back when the
//! last of them is dropped: fresh huge pages for each write cost the kernel's zeroing, 6 % of
//! the machine's samples in a sequential FUSE write (perf, 2026-12-06).
//!
//! Owns: idle buffers whose lengths are whole multiples of [`POOLED_BUFFER_BYTES`], up to
//! [`POOLED_BUFFER_LENGTH_BYTES_MAX`].
//! Must not depend on: anything but the device crate's `AlignedBuffer` and `bytes`.
//! Invariants: at most [`POOLED_IDLE_BYTES_MAX`] bytes of idle buffers; a buffer handed out is
//! owned by its taker alone; stale bytes of a reused buffer never reach the device or a
//! reader: `filled_from` copies a whole buffer's worth, a whole read overwrites every byte, and
//! a copy's taker uses only the bytes it copied (`write_data.rs`).

use std::sync::{Arc, Mutex};

use ballast_device::{AlignedBuffer, BLOCK_SIZE_BYTES};

use crate::storage::BLOCKS_PER_REQUEST_MAX;

/// The unit of pooled lengths: a whole device request.
pub const POOLED_BUFFER_BYTES: usize = BLOCKS_PER_REQUEST_MAX as usize * BLOCK_SIZE_BYTES;
/// The longest buffer pooled (the longest write served, `service::filesystem`).
pub const POOLED_BUFFER_LENGTH_BYTES_MAX: usize = 16 * POOLED_BUFFER_BYTES;
/// Bytes of idle buffers kept; more are dropped when given back.
pub const POOLED_IDLE_BYTES_MAX: usize = 32 * POOLED_BUFFER_BYTES;

#[derive(Debug, Default)]
pub struct BufferPool {
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    buffers: Vec<AlignedBuffer>,
    bytes: usize,
}

impl Idle {
    /// An idle buffer exactly `length_bytes` long.
    fn take(&mut self, length_bytes: usize) -> Option<AlignedBuffer> {
        let position = self
            .buffers
            .iter()
            .rposition(|buffer| buffer.len() == length_bytes)?;
        let buffer = self.buffers.swap_remove(position);
        self.bytes -= buffer.len();
        Some(buffer)
    }
}

impl BufferPool {
    /// An aligned copy of `data` (whole blocks). Uses an idle buffer when `data` is exactly one
    /// pooled length; any other length gets a new buffer.
    pub fn filled_from(&self, data: &[u8]) -> AlignedBuffer {
        assert_eq!(data.len() % BLOCK_SIZE_BYTES, 0, "whole blocks only");
        if let Some(mut buffer) = self.idle_of(data.len()) {
            buffer.copy_from_slice(data);
            return buffer;
        }
        AlignedBuffer::from_slice_padded(data)
    }

    /// A buffer of the pooled size for a read that overwrites every byte of it (a whole-buffer
    /// device read): an idle one, stale contents and all, or a new one.
    pub fn for_whole_read(&self) -> AlignedBuffer {
        self.idle_of(POOLED_BUFFER_BYTES)
            .unwrap_or_else(|| AlignedBuffer::new_zeroed(POOLED_BUFFER_BYTES))
    }

    /// A buffer whose first `data.len()` bytes are a copy of `data`, and at least that long:
    /// its length rounded up to a power of two of at least [`POOLED_BUFFER_BYTES`], so it can
    /// come from and go back to the pool. The bytes after the copy are stale: the taker must
    /// use only the copy.
    pub fn for_copy(&self, data: &[u8]) -> AlignedBuffer {
        // Powers of two: the driver's combined writes are 1 to 4 MiB, and fewer lengths meet
        // more idle buffers of their own length.
        let length_bytes = data.len().max(POOLED_BUFFER_BYTES).next_power_of_two();
        if length_bytes > POOLED_BUFFER_LENGTH_BYTES_MAX {
            return AlignedBuffer::from_slice_padded(data);
        }
        let found = self.idle_of(length_bytes);
        match found {
            Some(mut buffer) => {
                buffer[..data.len()].copy_from_slice(data);
                buffer
            }
            None => AlignedBuffer::from_slice_padded_to(data, length_bytes),
        }
    }

    /// Keeps `buffer` for later use if its length is pooled, dropping the oldest idle buffers
    /// while the pool has no room for it; drops it if its length is not pooled.
    pub fn give_back(&self, buffer: AlignedBuffer) {
        let length_bytes = buffer.len();
        if length_bytes % POOLED_BUFFER_BYTES != 0 || length_bytes > POOLED_BUFFER_LENGTH_BYTES_MAX
        {
            return;
        }
        let mut idle = self.lock();
        // The oldest idle buffers make room: what comes back follows what is taken, so the
        // pool keeps the lengths in demand now.
        while idle.bytes + length_bytes > POOLED_IDLE_BYTES_MAX && !idle.buffers.is_empty() {
            let oldest = idle.buffers.remove(0);
            idle.bytes -= oldest.len();
        }
        if idle.bytes + length_bytes <= POOLED_IDLE_BYTES_MAX {
            idle.bytes += length_bytes;
            idle.buffers.push(buffer);
        }
    }

    /// Idle buffers now.
    pub fn idle_count(&self) -> usize {
        self.lock().buffers.len()
    }

    fn idle_of(&self, length_bytes: usize) -> Option<AlignedBuffer> {
        self.lock().take(length_bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        // Each operation is one push or removal with its count: a poisoned lock is still
        // consistent.
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
        pool.give_back(AlignedBuffer::new_zeroed(
            POOLED_BUFFER_LENGTH_BYTES_MAX + POOLED_BUFFER_BYTES,
        ));
        assert_eq!(pool.idle_count(), 0, "longer than pooled");
        let count_max = POOLED_IDLE_BYTES_MAX / POOLED_BUFFER_BYTES;
        let mut addresses = Vec::new();
        for _ in 0..count_max {
            let buffer = AlignedBuffer::new_zeroed(POOLED_BUFFER_BYTES);
            addresses.push(buffer.as_ptr() as usize);
            pool.give_back(buffer);
        }
        assert_eq!(pool.idle_count(), count_max);
        pool.give_back(AlignedBuffer::new_zeroed(POOLED_BUFFER_BYTES));
        assert_eq!(pool.idle_count(), count_max, "the oldest made room");
        pool.give_back(AlignedBuffer::new_zeroed(2 * POOLED_BUFFER_BYTES));
        assert_eq!(
            pool.idle_count(),
            count_max - 1,
            "the idle bytes are bounded: two more of the oldest made room"
        );
        // Held, so no address is reused while they are counted.
        let mut taken = Vec::new();
        while let Some(buffer) = pool.idle_of(POOLED_BUFFER_BYTES) {
            taken.push(buffer);
        }
        let mut taken_addresses: Vec<usize> = taken
            .iter()
            .map(|buffer| buffer.as_ptr() as usize)
            .collect();
        taken_addresses.sort_unstable();
        let mut kept = addresses[3..].to_vec();
        kept.sort_unstable();
        assert_eq!(taken_addresses.len(), count_max - 2);
        assert!(
            kept.iter().all(|address| taken_addresses.contains(address)),
            "the three oldest were the ones dropped"
        );
        assert_eq!(
            pool.idle_of(2 * POOLED_BUFFER_BYTES)
                .map(|buffer| buffer.len()),
            Some(2 * POOLED_BUFFER_BYTES)
        );
    }

    #[test]
    fn a_copy_gets_a_buffer_of_whole_pooled_lengths_that_comes_back() {
        let pool = Arc::new(BufferPool::default());
        let data = vec![4u8; POOLED_BUFFER_BYTES + 3 * BLOCK_SIZE_BYTES];
        let buffer = pool.for_copy(&data);
        assert_eq!(buffer.len(), 2 * POOLED_BUFFER_BYTES);
        assert_eq!(&buffer[..data.len()], &data[..]);
        let address = buffer.as_ptr();
        let bytes = bytes_returning_to(buffer, &pool).slice(..data.len());
        assert_eq!(pool.idle_count(), 0);
        drop(bytes);
        assert_eq!(pool.idle_count(), 1);
        // A shorter copy of the same rounded length reuses it; only its own bytes are new.
        let shorter = vec![5u8; POOLED_BUFFER_BYTES + BLOCK_SIZE_BYTES];
        let reused = pool.for_copy(&shorter);
        assert_eq!(reused.as_ptr(), address, "reused");
        assert_eq!(&reused[..shorter.len()], &shorter[..]);
        // One MiB and less take the smallest pooled length.
        let small = pool.for_copy(&[6u8; BLOCK_SIZE_BYTES]);
        assert_eq!(small.len(), POOLED_BUFFER_BYTES);
        assert_eq!(&small[..BLOCK_SIZE_BYTES], &[6u8; BLOCK_SIZE_BYTES][..]);
    }
}
