//! The dispatcher: load, decide, append.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::event::{DomainEvent, PersistableDomainEvent};
use crate::store::{EventRepository, Snapshot, SnapshotRepository};
use smol_str::SmolStr;

/// What to do when an append loses the race to another writer.
///
/// By default ([`RetryPolicy::none`]) the conflict is returned to the caller as
/// [`CQRSError::Conflict`]. With [`RetryPolicy::attempts`] the framework reloads the
/// aggregate, runs the command again on the fresh state and appends again, up to the given
/// number of attempts in all, sleeping a short random backoff between attempts. With
/// [`RetryPolicy::within`] it keeps trying until the command succeeds, the domain refuses it,
/// or the time is up: the form to use when "until it succeeds" is meant and the number of
/// attempts would be a guess.
///
/// Only a lost race is retried. A refusal by the domain and every other error return at once.
///
/// ```
/// use std::time::Duration;
/// let policy = cqrs::RetryPolicy::attempts(10).with_backoff(Duration::from_micros(200), Duration::from_millis(20));
/// assert_eq!(policy.max_attempts(), 10);
///
/// // As many attempts as fit in half a second.
/// let patient = cqrs::RetryPolicy::within(Duration::from_millis(500));
/// assert_eq!(patient.deadline(), Some(Duration::from_millis(500)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    deadline: Option<Duration>,
    base_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::none()
    }
}

impl RetryPolicy {
    /// No retry: a conflict is returned to the caller.
    pub const fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            deadline: None,
            base_backoff: Duration::from_micros(100),
            max_backoff: Duration::from_millis(50),
        }
    }

    /// Up to `max_attempts` attempts in all (at least 1), with the default backoff (random,
    /// from 100 µs doubling up to 50 ms).
    pub const fn attempts(max_attempts: u32) -> Self {
        let mut policy = Self::none();
        policy.max_attempts = if max_attempts == 0 { 1 } else { max_attempts };
        policy
    }

    /// Attempts until one succeeds or is refused by the domain, for as long as `time` allows:
    /// no backoff sleeps past `time` (counted from the dispatch's start), the attempt that
    /// starts when it is up is the last, and its conflict is returned. At least one attempt
    /// is always made. Combine with [`with_backoff`](RetryPolicy::with_backoff) to tune the
    /// sleeps between attempts.
    pub const fn within(time: Duration) -> Self {
        let mut policy = Self::none();
        policy.max_attempts = u32::MAX;
        policy.deadline = Some(time);
        policy
    }

    /// Sets the backoff: attempt `n` sleeps a random time up to `base * 2^n`, capped at `max`.
    pub const fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base_backoff = base;
        self.max_backoff = max;
        self
    }

    /// The number of attempts in all (`u32::MAX` for [`within`](RetryPolicy::within)).
    pub const fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The time after which no new attempt starts, if the policy has one.
    pub const fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        // Full jitter: uniform in [0, ceiling]. A v4 UUID is 122 random bits, plenty here.
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        let random = (Uuid::new_v4().as_u128() & u128::from(u64::MAX)) as u64;
        Duration::from_nanos(random % (nanos + 1))
    }
}

/// When to save a snapshot of an aggregate's state.
///
/// ```
/// let policy = cqrs::SnapshotPolicy::every(100);
/// assert_eq!(policy, cqrs::SnapshotPolicy::Every(100));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotPolicy {
    /// Never save snapshots (they are still read if a store has them).
    Never,
    /// Save one whenever an append crosses a multiple of this many events.
    Every(u32),
}

impl SnapshotPolicy {
    /// A snapshot every `n` events (`n` = 0 means never).
    pub const fn every(n: u32) -> Self {
        if n == 0 {
            SnapshotPolicy::Never
        } else {
            SnapshotPolicy::Every(n)
        }
    }
}

/// The span of one dispatch (`dispatch` or `dispatch_new`), or `Span::none()` when no
/// `tracing` subscriber takes debug spans.
fn dispatch_span(aggregate_type: &'static str, aggregate_id: Uuid, new: bool) -> tracing::Span {
    if !tracing::level_enabled!(tracing::Level::DEBUG) {
        return tracing::Span::none();
    }
    if new {
        tracing::debug_span!(
            "dispatch_new",
            aggregate_type,
            aggregate_id = %aggregate_id,
            sequence = tracing::field::Empty,
        )
    } else {
        tracing::debug_span!(
            "dispatch",
            aggregate_type,
            aggregate_id = %aggregate_id,
            sequence = tracing::field::Empty,
        )
    }
}

/// Runs the dispatch `run` makes inside `span`, recording the new sequence on it, or bare
/// when the span is `none`: a disabled span still costs on every poll of the future it
/// wraps (more with `tracing`'s `log` fallback, which sqlx turns on). The future is made
/// here, where it is awaited, so that it is not moved once more on every dispatch.
async fn in_span<E, Err, F: std::future::Future<Output = Result<DispatchReceipt<E>, Err>>>(
    span: tracing::Span,
    run: impl FnOnce() -> F,
) -> Result<DispatchReceipt<E>, Err> {
    if span.is_none() {
        return run().await;
    }
    let result = run().instrument(span.clone()).await;
    if let Ok(receipt) = &result {
        span.record("sequence", receipt.sequence);
    }
    result
}

