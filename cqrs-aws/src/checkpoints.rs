//! [`DynamoDbCheckpointRepository`]: checkpoints in a view table.

use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use chrono::Utc;
use cqrs::{CQRSError, Checkpoint, CheckpointRepository};

use crate::items::{self, checkpoint_pk, damaged, key, n, s, Item, Reader, KIND, KIND_CHECKPOINT};
use crate::sdk_error;

/// The checkpoints of readers that are not views (a relay, an integration), in a view table
/// (see [`ensure_view_table`](crate::ensure_view_table)): the checkpoint `name` is the item
/// `$checkpoint#{name}` / 0, the item where
/// [`DynamoDbViewRepository`](crate::DynamoDbViewRepository) commits a projection's
/// checkpoint with its rows and [`DynamoDbDeadLetters`](crate::DynamoDbDeadLetters) moves it
/// past a skipped event.
///
/// Loading is one strongly consistent `GetItem`; saving one `PutItem` that replaces the
/// position whatever it was (a relay that is rewound saves a lower one).
///
/// ```no_run
/// use cqrs::{Checkpoint, CheckpointRepository};
/// use cqrs_aws::DynamoDbCheckpointRepository;
///
/// # async fn run() -> Result<(), cqrs::CQRSError> {
/// let client = cqrs_aws::local_client("http://127.0.0.1:5000");
/// cqrs_aws::ensure_view_table(&client, "views").await?;
/// let checkpoints = DynamoDbCheckpointRepository::new(client, "views");
/// checkpoints.save_checkpoint(Checkpoint { name: "sns-relay".into(), position: 42 }).await?;
/// assert_eq!(checkpoints.load_checkpoint("sns-relay").await?, 42);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DynamoDbCheckpointRepository {
    client: Client,
    table: Arc<str>,
}

impl std::fmt::Debug for DynamoDbCheckpointRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbCheckpointRepository")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl DynamoDbCheckpointRepository {
    /// Checkpoints in `table`, through `client`. The table must exist: see
    /// [`ensure_view_table`](crate::ensure_view_table).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoDbCheckpointRepository {
            client,
            table: Arc::from(table.into()),
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }
}

/// The item of checkpoint `name` at `position`.
pub(crate) fn checkpoint_item(name: &str, position: i64) -> Item {
    let mut item = key(checkpoint_pk(name), 0);
    item.insert(KIND.to_owned(), s(KIND_CHECKPOINT));
    item.insert(items::NAME.to_owned(), s(name));
    item.insert(items::POSITION.to_owned(), n(position));
    item.insert(
        items::UPDATED_AT.to_owned(),
        n(Utc::now().timestamp_micros()),
    );
    item
}

/// The stored position of checkpoint `name` in `table`, 0 when there is none; a strongly
/// consistent read.
pub(crate) async fn load_checkpoint(
    client: &Client,
    table: &str,
    name: &str,
) -> Result<i64, CQRSError> {
    let output = client
        .get_item()
        .table_name(table)
        .set_key(Some(key(checkpoint_pk(name), 0)))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| sdk_error("GetItem", table, e))?;
    match output.item() {
        Some(item) => stored_position(table, item),
        None => Ok(0),
    }
}

/// The position of a checkpoint item.
pub(crate) fn stored_position(table: &str, item: &Item) -> Result<i64, CQRSError> {
    Reader(item)
        .number(items::POSITION)
        .map_err(|problem| CQRSError::persistence(damaged(table, item, problem)))
}

#[cqrs::async_trait]
impl CheckpointRepository for DynamoDbCheckpointRepository {
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        load_checkpoint(&self.client, &self.table, name).await
    }

    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        self.client
            .put_item()
            .table_name(self.table.as_ref())
            .set_item(Some(checkpoint_item(&checkpoint.name, checkpoint.position)))
            .send()
            .await
            .map_err(|e| sdk_error("PutItem", &self.table, e))?;
        Ok(())
    }
}
