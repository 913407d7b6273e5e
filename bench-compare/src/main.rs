//! Side-by-side figures: cqrs against cqrs-es 0.5 on the same bank-account workload, and
//! cqrs's SQL stores against plain inserts through the same driver, all in one process run.
//!
//! ```text
//! cargo run --release --manifest-path bench-compare/Cargo.toml
//! CQRS_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo run --release --manifest-path bench-compare/Cargo.toml
//! ```
//!
//! Environment: `BENCH_RUNS` (runs per in-memory throughput figure, default 5),
//! `BENCH_LIMIT_RUNS` (runs per SQLite/PostgreSQL figure, default 3; the catch-up takes 7
//! alternating pairs per run), `BENCH_SAMPLES`
//! (latency samples per stream length, default 31), `CQRS_POSTGRES_URL` (the PostgreSQL
//! limits are skipped when unset), `BENCH_CHART` (where the PNG goes, default
//! `docs/benchmarks-latency.png` beside this crate).
//!
//! One part alone: `BENCH_PROFILE=a|b|memory|long|sqlite|postgres|catch_up|lag`
//! (`cg_ours|cg_es`: workload (a) `BENCH_RUNS` times on one side, for callgrind;
//! `cg_catch_up_ours|cg_catch_up_raw`: the SQLite catch-up read on one side;
//! `cg_catch_up_page|cg_catch_up_page_checked`: the raw scan copying each page into one
//! buffer, without and with the store's checks of each row). For the
//! PostgreSQL part, `BENCH_PG_ONLY=plain|append|dispatch|dispatch_cache` runs one variant
//! (for a profiler), `BENCH_PG_LEVELS` lists the numbers of dispatchers (default `8,32`),
//! and `BENCH_PG_PARTS=catch_up` measures `read_all` (pages of
//! `BENCH_PAGE`, default 500). The projection-lag part
//! reads `BENCH_LAG_RUNS` (default 3), `BENCH_LAG_SECS`, `BENCH_LAG_MAX_SECS` and
//! `BENCH_LAG_LOADS` (see `lag.rs`).

mod catch_up;
mod chart;
mod lag;
mod limits;
mod reference;

use std::collections::HashMap;
use std::error::Error;
use std::time::{Duration, Instant};

use cqrs::{
    Aggregate, CQRSFramework, EventRepository, MemoryEventRepository, MemorySnapshotRepository,
    PersistableDomainEvent, Snapshot, SnapshotPolicy, SnapshotRepository,
};
use cqrs_es::mem_store::MemStore;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{CqrsFramework, EventStore};
use cqrs_examples::bank::{AccountState, BankAccount, BankCommand, BankEvent};
use uuid::Uuid;

use crate::reference::{MemPersistedRepository, RefAccount, RefCommand, RefEvent};

type BoxResult<T> = Result<T, Box<dyn Error>>;

/// Aggregates in workload (a).
const AGGREGATES: usize = 10_000;
/// Deposits after the open, per aggregate, in workload (a).
const DEPOSITS: usize = 9;
/// Stream lengths of workload (b).
const LENGTHS: [usize; 4] = [10, 100, 1_000, 10_000];
/// The snapshot policy of the "ours, snapshots" variant.
const SNAPSHOT_EVERY: u32 = 100;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Set in the child process that does the measuring.
const CHILD: &str = "BENCH_COMPARE_CHILD";

/// The report goes to stderr: cqrs-es 0.5's `MemStore` prints two lines to stdout on every
/// command (`loading: ..`, `storing: ..`). The parent runs the measurements in a child whose
/// stdout is `/dev/null` (so that printing costs cqrs-es the same wherever the program is
/// started, and not a terminal's rendering), and copies the child's report to its stdout.
macro_rules! report {
    ($($arg:tt)*) => { eprintln!($($arg)*) };
}
pub(crate) use report;

