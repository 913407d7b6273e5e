//! Dead letters in the store's PostgreSQL schema, recorded in the transaction of the
//! checkpoint that skips them.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;

use crate::error::CQRSError;
use crate::store::{DeadLetter, DeadLetterSkip, DeadLetters};

use super::PostgresEventRepository;

/// The statements, with the store's (validated) schema spliced in.
struct Statements {
    ddl: String,
    lock_key: String,
    upsert: String,
    list: String,
    move_checkpoint: String,
    first_checkpoint: String,
}

impl Statements {
    fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        Statements {
            ddl: format!(
                "CREATE TABLE IF NOT EXISTS {s}.cqrs_dead_letters (
                    projection     TEXT        NOT NULL,
                    position       BIGINT      NOT NULL,
                    view_name      TEXT        NOT NULL,
                    event_id       UUID        NOT NULL,
                    aggregate_type TEXT        NOT NULL,
                    aggregate_id   UUID        NOT NULL,
                    sequence       BIGINT      NOT NULL,
                    event_type     TEXT        NOT NULL,
                    event_version  TEXT        NOT NULL,
                    error          TEXT        NOT NULL,
                    attempts       BIGINT      NOT NULL,
                    recorded_at    TIMESTAMPTZ NOT NULL,
                    PRIMARY KEY (projection, position)
                )"
            ),
            lock_key: format!("cqrs_dead_letters {schema}"),
            upsert: format!(
                "INSERT INTO {s}.cqrs_dead_letters (projection, position, view_name, event_id, \
                 aggregate_type, aggregate_id, sequence, event_type, event_version, error, \
                 attempts, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (projection, position) DO UPDATE SET view_name = EXCLUDED.view_name, \
                 event_id = EXCLUDED.event_id, aggregate_type = EXCLUDED.aggregate_type, \
                 aggregate_id = EXCLUDED.aggregate_id, sequence = EXCLUDED.sequence, \
                 event_type = EXCLUDED.event_type, event_version = EXCLUDED.event_version, \
                 error = EXCLUDED.error, attempts = EXCLUDED.attempts, \
                 recorded_at = EXCLUDED.recorded_at"
            ),
            list: format!(
                "SELECT projection, position, view_name, event_id, aggregate_type, aggregate_id, \
                 sequence, event_type, event_version, error, attempts, recorded_at \
                 FROM {s}.cqrs_dead_letters WHERE projection = $1 ORDER BY position"
            ),
            move_checkpoint: format!(
                "UPDATE {s}.cqrs_checkpoints SET position = $2, updated_at = now() \
                 WHERE name = $1 AND position = $3"
            ),
            first_checkpoint: format!(
                "INSERT INTO {s}.cqrs_checkpoints (name, position, updated_at) \
                 VALUES ($1, $2, now()) ON CONFLICT (name) DO NOTHING"
            ),
        }
    }
}

/// A durable [`DeadLetters`] sink in the `cqrs_dead_letters` table of a
/// [`PostgresEventRepository`]'s schema, for
/// [`PoisonPolicy::SkipAndRecord`](crate::projection::PoisonPolicy::SkipAndRecord).
///
/// One row per skipped event, keyed by (projection, position): the projection's checkpoint
/// name (which names the view and its version), the view's table, the event's id,
/// aggregate type and id, sequence, type and version, the error, the number of tries and
/// when it was recorded.
///
/// With a projection whose views are in the same schema
/// ([`PostgresViewRepository`](super::PostgresViewRepository)), the dead letter is written
/// in the same transaction as the checkpoint that skips the event
/// ([`DeadLetters::record_and_skip`]): it is recorded **exactly once**, crash or not. A
/// record of the same (projection, position) again replaces the row, never duplicates it.
///
/// The table is created by [`migrate`](Self::migrate), or on first use; run the store's
/// own [`migrate`](PostgresEventRepository::migrate) first (it creates the schema and the
/// checkpoints).
///
/// ```no_run
/// use cqrs::PostgresDeadLetters;
/// use cqrs::PostgresEventRepository;
///
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// let store = PostgresEventRepository::connect("postgres://localhost/bank").await?;
/// store.migrate().await?;
/// let dead_letters = PostgresDeadLetters::new(&store);
/// dead_letters.migrate().await?;
/// // Projection::new(store.clone(), PostgresViewRepository::new(&store))
/// //     .with_poison_policy(PoisonPolicy::SkipAndRecord)
/// //     .with_dead_letters(dead_letters.clone())
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresDeadLetters {
    store: PostgresEventRepository,
    sql: Arc<Statements>,
    migrated: Arc<AtomicBool>,
}

