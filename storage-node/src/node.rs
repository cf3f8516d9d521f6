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

use ballast_common::{Clock, SystemClock};
use ballast_device::{Device, EngineOptions, LogStore};
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::sync::{Notify, RwLock};

use crate::command::{Command, CommandResponse, FilesystemCommand, MetadataCommand};
use crate::error::{FsError, NodeError, NodeResult};
use crate::log_storage::ContainerLog;
use crate::network::LocalOnlyNetwork;
use crate::records::{VolumeRecord, ROOT_INODE};
use crate::state_machine::ContainerStateMachine;
use crate::state_store::StateStore;
use crate::storage::NodeStorage;
use crate::types::{Raft, METADATA_CONTAINER_ID};
use crate::{filesystem, keys, metadata};

/// Checkpoint when the device log is this full (percent).
const CHECKPOINT_LOG_USED_PERCENT: u64 = 40;
/// Checkpoint at least this often, which bounds restart replay time.
const CHECKPOINT_INTERVAL_MS: u64 = 30_000;
/// How often the checkpoint policy looks at the log.
const CHECKPOINT_POLL_INTERVAL_MS: u64 = 200;
/// How long start-up waits for a container to elect itself leader.
const LEADER_WAIT_MS_MAX: u64 = 30_000;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub device_path: PathBuf,
    pub state_directory: PathBuf,
    pub listen_address: SocketAddr,
}

struct Container {
    raft: Raft,
}

pub struct StorageNode {
    node_id: u64,
    config: NodeConfig,
    device: Device,
    storage: Arc<NodeStorage>,
    log_store: LogStore,
    containers: RwLock<HashMap<u64, Container>>,
    checkpoint_wanted: Arc<Notify>,
    clock: Arc<dyn Clock>,
    started: Instant,
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
        heartbeat_interval: 100,
        election_timeout_min: 200,
        election_timeout_max: 400,
        // Checkpoints are driven by log space and time (see `checkpoint_loop`); this is only a
        // backstop for very many tiny entries.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(50_000),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        max_payload_entries: 64,
        ..Default::default()
    };
    Ok(Arc::new(
        config
            .validate()
            .map_err(|error| NodeError::Raft(error.to_string()))?,
    ))
}

impl StorageNode {
    /// Opens the device and state directory and starts every container.
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
        let state = StateStore::open(&config.state_directory.join("rocksdb"))?;
        let storage = Arc::new(NodeStorage::open(
            state,
            device.block_store(),
            superblock.data_block_count,
        )?);
        let node = Arc::new(Self {
            node_id: superblock.node_id,
            config,
            device,
            storage,
            log_store,
            containers: RwLock::new(HashMap::new()),
            checkpoint_wanted: Arc::new(Notify::new()),
            clock: Arc::new(SystemClock),
            started: Instant::now(),
        });
        node.start_container(METADATA_CONTAINER_ID).await?;
        let volumes = metadata::list_volumes(&node.storage)?;
        for volume in &volumes {
            node.start_volume_container(volume).await?;
        }
        node.drop_containers_without_volume(&volumes).await?;
        tokio::spawn(checkpoint_loop(Arc::clone(&node)));
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

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn now_ns(&self) -> i64 {
        self.clock.now_ns()
    }

