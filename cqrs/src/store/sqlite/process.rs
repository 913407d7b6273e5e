//! Process instances and their checkpoints in the store's SQLite file.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::Row;
use uuid::Uuid;

use crate::error::CQRSError;
use crate::process::{conflict, stored_next_due, Deadline, ProcessRow, ProcessStore};

use super::{CorruptRow, SqliteEventRepository};

/// The tables, created by [`SqliteProcessStore::migrate`] (idempotent).
const DDL: &str = "CREATE TABLE IF NOT EXISTS cqrs_process_instances (
    process        TEXT    NOT NULL,
    instance       TEXT    NOT NULL,
    state          TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version >= 1),
    correlation_id TEXT,
    deadlines      TEXT    NOT NULL,
    next_due       INTEGER,
    finished       INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (process, instance)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cqrs_process_instances_due
    ON cqrs_process_instances (process, next_due);
CREATE TABLE IF NOT EXISTS cqrs_process_checkpoints (
    process    TEXT    NOT NULL PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;";

const COLUMNS: &str = "instance, state, version, correlation_id, deadlines, finished";

const INSERT: &str = "INSERT INTO cqrs_process_instances (process, instance, state, version, \
     correlation_id, deadlines, next_due, finished, updated_at) \
     VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?) ON CONFLICT (process, instance) DO NOTHING";

const UPDATE: &str = "UPDATE cqrs_process_instances SET state = ?, version = version + 1, \
     correlation_id = ?, deadlines = ?, next_due = ?, finished = ?, updated_at = ? \
     WHERE process = ? AND instance = ? AND version = ?";

const LOAD_CHECKPOINT: &str = "SELECT position FROM cqrs_process_checkpoints WHERE process = ?";

const SAVE_CHECKPOINT: &str = "INSERT INTO cqrs_process_checkpoints (process, position, \
     updated_at) VALUES (?, ?, ?) \
     ON CONFLICT (process) DO UPDATE SET position = excluded.position, \
     updated_at = excluded.updated_at";

/// A [`ProcessStore`] in the file of a [`SqliteEventRepository`]: process instances in the
/// table `cqrs_process_instances`, the processes' checkpoints in `cqrs_process_checkpoints`.
///
/// ```sql
/// cqrs_process_instances (process TEXT, instance TEXT, state TEXT, version INTEGER,
///     correlation_id TEXT, deadlines TEXT, next_due INTEGER, finished INTEGER,
///     updated_at INTEGER, PRIMARY KEY (process, instance))   -- index (process, next_due)
/// cqrs_process_checkpoints (process TEXT PRIMARY KEY, position INTEGER, updated_at INTEGER)
/// ```
///
/// `state` and `deadlines` are JSON text (the deadlines a list of `{name, due}`, earliest
/// first, at full precision). `next_due` is the earliest deadline in microseconds since the
/// Unix epoch, rounded up, and `NULL` once the instance finished or when it has no deadline:
/// [`due`](ProcessStore::due) and [`next_due`](ProcessStore::next_due) read the index on
/// `(process, next_due)`. `version` is the optimistic lock. The checkpoints have a table of
/// their own rather than sharing `cqrs_checkpoints` with the projections: a process and a
/// projection of the same name cannot move each other's position, and nothing that saves a
/// checkpoint unconditionally (a relay, a reset) can move a process's back.
///
/// [`commit`](ProcessStore::commit) is one `BEGIN IMMEDIATE` transaction on a connection of
/// the store's pool: the checkpoint (refused if lower than the stored one), then each row,
/// inserted when its version is 0 and updated only where the stored version is still the one
/// it was loaded with. Anything refused rolls the whole commit back and is a
/// [`CQRSError::ViewConflict`] naming the process and the instance (or `(checkpoint)`).
///
/// A row damaged behind the store's back is an error, never a panic: state or deadlines that
/// do not decode are a [`CQRSError::Deserialization`]; a correlation id that is not a UUID or
/// a column of the wrong type is a [`CQRSError::PersistenceError`] whose source is a
/// [`CorruptRow`].
///
/// The tables are created by [`migrate`](Self::migrate), or on first use.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use cqrs::{ProcessRow, ProcessStore, SqliteEventRepository, SqliteProcessStore};
/// # let path = std::env::temp_dir().join(format!("cqrs-doc-{}.sqlite", uuid::Uuid::new_v4()));
/// let store = SqliteEventRepository::open(&path).await?;
/// let processes = SqliteProcessStore::new(&store);
///
/// let mut row = ProcessRow::new("t1");
/// row.state = serde_json::json!({ "step": "withdrawn" });
/// processes.commit("transfer", vec![row.clone()], Some(3)).await?;
/// let stored = processes.load("transfer", "t1").await?.expect("just committed");
/// assert_eq!((stored.version, stored.state), (1, row.state.clone()));
/// assert_eq!(processes.checkpoint("transfer").await?, 3);
/// // A second writer that loaded the same version loses, and writes nothing.
/// assert!(processes.commit("transfer", vec![row], Some(4)).await.is_err());
/// assert_eq!(processes.checkpoint("transfer").await?, 3);
/// # drop((processes, store));
/// # for suffix in ["", "-wal", "-shm"] {
/// #     let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
/// # }
/// # Ok::<(), cqrs::CQRSError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct SqliteProcessStore {
    store: SqliteEventRepository,
    migrated: Arc<AtomicBool>,
}

