//! The PostgreSQL store against the server at `CQRS_POSTGRES_URL`.
//!
//! Without the variable every test prints why it is skipped and passes; with it, a server
//! that cannot be reached fails the tests. Each test works in its own schema (`t_<uuid>`),
//! dropped at the end, so the tests run in parallel and twice in a row.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cqrs::sqlx::postgres::{PgConnection, PgPoolOptions};
use cqrs::sqlx::{self, Connection, Executor, Row};
use cqrs::InvalidIdentifier;
use cqrs::{
    Aggregate, CQRSError, CQRSFramework, Checkpoint, DecodeError, EventEnvelope, EventRepository,
    PersistableDomainEvent, PostgresEventRepository, PostgresViewRepository, Projection,
    RetryPolicy, SnapshotPolicy, SnapshotRepository, View, ViewContext, ViewRepository,
};
use cqrs_testkit::conformance::{
    check_checkpoint_repository, check_dead_letter_repository, check_event_repository,
    check_snapshot_repository, check_view_repository, PostgresHarness, StoreHarness,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

mod common;

use common::counter::{
    counter_event, Counter, CounterCommand, CounterError, CounterEvent, CounterView, Tally,
    TallyState,
};

const URL_VAR: &str = "CQRS_POSTGRES_URL";

/// The server's URL, or `None` (after saying so) when the suite is to be skipped.
fn url(test: &str) -> Option<String> {
    let _ = test;
    cqrs_tests::server_url(
        URL_VAR,
        "postgres store",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

/// A migrated store in a fresh schema; the schema is dropped by [`Fixture::drop_schema`].
struct Fixture {
    store: PostgresEventRepository,
    url: String,
}

impl Fixture {
    async fn new(test: &str) -> Option<Fixture> {
        let url = url(test)?;
        Some(Self::with_url(url, 16).await)
    }

    async fn with_url(url: String, connections: u32) -> Fixture {
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{URL_VAR} is set but the server is unreachable: {e}"));
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let store = PostgresEventRepository::from_pool(pool)
            .with_schema(&schema)
            .unwrap();
        store.migrate().await.unwrap();
        Fixture { store, url }
    }

    fn schema(&self) -> &str {
        self.store.schema()
    }

    /// A connection of its own, outside the store's pool.
    async fn connection(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }

    async fn drop_schema(self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema());
        if let Err(error) = self.store.pool().execute(sql.as_str()).await {
            eprintln!("could not drop schema {}: {error}", self.schema());
        }
        self.store.pool().close().await;
    }
}

// ---------------------------------------------------------------------------------------
// The testkit's conformance suite.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite() {
    let Some(url) = url("conformance_suite") else {
        return;
    };
    let harness = PostgresHarness::new(url);
    check_event_repository(&harness).await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_conformance_suite() {
    let Some(url) = url("snapshot_conformance_suite") else {
        return;
    };
    let harness = PostgresHarness::new(url);
    check_snapshot_repository(&harness).await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn view_conformance_suite() {
    let Some(url) = url("view_conformance_suite") else {
        return;
    };
    let harness = PostgresHarness::new(url);
    check_view_repository(&harness).await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoint_conformance_suite() {
    let Some(url) = url("checkpoint_conformance_suite") else {
        return;
    };
    let harness = PostgresHarness::new(url);
    check_checkpoint_repository(&harness).await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_conformance_suite() {
    let Some(url) = url("dead_letter_conformance_suite") else {
        return;
    };
    let harness = PostgresHarness::new(url);
    check_dead_letter_repository(&harness).await;
    harness.cleanup().await;
}

// ---------------------------------------------------------------------------------------
// Raw inserts.

/// Inserts `event` on `conn` inside the transaction the caller has open, the way an append
/// does (transaction id first, then the position), and returns the position it took.
async fn append_on(conn: &mut PgConnection, schema: &str, event: &PersistableDomainEvent) -> i64 {
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *conn)
        .await
        .unwrap();
    let sql = format!(
        "INSERT INTO \"{schema}\".cqrs_events (event_id, aggregate_type, aggregate_id, sequence, \
         event_type, event_version, payload, metadata, \"timestamp\") \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING position"
    );
    sqlx::query_scalar(&sql)
        .bind(event.event_id)
        .bind(event.aggregate_type.as_str())
        .bind(event.aggregate_id)
        .bind(event.sequence)
        .bind(event.event_type.as_str())
        .bind(event.event_version.as_str())
        .bind(&event.payload)
        .bind(&event.metadata)
        .bind(event.timestamp)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

fn positions(events: &[PersistableDomainEvent]) -> Vec<i64> {
    events.iter().map(|e| e.position).collect()
}

// ---------------------------------------------------------------------------------------
// Races.

/// 16 tasks x 500 dispatches on one aggregate through one framework.
async fn race(framework: Arc<CQRSFramework<Tally>>, id: Uuid) -> (u64, i64, Vec<String>) {
    let mut tasks = Vec::new();
    for task in 0..16i64 {
        let framework = Arc::clone(&framework);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut conflicts, mut other, mut sum) = (0u64, 0u64, Vec::new(), 0i64);
            for i in 0..500i64 {
                let by = task * 1000 + i + 1;
                match framework.dispatch(id, CounterCommand::Add(by)).await {
                    Ok(_) => {
                        ok += 1;
                        sum += by;
                    }
                    Err(e) if e.framework().is_conflict() => conflicts += 1,
                    Err(e) => other.push(format!("{e:?}")),
                }
            }
            (ok, conflicts, other, sum)
        }));
    }
    let (mut ok, mut sum, mut other) = (0, 0, Vec::new());
    let mut conflicts = 0;
    for task in tasks {
        let (o, c, e, s) = task.await.unwrap();
        ok += o;
        conflicts += c;
        sum += s;
        other.extend(e);
    }
    assert_eq!(ok + conflicts + other.len() as u64, 8000);
    (ok, sum, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_race_on_one_aggregate() {
    let Some(fx) = Fixture::new("sixteen_writers_race_on_one_aggregate").await else {
        return;
    };
    // Without retries: every failure is a conflict and every success is stored exactly once.
    let framework = Arc::new(
        CQRSFramework::<Tally>::new(fx.store.clone())
            .with_snapshots(fx.store.clone(), SnapshotPolicy::every(50)),
    );
    let id = Uuid::new_v4();
    let (ok, sum, other) = race(Arc::clone(&framework), id).await;
    assert!(other.is_empty(), "failures other than Conflict: {other:?}");
    let stored = fx.store.load_events(Tally::NAME, id, 0).await.unwrap();
    let sequences: Vec<i64> = stored.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=ok as i64).collect::<Vec<_>>());
    let ids: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), stored.len());
    let state = CQRSFramework::<Tally>::new(fx.store.clone())
        .load(id)
        .await
        .unwrap();
    assert_eq!((state.events, state.total), (ok as i64, sum));
    assert!(ok < 8000, "16 writers on one aggregate never conflicted");

    // With retries: all 8000 succeed and the sum is exact.
    let framework = Arc::new(
        CQRSFramework::<Tally>::new(fx.store.clone())
            .with_snapshots(fx.store.clone(), SnapshotPolicy::every(50))
            .with_retry(
                RetryPolicy::attempts(100_000)
                    .with_backoff(Duration::from_micros(100), Duration::from_millis(5)),
            ),
    );
    let id = Uuid::new_v4();
    let (ok, sum, other) = race(framework, id).await;
    assert!(other.is_empty(), "failures with retries on: {other:?}");
    assert_eq!(ok, 8000);
    let state = CQRSFramework::<Tally>::new(fx.store.clone())
        .load(id)
        .await
        .unwrap();
    assert_eq!(state.events, 8000);
    assert_eq!(state.total, sum);
    assert_eq!(
        state.total,
        (0..16i64)
            .map(|t| (0..500i64).map(|i| t * 1000 + i + 1).sum::<i64>())
            .sum::<i64>()
    );
    assert_eq!(
        fx.store.event_sequence(Tally::NAME, id).await.unwrap(),
        8000
    );
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Group commit.

