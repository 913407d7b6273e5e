//! The DynamoDB stores against the emulator at `CQRS_DYNAMODB_ENDPOINT`
//! (`python3 .ci/moto-single.py 5000`, then `CQRS_DYNAMODB_ENDPOINT=http://127.0.0.1:5000`).
//!
//! Without the variable every test says which suite it skips and passes; with it, an
//! emulator that cannot be reached fails the tests. Each test works on tables of its own.

use std::collections::HashSet;
use std::sync::Arc;

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DomainEvent, EventRepository, PersistableDomainEvent,
    SnapshotPolicy,
};
use cqrs_aws::aws_sdk_dynamodb::types::AttributeValue;
use cqrs_aws::testkit::DynamoDbHarness;
use cqrs_aws::{DamagedItem, DynamoDbEventRepository, MAX_EVENTS_PER_APPEND};
use cqrs_testkit::conformance::{check_event_repository, check_snapshot_repository};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

fn harness(suite: &str) -> Option<DynamoDbHarness> {
    DynamoDbHarness::from_env(suite)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_store_conformance() {
    let Some(harness) = harness("dynamodb event store conformance") else {
        return;
    };
    check_event_repository(&harness).await;
}

/// The store without a global order conforms for everything it claims: the suite skips its
/// global-order checks (`StoreHarness::global_order`) and checks that `read_all` is
/// `Unsupported` and that events carry no position.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_store_without_global_order_conformance() {
    let Some(harness) = harness("dynamodb event store conformance") else {
        return;
    };
    check_event_repository(&harness.without_global_order()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_store_conformance() {
    let Some(harness) = harness("dynamodb snapshot store conformance") else {
        return;
    };
    check_snapshot_repository(&harness).await;
}

// ---------------------------------------------------------------------------------------
// A counter, for the races.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum CounterEvent {
    Added { by: u64 },
}

#[derive(Debug, Default)]
struct Counter;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct CounterState {
    count: u64,
    total: u64,
}

impl Aggregate for Counter {
    const NAME: &'static str = "counter";
    type Events = CounterEvent;
    type Commands = u64;
    type Errors = CQRSError;
    type State = CounterState;

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &CounterState,
        by: u64,
    ) -> Result<Vec<CounterEvent>, CQRSError> {
        Ok(vec![CounterEvent::Added { by }])
    }

    fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
        let CounterEvent::Added { by } = event;
        state.count += 1;
        state.total += by;
    }
}

fn added(id: Uuid, sequence: i64, by: u64) -> PersistableDomainEvent {
    PersistableDomainEvent::new(
        Counter::NAME,
        id,
        sequence,
        &CounterEvent::Added { by },
        Value::Null,
    )
    .unwrap()
}

const WRITERS: u64 = 16;
const DISPATCHES: u64 = 15;

/// 16 writers dispatch on one aggregate, without retries: every failure is a typed conflict,
/// and every success is stored exactly once, at sequences 1..=n.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_race_on_one_aggregate() {
    let Some(harness) = harness("dynamodb races") else {
        return;
    };
    let store = harness.fresh_store().await;
    let snapshots =
        cqrs_aws::DynamoDbSnapshotRepository::new(harness.client().clone(), store.table());
    let framework = Arc::new(
        CQRSFramework::<Counter>::new(store.clone())
            .with_snapshots(snapshots, SnapshotPolicy::every(10))
            .without_state_cache(),
    );
    let id = Uuid::new_v4();
    let mut tasks = Vec::new();
    for task in 0..WRITERS {
        let framework = Arc::clone(&framework);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut conflicts, mut sum, mut other) = (0u64, 0u64, 0u64, Vec::new());
            for i in 0..DISPATCHES {
                let by = task * 1000 + i + 1;
                match framework.dispatch(id, by).await {
                    Ok(_) => {
                        ok += 1;
                        sum += by;
                    }
                    Err(CQRSError::Conflict { aggregate_id, .. }) if aggregate_id == id => {
                        conflicts += 1
                    }
                    Err(e) => other.push(format!("{e:?}")),
                }
            }
            (ok, conflicts, sum, other)
        }));
    }
    let (mut ok, mut conflicts, mut sum, mut other) = (0, 0, 0, Vec::new());
    for task in tasks {
        let (o, c, s, e) = task.await.unwrap();
        ok += o;
        conflicts += c;
        sum += s;
        other.extend(e);
    }
    assert!(other.is_empty(), "failures other than Conflict: {other:?}");
    assert_eq!(ok + conflicts, WRITERS * DISPATCHES);
    assert!(
        conflicts > 0,
        "16 writers on one aggregate never conflicted"
    );

    let stored = store.load_events(Counter::NAME, id, 0).await.unwrap();
    let sequences: Vec<i64> = stored.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=ok as i64).collect::<Vec<_>>());
    let ids: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), stored.len());
    let state = CQRSFramework::<Counter>::new(store.clone())
        .load(id)
        .await
        .unwrap();
    assert_eq!((state.count, state.total), (ok, sum));

    // The global order holds each of them once, in the order of their sequences.
    let all = store.read_all(0, 10_000).await.unwrap();
    let in_order: Vec<i64> = all.iter().map(|e| e.sequence).collect();
    assert_eq!(in_order, sequences);
    assert!(all.windows(2).all(|w| w[1].position == w[0].position + 1));
}

