//! Projections: feed stored events, in global order, into views, with a checkpoint.
//!
//! A [`Projection`] reads the events after its checkpoint, applies them to its view and
//! commits the view changes together with the new checkpoint. [`Projection::catch_up`] does
//! it once; [`Projection::spawn`] (or [`Projection::run`]) catches up and then follows the
//! store live, with a [`ProjectionHandle`] to read its position, wait for a position (read
//! your writes), read its dead letters and stop it.
//!
//! Delivery guarantees, poison events and view version switches are described in
//! `docs/adr/0005-projections.md` and on [`Projection`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{stream, StreamExt, TryStreamExt};
use tokio::sync::watch;
use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::error::{CQRSError, DamagedRow, ViewHandlerError};
use crate::event::{EventEnvelope, PersistableDomainEvent};
use crate::store::EventRepository;
use crate::store::{Checkpoint, ViewContext, ViewRepository};
use crate::view::View;

mod poison;
mod runner;

pub use crate::error::ProjectionStopped;
pub use crate::store::memory::MemoryDeadLetters;
pub use crate::store::{DeadLetter, DeadLetterSkip, DeadLetters};
pub use poison::{HandlerRetry, PoisonPolicy};
pub use runner::ProjectionHandle;

/// How many times in a row a batch may find its checkpoint moved by another projector before
/// [`Projection::catch_up`] gives up with [`CQRSError::ViewConflict`].
const MAX_STALE_IN_A_ROW: u32 = 64;

/// How many view rows a batch loads at once, by default.
const LOAD_CONCURRENCY: usize = 8;

/// The envelopes of one stored event, each with the id of the view instance it updates.
/// The envelopes one stored event decoded into, and the view ids each one updates (by index
/// into the envelopes).
type Targets<A> = (
    Vec<EventEnvelope<<A as Aggregate>::Events>>,
    Vec<(String, usize)>,
);

/// Keeps one view up to date from the event store.
///
/// [`catch_up`](Projection::catch_up) reads every event after the view's checkpoint in
/// global order, in batches, feeds the events of aggregate type `A` to the view instances
/// they concern, and commits each batch's view changes together with the new checkpoint
/// through [`ViewRepository::commit`]. [`spawn`](Projection::spawn) does the same and then
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
/// # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
/// # use serde::{Deserialize, Serialize};
/// # use uuid::Uuid;
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { Incremented { by: u32 } }
/// # #[derive(Debug, Clone)] enum CounterCommand { Increment { by: u32 } }
/// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct CounterError(#[from] CQRSError);
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent; type Commands = CounterCommand; type Errors = CounterError; type State = ();
/// #     async fn handle_command(&self, _: Uuid, _: &(), c: CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
/// #         let CounterCommand::Increment { by } = c; Ok(vec![CounterEvent::Incremented { by }]) }
/// #     fn handle_event(&self, _: &mut (), _: &CounterEvent) {}
/// # }
/// # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// # struct CounterTotal { total: u64 }
/// # impl View<Counter> for CounterTotal {
/// #     const TABLE_NAME: &'static str = "counter_total";
/// #     const VERSION: u64 = 1;
/// #     fn handle_event(&mut self, e: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
/// #         let CounterEvent::Incremented { by } = e.event; self.total += u64::from(by); Ok(()) }
/// # }
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
    views: Arc<dyn ViewRepository<A, V>>,
    name: String,
    batch_size: usize,
    poison: PoisonPolicy,
    retry: HandlerRetry,
    poll_interval: Duration,
    safety_poll_interval: Duration,
    load_concurrency: usize,
    dead_letters: Arc<dyn DeadLetters>,
    /// The checkpoint position as far as this projection knows it; dropped with the
    /// projection, which tells a handle's waiters that the runner ended.
    progress: watch::Sender<i64>,
    shared: Arc<Shared>,
    _marker: PhantomData<fn() -> (A, V)>,
}

