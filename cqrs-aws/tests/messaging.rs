//! Publishing to SNS and SQS, and the SQS consumer, against the emulator at
//! `CQRS_DYNAMODB_ENDPOINT` (`python3 .ci/moto-single.py 5000`, then
//! `CQRS_DYNAMODB_ENDPOINT=http://127.0.0.1:5000`), which serves DynamoDB, SNS and SQS on one
//! endpoint. Without the variable these tests say which suite they skip and pass.
//!
//! Events are dispatched on `DynamoDbEventRepository`; the relay publishes them to an SNS
//! FIFO topic fanned out to two SQS FIFO queues (raw message delivery), or to an SQS FIFO
//! queue; the consumer feeds a view in a DynamoDB view table. Receives never long-poll
//! (`WaitTimeSeconds` 0): the single-request emulator would stall.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use cqrs::{
    CQRSError, CQRSFramework, Checkpoint, CheckpointRepository, EventEnvelope, EventRepository,
    MemoryCheckpointRepository, PerAggregateProjection, PersistableDomainEvent, View,
    ViewRepository,
};
use cqrs_aws::messaging::aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use cqrs_aws::messaging::{
    local_sns_client, local_sqs_client, MessagingRelay, SqsConsumer, MAX_ENTRIES_PER_SEND,
};
use cqrs_aws::testkit::{self, DynamoDbHarness};
use cqrs_aws::{envelope, DynamoDbEventRepository, DynamoDbViewRepository};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const SUITE: &str = "SNS/SQS messaging";

// ---------------------------------------------------------------------------------------
// The ledger (tests/common) and its balance view.

mod common;

use common::{Ledger, LedgerEvent};

/// A ledger's deposits; refuses an event at or before the last one it applied (applied
/// twice, or out of order).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Balance {
    sum: u64,
    deposits: u64,
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
        self.sum += amount;
        self.deposits += 1;
        self.last_sequence = envelope.sequence;
        Ok(())
    }
}

/// Three ledgers, deposits interleaved across them: 4 each, 12 events (more than one send
/// request). Returns the ids and the amounts deposited on each.
async fn deposits(store: &DynamoDbEventRepository) -> Vec<(Uuid, Vec<u64>)> {
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let ledgers: Vec<(Uuid, Vec<u64>)> = (0..3_u64)
        .map(|l| (Uuid::new_v4(), (1..=4).map(|d| l * 100 + d).collect()))
        .collect();
    for round in 0..4 {
        for (id, amounts) in &ledgers {
            framework.dispatch(*id, amounts[round]).await.unwrap();
        }
    }
    ledgers
}

/// The emulator's SNS and SQS, and a fresh name suffix per test.
struct Messaging {
    sns: cqrs_aws::messaging::aws_sdk_sns::Client,
    sqs: cqrs_aws::messaging::aws_sdk_sqs::Client,
    suffix: String,
}

impl Messaging {
    fn new(endpoint: &str) -> Self {
        Messaging {
            sns: local_sns_client(endpoint),
            sqs: local_sqs_client(endpoint),
            suffix: Uuid::new_v4().simple().to_string(),
        }
    }

