//! Event stores: the [`EventRepository`] contract, snapshots, and the in-memory store.
//!
//! SQLite and PostgreSQL stores live behind the `sqlite` and `postgres` features.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;

mod dead_letters;
pub(crate) mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub(crate) mod sqlite;
mod view;

pub use self::dead_letters::{DeadLetter, DeadLetterSkip, DeadLetters};
pub use self::view::{active_version_marker, Checkpoint, ViewContext, ViewRepository};

/// Where events are appended and read back.
///
/// One store holds the events of every aggregate type. The contract every implementation
/// meets (the testkit's conformance suite checks it):
///
/// * **Append is atomic and optimistic.** [`append`](EventRepository::append) takes the
///   events of one command for one aggregate, with contiguous sequences. The first event's
///   sequence minus one is the sequence the writer believes is the aggregate's last; if
///   another writer appended in between, *nothing* is stored and the result is
///   [`CQRSError::Conflict`]. Of two concurrent writers exactly one wins.
/// * **Retries are idempotent.** Appending a batch whose event ids are already stored, with
///   the same aggregate and sequences, stores nothing and succeeds, returning the positions
///   stored the first time. Reusing an id for a different event is
///   [`CQRSError::DuplicateEventId`].
/// * **Global order.** Every stored event gets a global `position`, increasing in commit
///   order. [`read_all`](EventRepository::read_all) never returns position `p` while an event
///   with a lower position may still commit: a reader that resumes after the last position it
///   saw misses nothing.
///
/// # Implementing a store
///
/// Write the `impl` block with `#[cqrs::async_trait]` (re-exported, so the crate needs no
/// other dependency) and its methods as `async fn`. [`validate_batch`] checks the shape of an
/// append's batch for you. Then run the testkit's conformance suite
/// (`cqrs_testkit::conformance::check_event_repository`) against it: it checks every clause
/// above, including the races. A store that wraps another, here to count appends:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// # use cqrs::doc::CounterEvent;
/// use cqrs::{CQRSError, EventRepository, MemoryEventRepository, PersistableDomainEvent};
/// use uuid::Uuid;
///
/// #[derive(Default)]
/// struct CountingStore {
///     inner: MemoryEventRepository,
///     appends: AtomicU64,
/// }
///
/// #[cqrs::async_trait]
/// impl EventRepository for CountingStore {
///     async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
///         let positions = self.inner.append(events).await?;
///         self.appends.fetch_add(1, Ordering::Relaxed);
///         Ok(positions)
///     }
///
///     async fn load_events(
///         &self,
///         aggregate_type: &str,
///         aggregate_id: Uuid,
///         after_sequence: i64,
///     ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
///         self.inner.load_events(aggregate_type, aggregate_id, after_sequence).await
///     }
///
///     async fn event_sequence(&self, aggregate_type: &str, aggregate_id: Uuid) -> Result<i64, CQRSError> {
///         self.inner.event_sequence(aggregate_type, aggregate_id).await
///     }
///
///     async fn read_all(&self, after_position: i64, limit: usize) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
///         self.inner.read_all(after_position, limit).await
///     }
///
///     // Passing on the notifications lets projections follow without polling.
///     fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
///         self.inner.subscribe()
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = CountingStore::default();
/// let incremented = CounterEvent::Incremented { by: 1 };
/// let event = PersistableDomainEvent::new("counter", Uuid::new_v4(), 1, &incremented, serde_json::Value::Null)?;
/// store.append(vec![event]).await?;
/// assert_eq!(store.appends.load(Ordering::Relaxed), 1);
/// # Ok::<(), CQRSError>(())
/// # }).unwrap();
/// ```
#[async_trait]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event store",
    note = "use `cqrs::MemoryEventRepository`, a SQL store behind the `sqlite`/`postgres` features, or implement `cqrs::EventRepository`"
)]
pub trait EventRepository: Send + Sync {
    /// Appends the events of one command to one aggregate, atomically, and returns the global
    /// position given to each, in order.
    ///
    /// # Errors
    /// [`CQRSError::Conflict`] when the aggregate moved on; [`CQRSError::InvalidAppend`] for
    /// an empty or inconsistent batch; [`CQRSError::DuplicateEventId`];
    /// [`CQRSError::PersistenceError`] when the back end fails.
    async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError>;

