//! The conformance suite catches broken stores: each test runs one check against a store
//! with one deliberate flaw, and expects that check (and no other) to fail.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DurationRound, TimeDelta};
use cqrs::validate_batch;
use cqrs::{CQRSError, EventRepository, MemoryEventRepository, PersistableDomainEvent};
use cqrs_testkit::conformance::{self, MemoryHarness, StoreHarness};
use serde_json::Value;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Flaw {
    /// Loads every event with `null` metadata.
    DropsMetadata,
    /// Keeps timestamps to the millisecond only.
    MillisecondTimestamps,
    /// Reports a lost race as a persistence error.
    ConflictAsPersistenceError,
    /// Appends the events of a batch one by one.
    NotAtomic,
    /// Does not recognise a retried batch: it is a conflict.
    NoIdempotency,
    /// `read_all` returns everything after the position, ignoring the limit.
    ReadAllIgnoresLimit,
    /// `load_events` ignores `after_sequence`.
    LoadIgnoresAfter,
    /// `event_sequence` ignores the aggregate type.
    SequenceIgnoresType,
    /// Accepts a batch that skips ahead of the stored history.
    AcceptsSkippingAhead,
    /// Checks the expected sequence, then writes, with a gap in between: writers race.
    RacyAppend,
    /// Hides rows it cannot decode instead of reporting them.
    SkipsUndecodableRows,
    /// Fails a whole `read_all` page that holds a payload that is not JSON.
    FailsPageOnDamagedRow,
    /// Loads every event without its causation id.
    DropsCausation,
    /// `events_caused_by` matches the aggregate id and the causation id, not the type.
    CausedByIgnoresType,
}

struct FlawedStore {
    inner: MemoryEventRepository,
    flaw: Flaw,
}

impl FlawedStore {
    fn fix(&self, mut event: PersistableDomainEvent) -> PersistableDomainEvent {
        match self.flaw {
            Flaw::DropsMetadata => event.metadata = Value::Null,
            Flaw::DropsCausation => event.causation_id = None,
            Flaw::MillisecondTimestamps => {
                event.timestamp = event
                    .timestamp
                    .duration_trunc(TimeDelta::milliseconds(1))
                    .unwrap()
            }
            _ => {}
        }
        event
    }

    fn hide(&self, events: Vec<PersistableDomainEvent>) -> Vec<PersistableDomainEvent> {
        events
            .into_iter()
            .filter(|e| self.flaw != Flaw::SkipsUndecodableRows || e.payload.is_valid_json())
            .map(|e| self.fix(e))
            .collect()
    }
}

#[async_trait]
impl EventRepository for FlawedStore {
    async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        match self.flaw {
            Flaw::ConflictAsPersistenceError => match self.inner.append(events).await {
                Err(CQRSError::Conflict { .. }) => Err(CQRSError::persistence("lost the race")),
                other => other,
            },
            Flaw::NotAtomic => {
                let mut positions = Vec::new();
                for event in events {
                    positions.extend(self.inner.append(vec![event]).await?);
                }
                Ok(positions)
            }
            Flaw::NoIdempotency => {
                let events = events
                    .into_iter()
                    .map(|mut e| {
                        e.event_id = Uuid::new_v4();
                        e
                    })
                    .collect();
                self.inner.append(events).await
            }
            Flaw::AcceptsSkippingAhead | Flaw::RacyAppend => {
                let expected = validate_batch(&events)?;
                let first = &events[0];
                let current = self
                    .inner
                    .event_sequence(&first.aggregate_type, first.aggregate_id)
                    .await?;
                if self.flaw == Flaw::RacyAppend {
                    tokio::task::yield_now().await;
                }
                if current > expected || (current < expected && self.flaw == Flaw::RacyAppend) {
                    return Err(CQRSError::Conflict {
                        aggregate_type: first.aggregate_type.to_string(),
                        aggregate_id: first.aggregate_id,
                        expected_sequence: expected,
                    });
                }
                Ok(events
                    .into_iter()
                    .map(|e| self.inner.insert_unchecked(e))
                    .collect())
            }
            _ => self.inner.append(events).await,
        }
    }

    async fn load_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let after = if self.flaw == Flaw::LoadIgnoresAfter {
            0
        } else {
            after_sequence
        };
        let events = self
            .inner
            .load_events(aggregate_type, aggregate_id, after)
            .await?;
        Ok(self.hide(events))
    }

    async fn events_caused_by(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        causation_id: Uuid,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        if self.flaw == Flaw::CausedByIgnoresType {
            let mut all = self.inner.read_all(0, usize::MAX).await?;
            all.retain(|e| e.aggregate_id == aggregate_id && e.causation_id == Some(causation_id));
            return Ok(all);
        }
        let mut events = self.load_events(aggregate_type, aggregate_id, 0).await?;
        events.retain(|e| e.causation_id == Some(causation_id));
        Ok(events)
    }

    async fn event_sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<i64, CQRSError> {
        if self.flaw == Flaw::SequenceIgnoresType {
            let all = self.inner.read_all(0, usize::MAX).await?;
            return Ok(all
                .iter()
                .filter(|e| e.aggregate_id == aggregate_id)
                .map(|e| e.sequence)
                .max()
                .unwrap_or(0));
        }
        self.inner
            .event_sequence(aggregate_type, aggregate_id)
            .await
    }

    async fn read_all(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        let limit = if self.flaw == Flaw::ReadAllIgnoresLimit {
            usize::MAX
        } else {
            limit
        };
        let events = self.inner.read_all(after_position, limit).await?;
        if self.flaw == Flaw::FailsPageOnDamagedRow {
            if let Some(bad) = events.iter().find(|e| !e.payload.is_valid_json()) {
                return Err(CQRSError::persistence(format!(
                    "payload at position {} is not JSON",
                    bad.position
                )));
            }
        }
        Ok(self.hide(events))
    }
}

