//! `AlignedBuffer`: the only buffer type that crosses into the I/O engine.
//!
//! Design: O_DIRECT requires the memory address, the file offset and the length of every transfer
//! to be aligned to the logical block size. Rather than check this at each call site, the buffer
//! type makes misaligned memory unrepresentable: the allocation is aligned to 4096 bytes and its
//! length is a non-zero multiple of 4096. The heap allocation never moves when the value moves,
//! which is what lets the engine thread hand the raw pointer to the kernel while owning the value.
//!
//! Owns: one heap allocation, or (a *lent* buffer, [`AlignedBuffer::lent`]) a window of memory
//! that a lender keeps mapped, such as a region shared with a FUSE driver, so a device read can
//! land straight in the driver's memory.
//! Must not depend on: anything else in the crate but the block size.
//! Buffers of 1 MiB and more are placed on transparent huge pages (see
//! `HUGE_PAGE_BUFFER_BYTES_MIN`): one segment per transfer for the device.
//! Invariants: `pointer` is aligned to `BLOCK_SIZE_BYTES` (to 2 MiB for buffers of 1 MiB and
//! more); `length_bytes` is a non-zero multiple
//! of `BLOCK_SIZE_BYTES`; every byte is initialised before the value exists (allocated zeroed,
//! or copied and zero-padded in `from_slice_padded`, or initialised by the lender); a lent
//! buffer's memory is never freed here, and its lender lives as long as the buffer.

use std::alloc::Layout;
use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::BLOCK_SIZE_BYTES;

pub struct AlignedBuffer {
    pointer: NonNull<u8>,
    length_bytes: usize,
    /// `Some` for a lent buffer: whoever keeps the memory mapped. Held, never freed here.
    lender: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: the buffer exclusively owns its allocation (like a `Box<[u8]>`), or for a lent buffer
// its window of the lender's memory (the caller of `lent` promised no one else in the process
// uses it, and the lender is `Send + Sync`); no aliasing pointer escapes except to the engine
// thread, which takes ownership of the whole value while the kernel uses the memory.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared references only allow reading the initialised bytes, as for `&[u8]`.
unsafe impl Sync for AlignedBuffer {}

/// Buffers at least this long are placed on transparent huge pages.
///
/// Why: a 1 MiB transfer from 256 scattered 4 KiB pages is 256 segments for the device, and the
/// VM's virtio disk takes at most 254 per request; on huge pages it is one segment. Measured
/// 2026-12-05 (`ballast-device-bench`, 1 MiB sequential writes at QD8, two rounds): 2,584 /
/// 2,613 MB/s on huge pages against 1,275 / 1,561 MB/s on small ones, fio 1,141 / 1,183 in the
/// same minutes. A 1 MiB buffer then takes a whole 2 MiB page: callers keep few of them.
const HUGE_PAGE_BUFFER_BYTES_MIN: usize = 1 << 20;
/// The size and alignment of a transparent huge page on x86-64.
const HUGE_PAGE_BYTES: usize = 2 << 20;

impl AlignedBuffer {
    fn layout(length_bytes: usize) -> Layout {
        if length_bytes >= HUGE_PAGE_BUFFER_BYTES_MIN {
            return Layout::from_size_align(
                length_bytes.next_multiple_of(HUGE_PAGE_BYTES),
                HUGE_PAGE_BYTES,
            )
            .expect("valid huge page buffer layout");
        }
        Layout::from_size_align(length_bytes, BLOCK_SIZE_BYTES).expect("valid buffer layout")
    }