    /// A new FIFO queue (`visibility` seconds of visibility timeout); returns its URL.
    async fn fifo_queue(&self, name: &str, visibility: u32) -> String {
        self.sqs
            .create_queue()
            .queue_name(format!("{name}-{}.fifo", self.suffix))
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                visibility.to_string(),
            )
            .send()
            .await
            .unwrap()
            .queue_url()
            .unwrap()
            .to_owned()
    }

    async fn queue_arn(&self, queue_url: &str) -> String {
        self.sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .unwrap()
            .clone()
    }

    /// A new FIFO topic with a raw-delivery subscription per queue; returns its ARN.
    async fn fifo_topic(&self, queues: &[&str]) -> String {
        let raw: Vec<(&str, bool)> = queues.iter().map(|queue| (*queue, true)).collect();
        self.fifo_topic_with(&raw).await
    }

    /// A new FIFO topic with a subscription per queue, with raw message delivery or not
    /// (then each message is an SNS notification around the envelope); returns its ARN.
    async fn fifo_topic_with(&self, queues: &[(&str, bool)]) -> String {
        let topic_arn = self
            .sns
            .create_topic()
            .name(format!("events-{}.fifo", self.suffix))
            .attributes("FifoTopic", "true")
            .send()
            .await
            .unwrap()
            .topic_arn()
            .unwrap()
            .to_owned();
        for (queue_url, raw) in queues {
            self.sns
                .subscribe()
                .topic_arn(&topic_arn)
                .protocol("sqs")
                .endpoint(self.queue_arn(queue_url).await)
                .attributes("RawMessageDelivery", raw.to_string())
                .send()
                .await
                .unwrap();
        }
        topic_arn
    }

    /// Every message in the queue, with its group id, received (no long poll) and deleted
    /// (a FIFO queue holds back a group's later messages while earlier ones are in flight).
    async fn drain(&self, queue_url: &str) -> Vec<(PersistableDomainEvent, String)> {
        let mut messages = Vec::new();
        loop {
            let received = self
                .sqs
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                .send()
                .await
                .unwrap();
            if received.messages().is_empty() {
                return messages;
            }
            let mut delete = self.sqs.delete_message_batch().queue_url(queue_url);
            for (index, message) in received.messages().iter().enumerate() {
                delete = delete.entries(
                    DeleteMessageBatchRequestEntry::builder()
                        .id(index.to_string())
                        .receipt_handle(message.receipt_handle().unwrap())
                        .build()
                        .unwrap(),
                );
                let event = envelope::decode(message.body().unwrap()).unwrap();
                let group = message
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                    .cloned()
                    .unwrap_or_default();
                messages.push((event, group));
            }
            assert!(delete.send().await.unwrap().failed().is_empty());
        }
    }

    /// How many messages the queue holds, visible or in flight.
    async fn queue_depth(&self, queue_url: &str) -> usize {
        let attributes = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap();
        let attributes = attributes.attributes().unwrap();
        [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .map(|name| attributes[name].parse::<usize>().unwrap())
        .sum()
    }

    /// Sends `bodies` to a FIFO queue, each in `group` with a fresh deduplication id.
    async fn send_raw(&self, queue_url: &str, bodies: &[(String, String)]) {
        for chunk in bodies.chunks(MAX_ENTRIES_PER_SEND) {
            let mut request = self.sqs.send_message_batch().queue_url(queue_url);
            for (index, (body, group)) in chunk.iter().enumerate() {
                request = request.entries(
                    SendMessageBatchRequestEntry::builder()
                        .id(index.to_string())
                        .message_body(body)
                        .message_group_id(group)
                        .message_deduplication_id(Uuid::new_v4().to_string())
                        .build()
                        .unwrap(),
                );
            }
            let output = request.send().await.unwrap();
            assert!(output.failed().is_empty(), "{:?}", output.failed());
        }
    }
}

/// Checks that `messages` hold every event of `ledgers` once, in sequence order per
/// aggregate, each in its aggregate's message group.
#[track_caller]
fn assert_once_in_order(
    messages: &[(PersistableDomainEvent, String)],
    ledgers: &[(Uuid, Vec<u64>)],
) {
    let ids: HashSet<Uuid> = messages.iter().map(|(event, _)| event.event_id).collect();
    assert_eq!(ids.len(), messages.len(), "an event arrived twice");
    let mut per_aggregate: BTreeMap<Uuid, Vec<i64>> = BTreeMap::new();
    for (event, group) in messages {
        assert_eq!(*group, event.aggregate_type_id.to_string());
        per_aggregate
            .entry(event.aggregate_id)
            .or_default()
            .push(event.sequence);
    }
    assert_eq!(per_aggregate.len(), ledgers.len());
    for (id, amounts) in ledgers {
        let expected: Vec<i64> = (1..=amounts.len() as i64).collect();
        assert_eq!(per_aggregate[id], expected, "ledger {id}");
    }
}