/// What one refused append of the stale writers below tried, and what it must get.
#[derive(Clone, Copy, Debug)]
enum Refused {
    /// Sequence 1 of an aggregate that has it: `Conflict`.
    Stale,
    /// A fresh aggregate with the event id of a stored event: `DuplicateEventId`.
    ReusedId,
    /// The stored append sent again: success, with the positions stored the first time.
    Retry,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_append_in_a_group_never_fails_its_neighbours() {
    let Some(fx) = Fixture::new("a_refused_append_in_a_group_never_fails_its_neighbours").await
    else {
        return;
    };
    // Aggregates with one stored event, for the stale writers to collide with.
    let mut targets = Vec::new();
    for amount in 0..4 {
        let event = counter_event(Uuid::new_v4(), 1, amount);
        let position = fx.store.append(vec![event.clone()]).await.unwrap();
        targets.push((event, position));
    }
    let targets = Arc::new(targets);
    let before = fx.store.group_commit_counts();

    // 24 writers on aggregates of their own, each appending 40 commands in order: every
    // append must succeed, whatever the stale writers' appends in the same groups get.
    let mut writers = Vec::new();
    for _ in 0..24 {
        let store = fx.store.clone();
        writers.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            for sequence in 1..=40 {
                if let Err(error) = store
                    .append(vec![counter_event(id, sequence, sequence)])
                    .await
                {
                    return Err(format!("{id} sequence {sequence}: {error:?}"));
                }
            }
            Ok(id)
        }));
    }
    // 8 stale writers among them, each sending 30 appends that the store must refuse (or
    // recognise as a retry) one by one.
    let mut stale = Vec::new();
    for task in 0..8usize {
        let store = fx.store.clone();
        let targets = Arc::clone(&targets);
        stale.push(tokio::spawn(async move {
            let mut wrong = Vec::new();
            for i in 0..30usize {
                let (stored, positions) = &targets[(task + i) % targets.len()];
                let kind = [Refused::Stale, Refused::ReusedId, Refused::Retry][(task + i) % 3];
                let batch = match kind {
                    Refused::Stale => vec![counter_event(stored.aggregate_id, 1, 7)],
                    Refused::ReusedId => {
                        let mut event = counter_event(Uuid::new_v4(), 1, 7);
                        event.event_id = stored.event_id;
                        vec![event]
                    }
                    Refused::Retry => vec![stored.clone()],
                };
                let result = store.append(batch).await;
                let right = match (kind, &result) {
                    (Refused::Stale, Err(CQRSError::Conflict { .. })) => true,
                    (Refused::ReusedId, Err(CQRSError::DuplicateEventId { event_id })) => {
                        *event_id == stored.event_id
                    }
                    (Refused::Retry, Ok(again)) => again == positions,
                    _ => false,
                };
                if !right {
                    wrong.push(format!("{kind:?}: {result:?}"));
                }
            }
            wrong
        }));
    }
    let mut ids = Vec::new();
    for writer in writers {
        ids.push(writer.await.unwrap().unwrap());
    }
    for task in stale {
        let wrong = task.await.unwrap();
        assert!(
            wrong.is_empty(),
            "refused appends answered wrongly: {wrong:?}"
        );
    }

    // The appends really shared statements.
    let after = fx.store.group_commit_counts();
    assert!(
        after.group_statements > before.group_statements
            && after.grouped_appends > before.grouped_appends,
        "no group formed: {before:?} -> {after:?}"
    );

    // Exactly the accepted appends are stored, each history whole, the global order without
    // a duplicate.
    for id in &ids {
        let stored = fx.store.load_events(Counter::NAME, *id, 0).await.unwrap();
        let sequences: Vec<i64> = stored.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, (1..=40).collect::<Vec<_>>());
    }
    for (event, _) in targets.iter() {
        assert_eq!(
            fx.store
                .event_sequence(Counter::NAME, event.aggregate_id)
                .await
                .unwrap(),
            1
        );
    }
    let all = fx.store.read_all(0, 10_000).await.unwrap();
    assert_eq!(all.len(), 24 * 40 + targets.len());
    assert!(positions(&all).windows(2).all(|w| w[0] < w[1]));
    let unique: HashSet<Uuid> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(unique.len(), all.len());
    fx.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_group_commit_every_append_goes_alone() {
    let Some(fx) = Fixture::new("without_group_commit_every_append_goes_alone").await else {
        return;
    };
    let store = fx.store.clone().with_group_commit(false);
    let mut writers = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            for sequence in 1..=10 {
                store
                    .append(vec![counter_event(id, sequence, sequence)])
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(
        store.group_commit_counts(),
        cqrs::GroupCommitCounts::default()
    );
    assert_eq!(store.read_all(0, 1000).await.unwrap().len(), 160);
    fx.drop_schema().await;
}

/// A migrated store in a fresh schema (returned with it), on `connections` connections
/// that always run the generic plan of a prepared statement: the plan PostgreSQL made when
/// the statement was first run, on the tables as they were then.
async fn generic_plans_store(url: &str, connections: u32) -> (PostgresEventRepository, String) {
    let options: cqrs::sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(options.options([("plan_cache_mode", "force_generic_plan")]))
        .await
        .unwrap_or_else(|e| panic!("{URL_VAR} is set but the server is unreachable: {e}"));
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let store = PostgresEventRepository::from_pool(pool)
        .with_schema(&schema)
        .unwrap()
        .with_notifications(false);
    store.migrate().await.unwrap();
    (store, schema)
}

/// Has each idle connection of the store's pool report its table statistics to the server
/// at once (a backend otherwise reports them up to seconds after it goes idle, or when it
/// ends), then closes the pool. A connection in use (a `LISTEN`) changed no table. The
/// reports still take a moment to be visible: readers wait for the counts they expect.
async fn report_statistics_and_close(store: &PostgresEventRepository) {
    let pool = store.pool();
    let mut held = Vec::new();
    while let Some(connection) = pool.try_acquire() {
        held.push(connection);
    }
    for connection in &mut held {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&mut **connection)
            .await
            .unwrap();
    }
    drop(held);
    pool.close().await;
}

