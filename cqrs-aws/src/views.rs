//! [`DynamoDbViewRepository`]: view rows committed with their checkpoint in one transaction.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use aws_sdk_dynamodb::types::{
    KeysAndAttributes, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};
use aws_sdk_dynamodb::Client;
use chrono::Utc;
use cqrs::{Aggregate, CQRSError, Checkpoint, View, ViewContext, ViewRepository};

use crate::checkpoints::{checkpoint_item, load_checkpoint, stored_position};
use crate::events::TRANSACTION_ITEM_LIMIT;
use crate::items::{
    self, damaged, key, n, s, view_list_key, view_order_key, view_pk, Item, Reader, KIND,
    KIND_VIEW, PK,
};
use crate::transact::{ensure_fits, transact_write, Outcome};
use crate::{build_error, sdk_error, DynamoDbCheckpointRepository, DynamoDbDeadLetters, Layout};

/// The most view rows one [`commit`](ViewRepository::commit) with a checkpoint writes: one
/// item per row and one for the checkpoint, in one transaction of at most
/// [`TRANSACTION_ITEM_LIMIT`] items. A larger commit is refused before any request with a
/// [`CQRSError::PersistenceError`] whose source is a
/// [`TransactionTooLarge`](crate::TransactionTooLarge), and writes nothing.
///
/// A projection commits the rows its batch touched: with a view that updates one row per
/// event, `Projection::with_batch_size(MAX_VIEW_ROWS_PER_COMMIT)` never exceeds it; with one
/// that updates `k` rows per event, a batch size of `MAX_VIEW_ROWS_PER_COMMIT / k`.
pub const MAX_VIEW_ROWS_PER_COMMIT: usize = TRANSACTION_ITEM_LIMIT - 1;

/// The most keys DynamoDB takes in one `BatchGetItem`.
const KEYS_PER_BATCH_GET: usize = 100;

/// How many times a projection's load asks again for the keys a `BatchGetItem` left
/// unprocessed before it fails.
const BATCH_GET_ATTEMPTS: u32 = 8;

/// Creates the view table `table` if it does not exist, and waits until it is active.
///
/// Like the event table it has a string partition key `pk` and a number sort key `sk` and is
/// billed per request; it has no stream, and it has a global secondary index `view_list`
/// (string keys `view_list` / `view_order`) through which [`ViewRepository::list`] pages a
/// view's rows in id order. It holds view rows, checkpoints
/// ([`DynamoDbCheckpointRepository`]) and dead letters ([`DynamoDbDeadLetters`]). Calling it
/// again, or from several processes at once, is harmless.
///
/// ```no_run
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
/// cqrs_aws::ensure_view_table(&client, "views").await?;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`CQRSError::PersistenceError`] when DynamoDB fails, when the table exists with another
/// key schema or without the list index, or when it does not become active within two
/// minutes.
pub async fn ensure_view_table(client: &Client, table: &str) -> Result<(), CQRSError> {
    crate::create_table(client, table, Layout::Views).await
}

