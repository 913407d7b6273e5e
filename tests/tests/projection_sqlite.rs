//! The projection runner on the SQLite store: live delivery, a view `VERSION` bump rebuilt
//! beside the old version and switched to when caught up, and crash safety: a projector
//! process killed with SIGKILL at random moments while events are appended, restarted each
//! time, ends with views equal to a full replay, nothing applied twice or missed.
//!
//! The crash test appends the 100 000 events (`CQRS_CRASH_EVENTS` sets another
//! count) while the projector is killed at least five times. The test re-runs this test binary as the projector child process: the ignored
//! test `projector_child` is its entry point, selected by the `CQRS_PROJECTOR_CHILD_DB`
//! variable.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::HandlerRetry;
use cqrs::{
    CQRSFramework, EventRepository, PoisonPolicy, Projection, SqliteEventRepository, View,
    ViewRepository,
};
use uuid::Uuid;

const CHILD_DB: &str = "CQRS_PROJECTOR_CHILD_DB";
const CHILD_UNTIL: &str = "CQRS_PROJECTOR_CHILD_UNTIL";

mod common;

use common::ledger::*;
use common::temp_db::{open_shared, TempDb};

async fn head(store: &SqliteEventRepository) -> i64 {
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 10_000).await.unwrap();
        match batch.last() {
            Some(last) => after = last.position,
            None => return after,
        }
    }
}

/// Per-ledger (sum, count, last sequence) and the grand (sum, count), from a full replay.
async fn replay(store: &SqliteEventRepository) -> (HashMap<Uuid, (u64, u64, i64)>, (u64, u64)) {
    let mut ledgers: HashMap<Uuid, (u64, u64, i64)> = HashMap::new();
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
            entry.2 = stored.sequence;
            grand.0 += amount;
            grand.1 += 1;
        }
    }
    (ledgers, grand)
}

async fn load<V: View<Ledger>>(store: &SqliteEventRepository, id: &str) -> Option<V> {
    ViewRepository::<Ledger, V>::load(&store.views::<V>(), id)
        .await
        .unwrap()
}

