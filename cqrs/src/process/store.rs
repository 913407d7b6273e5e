//! Where process instances are kept: the [`ProcessStore`] contract and the in-memory store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::Deadline;
use crate::error::CQRSError;

/// One process instance as stored: its state (JSON), its pending deadlines, whether it has
/// completed, and the version of its row.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessRow {
    /// The instance's id ([`ProcessManager::instance_id`](super::ProcessManager::instance_id)).
    pub instance: String,
    /// The state, as JSON.
    pub state: Value,
    /// The version of the row as loaded: 0 for an instance not stored yet; every commit of
    /// the row adds one.
    pub version: i64,
    /// The correlation id of the workflow the instance belongs to (that of the event that
    /// started it).
    pub correlation_id: Option<Uuid>,
    /// Pending deadlines, earliest first.
    pub deadlines: Vec<Deadline>,
    /// True once the instance completed.
    pub finished: bool,
}

impl ProcessRow {
    /// A row for an instance not stored yet.
    pub fn new(instance: impl Into<String>) -> Self {
        ProcessRow {
            instance: instance.into(),
            state: Value::Null,
            version: 0,
            correlation_id: None,
            deadlines: Vec::new(),
            finished: false,
        }
    }

    /// The earliest pending deadline's time.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.deadlines.iter().map(|d| d.due).min()
    }
}

/// Where a process's instances and checkpoint are kept.
///
/// The contract (the testkit's conformance suite checks it):
///
/// * [`commit`](ProcessStore::commit) writes rows and the checkpoint all or nothing. A row is
///   written only if the stored one still has the version it was loaded with (`version`;
///   0: not stored yet), and then gets `version + 1`; otherwise nothing is written and the
///   result is [`CQRSError::ViewConflict`]. A checkpoint lower than the stored one is the
///   same conflict.
/// * [`due`](ProcessStore::due) finds the unfinished instances with a deadline at or before a
///   time, earliest first.
#[async_trait]
pub trait ProcessStore: Send + Sync {
    /// The stored row of an instance, if any.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`], or a decode error for a damaged row.
    async fn load(&self, process: &str, instance: &str) -> Result<Option<ProcessRow>, CQRSError>;

    /// Writes `rows` (each at its `version + 1`) and moves the checkpoint to `checkpoint`
    /// when given, atomically.
    ///
    /// # Errors
    /// [`CQRSError::ViewConflict`] when a row's version or the checkpoint moved on;
    /// [`CQRSError::PersistenceError`].
    async fn commit(
        &self,
        process: &str,
        rows: Vec<ProcessRow>,
        checkpoint: Option<i64>,
    ) -> Result<(), CQRSError>;

    /// The process's checkpoint: the position of the last event it decided on, 0 if none.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    async fn checkpoint(&self, process: &str) -> Result<i64, CQRSError>;

