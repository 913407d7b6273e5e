//! The dispatcher's guarantees on the in-memory store: state is rebuilt from history, each
//! dispatch appends only its own events, concurrent writers never duplicate a sequence,
//! metadata round-trips, bad stored data gives typed errors, domain refusals append nothing.

use std::sync::Arc;

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DecodeError, DomainEvent, EventRepository,
    MemoryEventRepository, MemorySnapshotRepository, RetryPolicy, SnapshotPolicy,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum AccountEvent {
    #[event(name = "Opened", version = "1")]
    Opened,
    #[event(name = "Deposited", version = "1")]
    Deposited { amount: u64 },
    #[event(name = "Withdrawn", version = "1")]
    Withdrawn { amount: u64 },
}

#[derive(Debug, Clone)]
enum AccountCommand {
    Open,
    Deposit(u64),
    Withdraw(u64),
    /// Deposits several amounts in one command (several events in one append).
    DepositMany(Vec<u64>),
    Noop,
}

#[derive(Debug, thiserror::Error)]
enum AccountError {
    #[error("not open")]
    NotOpen,
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    Overdraft { balance: u64, requested: u64 },
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct AccountState {
    open: bool,
    balance: u64,
}

#[derive(Default)]
struct Account;

impl Aggregate for Account {
    const NAME: &'static str = "account";
    type Events = AccountEvent;
    type Commands = AccountCommand;
    type Errors = AccountError;
    type State = AccountState;

    async fn handle_command(
        &self,
        _id: Uuid,
        state: &AccountState,
        command: AccountCommand,
    ) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open => Ok(vec![AccountEvent::Opened]),
            AccountCommand::Noop => Ok(vec![]),
            _ if !state.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount }]),
            AccountCommand::DepositMany(amounts) => Ok(amounts
                .into_iter()
                .map(|amount| AccountEvent::Deposited { amount })
                .collect()),
            AccountCommand::Withdraw(amount) if amount > state.balance => {
                Err(AccountError::Overdraft {
                    balance: state.balance,
                    requested: amount,
                })
            }
            AccountCommand::Withdraw(amount) => Ok(vec![AccountEvent::Withdrawn { amount }]),
        }
    }

    fn handle_event(&self, state: &mut AccountState, event: &AccountEvent) {
        match event {
            AccountEvent::Opened => state.open = true,
            AccountEvent::Deposited { amount } => state.balance += amount,
            AccountEvent::Withdrawn { amount } => state.balance -= amount,
        }
    }
}

fn conflict_of(err: &AccountError) -> Option<&CQRSError> {
    match err {
        AccountError::Framework(e @ CQRSError::Conflict { .. }) => Some(e),
        _ => None,
    }
}

async fn open_with(framework: &CQRSFramework<Account>, id: Uuid, deposits: &[u64]) {
    framework.dispatch(id, AccountCommand::Open).await.unwrap();
    for &amount in deposits {
        framework
            .dispatch(id, AccountCommand::Deposit(amount))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn state_rebuilt_from_history_refuses_an_overdraft_in_a_new_instance() {
    let store = MemoryEventRepository::new();
    let id = Uuid::new_v4();
    {
        let first = CQRSFramework::<Account>::new(store.clone());
        open_with(&first, id, &[100, 50]).await;
        first
            .dispatch(id, AccountCommand::Withdraw(120))
            .await
            .unwrap();
    }
    // A new framework on the same store knows the balance is 30 only from the history.
    let second = CQRSFramework::<Account>::new(store.clone());
    let err = second
        .dispatch(id, AccountCommand::Withdraw(31))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AccountError::Overdraft {
                balance: 30,
                requested: 31
            }
        ),
        "{err:?}"
    );
    second
        .dispatch(id, AccountCommand::Withdraw(30))
        .await
        .unwrap();
    assert_eq!(second.load(id).await.unwrap().balance, 0);
}

