//! [`DynamoDbEventRepository`]: the event store on one DynamoDB table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    ConditionCheck, Get, Put, ReturnValuesOnConditionCheckFailure, TransactGetItem,
    TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use cqrs::{CQRSError, EventRepository, PersistableDomainEvent, StoredEventId};
use uuid::Uuid;

use crate::items::{
    self, damaged, decode_event, event_attributes, event_id_pk, key, n, position_partition,
    position_pk, s, Item, Payloads, Reader, CAUSATION_ID, COUNTER_PK, KIND, KIND_COUNTER,
    KIND_EVENT, KIND_EVENT_ID, KIND_POSITION, PK, POSITIONS_PER_PARTITION, SK,
};
use crate::{build_error, sdk_error};

/// The most items one DynamoDB transaction (`TransactWriteItems`) may hold.
pub const TRANSACTION_ITEM_LIMIT: usize = 100;

/// The most events one [`append`](EventRepository::append) stores: each event takes three
/// items of its transaction (the event, its id, its place in the global order) and the
/// transaction has two more (the global position counter, and the check that the previous
/// event is stored), within [`TRANSACTION_ITEM_LIMIT`]. A larger append is refused with
/// [`CQRSError::Unstorable`] naming the limit, and stores nothing.
pub const MAX_EVENTS_PER_APPEND: usize = (TRANSACTION_ITEM_LIMIT - 2) / 3;

/// How many times an append tries again when only the global position counter moved
/// (another aggregate appended in between) or DynamoDB reported a conflicting transaction.
const COUNTER_ATTEMPTS: u32 = 500;

/// How many times `read_all` looks again for a position that the counter covers but whose
/// item is not visible yet (a transaction still being applied).
const MISSING_POSITION_ATTEMPTS: u32 = 4;

/// An event store on one DynamoDB table.
///
/// Each event is an item keyed by its aggregate (partition key `pk`, the
/// `"{aggregate_type}:{aggregate_id}"` key) and its sequence (sort key `sk`). An append is one
/// `TransactWriteItems` with a condition per item, so a lost race stores nothing and is
/// [`CQRSError::Conflict`]. The same transaction reserves each event id (an item
/// `$id#{event_id}`, which makes retries idempotent and ids unique in the table) and draws
/// the events' global positions from one counter item (`$all`), writing a copy of each event
/// under `$all#{partition}` / position, which is what [`read_all`](EventRepository::read_all)
/// pages through. See `docs/adr/0013-dynamodb-store.md` for the cost of that global order.
///
/// An event's `correlation_id` and `causation_id` are string attributes of its items, present
/// only when it has them; items without them (written before events carried them, too) read
/// back with `None`.
///
/// An append holds at most [`MAX_EVENTS_PER_APPEND`] events. Loads follow `LastEvaluatedKey`
/// to the end, with strongly consistent reads. The store never notifies
/// ([`subscribe`](EventRepository::subscribe) is `None`): projections poll `read_all`, or
/// follow the table's stream.
///
/// ```no_run
/// use cqrs::{CQRSFramework, EventRepository};
/// use cqrs_aws::DynamoDbEventRepository;
///
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// // In a Lambda: `aws_sdk_dynamodb::Client::new(&aws_config::load_from_env().await)`.
/// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
/// let store = DynamoDbEventRepository::new(client, "events");
/// store.ensure_table().await?;
/// assert_eq!(store.event_sequence("account", uuid::Uuid::new_v4()).await?, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DynamoDbEventRepository {
    client: Client,
    table: Arc<str>,
    /// The last global position this instance saw committed; -1 before it knows.
    last_position: Arc<AtomicI64>,
    /// Appends draw global positions from the counter item (see
    /// [`without_global_order`](DynamoDbEventRepository::without_global_order)).
    global_order: bool,
}

impl std::fmt::Debug for DynamoDbEventRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbEventRepository")
            .field("table", &self.table)
            .field("global_order", &self.global_order)
            .finish_non_exhaustive()
    }
}

