//! The mapping from a CSI volume `name` (chosen by the CO, e.g. `pvc-<uuid>`) to a Ballast volume
//! name, which is also the CSI volume id.
//!
//! Owns: the one deterministic rule that makes CreateVolume idempotent: the same CSI name always
//! yields the same Ballast name, on every controller replica and across restarts.
//! Must not depend on: anything but `ballast-common`'s name rules.
//! Invariants:
//! - A CSI name that already is a valid Ballast volume name (lowercase DNS label of at most 63
//!   bytes; all Kubernetes PV names `pvc-<uuid>` are) maps to itself.
//! - Any other name maps to `<sanitised prefix>-<16 hex digits of FNV-1a-64 of the original>`;
//!   the hash keeps names that sanitise alike (`Data_1` and `data-1`) apart. The hash function is
//!   written out here, not taken from `std`, because its output must never change between
//!   releases.

use ballast_common::name::VOLUME_NAME_LENGTH_BYTES_MAX;
use ballast_common::validate_volume_name;

use crate::CsiError;

/// Longest CSI name accepted (the spec's general limit for string fields is 128 bytes).
pub const CSI_NAME_LENGTH_BYTES_MAX: usize = 128;

/// Hex digits of the hash suffix of a mapped name.
const HASH_SUFFIX_LENGTH: usize = 16;

/// The Ballast volume name for CSI volume name `csi_name`.
pub fn volume_name_for(csi_name: &str) -> Result<String, CsiError> {
    if csi_name.is_empty() {
        return Err(CsiError::InvalidArgument(
            "CreateVolume: name is required".to_owned(),
        ));
    }
    if csi_name.len() > CSI_NAME_LENGTH_BYTES_MAX {
        return Err(CsiError::InvalidArgument(format!(
            "CreateVolume: name is {} bytes long; at most {CSI_NAME_LENGTH_BYTES_MAX} are allowed",
            csi_name.len()
        )));
    }
    // The spec bans control characters other than common whitespace.
    if let Some(character) = csi_name
        .chars()
        .find(|&c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(CsiError::InvalidArgument(format!(
            "CreateVolume: name contains the control character {character:?}"
        )));
    }
    if validate_volume_name(csi_name).is_ok() {
        return Ok(csi_name.to_owned());
    }
    let suffix = format!("{:016x}", fnv1a_64(csi_name.as_bytes()));
    let prefix_length_max = VOLUME_NAME_LENGTH_BYTES_MAX - HASH_SUFFIX_LENGTH - 1;
    let prefix = sanitise(csi_name, prefix_length_max);
    let name = if prefix.is_empty() {
        format!("volume-{suffix}")
    } else {
        format!("{prefix}-{suffix}")
    };
    // By construction the result is valid; check anyway so a future rule change in
    // ballast-common surfaces as a clear error instead of a refused volume later.
    validate_volume_name(&name).map_err(|error| {
        CsiError::Internal(format!("mapped volume name {name:?} is invalid: {error}"))
    })?;
    Ok(name)
}

/// Lowercase ASCII letters and digits kept, every other run of characters turned into one '-',
/// no '-' at either end, at most `length_max` bytes.
fn sanitise(name: &str, length_max: usize) -> String {
    let mut sanitised = String::with_capacity(name.len().min(length_max));
    for character in name.chars() {
        if sanitised.len() >= length_max {
            break;
        }
        let lower = character.to_ascii_lowercase();
        if lower.is_ascii_lowercase() || lower.is_ascii_digit() {
            sanitised.push(lower);
        } else if !sanitised.is_empty() && !sanitised.ends_with('-') {
            sanitised.push('-');
        }
    }
    while sanitised.ends_with('-') {
        sanitised.pop();
    }
    sanitised
}

/// FNV-1a, 64 bits: tiny, stable and well distributed for short strings. Not cryptographic;
/// names come from the CO, which is trusted with creating volumes anyway.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_pv_names_map_to_themselves() {
        let name = "pvc-3f8a2c1e-9b7d-4e6f-a1b2-c3d4e5f60718";
        assert_eq!(volume_name_for(name).unwrap(), name);
        assert_eq!(volume_name_for("data").unwrap(), "data");
    }

    #[test]
    fn other_names_map_deterministically_to_valid_distinct_names() {
        let first = volume_name_for("My_Volume.1").unwrap();
        assert_eq!(first, volume_name_for("My_Volume.1").unwrap());
        assert!(first.starts_with("my-volume-1-"), "{first}");
        assert!(validate_volume_name(&first).is_ok());
        // Names that sanitise alike stay distinct.
        let second = volume_name_for("my-volume-1-").unwrap();
        assert_ne!(first, second);
        // The hash is fixed forever: this value must never change.
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn long_and_symbol_only_names_fit() {
        let long = "x".repeat(100);
        let mapped = volume_name_for(&long).unwrap();
        assert!(mapped.len() <= VOLUME_NAME_LENGTH_BYTES_MAX);
        assert!(validate_volume_name(&mapped).is_ok());
        let symbols = volume_name_for("___").unwrap();
        assert!(symbols.starts_with("volume-"), "{symbols}");
        assert!(validate_volume_name(&symbols).is_ok());
    }

    #[test]
    fn empty_long_and_control_names_are_refused() {
        assert!(matches!(
            volume_name_for(""),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            volume_name_for(&"a".repeat(129)),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            volume_name_for("a\u{1}b"),
            Err(CsiError::InvalidArgument(_))
        ));
    }
}
