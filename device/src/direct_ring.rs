//! `DirectRing`: a small io_uring owned by one thread, which waits for its own completions.
//!
//! Why it exists: the log writer is a dedicated thread whose every write is on the commit path
//! of a synchronous caller (a `fsync` waits for it). Going through the shared [`Engine`] costs
//! two thread hand-offs per operation (writer → engine thread → writer), and on a small-write
//! workload those wake-ups, not the device, dominated the node's CPU. The writer has nothing else
//! to do while its write is in flight, so it submits on a ring of its own and sleeps in
//! `io_uring_enter` until the kernel answers: one wake-up instead of three.
//!
//! The ring is created with `SINGLE_ISSUER | DEFER_TASKRUN` when the kernel allows (falling back
//! like the engine), so it must stay on the thread that opened it: the type is not `Send`. It
//! opens the device file again (`O_DIRECT`); a flush on any descriptor of the file covers every
//! completed write to it, so a flush here also covers the engine's writes and vice versa.
//! Completed transfers count in the engine's statistics, so device byte counts stay whole.
//!
//! Owns: its ring and descriptor. Must not depend on: the on-disk formats.
//! Invariants: offsets and lengths are multiples of 4096 and within the device (asserted or
//! refused); a call returns only after the kernel has answered every SQE it queued, so a
//! borrowed buffer is never touched after the call; retries of `EINTR`/`EAGAIN` are bounded.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use crate::engine::{
    build_ring, check_transfer_range, open_device_file, open_ring, register_file,
    StatisticsCounters, Target, RING_SETUPS,
};
use crate::{AlignedBuffer, DeviceError};

/// Submission queue entries: a write and a flush are the most queued at once.
const RING_ENTRIES: u32 = 8;
/// Longest single SQE transfer; longer writes continue like short transfers.
const TRANSFER_PIECE_BYTES_MAX: usize = 1 << 30;
/// Retries of `EINTR`/`EAGAIN` answers (and of cancelled linked flushes) per call.
const RETRY_COUNT_MAX: u32 = 64;
/// Attempts at handing queued SQEs to the kernel before the process aborts: queued SQEs point
/// into the caller's buffer, so returning with them still queued is never allowed.
const SUBMIT_ATTEMPT_COUNT_MAX: u32 = 1_000;
const SUBMIT_RETRY_INTERVAL_MS: u64 = 10;

const USER_DATA_WRITE: u64 = 1;
const USER_DATA_FLUSH: u64 = 2;

/// A synchronous io_uring on the device file for one thread (see the module doc).
pub struct DirectRing {
    ring: IoUring,
    /// Kept open for as long as the ring may use it (also when registered).
    file: File,
    target: Target,
    path: PathBuf,
    size_bytes: u64,
    statistics: Arc<StatisticsCounters>,
    /// Not `Send`: a `SINGLE_ISSUER` ring refuses submissions from any other thread.
    _one_thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for DirectRing {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DirectRing")
            .field("path", &self.path)
            .field("target", &self.target)
            .finish()
    }
}

impl DirectRing {
    /// Opens `path` again for direct I/O and creates the ring on the calling thread.
    pub(crate) fn open(
        path: &Path,
        size_bytes: u64,
        statistics: Arc<StatisticsCounters>,
    ) -> Result<DirectRing, DeviceError> {
        let open_error = |source: std::io::Error| DeviceError::Open {
            path: path.to_owned(),
            source: Arc::new(source),
        };
        let file = open_device_file(path).map_err(open_error)?;
        let (ring, setup) =
            open_ring(RING_ENTRIES, &RING_SETUPS, build_ring).map_err(open_error)?;
        let target = register_file(&ring, &file);
        tracing::debug!(?path, ?setup, ?target, "direct ring opened");
        Ok(DirectRing {
            ring,
            file,
            target,
            path: path.to_owned(),
            size_bytes,
            statistics,
            _one_thread: PhantomData,
        })
    }

    /// Writes `buffer` at `offset_bytes`; with `durable` (`RWF_DSYNC`) it is durable on return.
    pub fn write(
        &mut self,
        offset_bytes: u64,
        buffer: &AlignedBuffer,
        durable: bool,
    ) -> Result<(), DeviceError> {
        self.check_range(offset_bytes, buffer.len())?;
        let flags = if durable { libc::RWF_DSYNC } else { 0 };
        self.run(Some((offset_bytes, buffer, flags)), false)
    }

    /// Writes `buffer` at `offset_bytes`, then flushes: on return the buffer and every write that
    /// completed before it are durable. The flush is linked to the write, so both go to the
    /// kernel in one call and the thread wakes once.
    pub fn write_then_flush(
        &mut self,
        offset_bytes: u64,
        buffer: &AlignedBuffer,
    ) -> Result<(), DeviceError> {
        self.check_range(offset_bytes, buffer.len())?;
        self.run(Some((offset_bytes, buffer, 0)), true)
    }

