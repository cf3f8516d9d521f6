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

    async fn send<Request, Response, Error>(
        &mut self,
        rpc: RaftRpc,
        request: &Request,
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
        let payload = postcard::to_allocvec(request).map_err(|error| {
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

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        self.send(RaftRpc::AppendEntries, &request, Vec::new(), &option)
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
            .send(RaftRpc::InstallSnapshot, &request, snapshot_data, &option)
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
        self.send(RaftRpc::Vote, &request, Vec::new(), &option)
            .await
    }
}
