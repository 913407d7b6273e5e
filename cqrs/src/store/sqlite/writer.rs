//! The writer task: every write of a store goes through it, and concurrent writes share one
//! transaction (group commit) while each keeps its own outcome.
//!
//! The task owns the write connection and a queue. It takes every job waiting (up to a
//! limit), runs `BEGIN IMMEDIATE`, applies the jobs one after the other, and commits once.
//! A job that fails on a constraint (a lost race, a duplicate id, a stale view) is undone on
//! its own, by the statement's own rollback or by a savepoint, and answered with its error;
//! its neighbours still commit. Only an unexpected database error (disk full, I/O) undoes
//! the whole transaction: the failing job is answered with that error and the others are
//! run again in a new transaction.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqliteConnection};
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::Snapshot;
use crate::view::Checkpoint;

use super::rows::to_micros;
use super::schema::GAP_MARKER;

/// Rows per multi-row `INSERT`: 9 parameters each stays under SQLite's oldest limit of 999
/// parameters per statement.
const ROWS_PER_INSERT: usize = 100;

/// SQLite's primary result code for every constraint violation (`SQLITE_CONSTRAINT`).
const SQLITE_CONSTRAINT: i32 = 19;

/// What the writer is asked to do.
pub(super) enum Job {
    /// Append one command's events.
    Append {
        events: Vec<PersistableDomainEvent>,
        reply: oneshot::Sender<Result<Vec<i64>, CQRSError>>,
    },
    /// Store a snapshot unless a newer one is stored.
    Snapshot {
        snapshot: Snapshot,
        state: String,
        reply: oneshot::Sender<Result<(), CQRSError>>,
    },
    /// Write view rows and a checkpoint, all or nothing.
    Views {
        commit: ViewCommit,
        reply: oneshot::Sender<Result<(), CQRSError>>,
    },
    /// Store a checkpoint on its own.
    Checkpoint {
        checkpoint: Checkpoint,
        reply: oneshot::Sender<Result<(), CQRSError>>,
    },
    /// Run trusted SQL (the migration, a view table's DDL).
    Execute {
        sql: String,
        reply: oneshot::Sender<Result<(), CQRSError>>,
    },
}

/// A batch of view changes for one view table, with the checkpoint to store beside them.
pub(super) struct ViewCommit {
    /// The table, already validated as an identifier.
    pub table: String,
    /// `View::VERSION`.
    pub view_version: i64,
    /// The rows to write.
    pub rows: Vec<ViewRow>,
    /// The projection's checkpoint.
    pub checkpoint: Option<Checkpoint>,
}

/// One view instance to write.
pub(super) struct ViewRow {
    pub view_id: String,
    /// The row version it was loaded with (0: it did not exist).
    pub expected_version: i64,
    pub payload: String,
}

/// The job's answer, computed inside the transaction and sent after the commit.
enum Outcome {
    Positions(Result<Vec<i64>, CQRSError>),
    Done(Result<(), CQRSError>),
}

impl Job {
    fn finish(self, outcome: Outcome) {
        // A caller that stopped waiting has dropped its receiver: nothing to tell it.
        match (self, outcome) {
            (Job::Append { reply, .. }, Outcome::Positions(result)) => {
                let _ = reply.send(result);
            }
            (
                Job::Snapshot { reply, .. }
                | Job::Views { reply, .. }
                | Job::Checkpoint { reply, .. }
                | Job::Execute { reply, .. },
                Outcome::Done(result),
            ) => {
                let _ = reply.send(result);
            }
            // Each job's outcome is computed by its own arm of `apply`; dropping the reply
            // tells the caller the writer failed rather than answering the wrong thing.
            _ => {}
        }
    }

