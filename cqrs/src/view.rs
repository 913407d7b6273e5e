//! The read side: views built from events, where they are kept, and queries over them.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::event::EventEnvelope;

/// A read model built from one aggregate type's events.
///
/// A projection (see [`Projection`](crate::Projection)) feeds every event, in global order,
/// to the view instance named by [`view_id`](View::view_id) (by default the aggregate id),
/// and stores the result in a [`ViewRepository`] under [`TABLE_NAME`](View::TABLE_NAME).
///
/// `handle_event` is synchronous and must only change `self`: that is what lets a SQL view
/// store commit the view and the projection's checkpoint in one transaction.
///
/// ```
/// use cqrs::{EventEnvelope, View};
/// # use cqrs::{Aggregate, CQRSError, DomainEvent};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { Incremented { by: u32 } }
/// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct CounterError(#[from] CQRSError);
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent; type Commands = (); type Errors = CounterError; type State = ();
/// #     async fn handle_command(&self, _: uuid::Uuid, _: &(), _: ()) -> Result<Vec<CounterEvent>, CounterError> { Ok(vec![]) }
/// #     fn handle_event(&self, _: &mut (), _: &CounterEvent) {}
/// # }
///
/// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// struct CounterTotal {
///     total: u64,
/// }
///
/// impl View<Counter> for CounterTotal {
///     const TABLE_NAME: &'static str = "counter_total";
///     const VERSION: u64 = 1;
///
///     fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
///         match envelope.event {
///             CounterEvent::Incremented { by } => self.total += u64::from(by),
///         }
///         Ok(())
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a view of aggregate `{A}`",
    note = "implement `cqrs::View<{A}>` for it: TABLE_NAME, VERSION and handle_event"
)]
pub trait View<A: Aggregate>:
    Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Where the view is stored (a table name in SQL stores).
    const TABLE_NAME: &'static str;

    /// The view's schema version. Change it when `handle_event` or the view's shape changes;
    /// the view is then rebuilt from the first event.
    const VERSION: u64;

    /// The id of the view instance an event updates, or `None` if the event does not concern
    /// this view. By default, the event's aggregate id.
    ///
    /// Any string is an id: a view keyed by something else than the aggregate (a member's
    /// loans keyed by the member, a daily total keyed by the date) returns it here, from what
    /// the event carries.
    fn view_id(envelope: &EventEnvelope<A::Events>) -> Option<String> {
        Some(envelope.aggregate_id.to_string())
    }

    /// The ids of every view instance an event updates, in the order they are applied; none
    /// when the event does not concern this view. By default, [`view_id`](View::view_id)'s.
    ///
    /// Override it when one event changes several rows: a transfer that changes the row of
    /// the account it leaves and of the one it reaches. Each row then gets the event through
    /// [`handle_event_for`](View::handle_event_for), which says which row it is. An id listed
    /// twice is applied twice.
    fn view_ids(envelope: &EventEnvelope<A::Events>) -> impl IntoIterator<Item = String> {
        Self::view_id(envelope)
    }

    /// Applies one event to the view.
    ///
    /// # Errors
    /// The domain's error when the event cannot be applied; the projection stops there.
    fn handle_event(&mut self, envelope: &EventEnvelope<A::Events>) -> Result<(), A::Errors>;

    /// Applies one event to the view instance `view_id`, one of the ids
    /// [`view_ids`](View::view_ids) returned for it. By default, [`handle_event`](View::handle_event):
    /// override it when the change depends on which row is updated.
    ///
    /// ```
    /// # use cqrs::{Aggregate, CQRSError, DomainEvent};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct BankError(#[from] CQRSError);
    /// # #[derive(Default)] struct Bank;
    /// # impl Aggregate for Bank {
    /// #     const NAME: &'static str = "transfer";
    /// #     type Events = TransferEvent; type Commands = (); type Errors = BankError; type State = ();
    /// #     async fn handle_command(&self, _: uuid::Uuid, _: &(), _: ()) -> Result<Vec<TransferEvent>, BankError> { Ok(vec![]) }
    /// #     fn handle_event(&self, _: &mut (), _: &TransferEvent) {}
    /// # }
    /// use cqrs::{EventEnvelope, View};
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
    /// enum TransferEvent {
    ///     Sent { from: String, to: String, amount: i64 },
    /// }
    ///
    /// /// One row per account, changed by every transfer that leaves or reaches it.
    /// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    /// struct AccountBalance {
    ///     balance: i64,
    /// }
    ///
    /// impl View<Bank> for AccountBalance {
    ///     const TABLE_NAME: &'static str = "account_balance";
    ///     const VERSION: u64 = 1;
    ///
    ///     fn view_ids(envelope: &EventEnvelope<TransferEvent>) -> impl IntoIterator<Item = String> {
    ///         let TransferEvent::Sent { from, to, .. } = &envelope.event;
    ///         [from.clone(), to.clone()]
    ///     }
    ///
    ///     fn handle_event_for(&mut self, account: &str, envelope: &EventEnvelope<TransferEvent>) -> Result<(), BankError> {
    ///         let TransferEvent::Sent { from, amount, .. } = &envelope.event;
    ///         self.balance += if account == from { -amount } else { *amount };
    ///         Ok(())
    ///     }
    ///
    ///     // Every event goes through `handle_event_for`; this one is never called.
    ///     fn handle_event(&mut self, _: &EventEnvelope<TransferEvent>) -> Result<(), BankError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use cqrs::{CQRSFramework, MemoryEventRepository, MemoryViewRepository, Projection};
    /// let store = MemoryEventRepository::new();
    /// let views = MemoryViewRepository::<AccountBalance>::new();
    /// # let event = cqrs::PersistableDomainEvent::new("transfer", uuid::Uuid::new_v4(), 1,
    /// #     &TransferEvent::Sent { from: "ada".into(), to: "bob".into(), amount: 30 }, serde_json::Value::Null)?;
    /// # cqrs::EventRepository::append(&store, vec![event]).await?;
    /// // ... a transfer of 30 from "ada" to "bob" is stored ...
    /// Projection::<Bank, AccountBalance>::new(store, views.clone()).catch_up().await?;
    /// assert_eq!(views.load("ada").await?.map(|row| row.balance), Some(-30));
    /// assert_eq!(views.load("bob").await?.map(|row| row.balance), Some(30));
    /// # Ok::<(), CQRSError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// The domain's error when the event cannot be applied; the projection stops there.
    fn handle_event_for(
        &mut self,
        view_id: &str,
        envelope: &EventEnvelope<A::Events>,
    ) -> Result<(), A::Errors> {
        let _ = view_id;
        self.handle_event(envelope)
    }
}