/// How many aggregates' states a [`CQRSFramework`] keeps in memory unless told otherwise
/// ([`CQRSFramework::with_state_cache`], [`CQRSFramework::without_state_cache`]).
pub const DEFAULT_STATE_CACHE_CAPACITY: usize = 10_000;

/// What a successful dispatch did.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchReceipt<E> {
    /// The events the command caused, as appended (empty if it changed nothing).
    pub events: Vec<E>,
    /// The aggregate's last sequence after the dispatch.
    pub sequence: i64,
    /// The global position of each appended event: wait for a view to reach the last one
    /// to read your own write.
    pub positions: Vec<i64>,
    /// How many attempts it took (1 without a conflict).
    pub attempts: u32,
}

impl<E> DispatchReceipt<E> {
    /// The highest global position this dispatch wrote, if it wrote anything.
    pub fn last_position(&self) -> Option<i64> {
        self.positions.last().copied()
    }

    fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }
}

/// How one decide-and-append try ended.
enum Outcome<E, Err> {
    Appended(DispatchReceipt<E>),
    /// The domain refused the command.
    Refused(Err),
    /// The append (or building it) failed; a conflict is retried per the policy.
    Failed(CQRSError),
}

/// An aggregate's state with the sequence of the last event folded into it.
#[derive(Debug, Clone)]
struct Loaded<S> {
    state: S,
    sequence: i64,
    /// The aggregate's `aggregate_type_id`, made on its first append and kept with the
    /// cached state, so that later commands do not format the id again.
    key: Option<SmolStr>,
}

impl<S> Loaded<S> {
    fn new(state: S, sequence: i64) -> Self {
        Loaded {
            state,
            sequence,
            key: None,
        }
    }
}

/// The command side: rebuilds an aggregate from its events, runs a command, appends the
/// result.
///
/// One instance is `Send + Sync` and serves any number of tasks through `&self`. Every
/// dispatch:
///
/// 1. gets the aggregate's state: from the in-process state cache (on by default, see
///    [`with_state_cache`](Self::with_state_cache)), or else rebuilt from the store: the
///    newest snapshot (if a snapshot store is set and the events confirm it, see
///    [`SnapshotRepository`]), then the events after it, through `Aggregate::handle_event`;
/// 2. runs `Aggregate::handle_command` on that state;
/// 3. appends only the new events, with the sequences that follow the loaded one, in one
///    atomic append: if another writer got there first nothing is stored and the result is a
///    conflict (retried per the [`RetryPolicy`]).
///
/// ```
/// # use cqrs::{Aggregate, CQRSError, DomainEvent};
/// # use serde::{Deserialize, Serialize};
/// # use uuid::Uuid;
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { Incremented { by: u32 } }
/// # #[derive(Debug, Clone)] enum CounterCommand { Increment { by: u32 } }
/// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct CounterError(#[from] CQRSError);
/// # #[derive(Debug, Clone, Default, Serialize, Deserialize)] struct CounterState { value: u32 }
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent; type Commands = CounterCommand; type Errors = CounterError; type State = CounterState;
/// #     async fn handle_command(&self, _: Uuid, _: &CounterState, c: CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
/// #         let CounterCommand::Increment { by } = c; Ok(vec![CounterEvent::Incremented { by }]) }
/// #     fn handle_event(&self, s: &mut CounterState, e: &CounterEvent) { let CounterEvent::Incremented { by } = e; s.value += by; }
/// # }
/// use cqrs::{CQRSFramework, MemoryEventRepository};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let framework = CQRSFramework::<Counter>::new(MemoryEventRepository::new());
/// let id = Uuid::new_v4();
/// framework.dispatch(id, CounterCommand::Increment { by: 2 }).await?;
/// let receipt = framework.dispatch(id, CounterCommand::Increment { by: 3 }).await?;
/// assert_eq!(receipt.sequence, 2);
/// assert_eq!(framework.load(id).await?.value, 5);
/// # Ok::<(), CounterError>(())
/// # }).unwrap();
/// ```
pub struct CQRSFramework<A: Aggregate> {
    aggregate: A,
    events: Arc<dyn EventRepository>,
    snapshots: Option<(Arc<dyn SnapshotRepository>, SnapshotPolicy)>,
    retry: RetryPolicy,
    cache: Option<StateCache<A::State>>,
}

impl<A: Aggregate> fmt::Debug for CQRSFramework<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CQRSFramework")
            .field("aggregate", &A::NAME)
            .field("snapshots", &self.snapshots.as_ref().map(|(_, p)| *p))
            .field("retry", &self.retry)
            .field("cache", &self.cache.as_ref().map(|c| c.capacity))
            .finish()
    }
}

