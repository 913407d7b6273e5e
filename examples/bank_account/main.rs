//! The bank account example: open an account, deposit, withdraw, hit the overdraft rule,
//! project the balance view and query it. The events live in a SQLite file, so the account
//! (and its balance) carries on from one run to the next.
//!
//! ```text
//! cargo run --example bank_account                          # ./bank_account.sqlite
//! cargo run --example bank_account -- --db /tmp/bank.sqlite
//! cargo run --example bank_account -- --postgres postgres://postgres@127.0.0.1:5432/test
//! cargo run --example bank_account -- --memory              # nothing kept
//! cargo run --example bank_account -- rebuild-view          # rebuild the balance views from all events
//! cargo run --example bank_account -- replay                # decode every stored event again
//! ```

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs::{
    Aggregate, CQRSFramework, Checkpoint, DomainEvent, EventRepository, MemoryEventRepository,
    MemoryViewRepository, PostgresEventRepository, PostgresViewRepository, Projection, Query,
    SqliteEventRepository, View, ViewRepository,
};
use cqrs_examples::bank::{BalanceQuery, BalanceView, BankAccount, BankCommand, BankError};
use uuid::Uuid;

/// The demo's account: the same id every run, so its history grows across runs.
const ACCOUNT: Uuid = Uuid::from_u128(0x6a1d_3f0e_0b5c_4c8e_9a51_0000_0000_0001);

const USAGE: &str =
    "usage: bank_account [--db PATH | --postgres URL | --memory] [demo | rebuild-view | replay]";

enum Backend {
    Sqlite(String),
    Postgres(String),
    Memory,
}

enum Action {
    Demo,
    RebuildView,
    Replay,
}

type Views = Arc<dyn ViewRepository<BankAccount, BalanceView>>;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<(Backend, Action), String> {
    let mut backend = Backend::Sqlite("bank_account.sqlite".into());
    let mut action = Action::Demo;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--db" => backend = Backend::Sqlite(args.next().ok_or(USAGE)?),
            "--postgres" => backend = Backend::Postgres(args.next().ok_or(USAGE)?),
            "--memory" => backend = Backend::Memory,
            "demo" => action = Action::Demo,
            "rebuild-view" => action = Action::RebuildView,
            "replay" => action = Action::Replay,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok((backend, action))
}

async fn open(
    backend: &Backend,
) -> Result<(Arc<dyn EventRepository>, Views), Box<dyn std::error::Error>> {
    Ok(match backend {
        Backend::Sqlite(path) => {
            println!("store: SQLite file {path}");
            let store = SqliteEventRepository::open(path).await?;
            let views: Views = Arc::new(store.views::<BalanceView>());
            (Arc::new(store), views)
        }
        Backend::Postgres(url) => {
            println!("store: PostgreSQL {url}");
            let store = PostgresEventRepository::connect(url).await?;
            store.migrate().await?;
            let views: Views = Arc::new(PostgresViewRepository::<BalanceView>::new(&store));
            (Arc::new(store), views)
        }
        Backend::Memory => {
            println!("store: in memory (nothing is kept)");
            let views: Views = Arc::new(MemoryViewRepository::<BalanceView>::new());
            (Arc::new(MemoryEventRepository::new()), views)
        }
    })
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (backend, action) = parse_args()?;
    let (events, views) = open(&backend).await?;
    match action {
        Action::Demo => demo(events, views).await,
        Action::RebuildView => rebuild_view(events, views).await,
        Action::Replay => replay(events).await,
    }
}

async fn demo(
    events: Arc<dyn EventRepository>,
    views: Views,
) -> Result<(), Box<dyn std::error::Error>> {
    let framework = CQRSFramework::<BankAccount>::new(Arc::clone(&events));
    // The balance view is kept up to date by a projection runner in the background: it
    // catches up from its checkpoint, then follows new events as they are committed.
    let runner = Projection::<BankAccount, BalanceView>::new(events, Arc::clone(&views)).spawn();

    println!("account {ACCOUNT}");
    let mut steps = Vec::new();
    if !framework.load(ACCOUNT).await?.open {
        steps.push(BankCommand::Open {
            owner: "Ada".into(),
        });
    }
    steps.extend([
        BankCommand::Deposit { amount: 10_000 },
        BankCommand::Withdraw { amount: 2_500 },
        BankCommand::Withdraw { amount: 5_000_000 },
        BankCommand::Deposit { amount: 1_234 },
    ]);
    let mut last_position = 0;
    for command in steps {
        print!("{command:?} -> ");
        match framework.dispatch(ACCOUNT, command).await {
            Ok(receipt) => {
                println!("ok, sequence {}", receipt.sequence);
                last_position = receipt.last_position().unwrap_or(last_position);
            }
            Err(refused @ BankError::Overdraft { .. }) => println!("refused: {refused}"),
            Err(other) => return Err(other.into()),
        }
    }

    // Read your own write: wait until the view has applied the last event we appended.
    runner
        .wait_for(last_position, Duration::from_secs(10))
        .await?;
    let view = BalanceQuery
        .query(&ACCOUNT, views.as_ref())
        .await?
        .ok_or("the balance view was not written")?;
    println!(
        "final balance of {}'s account: {}.{:02} after {} transactions",
        view.owner,
        view.balance / 100,
        view.balance % 100,
        view.transactions
    );
    runner.shutdown().await?;
    Ok(())
}

