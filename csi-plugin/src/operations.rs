//! One operation at a time per volume.
//!
//! Owns: the in-flight set. The CSI spec lets a plugin refuse a call for a volume that already
//! has an operation pending, with `ABORTED`; the CO retries with backoff. This keeps, for example,
//! a NodeStage and a NodeUnstage of the same volume (kubelet retrying after a timeout) from
//! interleaving their mounts and state-file updates.
//! Must not depend on: anything async; the set is a plain mutex held for microseconds.
//! Invariant: a key is in the set exactly while its [`OperationGuard`] lives (released on drop,
//! also when the call fails or its future is cancelled).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use crate::CsiError;

/// Keys (volume names) with an operation in flight.
#[derive(Debug, Default)]
pub struct OperationLocks {
    in_flight: Mutex<HashSet<String>>,
}

/// Proof that the caller owns the key until it is dropped.
#[derive(Debug)]
pub struct OperationGuard<'a> {
    locks: &'a OperationLocks,
    key: String,
}

impl OperationLocks {
    /// Claims `key`, or fails with `ABORTED` when another operation holds it.
    pub fn begin(&self, key: &str) -> Result<OperationGuard<'_>, CsiError> {
        // A poisoned lock only means a panic elsewhere while holding it; the set is still valid.
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !in_flight.insert(key.to_owned()) {
            return Err(CsiError::Aborted(format!(
                "an operation on volume {key:?} is already in progress"
            )));
        }
        Ok(OperationGuard {
            locks: self,
            key: key.to_owned(),
        })
    }
}

impl Drop for OperationGuard<'_> {
    fn drop(&mut self) {
        let mut in_flight = self
            .locks
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        in_flight.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_operation_on_the_same_volume_is_aborted_until_the_first_ends() {
        let locks = OperationLocks::default();
        let first = locks.begin("data").unwrap();
        assert!(matches!(locks.begin("data"), Err(CsiError::Aborted(_))));
        let other = locks.begin("logs").unwrap();
        drop(first);
        assert!(locks.begin("data").is_ok());
        drop(other);
    }
}
