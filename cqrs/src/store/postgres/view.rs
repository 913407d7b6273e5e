//! Views as JSONB rows, committed with the projection's checkpoint in one transaction.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::Row;

use super::schema::{
    validate_identifier, view_table_ddl, InvalidIdentifier, CUSTOM_PLANS_TRANSACTION,
};
use super::PostgresEventRepository;
use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::store::CheckpointRepository;
use crate::store::{Checkpoint, ViewContext, ViewRepository};
use crate::view::View;

/// A [`ViewRepository`] in the same PostgreSQL schema as a [`PostgresEventRepository`].
///
/// A view `V` lives in the table named by its `TABLE_NAME` (created on first use), one row
/// per `(view_id, view_version)` where `view_version` is `V::VERSION`, so a new version of a
/// view is written beside the old one. Each row carries a `row_version`:
/// [`commit`](ViewRepository::commit) only writes a row whose version is still the one it
/// was loaded with, otherwise nothing is written and the result is
/// [`CQRSError::ViewConflict`]. The view changes and the checkpoint commit in one
/// transaction, so a projection over this store applies every event exactly once.
///
/// `TABLE_NAME` must be a plain identifier (see [`InvalidIdentifier`]); anything else is
/// refused with a [`CQRSError::PersistenceError`] carrying it, never spliced into SQL.
///
/// ```no_run
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
/// # async fn demo() -> Result<(), CQRSError> {
/// use cqrs::{PostgresEventRepository, PostgresViewRepository, Projection};
///
/// let store = PostgresEventRepository::connect("postgres://postgres@127.0.0.1/test").await?;
/// store.migrate().await?;
/// let views = PostgresViewRepository::<CounterTotal>::new(&store);
/// let projection = Projection::<Counter, CounterTotal>::new(store, views);
/// projection.catch_up().await?;
/// # Ok(()) }
/// ```
pub struct PostgresViewRepository<V> {
    store: PostgresEventRepository,
    _marker: PhantomData<fn() -> V>,
}

impl<V> Clone for PostgresViewRepository<V> {
    fn clone(&self) -> Self {
        PostgresViewRepository {
            store: self.store.clone(),
            _marker: PhantomData,
        }
    }
}

impl<V> fmt::Debug for PostgresViewRepository<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresViewRepository")
            .field("schema", &self.store.schema())
            .finish()
    }
}

impl<V> PostgresViewRepository<V> {
    /// Views in the schema (and through the pool) of `store`. Run
    /// [`PostgresEventRepository::migrate`] first: the checkpoint table is created there.
    pub fn new(store: &PostgresEventRepository) -> Self {
        PostgresViewRepository {
            store: store.clone(),
            _marker: PhantomData,
        }
    }

    /// The event store whose schema and pool this uses.
    pub fn event_repository(&self) -> &PostgresEventRepository {
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
        <Self as ViewRepository<A, V>>::load(self, view_id).await
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
        <Self as ViewRepository<A, V>>::list(self, after, limit).await
    }
}

/// The validated, quoted table name and the `view_version` of `V` seen as a view of `A`;
/// creates the table the first time this store handle meets it.
async fn table_of<A: Aggregate, V: View<A>>(
    store: &PostgresEventRepository,
) -> Result<(String, i64), CQRSError> {
    view_table(store, V::TABLE_NAME, V::VERSION).await
}

/// A boxed, `Send` future: the executor calls live in non-generic functions returning one,
/// which keeps the `Send` proof of the generic trait methods simple for the compiler.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The non-generic part of [`table_of`].
fn view_table<'a>(
    store: &'a PostgresEventRepository,
    table: &'static str,
    version: u64,
) -> BoxFuture<'a, Result<(String, i64), CQRSError>> {
    Box::pin(async move {
        validate_identifier("view table", table)?;
        let version = i64::try_from(version).map_err(|_| InvalidIdentifier {
            kind: "view table",
            name: table.to_owned(),
            reason: "its VERSION does not fit in a BIGINT",
        })?;
        let qualified = format!("\"{}\".\"{table}\"", store.schema());
        if !store.view_tables().contains(table) {
            // One simple-query message: PostgreSQL runs it as one implicit transaction, so the
            // advisory lock it takes is held until the table exists.
            sqlx::raw_sql(&view_table_ddl(store.schema(), table))
                .execute(store.pool())
                .await
                .map_err(CQRSError::persistence)?;
            store.view_tables().insert(table.to_owned());
        }
        Ok((qualified, version))
    })
}

