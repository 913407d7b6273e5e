//! The conformance harness of the SQLite store.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use cqrs::sqlx;
use cqrs::{Snapshot, SqliteEventRepository};
use uuid::Uuid;

use super::{CheckpointHarness, DeadLetterHarness, SnapshotHarness, StoreHarness, ViewHarness};

/// Runs the conformance suites on [`SqliteEventRepository`]: each
/// [`fresh`](StoreHarness::fresh) store is a new file in the system's temp directory, removed
/// (with its `-wal` and `-shm` files) when the harness is dropped. Damage is done with SQL on
/// the file, behind the store's back.
///
/// The same store is its own snapshot store and checkpoint store, and its file holds the
/// views (`SqliteViewRepository`, whose versions share a table) and the dead letters
/// (`SqliteDeadLetters`, which moves the views' checkpoints), so the harness runs the snapshot,
/// view, checkpoint and dead-letter suites too.
///
/// ```no_run
/// use cqrs_testkit::conformance::{check_event_repository, check_snapshot_repository, SqliteHarness};
///
/// #[tokio::test(flavor = "multi_thread")]
/// async fn sqlite_store_conforms() {
///     let harness = SqliteHarness::new();
///     check_event_repository(&harness).await;
///     check_snapshot_repository(&harness).await;
/// }
/// # fn main() {}
/// ```
#[derive(Debug, Default)]
pub struct SqliteHarness {
    files: Mutex<Vec<PathBuf>>,
}

impl SqliteHarness {
    /// A harness with no files yet.
    pub fn new() -> Self {
        Self::default()
    }

    async fn execute(store: &SqliteEventRepository, sql: &str, binds: &[&str]) -> u64 {
        let mut query = sqlx::query(sql);
        for bind in binds {
            query = query.bind(*bind);
        }
        query
            .execute(store.pool())
            .await
            .unwrap_or_else(|error| panic!("SqliteHarness: `{sql}` failed: {error}"))
            .rows_affected()
    }

    /// Sets one column of one stored event to `value`, bypassing every check.
    ///
    /// # Panics
    /// When the event is not there.
    pub async fn damage(
        &self,
        store: &SqliteEventRepository,
        column: &str,
        value: &str,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
    ) {
        let sql = format!(
            "UPDATE cqrs_events SET {column} = ? \
             WHERE aggregate_type = ? AND aggregate_id = ? AND sequence = {sequence}"
        );
        let id = aggregate_id.to_string();
        let changed = Self::execute(store, &sql, &[value, aggregate_type, &id]).await;
        assert_eq!(
            changed, 1,
            "SqliteHarness: no event {aggregate_type} {aggregate_id} #{sequence}"
        );
    }
}

impl Drop for SqliteHarness {
    fn drop(&mut self) {
        let files = self.files.get_mut().unwrap_or_else(PoisonError::into_inner);
        for path in files.drain(..) {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

impl StoreHarness for SqliteHarness {
    type Store = SqliteEventRepository;

    async fn fresh(&self) -> SqliteEventRepository {
        let path = std::env::temp_dir().join(format!("cqrs-conformance-{}.sqlite", Uuid::new_v4()));
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(path.clone());
        SqliteEventRepository::open(&path)
            .await
            .unwrap_or_else(|error| {
                panic!("SqliteHarness: cannot open {}: {error}", path.display())
            })
    }

    async fn corrupt_payload(
        &self,
        store: &SqliteEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        raw: &str,
    ) {
        self.damage(
            store,
            "payload",
            raw,
            aggregate_type,
            aggregate_id,
            sequence,
        )
        .await;
    }

    async fn set_event_type(
        &self,
        store: &SqliteEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        event_type: &str,
    ) {
        self.damage(
            store,
            "event_type",
            event_type,
            aggregate_type,
            aggregate_id,
            sequence,
        )
        .await;
    }

    async fn delete_event(
        &self,
        store: &SqliteEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
    ) {
        let sql = format!(
            "DELETE FROM cqrs_events \
             WHERE aggregate_type = ? AND aggregate_id = ? AND sequence = {sequence}"
        );
        let id = aggregate_id.to_string();
        let deleted = Self::execute(store, &sql, &[aggregate_type, &id]).await;
        assert_eq!(
            deleted, 1,
            "SqliteHarness: no event {aggregate_type} {aggregate_id} #{sequence}"
        );
    }
}

impl SnapshotHarness for SqliteHarness {
    type Events = SqliteEventRepository;
    type Snapshots = SqliteEventRepository;

    async fn fresh(&self) -> (SqliteEventRepository, SqliteEventRepository) {
        let store = StoreHarness::fresh(self).await;
        (store.clone(), store)
    }

    async fn put_snapshot_unchecked(&self, store: &SqliteEventRepository, snapshot: Snapshot) {
        sqlx::query(
            "INSERT INTO cqrs_snapshots (aggregate_type, aggregate_id, sequence, state, timestamp) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                 sequence = excluded.sequence, state = excluded.state, timestamp = excluded.timestamp",
        )
        .bind(&snapshot.aggregate_type)
        .bind(snapshot.aggregate_id.to_string())
        .bind(snapshot.sequence)
        .bind(snapshot.state.to_string())
        .bind(snapshot.timestamp.timestamp_micros())
        .execute(store.pool())
        .await
        .unwrap_or_else(|error| panic!("SqliteHarness: cannot put a snapshot: {error}"));
    }
}

impl ViewHarness for SqliteHarness {
    type Database = SqliteEventRepository;
    const VERSIONS_SHARE_A_TABLE: bool = true;

    async fn fresh(&self) -> SqliteEventRepository {
        StoreHarness::fresh(self).await
    }

    fn views<A: cqrs::Aggregate, V: cqrs::View<A>>(
        &self,
        database: &SqliteEventRepository,
    ) -> impl cqrs::ViewRepository<A, V> {
        cqrs::SqliteViewRepository::<V>::new(database)
    }
}

impl CheckpointHarness for SqliteHarness {
    type Checkpoints = SqliteEventRepository;

    async fn fresh(&self) -> SqliteEventRepository {
        StoreHarness::fresh(self).await
    }
}

impl DeadLetterHarness for SqliteHarness {
    type Sink = cqrs::SqliteDeadLetters;

    fn dead_letters(&self, database: &SqliteEventRepository) -> cqrs::SqliteDeadLetters {
        cqrs::SqliteDeadLetters::new(database)
    }
}
