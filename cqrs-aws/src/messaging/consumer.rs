//! The SQS consumer: a long-running poller that feeds a view from a queue.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use cqrs::{Aggregate, CQRSError, EventOutcome, PerAggregateProjection, View};
use tokio::sync::watch;

use super::task::{backoff, pause, Shared, Stop, Task};
use super::MAX_ENTRIES_PER_SEND;
use crate::sqs_batch::{self, Delivered, Verdict};

/// Feeds a view from an SQS queue whose messages are event [`envelope`](crate::envelope)s
/// (straight, or in the notification of an SNS subscription without raw delivery), outside
/// Lambda: a poller for a container or a server.
///
/// Each [`poll_once`](Self::poll_once) receives up to ten messages, applies their events
/// through the [`PerAggregateProjection`] (one checkpoint per aggregate, committed with the
/// view changes), then deletes the messages whose events were committed or skipped. A
/// message that failed (a body that is not an envelope, an event the projection failed) is
/// left in the queue and reported: SQS delivers it again once its visibility timeout has
/// passed, and after `maxReceiveCount` deliveries moves it to the queue's dead-letter queue
/// when the queue has a redrive policy. From a FIFO queue (a URL ending in `.fifo`) the
/// later messages of a failed message's group are left too, so that the group is delivered
/// again in order from the failure.
///
/// A message delivered twice (a standard queue may; a delete that did not arrive) finds its
/// aggregate's checkpoint past it and is skipped: each event is applied once.
///
/// A message in the damaged form (a store row [`MessagingRelay`](super::MessagingRelay)
/// could not read as an event) is a poison event of its aggregate
/// ([`PerAggregateProjection::apply_damaged`]): under `SkipAndRecord` a dead letter, and the
/// message is deleted; under `Stop` a failure, left in the queue like any other.
///
/// ```no_run
/// # use cqrs::doc::{Counter, CounterTotal};
/// use cqrs::{MemoryViewRepository, PerAggregateProjection};
/// use cqrs_aws::messaging::{local_sqs_client, SqsConsumer};
///
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// let views = MemoryViewRepository::<CounterTotal>::new();
/// let projection = PerAggregateProjection::<Counter, CounterTotal>::new(views);
/// let queue_url = "http://127.0.0.1:5000/123456789012/counter-view.fifo";
/// let consumer = SqsConsumer::new(local_sqs_client("http://127.0.0.1:5000"), queue_url, projection);
/// let polled = consumer.poll_once().await?;
/// println!("{} committed, {} left for redelivery", polled.committed, polled.failed.len());
///
/// let handle = consumer.start(); // polls until stopped
/// handle.shutdown().await?;
/// # Ok(())
/// # }
/// ```
pub struct SqsConsumer<A: Aggregate, V: View<A>> {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    projection: PerAggregateProjection<A, V>,
    wait_time: Duration,
    max_messages: i32,
    visibility_timeout: Option<Duration>,
    idle_interval: Duration,
    handled: watch::Sender<i64>,
    shared: Arc<Shared>,
}

impl<A: Aggregate, V: View<A>> fmt::Debug for SqsConsumer<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsConsumer")
            .field("queue_url", &self.queue_url)
            .field("projection", &self.projection)
            .field("wait_time", &self.wait_time)
            .field("max_messages", &self.max_messages)
            .field("visibility_timeout", &self.visibility_timeout)
            .finish_non_exhaustive()
    }
}

/// What one [`SqsConsumer::poll_once`] did.
#[derive(Debug, Default)]
pub struct Polled {
    /// Messages received.
    pub received: usize,
    /// Messages whose event was applied and committed (then deleted).
    pub committed: usize,
    /// Messages passed over and deleted: an event the checkpoint already covers (a
    /// redelivery), of another aggregate type, or dead-lettered.
    pub skipped: usize,
    /// Messages left in the queue for redelivery.
    pub failed: Vec<FailedMessage>,
}

/// A message an [`SqsConsumer`] left in the queue.
#[derive(Debug)]
pub struct FailedMessage {
    /// The message's SQS id.
    pub message_id: String,
    /// Why: the decoding or projection error; `None` for a message held back behind a failed
    /// one of its FIFO group.
    pub error: Option<CQRSError>,
}

