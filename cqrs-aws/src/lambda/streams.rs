//! The DynamoDB Streams handler.

use std::collections::HashMap;
use std::fmt;

use aws_lambda_events::dynamodb::{Event, EventRecord};
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use aws_sdk_dynamodb::types::AttributeValue;
use cqrs::{
    Aggregate, CQRSError, EventOutcome, PerAggregateProjection, PersistableDomainEvent, View,
};
use lambda_runtime::LambdaEvent;

use crate::items::{self, Item, Payloads, Reader};

/// Feeds a view from the stream of a [`DynamoDbEventRepository`](crate::DynamoDbEventRepository)
/// table, one Lambda batch at a time.
///
/// Each record's `NewImage` is read as an event item of the store; the table's other items
/// (event ids, position copies, the position counter, snapshots, and any item whose `kind` is
/// not `event`) are passed over, as are records without a new image (`REMOVE`). An item with
/// no `kind` at all is read as an event when its key is an event's (`pk` an aggregate's key,
/// `sk` a sequence from 1). The events go through the [`PerAggregateProjection`]; the
/// response names the first record (in batch order) that failed, so Lambda delivers the
/// batch again from there, and every record before it is done:
///
/// * an image that is not an event item (an attribute missing or of the wrong type) fails at
///   its record, whatever the poison policy: it needs a repair (the mapping's retry limit and
///   on-failure destination take over if none comes). Every later record of its aggregate
///   fails with the gap it leaves, unless the projection reads the event from the table
///   ([`with_event_store`](PerAggregateProjection::with_event_store)) and the item there is
///   whole. One of another aggregate type than the projection's is passed over;
/// * a payload that is not JSON is a poison event of the projection: under
///   `PoisonPolicy::Stop` it fails at its record, under `SkipAndRecord` it becomes a dead
///   letter and the stream goes on.
///
/// Records of aggregates that did not fail are committed even when they come after the
/// failed record; their redelivery is then covered by their checkpoint.
///
/// ```
/// # use cqrs::doc::{Counter, CounterTotal};
/// use cqrs::{MemoryViewRepository, PerAggregateProjection};
/// use cqrs_aws::lambda::aws_lambda_events::dynamodb::Event;
/// use cqrs_aws::lambda::lambda_runtime::{Context, LambdaEvent};
/// use cqrs_aws::lambda::DynamoDbStreamHandler;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let views = MemoryViewRepository::<CounterTotal>::new();
/// let handler = DynamoDbStreamHandler::new("events", PerAggregateProjection::<Counter, CounterTotal>::new(views));
///
/// // A record of an image that is not an event: its sequence number is the failure.
/// let batch: Event = serde_json::from_value(serde_json::json!({"Records": [{
///     "eventID": "1", "eventName": "INSERT", "awsRegion": "us-east-1",
///     "dynamodb": {
///         "SequenceNumber": "100", "SizeBytes": 10, "StreamViewType": "NEW_IMAGE",
///         "Keys": {"pk": {"S": "counter:x"}, "sk": {"N": "1"}},
///         "NewImage": {"pk": {"S": "counter:x"}, "sk": {"N": "1"}, "kind": {"S": "event"}}
///     }
/// }]}))?;
/// let response = handler.handle(LambdaEvent::new(batch, Context::default())).await?;
/// assert_eq!(response.batch_item_failures[0].item_identifier.as_deref(), Some("100"));
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// # }).unwrap();
/// ```
pub struct DynamoDbStreamHandler<A: Aggregate, V: View<A>> {
    table: String,
    projection: PerAggregateProjection<A, V>,
}

impl<A: Aggregate, V: View<A>> fmt::Debug for DynamoDbStreamHandler<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoDbStreamHandler")
            .field("table", &self.table)
            .field("projection", &self.projection)
            .finish()
    }
}

/// What a record of the stream holds for the projection.
enum Record {
    /// An event item.
    Event(PersistableDomainEvent),
    /// Another item of the table, or a removal: nothing to apply.
    Other,
    /// An image that cannot be read as the event item its key says it is.
    Damaged(CQRSError),
}

