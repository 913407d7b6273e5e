//! `cargo bench -p cqrs-benches`: the figures behind `docs/benchmarks.md`.
//!
//! Every benchmark keeps its measurement short (10 samples, 2 s) so the whole suite runs in
//! a few minutes on a busy two-core machine; rerun one group with
//! `cargo bench -p cqrs-benches -- <group name>`. PostgreSQL benchmarks run only when
//! `CQRS_POSTGRES_URL` is set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::SqliteOptions;
use cqrs::{
    CQRSError, CQRSFramework, Checkpoint, CommandContext, DomainEvent, EventRepository,
    MemoryEventRepository, MemoryViewRepository, PersistableDomainEvent, PostgresEventRepository,
    Projection, SqliteEventRepository, ViewContext, ViewRepository,
};
use cqrs_benches::{
    bank_command, fill, history, postgres_url, prefilled, remove_sqlite, runtime, temp_sqlite,
    Variant, AMOUNT,
};
use cqrs_examples::bank::{BalanceView, BankAccount, BankCommand, BankEvent};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use sqlx::Connection;
use tokio::runtime::Runtime;
use uuid::Uuid;

/// Stream lengths of the latency benchmark.
const LENGTHS: [usize; 4] = [10, 100, 1_000, 10_000];
/// Events in the catch-up and projection benchmarks.
const READ_EVENTS: usize = 10_000;
/// Page size of the catch-up read (the projection's default batch).
const PAGE: usize = 500;

fn short<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group
}

fn rt() -> Runtime {
    runtime().expect("a Tokio runtime")
}

/// `iters` commands, one task, each account opened then deposited into 9 times.
async fn dispatch_accounts(framework: &CQRSFramework<BankAccount>, iters: u64) -> Duration {
    let mut id = Uuid::new_v4();
    let start = Instant::now();
    for i in 0..iters as usize {
        if i % 10 == 0 {
            id = Uuid::new_v4();
        }
        framework
            .dispatch(id, bank_command(i % 10))
            .await
            .expect("dispatch");
    }
    start.elapsed()
}

fn memory_dispatch(c: &mut Criterion) {
    let rt = rt();
    let mut group = short(c, "memory_dispatch");
    group.throughput(Throughput::Elements(1));
    group.bench_function("plain", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let framework = CQRSFramework::<BankAccount>::new(MemoryEventRepository::new())
                .without_state_cache();
            dispatch_accounts(&framework, iters).await
        });
    });
    group.bench_function("state_cache", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            // The default configuration, with room for every account of a long run.
            let framework = CQRSFramework::<BankAccount>::new(MemoryEventRepository::new())
                .with_state_cache(100_000);
            dispatch_accounts(&framework, iters).await
        });
    });
    group.finish();
}

/// `iters` commands as [`dispatch_accounts`], each under a context of its own, with
/// `CommandContext::once` when `once`.
async fn dispatch_in_context(
    framework: &CQRSFramework<BankAccount>,
    iters: u64,
    once: bool,
) -> Duration {
    let mut id = Uuid::new_v4();
    let start = Instant::now();
    for i in 0..iters as usize {
        if i % 10 == 0 {
            id = Uuid::new_v4();
        }
        let context = CommandContext::new();
        let context = if once { context.once() } else { context };
        framework
            .dispatch_with_context(id, bank_command(i % 10), &context)
            .await
            .expect("dispatch");
    }
    start.elapsed()
}

/// What taking effect at most once costs a command: `dispatch_with_context` with and without
/// `CommandContext::once` (one read of the aggregate's events caused by the command id
/// before the decision), in memory (state cache on) and on a durable SQLite file.
fn exactly_once(c: &mut Criterion) {
    let rt = rt();
    let mut group = short(c, "exactly_once");
    group.throughput(Throughput::Elements(1));
    for once in [false, true] {
        let name = if once { "once" } else { "context" };
        group.bench_function(BenchmarkId::new("memory", name), |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let framework = CQRSFramework::<BankAccount>::new(MemoryEventRepository::new());
                dispatch_in_context(&framework, iters, once).await
            });
        });
    }
    let path = temp_sqlite("once");
    let framework = rt.block_on(async {
        let store =
            SqliteEventRepository::connect(&path.display().to_string(), SqliteOptions::default())
                .await
                .expect("open sqlite");
        store.migrate().await.expect("migrate sqlite");
        Arc::new(CQRSFramework::<BankAccount>::new(store))
    });
    for once in [false, true] {
        let name = if once { "once" } else { "context" };
        group.bench_function(BenchmarkId::new("sqlite", name), |b| {
            let framework = Arc::clone(&framework);
            b.to_async(&rt).iter_custom(move |iters| {
                let framework = Arc::clone(&framework);
                async move { dispatch_in_context(&framework, iters, once).await }
            });
        });
    }
    drop(framework);
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    remove_sqlite(&path);
    group.finish();
}

