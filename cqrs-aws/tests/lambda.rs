//! The Lambda adapters end to end.
//!
//! DynamoDB Streams, against the emulator at `CQRS_DYNAMODB_ENDPOINT`
//! (`python3 .ci/moto-single.py 5000`, then `CQRS_DYNAMODB_ENDPOINT=http://127.0.0.1:5000`):
//! commands dispatched on `DynamoDbEventRepository`, the table's stream read from the
//! emulator (`DescribeStream`, `GetShardIterator`, `GetRecords`) and handed to the handler as
//! the event Lambda builds from it. Without the variable these tests say which suite they
//! skip and pass.
//!
//! SQS, always: the same checks with SQS events built by hand from the envelopes of stored
//! events (no queue needed).

use std::time::Duration;

use cqrs::{
    CQRSError, CQRSFramework, EventEnvelope, EventRepository, HandlerRetry, MemoryDeadLetters,
    MemoryEventRepository, MemoryViewRepository, PerAggregateProjection, PersistableDomainEvent,
    PoisonPolicy, View, ViewRepository,
};
use cqrs_aws::lambda::aws_lambda_events::dynamodb::Event;
use cqrs_aws::lambda::aws_lambda_events::sqs::SqsEvent;
use cqrs_aws::lambda::lambda_runtime::{Context, LambdaEvent};
use cqrs_aws::lambda::{DynamoDbStreamHandler, SqsHandler};
use cqrs_aws::testkit::DynamoDbHarness;
use cqrs_aws::{envelope, DynamoDbEventRepository};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// The ledger (tests/common) and its balance view.

mod common;

use common::{Ledger, LedgerEvent};

/// The amount the view refuses: a poison event.
const POISON: u64 = 13;

/// A ledger's deposits; refuses an event at or before the last one it applied (applied
/// twice, or out of order) and the amount [`POISON`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Balance {
    sum: u64,
    last_sequence: i64,
}

impl View<Ledger> for Balance {
    const TABLE_NAME: &'static str = "balances";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), CQRSError> {
        if envelope.sequence <= self.last_sequence {
            return Err(CQRSError::persistence(format!(
                "sequence {} after {}: applied twice or out of order",
                envelope.sequence, self.last_sequence
            )));
        }
        let LedgerEvent::Deposited { amount } = envelope.event;
        if amount == POISON {
            return Err(CQRSError::persistence(format!("unlucky amount {amount}")));
        }
        self.sum += amount;
        self.last_sequence = envelope.sequence;
        Ok(())
    }
}

/// The views and dead letters a handler writes, kept for the checks.
struct Read {
    views: MemoryViewRepository<Balance>,
    dead_letters: MemoryDeadLetters,
}

impl Read {
    fn new() -> Self {
        Read {
            views: MemoryViewRepository::new(),
            dead_letters: MemoryDeadLetters::new(),
        }
    }

    fn projection(&self, policy: PoisonPolicy) -> PerAggregateProjection<Ledger, Balance> {
        PerAggregateProjection::new(self.views.clone())
            .with_dead_letters(self.dead_letters.clone())
            .with_poison_policy(policy)
            .with_handler_retry(HandlerRetry::none())
    }

    async fn balance(&self, id: Uuid) -> Balance {
        ViewRepository::<Ledger, Balance>::load(&self.views, &id.to_string())
            .await
            .unwrap()
            .unwrap_or_default()
    }
}

async fn deposit<S: EventRepository + Clone + 'static>(store: &S, id: Uuid, amounts: &[u64]) {
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    for &amount in amounts {
        framework.dispatch(id, amount).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// The table's stream, read from the emulator as Lambda's event source mapping reads it.

/// One DynamoDB Streams request to the emulator, as plain JSON over HTTP.
async fn streams_call(endpoint: &str, operation: &str, body: Value) -> Value {
    let address = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let body = body.to_string();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/x-amz-json-1.0\r\n\
         X-Amz-Target: DynamoDBStreams_20120810.{operation}\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=test/20261203/us-east-1/dynamodb/aws4_request, \
         SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .unwrap_or_else(|e| panic!("the emulator at {endpoint} is unreachable: {e}"));
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    socket.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(" 200 "), "{operation}: {head}\n{body}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{operation}: {e}: {body}"))
}

