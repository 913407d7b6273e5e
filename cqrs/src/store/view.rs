//! Where views are kept: the [`ViewRepository`] contract and the values it stores.

use std::sync::Arc;

use async_trait::async_trait;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::view::View;

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

    /// Loads several view instances for an update, each as
    /// [`load_for_update`](Self::load_for_update) loads it, in the order of `view_ids`.
    ///
    /// A projection loads the rows a batch of events touches with it. The default calls
    /// `load_for_update` for each id in turn; the SQL stores read all the rows with one
    /// query, so a catch-up pays one read per batch instead of one per row.
    ///
    /// ```
    /// use cqrs::doc::{Counter, CounterTotal};
    /// use cqrs::{MemoryViewRepository, ViewRepository};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let views = MemoryViewRepository::<CounterTotal>::new();
    /// let ids = ["a".to_owned(), "b".to_owned()];
    /// let loaded = ViewRepository::<Counter, _>::load_many_for_update(&views, &ids).await?;
    /// // Neither exists yet: each comes back as the default view at row version 0.
    /// assert_eq!(loaded.len(), 2);
    /// assert_eq!((loaded[1].view_id.as_str(), loaded[1].version), ("b", 0));
    /// # Ok::<(), cqrs::CQRSError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] or [`CQRSError::Deserialization`].
    async fn load_many_for_update(
        &self,
        view_ids: &[String],
    ) -> Result<Vec<ViewContext<V>>, CQRSError> {
        let mut loaded = Vec::with_capacity(view_ids.len());
        for view_id in view_ids {
            loaded.push(self.load_for_update(view_id).await?);
        }
        Ok(loaded)
    }

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

impl<V: Clone + Default> ViewContext<V> {
    /// The contexts of `view_ids`, in their order, from the rows a store found (by id, with
    /// their row versions): what [`ViewRepository::load_many_for_update`] returns, for a
    /// store that reads many rows in one request in no particular order. A missing row is
    /// the default view at version 0, and an id asked for again gets a copy of its first
    /// answer.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use cqrs::ViewContext;
    ///
    /// let found = HashMap::from([("b".to_owned(), (7_u32, 3_i64))]);
    /// let ids = ["a", "b", "a"].map(String::from);
    /// let contexts = ViewContext::in_order(&ids, found);
    /// let answers: Vec<_> = contexts.iter().map(|c| (c.view_id.as_str(), c.view, c.version)).collect();
    /// assert_eq!(answers, [("a", 0, 0), ("b", 7, 3), ("a", 0, 0)]);
    /// ```
    pub fn in_order(
        view_ids: &[String],
        mut found: std::collections::HashMap<String, (V, i64)>,
    ) -> Vec<Self> {
        let mut contexts: Vec<ViewContext<V>> = Vec::with_capacity(view_ids.len());
        // Where each id was first answered: an id asked for again gets a copy of that answer.
        let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for view_id in view_ids {
            let (view, version) = match first.get(view_id.as_str()) {
                Some(&at) => (contexts[at].view.clone(), contexts[at].version),
                None => found.remove(view_id).unwrap_or_else(|| (V::default(), 0)),
            };
            first.entry(view_id).or_insert(contexts.len());
            contexts.push(ViewContext {
                view_id: view_id.clone(),
                view,
                version,
            });
        }
        contexts
    }
}

/// The name of the checkpoint under which the provided
/// [`ViewRepository::active_version`] keeps a view table's active version:
/// `"{table_name}@active"`.
///
/// ```
/// assert_eq!(cqrs::active_version_marker("balances"), "balances@active");
/// ```
pub fn active_version_marker(table_name: &str) -> String {
    format!("{table_name}@active")
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
    async fn load_many_for_update(
        &self,
        view_ids: &[String],
    ) -> Result<Vec<ViewContext<V>>, CQRSError> {
        (**self).load_many_for_update(view_ids).await
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