fn main() -> BoxResult<()> {
    if std::env::var_os(CHILD).is_none() {
        return run_child();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match std::env::var("BENCH_PROFILE") {
        Ok(mode) => runtime.block_on(profile(&mode)),
        Err(_) => runtime.block_on(run()),
    }
}

/// Runs this program again as the measuring child, stdout discarded, and relays its report.
fn run_child() -> BoxResult<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(CHILD, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(stderr) = child.stderr.take() {
        let stdout = std::io::stdout();
        for line in BufReader::new(stderr).lines() {
            let mut out = stdout.lock();
            writeln!(out, "{}", line?)?;
            out.flush()?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("the measuring process failed: {status}").into());
    }
    Ok(())
}

/// One workload alone, for a profiler or a quick check
/// (`BENCH_PROFILE=a|b|memory|long|sqlite|catch_up|lag|postgres`).
async fn profile(mode: &str) -> BoxResult<()> {
    match mode {
        "a" => {
            let throughput = workload_a(env_usize("BENCH_RUNS", 3)).await?;
            let es = throughput["cqrs_es_memstore"];
            for (label, rate) in &throughput {
                report!(
                    "{label:>24} {rate:>10.0} commands/s  ratio to MemStore {:.2}",
                    rate / es
                );
            }
        }
        "b" => {
            let latency = workload_b(env_usize("BENCH_SAMPLES", 31)).await?;
            for (i, n) in LENGTHS.iter().enumerate() {
                report!(
                    "N {n:>6}: no cache {:>9.2} us, default {:>7.2} us, snapshots {:>7.2} us, cqrs-es {:>9.2} us",
                    latency.ours_no_cache[i],
                    latency.ours_default[i],
                    latency.ours_snapshots[i],
                    latency.cqrs_es[i]
                );
            }
            let last = LENGTHS.len() - 1;
            report!(
                "growth 10000th/10th: default {:.2}, no cache {:.2}, snapshots {:.2}, cqrs-es {:.2}",
                latency.ours_default[last] / latency.ours_default[0],
                latency.ours_no_cache[last] / latency.ours_no_cache[0],
                latency.ours_snapshots[last] / latency.ours_snapshots[0],
                latency.cqrs_es[last] / latency.cqrs_es[0]
            );
        }
        "memory" => {
            let ids: Vec<Uuid> = (0..2_000).map(|_| Uuid::new_v4()).collect();
            for _ in 0..5 {
                let framework = CQRSFramework::<BankAccount>::new(MemoryEventRepository::new());
                let elapsed = ours_a(&framework, &ids).await?;
                report!("memory: {:.0} commands/s", 20_000.0 / elapsed.as_secs_f64());
            }
        }
        "long" => {
            let store = MemoryEventRepository::new();
            let id = Uuid::new_v4();
            store.append(ours_history(id, 9_999)?).await?;
            let framework = CQRSFramework::<BankAccount>::new(store);
            for _ in 0..5 {
                let start = Instant::now();
                framework
                    .dispatch(id, BankCommand::Deposit { amount: 100 })
                    .await?;
                report!("long: {:.0} us", start.elapsed().as_secs_f64() * 1e6);
            }
        }
        "sqlite" => limits::sqlite_parts().await?,
        "catch_up" => {
            let mut ratios = Vec::new();
            catch_up::run(env_usize("BENCH_LIMIT_RUNS", 5), &mut ratios).await?;
            for line in &ratios {
                report!("{line}");
            }
        }
        "lag" => lag::profile().await?,
        "cg_catch_up_ours" | "cg_catch_up_raw" | "cg_catch_up_page" | "cg_catch_up_page_checked" => {
            let side = match mode {
                "cg_catch_up_ours" => catch_up::Side::Ours,
                "cg_catch_up_raw" => catch_up::Side::Raw,
                "cg_catch_up_page" => catch_up::Side::Page,
                _ => catch_up::Side::PageChecked,
            };
            catch_up::sqlite_one_side(side, env_usize("BENCH_RUNS", 1)).await?;
        }
        // For callgrind: workload (a) `BENCH_RUNS` times on one side only, nothing timed.
        // Instructions per command = (Ir at runs R2 - Ir at runs R1) / ((R2 - R1) * 100,000).
        "cg_ours" | "cg_es" => {
            let ids: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::new_v4()).collect();
            let names: Vec<String> = ids.iter().map(Uuid::to_string).collect();
            for _ in 0..env_usize("BENCH_RUNS", 1) {
                if mode == "cg_ours" {
                    let framework = CQRSFramework::<BankAccount>::new(MemoryEventRepository::new());
                    ours_a(&framework, &ids).await?;
                } else {
                    let framework =
                        CqrsFramework::new(MemStore::<RefAccount>::default(), vec![], ());
                    reference_a(&framework, &names).await?;
                }
            }
        }
        "postgres" => {
            let url = std::env::var("CQRS_POSTGRES_URL")
                .map_err(|_| "BENCH_PROFILE=postgres needs CQRS_POSTGRES_URL")?;
            let levels = std::env::var("BENCH_PG_LEVELS").unwrap_or_else(|_| "8,32".to_owned());
            for level in levels.split(',') {
                let concurrency: usize = level
                    .trim()
                    .parse()
                    .map_err(|_| format!("BENCH_PG_LEVELS: {level:?} is not a number"))?;
                limits::postgres_parts(&url, concurrency).await?;
            }
        }
        other => {
            return Err(format!(
                "unknown BENCH_PROFILE {other:?}: a, b, memory, long, sqlite, postgres, catch_up, lag, cg_ours, cg_es, cg_catch_up_ours, cg_catch_up_raw, cg_catch_up_page or cg_catch_up_page_checked"
            )
            .into())
        }
    }
    Ok(())
}

