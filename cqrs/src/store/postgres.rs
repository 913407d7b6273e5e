//! Event, view and snapshot stores on PostgreSQL (feature `postgres`), through sqlx.
//!
//! * [`PostgresEventRepository`]: the [`EventRepository`] (and [`SnapshotRepository`]) on one
//!   schema of a PostgreSQL database. Many processes may share one database: appends are
//!   optimistic (a lost race is a [`CQRSError::Conflict`] raised by a unique constraint) and
//!   [`read_all`](EventRepository::read_all) is gap-safe without serialising writers.
//! * [`PostgresViewRepository`]: views as JSONB rows in the table named by
//!   [`View::TABLE_NAME`](crate::View::TABLE_NAME), with an optimistic row version, committed
//!   together with the projection's checkpoint in one transaction.
//!
//! The schema, and the reasons for each of its constraints, are in
//! `docs/adr/0004-postgres-store.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cqrs::CQRSError> {
//! use cqrs::{EventRepository, PostgresEventRepository};
//!
//! let store = PostgresEventRepository::connect("postgres://postgres@127.0.0.1/test")
//!     .await?
//!     .with_schema("my_app")?;
//! store.migrate().await?;
//! let first_page = store.read_all(0, 100).await?;
//! # let _ = first_page;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::stream::{BoxStream, TryStreamExt};
use serde_json::Value;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::{PersistableDomainEvent, RowNames};
use crate::store::Checkpoint;
use crate::store::{
    validate_batch, CheckpointRepository, EventRepository, Snapshot, SnapshotRepository,
};
use smol_str::SmolStr;

mod copy;
mod dead_letters;
mod payload;
mod schema;
mod view;

use self::copy::CopyPage;
pub use self::dead_letters::PostgresDeadLetters;
pub use self::schema::InvalidIdentifier;
use self::schema::{validate_identifier, Statements, DEFAULT_SCHEMA};
pub use self::view::PostgresViewRepository;

/// The sqlx crate this store is built on, re-exported so that a pool for
/// [`PostgresEventRepository::from_pool`] can be built with the very same version.
pub use ::sqlx;

/// How long [`read_all`](EventRepository::read_all) waits, by default, for the transactions
/// that may still fill a hole in the positions before it returns only the events below it.
pub const DEFAULT_GAP_TIMEOUT: Duration = Duration::from_millis(500);

/// The shortest time, by default, between two `pg_notify`s of one handle: appends that commit
/// in between are announced together by the next one (see
/// [`with_notify_interval`](PostgresEventRepository::with_notify_interval)).
pub const DEFAULT_NOTIFY_INTERVAL: Duration = Duration::from_millis(10);

/// An event store (and snapshot store) in one schema of a PostgreSQL database.
///
/// Cloning gives another handle to the same pool and schema. Create the tables once with
/// [`migrate`](Self::migrate) (idempotent, safe to run from several processes at once).
///
/// * **Append** is one round trip: a single `INSERT` in an implicit transaction, which
///   stores the whole batch or nothing. A lost race hits the
///   unique key `(aggregate_type, aggregate_id, sequence)` and is reported as
///   [`CQRSError::Conflict`]. A retry of a batch whose event ids are already stored with the
///   same aggregate and sequences succeeds and returns the positions stored the first time,
///   so after a dropped connection (an ambiguous [`CQRSError::PersistenceError`]) the same
///   append can simply be sent again.
/// * **`read_all`** never returns a position while a lower one may still commit, and no
///   writer waits for another: see [`read_all`](EventRepository::read_all) below and the ADR.
/// * **Snapshots** live in `cqrs_snapshots`, one row per aggregate, replaced only by a newer
///   sequence (or removed by a delete); it is the [`SnapshotRepository`] too.
/// * **Checkpoints** of other readers (a relay) live in `cqrs_checkpoints`: it is the
///   [`CheckpointRepository`] too.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use cqrs::store::postgres::sqlx::postgres::PgPoolOptions;
/// use cqrs::PostgresEventRepository;
///
/// let pool = PgPoolOptions::new()
///     .max_connections(32)
///     .connect("postgres://postgres@127.0.0.1/test")
///     .await?;
/// let store = PostgresEventRepository::from_pool(pool).with_schema("bank")?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresEventRepository {
    inner: Arc<Inner>,
}

