//! Snapshots in `cqrs_snapshots`, one row per aggregate.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

use super::PostgresEventRepository;
use crate::error::CQRSError;
use crate::store::{Snapshot, SnapshotRepository};

#[async_trait]
impl SnapshotRepository for PostgresEventRepository {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<Snapshot>, CQRSError> {
        let row = sqlx::query(&self.inner.sql.load_snapshot)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let sequence: i64 = row.try_get(0).map_err(CQRSError::persistence)?;
        let state: Value = row.try_get(1).map_err(CQRSError::persistence)?;
        let timestamp: DateTime<Utc> = row.try_get(2).map_err(CQRSError::persistence)?;
        Ok(Some(Snapshot {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id,
            sequence,
            state,
            timestamp,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), CQRSError> {
        sqlx::query(&self.inner.sql.save_snapshot)
            .bind(&snapshot.aggregate_type)
            .bind(snapshot.aggregate_id)
            .bind(snapshot.sequence)
            .bind(&snapshot.state)
            .bind(snapshot.timestamp)
            .execute(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(())
    }

    async fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<(), CQRSError> {
        sqlx::query(&self.inner.sql.delete_snapshot)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .execute(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(())
    }
}