    /// [`append`](EventRepository::append) done at once, for a store that never waits (one
    /// that keeps its events in memory): the same checks and the same result, without the
    /// boxed future an `async` trait method costs on every call. The framework calls it first
    /// and falls back to `append` when it returns `None`.
    ///
    /// The default returns `None` and leaves `events` as it is. A store that returns `Some`
    /// has taken the events out of `events` when the append succeeded (the vector's
    /// allocation stays with the caller, who may reuse it); after an error, `events` may
    /// still hold them.
    fn try_append_now(
        &self,
        events: &mut Vec<PersistableDomainEvent>,
    ) -> Option<Result<Vec<i64>, CQRSError>> {
        let _ = events;
        None
    }

    /// The events of one aggregate with a sequence greater than `after_sequence`, in order.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the back end fails, or a decode error for a row
    /// that is not a valid stored event.
    async fn load_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError>;

    /// Calls `visit` with each event of one aggregate with a sequence greater than
    /// `after_sequence`, in order, stopping at the first error `visit` returns.
    ///
    /// This is how the framework rebuilds state. The default loads the events with
    /// [`load_events`](EventRepository::load_events); a store that holds events in memory
    /// overrides it to lend them without copying.
    ///
    /// # Errors
    /// What `load_events` or `visit` returns.
    async fn fold_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
        visit: &mut (dyn for<'e> FnMut(&'e PersistableDomainEvent) -> Result<(), CQRSError> + Send),
    ) -> Result<(), CQRSError> {
        for event in &self
            .load_events(aggregate_type, aggregate_id, after_sequence)
            .await?
        {
            visit(event)?;
        }
        Ok(())
    }

    /// The events of one aggregate that the command `causation_id` caused (their
    /// [`PersistableDomainEvent::causation_id`]), in sequence order; empty when it caused
    /// none. This is how [`CommandContext::once`](crate::CommandContext::once) recognises a
    /// command that already took effect.
    ///
    /// The default reads the aggregate's whole history; a store with an index on the
    /// causation id overrides it.
    ///
    /// # Errors
    /// As [`load_events`](EventRepository::load_events).
    async fn events_caused_by(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        causation_id: Uuid,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let mut events = self.load_events(aggregate_type, aggregate_id, 0).await?;
        events.retain(|event| event.causation_id == Some(causation_id));
        Ok(events)
    }

    /// The sequence of the aggregate's last event, 0 when it has none.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the back end fails.
    async fn event_sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<i64, CQRSError>;

    /// Up to `limit` events of all aggregates with a position greater than `after_position`,
    /// in position order, gap-safe (see the trait's docs).
    ///
    /// **A damaged row is one poison event, never a failed page.** Projections and relays
    /// read the global stream through here, so one row written outside the framework must
    /// not hide the rows around it:
    ///
    /// * a payload that is not JSON is returned as stored
    ///   ([`Payload::from_stored_unchecked`](crate::Payload::from_stored_unchecked)); the
    ///   event then fails to decode with [`DecodeError::MalformedPayload`](crate::DecodeError::MalformedPayload)
    ///   where it is used (a poison event of the projections of its aggregate type);
    /// * a row that cannot become an event at all (metadata that is not JSON, an id that is
    ///   not a UUID, a bad timestamp or sequence) ends the page before it: the events before
    ///   it are returned, and when it is the first row after `after_position` the result is
    ///   [`CQRSError::DamagedRow`] carrying its position. A reader treats that position as a
    ///   poison event and reads on with `read_all(position, ..)`.
    ///
    /// [`load_events`](EventRepository::load_events) stays strict: loading an aggregate with
    /// a damaged row is an error.
    ///
    /// # Errors
    /// [`CQRSError::DamagedRow`] when the first row is damaged (above);
    /// [`CQRSError::PersistenceError`] when the back end fails.
    async fn read_all(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError>;

    /// A receiver that changes whenever new events may be readable, carrying the highest
    /// position known to be committed. `None` when the store cannot notify; readers poll
    /// then.
    fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        None
    }
}