struct FlawedHarness(Flaw);

impl StoreHarness for FlawedHarness {
    type Store = Arc<FlawedStore>;

    async fn fresh(&self) -> Arc<FlawedStore> {
        Arc::new(FlawedStore {
            inner: MemoryEventRepository::new(),
            flaw: self.0,
        })
    }

    async fn corrupt_payload(
        &self,
        store: &Arc<FlawedStore>,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        raw: &str,
    ) {
        MemoryHarness
            .corrupt_payload(&store.inner, aggregate_type, aggregate_id, sequence, raw)
            .await;
    }

    async fn set_event_type(
        &self,
        store: &Arc<FlawedStore>,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        event_type: &str,
    ) {
        MemoryHarness
            .set_event_type(
                &store.inner,
                aggregate_type,
                aggregate_id,
                sequence,
                event_type,
            )
            .await;
    }

    async fn delete_event(
        &self,
        store: &Arc<FlawedStore>,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
    ) {
        MemoryHarness
            .delete_event(&store.inner, aggregate_type, aggregate_id, sequence)
            .await;
    }
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `round_trip` failed: load_events(after 0): event 0 (sequence 1): field `metadata` differs"
)]
async fn dropped_metadata_is_caught() {
    conformance::check_round_trip(&FlawedHarness(Flaw::DropsMetadata)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `round_trip` failed: load_events(after 0): event 0 (sequence 1): field `timestamp` differs"
)]
async fn lost_microseconds_are_caught() {
    conformance::check_round_trip(&FlawedHarness(Flaw::MillisecondTimestamps)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `conflict` failed: append at sequence 1 when 2 is stored: expected Conflict"
)]
async fn a_conflict_reported_as_another_error_is_caught() {
    conformance::check_conflict(&FlawedHarness(Flaw::ConflictAsPersistenceError)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `atomic_batch` failed: read_all after a 3-event batch with a duplicate id"
)]
async fn a_half_stored_batch_is_caught() {
    conformance::check_atomic_batch(&FlawedHarness(Flaw::NotAtomic)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `idempotent_retry` failed: retried append of the same batch returned an error"
)]
async fn a_retry_that_is_not_recognised_is_caught() {
    conformance::check_idempotent_retry(&FlawedHarness(Flaw::NoIdempotency)).await;
}

#[tokio::test]
#[should_panic(expected = "store conformance check `global_order` failed: read_all(0, 1) returned")]
async fn an_ignored_limit_is_caught() {
    conformance::check_global_order(&FlawedHarness(Flaw::ReadAllIgnoresLimit)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `load_after_sequence` failed: load_events(after_sequence = 1)"
)]
async fn an_ignored_after_sequence_is_caught() {
    conformance::check_load_after_sequence(&FlawedHarness(Flaw::LoadIgnoresAfter)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `event_sequence` failed: the same id under aggregate type conformance_other has no events"
)]
async fn an_aggregate_key_without_the_type_is_caught() {
    conformance::check_event_sequence(&FlawedHarness(Flaw::SequenceIgnoresType)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `invalid_batches` failed: append of sequence 3 when only 1 is stored (skipping ahead) succeeded"
)]
async fn skipping_ahead_is_caught() {
    conformance::check_invalid_batches(&FlawedHarness(Flaw::AcceptsSkippingAhead)).await;
}

