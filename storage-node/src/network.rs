//! Raft network for containers. Every container is a single-member group until clustering
//! lands, so no Raft RPC ever leaves the node; this factory answers any attempt with a clear
//! "unreachable" instead of pretending. The clustering issue replaces it with a tonic transport
//! that batches heartbeats across groups.

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::types::{NodeId, RaftNode, TypeConfig};

#[derive(Debug, Clone, Default)]
pub struct LocalOnlyNetwork;

#[derive(Debug, Clone)]
pub struct NoPeer {
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for LocalOnlyNetwork {
    type Network = NoPeer;

    async fn new_client(&mut self, target: NodeId, _node: &RaftNode) -> Self::Network {
        NoPeer { target }
    }
}

impl NoPeer {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, RaftNode, E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
            "node {} is not reachable: Raft transport between nodes is not built yet",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for NoPeer {
    async fn append_entries(
        &mut self,
        _request: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _request: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, RaftNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _request: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RaftNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }
}
