//! A view store that loses the answer to one commit: the commit is written, then reported as
//! failed, as when the process dies (or the connection drops) between the commit and what
//! follows it.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use cqrs::{Aggregate, CQRSError, Checkpoint, View, ViewContext, ViewRepository};

/// Wraps `views`; its commit number `lost` (0-based) is written and then reported as failed.
#[derive(Clone)]
pub struct LostCommitAnswer<R> {
    pub views: R,
    lost: usize,
    commits: Arc<AtomicUsize>,
}

impl<R> LostCommitAnswer<R> {
    pub fn new(views: R, lost: usize) -> Self {
        LostCommitAnswer {
            views,
            lost,
            commits: Arc::new(AtomicUsize::new(0)),
        }
    }
}

#[async_trait]
impl<A, V, R> ViewRepository<A, V> for LostCommitAnswer<R>
where
    A: Aggregate,
    V: View<A>,
    R: ViewRepository<A, V>,
{
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        self.views.load(view_id).await
    }
    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        self.views.list(after, limit).await
    }
    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
        self.views.load_for_update(view_id).await
    }
    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        self.views.commit(changes, checkpoint).await?;
        if self.commits.fetch_add(1, Ordering::SeqCst) == self.lost {
            return Err(CQRSError::persistence("connection lost after the commit"));
        }
        Ok(())
    }
    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        self.views.checkpoint(name).await
    }
}