/// Every record of the table's stream so far, in shard order, each as Lambda delivers it
/// (with the stream's ARN as `eventSourceARN`).
async fn stream_records(endpoint: &str, harness: &DynamoDbHarness, table: &str) -> Vec<Value> {
    let described = harness
        .client()
        .describe_table()
        .table_name(table)
        .send()
        .await
        .unwrap();
    let arn = described
        .table()
        .and_then(|t| t.latest_stream_arn())
        .expect("the table has a stream")
        .to_owned();
    let stream = streams_call(endpoint, "DescribeStream", json!({"StreamArn": arn})).await;
    let mut records = Vec::new();
    for shard in stream["StreamDescription"]["Shards"].as_array().unwrap() {
        let iterator = streams_call(
            endpoint,
            "GetShardIterator",
            json!({"StreamArn": arn, "ShardId": shard["ShardId"], "ShardIteratorType": "TRIM_HORIZON"}),
        )
        .await;
        let mut iterator = iterator["ShardIterator"].clone();
        while iterator.is_string() {
            let page =
                streams_call(endpoint, "GetRecords", json!({"ShardIterator": iterator})).await;
            let page_records = page["Records"].as_array().cloned().unwrap_or_default();
            if page_records.is_empty() {
                break;
            }
            for mut record in page_records {
                record["eventSourceARN"] = json!(arn);
                records.push(record);
            }
            iterator = page["NextShardIterator"].clone();
        }
    }
    records
}

fn stream_event(records: &[Value]) -> LambdaEvent<Event> {
    let event: Event = serde_json::from_value(json!({ "Records": records }))
        .unwrap_or_else(|e| panic!("not a DynamoDB Streams event: {e}"));
    LambdaEvent::new(event, Context::default())
}

/// The stream record of the event item `sequence` of ledger `id`.
fn event_record(records: &[Value], id: Uuid, sequence: i64) -> usize {
    let pk = format!("ledger:{id}");
    records
        .iter()
        .position(|r| {
            let image = &r["dynamodb"]["NewImage"];
            image["pk"]["S"] == json!(pk)
                && image["sk"]["N"] == json!(sequence.to_string())
                && image["kind"]["S"] == json!("event")
        })
        .expect("the event's stream record")
}

fn failures(
    response: &cqrs_aws::lambda::aws_lambda_events::streams::DynamoDbEventResponse,
) -> Vec<String> {
    response
        .batch_item_failures
        .iter()
        .filter_map(|f| f.item_identifier.clone())
        .collect()
}

struct Emulator {
    endpoint: String,
    harness: DynamoDbHarness,
    store: DynamoDbEventRepository,
}

async fn emulator(suite: &str) -> Option<Emulator> {
    let endpoint = cqrs_aws::testkit::endpoint(suite)?;
    let harness = DynamoDbHarness::new(&endpoint);
    let store = harness.fresh_store().await;
    Some(Emulator {
        endpoint,
        harness,
        store,
    })
}

impl Emulator {
    async fn records(&self) -> Vec<Value> {
        stream_records(&self.endpoint, &self.harness, self.store.table()).await
    }
}

#[tokio::test]
async fn a_stream_batch_applies_once_however_often_it_is_delivered() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    deposit(&aws.store, a, &[1, 2, 3]).await;
    deposit(&aws.store, b, &[10, 20]).await;
    let records = aws.records().await;
    // Each append writes an event, its id and its position copy, and moves the counter.
    assert!(records.len() >= 10, "{} records", records.len());

    let read = Read::new();
    let handler =
        DynamoDbStreamHandler::new(aws.store.table(), read.projection(PoisonPolicy::Stop));
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 6,
            last_sequence: 3
        }
    );
    assert_eq!(
        read.balance(b).await,
        Balance {
            sum: 30,
            last_sequence: 2
        }
    );

    // The same batch again, and again in two halves the other way round: nothing twice.
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    let (first, second) = records.split_at(records.len() / 2);
    for half in [second, first] {
        let response = handler.handle(stream_event(half)).await.unwrap();
        assert!(response.batch_item_failures.is_empty());
    }
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 6,
            last_sequence: 3
        }
    );
    assert_eq!(
        read.balance(b).await,
        Balance {
            sum: 30,
            last_sequence: 2
        }
    );

    // A fresh view fed the halves the other way round: what the second half cannot apply
    // yet fails, and applies once delivered again after the first half.
    let fresh = Read::new();
    let reordered =
        DynamoDbStreamHandler::new(aws.store.table(), fresh.projection(PoisonPolicy::Stop));
    let early = reordered.handle(stream_event(second)).await.unwrap();
    let response = reordered.handle(stream_event(first)).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    let again = failures(&early)
        .first()
        .map(|failed| {
            second
                .iter()
                .position(|r| r["dynamodb"]["SequenceNumber"] == json!(failed))
                .unwrap()
        })
        .map_or(&second[second.len()..], |at| &second[at..]);
    let response = reordered.handle(stream_event(again)).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(fresh.balance(a).await, read.balance(a).await);
    assert_eq!(fresh.balance(b).await, read.balance(b).await);

    // New events: only they are applied, from the stream as it is now.
    deposit(&aws.store, a, &[4]).await;
    let response = handler
        .handle(stream_event(&aws.records().await))
        .await
        .unwrap();
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 10,
            last_sequence: 4
        }
    );
}