    fn fail(self, error: &Arc<sqlx::Error>) {
        let error = CQRSError::persistence(WriterError(Arc::clone(error)));
        match self {
            Job::Append { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Job::Snapshot { reply, .. }
            | Job::Views { reply, .. }
            | Job::Checkpoint { reply, .. }
            | Job::Execute { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A database error met by the writer, shared by every job of the transaction it undid.
///
/// It reaches callers as the source of a [`CQRSError::PersistenceError`]; nothing of the
/// transaction was committed, and the append may be retried with the same event ids.
#[derive(Debug, Clone)]
pub struct WriterError(Arc<sqlx::Error>);

impl fmt::Display for WriterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SQLite write failed: {}", self.0)
    }
}

impl std::error::Error for WriterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// Where the writer gets its connection.
pub(super) enum WriteConnection {
    /// A connection of its own, opened by `connect`.
    Dedicated(Box<SqliteConnection>),
    /// A connection taken from the caller's pool for each transaction (`from_pool`).
    Pool(SqlitePool),
}

enum Lease<'a> {
    Borrowed(&'a mut SqliteConnection),
    Pooled(PoolConnection<Sqlite>),
}

impl Lease<'_> {
    fn connection(&mut self) -> &mut SqliteConnection {
        match self {
            Lease::Borrowed(connection) => connection,
            Lease::Pooled(connection) => connection,
        }
    }
}

impl WriteConnection {
    async fn lease(&mut self) -> Result<Lease<'_>, sqlx::Error> {
        match self {
            WriteConnection::Dedicated(connection) => Ok(Lease::Borrowed(connection)),
            WriteConnection::Pool(pool) => Ok(Lease::Pooled(pool.acquire().await?)),
        }
    }
}

/// Runs the writer until every handle to the store is dropped.
pub(super) async fn run(
    mut connection: WriteConnection,
    mut jobs: mpsc::Receiver<Job>,
    max_group: usize,
    position: Arc<watch::Sender<i64>>,
) {
    let mut group = Vec::with_capacity(max_group);
    while jobs.recv_many(&mut group, max_group).await > 0 {
        let span = tracing::trace_span!("sqlite_group_commit", jobs = group.len());
        commit_group(&mut connection, std::mem::take(&mut group), &position)
            .instrument(span)
            .await;
    }
}

async fn commit_group(
    connection: &mut WriteConnection,
    mut pending: Vec<Job>,
    position: &watch::Sender<i64>,
) {
    while !pending.is_empty() {
        let mut lease = match connection.lease().await {
            Ok(lease) => lease,
            Err(error) => return fail_all(pending, error),
        };
        let conn = lease.connection();
        if let Err(error) = execute(conn, "BEGIN IMMEDIATE").await {
            return fail_all(pending, error);
        }
        let mut outcomes = Vec::with_capacity(pending.len());
        let mut failure = None;
        for (index, job) in pending.iter().enumerate() {
            match apply(conn, job).await {
                Ok(outcome) => outcomes.push(outcome),
                Err(error) => {
                    failure = Some((index, error));
                    break;
                }
            }
        }
        if let Some((index, error)) = failure {
            tracing::warn!(%error, "SQLite write failed; transaction rolled back");
            rollback(conn).await;
            pending.remove(index).fail(&Arc::new(error));
            continue;
        }
        if let Err(error) = execute(conn, "COMMIT").await {
            tracing::warn!(%error, "SQLite commit failed; transaction rolled back");
            rollback(conn).await;
            return fail_all(pending, error);
        }
        let highest = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::Positions(Ok(positions)) => positions.last().copied(),
                _ => None,
            })
            .max();
        if let Some(highest) = highest {
            position.send_if_modified(|current| {
                let newer = highest > *current;
                if newer {
                    *current = highest;
                }
                newer
            });
        }
        for (job, outcome) in pending.drain(..).zip(outcomes) {
            job.finish(outcome);
        }
    }
}

fn fail_all(pending: Vec<Job>, error: sqlx::Error) {
    let error = Arc::new(error);
    for job in pending {
        job.fail(&error);
    }
}

// The statements below return boxed `Send` futures: sqlx's executor trait is generic over a
// lifetime, and without a concrete boxed type rustc cannot prove the writer task `Send`.
fn execute<'a>(
    conn: &'a mut SqliteConnection,
    sql: &'a str,
) -> BoxFuture<'a, Result<(), sqlx::Error>> {
    Box::pin(async move { sqlx::query(sql).execute(conn).await.map(|_| ()) })
}