/// A view instance and the version of its stored row, as loaded for an update.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewContext<V> {
    /// The view instance's id.
    pub view_id: String,
    /// The view as loaded (`Default` if it did not exist yet).
    pub view: V,
    /// The stored row's version: 0 if it did not exist; each commit adds one.
    pub version: i64,
}

/// Where a projection's progress is recorded: a name and the last position applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The projection's name.
    pub name: String,
    /// The global position of the last event whose effect is in the views.
    pub position: i64,
}

/// Where views are kept and how they are loaded and committed.
///
/// [`commit`](ViewRepository::commit) writes a batch of view changes and, when given, the
/// projection's checkpoint, all or nothing. A change is only written if the stored row still
/// has the version it was loaded with, so a stale projector cannot overwrite a newer view.
///
/// # Implementing a view store
///
/// Write the `impl` block with `#[cqrs::async_trait]` and its methods as `async fn`. A view
/// store that wraps another for any aggregate and view, here to log each commit:
///
/// ```
/// use cqrs::{Aggregate, CQRSError, Checkpoint, View, ViewContext, ViewRepository};
///
/// struct Logged<R>(R);
///
/// #[cqrs::async_trait]
/// impl<A, V, R> ViewRepository<A, V> for Logged<R>
/// where
///     A: Aggregate,
///     V: View<A>,
///     R: ViewRepository<A, V>,
/// {
///     async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
///         self.0.load(view_id).await
///     }
///
///     async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
///         self.0.list(after, limit).await
///     }
///
///     async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
///         self.0.load_for_update(view_id).await
///     }
///
///     async fn commit(&self, changes: Vec<ViewContext<V>>, checkpoint: Option<Checkpoint>) -> Result<(), CQRSError> {
///         let rows = changes.len();
///         self.0.commit(changes, checkpoint).await?;
///         println!("{}: {rows} rows committed", V::TABLE_NAME);
///         Ok(())
///     }
///
///     async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
///         self.0.checkpoint(name).await
///     }
/// }
/// ```
///
/// A store of its own keeps the contract above: `commit` writes the rows and the checkpoint
/// all or nothing, refuses a row whose version moved and a checkpoint that goes back, and
/// `list` pages in id byte order.
#[async_trait]
pub trait ViewRepository<A: Aggregate, V: View<A>>: Send + Sync {
    /// Loads a view instance by id.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] or [`CQRSError::Deserialization`].
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError>;

