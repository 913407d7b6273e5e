//! The database the service runs on: an event store, the view store beside it, and the
//! table of idempotency keys in the same database.

#[cfg(feature = "dynamodb")]
mod dynamodb;

use std::sync::Arc;

use cqrs::sqlx::{self, Row};
use cqrs::{
    CQRSError, DeadLetters, EventRepository, PostgresDeadLetters, PostgresEventRepository,
    SqliteDeadLetters, SqliteEventRepository, SqliteWriteStatement, ViewRepository,
};

use crate::order::{Order, OrderSummary};

/// Where the service keeps its events, views and idempotency keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file (created if missing).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL server, by URL (`postgres://user@host:5432/db`).
    Postgres {
        /// The server's URL.
        url: String,
        /// The schema that holds the tables (created if missing); `public` when `None`.
        schema: Option<String>,
    },
    /// DynamoDB (feature `dynamodb`): events in one table, and the order view, the
    /// projection's checkpoint and dead letters and the idempotency keys in a view table
    /// (both created if missing). See `docs/adr/0018-service-on-lambda.md`.
    #[cfg(feature = "dynamodb")]
    DynamoDb {
        /// An emulator's URL (`http://127.0.0.1:5000`), with static test credentials; `None`
        /// for AWS itself, with the region and credentials of the environment
        /// (`AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`:
        /// what AWS Lambda gives a function).
        endpoint: Option<String>,
        /// The events table.
        events_table: String,
        /// The view table.
        views_table: String,
    },
}

/// The stores opened on a [`Database`]: what the service reads and writes.
#[derive(Clone)]
pub(crate) struct Stores {
    pub(crate) events: Arc<dyn EventRepository>,
    pub(crate) views: Arc<dyn ViewRepository<Order, OrderSummary>>,
    pub(crate) keys: KeyTable,
    /// Where the projection records the events it skipped.
    pub(crate) dead_letters: Arc<dyn DeadLetters>,
    /// The events table, for the store's head and the operator page's aggregates.
    catalog: Catalog,
}

/// Where the store's head and its aggregates are read from.
#[derive(Debug, Clone)]
enum Catalog {
    /// The SQL stores' events table.
    Sql(EventsTable),
    /// The DynamoDB store's counter and global order.
    #[cfg(feature = "dynamodb")]
    DynamoDb(dynamodb::DynamoDbCatalog),
}

/// One aggregate as the operator page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AggregateRow {
    /// Its type (`order`).
    pub(crate) aggregate_type: String,
    /// Its id.
    pub(crate) aggregate_id: String,
    /// How many events it has.
    pub(crate) events: i64,
    /// The global position of its last event.
    pub(crate) last_position: i64,
}

impl Stores {
    /// Opens the database and creates every table the service needs.
    pub(crate) async fn open(database: &Database) -> Result<Stores, CQRSError> {
        match database {
            Database::Sqlite(path) => {
                let store = SqliteEventRepository::open(path).await?;
                let keys = SqlKeyTable {
                    pool: Pool::Sqlite(store.clone()),
                    table: TABLE.to_owned(),
                };
                keys.migrate().await?;
                let events_table = EventsTable {
                    pool: Pool::Sqlite(store.clone()),
                    table: EVENTS_TABLE.to_owned(),
                };
                let dead_letters = SqliteDeadLetters::new(&store);
                dead_letters.migrate().await?;
                Ok(Stores {
                    views: Arc::new(store.views::<OrderSummary>()),
                    events: Arc::new(store),
                    keys: KeyTable::Sql(keys),
                    dead_letters: Arc::new(dead_letters),
                    catalog: Catalog::Sql(events_table),
                })
            }
            Database::Postgres { url, schema } => {
                let mut store = PostgresEventRepository::connect(url).await?;
                if let Some(schema) = schema {
                    store = store.with_schema(schema)?;
                }
                store.migrate().await?;
                // The schema is a plain identifier: `with_schema` checked it.
                let keys = SqlKeyTable {
                    pool: Pool::Postgres(store.pool().clone()),
                    table: format!("\"{}\".{TABLE}", store.schema()),
                };
                keys.migrate().await?;
                let events_table = EventsTable {
                    pool: Pool::Postgres(store.pool().clone()),
                    table: format!("\"{}\".{EVENTS_TABLE}", store.schema()),
                };
                let dead_letters = PostgresDeadLetters::new(&store);
                dead_letters.migrate().await?;
                Ok(Stores {
                    views: Arc::new(store.views::<OrderSummary>()),
                    events: Arc::new(store),
                    keys: KeyTable::Sql(keys),
                    dead_letters: Arc::new(dead_letters),
                    catalog: Catalog::Sql(events_table),
                })
            }
            #[cfg(feature = "dynamodb")]
            Database::DynamoDb {
                endpoint,
                events_table,
                views_table,
            } => dynamodb::open(endpoint.as_deref(), events_table, views_table).await,
        }
    }

