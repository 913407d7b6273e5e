//! The DynamoDB view store, checkpoints and dead letters against the emulator at
//! `CQRS_DYNAMODB_ENDPOINT` (`python3 .ci/moto-single.py 5000`, then
//! `CQRS_DYNAMODB_ENDPOINT=http://127.0.0.1:5000`).
//!
//! Without the variable every test says which suite it skips and passes; with it, an
//! emulator that cannot be reached fails the tests. Each test works on tables of its own.

use std::fmt;

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, Checkpoint, CheckpointRepository, DeadLetters,
    DomainEvent, EventEnvelope, PoisonPolicy, Projection, View, ViewContext, ViewRepository,
};
use cqrs_aws::aws_sdk_dynamodb::types::AttributeValue;
use cqrs_aws::testkit::DynamoDbHarness;
use cqrs_aws::{
    DamagedItem, DynamoDbDeadLetters, DynamoDbEventRepository, DynamoDbViewRepository,
    TransactionTooLarge, MAX_VIEW_ROWS_PER_COMMIT, TRANSACTION_ITEM_LIMIT,
};
use cqrs_testkit::conformance::{
    check_checkpoint_repository, check_dead_letter_repository, check_view_repository,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

fn harness(suite: &str) -> Option<DynamoDbHarness> {
    DynamoDbHarness::from_env(suite)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn view_store_conformance() {
    let Some(harness) = harness("dynamodb view store conformance") else {
        return;
    };
    check_view_repository(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_conformance() {
    let Some(harness) = harness("dynamodb dead letter conformance") else {
        return;
    };
    check_dead_letter_repository(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoint_conformance() {
    let Some(harness) = harness("dynamodb checkpoint conformance") else {
        return;
    };
    check_checkpoint_repository(&harness).await;
}

// ---------------------------------------------------------------------------------------
// A counter and its view; the view refuses an increment of 13 (a poison event).

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum CounterEvent {
    Added { by: u64 },
}

#[derive(Debug)]
enum CounterError {
    Unlucky(u64),
    Framework(CQRSError),
}

impl fmt::Display for CounterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CounterError::Unlucky(by) => write!(f, "the view refuses to add {by}"),
            CounterError::Framework(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for CounterError {}

impl From<CQRSError> for CounterError {
    fn from(error: CQRSError) -> Self {
        CounterError::Framework(error)
    }
}

#[derive(Debug, Default)]
struct Counter;

impl Aggregate for Counter {
    const NAME: &'static str = "counter";
    type Events = CounterEvent;
    type Commands = u64;
    type Errors = CounterError;
    type State = u64;

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &u64,
        by: u64,
    ) -> Result<Vec<CounterEvent>, CounterError> {
        Ok(vec![CounterEvent::Added { by }])
    }

    fn handle_event(&self, state: &mut u64, CounterEvent::Added { by }: &CounterEvent) {
        *state += by;
    }
}

/// Per counter: how many events it applied, their sum, and the positions it saw (a
/// position twice would be an event applied twice).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct CounterView {
    events: u64,
    total: u64,
    positions: Vec<i64>,
}

impl View<Counter> for CounterView {
    const TABLE_NAME: &'static str = "counter_view";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        let CounterEvent::Added { by } = envelope.event;
        if by == 13 {
            return Err(CounterError::Unlucky(by));
        }
        self.events += 1;
        self.total += by;
        self.positions.push(envelope.position);
        Ok(())
    }
}

fn row(view_id: &str, events: u64) -> ViewContext<CounterView> {
    ViewContext {
        view_id: view_id.to_owned(),
        view: CounterView {
            events,
            total: events,
            positions: Vec::new(),
        },
        version: 0,
    }
}

async fn views_on(harness: &DynamoDbHarness) -> DynamoDbViewRepository<CounterView> {
    let table = harness.fresh_view_table().await;
    DynamoDbViewRepository::new(harness.client().clone(), table)
}

/// A commit of `MAX_VIEW_ROWS_PER_COMMIT` rows and a checkpoint is one transaction of 100
/// items; one row more is refused before any request with `TransactionTooLarge` naming the
/// limit, and writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_over_the_transaction_limit_writes_nothing() {
    let Some(harness) = harness("dynamodb view transaction limit") else {
        return;
    };
    let views = views_on(&harness).await;
    let checkpoint = |position| {
        Some(Checkpoint {
            name: "limit".into(),
            position,
        })
    };
    let full: Vec<_> = (0..MAX_VIEW_ROWS_PER_COMMIT)
        .map(|i| row(&format!("row-{i:03}"), 1))
        .collect();
    ViewRepository::<Counter, _>::commit(&views, full, checkpoint(1))
        .await
        .unwrap();
    assert_eq!(
        ViewRepository::<Counter, _>::checkpoint(&views, "limit")
            .await
            .unwrap(),
        1
    );

    let over: Vec<_> = (0..=MAX_VIEW_ROWS_PER_COMMIT)
        .map(|i| row(&format!("over-{i:03}"), 1))
        .collect();
    match ViewRepository::<Counter, _>::commit(&views, over, checkpoint(2)).await {
        Err(CQRSError::PersistenceError(source)) => {
            let too_large = source
                .downcast_ref::<TransactionTooLarge>()
                .unwrap_or_else(|| panic!("the source is TransactionTooLarge: {source}"));
            assert_eq!(
                (too_large.items, too_large.limit),
                (TRANSACTION_ITEM_LIMIT + 1, TRANSACTION_ITEM_LIMIT)
            );
            assert!(source.to_string().contains("at most 100"), "{source}");
        }
        other => panic!("a commit over the limit must be TransactionTooLarge, got {other:?}"),
    }
    assert_eq!(
        ViewRepository::<Counter, _>::checkpoint(&views, "limit")
            .await
            .unwrap(),
        1
    );
    assert!(views.load::<Counter>("over-000").await.unwrap().is_none());
    // Without a checkpoint, 100 rows fit.
    let hundred: Vec<_> = (0..TRANSACTION_ITEM_LIMIT)
        .map(|i| row(&format!("more-{i:03}"), 1))
        .collect();
    ViewRepository::<Counter, _>::commit(&views, hundred, None)
        .await
        .unwrap();
    let listed = views.list::<Counter>(Some("more-"), 1000).await.unwrap();
    assert_eq!(
        listed.len(),
        TRANSACTION_ITEM_LIMIT + MAX_VIEW_ROWS_PER_COMMIT
    );
}

/// A projection over the DynamoDB event store into the DynamoDB view store applies every
/// event exactly once: in small batches, across a restart (new handles on the same tables),
/// and with two projectors racing on the same view.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_catches_up_exactly_once_across_a_restart() {
    let Some(harness) = harness("dynamodb projection end to end") else {
        return;
    };
    let events = harness.fresh_store().await;
    let table = harness.fresh_view_table().await;
    let client = harness.client().clone();
    let framework = CQRSFramework::<Counter>::new(events.clone());
    let counters: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let mut expected = vec![(0u64, 0u64); counters.len()];
    let dispatch = |round: u64| {
        let framework = &framework;
        let counters = counters.clone();
        let mut sums = Vec::new();
        async move {
            for (i, id) in counters.iter().enumerate() {
                let by = round * 100 + i as u64 + 1;
                framework.dispatch(*id, by).await.unwrap();
                sums.push((i, by));
            }
            sums
        }
    };
    for round in 0..3 {
        for (i, by) in dispatch(round).await {
            expected[i].0 += 1;
            expected[i].1 += by;
        }
    }
    let projection = |batch: usize| {
        Projection::<Counter, CounterView>::new(
            DynamoDbEventRepository::new(client.clone(), events.table()),
            DynamoDbViewRepository::<CounterView>::new(client.clone(), table.as_str()),
        )
        .with_batch_size(batch)
    };
    let first = projection(5);
    assert_eq!(first.catch_up().await.unwrap(), 12);
    drop(first);

    // More events, then a restart: new handles resume from the stored checkpoint.
    for round in 3..6 {
        for (i, by) in dispatch(round).await {
            expected[i].0 += 1;
            expected[i].1 += by;
        }
    }
    let restarted = projection(3);
    assert_eq!(restarted.position().await.unwrap(), 12);
    // Two projectors of the same view at once: between them, each event once.
    let racer = projection(7);
    let (a, b) = tokio::join!(restarted.catch_up(), racer.catch_up());
    assert_eq!((a.unwrap(), b.unwrap()), (24, 24));
    // Caught up again: nothing to do.
    assert_eq!(projection(5).catch_up().await.unwrap(), 24);

    let views = DynamoDbViewRepository::<CounterView>::new(client.clone(), table.as_str());
    let mut seen = Vec::new();
    for (i, id) in counters.iter().enumerate() {
        let view = views
            .load::<Counter>(&id.to_string())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((view.events, view.total), expected[i], "counter {i}");
        seen.extend(view.positions);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=24).collect::<Vec<_>>(),
        "every event applied once"
    );
    assert_eq!(
        ViewRepository::<Counter, CounterView>::active_version(&views)
            .await
            .unwrap(),
        Some(1)
    );
    let listed = views.list::<Counter>(None, 10).await.unwrap();
    assert_eq!(listed.len(), counters.len());
}

/// A poison event under `SkipAndRecord` with the table's dead letters: recorded once, in
/// the transaction that moves the checkpoint past it, and the projection reads on; a
/// restart records nothing again.
#[tokio::test(flavor = "multi_thread")]
async fn a_poison_event_is_recorded_once_and_skipped() {
    let Some(harness) = harness("dynamodb dead letters end to end") else {
        return;
    };
    let events = harness.fresh_store().await;
    let table = harness.fresh_view_table().await;
    let client = harness.client().clone();
    let framework = CQRSFramework::<Counter>::new(events.clone());
    let id = Uuid::new_v4();
    for by in [1, 13, 2] {
        framework.dispatch(id, by).await.unwrap();
    }
    let projection = || {
        let views = DynamoDbViewRepository::<CounterView>::new(client.clone(), table.as_str());
        Projection::<Counter, CounterView>::new(events.clone(), views.clone())
            .with_poison_policy(PoisonPolicy::SkipAndRecord)
            .with_handler_retry(cqrs::HandlerRetry {
                attempts: 1,
                ..cqrs::HandlerRetry::default()
            })
            .with_dead_letters(views.dead_letters())
    };
    assert_eq!(projection().catch_up().await.unwrap(), 3);
    framework.dispatch(id, 4).await.unwrap();
    assert_eq!(projection().catch_up().await.unwrap(), 4);

    let letters = DynamoDbDeadLetters::new(client.clone(), table.as_str())
        .list(&Projection::<Counter, CounterView>::default_name())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].position, letters[0].sequence), (2, 2));
    assert!(
        letters[0].error.contains("refuses to add 13"),
        "{letters:?}"
    );
    let views = DynamoDbViewRepository::<CounterView>::new(client, table.as_str());
    let view = views
        .load::<Counter>(&id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (view.events, view.total, view.positions),
        (3, 7, vec![1, 3, 4])
    );
}