/// Appends to a new ledger one deposit per entry of `paddings`, each with metadata padded
/// by that many bytes; returns the ledger's id.
async fn append_padded(store: &DynamoDbEventRepository, paddings: &[usize]) -> Uuid {
    let id = Uuid::new_v4();
    let events: Vec<PersistableDomainEvent> = (1..)
        .zip(paddings)
        .map(|(sequence, padding)| {
            PersistableDomainEvent::new(
                "ledger",
                id,
                sequence,
                &LedgerEvent::Deposited { amount: 1 },
                serde_json::json!({ "padding": "x".repeat(*padding) }),
            )
            .unwrap()
        })
        .collect();
    store.append(events).await.unwrap();
    id
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_sns_fifo_topic_delivers_every_event_once_per_subscriber_in_aggregate_order() {
    let Some(endpoint) = testkit::endpoint(SUITE) else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint);
    let store = harness.fresh_store().await;
    let ledgers = deposits(&store).await;
    let aws = Messaging::new(&endpoint);
    let first = aws.fifo_queue("first", 30).await;
    let second = aws.fifo_queue("second", 30).await;
    // A third subscriber without raw delivery: SNS notifications around the envelopes.
    let wrapped = aws.fifo_queue("wrapped", 30).await;
    let topic_arn = aws
        .fifo_topic_with(&[(&first, true), (&second, true), (&wrapped, false)])
        .await;

    let checkpoints = MemoryCheckpointRepository::new();
    // 7 per batch: batches and send requests (10) end in different places.
    let relay = MessagingRelay::to_sns_topic(
        store.clone(),
        checkpoints.clone(),
        aws.sns.clone(),
        &topic_arn,
    )
    .with_batch_size(7);
    assert_eq!(relay.publish_pending().await.unwrap(), 12);
    let head = store
        .read_all(0, 100)
        .await
        .unwrap()
        .last()
        .unwrap()
        .position;
    assert_eq!(relay.position().await.unwrap(), head);
    assert_eq!(relay.publish_pending().await.unwrap(), 0, "nothing new");

    // A restart from an old checkpoint (a checkpoint save lost): everything after it is
    // published again, and dropped by the topic's deduplication.
    checkpoints
        .save_checkpoint(Checkpoint {
            name: relay.name().to_owned(),
            position: 0,
        })
        .await
        .unwrap();
    let restarted = MessagingRelay::to_sns_topic(
        store.clone(),
        checkpoints.clone(),
        aws.sns.clone(),
        &topic_arn,
    );
    assert_eq!(restarted.publish_pending().await.unwrap(), 12);

    for queue in [&first, &second, &wrapped] {
        let messages = aws.drain(queue).await;
        assert_eq!(messages.len(), 12, "{queue}");
        assert_once_in_order(&messages, &ledgers);
    }
}

