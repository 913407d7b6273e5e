//! NATS JetStream (feature `nats`): an outbox relay that publishes committed events, and a
//! projection fed from JetStream.
//!
//! * [`NatsRelay`] reads the store in global order from its own checkpoint (a
//!   [`CheckpointRepository`]) and publishes each event to a JetStream stream, on the subject
//!   `<prefix>.<aggregate_type>.<event_type>`, with `Nats-Msg-Id` set to the event id. It waits
//!   for the server's acknowledgement of every message of a batch before it saves the
//!   checkpoint, so a crash republishes at most the unacknowledged tail, which the server
//!   deduplicates. Every message but the first of a run also carries
//!   `Nats-Expected-Last-Msg-Id` (the previous event's id), so the stream holds the events in
//!   global order even when a publish fails half-way through a batch.
//! * [`NatsProjection`] feeds a [`View`] from that stream through a durable pull consumer. Each
//!   batch of messages becomes one [`ViewRepository::commit`] of the view changes and the
//!   checkpoint (the last event's global position), and the messages are acknowledged only
//!   after that commit. A message whose position is not above the checkpoint was already
//!   applied: it is acknowledged and not applied again.
//!
//! Delivery is at least once; the effect on the view is exactly once (see
//! `docs/adr/0006-nats.md`).
//!
//! # Wire format
//!
//! The body of every message is the [`PersistableDomainEvent`] as JSON (its serde form: the
//! fields `event_id`, `aggregate_type_id`, `aggregate_id`, `aggregate_type`, `sequence`,
//! `position`, `event_type`, `event_version`, `payload`, `metadata`, `timestamp`), so a
//! consumer in any language reads the whole event, and [`NatsProjection`] decodes it exactly as
//! a store would. The headers repeat what a router needs without parsing the body:
//!
//! | header | value |
//! |--------|-------|
//! | `Nats-Msg-Id` | the event id (deduplication) |
//! | [`HEADER_AGGREGATE_TYPE`] | the aggregate type |
//! | [`HEADER_AGGREGATE_ID`] | the aggregate id |
//! | [`HEADER_SEQUENCE`] | the event's sequence within its aggregate |
//! | [`HEADER_POSITION`] | the event's global position |
//! | [`HEADER_EVENT_TYPE`] | the stored event name |
//! | [`HEADER_EVENT_VERSION`] | the stored event version |
//!
//! A damaged row of the store travels as it is, so a consumer meets the same poison event
//! as a reader of the store: an event whose stored payload is not JSON has, in place of
//! `payload`, `payload_text` holding the stored text as a JSON string ([`decode_message`]
//! gives the event back with that payload, which then fails to decode); a row the store
//! cannot read as an event at all ([`CQRSError::DamagedRow`]) is a message of its own whose
//! body is `{"damaged_row": {..}}` and whose headers name what could be read of it (always
//! its position; the message id is `cqrs-damaged-row-<position>` when the event id is
//! unreadable).
//!
//! # Example
//!
//! ```no_run
//! # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
//! # enum CounterEvent { Incremented { by: u32 } }
//! # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct CounterError(#[from] CQRSError);
//! # #[derive(Default)] struct Counter;
//! # impl Aggregate for Counter {
//! #     const NAME: &'static str = "counter";
//! #     type Events = CounterEvent; type Commands = (); type Errors = CounterError; type State = ();
//! #     async fn handle_command(&self, _: uuid::Uuid, _: &(), _: ()) -> Result<Vec<CounterEvent>, CounterError> { Ok(vec![]) }
//! #     fn handle_event(&self, _: &mut (), _: &CounterEvent) {}
//! # }
//! # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! # struct CounterTotal { total: u64 }
//! # impl View<Counter> for CounterTotal {
//! #     const TABLE_NAME: &'static str = "counter_total";
//! #     const VERSION: u64 = 1;
//! #     fn handle_event(&mut self, e: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
//! #         let CounterEvent::Incremented { by } = e.event; self.total += u64::from(by); Ok(()) }
//! # }
//! use cqrs::nats::{NatsProjection, NatsRelay, NatsStreamConfig};
//! use cqrs::{MemoryCheckpointRepository, MemoryEventRepository, MemoryViewRepository};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = cqrs::nats::async_nats::connect("nats://127.0.0.1:4222").await?;
//! let jetstream = cqrs::nats::async_nats::jetstream::new(client);
//! let stream = NatsStreamConfig::new("EVENTS", "events");
//!
//! // Publisher side: the relay runs beside the application.
//! let store = MemoryEventRepository::new();
//! let relay = NatsRelay::new(store.clone(), MemoryCheckpointRepository::new(), jetstream.clone(), stream.clone());
//! let relay = relay.start();
//!
//! // Consumer side, possibly in another service.
//! let views = MemoryViewRepository::<CounterTotal>::new();
//! let projection = NatsProjection::<Counter, CounterTotal>::new(jetstream, stream, views);
//! projection.catch_up().await?;
//!
//! relay.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{Publish, PublishErrorKind};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::error::{CQRSError, DamagedRow, ViewHandlerError};
use crate::event::PersistableDomainEvent;
use crate::projection::{HandlerRetry, PoisonPolicy, Projection};
use crate::store::memory::MemoryDeadLetters;
use crate::store::{
    Checkpoint, CheckpointRepository, DeadLetter, DeadLetters, EventRepository, ViewContext,
    ViewRepository,
};
use crate::view::View;

/// The async-nats crate this module is built on, to connect and to build a
/// [`jetstream::Context`] without a version mismatch.
#[doc(no_inline)]
pub use async_nats;

/// Header naming the event's aggregate type.
pub const HEADER_AGGREGATE_TYPE: &str = "Cqrs-Aggregate-Type";
/// Header naming the event's aggregate id.
pub const HEADER_AGGREGATE_ID: &str = "Cqrs-Aggregate-Id";
/// Header carrying the event's sequence within its aggregate.
pub const HEADER_SEQUENCE: &str = "Cqrs-Sequence";
/// Header carrying the event's global position in the store.
pub const HEADER_POSITION: &str = "Cqrs-Position";
/// Header carrying the stored event name.
pub const HEADER_EVENT_TYPE: &str = "Cqrs-Event-Type";
/// Header carrying the stored event version.
pub const HEADER_EVENT_VERSION: &str = "Cqrs-Event-Version";

fn broker(error: impl Into<crate::error::BoxError>) -> CQRSError {
    CQRSError::persistence(error)
}