#[tokio::test]
async fn a_damaged_record_is_named_and_nothing_after_it_of_its_aggregate_is_committed() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    deposit(&aws.store, a, &[1, 2, 3]).await;
    deposit(&aws.store, b, &[10]).await;
    let mut records = aws.records().await;
    // Sequence 2 of ledger a: an image that is not an event item (no aggregate id).
    let damaged = event_record(&records, a, 2);
    records[damaged]["dynamodb"]["NewImage"]
        .as_object_mut()
        .unwrap()
        .remove("aggregate_id");
    let damaged_id = records[damaged]["dynamodb"]["SequenceNumber"].clone();
    // A damaged item of another aggregate type, first in the batch: not this view's concern.
    let mut foreign = records[damaged].clone();
    let image = &mut foreign["dynamodb"]["NewImage"];
    image["pk"] = json!({"S": format!("order:{}", Uuid::new_v4())});
    image["aggregate_type"] = json!({"S": "order"});
    foreign["dynamodb"]["SequenceNumber"] = json!("1");
    records.insert(0, foreign);

    let read = Read::new();
    let handler =
        DynamoDbStreamHandler::new(aws.store.table(), read.projection(PoisonPolicy::Stop));
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert_eq!(
        failures(&response),
        vec![damaged_id.as_str().unwrap().to_owned()]
    );
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 1,
            last_sequence: 1
        }
    );
    assert_eq!(handler.projection().sequence(a).await.unwrap(), 1);
    // Another aggregate after the damaged record is not held back.
    assert_eq!(read.balance(b).await.sum, 10);

    // Lambda retries from the damaged record; once the image is whole again (here: the
    // stream as stored), the rest follows.
    let whole = aws.records().await;
    let response = handler
        .handle(stream_event(&whole[event_record(&whole, a, 2)..]))
        .await
        .unwrap();
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 6,
            last_sequence: 3
        }
    );
}

#[tokio::test]
async fn a_payload_that_is_not_json_stops_the_aggregate_under_the_stop_policy() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let a = Uuid::new_v4();
    deposit(&aws.store, a, &[1, 2, 3]).await;
    let mut records = aws.records().await;
    let damaged = event_record(&records, a, 2);
    records[damaged]["dynamodb"]["NewImage"]["payload"] = json!({"S": "{\"Deposited\": oops"});
    let damaged_id = records[damaged]["dynamodb"]["SequenceNumber"].clone();

    let read = Read::new();
    let handler =
        DynamoDbStreamHandler::new(aws.store.table(), read.projection(PoisonPolicy::Stop));
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert_eq!(
        failures(&response),
        vec![damaged_id.as_str().unwrap().to_owned()]
    );
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 1,
            last_sequence: 1
        }
    );
}

#[tokio::test]
async fn a_poison_event_under_skip_and_record_is_a_dead_letter_and_the_stream_goes_on() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let a = Uuid::new_v4();
    deposit(&aws.store, a, &[5, POISON, 7]).await;
    let records = aws.records().await;

    let read = Read::new();
    let handler = DynamoDbStreamHandler::new(
        aws.store.table(),
        read.projection(PoisonPolicy::SkipAndRecord),
    );
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 12,
            last_sequence: 3
        }
    );
    let letters = handler.projection().dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].aggregate_id, letters[0].sequence), (a, 2));
    // Delivered again: still one dead letter, nothing applied twice.
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(handler.projection().dead_letters().await.unwrap().len(), 1);
    assert_eq!(read.balance(a).await.sum, 12);
}

