//! Thread rings: an io_uring per calling thread, so a transfer asked for by a tokio task goes to
//! the kernel from the task's own thread, and its answer wakes that thread's runtime directly.
//!
//! Why: through the engine thread every transfer crosses threads twice (task → engine thread to
//! submit, engine thread → task to answer). On this project's 2-vCPU virtual machines each
//! crossing can wake an idle vCPU, and those wake-ups, not the device, bounded the engine:
//! 4 KiB random reads at QD16 reached 0.6-0.65× of fio's IOPS, at QD32 0.83-0.93×. A prototype of
//! this design (2026-12-05, same file, interleaved with fio) reached 0.84× at QD16 and
//! 0.91-0.98× at QD32. It is what fio does: the thread that wants the I/O submits it and the
//! kernel posts the answer in that thread's context.
//!
//! How: a task's transfer is pushed on its thread's ring and submitted at once (one
//! `io_uring_enter`, as fio). The ring has no `SINGLE_ISSUER`/`DEFER_TASKRUN`: the kernel posts
//! each answer from the submitting thread's task work, so answers arrive even while nobody waits
//! in `io_uring_enter`. An eventfd registered with the ring (`IORING_REGISTER_EVENTFD`) is
//! signalled for every answer; a reaper task on the runtime waits on it through the runtime's
//! reactor, moves answers into their slots and wakes the waiting tasks. A waiting task also reaps
//! when it is polled, so an answer already posted costs no wake-up.
//!
//! When a thread ring is not used (the engine thread serves the transfer instead): outside a
//! tokio task (startup code, [`crate::engine::block_on`], plain threads), which could block the
//! only thread that would run the reaper; when the engine allows no thread rings, or all of them
//! exist and this thread has none; when its ring's slots are all in flight; for a transfer over
//! 1 GiB. A transfer whose answer is not whole (short, `EINTR`, an error) is done again in full
//! by the engine thread, which owns the retries and the error reports: re-reading or re-writing
//! the same bytes from the same buffer is harmless.
//!
//! Owns: the rings, their slots and reaper tasks, the thread-local table of rings.
//! Must not depend on: the on-disk formats.
//! Invariants: a buffer handed to the kernel stays in its slot until its answer is reaped, also
//! when the caller stops waiting; a ring is dropped only with nothing in flight, or its buffers
//! are leaked, never freed under the kernel; at most `ring_count_max` rings per engine and
//! [`SLOT_COUNT`] transfers in flight per ring; the submission and completion queues are touched
//! only under the ring's lock.

use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::engine::{register_file, signal_eventfd, OperationKind, StatisticsCounters, Target};
use crate::AlignedBuffer;

/// Transfers in flight on one ring; more wait for the engine thread.
pub(crate) const SLOT_COUNT: usize = 64;
/// Submission queue entries: every slot fits with room to spare (the completion queue is twice
/// this, so it never overflows).
const RING_ENTRIES: u32 = 128;
/// Longest transfer a thread ring takes in one SQE; longer ones go to the engine thread.
const TRANSFER_BYTES_MAX: usize = 1 << 30;
/// Attempts at handing a queued SQE to the kernel before the process aborts: the SQE points into
/// a buffer the slot holds, so it can neither be taken back nor left unsubmitted.
const SUBMIT_ATTEMPT_COUNT_MAX: u32 = 1_000;
const SUBMIT_RETRY_INTERVAL_MS: u64 = 1;
/// How long dropping a ring waits for transfers still in flight (the runtime stopped under
/// them) before it leaks their buffers rather than free memory the kernel may still write.
const DRAIN_TIMEOUT_MS: u64 = 30_000;

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's rings, one per engine it used. Weak: a ring lives as long as its reaper
    /// (and its transfers in flight), so a ring of a dropped engine or a stopped runtime goes
    /// away, with its descriptors, without waiting for this thread to look here again. Dropped
    /// when the thread exits, which retires the rings still alive.
    static THREAD_RINGS: RefCell<ThreadRingTable> = const { RefCell::new(ThreadRingTable(Vec::new())) };
    /// Set while [`crate::engine::block_on`] runs a future on this thread: the thread is then
    /// parked outside any runtime and could not run a reaper.
    static BLOCKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct ThreadRingTable(Vec<(u64, Weak<ThreadRing>)>);

