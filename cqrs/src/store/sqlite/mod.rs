//! The SQLite store (feature `sqlite`): the handle and its settings here; the writer task,
//! the readers, row decoding, the schema, views and dead letters in the files beside it.
//! What it guarantees is documented on [`SqliteEventRepository`].

mod appends;
mod dead_letters;
mod process;
mod reader;
mod rows;
mod schema;
mod statement;
mod view;
mod writer;

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::ConnectOptions;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::Checkpoint;
use crate::store::{
    validate_batch, CheckpointRepository, EventRepository, Snapshot, SnapshotRepository,
};

pub use self::dead_letters::SqliteDeadLetters;
pub use self::process::SqliteProcessStore;
pub use self::rows::CorruptRow;
pub use self::schema::InvalidTableName;
pub use self::statement::{InvalidStatement, SqliteBindValue, SqliteWriteStatement};
pub use self::view::SqliteViewRepository;
pub use self::writer::WriterError;

use self::appends::AppendConnection;
use self::reader::EventReader;
use self::rows::{decode_events, EVENT_COLUMNS};
use self::writer::{Job, Readers, WriteConnection};

/// How hard a commit works to survive a power cut (SQLite's `synchronous` setting, in WAL
/// mode).
///
/// Neither setting can lose or corrupt data when only the *process* dies (a crash, a
/// `SIGKILL`): a commit is in the operating system's hands once `append` returns. They
/// differ when the *machine* stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: every commit waits for the write-ahead log to reach the disk. An
    /// `Ok` from `append` survives a power cut. The default.
    ///
    /// A commit of nothing but view rows and their checkpoint (a projection's batch that
    /// no append shared) skips its own fsync and becomes durable with the next append's:
    /// a power cut takes those rows and the checkpoint back together, and the projection
    /// applies the same events again.
    #[default]
    Full,
    /// `synchronous=NORMAL`: the log is synced only at checkpoints. Much faster on slow
    /// disks, and the file is never corrupted, but the last commits before a power cut or an
    /// OS crash may be lost even though `append` returned `Ok`. Views and checkpoints are
    /// rolled back with them, so the store stays consistent with itself.
    Normal,
}

/// Settings for [`SqliteEventRepository::connect`].
///
/// ```
/// use std::time::Duration;
/// use cqrs::{Durability, SqliteOptions};
/// let options = SqliteOptions::default()
///     .durability(Durability::Normal)
///     .busy_timeout(Duration::from_secs(10))
///     .read_connections(8);
/// assert_eq!(options.get_durability(), Durability::Normal);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    durability: Durability,
    busy_timeout: Duration,
    read_connections: u32,
    max_group_size: usize,
    queue_capacity: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::Full,
            busy_timeout: Duration::from_secs(5),
            read_connections: 4,
            max_group_size: 512,
            queue_capacity: 4096,
        }
    }
}

impl SqliteOptions {
    /// The defaults: [`Durability::Full`], a 5 s busy timeout, 4 read connections, up to 512
    /// writes per group commit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the durability (`synchronous`) mode.
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How long a connection waits for another *process* holding the file's write lock
    /// before failing with a [`CQRSError::PersistenceError`] (default 5 s).
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The number of connections reads may use at once (default 4, at least 1).
    #[must_use]
    pub fn read_connections(mut self, connections: u32) -> Self {
        self.read_connections = connections.max(1);
        self
    }

    /// The most writes one transaction takes (default 512, at least 1). Larger groups share
    /// an fsync between more writers; smaller ones bound each write's latency.
    #[must_use]
    pub fn max_group_size(mut self, writes: usize) -> Self {
        self.max_group_size = writes.max(1);
        self
    }

    /// How many writes may wait for the writer before `append` itself waits (default 4096,
    /// at least 1).
    #[must_use]
    pub fn queue_capacity(mut self, writes: usize) -> Self {
        self.queue_capacity = writes.max(1);
        self
    }

    /// The durability mode.
    pub fn get_durability(&self) -> Durability {
        self.durability
    }

    /// sqlx connection options for `target` (a `sqlite:` URL or a file path) with these
    /// settings applied: the file is created if missing, in WAL mode.
    fn connect_options(&self, target: &str) -> Result<SqliteConnectOptions, CQRSError> {
        let base = if target.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(target).map_err(CQRSError::persistence)?
        } else {
            SqliteConnectOptions::new().filename(target)
        };
        Ok(self.apply(base))
    }

    fn apply(&self, options: SqliteConnectOptions) -> SqliteConnectOptions {
        options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match self.durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(self.busy_timeout)
    }
}

