//! The `Filesystem` service: namespace and file data of one volume per request.
//!
//! Mutations are proposed to the volume's container and answered after they are applied (so a
//! successful write is durable in the Raft log). Reads are served from the applied state of the
//! local leader; with single-member containers that is linearizable.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ballast_common::shared_deadline::SharedDeadline;
use ballast_proto::v1 as proto;
use ballast_proto::v1::filesystem_server::Filesystem;
use tonic::{Request, Response, Status};

use super::{attr, entry_kind, entry_kind_from_proto, fs_status, node_status};
use crate::command::{AttributeChanges, Command, CommandResponse, FilesystemCommand};
use crate::deduplication::{RequestId, REQUEST_ID_METADATA_KEY};
use crate::error::{FsError, NodeError};
use crate::filesystem as fs;
use crate::node::StorageNode;
use crate::records::VolumeRecord;
use crate::shared_regions::check_deadline;
use crate::write_data::WriteData;

/// Set in a node's environment to a number of milliseconds: a shared write waits that long
/// between copying its slot and being proposed. A failpoint for tests only
/// (`tests/tests/shared_deadline.rs`): it stands for a node slowed down there (admission
/// waiting for a checkpoint, a stalled runtime), so that the deadline's check right before the
/// proposal is seen to hold on its own.
pub const SHARED_WRITE_DELAY_FAILPOINT: &str = "BALLAST_FAILPOINT_SHARED_WRITE_DELAY_MS";

/// The [`SHARED_WRITE_DELAY_FAILPOINT`]'s delay, read once; bounded so a typo cannot stall
/// writes for long.
fn shared_write_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let delay_ms: u64 = std::env::var(SHARED_WRITE_DELAY_FAILPOINT)
            .ok()?
            .parse()
            .ok()?;
        Some(std::time::Duration::from_millis(delay_ms.min(10_000)))
    })
}

/// Largest read or write served in one request (the FUSE driver sends at most 1 MiB).
const IO_LENGTH_BYTES_MAX: usize = 16 << 20;

/// Refuses a write longer than [`IO_LENGTH_BYTES_MAX`].
fn check_write_length(length_bytes: usize) -> Result<(), Status> {
    if length_bytes > IO_LENGTH_BYTES_MAX {
        return Err(fs_status(FsError::invalid(format!(
            "write of {length_bytes} bytes is too large"
        ))));
    }
    Ok(())
}