/// The future an `async_trait` method returns.
type BoxedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// The hot methods hand back the inner store's future itself: an `async fn` here would box a
// second future around it on every call (`CQRSFramework` holds its store as an `Arc<dyn _>`,
// so every dispatch comes through this impl).
#[async_trait]
impl<T: EventRepository + ?Sized> EventRepository for std::sync::Arc<T> {
    fn append<'life0, 'async_trait>(
        &'life0 self,
        events: Vec<PersistableDomainEvent>,
    ) -> BoxedFuture<'async_trait, Result<Vec<i64>, CQRSError>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        (**self).append(events)
    }
    fn try_append_now(
        &self,
        events: &mut Vec<PersistableDomainEvent>,
    ) -> Option<Result<Vec<i64>, CQRSError>> {
        (**self).try_append_now(events)
    }
    fn load_events<'life0, 'life1, 'async_trait>(
        &'life0 self,
        aggregate_type: &'life1 str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> BoxedFuture<'async_trait, Result<Vec<PersistableDomainEvent>, CQRSError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).load_events(aggregate_type, aggregate_id, after_sequence)
    }
    async fn fold_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
        visit: &mut (dyn for<'e> FnMut(&'e PersistableDomainEvent) -> Result<(), CQRSError> + Send),
    ) -> Result<(), CQRSError> {
        (**self)
            .fold_events(aggregate_type, aggregate_id, after_sequence, visit)
            .await
    }
    async fn events_caused_by(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        causation_id: Uuid,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        (**self)
            .events_caused_by(aggregate_type, aggregate_id, causation_id)
            .await
    }
    fn event_sequence<'life0, 'life1, 'async_trait>(
        &'life0 self,
        aggregate_type: &'life1 str,
        aggregate_id: Uuid,
    ) -> BoxedFuture<'async_trait, Result<i64, CQRSError>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).event_sequence(aggregate_type, aggregate_id)
    }
    fn read_all<'life0, 'async_trait>(
        &'life0 self,
        after_position: i64,
        limit: usize,
    ) -> BoxedFuture<'async_trait, Result<Vec<PersistableDomainEvent>, CQRSError>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        (**self).read_all(after_position, limit)
    }
    fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        (**self).subscribe()
    }
}

/// An aggregate's state at a sequence, saved so that loading need not replay everything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The aggregate instance's id.
    pub aggregate_id: Uuid,
    /// The sequence of the last event folded into `state`.
    pub sequence: i64,
    /// The serialized `Aggregate::State`.
    pub state: Value,
    /// When it was taken.
    pub timestamp: DateTime<Utc>,
}

/// Where snapshots are kept: at most one per aggregate, and the newest replaces older ones.
///
/// # What a snapshot must satisfy
///
/// A [`Snapshot`] at `sequence` holds the state that folding the aggregate's events `1..=sequence`
/// produces, so `sequence` is at least 1 and the event at `sequence` is stored. The framework
/// ([`CQRSFramework`](crate::CQRSFramework)) checks what it can without an extra read: when it
/// loads an aggregate it reads the events from `sequence` on (one read, as without a
/// snapshot) and requires the first one to carry exactly `sequence`; that event is skipped,
/// not decoded, since the snapshot holds it. A snapshot is **not used** when
///
/// * its `sequence` is 0 or less,
/// * its `state` does not deserialize into the aggregate's state, or
/// * the stream holds no event at its `sequence` (events removed by an operator, a snapshot
///   restored from another environment or copied from another aggregate with a longer
///   history).
///
/// Then the framework logs a warning (`tracing`), rebuilds the state from all the events,
/// and repairs the row: a snapshot of the rebuilt state replaces it (through
/// [`delete_snapshot`](SnapshotRepository::delete_snapshot) when the bad row's sequence is
/// ahead of the stream, since [`save_snapshot`](SnapshotRepository::save_snapshot) never
/// lowers a stored sequence), or the row is deleted when the aggregate has no events. A
/// state that is wrong although the stream reaches its sequence (a snapshot copied from
/// another aggregate at a sequence this one has too) is not detected.
///
/// Two loaders that repair the same row at once are harmless: each deletes and saves a
/// snapshot rebuilt from the stored events, so whatever row remains is a true snapshot, at
/// worst an older one than the newest possible.
///
/// The testkit's snapshot conformance suite (`cqrs_testkit::conformance::check_snapshot_repository`)
/// checks an implementation against this contract.
#[async_trait]
pub trait SnapshotRepository: Send + Sync {
    /// The newest snapshot of an aggregate, if any.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the back end fails.
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<Snapshot>, CQRSError>;