/// Rebuilds the balance views from the first event and stores them, with the projection's
/// checkpoint at the position reached, in one commit.
async fn rebuild_view(
    events: Arc<dyn EventRepository>,
    views: Views,
) -> Result<(), Box<dyn std::error::Error>> {
    let total = last_position(events.as_ref()).await?;
    let mut bar = Progress::new("rebuild", total);
    let mut rebuilt = std::collections::HashMap::<String, BalanceView>::new();
    let mut position = 0;
    loop {
        let batch = events.read_all(position, 1_000).await?;
        let Some(last) = batch.last() else { break };
        position = last.position;
        for stored in batch
            .iter()
            .filter(|e| e.aggregate_type == BankAccount::NAME)
        {
            let envelope = stored.decode::<<BankAccount as Aggregate>::Events>()?;
            if let Some(id) = <BalanceView as View<BankAccount>>::view_id(&envelope) {
                rebuilt.entry(id).or_default().handle_event(&envelope)?;
            }
        }
        bar.show(position);
    }
    bar.finish();
    let mut changes = Vec::with_capacity(rebuilt.len());
    for (id, view) in rebuilt {
        let mut context = views.load_for_update(&id).await?;
        context.view = view;
        changes.push(context);
    }
    let count = changes.len();
    let name = Projection::<BankAccount, BalanceView>::default_name();
    // The checkpoint only moves forward; when the projection already reached `position`
    // the rows are replaced and the checkpoint stays.
    let checkpoint =
        (views.checkpoint(&name).await? < position).then_some(Checkpoint { name, position });
    // Fails with a view conflict, writing nothing, if a projector changed a row meanwhile.
    views.commit(changes, checkpoint).await?;
    println!("rebuilt {count} balance views from {position} events' worth of history");
    if let Some(view) = views.load(&ACCOUNT.to_string()).await? {
        println!("demo account: {view:?}");
    }
    Ok(())
}

/// Reads every stored event and decodes it, checking each aggregate's history is complete.
async fn replay(events: Arc<dyn EventRepository>) -> Result<(), Box<dyn std::error::Error>> {
    let total = last_position(events.as_ref()).await?;
    let mut bar = Progress::new("replay", total);
    let mut position = 0;
    let mut decoded = 0u64;
    let mut states =
        std::collections::HashMap::<Uuid, (i64, <BankAccount as Aggregate>::State)>::new();
    loop {
        let batch = events.read_all(position, 1_000).await?;
        let Some(last) = batch.last() else { break };
        position = last.position;
        for stored in batch
            .iter()
            .filter(|e| e.aggregate_type == BankAccount::NAME)
        {
            let event = <BankAccount as Aggregate>::Events::try_from_persisted(stored)?;
            let (sequence, state) = states.entry(stored.aggregate_id).or_default();
            if stored.sequence != *sequence + 1 {
                return Err(format!(
                    "account {} jumps from sequence {sequence} to {}",
                    stored.aggregate_id, stored.sequence
                )
                .into());
            }
            *sequence = stored.sequence;
            BankAccount.handle_event(state, &event);
            decoded += 1;
        }
        bar.show(position);
    }
    bar.finish();
    println!(
        "replayed {decoded} events of {} accounts; every one decodes",
        states.len()
    );
    if let Some((_, state)) = states.get(&ACCOUNT) {
        println!(
            "demo account balance from the replay: {}.{:02}",
            state.balance / 100,
            state.balance % 100
        );
    }
    Ok(())
}

async fn last_position(events: &dyn EventRepository) -> Result<i64, cqrs::CQRSError> {
    // Walk to the end in large pages; the store streams in batches with bounded memory.
    let mut position = 0;
    loop {
        let batch = events.read_all(position, 10_000).await?;
        match batch.last() {
            Some(last) => position = last.position,
            None => return Ok(position),
        }
    }
}

/// A one-line progress bar on stderr, redrawn at most every 100 ms.
struct Progress {
    label: &'static str,
    total: i64,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    fn new(label: &'static str, total: i64) -> Self {
        Progress {
            label,
            total: total.max(1),
            started: Instant::now(),
            drawn: None,
        }
    }

    fn show(&mut self, done: i64) {
        if self
            .drawn
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
            && done < self.total
        {
            return;
        }
        self.drawn = Some(Instant::now());
        let filled = usize::try_from((done.min(self.total) * 30) / self.total).unwrap_or(30);
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{:>8} [{}{}] {done}/{} ({rate:.0} events/s)",
            self.label,
            "#".repeat(filled),
            " ".repeat(30 - filled),
            self.total
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        eprintln!();
    }
}
