//! `StorageNode`: one storage daemon. It opens its device and state directory, runs one Raft
//! group per container (container 0 holds the metadata, each volume has its own container),
//! checkpoints in the background, and offers the operations the gRPC services call.
//!
//! Owns: container lifecycle (start, initialise, stop, drop), proposing commands, and the
//! background checkpoint policy.
//! Must not depend on: the gRPC layer (services call into the node, not the other way round).
//!
//! Start-up never rebuilds storage structures: it reads the superblock, replays the live part of
//! the device log (bounded by the checkpoint policy), opens RocksDB, and loads the allocator's
//! bitmap groups. Its cost depends on the log since the last checkpoint, not on data size.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_common::shared_deadline::SharedDeadline;
use ballast_common::{Clock, SystemClock};
use ballast_device::{Device, EngineOptions, LogStore, BLOCK_SIZE_BYTES};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::sync::{Mutex, Notify, RwLock};

use crate::command::{Command, CommandResponse, FilesystemCommand, MetadataCommand};
use crate::error::{FsError, NodeError, NodeResult};
use crate::log_storage::{ContainerLog, DurableAppendGuard};
use crate::raft_network::{ClusterNetwork, PeerChannels};
use crate::read_barrier::{ReadBarrier, ReadPointError};
use crate::records::{ContainerRecord, VolumeRecord, ROOT_INODE};
use crate::state_machine::ContainerStateMachine;
use crate::state_store::StateStore;
use crate::storage::NodeStorage;
use crate::types::{NodeId, Raft, METADATA_CONTAINER_ID};
use crate::{filesystem, keys, metadata, placement};

/// Checkpoint when the device log is this full (percent).
const CHECKPOINT_LOG_USED_PERCENT: u64 = 40;
/// Checkpoint at least this often by default, which bounds restart replay time.
pub const CHECKPOINT_INTERVAL_MS_DEFAULT: u64 = 30_000;
/// How often the checkpoint policy looks at the log.
const CHECKPOINT_POLL_INTERVAL_MS: u64 = 200;
/// Below this fraction of its data blocks free, the device is low: logs are purged as far as
/// their snapshots go, also what slow followers still need (`purge_policy`).
const DEVICE_LOW_FRACTION: u64 = 8;
/// How long start-up waits for a single-member container to elect itself leader.
const LEADER_WAIT_MS_MAX: u64 = 30_000;
/// How long start-up waits for a replicated container (metadata) to find a leader before
/// serving anyway (requests then get "no leader" until one is elected).
const REPLICATED_LEADER_WAIT_MS_MAX: u64 = 5_000;
/// How long start-up waits for a started group's metrics to show its membership.
const MEMBERSHIP_WAIT_MS_MAX: u64 = 2_000;
/// A follower counts as in contact when it answered a Raft RPC within this time (heartbeats go
/// out every 150 ms; generous, so a follower busy installing a snapshot still counts).
const REPLICA_CONTACT_MS_MAX: u64 = 5_000;
/// How long a proposal waits to be committed and applied.
const PROPOSE_COMMIT_TIMEOUT_MS: u64 = 10_000;
/// Attempts of a proposal while its container elects a leader.
const PROPOSE_ATTEMPT_COUNT_MAX: u32 = 12;
const PROPOSE_BACKOFF_MS: u64 = 50;
/// How long a command short of device space waits for blocks freed since the last checkpoint
/// to come back (`space.rs`) before it is refused with ENOSPC.
const SPACE_WAIT_MS_MAX: u64 = 5_000;
const SPACE_POLL_INTERVAL_MS: u64 = 200;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub device_path: PathBuf,
    pub state_directory: PathBuf,
    pub listen_address: SocketAddr,
    /// The address other nodes and clients use ("http://host:port").
    pub advertise_address: String,
    /// Any node of an existing cluster to join; `None` starts (or restarts) a cluster here.
    pub join_address: Option<String>,
    /// Shared secret every node of a cluster is started with; joins must present it.
    pub join_secret: String,
    pub labels: BTreeMap<String, String>,
    /// Checkpoint (and purge the log) at least this often.
    pub checkpoint_interval_ms: u64,
    /// How long a node may stay unreachable before its replicas are re-created elsewhere.
    pub down_grace_ms: u64,
    /// Background scrub pace and interval.
    pub scrub: crate::scrub::ScrubConfig,
    /// When idle groups stop their own heartbeats (`quiescence.rs`).
    pub quiescence: crate::quiescence::QuiescenceConfig,
    /// Writes at least this long (and block-aligned) have their data written once, to blocks
    /// named by the log (`detached.rs`); 0 logs every write's data inline.
    pub detached_write_bytes_min: u64,
    /// What the replica mover may do besides repairs, drains and rebalancing (`placement.rs`).
    pub move_policy: crate::placement::MovePolicy,
    /// Memory for the state store's block cache (`state_store.rs`): the block rows and
    /// directory entries read most recently, and those flushed since, until compacted.
    pub state_block_cache_bytes: usize,
}

pub(crate) struct Container {
    pub(crate) raft: Raft,
    /// The same log storage the Raft instance appends to (for durable-append requests).
    log: ContainerLog,
    /// Concurrent reads' read points share quorum rounds of this Raft instance
    /// (`read_barrier.rs`).
    read_barrier: Arc<ReadBarrier>,
}

/// A barrier whose rounds confirm read points of `raft` (`ensure_linearizable`).
fn read_barrier_of(raft: &Raft) -> Arc<ReadBarrier> {
    let raft = raft.clone();
    ReadBarrier::new(Arc::new(move || {
        let raft = raft.clone();
        Box::pin(async move {
            match raft.ensure_linearizable().await {
                Ok(_) => Ok(()),
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                    forward,
                ))) => Err(ReadPointError::NotLeader {
                    leader_address: forward.leader_node.map(|node| node.addr),
                }),
                Err(error) => Err(ReadPointError::Failed(error.to_string())),
            }
        })
    }))
}

pub struct StorageNode {
    pub(crate) node_id: u64,
    pub(crate) config: NodeConfig,
    device: Device,
    pub(crate) storage: Arc<NodeStorage>,
    log_store: LogStore,
    pub(crate) containers: RwLock<HashMap<u64, Container>>,
    /// Serialises container start-up, so two paths never create two Raft instances of one group.
    starting: Mutex<()>,
    pub(crate) peers: Arc<PeerChannels>,
    checkpoint_wanted: Arc<Notify>,
    /// Taken by writers short of device space while they checkpoint (`admit_blocks`).
    space_checkpoint: tokio::sync::Mutex<()>,
    /// Free space of the state directory's filesystem (`state_space.rs`).
    state_space: crate::state_space::StateSpace,
    clock: Arc<dyn Clock>,
    started: Instant,
    /// Since when this node leads the metadata group (kept by the replica mover).
    metadata_leading_since: std::sync::Mutex<Option<Instant>>,
    /// Verifies and repairs data blocks (`scrub.rs`).
    scrubber: crate::scrub::Scrubber,
    /// Which idle groups rely on the node heartbeat instead of their own (`quiescence.rs`).
    quiescence: crate::quiescence::Quiescence,
    /// What the filesystem service did to make data durable (shown by `ballast status`).
    sync_counters: SyncCounters,
    /// Memory shared with FUSE drivers on this host (`shared_regions.rs`).
    shared_regions: Arc<crate::shared_regions::SharedRegions>,
    /// Replicas restarted after a fatal error that may not campaign yet (`election_hold.rs`).
    election_holds: std::sync::Mutex<crate::election_hold::ElectionHolds>,
    /// Replicas their nodes reported as failing again and again; the mover replaces them while
    /// this node leads the metadata group (`failing_replicas.rs`).
    failing_replicas: std::sync::Mutex<crate::failing_replicas::FailingReplicas>,
}

