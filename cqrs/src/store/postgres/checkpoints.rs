//! Checkpoints of readers that are not views, in `cqrs_checkpoints`.

use async_trait::async_trait;

use super::PostgresEventRepository;
use crate::error::CQRSError;
use crate::store::{Checkpoint, CheckpointRepository};

/// Checkpoints of readers that are not views (an outbox relay), in `cqrs_checkpoints`, the
/// table where [`PostgresViewRepository`](crate::PostgresViewRepository) commits projection checkpoints too.
#[async_trait]
impl CheckpointRepository for PostgresEventRepository {
    async fn load_checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        let position: Option<i64> = sqlx::query_scalar(&self.inner.sql.load_checkpoint)
            .bind(name)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(position.unwrap_or(0))
    }

    async fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), CQRSError> {
        sqlx::query(&self.inner.sql.save_checkpoint)
            .bind(&checkpoint.name)
            .bind(checkpoint.position)
            .execute(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        Ok(())
    }
}
