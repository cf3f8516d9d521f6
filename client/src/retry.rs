//! Bounded retry policy for calls that fail with `Unavailable`.
//!
//! Invariant: a call is retried only when repeating it cannot apply it twice: either the RPC is
//! idempotent, or the failure proves the request was not applied: the connection could not be
//! established, or the node said so (`ballast-not-applied`: it does not lead the container).
//!
//! Idempotent means "repeating it leaves the same state": reads, lookups, fsync, and also
//! positional writes, attribute changes and fallocate (writing the same bytes at the same offset
//! twice is writing them once). A `Create`, `Link`, `Unlink` or `Rename` on a volume carries a
//! request id (`ballast-request-id`) that the container's state machine remembers with its
//! response, so the client resends it like an idempotent call (`BallastClient::call`). Calls
//! without one (volume administration) are repeated only when the failure proves they were
//! never applied.

use std::error::Error as _;
use std::time::Duration;

/// Whether repeating an RPC after an ambiguous failure is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Repeating the call returns the same result and changes nothing more.
    Idempotent,
    /// The call has side effects; repeat it only if it certainly never reached a node.
    SideEffecting,
}

/// The retry schedule: `attempt_count_max` tries in all, sleeping `backoff_initial_ms`,
/// doubling each time up to `backoff_max_ms`, between them.
///
/// Failover is treated apart: while the cluster has no reachable leader (a node refused the
/// connection, or answered "not applied: no leader / not the leader"), a call keeps retrying for
/// up to `failover_window_ms` from its start whatever the attempt count, sleeping at most
/// [`FAILOVER_BACKOFF_MS_MAX`], so it resumes within a moment of the new leader's election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempt_count_max: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub failover_window_ms: u64,
}

/// Longest sleep between attempts while a new leader is being elected.
pub const FAILOVER_BACKOFF_MS_MAX: u64 = 100;

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempt_count_max: 12,
            backoff_initial_ms: 50,
            backoff_max_ms: 1000,
            // Rides out an election (about 1-2 s after a node dies) with room for a busy machine.
            failover_window_ms: 15_000,
        }
    }
}

/// Whether `status` says "no leader reachable right now" and nothing was applied: the node
/// refused the connection, or said it applied nothing.
pub fn is_failover(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && (never_sent(status) || not_applied(status))
}

impl RetryPolicy {
    /// The sleep before attempt `attempt_index + 1` (attempt 0 is the first try).
    pub fn backoff(&self, attempt_index: u32) -> Duration {
        let factor = 1u64.checked_shl(attempt_index).unwrap_or(u64::MAX);
        let backoff_ms = self
            .backoff_initial_ms
            .saturating_mul(factor)
            .min(self.backoff_max_ms);
        Duration::from_millis(backoff_ms)
    }
}

/// True when `status` proves the request was never handed to a node: tonic reports failures of
/// the (re)connection as `Unavailable` with a `tonic::ConnectError` in the source chain.
pub fn never_sent(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        if let Some(io_error) = error.downcast_ref::<std::io::Error>() {
            if io_error.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = error.source();
    }
    false
}

/// Tonic reports its own per-request deadline (`Request::set_timeout`) as `Cancelled`
/// ("Timeout expired"); it is a timeout like any other, so it becomes `DeadlineExceeded`.
///
/// A connection that broke under a request in flight (the node died) comes back as `Unknown`
/// "transport error"; the node is unavailable, so it becomes `Unavailable` (still not
/// `never_sent`: the request may have been applied, and only calls safe to repeat are repeated).
pub fn normalize_timeout(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::Cancelled && status.message().contains("Timeout expired") {
        return tonic::Status::deadline_exceeded(format!(
            "no answer in time: {}",
            status.message()
        ));
    }
    if status.code() == tonic::Code::Unknown && status.message() == "transport error" {
        return tonic::Status::unavailable("connection lost during the call (transport error)");
    }
    // The same, when the connection closed while the request was queued or in flight: hyper
    // cancels it ("operation was canceled", source "connection closed"). Seen when a node is
    // killed under a call; the FUSE driver turned it into EIO before this.
    if status.code() == tonic::Code::Cancelled
        && (status.message().contains("operation was canceled") || transport_failed(&status))
    {
        return tonic::Status::unavailable(format!(
            "connection lost during the call: {}",
            status.message()
        ));
    }
    status
}

/// Whether the status came from the transport (a `tonic::transport::Error` in its source chain)
/// rather than from the node.
fn transport_failed(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.downcast_ref::<tonic::transport::Error>().is_some() {
            return true;
        }
        source = error.source();
    }
    false
}