/// What a handle was configured with; a builder method copies it into a new handle.
#[derive(Clone)]
struct Settings {
    schema: String,
    gap_timeout: Duration,
    /// Whether appends announce themselves with `pg_notify` (after their commit).
    notify: bool,
    /// The shortest time between two notifications.
    notify_interval: Duration,
}

struct Inner {
    pool: PgPool,
    settings: Settings,
    sql: Statements,
    /// Every position at or below this is final: stored and visible, or never to be stored.
    settled: AtomicI64,
    /// The highest position this handle knows to be committed.
    position: watch::Sender<i64>,
    /// View tables already created through this handle.
    view_tables: Mutex<HashSet<String>>,
    /// The `LISTEN`/`NOTIFY` channel of this schema.
    channel: String,
    /// Wakes the notifier task after an append.
    wake: Arc<Notify>,
    notifier_started: AtomicBool,
    listener_started: AtomicBool,
    /// Set to true when the last handle is dropped: the background tasks end.
    shutdown: watch::Sender<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl std::fmt::Debug for PostgresEventRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEventRepository")
            .field("schema", &self.inner.settings.schema)
            .field("gap_timeout", &self.inner.settings.gap_timeout)
            .field("notify", &self.inner.settings.notify)
            .field("notify_interval", &self.inner.settings.notify_interval)
            .field("settled", &self.inner.settled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PostgresEventRepository {
    /// Connects a pool to `url`; the tables live in the schema `public` unless
    /// [`with_schema`](Self::with_schema) says otherwise.
    ///
    /// The pool has sqlx's default options but one: a connection taken from the pool is
    /// pinged first only when it sat idle for [`IDLE_PING_AFTER`] or longer (sqlx pings
    /// before every use by default, a round trip per statement). A connection the server
    /// closed within that second fails its statement with
    /// [`CQRSError::PersistenceError`], which a retry of the command gets past. Use
    /// [`from_pool`](Self::from_pool) to choose otherwise.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the URL is invalid or the server unreachable.
    pub async fn connect(url: &str) -> Result<Self, CQRSError> {
        let pool = PgPoolOptions::new()
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_PING_AFTER {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .connect(url)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(Self::from_pool(pool))
    }

    /// A store on an existing pool (to choose its size and timeouts), in the schema `public`.
    pub fn from_pool(pool: PgPool) -> Self {
        Self::build(
            pool,
            Settings {
                schema: DEFAULT_SCHEMA.to_owned(),
                gap_timeout: DEFAULT_GAP_TIMEOUT,
                notify: true,
                notify_interval: DEFAULT_NOTIFY_INTERVAL,
            },
        )
    }

    fn build(pool: PgPool, settings: Settings) -> Self {
        PostgresEventRepository {
            inner: Arc::new(Inner {
                pool,
                sql: Statements::new(&settings.schema),
                channel: channel_name(&settings.schema),
                settings,
                settled: AtomicI64::new(0),
                position: watch::channel(0).0,
                view_tables: Mutex::new(HashSet::new()),
                wake: Arc::new(Notify::new()),
                notifier_started: AtomicBool::new(false),
                listener_started: AtomicBool::new(false),
                shutdown: watch::channel(false).0,
            }),
        }
    }

    /// The same pool, with every table in the schema `schema` (created by
    /// [`migrate`](Self::migrate)).
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] carrying an [`InvalidIdentifier`] when `schema` is not
    /// a plain identifier (1 to 63 ASCII letters, digits and `_`, not starting with a digit
    /// or `pg_`). It is never spliced into SQL otherwise.
    pub fn with_schema(self, schema: &str) -> Result<Self, CQRSError> {
        validate_identifier("schema", schema)?;
        Ok(self.rebuild(|settings| settings.schema = schema.to_owned()))
    }

    /// A new handle on the same pool with changed settings (and fresh state: watermark,
    /// background tasks).
    fn rebuild(&self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.inner.settings.clone();
        change(&mut settings);
        Self::build(self.inner.pool.clone(), settings)
    }

    /// How long [`read_all`](EventRepository::read_all) may wait for in-flight transactions
    /// when it finds a hole in the positions (default [`DEFAULT_GAP_TIMEOUT`]). After that it
    /// returns the events below the hole (possibly none) and the caller reads again later.
    #[must_use]
    pub fn with_gap_timeout(self, timeout: Duration) -> Self {
        self.rebuild(|settings| settings.gap_timeout = timeout)
    }

    /// Whether appends announce new positions to other processes with `pg_notify` (default
    /// true). The notification is sent after the append commits, from a background task
    /// that coalesces bursts into one `NOTIFY` (at most one per
    /// [`with_notify_interval`](Self::with_notify_interval)), never inside the append
    /// transaction (PostgreSQL serialises the commits of notifying transactions). Handles in
    /// this process learn of this handle's appends without it.
    #[must_use]
    pub fn with_notifications(self, notify: bool) -> Self {
        self.rebuild(|settings| settings.notify = notify)
    }

    /// The shortest time between two notifications of this handle (default
    /// [`DEFAULT_NOTIFY_INTERVAL`], 10 ms).
    ///
    /// An append after a quiet spell is announced at once; during a burst, the appends
    /// that commit within `interval` of the previous notification are announced together
    /// by one `pg_notify` when the interval ends. So another process hears of a committed
    /// append at most `interval` plus one round trip after its commit (while the database
    /// is reachable), and a busy writer sends at most one notification per interval instead
    /// of one per commit. Each notification is a small transaction of its own; it commits
    /// with `synchronous_commit = off` (a lost notification only delays listeners, which
    /// poll as a fallback), so it never waits for a WAL flush. `Duration::ZERO` sends one
    /// notification after another, as fast as they go.
    #[must_use]
    pub fn with_notify_interval(self, interval: Duration) -> Self {
        self.rebuild(|settings| settings.notify_interval = interval)
    }

    /// The `LISTEN`/`NOTIFY` channel on which appends to this schema are announced; the
    /// payload is the highest position the appending process knows to be committed.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.inner.settings.schema
    }

    /// A view store for `V` in this store's schema, through its pool (see
    /// [`PostgresViewRepository`]).
    pub fn views<V>(&self) -> PostgresViewRepository<V> {
        PostgresViewRepository::new(self)
    }

    /// Creates the schema and the tables if they do not exist.
    ///
    /// Idempotent, and safe when several processes migrate at once: it runs in one
    /// transaction under an advisory lock keyed by the schema name.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the server refuses (e.g. no `CREATE` privilege).
    pub async fn migrate(&self) -> Result<(), CQRSError> {
        // One simple-query message: PostgreSQL runs all its statements in one implicit
        // transaction, so the advisory lock is held until every object exists.
        sqlx::raw_sql(&self.inner.sql.migrate)
            .execute(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(())
    }

    fn statements(&self) -> &Statements {
        &self.inner.sql
    }

    fn view_tables(&self) -> MutexGuard<'_, HashSet<String>> {
        self.inner
            .view_tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An append hit a unique key: tell an idempotent retry (success, with the stored
    /// positions), a reused id and a lost race apart.
    async fn explain_unique_violation(
        &self,
        events: &[StoredIdentity],
        expected: i64,
    ) -> Result<Vec<i64>, CQRSError> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let rows = sqlx::query(&self.inner.sql.find_ids)
            .bind(&ids)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        let mut stored: HashMap<Uuid, StoredIdentity> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let found = StoredIdentity {
                event_id: row.try_get(0).map_err(CQRSError::persistence)?,
                aggregate_type: SmolStr::new(
                    row.try_get::<&str, _>(1).map_err(CQRSError::persistence)?,
                ),
                aggregate_id: row.try_get(2).map_err(CQRSError::persistence)?,
                sequence: row.try_get(3).map_err(CQRSError::persistence)?,
                position: row.try_get(4).map_err(CQRSError::persistence)?,
            };
            stored.insert(found.event_id, found);
        }
        let first = &events[0];
        if stored.contains_key(&first.event_id) {
            let mut positions = Vec::with_capacity(events.len());
            for event in events {
                match stored.get(&event.event_id) {
                    Some(row)
                        if row.aggregate_type == event.aggregate_type
                            && row.aggregate_id == event.aggregate_id
                            && row.sequence == event.sequence
                            && positions.last().is_none_or(|&p| p < row.position) =>
                    {
                        positions.push(row.position);
                    }
                    _ => {
                        return Err(CQRSError::DuplicateEventId {
                            event_id: event.event_id,
                        })
                    }
                }
            }
            tracing::debug!(
                aggregate_type = %first.aggregate_type,
                aggregate_id = %first.aggregate_id,
                "append retried after it had committed; returning the stored positions"
            );
            return Ok(positions);
        }
        if let Some(dup) = events.iter().find(|e| stored.contains_key(&e.event_id)) {
            return Err(CQRSError::DuplicateEventId {
                event_id: dup.event_id,
            });
        }
        Err(CQRSError::Conflict {
            aggregate_type: first.aggregate_type.to_string(),
            aggregate_id: first.aggregate_id,
            expected_sequence: expected,
        })
    }

    async fn fetch_after(&self, after_position: i64, limit: i64) -> Result<CopyPage, CQRSError> {
        let sql = self.inner.sql.read_all_copy(after_position, limit);
        copy::read_page(
            &self.inner.pool,
            &sql,
            usize::try_from(limit).unwrap_or(usize::MAX),
        )
        .await
    }

    /// The result of a `read_all` page: its events, or [`CQRSError::DamagedRow`] when a
    /// damaged row is its first row (see [`EventRepository::read_all`]). Every position in
    /// it is committed, the damaged row's too, which tells a reader whose page came back
    /// short that more follows.
    fn finish_page(&self, page: CopyPage) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        if let Some(last) = page_positions(&page).last() {
            self.note_committed(last);
        }
        match page.damage {
            Some(damage) if page.events.is_empty() => Err(CQRSError::from(damage)),
            _ => Ok(page.events),
        }
    }

