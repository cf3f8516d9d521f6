//! Prewritten write data: the blocks a leader wrote a detachable write's data to *before* it
//! proposed the write, carried with the command in memory to the container's log writer.
//!
//! Why: openraft 0.9's Raft core waits for every log append to finish before it takes the next
//! client write (`append_to_log` awaits the flush callback), and it appends one entry per
//! client write. When the log writer also wrote the data of a detachable write (1 MiB for
//! FUSE's writeback), each write held the core for the data's device write plus the record's:
//! about 1.5 ms, so the container's writes went one at a time, whatever the concurrency. With the
//! data written by the request's own task, many writes' data is in flight at once and the core
//! waits only for the small record.
//!
//! Owns: [`Prewritten`], the node-local annotation of a `FilesystemCommand::Write`. It is never
//! serialized (`#[serde(skip)]`): a follower, a forwarded proposal, a replay and a snapshot all see
//! it empty and detach the data themselves as before.
//! Must not depend on: commands, storage or the allocator (releasing goes through
//! [`ReleaseReservation`]), so that `command` can name it.
//!
//! Invariants:
//! - The data was on the device (written, not necessarily flushed) before the annotation was
//!   built, so a log record naming the blocks never names bytes that were not written.
//! - The extents are taken at most once (by the log writer, which then owns them like its own
//!   reservation); extents never taken are released when the last clone drops.
//! - The checksums are those of the data at the time it was written; the log writer names the
//!   blocks with them (checking them against the entry's data again only in builds with debug
//!   assertions: the annotation travels inside the command whose immutable `Bytes` it describes),
//!   and the apply compares them with the entry's data in every build.

use std::sync::{Arc, Mutex};

use ballast_device::Extent;

/// Gives back blocks that were reserved for detached data and never named by a log record.
pub trait ReleaseReservation: Send + Sync {
    fn release_reservation(&self, extents: &[Extent]);
}

/// Blocks already holding a write's data, if its proposer wrote them. Clones share one set of
/// blocks. Equality ignores it: it is a hint about where bytes are, not part of the command.
#[derive(Clone, Default)]
pub struct Prewritten(Option<Arc<PrewrittenBlocks>>);

struct PrewrittenBlocks {
    /// `None` once taken.
    extents: Mutex<Option<Vec<Extent>>>,
    /// One CRC-32 per block of the data written.
    checksums: Vec<u32>,
    release: Arc<dyn ReleaseReservation>,
}

/// What the log writer takes over: the blocks and the checksums of what was written to them.
#[derive(Debug, PartialEq, Eq)]
pub struct TakenBlocks {
    pub extents: Vec<Extent>,
    pub checksums: Vec<u32>,
}

impl Prewritten {
    /// No blocks: the log writer writes the data itself.
    pub fn none() -> Self {
        Self(None)
    }

    /// Blocks `extents` hold data whose blocks have `checksums`; `release` gives them back if
    /// no log writer takes them.
    pub fn new(
        extents: Vec<Extent>,
        checksums: Vec<u32>,
        release: Arc<dyn ReleaseReservation>,
    ) -> Self {
        let block_count: u64 = extents.iter().map(|extent| extent.block_count).sum();
        assert_eq!(
            block_count,
            checksums.len() as u64,
            "one checksum per prewritten block"
        );
        Self(Some(Arc::new(PrewrittenBlocks {
            extents: Mutex::new(Some(extents)),
            checksums,
            release,
        })))
    }

    /// Whether the proposer wrote the data to blocks (taken over or not): the apply then
    /// allocates none for it.
    pub fn is_present(&self) -> bool {
        self.0.is_some()
    }

    /// Takes the blocks over (at most once over all clones).
    pub fn take(&self) -> Option<TakenBlocks> {
        let blocks = self.0.as_ref()?;
        let extents = blocks.extents.lock().expect("prewritten lock").take()?;
        Some(TakenBlocks {
            extents,
            checksums: blocks.checksums.clone(),
        })
    }
}

impl Drop for PrewrittenBlocks {
    fn drop(&mut self) {
        let extents = match self.extents.get_mut() {
            Ok(extents) => extents.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(extents) = extents {
            self.release.release_reservation(&extents);
        }
    }
}

impl PartialEq for Prewritten {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Eq for Prewritten {}

impl std::fmt::Debug for Prewritten {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => formatter.write_str("Prewritten(none)"),
            Some(blocks) => write!(formatter, "Prewritten({} blocks)", blocks.checksums.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Released(Mutex<Vec<Extent>>);

    impl ReleaseReservation for Released {
        fn release_reservation(&self, extents: &[Extent]) {
            self.0.lock().unwrap().extend_from_slice(extents);
        }
    }

    fn extent(first_block: u64, block_count: u64) -> Extent {
        Extent {
            first_block,
            block_count,
        }
    }

    #[test]
    fn blocks_are_taken_once_and_then_not_released() {
        let released = Arc::new(Released::default());
        let prewritten = Prewritten::new(vec![extent(10, 2)], vec![1, 2], released.clone());
        let clone = prewritten.clone();
        assert_eq!(
            clone.take(),
            Some(TakenBlocks {
                extents: vec![extent(10, 2)],
                checksums: vec![1, 2],
            })
        );
        assert_eq!(prewritten.take(), None, "taken by the clone already");
        drop(prewritten);
        drop(clone);
        assert!(released.0.lock().unwrap().is_empty());
    }

    #[test]
    fn blocks_never_taken_are_released_when_the_last_clone_drops() {
        let released = Arc::new(Released::default());
        let prewritten = Prewritten::new(
            vec![extent(4, 1), extent(20, 3)],
            vec![7; 4],
            released.clone(),
        );
        let clone = prewritten.clone();
        drop(prewritten);
        assert!(released.0.lock().unwrap().is_empty(), "a clone still lives");
        drop(clone);
        assert_eq!(
            *released.0.lock().unwrap(),
            vec![extent(4, 1), extent(20, 3)]
        );
        assert_eq!(Prewritten::none().take(), None);
    }

    #[test]
    #[should_panic(expected = "one checksum per prewritten block")]
    fn checksums_must_match_the_blocks() {
        let _ = Prewritten::new(vec![extent(0, 2)], vec![1], Arc::new(Released::default()));
    }
}
