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
//! - Reads and seeks of a snapshot whose export is still running wait until the export has
//!   finished; a failed export turns every later read and seek into an error, never into a
//!   truncated snapshot that looks whole.

use std::future::Future;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::error::{NodeError, NodeResult};

/// The outcome a background export reports when it ends: the snapshot's size, or why it failed.
pub type ExportOutcome = Result<u64, String>;

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
    /// Set while a background export is still writing the file.
    export: Option<oneshot::Receiver<ExportOutcome>>,
    /// Why the export failed, once known.
    failure: Option<String>,
    /// A seek asked for before the export finished, started once it has.
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

    /// A snapshot that a background export is writing into `file`; `export` reports its end.
    pub fn exporting(file: std::fs::File, export: oneshot::Receiver<ExportOutcome>) -> Self {
        Self {
            file: Some(tokio::fs::File::from_std(file)),
            export: Some(export),
            ..Self::default()
        }
    }

    /// The received bytes as a blocking file for the importer, after every write has finished.
    /// `None` if this snapshot holds no file.
    pub async fn into_file(self) -> NodeResult<Option<std::fs::File>> {
        use tokio::io::AsyncWriteExt;
        let Some(mut file) = self.file else {
            return Ok(None);
        };
        file.flush().await.map_err(|source| NodeError::Io {
            context: "finish writing a received snapshot".into(),
            source,
        })?;
        Ok(Some(file.into_std().await))
    }

    /// Waits for a running export; `Ready(Ok)` once the file may be read.
    fn poll_export(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(export) = self.export.as_mut() {
            let outcome = ready!(Pin::new(export).poll(context));
            self.export = None;
            match outcome {
                Ok(Ok(_size_bytes)) => {}
                Ok(Err(reason)) => self.failure = Some(reason),
                Err(_) => self.failure = Some("the export task ended without a result".into()),
            }
        }
        match &self.failure {
            Some(reason) => Poll::Ready(Err(std::io::Error::other(format!(
                "snapshot export failed: {reason}"
            )))),
            None => Poll::Ready(Ok(())),
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
        ready!(this.poll_export(context))?;
        match this.file.as_mut() {
            Some(file) => Pin::new(file).poll_read(context, buffer),
            None => Poll::Ready(Ok(())),
        }
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
        match this.file.as_mut() {
            Some(file) => Pin::new(file).poll_write(context, buffer),
            None => Poll::Ready(Err(std::io::Error::other(
                "an empty snapshot cannot be written",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().file.as_mut() {
            Some(file) => Pin::new(file).poll_flush(context),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().file.as_mut() {
            Some(file) => Pin::new(file).poll_shutdown(context),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncSeek for SpooledSnapshot {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        let this = self.get_mut();
        if this.export.is_some() {
            // Started in `poll_complete`, once the export has finished.
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
        ready!(this.poll_export(context))?;
        let Some(file) = this.file.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if let Some(position) = this.seek_pending.take() {
            Pin::new(&mut *file).start_seek(position)?;
        }
        Pin::new(file).poll_complete(context)
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

    #[tokio::test]
    async fn reads_wait_for_the_export_and_see_all_of_it() {
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let file = spool.create_file("export").unwrap();
        let writer = file.try_clone().unwrap();
        let (done, export) = oneshot::channel();
        let mut snapshot = SpooledSnapshot::exporting(file, export);
        let producer = tokio::spawn(async move {
            use std::os::unix::fs::FileExt;
            tokio::task::yield_now().await;
            writer.write_all_at(b"0123456789", 0).unwrap();
            done.send(Ok(10)).unwrap();
        });
        // openraft's sender asks for the end first; that must wait for the whole export.
        assert_eq!(snapshot.seek(SeekFrom::End(0)).await.unwrap(), 10);
        snapshot.seek(SeekFrom::Start(4)).await.unwrap();
        let mut rest = Vec::new();
        snapshot.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"456789");
        producer.await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_export_is_an_error_not_a_short_snapshot() {
        let directory = tempfile::tempdir().unwrap();
        let spool = SpoolDirectory::open(directory.path()).unwrap();
        let file = spool.create_file("export").unwrap();
        let (done, export) = oneshot::channel();
        let mut snapshot = SpooledSnapshot::exporting(file, export);
        done.send(Err("device read failed".into())).unwrap();
        let error = snapshot.seek(SeekFrom::End(0)).await.unwrap_err();
        assert!(error.to_string().contains("device read failed"), "{error}");
        let mut bytes = Vec::new();
        assert!(snapshot.read_to_end(&mut bytes).await.is_err());

        let (done, export) = oneshot::channel::<ExportOutcome>();
        let mut snapshot = SpooledSnapshot::exporting(spool.create_file("export").unwrap(), export);
        drop(done);
        assert!(snapshot.seek(SeekFrom::End(0)).await.is_err());
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