/// One deposit on an account with N prior events.
///
/// Plain replay: every timed deposit runs on a freshly written account with exactly N
/// events (accounts are written in chunks, outside the timing). Snapshots and state cache:
/// a pool of accounts written once with N events, used in turn, so their streams grow by
/// one event per use; by design their cost does not depend on the length, and what is
/// measured is their steady state (snapshots replay up to 99 events after the last one).
fn stream_length(c: &mut Criterion) {
    let rt = rt();
    let mut group = short(c, "dispatch_vs_stream_length");
    group.throughput(Throughput::Elements(1));
    for n in LENGTHS {
        let pool = (100_000 / n).max(10);
        for variant in Variant::ALL {
            group.bench_with_input(BenchmarkId::new(variant.name(), n), &n, |b, &n| {
                if variant == Variant::Plain {
                    b.to_async(&rt).iter_custom(|iters| async move {
                        let mut measured = Duration::ZERO;
                        let mut left = iters as usize;
                        while left > 0 {
                            let chunk = left.min(pool);
                            let (framework, ids) =
                                prefilled(variant, n, chunk).await.expect("prefill");
                            let start = Instant::now();
                            for &id in &ids {
                                framework
                                    .dispatch(id, BankCommand::Deposit { amount: AMOUNT })
                                    .await
                                    .expect("dispatch");
                            }
                            measured += start.elapsed();
                            left -= chunk;
                        }
                        measured
                    });
                } else {
                    let (framework, ids) =
                        rt.block_on(prefilled(variant, n, pool)).expect("prefill");
                    let (framework, ids) = (&framework, &ids);
                    let next = std::cell::Cell::new(0usize);
                    let next = &next;
                    b.to_async(&rt).iter_custom(|iters| async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let i = next.get();
                            next.set((i + 1) % ids.len());
                            framework
                                .dispatch(ids[i], BankCommand::Deposit { amount: AMOUNT })
                                .await
                                .expect("dispatch");
                        }
                        start.elapsed()
                    });
                }
            });
        }
    }
    group.finish();
}

/// `iters` commands spread over `producers` tasks; the elapsed time of all of them.
async fn producers(
    framework: Arc<CQRSFramework<BankAccount>>,
    producers: usize,
    iters: u64,
) -> Duration {
    let per_task = (iters as usize).div_ceil(producers);
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let framework = Arc::clone(&framework);
            tokio::spawn(async move {
                let mut id = Uuid::new_v4();
                for i in 0..per_task {
                    if i % 10 == 0 {
                        id = Uuid::new_v4();
                    }
                    framework
                        .dispatch(id, bank_command(i % 10))
                        .await
                        .expect("dispatch");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("producer task");
    }
    // Report the time per requested iteration even when rounding added a few.
    start
        .elapsed()
        .mul_f64(iters as f64 / (per_task * producers) as f64)
}

fn sqlite_dispatch(c: &mut Criterion) {
    let rt = rt();
    let mut group = short(c, "sqlite_durable_dispatch");
    group.throughput(Throughput::Elements(1));
    for count in [1usize, 8] {
        let path = temp_sqlite("dispatch");
        let framework = rt.block_on(async {
            let store = SqliteEventRepository::connect(
                &path.display().to_string(),
                SqliteOptions::default(),
            )
            .await
            .expect("open sqlite");
            store.migrate().await.expect("migrate sqlite");
            Arc::new(CQRSFramework::<BankAccount>::new(store))
        });
        group.bench_with_input(BenchmarkId::new("producers", count), &count, |b, &count| {
            b.to_async(&rt)
                .iter_custom(|iters| producers(Arc::clone(&framework), count, iters));
        });
        drop(framework);
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
        remove_sqlite(&path);
    }
    group.finish();
}

fn postgres_dispatch(c: &mut Criterion) {
    let Some(url) = postgres_url() else {
        return;
    };
    let rt = rt();
    let mut group = short(c, "postgres_dispatch");
    group.throughput(Throughput::Elements(1));
    for count in [1usize, 8, 32] {
        let schema = format!("cqrs_bench_{}", Uuid::new_v4().simple());
        let framework = rt.block_on(async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(count as u32)
                .connect(&url)
                .await
                .expect("connect postgres");
            let store = PostgresEventRepository::from_pool(pool)
                .with_schema(&schema)
                .expect("schema name");
            store.migrate().await.expect("migrate postgres");
            Arc::new(CQRSFramework::<BankAccount>::new(store))
        });
        group.bench_with_input(BenchmarkId::new("producers", count), &count, |b, &count| {
            b.to_async(&rt)
                .iter_custom(|iters| producers(Arc::clone(&framework), count, iters));
        });
        drop(framework);
        rt.block_on(drop_schema(&url, &schema));
    }
    group.finish();
}

/// Drops a benchmark's schema (best effort: a leftover schema only takes space).
async fn drop_schema(url: &str, schema: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(url).await {
        let _ = sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut conn)
            .await;
    }
}

