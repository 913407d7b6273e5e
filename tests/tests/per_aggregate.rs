//! `PerAggregateProjection`, the engine of the Lambda adapters, on the SQLite, in-memory and
//! (when `CQRS_POSTGRES_URL` is set) PostgreSQL view stores: a redelivered batch changes nothing, a reordered one applies in
//! sequence order, a gap fails (or is filled from the event store), a poison event stops its
//! aggregate (and only it) or becomes a dead letter, two invocations racing on the same batch
//! apply each event once, and a batch costs one commit per aggregate.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs::sqlx::postgres::PgPoolOptions;
use cqrs::sqlx::Executor;
use cqrs::{PostgresDeadLetters, PostgresEventRepository, PostgresViewRepository};

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, Checkpoint, DeadLetters, EventEnvelope, EventOutcome,
    EventRepository, HandlerRetry, MemoryDeadLetters, MemoryEventRepository, MemoryViewRepository,
    PerAggregateProjection, PersistableDomainEvent, PoisonPolicy, SkipReason, SqliteDeadLetters,
    SqliteEventRepository, SqliteViewRepository, View, ViewContext, ViewRepository,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod common;

use common::counter::counter_event;
use common::ledger::{Ledger, LedgerError, LedgerEvent};

/// The amount the view refuses: a poison event.
const POISON: u64 = 13;

/// A ledger's deposits; refuses an event at or before the last one it applied (an event
/// applied twice or out of order) and the amount [`POISON`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Balance {
    sum: u64,
    last_sequence: i64,
}

impl View<Ledger> for Balance {
    const TABLE_NAME: &'static str = "pa_balances";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        if envelope.sequence <= self.last_sequence {
            return Err(LedgerError::OutOfOrder {
                last: self.last_sequence,
                got: envelope.sequence,
            });
        }
        let LedgerEvent::Deposited { amount } = envelope.event;
        if amount == POISON {
            return Err(LedgerError::Unlucky(amount));
        }
        self.sum += amount;
        self.last_sequence = envelope.sequence;
        Ok(())
    }
}

/// One back end: an event store to dispatch on, a view store and a dead-letter sink.
trait Backend {
    type Store: EventRepository + Clone + 'static;
    type Views: ViewRepository<Ledger, Balance> + Clone + 'static;
    type Sink: DeadLetters + Clone + 'static;

    fn store(&self) -> Self::Store;
    fn views(&self) -> Self::Views;
    fn sink(&self) -> Self::Sink;
    /// Removes what the backend created on a server.
    async fn teardown(self)
    where
        Self: Sized,
    {
    }
}

struct Memory {
    store: MemoryEventRepository,
    views: MemoryViewRepository<Balance>,
    sink: MemoryDeadLetters,
}

impl Memory {
    fn new() -> Self {
        Memory {
            store: MemoryEventRepository::new(),
            views: MemoryViewRepository::new(),
            sink: MemoryDeadLetters::new(),
        }
    }
}

impl Backend for Memory {
    type Store = MemoryEventRepository;
    type Views = MemoryViewRepository<Balance>;
    type Sink = MemoryDeadLetters;

    fn store(&self) -> Self::Store {
        self.store.clone()
    }
    fn views(&self) -> Self::Views {
        self.views.clone()
    }
    fn sink(&self) -> Self::Sink {
        self.sink.clone()
    }
}

struct Sqlite {
    path: PathBuf,
    store: SqliteEventRepository,
}

impl Sqlite {
    async fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("cqrs-per-aggregate-{}.sqlite", Uuid::new_v4()));
        let store = SqliteEventRepository::open(&path).await.unwrap();
        Sqlite { path, store }
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

impl Backend for Sqlite {
    type Store = SqliteEventRepository;
    type Views = SqliteViewRepository<Balance>;
    type Sink = SqliteDeadLetters;

    fn store(&self) -> Self::Store {
        self.store.clone()
    }
    fn views(&self) -> Self::Views {
        self.store.views()
    }
    fn sink(&self) -> Self::Sink {
        SqliteDeadLetters::new(&self.store)
    }
}

struct Postgres {
    store: PostgresEventRepository,
}

impl Postgres {
    /// A store in a fresh schema, or `None` (and a line saying so) without the variable.
    async fn new() -> Option<Self> {
        let url = cqrs_tests::server_url(
            "CQRS_POSTGRES_URL",
            "postgres per-aggregate projection",
            "postgres://postgres@127.0.0.1:5432/test",
        )?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!("CQRS_POSTGRES_URL is set but the server is unreachable: {e}")
            });
        let schema = format!("pa_{}", Uuid::new_v4().simple());
        let store = PostgresEventRepository::from_pool(pool)
            .with_schema(&schema)
            .unwrap();
        store.migrate().await.unwrap();
        Some(Postgres { store })
    }
}