async fn rollback(conn: &mut SqliteConnection) {
    // SQLite may already have rolled back on its own after an I/O error; then this fails
    // with "no transaction is active", which is the state we want anyway.
    if let Err(error) = execute(conn, "ROLLBACK").await {
        tracing::debug!(%error, "ROLLBACK after a failed write");
    }
}

/// The extended result code of a constraint violation, `None` for any other error.
fn constraint_violation(error: &sqlx::Error) -> Option<&dyn sqlx::error::DatabaseError> {
    let sqlx::Error::Database(database) = error else {
        return None;
    };
    let code = database.code()?.parse::<i32>().ok()?;
    (code & 0xff == SQLITE_CONSTRAINT).then_some(database.as_ref())
}

/// Applies one job inside the open transaction. `Ok` carries the job's own answer (which may
/// be its refusal, already undone); `Err` is an unexpected error that dooms the transaction.
async fn apply(conn: &mut SqliteConnection, job: &Job) -> Result<Outcome, sqlx::Error> {
    match job {
        Job::Append { events, .. } => append(conn, events).await.map(Outcome::Positions),
        Job::Snapshot {
            snapshot, state, ..
        } => save_snapshot(conn, snapshot, state)
            .await
            .map(|()| Outcome::Done(Ok(()))),
        Job::Views { commit, .. } => commit_views(conn, commit).await.map(Outcome::Done),
        Job::Checkpoint { checkpoint, .. } => save_checkpoint(conn, checkpoint)
            .await
            .map(|()| Outcome::Done(Ok(()))),
        Job::Execute { sql, .. } => execute(conn, sql).await.map(|()| Outcome::Done(Ok(()))),
    }
}

/// The `INSERT` of `rows` events (1 to [`ROWS_PER_INSERT`]), built once.
fn insert_sql(rows: usize) -> &'static str {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        let mut all = Vec::with_capacity(ROWS_PER_INSERT);
        let mut sql = String::from(
            "INSERT INTO cqrs_events (event_id, aggregate_type, aggregate_id, sequence, \
             event_type, event_version, payload, metadata, timestamp) VALUES ",
        );
        for i in 0..ROWS_PER_INSERT {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?,?,?,?,?,?,?,?,?)");
            all.push(sql.clone());
        }
        all
    });
    all[rows.clamp(1, ROWS_PER_INSERT) - 1].as_str()
}

/// Inserts one chunk of events with one statement; returns their positions, in order.
///
/// Positions are `AUTOINCREMENT` rowids: SQLite gives each new row the largest rowid the
/// table ever held plus one, and this connection is the only writer inside its
/// transaction, so the rows of one statement get consecutive positions ending at
/// `last_insert_rowid`. Reading them back with `RETURNING` would cost a row per event.
fn insert_chunk<'a>(
    conn: &'a mut SqliteConnection,
    chunk: &'a [PersistableDomainEvent],
) -> BoxFuture<'a, Result<Vec<i64>, sqlx::Error>> {
    Box::pin(insert_chunk_inner(conn, chunk))
}

async fn insert_chunk_inner(
    conn: &mut SqliteConnection,
    chunk: &[PersistableDomainEvent],
) -> Result<Vec<i64>, sqlx::Error> {
    let mut query = sqlx::query(insert_sql(chunk.len()));
    for event in chunk {
        query = query
            .bind(event.event_id.to_string())
            .bind(event.aggregate_type.as_str())
            .bind(event.aggregate_id.to_string())
            .bind(event.sequence)
            .bind(event.event_type.as_str())
            .bind(event.event_version.as_str())
            .bind(event.payload.to_string())
            .bind(event.metadata.to_string())
            .bind(to_micros(event.timestamp));
    }
    let done = query.execute(&mut *conn).await?;
    let count = chunk.len() as i64;
    if done.rows_affected() != chunk.len() as u64 {
        return Err(sqlx::Error::Protocol(format!(
            "INSERT of {count} events reported {} rows",
            done.rows_affected()
        )));
    }
    let last = done.last_insert_rowid();
    Ok((last - count + 1..=last).collect())
}

