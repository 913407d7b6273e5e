//! The outbox relay: publishes committed events to JetStream in global order.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{Publish, PublishErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;
use tokio::sync::watch;
use tracing::Instrument;

use crate::error::{CQRSError, DamagedRow};
use crate::event::PersistableDomainEvent;
use crate::store::{Checkpoint, CheckpointRepository, EventRepository};
use crate::task::{backoff, Shared, Stop, Task};

use super::codec::{self, damaged_row_message_id, encode, encode_damaged_row, position_header};
use super::tail::stream_end;
use super::{broker, NatsStreamConfig};

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

    /// The message, ready to send under `message_id`.
    fn publish(&self, message_id: &str) -> Publish {
        let mut headers = self.headers.clone();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
        Publish::build()
            .payload(self.body.clone().into())
            .headers(headers)
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
/// stream.
///
/// Each run of [`relay_once`](Self::relay_once) reads up to `batch_size` events after the
/// relay's checkpoint, publishes them all (pipelined), waits for every acknowledgement, then
/// saves the checkpoint at the last one. If anything fails the checkpoint stays where it was;
/// the next run reads the stream's end first and publishes the batch's events the stream does
/// not hold (the server would also drop copies by `Nats-Msg-Id`, within its duplicate
/// window).
///
/// [`start`](Self::start) runs it in the background: catch up, then wait for the store's
/// notification (or poll every `poll_interval` when the store cannot notify, or when another
/// process appends), retrying failures with a backoff.
///
/// # After a broker crash
///
/// A JetStream server acknowledges a message before it is on disk (it syncs every two
/// minutes unless the server sets `sync_interval: always`), so a server that loses power
/// can come back without messages the relay saw acknowledged and checkpointed. So before
/// its first batch, and before the first batch after any failure or after the stream was
/// found not to end with the relay's last message, the relay reads the stream's newest
/// event (the newest message with a [`HEADER_POSITION`](Self::HEADER_POSITION)). When that
/// position is below the checkpoint, the checkpoint moves back to it (0 for an empty or
/// recreated stream) and exactly the events after it are published again, in position
/// order: the stream is never left with a gap before the store's events. When it is at or
/// above the checkpoint (a relay that stopped before saving its checkpoint), the events up
/// to it are passed without publishing them again. The batches up to the old checkpoint,
/// and the first one after every check, expect the stream's exact last sequence for each
/// message (`Nats-Expected-Last-Sequence`), so the stream takes them in order or not at
/// all; an event whose id the server still remembers although the stream no longer holds
/// it (messages deleted through the API within the duplicate window; a restarted server
/// remembers only the ids it holds) is stored under the message id
/// `<event id>:<stream sequence>`.
///
/// The check takes two requests (the stream's state and its newest message; a few more when
/// its newest messages were deleted), once per start or failure. A stream whose retention
/// removed every message (`max_age` on a quiet stream) looks like one that lost them all:
/// the relay publishes the store again from the first event. Keep such streams' retention
/// by count or size, which never removes the newest message.
///
/// # Wire format
///
/// The body of every message is the [`PersistableDomainEvent`] as JSON (its serde form:
/// the fields `event_id`, `aggregate_type_id`, `aggregate_id`, `aggregate_type`, `sequence`,
/// `position`, `event_type`, `event_version`, `payload`, `metadata`, `timestamp`, and
/// `correlation_id` and `causation_id` when the event has them), so a
/// consumer in any language reads the whole event, and
/// [`NatsProjection`](crate::NatsProjection) decodes it exactly as a store would. The headers repeat what a router needs without parsing the body:
///
/// | header | value |
/// |--------|-------|
/// | `Nats-Msg-Id` | the event id (deduplication; see "After a broker crash" for the one exception) |
/// | [`HEADER_AGGREGATE_TYPE`](Self::HEADER_AGGREGATE_TYPE) | the aggregate type |
/// | [`HEADER_AGGREGATE_ID`](Self::HEADER_AGGREGATE_ID) | the aggregate id |
/// | [`HEADER_SEQUENCE`](Self::HEADER_SEQUENCE) | the event's sequence within its aggregate |
/// | [`HEADER_POSITION`](Self::HEADER_POSITION) | the event's global position |
/// | [`HEADER_EVENT_TYPE`](Self::HEADER_EVENT_TYPE) | the stored event name |
/// | [`HEADER_EVENT_VERSION`](Self::HEADER_EVENT_VERSION) | the stored event version |
/// | [`HEADER_CORRELATION_ID`](Self::HEADER_CORRELATION_ID) | the correlation id, when the event has one |
/// | [`HEADER_CAUSATION_ID`](Self::HEADER_CAUSATION_ID) | the causation id (the command), when the event has one |
///
/// A damaged row of the store travels as it is, so a consumer meets the same poison event
/// as a reader of the store: an event whose stored payload is not JSON has, in place of
/// `payload`, `payload_text` holding the stored text as a JSON string
/// ([`decode_message`](Self::decode_message) gives the event back with that payload, which then fails to decode); a row the store
/// cannot read as an event at all ([`CQRSError::DamagedRow`]) is a message of its own whose
/// body is `{"damaged_row": {..}}` and whose headers name what could be read of it (always
/// its position; the message id is `cqrs-damaged-row-<position>` when the event id is
/// unreadable).
pub struct NatsRelay {
    events: Arc<dyn EventRepository>,
    checkpoints: Arc<dyn CheckpointRepository>,
    jetstream: jetstream::Context,
    stream: NatsStreamConfig,
    name: String,
    batch_size: usize,
    poll_interval: Duration,
    /// What the relay knows of the stream's end; reset at the start and after any failure.
    tail: tokio::sync::Mutex<Tail>,
    /// The checkpoint as far as this relay knows it, for its handle.
    progress: watch::Sender<i64>,
    shared: Arc<Shared>,
}

/// What the relay knows of the stream's end between two batches.
#[derive(Debug, Default)]
struct Tail {
    /// The stream was compared with the checkpoint ([`NatsRelay::check_stream`]).
    checked: bool,
    /// The position of the newest event the stream is known to hold.
    holds: i64,
    /// The stream's last sequence as the last check or publish saw it.
    last_sequence: u64,
    /// Batches starting at or before this position are published carefully: the checkpoint
    /// the check found, which a stream behind it is republished up to.
    careful_until: i64,
    /// The message id of the stream's last message when it is the relay's last publish: the
    /// next batch is then pipelined, its first message expecting this one.
    last_published: Option<String>,
}

/// Where a published batch left the stream.
struct BatchEnd {
    /// The stream's last sequence.
    last_sequence: u64,
    /// The message id of the stream's last message, when the batch's last message is it.
    last_published: Option<String>,
}

/// What one relay batch did.
struct Relayed {
    /// Messages the checkpoint moved past, now in the stream (a damaged row counts as one).
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
    /// Header naming the event's aggregate type.
    pub const HEADER_AGGREGATE_TYPE: &'static str = codec::HEADER_AGGREGATE_TYPE;
    /// Header naming the event's aggregate id.
    pub const HEADER_AGGREGATE_ID: &'static str = codec::HEADER_AGGREGATE_ID;
    /// Header carrying the event's sequence within its aggregate.
    pub const HEADER_SEQUENCE: &'static str = codec::HEADER_SEQUENCE;
    /// Header carrying the event's global position in the store.
    pub const HEADER_POSITION: &'static str = codec::HEADER_POSITION;
    /// Header carrying the stored event name.
    pub const HEADER_EVENT_TYPE: &'static str = codec::HEADER_EVENT_TYPE;
    /// Header carrying the stored event version.
    pub const HEADER_EVENT_VERSION: &'static str = codec::HEADER_EVENT_VERSION;
    /// Header carrying the event's correlation id; absent when it has none.
    pub const HEADER_CORRELATION_ID: &'static str = codec::HEADER_CORRELATION_ID;
    /// Header carrying the event's causation id (the command that caused it); absent when
    /// it has none.
    pub const HEADER_CAUSATION_ID: &'static str = codec::HEADER_CAUSATION_ID;

    /// Decodes the body of a message a relay published, for a consumer that reads the
    /// stream without [`NatsProjection`](crate::NatsProjection).
    ///
    /// An event whose stored payload is not JSON comes back with that text as its payload
    /// ([`Payload::from_stored_unchecked`](crate::Payload::from_stored_unchecked)), so decoding
    /// it fails as it does from the store.
    ///
    /// # Errors
    /// [`CQRSError::DamagedRow`] for the message of a row the store could not read as an
    /// event; [`CQRSError::Deserialization`] naming the subject and stream sequence when the
    /// body is not a [`PersistableDomainEvent`].
    pub fn decode_message(
        subject: &str,
        stream_sequence: u64,
        body: &[u8],
    ) -> Result<PersistableDomainEvent, CQRSError> {
        codec::decode_message(subject, stream_sequence, body)
    }

    /// The checkpoint name a relay to `stream` uses unless [`with_name`](Self::with_name)
    /// sets another: `nats_relay_<stream name>`.
    ///
    /// ```
    /// let stream = cqrs::NatsStreamConfig::new("EVENTS", "events");
    /// assert_eq!(cqrs::NatsRelay::default_name(&stream), "nats_relay_EVENTS");
    /// ```
    pub fn default_name(stream: &NatsStreamConfig) -> String {
        format!("nats_relay_{}", stream.stream_name())
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
            tail: tokio::sync::Mutex::new(Tail::default()),
            progress: watch::channel(0).0,
            shared: Arc::new(Shared::default()),
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
    /// how many events the checkpoint moved past (0 when there was nothing new).
    ///
    /// The first call, and the first after a failure, compares the stream with the
    /// checkpoint first (see [`NatsRelay`], "After a broker crash"): when the stream holds
    /// less than the checkpoint says, the checkpoint moves back to what the stream holds and
    /// the batch starts there; events the stream holds already (a checkpoint behind the
    /// stream) are passed without publishing them again.
    ///
    /// # Errors
    /// A store error, [`CQRSError::Serialization`], or [`CQRSError::PersistenceError`] when
    /// the stream cannot be read, or a publish is refused or not acknowledged (the checkpoint
    /// is then unchanged).
    pub async fn relay_once(&self) -> Result<usize, CQRSError> {
        Ok(self.relay_batch().await?.published)
    }

    /// [`relay_once`](Self::relay_once), saying also where the batch ended and whether the
    /// store may hold more.
    async fn relay_batch(&self) -> Result<Relayed, CQRSError> {
        let mut tail = self.tail.lock().await;
        let result = match self.publish_next(&mut tail).await {
            // The stream does not end where this relay left it: another publisher wrote to
            // it, or it lost messages (a server that restarted without what it had
            // acknowledged). Read its end again and publish from there.
            Err(BatchFailure::Chain(error)) => {
                tracing::debug!(relay = %self.name, %error, "the stream does not end with the relay's last event; checking it again");
                *tail = Tail::default();
                self.publish_next(&mut tail).await
            }
            other => other,
        };
        result.map_err(|failure| {
            *tail = Tail::default();
            failure.into_error()
        })
    }

    /// Checks the stream if needed, then publishes the batch after the checkpoint.
    async fn publish_next(&self, tail: &mut Tail) -> Result<Relayed, BatchFailure> {
        if !tail.checked {
            *tail = self.check_stream().await.map_err(BatchFailure::Other)?;
        }
        let from = self
            .checkpoints
            .load_checkpoint(&self.name)
            .await
            .map_err(BatchFailure::Other)?;
        let (batch, damaged) = self.read_batch(from).await.map_err(BatchFailure::Other)?;
        let Some(last) = batch.last() else {
            return Ok(Relayed {
                published: 0,
                last: from,
                damaged,
            });
        };
        // The stream holds every event up to its newest one (it takes them in position
        // order): those are not sent again, whatever the server remembers of their ids.
        let held = batch
            .iter()
            .take_while(|message| message.position <= tail.holds)
            .count();
        let to_send = &batch[held..];
        let careful = tail.last_published.is_none()
            || to_send
                .first()
                .is_some_and(|first| first.position <= tail.careful_until);
        let span = tracing::debug_span!(
            "nats_relay_batch",
            relay = %self.name,
            stream = %self.stream.stream_name(),
            from = from + 1,
            to = last.position,
            events = batch.len(),
            held,
            careful,
        );
        let end = async {
            if to_send.is_empty() {
                return Ok(BatchEnd {
                    last_sequence: tail.last_sequence,
                    last_published: tail.last_published.clone(),
                });
            }
            match tail.last_published.as_deref() {
                Some(previous) if !careful => self.publish_chained(to_send, previous, tail).await,
                _ => self.publish_careful(to_send, tail).await,
            }
        }
        .instrument(span)
        .await?;
        self.checkpoints
            .save_checkpoint(Checkpoint {
                name: self.name.clone(),
                position: last.position,
            })
            .await
            .map_err(BatchFailure::Other)?;
        self.progress.send_if_modified(|known| {
            let moved = last.position > *known;
            *known = (*known).max(last.position);
            moved
        });
        tail.holds = tail.holds.max(last.position);
        tail.last_sequence = end.last_sequence;
        tail.last_published = end.last_published;
        Ok(Relayed {
            published: batch.len(),
            last: last.position,
            damaged,
        })
    }

    /// Up to `batch_size` messages after `from`, and whether they are a damaged row's.
    async fn read_batch(&self, from: i64) -> Result<(Vec<Outgoing>, bool), CQRSError> {
        match self.events.read_all(from, self.batch_size).await {
            Ok(events) => Ok((
                events
                    .iter()
                    .map(|event| Outgoing::event(&self.stream, event))
                    .collect::<Result<Vec<_>, _>>()?,
                false,
            )),
            // A row the store cannot read as an event: published as a message of its own,
            // so each consumer meets it as a poison event at its position.
            Err(CQRSError::DamagedRow(damage)) if damage.position > from => {
                tracing::error!(
                    relay = %self.name,
                    position = damage.position,
                    error = %damage,
                    "damaged row in the event store; publishing it as a damaged-row message"
                );
                Ok((vec![Outgoing::damaged_row(&self.stream, &damage)?], true))
            }
            Err(error) => Err(error),
        }
    }

    /// Compares the stream's newest event with the checkpoint. When the stream is behind,
    /// moves the checkpoint back to the stream's newest event (0 when it holds none), so the
    /// events after it are published again; the ones up to the old checkpoint are then
    /// published carefully.
    async fn check_stream(&self) -> Result<Tail, CQRSError> {
        let mut stream = self
            .jetstream
            .get_stream(self.stream.stream_name())
            .await
            .map_err(broker)?;
        let end = stream_end(&self.jetstream, &mut stream, &self.stream).await?;
        let checkpoint = self.checkpoints.load_checkpoint(&self.name).await?;
        if end.position < checkpoint {
            tracing::warn!(
                relay = %self.name,
                stream = %self.stream.stream_name(),
                checkpoint,
                stream_holds = end.position,
                "the stream lost events the relay had seen acknowledged; publishing them again"
            );
            self.checkpoints
                .save_checkpoint(Checkpoint {
                    name: self.name.clone(),
                    position: end.position,
                })
                .await?;
            self.progress.send_if_modified(|known| {
                let moved = *known != end.position;
                *known = end.position;
                moved
            });
        }
        Ok(Tail {
            checked: true,
            holds: end.position,
            last_sequence: end.last_sequence,
            careful_until: checkpoint,
            last_published: None,
        })
    }

    /// Publishes `batch` pipelined, each message expecting the one before it as the
    /// stream's last, the first one expecting `previous`.
    async fn publish_chained(
        &self,
        batch: &[Outgoing],
        previous: &str,
        tail: &Tail,
    ) -> Result<BatchEnd, BatchFailure> {
        let mut acks = Vec::with_capacity(batch.len());
        let mut previous = previous;
        for message in batch {
            let publish = message
                .publish(&message.message_id)
                .expected_last_message_id(previous);
            let ack = self
                .jetstream
                .send_publish(message.subject.clone(), publish)
                .await
                .map_err(|error| BatchFailure::Other(broker(error)))?;
            acks.push((message, ack));
            previous = &message.message_id;
        }
        let mut end = BatchEnd {
            last_sequence: tail.last_sequence,
            last_published: None,
        };
        let mut duplicates = 0_usize;
        for (message, ack) in acks {
            let ack = ack.await.map_err(|error| {
                if error.kind() == PublishErrorKind::WrongLastMessageId {
                    return BatchFailure::Chain(broker(error));
                }
                tracing::warn!(position = message.position, %error, "JetStream refused or did not acknowledge an event");
                BatchFailure::Other(broker(error))
            })?;
            if ack.duplicate {
                if message.position > tail.holds {
                    // The server remembers the event's id, but the stream does not hold
                    // it after what it held: it was deleted from the stream.
                    return Err(BatchFailure::Chain(CQRSError::persistence(format!(
                        "JetStream took the event at position {} for a duplicate of stream \
                         message {}, after the stream's newest event",
                        message.position, ack.sequence
                    ))));
                }
                duplicates += 1;
                end.last_published = None;
            } else {
                end.last_sequence = ack.sequence;
                end.last_published = Some(message.message_id.clone());
            }
        }
        tracing::debug!(duplicates, "relay batch acknowledged");
        Ok(end)
    }

    /// Publishes `batch` after the stream's last sequence as [`check_stream`] found it, each
    /// message expecting the exact sequence before it, so the stream takes the batch in order
    /// or not at all whatever the server remembers. An event the stream holds already (at or
    /// before its newest event) is a duplicate and passed; an event whose id the server
    /// remembers although the stream no longer holds it (messages deleted from the stream
    /// within the duplicate window) is published again under the id
    /// `<event id>:<stream sequence>`.
    async fn publish_careful(
        &self,
        batch: &[Outgoing],
        tail: &Tail,
    ) -> Result<BatchEnd, BatchFailure> {
        let mut ids: Vec<String> = batch
            .iter()
            .map(|message| message.message_id.clone())
            .collect();
        let mut end = BatchEnd {
            last_sequence: tail.last_sequence,
            last_published: None,
        };
        let mut start = 0;
        // Each round stores or passes at least one message, or renames one.
        let mut rounds_left = 2 * batch.len() + 2;
        while start < batch.len() {
            rounds_left -= 1;
            if rounds_left == 0 {
                return Err(BatchFailure::Other(CQRSError::persistence(format!(
                    "JetStream did not take the event at position {} after repeated tries",
                    batch[start].position
                ))));
            }
            let mut acks = Vec::with_capacity(batch.len() - start);
            for (offset, message) in batch[start..].iter().enumerate() {
                let publish = message
                    .publish(&ids[start + offset])
                    .expected_last_sequence(end.last_sequence + offset as u64);
                let ack = self
                    .jetstream
                    .send_publish(message.subject.clone(), publish)
                    .await
                    .map_err(|error| BatchFailure::Other(broker(error)))?;
                acks.push(ack);
            }
            let round_start = start;
            let mut next = batch.len();
            for (offset, ack) in acks.into_iter().enumerate() {
                let index = round_start + offset;
                let message = &batch[index];
                match ack.await {
                    Ok(ack) if !ack.duplicate => {
                        end.last_sequence = ack.sequence;
                        end.last_published = Some(ids[index].clone());
                    }
                    Ok(ack) => {
                        // Not stored: the messages after it expected one sequence too many.
                        if message.position <= tail.holds
                            || self
                                .stream_holds(ack.sequence, message.position)
                                .await
                                .map_err(BatchFailure::Other)?
                        {
                            end.last_published = None;
                            next = index + 1;
                        } else {
                            tracing::warn!(
                                position = message.position,
                                duplicate_of = ack.sequence,
                                "JetStream remembers the id of an event the stream no longer holds; publishing it under another id"
                            );
                            ids[index] =
                                format!("{}:{}", message.message_id, end.last_sequence + 1);
                            next = index;
                        }
                        break;
                    }
                    // Another publisher wrote to the stream since it was read.
                    Err(error)
                        if error.kind() == PublishErrorKind::WrongLastSequence
                            && index == round_start =>
                    {
                        return Err(BatchFailure::Chain(broker(error)));
                    }
                    Err(error) => {
                        tracing::warn!(position = message.position, %error, "JetStream refused or did not acknowledge an event");
                        return Err(BatchFailure::Other(broker(error)));
                    }
                }
            }
            start = next;
        }
        Ok(end)
    }

    /// True when the stream holds, at `sequence`, the message of the event at `position`.
    async fn stream_holds(&self, sequence: u64, position: i64) -> Result<bool, CQRSError> {
        let stream = self
            .jetstream
            .get_stream(self.stream.stream_name())
            .await
            .map_err(broker)?;
        match stream.get_raw_message(sequence).await {
            Ok(message) => Ok(position_header(&message.headers) == Some(position)),
            Err(error) if matches!(error.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                Ok(false)
            }
            Err(error) => Err(broker(error)),
        }
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
                self.shared.set_live();
                return self.position().await;
            }
        }
    }

    /// Runs the relay in a background task and returns its handle: ensures the stream,
    /// catches up, then publishes new events as the store reports them. Failures are
    /// retried with a backoff (up to 5 s), each retry ensuring the stream and checking it
    /// against the checkpoint first, and shown as the handle's
    /// [`last_error`](NatsRelayHandle::last_error). Dropping the handle stops the relay.
    #[must_use = "dropping the handle stops the relay"]
    pub fn start(self) -> NatsRelayHandle {
        let task = Task::spawn(
            self.name.clone(),
            self.progress.subscribe(),
            Arc::clone(&self.shared),
            |stop| self.run_until(stop),
        );
        NatsRelayHandle { task }
    }

    async fn run_until(self, stop: Stop) -> Result<(), CQRSError> {
        let mut changes = self.events.subscribe();
        let mut failures: u32 = 0;
        let mut stream_ready = false;
        loop {
            if stop.is_stopped() {
                return Ok(());
            }
            let result = async {
                if !stream_ready {
                    self.ensure_stream().await?;
                    stream_ready = true;
                }
                let position = self.catch_up().await?;
                self.progress.send_if_modified(|known| {
                    let moved = position > *known;
                    *known = (*known).max(position);
                    moved
                });
                Ok::<_, CQRSError>(())
            }
            .await;
            let wait = match result {
                Ok(()) => {
                    failures = 0;
                    self.poll_interval
                }
                // Nothing the relay meets is skipped: it retries until it can publish. The
                // stream is ensured again first: it may have been deleted meanwhile.
                Err(error) => {
                    stream_ready = false;
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(relay = %self.name, %error, retry_in = ?wait, "NATS relay failed; retrying");
                    self.shared.set_last_error(Some(error.to_string()));
                    wait
                }
            };
            let mut interrupt = stop.clone();
            tokio::select! {
                () = interrupt.stopped() => return Ok(()),
                () = wait_for_change(&mut changes, wait) => {}
            }
        }
    }
}

