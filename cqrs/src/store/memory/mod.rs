//! In-memory stores: the same contract as the durable ones, kept in the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use smol_str::SmolStr;
use tokio::sync::watch;
use uuid::Uuid;

mod dead_letters;
mod ids;
mod log;
mod views;

pub use self::dead_letters::MemoryDeadLetters;
pub use self::views::MemoryViewRepository;

use self::ids::IdIndex;
use self::log::EventLog;
use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::{
    validate_batch_against, Checkpoint, CheckpointRepository, EventRepository, Snapshot,
    SnapshotRepository,
};

/// A fast hasher with a random per-process seed: the default SipHash was about a sixth of an
/// in-memory dispatch.
type Hasher = foldhash::quality::RandomState;

/// A thread-safe event store in memory.
///
/// It meets the whole [`EventRepository`] contract (optimistic appends, idempotent retries,
/// gap-free global positions, change notification), so code tested on it behaves the same on
/// a durable store. Cloning gives another handle to the same store.
///
/// ```
/// # tokio_test_block_on(async {
/// use cqrs::{EventRepository, MemoryEventRepository};
/// let store = MemoryEventRepository::new();
/// assert_eq!(store.read_all(0, 10).await.unwrap().len(), 0);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryEventRepository {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: RwLock<Inner>,
    position: watch::Sender<i64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// All events; `position` is the index plus one.
    events: EventLog,
    /// aggregate type -> aggregate id -> the aggregate's stream.
    streams: HashMap<SmolStr, HashMap<Uuid, Stream, Hasher>, Hasher>,
    /// event id -> index into `events`.
    ids: IdIndex,
}

/// One aggregate's events.
#[derive(Debug, Default)]
struct Stream {
    /// Indexes into `Inner::events`, in sequence order.
    indexes: Vec<usize>,
    /// The `aggregate_type_id` of a batch [`validate_batch`](crate::validate_batch) accepted for this aggregate: the
    /// one key that names it, so a later batch carrying the same text needs no new check.
    key: Option<SmolStr>,
}

impl Default for MemoryEventRepository {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEventRepository {
    /// An empty store.
    pub fn new() -> Self {
        MemoryEventRepository {
            inner: Arc::new(Shared {
                state: RwLock::new(Inner::default()),
                position: watch::channel(0).0,
            }),
        }
    }

    /// Whether an append must [`publish`](Self::publish) its last position: only when
    /// someone has [subscribed](EventRepository::subscribe).
    ///
    /// Asked under the store's write lock, before the append releases it. A subscriber
    /// counts itself and sets the channel's value to the store's length under the read
    /// lock, so it is either counted before the append asks (and woken by the append) or
    /// reads a length that includes the append. Publishing takes the channel's lock; a store
    /// nobody follows skips it on every append.
    fn must_publish(&self) -> bool {
        self.inner.position.receiver_count() > 0
    }

    /// Publishes a new last position to the receivers of
    /// [`subscribe`](EventRepository::subscribe). Two appenders publish in either order:
    /// the value only grows.
    fn publish(&self, position: i64) {
        self.inner.position.send_if_modified(|current| {
            let newer = position > *current;
            if newer {
                *current = position;
            }
            newer
        });
    }

    /// How many events the store holds.
    pub fn len(&self) -> usize {
        self.read().events.len()
    }

    /// True when the store holds no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Test hook: stores an event exactly as given, bypassing every check, with the next
    /// position.
    ///
    /// For tests that need a store holding what a buggy writer or a hand edit left behind (a
    /// malformed payload, an unknown event type, a hole in a history). Never use it in
    /// application code.
    #[doc(hidden)]
    pub fn insert_unchecked(&self, mut event: PersistableDomainEvent) -> i64 {
        let mut guard = self.write();
        let inner = &mut *guard;
        let index = inner.events.len();
        event.position = index as i64 + 1;
        if let Ok(slot) = u32::try_from(index) {
            inner.ids.replace(event.event_id, slot, &inner.events);
        }
        inner
            .streams
            .entry(event.aggregate_type.clone())
            .or_default()
            .entry(event.aggregate_id)
            .or_default()
            .indexes
            .push(index);
        inner.events.push(event);
        let publish = self.must_publish();
        drop(guard);
        if publish {
            self.publish(index as i64 + 1);
        }
        index as i64 + 1
    }