/// Appends one command's events. A batch of up to [`ROWS_PER_INSERT`] events is one
/// statement, which SQLite undoes by itself when it violates a constraint; a larger batch
/// runs under a savepoint.
async fn append(
    conn: &mut SqliteConnection,
    events: &[PersistableDomainEvent],
) -> Result<Result<Vec<i64>, CQRSError>, sqlx::Error> {
    let single = events.len() <= ROWS_PER_INSERT;
    if !single {
        execute(conn, "SAVEPOINT cqrs_append").await?;
    }
    let mut positions = Vec::with_capacity(events.len());
    let mut violation = None;
    for chunk in events.chunks(ROWS_PER_INSERT) {
        match insert_chunk(conn, chunk).await {
            Ok(chunk_positions) => positions.extend(chunk_positions),
            Err(error) => match constraint_violation(&error) {
                Some(database) => {
                    violation = Some(database.message().contains(GAP_MARKER));
                    break;
                }
                None => return Err(error),
            },
        }
    }
    if !single {
        if violation.is_some() {
            execute(conn, "ROLLBACK TO cqrs_append").await?;
        }
        execute(conn, "RELEASE cqrs_append").await?;
    }
    match violation {
        None => Ok(Ok(positions)),
        Some(gap) => classify_refusal(conn, events, gap).await,
    }
}

/// Explains why an append hit a constraint: a retry of events already stored (success with
/// their positions), an id reused for another event, a sequence skipping ahead, or a lost
/// race. The race itself was detected by the constraint; this only reads to name it.
async fn classify_refusal(
    conn: &mut SqliteConnection,
    events: &[PersistableDomainEvent],
    gap: bool,
) -> Result<Result<Vec<i64>, CQRSError>, sqlx::Error> {
    let mut stored: HashMap<Uuid, (String, String, i64, i64)> = HashMap::new();
    for chunk in events.chunks(ROWS_PER_INSERT * 9) {
        let placeholders = vec!["?"; chunk.len()].join(",");
        let sql = format!(
            "SELECT event_id, aggregate_type, aggregate_id, sequence, position FROM cqrs_events \
             WHERE event_id IN ({placeholders})"
        );
        let mut query = sqlx::query(&sql);
        for event in chunk {
            query = query.bind(event.event_id.to_string());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let id: String = row.try_get(0)?;
            if let Ok(id) = Uuid::parse_str(&id) {
                stored.insert(
                    id,
                    (
                        row.try_get(1)?,
                        row.try_get(2)?,
                        row.try_get(3)?,
                        row.try_get(4)?,
                    ),
                );
            }
        }
    }
    let first = &events[0];
    if stored.contains_key(&first.event_id) {
        let mut positions = Vec::with_capacity(events.len());
        for event in events {
            match stored.get(&event.event_id) {
                Some((aggregate_type, aggregate_id, sequence, position))
                    if *aggregate_type == event.aggregate_type
                        && *aggregate_id == event.aggregate_id.to_string()
                        && *sequence == event.sequence =>
                {
                    positions.push(*position);
                }
                _ => {
                    return Ok(Err(CQRSError::DuplicateEventId {
                        event_id: event.event_id,
                    }))
                }
            }
        }
        return Ok(Ok(positions));
    }
    if let Some(reused) = events.iter().find(|e| stored.contains_key(&e.event_id)) {
        return Ok(Err(CQRSError::DuplicateEventId {
            event_id: reused.event_id,
        }));
    }
    let expected = first.sequence - 1;
    if gap {
        let current: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(sequence), 0) FROM cqrs_events \
             WHERE aggregate_type = ? AND aggregate_id = ?",
        )
        .bind(first.aggregate_type.as_str())
        .bind(first.aggregate_id.to_string())
        .fetch_one(&mut *conn)
        .await?;
        return Ok(Err(CQRSError::InvalidAppend(format!(
            "first sequence {} skips ahead of the stored {current}",
            first.sequence
        ))));
    }
    Ok(Err(CQRSError::Conflict {
        aggregate_type: first.aggregate_type.clone(),
        aggregate_id: first.aggregate_id,
        expected_sequence: expected,
    }))
}

