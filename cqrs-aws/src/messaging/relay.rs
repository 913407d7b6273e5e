//! The publishing relay: committed events to an SNS FIFO topic or an SQS FIFO queue.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use cqrs::{
    CQRSError, Checkpoint, CheckpointRepository, DamagedRow, EventRepository,
    PersistableDomainEvent,
};
use tokio::sync::{watch, Mutex};
use tracing::Instrument;

use super::task::{backoff, pause, Shared, Stop, Task};
use crate::envelope;

/// The most entries one `PublishBatch` or `SendMessageBatch` takes.
pub const MAX_ENTRIES_PER_SEND: usize = 10;

/// The most message bytes the relay puts in one `PublishBatch` or `SendMessageBatch`, all
/// entries together: 256 KiB, SNS's limit (SQS takes 1 MiB). The relay makes a request of
/// fewer than ten entries rather than exceed it.
pub const MAX_BYTES_PER_SEND: usize = 256 * 1024;

/// Where a [`MessagingRelay`] publishes: a FIFO topic or queue (its name ends in `.fifo`).
/// The relay sets a message group and a deduplication id on every message, which a standard
/// topic or queue refuses.
#[derive(Clone)]
pub enum Destination {
    /// An SNS FIFO topic, by ARN; `PublishBatch`.
    SnsTopic {
        /// The client.
        client: aws_sdk_sns::Client,
        /// The topic's ARN.
        topic_arn: String,
    },
    /// An SQS FIFO queue, by URL; `SendMessageBatch`.
    SqsQueue {
        /// The client.
        client: aws_sdk_sqs::Client,
        /// The queue's URL.
        queue_url: String,
    },
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::SnsTopic { topic_arn, .. } => {
                f.debug_tuple("SnsTopic").field(topic_arn).finish()
            }
            Destination::SqsQueue { queue_url, .. } => {
                f.debug_tuple("SqsQueue").field(queue_url).finish()
            }
        }
    }
}

impl Destination {
    /// The topic's or queue's name: the last part of its ARN or URL.
    ///
    /// ```
    /// # let client = cqrs_aws::messaging::local_sqs_client("http://127.0.0.1:5000");
    /// let queue_url = "http://127.0.0.1:5000/123456789012/events.fifo".to_owned();
    /// let destination = cqrs_aws::messaging::Destination::SqsQueue { client, queue_url };
    /// assert_eq!(destination.name(), "events.fifo");
    /// ```
    pub fn name(&self) -> &str {
        let (address, separator) = match self {
            Destination::SnsTopic { topic_arn, .. } => (topic_arn.as_str(), ':'),
            Destination::SqsQueue { queue_url, .. } => (queue_url.as_str(), '/'),
        };
        address.rsplit(separator).next().unwrap_or(address)
    }

