//! Where a projection records the events it skipped: the [`DeadLetters`] contract and the
//! [`DeadLetter`] it stores.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{CQRSError, DamagedRow};
use crate::event::PersistableDomainEvent;

/// A poison event that a projection skipped under [`PoisonPolicy::SkipAndRecord`](crate::PoisonPolicy::SkipAndRecord).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The projection's checkpoint name.
    pub projection: String,
    /// The view's table name.
    pub view: String,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's aggregate type.
    pub aggregate_type: String,
    /// The event's aggregate id.
    pub aggregate_id: Uuid,
    /// The event's sequence within its aggregate.
    pub sequence: i64,
    /// The event's global position; for an event without one (position 0, from a store
    /// without a global order, skipped by a per-aggregate projection), the negative key
    /// [`DeadLetter::key_without_position`] of its aggregate and sequence, so that the
    /// sinks, which keep one letter per (projection, position), keep one per such event.
    pub position: i64,
    /// The event's stored type name.
    pub event_type: String,
    /// The event's stored version.
    pub event_version: String,
    /// The last error, rendered.
    pub error: String,
    /// How many times the event was tried.
    pub attempts: u32,
    /// When it was skipped.
    pub recorded_at: DateTime<Utc>,
}

impl DeadLetter {
    /// The dead letter of `event`, skipped by `projection` (of view `view`) after `attempts`
    /// tries that ended with `error`.
    pub fn new(
        projection: &str,
        view: &str,
        event: &PersistableDomainEvent,
        error: &CQRSError,
        attempts: u32,
    ) -> Self {
        DeadLetter {
            projection: projection.to_owned(),
            view: view.to_owned(),
            event_id: event.event_id,
            aggregate_type: event.aggregate_type.to_string(),
            aggregate_id: event.aggregate_id,
            sequence: event.sequence,
            position: event.position,
            event_type: event.event_type.to_string(),
            event_version: event.event_version.to_string(),
            error: error.to_string(),
            attempts,
            recorded_at: Utc::now(),
        }
    }

    /// The dead letter of a row the store could not turn into an event
    /// ([`CQRSError::DamagedRow`]): what could be read of its identity, the nil UUID and
    /// empty names where nothing could.
    pub fn for_damaged_row(
        projection: &str,
        view: &str,
        damage: &DamagedRow,
        attempts: u32,
    ) -> Self {
        DeadLetter {
            projection: projection.to_owned(),
            view: view.to_owned(),
            event_id: damage.event_id.unwrap_or_default(),
            aggregate_type: damage.aggregate_type.clone().unwrap_or_default(),
            aggregate_id: damage.aggregate_id.unwrap_or_default(),
            sequence: damage.sequence.unwrap_or_default(),
            position: damage.position,
            event_type: damage.event_type.clone().unwrap_or_default(),
            event_version: damage.event_version.clone().unwrap_or_default(),
            error: damage.to_string(),
            attempts,
            recorded_at: Utc::now(),
        }
    }

    /// The position a letter takes for an event that has none (a store without a global
    /// order): a negative number (never a position, which starts at 1) derived from the
    /// aggregate type, id and sequence (64-bit FNV-1a of `"{type}:{id}#{sequence}"`, the sign
    /// bit set), the same on every run and every machine, so that recording the same event
    /// again replaces its letter. Two events share one with a chance of about 1 in 2^63.
    ///
    /// ```
    /// let id = uuid::Uuid::nil();
    /// let key = cqrs::DeadLetter::key_without_position("account", id, 3);
    /// assert!(key < 0);
    /// assert_eq!(key, cqrs::DeadLetter::key_without_position("account", id, 3));
    /// assert_ne!(key, cqrs::DeadLetter::key_without_position("account", id, 4));
    /// ```
    pub fn key_without_position(aggregate_type: &str, aggregate_id: Uuid, sequence: i64) -> i64 {
        let text = format!("{aggregate_type}:{}#{sequence}", aggregate_id.hyphenated());
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // The low 63 bits, made negative: from -2^63 to -1.
        -((hash >> 1) as i64) - 1
    }

    /// What a [`DeadLetters::record_and_skip`] implementation checks first: skipping the
    /// event must move the checkpoint forward from `from`.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the letter's position is not after `from`.
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn ensure_after(&self, from: i64) -> Result<(), CQRSError> {
        if self.position <= from {
            return Err(CQRSError::persistence(format!(
                "dead letter at position {} is not after the checkpoint {from} of {}",
                self.position, self.projection
            )));
        }
        Ok(())
    }
}

/// What [`DeadLetters::record_and_skip`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterSkip {
    /// The dead letter is recorded and the checkpoint moved past the event, in one
    /// transaction: exactly once.
    Committed,
    /// The checkpoint was no longer where the projection left it (another projector moved
    /// it): nothing was written.
    Stale,
    /// The sink cannot move checkpoints (the provided implementation): the projection
    /// [`record`](DeadLetters::record)s the letter, then commits the checkpoint through its
    /// view store (at least once).
    Unsupported,
}

/// Where skipped poison events are recorded, for a person (or a tool) to read and repair.
///
/// A projection first offers the letter to [`record_and_skip`](DeadLetters::record_and_skip):
/// a sink on the store that keeps the view's checkpoint (the SQL sinks
/// `SqliteDeadLetters` and `PostgresDeadLetters`) writes the letter and the checkpoint past
/// the event in one transaction, exactly once. Any other sink records the dead letter
/// *before* the projection commits the checkpoint past the event, so a crash in between
/// records it again on restart: [`record`](DeadLetters::record) must be idempotent per
/// (projection, position).
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Records a dead letter; a second record of the same (projection, position) replaces
    /// the first.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the sink cannot store it; the projection then
    /// does not move past the event.
    async fn record(&self, letter: DeadLetter) -> Result<(), CQRSError>;

    /// The dead letters of the projection named `projection`, in position order.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, CQRSError>;

    /// Records `letter` and, in the same transaction, moves the checkpoint named
    /// `letter.projection` from `from` to `letter.position` (just past the poison event),
    /// only if it is still at `from`.
    ///
    /// Only a sink on the store (file, schema) whose checkpoints the projection's view
    /// store commits may do this; the projection checks the view store's checkpoint
    /// afterwards and falls back to [`record`](DeadLetters::record) plus its own commit when
    /// the two disagree. The provided implementation writes nothing and returns
    /// [`DeadLetterSkip::Unsupported`].
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`]; nothing is written then.
    async fn record_and_skip(
        &self,
        letter: &DeadLetter,
        from: i64,
    ) -> Result<DeadLetterSkip, CQRSError> {
        let _ = (letter, from);
        Ok(DeadLetterSkip::Unsupported)
    }
}

#[async_trait]
impl<T: DeadLetters + ?Sized> DeadLetters for Arc<T> {
    async fn record(&self, letter: DeadLetter) -> Result<(), CQRSError> {
        (**self).record(letter).await
    }
    async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, CQRSError> {
        (**self).list(projection).await
    }
    async fn record_and_skip(
        &self,
        letter: &DeadLetter,
        from: i64,
    ) -> Result<DeadLetterSkip, CQRSError> {
        (**self).record_and_skip(letter, from).await
    }
}
