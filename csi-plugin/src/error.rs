//! The one error type of the CSI plugin, and its translation into the gRPC codes the CSI spec
//! prescribes.
//!
//! Owns: the mapping from Ballast client errors (storage node answers) and local I/O failures to
//! CSI status codes.
//! Must not depend on: the services; every module returns [`CsiError`] and the services convert
//! at the boundary.
//! Invariant: transient failures (storage node unreachable, timeouts) become `UNAVAILABLE`, which
//! COs retry; request errors never do.

use std::path::PathBuf;

use ballast_client::ClientError;
use tonic::{Code, Status};

/// Everything a CSI call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// The request is malformed (missing field, bad parameter, unsupported capability).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or path of a volume) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name or path is in use with incompatible attributes.
    #[error("{0}")]
    AlreadyExists(String),
    /// The requested capacity cannot be provided.
    #[error("{0}")]
    OutOfRange(String),
    /// Another operation on the same volume is in flight, or a paging token is invalid.
    #[error("{0}")]
    Aborted(String),
    /// The call is valid but the volume is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The call is part of CSI but not supported by this plugin (its capability is not
    /// advertised).
    #[error("{0}")]
    Unimplemented(String),
    /// A local helper (the FUSE mounter) cannot be reached or did not answer in time; the CO
    /// retries.
    #[error("{0}")]
    Unavailable(String),
    /// The storage node answered with an error, or could not be reached.
    #[error("storage node: {0}")]
    Backend(#[from] ClientError),
    /// A local file-system or process operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Anything else that should not happen (a mount that does not appear, a daemon that exits).
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// Shorthand for a local I/O failure on `path`.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CsiError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Backend(error) => backend_code(error),
            CsiError::Io { .. } | CsiError::Internal(_) => Code::Internal,
        }
    }
}

/// The CSI code for a storage-node failure: the node's own code where it has a CSI meaning,
/// `UNAVAILABLE` for anything transient.
fn backend_code(error: &ClientError) -> Code {
    match error {
        ClientError::Transport { .. } => Code::Unavailable,
        ClientError::InvalidArgument(_) | ClientError::InvalidName(_) => Code::InvalidArgument,
        ClientError::MissingField { .. } => Code::Internal,
        ClientError::Status { code, .. } => match code {
            Code::NotFound
            | Code::AlreadyExists
            | Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::OutOfRange => *code,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                Code::Unavailable
            }
            _ if error.is_not_found() => Code::NotFound,
            _ => Code::Internal,
        },
    }
}

impl From<CsiError> for Status {
    fn from(error: CsiError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_node_codes_map_to_csi_codes() {
        let status = |code| {
            CsiError::Backend(ClientError::Status {
                code,
                message: "x".into(),
                errno: None,
            })
            .code()
        };
        assert_eq!(status(Code::NotFound), Code::NotFound);
        assert_eq!(status(Code::AlreadyExists), Code::AlreadyExists);
        assert_eq!(status(Code::DeadlineExceeded), Code::Unavailable);
        assert_eq!(status(Code::Unavailable), Code::Unavailable);
        assert_eq!(status(Code::DataLoss), Code::Internal);
        assert_eq!(
            CsiError::Backend(ClientError::InvalidArgument("bad".into())).code(),
            Code::InvalidArgument
        );
    }
}
