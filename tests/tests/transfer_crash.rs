//! The transfer saga under crashes, on SQLite and PostgreSQL: 1,000 transfers among 50
//! accounts (some closed) are requested by concurrent clients while the saga's runner, a
//! process of its own, is SIGKILLed at random moments at least 5 times and started again.
//! Afterwards the sum of the balances is unchanged, every transfer is completed, failed or
//! reversed with the events that outcome implies, and no command caused events twice.
//!
//! The runner process is this test binary run again with `--ignored` on
//! `crash_child_runner`, which reads where its store is from an environment variable.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::{
    CQRSFramework, CommandContext, EventRepository, PersistableDomainEvent, ProcessRunner,
    ProcessStore, RetryPolicy,
};
use cqrs_examples::transfer::{
    Account, AccountCommand, Transfer, TransferCommand, TransferRouter, TransferSaga,
    TransferStatus,
};
use tokio::process::{Child, Command};
use uuid::Uuid;

const ACCOUNTS: usize = 50;
const CLOSED: usize = 5;
const INITIAL: u64 = 1_000;
const TRANSFERS: usize = 1_000;
const CLIENTS: usize = 8;
const KILLS: usize = 5;

/// Where the child runner finds its store: `sqlite:PATH` or `postgres:SCHEMA:URL`.
const TARGET_VAR: &str = "CQRS_TRANSFER_CRASH_TARGET";

#[derive(Clone)]
enum Target {
    Sqlite(PathBuf),
    Postgres { url: String, schema: String },
}

impl Target {
    fn encode(&self) -> String {
        match self {
            Target::Sqlite(path) => format!("sqlite:{}", path.display()),
            Target::Postgres { url, schema } => format!("postgres:{schema}:{url}"),
        }
    }

    fn decode(text: &str) -> Option<Target> {
        if let Some(path) = text.strip_prefix("sqlite:") {
            return Some(Target::Sqlite(PathBuf::from(path)));
        }
        let rest = text.strip_prefix("postgres:")?;
        let (schema, url) = rest.split_once(':')?;
        Some(Target::Postgres {
            url: url.to_owned(),
            schema: schema.to_owned(),
        })
    }

    async fn open(&self) -> (Arc<dyn EventRepository>, Arc<dyn ProcessStore>) {
        match self {
            Target::Sqlite(path) => {
                let store = cqrs::SqliteEventRepository::open(path)
                    .await
                    .expect("open the SQLite store");
                let processes = cqrs::SqliteProcessStore::new(&store);
                (Arc::new(store), Arc::new(processes))
            }
            Target::Postgres { url, schema } => {
                let store = cqrs::PostgresEventRepository::connect(url)
                    .await
                    .expect("connect to PostgreSQL")
                    .with_schema(schema)
                    .expect("the test schema");
                store.migrate().await.expect("migrate");
                let processes = cqrs::PostgresProcessStore::new(&store);
                (Arc::new(store), Arc::new(processes))
            }
        }
    }

    async fn remove(&self) {
        match self {
            Target::Sqlite(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Target::Postgres { url, schema } => {
                use cqrs::sqlx::Connection;
                if let Ok(mut connection) = cqrs::sqlx::PgConnection::connect(url).await {
                    let _ = cqrs::sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut connection)
                        .await;
                }
            }
        }
    }
}

fn router(events: &Arc<dyn EventRepository>) -> TransferRouter {
    let retry = RetryPolicy::attempts(50);
    TransferRouter {
        accounts: Arc::new(CQRSFramework::<Account>::new(Arc::clone(events)).with_retry(retry)),
        transfers: Arc::new(CQRSFramework::<Transfer>::new(Arc::clone(events)).with_retry(retry)),
    }
}

/// The saga's runner process: runs until it is killed. Started by the crash tests with the
/// store in `CQRS_TRANSFER_CRASH_TARGET`; without it, it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the runner process of the crash tests, which start it themselves"]
async fn crash_child_runner() {
    let Some(target) = std::env::var(TARGET_VAR)
        .ok()
        .and_then(|t| Target::decode(&t))
    else {
        return;
    };
    let (events, processes) = target.open().await;
    let runner = ProcessRunner::new(
        TransferSaga,
        Arc::clone(&events),
        processes,
        router(&events),
    )
    .with_poll_interval(Duration::from_millis(20));
    // Runs until killed; a store error ends the process with the error (and the parent's
    // next start goes on).
    if let Err(error) = runner.start().wait().await {
        eprintln!("runner ended: {error}");
    }
}

fn spawn_runner(target: &Target) -> Child {
    let exe = std::env::current_exe().expect("the test binary's path");
    Command::new(exe)
        .args(["crash_child_runner", "--exact", "--ignored", "--nocapture"])
        .env(TARGET_VAR, target.encode())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the runner process")
}

