//! CSI Node service: what kubelet calls to make a volume appear inside a pod.
//!
//! Owns: NodeStage (one `ballast-fuse` daemon per volume at the staging path), NodePublish (a bind
//! mount of the staging path at each target path, read-only when asked), their undoing, volume
//! stats and condition, node info and topology, and recovery of the record after a restart.
//! Must not depend on: the controller service or server internals.
//! Invariants:
//! - `/proc/self/mountinfo` decides what is mounted; the state file only adds what mountinfo
//!   cannot tell (daemon pids, requested flags). Every call re-reads mountinfo.
//! - Every call is idempotent: repeating a successful call succeeds without doing anything
//!   again; undoing something that is not there succeeds.
//! - One operation per volume at a time (`operations`), so retries from kubelet cannot
//!   interleave with the call they repeat.
//! - A live staging mount is never torn down by a repeated NodeStage; only a mount whose FUSE
//!   connection is gone (ENOTCONN/ECONNABORTED) is replaced. A slow or stalled one (storage
//!   node down) is left alone: its pods recover when the node returns.

use std::path::{Path, PathBuf};

use ballast_client::BallastClient;
use tonic::{Request, Response, Status};

use crate::csi::v1::node_server::Node;
use crate::csi::v1::node_service_capability::{self, rpc};
use crate::csi::v1::volume_usage::Unit;
use crate::csi::v1::*;
use crate::daemons::FuseDaemons;
use crate::mounts::{self, MountHealth};
use crate::operations::OperationLocks;
use crate::state::{DaemonOwner, NodeState, PublishedVolume, StagedVolume, StateFile};
use crate::{capabilities, CsiError, TOPOLOGY_NODE_KEY};

/// Time a new FUSE mount may take to appear.
const MOUNT_TIMEOUT_MS: u64 = 30_000;
/// Time a `statvfs` of a mount may take before the mount is reported as not answering.
const HEALTH_TIMEOUT_MS: u64 = 10_000;
/// Time a daemon gets to exit on its own after its mount is gone, before it is signalled.
const DAEMON_EXIT_WAIT_MS: u64 = 10_000;
/// Bound on unmounts at one path (mounts can be stacked by repeated failures elsewhere).
const UNMOUNT_COUNT_MAX: usize = 8;
/// Volumes one node may stage: each is one FUSE daemon with its own runtime and connection.
pub const MAX_VOLUMES_PER_NODE: i64 = 256;

/// The Node service of one node.
#[derive(Debug)]
pub struct NodeService {
    node_id: String,
    client: BallastClient,
    daemons: FuseDaemons,
    state_file: StateFile,
    state: tokio::sync::Mutex<NodeState>,
    locks: OperationLocks,
}

fn required<'a>(value: &'a str, field: &str, context: &str) -> Result<&'a str, CsiError> {
    if value.is_empty() {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: {field} is required"
        )));
    }
    Ok(value)
}

fn required_path(value: &str, field: &str, context: &str) -> Result<PathBuf, CsiError> {
    let path = Path::new(required(value, field, context)?);
    if !path.is_absolute() {
        return Err(CsiError::InvalidArgument(format!(
            "{context}: {field} {value:?} must be an absolute path"
        )));
    }
    Ok(mounts::resolve(path))
}

/// Whether `path` carries a mount of `volume` in `entries`.
fn mounted_volume<'a>(
    entries: &'a [mounts::MountEntry],
    path: &Path,
    volume: &str,
) -> Option<&'a mounts::MountEntry> {
    mounts::find(entries, path).filter(|entry| entry.is_ballast_volume(volume))
}

/// Drops records that mountinfo no longer backs (after a reboot, or a manual unmount); returns
/// whether anything changed.
fn reconcile(state: &mut NodeState, entries: &[mounts::MountEntry]) -> bool {
    let before = (state.staged.len(), state.published.len());
    state.staged.retain(|volume, staged| {
        let live = mounted_volume(entries, &staged.staging_path, volume).is_some();
        if live {
            tracing::info!(volume, staging_path = %staged.staging_path.display(),
                fuse_pid = staged.fuse_pid, fuse_owner = ?staged.fuse_owner,
                daemon_running = ?FuseDaemons::is_running_here(staged),
                "recovered staged volume");
        } else {
            tracing::warn!(volume, staging_path = %staged.staging_path.display(),
                "staged volume is no longer mounted; forgetting it");
        }
        live
    });
    state.published.retain(|target, published| {
        let live = mounted_volume(entries, target, &published.volume_id).is_some();
        if live {
            tracing::info!(volume = %published.volume_id, target = %target.display(),
                read_only = published.read_only, "recovered published volume");
        } else {
            tracing::warn!(volume = %published.volume_id, target = %target.display(),
                "published volume is no longer mounted; forgetting it");
        }
        live
    });
    before != (state.staged.len(), state.published.len())
}

