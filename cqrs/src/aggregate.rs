//! The write side's unit of consistency.

use std::fmt::Debug;
use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::DomainEvent;

/// An aggregate: decides which events a command causes, and folds events into its state.
///
/// The value implementing the trait holds the aggregate's *services* (a clock, a price
/// list, nothing at all); the per-instance data lives in [`Aggregate::State`], which the
/// framework rebuilds from the stored events before every command.
///
/// * [`handle_command`](Aggregate::handle_command) sees the current state and the aggregate
///   id, and returns the events to append (or the domain's error; then nothing is appended).
/// * [`handle_event`](Aggregate::handle_event) applies one event to the state. It must be a
///   pure function of the state and the event: replaying the history must give the same
///   state as living through it.
///
/// `handle_command` is an `async fn` in your impl; no `#[async_trait]` is needed.
///
/// ```
/// # use cqrs::doc::{CounterCommand, CounterError, CounterEvent, CounterState};
/// use cqrs::Aggregate;
/// use uuid::Uuid;
///
/// // The domain's own types: `CounterEvent` (`Incremented { by }`, `Reset`), `CounterCommand`
/// // (`Increment { by }`, `Reset`), `CounterError` (`TooBig`, or the framework's error) and
/// // `CounterState { value }`.
///
/// #[derive(Default)]
/// struct Counter;
///
/// impl Aggregate for Counter {
///     const NAME: &'static str = "counter";
///     type Events = CounterEvent;
///     type Commands = CounterCommand;
///     type Errors = CounterError;
///     type State = CounterState;
///
///     async fn handle_command(
///         &self,
///         _id: Uuid,
///         state: &CounterState,
///         command: CounterCommand,
///     ) -> Result<Vec<CounterEvent>, CounterError> {
///         match command {
///             CounterCommand::Increment { by } if state.value + by > 10 => Err(CounterError::TooBig),
///             CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
///             CounterCommand::Reset => Ok(vec![CounterEvent::Reset]),
///         }
///     }
///
///     fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
///         match event {
///             CounterEvent::Incremented { by } => state.value += by,
///             CounterEvent::Reset => state.value = 0,
///         }
///     }
/// }
/// # fn main() {}
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an aggregate",
    label = "this type does not implement `cqrs::Aggregate`",
    note = "implement `cqrs::Aggregate` for it (use `#[cqrs::aggregate(name = \"...\")]` on the impl to avoid writing NAME)"
)]
pub trait Aggregate: Send + Sync + 'static {
    /// The aggregate's type name, stored with every event. Never change it once events exist.
    const NAME: &'static str;

    /// The events this aggregate emits.
    type Events: DomainEvent;

    /// The commands it handles. `Clone` lets the framework run a command again after a
    /// conflict (see [`RetryPolicy`](crate::RetryPolicy)).
    type Commands: Debug + Clone + Send + Sync + 'static;

    /// The domain's error type. It wraps [`CQRSError`] so `dispatch` has one error type.
    type Errors: std::error::Error + From<CQRSError> + Send + Sync + 'static;

    /// Per-instance state, rebuilt from the events. Serializable for snapshots.
    type State: Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Decides what happens: the events a command causes on the current state.
    ///
    /// Return an empty `Vec` when the command changes nothing.
    ///
    /// # Errors
    /// The domain's refusal; nothing is appended then.
    fn handle_command(
        &self,
        aggregate_id: Uuid,
        state: &Self::State,
        command: Self::Commands,
    ) -> impl Future<Output = Result<Vec<Self::Events>, Self::Errors>> + Send;

    /// Applies one event to the state. Infallible: the event already happened.
    fn handle_event(&self, state: &mut Self::State, event: &Self::Events);
}