impl DynamoDbEventRepository {
    /// A store on `table`, through `client`. The table must exist: see
    /// [`ensure_table`](Self::ensure_table).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoDbEventRepository {
            client,
            table: Arc::from(table.into()),
            last_position: Arc::new(AtomicI64::new(-1)),
            global_order: true,
        }
    }

    /// This store without a global order: an append writes no position counter and no
    /// position copies (one hot item and one item per event less in its transaction), its
    /// events carry position 0 (no position: positions start at 1), and
    /// [`read_all`](EventRepository::read_all) fails with [`CQRSError::Unsupported`].
    ///
    /// Everything per aggregate is unchanged: loads, optimistic concurrency, idempotent
    /// retries, unique event ids, the table's stream. Views of such a store are fed per
    /// aggregate (`cqrs::PerAggregateProjection`, through the Lambda adapters from the
    /// table's stream, or from SQS), never by `Projection`, and `MessagingRelay` cannot
    /// follow it (its background task ends with the error). Appends to different aggregates
    /// no longer serialize on the counter item; an append still holds at most
    /// [`MAX_EVENTS_PER_APPEND`] events.
    /// A table is written either way, never both: events appended without a position are
    /// not in the global order a store with one reads. See `docs/adr/0013-dynamodb-store.md`
    /// for the cost measured with and without it.
    ///
    /// ```no_run
    /// use cqrs::{CQRSError, EventRepository};
    /// use cqrs_aws::DynamoDbEventRepository;
    ///
    /// # async fn run() -> Result<(), CQRSError> {
    /// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
    /// let store = DynamoDbEventRepository::new(client, "events").without_global_order();
    /// assert!(!store.has_global_order());
    /// assert!(matches!(store.read_all(0, 10).await, Err(CQRSError::Unsupported { .. })));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn without_global_order(mut self) -> Self {
        self.global_order = false;
        self
    }

    /// True unless built [`without_global_order`](Self::without_global_order).
    pub fn has_global_order(&self) -> bool {
        self.global_order
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The client the store talks through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates the table if it does not exist (see [`ensure_table`](crate::ensure_table)).
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when DynamoDB fails or the table exists with another
    /// key schema.
    pub async fn ensure_table(&self) -> Result<(), CQRSError> {
        crate::ensure_table(&self.client, &self.table).await
    }

    /// The global position counter, read with a strongly consistent read: the last position
    /// committed, 0 for an empty store.
    async fn read_counter(&self) -> Result<i64, CQRSError> {
        let output = self
            .client
            .get_item()
            .table_name(self.table.as_ref())
            .set_key(Some(key(COUNTER_PK, 0)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", &self.table, e))?;
        let last = match output.item() {
            Some(item) => Reader(item)
                .number(items::POSITION)
                .map_err(|problem| CQRSError::persistence(damaged(&self.table, item, problem)))?,
            None => 0,
        };
        self.saw_position(last);
        Ok(last)
    }

    fn saw_position(&self, position: i64) {
        self.last_position.fetch_max(position, Ordering::Relaxed);
    }

    /// The items of one append's transaction, with positions from `last + 1`.
    fn transaction(
        &self,
        events: &[PersistableDomainEvent],
        expected: i64,
        last: i64,
    ) -> Result<Vec<TransactWriteItem>, CQRSError> {
        let table = self.table.as_ref();
        let not_exists = "attribute_not_exists(pk)";
        let count = events.len();
        let mut writes = Vec::with_capacity(3 * count + 2);
        let stream = events[0].aggregate_type_id.as_str();
        for (i, event) in events.iter().enumerate() {
            let mut item = event_attributes(event, self.position(last, i));
            item.insert(PK.to_owned(), s(stream));
            item.insert(SK.to_owned(), n(event.sequence));
            item.insert(KIND.to_owned(), s(KIND_EVENT));
            let put = Put::builder()
                .table_name(table)
                .set_item(Some(item))
                .condition_expression(not_exists)
                .build()
                .map_err(build_error)?;
            writes.push(TransactWriteItem::builder().put(put).build());
        }
        for (i, event) in events.iter().enumerate() {
            let mut item = key(event_id_pk(event.event_id), 0);
            item.insert(KIND.to_owned(), s(KIND_EVENT_ID));
            item.insert(
                items::EVENT_ID.to_owned(),
                s(event.event_id.hyphenated().to_string()),
            );
            item.insert(
                items::AGGREGATE_TYPE.to_owned(),
                s(event.aggregate_type.as_str()),
            );
            item.insert(
                items::AGGREGATE_ID.to_owned(),
                s(event.aggregate_id.hyphenated().to_string()),
            );
            item.insert(items::SEQUENCE.to_owned(), n(event.sequence));
            item.insert(items::POSITION.to_owned(), n(self.position(last, i)));
            let put = Put::builder()
                .table_name(table)
                .set_item(Some(item))
                .condition_expression(not_exists)
                .build()
                .map_err(build_error)?;
            writes.push(TransactWriteItem::builder().put(put).build());
        }
        for (i, event) in events.iter().enumerate() {
            if !self.global_order {
                break;
            }
            let position = last + 1 + i as i64;
            let mut item = event_attributes(event, position);
            item.insert(PK.to_owned(), s(position_pk(position)));
            item.insert(SK.to_owned(), n(position));
            item.insert(KIND.to_owned(), s(KIND_POSITION));
            let put = Put::builder()
                .table_name(table)
                .set_item(Some(item))
                .condition_expression(not_exists)
                .build()
                .map_err(build_error)?;
            writes.push(TransactWriteItem::builder().put(put).build());
        }
        if !self.global_order {
            if expected > 0 {
                writes.push(previous_event_check(table, stream, expected)?);
            }
            return Ok(writes);
        }
        let next = last + count as i64;
        let mut counter = Update::builder()
            .table_name(table)
            .set_key(Some(key(COUNTER_PK, 0)))
            .update_expression("SET #position = :next, #kind = :kind")
            .expression_attribute_names("#position", items::POSITION)
            .expression_attribute_names("#kind", KIND)
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":kind", s(KIND_COUNTER))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        counter = if last == 0 {
            counter.condition_expression("attribute_not_exists(#position)")
        } else {
            counter
                .condition_expression("#position = :last")
                .expression_attribute_values(":last", n(last))
        };
        writes.push(
            TransactWriteItem::builder()
                .update(counter.build().map_err(build_error)?)
                .build(),
        );
        if expected > 0 {
            writes.push(previous_event_check(table, stream, expected)?);
        }
        Ok(writes)
    }

    /// The position of the `i`-th event of an append whose positions start after `last`:
    /// 0 (no position) without a global order.
    fn position(&self, last: i64, i: usize) -> i64 {
        if self.global_order {
            last + 1 + i as i64
        } else {
            0
        }
    }

    /// Why an append whose event items or ids were already taken failed: a retry of a
    /// committed append (its positions), an id stored for another event
    /// ([`CQRSError::DuplicateEventId`]), or another writer's events
    /// ([`CQRSError::Conflict`]); see [`cqrs::explain_refused_append`].
    async fn explain_taken(
        &self,
        events: &[PersistableDomainEvent],
        expected: i64,
    ) -> Result<Vec<i64>, CQRSError> {
        let stored = self.stored_identities(events).await?;
        cqrs::explain_refused_append(events, &stored, expected)
    }

    /// The stored identities of those of `events`' ids that are taken, read in one
    /// consistent `TransactGetItems`.
    async fn stored_identities(
        &self,
        events: &[PersistableDomainEvent],
    ) -> Result<HashMap<Uuid, StoredEventId>, CQRSError> {
        let mut gets = Vec::with_capacity(events.len());
        for event in events {
            let get = Get::builder()
                .table_name(self.table.as_ref())
                .set_key(Some(key(event_id_pk(event.event_id), 0)))
                .build()
                .map_err(build_error)?;
            gets.push(TransactGetItem::builder().get(get).build());
        }
        let output = self
            .client
            .transact_get_items()
            .set_transact_items(Some(gets))
            .send()
            .await
            .map_err(|e| sdk_error("TransactGetItems", &self.table, e))?;
        let mut stored = HashMap::new();
        for (event, response) in events.iter().zip(output.responses()) {
            let Some(item) = response.item() else {
                continue;
            };
            let r = Reader(item);
            let corrupt =
                |problem: String| CQRSError::persistence(damaged(&self.table, item, problem));
            let found = StoredEventId {
                aggregate_type: r.string(items::AGGREGATE_TYPE).map_err(corrupt)?.to_owned(),
                aggregate_id: r.uuid(items::AGGREGATE_ID).map_err(corrupt)?,
                sequence: r.number(items::SEQUENCE).map_err(corrupt)?,
                position: r.number(items::POSITION).map_err(corrupt)?,
            };
            stored.insert(event.event_id, found);
        }
        Ok(stored)
    }

    /// One page of `read_all`, or `None` when its first position is not visible (yet).
    async fn read_page(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Option<Vec<PersistableDomainEvent>>, CQRSError> {
        let last = self.read_counter().await?;
        if after_position >= last || limit == 0 {
            return Ok(Some(Vec::new()));
        }
        let first = after_position.max(0) + 1;
        let upper = last.min(first.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX) - 1));
        let mut found: Vec<Item> = Vec::new();
        for partition in position_partition(first)..=position_partition(upper) {
            let low = first.max(partition * POSITIONS_PER_PARTITION + 1);
            let high = upper.min((partition + 1) * POSITIONS_PER_PARTITION);
            let pk = format!("{COUNTER_PK}#{partition}");
            self.query_all(&pk, Some((low, high)), &mut found).await?;
        }
        let mut page = Vec::with_capacity(found.len());
        for (expected, item) in (first..).zip(&found) {
            let position = Reader(item).number(SK).unwrap_or(-1);
            if position != expected {
                // A hole: a position not visible yet, or an item removed behind the store's
                // back. Stop before it.
                break;
            }
            match decode_event(&self.table, item, Payloads::AsStored) {
                Ok(event) => page.push(event),
                Err(error) if page.is_empty() => {
                    return Err(items::damaged_row(&self.table, item, position, &error))
                }
                Err(_) => break,
            }
        }
        if page.is_empty() {
            return Ok(None);
        }
        Ok(Some(page))
    }

    /// Every item of partition `pk` (with a sort key in `range`, or above 0), following
    /// `LastEvaluatedKey` to the end, with strongly consistent reads.
    async fn query_all(
        &self,
        pk: &str,
        range: Option<(i64, i64)>,
        out: &mut Vec<Item>,
    ) -> Result<(), CQRSError> {
        let mut start: Option<Item> = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(self.table.as_ref())
                .consistent_read(true)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(pk))
                .set_exclusive_start_key(start.take());
            query = match range {
                Some((low, high)) => query
                    .key_condition_expression("#pk = :pk AND #sk BETWEEN :low AND :high")
                    .expression_attribute_values(":low", n(low))
                    .expression_attribute_values(":high", n(high)),
                None => query
                    .key_condition_expression("#pk = :pk AND #sk > :after")
                    .expression_attribute_values(":after", n(0)),
            };
            let output = query
                .send()
                .await
                .map_err(|e| sdk_error("Query", &self.table, e))?;
            out.extend(output.items().iter().cloned());
            match output.last_evaluated_key() {
                Some(next) if !next.is_empty() => start = Some(next.clone()),
                _ => return Ok(()),
            }
        }
    }
}

