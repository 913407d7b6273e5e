//! The transfer example: money moved between accounts by a process manager, the
//! `TransferSaga`, with a refund when the target refuses the credit. The events and the
//! saga's instances live in a SQLite file.
//!
//! ```text
//! cargo run -p cqrs-examples --example transfer                       # ./transfer.sqlite
//! cargo run -p cqrs-examples --example transfer -- --fresh            # delete it first
//! cargo run -p cqrs-examples --example transfer -- chain TRANSFER_ID  # one transfer's causal chain
//! cargo run -p cqrs-examples --example transfer -- saga               # run the saga until idle
//! cargo run -p cqrs-examples --features postgres --example transfer -- \
//!     --postgres postgres://postgres@127.0.0.1:5432/test
//! ```

use std::collections::HashMap;
use std::error::Error;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use cqrs::{
    derived_command_id, CQRSFramework, CommandContext, EventRepository, PersistableDomainEvent,
    ProcessManager, ProcessRunner, ProcessStore, RetryPolicy,
};
use cqrs_examples::transfer::{
    Account, AccountCommand, Transfer, TransferCommand, TransferRouter, TransferSaga,
};
use uuid::Uuid;

/// The transfer example of cqrs: a process manager carrying out transfers between accounts.
#[derive(Parser)]
#[command(name = "transfer", version)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    /// What to do; `demo` when none is given.
    #[command(subcommand)]
    action: Option<Action>,
}

/// Where the events and the saga's instances are kept.
#[derive(Args)]
struct StoreArgs {
    /// The SQLite file (created if missing)
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "transfer.sqlite"
    )]
    db: PathBuf,
    /// Delete the SQLite file first, and start over
    #[arg(long, global = true, conflicts_with = "postgres")]
    fresh: bool,
    /// Keep everything in PostgreSQL at URL (needs `--features postgres`)
    #[arg(long, global = true, value_name = "URL", conflicts_with = "db")]
    postgres: Option<String>,
}

#[derive(Subcommand, Clone)]
enum Action {
    /// Open four accounts, request three transfers, run the saga, show the outcome and the
    /// causal chain of each transfer
    Demo,
    /// Show the causal chain of one transfer: every event of its workflow, what caused it
    Chain {
        /// The transfer's id
        transfer: Uuid,
    },
    /// Run the saga until it has nothing left to do
    Saga,
}

/// The stores the example runs on.
struct Stores {
    events: Arc<dyn EventRepository>,
    processes: Arc<dyn ProcessStore>,
}

#[tokio::main]
async fn main() -> ExitCode {
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
    let stores = open(&cli.store).await?;
    match cli.action.unwrap_or(Action::Demo) {
        Action::Demo => demo(&stores).await,
        Action::Chain { transfer } => chain(&stores, transfer).await,
        Action::Saga => {
            let progress = runner(&stores).run_until_idle().await?;
            println!(
                "saga: {} events read, {} commands sent, {} deadlines fired",
                progress.events, progress.commands, progress.deadlines
            );
            Ok(())
        }
    }
}