    /// Allocates `layout`; large ones are advised onto huge pages before any byte is touched
    /// (advice given after the first touch would not move pages already faulted in). Zeroes the
    /// first `zeroed_bytes` bytes.
    fn allocate(layout: Layout, zeroed_bytes: usize) -> NonNull<u8> {
        debug_assert!(zeroed_bytes <= layout.size());
        // SAFETY: every layout made by `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let pointer = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        if layout.align() == HUGE_PAGE_BYTES {
            // SAFETY: a range of our own fresh allocation, aligned and sized in whole huge
            // pages. Advice only: where the kernel has no huge page (or THP is off) the memory
            // stays on small pages and works the same, so the result is not needed.
            let _ = unsafe { libc::madvise(raw.cast(), layout.size(), libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `zeroed_bytes <= layout.size()`, inside the allocation.
        unsafe { std::ptr::write_bytes(raw, 0, zeroed_bytes) };
        pointer
    }

    /// A zero-filled buffer. `length_bytes` must be a non-zero multiple of 4096.
    pub fn new_zeroed(length_bytes: usize) -> AlignedBuffer {
        assert!(length_bytes > 0, "an aligned buffer cannot be empty");
        assert!(
            length_bytes % BLOCK_SIZE_BYTES == 0,
            "buffer length {length_bytes} is not a multiple of {BLOCK_SIZE_BYTES}"
        );
        let pointer = Self::allocate(Self::layout(length_bytes), length_bytes);
        AlignedBuffer {
            pointer,
            length_bytes,
            lender: None,
        }
    }

    /// A copy of `bytes`, zero-padded up to the next multiple of 4096 (an empty slice gives one
    /// zeroed block).
    ///
    /// Why not `new_zeroed` and a copy: this is the data path of every large write, and zeroing
    /// bytes that are overwritten at once cost 7 % of the node's CPU in a sequential FUSE write
    /// (perf, 2026-12-04). Only the padding is zeroed here.
    pub fn from_slice_padded(bytes: &[u8]) -> AlignedBuffer {
        let length_bytes = bytes.len().div_ceil(BLOCK_SIZE_BYTES).max(1) * BLOCK_SIZE_BYTES;
        AlignedBuffer::from_slice_padded_to(bytes, length_bytes)
    }

    /// A copy of `bytes` zero-padded to `length_bytes` (a non-zero multiple of 4096, at least
    /// `bytes.len()`): a buffer longer than its first use, so it can be reused for longer ones.
    pub fn from_slice_padded_to(bytes: &[u8], length_bytes: usize) -> AlignedBuffer {
        assert!(
            length_bytes > 0 && length_bytes % BLOCK_SIZE_BYTES == 0 && bytes.len() <= length_bytes,
            "a copy of {} bytes padded to {length_bytes}",
            bytes.len()
        );
        let pointer = Self::allocate(Self::layout(length_bytes), 0);
        let raw = pointer.as_ptr();
        // SAFETY: `raw` is valid for at least `length_bytes` bytes of writes and cannot overlap
        // `bytes` (it was just allocated); `bytes.len() <= length_bytes`, so the copy and the
        // zeroed padding together initialise exactly the buffer's bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), raw, bytes.len());
            std::ptr::write_bytes(raw.add(bytes.len()), 0, length_bytes - bytes.len());
        }
        AlignedBuffer {
            pointer,
            length_bytes,
            lender: None,
        }
    }

    /// A buffer over `length_bytes` of memory at `pointer` that `lender` keeps mapped (a region
    /// shared with another process). Dropping it drops the hold on `lender`; the memory is not
    /// freed.
    ///
    /// # Safety
    /// `pointer` must be aligned to 4096, `length_bytes` a non-zero multiple of 4096, and the
    /// memory initialised, readable and writable for `length_bytes` bytes for as long as
    /// `lender` lives. No other buffer, reference or thread of this process may use that memory
    /// while this buffer exists. (Another process writing to it can only change the bytes seen,
    /// as with a shared file mapping; callers check what they read, by checksum.)
    pub unsafe fn lent(
        pointer: NonNull<u8>,
        length_bytes: usize,
        lender: Arc<dyn Any + Send + Sync>,
    ) -> AlignedBuffer {
        assert!(
            length_bytes > 0 && length_bytes % BLOCK_SIZE_BYTES == 0,
            "lent buffer length {length_bytes} is not a positive multiple of {BLOCK_SIZE_BYTES}"
        );
        assert_eq!(
            pointer.as_ptr() as usize % BLOCK_SIZE_BYTES,
            0,
            "lent buffer is not aligned to {BLOCK_SIZE_BYTES}"
        );
        AlignedBuffer {
            pointer,
            length_bytes,
            lender: Some(lender),
        }
    }

    /// Length in bytes (a multiple of 4096).
    #[allow(clippy::len_without_is_empty)] // never empty by construction
    pub fn len(&self) -> usize {
        self.length_bytes
    }

    pub(crate) fn as_mut_pointer(&mut self) -> *mut u8 {
        self.pointer.as_ptr()
    }

    /// For transfers that only read the buffer (writes to the device).
    pub(crate) fn as_pointer(&self) -> *const u8 {
        self.pointer.as_ptr()
    }
}

impl Deref for AlignedBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation is `length_bytes` long, initialised at construction and
        // owned by `self`, whose borrow bounds the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.length_bytes) }
    }
}