impl Backend for Postgres {
    type Store = PostgresEventRepository;
    type Views = PostgresViewRepository<Balance>;
    type Sink = PostgresDeadLetters;

    fn store(&self) -> Self::Store {
        self.store.clone()
    }
    fn views(&self) -> Self::Views {
        self.store.views()
    }
    fn sink(&self) -> Self::Sink {
        PostgresDeadLetters::new(&self.store)
    }
    async fn teardown(self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.store.schema());
        if let Err(error) = self.store.pool().execute(sql.as_str()).await {
            eprintln!("could not drop schema {}: {error}", self.store.schema());
        }
        self.store.pool().close().await;
    }
}

/// Dispatches one deposit per amount on ledger `id`; returns the stored events.
async fn deposit<B: Backend>(
    backend: &B,
    id: Uuid,
    amounts: &[u64],
) -> Vec<PersistableDomainEvent> {
    let framework = CQRSFramework::<Ledger>::new(backend.store());
    for &amount in amounts {
        framework.dispatch(id, vec![amount]).await.unwrap();
    }
    backend
        .store()
        .load_events(Ledger::NAME, id, 0)
        .await
        .unwrap()
}

fn projection<B: Backend>(backend: &B) -> PerAggregateProjection<Ledger, Balance> {
    PerAggregateProjection::new(backend.views())
        .with_dead_letters(backend.sink())
        .with_handler_retry(HandlerRetry::none())
}

async fn balance<B: Backend>(backend: &B, id: Uuid) -> Balance {
    ViewRepository::<Ledger, Balance>::load(&backend.views(), &id.to_string())
        .await
        .unwrap()
        .unwrap_or_default()
}

fn committed(n: usize) -> Vec<EventOutcome> {
    (0..n).map(|_| EventOutcome::Committed).collect()
}

fn covered(n: usize) -> Vec<EventOutcome> {
    (0..n)
        .map(|_| EventOutcome::Skipped(SkipReason::Covered))
        .collect()
}

fn gap(id: Uuid, expected_sequence: i64, found_sequence: i64) -> EventOutcome {
    EventOutcome::Failed(CQRSError::SequenceGap {
        aggregate_type: Ledger::NAME.to_owned(),
        aggregate_id: id,
        expected_sequence,
        found_sequence,
    })
}

async fn a_redelivered_batch_changes_nothing<B: Backend>(backend: &B) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut batch = deposit(backend, a, &[1, 2, 3]).await;
    batch.extend(deposit(backend, b, &[10, 20]).await);
    let projection = projection(backend);
    assert_eq!(projection.apply(&batch).await, committed(5));
    assert_eq!(projection.apply(&batch).await, covered(5));
    // A second projector on the same store: the checkpoints are the store's, not its own.
    assert_eq!(self::projection(backend).apply(&batch).await, covered(5));
    assert_eq!(balance(backend, a).await.sum, 6);
    assert_eq!(balance(backend, b).await.sum, 30);
    assert_eq!(projection.sequence(a).await.unwrap(), 3);
    assert_eq!(projection.sequence(b).await.unwrap(), 2);
    // A batch that overlaps the applied events applies only what is new.
    let more = deposit(backend, a, &[4]).await;
    assert_eq!(
        projection.apply(&more).await,
        covered(3)
            .into_iter()
            .chain(committed(1))
            .collect::<Vec<_>>()
    );
    assert_eq!(balance(backend, a).await.sum, 10);
}

async fn a_reordered_batch_applies_in_sequence_order<B: Backend>(backend: &B) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut batch = deposit(backend, a, &[1, 2, 3]).await;
    batch.extend(deposit(backend, b, &[10, 20]).await);
    batch.reverse();
    // The same event twice in one batch counts once.
    batch.push(batch[0].clone());
    let projection = projection(backend);
    let outcomes = projection.apply(&batch).await;
    assert_eq!(
        outcomes,
        committed(5)
            .into_iter()
            .chain(covered(1))
            .collect::<Vec<_>>(),
        "the view refuses an event out of order"
    );
    assert_eq!(
        balance(backend, a).await,
        Balance {
            sum: 6,
            last_sequence: 3
        }
    );
    assert_eq!(
        balance(backend, b).await,
        Balance {
            sum: 30,
            last_sequence: 2
        }
    );
}

