//! Process instances and their checkpoints in the store's PostgreSQL schema.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::error::CQRSError;
use crate::process::{conflict, stored_next_due, Deadline, ProcessRow, ProcessStore};

use super::schema::CUSTOM_PLANS_TRANSACTION;
use super::PostgresEventRepository;

const COLUMNS: &str = "instance, state, version, correlation_id, deadlines, finished";

/// The statements, with the store's (validated) schema spliced in.
struct Statements {
    ddl: String,
    load: String,
    insert: String,
    update: String,
    load_checkpoint: String,
    advance_checkpoint: String,
    due: String,
    next_due: String,
    list: String,
}

impl Statements {
    fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        let rows = format!("{s}.cqrs_process_instances");
        let checkpoints = format!("{s}.cqrs_process_checkpoints");
        Statements {
            // One simple-query message: PostgreSQL runs it as one implicit transaction, so the
            // advisory lock (the one the store's own migration takes) is held until the
            // tables exist.
            ddl: format!(
                r#"
SELECT pg_advisory_xact_lock(hashtextextended('cqrs migrate {schema}', 0));

CREATE TABLE IF NOT EXISTS {rows} (
    process        TEXT        NOT NULL,
    instance       TEXT        COLLATE "C" NOT NULL,
    state          JSONB       NOT NULL,
    version        BIGINT      NOT NULL CHECK (version >= 1),
    correlation_id UUID,
    deadlines      JSONB       NOT NULL,
    next_due       TIMESTAMPTZ,
    finished       BOOLEAN     NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (process, instance)
);
CREATE INDEX IF NOT EXISTS cqrs_process_instances_due
    ON {rows} (process, next_due) WHERE next_due IS NOT NULL;
CREATE TABLE IF NOT EXISTS {checkpoints} (
    process    TEXT        NOT NULL PRIMARY KEY,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"#
            ),
            load: format!("SELECT {COLUMNS} FROM {rows} WHERE process = $1 AND instance = $2"),
            insert: format!(
                "INSERT INTO {rows} (process, instance, state, version, correlation_id, \
                 deadlines, next_due, finished, updated_at) \
                 SELECT $1, u.instance, u.state, 1, u.correlation_id, u.deadlines, u.next_due, \
                 u.finished, now() \
                 FROM unnest($2::text[], $3::jsonb[], $4::uuid[], $5::jsonb[], \
                 $6::timestamptz[], $7::bool[]) \
                 AS u(instance, state, correlation_id, deadlines, next_due, finished) \
                 ON CONFLICT (process, instance) DO NOTHING \
                 RETURNING instance"
            ),
            update: format!(
                "UPDATE {rows} AS t SET state = u.state, version = t.version + 1, \
                 correlation_id = u.correlation_id, deadlines = u.deadlines, \
                 next_due = u.next_due, finished = u.finished, updated_at = now() \
                 FROM unnest($2::text[], $3::bigint[], $4::jsonb[], $5::uuid[], $6::jsonb[], \
                 $7::timestamptz[], $8::bool[]) \
                 AS u(instance, version, state, correlation_id, deadlines, next_due, finished) \
                 WHERE t.process = $1 AND t.instance = u.instance AND t.version = u.version \
                 RETURNING t.instance"
            ),
            load_checkpoint: format!("SELECT position FROM {checkpoints} WHERE process = $1"),
            advance_checkpoint: format!(
                "INSERT INTO {checkpoints} AS c (process, position, updated_at) \
                 VALUES ($1, $2, now()) \
                 ON CONFLICT (process) DO UPDATE \
                 SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at \
                 WHERE c.position <= EXCLUDED.position \
                 RETURNING position"
            ),
            due: format!(
                "SELECT {COLUMNS} FROM {rows} \
                 WHERE process = $1 AND next_due IS NOT NULL AND next_due <= $2 \
                 ORDER BY next_due, instance LIMIT $3"
            ),
            next_due: format!(
                "SELECT min(next_due) FROM {rows} WHERE process = $1 AND next_due IS NOT NULL"
            ),
            list: format!(
                "SELECT {COLUMNS} FROM {rows} \
                 WHERE process = $1 AND ($2::text IS NULL OR instance > $2) \
                 ORDER BY instance LIMIT $3"
            ),
        }
    }
}