    /// Test hook: changes one stored event in place, bypassing every check; returns false if
    /// there is no event at that aggregate and sequence.
    ///
    /// For tests that simulate a corrupted row (a payload that no longer decodes, or one that
    /// is not JSON at all with [`Payload::from_stored_unchecked`](crate::Payload::from_stored_unchecked);
    /// a renamed event type). Never use it in application code.
    #[doc(hidden)]
    pub fn update_unchecked(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        change: impl FnOnce(&mut PersistableDomainEvent),
    ) -> bool {
        let mut inner = self.write();
        let inner = &mut *inner;
        let Some(index) = inner
            .streams
            .get(aggregate_type)
            .and_then(|s| s.get(&aggregate_id))
            .and_then(|stream| {
                stream
                    .indexes
                    .iter()
                    .copied()
                    .find(|&i| inner.events[i].sequence == sequence)
            })
        else {
            return false;
        };
        change(&mut inner.events[index]);
        true
    }

    /// Test hook: removes one event from its aggregate's history (it stays at its global
    /// position in `read_all`), bypassing every check; returns false if there is no such
    /// event.
    ///
    /// For tests that simulate a hole in a history. Never use it in application code.
    #[doc(hidden)]
    pub fn remove_from_history_unchecked(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
    ) -> bool {
        let mut inner = self.write();
        let inner = &mut *inner;
        let events = &inner.events;
        let Some(indexes) = inner
            .streams
            .get_mut(aggregate_type)
            .and_then(|s| s.get_mut(&aggregate_id))
            .map(|stream| &mut stream.indexes)
        else {
            return false;
        };
        let before = indexes.len();
        indexes.retain(|&i| events[i].sequence != sequence);
        before != indexes.len()
    }

    // A poisoned lock only means another thread panicked while holding it; every write below
    // leaves `Inner` consistent before anything can panic, so the data is still valid.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What an append of `events` is when one of its ids is already stored: a retry of a
    /// batch stored before (its positions), or a misuse ([`CQRSError::DuplicateEventId`]).
    /// `None` when no id of the batch is stored.
    fn stored_ids(
        ids: &IdIndex,
        stored: &EventLog,
        events: &[PersistableDomainEvent],
    ) -> Option<Result<Vec<i64>, CQRSError>> {
        let Some(index) = events
            .first()
            .and_then(|first| ids.get(first.event_id, stored))
        else {
            return events
                .iter()
                .skip(1)
                .find(|e| ids.get(e.event_id, stored).is_some())
                .map(|dup| {
                    Err(CQRSError::DuplicateEventId {
                        event_id: dup.event_id,
                    })
                });
        };
        let mut positions = Vec::with_capacity(events.len());
        for event in events {
            match ids.get(event.event_id, stored) {
                Some(i)
                    if i == index + positions.len()
                        && stored[i].aggregate_id == event.aggregate_id
                        && stored[i].aggregate_type == event.aggregate_type
                        && stored[i].sequence == event.sequence =>
                {
                    positions.push(i as i64 + 1)
                }
                _ => {
                    return Some(Err(CQRSError::DuplicateEventId {
                        event_id: event.event_id,
                    }))
                }
            }
        }
        Some(Ok(positions))
    }