impl fmt::Debug for PostgresDeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresDeadLetters")
            .field("schema", &self.store.schema())
            .field("migrated", &self.migrated.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PostgresDeadLetters {
    /// Dead letters in the schema of `store`, through its pool.
    pub fn new(store: &PostgresEventRepository) -> Self {
        PostgresDeadLetters {
            store: store.clone(),
            sql: Arc::new(Statements::new(store.schema())),
            migrated: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Creates the `cqrs_dead_letters` table if it does not exist. Idempotent, and safe when
    /// several processes run it at once (under an advisory lock); also done on first use.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    pub async fn migrate(&self) -> Result<(), CQRSError> {
        let mut tx = self
            .store
            .pool()
            .begin()
            .await
            .map_err(CQRSError::persistence)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&self.sql.lock_key)
            .execute(&mut *tx)
            .await
            .map_err(CQRSError::persistence)?;
        sqlx::query(&self.sql.ddl)
            .execute(&mut *tx)
            .await
            .map_err(CQRSError::persistence)?;
        tx.commit().await.map_err(CQRSError::persistence)?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    async fn ensure_table(&self) -> Result<(), CQRSError> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        self.migrate().await
    }

    async fn upsert(&self, conn: &mut PgConnection, letter: &DeadLetter) -> Result<(), CQRSError> {
        sqlx::query(&self.sql.upsert)
            .bind(&letter.projection)
            .bind(letter.position)
            .bind(&letter.view)
            .bind(letter.event_id)
            .bind(&letter.aggregate_type)
            .bind(letter.aggregate_id)
            .bind(letter.sequence)
            .bind(&letter.event_type)
            .bind(&letter.event_version)
            .bind(&letter.error)
            .bind(i64::from(letter.attempts))
            .bind(letter.recorded_at)
            .execute(conn)
            .await
            .map(|_| ())
            .map_err(CQRSError::persistence)
    }
}

fn decode(row: &PgRow) -> Result<DeadLetter, CQRSError> {
    let projection: String = row.try_get(0).map_err(CQRSError::persistence)?;
    let position: i64 = row.try_get(1).map_err(CQRSError::persistence)?;
    let bad = |what: String| {
        CQRSError::persistence(format!(
            "cqrs_dead_letters row ({projection}, {position}): {what}"
        ))
    };
    let column = |e: sqlx::Error| bad(e.to_string());
    let attempts: i64 = row.try_get(10).map_err(column)?;
    let recorded_at: DateTime<Utc> = row.try_get(11).map_err(column)?;
    Ok(DeadLetter {
        view: row.try_get(2).map_err(column)?,
        event_id: row.try_get(3).map_err(column)?,
        aggregate_type: row.try_get(4).map_err(column)?,
        aggregate_id: row.try_get(5).map_err(column)?,
        sequence: row.try_get(6).map_err(column)?,
        event_type: row.try_get(7).map_err(column)?,
        event_version: row.try_get(8).map_err(column)?,
        error: row.try_get(9).map_err(column)?,
        attempts: u32::try_from(attempts)
            .map_err(|_| bad(format!("attempts {attempts} out of range")))?,
        recorded_at,
        position,
        projection,
    })
}

#[async_trait]
impl DeadLetters for PostgresDeadLetters {
    async fn record(&self, letter: DeadLetter) -> Result<(), CQRSError> {
        self.ensure_table().await?;
        let mut conn = self
            .store
            .pool()
            .acquire()
            .await
            .map_err(CQRSError::persistence)?;
        self.upsert(&mut conn, &letter).await
    }

    async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, CQRSError> {
        self.ensure_table().await?;
        let rows = sqlx::query(&self.sql.list)
            .bind(projection)
            .fetch_all(self.store.pool())
            .await
            .map_err(CQRSError::persistence)?;
        rows.iter().map(decode).collect()
    }

    /// Moves the checkpoint `letter.projection` from `from` to `letter.position` in
    /// `cqrs_checkpoints` (where [`PostgresViewRepository`](super::PostgresViewRepository)
    /// commits it) and records the letter, in one transaction. The checkpoint's row lock
    /// orders it with any other projector's commit.
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
            .begin()
            .await
            .map_err(CQRSError::persistence)?;
        let mut moved = sqlx::query(&self.sql.move_checkpoint)
            .bind(&letter.projection)
            .bind(letter.position)
            .bind(from)
            .execute(&mut *tx)
            .await
            .map_err(CQRSError::persistence)?
            .rows_affected()
            == 1;
        if !moved && from == 0 {
            moved = sqlx::query(&self.sql.first_checkpoint)
                .bind(&letter.projection)
                .bind(letter.position)
                .execute(&mut *tx)
                .await
                .map_err(CQRSError::persistence)?
                .rows_affected()
                == 1;
        }
        if !moved {
            return Ok(DeadLetterSkip::Stale);
        }
        self.upsert(&mut tx, letter).await?;
        tx.commit().await.map_err(CQRSError::persistence)?;
        Ok(DeadLetterSkip::Committed)
    }
}
