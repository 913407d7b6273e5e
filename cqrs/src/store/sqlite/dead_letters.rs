//! Dead letters in the store's SQLite file, recorded in the transaction of the checkpoint
//! that skips them.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::Row;
use uuid::Uuid;

use crate::error::CQRSError;
use crate::store::{DeadLetter, DeadLetterSkip, DeadLetters};

use super::SqliteEventRepository;

/// The table, created by [`SqliteDeadLetters::migrate`] (idempotent).
const DDL: &str = "CREATE TABLE IF NOT EXISTS cqrs_dead_letters (
    projection     TEXT    NOT NULL,
    position       INTEGER NOT NULL,
    view_name      TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    event_version  TEXT    NOT NULL,
    error          TEXT    NOT NULL,
    attempts       INTEGER NOT NULL,
    recorded_at    INTEGER NOT NULL,
    PRIMARY KEY (projection, position)
) STRICT, WITHOUT ROWID";

const UPSERT: &str = "INSERT INTO cqrs_dead_letters (projection, position, view_name, event_id, \
     aggregate_type, aggregate_id, sequence, event_type, event_version, error, attempts, \
     recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (projection, position) DO UPDATE SET view_name = excluded.view_name, \
     event_id = excluded.event_id, aggregate_type = excluded.aggregate_type, \
     aggregate_id = excluded.aggregate_id, sequence = excluded.sequence, \
     event_type = excluded.event_type, event_version = excluded.event_version, \
     error = excluded.error, attempts = excluded.attempts, recorded_at = excluded.recorded_at";

const LIST: &str = "SELECT projection, position, view_name, event_id, aggregate_type, \
     aggregate_id, sequence, event_type, event_version, error, attempts, recorded_at \
     FROM cqrs_dead_letters WHERE projection = ? ORDER BY position";

const MOVE_CHECKPOINT: &str = "UPDATE cqrs_checkpoints SET position = ?, updated_at = ? \
     WHERE name = ? AND position = ?";

const FIRST_CHECKPOINT: &str = "INSERT INTO cqrs_checkpoints (name, position, updated_at) \
     VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING";

/// A durable [`DeadLetters`] sink in the `cqrs_dead_letters` table of a
/// [`SqliteEventRepository`]'s file, for
/// [`PoisonPolicy::SkipAndRecord`](crate::projection::PoisonPolicy::SkipAndRecord).
///
/// One row per skipped event, keyed by (projection, position): the projection's checkpoint
/// name (which names the view and its version), the view's table, the event's id,
/// aggregate type and id, sequence, type and version, the error, the number of tries and
/// when it was recorded.
///
/// With a projection whose views are in the same file ([`SqliteViewRepository`](super::SqliteViewRepository)),
/// the dead letter is written in the same transaction as the checkpoint that skips the
/// event ([`DeadLetters::record_and_skip`]): it is recorded **exactly once**, crash or not.
/// A record of the same (projection, position) again replaces the row, never duplicates it.
///
/// The table is created by [`migrate`](Self::migrate), or on first use; run the store's
/// own [`migrate`](SqliteEventRepository::migrate) first (it creates the checkpoints).
///
/// ```no_run
/// # use cqrs::doc::{Counter, CounterTotal};
/// use cqrs::{CQRSError, PoisonPolicy, Projection, SqliteDeadLetters, SqliteEventRepository};
///
/// # async fn run() -> Result<(), CQRSError> {
/// let store = SqliteEventRepository::open("counter.sqlite").await?;
/// let dead_letters = SqliteDeadLetters::new(&store);
/// dead_letters.migrate().await?;
/// let projection = Projection::<Counter, CounterTotal>::new(store.clone(), store.views())
///     .with_poison_policy(PoisonPolicy::SkipAndRecord)
///     .with_dead_letters(dead_letters.clone());
/// projection.catch_up().await?;
/// for letter in projection.dead_letters().await? {
///     eprintln!("skipped {} #{}: {}", letter.aggregate_id, letter.sequence, letter.error);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteDeadLetters {
    store: SqliteEventRepository,
    migrated: Arc<AtomicBool>,
}

