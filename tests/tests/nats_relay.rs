//! NATS JetStream: the outbox relay (order, headers, deduplication, crash safety under
//! SIGKILL) and the projection fed from JetStream (equal to a full replay, redelivery applied
//! once, poison messages).
//!
//! These tests need the server named by `CQRS_NATS_URL` (with JetStream). When the variable
//! is unset they print why and pass; when it is set and the server cannot be reached they
//! fail. Each test uses its own stream and subject prefix (a fresh uuid) and deletes the
//! stream when it ends.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cqrs::async_nats;
use cqrs::async_nats::jetstream;
use cqrs::async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use cqrs::async_nats::jetstream::stream::LastRawMessageErrorKind;
use cqrs::{
    Aggregate, CQRSError, Checkpoint, CheckpointRepository, EventEnvelope, EventRepository,
    HandlerRetry, MemoryCheckpointRepository, MemoryEventRepository, MemoryViewRepository,
    PersistableDomainEvent, PoisonPolicy, SqliteEventRepository, View, ViewRepository,
};
use cqrs::{Durability, SqliteOptions};
use cqrs::{NatsProjection, NatsRelay, NatsStreamConfig};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// The domain: the shared ledger, with a view that checks that it sees each event once and
// in order.

mod common;

use common::ledger::{Ledger, LedgerError, LedgerEvent};
use common::lost_commit::LostCommitAnswer;
use common::nats::{connect, nats_url, TestStream};
use cqrs_tests::JetStreamServer;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Balance {
    balance: i64,
    events: u64,
    last_sequence: i64,
    last_position: i64,
}

impl View<Ledger> for Balance {
    const TABLE_NAME: &'static str = "nats_balance";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        // Refuse what a double or out-of-order application would look like.
        if envelope.position <= self.last_position || envelope.sequence <= self.last_sequence {
            return Err(LedgerError::OutOfOrder {
                last: self.last_position,
                got: envelope.position,
            });
        }
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.balance += amount as i64;
        self.events += 1;
        self.last_sequence = envelope.sequence;
        self.last_position = envelope.position;
        Ok(())
    }
}

/// `count` events for one ledger, sequences `first..first + count`.
fn ledger_events(id: Uuid, first: i64, count: i64) -> Vec<PersistableDomainEvent> {
    (first..first + count)
        .map(|sequence| {
            let amount = if sequence % 3 == 0 {
                sequence as u64
            } else {
                10 * sequence as u64
            };
            let event = LedgerEvent::Deposited { amount };
            PersistableDomainEvent::new(
                Ledger::NAME,
                id,
                sequence,
                &event,
                serde_json::json!({ "test": "nats" }),
            )
            .unwrap()
        })
        .collect()
}

/// An event of another aggregate type, which the ledger view must never see.
fn audit_event(id: Uuid, sequence: i64) -> PersistableDomainEvent {
    let mut event = PersistableDomainEvent::new(
        "audit",
        id,
        sequence,
        &LedgerEvent::Deposited { amount: 1 },
        serde_json::Value::Null,
    )
    .unwrap();
    event.event_type = "Audited".into();
    event
}

/// Appends `rounds` events to each of `ledgers`, interleaved, plus an audit event per round.
async fn append_interleaved(
    store: &impl EventRepository,
    ledgers: &[Uuid],
    audit: Uuid,
    rounds: std::ops::Range<i64>,
) {
    for round in rounds {
        for id in ledgers {
            store.append(ledger_events(*id, round, 1)).await.unwrap();
        }
        store.append(vec![audit_event(audit, round)]).await.unwrap();
    }
}

/// The ledger views as a full replay of the store computes them.
async fn replay(store: &impl EventRepository) -> BTreeMap<String, Balance> {
    let mut views: BTreeMap<String, Balance> = BTreeMap::new();
    for stored in store.read_all(0, usize::MAX).await.unwrap() {
        if stored.aggregate_type != Ledger::NAME {
            continue;
        }
        let envelope = stored.decode::<LedgerEvent>().unwrap();
        views
            .entry(envelope.aggregate_id.to_string())
            .or_default()
            .handle_event(&envelope)
            .unwrap();
    }
    views
}

async fn load_views(
    views: &MemoryViewRepository<Balance>,
    ids: &[Uuid],
) -> BTreeMap<String, Balance> {
    let mut loaded = BTreeMap::new();
    for id in ids {
        if let Some(view) = ViewRepository::<Ledger, Balance>::load(views, &id.to_string())
            .await
            .unwrap()
        {
            loaded.insert(id.to_string(), view);
        }
    }
    loaded
}

// ---------------------------------------------------------------------------------------
// The server and a stream per test.

/// Every message of the stream, in stream order (deleted sequences passed over).
async fn stream_messages(
    jetstream: &jetstream::Context,
    config: &NatsStreamConfig,
) -> Vec<jetstream::message::StreamMessage> {
    let mut stream = jetstream.get_stream(config.stream_name()).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        match stream.get_raw_message(sequence).await {
            Ok(message) => messages.push(message),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(error) => panic!("stream message {sequence}: {error}"),
        }
    }
    messages
}

/// Deletes the stream's newest `count` messages, as a server that lost its unsynced tail in
/// a crash would no longer hold them (the server still remembers their ids, which a crash
/// would forget). Returns how many it deleted (fewer when the stream holds fewer).
async fn cut_tail(
    jetstream: &jetstream::Context,
    config: &NatsStreamConfig,
    count: usize,
) -> usize {
    let mut stream = jetstream.get_stream(config.stream_name()).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut deleted = 0;
    let mut sequence = state.last_sequence;
    while deleted < count && sequence >= state.first_sequence.max(1) {
        match stream.get_raw_message(sequence).await {
            Ok(_) => {
                stream.delete_message(sequence).await.unwrap();
                deleted += 1;
            }
            // Deleted before.
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(error) => panic!("stream message {sequence}: {error}"),
        }
        sequence -= 1;
    }
    deleted
}