async fn a_gap_fails_until_the_missing_event_comes<B: Backend>(backend: &B) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let events = deposit(backend, a, &[1, 2, 3, 4]).await;
    let other = deposit(backend, b, &[10]).await;
    let projection = projection(backend);
    // Sequence 2 missing: 1 applies, 3 and 4 fail; the other ledger is not held back.
    let batch = vec![
        events[0].clone(),
        events[2].clone(),
        other[0].clone(),
        events[3].clone(),
    ];
    assert_eq!(
        projection.apply(&batch).await,
        vec![
            EventOutcome::Committed,
            gap(a, 2, 3),
            EventOutcome::Committed,
            gap(a, 2, 4),
        ]
    );
    assert_eq!(projection.sequence(a).await.unwrap(), 1);
    assert_eq!(balance(backend, a).await.sum, 1);
    // Lambda delivers again from the failed record, with the missing one now.
    let again = vec![
        events[1].clone(),
        events[2].clone(),
        other[0].clone(),
        events[3].clone(),
    ];
    assert_eq!(
        projection.apply(&again).await,
        vec![
            EventOutcome::Committed,
            EventOutcome::Committed,
            EventOutcome::Skipped(SkipReason::Covered),
            EventOutcome::Committed,
        ]
    );
    assert_eq!(
        balance(backend, a).await,
        Balance {
            sum: 10,
            last_sequence: 4
        }
    );
}

async fn a_gap_is_filled_from_the_event_store<B: Backend>(backend: &B) {
    let a = Uuid::new_v4();
    let events = deposit(backend, a, &[1, 2, 3, 4, 5]).await;
    let projection = projection(backend).with_event_store(backend.store());
    assert_eq!(
        projection
            .apply(&[events[2].clone(), events[4].clone()])
            .await,
        committed(2)
    );
    assert_eq!(
        balance(backend, a).await,
        Balance {
            sum: 15,
            last_sequence: 5
        }
    );
    assert_eq!(
        projection.apply(&events).await,
        covered(5),
        "the filled events are covered when they come"
    );
    // An event the store does not have either still fails.
    let ahead = PersistableDomainEvent::new(
        Ledger::NAME,
        a,
        7,
        &LedgerEvent::Deposited { amount: 7 },
        serde_json::Value::Null,
    )
    .unwrap();
    assert_eq!(projection.apply(&[ahead]).await, vec![gap(a, 6, 7)]);
}

async fn a_poison_event_stops_its_aggregate_only<B: Backend>(backend: &B) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut batch = deposit(backend, a, &[5, POISON, 7]).await;
    batch.extend(deposit(backend, b, &[10]).await);
    let projection = projection(backend);
    let outcomes = projection.apply(&batch).await;
    assert_eq!(outcomes[0], EventOutcome::Committed);
    assert!(
        matches!(&outcomes[1], EventOutcome::Failed(CQRSError::ViewHandler(e)) if e.sequence == 2),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(outcomes[2], gap(a, 2, 3));
    assert_eq!(outcomes[3], EventOutcome::Committed);
    assert_eq!(projection.sequence(a).await.unwrap(), 1);
    assert_eq!(balance(backend, a).await.sum, 5);
    assert_eq!(balance(backend, b).await.sum, 10);
    assert!(projection.dead_letters().await.unwrap().is_empty());
    // Delivered again, it fails again: the stream waits at it, loudly.
    let again = projection.apply(&batch[1..]).await;
    assert!(again[0].is_failed() && again[1].is_failed());
    assert_eq!(again[2], EventOutcome::Skipped(SkipReason::Covered));
}

async fn a_poison_event_becomes_a_dead_letter_and_the_stream_goes_on<B: Backend>(backend: &B) {
    let a = Uuid::new_v4();
    let batch = deposit(backend, a, &[5, POISON, 7]).await;
    let projection = projection(backend).with_poison_policy(PoisonPolicy::SkipAndRecord);
    assert_eq!(
        projection.apply(&batch).await,
        vec![
            EventOutcome::Committed,
            EventOutcome::Skipped(SkipReason::DeadLettered),
            EventOutcome::Committed,
        ]
    );
    assert_eq!(projection.sequence(a).await.unwrap(), 3);
    assert_eq!(
        balance(backend, a).await,
        Balance {
            sum: 12,
            last_sequence: 3
        }
    );
    let letters = projection.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].projection, projection.name());
    assert_eq!(letters[0].aggregate_id, a);
    assert_eq!(letters[0].sequence, 2);
    assert_eq!(letters[0].position, batch[1].position);
    assert!(letters[0].error.contains("unlucky"), "{}", letters[0].error);
    // Redelivered: covered, and still one dead letter.
    assert_eq!(projection.apply(&batch).await, covered(3));
    assert_eq!(projection.dead_letters().await.unwrap().len(), 1);
}