impl fmt::Debug for SqliteDeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteDeadLetters")
            .field("migrated", &self.migrated.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SqliteDeadLetters {
    /// Dead letters in the file of `store`, through its connections.
    pub fn new(store: &SqliteEventRepository) -> Self {
        SqliteDeadLetters {
            store: store.clone(),
            migrated: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Creates the `cqrs_dead_letters` table if it does not exist. Idempotent; also done on
    /// first use.
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

    async fn ensure_table(&self) -> Result<(), CQRSError> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        self.migrate().await
    }
}

async fn upsert(conn: &mut SqliteConnection, letter: &DeadLetter) -> Result<(), sqlx::Error> {
    sqlx::query(UPSERT)
        .bind(letter.projection.as_str())
        .bind(letter.position)
        .bind(letter.view.as_str())
        .bind(letter.event_id.to_string())
        .bind(letter.aggregate_type.as_str())
        .bind(letter.aggregate_id.to_string())
        .bind(letter.sequence)
        .bind(letter.event_type.as_str())
        .bind(letter.event_version.as_str())
        .bind(letter.error.as_str())
        .bind(i64::from(letter.attempts))
        .bind(letter.recorded_at.timestamp_micros())
        .execute(conn)
        .await
        .map(|_| ())
}

/// A stored row that is not a dead letter (a hand edit): named by projection and position.
fn bad_row(projection: &str, position: i64, what: &str) -> CQRSError {
    CQRSError::persistence(format!(
        "cqrs_dead_letters row ({projection}, {position}): {what}"
    ))
}

fn decode(row: &SqliteRow) -> Result<DeadLetter, CQRSError> {
    let projection: String = row.try_get(0).map_err(CQRSError::persistence)?;
    let position: i64 = row.try_get(1).map_err(CQRSError::persistence)?;
    let column = |e: sqlx::Error| bad_row(&projection, position, &e.to_string());
    let event_id: String = row.try_get(3).map_err(column)?;
    let aggregate_id: String = row.try_get(5).map_err(column)?;
    let attempts: i64 = row.try_get(10).map_err(column)?;
    let recorded_at: i64 = row.try_get(11).map_err(column)?;
    let uuid = |text: &str, what: &str| {
        Uuid::parse_str(text).map_err(|e| bad_row(&projection, position, &format!("{what}: {e}")))
    };
    Ok(DeadLetter {
        view: row.try_get(2).map_err(column)?,
        event_id: uuid(&event_id, "event_id")?,
        aggregate_type: row.try_get(4).map_err(column)?,
        aggregate_id: uuid(&aggregate_id, "aggregate_id")?,
        sequence: row.try_get(6).map_err(column)?,
        event_type: row.try_get(7).map_err(column)?,
        event_version: row.try_get(8).map_err(column)?,
        error: row.try_get(9).map_err(column)?,
        attempts: u32::try_from(attempts)
            .map_err(|_| bad_row(&projection, position, "attempts out of range"))?,
        recorded_at: DateTime::<Utc>::from_timestamp_micros(recorded_at)
            .ok_or_else(|| bad_row(&projection, position, "recorded_at out of range"))?,
        position,
        projection,
    })
}

#[async_trait]
impl DeadLetters for SqliteDeadLetters {
    async fn record(&self, letter: DeadLetter) -> Result<(), CQRSError> {
        self.ensure_table().await?;
        let mut conn = self
            .store
            .pool()
            .acquire()
            .await
            .map_err(CQRSError::persistence)?;
        upsert(&mut conn, &letter)
            .await
            .map_err(CQRSError::persistence)
    }

    async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, CQRSError> {
        self.ensure_table().await?;
        let rows = sqlx::query(LIST)
            .bind(projection)
            .fetch_all(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        rows.iter().map(decode).collect()
    }

    /// Moves the checkpoint `letter.projection` from `from` to `letter.position` in
    /// `cqrs_checkpoints` (where [`SqliteViewRepository`](super::SqliteViewRepository)
    /// commits it) and records the letter, in one `BEGIN IMMEDIATE` transaction.
    async fn record_and_skip(
        &self,
        letter: &DeadLetter,
        from: i64,
    ) -> Result<DeadLetterSkip, CQRSError> {
        letter.ensure_after(from)?;
        self.ensure_table().await?;
        // Dropping the transaction before its commit rolls it back.
        let mut tx = self
            .store
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(CQRSError::persistence)?;
        let now = Utc::now().timestamp_micros();
        let mut moved = sqlx::query(MOVE_CHECKPOINT)
            .bind(letter.position)
            .bind(now)
            .bind(letter.projection.as_str())
            .bind(from)
            .execute(&mut *tx)
            .await
            .map_err(CQRSError::persistence)?
            .rows_affected()
            == 1;
        if !moved && from == 0 {
            moved = sqlx::query(FIRST_CHECKPOINT)
                .bind(letter.projection.as_str())
                .bind(letter.position)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(CQRSError::persistence)?
                .rows_affected()
                == 1;
        }
        if !moved {
            return Ok(DeadLetterSkip::Stale);
        }
        upsert(&mut tx, letter)
            .await
            .map_err(CQRSError::persistence)?;
        tx.commit().await.map_err(CQRSError::persistence)?;
        Ok(DeadLetterSkip::Committed)
    }
}
