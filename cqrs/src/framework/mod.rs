//! The dispatcher: [`CQRSFramework`] gets an aggregate's state, runs a command on it and
//! appends the events, retrying a lost race per its [`RetryPolicy`].

// One place runs a command, the same for `dispatch` and `dispatch_new`: `tries` gets a state
// to decide on (`state_to_decide_on`: the state cache in `cache`, the store through `load`,
// or the empty state), tries the command on it once (`try_once`), and `Attempts::next` in
// `retry` says whether to retry or return.

mod cache;
mod context;
mod load;
mod retry;

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use smol_str::SmolStr;
use tracing::Instrument;
use uuid::Uuid;

use self::cache::{Loaded, StateCache};
use self::retry::{Attempts, Next, Outcome, Source};
use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::{EventRepository, SnapshotRepository};

pub use self::context::{derived_command_id, CommandContext};
pub use self::load::SnapshotPolicy;
pub use self::retry::RetryPolicy;

/// The policy of `dispatch_new`, whatever the framework's: a retry would meet the same
/// history.
const NO_RETRY: RetryPolicy = RetryPolicy::none();

/// A state to decide on, and where it came from.
type ToDecideOn<S> = (Loaded<S>, Source);

/// The largest batch vector kept for reuse ([`SPARE_BATCH`]).
const SPARE_BATCH_CAPACITY: usize = 16;

