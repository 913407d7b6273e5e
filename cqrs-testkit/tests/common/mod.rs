//! The test domain: a counter that refuses to go above 10, and its statistics view.
#![allow(dead_code)]

use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
pub enum CounterEvent {
    #[event(name = "CounterIncremented", version = "1")]
    Incremented { by: u32 },
    #[event(name = "CounterReset", version = "1")]
    Reset,
    #[event(name = "CounterLabelled", version = "2")]
    Labelled { label: String, tags: Vec<String> },
}

#[derive(Debug, Clone)]
pub enum CounterCommand {
    Increment { by: u32 },
    Reset,
    Label { label: String, tags: Vec<String> },
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CounterError {
    #[error("too big: {value} + {by} > 10")]
    TooBig { value: u32, by: u32 },
    #[error("framework: {0}")]
    Framework(String),
}

impl From<CQRSError> for CounterError {
    fn from(error: CQRSError) -> Self {
        CounterError::Framework(error.to_string())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CounterState {
    pub value: u32,
    pub label: Option<String>,
}

#[derive(Default)]
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
        state: &CounterState,
        command: CounterCommand,
    ) -> Result<Vec<CounterEvent>, CounterError> {
        match command {
            CounterCommand::Increment { by } if state.value + by > 10 => {
                Err(CounterError::TooBig {
                    value: state.value,
                    by,
                })
            }
            CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
            CounterCommand::Reset if state.value == 0 => Ok(vec![]),
            CounterCommand::Reset => Ok(vec![CounterEvent::Reset]),
            CounterCommand::Label { label, tags } => {
                Ok(vec![CounterEvent::Labelled { label, tags }])
            }
        }
    }

    fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
        match event {
            CounterEvent::Incremented { by } => state.value += by,
            CounterEvent::Reset => state.value = 0,
            CounterEvent::Labelled { label, .. } => state.label = Some(label.clone()),
        }
    }
}

/// How often each counter was incremented, and by how much in all.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CounterStats {
    pub increments: u32,
    pub total: u64,
}

/// Counts every event of every counter in one view instance, to test `view_id`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AllCounters {
    pub events: u32,
}

impl View<Counter> for AllCounters {
    const TABLE_NAME: &'static str = "all_counters";
    const VERSION: u64 = 1;

    fn view_id(envelope: &EventEnvelope<CounterEvent>) -> Option<String> {
        (!matches!(envelope.event, CounterEvent::Reset)).then(|| "all".to_owned())
    }

    fn handle_event(&mut self, _: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        self.events += 1;
        Ok(())
    }
}

impl View<Counter> for CounterStats {
    const TABLE_NAME: &'static str = "counter_stats";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        match &envelope.event {
            CounterEvent::Incremented { by } => {
                self.increments += 1;
                self.total += u64::from(*by);
            }
            // The view refuses labels over 10 characters (to test view errors).
            CounterEvent::Labelled { label, .. } if label.len() > 10 => {
                return Err(CounterError::Framework(format!("label too long: {label}")));
            }
            CounterEvent::Labelled { .. } | CounterEvent::Reset => {}
        }
        Ok(())
    }
}