    /// Up to `limit` aggregates, the most recently changed first, with their event counts.
    pub(crate) async fn aggregates(&self, limit: i64) -> Result<Vec<AggregateRow>, CQRSError> {
        match &self.catalog {
            Catalog::Sql(events_table) => events_table.aggregates(limit).await,
            #[cfg(feature = "dynamodb")]
            Catalog::DynamoDb(catalog) => catalog.aggregates(limit).await,
        }
    }

    /// How far [`aggregates`](Self::aggregates) looks, as the operator page says it after
    /// "The N most recently changed": empty where it reads every event.
    pub(crate) fn aggregates_scope(&self) -> &'static str {
        match &self.catalog {
            Catalog::Sql(_) => "",
            #[cfg(feature = "dynamodb")]
            Catalog::DynamoDb(_) => dynamodb::AGGREGATES_SCOPE,
        }
    }

    /// The global position of the store's last event, 0 when it has none.
    pub(crate) async fn head(&self) -> Result<i64, CQRSError> {
        match &self.catalog {
            Catalog::Sql(events_table) => events_table.head().await,
            #[cfg(feature = "dynamodb")]
            Catalog::DynamoDb(catalog) => catalog.head().await,
        }
    }
}

impl EventsTable {
    /// Up to `limit` aggregates, the most recently changed first: one grouped query.
    async fn aggregates(&self, limit: i64) -> Result<Vec<AggregateRow>, CQRSError> {
        let table = &self.table;
        let rows = match &self.pool {
            Pool::Sqlite(store) => {
                let sql = format!(
                    "SELECT aggregate_type, aggregate_id, COUNT(*), MAX(position) FROM {table} \
                     GROUP BY aggregate_type, aggregate_id ORDER BY MAX(position) DESC LIMIT ?"
                );
                sqlx::query_as::<_, (String, String, i64, i64)>(&sql)
                    .bind(limit)
                    .fetch_all(store.pool())
                    .await
            }
            Pool::Postgres(pool) => {
                let sql = format!(
                    "SELECT aggregate_type, aggregate_id::text, COUNT(*), MAX(position) \
                     FROM {table} GROUP BY aggregate_type, aggregate_id \
                     ORDER BY MAX(position) DESC LIMIT $1"
                );
                sqlx::query_as::<_, (String, String, i64, i64)>(&sql)
                    .bind(limit)
                    .fetch_all(pool)
                    .await
            }
        }
        .map_err(CQRSError::persistence)?;
        Ok(rows
            .into_iter()
            .map(
                |(aggregate_type, aggregate_id, events, last_position)| AggregateRow {
                    aggregate_type,
                    aggregate_id,
                    events,
                    last_position,
                },
            )
            .collect())
    }

    /// The largest position of the table, 0 when it is empty.
    async fn head(&self) -> Result<i64, CQRSError> {
        let sql = format!("SELECT COALESCE(MAX(position), 0) FROM {}", self.table);
        let head: Result<i64, sqlx::Error> = match &self.pool {
            Pool::Sqlite(store) => sqlx::query_scalar(&sql).fetch_one(store.pool()).await,
            Pool::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
        };
        head.map_err(CQRSError::persistence)
    }
}

