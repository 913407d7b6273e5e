//! The service on DynamoDB (feature `dynamodb`): the stores of `cqrs-aws`, the idempotency
//! keys as items of the view table, and the store's head and recent aggregates for the
//! metrics and the operator page. See `docs/adr/0018-service-on-lambda.md`.

use std::sync::Arc;

use aws_smithy_http_client::tls;
use cqrs::{CQRSError, EventRepository};
use cqrs_aws::aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use cqrs_aws::aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use cqrs_aws::aws_sdk_dynamodb::types::AttributeValue;
use cqrs_aws::aws_sdk_dynamodb::Client;
use cqrs_aws::{DynamoDbEventRepository, DynamoDbViewRepository};

use super::{AggregateRow, Claim, KeyRow, Stores};
use crate::order::OrderSummary;

/// The partition key of an idempotency key's item: `$idempotency#{key}` (sort key 0). A key
/// is visible ASCII, so it needs no escaping, and no other item of a view table starts so.
const KEY_PREFIX: &str = "$idempotency#";
/// The `kind` of an idempotency key's item (every item of the stores names its kind).
const KIND_KEY: &str = "idempotency_key";
/// The list index's partition that holds the completed keys, ordered by claim time. A view's
/// partition is `{table}#{version}` and always holds a `#`; this one holds none.
const COMPLETED: &str = "$idempotency";
/// The name of the view table's list index (created by `cqrs_aws::ensure_view_table`).
const LIST_INDEX: &str = "view_list";
/// How many of the most recent events the operator page groups into aggregates.
const RECENT_EVENTS: i64 = 1000;
/// What the operator page says of the aggregates it lists on DynamoDB.
pub(super) const AGGREGATES_SCOPE: &str =
    " within the store's last 1000 events (DynamoDB: a bounded read of the global order)";

/// Opens the DynamoDB stores, creating the two tables if they are missing.
pub(super) async fn open(
    endpoint: Option<&str>,
    events_table: &str,
    views_table: &str,
) -> Result<Stores, CQRSError> {
    let client = match endpoint {
        Some(endpoint) => cqrs_aws::local_client(endpoint),
        None => aws_client()?,
    };
    let events = DynamoDbEventRepository::new(client.clone(), events_table);
    events.ensure_table().await?;
    let views = DynamoDbViewRepository::<OrderSummary>::new(client.clone(), views_table);
    views.ensure_table().await?;
    Ok(Stores {
        dead_letters: Arc::new(views.dead_letters()),
        views: Arc::new(views),
        events: Arc::new(events.clone()),
        keys: super::KeyTable::DynamoDb(DynamoDbKeyTable {
            client: client.clone(),
            table: Arc::from(views_table),
        }),
        catalog: super::Catalog::DynamoDb(DynamoDbCatalog { events }),
    })
}

/// A client for DynamoDB on AWS, in the region and with the credentials of the environment
/// (AWS Lambda sets `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
/// `AWS_SESSION_TOKEN` for a function's role), its HTTPS over rustls with ring.
fn aws_client() -> Result<Client, CQRSError> {
    let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let missing = |name: &str| {
        CQRSError::persistence(format!(
            "{name} is not set: DynamoDB on AWS needs the region and credentials of the \
             environment (as AWS Lambda sets them), or name an emulator's endpoint"
        ))
    };
    let region = var("AWS_REGION")
        .or_else(|| var("AWS_DEFAULT_REGION"))
        .ok_or_else(|| missing("AWS_REGION"))?;
    let key_id = var("AWS_ACCESS_KEY_ID").ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?;
    let secret = var("AWS_SECRET_ACCESS_KEY").ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?;
    let credentials = Credentials::new(
        key_id,
        secret,
        var("AWS_SESSION_TOKEN"),
        None,
        "environment",
    );
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = cqrs_aws::aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(region))
        .credentials_provider(credentials)
        .build();
    Ok(Client::from_conf(config))
}

