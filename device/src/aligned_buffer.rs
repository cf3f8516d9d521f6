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
//! Invariants: `pointer` is aligned to `BLOCK_SIZE_BYTES`; `length_bytes` is a non-zero multiple
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

// SAFETY: the buffer exclusively owns its allocation (like a `Box<[u8]>`); no aliasing pointer
// escapes except to the engine thread, which takes ownership of the whole value while the kernel
// uses the memory.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared references only allow reading the initialised bytes, as for `&[u8]`.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    fn layout(length_bytes: usize) -> Layout {
        Layout::from_size_align(length_bytes, BLOCK_SIZE_BYTES).expect("valid buffer layout")
    }

    /// A zero-filled buffer. `length_bytes` must be a non-zero multiple of 4096.
    pub fn new_zeroed(length_bytes: usize) -> AlignedBuffer {
        assert!(length_bytes > 0, "an aligned buffer cannot be empty");
        assert!(
            length_bytes % BLOCK_SIZE_BYTES == 0,
            "buffer length {length_bytes} is not a multiple of {BLOCK_SIZE_BYTES}"
        );
        let layout = Self::layout(length_bytes);
        // SAFETY: the layout has a non-zero size (asserted above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let pointer = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
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
        let layout = Self::layout(length_bytes);
        // SAFETY: the layout has a non-zero size (at least one block).
        let raw = unsafe { std::alloc::alloc(layout) };
        let pointer = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // SAFETY: `raw` is valid for `length_bytes` bytes of writes and cannot overlap `bytes`
        // (it was just allocated); `bytes.len() <= length_bytes`, so the copy and the zeroed
        // padding together initialise exactly the whole allocation.
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
        // SAFETY: an unlent buffer's `pointer` came from `alloc_zeroed` or `alloc` with exactly
        // this layout and is freed once.
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
    #[should_panic]
    fn unaligned_length_panics() {
        let _ = AlignedBuffer::new_zeroed(100);
    }
}
