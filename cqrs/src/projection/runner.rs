//! Running a projection: catch up, then follow the store live until stopped.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::task::{backoff, is_transient, Stop, Task};
use crate::view::View;

use super::core::Watched;
use super::{DeadLetter, DeadLetters, Projection};

impl<A: Aggregate, V: View<A>> Projection<A, V> {
    /// Catches up, then follows the store until `shutdown` completes or a poison event stops
    /// it under [`PoisonPolicy::Stop`](super::PoisonPolicy::Stop).
    ///
    /// Live, it waits on [`EventRepository::subscribe`](crate::EventRepository::subscribe)
    /// (no busy polling) and also reads the store every
    /// [safety poll interval](Projection::with_safety_poll_interval); with a store that gives
    /// no notification it polls every [poll interval](Projection::with_poll_interval).
    ///
    /// **Delivery bound.** An event committed through a store handle of this process is read
    /// as soon as the runner is woken: the lag is one read and one commit, with no polling
    /// delay. An event committed by another process that the store does not notify about
    /// (SQLite; PostgreSQL without LISTEN/NOTIFY) is read within the safety poll interval
    /// (default 1 s); without any notification, within the poll interval (default 100 ms).
    ///
    /// Store errors ([`CQRSError::PersistenceError`]) and conflicts with another projector
    /// are retried with a backoff (up to 5 s) and recorded as the handle's
    /// [`last_error`](ProjectionHandle::last_error); the runner keeps going. A shutdown lets
    /// the batch in flight finish (or not start): it never leaves a half-applied batch.
    ///
    /// # Errors
    /// The poison event's error under `PoisonPolicy::Stop` ([`CQRSError::ViewHandler`],
    /// [`CQRSError::EventDecode`] or [`CQRSError::DamagedRow`]), or a view row that no longer deserializes
    /// ([`CQRSError::Deserialization`]: bump the view's `VERSION`).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), CQRSError> {
        let (stop, signal) = watch::channel(false);
        let work = self.run_until(Stop::on(signal));
        tokio::pin!(work);
        tokio::select! {
            result = &mut work => return result,
            () = shutdown => {}
        }
        let _ = stop.send(true);
        work.await
    }

    /// Runs the projection on a tokio task (see [`run`](Projection::run)) and returns its
    /// handle. Dropping the handle stops the runner, like [`ProjectionHandle::stop`].
    ///
    /// ```
    /// # use cqrs::doc::{Counter, CounterCommand, CounterTotal};
    /// # use uuid::Uuid;
    /// use std::time::Duration;
    /// use cqrs::{CQRSFramework, MemoryEventRepository, MemoryViewRepository, Projection, Query};
    ///
    /// struct TotalById;
    /// impl Query<Counter, CounterTotal> for TotalById {}
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let store = MemoryEventRepository::new();
    /// let views = MemoryViewRepository::<CounterTotal>::new();
    /// let framework = CQRSFramework::<Counter>::new(store.clone());
    /// let runner = Projection::<Counter, CounterTotal>::new(store, views.clone()).start();
    ///
    /// let id = Uuid::new_v4();
    /// let receipt = framework.dispatch(id, CounterCommand::Increment { by: 4 }).await?;
    /// // Read your write: wait until the running projection has applied it.
    /// runner.wait_for(receipt.last_position().unwrap(), Duration::from_secs(5)).await?;
    /// let total = TotalById.query(&id, &views).await?;
    /// assert_eq!(total.unwrap().total, 4);
    /// runner.shutdown().await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[must_use = "dropping the handle stops the projection"]
    pub fn start(self) -> ProjectionHandle {
        ProjectionHandle::spawn(self.core.watch(), |stop| self.run_until(stop))
    }

    async fn run_until(self, mut stop: Stop) -> Result<(), CQRSError> {
        let span = tracing::info_span!(
            "projection",
            projection = %self.core.name,
            view = V::TABLE_NAME,
            view_version = V::VERSION,
        );
        self.follow(&mut stop).instrument(span).await
    }

    async fn follow(&self, stop: &mut Stop) -> Result<(), CQRSError> {
        let mut changes = self.events.subscribe();
        let mut failures: u32 = 0;
        // The checkpoint as this runner last committed it; `None` after an error.
        let mut known = None;
        loop {
            if stop.is_stopped() {
                return Ok(());
            }
            // Mark the current notification seen *before* reading, so one that arrives
            // during the read wakes the wait below at once.
            if let Some(rx) = changes.as_mut() {
                rx.borrow_and_update();
            }
            match self.catch_up_until(stop, known).await {
                Ok(Some(position)) => {
                    failures = 0;
                    known = Some(position);
                }
                Ok(None) => return Ok(()),
                Err(error) if is_transient(&error) => {
                    known = None;
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(%error, retry_in = ?wait, "projection failed; retrying");
                    self.core.shared.set_last_error(Some(error.to_string()));
                    if stop.sleep(wait).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(error) => return Err(error),
            }
            let woken = match changes.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { changes = None; },
                        () = tokio::time::sleep(self.safety_poll_interval) => {}
                        () = stop.stopped() => {}
                    }
                    true
                }
                None => !stop.sleep(self.poll_interval).await,
            };
            if !woken {
                return Ok(());
            }
        }
    }
}