/// Reads the whole store in pages, as a projection catching up does.
async fn read_everything(store: &dyn EventRepository) -> usize {
    let mut after = 0;
    let mut read = 0;
    loop {
        let page = store.read_all(after, PAGE).await.expect("read_all");
        let Some(last) = page.last() else {
            return read;
        };
        after = last.position;
        read += page.len();
    }
}

/// A fresh SQLite file (`temp_sqlite(name)`) holding the `READ_EVENTS` of 1 account in 10.
fn filled_sqlite(rt: &Runtime, name: &str) -> (std::path::PathBuf, SqliteEventRepository) {
    let path = temp_sqlite(name);
    let store = rt.block_on(async {
        let store = SqliteEventRepository::open(&path)
            .await
            .expect("open sqlite");
        fill(&store, READ_EVENTS / 10, 10)
            .await
            .expect("fill sqlite");
        store
    });
    (path, store)
}

/// A fresh schema on the server at `url` holding the same events; drop it with
/// `drop_schema`.
fn filled_postgres(rt: &Runtime, url: &str) -> (String, PostgresEventRepository) {
    let schema = format!("cqrs_bench_{}", Uuid::new_v4().simple());
    let store = rt.block_on(async {
        let store = PostgresEventRepository::connect(url)
            .await
            .expect("connect postgres")
            .with_schema(&schema)
            .expect("schema name");
        store.migrate().await.expect("migrate postgres");
        fill(&store, READ_EVENTS / 10, 10)
            .await
            .expect("fill postgres");
        store
    });
    (schema, store)
}

fn catch_up_read(c: &mut Criterion) {
    let rt = rt();
    let mut group = short(c, "catch_up_read_all");
    group.throughput(Throughput::Elements(READ_EVENTS as u64));
    let memory = MemoryEventRepository::new();
    rt.block_on(fill(&memory, READ_EVENTS / 10, 10))
        .expect("fill memory");
    group.bench_function("memory", |b| {
        b.to_async(&rt).iter(|| read_everything(&memory));
    });
    let (path, sqlite) = filled_sqlite(&rt, "read");
    group.bench_function("sqlite", |b| {
        b.to_async(&rt).iter(|| read_everything(&sqlite));
    });
    if let Some(url) = postgres_url() {
        let (schema, postgres) = filled_postgres(&rt, &url);
        group.bench_function("postgres", |b| {
            b.to_async(&rt).iter(|| read_everything(&postgres));
        });
        rt.block_on(drop_schema(&url, &schema));
    }
    group.finish();
    drop(sqlite);
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    remove_sqlite(&path);
}

fn projection(c: &mut Criterion) {
    let rt = rt();
    let mut group = short(c, "projection_catch_up");
    group.throughput(Throughput::Elements(READ_EVENTS as u64));
    let store = MemoryEventRepository::new();
    rt.block_on(fill(&store, READ_EVENTS / 10, 10))
        .expect("fill memory");
    group.bench_function("memory_balance_view", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let store = store.clone();
            async move {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let projection = Projection::<BankAccount, BalanceView>::new(
                        store.clone(),
                        MemoryViewRepository::<BalanceView>::new(),
                    );
                    let start = Instant::now();
                    let position = projection.catch_up().await.expect("catch up");
                    measured += start.elapsed();
                    assert_eq!(position, READ_EVENTS as i64);
                }
                measured
            }
        });
    });
    // The SQL view stores, each as it is (`load_many_for_update`: one query per load) and
    // behind `RowByRow` (one query per row, the trait's default), alternating in one run.
    let (path, sqlite) = filled_sqlite(&rt, "project");
    let views = sqlite.views::<BalanceView>();
    bench_sql_catch_up(&mut group, &rt, "sqlite", &sqlite, &views);
    if let Some(url) = postgres_url() {
        let (schema, postgres) = filled_postgres(&rt, &url);
        let views = postgres.views::<BalanceView>();
        bench_sql_catch_up(&mut group, &rt, "postgres", &postgres, &views);
        rt.block_on(drop_schema(&url, &schema));
    }
    group.finish();
    drop(sqlite);
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    remove_sqlite(&path);
}