/// Waits (at most 10 s) until `condition` holds.
async fn eventually<F, Fut>(condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(Duration::from_secs(10), async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_appended_after_catch_up_reaches_the_view_by_notification() {
    let db = TempDb::new("projection");
    let store = db.open_shared().await;
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let id = Uuid::new_v4();
    framework.dispatch(id, vec![1, 2]).await.unwrap();
    let runner = Projection::<Ledger, BalanceV1>::new(store.clone(), store.views())
        .with_name("live_balances")
        .with_safety_poll_interval(Duration::from_secs(3600))
        .start();
    runner.wait_for(2, Duration::from_secs(5)).await.unwrap();
    let receipt = framework.dispatch(id, vec![3]).await.unwrap();
    runner
        .wait_for(receipt.last_position().unwrap(), Duration::from_secs(2))
        .await
        .unwrap();
    let balance = load::<BalanceV1>(&store, &id.to_string()).await.unwrap();
    assert_eq!((balance.sum, balance.last_sequence), (6, 3));
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_bump_rebuilds_beside_the_old_version_and_switches_when_caught_up() {
    let db = TempDb::new("projection");
    let store = db.open_shared().await;
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

    let v1_views = store.views::<BalanceV1>();
    let v2_views = store.views::<BalanceV2>();
    let v1 = Projection::<Ledger, BalanceV1>::new(store.clone(), v1_views.clone()).start();
    v1.wait_for(end, Duration::from_secs(10)).await.unwrap();
    eventually(|| async { v1.is_live() }).await;
    assert_eq!(
        ViewRepository::<Ledger, BalanceV1>::active_version(&v1_views)
            .await
            .unwrap(),
        Some(1)
    );

    // Version 2 rebuilds from position 0; its gate holds it at GATE_AT, mid-rebuild.
    let v2 = Projection::<Ledger, BalanceV2>::new(store.clone(), v2_views.clone())
        .with_batch_size(40)
        .with_handler_retry(HandlerRetry {
            attempts: u32::MAX,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(5),
        })
        .start();
    assert_eq!(v2.name(), "balances_v2");
    v2.wait_for(GATE_AT, Duration::from_secs(10)).await.unwrap();
    assert_eq!(v2.position(), GATE_AT);
    assert!(!v2.is_live());
    // Readers still get version 1, complete, and are told it is the active one.
    let v2_repo: &dyn ViewRepository<Ledger, BalanceV2> = &v2_views;
    assert_eq!(v2_repo.active_version().await.unwrap(), Some(1));
    assert!(!v2_repo.is_active_version().await.unwrap());
    for id in &ids {
        let old = load::<BalanceV1>(&store, &id.to_string()).await.unwrap();
        assert_eq!((old.sum, old.last_sequence), (replayed[id].0, 50));
    }

    // Open the gate: the rebuild finishes and switches readers to version 2.
    GATE_OPEN.store(true, Ordering::SeqCst);
    v2.wait_for(end, Duration::from_secs(10)).await.unwrap();
    eventually(|| async { v2_repo.active_version().await.unwrap() == Some(2) }).await;
    eventually(|| async { v2.is_live() }).await;
    assert!(v2_repo.is_active_version().await.unwrap());
    // The old runner does not switch readers back.
    let appended = framework.dispatch(ids[0], vec![1000]).await.unwrap();
    let last = appended.last_position().unwrap();
    v1.wait_for(last, Duration::from_secs(5)).await.unwrap();
    v2.wait_for(last, Duration::from_secs(5)).await.unwrap();
    assert_eq!(v2_repo.active_version().await.unwrap(), Some(2));

    // Version 2 equals a full replay; version 1 is still there beside it.
    let (replayed, _) = replay(&store).await;
    for id in &ids {
        let new = load::<BalanceV2>(&store, &id.to_string()).await.unwrap();
        let (sum, count, _) = replayed[id];
        assert_eq!((new.total, new.deposits), (sum, count), "ledger {id}");
        let old = load::<BalanceV1>(&store, &id.to_string()).await.unwrap();
        assert_eq!(old.sum, sum);
    }
    v1.shutdown().await.unwrap();
    v2.shutdown().await.unwrap();
}

/// The crash test's projector: runs the per-ledger and the grand-total views until killed,
/// or, with `CQRS_PROJECTOR_CHILD_UNTIL` set, until both reached that position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the projector child process of the crash test; run by it, not on its own"]
async fn projector_child() {
    let path = std::env::var(CHILD_DB).expect("CQRS_PROJECTOR_CHILD_DB names the database");
    let store = open_shared(&path).await;
    let spawn_balances = || {
        Projection::<Ledger, BalanceV1>::new(store.clone(), store.views())
            .with_batch_size(200)
            .with_poison_policy(PoisonPolicy::Stop)
            .with_handler_retry(HandlerRetry::none())
            .with_safety_poll_interval(Duration::from_millis(20))
            .start()
    };
    let balances = spawn_balances();
    let totals = Projection::<Ledger, GrandTotal>::new(store.clone(), store.views())
        .with_batch_size(333)
        .with_safety_poll_interval(Duration::from_millis(20))
        .start();
    match std::env::var(CHILD_UNTIL) {
        Ok(until) => {
            let until: i64 = until.parse().unwrap();
            balances
                .wait_for(until, Duration::from_secs(120))
                .await
                .unwrap();
            totals
                .wait_for(until, Duration::from_secs(120))
                .await
                .unwrap();
            balances.shutdown().await.unwrap();
            totals.shutdown().await.unwrap();
        }
        Err(_) => {
            // Until killed; a runner that stops (a double apply or a miss) fails the child.
            let failed = tokio::select! {
                result = balances.wait() => result,
                result = totals.wait() => result,
            };
            panic!("a projector stopped: {failed:?}");
        }
    }
}

fn spawn_child(db: &str, until: Option<i64>) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "projector_child",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_DB, db)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(until) = until {
        command.env(CHILD_UNTIL, until.to_string());
    }
    command.spawn().unwrap()
}

fn random_below(bound: u64) -> u64 {
    (Uuid::new_v4().as_u128() % u128::from(bound)) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_at_random_moments_applies_every_event_exactly_once() {
    let events: u64 = std::env::var("CQRS_CRASH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    const KILLS: usize = 5;
    const LEDGERS: u64 = 200;
    const PER_COMMAND: u64 = 10;

    let db = TempDb::new("projection");
    let store = db.open_shared().await;
    let path = db.url();
    let started = Instant::now();

    // The appender: concurrent writers, each its own ledgers, PER_COMMAND events a command.
    let framework = Arc::new(CQRSFramework::<Ledger>::new(store.clone()));
    let commands = events / PER_COMMAND;
    let mut writers = Vec::new();
    for writer in 0..4u64 {
        let framework = Arc::clone(&framework);
        let ledgers: Vec<Uuid> = (0..LEDGERS / 4).map(|_| Uuid::new_v4()).collect();
        writers.push(tokio::spawn(async move {
            for command in (writer..commands).step_by(4) {
                let id = ledgers[(command / 4) as usize % ledgers.len()];
                let amounts = (0..PER_COMMAND).map(|i| 1 + (command + i) % 97).collect();
                framework.dispatch(id, amounts).await.unwrap();
            }
        }));
    }

    // The projector, killed at random moments while the appender runs (and at least KILLS
    // times).
    let mut progress_at_kills = Vec::new();
    while progress_at_kills.len() < KILLS || writers.iter().any(|w| !w.is_finished()) {
        let mut child = spawn_child(&path, None);
        tokio::time::sleep(Duration::from_millis(200 + random_below(2800))).await;
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the projector child ended by itself ({status}): a runner stopped");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let views = store.views::<GrandTotal>();
        let reached = ViewRepository::<Ledger, GrandTotal>::checkpoint(&views, "grand_total_v1")
            .await
            .unwrap();
        progress_at_kills.push(reached);
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let end = head(&store).await;
    assert_eq!(end as u64, commands * PER_COMMAND);

    // Restarted once more, it runs to the end and exits.
    let mut last = spawn_child(&path, Some(end));
    let status = tokio::task::spawn_blocking(move || last.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "the last projector child failed: {status}"
    );
    eprintln!(
        "crash test: {end} events, {} kills, checkpoints at the kills {progress_at_kills:?}, \
         {:?} in all",
        progress_at_kills.len(),
        started.elapsed()
    );
    assert!(
        progress_at_kills.windows(2).any(|w| w[1] > w[0]) || progress_at_kills[0] > 0,
        "the projector was never killed mid-work: {progress_at_kills:?}"
    );
    assert!(
        progress_at_kills.iter().any(|&p| p > 0 && p < end),
        "no kill landed while events were still to apply: {progress_at_kills:?}"
    );

    // Every view equals a full replay: nothing applied twice, nothing missed.
    let (ledgers, grand) = replay(&store).await;
    assert_eq!(ledgers.len() as u64, LEDGERS);
    for (id, (sum, _count, last_sequence)) in &ledgers {
        let balance = load::<BalanceV1>(&store, &id.to_string()).await.unwrap();
        assert_eq!(
            (balance.sum, balance.last_sequence),
            (*sum, *last_sequence),
            "ledger {id}"
        );
    }
    let total = load::<GrandTotal>(&store, "all").await.unwrap();
    assert_eq!((total.sum, total.events), grand);
    assert_eq!(total.events, end as u64);
}