    /// Stores a snapshot, unless one at a higher sequence is already stored (one at the same
    /// sequence is replaced).
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the back end fails.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), CQRSError>;

    /// Removes the aggregate's snapshot, whatever its sequence; nothing to remove is not an
    /// error. Afterwards a snapshot at any sequence can be saved again.
    ///
    /// The framework calls it to replace a snapshot that is ahead of the aggregate's events
    /// (see the trait's docs). There is no default: [`save_snapshot`](SnapshotRepository::save_snapshot)
    /// cannot lower a stored sequence, so only the store itself can remove its row.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use cqrs::{MemorySnapshotRepository, Snapshot, SnapshotRepository};
    /// let snapshots = MemorySnapshotRepository::new();
    /// let id = uuid::Uuid::new_v4();
    /// let snapshot = |sequence| Snapshot {
    ///     aggregate_type: "counter".into(),
    ///     aggregate_id: id,
    ///     sequence,
    ///     state: serde_json::json!(sequence),
    ///     timestamp: chrono::Utc::now(),
    /// };
    /// snapshots.save_snapshot(snapshot(10)).await?;
    /// snapshots.save_snapshot(snapshot(3)).await?; // older: ignored
    /// assert_eq!(snapshots.load_snapshot("counter", id).await?.map(|s| s.sequence), Some(10));
    ///
    /// snapshots.delete_snapshot("counter", id).await?;
    /// assert!(snapshots.load_snapshot("counter", id).await?.is_none());
    /// snapshots.save_snapshot(snapshot(3)).await?;
    /// assert_eq!(snapshots.load_snapshot("counter", id).await?.map(|s| s.sequence), Some(3));
    /// # Ok::<(), cqrs::CQRSError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the back end fails.
    async fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<(), CQRSError>;
}

#[async_trait]
impl<T: SnapshotRepository + ?Sized> SnapshotRepository for std::sync::Arc<T> {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<Snapshot>, CQRSError> {
        (**self).load_snapshot(aggregate_type, aggregate_id).await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), CQRSError> {
        (**self).save_snapshot(snapshot).await
    }
    async fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<(), CQRSError> {
        (**self).delete_snapshot(aggregate_type, aggregate_id).await
    }
}

/// Where a reader that is not a view (an outbox relay, an integration) records how far it has
/// read the global stream. A projection's checkpoint lives with its views instead (see
/// [`ViewRepository::commit`]).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use cqrs::{Checkpoint, CheckpointRepository, MemoryCheckpointRepository};
/// let checkpoints = MemoryCheckpointRepository::new();
/// assert_eq!(checkpoints.load_checkpoint("relay").await?, 0);
/// checkpoints.save_checkpoint(Checkpoint { name: "relay".into(), position: 42 }).await?;
/// assert_eq!(checkpoints.load_checkpoint("relay").await?, 42);
/// # Ok::<(), cqrs::CQRSError>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait CheckpointRepository: Send + Sync {
    /// The position recorded under `name`, 0 if none.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the back end fails.
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError>;

    /// Records a position under a name, replacing the previous one.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the back end fails.
    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError>;
}

