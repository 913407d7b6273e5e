//! The projection engine: applies a batch of stored events after a checkpoint to a view.
//!
//! Both sources of a projection feed it: the store-fed [`Projection`](super::Projection)
//! reads pages of the event store, the JetStream-fed `NatsProjection` pulls messages. The
//! engine decodes and upcasts the events, applies them to the view rows they touch, retries
//! a failing event per [`HandlerRetry`] (a stop request interrupts the wait), applies the
//! [`PoisonPolicy`] to a poison event (dead letters exactly once through
//! [`DeadLetters::record_and_skip`] when the sink shares the view store's database), and
//! commits the view changes with the new checkpoint in one [`ViewRepository::commit`], after
//! checking that no other projector moved the checkpoint first.
//!
//! A source ordered per aggregate only (a Lambda batch, through
//! [`PerAggregateProjection`](super::PerAggregateProjection)) feeds it one aggregate at a
//! time on that aggregate's [`Track`]: a checkpoint of its own, at event sequences.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{stream, StreamExt, TryStreamExt};
use tokio::sync::watch;

use crate::aggregate::Aggregate;
use crate::error::{CQRSError, DamagedRow, ViewHandlerError};
use crate::event::{EventEnvelope, PersistableDomainEvent};
use crate::store::memory::MemoryDeadLetters;
use crate::store::{
    Checkpoint, DeadLetter, DeadLetterSkip, DeadLetters, EventRepository, ViewContext,
    ViewRepository,
};
use crate::view::View;

use crate::task::{Shared, Stop};

use super::{HandlerRetry, PoisonPolicy};

/// How many times in a row a batch may find its checkpoint moved by another projector before
/// the source gives up with [`CQRSError::ViewConflict`].
pub(crate) const MAX_STALE_IN_A_ROW: u32 = 64;

/// How many view rows a batch loads at once, by default.
const LOAD_CONCURRENCY: usize = 8;

/// How a batch ended.
pub(crate) enum Applied {
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

/// The envelopes one stored event decoded into, and the view ids each one updates (by index
/// into the envelopes).
type Targets<A> = (
    Vec<EventEnvelope<<A as Aggregate>::Events>>,
    Vec<(String, usize)>,
);

/// Which checkpoint a batch moves, and what an event's place under it is.
///
/// The sources that feed the engine in global order move the projection's own checkpoint
/// to event positions ([`Track::Global`]); a source ordered per aggregate (a Lambda batch)
/// moves one checkpoint per aggregate to event sequences ([`Track::Aggregate`]).
pub(crate) enum Track<'a> {
    /// The checkpoint named after the projection, at global positions.
    Global,
    /// The checkpoint `name` of one aggregate, at its sequences.
    Aggregate {
        /// The aggregate's checkpoint name.
        name: &'a str,
        /// The sequences of the events skipped under [`PoisonPolicy::SkipAndRecord`].
        skipped: Mutex<Vec<i64>>,
    },
}

impl<'a> Track<'a> {
    /// The checkpoint of one aggregate, named `name`.
    pub(crate) fn aggregate(name: &'a str) -> Self {
        Track::Aggregate {
            name,
            skipped: Mutex::new(Vec::new()),
        }
    }

    /// The sequences skipped under [`PoisonPolicy::SkipAndRecord`] so far (none on the
    /// global track, which reports its skips as dead letters only).
    pub(crate) fn skipped(&self) -> Vec<i64> {
        match self {
            Track::Global => Vec::new(),
            Track::Aggregate { skipped, .. } => skipped
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// The checkpoint name, given the projection's.
    fn name<'n>(&'n self, projection: &'n str) -> &'n str {
        match self {
            Track::Global => projection,
            Track::Aggregate { name, .. } => name,
        }
    }

    /// Where `event` puts the checkpoint.
    fn key(&self, event: &PersistableDomainEvent) -> i64 {
        match self {
            Track::Global => event.position,
            Track::Aggregate { .. } => event.sequence,
        }
    }
}

/// The engine of one projection: the view store, the checkpoint name, the poison handling,
/// and the progress it reports to handles. Each source owns one and feeds it batches.
pub(crate) struct Core<A: Aggregate, V: View<A>> {
    pub(crate) views: Arc<dyn ViewRepository<A, V>>,
    pub(crate) name: String,
    pub(crate) poison: PoisonPolicy,
    pub(crate) retry: HandlerRetry,
    pub(crate) load_concurrency: usize,
    pub(crate) dead_letters: Arc<dyn DeadLetters>,
    /// The checkpoint position as far as this projection knows it; dropped with the
    /// projection, which tells a handle's waiters that the runner ended.
    pub(crate) progress: watch::Sender<i64>,
    pub(crate) shared: Arc<Shared>,
    /// This projection's version was made the active one.
    activated: AtomicBool,
}

/// What a handle follows of a running engine.
pub(crate) struct Watched {
    pub(crate) name: String,
    pub(crate) position: watch::Receiver<i64>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) dead_letters: Arc<dyn DeadLetters>,
}

impl<A: Aggregate, V: View<A>> Core<A, V> {
    /// What a handle of this engine follows.
    pub(crate) fn watch(&self) -> Watched {
        Watched {
            name: self.name.clone(),
            position: self.progress.subscribe(),
            shared: Arc::clone(&self.shared),
            dead_letters: Arc::clone(&self.dead_letters),
        }
    }

