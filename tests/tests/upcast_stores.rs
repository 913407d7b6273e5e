//! Stored v1 rows decode as v2 wherever events are read: `CQRSFramework::dispatch` and
//! `load` (including a row an upcast step splits in two), a `Projection::catch_up`, and a
//! snapshot fallback, on the in-memory and the SQLite stores.

use std::sync::atomic::{AtomicU64, Ordering};

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DecodeError, DomainEvent, EventEnvelope, EventRepository,
    MemoryEventRepository, MemorySnapshotRepository, MemoryViewRepository, PersistableDomainEvent,
    Projection, Snapshot, SnapshotPolicy, SnapshotRepository, SqliteEventRepository, UpcastEvent,
    Upcasted, View, ViewRepository,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Deserialize)]
struct DepositedV1 {
    amount: u64,
}

fn deposited_v1(old: DepositedV1) -> AccountEvent {
    AccountEvent::Deposited {
        amount: old.amount,
        currency: "EUR".into(),
    }
}

/// `Transfer` v1 is now a withdrawal and a fee.
fn transfer_v1(payload: Value) -> Result<Upcasted, DecodeError> {
    let amount = payload["amount"]
        .as_u64()
        .ok_or_else(|| DecodeError::Upcast("no amount".into()))?;
    Ok(Upcasted::split([
        UpcastEvent::new(
            "Withdrawn",
            "1",
            json!({"type": "Withdrawn", "amount": amount}),
        ),
        UpcastEvent::new("Withdrawn", "1", json!({"type": "Withdrawn", "amount": 1})),
    ]))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(tag = "type")]
