//! `SharedMemory`: reads whose bytes the node puts into memory shared with this
//! driver, and writes whose bytes the node takes from it.
//!
//! Why: over gRPC every byte of a read is copied five times between the device and the page
//! cache (prost's encoding, the socket both ways, tonic gathering the frames, the FUSE reply),
//! which bounds sequential reads on 2 cores at about 1 GB/s (profiles of 2026-12-05,
//! `docs/architecture.md`); a write pays the same on its way in (in a profile of the node under
//! a sequential write, the socket copy and tonic's gathering were 18 % of its CPU). When the
//! node on this host serves a local socket (`Admin.Status` names it), the driver shares a
//! region of memory with it (`ballast_common::shared_region`). A read names a read slot: the
//! node (when it leads the volume) reads and checks the device blocks and copies them into the
//! slot, and the driver answers the kernel from the slot: two copies instead of five. A write
//! copies its bytes into a write slot and names it: the node copies them out once and writes
//! them as `Write` does (forwarding to the leader like any write). A write gathered in a
//! *gather slot* ([`SharedMemory::gather_slot`]) has its bytes there already: the kernel's
//! writes are copied into it as they arrive, and it is named as it is. When the node serves local
//! frames (`Admin.Status` says so), both calls go as frames on the attach socket
//! (`ballast_client::local`) instead of gRPC: the round trip over HTTP/2 was about 3 ms of
//! each 1 MiB cold read request.
//!
//! Owns: the attachment (region, its id, the socket that keeps it attached) and the slots.
//! Must not depend on: FUSE (callers answer the kernel from the bytes handed to them).
//! Invariants:
//! - A slot is used by one request at a time: taken from its pool's free list under a
//!   semaphore with one permit per slot, given back when the request is over. Gather slots are
//!   only taken when one is free, never waited for: a batch holds its gather slot while the
//!   writes of its file in flight finish, and those may wait for a write slot.
//! - For a read, the node writes the slot only while the driver waits for its `ReadShared`
//!   answer, and the driver reads the slot only after that answer; the answer's range is
//!   checked to lie in the slot and in what was asked. For a write, the driver fills the slot
//!   before it asks and leaves it alone until the answer.
//! - Every request names a deadline (`ballast_common::shared_deadline`), half the request
//!   timeout away: past it the node refuses to start a read, to copy a write's slot or to
//!   propose the write. The driver sends a write again over gRPC only after the whole timeout,
//!   so a write the node took in time is ordered before that and every later write.
//! - A slot whose request failed without a definite answer from the node (a timeout, a broken
//!   channel or transport: [`outcome_unknown`]) is never used again: the node may still be
//!   reading into it. Its attachment is retired at once (its pools closed, so requests waiting
//!   for a slot go over gRPC) and the driver attaches anew.
//! - Any failure is the caller's cue to go over gRPC; the bytes of a failed read are never
//!   used, and a failed write is sent again whole (the same bytes at the same offset). A node
//!   that lost the attachment (restarted) is re-attached at most once per
//!   [`REATTACH_INTERVAL_MS`].

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_client::local::LocalChannel;
use ballast_client::proto;
use ballast_client::{BallastClient, ClientError};
use ballast_common::shared_deadline::SharedDeadline;
use ballast_common::shared_region::SharedRegion;
use tokio::sync::Semaphore;

use crate::write_combiner::GatherBuffer;

/// Largest read served through a slot: the kernel's largest read request (1 MiB).
pub const SHARED_READ_BYTES_MAX: u32 = 1 << 20;
/// A read slot holds the blocks of the largest read at any offset: one block more than the read.
const READ_SLOT_BYTES: usize = SHARED_READ_BYTES_MAX as usize + 4096;
/// Reads in flight through shared memory at once; further reads wait for a slot.
const READ_SLOT_COUNT: usize = 32;
/// Largest write sent through a slot: a combined write (`write_combiner.rs`).
pub const SHARED_WRITE_BYTES_MAX: usize = crate::write_combiner::COMBINED_WRITE_BYTES_MAX;
const WRITE_SLOT_BYTES: usize = SHARED_WRITE_BYTES_MAX;
/// Writes in flight through shared memory at once; further writes wait for a slot.
const WRITE_SLOT_COUNT: usize = 8;
/// Writes gathered straight into shared memory at once ([`SharedMemory::gather_slot`]). A
/// pool of their own, never waited for: a batch holds its slot while it waits for the writes of
/// its file in flight, and those may wait for a write slot, so the two must not share slots.
const GATHER_SLOT_COUNT: usize = 8;
const _: () = assert!(WRITE_SLOT_BYTES % 4096 == 0 && READ_SLOT_BYTES % 4096 == 0);
/// Least time between attempts to attach a region.
pub const REATTACH_INTERVAL_MS: u64 = 5_000;
/// After the node said it does not lead the volume, reads go over gRPC for this long before
/// shared memory is tried again (leadership may come back, or move here).
const NOT_LEADER_BACKOFF_MS: u64 = 1_000;

