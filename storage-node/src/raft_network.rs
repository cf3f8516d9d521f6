//! Raft network between storage nodes, over tonic (`proto/cluster.proto`, `RaftTransport`).
//!
//! Owns: turning openraft RPCs of any container into `RaftMessage`s (postcard payloads tagged
//! with the container id), one shared HTTP/2 connection per peer node, and mapping transport
//! failures onto openraft's error kinds.
//! Must not depend on: the node or its services (the receiving side lives in
//! `service::cluster`).
//! Invariants:
//! - Every container on this node shares the connection to a peer ([`PeerChannels`]); hundreds
//!   of groups cost hundreds of multiplexed streams, not hundreds of sockets.
//! - Every RPC is bounded by openraft's per-RPC deadline (`RPCOption::hard_ttl`).
//! - A peer that cannot be connected to is `Unreachable` (openraft backs off); any other
//!   transport failure is a `NetworkError` (openraft retries at the next heartbeat).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_proto::cluster_v1 as proto;
use ballast_proto::cluster_v1::raft_transport_client::RaftTransportClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::types::{NodeId, RaftNode, TypeConfig};

/// Largest Raft message either way: `max_payload_entries` (16) writes of 1 MiB, or one snapshot
/// chunk, plus framing.
pub const RAFT_MESSAGE_SIZE_BYTES_MAX: usize = 128 << 20;
/// Limit on establishing a connection to a peer.
const CONNECT_TIMEOUT_MS: u64 = 1_000;

/// One lazily connected channel per peer address, shared by every container of the node, and
/// when each container last heard from each peer (for minimum-replication checks).
#[derive(Debug, Default)]
pub struct PeerChannels {
    channels: Mutex<HashMap<String, Channel>>,
    last_contact: Mutex<HashMap<(u64, NodeId), std::time::Instant>>,
    /// `(container, target)` whose last snapshot chunk failed, and when; only kept while the
    /// [`SNAPSHOT_RESEND_DELAY_FAILPOINT`] is set.
    failed_snapshot_targets: Mutex<HashMap<(u64, NodeId), std::time::Instant>>,
}

/// Set in a node's environment to a number of milliseconds: after a snapshot chunk sent from
/// this node to a peer failed, every Raft RPC of that container to that peer fails at once as
/// `Unreachable` for that long (the leader is silent toward it: no snapshot, no heartbeat). A
/// failpoint for tests only (`tests/tests/cluster.rs`, election holds): it stands for a
/// leader whose replication to a failing peer backs off, as openraft does after `Unreachable`
/// errors, so that the restarted peer hears nothing from the leader for longer than an
/// election timeout. A delayed snapshot alone is not enough: heartbeats keep reaching the peer.
pub const SNAPSHOT_RESEND_DELAY_FAILPOINT: &str = "BALLAST_FAILPOINT_SNAPSHOT_RESEND_DELAY_MS";

fn snapshot_resend_delay() -> Option<Duration> {
    let value = std::env::var(SNAPSHOT_RESEND_DELAY_FAILPOINT).ok()?;
    // A test's own setting: bounded, so a typo cannot stall replication for long.
    let delay_ms: u64 = value.parse().ok()?;
    Some(Duration::from_millis(delay_ms.min(60_000)))
}

impl PeerChannels {
    /// Records that `target` answered a Raft RPC of `container_id` just now.
    pub fn record_contact(&self, container_id: u64, target: NodeId) {
        self.last_contact
            .lock()
            .expect("contact lock")
            .insert((container_id, target), std::time::Instant::now());
    }

    /// How long ago `target` last answered a Raft RPC of `container_id` (None: never).
    pub fn since_contact(&self, container_id: u64, target: NodeId) -> Option<Duration> {
        self.last_contact
            .lock()
            .expect("contact lock")
            .get(&(container_id, target))
            .map(|instant| instant.elapsed())
    }