/// The check of an append's transaction that the aggregate's event `expected` (the one the
/// append follows) is stored.
fn previous_event_check(
    table: &str,
    stream: &str,
    expected: i64,
) -> Result<TransactWriteItem, CQRSError> {
    let check = ConditionCheck::builder()
        .table_name(table)
        .set_key(Some(key(stream, expected)))
        .condition_expression("attribute_exists(pk)")
        .build()
        .map_err(build_error)?;
    Ok(TransactWriteItem::builder().condition_check(check).build())
}

#[cqrs::async_trait]
impl EventRepository for DynamoDbEventRepository {
    async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        let expected = cqrs::validate_batch(&events)?;
        let first = &events[0];
        let unstorable = |reason: String| CQRSError::Unstorable {
            aggregate_type: first.aggregate_type.to_string(),
            aggregate_id: first.aggregate_id,
            first_sequence: first.sequence,
            reason,
        };
        let count = events.len();
        if count > MAX_EVENTS_PER_APPEND {
            return Err(unstorable(format!(
                "{count} events in one append; the DynamoDB store appends at most \
                 {MAX_EVENTS_PER_APPEND} (three items each in one transaction of at most \
                 {TRANSACTION_ITEM_LIMIT} items)"
            )));
        }
        if let Some(bad) = events.iter().find(|e| !e.payload.is_valid_json()) {
            return Err(unstorable(format!(
                "the payload of sequence {} is not JSON",
                bad.sequence
            )));
        }

