//! `SpooledSnapshot`: openraft's snapshot data for a container, kept in an unlinked file in the
//! node's spool directory instead of memory.
//!
//! Owns: the spool directory (created at start, leftovers removed), the spool files, and the
//! readiness of a snapshot that a background export is still writing.
//! Must not depend on: Raft beyond the I/O traits openraft asks for, the snapshot format.
//!
//! Why a file: a container's snapshot is its whole content, which may be far larger than memory.
//! Why unlinked: a spool file is transient; unlinking it right after creation means a crash, a
//! dropped transfer or a cancelled export can never leave one behind (only a crash between the
//! create and the unlink, which `SpoolDirectory::open` cleans up).
//!
//! Invariants:
//! - A spool file never needs to survive a crash, so it is never fsync'd.
//! - A snapshot whose export is still running can be read behind it: the export states the
//!   stream's exact length before it writes anything (so openraft's sender, which seeks to the
//!   end first, can start at once), then publishes how many bytes are in the file after each
//!   write. A read waits until the bytes it is to return are written and never returns more; a
//!   read at the stated end is the end of the stream.
//! - A failed export, or one that wrote other than the length it stated, turns every later read
//!   and seek into an error, never into a truncated snapshot that looks whole.
//! - A snapshot being received can be read behind the transfer ([`ReceiveTail`]): each chunk is
//!   written at its offset on a blocking thread, and only bytes that form an unbroken prefix of
//!   the stream are published. The tail reads only published bytes; it ends (0) once the
//!   transfer is complete, and fails when the snapshot data is dropped unfinished or nothing
//!   arrives for `RECEIVE_IDLE_MS_MAX`. Memory per transfer is bounded by one chunk.
//! - A write of a received snapshot takes a whole chunk or nothing ([`RECEIVE_CHUNK_BYTES_MAX`]).
//!   openraft's receiver (`Streaming::receive`) advances its offset only after `write_all`
//!   returns, and seeks only when a chunk's offset differs from it. If the RPC handling a chunk
//!   is cancelled (the sender's deadline, a dropped connection) after part of the chunk was
//!   taken, the resent chunk would be written that far past its offset: the stream is shifted
//!   and fails a frame checksum at import. Taking all or nothing leaves no such state.

use std::future::Future;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{ready, Context, Poll};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::error::{NodeError, NodeResult};

/// The outcome a background export reports when it ends: the snapshot's size, or why it failed.
pub type ExportOutcome = Result<u64, String>;

/// `planned_length_bytes` before the export has stated it.
const LENGTH_UNKNOWN: u64 = u64::MAX;
/// Largest chunk of a snapshot transfer, and so the largest write a received snapshot takes: it
/// takes each write whole, in one call (see the module doc). The node's Raft config sends chunks
/// of this size.
pub const RECEIVE_CHUNK_BYTES_MAX: usize = 16 << 20;
/// How long the tail of a received snapshot waits for new bytes before it gives up (the
/// leader's install timeout is of the same order).
const RECEIVE_IDLE_MS_MAX: u64 = 600_000;

/// How far a received snapshot has arrived; shared by its writer and its [`ReceiveTail`].
#[derive(Debug, Default)]
struct ReceiveState {
    /// Every byte before this is in the file.
    contiguous_bytes: u64,
    /// The transfer finished: nothing more will arrive.
    complete: bool,
    /// The snapshot data was dropped before the transfer finished.
    abandoned: bool,
}

#[derive(Debug, Default)]
struct ReceiveShared {
    state: Mutex<ReceiveState>,
    changed: Condvar,
}

impl ReceiveShared {
    fn update(&self, change: impl FnOnce(&mut ReceiveState)) {
        change(&mut self.state.lock().expect("receive state lock"));
        self.changed.notify_all();
    }
}

/// Identifies a received snapshot, so its importer can be matched with it at install.
static NEXT_RECEIVE_ID: AtomicU64 = AtomicU64::new(1);

