//! The read side: a view built from one aggregate type's events.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::aggregate::Aggregate;
use crate::event::EventEnvelope;

/// A read model built from one aggregate type's events.
///
/// A projection (see [`Projection`](crate::Projection)) feeds every event, in global order,
/// to the view instance named by [`view_id`](View::view_id) (by default the aggregate id),
/// and stores the result in a [`ViewRepository`](crate::ViewRepository) under [`TABLE_NAME`](View::TABLE_NAME).
///
/// `handle_event` is synchronous and must only change `self`: that is what lets a SQL view
/// store commit the view and the projection's checkpoint in one transaction.
///
/// ```
/// use cqrs::{EventEnvelope, View};
/// # use cqrs::doc::{Counter, CounterError, CounterEvent};
/// # use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// struct CounterTotal {
///     total: u64,
/// }
///
/// impl View<Counter> for CounterTotal {
///     const TABLE_NAME: &'static str = "counter_total";
///     const VERSION: u64 = 1;
///
///     fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
///         match envelope.event {
///             CounterEvent::Incremented { by } => self.total += by,
///             CounterEvent::Reset => self.total = 0,
///         }
///         Ok(())
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a view of aggregate `{A}`",
    note = "implement `cqrs::View<{A}>` for it: TABLE_NAME, VERSION and handle_event"
)]
pub trait View<A: Aggregate>:
    Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Where the view is stored (a table name in SQL stores).
    const TABLE_NAME: &'static str;

    /// The view's schema version. Change it when `handle_event` or the view's shape changes;
    /// the view is then rebuilt from the first event.
    const VERSION: u64;

    /// The id of the view instance an event updates, or `None` if the event does not concern
    /// this view. By default, the event's aggregate id.
    ///
    /// Any string is an id: a view keyed by something else than the aggregate (a member's
    /// loans keyed by the member, a daily total keyed by the date) returns it here, from what
    /// the event carries.
    fn view_id(envelope: &EventEnvelope<A::Events>) -> Option<String> {
        Some(envelope.aggregate_id.to_string())
    }

    /// The ids of every view instance an event updates, in the order they are applied; none
    /// when the event does not concern this view. By default, [`view_id`](View::view_id)'s.
    ///
    /// Override it when one event changes several rows: a transfer that changes the row of
    /// the account it leaves and of the one it reaches. Each row then gets the event through
    /// [`handle_event_for`](View::handle_event_for), which says which row it is. An id listed
    /// twice is applied twice.
    fn view_ids(envelope: &EventEnvelope<A::Events>) -> impl IntoIterator<Item = String> {
        Self::view_id(envelope)
    }

    /// Applies one event to the view.
    ///
    /// # Errors
    /// The domain's error when the event cannot be applied; the projection stops there.
    fn handle_event(&mut self, envelope: &EventEnvelope<A::Events>) -> Result<(), A::Errors>;

    /// Applies one event to the view instance `view_id`, one of the ids
    /// [`view_ids`](View::view_ids) returned for it. By default, [`handle_event`](View::handle_event):
    /// override it when the change depends on which row is updated.
    ///
    /// ```
    /// # use cqrs::{Aggregate, CQRSError, DomainEvent};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, thiserror::Error)] #[error(transparent)] struct BankError(#[from] CQRSError);
    /// # #[derive(Default)] struct Bank;
    /// # impl Aggregate for Bank {
    /// #     const NAME: &'static str = "transfer";
    /// #     type Events = TransferEvent; type Commands = (); type Errors = BankError; type State = ();
    /// #     async fn handle_command(&self, _: uuid::Uuid, _: &(), _: ()) -> Result<Vec<TransferEvent>, BankError> { Ok(vec![]) }
    /// #     fn handle_event(&self, _: &mut (), _: &TransferEvent) {}
    /// # }
    /// use cqrs::{EventEnvelope, View};
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
    /// enum TransferEvent {
    ///     Sent { from: String, to: String, amount: i64 },
    /// }
    ///
    /// /// One row per account, changed by every transfer that leaves or reaches it.
    /// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    /// struct AccountBalance {
    ///     balance: i64,
    /// }
    ///
    /// impl View<Bank> for AccountBalance {
    ///     const TABLE_NAME: &'static str = "account_balance";
    ///     const VERSION: u64 = 1;
    ///
    ///     fn view_ids(envelope: &EventEnvelope<TransferEvent>) -> impl IntoIterator<Item = String> {
    ///         let TransferEvent::Sent { from, to, .. } = &envelope.event;
    ///         [from.clone(), to.clone()]
    ///     }
    ///
    ///     fn handle_event_for(&mut self, account: &str, envelope: &EventEnvelope<TransferEvent>) -> Result<(), BankError> {
    ///         let TransferEvent::Sent { from, amount, .. } = &envelope.event;
    ///         self.balance += if account == from { -amount } else { *amount };
    ///         Ok(())
    ///     }
    ///
    ///     // Every event goes through `handle_event_for`; this one is never called.
    ///     fn handle_event(&mut self, _: &EventEnvelope<TransferEvent>) -> Result<(), BankError> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use cqrs::{CQRSFramework, MemoryEventRepository, MemoryViewRepository, Projection};
    /// let store = MemoryEventRepository::new();
    /// let views = MemoryViewRepository::<AccountBalance>::new();
    /// # let event = cqrs::PersistableDomainEvent::new("transfer", uuid::Uuid::new_v4(), 1,
    /// #     &TransferEvent::Sent { from: "ada".into(), to: "bob".into(), amount: 30 }, serde_json::Value::Null)?;
    /// # cqrs::EventRepository::append(&store, vec![event]).await?;
    /// // ... a transfer of 30 from "ada" to "bob" is stored ...
    /// Projection::<Bank, AccountBalance>::new(store, views.clone()).catch_up().await?;
    /// assert_eq!(views.load("ada").await?.map(|row| row.balance), Some(-30));
    /// assert_eq!(views.load("bob").await?.map(|row| row.balance), Some(30));
    /// # Ok::<(), CQRSError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// The domain's error when the event cannot be applied; the projection stops there.
    fn handle_event_for(
        &mut self,
        view_id: &str,
        envelope: &EventEnvelope<A::Events>,
    ) -> Result<(), A::Errors> {
        let _ = view_id;
        self.handle_event(envelope)
    }
}