impl<A: Aggregate + Default> CQRSFramework<A> {
    /// A framework for `A` (built with `A::default()`) on an event store.
    pub fn new(event_repository: impl EventRepository + 'static) -> Self {
        Self::with_aggregate(A::default(), event_repository)
    }
}

impl<A: Aggregate> CQRSFramework<A> {
    /// A framework for the given aggregate value (which holds the aggregate's services) on
    /// an event store.
    pub fn with_aggregate(aggregate: A, event_repository: impl EventRepository + 'static) -> Self {
        CQRSFramework {
            aggregate,
            events: Arc::new(event_repository),
            snapshots: None,
            retry: RetryPolicy::none(),
            cache: Some(StateCache::new(DEFAULT_STATE_CACHE_CAPACITY)),
        }
    }

    /// Retries conflicting dispatches as the policy says.
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Reads snapshots from `repository` when loading, and saves them as `policy` says.
    ///
    /// A snapshot is used only when the events confirm it: the read of the events starts at
    /// its sequence and must find the event there. A snapshot ahead of its stream, at a
    /// sequence of 0 or less, or whose state does not decode is ignored (a warning is
    /// logged), the whole history replayed, and the row replaced by a snapshot of the
    /// replayed state or removed when there are no events; see [`SnapshotRepository`].
    #[must_use]
    pub fn with_snapshots(
        mut self,
        repository: impl SnapshotRepository + 'static,
        policy: SnapshotPolicy,
    ) -> Self {
        self.snapshots = Some((Arc::new(repository), policy));
        self
    }

    /// Keeps the state and sequence of the `capacity` most recently used aggregates in
    /// memory (the default is [`DEFAULT_STATE_CACHE_CAPACITY`]; up to twice as many are held
    /// between two evictions), so a dispatch on a cached aggregate reads nothing from the
    /// store and costs the same however long its history is.
    ///
    /// A cached state that another writer (another process, or another framework on the same
    /// store) has made stale is caught by the append's conflict check, dropped, reloaded and
    /// the command run again, without counting against the [`RetryPolicy`]; a command the
    /// domain refuses on a cached state is checked against the stored sequence (one cheap
    /// read) and decided again on the stored state if the cache was behind.
    #[must_use]
    pub fn with_state_cache(mut self, capacity: usize) -> Self {
        self.cache = Some(StateCache::new(capacity));
        self
    }

    /// Turns the state cache off: every dispatch rebuilds the state from the store
    /// (snapshot plus later events). Useful when state is large and commands are rare, or
    /// to see every stored event decoded on each dispatch.
    ///
    /// ```
    /// # use cqrs::{Aggregate, CQRSError, DomainEvent};
    /// # use serde::{Deserialize, Serialize};
    /// # use uuid::Uuid;
    /// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
    /// # enum E { Happened }
    /// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct Error(#[from] CQRSError);
    /// # #[derive(Default)] struct Thing;
    /// # impl Aggregate for Thing {
    /// #     const NAME: &'static str = "thing";
    /// #     type Events = E; type Commands = (); type Errors = Error; type State = ();
    /// #     async fn handle_command(&self, _: Uuid, _: &(), _: ()) -> Result<Vec<E>, Error> { Ok(vec![E::Happened]) }
    /// #     fn handle_event(&self, _: &mut (), _: &E) {}
    /// # }
    /// let framework = cqrs::CQRSFramework::<Thing>::new(cqrs::MemoryEventRepository::new())
    ///     .without_state_cache();
    /// assert!(format!("{framework:?}").contains("cache: None"));
    /// ```
    #[must_use]
    pub fn without_state_cache(mut self) -> Self {
        self.cache = None;
        self
    }

    /// The aggregate value (its services).
    pub fn aggregate(&self) -> &A {
        &self.aggregate
    }

    /// The event store.
    pub fn event_repository(&self) -> &Arc<dyn EventRepository> {
        &self.events
    }

    /// Runs a command with no metadata (stored as JSON `null`).
    ///
    /// # Errors
    /// The domain's error, or a [`CQRSError`] converted into it: a conflict (after the retry
    /// policy gave up), a store failure, a stored event that does not decode, a payload that
    /// does not serialize.
    pub async fn dispatch(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        self.dispatch_inner(aggregate_id, command, Value::Null)
            .await
    }

    /// Runs a command and stores `metadata` (as JSON) with each event it causes.
    ///
    /// # Errors
    /// As [`dispatch`](Self::dispatch), plus [`CQRSError::Serialization`] if the metadata does
    /// not serialize.
    pub async fn dispatch_with_metadata<M: Serialize + ?Sized>(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        metadata: &M,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        let metadata = Self::metadata_value(aggregate_id, metadata)?;
        self.dispatch_inner(aggregate_id, command, metadata).await
    }