impl fmt::Debug for SqliteProcessStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteProcessStore")
            .field("migrated", &self.migrated.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SqliteProcessStore {
    /// Process instances in the file of `store`, through its connections.
    pub fn new(store: &SqliteEventRepository) -> Self {
        SqliteProcessStore {
            store: store.clone(),
            migrated: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The event store whose file holds the instances.
    pub fn event_repository(&self) -> &SqliteEventRepository {
        &self.store
    }

    /// Creates the tables and the index if they do not exist. Idempotent; also done on first
    /// use.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    pub async fn migrate(&self) -> Result<(), CQRSError> {
        sqlx::raw_sql(DDL)
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

    /// The rows of `process` that `query` (selecting [`COLUMNS`]) finds, decoded.
    async fn select<'q>(
        &self,
        process: &str,
        query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> Result<Vec<ProcessRow>, CQRSError> {
        let rows = query
            .fetch_all(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        rows.iter().map(|row| decode(process, row)).collect()
    }
}

/// A row that cannot be read as a process instance (a hand edit).
fn corrupt(process: &str, instance: &str, problem: impl fmt::Display) -> CQRSError {
    CQRSError::persistence(CorruptRow {
        table: "cqrs_process_instances",
        key: format!("({process}, {instance})"),
        problem: problem.to_string(),
    })
}

fn decode(process: &str, row: &SqliteRow) -> Result<ProcessRow, CQRSError> {
    let instance: String = row
        .try_get(0)
        .map_err(|e| corrupt(process, "?", format_args!("instance: {e}")))?;
    let column =
        |name: &str, e: sqlx::Error| corrupt(process, &instance, format_args!("{name}: {e}"));
    let state: String = row.try_get(1).map_err(|e| column("state", e))?;
    let version: i64 = row.try_get(2).map_err(|e| column("version", e))?;
    let correlation_id: Option<String> = row.try_get(3).map_err(|e| column("correlation_id", e))?;
    let deadlines: String = row.try_get(4).map_err(|e| column("deadlines", e))?;
    let finished: i64 = row.try_get(5).map_err(|e| column("finished", e))?;
    let json = |what: &str, source| CQRSError::Deserialization {
        what: format!("{what} of process {process} instance {instance}"),
        source,
    };
    let state = serde_json::from_str(&state).map_err(|e| json("state", e))?;
    let mut deadlines: Vec<Deadline> =
        serde_json::from_str(&deadlines).map_err(|e| json("deadlines", e))?;
    deadlines.sort_by_key(|d| d.due);
    let correlation_id = correlation_id
        .map(|text| {
            Uuid::parse_str(&text)
                .map_err(|e| corrupt(process, &instance, format_args!("correlation_id: {e}")))
        })
        .transpose()?;
    Ok(ProcessRow {
        state,
        version,
        correlation_id,
        deadlines,
        finished: finished != 0,
        instance,
    })
}

/// A row's JSON columns and its `next_due`, ready to bind.
struct Encoded {
    state: String,
    correlation_id: Option<String>,
    deadlines: String,
    next_due: Option<i64>,
    finished: bool,
}

fn encode(process: &str, row: &ProcessRow) -> Result<Encoded, CQRSError> {
    let mut deadlines = row.deadlines.clone();
    deadlines.sort_by_key(|d| d.due);
    let json = |what: &str, source| CQRSError::Serialization {
        what: format!("{what} of process {process} instance {}", row.instance),
        source,
    };
    Ok(Encoded {
        state: serde_json::to_string(&row.state).map_err(|e| json("state", e))?,
        correlation_id: row.correlation_id.map(|id| id.to_string()),
        deadlines: serde_json::to_string(&deadlines).map_err(|e| json("deadlines", e))?,
        next_due: stored_next_due(row).map(|due| due.timestamp_micros()),
        finished: row.finished,
    })
}

/// Writes one row in the transaction on `conn`; false when its version moved on.
async fn write_row(
    conn: &mut SqliteConnection,
    process: &str,
    row: &ProcessRow,
    encoded: Encoded,
    now: i64,
) -> Result<bool, CQRSError> {
    let done = if row.version == 0 {
        sqlx::query(INSERT)
            .bind(process)
            .bind(row.instance.as_str())
            .bind(encoded.state)
            .bind(encoded.correlation_id)
            .bind(encoded.deadlines)
            .bind(encoded.next_due)
            .bind(encoded.finished)
            .bind(now)
            .execute(conn)
            .await
    } else {
        sqlx::query(UPDATE)
            .bind(encoded.state)
            .bind(encoded.correlation_id)
            .bind(encoded.deadlines)
            .bind(encoded.next_due)
            .bind(encoded.finished)
            .bind(now)
            .bind(process)
            .bind(row.instance.as_str())
            .bind(row.version)
            .execute(conn)
            .await
    };
    Ok(done.map_err(CQRSError::persistence)?.rows_affected() == 1)
}

#[async_trait]
impl ProcessStore for SqliteProcessStore {
    async fn load(&self, process: &str, instance: &str) -> Result<Option<ProcessRow>, CQRSError> {
        self.ensure_tables().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM cqrs_process_instances WHERE process = ? AND instance = ?"
        );
        let rows = self
            .select(process, sqlx::query(&sql).bind(process).bind(instance))
            .await?;
        Ok(rows.into_iter().next())
    }

    async fn commit(
        &self,
        process: &str,
        rows: Vec<ProcessRow>,
        checkpoint: Option<i64>,
    ) -> Result<(), CQRSError> {
        self.ensure_tables().await?;
        let encoded = rows
            .iter()
            .map(|row| encode(process, row))
            .collect::<Result<Vec<_>, _>>()?;
        let now = Utc::now().timestamp_micros();
        // Dropping the transaction before its commit rolls it back.
        let mut tx = self
            .store
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(CQRSError::persistence)?;
        if let Some(position) = checkpoint {
            let stored: Option<i64> = sqlx::query_scalar(LOAD_CHECKPOINT)
                .bind(process)
                .fetch_optional(&mut *tx)
                .await
                .map_err(CQRSError::persistence)?;
            let stored = stored.unwrap_or(0);
            if position < stored {
                return Err(conflict(process, "(checkpoint)", stored));
            }
            sqlx::query(SAVE_CHECKPOINT)
                .bind(process)
                .bind(position)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(CQRSError::persistence)?;
        }
        for (row, encoded) in rows.iter().zip(encoded) {
            if !write_row(&mut tx, process, row, encoded, now).await? {
                return Err(conflict(process, &row.instance, row.version));
            }
        }
        tx.commit().await.map_err(CQRSError::persistence)
    }

    async fn checkpoint(&self, process: &str) -> Result<i64, CQRSError> {
        self.ensure_tables().await?;
        let position: Option<i64> = sqlx::query_scalar(LOAD_CHECKPOINT)
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
        let sql = format!(
            "SELECT {COLUMNS} FROM cqrs_process_instances \
             WHERE process = ? AND next_due <= ? ORDER BY next_due, instance LIMIT ?"
        );
        self.select(
            process,
            sqlx::query(&sql)
                .bind(process)
                .bind(now.timestamp_micros())
                .bind(limit),
        )
        .await
    }

    async fn next_due(&self, process: &str) -> Result<Option<DateTime<Utc>>, CQRSError> {
        self.ensure_tables().await?;
        let micros: Option<i64> = sqlx::query_scalar(
            "SELECT min(next_due) FROM cqrs_process_instances WHERE process = ?",
        )
        .bind(process)
        .fetch_one(self.store.pool())
        .await
        .map_err(CQRSError::persistence)?;
        micros
            .map(|micros| {
                DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(|| {
                    corrupt(process, "?", format_args!("next_due {micros} out of range"))
                })
            })
            .transpose()
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
        // TEXT compares with SQLite's BINARY collation: byte order, like every store.
        let sql = format!(
            "SELECT {COLUMNS} FROM cqrs_process_instances \
             WHERE process = ? AND (? IS NULL OR instance > ?) ORDER BY instance LIMIT ?"
        );
        self.select(
            process,
            sqlx::query(&sql)
                .bind(process)
                .bind(after)
                .bind(after)
                .bind(limit),
        )
        .await
    }
}
