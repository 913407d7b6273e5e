//! Serverless stores for [`cqrs`] on AWS: events, snapshots, views, checkpoints and dead
//! letters on DynamoDB.
//!
//! * [`DynamoDbEventRepository`]: events keyed by aggregate (partition key) and sequence
//!   (sort key), one `TransactWriteItems` per append with a condition per item, so a lost race
//!   is [`CQRSError::Conflict`] and stores nothing; idempotent retries by event id; a global
//!   order for [`read_all`](cqrs::EventRepository::read_all) drawn in the same transaction;
//!   at most [`MAX_EVENTS_PER_APPEND`] events per append.
//! * [`DynamoDbSnapshotRepository`]: one snapshot item per aggregate, in the same table or
//!   another.
//! * [`DynamoDbViewRepository`]: views in a view table, each commit of rows and checkpoint
//!   one `TransactWriteItems` (optimistic row versions, a checkpoint that never goes back),
//!   so a [`Projection`](cqrs::Projection) applies every event exactly once; at most
//!   [`MAX_VIEW_ROWS_PER_COMMIT`] rows per commit.
//! * [`DynamoDbCheckpointRepository`]: the checkpoints of relays, in the view table.
//! * [`DynamoDbDeadLetters`]: the events a projection skipped, recorded in the transaction
//!   that moves its checkpoint past them.
//! * [`ensure_table`]: creates the table (pay per request, with a stream of new images for
//!   consumers of DynamoDB Streams) if it is missing; [`ensure_view_table`] the view table.
//! * [`local_client`]: a client for a local emulator (static test credentials).
//! * [`envelope`]: an event as the JSON body of an SQS message or SNS notification.
//! * `lambda` (feature `lambda`): Lambda handlers that feed a view from the table's DynamoDB
//!   stream or from SQS, with one checkpoint per aggregate (`docs/adr/0014-lambda-adapters.md`).
//! * `messaging` (feature `messaging`): a relay that publishes committed events to an SNS
//!   FIFO topic or an SQS FIFO queue, and an SQS consumer that feeds a view outside Lambda
//!   (`docs/adr/0016-sns-sqs-publishing.md`).
//! * `testkit` (feature `testkit`): the conformance suites' harness, one fresh table per
//!   test against the emulator named by `CQRS_DYNAMODB_ENDPOINT`.
//!
//! The design, its costs and its limits: `docs/adr/0013-dynamodb-store.md`.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use cqrs::{Aggregate, CQRSFramework, DomainEvent};
//! use cqrs_aws::{DynamoDbEventRepository, DynamoDbSnapshotRepository};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
//! enum CounterEvent {
//!     Added { by: u64 },
//! }
//!
//! #[derive(Default)]
//! struct Counter;
//!
//! impl Aggregate for Counter {
//!     const NAME: &'static str = "counter";
//!     type Events = CounterEvent;
//!     type Commands = u64;
//!     type Errors = cqrs::CQRSError;
//!     type State = u64;
//!
//!     async fn handle_command(&self, _id: uuid::Uuid, _state: &u64, by: u64) -> Result<Vec<CounterEvent>, cqrs::CQRSError> {
//!         Ok(vec![CounterEvent::Added { by }])
//!     }
//!
//!     fn handle_event(&self, state: &mut u64, CounterEvent::Added { by }: &CounterEvent) {
//!         *state += by;
//!     }
//! }
//!
//! # async fn run() -> Result<(), cqrs::CQRSError> {
//! // In a Lambda: `aws_sdk_dynamodb::Client::new(&aws_config::load_from_env().await)`.
//! let client = cqrs_aws::local_client("http://127.0.0.1:5000");
//! let events = DynamoDbEventRepository::new(client.clone(), "events");
//! events.ensure_table().await?;
//! let snapshots = DynamoDbSnapshotRepository::new(client, "events");
//! let framework = CQRSFramework::<Counter>::new(events)
//!     .with_snapshots(snapshots, cqrs::SnapshotPolicy::every(100));
//! let id = uuid::Uuid::new_v4();
//! framework.dispatch(id, 5).await?;
//! assert_eq!(framework.load(id).await?, 5);
//! # Ok(())
//! # }
//! ```
//!
//! Views, their checkpoints and the dead letters of their projections live in a view table
//! of their own, so that the event table's stream carries events only:
//!
//! ```no_run
//! # use cqrs::doc::{Counter, CounterCommand, CounterTotal};
//! use cqrs::{CQRSFramework, PoisonPolicy, Projection};
//! use cqrs_aws::{DynamoDbEventRepository, DynamoDbViewRepository, MAX_VIEW_ROWS_PER_COMMIT};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = cqrs_aws::local_client("http://127.0.0.1:5000");
//! let events = DynamoDbEventRepository::new(client.clone(), "events");
//! events.ensure_table().await?;
//! let views = DynamoDbViewRepository::<CounterTotal>::new(client, "views");
//! views.ensure_table().await?; // pk/sk, pay per request, the `view_list` index
//!
//! let id = uuid::Uuid::new_v4();
//! CQRSFramework::<Counter>::new(events.clone())
//!     .dispatch(id, CounterCommand::Increment { by: 4 })
//!     .await?;
//! // Each batch's rows and checkpoint are one transaction of at most 100 items.
//! let projection = Projection::<Counter, CounterTotal>::new(events, views.clone())
//!     .with_batch_size(MAX_VIEW_ROWS_PER_COMMIT)
//!     .with_poison_policy(PoisonPolicy::SkipAndRecord)
//!     .with_dead_letters(views.dead_letters());
//! projection.catch_up().await?;
//! let total = views.load::<Counter>(&id.to_string()).await?;
//! assert_eq!(total.map(|view| view.total), Some(4));
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