/// An event store, snapshot store and checkpoint store in one SQLite file.
///
/// Cloning is cheap and gives another handle to the same store (same connections, same
/// writer). The writer runs as a task on the Tokio runtime that opened the store, until the
/// last handle is dropped; use the store from that runtime.
///
/// One file holds everything: the events, the snapshots, the projections' checkpoints and the
/// views. [`SqliteEventRepository`] is the handle to it; it implements [`EventRepository`]
/// and [`SnapshotRepository`], and [`SqliteViewRepository`] keeps views beside the events so
/// that a projection commits a view change and its checkpoint in one transaction.
///
/// * **Durable by default.** The file is in WAL mode with `synchronous=FULL`: an append that
///   returned `Ok` survives a power cut. [`Durability::Normal`] trades the last commits
///   before a power cut (never a process crash) for fewer fsyncs.
/// * **Group commit.** Every write goes to one writer task that owns the write connection.
///   It takes all writes waiting at once and commits them in one transaction, so concurrent
///   dispatches share an fsync; each write still fails or succeeds on its own (a lost race
///   is that append's [`CQRSError::Conflict`], not its neighbours'). It waits briefly for
///   dispatches still reading their aggregate, and inserts a group's events with one
///   statement, so a group of small appends costs one round trip to SQLite. A group of
///   nothing but appends runs on the writer task itself, through a second connection to
///   the file (for a store opened on a file path): its commit, fsync included, takes a
///   runtime worker for that long; a write lock held by another process sends it back to
///   the sqlx connection, which waits on its own thread. The application's own writes to
///   tables in the file join the groups through [`execute_write`](Self::execute_write).
/// * **Races are caught by the schema.** `UNIQUE (aggregate_type, aggregate_id, sequence)`
///   refuses the second of two writers; `UNIQUE (event_id)` makes a retried append
///   recognisable; a trigger refuses a sequence that skips ahead. Nothing is decided by a
///   read before the write.
/// * **Reads** never wait for the writer (WAL). Event reads (`load_events`, `read_all`) run
///   on read-only connections of the store's own, one blocking job per read that
///   also decodes the rows: in place under `block_in_place` on a multi-threaded runtime
///   (the worker's other tasks move to another thread meanwhile), on a blocking thread on a
///   current-thread one. Other reads use the sqlx pool ([`pool`](Self::pool)).
/// * **Correlation and causation** are columns of their own (`correlation_id`,
///   `causation_id`: UUID text, `NULL` when the event has none), and
///   [`events_caused_by`](EventRepository::events_caused_by) is one range of a partial index
///   on the causation id and the aggregate. An existing database gains the columns on open
///   ([`migrate`](Self::migrate)); its old events read back with `None`.
///
/// The schema and the reasons for each constraint are in `docs/adr/0003-sqlite-store.md`.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use cqrs::{EventRepository, PersistableDomainEvent, SqliteEventRepository};
/// # let path = std::env::temp_dir().join(format!("cqrs-doc-{}.sqlite", uuid::Uuid::new_v4()));
/// let store = SqliteEventRepository::open(&path).await?;
///
/// let id = uuid::Uuid::new_v4();
/// let event = PersistableDomainEvent {
///     event_id: uuid::Uuid::new_v4(),
///     aggregate_type_id: PersistableDomainEvent::type_id_for("counter", id),
///     aggregate_id: id,
///     aggregate_type: "counter".into(),
///     sequence: 1,
///     position: 0,
///     event_type: "Incremented".into(),
///     event_version: "1".into(),
///     payload: serde_json::json!({ "Incremented": { "by": 1 } }).into(),
///     metadata: serde_json::Value::Null,
///     timestamp: chrono::Utc::now(),
///     correlation_id: None,
///     causation_id: None,
/// };
/// let positions = store.append(vec![event.clone()]).await?;
/// // A retry of the same append (same event id) stores nothing and reports the same position.
/// assert_eq!(store.append(vec![event]).await?, positions);
/// assert_eq!(store.event_sequence("counter", id).await?, 1);
/// # drop(store);
/// # for suffix in ["", "-wal", "-shm"] {
/// #     let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
/// # }
/// # Ok::<(), cqrs::CQRSError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct SqliteEventRepository {
    inner: Arc<Shared>,
}