thread_local! {
    /// A batch vector a store emptied by appending at once
    /// ([`EventRepository::try_append_now`]), reused by this thread's next dispatch instead
    /// of allocating one.
    static SPARE_BATCH: Cell<Vec<PersistableDomainEvent>> = const { Cell::new(Vec::new()) };
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
    /// True when the command had already taken effect: a dispatch with
    /// [`CommandContext::once`] whose command id the aggregate already holds events of.
    /// Nothing was run or stored; `events` and `positions` are those stored the first time.
    pub duplicate: bool,
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
/// # use cqrs::doc::{Counter, CounterCommand, CounterError};
/// # use uuid::Uuid;
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
            .field("cache", &self.cache.as_ref().map(StateCache::capacity))
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
    /// # use cqrs::doc::Counter;
    /// let framework = cqrs::CQRSFramework::<Counter>::new(cqrs::MemoryEventRepository::new())
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
        self.run(aggregate_id, command, Stamp::bare(Value::Null), false)
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
        self.run(aggregate_id, command, Stamp::bare(metadata), false)
            .await
    }

    /// Runs a command under a [`CommandContext`]: its events store the context's command id
    /// as their `causation_id`, its correlation id as their `correlation_id`, and its
    /// metadata. With [`CommandContext::once`], a command id the aggregate already holds
    /// events of is not run again: the receipt returns the stored events with
    /// [`DispatchReceipt::duplicate`] set.
    ///
    /// The check is made after the state to decide on is read, so two dispatches of one
    /// command that race cannot both append: the aggregate's sequence orders them, and the
    /// loser's retry finds the winner's events (give the framework a [`RetryPolicy`] that
    /// retries, or retry a [`CQRSError::Conflict`] yourself).
    ///
    /// # Errors
    /// As [`dispatch`](Self::dispatch).
    pub async fn dispatch_with_context(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        context: &CommandContext,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        self.run(aggregate_id, command, Stamp::of(context), false)
            .await
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
    /// # use cqrs::doc::{Counter, CounterCommand, CounterError};
    /// # use uuid::Uuid;
    /// use cqrs::{CQRSError, CQRSFramework, MemoryEventRepository};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let framework = CQRSFramework::<Counter>::new(MemoryEventRepository::new());
    /// let id = Uuid::new_v4();
    /// let receipt = framework.dispatch_new(id, CounterCommand::Increment { by: 2 }).await?;
    /// assert_eq!(receipt.sequence, 1);
    ///
    /// // The aggregate exists now: a second `dispatch_new` is a conflict and stores nothing.
    /// let again = framework.dispatch_new(id, CounterCommand::Increment { by: 3 }).await;
    /// assert!(matches!(again, Err(CounterError::Framework(CQRSError::Conflict { expected_sequence: 0, .. }))));
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
        self.run(aggregate_id, command, Stamp::bare(Value::Null), true)
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
        self.run(aggregate_id, command, Stamp::bare(metadata), true)
            .await
    }

    /// [`dispatch_new`](Self::dispatch_new) under a [`CommandContext`] (see
    /// [`dispatch_with_context`](Self::dispatch_with_context)).
    ///
    /// # Errors
    /// As [`dispatch_new`](Self::dispatch_new).
    pub async fn dispatch_new_with_context(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        context: &CommandContext,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        self.run(aggregate_id, command, Stamp::of(context), true)
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

    /// `dispatch` (`new` false) or `dispatch_new` (`new` true), in its tracing span when a
    /// subscriber takes debug spans. Bare otherwise: a disabled span would still cost on
    /// every poll of the future it wraps (more with `tracing`'s `log` fallback, which sqlx
    /// turns on).
    async fn run(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        stamp: Stamp,
        new: bool,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        let span = dispatch_span(A::NAME, aggregate_id, new);
        if span.is_none() {
            return self.tries(aggregate_id, command, stamp, new).await;
        }
        let result = self
            .tries(aggregate_id, command, stamp, new)
            .instrument(span.clone())
            .await;
        if let Ok(receipt) = &result {
            span.record("sequence", receipt.sequence);
        }
        result
    }

    /// Gets a state, tries the command on it, and retries or returns as [`Attempts::next`]
    /// decides. `dispatch_new` runs with no retry: its one try is the last.
    async fn tries(
        &self,
        aggregate_id: Uuid,
        mut command: A::Commands,
        stamp: Stamp,
        new: bool,
    ) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        let mut attempts = Attempts::start(if new { &NO_RETRY } else { &self.retry });
        loop {
            let (loaded, source) = match self.state_without_reading(aggregate_id, new)? {
                Some(found) => found,
                None => self.state_to_decide_on(aggregate_id, new).await?,
            };
            let sequence = loaded.sequence;
            if let Some(command_id) = stamp.once {
                // After the read of the state: an append of this command that the read did
                // not see makes this try's append conflict, and the retry finds it here.
                let earlier = self
                    .events
                    .events_caused_by(A::NAME, aggregate_id, command_id)
                    .await;
                match earlier {
                    Ok(earlier) if earlier.is_empty() => {}
                    Ok(earlier) => {
                        self.keep(aggregate_id, loaded);
                        return Self::duplicate_receipt(&earlier, sequence, attempts.attempt())
                            .map_err(A::Errors::from);
                    }
                    Err(error) => {
                        self.keep(aggregate_id, loaded);
                        return Err(error.into());
                    }
                }
            }
            // The last try takes the command; one that another may follow, a copy.
            let (this_try, spare) = if attempts.may_retry(source) {
                (command.clone(), Some(command))
            } else {
                (command, None)
            };
            let mut outcome = self.try_once(aggregate_id, loaded, this_try, &stamp).await;
            if attempts.must_confirm(&outcome, source)
                && self.events.event_sequence(A::NAME, aggregate_id).await? != sequence
            {
                // Decided on a state the stream has moved past: the conflict that an append
                // would have met. The state went back into the cache; drop it.
                self.forget(aggregate_id);
                outcome = Outcome::Failed(Self::conflict(aggregate_id, sequence));
            }
            match attempts.next(outcome, source, spare) {
                Next::Return(result) => {
                    return result.map(|receipt| receipt.with_attempts(attempts.attempt()))
                }
                Next::Retry {
                    command: again,
                    backoff,
                } => {
                    if let Some(backoff) = backoff {
                        tokio::time::sleep(backoff).await;
                    }
                    command = again;
                }
            }
        }
    }

    /// The state a try decides on, and where it came from. For `dispatch`: the cached state,
    /// or else the state rebuilt from the store. For `dispatch_new`: the empty state at
    /// sequence 0, without a read, unless the cache holds the aggregate at a later sequence,
    /// which is the conflict the append would meet.
    async fn state_to_decide_on(
        &self,
        aggregate_id: Uuid,
        new: bool,
    ) -> Result<ToDecideOn<A::State>, CQRSError> {
        match self.state_without_reading(aggregate_id, new)? {
            Some(found) => Ok(found),
            None => Ok((self.load_from_store(aggregate_id).await?, Source::Store)),
        }
    }

    /// The state of [`state_to_decide_on`](Self::state_to_decide_on) when it needs no read
    /// of the store (`None` when it does): kept apart so that the usual dispatch, which finds
    /// its state in the cache, does not go through the future of that read.
    fn state_without_reading(
        &self,
        aggregate_id: Uuid,
        new: bool,
    ) -> Result<Option<ToDecideOn<A::State>>, CQRSError> {
        let cached = self
            .cache
            .as_ref()
            .and_then(|cache| cache.take(aggregate_id));
        if new {
            return match cached {
                Some(cached) if cached.sequence > 0 => {
                    self.keep(aggregate_id, cached);
                    Err(Self::conflict(aggregate_id, 0))
                }
                _ => Ok(Some((Loaded::new(A::State::default(), 0), Source::Empty))),
            };
        }
        Ok(cached.map(|loaded| (loaded, Source::Cache)))
    }

    /// Decides on `loaded` and appends the result once. The state goes back into the cache
    /// when it is still current (after an append, a refusal or no change); a failed append
    /// leaves it out.
    async fn try_once(
        &self,
        aggregate_id: Uuid,
        mut loaded: Loaded<A::State>,
        command: A::Commands,
        stamp: &Stamp,
    ) -> Outcome<DispatchReceipt<A::Events>, A::Errors> {
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
            return Outcome::Unchanged(DispatchReceipt {
                events,
                sequence,
                positions: Vec::new(),
                attempts: 1,
                duplicate: false,
            });
        }
        let mut persistable = match self.to_persistable(aggregate_id, &mut loaded, &events, stamp) {
            Ok(persistable) => persistable,
            Err(error) => {
                self.keep(aggregate_id, loaded);
                return Outcome::Failed(error);
            }
        };
        // A store that never waits appends without the boxed future of `append`.
        let appended = match self.events.try_append_now(&mut persistable) {
            Some(appended) => {
                // Emptied by the store: the next dispatch on this thread fills it again.
                if persistable.is_empty() && persistable.capacity() <= SPARE_BATCH_CAPACITY {
                    SPARE_BATCH.with(|spare| spare.set(persistable));
                }
                appended
            }
            None => self.events.append(persistable).await,
        };
        match appended {
            Ok(positions) => {
                let sequence = loaded.sequence + events.len() as i64;
                if let Some(due) = self.fold_appended(aggregate_id, loaded, &events) {
                    self.snapshot_and_keep(aggregate_id, due).await;
                }
                Outcome::Appended(DispatchReceipt {
                    events,
                    sequence,
                    positions,
                    attempts: 1,
                    duplicate: false,
                })
            }
            // The state is stale (a conflict) or its fate unknown (a store failure): it stays
            // out of the cache and the next dispatch reads the store.
            Err(error) => Outcome::Failed(error),
        }
    }

    /// The receipt of a command that had already taken effect: the events it caused then.
    fn duplicate_receipt(
        earlier: &[PersistableDomainEvent],
        sequence: i64,
        attempts: u32,
    ) -> Result<DispatchReceipt<A::Events>, CQRSError> {
        let mut events = Vec::with_capacity(earlier.len());
        for stored in earlier {
            events.extend(
                stored
                    .decode_all::<A::Events>()?
                    .into_iter()
                    .map(|e| e.event),
            );
        }
        let last = earlier.iter().map(|e| e.sequence).max().unwrap_or(0);
        Ok(DispatchReceipt {
            events,
            sequence: sequence.max(last),
            positions: earlier.iter().map(|e| e.position).collect(),
            attempts,
            duplicate: true,
        })
    }

    /// The conflict of an aggregate that is not at `expected_sequence`.
    fn conflict(aggregate_id: Uuid, expected_sequence: i64) -> CQRSError {
        CQRSError::Conflict {
            aggregate_type: A::NAME.to_owned(),
            aggregate_id,
            expected_sequence,
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
        stamp: &Stamp,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let aggregate_type = SmolStr::new_static(A::NAME);
        let after_sequence = loaded.sequence;
        let aggregate_type_id = loaded
            .key
            .get_or_insert_with(|| PersistableDomainEvent::type_id_for(A::NAME, aggregate_id));
        let mut batch = SPARE_BATCH.with(Cell::take);
        batch.reserve(events.len());
        for (i, event) in events.iter().enumerate() {
            PersistableDomainEvent::push_for_aggregate(
                &mut batch,
                &aggregate_type,
                aggregate_type_id,
                aggregate_id,
                after_sequence + 1 + i as i64,
                event,
                stamp.metadata.clone(),
                (stamp.correlation_id, stamp.causation_id),
            )?;
        }
        Ok(batch)
    }

    /// Folds the appended events into the state and puts it back into the cache, unless a
    /// snapshot is due: then the state is returned, for [`snapshot_and_keep`]. The usual
    /// append does not wait here, so it does not go through a future.
    ///
    /// [`snapshot_and_keep`]: Self::snapshot_and_keep
    fn fold_appended(
        &self,
        aggregate_id: Uuid,
        mut loaded: Loaded<A::State>,
        events: &[A::Events],
    ) -> Option<Loaded<A::State>> {
        let snapshot_every = match &self.snapshots {
            Some((_, SnapshotPolicy::Every(n))) => Some(i64::from(*n)),
            _ => None,
        };
        if self.cache.is_none() && snapshot_every.is_none() {
            return None;
        }
        let before = loaded.sequence;
        for event in events {
            self.aggregate.handle_event(&mut loaded.state, event);
        }
        loaded.sequence += events.len() as i64;
        if snapshot_every.is_some_and(|n| before / n != loaded.sequence / n) {
            return Some(loaded);
        }
        self.keep(aggregate_id, loaded);
        None
    }

    /// Saves a snapshot of the state [`fold_appended`](Self::fold_appended) returned, then
    /// puts it back into the cache.
    async fn snapshot_and_keep(&self, aggregate_id: Uuid, loaded: Loaded<A::State>) {
        if let Some((repository, _)) = &self.snapshots {
            self.save_snapshot(repository.as_ref(), aggregate_id, &loaded)
                .await;
        }
        self.keep(aggregate_id, loaded);
    }
}

/// What every event of one dispatch carries besides itself.
struct Stamp {
    metadata: Value,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    /// The command id, when the dispatch must take effect at most once.
    once: Option<Uuid>,
}

impl Stamp {
    /// Metadata alone (`dispatch`, `dispatch_with_metadata`).
    fn bare(metadata: Value) -> Self {
        Stamp {
            metadata,
            correlation_id: None,
            causation_id: None,
            once: None,
        }
    }

    fn of(context: &CommandContext) -> Self {
        Stamp {
            metadata: context.metadata().clone(),
            correlation_id: Some(context.correlation_id()),
            causation_id: Some(context.command_id()),
            once: context.is_once().then(|| context.command_id()),
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