    /// The append of [`EventRepository::append`], done at once: the store never waits.
    /// On success `events` is left empty (its allocation kept); on an error, as it was.
    fn append_now(&self, events: &mut Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        let mut guard = self.write();
        let inner = &mut *guard;
        let Some(first) = events.first() else {
            return Err(CQRSError::InvalidAppend("empty batch".into()));
        };
        let (aggregate_id, first_id) = (first.aggregate_id, first.event_id);
        // One lookup of the stream, kept for the whole append (a new stream is made below).
        let mut stream = inner
            .streams
            .get_mut(first.aggregate_type.as_str())
            .and_then(|streams| streams.get_mut(&aggregate_id));
        let checked_key = stream.as_ref().and_then(|s| s.key.as_deref());
        let expected = validate_batch_against(events, checked_key)?;

        let current = stream
            .as_ref()
            .and_then(|s| s.indexes.last())
            .map_or(0, |&i| inner.events[i].sequence);
        if current != expected {
            // A batch stored before (a retry) or an id stored for another event comes first.
            if let Some(answer) = Self::stored_ids(&inner.ids, &inner.events, events) {
                return answer;
            }
            if current > expected {
                return Err(CQRSError::Conflict {
                    aggregate_type: first.aggregate_type.to_string(),
                    aggregate_id,
                    expected_sequence: expected,
                });
            }
            return Err(CQRSError::InvalidAppend(format!(
                "first sequence {} skips ahead of the stored {current}",
                expected + 1
            )));
        }
        let start = inner.events.len();
        // The id index counts events in `u32`.
        let Some(start_slot) = u32::try_from(start + events.len())
            .ok()
            .and_then(|_| u32::try_from(start).ok())
        else {
            return Err(CQRSError::InvalidAppend(format!(
                "the in-memory store holds {start} events, its most is {}",
                u32::MAX
            )));
        };
        if events.len() == 1 {
            // One lookup of the id: it is taken here, or the append is answered as a retry.
            if inner
                .ids
                .insert(first_id, start_slot, &inner.events)
                .is_err()
            {
                return Self::stored_ids(&inner.ids, &inner.events, events)
                    .unwrap_or(Err(CQRSError::DuplicateEventId { event_id: first_id }));
            }
        } else {
            if let Some(answer) = Self::stored_ids(&inner.ids, &inner.events, events) {
                return answer;
            }
            // None of the ids is stored and they are distinct (`validate_batch_against`):
            // every insert takes its id.
            for (offset, event) in (start_slot..).zip(events.iter()) {
                let _taken = inner.ids.insert(event.event_id, offset, &inner.events);
            }
        }

        let stream = match stream.take() {
            Some(stream) => stream,
            // A new aggregate; the type's key is allocated only for a new aggregate type.
            None => {
                let streams = match inner.streams.get_mut(first.aggregate_type.as_str()) {
                    Some(streams) => streams,
                    None => inner
                        .streams
                        .entry(first.aggregate_type.clone())
                        .or_default(),
                };
                streams.entry(aggregate_id).or_insert_with(|| Stream {
                    indexes: Vec::with_capacity(8),
                    key: None,
                })
            }
        };
        if stream.key.is_none() {
            stream.key = Some(first.aggregate_type_id.clone());
        }
        stream.indexes.extend(start..start + events.len());
        let mut positions = Vec::with_capacity(events.len());
        for (offset, event) in events.iter_mut().enumerate() {
            event.position = (start + offset) as i64 + 1;
            positions.push(event.position);
        }
        inner.events.append(events);
        let last = inner.events.len() as i64;
        let publish = self.must_publish();
        drop(guard);
        if publish {
            self.publish(last);
        }
        Ok(positions)
    }
}

#[async_trait]
impl EventRepository for MemoryEventRepository {
    async fn append(&self, mut events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        self.append_now(&mut events)
    }

    fn try_append_now(
        &self,
        events: &mut Vec<PersistableDomainEvent>,
    ) -> Option<Result<Vec<i64>, CQRSError>> {
        Some(self.append_now(events))
    }

    async fn load_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let inner = self.read();
        let Some(indexes) = inner
            .streams
            .get(aggregate_type)
            .and_then(|s| s.get(&aggregate_id))
            .map(|stream| &stream.indexes)
        else {
            return Ok(Vec::new());
        };
        // Sequences are 1..=n in a store written through `append`; search instead of indexing
        // so that a history edited with `insert_unchecked` is still read faithfully.
        let from = indexes.partition_point(|&i| inner.events[i].sequence <= after_sequence);
        Ok(indexes[from..]
            .iter()
            .map(|&i| inner.events[i].clone())
            .collect())
    }

    async fn fold_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
        visit: &mut (dyn for<'e> FnMut(&'e PersistableDomainEvent) -> Result<(), CQRSError> + Send),
    ) -> Result<(), CQRSError> {
        // Lend the stored events under the read lock instead of cloning them: `visit` is
        // synchronous, so the lock is never held across an await.
        let inner = self.read();
        let Some(indexes) = inner
            .streams
            .get(aggregate_type)
            .and_then(|s| s.get(&aggregate_id))
            .map(|stream| &stream.indexes)
        else {
            return Ok(());
        };
        let from = indexes.partition_point(|&i| inner.events[i].sequence <= after_sequence);
        for &i in &indexes[from..] {
            visit(&inner.events[i])?;
        }
        Ok(())
    }

    async fn event_sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<i64, CQRSError> {
        let inner = self.read();
        Ok(inner
            .streams
            .get(aggregate_type)
            .and_then(|s| s.get(&aggregate_id))
            .and_then(|stream| stream.indexes.last())
            .map_or(0, |&i| inner.events[i].sequence))
    }

    async fn read_all(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let inner = self.read();
        let from = usize::try_from(after_position.max(0))
            .unwrap_or(usize::MAX)
            .min(inner.events.len());
        let to = from.saturating_add(limit).min(inner.events.len());
        Ok(inner.events.to_vec(from, to))
    }

    fn subscribe(&self) -> Option<watch::Receiver<i64>> {
        // Counted and brought up to date under the read lock: see `must_publish`.
        let inner = self.read();
        let receiver = self.inner.position.subscribe();
        let last = inner.events.len() as i64;
        // The value catches up with appends that published nothing; receivers that were
        // woken for those already are not woken again.
        self.inner.position.send_if_modified(|current| {
            *current = (*current).max(last);
            false
        });
        drop(inner);
        Some(receiver)
    }
}