#[tokio::test]
async fn a_second_dispatch_appends_only_its_own_events() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    let r1 = framework.dispatch(id, AccountCommand::Open).await.unwrap();
    let r2 = framework
        .dispatch(id, AccountCommand::DepositMany(vec![1, 2, 3]))
        .await
        .unwrap();
    let r3 = framework
        .dispatch(id, AccountCommand::Deposit(4))
        .await
        .unwrap();
    assert_eq!((r1.sequence, r2.sequence, r3.sequence), (1, 4, 5));
    assert_eq!(r2.events.len(), 3);
    assert_eq!(r2.positions, vec![2, 3, 4]);

    let stored = store.load_events(Account::NAME, id, 0).await.unwrap();
    let sequences: Vec<i64> = stored.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5]);
    let mut ids: Vec<Uuid> = stored.iter().map(|e| e.event_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 5, "every stored event has its own id");
    assert_eq!(
        store.len(),
        5,
        "nothing of an earlier dispatch was stored again"
    );
}

#[tokio::test]
async fn a_command_that_changes_nothing_appends_nothing() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    open_with(&framework, id, &[]).await;
    let receipt = framework.dispatch(id, AccountCommand::Noop).await.unwrap();
    assert!(receipt.events.is_empty() && receipt.positions.is_empty());
    assert_eq!(receipt.sequence, 1);
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn a_refused_command_returns_the_domain_error_and_appends_nothing() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    let err = framework
        .dispatch(id, AccountCommand::Deposit(5))
        .await
        .unwrap_err();
    assert!(matches!(err, AccountError::NotOpen), "{err:?}");
    assert!(store.is_empty());

    open_with(&framework, id, &[10]).await;
    let err = framework
        .dispatch(id, AccountCommand::Withdraw(11))
        .await
        .unwrap_err();
    assert!(matches!(err, AccountError::Overdraft { .. }), "{err:?}");
    assert_eq!(store.event_sequence(Account::NAME, id).await.unwrap(), 2);
}

#[tokio::test]
async fn metadata_comes_back_unchanged() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    framework.dispatch(id, AccountCommand::Open).await.unwrap();

    #[derive(Serialize)]
    struct Meta<'a> {
        user: &'a str,
        request: u32,
        tags: [&'a str; 2],
    }
    framework
        .dispatch_with_metadata(
            id,
            AccountCommand::DepositMany(vec![7, 8]),
            &Meta {
                user: "ada",
                request: 42,
                tags: ["a", "ü"],
            },
        )
        .await
        .unwrap();
    let stored = store.load_events(Account::NAME, id, 0).await.unwrap();
    assert_eq!(stored[0].metadata, serde_json::Value::Null);
    let expected = json!({"user": "ada", "request": 42, "tags": ["a", "ü"]});
    assert_eq!(stored[1].metadata, expected);
    assert_eq!(stored[2].metadata, expected);
    assert_eq!(stored[1].aggregate_type_id, format!("account:{id}"));
}

#[tokio::test]
async fn metadata_that_does_not_serialize_is_a_typed_error_and_nothing_is_stored() {
    use std::collections::HashMap;
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    // JSON object keys must be strings: a map keyed by tuples does not serialize.
    let bad: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
    let err = framework
        .dispatch_with_metadata(id, AccountCommand::Open, &bad)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AccountError::Framework(CQRSError::Serialization { .. })
        ),
        "{err:?}"
    );
    assert!(store.is_empty());
}

#[tokio::test]
async fn a_corrupted_payload_gives_a_typed_error_naming_the_event() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    open_with(&framework, id, &[5]).await;
    assert!(store.update_unchecked(Account::NAME, id, 2, |e| {
        e.payload = json!({"Deposited": {"amount": "five"}}).into();
    }));
    // `framework` holds the state in its cache and would not read the damaged row again: a
    // framework without the cache (or a restarted process) rebuilds from the store.
    let framework = CQRSFramework::<Account>::new(store.clone()).without_state_cache();
    let err = framework
        .dispatch(id, AccountCommand::Deposit(1))
        .await
        .unwrap_err();
    let AccountError::Framework(CQRSError::EventDecode(decode)) = &err else {
        panic!("expected EventDecode, got {err:?}");
    };
    assert_eq!(decode.aggregate_type, "account");
    assert_eq!(decode.aggregate_id, id);
    assert_eq!(decode.sequence, 2);
    assert_eq!(decode.event_type, "Deposited");
    assert_eq!(decode.event_version, "1");
    assert!(matches!(decode.kind, DecodeError::MalformedPayload(_)));
    let message = err.to_string();
    assert!(
        message.contains("Deposited") && message.contains("sequence 2"),
        "{message}"
    );
    assert_eq!(store.len(), 2, "nothing appended after a decode failure");
}