    /// Up to `limit` view instances with their ids, in ascending id order (byte order of the
    /// id's UTF-8), starting after the id `after` (from the first when `None`). To read a
    /// whole table page by page, pass the last id of each page as `after` of the next; an
    /// empty page is the end.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] or [`CQRSError::Deserialization`].
    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError>;

    /// Loads a view instance with its row version for an update; a missing one comes back
    /// as `V::default()` with version 0.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] or [`CQRSError::Deserialization`].
    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError>;

    /// Stores the changed views and the checkpoint (if any) atomically.
    ///
    /// # Errors
    /// [`CQRSError::ViewConflict`] when a row's version moved on since it was loaded (nothing
    /// is written then); [`CQRSError::PersistenceError`].
    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError>;

    /// The last position recorded under the checkpoint `name`, 0 if none.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError>;

    /// The [`View::VERSION`] readers of this view's table should use, `None` when no version
    /// was ever activated.
    ///
    /// A [`Projection`](crate::Projection) activates its view's version once it has caught up
    /// with the store, so while a new version is being rebuilt the old one stays the active
    /// one. The provided implementation keeps the marker as the checkpoint named
    /// [`active_version_marker`]`(V::TABLE_NAME)`, which every store that commits checkpoints
    /// supports; a store may override it with a dedicated table.
    ///
    /// # Errors
    /// What [`checkpoint`](ViewRepository::checkpoint) returns.
    async fn active_version(&self) -> Result<Option<u64>, CQRSError> {
        let marker = self
            .checkpoint(&active_version_marker(V::TABLE_NAME))
            .await?;
        Ok(u64::try_from(marker).ok().filter(|version| *version > 0))
    }

    /// Makes `version` the active version of this view's table, unless a version at least as
    /// high is active already (the marker never goes back, so an old deployment still running
    /// cannot switch readers back).
    ///
    /// # Errors
    /// What [`commit`](ViewRepository::commit) returns, other than the
    /// [`CQRSError::ViewConflict`] of a concurrent activation of a version at least as high.
    async fn activate_version(&self, version: u64) -> Result<(), CQRSError> {
        let marker = active_version_marker(V::TABLE_NAME);
        let position = i64::try_from(version).map_err(CQRSError::persistence)?;
        if self.checkpoint(&marker).await? >= position {
            return Ok(());
        }
        let checkpoint = Checkpoint {
            name: marker.clone(),
            position,
        };
        match self.commit(Vec::new(), Some(checkpoint)).await {
            Err(CQRSError::ViewConflict { .. }) if self.checkpoint(&marker).await? >= position => {
                Ok(())
            }
            other => other,
        }
    }

    /// True when this repository's [`View::VERSION`] is the one readers should use: it is
    /// the [`active_version`](ViewRepository::active_version), or no version was activated
    /// yet.
    ///
    /// # Errors
    /// What [`active_version`](ViewRepository::active_version) returns.
    async fn is_active_version(&self) -> Result<bool, CQRSError> {
        Ok(self
            .active_version()
            .await?
            .is_none_or(|active| active == V::VERSION))
    }
}