/// One region attached to the node.
struct Attached {
    region: SharedRegion,
    region_id: u64,
    /// The endpoint of the node that holds the attachment.
    endpoint: String,
    /// Kept open: the node detaches the region when it closes.
    _stream: UnixStream,
    /// Requests as local frames on that socket, when the node serves them.
    local: Option<LocalChannel>,
    /// Read slots first, then write slots, then gather slots, in one region.
    reads: SlotPool,
    writes: SlotPool,
    gathers: SlotPool,
}

/// Equal slots of one region, from `first_offset_bytes` on.
struct SlotPool {
    first_offset_bytes: usize,
    slot_bytes: usize,
    free_slots: Mutex<Vec<usize>>,
    permits: Semaphore,
}

impl SlotPool {
    fn new(first_offset_bytes: usize, slot_bytes: usize, slot_count: usize) -> SlotPool {
        SlotPool {
            first_offset_bytes,
            slot_bytes,
            free_slots: Mutex::new((0..slot_count).collect()),
            permits: Semaphore::new(slot_count),
        }
    }

    fn offset_bytes(&self, index: usize) -> usize {
        self.first_offset_bytes + index * self.slot_bytes
    }

    /// No slot is handed out any more; requests waiting for one give up (and go over gRPC).
    fn close(&self) {
        self.permits.close();
    }
}

/// See the module documentation.
pub struct SharedMemory {
    attached: Mutex<Option<Arc<Attached>>>,
    /// Held for the whole of one attempt to attach, so that requests arriving meanwhile wait
    /// for its outcome instead of going over gRPC (a burst of writeback would otherwise all
    /// miss the region that its first request is attaching).
    attaching: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    /// Until when reads skip shared memory: the attached node does not lead the volume.
    not_leader_until: Mutex<Option<Instant>>,
    /// Send requests as local frames when the node serves them (`--local-frames`).
    local_frames_wanted: bool,
}

/// Why a shared read did not happen; the caller reads over gRPC.
#[derive(Debug)]
pub enum Unshared {
    /// No region is attached (the node serves no local socket, or is on another host), or
    /// shared reads are paused after the node said it does not lead the volume.
    NotAttached,
    /// The node refused or failed (not the leader, unknown region, a bad block...).
    Refused(ClientError),
    /// The node's answer does not fit the slot or the request.
    BadAnswer(String),
}

impl std::fmt::Display for Unshared {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unshared::NotAttached => write!(formatter, "no shared region"),
            Unshared::Refused(error) => write!(formatter, "refused: {error}"),
            Unshared::BadAnswer(answer) => write!(formatter, "bad answer: {answer}"),
        }
    }
}

impl SharedMemory {
    pub fn new(local_frames_wanted: bool) -> SharedMemory {
        SharedMemory {
            attached: Mutex::new(None),
            attaching: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
            not_leader_until: Mutex::new(None),
            local_frames_wanted,
        }
    }

    /// Reads `length_bytes` at `offset_bytes` of `inode` into a slot and runs `use_bytes` on
    /// them (shorter than asked only at the end of the file).
    pub async fn read<T>(
        &self,
        client: &BallastClient,
        volume: &str,
        inode: u64,
        offset_bytes: u64,
        length_bytes: u32,
        use_bytes: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, Unshared> {
        assert!(length_bytes <= SHARED_READ_BYTES_MAX);
        let not_leader = self
            .not_leader_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some_and(|until| Instant::now() < until);
        if not_leader {
            return Err(Unshared::NotAttached);
        }
        let attached = self.attached(client).await?;
        let slot = SlotLease::acquire(&attached.reads).await?;
        let slot_offset_bytes = slot.offset_bytes();
        let request = proto::ReadSharedRequest {
            volume: volume.to_owned(),
            inode,
            offset_bytes,
            length_bytes,
            region_id: attached.region_id,
            slot_offset_bytes: slot_offset_bytes as u64,
            slot_bytes: READ_SLOT_BYTES as u32,
            deadline_monotonic_ns: request_deadline(client),
        };
        let answer = match &attached.local {
            Some(local) => local.read_shared(request).await,
            None => client.read_shared_at(&attached.endpoint, request).await,
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                if error.code() == Some(ballast_client::Code::FailedPrecondition) {
                    *self
                        .not_leader_until
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                        Some(Instant::now() + Duration::from_millis(NOT_LEADER_BACKOFF_MS));
                }
                if self.after_failure(&attached, &error) {
                    slot.quarantine();
                }
                return Err(Unshared::Refused(error));
            }
        };
        let start = answer.data_offset_bytes as usize;
        let length = answer.length_bytes as usize;
        if length > length_bytes as usize || start + length > READ_SLOT_BYTES {
            return Err(Unshared::BadAnswer(format!(
                "{length} bytes at {start} of a {READ_SLOT_BYTES}-byte slot for a \
                 {length_bytes}-byte read"
            )));
        }
        attached
            .region
            .with_bytes(slot_offset_bytes + start, length, use_bytes)
            .ok_or_else(|| Unshared::BadAnswer("outside the region".to_owned()))
    }

