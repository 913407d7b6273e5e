//! Background tasks: the projections' and the relay's runners, how they are asked to stop,
//! and what their handles follow (position, liveness, the last error).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{CQRSError, ProjectionStopped};

/// The longest wait between two tries after a store or broker error.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Errors a background runner retries (with [`backoff`]) instead of ending with: a store or
/// broker that failed, a conflict with another runner, a stream behind the checkpoint (which
/// its relay fills again).
pub(crate) fn is_transient(error: &CQRSError) -> bool {
    matches!(
        error,
        CQRSError::PersistenceError(_)
            | CQRSError::ViewConflict { .. }
            | CQRSError::StreamBehind { .. }
    )
}

/// The wait after the `failures`-th failure in a row: 50 ms doubling, up to 5 s.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(10);
    Duration::from_millis(50)
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// Lets a runner interrupt waits; `catch_up` never stops.
#[derive(Clone)]
pub struct Stop {
    signal: Option<watch::Receiver<bool>>,
}

impl Stop {
    pub(crate) fn never() -> Self {
        Stop { signal: None }
    }

    pub(crate) fn on(signal: watch::Receiver<bool>) -> Self {
        Stop {
            signal: Some(signal),
        }
    }

    /// True once a stop was asked, or the handle that could ask is gone.
    pub fn is_stopped(&self) -> bool {
        self.signal.as_ref().is_some_and(|signal| {
            *signal.borrow() || signal.has_changed().is_err() // sender gone: stop too
        })
    }

    /// Sleeps for `duration`; true if a stop was asked meanwhile.
    pub(crate) async fn sleep(&mut self, duration: Duration) -> bool {
        match self.signal.as_mut() {
            None => {
                tokio::time::sleep(duration).await;
                false
            }
            Some(signal) => {
                let woken = tokio::select! {
                    () = tokio::time::sleep(duration) => false,
                    _ = signal.wait_for(|stop| *stop) => true,
                };
                woken || self.is_stopped()
            }
        }
    }

    /// Waits until a stop is asked (forever for [`Stop::never`]).
    pub async fn stopped(&mut self) {
        match self.signal.as_mut() {
            None => std::future::pending().await,
            Some(signal) => {
                let _ = signal.wait_for(|stop| *stop).await;
            }
        }
    }
}

/// What a runner shares with its handle.
#[derive(Debug, Default)]
pub struct Shared {
    /// Caught up at least once.
    pub(crate) live: AtomicBool,
    /// The last error the runner met, rendered.
    pub(crate) last_error: Mutex<Option<String>>,
}

impl Shared {
    /// Records the last error (`None`: clears it).
    pub fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }

    /// Records that the runner caught up.
    pub fn set_live(&self) {
        self.live.store(true, Ordering::Release);
    }
}

/// A runner on a tokio task, as its handle sees it: the vocabulary every handle of the
/// crate shares (`stop`, `wait`, `shutdown`, `wait_for`, `is_finished`, ...).
#[derive(Debug)]
pub struct Task {
    name: String,
    stop: watch::Sender<bool>,
    position: watch::Receiver<i64>,
    shared: Arc<Shared>,
    /// Closed once the runner has ended and its error, if any, is the last error.
    ended: watch::Receiver<()>,
    task: JoinHandle<Result<(), CQRSError>>,
}

impl Task {
    /// Spawns `run` (given the stop signal) on a tokio task. `position` follows its
    /// progress (the sender's drop says the runner ended); an error that ends the task
    /// becomes the last error.
    pub fn spawn<F>(
        name: String,
        position: watch::Receiver<i64>,
        shared: Arc<Shared>,
        run: impl FnOnce(Stop) -> F,
    ) -> Self
    where
        F: Future<Output = Result<(), CQRSError>> + Send + 'static,
    {
        let (stop, signal) = watch::channel(false);
        let (ending, ended) = watch::channel(());
        let work = run(Stop::on(signal));
        let task = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move {
                let result = work.await;
                if let Err(error) = &result {
                    shared.set_last_error(Some(error.to_string()));
                }
                drop(ending);
                result
            }
        });
        Task {
            name,
            stop,
            position,
            shared,
            ended,
            task,
        }
    }

    /// The runner's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The runner's position.
    pub fn position(&self) -> i64 {
        *self.position.borrow()
    }

    /// A receiver of the position.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.position.clone()
    }

    /// Waits until the position reaches `position`, for at most `timeout`.
    ///
    /// # Errors
    /// [`CQRSError::Timeout`]; [`CQRSError::ProjectionStopped`] when the runner ended first.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> Result<i64, CQRSError> {
        let mut progress = self.position.clone();
        let mut ended = self.ended.clone();
        let reached = tokio::time::timeout(timeout, async {
            let reached = progress
                .wait_for(|reached| *reached >= position)
                .await
                .map(|reached| *reached);
            if reached.is_err() {
                // The runner dropped its position before its task recorded why it ended:
                // wait for that, so `last_error` tells once this returns.
                let _ = ended.changed().await;
            }
            reached
        })
        .await
        .map_err(|_| CQRSError::Timeout(timeout))?;
        reached.map_err(|_| {
            CQRSError::ProjectionStopped(ProjectionStopped {
                projection: self.name.clone(),
                reached: self.position(),
                wanted: position,
            })
        })
    }

    /// True once the runner caught up.
    pub fn is_live(&self) -> bool {
        self.shared.live.load(Ordering::Acquire)
    }

    /// True when the runner has ended.
    pub fn is_finished(&self) -> bool {
        // The runner drops `ending` as its last step, a moment before tokio marks the task
        // finished: either says it has ended, so `finished` and this agree.
        self.ended.has_changed().is_err() || self.task.is_finished()
    }

    /// The last error the runner met, rendered.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Asks the runner to stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the runner has ended, without taking the handle.
    pub async fn finished(&self) {
        let mut ended = self.ended.clone();
        // The sender is never written, only dropped when the runner ends.
        let _ = ended.changed().await;
    }

    /// Waits for the runner to end; resumes its panic.
    ///
    /// # Errors
    /// The error the runner ended with.
    pub async fn wait(self) -> Result<(), CQRSError> {
        let Task { task, stop, .. } = self;
        let result = task.await;
        drop(stop);
        match result {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Ok(()), // cancelled with its runtime
        }
    }
}
