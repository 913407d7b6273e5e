//! Rebuilding an aggregate's state from the store (the newest snapshot the events confirm,
//! then the events after it), and keeping its snapshots: the [`SnapshotPolicy`], saving one,
//! repairing one the events do not confirm.

use uuid::Uuid;

use super::cache::Loaded;
use super::CQRSFramework;
use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::event::{DomainEvent, PersistableDomainEvent};
use crate::store::{Snapshot, SnapshotRepository};

/// When to save a snapshot of an aggregate's state.
///
/// ```
/// let policy = cqrs::SnapshotPolicy::every(100);
/// assert_eq!(policy, cqrs::SnapshotPolicy::Every(100));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotPolicy {
    /// Never save snapshots (they are still read if a store has them).
    Never,
    /// Save one whenever an append crosses a multiple of this many events.
    Every(u32),
}

impl SnapshotPolicy {
    /// A snapshot every `n` events (`n` = 0 means never).
    pub const fn every(n: u32) -> Self {
        if n == 0 {
            SnapshotPolicy::Never
        } else {
            SnapshotPolicy::Every(n)
        }
    }
}

impl<A: Aggregate> CQRSFramework<A> {
    /// Saves a snapshot; a failure is logged, never fails the dispatch (events are committed
    /// and a snapshot is only an optimisation).
    pub(super) async fn save_snapshot(
        &self,
        repository: &dyn SnapshotRepository,
        aggregate_id: Uuid,
        loaded: &Loaded<A::State>,
    ) {
        let state = match serde_json::to_value(&loaded.state) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(aggregate_type = A::NAME, %aggregate_id, %error, "snapshot state does not serialize; not saved");
                return;
            }
        };
        let snapshot = Snapshot {
            aggregate_type: A::NAME.to_owned(),
            aggregate_id,
            sequence: loaded.sequence,
            state,
            timestamp: chrono::Utc::now(),
        };
        if let Err(error) = repository.save_snapshot(snapshot).await {
            tracing::warn!(aggregate_type = A::NAME, %aggregate_id, %error, "snapshot not saved");
        }
    }

    /// The newest snapshot (if any, and confirmed by the events) plus every later event,
    /// folded: one read of the events either way. A snapshot the events do not confirm is
    /// ignored: the whole history is replayed and the row repaired (see
    /// [`SnapshotRepository`]'s contract).
    pub(super) async fn load_from_store(
        &self,
        aggregate_id: Uuid,
    ) -> Result<Loaded<A::State>, CQRSError> {
        let Some((repository, _)) = &self.snapshots else {
            return self.replay(aggregate_id).await;
        };
        let Some(snapshot) = repository.load_snapshot(A::NAME, aggregate_id).await? else {
            return self.replay(aggregate_id).await;
        };
        let snapshot_sequence = snapshot.sequence;
        let reason = if snapshot_sequence <= 0 {
            "its sequence is not positive".to_owned()
        } else {
            match serde_json::from_value::<A::State>(snapshot.state) {
                Ok(state) => {
                    let loaded = Loaded::new(state, snapshot_sequence);
                    match self.fold(aggregate_id, loaded, true).await? {
                        (loaded, Confirmation::Confirmed) => return Ok(loaded),
                        (_, Confirmation::Unconfirmed { found: Some(found) }) => format!(
                            "the stream holds no event at its sequence (the first event after {} is {found})",
                            snapshot_sequence - 1
                        ),
                        (_, Confirmation::Unconfirmed { found: None }) => {
                            "the stream holds no event at its sequence".to_owned()
                        }
                    }
                }
                Err(error) => format!("it does not decode: {error}"),
            }
        };
        let replayed = self.replay(aggregate_id).await;
        match &replayed {
            Ok(loaded) => {
                tracing::warn!(
                    aggregate_type = A::NAME,
                    %aggregate_id,
                    snapshot_sequence,
                    stream_sequence = loaded.sequence,
                    "snapshot not used: {reason}; replayed the full history, replacing the snapshot"
                );
                self.repair_snapshot(repository.as_ref(), aggregate_id, snapshot_sequence, loaded)
                    .await;
            }
            Err(error) => tracing::warn!(
                aggregate_type = A::NAME,
                %aggregate_id,
                snapshot_sequence,
                %error,
                "snapshot not used: {reason}; the full history does not replay either"
            ),
        }
        replayed
    }

    /// Every event of the aggregate, folded into the empty state.
    async fn replay(&self, aggregate_id: Uuid) -> Result<Loaded<A::State>, CQRSError> {
        let empty = Loaded::new(A::State::default(), 0);
        let (loaded, _) = self.fold(aggregate_id, empty, false).await?;
        Ok(loaded)
    }

    /// Folds the events after `loaded.sequence` into `loaded`.
    ///
    /// With `confirm`, `loaded` is a snapshot's state and the read starts one event earlier:
    /// the first event read must carry the snapshot's sequence (it is skipped, not decoded:
    /// the snapshot holds it). Otherwise the fold stops there and the confirmation is
    /// [`Confirmation::Unconfirmed`] (the state returned is then of no use).
    async fn fold(
        &self,
        aggregate_id: Uuid,
        mut loaded: Loaded<A::State>,
        confirm: bool,
    ) -> Result<(Loaded<A::State>, Confirmation), CQRSError> {
        let snapshot_sequence = loaded.sequence;
        let after = if confirm {
            snapshot_sequence - 1
        } else {
            snapshot_sequence
        };
        let mut awaiting_confirmation = confirm;
        // The first event read when it is not the snapshot's own.
        let mut unconfirmed_by = None;
        let aggregate = &self.aggregate;
        let mut fold = |event: &PersistableDomainEvent| {
            if awaiting_confirmation {
                awaiting_confirmation = false;
                if event.sequence == snapshot_sequence {
                    return Ok(());
                }
                unconfirmed_by = Some(event.sequence);
                // Stops the read; told apart from a real gap by `unconfirmed_by`.
                return Err(CQRSError::SequenceGap {
                    aggregate_type: A::NAME.to_owned(),
                    aggregate_id,
                    expected_sequence: snapshot_sequence,
                    found_sequence: event.sequence,
                });
            }
            let expected = loaded.sequence + 1;
            if event.sequence != expected {
                return Err(CQRSError::SequenceGap {
                    aggregate_type: A::NAME.to_owned(),
                    aggregate_id,
                    expected_sequence: expected,
                    found_sequence: event.sequence,
                });
            }
            // One stored row may stand for several events, or none, after upcasting.
            for domain_event in A::Events::try_all_from_persisted(event)? {
                aggregate.handle_event(&mut loaded.state, &domain_event);
            }
            loaded.sequence = expected;
            Ok(())
        };
        let read = self
            .events
            .fold_events(A::NAME, aggregate_id, after, &mut fold)
            .await;
        if let Some(found) = unconfirmed_by {
            let found = Some(found);
            return Ok((loaded, Confirmation::Unconfirmed { found }));
        }
        read?;
        if awaiting_confirmation {
            return Ok((loaded, Confirmation::Unconfirmed { found: None }));
        }
        Ok((loaded, Confirmation::Confirmed))
    }

    /// Replaces a snapshot that was not used (at `bad_sequence`) by a snapshot of the
    /// replayed state, or removes it when the aggregate has no events. A failure is logged:
    /// the replayed state is right either way, and the next load tries again.
    async fn repair_snapshot(
        &self,
        repository: &dyn SnapshotRepository,
        aggregate_id: Uuid,
        bad_sequence: i64,
        replayed: &Loaded<A::State>,
    ) {
        if replayed.sequence > 0 && replayed.sequence >= bad_sequence {
            // Not ahead (its state did not decode): the save replaces it in place.
            self.save_snapshot(repository, aggregate_id, replayed).await;
            return;
        }
        // Ahead of the stream: a save would keep it ("newest wins"), so delete it first. A
        // concurrent loader doing the same deletes and saves a true snapshot too.
        if let Err(error) = repository.delete_snapshot(A::NAME, aggregate_id).await {
            tracing::warn!(aggregate_type = A::NAME, %aggregate_id, %error, "unused snapshot not deleted");
            return;
        }
        if replayed.sequence > 0 {
            self.save_snapshot(repository, aggregate_id, replayed).await;
        }
    }
}

/// Whether the events confirmed the snapshot a fold started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmation {
    /// The first event read carried the snapshot's sequence, or there was no snapshot to
    /// confirm.
    Confirmed,
    /// The stream holds no event at the snapshot's sequence; `found` is the first event read
    /// after the one before it, if any.
    Unconfirmed { found: Option<i64> },
}