/// A [`ViewRepository`] on a DynamoDB view table (see [`ensure_view_table`]), beside the
/// checkpoints and dead letters of the projections that write it.
///
/// A row of view `V` is the item `$view#{V::TABLE_NAME}#{view_id}` / [`View::VERSION`]: the
/// versions of one row share a partition, so a new version is built beside the old rows
/// while they stay readable. Each row carries a `row_version`, the optimistic lock.
///
/// [`commit`](ViewRepository::commit) is one `TransactWriteItems`: a `Put` per row,
/// conditioned on the row's version as loaded (`attribute_not_exists` for a new row), and a
/// `Put` of the checkpoint item, conditioned on the stored position being lower (or equal,
/// for a commit without rows): a checkpoint never goes back. When a condition fails nothing
/// is written and the result is [`CQRSError::ViewConflict`] naming the row, or the
/// checkpoint (`"checkpoint {name}"`). A [`Projection`](cqrs::Projection) on this store so
/// applies every event exactly once. A commit holds at most [`MAX_VIEW_ROWS_PER_COMMIT`]
/// rows with its checkpoint: tell the projection a batch size that fits.
///
/// Loads are strongly consistent: a `GetItem` for one row, and for a projection's batch
/// ([`load_many_for_update`](ViewRepository::load_many_for_update)) `BatchGetItem`s of up to
/// 100 keys, the keys DynamoDB leaves unprocessed asked again after a backoff.
/// [`list`](ViewRepository::list) queries the
/// table's `view_list` index, which orders ids by their UTF-8 bytes like every view store;
/// on AWS an index is eventually consistent, so a row committed a moment ago may be missing
/// from a page for a moment. A view id longer than about 1,000 bytes does not fit the
/// index's key and its commit fails with a [`CQRSError::PersistenceError`]. Item layout,
/// conditions and limits: `docs/adr/0013-dynamodb-store.md`.
///
/// ```no_run
/// # use cqrs::doc::{Counter, CounterTotal};
/// use cqrs::{CQRSError, Projection};
/// use cqrs_aws::{DynamoDbEventRepository, DynamoDbViewRepository, MAX_VIEW_ROWS_PER_COMMIT};
///
/// # async fn run() -> Result<(), CQRSError> {
/// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
/// let events = DynamoDbEventRepository::new(client.clone(), "events");
/// events.ensure_table().await?;
/// let views = DynamoDbViewRepository::<CounterTotal>::new(client, "views");
/// views.ensure_table().await?;
/// let projection = Projection::<Counter, CounterTotal>::new(events, views.clone())
///     .with_batch_size(MAX_VIEW_ROWS_PER_COMMIT)
///     .with_dead_letters(views.dead_letters());
/// projection.catch_up().await?;
/// let total = views.load::<Counter>("0b5e7e8a-1c7e-4b55-9a34-3f6a1e0f2d11").await?;
/// # let _ = total;
/// # Ok(()) }
/// ```
pub struct DynamoDbViewRepository<V> {
    client: Client,
    table: Arc<str>,
    _view: PhantomData<fn() -> V>,
}

impl<V> Clone for DynamoDbViewRepository<V> {
    fn clone(&self) -> Self {
        DynamoDbViewRepository {
            client: self.client.clone(),
            table: Arc::clone(&self.table),
            _view: PhantomData,
        }
    }
}

impl<V> fmt::Debug for DynamoDbViewRepository<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoDbViewRepository")
            .field("table", &self.table)
            .field("view", &std::any::type_name::<V>())
            .finish_non_exhaustive()
    }
}

impl<V> DynamoDbViewRepository<V> {
    /// Views in `table`, through `client`. The table must exist: see
    /// [`ensure_table`](Self::ensure_table).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoDbViewRepository {
            client,
            table: Arc::from(table.into()),
            _view: PhantomData,
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The client the store talks through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates the view table if it does not exist (see [`ensure_view_table`]).
    ///
    /// # Errors
    /// What [`ensure_view_table`] returns.
    pub async fn ensure_table(&self) -> Result<(), CQRSError> {
        ensure_view_table(&self.client, &self.table).await
    }

    /// The checkpoints of this table, for readers that are not views (a relay).
    pub fn checkpoints(&self) -> DynamoDbCheckpointRepository {
        DynamoDbCheckpointRepository::new(self.client.clone(), self.table.as_ref())
    }

    /// The dead letters of this table: a sink that records a skipped event and moves the
    /// checkpoint past it in one transaction (exactly once).
    pub fn dead_letters(&self) -> DynamoDbDeadLetters {
        DynamoDbDeadLetters::new(self.client.clone(), self.table.as_ref())
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
        let row = self.rows::<A>()?.get(view_id).await?;
        row.map(|(payload, _)| decode::<A, V>(view_id, &payload))
            .transpose()
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
        let rows = self.rows::<A>()?.list(after, limit).await?;
        rows.into_iter()
            .map(|(view_id, payload)| {
                let view = decode::<A, V>(&view_id, &payload)?;
                Ok((view_id, view))
            })
            .collect()
    }

