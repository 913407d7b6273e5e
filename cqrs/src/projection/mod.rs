//! Projections: feed stored events, in global order, into views, with a checkpoint.
//!
//! A [`Projection`] reads the events after its checkpoint, applies them to its view and
//! commits the view changes together with the new checkpoint. [`Projection::catch_up`] does
//! it once; [`Projection::start`] (or [`Projection::run`]) catches up and then follows the
//! store live, with a [`ProjectionHandle`] to read its position, wait for a position (read
//! your writes), read its dead letters and stop it.
//!
//! Delivery guarantees, poison events and view version switches are described in
//! `docs/adr/0005-projections.md` and on [`Projection`].

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::store::{EventRepository, ViewRepository};
use crate::task::Stop;
use crate::view::View;

mod core;
mod per_aggregate;
mod poison;
mod runner;

pub(crate) use self::core::{Applied, Core, Watched};

pub(crate) use crate::store::{DeadLetter, DeadLetters};
pub use per_aggregate::{EventOutcome, PerAggregateProjection, SkipReason};
pub use poison::{HandlerRetry, PoisonPolicy};
pub use runner::ProjectionHandle;

/// Keeps one view up to date from the event store.
///
/// [`catch_up`](Projection::catch_up) reads every event after the view's checkpoint in
/// global order, in batches, feeds the events of aggregate type `A` to the view instances
/// they concern, and commits each batch's view changes together with the new checkpoint
/// through [`ViewRepository::commit`]. [`start`](Projection::start) does the same and then
/// keeps following the store.
///
/// # Exactly once
///
/// When the view store commits the view rows and the checkpoint atomically, with optimistic
/// row versions, and refuses a checkpoint that goes back (the in-memory and SQL view stores
/// do), every event is applied exactly once however often the projection is stopped, killed
/// and restarted, and however many projectors of the same view run at once: before it
/// commits, a batch re-reads the checkpoint it started from, and a batch whose checkpoint or
/// rows moved on is dropped and redone from the new checkpoint.
///
/// # Poison events
///
/// A view handler error (or an event that does not decode, such as a stored payload that is
/// not JSON) is retried per [`HandlerRetry`], then handled per [`PoisonPolicy`]; the events
/// of the batch before it are committed first, one commit, exactly once. A row the store
/// cannot read as an event at all ([`CQRSError::DamagedRow`], see
/// [`EventRepository::read_all`]) is a poison event at its position in the same way.
///
/// # View versions
///
/// The default checkpoint name embeds [`View::VERSION`], so a new version starts from
/// position 0 while the rows of the old version (SQL stores key rows by version) stay
/// readable. Once caught up, the projection calls [`ViewRepository::activate_version`]:
/// readers that check [`ViewRepository::active_version`] switch then.
///
/// ```
/// # use cqrs::doc::{Counter, CounterCommand, CounterTotal};
/// # use uuid::Uuid;
/// use cqrs::{CQRSFramework, MemoryEventRepository, MemoryViewRepository, Projection, ViewRepository};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = MemoryEventRepository::new();
/// let views = MemoryViewRepository::<CounterTotal>::new();
/// let framework = CQRSFramework::<Counter>::new(store.clone());
/// let projection = Projection::<Counter, CounterTotal>::new(store, views.clone());
///
/// let id = Uuid::new_v4();
/// let receipt = framework.dispatch(id, CounterCommand::Increment { by: 4 }).await?;
/// projection.catch_up().await?;
/// assert!(projection.position().await? >= receipt.last_position().unwrap());
/// let total = ViewRepository::<Counter, _>::load(&views, &id.to_string()).await?;
/// assert_eq!(total.unwrap().total, 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct Projection<A: Aggregate, V: View<A>> {
    events: Arc<dyn EventRepository>,
    core: Core<A, V>,
    batch_size: usize,
    poll_interval: Duration,
    safety_poll_interval: Duration,
    _marker: PhantomData<fn() -> (A, V)>,
}