/// A thread-safe snapshot store in memory. Cloning gives another handle to the same store.
///
/// ```
/// let snapshots = cqrs::MemorySnapshotRepository::new();
/// # let _ = snapshots;
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemorySnapshotRepository {
    snapshots: Arc<Mutex<HashMap<(String, Uuid), Snapshot>>>,
}

impl MemorySnapshotRepository {
    /// An empty snapshot store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, Uuid), Snapshot>> {
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl SnapshotRepository for MemorySnapshotRepository {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<Snapshot>, CQRSError> {
        Ok(self
            .lock()
            .get(&(aggregate_type.to_owned(), aggregate_id))
            .cloned())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), CQRSError> {
        let mut map = self.lock();
        let key = (snapshot.aggregate_type.clone(), snapshot.aggregate_id);
        match map.get(&key) {
            Some(existing) if existing.sequence > snapshot.sequence => {}
            _ => {
                map.insert(key, snapshot);
            }
        }
        Ok(())
    }

    async fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<(), CQRSError> {
        self.lock()
            .remove(&(aggregate_type.to_owned(), aggregate_id));
        Ok(())
    }
}

/// Thread-safe checkpoints in memory. Cloning gives another handle to the same map.
///
/// ```
/// let checkpoints = cqrs::MemoryCheckpointRepository::new();
/// # let _ = checkpoints;
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryCheckpointRepository {
    positions: Arc<Mutex<HashMap<String, i64>>>,
}

impl MemoryCheckpointRepository {
    /// No checkpoints yet.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl CheckpointRepository for MemoryCheckpointRepository {
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        let map = self
            .positions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(map.get(name).copied().unwrap_or(0))
    }

    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        let mut map = self
            .positions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(checkpoint.name, checkpoint.position);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An event of aggregate type `t` with a fresh random id.
    pub(super) fn event(aggregate_id: Uuid, sequence: i64) -> PersistableDomainEvent {
        PersistableDomainEvent {
            event_id: Uuid::new_v4(),
            aggregate_type_id: PersistableDomainEvent::type_id_for("t", aggregate_id),
            aggregate_id,
            aggregate_type: "t".into(),
            sequence,
            position: 0,
            event_type: "E".into(),
            event_version: "1".into(),
            payload: serde_json::json!({}).into(),
            metadata: serde_json::Value::Null,
            timestamp: chrono::Utc::now(),
            correlation_id: None,
            causation_id: None,
        }
    }

    #[tokio::test]
    async fn subscribers_see_every_position_whether_they_came_before_or_after() {
        let store = MemoryEventRepository::new();
        let id = Uuid::new_v4();
        // Appended with nobody listening: a later subscriber reads it.
        store.append(vec![event(id, 1)]).await.unwrap();
        let mut early = store.subscribe().unwrap();
        assert_eq!(*early.borrow_and_update(), 1);
        // Appended while subscribed: the subscriber is woken with the new position.
        let waiting = tokio::spawn(async move {
            early.changed().await.unwrap();
            *early.borrow_and_update()
        });
        tokio::task::yield_now().await;
        store
            .append(vec![event(id, 2), event(id, 3)])
            .await
            .unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the subscriber was woken")
            .unwrap();
        assert_eq!(seen, 3);
        // The subscriber is gone again: the next append still moves the position.
        store.append(vec![event(id, 4)]).await.unwrap();
        assert_eq!(*store.subscribe().unwrap().borrow(), 4);
    }

    #[test]
    fn a_subscriber_racing_appends_nobody_followed_starts_at_their_position() {
        const WRITERS: usize = 2;
        const APPENDS: usize = 3_000;
        let store = MemoryEventRepository::new();
        let subscriber = {
            let store = store.clone();
            std::thread::spawn(move || {
                // Each receiver is dropped at once: most appends find nobody subscribed and
                // publish nothing.
                for _ in 0..3_000 {
                    let before = store.len() as i64;
                    let seen = *store.subscribe().unwrap().borrow();
                    assert!(seen >= before, "subscribed at {seen} after {before} events");
                }
            })
        };
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let id = Uuid::new_v4();
                    for sequence in 1..=APPENDS as i64 {
                        let mut batch = vec![event(id, sequence)];
                        store.try_append_now(&mut batch).unwrap().unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        subscriber.join().unwrap();
        let total = (WRITERS * APPENDS) as i64;
        assert_eq!(*store.subscribe().unwrap().borrow(), total);
    }

    #[test]
    fn the_published_position_never_falls() {
        let store = MemoryEventRepository::new();
        let receiver = store.subscribe().unwrap();
        // Two appenders that release the store in one order and publish in the other.
        store.publish(6);
        store.publish(5);
        assert_eq!(*receiver.borrow(), 6);
    }
}
