//! A projection fed by a source that orders events per aggregate only: a DynamoDB Streams
//! shard, an SQS FIFO message group. It keeps one checkpoint per aggregate.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use futures_util::{stream, StreamExt};
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::error::{CQRSError, DamagedRow};
use crate::event::PersistableDomainEvent;
use crate::store::{DeadLetter, DeadLetters, EventRepository, ViewRepository};
use crate::task::Stop;
use crate::view::View;

use super::core::{Applied, Core, Track, MAX_STALE_IN_A_ROW};
use super::{HandlerRetry, PoisonPolicy, Projection};

/// How many aggregates a batch works on at once, by default.
const AGGREGATE_CONCURRENCY: usize = 4;

/// What [`PerAggregateProjection::apply`] did with one event of the batch.
#[derive(Debug, PartialEq)]
pub enum EventOutcome {
    /// Applied to the view and committed with the aggregate's checkpoint.
    Committed,
    /// Not applied by this call, and nothing left to do with it.
    Skipped(SkipReason),
    /// Not applied; the aggregate's checkpoint stays before it, so the source delivers it
    /// again. The error says why: the poison event's own error under
    /// [`PoisonPolicy::Stop`] ([`CQRSError::ViewHandler`], [`CQRSError::EventDecode`]), a
    /// store error, or [`CQRSError::SequenceGap`] for an event that follows a missing or
    /// failed one of its aggregate.
    Failed(CQRSError),
}

impl EventOutcome {
    /// True for [`EventOutcome::Failed`]: the source has to deliver the event again.
    pub fn is_failed(&self) -> bool {
        matches!(self, EventOutcome::Failed(_))
    }
}

/// Why [`PerAggregateProjection::apply`] passed over an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The aggregate's checkpoint already covers it: a redelivered record, a replayed batch,
    /// the same event twice in one batch, or one another invocation applied first.
    Covered,
    /// The event belongs to another aggregate type than the projection's.
    OtherAggregateType,
    /// A poison event under [`PoisonPolicy::SkipAndRecord`]: recorded as a dead letter and
    /// passed over by the checkpoint.
    DeadLettered,
}

/// Keeps one view up to date from batches of events that arrive in order per aggregate
/// only, with one checkpoint per aggregate: the engine behind the Lambda adapters for
/// DynamoDB Streams and SQS (crate `cqrs-aws`).
///
/// Such sources (a DynamoDB Streams shard, an SQS FIFO message group) keep the order of each
/// aggregate's events but not a global one, process shards or groups in parallel, and
/// deliver a record again after a failure. A global checkpoint cannot follow them, so
/// [`apply`](Self::apply) keeps a checkpoint per aggregate (named
/// [`checkpoint_name`](Self::checkpoint_name)) at the sequence of the aggregate's last
/// applied event, and commits each aggregate's view changes with its checkpoint in one
/// [`ViewRepository::commit`], as [`Projection`] does with its global one:
///
/// * an event the aggregate's checkpoint already covers is [`SkipReason::Covered`]: a
///   redelivered or replayed batch changes nothing;
/// * the events of one aggregate are applied in sequence order, whatever their order in the
///   batch;
/// * an event whose sequence leaves a gap after the checkpoint (an earlier record not
///   delivered yet) is filled from the event store given with
///   [`with_event_store`](Self::with_event_store), or else fails with
///   [`CQRSError::SequenceGap`], like every later event of its aggregate, so the source
///   delivers it again;
/// * a poison event is retried per [`HandlerRetry`], then handled per [`PoisonPolicy`]:
///   under `Stop` it fails (and the events after it of its aggregate with it), under
///   `SkipAndRecord` it is recorded in the dead-letter sink under the projection's
///   [`name`](Self::name) and passed over.
///
/// The events of different aggregates are independent: a failure of one aggregate does not
/// hold back the others.
///
/// Dead letters are recorded before the checkpoint that passes over the event commits (at
/// least once), and the sink keeps one per (projection, position): an event without a
/// position (0, from a store without a global order) is recorded at
/// [`DeadLetter::key_without_position`] of its aggregate and sequence instead.
///
/// A projection fed this way has no moment where it has "caught up", so it never activates
/// its view's version ([`ViewRepository::activate_version`]); do it once a new version has
/// been fed the whole history.
///
/// ```
/// # use cqrs::doc::{Counter, CounterEvent, CounterTotal};
/// # use uuid::Uuid;
/// use cqrs::{EventOutcome, MemoryViewRepository, PerAggregateProjection, PersistableDomainEvent, SkipReason};
/// use cqrs::ViewRepository;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let views = MemoryViewRepository::<CounterTotal>::new();
/// let projection = PerAggregateProjection::<Counter, CounterTotal>::new(views.clone());
///
/// let id = Uuid::new_v4();
/// let event = |sequence, by| {
///     let mut event = PersistableDomainEvent::new(
///         "counter", id, sequence, &CounterEvent::Incremented { by }, serde_json::Value::Null,
///     )?;
///     event.position = sequence;
///     Ok::<_, cqrs::CQRSError>(event)
/// };
/// // Out of order, and sequence 3 not delivered yet.
/// let batch = vec![event(2, 2)?, event(1, 1)?, event(4, 4)?];
/// let outcomes = projection.apply(&batch).await;
/// assert_eq!(outcomes[0], EventOutcome::Committed);
/// assert_eq!(outcomes[1], EventOutcome::Committed);
/// assert!(outcomes[2].is_failed()); // a gap: delivered again later
/// assert_eq!(projection.sequence(id).await?, 2);
///
/// // The source delivers again from the failed record, with the missing one.
/// let again = projection.apply(&[event(2, 2)?, event(3, 3)?, event(4, 4)?]).await;
/// assert_eq!(again[0], EventOutcome::Skipped(SkipReason::Covered));
/// assert_eq!(again[2], EventOutcome::Committed);
/// let total = ViewRepository::<Counter, _>::load(&views, &id.to_string()).await?;
/// assert_eq!(total.unwrap().total, 1 + 2 + 3 + 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct PerAggregateProjection<A: Aggregate, V: View<A>> {
    core: Core<A, V>,
    events: Option<Arc<dyn EventRepository>>,
    concurrency: usize,
    _marker: PhantomData<fn() -> (A, V)>,
}

