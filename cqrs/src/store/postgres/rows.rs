//! Decoding rows of `cqrs_events` into events.

use futures_util::stream::{BoxStream, TryStreamExt};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::{PersistableDomainEvent, RowNames};

/// Decodes rows of `cqrs_events` as they arrive, while the server is still sending the rest
/// (`fetch_all` would buffer every row first, then decode).
pub(super) async fn collect_events(
    mut rows: BoxStream<'_, Result<PgRow, sqlx::Error>>,
    expected: usize,
) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
    let mut events = Vec::with_capacity(expected.min(1024));
    let mut names = RowNames::default();
    while let Some(row) = rows.try_next().await.map_err(CQRSError::persistence)? {
        events.push(decode_event(&row, &mut names)?);
    }
    Ok(events)
}

/// Reads one row of `cqrs_events` (columns in `EVENT_COLUMNS` order).
fn decode_event(row: &PgRow, names: &mut RowNames) -> Result<PersistableDomainEvent, CQRSError> {
    let position: i64 = row.try_get(0).map_err(CQRSError::persistence)?;
    let field = |e: sqlx::Error| {
        CQRSError::persistence(format!("row at position {position} of cqrs_events: {e}"))
    };
    let aggregate_type: &str = row.try_get(2).map_err(field)?;
    let aggregate_id: Uuid = row.try_get(3).map_err(field)?;
    let (aggregate_type, aggregate_type_id) = names.aggregate(aggregate_type, aggregate_id);
    Ok(PersistableDomainEvent {
        event_id: row.try_get(1).map_err(field)?,
        aggregate_type_id,
        aggregate_id,
        aggregate_type,
        sequence: row.try_get(4).map_err(field)?,
        position,
        event_type: names.event_type(row.try_get::<&str, _>(5).map_err(field)?),
        event_version: names.event_version(row.try_get::<&str, _>(6).map_err(field)?),
        payload: row.try_get(7).map_err(field)?,
        metadata: row.try_get(8).map_err(field)?,
        timestamp: row.try_get(9).map_err(field)?,
        correlation_id: row.try_get(10).map_err(field)?,
        causation_id: row.try_get(11).map_err(field)?,
    })
}
