//! Appending a batch alone: one statement, and the explanation of a unique-key violation (an
//! idempotent retry, a reused event id, or a lost race).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::PostgresEventRepository;
use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::{explain_refused_append, validate_batch, StoredEventId};

impl PostgresEventRepository {
    /// Appends one batch (see [`EventRepository::append`] and the type's docs).
    pub(super) async fn append_batch(
        &self,
        events: Vec<PersistableDomainEvent>,
    ) -> Result<Vec<i64>, CQRSError> {
        let expected = validate_batch(&events)?;
        self.append_validated(events, expected).await
    }

    /// Appends one batch that passed [`validate_batch`] (`expected` is what it returned) in
    /// a statement of its own.
    pub(super) async fn append_validated(
        &self,
        events: Vec<PersistableDomainEvent>,
        expected: i64,
    ) -> Result<Vec<i64>, CQRSError> {
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
                .bind(event.correlation_id)
                .bind(event.causation_id)
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
            let mut correlation_ids: Vec<Option<Uuid>> = Vec::with_capacity(n);
            let mut causation_ids: Vec<Option<Uuid>> = Vec::with_capacity(n);
            for event in &events {
                event_ids.push(event.event_id);
                sequences.push(event.sequence);
                event_types.push(event.event_type.as_str());
                event_versions.push(event.event_version.as_str());
                payloads.push(&event.payload);
                metadata.push(&event.metadata);
                timestamps.push(event.timestamp);
                correlation_ids.push(event.correlation_id);
                causation_ids.push(event.causation_id);
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
                .bind(&correlation_ids)
                .bind(&causation_ids)
                .fetch_all(&self.inner.pool)
                .await
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
                return self.explain_unique_violation(&events, expected).await;
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
            return Err(skips_ahead(&aggregate_type, aggregate_id, expected));
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

    /// An append hit a unique key: tell an idempotent retry (success, with the stored
    /// positions), a reused id and a lost race apart.
    async fn explain_unique_violation(
        &self,
        events: &[PersistableDomainEvent],
        expected: i64,
    ) -> Result<Vec<i64>, CQRSError> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        // Not kept prepared: this runs rarely, and a generic plan made while the table was
        // small scans it (`event_id = ANY(..)` on a few pages), for the connection's life.
        let rows = sqlx::query(&self.inner.sql.find_ids)
            .persistent(false)
            .bind(&ids)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        let mut stored: HashMap<Uuid, StoredEventId> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let found = StoredEventId {
                aggregate_type: row.try_get(1).map_err(CQRSError::persistence)?,
                aggregate_id: row.try_get(2).map_err(CQRSError::persistence)?,
                sequence: row.try_get(3).map_err(CQRSError::persistence)?,
                position: row.try_get(4).map_err(CQRSError::persistence)?,
            };
            stored.insert(row.try_get(0).map_err(CQRSError::persistence)?, found);
        }
        explain_refused_append(events, &stored, expected)
    }
}

/// The answer to an append whose previous sequence `expected` is not stored.
pub(super) fn skips_ahead(aggregate_type: &str, aggregate_id: Uuid, expected: i64) -> CQRSError {
    CQRSError::InvalidAppend(format!(
        "first sequence {} skips ahead of the stored history of {aggregate_type} {aggregate_id}",
        expected + 1
    ))
}

/// SQLSTATEs of an append refused for what the events hold, which no retry gets past:
/// `untranslatable_character` (a `\u0000` in `jsonb`), `character_not_in_repertoire` (a NUL
/// in `text`), and `invalid_text_representation` (a payload that is not JSON).
const UNSTORABLE: [&str; 3] = ["22P05", "22021", "22P02"];