struct Shared {
    pool: SqlitePool,
    jobs: mpsc::Sender<Job>,
    position: Arc<watch::Sender<i64>>,
    readers: Arc<Readers>,
    /// Event reads off sqlx (see `reader.rs`); `None` on a pool given to `from_pool`.
    reader: Option<Arc<EventReader>>,
    view_tables: Mutex<HashSet<String>>,
}

impl fmt::Debug for SqliteEventRepository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteEventRepository")
            .field("position", &*self.inner.position.borrow())
            .finish_non_exhaustive()
    }
}

/// The same handle serves as the snapshot store: pass a clone of the
/// [`SqliteEventRepository`] to [`CQRSFramework::with_snapshots`](crate::CQRSFramework::with_snapshots).
///
/// Snapshots live in `cqrs_snapshots`, one row per aggregate; a save never replaces a
/// snapshot taken at a higher sequence, and a delete removes the row whatever its sequence.
/// A stored state that is not JSON at all (a hand edit) is reported as no snapshot, so the
/// aggregate is rebuilt from its events and the row is replaced by the next snapshot saved at
/// its sequence or above.
pub type SqliteSnapshotRepository = SqliteEventRepository;

impl SqliteEventRepository {
    /// Opens (creating it if missing) the store in the file at `path` with the default
    /// [`SqliteOptions`], and creates its tables.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the file cannot be opened or migrated.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, CQRSError> {
        let options = SqliteOptions::default();
        let connect = options.apply(SqliteConnectOptions::new().filename(path));
        let store = Self::connect_with(connect, options).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects to `target`, a file path or a `sqlite:` URL (`sqlite://data/app.sqlite`),
    /// creating the file if missing. Call [`migrate`](Self::migrate) before the first use.
    ///
    /// An in-memory database (`sqlite::memory:`) is not supported: the writer and the
    /// readers are separate connections. Use [`MemoryEventRepository`](crate::MemoryEventRepository).
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the URL is invalid or the file cannot be opened.
    pub async fn connect(target: &str, options: SqliteOptions) -> Result<Self, CQRSError> {
        let connect = options.connect_options(target)?;
        Self::connect_with(connect, options).await
    }

    /// Connects with sqlx options of your own (`options` still sets WAL, the durability mode
    /// and the busy timeout on top of them).
    ///
    /// Event reads (`load_events`, `read_all`) use read-only connections of the store's own
    /// to the same file, opened with SQLite's defaults and the busy timeout, not with these
    /// options; use [`from_pool`](Self::from_pool) if every read must go through
    /// connections you configured.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the file cannot be opened.
    pub async fn connect_with(
        connect: SqliteConnectOptions,
        options: SqliteOptions,
    ) -> Result<Self, CQRSError> {
        let connect = options.apply(connect);
        let writer = connect.connect().await.map_err(CQRSError::persistence)?;
        let reader = EventReader::new(
            connect.get_filename(),
            options.busy_timeout,
            options.read_connections,
        );
        // Only for a plain file, as the readers: the connection must reach the same database.
        let appends = reader.as_ref().and_then(|_| {
            AppendConnection::open(connect.get_filename(), options.durability)
                .map_err(|error| tracing::debug!(%error, "no append connection; appends use sqlx"))
                .ok()
        });
        let pool = SqlitePoolOptions::new()
            .max_connections(options.read_connections)
            .min_connections(0)
            .connect_with(connect)
            .await
            .map_err(CQRSError::persistence)?;
        let writer = WriteConnection::Dedicated(Box::new(writer));
        Self::start(pool, writer, reader, appends, &options).await
    }

    /// A store on a pool you configured yourself. Reads use the pool; the writer takes one
    /// of its connections for each transaction. The pool's own settings are kept (use WAL
    /// for readers that never wait); `options` only sets the writer's grouping.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the database cannot be read.
    pub async fn from_pool(pool: SqlitePool, options: SqliteOptions) -> Result<Self, CQRSError> {
        Self::start(
            pool.clone(),
            WriteConnection::Pool(pool),
            None,
            None,
            &options,
        )
        .await
    }