        let mut last = self.last_position.load(Ordering::Relaxed);
        if !self.global_order {
            last = 0;
        } else if last < 0 {
            last = self.read_counter().await?;
        }
        let counter_index = 3 * count;
        for attempt in 0..COUNTER_ATTEMPTS {
            let writes = self.transaction(&events, expected, last)?;
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(writes))
                .send()
                .await;
            let error = match result {
                Ok(_) if !self.global_order => return Ok(vec![0; count]),
                Ok(_) => {
                    self.saw_position(last + count as i64);
                    return Ok((1..=count as i64).map(|i| last + i).collect());
                }
                Err(error) => error,
            };
            let service = match error.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => cancelled,
                Some(other)
                    if other.code() == Some("ValidationException")
                        && other
                            .message()
                            .is_some_and(|m| m.to_lowercase().contains("size")) =>
                {
                    return Err(unstorable(format!(
                        "DynamoDB refused the items: {}",
                        other.message().unwrap_or_default()
                    )));
                }
                _ => return Err(sdk_error("TransactWriteItems", &self.table, error)),
            };
            let reasons = service.cancellation_reasons();
            let code = |i: usize| reasons.get(i).and_then(|r| r.code()).unwrap_or("None");
            let failed = |i: usize| code(i) == "ConditionalCheckFailed";
            if (0..2 * count).any(failed) {
                return self.explain_taken(&events, expected).await;
            }
            if !self.global_order && expected > 0 && failed(2 * count) {
                return Err(CQRSError::InvalidAppend(format!(
                    "first sequence {} skips ahead of the stored history of {} {}",
                    expected + 1,
                    first.aggregate_type,
                    first.aggregate_id
                )));
            }
            if !self.global_order {
                if reasons
                    .iter()
                    .any(|r| r.code() == Some("TransactionConflict"))
                {
                    let millis = 1u64 << attempt.min(6);
                    tokio::time::sleep(Duration::from_millis(millis)).await;
                    continue;
                }
            } else if expected > 0 && failed(counter_index + 1) {
                return Err(CQRSError::InvalidAppend(format!(
                    "first sequence {} skips ahead of the stored history of {} {}",
                    expected + 1,
                    first.aggregate_type,
                    first.aggregate_id
                )));
            }
            if failed(counter_index) {
                // Another aggregate drew positions first: draw again after it.
                let current = reasons
                    .get(counter_index)
                    .and_then(|r| r.item())
                    .and_then(|item| Reader(item).number(items::POSITION).ok());
                last = match current {
                    Some(current) => {
                        self.saw_position(current);
                        current
                    }
                    None => self.read_counter().await?,
                };
                continue;
            }
            if (2 * count..3 * count).any(failed) {
                let current = self.read_counter().await?;
                if current <= last {
                    return Err(CQRSError::persistence(format!(
                        "DynamoDB table {}: position items after the global counter ({current}) \
                         exist; the counter item `$all` was changed behind the store's back",
                        self.table
                    )));
                }
                last = current;
                continue;
            }
            if let Some(refused) = reasons.iter().find(|r| r.code() == Some("ValidationError")) {
                // An item DynamoDB cannot hold (over 400 KB, say): the same every time.
                return Err(unstorable(format!(
                    "DynamoDB refused an item: {}",
                    refused.message().unwrap_or("ValidationError")
                )));
            }
            if reasons
                .iter()
                .any(|r| r.code() == Some("TransactionConflict"))
            {
                // Another transaction held one of the items (the counter, usually).
                let millis = 1u64 << attempt.min(6);
                tokio::time::sleep(Duration::from_millis(millis)).await;
                last = self.read_counter().await?;
                continue;
            }
            let codes: Vec<&str> = (0..reasons.len()).map(code).collect();
            return Err(CQRSError::persistence(format!(
                "DynamoDB cancelled the append's transaction on table {}: reasons {codes:?}",
                self.table
            )));
        }
        Err(CQRSError::persistence(format!(
            "DynamoDB table {}: no global position could be drawn after {COUNTER_ATTEMPTS} \
             attempts (too many concurrent appends)",
            self.table
        )))
    }

    async fn load_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let stream = PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id);
        let mut found = Vec::new();
        let start = after_sequence.max(0);
        let mut from: Option<Item> = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(self.table.as_ref())
                .consistent_read(true)
                .key_condition_expression("#pk = :pk AND #sk > :after")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(stream.as_str()))
                .expression_attribute_values(":after", n(start))
                .set_exclusive_start_key(from.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", &self.table, e))?;
            for item in output.items() {
                found.push(decode_event(&self.table, item, Payloads::Checked)?);
            }
            match output.last_evaluated_key() {
                Some(next) if !next.is_empty() => from = Some(next.clone()),
                _ => break,
            }
        }
        Ok(found)
    }

    /// The aggregate's query with a filter on the `causation_id` attribute: only the
    /// command's events come back, but DynamoDB still reads (and bills) the whole history,
    /// as [`load_events`](EventRepository::load_events) does. (A secondary index on the
    /// causation id would make it one read of a few items, at the cost of a second write of
    /// every event that has one.)
    async fn events_caused_by(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        causation_id: Uuid,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let stream = PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id);
        let mut found = Vec::new();
        let mut from: Option<Item> = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(self.table.as_ref())
                .consistent_read(true)
                .key_condition_expression("#pk = :pk AND #sk > :zero")
                .filter_expression("#causation = :causation")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_names("#causation", CAUSATION_ID)
                .expression_attribute_values(":pk", s(stream.as_str()))
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":causation", s(causation_id.hyphenated().to_string()))
                .set_exclusive_start_key(from.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", &self.table, e))?;
            for item in output.items() {
                found.push(decode_event(&self.table, item, Payloads::Checked)?);
            }
            match output.last_evaluated_key() {
                Some(next) if !next.is_empty() => from = Some(next.clone()),
                _ => break,
            }
        }
        Ok(found)
    }

    async fn event_sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<i64, CQRSError> {
        let stream = PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id);
        let output = self
            .client
            .query()
            .table_name(self.table.as_ref())
            .consistent_read(true)
            .key_condition_expression("#pk = :pk AND #sk > :zero")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", s(stream.as_str()))
            .expression_attribute_values(":zero", n(0))
            .projection_expression("#pk, #sk")
            .scan_index_forward(false)
            .limit(1)
            .send()
            .await
            .map_err(|e| sdk_error("Query", &self.table, e))?;
        match output.items().first() {
            Some(item) => Reader(item)
                .number(SK)
                .map_err(|problem| CQRSError::persistence(damaged(&self.table, item, problem))),
            None => Ok(0),
        }
    }

    async fn read_all(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        if !self.global_order {
            return Err(CQRSError::Unsupported {
                store: format!("DynamoDB table {} (without a global order)", self.table),
                capability: "read_all: events in a global order".to_owned(),
            });
        }
        for attempt in 0..MISSING_POSITION_ATTEMPTS {
            if let Some(page) = self.read_page(after_position, limit).await? {
                return Ok(page);
            }
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
        let position = after_position.max(0) + 1;
        Err(CQRSError::from(cqrs::DamagedRow {
            position,
            event_id: None,
            aggregate_type: None,
            aggregate_id: None,
            sequence: None,
            event_type: None,
            event_version: None,
            problem: format!(
                "the global position counter of DynamoDB table {} covers position {position}, \
                 but no event is stored there (its item was removed behind the store's back)",
                self.table
            ),
        }))
    }
}