/// The address of the container's leader, when the node that answered named one.
pub fn leader_address(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get(ballast_proto::LEADER_METADATA_KEY)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// Whether the node promised that it applied nothing.
pub fn not_applied(status: &tonic::Status) -> bool {
    status
        .metadata()
        .get(ballast_proto::NOT_APPLIED_METADATA_KEY)
        .is_some()
}

/// Whether a failed attempt may be repeated under `idempotency`.
pub fn should_retry(status: &tonic::Status, idempotency: Idempotency) -> bool {
    // A node that did not answer in time (hung, or cut off by a partition) may be skipped for
    // another one, when repeating the call is harmless.
    if status.code() == tonic::Code::DeadlineExceeded {
        return idempotency == Idempotency::Idempotent;
    }
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    if not_applied(status) {
        return true;
    }
    match idempotency {
        Idempotency::Idempotent => true,
        Idempotency::SideEffecting => never_sent(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_closed_under_a_call_is_unavailable_not_cancelled() {
        let closed = normalize_timeout(tonic::Status::cancelled("operation was canceled"));
        assert_eq!(closed.code(), tonic::Code::Unavailable);
        assert!(should_retry(&closed, Idempotency::Idempotent));
        assert!(
            !should_retry(&closed, Idempotency::SideEffecting),
            "it may have been applied: only calls safe to repeat are repeated"
        );
        let other = normalize_timeout(tonic::Status::cancelled("the caller gave up"));
        assert_eq!(other.code(), tonic::Code::Cancelled);
    }

    #[test]
    fn failover_is_refused_connections_and_not_applied_answers() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert!(is_failover(&status));
        let mut no_leader = tonic::Status::unavailable("no leader");
        assert!(
            !is_failover(&no_leader),
            "an unmarked Unavailable may have been applied"
        );
        no_leader.metadata_mut().insert(
            ballast_proto::NOT_APPLIED_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        assert!(is_failover(&no_leader));
        assert!(!is_failover(&tonic::Status::not_found("x")));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let policy = RetryPolicy::default();
        let sleeps_ms: Vec<u128> = (0..7)
            .map(|index| policy.backoff(index).as_millis())
            .collect();
        assert_eq!(sleeps_ms, vec![50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff(200).as_millis(), 1000);
    }

    #[test]
    fn only_unavailable_and_timeouts_are_retried() {
        let unavailable = tonic::Status::unavailable("node restarting");
        assert!(should_retry(&unavailable, Idempotency::Idempotent));
        // A server-sent Unavailable may have been applied; side effects are not repeated.
        assert!(!should_retry(&unavailable, Idempotency::SideEffecting));
        let not_found = tonic::Status::not_found("x");
        assert!(!should_retry(&not_found, Idempotency::Idempotent));
        let deadline = tonic::Status::deadline_exceeded("slow");
        assert!(should_retry(&deadline, Idempotency::Idempotent));
        assert!(!should_retry(&deadline, Idempotency::SideEffecting));
    }

    #[test]
    fn tonic_timeouts_count_as_deadlines() {
        let status = normalize_timeout(tonic::Status::cancelled("Timeout expired"));
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        let other = normalize_timeout(tonic::Status::cancelled("client went away"));
        assert_eq!(other.code(), tonic::Code::Cancelled);
        let broken = normalize_timeout(tonic::Status::unknown("transport error"));
        assert_eq!(broken.code(), tonic::Code::Unavailable);
        assert!(
            !never_sent(&broken),
            "a broken connection may have delivered the call"
        );
    }

    #[test]
    fn not_applied_is_retried_even_with_side_effects() {
        let mut status = tonic::Status::unavailable("no leader yet");
        status.metadata_mut().insert(
            ballast_proto::NOT_APPLIED_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        assert!(should_retry(&status, Idempotency::SideEffecting));
        assert_eq!(leader_address(&status), None);
        status.metadata_mut().insert(
            ballast_proto::LEADER_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static("http://10.0.0.2:7400"),
        );
        assert_eq!(
            leader_address(&status).as_deref(),
            Some("http://10.0.0.2:7400")
        );
    }

    #[test]
    fn connect_failures_are_retried_even_with_side_effects() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let connect_error = tonic::ConnectError(Box::new(refused));
        let status = tonic::Status::from_error(Box::new(connect_error));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(never_sent(&status));
        assert!(should_retry(&status, Idempotency::SideEffecting));
    }
}
