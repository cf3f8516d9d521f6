//! The FUSE filesystem of one Ballast volume: every kernel request becomes a gRPC call to the
//! storage node through `ballast-client`.
//!
//! Must not depend on: any server crate; all state lives on the node except open-handle counts.
//! Invariants:
//! - The fuser session loop is single-threaded, so it never waits on the network: every request
//!   that does I/O moves its `Reply*` into a task on the tokio runtime. At most
//!   `IN_FLIGHT_REQUEST_COUNT_MAX` tasks exist; past that the session loop blocks, which pushes
//!   back on the kernel instead of queueing without bound.
//! - The kernel's page-cache writes of a file that arrive contiguous while two of its writes are
//!   in flight are gathered into one node write of up to 4 MiB (`write_combiner`), each kernel
//!   request answered when that write is; direct and durable writes always go alone.
//! - Every reply is sent exactly once: on success, with the errno from
//!   `ClientError::errno()` on failure, or (if a task panics) with EIO by fuser's reply drop.
//! - Locking: getlk/setlk are not implemented and FUSE_POSIX_LOCKS / FUSE_FLOCK_LOCKS are not
//!   requested, so the kernel keeps fcntl and flock locks locally. That is correct while each
//!   volume is mounted by one driver per node; cluster-wide locks are future work.
//! - O_DIRECT opens are accepted without FOPEN_DIRECT_IO: with the writeback cache the kernel's
//!   own direct-I/O path still sends the reads and writes straight to us.
//! - Orphans (unlinked while open) are purged on their last release; if that purge fails the
//!   orphan stays until the next mount, which purges every orphan of the volume.

use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ballast_client::proto::{self, EntryKind};
use ballast_client::{BallastClient, ClientError};
use ballast_common::{Clock, SystemClock};
use fuser::{
    AccessFlags, Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use crate::convert::{
    creation_mode, file_attr, file_type_from_wire, mode_without_privileges, ns_from_system_time,
    PERMISSION_BITS,
};
use crate::open_files::{OpenFileTable, OrphanAction};
use crate::recent_attributes::{RecentAttributes, RECENT_ATTRIBUTES_CAPACITY};
use crate::shared_memory::{
    SharedMemory, Unshared, WriteBytes, SHARED_READ_BYTES_MAX, SHARED_WRITE_BYTES_MAX,
};
use crate::write_combiner::{
    Admission, CombinedWrite, GatherBuffer, WriteCombiner, COMBINED_WRITE_BYTES_MAX,
};
use crate::write_through::{
    FsyncCoverage, FsyncPlan, WriteMode, WriteThrough, WRITE_THROUGH_CAPACITY,
};

/// Requests being served at once. The kernel sends many concurrent writes with the writeback
/// cache; 256 keeps the node busy without unbounded memory (each may hold a 1 MiB write).
pub const IN_FLIGHT_REQUEST_COUNT_MAX: usize = 256;

/// Directory entries asked of the node per ReadDir call. The kernel's readdir buffer is one
/// 4 KiB page, about a hundred short names, so larger pages would mostly be thrown away.
pub const READ_DIR_PAGE_ENTRY_COUNT: u32 = 128;

/// ReadDir calls per kernel readdir request, so a node returning empty non-final pages cannot
/// spin a task forever.
const READ_DIR_PAGE_COUNT_MAX: u32 = 64;
/// The kernel's background requests (writeback, readahead) in flight to this driver; also the
/// count at which it considers the mount congested (`init`).
pub const BACKGROUND_REQUESTS_MAX: u16 = 64;
/// Node writes sent and not yet answered, by every mount of this process (only reported, in the
/// `ballast::timing` debug event `node write answered`).
static NODE_WRITES_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

/// FUSE offsets 1 and 2 are the synthesized "." and ".."; a node cookie `c` is offset `c + 2`.
const DOT_OFFSET: u64 = 1;
const DOT_DOT_OFFSET: u64 = 2;
const COOKIE_OFFSET_SHIFT: u64 = 2;

/// Linux fallocate mode bits the node implements.
const FALLOCATE_KEEP_SIZE: u32 = 1;
const FALLOCATE_PUNCH_HOLE: u32 = 2;

/// How the driver is configured for one mount.
#[derive(Debug, Clone)]
pub struct MountSettings {
    pub volume: String,
    pub attribute_ttl: Duration,
    pub max_write_bytes: u32,
    /// Read and write through memory shared with the node when it is on this host
    /// (`shared_memory`).
    pub shared_memory: bool,
    /// Send those requests as local frames when the node serves them (`shared_memory`).
    pub local_frames: bool,
}

/// State shared by the session loop and the request tasks.
struct Shared {
    client: BallastClient,
    volume: String,
    attribute_ttl: Duration,
    open_files: Mutex<OpenFileTable>,
    /// The node's attributes from recent answers, to skip the GetAttr of a writeback-cache time
    /// flush (`recent_attributes`).
    recent_attributes: Mutex<RecentAttributes>,
    /// Which files' changes are all durable, so their fsync needs no round trip
    /// (`write_through`).
    write_through: Mutex<WriteThrough>,
    /// Sequential page-cache writes gathered behind those in flight (`write_combiner`).
    write_combiner: Mutex<WriteCombiner<ReplyWrite, WriteBytes>>,
    /// Reads and writes through memory shared with the node on this host (`shared_memory`);
    /// `None` when turned off.
    shared_memory: Option<SharedMemory>,
}

/// Makes sure a combined write that was handed out is reported finished, also when its task
/// panics: then everything gathered behind it is dropped, and fuser answers those requests EIO.
struct CombinedWriteGuard<'a> {
    shared: &'a Shared,
    inode: u64,
    finished: bool,
}

