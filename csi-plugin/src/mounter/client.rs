//! The node plugin's side of the mounter socket.
//!
//! Owns: connecting to `ballast-csi-mounter`, bounding each exchange in time, and translating
//! its answers into [`CsiError`] codes.
//! Must not depend on: the mounter's internals (only `protocol`), the node service.
//! Invariants:
//! - An unreachable mounter (no socket, refused, no answer in time) is `UNAVAILABLE`, which
//!   kubelet retries; the repeated call is safe because every request is idempotent.
//! - Every call is bounded: connecting by [`CONNECT_TIMEOUT_MS`], the answer by the operation's
//!   own bound plus [`ANSWER_MARGIN_MS`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

use super::protocol::{
    read_message, write_message, DaemonIdentity, DaemonReport, FailureKind, MounterRequest,
    MounterResponse, REQUEST_LENGTH_BYTES_MAX, RESPONSE_LENGTH_BYTES_MAX,
};
use crate::CsiError;

/// Time to connect to the mounter's socket.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Time the mounter gets beyond the operation's own bound to answer.
pub const ANSWER_MARGIN_MS: u64 = 10_000;
/// Bound of a Stop: the mounter waits up to 10 s for the daemon to exit on its own, then 5 s
/// after SIGTERM and 5 s after SIGKILL (see `fuse::stop`).
pub const STOP_TIMEOUT_MS: u64 = 25_000;
/// Bound of a Status or List.
pub const QUERY_TIMEOUT_MS: u64 = 5_000;

/// A client of one mounter socket; each call opens its own connection.
#[derive(Debug, Clone)]
pub struct MounterClient {
    socket: PathBuf,
}

impl MounterClient {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn unavailable(&self, what: &str) -> CsiError {
        CsiError::Unavailable(format!(
            "the FUSE mounter at {} {what}; is ballast-csi-mounter running on this node?",
            self.socket.display()
        ))
    }

    /// One request, one answer, within `timeout_ms` plus the margin.
    async fn call(
        &self,
        request: &MounterRequest,
        timeout_ms: u64,
    ) -> Result<MounterResponse, CsiError> {
        let connect = UnixStream::connect(&self.socket);
        let stream = match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect)
            .await
        {
            Err(_elapsed) => {
                return Err(self.unavailable(&format!(
                    "did not accept a connection within {CONNECT_TIMEOUT_MS} ms"
                )))
            }
            Ok(Err(error)) => return Err(self.unavailable(&format!("cannot be reached ({error})"))),
            Ok(Ok(stream)) => stream,
        };
        let (reader, writer) = stream.into_split();
        write_message(
            writer,
            request,
            REQUEST_LENGTH_BYTES_MAX,
            CONNECT_TIMEOUT_MS,
        )
        .await
        .map_err(|error| self.unavailable(&format!("did not take the request ({error})")))?;
        let response = read_message(
            reader,
            RESPONSE_LENGTH_BYTES_MAX,
            timeout_ms + ANSWER_MARGIN_MS,
        )
        .await
        .map_err(|error| self.unavailable(&format!("did not answer ({error})")))?;
        match response {
            MounterResponse::Failed { kind, message } => Err(match kind {
                FailureKind::InvalidArgument => CsiError::InvalidArgument(message),
                FailureKind::FailedPrecondition => CsiError::FailedPrecondition(message),
                FailureKind::Busy => CsiError::Aborted(message),
                FailureKind::Internal => CsiError::Internal(format!("mounter: {message}")),
            }),
            response => Ok(response),
        }
    }

    fn unexpected(&self, response: MounterResponse) -> CsiError {
        CsiError::Internal(format!(
            "the mounter at {} answered out of protocol: {response:?}",
            self.socket.display()
        ))
    }

    /// Mounts `volume` at `mountpoint` through a daemon the mounter owns.
    pub async fn mount(
        &self,
        volume: &str,
        mountpoint: &Path,
        timeout_ms: u64,
    ) -> Result<(DaemonIdentity, bool), CsiError> {
        let request = MounterRequest::Mount {
            volume: volume.to_owned(),
            mountpoint: mountpoint.to_path_buf(),
            timeout_ms,
        };
        match self.call(&request, timeout_ms).await? {
            MounterResponse::Mounted {
                daemon,
                already_running,
            } => Ok((daemon, already_running)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Unmounts `volume` at `mountpoint` (if still mounted) and stops its daemon; whether one
    /// was running.
    pub async fn stop(&self, volume: &str, mountpoint: &Path) -> Result<bool, CsiError> {
        let request = MounterRequest::Stop {
            volume: volume.to_owned(),
            mountpoint: mountpoint.to_path_buf(),
        };
        match self.call(&request, STOP_TIMEOUT_MS).await? {
            MounterResponse::Stopped { was_running } => Ok(was_running),
            other => Err(self.unexpected(other)),
        }
    }

    /// The mounter's view of `volume`'s daemon, with its log tail.
    pub async fn status(&self, volume: &str) -> Result<Option<DaemonReport>, CsiError> {
        let request = MounterRequest::Status {
            volume: volume.to_owned(),
        };
        match self.call(&request, QUERY_TIMEOUT_MS).await? {
            MounterResponse::Status { daemon } => Ok(daemon),
            other => Err(self.unexpected(other)),
        }
    }

    /// Every daemon the mounter owns.
    pub async fn list(&self) -> Result<Vec<DaemonReport>, CsiError> {
        match self
            .call(&MounterRequest::List {}, QUERY_TIMEOUT_MS)
            .await?
        {
            MounterResponse::List { daemons } => Ok(daemons),
            other => Err(self.unexpected(other)),
        }
    }
}