    async fn start(
        pool: SqlitePool,
        writer: WriteConnection,
        reader: Option<EventReader>,
        appends: Option<AppendConnection>,
        options: &SqliteOptions,
    ) -> Result<Self, CQRSError> {
        let initial = last_position(&pool).await?;
        let position = Arc::new(watch::channel(initial).0);
        let (jobs, receiver) = mpsc::channel(options.queue_capacity);
        let readers = Arc::new(Readers::default());
        let relax_views = matches!(writer, WriteConnection::Dedicated(_))
            && options.durability == Durability::Full;
        tokio::spawn(writer::run(
            writer,
            receiver,
            options.max_group_size,
            Arc::clone(&position),
            Arc::clone(&readers),
            relax_views,
            appends,
        ));
        Ok(SqliteEventRepository {
            inner: Arc::new(Shared {
                pool,
                jobs,
                position,
                readers,
                reader: reader.map(Arc::new),
                view_tables: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Creates the store's tables if they do not exist yet, and adds to an events table made
    /// by an older version the columns it lacks (`correlation_id`, `causation_id`; the
    /// events already stored read back with `None` in them). Safe to run any number of
    /// times, from several processes.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    pub async fn migrate(&self) -> Result<(), CQRSError> {
        let sql = schema::MIGRATION.to_owned();
        self.submit(|reply| Job::Execute { sql, reply }).await?;
        self.add_missing_event_columns().await?;
        let sql = schema::ADDED_INDEXES.to_owned();
        self.submit(|reply| Job::Execute { sql, reply }).await?;
        let last = last_position(&self.inner.pool).await?;
        self.inner.position.send_if_modified(|current| {
            let newer = last > *current;
            if newer {
                *current = last;
            }
            newer
        });
        Ok(())
    }

    /// Adds the columns of [`schema::ADDED_EVENT_COLUMNS`] that an events table made by an
    /// older version lacks (SQLite has no `ADD COLUMN IF NOT EXISTS`). Another process may
    /// add one between the look and the `ALTER TABLE`: a refused `ALTER` is fine when the
    /// column is there afterwards.
    async fn add_missing_event_columns(&self) -> Result<(), CQRSError> {
        for (column, alter) in schema::ADDED_EVENT_COLUMNS {
            if self.has_event_column(column).await? {
                continue;
            }
            let sql = alter.to_owned();
            if let Err(error) = self.submit(|reply| Job::Execute { sql, reply }).await {
                if !self.has_event_column(column).await? {
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    async fn has_event_column(&self, column: &str) -> Result<bool, CQRSError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pragma_table_info('cqrs_events') WHERE name = ?",
        )
        .bind(column)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(CQRSError::persistence)?;
        Ok(count > 0)
    }

    /// The pool the store reads with. Use it for your own queries on the same file; write
    /// to the store's tables only through the store.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// A view store for `V` in the same file (see [`SqliteViewRepository`]).
    pub fn views<V>(&self) -> SqliteViewRepository<V> {
        SqliteViewRepository::new(self)
    }

    /// The position stored under the checkpoint `name`, 0 if none.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    pub async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM cqrs_checkpoints WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(CQRSError::persistence)?;
        Ok(position.unwrap_or(0))
    }

    /// Stores a checkpoint on its own (for consumers whose effects are not in this file,
    /// such as a relay to a message broker). It replaces the stored position whatever it
    /// was.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    pub async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        self.submit(|reply| Job::Checkpoint { checkpoint, reply })
            .await
    }

    /// Runs one `INSERT`, `REPLACE`, `UPDATE` or `DELETE` of the application's own tables
    /// in the file through the store's writer, and returns the number of rows it changed.
    ///
    /// The statement is a write like an append: it joins the group the writer is about to
    /// commit, runs in that group's transaction under a savepoint of its own, and is answered
    /// after the group's `COMMIT`, with the same durability as an append (a group holding
    /// one is never committed under the relaxed `synchronous` of a group of views). Writes
    /// of the application's tables that go through the pool instead wait in SQLite's busy
    /// handler for the writer's transactions, each paying a commit of its own; through
    /// here they share the group's.
    ///
    /// Reads stay on the [`pool`](Self::pool): they never wait for the writer, and see the
    /// statement once this returns. The store's own tables (`cqrs_*`) are written only by
    /// the store.
    ///
    /// # Errors
    /// * [`CQRSError::ConstraintViolation`] when the statement broke a constraint (a
    ///   `UNIQUE` key already taken): it changed nothing, and the writes grouped with it
    ///   commit.
    /// * [`CQRSError::PersistenceError`] whose source is an [`InvalidStatement`] when it is
    ///   not one such statement or its values do not match its parameters (nothing was
    ///   queued); with SQLite's error when the statement is wrong for the schema (a missing
    ///   table, a syntax error), also undone alone; with a [`WriterError`] for a failure
    ///   of the database itself (I/O, disk full) or a statement whose conflict clause or
    ///   trigger rolls the transaction back, after which the group's other writes run again
    ///   in a new transaction, as for an append.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use cqrs::{CQRSError, SqliteEventRepository, SqliteWriteStatement};
    /// # let path = std::env::temp_dir().join(format!("cqrs-doc-{}.sqlite", uuid::Uuid::new_v4()));
    /// let store = SqliteEventRepository::open(&path).await?;
    /// cqrs::sqlx::query("CREATE TABLE IF NOT EXISTS reservations (seat TEXT PRIMARY KEY, guest TEXT)")
    ///     .execute(store.pool())
    ///     .await
    ///     .map_err(CQRSError::persistence)?;
    ///
    /// let reserve = |seat: &str, guest: &str| {
    ///     SqliteWriteStatement::new("INSERT INTO reservations (seat, guest) VALUES (?, ?)")
    ///         .bind(seat)
    ///         .bind(guest)
    /// };
    /// assert_eq!(store.execute_write(reserve("12A", "ada")).await?, 1);
    /// // The seat is taken: the second insert is refused, and changes nothing.
    /// let taken = store.execute_write(reserve("12A", "grace")).await;
    /// assert!(matches!(taken, Err(CQRSError::ConstraintViolation { .. })));
    ///
    /// let rename = SqliteWriteStatement::new("UPDATE reservations SET guest = ?1 WHERE guest = ?2")
    ///     .bind("ada lovelace")
    ///     .bind("ada");
    /// assert_eq!(store.execute_write(rename).await?, 1);
    /// let guest: String = cqrs::sqlx::query_scalar("SELECT guest FROM reservations WHERE seat = '12A'")
    ///     .fetch_one(store.pool())
    ///     .await
    ///     .map_err(CQRSError::persistence)?;
    /// assert_eq!(guest, "ada lovelace");
    /// # drop(store);
    /// # for suffix in ["", "-wal", "-shm"] {
    /// #     let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    /// # }
    /// # Ok::<(), CQRSError>(())
    /// # }).unwrap();
    /// ```
    pub async fn execute_write(&self, statement: SqliteWriteStatement) -> Result<u64, CQRSError> {
        statement::check(&statement).map_err(CQRSError::persistence)?;
        self.submit(|reply| Job::Write { statement, reply }).await
    }

    /// Sends a job to the writer and waits for its answer.
    async fn submit<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, CQRSError>>) -> Job,
    ) -> Result<T, CQRSError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(job(reply))
            .await
            .map_err(|_| writer_stopped())?;
        answer.await.map_err(|_| writer_stopped())?
    }

    fn view_tables(&self) -> MutexGuard<'_, HashSet<String>> {
        self.inner
            .view_tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates the table of a view the first time this store meets it.
    async fn ensure_view_table(&self, table: &str) -> Result<(), CQRSError> {
        if self.view_tables().contains(table) {
            return Ok(());
        }
        schema::validate_table_name(table)?;
        let sql = schema::view_table_ddl(table);
        self.submit(|reply| Job::Execute { sql, reply }).await?;
        self.view_tables().insert(table.to_owned());
        Ok(())
    }
}

impl SqliteEventRepository {
    /// The result of a `read_all` page. A page that ended before a damaged row tells the
    /// position watch that that position is committed, so a reader whose page came back
    /// short reads on (the row may have been written by another process, which the watch
    /// would not otherwise know of).
    fn finish_page(&self, page: rows::Page) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let (events, damaged_at) = page.finish();
        if let Some(position) = damaged_at {
            self.inner.position.send_if_modified(|current| {
                let newer = position > *current;
                if newer {
                    *current = position;
                }
                newer
            });
        }
        events
    }
}

