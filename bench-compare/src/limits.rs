//! The machine's limits: plain inserts through sqlx with the durability our stores use, and
//! our stores at the same concurrency, measured alternately in the same run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cqrs::SqliteOptions;
use cqrs::{CQRSFramework, PostgresEventRepository, SqliteEventRepository};
use cqrs_examples::bank::{BankAccount, BankCommand};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};
use uuid::Uuid;

use crate::{median, report, BoxResult};

/// Rows (events) per SQLite measurement.
const SQLITE_ROWS: usize = 2_000;
/// Rows per 1-row-per-transaction measurement (every row is an fsync).
const SQLITE_SINGLE_ROWS: usize = 300;
/// Commands per PostgreSQL measurement, all producers together: a few seconds at this
/// machine's rates, so that the figure is the steady rate. Runs of 3,200 commands lasted a
/// third of a second, and opening each connection's first statements and the producers'
/// uneven finish weighed on them as much as the commits did.
const POSTGRES_COMMANDS: usize = 32_000;

/// SQLite figures, events/s.
pub struct SqliteLimits {
    pub plain_batch1: f64,
    pub plain_batch8: f64,
    pub plain_batch512: f64,
    pub ours_1: f64,
    pub ours_8: f64,
    pub ours_8_cache: f64,
    /// 8 producers with `read_connections(8)` instead of the default 4.
    pub ours_8_readers_8: f64,
    /// 8 rows per transaction into [`PlainTable::Bare`] (the others use the store's table).
    pub plain_batch8_bare: f64,
}

pub(crate) fn temp_file(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("bench-compare-{tag}-{}.sqlite", Uuid::new_v4()))
}

pub(crate) fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

const PLAIN_SQLITE_TABLE: &str = "CREATE TABLE IF NOT EXISTS plain_events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL UNIQUE,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    event_version  TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    timestamp      INTEGER NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, sequence)
) STRICT";

/// Which table the plain INSERTs go into.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PlainTable {
    /// The store's own `cqrs_events`, made by `SqliteEventRepository::open` (the same
    /// columns, constraints, trigger and index as ours, in a file of the same settings).
    Store,
    /// [`PLAIN_SQLITE_TABLE`]: the same unique constraints, without the no-gap trigger, the
    /// causation index and the correlation columns.
    Bare,
}