#[tokio::test]
async fn an_unknown_event_type_gives_a_typed_error() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    open_with(&framework, id, &[5]).await;
    store.update_unchecked(Account::NAME, id, 2, |e| e.event_type = "Teleported".into());
    let err = framework.load(id).await.unwrap_err();
    let AccountError::Framework(CQRSError::EventDecode(decode)) = &err else {
        panic!("expected EventDecode, got {err:?}");
    };
    assert_eq!(
        (decode.sequence, decode.event_type.as_str()),
        (2, "Teleported")
    );
    assert!(matches!(decode.kind, DecodeError::UnknownEventType));

    // An unknown version of a known name is refused too.
    store.update_unchecked(Account::NAME, id, 2, |e| {
        e.event_type = "Deposited".into();
        e.event_version = "9".into();
    });
    let err = framework.load(id).await.unwrap_err();
    assert!(
        matches!(&err, AccountError::Framework(CQRSError::EventDecode(d)) if d.event_version == "9"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_hole_in_the_history_is_refused() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    open_with(&framework, id, &[1, 2]).await;
    assert!(store.remove_from_history_unchecked(Account::NAME, id, 2));
    let err = framework.load(id).await.unwrap_err();
    assert!(
        matches!(
            err,
            AccountError::Framework(CQRSError::SequenceGap {
                expected_sequence: 2,
                found_sequence: 3,
                ..
            })
        ),
        "{err:?}"
    );
}

const TASKS: usize = 16;
const PER_TASK: usize = 500;

async fn race(framework: Arc<CQRSFramework<Account>>, id: Uuid) -> (usize, Vec<AccountError>) {
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let framework = Arc::clone(&framework);
        handles.push(tokio::spawn(async move {
            let mut ok = 0;
            let mut errors = Vec::new();
            for _ in 0..PER_TASK {
                match framework.dispatch(id, AccountCommand::Deposit(1)).await {
                    Ok(_) => ok += 1,
                    Err(e) => errors.push(e),
                }
            }
            (ok, errors)
        }));
    }
    let mut ok = 0;
    let mut errors = Vec::new();
    for handle in handles {
        let (o, e) = handle.await.unwrap();
        ok += o;
        errors.extend(e);
    }
    (ok, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_without_retry_never_duplicate_a_sequence() {
    let store = MemoryEventRepository::new();
    // Snapshots keep each load short (a full replay per dispatch would make this test
    // quadratic in the history); the append's conflict check is the same either way.
    let framework = Arc::new(
        CQRSFramework::<Account>::new(store.clone())
            .with_snapshots(MemorySnapshotRepository::new(), SnapshotPolicy::every(64)),
    );
    let id = Uuid::new_v4();
    framework.dispatch(id, AccountCommand::Open).await.unwrap();

    let (ok, errors) = race(Arc::clone(&framework), id).await;
    assert_eq!(ok + errors.len(), TASKS * PER_TASK);
    for err in &errors {
        assert!(conflict_of(err).is_some(), "non-conflict failure: {err:?}");
    }
    let stored = store.load_events(Account::NAME, id, 0).await.unwrap();
    let n = stored.len();
    assert_eq!(n, ok + 1, "one stored deposit per successful dispatch");
    for (i, event) in stored.iter().enumerate() {
        assert_eq!(event.sequence, i as i64 + 1, "every sequence exactly once");
    }
    assert_eq!(framework.load(id).await.unwrap().balance, ok as u64);
    let plain = CQRSFramework::<Account>::new(store.clone());
    assert_eq!(
        plain.load(id).await.unwrap().balance,
        ok as u64,
        "snapshot + tail == replay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_with_retry_all_succeed_and_the_balance_is_exact() {
    let store = MemoryEventRepository::new();
    // The state cache serves the loads; a conflict evicts the entry and the retry reloads.
    let framework = Arc::new(
        CQRSFramework::<Account>::new(store.clone())
            .with_state_cache(64)
            .with_retry(RetryPolicy::attempts(1_000)),
    );
    let id = Uuid::new_v4();
    framework.dispatch(id, AccountCommand::Open).await.unwrap();

    let (ok, errors) = race(Arc::clone(&framework), id).await;
    assert!(
        errors.is_empty(),
        "failures: {:?}",
        &errors[..errors.len().min(3)]
    );
    assert_eq!(ok, TASKS * PER_TASK);
    assert_eq!(
        framework.load(id).await.unwrap().balance,
        (TASKS * PER_TASK) as u64
    );
    assert_eq!(
        store.event_sequence(Account::NAME, id).await.unwrap(),
        (TASKS * PER_TASK) as i64 + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_retrying_within_a_time_all_succeed() {
    let store = MemoryEventRepository::new();
    let framework = Arc::new(
        CQRSFramework::<Account>::new(store.clone())
            .with_retry(RetryPolicy::within(std::time::Duration::from_secs(60))),
    );
    let id = Uuid::new_v4();
    framework.dispatch(id, AccountCommand::Open).await.unwrap();

    let (ok, errors) = race(Arc::clone(&framework), id).await;
    assert!(
        errors.is_empty(),
        "failures: {:?}",
        &errors[..errors.len().min(3)]
    );
    assert_eq!(ok, TASKS * PER_TASK);
    assert_eq!(
        store.event_sequence(Account::NAME, id).await.unwrap(),
        (TASKS * PER_TASK) as i64 + 1
    );
}

#[tokio::test(start_paused = true)]
async fn retrying_within_a_time_gives_up_with_the_conflict_when_the_time_is_up() {
    // Every append loses the race: another writer always got there first.
    let store = cqrs_testkit::FaultyStore::new();
    store.fail_every_append(cqrs_testkit::Fault::Conflict);
    let time = std::time::Duration::from_millis(200);
    let framework = CQRSFramework::<Account>::new(store.clone())
        .without_state_cache()
        .with_retry(RetryPolicy::within(time).with_backoff(
            std::time::Duration::from_millis(1),
            std::time::Duration::from_millis(10),
        ));

    // The clock is paused: it moves only through the backoff sleeps, so the attempts are
    // counted on tokio's virtual time.
    let started = tokio::time::Instant::now();
    let error = framework
        .dispatch(Uuid::new_v4(), AccountCommand::Open)
        .await
        .unwrap_err();
    let spent = started.elapsed();

    assert!(
        matches!(conflict_of(&error), Some(CQRSError::Conflict { .. })),
        "expected the last conflict, got {error:?}"
    );
    let attempts = store.calls().appends;
    assert!(
        attempts > 10,
        "only {attempts} attempts in {time:?} with backoffs of at most 10 ms"
    );
    assert!(
        spent >= time,
        "gave up after {spent:?}, before the {time:?} allowed"
    );
    assert!(
        spent <= time + std::time::Duration::from_millis(10),
        "kept trying until {spent:?}, past the {time:?} allowed"
    );
}

#[tokio::test]
async fn a_refusal_is_not_retried_within_a_time() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone())
        .with_retry(RetryPolicy::within(std::time::Duration::from_secs(3600)));
    let id = Uuid::new_v4();
    // Not open: the domain refuses at once, and the hour is never waited for.
    let error = framework
        .dispatch(id, AccountCommand::Deposit(5))
        .await
        .unwrap_err();
    assert!(matches!(error, AccountError::NotOpen), "{error:?}");
    assert_eq!(store.event_sequence(Account::NAME, id).await.unwrap(), 0);
}

#[tokio::test]
async fn a_stale_append_is_a_conflict_and_stores_nothing() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    open_with(&framework, id, &[10]).await;

    // A writer that loaded at sequence 1 appends after another one moved to 2.
    let stale = cqrs::PersistableDomainEvent::new(
        Account::NAME,
        id,
        2,
        &AccountEvent::Deposited { amount: 1 },
        serde_json::Value::Null,
    )
    .unwrap();
    let err = store.append(vec![stale]).await.unwrap_err();
    assert!(
        matches!(
            err,
            CQRSError::Conflict {
                expected_sequence: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_conflict());
    assert_eq!(store.len(), 2, "the losing append stored nothing");
}

#[tokio::test]
async fn the_state_cache_serves_dispatches_and_recovers_from_a_foreign_writer() {
    let store = MemoryEventRepository::new();
    let cached = CQRSFramework::<Account>::new(store.clone()).with_state_cache(16);
    let other = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    open_with(&cached, id, &[10]).await;
    // Another process (another framework instance) moves the aggregate on behind the cache.
    other
        .dispatch(id, AccountCommand::Deposit(5))
        .await
        .unwrap();
    // The cached state (balance 10, sequence 2) is stale: the append conflicts, the cache
    // reloads, and the command runs on the fresh state without the caller seeing a conflict.
    let receipt = cached
        .dispatch(id, AccountCommand::Withdraw(15))
        .await
        .unwrap();
    assert_eq!(receipt.sequence, 4);
    assert_eq!(receipt.attempts, 1);
    assert_eq!(cached.load(id).await.unwrap().balance, 0);
}

/// The (aggregate reads, `event_sequence` reads) a store was asked for: an aggregate is read
/// with `fold_events` or `load_events`.
fn reads(store: &cqrs_testkit::FaultyStore) -> (usize, usize) {
    let calls = store.calls();
    (calls.fold_events + calls.load_events, calls.event_sequence)
}

#[tokio::test]
async fn dispatch_new_appends_at_sequence_one_without_reading_the_store() {
    let store = cqrs_testkit::FaultyStore::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    let receipt = framework
        .dispatch_new(id, AccountCommand::Open)
        .await
        .unwrap();
    assert_eq!(receipt.sequence, 1);
    assert_eq!(receipt.events, vec![AccountEvent::Opened]);
    assert_eq!(reads(&store), (0, 0));
    // The state it decided on is cached: the next command reads nothing either.
    framework
        .dispatch(id, AccountCommand::Deposit(7))
        .await
        .unwrap();
    assert_eq!(reads(&store).0, 0);
    assert_eq!(store.store().len(), 2);
    let fresh = CQRSFramework::<Account>::new(store.store().clone());
    assert_eq!(
        fresh.load(id).await.unwrap(),
        AccountState {
            open: true,
            balance: 7
        }
    );
}

#[tokio::test]
async fn dispatch_new_on_an_existing_aggregate_is_a_conflict_and_stores_nothing() {
    let store = MemoryEventRepository::new();
    let writer = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    open_with(&writer, id, &[10]).await;
    // Known to the writer's cache, unknown to a second instance's (and to one without a
    // cache), and with retries allowed: always a conflict at sequence 0, never a retry.
    let cold = CQRSFramework::<Account>::new(store.clone()).with_retry(RetryPolicy::attempts(5));
    let uncached = CQRSFramework::<Account>::new(store.clone()).without_state_cache();
    for framework in [&writer, &cold, &uncached] {
        let error = framework
            .dispatch_new(id, AccountCommand::Open)
            .await
            .unwrap_err();
        assert!(
            matches!(
                conflict_of(&error),
                Some(CQRSError::Conflict {
                    expected_sequence: 0,
                    aggregate_id,
                    ..
                }) if *aggregate_id == id
            ),
            "{error:?}"
        );
    }
    assert_eq!(store.len(), 2, "nothing was appended");
    // The failed premise left no wrong state behind: dispatch still sees the history.
    for framework in [&writer, &cold] {
        framework
            .dispatch(id, AccountCommand::Withdraw(4))
            .await
            .unwrap();
    }
    assert_eq!(writer.load(id).await.unwrap().balance, 2);
}

#[tokio::test]
async fn dispatch_new_checks_the_premise_before_returning_a_refusal_or_no_change() {
    let store = cqrs_testkit::FaultyStore::new();
    let framework = CQRSFramework::<Account>::new(store.clone());
    let other = CQRSFramework::<Account>::new(store.store().clone());
    let (new, existing) = (Uuid::new_v4(), Uuid::new_v4());
    open_with(&other, existing, &[10]).await;

    // On a new aggregate the domain's answer stands, after one cheap read.
    let refusal = framework
        .dispatch_new(new, AccountCommand::Deposit(5))
        .await
        .unwrap_err();
    assert!(matches!(refusal, AccountError::NotOpen), "{refusal:?}");
    let receipt = framework
        .dispatch_new(new, AccountCommand::Noop)
        .await
        .unwrap();
    assert_eq!((receipt.sequence, receipt.events.len()), (0, 0));
    assert_eq!(reads(&store), (0, 2));

    // On an existing one, the refusal ("not open") and the no-op were decided on a state
    // that is not the aggregate's: both are conflicts instead.
    for command in [AccountCommand::Deposit(5), AccountCommand::Noop] {
        let error = framework.dispatch_new(existing, command).await.unwrap_err();
        assert!(conflict_of(&error).is_some(), "{error:?}");
    }
    // And the empty state they were decided on was not kept in the cache.
    framework
        .dispatch(existing, AccountCommand::Withdraw(10))
        .await
        .unwrap();
    assert_eq!(store.store().len(), 3);
}

#[tokio::test]
async fn concurrent_dispatch_new_on_one_id_has_exactly_one_winner() {
    let store = MemoryEventRepository::new();
    let framework = Arc::new(CQRSFramework::<Account>::new(store.clone()));
    let id = Uuid::new_v4();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let framework = Arc::clone(&framework);
            tokio::spawn(async move { framework.dispatch_new(id, AccountCommand::Open).await })
        })
        .collect();
    let (mut won, mut conflicts) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(receipt) => {
                assert_eq!(receipt.sequence, 1);
                won += 1;
            }
            Err(error) => {
                assert!(conflict_of(&error).is_some(), "{error:?}");
                conflicts += 1;
            }
        }
    }
    assert_eq!((won, conflicts), (1, 15));
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn snapshots_give_the_same_state_as_a_full_replay_and_bad_ones_are_replaced() {
    let store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    let with = CQRSFramework::<Account>::new(store.clone())
        .with_snapshots(snapshots.clone(), SnapshotPolicy::every(3));
    let without = CQRSFramework::<Account>::new(store.clone());
    let id = Uuid::new_v4();
    open_with(&with, id, &[1, 2, 3, 4, 5, 6, 7]).await;
    with.dispatch(id, AccountCommand::Withdraw(9))
        .await
        .unwrap();

    use cqrs::SnapshotRepository;
    let snapshot = snapshots
        .load_snapshot(Account::NAME, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.sequence, 9, "taken when the append crossed 9");
    assert_eq!(
        with.load(id).await.unwrap(),
        without.load(id).await.unwrap()
    );

    // A snapshot that no longer decodes: full replay, then rewritten.
    let mut broken = snapshot.clone();
    broken.state = json!({"open": "yes"});
    snapshots.save_snapshot(broken).await.unwrap();
    assert_eq!(with.load(id).await.unwrap().balance, 28 - 9);
    let rewritten = snapshots
        .load_snapshot(Account::NAME, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rewritten.state, json!({"open": true, "balance": 19}));
}

#[test]
fn the_framework_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CQRSFramework<Account>>();
    let _ = AccountEvent::EVENT_TYPES;
}