#[async_trait]
impl<T: CheckpointRepository + ?Sized> CheckpointRepository for std::sync::Arc<T> {
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        (**self).load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        (**self).save_checkpoint(checkpoint).await
    }
}

/// Checks that a batch is appendable: non-empty, one aggregate, contiguous sequences from at
/// least 1, an `aggregate_type_id` equal to [`PersistableDomainEvent::type_id_for`] of its
/// type and id, no event id twice. Every store calls it first.
///
/// Returns the sequence the writer expects to be the aggregate's last.
///
/// # Errors
/// [`CQRSError::InvalidAppend`] describing the first problem, or
/// [`CQRSError::DuplicateEventId`] for an id used twice in the batch.
pub fn validate_batch(events: &[PersistableDomainEvent]) -> Result<i64, CQRSError> {
    validate_batch_against(events, None)
}

/// [`validate_batch`] for a store that keeps the `aggregate_type_id` it accepted before for
/// the batch's aggregate (`checked_key`): when every event carries that same text, the key
/// needs no other check.
pub(crate) fn validate_batch_against(
    events: &[PersistableDomainEvent],
    checked_key: Option<&str>,
) -> Result<i64, CQRSError> {
    let first = events
        .first()
        .ok_or_else(|| CQRSError::InvalidAppend("empty batch".into()))?;
    if first.sequence < 1 {
        return Err(CQRSError::InvalidAppend(format!(
            "sequences start at 1, got {}",
            first.sequence
        )));
    }
    // Clones of one `SmolStr` share its text: equal addresses need no comparison.
    let same_key = |event: &PersistableDomainEvent, key: &str| {
        let text = event.aggregate_type_id.as_str();
        std::ptr::eq(text, key) || text == key
    };
    let keys_checked =
        checked_key.is_some_and(|key| events.iter().all(|event| same_key(event, key)));
    // The key's id part as `type_id_for` writes it (lower-case, hyphenated): one encoding on
    // the stack, compared with every event's key (parsing each key cost more).
    let mut buffer = Uuid::encode_buffer();
    let id_text: &str = if keys_checked {
        ""
    } else {
        first.aggregate_id.hyphenated().encode_lower(&mut buffer)
    };
    for (i, event) in events.iter().enumerate() {
        // The first event is the one the others are compared with.
        if i > 0 {
            if event.aggregate_type != first.aggregate_type
                || event.aggregate_id != first.aggregate_id
            {
                return Err(CQRSError::InvalidAppend(
                    "events of more than one aggregate in one append".into(),
                ));
            }
            let expected = first.sequence + i as i64;
            if event.sequence != expected {
                return Err(CQRSError::InvalidAppend(format!(
                    "sequence {} where {expected} was expected",
                    event.sequence
                )));
            }
        }
        let key_ok = keys_checked
            || event
                .aggregate_type_id
                .strip_prefix(event.aggregate_type.as_str())
                .and_then(|rest| rest.strip_prefix(':'))
                == Some(id_text);
        if !key_ok {
            return Err(CQRSError::InvalidAppend(format!(
                "aggregate_type_id {:?} does not name {}:{}",
                event.aggregate_type_id, event.aggregate_type, event.aggregate_id
            )));
        }
    }
    // Event ids are unique in the whole store, so within one batch too. Most batches are a
    // handful of events, where a scan beats hashing.
    let duplicate = if events.len() <= 32 {
        events
            .iter()
            .enumerate()
            .skip(1)
            .find(|(i, event)| events[..*i].iter().any(|e| e.event_id == event.event_id))
            .map(|(_, event)| event)
    } else {
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        events.iter().find(|event| !seen.insert(event.event_id))
    };
    if let Some(event) = duplicate {
        return Err(CQRSError::DuplicateEventId {
            event_id: event.event_id,
        });
    }
    Ok(first.sequence - 1)
}