    /// `sns` or `sqs`.
    fn service(&self) -> &'static str {
        match self {
            Destination::SnsTopic { .. } => "sns",
            Destination::SqsQueue { .. } => "sqs",
        }
    }

    /// Sends up to [`MAX_ENTRIES_PER_SEND`] messages in one request; returns the index of
    /// the first entry that was refused and why, or `None` when every entry was accepted.
    async fn send(&self, chunk: &[Outgoing]) -> Result<Option<(usize, String)>, CQRSError> {
        let failed: Vec<(String, String)> = match self {
            Destination::SnsTopic { client, topic_arn } => {
                let mut request = client.publish_batch().topic_arn(topic_arn);
                for (index, message) in chunk.iter().enumerate() {
                    request = request.publish_batch_request_entries(
                        aws_sdk_sns::types::PublishBatchRequestEntry::builder()
                            .id(index.to_string())
                            .message(&message.body)
                            .message_group_id(&message.group_id)
                            .message_deduplication_id(&message.dedup_id)
                            .build()
                            .map_err(|error| build_error(&error))?,
                    );
                }
                let output = request.send().await.map_err(|error| {
                    send_error("SNS PublishBatch", topic_arn, &DisplayErrorContext(error))
                })?;
                let accepted: Vec<&str> =
                    output.successful().iter().filter_map(|e| e.id()).collect();
                let mut failed: Vec<(String, String)> = output
                    .failed()
                    .iter()
                    .map(|e| (e.id().to_owned(), refusal(e.code(), e.message())))
                    .collect();
                unanswered(chunk.len(), &accepted, &mut failed);
                failed
            }
            Destination::SqsQueue { client, queue_url } => {
                let mut request = client.send_message_batch().queue_url(queue_url);
                for (index, message) in chunk.iter().enumerate() {
                    request = request.entries(
                        aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                            .id(index.to_string())
                            .message_body(&message.body)
                            .message_group_id(&message.group_id)
                            .message_deduplication_id(&message.dedup_id)
                            .build()
                            .map_err(|error| build_error(&error))?,
                    );
                }
                let output = request.send().await.map_err(|error| {
                    send_error(
                        "SQS SendMessageBatch",
                        queue_url,
                        &DisplayErrorContext(error),
                    )
                })?;
                let accepted: Vec<&str> = output.successful().iter().map(|e| e.id()).collect();
                let mut failed: Vec<(String, String)> = output
                    .failed()
                    .iter()
                    .map(|e| (e.id().to_owned(), refusal(e.code(), e.message())))
                    .collect();
                unanswered(chunk.len(), &accepted, &mut failed);
                failed
            }
        };
        Ok(failed
            .into_iter()
            .filter_map(|(id, reason)| Some((id.parse::<usize>().ok()?, reason)))
            .min_by_key(|(index, _)| *index))
    }
}

/// Adds to `failed` every entry of the request that the answer names neither accepted nor
/// refused.
fn unanswered(entries: usize, accepted: &[&str], failed: &mut Vec<(String, String)>) {
    for index in 0..entries {
        let id = index.to_string();
        if !accepted.contains(&id.as_str()) && !failed.iter().any(|(failed, _)| *failed == id) {
            failed.push((id, "not in the answer".to_owned()));
        }
    }
}

fn refusal(code: &str, message: Option<&str>) -> String {
    format!("{code}: {}", message.unwrap_or(""))
}

fn send_error(operation: &str, address: &str, error: &dyn fmt::Display) -> CQRSError {
    CQRSError::persistence(format!("{operation} to {address} failed: {error}"))
}

fn build_error(error: &dyn fmt::Display) -> CQRSError {
    CQRSError::persistence(format!("could not build an SNS or SQS request: {error}"))
}

/// One event of a relay batch, ready to send.
struct Outgoing {
    position: i64,
    event_id: String,
    group_id: String,
    dedup_id: String,
    body: String,
}

impl Outgoing {
    /// The envelope of `event`; the damaged form when its payload is not JSON (read as
    /// stored from a damaged item), so that the consumer meets it as a poison event.
    fn event(event: &PersistableDomainEvent) -> Result<Self, CQRSError> {
        let body = match envelope::encode(event) {
            Ok(body) => body,
            Err(_) if !event.payload.is_valid_json() => {
                return Self::damaged_row(&DamagedRow {
                    position: event.position,
                    event_id: Some(event.event_id),
                    aggregate_type: Some(event.aggregate_type.to_string()),
                    aggregate_id: Some(event.aggregate_id),
                    sequence: Some(event.sequence),
                    event_type: Some(event.event_type.to_string()),
                    event_version: Some(event.event_version.to_string()),
                    problem: "the stored payload is not JSON".to_owned(),
                })
            }
            Err(error) => return Err(error),
        };
        Ok(Outgoing {
            position: event.position,
            event_id: event.event_id.to_string(),
            group_id: event.aggregate_type_id.to_string(),
            dedup_id: event.event_id.to_string(),
            body,
        })
    }