/// A [`ProcessStore`] in the schema of a [`PostgresEventRepository`]: process instances in
/// the table `cqrs_process_instances`, the processes' checkpoints in
/// `cqrs_process_checkpoints`.
///
/// ```sql
/// cqrs_process_instances (process TEXT, instance TEXT COLLATE "C", state JSONB,
///     version BIGINT, correlation_id UUID, deadlines JSONB, next_due TIMESTAMPTZ,
///     finished BOOLEAN, updated_at TIMESTAMPTZ, PRIMARY KEY (process, instance))
///     -- index (process, next_due) WHERE next_due IS NOT NULL
/// cqrs_process_checkpoints (process TEXT PRIMARY KEY, position BIGINT, updated_at TIMESTAMPTZ)
/// ```
///
/// `deadlines` is a list of `{name, due}`, earliest first, at full precision. `next_due` is
/// the earliest deadline rounded up to the microsecond, and `NULL` once the instance finished
/// or when it has no deadline: [`due`](ProcessStore::due) and
/// [`next_due`](ProcessStore::next_due) read the partial index on `(process, next_due)`.
/// `instance` compares in byte order (`COLLATE "C"`), so [`list`](ProcessStore::list) pages
/// in the same order as every store, on the primary key. `version` is the optimistic lock.
/// The checkpoints have a table of their own rather than sharing `cqrs_checkpoints` with the
/// projections: a process and a projection of the same name cannot move each other's
/// position, and nothing that saves a checkpoint unconditionally (a relay, a reset) can move
/// a process's back.
///
/// [`commit`](ProcessStore::commit) is one transaction: the checkpoint first (its row lock
/// orders two runners of one process; a lower one is refused), then one `INSERT` of the new
/// rows and one `UPDATE` of the loaded ones where their version did not move. Anything
/// refused rolls the whole commit back and is a [`CQRSError::ViewConflict`] naming the
/// process and the instance (or `(checkpoint)`). A row damaged behind the store's back (JSON
/// of the wrong shape) is a [`CQRSError::Deserialization`], never a panic.
///
/// The tables are created by [`migrate`](Self::migrate), or on first use; run the store's
/// own [`migrate`](PostgresEventRepository::migrate) first (it creates the schema).
///
/// ```no_run
/// use cqrs::{PostgresEventRepository, PostgresProcessStore, ProcessRow, ProcessStore};
///
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// let store = PostgresEventRepository::connect("postgres://postgres@127.0.0.1/test").await?;
/// store.migrate().await?;
/// let processes = PostgresProcessStore::new(&store);
/// processes.migrate().await?;
///
/// processes.commit("transfer", vec![ProcessRow::new("t1")], Some(3)).await?;
/// assert_eq!(processes.load("transfer", "t1").await?.map(|row| row.version), Some(1));
/// // A second writer that loaded the same version loses, and writes nothing.
/// assert!(processes.commit("transfer", vec![ProcessRow::new("t1")], Some(4)).await.is_err());
/// assert_eq!(processes.checkpoint("transfer").await?, 3);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresProcessStore {
    store: PostgresEventRepository,
    sql: Arc<Statements>,
    migrated: Arc<AtomicBool>,
}