/// What a projection shares with its handle.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Caught up with the store at least once.
    pub(crate) live: AtomicBool,
    /// This projection's version was made the active one.
    pub(crate) activated: AtomicBool,
    /// The last error the runner met, rendered.
    pub(crate) last_error: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }
}

impl<A: Aggregate, V: View<A>> fmt::Debug for Projection<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projection")
            .field("name", &self.name)
            .field("batch_size", &self.batch_size)
            .field("poison", &self.poison)
            .field("retry", &self.retry)
            .field("poll_interval", &self.poll_interval)
            .field("safety_poll_interval", &self.safety_poll_interval)
            .field("load_concurrency", &self.load_concurrency)
            .finish()
    }
}

/// How a batch ended.
enum Applied {
    /// Committed with its checkpoint.
    Committed,
    /// Another projector moved the checkpoint or a row first; nothing was written.
    Stale,
    /// The runner was asked to stop (only while waiting between retries).
    Stopped,
}

/// Why a batch was not committed.
enum BatchError {
    /// The event at `index` of the batch failed to decode or to apply.
    Poison { index: usize, error: CQRSError },
    /// A store error: nothing was written.
    Store(CQRSError),
}

impl From<CQRSError> for BatchError {
    fn from(error: CQRSError) -> Self {
        BatchError::Store(error)
    }
}

/// Lets a runner interrupt waits; `catch_up` never stops.
pub(crate) struct Stop {
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