    /// Waits until every transaction in progress now has ended, for at most the gap timeout.
    /// Returns false on timeout.
    async fn wait_for_in_flight(&self) -> Result<bool, CQRSError> {
        let mut in_flight: Vec<String> =
            sqlx::query_scalar("SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) AS x")
                .fetch_all(&self.inner.pool)
                .await
                .map_err(CQRSError::persistence)?;
        let deadline = Instant::now() + self.inner.settings.gap_timeout;
        let mut pause = Duration::from_micros(250);
        while !in_flight.is_empty() {
            if Instant::now() >= deadline {
                tracing::debug!(
                    schema = %self.inner.settings.schema,
                    in_flight = in_flight.len(),
                    "read_all: transactions still in flight after the gap timeout"
                );
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
            in_flight = sqlx::query_scalar(
                "SELECT x FROM unnest($1::text[]) AS t(x) \
                 WHERE pg_xact_status(x::xid8) = 'in progress'",
            )
            .bind(&in_flight)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        }
        Ok(true)
    }

    fn note_committed(&self, position: i64) {
        self.inner.note_committed(position);
    }

    /// Wakes the notifier task (starting it on first use) so other processes hear of an
    /// append.
    fn announce(&self) {
        if !self.inner.settings.notify {
            return;
        }
        if !self.inner.notifier_started.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(notifier(Notifier {
                        pool: self.inner.pool.clone(),
                        channel: self.inner.channel.clone(),
                        interval: self.inner.settings.notify_interval,
                        position: self.inner.position.subscribe(),
                        wake: Arc::clone(&self.inner.wake),
                        shutdown: self.inner.shutdown.subscribe(),
                    }));
                }
                Err(_) => {
                    self.inner.notifier_started.store(false, Ordering::Release);
                    return;
                }
            }
        }
        self.inner.wake.notify_one();
    }

    /// Starts the `LISTEN` task once, if there is a Tokio runtime.
    fn start_listener(&self) {
        if self.inner.listener_started.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(listener(
                    Arc::downgrade(&self.inner),
                    self.inner.pool.clone(),
                    self.inner.channel.clone(),
                    self.inner.shutdown.subscribe(),
                ));
            }
            Err(_) => self.inner.listener_started.store(false, Ordering::Release),
        }
    }
}