enum AccountEvent {
    #[event(
        version = "2",
        upcast(from = "1", with = deposited_v1),
        upcast(name = "Transfer", from = "1", raw = transfer_v1)
    )]
    Deposited {
        amount: u64,
        currency: String,
    },
    Withdrawn {
        amount: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct AccountState {
    balance: i64,
    currencies: Vec<String>,
    events: u64,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct AccountError(#[from] CQRSError);

#[derive(Default)]
struct Account;

#[cqrs::aggregate(name = "account")]
impl Aggregate for Account {
    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &AccountState,
        command: u64,
    ) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(vec![AccountEvent::Deposited {
            amount: command,
            currency: "CHF".into(),
        }])
    }

    fn handle_event(&self, state: &mut AccountState, event: &AccountEvent) {
        state.events += 1;
        match event {
            AccountEvent::Deposited { amount, currency } => {
                state.balance += *amount as i64;
                state.currencies.push(currency.clone());
            }
            AccountEvent::Withdrawn { amount } => state.balance -= *amount as i64,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Deposits {
    total: u64,
    currencies: Vec<String>,
}

#[cqrs::view(table = "deposits")]
impl View<Account> for Deposits {
    fn handle_event(&mut self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), AccountError> {
        if let AccountEvent::Deposited { amount, currency } = &envelope.event {
            self.total += amount;
            self.currencies.push(currency.clone());
        }
        Ok(())
    }
}

/// A row as an older release stored it: `event_type` / `event_version` / payload as given.
fn old_row(
    id: Uuid,
    sequence: i64,
    name: &str,
    version: &str,
    payload: Value,
) -> PersistableDomainEvent {
    let template = AccountEvent::Withdrawn { amount: 0 };
    let mut row =
        PersistableDomainEvent::new("account", id, sequence, &template, Value::Null).unwrap();
    row.event_type = name.into();
    row.event_version = version.into();
    row.payload = payload.into();
    row
}

fn v1_deposit(id: Uuid, sequence: i64, amount: u64) -> PersistableDomainEvent {
    old_row(
        id,
        sequence,
        "Deposited",
        "1",
        json!({"type": "Deposited", "amount": amount}),
    )
}

async fn dispatch_and_load_read_v1_as_v2(store: impl EventRepository + Clone + 'static) {
    let id = Uuid::new_v4();
    store
        .append(vec![v1_deposit(id, 1, 100), v1_deposit(id, 2, 20)])
        .await
        .unwrap();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let state = framework.load(id).await.unwrap();
    assert_eq!(state.balance, 120);
    assert_eq!(state.currencies, ["EUR", "EUR"]);

    // dispatch folds the v1 rows, then appends a v2 one after them.
    framework.dispatch(id, 5).await.unwrap();
    let rows = store.load_events("account", id, 0).await.unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].event_version, "2");
    assert_eq!(
        framework.load(id).await.unwrap().currencies,
        ["EUR", "EUR", "CHF"]
    );
}

async fn a_split_row_folds_as_two_events(store: impl EventRepository + Clone + 'static) {
    let id = Uuid::new_v4();
    store
        .append(vec![
            v1_deposit(id, 1, 100),
            old_row(id, 2, "Transfer", "1", json!({"amount": 30})),
        ])
        .await
        .unwrap();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let state = framework.load(id).await.unwrap();
    assert_eq!(state.balance, 100 - 30 - 1);
    assert_eq!(
        state.events, 3,
        "one deposit, then the transfer read as two withdrawals"
    );
    let all = store.load_events("account", id, 0).await.unwrap();
    assert_eq!(all[1].decode_all::<AccountEvent>().unwrap().len(), 2);
}

async fn a_projection_reads_v1_as_v2(
    store: impl EventRepository + Clone + 'static,
    views: impl ViewRepository<Account, Deposits> + Clone + 'static,
) {
    let id = Uuid::new_v4();
    store
        .append(vec![v1_deposit(id, 1, 7), v1_deposit(id, 2, 8)])
        .await
        .unwrap();
    CQRSFramework::<Account>::new(store.clone())
        .dispatch(id, 10)
        .await
        .unwrap();
    let projection = Projection::<Account, Deposits>::new(store.clone(), views.clone());
    projection.catch_up().await.unwrap();
    let view = views.load(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(view.total, 25);
    assert_eq!(view.currencies, ["EUR", "EUR", "CHF"]);
}

async fn a_snapshot_fallback_reads_v1_as_v2(
    store: impl EventRepository + Clone + 'static,
    snapshots: impl SnapshotRepository + Clone + 'static,
) {
    let id = Uuid::new_v4();
    store
        .append(vec![v1_deposit(id, 1, 40), v1_deposit(id, 2, 2)])
        .await
        .unwrap();
    // A snapshot from a release whose state had another shape: it does not decode.
    snapshots
        .save_snapshot(Snapshot {
            aggregate_type: "account".into(),
            aggregate_id: id,
            sequence: 2,
            state: json!({"old_shape": true}),
            timestamp: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let framework = CQRSFramework::<Account>::new(store.clone())
        .with_snapshots(snapshots.clone(), SnapshotPolicy::Never);
    let state = framework.load(id).await.unwrap();
    assert_eq!(
        state.balance, 42,
        "the full history was replayed through the chain"
    );
    assert_eq!(state.currencies, ["EUR", "EUR"]);
}

#[tokio::test]
async fn memory_store() {
    dispatch_and_load_read_v1_as_v2(MemoryEventRepository::new()).await;
    a_split_row_folds_as_two_events(MemoryEventRepository::new()).await;
    a_projection_reads_v1_as_v2(MemoryEventRepository::new(), MemoryViewRepository::new()).await;
    a_snapshot_fallback_reads_v1_as_v2(
        MemoryEventRepository::new(),
        MemorySnapshotRepository::default(),
    )
    .await;
}

static DB: AtomicU64 = AtomicU64::new(0);

async fn sqlite() -> (SqliteEventRepository, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "cqrs-upcast-{}-{}.db",
        std::process::id(),
        DB.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_file(&path);
    (SqliteEventRepository::open(&path).await.unwrap(), path)
}

#[tokio::test]
async fn sqlite_store() {
    let (store, a) = sqlite().await;
    dispatch_and_load_read_v1_as_v2(store).await;
    let (store, b) = sqlite().await;
    a_split_row_folds_as_two_events(store).await;
    let (store, c) = sqlite().await;
    a_projection_reads_v1_as_v2(store.clone(), store.views::<Deposits>()).await;
    let (store, d) = sqlite().await;
    a_snapshot_fallback_reads_v1_as_v2(store.clone(), store).await;
    for path in [a, b, c, d] {
        let _ = std::fs::remove_file(path);
    }
}
