//! [`DynamoDbDeadLetters`]: skipped events in a view table, recorded in the transaction that
//! moves the checkpoint past them.

use std::sync::Arc;

use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
use aws_sdk_dynamodb::Client;
use chrono::{DateTime, Utc};
use cqrs::{CQRSError, DeadLetter, DeadLetterSkip, DeadLetters};

use crate::checkpoints::checkpoint_item;
use crate::items::{
    self, damaged, dead_letter_pk, key, n, s, Item, Reader, KIND, KIND_DEAD_LETTER, PK, SK,
};
use crate::transact::{transact_write, Outcome};
use crate::{build_error, sdk_error};

/// A durable [`DeadLetters`] sink in a view table (see
/// [`ensure_view_table`](crate::ensure_view_table)), for
/// [`PoisonPolicy::SkipAndRecord`](cqrs::PoisonPolicy::SkipAndRecord).
///
/// A letter is the item `$dead#{projection}` / position: one per (projection, position), so
/// a record of the same letter again replaces it, and [`list`](DeadLetters::list) is one
/// strongly consistent `Query` in position order.
///
/// [`record_and_skip`](DeadLetters::record_and_skip) writes the letter and the projection's
/// checkpoint (the item [`DynamoDbViewRepository`](crate::DynamoDbViewRepository) commits)
/// in one `TransactWriteItems`, the checkpoint conditioned on still being at `from`: with
/// views in the same table the letter is recorded **exactly once**, crash or retry.
///
/// ```no_run
/// # use cqrs::doc::{Counter, CounterTotal};
/// use cqrs::{CQRSError, PoisonPolicy, Projection};
/// use cqrs_aws::{DynamoDbDeadLetters, DynamoDbEventRepository, DynamoDbViewRepository};
///
/// # async fn run() -> Result<(), CQRSError> {
/// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
/// let events = DynamoDbEventRepository::new(client.clone(), "events");
/// let views = DynamoDbViewRepository::<CounterTotal>::new(client.clone(), "views");
/// let projection = Projection::<Counter, CounterTotal>::new(events, views)
///     .with_poison_policy(PoisonPolicy::SkipAndRecord)
///     .with_dead_letters(DynamoDbDeadLetters::new(client, "views"));
/// projection.catch_up().await?;
/// for letter in projection.dead_letters().await? {
///     eprintln!("skipped {} #{}: {}", letter.aggregate_id, letter.sequence, letter.error);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DynamoDbDeadLetters {
    client: Client,
    table: Arc<str>,
}

impl std::fmt::Debug for DynamoDbDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbDeadLetters")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl DynamoDbDeadLetters {
    /// Dead letters in `table`, through `client`: the view table of the projections that
    /// skip them, for `record_and_skip` to be exactly once.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoDbDeadLetters {
            client,
            table: Arc::from(table.into()),
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }
}

/// The item of `letter`.
fn letter_item(letter: &DeadLetter) -> Item {
    let mut item = key(dead_letter_pk(&letter.projection), letter.position);
    let attributes = [
        (KIND, s(KIND_DEAD_LETTER)),
        (items::PROJECTION, s(letter.projection.as_str())),
        (items::POSITION, n(letter.position)),
        (items::VIEW_NAME, s(letter.view.as_str())),
        (items::EVENT_ID, s(letter.event_id.hyphenated().to_string())),
        (items::AGGREGATE_TYPE, s(letter.aggregate_type.as_str())),
        (
            items::AGGREGATE_ID,
            s(letter.aggregate_id.hyphenated().to_string()),
        ),
        (items::SEQUENCE, n(letter.sequence)),
        (items::EVENT_TYPE, s(letter.event_type.as_str())),
        (items::EVENT_VERSION, s(letter.event_version.as_str())),
        (items::ERROR, s(letter.error.as_str())),
        (items::ATTEMPTS, n(i64::from(letter.attempts))),
        (items::RECORDED_AT, n(letter.recorded_at.timestamp_micros())),
    ];
    item.extend(attributes.map(|(name, value)| (name.to_owned(), value)));
    item
}

