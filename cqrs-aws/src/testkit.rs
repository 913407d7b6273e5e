//! The conformance suites of `cqrs-testkit` on the DynamoDB stores: [`DynamoDbHarness`].
//!
//! Each [`fresh`](StoreHarness::fresh) store is a new small table (`cqrs-test-{uuid}`) on
//! the emulator named by [`ENDPOINT_VAR`] (`CQRS_DYNAMODB_ENDPOINT`): an emulator's
//! transactions slow down as a table grows, and tests in parallel never share a table. The
//! read side's suites (views, dead letters, checkpoints) get a fresh view table
//! (`cqrs-views-{uuid}`, see [`ensure_view_table`](crate::ensure_view_table)) in the same way.
//!
//! ```no_run
//! use cqrs_aws::testkit::DynamoDbHarness;
//! use cqrs_testkit::conformance::check_event_repository;
//!
//! #[tokio::test(flavor = "multi_thread")]
//! async fn dynamodb_store_conforms() {
//!     // Without CQRS_DYNAMODB_ENDPOINT: says which variable enables the suite, and passes.
//!     let Some(harness) = DynamoDbHarness::from_env("dynamodb event store") else { return };
//!     check_event_repository(&harness).await;
//! }
//!
//! #[tokio::test(flavor = "multi_thread")]
//! async fn dynamodb_views_conform() {
//!     let Some(harness) = DynamoDbHarness::from_env("dynamodb view store") else { return };
//!     cqrs_testkit::conformance::check_view_repository(&harness).await;
//!     cqrs_testkit::conformance::check_dead_letter_repository(&harness).await;
//! }
//! # fn main() {}
//! ```

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use cqrs::{PersistableDomainEvent, Snapshot};
use cqrs_testkit::conformance::{
    CheckpointHarness, DeadLetterHarness, SnapshotHarness, StoreHarness, ViewHarness,
};
use uuid::Uuid;

use crate::items::{self, key, s, Reader, PK};
use crate::{
    DynamoDbCheckpointRepository, DynamoDbDeadLetters, DynamoDbEventRepository,
    DynamoDbSnapshotRepository, DynamoDbViewRepository,
};

/// The environment variable naming the emulator's endpoint, e.g. `http://127.0.0.1:5000`.
pub const ENDPOINT_VAR: &str = "CQRS_DYNAMODB_ENDPOINT";

/// The endpoint in [`ENDPOINT_VAR`], or `None` when it is unset or empty.
///
/// When it is unset, says once per `suite` and process, on the real standard error (past
/// the test harness's output capture), which suite is skipped and how to enable it.
///
/// ```
/// # if std::env::var_os(cqrs_aws::testkit::ENDPOINT_VAR).is_none() {
/// assert!(cqrs_aws::testkit::endpoint("doc example").is_none());
/// # }
/// ```
pub fn endpoint(suite: &str) -> Option<String> {
    match std::env::var(ENDPOINT_VAR) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ => {
            static SAID: Mutex<Option<HashSet<String>>> = Mutex::new(None);
            let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
            if said
                .get_or_insert_with(HashSet::new)
                .insert(suite.to_owned())
            {
                // `eprintln!` is captured by libtest; a direct write is not.
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "note: skipping the {suite} suite: set {ENDPOINT_VAR}=http://127.0.0.1:5000 \
                     (a DynamoDB emulator, e.g. python3 .ci/moto-single.py 5000) to run it"
                );
            }
            None
        }
    }
}

/// The conformance harness of the DynamoDB stores: a fresh table per store, and damage
/// done with plain item writes behind the store's back.
///
/// It implements [`StoreHarness`] for [`DynamoDbEventRepository`] and [`SnapshotHarness`]
/// for it with [`DynamoDbSnapshotRepository`] (on the same table); and, on a fresh view table
/// (the suites' "database" is the table's name), [`ViewHarness`] for
/// [`DynamoDbViewRepository`], [`DeadLetterHarness`] for [`DynamoDbDeadLetters`] and
/// [`CheckpointHarness`] for [`DynamoDbCheckpointRepository`].
///
/// # Panics
///
/// Like an assertion, every harness method panics, naming the request, when the emulator
/// refuses a request or an item it reads back is missing: a harness fails the test it
/// serves. The stores themselves return typed errors.
#[derive(Debug, Clone)]
pub struct DynamoDbHarness {
    client: Client,
    /// Its event stores keep a global order (see [`DynamoDbHarness::without_global_order`]).
    global_order: bool,
}

impl DynamoDbHarness {
    /// A harness on the emulator at `endpoint_url`.
    pub fn new(endpoint_url: &str) -> Self {
        DynamoDbHarness {
            client: crate::local_client(endpoint_url),
            global_order: true,
        }
    }

    /// This harness with event stores
    /// [`without_global_order`](DynamoDbEventRepository::without_global_order), and saying so
    /// to the suite ([`StoreHarness::global_order`]), which then skips its global-order checks.
    #[must_use]
    pub fn without_global_order(mut self) -> Self {
        self.global_order = false;
        self
    }

    /// A harness on the emulator named by [`ENDPOINT_VAR`], or `None` after saying that
    /// `suite` is skipped (see [`endpoint`]).
    pub fn from_env(suite: &str) -> Option<Self> {
        endpoint(suite).map(|url| Self::new(&url))
    }

