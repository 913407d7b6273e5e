//! The service under load: `POST /orders` over HTTP (reqwest over loopback, keep-alive)
//! against the framework's own `dispatch_new` of the same command on the same kind of store,
//! at the same concurrency, in the same process, alternating.
//!
//! ```text
//! cargo bench -p cqrs-service                                   # SQLite; PostgreSQL too with the URL
//! CQRS_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench -p cqrs-service
//! ```
//!
//! Each configuration (store × concurrency) runs `LOAD_ROUNDS` rounds; a round runs each
//! side once, in order:
//!
//! * `direct`: `CQRSFramework::<Order>::dispatch_new` on a store of its own, built as the
//!   service builds its framework (same store type, same retry policy);
//! * `direct+view`: the same on a third store while the service's projection of the order
//!   view follows it, as it follows the service's store;
//! * `http`: `POST /orders` to the service;
//! * `http+key`: the same with a fresh `Idempotency-Key` on every request;
//! * `bare`: `POST /orders` to an axum route that answers a fixed `201`, the cost of HTTP
//!   alone on the machine: the most `http` could reach with a service that did nothing. When
//!   it is under the goal itself, the `http` line says so.
//!
//! Each run is closed-loop (every client sends its next request when the previous one is
//! answered) for `LOAD_SECS` seconds after a warm-up of a quarter of that, and the next run
//! starts once the view has caught up and the machine has gone quiet (under 30% busy for
//! 100 ms, waited for at most 2 s; a run that started on a busy machine says so). The figures are the medians over the rounds; a ratio
//! is the median of the rounds' ratios. Any answer that is not `2xx`, and any dispatch
//! error, is an error: they are counted, the first is printed, and the program exits with a
//! failure.
//!
//! Run without `--bench` (as `cargo test --all-targets` runs it), it prints a line and
//! exits.
//!
//! Variables: `LOAD_SECS` (2), `LOAD_ROUNDS` (3), `LOAD_CLIENTS` (`8,64`), `LOAD_BACKENDS`
//! (`sqlite,postgres`), `LOAD_SIDES` (`direct,direct+view,http,http+key,bare`; `direct` first),
//! `CQRS_POSTGRES_URL` (unset: PostgreSQL is skipped with a note). The method and the
//! figures are in `docs/benchmarks.md`.

/// The service's own allocator (as its binaries use), for both sides.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cqrs::sqlx::{self, Connection};
use cqrs::{
    CQRSFramework, PostgresEventRepository, Projection, ProjectionHandle, RetryPolicy,
    SqliteEventRepository,
};
use cqrs_service::{
    Config, Database, Order, OrderAction, OrderCommand, OrderLine, OrderSummary, Service,
    CONSISTENCY_TOKEN, IDEMPOTENCY_KEY,
};
use reqwest::{header, Client};
use tokio::sync::oneshot;
use uuid::Uuid;

const POSTGRES_VAR: &str = "CQRS_POSTGRES_URL";
/// The goal: HTTP at no less than this share of the direct dispatch rate.
const GOAL: f64 = 0.67;
/// The body of every `POST /orders`: the command the direct side dispatches too.
const PLACE_BODY: &str =
    r#"{"customer":"load","lines":[{"sku":"book","quantity":2,"unit_price_cents":500}]}"#;
/// How long the view may take to catch up with a run before the next run starts anyway.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);