/// Ledger `id` with deposits 1 and, written through the low-level client, a damaged item at
/// sequence 2 (its metadata is not JSON), then deposits 3 and 4 appended after it; the
/// stream's records and the damaged one's `SequenceNumber`.
async fn with_damaged_item(aws: &Emulator, id: Uuid) -> (Vec<Value>, String) {
    use aws_sdk_dynamodb::types::AttributeValue;
    deposit(&aws.store, id, &[1]).await;
    let event = |sequence: i64, amount: u64| {
        PersistableDomainEvent::new(
            "ledger",
            id,
            sequence,
            &LedgerEvent::Deposited { amount },
            Value::Null,
        )
        .unwrap()
    };
    let s = |text: &str| AttributeValue::S(text.to_owned());
    let n = |number: i64| AttributeValue::N(number.to_string());
    let damaged = event(2, 2);
    aws.harness
        .client()
        .put_item()
        .table_name(aws.store.table())
        .item("pk", s(&format!("ledger:{id}")))
        .item("sk", n(2))
        .item("kind", s("event"))
        .item("event_id", s(&damaged.event_id.to_string()))
        .item("aggregate_type", s("ledger"))
        .item("aggregate_id", s(&id.to_string()))
        .item("sequence", n(2))
        .item("position", n(1_000))
        .item("event_type", s("Deposited"))
        .item("event_version", s("1"))
        .item("payload", s(r#"{"Deposited":{"amount":2}}"#))
        .item("metadata", s("{not json"))
        .item("timestamp", n(0))
        .send()
        .await
        .unwrap();
    aws.store
        .append(vec![event(3, 3), event(4, 4)])
        .await
        .unwrap();
    let records = aws.records().await;
    let sequence_number = records[event_record(&records, id, 2)]["dynamodb"]["SequenceNumber"]
        .as_str()
        .unwrap()
        .to_owned();
    (records, sequence_number)
}

#[tokio::test]
async fn a_damaged_item_under_skip_and_record_is_one_dead_letter_and_the_stream_goes_on() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (_, sequence_number) = with_damaged_item(&aws, a).await;
    deposit(&aws.store, b, &[10]).await;
    let records = aws.records().await;

    let read = Read::new();
    let handler = DynamoDbStreamHandler::new(
        aws.store.table(),
        read.projection(PoisonPolicy::SkipAndRecord),
    );
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert!(failures(&response).is_empty(), "{response:?}");
    // The events after the damaged one are applied, the damaged one is not.
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 1 + 3 + 4,
            last_sequence: 4
        }
    );
    assert_eq!(handler.projection().sequence(a).await.unwrap(), 4);
    assert_eq!(read.balance(b).await.sum, 10);
    let letters = handler.projection().dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!((letter.aggregate_id, letter.sequence), (a, 2));
    assert_eq!(letter.aggregate_type, "ledger");
    assert_eq!(letter.position, 1_000);
    for part in [
        aws.store.table(),
        sequence_number.as_str(),
        "metadata is not JSON",
    ] {
        assert!(
            letter.error.contains(part),
            "{part:?} in {:?}",
            letter.error
        );
    }

    // The same batch again: nothing applied twice, no second letter.
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert!(failures(&response).is_empty(), "{response:?}");
    assert_eq!(handler.projection().dead_letters().await.unwrap().len(), 1);
    assert_eq!(read.balance(a).await.sum, 8);
}

#[tokio::test]
async fn a_damaged_item_under_stop_fails_at_its_record() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let a = Uuid::new_v4();
    let (records, sequence_number) = with_damaged_item(&aws, a).await;
    let read = Read::new();
    let handler =
        DynamoDbStreamHandler::new(aws.store.table(), read.projection(PoisonPolicy::Stop));
    for _ in 0..2 {
        let response = handler.handle(stream_event(&records)).await.unwrap();
        assert_eq!(failures(&response), vec![sequence_number.clone()]);
        assert_eq!(
            read.balance(a).await,
            Balance {
                sum: 1,
                last_sequence: 1
            }
        );
        assert!(handler
            .projection()
            .dead_letters()
            .await
            .unwrap()
            .is_empty());
    }
}