    /// `fdatasync`: every write that completed before this call is durable when it returns.
    pub fn flush(&mut self) -> Result<(), DeviceError> {
        self.run(None, true)
    }

    fn check_range(&self, offset_bytes: u64, length_bytes: usize) -> Result<(), DeviceError> {
        check_transfer_range(offset_bytes, length_bytes, self.size_bytes)
    }

    /// Runs an optional write (continuing short transfers) and an optional flush after it, until
    /// both are done or one fails. Each round queues what is left (the flush linked behind the
    /// write's last piece) and waits for every queued SQE's answer before looking at them.
    fn run(
        &mut self,
        write: Option<(u64, &AlignedBuffer, i32)>,
        flush: bool,
    ) -> Result<(), DeviceError> {
        let length_bytes = write.map_or(0, |(_, buffer, _)| buffer.len());
        let mut done_bytes = 0usize;
        let mut flush_pending = flush;
        let mut retry_count = 0u32;
        while done_bytes < length_bytes || flush_pending {
            let mut queued = 0usize;
            if let Some((offset_bytes, buffer, flags)) = write.filter(|_| done_bytes < length_bytes)
            {
                let piece_bytes = (length_bytes - done_bytes).min(TRANSFER_PIECE_BYTES_MAX);
                let last_piece = done_bytes + piece_bytes == length_bytes;
                // SAFETY: `done_bytes < buffer.len()`, so the pointer stays inside the buffer.
                let pointer = unsafe { buffer.as_pointer().add(done_bytes) };
                let mut entry = self.write_entry(
                    pointer,
                    piece_bytes as u32,
                    offset_bytes + done_bytes as u64,
                    flags,
                );
                if flush_pending && last_piece {
                    entry = entry.flags(squeue::Flags::IO_LINK);
                }
                self.push(entry.user_data(USER_DATA_WRITE));
                queued += 1;
                if flush_pending && last_piece {
                    self.push(self.flush_entry().user_data(USER_DATA_FLUSH));
                    queued += 1;
                }
            } else if flush_pending {
                self.push(self.flush_entry().user_data(USER_DATA_FLUSH));
                queued += 1;
            }
            let answers = self.submit_and_reap(queued);
            let mut failure: Option<(&'static str, u64, std::io::Error)> = None;
            for (user_data, result) in answers {
                let offset_bytes = write.map_or(0, |(offset, _, _)| offset) + done_bytes as u64;
                let retryable = result == -libc::EINTR
                    || result == -libc::EAGAIN
                    || (user_data == USER_DATA_FLUSH && result == -libc::ECANCELED);
                if result < 0 && retryable {
                    // A linked flush is cancelled when the write before it fell short or
                    // failed; it is queued again once the write is whole.
                    retry_count += 1;
                    if retry_count > RETRY_COUNT_MAX {
                        failure.get_or_insert((
                            "retry",
                            offset_bytes,
                            std::io::Error::from_raw_os_error(-result),
                        ));
                    }
                } else if result < 0 {
                    let operation = if user_data == USER_DATA_FLUSH {
                        "fdatasync"
                    } else {
                        "write"
                    };
                    failure.get_or_insert((
                        operation,
                        offset_bytes,
                        std::io::Error::from_raw_os_error(-result),
                    ));
                } else if user_data == USER_DATA_FLUSH {
                    flush_pending = false;
                    self.statistics.flushes.fetch_add(1, Ordering::Relaxed);
                } else if result == 0 {
                    failure.get_or_insert((
                        "write",
                        offset_bytes,
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "transfer made no progress (end of file?)",
                        ),
                    ));
                } else {
                    done_bytes += result as usize;
                    assert!(
                        done_bytes <= length_bytes,
                        "the kernel wrote past the buffer"
                    );
                    if done_bytes == length_bytes {
                        self.statistics.writes.fetch_add(1, Ordering::Relaxed);
                        if write.is_some_and(|(_, _, flags)| flags & libc::RWF_DSYNC != 0) {
                            self.statistics
                                .durable_writes
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        self.statistics
                            .bytes_written
                            .fetch_add(length_bytes as u64, Ordering::Relaxed);
                    }
                }
            }
            if let Some((operation, offset_bytes, error)) = failure {
                return Err(DeviceError::io(operation, &self.path, offset_bytes, error));
            }
        }
        Ok(())
    }

    fn write_entry(
        &self,
        pointer: *const u8,
        length_bytes: u32,
        offset_bytes: u64,
        flags: i32,
    ) -> squeue::Entry {
        match self.target {
            Target::Fixed => opcode::Write::new(types::Fixed(0), pointer, length_bytes)
                .offset(offset_bytes)
                .rw_flags(flags)
                .build(),
            Target::Raw => {
                opcode::Write::new(types::Fd(self.file.as_raw_fd()), pointer, length_bytes)
                    .offset(offset_bytes)
                    .rw_flags(flags)
                    .build()
            }
        }
    }

    fn flush_entry(&self) -> squeue::Entry {
        match self.target {
            Target::Fixed => opcode::Fsync::new(types::Fixed(0))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Target::Raw => opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: the entry points into a buffer the caller of `run` borrows for the whole call,
        // and `run` does not return before the kernel answered the entry (`submit_and_reap`);
        // fixed file 0 is `self.file`, registered for the ring's lifetime. At most two entries
        // are queued per round in a ring of `RING_ENTRIES`, and every round empties the queue.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        assert!(pushed.is_ok(), "the direct ring's submission queue is full");
    }

    /// Hands the `queued` SQEs to the kernel and returns their `(user_data, result)` answers,
    /// all of them: it waits until the kernel answered every one.
    fn submit_and_reap(&mut self, queued: usize) -> Vec<(u64, i32)> {
        let mut answers = Vec::with_capacity(queued);
        let mut failed_attempts = 0u32;
        while answers.len() < queued {
            match self.ring.submit_and_wait(queued - answers.len()) {
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => {}
                Err(error) => {
                    // EAGAIN/EBUSY or worse: the queued entries still point into the caller's
                    // buffer, so this call must not return before the kernel has them.
                    failed_attempts += 1;
                    if failed_attempts >= SUBMIT_ATTEMPT_COUNT_MAX {
                        tracing::error!(path = ?self.path, %error, "direct ring submit keeps failing");
                        std::process::abort();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(SUBMIT_RETRY_INTERVAL_MS));
                }
            }
            answers.extend(
                self.ring
                    .completion()
                    .map(|entry| (entry.user_data(), entry.result())),
            );
        }
        assert_eq!(answers.len(), queued, "an answer for an entry never queued");
        answers
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;
    use crate::test_support::{patterned, scratch_file};
    use crate::{Engine, EngineOptions};

    #[test]
    fn writes_and_flushes_are_read_back_and_counted() {
        let file = scratch_file(1 << 20);
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        let mut ring = engine.open_direct_ring().unwrap();
        let first = patterned(8192, 1);
        let second = patterned(4096, 2);
        let third = patterned(12288, 3);
        ring.write(0, &first, false).unwrap();
        ring.write(8192, &second, true).unwrap();
        ring.write_then_flush(65536, &third).unwrap();
        ring.flush().unwrap();
        let statistics = engine.statistics();
        assert_eq!(statistics.writes, 3);
        assert_eq!(statistics.bytes_written, 8192 + 4096 + 12288);
        assert_eq!(statistics.flushes, 2);
        // The engine's own descriptor sees the ring's writes.
        let read = crate::engine::block_on(engine.read(0, 12288)).unwrap();
        assert_eq!(&read[..8192], &first[..]);
        assert_eq!(&read[8192..], &second[..]);
        let read = crate::engine::block_on(engine.read(65536, 12288)).unwrap();
        assert_eq!(&read[..], &third[..]);
    }

    #[test]
    fn out_of_bounds_is_refused_without_io() {
        let file = scratch_file(1 << 20);
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        let mut ring = engine.open_direct_ring().unwrap();
        let buffer = patterned(8192, 4);
        let error = ring.write((1 << 20) - 4096, &buffer, false).unwrap_err();
        assert!(matches!(error, DeviceError::OutOfBounds { .. }), "{error}");
        let error = ring.write_then_flush(1 << 20, &buffer).unwrap_err();
        assert!(matches!(error, DeviceError::OutOfBounds { .. }), "{error}");
        assert_eq!(engine.statistics().writes, 0);
        assert_eq!(engine.statistics().flushes, 0);
    }

    #[test]
    fn a_failed_write_is_an_error_and_its_linked_flush_is_not_counted() {
        // A read-only view of the file makes every write fail with EBADF from the kernel.
        let file = scratch_file(1 << 20);
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        let mut ring = engine.open_direct_ring().unwrap();
        let read_only = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(file.path())
            .unwrap();
        ring.file = read_only;
        ring.target = Target::Raw;
        let error = ring.write_then_flush(0, &patterned(4096, 5)).unwrap_err();
        assert!(
            matches!(
                &error,
                DeviceError::Io {
                    operation: "write",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(engine.statistics().writes, 0);
        assert_eq!(engine.statistics().flushes, 0);
    }
}
