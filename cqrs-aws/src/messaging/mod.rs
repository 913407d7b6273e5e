//! Events over SNS and SQS: a relay that publishes committed events to an SNS FIFO topic or
//! an SQS FIFO queue, and a consumer that feeds a view from an SQS queue outside Lambda.
//!
//! * [`MessagingRelay`]: reads the store in global order after its checkpoint (any
//!   [`EventRepository`](cqrs::EventRepository), any
//!   [`CheckpointRepository`](cqrs::CheckpointRepository)), sends each event as its
//!   [`envelope`](crate::envelope) with `MessageGroupId` = the aggregate and
//!   `MessageDeduplicationId` = the event id, and moves the checkpoint after the send:
//!   `cqrs::NatsRelay`'s shape, for AWS.
//! * [`SqsConsumer`]: receives, applies through the
//!   [`PerAggregateProjection`](cqrs::PerAggregateProjection) (the engine of the Lambda SQS
//!   handler), deletes what is done with, leaves failures for redelivery.
//!
//! Published at least once, applied once per aggregate checkpoint: effectively once. The
//! design, its ordering and its deduplication window: `docs/adr/0016-sns-sqs-publishing.md`.
//!
//! A topic fanned out to two views, each with its queue:
//!
//! ```no_run
//! # use cqrs::doc::{Counter, CounterTotal};
//! use cqrs::{MemoryViewRepository, PerAggregateProjection};
//! use cqrs_aws::messaging::{local_sns_client, local_sqs_client, MessagingRelay, SqsConsumer};
//! use cqrs_aws::{DynamoDbCheckpointRepository, DynamoDbEventRepository};
//!
//! # async fn run() -> Result<(), cqrs::CQRSError> {
//! let endpoint = "http://127.0.0.1:5000";
//! let dynamodb = cqrs_aws::local_client(endpoint);
//! let events = DynamoDbEventRepository::new(dynamodb.clone(), "events");
//! let checkpoints = DynamoDbCheckpointRepository::new(dynamodb, "views");
//! // A FIFO topic; each queue subscribed to it with raw message delivery.
//! let topic_arn = "arn:aws:sns:us-east-1:123456789012:events.fifo";
//! let relay = MessagingRelay::to_sns_topic(events, checkpoints, local_sns_client(endpoint), topic_arn)
//!     .start();
//!
//! let projection = PerAggregateProjection::<Counter, CounterTotal>::new(MemoryViewRepository::new());
//! let queue_url = "http://127.0.0.1:5000/123456789012/totals.fifo";
//! let consumer = SqsConsumer::new(local_sqs_client(endpoint), queue_url, projection).start();
//! // ...
//! relay.shutdown().await?;
//! consumer.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod consumer;
mod relay;
mod task;

pub use consumer::{FailedMessage, Polled, SqsConsumer, SqsConsumerHandle};
pub use relay::{
    Destination, MessagingRelay, MessagingRelayHandle, MAX_BYTES_PER_SEND, MAX_ENTRIES_PER_SEND,
};

/// The SNS SDK the relay is written for, re-exported so that an application names the same
/// version of its client.
#[doc(no_inline)]
pub use aws_sdk_sns;
/// The SQS SDK the relay and the consumer are written for, re-exported for the same reason.
#[doc(no_inline)]
pub use aws_sdk_sqs;

/// An SNS client for a local emulator at `endpoint_url`, set up as
/// [`local_client`](crate::local_client) (region `us-east-1`, static test credentials,
/// rustls with ring). Against AWS, build it from the environment
/// (`aws_sdk_sns::Client::new(&aws_config::load_from_env().await)`).
///
/// ```
/// let sns = cqrs_aws::messaging::local_sns_client("http://127.0.0.1:5000");
/// # drop(sns);
/// ```
pub fn local_sns_client(endpoint_url: &str) -> aws_sdk_sns::Client {
    let config = aws_sdk_sns::Config::builder()
        .behavior_version(aws_sdk_sns::config::BehaviorVersion::latest())
        .http_client(crate::local_http_client())
        .endpoint_url(endpoint_url)
        .region(aws_sdk_sns::config::Region::new(crate::LOCAL_REGION))
        .credentials_provider(crate::local_credentials())
        .build();
    aws_sdk_sns::Client::from_conf(config)
}

/// An SQS client for a local emulator at `endpoint_url`, set up as
/// [`local_client`](crate::local_client). Against AWS, build it from the environment
/// (`aws_sdk_sqs::Client::new(&aws_config::load_from_env().await)`).
///
/// ```
/// let sqs = cqrs_aws::messaging::local_sqs_client("http://127.0.0.1:5000");
/// # drop(sqs);
/// ```
pub fn local_sqs_client(endpoint_url: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .http_client(crate::local_http_client())
        .endpoint_url(endpoint_url)
        .region(aws_sdk_sqs::config::Region::new(crate::LOCAL_REGION))
        .credentials_provider(crate::local_credentials())
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}
