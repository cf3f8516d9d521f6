//! `ReadBarrier`: concurrent linearizable reads of one container share one quorum round.
//!
//! Why: every read of a replicated container first confirms, with a quorum, that this node
//! still leads it and has applied everything committed (`StorageNode::leading_raft`, openraft's
//! `ensure_linearizable`: a heartbeat round to the followers, then a wait for the apply). A
//! sequential read through FUSE has many reads in flight (the kernel's readahead), and each
//! paid a round of its own. A round that *starts after* a read arrived proves for that read as
//! much as a round of its own would: so reads that arrive while a round runs wait for the next
//! one, which starts as soon as that one ends, and all of them are answered by it.
//!
//! Owns: the readers waiting for a round, and whether a round is running.
//! Must not depend on: Raft itself (the round is a function given at construction), the gRPC
//! layer.
//! Invariants:
//! - A reader is answered only by a round that started after it arrived: it is taken into a
//!   batch only when that batch's round is about to start.
//! - At most one round of a barrier runs at once, in a task of its own (a reader that goes away
//!   cancels nothing); the task ends when a round finds no reader waiting.
//! - At most [`READERS_WAITING_MAX`] readers wait; more are refused at once.
//! - If a round panics, its readers and those waiting for the next round get an error, and the
//!   next reader starts a new task.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Readers waiting for a round at once (the driver has at most a few hundred requests in
/// flight per mount).
pub const READERS_WAITING_MAX: usize = 4_096;

/// Why a round did not confirm a read point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadPointError {
    /// This node does not lead the container; the leader's address when known.
    NotLeader { leader_address: Option<String> },
    /// The round failed otherwise.
    Failed(String),
}

/// What a round answers each reader of its batch.
pub type RoundResult = Result<(), ReadPointError>;

/// One quorum round: confirms a read point as of its start.
pub type Round = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = RoundResult> + Send>> + Send + Sync>;

/// See the module documentation.
pub struct ReadBarrier {
    round: Round,
    state: Mutex<BarrierState>,
}

#[derive(Default)]
struct BarrierState {
    running: bool,
    waiting: Vec<oneshot::Sender<RoundResult>>,
    rounds_started: u64,
}

impl ReadBarrier {
    pub fn new(round: Round) -> Arc<ReadBarrier> {
        Arc::new(ReadBarrier {
            round,
            state: Mutex::new(BarrierState::default()),
        })
    }

    /// Waits for a round that started after this call, and answers with its result.
    pub async fn confirm(self: &Arc<Self>) -> RoundResult {
        let (sender, receiver) = oneshot::channel();
        let start_task = {
            let mut state = self.lock();
            if state.waiting.len() >= READERS_WAITING_MAX {
                return Err(ReadPointError::Failed(format!(
                    "{READERS_WAITING_MAX} reads already wait for a read point"
                )));
            }
            state.waiting.push(sender);
            !std::mem::replace(&mut state.running, true)
        };
        if start_task {
            let barrier = Arc::clone(self);
            tokio::spawn(async move { barrier.run_rounds().await });
        }
        receiver.await.unwrap_or_else(|_| {
            Err(ReadPointError::Failed(
                "the read point's round ended without an answer".to_string(),
            ))
        })
    }

    /// Rounds started since the barrier was made (for tests and status).
    pub fn rounds_started(&self) -> u64 {
        self.lock().rounds_started
    }