async fn save_snapshot(
    conn: &mut SqliteConnection,
    snapshot: &Snapshot,
    state: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO cqrs_snapshots (aggregate_type, aggregate_id, sequence, state, timestamp) \
         VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
             sequence = excluded.sequence, state = excluded.state, timestamp = excluded.timestamp \
         WHERE excluded.sequence >= cqrs_snapshots.sequence",
    )
    .bind(snapshot.aggregate_type.as_str())
    .bind(snapshot.aggregate_id.to_string())
    .bind(snapshot.sequence)
    .bind(state)
    .bind(to_micros(snapshot.timestamp))
    .execute(conn)
    .await
    .map(|_| ())
}

async fn save_checkpoint(
    conn: &mut SqliteConnection,
    checkpoint: &Checkpoint,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO cqrs_checkpoints (name, position, updated_at) VALUES (?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET \
             position = excluded.position, updated_at = excluded.updated_at",
    )
    .bind(checkpoint.name.as_str())
    .bind(checkpoint.position)
    .bind(to_micros(chrono::Utc::now()))
    .execute(conn)
    .await
    .map(|_| ())
}

/// Writes a view batch and its checkpoint under a savepoint; a stale row or a checkpoint
/// that would go backwards undoes the whole batch.
async fn commit_views(
    conn: &mut SqliteConnection,
    commit: &ViewCommit,
) -> Result<Result<(), CQRSError>, sqlx::Error> {
    execute(conn, "SAVEPOINT cqrs_views").await?;
    let refusal = match write_views(conn, commit).await {
        Ok(refusal) => refusal,
        Err(error) => return Err(error),
    };
    if refusal.is_some() {
        execute(conn, "ROLLBACK TO cqrs_views").await?;
    }
    execute(conn, "RELEASE cqrs_views").await?;
    Ok(match refusal {
        Some(error) => Err(error),
        None => Ok(()),
    })
}

async fn write_views(
    conn: &mut SqliteConnection,
    commit: &ViewCommit,
) -> Result<Option<CQRSError>, sqlx::Error> {
    let table = &commit.table;
    let now = to_micros(chrono::Utc::now());
    let insert = format!(
        "INSERT INTO \"{table}\" (view_id, view_version, row_version, payload, updated_at) \
         VALUES (?, ?, 1, ?, ?)"
    );
    let update = format!(
        "UPDATE \"{table}\" SET row_version = row_version + 1, payload = ?, updated_at = ? \
         WHERE view_id = ? AND view_version = ? AND row_version = ?"
    );
    let conflict = |row: &ViewRow| CQRSError::ViewConflict {
        view: table.clone(),
        view_id: row.view_id.clone(),
        expected_version: row.expected_version,
    };
    for row in &commit.rows {
        if row.expected_version == 0 {
            let inserted = sqlx::query(&insert)
                .bind(row.view_id.as_str())
                .bind(commit.view_version)
                .bind(row.payload.as_str())
                .bind(now)
                .execute(&mut *conn)
                .await;
            match inserted {
                Ok(_) => {}
                Err(error) if constraint_violation(&error).is_some() => {
                    return Ok(Some(conflict(row)))
                }
                Err(error) => return Err(error),
            }
        } else {
            let updated = sqlx::query(&update)
                .bind(row.payload.as_str())
                .bind(now)
                .bind(row.view_id.as_str())
                .bind(commit.view_version)
                .bind(row.expected_version)
                .execute(&mut *conn)
                .await?;
            if updated.rows_affected() != 1 {
                return Ok(Some(conflict(row)));
            }
        }
    }
    if let Some(checkpoint) = &commit.checkpoint {
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT position FROM cqrs_checkpoints WHERE name = ?")
                .bind(checkpoint.name.as_str())
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(stored) = stored {
            let backwards = checkpoint.position < stored
                || (checkpoint.position == stored && !commit.rows.is_empty());
            if backwards {
                return Ok(Some(CQRSError::ViewConflict {
                    view: table.clone(),
                    view_id: format!("checkpoint {}", checkpoint.name),
                    expected_version: stored,
                }));
            }
        }
        save_checkpoint(conn, checkpoint).await?;
    }
    Ok(None)
}