/// The event table, for the store's head and the aggregates changed last.
#[derive(Debug, Clone)]
pub(super) struct DynamoDbCatalog {
    events: DynamoDbEventRepository,
}

impl DynamoDbCatalog {
    /// The last global position drawn: the counter item `$all` / 0 (docs/adr/0013), read
    /// strongly consistent; 0 for an empty store.
    pub(super) async fn head(&self) -> Result<i64, CQRSError> {
        let table = self.events.table();
        let output = self
            .events
            .client()
            .get_item()
            .table_name(table)
            .key("pk", AttributeValue::S("$all".to_owned()))
            .key("sk", AttributeValue::N("0".to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", table, e))?;
        match output.item() {
            None => Ok(0),
            Some(item) => {
                number(item, "position").map_err(|problem| damaged(table, "$all / 0", &problem))
            }
        }
    }

    /// Up to `limit` aggregates changed within the last [`RECENT_EVENTS`] events, the most
    /// recently changed first: a bounded `read_all` of the global order, not a scan. An
    /// aggregate's count is its last sequence (sequences run from 1 without gaps).
    pub(super) async fn aggregates(&self, limit: i64) -> Result<Vec<AggregateRow>, CQRSError> {
        let head = self.head().await?;
        let after = head.saturating_sub(RECENT_EVENTS).max(0);
        let window = usize::try_from(RECENT_EVENTS).unwrap_or(usize::MAX);
        let events = self.events.read_all(after, window).await?;
        let mut rows: Vec<AggregateRow> = Vec::new();
        let wanted = usize::try_from(limit).unwrap_or(0);
        for event in events.iter().rev() {
            if rows.len() >= wanted {
                break;
            }
            let id = event.aggregate_id.to_string();
            let seen = rows
                .iter()
                .any(|row| row.aggregate_id == id && row.aggregate_type == *event.aggregate_type);
            if !seen {
                rows.push(AggregateRow {
                    aggregate_type: event.aggregate_type.to_string(),
                    aggregate_id: id,
                    events: event.sequence,
                    last_position: event.position,
                });
            }
        }
        Ok(rows)
    }
}

/// The idempotency keys as items of the view table: `$idempotency#{key}` / 0 with the
/// attributes `idempotency_key`, `request`, `aggregate_id`, `claimed_at` (a number, ms since
/// the epoch) and, once the request finished, `response`, `view_list` (`$idempotency`) and
/// `view_order` (`claimed_at` as 20 digits, `#`, the key), which put it in the list index
/// in claim order for the prune. Every write is conditional, as the SQL table's statements.
#[derive(Debug, Clone)]
pub(crate) struct DynamoDbKeyTable {
    client: Client,
    table: Arc<str>,
}

/// The key item's partition key.
fn key_pk(key: &str) -> AttributeValue {
    AttributeValue::S(format!("{KEY_PREFIX}{key}"))
}

fn n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

/// The list index's sort key of a key claimed at `claimed_at`: fixed width, so the index
/// orders the keys by claim time.
fn claim_order(claimed_at: i64) -> String {
    format!("{:020}", claimed_at.max(0))
}

impl DynamoDbKeyTable {
    /// Claims `key` for a request (a put on the condition that no item has the key), or
    /// returns the item of the request that holds it.
    pub(crate) async fn claim(
        &self,
        key: &str,
        request: &str,
        aggregate_id: &str,
        now: i64,
    ) -> Result<Claim, CQRSError> {
        loop {
            let put = self
                .client
                .put_item()
                .table_name(self.table.as_ref())
                .item("pk", key_pk(key))
                .item("sk", n(0))
                .item("kind", s(KIND_KEY))
                .item("idempotency_key", s(key))
                .item("request", s(request))
                .item("aggregate_id", s(aggregate_id))
                .item("claimed_at", n(now))
                .condition_expression("attribute_not_exists(pk)")
                .send()
                .await;
            if applied("PutItem", &self.table, put)? {
                return Ok(Claim::Claimed);
            }
            if let Some(row) = self.row(key).await? {
                return Ok(Claim::Taken(row));
            }
            // Released between the put and the read: try again.
        }
    }

    /// The item of `key`, if there is one (a strongly consistent read).
    pub(crate) async fn row(&self, key: &str) -> Result<Option<KeyRow>, CQRSError> {
        let output = self
            .client
            .get_item()
            .table_name(self.table.as_ref())
            .key("pk", key_pk(key))
            .key("sk", n(0))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", &self.table, e))?;
        let Some(item) = output.item() else {
            return Ok(None);
        };
        let text = |name: &str| -> Result<String, String> {
            item.get(name)
                .and_then(|value| value.as_s().ok())
                .cloned()
                .ok_or_else(|| format!("attribute `{name}` is missing or not a string"))
        };
        let row = (|| {
            Ok::<_, String>(KeyRow {
                request: text("request")?,
                aggregate_id: text("aggregate_id")?,
                claimed_at: number(item, "claimed_at")?,
                response: match item.get("response") {
                    None => None,
                    Some(_) => Some(text("response")?),
                },
            })
        })()
        .map_err(|problem| damaged(&self.table, &format!("{KEY_PREFIX}{key} / 0"), &problem))?;
        Ok(Some(row))
    }

    /// Records the response of the request that claimed `key` at `claimed_at` (nothing, if
    /// another request has taken the claim over since, or it was completed).
    pub(crate) async fn complete(
        &self,
        key: &str,
        claimed_at: i64,
        response: &str,
    ) -> Result<(), CQRSError> {
        let done = self
            .client
            .update_item()
            .table_name(self.table.as_ref())
            .key("pk", key_pk(key))
            .key("sk", n(0))
            .update_expression("SET #response = :response, #list = :list, #order = :order")
            .condition_expression("#claimed_at = :claimed_at AND attribute_not_exists(#response)")
            .expression_attribute_names("#response", "response")
            .expression_attribute_names("#list", "view_list")
            .expression_attribute_names("#order", "view_order")
            .expression_attribute_names("#claimed_at", "claimed_at")
            .expression_attribute_values(":response", s(response))
            .expression_attribute_values(":list", s(COMPLETED))
            .expression_attribute_values(":order", s(format!("{}#{key}", claim_order(claimed_at))))
            .expression_attribute_values(":claimed_at", n(claimed_at))
            .send()
            .await;
        applied("UpdateItem", &self.table, done).map(|_| ())
    }

    /// Frees `key`, claimed at `claimed_at` and not completed (nothing, if another request
    /// has taken the claim over since).
    pub(crate) async fn release(&self, key: &str, claimed_at: i64) -> Result<(), CQRSError> {
        let condition = "#claimed_at = :claimed_at AND attribute_not_exists(#response)";
        self.delete(key, claimed_at, condition).await.map(drop)
    }

    /// Takes over a claim that was abandoned (claimed at `claimed_at`, never completed): true
    /// for exactly one of several requests that try at once.
    pub(crate) async fn take_over(
        &self,
        key: &str,
        claimed_at: i64,
        now: i64,
    ) -> Result<bool, CQRSError> {
        let done = self
            .client
            .update_item()
            .table_name(self.table.as_ref())
            .key("pk", key_pk(key))
            .key("sk", n(0))
            .update_expression("SET #claimed_at = :now")
            .condition_expression("#claimed_at = :claimed_at AND attribute_not_exists(#response)")
            .expression_attribute_names("#response", "response")
            .expression_attribute_names("#claimed_at", "claimed_at")
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":claimed_at", n(claimed_at))
            .send()
            .await;
        applied("UpdateItem", &self.table, done)
    }

    /// Deletes at most `limit` keys that were claimed before `before` and hold a response:
    /// a query of the list index's `$idempotency` partition below `before`, then a delete
    /// per key on the condition that it is still the completed claim the index showed (the
    /// index is eventually consistent). A claim without a response is not in the index.
    pub(crate) async fn prune(&self, before: i64, limit: i64) -> Result<u64, CQRSError> {
        let Ok(limit) = usize::try_from(limit) else {
            return Ok(0);
        };
        if before <= 0 || limit == 0 {
            return Ok(0);
        }
        let mut found: Vec<(String, i64)> = Vec::new();
        let mut start = None;
        while found.len() < limit {
            let page = self
                .client
                .query()
                .table_name(self.table.as_ref())
                .index_name(LIST_INDEX)
                .key_condition_expression("#list = :list AND #order < :before")
                .expression_attribute_names("#list", "view_list")
                .expression_attribute_names("#order", "view_order")
                .expression_attribute_values(":list", s(COMPLETED))
                .expression_attribute_values(":before", s(claim_order(before)))
                .limit(i32::try_from(limit - found.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", &self.table, e))?;
            for item in page.items() {
                let key = item
                    .get("idempotency_key")
                    .and_then(|value| value.as_s().ok());
                let claimed_at = number(item, "claimed_at");
                if let (Some(key), Ok(claimed_at)) = (key, claimed_at) {
                    found.push((key.clone(), claimed_at));
                }
            }
            match page.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => break,
            }
        }
        let mut deleted = 0;
        for (key, claimed_at) in found.iter().take(limit) {
            let condition = "#claimed_at = :claimed_at AND attribute_exists(#response)";
            if self.delete(key, *claimed_at, condition).await? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes `key`'s item on `condition` (over `#claimed_at` = `:claimed_at` and
    /// `#response`): true when it was deleted, false when the condition failed.
    async fn delete(&self, key: &str, claimed_at: i64, condition: &str) -> Result<bool, CQRSError> {
        let done = self
            .client
            .delete_item()
            .table_name(self.table.as_ref())
            .key("pk", key_pk(key))
            .key("sk", n(0))
            .condition_expression(condition)
            .expression_attribute_names("#response", "response")
            .expression_attribute_names("#claimed_at", "claimed_at")
            .expression_attribute_values(":claimed_at", n(claimed_at))
            .send()
            .await;
        applied("DeleteItem", &self.table, done)
    }
}

/// The number attribute `name` of `item`.
fn number(
    item: &std::collections::HashMap<String, AttributeValue>,
    name: &str,
) -> Result<i64, String> {
    let text = item
        .get(name)
        .and_then(|value| value.as_n().ok())
        .ok_or_else(|| format!("attribute `{name}` is missing or not a number"))?;
    text.parse()
        .map_err(|_| format!("attribute `{name}` is not an integer: {text}"))
}

/// An item the service cannot read, as a persistence error naming it.
fn damaged(table: &str, key: &str, problem: &str) -> CQRSError {
    CQRSError::persistence(format!(
        "damaged item {key} in DynamoDB table {table}: {problem}"
    ))
}

/// A failed request, with the SDK's whole message (its `Display` says only "service error").
/// Whether a conditional write was applied: `Ok(false)` when its condition refused it.
fn applied<T, E, R>(
    operation: &str,
    table: &str,
    result: Result<T, SdkError<E, R>>,
) -> Result<bool, CQRSError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(error)
            if error
                .as_service_error()
                .and_then(ProvideErrorMetadata::code)
                == Some("ConditionalCheckFailedException") =>
        {
            Ok(false)
        }
        Err(error) => Err(sdk_error(operation, table, error)),
    }
}

fn sdk_error<E, R>(operation: &str, table: &str, error: SdkError<E, R>) -> CQRSError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    CQRSError::persistence(format!(
        "DynamoDB {operation} on table {table} failed: {}",
        DisplayErrorContext(&error)
    ))
}
