//! Scrub: background verification of every data block this node holds, and repair of bad blocks
//! from a healthy replica.
//!
//! Owns: the scrub pass (paging through each container's block rows, reading the blocks at a
//! paced rate and verifying them against the CRC-32 in their `BlockRef`), the repair of a bad
//! block (fetching the same logical block from a peer replica with `Cluster.ReadBlock`, the
//! acceptance rule, and the in-place rewrite), the peer side of `ReadBlock`, the repair of blocks
//! a leader's read found bad, and the scrub counters shown by `Status`.
//! Must not depend on: the gRPC services (they call into this module), the client crate.
//!
//! Invariants:
//! - Wrong bytes are never written: a replica's bytes are accepted only when their CRC equals
//!   this node's own `BlockRef` checksum for that block (the same logical version), and the
//!   rewritten block is read back and verified before the repair counts.
//! - A block is rewritten in place only under the apply lock, after re-reading its reference
//!   (see the SAFETY comment in [`rewrite_in_place`]).
//! - A mismatch seen without the lock is only a suspicion (the block may have been rewritten
//!   copy-on-write and its old device block freed and reused meanwhile); it is confirmed under
//!   the apply lock before anything is counted or repaired.
//! - Bounded: one page of [`SCAN_PAGE_ROW_COUNT`] block rows in memory per container, at most
//!   [`READS_IN_FLIGHT_MAX`] device reads of at most [`READ_BLOCKS_PER_REQUEST_MAX`] blocks in
//!   flight, a token-bucket pace, one attempt per replica per bad block per pass, every peer
//!   call under a deadline.
//! - A bad block of a single-replica container cannot be repaired: it is counted unrepairable
//!   and reads of it keep failing with EIO.
//! - A background pass survives restarts: after each verified page it records a [`ScrubCursor`]
//!   (the container and the first block key not yet verified), and the next background pass
//!   goes on from there. The cursor is written without the WAL, so after a crash a pass may
//!   verify a few pages again; it never skips one, because the cursor only moves past pages
//!   already verified. On-demand passes always cover everything and leave the cursor alone.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_device::{AlignedBuffer, BLOCK_SIZE_BYTES};
use ballast_proto::cluster_v1 as cluster_proto;
use ballast_proto::cluster_v1::cluster_client::ClusterClient;

use crate::block_map;
use crate::error::{NodeError, NodeResult};
use crate::keys;
use crate::node::StorageNode;
use crate::records::BlockRef;
use crate::storage::NodeStorage;
use crate::types::{NodeId, METADATA_CONTAINER_ID};

/// Default pace of background passes: a 1 TiB device is scrubbed in about 9 hours, and a pass
/// takes a small share of a device's bandwidth.
pub const SCRUB_RATE_BYTES_PER_SECOND_DEFAULT: u64 = 32 << 20;
/// Default pause between the end of one background pass and the start of the next.
pub const SCRUB_INTERVAL_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// The first background pass starts this long after start-up at most (sooner when the interval
/// is shorter), so a node that restarts daily still gets scrubbed.
const FIRST_PASS_DELAY_MS_MAX: u64 = 5 * 60 * 1000;
/// Block rows read from RocksDB per page (about 40 KiB of keys and references).
const SCAN_PAGE_ROW_COUNT: usize = 1024;
/// Largest device read of a pass (256 KiB).
pub const READ_BLOCKS_PER_REQUEST_MAX: usize = 64;
/// Device reads a pass keeps in flight.
pub const READS_IN_FLIGHT_MAX: usize = 4;
/// Bytes a pass may read at once after being idle (the token bucket's depth).
const PACE_BURST_BYTES: u64 = (READ_BLOCKS_PER_REQUEST_MAX * BLOCK_SIZE_BYTES) as u64;
/// Deadline of one `ReadBlock` call to a peer.
const PEER_READ_TIMEOUT_MS: u64 = 5_000;
/// Blocks a read-triggered repair looks at, at most (a 16 MiB read).
const READ_REPAIR_BLOCK_COUNT_MAX: u64 = 4096;

/// Scrub settings of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrubConfig {
    /// Pace of a pass. Never 0 (the command line refuses it).
    pub rate_bytes_per_second: u64,
    /// Pause between background passes; 0 disables background passes (on-demand passes and
    /// read-triggered repairs still run).
    pub interval_ms: u64,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        Self {
            rate_bytes_per_second: SCRUB_RATE_BYTES_PER_SECOND_DEFAULT,
            interval_ms: SCRUB_INTERVAL_MS_DEFAULT,
        }
    }
}

/// What one pass (or one read-triggered repair) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    pub container_count: u32,
    /// Blocks read whose bytes matched their checksum (repaired blocks not included).
    pub verified_block_count: u64,
    pub verified_bytes: u64,
    /// Blocks confirmed bad under the apply lock (mismatch or device read error).
    pub error_count: u64,
    pub repaired_block_count: u64,
    pub unrepairable_block_count: u64,
    /// Blocks changed or freed while the pass looked at them.
    pub skipped_block_count: u64,
    /// The pass went on from a cursor left by an earlier, interrupted pass.
    pub resumed: bool,
    pub started_ns: i64,
    pub finished_ns: i64,
}

impl PassReport {
    fn add_outcome(&mut self, outcome: BlockOutcome) {
        match outcome {
            BlockOutcome::Verified => {
                self.verified_block_count += 1;
                self.verified_bytes += BLOCK_SIZE_BYTES as u64;
            }
            BlockOutcome::Skipped => self.skipped_block_count += 1,
            BlockOutcome::Repaired => {
                self.error_count += 1;
                self.repaired_block_count += 1;
            }
            BlockOutcome::Unrepairable => {
                self.error_count += 1;
                self.unrepairable_block_count += 1;
            }
        }
    }
}

/// Where an interrupted background pass goes on (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScrubCursor {
    /// The container being scrubbed.
    pub container_id: u64,
    /// The first block row key of that container not yet verified.
    pub next_key: Vec<u8>,
    /// When the pass began, before any restart.
    pub started_ns: i64,
}

