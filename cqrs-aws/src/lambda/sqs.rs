//! The SQS handler.

use std::fmt;

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use cqrs::{Aggregate, PerAggregateProjection, View};
use lambda_runtime::LambdaEvent;

use crate::sqs_batch::{self, Delivered, Verdict};

/// The message attribute that names a FIFO message's group.
const MESSAGE_GROUP_ID: &str = "MessageGroupId";

/// Feeds a view from SQS messages whose bodies are event [`envelope`](crate::envelope)s (straight, or in the
/// notification of an SNS subscription), one Lambda batch at a time.
///
/// The events go through the [`PerAggregateProjection`] (one checkpoint per aggregate, so a
/// message delivered twice, as a standard queue may, is applied once). The response lists
/// every message that failed: a body that is not an envelope, or an event the projection
/// failed. From a FIFO queue (an `eventSourceARN` ending in `.fifo`) it also lists every
/// message after a failed one in the same message group, so that the group is delivered
/// again in order from the failure.
///
/// A body in the damaged form ([`envelope::encode_damaged_row`](crate::envelope::encode_damaged_row),
/// what `MessagingRelay` publishes for a store row it cannot read) is a poison event of its
/// aggregate ([`PerAggregateProjection::apply_damaged`]): a dead letter under
/// `SkipAndRecord`, a failure under `Stop`. A body that is neither names no aggregate or
/// sequence, so no checkpoint can pass it: it fails under either poison policy, and the
/// queue's redrive policy (`maxReceiveCount`, then its dead-letter queue) ends its
/// redeliveries.
///
/// ```
/// # use cqrs::doc::{Counter, CounterEvent, CounterTotal};
/// use cqrs::{MemoryViewRepository, PerAggregateProjection, PersistableDomainEvent};
/// use cqrs_aws::lambda::aws_lambda_events::sqs::SqsEvent;
/// use cqrs_aws::lambda::lambda_runtime::{Context, LambdaEvent};
/// use cqrs_aws::lambda::SqsHandler;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let views = MemoryViewRepository::<CounterTotal>::new();
/// let handler = SqsHandler::new(PerAggregateProjection::<Counter, CounterTotal>::new(views));
///
/// let id = uuid::Uuid::new_v4();
/// let mut event = PersistableDomainEvent::new("counter", id, 1, &CounterEvent::Incremented { by: 3 }, serde_json::Value::Null)?;
/// event.position = 1;
/// let batch: SqsEvent = serde_json::from_value(serde_json::json!({"Records": [
///     {"messageId": "m1", "body": cqrs_aws::envelope::encode(&event)?},
///     {"messageId": "m2", "body": "not an envelope"},
/// ]}))?;
/// let response = handler.handle(LambdaEvent::new(batch, Context::default())).await?;
/// assert_eq!(response.batch_item_failures.len(), 1);
/// assert_eq!(response.batch_item_failures[0].item_identifier, "m2");
/// assert_eq!(handler.projection().sequence(id).await?, 1);
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// # }).unwrap();
/// ```
pub struct SqsHandler<A: Aggregate, V: View<A>> {
    projection: PerAggregateProjection<A, V>,
}

impl<A: Aggregate, V: View<A>> fmt::Debug for SqsHandler<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsHandler")
            .field("projection", &self.projection)
            .finish()
    }
}

impl<A: Aggregate, V: View<A>> SqsHandler<A, V> {
    /// A handler that applies the messages' events through `projection`.
    pub fn new(projection: PerAggregateProjection<A, V>) -> Self {
        SqsHandler { projection }
    }

    /// The projection the events go through (its checkpoints and dead letters).
    pub fn projection(&self) -> &PerAggregateProjection<A, V> {
        &self.projection
    }

    /// Applies a batch of messages and answers with the failed ones (and, from a FIFO queue,
    /// every later message of their groups) in `batch_item_failures`.
    ///
    /// # Errors
    /// Only when a message to report has no `messageId`: Lambda then delivers the whole
    /// batch again.
    pub async fn handle(
        &self,
        event: LambdaEvent<SqsEvent>,
    ) -> Result<SqsBatchResponse, lambda_runtime::Error> {
        let messages = &event.payload.records;
        let delivered: Vec<Delivered<'_>> = messages
            .iter()
            .map(|message| {
                let fifo = message
                    .event_source_arn
                    .as_deref()
                    .is_some_and(|arn| arn.ends_with(".fifo"));
                Delivered {
                    body: message.body.as_deref().unwrap_or_default(),
                    group: message
                        .attributes
                        .get(MESSAGE_GROUP_ID)
                        .map(String::as_str)
                        .filter(|_| fifo),
                }
            })
            .collect();
        let verdicts = sqs_batch::apply(&self.projection, &delivered).await;
        let mut response = SqsBatchResponse::default();
        for ((message, delivered), verdict) in messages.iter().zip(&delivered).zip(verdicts) {
            let message_id = message.message_id.as_deref();
            let group = delivered.group.unwrap_or("");
            match verdict {
                Verdict::Done(_) => continue,
                Verdict::Failed(error) => tracing::warn!(
                    projection = self.projection.name(),
                    message = message_id.unwrap_or("?"),
                    group,
                    %error,
                    "message not applied; SQS delivers it again"
                ),
                Verdict::HeldBack => tracing::debug!(
                    projection = self.projection.name(),
                    message = message_id.unwrap_or("?"),
                    group,
                    "message after a failed one of its group; SQS delivers it again"
                ),
            }
            let Some(message_id) = message_id else {
                return Err(
                    "a failed SQS message has no messageId to report; the whole \
                            batch is to be delivered again"
                        .into(),
                );
            };
            response.add_failure(message_id);
        }
        Ok(response)
    }
}