impl Inner {
    fn note_committed(&self, position: i64) {
        self.position.send_if_modified(|known| {
            if position > *known {
                *known = position;
                true
            } else {
                false
            }
        });
    }
}

/// The channel name for a schema: `cqrs_<schema>`, or, when that would exceed PostgreSQL's
/// 63-byte identifier limit, a prefix of it with a stable hash of the whole name.
fn channel_name(schema: &str) -> String {
    let full = format!("cqrs_{schema}");
    if full.len() <= 63 {
        return full;
    }
    // FNV-1a: stable across processes and Rust versions, unlike `DefaultHasher`.
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{}_{hash:016x}", &full[..46])
}

/// What the notifier task needs; it holds no strong reference to the handle.
struct Notifier {
    pool: PgPool,
    channel: String,
    interval: Duration,
    /// The handle's highest committed position.
    position: watch::Receiver<i64>,
    wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
}

/// The notification: one statement, its own transaction, committed without waiting for the
/// WAL flush. (`pg_notify` gives the transaction an id, so with the server's default
/// `synchronous_commit` it would wait for a disk flush holding PostgreSQL's database-wide
/// notify lock.) `set_config(.., true)` is local to this transaction: the pooled connection
/// keeps its settings.
const NOTIFY_SQL: &str = "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)";