/// The name of the checkpoint under which the provided
/// [`ViewRepository::active_version`] keeps a view table's active version:
/// `"{table_name}@active"`.
///
/// ```
/// assert_eq!(cqrs::view::active_version_marker("balances"), "balances@active");
/// ```
pub fn active_version_marker(table_name: &str) -> String {
    format!("{table_name}@active")
}

/// Reads a view for a caller. The provided methods load one view instance: by any string id
/// ([`query_view`](Query::query_view)) or, as in most views, by the aggregate id
/// ([`query`](Query::query)). Implement the trait with an empty body, or override
/// `query_view` for other lookups (a default row, a fallback, access rules).
///
/// ```
/// # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { Incremented { by: u32 } }
/// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct CounterError(#[from] CQRSError);
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent; type Commands = (); type Errors = CounterError; type State = ();
/// #     async fn handle_command(&self, _: uuid::Uuid, _: &(), _: ()) -> Result<Vec<CounterEvent>, CounterError> { Ok(vec![]) }
/// #     fn handle_event(&self, _: &mut (), _: &CounterEvent) {}
/// # }
/// # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// # struct CounterTotal { total: u64 }
/// # impl View<Counter> for CounterTotal {
/// #     const TABLE_NAME: &'static str = "counter_total";
/// #     const VERSION: u64 = 1;
/// #     fn handle_event(&mut self, _: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> { Ok(()) }
/// # }
/// struct TotalById;
/// impl cqrs::Query<Counter, CounterTotal> for TotalById {}
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use cqrs::Query;
/// let views = cqrs::MemoryViewRepository::<CounterTotal>::new();
/// let found = TotalById.query(&uuid::Uuid::new_v4(), &views).await.unwrap();
/// assert!(found.is_none());
/// // A view keyed by something else than an aggregate id:
/// assert!(TotalById.query_view("2026-12-02", &views).await.unwrap().is_none());
/// # });
/// ```
#[async_trait]
pub trait Query<A: Aggregate, V: View<A>>: Send + Sync {
    /// Loads the view instance `view_id` from `view_repo`.
    ///
    /// # Errors
    /// What the repository's `load` returns.
    async fn query_view<R>(&self, view_id: &str, view_repo: &R) -> Result<Option<V>, CQRSError>
    where
        R: ViewRepository<A, V> + ?Sized,
    {
        view_repo.load(view_id).await
    }

    /// Loads the view instance whose id is `aggregate_id`, through
    /// [`query_view`](Query::query_view).
    ///
    /// # Errors
    /// What `query_view` returns.
    async fn query<R>(&self, aggregate_id: &Uuid, view_repo: &R) -> Result<Option<V>, CQRSError>
    where
        R: ViewRepository<A, V> + ?Sized,
    {
        self.query_view(&aggregate_id.to_string(), view_repo).await
    }
}

/// A thread-safe view store in memory, with checkpoints, meeting the same contract as the SQL
/// view stores. Cloning gives another handle to the same store.
///
/// ```
/// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)] struct Balance;
/// let views = cqrs::MemoryViewRepository::<Balance>::new();
/// # let _ = views;
/// ```
#[derive(Debug)]
pub struct MemoryViewRepository<V> {
    inner: Arc<Mutex<MemoryViews<V>>>,
}

#[derive(Debug)]
struct MemoryViews<V> {
    rows: HashMap<String, (V, i64)>,
    checkpoints: HashMap<String, i64>,
}