impl Drop for ThreadRingTable {
    fn drop(&mut self) {
        for (_, ring) in self.0.drain(..) {
            if let Some(ring) = ring.upgrade() {
                ring.retire();
            }
        }
    }
}

/// Marks the current thread as blocked in [`crate::engine::block_on`] for the guard's life.
pub(crate) struct BlockingGuard {
    previous: bool,
}

impl BlockingGuard {
    pub(crate) fn enter() -> BlockingGuard {
        BlockingGuard {
            previous: BLOCKING.with(|blocking| blocking.replace(true)),
        }
    }
}

impl Drop for BlockingGuard {
    fn drop(&mut self) {
        BLOCKING.with(|blocking| blocking.set(self.previous));
    }
}

/// One engine's thread rings.
pub(crate) struct ThreadRings {
    engine_id: u64,
    /// The engine's descriptor, registered with every ring.
    file: Arc<File>,
    statistics: Arc<StatisticsCounters>,
    ring_count_max: usize,
    /// Transfers a thread ring took.
    transfer_count: AtomicU64,
    state: Mutex<ThreadRingsState>,
}

/// A snapshot of an engine's thread rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadRingStatistics {
    /// Rings alive (retired ones still draining included).
    pub ring_count: usize,
    /// Transfers handed to the kernel on a thread ring (the rest went through the engine thread).
    pub transfer_count: u64,
    /// Transfers on thread rings whose answer was not collected yet.
    pub in_flight: usize,
}

struct ThreadRingsState {
    rings: Vec<Weak<ThreadRing>>,
    closed: bool,
}

/// What [`ThreadRings::start`] did with a transfer.
pub(crate) enum Started {
    /// In flight on the calling thread's ring.
    Submitted(ThreadTransfer),
    /// Not taken (see the module doc); the engine thread serves it.
    Declined(AlignedBuffer),
}

/// How a thread-ring transfer ended.
pub(crate) enum Finished {
    Done(AlignedBuffer),
    /// The answer was not whole: do the transfer again through the engine thread.
    Again(AlignedBuffer),
}

