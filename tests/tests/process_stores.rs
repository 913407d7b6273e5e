//! The process stores: the testkit's `ProcessStore` conformance suite on memory, SQLite (a
//! temp file per store) and PostgreSQL (a schema per store), and what the suite cannot say
//! for every store: damaged rows are typed errors, deadlines finer than a microsecond are
//! never due early. The PostgreSQL cases need `CQRS_POSTGRES_URL` and skip themselves
//! without it.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::ledger::{Ledger, LedgerError, LedgerEvent};
use cqrs::sqlx::postgres::PgPoolOptions;
use cqrs::sqlx::Executor;
use cqrs::{
    CQRSError, CorruptRow, Deadline, Durability, MemoryProcessStore, PostgresEventRepository,
    PostgresProcessStore, ProcessRow, ProcessStore, SqliteEventRepository, SqliteOptions,
    SqliteProcessStore,
};
use cqrs_testkit::conformance::check_process_store;
use serde_json::json;
use uuid::Uuid;

const URL_VAR: &str = "CQRS_POSTGRES_URL";

/// A directory of its own in the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("cqrs-processes-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// A store on a new file in the directory.
    async fn store(&self) -> SqliteEventRepository {
        let path = self.0.join(format!("{}.sqlite", Uuid::new_v4()));
        let options = SqliteOptions::default().durability(Durability::Normal);
        let store = SqliteEventRepository::connect(&path.display().to_string(), options)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stores in fresh schemas of the PostgreSQL server, dropped by `cleanup`.
struct Schemas {
    url: String,
    stores: Mutex<Vec<PostgresEventRepository>>,
}

impl Schemas {
    /// `None` (and a line saying so) without the variable.
    fn new() -> Option<Self> {
        let url = cqrs_tests::server_url(
            URL_VAR,
            "postgres process store",
            "postgres://postgres@127.0.0.1:5432/test",
        )?;
        Some(Schemas {
            url,
            stores: Mutex::new(Vec::new()),
        })
    }

    async fn store(&self) -> PostgresEventRepository {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("{URL_VAR} is set but the server is unreachable: {e}"));
        let schema = format!("p_{}", Uuid::new_v4().simple());
        let store = PostgresEventRepository::from_pool(pool)
            .with_schema(&schema)
            .unwrap();
        store.migrate().await.unwrap();
        self.stores.lock().unwrap().push(store.clone());
        store
    }

    async fn cleanup(&self) {
        let stores = std::mem::take(&mut *self.stores.lock().unwrap());
        for store in stores {
            let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", store.schema());
            if let Err(error) = store.pool().execute(sql.as_str()).await {
                eprintln!("could not drop schema {}: {error}", store.schema());
            }
            store.pool().close().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_process_store_conforms() {
    check_process_store(|| async { MemoryProcessStore::new() }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_process_store_conforms() {
    let dir = TempDir::new();
    check_process_store(|| async { SqliteProcessStore::new(&dir.store().await) }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_process_store_conforms() {
    let Some(schemas) = Schemas::new() else {
        return;
    };
    check_process_store(|| async { PostgresProcessStore::new(&schemas.store().await) }).await;
    schemas.cleanup().await;
}

/// A row with a correlation id and a deadline, committed as version 1.
async fn committed_row(store: &impl ProcessStore) -> ProcessRow {
    let mut row = ProcessRow::new("t1");
    row.state = json!({ "step": "withdrawn" });
    row.correlation_id = Some(Uuid::new_v4());
    row.deadlines = vec![Deadline {
        name: "refund".to_owned(),
        due: DateTime::<Utc>::from_timestamp_micros(1_764_756_000_000_000).unwrap(),
    }];
    store
        .commit("transfer", vec![row.clone()], Some(1))
        .await
        .unwrap();
    row.version = 1;
    row
}

/// Every read of the damaged row `t1` of process `transfer` fails, with what `expect` checks.
async fn reads_fail(store: &impl ProcessStore, expect: impl Fn(&CQRSError)) {
    let far = DateTime::<Utc>::MAX_UTC;
    expect(&store.load("transfer", "t1").await.unwrap_err());
    expect(&store.list("transfer", None, 10).await.unwrap_err());
    expect(&store.due("transfer", far, 10).await.unwrap_err());
}

fn is_deserialization(column: &'static str) -> impl Fn(&CQRSError) {
    move |error| match error {
        CQRSError::Deserialization { what, .. } => {
            assert!(
                what.starts_with(column) && what.contains("transfer") && what.contains("t1"),
                "{what}"
            );
        }
        other => panic!("expected a Deserialization error for {column}, got {other:?}"),
    }
}

#[tokio::test]
async fn sqlite_damaged_rows_are_typed_errors() {
    let dir = TempDir::new();
    let events = dir.store().await;
    let store = SqliteProcessStore::new(&events);
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let row = committed_row(&store).await;
    assert_eq!(store.load("transfer", "t1").await.unwrap(), Some(row));

    let damage = |sql: &'static str| {
        let pool = events.pool().clone();
        async move {
            let done = cqrs::sqlx::query(sql).execute(&pool).await.unwrap();
            assert_eq!(done.rows_affected(), 1, "{sql}");
        }
    };
    damage("UPDATE cqrs_process_instances SET state = '{not json' WHERE instance = 't1'").await;
    reads_fail(&store, is_deserialization("state")).await;

    damage("UPDATE cqrs_process_instances SET state = '{}', deadlines = '[{\"name\": 1}]' WHERE instance = 't1'").await;
    reads_fail(&store, is_deserialization("deadlines")).await;

    damage("UPDATE cqrs_process_instances SET deadlines = '[]', correlation_id = 'not-a-uuid' WHERE instance = 't1'").await;
    reads_fail(&store, |error| match error {
        CQRSError::PersistenceError(source) => {
            let corrupt = source
                .downcast_ref::<CorruptRow>()
                .unwrap_or_else(|| panic!("expected a CorruptRow, got {source}"));
            assert_eq!(corrupt.table, "cqrs_process_instances");
            assert!(corrupt.problem.contains("correlation_id"), "{corrupt}");
        }
        other => panic!("expected a PersistenceError, got {other:?}"),
    })
    .await;

    // Repaired, the row reads again; the damage never reached other instances.
    damage("UPDATE cqrs_process_instances SET correlation_id = NULL WHERE instance = 't1'").await;
    let repaired = store.load("transfer", "t1").await.unwrap().unwrap();
    assert_eq!((repaired.state, repaired.deadlines), (json!({}), vec![]));
    assert_eq!(store.load("transfer", "t2").await.unwrap(), None);
}

#[tokio::test]
async fn postgres_damaged_rows_are_typed_errors() {
    let Some(schemas) = Schemas::new() else {
        return;
    };
    let events = schemas.store().await;
    let store = PostgresProcessStore::new(&events);
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let row = committed_row(&store).await;
    assert_eq!(store.load("transfer", "t1").await.unwrap(), Some(row));

    for deadlines in [
        r#"{"refund": 1}"#,
        r#"[{"name": 1}]"#,
        r#"[{"name": "x", "due": "yesterday"}]"#,
    ] {
        let sql = format!(
            "UPDATE \"{}\".cqrs_process_instances SET deadlines = $1::jsonb WHERE instance = 't1'",
            events.schema()
        );
        let done = cqrs::sqlx::query(&sql)
            .bind(deadlines)
            .execute(events.pool())
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
        reads_fail(&store, is_deserialization("deadlines")).await;
    }
    schemas.cleanup().await;
}

/// A deadline between two microseconds: the row keeps its exact time, and is due (and
/// `next_due`) only from the next whole microsecond on, never before its time.
async fn sub_microsecond_deadline(store: &impl ProcessStore) {
    let micro = DateTime::<Utc>::from_timestamp_micros(1_764_756_000_000_000).unwrap();
    let due = micro + chrono::Duration::nanoseconds(500);
    let mut row = ProcessRow::new("fine");
    row.deadlines = vec![Deadline {
        name: "tick".to_owned(),
        due,
    }];
    store.commit("clock", vec![row], None).await.unwrap();
    let loaded = store.load("clock", "fine").await.unwrap().unwrap();
    assert_eq!(loaded.deadlines[0].due, due);
    let next = micro + chrono::Duration::microseconds(1);
    assert_eq!(store.next_due("clock").await.unwrap(), Some(next));
    assert!(store.due("clock", micro, 10).await.unwrap().is_empty());
    assert!(store.due("clock", due, 10).await.unwrap().is_empty());
    assert_eq!(store.due("clock", next, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn sqlite_deadlines_are_never_due_early() {
    let dir = TempDir::new();
    sub_microsecond_deadline(&SqliteProcessStore::new(&dir.store().await)).await;
}

#[tokio::test]
async fn postgres_deadlines_are_never_due_early() {
    let Some(schemas) = Schemas::new() else {
        return;
    };
    sub_microsecond_deadline(&PostgresProcessStore::new(&schemas.store().await)).await;
    schemas.cleanup().await;
}

/// Two handles on one SQLite file, each with its own connections (two processes, say),
/// race on one instance: one wins, and the other's commit is not written.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_two_handles_on_one_file() {
    let dir = TempDir::new();
    let path = dir.0.join("shared.sqlite");
    let options = || SqliteOptions::default().durability(Durability::Normal);
    let a = SqliteEventRepository::connect(&path.display().to_string(), options())
        .await
        .unwrap();
    a.migrate().await.unwrap();
    let b = SqliteEventRepository::connect(&path.display().to_string(), options())
        .await
        .unwrap();
    let (a, b) = (
        Arc::new(SqliteProcessStore::new(&a)),
        Arc::new(SqliteProcessStore::new(&b)),
    );
    for round in 0..10_i64 {
        let instance = format!("i{round}");
        let writers = [
            (Arc::clone(&a), "a", 2 * round + 1),
            (Arc::clone(&b), "b", 2 * round + 2),
        ];
        let tasks = writers.map(|(store, name, position)| {
            let mut row = ProcessRow::new(instance.clone());
            row.state = json!(name);
            tokio::spawn(async move { store.commit("race", vec![row], Some(position)).await })
        });
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        let winners: Vec<usize> = (0..2).filter(|i| outcomes[*i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let winner = winners[0];
        assert!(matches!(
            outcomes[1 - winner],
            Err(CQRSError::ViewConflict { .. })
        ));
        let stored = b.load("race", &instance).await.unwrap().unwrap();
        assert_eq!(stored.state, json!(["a", "b"][winner]));
        assert_eq!(
            a.checkpoint("race").await.unwrap(),
            2 * round + 1 + i64::try_from(winner).unwrap()
        );
    }
}

/// The mirror ledger every [`Mirror`] command deposits to.
const MIRROR: Uuid = Uuid::from_u128(0x_0e1e_c7ed);

/// Mirrors a hundredth of every deposit of 100 or more to [`MIRROR`], one instance per
/// source ledger; a minute after an instance's first deposit, deposits 1 more and completes.
struct Mirror;

#[derive(Debug, Clone)]
struct Deposit(LedgerEvent);

impl cqrs::ProcessInput for Deposit {
    fn decode(event: &cqrs::PersistableDomainEvent) -> Result<Vec<Self>, CQRSError> {
        Ok(event
            .decode_all::<LedgerEvent>()?
            .into_iter()
            .map(|e| Deposit(e.event))
            .collect())
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Mirrored {
    seen: u64,
    reminded: bool,
}

impl cqrs::ProcessManager for Mirror {
    const NAME: &'static str = "mirror";
    type Input = Deposit;
    type State = Mirrored;
    type Command = u64;

    fn instance_id(event: &cqrs::EventEnvelope<Deposit>) -> Option<String> {
        (event.aggregate_id != MIRROR).then(|| event.aggregate_id.to_string())
    }

    fn on_event(
        &self,
        state: &mut Mirrored,
        event: &cqrs::EventEnvelope<Deposit>,
        effects: &mut cqrs::Effects<u64>,
    ) {
        let Deposit(LedgerEvent::Deposited { amount }) = event.event;
        if state.seen == 0 {
            effects.wake_in("remind", Duration::from_secs(60));
        }
        state.seen += 1;
        if amount >= 100 {
            effects.send(amount / 100);
        }
    }

    fn on_deadline(
        &self,
        state: &mut Mirrored,
        _deadline: &Deadline,
        effects: &mut cqrs::Effects<u64>,
    ) {
        state.reminded = true;
        effects.send(1);
        effects.complete();
    }
}

struct ToMirror(cqrs::CQRSFramework<Ledger>);

#[cqrs::async_trait]
impl cqrs::CommandRouter<u64> for ToMirror {
    async fn send(
        &self,
        amount: u64,
        context: &cqrs::CommandContext,
    ) -> Result<(), cqrs::SendError> {
        match self
            .0
            .dispatch_with_context(MIRROR, vec![amount], context)
            .await
        {
            Ok(_) => Ok(()),
            Err(LedgerError::Framework(error)) => Err(cqrs::SendError::Failed(error)),
            Err(other) => Err(cqrs::SendError::Refused(other.to_string())),
        }
    }
}

/// A process runner on `events` keeping its instances in `store`: decisions, deadlines and
/// completion are stored, and a restarted runner on the same store does nothing twice.
async fn runner_on<E, S>(events: E, store: impl Fn() -> S)
where
    E: cqrs::EventRepository + Clone + 'static,
    S: ProcessStore + 'static,
{
    let start = DateTime::<Utc>::from_timestamp_micros(1_764_756_000_000_000).unwrap();
    let clock = cqrs::ManualClock::new(start);
    let ledgers = cqrs::CQRSFramework::<Ledger>::new(events.clone());
    let runner = |clock: &cqrs::ManualClock| {
        cqrs::ProcessRunner::new(
            Mirror,
            events.clone(),
            store(),
            ToMirror(cqrs::CQRSFramework::new(events.clone())),
        )
        .with_clock(clock.clone())
    };
    let source = Uuid::new_v4();
    ledgers.dispatch(source, vec![150, 20, 250]).await.unwrap();

    let progress = runner(&clock).run_until_idle().await.unwrap();
    assert_eq!((progress.events, progress.commands), (5, 2), "{progress:?}");
    let processes = store();
    let row = processes
        .load("mirror", &source.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.version, 3);
    assert_eq!(
        row.state,
        serde_json::to_value(Mirrored {
            seen: 3,
            reminded: false
        })
        .unwrap()
    );
    assert!(row.correlation_id.is_some());
    let remind = start + chrono::Duration::seconds(60);
    assert_eq!(
        row.deadlines.iter().map(|d| d.due).collect::<Vec<_>>(),
        [remind]
    );
    assert_eq!(processes.next_due("mirror").await.unwrap(), Some(remind));
    assert_eq!(
        processes.checkpoint("mirror").await.unwrap(),
        progress.position
    );
    assert!(processes.due("mirror", start, 10).await.unwrap().is_empty());

    // A minute later, on a fresh runner: the deadline fires once, the instance completes.
    clock.advance(Duration::from_secs(61));
    let progress = runner(&clock).run_until_idle().await.unwrap();
    assert_eq!(progress.deadlines, 1, "{progress:?}");
    let row = processes
        .load("mirror", &source.to_string())
        .await
        .unwrap()
        .unwrap();
    assert!(row.finished && row.deadlines.is_empty(), "{row:?}");
    assert_eq!(processes.next_due("mirror").await.unwrap(), None);

    // Nothing more to do, however often it runs: 1 + 2 + 1 deposited to the mirror.
    clock.advance(Duration::from_secs(3_600));
    let progress = runner(&clock).run_until_idle().await.unwrap();
    assert_eq!(
        (progress.deadlines, progress.commands),
        (0, 0),
        "{progress:?}"
    );
    let mirrored = events.load_events("ledger", MIRROR, 0).await.unwrap();
    let amounts: Vec<u64> = mirrored
        .iter()
        .map(|e| match e.decode::<LedgerEvent>().unwrap().event {
            LedgerEvent::Deposited { amount } => amount,
        })
        .collect();
    assert_eq!(amounts, [1, 2, 1]);
}

#[tokio::test]
async fn runner_on_sqlite_process_store() {
    let dir = TempDir::new();
    let events = dir.store().await;
    runner_on(events.clone(), || SqliteProcessStore::new(&events)).await;
}

#[tokio::test]
async fn runner_on_postgres_process_store() {
    let Some(schemas) = Schemas::new() else {
        return;
    };
    let events = schemas.store().await;
    runner_on(events.clone(), || PostgresProcessStore::new(&events)).await;
    schemas.cleanup().await;
}