/// What the environment asks for.
#[derive(Debug, Clone)]
struct Settings {
    secs: Duration,
    rounds: usize,
    clients: Vec<usize>,
    backends: Vec<String>,
    sides: Vec<Side>,
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        fn var(name: &str, default: &str) -> String {
            std::env::var(name).unwrap_or_else(|_| default.to_owned())
        }
        let secs: f64 = var("LOAD_SECS", "2")
            .trim()
            .parse()
            .map_err(|e| format!("LOAD_SECS: {e}"))?;
        if !(secs.is_finite() && secs > 0.0) {
            return Err("LOAD_SECS must be a positive number of seconds".to_owned());
        }
        let rounds: usize = var("LOAD_ROUNDS", "3")
            .trim()
            .parse()
            .map_err(|e| format!("LOAD_ROUNDS: {e}"))?;
        if rounds == 0 {
            return Err("LOAD_ROUNDS must be at least 1".to_owned());
        }
        let clients = var("LOAD_CLIENTS", "8,64")
            .split(',')
            .map(|n| {
                n.trim()
                    .parse::<usize>()
                    .map_err(|e| format!("LOAD_CLIENTS: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if clients.contains(&0) {
            return Err("LOAD_CLIENTS: a concurrency is at least 1".to_owned());
        }
        let backends: Vec<String> = var("LOAD_BACKENDS", "sqlite,postgres")
            .split(',')
            .map(|b| b.trim().to_ascii_lowercase())
            .collect();
        if let Some(other) = backends
            .iter()
            .find(|b| !matches!(b.as_str(), "sqlite" | "postgres"))
        {
            return Err(format!("LOAD_BACKENDS: unknown backend {other:?}"));
        }
        let sides = var("LOAD_SIDES", "direct,direct+view,http,http+key,bare")
            .split(',')
            .map(|name| {
                Side::parse(name.trim()).ok_or_else(|| format!("LOAD_SIDES: unknown side {name:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if sides.first() != Some(&Side::Direct) {
            return Err("LOAD_SIDES: the first side is `direct`, the ratios' base".to_owned());
        }
        Ok(Settings {
            secs: Duration::from_secs_f64(secs),
            rounds,
            clients,
            backends,
            sides,
        })
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this target without it,
    // and must not spend minutes here.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("load: skipped (run it with `cargo bench -p cqrs-service`)");
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("load: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("load: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(errors) => {
            println!("FAILED: {errors} requests or dispatches were errors");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("load: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every configuration; the number of errors seen.
async fn run(settings: Settings) -> Result<u64, String> {
    let started = Instant::now();
    println!(
        "load: POST /orders against dispatch_new, {} s per run after {} ms warm-up, {} rounds, \
         clients {:?}, {} worker threads",
        settings.secs.as_secs_f64(),
        warm_up(&settings).as_millis(),
        settings.rounds,
        settings.clients,
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    let mut errors = 0;
    let mut summaries = Vec::new();
    for backend in &settings.backends {
        let kind = match backend.as_str() {
            "postgres" => match std::env::var(POSTGRES_VAR) {
                Ok(url) if !url.trim().is_empty() => Kind::Postgres(url),
                _ => {
                    println!(
                        "skip postgres: set {POSTGRES_VAR}=postgres://postgres@127.0.0.1:5432/test \
                         to measure it"
                    );
                    continue;
                }
            },
            _ => Kind::Sqlite,
        };
        // The databases made so far are removed even when the start fails halfway.
        let mut cleanup = Vec::new();
        let started = Target::start(&kind, &settings.sides, &mut cleanup).await;
        let outcome = match started {
            Ok(target) => {
                let outcome = measure(&settings, &kind, &target).await;
                target.stop().await;
                Ok(outcome)
            }
            Err(error) => Err(error),
        };
        remove_databases(cleanup).await;
        let (backend_errors, backend_summaries) = outcome?;
        errors += backend_errors;
        summaries.extend(backend_summaries);
    }
    println!();
    for line in &summaries {
        println!("{line}");
    }
    println!("load: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(errors)
}

fn warm_up(settings: &Settings) -> Duration {
    settings.secs / 4
}

/// The store's kind.
#[derive(Debug, Clone)]
enum Kind {
    Sqlite,
    Postgres(String),
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Sqlite => "sqlite",
            Kind::Postgres(_) => "postgres",
        }
    }
}

/// What a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `CQRSFramework::dispatch_new` on a store of the same kind.
    Direct,
    /// `POST /orders`.
    Http,
    /// `POST /orders` with a fresh `Idempotency-Key` each.
    Keyed,
    /// `dispatch_new` on a store of the same kind while the service's projection keeps the
    /// order view of it, as in the service.
    DirectView,
    /// `POST /orders` to an axum route that reads the body and answers a fixed `201`: the
    /// cost of HTTP alone on this machine.
    Bare,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Direct => "direct",
            Side::Http => "http",
            Side::Keyed => "http+key",
            Side::DirectView => "direct+view",
            Side::Bare => "bare",
        }
    }

    /// The name as it appears in a `ratio` line.
    fn label(self) -> String {
        self.name().replace('+', "_")
    }

    fn parse(name: &str) -> Option<Side> {
        [
            Side::Direct,
            Side::Http,
            Side::Keyed,
            Side::DirectView,
            Side::Bare,
        ]
        .into_iter()
        .find(|side| side.name() == name)
    }
}

/// The service on one database, the direct framework on another of the same kind, and what
/// the other sides need.
struct Target {
    service: Service,
    base: String,
    client: Client,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    direct: Arc<CQRSFramework<Order>>,
    /// For [`Side::DirectView`]: a framework on a third database, with the order view's
    /// projection running on it.
    viewed: Option<(Arc<CQRSFramework<Order>>, ProjectionHandle)>,
    /// For [`Side::Bare`]: the base URL of the fixed route, and its server.
    bare: Option<(String, oneshot::Sender<()>)>,
}

/// A database to remove at the end.
enum Cleanup {
    File(PathBuf),
    Schema { url: String, schema: String },
}

/// The response of the bare route: about the size of the service's answer to a place.
const BARE_RESPONSE: &str = r#"{"order_id":"00000000-0000-0000-0000-000000000000","sequence":1,"position":1,"events":[{"type":"Placed","customer":"load","lines":[{"sku":"book","quantity":2,"unit_price_cents":500}],"total_cents":1000}]}"#;

impl Target {
    /// Opens the databases (each recorded in `cleanup` as soon as it is named) and starts
    /// the service.
    async fn start(
        kind: &Kind,
        sides: &[Side],
        cleanup: &mut Vec<Cleanup>,
    ) -> Result<Target, String> {
        let (direct, _) = direct_framework(kind, false, cleanup).await?;
        let viewed = if sides.contains(&Side::DirectView) {
            let (framework, projection) = direct_framework(kind, true, cleanup).await?;
            projection.map(|projection| (Arc::new(framework), projection))
        } else {
            None
        };
        let database = match kind {
            Kind::Sqlite => {
                let file = std::env::temp_dir()
                    .join(format!("cqrs-load-service-{}.sqlite", Uuid::new_v4()));
                cleanup.push(Cleanup::File(file.clone()));
                Database::Sqlite(file)
            }
            Kind::Postgres(url) => {
                let schema = format!("load_{}", Uuid::new_v4().simple());
                cleanup.push(Cleanup::Schema {
                    url: url.clone(),
                    schema: schema.clone(),
                });
                Database::Postgres {
                    url: url.clone(),
                    schema: Some(schema),
                }
            }
        };
        let service = Service::start(Config::new(database))
            .await
            .map_err(|e| format!("start the service: {e}"))?;
        let (base, stop, served) = serve_router(service.router(), Some(service.clone())).await?;
        let bare = if sides.contains(&Side::Bare) {
            let router = axum::Router::new().route(
                "/orders",
                axum::routing::post(|_body: axum::body::Bytes| async {
                    (
                        axum::http::StatusCode::CREATED,
                        [(header::CONTENT_TYPE, "application/json")],
                        BARE_RESPONSE,
                    )
                }),
            );
            let (base, stop, _served) = serve_router(router, None).await?;
            Some((base, stop))
        } else {
            None
        };
        let client = Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .build()
            .map_err(|e| format!("build the client: {e}"))?;
        Ok(Target {
            service,
            base,
            client,
            stop,
            served,
            direct: Arc::new(direct),
            viewed,
            bare,
        })
    }

    /// Stops the service, the bare route and the direct side's projection.
    async fn stop(self) {
        let _ = self.stop.send(());
        match self.served.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => println!("note: the service stopped with {error}"),
            Err(error) => println!("note: the service's task failed: {error}"),
        }
        if let Some((_, stop)) = self.bare {
            let _ = stop.send(());
        }
        if let Some((framework, projection)) = self.viewed {
            projection.stop();
            drop(framework);
        }
        drop(self.direct);
    }
}

/// Removes the databases of a backend's run.
async fn remove_databases(cleanup: Vec<Cleanup>) {
    for cleanup in cleanup {
        match cleanup {
            Cleanup::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Cleanup::Schema { url, schema } => {
                let dropped = async {
                    let mut connection = sqlx::PgConnection::connect(&url).await?;
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut connection)
                        .await
                };
                if let Err(error) = dropped.await {
                    println!("note: could not drop the schema {schema}: {error}");
                }
            }
        }
    }
}

/// Serves `router` on an ephemeral loopback port (through [`cqrs_service::serve`] when it is
/// the service's): its base URL, the sender that stops it, and its task.
async fn serve_router(
    router: axum::Router,
    service: Option<Service>,
) -> Result<
    (
        String,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ),
    String,
> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let base = format!(
        "http://{}",
        listener.local_addr().map_err(|e| format!("bind: {e}"))?
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = async {
        let _ = stopped.await;
    };
    let served = match service {
        Some(service) => tokio::spawn(cqrs_service::serve(listener, service, stopped)),
        None => tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await
        }),
    };
    Ok((base, stop, served))
}

/// A framework as the service builds it (the same retry policy) on a new database of
/// `kind`, and, with `view`, the service's projection of the order view started on it.
async fn direct_framework(
    kind: &Kind,
    view: bool,
    cleanup: &mut Vec<Cleanup>,
) -> Result<(CQRSFramework<Order>, Option<ProjectionHandle>), String> {
    let retry = RetryPolicy::attempts(Config::new(Database::Sqlite(PathBuf::new())).retry_attempts);
    match kind {
        Kind::Sqlite => {
            let file =
                std::env::temp_dir().join(format!("cqrs-load-direct-{}.sqlite", Uuid::new_v4()));
            cleanup.push(Cleanup::File(file.clone()));
            let store = SqliteEventRepository::open(&file)
                .await
                .map_err(|e| format!("open {}: {e}", file.display()))?;
            let projection = view.then(|| {
                // As the service runs it on SQLite: one view load at a time.
                Projection::<Order, OrderSummary>::new(store.clone(), store.views::<OrderSummary>())
                    .with_load_concurrency(1)
                    .start()
            });
            Ok((
                CQRSFramework::<Order>::new(store).with_retry(retry),
                projection,
            ))
        }
        Kind::Postgres(url) => {
            let schema = format!("load_{}", Uuid::new_v4().simple());
            cleanup.push(Cleanup::Schema {
                url: url.clone(),
                schema: schema.clone(),
            });
            let store = PostgresEventRepository::connect(url)
                .await
                .and_then(|store| store.with_schema(&schema))
                .map_err(|e| format!("connect to PostgreSQL: {e}"))?;
            store
                .migrate()
                .await
                .map_err(|e| format!("migrate {schema}: {e}"))?;
            let projection = view.then(|| {
                Projection::<Order, OrderSummary>::new(store.clone(), store.views::<OrderSummary>())
                    .start()
            });
            Ok((
                CQRSFramework::<Order>::new(store).with_retry(retry),
                projection,
            ))
        }
    }
}

/// The command of every direct dispatch: the body of [`PLACE_BODY`].
fn place_command() -> OrderCommand {
    OrderCommand::new(OrderAction::Place {
        customer: "load".to_owned(),
        lines: vec![OrderLine {
            sku: "book".to_owned(),
            quantity: 2,
            unit_price_cents: 500,
        }],
    })
}

/// One run's figures.
#[derive(Debug, Clone)]
struct RunStats {
    /// Successful operations per second in the measured window.
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// The process's CPU time (user and system, every thread: server and client) over the
    /// run, per successful operation.
    cpu_per_op: Duration,
    /// The share of the machine's CPU time (every core, every process: the database server
    /// too) that was busy during the run.
    machine_busy: f64,
    /// Operations that failed, warm-up included.
    errors: u64,
    /// The first failure, described.
    first_error: Option<String>,
    /// The highest global position an operation reported.
    last_position: i64,
}

impl RunStats {
    /// A run that could not start.
    fn failed(why: &str) -> RunStats {
        RunStats {
            rate: 0.0,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            cpu_per_op: Duration::ZERO,
            machine_busy: 0.0,
            errors: 1,
            first_error: Some(why.to_owned()),
            last_position: 0,
        }
    }
}

/// Runs `op` from `clients` tasks, each in a closed loop, for the warm-up and the window.
async fn drive<F, Fut>(clients: usize, warm: Duration, window: Duration, op: F) -> RunStats
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<i64>, String>> + Send,
{
    let start = Instant::now();
    let cpu_before = cpu_time();
    let machine_before = machine_ticks();
    let measured_from = start + warm;
    let end = measured_from + window;
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let last_position = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let op = op.clone();
        let errors = Arc::clone(&errors);
        let first_error = Arc::clone(&first_error);
        let last_position = Arc::clone(&last_position);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let outcome = op().await;
                let done = Instant::now();
                match outcome {
                    Ok(position) => {
                        if let Some(position) = position {
                            last_position.fetch_max(position, Ordering::Relaxed);
                        }
                        if done >= measured_from && done <= end {
                            latencies.push(done - sent);
                        }
                    }
                    Err(error) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let mut first = first_error
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        first.get_or_insert(error);
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        match task.await {
            Ok(mine) => latencies.extend(mine),
            Err(error) => {
                errors.fetch_add(1, Ordering::Relaxed);
                let mut first = first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                first.get_or_insert(format!("a client task failed: {error}"));
            }
        }
    }
    let cpu = cpu_time().saturating_sub(cpu_before);
    let machine_busy = match (machine_before, machine_ticks()) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            (busy1.saturating_sub(busy0)) as f64 / (total1 - total0) as f64
        }
        _ => 0.0,
    };
    let ops = latencies.len();
    // Operations over the whole run (warm-up included) share the CPU time measured.
    let all_ops = (ops as f64 * (warm + window).as_secs_f64() / window.as_secs_f64()).max(1.0);
    latencies.sort_unstable();
    let first_error = first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    RunStats {
        rate: latencies.len() as f64 / window.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        cpu_per_op: cpu.div_f64(all_ops),
        machine_busy,
        errors: errors.load(Ordering::Relaxed),
        first_error,
        last_position: last_position.load(Ordering::Relaxed),
    }
}

/// The CPU time this process has used (user and system, all threads), from
/// `/proc/self/stat`; zero where that cannot be read.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // The fields after the command name (which may hold spaces) start after its `)`.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // The kernel reports in USER_HZ, 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// The machine's busy and total CPU ticks since boot, from the first line of `/proc/stat`;
/// `None` where that cannot be read.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total.saturating_sub(idle), total))
}