/// The stored cursor, if any. A cursor that does not decode, or whose key lies outside its
/// container's block rows, is dropped with a warning: the pass then starts over, which costs
/// time but never skips a block.
pub fn load_cursor(storage: &NodeStorage) -> Option<ScrubCursor> {
    let cursor = match storage
        .state
        .get::<ScrubCursor>(&keys::scrub_cursor(), "scrub cursor")
    {
        Ok(cursor) => cursor?,
        Err(error) => {
            tracing::warn!(%error, "ignoring an unreadable scrub cursor; the pass starts over");
            return None;
        }
    };
    let (start, end) = keys::container_range(keys::TAG_BLOCK, cursor.container_id);
    if cursor.next_key < start || cursor.next_key >= end {
        tracing::warn!(
            ?cursor,
            "ignoring a scrub cursor outside its container; the pass starts over"
        );
        return None;
    }
    Some(cursor)
}

fn save_cursor(storage: &NodeStorage, cursor: &ScrubCursor) -> NodeResult<()> {
    let mut batch = rocksdb::WriteBatch::default();
    batch.put(keys::scrub_cursor(), crate::records::encode(cursor));
    storage.state.write_unlogged(batch)
}

fn clear_cursor(storage: &NodeStorage) -> NodeResult<()> {
    let mut batch = rocksdb::WriteBatch::default();
    batch.delete(keys::scrub_cursor());
    storage.state.write_unlogged(batch)
}

/// The containers a pass visits, in id order, each with the key it starts at (`None`: the
/// container's first block row). With a cursor, containers before the cursor's are skipped (a
/// container created since then waits for the next pass); if the cursor's container is gone, the
/// pass goes on with the next one.
pub fn pass_plan(
    container_ids: &[u64],
    cursor: Option<&ScrubCursor>,
) -> Vec<(u64, Option<Vec<u8>>)> {
    let mut sorted = container_ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
        .into_iter()
        .filter(|&id| cursor.is_none_or(|cursor| id >= cursor.container_id))
        .map(|id| match cursor {
            Some(cursor) if cursor.container_id == id => (id, Some(cursor.next_key.clone())),
            _ => (id, None),
        })
        .collect()
}

/// Counters since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubTotals {
    pub pass_count: u64,
    pub verified_block_count: u64,
    pub error_count: u64,
    pub repaired_block_count: u64,
    pub unrepairable_block_count: u64,
    pub last_pass_finished_ns: i64,
    pub last_pass: PassReport,
    pub running: bool,
}

/// The node's scrubber: its settings, counters, and the lock that keeps passes one at a time.
#[derive(Debug)]
pub struct Scrubber {
    config: ScrubConfig,
    /// One pass at a time: an on-demand pass waits for a background pass to finish.
    pass_lock: tokio::sync::Mutex<()>,
    /// One read-triggered repair at a time: concurrent reads of one bad block wait, then find it
    /// repaired instead of fetching it again.
    read_repair_lock: tokio::sync::Mutex<()>,
    running: AtomicBool,
    totals: Mutex<ScrubTotals>,
}

impl Scrubber {
    pub fn new(config: ScrubConfig) -> Self {
        Self {
            config,
            pass_lock: tokio::sync::Mutex::new(()),
            read_repair_lock: tokio::sync::Mutex::new(()),
            running: AtomicBool::new(false),
            totals: Mutex::new(ScrubTotals::default()),
        }
    }

    pub fn config(&self) -> ScrubConfig {
        self.config
    }

    pub fn totals(&self) -> ScrubTotals {
        let mut totals = *self.totals.lock().expect("scrub totals lock");
        totals.running = self.running.load(Ordering::Relaxed);
        totals
    }

    fn record(&self, report: &PassReport, completed_pass: bool) {
        let mut totals = self.totals.lock().expect("scrub totals lock");
        totals.verified_block_count += report.verified_block_count;
        totals.error_count += report.error_count;
        totals.repaired_block_count += report.repaired_block_count;
        totals.unrepairable_block_count += report.unrepairable_block_count;
        if completed_pass {
            totals.pass_count += 1;
            totals.last_pass_finished_ns = report.finished_ns;
            totals.last_pass = *report;
        }
    }
}

/// A token bucket: a pass may read `rate_bytes_per_second` on average, and at most
/// `burst_bytes` at once after being idle. Pure (the caller passes the time), so it is tested
/// without sleeping.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate_bytes_per_second: u64,
    burst_bytes: u64,
    /// Bytes that may be read now; negative when reads ran ahead (a debt to wait off).
    available_bytes: f64,
    refilled_at: Instant,
}

impl Pacer {
    pub fn new(rate_bytes_per_second: u64, burst_bytes: u64, now: Instant) -> Self {
        Self {
            rate_bytes_per_second: rate_bytes_per_second.max(1),
            burst_bytes,
            available_bytes: burst_bytes as f64,
            refilled_at: now,
        }
    }

    /// Takes `bytes` from the bucket at `now` and returns how long the caller must wait before
    /// reading them.
    pub fn reserve(&mut self, bytes: u64, now: Instant) -> Duration {
        let elapsed_seconds = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.refilled_at = self.refilled_at.max(now);
        self.available_bytes = (self.available_bytes
            + elapsed_seconds * self.rate_bytes_per_second as f64)
            .min(self.burst_bytes as f64);
        self.available_bytes -= bytes as f64;
        if self.available_bytes >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.available_bytes / self.rate_bytes_per_second as f64)
        }
    }

    async fn pace(&mut self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// What a replica answered for one block, judged against this node's own reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaVerdict {
    /// Same logical version, intact: may be written over the bad block.
    Accept,
    /// The replica has no block there (a hole or another version of the file).
    Absent,
    /// The replica's block has another checksum: another version of the block (it is ahead of
    /// or behind this node). Try the next replica, or a later pass.
    OtherVersion { replica_checksum: u32 },
    /// The bytes do not match the checksum the replica sent, or are not one block: damaged on
    /// the way or at the replica.
    Damaged,
}

/// The repair acceptance rule: bytes from a replica replace a bad block only if they are one
/// whole block, they match the checksum the replica records, and that checksum is this node's
/// own (`expected_checksum`, from this node's `BlockRef`), so the block is the same version.
pub fn judge_replica_block(
    expected_checksum: u32,
    response: &cluster_proto::ReadBlockResponse,
) -> ReplicaVerdict {
    if !response.present {
        return ReplicaVerdict::Absent;
    }
    if response.data.len() != BLOCK_SIZE_BYTES
        || ballast_common::checksum(&response.data) != response.checksum
    {
        return ReplicaVerdict::Damaged;
    }
    if response.checksum != expected_checksum {
        return ReplicaVerdict::OtherVersion {
            replica_checksum: response.checksum,
        };
    }
    ReplicaVerdict::Accept
}