    /// The client the harness and its stores use.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A new event store on a new table (without a global order when the harness is
    /// [`without_global_order`](Self::without_global_order)).
    ///
    /// # Panics
    /// When the table cannot be created: the emulator is unreachable (a test's failure).
    pub async fn fresh_store(&self) -> DynamoDbEventRepository {
        let table = format!("cqrs-test-{}", Uuid::new_v4().simple());
        let mut store = DynamoDbEventRepository::new(self.client.clone(), table);
        if !self.global_order {
            store = store.without_global_order();
        }
        if let Err(error) = store.ensure_table().await {
            panic!("{ENDPOINT_VAR} is set but no table could be created there: {error}");
        }
        store
    }

    /// A new, empty view table (`cqrs-views-{uuid}`); returns its name.
    ///
    /// # Panics
    /// When the table cannot be created: the emulator is unreachable (a test's failure).
    pub async fn fresh_view_table(&self) -> String {
        let table = format!("cqrs-views-{}", Uuid::new_v4().simple());
        if let Err(error) = crate::ensure_view_table(&self.client, &table).await {
            panic!("{ENDPOINT_VAR} is set but no view table could be created there: {error}");
        }
        table
    }

    /// Sets attribute `name` of the event's stream item and of its position copy (if it has
    /// one: not without a global order) to `value`.
    async fn set_event_attribute(
        &self,
        store: &DynamoDbEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        name: &str,
        value: AttributeValue,
    ) {
        let stream = PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id);
        let found = self
            .client
            .get_item()
            .table_name(store.table())
            .set_key(Some(key(stream.as_str(), sequence)))
            .consistent_read(true)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DynamoDbHarness: GetItem failed: {e:?}"));
        let Some(item) = found.item() else {
            panic!("DynamoDbHarness: no event {aggregate_type} {aggregate_id} #{sequence}");
        };
        let position = Reader(item)
            .number(items::POSITION)
            .unwrap_or_else(|problem| panic!("DynamoDbHarness: {problem}"));
        let mut keys = vec![(stream.to_string(), sequence)];
        if position > 0 {
            keys.push((items::position_pk(position), position));
        }
        for (pk, sk) in keys {
            self.client
                .update_item()
                .table_name(store.table())
                .set_key(Some(key(pk, sk)))
                .update_expression("SET #name = :value")
                .condition_expression("attribute_exists(#pk)")
                .expression_attribute_names("#name", name)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":value", value.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("DynamoDbHarness: UpdateItem failed: {e:?}"));
        }
    }
}

impl StoreHarness for DynamoDbHarness {
    type Store = DynamoDbEventRepository;

    fn global_order(&self) -> bool {
        self.global_order
    }

    async fn fresh(&self) -> DynamoDbEventRepository {
        self.fresh_store().await
    }

    async fn corrupt_payload(
        &self,
        store: &DynamoDbEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        raw: &str,
    ) {
        self.set_event_attribute(
            store,
            aggregate_type,
            aggregate_id,
            sequence,
            items::PAYLOAD,
            s(raw),
        )
        .await;
    }

    async fn set_event_type(
        &self,
        store: &DynamoDbEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        event_type: &str,
    ) {
        self.set_event_attribute(
            store,
            aggregate_type,
            aggregate_id,
            sequence,
            items::EVENT_TYPE,
            s(event_type),
        )
        .await;
    }

    /// Deletes the event's item from its aggregate's history (its copy in the global order
    /// stays, as a row kept by another index would).
    async fn delete_event(
        &self,
        store: &DynamoDbEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
    ) {
        let stream = PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id);
        let deleted = self
            .client
            .delete_item()
            .table_name(store.table())
            .set_key(Some(key(stream.as_str(), sequence)))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DynamoDbHarness: DeleteItem failed: {e:?}"));
        assert!(
            deleted.attributes().is_some(),
            "DynamoDbHarness::delete_event: no event {aggregate_type} {aggregate_id} #{sequence}"
        );
    }
}

impl SnapshotHarness for DynamoDbHarness {
    type Events = DynamoDbEventRepository;
    type Snapshots = DynamoDbSnapshotRepository;

    async fn fresh(&self) -> (DynamoDbEventRepository, DynamoDbSnapshotRepository) {
        let events = self.fresh_store().await;
        let snapshots = DynamoDbSnapshotRepository::new(self.client.clone(), events.table());
        (events, snapshots)
    }

    async fn put_snapshot_unchecked(
        &self,
        snapshots: &DynamoDbSnapshotRepository,
        snapshot: Snapshot,
    ) {
        self.client
            .put_item()
            .table_name(snapshots.table())
            .set_item(Some(DynamoDbSnapshotRepository::item(&snapshot)))
            .send()
            .await
            .unwrap_or_else(|e| panic!("DynamoDbHarness: PutItem failed: {e:?}"));
    }
}

impl ViewHarness for DynamoDbHarness {
    /// The view table's name.
    type Database = String;
    /// The rows of every version of a view are in one table, under one active-version marker.
    const VERSIONS_SHARE_A_TABLE: bool = true;

    async fn fresh(&self) -> String {
        self.fresh_view_table().await
    }

    fn views<A: cqrs::Aggregate, V: cqrs::View<A>>(
        &self,
        table: &String,
    ) -> impl cqrs::ViewRepository<A, V> {
        DynamoDbViewRepository::<V>::new(self.client.clone(), table.as_str())
    }
}

impl DeadLetterHarness for DynamoDbHarness {
    type Sink = DynamoDbDeadLetters;

    fn dead_letters(&self, table: &String) -> DynamoDbDeadLetters {
        DynamoDbDeadLetters::new(self.client.clone(), table.as_str())
    }
}

impl CheckpointHarness for DynamoDbHarness {
    type Checkpoints = DynamoDbCheckpointRepository;

    async fn fresh(&self) -> DynamoDbCheckpointRepository {
        DynamoDbCheckpointRepository::new(self.client.clone(), self.fresh_view_table().await)
    }
}
