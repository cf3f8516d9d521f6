//! The wire protocol between the node plugin and `ballast-csi-mounter` on a unix socket.
//!
//! Owns: the request and response types, their framing, and the bounds on both.
//! Must not depend on: the node service or the mounter's internals; both sides share only this.
//! Invariants:
//! - One request and one response per connection, each a single line of compact JSON ended by
//!   `\n` (compact JSON never contains a raw newline). No connection state, so a restart of
//!   either side between two requests loses nothing.
//! - Every read and write is bounded in size ([`REQUEST_LENGTH_BYTES_MAX`],
//!   [`RESPONSE_LENGTH_BYTES_MAX`]) and in time (the caller's timeout); an oversized, truncated
//!   or malformed message is an error, never a partial parse.
//! - Unknown fields are refused, so a plugin and a mounter of different versions fail loudly
//!   rather than silently ignoring part of a request.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Largest request line, newline included: a volume name and a path fit many times over.
pub const REQUEST_LENGTH_BYTES_MAX: usize = 16 * 1024;
/// Largest response line: a listing of every daemon a node may run, or one log tail.
pub const RESPONSE_LENGTH_BYTES_MAX: usize = 1024 * 1024;
/// Longest mount a request may ask the mounter to wait for.
pub const MOUNT_TIMEOUT_MS_MAX: u64 = 120_000;
/// Largest log tail in a status answer.
pub const LOG_TAIL_LENGTH_BYTES_MAX: usize = 8 * 1024;

/// What the node plugin asks the mounter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum MounterRequest {
    /// Start a `ballast-fuse` daemon mounting `volume` at `mountpoint` and wait until the mount
    /// is in the mount table, at most `timeout_ms`. Idempotent: a live daemon already serving
    /// exactly this is returned as it is.
    Mount {
        volume: String,
        mountpoint: PathBuf,
        timeout_ms: u64,
    },
    /// Unmount `volume` at `mountpoint` if it is still mounted and stop its daemon. Stopping
    /// what does not run (or is unknown) succeeds.
    Stop { volume: String, mountpoint: PathBuf },
    /// The daemon of one volume, with the tail of its log.
    Status { volume: String },
    /// Every daemon the mounter owns (without logs). A struct variant, so that unknown fields
    /// are refused here too.
    List {},
}

/// What the mounter answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case", deny_unknown_fields)]
pub enum MounterResponse {
    /// The mount is live; `already_running` when nothing had to be started.
    Mounted {
        daemon: DaemonIdentity,
        already_running: bool,
    },
    /// The mount is gone and no daemon of it runs; `was_running` when one had to be stopped.
    Stopped {
        was_running: bool,
    },
    Status {
        daemon: Option<DaemonReport>,
    },
    List {
        daemons: Vec<DaemonReport>,
    },
    Failed {
        kind: FailureKind,
        message: String,
    },
}

/// A daemon as the mounter's pid namespace sees it: the pid plus its start time, so a reused pid
/// is never taken for the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonIdentity {
    pub pid: i32,
    pub start_ticks: u64,
}

/// One daemon the mounter owns, as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonReport {
    pub volume: String,
    pub mountpoint: PathBuf,
    pub daemon: DaemonIdentity,
    /// The process is alive (same pid and start time).
    pub running: bool,
    /// The volume is in the mounter's mount table at `mountpoint`.
    pub mounted: bool,
    /// The last lines of the daemon's log (only in `Status`).
    pub log_tail: String,
}

/// Why a request failed; the node plugin maps this onto a CSI code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The request itself is wrong (bad volume name, a path outside the mount root).
    InvalidArgument,
    /// The request conflicts with what is mounted (another mount at the path, the volume
    /// mounted elsewhere).
    FailedPrecondition,
    /// Another request for the same volume is in progress; retry later.
    Busy,
    /// The daemon failed to start or to mount, or the mounter could not record it.
    Internal,
}

/// A failure to exchange one message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} took longer than {timeout_ms} ms")]
    TimedOut { what: &'static str, timeout_ms: u64 },
    #[error("the message is longer than {length_bytes_max} bytes")]
    TooLong { length_bytes_max: usize },
    #[error(
        "the connection closed before a complete message ({received_length_bytes} bytes received)"
    )]
    Truncated { received_length_bytes: usize },
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
}

