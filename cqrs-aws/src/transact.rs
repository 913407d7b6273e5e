//! One `TransactWriteItems` of the read side, and the limit on its size.

use std::fmt;
use std::time::Duration;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{CancellationReason, TransactWriteItem};
use aws_sdk_dynamodb::Client;
use cqrs::CQRSError;

use crate::events::TRANSACTION_ITEM_LIMIT;
use crate::sdk_error;

/// How many times a transaction is sent again when DynamoDB cancelled it only because
/// another transaction held one of its items (`TransactionConflict`): nothing of it was
/// written, and its conditions are evaluated again.
const CONFLICT_ATTEMPTS: u32 = 6;

/// A write to DynamoDB that would need more items in one transaction than DynamoDB allows
/// ([`TRANSACTION_ITEM_LIMIT`]): refused before any request, nothing written.
///
/// It reaches callers as the source of a [`CQRSError::PersistenceError`]. A view commit
/// holds one item per changed row and one for the checkpoint, so a projection whose batches
/// touch more than [`MAX_VIEW_ROWS_PER_COMMIT`](crate::MAX_VIEW_ROWS_PER_COMMIT) rows is told
/// a smaller batch size with `Projection::with_batch_size`. A commit cannot be split: its
/// rows and checkpoint are written all or nothing, which only one transaction gives.
///
/// ```
/// let too_large = cqrs_aws::TransactionTooLarge {
///     table: "views".into(),
///     items: 101,
///     limit: cqrs_aws::TRANSACTION_ITEM_LIMIT,
/// };
/// assert!(too_large.to_string().contains("at most 100"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionTooLarge {
    /// The table written to.
    pub table: String,
    /// How many items the write needed in one transaction.
    pub items: usize,
    /// How many one transaction may hold.
    pub limit: usize,
}

impl fmt::Display for TransactionTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a commit to DynamoDB table {} needs {} items in one transaction, and DynamoDB \
             allows at most {} (TransactWriteItems); nothing was written. A view commit holds \
             one item per changed row plus one for the checkpoint: give the projection a \
             smaller batch size (Projection::with_batch_size)",
            self.table, self.items, self.limit
        )
    }
}

impl std::error::Error for TransactionTooLarge {}

/// Refuses a transaction of more than [`TRANSACTION_ITEM_LIMIT`] items with
/// [`TransactionTooLarge`].
pub(crate) fn ensure_fits(table: &str, items: usize) -> Result<(), CQRSError> {
    if items > TRANSACTION_ITEM_LIMIT {
        return Err(CQRSError::persistence(TransactionTooLarge {
            table: table.to_owned(),
            items,
            limit: TRANSACTION_ITEM_LIMIT,
        }));
    }
    Ok(())
}

/// What became of a transaction.
pub(crate) enum Outcome {
    /// Every item written.
    Committed,
    /// A condition failed: nothing written. One reason per item, in the order sent.
    Cancelled(Vec<CancellationReason>),
}

impl Outcome {
    /// The index of the first item whose condition failed, if one did.
    pub(crate) fn failed_condition(reasons: &[CancellationReason]) -> Option<usize> {
        reasons
            .iter()
            .position(|r| r.code() == Some("ConditionalCheckFailed"))
    }
}

/// Sends `writes` as one `TransactWriteItems`, again (after a short wait) when only another
/// transaction on the same items got in the way.
///
/// # Errors
/// [`CQRSError::PersistenceError`] when DynamoDB fails, refuses an item (too large, a key
/// too long), or keeps reporting conflicting transactions.
pub(crate) async fn transact_write(
    client: &Client,
    table: &str,
    writes: Vec<TransactWriteItem>,
) -> Result<Outcome, CQRSError> {
    ensure_fits(table, writes.len())?;
    for attempt in 0..CONFLICT_ATTEMPTS {
        let result = client
            .transact_write_items()
            .set_transact_items(Some(writes.clone()))
            .send()
            .await;
        let error = match result {
            Ok(_) => return Ok(Outcome::Committed),
            Err(error) => error,
        };
        let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) =
            error.as_service_error()
        else {
            return Err(sdk_error("TransactWriteItems", table, error));
        };
        let reasons = cancelled.cancellation_reasons();
        if Outcome::failed_condition(reasons).is_some() {
            return Ok(Outcome::Cancelled(reasons.to_vec()));
        }
        if let Some(refused) = reasons.iter().find(|r| r.code() == Some("ValidationError")) {
            return Err(CQRSError::persistence(format!(
                "DynamoDB refused an item of a transaction on table {table}: {}",
                refused.message().unwrap_or("ValidationError")
            )));
        }
        if !reasons
            .iter()
            .any(|r| r.code() == Some("TransactionConflict"))
        {
            let codes: Vec<&str> = reasons.iter().map(|r| r.code().unwrap_or("None")).collect();
            return Err(CQRSError::persistence(format!(
                "DynamoDB cancelled a transaction on table {table}: reasons {codes:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
    }
    Err(CQRSError::persistence(format!(
        "DynamoDB table {table}: a transaction kept conflicting with others after \
         {CONFLICT_ATTEMPTS} attempts"
    )))
}
