//! Helpers shared by the device crate's unit tests.
//!
//! Owns: nothing but test scaffolding. Must not be used outside `#[cfg(test)]` code.

/// A temporary file of `size_bytes` (sparse), removed when dropped.
pub(crate) fn scratch_file(size_bytes: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temporary file");
    file.as_file().set_len(size_bytes).expect("size the file");
    file
}

/// An aligned buffer of `length_bytes` filled with a pattern that differs by `seed`.
pub(crate) fn patterned(length_bytes: usize, seed: u8) -> crate::AlignedBuffer {
    let mut buffer = crate::AlignedBuffer::new_zeroed(length_bytes);
    for (position, byte) in buffer.iter_mut().enumerate() {
        *byte = (position as u8).wrapping_mul(31).wrapping_add(seed);
    }
    buffer
}