/// Catch-up of the balance view on a SQL store: `{store}_balance_view` with the store's own
/// view repository, `{store}_balance_view_row_by_row` with every row loaded on its own.
/// Each iteration is a projection of a new name over the same view rows (so after the
/// first, every batch updates existing rows).
fn bench_sql_catch_up<S, R>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    store_name: &str,
    store: &S,
    views: &R,
) where
    S: EventRepository + Clone + 'static,
    R: ViewRepository<BankAccount, BalanceView> + Clone + 'static,
{
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for row_by_row in [false, true] {
        let name = if row_by_row {
            format!("{store_name}_balance_view_row_by_row")
        } else {
            format!("{store_name}_balance_view")
        };
        group.bench_function(name, |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (store, views, runs) = (store.clone(), views.clone(), Arc::clone(&runs));
                async move {
                    let mut measured = Duration::ZERO;
                    for _ in 0..iters {
                        let run = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let views: Arc<dyn ViewRepository<BankAccount, BalanceView>> = if row_by_row
                        {
                            Arc::new(RowByRow(views.clone()))
                        } else {
                            Arc::new(views.clone())
                        };
                        let projection =
                            Projection::<BankAccount, BalanceView>::new(store.clone(), views)
                                .with_name(format!("bench_catch_up_{run}"));
                        let start = Instant::now();
                        let position = projection.catch_up().await.expect("catch up");
                        measured += start.elapsed();
                        assert_eq!(position, READ_EVENTS as i64);
                    }
                    measured
                }
            });
        });
    }
}

/// A view repository that loads every row with its own `load_for_update` (the trait's
/// default `load_many_for_update`): the baseline of the batched loads.
#[derive(Clone)]
struct RowByRow<R>(R);

#[cqrs::async_trait]
impl<R> ViewRepository<BankAccount, BalanceView> for RowByRow<R>
where
    R: ViewRepository<BankAccount, BalanceView>,
{
    async fn load(&self, view_id: &str) -> Result<Option<BalanceView>, CQRSError> {
        self.0.load(view_id).await
    }
    async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, BalanceView)>, CQRSError> {
        self.0.list(after, limit).await
    }
    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<BalanceView>, CQRSError> {
        self.0.load_for_update(view_id).await
    }
    async fn commit(
        &self,
        changes: Vec<ViewContext<BalanceView>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        self.0.commit(changes, checkpoint).await
    }
    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        self.0.checkpoint(name).await
    }
}

fn decode(c: &mut Criterion) {
    let mut group = short(c, "decode_per_event");
    group.throughput(Throughput::Elements(1));
    let id = Uuid::new_v4();
    let events: Vec<PersistableDomainEvent> = history(id, 2).expect("history");
    for (name, event) in [("opened", &events[0]), ("deposited", &events[1])] {
        group.bench_function(BenchmarkId::new("try_from_persisted", name), |b| {
            b.iter(|| BankEvent::try_from_persisted(std::hint::black_box(event)).expect("decode"));
        });
    }
    // A deposit stored before `MoneyDeposited` version 2: decoding it runs the upcast step.
    let mut stored_v1 = events[1].clone();
    stored_v1.event_version = "1".into();
    stored_v1.payload = serde_json::json!({ "Deposited": { "amount": AMOUNT } }).into();
    group.bench_function(
        BenchmarkId::new("try_from_persisted", "deposited_v1_upcast"),
        |b| {
            b.iter(|| {
                BankEvent::try_from_persisted(std::hint::black_box(&stored_v1)).expect("upcast")
            });
        },
    );
    group.bench_function(BenchmarkId::new("envelope", "deposited"), |b| {
        b.iter(|| {
            std::hint::black_box(&events[1])
                .decode::<BankEvent>()
                .expect("decode")
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    memory_dispatch,
    exactly_once,
    stream_length,
    sqlite_dispatch,
    postgres_dispatch,
    catch_up_read,
    projection,
    decode
);
criterion_main!(benches);