/// Reads one newline-terminated JSON message of at most `length_bytes_max` bytes.
pub async fn read_message<T: DeserializeOwned>(
    reader: impl AsyncRead + Unpin,
    length_bytes_max: usize,
    timeout_ms: u64,
) -> Result<T, ProtocolError> {
    let mut line = Vec::new();
    // One byte more than allowed, so "too long" is told apart from "exactly the limit".
    let mut limited = BufReader::new(reader).take(length_bytes_max as u64 + 1);
    let read = limited.read_until(b'\n', &mut line);
    match tokio::time::timeout(Duration::from_millis(timeout_ms), read).await {
        Err(_elapsed) => {
            return Err(ProtocolError::TimedOut {
                what: "reading a message",
                timeout_ms,
            })
        }
        Ok(Err(source)) => {
            return Err(ProtocolError::Io {
                what: "reading a message",
                source,
            })
        }
        Ok(Ok(_)) => {}
    }
    if line.last() != Some(&b'\n') {
        if line.len() > length_bytes_max {
            return Err(ProtocolError::TooLong { length_bytes_max });
        }
        return Err(ProtocolError::Truncated {
            received_length_bytes: line.len(),
        });
    }
    serde_json::from_slice(&line).map_err(ProtocolError::Malformed)
}

/// Writes `message` as one JSON line, refusing to send more than `length_bytes_max` bytes.
pub async fn write_message(
    mut writer: impl AsyncWrite + Unpin,
    message: &impl Serialize,
    length_bytes_max: usize,
    timeout_ms: u64,
) -> Result<(), ProtocolError> {
    let mut line = serde_json::to_vec(message).map_err(ProtocolError::Malformed)?;
    line.push(b'\n');
    if line.len() > length_bytes_max {
        return Err(ProtocolError::TooLong { length_bytes_max });
    }
    let write = async {
        writer.write_all(&line).await?;
        writer.flush().await
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), write).await {
        Err(_elapsed) => Err(ProtocolError::TimedOut {
            what: "writing a message",
            timeout_ms,
        }),
        Ok(Err(source)) => Err(ProtocolError::Io {
            what: "writing a message",
            source,
        }),
        Ok(Ok(())) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_round_trip_as_one_line() {
        let request = MounterRequest::Mount {
            volume: "pvc-1".into(),
            mountpoint: "/var/lib/kubelet/plugins/x/globalmount".into(),
            timeout_ms: 30_000,
        };
        let mut buffer = Vec::new();
        write_message(&mut buffer, &request, REQUEST_LENGTH_BYTES_MAX, 1_000)
            .await
            .unwrap();
        assert_eq!(buffer.iter().filter(|&&byte| byte == b'\n').count(), 1);
        let decoded: MounterRequest = read_message(&buffer[..], REQUEST_LENGTH_BYTES_MAX, 1_000)
            .await
            .unwrap();
        assert_eq!(decoded, request);
    }

    #[tokio::test]
    async fn oversized_truncated_malformed_and_unknown_messages_are_refused() {
        let long = format!(
            "{{\"request\":\"status\",\"volume\":\"{}\"}}\n",
            "a".repeat(REQUEST_LENGTH_BYTES_MAX)
        );
        assert!(matches!(
            read_message::<MounterRequest>(long.as_bytes(), REQUEST_LENGTH_BYTES_MAX, 1_000).await,
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(matches!(
            read_message::<MounterRequest>(&b"{\"request\":\"list\""[..], 64, 1_000).await,
            Err(ProtocolError::Truncated { .. })
        ));
        for bad in [
            &b"not json\n"[..],
            b"{\"request\":\"format_disk\"}\n",
            b"{\"request\":\"list\",\"extra\":1}\n",
            b"{\"request\":\"stop\",\"volume\":\"v\"}\n",
        ] {
            assert!(
                matches!(
                    read_message::<MounterRequest>(bad, 64, 1_000).await,
                    Err(ProtocolError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let too_long_to_send = MounterRequest::Status {
            volume: "v".repeat(100),
        };
        assert!(matches!(
            write_message(Vec::new(), &too_long_to_send, 64, 1_000).await,
            Err(ProtocolError::TooLong { .. })
        ));
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (client, _server) = tokio::io::duplex(64);
        assert!(matches!(
            read_message::<MounterRequest>(client, 64, 50).await,
            Err(ProtocolError::TimedOut { .. })
        ));
    }
}