async fn run() -> BoxResult<()> {
    let runs = env_usize("BENCH_RUNS", 5);
    let samples = env_usize("BENCH_SAMPLES", 31);
    report!(
        "bench-compare: cqrs {} vs cqrs-es 0.5.0; {runs} runs per throughput figure, {samples} samples per latency; medians",
        env!("CARGO_PKG_VERSION")
    );
    let mut ratios: Vec<String> = Vec::new();

    // (a) and (c): 100,000 commands, one task, in memory.
    let throughput = workload_a(runs).await?;
    let (plain, cache, es_mem, es_json) = (
        throughput["ours_no_cache"],
        throughput["ours_default"],
        throughput["cqrs_es_memstore"],
        throughput["cqrs_es_persisted_json"],
    );
    report!("\n(a)/(c) {AGGREGATES} aggregates x (open + {DEPOSITS} deposits), one task, in memory, commands/s (median of {runs}):");
    report!("  ours, MemoryEventRepository (default: state cache) {cache:>12.0}");
    report!("  ours, MemoryEventRepository, without_state_cache   {plain:>12.0}");
    report!("  cqrs-es MemStore                            {es_mem:>12.0}");
    report!("  cqrs-es PersistedEventStore (JSON, memory)  {es_json:>12.0}");
    ratios.push(format!(
        "ratio a_memory_throughput_vs_memstore {:.2}   (higher is better; goal >= 3)",
        cache / es_mem
    ));
    ratios.push(format!(
        "ratio a_memory_throughput_no_cache_vs_memstore {:.2}   (higher is better)",
        plain / es_mem
    ));
    ratios.push(format!(
        "ratio c_json_memory_throughput_vs_persisted {:.2}   (higher is better)",
        cache / es_json
    ));
    ratios.push(format!(
        "ratio c_json_memory_throughput_no_cache_vs_persisted {:.2}   (higher is better)",
        plain / es_json
    ));

    // (b): latency of one deposit against the stream length.
    let latency = workload_b(samples).await?;
    report!("\n(b) latency of one deposit on an aggregate with N prior events, microseconds (median of {samples}):");
    report!(
        "  {:>7} {:>12} {:>12} {:>12} {:>12}",
        "N",
        "ours no cache",
        "ours default",
        "ours snap",
        "cqrs-es mem"
    );
    for (i, n) in LENGTHS.iter().enumerate() {
        report!(
            "  {n:>7} {:>12.2} {:>12.2} {:>12.2} {:>12.2}",
            latency.ours_no_cache[i],
            latency.ours_default[i],
            latency.ours_snapshots[i],
            latency.cqrs_es[i]
        );
    }
    let last = LENGTHS.len() - 1;
    for (name, series) in [
        ("ours_no_cache", &latency.ours_no_cache),
        ("ours_default", &latency.ours_default),
        ("ours_snapshots", &latency.ours_snapshots),
        ("cqrs_es_memstore", &latency.cqrs_es),
    ] {
        ratios.push(format!(
            "ratio b_growth_{name}_10000th_vs_10th {:.2}   (lower is better; goal for ours <= 1.5)",
            series[last] / series[0]
        ));
    }
    for (i, n) in LENGTHS.iter().enumerate() {
        ratios.push(format!(
            "ratio b_latency_N{n}_ours_no_cache_vs_cqrs_es {:.3}   (latency: lower is better)",
            latency.ours_no_cache[i] / latency.cqrs_es[i]
        ));
        ratios.push(format!(
            "ratio b_latency_N{n}_ours_default_vs_cqrs_es {:.3}   (latency: lower is better)",
            latency.ours_default[i] / latency.cqrs_es[i]
        ));
    }
    let chart_path = std::env::var("BENCH_CHART").unwrap_or_else(|_| {
        format!(
            "{}/../docs/benchmarks-latency.png",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    match chart::draw(&chart_path, &LENGTHS, &latency) {
        Ok(text) => report!("  chart written to {chart_path} ({text})"),
        Err(error) => report!("  chart NOT written to {chart_path}: {error}"),
    }

    // The physical limits.
    let runs_limits = env_usize("BENCH_LIMIT_RUNS", 3);
    report!("\nlimits (median of {runs_limits}, events/s; one event per command):");
    let sqlite = limits::sqlite(runs_limits).await?;
    report!(
        "  sqlite plain INSERTs into the store's table, WAL + synchronous=FULL, 8 rows/txn {:>8.0}",
        sqlite.plain_batch8
    );
    report!(
        "  sqlite plain INSERTs, the same, into a bare table (no trigger, index) {:>8.0}",
        sqlite.plain_batch8_bare
    );
    report!(
        "  sqlite plain INSERTs, WAL + synchronous=FULL, 512 rows/transaction {:>10.0}",
        sqlite.plain_batch512
    );
    report!(
        "  sqlite plain INSERTs, WAL + synchronous=FULL, 1 row/transaction    {:>10.0}",
        sqlite.plain_batch1
    );
    report!(
        "  ours SqliteEventRepository (Durability::Full), 1 producer, no cache {:>10.0}",
        sqlite.ours_1
    );
    report!(
        "  ours SqliteEventRepository (Durability::Full), 8 producers, no cache {:>9.0}",
        sqlite.ours_8
    );
    report!(
        "  ours SqliteEventRepository (Durability::Full), 8 producers, default (cache) {:>3.0}",
        sqlite.ours_8_cache
    );
    report!(
        "  ours SqliteEventRepository (Durability::Full), 8 producers, no cache, 8 readers {:>1.0}",
        sqlite.ours_8_readers_8
    );
    ratios.push(format!(
        "ratio sqlite_8_producers_vs_plain_8_per_txn {:.2}   (higher is better; goal >= 0.9)",
        sqlite.ours_8_cache / sqlite.plain_batch8
    ));
    ratios.push(format!(
        "ratio sqlite_8_producers_no_cache_8_readers_vs_plain_8_per_txn {:.2}   (higher is better)",
        sqlite.ours_8_readers_8 / sqlite.plain_batch8
    ));
    ratios.push(format!(
        "ratio sqlite_8_producers_no_cache_vs_plain_8_per_txn {:.2}   (higher is better)",
        sqlite.ours_8 / sqlite.plain_batch8
    ));
    ratios.push(format!(
        "ratio sqlite_8_producers_vs_plain_512_per_txn {:.3}   (higher is better)",
        sqlite.ours_8_cache / sqlite.plain_batch512
    ));
    ratios.push(format!(
        "ratio sqlite_1_producer_no_cache_vs_plain_1_per_txn {:.2}   (higher is better)",
        sqlite.ours_1 / sqlite.plain_batch1
    ));
    ratios.push(format!(
        "ratio sqlite_plain_8_per_txn_store_table_vs_bare {:.2}   (the schema's own cost)",
        sqlite.plain_batch8 / sqlite.plain_batch8_bare
    ));

    match std::env::var("CQRS_POSTGRES_URL") {
        Ok(url) => {
            let pg = limits::postgres(&url, runs_limits, &[8, 32]).await?;
            for row in &pg {
                report!(
                    "  postgres plain single-row INSERT commits, {:>2} connections        {:>10.0}",
                    row.concurrency, row.plain
                );
                report!(
                    "  ours PostgresEventRepository, {:>2} producers, no cache             {:>10.0}",
                    row.concurrency, row.ours
                );
                report!(
                    "  ours PostgresEventRepository, {:>2} producers, default (cache)      {:>10.0}",
                    row.concurrency, row.ours_cache
                );
                // The goals: group commit ahead of per-command commits, more so with more
                // dispatchers to share a commit.
                let goal = if row.concurrency >= 32 { 1.5 } else { 1.2 };
                ratios.push(format!(
                    "ratio postgres_{}_vs_plain_insert {:.2}   (higher is better; goal >= {goal})",
                    row.concurrency,
                    row.ours_cache / row.plain
                ));
                ratios.push(format!(
                    "ratio postgres_{}_no_cache_vs_plain_insert {:.2}   (higher is better)",
                    row.concurrency,
                    row.ours / row.plain
                ));
            }
        }
        Err(_) => report!(
            "  skipping postgres limits: set CQRS_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run them"
        ),
    }

    catch_up::run(runs_limits, &mut ratios).await?;
    lag::run(&mut ratios).await?;

    report!();
    for line in &ratios {
        report!("{line}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (a) and (c)
// ---------------------------------------------------------------------------------------

/// Commands/s of every framework on workload (a), median of `runs`, runs alternating.
async fn workload_a(runs: usize) -> BoxResult<HashMap<&'static str, f64>> {
    let ids: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::new_v4()).collect();
    let names: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let commands = (AGGREGATES * (1 + DEPOSITS)) as f64;
    let labels = [
        "ours_no_cache",
        "ours_default",
        "cqrs_es_memstore",
        "cqrs_es_persisted_json",
    ];
    let mut times: HashMap<&'static str, Vec<f64>> = HashMap::new();
    for run in 0..runs {
        // Rotate the order each run so no framework always runs first (warm caches, heap).
        for k in 0..labels.len() {
            let label = labels[(run + k) % labels.len()];
            let elapsed = match label {
                "ours_no_cache" => {
                    let framework = CQRSFramework::<BankAccount>::new(MemoryEventRepository::new())
                        .without_state_cache();
                    ours_a(&framework, &ids).await?
                }
                "ours_default" => {
                    let framework = CQRSFramework::<BankAccount>::new(MemoryEventRepository::new());
                    ours_a(&framework, &ids).await?
                }
                "cqrs_es_memstore" => {
                    let framework =
                        CqrsFramework::new(MemStore::<RefAccount>::default(), vec![], ());
                    reference_a(&framework, &names).await?
                }
                _ => {
                    let store = PersistedEventStore::<_, RefAccount>::new_event_store(
                        MemPersistedRepository::default(),
                    );
                    let framework = CqrsFramework::new(store, vec![], ());
                    reference_a(&framework, &names).await?
                }
            };
            times
                .entry(label)
                .or_default()
                .push(commands / elapsed.as_secs_f64());
        }
    }
    Ok(times
        .into_iter()
        .map(|(label, mut rates)| (label, median(&mut rates)))
        .collect())
}

async fn ours_a(framework: &CQRSFramework<BankAccount>, ids: &[Uuid]) -> BoxResult<Duration> {
    let start = Instant::now();
    for &id in ids {
        framework
            .dispatch(
                id,
                BankCommand::Open {
                    owner: "alice".to_owned(),
                },
            )
            .await?;
        for _ in 0..DEPOSITS {
            framework
                .dispatch(id, BankCommand::Deposit { amount: 100 })
                .await?;
        }
    }
    Ok(start.elapsed())
}

async fn reference_a<ES: EventStore<RefAccount>>(
    framework: &CqrsFramework<RefAccount, ES>,
    ids: &[String],
) -> BoxResult<Duration> {
    let start = Instant::now();
    for id in ids {
        framework
            .execute(
                id,
                RefCommand::Open {
                    owner: "alice".to_owned(),
                },
            )
            .await?;
        for _ in 0..DEPOSITS {
            framework
                .execute(id, RefCommand::Deposit { amount: 100 })
                .await?;
        }
    }
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------------------
// (b)
// ---------------------------------------------------------------------------------------

/// Median microseconds of one deposit, per stream length, per variant.
pub struct Latency {
    pub ours_no_cache: Vec<f64>,
    pub ours_default: Vec<f64>,
    pub ours_snapshots: Vec<f64>,
    pub cqrs_es: Vec<f64>,
}

/// The events of an account opened then deposited into: `count` events, sequences 1..=count.
fn ours_history(id: Uuid, count: usize) -> BoxResult<Vec<PersistableDomainEvent>> {
    (1..=count)
        .map(|sequence| {
            let event = if sequence == 1 {
                BankEvent::Opened {
                    owner: "alice".to_owned(),
                }
            } else {
                BankEvent::deposited(100)
            };
            Ok(PersistableDomainEvent::new(
                BankAccount::NAME,
                id,
                sequence as i64,
                &event,
                serde_json::Value::Null,
            )?)
        })
        .collect()
}

fn reference_history(count: usize) -> Vec<RefEvent> {
    (1..=count)
        .map(|sequence| {
            if sequence == 1 {
                RefEvent::Opened {
                    owner: "alice".to_owned(),
                }
            } else {
                RefEvent::Deposited {
                    amount: 100,
                    currency: "EUR".to_owned(),
                }
            }
        })
        .collect()
}

async fn workload_b(samples: usize) -> BoxResult<Latency> {
    let mut latency = Latency {
        ours_no_cache: Vec::new(),
        ours_default: Vec::new(),
        ours_snapshots: Vec::new(),
        cqrs_es: Vec::new(),
    };
    let deposit = || BankCommand::Deposit { amount: 100 };
    let ref_deposit = || RefCommand::Deposit { amount: 100 };
    let mut fixtures = Vec::with_capacity(LENGTHS.len());
    // One store per variant holds the aggregates of every length, so each N is measured in
    // a store of the same size (150,000+ events): what varies is the aggregate's history,
    // not how big the store's maps are.
    let plain_store = MemoryEventRepository::new();
    let cache_store = MemoryEventRepository::new();
    let snap_store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    let reference_store = MemStore::<RefAccount>::default();
    for &n in &LENGTHS {
        // Every sample is its own aggregate written straight to the store with N - 1 events;
        // one untimed deposit (which fills the state cache, and makes the snapshot the
        // policy would have made) brings it to N, then the timed deposit runs on N prior
        // events.
        let samples = if n >= 10_000 {
            samples.min(15)
        } else {
            samples
        };
        let ids: Vec<Uuid> = (0..samples).map(|_| Uuid::new_v4()).collect();
        let names: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        for (id, name) in ids.iter().zip(&names) {
            let history = ours_history(*id, n - 1)?;
            plain_store.append(history.clone()).await?;
            cache_store.append(history.clone()).await?;
            snap_store.append(history).await?;
            // The snapshot the policy would have saved at the last multiple of its interval.
            let every = SNAPSHOT_EVERY as usize;
            let at = (n - 1) / every * every;
            if at > 0 {
                snapshots
                    .save_snapshot(Snapshot {
                        aggregate_type: BankAccount::NAME.to_owned(),
                        aggregate_id: *id,
                        sequence: at as i64,
                        state: serde_json::to_value(AccountState {
                            open: true,
                            balance: 100 * (at as u64 - 1),
                        })?,
                        timestamp: chrono::Utc::now(),
                    })
                    .await?;
            }
            let context = reference_store.load_aggregate(name).await?;
            reference_store
                .commit(reference_history(n - 1), context, HashMap::new())
                .await?;
        }
        fixtures.push((ids, names));
    }
    let plain = CQRSFramework::<BankAccount>::new(plain_store).without_state_cache();
    let cache = CQRSFramework::<BankAccount>::new(cache_store);
    let snap = CQRSFramework::<BankAccount>::new(snap_store)
        .without_state_cache()
        .with_snapshots(snapshots, SnapshotPolicy::every(SNAPSHOT_EVERY));
    let reference = CqrsFramework::new(reference_store, vec![], ());
    for (ids, names) in &fixtures {
        for (id, name) in ids.iter().zip(names) {
            for framework in [&plain, &cache, &snap] {
                framework.dispatch(*id, deposit()).await?;
            }
            reference.execute(name, ref_deposit()).await?;
        }
    }
    for (i, (ids, names)) in fixtures.iter().enumerate() {
        let samples = ids.len();
        let mut t_plain = Vec::with_capacity(samples);
        let mut t_cache = Vec::with_capacity(samples);
        let mut t_snap = Vec::with_capacity(samples);
        let mut t_ref = Vec::with_capacity(samples);
        // Each variant's timed deposits run back to back (one per aggregate), so a timed
        // dispatch follows a dispatch of the same variant, as in a service that runs one of
        // them; another variant's 10,000-event replay would otherwise evict its data from the
        // CPU caches just before it. The order of the variants rotates with N.
        for k in 0..4 {
            match (k + i) % 4 {
                0 => {
                    for id in ids {
                        let start = Instant::now();
                        plain.dispatch(*id, deposit()).await?;
                        t_plain.push(start.elapsed().as_secs_f64() * 1e6);
                    }
                }
                1 => {
                    for id in ids {
                        let start = Instant::now();
                        cache.dispatch(*id, deposit()).await?;
                        t_cache.push(start.elapsed().as_secs_f64() * 1e6);
                    }
                }
                2 => {
                    for id in ids {
                        let start = Instant::now();
                        snap.dispatch(*id, deposit()).await?;
                        t_snap.push(start.elapsed().as_secs_f64() * 1e6);
                    }
                }
                _ => {
                    for name in names {
                        let start = Instant::now();
                        reference.execute(name, ref_deposit()).await?;
                        t_ref.push(start.elapsed().as_secs_f64() * 1e6);
                    }
                }
            }
        }
        latency.ours_no_cache.push(median(&mut t_plain));
        latency.ours_default.push(median(&mut t_cache));
        latency.ours_snapshots.push(median(&mut t_snap));
        latency.cqrs_es.push(median(&mut t_ref));
    }
    Ok(latency)
}