    /// Writes `data` at `offset_bytes` of `inode` through a write slot (`durable`: as
    /// `WriteRequest.durable`). On any failure the caller sends the write over gRPC.
    pub async fn write(
        &self,
        client: &BallastClient,
        volume: &str,
        inode: u64,
        offset_bytes: u64,
        data: &[u8],
        durable: bool,
    ) -> Result<proto::WriteResponse, Unshared> {
        assert!(data.len() <= SHARED_WRITE_BYTES_MAX);
        let attached = self.attached(client).await?;
        let slot = SlotLease::acquire(&attached.writes).await?;
        let slot_offset_bytes = slot.offset_bytes();
        attached
            .region
            .with_bytes_mut(slot_offset_bytes, data.len(), |bytes| {
                bytes.copy_from_slice(data)
            })
            .ok_or_else(|| Unshared::BadAnswer("outside the region".to_owned()))?;
        let write = SlotWrite {
            volume,
            inode,
            offset_bytes,
            slot_offset_bytes,
            length_bytes: data.len(),
            durable,
        };
        let answer = self.send_slot_write(client, &attached, write).await;
        if answer.as_ref().is_err_and(|(_, unknown)| *unknown) {
            slot.quarantine();
        }
        answer.map_err(|(error, _)| Unshared::Refused(error))
    }