impl<A: Aggregate, V: View<A>> DynamoDbStreamHandler<A, V> {
    /// A handler for the stream of `table` (named in messages) that applies its events
    /// through `projection`.
    pub fn new(table: impl Into<String>, projection: PerAggregateProjection<A, V>) -> Self {
        DynamoDbStreamHandler {
            table: table.into(),
            projection,
        }
    }

    /// The projection the events go through (its checkpoints and dead letters).
    pub fn projection(&self) -> &PerAggregateProjection<A, V> {
        &self.projection
    }

    /// Applies a batch of stream records and answers with the first failed record's
    /// `SequenceNumber` in `batch_item_failures` (none when all went through).
    ///
    /// # Errors
    /// Only when a failed record has no `SequenceNumber` to name: Lambda then delivers the
    /// whole batch again.
    pub async fn handle(
        &self,
        event: LambdaEvent<Event>,
    ) -> Result<DynamoDbEventResponse, lambda_runtime::Error> {
        let records = &event.payload.records;
        let read: Vec<Record> = records.iter().map(|record| self.read(record)).collect();
        let events: Vec<PersistableDomainEvent> = read
            .iter()
            .filter_map(|record| match record {
                Record::Event(event) => Some(event.clone()),
                _ => None,
            })
            .collect();
        let mut outcomes = self.projection.apply(&events).await.into_iter();
        let mut first_failure = None;
        for (record, read) in records.iter().zip(read) {
            let error = match read {
                Record::Event(_) => match outcomes.next() {
                    Some(EventOutcome::Failed(error)) => error,
                    _ => continue,
                },
                Record::Damaged(error) => error,
                Record::Other => continue,
            };
            let sequence_number = record.change.sequence_number.as_deref();
            tracing::warn!(
                projection = self.projection.name(),
                table = %self.table,
                record = sequence_number.unwrap_or("?"),
                %error,
                "stream record not applied; Lambda delivers it again"
            );
            first_failure.get_or_insert(sequence_number);
        }
        let mut response = DynamoDbEventResponse::default();
        match first_failure {
            None => {}
            Some(Some(sequence_number)) => {
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = Some(sequence_number.to_owned());
                response.batch_item_failures.push(failure);
            }
            Some(None) => {
                return Err(format!(
                    "a record of the stream of DynamoDB table {} failed and has no \
                     SequenceNumber to report; the whole batch is to be delivered again",
                    self.table
                )
                .into())
            }
        }
        Ok(response)
    }

    /// What `record` holds.
    fn read(&self, record: &EventRecord) -> Record {
        let image = record.change.new_image.inner();
        if image.is_empty() {
            return Record::Other;
        }
        let item: Item = image
            .iter()
            .map(|(name, value)| (name.clone(), AttributeValue::from(value.clone())))
            .collect::<HashMap<_, _>>();
        let r = Reader(&item);
        let is_event = match item.get(items::KIND) {
            Some(AttributeValue::S(kind)) => kind == items::KIND_EVENT,
            // Without a kind, the key says what the item is.
            _ => {
                r.string(items::PK).is_ok_and(|pk| pk.contains(':'))
                    && r.number(items::SK).is_ok_and(|sk| sk >= 1)
            }
        };
        if !is_event {
            return Record::Other;
        }
        match items::decode_event(&self.table, &item, Payloads::AsStored) {
            Ok(event) => Record::Event(event),
            // A damaged item of another aggregate type is passed over, like its events.
            Err(_) if aggregate_type(&item).is_some_and(|t| t != A::NAME) => Record::Other,
            Err(error) => Record::Damaged(error),
        }
    }
}

/// The aggregate type of an event item, as far as it can be read: its attribute, or else
/// the part of its partition key before the `:`.
fn aggregate_type(item: &Item) -> Option<&str> {
    let string = |name: &str| match item.get(name) {
        Some(AttributeValue::S(value)) => Some(value.as_str()),
        _ => None,
    };
    string(items::AGGREGATE_TYPE).or_else(|| {
        string(items::PK)?
            .split_once(':')
            .map(|(aggregate_type, _)| aggregate_type)
    })
}
