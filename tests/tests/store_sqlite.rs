//! The SQLite store: the testkit's conformance suite, the 16-writer race, group commit,
//! snapshots (with a property test against full replay), views with their checkpoint, and
//! a store reopened from its file.
//!
//! Every test uses its own database file under the system temp dir, removed at the end.
//! Tests where durability plays no part use `Durability::Normal` to spare the disk fsyncs;
//! the others run with the default, `Durability::Full`.

use std::sync::Arc;
use std::time::Duration;

use cqrs::sqlx;
use cqrs::{
    Aggregate, CQRSError, CQRSFramework, Checkpoint, DomainEvent, EventEnvelope, EventRepository,
    PersistableDomainEvent, Projection, RetryPolicy, SnapshotPolicy, SnapshotRepository,
    SqliteEventRepository, SqliteViewRepository, View, ViewContext, ViewRepository,
};
use cqrs::{Durability, InvalidTableName, SqliteOptions};
use cqrs_testkit::conformance::{
    check_checkpoint_repository, check_dead_letter_repository, check_event_repository,
    check_snapshot_repository, check_view_repository, SqliteHarness,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

mod common;

use common::counter::{
    counter_event, Counter, CounterCommand, CounterError, CounterEvent, CounterState, CounterView,
    Tally,
};
use common::temp_db::TempDb;

/// Runs a statement on the store's file behind its back.
async fn execute(store: &SqliteEventRepository, sql: &str, binds: &[&str]) -> u64 {
    let mut query = sqlx::query(sql);
    for bind in binds {
        query = query.bind(*bind);
    }
    query.execute(store.pool()).await.unwrap().rows_affected()
}

// ---------------------------------------------------------------------------------------
// The conformance suites, on the testkit's SQLite harness.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_passes_the_conformance_suite() {
    check_event_repository(&SqliteHarness::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_passes_the_snapshot_conformance_suite() {
    check_snapshot_repository(&SqliteHarness::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_view_store_passes_the_view_conformance_suite() {
    check_view_repository(&SqliteHarness::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_checkpoints_pass_the_checkpoint_conformance_suite() {
    check_checkpoint_repository(&SqliteHarness::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_dead_letters_pass_the_dead_letter_conformance_suite() {
    check_dead_letter_repository(&SqliteHarness::new()).await;
}

// ---------------------------------------------------------------------------------------
// Helpers over the shared counter domain (`common::counter`).

fn conflict_of(error: &CounterError) -> bool {
    matches!(error, CounterError::Framework(CQRSError::Conflict { .. }))
}

fn counter_batch(id: Uuid, from: i64, to: i64) -> Vec<PersistableDomainEvent> {
    (from..=to).map(|s| counter_event(id, s, s)).collect()
}

fn sequences(events: &[PersistableDomainEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence).collect()
}

// ---------------------------------------------------------------------------------------
// The 16-writer race.

const WRITERS: usize = 16;
const DISPATCHES: usize = 500;

/// The shared framework of the race tests. Snapshots keep each load short (without them
/// every attempt replays the whole history, and the test measures replay, not the race);
/// they do not take part in the race, which is decided by the append alone.
fn racing_framework(
    store: &SqliteEventRepository,
    retry: RetryPolicy,
) -> Arc<CQRSFramework<Tally>> {
    Arc::new(
        CQRSFramework::<Tally>::new(store.clone())
            .with_snapshots(store.clone(), SnapshotPolicy::every(64))
            .with_retry(retry),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_without_retry_store_each_sequence_once() {
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    let framework = racing_framework(&store, RetryPolicy::none());
    let id = Uuid::new_v4();

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let framework = Arc::clone(&framework);
        tasks.push(tokio::spawn(async move {
            let (mut successes, mut conflicts) = (0u64, 0u64);
            for _ in 0..DISPATCHES {
                match framework.dispatch(id, CounterCommand::Add(1)).await {
                    Ok(receipt) => {
                        assert_eq!(receipt.positions.len(), 1);
                        successes += 1;
                    }
                    Err(error) if conflict_of(&error) => conflicts += 1,
                    Err(other) => panic!("writer {writer}: only Conflict may fail, got {other:?}"),
                }
            }
            (successes, conflicts)
        }));
    }
    let (mut successes, mut conflicts) = (0, 0);
    for task in tasks {
        let (s, c) = task.await.unwrap();
        successes += s;
        conflicts += c;
    }
    assert_eq!(successes + conflicts, (WRITERS * DISPATCHES) as u64);
    assert!(conflicts > 0, "16 writers on one aggregate never collided");

    let stored = store.load_events(Tally::NAME, id, 0).await.unwrap();
    let expected: Vec<i64> = (1..=successes as i64).collect();
    assert_eq!(
        sequences(&stored),
        expected,
        "every sequence 1..=N exactly once"
    );
    let state = framework.load(id).await.unwrap();
    assert_eq!(state.total, successes as i64);
    let positions: Vec<i64> = stored.iter().map(|e| e.position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_with_retry_all_succeed_and_the_total_is_exact() {
    let db = TempDb::new("sqlite-test");
    // Every one of the 8000 wins needs a commit of its own (one winner per group on a
    // single aggregate): without fsyncs this stays a test of the retries, not of the disk.
    let store = db.open_fast().await;
    let framework = racing_framework(
        &store,
        RetryPolicy::attempts(10_000)
            .with_backoff(Duration::from_micros(50), Duration::from_millis(1)),
    );
    let id = Uuid::new_v4();

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let framework = Arc::clone(&framework);
        tasks.push(tokio::spawn(async move {
            for _ in 0..DISPATCHES {
                if let Err(error) = framework.dispatch(id, CounterCommand::Add(1)).await {
                    panic!("writer {writer}: a dispatch with retry failed: {error:?}");
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let n = (WRITERS * DISPATCHES) as i64;
    let state = framework.load(id).await.unwrap();
    assert_eq!(state.total, n);
    assert_eq!(state.events, n);
    let stored = store.load_events(Tally::NAME, id, 0).await.unwrap();
    assert_eq!(sequences(&stored), (1..=n).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------
// Appends: group commit, big batches, the schema's own refusals.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_appends_keep_their_own_outcomes() {
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    let contested = Uuid::new_v4();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                // All of these race for sequence 1 of one aggregate.
                (true, store.append(counter_batch(contested, 1, 2)).await)
            } else {
                (
                    false,
                    store.append(counter_batch(Uuid::new_v4(), 1, 3)).await,
                )
            }
        }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap() {
            (true, Ok(positions)) => {
                assert_eq!(positions.len(), 2);
                winners += 1;
            }
            (
                true,
                Err(CQRSError::Conflict {
                    aggregate_id,
                    expected_sequence,
                    ..
                }),
            ) => {
                assert_eq!((aggregate_id, expected_sequence), (contested, 0));
            }
            (false, Ok(positions)) => {
                assert_eq!(positions.len(), 3);
                assert!(positions.windows(2).all(|w| w[1] == w[0] + 1));
            }
            (contested, other) => panic!("unexpected outcome (contested: {contested}): {other:?}"),
        }
    }
    assert_eq!(winners, 1, "exactly one of the racing appends wins");
    assert_eq!(
        store
            .event_sequence(Counter::NAME, contested)
            .await
            .unwrap(),
        2
    );
    assert_eq!(store.read_all(0, 1000).await.unwrap().len(), 2 + 32 * 3);
}

/// Groups small enough for one `INSERT` run it as a transaction of its own: when a constraint
/// refuses it, the appends are inserted one by one in a new transaction, and only the losers
/// of the race fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_group_of_small_appends_commits_the_rest() {
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    for _ in 0..20 {
        let contested = Uuid::new_v4();
        let fresh: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        let mut tasks = Vec::new();
        for i in 0..12 {
            let store = store.clone();
            let id = if i % 2 == 0 { contested } else { fresh[i / 2] };
            tasks.push(tokio::spawn(async move {
                (id, store.append(counter_batch(id, 1, 1)).await)
            }));
        }
        let mut winners = 0;
        for task in tasks {
            match task.await.unwrap() {
                (id, Ok(positions)) => {
                    assert_eq!(positions.len(), 1);
                    if id == contested {
                        winners += 1;
                    }
                }
                (id, Err(CQRSError::Conflict { aggregate_id, .. })) => {
                    assert_eq!((id, aggregate_id), (contested, contested));
                }
                (id, other) => panic!("unexpected outcome for {id}: {other:?}"),
            }
        }
        assert_eq!(winners, 1, "exactly one of the racing appends wins");
        for id in fresh {
            assert_eq!(store.event_sequence(Counter::NAME, id).await.unwrap(), 1);
        }
        assert_eq!(
            store
                .event_sequence(Counter::NAME, contested)
                .await
                .unwrap(),
            1
        );
    }
    assert_eq!(store.read_all(0, 1000).await.unwrap().len(), 20 * 7);
}

#[tokio::test]
async fn a_batch_larger_than_one_statement_is_atomic() {
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    let id = Uuid::new_v4();
    let positions = store.append(counter_batch(id, 1, 250)).await.unwrap();
    assert_eq!(positions.len(), 250);
    assert!(positions.windows(2).all(|w| w[0] < w[1]));

    // Sequences 251..=500, the 180th of which reuses a stored id: none of them is stored.
    let other = Uuid::new_v4();
    store.append(counter_batch(other, 1, 1)).await.unwrap();
    let reused = store.load_events(Counter::NAME, other, 0).await.unwrap()[0].event_id;
    let mut batch = counter_batch(id, 251, 500);
    batch[179].event_id = reused;
    let error = store.append(batch.clone()).await.unwrap_err();
    assert!(
        matches!(error, CQRSError::DuplicateEventId { event_id } if event_id == reused),
        "{error:?}"
    );
    assert_eq!(store.event_sequence(Counter::NAME, id).await.unwrap(), 250);

    // The same batch, fixed, goes in; retried, it returns the same positions.
    batch[179].event_id = Uuid::new_v4();
    let first = store.append(batch.clone()).await.unwrap();
    assert_eq!(store.append(batch).await.unwrap(), first);
    assert_eq!(store.event_sequence(Counter::NAME, id).await.unwrap(), 500);

    // A big batch that lost the race is a conflict and stores nothing.
    let stale = counter_batch(id, 400, 650);
    let error = store.append(stale).await.unwrap_err();
    assert!(
        matches!(
            error,
            CQRSError::Conflict {
                expected_sequence: 399,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(store.event_sequence(Counter::NAME, id).await.unwrap(), 500);
}

#[tokio::test]
async fn the_schema_itself_refuses_holes_and_duplicates() {
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    let id = Uuid::new_v4();
    store.append(counter_batch(id, 1, 2)).await.unwrap();
    let stored = store.load_events(Counter::NAME, id, 0).await.unwrap();

    // Written behind the store's back, SQL that skips a sequence is still refused by the
    // trigger, and a second event at a stored sequence by the UNIQUE constraint.
    let insert = "INSERT INTO cqrs_events (event_id, aggregate_type, aggregate_id, sequence, \
                  event_type, event_version, payload, metadata, timestamp) \
                  VALUES (?, 'counter', ?, ?, 'Added', '1', '{}', 'null', 0)";
    for (sequence, expect) in [(4, "cqrs_sequence_gap"), (2, "UNIQUE"), (0, "CHECK")] {
        let error = sqlx::query(insert)
            .bind(Uuid::new_v4().to_string())
            .bind(id.to_string())
            .bind(sequence)
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains(expect),
            "sequence {sequence}: {error}"
        );
    }
    let error = sqlx::query(insert)
        .bind(stored[0].event_id.to_string())
        .bind(Uuid::new_v4().to_string())
        .bind(1)
        .execute(store.pool())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("event_id"), "{error}");
    assert_eq!(store.read_all(0, 10).await.unwrap().len(), 2);
}

// ---------------------------------------------------------------------------------------
// Rows that do not decode.

#[tokio::test]
async fn damaged_rows_are_typed_errors_naming_the_event() {
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    let id = Uuid::new_v4();
    store.append(counter_batch(id, 1, 3)).await.unwrap();
    let harness = SqliteHarness::new();

    // Metadata that is not JSON, an event id that is not a UUID: load_events is EventDecode
    // naming the aggregate and the sequence; read_all returns the events before the row,
    // and a page that starts with it is DamagedRow naming its position.
    for (column, value) in [("metadata", "{oops"), ("event_id", "not-a-uuid")] {
        let db = TempDb::new("sqlite-test");
        let store = db.open().await;
        store.append(counter_batch(id, 1, 3)).await.unwrap();
        harness
            .damage(&store, column, value, Counter::NAME, id, 2)
            .await;
        match store.load_events(Counter::NAME, id, 0).await.unwrap_err() {
            CQRSError::EventDecode(decode) => {
                assert_eq!(
                    (
                        decode.aggregate_type.as_str(),
                        decode.aggregate_id,
                        decode.sequence
                    ),
                    (Counter::NAME, id, 2),
                    "{column}"
                );
            }
            other => panic!("{column}: expected EventDecode, got {other:?}"),
        }
        assert_eq!(sequences(&store.read_all(0, 10).await.unwrap()), [1]);
        match store.read_all(1, 10).await.unwrap_err() {
            CQRSError::DamagedRow(row) => {
                assert_eq!(row.position, 2, "{column}");
                assert_eq!(
                    (
                        row.aggregate_type.as_deref(),
                        row.aggregate_id,
                        row.sequence
                    ),
                    (Some(Counter::NAME), Some(id), Some(2)),
                    "{column}"
                );
                assert!(row.problem.contains(column), "{column}: {row}");
            }
            other => panic!("{column}: expected DamagedRow, got {other:?}"),
        }
        assert_eq!(sequences(&store.read_all(2, 10).await.unwrap()), [3]);
    }

    // An aggregate id that is not a UUID cannot be named as one: read_all ends the page
    // before it, and a page that starts with it is DamagedRow naming the position.
    let positions = store.read_all(0, 10).await.unwrap();
    execute(
        &store,
        "UPDATE cqrs_events SET aggregate_id = 'garbage' WHERE position = ?",
        &[&positions[2].position.to_string()],
    )
    .await;
    assert_eq!(store.read_all(0, 10).await.unwrap().len(), 2);
    match store.read_all(positions[1].position, 10).await.unwrap_err() {
        CQRSError::DamagedRow(row) => {
            assert_eq!(row.position, positions[2].position);
            assert_eq!(row.aggregate_id, None);
            assert!(row.problem.contains("garbage"), "{row}");
        }
        other => panic!("expected DamagedRow, got {other:?}"),
    }
    // Loading the aggregate with a damaged payload is still an error naming the row.
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    store.append(counter_batch(id, 1, 3)).await.unwrap();
    harness
        .damage(&store, "payload", "{oops", Counter::NAME, id, 2)
        .await;
    assert!(matches!(
        store.load_events(Counter::NAME, id, 0).await,
        Err(CQRSError::EventDecode(_))
    ));
    let page = store.read_all(0, 10).await.unwrap();
    assert_eq!(sequences(&page), [1, 2, 3]);
    assert_eq!(page[1].payload.as_str(), "{oops");
}

/// A NUL character in a payload, the metadata or a name: SQLite stores it and gives it back
/// (PostgreSQL refuses it with `CQRSError::Unstorable`).
#[tokio::test]
async fn a_nul_character_round_trips() {
    let db = TempDb::new("sqlite-test");
    let store = db.open_fast().await;
    let id = Uuid::new_v4();
    let mut event = counter_event(id, 1, 1);
    event.payload = json!({ "Added": { "amount": 1 }, "note": "a\u{0}b" }).into();
    event.metadata = json!({ "who": "x\u{0}y" });
    event.event_type = "Add\u{0}ed".into();
    store.append(vec![event.clone()]).await.unwrap();
    let loaded = store.load_events(Counter::NAME, id, 0).await.unwrap();
    let read = store.read_all(0, 10).await.unwrap();
    for events in [loaded, read] {
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].payload, event.payload);
        assert_eq!(events[0].metadata, event.metadata);
        assert_eq!(events[0].event_type, event.event_type);
    }
}

// ---------------------------------------------------------------------------------------
// Snapshots.

async fn replay(store: &SqliteEventRepository, id: Uuid, up_to: i64) -> CounterState {
    let mut state = CounterState::default();
    for stored in store.load_events(Counter::NAME, id, 0).await.unwrap() {
        if stored.sequence > up_to {
            break;
        }
        Counter.handle_event(
            &mut state,
            &CounterEvent::try_from_persisted(&stored).unwrap(),
        );
    }
    state
}

fn command_strategy() -> impl proptest::strategy::Strategy<Value = CounterCommand> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (-1000i64..1000).prop_map(CounterCommand::Add),
        2 => (-1000i64..1000).prop_map(CounterCommand::AddTwice),
        1 => Just(CounterCommand::Reset),
        1 => Just(CounterCommand::Noop),
    ]
}

#[test]
fn state_from_snapshot_and_tail_equals_a_full_replay() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = TempDb::new("sqlite-test");
    let store = runtime.block_on(db.open_fast());
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(command_strategy(), 0..60),
        1u32..12,
        proptest::collection::vec(any::<bool>(), 0..60),
    );
    runner
        .run(&strategy, |(commands, every, reloads)| {
            runtime.block_on(async {
                let id = Uuid::new_v4();
                let snapshotting = CQRSFramework::<Counter>::new(store.clone())
                    .with_snapshots(store.clone(), SnapshotPolicy::every(every));
                let replaying = CQRSFramework::<Counter>::new(store.clone());
                for (i, command) in commands.iter().enumerate() {
                    snapshotting.dispatch(id, command.clone()).await.unwrap();
                    // Loads in the middle of the history go through the snapshot too.
                    if reloads.get(i).copied().unwrap_or(false) {
                        let via_snapshot = snapshotting.load(id).await.unwrap();
                        let full = replaying.load(id).await.unwrap();
                        prop_assert_eq!(&via_snapshot, &full);
                    }
                }
                let sequence = store.event_sequence(Counter::NAME, id).await.unwrap();
                let via_snapshot = snapshotting.load(id).await.unwrap();
                let full = replaying.load(id).await.unwrap();
                prop_assert_eq!(&via_snapshot, &full);
                prop_assert_eq!(full.applied.len() as i64 + i64::from(full.resets), sequence);

                // The snapshot itself is the replay of exactly the events before it.
                let snapshot = store.load_snapshot(Counter::NAME, id).await.unwrap();
                match snapshot {
                    Some(snapshot) => {
                        prop_assert!(snapshot.sequence <= sequence);
                        prop_assert!(snapshot.sequence >= sequence - 2 * i64::from(every));
                        let state: CounterState = serde_json::from_value(snapshot.state).unwrap();
                        prop_assert_eq!(state, replay(&store, id, snapshot.sequence).await);
                    }
                    None => prop_assert!(sequence < i64::from(every)),
                }
                Ok(())
            })
        })
        .unwrap();
}

#[tokio::test]
async fn a_snapshot_that_no_longer_decodes_is_replayed_and_rewritten() {
    let db = TempDb::new("sqlite-test");
    let store = db.open_fast().await;
    let framework = CQRSFramework::<Counter>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotPolicy::every(5));
    let id = Uuid::new_v4();
    for amount in 1..=12 {
        framework
            .dispatch(id, CounterCommand::Add(amount))
            .await
            .unwrap();
    }
    let saved = store
        .load_snapshot(Counter::NAME, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(saved.sequence, 10);
    let expected = replay(&store, id, 12).await;

    // Valid JSON of another shape (the state type changed): full replay, then rewritten.
    execute(
        &store,
        "UPDATE cqrs_snapshots SET state = ? WHERE aggregate_id = ?",
        &[r#"{"old_field": "old shape"}"#, &id.to_string()],
    )
    .await;
    assert_eq!(framework.load(id).await.unwrap(), expected);
    let rewritten = store
        .load_snapshot(Counter::NAME, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rewritten.sequence, 12);
    assert_eq!(
        serde_json::from_value::<CounterState>(rewritten.state).unwrap(),
        expected
    );

    // Not JSON at all (a hand edit): read as no snapshot, full replay, replaced by the next
    // snapshot saved.
    execute(
        &store,
        "UPDATE cqrs_snapshots SET state = '{truncated' WHERE aggregate_id = ?",
        &[&id.to_string()],
    )
    .await;
    assert!(store
        .load_snapshot(Counter::NAME, id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(framework.load(id).await.unwrap(), expected);
    for amount in 13..=15 {
        framework
            .dispatch(id, CounterCommand::Add(amount))
            .await
            .unwrap();
    }
    let replaced = store
        .load_snapshot(Counter::NAME, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(replaced.sequence, 15);
    assert_eq!(
        serde_json::from_value::<CounterState>(replaced.state).unwrap(),
        replay(&store, id, 15).await
    );
}

#[tokio::test]
async fn an_older_snapshot_never_replaces_a_newer_one() {
    let db = TempDb::new("sqlite-test");
    let store = db.open_fast().await;
    let id = Uuid::new_v4();
    let snapshot = |sequence: i64| cqrs::Snapshot {
        aggregate_type: Counter::NAME.to_owned(),
        aggregate_id: id,
        sequence,
        state: json!({ "total": sequence, "applied": [], "resets": 0 }),
        timestamp: chrono::Utc::now(),
    };
    store.save_snapshot(snapshot(20)).await.unwrap();
    store.save_snapshot(snapshot(10)).await.unwrap();
    assert_eq!(
        store
            .load_snapshot(Counter::NAME, id)
            .await
            .unwrap()
            .unwrap()
            .sequence,
        20
    );
    store.save_snapshot(snapshot(30)).await.unwrap();
    let loaded = store
        .load_snapshot(Counter::NAME, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.sequence, 30);
    assert_eq!(loaded.state["total"], 30);
}

// ---------------------------------------------------------------------------------------
// Views.

/// Version 2 of the same view: same table, counts only the events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct CounterViewV2 {
    events: u64,
}

impl View<Counter> for CounterViewV2 {
    const TABLE_NAME: &'static str = "counter_view";
    const VERSION: u64 = 2;

    fn handle_event(&mut self, _: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        self.events += 1;
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BadlyNamedView;

impl View<Counter> for BadlyNamedView {
    const TABLE_NAME: &'static str = "counter\"; DROP TABLE cqrs_events; --";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, _: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        Ok(())
    }
}

type Views = SqliteViewRepository<CounterView>;

async fn load_view(views: &Views, id: &str) -> Option<CounterView> {
    ViewRepository::<Counter, CounterView>::load(views, id)
        .await
        .unwrap()
}

async fn load_for_update(views: &Views, id: &str) -> ViewContext<CounterView> {
    ViewRepository::<Counter, CounterView>::load_for_update(views, id)
        .await
        .unwrap()
}

async fn commit(
    views: &Views,
    changes: Vec<ViewContext<CounterView>>,
    checkpoint: Option<(&str, i64)>,
) -> Result<(), CQRSError> {
    let checkpoint = checkpoint.map(|(name, position)| Checkpoint {
        name: name.to_owned(),
        position,
    });
    ViewRepository::<Counter, CounterView>::commit(views, changes, checkpoint).await
}

async fn checkpoint(views: &Views, name: &str) -> i64 {
    ViewRepository::<Counter, CounterView>::checkpoint(views, name)
        .await
        .unwrap()
}

/// The row-version, checkpoint and paging rules of the view store are in the testkit's view
/// conformance suite (above); here, what is SQLite's own: a view commit's checkpoint is the
/// one the event store's `CheckpointRepository` reads, in the same file.
#[tokio::test]
async fn a_view_commit_moves_the_checkpoint_the_store_reads() {
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    let views: Views = store.views();

    let mut a = load_for_update(&views, "a").await;
    a.view.total = 5;
    commit(&views, vec![a], Some(("counter_view_v1", 10)))
        .await
        .unwrap();
    assert_eq!(checkpoint(&views, "counter_view_v1").await, 10);
    assert_eq!(store.checkpoint("counter_view_v1").await.unwrap(), 10);
    assert_eq!(
        cqrs::CheckpointRepository::load_checkpoint(&store, "counter_view_v1")
            .await
            .unwrap(),
        10
    );
}

#[tokio::test]
async fn a_projection_applies_every_event_once_across_restarts() {
    let db = TempDb::new("sqlite-test");
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    {
        let store = db.open_fast().await;
        let framework = CQRSFramework::<Counter>::new(store.clone());
        for (i, id) in ids.iter().enumerate() {
            for amount in 0..=i as i64 {
                framework
                    .dispatch(*id, CounterCommand::Add(amount))
                    .await
                    .unwrap();
            }
        }
        let projection = Projection::<Counter, CounterView>::new(store.clone(), store.views())
            .with_batch_size(4);
        let position = projection.catch_up().await.unwrap();
        assert_eq!(position, 15);
        // Nothing new: a second run changes nothing.
        assert_eq!(projection.catch_up().await.unwrap(), 15);
        framework
            .dispatch(ids[0], CounterCommand::Add(100))
            .await
            .unwrap();
    }
    // A new process: the projection resumes after its checkpoint.
    let store = db.open_fast().await;
    let projection =
        Projection::<Counter, CounterView>::new(store.clone(), store.views()).with_batch_size(4);
    assert_eq!(projection.position().await.unwrap(), 15);
    assert_eq!(projection.catch_up().await.unwrap(), 16);
    let views: Views = store.views();
    for (i, id) in ids.iter().enumerate() {
        let view = load_view(&views, &id.to_string()).await.unwrap();
        let expected_total: i64 = (0..=i as i64).sum::<i64>() + if i == 0 { 100 } else { 0 };
        let expected_events = i as u64 + 1 + u64::from(i == 0);
        assert_eq!(
            (view.total, view.events),
            (expected_total, expected_events),
            "aggregate {i}"
        );
    }

    // Version 2 of the view builds beside version 1 in the same table; both stay readable.
    let v2 = Projection::<Counter, CounterViewV2>::new(store.clone(), store.views());
    assert_eq!(v2.catch_up().await.unwrap(), 16);
    let v2_views = store.views::<CounterViewV2>();
    let id0 = ids[0].to_string();
    let new = ViewRepository::<Counter, CounterViewV2>::load(&v2_views, &id0)
        .await
        .unwrap();
    assert_eq!(new, Some(CounterViewV2 { events: 2 }));
    assert_eq!(load_view(&views, &id0).await.unwrap().total, 100);
    let rows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM counter_view")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 10);
}

#[tokio::test]
async fn a_view_table_name_that_is_not_an_identifier_is_refused() {
    let db = TempDb::new("sqlite-test");
    let store = db.open().await;
    let id = Uuid::new_v4();
    store.append(counter_batch(id, 1, 1)).await.unwrap();
    let views = store.views::<BadlyNamedView>();
    let error = ViewRepository::<Counter, BadlyNamedView>::load(&views, "x")
        .await
        .unwrap_err();
    let CQRSError::PersistenceError(source) = error else {
        panic!("expected PersistenceError, got {error:?}");
    };
    let invalid = source.downcast_ref::<InvalidTableName>().unwrap();
    assert_eq!(invalid.name, BadlyNamedView::TABLE_NAME);
    let error = ViewRepository::<Counter, BadlyNamedView>::commit(&views, Vec::new(), None).await;
    assert!(matches!(error, Err(CQRSError::PersistenceError(_))));
    assert_eq!(store.read_all(0, 10).await.unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------
// The file.

#[tokio::test]
async fn everything_survives_reopening_the_file() {
    let db = TempDb::new("sqlite-test");
    let id = Uuid::new_v4();
    let first_positions;
    {
        let store = db.open().await;
        // Migrating again is harmless.
        store.migrate().await.unwrap();
        let framework = CQRSFramework::<Counter>::new(store.clone())
            .with_snapshots(store.clone(), SnapshotPolicy::every(3));
        for amount in [5, 6, 7, 8] {
            framework
                .dispatch(id, CounterCommand::Add(amount))
                .await
                .unwrap();
        }
        first_positions = store.read_all(0, 100).await.unwrap();
        store
            .save_checkpoint(Checkpoint {
                name: "relay".to_owned(),
                position: 3,
            })
            .await
            .unwrap();
    }
    let store = SqliteEventRepository::connect(
        &format!("sqlite://{}", db.path().display()),
        SqliteOptions::default(),
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    assert_eq!(store.read_all(0, 100).await.unwrap(), first_positions);
    assert_eq!(store.checkpoint("relay").await.unwrap(), 3);
    assert_eq!(
        store
            .load_snapshot(Counter::NAME, id)
            .await
            .unwrap()
            .unwrap()
            .sequence,
        3
    );
    let receiver = store.subscribe().unwrap();
    assert_eq!(
        *receiver.borrow(),
        4,
        "the notification starts at the stored position"
    );

    let framework = CQRSFramework::<Counter>::new(store.clone())
        .with_snapshots(store.clone(), SnapshotPolicy::every(3));
    let receipt = framework
        .dispatch(id, CounterCommand::Add(9))
        .await
        .unwrap();
    assert_eq!((receipt.sequence, receipt.positions.clone()), (5, vec![5]));
    assert_eq!(
        framework.load(id).await.unwrap().applied,
        vec![5, 6, 7, 8, 9]
    );
    assert_eq!(*receiver.borrow(), 5);
}

#[tokio::test]
async fn the_file_is_in_wal_mode_with_the_chosen_durability() {
    for (durability, expected) in [(Durability::Full, 2), (Durability::Normal, 1)] {
        let db = TempDb::new("sqlite-test");
        let store = db
            .open_with(SqliteOptions::default().durability(durability))
            .await;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(synchronous, expected, "{durability:?}");
    }
}

#[tokio::test]
async fn an_invalid_url_is_a_persistence_error() {
    let error = SqliteEventRepository::connect("sqlite://?mode=bogus", SqliteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(error, CQRSError::PersistenceError(_)), "{error:?}");
}

#[test]
fn a_store_whose_runtime_stopped_fails_typed_and_the_append_can_be_retried() {
    let db = TempDb::new("sqlite-test");
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = first.block_on(db.open());
    // The writer task dies with its runtime, like a dropped connection.
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let id = Uuid::new_v4();
        let batch = counter_batch(id, 1, 2);
        let error = store.append(batch.clone()).await.unwrap_err();
        assert!(matches!(error, CQRSError::PersistenceError(_)), "{error:?}");
        // Reads still work (they do not need the writer); nothing was stored.
        assert_eq!(store.event_sequence(Counter::NAME, id).await.unwrap(), 0);

        // Reopened, the same append (same ids) goes in once.
        let store = db.open().await;
        let positions = store.append(batch.clone()).await.unwrap();
        assert_eq!(store.append(batch).await.unwrap(), positions);
        assert_eq!(store.event_sequence(Counter::NAME, id).await.unwrap(), 2);
    });
}

// ---------------------------------------------------------------------------------------
// SIGKILL in the middle of appends.

/// Set in the child process of `a_killed_writer_leaves_only_whole_commands`: the path of
/// the database the child appends to until it is killed.
const CHILD_DB: &str = "CQRS_SQLITE_TEST_CHILD_DB";

/// Not a test on its own: the body of the child process that the crash test kills. It
/// appends two-event commands from several tasks until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_killed_writer_leaves_only_whole_commands as its child process"]
async fn child_appends_until_killed() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let store = SqliteEventRepository::open(&path).await.unwrap();
    let framework = Arc::new(CQRSFramework::<Tally>::new(store));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let framework = Arc::clone(&framework);
        tasks.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            loop {
                framework
                    .dispatch(id, CounterCommand::AddTwice(1))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn a_killed_writer_leaves_only_whole_commands() {
    let db = TempDb::new("sqlite-test");
    let exe = std::env::current_exe().unwrap();
    let mut seen = 0;
    for round in 0..3 {
        let mut child = tokio::process::Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "child_appends_until_killed",
                "--nocapture",
            ])
            .env(CHILD_DB, db.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until this child has appended at least 40 events, then kill it mid-stream.
        let store = db.open().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while store.read_all(seen, usize::MAX).await.unwrap().len() < 40 {
            assert!(
                std::time::Instant::now() < deadline,
                "the child did not append 40 events (round {round})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        drop(store);

        // Every command stored both of its events or neither; histories have no hole.
        let store = db.open().await;
        let all = store.read_all(0, usize::MAX).await.unwrap();
        assert!(all.len() as i64 >= seen + 40);
        let mut by_aggregate: std::collections::HashMap<Uuid, Vec<i64>> = Default::default();
        for event in &all {
            by_aggregate
                .entry(event.aggregate_id)
                .or_default()
                .push(event.sequence);
        }
        for (id, sequences) in by_aggregate {
            assert_eq!(
                sequences.len() % 2,
                0,
                "aggregate {id}: half a command stored"
            );
            assert_eq!(sequences, (1..=sequences.len() as i64).collect::<Vec<_>>());
        }
        seen = all.len() as i64;
    }
}

#[tokio::test]
async fn a_store_on_a_pool_of_your_own() {
    let db = TempDb::new("sqlite-test");
    let store = db.open_on_own_pool().await;
    let id = Uuid::new_v4();
    let positions = store.append(counter_batch(id, 1, 3)).await.unwrap();
    assert_eq!(positions, vec![1, 2, 3]);
    let error = store.append(counter_batch(id, 3, 4)).await.unwrap_err();
    assert!(
        matches!(
            error,
            CQRSError::Conflict {
                expected_sequence: 2,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(
        sequences(&store.load_events(Counter::NAME, id, 1).await.unwrap()),
        vec![2, 3]
    );
}

// ---------------------------------------------------------------------------------------
// Payloads: the text goes in and comes back as the same JSON value, on both read paths
// (the store's own read-only connections, and a pool of your own).

async fn payloads_round_trip(store: &SqliteEventRepository) {
    cqrs_tests::check_awkward_payloads(store, &counter_event(Uuid::new_v4(), 1, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_and_metadata_come_back_as_the_same_json() {
    let db = TempDb::new("sqlite-test");
    payloads_round_trip(&db.open_fast().await).await;

    let other = TempDb::new("sqlite-test");
    payloads_round_trip(&other.open_on_own_pool().await).await;
}

// ---------------------------------------------------------------------------------------
// Correlation and causation: columns of their own, added to a database made before them.

/// The events table (and its neighbours) as the store created them before events carried
/// correlation and causation ids.
const SCHEMA_WITHOUT_CORRELATION: &str = r#"
CREATE TABLE cqrs_events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL UNIQUE,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence >= 1),
    event_type     TEXT    NOT NULL,
    event_version  TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    timestamp      INTEGER NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE TRIGGER cqrs_events_no_gap
BEFORE INSERT ON cqrs_events
WHEN NEW.sequence > 1 AND NOT EXISTS (
    SELECT 1 FROM cqrs_events
    WHERE aggregate_type = NEW.aggregate_type
      AND aggregate_id = NEW.aggregate_id
      AND sequence = NEW.sequence - 1
)
BEGIN
    SELECT RAISE(ABORT, 'cqrs_sequence_gap');
END;

CREATE TABLE cqrs_snapshots (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence >= 0),
    state          TEXT    NOT NULL,
    timestamp      INTEGER NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE cqrs_checkpoints (
    name       TEXT    NOT NULL PRIMARY KEY,
    position   INTEGER NOT NULL CHECK (position >= 0),
    updated_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
"#;

/// A database file with the schema before correlation and causation, holding one event of
/// `id` at sequence 1 (written with plain SQL, as the previous version stored it).
async fn database_without_correlation(db: &TempDb, id: Uuid) {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db.path())
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    sqlx::raw_sql(SCHEMA_WITHOUT_CORRELATION)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO cqrs_events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, payload, metadata, timestamp) \
         VALUES (?, 'counter', ?, 1, 'Added', '1', '{\"Added\":{\"amount\":7}}', 'null', 1700000000000000)",
    )
    .bind(Uuid::new_v4().to_string())
    .bind(id.to_string())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

fn with_context(
    mut event: PersistableDomainEvent,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
) -> PersistableDomainEvent {
    event.correlation_id = correlation_id;
    event.causation_id = causation_id;
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_made_before_correlation_gains_the_columns_on_open() {
    let db = TempDb::new("sqlite-test");
    let id = Uuid::new_v4();
    database_without_correlation(&db, id).await;

    // Two processes' worth of stores open (and migrate) the old file at once.
    let (store, other) = tokio::join!(db.open(), db.open_fast());
    store.migrate().await.unwrap();
    let columns: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_table_info('cqrs_events') ORDER BY cid")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        columns[columns.len() - 2..],
        ["correlation_id".to_owned(), "causation_id".to_owned()]
    );

    // The old row reads back with neither id, on every read path.
    let old = store.load_events(Counter::NAME, id, 0).await.unwrap();
    assert_eq!(sequences(&old), vec![1]);
    assert_eq!((old[0].correlation_id, old[0].causation_id), (None, None));
    assert_eq!(
        old[0].decode::<CounterEvent>().unwrap().event,
        CounterEvent::Added { amount: 7 }
    );
    assert_eq!(other.read_all(0, 10).await.unwrap(), old);
    let own_pool = db.open_on_own_pool().await;
    assert_eq!(own_pool.read_all(0, 10).await.unwrap(), old);
    assert_eq!(
        own_pool.load_events(Counter::NAME, id, 0).await.unwrap(),
        old
    );

    // New events keep both ids, beside the old one.
    let (correlation, command) = (Uuid::new_v4(), Uuid::new_v4());
    let new = vec![
        with_context(counter_event(id, 2, 1), Some(correlation), Some(command)),
        with_context(counter_event(id, 3, 2), Some(correlation), None),
    ];
    let positions = store.append(new.clone()).await.unwrap();
    assert_eq!(positions, vec![2, 3]);
    for reader in [&store, &other, &own_pool] {
        let loaded = reader.load_events(Counter::NAME, id, 0).await.unwrap();
        let ids: Vec<_> = loaded
            .iter()
            .map(|e| (e.sequence, e.correlation_id, e.causation_id))
            .collect();
        assert_eq!(
            ids,
            vec![
                (1, None, None),
                (2, Some(correlation), Some(command)),
                (3, Some(correlation), None)
            ]
        );
        assert_eq!(reader.read_all(0, 10).await.unwrap(), loaded);
        let caused = reader
            .events_caused_by(Counter::NAME, id, command)
            .await
            .unwrap();
        assert_eq!(caused, loaded[1..2]);
    }
}

/// The plan SQLite makes for `events_caused_by`'s query (the store's SQL, repeated here):
/// it must read the causation index rather than the aggregate's whole history, and need no
/// sort of its own.
#[tokio::test]
async fn events_caused_by_reads_the_causation_index() {
    let db = TempDb::new("sqlite-test");
    let store = db.open_fast().await;
    let rows = sqlx::query(
        "EXPLAIN QUERY PLAN SELECT * FROM cqrs_events \
         WHERE causation_id = ? AND aggregate_type = ? AND aggregate_id = ? ORDER BY sequence",
    )
    .bind(Uuid::new_v4().to_string())
    .bind(Counter::NAME)
    .bind(Uuid::new_v4().to_string())
    .fetch_all(store.pool())
    .await
    .unwrap();
    let plan: Vec<String> = rows
        .iter()
        .map(|row| cqrs::sqlx::Row::get::<String, _>(row, 3))
        .collect();
    assert!(
        plan.iter()
            .any(|step| step.contains("USING INDEX cqrs_events_causation (causation_id=? AND aggregate_type=? AND aggregate_id=?)")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|step| step.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}