    /// The damaged form of a row the store could not read as an event: in its aggregate's
    /// group when the row names it (else the group `cqrs-damaged-row`), deduplicated by its
    /// event id when that reads (else `cqrs-damaged-row-{position}`).
    fn damaged_row(damage: &DamagedRow) -> Result<Self, CQRSError> {
        let dedup_id = match damage.event_id {
            Some(event_id) => event_id.to_string(),
            None => format!("cqrs-damaged-row-{}", damage.position),
        };
        let group_id = match (&damage.aggregate_type, damage.aggregate_id) {
            (Some(aggregate_type), Some(aggregate_id)) => {
                PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id).to_string()
            }
            _ => "cqrs-damaged-row".to_owned(),
        };
        Ok(Outgoing {
            position: damage.position,
            event_id: dedup_id.clone(),
            group_id,
            dedup_id,
            body: envelope::encode_damaged_row(damage)?,
        })
    }
}

/// `batch` cut into requests of at most [`MAX_ENTRIES_PER_SEND`] entries and
/// [`MAX_BYTES_PER_SEND`] bytes, each of at least one entry (a message larger than that is
/// refused by the service, and stops the relay at it).
fn requests(batch: &[Outgoing]) -> Vec<&[Outgoing]> {
    let mut requests = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (index, message) in batch.iter().enumerate() {
        let full = index - start == MAX_ENTRIES_PER_SEND
            || bytes + message.body.len() > MAX_BYTES_PER_SEND;
        if full && index > start {
            requests.push(&batch[start..index]);
            start = index;
            bytes = 0;
        }
        bytes += message.body.len();
    }
    if start < batch.len() {
        requests.push(&batch[start..]);
    }
    requests
}

/// Publishes committed events to an SNS FIFO topic or an SQS FIFO queue, in global order,
/// checkpointed after the send: the `cqrs::NatsRelay` of AWS.
///
/// Each run of [`relay_once`](Self::relay_once) reads up to `batch_size` events after the
/// relay's checkpoint and sends them in requests of up to [`MAX_ENTRIES_PER_SEND`] entries
/// and [`MAX_BYTES_PER_SEND`] bytes (`PublishBatch` to a topic, `SendMessageBatch` to a
/// queue), one after the other, then
/// saves the checkpoint at the last one. Each message is the event's
/// [`envelope`](crate::envelope) with
///
/// | field | value |
/// |-------|-------|
/// | `MessageGroupId` | the aggregate, `aggregate_type_id` (`type:id`): order per aggregate |
/// | `MessageDeduplicationId` | the event id |
///
/// When a request fails, or SNS or SQS refuses one of its entries, the checkpoint moves to
/// the last event before the first refused one and the run fails; the next run sends again
/// from there. Entries after the refused one may have been accepted already: sent again
/// within the five minutes of FIFO deduplication they are dropped by their deduplication id,
/// so a consumer sees each event once (and an idempotent consumer, such as
/// [`SqsConsumer`](super::SqsConsumer), applies a later copy once anyway).
///
/// [`start`](Self::start) runs it in the background: catch up, then wait for the store's
/// notification (or poll every `poll_interval` when the store cannot notify, or when another
/// process appends), retrying failures with a backoff.
///
/// A row the store cannot read as an event ([`CQRSError::DamagedRow`]), or an event whose
/// stored payload is not JSON, is published in the damaged form
/// ([`envelope::encode_damaged_row`](crate::envelope::encode_damaged_row)): in its
/// aggregate's group when the row names it (else `cqrs-damaged-row`), deduplicated by its
/// event id when that reads (else `cqrs-damaged-row-{position}`). The relay goes on past it;
/// the consumer applies its poison policy to it, as the NATS relay's consumers do. Any other
/// event whose envelope cannot be written ([`CQRSError::Serialization`]) stops the relay
/// before it, and the handle's [`last_error`](MessagingRelayHandle::last_error) names it.
///
/// ```no_run
/// use cqrs::MemoryCheckpointRepository;
/// use cqrs_aws::messaging::{local_sns_client, MessagingRelay};
/// use cqrs_aws::DynamoDbEventRepository;
///
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// let events = DynamoDbEventRepository::new(cqrs_aws::local_client("http://127.0.0.1:5000"), "events");
/// let sns = local_sns_client("http://127.0.0.1:5000");
/// let topic_arn = "arn:aws:sns:us-east-1:123456789012:events.fifo";
/// let relay = MessagingRelay::to_sns_topic(events, MemoryCheckpointRepository::new(), sns, topic_arn);
/// let published = relay.publish_pending().await?;
/// println!("{published} events published");
///
/// let handle = relay.start(); // follows the store from the checkpoint
/// handle.shutdown().await?;
/// # Ok(())
/// # }
/// ```
pub struct MessagingRelay {
    events: Arc<dyn EventRepository>,
    checkpoints: Arc<dyn CheckpointRepository>,
    destination: Destination,
    name: String,
    batch_size: usize,
    poll_interval: Duration,
    /// Serializes the runs of one relay.
    running: Mutex<()>,
    /// The checkpoint as far as this relay knows it, for its handle.
    progress: watch::Sender<i64>,
    shared: Arc<Shared>,
}