/// Plain INSERTs of `rows` event rows, `batch` per transaction, WAL + synchronous=FULL (the
/// settings of `Durability::Full`), one connection; rows/s. Each row is one statement, as
/// an application without a framework would write it; rows of one account follow one
/// another with sequences 1 to 10, as the no-gap trigger requires.
async fn sqlite_plain(rows: usize, batch: usize, table: PlainTable) -> BoxResult<f64> {
    let path = temp_file("plain");
    if table == PlainTable::Store {
        let store = SqliteEventRepository::open(&path).await?;
        drop(store);
        // Let the writer task notice the last handle is gone and close its connection.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await?;
    let sql = match table {
        PlainTable::Store => {
            "INSERT INTO cqrs_events (event_id, aggregate_type, aggregate_id, sequence, \
             event_type, event_version, payload, metadata, timestamp, correlation_id, \
             causation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)"
        }
        PlainTable::Bare => {
            sqlx::raw_sql(PLAIN_SQLITE_TABLE).execute(&mut conn).await?;
            "INSERT INTO plain_events (event_id, aggregate_type, aggregate_id, sequence, \
             event_type, event_version, payload, metadata, timestamp) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        }
    };
    let payload = r#"{"Deposited":{"amount":100,"currency":"EUR"}}"#;
    let ids: Vec<Uuid> = (0..rows / 10 + 1).map(|_| Uuid::new_v4()).collect();
    let start = Instant::now();
    let mut written = 0;
    while written < rows {
        let mut tx = conn.begin().await?;
        for i in written..(written + batch).min(rows) {
            sqlx::query(sql)
                .bind(Uuid::now_v7().to_string())
                .bind("bank_account")
                .bind(ids[i / 10].to_string())
                .bind((i % 10 + 1) as i64)
                .bind("MoneyDeposited")
                .bind("2")
                .bind(payload)
                .bind("null")
                .bind(chrono::Utc::now().timestamp_micros())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        written = (written + batch).min(rows);
    }
    let rate = rows as f64 / start.elapsed().as_secs_f64();
    drop(conn);
    remove_sqlite(&path);
    Ok(rate)
}

/// `producers` tasks dispatching `total` commands in all (open + 9 deposits per aggregate,
/// each task on its own aggregates) through our framework; commands/s. The open of a fresh
/// id goes through `dispatch_new`, as an application that makes the id would send it.
async fn ours_producers(
    framework: Arc<CQRSFramework<BankAccount>>,
    producers: usize,
    total: usize,
) -> BoxResult<f64> {
    let per_task = total / producers;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(producers);
    for _ in 0..producers {
        let framework = Arc::clone(&framework);
        tasks.push(tokio::spawn(async move {
            let mut id = Uuid::new_v4();
            for i in 0..per_task {
                if i % 10 == 0 {
                    // A fresh id: the account cannot exist, so nothing needs reading.
                    id = Uuid::new_v4();
                    let open = BankCommand::Open {
                        owner: "alice".to_owned(),
                    };
                    framework.dispatch_new(id, open).await?;
                } else {
                    framework
                        .dispatch(id, BankCommand::Deposit { amount: 100 })
                        .await?;
                }
            }
            Ok::<(), cqrs_examples::bank::BankError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((per_task * producers) as f64 / start.elapsed().as_secs_f64())
}

async fn sqlite_ours(
    producers: usize,
    total: usize,
    cache: bool,
    options: SqliteOptions,
) -> BoxResult<f64> {
    let path = temp_file("ours");
    let store = SqliteEventRepository::connect(&path.display().to_string(), options).await?;
    store.migrate().await?;
    let mut framework = CQRSFramework::<BankAccount>::new(store.clone()).without_state_cache();
    if cache {
        framework = framework.with_state_cache(total);
    }
    let rate = ours_producers(Arc::new(framework), producers, total).await?;
    drop(store);
    // Let the writer task notice the last handle is gone before the files go.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    remove_sqlite(&path);
    Ok(rate)
}

/// Every SQLite figure, median of `runs`, measurements alternating.
pub async fn sqlite(runs: usize) -> BoxResult<SqliteLimits> {
    use PlainTable::{Bare, Store};
    let mut v: [Vec<f64>; 8] = Default::default();
    for _ in 0..runs {
        v[0].push(sqlite_plain(SQLITE_ROWS, 8, Store).await?);
        v[1].push(sqlite_ours(8, SQLITE_ROWS, false, SqliteOptions::default()).await?);
        v[2].push(sqlite_plain(SQLITE_ROWS * 10, 512, Store).await?);
        v[3].push(sqlite_ours(8, SQLITE_ROWS, true, SqliteOptions::default()).await?);
        v[4].push(sqlite_plain(SQLITE_SINGLE_ROWS, 1, Store).await?);
        v[5].push(sqlite_ours(1, SQLITE_SINGLE_ROWS, false, SqliteOptions::default()).await?);
        let readers = SqliteOptions::default().read_connections(8);
        v[6].push(sqlite_ours(8, SQLITE_ROWS, false, readers).await?);
        v[7].push(sqlite_plain(SQLITE_ROWS, 8, Bare).await?);
    }
    let [a, b, c, d, e, f, g, h] = &mut v;
    Ok(SqliteLimits {
        plain_batch8: median(a),
        ours_8: median(b),
        plain_batch512: median(c),
        ours_8_cache: median(d),
        plain_batch1: median(e),
        ours_1: median(f),
        ours_8_readers_8: median(g),
        plain_batch8_bare: median(h),
    })
}

/// PostgreSQL figures at one concurrency, events/s.
pub struct PostgresRow {
    pub concurrency: usize,
    pub plain: f64,
    pub ours: f64,
    pub ours_cache: f64,
}

async fn pg_pool(url: &str, connections: usize) -> BoxResult<sqlx::PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(connections as u32)
        .connect(url)
        .await?;
    // Open every connection before the clock starts.
    let mut held = Vec::with_capacity(connections);
    for _ in 0..connections {
        held.push(pool.acquire().await?);
    }
    drop(held);
    Ok(pool)
}

/// Single-row INSERT commits (autocommit, one round trip each) from `concurrency` tasks on a
/// pool of as many connections, into a table like ours; rows/s.
async fn postgres_plain(url: &str, schema: &str, concurrency: usize) -> BoxResult<f64> {
    let pool = pg_pool(url, concurrency).await?;
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.plain_events (
            position        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id        UUID        NOT NULL UNIQUE,
            aggregate_type  TEXT        NOT NULL,
            aggregate_id    UUID        NOT NULL,
            sequence        BIGINT      NOT NULL,
            event_type      TEXT        NOT NULL,
            event_version   TEXT        NOT NULL,
            payload         JSONB       NOT NULL,
            metadata        JSONB       NOT NULL,
            \"timestamp\"   TIMESTAMPTZ NOT NULL,
            UNIQUE (aggregate_type, aggregate_id, sequence));"
    ))
    .execute(&pool)
    .await?;
    let sql: Arc<str> = format!(
        "INSERT INTO {schema}.plain_events (event_id, aggregate_type, aggregate_id, sequence, \
         event_type, event_version, payload, metadata, \"timestamp\") \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    )
    .into();
    let per_task = POSTGRES_COMMANDS / concurrency;
    let payload = serde_json::json!({ "Deposited": { "amount": 100, "currency": "EUR" } });
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let pool = pool.clone();
        let sql = Arc::clone(&sql);
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut id = Uuid::new_v4();
            for i in 0..per_task {
                if i % 10 == 0 {
                    id = Uuid::new_v4();
                }
                sqlx::query(&sql)
                    .bind(Uuid::now_v7())
                    .bind("bank_account")
                    .bind(id)
                    .bind((i % 10 + 1) as i64)
                    .bind("MoneyDeposited")
                    .bind("2")
                    .bind(sqlx::types::Json(&payload))
                    .bind(sqlx::types::Json(serde_json::Value::Null))
                    .bind(chrono::Utc::now())
                    .execute(&pool)
                    .await?;
            }
            Ok::<(), sqlx::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = (per_task * concurrency) as f64 / start.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}

async fn postgres_ours(url: &str, schema: &str, concurrency: usize, cache: bool) -> BoxResult<f64> {
    let pool = pg_pool(url, concurrency).await?;
    let store = PostgresEventRepository::from_pool(pool.clone()).with_schema(schema)?;
    store.migrate().await?;
    let mut framework = CQRSFramework::<BankAccount>::new(store.clone()).without_state_cache();
    if cache {
        framework = framework.with_state_cache(POSTGRES_COMMANDS);
    }
    let rate = ours_producers(Arc::new(framework), concurrency, POSTGRES_COMMANDS).await?;
    drop(store);
    pool.close().await;
    Ok(rate)
}

/// Every PostgreSQL figure at each concurrency, median of `runs`, measurements alternating.
/// Each measurement writes into a fresh schema, dropped at the end.
pub async fn postgres(url: &str, runs: usize, levels: &[usize]) -> BoxResult<Vec<PostgresRow>> {
    let tag = Uuid::new_v4().simple().to_string();
    let mut schemas = Vec::new();
    let mut rows = Vec::new();
    for &concurrency in levels {
        let (mut plain, mut ours, mut ours_cache) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let s_plain = format!("bench_plain_{tag}_{concurrency}_{run}");
            let s_ours = format!("bench_ours_{tag}_{concurrency}_{run}");
            let s_cache = format!("bench_cache_{tag}_{concurrency}_{run}");
            plain.push(postgres_plain(url, &s_plain, concurrency).await?);
            ours.push(postgres_ours(url, &s_ours, concurrency, false).await?);
            ours_cache.push(postgres_ours(url, &s_cache, concurrency, true).await?);
            schemas.extend([s_plain, s_ours, s_cache]);
        }
        rows.push(PostgresRow {
            concurrency,
            plain: median(&mut plain),
            ours: median(&mut ours),
            ours_cache: median(&mut ours_cache),
        });
    }
    let mut conn = sqlx::PgConnection::connect(url).await?;
    for schema in schemas {
        sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut conn)
            .await?;
    }
    Ok(rows)
}

/// Where a durable dispatch's time goes: `append` alone, `load_events` alone, `dispatch`,
/// one producer, against one plain single-row commit; then the SQLite limits of the full
/// run alone, with their ratios (`BENCH_PROFILE=sqlite`).
pub async fn sqlite_parts() -> BoxResult<()> {
    use cqrs::EventRepository;
    const N: usize = 200;
    let path = temp_file("parts");
    let store =
        SqliteEventRepository::connect(&path.display().to_string(), SqliteOptions::default())
            .await?;
    store.migrate().await?;
    let ids: Vec<Uuid> = (0..N).map(|_| Uuid::new_v4()).collect();
    let start = Instant::now();
    for id in &ids {
        let event = cqrs::PersistableDomainEvent::new(
            "bank_account",
            *id,
            1,
            &cqrs_examples::bank::BankEvent::Opened {
                owner: "alice".to_owned(),
            },
            serde_json::Value::Null,
        )?;
        store.append(vec![event]).await?;
    }
    report!(
        "sqlite append alone:      {:>8.0} us",
        start.elapsed().as_secs_f64() * 1e6 / N as f64
    );
    let start = Instant::now();
    for id in &ids {
        store.load_events("bank_account", *id, 0).await?;
    }
    report!(
        "sqlite load_events alone: {:>8.0} us",
        start.elapsed().as_secs_f64() * 1e6 / N as f64
    );
    let framework = CQRSFramework::<BankAccount>::new(store.clone());
    let start = Instant::now();
    for id in &ids {
        framework
            .dispatch(*id, BankCommand::Deposit { amount: 100 })
            .await?;
    }
    report!(
        "sqlite dispatch:          {:>8.0} us",
        start.elapsed().as_secs_f64() * 1e6 / N as f64
    );
    report!(
        "plain 1-row commit:       {:>8.0} us",
        1e6 / sqlite_plain(N, 1, PlainTable::Store).await?
    );
    drop(framework);
    drop(store);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    remove_sqlite(&path);
    // The 8-producer comparison of the full run, alone (BENCH_LIMIT_RUNS runs, default 3).
    let runs = std::env::var("BENCH_LIMIT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v: &usize| v > 0)
        .unwrap_or(3);
    let s = sqlite(runs).await?;
    report!("sqlite limits, median of {runs}, events/s:");
    report!(
        "  plain 8/txn {:.0} (bare table {:.0}), 512/txn {:.0}, 1/txn {:.0}",
        s.plain_batch8,
        s.plain_batch8_bare,
        s.plain_batch512,
        s.plain_batch1
    );
    report!(
        "  ours 8 producers {:.0}, cache {:.0}, 8 readers {:.0}, 1 producer {:.0}",
        s.ours_8,
        s.ours_8_cache,
        s.ours_8_readers_8,
        s.ours_1
    );
    for (name, ratio) in [
        ("8_producers_vs_plain_8_per_txn", s.ours_8 / s.plain_batch8),
        (
            "8_producers_cache_vs_plain_8_per_txn",
            s.ours_8_cache / s.plain_batch8,
        ),
        (
            "8_producers_8_readers_vs_plain_8_per_txn",
            s.ours_8_readers_8 / s.plain_batch8,
        ),
        ("1_producer_vs_plain_1_per_txn", s.ours_1 / s.plain_batch1),
        (
            "plain_8_per_txn_store_table_vs_bare",
            s.plain_batch8 / s.plain_batch8_bare,
        ),
    ] {
        report!("ratio sqlite_{name} {ratio:.2}");
    }
    Ok(())
}

/// `append` alone: `concurrency` tasks on a pool of as many connections, one event per call
/// (open + 9 deposits per aggregate, no read); events/s.
async fn postgres_append(url: &str, schema: &str, concurrency: usize) -> BoxResult<f64> {
    use cqrs::EventRepository;
    let pool = pg_pool(url, concurrency).await?;
    let store = PostgresEventRepository::from_pool(pool.clone()).with_schema(schema)?;
    store.migrate().await?;
    let per_task = POSTGRES_COMMANDS / concurrency;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut id = Uuid::new_v4();
            for i in 0..per_task {
                if i % 10 == 0 {
                    id = Uuid::new_v4();
                }
                let sequence = (i % 10 + 1) as i64;
                let event = cqrs::PersistableDomainEvent::new(
                    "bank_account",
                    id,
                    sequence,
                    &cqrs_examples::bank::BankEvent::deposited(100),
                    serde_json::Value::Null,
                )?;
                store.append(vec![event]).await?;
            }
            Ok::<(), cqrs::CQRSError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = (per_task * concurrency) as f64 / start.elapsed().as_secs_f64();
    drop(store);
    pool.close().await;
    Ok(rate)
}

/// `read_all` catching up through 10,000 events (1,000 accounts of 10, one append each) in
/// pages of 500 (`BENCH_PAGE`), as a projection does (`BENCH_PG_PARTS=catch_up`): events/s of each of
/// `BENCH_LIMIT_RUNS` (default 5) full reads, and their median.
pub async fn postgres_catch_up(url: &str) -> BoxResult<()> {
    let page_size = crate::env_usize("BENCH_PAGE", crate::catch_up::PAGE);
    let runs = crate::env_usize("BENCH_LIMIT_RUNS", 5);
    let schema = format!("bench_pcatchup_{}", Uuid::new_v4().simple());
    let pool = pg_pool(url, 8).await?;
    let store = PostgresEventRepository::from_pool(pool.clone()).with_schema(&schema)?;
    store.migrate().await?;
    crate::catch_up::fill(&store).await?;
    let total = crate::catch_up::EVENTS;
    let mut rates = Vec::with_capacity(runs);
    // CPU time (clock ticks) of this process and of the database's backends, for the split.
    let backends: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND backend_type = 'client backend'",
    )
    .fetch_all(&pool)
    .await?;
    let ticks = |pid: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
                Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0)
    };
    let cpu = || {
        let server: u64 = backends.iter().map(|pid| ticks(&pid.to_string())).sum();
        (ticks("self"), server)
    };
    let (client_before, server_before) = cpu();
    for run in 0..runs {
        // A fresh handle each time: no settled watermark carried over.
        let reader = PostgresEventRepository::from_pool(pool.clone()).with_schema(&schema)?;
        let rate = crate::catch_up::read_all_rate(&reader, page_size).await?;
        report!("postgres catch_up, run {run}: {rate:>9.0} events/s");
        rates.push(rate);
    }
    let (client_after, server_after) = cpu();
    let per_event = |ticks: u64| ticks as f64 * 1e4 / (runs * total) as f64;
    report!(
        "postgres catch_up: {:>9.0} events/s (median of {runs}); CPU per event: this process {:.2} us, backends {:.2} us",
        median(&mut rates),
        per_event(client_after.saturating_sub(client_before)),
        per_event(server_after.saturating_sub(server_before))
    );
    drop(store);
    sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

/// Where a PostgreSQL dispatch's time goes at `concurrency` (`BENCH_PROFILE=postgres`), in
/// `BENCH_LIMIT_RUNS` (default 5) interleaved rounds, each measurement on a fresh schema:
/// plain single-row INSERTs, our `append` alone (one event per call, no read), `dispatch`
/// (read + decide + append) and `dispatch` with the state cache. Prints each round, then
/// the medians and the medians of the per-round ratios against the plain INSERTs.
pub async fn postgres_parts(url: &str, concurrency: usize) -> BoxResult<()> {
    match std::env::var("BENCH_PG_PARTS").as_deref() {
        Ok("catch_up") if concurrency == 8 => return postgres_catch_up(url).await,
        Ok("catch_up") => return Ok(()),
        _ => {}
    }
    let runs = std::env::var("BENCH_LIMIT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v: &usize| v > 0)
        .unwrap_or(5);
    // Only one of our variants, for a profiler: `dispatch` or `dispatch_cache`.
    if let Ok(only) = std::env::var("BENCH_PG_ONLY") {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        for run in 0..runs {
            let schema = format!("bench_ponly_{}", Uuid::new_v4().simple());
            let rate = match only.as_str() {
                "append" => postgres_append(url, &schema, concurrency).await?,
                "plain" => postgres_plain(url, &schema, concurrency).await?,
                _ => postgres_ours(url, &schema, concurrency, only == "dispatch_cache").await?,
            };
            report!("postgres {concurrency:>2} tasks, {only} run {run}: {rate:>6.0} /s");
            sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&mut conn)
                .await?;
        }
        return Ok(());
    }
    let tag = Uuid::new_v4().simple().to_string();
    let names = ["plain", "append", "dispatch", "dispatch_cache"];
    let mut rates: [Vec<f64>; 4] = Default::default();
    let mut ratios: [Vec<f64>; 3] = Default::default();
    let mut schemas = Vec::new();
    for run in 0..runs {
        let s: Vec<String> = names
            .iter()
            .map(|n| format!("bench_p{n}_{tag}_{concurrency}_{run}"))
            .collect();
        let round = [
            postgres_plain(url, &s[0], concurrency).await?,
            postgres_append(url, &s[1], concurrency).await?,
            postgres_ours(url, &s[2], concurrency, false).await?,
            postgres_ours(url, &s[3], concurrency, true).await?,
        ];
        report!(
            "postgres {concurrency:>2} tasks, round {run}: plain {:>6.0}  append {:>6.0}  dispatch {:>6.0}  dispatch_cache {:>6.0} /s",
            round[0], round[1], round[2], round[3]
        );
        for (i, rate) in round.iter().enumerate() {
            rates[i].push(*rate);
            if i > 0 {
                ratios[i - 1].push(rate / round[0]);
            }
        }
        schemas.extend(s);
    }
    for (name, values) in names.iter().zip(rates.iter_mut()) {
        report!(
            "postgres {concurrency:>2} tasks, {name:<15} {:>8.0} /s (median of {runs})",
            median(values)
        );
    }
    for (name, values) in names[1..].iter().zip(ratios.iter_mut()) {
        report!("ratio postgres_{concurrency}_{name}_vs_plain {:.2} (median of {runs} per-round ratios)", median(values));
    }
    let mut conn = sqlx::PgConnection::connect(url).await?;
    for schema in schemas {
        sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}