/// A running projection (see [`Projection::start`] and
/// [`NatsProjection::start`](crate::NatsProjection::start)): its position, its errors, and a
/// way to stop it. Dropping the handle stops the projection.
pub struct ProjectionHandle {
    task: Task,
    dead_letters: Arc<dyn DeadLetters>,
}

impl fmt::Debug for ProjectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionHandle")
            .field("name", &self.name())
            .field("position", &self.position())
            .field("live", &self.is_live())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl ProjectionHandle {
    /// Spawns `run` (a source's loop, given the stop signal; `watched` is what its engine
    /// shows a handle) on a tokio task and returns its handle.
    pub(crate) fn spawn<F>(watched: Watched, run: impl FnOnce(Stop) -> F) -> Self
    where
        F: Future<Output = Result<(), CQRSError>> + Send + 'static,
    {
        let Watched {
            name,
            position,
            shared,
            dead_letters,
        } = watched;
        ProjectionHandle {
            task: Task::spawn(name, position, shared, run),
            dead_letters,
        }
    }

    /// The projection's checkpoint name.
    pub fn name(&self) -> &str {
        self.task.name()
    }

    /// The position of the last event applied (0 until the checkpoint is read).
    pub fn position(&self) -> i64 {
        self.task.position()
    }

    /// A receiver of the position, updated after every committed batch: await
    /// `changed()` or `wait_for(..)` on it to follow the projection.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.task.subscribe()
    }

    /// Waits until the projection has applied every event up to `position` (read your
    /// writes: pass a [`DispatchReceipt`](crate::DispatchReceipt)'s last position), for at
    /// most `timeout`. It reads nothing from the store: the runner reports its progress.
    ///
    /// # Errors
    /// [`CQRSError::Timeout`]; [`CQRSError::ProjectionStopped`] when the runner ended
    /// before reaching `position`.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> Result<i64, CQRSError> {
        self.task.wait_for(position, timeout).await
    }

    /// True once the projection has caught up with its source (it then follows it live) and
    /// activated its view version (see [`Projection`]).
    pub fn is_live(&self) -> bool {
        self.task.is_live()
    }

    /// True when the runner has ended (stopped, or failed: see [`wait`](Self::wait)).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The last error the runner met, rendered: a store error it is retrying, or the error
    /// it stopped with. `None` when there was none.
    pub fn last_error(&self) -> Option<String> {
        self.task.last_error()
    }

    /// The events the projection skipped under
    /// [`PoisonPolicy::SkipAndRecord`](super::PoisonPolicy::SkipAndRecord).
    ///
    /// # Errors
    /// The dead-letter sink's error.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, CQRSError> {
        self.dead_letters.list(self.task.name()).await
    }

    /// Asks the runner to stop after the batch in flight (a wait between handler retries
    /// ends at once); see [`wait`](Self::wait).
    pub fn stop(&self) {
        self.task.stop();
    }

    /// Waits until the runner has ended, after [`stop`](Self::stop) or on its own, without
    /// taking the handle (for a handle kept behind an `Arc`); [`last_error`](Self::last_error)
    /// then says how it ended. A batch in flight when it was stopped has been committed or
    /// rolled back by then.
    ///
    /// ```
    /// # async fn demo(handle: cqrs::ProjectionHandle) {
    /// handle.stop();
    /// handle.finished().await;
    /// assert!(handle.is_finished());
    /// # }
    /// ```
    pub async fn finished(&self) {
        self.task.finished().await;
    }

    /// Waits for the runner to end and returns how it ended.
    ///
    /// # Errors
    /// The error the runner stopped with (see [`Projection::run`]).
    pub async fn wait(self) -> Result<(), CQRSError> {
        self.task.wait().await
    }

    /// [`stop`](Self::stop), then [`wait`](Self::wait).
    ///
    /// # Errors
    /// The error the runner had stopped with before, if any.
    pub async fn shutdown(self) -> Result<(), CQRSError> {
        self.stop();
        self.wait().await
    }
}