    pub(crate) fn is_stopped(&self) -> bool {
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
    pub(crate) async fn stopped(&mut self) {
        match self.signal.as_mut() {
            None => std::future::pending().await,
            Some(signal) => {
                let _ = signal.wait_for(|stop| *stop).await;
            }
        }
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
            views: Arc::new(views),
            name: Self::default_name(),
            batch_size: 500,
            poison: PoisonPolicy::default(),
            retry: HandlerRetry::default(),
            poll_interval: Duration::from_millis(100),
            safety_poll_interval: Duration::from_secs(1),
            load_concurrency: LOAD_CONCURRENCY,
            dead_letters: Arc::new(MemoryDeadLetters::new()),
            progress: watch::channel(0).0,
            shared: Arc::new(Shared {
                live: AtomicBool::new(false),
                activated: AtomicBool::new(false),
                last_error: Mutex::new(None),
            }),
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
        self.name = name.into();
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
        self.poison = policy;
        self
    }

    /// How often a failing event is tried, and the backoff between tries (default
    /// [`HandlerRetry::default`]: 3 tries, 100 ms then 200 ms).
    #[must_use]
    pub fn with_handler_retry(mut self, retry: HandlerRetry) -> Self {
        self.retry = HandlerRetry {
            attempts: retry.attempts.max(1),
            ..retry
        };
        self
    }

    /// Where [`PoisonPolicy::SkipAndRecord`] records skipped events (default: a
    /// [`MemoryDeadLetters`] owned by this projection).
    #[must_use]
    pub fn with_dead_letters(mut self, sink: impl DeadLetters + 'static) -> Self {
        self.dead_letters = Arc::new(sink);
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

    /// How many view rows a batch loads at once (default 8, at least 1). A batch decodes
    /// its events, loads the rows they touch concurrently, then applies the events in order;
    /// 1 loads them one after the other.
    #[must_use]
    pub fn with_load_concurrency(mut self, loads: usize) -> Self {
        self.load_concurrency = loads.max(1);
        self
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The global position of the last event applied.
    ///
    /// # Errors
    /// The view store's error.
    pub async fn position(&self) -> Result<i64, CQRSError> {
        self.views.checkpoint(&self.name).await
    }

    /// The events this projection skipped under [`PoisonPolicy::SkipAndRecord`].
    ///
    /// # Errors
    /// The dead-letter sink's error.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, CQRSError> {
        self.dead_letters.list(&self.name).await
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
            None => self.views.checkpoint(&self.name).await?,
        };
        self.publish(position);
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
                        self.caught_up().await?;
                        return Ok(Some(position));
                    };
                    let span = tracing::debug_span!(
                        "projection_batch",
                        projection = %self.name,
                        view = V::TABLE_NAME,
                        view_version = V::VERSION,
                        from = position + 1,
                        to = last,
                        events = batch.len(),
                    );
                    let applied = self
                        .apply_batch(position, &batch, stop)
                        .instrument(span)
                        .await?;
                    let more =
                        batch.len() >= self.batch_size || known.is_none_or(|known| known > last);
                    (applied, last, more)
                }
                // A row the store cannot read as an event: one poison event at its position.
                Err(CQRSError::DamagedRow(damage)) if damage.position > position => {
                    let applied = self.handle_damaged_row(position, &damage, stop).await?;
                    (applied, damage.position, true)
                }
                Err(error) => return Err(error),
            };
            match applied {
                Applied::Committed => {
                    stale = 0;
                    position = last;
                    self.publish(position);
                    if !more {
                        self.caught_up().await?;
                        return Ok(Some(position));
                    }
                }
                Applied::Stale => {
                    stale += 1;
                    let moved = self.views.checkpoint(&self.name).await?;
                    tracing::debug!(
                        projection = %self.name,
                        from = position,
                        now = moved,
                        "another projector committed first; resuming from its checkpoint"
                    );
                    if stale >= MAX_STALE_IN_A_ROW {
                        return Err(CQRSError::ViewConflict {
                            view: V::TABLE_NAME.to_owned(),
                            view_id: format!("checkpoint {}", self.name),
                            expected_version: position,
                        });
                    }
                    position = moved;
                    self.publish(position);
                }
                Applied::Stopped => return Ok(None),
            }
        }
    }

    /// Tells the handle's watchers about a new checkpoint (never going back).
    fn publish(&self, position: i64) {
        self.progress.send_if_modified(|known| {
            if position > *known {
                *known = position;
                true
            } else {
                false
            }
        });
    }

    /// Marks the projection live and, the first time, makes its version the active one.
    async fn caught_up(&self) -> Result<(), CQRSError> {
        if !self.shared.activated.load(Ordering::Acquire) {
            let before = self.views.active_version().await?;
            if before.is_none_or(|active| active < V::VERSION) {
                self.views.activate_version(V::VERSION).await?;
                tracing::info!(
                    projection = %self.name,
                    view = V::TABLE_NAME,
                    version = V::VERSION,
                    previous = ?before,
                    "view version caught up and activated"
                );
            }
            self.shared.activated.store(true, Ordering::Release);
        }
        self.shared.live.store(true, Ordering::Release);
        Ok(())
    }

    /// Applies `batch` (the events after checkpoint `from`), committing the events before a
    /// poison event on their own, then handling the poison event, then the rest.
    async fn apply_batch(
        &self,
        mut from: i64,
        batch: &[PersistableDomainEvent],
        stop: &mut Stop,
    ) -> Result<Applied, CQRSError> {
        let mut rest = batch;
        let mut end = rest.len();
        // The failure of the first event of `rest`, when a bigger batch already tried it.
        let mut poison: Option<CQRSError> = None;
        while !rest.is_empty() {
            if let Some(error) = poison.take() {
                match self.handle_poison(from, &rest[0], error, stop).await? {
                    Applied::Committed => {
                        from = rest[0].position;
                        rest = &rest[1..];
                        end = rest.len();
                        continue;
                    }
                    other => return Ok(other),
                }
            }
            let Some(last) = rest[..end].last().map(|e| e.position) else {
                end = rest.len();
                continue;
            };
            match self.apply_events(from, &rest[..end]).await {
                Ok(Applied::Committed) => {
                    from = last;
                    rest = &rest[end..];
                    end = rest.len();
                }
                Ok(other) => return Ok(other),
                Err(BatchError::Store(error)) => return Err(error),
                Err(BatchError::Poison { index, error }) if index > 0 => {
                    // Commit the events before it first, then deal with it alone.
                    match self.apply_events(from, &rest[..index]).await {
                        Ok(Applied::Committed) => {
                            from = rest[index - 1].position;
                            rest = &rest[index..];
                            end = rest.len();
                            poison = Some(error);
                        }
                        Ok(other) => return Ok(other),
                        Err(BatchError::Store(error)) => return Err(error),
                        // A handler that fails where it passed a moment ago: start over on
                        // the shorter prefix.
                        Err(BatchError::Poison { index: 0, error }) => poison = Some(error),
                        Err(BatchError::Poison { index: earlier, .. }) => end = earlier,
                    }
                }
                Err(BatchError::Poison { error, .. }) => poison = Some(error),
            }
        }
        Ok(Applied::Committed)
    }

    /// Retries the poison `event` (the first after checkpoint `from`), then applies the
    /// policy. `Committed` means the checkpoint is past it (applied or skipped).
    async fn handle_poison(
        &self,
        from: i64,
        event: &PersistableDomainEvent,
        mut error: CQRSError,
        stop: &mut Stop,
    ) -> Result<Applied, CQRSError> {
        let mut failures = 1;
        while failures < self.retry.attempts {
            let wait = self.retry.backoff(failures);
            tracing::warn!(
                projection = %self.name,
                position = event.position,
                attempt = failures,
                retry_in = ?wait,
                %error,
                "view handler failed; retrying"
            );
            if stop.sleep(wait).await {
                return Ok(Applied::Stopped);
            }
            match self.apply_events(from, std::slice::from_ref(event)).await {
                Ok(applied) => return Ok(applied),
                Err(BatchError::Store(error)) => return Err(error),
                Err(BatchError::Poison { error: again, .. }) => error = again,
            }
            failures += 1;
        }
        match self.poison {
            PoisonPolicy::Stop => {
                tracing::error!(
                    projection = %self.name,
                    view = V::TABLE_NAME,
                    aggregate_type = %event.aggregate_type,
                    aggregate_id = %event.aggregate_id,
                    sequence = event.sequence,
                    position = event.position,
                    event_type = %event.event_type,
                    event_version = %event.event_version,
                    attempts = failures,
                    %error,
                    "poison event: projection stops"
                );
                Err(error)
            }
            PoisonPolicy::SkipAndRecord => {
                let letter = DeadLetter::new(&self.name, V::TABLE_NAME, event, &error, failures);
                self.skip_and_record(from, letter).await
            }
        }
    }

    /// Handles the row after checkpoint `from` that the store cannot read as an event
    /// ([`CQRSError::DamagedRow`]): a poison event at its position. `Committed` means the
    /// checkpoint is past it; `Stale` that the page is to be read again.
    ///
    /// A row of another aggregate type is passed over like any event of another type. Any
    /// other row is read again per [`HandlerRetry`] (a repaired row is then read as the
    /// event it is), then the policy applies: `Stop` ends with the damage as the error,
    /// `SkipAndRecord` records a dead letter and moves the checkpoint past the position.
    async fn handle_damaged_row(
        &self,
        from: i64,
        damage: &DamagedRow,
        stop: &mut Stop,
    ) -> Result<Applied, CQRSError> {
        if damage
            .aggregate_type
            .as_deref()
            .is_some_and(|aggregate_type| aggregate_type != A::NAME)
        {
            return match self.commit_after(from, damage.position, Vec::new()).await {
                Ok(applied) => Ok(applied),
                Err(BatchError::Store(error) | BatchError::Poison { error, .. }) => Err(error),
            };
        }
        let mut failures = 1;
        while failures < self.retry.attempts {
            let wait = self.retry.backoff(failures);
            tracing::warn!(
                projection = %self.name,
                position = damage.position,
                attempt = failures,
                retry_in = ?wait,
                error = %damage,
                "damaged row in the event store; reading it again"
            );
            if stop.sleep(wait).await {
                return Ok(Applied::Stopped);
            }
            match self.events.read_all(from, 1).await {
                Err(CQRSError::DamagedRow(again)) if *again == *damage => {}
                // Repaired, or changed: read the page again.
                Ok(_) | Err(CQRSError::DamagedRow(_)) => return Ok(Applied::Stale),
                Err(error) => return Err(error),
            }
            failures += 1;
        }
        match self.poison {
            PoisonPolicy::Stop => {
                tracing::error!(
                    projection = %self.name,
                    view = V::TABLE_NAME,
                    position = damage.position,
                    attempts = failures,
                    error = %damage,
                    "poison event (a damaged row): projection stops"
                );
                Err(CQRSError::from(damage.clone()))
            }
            PoisonPolicy::SkipAndRecord => {
                let letter =
                    DeadLetter::for_damaged_row(&self.name, V::TABLE_NAME, damage, failures);
                self.skip_and_record(from, letter).await
            }
        }
    }

    /// Records `letter` (the poison event right after checkpoint `from`) and moves the
    /// checkpoint past it, exactly once with a sink that keeps the view store's checkpoints,
    /// at least once otherwise. `Stale` when another projector moved the checkpoint.
    async fn skip_and_record(&self, from: i64, letter: DeadLetter) -> Result<Applied, CQRSError> {
        if self.views.checkpoint(&self.name).await? != from {
            return Ok(Applied::Stale);
        }
        let position = letter.position;
        // A sink on the view store's database records the letter with the checkpoint that
        // skips the event, in one transaction: exactly once.
        let skipped = self.dead_letters.record_and_skip(&letter, from).await?;
        if skipped != DeadLetterSkip::Unsupported {
            let now = self.views.checkpoint(&self.name).await?;
            if skipped == DeadLetterSkip::Committed && now >= position {
                self.log_skipped(&letter, "exactly once");
                self.publish(position);
                return Ok(Applied::Committed);
            }
            if now != from {
                return Ok(Applied::Stale);
            }
            tracing::warn!(
                projection = %self.name,
                "the dead-letter sink does not keep this view store's checkpoints; \
                 recording the dead letter before the checkpoint instead"
            );
        }
        // Recorded before the checkpoint moves: at least once, idempotent per
        // (projection, position).
        self.dead_letters.record(letter.clone()).await?;
        self.log_skipped(&letter, "at least once");
        let checkpoint = Checkpoint {
            name: self.name.clone(),
            position,
        };
        match self.views.commit(Vec::new(), Some(checkpoint)).await {
            Ok(()) => {
                self.publish(position);
                Ok(Applied::Committed)
            }
            Err(CQRSError::ViewConflict { .. }) => Ok(Applied::Stale),
            Err(error) => Err(error),
        }
    }

    /// Logs a poison event skipped under [`PoisonPolicy::SkipAndRecord`].
    fn log_skipped(&self, letter: &DeadLetter, recorded: &'static str) {
        tracing::error!(
            projection = %self.name,
            view = V::TABLE_NAME,
            aggregate_type = %letter.aggregate_type,
            aggregate_id = %letter.aggregate_id,
            sequence = letter.sequence,
            position = letter.position,
            event_type = %letter.event_type,
            event_version = %letter.event_version,
            attempts = letter.attempts,
            error = %letter.error,
            recorded,
            "poison event skipped and recorded as a dead letter"
        );
    }

    /// Applies `events` (the events right after checkpoint `from`) and commits them with the
    /// checkpoint at the last one, or reports the first poison event.
    async fn apply_events(
        &self,
        from: i64,
        events: &[PersistableDomainEvent],
    ) -> Result<Applied, BatchError> {
        let Some(last) = events.last().map(|e| e.position) else {
            return Ok(Applied::Committed);
        };
        match self.apply_in_memory(events).await {
            Ok(changes) => self.commit_after(from, last, changes).await,
            // A refusal may come from rows another projector already moved past these
            // events: only a failure on the current checkpoint is a poison event.
            Err(BatchError::Poison { .. }) if self.views.checkpoint(&self.name).await? != from => {
                Ok(Applied::Stale)
            }
            Err(error) => Err(error),
        }
    }

    /// Loads the touched view rows and applies `events` to them, without writing.
    ///
    /// The events are decoded first (up to the first one that does not decode) to learn
    /// which rows they touch; the rows are then loaded concurrently (up to
    /// [`with_load_concurrency`](Self::with_load_concurrency) at a time), so a batch costs about one load's latency rather than
    /// one per row, and the events are applied in order.
    async fn apply_in_memory(
        &self,
        events: &[PersistableDomainEvent],
    ) -> Result<Vec<ViewContext<V>>, BatchError> {
        // Per event of `A` (by index in `events`): the view ids it touches, with its envelopes.
        let mut decoded: Vec<(usize, Targets<A>)> = Vec::new();
        let mut undecodable = None;
        let mut order: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for (index, stored) in events.iter().enumerate() {
            if stored.aggregate_type != A::NAME {
                continue;
            }
            // An upcast may turn one stored event into several, or none (then only the
            // checkpoint moves past it).
            match stored.decode_all::<A::Events>() {
                Ok(envelopes) => {
                    let mut targets = Vec::with_capacity(envelopes.len());
                    for (at, envelope) in envelopes.iter().enumerate() {
                        for view_id in V::view_ids(envelope) {
                            if seen.insert(view_id.clone()) {
                                order.push(view_id.clone());
                            }
                            targets.push((view_id, at));
                        }
                    }
                    decoded.push((index, (envelopes, targets)));
                }
                Err(error) => {
                    undecodable = Some(BatchError::Poison { index, error });
                    break;
                }
            }
        }
        // Boxed futures collected first: a closure held across the await would trip the
        // compiler's `Send` proof of the spawned runner.
        let loads: Vec<_> = order
            .iter()
            .map(|view_id| self.views.load_for_update(view_id))
            .collect();
        let loaded: Vec<ViewContext<V>> = stream::iter(loads)
            .buffered(self.load_concurrency)
            .try_collect()
            .await?;
        let mut touched: HashMap<&str, ViewContext<V>> =
            order.iter().map(String::as_str).zip(loaded).collect();
        for (index, (envelopes, targets)) in &decoded {
            let stored = &events[*index];
            for (view_id, at) in targets {
                let Some(context) = touched.get_mut(view_id.as_str()) else {
                    continue;
                };
                context
                    .view
                    .handle_event_for(view_id, &envelopes[*at])
                    .map_err(|error| BatchError::Poison {
                        index: *index,
                        error: ViewHandlerError::for_event(V::TABLE_NAME, stored, error),
                    })?;
            }
        }
        // An event that does not decode fails after the events before it applied cleanly.
        if let Some(poison) = undecodable {
            return Err(poison);
        }
        Ok(order
            .iter()
            .filter_map(|id| touched.remove(id.as_str()))
            .collect())
    }

    /// Commits `changes` with the checkpoint `last`, unless the checkpoint moved from `from`.
    async fn commit_after(
        &self,
        from: i64,
        last: i64,
        changes: Vec<ViewContext<V>>,
    ) -> Result<Applied, BatchError> {
        // Re-read the checkpoint after loading the rows. A projector that committed any of
        // these events before our loads shows here (its rows and checkpoint commit
        // together); one that commits after our loads makes our row versions stale, and the
        // store refuses a checkpoint that goes back. Either way nothing is applied twice.
        if self.views.checkpoint(&self.name).await? != from {
            return Ok(Applied::Stale);
        }
        let checkpoint = Checkpoint {
            name: self.name.clone(),
            position: last,
        };
        match self.views.commit(changes, Some(checkpoint)).await {
            Ok(()) => {
                self.publish(last);
                Ok(Applied::Committed)
            }
            Err(CQRSError::ViewConflict { .. }) => Ok(Applied::Stale),
            Err(error) => Err(BatchError::Store(error)),
        }
    }
}