/// A subject token: NATS forbids whitespace, `*` and `>` in tokens (and `.` separates them).
/// Names written by the derives never contain those; a hand-written name that does is
/// published with `_` in their place.
fn subject_token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    name.chars()
        .map(|c| {
            if c.is_whitespace() || c == '*' || c == '>' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The JetStream stream the relay publishes to and projections read from: its name, the
/// prefix of its subjects and its deduplication window.
///
/// Subjects are `<prefix>.<aggregate_type>.<event_type>`; the stream captures `<prefix>.>`.
///
/// ```
/// use std::time::Duration;
/// use cqrs::nats::NatsStreamConfig;
/// let config = NatsStreamConfig::new("BANK_EVENTS", "bank").with_duplicate_window(Duration::from_secs(600));
/// assert_eq!(config.subjects(), "bank.>");
/// assert_eq!(config.aggregate_subjects("account"), "bank.account.>");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsStreamConfig {
    stream_name: String,
    subject_prefix: String,
    duplicate_window: Duration,
}

impl NatsStreamConfig {
    /// A stream named `stream_name` (no spaces, `.`, `*` or `>`) over the subjects under
    /// `subject_prefix`, with a 10-minute deduplication window.
    pub fn new(stream_name: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        NatsStreamConfig {
            stream_name: stream_name.into(),
            subject_prefix: subject_prefix.into(),
            duplicate_window: Duration::from_secs(600),
        }
    }

    /// How long the server remembers a `Nats-Msg-Id` to drop a republished event. A relay that
    /// crashed republishes its unacknowledged tail when it restarts: keep the window longer
    /// than the longest time a relay may stay down after a crash.
    #[must_use]
    pub fn with_duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// The subjects' prefix.
    pub fn subject_prefix(&self) -> &str {
        &self.subject_prefix
    }

    /// The deduplication window.
    pub fn duplicate_window(&self) -> Duration {
        self.duplicate_window
    }

    /// `<prefix>.>`: every subject of the stream.
    pub fn subjects(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }

    /// `<prefix>.<aggregate_type>.>`: the events of one aggregate type.
    pub fn aggregate_subjects(&self, aggregate_type: &str) -> String {
        format!(
            "{}.{}.>",
            self.subject_prefix,
            subject_token(aggregate_type)
        )
    }

    /// `<prefix>.<aggregate_type>.<event_type>`: where `event` is published.
    ///
    /// ```
    /// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, cqrs::DomainEvent)]
    /// enum AccountEvent {
    ///     Deposited { amount: u64 },
    /// }
    ///
    /// let event = AccountEvent::Deposited { amount: 5 };
    /// let stored = cqrs::PersistableDomainEvent::new(
    ///     "account",
    ///     uuid::Uuid::new_v4(),
    ///     1,
    ///     &event,
    ///     serde_json::Value::Null,
    /// )?;
    /// let config = cqrs::nats::NatsStreamConfig::new("EVENTS", "events");
    /// assert_eq!(config.subject_for(&stored), "events.account.Deposited");
    /// # Ok::<(), cqrs::CQRSError>(())
    /// ```
    pub fn subject_for(&self, event: &PersistableDomainEvent) -> String {
        format!(
            "{}.{}.{}",
            self.subject_prefix,
            subject_token(&event.aggregate_type),
            subject_token(&event.event_type)
        )
    }

    /// Creates the stream if it does not exist; if it does, makes its subjects and
    /// deduplication window the configured ones and keeps every other setting (retention,
    /// replicas, limits) as the operator set it. Safe to call from several processes at once.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the server refuses or cannot be reached.
    pub async fn ensure_stream(&self, jetstream: &jetstream::Context) -> Result<(), CQRSError> {
        let wanted = stream::Config {
            name: self.stream_name.clone(),
            subjects: vec![self.subjects()],
            duplicate_window: self.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        // Two processes may race to create it: the loser sees "already in use" and retries.
        let mut attempt = 0;
        let mut stream = loop {
            match jetstream.get_or_create_stream(wanted.clone()).await {
                Ok(stream) => break stream,
                Err(_) if attempt == 0 => attempt += 1,
                Err(error) => return Err(broker(error)),
            }
        };
        let info = stream.info().await.map_err(broker)?;
        if info.config.subjects != wanted.subjects
            || info.config.duplicate_window != wanted.duplicate_window
        {
            let mut config = info.config.clone();
            config.subjects = wanted.subjects;
            config.duplicate_window = wanted.duplicate_window;
            jetstream.update_stream(&config).await.map_err(broker)?;
        }
        Ok(())
    }
}

/// The body of an event whose stored payload is not JSON (a damaged row, see
/// [`Payload`](crate::Payload)): the event's fields with the payload as a JSON string of the
/// stored text, `payload_text`, in place of `payload`. [`decode_message`] turns it back into
/// the event as stored, which then fails to decode like the store's own row.
#[derive(Serialize, Deserialize)]
struct DamagedPayloadBody {
    event_id: Uuid,
    aggregate_type_id: SmolStr,
    aggregate_id: Uuid,
    aggregate_type: SmolStr,
    sequence: i64,
    position: i64,
    event_type: SmolStr,
    event_version: SmolStr,
    payload_text: String,
    metadata: serde_json::Value,
    timestamp: DateTime<Utc>,
}

/// The body of a message that stands for a row the store could not read as an event
/// ([`CQRSError::DamagedRow`]): `{"damaged_row": {..}}`.
#[derive(Serialize, Deserialize)]
struct DamagedRowBody {
    damaged_row: DamagedRow,
}

/// The JSON body and the headers of the message that carries `event`.
///
/// # Errors
/// [`CQRSError::Serialization`] when the event does not serialize.
fn encode(event: &PersistableDomainEvent) -> Result<(Vec<u8>, HeaderMap), CQRSError> {
    let serialization = |source| CQRSError::Serialization {
        what: format!(
            "event {} of {} {} for NATS",
            event.event_type, event.aggregate_type, event.aggregate_id
        ),
        source,
    };
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        // A payload stored as text that is not JSON: published as stored, so the consumer
        // meets the same poison event as a reader of the store.
        Err(_) if !event.payload.is_valid_json() => serde_json::to_vec(&DamagedPayloadBody {
            event_id: event.event_id,
            aggregate_type_id: event.aggregate_type_id.clone(),
            aggregate_id: event.aggregate_id,
            aggregate_type: event.aggregate_type.clone(),
            sequence: event.sequence,
            position: event.position,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            payload_text: event.payload.as_str().to_owned(),
            metadata: event.metadata.clone(),
            timestamp: event.timestamp,
        })
        .map_err(serialization)?,
        Err(source) => return Err(serialization(source)),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        event.event_id.to_string(),
    );
    headers.insert(HEADER_AGGREGATE_TYPE, event.aggregate_type.as_str());
    headers.insert(HEADER_AGGREGATE_ID, event.aggregate_id.to_string());
    headers.insert(HEADER_SEQUENCE, event.sequence.to_string());
    headers.insert(HEADER_POSITION, event.position.to_string());
    headers.insert(HEADER_EVENT_TYPE, event.event_type.as_str());
    headers.insert(HEADER_EVENT_VERSION, event.event_version.as_str());
    Ok((body, headers))
}

/// The message that stands for a row the store could not read as an event: its subject,
/// body and headers. The headers name what could be read of the row, always its position;
/// the message id is the event id when it could be read.
///
/// # Errors
/// [`CQRSError::Serialization`] (not expected: the body is plain strings and numbers).
fn encode_damaged_row(
    stream: &NatsStreamConfig,
    damage: &DamagedRow,
) -> Result<(String, Vec<u8>, HeaderMap), CQRSError> {
    let body = serde_json::to_vec(&DamagedRowBody {
        damaged_row: damage.clone(),
    })
    .map_err(|source| CQRSError::Serialization {
        what: format!("damaged row at position {} for NATS", damage.position),
        source,
    })?;
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        damaged_row_message_id(damage),
    );
    if let Some(aggregate_type) = &damage.aggregate_type {
        headers.insert(HEADER_AGGREGATE_TYPE, aggregate_type.as_str());
    }
    if let Some(aggregate_id) = damage.aggregate_id {
        headers.insert(HEADER_AGGREGATE_ID, aggregate_id.to_string());
    }
    if let Some(sequence) = damage.sequence {
        headers.insert(HEADER_SEQUENCE, sequence.to_string());
    }
    headers.insert(HEADER_POSITION, damage.position.to_string());
    if let Some(event_type) = &damage.event_type {
        headers.insert(HEADER_EVENT_TYPE, event_type.as_str());
    }
    if let Some(event_version) = &damage.event_version {
        headers.insert(HEADER_EVENT_VERSION, event_version.as_str());
    }
    let subject = format!(
        "{}.{}.{}",
        stream.subject_prefix,
        subject_token(damage.aggregate_type.as_deref().unwrap_or_default()),
        subject_token(damage.event_type.as_deref().unwrap_or_default())
    );
    Ok((subject, body, headers))
}