/// The event id a message's `Nats-Msg-Id` names: the event id, or `<event id>:<stream
/// sequence>` for an event stored again while the server remembered its id.
fn event_id_of(message: &jetstream::message::StreamMessage) -> Uuid {
    let id = header(message, "Nats-Msg-Id");
    match id.split_once(':') {
        Some((event_id, sequence)) => {
            assert_eq!(
                sequence,
                message.sequence.to_string(),
                "a renamed message id names its own stream sequence"
            );
            event_id.parse().unwrap()
        }
        None => id.parse().unwrap(),
    }
}

fn header<'a>(message: &'a jetstream::message::StreamMessage, name: &str) -> &'a str {
    // The standard NATS headers are parsed into their own variant, looked up by constant.
    let found = if name == "Nats-Msg-Id" {
        message.headers.get(async_nats::header::NATS_MESSAGE_ID)
    } else {
        message.headers.get(name)
    };
    found
        .map(|value| value.as_str())
        .unwrap_or_else(|| panic!("message {} has no {name} header", message.sequence))
}

/// Checks that the stream holds exactly the store's events, once each, in global order.
async fn assert_stream_is_store(
    jetstream: &jetstream::Context,
    config: &NatsStreamConfig,
    stored: &[PersistableDomainEvent],
) {
    let messages = stream_messages(jetstream, config).await;
    assert_eq!(
        messages.len(),
        stored.len(),
        "the stream should hold each of the {} events exactly once",
        stored.len()
    );
    for (message, event) in messages.iter().zip(stored) {
        assert_eq!(
            event_id_of(message),
            event.event_id,
            "stream message {} should be the event at position {}",
            message.sequence,
            event.position
        );
        assert_eq!(
            header(message, NatsRelay::HEADER_POSITION),
            event.position.to_string()
        );
        let body = NatsRelay::decode_message(&message.subject, message.sequence, &message.payload)
            .unwrap();
        assert_eq!(&body, event);
    }
}

// ---------------------------------------------------------------------------------------
// The relay.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_every_event_in_global_order_with_headers() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let (a, b, audit) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    append_interleaved(&store, &[a, b], audit, 1..21).await;

    let checkpoints = MemoryCheckpointRepository::new();
    // Small batches: the order must hold across batch boundaries too.
    let relay = NatsRelay::new(
        store.clone(),
        checkpoints.clone(),
        jetstream.clone(),
        test.config.clone(),
    )
    .with_batch_size(7);
    relay.ensure_stream().await.unwrap();
    let reached = relay.catch_up().await.unwrap();

    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_eq!(stored.len(), 60);
    assert_eq!(reached, 60);
    assert_eq!(checkpoints.load_checkpoint(relay.name()).await.unwrap(), 60);

    let messages = stream_messages(&jetstream, &test.config).await;
    assert_eq!(messages.len(), stored.len());
    for (message, event) in messages.iter().zip(&stored) {
        assert_eq!(
            message.subject.as_str(),
            format!(
                "{}.{}.{}",
                test.config.subject_prefix(),
                event.aggregate_type,
                event.event_type
            )
        );
        assert_eq!(header(message, "Nats-Msg-Id"), event.event_id.to_string());
        assert_eq!(
            header(message, NatsRelay::HEADER_AGGREGATE_TYPE),
            event.aggregate_type
        );
        assert_eq!(
            header(message, NatsRelay::HEADER_AGGREGATE_ID),
            event.aggregate_id.to_string()
        );
        assert_eq!(
            header(message, NatsRelay::HEADER_SEQUENCE),
            event.sequence.to_string()
        );
        assert_eq!(
            header(message, NatsRelay::HEADER_POSITION),
            event.position.to_string()
        );
        assert_eq!(
            header(message, NatsRelay::HEADER_EVENT_TYPE),
            event.event_type
        );
        assert_eq!(
            header(message, NatsRelay::HEADER_EVENT_VERSION),
            event.event_version
        );
        // The wire format: the stored event as JSON, whole.
        let body: PersistableDomainEvent = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(&body, event);
    }

    // Nothing new: nothing published.
    assert_eq!(relay.relay_once().await.unwrap(), 0);
    assert_eq!(stream_messages(&jetstream, &test.config).await.len(), 60);

    // The stream is created idempotently, and the duplicate window is kept up to date.
    let longer = test
        .config
        .clone()
        .with_duplicate_window(Duration::from_secs(1200));
    longer.ensure_stream(&jetstream).await.unwrap();
    longer.ensure_stream(&jetstream).await.unwrap();
    let mut stream = jetstream
        .get_stream(test.config.stream_name())
        .await
        .unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(1200));
    assert_eq!(info.config.subjects, vec![test.config.subjects()]);
    assert_eq!(info.state.messages, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_rerun_from_checkpoint_zero_adds_nothing_to_the_stream() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let (a, audit) = (Uuid::new_v4(), Uuid::new_v4());
    append_interleaved(&store, &[a], audit, 1..31).await;

    let first = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream.clone(),
        test.config.clone(),
    )
    .with_batch_size(8);
    first.ensure_stream().await.unwrap();
    assert_eq!(first.catch_up().await.unwrap(), 60);

    // A crash before the checkpoint was saved: a new relay starts again from 0, finds the
    // stream holding the events up to 60, and does not publish them again.
    let restarted = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream.clone(),
        test.config.clone(),
    )
    .with_batch_size(16);
    assert_eq!(restarted.catch_up().await.unwrap(), 60);
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_stream_is_store(&jetstream, &test.config, &stored).await;

    // And it goes on with new events after the duplicates, in order.
    append_interleaved(&store, &[a], audit, 31..41).await;
    assert_eq!(restarted.catch_up().await.unwrap(), 80);
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_stream_is_store(&jetstream, &test.config, &stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_runner_publishes_events_appended_while_it_runs() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let (a, audit) = (Uuid::new_v4(), Uuid::new_v4());
    append_interleaved(&store, &[a], audit, 1..6).await;

    let checkpoints = MemoryCheckpointRepository::new();
    let relay = NatsRelay::new(
        store.clone(),
        checkpoints.clone(),
        jetstream.clone(),
        test.config.clone(),
    )
    // Long enough that only the store's notification explains a prompt publish.
    .with_poll_interval(Duration::from_secs(30));
    let name = relay.name().to_owned();
    let handle = relay.start();
    append_interleaved(&store, &[a], audit, 6..11).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    while checkpoints.load_checkpoint(&name).await.unwrap() < 20 {
        assert!(
            Instant::now() < deadline,
            "the running relay did not publish the new events"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown().await.unwrap();
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_stream_is_store(&jetstream, &test.config, &stored).await;
}

/// What a projection saw of each event's correlation and causation, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Lineage {
    seen: Vec<(i64, Option<Uuid>, Option<Uuid>)>,
}

impl View<Ledger> for Lineage {
    const TABLE_NAME: &'static str = "nats_lineage";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        self.seen.push((
            envelope.sequence,
            envelope.correlation_id,
            envelope.causation_id,
        ));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_and_causation_travel_to_the_consumer() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let id = Uuid::new_v4();
    let (correlation, command) = (Uuid::new_v4(), Uuid::new_v4());
    let ids = [
        (Some(correlation), Some(command)),
        (Some(correlation), None),
        (None, Some(command)),
        (None, None),
    ];
    let events: Vec<_> = ledger_events(id, 1, 4)
        .into_iter()
        .zip(ids)
        .map(|(mut event, (correlation_id, causation_id))| {
            event.correlation_id = correlation_id;
            event.causation_id = causation_id;
            event
        })
        .collect();
    store.append(events).await.unwrap();

    let relay = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream.clone(),
        test.config.clone(),
    );
    relay.ensure_stream().await.unwrap();
    relay.catch_up().await.unwrap();

    // The headers carry each id the event has, and only those; the body carries both.
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    let messages = stream_messages(&jetstream, &test.config).await;
    assert_eq!(messages.len(), 4);
    for (message, (correlation_id, causation_id)) in messages.iter().zip(ids) {
        let value = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().parse::<Uuid>().unwrap())
        };
        assert_eq!(value(NatsRelay::HEADER_CORRELATION_ID), correlation_id);
        assert_eq!(value(NatsRelay::HEADER_CAUSATION_ID), causation_id);
    }
    assert_stream_is_store(&jetstream, &test.config, &stored).await;

    // A projection fed from the stream sees them in its envelopes.
    let views = MemoryViewRepository::<Lineage>::new();
    let projection = NatsProjection::<Ledger, Lineage>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(format!("lineage_{}", Uuid::new_v4().simple()));
    projection.catch_up().await.unwrap();
    let seen = ViewRepository::<Ledger, Lineage>::load(&views, &id.to_string())
        .await
        .unwrap()
        .unwrap()
        .seen;
    let expected: Vec<_> = (1..=4).zip(ids).map(|(s, (c, k))| (s, c, k)).collect();
    assert_eq!(seen, expected);
}