/// A blocking reader of a snapshot as it is being received (see the module doc).
#[derive(Debug)]
pub struct ReceiveTail {
    shared: Arc<ReceiveShared>,
    file: std::fs::File,
    position_bytes: u64,
}

impl std::io::Read for ReceiveTail {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if buffer.is_empty() {
            return Ok(0);
        }
        let idle_max = std::time::Duration::from_millis(RECEIVE_IDLE_MS_MAX);
        let mut deadline = std::time::Instant::now() + idle_max;
        let mut state = self.shared.state.lock().expect("receive state lock");
        let mut seen_bytes = state.contiguous_bytes;
        while state.contiguous_bytes <= self.position_bytes {
            if state.complete {
                return Ok(0);
            }
            if state.abandoned {
                return Err(std::io::Error::other(
                    "the snapshot transfer was abandoned before it finished",
                ));
            }
            if state.contiguous_bytes != seen_bytes {
                seen_bytes = state.contiguous_bytes;
                deadline = std::time::Instant::now() + idle_max;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no snapshot bytes arrived for {RECEIVE_IDLE_MS_MAX} ms"),
                ));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .expect("receive state lock")
                .0;
        }
        let available = state.contiguous_bytes - self.position_bytes;
        drop(state);
        let length = usize::try_from(available)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let read = self
            .file
            .read_at(&mut buffer[..length], self.position_bytes)?;
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the spool file ended before the bytes its transfer reported",
            ));
        }
        self.position_bytes += read as u64;
        Ok(read)
    }
}

/// A write of a received piece on a blocking thread; it hands its buffer back.
type SpoolWriteTask = tokio::task::JoinHandle<(std::io::Result<()>, Vec<u8>)>;

/// The writing end of a received snapshot.
#[derive(Debug)]
struct ReceiveWriter {
    id: u64,
    shared: Arc<ReceiveShared>,
    file: Arc<std::fs::File>,
    position_bytes: u64,
    /// The write accepted last, still running: its offset, length and task (which hands its
    /// buffer back).
    in_flight: Option<(u64, usize, SpoolWriteTask)>,
    /// The buffer of the last finished write, reused by the next (no allocation per piece).
    spare: Vec<u8>,
}

impl ReceiveWriter {
    /// Waits for the write in flight, if any, and publishes it.
    fn poll_in_flight(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some((offset_bytes, length_bytes, task)) = self.in_flight.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let joined = ready!(Pin::new(task).poll(context));
        let (offset_bytes, length_bytes) = (*offset_bytes, *length_bytes as u64);
        self.in_flight = None;
        let (written, buffer) =
            joined.map_err(|error| std::io::Error::other(format!("spool write task: {error}")))?;
        self.spare = buffer;
        written?;
        self.shared.update(|state| {
            // Only an unbroken prefix is published (a resent chunk rewrites bytes already in).
            if offset_bytes <= state.contiguous_bytes {
                state.contiguous_bytes = state.contiguous_bytes.max(offset_bytes + length_bytes);
            }
        });
        Poll::Ready(Ok(()))
    }
}

impl Drop for ReceiveWriter {
    fn drop(&mut self) {
        self.shared.update(|state| {
            if !state.complete {
                state.abandoned = true;
            }
        });
    }
}

/// What a running export and the snapshot data reading behind it share.
#[derive(Debug)]
struct ExportShared {
    /// The stream's exact length, once the export has stated it.
    planned_length_bytes: AtomicU64,
    /// Bytes of the file that are written (each write completed before this grew).
    written_bytes: AtomicU64,
    outcome: Mutex<Option<ExportOutcome>>,
    /// The reader waiting for any of the above to change.
    waker: AtomicWaker,
    /// Set when the snapshot data is dropped: nobody will read, the export may stop.
    abandoned: AtomicBool,
}

impl ExportShared {
    fn outcome(&self) -> Option<ExportOutcome> {
        self.outcome.lock().expect("export outcome lock").clone()
    }
}

