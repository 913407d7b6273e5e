//! The writer task: every write of a store goes through it, and concurrent writes share one
//! transaction (group commit) while each keeps its own outcome.
//!
//! The task owns the write connection and a queue. It takes every job waiting (up to a
//! limit, after waiting for the appends of reads in progress), runs `BEGIN IMMEDIATE`,
//! inserts the events of the group's appends with one statement, applies the other jobs
//! one after the other, and commits once; a group of nothing but small appends is that one
//! statement alone, which SQLite commits as a transaction of its own. If a constraint
//! refuses the grouped statement, the appends are inserted one by one instead.
//! A job that fails on a constraint (a lost race, a duplicate id, a stale view) is undone on
//! its own, by the statement's own rollback or by a savepoint, and answered with its error;
//! its neighbours still commit. Only an unexpected database error (disk full, I/O) undoes
//! the whole transaction: the failing job is answered with that error and the others are
//! run again in a new transaction.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqliteConnection};
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::Checkpoint;
use crate::store::Snapshot;

use super::appends::{AppendConnection, Inserted};
use super::rows::to_micros;
use super::schema::GAP_MARKER;
use super::statement::{SqliteBindValue, SqliteWriteStatement};

/// Rows per multi-row `INSERT`: 11 parameters each stays under SQLite's oldest limit of 999
/// parameters per statement.
pub(super) const ROWS_PER_INSERT: usize = 90;

/// SQLite's primary result code for every constraint violation (`SQLITE_CONSTRAINT`).
const SQLITE_CONSTRAINT: i32 = 19;

