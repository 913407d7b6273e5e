//! The bank account of `cqrs-examples`, written for cqrs-es 0.5, and an in-memory
//! `PersistedEventRepository` so that cqrs-es serialises its events to JSON like our
//! `MemoryEventRepository` does.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The same three events as `cqrs_examples::bank::BankEvent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RefEvent {
    /// The account was opened.
    Opened { owner: String },
    /// Money was paid in (with its currency, like `BankEvent::Deposited` version 2).
    Deposited { amount: u64, currency: String },
    /// Money was taken out.
    Withdrawn { amount: u64 },
}

impl DomainEvent for RefEvent {
    fn event_type(&self) -> String {
        match self {
            RefEvent::Opened { .. } => "AccountOpened",
            RefEvent::Deposited { .. } => "MoneyDeposited",
            RefEvent::Withdrawn { .. } => "MoneyWithdrawn",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            RefEvent::Deposited { .. } => "2",
            _ => "1",
        }
        .to_owned()
    }
}

/// The same commands as `cqrs_examples::bank::BankCommand` (the workloads never withdraw).
#[allow(dead_code)]
#[derive(Debug, Clone, PartialEq)]
pub enum RefCommand {
    /// Open the account.
    Open { owner: String },
    /// Pay money in.
    Deposit { amount: u64 },
    /// Take money out.
    Withdraw { amount: u64 },
}

/// The same refusals as `cqrs_examples::bank::BankError` (without the framework variant).
#[derive(Debug, PartialEq, Eq)]
pub enum RefError {
    AlreadyOpen,
    NotOpen,
    ZeroAmount,
    Overdraft { balance: u64, requested: u64 },
}

impl fmt::Display for RefError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefError::AlreadyOpen => f.write_str("account already open"),
            RefError::NotOpen => f.write_str("account not open"),
            RefError::ZeroAmount => f.write_str("amount must be more than zero"),
            RefError::Overdraft { balance, requested } => write!(
                f,
                "insufficient funds: balance {balance}, requested {requested}"
            ),
        }
    }
}

impl std::error::Error for RefError {}

/// The account: the aggregate is its own state in cqrs-es.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RefAccount {
    open: bool,
    balance: u64,
}

impl Aggregate for RefAccount {
    const TYPE: &'static str = "bank_account";
    type Command = RefCommand;
    type Event = RefEvent;
    type Error = RefError;
    type Services = ();

    async fn handle(
        &mut self,
        command: RefCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), RefError> {
        let event = match command {
            RefCommand::Open { .. } if self.open => return Err(RefError::AlreadyOpen),
            RefCommand::Open { owner } => RefEvent::Opened { owner },
            _ if !self.open => return Err(RefError::NotOpen),
            RefCommand::Deposit { amount: 0 } | RefCommand::Withdraw { amount: 0 } => {
                return Err(RefError::ZeroAmount)
            }
            RefCommand::Deposit { amount } => RefEvent::Deposited {
                amount,
                currency: "EUR".to_owned(),
            },
            RefCommand::Withdraw { amount } if amount > self.balance => {
                return Err(RefError::Overdraft {
                    balance: self.balance,
                    requested: amount,
                })
            }
            RefCommand::Withdraw { amount } => RefEvent::Withdrawn { amount },
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: RefEvent) {
        match event {
            RefEvent::Opened { .. } => self.open = true,
            RefEvent::Deposited { amount, .. } => self.balance += amount,
            RefEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }
}

/// A stored snapshot: the state, the sequence it includes, the snapshot version.
type StoredSnapshot = (Value, usize, usize);

/// Serialised events (and snapshots) per aggregate id, in memory, with the optimistic lock a
/// database repository enforces.
#[derive(Debug, Clone, Default)]
pub struct MemPersistedRepository {
    events: Arc<RwLock<HashMap<String, Vec<SerializedEvent>>>>,
    snapshots: Arc<RwLock<HashMap<String, StoredSnapshot>>>,
}

fn poisoned<T>(_: T) -> PersistenceError {
    PersistenceError::UnknownError("lock poisoned".into())
}

impl PersistedEventRepository for MemPersistedRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let events = self.events.read().map_err(poisoned)?;
        Ok(events.get(aggregate_id).cloned().unwrap_or_default())
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let events = self.events.read().map_err(poisoned)?;
        Ok(events
            .get(aggregate_id)
            .map(|stream| {
                stream
                    .iter()
                    .filter(|e| e.sequence > last_sequence)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        let snapshots = self.snapshots.read().map_err(poisoned)?;
        Ok(snapshots
            .get(aggregate_id)
            .map(|(state, sequence, version)| SerializedSnapshot {
                aggregate_id: aggregate_id.to_owned(),
                aggregate: state.clone(),
                current_sequence: *sequence,
                current_snapshot: *version,
            }))
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let last_sequence = events.last().map_or(0, |e| e.sequence);
        {
            let mut all = self.events.write().map_err(poisoned)?;
            let stream = all.entry(first.aggregate_id.clone()).or_default();
            let stored = stream.last().map_or(0, |e| e.sequence);
            if stored + 1 != first.sequence {
                return Err(PersistenceError::OptimisticLockError);
            }
            stream.extend_from_slice(events);
        }
        if let Some((aggregate_id, state, version)) = snapshot_update {
            let mut snapshots = self.snapshots.write().map_err(poisoned)?;
            snapshots.insert(aggregate_id, (state, last_sequence, version));
        }
        Ok(())
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        let events = self.get_events::<A>(aggregate_id).await?;
        feed(events).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        let events: Vec<SerializedEvent> = {
            let all = self.events.read().map_err(poisoned)?;
            all.values().flatten().cloned().collect()
        };
        feed(events).await
    }
}

async fn feed(events: Vec<SerializedEvent>) -> Result<ReplayStream, PersistenceError> {
    let (mut feed, stream) = ReplayStream::new(events.len().max(1));
    for event in events {
        feed.push(Ok(event)).await?;
    }
    Ok(stream)
}
