//! [`FaultyStore`]: an event store that fails when a test says so.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use cqrs::{CQRSError, DamagedRow, EventRepository, MemoryEventRepository, PersistableDomainEvent};
use uuid::Uuid;

/// How a scripted append fails: the ways a production store's append goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Another writer got there first: [`CQRSError::Conflict`] at the append's expected
    /// sequence, and nothing is stored. The framework reads the aggregate again and retries
    /// when its [`RetryPolicy`](cqrs::RetryPolicy) allows.
    Conflict,
    /// The server went away before the append: [`CQRSError::PersistenceError`], and nothing
    /// is stored.
    Unavailable,
    /// The append is stored, then the connection drops before the answer:
    /// [`CQRSError::PersistenceError`] although the events are stored. The caller cannot
    /// tell this from [`Unavailable`](Fault::Unavailable); sending the same append again is
    /// answered as a retry, and dispatching the same command again under a
    /// [`CommandContext::once`](cqrs::CommandContext::once) does not run it twice.
    LostAnswer,
}

/// How many calls of each kind a [`FaultyStore`] was asked for, the failed ones included:
/// what a test checks to show that a dispatch read nothing, or retried three times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// `append`.
    pub appends: usize,
    /// `load_events`.
    pub load_events: usize,
    /// `fold_events` (how the framework rebuilds a state).
    pub fold_events: usize,
    /// `events_caused_by` (how `CommandContext::once` finds a command that took effect).
    pub events_caused_by: usize,
    /// `event_sequence`.
    pub event_sequence: usize,
    /// `read_all` (projections, relays).
    pub read_all: usize,
}

impl Calls {
    /// Every read, of any kind.
    pub fn reads(&self) -> usize {
        self.load_events
            + self.fold_events
            + self.events_caused_by
            + self.event_sequence
            + self.read_all
    }
}

/// An event store that fails on purpose: it wraps a real one (in memory unless you give
/// another) and makes the appends and reads you script fail the way a production store
/// does, so that a test shows what your code does on a lost race, a server that went away,
/// an append whose outcome it never learned ([`fail_appends`](Self::fail_appends),
/// [`fail_reads`](Self::fail_reads)), a row it cannot read
/// ([`damage_row`](Self::damage_row)) or a store that cannot notify
/// ([`without_notifications`](Self::without_notifications)). Unscripted calls go to the
/// wrapped store, and every call is counted ([`calls`](Self::calls)).
///
/// Clones share the script and the counts: keep one in the test and give another to the
/// framework.
///
/// ```
/// use cqrs::{CQRSError, CQRSFramework, RetryPolicy};
/// use cqrs_testkit::{Fault, FaultyStore};
/// # use cqrs::{Aggregate, DomainEvent};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { #[event(name = "Incremented", version = "1")] Incremented }
/// # #[derive(Debug, thiserror::Error)] #[error(transparent)]
/// # struct CounterError(#[from] CQRSError);
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type State = u32; type Commands = (); type Events = CounterEvent; type Errors = CounterError;
/// #     async fn handle_command(&self, _: uuid::Uuid, _: &u32, _: ()) -> Result<Vec<CounterEvent>, CounterError> {
/// #         Ok(vec![CounterEvent::Incremented])
/// #     }
/// #     fn handle_event(&self, state: &mut u32, _: &CounterEvent) { *state += 1; }
/// # }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = FaultyStore::new();
/// let counters = CQRSFramework::<Counter>::new(store.clone())
///     .with_retry(RetryPolicy::attempts(3));
/// let id = uuid::Uuid::new_v4();
///
/// // Two lost races: the framework reads the counter again and its third try commits.
/// store.fail_appends(2, Fault::Conflict);
/// let receipt = counters.dispatch(id, ()).await?;
/// assert_eq!((receipt.attempts, receipt.sequence), (3, 1));
/// assert_eq!(store.calls().appends, 3);
///
/// // The server goes away: the error reaches the caller and nothing is stored.
/// store.fail_appends(1, Fault::Unavailable);
/// let error = counters.dispatch(id, ()).await.unwrap_err();
/// assert!(matches!(error.0, CQRSError::PersistenceError(_)));
/// assert_eq!(counters.load(id).await?, 1);
/// # Ok::<(), CounterError>(())
/// # }).unwrap();
/// ```
pub struct FaultyStore<S = MemoryEventRepository> {
    inner: Arc<Shared<S>>,
}

