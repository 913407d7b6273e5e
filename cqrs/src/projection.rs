//! Projections: feed stored events, in global order, into views, with a checkpoint.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::EventRepository;
use crate::view::{Checkpoint, View, ViewContext, ViewRepository};

/// Keeps one view up to date from the event store.
///
/// [`catch_up`](Projection::catch_up) reads every event after the view's checkpoint in
/// global order, in batches, feeds the events of aggregate type `A` to the view instances
/// they concern, and commits each batch's view changes together with the new checkpoint
/// through [`ViewRepository::commit`]. When the view store commits both atomically (the
/// in-memory and SQL view stores do), every event is applied exactly once, however often the
/// projection is stopped and restarted.
///
/// ```
/// # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
/// # use serde::{Deserialize, Serialize};
/// # use uuid::Uuid;
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { Incremented { by: u32 } }
/// # #[derive(Debug, Clone)] enum CounterCommand { Increment { by: u32 } }
/// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct CounterError(#[from] CQRSError);
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent; type Commands = CounterCommand; type Errors = CounterError; type State = ();
/// #     async fn handle_command(&self, _: Uuid, _: &(), c: CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
/// #         let CounterCommand::Increment { by } = c; Ok(vec![CounterEvent::Incremented { by }]) }
/// #     fn handle_event(&self, _: &mut (), _: &CounterEvent) {}
/// # }
/// # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// # struct CounterTotal { total: u64 }
/// # impl View<Counter> for CounterTotal {
/// #     const TABLE_NAME: &'static str = "counter_total";
/// #     const VERSION: u64 = 1;
/// #     fn handle_event(&mut self, e: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
/// #         let CounterEvent::Incremented { by } = e.event; self.total += u64::from(by); Ok(()) }
/// # }
/// use cqrs::{CQRSFramework, MemoryEventRepository, MemoryViewRepository, Projection, ViewRepository};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = MemoryEventRepository::new();
/// let views = MemoryViewRepository::<CounterTotal>::new();
/// let framework = CQRSFramework::<Counter>::new(store.clone());
/// let projection = Projection::<Counter, CounterTotal>::new(store, views.clone());
///
/// let id = Uuid::new_v4();
/// let receipt = framework.dispatch(id, CounterCommand::Increment { by: 4 }).await?;
/// projection.catch_up().await?;
/// assert!(projection.position().await? >= receipt.last_position().unwrap());
/// let total = ViewRepository::<Counter, _>::load(&views, &id.to_string()).await?;
/// assert_eq!(total.unwrap().total, 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct Projection<A: Aggregate, V: View<A>> {
    events: Arc<dyn EventRepository>,
    views: Arc<dyn ViewRepository<A, V>>,
    name: String,
    batch_size: usize,
    _marker: PhantomData<fn() -> (A, V)>,
}

impl<A: Aggregate, V: View<A>> fmt::Debug for Projection<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projection")
            .field("name", &self.name)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl<A: Aggregate, V: View<A>> Projection<A, V> {
    /// A projection of `V` from `events` into `views`, checkpointed under
    /// [`default_name`](Self::default_name).
    pub fn new(
        events: impl EventRepository + 'static,
        views: impl ViewRepository<A, V> + 'static,
    ) -> Self {
        Projection {
            events: Arc::new(events),
            views: Arc::new(views),
            name: Self::default_name(),
            batch_size: 500,
            _marker: PhantomData,
        }
    }

    /// `"{TABLE_NAME}_v{VERSION}"`: a new view version starts from a fresh checkpoint.
    pub fn default_name() -> String {
        format!("{}_v{}", V::TABLE_NAME, V::VERSION)
    }

    /// Uses another checkpoint name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Reads and commits up to `batch_size` events at a time (default 500, at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The global position of the last event applied.
    ///
    /// # Errors
    /// The view store's error.
    pub async fn position(&self) -> Result<i64, CQRSError> {
        self.views.checkpoint(&self.name).await
    }

    /// Applies every event committed so far; returns the new checkpoint position.
    ///
    /// # Errors
    /// A store error, an event that does not decode, or a view handler's refusal
    /// ([`CQRSError::ViewHandler`] naming the event). Batches committed before the error
    /// stay committed; the failing batch is not.
    pub async fn catch_up(&self) -> Result<i64, CQRSError> {
        let mut position = self.views.checkpoint(&self.name).await?;
        loop {
            let batch = self.events.read_all(position, self.batch_size).await?;
            let Some(last) = batch.last().map(|e| e.position) else {
                return Ok(position);
            };
            let span = tracing::debug_span!(
                "projection_batch",
                projection = %self.name,
                from = position + 1,
                to = last,
                events = batch.len(),
            );
            self.apply_batch(&batch, last).instrument(span).await?;
            position = last;
            if batch.len() < self.batch_size {
                return Ok(position);
            }
        }
    }

    /// Waits until the checkpoint reaches `position` (for reading your own writes), catching
    /// up as events arrive, for at most `timeout`.
    ///
    /// # Errors
    /// [`CQRSError::Timeout`], or what `catch_up` returns.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> Result<i64, CQRSError> {
        let work = async {
            let mut changes = self.events.subscribe();
            loop {
                let reached = self.catch_up().await?;
                if reached >= position {
                    return Ok(reached);
                }
                match changes.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            changes = None;
                        }
                    }
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| CQRSError::Timeout(timeout))?
    }

    async fn apply_batch(
        &self,
        batch: &[PersistableDomainEvent],
        last: i64,
    ) -> Result<(), CQRSError> {
        let mut touched: HashMap<String, ViewContext<V>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        for stored in batch.iter().filter(|e| e.aggregate_type == A::NAME) {
            let envelope = stored.decode::<A::Events>()?;
            let Some(view_id) = V::view_id(&envelope) else {
                continue;
            };
            if !touched.contains_key(&view_id) {
                let context = self.views.load_for_update(&view_id).await?;
                order.push(view_id.clone());
                touched.insert(view_id.clone(), context);
            }
            let Some(context) = touched.get_mut(&view_id) else {
                continue;
            };
            context
                .view
                .handle_event(&envelope)
                .map_err(|error| CQRSError::ViewHandler {
                    view: V::TABLE_NAME.to_owned(),
                    aggregate_type: stored.aggregate_type.clone(),
                    aggregate_id: stored.aggregate_id,
                    sequence: stored.sequence,
                    position: stored.position,
                    event_type: stored.event_type.clone(),
                    event_version: stored.event_version.clone(),
                    message: error.to_string(),
                })?;
        }
        let changes = order
            .into_iter()
            .filter_map(|id| touched.remove(&id))
            .collect();
        self.views
            .commit(
                changes,
                Some(Checkpoint {
                    name: self.name.clone(),
                    position: last,
                }),
            )
            .await
    }
}