    /// Runs rounds while readers wait; each round answers the readers that were waiting when
    /// it started.
    async fn run_rounds(self: Arc<Self>) {
        // Marks the barrier idle if a round panics, so later readers do not wait for a task
        // that is gone.
        let _idle_on_panic = IdleOnPanic(&self);
        loop {
            let batch = {
                let mut state = self.lock();
                if state.waiting.is_empty() {
                    // In the same critical section as the look: a reader arriving after it
                    // sees the barrier idle and starts a task of its own.
                    state.running = false;
                    return;
                }
                state.rounds_started += 1;
                std::mem::take(&mut state.waiting)
            };
            let result = (self.round)().await;
            for reader in batch {
                // A reader that went away does not need its answer.
                let _ = reader.send(result.clone());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BarrierState> {
        // Each critical section is a few field updates: a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Ends the running state of a barrier whose round task unwinds from a panic.
struct IdleOnPanic<'a>(&'a ReadBarrier);

impl Drop for IdleOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut state = self.0.lock();
        state.running = false;
        // No round of this task will answer them; dropping their senders does (an error).
        state.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::Semaphore;

    /// A round that waits for a permit of `gate` before it ends, counting its starts, and
    /// answers `Failed(n)` for its `n`th start when `fail` is set.
    fn gated_round(gate: Arc<Semaphore>, starts: Arc<AtomicU64>, fail: bool) -> Round {
        Arc::new(move || {
            let gate = Arc::clone(&gate);
            let number = starts.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                gate.acquire().await.expect("open").forget();
                if fail {
                    Err(ReadPointError::Failed(number.to_string()))
                } else {
                    Ok(())
                }
            })
        })
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn readers_arriving_during_a_round_share_the_next_one() {
        let gate = Arc::new(Semaphore::new(0));
        let starts = Arc::new(AtomicU64::new(0));
        let barrier = ReadBarrier::new(gated_round(gate.clone(), starts.clone(), true));
        let first = tokio::spawn({
            let barrier = barrier.clone();
            async move { barrier.confirm().await }
        });
        settle().await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "the first reader's round runs"
        );
        // Twenty readers arrive while it runs: none of them may be answered by it.
        let later: Vec<_> = (0..20)
            .map(|_| {
                let barrier = barrier.clone();
                tokio::spawn(async move { barrier.confirm().await })
            })
            .collect();
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 1, "no round while one runs");
        gate.add_permits(1);
        assert_eq!(
            first.await.unwrap(),
            Err(ReadPointError::Failed("1".to_string()))
        );
        settle().await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "one more round, for all of them"
        );
        gate.add_permits(1);
        for reader in later {
            assert_eq!(
                reader.await.unwrap(),
                Err(ReadPointError::Failed("2".to_string())),
                "answered by the round that started after it arrived"
            );
        }
        settle().await;
        assert_eq!(barrier.rounds_started(), 2);
        assert!(
            !barrier.lock().running,
            "the task ended with nobody waiting"
        );
    }

    #[tokio::test]
    async fn a_lone_reader_gets_a_round_of_its_own_each_time() {
        let gate = Arc::new(Semaphore::new(1_000));
        let starts = Arc::new(AtomicU64::new(0));
        let barrier = ReadBarrier::new(gated_round(gate, starts.clone(), false));
        for expected in 1..=5 {
            assert_eq!(barrier.confirm().await, Ok(()));
            assert_eq!(starts.load(Ordering::SeqCst), expected);
        }
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_does_not_stop_the_round_of_the_others() {
        let gate = Arc::new(Semaphore::new(0));
        let starts = Arc::new(AtomicU64::new(0));
        let barrier = ReadBarrier::new(gated_round(gate.clone(), starts.clone(), false));
        let leaving = tokio::spawn({
            let barrier = barrier.clone();
            async move { barrier.confirm().await }
        });
        let staying = tokio::spawn({
            let barrier = barrier.clone();
            async move { barrier.confirm().await }
        });
        settle().await;
        leaving.abort();
        settle().await;
        gate.add_permits(1);
        assert_eq!(staying.await.unwrap(), Ok(()));
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_round_that_panics_answers_its_readers_and_the_next_reader_starts_anew() {
        let panicked = Arc::new(AtomicU64::new(0));
        let round: Round = Arc::new({
            let panicked = panicked.clone();
            move || {
                let first = panicked.fetch_add(1, Ordering::SeqCst) == 0;
                Box::pin(async move {
                    assert!(!first, "the first round fails hard");
                    Ok(())
                })
            }
        });
        let barrier = ReadBarrier::new(round);
        assert!(matches!(
            barrier.confirm().await,
            Err(ReadPointError::Failed(_))
        ));
        assert_eq!(barrier.confirm().await, Ok(()), "a new task, a new round");
    }
}