// Not derived: a clone shares the wrapped store, which need not be `Clone` itself.
impl<S> Clone for FaultyStore<S> {
    fn clone(&self) -> Self {
        FaultyStore {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Shared<S> {
    store: S,
    script: Mutex<Script>,
}

#[derive(Default)]
struct Script {
    calls: Calls,
    /// Faults for the next appends, in order.
    appends: VecDeque<Fault>,
    /// A fault for every append after the scripted ones, until healed.
    every_append: Option<Fault>,
    /// How many of the next reads fail.
    reads: usize,
    /// A row `read_all` cannot read: its position, and how many more pages that start at
    /// it fail.
    damaged: Option<(i64, usize)>,
    /// `subscribe` answers `None`.
    deaf: bool,
}

impl FaultyStore<MemoryEventRepository> {
    /// A faulty store over a new, empty [`MemoryEventRepository`].
    pub fn new() -> Self {
        Self::wrapping(MemoryEventRepository::new())
    }
}

impl Default for FaultyStore<MemoryEventRepository> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: EventRepository> FaultyStore<S> {
    /// A faulty store over `store`, any [`EventRepository`] (a SQLite file, PostgreSQL).
    pub fn wrapping(store: S) -> Self {
        FaultyStore {
            inner: Arc::new(Shared {
                store,
                script: Mutex::new(Script::default()),
            }),
        }
    }

    /// The wrapped store, to read what was really stored.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        // A test that panicked while scripting has failed already; its script is still one.
        self.inner
            .script
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next `count` appends (after those already scripted) fail with `fault`.
    pub fn fail_appends(&self, count: usize, fault: Fault) -> &Self {
        self.script()
            .appends
            .extend(std::iter::repeat_n(fault, count));
        self
    }

    /// Every append after the scripted ones fails with `fault`, until [`heal`](Self::heal).
    pub fn fail_every_append(&self, fault: Fault) -> &Self {
        self.script().every_append = Some(fault);
        self
    }

    /// The next `count` reads (`load_events`, `fold_events`, `events_caused_by`,
    /// `event_sequence`, `read_all`) fail with [`CQRSError::PersistenceError`].
    pub fn fail_reads(&self, count: usize) -> &Self {
        self.script().reads += count;
        self
    }

    /// The row at `position` cannot be read, as a store's row with a malformed payload or
    /// metadata: `read_all` follows its contract for such a row (a page that reaches it ends
    /// before it, and a page that starts at it is [`CQRSError::DamagedRow`]) for the next
    /// `pages` pages that start at it (`usize::MAX`: until [`heal`](Self::heal)). Reads of
    /// one aggregate are not affected.
    pub fn damage_row(&self, position: i64, pages: usize) -> &Self {
        self.script().damaged = Some((position, pages));
        self
    }

    /// `subscribe` answers `None`, as a store that cannot notify: projections and relays
    /// poll it. Until [`heal`](Self::heal).
    pub fn without_notifications(&self) -> &Self {
        self.script().deaf = true;
        self
    }

    /// Forgets every scripted fault: from now on each call goes to the wrapped store. The
    /// counts stay.
    pub fn heal(&self) -> &Self {
        let mut script = self.script();
        *script = Script {
            calls: script.calls,
            ..Script::default()
        };
        drop(script);
        self
    }

    /// How many calls of each kind were asked for so far.
    pub fn calls(&self) -> Calls {
        self.script().calls
    }

    /// Counts an append; its scripted fault, if any.
    fn next_append_fault(&self) -> Option<Fault> {
        let mut script = self.script();
        script.calls.appends += 1;
        script.appends.pop_front().or(script.every_append)
    }

    /// Counts a read (`count` picks its kind); its scripted failure, if any.
    fn read(&self, what: &str, count: fn(&mut Calls) -> &mut usize) -> Result<(), CQRSError> {
        let mut script = self.script();
        *count(&mut script.calls) += 1;
        if script.reads == 0 {
            return Ok(());
        }
        script.reads -= 1;
        Err(CQRSError::persistence(format!(
            "FaultyStore: {what} failed as scripted (the server went away)"
        )))
    }
}

#[async_trait]
impl<S: EventRepository> EventRepository for FaultyStore<S> {
    async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        match self.next_append_fault() {
            None => self.inner.store.append(events).await,
            Some(Fault::Conflict) => {
                let first = events
                    .first()
                    .ok_or_else(|| CQRSError::InvalidAppend("empty batch".into()))?;
                Err(CQRSError::Conflict {
                    aggregate_type: first.aggregate_type.to_string(),
                    aggregate_id: first.aggregate_id,
                    expected_sequence: first.sequence - 1,
                })
            }
            Some(Fault::Unavailable) => Err(CQRSError::persistence(
                "FaultyStore: the append failed as scripted (the server went away); nothing \
                 is stored",
            )),
            Some(Fault::LostAnswer) => {
                self.inner.store.append(events).await?;
                Err(CQRSError::persistence(
                    "FaultyStore: the connection dropped after the append, as scripted; the \
                     events are stored",
                ))
            }
        }
    }

    async fn load_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        self.read("load_events", |calls| &mut calls.load_events)?;
        self.inner
            .store
            .load_events(aggregate_type, aggregate_id, after_sequence)
            .await
    }

    async fn fold_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
        visit: &mut (dyn for<'e> FnMut(&'e PersistableDomainEvent) -> Result<(), CQRSError> + Send),
    ) -> Result<(), CQRSError> {
        self.read("fold_events", |calls| &mut calls.fold_events)?;
        self.inner
            .store
            .fold_events(aggregate_type, aggregate_id, after_sequence, visit)
            .await
    }

    async fn events_caused_by(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        causation_id: Uuid,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        self.read("events_caused_by", |calls| &mut calls.events_caused_by)?;
        self.inner
            .store
            .events_caused_by(aggregate_type, aggregate_id, causation_id)
            .await
    }

    async fn event_sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<i64, CQRSError> {
        self.read("event_sequence", |calls| &mut calls.event_sequence)?;
        self.inner
            .store
            .event_sequence(aggregate_type, aggregate_id)
            .await
    }

    async fn read_all(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        self.read("read_all", |calls| &mut calls.read_all)?;
        let mut events = self.inner.store.read_all(after_position, limit).await?;
        let Some((damaged, pages)) = self.script().damaged else {
            return Ok(events);
        };
        let Some(index) = events.iter().position(|event| event.position == damaged) else {
            return Ok(events);
        };
        if index > 0 {
            events.truncate(index);
            return Ok(events);
        }
        {
            let mut script = self.script();
            match pages {
                0 => {
                    script.damaged = None;
                    return Ok(events);
                }
                usize::MAX => {}
                _ => script.damaged = Some((damaged, pages - 1)),
            }
        }
        let event = &events[0];
        Err(DamagedRow {
            position: event.position,
            event_id: Some(event.event_id),
            aggregate_type: Some(event.aggregate_type.to_string()),
            aggregate_id: Some(event.aggregate_id),
            sequence: Some(event.sequence),
            event_type: Some(event.event_type.to_string()),
            event_version: Some(event.event_version.to_string()),
            problem: "FaultyStore: the row is damaged, as scripted".to_owned(),
        }
        .into())
    }

    fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        if self.script().deaf {
            return None;
        }
        self.inner.store.subscribe()
    }
}
