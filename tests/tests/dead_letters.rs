//! Durable dead letters on the SQL stores: under `PoisonPolicy::SkipAndRecord` a poison
//! event ends up in `cqrs_dead_letters` naming the projection, view, aggregate and sequence,
//! the view skips it and goes on, and a restart (even one that re-meets the poison event)
//! does not duplicate the record.
//!
//! SQLite always; PostgreSQL when `CQRS_POSTGRES_URL` is set (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`), each test in its own schema.

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use cqrs::sqlx::postgres::PgPoolOptions;
use cqrs::sqlx::Executor;
use cqrs::PostgresDeadLetters;
use cqrs::SqliteDeadLetters;
use cqrs::{
    CQRSFramework, Checkpoint, CheckpointRepository, EventEnvelope, EventRepository, PoisonPolicy,
    PostgresEventRepository, PostgresViewRepository, Projection, SqliteEventRepository, View,
    ViewRepository,
};
use cqrs::{DeadLetter, DeadLetterSkip, DeadLetters, HandlerRetry};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod common;

use common::ledger::{Ledger, LedgerError, LedgerEvent};

const URL_VAR: &str = "CQRS_POSTGRES_URL";
const POISON: u64 = 13;

/// Sums a ledger's deposits; refuses the amount 13 (the poison event).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Balance {
    sum: u64,
    deposits: u64,
}

impl View<Ledger> for Balance {
    const TABLE_NAME: &'static str = "dl_balances";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        let LedgerEvent::Deposited { amount } = envelope.event;
        if amount == POISON {
            return Err(LedgerError::Unlucky(amount));
        }
        self.sum += amount;
        self.deposits += 1;
        Ok(())
    }
}

/// One back end: its event store, views, dead-letter sink, and raw access for the checks.
trait Backend {
    type Store: EventRepository + CheckpointRepository + Clone + 'static;
    type Views: ViewRepository<Ledger, Balance> + Clone + 'static;
    type Sink: DeadLetters + Clone + 'static;

    fn store(&self) -> Self::Store;
    fn views(&self) -> Self::Views;
    fn sink(&self) -> Self::Sink;
    /// Rows in `cqrs_dead_letters`, all projections.
    async fn rows(&self) -> i64;
}

struct Sqlite {
    path: PathBuf,
    store: SqliteEventRepository,
}

impl Sqlite {
    async fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("cqrs-dead-letters-{}.sqlite", Uuid::new_v4()));
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
    type Views = cqrs::SqliteViewRepository<Balance>;
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
    async fn rows(&self) -> i64 {
        cqrs::sqlx::query_scalar("SELECT count(*) FROM cqrs_dead_letters")
            .fetch_one(self.store.pool())
            .await
            .unwrap()
    }
}

struct Postgres {
    store: PostgresEventRepository,
}

impl Postgres {
    /// A store in a fresh schema, or `None` (and a line saying so) without the variable.
    async fn new() -> Option<Self> {
        let url = cqrs_tests::server_url(
            URL_VAR,
            "postgres dead letters",
            "postgres://postgres@127.0.0.1:5432/test",
        )?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{URL_VAR} is set but the server is unreachable: {e}"));
        let schema = format!("dl_{}", Uuid::new_v4().simple());
        let store = PostgresEventRepository::from_pool(pool)
            .with_schema(&schema)
            .unwrap();
        store.migrate().await.unwrap();
        Some(Postgres { store })
    }

    async fn drop_schema(self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.store.schema());
        if let Err(error) = self.store.pool().execute(sql.as_str()).await {
            eprintln!("could not drop schema {}: {error}", self.store.schema());
        }
        self.store.pool().close().await;
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
        PostgresViewRepository::new(&self.store)
    }
    fn sink(&self) -> Self::Sink {
        PostgresDeadLetters::new(&self.store)
    }
    async fn rows(&self) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM \"{}\".cqrs_dead_letters",
            self.store.schema()
        );
        cqrs::sqlx::query_scalar(&sql)
            .fetch_one(self.store.pool())
            .await
            .unwrap()
    }
}

fn projection<B: Backend>(backend: &B) -> Projection<Ledger, Balance> {
    Projection::new(backend.store(), backend.views())
        .with_poison_policy(PoisonPolicy::SkipAndRecord)
        .with_handler_retry(HandlerRetry::none())
        .with_dead_letters(backend.sink())
}

