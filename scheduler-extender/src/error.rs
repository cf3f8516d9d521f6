//! The one error type of the extender.
//!
//! Owns: [`ExtenderError`] and its mapping to an HTTP status.
//! Must not depend on: the server framework beyond the status code type.
//! Invariants: a request the scheduler got wrong is `MalformedRequest` (HTTP 400, the message
//! says what is wrong); Ballast being unreachable or slow is never an HTTP error, because
//! locality is a preference: the handlers degrade (filter passes every node, prioritize scores
//! zero) and only log it.

use axum::http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ExtenderError {
    /// The request body is not a kube-scheduler ExtenderArgs document.
    #[error("malformed ExtenderArgs: {0}")]
    MalformedRequest(String),
    /// The Ballast cluster did not answer a listing, or answered with an error.
    #[error("Ballast cluster unavailable: {0}")]
    BallastUnavailable(String),
    /// The Ballast cluster did not answer within the configured time.
    #[error("Ballast cluster did not answer within {timeout_ms} ms")]
    BallastTimeout { timeout_ms: u64 },
    /// A command-line setting is unusable.
    #[error("invalid configuration: {0}")]
    Configuration(String),
}

impl ExtenderError {
    /// The HTTP status a handler answers with when this error reaches it.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::MalformedRequest(_) => StatusCode::BAD_REQUEST,
            Self::BallastUnavailable(_) | Self::BallastTimeout { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Configuration(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