/// What became of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockOutcome {
    Verified,
    Skipped,
    Repaired,
    Unrepairable,
}

/// A block row as the scan saw it.
#[derive(Debug, Clone)]
struct ScannedBlock {
    key: Vec<u8>,
    reference: BlockRef,
}

impl ScannedBlock {
    /// The block at logical key `key` as a block to verify; `None` for an unwritten
    /// reference, which has no device block to verify or repair.
    fn from_reference(key: Vec<u8>, reference: BlockRef) -> Option<ScannedBlock> {
        (!reference.is_unwritten()).then_some(ScannedBlock { key, reference })
    }

    fn inode(&self) -> u64 {
        u64::from_be_bytes(self.key[9..17].try_into().expect("block key is 25 bytes"))
    }

    fn file_block(&self) -> u64 {
        keys::block_key_file_block(&self.key)
    }
}

/// What a re-check under the apply lock found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmation {
    /// The reference changed or is gone: the bytes seen belonged to a freed block.
    Stale,
    /// The block reads back intact now.
    Intact,
    /// Still referenced, still bad.
    Bad,
}

/// Re-checks a suspicious block under the apply lock: no apply, free or checkpoint runs while it
/// is held, so the reference read here is current and its device block is not reused.
async fn confirm_bad(storage: &NodeStorage, block: &ScannedBlock) -> NodeResult<Confirmation> {
    let _applies_paused = storage.pause_applies().await;
    let current = block_map::reference_at(&storage.state, &block.key)?;
    if current != Some(block.reference) {
        return Ok(Confirmation::Stale);
    }
    // A block an apply has just written may still be in flight (`pending_writes.rs`).
    storage
        .pending_writes
        .wait_for(block.reference.device_block, 1)
        .await;
    match storage
        .block_store
        .read_blocks(block.reference.device_block, 1)
        .await
    {
        Ok(bytes) if ballast_common::checksum(&bytes) == block.reference.checksum => {
            Ok(Confirmation::Intact)
        }
        Ok(bytes) => {
            tracing::error!(
                device_block = block.reference.device_block,
                inode = block.inode(),
                file_block = block.file_block(),
                expected = block.reference.checksum,
                actual = ballast_common::checksum(&bytes),
                "scrub: checksum mismatch: data on the device is corrupt"
            );
            Ok(Confirmation::Bad)
        }
        Err(error) => {
            tracing::error!(
                device_block = block.reference.device_block,
                inode = block.inode(),
                file_block = block.file_block(),
                %error,
                "scrub: device read error"
            );
            Ok(Confirmation::Bad)
        }
    }
}

/// Result of an in-place rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rewrite {
    Done,
    /// The reference changed meanwhile: nothing was written.
    Stale,
}

/// Writes `data` (already accepted: its CRC is `block.reference.checksum`) over the bad device
/// block, reads it back and verifies it, then flushes the device.
async fn rewrite_in_place(
    storage: &NodeStorage,
    block: &ScannedBlock,
    data: &[u8],
) -> NodeResult<Rewrite> {
    debug_assert_eq!(ballast_common::checksum(data), block.reference.checksum);
    {
        let _applies_paused = storage.pause_applies().await;
        let current = block_map::reference_at(&storage.state, &block.key)?;
        if current != Some(block.reference) {
            return Ok(Rewrite::Stale);
        }
        // SAFETY (of overwriting a block, which copy-on-write otherwise never does):
        // - We hold the apply lock. Blocks are freed only by `commit_batch` and become reusable
        //   only at a checkpoint's `release_deferred`, and both take this lock. The reference we
        //   just re-read is the committed state, and it still names this device block, so the
        //   block is allocated, not pending a free, and cannot be handed to anyone until we
        //   release the lock.
        // - Nothing else writes an allocated, referenced block: applies and snapshot imports
        //   write only blocks they have just allocated, before referencing them.
        // - The bytes have exactly the CRC the reference (and the durable state, and every
        //   replica at this version) records for this block, so we restore the content that
        //   was written here, not a new one. A concurrent reader sees the old bad bytes (and
        //   fails with EIO, as before), the repaired bytes, or a torn mix that fails the CRC:
        //   never wrong bytes. A crash mid-write leaves a block that fails its CRC, as before.
        // - Log replay after a crash never depends on this block's old bytes: it only writes
        //   new blocks (copy-on-write) and reads blocks through their CRC.
        storage
            .block_store
            .write_blocks(
                block.reference.device_block,
                AlignedBuffer::from_slice_padded(data),
            )
            .await
            .map_err(|source| NodeError::device("scrub: rewrite repaired block", source))?;
        let back = storage
            .block_store
            .read_blocks(block.reference.device_block, 1)
            .await
            .map_err(|source| NodeError::device("scrub: read back repaired block", source))?;
        if ballast_common::checksum(&back) != block.reference.checksum {
            return Err(NodeError::ChecksumMismatch(format!(
                "scrub: device block {} still fails its checksum after the rewrite",
                block.reference.device_block
            )));
        }
    }
    // Durable now rather than at the next checkpoint; outside the lock, so applies go on.
    storage
        .block_store
        .flush()
        .await
        .map_err(|source| NodeError::device("scrub: flush after repair", source))?;
    Ok(Rewrite::Done)
}

/// The other members of a container's Raft group (voters and learners), the leader first: the
/// replicas a bad block can be fetched from.
async fn replica_peers(node: &StorageNode, container_id: u64) -> Vec<(NodeId, String)> {
    let Some(raft) = node.raft(container_id).await else {
        return Vec::new();
    };
    let metrics = raft.metrics().borrow().clone();
    let mut peers: Vec<(NodeId, String)> = metrics
        .membership_config
        .membership()
        .nodes()
        .filter(|(id, _)| **id != node.node_id())
        .map(|(id, member)| (*id, member.addr.clone()))
        .collect();
    peers.sort_by_key(|(id, _)| (Some(*id) != metrics.current_leader, *id));
    peers
}