/// Counts of the requests that make file data durable, since the node started.
#[derive(Debug, Default)]
pub struct SyncCounters {
    /// `Filesystem.Fsync` requests served.
    pub fsync_request_count: std::sync::atomic::AtomicU64,
    /// Writes that asked to be durable and were, before their answer.
    pub durable_write_count: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for StorageNode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StorageNode")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn raft_config(container_id: u64) -> NodeResult<Arc<Config>> {
    let config = Config {
        cluster_name: format!("container-{container_id}"),
        heartbeat_interval: 150,
        // Generous on a loaded 2-core machine, so a busy node is not mistaken for a dead one.
        election_timeout_min: 750,
        election_timeout_max: 1_500,
        // Checkpoints are driven by log space and time (see `checkpoint_loop`); this is only a
        // backstop for very many tiny entries.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(50_000),
        // openraft never purges by itself: the checkpoint loop purges what `purge_policy`
        // allows, which keeps what a follower in contact still needs (openraft alone purged
        // it whenever no append was in flight, and the follower got the whole container).
        max_in_snapshot_log_to_keep: u64::MAX,
        purge_batch_size: 1,
        // 16 entries of at most 1 MiB keep a replication message well under the transport limit.
        max_payload_entries: 16,
        // The last snapshot chunk's answer waits for the whole import on the receiver (a few
        // seconds per GiB); openraft's 200 ms default made every large snapshot time out and
        // start over. 600 s covers containers of well over 100 GiB. Chunks of 16 MiB (well under
        // the 128 MiB message limit) cut the round trips of a large copy by five.
        install_snapshot_timeout: 600_000,
        snapshot_max_chunk_size: crate::snapshot_spool::RECEIVE_CHUNK_BYTES_MAX as u64,
        ..Default::default()
    };
    Ok(Arc::new(
        config
            .validate()
            .map_err(|error| NodeError::Raft(error.to_string()))?,
    ))
}

/// Whether a Raft group has exactly one voter, `node_id`: such a group commits alone and is
/// waited for at start-up.
fn is_local_only(raft: &Raft, node_id: NodeId) -> bool {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    voters == [node_id] && membership.learner_ids().next().is_none()
}

