//! Event reads on read-only connections of their own, run on Tokio's blocking threads.
//!
//! sqlx's SQLite driver runs each connection on a thread of its own and sends every row it
//! steps to the caller's task through a channel, copying every column into a value of its
//! own on the way: a row costs more in that hand-over than SQLite takes to read it. Here a
//! whole read (the statement, every row, and decoding the rows into events) is one blocking
//! job on a `rusqlite` connection (the same SQLite library as sqlx's, through the same
//! `libsqlite3-sys`). On Tokio's multi-threaded runtime it runs on the caller's thread
//! under `block_in_place`, which hands that worker's other tasks to another thread for the
//! read's duration: no wake-up of a blocking thread and none of the caller after it, about
//! a tenth of a 500-event catch-up page's time. A read on a current-thread runtime, which
//! has no other worker to take those tasks, goes to a blocking thread instead.
//!
//! The connections open the file read-only. Like the sqlx readers they never wait for the
//! writer (WAL) and each statement reads one committed state of the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use tokio::runtime::RuntimeFlavor;
use tokio::sync::Semaphore;

use crate::error::CQRSError;
use crate::event::{PersistableDomainEvent, RowNames};

use super::rows::{decode_event, EventRow, Page, Payloads, EVENT_COLUMNS};

/// Read-only connections to the store's file, at most `connections` in use at once.
pub(super) struct EventReader {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl fmt::Debug for EventReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EventReader {
    /// A reader of the file at `path`, or `None` when `path` does not name a plain file
    /// (an in-memory or URI database): reads then stay on the sqlx pool.
    pub(super) fn new(path: &Path, busy_timeout: Duration, connections: u32) -> Option<Self> {
        let name = path.to_str()?;
        if name.is_empty() || name.starts_with(':') || name.starts_with("file:") {
            return None;
        }
        Some(EventReader {
            path: path.to_owned(),
            busy_timeout,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(connections.max(1) as usize),
        })
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Connection>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn open(&self) -> Result<Connection, rusqlite::Error> {
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(self.busy_timeout)?;
        Ok(connection)
    }

    /// Runs `read` on a connection, on a blocking thread.
    async fn run<T, F>(self: &Arc<Self>, read: F) -> Result<T, CQRSError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, CQRSError> + Send + 'static,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| CQRSError::persistence("the SQLite event reader is closed"))?;
        let idle = self.idle().pop();
        let this = Arc::clone(self);
        let job = move || {
            let connection = match idle {
                Some(connection) => connection,
                None => match this.open() {
                    Ok(connection) => connection,
                    Err(error) => return (None, Err(CQRSError::persistence(error))),
                },
            };
            let result = read(&connection);
            (Some(connection), result)
        };
        let on_workers = tokio::runtime::Handle::try_current()
            .is_ok_and(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread);
        let (connection, result) = if on_workers {
            tokio::task::block_in_place(job)
        } else {
            tokio::task::spawn_blocking(job)
                .await
                .map_err(CQRSError::persistence)?
        };
        if let Some(connection) = connection {
            self.idle().push(connection);
        }
        result
    }

    /// `EventRepository::load_events`.
    pub(super) async fn load_events(
        self: &Arc<Self>,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let (aggregate_type, aggregate_id) = (aggregate_type.to_owned(), aggregate_id.to_owned());
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM cqrs_events \
                     WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND sequence > ?3 \
                     ORDER BY sequence"
                ))
                .map_err(CQRSError::persistence)?;
            let rows = statement
                .query((aggregate_type, aggregate_id, after_sequence))
                .map_err(CQRSError::persistence)?;
            let mut events = Vec::new();
            let mut names = RowNames::default();
            let mut rows = rows;
            while let Some(row) = rows.next().map_err(CQRSError::persistence)? {
                events.push(decode_event(&Columns(row), &mut names, Payloads::Checked)?);
            }
            Ok(events)
        })
        .await
    }

    /// `EventRepository::read_all`, as a [`Page`].
    pub(super) async fn read_all(
        self: &Arc<Self>,
        after_position: i64,
        limit: i64,
    ) -> Result<Page, CQRSError> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM cqrs_events WHERE position > ?1 \
                     ORDER BY position LIMIT ?2"
                ))
                .map_err(CQRSError::persistence)?;
            let rows = statement
                .query((after_position, limit))
                .map_err(CQRSError::persistence)?;
            let mut page = Page::with_capacity(usize::try_from(limit).unwrap_or(0).min(4096));
            let mut rows = rows;
            while let Some(row) = rows.next().map_err(CQRSError::persistence)? {
                if !page.push(&Columns(row)) {
                    break;
                }
            }
            Ok(page)
        })
        .await
    }
}

