//! The checkpoint conformance suite catches broken checkpoint stores: each test runs one
//! check against a store with one deliberate flaw, and expects that check to fail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use cqrs::{CQRSError, Checkpoint, CheckpointRepository};
use cqrs_testkit::conformance::{self, CheckpointHarness};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Flaw {
    /// A save only replaces a lower position (a maximum, not a replacement).
    KeepsTheMaximum,
    /// Names are compared case-insensitively, as a database collation would.
    CaseInsensitiveNames,
    /// Positions are kept as `f64`.
    PositionsAsFloats,
    /// None: the store itself.
    None,
}

#[derive(Clone)]
struct FlawedCheckpoints {
    positions: Arc<Mutex<HashMap<String, i64>>>,
    flaw: Flaw,
}

impl FlawedCheckpoints {
    fn key(&self, name: &str) -> String {
        if self.flaw == Flaw::CaseInsensitiveNames {
            name.to_lowercase()
        } else {
            name.to_owned()
        }
    }
}

#[async_trait]
impl CheckpointRepository for FlawedCheckpoints {
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        let positions = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(positions.get(&self.key(name)).copied().unwrap_or(0))
    }

    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        let mut positions = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = self.key(&checkpoint.name);
        let position = if self.flaw == Flaw::PositionsAsFloats {
            checkpoint.position as f64 as i64
        } else {
            checkpoint.position
        };
        let stored = positions.get(&key).copied();
        if self.flaw == Flaw::KeepsTheMaximum && stored.is_some_and(|stored| stored >= position) {
            return Ok(());
        }
        positions.insert(key, position);
        Ok(())
    }
}

struct FlawedHarness(Flaw);

impl CheckpointHarness for FlawedHarness {
    type Checkpoints = FlawedCheckpoints;

    async fn fresh(&self) -> FlawedCheckpoints {
        FlawedCheckpoints {
            positions: Arc::default(),
            flaw: self.0,
        }
    }
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `checkpoint_save_replaces` failed: load_checkpoint(\"relay\") after saving 10 then 4: expected 4, the store has 10"
)]
async fn a_checkpoint_that_refuses_to_go_back_is_caught() {
    conformance::check_checkpoint_save_replaces(&FlawedHarness(Flaw::KeepsTheMaximum)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `checkpoint_names_independent` failed: load_checkpoint(\"relay\") after saving every name once: expected 100, the store has 101"
)]
async fn names_compared_without_case_are_caught() {
    conformance::check_checkpoint_names_independent(&FlawedHarness(Flaw::CaseInsensitiveNames))
        .await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `checkpoint_round_trip` failed: load_checkpoint(\"relay\") after saving it: expected 9007199254740993, the store has 9007199254740992"
)]
async fn positions_kept_as_floats_are_caught() {
    conformance::check_checkpoint_round_trip(&FlawedHarness(Flaw::PositionsAsFloats)).await;
}

/// The store itself, without a flaw, passes: the failures above come from the flaws.
#[tokio::test]
async fn the_store_without_a_flaw_passes() {
    conformance::check_checkpoint_repository(&FlawedHarness(Flaw::None)).await;
}
