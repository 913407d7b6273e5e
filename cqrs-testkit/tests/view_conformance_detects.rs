//! The view and dead-letter conformance suites catch broken stores: each test runs one check
//! against a store with one deliberate flaw, and expects that check to fail.
//!
//! The store here keeps views as JSON rows in tables shared by a view's versions, as the SQL
//! stores do, with its checkpoints beside them and a dead-letter sink that moves them; without
//! a flaw it passes both suites whole.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use cqrs::{Aggregate, CQRSError, Checkpoint, View, ViewContext, ViewRepository};
use cqrs::{DeadLetter, DeadLetterSkip, DeadLetters};
use cqrs_testkit::conformance::{self, DeadLetterHarness, ViewHarness};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Flaw {
    /// A commit writes its rows whatever their stored version.
    IgnoresRowVersion,
    /// A commit writes its rows one by one and stops at the first conflict.
    NotAtomic,
    /// A commit records any checkpoint, lower ones too.
    CheckpointGoesBack,
    /// A commit accepts the stored checkpoint again with row changes.
    EqualCheckpointWithRows,
    /// `list` orders ids case-insensitively, as a database collation would.
    ListsInCollationOrder,
    /// Rows are keyed by table and id, not by the view's version.
    KeyIgnoresVersion,
    /// `activate_version` records the version it is given, lower ones too.
    ActivationGoesBack,
    /// `record` adds a letter even when one of the same (projection, position) is there.
    RecordAppends,
    /// `list` of dead letters returns every projection's.
    ListsEveryProjection,
    /// `record_and_skip` accepts a `from` at or behind the checkpoint and adds the letter, so
    /// a retried skip records it twice.
    SkipRetryRecordsTwice,
    /// `record_and_skip` records and answers `Committed` without moving the checkpoint.
    SkipLeavesCheckpoint,
    /// `load_many_for_update` answers the stored rows in id order, then the missing ones,
    /// as a plain `WHERE view_id IN (..)` without reordering would.
    LoadsManyInTableOrder,
    /// None: the store itself.
    None,
}

#[derive(Default)]
struct Tables {
    /// (table, version, id) -> (row, row version)
    rows: BTreeMap<(String, u64, String), (Value, i64)>,
    checkpoints: HashMap<String, i64>,
    letters: Vec<DeadLetter>,
}

#[derive(Clone)]
struct Database {
    tables: Arc<Mutex<Tables>>,
    flaw: Flaw,
}

impl Database {
    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has(&self, flaw: Flaw) -> bool {
        self.flaw == flaw
    }
}

struct JsonViews<V> {
    database: Database,
    _view: PhantomData<fn() -> V>,
}

impl<V> JsonViews<V> {
    fn key<A: Aggregate>(&self, id: &str) -> (String, u64, String)
    where
        V: View<A>,
    {
        let version = if self.database.has(Flaw::KeyIgnoresVersion) {
            0
        } else {
            V::VERSION
        };
        (V::TABLE_NAME.to_owned(), version, id.to_owned())
    }
}

fn decode<V: serde::de::DeserializeOwned>(id: &str, value: &Value) -> Result<V, CQRSError> {
    serde_json::from_value(value.clone()).map_err(|source| CQRSError::Deserialization {
        what: format!("view {id}"),
        source,
    })
}

fn conflict<A: Aggregate, V: View<A>>(view_id: String, expected_version: i64) -> CQRSError {
    CQRSError::ViewConflict {
        view: V::TABLE_NAME.to_owned(),
        view_id,
        expected_version,
    }
}

