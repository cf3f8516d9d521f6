//! Allocator tuning for the data-path binaries (storage node, FUSE driver).
//!
//! Why: the data path allocates many short-lived buffers of about 1 MiB (a FUSE write, a log
//! batch, a block-store write). glibc serves requests above its mmap threshold with a fresh
//! `mmap` and trims a heap whose free top exceeds its trim threshold; either way every such
//! buffer pays a page fault per 4 KiB and the kernel's page clearing, which measured 7-17 % of the
//! node's CPU in a sequential FUSE write. Raising both thresholds keeps freed buffers in the heap
//! for reuse. The cost is bounded: the heap keeps at most what was in use at the peak, and every
//! data-path queue is bounded.
//!
//! Must not depend on: anything but libc. Only binaries call this, once, before spawning threads.

/// Largest allocation served from the heap rather than by `mmap`.
const HEAP_ALLOCATION_BYTES_MAX: i32 = 64 << 20;
/// Free bytes at the top of a heap before glibc gives them back to the kernel.
const HEAP_TRIM_BYTES_MIN: i32 = 512 << 20;

/// Keeps large freed buffers in the process heap for reuse (glibc only; elsewhere a no-op).
/// Returns whether the allocator accepted the settings.
pub fn keep_large_buffers_in_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before the binary
        // starts its threads, and both values are within glibc's accepted ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_ALLOCATION_BYTES_MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_TRIM_BYTES_MIN) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_are_accepted_on_glibc() {
        let accepted = super::keep_large_buffers_in_heap();
        assert_eq!(accepted, cfg!(all(target_os = "linux", target_env = "gnu")));
    }
}