// Current-thread: the racing tasks interleave at the store's yield point every time.
#[tokio::test(flavor = "current_thread")]
#[should_panic(expected = "store conformance check `concurrent_appends` failed: aggregate")]
async fn racing_writers_are_caught() {
    conformance::check_concurrent_appends(&FlawedHarness(Flaw::RacyAppend)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `corrupt_payload` failed: load_events after damaging sequence 2 returned sequences [1, 3]"
)]
async fn hidden_corruption_is_caught() {
    conformance::check_corrupt_payload(&FlawedHarness(Flaw::SkipsUndecodableRows)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `read_all_past_a_damaged_row` failed: read_all(0, 100) of a stream with a damaged row returned an error"
)]
async fn a_page_that_fails_on_a_damaged_row_is_caught() {
    conformance::check_read_all_past_a_damaged_row(&FlawedHarness(Flaw::FailsPageOnDamagedRow))
        .await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `read_all_past_a_damaged_row` failed: reading the stream in pages of 100 neither returned the damaged row"
)]
async fn a_damaged_row_hidden_from_read_all_is_caught() {
    conformance::check_read_all_past_a_damaged_row(&FlawedHarness(Flaw::SkipsUndecodableRows))
        .await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `dispatch_new` failed: a losing dispatch_new: expected Conflict"
)]
async fn dispatch_new_losers_without_a_conflict_are_caught() {
    conformance::check_dispatch_new(&FlawedHarness(Flaw::ConflictAsPersistenceError)).await;
}

// Current-thread: the racing tasks interleave at the store's yield point every time.
#[tokio::test(flavor = "current_thread")]
#[should_panic(
    expected = "store conformance check `dispatch_new` failed: 8 concurrent dispatch_new on one id: expected one winner"
)]
async fn two_dispatch_new_winners_are_caught() {
    conformance::check_dispatch_new(&FlawedHarness(Flaw::RacyAppend)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `correlation_round_trip` failed: load_events(after 0): event 0 (sequence 1): field `causation_id` differs"
)]
async fn a_dropped_causation_id_is_caught() {
    conformance::check_correlation_round_trip(&FlawedHarness(Flaw::DropsCausation)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `events_caused_by` failed: events_caused_by(conformance_counter"
)]
async fn events_caused_by_across_aggregate_types_is_caught() {
    conformance::check_events_caused_by(&FlawedHarness(Flaw::CausedByIgnoresType)).await;
}

/// The wrapper itself, without a flaw, passes: the failures above come from the flaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wrapper_without_a_flaw_passes() {
    // `SkipsUndecodableRows` only differs on damaged rows, so every other check passes.
    let harness = FlawedHarness(Flaw::SkipsUndecodableRows);
    conformance::check_round_trip(&harness).await;
    conformance::check_event_sequence(&harness).await;
    conformance::check_load_after_sequence(&harness).await;
    conformance::check_conflict(&harness).await;
    conformance::check_atomic_batch(&harness).await;
    conformance::check_invalid_batches(&harness).await;
    conformance::check_idempotent_retry(&harness).await;
    conformance::check_duplicate_event_id(&harness).await;
    conformance::check_global_order(&harness).await;
    conformance::check_concurrent_appends(&harness).await;
    conformance::check_unknown_event_type(&harness).await;
    conformance::check_sequence_gap(&harness).await;
    conformance::check_dispatch_new(&harness).await;
    conformance::check_correlation_round_trip(&harness).await;
    conformance::check_events_caused_by(&harness).await;
    // `FailsPageOnDamagedRow` only differs on damaged rows, so the damage checks pass with it
    // where `SkipsUndecodableRows` fails them.
    let harness = FlawedHarness(Flaw::FailsPageOnDamagedRow);
    conformance::check_corrupt_payload(&harness).await;
    conformance::check_round_trip(&harness).await;
    conformance::check_global_order(&harness).await;
}
