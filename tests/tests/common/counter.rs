//! The counter domain the store suites share: one aggregate whose state keeps the log of
//! every amount applied (an event folded twice or skipped shows in the state, not only in a
//! total), the same events with a constant-size state for the races, and a view of them.

#![allow(dead_code)]

use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, PersistableDomainEvent, View};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Written by hand (not derived), so the suites also go through `DomainEvent`'s defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    Added { amount: i64 },
    Reset,
}

impl DomainEvent for CounterEvent {
    fn persisted_event_name(&self) -> &'static str {
        match self {
            CounterEvent::Added { .. } => "Added",
            CounterEvent::Reset => "Reset",
        }
    }
    fn persisted_event_version(&self) -> &'static str {
        "1"
    }
}

#[derive(Debug, Clone)]
pub enum CounterCommand {
    Add(i64),
    /// Adds `amount` twice in one command (a two-event append).
    AddTwice(i64),
    Reset,
    /// Changes nothing.
    Noop,
}

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

impl CounterError {
    /// The framework's error inside.
    pub fn framework(&self) -> &CQRSError {
        let CounterError::Framework(e) = self;
        e
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterState {
    pub total: i64,
    pub applied: Vec<i64>,
    pub resets: u32,
}

#[derive(Debug, Default)]
pub struct Counter;

impl Aggregate for Counter {
    const NAME: &'static str = "counter";
    type Events = CounterEvent;
    type Commands = CounterCommand;
    type Errors = CounterError;
    type State = CounterState;

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &CounterState,
        command: CounterCommand,
    ) -> Result<Vec<CounterEvent>, CounterError> {
        Ok(match command {
            CounterCommand::Add(amount) => vec![CounterEvent::Added { amount }],
            CounterCommand::AddTwice(amount) => {
                vec![
                    CounterEvent::Added { amount },
                    CounterEvent::Added { amount },
                ]
            }
            CounterCommand::Reset => vec![CounterEvent::Reset],
            CounterCommand::Noop => Vec::new(),
        })
    }

    fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
        match event {
            CounterEvent::Added { amount } => {
                state.total += amount;
                state.applied.push(*amount);
            }
            CounterEvent::Reset => {
                state.total = 0;
                state.resets += 1;
            }
        }
    }
}

/// The same events with a constant-size state, for the races: `Counter`'s log of every
/// amount would make each load of a long history cost more than the race itself.
#[derive(Debug, Default)]
pub struct Tally;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TallyState {
    pub total: i64,
    pub events: i64,
}

impl Aggregate for Tally {
    const NAME: &'static str = "tally";
    type Events = CounterEvent;
    type Commands = CounterCommand;
    type Errors = CounterError;
    type State = TallyState;

    async fn handle_command(
        &self,
        id: Uuid,
        _state: &TallyState,
        command: CounterCommand,
    ) -> Result<Vec<CounterEvent>, CounterError> {
        Counter
            .handle_command(id, &CounterState::default(), command)
            .await
    }

    fn handle_event(&self, state: &mut TallyState, event: &CounterEvent) {
        state.events += 1;
        match event {
            CounterEvent::Added { amount } => state.total += amount,
            CounterEvent::Reset => state.total = 0,
        }
    }
}

/// One row per counter: its total and how many events it applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterView {
    pub total: i64,
    pub events: u64,
}

impl View<Counter> for CounterView {
    const TABLE_NAME: &'static str = "counter_view";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        match envelope.event {
            CounterEvent::Added { amount } => self.total += amount,
            CounterEvent::Reset => self.total = 0,
        }
        self.events += 1;
        Ok(())
    }
}

/// A stored `Added { amount }` of the counter `id`, at `sequence`.
pub fn counter_event(id: Uuid, sequence: i64, amount: i64) -> PersistableDomainEvent {
    PersistableDomainEvent::new(
        Counter::NAME,
        id,
        sequence,
        &CounterEvent::Added { amount },
        Value::Null,
    )
    .unwrap()
}