async fn open(args: &StoreArgs) -> Result<Stores, Box<dyn Error>> {
    if let Some(url) = &args.postgres {
        return open_postgres(url).await;
    }
    let path = &args.db;
    if args.fresh {
        remove_sqlite(path)?;
    }
    let shown = std::path::absolute(path).unwrap_or_else(|_| path.clone());
    println!("store: SQLite file {}", shown.display());
    let store = cqrs::SqliteEventRepository::open(path).await?;
    let processes = cqrs::SqliteProcessStore::new(&store);
    Ok(Stores {
        events: Arc::new(store),
        processes: Arc::new(processes),
    })
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Stores, Box<dyn Error>> {
    println!("store: PostgreSQL {url}");
    let store = cqrs::PostgresEventRepository::connect(url).await?;
    store.migrate().await?;
    let processes = cqrs::PostgresProcessStore::new(&store);
    Ok(Stores {
        events: Arc::new(store),
        processes: Arc::new(processes),
    })
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<Stores, Box<dyn Error>> {
    Err("this build has no PostgreSQL store; build it with `--features postgres`".into())
}

/// Deletes a SQLite file and its `-wal` and `-shm` files.
fn remove_sqlite(path: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = OsString::from(path.as_os_str());
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn router(stores: &Stores) -> TransferRouter {
    // The saga's commands race users' commands on the same accounts: conflicts are retried.
    let retry = RetryPolicy::attempts(10);
    TransferRouter {
        accounts: Arc::new(
            CQRSFramework::<Account>::new(Arc::clone(&stores.events)).with_retry(retry),
        ),
        transfers: Arc::new(
            CQRSFramework::<Transfer>::new(Arc::clone(&stores.events)).with_retry(retry),
        ),
    }
}

fn runner(stores: &Stores) -> ProcessRunner<TransferSaga> {
    ProcessRunner::new(
        TransferSaga,
        Arc::clone(&stores.events),
        Arc::clone(&stores.processes),
        router(stores),
    )
}

fn cents(amount: u64) -> String {
    format!("{}.{:02}", amount / 100, amount % 100)
}

async fn demo(stores: &Stores) -> Result<(), Box<dyn Error>> {
    let router = router(stores);
    let mut names = HashMap::new();
    let mut open = |name: &'static str| {
        let id = Uuid::new_v4();
        names.insert(id, name);
        id
    };
    let (alice, bob, carol) = (open("alice"), open("bob"), open("carol"));
    for (id, initial) in [(alice, 10_000), (bob, 500), (carol, 0)] {
        router
            .accounts
            .dispatch(id, AccountCommand::Open { initial })
            .await?;
    }
    router
        .accounts
        .dispatch(carol, AccountCommand::Close)
        .await?;
    println!("accounts: alice 100.00, bob 5.00, carol 0.00 (closed)");

    let mut transfers = Vec::new();
    for (from, to, amount) in [
        (alice, bob, 3_000),
        (alice, carol, 2_000),
        (bob, alice, 9_900),
    ] {
        let transfer = Uuid::new_v4();
        // The request starts a workflow: its command id is the correlation id of every event
        // the transfer leads to.
        router
            .transfers
            .dispatch_with_context(
                transfer,
                TransferCommand::Request { from, to, amount },
                &CommandContext::new(),
            )
            .await?;
        println!(
            "requested transfer {transfer}: {} -> {}, {}",
            names[&from],
            names[&to],
            cents(amount)
        );
        transfers.push(transfer);
    }

    let progress = runner(stores).run_until_idle().await?;
    println!(
        "saga: {} events read, {} commands sent",
        progress.events, progress.commands
    );
    for transfer in &transfers {
        let status = router.transfers.load(*transfer).await?.status;
        println!("transfer {transfer}: {status:?}");
    }
    for id in [alice, bob, carol] {
        let balance = router.accounts.load(id).await?.balance;
        println!("{}: {}", names[&id], cents(balance));
    }
    for transfer in transfers {
        println!();
        chain(stores, transfer).await?;
    }
    Ok(())
}

/// Prints every event of a transfer's workflow (those sharing its correlation id), and for
/// each what caused it: the request, or the saga reacting to an earlier event of the chain
/// (the saga's command ids are derived from the event that caused them, so the link is
/// recomputed here from the events alone).
async fn chain(stores: &Stores, transfer: Uuid) -> Result<(), Box<dyn Error>> {
    let requested = stores.events.load_events("transfer", transfer, 0).await?;
    let Some(correlation) = requested.first().and_then(|e| e.correlation_id) else {
        return Err(format!("no transfer {transfer} with a correlation id").into());
    };
    let mut workflow: Vec<PersistableDomainEvent> = Vec::new();
    let mut after = 0;
    loop {
        let page = stores.events.read_all(after, 1_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        workflow.extend(
            page.into_iter()
                .filter(|e| e.correlation_id == Some(correlation)),
        );
    }
    let scope = format!("{}/{transfer}", TransferSaga::NAME);
    println!("transfer {transfer}, workflow {correlation}:");
    for (n, event) in workflow.iter().enumerate() {
        let cause = match event.causation_id {
            Some(id) if id == correlation => "the request".to_owned(),
            Some(id) => workflow
                .iter()
                .position(|earlier| {
                    (0..8).any(|i| derived_command_id(&scope, earlier.event_id, i) == id)
                })
                .map_or_else(
                    || format!("command {id} (a deadline or retry of the saga)"),
                    |k| format!("the saga, on #{} {}", k + 1, workflow[k].event_type),
                ),
            None => "no recorded cause".to_owned(),
        };
        println!(
            "  #{} {:<17} {:<18} {}  <- {cause}",
            n + 1,
            event.aggregate_type,
            event.event_type,
            event.payload.as_str()
        );
    }
    Ok(())
}