#[tokio::test]
async fn a_damaged_item_whose_key_names_no_sequence_fails_under_skip_and_record() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let a = Uuid::new_v4();
    let (mut records, _) = with_damaged_item(&aws, a).await;
    let damaged = event_record(&records, a, 2);
    // As if its key had no sequence: nothing says which checkpoint it could move.
    records[damaged]["dynamodb"]["NewImage"]["sk"] = json!({"N": "0"});
    records[damaged]["dynamodb"]["NewImage"]
        .as_object_mut()
        .unwrap()
        .remove("metadata");
    let sequence_number = records[damaged]["dynamodb"]["SequenceNumber"]
        .as_str()
        .unwrap()
        .to_owned();
    let read = Read::new();
    let handler = DynamoDbStreamHandler::new(
        aws.store.table(),
        read.projection(PoisonPolicy::SkipAndRecord),
    );
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert_eq!(failures(&response), vec![sequence_number]);
    assert!(handler
        .projection()
        .dead_letters()
        .await
        .unwrap()
        .is_empty());
    assert_eq!(read.balance(a).await.sum, 1);
}

#[tokio::test]
async fn a_store_without_global_order_feeds_a_view_from_its_stream() {
    let Some(endpoint) = cqrs_aws::testkit::endpoint("dynamodb lambda adapters") else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint).without_global_order();
    let store = harness.fresh_store().await;
    let aws = Emulator {
        endpoint,
        harness,
        store,
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    deposit(&aws.store, a, &[1, 2, 3]).await;
    deposit(&aws.store, b, &[10, 20]).await;
    let records = aws.records().await;
    // No counter, no position copies: the event items and their id items only.
    assert_eq!(records.len(), 2 * 5, "{records:#?}");
    assert!(records.iter().all(|r| {
        let pk = r["dynamodb"]["Keys"]["pk"]["S"]
            .as_str()
            .unwrap_or_default();
        !pk.starts_with("$all")
    }));
    assert!(matches!(
        aws.store.read_all(0, 10).await,
        Err(CQRSError::Unsupported { .. })
    ));

    let read = Read::new();
    let handler =
        DynamoDbStreamHandler::new(aws.store.table(), read.projection(PoisonPolicy::Stop));
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert!(failures(&response).is_empty(), "{response:?}");
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 6,
            last_sequence: 3
        }
    );
    assert_eq!(read.balance(b).await.sum, 30);

    // Poison events of two aggregates at the same sequence, without positions: two letters.
    let (c, d) = (Uuid::new_v4(), Uuid::new_v4());
    deposit(&aws.store, c, &[1, POISON, 3]).await;
    deposit(&aws.store, d, &[1, POISON, 3]).await;
    let records = aws.records().await;
    let handler = DynamoDbStreamHandler::new(
        aws.store.table(),
        read.projection(PoisonPolicy::SkipAndRecord),
    );
    for _ in 0..2 {
        let response = handler.handle(stream_event(&records)).await.unwrap();
        assert!(failures(&response).is_empty(), "{response:?}");
        let mut letters: Vec<(Uuid, i64)> = handler
            .projection()
            .dead_letters()
            .await
            .unwrap()
            .iter()
            .map(|l| (l.aggregate_id, l.sequence))
            .collect();
        letters.sort();
        let mut expected = vec![(c, 2), (d, 2)];
        expected.sort();
        assert_eq!(letters, expected);
    }
    assert_eq!(read.balance(c).await.sum, 4);
    assert_eq!(read.balance(d).await.sum, 4);
}

#[tokio::test]
async fn a_gap_in_the_stream_is_filled_from_the_event_store() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let a = Uuid::new_v4();
    deposit(&aws.store, a, &[1, 2, 3]).await;
    let records = aws.records().await;
    // Only the last event's record: sequences 1 and 2 come from the table.
    let last = &records[event_record(&records, a, 3)..=event_record(&records, a, 3)];
    let read = Read::new();
    let handler = DynamoDbStreamHandler::new(
        aws.store.table(),
        read.projection(PoisonPolicy::Stop)
            .with_event_store(aws.store.clone()),
    );
    let response = handler.handle(stream_event(last)).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 6,
            last_sequence: 3
        }
    );
}

// ---------------------------------------------------------------------------------------
// SQS: messages built by hand from the envelopes of stored events.

const FIFO_ARN: &str = "arn:aws:sqs:us-east-1:000000000000:ledger-events.fifo";

/// An SQS message carrying `body`, in the message group of its event's aggregate.
fn message(id: &str, event: &PersistableDomainEvent, body: String) -> Value {
    json!({
        "messageId": id,
        "receiptHandle": format!("handle-{id}"),
        "body": body,
        "attributes": {
            "MessageGroupId": event.aggregate_type_id.as_str(),
            "MessageDeduplicationId": event.event_id.to_string(),
            "ApproximateReceiveCount": "1",
        },
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": FIFO_ARN,
        "awsRegion": "us-east-1",
    })
}

