//! Exactly-once side effects across retries and failovers.
//!
//! A client that may repeat a side-effecting request (its answer was lost when a leader died)
//! tags it with a request id: its session, a sequence number, and the lowest sequence it still
//! waits for (the floor). The state machine stores each tagged command's response in the
//! container, in the same batch as the command's effect, and answers a repeat with the stored
//! response instead of applying it again. Stored responses below the floor are dropped, since
//! the client will never ask for them again.
//!
//! Owns: the request id format (gRPC metadata `ballast-request-id`: `session:sequence:floor` in
//! hex) and the session rows (`keys::TAG_SESSION`).
//! Must not depend on: the network or Raft.
//! Invariants: a session row is written only together with the effect it records; the rows are
//! part of the container's state, so they travel in snapshots and survive leader changes.
//! Known limit: sessions of clients that vanish keep at most their in-flight window of rows;
//! expiring idle sessions is future work.

use serde::{Deserialize, Serialize};

use crate::command::CommandResponse;
use crate::error::NodeResult;
use crate::keys;
use crate::records::{decode, encode};
use crate::storage::NodeStorage;
use crate::transaction::RowChange;

pub use ballast_proto::REQUEST_ID_METADATA_KEY;
/// Most stored responses pruned by one apply (bounds the work; the rest go next time).
const PRUNE_COUNT_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestId {
    pub session: u64,
    pub sequence: u64,
    /// Every stored response of the session below this sequence may be dropped.
    pub floor: u64,
}

impl RequestId {
    /// Parses `session:sequence:floor` (hex); `None` for anything malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let mut field = || u64::from_str_radix(parts.next()?, 16).ok();
        let request = Self {
            session: field()?,
            sequence: field()?,
            floor: field()?,
        };
        (parts.next().is_none() && request.floor <= request.sequence).then_some(request)
    }
}

/// The stored response of a request already applied, if any.
pub fn lookup(
    storage: &NodeStorage,
    container_id: u64,
    request: &RequestId,
) -> NodeResult<Option<CommandResponse>> {
    let key = keys::session(container_id, request.session, request.sequence);
    match storage.state.get_raw(&key)? {
        Some(bytes) => Ok(Some(decode(&bytes, "stored response")?)),
        None => Ok(None),
    }
}

/// Rows to write with the command's effect: its response, and deletions of the session's
/// responses below the floor.
pub fn rows(
    storage: &NodeStorage,
    container_id: u64,
    request: &RequestId,
    response: &CommandResponse,
) -> NodeResult<Vec<RowChange>> {
    let mut rows = vec![(
        keys::session(container_id, request.session, request.sequence),
        Some(encode(response)),
    )];
    let start = keys::session(container_id, request.session, 0);
    let end = keys::session(container_id, request.session, request.floor);
    storage
        .state
        .scan(&start, &end, PRUNE_COUNT_MAX, |key, _| {
            rows.push((key.to_vec(), None));
            Ok(true)
        })?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_parse_strictly() {
        assert_eq!(
            RequestId::parse("ff:10:a"),
            Some(RequestId {
                session: 255,
                sequence: 16,
                floor: 10
            })
        );
        for bad in ["", "1:2", "1:2:3:4", "x:1:1", "1:1:2", "1::1"] {
            assert_eq!(RequestId::parse(bad), None, "{bad:?}");
        }
    }
}