fn writer_stopped() -> CQRSError {
    CQRSError::persistence(
        "the SQLite writer task has stopped (its Tokio runtime shut down); reopen the store",
    )
}

/// The highest position stored, 0 for an empty or not yet migrated file.
async fn last_position(pool: &SqlitePool) -> Result<i64, CQRSError> {
    let exists: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'cqrs_events'",
    )
    .fetch_one(pool)
    .await
    .map_err(CQRSError::persistence)?;
    if exists == 0 {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM cqrs_events")
        .fetch_one(pool)
        .await
        .map_err(CQRSError::persistence)
}

#[async_trait]
impl EventRepository for SqliteEventRepository {
    async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        validate_batch(&events)?;
        self.submit(|reply| Job::Append { events, reply }).await
    }

    async fn load_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        // The caller is likely about to append: the writer waits for it (group commit).
        let _reading = self.inner.readers.enter();
        if let Some(reader) = &self.inner.reader {
            return reader
                .load_events(aggregate_type, &aggregate_id.to_string(), after_sequence)
                .await;
        }
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM cqrs_events \
             WHERE aggregate_type = ? AND aggregate_id = ? AND sequence > ? ORDER BY sequence"
        );
        let rows = sqlx::query(&sql)
            .bind(aggregate_type)
            .bind(aggregate_id.to_string())
            .bind(after_sequence)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        decode_events(&rows)
    }

    async fn event_sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<i64, CQRSError> {
        sqlx::query_scalar(
            "SELECT COALESCE(MAX(sequence), 0) FROM cqrs_events \
             WHERE aggregate_type = ? AND aggregate_id = ?",
        )
        .bind(aggregate_type)
        .bind(aggregate_id.to_string())
        .fetch_one(&self.inner.pool)
        .await
        .map_err(CQRSError::persistence)
    }

    async fn read_all(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        if let Some(reader) = &self.inner.reader {
            let page = reader.read_all(after_position, limit).await?;
            return self.finish_page(page);
        }
        let page: Result<Option<String>, _> = sqlx::query_scalar(rows::PAGE_SQL)
            .bind(after_position)
            .bind(limit)
            .fetch_one(&self.inner.pool)
            .await;
        if let Some(events) = page
            .ok()
            .flatten()
            .and_then(|text| rows::decode_page(&text))
        {
            return Ok(events);
        }
        // A row the fast path could not take (a payload that is not JSON, a damaged row)
        // or a failed query: read row by row, which keeps a payload as stored, ends the
        // page before a damaged row, or reports the database error.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM cqrs_events WHERE position > ? ORDER BY position LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(after_position)
            .bind(limit)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        self.finish_page(rows::decode_page_rows(&rows))
    }

    /// One range of the partial index `cqrs_events_causation` (causation id, aggregate,
    /// sequence).
    async fn events_caused_by(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        causation_id: Uuid,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM cqrs_events \
             WHERE causation_id = ? AND aggregate_type = ? AND aggregate_id = ? \
             ORDER BY sequence"
        );
        let rows = sqlx::query(&sql)
            .bind(causation_id.to_string())
            .bind(aggregate_type)
            .bind(aggregate_id.to_string())
            .fetch_all(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        decode_events(&rows)
    }

    fn subscribe(&self) -> Option<watch::Receiver<i64>> {
        Some(self.inner.position.subscribe())
    }
}