fn sqs_event(messages: &[Value]) -> LambdaEvent<SqsEvent> {
    let event: SqsEvent = serde_json::from_value(json!({ "Records": messages }))
        .unwrap_or_else(|e| panic!("not an SQS event: {e}"));
    LambdaEvent::new(event, Context::default())
}

fn sqs_failures(
    response: &cqrs_aws::lambda::aws_lambda_events::sqs::SqsBatchResponse,
) -> Vec<String> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect()
}

/// The stored events of ledgers `a` (three deposits) and `b` (one), as one message each,
/// a's and b's interleaved.
async fn messages(
    store: &MemoryEventRepository,
    a: Uuid,
    b: Uuid,
) -> (Vec<PersistableDomainEvent>, Vec<Value>) {
    deposit(store, a, &[1, 2, 3]).await;
    deposit(store, b, &[10]).await;
    let mut events = store.load_events("ledger", a, 0).await.unwrap();
    events.insert(
        1,
        store.load_events("ledger", b, 0).await.unwrap().remove(0),
    );
    let messages = events
        .iter()
        .enumerate()
        .map(|(i, event)| message(&format!("m{i}"), event, envelope::encode(event).unwrap()))
        .collect();
    (events, messages)
}

#[tokio::test]
async fn sqs_messages_apply_once_however_often_they_are_delivered() {
    let store = MemoryEventRepository::new();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (events, mut messages) = messages(&store, a, b).await;
    // One of them through an SNS subscription (without raw message delivery).
    messages[2]["body"] = json!(json!({
        "Type": "Notification",
        "MessageId": "n1",
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:ledger-events.fifo",
        "Message": envelope::encode(&events[2]).unwrap(),
    })
    .to_string());
    let read = Read::new();
    let handler = SqsHandler::new(read.projection(PoisonPolicy::Stop));
    for _ in 0..2 {
        let response = handler.handle(sqs_event(&messages)).await.unwrap();
        assert_eq!(sqs_failures(&response), Vec::<String>::new());
    }
    // A standard queue's duplicate and disorder: the same again, reversed.
    let mut reversed = messages.clone();
    reversed.reverse();
    for message in &mut reversed {
        message["eventSourceARN"] = json!("arn:aws:sqs:us-east-1:000000000000:ledger-events");
    }
    let response = handler.handle(sqs_event(&reversed)).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 6,
            last_sequence: 3
        }
    );
    assert_eq!(
        read.balance(b).await,
        Balance {
            sum: 10,
            last_sequence: 1
        }
    );
}

#[tokio::test]
async fn a_damaged_sqs_message_fails_with_the_rest_of_its_fifo_group() {
    let store = MemoryEventRepository::new();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (_, mut messages) = messages(&store, a, b).await;
    // Order: a1 (m0), b1 (m1), a2 (m2), a3 (m3). a2's body is not an envelope.
    messages[2]["body"] = json!("{\"event_id\": oops");
    let read = Read::new();
    let handler = SqsHandler::new(read.projection(PoisonPolicy::Stop));
    let response = handler.handle(sqs_event(&messages)).await.unwrap();
    assert_eq!(
        sqs_failures(&response),
        vec!["m2".to_owned(), "m3".to_owned()]
    );
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 1,
            last_sequence: 1
        }
    );
    assert_eq!(read.balance(b).await.sum, 10);
    assert_eq!(handler.projection().sequence(a).await.unwrap(), 1);
}