#[tokio::test]
async fn the_background_relay_and_consumer_feed_a_view_and_a_redelivery_applies_once() {
    let Some(endpoint) = testkit::endpoint(SUITE) else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint);
    let store = harness.fresh_store().await;
    let aws = Messaging::new(&endpoint);
    let queue = aws.fifo_queue("balances", 30).await;

    let relay = MessagingRelay::to_sqs_queue(
        store.clone(),
        MemoryCheckpointRepository::new(),
        aws.sqs.clone(),
        &queue,
    )
    .with_poll_interval(Duration::from_millis(50))
    .start();
    let ledgers = deposits(&store).await;
    let head = store
        .read_all(0, 100)
        .await
        .unwrap()
        .last()
        .unwrap()
        .position;
    relay.wait_for(head, Duration::from_secs(30)).await.unwrap();
    assert!(relay.is_live());
    assert_eq!(relay.last_error(), None);
    relay.shutdown().await.unwrap();
    // Read what was sent.
    let sent = aws.drain(&queue).await;
    assert_once_in_order(&sent, &ledgers);

    // The consumer works on its own queue, fed the same messages twice: a redelivery that
    // deduplication did not catch (sent again after five minutes, or a delete lost).
    let view_queue = aws.fifo_queue("view", 30).await;
    let bodies: Vec<(String, String)> = sent
        .iter()
        .map(|(event, group)| (envelope::encode(event).unwrap(), group.clone()))
        .collect();
    aws.send_raw(&view_queue, &bodies).await;
    aws.send_raw(&view_queue, &bodies).await;

    let views = DynamoDbViewRepository::<Balance>::new(
        harness.client().clone(),
        harness.fresh_view_table().await,
    );
    let consumer = SqsConsumer::new(
        aws.sqs.clone(),
        &view_queue,
        PerAggregateProjection::<Ledger, Balance>::new(views.clone()),
    )
    .with_wait_time(Duration::ZERO)
    .with_idle_interval(Duration::from_millis(50))
    .start();
    consumer
        .wait_for(24, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(consumer.last_error(), None);
    consumer.shutdown().await.unwrap();

    for (id, amounts) in &ledgers {
        let balance = ViewRepository::<Ledger, Balance>::load(&views, &id.to_string())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(balance.sum, amounts.iter().sum::<u64>());
        assert_eq!(balance.deposits, 4, "each deposit applied once");
    }
    assert_eq!(
        aws.queue_depth(&view_queue).await,
        0,
        "every message deleted"
    );
}

#[tokio::test]
async fn the_consumer_leaves_a_damaged_message_and_its_group_in_the_queue_and_goes_on() {
    let Some(endpoint) = testkit::endpoint(SUITE) else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint);
    let store = harness.fresh_store().await;
    let ledgers = deposits(&store).await;
    let events = store.read_all(0, 100).await.unwrap();
    let aws = Messaging::new(&endpoint);
    let queue = aws.fifo_queue("damaged", 30).await;

    // Ledger 0's events, a damaged message in a group of its own followed by a good event
    // of that group, then ledger 1's events.
    let message = |event: &PersistableDomainEvent| {
        (
            envelope::encode(event).unwrap(),
            event.aggregate_type_id.to_string(),
        )
    };
    let of = |id: Uuid| events.iter().filter(move |e| e.aggregate_id == id);
    let mut bodies: Vec<(String, String)> = of(ledgers[0].0).map(message).collect();
    bodies.push((
        "{\"event_id\": \"not an envelope\"".to_owned(),
        "damaged".to_owned(),
    ));
    let behind = of(ledgers[2].0).next().unwrap();
    bodies.push((envelope::encode(behind).unwrap(), "damaged".to_owned()));
    bodies.extend(of(ledgers[1].0).map(message));
    assert_eq!(bodies.len(), 10);
    aws.send_raw(&queue, &bodies).await;

    let views = DynamoDbViewRepository::<Balance>::new(
        harness.client().clone(),
        harness.fresh_view_table().await,
    );
    let consumer = SqsConsumer::new(
        aws.sqs.clone(),
        &queue,
        PerAggregateProjection::<Ledger, Balance>::new(views.clone()),
    )
    .with_wait_time(Duration::ZERO);
    let polled = consumer.poll_once().await.unwrap();
    assert_eq!(polled.received, 10);
    assert_eq!(polled.committed, 8);
    assert_eq!(polled.failed.len(), 2);
    assert!(
        matches!(
            polled.failed[0].error,
            Some(CQRSError::Deserialization { .. })
        ),
        "{:?}",
        polled.failed[0]
    );
    assert!(
        polled.failed[1].error.is_none(),
        "held back behind the damaged message of its group"
    );
    assert_eq!(aws.queue_depth(&queue).await, 2, "the failed ones stay");

    // (No second receive here: the emulator, unlike SQS, hands out a FIFO group's later
    // message before an earlier one whose visibility timeout passed.)
    for (id, amounts) in &ledgers[..2] {
        let balance = ViewRepository::<Ledger, Balance>::load(&views, &id.to_string())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(balance.sum, amounts.iter().sum::<u64>());
    }
    assert_eq!(
        consumer.projection().sequence(ledgers[2].0).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn large_events_go_in_requests_under_the_size_limit() {
    let Some(endpoint) = testkit::endpoint(SUITE) else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint);
    let store = harness.fresh_store().await;
    // Eight events of about 200 KB: more than a request takes (SNS 256 KiB, SQS 1 MiB).
    let id = append_padded(&store, &[200_000; 8]).await;
    let aws = Messaging::new(&endpoint);
    let queue = aws.fifo_queue("large", 30).await;
    let relay = MessagingRelay::to_sqs_queue(
        store,
        MemoryCheckpointRepository::new(),
        aws.sqs.clone(),
        &queue,
    );
    assert_eq!(relay.publish_pending().await.unwrap(), 8);
    let messages = aws.drain(&queue).await;
    assert_once_in_order(&messages, &[(id, vec![1; 8])]);
}