impl Drop for CombinedWriteGuard<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Each batch handed out is finished once; bounded by the batches gathered. The lock is
        // released before the replies are dropped (each drop answers the kernel).
        loop {
            let next = self.shared.write_combiner().finished(self.inode);
            let Some(batch) = next else {
                break;
            };
            tracing::error!(
                inode = self.inode,
                requests = batch.parts.len(),
                "write task ended early; answering the writes gathered behind it with EIO"
            );
            drop(batch);
        }
    }
}

impl Shared {
    fn reply_entry(&self, reply: ReplyEntry, attr: &proto::Attr) {
        reply.entry(
            &self.attribute_ttl,
            &file_attr(attr),
            Generation(attr.generation),
        );
    }

    fn recent_attributes(&self) -> std::sync::MutexGuard<'_, RecentAttributes> {
        // Each operation is one map step: a poisoned lock is still consistent.
        self.recent_attributes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_combiner(&self) -> std::sync::MutexGuard<'_, WriteCombiner<ReplyWrite, WriteBytes>> {
        // Each operation is one map step: a poisoned lock is still consistent.
        self.write_combiner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one node write and answers every kernel request whose bytes it carries.
    /// A buffer for a write's bytes with room for `capacity_bytes`: a free gather slot of the
    /// shared memory (the bytes are then copied once on their way to the node), or memory of
    /// the driver's own.
    fn write_buffer(&self, capacity_bytes: usize) -> WriteBytes {
        self.shared_memory
            .as_ref()
            .and_then(|shared_memory| shared_memory.gather_slot(capacity_bytes))
            .map(WriteBytes::Shared)
            .unwrap_or_else(|| WriteBytes::Own(bytes::BytesMut::with_capacity(capacity_bytes)))
    }