/// Appends of 1 to `MAX_EVENTS_PER_APPEND` events go through in one transaction; one more
/// event is the typed error naming the limit, and stores nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_append_over_the_transaction_limit_stores_nothing() {
    let Some(harness) = harness("dynamodb transaction limit") else {
        return;
    };
    let store = harness.fresh_store().await;
    let id = Uuid::new_v4();
    let full: Vec<_> = (1..=MAX_EVENTS_PER_APPEND as i64)
        .map(|sequence| added(id, sequence, 1))
        .collect();
    let positions = store.append(full).await.unwrap();
    assert_eq!(
        positions,
        (1..=MAX_EVENTS_PER_APPEND as i64).collect::<Vec<_>>()
    );

    let next = MAX_EVENTS_PER_APPEND as i64 + 1;
    let over: Vec<_> = (next..=next + MAX_EVENTS_PER_APPEND as i64)
        .map(|sequence| added(id, sequence, 1))
        .collect();
    match store.append(over).await {
        Err(CQRSError::Unstorable {
            aggregate_id,
            first_sequence,
            reason,
            ..
        }) => {
            assert_eq!((aggregate_id, first_sequence), (id, next));
            assert!(
                reason.contains(&MAX_EVENTS_PER_APPEND.to_string()) && reason.contains("100"),
                "the error names the limit: {reason}"
            );
        }
        other => panic!("an append over the limit must be Unstorable, got {other:?}"),
    }
    assert_eq!(
        store.event_sequence(Counter::NAME, id).await.unwrap(),
        MAX_EVENTS_PER_APPEND as i64
    );
    assert_eq!(
        store.read_all(0, 1000).await.unwrap().len(),
        MAX_EVENTS_PER_APPEND
    );
}

/// An event larger than a DynamoDB item may be is refused as `Unstorable`, and nothing of
/// its append is stored.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_too_large_for_an_item_is_unstorable() {
    let Some(harness) = harness("dynamodb item size") else {
        return;
    };
    let store = harness.fresh_store().await;
    let id = Uuid::new_v4();
    let mut big = added(id, 2, 1);
    big.payload = cqrs::Payload::from_value(&json!({ "blob": "x".repeat(450 * 1024) }));
    let result = store.append(vec![added(id, 1, 1), big]).await;
    assert!(
        matches!(result, Err(CQRSError::Unstorable { .. })),
        "an event over 400 KB must be Unstorable, got {result:?}"
    );
    assert_eq!(store.event_sequence(Counter::NAME, id).await.unwrap(), 0);
    assert!(store.read_all(0, 10).await.unwrap().is_empty());
    // The store goes on.
    assert_eq!(store.append(vec![added(id, 1, 1)]).await.unwrap(), vec![1]);
}