impl StorageNode {
    /// Opens the device and state directory and starts every container this node holds.
    pub async fn open(config: NodeConfig) -> NodeResult<Arc<Self>> {
        let opened = Instant::now();
        // Opening blocks (superblock reads, log recovery): keep it off the runtime's workers.
        let device_path = config.device_path.clone();
        let (device, log_store) =
            tokio::task::spawn_blocking(move || -> NodeResult<(Device, LogStore)> {
                let device =
                    Device::open(&device_path, EngineOptions::default()).map_err(|source| {
                        NodeError::device(format!("open {}", device_path.display()), source)
                    })?;
                let log_store = LogStore::open(device.engine(), device.superblock())
                    .map_err(|source| NodeError::device("recover log store", source))?;
                Ok((device, log_store))
            })
            .await
            .map_err(|error| NodeError::InvalidState(format!("open task: {error}")))??;
        let superblock = device.superblock().clone();
        std::fs::create_dir_all(&config.state_directory).map_err(|source| NodeError::Io {
            context: format!("create {}", config.state_directory.display()),
            source,
        })?;
        // Before RocksDB: the reserve is taken while there is room.
        let state_space = crate::state_space::StateSpace::open(&config.state_directory);
        let state = StateStore::open_with_block_cache(
            &config.state_directory.join("rocksdb"),
            config.state_block_cache_bytes,
        )?;
        let config_scrub = config.scrub;
        let config_quiescence = config.quiescence;
        let spool =
            crate::snapshot_spool::SpoolDirectory::open(&config.state_directory.join("spool"))?;
        let storage = Arc::new(NodeStorage::open(
            state,
            device.block_store(),
            superblock.data_block_count,
            spool,
        )?);
        repin_detached_records(&log_store, &storage)?;
        let node = Arc::new(Self {
            node_id: superblock.node_id,
            config,
            device,
            storage,
            log_store,
            containers: RwLock::new(HashMap::new()),
            starting: Mutex::new(()),
            peers: Arc::new(PeerChannels::default()),
            checkpoint_wanted: Arc::new(Notify::new()),
            space_checkpoint: tokio::sync::Mutex::new(()),
            state_space,
            clock: Arc::new(SystemClock),
            started: Instant::now(),
            metadata_leading_since: std::sync::Mutex::new(None),
            scrubber: crate::scrub::Scrubber::new(config_scrub),
            quiescence: crate::quiescence::Quiescence::new(superblock.node_id, config_quiescence),
            sync_counters: SyncCounters::default(),
            shared_regions: Arc::default(),
            election_holds: std::sync::Mutex::new(Default::default()),
            failing_replicas: std::sync::Mutex::new(Default::default()),
        });
        node.start_metadata_container().await?;
        let local_authority = node.metadata_is_local_only().await;
        if local_authority {
            // A one-node cluster: register synchronously so volumes can be placed at once.
            node.register_locally().await?;
        }
        let volumes = metadata::list_volumes(&node.storage)?;
        for container in metadata::list_containers(&node.storage)? {
            if container.holds(node.node_id) {
                if let Err(error) = node.start_replica(&container).await {
                    // Replicated containers may lack peers right now; the reconcile loop retries.
                    tracing::warn!(container = container.container_id, %error, "container not started yet");
                }
            }
        }
        if local_authority {
            // Only a node whose metadata is authoritative may conclude a container is orphaned; a
            // follower's metadata may lag behind its containers.
            node.drop_containers_without_volume(&volumes).await?;
        }
        tokio::spawn(checkpoint_loop(Arc::clone(&node)));
        tokio::spawn(crate::cluster::reconcile_loop(Arc::clone(&node)));
        tokio::spawn(crate::cluster::free_space_report_loop(Arc::clone(&node)));
        tokio::spawn(crate::mover::mover_loop(Arc::clone(&node)));
        tokio::spawn(crate::scrub::scrub_loop(Arc::clone(&node)));
        tokio::spawn(crate::quiescence::quiescence_loop(Arc::clone(&node)));
        if !local_authority {
            tokio::spawn(crate::cluster::join_loop(Arc::clone(&node)));
        }
        tracing::info!(
            node_id = node.node_id,
            volumes = volumes.len(),
            startup_ms = opened.elapsed().as_millis() as u64,
            "storage node ready"
        );
        Ok(node)
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn storage(&self) -> &Arc<NodeStorage> {
        &self.storage
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn log_store(&self) -> &LogStore {
        &self.log_store
    }

    pub fn quiescence(&self) -> &crate::quiescence::Quiescence {
        &self.quiescence
    }

    pub fn shared_regions(&self) -> &Arc<crate::shared_regions::SharedRegions> {
        &self.shared_regions
    }

    pub fn sync_counters(&self) -> &SyncCounters {
        &self.sync_counters
    }

    fn election_holds(&self) -> std::sync::MutexGuard<'_, crate::election_hold::ElectionHolds> {
        // Each operation is one map step: a poisoned lock is still consistent.
        self.election_holds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether this replica of the container may not start elections now (restarted after a
    /// fatal error, `election_hold.rs`). Quiescence and leader balancing respect it.
    pub fn election_held(&self, container_id: u64) -> bool {
        self.election_holds().is_held(container_id)
    }

    fn failing_replicas(
        &self,
    ) -> std::sync::MutexGuard<'_, crate::failing_replicas::FailingReplicas> {
        // Each operation is one map step: a poisoned lock is still consistent.
        self.failing_replicas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a report that `node_id`'s replica of `container_id` keeps failing.
    pub fn record_failing_replica(&self, container_id: u64, node_id: NodeId) {
        self.failing_replicas()
            .record(container_id, node_id, Instant::now());
    }

    /// The replicas reported failing and not yet forgotten, as `(container, node)`.
    pub fn failing_replicas_now(&self) -> std::collections::BTreeSet<(u64, NodeId)> {
        self.failing_replicas().current(Instant::now())
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn scrubber(&self) -> &crate::scrub::Scrubber {
        &self.scrubber
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn now_ns(&self) -> i64 {
        self.clock.now_ns()
    }

    /// Records whether this node leads the metadata group now (the replica mover calls this).
    pub(crate) fn set_metadata_leading(&self, leads: bool) {
        let mut since = self.metadata_leading_since.lock().expect("leading lock");
        match (leads, since.is_some()) {
            (true, false) => *since = Some(Instant::now()),
            (false, true) => *since = None,
            _ => {}
        }
    }

    /// How long this node has led the metadata group without interruption, as last seen by the
    /// replica mover; `None` when it does not lead.
    pub(crate) fn metadata_leading_for(&self) -> Option<Duration> {
        self.metadata_leading_since
            .lock()
            .expect("leading lock")
            .map(|since| since.elapsed())
    }

    pub(crate) fn basic_node(&self) -> BasicNode {
        BasicNode::new(self.config.advertise_address.clone())
    }

    /// The metadata container: initialised here as a one-node cluster unless this node joins
    /// another one.
    async fn start_metadata_container(&self) -> NodeResult<()> {
        let _starting = self.starting.lock().await;
        let (raft, log) = self.new_raft(METADATA_CONTAINER_ID, true).await?;
        if !self.is_initialized(&raft, METADATA_CONTAINER_ID).await?
            && self.config.join_address.is_none()
        {
            let members = BTreeMap::from([(self.node_id, self.basic_node())]);
            raft.initialize(members).await.map_err(|error| {
                NodeError::Raft(format!("initialise the metadata container: {error}"))
            })?;
        }
        self.wait_for_membership(&raft, METADATA_CONTAINER_ID).await;
        if is_local_only(&raft, self.node_id) {
            self.wait_until_served(&raft, METADATA_CONTAINER_ID).await?;
        }
        // A replicated metadata group is not waited for: its peers can only reach this node once
        // it serves, and requests meanwhile get a clear "no leader" answer.
        self.containers.write().await.insert(
            METADATA_CONTAINER_ID,
            Container {
                read_barrier: read_barrier_of(&raft),
                raft,
                log,
            },
        );
        Ok(())
    }

    /// Whether the metadata group is this node alone (a one-node cluster).
    pub(crate) async fn metadata_is_local_only(&self) -> bool {
        match self.containers.read().await.get(&METADATA_CONTAINER_ID) {
            Some(container) => is_local_only(&container.raft, self.node_id),
            None => false,
        }
    }

    async fn register_locally(&self) -> NodeResult<()> {
        let record = self.node_record();
        self.propose(
            METADATA_CONTAINER_ID,
            Command::Metadata(MetadataCommand::RegisterNode(record)),
        )
        .await?;
        Ok(())
    }

    /// This node as the cluster map should record it.
    pub(crate) fn node_record(&self) -> crate::records::NodeRecord {
        let superblock = self.device.superblock();
        crate::records::NodeRecord {
            node_id: self.node_id,
            address: self.config.advertise_address.clone(),
            labels: self.config.labels.clone(),
            device_uuid: superblock.device_uuid,
            data_block_count: superblock.data_block_count,
            data_block_free_count: self.storage.free_block_count(),
            registered_ns: self.now_ns(),
            // The metadata state machine keeps the recorded value.
            draining: false,
        }
    }

    async fn new_raft(
        &self,
        container_id: u64,
        replicated: bool,
    ) -> NodeResult<(Raft, ContainerLog)> {
        let log = ContainerLog::new(
            container_id,
            self.log_store.clone(),
            Arc::clone(&self.storage),
            Arc::clone(&self.checkpoint_wanted),
            replicated,
            self.config.detached_write_bytes_min,
        );
        let state_machine = ContainerStateMachine::new(container_id, Arc::clone(&self.storage))
            .applying(log.written_log());
        let raft = Raft::new(
            self.node_id,
            raft_config(container_id)?,
            ClusterNetwork::new(container_id, Arc::clone(&self.peers)),
            log.clone(),
            state_machine,
        )
        .await
        .map_err(|error| NodeError::Raft(format!("start container {container_id}: {error}")))?;
        Ok((raft, log))
    }

    /// Makes the container's appends durable while the guard lives
    /// ([`ContainerLog::request_durable_appends`]); `None` when the container is not here.
    pub async fn request_durable_appends(&self, container_id: u64) -> Option<DurableAppendGuard> {
        let containers = self.containers.read().await;
        let container = containers.get(&container_id)?;
        Some(container.log.request_durable_appends())
    }

    /// Whether `guard` was taken on the log the container has now (not on one a restart
    /// replaced meanwhile).
    pub async fn durable_appends_still_current(
        &self,
        container_id: u64,
        guard: &DurableAppendGuard,
    ) -> bool {
        let containers = self.containers.read().await;
        containers
            .get(&container_id)
            .is_some_and(|container| container.log.guarded_by(guard))
    }

    async fn is_initialized(&self, raft: &Raft, container_id: u64) -> NodeResult<bool> {
        raft.is_initialized()
            .await
            .map_err(|error| NodeError::Raft(format!("container {container_id}: {error}")))
    }

    /// Waits (bounded) until the Raft metrics show the group's stored membership: right after
    /// start or initialisation they may not yet, and start-up decisions depend on it. An
    /// uninitialised group has none and is not waited for.
    async fn wait_for_membership(&self, raft: &Raft, container_id: u64) {
        if !self
            .is_initialized(raft, container_id)
            .await
            .unwrap_or(false)
        {
            return;
        }
        let shown = raft
            .wait(Some(Duration::from_millis(MEMBERSHIP_WAIT_MS_MAX)))
            .metrics(
                |metrics| {
                    metrics
                        .membership_config
                        .membership()
                        .voter_ids()
                        .next()
                        .is_some()
                },
                "membership loaded",
            )
            .await;
        if shown.is_err() {
            tracing::warn!(
                container = container_id,
                "membership not visible after start"
            );
        }
    }

    /// Waits until a single-member container leads itself and has applied its whole log.
    async fn wait_until_served(&self, raft: &Raft, container_id: u64) -> NodeResult<()> {
        raft.wait(Some(Duration::from_millis(LEADER_WAIT_MS_MAX)))
            .current_leader(self.node_id, "single-member container elects itself")
            .await
            .map_err(|error| {
                NodeError::Raft(format!("container {container_id} has no leader: {error}"))
            })?;
        // Serve nothing before the committed log is applied: after a crash the applied state in
        // RocksDB is older than the log, and reads (or the list of volumes) would be stale.
        let last_log_index = raft.metrics().borrow().last_log_index;
        raft.wait(Some(Duration::from_millis(LEADER_WAIT_MS_MAX)))
            .applied_index_at_least(last_log_index, "replay the committed log")
            .await
            .map_err(|error| {
                NodeError::Raft(format!(
                    "container {container_id} did not replay its log: {error}"
                ))
            })?;
        Ok(())
    }

    /// Whether this node runs a Raft instance of the container.
    pub(crate) async fn raft(&self, container_id: u64) -> Option<Raft> {
        self.containers
            .read()
            .await
            .get(&container_id)
            .map(|container| container.raft.clone())
    }

    /// Starts this node's replica of a container (idempotent). Only the record's bootstrap node
    /// initialises the group, and only while it has no Raft state at all; every other replica
    /// waits to hear from a leader. A container held by this node alone is waited for like the
    /// metadata of a one-node cluster.
    pub(crate) async fn start_replica(&self, record: &ContainerRecord) -> NodeResult<Raft> {
        let starting = self.starting.lock().await;
        if let Some(raft) = self.raft(record.container_id).await {
            return Ok(raft);
        }
        let container_id = record.container_id;
        if !self
            .election_holds()
            .may_start(container_id, Instant::now())
        {
            return Err(NodeError::Raft(format!(
                "container {container_id} failed to start recently; waiting before the next try"
            )));
        }
        let replicated = record.replicas.len() > 1;
        let (raft, log) = match self.new_raft(container_id, replicated).await {
            Ok(started) => started,
            Err(error) => {
                // openraft applies what it finds committed while it starts; an apply that fails
                // there (a full device) fails the start (`election_hold.rs`).
                let decision = self
                    .election_holds()
                    .on_start_failure(container_id, Instant::now());
                tracing::error!(
                    container = container_id,
                    %error,
                    failures_in_a_row = decision.failures_in_a_row,
                    "starting the replica failed; the next start waits"
                );
                drop(starting);
                self.report_if_failing(container_id, decision, &error.to_string())
                    .await;
                return Err(error);
            }
        };
        self.election_holds().on_started(container_id);
        if self.election_held(container_id) {
            // Failed before: no elections until its hold ends (`election_hold.rs`).
            raft.runtime_config().elect(false);
        }
        if !self.is_initialized(&raft, container_id).await?
            && record.bootstrap_node_id == self.node_id
        {
            let mut members = BTreeMap::new();
            for replica in &record.replicas {
                let node = metadata::get_node(&self.storage, *replica)?.ok_or_else(|| {
                    NodeError::Cluster(format!(
                        "replica node {replica} of container {container_id} is not in this node's cluster map yet"
                    ))
                })?;
                members.insert(*replica, BasicNode::new(node.address));
            }
            tracing::info!(container = container_id, replicas = ?record.replicas, "initialising container");
            raft.initialize(members).await.map_err(|error| {
                NodeError::Raft(format!("initialise container {container_id}: {error}"))
            })?;
        }
        self.wait_for_membership(&raft, container_id).await;
        if record.replicas == [self.node_id] {
            self.wait_until_served(&raft, container_id).await?;
        }
        self.containers.write().await.insert(
            container_id,
            Container {
                read_barrier: read_barrier_of(&raft),
                raft: raft.clone(),
                log,
            },
        );
        Ok(raft)
    }

    /// The Raft group of a container this node leads, after confirming with a quorum that it
    /// still leads and that everything committed is applied (a linearizable read point).
    /// Otherwise `NotLeader`, naming the leader when known.
    pub async fn leading_raft(&self, container_id: u64) -> NodeResult<Raft> {
        let Some((raft, read_barrier)) = self
            .containers
            .read()
            .await
            .get(&container_id)
            .map(|container| (container.raft.clone(), Arc::clone(&container.read_barrier)))
        else {
            return Err(self.not_leader_from_metadata(container_id));
        };
        if raft.metrics().borrow().current_leader != Some(self.node_id) {
            return Err(self.not_leader(container_id, &raft));
        }
        if is_local_only(&raft, self.node_id) {
            // A single member is the quorum; everything it acknowledged is applied.
            return Ok(raft);
        }
        // Concurrent reads share a round that started after each of them arrived.
        match read_barrier.confirm().await {
            Ok(()) => Ok(raft),
            Err(ReadPointError::NotLeader { leader_address }) => Err(NodeError::NotLeader {
                container_id,
                leader_address,
            }),
            Err(ReadPointError::Failed(error)) => Err(NodeError::Raft(format!(
                "container {container_id}: confirming leadership: {error}"
            ))),
        }
    }

    fn not_leader(&self, container_id: u64, raft: &Raft) -> NodeError {
        let metrics = raft.metrics().borrow().clone();
        let leader_address = metrics.current_leader.and_then(|leader| {
            metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|node| node.addr.clone())
        });
        NodeError::NotLeader {
            container_id,
            leader_address,
        }
    }

    /// For a container this node does not hold: point at one of its replicas (which knows the
    /// leader, or is it).
    fn not_leader_from_metadata(&self, container_id: u64) -> NodeError {
        let record = match metadata::get_container(&self.storage, container_id) {
            Ok(Some(record)) => record,
            _ => return NodeError::UnknownContainer { container_id },
        };
        let leader_address = record
            .replicas
            .iter()
            .chain(std::iter::once(&record.bootstrap_node_id))
            .rev()
            .find_map(|replica| metadata::get_node(&self.storage, *replica).ok().flatten())
            .map(|node| node.address);
        NodeError::NotLeader {
            container_id,
            leader_address,
        }
    }

    async fn initialize_root_if_leader(&self, volume: &VolumeRecord) -> NodeResult<()> {
        // Idempotent: creates the root directory if this container never got that far.
        if filesystem::get_inode(&self.storage, volume.container_id, ROOT_INODE).is_err() {
            let command = FilesystemCommand::Initialize {
                volume_id: volume.volume_id,
                quota_bytes: volume.quota_bytes,
                now_ns: self.now_ns(),
            };
            self.propose(volume.container_id, Command::Filesystem(command))
                .await?;
        }
        Ok(())
    }

    /// Starts the bootstrap replica of a new container, lets it elect a leader, and creates the
    /// volume's root directory. Called on the bootstrap node (directly, or by the
    /// `InitializeContainer` RPC). Returns the leader.
    pub async fn initialize_container(&self, container_id: u64) -> NodeResult<NodeId> {
        // The metadata entry that placed the container may still be on its way to this node.
        let deadline = Instant::now() + Duration::from_millis(REPLICATED_LEADER_WAIT_MS_MAX * 2);
        let record = loop {
            if let Some(record) = metadata::get_container(&self.storage, container_id)? {
                break record;
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Cluster(format!(
                    "container {container_id} is not in this node's cluster map"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if record.bootstrap_node_id != self.node_id {
            return Err(NodeError::Cluster(format!(
                "node {} is not the bootstrap node of container {container_id}",
                self.node_id
            )));
        }
        let raft = self.start_replica(&record).await?;
        let metrics = raft
            .wait(Some(Duration::from_millis(LEADER_WAIT_MS_MAX)))
            .metrics(
                |metrics| metrics.current_leader.is_some(),
                "container leader elected",
            )
            .await
            .map_err(|error| {
                NodeError::Raft(format!(
                    "container {container_id} elected no leader: {error}"
                ))
            })?;
        let leader = metrics.current_leader.expect("waited for a leader");
        if leader == self.node_id {
            let volume = self.volume(&record.volume_name)?;
            self.initialize_root_if_leader(&volume).await?;
        }
        Ok(leader)
    }

    /// Writes a detachable write's data to blocks before it is proposed (`prewritten.rs`), when
    /// this node leads the container; otherwise (or when not detachable) the log writer of each
    /// replica writes it as before. Gives back the data as `Bytes` for the command.
    pub async fn prewrite(
        &self,
        container_id: u64,
        offset_bytes: u64,
        data: crate::write_data::WriteData,
    ) -> NodeResult<(crate::prewritten::Prewritten, bytes::Bytes)> {
        let leading = match self.raft(container_id).await {
            Some(raft) => raft.metrics().borrow().current_leader == Some(self.node_id),
            None => false,
        };
        if !leading {
            return Ok((crate::prewritten::Prewritten::none(), data.into_bytes()));
        }
        self.storage
            .prewrite(offset_bytes, data, self.config.detached_write_bytes_min)
            .await
    }

    /// Proposes a command to a container this node leads and waits until it is applied. A
    /// command that failed deterministically comes back as `Err(NodeError::Fs(..))`; a
    /// container led elsewhere as `NotLeader` (nothing was applied).
    pub async fn propose(
        &self,
        container_id: u64,
        command: Command,
    ) -> NodeResult<CommandResponse> {
        self.propose_before(container_id, command, None).await
    }

    /// [`StorageNode::propose`], refused with nothing proposed when `deadline` has passed by
    /// the time the command would be handed to Raft (after admission, which may wait): a shared
    /// write whose driver has given up must not be ordered after what the driver sent since
    /// (`ballast_common::shared_deadline`).
    pub async fn propose_before(
        &self,
        container_id: u64,
        command: Command,
        deadline: Option<SharedDeadline>,
    ) -> NodeResult<CommandResponse> {
        let Some(raft) = self.raft(container_id).await else {
            return Err(self.not_leader_from_metadata(container_id));
        };
        // Admitted by this node's device space before it is proposed, and the blocks promised
        // until it was applied here (`space.rs`). Only a leader admits: elsewhere the proposal
        // is refused as not led here anyway.
        let leads = raft.metrics().borrow().current_leader == Some(self.node_id);
        if leads {
            self.state_space.admit(command.adds_state())?;
        }
        let _promise = if leads {
            self.admit_blocks(command.device_blocks_needed_max())
                .await?
        } else {
            None
        };
        // Checked with no await between it and the hand-over: `client_write` queues the
        // command on its first poll.
        if let Some(deadline) = deadline {
            crate::shared_regions::check_deadline(deadline, "shared write")?;
        }
        // Bounded: a leader cut off from its quorum cannot commit and does not know it yet.
        let proposed_at = std::time::Instant::now();
        let write = tokio::time::timeout(
            Duration::from_millis(PROPOSE_COMMIT_TIMEOUT_MS),
            raft.client_write(command),
        );
        let Ok(written) = write.await else {
            return Err(NodeError::Raft(format!(
                "container {container_id}: not committed within {PROPOSE_COMMIT_TIMEOUT_MS} ms \
                 (no quorum reachable?); it may still commit"
            )));
        };
        let response = match written {
            Ok(response) => response,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                return Err(NodeError::NotLeader {
                    container_id,
                    leader_address: forward.leader_node.map(|node| node.addr),
                })
            }
            Err(error) => {
                return Err(NodeError::Raft(format!(
                    "container {container_id}: {error}"
                )))
            }
        };
        tracing::debug!(
            target: "ballast::timing",
            container = container_id,
            index = response.log_id.index,
            client_write_us = proposed_at.elapsed().as_micros() as u64,
            "proposal answered"
        );
        match response.data {
            CommandResponse::Failed(error) => Err(NodeError::Fs(error)),
            other => Ok(other),
        }
    }

    /// Promises `needed_blocks` of this node's device to a command about to be proposed
    /// (`space.rs`). When they fall short but blocks freed since the last checkpoint would
    /// cover them, checkpoints and waits (bounded) before refusing: space given back by deleted
    /// files must be usable again at once, not after the next timed checkpoint.
    async fn admit_blocks(
        &self,
        needed_blocks: u64,
    ) -> NodeResult<Option<crate::space::BlockPromise>> {
        if needed_blocks == 0 {
            return Ok(None);
        }
        let deadline = Instant::now() + Duration::from_millis(SPACE_WAIT_MS_MAX);
        let mut first_attempt = true;
        loop {
            let shortfall = match self.storage.promise_blocks(needed_blocks) {
                Ok(promise) => return Ok(Some(promise)),
                Err(shortfall) => shortfall,
            };
            let coming_back = crate::space::admits(
                needed_blocks,
                shortfall
                    .free_blocks
                    .saturating_add(self.storage.deferred_block_count()),
                shortfall.promised_blocks,
                shortfall.reserve_blocks,
            );
            if !coming_back || Instant::now() >= deadline {
                return Err(shortfall.to_fs_error().into());
            }
            if std::mem::take(&mut first_attempt) {
                // Blocks of detached writes stay pinned until their log records are purged,
                // which the groups' own checkpoints do.
                self.checkpoint_wanted.notify_one();
            }
            // One checkpoint releases the frees no log record pins; writers short of space at
            // the same time share it instead of each flushing the device.
            let seen = self.storage.checkpoint_count();
            let turn = self.space_checkpoint.lock().await;
            if self.storage.checkpoint_count() == seen {
                self.storage.checkpoint(|_| Ok(())).await?;
            }
            drop(turn);
            tokio::time::sleep(Duration::from_millis(SPACE_POLL_INTERVAL_MS)).await;
        }
    }

    /// Proposes a command wherever the container's leader is: here, or forwarded once to the
    /// leader (`Cluster.Propose`). Retries, bounded, while the group elects a leader; every
    /// retried attempt provably applied nothing.
    pub async fn propose_anywhere(
        &self,
        container_id: u64,
        command: Command,
    ) -> NodeResult<CommandResponse> {
        let mut last_error = None;
        for attempt in 0..PROPOSE_ATTEMPT_COUNT_MAX {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(
                    (PROPOSE_BACKOFF_MS << attempt.min(4)).min(1_000),
                ))
                .await;
            }
            let error = match self.propose(container_id, command.clone()).await {
                Err(NodeError::NotLeader {
                    leader_address: Some(address),
                    ..
                }) if address != self.config.advertise_address => {
                    match crate::cluster::forward_proposal(self, &address, container_id, &command)
                        .await
                    {
                        Ok(CommandResponse::Failed(error)) => return Err(NodeError::Fs(error)),
                        Ok(response) => return Ok(response),
                        Err(error) => error,
                    }
                }
                other => return other,
            };
            match error {
                NodeError::NotLeader { .. } | NodeError::Raft(_) => {
                    tracing::debug!(container = container_id, attempt, %error, "proposal not placed yet");
                    last_error = Some(error);
                }
                other => return Err(other),
            }
        }
        Err(last_error.unwrap_or(NodeError::UnknownContainer { container_id }))
    }

    /// Durability barrier: every command applied before this call is durable when it returns
    /// (one device flush covers every container's buffered log appends).
    pub async fn flush_log(&self) -> NodeResult<()> {
        self.log_store
            .flush()
            .await
            .map_err(|source| NodeError::device("flush log", source))
    }

    /// Refuses a write to `volume` when fewer of its replicas than its minimum replication are in
    /// contact with this leader (the leader itself counts; a follower counts when it answered a
    /// Raft RPC of the container within [`REPLICA_CONTACT_MS_MAX`]). Raft alone would accept a
    /// write with a bare majority; a volume may ask for more.
    pub async fn check_minimum_replication(&self, volume: &VolumeRecord) -> NodeResult<()> {
        let minimum = volume.replication_minimum;
        if minimum <= 1 {
            return Ok(());
        }
        let Some(raft) = self.raft(volume.container_id).await else {
            return Ok(()); // Not here: the proposal itself answers "not leader".
        };
        // Borrowed, not cloned: this runs before every write of such a volume.
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        if metrics.current_leader != Some(self.node_id) {
            return Ok(());
        }
        let in_sync = 1 + metrics
            .membership_config
            .membership()
            .voter_ids()
            .filter(|&member| member != self.node_id)
            .filter(|&member| self.in_contact(volume.container_id, member))
            .count();
        if in_sync < minimum as usize {
            return Err(NodeError::BelowMinimumReplication {
                volume: volume.name.clone(),
                in_sync,
                minimum,
            });
        }
        Ok(())
    }

    /// Turns "volume not found" into a redirect to the metadata leader when this node is not
    /// it: the volume may be newer than this node's copy of the cluster map.
    pub async fn metadata_redirect(&self, error: NodeError) -> NodeError {
        let NodeError::Fs(FsError { errno, .. }) = &error else {
            return error;
        };
        if *errno != ballast_common::Errno::ENOENT {
            return error;
        }
        let Some(raft) = self.raft(METADATA_CONTAINER_ID).await else {
            return error;
        };
        match raft.metrics().borrow().current_leader {
            Some(leader) if leader != self.node_id => self.not_leader(METADATA_CONTAINER_ID, &raft),
            _ => error,
        }
    }

    /// The container serving a volume.
    pub fn volume(&self, name: &str) -> NodeResult<VolumeRecord> {
        metadata::get_volume(&self.storage, name)?
            .ok_or_else(|| FsError::not_found(format!("volume {name:?} does not exist")).into())
    }

    /// Creates a volume: places its container (on this node's view of the cluster map; the
    /// metadata state machine re-checks the placement), records it, and has the bootstrap
    /// replica initialise the group and the root directory. Works from any node.
    pub async fn create_volume(
        &self,
        name: &str,
        quota_bytes: u64,
        replication_factor: u32,
        replication_minimum: u32,
        node_selector: BTreeMap<String, String>,
        labels: BTreeMap<String, String>,
    ) -> NodeResult<VolumeRecord> {
        let placement = placement::place(
            &metadata::list_nodes(&self.storage)?,
            &metadata::list_containers(&self.storage)?,
            replication_factor,
            &node_selector,
        )?;
        let command = MetadataCommand::CreateVolume {
            name: name.to_owned(),
            quota_bytes,
            replication_factor,
            replication_minimum,
            now_ns: self.now_ns(),
            replicas: placement.replicas,
            bootstrap_node_id: placement.bootstrap_node_id,
            node_selector,
            labels,
        };
        let CommandResponse::Volume(volume) = self
            .propose_anywhere(METADATA_CONTAINER_ID, Command::Metadata(command))
            .await?
        else {
            return Err(NodeError::InvalidState(
                "create volume returned no volume".into(),
            ));
        };
        if placement.bootstrap_node_id == self.node_id {
            self.initialize_container(volume.container_id).await?;
        } else {
            crate::cluster::initialize_remote_container(
                self,
                placement.bootstrap_node_id,
                volume.container_id,
            )
            .await?;
        }
        self.flush_log().await?;
        Ok(volume)
    }

    /// Marks a node draining (its replicas move away, it gets no new ones) or active again.
    pub async fn set_node_draining(&self, node_id: NodeId, draining: bool) -> NodeResult<()> {
        self.propose_anywhere(
            METADATA_CONTAINER_ID,
            Command::Metadata(MetadataCommand::SetNodeDraining { node_id, draining }),
        )
        .await?;
        Ok(())
    }

    /// Whether `member` answered a Raft RPC of `container_id` from this node recently: within
    /// [`REPLICA_CONTACT_MS_MAX`], or the down grace period when that is shorter.
    pub(crate) fn in_contact(&self, container_id: u64, member: NodeId) -> bool {
        let window_ms = REPLICA_CONTACT_MS_MAX.min(self.config.down_grace_ms);
        self.peers
            .since_contact(container_id, member)
            .is_some_and(|since| since < Duration::from_millis(window_ms))
    }

    /// Changes a volume's quota: the container first (it refuses a quota below the bytes in use),
    /// then the metadata record. Repeating the call after a crash in between converges.
    pub async fn resize_volume(&self, name: &str, quota_bytes: u64) -> NodeResult<VolumeRecord> {
        let volume = self.volume(name)?;
        self.propose_anywhere(
            volume.container_id,
            Command::Filesystem(FilesystemCommand::SetQuota { quota_bytes }),
        )
        .await?;
        let command = MetadataCommand::ResizeVolume {
            name: name.to_owned(),
            quota_bytes,
        };
        let CommandResponse::Volume(volume) = self
            .propose_anywhere(METADATA_CONTAINER_ID, Command::Metadata(command))
            .await?
        else {
            return Err(NodeError::InvalidState(
                "resize volume returned no volume".into(),
            ));
        };
        self.flush_log().await?;
        Ok(volume)
    }

    /// Deletes a volume from the cluster map and drops this node's replica; other replicas drop
    /// theirs when their reconcile loop sees the record gone.
    pub async fn delete_volume(&self, name: &str) -> NodeResult<VolumeRecord> {
        let command = MetadataCommand::DeleteVolume {
            name: name.to_owned(),
        };
        let CommandResponse::Volume(volume) = self
            .propose_anywhere(METADATA_CONTAINER_ID, Command::Metadata(command))
            .await?
        else {
            return Err(NodeError::InvalidState(
                "delete volume returned no volume".into(),
            ));
        };
        self.flush_log().await?;
        self.drop_container(volume.container_id).await?;
        Ok(volume)
    }

    /// Containers this node has state for or runs (the metadata container excluded).
    pub(crate) async fn local_container_ids(&self) -> NodeResult<std::collections::BTreeSet<u64>> {
        let (start, end) = (
            vec![keys::TAG_CONTAINER_STATE],
            vec![keys::TAG_CONTAINER_STATE + 1],
        );
        let mut local = std::collections::BTreeSet::new();
        self.storage
            .state
            .scan(&start, &end, usize::MAX, |key, _| {
                let container_id = key
                    .get(1..9)
                    .and_then(|bytes| bytes.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| NodeError::InvalidState(format!("container key {key:?}")))?;
                local.insert(container_id);
                Ok(true)
            })?;
        local.extend(self.containers.read().await.keys().copied());
        local.remove(&METADATA_CONTAINER_ID);
        Ok(local)
    }

    /// Finishes deletions interrupted by a crash: containers whose volume is gone.
    async fn drop_containers_without_volume(&self, volumes: &[VolumeRecord]) -> NodeResult<()> {
        for container_id in self.local_container_ids().await? {
            if volumes
                .iter()
                .any(|volume| volume.container_id == container_id)
            {
                continue;
            }
            tracing::warn!(
                container = container_id,
                "dropping container of a deleted volume"
            );
            self.drop_container(container_id).await?;
        }
        Ok(())
    }

    /// Stops a container's Raft group and deletes its state and blocks.
    pub(crate) async fn drop_container(&self, container_id: u64) -> NodeResult<()> {
        assert_ne!(
            container_id, METADATA_CONTAINER_ID,
            "the metadata container is never dropped"
        );
        if let Some(container) = self.containers.write().await.remove(&container_id) {
            if let Err(error) = container.raft.shutdown().await {
                tracing::warn!(container = container_id, %error, "raft shutdown");
            }
        }
        self.election_holds().forget(container_id);
        self.storage.drop_container_state(container_id).await?;
        if let Some((_, last_index)) = self.log_store.group_state(container_id).last {
            self.log_store
                .append(vec![ballast_device::LogRecord::Purge {
                    group: container_id,
                    index_upto: last_index,
                    term: 0,
                }])
                .await
                .map_err(|source| NodeError::device("purge dropped container log", source))?;
        }
        // The purge is durable: the container's detached records can never come back.
        self.storage.unpin_detached_upto(container_id, u64::MAX);
        Ok(())
    }

    /// Raft handles of every container, for status.
    pub async fn container_rafts(&self) -> Vec<(u64, Raft)> {
        let mut rafts: Vec<(u64, Raft)> = self
            .containers
            .read()
            .await
            .iter()
            .map(|(&id, container)| (id, container.raft.clone()))
            .collect();
        rafts.sort_by_key(|(id, _)| *id);
        rafts
    }

    /// Restarts the Raft instance of every container whose core stopped with a fatal error (a
    /// panic inside openraft): the same as restarting the process for that container alone, since
    /// everything it acknowledged is in the log store and RocksDB. Without this the container
    /// would stay dead on this node until the process restarts.
    pub(crate) async fn restart_failed_containers(&self) {
        let released = self.election_holds().release_due(Instant::now());
        for container_id in released {
            // A replica quiescence keeps paused stays paused; quiescence resumes it.
            if self.quiescence.is_quiesced(container_id) {
                continue;
            }
            if let Some(raft) = self.raft(container_id).await {
                tracing::info!(container = container_id, "election hold over");
                raft.runtime_config().elect(true);
            }
        }
        for (container_id, raft) in self.container_rafts().await {
            let Err(fatal) = raft.is_initialized().await else {
                continue;
            };
            tracing::error!(container = container_id, %fatal, "container's Raft core stopped; restarting it");
            let _ = raft.shutdown().await; // Already stopped; the error says so.
            let restarted = if container_id == METADATA_CONTAINER_ID {
                // Replaces the dead instance in place: the node is never without one.
                self.start_metadata_container().await
            } else {
                self.containers.write().await.remove(&container_id);
                match metadata::get_container(&self.storage, container_id) {
                    Ok(Some(record)) => self.start_replica(&record).await.map(|_| ()),
                    Ok(None) => Ok(()), // Deleted meanwhile: nothing to restart.
                    Err(error) => Err(error),
                }
            };
            if let Err(error) = restarted {
                tracing::error!(container = container_id, %error, "restarting the container failed; the reconcile loop retries");
                continue;
            }
            // Back as a follower that has not heard its leader: without a hold it would
            // campaign within the election timeout and unseat a healthy leader, again after
            // every failure (openraft 0.9 has no pre-vote).
            let decision = self
                .election_holds()
                .on_restart_after_failure(container_id, Instant::now());
            if let Some(raft) = self.raft(container_id).await {
                raft.runtime_config().elect(false);
                tracing::warn!(
                    container = container_id,
                    hold_s = decision.hold.as_secs(),
                    failures_in_a_row = decision.failures_in_a_row,
                    "restarted replica may not start elections for a while"
                );
            }
            self.report_if_failing(container_id, decision, &fatal.to_string())
                .await;
        }
    }

    /// A replica that keeps failing (restarts or starts) is replaced elsewhere (the metadata
    /// group has its own voter upkeep). Reported again on every later failure, so a new
    /// metadata leader learns of it too.
    async fn report_if_failing(
        &self,
        container_id: u64,
        decision: crate::election_hold::HoldDecision,
        reason: &str,
    ) {
        if container_id != METADATA_CONTAINER_ID
            && decision.failures_in_a_row >= crate::failing_replicas::FAILURES_IN_A_ROW_REPORTED_MIN
        {
            crate::cluster::report_failing_replica(
                self,
                container_id,
                decision.failures_in_a_row,
                reason,
            )
            .await;
        }
    }

    /// Checkpoints every container now (snapshot + log purge).
    pub async fn checkpoint_all(&self) {
        for (container_id, raft) in self.container_rafts().await {
            if let Err(error) = raft.trigger().snapshot().await {
                tracing::warn!(container = container_id, %error, "snapshot trigger failed");
            }
        }
    }

    /// Purges each container's log as far as `purge_policy` allows now (`log_pressure`: the
    /// device log or detached data need room, so nothing is kept for slow followers).
    pub async fn purge_logs(&self, log_pressure: bool) {
        for (container_id, raft) in self.container_rafts().await {
            let metrics = raft.metrics().borrow().clone();
            let leads = metrics.state.is_leader() && metrics.current_leader == Some(self.node_id);
            let followers = match (&metrics.replication, leads) {
                (Some(replication), true) => replication
                    .iter()
                    .filter(|(target, _)| **target != self.node_id)
                    .map(|(target, matched)| crate::purge_policy::FollowerProgress {
                        matched_index: matched.map(|log_id| log_id.index),
                        since_contact_ms: self
                            .peers
                            .since_contact(container_id, *target)
                            .map(|since| since.as_millis() as u64),
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let state = crate::purge_policy::PurgeState {
                snapshot_index: metrics.snapshot.map(|log_id| log_id.index),
                purged_index: metrics.purged.map(|log_id| log_id.index),
                followers,
                log_pressure,
            };
            let Some(upto) = crate::purge_policy::purge_upto(&state) else {
                continue;
            };
            if let Err(error) = raft.trigger().purge_log(upto).await {
                tracing::warn!(container = container_id, %error, "log purge trigger failed");
            }
        }
    }

    /// Stops every container after a final checkpoint, so the next start replays nothing.
    pub async fn shutdown(&self) {
        self.checkpoint_all().await;
        // Give the snapshot tasks a bounded moment to finish.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut pending = false;
            for (_, raft) in self.container_rafts().await {
                let metrics = raft.metrics().borrow().clone();
                if metrics.snapshot.map(|log_id| log_id.index)
                    < metrics.last_applied.map(|log_id| log_id.index)
                {
                    pending = true;
                }
            }
            if !pending {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (container_id, raft) in self.container_rafts().await {
            if let Err(error) = raft.shutdown().await {
                tracing::warn!(container = container_id, %error, "raft shutdown");
            }
        }
    }
}

/// Background checkpoint policy: when the device log passes a fill level, when a writer found
/// the log full, or at a fixed interval.
async fn checkpoint_loop(node: Arc<StorageNode>) {
    let mut last_checkpoint = Instant::now();
    loop {
        let notified = tokio::time::timeout(
            Duration::from_millis(CHECKPOINT_POLL_INTERVAL_MS),
            node.checkpoint_wanted.notified(),
        )
        .await
        .is_ok();
        let used = node.log_store.used_bytes();
        let region = node.log_store.region_size_bytes().max(1);
        let over_threshold = used * 100 / region >= CHECKPOINT_LOG_USED_PERCENT;
        let interval_due =
            last_checkpoint.elapsed() >= Duration::from_millis(node.config.checkpoint_interval_ms);
        // Overwritten detached data stays pinned until a checkpoint lets its records be purged.
        let detached_limit_bytes = crate::detached::DETACHED_BYTES_PER_CHECKPOINT_MAX
            .min(node.device.superblock().data_block_count * BLOCK_SIZE_BYTES as u64 / 8);
        let detached_due = node.storage.detached_bytes_since_checkpoint() >= detached_limit_bytes;
        // Looked at before a checkpoint flushes RocksDB, so a filesystem that filled up since
        // gives its reserve back first (`state_space.rs`).
        node.state_space
            .check(notified || over_threshold || interval_due || detached_due);
        if notified || over_threshold || interval_due || detached_due {
            tracing::debug!(used, region, notified, "checkpointing");
            node.checkpoint_all().await;
            last_checkpoint = Instant::now();
            // Let the snapshots land before measuring again.
            tokio::time::sleep(Duration::from_millis(CHECKPOINT_POLL_INTERVAL_MS)).await;
        }
        // Detached data alone is no pressure: blocks it pins are only short once the device
        // runs low, and a purge held for a follower advances as that follower catches up.
        let device_low = node.storage.free_block_count()
            < node.device.superblock().data_block_count / DEVICE_LOW_FRACTION;
        node.purge_logs(notified || over_threshold || device_low)
            .await;
    }
}

/// Pins again the blocks of every detached record still live in the device log, before any
/// group starts (`detached.rs`; `NodeStorage::repin_recovered`). Costs no device read: the log
/// index keeps retained records in memory.
pub(crate) fn repin_detached_records(
    log_store: &LogStore,
    storage: &NodeStorage,
) -> NodeResult<()> {
    let mut record_count = 0usize;
    for group in log_store.groups() {
        let retained = log_store.retained_entries(group);
        if retained.is_empty() {
            continue;
        }
        let applied_index = crate::filesystem::container_state(storage, group)?
            .last_applied
            .map(|log_id| log_id.index);
        let mut records = Vec::with_capacity(retained.len());
        for entry in retained {
            match crate::detached::DetachedRecord::decode(&entry.payload, entry.index) {
                Ok(record) => records.push((entry.index, entry.term, record)),
                // Its blocks cannot be known; reading the entry will fail the same way, loudly.
                Err(error) => {
                    tracing::error!(container = group, %error, "undecodable detached record")
                }
            }
        }
        record_count += records.len();
        storage.repin_recovered(group, records, applied_index);
    }
    if record_count > 0 {
        let (pins, blocks) = storage.pinned_counts();
        tracing::info!(
            records = record_count,
            pins,
            blocks,
            "re-pinned detached write data"
        );
    }
    Ok(())
}

/// Formats a device for a new node (see `ballast_device::Device::format`).
pub fn format_device(path: &Path, node_id: u64) -> NodeResult<ballast_device::Superblock> {
    let options = ballast_device::FormatOptions {
        node_id,
        ..Default::default()
    };
    Device::format(path, &options)
        .map_err(|source| NodeError::device(format!("format {}", path.display()), source))
}