    /// The channel to `address`, created on first use. Tonic re-establishes a broken connection
    /// on the next call.
    pub fn channel(&self, address: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("peer channels lock");
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(address.to_owned())?
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .tcp_nodelay(true)
            .initial_stream_window_size(ballast_proto::HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(ballast_proto::HTTP2_CONNECTION_WINDOW_BYTES)
            .max_frame_size(ballast_proto::HTTP2_FRAME_BYTES_MAX)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// The network factory of one container.
#[derive(Debug, Clone)]
pub struct ClusterNetwork {
    container_id: u64,
    peers: Arc<PeerChannels>,
}

impl ClusterNetwork {
    pub fn new(container_id: u64, peers: Arc<PeerChannels>) -> Self {
        Self {
            container_id,
            peers,
        }
    }
}

/// A connection from one container to its replica on `target`.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    container_id: u64,
    target: NodeId,
    target_node: RaftNode,
    client: Result<RaftTransportClient<Channel>, String>,
    peers: Arc<PeerChannels>,
}

impl RaftNetworkFactory<TypeConfig> for ClusterNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> Self::Network {
        let client = self
            .peers
            .channel(&node.addr)
            .map(|channel| {
                RaftTransportClient::new(channel)
                    .max_decoding_message_size(RAFT_MESSAGE_SIZE_BYTES_MAX)
                    .max_encoding_message_size(RAFT_MESSAGE_SIZE_BYTES_MAX)
            })
            .map_err(|error| format!("bad address {:?} of node {target}: {error}", node.addr));
        PeerConnection {
            container_id: self.container_id,
            target,
            target_node: node.clone(),
            client,
            peers: Arc::clone(&self.peers),
        }
    }
}

/// Which RPC of the transport to call.
#[derive(Debug, Clone, Copy)]
enum RaftRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl PeerConnection {
    /// Whether the [`SNAPSHOT_RESEND_DELAY_FAILPOINT`] keeps this connection silent now.
    fn silenced_by_failpoint(&self) -> bool {
        let Some(silence) = snapshot_resend_delay() else {
            return false;
        };
        self.peers
            .failed_snapshot_targets
            .lock()
            .expect("failpoint lock")
            .get(&(self.container_id, self.target))
            .is_some_and(|failed_at| failed_at.elapsed() < silence)
    }

    /// Sends one RPC. `payload_capacity_bytes` is the expected size of the encoded request
    /// (0 when small): the buffer starts that large (see [`PresizedPayload`]).
    async fn send<Request, Response, Error>(
        &mut self,
        rpc: RaftRpc,
        request: &Request,
        payload_capacity_bytes: usize,
        snapshot_data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Response, RPCError<NodeId, RaftNode, RaftError<NodeId, Error>>>
    where
        Request: Serialize,
        Response: DeserializeOwned,
        Error: std::error::Error + DeserializeOwned,
    {
        if self.silenced_by_failpoint() {
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(format!(
                    "failpoint {SNAPSHOT_RESEND_DELAY_FAILPOINT}: silent toward this peer"
                )),
            )));
        }
        let mut client = match &self.client {
            Ok(client) => client.clone(),
            Err(message) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(message.clone()),
                )))
            }
        };
        let started = std::time::Instant::now();
        let presized = PresizedPayload(Vec::with_capacity(payload_capacity_bytes));
        let payload = postcard::serialize_with_flavor(request, presized).map_err(|error| {
            RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
                "encode {rpc:?}: {error}"
            ))))
        })?;
        let payload_bytes = payload.len();
        let mut message = tonic::Request::new(proto::RaftMessage {
            container_id: self.container_id,
            payload: payload.into(),
            snapshot_data,
        });
        let deadline = option.hard_ttl();
        message.set_timeout(deadline);
        let call = async {
            match rpc {
                RaftRpc::AppendEntries => client.append_entries(message).await,
                RaftRpc::Vote => client.vote(message).await,
                RaftRpc::InstallSnapshot => client.install_snapshot(message).await,
            }
        };
        let encoded = started.elapsed();
        let reply = match tokio::time::timeout(deadline, call).await {
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(status)) => return Err(self.transport_error(rpc, &status)),
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{rpc:?} to node {} timed out after {} ms",
                        self.target,
                        deadline.as_millis()
                    ),
                ))))
            }
        };
        tracing::debug!(
            target: "ballast::timing",
            container = self.container_id,
            target_node = self.target,
            ?rpc,
            payload_bytes,
            encode_us = encoded.as_micros() as u64,
            round_trip_us = (started.elapsed() - encoded).as_micros() as u64,
            "raft rpc sent"
        );
        // The peer answered (whatever it answered): it is in contact with this group.
        self.peers.record_contact(self.container_id, self.target);
        let result: Result<Response, RaftError<NodeId, Error>> =
            postcard::from_bytes(&reply.payload).map_err(|error| {
                RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
                    "decode {rpc:?} reply from node {}: {error}",
                    self.target
                ))))
            })?;
        result.map_err(|error| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.target_node.clone(),
                error,
            ))
        })
    }

    fn transport_error<E: std::error::Error>(
        &self,
        rpc: RaftRpc,
        status: &tonic::Status,
    ) -> RPCError<NodeId, RaftNode, E> {
        let error = std::io::Error::other(format!(
            "{rpc:?} of container {} to node {} ({}): {status}",
            self.container_id, self.target, self.target_node.addr
        ));
        if status.code() == tonic::Code::Unavailable {
            RPCError::Unreachable(Unreachable::new(&error))
        } else {
            RPCError::Network(NetworkError::new(&error))
        }
    }
}