/// Relays keep their checkpoints in the view table beside the projections'; a relay's
/// checkpoint may go back, a projection's never does.
#[tokio::test(flavor = "multi_thread")]
async fn relay_checkpoints_share_the_view_table() {
    let Some(harness) = harness("dynamodb relay checkpoints") else {
        return;
    };
    let views = views_on(&harness).await;
    let checkpoints = views.checkpoints();
    let at = |position| Checkpoint {
        name: "relay".into(),
        position,
    };
    checkpoints.save_checkpoint(at(9)).await.unwrap();
    checkpoints.save_checkpoint(at(4)).await.unwrap();
    assert_eq!(checkpoints.load_checkpoint("relay").await.unwrap(), 4);
    assert_eq!(
        ViewRepository::<Counter, CounterView>::checkpoint(&views, "relay")
            .await
            .unwrap(),
        4
    );
    let back =
        ViewRepository::<Counter, CounterView>::commit(&views, Vec::new(), Some(at(3))).await;
    assert!(
        matches!(
            back,
            Err(CQRSError::ViewConflict {
                expected_version: 4,
                ..
            })
        ),
        "{back:?}"
    );
}

/// View rows and checkpoints damaged behind the store's back give typed errors.
#[tokio::test(flavor = "multi_thread")]
async fn damaged_view_items_give_typed_errors() {
    let Some(harness) = harness("dynamodb damaged view items") else {
        return;
    };
    let views = views_on(&harness).await;
    let mut first = row("a:b#c%d", 1);
    first.view.total = 5;
    ViewRepository::<Counter, _>::commit(&views, vec![first], None)
        .await
        .unwrap();
    // The key escapes `:`, `#` and `%`, and the id reads back as written.
    let listed = views.list::<Counter>(None, 10).await.unwrap();
    assert_eq!(listed[0].0, "a:b#c%d");
    let key = |pk: &str, sk: &str| {
        [
            ("pk".to_owned(), AttributeValue::S(pk.into())),
            ("sk".to_owned(), AttributeValue::N(sk.into())),
        ]
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>()
    };
    let set = |pk: &'static str, sk: &'static str, name: &'static str, value: AttributeValue| {
        let client = harness.client().clone();
        let table = views.table().to_owned();
        async move {
            client
                .update_item()
                .table_name(table)
                .set_key(Some(key(pk, sk)))
                .update_expression("SET #name = :value")
                .expression_attribute_names("#name", name)
                .expression_attribute_values(":value", value)
                .send()
                .await
                .unwrap();
        }
    };
    set(
        "$view#counter_view#a%3Ab%23c%25d",
        "1",
        "payload",
        AttributeValue::S("{not json".into()),
    )
    .await;
    assert!(matches!(
        views.load::<Counter>("a:b#c%d").await,
        Err(CQRSError::Deserialization { .. })
    ));
    set(
        "$view#counter_view#a%3Ab%23c%25d",
        "1",
        "row_version",
        AttributeValue::S("one".into()),
    )
    .await;
    match ViewRepository::<Counter, CounterView>::load_for_update(&views, "a:b#c%d").await {
        Err(CQRSError::PersistenceError(source)) => {
            let damage = source.downcast_ref::<DamagedItem>().unwrap();
            assert!(damage.problem.contains("row_version"), "{damage}");
        }
        other => panic!("a damaged row must be a typed error, got {other:?}"),
    }
    // The same row among others in one batch read.
    let ids = ["fresh", "a:b#c%d"].map(String::from);
    match ViewRepository::<Counter, CounterView>::load_many_for_update(&views, &ids).await {
        Err(CQRSError::PersistenceError(source)) => {
            let damage = source.downcast_ref::<DamagedItem>().unwrap();
            assert!(damage.problem.contains("row_version"), "{damage}");
        }
        other => panic!("a damaged row in a batch must be a typed error, got {other:?}"),
    }
    set(
        "$checkpoint#cp",
        "0",
        "position",
        AttributeValue::S("x".into()),
    )
    .await;
    let loaded = ViewRepository::<Counter, CounterView>::checkpoint(&views, "cp").await;
    assert!(
        matches!(&loaded, Err(CQRSError::PersistenceError(source)) if source.downcast_ref::<DamagedItem>().is_some()),
        "{loaded:?}"
    );
    // A dead letter whose event id is not a UUID.
    let sink = views.dead_letters();
    sink.record(cqrs::DeadLetter {
        projection: "p".into(),
        view: "counter_view".into(),
        event_id: Uuid::new_v4(),
        aggregate_type: "counter".into(),
        aggregate_id: Uuid::new_v4(),
        sequence: 3,
        position: 7,
        event_type: "Added".into(),
        event_version: "1".into(),
        error: "refused".into(),
        attempts: 1,
        recorded_at: chrono::Utc::now(),
    })
    .await
    .unwrap();
    assert_eq!(sink.list("p").await.unwrap().len(), 1);
    set(
        "$dead#p",
        "7",
        "event_id",
        AttributeValue::S("not-a-uuid".into()),
    )
    .await;
    let listed = sink.list("p").await;
    assert!(
        matches!(&listed, Err(CQRSError::PersistenceError(source)) if source.downcast_ref::<DamagedItem>().is_some_and(|d| d.problem.contains("event_id"))),
        "{listed:?}"
    );
}