// ---------------------------------------------------------------------------------------
// The projection fed from JetStream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_from_jetstream_equals_a_full_replay_and_redelivery_applies_once() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let ledgers: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let audit = Uuid::new_v4();
    append_interleaved(&store, &ledgers, audit, 1..41).await;

    let relay = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream.clone(),
        test.config.clone(),
    );
    relay.ensure_stream().await.unwrap();
    relay.catch_up().await.unwrap();

    let views = MemoryViewRepository::<Balance>::new();
    let durable = format!("balance_{}", Uuid::new_v4().simple());
    let projection = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(durable.clone())
    .with_batch_size(32);
    let position = projection.catch_up().await.unwrap();
    let last_ledger = store
        .read_all(0, usize::MAX)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.aggregate_type == Ledger::NAME)
        .map(|e| e.position)
        .max()
        .unwrap();
    assert_eq!(position, last_ledger);
    assert_eq!(load_views(&views, &ledgers).await, replay(&store).await);

    // More events; a restarted projection (new instance, same checkpoint and durable name)
    // picks up exactly where the view is.
    append_interleaved(&store, &ledgers, audit, 41..61).await;
    relay.catch_up().await.unwrap();
    let restarted = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(durable)
    .with_batch_size(7);
    restarted.catch_up().await.unwrap();
    let expected = replay(&store).await;
    assert_eq!(load_views(&views, &ledgers).await, expected);
    assert_eq!(expected.values().map(|v| v.events).sum::<u64>(), 5 * 60);

    // Redelivery of everything (a consumer from the first message, as after a crash between
    // the commit and the acks): every message is acknowledged, none is applied again.
    let stream = jetstream
        .get_stream(test.config.stream_name())
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            filter_subject: test.config.aggregate_subjects(Ledger::NAME),
            ..Default::default()
        })
        .await
        .unwrap();
    let checkpoint_before = restarted.position().await.unwrap();
    let mut redelivered = 0;
    loop {
        let mut batch = consumer.fetch().max_messages(64).messages().await.unwrap();
        let mut messages = Vec::new();
        while let Some(message) = batch.next().await {
            messages.push(message.unwrap());
        }
        if messages.is_empty() {
            break;
        }
        redelivered += restarted.apply_messages(messages).await.unwrap();
    }
    assert_eq!(redelivered, 5 * 60);
    assert_eq!(restarted.position().await.unwrap(), checkpoint_before);
    assert_eq!(load_views(&views, &ledgers).await, expected);
    // They were acknowledged: nothing is left pending on that consumer.
    let mut consumer = consumer;
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_applies_once_when_the_commit_succeeded_but_the_acks_were_not_sent() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let ledgers = [Uuid::new_v4(), Uuid::new_v4()];
    append_interleaved(&store, &ledgers, Uuid::new_v4(), 1..26).await;
    let relay = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream.clone(),
        test.config.clone(),
    );
    relay.ensure_stream().await.unwrap();
    relay.catch_up().await.unwrap();

    let views = MemoryViewRepository::<Balance>::new();
    // The second commit is written, then its answer is lost.
    let flaky = LostCommitAnswer::new(views.clone(), 1);
    let durable = format!("balance_{}", Uuid::new_v4().simple());
    let projection =
        NatsProjection::<Ledger, Balance>::new(jetstream.clone(), test.config.clone(), flaky)
            .with_durable_name(durable.clone())
            .with_batch_size(10);
    // Batch 1 is committed and acknowledged; batch 2 is committed but not acknowledged.
    let error = projection.catch_up().await.unwrap_err();
    assert!(matches!(error, CQRSError::PersistenceError(_)), "{error:?}");
    // 20 ledger events: rounds 1 to 10, two ledgers and one audit event per round.
    assert_eq!(projection.position().await.unwrap(), 29);
    // The next run goes on from the checkpoint: batch 2 is not applied a second time (the
    // view refuses an event it has already seen, so a double application would fail here).
    projection.catch_up().await.unwrap();
    assert_eq!(load_views(&views, &ledgers).await, replay(&store).await);

    let stream = jetstream
        .get_stream(test.config.stream_name())
        .await
        .unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer(&durable).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_runner_applies_events_as_they_arrive() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let ledgers = [Uuid::new_v4(), Uuid::new_v4()];
    let audit = Uuid::new_v4();
    append_interleaved(&store, &ledgers, audit, 1..11).await;
    test.config.ensure_stream(&jetstream).await.unwrap();
    let relay = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream.clone(),
        test.config.clone(),
    )
    .start();
    let views = MemoryViewRepository::<Balance>::new();
    let projection = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(format!("balance_{}", Uuid::new_v4().simple()))
    .with_fetch_wait(Duration::from_millis(200))
    .start();
    append_interleaved(&store, &ledgers, audit, 11..31).await;

    let expected = replay(&store).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while load_views(&views, &ledgers).await != expected {
        assert!(
            Instant::now() < deadline,
            "the running projection did not catch up: {:?} vs {expected:?}",
            load_views(&views, &ledgers).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    projection.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

/// A fresh test stream holding one ledger's events 1 to 3, published by a relay.
struct Relayed {
    jetstream: jetstream::Context,
    test: TestStream,
    store: MemoryEventRepository,
    id: Uuid,
    relay: NatsRelay,
}

async fn three_events_relayed(url: &str) -> Relayed {
    let jetstream = connect(url).await;
    let test = TestStream::new(url);
    let store = MemoryEventRepository::new();
    let id = Uuid::new_v4();
    store.append(ledger_events(id, 1, 3)).await.unwrap();
    let relay = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream.clone(),
        test.config.clone(),
    );
    relay.ensure_stream().await.unwrap();
    relay.catch_up().await.unwrap();
    Relayed {
        jetstream,
        test,
        store,
        id,
        relay,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_never_silently_drops_a_message_it_cannot_apply() {
    let Some(url) = nats_url() else { return };
    let Relayed {
        jetstream,
        test,
        store,
        id,
        relay,
    } = three_events_relayed(&url).await;
    // A body that is not an event, on a ledger subject.
    jetstream
        .publish(
            format!("{}.ledger.Deposited", test.config.subject_prefix()),
            "not an event".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // An event whose type the ledger does not know (written by a newer deployment).
    let mut unknown = ledger_events(id, 4, 1).remove(0);
    unknown.event_type = "Frozen".into();
    store.insert_unchecked(unknown);
    store.append(ledger_events(id, 5, 2)).await.unwrap();
    relay.catch_up().await.unwrap();

    // Stop (the default): the projection stops at the garbage, after applying what came
    // before it, and stops there again when restarted.
    let views = MemoryViewRepository::<Balance>::new();
    let durable = format!("balance_{}", Uuid::new_v4().simple());
    let stopping = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(durable.clone());
    for _ in 0..2 {
        let error = stopping.catch_up().await.unwrap_err();
        assert!(
            matches!(error, CQRSError::Deserialization { .. }),
            "expected a decoding error, got {error:?}"
        );
        assert_eq!(stopping.position().await.unwrap(), 3);
        let view = load_views(&views, &[id]).await;
        assert_eq!(view[&id.to_string()].events, 3);
    }

    // SkipAndRecord: the garbage is recorded as undecodable, the unknown event as a dead
    // letter naming it, and every other event is applied.
    let skipping = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(durable)
    .with_poison_policy(PoisonPolicy::SkipAndRecord);
    let result = skipping.catch_up().await;
    assert!(result.is_ok(), "{result:?}");
    let undecodable = skipping.undecodable();
    assert_eq!(undecodable.len(), 1, "{undecodable:?}");
    assert!(undecodable[0].subject.ends_with(".ledger.Deposited"));
    let letters = skipping.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].sequence, 4);
    assert_eq!(letters[0].position, 4);
    assert_eq!(letters[0].event_type, "Frozen");
    assert_eq!(letters[0].aggregate_id, id);
    assert_eq!(letters[0].view, "nats_balance");
    assert_eq!(skipping.position().await.unwrap(), 6);
    let view = load_views(&views, &[id]).await;
    assert_eq!(view[&id.to_string()].events, 5);
    assert_eq!(view[&id.to_string()].last_position, 6);

    // Started in the background, a projection's dead letters are read through its handle
    // while it runs.
    let fresh_views = MemoryViewRepository::<Balance>::new();
    let running = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        fresh_views.clone(),
    )
    .with_durable_name(format!("balance_{}", Uuid::new_v4().simple()))
    .with_poison_policy(PoisonPolicy::SkipAndRecord)
    .start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ViewRepository::<Ledger, Balance>::checkpoint(&fresh_views, running.name())
        .await
        .unwrap()
        < 6
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the started projection did not reach position 6"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!running.is_finished());
    let letters = running.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].event_type, "Frozen");
    assert_eq!(letters[0].position, 4);
    running.shutdown().await.unwrap();
}

