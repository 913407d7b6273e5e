//! [`DynamoDbSnapshotRepository`]: one snapshot item per aggregate.

use std::sync::Arc;

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::Client;
use chrono::{DateTime, Utc};
use cqrs::{CQRSError, PersistableDomainEvent, Snapshot, SnapshotRepository};
use uuid::Uuid;

use crate::items::{self, damaged, key, n, s, Item, Reader, KIND, KIND_SNAPSHOT, PK};
use crate::sdk_error;

/// A snapshot store on a DynamoDB table: an aggregate's snapshot is the item with its
/// aggregate's key (`pk`) and sort key 0, beside its events when the table is the event
/// store's (sequences start at 1, so loads never meet it).
///
/// Saving is one conditional `PutItem` (kept unless a snapshot at a higher sequence is
/// stored), loading one strongly consistent `GetItem`.
///
/// ```no_run
/// use std::sync::Arc;
/// use cqrs_aws::{DynamoDbEventRepository, DynamoDbSnapshotRepository};
///
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
/// let events = DynamoDbEventRepository::new(client.clone(), "events");
/// events.ensure_table().await?;
/// let snapshots = DynamoDbSnapshotRepository::new(client, "events");
/// # let _ = (events, snapshots);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DynamoDbSnapshotRepository {
    client: Client,
    table: Arc<str>,
}

impl std::fmt::Debug for DynamoDbSnapshotRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbSnapshotRepository")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl DynamoDbSnapshotRepository {
    /// A snapshot store on `table` (the event store's table, or one of its own created with
    /// [`ensure_table`](crate::ensure_table)).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoDbSnapshotRepository {
            client,
            table: Arc::from(table.into()),
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The item that stores `snapshot`.
    pub(crate) fn item(snapshot: &Snapshot) -> Item {
        let mut item = key(
            PersistableDomainEvent::type_id_for(&snapshot.aggregate_type, snapshot.aggregate_id)
                .as_str(),
            0,
        );
        item.insert(KIND.to_owned(), s(KIND_SNAPSHOT));
        item.insert(
            items::AGGREGATE_TYPE.to_owned(),
            s(snapshot.aggregate_type.as_str()),
        );
        item.insert(
            items::AGGREGATE_ID.to_owned(),
            s(snapshot.aggregate_id.hyphenated().to_string()),
        );
        item.insert(items::SEQUENCE.to_owned(), n(snapshot.sequence));
        item.insert(items::STATE.to_owned(), s(snapshot.state.to_string()));
        item.insert(
            items::TIMESTAMP.to_owned(),
            n(snapshot.timestamp.timestamp_micros()),
        );
        item
    }
}

#[cqrs::async_trait]
impl SnapshotRepository for DynamoDbSnapshotRepository {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<Snapshot>, CQRSError> {
        let stream = PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id);
        let output = self
            .client
            .get_item()
            .table_name(self.table.as_ref())
            .set_key(Some(key(stream.as_str(), 0)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("GetItem", &self.table, e))?;
        let Some(item) = output.item() else {
            return Ok(None);
        };
        let r = Reader(item);
        let corrupt = |problem: String| CQRSError::persistence(damaged(&self.table, item, problem));
        let sequence = r.number(items::SEQUENCE).map_err(corrupt)?;
        let state =
            serde_json::from_str(r.string(items::STATE).map_err(corrupt)?).map_err(|source| {
                CQRSError::Deserialization {
                    what: format!("snapshot of {aggregate_type} {aggregate_id}"),
                    source,
                }
            })?;
        let micros = r.number(items::TIMESTAMP).map_err(corrupt)?;
        let timestamp = DateTime::<Utc>::from_timestamp_micros(micros)
            .ok_or_else(|| corrupt(format!("timestamp {micros} is out of range")))?;
        Ok(Some(Snapshot {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id,
            sequence,
            state,
            timestamp,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), CQRSError> {
        let result = self
            .client
            .put_item()
            .table_name(self.table.as_ref())
            .set_item(Some(Self::item(&snapshot)))
            .condition_expression("attribute_not_exists(#pk) OR #sequence <= :sequence")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sequence", items::SEQUENCE)
            .expression_attribute_values(":sequence", n(snapshot.sequence))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // A newer snapshot is stored: it stays.
            Err(error)
                if matches!(
                    error.as_service_error(),
                    Some(PutItemError::ConditionalCheckFailedException(_))
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(sdk_error("PutItem", &self.table, error)),
        }
    }

    async fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<(), CQRSError> {
        let stream = PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id);
        self.client
            .delete_item()
            .table_name(self.table.as_ref())
            .set_key(Some(key(stream.as_str(), 0)))
            .send()
            .await
            .map_err(|e| sdk_error("DeleteItem", &self.table, e))?;
        Ok(())
    }
}