    async fn send_write(
        &self,
        write: CombinedWrite<ReplyWrite, WriteBytes>,
        mode: WriteMode,
        privileged_writer: bool,
    ) {
        let CombinedWrite {
            inode,
            offset_bytes,
            data,
            parts,
        } = write;
        let length_bytes = data.len() as u64;
        let durable = mode == WriteMode::Durable;
        // For the `ballast::timing` event below (how steadily node writes flow).
        let started = std::time::Instant::now();
        let gathered = matches!(data, WriteBytes::Shared(_));
        let in_flight = NODE_WRITES_IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1;
        let result = match data {
            WriteBytes::Shared(slot) => {
                let shared_memory = self
                    .shared_memory
                    .as_ref()
                    .expect("gather slots come from the shared memory");
                let shared = shared_memory
                    .write_gathered(
                        &self.client,
                        &self.volume,
                        inode,
                        offset_bytes,
                        &slot,
                        durable,
                    )
                    .await;
                match shared {
                    Ok(response) => Ok(response),
                    Err(unshared) => {
                        tracing::debug!(inode, %unshared, "writing over gRPC instead");
                        let bytes = slot.to_bytes();
                        drop(slot);
                        self.client
                            .write(&self.volume, inode, offset_bytes, bytes, durable)
                            .await
                    }
                }
            }
            WriteBytes::Own(data) => {
                self.send_own_write(inode, offset_bytes, data, durable)
                    .await
            }
        };
        NODE_WRITES_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(
            target: "ballast::timing",
            length_bytes,
            gathered,
            in_flight,
            part_count = parts.len(),
            write_us = started.elapsed().as_micros() as u64,
            "node write answered"
        );
        let answered_durable = matches!(&result, Ok(response) if response.durable);
        {
            // Each kernel request was counted as started on its own.
            let mut write_through = self.write_through();
            for _ in &parts {
                write_through.write_finished(inode, mode, answered_durable);
            }
        }
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                let errno = kernel_errno(&error);
                for (reply, _) in parts {
                    reply.error(errno);
                }
                return;
            }
        };
        if let Some(attr) = response.attr.as_ref() {
            self.recent_attributes()
                .record_write(attr, std::time::Instant::now());
        }
        if let (false, Some(attr)) = (privileged_writer, response.attr.as_ref()) {
            self.drop_privileges(attr).await;
        }
        // The node writes all or fails; should it ever answer short, the requests are answered
        // in order with what it wrote, so no request claims bytes that were not written.
        if u64::from(response.written_bytes) != length_bytes {
            tracing::warn!(
                inode,
                offset_bytes,
                length_bytes,
                written_bytes = response.written_bytes,
                "short write"
            );
        }
        let mut remaining_bytes = response.written_bytes;
        for (reply, part_bytes) in parts {
            let answered_bytes = part_bytes.min(remaining_bytes);
            remaining_bytes -= answered_bytes;
            if answered_bytes == 0 {
                reply.error(Errno::EIO);
            } else {
                reply.written(answered_bytes);
            }
        }
    }

    /// Sends a write whose bytes are the driver's own: through a write slot when a region is
    /// attached (one copy into it), over gRPC otherwise or when that fails.
    async fn send_own_write(
        &self,
        inode: u64,
        offset_bytes: u64,
        data: bytes::BytesMut,
        durable: bool,
    ) -> Result<proto::WriteResponse, ClientError> {
        if let (Some(shared_memory), true) = (
            self.shared_memory.as_ref(),
            data.len() <= SHARED_WRITE_BYTES_MAX,
        ) {
            match shared_memory
                .write(
                    &self.client,
                    &self.volume,
                    inode,
                    offset_bytes,
                    &data,
                    durable,
                )
                .await
            {
                Ok(response) => return Ok(response),
                Err(Unshared::NotAttached) => {}
                Err(unshared) => {
                    tracing::debug!(inode, %unshared, "writing over gRPC instead")
                }
            }
        }
        self.client
            .write(&self.volume, inode, offset_bytes, data.freeze(), durable)
            .await
    }

    fn write_through(&self) -> std::sync::MutexGuard<'_, WriteThrough> {
        // Each operation is one map step: a poisoned lock is still consistent.
        self.write_through
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends a SetAttr, counted as a change of the inode that its next fsync must cover.
    async fn set_attr(&self, request: proto::SetAttrRequest) -> Result<proto::Attr, ClientError> {
        let inode = request.inode;
        self.write_through().change_started(inode);
        let result = self.client.set_attr(request).await;
        self.write_through().change_finished(inode);
        result
    }

    fn open_files(&self) -> std::sync::MutexGuard<'_, OpenFileTable> {
        // A panic while holding this lock cannot leave the counts half-updated (each operation
        // is a single map step), so a poisoned lock is still consistent.
        self.open_files
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Purges `inode` now if nothing holds it open, else marks it for purge on last release.
    async fn settle_orphan(&self, inode: u64) {
        let action = self.open_files().orphan(inode);
        match action {
            OrphanAction::PurgeNow => self.purge(inode).await,
            OrphanAction::Deferred => tracing::debug!(inode, "orphan still open; purge deferred"),
        }
    }

    async fn purge(&self, inode: u64) {
        match self.client.purge_orphans(&self.volume, inode).await {
            Ok(purged_count) => tracing::debug!(inode, purged_count, "purged orphan"),
            // The orphan survives until the next mount purges every orphan; no data is lost,
            // only space is held for longer.
            Err(error) => tracing::warn!(inode, %error, "purging orphan failed"),
        }
    }

    /// Clears setuid/setgid after a write, truncate or chown: we requested
    /// FUSE_HANDLE_KILLPRIV, which makes that the filesystem's job instead of the kernel's.
    async fn drop_privileges(&self, attr: &proto::Attr) {
        if attr.kind() == EntryKind::Directory {
            return;
        }
        let Some(mode) = mode_without_privileges(attr.mode) else {
            return;
        };
        let request = proto::SetAttrRequest {
            volume: self.volume.clone(),
            inode: attr.inode,
            mode: Some(mode),
            ..Default::default()
        };
        if let Err(error) = self.set_attr(request).await {
            tracing::warn!(inode = attr.inode, %error, "clearing setuid/setgid failed");
        }
    }
}

/// The `fuser::Filesystem` of one mounted volume.
pub struct BallastFilesystem {
    shared: Arc<Shared>,
    runtime: Handle,
    in_flight: Arc<Semaphore>,
    next_file_handle: AtomicU64,
    max_write_bytes: u32,
}