impl<A: Aggregate, V: View<A>> fmt::Debug for Projection<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projection")
            .field("name", &self.core.name)
            .field("batch_size", &self.batch_size)
            .field("poison", &self.core.poison)
            .field("retry", &self.core.retry)
            .field("poll_interval", &self.poll_interval)
            .field("safety_poll_interval", &self.safety_poll_interval)
            .field("load_concurrency", &self.core.load_concurrency)
            .finish()
    }
}

impl<A: Aggregate, V: View<A>> Projection<A, V> {
    /// A projection of `V` from `events` into `views`, checkpointed under
    /// [`default_name`](Self::default_name).
    pub fn new(
        events: impl EventRepository + 'static,
        views: impl ViewRepository<A, V> + 'static,
    ) -> Self {
        Projection {
            events: Arc::new(events),
            core: Core::new(Arc::new(views), Self::default_name()),
            batch_size: 500,
            poll_interval: Duration::from_millis(100),
            safety_poll_interval: Duration::from_secs(1),
            _marker: PhantomData,
        }
    }

    /// `"{TABLE_NAME}_v{VERSION}"`: a new view version starts from a fresh checkpoint.
    pub fn default_name() -> String {
        format!("{}_v{}", V::TABLE_NAME, V::VERSION)
    }

    /// Uses another checkpoint name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.core.name = name.into();
        self
    }

    /// Reads and commits up to `batch_size` events at a time (default 500, at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// What to do with a poison event once the retries are spent (default
    /// [`PoisonPolicy::Stop`]).
    #[must_use]
    pub fn with_poison_policy(mut self, policy: PoisonPolicy) -> Self {
        self.core.poison = policy;
        self
    }

    /// How often a failing event is tried, and the backoff between tries (default
    /// [`HandlerRetry::default`]: 3 tries, 100 ms then 200 ms).
    #[must_use]
    pub fn with_handler_retry(mut self, retry: HandlerRetry) -> Self {
        self.core.set_retry(retry);
        self
    }

    /// Where [`PoisonPolicy::SkipAndRecord`] records skipped events (default: a
    /// [`MemoryDeadLetters`](crate::MemoryDeadLetters) owned by this projection).
    #[must_use]
    pub fn with_dead_letters(mut self, sink: impl DeadLetters + 'static) -> Self {
        self.core.dead_letters = Arc::new(sink);
        self
    }

    /// How often a running projection polls when the store gives no change notification
    /// ([`EventRepository::subscribe`] returns `None`); default 100 ms.
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How often a running projection reads the store even without a notification, for
    /// events appended by other processes that the store's notification does not see;
    /// default 1 s.
    #[must_use]
    pub fn with_safety_poll_interval(mut self, interval: Duration) -> Self {
        self.safety_poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many loads of view rows a batch runs at once (default 8, at least 1). A batch
    /// decodes its events, splits the ids of the rows they touch evenly into at most this
    /// many [`ViewRepository::load_many_for_update`] calls, runs them at once, then applies
    /// the events in order. On the SQL stores each call is one query; with 1, a batch reads
    /// all its rows with one query.
    #[must_use]
    pub fn with_load_concurrency(mut self, loads: usize) -> Self {
        self.core.load_concurrency = loads.max(1);
        self
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The global position of the last event applied.
    ///
    /// # Errors
    /// The view store's error.
    pub async fn position(&self) -> Result<i64, CQRSError> {
        self.core.checkpoint().await
    }

    /// The events this projection skipped under [`PoisonPolicy::SkipAndRecord`].
    ///
    /// # Errors
    /// The dead-letter sink's error.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, CQRSError> {
        self.core.dead_letters().await
    }

    /// Applies every event committed so far; returns the new checkpoint position. Once
    /// caught up, the view's version is made the active one
    /// ([`ViewRepository::activate_version`]) if no higher one is.
    ///
    /// A batch that another projector of the same view committed first is redone from the
    /// new checkpoint, so two projectors never apply an event twice.
    ///
    /// # Errors
    /// A store error, or a poison event under [`PoisonPolicy::Stop`] (once the retries are
    /// spent): [`CQRSError::ViewHandler`] naming the view and the event,
    /// [`CQRSError::EventDecode`], or [`CQRSError::DamagedRow`] for a row the store cannot
    /// read as an event. Everything before the failing event is committed; the checkpoint
    /// stays just before it.
    pub async fn catch_up(&self) -> Result<i64, CQRSError> {
        let position = self.catch_up_until(&mut Stop::never(), None).await?;
        Ok(position.unwrap_or_default())
    }

    /// Waits until the checkpoint reaches `position` (for reading your own writes), catching
    /// up as events arrive, for at most `timeout`. A running projection's
    /// [`ProjectionHandle::wait_for`] waits without reading the store itself.
    ///
    /// # Errors
    /// [`CQRSError::Timeout`], or what `catch_up` returns.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> Result<i64, CQRSError> {
        let work = async {
            let mut changes = self.events.subscribe();
            loop {
                if let Some(rx) = changes.as_mut() {
                    rx.borrow_and_update();
                }
                let reached = self.catch_up().await?;
                if reached >= position {
                    return Ok(reached);
                }
                match changes.as_mut() {
                    Some(rx) => {
                        tokio::select! {
                            changed = rx.changed() => if changed.is_err() { changes = None; },
                            () = tokio::time::sleep(self.safety_poll_interval) => {}
                        }
                    }
                    None => tokio::time::sleep(self.poll_interval).await,
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| CQRSError::Timeout(timeout))?
    }

    /// Catches up; `None` if stopped first.
    ///
    /// `known` is the checkpoint as this projection last committed it (a running projection
    /// passes it to spare a read per wake-up); `None` reads it. A wrong `known` costs only a
    /// wasted batch: every commit re-reads the checkpoint first and a moved one is a
    /// [`Applied::Stale`] batch, redone from the stored checkpoint.
    async fn catch_up_until(
        &self,
        stop: &mut Stop,
        known: Option<i64>,
    ) -> Result<Option<i64>, CQRSError> {
        let mut position = match known {
            Some(position) => position,
            None => self.core.checkpoint().await?,
        };
        self.core.publish(position);
        // The highest position the store knows is committed, taken before each read: a short
        // page below it ended early (before a damaged row, see `EventRepository::read_all`),
        // so read on. Appends after the read do not count, so a busy store still ends a
        // catch-up as a short page always did.
        let head = self.events.subscribe();
        let mut stale = 0;
        loop {
            if stop.is_stopped() {
                return Ok(None);
            }
            let known = head.as_ref().map(|head| *head.borrow());
            let (applied, last, more) = match self.events.read_all(position, self.batch_size).await
            {
                Ok(batch) => {
                    let Some(last) = batch.last().map(|e| e.position) else {
                        self.core.caught_up().await?;
                        return Ok(Some(position));
                    };
                    let span = tracing::debug_span!(
                        "projection_batch",
                        projection = %self.core.name,
                        view = V::TABLE_NAME,
                        view_version = V::VERSION,
                        from = position + 1,
                        to = last,
                        events = batch.len(),
                    );
                    let applied = self
                        .core
                        .apply_batch(position, &batch, stop)
                        .instrument(span)
                        .await?;
                    let more =
                        batch.len() >= self.batch_size || known.is_none_or(|known| known > last);
                    (applied, last, more)
                }
                // A row the store cannot read as an event: one poison event at its position.
                Err(CQRSError::DamagedRow(damage)) if damage.position > position => {
                    let applied = self
                        .core
                        .handle_damaged_row(position, &damage, Some(&*self.events), stop)
                        .await?;
                    (applied, damage.position, true)
                }
                Err(error) => return Err(error),
            };
            match applied {
                Applied::Committed => {
                    stale = 0;
                    position = last;
                    self.core.publish(position);
                    if !more {
                        self.core.caught_up().await?;
                        return Ok(Some(position));
                    }
                }
                Applied::Stale => {
                    position = self.core.resume_after_stale(position, &mut stale).await?;
                }
                Applied::Stopped => return Ok(None),
            }
        }
    }
}
