//! Validation of user-supplied names. Every name that enters a state machine passes through
//! here first, so bad input is refused with a clear reason before it can be logged or applied.

/// Longest entry name in bytes, as on ext4.
pub const ENTRY_NAME_LENGTH_BYTES_MAX: usize = 255;
/// Longest volume name in bytes: a Kubernetes DNS label, so a volume can be named after a PV.
pub const VOLUME_NAME_LENGTH_BYTES_MAX: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {length_bytes} bytes long; the limit is {limit_bytes}")]
    TooLong {
        length_bytes: usize,
        limit_bytes: usize,
    },
    #[error("name {name:?} is reserved")]
    Reserved { name: String },
    #[error("name {name:?} contains a forbidden character {character:?}")]
    ForbiddenCharacter { name: String, character: char },
}

/// A directory entry name: not empty, not `.` or `..`, no `/` and no NUL, at most 255 bytes.
pub fn validate_entry_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > ENTRY_NAME_LENGTH_BYTES_MAX {
        return Err(NameError::TooLong {
            length_bytes: name.len(),
            limit_bytes: ENTRY_NAME_LENGTH_BYTES_MAX,
        });
    }
    if name == "." || name == ".." {
        return Err(NameError::Reserved {
            name: name.to_owned(),
        });
    }
    if let Some(character) = name.chars().find(|&c| c == '/' || c == '\0') {
        return Err(NameError::ForbiddenCharacter {
            name: name.to_owned(),
            character,
        });
    }
    Ok(())
}

/// A volume name: a DNS label (lowercase ASCII letters, digits and `-`, not starting or ending
/// with `-`), at most 63 bytes.
pub fn validate_volume_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > VOLUME_NAME_LENGTH_BYTES_MAX {
        return Err(NameError::TooLong {
            length_bytes: name.len(),
            limit_bytes: VOLUME_NAME_LENGTH_BYTES_MAX,
        });
    }
    if let Some(character) = name
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
    {
        return Err(NameError::ForbiddenCharacter {
            name: name.to_owned(),
            character,
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::ForbiddenCharacter {
            name: name.to_owned(),
            character: '-',
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        assert!(validate_entry_name("ib_logfile0").is_ok());
        assert_eq!(validate_entry_name(""), Err(NameError::Empty));
        assert!(matches!(
            validate_entry_name(".."),
            Err(NameError::Reserved { .. })
        ));
        assert!(matches!(
            validate_entry_name("a/b"),
            Err(NameError::ForbiddenCharacter { .. })
        ));
        assert!(matches!(
            validate_entry_name("a\0b"),
            Err(NameError::ForbiddenCharacter { .. })
        ));
        assert!(validate_entry_name(&"x".repeat(255)).is_ok());
        assert!(matches!(
            validate_entry_name(&"x".repeat(256)),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn volume_names() {
        assert!(validate_volume_name("mysql-data-0").is_ok());
        assert!(validate_volume_name("Data").is_err());
        assert!(validate_volume_name("-data").is_err());
        assert!(validate_volume_name("data_1").is_err());
        assert!(validate_volume_name(&"a".repeat(64)).is_err());
    }
}
