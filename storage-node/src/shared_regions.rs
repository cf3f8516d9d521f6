//! Memory regions shared with FUSE drivers on this host, so a read's bytes go from the device
//! into the driver's memory without passing through gRPC (`Filesystem.ReadShared`), and a
//! write's bytes come from the driver's memory with one copy (`Filesystem.WriteShared`).
//!
//! A driver connects to the node's local socket (`--local-socket`), sends a sealed memfd
//! (`ballast_common::shared_region`), and gets back a random id. The region stays attached
//! while that connection is open; a read names the id and a slot of the region, and the node
//! reads the file's blocks and copies them into the slot (`filesystem::read_shared`).
//!
//! Owns: the registry of attached regions, the local socket's accept thread and one thread per
//! attached driver (which only waits for its connection to close).
//! Must not depend on: the gRPC service (the service looks slots up here).
//! Invariants:
//! - At most [`SHARED_REGIONS_MAX`] regions, each at most [`SHARED_REGION_BYTES_MAX`] and size
//!   sealed (checked by `SharedRegion::from_received`), so a driver cannot make the node fault
//!   by shrinking it.
//! - A slot is page aligned and inside its region, and holds the region (an `Arc`) while a
//!   request uses it, so a driver that detaches mid-request cannot unmap memory the node still
//!   touches. The device never reads into a slot: a read's blocks are read into the node's own
//!   buffer and copied in ([`Slot::fill`]); see `filesystem::read_shared` for why.
//! - A write's bytes are copied out of the slot once ([`Slot::copy_out`]) before anything looks
//!   at them: the driver could change the slot at any time, so checksums, the prewrite and the
//!   Raft entry all see the node's own copy, never the shared memory.
//! - Ids are random 64-bit numbers from the kernel: another local process that can reach the
//!   gRPC port cannot name a region it was not given.

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_common::shared_region::{answer_id, SharedRegion, SHARED_REGION_PAGE_BYTES};

use crate::error::{FsError, NodeResult};

/// Regions attached at once (one per mounted volume of a driver on this host).
pub const SHARED_REGIONS_MAX: usize = 64;
/// Largest region a driver may attach.
pub const SHARED_REGION_BYTES_MAX: usize = 256 << 20;
/// Time a connecting driver has to send its region.
const ATTACH_TIMEOUT_MS: u64 = 5_000;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct SharedRegions {
    regions: Mutex<HashMap<u64, Arc<SharedRegion>>>,
    /// Reads served into shared regions since the node started (shown by `ballast status`).
    read_count: AtomicU64,
    /// Writes whose bytes came from shared regions since the node started.
    write_count: AtomicU64,
    /// The local socket, once it is served (drivers learn it from `Admin.Status`).
    socket_path: Mutex<Option<std::path::PathBuf>>,
    /// This node's id, told to attaching drivers (set by `serve`).
    node_id: AtomicU64,
}

/// Where one read may write: `length_bytes` of a region from `offset_bytes`.
#[derive(Debug)]
pub struct Slot {
    region: Arc<SharedRegion>,
    offset_bytes: usize,
    length_bytes: usize,
}

impl Slot {
    /// Copies `bytes` (blocks of a read) into the slot from `position_bytes` on; refused, with
    /// nothing written, when they would run past the slot's end.
    pub fn fill_at(&self, position_bytes: usize, bytes: &[u8]) -> NodeResult<()> {
        if position_bytes
            .checked_add(bytes.len())
            .is_none_or(|end| end > self.length_bytes)
        {
            return Err(FsError::invalid(format!(
                "{} block bytes at {position_bytes} do not fit a {}-byte slot",
                bytes.len(),
                self.length_bytes
            ))
            .into());
        }
        self.region
            .with_bytes_mut(self.offset_bytes + position_bytes, bytes.len(), |slot| {
                slot.copy_from_slice(bytes)
            })
            .expect("slots lie inside their region (checked when made)");
        Ok(())
    }

    /// How many bytes the slot holds.
    pub fn length_bytes(&self) -> usize {
        self.length_bytes
    }

    /// A copy of the first `length_bytes` of the slot: the bytes of a write the driver put there.
    pub fn copy_out(&self, length_bytes: usize) -> NodeResult<bytes::Bytes> {
        if length_bytes > self.length_bytes {
            return Err(FsError::invalid(format!(
                "a write of {length_bytes} bytes does not fit a {}-byte slot",
                self.length_bytes
            ))
            .into());
        }
        Ok(self
            .region
            .with_bytes(
                self.offset_bytes,
                length_bytes,
                bytes::Bytes::copy_from_slice,
            )
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
    fn hold_attachment(&self, mut stream: UnixStream) {
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
        // The driver never writes again; a read returns at its close or death.
        let _ = stream.set_read_timeout(None);
        // Any byte from the driver breaks the protocol and ends the attachment too.
        let mut byte = [0u8; 1];
        let _ = std::io::Read::read(&mut stream, &mut byte);
        self.detach(id);
        tracing::info!(length_bytes, "detached a shared region");
    }
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
        slot.fill_at(0, &[0x5A; 8192]).unwrap();
        let copy = |offset, length| region.with_bytes(offset, length, |bytes| bytes.to_vec());
        assert_eq!(copy(4096, 8192).unwrap(), vec![0x5A; 8192]);
        assert_eq!(copy(0, 4096).unwrap(), vec![0; 4096]);
        slot.fill_at(4096, &[0x6B; 4096]).unwrap();
        assert_eq!(copy(4096, 4096).unwrap(), vec![0x5A; 4096]);
        assert_eq!(copy(8192, 4096).unwrap(), vec![0x6B; 4096]);
        assert!(
            slot.fill_at(0, &[1; 12288]).is_err(),
            "longer than the slot"
        );
        assert!(
            slot.fill_at(4096, &[1; 8192]).is_err(),
            "runs past the slot"
        );
        assert!(
            slot.fill_at(usize::MAX, &[1; 1]).is_err(),
            "position overflows"
        );
        assert_eq!(
            copy(8192, 4096).unwrap(),
            vec![0x6B; 4096],
            "a refused fill wrote"
        );
        assert_eq!(
            copy(4096, 4096).unwrap(),
            vec![0x5A; 4096],
            "a refused fill wrote"
        );
        assert!(regions.slot(id, 100, 4096).is_err(), "unaligned offset");
        assert!(regions.slot(id, 15 * 4096, 8192).is_err(), "past the end");
        assert!(regions.slot(id ^ 1, 0, 4096).is_err(), "unknown id");

        // A slot keeps its region mapped after the driver leaves; new slots are refused.
        drop(stream);
        // Bounded: 500 looks 10 ms apart.
        let detached = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            regions.attached_count() == 0
        });
        assert!(detached, "the region stays attached after its driver left");
        assert!(regions.slot(id, 0, 4096).is_err());
        slot.fill_at(0, &[1; 4096]).unwrap();
        assert_eq!(copy(4096, 4096).unwrap(), vec![1; 4096]);
    }
}
