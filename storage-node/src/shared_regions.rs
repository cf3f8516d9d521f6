//! Memory regions shared with FUSE drivers on this host, so a read's bytes go from the device
//! into the driver's memory without passing through gRPC (`Filesystem.ReadShared`), and a
//! write's bytes come from the driver's memory with one copy (`Filesystem.WriteShared`).
//!
//! A driver connects to the node's local socket (`--local-socket`), sends a sealed memfd
//! (`ballast_common::shared_region`), and gets back a random id. The region stays attached
//! while that connection is open; a read names the id and a slot of the region, and the node
//! reads the file's blocks and copies them into the slot (`filesystem::read_shared`).
//!
//! Once attached, the connection also carries the driver's `ReadShared` and `WriteShared`
//! requests as local frames (`ballast_common::local_frame`), when the node was given a
//! [`LocalRequests`] handler: a task on the runtime reads the frames and spawns the handling
//! of each, which writes the answer frame itself. That skips HTTP/2 and its hand-offs between
//! tasks and threads.
//!
//! Owns: the registry of attached regions, the local socket's accept thread, one thread per
//! attaching driver (for the handshake; without local frames it then waits for the
//! connection to close), and the frame reading task of each attached driver.
//! Must not depend on: the gRPC service (the service looks slots up here, and serves frames
//! through the [`LocalRequests`] trait).
//! Invariants:
//! - At most [`SHARED_REGIONS_MAX`] regions, each at most [`SHARED_REGION_BYTES_MAX`] and size
//!   sealed (checked by `SharedRegion::from_received`), so a driver cannot make the node fault
//!   by shrinking it.
//! - A slot is page aligned and inside its region, and holds the region (an `Arc`) while a
//!   request uses it, so a driver that detaches mid-request cannot unmap memory the node still
//!   touches. A read's blocks are read by the device into the node's own buffers, verified
//!   there, and copied into the slot's pieces ([`Slot::lend_pieces`]); see
//!   `filesystem::read_shared` for why not straight into the slot.
//! - A write's bytes are copied out of the slot once ([`Slot::copy_out`]) before anything looks
//!   at them: the driver could change the slot at any time, so checksums, the prewrite and the
//!   Raft entry all see the node's own copy, never the shared memory.
//! - A request whose driver named a deadline (`ballast_common::shared_deadline`) is refused
//!   once it has passed ([`check_deadline`]): a read before it starts, a write after its slot
//!   is copied and again right before it is proposed. The driver gives up later than that and
//!   then sends the write again over gRPC, so an old write is never ordered after newer ones.
//! - Ids are random 64-bit numbers from the kernel: another local process that can reach the
//!   gRPC port cannot name a region it was not given.
//! - At most [`LOCAL_REQUESTS_IN_FLIGHT_MAX`] frames of one attachment are handled at once; the
//!   thread reads no further frame until one finishes. A frame that breaks the wire form ends
//!   the attachment (the stream is out of step); answers to requests in flight are then lost,
//!   and the driver's calls fail over to gRPC.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ballast_common::local_frame::{
    LocalFrame, LocalFrameHeader, LocalFrameKind, LOCAL_FRAME_HEADER_BYTES,
};
use ballast_common::shared_deadline::{monotonic_now_ns, SharedDeadline};
use ballast_common::shared_region::{answer_id, SharedRegion, SHARED_REGION_PAGE_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ballast_device::BLOCK_SIZE_BYTES;

use crate::buffer_pool::BufferPool;
use crate::error::{FsError, NodeError, NodeResult};
use crate::write_data::WriteData;

/// Fails with `DeadlinePassed` when `deadline` has passed: `what` must not go ahead
/// (`ballast_common::shared_deadline`).
pub fn check_deadline(deadline: SharedDeadline, what: &'static str) -> NodeResult<()> {
    let now_ns = monotonic_now_ns();
    if deadline.has_passed_at(now_ns) {
        return Err(NodeError::DeadlinePassed {
            what,
            late_ms: now_ns.saturating_sub(deadline.to_wire()) / 1_000_000,
        });
    }
    Ok(())
}

/// Regions attached at once (one per mounted volume of a driver on this host).
pub const SHARED_REGIONS_MAX: usize = 64;
/// Largest region a driver may attach.
pub const SHARED_REGION_BYTES_MAX: usize = 256 << 20;
/// Time a connecting driver has to send its region.
const ATTACH_TIMEOUT_MS: u64 = 5_000;
/// Frames of one attachment handled at once.
pub const LOCAL_REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// Longest an answer frame's write may wait: answers are small, and the answers in flight fit
/// the socket's buffer, so a write waits only when the driver stopped reading.
const ANSWER_WRITE_TIMEOUT_MS: u64 = 1_000;
/// Bytes of frames read from a driver's socket at once.
const FRAME_READ_BUFFER_BYTES: usize = 64 << 10;

/// The answer to one local frame: its kind (`Answer` or `Failure`) and body.
pub type LocalAnswer = (LocalFrameKind, Vec<u8>);

/// Serves the requests drivers send as local frames (implemented by the gRPC service layer, so
/// the frames run the same code as the calls they stand for).
pub trait LocalRequests: Send + Sync + 'static {
    /// Serves one request frame (`kind` is a request kind) with its body.
    fn serve(
        &self,
        kind: LocalFrameKind,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = LocalAnswer> + Send>>;
}

/// A handler and the runtime its requests run on.
struct LocalService {
    requests: Arc<dyn LocalRequests>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for LocalService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("LocalService")
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct SharedRegions {
    regions: Mutex<HashMap<u64, Arc<SharedRegion>>>,
    /// Reads served into shared regions since the node started (shown by `ballast status`).
    read_count: AtomicU64,
    /// Writes whose bytes came from shared regions since the node started.
    write_count: AtomicU64,
    /// Requests answered as local frames since the node started.
    local_request_count: Arc<AtomicU64>,
    /// The local socket, once it is served (drivers learn it from `Admin.Status`).
    socket_path: Mutex<Option<std::path::PathBuf>>,
    /// This node's id, told to attaching drivers (set by `serve`).
    node_id: AtomicU64,
    /// Serves local frames, once set ([`SharedRegions::serve_local_requests`]).
    local_service: OnceLock<LocalService>,
}

/// The shortest write copied into a pooled aligned buffer ([`Slot::copy_out`]). A pooled
/// buffer is at least this long, and the Raft entry holds it for as long as the log's entry
/// cache keeps the entry: a 4 KiB write in a 1 MiB buffer (a 2 MiB huge page) made the cache
/// hold hundreds of times what it counts, and each fresh huge page cost the fsync'd 4 KiB
/// write its speed (195 IOPS against 1,872 in the bench of 2026-12-06, fifth session).
pub const ALIGNED_COPY_BYTES_MIN: usize = crate::buffer_pool::POOLED_BUFFER_BYTES;

/// Where one read may write: `length_bytes` of a region from `offset_bytes`.
#[derive(Debug)]
pub struct Slot {
    region: Arc<SharedRegion>,
    offset_bytes: usize,
    length_bytes: usize,
}

impl Slot {
    /// The first `length_bytes` of the slot (a multiple of 4 KiB) as buffers of at most
    /// `piece_bytes` each, in order, for the pieces of a read to be written into, each at its
    /// place in the driver's memory. Refused when the slot is shorter. Consumes the
    /// slot, so nothing else in this request touches the memory while the pieces exist; each
    /// piece holds the region, so a driver that detaches mid-read cannot unmap memory the kernel
    /// still writes.
    pub fn lend_pieces(
        self,
        length_bytes: usize,
        piece_bytes: usize,
    ) -> NodeResult<Vec<ballast_device::AlignedBuffer>> {
        if length_bytes > self.length_bytes
            || length_bytes % SHARED_REGION_PAGE_BYTES != 0
            || piece_bytes == 0
            || piece_bytes % SHARED_REGION_PAGE_BYTES != 0
        {
            return Err(FsError::invalid(format!(
                "a read of {length_bytes} block bytes in pieces of {piece_bytes} does not fit \
                 a {}-byte slot",
                self.length_bytes
            ))
            .into());
        }
        let lender: Arc<dyn std::any::Any + Send + Sync> = self.region.clone();
        let pieces = (0..length_bytes)
            .step_by(piece_bytes)
            .map(|position_bytes| {
                let piece_length = piece_bytes.min(length_bytes - position_bytes);
                let pointer = self
                    .region
                    .pointer_at(self.offset_bytes + position_bytes, piece_length)
                    .expect("slots lie inside their region (checked when made)");
                // SAFETY: page aligned (slot offsets are checked multiples of 4 KiB of a
                // page-aligned mapping, and pieces are whole pages), inside the mapping (checked
                // when the slot was made, and the pieces lie inside the slot), initialised
                // (shared memory is zero filled or written), and kept mapped by `lender` for the
                // buffer's life. The pieces do not overlap, and this request owns the slot alone
                // (the slot is consumed here); the driver writes a slot only before it asks for
                // a read into it, and whatever it does, the bytes copied in were checked by
                // checksum in the node's own buffer first.
                unsafe {
                    ballast_device::AlignedBuffer::lent(pointer, piece_length, Arc::clone(&lender))
                }
            })
            .collect();
        Ok(pieces)
    }

    /// A copy of the first `length_bytes` of the slot: the bytes of a write the driver put
    /// there. Whole blocks of at least [`ALIGNED_COPY_BYTES_MIN`] are copied into an aligned
    /// buffer from `pool`, which a device write can take as it is (`write_data.rs`); other
    /// writes into `Bytes`.
    pub fn copy_out(&self, length_bytes: usize, pool: &Arc<BufferPool>) -> NodeResult<WriteData> {
        if length_bytes > self.length_bytes {
            return Err(FsError::invalid(format!(
                "a write of {length_bytes} bytes does not fit a {}-byte slot",
                self.length_bytes
            ))
            .into());
        }
        let whole_blocks =
            length_bytes >= ALIGNED_COPY_BYTES_MIN && length_bytes % BLOCK_SIZE_BYTES == 0;
        Ok(self
            .region
            .with_bytes(self.offset_bytes, length_bytes, |bytes| {
                if whole_blocks {
                    WriteData::aligned(pool.for_copy(bytes), length_bytes, Arc::clone(pool))
                } else {
                    WriteData::Bytes(bytes::Bytes::copy_from_slice(bytes))
                }
            })
            .expect("slots lie inside their region (checked when made)"))
    }
}

impl SharedRegions {
    /// The slot `slot_bytes` long at `slot_offset_bytes` of region `region_id`.
    pub fn slot(
        &self,
        region_id: u64,
        slot_offset_bytes: u64,
        slot_bytes: u32,
    ) -> NodeResult<Slot> {
        let region = self
            .regions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&region_id)
            .cloned()
            .ok_or_else(|| {
                FsError::invalid(format!("no shared region {region_id:#x} is attached"))
            })?;
        let offset_bytes = usize::try_from(slot_offset_bytes).unwrap_or(usize::MAX);
        let length_bytes = slot_bytes as usize;
        let aligned = offset_bytes % SHARED_REGION_PAGE_BYTES == 0
            && length_bytes % SHARED_REGION_PAGE_BYTES == 0
            && length_bytes > 0;
        if !aligned || region.pointer_at(offset_bytes, length_bytes).is_none() {
            return Err(FsError::invalid(format!(
                "slot {slot_offset_bytes}+{slot_bytes} is not page aligned inside the {}-byte \
                 shared region",
                region.len()
            ))
            .into());
        }
        Ok(Slot {
            region,
            offset_bytes,
            length_bytes,
        })
    }

    /// Counts one read served into a shared region.
    pub fn count_read(&self) {
        self.read_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read_count(&self) -> u64 {
        self.read_count.load(Ordering::Relaxed)
    }

    /// Counts one write whose bytes came from a shared region.
    pub fn count_write(&self) {
        self.write_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn write_count(&self) -> u64 {
        self.write_count.load(Ordering::Relaxed)
    }

    pub fn local_request_count(&self) -> u64 {
        self.local_request_count.load(Ordering::Relaxed)
    }

    /// Serves the local frames of every attachment from now on with `requests`, on `runtime`
    /// (set once; later calls change nothing). Without it, an attached driver's first byte
    /// ends its attachment, as before local frames existed.
    pub fn serve_local_requests(
        &self,
        requests: Arc<dyn LocalRequests>,
        runtime: tokio::runtime::Handle,
    ) {
        let _ = self.local_service.set(LocalService { requests, runtime });
    }

    /// True when attached drivers may send local frames (`Admin.Status` tells them).
    pub fn serves_local_requests(&self) -> bool {
        self.local_service.get().is_some()
    }

    fn node_id(&self) -> u64 {
        self.node_id.load(Ordering::Relaxed)
    }

    pub fn socket_path(&self) -> Option<std::path::PathBuf> {
        self.socket_path
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn attached_count(&self) -> usize {
        self.regions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Registers `region` under a fresh random id; `None` when [`SHARED_REGIONS_MAX`] are
    /// attached.
    fn attach(&self, region: SharedRegion) -> std::io::Result<Option<u64>> {
        let mut regions = self
            .regions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if regions.len() >= SHARED_REGIONS_MAX {
            return Ok(None);
        }
        // Bounded: a collision among at most 64 ids of 2^64 is practically impossible.
        for _ in 0..8 {
            let id = random_id()?;
            if id != 0 && !regions.contains_key(&id) {
                regions.insert(id, Arc::new(region));
                return Ok(Some(id));
            }
        }
        Err(std::io::Error::other("no free shared region id"))
    }

    fn detach(&self, id: u64) {
        self.regions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&id);
    }

    /// Listens on the Unix socket at `path` (a stale socket file there is replaced) and attaches
    /// the regions drivers send, each until its connection closes. Runs on threads of its own:
    /// the accept loop, and one per attached driver, at most [`SHARED_REGIONS_MAX`].
    pub fn serve(self: &Arc<Self>, path: &Path, node_id: u64) -> std::io::Result<()> {
        self.node_id.store(node_id, Ordering::Relaxed);
        if let Some(directory) = path.parent() {
            std::fs::create_dir_all(directory)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(path)?;
        // Only this host's root may hand the node memory to write into.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let regions = self.clone();
        std::thread::Builder::new()
            .name("ballast-local".to_owned())
            .spawn(move || {
                for connection in listener.incoming() {
                    match connection {
                        Ok(stream) => regions.accept(stream),
                        Err(error) => {
                            tracing::warn!(%error, "local socket accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        tracing::info!(path = %path.display(), "serving shared regions on the local socket");
        *self
            .socket_path
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(path.to_owned());
        Ok(())
    }

    fn accept(self: &Arc<Self>, stream: UnixStream) {
        if self.attached_count() >= SHARED_REGIONS_MAX {
            tracing::warn!("refusing a shared region: {SHARED_REGIONS_MAX} are attached");
            return;
        }
        let regions = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ballast-region".to_owned())
            .spawn(move || regions.hold_attachment(stream));
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a shared region thread");
        }
    }

    /// Receives one region, answers its id, and detaches it when the driver's connection ends.
    fn hold_attachment(self: Arc<Self>, mut stream: UnixStream) {
        let timeout = Some(Duration::from_millis(ATTACH_TIMEOUT_MS));
        let received = stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .and_then(|()| SharedRegion::receive(&mut stream, SHARED_REGION_BYTES_MAX));
        let region = match received {
            Ok(region) => region,
            Err(error) => {
                tracing::warn!(%error, "refused a shared region");
                return;
            }
        };
        let length_bytes = region.len();
        let id = match self.attach(region) {
            Ok(Some(id)) => id,
            Ok(None) => {
                tracing::warn!("refusing a shared region: {SHARED_REGIONS_MAX} are attached");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot attach a shared region");
                return;
            }
        };
        if let Err(error) = answer_id(&mut stream, id, self.node_id()) {
            tracing::warn!(%error, "cannot answer a shared region's id");
            self.detach(id);
            return;
        }
        tracing::info!(length_bytes, "attached a shared region");
        let _ = stream.set_read_timeout(None);
        let Some(service) = self.local_service.get() else {
            // The driver never writes again; a read returns at its close or death. Any byte
            // from the driver breaks the protocol and ends the attachment too.
            let mut byte = [0u8; 1];
            let _ = std::io::Read::read(&mut stream, &mut byte);
            self.detach(id);
            tracing::info!(length_bytes, "detached a shared region");
            return;
        };
        // Frames are read by a task on the runtime, not by this thread: a handler spawned from
        // a worker runs on that worker next, where one spawned from this thread would wake
        // another (in a VM each such hand-off costs tens of microseconds).
        let _entered = service.runtime.enter();
        let socket = stream.try_clone().and_then(|socket| {
            socket.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(socket)
        });
        let socket = match socket {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "cannot read local frames");
                self.detach(id);
                return;
            }
        };
        let regions = self.clone();
        let requests = service.requests.clone();
        service.runtime.spawn(async move {
            serve_frames(socket, stream, requests, &regions.local_request_count).await;
            regions.detach(id);
            tracing::info!(length_bytes, "detached a shared region");
        });
    }
}

/// Reads request frames from `socket` until it ends or breaks, spawning the handling of each
/// (at most [`LOCAL_REQUESTS_IN_FLIGHT_MAX`] at once); each handling task writes its answer.
/// `shutdown` is the same socket, shut down when an answer cannot be written.
async fn serve_frames(
    socket: tokio::net::UnixStream,
    shutdown: UnixStream,
    requests: Arc<dyn LocalRequests>,
    answered_count: &Arc<AtomicU64>,
) {
    let (reader, writer) = socket.into_split();
    let mut reader = tokio::io::BufReader::with_capacity(FRAME_READ_BUFFER_BYTES, reader);
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let shutdown = Arc::new(shutdown);
    let permits = Arc::new(tokio::sync::Semaphore::new(LOCAL_REQUESTS_IN_FLIGHT_MAX));
    // Bounded by the connection: each pass reads one frame; the loop ends with the stream.
    loop {
        let frame = match read_frame(&mut reader).await {
            Ok(Some(frame)) if frame.kind.is_request() => frame,
            Ok(Some(frame)) => {
                tracing::warn!(kind = ?frame.kind, "a driver sent an answer as a request");
                break;
            }
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(%error, "a driver's local frame is broken; detaching");
                break;
            }
        };
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let requests = requests.clone();
        let writer = writer.clone();
        let shutdown = shutdown.clone();
        let answered_count = answered_count.clone();
        tokio::spawn(async move {
            let (kind, body) = requests.serve(frame.kind, frame.body).await;
            let answer = LocalFrame {
                kind,
                request_id: frame.request_id,
                body,
            }
            .encode();
            let written =
                tokio::time::timeout(Duration::from_millis(ANSWER_WRITE_TIMEOUT_MS), async {
                    writer.lock().await.write_all(&answer).await
                })
                .await;
            match written {
                Ok(Ok(())) => {
                    answered_count.fetch_add(1, Ordering::Relaxed);
                }
                failed => {
                    tracing::warn!(?failed, "cannot answer a local frame; detaching");
                    // Ends the reading loop, which then detaches the region.
                    let _ = shutdown.shutdown(std::net::Shutdown::Both);
                }
            }
            drop(permit);
        });
    }
}

/// Reads the next frame from `reader`: `None` when the stream ends cleanly between frames.
async fn read_frame(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<LocalFrame>> {
    let mut header = [0u8; LOCAL_FRAME_HEADER_BYTES];
    let first = reader.read(&mut header).await?;
    if first == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut header[first..]).await?;
    let header = LocalFrameHeader::decode(&header)?;
    let mut body = vec![0u8; header.body_length_bytes];
    reader.read_exact(&mut body).await?;
    Ok(Some(LocalFrame {
        kind: header.kind,
        request_id: header.request_id,
        body,
    }))
}

fn random_id() -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into a live local buffer of 8.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Answers each request with its body reversed after a short pause, and keeps the most
    /// requests it served at once.
    #[derive(Default)]
    struct Reversing {
        serving: AtomicU64,
        serving_max: AtomicU64,
    }

    impl LocalRequests for Arc<Reversing> {
        fn serve(
            &self,
            kind: LocalFrameKind,
            body: Vec<u8>,
        ) -> Pin<Box<dyn Future<Output = LocalAnswer> + Send>> {
            let this = self.clone();
            Box::pin(async move {
                assert!(kind.is_request());
                let serving = this.serving.fetch_add(1, Ordering::SeqCst) + 1;
                this.serving_max.fetch_max(serving, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                this.serving.fetch_sub(1, Ordering::SeqCst);
                (LocalFrameKind::Answer, body.into_iter().rev().collect())
            })
        }
    }

    /// Waits (bounded: 500 looks 10 ms apart) until `regions` holds `count` attachments.
    fn attached_becomes(regions: &SharedRegions, count: usize) -> bool {
        (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            regions.attached_count() == count
        })
    }

    #[test]
    fn local_frames_are_answered_concurrently_within_the_limit_and_broken_ones_detach() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("local.sock");
        let regions = Arc::new(SharedRegions::default());
        let reversing = Arc::new(Reversing::default());
        assert!(!regions.serves_local_requests());
        regions.serve_local_requests(Arc::new(reversing.clone()), runtime.handle().clone());
        assert!(regions.serves_local_requests());
        regions.serve(&path, 7).unwrap();

        let region = SharedRegion::create("test", 4096).unwrap();
        let mut stream = UnixStream::connect(&path).unwrap();
        region.send(&mut stream).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // More requests than may be served at once, all sent before any answer is read.
        let request_count = 2 * LOCAL_REQUESTS_IN_FLIGHT_MAX as u64 + 5;
        for request_id in 0..request_count {
            let kind = if request_id % 2 == 0 {
                LocalFrameKind::ReadShared
            } else {
                LocalFrameKind::WriteShared
            };
            let frame = LocalFrame {
                kind,
                request_id,
                body: request_id.to_le_bytes().to_vec(),
            };
            stream.write_all(&frame.encode()).unwrap();
        }
        let mut answered = vec![false; request_count as usize];
        for _ in 0..request_count {
            let answer = LocalFrame::read_from(&mut stream).unwrap().unwrap();
            assert_eq!(answer.kind, LocalFrameKind::Answer);
            let mut expected = answer.request_id.to_le_bytes();
            expected.reverse();
            assert_eq!(answer.body, expected, "an answer went to another request");
            assert!(
                !std::mem::replace(&mut answered[answer.request_id as usize], true),
                "request {} answered twice",
                answer.request_id
            );
        }
        let serving_max = reversing.serving_max.load(Ordering::SeqCst);
        assert!(
            (2..=LOCAL_REQUESTS_IN_FLIGHT_MAX as u64).contains(&serving_max),
            "{serving_max} requests served at once"
        );
        // The count goes up after an answer is written, so the last one may still be on its
        // way when its answer has arrived here: wait for it, bounded.
        for _ in 0..500 {
            if regions.local_request_count() == request_count {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(regions.local_request_count(), request_count);
        assert_eq!(regions.attached_count(), 1);

        // A broken frame ends the attachment; so does an answer sent as a request.
        let mut broken = LocalFrame {
            kind: LocalFrameKind::ReadShared,
            request_id: 1,
            body: Vec::new(),
        }
        .encode();
        broken[0] ^= 0xFF;
        stream.write_all(&broken).unwrap();
        assert!(
            attached_becomes(&regions, 0),
            "a broken frame left it attached"
        );
        let mut stream = UnixStream::connect(&path).unwrap();
        region.send(&mut stream).unwrap();
        assert!(attached_becomes(&regions, 1));
        let answer_as_request = LocalFrame {
            kind: LocalFrameKind::Answer,
            request_id: 1,
            body: Vec::new(),
        };
        stream.write_all(&answer_as_request.encode()).unwrap();
        assert!(attached_becomes(&regions, 0), "an answer left it attached");
        assert_eq!(regions.local_request_count(), request_count);
    }

    #[test]
    fn a_driver_attaches_a_region_until_it_disconnects_and_slots_stay_inside_it() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("local.sock");
        let regions = Arc::new(SharedRegions::default());
        regions.serve(&path, 7).unwrap();
        let region = SharedRegion::create("test", 16 * 4096).unwrap();
        let mut stream = UnixStream::connect(&path).unwrap();
        let (id, node_id) = region.send(&mut stream).unwrap();
        assert_eq!(node_id, 7);
        assert_eq!(regions.attached_count(), 1);

        let slot = regions.slot(id, 4096, 8192).unwrap();
        let copy = |offset, length| region.with_bytes(offset, length, |bytes| bytes.to_vec());
        let mut pieces = slot.lend_pieces(8192, 4096).unwrap();
        assert_eq!(pieces.len(), 2);
        pieces[0].fill(0x5A);
        pieces[1].fill(0x6B);
        drop(pieces);
        assert_eq!(copy(4096, 4096).unwrap(), vec![0x5A; 4096]);
        assert_eq!(copy(8192, 4096).unwrap(), vec![0x6B; 4096]);
        assert_eq!(copy(0, 4096).unwrap(), vec![0; 4096], "before the slot");
        assert_eq!(copy(12288, 4096).unwrap(), vec![0; 4096], "after the slot");
        let slot = || regions.slot(id, 4096, 8192).unwrap();
        assert!(
            slot().lend_pieces(12288, 4096).is_err(),
            "longer than the slot"
        );
        assert!(slot().lend_pieces(100, 4096).is_err(), "not whole pages");
        assert!(
            slot().lend_pieces(8192, 100).is_err(),
            "pieces not whole pages"
        );
        assert!(slot().lend_pieces(8192, 0).is_err(), "empty pieces");
        assert_eq!(slot().lend_pieces(8192, 1 << 20).unwrap().len(), 1);
        assert!(regions.slot(id, 100, 4096).is_err(), "unaligned offset");
        assert!(regions.slot(id, 15 * 4096, 8192).is_err(), "past the end");
        assert!(regions.slot(id ^ 1, 0, 4096).is_err(), "unknown id");

        // A write's copy: short writes into `Bytes`; whole blocks of a pooled buffer's length
        // or more into an aligned buffer from the pool.
        let pool = Arc::new(BufferPool::default());
        region
            .with_bytes_mut(0, 16 * 4096, |bytes| bytes.fill(0x3C))
            .unwrap();
        let big = regions.slot(id, 0, 16 * 4096).unwrap();
        assert!(matches!(
            big.copy_out(4096, &pool).unwrap(),
            WriteData::Bytes(bytes) if bytes.len() == 4096 && bytes.iter().all(|&byte| byte == 0x3C)
        ));
        assert!(
            big.copy_out(16 * 4096 + 1, &pool).is_err(),
            "longer than the slot"
        );
        drop(big);

        // A slot keeps its region mapped after the driver leaves; new slots are refused.
        let kept = slot();
        drop(stream);
        // Bounded: 500 looks 10 ms apart.
        let detached = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            regions.attached_count() == 0
        });
        assert!(detached, "the region stays attached after its driver left");
        assert!(regions.slot(id, 0, 4096).is_err());
        kept.lend_pieces(4096, 4096).unwrap()[0].fill(1);
        assert_eq!(copy(4096, 4096).unwrap(), vec![1; 4096]);
    }

    #[test]
    fn only_writes_of_a_pooled_length_or_more_are_copied_into_pooled_buffers() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("local.sock");
        let regions = Arc::new(SharedRegions::default());
        regions.serve(&path, 7).unwrap();
        let slot_bytes = 2 * ALIGNED_COPY_BYTES_MIN;
        let region = SharedRegion::create("test", slot_bytes).unwrap();
        region
            .with_bytes_mut(0, slot_bytes, |bytes| {
                for (index, byte) in bytes.iter_mut().enumerate() {
                    *byte = (index % 251) as u8;
                }
            })
            .unwrap();
        let mut stream = UnixStream::connect(&path).unwrap();
        let (id, _) = region.send(&mut stream).unwrap();
        let pool = Arc::new(BufferPool::default());
        let slot = regions.slot(id, 0, slot_bytes as u32).unwrap();
        let expected =
            |length: usize| -> Vec<u8> { (0..length).map(|index| (index % 251) as u8).collect() };
        for (length, aligned) in [
            (ALIGNED_COPY_BYTES_MIN, true),
            (ALIGNED_COPY_BYTES_MIN + 4096, true),
            (ALIGNED_COPY_BYTES_MIN - 4096, false),
            (ALIGNED_COPY_BYTES_MIN + 1, false),
            (4096, false),
        ] {
            let data = slot.copy_out(length, &pool).unwrap();
            assert_eq!(
                matches!(data, WriteData::Aligned { .. }),
                aligned,
                "a write of {length} bytes"
            );
            assert_eq!(data.as_slice(), &expected(length)[..]);
        }
        drop(stream);
    }
}
