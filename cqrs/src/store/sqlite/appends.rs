//! The writer's connection for its most common group: appends alone, inserted with one
//! statement.
//!
//! sqlx runs each SQLite connection on a thread of its own: a statement is a message to that
//! thread and its result a wake-up of the writer task from there, and sqlx copies every
//! bound value into an argument buffer of its own on the way. For a group of nothing but
//! small appends, which is one `INSERT` that SQLite commits by itself, that hand-over is
//! most of what the writer does. This connection (`rusqlite`, on the same SQLite library
//! through the same `libsqlite3-sys`) runs that `INSERT` on the writer task itself, binding
//! the events' fields where they are.
//!
//! The statement, its commit and its fsync then run on the runtime worker that polls the
//! writer task: about as long as one group's commit, while the worker's other tasks can be
//! taken by the other workers. The connection never waits for a lock: with its busy timeout
//! at zero, a write lock held by another process makes it give the group back to the sqlx
//! connection, which waits for the lock on its own thread. Any other error gives the group
//! back too, and the sqlx connection runs it again and reports what it meets (an event that
//! was stored after all is recognised there by its id, as a retry).

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags};
use uuid::Uuid;

use crate::event::PersistableDomainEvent;

use super::rows::to_micros;
use super::writer::{insert_sql, ROWS_PER_INSERT};
use super::Durability;

/// A read-write connection to the store's file, used only by the writer task.
pub(super) struct AppendConnection {
    connection: Connection,
}

/// What [`AppendConnection::insert`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Inserted {
    /// Committed; the last row's position (the rows got consecutive positions ending there).
    Last(i64),
    /// A constraint refused the statement, which SQLite undid: nothing is stored.
    Refused,
    /// Not run, or failed otherwise: the sqlx connection is to run it. Nothing is stored,
    /// or if an error came after the commit, the sqlx connection's run finds the events
    /// stored under their ids and answers them as a retry.
    GivenBack,
}

impl AppendConnection {
    /// Opens the file at `path`, which the sqlx connection has already opened (and created
    /// in WAL mode), committing with `durability`.
    pub(super) fn open(path: &Path, durability: Durability) -> Result<Self, rusqlite::Error> {
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Zero: `SQLITE_BUSY` at once, never a wait on the runtime's worker.
        connection.busy_timeout(std::time::Duration::ZERO)?;
        connection.pragma_update(
            None,
            "synchronous",
            match durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            },
        )?;
        // One prepared statement per group size.
        connection.set_prepared_statement_cache_capacity(ROWS_PER_INSERT);
        Ok(AppendConnection { connection })
    }

    /// Inserts `rows` events (1 to [`ROWS_PER_INSERT`]) with one statement outside any
    /// transaction, so that SQLite commits them on their own.
    pub(super) fn insert<'a>(
        &mut self,
        events: impl Iterator<Item = &'a PersistableDomainEvent>,
        rows: usize,
    ) -> Inserted {
        if rows == 0 || rows > ROWS_PER_INSERT {
            return Inserted::GivenBack;
        }
        match self.run(events, rows) {
            Ok(last) => Inserted::Last(last),
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == ErrorCode::ConstraintViolation =>
            {
                Inserted::Refused
            }
            Err(error) => {
                tracing::debug!(%error, "grouped INSERT given back to the sqlx connection");
                Inserted::GivenBack
            }
        }
    }

    fn run<'a>(
        &mut self,
        events: impl Iterator<Item = &'a PersistableDomainEvent>,
        rows: usize,
    ) -> Result<i64, rusqlite::Error> {
        let mut statement = self.connection.prepare_cached(insert_sql(rows))?;
        let mut bound = 0;
        for event in events {
            if bound == rows {
                return Err(rusqlite::Error::InvalidParameterCount(bound + 1, rows));
            }
            let first = bound * COLUMNS + 1;
            let mut ids = [Uuid::encode_buffer(); 4];
            let [event_id, aggregate_id, correlation_id, causation_id] = &mut ids;
            statement.raw_bind_parameter(first, hyphenated(event.event_id, event_id))?;
            statement.raw_bind_parameter(first + 1, event.aggregate_type.as_str())?;
            statement
                .raw_bind_parameter(first + 2, hyphenated(event.aggregate_id, aggregate_id))?;
            statement.raw_bind_parameter(first + 3, event.sequence)?;
            statement.raw_bind_parameter(first + 4, event.event_type.as_str())?;
            statement.raw_bind_parameter(first + 5, event.event_version.as_str())?;
            statement.raw_bind_parameter(first + 6, event.payload.as_str())?;
            statement.raw_bind_parameter(first + 7, event.metadata.to_string())?;
            statement.raw_bind_parameter(first + 8, to_micros(event.timestamp))?;
            statement.raw_bind_parameter(
                first + 9,
                event
                    .correlation_id
                    .map(|id| hyphenated(id, correlation_id)),
            )?;
            statement.raw_bind_parameter(
                first + 10,
                event.causation_id.map(|id| hyphenated(id, causation_id)),
            )?;
            bound += 1;
        }
        if bound != rows {
            return Err(rusqlite::Error::InvalidParameterCount(bound, rows));
        }
        let inserted = statement.raw_execute()?;
        if inserted != rows {
            return Err(rusqlite::Error::StatementChangedRows(inserted));
        }
        Ok(self.connection.last_insert_rowid())
    }
}