impl<A: Aggregate, V: View<A>> SqsConsumer<A, V> {
    /// A consumer of the queue at `queue_url` that applies its messages' events through
    /// `projection`. It long-polls for 20 s (the most SQS allows) and takes up to ten
    /// messages per receive.
    pub fn new(
        client: aws_sdk_sqs::Client,
        queue_url: impl Into<String>,
        projection: PerAggregateProjection<A, V>,
    ) -> Self {
        SqsConsumer {
            client,
            queue_url: queue_url.into(),
            projection,
            wait_time: Duration::from_secs(20),
            max_messages: 10,
            visibility_timeout: None,
            idle_interval: Duration::from_millis(500),
            handled: watch::channel(0).0,
            shared: Arc::new(Shared::default()),
        }
    }

    /// How long a receive waits for messages (`WaitTimeSeconds`, whole seconds up to 20;
    /// default 20). 0 answers at once: the background consumer then waits
    /// [`with_idle_interval`](Self::with_idle_interval) after an empty receive.
    #[must_use]
    pub fn with_wait_time(mut self, wait_time: Duration) -> Self {
        self.wait_time = wait_time.min(Duration::from_secs(20));
        self
    }

    /// Receives up to `messages` per call (1 to 10; default 10).
    #[must_use]
    pub fn with_max_messages(mut self, messages: usize) -> Self {
        self.max_messages = i32::try_from(messages.clamp(1, MAX_ENTRIES_PER_SEND)).unwrap_or(10);
        self
    }

