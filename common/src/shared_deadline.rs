//! `SharedDeadline`: the time by which a node must have taken a shared-memory request
//! (`ReadShared`, `WriteShared`) into effect, or never.
//!
//! Why: the FUSE driver gives up on such a request after its timeout and then goes on: it writes
//! the same bytes again over gRPC, and later writes follow. A node that served the old request
//! after that would put an old write after newer ones (a lost update), or copy a slot the driver
//! filled for another request. So the driver names a deadline well inside its own timeout
//! (half of it), and the node refuses the request once it has passed: a write is checked after
//! its bytes are copied out of the slot and again right before it is proposed, a read before it
//! starts. What the node has proposed by the deadline is ordered before anything the driver
//! sends after its timeout. (A read the node started in time may still land in its slot late;
//! the driver never reuses the slot of a request whose outcome it does not know.)
//!
//! Clock: `CLOCK_MONOTONIC` of the host. Shared memory means the driver and the node run on one
//! host, so both read the same clock; a time namespace would shift it (Kubernetes gives pods
//! none).
//!
//! Owns: the deadline's value and its wire form (nanoseconds of that clock, 0 for none).
//! Must not depend on: gRPC, the node or the driver.
//! Invariant: a deadline is never 0 on the wire (0 means "none").

use std::time::Duration;

/// Nanoseconds of the host's `CLOCK_MONOTONIC`.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SharedDeadline {
    monotonic_ns: u64,
}

impl SharedDeadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> SharedDeadline {
        SharedDeadline::at(
            monotonic_now_ns()
                .saturating_add(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// At `monotonic_ns` of the host's clock (at least 1: 0 is "none" on the wire).
    pub fn at(monotonic_ns: u64) -> SharedDeadline {
        SharedDeadline {
            monotonic_ns: monotonic_ns.max(1),
        }
    }

    /// The deadline a request carries, if any (0 is none: a sender that names none).
    pub fn from_wire(monotonic_ns: u64) -> Option<SharedDeadline> {
        (monotonic_ns != 0).then_some(SharedDeadline { monotonic_ns })
    }

    pub fn to_wire(self) -> u64 {
        self.monotonic_ns
    }

    /// Whether the deadline has passed now.
    pub fn has_passed(self) -> bool {
        self.has_passed_at(monotonic_now_ns())
    }

    /// Whether the deadline has passed at `now_ns` of the same clock.
    pub fn has_passed_at(self, now_ns: u64) -> bool {
        now_ns >= self.monotonic_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_passes_at_its_time_and_not_before() {
        let deadline = SharedDeadline::at(1_000);
        assert!(!deadline.has_passed_at(999));
        assert!(deadline.has_passed_at(1_000));
        assert!(deadline.has_passed_at(u64::MAX));
    }

    #[test]
    fn the_wire_form_keeps_the_value_and_zero_means_none() {
        assert_eq!(SharedDeadline::from_wire(0), None);
        let deadline = SharedDeadline::at(0);
        assert_eq!(deadline.to_wire(), 1, "never 0 on the wire");
        assert_eq!(
            SharedDeadline::from_wire(deadline.to_wire()),
            Some(deadline)
        );
        let later = SharedDeadline::at(123_456_789);
        assert_eq!(SharedDeadline::from_wire(later.to_wire()), Some(later));
    }

    #[test]
    fn a_deadline_after_a_timeout_lies_ahead_by_that_timeout() {
        let before = monotonic_now_ns();
        let deadline = SharedDeadline::after(Duration::from_secs(10));
        let after = monotonic_now_ns();
        assert!(deadline.to_wire() >= before + 10_000_000_000);
        assert!(deadline.to_wire() <= after + 10_000_000_000);
        assert!(!deadline.has_passed());
        assert!(SharedDeadline::at(before).has_passed());
    }
}