async fn balance<B: Backend>(backend: &B, id: Uuid) -> Option<Balance> {
    backend.views().load(&id.to_string()).await.unwrap()
}

/// The poison event is recorded with everything that names it, skipped, and recorded once
/// however often the projection restarts, even when a restart meets it again.
async fn poison_event_is_recorded_once<B: Backend>(backend: &B) {
    let framework = CQRSFramework::<Ledger>::new(backend.store());
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    framework.dispatch(a, vec![1, 2]).await.unwrap(); // positions 1, 2
    let poison = framework.dispatch(a, vec![POISON]).await.unwrap(); // position 3
    let poison_position = poison.last_position().unwrap();

    let first = projection(backend);
    let name = first.name().to_owned();
    assert_eq!(first.catch_up().await.unwrap(), poison_position);
    assert_eq!(
        balance(backend, a).await,
        Some(Balance {
            sum: 3,
            deposits: 2
        }),
        "the view skipped the poison event and kept the others"
    );

    let letters = first.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.projection, name);
    assert_eq!(letter.view, "dl_balances");
    assert_eq!(letter.aggregate_type, "ledger");
    assert_eq!(letter.aggregate_id, a);
    assert_eq!(letter.sequence, 3);
    assert_eq!(letter.position, poison_position);
    assert_eq!(letter.event_type, "Deposited");
    assert_eq!(letter.event_version, "1");
    assert_eq!(letter.attempts, 1);
    assert!(
        letter.error.contains("unlucky amount 13"),
        "{}",
        letter.error
    );
    assert!(letter.error.contains("dl_balances"), "{}", letter.error);
    assert_eq!(backend.rows().await, 1);
    drop(first);

    // A restart after the skip: nothing to do, nothing recorded again.
    let second = projection(backend);
    assert_eq!(second.catch_up().await.unwrap(), poison_position);
    assert_eq!(backend.rows().await, 1);

    // A restart that meets the poison event again (its checkpoint put back before it, as
    // after a crash between a record and its checkpoint): still one record.
    backend
        .store()
        .save_checkpoint(Checkpoint {
            name: name.clone(),
            position: poison_position - 1,
        })
        .await
        .unwrap();
    let third = projection(backend);
    assert_eq!(third.catch_up().await.unwrap(), poison_position);
    assert_eq!(backend.rows().await, 1);
    assert_eq!(third.dead_letters().await.unwrap().len(), 1);
    assert_eq!(balance(backend, a).await.unwrap().sum, 3);

    // The view goes on past it.
    let after = framework.dispatch(b, vec![5]).await.unwrap();
    assert_eq!(
        third.catch_up().await.unwrap(),
        after.last_position().unwrap()
    );
    assert_eq!(
        balance(backend, b).await,
        Some(Balance {
            sum: 5,
            deposits: 1
        })
    );
    assert_eq!(backend.rows().await, 1);
}