/// The export's end of an [`ExportShared`]: states the length, publishes progress and the
/// outcome. Dropped without an outcome, it reports a failure, so a reader never waits forever.
#[derive(Debug)]
pub struct ExportProgress {
    shared: Arc<ExportShared>,
}

impl ExportProgress {
    /// States the exact length the stream will have. Once only.
    pub fn plan(&self, length_bytes: u64) {
        assert_ne!(length_bytes, LENGTH_UNKNOWN);
        let previous = self
            .shared
            .planned_length_bytes
            .swap(length_bytes, Ordering::AcqRel);
        assert_eq!(
            previous, LENGTH_UNKNOWN,
            "an export's length is stated once"
        );
        self.shared.waker.wake();
    }

    /// Everything before `written_bytes` is in the file.
    pub fn advance(&self, written_bytes: u64) {
        self.shared
            .written_bytes
            .fetch_max(written_bytes, Ordering::AcqRel);
        self.shared.waker.wake();
    }

    /// Whether the snapshot data was dropped (nobody will read what the export writes).
    pub fn abandoned(&self) -> bool {
        self.shared.abandoned.load(Ordering::Acquire)
    }

    /// Reports the export's end (the first report stands).
    pub fn finish(&self, outcome: ExportOutcome) {
        self.set_outcome(outcome);
    }

    fn set_outcome(&self, outcome: ExportOutcome) {
        let mut slot = self.shared.outcome.lock().expect("export outcome lock");
        if slot.is_none() {
            *slot = Some(outcome);
        }
        drop(slot);
        self.shared.waker.wake();
    }
}

impl Drop for ExportProgress {
    fn drop(&mut self) {
        self.set_outcome(Err("the export task ended without a result".into()));
    }
}

/// The snapshot data's end of an [`ExportShared`].
#[derive(Debug)]
struct ExportReader {
    shared: Arc<ExportShared>,
}

impl Drop for ExportReader {
    fn drop(&mut self) {
        self.shared.abandoned.store(true, Ordering::Release);
    }
}

/// The directory that holds spool files; one per node, inside its state directory.
#[derive(Debug)]
pub struct SpoolDirectory {
    path: PathBuf,
    next_file_number: AtomicU64,
}

