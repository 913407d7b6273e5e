//! The PostgreSQL store (feature `postgres`): the handle and its settings here; appends,
//! `read_all` paging, notifications, row decoding, snapshots, checkpoints, views and dead
//! letters in the files beside it. What it guarantees is documented on
//! [`PostgresEventRepository`]; the schema, and the reasons for each of its constraints, are
//! in `docs/adr/0004-postgres-store.md`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::EventRepository;

mod append;
mod checkpoints;
mod copy;
mod dead_letters;
mod group;
mod notify;
mod payload;
mod process;
mod read;
mod rows;
mod schema;
mod snapshots;
mod view;

pub use self::dead_letters::PostgresDeadLetters;
use self::group::Groups;
use self::notify::channel_name;
pub use self::process::PostgresProcessStore;
use self::rows::collect_events;
pub use self::schema::InvalidIdentifier;
use self::schema::{validate_identifier, Statements, DEFAULT_SCHEMA};
pub use self::view::PostgresViewRepository;

/// An event store (and snapshot store) in one schema of a PostgreSQL database.
///
/// Cloning gives another handle to the same pool and schema. Create the tables once with
/// [`migrate`](Self::migrate) (idempotent, safe to run from several processes at once).
///
/// * **Append** is one round trip: a single `INSERT` in an implicit transaction, which
///   stores the whole batch or nothing. Appends that arrive together while another append
///   of the handle is in flight are written together, by one statement in one transaction,
///   each with its own outcome (group commit, see
///   [`with_group_commit`](Self::with_group_commit)). A lost race hits the
///   unique key `(aggregate_type, aggregate_id, sequence)` and is reported as
///   [`CQRSError::Conflict`]. A retry of a batch whose event ids are already stored with the
///   same aggregate and sequences succeeds and returns the positions stored the first time,
///   so after a dropped connection (an ambiguous [`CQRSError::PersistenceError`]) the same
///   append can simply be sent again.
/// * **`read_all`** never returns a position while a lower one may still commit, and no
///   writer waits for another: see [`read_all`](EventRepository::read_all) below and the ADR.
/// * **Snapshots** live in `cqrs_snapshots`, one row per aggregate, replaced only by a newer
///   sequence (or removed by a delete); it is the [`SnapshotRepository`](crate::SnapshotRepository) too.
/// * **Checkpoints** of other readers (a relay) live in `cqrs_checkpoints`: it is the
///   [`CheckpointRepository`](crate::CheckpointRepository) too.
/// * **Correlation and causation** are `uuid` columns of their own (`NULL` when the event
///   has none), and [`events_caused_by`](EventRepository::events_caused_by) is one range
///   of a partial index on the causation id and the aggregate. An existing table gains the
///   columns on [`migrate`](Self::migrate); its old events read back with `None`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use cqrs::sqlx::postgres::PgPoolOptions;
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
    /// Whether concurrent appends share statements and commits.
    group_commit: bool,
}