impl NodeService {
    /// Loads the state file and reconciles it with the mount table: what survived a plugin
    /// restart is kept, what vanished (e.g. after a reboot) is forgotten.
    pub fn new(
        node_id: String,
        client: BallastClient,
        daemons: FuseDaemons,
        state_file: StateFile,
    ) -> Result<Self, CsiError> {
        let mut state = state_file.load()?;
        let entries = mounts::read_mountinfo()?;
        if reconcile(&mut state, &entries) {
            state_file.save(&state)?;
        }
        tracing::info!(
            staged_count = state.staged.len(),
            published_count = state.published.len(),
            state_file = %state_file.path().display(),
            mounter_socket = ?daemons.mounter_socket(),
            "node state loaded"
        );
        Ok(Self {
            node_id,
            client,
            daemons,
            state_file,
            state: tokio::sync::Mutex::new(state),
            locks: OperationLocks::default(),
        })
    }

    /// Applies `change` to the record and saves it before the call reports success.
    async fn update_state(&self, change: impl FnOnce(&mut NodeState)) -> Result<(), CsiError> {
        let mut state = self.state.lock().await;
        let mut next = state.clone();
        change(&mut next);
        if next != *state {
            self.state_file.save(&next)?;
            *state = next;
        }
        Ok(())
    }