impl fmt::Debug for MessagingRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessagingRelay")
            .field("name", &self.name)
            .field("destination", &self.destination)
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

/// What one relay batch did.
struct Relayed {
    published: usize,
    /// The position of the last one, or the checkpoint when none.
    last: i64,
}

impl MessagingRelay {
    /// A relay from `events` to `destination`, with its checkpoint in `checkpoints` under
    /// [`default_name`](Self::default_name), reading 256 events per batch.
    pub fn new(
        events: impl EventRepository + 'static,
        checkpoints: impl CheckpointRepository + 'static,
        destination: Destination,
    ) -> Self {
        MessagingRelay {
            events: Arc::new(events),
            checkpoints: Arc::new(checkpoints),
            name: Self::default_name(&destination),
            destination,
            batch_size: 256,
            poll_interval: Duration::from_millis(500),
            running: Mutex::new(()),
            progress: watch::channel(0).0,
            shared: Arc::new(Shared::default()),
        }
    }

    /// A relay to the SNS topic `topic_arn` ([`Destination::SnsTopic`]).
    pub fn to_sns_topic(
        events: impl EventRepository + 'static,
        checkpoints: impl CheckpointRepository + 'static,
        client: aws_sdk_sns::Client,
        topic_arn: impl Into<String>,
    ) -> Self {
        let topic_arn = topic_arn.into();
        Self::new(
            events,
            checkpoints,
            Destination::SnsTopic { client, topic_arn },
        )
    }

    /// A relay to the SQS queue at `queue_url` ([`Destination::SqsQueue`]).
    pub fn to_sqs_queue(
        events: impl EventRepository + 'static,
        checkpoints: impl CheckpointRepository + 'static,
        client: aws_sdk_sqs::Client,
        queue_url: impl Into<String>,
    ) -> Self {
        let queue_url = queue_url.into();
        Self::new(
            events,
            checkpoints,
            Destination::SqsQueue { client, queue_url },
        )
    }

    /// The checkpoint name a relay to `destination` uses unless [`with_name`](Self::with_name)
    /// sets another: `sns_relay_<topic name>` or `sqs_relay_<queue name>`.
    ///
    /// ```
    /// # let client = cqrs_aws::messaging::local_sns_client("http://127.0.0.1:5000");
    /// use cqrs_aws::messaging::{Destination, MessagingRelay};
    /// let topic_arn = "arn:aws:sns:us-east-1:123456789012:events.fifo".to_owned();
    /// let destination = Destination::SnsTopic { client, topic_arn };
    /// assert_eq!(MessagingRelay::default_name(&destination), "sns_relay_events.fifo");
    /// ```
    pub fn default_name(destination: &Destination) -> String {
        format!("{}_relay_{}", destination.service(), destination.name())
    }

    /// Uses another checkpoint name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Reads up to `batch_size` events per batch (default 256, at least 1); they are sent
    /// up to [`MAX_ENTRIES_PER_SEND`] entries and [`MAX_BYTES_PER_SEND`] bytes per request.
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

    /// Where this relay publishes.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// The position of the last event known to be sent.
    ///
    /// # Errors
    /// The checkpoint store's error.
    pub async fn position(&self) -> Result<i64, CQRSError> {
        self.checkpoints.load_checkpoint(&self.name).await
    }

