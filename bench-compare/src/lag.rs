//! Projection lag against its goal: p99 <= 100 ms at half the maximum append rate.
//!
//! For each store: (a) the maximum rate of bank dispatches through `CQRSFramework` from
//! [`PRODUCERS`] closed-loop producers; (b) on a fresh store, the same producers paced
//! open-loop at half that rate (each on its own `tokio::time::interval`, so a slow dispatch
//! does not lower the offered rate) while a `Projection` of the bank's `BalanceView` runs in
//! the same process on the same store. Every event's lag is the time from the moment its
//! dispatch returned (committed) to the moment the runner's position watch
//! (`ProjectionHandle::subscribe`) first covered its position.
//!
//! Environment: `BENCH_LAG_RUNS` (runs per store, default 3), `BENCH_LAG_SECS` (seconds of
//! paced load per run, default 5), `BENCH_LAG_MAX_SECS` (seconds of the maximum-rate
//! measurement, default 3), `BENCH_LAG_LOADS` (the projection's view-row loads in flight,
//! default 8 as in the runner; 1 for sequential loads), `CQRS_POSTGRES_URL` (PostgreSQL is
//! skipped when unset).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::SqliteOptions;
use cqrs::{
    CQRSFramework, EventRepository, PostgresEventRepository, PostgresViewRepository, Projection,
    ProjectionHandle, SqliteEventRepository, ViewRepository,
};
use cqrs_examples::bank::{BalanceView, BankAccount, BankCommand, BankError};
use sqlx::postgres::PgPoolOptions;
use sqlx::Connection;
use tokio::sync::oneshot;
use tokio::time::MissedTickBehavior;
use uuid::Uuid;

use crate::limits::{remove_sqlite, temp_file};
use crate::{env_usize, median, report, BoxResult};

/// Concurrent producers, in both phases.
const PRODUCERS: usize = 8;
/// The goal for the p99 lag, milliseconds.
const GOAL_P99_MS: f64 = 100.0;

/// One paced run's figures.
struct LagRun {
    /// Closed-loop maximum, dispatches/s.
    max_rate: f64,
    /// The offered rate of the paced phase, dispatches/s.
    target_rate: f64,
    /// The rate the paced phase achieved, dispatches/s.
    achieved_rate: f64,
    /// Events measured.
    events: usize,
    /// Position updates of the runner seen (≈ committed batches).
    updates: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// The next command of a producer: an open every 10 commands (on a new account), deposits
/// in between.
fn next_command(n: usize, id: &mut Uuid) -> BankCommand {
    if n % 10 == 0 {
        *id = Uuid::new_v4();
        BankCommand::Open {
            owner: "alice".to_owned(),
        }
    } else {
        BankCommand::Deposit { amount: 100 }
    }
}

/// Closed-loop producers for `duration`; dispatches/s.
async fn max_rate(
    framework: Arc<CQRSFramework<BankAccount>>,
    duration: Duration,
) -> BoxResult<f64> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(PRODUCERS);
    for _ in 0..PRODUCERS {
        let framework = Arc::clone(&framework);
        tasks.push(tokio::spawn(async move {
            let mut id = Uuid::new_v4();
            let mut n = 0;
            while Instant::now() < deadline {
                let command = next_command(n, &mut id);
                framework.dispatch(id, command).await?;
                n += 1;
            }
            Ok::<usize, BankError>(n)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Producers paced at `rate` dispatches/s in all for `duration`, open loop; returns every
/// event's position with the instant its dispatch returned, and the achieved rate.
async fn paced(
    framework: Arc<CQRSFramework<BankAccount>>,
    rate: f64,
    duration: Duration,
) -> BoxResult<(Vec<(i64, Instant)>, f64)> {
    let period = Duration::from_secs_f64(PRODUCERS as f64 / rate);
    let start = tokio::time::Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(PRODUCERS);
    for producer in 0..PRODUCERS {
        let framework = Arc::clone(&framework);
        // Staggered so the producers' ticks spread over the period.
        let first = start + period.mul_f64(producer as f64 / PRODUCERS as f64);
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(first, period);
            // Open loop: ticks missed during a slow dispatch fire at once afterwards, so the
            // offered rate stays the target rate.
            ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut id = Uuid::new_v4();
            let mut commits = Vec::new();
            let mut n = 0;
            loop {
                if ticks.tick().await >= deadline {
                    break;
                }
                let command = next_command(n, &mut id);
                let receipt = framework.dispatch(id, command).await?;
                let done = Instant::now();
                commits.extend(receipt.positions.iter().map(|&p| (p, done)));
                n += 1;
            }
            Ok::<(Vec<(i64, Instant)>, usize), BankError>((commits, n))
        }));
    }
    let mut commits = Vec::new();
    let mut dispatches = 0;
    for task in tasks {
        let (mine, n) = task.await??;
        commits.extend(mine);
        dispatches += n;
    }
    let achieved = dispatches as f64 / start.elapsed().as_secs_f64();
    Ok((commits, achieved))
}

/// Records each new position of the runner with the instant it was seen, until `stop`.
fn observe(
    handle: &ProjectionHandle,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<(i64, Instant)>>,
) {
    let mut progress = handle.subscribe();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let position = *progress.borrow_and_update();
            if seen.last().is_none_or(|&(last, _)| position > last) {
                seen.push((position, Instant::now()));
            }
            tokio::select! {
                biased;
                changed = progress.changed() => if changed.is_err() { break; },
                _ = &mut stopped => break,
            }
        }
        // The last position, if it arrived with the stop.
        let position = *progress.borrow();
        if seen.last().is_none_or(|&(last, _)| position > last) {
            seen.push((position, Instant::now()));
        }
        seen
    });
    (stop, task)
}

