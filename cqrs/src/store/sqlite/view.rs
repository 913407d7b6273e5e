//! Views stored as JSON rows, one table per view, committed with their checkpoint.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use async_trait::async_trait;
use sqlx::Row;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::store::{Checkpoint, ViewContext, ViewRepository};
use crate::view::View;

use super::writer::{Job, ViewCommit, ViewRow};
use super::SqliteEventRepository;

/// A [`ViewRepository`] keeping views in the same SQLite file as the events.
///
/// Each view type gets a table named by its [`View::TABLE_NAME`] (checked to be a plain
/// identifier; a bad name is a [`CQRSError::PersistenceError`] whose source is an
/// [`InvalidTableName`](super::InvalidTableName)), created on first use:
///
/// ```sql
/// (view_id TEXT, view_version INTEGER, row_version INTEGER, payload TEXT, updated_at INTEGER,
///  PRIMARY KEY (view_id, view_version))
/// ```
///
/// `view_version` is [`View::VERSION`], so a new version is built beside the old rows while
/// they stay readable. `row_version` is the optimistic lock: a commit only writes a row whose
/// version is still the one it was loaded with, otherwise nothing of the commit is written
/// and the result is [`CQRSError::ViewConflict`].
///
/// [`commit`](ViewRepository::commit) writes the view rows and the projection's checkpoint
/// in one transaction, which is what makes a [`Projection`](crate::Projection) on this store
/// apply every event exactly once. It also refuses (with [`CQRSError::ViewConflict`], naming
/// the checkpoint) a checkpoint lower than the stored one, or equal to it with view changes:
/// that is a second projector replaying events the first already applied.
///
/// ```no_run
/// # use cqrs::doc::{Counter, CounterTotal};
/// use cqrs::{CQRSError, Projection, SqliteEventRepository};
///
/// # async fn run() -> Result<(), CQRSError> {
/// let store = SqliteEventRepository::open("counter.sqlite").await?;
/// let projection = Projection::<Counter, CounterTotal>::new(store.clone(), store.views());
/// projection.catch_up().await?;
/// # Ok(()) }
/// ```
pub struct SqliteViewRepository<V> {
    store: SqliteEventRepository,
    _view: PhantomData<fn() -> V>,
}

impl<V> Clone for SqliteViewRepository<V> {
    fn clone(&self) -> Self {
        SqliteViewRepository {
            store: self.store.clone(),
            _view: PhantomData,
        }
    }
}

impl<V> fmt::Debug for SqliteViewRepository<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteViewRepository")
            .field("view", &std::any::type_name::<V>())
            .finish()
    }
}

impl<V> SqliteViewRepository<V> {
    /// A view store on the file of `store`, sharing its connections and its writer.
    pub fn new(store: &SqliteEventRepository) -> Self {
        SqliteViewRepository {
            store: store.clone(),
            _view: PhantomData,
        }
    }

    /// The event store whose file holds the views.
    pub fn event_repository(&self) -> &SqliteEventRepository {
        &self.store
    }

    /// The view instance `view_id`, if there is one: [`ViewRepository::load`] as a method of
    /// the store, so no trait needs importing. `A` is inferred when `V` is a view of one
    /// aggregate type; otherwise name it: `views.load::<Book>(id)`.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] or [`CQRSError::Deserialization`].
    pub async fn load<A>(&self, view_id: &str) -> Result<Option<V>, CQRSError>
    where
        A: Aggregate,
        V: View<A>,
    {
        Ok(self.read::<A>(view_id).await?.map(|(view, _)| view))
    }