#[async_trait]
impl<A: Aggregate, V: View<A>> ViewRepository<A, V> for JsonViews<V> {
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        let tables = self.database.lock();
        tables
            .rows
            .get(&self.key::<A>(view_id))
            .map(|(value, _)| decode(view_id, value))
            .transpose()
    }

    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        let (table, version, _) = self.key::<A>("");
        let tables = self.database.lock();
        let mut rows: Vec<(&String, &Value)> = tables
            .rows
            .iter()
            .filter(|((t, v, _), _)| *t == table && *v == version)
            .map(|((_, _, id), (value, _))| (id, value))
            .collect();
        let collated = self.database.has(Flaw::ListsInCollationOrder);
        let order = |id: &str| {
            if collated {
                id.to_lowercase()
            } else {
                id.to_owned()
            }
        };
        rows.sort_by_key(|(id, _)| order(id));
        rows.into_iter()
            .filter(|(id, _)| after.is_none_or(|after| order(id) > order(after)))
            .take(limit)
            .map(|(id, value)| Ok((id.clone(), decode(id, value)?)))
            .collect()
    }

    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
        let (view, version) = {
            let tables = self.database.lock();
            match tables.rows.get(&self.key::<A>(view_id)) {
                Some((value, version)) => (decode(view_id, value)?, *version),
                None => (V::default(), 0),
            }
        };
        Ok(ViewContext {
            view_id: view_id.to_owned(),
            view,
            version,
        })
    }

    async fn load_many_for_update(
        &self,
        view_ids: &[String],
    ) -> Result<Vec<ViewContext<V>>, CQRSError> {
        let mut loaded = Vec::with_capacity(view_ids.len());
        for view_id in view_ids {
            loaded.push(ViewRepository::<A, V>::load_for_update(self, view_id).await?);
        }
        if self.database.has(Flaw::LoadsManyInTableOrder) {
            loaded.sort_by(|a, b| (b.version > 0, &a.view_id).cmp(&(a.version > 0, &b.view_id)));
        }
        Ok(loaded)
    }

    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        let mut tables = self.database.lock();
        let mut rows = Vec::new();
        for change in changes {
            let key = self.key::<A>(&change.view_id);
            let stored = tables.rows.get(&key).map_or(0, |(_, version)| *version);
            if stored != change.version && !self.database.has(Flaw::IgnoresRowVersion) {
                return Err(conflict::<A, V>(change.view_id, change.version));
            }
            let value =
                serde_json::to_value(&change.view).map_err(|source| CQRSError::Serialization {
                    what: format!("view {}", change.view_id),
                    source,
                })?;
            if self.database.has(Flaw::NotAtomic) {
                tables.rows.insert(key, (value, stored + 1));
            } else {
                rows.push((key, (value, stored + 1)));
            }
        }
        if let Some(checkpoint) = &checkpoint {
            if let Some(&stored) = tables.checkpoints.get(&checkpoint.name) {
                let refused = if self.database.has(Flaw::CheckpointGoesBack) {
                    false
                } else if self.database.has(Flaw::EqualCheckpointWithRows) {
                    checkpoint.position < stored
                } else {
                    checkpoint.position < stored
                        || (checkpoint.position == stored && !rows.is_empty())
                };
                if refused {
                    return Err(conflict::<A, V>(
                        format!("checkpoint {}", checkpoint.name),
                        stored,
                    ));
                }
            }
        }
        tables.rows.extend(rows);
        if let Some(checkpoint) = checkpoint {
            tables
                .checkpoints
                .insert(checkpoint.name, checkpoint.position);
        }
        Ok(())
    }

    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        Ok(self
            .database
            .lock()
            .checkpoints
            .get(name)
            .copied()
            .unwrap_or(0))
    }

    async fn activate_version(&self, version: u64) -> Result<(), CQRSError> {
        if !self.database.has(Flaw::ActivationGoesBack) {
            let marker = cqrs::active_version_marker(V::TABLE_NAME);
            let position = i64::try_from(version).map_err(CQRSError::persistence)?;
            if self.checkpoint(&marker).await? >= position {
                return Ok(());
            }
            return match self
                .commit(
                    Vec::new(),
                    Some(Checkpoint {
                        name: marker.clone(),
                        position,
                    }),
                )
                .await
            {
                Err(CQRSError::ViewConflict { .. })
                    if self.checkpoint(&marker).await? >= position =>
                {
                    Ok(())
                }
                other => other,
            };
        }
        let marker = cqrs::active_version_marker(V::TABLE_NAME);
        self.database
            .lock()
            .checkpoints
            .insert(marker, i64::try_from(version).unwrap_or(i64::MAX));
        Ok(())
    }
}

#[derive(Clone)]
struct JsonDeadLetters(Database);

#[async_trait]
impl DeadLetters for JsonDeadLetters {
    async fn record(&self, letter: DeadLetter) -> Result<(), CQRSError> {
        let mut tables = self.0.lock();
        if !self.0.has(Flaw::RecordAppends) {
            tables
                .letters
                .retain(|l| (&l.projection, l.position) != (&letter.projection, letter.position));
        }
        tables.letters.push(letter);
        tables.letters.sort_by_key(|l| l.position);
        Ok(())
    }

    async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, CQRSError> {
        let every = self.0.has(Flaw::ListsEveryProjection);
        Ok(self
            .0
            .lock()
            .letters
            .iter()
            .filter(|l| every || l.projection == projection)
            .cloned()
            .collect())
    }

    async fn record_and_skip(
        &self,
        letter: &DeadLetter,
        from: i64,
    ) -> Result<DeadLetterSkip, CQRSError> {
        {
            let mut tables = self.0.lock();
            let at = tables
                .checkpoints
                .get(&letter.projection)
                .copied()
                .unwrap_or(0);
            let retry_records_twice = self.0.has(Flaw::SkipRetryRecordsTwice);
            if (retry_records_twice && from > at) || (!retry_records_twice && from != at) {
                return Ok(DeadLetterSkip::Stale);
            }
            if retry_records_twice {
                tables.letters.push(letter.clone());
            }
            if !self.0.has(Flaw::SkipLeavesCheckpoint) {
                tables
                    .checkpoints
                    .insert(letter.projection.clone(), letter.position);
            }
            if retry_records_twice {
                return Ok(DeadLetterSkip::Committed);
            }
        }
        self.record(letter.clone()).await?;
        Ok(DeadLetterSkip::Committed)
    }
}