    /// `metadata` as JSON, or the typed serialization error naming the aggregate.
    fn metadata_value<M: Serialize + ?Sized>(
        aggregate_id: Uuid,
        metadata: &M,
    ) -> Result<Value, A::Errors> {
        serde_json::to_value(metadata).map_err(|source| {
            A::Errors::from(CQRSError::Serialization {
                what: format!("metadata for {} {aggregate_id}", A::NAME),
                source,
            })
        })
    }

    /// Runs a command on an aggregate that must not exist yet, without reading the store.
    ///
    /// For a command that starts an aggregate under an id the caller just made (an account
    /// opened under a fresh UUID), reading its empty history first is a wasted round trip
    /// to the store. `dispatch_new` decides on `A::State::default()` and appends the events
    /// at sequence 1. The premise is checked, never assumed: if the aggregate has events,
    /// the append is refused by the store's unique sequence (or the state cache already
    /// knows it), nothing is stored, and the result is [`CQRSError::Conflict`] with
    /// `expected_sequence: 0`, whatever the [`RetryPolicy`] (a retry would meet the same
    /// history; use [`dispatch`](Self::dispatch) for an aggregate that may exist). When the
    /// domain refuses the command, or accepts it without events, one cheap read
    /// ([`EventRepository::event_sequence`]) confirms that the aggregate is new before that
    /// answer is returned; if it is not, the result is the same conflict.
    ///
    /// ```
    /// # use cqrs::{Aggregate, CQRSError, DomainEvent};
    /// # use serde::{Deserialize, Serialize};
    /// # use uuid::Uuid;
    /// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
    /// # enum CounterEvent { Incremented { by: u32 } }
    /// # #[derive(Debug, Clone)] enum CounterCommand { Increment { by: u32 } }
    /// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct CounterError(#[from] CQRSError);
    /// # #[derive(Debug, Clone, Default, Serialize, Deserialize)] struct CounterState { value: u32 }
    /// # #[derive(Default)] struct Counter;
    /// # impl Aggregate for Counter {
    /// #     const NAME: &'static str = "counter";
    /// #     type Events = CounterEvent; type Commands = CounterCommand; type Errors = CounterError; type State = CounterState;
    /// #     async fn handle_command(&self, _: Uuid, _: &CounterState, c: CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
    /// #         let CounterCommand::Increment { by } = c; Ok(vec![CounterEvent::Incremented { by }]) }
    /// #     fn handle_event(&self, s: &mut CounterState, e: &CounterEvent) { let CounterEvent::Incremented { by } = e; s.value += by; }
    /// # }
    /// use cqrs::{CQRSFramework, MemoryEventRepository};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let framework = CQRSFramework::<Counter>::new(MemoryEventRepository::new());
    /// let id = Uuid::new_v4();
    /// let receipt = framework.dispatch_new(id, CounterCommand::Increment { by: 2 }).await?;
    /// assert_eq!(receipt.sequence, 1);
    ///
    /// // The aggregate exists now: a second `dispatch_new` is a conflict and stores nothing.
    /// let again = framework.dispatch_new(id, CounterCommand::Increment { by: 3 }).await;
    /// assert!(matches!(again, Err(CounterError(CQRSError::Conflict { expected_sequence: 0, .. }))));
    /// assert_eq!(framework.load(id).await?.value, 2);
    /// # Ok::<(), CounterError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// [`CQRSError::Conflict`] if the aggregate already has events; otherwise as
    /// [`dispatch`](Self::dispatch).
    pub async fn dispatch_new(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        self.dispatch_new_inner(aggregate_id, command, Value::Null)
            .await
    }

    /// [`dispatch_new`](Self::dispatch_new) storing `metadata` (as JSON) with each event.
    ///
    /// # Errors
    /// As [`dispatch_new`](Self::dispatch_new), plus [`CQRSError::Serialization`] if the
    /// metadata does not serialize.
    pub async fn dispatch_new_with_metadata<M: Serialize + ?Sized>(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        metadata: &M,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        let metadata = Self::metadata_value(aggregate_id, metadata)?;
        self.dispatch_new_inner(aggregate_id, command, metadata)
            .await
    }

    /// The aggregate's current state, rebuilt from the store (a snapshot the events confirm
    /// plus later events, or all the events), never from the state cache.
    ///
    /// # Errors
    /// A store failure or a stored event that does not decode.
    pub async fn load(&self, aggregate_id: Uuid) -> Result<A::State, A::Errors> {
        Ok(self.load_from_store(aggregate_id).await?.state)
    }

    async fn dispatch_inner(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        metadata: Value,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        let span = dispatch_span(A::NAME, aggregate_id, false);
        in_span(span, || {
            self.dispatch_attempts(aggregate_id, command, metadata)
        })
        .await
    }