/// Refuses a read longer than [`IO_LENGTH_BYTES_MAX`].
fn check_read_length(length_bytes: u32) -> Result<(), Status> {
    if length_bytes as usize > IO_LENGTH_BYTES_MAX {
        return Err(fs_status(FsError::invalid(format!(
            "read of {length_bytes} bytes is too large"
        ))));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct FilesystemService {
    node: Arc<StorageNode>,
}

impl FilesystemService {
    /// `Write` and `WriteShared` once the bytes are the node's own; refused with nothing
    /// proposed once `deadline` (a shared write's) has passed (`StorageNode::propose_before`).
    async fn write_data(
        &self,
        volume: &str,
        inode: u64,
        offset_bytes: u64,
        data: WriteData,
        durable: bool,
        deadline: Option<SharedDeadline>,
    ) -> Result<proto::WriteResponse, Status> {
        // A durable write makes its container's appends durable while it is proposed, so its
        // own append is flushed (with the group commit of the log) instead of a separate flush
        // after the apply.
        let started = std::time::Instant::now();
        let record = self.volume_record(volume).await?;
        let durable_appends = if durable {
            self.node.request_durable_appends(record.container_id).await
        } else {
            None
        };
        // A write refused for too few replicas should not cost a device write first.
        self.node
            .check_minimum_replication(&record)
            .await
            .map_err(node_status)?;
        let (prewritten, data) = self
            .node
            .prewrite(record.container_id, offset_bytes, data)
            .await
            .map_err(node_status)?;
        let prewritten_at = started.elapsed();
        let data_bytes = data.len();
        let command = FilesystemCommand::Write {
            inode,
            offset_bytes,
            data,
            now_ns: self.node.now_ns(),
            prewritten,
        };
        // Minimum replication was checked above (before the prewrite); propose directly.
        let proposed = self
            .node
            .propose_before(record.container_id, Command::Filesystem(command), deadline)
            .await
            .map_err(node_status)?;
        let (written_bytes, inode, attributes) = match proposed {
            CommandResponse::Written {
                written_bytes,
                inode,
                attributes,
            } => (written_bytes, inode, attributes),
            other => return Err(unexpected(other)),
        };
        tracing::debug!(
            target: "ballast::timing",
            container = record.container_id,
            data_bytes,
            prewrite_us = prewritten_at.as_micros() as u64,
            propose_us = (started.elapsed() - prewritten_at).as_micros() as u64,
            "write served"
        );
        // The write is applied, so its entry is in this node's log. It is durable if it was
        // appended under the guard, on the log the container still has (a restart of the group
        // in between would have replaced it). Otherwise one log flush (the same one an fsync
        // does) makes it, and everything applied before it, durable. The caller then owes no
        // fsync for it.
        if durable {
            let appended_durably = match &durable_appends {
                Some(guard) => {
                    self.node
                        .durable_appends_still_current(record.container_id, guard)
                        .await
                }
                None => false,
            };
            drop(durable_appends);
            if !appended_durably {
                self.node.flush_log().await.map_err(node_status)?;
            }
            self.node
                .sync_counters()
                .durable_write_count
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(proto::WriteResponse {
            written_bytes,
            attr: Some(attr(inode, &attributes)),
            durable,
        })
    }

    pub fn new(node: Arc<StorageNode>) -> Self {
        Self { node }
    }

    /// The container of a volume, from this node's cluster map. A volume unknown here may be
    /// one this node has not heard of yet: then the metadata leader is named instead.
    async fn volume_record(&self, volume: &str) -> Result<VolumeRecord, Status> {
        match self.node.volume(volume) {
            Ok(record) => Ok(record),
            Err(error) => Err(node_status(self.node.metadata_redirect(error).await)),
        }
    }

    async fn container(&self, volume: &str) -> Result<u64, Status> {
        Ok(self.volume_record(volume).await?.container_id)
    }

    /// The container of a volume, for a read: this node must lead it (confirmed with a quorum),
    /// so the read sees every acknowledged write.
    async fn read_container(&self, volume: &str) -> Result<u64, Status> {
        let container_id = self.container(volume).await?;
        self.node
            .leading_raft(container_id)
            .await
            .map_err(node_status)?;
        Ok(container_id)
    }

    /// Proposes to the volume's container; with a request id, at most once per id.
    async fn propose(
        &self,
        volume: &str,
        command: FilesystemCommand,
        request: Option<RequestId>,
    ) -> Result<CommandResponse, Status> {
        let record = self.volume_record(volume).await?;
        self.propose_to(&record, command, request).await
    }

    /// [`Self::propose`] to a volume already looked up.
    async fn propose_to(
        &self,
        record: &VolumeRecord,
        command: FilesystemCommand,
        request: Option<RequestId>,
    ) -> Result<CommandResponse, Status> {
        self.node
            .check_minimum_replication(record)
            .await
            .map_err(node_status)?;
        let container_id = record.container_id;
        let command = match request {
            Some(request) => Command::Once {
                request,
                command: Box::new(Command::Filesystem(command)),
            },
            None => Command::Filesystem(command),
        };
        self.node
            .propose(container_id, command)
            .await
            .map_err(node_status)
    }

    async fn propose_for_attributes(
        &self,
        volume: &str,
        command: FilesystemCommand,
        request: Option<RequestId>,
    ) -> Result<proto::Attr, Status> {
        match self.propose(volume, command, request).await? {
            CommandResponse::Attributes { inode, attributes } => Ok(attr(inode, &attributes)),
            other => Err(unexpected(other)),
        }
    }
}

/// The request id a client attached to a side-effecting call (see `deduplication`).
fn request_id<T>(request: &Request<T>) -> Result<Option<RequestId>, Status> {
    match request.metadata().get(REQUEST_ID_METADATA_KEY) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(RequestId::parse)
            .map(Some)
            .ok_or_else(|| {
                Status::invalid_argument(format!("malformed {REQUEST_ID_METADATA_KEY}"))
            }),
    }
}

fn unexpected(response: CommandResponse) -> Status {
    node_status(NodeError::InvalidState(format!(
        "unexpected command response {response:?}"
    )))
}

#[tonic::async_trait]
impl Filesystem for FilesystemService {
    async fn lookup(
        &self,
        request: Request<proto::LookupRequest>,
    ) -> Result<Response<proto::EntryResponse>, Status> {
        let request = request.into_inner();
        let container_id = self.read_container(&request.volume).await?;
        let (inode, attributes) = fs::lookup(
            self.node.storage(),
            container_id,
            request.parent,
            &request.name,
        )
        .map_err(node_status)?;
        Ok(Response::new(proto::EntryResponse {
            attr: Some(attr(inode, &attributes)),
        }))
    }

    async fn get_attr(
        &self,
        request: Request<proto::GetAttrRequest>,
    ) -> Result<Response<proto::AttrResponse>, Status> {
        let request = request.into_inner();
        let container_id = self.read_container(&request.volume).await?;
        let attributes =
            fs::get_inode(self.node.storage(), container_id, request.inode).map_err(node_status)?;
        Ok(Response::new(proto::AttrResponse {
            attr: Some(attr(request.inode, &attributes)),
        }))
    }

    async fn set_attr(
        &self,
        request: Request<proto::SetAttrRequest>,
    ) -> Result<Response<proto::AttrResponse>, Status> {
        let request = request.into_inner();
        let changes = AttributeChanges {
            mode: request.mode,
            uid: request.uid,
            gid: request.gid,
            size_bytes: request.size_bytes,
            atime_ns: request.atime_ns,
            mtime_ns: request.mtime_ns,
        };
        let command = FilesystemCommand::SetAttributes {
            inode: request.inode,
            changes,
            now_ns: self.node.now_ns(),
        };
        let attr = self
            .propose_for_attributes(&request.volume, command, None)
            .await?;
        Ok(Response::new(proto::AttrResponse { attr: Some(attr) }))
    }

    async fn create(
        &self,
        request: Request<proto::CreateRequest>,
    ) -> Result<Response<proto::EntryResponse>, Status> {
        let request_id = request_id(&request)?;
        let request = request.into_inner();
        let kind = entry_kind_from_proto(request.kind)?;
        let command = FilesystemCommand::Create {
            parent: request.parent,
            name: request.name,
            kind,
            mode: request.mode,
            uid: request.uid,
            gid: request.gid,
            symlink_target: (kind == crate::records::EntryKind::Symlink)
                .then_some(request.symlink_target),
            exclusive: request.exclusive || kind == crate::records::EntryKind::Directory,
            now_ns: self.node.now_ns(),
        };
        let attr = self
            .propose_for_attributes(&request.volume, command, request_id)
            .await?;
        Ok(Response::new(proto::EntryResponse { attr: Some(attr) }))
    }

    async fn link(
        &self,
        request: Request<proto::LinkRequest>,
    ) -> Result<Response<proto::EntryResponse>, Status> {
        let request_id = request_id(&request)?;
        let request = request.into_inner();
        let command = FilesystemCommand::Link {
            inode: request.inode,
            new_parent: request.new_parent,
            new_name: request.new_name,
            now_ns: self.node.now_ns(),
        };
        let attr = self
            .propose_for_attributes(&request.volume, command, request_id)
            .await?;
        Ok(Response::new(proto::EntryResponse { attr: Some(attr) }))
    }

    async fn unlink(
        &self,
        request: Request<proto::UnlinkRequest>,
    ) -> Result<Response<proto::UnlinkResponse>, Status> {
        let request_id = request_id(&request)?;
        let request = request.into_inner();
        let command = FilesystemCommand::Unlink {
            parent: request.parent,
            name: request.name,
            directory: request.directory,
            now_ns: self.node.now_ns(),
        };
        match self.propose(&request.volume, command, request_id).await? {
            CommandResponse::Unlinked { inode, orphaned } => {
                Ok(Response::new(proto::UnlinkResponse { inode, orphaned }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn rename(
        &self,
        request: Request<proto::RenameRequest>,
    ) -> Result<Response<proto::RenameResponse>, Status> {
        let request_id = request_id(&request)?;
        let request = request.into_inner();
        let command = FilesystemCommand::Rename {
            parent: request.parent,
            name: request.name,
            new_parent: request.new_parent,
            new_name: request.new_name,
            flags: request.flags,
            now_ns: self.node.now_ns(),
        };
        match self.propose(&request.volume, command, request_id).await? {
            CommandResponse::Renamed {
                replaced_inode,
                replaced_orphaned,
            } => Ok(Response::new(proto::RenameResponse {
                replaced_inode,
                replaced_orphaned,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn read_dir(
        &self,
        request: Request<proto::ReadDirRequest>,
    ) -> Result<Response<proto::ReadDirResponse>, Status> {
        let request = request.into_inner();
        let container_id = self.read_container(&request.volume).await?;
        let (entries, end) = fs::read_directory(
            self.node.storage(),
            container_id,
            request.inode,
            request.cookie,
            request.entry_count_max as usize,
        )
        .map_err(node_status)?;
        Ok(Response::new(proto::ReadDirResponse {
            entries: entries
                .into_iter()
                .map(|(cookie, row)| proto::DirEntry {
                    name: row.name,
                    inode: row.inode,
                    kind: entry_kind(row.kind) as i32,
                    cookie,
                })
                .collect(),
            end,
        }))
    }

    async fn read_link(
        &self,
        request: Request<proto::ReadLinkRequest>,
    ) -> Result<Response<proto::ReadLinkResponse>, Status> {
        let request = request.into_inner();
        let container_id = self.read_container(&request.volume).await?;
        let target =
            fs::read_link(self.node.storage(), container_id, request.inode).map_err(node_status)?;
        Ok(Response::new(proto::ReadLinkResponse { target }))
    }

    async fn read(
        &self,
        request: Request<proto::ReadRequest>,
    ) -> Result<Response<proto::ReadResponse>, Status> {
        let request = request.into_inner();
        check_read_length(request.length_bytes)?;
        let container_id = self.read_container(&request.volume).await?;
        let read = || {
            fs::read(
                self.node.storage(),
                container_id,
                request.inode,
                request.offset_bytes,
                request.length_bytes,
            )
        };
        let data = match read().await {
            Err(NodeError::ChecksumMismatch(message)) => {
                // A bad block on this leader: repair it from a replica now and serve the read
                // after all; when nothing could be repaired, the read fails with EIO as before.
                const BLOCK_SIZE_BYTES: u64 = ballast_device::BLOCK_SIZE_BYTES as u64;
                let first = request.offset_bytes / BLOCK_SIZE_BYTES;
                let last = request
                    .offset_bytes
                    .saturating_add(u64::from(request.length_bytes).max(1) - 1)
                    / BLOCK_SIZE_BYTES;
                match crate::scrub::repair_read_range(
                    &self.node,
                    container_id,
                    request.inode,
                    first,
                    last,
                )
                .await
                {
                    Ok(repaired) if repaired > 0 => read().await,
                    _ => Err(NodeError::ChecksumMismatch(message)),
                }
            }
            other => other,
        }
        .map_err(node_status)?;
        Ok(Response::new(proto::ReadResponse { data }))
    }

    async fn read_shared(
        &self,
        request: Request<proto::ReadSharedRequest>,
    ) -> Result<Response<proto::ReadSharedResponse>, Status> {
        let request = request.into_inner();
        check_read_length(request.length_bytes)?;
        // Never redirected: the region lives on this node, so a follower's answer is an error
        // the driver meets by reading over gRPC instead. Checksum errors are not repaired
        // here either; `Read` repairs them.
        let container_id = self.container(&request.volume).await?;
        if self.node.leading_raft(container_id).await.is_err() {
            return Err(Status::failed_precondition(
                "this node does not lead the volume; read it with Read",
            ));
        }
        // A driver past its deadline may have given the slot to another request.
        if let Some(deadline) = SharedDeadline::from_wire(request.deadline_monotonic_ns) {
            check_deadline(deadline, "shared read").map_err(node_status)?;
        }
        let slot = self
            .node
            .shared_regions()
            .slot(
                request.region_id,
                request.slot_offset_bytes,
                request.slot_bytes,
            )
            .map_err(node_status)?;
        let (data_offset_bytes, length_bytes) = fs::read_shared(
            self.node.storage(),
            container_id,
            request.inode,
            request.offset_bytes,
            request.length_bytes,
            slot,
        )
        .await
        .map_err(node_status)?;
        self.node.shared_regions().count_read();
        Ok(Response::new(proto::ReadSharedResponse {
            data_offset_bytes: data_offset_bytes as u32,
            length_bytes: length_bytes as u32,
        }))
    }

    async fn write(
        &self,
        request: Request<proto::WriteRequest>,
    ) -> Result<Response<proto::WriteResponse>, Status> {
        let request = request.into_inner();
        check_write_length(request.data.len())?;
        let response = self
            .write_data(
                &request.volume,
                request.inode,
                request.offset_bytes,
                WriteData::Bytes(request.data),
                request.durable,
                None,
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn write_shared(
        &self,
        request: Request<proto::WriteSharedRequest>,
    ) -> Result<Response<proto::WriteResponse>, Status> {
        let request = request.into_inner();
        let received_at = std::time::Instant::now();
        check_write_length(request.length_bytes as usize)?;
        let slot = self
            .node
            .shared_regions()
            .slot(
                request.region_id,
                request.slot_offset_bytes,
                request.slot_bytes,
            )
            .map_err(node_status)?;
        // The node's own copy: the driver could change the slot at any time.
        let data = slot
            .copy_out(
                request.length_bytes as usize,
                self.node.storage().buffer_pool(),
            )
            .map_err(node_status)?;
        drop(slot);
        let copied_at = received_at.elapsed();
        // Copied in time, the bytes are the ones the driver put there for this request: it
        // leaves the slot alone until its own, later timeout.
        let deadline = SharedDeadline::from_wire(request.deadline_monotonic_ns);
        if let Some(deadline) = deadline {
            check_deadline(deadline, "shared write").map_err(node_status)?;
        }
        if let Some(delay) = shared_write_delay() {
            tokio::time::sleep(delay).await;
        }
        let response = self
            .write_data(
                &request.volume,
                request.inode,
                request.offset_bytes,
                data,
                request.durable,
                deadline,
            )
            .await?;
        self.node.shared_regions().count_write();
        tracing::debug!(
            target: "ballast::timing",
            copy_us = copied_at.as_micros() as u64,
            handler_us = received_at.elapsed().as_micros() as u64,
            "shared write handled"
        );
        Ok(Response::new(response))
    }

    async fn fallocate(
        &self,
        request: Request<proto::FallocateRequest>,
    ) -> Result<Response<proto::AttrResponse>, Status> {
        let request = request.into_inner();
        let command = FilesystemCommand::Fallocate {
            inode: request.inode,
            offset_bytes: request.offset_bytes,
            length_bytes: request.length_bytes,
            mode: request.mode,
            now_ns: self.node.now_ns(),
        };
        let attr = self
            .propose_for_attributes(&request.volume, command, None)
            .await?;
        Ok(Response::new(proto::AttrResponse { attr: Some(attr) }))
    }

    async fn fsync(
        &self,
        request: Request<proto::FsyncRequest>,
    ) -> Result<Response<proto::FsyncResponse>, Status> {
        // The kernel sends its cached writes before FSYNC, and each was applied before it was
        // answered; one log flush makes all of them (and every earlier namespace change of this
        // volume) durable. Concurrent fsyncs of all volumes share device flushes.
        let request = request.into_inner();
        let container_id = self.read_container(&request.volume).await?;
        fs::get_inode(self.node.storage(), container_id, request.inode).map_err(node_status)?;
        self.node.flush_log().await.map_err(node_status)?;
        self.node
            .sync_counters()
            .fsync_request_count
            .fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(proto::FsyncResponse {}))
    }

    async fn stat_fs(
        &self,
        request: Request<proto::StatFsRequest>,
    ) -> Result<Response<proto::StatFsResponse>, Status> {
        let request = request.into_inner();
        let volume = self.node.volume(&request.volume).map_err(node_status)?;
        let state =
            fs::container_state(self.node.storage(), volume.container_id).map_err(node_status)?;
        let block_size = ballast_device::BLOCK_SIZE_BYTES as u64;
        let device_free = self.node.storage().free_block_count();
        let (total_blocks, free_blocks) = if volume.quota_bytes > 0 {
            let total = volume.quota_bytes / block_size;
            (
                total,
                total
                    .saturating_sub(state.used_block_count)
                    .min(device_free),
            )
        } else {
            let total = self.node.device().superblock().data_block_count;
            (total, device_free)
        };
        const INODE_COUNT_MAX: u64 = 1 << 32;
        Ok(Response::new(proto::StatFsResponse {
            block_size_bytes: block_size,
            total_blocks,
            free_blocks,
            total_inodes: INODE_COUNT_MAX,
            free_inodes: INODE_COUNT_MAX.saturating_sub(state.inode_count),
            name_length_max: ballast_common::name::ENTRY_NAME_LENGTH_BYTES_MAX as u32,
        }))
    }

    async fn purge_orphans(
        &self,
        request: Request<proto::PurgeOrphansRequest>,
    ) -> Result<Response<proto::PurgeOrphansResponse>, Status> {
        let request = request.into_inner();
        match self
            .propose(
                &request.volume,
                FilesystemCommand::PurgeOrphans {
                    inode: request.inode,
                },
                None,
            )
            .await?
        {
            CommandResponse::Purged { purged_count } => {
                Ok(Response::new(proto::PurgeOrphansResponse { purged_count }))
            }
            other => Err(unexpected(other)),
        }
    }
}