    /// The rows of `V` as a view of `A`, in this table.
    fn rows<A>(&self) -> Result<Rows<'_>, CQRSError>
    where
        A: Aggregate,
        V: View<A>,
    {
        let version = i64::try_from(V::VERSION).map_err(|_| {
            CQRSError::persistence(format!(
                "view {} has VERSION {}, above the largest sort key the DynamoDB view store \
                 writes ({})",
                V::TABLE_NAME,
                V::VERSION,
                i64::MAX
            ))
        })?;
        Ok(Rows {
            client: &self.client,
            table: &self.table,
            view: V::TABLE_NAME,
            version,
        })
    }
}

fn decode<A: Aggregate, V: View<A>>(view_id: &str, payload: &str) -> Result<V, CQRSError> {
    serde_json::from_str(payload).map_err(|source| CQRSError::Deserialization {
        what: format!("view {}/{view_id}", V::TABLE_NAME),
        source,
    })
}

/// A changed row, serialized.
struct RowWrite {
    view_id: String,
    expected_version: i64,
    payload: String,
}

/// The rows of one view version in one table: the requests, free of the view's type.
struct Rows<'a> {
    client: &'a Client,
    table: &'a str,
    view: &'static str,
    version: i64,
}

impl Rows<'_> {
    /// The row's payload and row version, strongly consistent.
    async fn get(&self, view_id: &str) -> Result<Option<(String, i64)>, CQRSError> {
        let output = self
            .client
            .get_item()
            .table_name(self.table)
            .set_key(Some(key(view_pk(self.view, view_id), self.version)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", self.table, e))?;
        let Some(item) = output.item() else {
            return Ok(None);
        };
        let r = Reader(item);
        let corrupt = |problem: String| CQRSError::persistence(damaged(self.table, item, problem));
        let payload = r.string(items::PAYLOAD).map_err(corrupt)?.to_owned();
        let row_version = r.number(items::ROW_VERSION).map_err(corrupt)?;
        Ok(Some((payload, row_version)))
    }

    /// The payload and row version of each of `view_ids` that has a row, by id, strongly
    /// consistent: `BatchGetItem`s of up to [`KEYS_PER_BATCH_GET`] distinct keys, the keys
    /// DynamoDB leaves unprocessed (throttling, the 16 MB answer limit) asked again after a
    /// backoff, at most [`BATCH_GET_ATTEMPTS`] times.
    async fn get_many(
        &self,
        view_ids: &[String],
    ) -> Result<HashMap<String, (String, i64)>, CQRSError> {
        let mut distinct: Vec<&str> = view_ids.iter().map(String::as_str).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut found = HashMap::with_capacity(distinct.len());
        for chunk in distinct.chunks(KEYS_PER_BATCH_GET) {
            let keys: Vec<Item> = chunk
                .iter()
                .map(|view_id| key(view_pk(self.view, view_id), self.version))
                .collect();
            let mut pending = Some(
                KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(true)
                    .build()
                    .map_err(build_error)?,
            );
            let mut attempts = 0;
            while let Some(request) = pending.take() {
                attempts += 1;
                if attempts > 1 {
                    tokio::time::sleep(cqrs::__private::backoff(attempts - 2)).await;
                }
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(self.table, request)
                    .send()
                    .await
                    .map_err(|e| sdk_error("BatchGetItem", self.table, e))?;
                let items = output
                    .responses()
                    .and_then(|tables| tables.get(self.table))
                    .map_or(&[][..], Vec::as_slice);
                for item in items {
                    let r = Reader(item);
                    let corrupt = |problem: String| {
                        CQRSError::persistence(damaged(self.table, item, problem))
                    };
                    let view_id = r.string(items::VIEW_ID).map_err(corrupt)?.to_owned();
                    let payload = r.string(items::PAYLOAD).map_err(corrupt)?.to_owned();
                    let row_version = r.number(items::ROW_VERSION).map_err(corrupt)?;
                    found.insert(view_id, (payload, row_version));
                }
                pending = output
                    .unprocessed_keys()
                    .and_then(|tables| tables.get(self.table))
                    .filter(|left| !left.keys().is_empty())
                    .cloned();
                if pending.is_some() && attempts >= BATCH_GET_ATTEMPTS {
                    return Err(CQRSError::persistence(format!(
                        "BatchGetItem on {}: keys still unprocessed after {attempts} attempts",
                        self.table
                    )));
                }
            }
        }
        Ok(found)
    }

    /// Up to `limit` (id, payload) pairs after `after`, in id byte order, through the list
    /// index, following `LastEvaluatedKey` until the page is full or the rows end.
    async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, CQRSError> {
        let mut page = Vec::new();
        let mut start: Option<Item> = None;
        while page.len() < limit {
            let wanted = i32::try_from(limit - page.len()).unwrap_or(i32::MAX);
            let mut query = self
                .client
                .query()
                .table_name(self.table)
                .index_name(items::VIEW_LIST_INDEX)
                .expression_attribute_names("#list", items::VIEW_LIST)
                .expression_attribute_values(":list", s(view_list_key(self.view, self.version)))
                .limit(wanted)
                .set_exclusive_start_key(start.take());
            query = match after {
                Some(after) => query
                    .key_condition_expression("#list = :list AND #order > :after")
                    .expression_attribute_names("#order", items::VIEW_ORDER)
                    .expression_attribute_values(":after", s(view_order_key(after))),
                None => query.key_condition_expression("#list = :list"),
            };
            let output = query
                .send()
                .await
                .map_err(|e| sdk_error("Query", self.table, e))?;
            for item in output.items() {
                let r = Reader(item);
                let corrupt =
                    |problem: String| CQRSError::persistence(damaged(self.table, item, problem));
                let view_id = r.string(items::VIEW_ID).map_err(corrupt)?.to_owned();
                let payload = r.string(items::PAYLOAD).map_err(corrupt)?.to_owned();
                page.push((view_id, payload));
            }
            match output.last_evaluated_key() {
                Some(next) if !next.is_empty() => start = Some(next.clone()),
                _ => break,
            }
        }
        page.truncate(limit);
        Ok(page)
    }

    /// The item of a changed row, at its next row version.
    fn item(&self, row: &RowWrite) -> Item {
        let mut item = key(view_pk(self.view, &row.view_id), self.version);
        let attributes = [
            (KIND, s(KIND_VIEW)),
            (items::VIEW_TABLE, s(self.view)),
            (items::VIEW_VERSION, n(self.version)),
            (items::VIEW_ID, s(row.view_id.as_str())),
            (items::VIEW_LIST, s(view_list_key(self.view, self.version))),
            (items::VIEW_ORDER, s(view_order_key(&row.view_id))),
            (items::ROW_VERSION, n(row.expected_version + 1)),
            (items::PAYLOAD, s(row.payload.as_str())),
            (items::UPDATED_AT, n(Utc::now().timestamp_micros())),
        ];
        item.extend(attributes.map(|(name, value)| (name.to_owned(), value)));
        item
    }

    /// Writes `rows` and `checkpoint` in one transaction, each under its condition.
    async fn commit(
        &self,
        rows: Vec<RowWrite>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        if rows.is_empty() && checkpoint.is_none() {
            return Ok(());
        }
        ensure_fits(self.table, rows.len() + usize::from(checkpoint.is_some()))?;
        let mut seen = HashSet::with_capacity(rows.len());
        if let Some(twice) = rows.iter().find(|row| !seen.insert(row.view_id.as_str())) {
            // The second change of a row was loaded before the first is written: stale.
            return Err(self.conflict(&twice.view_id, twice.expected_version));
        }
        let mut writes = Vec::with_capacity(rows.len() + 1);
        for row in &rows {
            let put = Put::builder()
                .table_name(self.table)
                .set_item(Some(self.item(row)));
            let put = if row.expected_version == 0 {
                put.condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", PK)
            } else {
                put.condition_expression("#row_version = :expected")
                    .expression_attribute_names("#row_version", items::ROW_VERSION)
                    .expression_attribute_values(":expected", n(row.expected_version))
            };
            writes.push(
                TransactWriteItem::builder()
                    .put(put.build().map_err(build_error)?)
                    .build(),
            );
        }
        if let Some(checkpoint) = &checkpoint {
            // Forward only; the same position only without rows (a second projector
            // replaying events the first applied must not write them again).
            let condition = if rows.is_empty() {
                "attribute_not_exists(#pk) OR #position <= :position"
            } else {
                "attribute_not_exists(#pk) OR #position < :position"
            };
            let put = Put::builder()
                .table_name(self.table)
                .set_item(Some(checkpoint_item(&checkpoint.name, checkpoint.position)))
                .condition_expression(condition)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#position", items::POSITION)
                .expression_attribute_values(":position", n(checkpoint.position))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build()
                .map_err(build_error)?;
            writes.push(TransactWriteItem::builder().put(put).build());
        }
        let reasons = match transact_write(self.client, self.table, writes).await? {
            Outcome::Committed => return Ok(()),
            Outcome::Cancelled(reasons) => reasons,
        };
        let failed = Outcome::failed_condition(&reasons).unwrap_or_default();
        match (rows.get(failed), &checkpoint) {
            (Some(row), _) => Err(self.conflict(&row.view_id, row.expected_version)),
            (None, Some(checkpoint)) => {
                let stored = match reasons.get(failed).and_then(|r| r.item()) {
                    Some(item) => stored_position(self.table, item)?,
                    None => load_checkpoint(self.client, self.table, &checkpoint.name).await?,
                };
                Err(CQRSError::ViewConflict {
                    view: self.view.to_owned(),
                    view_id: format!("checkpoint {}", checkpoint.name),
                    expected_version: stored,
                })
            }
            (None, None) => Err(CQRSError::persistence(format!(
                "DynamoDB cancelled a view commit on table {} at an item it did not send",
                self.table
            ))),
        }
    }

    fn conflict(&self, view_id: &str, expected_version: i64) -> CQRSError {
        CQRSError::ViewConflict {
            view: self.view.to_owned(),
            view_id: view_id.to_owned(),
            expected_version,
        }
    }
}

#[cqrs::async_trait]
impl<A, V> ViewRepository<A, V> for DynamoDbViewRepository<V>
where
    A: Aggregate,
    V: View<A>,
{
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        DynamoDbViewRepository::load::<A>(self, view_id).await
    }

    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        DynamoDbViewRepository::list::<A>(self, after, limit).await
    }

    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
        let (view, version) = match self.rows::<A>()?.get(view_id).await? {
            Some((payload, version)) => (decode::<A, V>(view_id, &payload)?, version),
            None => (V::default(), 0),
        };
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
        let rows = self.rows::<A>()?.get_many(view_ids).await?;
        let mut found = HashMap::with_capacity(rows.len());
        for (view_id, (payload, version)) in rows {
            let view = decode::<A, V>(&view_id, &payload)?;
            found.insert(view_id, (view, version));
        }
        Ok(ViewContext::in_order(view_ids, found))
    }

    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        let rows = self.rows::<A>()?;
        let writes = changes
            .into_iter()
            .map(|change| {
                let payload = serde_json::to_string(&change.view).map_err(|source| {
                    CQRSError::Serialization {
                        what: format!("view {}/{}", V::TABLE_NAME, change.view_id),
                        source,
                    }
                })?;
                Ok(RowWrite {
                    view_id: change.view_id,
                    expected_version: change.version,
                    payload,
                })
            })
            .collect::<Result<Vec<_>, CQRSError>>()?;
        rows.commit(writes, checkpoint).await
    }

    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        load_checkpoint(&self.client, &self.table, name).await
    }
}