    /// Load, decide, append; again after a conflict, per the retry policy.
    async fn dispatch_attempts(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        metadata: Value,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        let mut attempt: u32 = 0;
        // A cached state found stale is reloaded once without spending an attempt.
        let mut stale_retry_left = true;
        // Read the clock only for a policy with a deadline.
        let deadline = self
            .retry
            .deadline
            .map(|time| tokio::time::Instant::now() + time);
        let time_left =
            || deadline.map(|at| at.saturating_duration_since(tokio::time::Instant::now()));
        loop {
            attempt += 1;
            let (loaded, from_cache) = match self.cache.as_ref().and_then(|c| c.take(aggregate_id))
            {
                Some(loaded) => (loaded, true),
                None => (self.load_from_store(aggregate_id).await?, false),
            };
            let may_run_again = (from_cache && stale_retry_left)
                || (attempt < self.retry.max_attempts && time_left() != Some(Duration::ZERO));
            if !may_run_again {
                // The last try consumes the command; any outcome is final.
                return match self
                    .try_once(aggregate_id, loaded, command, &metadata)
                    .await
                {
                    Outcome::Appended(receipt) => Ok(receipt.with_attempts(attempt)),
                    Outcome::Refused(refusal) => Err(refusal),
                    Outcome::Failed(error) => Err(error.into()),
                };
            }
            let sequence = loaded.sequence;
            match self
                .try_once(aggregate_id, loaded, command.clone(), &metadata)
                .await
            {
                Outcome::Appended(receipt) => return Ok(receipt.with_attempts(attempt)),
                Outcome::Refused(refusal) if from_cache && stale_retry_left => {
                    // The domain may have refused because the cached state is stale (a
                    // deposit made by another process is missing). One cheap read tells;
                    // if so, decide again on the stored state.
                    if self.events.event_sequence(A::NAME, aggregate_id).await? == sequence {
                        return Err(refusal);
                    }
                    self.forget(aggregate_id);
                    stale_retry_left = false;
                    attempt -= 1;
                }
                Outcome::Refused(refusal) => return Err(refusal),
                Outcome::Failed(CQRSError::Conflict { .. }) if from_cache && stale_retry_left => {
                    // The cached state was stale: not a race this caller lost, so try once
                    // more from the store without spending an attempt.
                    stale_retry_left = false;
                    attempt -= 1;
                }
                Outcome::Failed(error @ CQRSError::Conflict { .. }) => {
                    let left = time_left();
                    if attempt >= self.retry.max_attempts || left == Some(Duration::ZERO) {
                        tracing::debug!(attempts = attempt, "conflict, giving up");
                        return Err(error.into());
                    }
                    let backoff = self.retry.backoff(attempt);
                    tokio::time::sleep(left.map_or(backoff, |left| backoff.min(left))).await;
                }
                Outcome::Failed(error) => return Err(error.into()),
            }
        }
    }

    async fn dispatch_new_inner(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        metadata: Value,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        let span = dispatch_span(A::NAME, aggregate_id, true);
        in_span(span, || {
            self.dispatch_new_once(aggregate_id, command, metadata)
        })
        .await
    }

    /// Decide on the empty state, append at sequence 1, check the premise.
    async fn dispatch_new_once(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        metadata: Value,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        let exists = || CQRSError::Conflict {
            aggregate_type: A::NAME.to_owned(),
            aggregate_id,
            expected_sequence: 0,
        };
        let loaded = match self.cache.as_ref().and_then(|c| c.take(aggregate_id)) {
            Some(cached) if cached.sequence > 0 => {
                self.keep(aggregate_id, cached);
                return Err(exists().into());
            }
            _ => Loaded::new(A::State::default(), 0),
        };
        let decided = match self
            .try_once(aggregate_id, loaded, command, &metadata)
            .await
        {
            // The store's unique sequence checked the premise.
            Outcome::Appended(receipt) if !receipt.events.is_empty() => return Ok(receipt),
            Outcome::Failed(error) => return Err(error.into()),
            Outcome::Appended(receipt) => Ok(receipt),
            Outcome::Refused(refusal) => Err(refusal),
        };
        // Decided without an append, so unchecked: the answer holds only if the
        // aggregate is new. `try_once` cached the empty state; drop it if it is wrong.
        if self.events.event_sequence(A::NAME, aggregate_id).await? > 0 {
            self.forget(aggregate_id);
            return Err(exists().into());
        }
        decided
    }

    /// Decides on `loaded` and appends the result once. The state goes back into the cache
    /// when it is still current (after an append or a refusal); a failed append leaves it out.
    async fn try_once(
        &self,
        aggregate_id: Uuid,
        mut loaded: Loaded<A::State>,
        command: A::Commands,
        metadata: &Value,
    ) -> Outcome<A::Events, A::Errors> {
        let events = match self
            .aggregate
            .handle_command(aggregate_id, &loaded.state, command)
            .await
        {
            Ok(events) => events,
            Err(refusal) => {
                self.keep(aggregate_id, loaded);
                return Outcome::Refused(refusal);
            }
        };
        if events.is_empty() {
            let sequence = loaded.sequence;
            self.keep(aggregate_id, loaded);
            return Outcome::Appended(DispatchReceipt {
                events,
                sequence,
                positions: Vec::new(),
                attempts: 1,
            });
        }
        let persistable = match self.to_persistable(aggregate_id, &mut loaded, &events, metadata) {
            Ok(persistable) => persistable,
            Err(error) => {
                self.keep(aggregate_id, loaded);
                return Outcome::Failed(error);
            }
        };
        match self.events.append(persistable).await {
            Ok(positions) => {
                let sequence = loaded.sequence + events.len() as i64;
                self.after_append(aggregate_id, loaded, &events).await;
                Outcome::Appended(DispatchReceipt {
                    events,
                    sequence,
                    positions,
                    attempts: 1,
                })
            }
            // The state is stale (a conflict) or its fate unknown (a store failure): it stays
            // out of the cache and the next dispatch reads the store.
            Err(error) => Outcome::Failed(error),
        }
    }