#[tokio::test]
async fn a_refused_event_stops_the_relay_after_the_events_before_it() {
    let Some(endpoint) = testkit::endpoint(SUITE) else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint);
    let store = harness.fresh_store().await;
    // Sequence 3 is larger than SNS takes in one message (256 KiB): refused on its own.
    let id = append_padded(&store, &[10, 10, 300_000, 10]).await;
    let stored = store.read_all(0, 10).await.unwrap();
    let aws = Messaging::new(&endpoint);
    let queue = aws.fifo_queue("refused", 30).await;
    let topic_arn = aws.fifo_topic(&[&queue]).await;
    let relay = MessagingRelay::to_sns_topic(
        store,
        MemoryCheckpointRepository::new(),
        aws.sns.clone(),
        &topic_arn,
    );
    for _ in 0..2 {
        let error = relay.publish_pending().await.unwrap_err();
        assert!(
            error.to_string().contains(&stored[2].event_id.to_string()),
            "the error names the refused event: {error}"
        );
        assert_eq!(relay.position().await.unwrap(), stored[1].position);
    }
    let messages = aws.drain(&queue).await;
    assert_eq!(messages.len(), 2, "the events before it, once");
    assert_once_in_order(&messages, &[(id, vec![1; 2])]);
}

#[tokio::test]
async fn a_failed_send_leaves_the_checkpoint_where_it_was() {
    let Some(endpoint) = testkit::endpoint(SUITE) else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint);
    let store = harness.fresh_store().await;
    deposits(&store).await;
    let aws = Messaging::new(&endpoint);
    let missing = format!("{endpoint}/123456789012/missing-{}.fifo", aws.suffix);
    let relay = MessagingRelay::to_sqs_queue(
        store,
        MemoryCheckpointRepository::new(),
        aws.sqs.clone(),
        &missing,
    );
    let error = relay.publish_pending().await.unwrap_err();
    assert!(matches!(error, CQRSError::PersistenceError(_)), "{error}");
    assert!(error.to_string().contains("SendMessageBatch"), "{error}");
    assert_eq!(relay.position().await.unwrap(), 0);
}