/// Sends `pg_notify(channel, position)` after appends, at most one per interval: appends that
/// commit while a notification is due or being sent are covered by the next one. After the
/// last handle is dropped it sends what is still due, then ends.
async fn notifier(mut task: Notifier) {
    let mut last_sent: Option<(tokio::time::Instant, i64)> = None;
    loop {
        let mut closing = tokio::select! {
            () = task.wake.notified() => false,
            _ = task.shutdown.wait_for(|closed| *closed) => true,
        };
        if let (Some((sent_at, _)), false) = (last_sent, closing) {
            tokio::select! {
                () = tokio::time::sleep_until(sent_at + task.interval) => {}
                _ = task.shutdown.wait_for(|closed| *closed) => closing = true,
            }
        }
        // Read after the pause: it covers every append that committed during it.
        let position = *task.position.borrow_and_update();
        if last_sent.is_none_or(|(_, sent)| position > sent) {
            let sent = sqlx::query(NOTIFY_SQL)
                .bind(&task.channel)
                .bind(position.to_string())
                .execute(&task.pool)
                .await;
            match sent {
                Ok(_) => last_sent = Some((tokio::time::Instant::now(), position)),
                // Listeners fall back to polling; the next append notifies again.
                Err(error) => {
                    tracing::debug!(channel = %task.channel, %error, "could not send the append notification");
                }
            }
        }
        if closing {
            return;
        }
    }
}

/// Listens on the schema's channel and feeds the positions announced by other processes
/// into the handle's watch channel, until the last handle is dropped.
async fn listener(
    inner: Weak<Inner>,
    pool: PgPool,
    channel: String,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            connected = connected => connected,
            _ = shutdown.wait_for(|closed| *closed) => return,
        };
        match &mut listener {
            Ok(listener) => loop {
                let received = tokio::select! {
                    received = listener.try_recv() => received,
                    _ = shutdown.wait_for(|closed| *closed) => return,
                };
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                match received {
                    Ok(Some(notification)) => {
                        if let Ok(position) = notification.payload().parse::<i64>() {
                            strong.note_committed(position);
                        }
                    }
                    // Reconnected: notifications may have been lost, wake the readers.
                    Ok(None) => strong.position.send_modify(|_| {}),
                    Err(error) => {
                        tracing::debug!(%channel, %error, "LISTEN connection failed; retrying");
                        break;
                    }
                }
            },
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                tracing::debug!(%channel, %error, "could not LISTEN; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|closed| *closed) => return,
        }
    }
}