impl<A: Aggregate, V: View<A>> fmt::Debug for PerAggregateProjection<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerAggregateProjection")
            .field("name", &self.core.name)
            .field("poison", &self.core.poison)
            .field("retry", &self.core.retry)
            .field("load_concurrency", &self.core.load_concurrency)
            .field("concurrency", &self.concurrency)
            .field("fills_gaps", &self.events.is_some())
            .finish()
    }
}

impl<A: Aggregate, V: View<A>> PerAggregateProjection<A, V> {
    /// A projection of `V` into `views`, named [`Projection::default_name`], without an event
    /// store (a gap fails the event).
    pub fn new(views: impl ViewRepository<A, V> + 'static) -> Self {
        PerAggregateProjection {
            core: Core::new(Arc::new(views), Projection::<A, V>::default_name()),
            events: None,
            concurrency: AGGREGATE_CONCURRENCY,
            _marker: PhantomData,
        }
    }

    /// Uses another name: the prefix of the aggregates' checkpoint names, and the projection
    /// the dead letters are recorded under.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.core.name = name.into();
        self
    }

    /// What to do with a poison event once the retries are spent (default
    /// [`PoisonPolicy::Stop`]: the event fails).
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
    /// [`MemoryDeadLetters`](crate::MemoryDeadLetters) owned by this projection, which a
    /// short-lived process such as a Lambda loses: give it a durable sink).
    #[must_use]
    pub fn with_dead_letters(mut self, sink: impl DeadLetters + 'static) -> Self {
        self.core.dead_letters = Arc::new(sink);
        self
    }

    /// Fills a gap after an aggregate's checkpoint from `events`
    /// ([`EventRepository::load_events`]) instead of failing the event that leaves it.
    #[must_use]
    pub fn with_event_store(mut self, events: impl EventRepository + 'static) -> Self {
        self.events = Some(Arc::new(events));
        self
    }

    /// How many aggregates of a batch are worked on at once (default 4, at least 1).
    /// Aggregates whose events touch the same view row conflict and are redone, never
    /// applied twice.
    #[must_use]
    pub fn with_concurrency(mut self, aggregates: usize) -> Self {
        self.concurrency = aggregates.max(1);
        self
    }

    /// How many loads of view rows an aggregate's events run at once (default 8, at least
    /// 1), as for [`Projection::with_load_concurrency`](crate::Projection::with_load_concurrency).
    #[must_use]
    pub fn with_load_concurrency(mut self, loads: usize) -> Self {
        self.core.load_concurrency = loads.max(1);
        self
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The checkpoint name of the aggregate `aggregate_id` (of type `A`):
    /// `"{name}/{A::NAME}:{aggregate_id}"`, the projection's name and the aggregate's stream
    /// key.
    ///
    /// ```
    /// # use cqrs::doc::{Counter, CounterTotal};
    /// let projection = cqrs::PerAggregateProjection::<Counter, CounterTotal>::new(
    ///     cqrs::MemoryViewRepository::<CounterTotal>::new(),
    /// );
    /// let id = uuid::Uuid::nil();
    /// assert_eq!(
    ///     projection.checkpoint_name(id),
    ///     "counter_total_v1/counter:00000000-0000-0000-0000-000000000000",
    /// );
    /// ```
    pub fn checkpoint_name(&self, aggregate_id: Uuid) -> String {
        format!(
            "{}/{}:{}",
            self.core.name,
            A::NAME,
            aggregate_id.hyphenated()
        )
    }

    /// The sequence of the aggregate's last event this projection applied (or skipped), 0
    /// before the first.
    ///
    /// # Errors
    /// The view store's error.
    pub async fn sequence(&self, aggregate_id: Uuid) -> Result<i64, CQRSError> {
        self.core
            .views
            .checkpoint(&self.checkpoint_name(aggregate_id))
            .await
    }

    /// The events this projection skipped under [`PoisonPolicy::SkipAndRecord`].
    ///
    /// # Errors
    /// The dead-letter sink's error.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, CQRSError> {
        self.core.dead_letters().await
    }

    /// Applies a batch and says, per event in the batch's order, what became of it.
    ///
    /// The events of each aggregate of type `A` are applied in sequence order after the
    /// aggregate's checkpoint; see [`PerAggregateProjection`] for what is skipped, filled
    /// and failed. An adapter that answers its source with the first failure (Lambda's
    /// partial batch response) takes the first [`EventOutcome::is_failed`].
    #[must_use = "the outcomes say which events the source has to deliver again"]
    pub async fn apply(&self, events: &[PersistableDomainEvent]) -> Vec<EventOutcome> {
        let mut outcomes: Vec<Option<EventOutcome>> = Vec::with_capacity(events.len());
        let mut groups: Vec<(Uuid, Vec<usize>)> = Vec::new();
        let mut group_of: HashMap<Uuid, usize> = HashMap::new();
        for (index, event) in events.iter().enumerate() {
            if event.aggregate_type != A::NAME {
                outcomes.push(Some(EventOutcome::Skipped(SkipReason::OtherAggregateType)));
                continue;
            }
            outcomes.push(None);
            let group = *group_of.entry(event.aggregate_id).or_insert_with(|| {
                groups.push((event.aggregate_id, Vec::new()));
                groups.len() - 1
            });
            groups[group].1.push(index);
        }
        let mut done = stream::iter(groups)
            .map(|(aggregate_id, indices)| self.apply_aggregate(aggregate_id, indices, events))
            .buffer_unordered(self.concurrency);
        while let Some(results) = done.next().await {
            for (index, outcome) in results {
                outcomes[index] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or(EventOutcome::Skipped(SkipReason::Covered)))
            .collect()
    }

    /// Handles a record the source could not read as an event ([`CQRSError::DamagedRow`]):
    /// its aggregate and sequence were read (from the record's key, say), the rest was not.
    /// The source hands it over in its place among the aggregate's events: after the events
    /// before it were applied, before the events after it.
    ///
    /// * A record of another aggregate type is [`SkipReason::OtherAggregateType`], one the
    ///   aggregate's checkpoint covers [`SkipReason::Covered`].
    /// * One that names no aggregate id or sequence fails with the damage: nothing says
    ///   which checkpoint it could move.
    /// * One that leaves a gap after the checkpoint fails with [`CQRSError::SequenceGap`].
    /// * Otherwise the [`PoisonPolicy`] applies, without retries (the record does not
    ///   change when delivered again; a repair is a new record): under `Stop` it fails with
    ///   the damage, under `SkipAndRecord` it becomes a [`DeadLetter`] (what could be read of
    ///   it, at `damage.position`, with the damage as its error) and the aggregate's
    ///   checkpoint moves to its sequence: [`SkipReason::DeadLettered`]. Delivered again,
    ///   it is covered, so it is recorded once.
    ///
    /// ```
    /// # use cqrs::doc::{Counter, CounterTotal};
    /// use cqrs::{DamagedRow, EventOutcome, MemoryViewRepository, PerAggregateProjection, PoisonPolicy, SkipReason};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let projection = PerAggregateProjection::<Counter, CounterTotal>::new(MemoryViewRepository::new())
    ///     .with_poison_policy(PoisonPolicy::SkipAndRecord);
    /// let id = uuid::Uuid::new_v4();
    /// let damage = DamagedRow {
    ///     position: 7,
    ///     event_id: None,
    ///     aggregate_type: Some("counter".into()),
    ///     aggregate_id: Some(id),
    ///     sequence: Some(1),
    ///     event_type: None,
    ///     event_version: None,
    ///     problem: "attribute `payload` is missing".into(),
    /// };
    /// assert_eq!(projection.apply_damaged(&damage).await, EventOutcome::Skipped(SkipReason::DeadLettered));
    /// assert_eq!(projection.sequence(id).await?, 1);
    /// assert_eq!(projection.apply_damaged(&damage).await, EventOutcome::Skipped(SkipReason::Covered));
    /// assert_eq!(projection.dead_letters().await?.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn apply_damaged(&self, damage: &DamagedRow) -> EventOutcome {
        if damage
            .aggregate_type
            .as_deref()
            .is_some_and(|aggregate_type| aggregate_type != A::NAME)
        {
            return EventOutcome::Skipped(SkipReason::OtherAggregateType);
        }
        let (Some(aggregate_id), Some(sequence)) = (damage.aggregate_id, damage.sequence) else {
            return EventOutcome::Failed(CQRSError::from(damage.clone()));
        };
        let name = self.checkpoint_name(aggregate_id);
        let track = Track::aggregate(&name);
        for _ in 0..MAX_STALE_IN_A_ROW {
            let from = match self.core.views.checkpoint(&name).await {
                Ok(from) => from,
                Err(error) => return EventOutcome::Failed(error),
            };
            if sequence <= from {
                return EventOutcome::Skipped(SkipReason::Covered);
            }
            if sequence > from + 1 {
                return EventOutcome::Failed(CQRSError::SequenceGap {
                    aggregate_type: A::NAME.to_owned(),
                    aggregate_id,
                    expected_sequence: from + 1,
                    found_sequence: sequence,
                });
            }
            if self.core.poison == PoisonPolicy::Stop {
                tracing::error!(
                    projection = %self.core.name,
                    view = V::TABLE_NAME,
                    %aggregate_id,
                    sequence,
                    position = damage.position,
                    error = %damage,
                    "poison event (a damaged record): the aggregate stops"
                );
                return EventOutcome::Failed(CQRSError::from(damage.clone()));
            }
            let letter = DeadLetter::for_damaged_row(&self.core.name, V::TABLE_NAME, damage, 1);
            match self
                .core
                .skip_and_record(&track, from, letter, sequence)
                .await
            {
                Ok(Applied::Committed) => {
                    return EventOutcome::Skipped(SkipReason::DeadLettered);
                }
                // Another invocation moved the checkpoint first: look again.
                Ok(Applied::Stale | Applied::Stopped) => continue,
                Err(error) => return EventOutcome::Failed(error),
            }
        }
        EventOutcome::Failed(CQRSError::ViewConflict {
            view: V::TABLE_NAME.to_owned(),
            view_id: format!("checkpoint {name}"),
            expected_version: sequence - 1,
        })
    }

    /// Applies the events at `indices` of `events`, all of the aggregate `aggregate_id`.
    async fn apply_aggregate(
        &self,
        aggregate_id: Uuid,
        indices: Vec<usize>,
        events: &[PersistableDomainEvent],
    ) -> Vec<(usize, EventOutcome)> {
        let name = self.checkpoint_name(aggregate_id);
        let track = Track::aggregate(&name);
        let mut outcomes = Vec::with_capacity(indices.len());
        // The batch's events by sequence, not decided yet. A sequence delivered twice counts
        // once: the other copy stands for it.
        let mut undecided: BTreeMap<i64, usize> = BTreeMap::new();
        for index in indices {
            if let Entry::Vacant(slot) = undecided.entry(events[index].sequence) {
                slot.insert(index);
            } else {
                outcomes.push((index, EventOutcome::Skipped(SkipReason::Covered)));
            }
        }
        let gap = |expected_sequence: i64, found_sequence: i64| CQRSError::SequenceGap {
            aggregate_type: A::NAME.to_owned(),
            aggregate_id,
            expected_sequence,
            found_sequence,
        };
        let mut stale = 0;
        loop {
            let from = match self.core.views.checkpoint(&name).await {
                Ok(from) => from,
                Err(error) => {
                    outcomes.extend(fail_from(&undecided, 0, error, gap));
                    break;
                }
            };
            // Everything up to the checkpoint is covered (by an earlier try of this call too).
            let mut pending = undecided.split_off(&(from + 1));
            outcomes.extend(
                undecided
                    .values()
                    .map(|&index| (index, EventOutcome::Skipped(SkipReason::Covered))),
            );
            if pending.is_empty() {
                break;
            }
            let (run, missing) = self.run_after(aggregate_id, from, &pending, events).await;
            // The events from a gap that could not be filled on fail now (the first with the
            // store's error, if reading it failed); the run before it applies.
            if let Some((missing, error)) = missing {
                let after = pending.split_off(&missing);
                let error = error.unwrap_or_else(|| {
                    let found = after.keys().next().copied().unwrap_or(missing);
                    gap(missing, found)
                });
                outcomes.extend(fail_from(&after, missing - 1, error, gap));
            }
            let applied = self
                .core
                .apply_batch_on(&track, from, &run, &mut Stop::never())
                .await;
            let failed = match applied {
                Ok(Applied::Committed) => None,
                // Another invocation moved the checkpoint or a row first: redo from the
                // stored checkpoint.
                Ok(Applied::Stale | Applied::Stopped) => {
                    stale += 1;
                    if stale < MAX_STALE_IN_A_ROW {
                        undecided = pending;
                        continue;
                    }
                    Some(CQRSError::ViewConflict {
                        view: V::TABLE_NAME.to_owned(),
                        view_id: format!("checkpoint {name}"),
                        expected_version: from,
                    })
                }
                Err(error) => Some(error),
            };
            // The events before a failing one are committed; the checkpoint says how far.
            if let Some(error) = failed {
                let reached = self.core.views.checkpoint(&name).await.unwrap_or(from);
                let failing = pending.split_off(&(reached + 1));
                outcomes.extend(fail_from(&failing, reached, error, gap));
            }
            let skipped = track.skipped();
            outcomes.extend(pending.iter().map(|(sequence, &index)| {
                let outcome = if skipped.contains(sequence) {
                    EventOutcome::Skipped(SkipReason::DeadLettered)
                } else {
                    EventOutcome::Committed
                };
                (index, outcome)
            }));
            break;
        }
        outcomes
    }

    /// The events to apply after checkpoint `from`, in sequence order: the batch's
    /// `pending` events, with the sequences missing between them read from the event store
    /// if there is one. The run ends before the first sequence still missing, returned with
    /// the store's error when reading it failed.
    async fn run_after(
        &self,
        aggregate_id: Uuid,
        from: i64,
        pending: &BTreeMap<i64, usize>,
        events: &[PersistableDomainEvent],
    ) -> (
        Vec<PersistableDomainEvent>,
        Option<(i64, Option<CQRSError>)>,
    ) {
        let last = pending.keys().next_back().copied().unwrap_or(from);
        let mut run = Vec::with_capacity(pending.len());
        let mut stored: Option<BTreeMap<i64, PersistableDomainEvent>> = None;
        for sequence in from + 1..=last {
            if let Some(&index) = pending.get(&sequence) {
                run.push(events[index].clone());
                continue;
            }
            let Some(store) = &self.events else {
                return (run, Some((sequence, None)));
            };
            if stored.is_none() {
                match store.load_events(A::NAME, aggregate_id, sequence - 1).await {
                    Ok(loaded) => {
                        stored = Some(
                            loaded
                                .into_iter()
                                .filter(|event| event.sequence <= last)
                                .map(|event| (event.sequence, event))
                                .collect(),
                        );
                    }
                    Err(error) => return (run, Some((sequence, Some(error)))),
                }
            }
            match stored.as_ref().and_then(|stored| stored.get(&sequence)) {
                Some(event) => run.push(event.clone()),
                None => return (run, Some((sequence, None))),
            }
        }
        (run, None)
    }
}

/// The outcomes of `pending` (events after checkpoint `from`) when the first of them fails
/// with `error`: that one fails with it, every later one with the gap it now leaves.
fn fail_from(
    pending: &BTreeMap<i64, usize>,
    from: i64,
    error: CQRSError,
    gap: impl Fn(i64, i64) -> CQRSError,
) -> Vec<(usize, EventOutcome)> {
    let mut error = Some(error);
    pending
        .iter()
        .map(|(&sequence, &index)| {
            let error = error.take().unwrap_or_else(|| gap(from + 1, sequence));
            (index, EventOutcome::Failed(error))
        })
        .collect()
}