/// Why a relay batch failed.
enum BatchFailure {
    /// The stream does not end where the relay expected: the server refused an event because
    /// the stream's last message was not the one expected before it, or took an event the
    /// stream does not hold for a duplicate.
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

/// The handle of a relay started with [`NatsRelay::start`]: the same vocabulary as a
/// [`ProjectionHandle`](crate::ProjectionHandle). Dropping it stops the relay.
#[derive(Debug)]
pub struct NatsRelayHandle {
    task: Task,
}

impl NatsRelayHandle {
    /// The relay's checkpoint name.
    pub fn name(&self) -> &str {
        self.task.name()
    }

    /// The position of the last event known to be in the stream (0 until the relay has
    /// read its checkpoint).
    pub fn position(&self) -> i64 {
        self.task.position()
    }

    /// A receiver of the position, updated after every acknowledged batch.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.task.subscribe()
    }

    /// Waits until every event up to `position` is in the stream (pass a
    /// [`DispatchReceipt`](crate::DispatchReceipt)'s last position), for at most `timeout`.
    ///
    /// # Errors
    /// [`CQRSError::Timeout`]; [`CQRSError::ProjectionStopped`] when the relay ended before
    /// reaching `position`.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> Result<i64, CQRSError> {
        self.task.wait_for(position, timeout).await
    }

    /// True once the relay has caught up with the store (it then follows it live).
    pub fn is_live(&self) -> bool {
        self.task.is_live()
    }

    /// True when the relay has ended (stopped, or failed: see [`wait`](Self::wait)).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The last error the relay met, rendered: a failure it is retrying, or the error it
    /// stopped with. `None` when there was none.
    pub fn last_error(&self) -> Option<String> {
        self.task.last_error()
    }

    /// Asks the relay to stop after its current batch; see [`wait`](Self::wait).
    pub fn stop(&self) {
        self.task.stop();
    }

    /// Waits for the relay to end and returns how it ended.
    ///
    /// # Errors
    /// None: the relay retries every failure until it is stopped (a panic of its task is
    /// resumed here). The `Result` matches the other handles'.
    pub async fn wait(self) -> Result<(), CQRSError> {
        self.task.wait().await
    }

    /// [`stop`](Self::stop), then [`wait`](Self::wait).
    ///
    /// # Errors
    /// The error the relay had stopped with before, if any.
    pub async fn shutdown(self) -> Result<(), CQRSError> {
        self.stop();
        self.wait().await
    }
}