impl BallastFilesystem {
    pub fn new(client: BallastClient, settings: MountSettings, runtime: Handle) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                volume: settings.volume,
                attribute_ttl: settings.attribute_ttl,
                open_files: Mutex::new(OpenFileTable::default()),
                recent_attributes: Mutex::new(RecentAttributes::new(
                    RECENT_ATTRIBUTES_CAPACITY,
                    settings.attribute_ttl,
                )),
                write_through: Mutex::new(WriteThrough::new(WRITE_THROUGH_CAPACITY)),
                write_combiner: Mutex::new(WriteCombiner::default()),
                shared_memory: settings
                    .shared_memory
                    .then(|| SharedMemory::new(settings.local_frames)),
            }),
            runtime,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_REQUEST_COUNT_MAX)),
            // 0 is left unused so a zero handle always means "none".
            next_file_handle: AtomicU64::new(1),
            max_write_bytes: settings.max_write_bytes,
        }
    }

    /// Runs `work` on the runtime, bounded by the in-flight semaphore. Called only from the
    /// session loop thread, which is not a runtime thread, so `block_on` is allowed there.
    fn spawn<Work, WorkFuture>(&self, work: Work)
    where
        Work: FnOnce(Arc<Shared>) -> WorkFuture,
        WorkFuture: Future<Output = ()> + Send + 'static,
    {
        let permit = match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                tracing::trace!("in-flight limit reached; holding back kernel requests");
                match self
                    .runtime
                    .block_on(self.in_flight.clone().acquire_owned())
                {
                    Ok(permit) => permit,
                    // The semaphore is never closed; if it were, dropping `work` unsent makes
                    // fuser answer the request with EIO.
                    Err(_) => return,
                }
            }
        };
        let future = work(self.shared.clone());
        self.runtime.spawn(async move {
            future.await;
            drop(permit);
        });
    }

    fn allocate_file_handle(&self) -> FileHandle {
        FileHandle(self.next_file_handle.fetch_add(1, Ordering::Relaxed))
    }

    /// Shared body of mknod, mkdir, symlink and create.
    fn create_request(
        &self,
        request: &Request,
        parent: INodeNo,
        name: &str,
        kind: EntryKind,
        mode: u32,
        exclusive: bool,
    ) -> proto::CreateRequest {
        proto::CreateRequest {
            volume: self.shared.volume.clone(),
            parent: parent.0,
            name: name.to_owned(),
            kind: kind as i32,
            mode,
            uid: request.uid(),
            gid: request.gid(),
            symlink_target: String::new(),
            exclusive,
        }
    }
}

fn kernel_errno(error: &ClientError) -> Errno {
    Errno::from_i32(error.errno().0)
}

/// Entry names reach the wire as UTF-8 strings; other byte strings are refused with EILSEQ
/// (the errno for an invalid character sequence) rather than being mangled.
fn entry_name(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::from_i32(libc::EILSEQ))
}

fn time_ns(time: TimeOrNow) -> i64 {
    match time {
        TimeOrNow::SpecificTime(time) => ns_from_system_time(time),
        // UTIME_NOW: the request carries no "now" marker, so the driver's clock decides.
        TimeOrNow::Now => SystemClock.now_ns(),
    }
}

macro_rules! name_or_reply {
    ($name:expr, $reply:ident) => {
        match entry_name($name) {
            Ok(name) => name.to_owned(),
            Err(errno) => return $reply.error(errno),
        }
    };
}