/// Failures left before the flaky view accepts the event at position 2.
static FLAKY_FAILURES_LEFT: AtomicUsize = AtomicUsize::new(0);

/// A view whose handler fails for the event at position 2 while `FLAKY_FAILURES_LEFT` is
/// above zero (a dependency that is briefly down), and counts the events it applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Flaky {
    applied: Vec<i64>,
}

impl View<Ledger> for Flaky {
    const TABLE_NAME: &'static str = "nats_flaky";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        if envelope.position == 2
            && FLAKY_FAILURES_LEFT
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(LedgerError::OutOfOrder {
                last: 0,
                got: envelope.position,
            });
        }
        self.applied.push(envelope.position);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_retries_a_failing_handler_before_the_poison_policy() {
    let Some(url) = nats_url() else { return };
    let Relayed {
        jetstream,
        test,
        id,
        ..
    } = three_events_relayed(&url).await;
    let retry = HandlerRetry {
        attempts: 3,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
    };

    // Two failures, three tries: the third try applies it, nothing is skipped, and the
    // view holds every event once, in order.
    FLAKY_FAILURES_LEFT.store(2, Ordering::SeqCst);
    let views = MemoryViewRepository::<Flaky>::new();
    let projection =
        NatsProjection::<Ledger, Flaky>::new(jetstream.clone(), test.config.clone(), views.clone())
            .with_durable_name(format!("flaky_{}", Uuid::new_v4().simple()))
            .with_handler_retry(retry);
    assert_eq!(projection.catch_up().await.unwrap(), 3);
    assert!(projection.dead_letters().await.unwrap().is_empty());
    let view = ViewRepository::<Ledger, Flaky>::load(&views, &id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.applied, vec![1, 2, 3]);
    assert_eq!(FLAKY_FAILURES_LEFT.load(Ordering::SeqCst), 0);

    // Three failures, three tries: the policy (Stop) applies, with the event named.
    FLAKY_FAILURES_LEFT.store(3, Ordering::SeqCst);
    let views = MemoryViewRepository::<Flaky>::new();
    let projection =
        NatsProjection::<Ledger, Flaky>::new(jetstream.clone(), test.config.clone(), views.clone())
            .with_durable_name(format!("flaky_{}", Uuid::new_v4().simple()))
            .with_handler_retry(retry);
    let error = projection.catch_up().await.unwrap_err();
    let CQRSError::ViewHandler(handler) = &error else {
        panic!("expected a view handler error, got {error:?}");
    };
    assert_eq!((handler.aggregate_id, handler.sequence), (id, 2));
    assert_eq!(projection.position().await.unwrap(), 1);
    assert_eq!(
        FLAKY_FAILURES_LEFT.load(Ordering::SeqCst),
        0,
        "tried exactly 3 times"
    );
}