impl<V> Clone for MemoryViewRepository<V> {
    fn clone(&self) -> Self {
        MemoryViewRepository {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V> Default for MemoryViewRepository<V> {
    fn default() -> Self {
        MemoryViewRepository {
            inner: Arc::new(Mutex::new(MemoryViews {
                rows: HashMap::new(),
                checkpoints: HashMap::new(),
            })),
        }
    }
}

impl<V> MemoryViewRepository<V> {
    /// An empty view store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The view instance `view_id`, if there is one: the same as
    /// [`ViewRepository::load`], without naming the aggregate.
    ///
    /// ```
    /// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)] struct Balance;
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let views = cqrs::MemoryViewRepository::<Balance>::new();
    /// assert!(views.load("42").await?.is_none());
    /// assert!(views.list(None, 100).await?.is_empty());
    /// # Ok::<(), cqrs::CQRSError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// None in memory; the signature is every view store's.
    pub async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError>
    where
        V: Clone,
    {
        Ok(self.lock().rows.get(view_id).map(|(view, _)| view.clone()))
    }

    /// A page of view instances in id order, as [`ViewRepository::list`] returns it,
    /// without naming the aggregate.
    ///
    /// # Errors
    /// None in memory; the signature is every view store's.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, V)>, CQRSError>
    where
        V: Clone,
    {
        let inner = self.lock();
        let mut ids: Vec<&String> = inner
            .rows
            .keys()
            .filter(|id| after.is_none_or(|after| id.as_str() > after))
            .collect();
        ids.sort_unstable();
        Ok(ids
            .into_iter()
            .take(limit)
            .filter_map(|id| {
                inner
                    .rows
                    .get(id)
                    .map(|(view, _)| (id.clone(), view.clone()))
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, MemoryViews<V>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl<A, V> ViewRepository<A, V> for MemoryViewRepository<V>
where
    A: Aggregate,
    V: View<A>,
{
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        MemoryViewRepository::load(self, view_id).await
    }

    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        MemoryViewRepository::list(self, after, limit).await
    }

    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
        let (view, version) = self
            .lock()
            .rows
            .get(view_id)
            .cloned()
            .unwrap_or_else(|| (V::default(), 0));
        Ok(ViewContext {
            view_id: view_id.to_owned(),
            view,
            version,
        })
    }

    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        let mut inner = self.lock();
        for change in &changes {
            let stored = inner.rows.get(&change.view_id).map_or(0, |(_, v)| *v);
            if stored != change.version {
                return Err(CQRSError::ViewConflict {
                    view: V::TABLE_NAME.to_owned(),
                    view_id: change.view_id.clone(),
                    expected_version: change.version,
                });
            }
        }
        if let Some(checkpoint) = &checkpoint {
            // Like the SQL view stores: a checkpoint never goes back, and equal is only
            // accepted without view changes (a second projector replaying applied events).
            if let Some(&stored) = inner.checkpoints.get(&checkpoint.name) {
                if checkpoint.position < stored
                    || (checkpoint.position == stored && !changes.is_empty())
                {
                    return Err(CQRSError::ViewConflict {
                        view: V::TABLE_NAME.to_owned(),
                        view_id: format!("checkpoint {}", checkpoint.name),
                        expected_version: stored,
                    });
                }
            }
        }
        for change in changes {
            inner
                .rows
                .insert(change.view_id, (change.view, change.version + 1));
        }
        if let Some(checkpoint) = checkpoint {
            inner
                .checkpoints
                .insert(checkpoint.name, checkpoint.position);
        }
        Ok(())
    }

    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        Ok(self.lock().checkpoints.get(name).copied().unwrap_or(0))
    }
}

#[async_trait]
impl<A, V, T> ViewRepository<A, V> for Arc<T>
where
    A: Aggregate,
    V: View<A>,
    T: ViewRepository<A, V> + ?Sized,
{
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        (**self).load(view_id).await
    }
    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        (**self).list(after, limit).await
    }
    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
        (**self).load_for_update(view_id).await
    }
    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        (**self).commit(changes, checkpoint).await
    }
    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        (**self).checkpoint(name).await
    }
    async fn active_version(&self) -> Result<Option<u64>, CQRSError> {
        (**self).active_version().await
    }
    async fn activate_version(&self, version: u64) -> Result<(), CQRSError> {
        (**self).activate_version(version).await
    }
    async fn is_active_version(&self) -> Result<bool, CQRSError> {
        (**self).is_active_version().await
    }
}