impl ThreadRings {
    pub(crate) fn new(
        file: Arc<File>,
        statistics: Arc<StatisticsCounters>,
        ring_count_max: usize,
    ) -> ThreadRings {
        ThreadRings {
            engine_id: NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed),
            file,
            statistics,
            ring_count_max,
            transfer_count: AtomicU64::new(0),
            state: Mutex::new(ThreadRingsState {
                rings: Vec::new(),
                closed: false,
            }),
        }
    }

    pub(crate) fn statistics(&self) -> ThreadRingStatistics {
        let rings: Vec<Arc<ThreadRing>> = {
            let mut state = lock(&self.state);
            state.rings.retain(|ring| ring.strong_count() > 0);
            state.rings.iter().filter_map(Weak::upgrade).collect()
        };
        ThreadRingStatistics {
            ring_count: rings.len(),
            transfer_count: self.transfer_count.load(Ordering::Relaxed),
            in_flight: rings.iter().map(|ring| ring.lock_slots().in_flight()).sum(),
        }
    }

    /// Puts the transfer of `buffer[window]` at `offset_bytes` on the calling thread's ring, or
    /// gives the buffer back (see the module doc for when).
    pub(crate) fn start(
        &self,
        kind: OperationKind,
        offset_bytes: u64,
        buffer: AlignedBuffer,
        window: std::ops::Range<usize>,
    ) -> Started {
        debug_assert!(kind != OperationKind::Flush);
        if self.ring_count_max == 0
            || window.len() > TRANSFER_BYTES_MAX
            || BLOCKING.with(|blocking| blocking.get())
            || tokio::task::try_id().is_none()
        {
            return Started::Declined(buffer);
        }
        let Some(ring) = self.ring_of_this_thread() else {
            return Started::Declined(buffer);
        };
        match ring.submit(kind, offset_bytes, buffer, window) {
            Ok(slot) => {
                self.transfer_count.fetch_add(1, Ordering::Relaxed);
                Started::Submitted(ThreadTransfer {
                    ring,
                    slot,
                    collected: false,
                })
            }
            Err(buffer) => Started::Declined(buffer),
        }
    }

    /// Retires every ring: no new transfers; each reaper ends once its ring is empty.
    pub(crate) fn close(&self) {
        let rings = {
            let mut state = lock(&self.state);
            state.closed = true;
            std::mem::take(&mut state.rings)
        };
        for ring in rings.iter().filter_map(Weak::upgrade) {
            ring.retire();
        }
    }

    fn ring_of_this_thread(&self) -> Option<Arc<ThreadRing>> {
        THREAD_RINGS.with(|table| {
            let mut table = table.borrow_mut();
            // A ring whose reaper is gone (its runtime stopped) or that was retired is of no
            // further use to this thread.
            table
                .0
                .retain(|(_, ring)| ring.upgrade().is_some_and(|ring| ring.usable()));
            let found = table
                .0
                .iter()
                .find(|(id, _)| *id == self.engine_id)
                .and_then(|(_, ring)| ring.upgrade());
            if found.is_some() {
                return found;
            }
            let ring = self.open_ring()?;
            table.0.push((self.engine_id, Arc::downgrade(&ring)));
            Some(ring)
        })
    }

    /// Opens a ring for the calling thread and starts its reaper on the current runtime, if the
    /// limit allows.
    fn open_ring(&self) -> Option<Arc<ThreadRing>> {
        let mut state = lock(&self.state);
        state.rings.retain(|ring| ring.strong_count() > 0);
        if state.closed || state.rings.len() >= self.ring_count_max {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let ring = match ThreadRing::open(&self.file, self.statistics.clone()) {
            Ok(ring) => Arc::new(ring),
            Err(error) => {
                tracing::warn!(%error, "cannot open a thread ring; using the engine thread");
                return None;
            }
        };
        let eventfd = match ring.reaper_eventfd() {
            Ok(eventfd) => eventfd,
            Err(error) => {
                tracing::warn!(%error, "cannot watch a thread ring's eventfd; using the engine thread");
                return None;
            }
        };
        // Created before the task so that its drop runs even if the task never does (a runtime
        // shutting down drops the future unpolled).
        let presence = ReaperPresence(ring.clone());
        drop(runtime.spawn(reap_answers(presence, eventfd)));
        state.rings.push(Arc::downgrade(&ring));
        tracing::debug!(
            engine = self.engine_id,
            rings = state.rings.len(),
            "thread ring opened"
        );
        Some(ring)
    }
}

/// A transfer in flight on a thread ring; resolves once the kernel answered.
pub(crate) struct ThreadTransfer {
    ring: Arc<ThreadRing>,
    slot: usize,
    /// The answer was collected and the slot released (it may already serve another transfer).
    collected: bool,
}