    /// The visibility timeout asked for the received messages (whole seconds), in place of
    /// the queue's: how long a failed message stays hidden before SQS delivers it again.
    #[must_use]
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = Some(timeout);
        self
    }

    /// How long the background consumer waits after an empty receive when the wait time is
    /// 0 (default 500 ms).
    #[must_use]
    pub fn with_idle_interval(mut self, interval: Duration) -> Self {
        self.idle_interval = interval;
        self
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// The projection the events go through (its checkpoints and dead letters).
    pub fn projection(&self) -> &PerAggregateProjection<A, V> {
        &self.projection
    }

    /// Receives one batch of messages, applies their events and deletes the messages that
    /// are done with (committed or skipped); says what became of them.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the receive or the delete fails (the messages
    /// not deleted come again and are skipped then).
    pub async fn poll_once(&self) -> Result<Polled, CQRSError> {
        let mut request = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(self.max_messages)
            .wait_time_seconds(seconds(self.wait_time))
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId);
        if let Some(timeout) = self.visibility_timeout {
            request = request.visibility_timeout(seconds(timeout));
        }
        let received = request
            .send()
            .await
            .map_err(|error| self.error("ReceiveMessage", &DisplayErrorContext(error)))?;
        let messages = received.messages();
        let fifo = self.queue_url.ends_with(".fifo");
        let delivered: Vec<Delivered<'_>> = messages
            .iter()
            .map(|message| Delivered {
                body: message.body().unwrap_or_default(),
                group: message
                    .attributes()
                    .and_then(|attributes| {
                        attributes.get(&MessageSystemAttributeName::MessageGroupId)
                    })
                    .map(String::as_str)
                    .filter(|_| fifo),
            })
            .collect();
        let verdicts = sqs_batch::apply(&self.projection, &delivered).await;
        let mut polled = Polled {
            received: messages.len(),
            ..Polled::default()
        };
        let mut done = Vec::new();
        for (message, verdict) in messages.iter().zip(verdicts) {
            let message_id = message.message_id().unwrap_or_default().to_owned();
            match verdict {
                Verdict::Done(outcome) => {
                    if outcome == EventOutcome::Committed {
                        polled.committed += 1;
                    } else {
                        polled.skipped += 1;
                    }
                    if let Some(receipt) = message.receipt_handle() {
                        done.push(receipt);
                    }
                }
                Verdict::Failed(error) => {
                    tracing::warn!(
                        projection = self.projection.name(),
                        queue = %self.queue_url,
                        message = %message_id,
                        %error,
                        "message not applied; left in the queue for redelivery"
                    );
                    polled.failed.push(FailedMessage {
                        message_id,
                        error: Some(error),
                    });
                }
                Verdict::HeldBack => polled.failed.push(FailedMessage {
                    message_id,
                    error: None,
                }),
            }
        }
        self.delete(&done).await?;
        let handled = polled.committed + polled.skipped;
        if handled > 0 {
            self.handled.send_modify(|count| {
                *count = count.saturating_add(i64::try_from(handled).unwrap_or(i64::MAX));
            });
        }
        Ok(polled)
    }

    /// Deletes the messages of `receipts`, ten per request.
    async fn delete(&self, receipts: &[&str]) -> Result<(), CQRSError> {
        for chunk in receipts.chunks(MAX_ENTRIES_PER_SEND) {
            let mut request = self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url);
            for (index, receipt) in chunk.iter().enumerate() {
                request = request.entries(
                    DeleteMessageBatchRequestEntry::builder()
                        .id(index.to_string())
                        .receipt_handle(*receipt)
                        .build()
                        .map_err(|error| self.error("DeleteMessageBatch", &error))?,
                );
            }
            let output = request
                .send()
                .await
                .map_err(|error| self.error("DeleteMessageBatch", &DisplayErrorContext(error)))?;
            if let Some(failed) = output.failed().first() {
                return Err(self.error(
                    "DeleteMessageBatch",
                    &format!(
                        "{} of {} entries refused, the first: {}: {}",
                        output.failed().len(),
                        chunk.len(),
                        failed.code(),
                        failed.message().unwrap_or("")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn error(&self, operation: &str, error: &dyn fmt::Display) -> CQRSError {
        CQRSError::persistence(format!(
            "SQS {operation} on {} failed: {error}",
            self.queue_url
        ))
    }

    /// Runs the consumer in a background task and returns its handle: polls until stopped,
    /// retrying failures of SQS or the view store with a backoff (up to 5 s), shown as the
    /// handle's [`last_error`](SqsConsumerHandle::last_error). Dropping the handle stops the
    /// consumer.
    #[must_use = "dropping the handle stops the consumer"]
    pub fn start(self) -> SqsConsumerHandle {
        let task = Task::spawn(
            self.projection.name().to_owned(),
            self.handled.subscribe(),
            Arc::clone(&self.shared),
            |stop| self.run_until(stop),
        );
        SqsConsumerHandle { task }
    }

    async fn run_until(self, mut stop: Stop) -> Result<(), CQRSError> {
        let mut failures: u32 = 0;
        let mut no_changes = None;
        loop {
            if stop.is_stopped() {
                return Ok(());
            }
            let polled = tokio::select! {
                polled = self.poll_once() => polled,
                () = stop.stopped() => return Ok(()),
            };
            let wait = match polled {
                Ok(polled) => {
                    failures = 0;
                    self.shared.set_live();
                    if polled.received > 0 || !self.wait_time.is_zero() {
                        continue;
                    }
                    self.idle_interval
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(queue = %self.queue_url, %error, retry_in = ?wait, "SQS consumer failed; retrying");
                    self.shared.set_last_error(Some(error.to_string()));
                    wait
                }
            };
            if pause(&mut stop, &mut no_changes, wait).await {
                return Ok(());
            }
        }
    }
}

/// Whole seconds, as SQS takes them.
fn seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)
}

/// The handle of a consumer started with [`SqsConsumer::start`]: the vocabulary of the other
/// handles. Dropping it stops the consumer.
#[derive(Debug)]
pub struct SqsConsumerHandle {
    task: Task,
}

impl SqsConsumerHandle {
    /// The projection's name.
    pub fn name(&self) -> &str {
        self.task.name()
    }

    /// How many messages the consumer has committed or skipped, and deleted.
    pub fn handled(&self) -> i64 {
        self.task.position()
    }

    /// Waits until the consumer has committed or skipped `messages` messages, for at most
    /// `timeout`.
    ///
    /// # Errors
    /// [`CQRSError::Timeout`]; [`CQRSError::ProjectionStopped`] when the consumer ended first.
    pub async fn wait_for(&self, messages: i64, timeout: Duration) -> Result<i64, CQRSError> {
        self.task.wait_for(messages, timeout).await
    }

    /// True once the consumer has received from the queue once.
    pub fn is_live(&self) -> bool {
        self.task.is_live()
    }

    /// True when the consumer has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The last error the consumer met, rendered (a failure it retries), or `None`.
    pub fn last_error(&self) -> Option<String> {
        self.task.last_error()
    }

    /// Asks the consumer to stop (a receive in progress is abandoned: its messages come
    /// again after their visibility timeout).
    pub fn stop(&self) {
        self.task.stop();
    }

    /// Waits for the consumer to end.
    ///
    /// # Errors
    /// None: the consumer retries every failure until it is stopped. The `Result` matches
    /// the other handles'.
    pub async fn wait(self) -> Result<(), CQRSError> {
        self.task.wait().await
    }

    /// [`stop`](Self::stop), then [`wait`](Self::wait).
    ///
    /// # Errors
    /// As [`wait`](Self::wait).
    pub async fn shutdown(self) -> Result<(), CQRSError> {
        self.stop();
        self.wait().await
    }
}