/// The `q` quantile of sorted values (nearest rank), zero when there are none.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One run of `side` at `clients` concurrency.
async fn run_side(target: &Target, side: Side, clients: usize, settings: &Settings) -> RunStats {
    let warm = warm_up(settings);
    match side {
        Side::Direct => {
            let framework = Arc::clone(&target.direct);
            drive(clients, warm, settings.secs, move || {
                let framework = Arc::clone(&framework);
                async move {
                    // A time-ordered id, as the service gives a new order.
                    framework
                        .dispatch_new(Uuid::now_v7(), place_command())
                        .await
                        .map(|receipt| receipt.positions.last().copied())
                        .map_err(|e| format!("dispatch_new: {e}"))
                }
            })
            .await
        }
        Side::DirectView => {
            let Some((framework, _)) = &target.viewed else {
                return RunStats::failed("the direct+view store was not opened");
            };
            let framework = Arc::clone(framework);
            drive(clients, warm, settings.secs, move || {
                let framework = Arc::clone(&framework);
                async move {
                    // A time-ordered id, as the service gives a new order.
                    framework
                        .dispatch_new(Uuid::now_v7(), place_command())
                        .await
                        .map(|receipt| receipt.positions.last().copied())
                        .map_err(|e| format!("dispatch_new: {e}"))
                }
            })
            .await
        }
        Side::Http | Side::Keyed | Side::Bare => {
            let client = target.client.clone();
            let base = match (side, &target.bare) {
                (Side::Bare, Some((base, _))) => base,
                (Side::Bare, None) => return RunStats::failed("the bare route was not served"),
                _ => &target.base,
            };
            let url = Arc::new(format!("{base}/orders"));
            let keyed = side == Side::Keyed;
            drive(clients, warm, settings.secs, move || {
                let client = client.clone();
                let url = Arc::clone(&url);
                async move { post_order(&client, &url, keyed).await }
            })
            .await
        }
    }
}