/// Bytes an entry's encoding may take beyond its write data: log id, command fields, names.
const ENTRY_OVERHEAD_BYTES: usize = 512;

/// The most write data an AppendEntries carries (estimated before encoding), unless a single
/// entry is larger.
///
/// Why a budget in bytes: openraft sends up to `max_payload_entries` (16) entries per append
/// whatever their size, and gives each append the heartbeat interval (150 ms) to be answered.
/// 16 writes of 16 MiB (the largest a node takes) are twice the Raft message limit, so the
/// follower refused every such message and never caught up; and an append of 7 such writes
/// (112 MiB) timed out every time (`a_follower_behind_by_more_than_one_raft_message_...`,
/// `tests/tests/cluster.rs`). In sequential rf=3 writes of 4 MiB, appends of about 30 MB took
/// 70-80 ms to be answered and some of about 60 MB timed out (timing events, 2026-12-06). 24 MiB
/// is 5 of the FUSE driver's 4 MiB writes, or one write of up to 16 MiB alone; small entries
/// still go 16 at a time.
const APPEND_ENTRIES_PAYLOAD_BYTES_MAX: usize = 24 << 20;
const _: () = assert!(APPEND_ENTRIES_PAYLOAD_BYTES_MAX + (1 << 20) < RAFT_MESSAGE_SIZE_BYTES_MAX);

/// The estimated encoded size of each entry: its write data and [`ENTRY_OVERHEAD_BYTES`].
fn estimated_entry_sizes_bytes(entries: &[crate::types::Entry]) -> Vec<usize> {
    entries
        .iter()
        .map(|entry| crate::detached::write_data_length_bytes(entry) + ENTRY_OVERHEAD_BYTES)
        .collect()
}

/// `None` when entries of these (estimated) sizes fit in one append of `payload_bytes_max`;
/// otherwise how many of the first ones do, at least one. openraft answers `PayloadTooLarge` by
/// sending that many in its next appends (for 10 of them, then it tries its maximum again).
fn entries_that_fit(entry_sizes_bytes: &[usize], payload_bytes_max: usize) -> Option<u64> {
    let mut total_bytes = 0usize;
    for (index, size_bytes) in entry_sizes_bytes.iter().enumerate() {
        total_bytes = total_bytes.saturating_add(*size_bytes);
        if total_bytes > payload_bytes_max {
            return Some(index.max(1) as u64);
        }
    }
    None
}

/// A postcard output that starts at its expected size. Why: `to_allocvec` grows its `Vec` by
/// doubling, so a 30 MB AppendEntries was copied about twice over while it was encoded; the
/// leader's encode of such a request took 12-15 ms (timing events, 2026-12-06). A request
/// larger than expected still grows as needed.
struct PresizedPayload(Vec<u8>);

