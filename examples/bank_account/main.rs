//! The bank account example: open an account, deposit, withdraw, hit the overdraft rule,
//! project the balance view and query it. The events live in a SQLite file, so the account
//! (and its balance) carries on from one run to the next.
//!
//! ```text
//! cargo run -p cqrs-examples --example bank_account                  # ./bank_account.sqlite
//! cargo run -p cqrs-examples --example bank_account -- --fresh       # delete it first, start over
//! cargo run -p cqrs-examples --example bank_account -- --db /tmp/bank.sqlite
//! cargo run -p cqrs-examples --example bank_account -- --memory      # nothing kept
//! cargo run -p cqrs-examples --example bank_account -- rebuild-view  # rebuild the balance views
//! cargo run -p cqrs-examples --example bank_account -- replay        # decode every event again
//! cargo run -p cqrs-examples --features postgres --example bank_account -- \
//!     --postgres postgres://postgres@127.0.0.1:5432/test
//! ```

use std::collections::HashMap;
use std::error::Error;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cqrs::{
    Aggregate, CQRSFramework, Checkpoint, DomainEvent, EventRepository, MemoryEventRepository,
    MemoryViewRepository, Projection, Query, SqliteEventRepository, View, ViewRepository,
};
use cqrs_examples::bank::{BalanceQuery, BalanceView, BankAccount, BankCommand, BankError};
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

/// The demo's account: the same id every run, so its history grows across runs.
const ACCOUNT: Uuid = Uuid::from_u128(0x6a1d_3f0e_0b5c_4c8e_9a51_0000_0000_0001);

/// The bank account example of cqrs: commands, events, a projected balance view.
///
/// The events and the balance views are kept in a SQLite file, `bank_account.sqlite` in the
/// current directory unless `--db` names another, so the account carries on from one run to
/// the next. `--fresh` deletes the file first and starts over.
#[derive(Parser)]
#[command(name = "bank_account", version)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    /// What to do; `demo` when none is given.
    #[command(subcommand)]
    action: Option<Action>,
}

/// Where the events and views are kept: a SQLite file, memory or PostgreSQL. `global` lets
/// the options come before or after the subcommand.
#[derive(Args)]
struct StoreArgs {
    /// The SQLite file to keep events and views in (with its -wal and -shm files beside it);
    /// created if missing
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "bank_account.sqlite"
    )]
    db: PathBuf,
    /// Delete the SQLite file and its -wal and -shm files first, and start over
    #[arg(long, global = true, conflicts_with_all = ["memory", "postgres"])]
    fresh: bool,
    /// Keep everything in memory: nothing is written, nothing is kept
    #[arg(long, global = true, conflicts_with_all = ["db", "postgres"])]
    memory: bool,
    /// Keep events and views in PostgreSQL at URL (needs the example built with
    /// `--features postgres`)
    #[arg(long, global = true, value_name = "URL", conflicts_with = "db")]
    postgres: Option<String>,
}

#[derive(Subcommand, Clone, Copy)]
enum Action {
    /// Open the account, deposit, withdraw, hit the overdraft rule, query the balance view
    Demo,
    /// Rebuild the balance views from every stored event, in one commit
    RebuildView,
    /// Decode every stored event again and check each account's history is complete
    Replay,
}

type Views = Arc<dyn ViewRepository<BankAccount, BalanceView>>;

#[tokio::main]
async fn main() -> ExitCode {
    // A bad argument ends here, with clap's message and exit code 2.
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn Error>> {
    let (events, views) = open(&cli.store).await?;
    match cli.action.unwrap_or(Action::Demo) {
        Action::Demo => demo(events, views).await,
        Action::RebuildView => rebuild_view(events, views).await,
        Action::Replay => replay(events).await,
    }
}

/// Opens the store the arguments name. Every back end gives the same two handles: the event
/// repository the framework and the projection read and append through, and the view
/// repository the projection writes the balance views to.
async fn open(store: &StoreArgs) -> Result<(Arc<dyn EventRepository>, Views), Box<dyn Error>> {
    if store.memory {
        println!("store: in memory (nothing is kept)");
        let views: Views = Arc::new(MemoryViewRepository::<BalanceView>::new());
        return Ok((Arc::new(MemoryEventRepository::new()), views));
    }
    if let Some(url) = &store.postgres {
        return open_postgres(url).await;
    }
    let path = &store.db;
    let shown = std::path::absolute(path).unwrap_or_else(|_| path.clone());
    if store.fresh && remove_sqlite(path)? {
        println!(
            "store: SQLite file {} (deleted by --fresh; starting over)",
            shown.display()
        );
    } else {
        println!(
            "store: SQLite file {} (kept across runs; --fresh starts over)",
            shown.display()
        );
    }
    // `open` creates the file if it is missing, and the store's tables.
    let store = SqliteEventRepository::open(path).await?;
    // The balance views and the projection's checkpoint live in the same file.
    let views: Views = Arc::new(store.views::<BalanceView>());
    Ok((Arc::new(store), views))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<(Arc<dyn EventRepository>, Views), Box<dyn Error>> {
    use cqrs::{PostgresEventRepository, PostgresViewRepository};

    println!("store: PostgreSQL {url}");
    let store = PostgresEventRepository::connect(url).await?;
    store.migrate().await?;
    let views: Views = Arc::new(PostgresViewRepository::<BalanceView>::new(&store));
    Ok((Arc::new(store), views))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<(Arc<dyn EventRepository>, Views), Box<dyn Error>> {
    Err(
        "this build of the example has no PostgreSQL store; build it with `--features postgres`: \
         cargo run -p cqrs-examples --features postgres --example bank_account -- --postgres URL"
            .into(),
    )
}

/// Deletes a SQLite file and its `-wal` and `-shm` files; true if there was anything to delete.
fn remove_sqlite(path: &Path) -> std::io::Result<bool> {
    let mut removed = false;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = OsString::from(path.as_os_str());
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => removed = true,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(removed)
}

async fn demo(events: Arc<dyn EventRepository>, views: Views) -> Result<(), Box<dyn Error>> {
    let framework = CQRSFramework::<BankAccount>::new(Arc::clone(&events));
    // The balance view is kept up to date by a projection runner in the background: it
    // catches up from its checkpoint, then follows new events as they are committed.
    let runner = Projection::<BankAccount, BalanceView>::new(events, Arc::clone(&views)).start();

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
            // A business rule refusing the command is the aggregate's own error type.
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
) -> Result<(), Box<dyn Error>> {
    let bar = progress("rebuild", last_position(events.as_ref()).await?);
    let mut rebuilt = HashMap::<String, BalanceView>::new();
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
        bar.set_position(u64::try_from(position).unwrap_or_default());
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
async fn replay(events: Arc<dyn EventRepository>) -> Result<(), Box<dyn Error>> {
    let bar = progress("replay", last_position(events.as_ref()).await?);
    let mut position = 0;
    let mut decoded = 0u64;
    let mut states = HashMap::<Uuid, (i64, <BankAccount as Aggregate>::State)>::new();
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
        bar.set_position(u64::try_from(position).unwrap_or_default());
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

/// A progress bar over store positions `0..=total` on stderr. indicatif redraws it at most
/// a few times a second and draws nothing when stderr is not a terminal.
fn progress(label: &'static str, total: i64) -> ProgressBar {
    // `{per_sec:0}`: the rate with no decimals.
    let style = ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} ({per_sec:0})")
        .expect("the template is a valid constant")
        .progress_chars("## ");
    ProgressBar::new(u64::try_from(total).unwrap_or_default())
        .with_style(style)
        .with_message(label)
}