/// A projection batch that touches more rows than one transaction holds fails with
/// `TransactionTooLarge` and commits nothing; told a batch size of
/// `MAX_VIEW_ROWS_PER_COMMIT`, the same projection catches up.
#[tokio::test(flavor = "multi_thread")]
async fn a_projection_is_told_a_batch_size_that_fits_a_transaction() {
    let Some(harness) = harness("dynamodb projection batch size") else {
        return;
    };
    let events = harness.fresh_store().await;
    let views = views_on(&harness).await;
    let framework = CQRSFramework::<Counter>::new(events.clone());
    let counters = MAX_VIEW_ROWS_PER_COMMIT + 1;
    for _ in 0..counters {
        framework.dispatch(Uuid::new_v4(), 1).await.unwrap();
    }
    let projection = Projection::<Counter, CounterView>::new(events.clone(), views.clone());
    match projection.catch_up().await {
        Err(CQRSError::PersistenceError(source)) => {
            assert!(
                source.downcast_ref::<TransactionTooLarge>().is_some(),
                "{source}"
            );
        }
        other => panic!("a batch of {counters} rows must be TransactionTooLarge, got {other:?}"),
    }
    assert_eq!(projection.position().await.unwrap(), 0);
    assert!(views.list::<Counter>(None, 10).await.unwrap().is_empty());

    let projection = projection.with_batch_size(MAX_VIEW_ROWS_PER_COMMIT);
    assert_eq!(projection.catch_up().await.unwrap(), counters as i64);
    let listed = views.list::<Counter>(None, 1000).await.unwrap();
    assert_eq!(listed.len(), counters);
    assert!(listed.iter().all(|(_, view)| view.events == 1));
}