/// A connection may keep a generic plan of the group statement made while the table was
/// empty, for as long as it lives. Such a plan must still probe the unique index per append:
/// a hash join over the table would read every stored event on every group (seen under load
/// as appends slowing down as the table grew). `force_generic_plan` makes every execution
/// use the plan made on the empty table; the table's own statistics then show whether the
/// group statements scanned it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_appends_probe_the_index_even_with_a_plan_made_on_an_empty_table() {
    let Some(url) = url("group_appends_probe_the_index_even_with_a_plan_made_on_an_empty_table")
    else {
        return;
    };
    let (store, schema) = generic_plans_store(&url, 4).await;

    let (writers, commands) = (16, 25);
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            for sequence in 1..=commands {
                store
                    .append(vec![counter_event(id, sequence, sequence)])
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let counts = store.group_commit_counts();
    assert!(counts.group_statements > 5, "{counts:?}");
    report_statistics_and_close(&store).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let expected = i64::from(writers) * commands;
    let mut scanned = None;
    for _ in 0..600 {
        let row = sqlx::query(
            "SELECT n_tup_ins, seq_scan, seq_tup_read FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname = 'cqrs_events'",
        )
        .bind(&schema)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        // Rows of a statement that failed as a whole count too.
        let inserted: i64 = row.get(0);
        if inserted >= expected {
            scanned = Some((row.get::<i64, _>(1), row.get::<i64, _>(2)));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (seq_scans, rows_read) = scanned.expect("the appends' statistics never arrived");
    assert_eq!(
        rows_read, 0,
        "the group statements read the table ({seq_scans} sequential scans)"
    );
    conn.execute(format!("DROP SCHEMA \"{schema}\" CASCADE").as_str())
        .await
        .unwrap();
}

/// The appends' statements are planned once per connection, not on every execution: a
/// custom plan that counts the elements of its array parameters looks cheaper than the
/// generic plan, and PostgreSQL would then plan each group anew (as long as running it).
/// `pg_prepared_statements` counts each connection's custom and generic plans per
/// statement; PostgreSQL tries five custom plans before it compares.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn append_statements_keep_their_generic_plan() {
    let Some(fx) = Fixture::new("append_statements_keep_their_generic_plan").await else {
        return;
    };
    let (writers, commands) = (8, 100);
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = fx.store.clone();
        tasks.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            let mut sequence = 0;
            for _ in 0..commands {
                // Half the writers append two events at a time: the one-aggregate statement
                // when such an append runs alone.
                let events: Vec<_> = (0..1 + writer % 2)
                    .map(|_| {
                        sequence += 1;
                        counter_event(id, sequence, 1)
                    })
                    .collect();
                store.append(events).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let counts = fx.store.group_commit_counts();
    assert!(counts.group_statements > 5, "{counts:?}");

    let pool = fx.store.pool();
    let mut held = Vec::new();
    while let Some(connection) = pool.try_acquire() {
        held.push(connection);
    }
    let mut generic_plans = 0;
    for connection in &mut held {
        let rows = sqlx::query(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements \
             WHERE statement LIKE 'INSERT INTO%cqrs_events%unnest(%'",
        )
        .fetch_all(&mut **connection)
        .await
        .unwrap();
        for row in rows {
            let (statement, generic, custom): (String, i64, i64) =
                (row.get(0), row.get(1), row.get(2));
            generic_plans += generic;
            assert!(
                custom <= 5,
                "planned {custom} times, generic plan used {generic} times: {statement}"
            );
        }
    }
    assert!(
        generic_plans > 0,
        "no append statement ran on a generic plan on the pool's idle connections"
    );
    drop(held);
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Gap safety.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_never_skips_a_lower_position_that_commits_last() {
    let Some(fx) = Fixture::new("reader_never_skips_a_lower_position_that_commits_last").await
    else {
        return;
    };
    let store = fx
        .store
        .clone()
        .with_gap_timeout(Duration::from_millis(200));
    let first = store
        .append(vec![counter_event(Uuid::new_v4(), 1, 1)])
        .await
        .unwrap()[0];

    // A transaction takes the next position and stays open.
    let mut held = fx.connection().await;
    held.execute("BEGIN").await.unwrap();
    let slow = counter_event(Uuid::new_v4(), 1, 2);
    let low = append_on(&mut held, fx.schema(), &slow).await;
    // A later append takes a higher position and commits first.
    let high = store
        .append(vec![counter_event(Uuid::new_v4(), 1, 3)])
        .await
        .unwrap()[0];
    assert!(first < low && low < high, "{first} < {low} < {high}");

    // The reader must not return the higher position past the open hole.
    let seen = store.read_all(0, 100).await.unwrap();
    assert_eq!(positions(&seen), vec![first]);
    let seen = store.read_all(first, 100).await.unwrap();
    assert!(
        seen.is_empty(),
        "returned {:?} past an open hole",
        positions(&seen)
    );

    // Once the slow transaction commits, the same reader sees both, in order.
    held.execute("COMMIT").await.unwrap();
    let seen = store.read_all(first, 100).await.unwrap();
    assert_eq!(positions(&seen), vec![low, high]);
    assert_eq!(seen[0].event_id, slow.event_id);

    // A rolled-back transaction leaves a hole that is skipped once it is known to be final.
    held.execute("BEGIN").await.unwrap();
    let lost = append_on(&mut held, fx.schema(), &counter_event(Uuid::new_v4(), 1, 4)).await;
    let after = store
        .append(vec![counter_event(Uuid::new_v4(), 1, 5)])
        .await
        .unwrap()[0];
    assert!(store.read_all(high, 100).await.unwrap().is_empty());
    held.execute("ROLLBACK").await.unwrap();
    let seen = store.read_all(high, 100).await.unwrap();
    assert_eq!(positions(&seen), vec![after]);
    assert!(lost < after);
    // Another handle (no memory of that hole) reaches the same answer.
    let fresh = PostgresEventRepository::from_pool(fx.store.pool().clone())
        .with_schema(fx.schema())
        .unwrap();
    assert_eq!(
        positions(&fresh.read_all(high, 100).await.unwrap()),
        vec![after]
    );
    drop(held);
    fx.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reader_sees_every_event_once_in_order() {
    let Some(fx) = Fixture::new("concurrent_reader_sees_every_event_once_in_order").await else {
        return;
    };
    // Writers append (some losing races, which leaves rolled-back positions) while a reader
    // follows read_all from where it last was; it must end with every event exactly once.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let store = fx.store.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let page = store.read_all(after, 50).await.unwrap();
                if let Some(last) = page.last() {
                    after = last.position;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    return seen;
                }
            }
        })
    };
    let framework = Arc::new(
        CQRSFramework::<Counter>::new(fx.store.clone()).with_retry(RetryPolicy::attempts(1000)),
    );
    let shared = Uuid::new_v4();
    let mut writers = Vec::new();
    for w in 0..8 {
        let framework = Arc::clone(&framework);
        writers.push(tokio::spawn(async move {
            let own = Uuid::new_v4();
            for i in 0..60 {
                let id = if i % 3 == 0 { shared } else { own };
                framework
                    .dispatch(id, CounterCommand::Add(w * 100 + i))
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await.unwrap();
    let all = fx.store.read_all(0, 10_000).await.unwrap();
    assert_eq!(all.len(), 8 * 60);
    assert_eq!(positions(&seen), positions(&all));
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Damaged rows and failures.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_rows_are_typed_errors_naming_the_event() {
    let Some(fx) = Fixture::new("damaged_rows_are_typed_errors_naming_the_event").await else {
        return;
    };
    let framework = CQRSFramework::<Counter>::new(fx.store.clone());
    let harness = PostgresHarness::new(fx.url.clone());

    let bad_json = Uuid::new_v4();
    let unknown = Uuid::new_v4();
    let hole = Uuid::new_v4();
    for id in [bad_json, unknown, hole] {
        for by in 1..=3 {
            framework
                .dispatch(id, CounterCommand::Add(by))
                .await
                .unwrap();
        }
    }
    harness
        .corrupt_payload(&fx.store, Counter::NAME, bad_json, 2, "{\"Added\": oops")
        .await;
    harness
        .set_event_type(&fx.store, Counter::NAME, unknown, 2, "Subtracted")
        .await;
    harness
        .delete_event(&fx.store, Counter::NAME, hole, 2)
        .await;

    let error = framework.load(bad_json).await.unwrap_err();
    match error.framework() {
        CQRSError::EventDecode(e) => {
            assert_eq!(
                (e.aggregate_type.as_str(), e.aggregate_id, e.sequence),
                (Counter::NAME, bad_json, 2)
            );
            assert!(matches!(e.kind, DecodeError::MalformedPayload(_)), "{e:?}");
        }
        other => panic!("expected EventDecode, got {other:?}"),
    }
    // `framework` has these aggregates in its state cache and would not read the damaged
    // rows again: a framework without the cache (a restarted process) rebuilds from them.
    let uncached = CQRSFramework::<Counter>::new(fx.store.clone()).without_state_cache();
    let error = uncached
        .dispatch(unknown, CounterCommand::Add(1))
        .await
        .unwrap_err();
    match error.framework() {
        CQRSError::EventDecode(e) => {
            assert_eq!(
                (e.aggregate_id, e.sequence, e.event_type.as_str()),
                (unknown, 2, "Subtracted")
            );
            assert!(matches!(e.kind, DecodeError::UnknownEventType), "{e:?}");
        }
        other => panic!("expected EventDecode, got {other:?}"),
    }
    let error = framework.load(hole).await.unwrap_err();
    match error.framework() {
        CQRSError::SequenceGap {
            aggregate_id,
            expected_sequence,
            found_sequence,
            ..
        } => assert_eq!(
            (*aggregate_id, *expected_sequence, *found_sequence),
            (hole, 2, 3)
        ),
        other => panic!("expected SequenceGap, got {other:?}"),
    }
    // Nothing was appended by the refused dispatch.
    assert_eq!(
        fx.store
            .event_sequence(Counter::NAME, unknown)
            .await
            .unwrap(),
        3
    );
    fx.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_persistence_error() {
    if url("unreachable_server_is_a_persistence_error").is_none() {
        return;
    }
    // Nothing listens on port 1.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    let store = PostgresEventRepository::from_pool(pool);
    let framework = CQRSFramework::<Counter>::new(store.clone());
    let error = framework
        .dispatch(Uuid::new_v4(), CounterCommand::Add(1))
        .await
        .unwrap_err();
    assert!(
        matches!(error.framework(), CQRSError::PersistenceError(_)),
        "{error:?}"
    );
    let error = store
        .append(vec![counter_event(Uuid::new_v4(), 1, 1)])
        .await
        .unwrap_err();
    assert!(matches!(error, CQRSError::PersistenceError(_)), "{error:?}");
    assert!(matches!(
        store.read_all(0, 10).await.unwrap_err(),
        CQRSError::PersistenceError(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_mid_append_is_a_persistence_error_and_a_retry_succeeds() {
    let Some(fx) =
        Fixture::new("dropped_connection_mid_append_is_a_persistence_error_and_a_retry_succeeds")
            .await
    else {
        return;
    };
    let framework = Arc::new(CQRSFramework::<Counter>::new(fx.store.clone()));
    let id = Uuid::new_v4();

    // Another transaction holds sequence 1 of the aggregate, uncommitted: our append waits
    // on the unique key, and we kill its connection while it waits.
    let mut blocker = fx.connection().await;
    blocker.execute("BEGIN").await.unwrap();
    append_on(&mut blocker, fx.schema(), &counter_event(id, 1, 100)).await;
    let dispatch = {
        let framework = Arc::clone(&framework);
        tokio::spawn(async move { framework.dispatch(id, CounterCommand::Add(1)).await })
    };
    let mut killer = fx.connection().await;
    let pattern = format!("%INSERT INTO \"{}\".cqrs_events%", fx.schema());
    let mut killed = false;
    for _ in 0..500 {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(&pattern)
        .fetch_all(&mut killer)
        .await
        .unwrap();
        if let Some(pid) = pids.first() {
            let row = sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(&mut killer)
                .await
                .unwrap();
            killed = row.get::<bool, _>(0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(killed, "the append never waited on the held sequence");
    let error = dispatch.await.unwrap().unwrap_err();
    assert!(
        matches!(error.framework(), CQRSError::PersistenceError(_)),
        "{error:?}"
    );
    blocker.execute("ROLLBACK").await.unwrap();

    // The same command again, through the same pool: it succeeds, once.
    let receipt = framework
        .dispatch(id, CounterCommand::Add(1))
        .await
        .unwrap();
    assert_eq!(receipt.sequence, 1);
    assert_eq!(framework.load(id).await.unwrap().total, 1);

    // An append that committed but whose answer was lost is simply sent again.
    let batch = vec![counter_event(id, 2, 5), counter_event(id, 3, 6)];
    let first = fx.store.append(batch.clone()).await.unwrap();
    let again = fx.store.append(batch).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(fx.store.event_sequence(Counter::NAME, id).await.unwrap(), 3);
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Schema.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_is_idempotent_and_safe_concurrently() {
    let Some(fx) = Fixture::new("migrate_is_idempotent_and_safe_concurrently").await else {
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = PostgresEventRepository::connect(&fx.url)
            .await
            .unwrap()
            .with_schema(&schema)
            .unwrap();
        tasks.push(tokio::spawn(async move {
            store.migrate().await?;
            store.migrate().await?;
            Ok::<_, CQRSError>(store)
        }));
    }
    let mut stores = Vec::new();
    for task in tasks {
        stores.push(task.await.unwrap().unwrap());
    }
    let positions = stores[0]
        .append(vec![counter_event(Uuid::new_v4(), 1, 1)])
        .await
        .unwrap();
    assert_eq!(stores[3].read_all(0, 10).await.unwrap().len(), 1);
    assert!(positions[0] >= 1);
    let sql = format!("DROP SCHEMA \"{schema}\" CASCADE");
    stores[0].pool().execute(sql.as_str()).await.unwrap();

    for bad in [
        "",
        "a b",
        "x\"; DROP SCHEMA public; --",
        "pg_temp",
        "9lives",
    ] {
        let error = fx.store.clone().with_schema(bad).unwrap_err();
        let CQRSError::PersistenceError(source) = error else {
            panic!("{bad:?}: {error:?}");
        };
        assert_eq!(
            source.downcast_ref::<InvalidIdentifier>().unwrap().name,
            bad
        );
    }
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Snapshots.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_load_the_same_state_as_a_full_replay() {
    let Some(fx) = Fixture::new("snapshots_load_the_same_state_as_a_full_replay").await else {
        return;
    };
    let with_snapshots = CQRSFramework::<Tally>::new(fx.store.clone())
        .with_snapshots(fx.store.clone(), SnapshotPolicy::every(10));
    let replay = CQRSFramework::<Tally>::new(fx.store.clone());
    let id = Uuid::new_v4();
    for by in 1..=25 {
        with_snapshots
            .dispatch(id, CounterCommand::Add(by))
            .await
            .unwrap();
    }
    let snapshot = fx
        .store
        .load_snapshot(Tally::NAME, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.sequence, 20);
    let expected = TallyState {
        total: (1..=25).sum(),
        events: 25,
    };
    assert_eq!(
        serde_json::from_value::<TallyState>(snapshot.state.clone()).unwrap(),
        TallyState {
            total: (1..=20).sum(),
            events: 20
        }
    );
    assert_eq!(with_snapshots.load(id).await.unwrap(), expected);
    assert_eq!(replay.load(id).await.unwrap(), expected);

    // An older snapshot never replaces a newer one.
    let mut older = snapshot.clone();
    older.sequence = 10;
    older.state = json!({ "total": 0, "events": 0 });
    fx.store.save_snapshot(older).await.unwrap();
    assert_eq!(
        fx.store
            .load_snapshot(Tally::NAME, id)
            .await
            .unwrap()
            .unwrap()
            .sequence,
        20
    );

    // A snapshot that no longer decodes: full replay, and the snapshot is rewritten.
    let sql = format!(
        "UPDATE \"{}\".cqrs_snapshots SET state = '\"garbage\"' WHERE aggregate_id = $1",
        fx.schema()
    );
    sqlx::query(&sql)
        .bind(id)
        .execute(fx.store.pool())
        .await
        .unwrap();
    assert_eq!(with_snapshots.load(id).await.unwrap(), expected);
    let rewritten = fx
        .store
        .load_snapshot(Tally::NAME, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rewritten.sequence, 25);
    assert_eq!(
        serde_json::from_value::<TallyState>(rewritten.state).unwrap(),
        expected
    );
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Views.

fn views(fx: &Fixture) -> PostgresViewRepository<CounterView> {
    PostgresViewRepository::new(&fx.store)
}

async fn checkpoint_of(views: &PostgresViewRepository<CounterView>, name: &str) -> i64 {
    ViewRepository::<Counter, CounterView>::checkpoint(views, name)
        .await
        .unwrap()
}

fn cp(name: &str, position: i64) -> Checkpoint {
    Checkpoint {
        name: name.to_owned(),
        position,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_commits_views_and_checkpoint_together() {
    let Some(fx) = Fixture::new("projection_commits_views_and_checkpoint_together").await else {
        return;
    };
    let framework = CQRSFramework::<Counter>::new(fx.store.clone());
    let ids = [Uuid::new_v4(), Uuid::new_v4()];
    for by in 1..=10i64 {
        framework
            .dispatch(ids[(by % 2) as usize], CounterCommand::Add(by))
            .await
            .unwrap();
    }
    let views = views(&fx);
    let projection =
        Projection::<Counter, CounterView>::new(fx.store.clone(), views.clone()).with_batch_size(3);
    let reached = projection.catch_up().await.unwrap();
    let all = fx.store.read_all(0, 100).await.unwrap();
    assert_eq!(reached, all.last().unwrap().position);
    let repo: &dyn ViewRepository<Counter, CounterView> = &views;
    let even = repo.load(&ids[0].to_string()).await.unwrap().unwrap();
    let odd = repo.load(&ids[1].to_string()).await.unwrap().unwrap();
    assert_eq!((even.total, even.events), (2 + 4 + 6 + 8 + 10, 5));
    assert_eq!((odd.total, odd.events), (1 + 3 + 5 + 7 + 9, 5));
    // Restarting applies nothing twice.
    assert_eq!(projection.catch_up().await.unwrap(), reached);
    assert_eq!(repo.load(&ids[0].to_string()).await.unwrap().unwrap(), even);

    // A batch whose view write fails leaves the checkpoint where it was: simulate another
    // projector bumping the row between load and commit.
    framework
        .dispatch(ids[0], CounterCommand::Add(100))
        .await
        .unwrap();
    let mut ctx: ViewContext<CounterView> =
        repo.load_for_update(&ids[0].to_string()).await.unwrap();
    let bump = repo.load_for_update(&ids[0].to_string()).await.unwrap();
    repo.commit(vec![bump], None).await.unwrap();
    ctx.view.total += 100;
    let name = Projection::<Counter, CounterView>::default_name();
    let before = checkpoint_of(&views, &name).await;
    let error = repo
        .commit(vec![ctx], Some(cp(&name, before + 1)))
        .await
        .unwrap_err();
    assert!(matches!(error, CQRSError::ViewConflict { .. }), "{error:?}");
    assert_eq!(checkpoint_of(&views, &name).await, before);
    // The projection itself then applies the event exactly once.
    projection.catch_up().await.unwrap();
    let even = repo.load(&ids[0].to_string()).await.unwrap().unwrap();
    assert_eq!((even.total, even.events), (130, 6));
    fx.drop_schema().await;
}

/// A view's batch must read the rows of its own views, not every row of the view's table,
/// even on a connection that planned the batch's statements while the table was small (the
/// plans PostgreSQL keeps per connection; see
/// `group_appends_probe_the_index_even_with_a_plan_made_on_an_empty_table`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn view_batches_read_their_own_rows_after_the_table_grew() {
    let Some(url) = url("view_batches_read_their_own_rows_after_the_table_grew") else {
        return;
    };
    let (store, schema) = generic_plans_store(&url, 2).await;
    let framework = Arc::new(CQRSFramework::<Counter>::new(store.clone()));
    let views = PostgresViewRepository::<CounterView>::new(&store);
    let projection = Arc::new(
        Projection::<Counter, CounterView>::new(store.clone(), views.clone()).with_batch_size(10),
    );
    let create = |count: usize| {
        let framework = Arc::clone(&framework);
        async move {
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let framework = Arc::clone(&framework);
                tasks.push(tokio::spawn(async move {
                    let mut ids = Vec::new();
                    for _ in 0..count / 16 {
                        let id = Uuid::new_v4();
                        framework
                            .dispatch(id, CounterCommand::Add(1))
                            .await
                            .unwrap();
                        ids.push(id);
                    }
                    ids
                }));
            }
            let mut ids = Vec::new();
            for task in tasks {
                ids.extend(task.await.unwrap());
            }
            ids
        }
    };
    let change = |ids: Vec<Uuid>| {
        let framework = Arc::clone(&framework);
        let projection = Arc::clone(&projection);
        async move {
            for id in ids {
                framework
                    .dispatch(id, CounterCommand::Add(1))
                    .await
                    .unwrap();
            }
            projection.catch_up().await.unwrap();
        }
    };

    // A small table, on which both connections plan the batch's statements.
    let small = create(320).await;
    projection.catch_up().await.unwrap();
    for round in 0..2 {
        change(small[round * 10..round * 10 + 10].to_vec()).await;
    }
    // The table grows twelvefold; then 10 batches change 10 views each.
    let grown = create(4000).await;
    projection.catch_up().await.unwrap();
    for round in 0..10 {
        change(grown[round * 100..round * 100 + 10].to_vec()).await;
    }
    let repo: &dyn ViewRepository<Counter, CounterView> = &views;
    assert_eq!(
        repo.load(&grown[0].to_string())
            .await
            .unwrap()
            .unwrap()
            .events,
        2
    );

    report_statistics_and_close(&store).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut stats = (0, 0);
    for _ in 0..600 {
        let row = sqlx::query(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0), n_tup_upd \
             FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2",
        )
        .bind(&schema)
        .bind(CounterView::TABLE_NAME)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        stats = (row.get::<i64, _>(0), row.get::<i64, _>(1));
        if stats.1 >= 120 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rows_read, updated) = stats;
    assert_eq!(updated, 120, "the changed views were updated once each");
    // While the table was small its batches may have read all of it (2 x 320 rows); after
    // that each batch reads its own 10 views twice (load, update): about 900 rows in all.
    // A plan that kept reading the whole table would read 40,000 more.
    assert!(rows_read <= 3_000, "the batches read {rows_read} view rows");
    conn.execute(format!("DROP SCHEMA \"{schema}\" CASCADE").as_str())
        .await
        .unwrap();
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BadlyNamed;

impl View<Counter> for BadlyNamed {
    const TABLE_NAME: &'static str = "totals\"; DROP TABLE cqrs_events; --";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, _: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_table_name_is_validated_not_spliced() {
    let Some(fx) = Fixture::new("view_table_name_is_validated_not_spliced").await else {
        return;
    };
    fx.store
        .append(vec![counter_event(Uuid::new_v4(), 1, 1)])
        .await
        .unwrap();
    let views = PostgresViewRepository::<BadlyNamed>::new(&fx.store);
    let repo: &dyn ViewRepository<Counter, BadlyNamed> = &views;
    for error in [
        repo.load("x").await.unwrap_err(),
        repo.load_for_update("x").await.unwrap_err(),
        repo.commit(Vec::new(), None).await.unwrap_err(),
    ] {
        let CQRSError::PersistenceError(source) = error else {
            panic!("{error:?}");
        };
        let invalid = source.downcast_ref::<InvalidIdentifier>().unwrap();
        assert_eq!(invalid.name, BadlyNamed::TABLE_NAME);
    }
    assert_eq!(fx.store.read_all(0, 10).await.unwrap().len(), 1);
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Live delivery.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_hear_of_appends_from_other_processes() {
    let Some(fx) = Fixture::new("subscribers_hear_of_appends_from_other_processes").await else {
        return;
    };
    // Another "process": its own pool and handle on the same schema.
    let other = PostgresEventRepository::connect(&fx.url)
        .await
        .unwrap()
        .with_schema(fx.schema())
        .unwrap();
    let mut receiver = fx.store.subscribe().unwrap();
    let id = Uuid::new_v4();
    let mut heard = None;
    // The LISTEN starts in the background: append until one is heard (at most ~10 s).
    for sequence in 1..=20 {
        let position = other
            .append(vec![counter_event(id, sequence, 1)])
            .await
            .unwrap()[0];
        let waited = tokio::time::timeout(Duration::from_millis(500), async {
            while *receiver.borrow_and_update() < position {
                receiver.changed().await.unwrap();
            }
        })
        .await;
        if waited.is_ok() {
            heard = Some(position);
            break;
        }
    }
    let position = heard.expect("no notification reached the other handle");
    assert!(*receiver.borrow() >= position);
    assert!(fx
        .store
        .read_all(0, 100)
        .await
        .unwrap()
        .iter()
        .any(|e| e.position == position));

    // Without notifications nothing is announced.
    let quiet = other.clone().with_notifications(false);
    let last = quiet
        .append(vec![counter_event(Uuid::new_v4(), 1, 1)])
        .await
        .unwrap()[0];
    let waited = tokio::time::timeout(Duration::from_millis(300), async {
        while *receiver.borrow_and_update() < last {
            receiver.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        waited.is_err(),
        "a handle with notifications off announced position {last}"
    );
    other.pool().close().await;
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Snapshot plus tail equals full replay, for random histories.

#[test]
fn snapshot_plus_tail_equals_full_replay_for_random_histories() {
    use proptest::prelude::*;
    let Some(url) = url("snapshot_plus_tail_equals_full_replay_for_random_histories") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fx = runtime.block_on(Fixture::with_url(url, 4));
    let config = ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    };
    proptest!(config, |(amounts in proptest::collection::vec(1i64..1000, 1..40), every in 1u32..8, cache in any::<bool>())| {
        let (with_snapshots, replayed, snapshot) = runtime.block_on(async {
            let mut framework = CQRSFramework::<Tally>::new(fx.store.clone())
                .with_snapshots(fx.store.clone(), SnapshotPolicy::every(every));
            if cache {
                framework = framework.with_state_cache(8);
            }
            let id = Uuid::new_v4();
            for by in &amounts {
                framework.dispatch(id, CounterCommand::Add(*by)).await.unwrap();
            }
            // A framework that only reads snapshots, never the cache.
            let reader = CQRSFramework::<Tally>::new(fx.store.clone())
                .with_snapshots(fx.store.clone(), SnapshotPolicy::Never);
            let replay = CQRSFramework::<Tally>::new(fx.store.clone());
            (
                reader.load(id).await.unwrap(),
                replay.load(id).await.unwrap(),
                fx.store.load_snapshot(Tally::NAME, id).await.unwrap(),
            )
        });
        prop_assert_eq!(&with_snapshots, &replayed);
        prop_assert_eq!(replayed.events, amounts.len() as i64);
        prop_assert_eq!(replayed.total, amounts.iter().sum::<i64>());
        let expected_snapshot = (amounts.len() as i64 / i64::from(every)) * i64::from(every);
        prop_assert_eq!(snapshot.map_or(0, |s| s.sequence), expected_snapshot);
    });
    runtime.block_on(fx.drop_schema());
}

// ---------------------------------------------------------------------------------------
// Payloads: the text goes in and comes back (through binary COPY for `read_all`) as the
// same JSON value.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_and_metadata_come_back_as_the_same_json() {
    let Some(fx) = Fixture::new("payloads_and_metadata_come_back_as_the_same_json").await else {
        return;
    };
    let id = Uuid::new_v4();
    let read = cqrs_tests::check_awkward_payloads(&fx.store, &counter_event(id, 1, 1)).await;
    // Pages of one split the same rows across many COPY statements.
    let mut after = 0;
    let mut one_by_one = Vec::new();
    loop {
        let page = fx.store.read_all(after, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        one_by_one.extend(page);
    }
    assert_eq!(one_by_one, read);
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// `connect`'s pool pings only connections that sat idle.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_replaces_connections_the_server_closed_while_they_were_idle() {
    let Some(base) = url("connect_replaces_connections_the_server_closed_while_they_were_idle")
    else {
        return;
    };
    // A name of its own, so that only this test's connections are terminated.
    let name = format!("cqrs_idle_{}", Uuid::new_v4().simple());
    let separator = if base.contains('?') { '&' } else { '?' };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let store =
        PostgresEventRepository::connect(&format!("{base}{separator}application_name={name}"))
            .await
            .unwrap()
            .with_schema(&schema)
            .unwrap();
    store.migrate().await.unwrap();
    let id = Uuid::new_v4();
    store.append(vec![counter_event(id, 1, 1)]).await.unwrap();

    let mut admin = PgConnection::connect(&base).await.unwrap();
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1) AS t",
    )
    .bind(&name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(terminated >= 1, "no connection of the store was found");

    // Idle for longer than IDLE_PING_AFTER: the ping finds the dead connection and the pool
    // opens a new one, so the caller never sees the server's restart.
    tokio::time::sleep(cqrs::PostgresEventRepository::IDLE_PING_AFTER + Duration::from_millis(500))
        .await;
    assert_eq!(store.event_sequence(Counter::NAME, id).await.unwrap(), 1);
    store.append(vec![counter_event(id, 2, 1)]).await.unwrap();
    assert_eq!(positions(&store.read_all(0, 10).await.unwrap()).len(), 2);

    admin
        .execute(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE").as_str())
        .await
        .unwrap();
    store.pool().close().await;
}

// ---------------------------------------------------------------------------------------
// A NUL character cannot be stored: a typed error that says no retry helps.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_unstorable_and_stores_nothing() {
    let Some(fx) = Fixture::new("a_nul_character_is_unstorable_and_stores_nothing").await else {
        return;
    };
    let id = Uuid::new_v4();
    fx.store
        .append(vec![counter_event(id, 1, 1)])
        .await
        .unwrap();

    let mut in_payload = counter_event(id, 2, 2);
    in_payload.payload = json!({ "Added": { "amount": 2 }, "note": "a\u{0}b" }).into();
    let mut in_metadata = counter_event(id, 2, 2);
    in_metadata.metadata = json!({ "who": "x\u{0}y" });
    let mut in_event_type = counter_event(id, 2, 2);
    in_event_type.event_type = "Add\u{0}ed".into();
    // A batch of two, to go through the multi-row statement too.
    let mut batch = vec![counter_event(id, 2, 2), counter_event(id, 3, 3)];
    batch[1].payload = json!({ "Added": { "amount": 3 }, "note": "\u{0}" }).into();

    for (what, events) in [
        ("payload", vec![in_payload]),
        ("metadata", vec![in_metadata]),
        ("event type", vec![in_event_type]),
        ("payload in a batch", batch),
    ] {
        match fx.store.append(events).await {
            Err(CQRSError::Unstorable {
                aggregate_type,
                aggregate_id,
                first_sequence,
                reason,
            }) => {
                assert_eq!(
                    (aggregate_type.as_str(), aggregate_id, first_sequence),
                    (Counter::NAME, id, 2),
                    "{what}"
                );
                assert!(reason.contains("SQLSTATE 22"), "{what}: {reason}");
            }
            other => panic!("a NUL in the {what}: expected Unstorable, got {other:?}"),
        }
    }
    // Nothing of the refused appends was stored, and the aggregate goes on from sequence 1.
    assert_eq!(fx.store.event_sequence(Counter::NAME, id).await.unwrap(), 1);
    assert_eq!(positions(&fx.store.read_all(0, 10).await.unwrap()).len(), 1);
    fx.store
        .append(vec![counter_event(id, 2, 2)])
        .await
        .unwrap();

    // Through the framework: the retry policy does not retry it, and the error comes back.
    let framework =
        CQRSFramework::<Counter>::new(fx.store.clone()).with_retry(RetryPolicy::attempts(5));
    let error = framework
        .dispatch_with_metadata(id, CounterCommand::Add(1), &json!({ "note": "\u{0}" }))
        .await
        .unwrap_err();
    assert!(
        matches!(error.framework(), CQRSError::Unstorable { .. }),
        "{error:?}"
    );
    assert_eq!(fx.store.event_sequence(Counter::NAME, id).await.unwrap(), 2);
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// A row `read_all` cannot turn into an event: one poison event, not a failed page.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_does_not_decode_ends_the_page_and_is_one_poison_event() {
    let Some(fx) =
        Fixture::new("a_row_that_does_not_decode_ends_the_page_and_is_one_poison_event").await
    else {
        return;
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut stored = Vec::new();
    for (id, sequence) in [(a, 1), (b, 1), (a, 2), (b, 2), (a, 3)] {
        stored.extend(
            fx.store
                .append(vec![counter_event(id, sequence, 1)])
                .await
                .unwrap(),
        );
    }
    // Valid jsonb that no JSON reader of ours takes: a number beyond f64.
    let sql = format!(
        "UPDATE \"{}\".cqrs_events SET metadata = '{{\"n\": 1e400}}'::jsonb WHERE position = $1",
        fx.schema()
    );
    sqlx::query(&sql)
        .bind(stored[2])
        .execute(fx.store.pool())
        .await
        .unwrap();

    let page = fx.store.read_all(0, 10).await.unwrap();
    assert_eq!(positions(&page), &stored[..2]);
    match fx.store.read_all(stored[1], 10).await {
        Err(CQRSError::DamagedRow(row)) => {
            assert_eq!(row.position, stored[2]);
            assert_eq!((row.aggregate_id, row.sequence), (Some(a), Some(2)));
            assert!(row.problem.contains("metadata"), "{row}");
        }
        other => panic!("expected DamagedRow, got {other:?}"),
    }
    assert_eq!(
        positions(&fx.store.read_all(stored[2], 10).await.unwrap()),
        &stored[3..]
    );
    // Loading the aggregate stays an error.
    assert!(fx.store.load_events(Counter::NAME, a, 0).await.is_err());

    // A projection skips it with one dead letter and applies the rest.
    let projection = Projection::<Counter, CounterView>::new(fx.store.clone(), views(&fx))
        .with_poison_policy(cqrs::PoisonPolicy::SkipAndRecord)
        .with_handler_retry(cqrs::HandlerRetry::none());
    assert_eq!(projection.catch_up().await.unwrap(), stored[4]);
    let letters = projection.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].position, letters[0].aggregate_id),
        (stored[2], a)
    );
    let total = |id: Uuid| {
        let views = views(&fx);
        async move { views.load(&id.to_string()).await.unwrap().unwrap() }
    };
    assert_eq!(total(a).await.events, 2);
    assert_eq!(total(b).await.events, 2);
    fx.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// Correlation and causation: columns of their own, added to a table made before them.

/// The events table as the store created it before events carried correlation and
/// causation ids (`{s}` is the quoted schema).
const EVENTS_WITHOUT_CORRELATION: &str = r#"
CREATE SCHEMA {s};
CREATE TABLE {s}.cqrs_events (
    position        BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    event_id        UUID        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    UUID        NOT NULL,
    sequence        BIGINT      NOT NULL CHECK (sequence >= 1),
    event_type      TEXT        NOT NULL,
    event_version   TEXT        NOT NULL,
    payload         JSONB       NOT NULL,
    metadata        JSONB       NOT NULL,
    "timestamp"     TIMESTAMPTZ NOT NULL,
    transaction_id  XID8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT cqrs_events_event_id_key UNIQUE (event_id),
    CONSTRAINT cqrs_events_aggregate_sequence_key UNIQUE (aggregate_type, aggregate_id, sequence)
);
"#;

fn with_context(
    mut event: PersistableDomainEvent,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
) -> PersistableDomainEvent {
    event.correlation_id = correlation_id;
    event.causation_id = causation_id;
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_made_before_correlation_gains_the_columns_on_migrate() {
    let Some(url) = url("a_table_made_before_correlation_gains_the_columns_on_migrate") else {
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap();
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let quoted = format!("\"{schema}\"");
    sqlx::raw_sql(&EVENTS_WITHOUT_CORRELATION.replace("{s}", &quoted))
        .execute(&pool)
        .await
        .unwrap();
    let id = Uuid::new_v4();
    sqlx::query(&format!(
        "INSERT INTO {quoted}.cqrs_events (event_id, aggregate_type, aggregate_id, sequence, \
         event_type, event_version, payload, metadata, \"timestamp\") \
         VALUES ($1, 'counter', $2, 1, 'Added', '1', '{{\"Added\":{{\"amount\":7}}}}', 'null', now())"
    ))
    .bind(Uuid::new_v4())
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();

    let store = PostgresEventRepository::from_pool(pool.clone())
        .with_schema(&schema)
        .unwrap();
    let ungrouped = store.clone().with_group_commit(false);
    // Two processes' worth of migrations at once, then one more: all idempotent.
    let (first, second) = tokio::join!(store.migrate(), ungrouped.migrate());
    first.unwrap();
    second.unwrap();
    store.migrate().await.unwrap();
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = 'cqrs_events' \
           AND column_name IN ('correlation_id', 'causation_id') ORDER BY ordinal_position",
    )
    .bind(&schema)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        columns,
        [
            ("correlation_id".to_owned(), "uuid".to_owned()),
            ("causation_id".to_owned(), "uuid".to_owned())
        ]
    );

    // The old row reads back with neither id, by load_events and by read_all (COPY).
    let old = store.load_events(Counter::NAME, id, 0).await.unwrap();
    assert_eq!(old.len(), 1);
    assert_eq!((old[0].correlation_id, old[0].causation_id), (None, None));
    assert_eq!(
        old[0].decode::<CounterEvent>().unwrap().event,
        CounterEvent::Added { amount: 7 }
    );
    assert_eq!(store.read_all(0, 10).await.unwrap(), old);

    // New events keep both ids on every append path: one event, a batch (both without
    // group commit), and appends that share a group statement.
    let (correlation, command) = (Uuid::new_v4(), Uuid::new_v4());
    ungrouped
        .append(vec![with_context(
            counter_event(id, 2, 1),
            Some(correlation),
            Some(command),
        )])
        .await
        .unwrap();
    ungrouped
        .append(vec![
            with_context(counter_event(id, 3, 2), Some(correlation), None),
            with_context(counter_event(id, 4, 3), None, Some(command)),
        ])
        .await
        .unwrap();
    let others: Vec<(Uuid, Uuid)> = (0..16).map(|_| (Uuid::new_v4(), Uuid::new_v4())).collect();
    let appends = others.iter().map(|&(other, other_command)| {
        let store = store.clone();
        async move {
            store
                .append(vec![
                    with_context(
                        counter_event(other, 1, 1),
                        Some(correlation),
                        Some(other_command),
                    ),
                    with_context(counter_event(other, 2, 1), None, Some(other_command)),
                ])
                .await
        }
    });
    for result in futures_util::future::join_all(appends).await {
        result.unwrap();
    }
    assert!(
        store.group_commit_counts().group_statements > 0,
        "no append shared a statement: {:?}",
        store.group_commit_counts()
    );

    let loaded = store.load_events(Counter::NAME, id, 0).await.unwrap();
    let ids: Vec<_> = loaded
        .iter()
        .map(|e| (e.sequence, e.correlation_id, e.causation_id))
        .collect();
    assert_eq!(
        ids,
        vec![
            (1, None, None),
            (2, Some(correlation), Some(command)),
            (3, Some(correlation), None),
            (4, None, Some(command)),
        ]
    );
    let all = store.read_all(0, 100).await.unwrap();
    assert_eq!(all.len(), 4 + 2 * others.len());
    for &(other, other_command) in &others {
        let events: Vec<_> = all.iter().filter(|e| e.aggregate_id == other).collect();
        let ids: Vec<_> = events
            .iter()
            .map(|e| (e.sequence, e.correlation_id, e.causation_id))
            .collect();
        assert_eq!(
            ids,
            vec![
                (1, Some(correlation), Some(other_command)),
                (2, None, Some(other_command))
            ]
        );
        let caused = store
            .events_caused_by(Counter::NAME, other, other_command)
            .await
            .unwrap();
        assert_eq!(caused.iter().collect::<Vec<_>>(), events);
    }
    let caused = store
        .events_caused_by(Counter::NAME, id, command)
        .await
        .unwrap();
    assert_eq!(caused, vec![loaded[1].clone(), loaded[3].clone()]);

    let index: Option<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND indexname = 'cqrs_events_causation'",
    )
    .bind(&schema)
    .fetch_optional(&pool)
    .await
    .unwrap();
    let index = index.unwrap_or_default();
    assert!(
        index.contains("(causation_id, aggregate_type, aggregate_id, sequence)")
            && index.contains("WHERE (causation_id IS NOT NULL)"),
        "{index:?}"
    );

    let drop = format!("DROP SCHEMA IF EXISTS {quoted} CASCADE");
    pool.execute(drop.as_str()).await.unwrap();
    pool.close().await;
}
