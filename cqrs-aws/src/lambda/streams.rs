//! The DynamoDB Streams handler.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use aws_lambda_events::dynamodb::{Event, EventRecord};
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use aws_sdk_dynamodb::types::AttributeValue;
use cqrs::{
    Aggregate, CQRSError, DamagedRow, EventOutcome, PerAggregateProjection, PersistableDomainEvent,
    View,
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
/// * an image that is not an event item (an attribute missing or of the wrong type) is a
///   poison event at its place in its aggregate, handed to
///   [`PerAggregateProjection::apply_damaged`] after the aggregate's events before it: under
///   `PoisonPolicy::Stop` it fails at its record (a repair, written as a new record, or the
///   mapping's retry limit and on-failure destination take over), under `SkipAndRecord` it
///   becomes a dead letter (naming the table, the record's `SequenceNumber`, the aggregate
///   and sequence from the item's key, and the error), the aggregate's checkpoint moves past
///   it and the stream goes on; delivered again, the checkpoint covers it, so it is recorded
///   once. Its aggregate and sequence come from the key (`pk` = `"{type}:{id}"`, `sk` the
///   sequence): when the key does not name them, nothing says which checkpoint the record
///   could move, so it fails at its record whatever the policy. The letter is kept under the
///   item's `position` (when that does not read, or on a store without a global order,
///   under [`cqrs::DeadLetter::key_without_position`]). After a failed damaged record,
///   every later record of its aggregate fails with the gap it leaves. One of another
///   aggregate type than the projection's is passed over;
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
    /// An image that cannot be read as the event item its key says it is: what could be read
    /// of it when its key names an aggregate and a sequence, and the error.
    Damaged(Option<DamagedRow>, CQRSError),
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
        let errors = self.apply(read).await;
        let mut first_failure = None;
        for (record, error) in records.iter().zip(errors) {
            let Some(error) = error else { continue };
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
            Err(error) => {
                let damage = self.damage(record, &item, &error);
                Record::Damaged(damage, error)
            }
        }
    }

    /// What can be read of a damaged event item: its aggregate and sequence from its key
    /// (`pk` = `"{type}:{id}"`, `sk` = the sequence), the rest from its attributes where they
    /// read, and a problem that names the table and the stream record. `None` when the key
    /// names no aggregate of this projection's type and sequence.
    fn damage(&self, record: &EventRecord, item: &Item, error: &CQRSError) -> Option<DamagedRow> {
        let r = Reader(item);
        let (aggregate_type, aggregate_id) = r.string(items::PK).ok()?.split_once(':')?;
        let aggregate_id = uuid::Uuid::parse_str(aggregate_id).ok()?;
        let sequence = r.number(items::SK).ok().filter(|&sk| sk >= 1)?;
        if aggregate_type != A::NAME {
            return None;
        }
        let problem = match error {
            CQRSError::PersistenceError(source) => source.to_string(),
            other => format!(
                "{other} (in DynamoDB table {}, item {})",
                self.table,
                r.key_text()
            ),
        };
        Some(DamagedRow {
            // An item whose position does not read has none (0): the projection keeps its
            // letter under a key of its aggregate and sequence.
            position: r.number(items::POSITION).unwrap_or(0),
            event_id: r.uuid(items::EVENT_ID).ok(),
            aggregate_type: Some(aggregate_type.to_owned()),
            aggregate_id: Some(aggregate_id),
            sequence: Some(sequence),
            event_type: r.string(items::EVENT_TYPE).ok().map(str::to_owned),
            event_version: r.string(items::EVENT_VERSION).ok().map(str::to_owned),
            problem: format!(
                "{problem}; stream record {} of DynamoDB table {}",
                record.change.sequence_number.as_deref().unwrap_or("?"),
                self.table
            ),
        })
    }

    /// Applies the records read from a batch and says, per record in the batch's order, why
    /// it failed (`None`: applied or passed over).
    ///
    /// The events go through the projection in rounds: each round applies every event not
    /// applied yet that comes before its aggregate's first damaged record still pending,
    /// then hands each such damaged record to
    /// [`PerAggregateProjection::apply_damaged`], so that a damaged record is decided after
    /// the events before it and before the events after it. After a damaged record that
    /// fails, the later records of its aggregate fail with it.
    async fn apply(&self, mut read: Vec<Record>) -> Vec<Option<CQRSError>> {
        let mut errors: Vec<Option<CQRSError>> = read.iter().map(|_| None).collect();
        // The damaged records whose key names no aggregate fail with their own error.
        for (index, record) in read.iter_mut().enumerate() {
            if matches!(record, Record::Damaged(None, _)) {
                if let Record::Damaged(None, error) = std::mem::replace(record, Record::Other) {
                    errors[index] = Some(error);
                }
            }
        }
        // The damaged records whose key names an aggregate, per aggregate in sequence order.
        let mut damaged: HashMap<uuid::Uuid, BTreeMap<i64, usize>> = HashMap::new();
        let mut todo: Vec<usize> = Vec::new();
        for (index, record) in read.iter().enumerate() {
            match record {
                Record::Event(_) => todo.push(index),
                Record::Damaged(Some(damage), _) => {
                    if let (Some(id), Some(sequence)) = (damage.aggregate_id, damage.sequence) {
                        damaged.entry(id).or_default().insert(sequence, index);
                    }
                }
                Record::Damaged(None, _) | Record::Other => {}
            }
        }
        // Aggregates stopped at a damaged record, from the sequence after it.
        let mut stopped: HashMap<uuid::Uuid, i64> = HashMap::new();
        loop {
            let barrier = |event: &PersistableDomainEvent| {
                damaged
                    .get(&event.aggregate_id)
                    .and_then(|pending| pending.keys().next().copied())
                    .filter(|_| event.aggregate_type == A::NAME)
            };
            let (now, later): (Vec<usize>, Vec<usize>) = todo.iter().partition(|&&index| {
                let Record::Event(event) = &read[index] else {
                    return false;
                };
                barrier(event).is_none_or(|at| event.sequence < at)
            });
            let events: Vec<PersistableDomainEvent> = now
                .iter()
                .filter_map(|&index| match &read[index] {
                    Record::Event(event) => Some(event.clone()),
                    _ => None,
                })
                .collect();
            let mut apply = Vec::new();
            let mut held = Vec::new();
            for (index, event) in now.iter().zip(events) {
                match stopped.get(&event.aggregate_id) {
                    Some(&after) if event.aggregate_type == A::NAME && event.sequence > after => {
                        held.push((*index, event))
                    }
                    _ => apply.push((*index, event)),
                }
            }
            for (index, event) in held {
                errors[index] = Some(CQRSError::SequenceGap {
                    aggregate_type: A::NAME.to_owned(),
                    aggregate_id: event.aggregate_id,
                    expected_sequence: stopped.get(&event.aggregate_id).copied().unwrap_or(0),
                    found_sequence: event.sequence,
                });
            }
            let batch: Vec<PersistableDomainEvent> =
                apply.iter().map(|(_, event)| event.clone()).collect();
            let outcomes = self.projection.apply(&batch).await;
            for ((index, _), outcome) in apply.iter().zip(outcomes) {
                if let EventOutcome::Failed(error) = outcome {
                    errors[*index] = Some(error);
                }
            }
            todo = later;
            if damaged.is_empty() {
                break;
            }
            // The first pending damaged record of each aggregate.
            let mut next: Vec<(uuid::Uuid, i64, usize)> = damaged
                .iter()
                .filter_map(|(&id, pending)| {
                    pending
                        .iter()
                        .next()
                        .map(|(&sequence, &index)| (id, sequence, index))
                })
                .collect();
            next.sort_by_key(|&(_, _, index)| index);
            for (id, sequence, index) in next {
                if let Some(pending) = damaged.get_mut(&id) {
                    pending.remove(&sequence);
                    if pending.is_empty() {
                        damaged.remove(&id);
                    }
                }
                if let Some(&after) = stopped.get(&id) {
                    errors[index] = Some(CQRSError::SequenceGap {
                        aggregate_type: A::NAME.to_owned(),
                        aggregate_id: id,
                        expected_sequence: after,
                        found_sequence: sequence,
                    });
                    continue;
                }
                let Record::Damaged(Some(damage), _) = &read[index] else {
                    continue;
                };
                if let EventOutcome::Failed(error) = self.projection.apply_damaged(damage).await {
                    errors[index] = Some(error);
                    stopped.insert(id, sequence);
                }
            }
        }
        errors
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