impl Filesystem for BallastFilesystem {
    fn init(&mut self, _request: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = [
            (InitFlags::FUSE_ASYNC_READ, "FUSE_ASYNC_READ"),
            (InitFlags::FUSE_BIG_WRITES, "FUSE_BIG_WRITES"),
            (InitFlags::FUSE_MAX_PAGES, "FUSE_MAX_PAGES"),
            (InitFlags::FUSE_WRITEBACK_CACHE, "FUSE_WRITEBACK_CACHE"),
            (InitFlags::FUSE_PARALLEL_DIROPS, "FUSE_PARALLEL_DIROPS"),
            (InitFlags::FUSE_HANDLE_KILLPRIV, "FUSE_HANDLE_KILLPRIV"),
            // One large O_DIRECT transfer, and each of a caller's async direct transfers
            // (InnoDB's), goes to the driver as concurrent requests instead of one after
            // another: direct reads at 16 in flight, 960-1,051 -> 1,678-1,772 MB/s (A/B by
            // hand, 2026-12-05); sysbench oltp_read_write p95 latency 7.30-7.70 -> 6.32-6.55 ms
            // (tps 0.59-0.62x -> 0.62-0.65x of local disk, within the runs' spread).
            (InitFlags::FUSE_ASYNC_DIO, "FUSE_ASYNC_DIO"),
        ];
        for (flag, flag_name) in wanted {
            // Each flag is optional: an older kernel simply runs without it.
            if config.add_capabilities(flag).is_err() {
                tracing::info!(flag = flag_name, "kernel does not offer capability");
            }
        }
        if let Err(nearest_bytes) = config.set_max_write(self.max_write_bytes) {
            tracing::warn!(
                requested_bytes = self.max_write_bytes,
                nearest_bytes,
                "max write size not accepted; using the nearest"
            );
            let _ = config.set_max_write(nearest_bytes);
        }
        // More background requests (readahead, writeback) in flight than the default 16, so
        // the writeback cache can keep the node busy.
        let _ = config.set_max_background(BACKGROUND_REQUESTS_MAX);
        // The kernel's background writeback of a FUSE file writes nothing while this many
        // background requests are out (`fuse_writepages`), and the flusher then backs off until
        // a dirtying task kicks it again: with the default (3/4 of the above) the node's writes
        // came in bursts with idle gaps of 20-40 ms between them. At the full queue instead,
        // a 2 GiB fio write went 1,460-1,516 MB/s against 1,239-1,473 (hand A/B, 2026-12-06).
        let _ = config.set_congestion_threshold(BACKGROUND_REQUESTS_MAX);
        // Ask for a large readahead; the kernel keeps the smaller of this and its own limit
        // (main.rs raises that limit after mount).
        if let Err(nearest_bytes) = config.set_max_readahead(4 << 20) {
            let _ = config.set_max_readahead(nearest_bytes);
        }
        tracing::info!(volume = %self.shared.volume, "FUSE session initialised");
        // Attach the shared region now rather than on the first read or write, which would
        // then wait for it.
        self.spawn(|shared| async move {
            if let Some(shared_memory) = shared.shared_memory.as_ref() {
                shared_memory.try_attach(&shared.client).await;
            }
        });
        Ok(())
    }