/// Columns bound per event by the `INSERT` of [`insert_sql`].
const COLUMNS: usize = 11;

/// `id` as the stores write it (`Uuid::to_string`), without allocating.
fn hyphenated(id: Uuid, buffer: &mut [u8; 45]) -> &str {
    id.hyphenated().encode_lower(buffer)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::Connection;
    use uuid::Uuid;

    use super::{AppendConnection, Inserted};
    use crate::store::sqlite::writer::tests::{batch, remove_store_files};
    use crate::store::sqlite::{Durability, SqliteEventRepository};
    use crate::store::EventRepository;
    use crate::CQRSError;

    fn temp_path() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("cqrs-appends-{}.sqlite", Uuid::new_v4()))
    }

    /// The connection commits a statement's rows at consecutive positions, stores nothing of
    /// a statement a constraint refuses, and never waits for a lock another connection
    /// holds: it gives the group back at once.
    #[tokio::test]
    async fn inserts_commit_refusals_store_nothing_and_a_held_lock_is_given_back() {
        let path = temp_path();
        let store = SqliteEventRepository::open(&path).await.unwrap();
        store.append(batch(Uuid::new_v4(), 1, 2)).await.unwrap();
        let mut appends = AppendConnection::open(&path, Durability::Full).unwrap();
        let timeout: i64 = appends
            .connection
            .pragma_query_value(None, "busy_timeout", |row| row.get(0))
            .unwrap();
        assert_eq!(timeout, 0);

        let first = batch(Uuid::new_v4(), 1, 3);
        let second = batch(Uuid::new_v4(), 1, 1);
        let both = first.iter().chain(second.iter());
        assert_eq!(appends.insert(both, 4), Inserted::Last(6));
        let stored = store.read_all(0, 100).await.unwrap();
        let ids: Vec<Uuid> = stored.iter().map(|event| event.event_id).collect();
        let expected: Vec<Uuid> = first.iter().chain(&second).map(|e| e.event_id).collect();
        assert_eq!(&ids[2..], &expected[..]);
        assert_eq!(stored[5].position, 6);

        // A fresh event beside one already stored: the statement is refused whole.
        let fresh = batch(Uuid::new_v4(), 1, 1);
        let again = fresh.iter().chain(second.iter());
        assert_eq!(appends.insert(again, 2), Inserted::Refused);
        assert_eq!(store.read_all(0, 100).await.unwrap().len(), 6);

        // A count that does not match the events, or none at all, is not run.
        assert_eq!(appends.insert(fresh.iter(), 2), Inserted::GivenBack);
        assert_eq!(appends.insert(fresh.iter(), 0), Inserted::GivenBack);

        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert_eq!(appends.insert(fresh.iter(), 1), Inserted::GivenBack);
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(appends.insert(fresh.iter(), 1), Inserted::Last(7));
        drop(store);
        remove_store_files(&path);
    }

    /// While another process holds the write lock, appends wait for it as they always did
    /// (on the sqlx connection, within the busy timeout) and then commit, in order.
    #[tokio::test]
    async fn appends_wait_for_a_lock_held_elsewhere() {
        let path = temp_path();
        let store = SqliteEventRepository::open(&path).await.unwrap();
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let id = Uuid::new_v4();
        let events = batch(id, 1, 2);
        let waiting = tokio::spawn({
            let store = store.clone();
            let events = events.clone();
            async move { store.append(events).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "the append did not wait for the lock"
        );
        holder.execute_batch("COMMIT").unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), vec![1, 2]);
        match store.append(batch(id, 2, 1)).await {
            Err(CQRSError::Conflict { .. }) => {}
            other => panic!("expected a conflict, got {other:?}"),
        }
        let stored = store.read_all(0, 100).await.unwrap();
        assert_eq!(stored.len(), 2);
        drop(store);
        remove_store_files(&path);
    }
}