    /// Puts a state that is still current back into the cache.
    fn keep(&self, aggregate_id: Uuid, loaded: Loaded<A::State>) {
        if let Some(cache) = &self.cache {
            cache.put(aggregate_id, loaded);
        }
    }

    /// Drops a cached state known to be stale.
    fn forget(&self, aggregate_id: Uuid) {
        if let Some(cache) = &self.cache {
            cache.remove(aggregate_id);
        }
    }

    fn to_persistable(
        &self,
        aggregate_id: Uuid,
        loaded: &mut Loaded<A::State>,
        events: &[A::Events],
        metadata: &Value,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let aggregate_type = SmolStr::new_static(A::NAME);
        let after_sequence = loaded.sequence;
        let aggregate_type_id = loaded
            .key
            .get_or_insert_with(|| PersistableDomainEvent::type_id_for(A::NAME, aggregate_id));
        events
            .iter()
            .enumerate()
            .map(|(i, event)| {
                PersistableDomainEvent::for_aggregate(
                    &aggregate_type,
                    aggregate_type_id,
                    aggregate_id,
                    after_sequence + 1 + i as i64,
                    event,
                    metadata.clone(),
                )
            })
            .collect()
    }

    /// Folds the appended events into the state, then updates the cache and the snapshot.
    async fn after_append(
        &self,
        aggregate_id: Uuid,
        mut loaded: Loaded<A::State>,
        events: &[A::Events],
    ) {
        let needs_state =
            self.cache.is_some() || matches!(self.snapshots, Some((_, SnapshotPolicy::Every(_))));
        if !needs_state {
            return;
        }
        let before = loaded.sequence;
        for event in events {
            self.aggregate.handle_event(&mut loaded.state, event);
        }
        loaded.sequence += events.len() as i64;
        if let Some((repository, SnapshotPolicy::Every(n))) = &self.snapshots {
            let n = i64::from(*n);
            if before / n != loaded.sequence / n {
                self.save_snapshot(repository.as_ref(), aggregate_id, &loaded)
                    .await;
            }
        }
        if let Some(cache) = &self.cache {
            cache.put(aggregate_id, loaded);
        }
    }