fn decode_view<V: serde::de::DeserializeOwned>(
    table: &str,
    view_id: &str,
    payload: Value,
) -> Result<V, CQRSError> {
    serde_json::from_value(payload).map_err(|source| CQRSError::Deserialization {
        what: format!("view {table}/{view_id}"),
        source,
    })
}

#[async_trait]
impl<A, V> ViewRepository<A, V> for PostgresViewRepository<V>
where
    A: Aggregate,
    V: View<A>,
{
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        let (table, version) = table_of::<A, V>(&self.store).await?;
        let payload: Option<Value> = sqlx::query_scalar(&format!(
            "SELECT payload FROM {table} WHERE view_id = $1 AND view_version = $2"
        ))
        .bind(view_id)
        .bind(version)
        .fetch_optional(self.store.pool())
        .await
        .map_err(CQRSError::persistence)?;
        payload
            .map(|p| decode_view(V::TABLE_NAME, view_id, p))
            .transpose()
    }

    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        let (table, version) = table_of::<A, V>(&self.store).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Byte order, whatever the database's collation: the same order as every view store.
        let rows = sqlx::query(&format!(
            "SELECT view_id, payload FROM {table} \
             WHERE view_version = $1 AND ($2::text IS NULL OR view_id COLLATE \"C\" > $2) \
             ORDER BY view_id COLLATE \"C\" LIMIT $3"
        ))
        .bind(version)
        .bind(after)
        .bind(limit)
        .fetch_all(self.store.pool())
        .await
        .map_err(CQRSError::persistence)?;
        rows.into_iter()
            .map(|row| {
                let view_id: String = row.try_get(0).map_err(CQRSError::persistence)?;
                let payload: Value = row.try_get(1).map_err(CQRSError::persistence)?;
                let view = decode_view(V::TABLE_NAME, &view_id, payload)?;
                Ok((view_id, view))
            })
            .collect()
    }

    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
        let (table, version) = table_of::<A, V>(&self.store).await?;
        let row = sqlx::query(&format!(
            "SELECT payload, row_version FROM {table} WHERE view_id = $1 AND view_version = $2"
        ))
        .bind(view_id)
        .bind(version)
        .fetch_optional(self.store.pool())
        .await
        .map_err(CQRSError::persistence)?;
        let (view, row_version) = match row {
            None => (V::default(), 0),
            Some(row) => {
                let payload: Value = row.try_get(0).map_err(CQRSError::persistence)?;
                let row_version: i64 = row.try_get(1).map_err(CQRSError::persistence)?;
                (decode_view(V::TABLE_NAME, view_id, payload)?, row_version)
            }
        };
        Ok(ViewContext {
            view_id: view_id.to_owned(),
            view,
            version: row_version,
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
        let (table, version) = table_of::<A, V>(&self.store).await?;
        let rows = sqlx::query(&format!(
            "SELECT view_id, payload, row_version FROM {table} \
             WHERE view_id = ANY($1) AND view_version = $2"
        ))
        .bind(view_ids)
        .bind(version)
        .fetch_all(self.store.pool())
        .await
        .map_err(CQRSError::persistence)?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let view_id: String = row.try_get(0).map_err(CQRSError::persistence)?;
            let payload: Value = row.try_get(1).map_err(CQRSError::persistence)?;
            let row_version: i64 = row.try_get(2).map_err(CQRSError::persistence)?;
            let view = decode_view(V::TABLE_NAME, &view_id, payload)?;
            found.insert(view_id, (view, row_version));
        }
        Ok(ViewContext::in_order(view_ids, found))
    }

    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        let (table, version) = table_of::<A, V>(&self.store).await?;
        let mut new_ids = Vec::new();
        let mut new_payloads = Vec::new();
        let mut old_ids = Vec::new();
        let mut old_versions = Vec::new();
        let mut old_payloads = Vec::new();
        for change in &changes {
            let payload =
                serde_json::to_value(&change.view).map_err(|source| CQRSError::Serialization {
                    what: format!("view {}/{}", V::TABLE_NAME, change.view_id),
                    source,
                })?;
            if change.version == 0 {
                new_ids.push(change.view_id.clone());
                new_payloads.push(payload);
            } else {
                old_ids.push(change.view_id.clone());
                old_versions.push(change.version);
                old_payloads.push(payload);
            }
        }
        write_views(
            &self.store,
            ViewRows {
                view: V::TABLE_NAME,
                table,
                version,
                new_ids,
                new_payloads,
                old_ids,
                old_versions,
                old_payloads,
            },
            checkpoint,
        )
        .await
    }

    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        CheckpointRepository::load_checkpoint(&self.store, name).await
    }
}

