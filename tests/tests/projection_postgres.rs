//! The projection runner on PostgreSQL: live delivery, two runners on one view never
//! applying an event twice, and a view `VERSION` bump rebuilt beside the old version and
//! switched to when caught up.
//!
//! Runs when `CQRS_POSTGRES_URL` is set (e.g. `postgres://postgres@127.0.0.1:5432/test`),
//! each test in its own schema; without it every test says so and passes. When it is set and
//! the server is unreachable, the tests fail.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cqrs::sqlx::postgres::PgPoolOptions;
use cqrs::sqlx::Executor;
use cqrs::HandlerRetry;
use cqrs::{
    CQRSFramework, EventRepository, PostgresEventRepository, PostgresViewRepository, Projection,
    View, ViewRepository,
};
use uuid::Uuid;

const URL_VAR: &str = "CQRS_POSTGRES_URL";
const WAIT: Duration = Duration::from_secs(10);

mod common;

use common::ledger::*;

/// A store in a fresh schema, or `None` (and a line saying so) without `CQRS_POSTGRES_URL`.
async fn store(test: &str) -> Option<PostgresEventRepository> {
    let _ = test;
    let url = cqrs_tests::server_url(
        URL_VAR,
        "postgres projection",
        "postgres://postgres@127.0.0.1:5432/test",
    )?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{URL_VAR} is set but the server is unreachable: {e}"));
    let schema = format!("p_{}", Uuid::new_v4().simple());
    let store = PostgresEventRepository::from_pool(pool)
        .with_schema(&schema)
        .unwrap();
    store.migrate().await.unwrap();
    Some(store)
}

async fn drop_schema(store: PostgresEventRepository) {
    let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", store.schema());
    if let Err(error) = store.pool().execute(sql.as_str()).await {
        eprintln!("could not drop schema {}: {error}", store.schema());
    }
    store.pool().close().await;
}

async fn head(store: &PostgresEventRepository) -> i64 {
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 10_000).await.unwrap();
        match batch.last() {
            Some(last) => after = last.position,
            None => return after,
        }
    }
}

/// Per-ledger (sum, count) and the grand (sum, count), from a full replay.
async fn replay(store: &PostgresEventRepository) -> (HashMap<Uuid, (u64, u64)>, (u64, u64)) {
    let mut ledgers: HashMap<Uuid, (u64, u64)> = HashMap::new();
    let mut grand = (0, 0);
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 10_000).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = last.position;
        for stored in &batch {
            let LedgerEvent::Deposited { amount } = stored.decode::<LedgerEvent>().unwrap().event;
            let entry = ledgers.entry(stored.aggregate_id).or_default();
            entry.0 += amount;
            entry.1 += 1;
            grand.0 += amount;
            grand.1 += 1;
        }
    }
    (ledgers, grand)
}

fn views<V: View<Ledger>>(store: &PostgresEventRepository) -> PostgresViewRepository<V> {
    PostgresViewRepository::new(store)
}

async fn load<V: View<Ledger>>(store: &PostgresEventRepository, id: &str) -> Option<V> {
    ViewRepository::<Ledger, V>::load(&views::<V>(store), id)
        .await
        .unwrap()
}