#[tokio::test]
async fn a_damaged_row_message_follows_the_poison_policy() {
    let store = MemoryEventRepository::new();
    let a = Uuid::new_v4();
    deposit(&store, a, &[5, 6, 7]).await;
    let events = store.load_events("ledger", a, 0).await.unwrap();
    // Sequence 2 arrives in the damaged form a relay publishes for a row it cannot read.
    let damage = cqrs::DamagedRow {
        position: events[1].position,
        event_id: Some(events[1].event_id),
        aggregate_type: Some("ledger".into()),
        aggregate_id: Some(a),
        sequence: Some(2),
        event_type: None,
        event_version: None,
        problem: "attribute `event_type` is missing".into(),
    };
    let messages: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let body = if i == 1 {
                envelope::encode_damaged_row(&damage).unwrap()
            } else {
                envelope::encode(event).unwrap()
            };
            message(&format!("m{i}"), event, body)
        })
        .collect();

    let read = Read::new();
    let handler = SqsHandler::new(read.projection(PoisonPolicy::SkipAndRecord));
    for _ in 0..2 {
        let response = handler.handle(sqs_event(&messages)).await.unwrap();
        assert!(response.batch_item_failures.is_empty(), "{response:?}");
    }
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 12,
            last_sequence: 3
        }
    );
    let letters = handler.projection().dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].sequence, letters[0].position),
        (2, damage.position)
    );
    assert!(
        letters[0].error.contains("event_type"),
        "{}",
        letters[0].error
    );

    // Under Stop it fails, and the rest of its group with it.
    let stopped = Read::new();
    let handler = SqsHandler::new(stopped.projection(PoisonPolicy::Stop));
    let response = handler.handle(sqs_event(&messages)).await.unwrap();
    assert_eq!(
        sqs_failures(&response),
        vec!["m1".to_owned(), "m2".to_owned()]
    );
    assert_eq!(stopped.balance(a).await.sum, 5);
    assert!(handler
        .projection()
        .dead_letters()
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_poison_sqs_message_under_skip_and_record_is_a_dead_letter_and_the_group_goes_on() {
    let store = MemoryEventRepository::new();
    let a = Uuid::new_v4();
    deposit(&store, a, &[5, POISON, 7]).await;
    let events = store.load_events("ledger", a, 0).await.unwrap();
    let messages: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, event)| message(&format!("m{i}"), event, envelope::encode(event).unwrap()))
        .collect();
    let read = Read::new();
    let handler = SqsHandler::new(read.projection(PoisonPolicy::SkipAndRecord));
    for _ in 0..2 {
        let response = handler.handle(sqs_event(&messages)).await.unwrap();
        assert!(response.batch_item_failures.is_empty());
    }
    assert_eq!(
        read.balance(a).await,
        Balance {
            sum: 12,
            last_sequence: 3
        }
    );
    let letters = handler.projection().dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].sequence, 2);

    // Under Stop the same message fails, and the rest of its group with it.
    let stopped = Read::new();
    let handler = SqsHandler::new(stopped.projection(PoisonPolicy::Stop));
    let response = handler.handle(sqs_event(&messages)).await.unwrap();
    assert_eq!(
        sqs_failures(&response),
        vec!["m1".to_owned(), "m2".to_owned()]
    );
    assert_eq!(stopped.balance(a).await.sum, 5);
}

#[tokio::test]
async fn the_handlers_run_under_lambda_runtime_service_fn() {
    use cqrs_aws::lambda::lambda_runtime::{service_fn, Service};

    let read = Read::new();
    let handler = SqsHandler::new(read.projection(PoisonPolicy::Stop));
    let mut service = service_fn(|event: LambdaEvent<SqsEvent>| handler.handle(event));
    let response = tokio::time::timeout(Duration::from_secs(10), service.call(sqs_event(&[])))
        .await
        .unwrap()
        .unwrap();
    assert!(response.batch_item_failures.is_empty());
}

// ---------------------------------------------------------------------------------------
// Correlation and causation reach the views, from the table's stream and from SQS.

/// An event's sequence, correlation id and causation id.
type Traced = (i64, Option<Uuid>, Option<Uuid>);

/// What a view saw of each event's correlation and causation, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Lineage {
    seen: Vec<Traced>,
}

impl View<Ledger> for Lineage {
    const TABLE_NAME: &'static str = "lineage";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), CQRSError> {
        self.seen.push((
            envelope.sequence,
            envelope.correlation_id,
            envelope.causation_id,
        ));
        Ok(())
    }
}

/// Four deposits on ledger `id`: both ids, the correlation only, the causation only,
/// neither; and what [`Lineage`] must see of them.
fn traced_deposits(id: Uuid) -> (Vec<PersistableDomainEvent>, Vec<Traced>) {
    let (correlation, command) = (Uuid::new_v4(), Uuid::new_v4());
    let ids = [
        (Some(correlation), Some(command)),
        (Some(correlation), None),
        (None, Some(command)),
        (None, None),
    ];
    let events = (1..=4)
        .zip(ids)
        .map(|(sequence, (correlation_id, causation_id))| {
            let mut event = PersistableDomainEvent::new(
                "ledger",
                id,
                sequence,
                &LedgerEvent::Deposited {
                    amount: sequence as u64,
                },
                Value::Null,
            )
            .unwrap();
            event.correlation_id = correlation_id;
            event.causation_id = causation_id;
            event
        })
        .collect();
    let seen = (1..=4).zip(ids).map(|(s, (c, k))| (s, c, k)).collect();
    (events, seen)
}