    fn lookup(&self, _request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name_or_reply!(name, reply);
        self.spawn(move |shared| async move {
            match shared.client.lookup(&shared.volume, parent.0, &name).await {
                Ok(attr) => shared.reply_entry(reply, &attr),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn forget(&self, _request: &Request, _inode: INodeNo, _lookup_count: u64) {
        // The node owns inode lifetimes; the driver keeps no per-lookup state to drop.
    }

    fn getattr(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        self.spawn(move |shared| async move {
            match shared.client.get_attr(&shared.volume, inode.0).await {
                Ok(attr) => reply.attr(&shared.attribute_ttl, &file_attr(&attr)),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn setattr(
        &self,
        request: &Request,
        inode: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        file_handle: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set_attr = proto::SetAttrRequest {
            volume: self.shared.volume.clone(),
            inode: inode.0,
            mode: mode.map(|mode| mode & PERMISSION_BITS),
            uid,
            gid,
            size_bytes: size,
            atime_ns: atime.map(time_ns),
            mtime_ns: mtime.map(time_ns),
        };
        // Linux clears setuid/setgid on chown always, and on truncate unless the caller is
        // privileged (approximated as uid 0); an explicit mode in the same call wins.
        let kills_privileges = mode.is_none()
            && (uid.is_some() || gid.is_some() || (size.is_some() && request.uid() != 0));
        let changes_nothing = set_attr.mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && set_attr.atime_ns.is_none()
            && set_attr.mtime_ns.is_none();
        // The writeback cache flushing its times (before every fsync and fdatasync): mtime and
        // ctime on an open file, nothing else. Every write the kernel sends already set the
        // node's mtime to the node's clock when it was applied, which is no earlier than the
        // write() the kernel stamped; then the change would only move mtime back a little, and
        // costs a Raft proposal per fsync. It is skipped in that case only.
        let flushes_write_times = file_handle.is_some()
            && matches!(mtime, Some(TimeOrNow::SpecificTime(_)))
            && set_attr.mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && set_attr.atime_ns.is_none();
        self.spawn(move |shared| async move {
            // Only ctime (or a BSD-only field) was set: the node updates ctime itself on every
            // change, so answer with the current attributes instead of sending an empty change.
            let result = if changes_nothing {
                shared.client.get_attr(&shared.volume, inode.0).await
            } else if flushes_write_times {
                let requested_ns = set_attr.mtime_ns.unwrap_or(i64::MAX);
                let known = shared.recent_attributes().covering(
                    inode.0,
                    requested_ns,
                    std::time::Instant::now(),
                );
                match known {
                    // A recent Write's answer already shows the node's mtime as new.
                    Some(attr) => {
                        tracing::trace!(
                            inode = inode.0,
                            "time flush answered from a write's attributes"
                        );
                        Ok(attr)
                    }
                    None => match shared.client.get_attr(&shared.volume, inode.0).await {
                        Ok(attr) if attr.mtime_ns >= requested_ns => Ok(attr),
                        _ => shared.set_attr(set_attr).await,
                    },
                }
            } else {
                shared.set_attr(set_attr).await
            };
            if let Ok(attr) = &result {
                shared
                    .recent_attributes()
                    .record_current(attr, std::time::Instant::now());
            }
            match result {
                Ok(mut attr) => {
                    if kills_privileges {
                        if let Some(cleared_mode) = mode_without_privileges(attr.mode) {
                            shared.drop_privileges(&attr).await;
                            attr.mode = cleared_mode;
                        }
                    }
                    reply.attr(&shared.attribute_ttl, &file_attr(&attr));
                }
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn readlink(&self, _request: &Request, inode: INodeNo, reply: ReplyData) {
        self.spawn(move |shared| async move {
            match shared.client.read_link(&shared.volume, inode.0).await {
                Ok(target) => reply.data(target.as_bytes()),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn mknod(
        &self,
        request: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = name_or_reply!(name, reply);
        // Only regular files exist on Ballast; fifos, sockets and devices are refused.
        let file_type_bits = mode & libc::S_IFMT;
        if file_type_bits != 0 && file_type_bits != libc::S_IFREG {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let create = self.create_request(
            request,
            parent,
            &name,
            EntryKind::File,
            creation_mode(mode, umask),
            true,
        );
        self.spawn(move |shared| async move {
            match shared.client.create(create).await {
                Ok(attr) => shared.reply_entry(reply, &attr),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn mkdir(
        &self,
        request: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name = name_or_reply!(name, reply);
        let create = self.create_request(
            request,
            parent,
            &name,
            EntryKind::Directory,
            creation_mode(mode, umask),
            true,
        );
        self.spawn(move |shared| async move {
            match shared.client.create(create).await {
                Ok(attr) => shared.reply_entry(reply, &attr),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn unlink(&self, _request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _request: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn symlink(
        &self,
        request: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let name = name_or_reply!(link_name, reply);
        let Some(target) = target.to_str() else {
            return reply.error(Errno::from_i32(libc::EILSEQ));
        };
        if target.is_empty() {
            return reply.error(Errno::ENOENT);
        }
        // Symlink permissions are never checked on Linux; 0777 is what `ls -l` shows everywhere.
        let mut create =
            self.create_request(request, parent, &name, EntryKind::Symlink, 0o777, true);
        create.symlink_target = target.to_owned();
        self.spawn(move |shared| async move {
            match shared.client.create(create).await {
                Ok(attr) => shared.reply_entry(reply, &attr),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn rename(
        &self,
        _request: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let name = name_or_reply!(name, reply);
        let new_name = name_or_reply!(new_name, reply);
        let supported = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        if !supported.contains(flags) {
            // RENAME_WHITEOUT is for overlay filesystems; Linux answers EINVAL where unsupported.
            return reply.error(Errno::EINVAL);
        }
        self.spawn(move |shared| async move {
            let result = shared
                .client
                .rename(
                    &shared.volume,
                    parent.0,
                    &name,
                    new_parent.0,
                    &new_name,
                    flags.bits(),
                )
                .await;
            match result {
                Ok(response) => {
                    if response.replaced_inode != 0 {
                        shared
                            .write_through()
                            .change_finished(response.replaced_inode);
                    }
                    if response.replaced_orphaned {
                        shared.settle_orphan(response.replaced_inode).await;
                    }
                    reply.ok();
                }
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn link(
        &self,
        _request: &Request,
        inode: INodeNo,
        new_parent: INodeNo,
        new_name: &OsStr,
        reply: ReplyEntry,
    ) {
        let new_name = name_or_reply!(new_name, reply);
        self.spawn(move |shared| async move {
            shared.write_through().change_started(inode.0);
            let result = shared
                .client
                .link(&shared.volume, inode.0, new_parent.0, &new_name)
                .await;
            shared.write_through().change_finished(inode.0);
            match result {
                Ok(attr) => shared.reply_entry(reply, &attr),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn open(&self, _request: &Request, inode: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // No I/O: the kernel only opens inodes it has looked up, and O_TRUNC arrives as a
        // separate setattr because FUSE_ATOMIC_O_TRUNC is not requested.
        self.shared.open_files().open(inode.0);
        reply.opened(self.allocate_file_handle(), FopenFlags::empty());
    }

    fn read(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: FileHandle,
        offset_bytes: u64,
        length_bytes: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(move |shared| async move {
            let mut reply = Some(reply);
            if let (Some(shared_memory), true) = (
                shared.shared_memory.as_ref(),
                length_bytes <= SHARED_READ_BYTES_MAX,
            ) {
                let outcome = shared_memory
                    .read(
                        &shared.client,
                        &shared.volume,
                        inode.0,
                        offset_bytes,
                        length_bytes,
                        |data| {
                            if let Some(reply) = reply.take() {
                                reply.data(data);
                            }
                        },
                    )
                    .await;
                match outcome {
                    Ok(()) => return,
                    Err(Unshared::NotAttached) => {}
                    Err(unshared) => {
                        tracing::debug!(inode = inode.0, %unshared, "reading over gRPC instead")
                    }
                }
            }
            let Some(reply) = reply else {
                return;
            };
            match shared
                .client
                .read(&shared.volume, inode.0, offset_bytes, length_bytes)
                .await
            {
                Ok(data) => reply.data(&data),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn write(
        &self,
        request: &Request,
        inode: INodeNo,
        _file_handle: FileHandle,
        offset_bytes: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Page-cache writes carry no trustworthy caller, so they count as unprivileged.
        let page_cache_write = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let privileged_writer = request.uid() == 0 && !page_cache_write;
        let mode = self
            .shared
            .write_through()
            .write_started(inode.0, data.len() as u64);
        // Only the kernel's writeback is combined: it never has two writes of one page out at
        // once, and none of them waits for its own answer the way a direct or durable write
        // does (`write_combiner`).
        let combinable =
            page_cache_write && mode == WriteMode::Plain && data.len() <= COMBINED_WRITE_BYTES_MAX;
        if !combinable {
            // The kernel's buffer is reused for the next request, so the data is copied.
            let buffer = self.shared.write_buffer(data.len());
            let write = CombinedWrite::alone(inode.0, offset_bytes, data, reply, buffer);
            self.spawn(move |shared| async move {
                shared.send_write(write, mode, privileged_writer).await;
            });
            return;
        }
        let admission = self.shared.write_combiner().offer(
            inode.0,
            offset_bytes,
            data,
            reply,
            |capacity_bytes| self.shared.write_buffer(capacity_bytes),
        );
        let Admission::Send(first) = admission else {
            // Gathered behind a write in flight; its `finished` sends it.
            return;
        };
        self.spawn(move |shared| async move {
            // Answers with EIO, instead of never, whatever is gathered behind a write whose
            // task ends without calling `finished` (a panic).
            let mut guard = CombinedWriteGuard {
                shared: &shared,
                inode: first.inode,
                finished: false,
            };
            let mut next = Some(first);
            // Each pass answers at least one kernel request, and only new kernel requests
            // gather more: bounded by the kernel's writes in flight.
            while let Some(write) = next.take() {
                shared
                    .send_write(write, WriteMode::Plain, privileged_writer)
                    .await;
                next = shared.write_combiner().finished(guard.inode);
            }
            guard.finished = true;
        });
    }

    fn flush(
        &self,
        _request: &Request,
        _inode: INodeNo,
        _file_handle: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are sent to the node as they come; close() has nothing left to push.
        reply.ok();
    }

    fn release(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let last_handle_of_orphan = self.shared.open_files().release(inode.0);
        if !last_handle_of_orphan {
            return reply.ok();
        }
        self.spawn(move |shared| async move {
            shared.purge(inode.0).await;
            reply.ok();
        });
    }

    fn fsync(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: FileHandle,
        data_only: bool,
        reply: ReplyEmpty,
    ) {
        let plan = self.shared.write_through().fsync_started(inode.0);
        match plan {
            // Every change this driver made to the file since its last fsync was answered
            // durable by the node (`write_through`): there is nothing to flush.
            FsyncPlan::AlreadyDurable => reply.ok(),
            FsyncPlan::Forward(coverage) => {
                self.forward_fsync(inode, data_only, Some(coverage), reply)
            }
        }
    }

    fn opendir(&self, _request: &Request, _inode: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Directory reads are stateless: the node's cookies carry the position.
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn(move |shared| async move {
            // The node lists only real entries; "." and ".." are synthesized at offsets 1 and 2.
            // The kernel does not use ".."'s inode number, so the directory's own is given.
            if offset < DOT_OFFSET && reply.add(inode, DOT_OFFSET, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset < DOT_DOT_OFFSET
                && reply.add(inode, DOT_DOT_OFFSET, FileType::Directory, "..")
            {
                return reply.ok();
            }
            let mut cookie = offset.saturating_sub(COOKIE_OFFSET_SHIFT);
            for _ in 0..READ_DIR_PAGE_COUNT_MAX {
                let page = match shared
                    .client
                    .read_dir(&shared.volume, inode.0, cookie, READ_DIR_PAGE_ENTRY_COUNT)
                    .await
                {
                    Ok(page) => page,
                    Err(error) => return reply.error(kernel_errno(&error)),
                };
                for entry in &page.entries {
                    cookie = entry.cookie;
                    if entry.name == "." || entry.name == ".." {
                        continue;
                    }
                    let Some(entry_offset) = entry.cookie.checked_add(COOKIE_OFFSET_SHIFT) else {
                        tracing::error!(cookie = entry.cookie, "directory cookie out of range");
                        return reply.error(Errno::EIO);
                    };
                    let full = reply.add(
                        INodeNo(entry.inode),
                        entry_offset,
                        file_type_from_wire(entry.kind),
                        &entry.name,
                    );
                    if full {
                        return reply.ok();
                    }
                }
                if page.end || page.entries.is_empty() {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _request: &Request,
        _inode: INodeNo,
        _file_handle: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: FileHandle,
        data_only: bool,
        reply: ReplyEmpty,
    ) {
        // Databases fsync a directory after creating or renaming files in it; the node decides
        // what a directory fsync means. Always forwarded: changes of a directory's entries are
        // not tracked by `write_through`.
        self.forward_fsync(inode, data_only, None, reply);
    }

    fn statfs(&self, _request: &Request, _inode: INodeNo, reply: ReplyStatfs) {
        self.spawn(move |shared| async move {
            match shared.client.stat_fs(&shared.volume).await {
                Ok(stat) => {
                    let block_size_bytes = u32::try_from(stat.block_size_bytes).unwrap_or(4096);
                    reply.statfs(
                        stat.total_blocks,
                        stat.free_blocks,
                        stat.free_blocks,
                        stat.total_inodes,
                        stat.free_inodes,
                        block_size_bytes,
                        stat.name_length_max,
                        block_size_bytes,
                    );
                }
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn setxattr(
        &self,
        _request: &Request,
        _inode: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTSUP);
    }

    fn getxattr(
        &self,
        _request: &Request,
        _inode: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // Extended attributes are not supported. ENOSYS tells the kernel so once: it stops
        // asking (callers get EOPNOTSUPP, which `ls` and `cp -a` accept silently). Answering
        // ENODATA instead made the kernel ask for `security.capability` before every write(2)
        // (file_remove_privs), one round trip each: 12,700 a second under sysbench.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _request: &Request, _inode: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn removexattr(&self, _request: &Request, _inode: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENODATA);
    }

    fn access(&self, _request: &Request, _inode: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // With DefaultPermissions the kernel checks permissions itself and does not call this.
        reply.ok();
    }

    fn create(
        &self,
        request: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name_or_reply!(name, reply);
        let exclusive = flags & libc::O_EXCL != 0;
        let create = self.create_request(
            request,
            parent,
            &name,
            EntryKind::File,
            creation_mode(mode, umask),
            exclusive,
        );
        let file_handle = self.allocate_file_handle();
        self.spawn(move |shared| async move {
            match shared.client.create(create).await {
                Ok(attr) => {
                    shared.open_files().open(attr.inode);
                    reply.created(
                        &shared.attribute_ttl,
                        &file_attr(&attr),
                        Generation(attr.generation),
                        file_handle,
                        FopenFlags::empty(),
                    );
                }
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    fn fallocate(
        &self,
        _request: &Request,
        inode: INodeNo,
        _file_handle: FileHandle,
        offset_bytes: u64,
        length_bytes: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Ok(mode) = u32::try_from(mode) else {
            return reply.error(Errno::EINVAL);
        };
        if mode & !(FALLOCATE_KEEP_SIZE | FALLOCATE_PUNCH_HOLE) != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        self.spawn(move |shared| async move {
            shared.write_through().change_started(inode.0);
            let result = shared
                .client
                .fallocate(&shared.volume, inode.0, offset_bytes, length_bytes, mode)
                .await;
            shared.write_through().change_finished(inode.0);
            match result {
                Ok(_attr) => reply.ok(),
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }
}

impl BallastFilesystem {
    /// Sends an fsync to the node; on success a file's `coverage` is recorded as durable.
    fn forward_fsync(
        &self,
        inode: INodeNo,
        data_only: bool,
        coverage: Option<FsyncCoverage>,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |shared| async move {
            match shared
                .client
                .fsync(&shared.volume, inode.0, data_only)
                .await
            {
                Ok(()) => {
                    if let Some(coverage) = coverage {
                        shared.write_through().fsync_succeeded(inode.0, coverage);
                    }
                    reply.ok();
                }
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }

    /// Shared body of unlink and rmdir.
    fn remove(&self, parent: INodeNo, name: &OsStr, directory: bool, reply: ReplyEmpty) {
        let name = name_or_reply!(name, reply);
        self.spawn(move |shared| async move {
            match shared
                .client
                .unlink(&shared.volume, parent.0, &name, directory)
                .await
            {
                Ok(response) => {
                    // Its link count changed: a later fsync of it must reach the node.
                    shared.write_through().change_finished(response.inode);
                    if response.orphaned {
                        shared.settle_orphan(response.inode).await;
                    }
                    reply.ok();
                }
                Err(error) => reply.error(kernel_errno(&error)),
            }
        });
    }
}
