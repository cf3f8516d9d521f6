//! The one checksum used wherever Ballast data rests: CRC-32 (IEEE), via `crc32fast`, which uses
//! the CPU's carry-less multiply instructions where present.

/// CRC-32 of `bytes`.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// CRC-32 over several slices as if they were one.
pub fn checksum_parts(parts: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_equal_whole() {
        assert_eq!(
            checksum(b"hello world"),
            checksum_parts(&[b"hello", b" ", b"world"])
        );
        assert_ne!(checksum(b"hello world"), checksum(b"hello worle"));
    }
}