/// Loads and `read_all` follow `LastEvaluatedKey`: a history of more than 1 MB (DynamoDB's
/// page size) comes back whole.
#[tokio::test(flavor = "multi_thread")]
async fn loads_follow_last_evaluated_key() {
    let Some(harness) = harness("dynamodb paging") else {
        return;
    };
    let store = harness.fresh_store().await;
    let id = Uuid::new_v4();
    let mut sequence = 0;
    for _ in 0..4 {
        let events: Vec<_> = (0..3)
            .map(|_| {
                sequence += 1;
                let mut event = added(id, sequence, 1);
                event.payload = cqrs::Payload::from_value(
                    &json!({ "Added": { "by": 1 }, "pad": "y".repeat(150 * 1024) }),
                );
                event
            })
            .collect();
        store.append(events).await.unwrap();
    }
    // 12 events of 150 KB: about 1.8 MB.
    let loaded = store.load_events(Counter::NAME, id, 0).await.unwrap();
    assert_eq!(
        loaded.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    let all = store.read_all(0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
}

/// Items damaged behind the store's back give typed errors: never a panic, never a
/// silently wrong answer.
#[tokio::test(flavor = "multi_thread")]
async fn damaged_items_give_typed_errors() {
    let Some(harness) = harness("dynamodb damaged items") else {
        return;
    };
    let store = harness.fresh_store().await;
    let client = harness.client();
    let id = Uuid::new_v4();
    let other = Uuid::new_v4();
    store
        .append(vec![added(id, 1, 1), added(id, 2, 2)])
        .await
        .unwrap();
    store.append(vec![added(other, 1, 3)]).await.unwrap();

    // Sequence 2 of `id` (position 2) loses its sequence and gets a sequence that is text.
    let stream = PersistableDomainEvent::type_id_for(Counter::NAME, id);
    for (pk, sk) in [(stream.to_string(), 2), ("$all#0".to_owned(), 2)] {
        client
            .update_item()
            .table_name(store.table())
            .key("pk", AttributeValue::S(pk))
            .key("sk", AttributeValue::N(sk.to_string()))
            .update_expression("SET #sequence = :text")
            .expression_attribute_names("#sequence", "sequence")
            .expression_attribute_values(":text", AttributeValue::S("two".into()))
            .send()
            .await
            .unwrap();
    }
    match store.load_events(Counter::NAME, id, 0).await {
        Err(CQRSError::PersistenceError(source)) => {
            let damage = source
                .downcast_ref::<DamagedItem>()
                .unwrap_or_else(|| panic!("the source is a DamagedItem: {source}"));
            assert_eq!(damage.table, store.table());
            assert!(damage.key.contains(stream.as_str()), "{damage}");
            assert!(damage.problem.contains("sequence"), "{damage}");
        }
        other => panic!("loading a damaged item must be a typed error, got {other:?}"),
    }
    // In the global stream it is one poison event at its position: the events before it
    // come back, a page that starts with it is `DamagedRow`, and the reader reads on.
    let head = store.read_all(0, 10).await.unwrap();
    assert_eq!(head.iter().map(|e| e.position).collect::<Vec<_>>(), vec![1]);
    match store.read_all(1, 10).await {
        Err(CQRSError::DamagedRow(row)) => {
            assert_eq!(row.position, 2);
            assert_eq!(row.aggregate_id, Some(id));
            assert_eq!(row.sequence, None);
            assert!(row.problem.contains("sequence"), "{}", row.problem);
        }
        other => panic!("a page starting with a damaged item must be DamagedRow, got {other:?}"),
    }
    let rest = store.read_all(2, 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|e| e.aggregate_id).collect::<Vec<_>>(),
        vec![other]
    );

    // A counter that is not a number: appends and reads say so.
    client
        .update_item()
        .table_name(store.table())
        .key("pk", AttributeValue::S("$all".into()))
        .key("sk", AttributeValue::N("0".into()))
        .update_expression("SET #position = :text")
        .expression_attribute_names("#position", "position")
        .expression_attribute_values(":text", AttributeValue::S("three".into()))
        .send()
        .await
        .unwrap();
    let fresh = DynamoDbEventRepository::new(client.clone(), store.table());
    for result in [
        fresh
            .append(vec![added(Uuid::new_v4(), 1, 1)])
            .await
            .map(|_| ()),
        fresh.read_all(0, 10).await.map(|_| ()),
    ] {
        match result {
            Err(CQRSError::PersistenceError(source)) => {
                assert!(source.downcast_ref::<DamagedItem>().is_some(), "{source}");
            }
            other => panic!("a damaged counter must be a typed error, got {other:?}"),
        }
    }
}

/// `ensure_table` is idempotent, and refuses a table with another key schema.
#[tokio::test(flavor = "multi_thread")]
async fn ensure_table_is_idempotent() {
    let Some(harness) = harness("dynamodb tables") else {
        return;
    };
    let store = harness.fresh_store().await;
    store.ensure_table().await.unwrap();
    cqrs_aws::ensure_table(harness.client(), store.table())
        .await
        .unwrap();

    let table = format!("other-{}", Uuid::new_v4().simple());
    harness
        .client()
        .create_table()
        .table_name(&table)
        .billing_mode(cqrs_aws::aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .attribute_definitions(
            cqrs_aws::aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(cqrs_aws::aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            cqrs_aws::aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(cqrs_aws::aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let error = cqrs_aws::ensure_table(harness.client(), &table)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("key schema"), "{error}");
}