/// How long a connection of a pool made by [`PostgresEventRepository::connect`] may sit idle
/// before it is pinged when taken from the pool.
pub const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// SQLSTATEs of an append refused for what the events hold, which no retry gets past:
/// `untranslatable_character` (a `\u0000` in `jsonb`), `character_not_in_repertoire` (a NUL
/// in `text`), and `invalid_text_representation` (a payload that is not JSON).
const UNSTORABLE: [&str; 3] = ["22P05", "22021", "22P02"];

/// The identity of an event, as sent in an append or found stored.
struct StoredIdentity {
    event_id: Uuid,
    aggregate_type: SmolStr,
    aggregate_id: Uuid,
    sequence: i64,
    position: i64,
}

/// Decodes rows of `cqrs_events` as they arrive, while the server is still sending the rest
/// (`fetch_all` would buffer every row first, then decode).
async fn collect_events(
    mut rows: BoxStream<'_, Result<PgRow, sqlx::Error>>,
    expected: usize,
) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
    let mut events = Vec::with_capacity(expected.min(1024));
    let mut names = RowNames::default();
    while let Some(row) = rows.try_next().await.map_err(CQRSError::persistence)? {
        events.push(decode_event(&row, &mut names)?);
    }
    Ok(events)
}

/// Reads one row of `cqrs_events` (columns in `EVENT_COLUMNS` order).
fn decode_event(row: &PgRow, names: &mut RowNames) -> Result<PersistableDomainEvent, CQRSError> {
    let position: i64 = row.try_get(0).map_err(CQRSError::persistence)?;
    let field = |e: sqlx::Error| {
        CQRSError::persistence(format!("row at position {position} of cqrs_events: {e}"))
    };
    let aggregate_type: &str = row.try_get(2).map_err(field)?;
    let aggregate_id: Uuid = row.try_get(3).map_err(field)?;
    let (aggregate_type, aggregate_type_id) = names.aggregate(aggregate_type, aggregate_id);
    Ok(PersistableDomainEvent {
        event_id: row.try_get(1).map_err(field)?,
        aggregate_type_id,
        aggregate_id,
        aggregate_type,
        sequence: row.try_get(4).map_err(field)?,
        position,
        event_type: names.event_type(row.try_get::<&str, _>(5).map_err(field)?),
        event_version: names.event_version(row.try_get::<&str, _>(6).map_err(field)?),
        payload: row.try_get(7).map_err(field)?,
        metadata: row.try_get(8).map_err(field)?,
        timestamp: row.try_get(9).map_err(field)?,
    })
}

/// The positions of a page's rows: its events, then the damaged row that ended it.
fn page_positions(page: &CopyPage) -> impl Iterator<Item = i64> + '_ {
    page.events
        .iter()
        .map(|event| event.position)
        .chain(page.damage.as_ref().map(|damage| damage.position))
}

/// The index (in [`page_positions`]) of the first row that follows a hole which is not
/// known to be final, if any.
///
/// The positions `after + 1 ..` should follow one another; a missing one at or below
/// `settled` is a position that will never be stored (its transaction rolled back).
fn first_open_hole(after: i64, page: &CopyPage, settled: i64) -> Option<usize> {
    let mut expected = after + 1;
    for (i, position) in page_positions(page).enumerate() {
        if position != expected && position - 1 > settled {
            return Some(i);
        }
        expected = position + 1;
    }
    None
}

/// The rows of `page` before index `hole` (of [`page_positions`]): the damaged row, last
/// of the positions, is always after it.
fn truncated(mut page: CopyPage, hole: usize) -> CopyPage {
    page.events.truncate(hole);
    page.damage = None;
    page
}