impl SpoolDirectory {
    /// Creates the directory if needed and removes files left by a crash.
    pub fn open(path: &Path) -> NodeResult<Self> {
        let io_error =
            |context: String| move |source: std::io::Error| NodeError::Io { context, source };
        std::fs::create_dir_all(path).map_err(io_error(format!("create {}", path.display())))?;
        let entries =
            std::fs::read_dir(path).map_err(io_error(format!("list {}", path.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_error(format!("list {}", path.display())))?;
            std::fs::remove_file(entry.path())
                .map_err(io_error(format!("remove {}", entry.path().display())))?;
        }
        Ok(Self {
            path: path.to_owned(),
            next_file_number: AtomicU64::new(0),
        })
    }

    /// A new, empty, already unlinked file open for reading and writing.
    pub fn create_file(&self, purpose: &str) -> NodeResult<std::fs::File> {
        let number = self.next_file_number.fetch_add(1, Ordering::Relaxed);
        let path = self.path.join(format!("{purpose}-{number}.spool"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| NodeError::Io {
                context: format!("create spool file {}", path.display()),
                source,
            })?;
        std::fs::remove_file(&path).map_err(|source| NodeError::Io {
            context: format!("unlink spool file {}", path.display()),
            source,
        })?;
        Ok(file)
    }
}

/// Snapshot data as openraft reads (sender) and writes (receiver) it.
#[derive(Debug, Default)]
pub struct SpooledSnapshot {
    /// `None` for the metadata-only snapshots openraft asks for at start-up and after a
    /// checkpoint: they read as empty.
    file: Option<tokio::fs::File>,
    /// Set for an exported snapshot: the export that writes (or wrote) the file.
    export: Option<ExportReader>,
    /// Set for a snapshot being received with a tail reading behind it.
    receive: Option<ReceiveWriter>,
    /// The read position in an exported snapshot.
    position_bytes: u64,
    /// A seek of an exported snapshot asked for before its length was stated.
    seek_pending: Option<SeekFrom>,
}

impl SpooledSnapshot {
    /// Snapshot data that holds no bytes.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A snapshot in `file`, ready to be read or written.
    pub fn ready(file: std::fs::File) -> Self {
        Self {
            file: Some(tokio::fs::File::from_std(file)),
            ..Self::default()
        }
    }

    /// A snapshot to be received into `file`, and a reader that follows it as it arrives.
    pub fn receiving(file: std::fs::File) -> NodeResult<(Self, ReceiveTail)> {
        let tail_file = file.try_clone().map_err(|source| NodeError::Io {
            context: "duplicate a spool file".into(),
            source,
        })?;
        let shared = Arc::new(ReceiveShared::default());
        let snapshot = Self {
            receive: Some(ReceiveWriter {
                id: NEXT_RECEIVE_ID.fetch_add(1, Ordering::Relaxed),
                shared: Arc::clone(&shared),
                file: Arc::new(file),
                position_bytes: 0,
                in_flight: None,
                spare: Vec::new(),
            }),
            ..Self::default()
        };
        let tail = ReceiveTail {
            shared,
            file: tail_file,
            position_bytes: 0,
        };
        Ok((snapshot, tail))
    }

    /// For a snapshot made by [`SpooledSnapshot::receiving`]: its identity.
    pub fn receive_id(&self) -> Option<u64> {
        self.receive.as_ref().map(|writer| writer.id)
    }

    /// For a snapshot made by [`SpooledSnapshot::receiving`]: waits for the last write and tells
    /// the tail that nothing more will arrive.
    pub async fn finish_receiving(mut self) -> NodeResult<()> {
        let Some(writer) = self.receive.as_mut() else {
            return Err(NodeError::InvalidState(
                "not a snapshot being received".into(),
            ));
        };
        std::future::poll_fn(|context| writer.poll_in_flight(context))
            .await
            .map_err(|source| NodeError::Io {
                context: "finish writing a received snapshot".into(),
                source,
            })?;
        writer.shared.update(|state| state.complete = true);
        Ok(())
    }

    /// A snapshot that a background export is writing into `file`; the export reports through
    /// the returned [`ExportProgress`].
    pub fn exporting(file: std::fs::File) -> (Self, ExportProgress) {
        let shared = Arc::new(ExportShared {
            planned_length_bytes: AtomicU64::new(LENGTH_UNKNOWN),
            written_bytes: AtomicU64::new(0),
            outcome: Mutex::new(None),
            waker: AtomicWaker::new(),
            abandoned: AtomicBool::new(false),
        });
        let snapshot = Self {
            file: Some(tokio::fs::File::from_std(file)),
            export: Some(ExportReader {
                shared: Arc::clone(&shared),
            }),
            ..Self::default()
        };
        (snapshot, ExportProgress { shared })
    }

    /// The received bytes as a blocking file for the importer, after every write has finished.
    /// `None` if this snapshot holds no file.
    pub async fn into_file(self) -> NodeResult<Option<std::fs::File>> {
        use tokio::io::AsyncWriteExt;
        if self.receive.is_some() {
            let mut this = self;
            let writer = this.receive.as_mut().expect("checked");
            let file = Arc::clone(&writer.file);
            this.finish_receiving().await?;
            let file = file.try_clone().map_err(|source| NodeError::Io {
                context: "duplicate a spool file".into(),
                source,
            })?;
            return Ok(Some(file));
        }
        let Some(mut file) = self.file else {
            return Ok(None);
        };
        file.flush().await.map_err(|source| NodeError::Io {
            context: "finish writing a received snapshot".into(),
            source,
        })?;
        Ok(Some(file.into_std().await))
    }

    /// For an exported snapshot: waits until `wanted` holds, then returns its answer; an error
    /// once the export failed or wrote other than the length it stated. Registers the waker
    /// before the last look, so no change is missed.
    fn poll_export<T>(
        shared: &ExportShared,
        context: &mut Context<'_>,
        wanted: impl Fn(u64, u64) -> Option<T>,
    ) -> Poll<std::io::Result<T>> {
        let check = || -> Option<std::io::Result<T>> {
            let planned = shared.planned_length_bytes.load(Ordering::Acquire);
            match shared.outcome() {
                Some(Err(reason)) => {
                    return Some(Err(std::io::Error::other(format!(
                        "snapshot export failed: {reason}"
                    ))))
                }
                Some(Ok(size_bytes)) if size_bytes != planned => {
                    return Some(Err(std::io::Error::other(format!(
                        "snapshot export wrote {size_bytes} bytes, not the {planned} it stated"
                    ))))
                }
                _ => {}
            }
            if planned == LENGTH_UNKNOWN {
                return None;
            }
            let written = shared.written_bytes.load(Ordering::Acquire).min(planned);
            wanted(planned, written).map(Ok)
        };
        if let Some(answer) = check() {
            return Poll::Ready(answer);
        }
        shared.waker.register(context.waker());
        match check() {
            Some(answer) => Poll::Ready(answer),
            None => Poll::Pending,
        }
    }
}

impl AsyncRead for SpooledSnapshot {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.receive.is_some() {
            return Poll::Ready(Err(std::io::Error::other(
                "a snapshot being received is read by its tail, not here",
            )));
        }
        let Some(file) = this.file.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let Some(export) = this.export.as_ref() else {
            return Pin::new(file).poll_read(context, buffer);
        };
        let position = this.position_bytes;
        // How many bytes from `position` may be read now: 0 at the end of the stream.
        let readable = ready!(Self::poll_export(
            &export.shared,
            context,
            |planned, written| {
                if position >= planned {
                    Some(0)
                } else {
                    (written > position).then(|| written - position)
                }
            }
        ))?;
        if readable == 0 || buffer.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let limit = usize::try_from(readable)
            .unwrap_or(usize::MAX)
            .min(buffer.remaining());
        let mut limited = buffer.take(limit);
        ready!(Pin::new(file).poll_read(context, &mut limited))?;
        let read = limited.filled().len();
        // SAFETY: `limited` views the unfilled part of `buffer`, and the file filled (so
        // initialised) its first `read` bytes.
        unsafe { buffer.assume_init(read) };
        buffer.advance(read);
        if read == 0 {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the spool file ended before the bytes its export reported",
            )));
        }
        this.position_bytes += read as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SpooledSnapshot {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.export.is_some() {
            return Poll::Ready(Err(std::io::Error::other(
                "an exported snapshot is read-only",
            )));
        }
        if let Some(writer) = this.receive.as_mut() {
            if buffer.len() > RECEIVE_CHUNK_BYTES_MAX {
                // Taken in parts, a chunk could be left half written by a cancelled RPC.
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "a snapshot chunk of {} bytes is larger than the {RECEIVE_CHUNK_BYTES_MAX} \
                         a receiver takes at once",
                        buffer.len()
                    ),
                )));
            }
            // One write at a time: the previous one ends (and is published) before the next is
            // accepted, so the published prefix only ever grows over written bytes. Waiting
            // takes nothing from `buffer`, so a cancelled write leaves the position as it was.
            ready!(writer.poll_in_flight(context))?;
            let length_bytes = buffer.len();
            let mut data = std::mem::take(&mut writer.spare);
            data.clear();
            data.extend_from_slice(buffer);
            let offset_bytes = writer.position_bytes;
            let file = Arc::clone(&writer.file);
            let task = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let written = file.write_all_at(&data, offset_bytes);
                (written, data)
            });
            writer.in_flight = Some((offset_bytes, length_bytes, task));
            writer.position_bytes += length_bytes as u64;
            return Poll::Ready(Ok(length_bytes));
        }
        match this.file.as_mut() {
            Some(file) => Pin::new(file).poll_write(context, buffer),
            None => Poll::Ready(Err(std::io::Error::other(
                "an empty snapshot cannot be written",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(writer) = this.receive.as_mut() {
            return writer.poll_in_flight(context);
        }
        match this.file.as_mut() {
            Some(file) => Pin::new(file).poll_flush(context),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(writer) = this.receive.as_mut() {
            // openraft shuts the data down after the last chunk: the transfer is complete.
            ready!(writer.poll_in_flight(context))?;
            writer.shared.update(|state| state.complete = true);
            return Poll::Ready(Ok(()));
        }
        match this.file.as_mut() {
            Some(file) => Pin::new(file).poll_shutdown(context),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncSeek for SpooledSnapshot {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        let this = self.get_mut();
        if this.export.is_some() || this.receive.is_some() {
            // Done in `poll_complete`: once the export has stated the length (for `End`), or
            // once the write in flight has ended.
            this.seek_pending = Some(position);
            return Ok(());
        }
        match this.file.as_mut() {
            Some(file) => Pin::new(file).start_seek(position),
            None => Ok(()),
        }
    }

    fn poll_complete(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<u64>> {
        let this = self.get_mut();
        if let Some(writer) = this.receive.as_mut() {
            ready!(writer.poll_in_flight(context))?;
            if let Some(position) = this.seek_pending.take() {
                writer.position_bytes = match position {
                    SeekFrom::Start(offset) => offset,
                    SeekFrom::Current(delta) => writer
                        .position_bytes
                        .checked_add_signed(delta)
                        .ok_or_else(|| std::io::Error::other("seek out of range"))?,
                    SeekFrom::End(_) => {
                        return Poll::Ready(Err(std::io::Error::other(
                            "a snapshot being received has no end to seek from yet",
                        )))
                    }
                };
            }
            return Poll::Ready(Ok(writer.position_bytes));
        }
        let Some(file) = this.file.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if let (Some(export), Some(position)) = (this.export.as_ref(), this.seek_pending) {
            let current = this.position_bytes;
            let target = ready!(Self::poll_export(&export.shared, context, |planned, _| {
                Some(match position {
                    SeekFrom::Start(offset) => Some(offset),
                    SeekFrom::End(delta) => planned.checked_add_signed(delta),
                    SeekFrom::Current(delta) => current.checked_add_signed(delta),
                })
            }))?
            .ok_or_else(|| {
                std::io::Error::other(format!("seek to {position:?} is out of range"))
            })?;
            this.seek_pending = None;
            // The file may still be shorter than `target`; reads wait for the bytes.
            Pin::new(&mut *file).start_seek(SeekFrom::Start(target))?;
        }
        let reached = ready!(Pin::new(file).poll_complete(context))?;
        if this.export.is_some() {
            this.position_bytes = reached;
        }
        Poll::Ready(Ok(reached))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn leftover_spool_files_are_removed_and_new_ones_leave_no_name() {
        let directory = tempfile::tempdir().unwrap();
        let spool_path = directory.path().join("spool");
        std::fs::create_dir_all(&spool_path).unwrap();
        std::fs::write(spool_path.join("export-7.spool"), b"left by a crash").unwrap();
        let spool = SpoolDirectory::open(&spool_path).unwrap();
        assert_eq!(std::fs::read_dir(&spool_path).unwrap().count(), 0);
        let _file = spool.create_file("export").unwrap();
        assert_eq!(
            std::fs::read_dir(&spool_path).unwrap().count(),
            0,
            "a spool file is unlinked as soon as it is open"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_go_behind_the_export_and_end_at_the_stated_length() {
        use std::os::unix::fs::FileExt;
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let file = spool.create_file("export").unwrap();
        let writer = file.try_clone().unwrap();
        let (mut snapshot, progress) = SpooledSnapshot::exporting(file);
        // The reader starts before anything is known: openraft's sender seeks to the end first.
        let reader = tokio::spawn(async move {
            let end = snapshot.seek(SeekFrom::End(0)).await.unwrap();
            snapshot.seek(SeekFrom::Start(2)).await.unwrap();
            let mut first = [0u8; 16];
            let read = snapshot.read(&mut first).await.unwrap();
            let mut rest = Vec::new();
            snapshot.read_to_end(&mut rest).await.unwrap();
            (end, first[..read].to_vec(), rest)
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        progress.plan(10);
        // Bytes beyond the published point are in the file but must not be read yet.
        writer.write_all_at(b"01234XXXXX", 0).unwrap();
        progress.advance(5);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        writer.write_all_at(b"56789", 5).unwrap();
        progress.advance(10);
        progress.finish(Ok(10));
        let (end, first, rest) = reader.await.unwrap();
        assert_eq!(end, 10);
        assert_eq!(first, b"234", "a read stops at the published bytes");
        assert_eq!(rest, b"56789");
    }

    #[tokio::test]
    async fn a_failed_or_miscounted_export_is_an_error_not_a_short_snapshot() {
        use std::os::unix::fs::FileExt;
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let (mut snapshot, progress) =
            SpooledSnapshot::exporting(spool.create_file("export").unwrap());
        progress.finish(Err("device read failed".into()));
        let error = snapshot.seek(SeekFrom::End(0)).await.unwrap_err();
        assert!(error.to_string().contains("device read failed"), "{error}");
        let mut bytes = Vec::new();
        assert!(snapshot.read_to_end(&mut bytes).await.is_err());

        // The export task vanished without a word.
        let (mut snapshot, progress) =
            SpooledSnapshot::exporting(spool.create_file("export").unwrap());
        drop(progress);
        assert!(snapshot.seek(SeekFrom::End(0)).await.is_err());

        // It failed after some bytes were read.
        let file = spool.create_file("export").unwrap();
        let writer = file.try_clone().unwrap();
        let (mut snapshot, progress) = SpooledSnapshot::exporting(file);
        progress.plan(8);
        writer.write_all_at(b"abcd", 0).unwrap();
        progress.advance(4);
        let mut first = [0u8; 8];
        assert_eq!(snapshot.read(&mut first).await.unwrap(), 4);
        progress.finish(Err("device gone".into()));
        assert!(snapshot.read_to_end(&mut bytes).await.is_err());

        // It wrote less than it stated.
        let file = spool.create_file("export").unwrap();
        let writer = file.try_clone().unwrap();
        let (mut snapshot, progress) = SpooledSnapshot::exporting(file);
        progress.plan(8);
        writer.write_all_at(b"abcdef", 0).unwrap();
        progress.advance(6);
        progress.finish(Ok(6));
        let error = snapshot.read_to_end(&mut bytes).await.unwrap_err();
        assert!(error.to_string().contains("not the 8"), "{error}");
    }

    #[tokio::test]
    async fn dropping_the_snapshot_tells_the_export_to_stop() {
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let (snapshot, progress) = SpooledSnapshot::exporting(spool.create_file("export").unwrap());
        assert!(!progress.abandoned());
        drop(snapshot);
        assert!(progress.abandoned());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_reads_a_received_snapshot_as_it_arrives() {
        use std::io::Read;
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let (mut snapshot, mut tail) =
            SpooledSnapshot::receiving(spool.create_file("receive").unwrap()).unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            tail.read_to_end(&mut bytes).map(|_| bytes)
        });
        snapshot.write_all(b"abc").await.unwrap();
        // A resent chunk: openraft seeks back to its offset and writes the same bytes again.
        snapshot.seek(SeekFrom::Start(1)).await.unwrap();
        snapshot.write_all(b"bcdef").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            !reader.is_finished(),
            "the tail waits while the transfer goes on"
        );
        snapshot.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), b"abcdef");
        assert!(snapshot.into_file().await.unwrap().is_some());
    }

    /// openraft's own receiver, with every chunk's first delivery cancelled after one poll (as a
    /// sender's deadline or a dropped connection cancels the RPC handling it), then resent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_cancelled_midway_and_resent_lands_at_its_offset() {
        use openraft::network::snapshot_transport::Streaming;
        use openraft::raft::InstallSnapshotRequest;
        use std::io::Read;

        use crate::types::{TypeConfig, Vote};

        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let (snapshot, mut tail) =
            SpooledSnapshot::receiving(spool.create_file("receive").unwrap()).unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            tail.read_to_end(&mut bytes).map(|_| bytes)
        });
        // No two nearby positions hold the same byte, so a shifted chunk cannot match.
        let sent: Vec<u8> = (0..3 * RECEIVE_CHUNK_BYTES_MAX as u64 + 4099)
            .map(|position| (position.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut streaming = Streaming::<TypeConfig>::new("1-1-9-export".into(), Box::new(snapshot));
        let chunk_count = sent.len().div_ceil(RECEIVE_CHUNK_BYTES_MAX);
        for (index, chunk) in sent.chunks(RECEIVE_CHUNK_BYTES_MAX).enumerate() {
            let request = || InstallSnapshotRequest::<TypeConfig> {
                vote: Vote::new(1, 1),
                meta: Default::default(),
                offset: (index * RECEIVE_CHUNK_BYTES_MAX) as u64,
                data: chunk.to_vec(),
                done: index + 1 == chunk_count,
            };
            {
                let cancelled = streaming.receive(request());
                futures::pin_mut!(cancelled);
                let _ = futures::poll!(cancelled);
            }
            streaming.receive(request()).await.unwrap();
        }
        streaming.into_snapshot_data().shutdown().await.unwrap();
        let received = reader.await.unwrap().unwrap();
        assert_eq!(received.len(), sent.len());
        let first_difference = received.iter().zip(&sent).position(|(a, b)| a != b);
        assert_eq!(
            first_difference, None,
            "the received stream differs from the sent one"
        );
    }

    #[tokio::test]
    async fn a_chunk_larger_than_a_receiver_takes_at_once_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let (mut snapshot, _tail) =
            SpooledSnapshot::receiving(spool.create_file("receive").unwrap()).unwrap();
        let error = snapshot
            .write(&vec![0; RECEIVE_CHUNK_BYTES_MAX + 1])
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
        assert_eq!(snapshot.seek(SeekFrom::Current(0)).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_fails_when_the_transfer_is_dropped_unfinished() {
        use std::io::Read;
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let (mut snapshot, mut tail) =
            SpooledSnapshot::receiving(spool.create_file("receive").unwrap()).unwrap();
        snapshot.write_all(b"abc").await.unwrap();
        snapshot.flush().await.unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            let result = tail.read_to_end(&mut bytes);
            (bytes, result)
        });
        drop(snapshot);
        let (bytes, result) = reader.await.unwrap();
        assert_eq!(bytes, b"abc", "what arrived is read");
        let error = result.unwrap_err();
        assert!(error.to_string().contains("abandoned"), "{error}");
    }

    #[tokio::test]
    async fn a_received_snapshot_reads_back_what_was_written_at_offsets() {
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let mut snapshot = SpooledSnapshot::ready(spool.create_file("receive").unwrap());
        snapshot.write_all(b"abc").await.unwrap();
        // A resent chunk: openraft seeks back to its offset and writes it again.
        snapshot.seek(SeekFrom::Start(1)).await.unwrap();
        snapshot.write_all(b"BCdef").await.unwrap();
        let mut file = snapshot.into_file().await.unwrap().unwrap();
        let mut bytes = Vec::new();
        use std::io::{Read, Seek};
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, b"aBCdef");
        assert!(SpooledSnapshot::empty()
            .into_file()
            .await
            .unwrap()
            .is_none());
    }
}
