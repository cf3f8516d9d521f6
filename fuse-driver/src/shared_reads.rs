//! `SharedReads`: reads whose bytes the node puts straight into memory shared with this driver.
//!
//! Why: over gRPC every byte of a read is copied five times between the device and the page
//! cache (prost's encoding, the socket both ways, tonic gathering the frames, the FUSE reply),
//! which bounds sequential reads on 2 cores at about 1 GB/s (profiles of 2026-12-05,
//! `docs/architecture.md`). When the volume's leader is the node on this host, the driver
//! shares a region of memory with it (`ballast_common::shared_region`, attached over the node's
//! local socket, which `Admin.Status` names); a read then names a slot of the region, the node
//! reads the device blocks into the slot and checks them there, and the driver answers the
//! kernel from the slot: one copy instead of five.
//!
//! Owns: the attachment (region, its id, the socket that keeps it attached) and the slots.
//! Must not depend on: FUSE (callers answer the kernel from the bytes handed to them).
//! Invariants:
//! - A slot is used by one read at a time: taken from the free list under a semaphore with one
//!   permit per slot, given back when the bytes have been used.
//! - The node writes a slot only while the driver waits for its `ReadShared` answer, and the
//!   driver reads the slot only after that answer; the answer's range is checked to lie in the
//!   slot and in what was asked.
//! - Any failure is the caller's cue to read over gRPC; the bytes of a failed read are never
//!   used. A node that lost the attachment (restarted) is re-attached at most once per
//!   [`REATTACH_INTERVAL_MS`].

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_client::proto;
use ballast_client::{BallastClient, ClientError};
use ballast_common::shared_region::SharedRegion;
use tokio::sync::Semaphore;

/// Largest read served through a slot: the kernel's largest read request (1 MiB).
pub const SHARED_READ_BYTES_MAX: u32 = 1 << 20;
/// A slot holds the blocks of the largest read at any offset: one block more than the read.
const SLOT_BYTES: usize = SHARED_READ_BYTES_MAX as usize + 4096;
/// Reads in flight through shared memory at once; further reads wait for a slot.
const SLOT_COUNT: usize = 32;
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
    free_slots: Mutex<Vec<usize>>,
    slots: Semaphore,
}

/// See the module documentation.
pub struct SharedReads {
    attached: Mutex<Option<Arc<Attached>>>,
    last_attempt: Mutex<Option<Instant>>,
    /// Until when reads skip shared memory: the attached node does not lead the volume.
    not_leader_until: Mutex<Option<Instant>>,
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

impl SharedReads {
    pub fn new() -> SharedReads {
        SharedReads {
            attached: Mutex::new(None),
            last_attempt: Mutex::new(None),
            not_leader_until: Mutex::new(None),
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
        let attached = match self.current() {
            Some(attached) => attached,
            None => {
                self.try_attach(client).await;
                self.current().ok_or(Unshared::NotAttached)?
            }
        };
        let _permit = attached
            .slots
            .acquire()
            .await
            .map_err(|_| Unshared::NotAttached)?;
        let slot = SlotLease::take(&attached);
        let request = proto::ReadSharedRequest {
            volume: volume.to_owned(),
            inode,
            offset_bytes,
            length_bytes,
            region_id: attached.region_id,
            slot_offset_bytes: (slot.index * SLOT_BYTES) as u64,
            slot_bytes: SLOT_BYTES as u32,
        };
        let answer = match client.read_shared_at(&attached.endpoint, request).await {
            Ok(answer) => answer,
            Err(error) => {
                if error.code() == Some(ballast_client::Code::FailedPrecondition) {
                    *self
                        .not_leader_until
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                        Some(Instant::now() + Duration::from_millis(NOT_LEADER_BACKOFF_MS));
                }
                if matches!(
                    error.code(),
                    Some(ballast_client::Code::InvalidArgument | ballast_client::Code::Unavailable)
                ) {
                    // The node may have lost the attachment (a restart): attach anew, later.
                    self.forget(&attached);
                }
                return Err(Unshared::Refused(error));
            }
        };
        let start = answer.data_offset_bytes as usize;
        let length = answer.length_bytes as usize;
        if length > length_bytes as usize || start + length > SLOT_BYTES {
            return Err(Unshared::BadAnswer(format!(
                "{length} bytes at {start} of a {SLOT_BYTES}-byte slot for a {length_bytes}-byte read"
            )));
        }
        attached
            .region
            .with_bytes(slot.index * SLOT_BYTES + start, length, use_bytes)
            .ok_or_else(|| Unshared::BadAnswer("outside the region".to_owned()))
    }

    fn current(&self) -> Option<Arc<Attached>> {
        self.attached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn forget(&self, attached: &Arc<Attached>) {
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
    /// process can reach; at most once per [`REATTACH_INTERVAL_MS`].
    pub async fn try_attach(&self, client: &BallastClient) {
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
        let (path, node_id) = match client.status_at(&endpoint).await {
            Ok(status) if !status.local_socket_path.is_empty() => {
                (status.local_socket_path, status.node_id)
            }
            Ok(_) => return,
            Err(error) => {
                tracing::debug!(%error, "no node status; reads go over gRPC");
                return;
            }
        };
        let attached = tokio::task::spawn_blocking(move || attach(&path, endpoint, node_id)).await;
        match attached {
            Ok(Ok(attached)) => {
                tracing::info!(
                    region_bytes = attached.region.len(),
                    "reads go through memory shared with the node"
                );
                *self
                    .attached
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(attached));
            }
            Ok(Err(error)) => {
                // Another host's node, or an older one: reads go over gRPC.
                tracing::info!(%error, "cannot share memory with the node; reads go over gRPC");
            }
            Err(error) => tracing::warn!(%error, "attaching shared memory panicked"),
        }
    }
}

/// Attaches a new region over the socket at `path`, which must belong to node `node_id` (the
/// node at `endpoint`): a socket of the same path on this host may be another node's, when the
/// node at `endpoint` runs on another host.
fn attach(path: &str, endpoint: String, node_id: u64) -> std::io::Result<Attached> {
    let mut stream = UnixStream::connect(path)?;
    let timeout = Some(Duration::from_secs(5));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let region = SharedRegion::create("ballast-reads", SLOT_BYTES * SLOT_COUNT)?;
    let (region_id, attached_node_id) = region.send(&mut stream)?;
    if attached_node_id != node_id {
        return Err(std::io::Error::other(format!(
            "the local socket {path} is node {attached_node_id}'s, not node {node_id}'s"
        )));
    }
    Ok(Attached {
        region,
        region_id,
        endpoint,
        _stream: stream,
        free_slots: Mutex::new((0..SLOT_COUNT).collect()),
        slots: Semaphore::new(SLOT_COUNT),
    })
}

/// A slot taken from the free list (under a semaphore permit), given back on drop.
struct SlotLease<'a> {
    attached: &'a Attached,
    index: usize,
}

impl<'a> SlotLease<'a> {
    fn take(attached: &'a Attached) -> SlotLease<'a> {
        let index = attached
            .free_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop()
            .expect("a semaphore permit guarantees a free slot");
        SlotLease { attached, index }
    }
}

impl Drop for SlotLease<'_> {
    fn drop(&mut self) {
        self.attached
            .free_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self.index);
    }
}