#[async_trait]
impl EventRepository for PostgresEventRepository {
    async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        let expected = validate_batch(&events)?;
        let n = events.len();
        let aggregate_type = events[0].aggregate_type.clone();
        let aggregate_id = events[0].aggregate_id;
        let result = if let [event] = events.as_slice() {
            sqlx::query(&self.inner.sql.append_one)
                .bind(event.event_id)
                .bind(aggregate_type.as_str())
                .bind(aggregate_id)
                .bind(event.sequence)
                .bind(event.event_type.as_str())
                .bind(event.event_version.as_str())
                .bind(&event.payload)
                .bind(&event.metadata)
                .bind(event.timestamp)
                .bind(expected)
                .fetch_all(&self.inner.pool)
                .await
        } else {
            let mut sequences = Vec::with_capacity(n);
            let mut event_ids = Vec::with_capacity(n);
            let mut event_types = Vec::with_capacity(n);
            let mut event_versions = Vec::with_capacity(n);
            let mut payloads = Vec::with_capacity(n);
            let mut metadata = Vec::with_capacity(n);
            let mut timestamps: Vec<DateTime<Utc>> = Vec::with_capacity(n);
            for event in &events {
                event_ids.push(event.event_id);
                sequences.push(event.sequence);
                event_types.push(event.event_type.as_str());
                event_versions.push(event.event_version.as_str());
                payloads.push(&event.payload);
                metadata.push(&event.metadata);
                timestamps.push(event.timestamp);
            }
            sqlx::query(&self.inner.sql.append)
                .bind(&event_ids)
                .bind(aggregate_type.as_str())
                .bind(aggregate_id)
                .bind(&sequences)
                .bind(&event_types)
                .bind(&event_versions)
                .bind(&payloads)
                .bind(&metadata)
                .bind(&timestamps)
                .bind(expected)
                .fetch_all(&self.inner.pool)
                .await
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
                // Only this rare path needs the events' identities.
                let identities: Vec<StoredIdentity> = events
                    .iter()
                    .map(|event| StoredIdentity {
                        event_id: event.event_id,
                        aggregate_type: event.aggregate_type.clone(),
                        aggregate_id: event.aggregate_id,
                        sequence: event.sequence,
                        position: 0,
                    })
                    .collect();
                return self.explain_unique_violation(&identities, expected).await;
            }
            Err(sqlx::Error::Database(db))
                if db
                    .code()
                    .as_deref()
                    .is_some_and(|code| UNSTORABLE.contains(&code)) =>
            {
                return Err(CQRSError::Unstorable {
                    aggregate_type: aggregate_type.to_string(),
                    aggregate_id,
                    first_sequence: expected + 1,
                    reason: format!(
                        "PostgreSQL refused the data (SQLSTATE {}): {}",
                        db.code().unwrap_or_default(),
                        db.message()
                    ),
                });
            }
            Err(other) => return Err(CQRSError::persistence(other)),
        };
        let mut by_sequence = Vec::with_capacity(rows.len());
        for row in &rows {
            let sequence: i64 = row.try_get(0).map_err(CQRSError::persistence)?;
            let position: i64 = row.try_get(1).map_err(CQRSError::persistence)?;
            by_sequence.push((sequence, position));
        }
        by_sequence.sort_unstable();
        if by_sequence.is_empty() {
            // The statement inserts nothing only when sequence `expected` is not stored.
            return Err(CQRSError::InvalidAppend(format!(
                "first sequence {} skips ahead of the stored history of {aggregate_type} {aggregate_id}",
                expected + 1
            )));
        }
        if by_sequence.len() != n {
            return Err(CQRSError::persistence(format!(
                "the append stored {} of {n} events",
                by_sequence.len()
            )));
        }
        let positions: Vec<i64> = by_sequence.into_iter().map(|(_, p)| p).collect();
        if let Some(&last) = positions.last() {
            self.note_committed(last);
            self.announce();
        }
        Ok(positions)
    }

    async fn load_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let rows = sqlx::query(&self.inner.sql.load_events)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(after_sequence)
            .fetch(&self.inner.pool);
        collect_events(rows, 16).await
    }

    async fn event_sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<i64, CQRSError> {
        sqlx::query_scalar(&self.inner.sql.event_sequence)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)
    }

    /// Up to `limit` events after `after_position`, in position order, gap-safe.
    ///
    /// Positions come from a sequence, which is not commit-ordered, so a hole below a
    /// visible position may belong to a transaction still in flight. Every append assigns
    /// its transaction id before it draws a position, so such a transaction was already
    /// running when this read began: the store waits (up to the gap timeout) until every
    /// transaction in progress at that moment has ended, then reads again. A hole still
    /// there belongs to a rolled-back append and is skipped from then on. If the wait times
    /// out, only the events below the first open hole are returned.
    async fn read_all(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let page = self.fetch_after(after_position, limit).await?;
        let settled = self.inner.settled.load(Ordering::Acquire);
        let Some(hole) = first_open_hole(after_position, &page, settled) else {
            return self.finish_page(page);
        };
        // A hole below a visible position: its transaction got its id before this read.
        let highest_seen = page_positions(&page).last().unwrap_or(after_position);
        if !self.wait_for_in_flight().await? {
            return self.finish_page(truncated(page, hole));
        }
        // Every transaction that drew a position below `highest_seen` has ended.
        self.inner.settled.fetch_max(highest_seen, Ordering::AcqRel);
        let settled = self.inner.settled.load(Ordering::Acquire);
        let mut page = self.fetch_after(after_position, limit).await?;
        if let Some(hole) = first_open_hole(after_position, &page, settled) {
            page = truncated(page, hole);
        }
        self.finish_page(page)
    }

    /// A receiver of the highest position known to be committed: by this handle's own
    /// appends and reads at once, and by other processes' appends through `LISTEN` on
    /// [`channel`](PostgresEventRepository::channel) (a background task, started by the
    /// first call inside a Tokio runtime; after a lost connection it reconnects and wakes
    /// the receivers, since notifications may have been missed). The `LISTEN` task holds
    /// one connection of the pool. A value is a hint to read, not a promise that `read_all`
    /// returns up to it.
    fn subscribe(&self) -> Option<watch::Receiver<i64>> {
        self.start_listener();
        Some(self.inner.position.subscribe())
    }
}