    /// Saves a snapshot; a failure is logged, never fails the dispatch (events are committed
    /// and a snapshot is only an optimisation).
    async fn save_snapshot(
        &self,
        repository: &dyn SnapshotRepository,
        aggregate_id: Uuid,
        loaded: &Loaded<A::State>,
    ) {
        let state = match serde_json::to_value(&loaded.state) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(aggregate_type = A::NAME, %aggregate_id, %error, "snapshot state does not serialize; not saved");
                return;
            }
        };
        let snapshot = Snapshot {
            aggregate_type: A::NAME.to_owned(),
            aggregate_id,
            sequence: loaded.sequence,
            state,
            timestamp: chrono::Utc::now(),
        };
        if let Err(error) = repository.save_snapshot(snapshot).await {
            tracing::warn!(aggregate_type = A::NAME, %aggregate_id, %error, "snapshot not saved");
        }
    }

    /// The newest snapshot (if any, and confirmed by the events) plus every later event,
    /// folded: one read of the events either way. A snapshot the events do not confirm is
    /// ignored: the whole history is replayed and the row repaired (see
    /// [`SnapshotRepository`]'s contract).
    async fn load_from_store(&self, aggregate_id: Uuid) -> Result<Loaded<A::State>, CQRSError> {
        let Some((repository, _)) = &self.snapshots else {
            return self.replay(aggregate_id).await;
        };
        let Some(snapshot) = repository.load_snapshot(A::NAME, aggregate_id).await? else {
            return self.replay(aggregate_id).await;
        };
        let snapshot_sequence = snapshot.sequence;
        let reason = if snapshot_sequence <= 0 {
            "its sequence is not positive".to_owned()
        } else {
            match serde_json::from_value::<A::State>(snapshot.state) {
                Ok(state) => {
                    let loaded = Loaded::new(state, snapshot_sequence);
                    match self.fold(aggregate_id, loaded, true).await? {
                        (loaded, Confirmation::Confirmed) => return Ok(loaded),
                        (_, Confirmation::Unconfirmed { found: Some(found) }) => format!(
                            "the stream holds no event at its sequence (the first event after {} is {found})",
                            snapshot_sequence - 1
                        ),
                        (_, Confirmation::Unconfirmed { found: None }) => {
                            "the stream holds no event at its sequence".to_owned()
                        }
                    }
                }
                Err(error) => format!("it does not decode: {error}"),
            }
        };
        let replayed = self.replay(aggregate_id).await;
        match &replayed {
            Ok(loaded) => {
                tracing::warn!(
                    aggregate_type = A::NAME,
                    %aggregate_id,
                    snapshot_sequence,
                    stream_sequence = loaded.sequence,
                    "snapshot not used: {reason}; replayed the full history, replacing the snapshot"
                );
                self.repair_snapshot(repository.as_ref(), aggregate_id, snapshot_sequence, loaded)
                    .await;
            }
            Err(error) => tracing::warn!(
                aggregate_type = A::NAME,
                %aggregate_id,
                snapshot_sequence,
                %error,
                "snapshot not used: {reason}; the full history does not replay either"
            ),
        }
        replayed
    }

    /// Every event of the aggregate, folded into the empty state.
    async fn replay(&self, aggregate_id: Uuid) -> Result<Loaded<A::State>, CQRSError> {
        let empty = Loaded::new(A::State::default(), 0);
        let (loaded, _) = self.fold(aggregate_id, empty, false).await?;
        Ok(loaded)
    }

    /// Folds the events after `loaded.sequence` into `loaded`.
    ///
    /// With `confirm`, `loaded` is a snapshot's state and the read starts one event earlier:
    /// the first event read must carry the snapshot's sequence (it is skipped, not decoded:
    /// the snapshot holds it). Otherwise the fold stops there and the confirmation is
    /// [`Confirmation::Unconfirmed`] (the state returned is then of no use).
    async fn fold(
        &self,
        aggregate_id: Uuid,
        mut loaded: Loaded<A::State>,
        confirm: bool,
    ) -> Result<(Loaded<A::State>, Confirmation), CQRSError> {
        let snapshot_sequence = loaded.sequence;
        let after = if confirm {
            snapshot_sequence - 1
        } else {
            snapshot_sequence
        };
        let mut awaiting_confirmation = confirm;
        // The first event read when it is not the snapshot's own.
        let mut unconfirmed_by = None;
        let aggregate = &self.aggregate;
        let mut fold = |event: &PersistableDomainEvent| {
            if awaiting_confirmation {
                awaiting_confirmation = false;
                if event.sequence == snapshot_sequence {
                    return Ok(());
                }
                unconfirmed_by = Some(event.sequence);
                // Stops the read; told apart from a real gap by `unconfirmed_by`.
                return Err(CQRSError::SequenceGap {
                    aggregate_type: A::NAME.to_owned(),
                    aggregate_id,
                    expected_sequence: snapshot_sequence,
                    found_sequence: event.sequence,
                });
            }
            let expected = loaded.sequence + 1;
            if event.sequence != expected {
                return Err(CQRSError::SequenceGap {
                    aggregate_type: A::NAME.to_owned(),
                    aggregate_id,
                    expected_sequence: expected,
                    found_sequence: event.sequence,
                });
            }
            // One stored row may stand for several events, or none, after upcasting.
            for domain_event in A::Events::try_all_from_persisted(event)? {
                aggregate.handle_event(&mut loaded.state, &domain_event);
            }
            loaded.sequence = expected;
            Ok(())
        };
        let read = self
            .events
            .fold_events(A::NAME, aggregate_id, after, &mut fold)
            .await;
        if let Some(found) = unconfirmed_by {
            let found = Some(found);
            return Ok((loaded, Confirmation::Unconfirmed { found }));
        }
        read?;
        if awaiting_confirmation {
            return Ok((loaded, Confirmation::Unconfirmed { found: None }));
        }
        Ok((loaded, Confirmation::Confirmed))
    }

    /// Replaces a snapshot that was not used (at `bad_sequence`) by a snapshot of the
    /// replayed state, or removes it when the aggregate has no events. A failure is logged:
    /// the replayed state is right either way, and the next load tries again.
    async fn repair_snapshot(
        &self,
        repository: &dyn SnapshotRepository,
        aggregate_id: Uuid,
        bad_sequence: i64,
        replayed: &Loaded<A::State>,
    ) {
        if replayed.sequence > 0 && replayed.sequence >= bad_sequence {
            // Not ahead (its state did not decode): the save replaces it in place.
            self.save_snapshot(repository, aggregate_id, replayed).await;
            return;
        }
        // Ahead of the stream: a save would keep it ("newest wins"), so delete it first. A
        // concurrent loader doing the same deletes and saves a true snapshot too.
        if let Err(error) = repository.delete_snapshot(A::NAME, aggregate_id).await {
            tracing::warn!(aggregate_type = A::NAME, %aggregate_id, %error, "unused snapshot not deleted");
            return;
        }
        if replayed.sequence > 0 {
            self.save_snapshot(repository, aggregate_id, replayed).await;
        }
    }
}