/// The sink's own contract (records, replacement, `record_and_skip`) is in the testkit's
/// dead-letter conformance suite, run by `store_sqlite` and `store_postgres`; here, what is
/// the SQL stores' own: the checkpoint a skip moves is the one the event store's
/// `CheckpointRepository` reads.
async fn skip_moves_the_checkpoint_the_store_reads<B: Backend>(backend: &B) {
    let sink = backend.sink();
    let letter = DeadLetter {
        projection: "p_v1".to_owned(),
        view: "p".to_owned(),
        event_id: Uuid::new_v4(),
        aggregate_type: "ledger".to_owned(),
        aggregate_id: Uuid::new_v4(),
        sequence: 4,
        position: 20,
        event_type: "Deposited".to_owned(),
        event_version: "1".to_owned(),
        error: "refused".to_owned(),
        attempts: 3,
        recorded_at: Utc::now(),
    };
    assert_eq!(
        sink.record_and_skip(&letter, 0).await.unwrap(),
        DeadLetterSkip::Committed
    );
    assert_eq!(backend.store().load_checkpoint("p_v1").await.unwrap(), 20);
    assert_eq!(backend.rows().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_poison_event_is_recorded_once() {
    poison_event_is_recorded_once(&Sqlite::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_skip_moves_the_checkpoint_the_store_reads() {
    skip_moves_the_checkpoint_the_store_reads(&Sqlite::new().await).await;
}

/// A sink on another file than the views: the projection notices that the sink did not
/// move the view's checkpoint and records the letter before committing the checkpoint
/// itself (at least once), still skipping the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sink_on_another_file_falls_back_to_at_least_once() {
    let (views, elsewhere) = (Sqlite::new().await, Sqlite::new().await);
    let framework = CQRSFramework::<Ledger>::new(views.store());
    let a = Uuid::new_v4();
    let poison = framework.dispatch(a, vec![1, POISON, 2]).await.unwrap();
    let projection = Projection::<Ledger, Balance>::new(views.store(), views.views())
        .with_poison_policy(PoisonPolicy::SkipAndRecord)
        .with_handler_retry(HandlerRetry::none())
        .with_dead_letters(elsewhere.sink());
    assert_eq!(
        projection.catch_up().await.unwrap(),
        poison.last_position().unwrap()
    );
    assert_eq!(
        balance(&views, a).await,
        Some(Balance {
            sum: 3,
            deposits: 2
        })
    );
    let letters = projection.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].sequence, 2);
    assert_eq!(elsewhere.rows().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_poison_event_is_recorded_once() {
    let Some(backend) = Postgres::new().await else {
        return;
    };
    poison_event_is_recorded_once(&backend).await;
    backend.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_skip_moves_the_checkpoint_the_store_reads() {
    let Some(backend) = Postgres::new().await else {
        return;
    };
    skip_moves_the_checkpoint_the_store_reads(&backend).await;
    backend.drop_schema().await;
}

// ---------------------------------------------------------------------------------------
// A damaged row in the middle of the store: one poison event, the rest applied.

/// How a test damages the row at position 3 behind the store's back.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// A payload that is not JSON: the row is read as stored and does not decode.
    Payload,
    /// Metadata that is not JSON: the row cannot become an event at all.
    Metadata,
}

impl Damage {
    fn sql(self) -> &'static str {
        match self {
            Damage::Payload => {
                "UPDATE cqrs_events SET payload = '{\"Deposited\": oops' WHERE position = 3"
            }
            Damage::Metadata => "UPDATE cqrs_events SET metadata = '{oops' WHERE position = 3",
        }
    }

    /// What the error of the damaged row says.
    fn says(self) -> &'static str {
        match self {
            Damage::Payload => "malformed payload",
            Damage::Metadata => "metadata is not JSON",
        }
    }
}

/// A SQLite store holding a1 a2 b1 a3 b2 (positions 1..=5, amounts 1..=5) with position 3
/// damaged; `own_pool` reads through a sqlx pool (`from_pool`, the page-as-JSON path) rather
/// than the store's own read connections.
async fn damaged_store(damage: Damage, own_pool: bool) -> (Sqlite, Uuid, Uuid) {
    let mut backend = Sqlite::new().await;
    if own_pool {
        let options = cqrs::sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&backend.path)
            .journal_mode(cqrs::sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = cqrs::sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .unwrap();
        backend.store = SqliteEventRepository::from_pool(pool, Default::default())
            .await
            .unwrap();
    }
    let framework = CQRSFramework::<Ledger>::new(backend.store());
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, amount) in [(a, 1), (a, 2), (b, 3), (a, 4), (b, 5)] {
        framework.dispatch(id, vec![amount]).await.unwrap();
    }
    let changed = backend
        .store
        .pool()
        .execute(damage.sql())
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);
    (backend, a, b)
}