/// The stores' events table (`cqrs_events`), qualified by its schema on PostgreSQL.
#[derive(Debug, Clone)]
struct EventsTable {
    pool: Pool,
    table: String,
}

/// The name of the stores' events table.
const EVENTS_TABLE: &str = "cqrs_events";

/// One idempotency key's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRow {
    /// The request the key was first used with: method and path, then the body.
    pub(crate) request: String,
    /// The aggregate the request acts on (for a create: the id chosen for it).
    pub(crate) aggregate_id: String,
    /// When the request was claimed, in milliseconds since the epoch.
    pub(crate) claimed_at: i64,
    /// The stored response (JSON), once the request finished.
    pub(crate) response: Option<String>,
}

/// What claiming a key found.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The key was free: this request runs, and records its outcome.
    Claimed,
    /// The key was taken: its row as stored.
    Taken(KeyRow),
}

/// The idempotency keys: one row (or item) per key, claimed before a command runs and
/// completed with its response, with the same operations and conditions on every database.
/// See `docs/adr/0015-http-service.md` and, for DynamoDB, `docs/adr/0018-service-on-lambda.md`.
#[derive(Debug, Clone)]
pub(crate) enum KeyTable {
    /// The `http_idempotency` table of SQLite or PostgreSQL.
    Sql(SqlKeyTable),
    /// Items of the DynamoDB view table.
    #[cfg(feature = "dynamodb")]
    DynamoDb(dynamodb::DynamoDbKeyTable),
}

/// Calls `$method` with `$args` on whichever table `$keys` is.
macro_rules! on_keys {
    ($keys:expr, $method:ident($($arg:expr),*)) => {
        match $keys {
            KeyTable::Sql(table) => table.$method($($arg),*).await,
            #[cfg(feature = "dynamodb")]
            KeyTable::DynamoDb(table) => table.$method($($arg),*).await,
        }
    };
}

impl KeyTable {
    /// Deletes at most `limit` keys that were claimed before `before` (milliseconds since
    /// the epoch) and hold a response; a claim still running (no response) is never
    /// deleted here. Returns how many were deleted.
    pub(crate) async fn prune(&self, before: i64, limit: i64) -> Result<u64, CQRSError> {
        on_keys!(self, prune(before, limit))
    }

    /// Claims `key` for a request, or returns the row of the request that holds it.
    pub(crate) async fn claim(
        &self,
        key: &str,
        request: &str,
        aggregate_id: &str,
        now: i64,
    ) -> Result<Claim, CQRSError> {
        on_keys!(self, claim(key, request, aggregate_id, now))
    }

    /// Records the response of the request that claimed `key` at `claimed_at` (nothing, if
    /// another request has taken the claim over since).
    pub(crate) async fn complete(
        &self,
        key: &str,
        claimed_at: i64,
        response: &str,
    ) -> Result<(), CQRSError> {
        on_keys!(self, complete(key, claimed_at, response))
    }

    /// Frees `key`, claimed at `claimed_at`, after a request that stored nothing and must be
    /// allowed to run again (nothing, if another request has taken the claim over since).
    pub(crate) async fn release(&self, key: &str, claimed_at: i64) -> Result<(), CQRSError> {
        on_keys!(self, release(key, claimed_at))
    }

    /// Takes over a claim that was abandoned (claimed at `claimed_at`, never completed):
    /// true for exactly one of several requests that try at once.
    pub(crate) async fn take_over(
        &self,
        key: &str,
        claimed_at: i64,
        now: i64,
    ) -> Result<bool, CQRSError> {
        on_keys!(self, take_over(key, claimed_at, now))
    }
}

/// `http_idempotency`: one row per idempotency key in the SQL database of the events.
#[derive(Debug, Clone)]
pub(crate) struct SqlKeyTable {
    pool: Pool,
    /// The table's name, qualified by its schema on PostgreSQL.
    table: String,
}