/// The `Nats-Msg-Id` of a damaged row's message: its event id when that could be read.
fn damaged_row_message_id(damage: &DamagedRow) -> String {
    match damage.event_id {
        Some(event_id) => event_id.to_string(),
        None => format!("cqrs-damaged-row-{}", damage.position),
    }
}

/// Decodes the body of a message published by [`NatsRelay`].
///
/// An event whose stored payload is not JSON comes back with that text as its payload
/// ([`Payload::from_stored_unchecked`](crate::Payload::from_stored_unchecked)), so decoding
/// it fails as it does from the store.
///
/// # Errors
/// [`CQRSError::DamagedRow`] for the message of a row the store could not read as an event;
/// [`CQRSError::Deserialization`] naming the subject and stream sequence when the body is not
/// a [`PersistableDomainEvent`].
pub fn decode_message(
    subject: &str,
    stream_sequence: u64,
    body: &[u8],
) -> Result<PersistableDomainEvent, CQRSError> {
    let source = match serde_json::from_slice(body) {
        Ok(event) => return Ok(event),
        Err(source) => source,
    };
    // The bodies of damaged rows; rare, so only tried once the common form failed.
    if let Ok(damaged) = serde_json::from_slice::<DamagedPayloadBody>(body) {
        return Ok(PersistableDomainEvent {
            event_id: damaged.event_id,
            aggregate_type_id: damaged.aggregate_type_id,
            aggregate_id: damaged.aggregate_id,
            aggregate_type: damaged.aggregate_type,
            sequence: damaged.sequence,
            position: damaged.position,
            event_type: damaged.event_type,
            event_version: damaged.event_version,
            payload: crate::Payload::from_stored_unchecked(&damaged.payload_text),
            metadata: damaged.metadata,
            timestamp: damaged.timestamp,
        });
    }
    if let Ok(damaged) = serde_json::from_slice::<DamagedRowBody>(body) {
        return Err(CQRSError::from(damaged.damaged_row));
    }
    Err(CQRSError::Deserialization {
        what: format!("NATS message {stream_sequence} on {subject}"),
        source,
    })
}

/// One message of a relay batch, ready to publish.
struct Outgoing {
    position: i64,
    message_id: String,
    subject: String,
    body: Vec<u8>,
    headers: HeaderMap,
}

impl Outgoing {
    fn event(stream: &NatsStreamConfig, event: &PersistableDomainEvent) -> Result<Self, CQRSError> {
        let (body, headers) = encode(event)?;
        Ok(Outgoing {
            position: event.position,
            message_id: event.event_id.to_string(),
            subject: stream.subject_for(event),
            body,
            headers,
        })
    }

    fn damaged_row(stream: &NatsStreamConfig, damage: &DamagedRow) -> Result<Self, CQRSError> {
        let (subject, body, headers) = encode_damaged_row(stream, damage)?;
        Ok(Outgoing {
            position: damage.position,
            message_id: damaged_row_message_id(damage),
            subject,
            body,
            headers,
        })
    }
}

/// Publishes committed events to a JetStream stream, in global order, exactly once in the
/// stream (see the [module docs](self)).
///
/// Each run of [`relay_once`](Self::relay_once) reads up to `batch_size` events after the
/// relay's checkpoint, publishes them all (pipelined), waits for every acknowledgement, then
/// saves the checkpoint at the last one. If anything fails the checkpoint stays where it was
/// and the next run republishes the batch; the server drops the copies by `Nats-Msg-Id`.
///
/// [`start`](Self::start) runs it in the background: catch up, then wait for the store's
/// notification (or poll every `poll_interval` when the store cannot notify, or when another
/// process appends), retrying failures with a backoff.
pub struct NatsRelay {
    events: Arc<dyn EventRepository>,
    checkpoints: Arc<dyn CheckpointRepository>,
    jetstream: jetstream::Context,
    stream: NatsStreamConfig,
    name: String,
    batch_size: usize,
    poll_interval: Duration,
    /// The id of the last event this relay saw acknowledged, when the stream is known to end
    /// with it: the next publish expects it as the stream's last message id. `None` at the
    /// start of a run and after any failure.
    last_published: tokio::sync::Mutex<Option<String>>,
}

/// What one relay batch did.
struct Relayed {
    /// Messages published (a damaged row counts as one).
    published: usize,
    /// The position of the last one, or the checkpoint when none.
    last: i64,
    /// The batch was a damaged row's message: more may follow.
    damaged: bool,
}