/// A small xorshift generator: the test's randomness, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn crash_run(target: Target) {
    let seed = std::env::var("CQRS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("transfer crash test: seed {seed} (set CQRS_CRASH_SEED to replay)");
    let mut rng = Rng(seed);

    let (events, _) = target.open().await;
    let router = router(&events);
    let accounts: Vec<Uuid> = (0..ACCOUNTS).map(|_| Uuid::new_v4()).collect();
    for (n, id) in accounts.iter().enumerate() {
        router
            .accounts
            .dispatch(*id, AccountCommand::Open { initial: INITIAL })
            .await
            .expect("open an account");
        if n < CLOSED {
            router
                .accounts
                .dispatch(*id, AccountCommand::Close)
                .await
                .expect("close an account");
        }
    }
    let plan: Vec<(Uuid, Uuid, Uuid, u64)> = (0..TRANSFERS)
        .map(|_| {
            let from = rng.below(ACCOUNTS as u64) as usize;
            let to = (from + 1 + rng.below(ACCOUNTS as u64 - 1) as usize) % ACCOUNTS;
            (
                Uuid::new_v4(),
                accounts[from],
                accounts[to],
                1 + rng.below(60),
            )
        })
        .collect();
    let plan = Arc::new(plan);

    let mut child = spawn_runner(&target);
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (plan, next, transfers) = (
                Arc::clone(&plan),
                Arc::clone(&next),
                Arc::clone(&router.transfers),
            );
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some((id, from, to, amount)) = plan.get(n).copied() else {
                        return;
                    };
                    transfers
                        .dispatch_with_context(
                            id,
                            TransferCommand::Request { from, to, amount },
                            &CommandContext::new(),
                        )
                        .await
                        .expect("request a transfer");
                }
            })
        })
        .collect();

    // Kill the runner at random moments while the requests come in, and after.
    let mut kills = 0;
    while kills < KILLS || next.load(Ordering::Relaxed) < TRANSFERS {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(600))).await;
        child.start_kill().expect("SIGKILL the runner");
        child.wait().await.expect("reap the runner");
        kills += 1;
        child = spawn_runner(&target);
    }
    for client in clients {
        client.await.expect("a client task");
    }

    // Let the last runner finish everything.
    let deadline = Instant::now() + Duration::from_secs(240);
    let statuses = loop {
        let mut statuses = HashMap::new();
        for (id, ..) in plan.iter() {
            let status = router.transfers.load(*id).await.expect("load a transfer");
            statuses.insert(*id, status.status);
        }
        let open = statuses
            .values()
            .filter(|s| matches!(s, TransferStatus::Pending | TransferStatus::None))
            .count();
        if open == 0 {
            break statuses;
        }
        assert!(
            Instant::now() < deadline,
            "{open} transfers still unsettled after {kills} kills (seed {seed})"
        );
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the runner process ended on its own: {status}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    child.start_kill().expect("stop the runner");
    child.wait().await.expect("reap the runner");
    eprintln!("{kills} kills; outcomes: {:?}", count(statuses.values()));

    let history = read_everything(events.as_ref()).await;
    // No command caused events twice: every command of this domain causes one event.
    let mut per_cause: HashMap<Uuid, Vec<&PersistableDomainEvent>> = HashMap::new();
    for event in &history {
        // The setup's commands (opening and closing accounts) were dispatched without one.
        if let Some(cause) = event.causation_id {
            per_cause.entry(cause).or_default().push(event);
        } else {
            assert!(
                matches!(event.event_type.as_str(), "AccountOpened" | "AccountClosed"),
                "an event of a transfer without a causation id: {event:?}"
            );
        }
    }
    let twice: Vec<_> = per_cause.iter().filter(|(_, e)| e.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "commands applied twice (seed {seed}): {twice:?}"
    );

    // The money is all there.
    let mut total = 0;
    for id in &accounts {
        total += router
            .accounts
            .load(*id)
            .await
            .expect("load an account")
            .balance;
    }
    assert_eq!(
        total,
        INITIAL * ACCOUNTS as u64,
        "money created or lost (seed {seed})"
    );

    // Each outcome has exactly the account events it implies.
    let mut moves: HashMap<(Uuid, &str), usize> = HashMap::new();
    for event in &history {
        if event.aggregate_type == "transfer_account" {
            let payload: serde_json::Value = event.payload.to_value().expect("payload JSON");
            if let Some(transfer) = payload
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(|v| v.get("transfer"))
                .and_then(|t| t.as_str())
                .and_then(|t| t.parse::<Uuid>().ok())
            {
                *moves
                    .entry((transfer, event.event_type.as_str()))
                    .or_default() += 1;
            }
        }
    }
    for (id, status) in &statuses {
        let n = |name: &str| moves.get(&(*id, name)).copied().unwrap_or(0);
        let found = (
            n("TransferDebited"),
            n("TransferCredited"),
            n("TransferRefunded"),
        );
        let expected = match status {
            TransferStatus::Completed => (1, 1, 0),
            TransferStatus::Failed => (0, 0, 0),
            TransferStatus::Reversed => (1, 0, 1),
            other => panic!("transfer {id} is {other:?}"),
        };
        assert_eq!(
            found, expected,
            "transfer {id} is {status:?} with (debits, credits, refunds) {found:?} (seed {seed})"
        );
    }
    target.remove().await;
}

fn count<'a>(statuses: impl Iterator<Item = &'a TransferStatus>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for status in statuses {
        *counts.entry(format!("{status:?}")).or_default() += 1;
    }
    counts
}

async fn read_everything(events: &dyn EventRepository) -> Vec<PersistableDomainEvent> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = events.read_all(after, 1_000).await.expect("read the store");
        let Some(last) = page.last() else {
            return all;
        };
        after = last.position;
        all.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_runner_kills_on_sqlite() {
    let path = std::env::temp_dir().join(format!("cqrs-transfer-crash-{}.sqlite", Uuid::new_v4()));
    crash_run(Target::Sqlite(path)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_runner_kills_on_postgres() {
    let Some(url) = cqrs_tests::server_url(
        "CQRS_POSTGRES_URL",
        "transfer crash on postgres",
        "postgres://postgres@127.0.0.1:5432/test",
    ) else {
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    crash_run(Target::Postgres { url, schema }).await;
}