    /// A free gather slot with room for `capacity_bytes`, if a region is attached and one is
    /// free now; never waits. Writes gathered into it need no copy when they are sent
    /// ([`SharedMemory::write_gathered`]).
    pub fn gather_slot(&self, capacity_bytes: usize) -> Option<GatherSlot> {
        if capacity_bytes > WRITE_SLOT_BYTES {
            return None;
        }
        let attached = self.current()?;
        let permit = attached.gathers.permits.try_acquire().ok()?;
        // Given back by hand when the slot is dropped (`GatherSlot` holds the region, not a
        // borrow of it).
        permit.forget();
        let index = attached
            .gathers
            .free_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop()
            .expect("a semaphore permit guarantees a free slot");
        Some(GatherSlot {
            attached,
            index,
            length_bytes: 0,
            quarantined: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Writes what was gathered in `slot` at `offset_bytes` of `inode` (`durable`: as
    /// `WriteRequest.durable`). On any failure the caller sends the write over gRPC
    /// ([`GatherSlot::to_bytes`]).
    pub async fn write_gathered(
        &self,
        client: &BallastClient,
        volume: &str,
        inode: u64,
        offset_bytes: u64,
        slot: &GatherSlot,
        durable: bool,
    ) -> Result<proto::WriteResponse, Unshared> {
        let write = SlotWrite {
            volume,
            inode,
            offset_bytes,
            slot_offset_bytes: slot.offset_bytes(),
            length_bytes: slot.length_bytes,
            durable,
        };
        let answer = self.send_slot_write(client, &slot.attached, write).await;
        if answer.as_ref().is_err_and(|(_, unknown)| *unknown) {
            slot.quarantined
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        answer.map_err(|(error, _)| Unshared::Refused(error))
    }

    /// Sends `WriteShared` for a slot of `attached` that holds the write's bytes. A failure
    /// comes with whether its outcome is unknown (the slot must not be used again).
    async fn send_slot_write(
        &self,
        client: &BallastClient,
        attached: &Arc<Attached>,
        write: SlotWrite<'_>,
    ) -> Result<proto::WriteResponse, (ClientError, bool)> {
        let request = proto::WriteSharedRequest {
            volume: write.volume.to_owned(),
            inode: write.inode,
            offset_bytes: write.offset_bytes,
            region_id: attached.region_id,
            slot_offset_bytes: write.slot_offset_bytes as u64,
            slot_bytes: WRITE_SLOT_BYTES as u32,
            length_bytes: write.length_bytes as u32,
            durable: write.durable,
            deadline_monotonic_ns: request_deadline(client),
        };
        let answer = match &attached.local {
            Some(local) => local.write_shared(request).await,
            None => client.write_shared_at(&attached.endpoint, request).await,
        };
        answer.map_err(|error| {
            let unknown = self.after_failure(attached, &error);
            (error, unknown)
        })
    }

    /// The attached region, attaching one first if none is (at most once per
    /// [`REATTACH_INTERVAL_MS`]).
    async fn attached(&self, client: &BallastClient) -> Result<Arc<Attached>, Unshared> {
        if let Some(attached) = self.current() {
            return Ok(attached);
        }
        self.try_attach(client).await;
        self.current().ok_or(Unshared::NotAttached)
    }

    /// After a failed request: retires the attachment when the outcome is unknown
    /// ([`outcome_unknown`]; the caller then quarantines the slot, and this answers true), or
    /// when the error may mean the node lost the attachment (a restart) or the local channel
    /// closed. The driver attaches anew, later.
    fn after_failure(&self, attached: &Arc<Attached>, error: &ClientError) -> bool {
        let unknown = outcome_unknown(error);
        let channel_closed = attached.local.as_ref().is_some_and(LocalChannel::is_closed);
        if unknown
            || channel_closed
            || matches!(
                error.code(),
                Some(ballast_client::Code::InvalidArgument | ballast_client::Code::Unavailable)
            )
        {
            self.forget(attached);
        }
        unknown
    }

    fn current(&self) -> Option<Arc<Attached>> {
        self.attached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Retires `attached`: no request takes a slot of it any more (requests waiting for one go
    /// over gRPC), and the next request attaches anew.
    fn forget(&self, attached: &Arc<Attached>) {
        attached.reads.close();
        attached.writes.close();
        attached.gathers.close();
        let mut current = self
            .attached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, attached))
        {
            *current = None;
        }
    }

    /// Attaches a region to the first node of `client`, if it serves a local socket this
    /// process can reach; at most once per [`REATTACH_INTERVAL_MS`]. Callers that arrive while
    /// an attempt runs wait for it and then see its outcome. The driver also calls it once the
    /// session starts, so the first reads and writes find the region ready.
    pub async fn try_attach(&self, client: &BallastClient) {
        let _attaching = self.attaching.lock().await;
        if self.current().is_some() {
            return;
        }
        {
            let mut last_attempt = self
                .last_attempt
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if last_attempt
                .is_some_and(|at| at.elapsed() < Duration::from_millis(REATTACH_INTERVAL_MS))
            {
                return;
            }
            *last_attempt = Some(Instant::now());
        }
        let endpoint = client.first_endpoint();
        let (path, node_id, local_frames) = match client.status_at(&endpoint).await {
            Ok(status) if !status.local_socket_path.is_empty() => (
                status.local_socket_path,
                status.node_id,
                status.local_frames && self.local_frames_wanted,
            ),
            Ok(_) => return,
            Err(error) => {
                tracing::debug!(%error, "no node status; reads and writes go over gRPC");
                return;
            }
        };
        let request_timeout = Duration::from_millis(client.options().request_timeout_ms);
        let attached = tokio::task::spawn_blocking(move || {
            attach(
                &path,
                endpoint,
                node_id,
                local_frames.then_some(request_timeout),
            )
        })
        .await;
        match attached {
            Ok(Ok(attached)) => {
                tracing::info!(
                    region_bytes = attached.region.len(),
                    local_frames = attached.local.is_some(),
                    "reads and writes go through memory shared with the node"
                );
                *self
                    .attached
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(attached));
            }
            Ok(Err(error)) => {
                // Another host's node, or an older one: reads go over gRPC.
                tracing::info!(
                    %error,
                    "cannot share memory with the node; reads and writes go over gRPC"
                );
            }
            Err(error) => tracing::warn!(%error, "attaching shared memory panicked"),
        }
    }
}

/// The deadline a request names: half the client's request timeout from now, so the node
/// stops acting on it well before the driver gives up (the module documentation).
fn request_deadline(client: &BallastClient) -> u64 {
    let timeout = Duration::from_millis(client.options().request_timeout_ms);
    SharedDeadline::after(timeout / 2).to_wire()
}

/// Whether the node may still act on a request that failed this way: no definite answer came
/// back (a timeout, the channel or transport broke, the node was unavailable). The node's own
/// refusals (not the leader, an unknown region, a bad block) are definite.
fn outcome_unknown(error: &ClientError) -> bool {
    use ballast_client::Code;
    match error {
        // Refused before anything was sent.
        ClientError::InvalidArgument(_)
        | ClientError::InvalidName(_)
        | ClientError::Transport { .. } => false,
        ClientError::MissingField { .. } => true,
        ClientError::Status { code, .. } => matches!(
            code,
            Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::Aborted
        ),
    }
}

/// Attaches a new region over the socket at `path`, which must belong to node `node_id` (the
/// node at `endpoint`): a socket of the same path on this host may be another node's, when the
/// node at `endpoint` runs on another host. With `local_request_timeout` (the node serves local
/// frames), requests then go as frames on that socket, each waiting at most that long.
fn attach(
    path: &str,
    endpoint: String,
    node_id: u64,
    local_request_timeout: Option<Duration>,
) -> std::io::Result<Attached> {
    let mut stream = UnixStream::connect(path)?;
    let timeout = Some(Duration::from_secs(5));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let region = SharedRegion::create("ballast-shared", REGION_BYTES)?;
    let (region_id, attached_node_id) = region.send(&mut stream)?;
    if attached_node_id != node_id {
        return Err(std::io::Error::other(format!(
            "the local socket {path} is node {attached_node_id}'s, not node {node_id}'s"
        )));
    }
    let local = local_request_timeout
        .map(|timeout| LocalChannel::start(&stream, timeout))
        .transpose()?;
    Ok(Attached::new(region, region_id, endpoint, stream, local))
}

/// Read slots, then write slots, then gather slots: the whole region.
const REGION_BYTES: usize =
    READ_SLOT_BYTES * READ_SLOT_COUNT + WRITE_SLOT_BYTES * (WRITE_SLOT_COUNT + GATHER_SLOT_COUNT);

impl Attached {
    /// `region` (at least [`REGION_BYTES`]) cut into its slot pools.
    fn new(
        region: SharedRegion,
        region_id: u64,
        endpoint: String,
        stream: UnixStream,
        local: Option<LocalChannel>,
    ) -> Attached {
        assert!(region.len() >= REGION_BYTES, "a region holds every slot");
        let read_bytes = READ_SLOT_BYTES * READ_SLOT_COUNT;
        let write_bytes = WRITE_SLOT_BYTES * WRITE_SLOT_COUNT;
        Attached {
            region,
            region_id,
            endpoint,
            _stream: stream,
            local,
            reads: SlotPool::new(0, READ_SLOT_BYTES, READ_SLOT_COUNT),
            writes: SlotPool::new(read_bytes, WRITE_SLOT_BYTES, WRITE_SLOT_COUNT),
            gathers: SlotPool::new(
                read_bytes + write_bytes,
                WRITE_SLOT_BYTES,
                GATHER_SLOT_COUNT,
            ),
        }
    }
}

/// A slot taken from a pool's free list under one of its semaphore permits; both are given back
/// on drop.
struct SlotLease<'a> {
    pool: &'a SlotPool,
    index: usize,
    /// None once quarantined.
    permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl<'a> SlotLease<'a> {
    /// Waits for a free slot of `pool`.
    async fn acquire(pool: &'a SlotPool) -> Result<SlotLease<'a>, Unshared> {
        let permit = pool
            .permits
            .acquire()
            .await
            .map_err(|_| Unshared::NotAttached)?;
        let index = pool
            .free_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop()
            .expect("a semaphore permit guarantees a free slot");
        Ok(SlotLease {
            pool,
            index,
            permit: Some(permit),
        })
    }

    /// Never gives the slot back: the node may still use it for the request that failed.
    fn quarantine(mut self) {
        if let Some(permit) = self.permit.take() {
            permit.forget();
        }
    }

    /// Where the slot starts in the region.
    fn offset_bytes(&self) -> usize {
        self.pool.offset_bytes(self.index)
    }
}

impl Drop for SlotLease<'_> {
    fn drop(&mut self) {
        if self.permit.is_none() {
            return;
        }
        self.pool
            .free_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self.index);
    }
}

/// One write whose bytes are in a slot.
struct SlotWrite<'a> {
    volume: &'a str,
    inode: u64,
    offset_bytes: u64,
    slot_offset_bytes: usize,
    length_bytes: usize,
    durable: bool,
}

/// A gather slot: page-cache writes of one batch are copied straight into it, in order, and it
/// is sent as it is ([`SharedMemory::write_gathered`]). Holds the region it lies in, so the
/// memory outlives a re-attachment (the node then refuses the old region's id, and the write
/// goes over gRPC). Given back to its pool when dropped.
pub struct GatherSlot {
    attached: Arc<Attached>,
    index: usize,
    length_bytes: usize,
    /// Set when a request naming it failed with an unknown outcome: then never given back.
    quarantined: std::sync::atomic::AtomicBool,
}

impl GatherSlot {
    fn offset_bytes(&self) -> usize {
        self.attached.gathers.offset_bytes(self.index)
    }

    /// A copy of what was gathered, for the write over gRPC after a failure.
    pub fn to_bytes(&self) -> bytes::Bytes {
        self.attached
            .region
            .with_bytes(
                self.offset_bytes(),
                self.length_bytes,
                bytes::Bytes::copy_from_slice,
            )
            .expect("gather slots lie inside their region")
    }
}

impl GatherBuffer for GatherSlot {
    fn len(&self) -> usize {
        self.length_bytes
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        assert!(
            self.length_bytes + data.len() <= WRITE_SLOT_BYTES,
            "{} bytes more in a gather slot holding {} of {WRITE_SLOT_BYTES}",
            data.len(),
            self.length_bytes
        );
        self.attached
            .region
            .with_bytes_mut(
                self.offset_bytes() + self.length_bytes,
                data.len(),
                |bytes| bytes.copy_from_slice(data),
            )
            .expect("gather slots lie inside their region");
        self.length_bytes += data.len();
    }
}

impl Drop for GatherSlot {
    fn drop(&mut self) {
        if self.quarantined.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let pool = &self.attached.gathers;
        pool.free_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self.index);
        // The permit taken in `gather_slot` was forgotten; this stands for it.
        pool.permits.add_permits(1);
    }
}

impl std::fmt::Debug for GatherSlot {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GatherSlot")
            .field("index", &self.index)
            .field("length_bytes", &self.length_bytes)
            .finish()
    }
}

