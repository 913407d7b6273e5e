//! The domain the crate's doc examples share: a counter aggregate with its events, commands,
//! errors and state, and a view of it. Examples import it on hidden lines
//! (`# use cqrs::doc::{Counter, CounterCommand};`) and show only what they document.
//!
//! A fixture for the documentation, not part of the API: it may change in any release.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};

/// What happened to a counter. Stored with serde's default (externally tagged) shape:
/// `{"Incremented": {"by": 1}}`, `"Reset"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
pub enum CounterEvent {
    /// The counter went up.
    #[event(name = "Incremented", version = "1")]
    Incremented {
        /// How much it went up by.
        by: u64,
    },
    /// The counter went back to zero.
    #[event(name = "Reset", version = "1")]
    Reset,
}

/// What a counter is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterCommand {
    /// Go up by `by`; refused with [`CounterError::TooBig`] past [`Counter::LIMIT`].
    Increment {
        /// How much to go up by.
        by: u64,
    },
    /// Go back to zero.
    Reset,
}

/// A counter's errors, and the framework's inside them.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CounterError {
    /// The increment would take the counter past [`Counter::LIMIT`].
    #[error("the counter would pass {}", Counter::LIMIT)]
    TooBig,
    /// The framework failed: a lost race, a store that failed.
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

/// A counter's state, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// The current value.
    pub value: u64,
}

/// The counter aggregate, stored as `"counter"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counter;

impl Counter {
    /// The highest value a counter reaches.
    pub const LIMIT: u64 = 10;
}

impl Aggregate for Counter {
    const NAME: &'static str = "counter";
    type Events = CounterEvent;
    type Commands = CounterCommand;
    type Errors = CounterError;
    type State = CounterState;

    async fn handle_command(
        &self,
        _id: Uuid,
        state: &CounterState,
        command: CounterCommand,
    ) -> Result<Vec<CounterEvent>, CounterError> {
        match command {
            CounterCommand::Increment { by } if state.value.saturating_add(by) > Self::LIMIT => {
                Err(CounterError::TooBig)
            }
            CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
            CounterCommand::Reset => Ok(vec![CounterEvent::Reset]),
        }
    }

    fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
        match event {
            CounterEvent::Incremented { by } => state.value = state.value.saturating_add(*by),
            CounterEvent::Reset => state.value = 0,
        }
    }
}

/// A view of each counter's value, one row per counter, in the table `counter_total`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterTotal {
    /// The counter's value.
    pub total: u64,
}

impl View<Counter> for CounterTotal {
    const TABLE_NAME: &'static str = "counter_total";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        match envelope.event {
            CounterEvent::Incremented { by } => self.total = self.total.saturating_add(by),
            CounterEvent::Reset => self.total = 0,
        }
        Ok(())
    }
}