    /// An engine for `views` under checkpoint `name`, with the default policy, retry and
    /// load concurrency and a [`MemoryDeadLetters`] sink.
    pub(crate) fn new(views: Arc<dyn ViewRepository<A, V>>, name: String) -> Self {
        Core {
            views,
            name,
            poison: PoisonPolicy::default(),
            retry: HandlerRetry::default(),
            load_concurrency: LOAD_CONCURRENCY,
            dead_letters: Arc::new(MemoryDeadLetters::new()),
            progress: watch::channel(0).0,
            activated: AtomicBool::new(false),
            shared: Arc::new(Shared::default()),
        }
    }

    /// Sets the retry, with at least one try.
    pub(crate) fn set_retry(&mut self, retry: HandlerRetry) {
        self.retry = HandlerRetry {
            attempts: retry.attempts.max(1),
            ..retry
        };
    }

    /// The stored checkpoint.
    pub(crate) async fn checkpoint(&self) -> Result<i64, CQRSError> {
        self.views.checkpoint(&self.name).await
    }

    /// The events skipped under [`PoisonPolicy::SkipAndRecord`].
    pub(crate) async fn dead_letters(&self) -> Result<Vec<DeadLetter>, CQRSError> {
        self.dead_letters.list(&self.name).await
    }

    /// After a [`Applied::Stale`] batch that started at `from`: the checkpoint as the other
    /// projector left it, to resume from; an error after too many stale batches in a row.
    pub(crate) async fn resume_after_stale(
        &self,
        from: i64,
        stale: &mut u32,
    ) -> Result<i64, CQRSError> {
        *stale += 1;
        let moved = self.checkpoint().await?;
        tracing::debug!(
            projection = %self.name,
            from,
            now = moved,
            "another projector committed first; resuming from its checkpoint"
        );
        if *stale >= MAX_STALE_IN_A_ROW {
            return Err(CQRSError::ViewConflict {
                view: V::TABLE_NAME.to_owned(),
                view_id: format!("checkpoint {}", self.name),
                expected_version: from,
            });
        }
        self.publish(moved);
        Ok(moved)
    }