/// Where the SQL tables are read and written.
#[derive(Debug, Clone)]
enum Pool {
    /// The SQLite store: reads on its pool, writes through its writer
    /// ([`SqliteEventRepository::execute_write`]), in the transactions it groups the
    /// appends in.
    Sqlite(SqliteEventRepository),
    /// The PostgreSQL store's pool, for reads and writes.
    Postgres(sqlx::PgPool),
}

/// A value bound to a statement of the keys table.
#[derive(Debug, Clone, Copy)]
enum Arg<'a> {
    Text(&'a str),
    Integer(i64),
}

/// The table's name.
const TABLE: &str = "http_idempotency";

/// `$1`, `$2`, ... as SQLite's `?`, so one statement serves both databases.
fn sqlite_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            out.push('?');
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl SqlKeyTable {
    /// Runs the data-changing statement `sql` (written with PostgreSQL's `$n` placeholders,
    /// rewritten to `?` for SQLite, so each is used once and in order) with `args`, and
    /// returns the number of rows it changed.
    ///
    /// On SQLite it goes through the store's writer: it joins the transaction the writer
    /// commits the appends of the moment in, instead of waiting for the file's write lock
    /// behind them and paying a commit of its own.
    async fn write(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, CQRSError> {
        match &self.pool {
            Pool::Sqlite(store) => {
                let mut statement = SqliteWriteStatement::new(sqlite_placeholders(sql));
                for arg in args {
                    statement = match *arg {
                        Arg::Text(text) => statement.bind(text),
                        Arg::Integer(number) => statement.bind(number),
                    };
                }
                store.execute_write(statement).await
            }
            Pool::Postgres(pool) => {
                let mut query = sqlx::query(sql);
                for arg in args {
                    query = match *arg {
                        Arg::Text(text) => query.bind(text),
                        Arg::Integer(number) => query.bind(number),
                    };
                }
                query
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected())
                    .map_err(CQRSError::persistence)
            }
        }
    }

    /// Runs a statement of the table's definition, on the pool (once, when the service
    /// opens the database).
    async fn define(&self, sql: &str) -> Result<(), CQRSError> {
        match &self.pool {
            Pool::Sqlite(store) => sqlx::query(sql).execute(store.pool()).await.map(drop),
            Pool::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop),
        }
        .map_err(CQRSError::persistence)
    }

    /// Creates the table if it does not exist (`BIGINT` is an integer in SQLite too).
    async fn migrate(&self) -> Result<(), CQRSError> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                idempotency_key TEXT PRIMARY KEY,
                request TEXT NOT NULL,
                aggregate_id TEXT NOT NULL,
                claimed_at BIGINT NOT NULL,
                response TEXT
            )",
            self.table
        );
        self.define(&sql).await?;
        // The prune finds the old keys by this index. An index lives in its table's
        // schema on PostgreSQL, so its name is not qualified.
        let sql = format!(
            "CREATE INDEX IF NOT EXISTS {TABLE}_claimed_at ON {} (claimed_at)",
            self.table
        );
        self.define(&sql).await
    }

    /// Deletes at most `limit` keys that were claimed before `before` (milliseconds since
    /// the epoch) and hold a response; a claim still running (no response) is never
    /// deleted here. Returns how many were deleted.
    pub(crate) async fn prune(&self, before: i64, limit: i64) -> Result<u64, CQRSError> {
        let sql = format!(
            "DELETE FROM {table} WHERE idempotency_key IN (\
                SELECT idempotency_key FROM {table} \
                WHERE claimed_at < $1 AND response IS NOT NULL LIMIT $2)",
            table = self.table
        );
        self.write(&sql, &[Arg::Integer(before), Arg::Integer(limit)])
            .await
    }

    /// Claims `key` for a request, or returns the row of the request that holds it.
    pub(crate) async fn claim(
        &self,
        key: &str,
        request: &str,
        aggregate_id: &str,
        now: i64,
    ) -> Result<Claim, CQRSError> {
        let sql = format!(
            "INSERT INTO {} (idempotency_key, request, aggregate_id, claimed_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (idempotency_key) DO NOTHING",
            self.table
        );
        let inserted = self
            .write(
                &sql,
                &[
                    Arg::Text(key),
                    Arg::Text(request),
                    Arg::Text(aggregate_id),
                    Arg::Integer(now),
                ],
            )
            .await?;
        if inserted == 1 {
            return Ok(Claim::Claimed);
        }
        match self.row(key).await? {
            Some(row) => Ok(Claim::Taken(row)),
            // Released between the insert and the read: try again.
            None => Box::pin(self.claim(key, request, aggregate_id, now)).await,
        }
    }

    /// The row of `key`, if there is one.
    pub(crate) async fn row(&self, key: &str) -> Result<Option<KeyRow>, CQRSError> {
        let sql = format!(
            "SELECT request, aggregate_id, claimed_at, response FROM {} \
             WHERE idempotency_key = $1",
            self.table
        );
        let row = match &self.pool {
            Pool::Sqlite(store) => sqlx::query(&sqlite_placeholders(&sql))
                .bind(key)
                .fetch_optional(store.pool())
                .await
                .and_then(|row| row.map(|r| key_row(&r)).transpose()),
            Pool::Postgres(pool) => sqlx::query(&sql)
                .bind(key)
                .fetch_optional(pool)
                .await
                .and_then(|row| row.map(|r| key_row(&r)).transpose()),
        };
        row.map_err(CQRSError::persistence)
    }

    /// Records the response of the request that claimed `key` at `claimed_at` (nothing, if
    /// another request has taken the claim over since).
    pub(crate) async fn complete(
        &self,
        key: &str,
        claimed_at: i64,
        response: &str,
    ) -> Result<(), CQRSError> {
        let sql = format!(
            "UPDATE {} SET response = $1 \
             WHERE idempotency_key = $2 AND claimed_at = $3 AND response IS NULL",
            self.table
        );
        self.write(
            &sql,
            &[
                Arg::Text(response),
                Arg::Text(key),
                Arg::Integer(claimed_at),
            ],
        )
        .await
        .map(drop)
    }

    /// Frees `key`, claimed at `claimed_at`, after a request that stored nothing and must be
    /// allowed to run again (nothing, if another request has taken the claim over since).
    pub(crate) async fn release(&self, key: &str, claimed_at: i64) -> Result<(), CQRSError> {
        let sql = format!(
            "DELETE FROM {} WHERE idempotency_key = $1 AND claimed_at = $2 AND response IS NULL",
            self.table
        );
        self.write(&sql, &[Arg::Text(key), Arg::Integer(claimed_at)])
            .await
            .map(drop)
    }

    /// Takes over a claim that was abandoned (claimed at `claimed_at`, never completed):
    /// true for exactly one of several requests that try at once.
    pub(crate) async fn take_over(
        &self,
        key: &str,
        claimed_at: i64,
        now: i64,
    ) -> Result<bool, CQRSError> {
        let sql = format!(
            "UPDATE {} SET claimed_at = $1 \
             WHERE idempotency_key = $2 AND claimed_at = $3 AND response IS NULL",
            self.table
        );
        self.write(
            &sql,
            &[Arg::Integer(now), Arg::Text(key), Arg::Integer(claimed_at)],
        )
        .await
        .map(|rows| rows == 1)
    }
}

fn key_row<R: Row>(row: &R) -> Result<KeyRow, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(KeyRow {
        request: row.try_get(0)?,
        aggregate_id: row.try_get(1)?,
        claimed_at: row.try_get(2)?,
        response: row.try_get(3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::sqlite_placeholders;

    #[test]
    fn placeholders_become_question_marks() {
        assert_eq!(
            sqlite_placeholders("UPDATE t SET a = $1 WHERE b = $2 AND c = $10"),
            "UPDATE t SET a = ? WHERE b = ? AND c = ?"
        );
    }
}