    /// Up to `limit` unfinished instances with a deadline due at or before `now`, the
    /// earliest due first.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`], or a decode error for a damaged row.
    async fn due(
        &self,
        process: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ProcessRow>, CQRSError>;

    /// The earliest deadline of any unfinished instance.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    async fn next_due(&self, process: &str) -> Result<Option<DateTime<Utc>>, CQRSError>;

    /// Up to `limit` instances in id order (byte order), after the id `after`.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`], or a decode error for a damaged row.
    async fn list(
        &self,
        process: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ProcessRow>, CQRSError>;
}

#[async_trait]
impl<T: ProcessStore + ?Sized> ProcessStore for Arc<T> {
    async fn load(&self, process: &str, instance: &str) -> Result<Option<ProcessRow>, CQRSError> {
        (**self).load(process, instance).await
    }
    async fn commit(
        &self,
        process: &str,
        rows: Vec<ProcessRow>,
        checkpoint: Option<i64>,
    ) -> Result<(), CQRSError> {
        (**self).commit(process, rows, checkpoint).await
    }
    async fn checkpoint(&self, process: &str) -> Result<i64, CQRSError> {
        (**self).checkpoint(process).await
    }
    async fn due(
        &self,
        process: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ProcessRow>, CQRSError> {
        (**self).due(process, now, limit).await
    }
    async fn next_due(&self, process: &str) -> Result<Option<DateTime<Utc>>, CQRSError> {
        (**self).next_due(process).await
    }
    async fn list(
        &self,
        process: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ProcessRow>, CQRSError> {
        (**self).list(process, after, limit).await
    }
}

/// Process instances in memory. Cloning gives another handle to the same store.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use cqrs::{MemoryProcessStore, ProcessRow, ProcessStore};
/// let store = MemoryProcessStore::new();
/// store.commit("transfer", vec![ProcessRow::new("t1")], Some(3)).await?;
/// assert_eq!(store.load("transfer", "t1").await?.unwrap().version, 1);
/// assert_eq!(store.checkpoint("transfer").await?, 3);
/// // A second writer that loaded the same version loses.
/// assert!(store.commit("transfer", vec![ProcessRow::new("t1")], None).await.is_err());
/// # Ok::<(), cqrs::CQRSError>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryProcessStore {
    inner: Arc<Mutex<Processes>>,
}

#[derive(Debug, Default)]
struct Processes {
    rows: HashMap<String, BTreeMap<String, ProcessRow>>,
    checkpoints: HashMap<String, i64>,
}

impl MemoryProcessStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Processes> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The conflict of a process row or checkpoint that moved on.
pub(crate) fn conflict(process: &str, instance: &str, expected_version: i64) -> CQRSError {
    CQRSError::ViewConflict {
        view: format!("process {process}"),
        view_id: instance.to_owned(),
        expected_version,
    }
}

/// What a SQL store keeps in a row's `next_due` column: the earliest deadline of an
/// unfinished row, rounded up to the microsecond (the column's precision), so that a row is
/// never found due before its deadline; `None` for a finished row or one without deadlines.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn stored_next_due(row: &ProcessRow) -> Option<DateTime<Utc>> {
    if row.finished {
        return None;
    }
    let due = row.next_due()?;
    let micros = due.timestamp_micros();
    let exact = DateTime::<Utc>::from_timestamp_micros(micros)?;
    if exact == due {
        return Some(due);
    }
    DateTime::<Utc>::from_timestamp_micros(micros.saturating_add(1)).or(Some(exact))
}

#[async_trait]
impl ProcessStore for MemoryProcessStore {
    async fn load(&self, process: &str, instance: &str) -> Result<Option<ProcessRow>, CQRSError> {
        Ok(self
            .lock()
            .rows
            .get(process)
            .and_then(|rows| rows.get(instance))
            .cloned())
    }

    async fn commit(
        &self,
        process: &str,
        rows: Vec<ProcessRow>,
        checkpoint: Option<i64>,
    ) -> Result<(), CQRSError> {
        let mut inner = self.lock();
        if let Some(position) = checkpoint {
            let stored = inner.checkpoints.get(process).copied().unwrap_or(0);
            if position < stored {
                return Err(conflict(process, "(checkpoint)", stored));
            }
        }
        let stored = inner.rows.entry(process.to_owned()).or_default();
        for row in &rows {
            let version = stored.get(&row.instance).map_or(0, |r| r.version);
            if version != row.version {
                return Err(conflict(process, &row.instance, row.version));
            }
        }
        for mut row in rows {
            row.version += 1;
            row.deadlines.sort_by_key(|d| d.due);
            stored.insert(row.instance.clone(), row);
        }
        if let Some(position) = checkpoint {
            inner.checkpoints.insert(process.to_owned(), position);
        }
        Ok(())
    }

    async fn checkpoint(&self, process: &str) -> Result<i64, CQRSError> {
        Ok(self.lock().checkpoints.get(process).copied().unwrap_or(0))
    }

    async fn due(
        &self,
        process: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ProcessRow>, CQRSError> {
        let inner = self.lock();
        let mut due: Vec<ProcessRow> = inner
            .rows
            .get(process)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|row| !row.finished && row.next_due().is_some_and(|due| due <= now))
            .cloned()
            .collect();
        due.sort_by_key(ProcessRow::next_due);
        due.truncate(limit);
        Ok(due)
    }

    async fn next_due(&self, process: &str) -> Result<Option<DateTime<Utc>>, CQRSError> {
        Ok(self
            .lock()
            .rows
            .get(process)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|row| !row.finished)
            .filter_map(ProcessRow::next_due)
            .min())
    }

    async fn list(
        &self,
        process: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ProcessRow>, CQRSError> {
        let inner = self.lock();
        Ok(inner
            .rows
            .get(process)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|row| after.is_none_or(|after| row.instance.as_str() > after))
            .take(limit)
            .cloned()
            .collect())
    }
}