/// Whether the events confirmed the snapshot a fold started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmation {
    /// The first event read carried the snapshot's sequence, or there was no snapshot to
    /// confirm.
    Confirmed,
    /// The stream holds no event at the snapshot's sequence; `found` is the first event read
    /// after the one before it, if any.
    Unconfirmed { found: Option<i64> },
}

/// States of recently used aggregates, bounded.
///
/// Two generations approximate least-recently-used eviction in O(1): new and refreshed
/// entries go to `young`; when `young` holds `capacity` entries, `old` is dropped and
/// `young` becomes `old`. An entry used since then moves back to `young` when the dispatch
/// puts it back. So the `capacity` most recently used states are always kept, and at most
/// twice that many are held. A dispatch *takes* its entry out (no clone of the state) and puts the new state
/// back after its append, so a concurrent dispatch on the same aggregate reads the store.
struct StateCache<S> {
    capacity: usize,
    generations: Mutex<Generations<S>>,
}

/// Keyed by ids that callers choose: a seeded hasher, much cheaper than SipHash.
type CacheMap<S> = HashMap<Uuid, Loaded<S>, foldhash::quality::RandomState>;

struct Generations<S> {
    young: CacheMap<S>,
    old: CacheMap<S>,
}

impl<S> StateCache<S> {
    fn new(capacity: usize) -> Self {
        StateCache {
            capacity: capacity.max(2),
            generations: Mutex::new(Generations {
                young: CacheMap::default(),
                old: CacheMap::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Generations<S>> {
        // A poisoned lock means a panic elsewhere while it was held; the maps are still
        // valid maps, and a wrong entry is caught by the append's conflict check anyway.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, id: Uuid) -> Option<Loaded<S>> {
        let mut generations = self.lock();
        match generations.young.remove(&id) {
            Some(loaded) => Some(loaded),
            None => generations.old.remove(&id),
        }
    }

    fn remove(&self, id: Uuid) {
        let mut generations = self.lock();
        generations.young.remove(&id);
        generations.old.remove(&id);
    }

    fn put(&self, id: Uuid, loaded: Loaded<S>) {
        let mut generations = self.lock();
        let generations = &mut *generations;
        let loaded = match generations.old.remove(&id) {
            Some(older) if older.sequence > loaded.sequence => older,
            _ => loaded,
        };
        match generations.young.get(&id) {
            // Another dispatch put a newer state meanwhile: keep it.
            Some(existing) if existing.sequence >= loaded.sequence => return,
            Some(_) => {}
            None if generations.young.len() >= self.capacity => {
                generations.old = std::mem::take(&mut generations.young);
            }
            None => {}
        }
        generations.young.insert(id, loaded);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let generations = self.lock();
        generations.young.len() + generations.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::{Loaded, StateCache};
    use uuid::Uuid;

    fn loaded(sequence: i64) -> Loaded<i64> {
        Loaded::new(sequence * 10, sequence)
    }

    #[test]
    fn cache_is_bounded_and_keeps_recently_used_entries() {
        let cache = StateCache::new(4);
        let hot = Uuid::new_v4();
        cache.put(hot, loaded(1));
        for n in 0..100 {
            cache.put(Uuid::new_v4(), loaded(n));
            // The hot entry is used on every round, as a dispatch would: taken, put back.
            let entry = cache.take(hot).expect("a recently used entry stays cached");
            cache.put(hot, entry);
            assert!(
                cache.len() <= 8,
                "{} entries for a capacity of 4",
                cache.len()
            );
        }
    }

    #[test]
    fn the_capacity_most_recently_used_entries_are_always_kept() {
        // Round robin over exactly `capacity` aggregates: every one stays cached.
        let cache = StateCache::new(16);
        let ids: Vec<Uuid> = (0..16).map(|_| Uuid::new_v4()).collect();
        for &id in &ids {
            cache.put(id, loaded(1));
        }
        for round in 2..10 {
            for &id in &ids {
                let entry = cache.take(id).expect("one of the 16 most recently used");
                cache.put(
                    id,
                    Loaded {
                        sequence: round,
                        ..entry
                    },
                );
            }
        }
    }

    #[test]
    fn an_older_state_never_replaces_a_newer_one() {
        let cache = StateCache::new(8);
        let id = Uuid::new_v4();
        cache.put(id, loaded(5));
        cache.put(id, loaded(3));
        assert_eq!(cache.take(id).map(|l| l.sequence), Some(5));
        assert!(cache.take(id).is_none(), "take removes the entry");
    }

    #[test]
    fn a_newer_state_in_the_old_generation_wins_over_an_older_put() {
        let cache = StateCache::new(2);
        let id = Uuid::new_v4();
        cache.put(id, loaded(7));
        // Fills the young generation so that `id` moves to the old one.
        cache.put(Uuid::new_v4(), loaded(1));
        cache.put(id, loaded(6));
        assert_eq!(cache.take(id).map(|l| (l.sequence, l.state)), Some((7, 70)));
    }
}