#[async_trait]
impl SnapshotRepository for SqliteEventRepository {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<Snapshot>, CQRSError> {
        let row = sqlx::query(
            "SELECT sequence, state, timestamp FROM cqrs_snapshots \
             WHERE aggregate_type = ? AND aggregate_id = ?",
        )
        .bind(aggregate_type)
        .bind(aggregate_id.to_string())
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(CQRSError::persistence)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let sequence: i64 = rows::snapshot_column(&row, 0, aggregate_type, aggregate_id)?;
        let text: String = rows::snapshot_column(&row, 1, aggregate_type, aggregate_id)?;
        let micros: i64 = rows::snapshot_column(&row, 2, aggregate_type, aggregate_id)?;
        let state = match serde_json::from_str(&text) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(
                    aggregate_type, %aggregate_id, %error,
                    "stored snapshot is not JSON; ignoring it"
                );
                return Ok(None);
            }
        };
        let timestamp = rows::from_micros(micros)
            .ok_or_else(|| rows::bad_snapshot_timestamp(aggregate_type, aggregate_id, micros))?;
        Ok(Some(Snapshot {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id,
            sequence,
            state,
            timestamp,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), CQRSError> {
        let state = snapshot.state.to_string();
        self.submit(|reply| Job::Snapshot {
            snapshot,
            state,
            reply,
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<(), CQRSError> {
        let aggregate_type = aggregate_type.to_owned();
        self.submit(|reply| Job::DeleteSnapshot {
            aggregate_type,
            aggregate_id,
            reply,
        })
        .await
    }
}

/// Checkpoints in `cqrs_checkpoints`, for consumers whose effects are not in this file (a
/// relay to a message broker). Views in this file commit theirs with
/// [`SqliteViewRepository`] instead, in the same transaction as the view rows.
#[async_trait]
impl CheckpointRepository for SqliteEventRepository {
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        self.checkpoint(name).await
    }

    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        SqliteEventRepository::save_checkpoint(self, checkpoint).await
    }
}
