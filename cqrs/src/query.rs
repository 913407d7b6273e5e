//! Queries: reading a view for a caller.

use async_trait::async_trait;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::store::ViewRepository;
use crate::view::View;

/// Reads a view for a caller. The provided methods load one view instance: by any string id
/// ([`query_view`](Query::query_view)) or, as in most views, by the aggregate id
/// ([`query`](Query::query)). Implement the trait with an empty body, or override
/// `query_view` for other lookups (a default row, a fallback, access rules).
///
/// ```
/// # use cqrs::doc::{Counter, CounterTotal};
/// struct TotalById;
/// impl cqrs::Query<Counter, CounterTotal> for TotalById {}
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use cqrs::Query;
/// let views = cqrs::MemoryViewRepository::<CounterTotal>::new();
/// let found = TotalById.query(&uuid::Uuid::new_v4(), &views).await.unwrap();
/// assert!(found.is_none());
/// // A view keyed by something else than an aggregate id:
/// assert!(TotalById.query_view("2026-12-02", &views).await.unwrap().is_none());
/// # });
/// ```
#[async_trait]
pub trait Query<A: Aggregate, V: View<A>>: Send + Sync {
    /// Loads the view instance `view_id` from `view_repo`.
    ///
    /// # Errors
    /// What the repository's `load` returns.
    async fn query_view<R>(&self, view_id: &str, view_repo: &R) -> Result<Option<V>, CQRSError>
    where
        R: ViewRepository<A, V> + ?Sized,
    {
        view_repo.load(view_id).await
    }

    /// Loads the view instance whose id is `aggregate_id`, through
    /// [`query_view`](Query::query_view).
    ///
    /// # Errors
    /// What `query_view` returns.
    async fn query<R>(&self, aggregate_id: &Uuid, view_repo: &R) -> Result<Option<V>, CQRSError>
    where
        R: ViewRepository<A, V> + ?Sized,
    {
        self.query_view(&aggregate_id.to_string(), view_repo).await
    }
}