// ---------------------------------------------------------------------------------------
// Crash safety: a relay process killed with SIGKILL again and again.

/// The relay's checkpoint in the SQLite file it reads the events from.
struct SqliteCheckpoints(SqliteEventRepository);

#[async_trait]
impl CheckpointRepository for SqliteCheckpoints {
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        self.0.checkpoint(name).await
    }
    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        self.0.save_checkpoint(checkpoint).await
    }
}

const CHILD_DB: &str = "CQRS_NATS_RELAY_CHILD_DB";
const CHILD_STREAM: &str = "CQRS_NATS_RELAY_CHILD_STREAM";
const CHILD_PREFIX: &str = "CQRS_NATS_RELAY_CHILD_PREFIX";
const RELAY_NAME: &str = "crash_relay";

async fn open_sqlite(path: &std::path::Path) -> SqliteEventRepository {
    let store = SqliteEventRepository::connect(
        &path.display().to_string(),
        SqliteOptions::default().durability(Durability::Normal),
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store
}

/// The relay process of `relay_survives_sigkill`: that test runs this test binary with
/// `--ignored --exact relay_child_process` and the variables above, and kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of relay_survives_sigkill, started by it"]
async fn relay_child_process() {
    let (Ok(db), Ok(stream), Ok(prefix), Some(url)) = (
        std::env::var(CHILD_DB),
        std::env::var(CHILD_STREAM),
        std::env::var(CHILD_PREFIX),
        nats_url(),
    ) else {
        eprintln!("relay_child_process only runs as the child of relay_survives_sigkill");
        return;
    };
    let store = open_sqlite(&PathBuf::from(db)).await;
    let relay = NatsRelay::new(
        store.clone(),
        SqliteCheckpoints(store),
        connect(&url).await,
        NatsStreamConfig::new(stream, prefix),
    )
    .with_name(RELAY_NAME)
    .with_batch_size(50)
    // Appends come from another process: no notification reaches this one.
    .with_poll_interval(Duration::from_millis(10));
    let _handle = relay.start();
    // Runs until killed.
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// A number in `low..high` that differs from run to run.
fn random_between(low: u64, high: u64) -> u64 {
    low + (Uuid::new_v4().as_u128() % u128::from(high - low)) as u64
}

fn spawn_relay_child(db: &std::path::Path, config: &NatsStreamConfig) -> tokio::process::Child {
    let exe = std::env::current_exe().unwrap();
    tokio::process::Command::new(exe)
        .args(["relay_child_process", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_DB, db)
        .env(CHILD_STREAM, config.stream_name())
        .env(CHILD_PREFIX, config.subject_prefix())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// 20,000 events are appended (from this process) while a relay process is killed with
/// SIGKILL at random moments, at least 5 times, and restarted, the stream losing a random
/// part of its tail at every other kill; afterwards the stream holds every event exactly
/// once, in global order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_survives_sigkill() {
    const LEDGERS: usize = 40;
    const EVENTS_PER_APPEND: i64 = 10;
    const ROUNDS: i64 = 50; // 40 ledgers * 50 rounds * 10 events = 20,000 events
    const MIN_KILLS: u32 = 5;

    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    test.config.ensure_stream(&jetstream).await.unwrap();
    let db = std::env::temp_dir().join(format!("cqrs-nats-crash-{}.sqlite", Uuid::new_v4()));
    let store = open_sqlite(&db).await;

    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let ledgers: Vec<Uuid> = (0..LEDGERS).map(|_| Uuid::new_v4()).collect();
            for round in 0..ROUNDS {
                for id in &ledgers {
                    let first = round * EVENTS_PER_APPEND + 1;
                    store
                        .append(ledger_events(*id, first, EVENTS_PER_APPEND))
                        .await
                        .unwrap();
                }
            }
        })
    };

    let started = Instant::now();
    let mut kills = 0;
    let mut positions_at_kill = Vec::new();
    let mut unsaved_at_kill = Vec::new();
    let mut cuts_at_kill = Vec::new();
    while kills < MIN_KILLS || !writer.is_finished() {
        let mut child = spawn_relay_child(&db, &test.config);
        tokio::time::sleep(Duration::from_millis(random_between(150, 900))).await;
        child.kill().await.unwrap(); // SIGKILL
        kills += 1;
        let checkpoint = store.checkpoint(RELAY_NAME).await.unwrap();
        // Events in the stream beyond the saved checkpoint: the next run finds them there
        // and goes on after them.
        let in_stream = jetstream
            .get_stream(test.config.stream_name())
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages;
        unsaved_at_kill.push(in_stream as i64 - checkpoint);
        positions_at_kill.push(checkpoint);
        // Every other time, the server loses a random part of the stream's tail too, as one
        // that lost power before syncing what it had acknowledged.
        if kills % 2 == 0 {
            let cut = random_between(1, 120) as usize;
            cuts_at_kill.push(cut_tail(&jetstream, &test.config, cut).await);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "appending took too long"
        );
    }
    writer.await.unwrap();
    let total = LEDGERS as i64 * ROUNDS * EVENTS_PER_APPEND;
    let last = store.read_all(total - 1, 10).await.unwrap();
    assert_eq!(last.last().map(|e| e.position), Some(total));

    // A last run, left alone until it has published everything.
    let mut child = spawn_relay_child(&db, &test.config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.checkpoint(RELAY_NAME).await.unwrap() < total {
        assert!(
            Instant::now() < deadline,
            "the relay did not finish: checkpoint {} of {total}",
            store.checkpoint(RELAY_NAME).await.unwrap()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the relay process exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();
    eprintln!(
        "relay_survives_sigkill: {total} events, {kills} kills, checkpoints at the kills: \
         {positions_at_kill:?}, events published beyond the checkpoint at the kills: \
         {unsaved_at_kill:?}, messages cut from the stream's tail: {cuts_at_kill:?}"
    );
    assert!(
        positions_at_kill.windows(2).any(|w| w[0] < w[1]),
        "the relay should have made progress between kills: {positions_at_kill:?}"
    );

    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_eq!(stored.len() as i64, total);
    assert_stream_is_store(&jetstream, &test.config, &stored).await;
    let ids: HashSet<Uuid> = stream_messages(&jetstream, &test.config)
        .await
        .iter()
        .map(event_id_of)
        .collect();
    assert_eq!(
        ids.len() as i64,
        total,
        "an event id appears twice in the stream"
    );

    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

// ---------------------------------------------------------------------------------------
// Damaged rows in the store: relayed as they are, one poison event each for the consumer.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_rows_are_relayed_and_dead_lettered_by_the_consumer() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let db = std::env::temp_dir().join(format!("cqrs-nats-damaged-{}.sqlite", Uuid::new_v4()));
    let store = open_sqlite(&db).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    // Positions: a1 b1 a2 b2 a3 b3.
    for sequence in 1..=3 {
        for id in [a, b] {
            store.append(ledger_events(id, sequence, 1)).await.unwrap();
        }
    }
    // Position 3 (a2): a payload that is not JSON; position 5 (a3): metadata that is not.
    for sql in [
        "UPDATE cqrs_events SET payload = '{\"Deposited\": oops' WHERE position = 3",
        "UPDATE cqrs_events SET metadata = '{oops' WHERE position = 5",
    ] {
        let changed = cqrs::sqlx::query(sql)
            .execute(store.pool())
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(changed, 1);
    }

    // The running relay does not stall on them: all six positions reach the stream.
    let checkpoints = MemoryCheckpointRepository::new();
    let relay = NatsRelay::new(
        store.clone(),
        checkpoints.clone(),
        jetstream.clone(),
        test.config.clone(),
    );
    let name = relay.name().to_owned();
    let handle = relay.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while checkpoints.load_checkpoint(&name).await.unwrap() < 6 {
        assert!(
            Instant::now() < deadline,
            "the relay stalled at position {}",
            checkpoints.load_checkpoint(&name).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown().await.unwrap();
    let messages = stream_messages(&jetstream, &test.config).await;
    let positions: Vec<&str> = messages
        .iter()
        .map(|message| header(message, NatsRelay::HEADER_POSITION))
        .collect();
    assert_eq!(positions, ["1", "2", "3", "4", "5", "6"]);

    // Stop (the default): the consumer stops at the damaged payload, after the events
    // before it, and stops there again when restarted.
    let views = MemoryViewRepository::<Balance>::new();
    let durable = format!("balance_{}", Uuid::new_v4().simple());
    let stopping = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(durable.clone())
    .with_handler_retry(HandlerRetry::none());
    for _ in 0..2 {
        match stopping.catch_up().await.unwrap_err() {
            CQRSError::EventDecode(decode) => {
                assert_eq!((decode.aggregate_id, decode.sequence), (a, 2));
            }
            other => panic!("expected EventDecode of a2, got {other:?}"),
        }
        assert_eq!(stopping.position().await.unwrap(), 2);
    }

    // SkipAndRecord: both damaged rows become dead letters, everything else is applied.
    let skipping = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(durable)
    .with_handler_retry(HandlerRetry::none())
    .with_poison_policy(PoisonPolicy::SkipAndRecord);
    let result = skipping.catch_up().await;
    assert_eq!(result.unwrap(), 6);
    let letters = skipping.dead_letters().await.unwrap();
    let named: Vec<(i64, Uuid, i64)> = letters
        .iter()
        .map(|letter| (letter.position, letter.aggregate_id, letter.sequence))
        .collect();
    assert_eq!(named, [(3, a, 2), (5, a, 3)], "{letters:?}");
    assert!(
        letters[0].error.contains("malformed payload"),
        "{letters:?}"
    );
    assert!(
        letters[1].error.contains("metadata is not JSON"),
        "{letters:?}"
    );
    assert!(skipping.undecodable().is_empty());
    let view = load_views(&views, &[a, b]).await;
    assert_eq!(view[&a.to_string()].events, 1);
    assert_eq!(view[&b.to_string()].events, 3);

    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

// ---------------------------------------------------------------------------------------
// A server that lost what it had acknowledged: the stream's tail cut, or the whole stream
// recreated, while the relay is down.

/// A relay on `store` and `checkpoints`, publishing 7 events per batch.
fn small_batch_relay(
    store: &MemoryEventRepository,
    checkpoints: &MemoryCheckpointRepository,
    jetstream: &jetstream::Context,
    config: &NatsStreamConfig,
) -> NatsRelay {
    NatsRelay::new(
        store.clone(),
        checkpoints.clone(),
        jetstream.clone(),
        config.clone(),
    )
    .with_batch_size(7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_again_the_tail_the_stream_lost() {
    const CUT: usize = 17;
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let checkpoints = MemoryCheckpointRepository::new();
    let ledgers = [Uuid::new_v4(), Uuid::new_v4()];
    let audit = Uuid::new_v4();

    // The first N - K events reach the stream and a consumer's view.
    append_interleaved(&store, &ledgers, audit, 1..11).await;
    let relay = small_batch_relay(&store, &checkpoints, &jetstream, &test.config);
    relay.ensure_stream().await.unwrap();
    assert_eq!(relay.catch_up().await.unwrap(), 30);
    let views = MemoryViewRepository::<Balance>::new();
    let projection = NatsProjection::<Ledger, Balance>::new(
        jetstream.clone(),
        test.config.clone(),
        views.clone(),
    )
    .with_durable_name(format!("balance_{}", Uuid::new_v4().simple()))
    .with_batch_size(5);
    assert_eq!(projection.catch_up().await.unwrap(), 29);

    // K more are published and acknowledged, then lost with the server's unsynced tail
    // while the relay is down.
    append_interleaved(&store, &ledgers, audit, 11..17).await;
    assert_eq!(relay.catch_up().await.unwrap(), 48);
    drop(relay);
    assert_eq!(cut_tail(&jetstream, &test.config, CUT).await, CUT);
    assert_eq!(
        stream_messages(&jetstream, &test.config).await.len(),
        48 - CUT
    );

    // Started again, the relay finds the stream behind its checkpoint, moves the checkpoint
    // back and publishes exactly the lost events, in position order.
    let restarted = small_batch_relay(&store, &checkpoints, &jetstream, &test.config);
    assert_eq!(restarted.catch_up().await.unwrap(), 48);
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_stream_is_store(&jetstream, &test.config, &stored).await;
    // The server still remembered the deleted messages' ids (a crash forgets them): the
    // lost events are stored under renamed ids.
    let messages = stream_messages(&jetstream, &test.config).await;
    let renamed = messages
        .iter()
        .filter(|m| header(m, "Nats-Msg-Id").contains(':'))
        .count();
    assert_eq!(renamed, CUT);

    // The consumer that had applied the first N - K applies the rest, each once.
    assert_eq!(projection.catch_up().await.unwrap(), 47);
    assert_eq!(load_views(&views, &ledgers).await, replay(&store).await);

    // A cut of everything, then more events: the running relay republishes the whole store
    // after the new ones' first publish finds the stream not ending with its last event.
    let handle = small_batch_relay(&store, &checkpoints, &jetstream, &test.config).start();
    handle.wait_for(48, Duration::from_secs(10)).await.unwrap();
    handle.shutdown().await.unwrap();
    assert_eq!(cut_tail(&jetstream, &test.config, usize::MAX).await, 48);
    append_interleaved(&store, &ledgers, audit, 17..21).await;
    let handle = small_batch_relay(&store, &checkpoints, &jetstream, &test.config).start();
    handle.wait_for(60, Duration::from_secs(10)).await.unwrap();
    handle.shutdown().await.unwrap();
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_eq!(stored.len(), 60);
    assert_stream_is_store(&jetstream, &test.config, &stored).await;
    assert_eq!(projection.catch_up().await.unwrap(), 59);
    assert_eq!(load_views(&views, &ledgers).await, replay(&store).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_republishes_from_the_first_event_into_a_recreated_stream() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let checkpoints = MemoryCheckpointRepository::new();
    let (a, audit) = (Uuid::new_v4(), Uuid::new_v4());
    append_interleaved(&store, &[a], audit, 1..21).await;
    let relay = small_batch_relay(&store, &checkpoints, &jetstream, &test.config);
    relay.ensure_stream().await.unwrap();
    assert_eq!(relay.catch_up().await.unwrap(), 40);
    drop(relay);

    // While the relay is down, the stream is deleted and created again, empty.
    jetstream
        .delete_stream(test.config.stream_name())
        .await
        .unwrap();
    test.config.ensure_stream(&jetstream).await.unwrap();
    assert!(stream_messages(&jetstream, &test.config).await.is_empty());

    let handle = small_batch_relay(&store, &checkpoints, &jetstream, &test.config).start();
    handle.wait_for(40, Duration::from_secs(10)).await.unwrap();
    assert_eq!(handle.last_error(), None);
    handle.shutdown().await.unwrap();
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_stream_is_store(&jetstream, &test.config, &stored).await;
    // A new stream remembers no id: every message carries its event id.
    for (message, event) in stream_messages(&jetstream, &test.config)
        .await
        .iter()
        .zip(&stored)
    {
        assert_eq!(header(message, "Nats-Msg-Id"), event.event_id.to_string());
    }
    assert_eq!(
        checkpoints
            .load_checkpoint(&NatsRelay::default_name(&test.config))
            .await
            .unwrap(),
        40
    );

    // Deleted while a relay runs: its next publish fails, and its retry creates the stream
    // again and fills it from the first event.
    let handle = small_batch_relay(&store, &checkpoints, &jetstream, &test.config).start();
    handle.wait_for(40, Duration::from_secs(10)).await.unwrap();
    jetstream
        .delete_stream(test.config.stream_name())
        .await
        .unwrap();
    append_interleaved(&store, &[a], audit, 21..22).await;
    handle.wait_for(42, Duration::from_secs(20)).await.unwrap();
    handle.shutdown().await.unwrap();
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_eq!(stored.len(), 42);
    assert_stream_is_store(&jetstream, &test.config, &stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_whose_checkpoint_is_ahead_of_its_stream_reports_stream_behind() {
    let Some(url) = nats_url() else { return };
    let jetstream = connect(&url).await;
    let test = TestStream::new(&url);
    let store = MemoryEventRepository::new();
    let checkpoints = MemoryCheckpointRepository::new();
    let id = Uuid::new_v4();
    store.append(ledger_events(id, 1, 12)).await.unwrap();
    let relay = small_batch_relay(&store, &checkpoints, &jetstream, &test.config);
    relay.ensure_stream().await.unwrap();
    relay.catch_up().await.unwrap();
    let views = MemoryViewRepository::<Balance>::new();
    let durable = format!("balance_{}", Uuid::new_v4().simple());
    let projection = || {
        NatsProjection::<Ledger, Balance>::new(
            jetstream.clone(),
            test.config.clone(),
            views.clone(),
        )
        .with_durable_name(durable.clone())
        .with_fetch_wait(Duration::from_millis(50))
    };
    assert_eq!(projection().catch_up().await.unwrap(), 12);
    drop(relay);

    // The stream lost its last 5 messages: a projection (re)opening its consumer says so at
    // once, and keeps saying so, instead of waiting for events that are not coming.
    cut_tail(&jetstream, &test.config, 5).await;
    let behind = CQRSError::StreamBehind {
        stream: test.config.stream_name().to_owned(),
        projection: projection().name().to_owned(),
        holds: 7,
        checkpoint: 12,
    };
    for _ in 0..2 {
        let error = tokio::time::timeout(Duration::from_secs(5), projection().catch_up())
            .await
            .expect("a typed error, not a hang")
            .unwrap_err();
        assert_eq!(error, behind);
        let error = tokio::time::timeout(
            Duration::from_secs(5),
            projection().wait_for(13, Duration::from_secs(60)),
        )
        .await
        .expect("a typed error, not a hang")
        .unwrap_err();
        assert_eq!(error, behind);
    }

    // Recreated empty: it holds nothing. The running projection shows the error while it
    // retries, and goes on once a relay has published the events again.
    jetstream
        .delete_stream(test.config.stream_name())
        .await
        .unwrap();
    test.config.ensure_stream(&jetstream).await.unwrap();
    let handle = projection().start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let shown = loop {
        if let Some(error) = handle.last_error() {
            break error;
        }
        assert!(
            Instant::now() < deadline,
            "the projection never reported the stream behind it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let behind = CQRSError::StreamBehind {
        stream: test.config.stream_name().to_owned(),
        projection: handle.name().to_owned(),
        holds: 0,
        checkpoint: 12,
    };
    assert_eq!(shown, behind.to_string());
    assert!(!handle.is_finished());

    store.append(ledger_events(id, 13, 3)).await.unwrap();
    let relay = small_batch_relay(&store, &checkpoints, &jetstream, &test.config);
    assert_eq!(relay.catch_up().await.unwrap(), 15);
    handle.wait_for(15, Duration::from_secs(15)).await.unwrap();
    handle.shutdown().await.unwrap();
    assert_eq!(load_views(&views, &[id]).await, replay(&store).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_again_what_a_restarted_server_lost() {
    if nats_url().is_none() {
        return;
    }
    // A server of the test's own, to kill and start again.
    let mut server = match JetStreamServer::start(&JetStreamServer::binary(), false) {
        Ok(server) => server,
        Err(error) => {
            eprintln!(
                "skipping relay_publishes_again_what_a_restarted_server_lost: {error}; set \
                 CQRS_NATS_SERVER to a nats-server binary to run it"
            );
            return;
        }
    };
    let jetstream = connect(&server.url()).await;
    let config = NatsStreamConfig::new("RESTARTED", "restarted");
    let store = MemoryEventRepository::new();
    let id = Uuid::new_v4();
    store.append(ledger_events(id, 1, 20)).await.unwrap();
    let relay = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream.clone(),
        config.clone(),
    )
    .with_poll_interval(Duration::from_millis(20));
    relay.ensure_stream().await.unwrap();
    let handle = relay.start();
    handle.wait_for(20, Duration::from_secs(10)).await.unwrap();
    let views = MemoryViewRepository::<Balance>::new();
    let projection =
        NatsProjection::<Ledger, Balance>::new(jetstream.clone(), config.clone(), views.clone());
    assert_eq!(projection.catch_up().await.unwrap(), 20);

    // The server loses its newest 5 messages and restarts while the relay runs, idle: on
    // its store they are gone, and it no longer remembers their ids.
    assert_eq!(cut_tail(&jetstream, &config, 5).await, 5);
    server.restart().unwrap();

    // The relay's next publish finds that the stream does not end with its last event; it
    // reads the stream's end, moves its checkpoint back and publishes the lost events again,
    // under their own ids, before the new ones.
    store.append(ledger_events(id, 21, 3)).await.unwrap();
    handle.wait_for(23, Duration::from_secs(30)).await.unwrap();
    handle.shutdown().await.unwrap();
    let stored = store.read_all(0, usize::MAX).await.unwrap();
    assert_stream_is_store(&jetstream, &config, &stored).await;
    for (message, event) in stream_messages(&jetstream, &config)
        .await
        .iter()
        .zip(&stored)
    {
        assert_eq!(header(message, "Nats-Msg-Id"), event.event_id.to_string());
    }
    // The consumer applied the first 20 before the crash: it applies the 3 new ones once.
    // The restarted server may have lost the durable consumer's delivery count as well: the
    // first pull then reports a hole and repositions the consumer (a transient error).
    let reached = match projection.catch_up().await {
        Err(CQRSError::PersistenceError(_)) => projection.catch_up().await,
        other => other,
    };
    assert_eq!(reached.unwrap(), 23);
    assert_eq!(load_views(&views, &[id]).await, replay(&store).await);
}