    /// A page of view instances in id order: [`ViewRepository::list`] as a method of the
    /// store.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] or [`CQRSError::Deserialization`].
    pub async fn list<A>(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, V)>, CQRSError>
    where
        A: Aggregate,
        V: View<A>,
    {
        let table = <V as View<A>>::TABLE_NAME;
        self.store.ensure_view_table(table).await?;
        let version = view_version::<A, V>()?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // TEXT compares with SQLite's BINARY collation: byte order, like every view store.
        let sql = format!(
            "SELECT view_id, payload FROM \"{table}\" \
             WHERE view_version = ? AND (? IS NULL OR view_id > ?) ORDER BY view_id LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(version)
            .bind(after)
            .bind(after)
            .bind(limit)
            .fetch_all(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        rows.into_iter()
            .map(|row| {
                let view_id: String = row.try_get(0).map_err(CQRSError::persistence)?;
                let payload: String = row.try_get(1).map_err(CQRSError::persistence)?;
                let view = serde_json::from_str(&payload).map_err(|source| {
                    CQRSError::Deserialization {
                        what: format!("view {table}/{view_id}"),
                        source,
                    }
                })?;
                Ok((view_id, view))
            })
            .collect()
    }
}

fn view_version<A: Aggregate, V: View<A>>() -> Result<i64, CQRSError> {
    i64::try_from(V::VERSION).map_err(|_| {
        CQRSError::persistence(format!(
            "view {} has VERSION {} which does not fit SQLite's INTEGER",
            V::TABLE_NAME,
            V::VERSION
        ))
    })
}

impl<V> SqliteViewRepository<V> {
    async fn read<A: Aggregate>(&self, view_id: &str) -> Result<Option<(V, i64)>, CQRSError>
    where
        V: View<A>,
    {
        let table = <V as View<A>>::TABLE_NAME;
        self.store.ensure_view_table(table).await?;
        let version = view_version::<A, V>()?;
        let sql = format!(
            "SELECT payload, row_version FROM \"{table}\" WHERE view_id = ? AND view_version = ?"
        );
        let row = sqlx::query(&sql)
            .bind(view_id)
            .bind(version)
            .fetch_optional(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let what = || format!("view {table}/{view_id}");
        let payload: String = row.try_get(0).map_err(CQRSError::persistence)?;
        let row_version: i64 = row.try_get(1).map_err(CQRSError::persistence)?;
        let view = serde_json::from_str(&payload).map_err(|source| CQRSError::Deserialization {
            what: what(),
            source,
        })?;
        Ok(Some((view, row_version)))
    }
}

#[async_trait]
impl<A, V> ViewRepository<A, V> for SqliteViewRepository<V>
where
    A: Aggregate,
    V: View<A>,
{
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        SqliteViewRepository::load::<A>(self, view_id).await
    }

    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        SqliteViewRepository::list::<A>(self, after, limit).await
    }

    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
        let (view, version) = self
            .read::<A>(view_id)
            .await?
            .unwrap_or_else(|| (V::default(), 0));
        Ok(ViewContext {
            view_id: view_id.to_owned(),
            view,
            version,
        })
    }

    async fn load_many_for_update(
        &self,
        view_ids: &[String],
    ) -> Result<Vec<ViewContext<V>>, CQRSError> {
        match view_ids {
            [] => return Ok(Vec::new()),
            [view_id] => {
                return Ok(vec![
                    <Self as ViewRepository<A, V>>::load_for_update(self, view_id).await?,
                ])
            }
            _ => {}
        }
        let table = <V as View<A>>::TABLE_NAME;
        self.store.ensure_view_table(table).await?;
        let version = view_version::<A, V>()?;
        // The ids as one JSON array: one statement for any number of them.
        let ids = serde_json::to_string(view_ids).map_err(|source| CQRSError::Serialization {
            what: format!("view ids of {table}"),
            source,
        })?;
        let sql = format!(
            "SELECT view_id, payload, row_version FROM \"{table}\" \
             WHERE view_version = ? AND view_id IN (SELECT value FROM json_each(?))"
        );
        let rows = sqlx::query(&sql)
            .bind(version)
            .bind(ids)
            .fetch_all(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let view_id: String = row.try_get(0).map_err(CQRSError::persistence)?;
            let payload: String = row.try_get(1).map_err(CQRSError::persistence)?;
            let row_version: i64 = row.try_get(2).map_err(CQRSError::persistence)?;
            let view =
                serde_json::from_str(&payload).map_err(|source| CQRSError::Deserialization {
                    what: format!("view {table}/{view_id}"),
                    source,
                })?;
            found.insert(view_id, (view, row_version));
        }
        Ok(ViewContext::in_order(view_ids, found))
    }

    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        let table = <V as View<A>>::TABLE_NAME;
        self.store.ensure_view_table(table).await?;
        let view_version = view_version::<A, V>()?;
        let rows = changes
            .into_iter()
            .map(|change| {
                let payload = serde_json::to_string(&change.view).map_err(|source| {
                    CQRSError::Serialization {
                        what: format!("view {table}/{}", change.view_id),
                        source,
                    }
                })?;
                Ok(ViewRow {
                    view_id: change.view_id,
                    expected_version: change.version,
                    payload,
                })
            })
            .collect::<Result<Vec<_>, CQRSError>>()?;
        let commit = ViewCommit {
            table: table.to_owned(),
            view_version,
            rows,
            checkpoint,
        };
        self.store
            .submit(|reply| Job::Views { commit, reply })
            .await
    }

    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        self.store.checkpoint(name).await
    }
}