/// `POST /orders`; its consistency token, or what went wrong (a status that is not `2xx`
/// is an error).
async fn post_order(client: &Client, url: &str, keyed: bool) -> Result<Option<i64>, String> {
    let mut request = client
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(PLACE_BODY);
    if keyed {
        request = request.header(IDEMPOTENCY_KEY, Uuid::new_v4().to_string());
    }
    let response = request.send().await.map_err(|e| format!("send: {e}"))?;
    let status = response.status();
    let position = response
        .headers()
        .get(CONSISTENCY_TOKEN)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<i64>().ok());
    // The body is read, as a client would, so the connection is reused.
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("read the body: {e}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(position)
}

/// The service's `cqrs_service_append_seconds` sum and count, from `GET /metrics`; `None`
/// when they cannot be read.
async fn append_totals(target: &Target) -> Option<(f64, f64)> {
    let text = target
        .client
        .get(format!("{}/metrics", target.base))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| {
        text.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
    };
    Some((
        value("cqrs_service_append_seconds_sum")?,
        value("cqrs_service_append_seconds_count")?,
    ))
}

/// Waits until the service's view has applied `position`; how long that took, `None` if it
/// did not within [`CATCH_UP_LIMIT`].
async fn catch_up(view_position: impl Fn() -> i64, position: i64) -> Option<Duration> {
    let started = Instant::now();
    while view_position() < position {
        if started.elapsed() >= CATCH_UP_LIMIT {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Some(started.elapsed())
}

/// The longest a run waits for the machine to go quiet before it starts.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// Waits, at most [`SETTLE_LIMIT`], until the machine was under 30% busy for 100 ms: the
/// work a run leaves behind (the database server's vacuum or checkpoint after the keyed
/// side's writes, a view catching up) then does not count against the next run. How long
/// that took, `None` if the machine stayed busier (another process's load).
async fn settle() -> Option<Duration> {
    let started = Instant::now();
    let mut before = machine_ticks()?;
    while started.elapsed() < SETTLE_LIMIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = machine_ticks()?;
        let (busy, total) = (after.0 - before.0, after.1 - before.1);
        if total > 0 && busy * 10 < total * 3 {
            return Some(started.elapsed());
        }
        before = after;
    }
    None
}

/// Every configuration on one backend: the errors seen and the summary lines.
async fn measure(settings: &Settings, kind: &Kind, target: &Target) -> (u64, Vec<String>) {
    let sides = &settings.sides;
    let mut errors = 0;
    let mut summaries = Vec::new();
    for &clients in &settings.clients {
        let mut runs: Vec<Vec<RunStats>> = vec![Vec::new(); sides.len()];
        for round in 1..=settings.rounds {
            for (i, &side) in sides.iter().enumerate() {
                let settled = settle().await;
                let appends_before = append_totals(target).await;
                let stats = run_side(target, side, clients, settings).await;
                let appends_after = append_totals(target).await;
                let mut line = format!(
                    "{} c={clients:<3} round {round} {:<11} {:>7.0} /s  p50 {:>6.2} ms  p99 {:>6.2} ms  cpu {:>4.0} µs/op  busy {:>3.0}%  errors {}",
                    kind.name(),
                    side.name(),
                    stats.rate,
                    ms(stats.p50),
                    ms(stats.p99),
                    stats.cpu_per_op.as_secs_f64() * 1e6,
                    stats.machine_busy * 100.0,
                    stats.errors,
                );
                if let (Side::Http | Side::Keyed, Some((sum0, n0)), Some((sum1, n1))) =
                    (side, appends_before, appends_after)
                {
                    if n1 > n0 {
                        line.push_str(&format!(
                            "  (append {:.2} ms mean)",
                            (sum1 - sum0) / (n1 - n0) * 1000.0
                        ));
                    }
                }
                // The view catches up before the next run, so it takes no CPU from it.
                let caught_up = match (side, &target.viewed) {
                    (Side::Direct | Side::Bare, _) => None,
                    (Side::DirectView, Some((_, projection))) => {
                        Some(catch_up(|| projection.position(), stats.last_position).await)
                    }
                    (Side::DirectView, None) => None,
                    (Side::Http | Side::Keyed, _) => {
                        Some(catch_up(|| target.service.view_position(), stats.last_position).await)
                    }
                };
                if let Some(caught_up) = caught_up {
                    match caught_up {
                        Some(took) => {
                            line.push_str(&format!("  (view caught up {:.0} ms after)", ms(took)))
                        }
                        None => line.push_str("  (view still behind after 30 s)"),
                    }
                }
                if settled.is_none() {
                    line.push_str("  (started on a busy machine)");
                }
                println!("{line}");
                if let Some(error) = &stats.first_error {
                    println!("  first error: {error}");
                }
                errors += stats.errors;
                runs[i].push(stats);
            }
        }
        let direct = &runs[0];
        let viewed = sides
            .iter()
            .position(|&side| side == Side::DirectView)
            .map(|i| &runs[i]);
        let floor = sides
            .iter()
            .position(|&side| side == Side::Bare)
            .map(|i| ratio_of(&runs[i], direct));
        for (i, &side) in sides.iter().enumerate() {
            let mine = &runs[i];
            let mut line = format!(
                "{} {clients:>2} clients {:<11} {:>7.0} /s  p50 {:>6.2} ms  p99 {:>6.2} ms  cpu {:>4.0} µs/op  busy {:>3.0}%  errors {}",
                kind.name(),
                side.name(),
                median(mine.iter().map(|s| s.rate)),
                median(mine.iter().map(|s| ms(s.p50))),
                median(mine.iter().map(|s| ms(s.p99))),
                median(mine.iter().map(|s| s.cpu_per_op.as_secs_f64() * 1e6)),
                median(mine.iter().map(|s| s.machine_busy * 100.0)),
                mine.iter().map(|s| s.errors).sum::<u64>(),
            );
            let mut ratios = Vec::new();
            if side != Side::Direct {
                let ratio = ratio_of(mine, direct);
                line.push_str(&format!("  {ratio:.2} of direct"));
                if side == Side::Http {
                    line.push_str(match (ratio >= GOAL, floor) {
                        (true, _) => " (goal >= 0.67: met)".to_owned(),
                        (false, Some(floor)) if floor < GOAL => format!(
                            " (goal >= 0.67: missed, and under HTTP's own floor here: bare is {floor:.2} of direct)"
                        ),
                        (false, _) => " (goal >= 0.67: missed)".to_owned(),
                    }.as_str());
                }
                ratios.push(format!(
                    "ratio load_{}_{clients}_{}_vs_direct {ratio:.2}",
                    kind.name(),
                    side.label(),
                ));
            }
            if let (Side::Http | Side::Keyed, Some(viewed)) = (side, viewed) {
                let ratio = ratio_of(mine, viewed);
                line.push_str(&format!(", {ratio:.2} of direct+view"));
                ratios.push(format!(
                    "ratio load_{}_{clients}_{}_vs_direct_view {ratio:.2}",
                    kind.name(),
                    side.label(),
                ));
            }
            summaries.push(line);
            summaries.extend(ratios);
        }
    }
    (errors, summaries)
}

/// The median of the rounds' ratios of `runs` to `base` (run `i` against run `i`).
fn ratio_of(runs: &[RunStats], base: &[RunStats]) -> f64 {
    median(runs.iter().zip(base).map(|(run, base)| {
        if base.rate > 0.0 {
            run.rate / base.rate
        } else {
            0.0
        }
    }))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The median (the mean of the middle two for an even count), 0 when empty.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}