/// Where a store found an event id already stored: the event it belongs to, as
/// [`explain_refused_append`] compares it with a refused batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEventId {
    /// The aggregate type of the stored event.
    pub aggregate_type: String,
    /// The aggregate id of the stored event.
    pub aggregate_id: Uuid,
    /// The stored event's sequence in its aggregate.
    pub sequence: i64,
    /// The stored event's global position.
    pub position: i64,
}

/// Explains an append that a store refused because an event's key or id was already taken,
/// from the stored events of those of the batch's ids that are taken (`stored`, by event id).
///
/// * Every event of `events` stored as that same event (aggregate, sequence, and positions
///   in order, or all 0 on a store without a global order): the append is a retry of one
///   that committed, and the stored positions are the answer, as
///   [`EventRepository::append`] promises for an idempotent retry.
/// * Some id stored for another event: [`CQRSError::DuplicateEventId`] naming it.
/// * No id stored: another writer took the sequences first, [`CQRSError::Conflict`] against
///   `expected` (the sequence the writer expected last, as [`validate_batch`] returns it).
///
/// Stores call it on the rare path where the database refused an append on a unique key or
/// a condition; it reads nothing itself.
///
/// ```
/// use std::collections::HashMap;
/// use cqrs::{explain_refused_append, CQRSError, PersistableDomainEvent, StoredEventId};
/// # use uuid::Uuid;
///
/// # use cqrs::doc::CounterEvent;
/// let id = Uuid::new_v4();
/// let event = PersistableDomainEvent::new("counter", id, 1, &CounterEvent::Incremented { by: 1 }, serde_json::Value::Null)?;
/// // Nothing of the batch is stored: another writer won the race.
/// let refused = explain_refused_append(std::slice::from_ref(&event), &HashMap::new(), 0);
/// assert!(matches!(refused, Err(CQRSError::Conflict { expected_sequence: 0, .. })));
///
/// // The same event stored at position 7: a retry of an append that committed.
/// let stored = HashMap::from([(event.event_id, StoredEventId {
///     aggregate_type: "counter".into(),
///     aggregate_id: id,
///     sequence: 1,
///     position: 7,
/// })]);
/// assert_eq!(explain_refused_append(&[event], &stored, 0)?, vec![7]);
/// # Ok::<(), CQRSError>(())
/// ```
///
/// # Errors
/// [`CQRSError::DuplicateEventId`] or [`CQRSError::Conflict`] as above;
/// [`CQRSError::InvalidAppend`] for an empty batch.
pub fn explain_refused_append(
    events: &[PersistableDomainEvent],
    stored: &std::collections::HashMap<Uuid, StoredEventId>,
    expected: i64,
) -> Result<Vec<i64>, CQRSError> {
    let first = events
        .first()
        .ok_or_else(|| CQRSError::InvalidAppend("empty batch".into()))?;
    if stored.contains_key(&first.event_id) {
        let mut positions: Vec<i64> = Vec::with_capacity(events.len());
        for event in events {
            match stored.get(&event.event_id) {
                Some(found)
                    if found.aggregate_type == event.aggregate_type.as_str()
                        && found.aggregate_id == event.aggregate_id
                        && found.sequence == event.sequence
                        && positions.last().is_none_or(|&p| {
                            p < found.position || p == 0 && found.position == 0
                        }) =>
                {
                    positions.push(found.position);
                }
                _ => {
                    return Err(CQRSError::DuplicateEventId {
                        event_id: event.event_id,
                    })
                }
            }
        }
        tracing::debug!(
            aggregate_type = %first.aggregate_type,
            aggregate_id = %first.aggregate_id,
            "append retried after it had committed; returning the stored positions"
        );
        return Ok(positions);
    }
    if let Some(taken) = events.iter().find(|e| stored.contains_key(&e.event_id)) {
        return Err(CQRSError::DuplicateEventId {
            event_id: taken.event_id,
        });
    }
    Err(CQRSError::Conflict {
        aggregate_type: first.aggregate_type.to_string(),
        aggregate_id: first.aggregate_id,
        expected_sequence: expected,
    })
}