/// Asks `peer` for its copy of one block (bounded by [`PEER_READ_TIMEOUT_MS`]).
async fn fetch_from_peer(
    node: &StorageNode,
    peer: NodeId,
    address: &str,
    container_id: u64,
    block: &ScannedBlock,
) -> NodeResult<cluster_proto::ReadBlockResponse> {
    let peer_error = |message: String| NodeError::Peer {
        node_id: peer,
        message,
    };
    let channel = node
        .peers
        .channel(address)
        .map_err(|error| peer_error(format!("bad address {address:?}: {error}")))?;
    let mut client = ClusterClient::new(channel);
    let deadline = Duration::from_millis(PEER_READ_TIMEOUT_MS);
    let mut request = tonic::Request::new(cluster_proto::ReadBlockRequest {
        container_id,
        inode: block.inode(),
        block_index: block.file_block(),
    });
    request.set_timeout(deadline);
    match tokio::time::timeout(deadline, client.read_block(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(peer_error(format!("ReadBlock: {status}"))),
        Err(_) => Err(peer_error(format!(
            "ReadBlock: no answer within {PEER_READ_TIMEOUT_MS} ms"
        ))),
    }
}

/// Repairs a confirmed bad block from the first replica that has the same version intact.
async fn repair(node: &StorageNode, container_id: u64, block: &ScannedBlock) -> BlockOutcome {
    let peers = replica_peers(node, container_id).await;
    if peers.is_empty() {
        tracing::error!(
            container = container_id,
            inode = block.inode(),
            file_block = block.file_block(),
            device_block = block.reference.device_block,
            "scrub: bad block of a container with no other replica: unrepairable; reads of it \
             fail with EIO"
        );
        return BlockOutcome::Unrepairable;
    }
    for (peer, address) in &peers {
        let response = match fetch_from_peer(node, *peer, address, container_id, block).await {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(container = container_id, %error, "scrub: replica could not help");
                continue;
            }
        };
        match judge_replica_block(block.reference.checksum, &response) {
            ReplicaVerdict::Accept => {}
            verdict => {
                tracing::warn!(
                    container = container_id,
                    peer,
                    ?verdict,
                    peer_applied_index = response.applied_index,
                    "scrub: replica's block refused; trying the next replica"
                );
                continue;
            }
        }
        match rewrite_in_place(&node.storage, block, &response.data).await {
            Ok(Rewrite::Done) => {
                tracing::warn!(
                    container = container_id,
                    inode = block.inode(),
                    file_block = block.file_block(),
                    device_block = block.reference.device_block,
                    peer,
                    "scrub: bad block repaired from a replica"
                );
                return BlockOutcome::Repaired;
            }
            Ok(Rewrite::Stale) => return BlockOutcome::Skipped,
            Err(error) => {
                // The device itself fails at this block: another replica's bytes will not help.
                tracing::error!(container = container_id, %error, "scrub: repair failed");
                return BlockOutcome::Unrepairable;
            }
        }
    }
    tracing::error!(
        container = container_id,
        inode = block.inode(),
        file_block = block.file_block(),
        replicas = peers.len(),
        "scrub: no replica had this version of the block intact; retried on the next pass"
    );
    BlockOutcome::Unrepairable
}

/// Confirms a suspicious block and repairs it when it is really bad.
async fn handle_suspect(
    node: &StorageNode,
    container_id: u64,
    block: &ScannedBlock,
) -> BlockOutcome {
    match confirm_bad(&node.storage, block).await {
        Ok(Confirmation::Stale) => BlockOutcome::Skipped,
        Ok(Confirmation::Intact) => BlockOutcome::Verified,
        Ok(Confirmation::Bad) => repair(node, container_id, block).await,
        Err(error) => {
            tracing::warn!(container = container_id, %error, "scrub: could not re-check a block");
            BlockOutcome::Skipped
        }
    }
}