/// Where a write's bytes are gathered on their way to the node: the driver's own memory, or a
/// gather slot of shared memory when one was free.
#[derive(Debug)]
pub enum WriteBytes {
    Own(bytes::BytesMut),
    Shared(GatherSlot),
}

impl GatherBuffer for WriteBytes {
    fn len(&self) -> usize {
        match self {
            WriteBytes::Own(bytes) => bytes.len(),
            WriteBytes::Shared(slot) => slot.len(),
        }
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        match self {
            WriteBytes::Own(bytes) => bytes.extend_from_slice(data),
            WriteBytes::Shared(slot) => slot.extend_from_slice(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared memory attached to a region of its own, with no node behind it.
    fn attached_without_node() -> SharedMemory {
        let (stream, _other_end) = UnixStream::pair().unwrap();
        let region = SharedRegion::create("ballast-test", REGION_BYTES).unwrap();
        let shared_memory = SharedMemory::new(false);
        *shared_memory.attached.lock().unwrap() = Some(Arc::new(Attached::new(
            region,
            1,
            String::new(),
            stream,
            None,
        )));
        shared_memory
    }

    #[test]
    fn gathered_bytes_land_in_their_own_slot_after_the_write_slots() {
        let shared_memory = attached_without_node();
        let mut slot = shared_memory.gather_slot(WRITE_SLOT_BYTES).unwrap();
        slot.extend_from_slice(b"first ");
        slot.extend_from_slice(&[7u8; 8192]);
        slot.extend_from_slice(b" last");
        assert_eq!(slot.len(), 6 + 8192 + 5);
        let bytes = slot.to_bytes();
        assert_eq!(&bytes[..6], b"first ");
        assert!(bytes[6..6 + 8192].iter().all(|&byte| byte == 7));
        assert_eq!(&bytes[6 + 8192..], b" last");
        let write_slots_end =
            READ_SLOT_BYTES * READ_SLOT_COUNT + WRITE_SLOT_BYTES * WRITE_SLOT_COUNT;
        assert!(
            slot.offset_bytes() >= write_slots_end,
            "no write slot is shared"
        );
        let seen = slot
            .attached
            .region
            .with_bytes(slot.offset_bytes(), 6, |bytes| bytes.to_vec())
            .unwrap();
        assert_eq!(
            seen, b"first ",
            "in the region itself, where the node reads it"
        );
    }

    #[test]
    fn gather_slots_are_never_waited_for_and_come_back_when_dropped() {
        let shared_memory = attached_without_node();
        let slots: Vec<GatherSlot> = (0..GATHER_SLOT_COUNT)
            .map(|_| shared_memory.gather_slot(WRITE_SLOT_BYTES).unwrap())
            .collect();
        let mut offsets: Vec<usize> = slots.iter().map(GatherSlot::offset_bytes).collect();
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), GATHER_SLOT_COUNT, "each slot its own");
        assert!(
            shared_memory.gather_slot(4096).is_none(),
            "none free: the caller gathers in its own memory"
        );
        drop(slots);
        assert!(shared_memory.gather_slot(WRITE_SLOT_BYTES).is_some());
        assert!(
            shared_memory.gather_slot(WRITE_SLOT_BYTES + 4096).is_none(),
            "longer than a slot"
        );
        assert!(
            SharedMemory::new(false).gather_slot(4096).is_none(),
            "nothing attached"
        );
    }

    /// A shared memory attached over local frames to a node stand-in that records the
    /// deadline of each request and answers a request at offset 0 never (so it times out), any
    /// other with a definite refusal (NotFound).
    fn attached_to_silent_node(
        request_timeout: Duration,
    ) -> (SharedMemory, std::sync::mpsc::Receiver<u64>) {
        use ballast_common::local_frame::{LocalFailure, LocalFrame, LocalFrameKind};
        use prost::Message;
        use std::io::Write;
        let (stream, mut node_end) = UnixStream::pair().unwrap();
        let (deadlines, deadlines_seen) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(Some(frame)) = LocalFrame::read_from(&mut node_end) {
                let (offset_bytes, deadline) = match frame.kind {
                    LocalFrameKind::ReadShared => {
                        let request =
                            proto::ReadSharedRequest::decode(frame.body.as_slice()).unwrap();
                        (request.offset_bytes, request.deadline_monotonic_ns)
                    }
                    _ => {
                        let request =
                            proto::WriteSharedRequest::decode(frame.body.as_slice()).unwrap();
                        (request.offset_bytes, request.deadline_monotonic_ns)
                    }
                };
                let _ = deadlines.send(deadline);
                if offset_bytes == 0 {
                    continue;
                }
                let failure = LocalFailure {
                    code: ballast_client::Code::NotFound as i32,
                    errno: 2,
                    message: "no such inode".to_owned(),
                };
                let answer = LocalFrame {
                    kind: LocalFrameKind::Failure,
                    request_id: frame.request_id,
                    body: failure.encode(),
                };
                if node_end.write_all(&answer.encode()).is_err() {
                    break;
                }
            }
        });
        let local = LocalChannel::start(&stream, request_timeout).unwrap();
        let region = SharedRegion::create("ballast-test", REGION_BYTES).unwrap();
        let shared_memory = SharedMemory::new(true);
        *shared_memory.attached.lock().unwrap() = Some(Arc::new(Attached::new(
            region,
            1,
            String::new(),
            stream,
            Some(local),
        )));
        (shared_memory, deadlines_seen)
    }

    fn client_with_timeout(request_timeout: Duration) -> BallastClient {
        let options = ballast_client::ClientOptions {
            request_timeout_ms: request_timeout.as_millis() as u64,
            ..Default::default()
        };
        BallastClient::connect_lazy("http://127.0.0.1:9", options).unwrap()
    }

    fn free_slot_count(pool: &SlotPool) -> usize {
        pool.free_slots.lock().unwrap().len()
    }

    #[tokio::test]
    async fn a_request_names_a_deadline_half_its_timeout_away() {
        let timeout = Duration::from_secs(4);
        let (shared_memory, deadlines_seen) = attached_to_silent_node(timeout);
        let client = client_with_timeout(timeout);
        let before = ballast_common::shared_deadline::monotonic_now_ns();
        let result = shared_memory
            .read(&client, "v", 2, 4096, 4096, |_| ())
            .await;
        assert!(matches!(result, Err(Unshared::Refused(_))));
        let deadline = deadlines_seen.recv().unwrap();
        let half_ns = timeout.as_nanos() as u64 / 2;
        assert!(
            deadline >= before + half_ns && deadline < before + half_ns + 1_000_000_000,
            "deadline {deadline} against {before} + {half_ns}"
        );
    }

    #[tokio::test]
    async fn a_read_that_timed_out_never_gives_its_slot_back_and_retires_the_attachment() {
        let timeout = Duration::from_millis(100);
        let (shared_memory, _deadlines) = attached_to_silent_node(timeout);
        let client = client_with_timeout(timeout);
        let attached = shared_memory.current().unwrap();
        let result = shared_memory.read(&client, "v", 2, 0, 4096, |_| ()).await;
        match result {
            Err(Unshared::Refused(error)) => {
                assert_eq!(error.code(), Some(ballast_client::Code::DeadlineExceeded))
            }
            other => panic!("expected a timeout, got {:?}", other.map(|_| ())),
        }
        assert_eq!(
            free_slot_count(&attached.reads),
            READ_SLOT_COUNT - 1,
            "the node may still read into the slot: it is never used again"
        );
        assert!(
            shared_memory.current().is_none(),
            "the attachment is retired"
        );
        assert!(
            SlotLease::acquire(&attached.reads).await.is_err(),
            "no request takes a slot of the retired attachment"
        );
        assert!(
            attached.gathers.permits.try_acquire().is_err(),
            "nor a gather slot"
        );
    }

    #[tokio::test]
    async fn a_definite_refusal_gives_the_slot_back() {
        let timeout = Duration::from_secs(10);
        let (shared_memory, _deadlines) = attached_to_silent_node(timeout);
        let client = client_with_timeout(timeout);
        let attached = shared_memory.current().unwrap();
        for round in 0..3 {
            let result = shared_memory
                .read(&client, "v", 2, 4096, 4096, |_| ())
                .await;
            assert!(matches!(result, Err(Unshared::Refused(_))), "round {round}");
            let result = shared_memory
                .write(&client, "v", 2, 4096, &[1u8; 4096], false)
                .await;
            assert!(matches!(result, Err(Unshared::Refused(_))), "round {round}");
        }
        assert_eq!(free_slot_count(&attached.reads), READ_SLOT_COUNT);
        assert_eq!(free_slot_count(&attached.writes), WRITE_SLOT_COUNT);
        assert!(shared_memory.current().is_some(), "still attached");
    }

    #[tokio::test]
    async fn writes_that_timed_out_never_give_their_slots_back() {
        let timeout = Duration::from_millis(100);
        let (shared_memory, _deadlines) = attached_to_silent_node(timeout);
        let client = client_with_timeout(timeout);
        let attached = shared_memory.current().unwrap();
        let mut gathered = shared_memory.gather_slot(4096).unwrap();
        gathered.extend_from_slice(&[2u8; 4096]);
        let result = shared_memory
            .write_gathered(&client, "v", 2, 0, &gathered, false)
            .await;
        assert!(matches!(result, Err(Unshared::Refused(_))));
        drop(gathered);
        assert_eq!(
            free_slot_count(&attached.gathers),
            GATHER_SLOT_COUNT - 1,
            "the timed-out gather slot stays out"
        );
        // The attachment is retired: a write now attaches anew, which fails here (no node), and
        // never touches the old attachment's slots.
        let result = shared_memory
            .write(&client, "v", 2, 0, &[3u8; 4096], false)
            .await;
        assert!(result.is_err());
        assert_eq!(free_slot_count(&attached.writes), WRITE_SLOT_COUNT);
    }

    #[test]
    fn only_answers_from_the_node_are_definite() {
        let status = |code| ClientError::Status {
            code,
            message: String::new(),
            errno: None,
        };
        use ballast_client::Code;
        for code in [
            Code::DeadlineExceeded,
            Code::Unavailable,
            Code::Cancelled,
            Code::Unknown,
        ] {
            assert!(outcome_unknown(&status(code)), "{code:?}");
        }
        for code in [
            Code::FailedPrecondition,
            Code::NotFound,
            Code::InvalidArgument,
            Code::DataLoss,
            Code::ResourceExhausted,
        ] {
            assert!(!outcome_unknown(&status(code)), "{code:?}");
        }
        assert!(!outcome_unknown(&ClientError::InvalidArgument(
            "too large for a frame".to_owned()
        )));
    }

    #[test]
    #[should_panic(expected = "gather slot")]
    fn a_gather_slot_refuses_more_than_it_holds() {
        let shared_memory = attached_without_node();
        let mut slot = shared_memory.gather_slot(WRITE_SLOT_BYTES).unwrap();
        slot.extend_from_slice(&vec![1u8; WRITE_SLOT_BYTES]);
        slot.extend_from_slice(&[1u8]);
    }
}