/// The rows one `commit` writes, already serialized.
struct ViewRows {
    view: &'static str,
    table: String,
    version: i64,
    new_ids: Vec<String>,
    new_payloads: Vec<Value>,
    old_ids: Vec<String>,
    old_versions: Vec<i64>,
    old_payloads: Vec<Value>,
}

/// Inserts the new rows, updates the loaded ones if their row version did not move, and
/// stores the checkpoint, in one transaction.
fn write_views(
    store: &PostgresEventRepository,
    rows: ViewRows,
    checkpoint: Option<Checkpoint>,
) -> BoxFuture<'_, Result<(), CQRSError>> {
    Box::pin(async move {
        let ViewRows {
            view,
            table,
            version,
            new_ids,
            new_payloads,
            old_ids,
            old_versions,
            old_payloads,
        } = rows;
        let conflict = |view_id: &str, expected_version: i64| CQRSError::ViewConflict {
            view: view.to_owned(),
            view_id: view_id.to_owned(),
            expected_version,
        };

        // Each statement planned for this batch (see `CUSTOM_PLANS_TRANSACTION`).
        let mut tx = store
            .pool()
            .begin_with(CUSTOM_PLANS_TRANSACTION)
            .await
            .map_err(CQRSError::persistence)?;
        // The checkpoint first: its row lock orders concurrent commits of one projection,
        // and a projector whose checkpoint is behind (another one applied these events)
        // is refused before it writes a row. Equal is fine only when no row changes.
        if let Some(checkpoint) = &checkpoint {
            let advanced: Option<i64> = sqlx::query_scalar(&store.statements().advance_checkpoint)
                .bind(&checkpoint.name)
                .bind(checkpoint.position)
                .bind(new_ids.is_empty() && old_ids.is_empty())
                .fetch_optional(&mut *tx)
                .await
                .map_err(CQRSError::persistence)?;
            if advanced.is_none() {
                return Err(CQRSError::ViewConflict {
                    view: view.to_owned(),
                    view_id: format!("checkpoint {}", checkpoint.name),
                    expected_version: checkpoint.position,
                });
            }
        }
        if !new_ids.is_empty() {
            let inserted: Vec<String> = sqlx::query_scalar(&format!(
                "INSERT INTO {table} (view_id, view_version, row_version, payload, updated_at) \
                 SELECT u.id, $2, 1, u.payload, now() \
                 FROM unnest($1::text[], $3::jsonb[]) AS u(id, payload) \
                 ON CONFLICT (view_id, view_version) DO NOTHING \
                 RETURNING view_id"
            ))
            .bind(&new_ids)
            .bind(version)
            .bind(&new_payloads)
            .fetch_all(&mut *tx)
            .await
            .map_err(CQRSError::persistence)?;
            if inserted.len() != new_ids.len() {
                let inserted: HashSet<&str> = inserted.iter().map(String::as_str).collect();
                let lost = new_ids
                    .iter()
                    .find(|id| !inserted.contains(id.as_str()))
                    .map_or("", String::as_str);
                return Err(conflict(lost, 0));
            }
        }
        if !old_ids.is_empty() {
            let updated: Vec<String> = sqlx::query_scalar(&format!(
                "UPDATE {table} AS t \
                 SET row_version = t.row_version + 1, payload = u.payload, updated_at = now() \
                 FROM unnest($1::text[], $3::bigint[], $4::jsonb[]) AS u(id, row_version, payload) \
                 WHERE t.view_id = ANY($1) AND t.view_version = $2 \
                   AND t.view_id = u.id AND t.row_version = u.row_version \
                 RETURNING t.view_id"
            ))
            .bind(&old_ids)
            .bind(version)
            .bind(&old_versions)
            .bind(&old_payloads)
            .fetch_all(&mut *tx)
            .await
            .map_err(CQRSError::persistence)?;
            if updated.len() != old_ids.len() {
                let updated: HashSet<&str> = updated.iter().map(String::as_str).collect();
                let (lost, expected) = old_ids
                    .iter()
                    .zip(old_versions.iter())
                    .find(|(id, _)| !updated.contains(id.as_str()))
                    .map_or(("", 0), |(id, v)| (id.as_str(), *v));
                return Err(conflict(lost, expected));
            }
        }
        tx.commit().await.map_err(CQRSError::persistence)
    })
}