/// The p-th quantile (0..=1) of sorted `values`, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The paced phase on `store` (fresh, migrated), with a running projection into `views`.
async fn lag_phase<S, R>(store: S, views: R, max_rate: f64, duration: Duration) -> BoxResult<LagRun>
where
    S: EventRepository + Clone + 'static,
    R: ViewRepository<BankAccount, BalanceView> + 'static,
{
    let handle = Projection::<BankAccount, BalanceView>::new(store.clone(), views)
        .with_load_concurrency(env_usize("BENCH_LAG_LOADS", 8))
        .start();
    let live_by = Instant::now() + Duration::from_secs(30);
    while !handle.is_live() {
        if Instant::now() > live_by || handle.is_finished() {
            return Err(format!("projection not live: {:?}", handle.last_error()).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (stop, observer) = observe(&handle);
    let framework = Arc::new(CQRSFramework::<BankAccount>::new(store));
    let target_rate = max_rate / 2.0;
    let (commits, achieved_rate) = paced(framework, target_rate, duration).await?;
    let last = commits.iter().map(|&(p, _)| p).max().unwrap_or(0);
    handle.wait_for(last, Duration::from_secs(60)).await?;
    let _ = stop.send(());
    let seen = observer.await?;
    handle.shutdown().await?;

    let mut lags: Vec<f64> = commits
        .iter()
        .map(|&(position, committed)| {
            let index = seen.partition_point(|&(p, _)| p < position);
            seen.get(index).map_or(f64::NAN, |&(_, at)| {
                at.saturating_duration_since(committed).as_secs_f64() * 1e3
            })
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    Ok(LagRun {
        max_rate,
        target_rate,
        achieved_rate,
        events: lags.len(),
        updates: seen.len().saturating_sub(1),
        p50_ms: quantile(&lags, 0.50),
        p99_ms: quantile(&lags, 0.99),
        max_ms: lags.last().copied().unwrap_or(f64::NAN),
    })
}

async fn sqlite_store(path: &Path) -> BoxResult<SqliteEventRepository> {
    // The defaults: Durability::Full (WAL + synchronous=FULL).
    let store =
        SqliteEventRepository::connect(&path.display().to_string(), SqliteOptions::default())
            .await?;
    store.migrate().await?;
    Ok(store)
}

async fn sqlite_run(max_secs: Duration, secs: Duration) -> BoxResult<LagRun> {
    let path = temp_file("lag");
    let store = sqlite_store(&path).await?;
    let rate = max_rate(Arc::new(CQRSFramework::new(store.clone())), max_secs).await?;
    drop(store);
    tokio::time::sleep(Duration::from_millis(50)).await;
    remove_sqlite(&path);

    let path = temp_file("lag");
    let store = sqlite_store(&path).await?;
    let views = store.views::<BalanceView>();
    let run = lag_phase(store, views, rate, secs).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    remove_sqlite(&path);
    run
}

async fn postgres_store(url: &str, schema: &str) -> BoxResult<PostgresEventRepository> {
    let pool = PgPoolOptions::new()
        .max_connections((PRODUCERS + 4) as u32)
        .connect(url)
        .await?;
    let store = PostgresEventRepository::from_pool(pool).with_schema(schema)?;
    store.migrate().await?;
    Ok(store)
}

async fn postgres_run(url: &str, max_secs: Duration, secs: Duration) -> BoxResult<LagRun> {
    let tag = Uuid::new_v4().simple().to_string();
    let (s_max, s_lag) = (format!("bench_lagmax_{tag}"), format!("bench_lag_{tag}"));
    let result = async {
        let store = postgres_store(url, &s_max).await?;
        let rate = max_rate(Arc::new(CQRSFramework::new(store.clone())), max_secs).await?;
        store.pool().close().await;
        let store = postgres_store(url, &s_lag).await?;
        let views = PostgresViewRepository::<BalanceView>::new(&store);
        let pool = store.pool().clone();
        let run = lag_phase(store, views, rate, secs).await;
        pool.close().await;
        run
    }
    .await;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    for schema in [s_max, s_lag] {
        sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut conn)
            .await?;
    }
    result
}

fn report_run(store: &str, run: &LagRun) {
    report!(
        "  {store:<8} max {:>6.0}/s  paced {:>6.0}/s (target {:>6.0})  {:>6} events in {:>5} runner updates  lag p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        run.max_rate,
        run.achieved_rate,
        run.target_rate,
        run.events,
        run.updates,
        run.p50_ms,
        run.p99_ms,
        run.max_ms
    );
}

/// Runs the lag measurement for SQLite and (with `CQRS_POSTGRES_URL`) PostgreSQL, reports
/// each run, and pushes one `ratio lag_p99_<store>_ms` line per store (median of the runs).
pub async fn run(ratios: &mut Vec<String>) -> BoxResult<()> {
    let runs = env_usize("BENCH_LAG_RUNS", 3);
    let secs = Duration::from_secs(env_usize("BENCH_LAG_SECS", 5) as u64);
    let max_secs = Duration::from_secs(env_usize("BENCH_LAG_MAX_SECS", 3) as u64);
    report!(
        "\nprojection lag: {PRODUCERS} producers (bank dispatches), max rate closed loop for {}s, then paced open loop at half of it for {}s with the BalanceView projection running; lag = dispatch returned -> checkpoint covers the event; {runs} runs per store:",
        max_secs.as_secs(),
        secs.as_secs()
    );
    let mut stores: Vec<(&str, Vec<LagRun>)> = Vec::new();
    let mut sqlite = Vec::new();
    for _ in 0..runs {
        let run = sqlite_run(max_secs, secs).await?;
        report_run("sqlite", &run);
        sqlite.push(run);
    }
    stores.push(("sqlite", sqlite));
    match std::env::var("CQRS_POSTGRES_URL") {
        Ok(url) => {
            let mut pg = Vec::new();
            for _ in 0..runs {
                let run = postgres_run(&url, max_secs, secs).await?;
                report_run("postgres", &run);
                pg.push(run);
            }
            stores.push(("postgres", pg));
        }
        Err(_) => report!(
            "  skipping postgres lag: set CQRS_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run it"
        ),
    }
    for (store, runs) in &stores {
        let mut p50: Vec<f64> = runs.iter().map(|r| r.p50_ms).collect();
        let mut p99: Vec<f64> = runs.iter().map(|r| r.p99_ms).collect();
        let mut max: Vec<f64> = runs.iter().map(|r| r.max_ms).collect();
        let mut rate: Vec<f64> = runs.iter().map(|r| r.max_rate).collect();
        let (p50, p99, max, rate) = (
            median(&mut p50),
            median(&mut p99),
            median(&mut max),
            median(&mut rate),
        );
        report!(
            "  {store:<8} median: max rate {rate:.0} dispatches/s; at half of it, lag p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
        );
        ratios.push(format!(
            "ratio lag_p99_{store}_ms {p99:.2}   (lower is better; goal <= {GOAL_P99_MS:.0})"
        ));
    }
    Ok(())
}

/// `BENCH_PROFILE=lag`: only the lag measurement, with its ratio lines.
pub async fn profile() -> BoxResult<()> {
    let mut ratios = Vec::new();
    run(&mut ratios).await?;
    report!();
    for line in &ratios {
        report!("{line}");
    }
    Ok(())
}