struct Inner {
    pool: PgPool,
    settings: Settings,
    sql: Statements,
    /// Every position at or below this is final: stored and visible, or never to be stored.
    settled: AtomicI64,
    /// The highest position this handle knows to be committed.
    position: watch::Sender<i64>,
    /// The appends waiting for a group, and the group commit's counters.
    groups: Groups,
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

/// The counters of a handle's group commit (see
/// [`PostgresEventRepository::group_commit_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitCounts {
    /// Appends committed by a statement that carried other appends too.
    pub grouped_appends: u64,
    /// Statements sent that carried two or more appends.
    pub group_statements: u64,
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
            .field("group_commit", &self.inner.settings.group_commit)
            .field("settled", &self.inner.settled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PostgresEventRepository {
    /// How long [`read_all`](EventRepository::read_all) waits, by default, for the transactions
    /// that may still fill a hole in the positions before it returns only the events below it.
    pub const DEFAULT_GAP_TIMEOUT: Duration = Duration::from_millis(500);

    /// The shortest time, by default, between two `pg_notify`s of one handle: appends that commit
    /// in between are announced together by the next one (see
    /// [`with_notify_interval`](Self::with_notify_interval)).
    pub const DEFAULT_NOTIFY_INTERVAL: Duration = Duration::from_millis(10);

    /// How long a connection of a pool made by [`connect`](Self::connect) may sit idle
    /// before it is pinged when taken from the pool.
    pub const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

    /// Connects a pool to `url`; the tables live in the schema `public` unless
    /// [`with_schema`](Self::with_schema) says otherwise.
    ///
    /// The pool has sqlx's default options but one: a connection taken from the pool is
    /// pinged first only when it sat idle for [`IDLE_PING_AFTER`](Self::IDLE_PING_AFTER) or longer (sqlx pings
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
                    if meta.idle_for >= Self::IDLE_PING_AFTER {
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
                gap_timeout: Self::DEFAULT_GAP_TIMEOUT,
                notify: true,
                notify_interval: Self::DEFAULT_NOTIFY_INTERVAL,
                group_commit: true,
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
                groups: Groups::default(),
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
    /// when it finds a hole in the positions (default [`DEFAULT_GAP_TIMEOUT`](Self::DEFAULT_GAP_TIMEOUT)). After that it
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
    /// [`DEFAULT_NOTIFY_INTERVAL`](Self::DEFAULT_NOTIFY_INTERVAL), 10 ms).
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

    /// Whether appends of this handle that arrive while another is in flight are written
    /// together (default true).
    ///
    /// With it, an append that finds no other append of the handle in flight is sent at
    /// once, alone, exactly as without it. An append that finds one in flight opens a group
    /// (or joins the one opened), lets the runtime run twice so that the callers answered by
    /// the same commit can join, and the group is written by one `INSERT` in one
    /// transaction: one round trip and one commit for all of them. Groups do not wait for
    /// one another's commits. Each append keeps its own outcome: an append whose
    /// expected sequence is stale, that was already stored (a retry), or that skips ahead is
    /// left out of the shared statement and then sent alone, which answers it as usual
    /// ([`CQRSError::Conflict`], its stored positions, [`CQRSError::InvalidAppend`]); when
    /// the shared statement fails as a whole (a race with another process's transaction
    /// still in flight, a reused event id, a lost connection) every append of the group is
    /// sent alone. Positions stay gap-safe and notifications are sent after the commit. The
    /// measurements behind the default are in `docs/adr/0004-postgres-store.md`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), cqrs::CQRSError> {
    /// let store = cqrs::PostgresEventRepository::connect("postgres://postgres@127.0.0.1/test")
    ///     .await?
    ///     .with_group_commit(false); // every append in its own statement and commit
    /// # drop(store);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_group_commit(self, group_commit: bool) -> Self {
        self.rebuild(|settings| settings.group_commit = group_commit)
    }

    /// How many appends this handle committed in a statement shared with other appends,
    /// and how many shared statements it sent (including those that failed as a whole and
    /// were followed by their appends one by one), for monitoring and tests.
    pub fn group_commit_counts(&self) -> GroupCommitCounts {
        let (grouped_appends, group_statements) = self.inner.groups.counts();
        GroupCommitCounts {
            grouped_appends,
            group_statements,
        }
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

    /// Creates the schema and the tables if they do not exist, and adds to an events table
    /// made by an older version the columns it lacks (`correlation_id`, `causation_id`; the
    /// events already stored read back with `None` in them) and their index.
    ///
    /// Idempotent, and safe when several processes migrate at once: it runs in one
    /// transaction under an advisory lock keyed by the schema name.
    ///
    /// On an events table that already holds many rows, building the causation index
    /// (`cqrs_events_causation`) inside that transaction blocks appends until it is built.
    /// To avoid the pause, build it beforehand with `CREATE INDEX CONCURRENTLY` and the same
    /// definition, `ON cqrs_events (causation_id, aggregate_type, aggregate_id, sequence)
    /// WHERE causation_id IS NOT NULL` (after adding the column): `migrate` leaves an index
    /// of that name alone. A concurrent build that failed leaves an invalid index behind,
    /// which `migrate` also leaves alone; drop it before trying again.
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
}

#[async_trait]
impl EventRepository for PostgresEventRepository {
    async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        if self.inner.settings.group_commit {
            self.append_grouped(events).await
        } else {
            self.append_batch(events).await
        }
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

    /// One range of the partial index `cqrs_events_causation` (causation id, aggregate,
    /// sequence).
    async fn events_caused_by(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        causation_id: Uuid,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let rows = sqlx::query(&self.inner.sql.events_caused_by)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(causation_id)
            .fetch(&self.inner.pool);
        collect_events(rows, 4).await
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
        self.read_page(after_position, limit).await
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