struct FlawedHarness(Flaw);

impl ViewHarness for FlawedHarness {
    type Database = Database;
    const VERSIONS_SHARE_A_TABLE: bool = true;

    async fn fresh(&self) -> Database {
        Database {
            tables: Arc::default(),
            flaw: self.0,
        }
    }

    fn views<A: Aggregate, V: View<A>>(&self, database: &Database) -> impl ViewRepository<A, V> {
        JsonViews {
            database: database.clone(),
            _view: PhantomData,
        }
    }
}

impl DeadLetterHarness for FlawedHarness {
    type Sink = JsonDeadLetters;

    fn dead_letters(&self, database: &Database) -> JsonDeadLetters {
        JsonDeadLetters(database.clone())
    }
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `view_optimistic_version` failed: commit of rows [\"v1\"] with checkpoint Some(Checkpoint { name: \"tally_projection\", position: 2 }) succeeded; expected ViewConflict"
)]
async fn a_view_store_that_ignores_the_row_version_is_caught() {
    conformance::check_view_optimistic_version(&FlawedHarness(Flaw::IgnoresRowVersion)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `view_optimistic_version` failed: load(\"v2\"): expected None, the store has Some("
)]
async fn a_commit_that_writes_part_of_its_rows_is_caught() {
    conformance::check_view_optimistic_version(&FlawedHarness(Flaw::NotAtomic)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `view_checkpoint_never_goes_back` failed: commit of rows [\"a\", \"n\"] with checkpoint Some(Checkpoint { name: \"tally_v1\", position: 4 }) succeeded"
)]
async fn a_checkpoint_that_goes_back_is_caught() {
    conformance::check_view_checkpoint_never_goes_back(&FlawedHarness(Flaw::CheckpointGoesBack))
        .await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `view_checkpoint_never_goes_back` failed: commit of rows [\"a\", \"n\"] with checkpoint Some(Checkpoint { name: \"tally_v1\", position: 10 }) succeeded"
)]
async fn an_equal_checkpoint_with_rows_is_caught() {
    conformance::check_view_checkpoint_never_goes_back(&FlawedHarness(
        Flaw::EqualCheckpointWithRows,
    ))
    .await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `view_list_order` failed: list(None, 100): expected [(\"10\", "
)]
async fn a_list_in_collation_order_is_caught() {
    conformance::check_view_list_order(&FlawedHarness(Flaw::ListsInCollationOrder)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `view_load_many` failed: load_many_for_update([\"it's \\\"b\\\", ünïcödé\", \"missing\", \"a\", \"it's \\\"b\\\", ünïcödé\"]): expected"
)]
async fn many_rows_loaded_out_of_order_are_caught() {
    conformance::check_view_load_many(&FlawedHarness(Flaw::LoadsManyInTableOrder)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `view_versions_kept_apart` failed: load_for_update(\"shared\") returned an error"
)]
async fn rows_keyed_without_the_view_version_are_caught() {
    conformance::check_view_versions_kept_apart(&FlawedHarness(Flaw::KeyIgnoresVersion)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `view_version_activation` failed: after activate_version(1) once 2 was active (the marker never goes back): expected (Some(2), false), the store has (Some(1), true)"
)]
async fn an_activation_that_goes_back_is_caught() {
    conformance::check_view_version_activation(&FlawedHarness(Flaw::ActivationGoesBack)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `dead_letter_record_replaces` failed: list(\"tally_v1\") after recording the letter at 10 twice: expected [DeadLetter {"
)]
async fn a_sink_that_records_a_letter_twice_is_caught() {
    conformance::check_dead_letter_record_replaces(&FlawedHarness(Flaw::RecordAppends)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `dead_letter_round_trip` failed: list(\"tally_v1\"): expected [DeadLetter {"
)]
async fn a_sink_that_lists_every_projection_is_caught() {
    conformance::check_dead_letter_round_trip(&FlawedHarness(Flaw::ListsEveryProjection)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `dead_letter_record_and_skip` failed: a retried record_and_skip of the letter at 20 from 0: expected Stale, found Committed"
)]
async fn a_retried_skip_that_records_twice_is_caught() {
    conformance::check_dead_letter_record_and_skip(&FlawedHarness(Flaw::SkipRetryRecordsTwice))
        .await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `dead_letter_record_and_skip` failed: the view store's checkpoint after a committed record_and_skip: expected 20, found 0"
)]
async fn a_skip_that_leaves_the_checkpoint_is_caught() {
    conformance::check_dead_letter_record_and_skip(&FlawedHarness(Flaw::SkipLeavesCheckpoint))
        .await;
}

/// The store itself, without a flaw, passes both suites whole (its versions sharing a table,
/// its sink moving the views' checkpoint): the failures above come from the flaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_without_a_flaw_passes() {
    conformance::check_view_repository(&FlawedHarness(Flaw::None)).await;
    conformance::check_dead_letter_repository(&FlawedHarness(Flaw::None)).await;
}