    /// Tells the handle's watchers about a new checkpoint (never going back).
    pub(crate) fn publish(&self, position: i64) {
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
    pub(crate) async fn caught_up(&self) -> Result<(), CQRSError> {
        if !self.activated.load(Ordering::Acquire) {
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
            self.activated.store(true, Ordering::Release);
        }
        self.shared.set_live();
        Ok(())
    }

    /// Applies `batch` (the events after checkpoint `from`), committing the events before a
    /// poison event on their own, then handling the poison event, then the rest.
    pub(crate) async fn apply_batch(
        &self,
        from: i64,
        batch: &[PersistableDomainEvent],
        stop: &mut Stop,
    ) -> Result<Applied, CQRSError> {
        self.apply_batch_on(&Track::Global, from, batch, stop).await
    }

    /// [`apply_batch`](Self::apply_batch) on `track`: `from` and the checkpoint it commits
    /// are positions on the global track, sequences on an aggregate's.
    pub(crate) async fn apply_batch_on(
        &self,
        track: &Track<'_>,
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
                match self
                    .handle_poison(track, from, &rest[0], error, stop)
                    .await?
                {
                    Applied::Committed => {
                        from = track.key(&rest[0]);
                        rest = &rest[1..];
                        end = rest.len();
                        continue;
                    }
                    other => return Ok(other),
                }
            }
            let Some(last) = rest[..end].last().map(|e| track.key(e)) else {
                end = rest.len();
                continue;
            };
            match self.apply_events(track, from, &rest[..end]).await {
                Ok(Applied::Committed) => {
                    from = last;
                    rest = &rest[end..];
                    end = rest.len();
                }
                Ok(other) => return Ok(other),
                Err(BatchError::Store(error)) => return Err(error),
                Err(BatchError::Poison { index, error }) if index > 0 => {
                    // Commit the events before it first, then deal with it alone.
                    match self.apply_events(track, from, &rest[..index]).await {
                        Ok(Applied::Committed) => {
                            from = track.key(&rest[index - 1]);
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
        track: &Track<'_>,
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
            match self
                .apply_events(track, from, std::slice::from_ref(event))
                .await
            {
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
                self.skip_and_record(track, from, letter, track.key(event))
                    .await
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
    pub(crate) async fn handle_damaged_row(
        &self,
        from: i64,
        damage: &DamagedRow,
        reread: Option<&dyn EventRepository>,
        stop: &mut Stop,
    ) -> Result<Applied, CQRSError> {
        if damage
            .aggregate_type
            .as_deref()
            .is_some_and(|aggregate_type| aggregate_type != A::NAME)
        {
            return match self
                .commit_after(&Track::Global, from, damage.position, Vec::new())
                .await
            {
                Ok(applied) => Ok(applied),
                Err(BatchError::Store(error) | BatchError::Poison { error, .. }) => Err(error),
            };
        }
        let mut failures = 1;
        while let Some(events) = reread.filter(|_| failures < self.retry.attempts) {
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
            match events.read_all(from, 1).await {
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
                let position = letter.position;
                self.skip_and_record(&Track::Global, from, letter, position)
                    .await
            }
        }
    }

    /// Records `letter` (the poison event right after checkpoint `from`) and moves the
    /// checkpoint to `at`, past it: exactly once with a sink that keeps the view store's
    /// checkpoints, at least once otherwise. `Stale` when another projector moved the
    /// checkpoint.
    ///
    /// An aggregate's checkpoint is not the one the letter names (that is the projection's),
    /// so on that track the letter is always recorded first, idempotent per (projection,
    /// position), then the checkpoint commits.
    pub(crate) async fn skip_and_record(
        &self,
        track: &Track<'_>,
        from: i64,
        mut letter: DeadLetter,
        at: i64,
    ) -> Result<Applied, CQRSError> {
        let name = track.name(&self.name);
        if matches!(track, Track::Aggregate { .. }) && letter.position <= 0 {
            // An event without a global position: a key of its own, not 0 shared by all.
            letter.position = DeadLetter::key_without_position(
                &letter.aggregate_type,
                letter.aggregate_id,
                letter.sequence,
            );
        }
        if self.views.checkpoint(name).await? != from {
            return Ok(Applied::Stale);
        }
        let position = at;
        // A sink on the view store's database records the letter with the checkpoint that
        // skips the event, in one transaction: exactly once.
        let skipped = match track {
            Track::Global => self.dead_letters.record_and_skip(&letter, from).await?,
            Track::Aggregate { .. } => DeadLetterSkip::Unsupported,
        };
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
            name: name.to_owned(),
            position,
        };
        match self.views.commit(Vec::new(), Some(checkpoint)).await {
            Ok(()) => {
                match track {
                    Track::Global => self.publish(position),
                    Track::Aggregate { skipped, .. } => skipped
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(position),
                }
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
        track: &Track<'_>,
        from: i64,
        events: &[PersistableDomainEvent],
    ) -> Result<Applied, BatchError> {
        let Some(last) = events.last().map(|e| track.key(e)) else {
            return Ok(Applied::Committed);
        };
        match self.apply_in_memory(events).await {
            Ok(changes) => self.commit_after(track, from, last, changes).await,
            // A refusal may come from rows another projector already moved past these
            // events: only a failure on the current checkpoint is a poison event.
            Err(BatchError::Poison { .. })
                if self.views.checkpoint(track.name(&self.name)).await? != from =>
            {
                Ok(Applied::Stale)
            }
            Err(error) => Err(error),
        }
    }

    /// Loads the touched view rows and applies `events` to them, without writing.
    ///
    /// The events are decoded first (up to the first one that does not decode) to learn
    /// which rows they touch; the rows are then loaded with
    /// [`ViewRepository::load_many_for_update`], split over up to
    /// [`Projection::with_load_concurrency`](super::Projection::with_load_concurrency) loads
    /// at once, so a batch costs about one load's latency rather than one per row, and the
    /// events are applied in order.
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
        // The ids split evenly into at most `load_concurrency` loads, run at once: one query
        // each on the SQL stores, one row after another in the trait's default. Boxed
        // futures collected first: a closure held across the await would trip the
        // compiler's `Send` proof of the spawned runner.
        let per_load = order.len().div_ceil(self.load_concurrency).max(1);
        let loads: Vec<_> = order
            .chunks(per_load)
            .map(|view_ids| self.views.load_many_for_update(view_ids))
            .collect();
        let loaded: Vec<Vec<ViewContext<V>>> = stream::iter(loads)
            .buffered(self.load_concurrency)
            .try_collect()
            .await?;
        let loaded = loaded.into_iter().flatten();
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
        track: &Track<'_>,
        from: i64,
        last: i64,
        changes: Vec<ViewContext<V>>,
    ) -> Result<Applied, BatchError> {
        let name = track.name(&self.name);
        // Re-read the checkpoint after loading the rows. A projector that committed any of
        // these events before our loads shows here (its rows and checkpoint commit
        // together); one that commits after our loads makes our row versions stale, and the
        // store refuses a checkpoint that goes back. Either way nothing is applied twice.
        if self.views.checkpoint(name).await? != from {
            return Ok(Applied::Stale);
        }
        let checkpoint = Checkpoint {
            name: name.to_owned(),
            position: last,
        };
        match self.views.commit(changes, Some(checkpoint)).await {
            Ok(()) => {
                // A handle follows the global position only.
                if let Track::Global = track {
                    self.publish(last);
                }
                Ok(Applied::Committed)
            }
            Err(CQRSError::ViewConflict { .. }) => Ok(Applied::Stale),
            Err(error) => Err(BatchError::Store(error)),
        }
    }
}