    /// Publishes one batch of events after the checkpoint and saves the checkpoint; returns
    /// how many events were published (0 when there was nothing new).
    ///
    /// # Errors
    /// A store error (a row the store cannot read is published in the damaged form, not an
    /// error), [`CQRSError::Serialization`] for an event whose envelope cannot be written, or
    /// [`CQRSError::PersistenceError`] when a request fails or an entry is refused. The
    /// checkpoint then stands after the last event sent before the failure.
    pub async fn relay_once(&self) -> Result<usize, CQRSError> {
        Ok(self.relay_batch().await?.published)
    }

    /// Publishes every event committed so far, batch after batch; returns how many.
    ///
    /// # Errors
    /// What [`relay_once`](Self::relay_once) returns; the batches before the failing one
    /// stay published and checkpointed.
    pub async fn publish_pending(&self) -> Result<usize, CQRSError> {
        Ok(self.catch_up_counting().await?.0)
    }

    /// Publishes every event committed so far; returns the new checkpoint position.
    ///
    /// # Errors
    /// What [`relay_once`](Self::relay_once) returns.
    pub async fn catch_up(&self) -> Result<i64, CQRSError> {
        Ok(self.catch_up_counting().await?.1)
    }

    async fn catch_up_counting(&self) -> Result<(usize, i64), CQRSError> {
        // The highest position the store knows is committed, taken before each read: a short
        // batch below it ended early, so read on.
        let head = self.events.subscribe();
        let mut published = 0;
        loop {
            let known = head.as_ref().map(|head| *head.borrow());
            let relayed = self.relay_batch().await?;
            published += relayed.published;
            let more = relayed.published > 0
                && (relayed.published >= self.batch_size
                    || known.is_none_or(|known| known > relayed.last));
            if !more {
                self.shared.set_live();
                return Ok((published, relayed.last));
            }
        }
    }

    async fn relay_batch(&self) -> Result<Relayed, CQRSError> {
        let _running = self.running.lock().await;
        let from = self.checkpoints.load_checkpoint(&self.name).await?;
        let events = match self.events.read_all(from, self.batch_size).await {
            Ok(events) => events,
            // A row the store cannot read as an event: published in the damaged form, so
            // each consumer meets it as a poison event of its aggregate, and the relay goes on.
            Err(CQRSError::DamagedRow(damage)) if damage.position > from => {
                tracing::error!(
                    relay = %self.name,
                    position = damage.position,
                    error = %damage,
                    "damaged row in the event store; publishing its damaged form"
                );
                return self
                    .send_and_checkpoint(from, vec![Outgoing::damaged_row(&damage)?], None)
                    .await;
            }
            Err(error) => return Err(error),
        };
        let mut batch = Vec::with_capacity(events.len());
        // An event whose envelope cannot be written: the ones before it are sent, then the
        // run fails at it.
        let mut unwritable = None;
        for event in &events {
            match Outgoing::event(event) {
                Ok(message) => batch.push(message),
                Err(error) => {
                    unwritable = Some(error);
                    break;
                }
            }
        }
        self.send_and_checkpoint(from, batch, unwritable).await
    }

    /// Sends `batch` (the messages after checkpoint `from`), saves the checkpoint at the last
    /// one sent, and fails with the send's failure or else with `unwritable`.
    async fn send_and_checkpoint(
        &self,
        from: i64,
        batch: Vec<Outgoing>,
        unwritable: Option<CQRSError>,
    ) -> Result<Relayed, CQRSError> {
        let span = tracing::debug_span!(
            "messaging_relay_batch",
            relay = %self.name,
            destination = %self.destination.name(),
            from = from + 1,
            events = batch.len(),
        );
        let (sent, failure) = self.send_batch(&batch).instrument(span).await;
        let last = sent.checked_sub(1).and_then(|i| batch.get(i));
        if let Some(last) = last {
            self.checkpoints
                .save_checkpoint(Checkpoint {
                    name: self.name.clone(),
                    position: last.position,
                })
                .await?;
            self.progress.send_if_modified(|known| {
                let moved = last.position > *known;
                *known = (*known).max(last.position);
                moved
            });
        }
        if let Some(error) = failure.or(unwritable) {
            return Err(error);
        }
        Ok(Relayed {
            published: sent,
            last: last.map_or(from, |last| last.position),
        })
    }