async fn a_damaged_row_is_skipped_and_recorded_once(damage: Damage, own_pool: bool) {
    let (backend, a, b) = damaged_store(damage, own_pool).await;
    // The store reads the global stream past the damaged row.
    let page = backend.store.read_all(0, 10).await;
    match damage {
        Damage::Payload => assert_eq!(page.unwrap().len(), 5),
        Damage::Metadata => {
            assert_eq!(page.unwrap().len(), 2, "the events before the damaged row");
            match backend.store.read_all(2, 10).await {
                Err(cqrs::CQRSError::DamagedRow(row)) => {
                    assert_eq!(row.position, 3);
                    assert_eq!(row.aggregate_id, Some(b));
                    assert_eq!(row.sequence, Some(1));
                }
                other => panic!("expected DamagedRow at position 3, got {other:?}"),
            }
            assert_eq!(backend.store.read_all(3, 10).await.unwrap().len(), 2);
        }
    }

    let skipping = projection(&backend);
    assert_eq!(skipping.catch_up().await.unwrap(), 5);
    assert_eq!(
        balance(&backend, a).await,
        Some(Balance {
            sum: 7,
            deposits: 3
        }),
        "{damage:?}: the events before and after the damaged row are applied"
    );
    assert_eq!(
        balance(&backend, b).await,
        Some(Balance {
            sum: 5,
            deposits: 1
        })
    );
    let letters = skipping.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.position, 3);
    assert_eq!(
        (letter.aggregate_type.as_str(), letter.aggregate_id),
        ("ledger", b)
    );
    assert_eq!(letter.sequence, 1);
    assert_eq!(letter.event_type, "Deposited");
    assert!(letter.error.contains(damage.says()), "{}", letter.error);
    assert_eq!(backend.rows().await, 1);

    // A restart finds nothing more to do and records nothing again.
    assert_eq!(projection(&backend).catch_up().await.unwrap(), 5);
    assert_eq!(backend.rows().await, 1);
}

async fn a_damaged_row_stops_a_halting_projection_just_before_it(damage: Damage, own_pool: bool) {
    let (backend, a, b) = damaged_store(damage, own_pool).await;
    let projection = Projection::<Ledger, Balance>::new(backend.store(), backend.views())
        .with_handler_retry(HandlerRetry::none());
    for _ in 0..2 {
        let error = projection.catch_up().await.unwrap_err();
        match (&error, damage) {
            (cqrs::CQRSError::EventDecode(decode), Damage::Payload) => {
                assert_eq!((decode.aggregate_id, decode.sequence), (b, 1));
                assert!(
                    matches!(decode.kind, cqrs::DecodeError::MalformedPayload(_)),
                    "{decode:?}"
                );
            }
            (cqrs::CQRSError::DamagedRow(row), Damage::Metadata) => {
                assert_eq!((row.position, row.aggregate_id), (3, Some(b)));
            }
            _ => panic!("{damage:?}: unexpected error {error:?}"),
        }
        // The events before it are committed and the checkpoint stays just before it.
        assert_eq!(projection.position().await.unwrap(), 2);
        assert_eq!(
            balance(&backend, a).await,
            Some(Balance {
                sum: 3,
                deposits: 2
            })
        );
        assert_eq!(balance(&backend, b).await, None);
    }
    assert!(projection.dead_letters().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_damaged_payload_is_one_dead_letter_and_the_rest_is_applied() {
    for own_pool in [false, true] {
        a_damaged_row_is_skipped_and_recorded_once(Damage::Payload, own_pool).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_damaged_metadata_is_one_dead_letter_and_the_rest_is_applied() {
    for own_pool in [false, true] {
        a_damaged_row_is_skipped_and_recorded_once(Damage::Metadata, own_pool).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_damaged_payload_stops_a_halting_projection_just_before_it() {
    for own_pool in [false, true] {
        a_damaged_row_stops_a_halting_projection_just_before_it(Damage::Payload, own_pool).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_damaged_metadata_stops_a_halting_projection_just_before_it() {
    for own_pool in [false, true] {
        a_damaged_row_stops_a_halting_projection_just_before_it(Damage::Metadata, own_pool).await;
    }
}

/// A damaged row of another aggregate type is none of this view's business: passed over
/// without a dead letter, like any event of another type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_damaged_row_of_another_aggregate_type_is_passed_over() {
    for damage in [Damage::Payload, Damage::Metadata] {
        let (backend, a, _) = damaged_store(damage, false).await;
        backend
            .store
            .pool()
            .execute("UPDATE cqrs_events SET aggregate_type = 'other' WHERE position = 3")
            .await
            .unwrap();
        let projection = Projection::<Ledger, Balance>::new(backend.store(), backend.views())
            .with_handler_retry(HandlerRetry::none());
        assert_eq!(projection.catch_up().await.unwrap(), 5, "{damage:?}");
        assert_eq!(balance(&backend, a).await.unwrap().sum, 7);
        assert!(projection.dead_letters().await.unwrap().is_empty());
    }
}