#[async_trait]
impl SnapshotRepository for PostgresEventRepository {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<Snapshot>, CQRSError> {
        let row = sqlx::query(&self.inner.sql.load_snapshot)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let sequence: i64 = row.try_get(0).map_err(CQRSError::persistence)?;
        let state: Value = row.try_get(1).map_err(CQRSError::persistence)?;
        let timestamp: DateTime<Utc> = row.try_get(2).map_err(CQRSError::persistence)?;
        Ok(Some(Snapshot {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id,
            sequence,
            state,
            timestamp,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), CQRSError> {
        sqlx::query(&self.inner.sql.save_snapshot)
            .bind(&snapshot.aggregate_type)
            .bind(snapshot.aggregate_id)
            .bind(snapshot.sequence)
            .bind(&snapshot.state)
            .bind(snapshot.timestamp)
            .execute(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(())
    }

    async fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<(), CQRSError> {
        sqlx::query(&self.inner.sql.delete_snapshot)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .execute(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(())
    }
}

/// Checkpoints of readers that are not views (an outbox relay), in `cqrs_checkpoints`, the
/// table where [`PostgresViewRepository`] commits projection checkpoints too.
#[async_trait]
impl CheckpointRepository for PostgresEventRepository {
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        let position: Option<i64> = sqlx::query_scalar(&self.inner.sql.load_checkpoint)
            .bind(name)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(position.unwrap_or(0))
    }

    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        sqlx::query(&self.inner.sql.save_checkpoint)
            .bind(&checkpoint.name)
            .bind(checkpoint.position)
            .execute(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(())
    }
}
