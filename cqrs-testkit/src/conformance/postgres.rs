//! The conformance harness of the PostgreSQL store.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use cqrs::sqlx::postgres::PgPoolOptions;
use cqrs::sqlx::{self, Executor};
use cqrs::{PostgresEventRepository, Snapshot};
use serde_json::Value;
use uuid::Uuid;

use super::{CheckpointHarness, DeadLetterHarness, SnapshotHarness, StoreHarness, ViewHarness};

/// Runs the conformance suites on [`PostgresEventRepository`] against a real server: each
/// [`fresh`](StoreHarness::fresh) store lives in a schema of its own (`t_<uuid>`), which
/// [`cleanup`](PostgresHarness::cleanup) drops. Damage is done with SQL behind the store's
/// back.
///
/// The same store is its own snapshot store and checkpoint store, and its schema holds the
/// views (`PostgresViewRepository`, whose versions share a table) and the dead letters
/// (`PostgresDeadLetters`, which moves the views' checkpoints), so the harness runs the snapshot,
/// view, checkpoint and dead-letter suites too.
///
/// ```no_run
/// use cqrs_testkit::conformance::{check_event_repository, PostgresHarness};
///
/// #[tokio::test(flavor = "multi_thread")]
/// async fn postgres_store_conforms() {
///     // Skipped where no server is configured.
///     let Ok(url) = std::env::var("CQRS_POSTGRES_URL") else { return };
///     let harness = PostgresHarness::new(url);
///     check_event_repository(&harness).await;
///     harness.cleanup().await;
/// }
/// # fn main() {}
/// ```
#[derive(Debug)]
pub struct PostgresHarness {
    url: String,
    connections: u32,
    stores: Mutex<Vec<PostgresEventRepository>>,
}

impl PostgresHarness {
    /// A harness on the database at `url` (`postgres://user@host:5432/db`), with pools of 8
    /// connections per store.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresHarness {
            url: url.into(),
            connections: 8,
            stores: Mutex::new(Vec::new()),
        }
    }

    /// Sets the pool size of each fresh store.
    #[must_use]
    pub fn with_connections(mut self, connections: u32) -> Self {
        self.connections = connections.max(1);
        self
    }

    /// Drops the schema of every store this harness made, and closes their pools.
    pub async fn cleanup(&self) {
        let stores: Vec<_> =
            std::mem::take(&mut *self.stores.lock().unwrap_or_else(PoisonError::into_inner));
        for store in stores {
            let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", store.schema());
            if let Err(error) = store.pool().execute(sql.as_str()).await {
                eprintln!(
                    "PostgresHarness: could not drop schema {}: {error}",
                    store.schema()
                );
            }
            store.pool().close().await;
        }
    }

    /// Runs `sql` on one stored event, binding `value` (when given) and then its aggregate
    /// type, aggregate id and sequence, and checks that one row changed.
    async fn change_event<'q, T>(
        store: &PostgresEventRepository,
        sql: &'q str,
        value: Option<T>,
        aggregate_type: &'q str,
        aggregate_id: Uuid,
        sequence: i64,
    ) where
        T: 'q + Send + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        let mut query = sqlx::query(sql);
        if let Some(value) = value {
            query = query.bind(value);
        }
        let done = query
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(sequence)
            .execute(store.pool())
            .await
            .unwrap_or_else(|error| panic!("PostgresHarness: `{sql}` failed: {error}"));
        assert_eq!(
            done.rows_affected(),
            1,
            "PostgresHarness: no event {aggregate_type} {aggregate_id} #{sequence}"
        );
    }
}

impl StoreHarness for PostgresHarness {
    type Store = PostgresEventRepository;

    async fn fresh(&self) -> PostgresEventRepository {
        let pool = PgPoolOptions::new()
            .max_connections(self.connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&self.url)
            .await
            .unwrap_or_else(|error| {
                panic!("PostgresHarness: {} is unreachable: {error}", self.url)
            });
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let store = PostgresEventRepository::from_pool(pool)
            .with_schema(&schema)
            .unwrap_or_else(|error| panic!("PostgresHarness: schema {schema}: {error}"));
        store
            .migrate()
            .await
            .unwrap_or_else(|error| panic!("PostgresHarness: migrate {schema}: {error}"));
        self.stores
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(store.clone());
        store
    }