use std::time::Duration;

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::error::{BuildError, DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType,
    Projection, ProjectionType, ScalarAttributeType, StreamSpecification, StreamViewType,
    TableStatus,
};
use aws_sdk_dynamodb::Client;
use aws_smithy_http_client::tls;
use cqrs::CQRSError;

mod checkpoints;
mod dead_letters;
pub mod envelope;
mod events;
mod items;
#[cfg(feature = "lambda")]
#[cfg_attr(docsrs, doc(cfg(feature = "lambda")))]
pub mod lambda;
#[cfg(feature = "messaging")]
#[cfg_attr(docsrs, doc(cfg(feature = "messaging")))]
pub mod messaging;
mod snapshots;
#[cfg(any(feature = "lambda", feature = "messaging"))]
mod sqs_batch;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
mod transact;
mod views;

pub use checkpoints::DynamoDbCheckpointRepository;
pub use dead_letters::DynamoDbDeadLetters;
pub use events::{DynamoDbEventRepository, MAX_EVENTS_PER_APPEND, TRANSACTION_ITEM_LIMIT};
pub use items::DamagedItem;
pub use snapshots::DynamoDbSnapshotRepository;
pub use transact::TransactionTooLarge;
pub use views::{ensure_view_table, DynamoDbViewRepository, MAX_VIEW_ROWS_PER_COMMIT};

/// The SDK itself, so that an application names the same version of its types.
pub use aws_sdk_dynamodb;

/// The crate's README, whose snippets run as doc tests so that each compiles as it is.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// How long [`ensure_table`] waits for a new table to become active.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// A DynamoDB client for a local emulator at `endpoint_url` (e.g. `http://127.0.0.1:5000`):
/// region `us-east-1`, static test credentials, and the SDK's HTTP client over rustls with
/// ring (for an `https` endpoint).
///
/// Against AWS itself build the client from the environment instead
/// (`aws_sdk_dynamodb::Client::new(&aws_config::load_from_env().await)`) and hand it to the
/// stores.
///
/// ```
/// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
/// let store = cqrs_aws::DynamoDbEventRepository::new(client, "events");
/// assert_eq!(store.table(), "events");
/// ```
pub fn local_client(endpoint_url: &str) -> Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(local_http_client())
        .endpoint_url(endpoint_url)
        .region(Region::new(LOCAL_REGION))
        .credentials_provider(local_credentials())
        .build();
    Client::from_conf(config)
}

/// The region of the local clients.
pub(crate) const LOCAL_REGION: &str = "us-east-1";

/// The HTTP client of the local clients: the SDK's, over rustls with ring.
pub(crate) fn local_http_client() -> aws_sdk_dynamodb::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// The static test credentials of the local clients.
pub(crate) fn local_credentials() -> Credentials {
    Credentials::new("test", "test", None, None, "cqrs-aws-static")
}

/// Creates `table` for the stores if it does not exist, and waits until it is active.
///
/// The table has a string partition key `pk` and a number sort key `sk`, is billed per
/// request, and has a stream of new images (`NEW_IMAGE`) for consumers of DynamoDB Streams.
/// Calling it again, or from several processes at once, is harmless.
///
/// ```no_run
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
/// cqrs_aws::ensure_table(&client, "events").await?;
/// cqrs_aws::ensure_table(&client, "events").await?; // already there: nothing to do
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`CQRSError::PersistenceError`] when DynamoDB fails, when the table exists with another
/// key schema, or when it does not become active within two minutes.
pub async fn ensure_table(client: &Client, table: &str) -> Result<(), CQRSError> {
    create_table(client, table, Layout::Events).await
}

/// What a table created by the stores holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Events and snapshots: a stream of new images for DynamoDB Streams consumers.
    Events,
    /// View rows, checkpoints and dead letters: the list index, no stream.
    Views,
}