async fn lineage(views: &MemoryViewRepository<Lineage>, id: Uuid) -> Vec<Traced> {
    ViewRepository::<Ledger, Lineage>::load(views, &id.to_string())
        .await
        .unwrap()
        .unwrap_or_default()
        .seen
}

#[tokio::test]
async fn correlation_and_causation_reach_a_view_from_the_stream() {
    let Some(aws) = emulator("dynamodb lambda adapters").await else {
        return;
    };
    let id = Uuid::new_v4();
    let (events, expected) = traced_deposits(id);
    aws.store.append(events).await.unwrap();
    let records = aws.records().await;
    // The event items hold each id the event has, as a string attribute of its own.
    for (sequence, correlation_id, causation_id) in &expected {
        let image = &records[event_record(&records, id, *sequence)]["dynamodb"]["NewImage"];
        let attribute = |name: &str| {
            image[name]["S"]
                .as_str()
                .map(|s| s.parse::<Uuid>().unwrap())
        };
        assert_eq!(attribute("correlation_id"), *correlation_id, "{image}");
        assert_eq!(attribute("causation_id"), *causation_id, "{image}");
    }

    let views = MemoryViewRepository::<Lineage>::new();
    let handler = DynamoDbStreamHandler::new(
        aws.store.table(),
        PerAggregateProjection::<Ledger, Lineage>::new(views.clone()),
    );
    let response = handler.handle(stream_event(&records)).await.unwrap();
    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(lineage(&views, id).await, expected);
}

#[tokio::test]
async fn correlation_and_causation_reach_a_view_from_sqs() {
    let id = Uuid::new_v4();
    let (events, expected) = traced_deposits(id);
    let store = MemoryEventRepository::new();
    store.append(events).await.unwrap();
    let stored = store.load_events("ledger", id, 0).await.unwrap();
    let mut messages: Vec<Value> = stored
        .iter()
        .enumerate()
        .map(|(i, event)| message(&format!("m{i}"), event, envelope::encode(event).unwrap()))
        .collect();
    // The envelope names the ids the event has, and leaves out those it has not.
    let body: Value = serde_json::from_str(messages[1]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body["correlation_id"],
        json!(expected[1].1.unwrap().to_string())
    );
    assert!(body.get("causation_id").is_none(), "{body}");
    // One of them through an SNS subscription (without raw message delivery).
    messages[0]["body"] = json!(json!({
        "Type": "Notification",
        "MessageId": "n1",
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:ledger-events.fifo",
        "Message": envelope::encode(&stored[0]).unwrap(),
    })
    .to_string());

    let views = MemoryViewRepository::<Lineage>::new();
    let handler = SqsHandler::new(PerAggregateProjection::<Ledger, Lineage>::new(
        views.clone(),
    ));
    let response = handler.handle(sqs_event(&messages)).await.unwrap();
    assert_eq!(sqs_failures(&response), Vec::<String>::new());
    assert_eq!(lineage(&views, id).await, expected);
}

/// The account and balance view of `examples/lambda_projection.rs`.
#[path = "../examples/shared/account.rs"]
mod account;

/// What CI's `cargo lambda` round trip expects of the example batch, without `cargo lambda`:
/// under skip-and-record, its second record (damaged down to its key) is still the failure.
#[tokio::test]
async fn the_example_batch_names_its_damaged_record_under_skip_and_record() {
    let batch: Event =
        serde_json::from_str(include_str!("../examples/lambda_projection_batch.json")).unwrap();
    let handler = DynamoDbStreamHandler::new(
        "events",
        PerAggregateProjection::<account::Account, account::Balance>::new(
            MemoryViewRepository::new(),
        )
        .with_poison_policy(PoisonPolicy::SkipAndRecord),
    );
    let response = handler
        .handle(LambdaEvent::new(batch, Context::default()))
        .await
        .unwrap();
    assert_eq!(failures(&response), vec!["200".to_owned()]);
    assert!(handler
        .projection()
        .dead_letters()
        .await
        .unwrap()
        .is_empty());
}