impl fmt::Debug for NatsRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsRelay")
            .field("name", &self.name)
            .field("stream", &self.stream)
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl NatsRelay {
    /// The checkpoint name a relay to `stream` uses unless [`with_name`](Self::with_name)
    /// sets another: `nats_relay_<stream name>`.
    ///
    /// ```
    /// let stream = cqrs::NatsStreamConfig::new("EVENTS", "events");
    /// assert_eq!(cqrs::NatsRelay::default_name(&stream), "nats_relay_EVENTS");
    /// ```
    pub fn default_name(stream: &NatsStreamConfig) -> String {
        format!("nats_relay_{}", stream.stream_name)
    }

    /// A relay from `events` to `stream`, with its checkpoint in `checkpoints` under
    /// [`default_name`](Self::default_name), publishing 256 events per batch.
    pub fn new(
        events: impl EventRepository + 'static,
        checkpoints: impl CheckpointRepository + 'static,
        jetstream: jetstream::Context,
        stream: NatsStreamConfig,
    ) -> Self {
        NatsRelay {
            events: Arc::new(events),
            checkpoints: Arc::new(checkpoints),
            jetstream,
            name: Self::default_name(&stream),
            stream,
            batch_size: 256,
            poll_interval: Duration::from_millis(500),
            last_published: tokio::sync::Mutex::new(None),
        }
    }

    /// Uses another checkpoint name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Publishes up to `batch_size` events per batch (default 256, at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long the background relay waits for a notification before it looks at the store
    /// anyway (default 500 ms). Appends by other processes are only seen this way.
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream this relay publishes to.
    pub fn stream(&self) -> &NatsStreamConfig {
        &self.stream
    }

    /// The position of the last event known to be in the stream.
    ///
    /// # Errors
    /// The checkpoint store's error.
    pub async fn position(&self) -> Result<i64, CQRSError> {
        self.checkpoints.load_checkpoint(&self.name).await
    }

    /// Creates or updates the stream (see [`NatsStreamConfig::ensure_stream`]).
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`].
    pub async fn ensure_stream(&self) -> Result<(), CQRSError> {
        self.stream.ensure_stream(&self.jetstream).await
    }

    /// Publishes one batch of events after the checkpoint and saves the checkpoint; returns
    /// how many events were published (0 when there was nothing new).
    ///
    /// # Errors
    /// A store error, [`CQRSError::Serialization`], or [`CQRSError::PersistenceError`] when a
    /// publish is refused or not acknowledged (the checkpoint is then unchanged).
    pub async fn relay_once(&self) -> Result<usize, CQRSError> {
        Ok(self.relay_batch().await?.published)
    }

    /// [`relay_once`](Self::relay_once), saying also where the batch ended and whether the
    /// store may hold more.
    async fn relay_batch(&self) -> Result<Relayed, CQRSError> {
        let mut last_published = self.last_published.lock().await;
        let from = self.checkpoints.load_checkpoint(&self.name).await?;
        let (batch, damaged) = match self.events.read_all(from, self.batch_size).await {
            Ok(events) => (
                events
                    .iter()
                    .map(|event| Outgoing::event(&self.stream, event))
                    .collect::<Result<Vec<_>, _>>()?,
                false,
            ),
            // A row the store cannot read as an event: published as a message of its own,
            // so each consumer meets it as a poison event at its position.
            Err(CQRSError::DamagedRow(damage)) if damage.position > from => {
                tracing::error!(
                    relay = %self.name,
                    position = damage.position,
                    error = %damage,
                    "damaged row in the event store; publishing it as a damaged-row message"
                );
                (vec![Outgoing::damaged_row(&self.stream, &damage)?], true)
            }
            Err(error) => return Err(error),
        };
        let Some(last) = batch.last() else {
            return Ok(Relayed {
                published: 0,
                last: from,
                damaged,
            });
        };
        let span = tracing::debug_span!(
            "nats_relay_batch",
            relay = %self.name,
            stream = %self.stream.stream_name,
            from = from + 1,
            to = last.position,
            events = batch.len(),
        );
        let result = async {
            match self.publish_batch(&batch, last_published.as_deref()).await {
                // The stream does not end with the event this relay published last: another
                // publisher wrote to it, or an earlier publish of this batch failed. Publishing
                // the batch again from the checkpoint, with no expectation on its first event,
                // is safe: everything up to the checkpoint is in the stream, and copies of
                // what is already there are dropped by their `Nats-Msg-Id`.
                Err(BatchFailure::Chain(error)) => {
                    tracing::debug!(%error, "stream's last message is not the relay's; republishing the batch");
                    self.publish_batch(&batch, None).await
                }
                other => other,
            }
        }
        .instrument(span)
        .await
        .map_err(BatchFailure::into_error);
        match result {
            Ok(()) => {
                *last_published = Some(last.message_id.clone());
                Ok(Relayed {
                    published: batch.len(),
                    last: last.position,
                    damaged,
                })
            }
            Err(error) => {
                *last_published = None;
                Err(error)
            }
        }
    }

    async fn publish_batch(
        &self,
        batch: &[Outgoing],
        previous: Option<&str>,
    ) -> Result<(), BatchFailure> {
        let mut acks = Vec::with_capacity(batch.len());
        let mut previous = previous;
        for message in batch {
            let mut publish = Publish::build()
                .payload(message.body.clone().into())
                .headers(message.headers.clone());
            if let Some(previous) = previous {
                publish = publish.expected_last_message_id(previous);
            }
            let ack = self
                .jetstream
                .send_publish(message.subject.clone(), publish)
                .await
                .map_err(|error| BatchFailure::Other(broker(error)))?;
            acks.push((message.position, ack));
            previous = Some(&message.message_id);
        }
        let mut duplicates = 0_usize;
        for (position, ack) in acks {
            let ack = ack.await.map_err(|error| {
                if error.kind() == PublishErrorKind::WrongLastMessageId {
                    return BatchFailure::Chain(broker(error));
                }
                tracing::warn!(position, %error, "JetStream refused or did not acknowledge an event");
                BatchFailure::Other(broker(error))
            })?;
            if ack.duplicate {
                duplicates += 1;
            }
        }
        let Some(last) = batch.last() else {
            return Ok(());
        };
        self.checkpoints
            .save_checkpoint(Checkpoint {
                name: self.name.clone(),
                position: last.position,
            })
            .await
            .map_err(BatchFailure::Other)?;
        tracing::debug!(duplicates, "relay batch acknowledged");
        Ok(())
    }

    /// Publishes every event committed so far; returns the new checkpoint position.
    ///
    /// # Errors
    /// What [`relay_once`](Self::relay_once) returns; batches before the failing one stay
    /// published and checkpointed.
    pub async fn catch_up(&self) -> Result<i64, CQRSError> {
        // The highest position the store knows is committed, taken before each read: a short
        // batch below it ended early (before a damaged row, see `EventRepository::read_all`),
        // so read on.
        let head = self.events.subscribe();
        loop {
            let known = head.as_ref().map(|head| *head.borrow());
            let relayed = self.relay_batch().await?;
            let more = relayed.published > 0
                && (relayed.damaged
                    || relayed.published >= self.batch_size
                    || known.is_none_or(|known| known > relayed.last));
            if !more {
                return self.position().await;
            }
        }
    }

    /// Runs the relay in a background task: ensures the stream, catches up, then publishes
    /// new events as the store reports them. Failures are logged and retried with a backoff
    /// (100 ms doubling up to 5 s) from the checkpoint.
    pub fn start(self) -> NatsRelayHandle {
        let (stop, mut stopped) = watch::channel(false);
        let relay = self;
        let task = tokio::spawn(async move {
            let mut changes = relay.events.subscribe();
            let mut backoff = Duration::from_millis(100);
            let mut stream_ready = false;
            loop {
                if *stopped.borrow() {
                    return Ok(());
                }
                let result = async {
                    if !stream_ready {
                        relay.ensure_stream().await?;
                        stream_ready = true;
                    }
                    relay.catch_up().await
                }
                .await;
                let wait = match result {
                    Ok(_) => {
                        backoff = Duration::from_millis(100);
                        relay.poll_interval
                    }
                    Err(error) => {
                        tracing::warn!(relay = %relay.name, %error, retry_in = ?backoff, "NATS relay failed; retrying");
                        let wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        wait
                    }
                };
                tokio::select! {
                    _ = stopped.changed() => return Ok(()),
                    _ = wait_for_change(&mut changes, wait) => {}
                }
            }
        });
        NatsRelayHandle { stop, task }
    }
}

/// Why a relay batch failed.
enum BatchFailure {
    /// The server refused an event because the stream's last message was not the one
    /// expected before it.
    Chain(CQRSError),
    /// Anything else.
    Other(CQRSError),
}

impl BatchFailure {
    fn into_error(self) -> CQRSError {
        match self {
            BatchFailure::Chain(error) | BatchFailure::Other(error) => error,
        }
    }
}

/// Waits until the store reports a change or `wait` has passed.
async fn wait_for_change(changes: &mut Option<watch::Receiver<i64>>, wait: Duration) {
    match changes.as_mut() {
        Some(rx) => {
            if let Ok(Err(_)) = tokio::time::timeout(wait, rx.changed()).await {
                // The store is gone; poll from now on.
                *changes = None;
            }
        }
        None => tokio::time::sleep(wait).await,
    }
}

/// The handle of a relay started with [`NatsRelay::start`].
#[derive(Debug)]
pub struct NatsRelayHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), CQRSError>>,
}

impl NatsRelayHandle {
    /// Stops the relay after its current batch and waits for it.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] if the task panicked.
    pub async fn stop(self) -> Result<(), CQRSError> {
        let _ = self.stop.send(true);
        self.task.await.map_err(broker)?
    }

    /// True once the task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// A message whose body is not a [`PersistableDomainEvent`], terminated and passed over by a
/// [`NatsProjection`] under [`PoisonPolicy::SkipAndRecord`] (an event that decodes but cannot
/// be applied becomes a [`DeadLetter`] instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndecodableMessage {
    /// The message's subject.
    pub subject: String,
    /// The message's sequence in the stream.
    pub stream_sequence: u64,
    /// The decoding error, rendered.
    pub error: String,
}

/// Keeps one view up to date from a JetStream stream written by [`NatsRelay`].
///
/// It reads the events of aggregate type `A` (subjects `<prefix>.<A::NAME>.>`) through a
/// durable pull consumer, applies each to the view instance it concerns, and commits each
/// batch's view changes together with the checkpoint (the global position of the batch's
/// last event) in one [`ViewRepository::commit`]. Messages are acknowledged only after that
/// commit; one whose position is not above the checkpoint is acknowledged without being
/// applied. With a view store that commits atomically, every event affects the view exactly
/// once, however often messages are redelivered or the process dies.
///
/// The checkpoint is the truth, not the consumer's acknowledgement floor: when the projection
/// starts (and after any failure) it recreates its durable consumer at the first stream
/// message after the checkpoint. Run one projection per view and checkpoint name at a time.
/// The checkpoint name defaults to [`Projection::default_name`], the one the store-fed
/// [`Projection`] uses, so a view can move between the two without a rebuild.
///
/// The stream must keep every message a view has not consumed yet (do not let retention
/// remove them); rebuild a view from the store with [`Projection`] otherwise.
pub struct NatsProjection<A: Aggregate, V: View<A>> {
    jetstream: jetstream::Context,
    stream: NatsStreamConfig,
    views: Arc<dyn ViewRepository<A, V>>,
    name: String,
    durable_name: String,
    batch_size: usize,
    ack_wait: Duration,
    fetch_wait: Duration,
    policy: PoisonPolicy,
    retry: HandlerRetry,
    dead_letters: Arc<dyn DeadLetters>,
    consumer: tokio::sync::Mutex<Option<ConsumerState>>,
    undecodable: Arc<Mutex<Vec<UndecodableMessage>>>,
    _marker: PhantomData<fn() -> (A, V)>,
}

impl<A: Aggregate, V: View<A>> fmt::Debug for NatsProjection<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsProjection")
            .field("name", &self.name)
            .field("durable_name", &self.durable_name)
            .field("stream", &self.stream)
            .field("batch_size", &self.batch_size)
            .field("policy", &self.policy)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// The consumer a projection pulls from, and the delivery sequence it expects next.
struct ConsumerState {
    consumer: PullConsumer,
    next_delivery: u64,
}

/// Collects the messages of one pull request until the server ends it.
async fn drain<S>(mut batch: S, into: &mut Vec<jetstream::Message>) -> Result<(), CQRSError>
where
    S: futures_util::Stream<Item = Result<jetstream::Message, async_nats::Error>> + Unpin,
{
    while let Some(message) = batch.next().await {
        into.push(message.map_err(broker)?);
    }
    Ok(())
}

/// Why a batch stopped, for the runner: the poison policy said stop, or something transient.
fn is_poison(error: &CQRSError) -> bool {
    matches!(
        error,
        CQRSError::EventDecode(_)
            | CQRSError::Deserialization { .. }
            | CQRSError::ViewHandler(_)
            | CQRSError::DamagedRow(_)
    )
}

impl<A: Aggregate, V: View<A>> NatsProjection<A, V> {
    /// A projection of `V` from `stream` into `views`, checkpointed under
    /// [`Projection::default_name`], with a durable consumer of the same name, reading 256
    /// messages per batch, stopping on a poison message.
    pub fn new(
        jetstream: jetstream::Context,
        stream: NatsStreamConfig,
        views: impl ViewRepository<A, V> + 'static,
    ) -> Self {
        let name = Projection::<A, V>::default_name();
        NatsProjection {
            jetstream,
            stream,
            views: Arc::new(views),
            durable_name: name.clone(),
            name,
            batch_size: 256,
            ack_wait: Duration::from_secs(30),
            fetch_wait: Duration::from_millis(500),
            policy: PoisonPolicy::Stop,
            retry: HandlerRetry::default(),
            dead_letters: Arc::new(MemoryDeadLetters::new()),
            consumer: tokio::sync::Mutex::new(None),
            undecodable: Arc::new(Mutex::new(Vec::new())),
            _marker: PhantomData,
        }
    }

    /// Uses another checkpoint name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Uses another durable consumer name (letters, digits, `-` and `_`).
    #[must_use]
    pub fn with_durable_name(mut self, name: impl Into<String>) -> Self {
        self.durable_name = name.into();
        self
    }

    /// Reads and commits up to `batch_size` messages at a time (default 256, at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// What to do with a message that cannot be applied (default [`PoisonPolicy::Stop`]).
    #[must_use]
    pub fn with_poison_policy(mut self, policy: PoisonPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How often a view handler that fails is tried again before the [`PoisonPolicy`]
    /// applies (default [`HandlerRetry::default`]: 3 tries, 100 ms then 200 ms), as for
    /// [`Projection::with_handler_retry`]. Keep the total wait well under the ack wait.
    #[must_use]
    pub fn with_handler_retry(mut self, retry: HandlerRetry) -> Self {
        self.retry = HandlerRetry {
            attempts: retry.attempts.max(1),
            ..retry
        };
        self
    }

    /// How long the server waits for an acknowledgement before redelivering (default 30 s).
    #[must_use]
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// How long the background projection waits for new messages in one pull (default
    /// 500 ms); a message that arrives meanwhile is delivered at once.
    #[must_use]
    pub fn with_fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The global position of the last event applied.
    ///
    /// # Errors
    /// The view store's error.
    pub async fn position(&self) -> Result<i64, CQRSError> {
        self.views.checkpoint(&self.name).await
    }

    /// Where events skipped under [`PoisonPolicy::SkipAndRecord`] are recorded (default: a
    /// [`MemoryDeadLetters`]).
    #[must_use]
    pub fn with_dead_letters(mut self, sink: impl DeadLetters + 'static) -> Self {
        self.dead_letters = Arc::new(sink);
        self
    }

    /// The events this projection skipped under [`PoisonPolicy::SkipAndRecord`], from its
    /// dead-letter sink.
    ///
    /// # Errors
    /// The sink's error.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, CQRSError> {
        self.dead_letters.list(&self.name).await
    }

    /// The messages that were not events at all and were passed over under
    /// [`PoisonPolicy::SkipAndRecord`] by this instance, oldest first.
    pub fn undecodable(&self) -> Vec<UndecodableMessage> {
        self.undecodable_list().clone()
    }

    fn undecodable_list(&self) -> MutexGuard<'_, Vec<UndecodableMessage>> {
        self.undecodable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The global position in a stored message's `Cqrs-Position` header.
    async fn position_at(&self, stream: &stream::Stream, sequence: u64) -> Option<i64> {
        let message = stream.get_raw_message(sequence).await.ok()?;
        message
            .headers
            .get(HEADER_POSITION)
            .and_then(|value| value.as_str().parse().ok())
    }

    /// The first stream sequence whose event is after `checkpoint`, or an earlier one (which
    /// is always safe: earlier events are acknowledged without being applied).
    async fn start_sequence(
        &self,
        stream: &mut stream::Stream,
        checkpoint: i64,
    ) -> Result<u64, CQRSError> {
        let state = stream.info().await.map_err(broker)?.state.clone();
        let first = state.first_sequence.max(1);
        if checkpoint <= 0 || state.messages == 0 {
            return Ok(first);
        }
        // The relay publishes in global order, so positions grow with stream sequences.
        let (mut low, mut high) = (first, state.last_sequence.saturating_add(1));
        while low < high {
            let middle = low + (high - low) / 2;
            match self.position_at(stream, middle).await {
                Some(position) if position > checkpoint => high = middle,
                Some(_) => low = middle + 1,
                // A deleted message or one without the header: start from the beginning.
                None => return Ok(first),
            }
        }
        Ok(low)
    }

    /// (Re)creates the durable consumer at the first message after the checkpoint.
    async fn open_consumer(&self) -> Result<PullConsumer, CQRSError> {
        let mut stream = self
            .jetstream
            .get_stream(&self.stream.stream_name)
            .await
            .map_err(broker)?;
        let checkpoint = self.views.checkpoint(&self.name).await?;
        let start_sequence = self.start_sequence(&mut stream, checkpoint).await?;
        // Absent the first time: nothing to delete.
        let _ = stream.delete_consumer(&self.durable_name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(self.durable_name.clone()),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.ack_wait,
                filter_subject: self.stream.aggregate_subjects(A::NAME),
                ..Default::default()
            })
            .await
            .map_err(broker)?;
        tracing::debug!(
            projection = %self.name,
            consumer = %self.durable_name,
            checkpoint,
            start_sequence,
            "NATS consumer positioned after the checkpoint"
        );
        Ok(consumer)
    }

    /// Pulls one batch and applies it; returns how many messages it handled. With `wait`,
    /// first waits up to that long for one message (a long poll that ends as soon as one
    /// arrives), then takes what else is there without waiting. Every pull request is
    /// drained before the next one, so no delivery is left in flight.
    async fn pull_once(&self, wait: Option<Duration>) -> Result<usize, CQRSError> {
        let mut slot = self.consumer.lock().await;
        if slot.is_none() {
            *slot = Some(ConsumerState {
                consumer: self.open_consumer().await?,
                next_delivery: 1,
            });
        }
        let Some(state) = slot.as_mut() else {
            return Ok(0);
        };
        let result = self.pull_and_apply(state, wait).await;
        if result.is_err() {
            // Reposition from the checkpoint next time: nothing after it is lost, and a
            // message that stopped the projection comes back first.
            *slot = None;
        }
        result
    }

    async fn pull_and_apply(
        &self,
        state: &mut ConsumerState,
        wait: Option<Duration>,
    ) -> Result<usize, CQRSError> {
        let mut messages = Vec::new();
        if let Some(wait) = wait {
            let batch = state
                .consumer
                .batch()
                .max_messages(1)
                .expires(wait)
                .messages()
                .await
                .map_err(broker)?;
            drain(batch, &mut messages).await?;
            if messages.is_empty() {
                return Ok(0);
            }
        }
        if self.batch_size > messages.len() {
            let batch = state
                .consumer
                .fetch()
                .max_messages(self.batch_size - messages.len())
                .messages()
                .await
                .map_err(broker)?;
            drain(batch, &mut messages).await?;
        }
        // Every delivery, redeliveries included, takes the consumer's next delivery sequence.
        // A hole means a delivery was lost (a reconnect): the messages after it must not be
        // applied before it, so stop there and reposition from the checkpoint.
        let mut gap = None;
        for (index, message) in messages.iter().enumerate() {
            let delivery = message.info().map_err(broker)?.consumer_sequence;
            if delivery != state.next_delivery {
                gap = Some((index, delivery));
                break;
            }
            state.next_delivery += 1;
        }
        if let Some((index, _)) = gap {
            messages.truncate(index);
        }
        let handled = self.apply_messages(messages).await?;
        match gap {
            Some((_, delivery)) => Err(CQRSError::persistence(format!(
                "JetStream consumer {} skipped deliveries {} to {}; repositioning it from the \
                 checkpoint",
                self.durable_name,
                state.next_delivery,
                delivery.saturating_sub(1)
            ))),
            None => Ok(handled),
        }
    }

    /// Applies every message the stream holds now; returns the new checkpoint position.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] for a broker or store failure; under
    /// [`PoisonPolicy::Stop`], [`CQRSError::Deserialization`] for a body that is not an
    /// event, [`CQRSError::EventDecode`] or [`CQRSError::ViewHandler`] naming the event.
    /// Batches committed before the error stay committed.
    pub async fn catch_up(&self) -> Result<i64, CQRSError> {
        while self.pull_once(None).await? > 0 {}
        self.position().await
    }

    /// Applies messages fetched from any consumer of the stream (the background runner and
    /// [`catch_up`](Self::catch_up) use it with their own), in order: the changes and the
    /// checkpoint are committed at once, then every message is acknowledged. Returns how
    /// many messages were handled, applied or not.
    ///
    /// # Errors
    /// As [`catch_up`](Self::catch_up). On an error, the messages before the failing one are
    /// committed and acknowledged; the failing one is handled per the [`PoisonPolicy`]; the
    /// ones after it are left for redelivery.
    pub async fn apply_messages(
        &self,
        messages: Vec<jetstream::Message>,
    ) -> Result<usize, CQRSError> {
        if messages.is_empty() {
            return Ok(0);
        }
        let checkpoint = self.views.checkpoint(&self.name).await?;
        let span = tracing::debug_span!(
            "nats_projection_batch",
            projection = %self.name,
            view = V::TABLE_NAME,
            after = checkpoint,
            messages = messages.len(),
            to = tracing::field::Empty,
        );
        self.apply_batch(messages, checkpoint)
            .instrument(span)
            .await
    }

    async fn apply_batch(
        &self,
        messages: Vec<jetstream::Message>,
        mut checkpoint: i64,
    ) -> Result<usize, CQRSError> {
        let mut touched: HashMap<String, ViewContext<V>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut done: Vec<jetstream::Message> = Vec::with_capacity(messages.len());
        let mut skipped: Vec<jetstream::Message> = Vec::new();
        let mut advanced = false;
        let mut failure: Option<CQRSError> = None;
        let mut messages = messages.into_iter();
        let mut handled = 0_usize;
        for message in messages.by_ref() {
            handled += 1;
            let stream_sequence = message.info().map_or(0, |info| info.stream_sequence);
            let event = match decode_message(&message.subject, stream_sequence, &message.payload) {
                Ok(event) => event,
                // A row the store could not read as an event: a poison event at its position
                // (reading it again cannot help, so it is not retried).
                Err(CQRSError::DamagedRow(damage)) => {
                    if damage.position <= checkpoint {
                        done.push(message);
                        continue;
                    }
                    tracing::error!(
                        projection = %self.name, subject = %message.subject, stream_sequence,
                        position = damage.position, error = %damage,
                        "NATS message stands for a damaged row of the event store"
                    );
                    if self.policy == PoisonPolicy::SkipAndRecord {
                        let letter =
                            DeadLetter::for_damaged_row(&self.name, V::TABLE_NAME, &damage, 1);
                        if let Err(sink_error) = self.dead_letters.record(letter).await {
                            failure = Some(sink_error);
                            handled -= 1;
                            break;
                        }
                        checkpoint = damage.position;
                        advanced = true;
                        skipped.push(message);
                        continue;
                    }
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    failure = Some(CQRSError::DamagedRow(damage));
                    handled -= 1;
                    break;
                }
                Err(error) => {
                    // Can never decode: terminate it whatever the policy.
                    tracing::error!(
                        projection = %self.name, subject = %message.subject, stream_sequence,
                        %error, "NATS message is not an event; terminating it"
                    );
                    term(&message).await;
                    if self.policy == PoisonPolicy::SkipAndRecord {
                        self.undecodable_list().push(UndecodableMessage {
                            subject: message.subject.to_string(),
                            stream_sequence,
                            error: error.to_string(),
                        });
                        continue;
                    }
                    failure = Some(error);
                    handled -= 1;
                    break;
                }
            };
            if event.position <= checkpoint {
                // Already applied (a redelivery, or a batch committed but not acknowledged).
                done.push(message);
                continue;
            }
            if event.aggregate_type == A::NAME {
                let mut result = self.apply_event(&event, &mut touched, &mut order).await;
                let mut failures = 1;
                while failures < self.retry.attempts {
                    let Err(error) = &result else { break };
                    if !is_poison(error) {
                        break;
                    }
                    let wait = self.retry.backoff(failures);
                    tracing::warn!(
                        projection = %self.name, position = event.position, attempt = failures,
                        retry_in = ?wait, %error, "view handler failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    result = self.apply_event(&event, &mut touched, &mut order).await;
                    failures += 1;
                }
                if let Err(error) = result {
                    if !is_poison(&error) {
                        failure = Some(error);
                        handled -= 1;
                        break;
                    }
                    tracing::error!(
                        projection = %self.name, subject = %message.subject, stream_sequence,
                        position = event.position, %error, "event cannot be applied to the view"
                    );
                    if self.policy == PoisonPolicy::SkipAndRecord {
                        // Recorded before the checkpoint moves past it (the sink is
                        // idempotent per position), terminated after the commit below.
                        let letter =
                            DeadLetter::new(&self.name, V::TABLE_NAME, &event, &error, failures);
                        if let Err(sink_error) = self.dead_letters.record(letter).await {
                            failure = Some(sink_error);
                            handled -= 1;
                            break;
                        }
                        checkpoint = event.position;
                        advanced = true;
                        skipped.push(message);
                        continue;
                    }
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    failure = Some(error);
                    handled -= 1;
                    break;
                }
            }
            checkpoint = event.position;
            advanced = true;
            done.push(message);
        }
        if advanced {
            tracing::Span::current().record("to", checkpoint);
            let changes = order
                .into_iter()
                .filter_map(|id| touched.remove(&id))
                .collect();
            self.views
                .commit(
                    changes,
                    Some(Checkpoint {
                        name: self.name.clone(),
                        position: checkpoint,
                    }),
                )
                .await?;
        }
        // Only now that the effect is committed.
        for message in done {
            message.ack().await.map_err(broker)?;
        }
        for message in skipped {
            term(&message).await;
        }
        // The rest of the batch is left unacknowledged; the consumer is repositioned.
        drop(messages);
        match failure {
            Some(error) => Err(error),
            None => Ok(handled),
        }
    }

    async fn apply_event(
        &self,
        stored: &PersistableDomainEvent,
        touched: &mut HashMap<String, ViewContext<V>>,
        order: &mut Vec<String>,
    ) -> Result<(), CQRSError> {
        // An upcast may turn one stored event into several, or none. All of them apply to
        // copies, written back only when every one succeeded: a refused event leaves every
        // view as it was, so it can be tried again or skipped.
        let mut updated: Vec<(String, V)> = Vec::new();
        for envelope in stored.decode_all::<A::Events>()? {
            // Collected: the ids' iterator need not be `Send` across the loads below.
            let view_ids: Vec<String> = V::view_ids(&envelope).into_iter().collect();
            for view_id in view_ids {
                if !touched.contains_key(&view_id) {
                    let context = self.views.load_for_update(&view_id).await?;
                    order.push(view_id.clone());
                    touched.insert(view_id.clone(), context);
                }
                let current = match updated.iter().rposition(|(id, _)| *id == view_id) {
                    Some(index) => Some(&updated[index].1),
                    None => touched.get(&view_id).map(|context| &context.view),
                };
                let Some(current) = current else {
                    continue;
                };
                let mut view = current.clone();
                view.handle_event_for(&view_id, &envelope)
                    .map_err(|error| ViewHandlerError::for_event(V::TABLE_NAME, stored, error))?;
                updated.push((view_id, view));
            }
        }
        for (view_id, view) in updated {
            if let Some(context) = touched.get_mut(&view_id) {
                context.view = view;
            }
        }
        Ok(())
    }

    /// Runs the projection in a background task: catches up, then applies messages as they
    /// arrive (one pull waits up to `fetch_wait`). A broker or store failure is logged and
    /// retried with a backoff (100 ms doubling up to 5 s) from the checkpoint; a poison
    /// message under [`PoisonPolicy::Stop`] ends the task with its error, which
    /// [`NatsProjectionHandle::stop`] returns.
    pub fn start(self) -> NatsProjectionHandle {
        let (stop, mut stopped) = watch::channel(false);
        let projection = self;
        let name = projection.name.clone();
        let dead_letters = Arc::clone(&projection.dead_letters);
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                if *stopped.borrow() {
                    return Ok(());
                }
                let pulled = tokio::select! {
                    _ = stopped.changed() => return Ok(()),
                    pulled = projection.pull_once(Some(projection.fetch_wait)) => pulled,
                };
                match pulled {
                    Ok(_) => backoff = Duration::from_millis(100),
                    Err(error) if is_poison(&error) => return Err(error),
                    Err(error) => {
                        tracing::warn!(projection = %projection.name, %error, retry_in = ?backoff, "NATS projection failed; retrying");
                        tokio::select! {
                            _ = stopped.changed() => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        NatsProjectionHandle {
            stop,
            task,
            name,
            dead_letters,
        }
    }
}

async fn term(message: &jetstream::Message) {
    if let Err(error) = message.ack_with(AckKind::Term).await {
        tracing::warn!(%error, "could not terminate a NATS message; it will be redelivered");
    }
}

/// The handle of a projection started with [`NatsProjection::start`]: stop it, see whether
/// it ended, and read the events it skipped while it runs.
pub struct NatsProjectionHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), CQRSError>>,
    name: String,
    dead_letters: Arc<dyn DeadLetters>,
}

impl fmt::Debug for NatsProjectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsProjectionHandle")
            .field("name", &self.name)
            .field("finished", &self.task.is_finished())
            .finish_non_exhaustive()
    }
}

impl NatsProjectionHandle {
    /// The projection's checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The events the running projection skipped under
    /// [`PoisonPolicy::SkipAndRecord`], as its dead-letter sink holds them.
    ///
    /// # Errors
    /// The sink's error.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, CQRSError> {
        self.dead_letters.list(&self.name).await
    }

    /// Stops the projection and waits for it.
    ///
    /// # Errors
    /// The poison message's error if the projection had stopped on one;
    /// [`CQRSError::PersistenceError`] if the task panicked.
    pub async fn stop(self) -> Result<(), CQRSError> {
        let _ = self.stop.send(true);
        self.task.await.map_err(broker)?
    }

    /// True once the task has ended (stopped, or on a poison message under
    /// [`PoisonPolicy::Stop`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(event_type: &str) -> PersistableDomainEvent {
        PersistableDomainEvent {
            event_id: Uuid::new_v4(),
            aggregate_type_id: "account:00000000-0000-0000-0000-000000000000".into(),
            aggregate_id: Uuid::nil(),
            aggregate_type: "account".into(),
            sequence: 3,
            position: 42,
            event_type: event_type.into(),
            event_version: "2".into(),
            payload: serde_json::json!({ "amount": 5 }).into(),
            metadata: serde_json::Value::Null,
            timestamp: chrono::Utc::now(),
        }
    }

    #[test]
    fn subjects_name_the_aggregate_type_and_event_and_never_a_wildcard() {
        let config = NatsStreamConfig::new("EVENTS", "events");
        assert_eq!(
            config.subject_for(&stored("Deposited")),
            "events.account.Deposited"
        );
        assert_eq!(
            config.subject_for(&stored("bank.deposited")),
            "events.account.bank.deposited"
        );
        assert_eq!(
            config.subject_for(&stored("Odd name>*")),
            "events.account.Odd_name__"
        );
        assert_eq!(config.subject_for(&stored("")), "events.account._");
    }

    #[test]
    fn the_body_is_the_stored_event_and_the_headers_repeat_its_identity() {
        let event = stored("Deposited");
        let (body, headers) = encode(&event).unwrap();
        assert_eq!(decode_message("s", 1, &body).unwrap(), event);
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned()),
            Some(event.event_id.to_string())
        );
        assert_eq!(header(HEADER_AGGREGATE_TYPE).as_deref(), Some("account"));
        assert_eq!(header(HEADER_AGGREGATE_ID), Some(Uuid::nil().to_string()));
        assert_eq!(header(HEADER_SEQUENCE).as_deref(), Some("3"));
        assert_eq!(header(HEADER_POSITION).as_deref(), Some("42"));
        assert_eq!(header(HEADER_EVENT_TYPE).as_deref(), Some("Deposited"));
        assert_eq!(header(HEADER_EVENT_VERSION).as_deref(), Some("2"));
    }

    #[test]
    fn a_payload_stored_as_text_that_is_not_json_travels_as_stored() {
        let mut event = stored("Deposited");
        event.payload = crate::Payload::from_stored_unchecked("{\"amount\": oops");
        let (body, headers) = encode(&event).unwrap();
        let back = decode_message("s", 1, &body).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.payload.as_str(), "{\"amount\": oops");
        assert_eq!(
            headers.get(HEADER_POSITION).map(|v| v.as_str().to_owned()),
            Some("42".to_owned())
        );
    }

    #[test]
    fn a_damaged_row_travels_as_a_message_of_its_own() {
        let config = NatsStreamConfig::new("EVENTS", "events");
        let damage = DamagedRow {
            position: 9,
            event_id: None,
            aggregate_type: Some("account".into()),
            aggregate_id: Some(Uuid::nil()),
            sequence: Some(2),
            event_type: Some("Deposited".into()),
            event_version: Some("1".into()),
            problem: "metadata is not JSON".into(),
        };
        let (subject, body, headers) = encode_damaged_row(&config, &damage).unwrap();
        assert_eq!(subject, "events.account.Deposited");
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(header(HEADER_POSITION).as_deref(), Some("9"));
        assert_eq!(
            headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned())
                .as_deref(),
            Some("cqrs-damaged-row-9")
        );
        match decode_message(&subject, 3, &body) {
            Err(CQRSError::DamagedRow(back)) => assert_eq!(*back, damage),
            other => panic!("expected DamagedRow, got {other:?}"),
        }
    }

    #[test]
    fn a_body_that_is_not_an_event_is_a_typed_error_naming_the_message() {
        let error = decode_message("events.account.Deposited", 7, b"not json").unwrap_err();
        match error {
            CQRSError::Deserialization { what, .. } => {
                assert_eq!(what, "NATS message 7 on events.account.Deposited");
            }
            other => panic!("expected Deserialization, got {other:?}"),
        }
    }
}