/// A rusqlite row as an [`EventRow`].
struct Columns<'a, 'r>(&'a rusqlite::Row<'r>);

impl EventRow for Columns<'_, '_> {
    fn integer(&self, index: usize) -> Result<i64, String> {
        match self.0.get_ref(index).map_err(|error| error.to_string())? {
            ValueRef::Integer(value) => Ok(value),
            other => Err(format!(
                "column {index} is {:?}, not INTEGER",
                other.data_type()
            )),
        }
    }

    fn text(&self, index: usize) -> Result<&str, String> {
        match self.0.get_ref(index).map_err(|error| error.to_string())? {
            ValueRef::Text(bytes) => std::str::from_utf8(bytes)
                .map_err(|error| format!("column {index} is not UTF-8: {error}")),
            other => Err(format!(
                "column {index} is {:?}, not TEXT",
                other.data_type()
            )),
        }
    }

    fn optional_text(&self, index: usize) -> Result<Option<&str>, String> {
        match self.0.get_ref(index).map_err(|error| error.to_string())? {
            ValueRef::Null => Ok(None),
            _ => self.text(index).map(Some),
        }
    }

    fn text_bytes(&self, index: usize) -> Result<&[u8], String> {
        match self.0.get_ref(index).map_err(|error| error.to_string())? {
            ValueRef::Text(bytes) => Ok(bytes),
            other => Err(format!(
                "column {index} is {:?}, not TEXT",
                other.data_type()
            )),
        }
    }

    fn optional_text_bytes(&self, index: usize) -> Result<Option<&[u8]>, String> {
        match self.0.get_ref(index).map_err(|error| error.to_string())? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(bytes) => Ok(Some(bytes)),
            other => Err(format!(
                "column {index} is {:?}, not TEXT",
                other.data_type()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::runtime::Builder;
    use uuid::Uuid;

    use crate::store::sqlite::writer::tests::{batch, remove_store_files};
    use crate::store::sqlite::SqliteEventRepository;
    use crate::store::EventRepository;

    /// Reads run in place on a multi-threaded runtime and on a blocking thread on a
    /// current-thread one (where `block_in_place` would panic); both answer the same.
    #[test]
    fn reads_answer_alike_on_either_runtime() {
        let path = std::env::temp_dir().join(format!("cqrs-reader-{}.sqlite", Uuid::new_v4()));
        let id = Uuid::new_v4();
        let mut answers = Vec::new();
        for multi in [false, true] {
            let runtime = if multi {
                Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
            } else {
                Builder::new_current_thread().enable_all().build()
            }
            .unwrap();
            let path = path.clone();
            answers.push(runtime.block_on(async move {
                let store = SqliteEventRepository::open(&path).await.unwrap();
                if !multi {
                    store.append(batch(id, 1, 3)).await.unwrap();
                }
                // From a spawned task too: a worker thread on the multi-threaded runtime.
                let reads = tokio::spawn(async move {
                    let all = store.read_all(0, 10).await.unwrap();
                    let history = store.load_events("counter", id, 1).await.unwrap();
                    (all, history)
                });
                let (all, history) = reads.await.unwrap();
                let ids = |events: &[crate::PersistableDomainEvent]| {
                    events
                        .iter()
                        .map(|e| (e.event_id, e.position))
                        .collect::<Vec<_>>()
                };
                (ids(&all), ids(&history))
            }));
        }
        assert_eq!(answers[0].0.len(), 3);
        assert_eq!(answers[0].1.len(), 2);
        assert_eq!(answers[0], answers[1]);
        remove_store_files(&path);
    }
}