async fn events_of_another_aggregate_type_are_passed_over<B: Backend>(backend: &B) {
    let a = Uuid::new_v4();
    let mut batch = deposit(backend, a, &[1]).await;
    batch.insert(0, counter_event(a, 1, 5));
    let outcomes = projection(backend).apply(&batch).await;
    assert_eq!(
        outcomes,
        vec![
            EventOutcome::Skipped(SkipReason::OtherAggregateType),
            EventOutcome::Committed,
        ]
    );
}

async fn two_invocations_on_the_same_batch_apply_each_event_once<B: Backend>(backend: &B) {
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let mut batch = Vec::new();
    for id in &ids {
        batch.extend(deposit(backend, *id, &[1, 2, 3, 4, 5, 6]).await);
    }
    let first = projection(backend);
    let second = projection(backend).with_concurrency(1);
    let (one, two) = tokio::join!(first.apply(&batch), second.apply(&batch));
    for (index, (one, two)) in one.iter().zip(&two).enumerate() {
        assert!(
            !one.is_failed() && !two.is_failed(),
            "event {index}: {one:?} / {two:?}"
        );
    }
    for id in &ids {
        assert_eq!(
            balance(backend, *id).await,
            Balance {
                sum: 21,
                last_sequence: 6
            }
        );
    }
}

/// A view store that counts what a batch asks of it.
#[derive(Clone, Default)]
struct Counting {
    inner: MemoryViewRepository<Balance>,
    checkpoint_reads: Arc<AtomicUsize>,
    row_loads: Arc<AtomicUsize>,
    commits: Arc<AtomicUsize>,
}

#[cqrs::async_trait]
impl ViewRepository<Ledger, Balance> for Counting {
    async fn load(&self, view_id: &str) -> Result<Option<Balance>, CQRSError> {
        ViewRepository::<Ledger, Balance>::load(&self.inner, view_id).await
    }
    async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Balance)>, CQRSError> {
        ViewRepository::<Ledger, Balance>::list(&self.inner, after, limit).await
    }
    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<Balance>, CQRSError> {
        self.row_loads.fetch_add(1, Ordering::Relaxed);
        ViewRepository::<Ledger, Balance>::load_for_update(&self.inner, view_id).await
    }
    async fn commit(
        &self,
        changes: Vec<ViewContext<Balance>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        ViewRepository::<Ledger, Balance>::commit(&self.inner, changes, checkpoint).await
    }
    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        self.checkpoint_reads.fetch_add(1, Ordering::Relaxed);
        ViewRepository::<Ledger, Balance>::checkpoint(&self.inner, name).await
    }
}

#[tokio::test]
async fn a_batch_costs_one_commit_per_aggregate() {
    let backend = Memory::new();
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let mut batch = Vec::new();
    for id in &ids {
        batch.extend(deposit(&backend, *id, &[1; 10]).await);
    }
    let views = Counting::default();
    let projection = PerAggregateProjection::<Ledger, Balance>::new(views.clone());
    assert_eq!(projection.apply(&batch).await, committed(100));
    let count = |n: &AtomicUsize| n.load(Ordering::Relaxed);
    // Per aggregate: the checkpoint read, the row, the checkpoint read again just before
    // the commit, and one commit.
    assert_eq!(count(&views.commits), 10);
    assert_eq!(count(&views.row_loads), 10);
    assert_eq!(count(&views.checkpoint_reads), 20);
    // Delivered again: one checkpoint read per aggregate, nothing written.
    assert_eq!(projection.apply(&batch).await, covered(100));
    assert_eq!(count(&views.commits), 10);
    assert_eq!(count(&views.checkpoint_reads), 30);
}

macro_rules! suite {
    ($backend:ident, $new:expr) => {
        mod $backend {
            use super::*;

            suite!(@tests $new;
                a_redelivered_batch_changes_nothing,
                a_reordered_batch_applies_in_sequence_order,
                a_gap_fails_until_the_missing_event_comes,
                a_gap_is_filled_from_the_event_store,
                a_poison_event_stops_its_aggregate_only,
                a_poison_event_becomes_a_dead_letter_and_the_stream_goes_on,
                events_of_another_aggregate_type_are_passed_over,
                two_invocations_on_the_same_batch_apply_each_event_once,
            );
        }
    };
    (@tests $new:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let Some(backend) = $new else { return };
                super::$test(&backend).await;
                backend.teardown().await;
            }
        )*
    };
}

suite!(memory, Some(Memory::new()));
suite!(sqlite, Some(Sqlite::new().await));
suite!(postgres, Postgres::new().await);
