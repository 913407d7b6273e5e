//! Fixtures shared by the `cqrs` criterion benchmarks (`cargo bench -p cqrs-benches`): bank
//! account histories written straight into a store, frameworks prefilled for the
//! stream-length benchmark, temporary SQLite files and the PostgreSQL switch.
//!
//! The benchmarks themselves are in `benches/cqrs.rs`; the figures and how to read them are
//! in `docs/benchmarks.md`.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::error::Error;
use std::path::{Path, PathBuf};

use cqrs::{
    Aggregate, CQRSFramework, EventRepository, MemoryEventRepository, MemorySnapshotRepository,
    PersistableDomainEvent, Snapshot, SnapshotPolicy, SnapshotRepository,
};
use cqrs_examples::bank::{AccountState, BankAccount, BankCommand, BankEvent};
use uuid::Uuid;

/// What the benchmarks' fixtures fail with.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// The snapshot interval of [`Variant::Snapshots`].
pub const SNAPSHOT_EVERY: u32 = 100;

/// The amount every benchmark deposit pays in (cents).
pub const AMOUNT: u64 = 100;

/// How a framework rebuilds an aggregate before a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Replays every event from the store (`without_state_cache`).
    Plain,
    /// Loads the newest snapshot (policy: every [`SNAPSHOT_EVERY`] events) and the events
    /// after it, without the state cache.
    Snapshots,
    /// Keeps the state in memory after the first load (the default; `with_state_cache`).
    StateCache,
}

impl Variant {
    /// Every variant, in the order the benchmarks list them.
    pub const ALL: [Variant; 3] = [Variant::Plain, Variant::Snapshots, Variant::StateCache];

    /// The name used in benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Snapshots => "snapshots",
            Variant::StateCache => "state_cache",
        }
    }
}

/// The event at `sequence` of an account history: the open, then deposits.
pub fn bank_event(sequence: i64) -> BankEvent {
    if sequence == 1 {
        BankEvent::Opened {
            owner: "alice".to_owned(),
        }
    } else {
        BankEvent::deposited(AMOUNT)
    }
}

/// The command that follows `done` commands on an account: the open, then deposits.
///
/// ```
/// use cqrs_examples::bank::BankCommand;
/// assert!(matches!(cqrs_benches::bank_command(0), BankCommand::Open { .. }));
/// assert!(matches!(cqrs_benches::bank_command(3), BankCommand::Deposit { .. }));
/// ```
pub fn bank_command(done: usize) -> BankCommand {
    if done == 0 {
        BankCommand::Open {
            owner: "alice".to_owned(),
        }
    } else {
        BankCommand::Deposit { amount: AMOUNT }
    }
}

/// The stored form of an account history of `count` events (sequences 1 to `count`).
///
/// # Errors
/// A payload that does not serialize (never, for the bank events).
///
/// ```
/// let history = cqrs_benches::history(uuid::Uuid::new_v4(), 3)?;
/// assert_eq!(history.len(), 3);
/// assert_eq!(history[2].sequence, 3);
/// # Ok::<(), cqrs_benches::BoxError>(())
/// ```
pub fn history(id: Uuid, count: usize) -> Result<Vec<PersistableDomainEvent>, BoxError> {
    let mut events = Vec::with_capacity(count);
    for sequence in 1..=count as i64 {
        events.push(PersistableDomainEvent::new(
            BankAccount::NAME,
            id,
            sequence,
            &bank_event(sequence),
            serde_json::Value::Null,
        )?);
    }
    Ok(events)
}

/// Writes `accounts` account histories of `per_account` events each into `store`, one append
/// per account.
///
/// # Errors
/// The store's error.
pub async fn fill(
    store: &dyn EventRepository,
    accounts: usize,
    per_account: usize,
) -> Result<Vec<Uuid>, BoxError> {
    let mut ids = Vec::with_capacity(accounts);
    for _ in 0..accounts {
        let id = Uuid::new_v4();
        store.append(history(id, per_account)?).await?;
        ids.push(id);
    }
    Ok(ids)
}

/// A framework of `variant` over an in-memory store holding `accounts` accounts with exactly
/// `prior` events each, ready so that the next deposit on each runs on `prior` prior events:
/// for [`Variant::StateCache`] every account's state is already cached, for
/// [`Variant::Snapshots`] the snapshot the policy would have saved is there.
///
/// # Errors
/// The store's error.
pub async fn prefilled(
    variant: Variant,
    prior: usize,
    accounts: usize,
) -> Result<(CQRSFramework<BankAccount>, Vec<Uuid>), BoxError> {
    let store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    let prior = prior.max(1);
    // The cache is filled by a dispatch, so write one event fewer and dispatch it.
    let written = if variant == Variant::StateCache {
        prior - 1
    } else {
        prior
    };
    let mut ids = Vec::with_capacity(accounts);
    for _ in 0..accounts {
        let id = Uuid::new_v4();
        if written > 0 {
            store.append(history(id, written)?).await?;
        }
        let every = SNAPSHOT_EVERY as usize;
        let at = written / every * every;
        if variant == Variant::Snapshots && at > 0 {
            let state = AccountState {
                open: true,
                balance: AMOUNT * (at as u64 - 1),
            };
            snapshots
                .save_snapshot(Snapshot {
                    aggregate_type: BankAccount::NAME.to_owned(),
                    aggregate_id: id,
                    sequence: at as i64,
                    state: serde_json::to_value(state)?,
                    timestamp: chrono::Utc::now(),
                })
                .await?;
        }
        ids.push(id);
    }
    let framework = CQRSFramework::<BankAccount>::new(store);
    let framework = match variant {
        Variant::Plain => framework.without_state_cache(),
        Variant::Snapshots => framework
            .without_state_cache()
            .with_snapshots(snapshots, SnapshotPolicy::every(SNAPSHOT_EVERY)),
        Variant::StateCache => {
            let framework = framework.with_state_cache(accounts.max(2));
            for &id in &ids {
                framework.dispatch(id, bank_command(written)).await?;
            }
            framework
        }
    };
    Ok((framework, ids))
}

/// The Tokio runtime the benchmarks run on: two workers, like the machine's two cores.
///
/// # Errors
/// When the runtime cannot start.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// `CQRS_POSTGRES_URL`, or `None` after printing why the PostgreSQL benchmarks are skipped.
pub fn postgres_url() -> Option<String> {
    match std::env::var("CQRS_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipping postgres benchmarks: set CQRS_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run them"
            );
            None
        }
    }
}

/// A fresh SQLite file path in the temporary directory.
pub fn temp_sqlite(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cqrs-bench-{tag}-{}.sqlite", Uuid::new_v4()))
}

/// Removes a SQLite file and its WAL and shared-memory files, ignoring missing ones.
pub fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