    async fn start_container(&self, container_id: u64) -> NodeResult<Raft> {
        if let Some(container) = self.containers.read().await.get(&container_id) {
            return Ok(container.raft.clone());
        }
        let log = ContainerLog::new(
            container_id,
            self.log_store.clone(),
            Arc::clone(&self.storage),
            Arc::clone(&self.checkpoint_wanted),
        );
        let state_machine = ContainerStateMachine::new(container_id, Arc::clone(&self.storage));
        let raft = Raft::new(
            self.node_id,
            raft_config(container_id)?,
            LocalOnlyNetwork,
            log,
            state_machine,
        )
        .await
        .map_err(|error| NodeError::Raft(format!("start container {container_id}: {error}")))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|error| NodeError::Raft(format!("container {container_id}: {error}")))?;
        if !initialized {
            let members = BTreeMap::from([(
                self.node_id,
                BasicNode::new(self.config.listen_address.to_string()),
            )]);
            raft.initialize(members).await.map_err(|error| {
                NodeError::Raft(format!("initialise container {container_id}: {error}"))
            })?;
        }
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
        self.containers
            .write()
            .await
            .insert(container_id, Container { raft: raft.clone() });
        Ok(raft)
    }

    async fn start_volume_container(&self, volume: &VolumeRecord) -> NodeResult<()> {
        self.start_container(volume.container_id).await?;
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

    /// Proposes a command to a container and waits until it is applied. A command that failed
    /// deterministically comes back as `Err(NodeError::Fs(..))`.
    pub async fn propose(
        &self,
        container_id: u64,
        command: Command,
    ) -> NodeResult<CommandResponse> {
        let raft = self
            .containers
            .read()
            .await
            .get(&container_id)
            .map(|container| container.raft.clone())
            .ok_or(NodeError::UnknownContainer { container_id })?;
        let response = raft
            .client_write(command)
            .await
            .map_err(|error| NodeError::Raft(format!("container {container_id}: {error}")))?;
        match response.data {
            CommandResponse::Failed(error) => Err(NodeError::Fs(error)),
            other => Ok(other),
        }
    }

    /// Durability barrier: every command applied before this call is durable when it returns
    /// (one device flush covers every container's buffered log appends).
    pub async fn flush_log(&self) -> NodeResult<()> {
        self.log_store
            .flush()
            .await
            .map_err(|source| NodeError::device("flush log", source))
    }

    /// The container serving a volume.
    pub fn volume(&self, name: &str) -> NodeResult<VolumeRecord> {
        metadata::get_volume(&self.storage, name)?
            .ok_or_else(|| FsError::not_found(format!("volume {name:?} does not exist")).into())
    }

    pub async fn create_volume(
        &self,
        name: &str,
        quota_bytes: u64,
        replication_factor: u32,
        replication_minimum: u32,
    ) -> NodeResult<VolumeRecord> {
        let command = MetadataCommand::CreateVolume {
            name: name.to_owned(),
            quota_bytes,
            replication_factor,
            replication_minimum,
            now_ns: self.now_ns(),
        };
        let CommandResponse::Volume(volume) = self
            .propose(METADATA_CONTAINER_ID, Command::Metadata(command))
            .await?
        else {
            return Err(NodeError::InvalidState(
                "create volume returned no volume".into(),
            ));
        };
        self.start_volume_container(&volume).await?;
        self.flush_log().await?;
        Ok(volume)
    }

    /// Changes a volume's quota: the container first (it refuses a quota below the bytes in use),
    /// then the metadata record. Repeating the call after a crash in between converges.
    pub async fn resize_volume(&self, name: &str, quota_bytes: u64) -> NodeResult<VolumeRecord> {
        let volume = self.volume(name)?;
        self.propose(
            volume.container_id,
            Command::Filesystem(FilesystemCommand::SetQuota { quota_bytes }),
        )
        .await?;
        let command = MetadataCommand::ResizeVolume {
            name: name.to_owned(),
            quota_bytes,
        };
        let CommandResponse::Volume(volume) = self
            .propose(METADATA_CONTAINER_ID, Command::Metadata(command))
            .await?
        else {
            return Err(NodeError::InvalidState(
                "resize volume returned no volume".into(),
            ));
        };
        self.flush_log().await?;
        Ok(volume)
    }

    pub async fn delete_volume(&self, name: &str) -> NodeResult<VolumeRecord> {
        let command = MetadataCommand::DeleteVolume {
            name: name.to_owned(),
        };
        let CommandResponse::Volume(volume) = self
            .propose(METADATA_CONTAINER_ID, Command::Metadata(command))
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

    /// Finishes deletions interrupted by a crash: containers whose volume is gone.
    async fn drop_containers_without_volume(&self, volumes: &[VolumeRecord]) -> NodeResult<()> {
        let (start, end) = (
            vec![keys::TAG_CONTAINER_STATE],
            vec![keys::TAG_CONTAINER_STATE + 1],
        );
        let mut orphans = Vec::new();
        self.storage
            .state
            .scan(&start, &end, usize::MAX, |key, _| {
                let container_id = u64::from_be_bytes(key[1..9].try_into().expect("container key"));
                if container_id != METADATA_CONTAINER_ID
                    && !volumes.iter().any(|v| v.container_id == container_id)
                {
                    orphans.push(container_id);
                }
                Ok(true)
            })?;
        for container_id in orphans {
            tracing::warn!(
                container = container_id,
                "dropping container of a deleted volume"
            );
            self.drop_container(container_id).await?;
        }
        Ok(())
    }

    /// Stops a container's Raft group and deletes its state and blocks.
    async fn drop_container(&self, container_id: u64) -> NodeResult<()> {
        assert_ne!(
            container_id, METADATA_CONTAINER_ID,
            "the metadata container is never dropped"
        );
        if let Some(container) = self.containers.write().await.remove(&container_id) {
            if let Err(error) = container.raft.shutdown().await {
                tracing::warn!(container = container_id, %error, "raft shutdown");
            }
        }
        let (block_start, block_end) = keys::container_range(keys::TAG_BLOCK, container_id);
        let mut freed = Vec::new();
        self.storage
            .state
            .scan(&block_start, &block_end, usize::MAX, |_, value| {
                freed.push(
                    crate::records::decode::<crate::records::BlockRef>(value, "block reference")?
                        .device_block,
                );
                Ok(true)
            })?;
        let mut batch = rocksdb::WriteBatch::default();
        for tag in [
            keys::TAG_CONTAINER_STATE,
            keys::TAG_INODE,
            keys::TAG_DIRENT,
            keys::TAG_DIRENT_COOKIE,
            keys::TAG_BLOCK,
            keys::TAG_ORPHAN,
            keys::TAG_VOTE,
            keys::TAG_COMMITTED,
            keys::TAG_PURGED,
            keys::TAG_SNAPSHOT,
        ] {
            let (start, end) = keys::container_range(tag, container_id);
            batch.delete_range(start, end);
        }
        self.storage.commit_batch(batch, &freed).await?;
        // Make the drop durable now, so a restart never resurrects half of it.
        self.storage.checkpoint(|_| Ok(())).await?;
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

    /// Checkpoints every container now (snapshot + log purge).
    pub async fn checkpoint_all(&self) {
        for (container_id, raft) in self.container_rafts().await {
            if let Err(error) = raft.trigger().snapshot().await {
                tracing::warn!(container = container_id, %error, "snapshot trigger failed");
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
            last_checkpoint.elapsed() >= Duration::from_millis(CHECKPOINT_INTERVAL_MS);
        if notified || over_threshold || interval_due {
            tracing::debug!(used, region, notified, "checkpointing");
            node.checkpoint_all().await;
            last_checkpoint = Instant::now();
            // Let the snapshots and purges land before measuring again.
            tokio::time::sleep(Duration::from_millis(CHECKPOINT_POLL_INTERVAL_MS)).await;
        }
    }
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
