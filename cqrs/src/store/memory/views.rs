//! Views kept in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::store::{Checkpoint, ViewContext, ViewRepository};
use crate::view::View;

/// A thread-safe view store in memory, with checkpoints, meeting the same contract as the SQL
/// view stores. Cloning gives another handle to the same store.
///
/// ```
/// # use cqrs::doc::CounterTotal;
/// let views = cqrs::MemoryViewRepository::<CounterTotal>::new();
/// # let _ = views;
/// ```
#[derive(Debug)]
pub struct MemoryViewRepository<V> {
    inner: Arc<Mutex<MemoryViews<V>>>,
}

#[derive(Debug)]
struct MemoryViews<V> {
    rows: HashMap<String, (V, i64)>,
    checkpoints: HashMap<String, i64>,
}

impl<V> Clone for MemoryViewRepository<V> {
    fn clone(&self) -> Self {
        MemoryViewRepository {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V> Default for MemoryViewRepository<V> {
    fn default() -> Self {
        MemoryViewRepository {
            inner: Arc::new(Mutex::new(MemoryViews {
                rows: HashMap::new(),
                checkpoints: HashMap::new(),
            })),
        }
    }
}

impl<V> MemoryViewRepository<V> {
    /// An empty view store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The view instance `view_id`, if there is one: the same as
    /// [`ViewRepository::load`], without naming the aggregate.
    ///
    /// ```
    /// # use cqrs::doc::CounterTotal;
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let views = cqrs::MemoryViewRepository::<CounterTotal>::new();
    /// assert!(views.load("42").await?.is_none());
    /// assert!(views.list(None, 100).await?.is_empty());
    /// # Ok::<(), cqrs::CQRSError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// None in memory; the signature is every view store's.
    pub async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError>
    where
        V: Clone,
    {
        Ok(self.lock().rows.get(view_id).map(|(view, _)| view.clone()))
    }

    /// A page of view instances in id order, as [`ViewRepository::list`] returns it,
    /// without naming the aggregate.
    ///
    /// # Errors
    /// None in memory; the signature is every view store's.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, V)>, CQRSError>
    where
        V: Clone,
    {
        let inner = self.lock();
        let mut rows: Vec<(&String, &V)> = inner
            .rows
            .iter()
            .filter(|(id, _)| after.is_none_or(|after| id.as_str() > after))
            .map(|(id, (view, _))| (id, view))
            .collect();
        // Only the page is sorted: the `limit` lowest ids are picked out first.
        if rows.len() > limit {
            rows.select_nth_unstable_by(limit, |a, b| a.0.cmp(b.0));
            rows.truncate(limit);
        }
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Ok(rows
            .into_iter()
            .map(|(id, view)| (id.clone(), view.clone()))
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, MemoryViews<V>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl<A, V> ViewRepository<A, V> for MemoryViewRepository<V>
where
    A: Aggregate,
    V: View<A>,
{
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        MemoryViewRepository::load(self, view_id).await
    }

    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        MemoryViewRepository::list(self, after, limit).await
    }

    async fn load_for_update(&self, view_id: &str) -> Result<ViewContext<V>, CQRSError> {
        let (view, version) = self
            .lock()
            .rows
            .get(view_id)
            .cloned()
            .unwrap_or_else(|| (V::default(), 0));
        Ok(ViewContext {
            view_id: view_id.to_owned(),
            view,
            version,
        })
    }

    async fn commit(
        &self,
        changes: Vec<ViewContext<V>>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), CQRSError> {
        let mut inner = self.lock();
        for change in &changes {
            let stored = inner.rows.get(&change.view_id).map_or(0, |(_, v)| *v);
            if stored != change.version {
                return Err(CQRSError::ViewConflict {
                    view: V::TABLE_NAME.to_owned(),
                    view_id: change.view_id.clone(),
                    expected_version: change.version,
                });
            }
        }
        if let Some(checkpoint) = &checkpoint {
            // Like the SQL view stores: a checkpoint never goes back, and equal is only
            // accepted without view changes (a second projector replaying applied events).
            if let Some(&stored) = inner.checkpoints.get(&checkpoint.name) {
                if checkpoint.position < stored
                    || (checkpoint.position == stored && !changes.is_empty())
                {
                    return Err(CQRSError::ViewConflict {
                        view: V::TABLE_NAME.to_owned(),
                        view_id: format!("checkpoint {}", checkpoint.name),
                        expected_version: stored,
                    });
                }
            }
        }
        for change in changes {
            inner
                .rows
                .insert(change.view_id, (change.view, change.version + 1));
        }
        if let Some(checkpoint) = checkpoint {
            inner
                .checkpoints
                .insert(checkpoint.name, checkpoint.position);
        }
        Ok(())
    }

    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        Ok(self.lock().checkpoints.get(name).copied().unwrap_or(0))
    }
}
