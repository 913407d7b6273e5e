//! The background task behind the relay's and the consumer's handles: the vocabulary of the
//! handles of `cqrs` (`stop`, `wait`, `shutdown`, `wait_for`, `is_live`, `is_finished`,
//! `last_error`).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cqrs::{CQRSError, ProjectionStopped};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The longest wait between two tries after an error.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The wait after the `failures`-th failure in a row: 50 ms doubling, up to 5 s.
pub(crate) fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(10);
    Duration::from_millis(50)
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// What a runner shares with its handle.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    live: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    pub(crate) fn set_live(&self) {
        self.live.store(true, Ordering::Release);
    }
}

/// A runner on a tokio task, as its handle sees it.
#[derive(Debug)]
pub(crate) struct Task {
    name: String,
    stop: watch::Sender<bool>,
    position: watch::Receiver<i64>,
    shared: Arc<Shared>,
    task: JoinHandle<Result<(), CQRSError>>,
}

impl Task {
    /// Spawns `run`, given a receiver that turns `true` when a stop is asked. `position`
    /// follows its progress; an error that ends the task becomes the last error.
    pub(crate) fn spawn<F>(
        name: String,
        position: watch::Receiver<i64>,
        shared: Arc<Shared>,
        run: impl FnOnce(watch::Receiver<bool>) -> F,
    ) -> Self
    where
        F: Future<Output = Result<(), CQRSError>> + Send + 'static,
    {
        let (stop, signal) = watch::channel(false);
        let work = run(signal);
        let task = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move {
                let result = work.await;
                if let Err(error) = &result {
                    shared.set_last_error(Some(error.to_string()));
                }
                result
            }
        });
        Task {
            name,
            stop,
            position,
            shared,
            task,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn position(&self) -> i64 {
        *self.position.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<i64> {
        self.position.clone()
    }

    pub(crate) async fn wait_for(
        &self,
        position: i64,
        timeout: Duration,
    ) -> Result<i64, CQRSError> {
        let mut progress = self.position.clone();
        let reached = tokio::time::timeout(timeout, async {
            progress
                .wait_for(|reached| *reached >= position)
                .await
                .map(|reached| *reached)
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

    pub(crate) fn is_live(&self) -> bool {
        self.shared.live.load(Ordering::Acquire)
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub(crate) async fn wait(self) -> Result<(), CQRSError> {
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

/// Waits until `stop` turns true or `wait` has passed, or (with `changes`) the store reports
/// a change; true when a stop was asked.
pub(crate) async fn pause(
    stop: &mut watch::Receiver<bool>,
    changes: &mut Option<watch::Receiver<i64>>,
    wait: Duration,
) -> bool {
    if stopped(stop) {
        return true;
    }
    let change = async {
        match changes.as_mut() {
            Some(rx) => {
                if let Ok(Err(_)) = tokio::time::timeout(wait, rx.changed()).await {
                    // The store is gone; poll from now on.
                    *changes = None;
                }
            }
            None => tokio::time::sleep(wait).await,
        }
    };
    let asked = tokio::select! {
        _ = stop.wait_for(|stop| *stop) => true,
        () = change => false,
    };
    asked || stopped(stop)
}

/// True when a stop was asked, or the handle is gone.
pub(crate) fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}