/// Reads a letter item; a missing or mistyped attribute is a [`DamagedItem`](crate::DamagedItem).
fn decode_letter(table: &str, item: &Item) -> Result<DeadLetter, CQRSError> {
    let r = Reader(item);
    let corrupt = |problem: String| CQRSError::persistence(damaged(table, item, problem));
    let attempts = r.number(items::ATTEMPTS).map_err(corrupt)?;
    let micros = r.number(items::RECORDED_AT).map_err(corrupt)?;
    Ok(DeadLetter {
        projection: r.string(items::PROJECTION).map_err(corrupt)?.to_owned(),
        view: r.string(items::VIEW_NAME).map_err(corrupt)?.to_owned(),
        event_id: r.uuid(items::EVENT_ID).map_err(corrupt)?,
        aggregate_type: r.string(items::AGGREGATE_TYPE).map_err(corrupt)?.to_owned(),
        aggregate_id: r.uuid(items::AGGREGATE_ID).map_err(corrupt)?,
        sequence: r.number(items::SEQUENCE).map_err(corrupt)?,
        position: r.number(SK).map_err(corrupt)?,
        event_type: r.string(items::EVENT_TYPE).map_err(corrupt)?.to_owned(),
        event_version: r.string(items::EVENT_VERSION).map_err(corrupt)?.to_owned(),
        error: r.string(items::ERROR).map_err(corrupt)?.to_owned(),
        attempts: u32::try_from(attempts)
            .map_err(|_| corrupt(format!("attribute `attempts` {attempts} is out of range")))?,
        recorded_at: DateTime::<Utc>::from_timestamp_micros(micros)
            .ok_or_else(|| corrupt(format!("attribute `recorded_at` {micros} is out of range")))?,
    })
}

#[cqrs::async_trait]
impl DeadLetters for DynamoDbDeadLetters {
    async fn record(&self, letter: DeadLetter) -> Result<(), CQRSError> {
        self.client
            .put_item()
            .table_name(self.table.as_ref())
            .set_item(Some(letter_item(&letter)))
            .send()
            .await
            .map_err(|e| sdk_error("PutItem", &self.table, e))?;
        Ok(())
    }

    async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, CQRSError> {
        let mut letters = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(self.table.as_ref())
                .consistent_read(true)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(dead_letter_pk(projection)))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("Query", &self.table, e))?;
            for item in output.items() {
                letters.push(decode_letter(&self.table, item)?);
            }
            match output.last_evaluated_key() {
                Some(next) if !next.is_empty() => start = Some(next.clone()),
                _ => return Ok(letters),
            }
        }
    }

    /// Puts the letter and moves the checkpoint item `letter.projection` from `from` to
    /// `letter.position` in one `TransactWriteItems`; `Stale` when the checkpoint is not at
    /// `from` (a missing one is at 0).
    async fn record_and_skip(
        &self,
        letter: &DeadLetter,
        from: i64,
    ) -> Result<DeadLetterSkip, CQRSError> {
        if letter.position <= from {
            return Err(CQRSError::persistence(format!(
                "dead letter at position {} is not after the checkpoint {from} of {}",
                letter.position, letter.projection
            )));
        }
        let checkpoint = Put::builder()
            .table_name(self.table.as_ref())
            .set_item(Some(checkpoint_item(&letter.projection, letter.position)))
            .expression_attribute_names("#position", items::POSITION)
            .expression_attribute_values(":from", n(from));
        let checkpoint = if from == 0 {
            // A checkpoint never recorded is at 0.
            checkpoint
                .condition_expression("attribute_not_exists(#pk) OR #position = :from")
                .expression_attribute_names("#pk", PK)
        } else {
            checkpoint.condition_expression("#position = :from")
        };
        let checkpoint = checkpoint.build().map_err(build_error)?;
        let record = Put::builder()
            .table_name(self.table.as_ref())
            .set_item(Some(letter_item(letter)))
            .build()
            .map_err(build_error)?;
        let writes = vec![
            TransactWriteItem::builder().put(checkpoint).build(),
            TransactWriteItem::builder().put(record).build(),
        ];
        match transact_write(&self.client, &self.table, writes).await? {
            Outcome::Committed => Ok(DeadLetterSkip::Committed),
            Outcome::Cancelled(_) => Ok(DeadLetterSkip::Stale),
        }
    }
}