    /// `NOT_FOUND` unless the storage node knows `volume_id`.
    async fn require_volume(&self, volume_id: &str) -> Result<(), CsiError> {
        let not_found = || CsiError::NotFound(format!("volume {volume_id:?} does not exist"));
        if ballast_common::validate_volume_name(volume_id).is_err() {
            return Err(not_found());
        }
        match self.client.get_volume(volume_id).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_not_found() => Err(not_found()),
            Err(error) => Err(error.into()),
        }
    }

    async fn stage(&self, request: NodeStageVolumeRequest) -> Result<(), CsiError> {
        const CONTEXT: &str = "NodeStageVolume";
        let volume_id = required(&request.volume_id, "volume_id", CONTEXT)?;
        let staging_path =
            required_path(&request.staging_target_path, "staging_target_path", CONTEXT)?;
        capabilities::require(request.volume_capability.as_ref(), CONTEXT)?;
        let _guard = self.locks.begin(volume_id)?;

        let entries = mounts::read_mountinfo()?;
        if let Some(entry) = mounts::find(&entries, &staging_path) {
            if !entry.is_ballast_volume(volume_id) {
                return Err(CsiError::AlreadyExists(format!(
                    "{CONTEXT}: {} already has a mount of {} ({})",
                    staging_path.display(),
                    entry.source,
                    entry.fs_type
                )));
            }
            match mounts::probe(&staging_path, HEALTH_TIMEOUT_MS).await {
                health if health.connection_gone() => {
                    tracing::warn!(volume = %volume_id, staging_path = %staging_path.display(),
                        condition = %health.describe(), "staging mount is dead; replacing it");
                    self.teardown_staging(volume_id, &staging_path).await?;
                }
                health => {
                    if !matches!(health, MountHealth::Answering(_)) {
                        tracing::warn!(volume = %volume_id, condition = %health.describe(),
                            "staging mount exists but is not answering; leaving it in place");
                    }
                    // Already staged: make sure it is recorded (it may predate a lost state).
                    let staging_path_recorded = staging_path.clone();
                    return self
                        .update_state(|state| {
                            state
                                .staged
                                .entry(volume_id.to_owned())
                                .or_insert(StagedVolume {
                                    staging_path: staging_path_recorded,
                                    fuse_pid: 0,
                                    fuse_start_ticks: 0,
                                    fuse_owner: DaemonOwner::default(),
                                });
                        })
                        .await;
                }
            }
        }
        let staged_elsewhere = self
            .state
            .lock()
            .await
            .staged
            .get(volume_id)
            .filter(|staged| staged.staging_path != staging_path)
            .filter(|staged| mounted_volume(&entries, &staged.staging_path, volume_id).is_some())
            .map(|staged| staged.staging_path.clone());
        if let Some(other_path) = staged_elsewhere {
            return Err(CsiError::FailedPrecondition(format!(
                "{CONTEXT}: volume {volume_id} is already staged at {} on this node",
                other_path.display()
            )));
        }
        self.require_volume(volume_id).await?;
        if self.state.lock().await.staged.len() as i64 >= MAX_VOLUMES_PER_NODE {
            return Err(CsiError::FailedPrecondition(format!(
                "{CONTEXT}: this node already has {MAX_VOLUMES_PER_NODE} staged volumes"
            )));
        }
        std::fs::create_dir_all(&staging_path)
            .map_err(|error| CsiError::io("creating staging path", &staging_path, error))?;
        let started = self
            .daemons
            .start(volume_id, &staging_path, MOUNT_TIMEOUT_MS)
            .await?;
        tracing::info!(volume = %volume_id, staging_path = %staging_path.display(),
            fuse_pid = started.daemon.pid, fuse_owner = ?started.owner, "volume staged");
        self.update_state(|state| {
            state.staged.insert(
                volume_id.to_owned(),
                StagedVolume {
                    staging_path,
                    fuse_pid: started.daemon.pid,
                    fuse_start_ticks: started.daemon.start_ticks,
                    fuse_owner: started.owner,
                },
            );
        })
        .await
    }

    /// Unmounts the volume's staging mount(s) at `staging_path` and stops its recorded daemon.
    async fn teardown_staging(&self, volume_id: &str, staging_path: &Path) -> Result<(), CsiError> {
        for _ in 0..UNMOUNT_COUNT_MAX {
            let entries = mounts::read_mountinfo()?;
            if mounted_volume(&entries, staging_path, volume_id).is_none() {
                break;
            }
            let outcome = mounts::unmount(staging_path)?;
            tracing::info!(volume = %volume_id, staging_path = %staging_path.display(), ?outcome,
                "staging mount removed");
        }
        let entries = mounts::read_mountinfo()?;
        if mounted_volume(&entries, staging_path, volume_id).is_some() {
            return Err(CsiError::Internal(format!(
                "{} is still mounted after {UNMOUNT_COUNT_MAX} unmounts",
                staging_path.display()
            )));
        }
        let recorded = self
            .state
            .lock()
            .await
            .staged
            .get(volume_id)
            .filter(|staged| staged.staging_path == staging_path)
            .cloned();
        self.daemons
            .stop(
                volume_id,
                staging_path,
                recorded.as_ref(),
                DAEMON_EXIT_WAIT_MS,
            )
            .await
    }

    async fn unstage(&self, request: NodeUnstageVolumeRequest) -> Result<(), CsiError> {
        const CONTEXT: &str = "NodeUnstageVolume";
        let volume_id = required(&request.volume_id, "volume_id", CONTEXT)?;
        let staging_path =
            required_path(&request.staging_target_path, "staging_target_path", CONTEXT)?;
        let _guard = self.locks.begin(volume_id)?;

        let entries = mounts::read_mountinfo()?;
        let still_published: Vec<String> = self
            .state
            .lock()
            .await
            .published
            .iter()
            .filter(|(target, published)| {
                published.volume_id == volume_id
                    && mounted_volume(&entries, target, volume_id).is_some()
            })
            .map(|(target, _)| target.display().to_string())
            .collect();
        if !still_published.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "{CONTEXT}: volume {volume_id} is still published at {}; unpublish it first",
                still_published.join(", ")
            )));
        }
        self.teardown_staging(volume_id, &staging_path).await?;
        tracing::info!(volume = %volume_id, staging_path = %staging_path.display(),
            "volume unstaged");
        self.update_state(|state| {
            if state
                .staged
                .get(volume_id)
                .is_some_and(|staged| staged.staging_path == staging_path)
            {
                state.staged.remove(volume_id);
            }
        })
        .await
    }

    async fn publish(&self, request: NodePublishVolumeRequest) -> Result<(), CsiError> {
        const CONTEXT: &str = "NodePublishVolume";
        let volume_id = required(&request.volume_id, "volume_id", CONTEXT)?;
        let target_path = required_path(&request.target_path, "target_path", CONTEXT)?;
        // Required here because STAGE_UNSTAGE_VOLUME is advertised.
        let staging_path =
            required_path(&request.staging_target_path, "staging_target_path", CONTEXT)?;
        let mount_request = capabilities::require(request.volume_capability.as_ref(), CONTEXT)?;
        let read_only = request.readonly || mount_request.read_only;
        let _guard = self.locks.begin(volume_id)?;

        let entries = mounts::read_mountinfo()?;
        let Some(staging_entry) = mounted_volume(&entries, &staging_path, volume_id) else {
            self.require_volume(volume_id).await?;
            return Err(CsiError::FailedPrecondition(format!(
                "{CONTEXT}: volume {volume_id} is not staged at {}; call NodeStageVolume first",
                staging_path.display()
            )));
        };
        if let Some(target_entry) = mounts::find(&entries, &target_path) {
            if !target_entry.is_ballast_volume(volume_id) {
                return Err(CsiError::AlreadyExists(format!(
                    "{CONTEXT}: {} already has a mount of {} ({})",
                    target_path.display(),
                    target_entry.source,
                    target_entry.fs_type
                )));
            }
            let recorded = self.state.lock().await.published.get(&target_path).cloned();
            let flags_differ = recorded.as_ref().is_some_and(|published| {
                published.read_only != read_only
                    || published.mount_flags != mount_request.mount_flags
            });
            if target_entry.read_only() != read_only || flags_differ {
                return Err(CsiError::AlreadyExists(format!(
                    "{CONTEXT}: volume {volume_id} is already published at {} with other \
                     options (read-only: {})",
                    target_path.display(),
                    target_entry.read_only()
                )));
            }
            if target_entry.device == staging_entry.device {
                // Already published exactly so; make sure it is recorded.
                return self
                    .record_publish(
                        volume_id,
                        &target_path,
                        &staging_path,
                        read_only,
                        &mount_request.mount_flags,
                    )
                    .await;
            }
            // A bind of an earlier FUSE session of this volume (its daemon died and the staging
            // mount was replaced): bind the live one instead.
            tracing::warn!(volume = %volume_id, target = %target_path.display(),
                "target holds a stale mount of an earlier session; replacing it");
            mounts::unmount(&target_path)?;
        }
        std::fs::create_dir_all(&target_path)
            .map_err(|error| CsiError::io("creating target path", &target_path, error))?;
        mounts::bind_mount(
            &staging_path,
            &target_path,
            read_only,
            &mount_request.mount_flags,
        )?;
        tracing::info!(volume = %volume_id, target = %target_path.display(), read_only,
            "volume published");
        self.record_publish(
            volume_id,
            &target_path,
            &staging_path,
            read_only,
            &mount_request.mount_flags,
        )
        .await
    }

    async fn record_publish(
        &self,
        volume_id: &str,
        target_path: &Path,
        staging_path: &Path,
        read_only: bool,
        mount_flags: &[String],
    ) -> Result<(), CsiError> {
        self.update_state(|state| {
            state.published.insert(
                target_path.to_path_buf(),
                PublishedVolume {
                    volume_id: volume_id.to_owned(),
                    staging_path: staging_path.to_path_buf(),
                    read_only,
                    mount_flags: mount_flags.to_vec(),
                },
            );
        })
        .await
    }

    async fn unpublish(&self, request: NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        const CONTEXT: &str = "NodeUnpublishVolume";
        let volume_id = required(&request.volume_id, "volume_id", CONTEXT)?;
        let target_path = required_path(&request.target_path, "target_path", CONTEXT)?;
        let _guard = self.locks.begin(volume_id)?;

        for _ in 0..UNMOUNT_COUNT_MAX {
            let entries = mounts::read_mountinfo()?;
            if mounted_volume(&entries, &target_path, volume_id).is_none() {
                break;
            }
            let outcome = mounts::unmount(&target_path)?;
            tracing::info!(volume = %volume_id, target = %target_path.display(), ?outcome,
                "volume unpublished");
        }
        let entries = mounts::read_mountinfo()?;
        if mounted_volume(&entries, &target_path, volume_id).is_some() {
            return Err(CsiError::Internal(format!(
                "{CONTEXT}: {} is still mounted after {UNMOUNT_COUNT_MAX} unmounts",
                target_path.display()
            )));
        }
        // The spec asks the plugin to remove the target it created; only an empty directory is
        // removed, anything else (another mount, files) stays untouched.
        if mounts::find(&entries, &target_path).is_none() {
            match std::fs::remove_dir(&target_path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(target = %target_path.display(), %error,
                        "target path left in place")
                }
            }
        }
        self.update_state(|state| {
            if state
                .published
                .get(&target_path)
                .is_some_and(|published| published.volume_id == volume_id)
            {
                state.published.remove(&target_path);
            }
        })
        .await
    }

    async fn stats(
        &self,
        request: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, CsiError> {
        const CONTEXT: &str = "NodeGetVolumeStats";
        let volume_id = required(&request.volume_id, "volume_id", CONTEXT)?;
        let volume_path = required_path(&request.volume_path, "volume_path", CONTEXT)?;
        let entries = mounts::read_mountinfo()?;
        if mounted_volume(&entries, &volume_path, volume_id).is_none() {
            return Err(CsiError::NotFound(format!(
                "{CONTEXT}: volume {volume_id} is not mounted at {}",
                volume_path.display()
            )));
        }
        let health = mounts::probe(&volume_path, HEALTH_TIMEOUT_MS).await;
        let mut message = health.describe();
        if health.connection_gone() {
            if let Some(explanation) = self.daemons.explain_dead_connection(volume_id).await {
                message = format!("{message}; {explanation}");
            }
        }
        let condition = VolumeCondition {
            abnormal: !matches!(health, MountHealth::Answering(_)),
            message,
        };
        let usage = match health {
            MountHealth::Answering(usage) => {
                let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
                vec![
                    VolumeUsage {
                        available: signed(usage.available_bytes),
                        total: signed(usage.total_bytes),
                        used: signed(usage.used_bytes),
                        unit: Unit::Bytes as i32,
                    },
                    VolumeUsage {
                        available: signed(usage.free_inodes),
                        total: signed(usage.total_inodes),
                        used: signed(usage.used_inodes),
                        unit: Unit::Inodes as i32,
                    },
                ]
            }
            _ => Vec::new(),
        };
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    async fn expand(
        &self,
        request: NodeExpandVolumeRequest,
    ) -> Result<NodeExpandVolumeResponse, CsiError> {
        const CONTEXT: &str = "NodeExpandVolume";
        let volume_id = required(&request.volume_id, "volume_id", CONTEXT)?;
        let volume_path = required_path(&request.volume_path, "volume_path", CONTEXT)?;
        if let Some(capability) = &request.volume_capability {
            capabilities::validate(capability, CONTEXT)?;
        }
        let entries = mounts::read_mountinfo()?;
        if mounted_volume(&entries, &volume_path, volume_id).is_none() {
            return Err(CsiError::NotFound(format!(
                "{CONTEXT}: volume {volume_id} is not mounted at {}",
                volume_path.display()
            )));
        }
        // Nothing to grow on the node: the FUSE statfs reports the quota the controller set.
        match mounts::probe(&volume_path, HEALTH_TIMEOUT_MS).await {
            MountHealth::Answering(usage) => Ok(NodeExpandVolumeResponse {
                capacity_bytes: i64::try_from(usage.total_bytes).unwrap_or(i64::MAX),
            }),
            health => Err(CsiError::Internal(format!(
                "{CONTEXT}: volume {volume_id} at {}: {}",
                volume_path.display(),
                health.describe()
            ))),
        }
    }
}

fn rpc_capability(kind: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        self.stage(request.into_inner()).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        self.unstage(request.into_inner()).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.publish(request.into_inner()).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Ok(Response::new(self.stats(request.into_inner()).await?))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand(request.into_inner()).await?))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: [
                rpc::Type::StageUnstageVolume,
                rpc::Type::GetVolumeStats,
                rpc::Type::VolumeCondition,
                rpc::Type::ExpandVolume,
                rpc::Type::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(rpc_capability)
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: MAX_VOLUMES_PER_NODE,
            accessible_topology: Some(Topology {
                segments: [(TOPOLOGY_NODE_KEY.to_owned(), self.node_id.clone())].into(),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_forgets_what_is_no_longer_mounted() {
        let entries = mounts::parse_mountinfo(
            "42 22 0:39 / /stage/a rw,nosuid,nodev - fuse ballast:a rw\n\
             43 22 0:39 / /pods/1/a rw,nosuid,nodev - fuse ballast:a rw\n",
        );
        let mut state = NodeState::default();
        for volume in ["a", "b"] {
            state.staged.insert(
                volume.into(),
                StagedVolume {
                    staging_path: format!("/stage/{volume}").into(),
                    fuse_pid: 0,
                    fuse_start_ticks: 0,
                    fuse_owner: DaemonOwner::Plugin,
                },
            );
            state.published.insert(
                format!("/pods/1/{volume}").into(),
                PublishedVolume {
                    volume_id: volume.into(),
                    staging_path: format!("/stage/{volume}").into(),
                    read_only: false,
                    mount_flags: Vec::new(),
                },
            );
        }
        assert!(reconcile(&mut state, &entries));
        assert_eq!(state.staged.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            state.published.keys().collect::<Vec<_>>(),
            [Path::new("/pods/1/a")]
        );
        assert!(!reconcile(&mut state, &entries), "stable once reconciled");
    }

    #[test]
    fn paths_must_be_given_and_absolute() {
        assert!(matches!(
            required_path("", "target_path", "t"),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            required_path("relative/path", "target_path", "t"),
            Err(CsiError::InvalidArgument(_))
        ));
        assert_eq!(
            required_path("/nonexistent-root/x", "target_path", "t").unwrap(),
            Path::new("/nonexistent-root/x")
        );
    }
}