/// `ensure_view_table` is idempotent, and refuses a table without the list index (an event
/// table) with a message naming the index.
#[tokio::test(flavor = "multi_thread")]
async fn ensure_view_table_is_idempotent_and_checks_the_index() {
    let Some(harness) = harness("dynamodb view tables") else {
        return;
    };
    let views = views_on(&harness).await;
    views.ensure_table().await.unwrap();
    cqrs_aws::ensure_view_table(harness.client(), views.table())
        .await
        .unwrap();
    let events = harness.fresh_store().await;
    let error = cqrs_aws::ensure_view_table(harness.client(), events.table())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("view_list"), "{error}");
}

/// Eight writers commit the same row from the same loaded version, each with the checkpoint
/// one further: exactly one wins, the others are `ViewConflict` and write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_commits_of_one_row_have_one_winner() {
    let Some(harness) = harness("dynamodb view races") else {
        return;
    };
    let views = views_on(&harness).await;
    for round in 1..=5_i64 {
        let loaded = ViewRepository::<Counter, CounterView>::load_for_update(&views, "hot")
            .await
            .unwrap();
        assert_eq!(loaded.version, round - 1);
        let tasks: Vec<_> = (0..8_u64)
            .map(|writer| {
                let views = views.clone();
                let mut change = loaded.clone();
                change.view.total = writer;
                let checkpoint = Checkpoint {
                    name: "race".into(),
                    position: round,
                };
                tokio::spawn(async move {
                    ViewRepository::<Counter, _>::commit(&views, vec![change], Some(checkpoint))
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for (writer, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(()) => winners.push(writer as u64),
                Err(CQRSError::ViewConflict { .. }) => {}
                Err(other) => panic!("a lost race must be ViewConflict, got {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let stored = ViewRepository::<Counter, CounterView>::load_for_update(&views, "hot")
            .await
            .unwrap();
        assert_eq!((stored.version, stored.view.total), (round, winners[0]));
        assert_eq!(
            ViewRepository::<Counter, CounterView>::checkpoint(&views, "race")
                .await
                .unwrap(),
            round
        );
    }
}