/// SQLite's primary result code for a lock held by another connection (`SQLITE_BUSY`).
const SQLITE_BUSY: i32 = 5;

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
    /// Remove an aggregate's snapshot, whatever its sequence.
    DeleteSnapshot {
        aggregate_type: String,
        aggregate_id: Uuid,
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
    /// Run an application's write statement under a savepoint of its own; answer the rows
    /// it changed.
    Write {
        statement: SqliteWriteStatement,
        reply: oneshot::Sender<Result<u64, CQRSError>>,
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
    Rows(Result<u64, CQRSError>),
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
                | Job::DeleteSnapshot { reply, .. }
                | Job::Views { reply, .. }
                | Job::Checkpoint { reply, .. }
                | Job::Execute { reply, .. },
                Outcome::Done(result),
            ) => {
                let _ = reply.send(result);
            }
            (Job::Write { reply, .. }, Outcome::Rows(result)) => {
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
            | Job::DeleteSnapshot { reply, .. }
            | Job::Views { reply, .. }
            | Job::Checkpoint { reply, .. }
            | Job::Execute { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Job::Write { reply, .. } => {
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

/// Reads of aggregates in progress (`load_events`): their callers are about to append, so
/// the writer waits for them before it commits a group (see [`run`]).
#[derive(Debug, Default)]
pub(super) struct Readers {
    in_flight: AtomicUsize,
    finished: Notify,
}

/// Counts one read in progress until dropped.
pub(super) struct Reading<'a>(&'a Readers);

impl Readers {
    /// Marks a read as started; the guard marks it finished.
    pub(super) fn enter(&self) -> Reading<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Reading(self)
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.finished.notify_one();
        }
    }
}

/// The longest a group waits for the appends of reads in progress.
const MAX_GATHER: Duration = Duration::from_millis(2);

/// Runs the writer until every handle to the store is dropped.
///
/// A group is every job waiting, plus those of callers still reading the aggregate they
/// are about to append to: one fsync then serves every concurrent dispatch instead of
/// the few that happened to be first. The wait ends when the last such read has finished
/// (and its caller had a moment to send its append), after [`MAX_GATHER`], or at the group
/// limit; a lone writer never waits.
///
/// With `relax_views` (a dedicated connection in `synchronous=FULL`), a group of nothing but
/// view batches is committed under `synchronous=NORMAL`: without an fsync of its own, durable
/// with the next commit that has one. Views are derived from the events and commit with
/// their checkpoint, so a power cut can only take both back to an earlier consistent point,
/// from which the projection applies the same events again; the events themselves are never
/// written without the fsync. The connection goes back to `FULL` before any other group.
pub(super) async fn run(
    mut connection: WriteConnection,
    mut jobs: mpsc::Receiver<Job>,
    max_group: usize,
    position: Arc<watch::Sender<i64>>,
    readers: Arc<Readers>,
    relax_views: bool,
    mut appends: Option<AppendConnection>,
) {
    let mut group = Vec::with_capacity(max_group);
    let mut relaxed = false;
    while jobs.recv_many(&mut group, max_group).await > 0 {
        gather(&mut jobs, &mut group, max_group, &readers).await;
        let views_only = relax_views && group.iter().all(|job| matches!(job, Job::Views { .. }));
        if views_only != relaxed {
            let sql = if views_only {
                "PRAGMA synchronous = NORMAL"
            } else {
                "PRAGMA synchronous = FULL"
            };
            let switched = match connection.lease().await {
                Ok(mut lease) => execute(lease.connection(), sql).await,
                Err(error) => Err(error),
            };
            match switched {
                Ok(()) => relaxed = views_only,
                // Still relaxed: nothing but views may be written until `FULL` is back.
                Err(error) if relaxed => {
                    tracing::warn!(%error, "could not restore synchronous=FULL");
                    fail_all(std::mem::take(&mut group), error);
                    continue;
                }
                // Still `FULL`: the views are written durably, as any other group.
                Err(error) => tracing::debug!(%error, "could not relax synchronous for views"),
            }
        }
        let size = group.len();
        let span = tracing::trace_span!("sqlite_group_commit", jobs = size);
        commit_group(
            &mut connection,
            appends.as_mut(),
            std::mem::take(&mut group),
            &position,
        )
        .instrument(span)
        .await;
        // The callers just answered are ready to run: let those on this thread send their
        // next write before the next group is taken. When fewer jobs than that group are
        // waiting then, the writer also waits for the runtime's next poll of its I/O driver,
        // which gives the callers on other worker threads time to send theirs (without it, 8
        // producers in a closed loop made smaller groups, about 10% slower).
        run_after_woken().await;
        if jobs.len() < size {
            tokio::task::yield_now().await;
        }
    }
}

/// Lets the tasks woken so far run first: the writer wakes itself and waits once, which puts
/// it behind them in its worker's run queue. `tokio::task::yield_now` waits for the
/// runtime's next poll of its I/O driver as well, behind every task that poll readies: under
/// an HTTP load at 64 connections, where jobs are already waiting after each group, that was
/// about 0.6 ms of the writer's 2.3 ms per group.
async fn run_after_woken() {
    let mut woken = false;
    std::future::poll_fn(|cx| {
        if woken {
            std::task::Poll::Ready(())
        } else {
            woken = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await;
}

/// Adds to `group` the jobs of callers whose reads are in progress (see [`run`]).
async fn gather(
    jobs: &mut mpsc::Receiver<Job>,
    group: &mut Vec<Job>,
    max_group: usize,
    readers: &Readers,
) {
    if !readers.busy() {
        return;
    }
    let start = Instant::now();
    while group.len() < max_group && readers.busy() && start.elapsed() < MAX_GATHER {
        let finished = readers.finished.notified();
        tokio::select! {
            received = jobs.recv_many(group, max_group - group.len()) => {
                if received == 0 {
                    return;
                }
            }
            () = finished => {}
        }
    }
    // The last reader sends its append right after its read, possibly on another thread.
    for _ in 0..GRACE_YIELDS {
        tokio::task::yield_now().await;
        while group.len() < max_group {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
    }
}

/// Yields after the last read finished, for its append to arrive.
const GRACE_YIELDS: usize = 2;

async fn commit_group(
    connection: &mut WriteConnection,
    mut appends: Option<&mut AppendConnection>,
    mut pending: Vec<Job>,
    position: &watch::Sender<i64>,
) {
    // The jobs of a group were all sent before any of them was answered: any order is one
    // they could have had. Appends go first, to be inserted together.
    pending.sort_by_key(|job| !matches!(job, Job::Append { .. }));
    let mut together = true;
    while !pending.is_empty() {
        let mut lease = match connection.lease().await {
            Ok(lease) => lease,
            Err(error) => return fail_all(pending, error),
        };
        let conn = lease.connection();
        let mut outcomes = Vec::with_capacity(pending.len());
        let mut committed = false;
        let mut begun = false;
        if together {
            together = false;
            match insert_together(conn, appends.as_deref_mut(), &pending).await {
                Together::Committed(positions) => {
                    outcomes.extend(positions.into_iter().map(|p| Outcome::Positions(Ok(p))));
                    committed = true;
                }
                Together::Inserted(positions) => {
                    outcomes.extend(positions.into_iter().map(|p| Outcome::Positions(Ok(p))));
                    begun = true;
                }
                Together::Refused { open } => begun = open,
                Together::Skipped => {}
                Together::Failed(error) => {
                    rollback(conn).await;
                    // Another process held the write lock for the whole busy timeout: a
                    // second try would only wait as long again.
                    if error_code(&error) == Some(SQLITE_BUSY) {
                        return fail_all(pending, error);
                    }
                    // Unknown state: run the group one job at a time, which tells which job
                    // the error belongs to.
                    tracing::debug!(%error, "grouped INSERT failed; retrying job by job");
                }
            }
        }
        if !committed {
            if !begun {
                if let Err(error) = execute(conn, "BEGIN IMMEDIATE").await {
                    return fail_all(pending, error);
                }
            }
            let mut failure = None;
            let last = pending.len() - 1;
            for (index, job) in pending.iter().enumerate().skip(outcomes.len()) {
                match apply(conn, job, index == last).await {
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

/// What [`insert_together`] did.
enum Together {
    /// Every job was an append and all are committed; their positions, in job order.
    Committed(Vec<Vec<i64>>),
    /// The first appends (as many as there are position lists) are inserted in the open
    /// transaction; the other jobs are still to run.
    Inserted(Vec<Vec<i64>>),
    /// A constraint refused the grouped `INSERT` (which SQLite undid): every job is still
    /// to run, one at a time, each to learn its own outcome. `open`: the transaction the
    /// `INSERT` ran in is still open (when it ran in a transaction of its own, it is not).
    Refused { open: bool },
    /// Nothing was run: the first job is not a small append.
    Skipped,
    /// An unexpected error; the transaction's state is unknown.
    Failed(sqlx::Error),
}

/// Inserts the events of the leading appends of `pending` with one multi-row `INSERT`: one
/// round trip to the connection's thread, for the common group of small appends. When
/// nothing else is in the group, the `INSERT` is its own transaction (SQLite commits a
/// statement run outside a transaction by itself); otherwise it opens the transaction the
/// rest of the group runs in.
///
/// A group of nothing but appends goes through `appends` when the store has that
/// connection (see its module), and through `conn` when it gives the group back.
///
/// A constraint violation by any of them undoes the whole statement (never an open
/// transaction); the caller then inserts the appends one by one, so that only the refused
/// one fails.
async fn insert_together(
    conn: &mut SqliteConnection,
    appends: Option<&mut AppendConnection>,
    pending: &[Job],
) -> Together {
    let mut batches: Vec<&[PersistableDomainEvent]> = Vec::new();
    let mut rows = 0;
    for job in pending {
        let Job::Append { events, .. } = job else {
            break;
        };
        if rows + events.len() > ROWS_PER_INSERT {
            break;
        }
        rows += events.len();
        batches.push(events);
    }
    if batches.is_empty() {
        return Together::Skipped;
    }
    let all = batches.len() == pending.len();
    // The rows get consecutive positions ending at the last one (see `insert_chunk`).
    let positions = |last: i64| {
        let mut next = last - rows as i64 + 1;
        batches
            .iter()
            .map(|events| {
                let count = events.len() as i64;
                let range = (next..next + count).collect();
                next += count;
                range
            })
            .collect()
    };
    if let (true, Some(appends)) = (all, appends) {
        match appends.insert(batches.iter().flat_map(|events| events.iter()), rows) {
            Inserted::Last(last) => return Together::Committed(positions(last)),
            Inserted::Refused => return Together::Refused { open: false },
            Inserted::GivenBack => {}
        }
    }
    let sql = group_sql(rows, all);
    let mut query = sqlx::query(sql);
    for event in batches.iter().flat_map(|events| events.iter()) {
        query = bind_event(query, event);
    }
    match execute_query(conn, query).await {
        Ok(last) if all => Together::Committed(positions(last)),
        Ok(last) => Together::Inserted(positions(last)),
        Err(error) if constraint_violation(&error).is_some() => Together::Refused { open: !all },
        Err(error) => Together::Failed(error),
    }
}

/// The `INSERT` of `rows` events alone when it is the whole group (`commit`): a statement
/// outside a transaction is committed by SQLite as one, and answers with one result instead
/// of a script's three, each a wake-up of the writer from the connection's thread.
/// Otherwise `BEGIN IMMEDIATE` and the `INSERT` as one script (sqlx runs the statements in
/// order on one round trip, binding the parameters across them, and stops at the first
/// error). Built once per shape.
fn group_sql(rows: usize, commit: bool) -> &'static str {
    if commit {
        return insert_sql(rows);
    }
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        (1..=ROWS_PER_INSERT)
            .map(|rows| format!("BEGIN IMMEDIATE; {}", insert_sql(rows)))
            .collect()
    });
    all[rows.clamp(1, ROWS_PER_INSERT) - 1].as_str()
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

fn bind_event<'q>(query: SqliteQuery<'q>, event: &'q PersistableDomainEvent) -> SqliteQuery<'q> {
    query
        .bind(event.event_id.to_string())
        .bind(event.aggregate_type.as_str())
        .bind(event.aggregate_id.to_string())
        .bind(event.sequence)
        .bind(event.event_type.as_str())
        .bind(event.event_version.as_str())
        .bind(event.payload.as_str())
        .bind(event.metadata.to_string())
        .bind(to_micros(event.timestamp))
        .bind(event.correlation_id.map(|id| id.to_string()))
        .bind(event.causation_id.map(|id| id.to_string()))
}

/// Runs a script; `Ok` carries the connection's last inserted rowid.
fn execute_query<'a>(
    conn: &'a mut SqliteConnection,
    query: SqliteQuery<'a>,
) -> BoxFuture<'a, Result<i64, sqlx::Error>> {
    Box::pin(async move {
        query
            .execute(conn)
            .await
            .map(|done| done.last_insert_rowid())
    })
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

/// The primary result code of a database error.
fn error_code(error: &sqlx::Error) -> Option<i32> {
    let sqlx::Error::Database(database) = error else {
        return None;
    };
    Some(database.code()?.parse::<i32>().ok()? & 0xff)
}

/// The database error of a constraint violation, `None` for any other error.
fn constraint_violation(error: &sqlx::Error) -> Option<&dyn sqlx::error::DatabaseError> {
    let sqlx::Error::Database(database) = error else {
        return None;
    };
    (error_code(error) == Some(SQLITE_CONSTRAINT)).then_some(database.as_ref())
}

/// Applies one job inside the open transaction. `Ok` carries the job's own answer (which may
/// be its refusal, already undone); `Err` is an unexpected error that dooms the transaction.
///
/// `last`: nothing else runs in the transaction before its `COMMIT`.
async fn apply(conn: &mut SqliteConnection, job: &Job, last: bool) -> Result<Outcome, sqlx::Error> {
    match job {
        Job::Append { events, .. } => append(conn, events).await.map(Outcome::Positions),
        Job::Snapshot {
            snapshot, state, ..
        } => save_snapshot(conn, snapshot, state)
            .await
            .map(|()| Outcome::Done(Ok(()))),
        Job::DeleteSnapshot {
            aggregate_type,
            aggregate_id,
            ..
        } => delete_snapshot(conn, aggregate_type, *aggregate_id)
            .await
            .map(|()| Outcome::Done(Ok(()))),
        Job::Views { commit, .. } => commit_views(conn, commit, last).await.map(Outcome::Done),
        Job::Checkpoint { checkpoint, .. } => save_checkpoint(conn, checkpoint)
            .await
            .map(|()| Outcome::Done(Ok(()))),
        Job::Execute { sql, .. } => execute(conn, sql).await.map(|()| Outcome::Done(Ok(()))),
        Job::Write { statement, .. } => write_statement(conn, statement, last)
            .await
            .map(Outcome::Rows),
    }
}

/// The `INSERT` of `rows` events (1 to [`ROWS_PER_INSERT`]), built once.
pub(super) fn insert_sql(rows: usize) -> &'static str {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        let mut all = Vec::with_capacity(ROWS_PER_INSERT);
        let mut sql = String::from(
            "INSERT INTO cqrs_events (event_id, aggregate_type, aggregate_id, sequence, \
             event_type, event_version, payload, metadata, timestamp, correlation_id, \
             causation_id) VALUES ",
        );
        for i in 0..ROWS_PER_INSERT {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?,?,?,?,?,?,?,?,?,?,?)");
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
        query = bind_event(query, event);
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
        aggregate_type: first.aggregate_type.to_string(),
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

async fn delete_snapshot(
    conn: &mut SqliteConnection,
    aggregate_type: &str,
    aggregate_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM cqrs_snapshots WHERE aggregate_type = ? AND aggregate_id = ?")
        .bind(aggregate_type)
        .bind(aggregate_id.to_string())
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

/// SQLite's primary result codes for the mistakes of a statement itself (`SQLITE_ERROR`: a
/// syntax error, a missing table or column; `SQLITE_TOOBIG`, `SQLITE_MISMATCH`,
/// `SQLITE_RANGE`). SQLite undoes the statement and keeps the transaction.
const STATEMENT_MISTAKES: [i32; 4] = [1, 18, 20, 25];

/// Runs an application's write statement under the savepoint `cqrs_write`, with the
/// `SAVEPOINT` and the `RELEASE` in one script with it (one round trip). `Ok` carries the
/// rows it changed, or its own refusal, undone by rolling back to the savepoint: a
/// constraint it broke ([`CQRSError::ConstraintViolation`]) or a mistake of the statement
/// (a [`CQRSError::PersistenceError`]). `Err` is any other error, or a refusal that took the
/// savepoint with it (a conflict clause or trigger that rolls the whole transaction back):
/// the transaction is no longer the group's, and the caller rolls it back as for any job.
///
/// The savepoint, not SQLite's undoing of a failed statement, is what keeps the refusal to
/// this job: an `OR FAIL` conflict clause keeps the rows a statement changed before it
/// failed. With `last` (nothing else runs before the `COMMIT`), the savepoint is left for
/// the `COMMIT` to end.
async fn write_statement(
    conn: &mut SqliteConnection,
    statement: &SqliteWriteStatement,
    last: bool,
) -> Result<Result<u64, CQRSError>, sqlx::Error> {
    use futures_util::TryStreamExt;
    use sqlx::Executor;

    // The statement is one statement (checked before it was queued); the line breaks end a
    // trailing `--` comment.
    let release = if last { "" } else { ";RELEASE cqrs_write" };
    let sql = format!("SAVEPOINT cqrs_write;\n{}\n{release}", statement.body());
    let mut query = sqlx::query(&sql);
    for value in statement.values() {
        query = match value {
            SqliteBindValue::Null => query.bind(None::<i64>),
            SqliteBindValue::Integer(value) => query.bind(*value),
            SqliteBindValue::Real(value) => query.bind(*value),
            SqliteBindValue::Text(value) => query.bind(value.as_str()),
            SqliteBindValue::Blob(value) => query.bind(value.as_slice()),
        };
    }
    let counts: Result<Vec<u64>, sqlx::Error> = conn
        .execute_many(query)
        .map_ok(|done| done.rows_affected())
        .try_collect()
        .await;
    let error = match counts {
        // The first count is the savepoint's: the statement's is the second.
        Ok(counts) => {
            return match counts.get(1) {
                Some(&rows) => Ok(Ok(rows)),
                None => Err(sqlx::Error::Protocol(format!(
                    "a write statement's script reported {} results",
                    counts.len()
                ))),
            };
        }
        Err(error) => error,
    };
    // The statement's own refusal: a broken constraint's message, or `None` for a mistake.
    let constraint = match &error {
        sqlx::Error::Database(database) if error_code(&error) == Some(SQLITE_CONSTRAINT) => {
            Some(database.message().to_owned())
        }
        sqlx::Error::Database(_)
            if error_code(&error).is_some_and(|code| STATEMENT_MISTAKES.contains(&code)) =>
        {
            None
        }
        // A value sqlx refused to bind, before SQLite ran the statement.
        sqlx::Error::Protocol(_) | sqlx::Error::Encode(_) => None,
        _ => return Err(error),
    };
    match execute(conn, "ROLLBACK TO cqrs_write; RELEASE cqrs_write").await {
        Ok(()) => Ok(Err(match constraint {
            Some(message) => CQRSError::ConstraintViolation { message },
            None => CQRSError::persistence(error),
        })),
        // The savepoint went with the transaction: the statement's error is the group's.
        Err(rollback) => {
            tracing::debug!(%rollback, "ROLLBACK TO after a refused write statement");
            Err(error)
        }
    }
}

/// Writes a view batch and its checkpoint under a savepoint; a stale row or a checkpoint
/// that would go backwards undoes the whole batch.
///
/// The batch is first written with one script ([`write_views_together`]): the savepoint,
/// one `INSERT` of the new rows, one `UPDATE` of the others and the checkpoint's upsert, in
/// one round trip to the connection's thread. When a count falls short (a stale row, a
/// checkpoint behind the stored one) or a constraint refuses the `INSERT`, the savepoint is
/// rolled back and the rows are written one by one ([`write_views`]), which names the row
/// that was refused.
///
/// With `last` (nothing else runs before the transaction's `COMMIT`), a batch written by the
/// script leaves its savepoint for the `COMMIT` to end, which saves a round trip.
async fn commit_views(
    conn: &mut SqliteConnection,
    commit: &ViewCommit,
    last: bool,
) -> Result<Result<(), CQRSError>, sqlx::Error> {
    match write_views_together(conn, commit).await {
        Ok(true) => {
            if !last {
                execute(conn, "RELEASE cqrs_views").await?;
            }
            return Ok(Ok(()));
        }
        Ok(false) => execute(conn, "ROLLBACK TO cqrs_views").await?,
        // The script stopped at the refused statement, which SQLite undid; the savepoint
        // is open.
        Err(error) if constraint_violation(&error).is_some() => {
            execute(conn, "ROLLBACK TO cqrs_views").await?;
        }
        Err(error) => return Err(error),
    }
    let refusal = write_views(conn, commit).await?;
    if refusal.is_some() {
        execute(conn, "ROLLBACK TO cqrs_views").await?;
    }
    execute(conn, "RELEASE cqrs_views").await?;
    Ok(match refusal {
        Some(error) => Err(error),
        None => Ok(()),
    })
}

/// Opens the `cqrs_views` savepoint and writes the whole batch with one script; `Ok(true)`
/// when every row and the checkpoint were written, `Ok(false)` when a count fell short. The
/// savepoint stays open either way, for the caller to release or roll back.
///
/// The rows travel as two JSON arrays read with `json_each`, so the script's text depends
/// only on the table and on whether there is a checkpoint: SQLite prepares it once.
async fn write_views_together(
    conn: &mut SqliteConnection,
    commit: &ViewCommit,
) -> Result<bool, sqlx::Error> {
    use futures_util::TryStreamExt;
    use sqlx::Executor;

    let table = &commit.table;
    let now = to_micros(chrono::Utc::now());
    let mut inserts = Vec::new();
    let mut updates = Vec::new();
    for row in &commit.rows {
        if row.expected_version == 0 {
            inserts.push((row.view_id.as_str(), row.payload.as_str()));
        } else {
            updates.push((
                row.view_id.as_str(),
                row.payload.as_str(),
                row.expected_version,
            ));
        }
    }
    let encode = |rows: serde_json::Result<String>| {
        rows.map_err(|error| sqlx::Error::Encode(Box::new(error)))
    };
    let inserts_json = encode(serde_json::to_string(&inserts))?;
    let updates_json = encode(serde_json::to_string(&updates))?;
    let mut sql = format!(
        "SAVEPOINT cqrs_views; \
         INSERT INTO \"{table}\" (view_id, view_version, row_version, payload, updated_at) \
         SELECT value ->> 0, ?1, 1, value ->> 1, ?2 FROM json_each(?3); \
         UPDATE \"{table}\" SET row_version = row_version + 1, payload = v.payload, \
         updated_at = ?2 \
         FROM (SELECT value ->> 0 AS view_id, value ->> 1 AS payload, value ->> 2 AS expected \
               FROM json_each(?4)) AS v \
         WHERE \"{table}\".view_id = v.view_id AND \"{table}\".view_version = ?1 \
           AND \"{table}\".row_version = v.expected"
    );
    if commit.checkpoint.is_some() {
        // Forward only; the same position again only for a batch without rows (a
        // projection that saw nothing it handles).
        sql.push_str(
            "; INSERT INTO cqrs_checkpoints (name, position, updated_at) VALUES (?5, ?6, ?2) \
             ON CONFLICT (name) DO UPDATE SET \
                 position = excluded.position, updated_at = excluded.updated_at \
             WHERE excluded.position > cqrs_checkpoints.position \
                OR (excluded.position = cqrs_checkpoints.position AND ?7)",
        );
    }
    let mut query = sqlx::query(&sql)
        .bind(commit.view_version)
        .bind(now)
        .bind(inserts_json)
        .bind(updates_json);
    if let Some(checkpoint) = &commit.checkpoint {
        query = query
            .bind(checkpoint.name.as_str())
            .bind(checkpoint.position)
            .bind(commit.rows.is_empty());
    }
    let counts: Vec<u64> = conn
        .execute_many(query)
        .map_ok(|done| done.rows_affected())
        .try_collect()
        .await?;
    // The first count is the savepoint's, which SQLite does not reset: skip it.
    let mut expected = vec![inserts.len() as u64, updates.len() as u64];
    if commit.checkpoint.is_some() {
        expected.push(1);
    }
    Ok(counts.get(1..) == Some(expected.as_slice()))
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

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use uuid::Uuid;

    use crate::event::PersistableDomainEvent;
    use crate::store::sqlite::SqliteEventRepository;
    use crate::store::EventRepository;

    pub(in crate::store::sqlite) fn batch(
        id: Uuid,
        from: i64,
        count: i64,
    ) -> Vec<PersistableDomainEvent> {
        (from..from + count)
            .map(|sequence| PersistableDomainEvent {
                event_id: Uuid::new_v4(),
                aggregate_type_id: PersistableDomainEvent::type_id_for("counter", id),
                aggregate_id: id,
                aggregate_type: "counter".into(),
                sequence,
                position: 0,
                event_type: "Added".into(),
                event_version: "1".into(),
                payload: serde_json::json!({ "Added": sequence }).into(),
                metadata: serde_json::Value::Null,
                timestamp: chrono::Utc::now(),
                correlation_id: None,
                causation_id: None,
            })
            .collect()
    }

    /// Appends sent together are inserted by one statement: each must get the positions
    /// its own events were stored at, and a retry or a lost race in the same group must
    /// not disturb its neighbours.
    #[tokio::test]
    async fn grouped_appends_get_the_positions_of_their_own_events() {
        let path = std::env::temp_dir().join(format!("cqrs-writer-{}.sqlite", Uuid::new_v4()));
        let store = SqliteEventRepository::open(&path).await.unwrap();
        let retried = batch(Uuid::new_v4(), 1, 2);
        let first = store.append(retried.clone()).await.unwrap();
        let contested = Uuid::new_v4();
        store.append(batch(contested, 1, 1)).await.unwrap();

        // First a group of clean appends (one grouped INSERT, committed in the same round
        // trip), then one holding a retry and a lost race (the grouped INSERT is refused
        // and the appends run one by one).
        for troubled in [false, true] {
            let mut tasks = Vec::new();
            for i in 0..40_i64 {
                let store = store.clone();
                let events = match i {
                    0 if troubled => retried.clone(),
                    1 if troubled => batch(contested, 1, 1),
                    _ => batch(Uuid::new_v4(), 1, 1 + i % 3),
                };
                tasks.push(tokio::spawn(async move {
                    let result = store.append(events.clone()).await;
                    (events, result)
                }));
            }
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.unwrap());
            }
            let stored: HashMap<Uuid, i64> = store
                .read_all(0, 1000)
                .await
                .unwrap()
                .into_iter()
                .map(|event| (event.event_id, event.position))
                .collect();
            for (i, (events, result)) in outcomes.into_iter().enumerate() {
                match (i, result) {
                    (0, Ok(positions)) if troubled => assert_eq!(positions, first),
                    (1, Err(crate::CQRSError::Conflict { .. })) if troubled => {}
                    (_, Ok(positions)) => {
                        let expected: Vec<i64> =
                            events.iter().map(|e| stored[&e.event_id]).collect();
                        assert_eq!(positions, expected, "append {i}");
                    }
                    (i, other) => panic!("append {i}: {other:?}"),
                }
            }
        }
        let clean: i64 = (0..40).map(|i| 1 + i % 3).sum();
        let troubled: i64 = (2..40).map(|i| 1 + i % 3).sum();
        let total = store.read_all(0, 1000).await.unwrap().len() as i64;
        assert_eq!(total, 3 + clean + troubled);
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// A view batch goes in one script when nothing is stale; a stale row, a taken new
    /// row or a checkpoint that would not move forward sends it to the row-by-row path,
    /// which refuses the whole batch and names the row.
    #[tokio::test]
    async fn view_batches_go_together_unless_refused() {
        use sqlx::Connection;

        use super::{commit_views, execute, write_views_together, ViewCommit, ViewRow};
        use crate::store::Checkpoint;

        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::raw_sql(super::super::schema::MIGRATION)
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::raw_sql(&super::super::schema::view_table_ddl("totals"))
            .execute(&mut conn)
            .await
            .unwrap();
        let row = |id: &str, expected_version: i64, payload: &str| ViewRow {
            view_id: id.to_owned(),
            expected_version,
            payload: payload.to_owned(),
        };
        let commit = |rows: Vec<ViewRow>, position: Option<i64>| ViewCommit {
            table: "totals".to_owned(),
            view_version: 1,
            rows,
            checkpoint: position.map(|position| Checkpoint {
                name: "p".to_owned(),
                position,
            }),
        };
        // Each case: the batch, whether the script writes it, whether it commits.
        let cases = [
            (
                commit(vec![row("a", 0, "1"), row("b\"'", 0, "2")], Some(2)),
                true,
                true,
            ),
            (
                commit(vec![row("a", 1, "3"), row("c", 0, "4")], Some(4)),
                true,
                true,
            ),
            // Stale: "a" is at row version 2.
            (
                commit(vec![row("c", 1, "5"), row("a", 1, "6")], Some(6)),
                false,
                false,
            ),
            // Taken: "c" exists.
            (
                commit(vec![row("d", 0, "7"), row("c", 0, "8")], Some(8)),
                false,
                false,
            ),
            // The checkpoint is behind, then at the stored position with rows.
            (commit(vec![row("d", 0, "9")], Some(3)), false, false),
            (commit(vec![row("d", 0, "9")], Some(4)), false, false),
            // At the stored position without rows; a batch without a checkpoint.
            (commit(Vec::new(), Some(4)), true, true),
            (commit(vec![row("a", 2, "10")], None), true, true),
        ];
        for (index, (batch, together, commits)) in cases.into_iter().enumerate() {
            execute(&mut conn, "BEGIN").await.unwrap();
            let written = write_views_together(&mut conn, &batch).await;
            assert_eq!(written.is_ok_and(|all| all), together, "case {index}");
            execute(&mut conn, "ROLLBACK TO cqrs_views").await.unwrap();
            execute(&mut conn, "RELEASE cqrs_views").await.unwrap();
            let outcome = commit_views(&mut conn, &batch, index % 2 == 0)
                .await
                .unwrap();
            assert_eq!(outcome.is_ok(), commits, "case {index}: {outcome:?}");
            execute(&mut conn, "COMMIT").await.unwrap();
        }
        let rows: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT view_id, row_version, payload FROM totals ORDER BY view_id")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let expected = [("a", 3, "10"), ("b\"'", 1, "2"), ("c", 1, "4")];
        let expected: Vec<(String, i64, String)> = expected
            .iter()
            .map(|(id, version, payload)| (id.to_string(), *version, payload.to_string()))
            .collect();
        assert_eq!(rows, expected);
        let position: i64 = sqlx::query_scalar("SELECT position FROM cqrs_checkpoints")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(position, 4);
    }

    pub(in crate::store::sqlite) fn remove_store_files(path: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    /// An application's write statement sent with appends runs in their group's
    /// transaction and commits with them; a statement refused by a constraint fails alone,
    /// undone to its savepoint even when SQLite would keep part of it (`OR FAIL`), and a
    /// statement that rolls the whole transaction back (`OR ROLLBACK`) fails alone too while
    /// its neighbours run again. Each answers the rows it changed.
    #[tokio::test]
    async fn write_statements_commit_with_the_appends_of_their_group() {
        use futures_util::future::{join_all, BoxFuture, FutureExt};

        use crate::store::sqlite::{InvalidStatement, SqliteWriteStatement};
        use crate::CQRSError;

        /// What a job of a group answered.
        #[derive(Debug)]
        enum Answer {
            Appended(Result<Vec<i64>, CQRSError>),
            Wrote(Result<u64, CQRSError>),
        }

        let path = std::env::temp_dir().join(format!("cqrs-writer-{}.sqlite", Uuid::new_v4()));
        let store = SqliteEventRepository::open(&path).await.unwrap();
        let create = "CREATE TABLE seats (seat TEXT PRIMARY KEY, seen INTEGER NOT NULL)";
        sqlx::query(create).execute(store.pool()).await.unwrap();
        // The statement records how many events its transaction sees: the appends of its
        // own group are inserted before it.
        let reserve = |seat: &str| {
            SqliteWriteStatement::new(
                "INSERT INTO seats (seat, seen) VALUES (?, (SELECT count(*) FROM cqrs_events))",
            )
            .bind(seat)
        };
        let append = |store: &SqliteEventRepository| {
            let store = store.clone();
            let events = batch(Uuid::new_v4(), 1, 1);
            async move { Answer::Appended(store.append(events).await) }.boxed()
        };
        let write = |store: &SqliteEventRepository, statement: SqliteWriteStatement| {
            let store = store.clone();
            async move { Answer::Wrote(store.execute_write(statement).await) }.boxed()
        };
        // On this single-threaded runtime every job of a round is queued before the writer
        // runs again: each round is one group.
        async fn group(jobs: Vec<BoxFuture<'static, Answer>>) -> Vec<Answer> {
            join_all(jobs).await
        }
        let seen = |seat: &'static str| {
            let pool = store.pool().clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT seen FROM seats WHERE seat = ?")
                    .bind(seat)
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
            }
        };

        // Appends and statements together: the statements see all five events.
        let mut jobs: Vec<_> = (0..5).map(|_| append(&store)).collect();
        for seat in ["1A", "1B", "1C"] {
            jobs.push(write(&store, reserve(seat)));
        }
        for answer in group(jobs).await {
            match answer {
                Answer::Appended(Ok(positions)) => assert_eq!(positions.len(), 1),
                Answer::Wrote(Ok(rows)) => assert_eq!(rows, 1),
                other => panic!("{other:?}"),
            }
        }
        for seat in ["1A", "1B", "1C"] {
            assert_eq!(seen(seat).await, Some(5), "seat {seat}");
        }

        // Refusals in a group: a taken seat; two rows of which the second is taken, under
        // `OR FAIL` (which keeps the first row unless the savepoint undoes it). The append,
        // the other statements and their counts are not disturbed.
        let update = SqliteWriteStatement::new("UPDATE seats SET seen = seen + 100 WHERE seat < ?")
            .bind("2");
        let jobs =
            vec![
            write(&store, reserve("1A")),
            append(&store),
            write(
                &store,
                SqliteWriteStatement::new(
                    "INSERT OR FAIL INTO seats (seat, seen) VALUES ('2A', 0), (?, 0)",
                )
                .bind("1B"),
            ),
            write(&store, reserve("2B")),
            write(&store, update),
            write(
                &store,
                SqliteWriteStatement::new(
                    "INSERT INTO seats (seat, seen) VALUES (?1, 0) ON CONFLICT (seat) DO NOTHING",
                )
                .bind("1C"),
            ),
            write(&store, SqliteWriteStatement::new("DELETE FROM seats WHERE seat = 'none'")),
            // Wrong for the schema: refused by SQLite, undone alone.
            write(&store, SqliteWriteStatement::new("DELETE FROM no_such_table")),
        ];
        let answers = group(jobs).await;
        let rows: Vec<String> = answers
            .iter()
            .map(|answer| match answer {
                Answer::Appended(Ok(positions)) => format!("appended {positions:?}"),
                Answer::Wrote(Ok(rows)) => format!("wrote {rows}"),
                Answer::Wrote(Err(CQRSError::ConstraintViolation { message })) => {
                    format!("refused: {message}")
                }
                Answer::Wrote(Err(CQRSError::PersistenceError(error))) => {
                    format!("failed: {error}")
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            rows,
            [
                "refused: UNIQUE constraint failed: seats.seat",
                "appended [6]",
                "refused: UNIQUE constraint failed: seats.seat",
                "wrote 1",
                // 1A, 1B, 1C: the refused statements changed nothing.
                "wrote 3",
                "wrote 0",
                "wrote 0",
                // SQLite's error itself, not a `WriterError`: the transaction went on.
                "failed: error returned from database: (code: 1) no such table: no_such_table",
            ]
        );
        assert_eq!(seen("2A").await, None, "the OR FAIL statement was undone");
        assert_eq!(seen("2B").await, Some(6));
        assert_eq!(seen("1A").await, Some(105));

        // A statement that rolls back the whole transaction fails with the database's error;
        // the others of its group run again in a new transaction and commit once.
        let jobs = vec![
            append(&store),
            write(
                &store,
                SqliteWriteStatement::new(
                    "INSERT OR ROLLBACK INTO seats (seat, seen) VALUES (?, 0)",
                )
                .bind("1A"),
            ),
            write(&store, reserve("3A")),
        ];
        let answers = group(jobs).await;
        assert!(
            matches!(&answers[0], Answer::Appended(Ok(positions)) if positions == &[7]),
            "{answers:?}"
        );
        match &answers[1] {
            Answer::Wrote(Err(CQRSError::PersistenceError(error))) => {
                assert!(error.is::<super::WriterError>(), "{error}");
                assert!(
                    error.to_string().contains("UNIQUE constraint failed"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(answers[2], Answer::Wrote(Ok(1))), "{answers:?}");
        assert_eq!(seen("3A").await, Some(7));
        assert_eq!(seen("1A").await, Some(105));
        assert_eq!(store.read_all(0, 100).await.unwrap().len(), 7);

        // What is not one write statement with matching values never reaches the writer.
        for statement in [
            SqliteWriteStatement::new("COMMIT"),
            SqliteWriteStatement::new("DELETE FROM seats; DROP TABLE seats"),
            SqliteWriteStatement::new("DELETE FROM seats WHERE seat = ?"),
        ] {
            let error = store.execute_write(statement).await.unwrap_err();
            let CQRSError::PersistenceError(source) = &error else {
                panic!("{error:?}");
            };
            assert!(source.is::<InvalidStatement>(), "{error}");
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM seats")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(count, 5, "1A, 1B, 1C, 2B, 3A");
        drop(store);
        remove_store_files(&path);
    }

    /// A group of nothing but view batches is committed without an fsync of its own
    /// (`synchronous=NORMAL`); every other group, an append's, a migration's or one holding
    /// an application's write statement, runs with `FULL` again. A trigger on the view table and a statement after it record the level
    /// each ran at.
    #[tokio::test]
    async fn only_groups_of_views_commit_without_their_own_fsync() {
        use super::{Job, ViewCommit, ViewRow};

        let path = std::env::temp_dir().join(format!("cqrs-writer-{}.sqlite", Uuid::new_v4()));
        let store = SqliteEventRepository::open(&path).await.unwrap();
        let execute = |sql: &str| {
            let store = store.clone();
            let sql = sql.to_owned();
            async move { store.submit(|reply| Job::Execute { sql, reply }).await }
        };
        execute(&super::super::schema::view_table_ddl("totals"))
            .await
            .unwrap();
        execute("CREATE TABLE probe (level INTEGER NOT NULL)")
            .await
            .unwrap();
        execute(
            "CREATE TRIGGER totals_level AFTER INSERT ON totals BEGIN \
             INSERT INTO probe SELECT synchronous FROM pragma_synchronous; END",
        )
        .await
        .unwrap();
        let view = |round: usize| {
            let store = store.clone();
            let commit = ViewCommit {
                table: "totals".to_owned(),
                view_version: 1,
                rows: vec![ViewRow {
                    view_id: format!("v{round}"),
                    expected_version: 0,
                    payload: "{}".to_owned(),
                }],
                checkpoint: None,
            };
            async move { store.submit(|reply| Job::Views { commit, reply }).await }
        };
        let probe = "INSERT INTO probe SELECT synchronous FROM pragma_synchronous";
        for round in 0..2 {
            view(round).await.unwrap();
            execute(probe).await.unwrap();
        }
        // A view batch grouped with an application's write statement (both queued before
        // the writer runs on this single-threaded runtime) commits with the fsync, as the
        // statement needs; a view batch alone after it is relaxed again.
        let statement = crate::store::sqlite::SqliteWriteStatement::new(probe);
        let (viewed, wrote) = tokio::join!(view(2), store.execute_write(statement));
        viewed.unwrap();
        assert_eq!(wrote.unwrap(), 1);
        view(3).await.unwrap();
        let levels: Vec<i64> = sqlx::query_scalar("SELECT level FROM probe ORDER BY rowid")
            .fetch_all(store.pool())
            .await
            .unwrap();
        // NORMAL is 1, FULL 2.
        assert_eq!(levels, [1, 2, 1, 2, 2, 2, 1]);
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