/// Groups a page of block rows into runs of consecutive device blocks, each one device read.
fn device_runs(page: &[ScannedBlock]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < page.len() {
        let mut end = start + 1;
        while end < page.len()
            && end - start < READ_BLOCKS_PER_REQUEST_MAX
            && page[end].reference.device_block
                == page[start].reference.device_block + (end - start) as u64
        {
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// Reads and verifies one page of blocks: up to [`READS_IN_FLIGHT_MAX`] runs in flight, each
/// paced. Returns the blocks that looked bad.
async fn verify_page(
    storage: &Arc<NodeStorage>,
    page: &[ScannedBlock],
    pacer: &mut Pacer,
    report: &mut PassReport,
) -> Vec<ScannedBlock> {
    let mut suspects = Vec::new();
    let mut pending: VecDeque<std::ops::Range<usize>> = device_runs(page).into();
    let mut reads = tokio::task::JoinSet::new();
    loop {
        while reads.len() < READS_IN_FLIGHT_MAX {
            let Some(run) = pending.pop_front() else {
                break;
            };
            pacer.pace((run.len() * BLOCK_SIZE_BYTES) as u64).await;
            let block_store = storage.block_store.clone();
            let first_block = page[run.start].reference.device_block;
            let block_count = run.len() as u32;
            storage
                .pending_writes
                .wait_for(first_block, u64::from(block_count))
                .await;
            reads.spawn(
                async move { (run, block_store.read_blocks(first_block, block_count).await) },
            );
        }
        let Some(joined) = reads.join_next().await else {
            break;
        };
        let Ok((run, result)) = joined else {
            // A read task cannot panic short of a bug; its blocks are simply not verified.
            continue;
        };
        match result {
            Ok(bytes) => {
                for (offset, index) in run.enumerate() {
                    let block = &bytes[offset * BLOCK_SIZE_BYTES..(offset + 1) * BLOCK_SIZE_BYTES];
                    if ballast_common::checksum(block) == page[index].reference.checksum {
                        report.add_outcome(BlockOutcome::Verified);
                    } else {
                        suspects.push(page[index].clone());
                    }
                }
            }
            // A failed run read: every block of it is re-checked on its own, which isolates the
            // unreadable ones.
            Err(error) => {
                tracing::warn!(%error, "scrub: device read failed; checking the blocks one by one");
                suspects.extend(page[run].iter().cloned());
            }
        }
    }
    suspects
}

/// Scrubs one container: every block row, page by page.
/// `start_key`: where to begin (a resumed pass), `None` for the first row. `cursor`: the pass's
/// start time, when this pass records its progress (background passes).
async fn scrub_container(
    node: &StorageNode,
    container_id: u64,
    start_key: Option<Vec<u8>>,
    cursor: Option<i64>,
    pacer: &mut Pacer,
    report: &mut PassReport,
) -> NodeResult<()> {
    let storage = &node.storage;
    let (first, end) = keys::container_range(keys::TAG_BLOCK, container_id);
    let mut start = start_key.unwrap_or(first);
    loop {
        let Some(BlockPage { blocks: page, next }) =
            scan_block_page(storage, container_id, &start)?
        else {
            return Ok(());
        };
        start = next.clone().unwrap_or_else(|| end.clone());
        let suspects = verify_page(storage, &page, pacer, report).await;
        for block in &suspects {
            report.add_outcome(handle_suspect(node, container_id, block).await);
        }
        if let Some(started_ns) = cursor {
            save_cursor(
                storage,
                &ScrubCursor {
                    container_id,
                    next_key: start.clone(),
                    started_ns,
                },
            )?;
        }
        if next.is_none() {
            return Ok(());
        }
    }
}

/// One page of a container's block rows.
struct BlockPage {
    /// The written blocks among them (unwritten ones have nothing to verify).
    blocks: Vec<ScannedBlock>,
    /// Where the next page starts; `None` when this page reached the end of the range.
    next: Option<Vec<u8>>,
}

/// Reads up to [`SCAN_PAGE_ROW_COUNT`] block references of `container_id` from the logical
/// key `start` on (`block_map::page`); `None` when there are none. The page is full by
/// references, not by written blocks, so a long run of unwritten blocks neither ends the scan
/// early nor grows a page.
fn scan_block_page(
    storage: &NodeStorage,
    container_id: u64,
    start: &[u8],
) -> NodeResult<Option<BlockPage>> {
    let page = block_map::page(&storage.state, container_id, start, SCAN_PAGE_ROW_COUNT)?;
    let Some((key_last, _)) = page.last() else {
        return Ok(None);
    };
    // The next page starts just after the last key seen.
    let mut next = key_last.clone();
    next.push(0);
    let full = page.len() == SCAN_PAGE_ROW_COUNT;
    let blocks = page
        .into_iter()
        .filter_map(|(key, reference)| ScannedBlock::from_reference(key, reference))
        .collect();
    Ok(Some(BlockPage {
        blocks,
        next: full.then_some(next),
    }))
}

/// Holds `running` up while a pass runs, and lowers it however the pass ends (even when its
/// future is dropped).
struct RunningFlag<'flag>(&'flag AtomicBool);

impl<'flag> RunningFlag<'flag> {
    fn raise(flag: &'flag AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }
}

impl Drop for RunningFlag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// How a pass treats the stored [`ScrubCursor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// Background: go on from the cursor, record progress, clear the cursor at the end.
    Background,
    /// On demand: cover everything, leave the cursor alone.
    OnDemand,
}

/// Runs one pass over every container this node holds, after any pass in progress.
/// `rate_bytes_per_second` 0 uses the node's configured pace.
pub async fn run_pass(
    node: &StorageNode,
    rate_bytes_per_second: u64,
    kind: PassKind,
) -> NodeResult<PassReport> {
    let scrubber = node.scrubber();
    let _one_pass = scrubber.pass_lock.lock().await;
    let _running = RunningFlag::raise(&scrubber.running);
    let rate = match rate_bytes_per_second {
        0 => scrubber.config.rate_bytes_per_second,
        rate => rate,
    };
    let mut pacer = Pacer::new(rate, PACE_BURST_BYTES, Instant::now());
    let cursor = match kind {
        PassKind::Background => load_cursor(&node.storage),
        PassKind::OnDemand => None,
    };
    if let Some(cursor) = &cursor {
        tracing::info!(
            container = cursor.container_id,
            "scrub pass goes on where the previous one stopped"
        );
    }
    let started_ns = cursor
        .as_ref()
        .map_or_else(|| node.now_ns(), |cursor| cursor.started_ns);
    let mut report = PassReport {
        started_ns,
        resumed: cursor.is_some(),
        ..PassReport::default()
    };
    let recorded = (kind == PassKind::Background).then_some(started_ns);
    let container_ids: Vec<u64> = node
        .container_rafts()
        .await
        .into_iter()
        .map(|(id, _)| id)
        // The cluster map has rows only; RocksDB checksums those.
        .filter(|&id| id != METADATA_CONTAINER_ID)
        .collect();
    let mut result = Ok(());
    for (container_id, start_key) in pass_plan(&container_ids, cursor.as_ref()) {
        report.container_count += 1;
        if let Err(error) = scrub_container(
            node,
            container_id,
            start_key,
            recorded,
            &mut pacer,
            &mut report,
        )
        .await
        {
            tracing::warn!(container = container_id, %error, "scrub of a container stopped");
            result = Err(error);
        }
    }
    if result.is_ok() && kind == PassKind::Background {
        result = clear_cursor(&node.storage);
    }
    report.finished_ns = node.now_ns();
    scrubber.record(&report, result.is_ok());
    tracing::info!(?report, "scrub pass finished");
    result.map(|()| report)
}

/// Background passes, one every `interval_ms` (none when it is 0).
pub async fn scrub_loop(node: Arc<StorageNode>) {
    let interval_ms = node.scrubber().config.interval_ms;
    if interval_ms == 0 {
        return;
    }
    tokio::time::sleep(Duration::from_millis(
        interval_ms.min(FIRST_PASS_DELAY_MS_MAX),
    ))
    .await;
    loop {
        if let Err(error) = run_pass(&node, 0, PassKind::Background).await {
            tracing::warn!(%error, "scrub pass incomplete; the next pass goes on from its cursor");
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
}

/// Checks the blocks `first_file_block..=last_file_block` of one file and repairs the bad ones;
/// called by the leader when a read met a bad block, so the read can be served after all.
/// Returns how many blocks it repaired. Unpaced, but bounded to
/// [`READ_REPAIR_BLOCK_COUNT_MAX`] blocks and serialised with other read-triggered repairs.
pub async fn repair_read_range(
    node: &StorageNode,
    container_id: u64,
    inode: u64,
    first_file_block: u64,
    last_file_block: u64,
) -> NodeResult<u64> {
    if replica_peers(node, container_id).await.is_empty() {
        // A single replica: nothing to repair from, so every read of a bad block would only
        // re-read the range for nothing. Scrub passes count such blocks.
        return Ok(0);
    }
    let scrubber = node.scrubber();
    let _one_repair = scrubber.read_repair_lock.lock().await;
    let last_file_block =
        last_file_block.min(first_file_block.saturating_add(READ_REPAIR_BLOCK_COUNT_MAX - 1));
    // At most READ_REPAIR_BLOCK_COUNT_MAX references: the range was cut to that many blocks.
    let page: Vec<ScannedBlock> = block_map::references(
        &node.storage.state,
        container_id,
        inode,
        first_file_block,
        last_file_block,
    )?
    .into_iter()
    .filter_map(|(file_block, reference)| {
        ScannedBlock::from_reference(keys::block(container_id, inode, file_block), reference)
    })
    .collect();
    let mut report = PassReport::default();
    for block in &page {
        node.storage
            .pending_writes
            .wait_for(block.reference.device_block, 1)
            .await;
        let intact = match node
            .storage
            .block_store
            .read_blocks(block.reference.device_block, 1)
            .await
        {
            Ok(bytes) => ballast_common::checksum(&bytes) == block.reference.checksum,
            Err(_) => false,
        };
        if !intact {
            match handle_suspect(node, container_id, block).await {
                // Read-triggered checks count only what they found bad.
                BlockOutcome::Verified | BlockOutcome::Skipped => {}
                outcome => report.add_outcome(outcome),
            }
        }
    }
    scrubber.record(&report, false);
    Ok(report.repaired_block_count)
}

/// The peer side of `Cluster.ReadBlock`: this node's own copy of one block, verified. A block
/// this node finds bad is refused (`ChecksumMismatch`), never sent.
pub async fn serve_block(
    node: &StorageNode,
    request: &cluster_proto::ReadBlockRequest,
) -> NodeResult<cluster_proto::ReadBlockResponse> {
    let container_id = request.container_id;
    let Some(raft) = node.raft(container_id).await else {
        return Err(NodeError::UnknownContainer { container_id });
    };
    if container_id == METADATA_CONTAINER_ID {
        return Err(NodeError::InvalidState(
            "the metadata container has no data blocks".into(),
        ));
    }
    let applied_index = raft
        .metrics()
        .borrow()
        .last_applied
        .map(|log_id| log_id.index)
        .unwrap_or(0);
    let key = keys::block(container_id, request.inode, request.block_index);
    let Some(reference) = block_map::reference_at(&node.storage.state, &key)? else {
        return Ok(cluster_proto::ReadBlockResponse {
            present: false,
            checksum: 0,
            data: Default::default(),
            applied_index,
        });
    };
    if reference.is_unwritten() {
        // Zeros with the zero block's CRC: what this replica's file holds there.
        return Ok(cluster_proto::ReadBlockResponse {
            present: true,
            checksum: reference.checksum,
            data: vec![0u8; BLOCK_SIZE_BYTES],
            applied_index,
        });
    }
    node.storage
        .pending_writes
        .wait_for(reference.device_block, 1)
        .await;
    let read = node
        .storage
        .block_store
        .read_blocks(reference.device_block, 1)
        .await;
    let data = match read {
        Ok(bytes) if ballast_common::checksum(&bytes) == reference.checksum => bytes.to_vec(),
        _ => {
            // Either bad here too, or rewritten meanwhile: decide under the apply lock.
            let block = ScannedBlock { key, reference };
            let storage = &node.storage;
            let _applies_paused = storage.pause_applies().await;
            match block_map::reference_at(&storage.state, &block.key)? {
                Some(current) => {
                    // The verified read (an unwritten reference reads as zeros).
                    let bytes = match storage.read_verified(&[current], "ReadBlock").await {
                        Ok(bytes) => bytes,
                        Err(NodeError::ChecksumMismatch(message)) => {
                            return Err(NodeError::ChecksumMismatch(format!(
                                "container {container_id} inode {} block {}: this replica's \
                                 copy is bad too ({message})",
                                request.inode, request.block_index
                            )))
                        }
                        Err(other) => return Err(other),
                    };
                    return Ok(cluster_proto::ReadBlockResponse {
                        present: true,
                        checksum: current.checksum,
                        data: bytes,
                        applied_index,
                    });
                }
                None => {
                    return Ok(cluster_proto::ReadBlockResponse {
                        present: false,
                        checksum: 0,
                        data: Default::default(),
                        applied_index,
                    })
                }
            }
        }
    };
    Ok(cluster_proto::ReadBlockResponse {
        present: true,
        checksum: reference.checksum,
        data,
        applied_index,
    })
}

impl From<PassReport> for ballast_proto::v1::ScrubPass {
    fn from(report: PassReport) -> Self {
        Self {
            container_count: report.container_count,
            verified_block_count: report.verified_block_count,
            verified_bytes: report.verified_bytes,
            error_count: report.error_count,
            repaired_block_count: report.repaired_block_count,
            unrepairable_block_count: report.unrepairable_block_count,
            skipped_block_count: report.skipped_block_count,
            started_ns: report.started_ns,
            finished_ns: report.finished_ns,
        }
    }
}

/// The `Status` view of the scrubber.
pub fn status_message(scrubber: &Scrubber) -> ballast_proto::v1::ScrubStatus {
    let totals = scrubber.totals();
    let config = scrubber.config();
    ballast_proto::v1::ScrubStatus {
        pass_count: totals.pass_count,
        verified_block_count: totals.verified_block_count,
        error_count: totals.error_count,
        repaired_block_count: totals.repaired_block_count,
        unrepairable_block_count: totals.unrepairable_block_count,
        last_pass_finished_ns: totals.last_pass_finished_ns,
        last_pass: Some(totals.last_pass.into()),
        running: totals.running,
        rate_bytes_per_second: config.rate_bytes_per_second,
        interval_ms: config.interval_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(present: bool, checksum: u32, data: Vec<u8>) -> cluster_proto::ReadBlockResponse {
        cluster_proto::ReadBlockResponse {
            present,
            checksum,
            data,
            applied_index: 7,
        }
    }

    #[test]
    fn replica_bytes_are_accepted_only_at_the_same_version_and_intact() {
        let good = vec![0x5a; BLOCK_SIZE_BYTES];
        let good_checksum = ballast_common::checksum(&good);
        let newer = vec![0x3c; BLOCK_SIZE_BYTES];
        let newer_checksum = ballast_common::checksum(&newer);

        assert_eq!(
            judge_replica_block(good_checksum, &response(true, good_checksum, good.clone())),
            ReplicaVerdict::Accept
        );
        // Another version at the replica, intact there: not ours to copy.
        assert_eq!(
            judge_replica_block(good_checksum, &response(true, newer_checksum, newer)),
            ReplicaVerdict::OtherVersion {
                replica_checksum: newer_checksum
            }
        );
        // Bytes that do not match the checksum sent with them, even if the checksum is ours.
        let mut flipped = good.clone();
        flipped[100] ^= 1;
        assert_eq!(
            judge_replica_block(good_checksum, &response(true, good_checksum, flipped)),
            ReplicaVerdict::Damaged
        );
        // Not one whole block.
        assert_eq!(
            judge_replica_block(
                good_checksum,
                &response(
                    true,
                    ballast_common::checksum(&good[..100]),
                    good[..100].to_vec()
                )
            ),
            ReplicaVerdict::Damaged
        );
        // A hole at the replica.
        assert_eq!(
            judge_replica_block(good_checksum, &response(false, 0, Vec::new())),
            ReplicaVerdict::Absent
        );
        // "Absent" wins even if stray bytes came along.
        assert_eq!(
            judge_replica_block(good_checksum, &response(false, good_checksum, good)),
            ReplicaVerdict::Absent
        );
    }

    #[test]
    fn pacer_holds_the_average_rate() {
        let start = Instant::now();
        let rate = 1 << 20; // 1 MiB/s
        let burst = 256 << 10;
        let mut pacer = Pacer::new(rate, burst, start);
        // Read 4 MiB in 256 KiB pieces, sleeping (in simulated time) as told.
        let mut now = start;
        for _ in 0..16 {
            now += pacer.reserve(256 << 10, now);
        }
        let elapsed = (now - start).as_secs_f64();
        // The first 256 KiB ride on the burst; the other 3.75 MiB take 3.75 s at 1 MiB/s.
        assert!((elapsed - 3.75).abs() < 0.01, "elapsed {elapsed} s");
    }

    #[test]
    fn pacer_does_not_save_up_more_than_its_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(1 << 20, 256 << 10, start);
        // Idle for an hour: the bucket is full at 256 KiB, not at 3.6 GiB.
        let later = start + Duration::from_secs(3600);
        assert_eq!(pacer.reserve(256 << 10, later), Duration::ZERO);
        let wait = pacer.reserve(512 << 10, later);
        assert!(
            (wait.as_secs_f64() - 0.5).abs() < 0.001,
            "512 KiB beyond the burst waits 0.5 s, not {wait:?}"
        );
    }

    #[test]
    fn runs_follow_consecutive_device_blocks_up_to_the_request_limit() {
        let block = |device_block: u64| ScannedBlock {
            key: keys::block(5, 9, device_block),
            reference: BlockRef {
                device_block,
                checksum: 0,
            },
        };
        let mut page: Vec<ScannedBlock> = [10, 11, 12, 40, 41, 13].into_iter().map(block).collect();
        assert_eq!(device_runs(&page), vec![0..3, 3..5, 5..6]);
        page = (0..(READ_BLOCKS_PER_REQUEST_MAX as u64 + 3))
            .map(block)
            .collect();
        assert_eq!(
            device_runs(&page),
            vec![
                0..READ_BLOCKS_PER_REQUEST_MAX,
                READ_BLOCKS_PER_REQUEST_MAX..READ_BLOCKS_PER_REQUEST_MAX + 3
            ]
        );
        assert!(device_runs(&[]).is_empty());
    }

    /// A file of one block with `fill` bytes in a fresh container; returns the storage, the
    /// block as the scan sees it, and the bytes.
    async fn one_block_file(fill: u8) -> (crate::test_support::TestStorage, ScannedBlock, Vec<u8>) {
        use crate::command::FilesystemCommand;
        let container_id = 3;
        let mut storage = crate::test_support::TestStorage::initialized(container_id, 0).await;
        let inode = storage.create_file(container_id, "f").await;
        let data = vec![fill; BLOCK_SIZE_BYTES];
        storage
            .apply(
                container_id,
                FilesystemCommand::Write {
                    inode,
                    offset_bytes: 0,
                    data: bytes::Bytes::copy_from_slice(&data),
                    now_ns: 3,
                    prewritten: Default::default(),
                },
            )
            .await
            .unwrap();
        let key = keys::block(container_id, inode, 0);
        let reference = block_map::reference_at(&storage.storage.state, &key)
            .unwrap()
            .unwrap();
        (storage, ScannedBlock { key, reference }, data)
    }

    /// Unwritten rows are skipped, yet count toward a full page: the scan goes past a long run
    /// of them to the written blocks behind it.
    #[tokio::test]
    async fn the_scan_skips_unwritten_rows_and_goes_on_past_them() {
        use crate::command::FilesystemCommand;
        let container_id = 3;
        let mut storage = crate::test_support::TestStorage::initialized(container_id, 0).await;
        let inode = storage.create_file(container_id, "f").await;
        let unwritten_count = 3 * SCAN_PAGE_ROW_COUNT as u64 + 7;
        let commands = [
            FilesystemCommand::Fallocate {
                inode,
                offset_bytes: 0,
                length_bytes: unwritten_count * BLOCK_SIZE_BYTES as u64,
                mode: 0,
                now_ns: 2,
            },
            FilesystemCommand::Write {
                inode,
                offset_bytes: unwritten_count * BLOCK_SIZE_BYTES as u64,
                data: bytes::Bytes::from(vec![6u8; 2 * BLOCK_SIZE_BYTES]),
                now_ns: 3,
                prewritten: Default::default(),
            },
        ];
        for command in commands {
            storage.apply(container_id, command).await.unwrap();
        }
        let (mut start, _) = keys::container_range(keys::TAG_BLOCK, container_id);
        let mut found = Vec::new();
        let mut page_count = 0;
        while let Some(page) = scan_block_page(&storage.storage, container_id, &start).unwrap() {
            page_count += 1;
            assert!(page_count <= 5, "the scan must end");
            found.extend(page.blocks.iter().map(ScannedBlock::file_block));
            match page.next {
                Some(next) => start = next,
                None => break,
            }
        }
        assert_eq!(found, vec![unwritten_count, unwritten_count + 1]);
        assert_eq!(page_count, 4);
    }

    async fn corrupt(storage: &NodeStorage, device_block: u64) {
        // The apply's own write of the block must not land after (and undo) the corruption.
        storage.pending_writes.wait_for_all().await;
        let mut bytes = storage
            .block_store
            .read_blocks(device_block, 1)
            .await
            .unwrap();
        bytes[1234] ^= 0x40;
        storage
            .block_store
            .write_blocks(device_block, bytes)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_bad_block_is_confirmed_under_the_lock_and_rewritten_in_place() {
        let (test, block, data) = one_block_file(0x42).await;
        let storage = &test.storage;
        assert_eq!(
            confirm_bad(storage, &block).await.unwrap(),
            Confirmation::Intact
        );
        corrupt(storage, block.reference.device_block).await;
        assert_eq!(
            confirm_bad(storage, &block).await.unwrap(),
            Confirmation::Bad
        );
        assert!(matches!(
            crate::filesystem::read(storage, 3, block.inode(), 0, 4096).await,
            Err(NodeError::ChecksumMismatch(_))
        ));
        assert_eq!(
            rewrite_in_place(storage, &block, &data).await.unwrap(),
            Rewrite::Done
        );
        assert_eq!(
            confirm_bad(storage, &block).await.unwrap(),
            Confirmation::Intact
        );
        assert_eq!(
            crate::filesystem::read(storage, 3, block.inode(), 0, 4096)
                .await
                .unwrap(),
            data
        );
    }

    #[tokio::test]
    async fn a_block_rewritten_since_the_scan_is_neither_counted_nor_overwritten() {
        let (mut test, scanned, data) = one_block_file(0x42).await;
        // The file block is rewritten (copy-on-write: a new device block) after the scan saw it.
        test.apply(
            3,
            crate::command::FilesystemCommand::Write {
                inode: scanned.inode(),
                offset_bytes: 0,
                data: bytes::Bytes::from(vec![0x77; BLOCK_SIZE_BYTES]),
                now_ns: 4,
                prewritten: Default::default(),
            },
        )
        .await
        .unwrap();
        let storage = &test.storage;
        // Even if the old device block now holds anything at all...
        corrupt(storage, scanned.reference.device_block).await;
        assert_eq!(
            confirm_bad(storage, &scanned).await.unwrap(),
            Confirmation::Stale
        );
        // ...a repair with the old version's bytes writes nothing.
        let before = storage
            .block_store
            .read_blocks(scanned.reference.device_block, 1)
            .await
            .unwrap()
            .to_vec();
        assert_eq!(
            rewrite_in_place(storage, &scanned, &data).await.unwrap(),
            Rewrite::Stale
        );
        let after = storage
            .block_store
            .read_blocks(scanned.reference.device_block, 1)
            .await
            .unwrap()
            .to_vec();
        assert_eq!(before, after);
        assert_eq!(
            crate::filesystem::read(storage, 3, scanned.inode(), 0, 4096)
                .await
                .unwrap(),
            vec![0x77; BLOCK_SIZE_BYTES]
        );
    }

    fn cursor(container_id: u64, file_block: u64) -> ScrubCursor {
        ScrubCursor {
            container_id,
            next_key: keys::block(container_id, 9, file_block),
            started_ns: 5,
        }
    }

    #[test]
    fn a_pass_goes_on_from_its_cursor_and_never_skips_a_later_container() {
        // No cursor: every container from its first row, in id order.
        assert_eq!(
            pass_plan(&[7, 3, 5], None),
            vec![(3, None), (5, None), (7, None)]
        );
        // A cursor in container 5: 3 was done, 5 goes on at the key, 7 from the start.
        let at_five = cursor(5, 40);
        assert_eq!(
            pass_plan(&[3, 5, 7], Some(&at_five)),
            vec![(5, Some(at_five.next_key.clone())), (7, None)]
        );
        // The cursor's container was removed meanwhile: the next one from its start.
        assert_eq!(pass_plan(&[3, 7], Some(&at_five)), vec![(7, None)]);
        // The cursor's container was the last one and is gone: nothing left of this pass.
        assert!(pass_plan(&[1, 3], Some(&at_five)).is_empty());
    }

    #[tokio::test]
    async fn the_cursor_survives_reopening_and_a_bad_one_is_ignored() {
        let test_storage = crate::test_support::TestStorage::new(64 << 20);
        let stored = cursor(4, 1234);
        assert_eq!(load_cursor(&test_storage.storage), None);
        save_cursor(&test_storage.storage, &stored).unwrap();
        assert_eq!(load_cursor(&test_storage.storage), Some(stored.clone()));
        test_storage.storage.checkpoint(|_| Ok(())).await.unwrap();
        let crate::test_support::TestStorage {
            directory,
            device,
            storage,
            ..
        } = test_storage;
        drop((device, storage));
        {
            let (_device, storage) = crate::test_support::open(directory.path());
            assert_eq!(load_cursor(&storage), Some(stored.clone()));
            // A key outside the cursor's container (here: container 5's rows) is refused.
            save_cursor(
                &storage,
                &ScrubCursor {
                    container_id: 4,
                    next_key: keys::block(5, 1, 0),
                    started_ns: 5,
                },
            )
            .unwrap();
            assert_eq!(load_cursor(&storage), None);
            // Bytes that do not decode are ignored too.
            let mut batch = rocksdb::WriteBatch::default();
            batch.put(keys::scrub_cursor(), vec![0xff; 3]);
            storage.state.write_unlogged(batch).unwrap();
            assert_eq!(load_cursor(&storage), None);
            clear_cursor(&storage).unwrap();
            assert_eq!(load_cursor(&storage), None);
        }
    }
}