impl DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.pointer.as_ptr(), self.length_bytes) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        if self.lender.is_some() {
            // Lent memory belongs to the lender; dropping the field releases our hold.
            return;
        }
        // SAFETY: an unlent buffer's `pointer` came from `allocate` with exactly this layout
        // (`layout` depends on the length alone) and is freed once.
        unsafe { std::alloc::dealloc(self.pointer.as_ptr(), Self::layout(self.length_bytes)) }
    }
}

impl Clone for AlignedBuffer {
    fn clone(&self) -> AlignedBuffer {
        let mut copy = AlignedBuffer::new_zeroed(self.length_bytes);
        copy.copy_from_slice(self);
        copy
    }
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AlignedBuffer")
            .field("length_bytes", &self.length_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_buffer_uses_the_lenders_memory_and_frees_nothing() {
        let lender = Arc::new(std::sync::Mutex::new(AlignedBuffer::new_zeroed(3 * 4096)));
        let pointer = {
            let mut owned = lender.lock().unwrap();
            // SAFETY: one block into an allocation of three, so inside it and aligned.
            NonNull::new(unsafe { owned.as_mut_pointer().add(4096) }).unwrap()
        };
        // SAFETY: two blocks of the lender's live allocation, untouched by anyone else while
        // the lent buffer exists (the lender's own handle is not used until it is dropped).
        let mut lent = unsafe { AlignedBuffer::lent(pointer, 8192, lender.clone()) };
        lent.fill(5);
        assert_eq!(Arc::strong_count(&lender), 2);
        drop(lent);
        assert_eq!(Arc::strong_count(&lender), 1);
        let owned = lender.lock().unwrap();
        assert!(owned[..4096].iter().all(|&byte| byte == 0));
        assert!(owned[4096..12288].iter().all(|&byte| byte == 5));
    }

    #[test]
    fn large_buffers_start_on_a_huge_page_boundary_and_hold_their_bytes() {
        let zeroed = AlignedBuffer::new_zeroed(1 << 20);
        assert_eq!(zeroed.as_pointer() as usize % HUGE_PAGE_BYTES, 0);
        assert!(zeroed.iter().all(|&byte| byte == 0));
        let bytes: Vec<u8> = (0..(1 << 20) + 5)
            .map(|index| (index % 251) as u8)
            .collect();
        let copied = AlignedBuffer::from_slice_padded(&bytes);
        assert_eq!(copied.len(), (1 << 20) + 4096);
        assert_eq!(copied.as_pointer() as usize % HUGE_PAGE_BYTES, 0);
        assert_eq!(&copied[..bytes.len()], &bytes[..]);
        assert!(copied[bytes.len()..].iter().all(|&byte| byte == 0));
        // Small buffers keep the block alignment only.
        let small = AlignedBuffer::new_zeroed(8192);
        assert_eq!(small.as_pointer() as usize % BLOCK_SIZE_BYTES, 0);
    }

    #[test]
    fn alignment_and_padding() {
        let buffer = AlignedBuffer::new_zeroed(8192);
        assert_eq!(buffer.as_ptr() as usize % BLOCK_SIZE_BYTES, 0);
        assert!(buffer.iter().all(|&byte| byte == 0));
        assert_eq!(AlignedBuffer::from_slice_padded(&[]).len(), 4096);
        let padded = AlignedBuffer::from_slice_padded(&[7u8; 4097]);
        assert_eq!(padded.len(), 8192);
        assert_eq!(padded[4096], 7);
        assert_eq!(padded[4097], 0);
        let exact: Vec<u8> = (0..8192u32).map(|index| index as u8).collect();
        assert_eq!(&AlignedBuffer::from_slice_padded(&exact)[..], &exact[..]);
        let tail = AlignedBuffer::from_slice_padded(&[9u8; 10]);
        assert!(
            tail[10..].iter().all(|&byte| byte == 0),
            "padding is zeroed"
        );
    }

    #[test]
    #[should_panic]
    fn unaligned_length_panics() {
        let _ = AlignedBuffer::new_zeroed(100);
    }
}