impl fmt::Debug for PostgresProcessStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresProcessStore")
            .field("schema", &self.store.schema())
            .field("migrated", &self.migrated.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PostgresProcessStore {
    /// Process instances in the schema of `store`, through its pool.
    pub fn new(store: &PostgresEventRepository) -> Self {
        PostgresProcessStore {
            store: store.clone(),
            sql: Arc::new(Statements::new(store.schema())),
            migrated: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The event store whose schema and pool this uses.
    pub fn event_repository(&self) -> &PostgresEventRepository {
        &self.store
    }

    /// Creates the tables and the index if they do not exist. Idempotent, and safe when
    /// several processes run it at once (under the store's advisory lock); also done on
    /// first use.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    pub async fn migrate(&self) -> Result<(), CQRSError> {
        sqlx::raw_sql(&self.sql.ddl)
            .execute(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    async fn ensure_tables(&self) -> Result<(), CQRSError> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        self.migrate().await
    }
}

fn decode(process: &str, row: &PgRow) -> Result<ProcessRow, CQRSError> {
    let instance: String = row.try_get(0).map_err(CQRSError::persistence)?;
    let column = |name: &str, e: sqlx::Error| {
        CQRSError::persistence(format!(
            "cqrs_process_instances row ({process}, {instance}): {name}: {e}"
        ))
    };
    let state: Value = row.try_get(1).map_err(|e| column("state", e))?;
    let version: i64 = row.try_get(2).map_err(|e| column("version", e))?;
    let correlation_id: Option<Uuid> = row.try_get(3).map_err(|e| column("correlation_id", e))?;
    let deadlines: Value = row.try_get(4).map_err(|e| column("deadlines", e))?;
    let finished: bool = row.try_get(5).map_err(|e| column("finished", e))?;
    let mut deadlines: Vec<Deadline> =
        serde_json::from_value(deadlines).map_err(|source| CQRSError::Deserialization {
            what: format!("deadlines of process {process} instance {instance}"),
            source,
        })?;
    deadlines.sort_by_key(|d| d.due);
    Ok(ProcessRow {
        instance,
        state,
        version,
        correlation_id,
        deadlines,
        finished,
    })
}

/// The columns of the rows one `commit` inserts or updates, as arrays to `unnest`.
#[derive(Default)]
struct Columns {
    instances: Vec<String>,
    versions: Vec<i64>,
    states: Vec<Value>,
    correlation_ids: Vec<Option<Uuid>>,
    deadlines: Vec<Value>,
    next_dues: Vec<Option<DateTime<Utc>>>,
    finished: Vec<bool>,
}

impl Columns {
    fn push(&mut self, process: &str, row: &ProcessRow) -> Result<(), CQRSError> {
        let mut deadlines = row.deadlines.clone();
        deadlines.sort_by_key(|d| d.due);
        let deadlines =
            serde_json::to_value(&deadlines).map_err(|source| CQRSError::Serialization {
                what: format!("deadlines of process {process} instance {}", row.instance),
                source,
            })?;
        self.instances.push(row.instance.clone());
        self.versions.push(row.version);
        self.states.push(row.state.clone());
        self.correlation_ids.push(row.correlation_id);
        self.deadlines.push(deadlines);
        self.next_dues.push(stored_next_due(row));
        self.finished.push(row.finished);
        Ok(())
    }

    /// The first instance (with its version) that `written` lacks.
    fn lost(&self, written: &[String]) -> (String, i64) {
        let written: HashSet<&str> = written.iter().map(String::as_str).collect();
        self.instances
            .iter()
            .zip(&self.versions)
            .find(|(instance, _)| !written.contains(instance.as_str()))
            .map_or_else(
                || (String::new(), 0),
                |(instance, version)| (instance.clone(), *version),
            )
    }
}

#[async_trait]
impl ProcessStore for PostgresProcessStore {
    async fn load(&self, process: &str, instance: &str) -> Result<Option<ProcessRow>, CQRSError> {
        self.ensure_tables().await?;
        let row = sqlx::query(&self.sql.load)
            .bind(process)
            .bind(instance)
            .fetch_optional(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        row.map(|row| decode(process, &row)).transpose()
    }

    async fn commit(
        &self,
        process: &str,
        rows: Vec<ProcessRow>,
        checkpoint: Option<i64>,
    ) -> Result<(), CQRSError> {
        self.ensure_tables().await?;
        let mut new = Columns::default();
        let mut old = Columns::default();
        for row in &rows {
            if row.version == 0 {
                new.push(process, row)?;
            } else {
                old.push(process, row)?;
            }
        }
        // Dropping the transaction before its commit rolls it back.
        let mut tx = self
            .store
            .pool()
            .begin_with(CUSTOM_PLANS_TRANSACTION)
            .await
            .map_err(CQRSError::persistence)?;
        if let Some(position) = checkpoint {
            let advanced: Option<i64> = sqlx::query_scalar(&self.sql.advance_checkpoint)
                .bind(process)
                .bind(position)
                .fetch_optional(&mut *tx)
                .await
                .map_err(CQRSError::persistence)?;
            if advanced.is_none() {
                let stored: Option<i64> = sqlx::query_scalar(&self.sql.load_checkpoint)
                    .bind(process)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(CQRSError::persistence)?;
                return Err(conflict(process, "(checkpoint)", stored.unwrap_or(0)));
            }
        }
        if !new.instances.is_empty() {
            let inserted: Vec<String> = sqlx::query_scalar(&self.sql.insert)
                .bind(process)
                .bind(&new.instances)
                .bind(&new.states)
                .bind(&new.correlation_ids)
                .bind(&new.deadlines)
                .bind(&new.next_dues)
                .bind(&new.finished)
                .fetch_all(&mut *tx)
                .await
                .map_err(CQRSError::persistence)?;
            if inserted.len() != new.instances.len() {
                let (instance, version) = new.lost(&inserted);
                return Err(conflict(process, &instance, version));
            }
        }
        if !old.instances.is_empty() {
            let updated: Vec<String> = sqlx::query_scalar(&self.sql.update)
                .bind(process)
                .bind(&old.instances)
                .bind(&old.versions)
                .bind(&old.states)
                .bind(&old.correlation_ids)
                .bind(&old.deadlines)
                .bind(&old.next_dues)
                .bind(&old.finished)
                .fetch_all(&mut *tx)
                .await
                .map_err(CQRSError::persistence)?;
            if updated.len() != old.instances.len() {
                let (instance, version) = old.lost(&updated);
                return Err(conflict(process, &instance, version));
            }
        }
        tx.commit().await.map_err(CQRSError::persistence)
    }

    async fn checkpoint(&self, process: &str) -> Result<i64, CQRSError> {
        self.ensure_tables().await?;
        let position: Option<i64> = sqlx::query_scalar(&self.sql.load_checkpoint)
            .bind(process)
            .fetch_optional(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        Ok(position.unwrap_or(0))
    }

    async fn due(
        &self,
        process: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ProcessRow>, CQRSError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.ensure_tables().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = sqlx::query(&self.sql.due)
            .bind(process)
            .bind(now)
            .bind(limit)
            .fetch_all(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        rows.iter().map(|row| decode(process, row)).collect()
    }

    async fn next_due(&self, process: &str) -> Result<Option<DateTime<Utc>>, CQRSError> {
        self.ensure_tables().await?;
        sqlx::query_scalar(&self.sql.next_due)
            .bind(process)
            .fetch_one(self.store.pool())
            .await
            .map_err(CQRSError::persistence)
    }

    async fn list(
        &self,
        process: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ProcessRow>, CQRSError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.ensure_tables().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = sqlx::query(&self.sql.list)
            .bind(process)
            .bind(after)
            .bind(limit)
            .fetch_all(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        rows.iter().map(|row| decode(process, row)).collect()
    }
}