/// Creates `table` with `layout` if it does not exist, and waits until it is active.
pub(crate) async fn create_table(
    client: &Client,
    table: &str,
    layout: Layout,
) -> Result<(), CQRSError> {
    if !table_is_ready(client, table, layout).await? {
        let mut request = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute(items::PK, ScalarAttributeType::S)?)
            .attribute_definitions(attribute(items::SK, ScalarAttributeType::N)?)
            .key_schema(key_element(items::PK, KeyType::Hash)?)
            .key_schema(key_element(items::SK, KeyType::Range)?);
        request = match layout {
            Layout::Events => request.stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewImage)
                    .build()
                    .map_err(build_error)?,
            ),
            Layout::Views => request
                .attribute_definitions(attribute(items::VIEW_LIST, ScalarAttributeType::S)?)
                .attribute_definitions(attribute(items::VIEW_ORDER, ScalarAttributeType::S)?)
                .global_secondary_indexes(
                    GlobalSecondaryIndex::builder()
                        .index_name(items::VIEW_LIST_INDEX)
                        .key_schema(key_element(items::VIEW_LIST, KeyType::Hash)?)
                        .key_schema(key_element(items::VIEW_ORDER, KeyType::Range)?)
                        .projection(
                            Projection::builder()
                                .projection_type(ProjectionType::All)
                                .build(),
                        )
                        .build()
                        .map_err(build_error)?,
                ),
        };
        match request.send().await {
            Ok(_) => {}
            // Created by someone else in between.
            Err(error)
                if matches!(
                    error.as_service_error(),
                    Some(CreateTableError::ResourceInUseException(_))
                ) => {}
            Err(error) => return Err(sdk_error("CreateTable", table, error)),
        }
        let deadline = tokio::time::Instant::now() + TABLE_ACTIVE_TIMEOUT;
        while !table_is_ready(client, table, layout).await? {
            if tokio::time::Instant::now() > deadline {
                return Err(CQRSError::persistence(format!(
                    "DynamoDB table {table} did not become active within {TABLE_ACTIVE_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

/// True when the table exists and is active (with its list index, for a view table); false
/// when it is missing or still being created. An error when its key schema is not the
/// stores', or a view table has no list index.
async fn table_is_ready(client: &Client, table: &str, layout: Layout) -> Result<bool, CQRSError> {
    let described = match client.describe_table().table_name(table).send().await {
        Ok(described) => described,
        Err(error)
            if matches!(
                error.as_service_error(),
                Some(DescribeTableError::ResourceNotFoundException(_))
            ) =>
        {
            return Ok(false)
        }
        Err(error) => return Err(sdk_error("DescribeTable", table, error)),
    };
    let Some(description) = described.table() else {
        return Ok(false);
    };
    let keys: Vec<(&str, &KeyType)> = description
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type()))
        .collect();
    let expected = [(items::PK, &KeyType::Hash), (items::SK, &KeyType::Range)];
    if keys.len() != 2 || !expected.iter().all(|e| keys.contains(e)) {
        return Err(CQRSError::persistence(format!(
            "DynamoDB table {table} exists with key schema {keys:?}; the cqrs stores need a \
             string partition key `pk` and a number sort key `sk`"
        )));
    }
    let mut ready = description.table_status() == Some(&TableStatus::Active);
    if layout == Layout::Views {
        let index = description
            .global_secondary_indexes()
            .iter()
            .find(|index| index.index_name() == Some(items::VIEW_LIST_INDEX));
        let Some(index) = index else {
            return Err(CQRSError::persistence(format!(
                "DynamoDB table {table} exists without the global secondary index \
                 `{}` (partition key `{}`, sort key `{}`, both strings) that a view table \
                 needs: create the view table with `ensure_view_table`",
                items::VIEW_LIST_INDEX,
                items::VIEW_LIST,
                items::VIEW_ORDER
            )));
        };
        ready &= index
            .index_status()
            .is_none_or(|status| *status == IndexStatus::Active);
    }
    Ok(ready)
}

fn attribute(name: &str, kind: ScalarAttributeType) -> Result<AttributeDefinition, CQRSError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .map_err(build_error)
}

fn key_element(name: &str, kind: KeyType) -> Result<KeySchemaElement, CQRSError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(build_error)
}

/// A failed DynamoDB request as [`CQRSError::PersistenceError`], with the SDK's whole
/// message (its own `Display` says only "service error").
pub(crate) fn sdk_error<E, R>(operation: &str, table: &str, error: SdkError<E, R>) -> CQRSError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    CQRSError::persistence(format!(
        "DynamoDB {operation} on table {table} failed: {}",
        DisplayErrorContext(&error)
    ))
}

/// A request the SDK refused to build (a required field missing): a bug here, reported as
/// [`CQRSError::PersistenceError`] rather than a panic.
pub(crate) fn build_error(error: BuildError) -> CQRSError {
    CQRSError::persistence(format!("could not build a DynamoDB request: {error}"))
}