    async fn corrupt_payload(
        &self,
        store: &PostgresEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        raw: &str,
    ) {
        // jsonb cannot hold invalid JSON: such text is stored as a JSON string, which no
        // event decodes from either.
        let value: Value =
            serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        let sql = format!(
            "UPDATE \"{}\".cqrs_events SET payload = $1 \
             WHERE aggregate_type = $2 AND aggregate_id = $3 AND sequence = $4",
            store.schema()
        );
        Self::change_event(
            store,
            &sql,
            Some(value),
            aggregate_type,
            aggregate_id,
            sequence,
        )
        .await;
    }

    async fn set_event_type(
        &self,
        store: &PostgresEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        event_type: &str,
    ) {
        let sql = format!(
            "UPDATE \"{}\".cqrs_events SET event_type = $1 \
             WHERE aggregate_type = $2 AND aggregate_id = $3 AND sequence = $4",
            store.schema()
        );
        Self::change_event(
            store,
            &sql,
            Some(event_type),
            aggregate_type,
            aggregate_id,
            sequence,
        )
        .await;
    }

    async fn delete_event(
        &self,
        store: &PostgresEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
    ) {
        // No value to bind: the statement's parameters start at the aggregate type.
        let sql = format!(
            "DELETE FROM \"{}\".cqrs_events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
            store.schema()
        );
        Self::change_event::<&str>(store, &sql, None, aggregate_type, aggregate_id, sequence).await;
    }
}

impl SnapshotHarness for PostgresHarness {
    type Events = PostgresEventRepository;
    type Snapshots = PostgresEventRepository;

    async fn fresh(&self) -> (PostgresEventRepository, PostgresEventRepository) {
        let store = StoreHarness::fresh(self).await;
        (store.clone(), store)
    }

    async fn put_snapshot_unchecked(&self, store: &PostgresEventRepository, snapshot: Snapshot) {
        let sql = format!(
            "INSERT INTO \"{}\".cqrs_snapshots \
                 (aggregate_type, aggregate_id, sequence, state, \"timestamp\") \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
             SET sequence = EXCLUDED.sequence, state = EXCLUDED.state, \
                 \"timestamp\" = EXCLUDED.\"timestamp\"",
            store.schema()
        );
        sqlx::query(&sql)
            .bind(&snapshot.aggregate_type)
            .bind(snapshot.aggregate_id)
            .bind(snapshot.sequence)
            .bind(&snapshot.state)
            .bind(snapshot.timestamp)
            .execute(store.pool())
            .await
            .unwrap_or_else(|error| panic!("PostgresHarness: cannot put a snapshot: {error}"));
    }
}

impl ViewHarness for PostgresHarness {
    type Database = PostgresEventRepository;
    const VERSIONS_SHARE_A_TABLE: bool = true;

    async fn fresh(&self) -> PostgresEventRepository {
        StoreHarness::fresh(self).await
    }

    fn views<A: cqrs::Aggregate, V: cqrs::View<A>>(
        &self,
        database: &PostgresEventRepository,
    ) -> impl cqrs::ViewRepository<A, V> {
        cqrs::PostgresViewRepository::<V>::new(database)
    }
}

impl CheckpointHarness for PostgresHarness {
    type Checkpoints = PostgresEventRepository;

    async fn fresh(&self) -> PostgresEventRepository {
        StoreHarness::fresh(self).await
    }
}

impl DeadLetterHarness for PostgresHarness {
    type Sink = cqrs::PostgresDeadLetters;

    fn dead_letters(&self, database: &PostgresEventRepository) -> cqrs::PostgresDeadLetters {
        cqrs::PostgresDeadLetters::new(database)
    }
}