/// Waits (at most 10 s) until `condition` holds.
async fn eventually<F, Fut>(condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(WAIT, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_appended_after_catch_up_reaches_the_view_by_notification() {
    let Some(store) = store("live delivery").await else {
        return;
    };
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let id = Uuid::new_v4();
    framework.dispatch(id, vec![1, 2]).await.unwrap();
    let runner = Projection::<Ledger, BalanceV1>::new(store.clone(), views(&store))
        .with_safety_poll_interval(Duration::from_secs(3600))
        .start();
    runner.wait_for(2, WAIT).await.unwrap();
    let receipt = framework.dispatch(id, vec![3]).await.unwrap();
    runner
        .wait_for(receipt.last_position().unwrap(), Duration::from_secs(2))
        .await
        .unwrap();
    let balance = load::<BalanceV1>(&store, &id.to_string()).await.unwrap();
    assert_eq!((balance.sum, balance.last_sequence), (6, 3));
    runner.shutdown().await.unwrap();
    drop_schema(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_on_one_view_never_apply_an_event_twice() {
    let Some(store) = store("two runners").await else {
        return;
    };
    let framework = Arc::new(CQRSFramework::<Ledger>::new(store.clone()));
    let runners = [
        Projection::<Ledger, GrandTotal>::new(store.clone(), views(&store))
            .with_batch_size(5)
            .start(),
        Projection::<Ledger, GrandTotal>::new(store.clone(), views(&store))
            .with_batch_size(11)
            .start(),
        Projection::<Ledger, GrandTotal>::new(store.clone(), views(&store))
            .with_batch_size(17)
            .start(),
    ];
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let framework = Arc::clone(&framework);
        writers.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            for i in 0..50u64 {
                framework
                    .dispatch(id, vec![w + i, 1 + i % 3])
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let end = head(&store).await;
    assert_eq!(end, 4 * 50 * 2);
    for runner in &runners {
        runner.wait_for(end, WAIT).await.unwrap();
        assert!(!runner.is_finished(), "{:?}", runner.last_error());
    }
    let (_, grand) = replay(&store).await;
    let total = load::<GrandTotal>(&store, "all").await.unwrap();
    assert_eq!((total.sum, total.events), grand);
    for runner in runners {
        runner.shutdown().await.unwrap();
    }
    drop_schema(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_bump_rebuilds_beside_the_old_version_and_switches_when_caught_up() {
    let Some(store) = store("version bump").await else {
        return;
    };
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    for round in 0..50u64 {
        for (i, id) in ids.iter().enumerate() {
            framework
                .dispatch(*id, vec![round + i as u64])
                .await
                .unwrap();
        }
    }
    let end = head(&store).await;
    assert_eq!(end, 300);
    let (replayed, _) = replay(&store).await;

    let v1 = Projection::<Ledger, BalanceV1>::new(store.clone(), views(&store)).start();
    v1.wait_for(end, WAIT).await.unwrap();
    eventually(|| async { v1.is_live() }).await;
    let v2_views = views::<BalanceV2>(&store);
    let v2_repo: &dyn ViewRepository<Ledger, BalanceV2> = &v2_views;
    assert_eq!(v2_repo.active_version().await.unwrap(), Some(1));

    let v2 = Projection::<Ledger, BalanceV2>::new(store.clone(), v2_views.clone())
        .with_batch_size(40)
        .with_handler_retry(HandlerRetry {
            attempts: u32::MAX,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(5),
        })
        .start();
    v2.wait_for(GATE_AT, WAIT).await.unwrap();
    assert_eq!(v2.position(), GATE_AT);
    assert!(!v2.is_live());
    assert_eq!(v2_repo.active_version().await.unwrap(), Some(1));
    assert!(!v2_repo.is_active_version().await.unwrap());
    for id in &ids {
        let old = load::<BalanceV1>(&store, &id.to_string()).await.unwrap();
        assert_eq!((old.sum, old.last_sequence), (replayed[id].0, 50));
    }

    GATE_OPEN.store(true, Ordering::SeqCst);
    v2.wait_for(end, WAIT).await.unwrap();
    eventually(|| async { v2_repo.active_version().await.unwrap() == Some(2) }).await;
    for id in &ids {
        let new = load::<BalanceV2>(&store, &id.to_string()).await.unwrap();
        assert_eq!((new.total, new.deposits), replayed[id], "ledger {id}");
        let old = load::<BalanceV1>(&store, &id.to_string()).await.unwrap();
        assert_eq!(old.sum, replayed[id].0);
    }
    v1.shutdown().await.unwrap();
    v2.shutdown().await.unwrap();
    drop_schema(store).await;
}