impl postcard::ser_flavors::Flavor for PresizedPayload {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        let entry_sizes = estimated_entry_sizes_bytes(&request.entries);
        if let Some(entries_hint) = entries_that_fit(&entry_sizes, APPEND_ENTRIES_PAYLOAD_BYTES_MAX)
        {
            // openraft sends the next several appends with at most this many entries.
            return Err(RPCError::PayloadTooLarge(
                openraft::error::PayloadTooLarge::new_entries_hint(entries_hint),
            ));
        }
        let payload_capacity_bytes = entry_sizes.iter().sum::<usize>() + ENTRY_OVERHEAD_BYTES;
        self.send(
            RaftRpc::AppendEntries,
            &request,
            payload_capacity_bytes,
            Vec::new(),
            &option,
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, RaftNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let mut request = request;
        let silenced = self.silenced_by_failpoint();
        // The chunk travels as raw bytes beside the payload (see `RaftMessage.snapshot_data`).
        let snapshot_data = std::mem::take(&mut request.data);
        let result = self
            .send(
                RaftRpc::InstallSnapshot,
                &request,
                0,
                snapshot_data,
                &option,
            )
            .await;
        // Only a chunk that really went out and failed starts a silence (not the silence's own
        // refusals, which would prolong it for ever).
        if result.is_err() && snapshot_resend_delay().is_some() && !silenced {
            self.peers
                .failed_snapshot_targets
                .lock()
                .expect("failpoint lock")
                .insert((self.container_id, self.target), std::time::Instant::now());
        }
        result
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        self.send(RaftRpc::Vote, &request, 0, Vec::new(), &option)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, FilesystemCommand};
    use crate::types::Entry;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    fn write_entry(index: u64, length_bytes: usize) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), index),
            payload: EntryPayload::Normal(Command::Filesystem(FilesystemCommand::Write {
                inode: 7,
                offset_bytes: index * 4096,
                data: bytes::Bytes::from(vec![index as u8; length_bytes]),
                now_ns: 11,
                prewritten: Default::default(),
            })),
        }
    }

    #[test]
    fn appends_larger_than_a_message_are_cut_to_the_entries_that_fit() {
        assert_eq!(entries_that_fit(&[], 100), None);
        assert_eq!(entries_that_fit(&[40, 40, 20], 100), None);
        assert_eq!(entries_that_fit(&[40, 40, 21], 100), Some(2));
        assert_eq!(
            entries_that_fit(&[150, 1], 100),
            Some(1),
            "at least one entry"
        );
        assert_eq!(entries_that_fit(&[10, 150], 100), Some(1));
        let writes_of_16_mib = vec![(16 << 20) + ENTRY_OVERHEAD_BYTES; 16];
        assert_eq!(
            entries_that_fit(&writes_of_16_mib, APPEND_ENTRIES_PAYLOAD_BYTES_MAX),
            Some(1)
        );
        let writes_of_4_mib = vec![(4 << 20) + ENTRY_OVERHEAD_BYTES; 16];
        assert_eq!(
            entries_that_fit(&writes_of_4_mib, APPEND_ENTRIES_PAYLOAD_BYTES_MAX),
            Some(5)
        );
        let pages_of_16_kib = vec![(16 << 10) + ENTRY_OVERHEAD_BYTES; 16];
        assert_eq!(
            entries_that_fit(&pages_of_16_kib, APPEND_ENTRIES_PAYLOAD_BYTES_MAX),
            None,
            "small writes go 16 at a time"
        );
    }

    /// The presized encoding is exactly postcard's, whether the guess was right, short or zero.
    #[test]
    fn a_presized_payload_encodes_the_same_bytes_as_postcard() {
        let request = AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 4)),
            entries: vec![
                write_entry(5, 1 << 20),
                write_entry(6, 100),
                write_entry(7, 0),
            ],
            leader_commit: None,
        };
        let expected = postcard::to_allocvec(&request).unwrap();
        let estimate: usize = estimated_entry_sizes_bytes(&request.entries)
            .iter()
            .sum::<usize>()
            + ENTRY_OVERHEAD_BYTES;
        assert!(
            estimate >= expected.len(),
            "the estimate misses the write data"
        );
        for capacity in [0, 17, estimate] {
            let encoded = postcard::serialize_with_flavor(
                &request,
                PresizedPayload(Vec::with_capacity(capacity)),
            )
            .unwrap();
            assert!(encoded == expected, "capacity {capacity}: other bytes");
        }
        assert_eq!(
            crate::detached::write_data_length_bytes(&request.entries[1]),
            100
        );
        let blank = Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 8),
            payload: EntryPayload::Blank,
        };
        assert_eq!(crate::detached::write_data_length_bytes(&blank), 0);
    }
}
