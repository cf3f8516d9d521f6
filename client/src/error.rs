//! The one error type of `ballast-client`, and its translation to the POSIX errno a FUSE driver
//! hands to the kernel.
//!
//! Invariant: `ClientError::errno` never returns 0 and never panics; anything not understood maps
//! to `EIO`, because the kernel must always receive a valid error.

use ballast_common::{Errno, NameError};
use tonic::Code;

/// Everything that can go wrong in a call to a storage node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint could not be reached when the client was built.
    #[error("cannot connect to {endpoint}: {source}")]
    Transport {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The node answered with (or the transport produced) a gRPC status.
    #[error("{}: {message}{}", code_name(*code), errno_suffix(*errno))]
    Status {
        code: Code,
        message: String,
        /// The errno the server attached in the `ballast-errno` metadata, if any.
        errno: Option<Errno>,
    },
    /// The caller passed something the client refuses before sending it.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A name failed validation before it was sent.
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    /// The node's answer lacked a field the contract says is always present.
    #[error("malformed response from node: missing field {field}")]
    MissingField { field: &'static str },
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

fn errno_suffix(errno: Option<Errno>) -> String {
    errno.map(|errno| format!(" [{errno}]")).unwrap_or_default()
}

impl ClientError {
    /// Builds the error from a gRPC status, parsing the errno the server may have attached.
    pub fn from_status(status: &tonic::Status) -> Self {
        ClientError::Status {
            code: status.code(),
            message: status.message().to_owned(),
            errno: errno_from_metadata(status.metadata()),
        }
    }

    /// The gRPC code, when the error is a status.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when the node said the object does not exist (gRPC NotFound or errno ENOENT).
    pub fn is_not_found(&self) -> bool {
        self.errno() == Errno::ENOENT
    }

    /// The errno to hand to the kernel: the one the server attached, else one derived from the
    /// gRPC code. Unavailable and DeadlineExceeded become EIO: by the time a caller sees them the
    /// bounded retries are spent, and EIO is what a local disk reports for a lost device.
    pub fn errno(&self) -> Errno {
        match self {
            ClientError::Status {
                errno: Some(errno), ..
            } => *errno,
            ClientError::Status {
                code, errno: None, ..
            } => errno_from_code(*code),
            ClientError::Transport { .. } | ClientError::MissingField { .. } => Errno::EIO,
            ClientError::InvalidArgument(_) => Errno::EINVAL,
            ClientError::InvalidName(NameError::TooLong { .. }) => Errno::ENAMETOOLONG,
            ClientError::InvalidName(_) => Errno::EINVAL,
        }
    }
}

/// The errno implied by a gRPC code when the server attached none.
pub fn errno_from_code(code: Code) -> Errno {
    match code {
        Code::NotFound => Errno::ENOENT,
        Code::AlreadyExists => Errno::EEXIST,
        Code::InvalidArgument => Errno::EINVAL,
        Code::ResourceExhausted => Errno::ENOSPC,
        Code::PermissionDenied => Errno::EACCES,
        Code::Unimplemented => Errno::EOPNOTSUPP,
        Code::Unavailable | Code::DeadlineExceeded => Errno::EIO,
        _ => Errno::EIO,
    }
}

/// Parses the decimal errno in the `ballast-errno` metadata key. Absent, non-decimal or
/// non-positive values give `None`, so a garbled header falls back to the code mapping.
pub fn errno_from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Errno> {
    let value = metadata.get(ballast_proto::ERRNO_METADATA_KEY)?;
    let number: i32 = value.to_str().ok()?.trim().parse().ok()?;
    (number > 0).then_some(Errno(number))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with_errno(code: Code, errno_text: Option<&str>) -> tonic::Status {
        let mut status = tonic::Status::new(code, "test");
        if let Some(text) = errno_text {
            status.metadata_mut().insert(
                ballast_proto::ERRNO_METADATA_KEY,
                text.parse().expect("valid header"),
            );
        }
        status
    }

    #[test]
    fn code_mapping_without_metadata() {
        let cases = [
            (Code::NotFound, Errno::ENOENT),
            (Code::AlreadyExists, Errno::EEXIST),
            (Code::InvalidArgument, Errno::EINVAL),
            (Code::ResourceExhausted, Errno::ENOSPC),
            (Code::Unavailable, Errno::EIO),
            (Code::DeadlineExceeded, Errno::EIO),
            (Code::PermissionDenied, Errno::EACCES),
            (Code::Unimplemented, Errno::EOPNOTSUPP),
            (Code::Internal, Errno::EIO),
            (Code::Unknown, Errno::EIO),
            (Code::FailedPrecondition, Errno::EIO),
        ];
        for (code, expected) in cases {
            let error = ClientError::from_status(&status_with_errno(code, None));
            assert_eq!(error.errno(), expected, "code {code:?}");
        }
    }

    #[test]
    fn metadata_errno_wins_over_code() {
        let error =
            ClientError::from_status(&status_with_errno(Code::FailedPrecondition, Some("39")));
        assert_eq!(error.errno(), Errno::ENOTEMPTY);
        let error = ClientError::from_status(&status_with_errno(Code::NotFound, Some(" 20 ")));
        assert_eq!(error.errno(), Errno::ENOTDIR);
    }

    #[test]
    fn garbled_metadata_falls_back_to_code() {
        for text in ["", "abc", "0", "-5", "1.5"] {
            let error = ClientError::from_status(&status_with_errno(Code::NotFound, Some(text)));
            assert_eq!(error.errno(), Errno::ENOENT, "metadata {text:?}");
        }
    }

    #[test]
    fn client_side_errors() {
        assert_eq!(
            ClientError::InvalidArgument("x".into()).errno(),
            Errno::EINVAL
        );
        let too_long = ballast_common::validate_entry_name(&"x".repeat(300)).unwrap_err();
        assert_eq!(ClientError::from(too_long).errno(), Errno::ENAMETOOLONG);
        let reserved = ballast_common::validate_entry_name("..").unwrap_err();
        assert_eq!(ClientError::from(reserved).errno(), Errno::EINVAL);
        assert_eq!(
            ClientError::MissingField { field: "attr" }.errno(),
            Errno::EIO
        );
    }

    #[test]
    fn display_includes_errno() {
        let error = ClientError::from_status(&status_with_errno(Code::NotFound, Some("2")));
        assert_eq!(error.to_string(), "NotFound: test [ENOENT(2)]");
    }
}