    /// Sends `batch` in [`requests`]; returns how many of its first
    /// events were sent, and the failure that stopped it.
    async fn send_batch(&self, batch: &[Outgoing]) -> (usize, Option<CQRSError>) {
        let mut sent = 0;
        for chunk in requests(batch) {
            match self.destination.send(chunk).await {
                Ok(None) => sent += chunk.len(),
                Ok(Some((index, reason))) => {
                    let refused = chunk.get(index).map_or("?", |m| m.event_id.as_str());
                    tracing::warn!(event = refused, %reason, "an event was refused; sending again from it");
                    let error = CQRSError::persistence(format!(
                        "{} refused event {refused} (position {}): {reason}",
                        self.destination.name(),
                        chunk.get(index).map_or(0, |m| m.position),
                    ));
                    return (sent + index, Some(error));
                }
                Err(error) => return (sent, Some(error)),
            }
        }
        (sent, None)
    }

    /// Runs the relay in a background task and returns its handle: catches up, then
    /// publishes new events as the store reports them. Failures are retried with a backoff
    /// (up to 5 s) from the checkpoint and shown as the handle's
    /// [`last_error`](MessagingRelayHandle::last_error). Dropping the handle stops the relay.
    #[must_use = "dropping the handle stops the relay"]
    pub fn start(self) -> MessagingRelayHandle {
        let task = Task::spawn(
            self.name.clone(),
            self.progress.subscribe(),
            Arc::clone(&self.shared),
            |stop| self.run_until(stop),
        );
        MessagingRelayHandle { task }
    }

    async fn run_until(self, mut stop: Stop) -> Result<(), CQRSError> {
        let mut changes = self.events.subscribe();
        let mut failures: u32 = 0;
        loop {
            if stop.is_stopped() {
                return Ok(());
            }
            let wait = match self.catch_up().await {
                Ok(position) => {
                    failures = 0;
                    self.shared.set_last_error(None);
                    self.progress.send_if_modified(|known| {
                        let moved = position > *known;
                        *known = (*known).max(position);
                        moved
                    });
                    self.poll_interval
                }
                // A store that offers no global order: no retry changes that.
                Err(error @ CQRSError::Unsupported { .. }) => {
                    tracing::error!(relay = %self.name, %error, "messaging relay cannot follow this store");
                    self.shared.set_last_error(Some(error.to_string()));
                    return Err(error);
                }
                // Nothing the relay meets is skipped: it retries until it can publish.
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(relay = %self.name, %error, retry_in = ?wait, "messaging relay failed; retrying");
                    self.shared.set_last_error(Some(error.to_string()));
                    wait
                }
            };
            if pause(&mut stop, &mut changes, wait).await {
                return Ok(());
            }
        }
    }
}

/// The handle of a relay started with [`MessagingRelay::start`]: the same vocabulary as a
/// `cqrs::NatsRelayHandle`. Dropping it stops the relay.
#[derive(Debug)]
pub struct MessagingRelayHandle {
    task: Task,
}

impl MessagingRelayHandle {
    /// The relay's checkpoint name.
    pub fn name(&self) -> &str {
        self.task.name()
    }

    /// The position of the last event known to be sent (0 until the relay has read its
    /// checkpoint).
    pub fn position(&self) -> i64 {
        self.task.position()
    }

    /// A receiver of the position, updated after every batch sent.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.task.subscribe()
    }

    /// Waits until every event up to `position` is sent (pass a
    /// [`DispatchReceipt`](cqrs::DispatchReceipt)'s last position), for at most `timeout`.
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

    /// The last error the relay met, rendered: a failure it is retrying. `None` when there
    /// was none since its last successful run.
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