impl Future for ThreadTransfer {
    type Output = Finished;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Finished> {
        let this = self.get_mut();
        assert!(
            !this.collected,
            "a thread transfer polled after it finished"
        );
        let mut slots = this.ring.lock_slots();
        if slots.entries[this.slot]
            .as_ref()
            .expect("a pending transfer's slot is occupied")
            .result
            .is_none()
        {
            this.ring.reap(&mut slots);
        }
        let slot = slots.entries[this.slot]
            .as_mut()
            .expect("a pending transfer's slot is occupied");
        match slot.result {
            Some(result) => {
                let slot = slots.release(this.slot);
                drop(slots);
                this.collected = true;
                Poll::Ready(this.ring.finish(slot, result))
            }
            None if this.ring.reaper_alive.load(Ordering::Acquire) => {
                slot.waker = Some(context.waker().clone());
                Poll::Pending
            }
            None => {
                // The reaper is gone (its runtime is stopping): nobody would wake us, so wait in
                // the kernel for the answer here. Bounded by the device answering.
                drop(slots);
                this.ring.wait_for_answers();
                context.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

impl Drop for ThreadTransfer {
    fn drop(&mut self) {
        if self.collected {
            return;
        }
        let mut slots = self.ring.lock_slots();
        let slot = slots.entries[self.slot]
            .as_mut()
            .expect("an uncollected transfer's slot is occupied");
        if slot.result.is_some() {
            // Answered, never collected: the buffer is free to go.
            drop(slots.release(self.slot));
        } else {
            // The kernel still holds the buffer; the reaper frees the slot on the answer.
            slot.abandoned = true;
        }
    }
}

struct Slot {
    kind: OperationKind,
    offset_bytes: u64,
    buffer: AlignedBuffer,
    length_bytes: usize,
    result: Option<i32>,
    waker: Option<Waker>,
    /// The caller stopped waiting: free the slot when the answer comes.
    abandoned: bool,
}

struct Slots {
    entries: Vec<Option<Slot>>,
    free: Vec<usize>,
}

impl Slots {
    fn release(&mut self, index: usize) -> Slot {
        let slot = self.entries[index]
            .take()
            .expect("released slot is occupied");
        self.free.push(index);
        slot
    }

    fn in_flight(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}

/// One thread's ring on one engine's device.
struct ThreadRing {
    ring: IoUring,
    /// The engine's device file, registered as fixed file 0 when the kernel allows.
    file: Arc<File>,
    target: Target,
    /// Registered with the ring; the reaper watches a duplicate of it.
    eventfd: OwnedFd,
    slots: Mutex<Slots>,
    statistics: Arc<StatisticsCounters>,
    /// No new transfers; the reaper ends once nothing is in flight.
    retired: AtomicBool,
    /// False once the reaper task is gone.
    reaper_alive: AtomicBool,
}

impl ThreadRing {
    fn open(file: &Arc<File>, statistics: Arc<StatisticsCounters>) -> std::io::Result<ThreadRing> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        let target = register_file(&ring, file);
        // SAFETY: plain syscall with constant flags; the result is checked before use.
        let raw_eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw_eventfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw_eventfd` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw_eventfd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(ThreadRing {
            ring,
            file: file.clone(),
            target,
            eventfd,
            slots: Mutex::new(Slots {
                entries: (0..SLOT_COUNT).map(|_| None).collect(),
                free: (0..SLOT_COUNT).rev().collect(),
            }),
            statistics,
            retired: AtomicBool::new(false),
            reaper_alive: AtomicBool::new(true),
        })
    }

    /// The eventfd, registered with the current runtime's reactor for the reaper.
    fn reaper_eventfd(&self) -> std::io::Result<AsyncFd<OwnedFd>> {
        let duplicate = self.eventfd.try_clone()?;
        // SAFETY: the `AsyncFd` owns `duplicate`, an open descriptor that stays open and the
        // same until the `AsyncFd` drops it.
        unsafe { AsyncFd::register_with_interest(duplicate, Interest::READABLE) }
            .map_err(|error| error.into_parts().1)
    }

    fn usable(&self) -> bool {
        !self.retired.load(Ordering::Acquire) && self.reaper_alive.load(Ordering::Acquire)
    }

    fn lock_slots(&self) -> MutexGuard<'_, Slots> {
        lock(&self.slots)
    }

    /// Queues the transfer and hands it to the kernel; gives the buffer back when no slot is
    /// free or the ring is retired.
    fn submit(
        &self,
        kind: OperationKind,
        offset_bytes: u64,
        mut buffer: AlignedBuffer,
        window: std::ops::Range<usize>,
    ) -> Result<usize, AlignedBuffer> {
        let mut slots = self.lock_slots();
        if !self.usable() {
            return Err(buffer);
        }
        let Some(index) = slots.free.pop() else {
            return Err(buffer);
        };
        assert!(window.start < window.end && window.end <= buffer.len());
        let length_bytes = window.len();
        // SAFETY: `window.start < window.end <= buffer.len()` (asserted above).
        let pointer = unsafe { buffer.as_mut_pointer().add(window.start) };
        let entry = self
            .entry(kind, pointer, length_bytes as u32, offset_bytes)
            .user_data(index as u64);
        // SAFETY: the entry points into `buffer`, which moves into the slot below (its heap
        // memory does not move) and stays there until the answer is reaped; fixed file 0 is
        // `self.file`, open for the ring's life. The slot count is below the queue size, so
        // the push cannot fail for lack of room, and the queue is only touched under this
        // lock.
        let pushed = unsafe { self.ring.submission_shared().push(&entry) };
        assert!(pushed.is_ok(), "a thread ring's submission queue is full");
        slots.entries[index] = Some(Slot {
            kind,
            offset_bytes,
            buffer,
            length_bytes,
            result: None,
            waker: None,
            abandoned: false,
        });
        self.hand_to_kernel();
        Ok(index)
    }

    fn entry(
        &self,
        kind: OperationKind,
        pointer: *mut u8,
        length_bytes: u32,
        offset_bytes: u64,
    ) -> io_uring::squeue::Entry {
        macro_rules! entry_for {
            ($fd:expr) => {
                match kind {
                    OperationKind::Read => opcode::Read::new($fd, pointer, length_bytes)
                        .offset(offset_bytes)
                        .build(),
                    OperationKind::Write => opcode::Write::new($fd, pointer, length_bytes)
                        .offset(offset_bytes)
                        .build(),
                    OperationKind::WriteDurable => opcode::Write::new($fd, pointer, length_bytes)
                        .offset(offset_bytes)
                        .rw_flags(libc::RWF_DSYNC)
                        .build(),
                    OperationKind::Flush => unreachable!("flushes go to the engine thread"),
                }
            };
        }
        match self.target {
            Target::Fixed => entry_for!(types::Fixed(0)),
            Target::Raw => entry_for!(types::Fd(self.file.as_raw_fd())),
        }
    }

    /// `io_uring_enter` for the queued SQEs. Called under the slots lock so the queue length it
    /// reads is stable.
    fn hand_to_kernel(&self) {
        let mut failed_attempts = 0u32;
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => {}
                Err(error) => {
                    failed_attempts += 1;
                    if failed_attempts >= SUBMIT_ATTEMPT_COUNT_MAX {
                        tracing::error!(%error, "thread ring submit keeps failing");
                        std::process::abort();
                    }
                    std::thread::sleep(Duration::from_millis(SUBMIT_RETRY_INTERVAL_MS));
                }
            }
        }
    }

    /// Moves every posted answer into its slot and wakes its waiter (or frees an abandoned slot).
    fn reap(&self, slots: &mut Slots) {
        // SAFETY: the completion queue is only read under the slots lock, which the caller holds.
        let completion = unsafe { self.ring.completion_shared() };
        for entry in completion {
            let index = entry.user_data() as usize;
            let slot = slots.entries[index]
                .as_mut()
                .expect("an answer for an occupied slot");
            debug_assert!(slot.result.is_none(), "two answers for one transfer");
            slot.result = Some(entry.result());
            if slot.abandoned {
                drop(slots.release(index));
            } else if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
    }

    /// Turns an answer into the caller's outcome, counting whole transfers.
    fn finish(&self, slot: Slot, result: i32) -> Finished {
        let whole = usize::try_from(result).is_ok_and(|bytes| bytes == slot.length_bytes);
        if !whole {
            tracing::debug!(
                kind = ?slot.kind,
                offset_bytes = slot.offset_bytes,
                result,
                "thread ring transfer not whole; the engine thread does it again"
            );
            return Finished::Again(slot.buffer);
        }
        let counters = &self.statistics;
        let bytes = slot.length_bytes as u64;
        match slot.kind {
            OperationKind::Read => {
                counters.reads.fetch_add(1, Ordering::Relaxed);
                counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
            }
            OperationKind::Write | OperationKind::WriteDurable => {
                counters.writes.fetch_add(1, Ordering::Relaxed);
                if slot.kind == OperationKind::WriteDurable {
                    counters.durable_writes.fetch_add(1, Ordering::Relaxed);
                }
                counters.bytes_written.fetch_add(bytes, Ordering::Relaxed);
            }
            OperationKind::Flush => unreachable!("flushes go to the engine thread"),
        }
        Finished::Done(slot.buffer)
    }

    /// Waits in the kernel until at least one answer is posted (up to 100 ms), then reaps.
    fn wait_for_answers(&self) {
        let timeout = types::Timespec::new().nsec(100_000_000);
        let arguments = types::SubmitArgs::new().timespec(&timeout);
        let mut slots = self.lock_slots();
        if slots.in_flight() > 0 {
            // ETIME or EINTR only mean "look again".
            let _ = self.ring.submitter().submit_with_args(1, &arguments);
        }
        self.reap(&mut slots);
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        // Wake the reaper so it sees the flag.
        if let Err(error) = signal_eventfd(&self.eventfd) {
            tracing::warn!(%error, "cannot wake a thread ring's reaper");
        }
    }
}

impl Drop for ThreadRing {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(DRAIN_TIMEOUT_MS);
        loop {
            let in_flight = self.lock_slots().in_flight();
            if in_flight == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    in_flight,
                    "a thread ring's transfers never answered; leaking their buffers"
                );
                let slots = self
                    .slots
                    .get_mut()
                    .unwrap_or_else(|poison| poison.into_inner());
                for slot in slots.entries.iter_mut().filter_map(Option::take) {
                    std::mem::forget(slot.buffer);
                }
                return;
            }
            // Answers not collected by anyone are released here.
            self.wait_for_answers();
            let slots = self
                .slots
                .get_mut()
                .unwrap_or_else(|poison| poison.into_inner());
            for index in 0..slots.entries.len() {
                if slots.entries[index]
                    .as_ref()
                    .is_some_and(|slot| slot.result.is_some())
                {
                    drop(slots.release(index));
                }
            }
        }
    }
}

/// Held by the reaper task; when the task is dropped (finished, or its runtime stopped), the
/// ring's waiters are woken to wait for their answers themselves.
struct ReaperPresence(Arc<ThreadRing>);

impl Drop for ReaperPresence {
    fn drop(&mut self) {
        self.0.reaper_alive.store(false, Ordering::Release);
        let mut slots = self.0.lock_slots();
        for slot in slots.entries.iter_mut().flatten() {
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
    }
}

/// The reaper: waits on the ring's eventfd through the runtime's reactor and reaps. Ends once the
/// ring is retired and empty, or when the runtime stops.
async fn reap_answers(presence: ReaperPresence, eventfd: AsyncFd<OwnedFd>) {
    let ring = &presence.0;
    loop {
        let Ok(mut guard) = eventfd.readable().await else {
            tracing::warn!("a thread ring's eventfd failed; its waiters reap themselves");
            return;
        };
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into a live local from an eventfd we own. Reading before
        // reaping matters: an answer posted after this read signals the eventfd again.
        let _ = unsafe {
            libc::read(
                eventfd.get_ref().as_raw_fd(),
                (&mut value as *mut u64).cast(),
                8,
            )
        };
        // Tokio clears only the readiness this guard saw, never a newer event.
        guard.clear_ready();
        let mut slots = ring.lock_slots();
        ring.reap(&mut slots);
        if ring.retired.load(Ordering::Acquire) && slots.in_flight() == 0 {
            return;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves slots consistent (every step is a single field
    // update), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::engine::block_on;
    use crate::test_support::{patterned, scratch_file};
    use crate::{AlignedBuffer, DeviceError, Engine, EngineOptions};

    fn runtime(workers: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn tasks_transfer_on_their_threads_rings_and_read_back_what_was_written() {
        let file = scratch_file(4 << 20);
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        let runtime = runtime(2);
        let tasks: Vec<_> = (0..64u64)
            .map(|index| {
                let engine = engine.clone();
                runtime.spawn(async move {
                    let offset_bytes = index * 8192;
                    let written = patterned(8192, index as u8);
                    let written = engine.write(offset_bytes, written).await.unwrap();
                    let read = engine
                        .read_into(offset_bytes, AlignedBuffer::new_zeroed(8192))
                        .await
                        .unwrap();
                    assert_eq!(&read[..], &written[..], "block {index}");
                    // A window: only the second half of the buffer is filled.
                    let read = engine
                        .read_into_window(offset_bytes, AlignedBuffer::new_zeroed(8192), 4096..8192)
                        .await
                        .unwrap();
                    assert!(read[..4096].iter().all(|&byte| byte == 0));
                    assert_eq!(&read[4096..], &written[..4096], "window of block {index}");
                })
            })
            .collect();
        runtime.block_on(async {
            for task in tasks {
                task.await.unwrap();
            }
        });
        let rings = engine.thread_ring_statistics();
        assert!(
            (1..=2).contains(&rings.ring_count),
            "one ring per worker thread that asked: {rings:?}"
        );
        assert_eq!(rings.transfer_count, 3 * 64, "{rings:?}");
        assert_eq!(rings.in_flight, 0);
        let statistics = engine.statistics();
        assert_eq!(statistics.writes, 64);
        assert_eq!(statistics.reads, 128);
        assert_eq!(statistics.bytes_written, 64 * 8192);
        // And the engine thread sees the same bytes.
        let read = block_on(engine.read(63 * 8192, 8192)).unwrap();
        assert_eq!(&read[..], &patterned(8192, 63)[..]);
    }

    #[test]
    fn outside_tasks_and_with_no_rings_allowed_the_engine_thread_serves() {
        let file = scratch_file(1 << 20);
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        // `block_on` and a runtime's own `block_on` future are not tasks.
        block_on(engine.write(0, patterned(4096, 1))).unwrap();
        runtime(1).block_on(async {
            engine.write(4096, patterned(4096, 2)).await.unwrap();
        });
        assert_eq!(engine.thread_ring_statistics().transfer_count, 0);
        assert_eq!(engine.thread_ring_statistics().ring_count, 0);

        let options = EngineOptions {
            thread_ring_count_max: 0,
            ..EngineOptions::default()
        };
        let engine = Engine::open(file.path(), options).unwrap();
        let runtime = runtime(1);
        let read = runtime
            .block_on(runtime.spawn({
                let engine = engine.clone();
                async move { engine.read(0, 8192).await.unwrap() }
            }))
            .unwrap();
        assert_eq!(&read[..4096], &patterned(4096, 1)[..]);
        assert_eq!(&read[4096..], &patterned(4096, 2)[..]);
        assert_eq!(engine.thread_ring_statistics(), Default::default());
    }

    #[test]
    fn the_ring_count_is_bounded_and_other_threads_use_the_engine_thread() {
        let file = scratch_file(1 << 20);
        let options = EngineOptions {
            thread_ring_count_max: 1,
            ..EngineOptions::default()
        };
        let engine = Engine::open(file.path(), options).unwrap();
        // Two runtimes of one worker each: two threads ask, only the first gets a ring.
        let write_on_own_runtime = |index: u64| {
            let runtime = runtime(1);
            let engine = engine.clone();
            runtime
                .block_on(runtime.spawn(async move {
                    engine
                        .write(index * 4096, patterned(4096, index as u8))
                        .await
                        .unwrap();
                }))
                .unwrap();
            runtime
        };
        let first = write_on_own_runtime(0);
        let second = write_on_own_runtime(1);
        let rings = engine.thread_ring_statistics();
        assert_eq!(rings.ring_count, 1, "{rings:?}");
        assert_eq!(rings.transfer_count, 1, "{rings:?}");
        assert_eq!(engine.statistics().writes, 2);
        for index in 0..2u64 {
            let read = block_on(engine.read(index * 4096, 4096)).unwrap();
            assert_eq!(
                &read[..],
                &patterned(4096, index as u8)[..],
                "block {index}"
            );
        }
        drop((first, second));
    }

    #[test]
    fn a_caller_that_stops_waiting_leaves_the_ring_whole() {
        // Written, not sparse: a read of a hole is answered during the submission itself, and
        // these reads must still be in flight when their callers stop waiting.
        let file = tempfile::NamedTempFile::new().expect("temporary file");
        std::io::Write::write_all(&mut file.as_file(), &vec![7u8; 8 << 20]).unwrap();
        file.as_file().sync_all().unwrap();
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        let runtime = runtime(1);
        let engine_for_task = engine.clone();
        runtime
            .block_on(runtime.spawn(async move {
                let engine = engine_for_task;
                // Abandon many reads right after they were submitted; their slots must come back
                // as the answers arrive, or the ring would run out of slots below.
                for round in 0..4u64 {
                    for index in 0..super::SLOT_COUNT as u64 {
                        let read = engine.read((round * 64 + index) % 2048 * 4096, 4096);
                        let _ = tokio::time::timeout(Duration::ZERO, read).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let rings = engine.thread_ring_statistics();
                assert_eq!(
                    rings.in_flight, 0,
                    "every abandoned slot came back: {rings:?}"
                );
                engine.write(0, patterned(4096, 9)).await.unwrap();
                let read = engine.read(0, 4096).await.unwrap();
                assert_eq!(&read[..], &patterned(4096, 9)[..]);
            }))
            .unwrap();
        let rings = engine.thread_ring_statistics();
        assert_eq!(rings.ring_count, 1);
        // None was declined for want of a slot: each round found all slots free again.
        assert_eq!(
            rings.transfer_count,
            4 * super::SLOT_COUNT as u64 + 2,
            "{rings:?}"
        );
    }

    #[test]
    fn a_transfer_that_is_not_whole_is_done_again_by_the_engine_thread() {
        // The engine learns the size at open; shrinking the file under it makes the last block
        // read short (end of file), first on the thread ring, then on the engine thread, whose
        // error the caller gets.
        let file = scratch_file(1 << 20);
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        file.as_file().set_len((1 << 20) - 4096).unwrap();
        let runtime = runtime(1);
        let engine_for_task = engine.clone();
        let error = runtime
            .block_on(runtime.spawn(async move {
                engine_for_task
                    .read((1 << 20) - 4096, 4096)
                    .await
                    .unwrap_err()
            }))
            .unwrap();
        assert!(
            matches!(
                &error,
                DeviceError::Io {
                    operation: "read",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(
            engine.thread_ring_statistics().transfer_count,
            1,
            "the thread ring was tried first"
        );
        assert_eq!(engine.statistics().reads, 0);
    }

    #[test]
    fn a_runtime_stopped_under_transfers_and_a_dropped_engine_free_their_rings() {
        let file = scratch_file(8 << 20);
        let engine = Engine::open(file.path(), EngineOptions::default()).unwrap();
        {
            let runtime = runtime(2);
            for index in 0..256u64 {
                let engine = engine.clone();
                runtime.spawn(async move {
                    let _ = engine.read(index % 2048 * 4096, 4096).await;
                });
            }
            // Dropping the runtime drops the tasks (and the reapers) mid-flight.
        }
        // A new runtime's tasks open new rings: the old ones have no reaper.
        let runtime = runtime(1);
        let engine_for_task = engine.clone();
        runtime
            .block_on(runtime.spawn(async move {
                engine_for_task.write(0, patterned(4096, 3)).await.unwrap();
                engine_for_task.read(0, 4096).await.unwrap()
            }))
            .map(|read| assert_eq!(&read[..], &patterned(4096, 3)[..]))
            .unwrap();
        let statistics = engine.thread_ring_statistics();
        assert_eq!(statistics.in_flight, 0, "{statistics:?}");
        drop(engine);
        // The engine closed its rings: each reaper ends and its ring is dropped.
        drop(runtime);
    }
}