#[tokio::test]
async fn a_damaged_row_is_published_in_its_damaged_form_and_the_consumer_dead_letters_it() {
    use cqrs::{DeadLetters, PoisonPolicy};
    let Some(endpoint) = testkit::endpoint(SUITE) else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint);
    let store = harness.fresh_store().await;
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for amount in [1, 2, 3] {
        framework.dispatch(a, amount).await.unwrap();
    }
    framework.dispatch(b, 10).await.unwrap();
    let stored = store.read_all(0, 10).await.unwrap();
    // Ledger a's sequence 2 loses its event type, in its item and in its position copy.
    let damaged = stored
        .iter()
        .find(|e| e.aggregate_id == a && e.sequence == 2)
        .unwrap()
        .clone();
    for (pk, sk) in [
        (format!("ledger:{a}"), 2),
        ("$all#0".to_owned(), damaged.position),
    ] {
        harness
            .client()
            .update_item()
            .table_name(store.table())
            .key(
                "pk",
                cqrs_aws::aws_sdk_dynamodb::types::AttributeValue::S(pk),
            )
            .key(
                "sk",
                cqrs_aws::aws_sdk_dynamodb::types::AttributeValue::N(sk.to_string()),
            )
            .update_expression("REMOVE event_type")
            .send()
            .await
            .unwrap();
    }
    assert!(matches!(
        store.read_all(damaged.position - 1, 10).await,
        Err(CQRSError::DamagedRow(_))
    ));

    let aws = Messaging::new(&endpoint);
    let queue = aws.fifo_queue("damaged-row", 30).await;
    let relay = MessagingRelay::to_sqs_queue(
        store.clone(),
        MemoryCheckpointRepository::new(),
        aws.sqs.clone(),
        &queue,
    );
    // The relay goes on past the damaged row.
    assert_eq!(relay.publish_pending().await.unwrap(), 4);
    let last = stored.last().unwrap().position;
    assert_eq!(relay.position().await.unwrap(), last);
    assert_eq!(relay.publish_pending().await.unwrap(), 0);

    let views = DynamoDbViewRepository::<Balance>::new(
        harness.client().clone(),
        harness.fresh_view_table().await,
    );
    let consumer = SqsConsumer::new(
        aws.sqs.clone(),
        &queue,
        PerAggregateProjection::<Ledger, Balance>::new(views.clone())
            .with_poison_policy(PoisonPolicy::SkipAndRecord)
            .with_dead_letters(views.dead_letters()),
    )
    .with_wait_time(Duration::ZERO)
    .with_idle_interval(Duration::from_millis(50))
    .start();
    consumer.wait_for(4, Duration::from_secs(60)).await.unwrap();
    assert_eq!(consumer.last_error(), None);
    consumer.shutdown().await.unwrap();

    let balance = |id: Uuid| {
        let views = views.clone();
        async move {
            ViewRepository::<Ledger, Balance>::load(&views, &id.to_string())
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(
        balance(a).await,
        Balance {
            sum: 4,
            deposits: 2,
            last_sequence: 3
        }
    );
    assert_eq!(balance(b).await.sum, 10);
    let letters = views
        .dead_letters()
        .list(&cqrs::Projection::<Ledger, Balance>::default_name())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (
            letters[0].aggregate_id,
            letters[0].sequence,
            letters[0].position
        ),
        (a, 2, damaged.position)
    );
    assert!(
        letters[0].error.contains("event_type"),
        "{}",
        letters[0].error
    );
    assert_eq!(aws.queue_depth(&queue).await, 0, "every message deleted");
}

#[tokio::test]
async fn the_relay_ends_on_a_store_without_global_order() {
    let Some(endpoint) = testkit::endpoint(SUITE) else {
        return;
    };
    let harness = DynamoDbHarness::new(&endpoint).without_global_order();
    let store = harness.fresh_store().await;
    CQRSFramework::<Ledger>::new(store.clone())
        .dispatch(Uuid::new_v4(), 1)
        .await
        .unwrap();
    let aws = Messaging::new(&endpoint);
    let queue = aws.fifo_queue("unordered", 30).await;
    let relay = MessagingRelay::to_sqs_queue(
        store,
        MemoryCheckpointRepository::new(),
        aws.sqs.clone(),
        &queue,
    );
    assert!(matches!(
        relay.publish_pending().await,
        Err(CQRSError::Unsupported { .. })
    ));
    let handle = relay.start();
    let ended = tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("the relay ends instead of retrying");
    assert!(
        matches!(ended, Err(CQRSError::Unsupported { .. })),
        "{ended:?}"
    );
    assert_eq!(aws.queue_depth(&queue).await, 0);
}
