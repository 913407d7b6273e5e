//! The aggregate fixture: given events, when a command, then events, an error, or a state.

use std::fmt::{self, Debug};

use cqrs::Aggregate;
use uuid::Uuid;

use crate::{outcome, report, runtime};

/// Tests one aggregate's decisions without a store: start here.
///
/// [`given`](Self::given) the events already in the aggregate's history (folded with
/// `Aggregate::handle_event`), [`when`](Given::when) a command runs
/// (`Aggregate::handle_command` on that state), [`then_*`](Then) the outcome is what you
/// expect.
///
/// * In `#[tokio::test]` (or any async code) use `.when(command).await`.
/// * In a plain `#[test]` use `.when_blocking(command)`: it runs the command on a new
///   current-thread Tokio runtime, so an aggregate may still use Tokio (timers, channels).
///   It refuses to run inside a runtime, and says so, rather than nesting runtimes.
///
/// The command runs against a fixed aggregate id, random unless set with
/// [`with_aggregate_id`](Self::with_aggregate_id).
///
/// ```
/// # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
/// # use serde::{Deserialize, Serialize};
/// # use uuid::Uuid;
/// #
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent {
/// #     #[event(name = "CounterIncremented", version = "1")]
/// #     Incremented { by: u32 },
/// #     #[event(name = "CounterReset", version = "1")]
/// #     Reset,
/// # }
/// #
/// # #[derive(Debug, Clone)]
/// # enum CounterCommand {
/// #     Increment { by: u32 },
/// #     Reset,
/// # }
/// #
/// # #[derive(Debug, PartialEq, thiserror::Error)]
/// # enum CounterError {
/// #     #[error("too big: {value} + {by} > 10")]
/// #     TooBig { value: u32, by: u32 },
/// #     #[error(transparent)]
/// #     Framework(#[from] CQRSError),
/// # }
/// #
/// # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// # struct CounterState {
/// #     value: u32,
/// # }
/// #
/// # #[derive(Default)]
/// # struct Counter;
/// #
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent;
/// #     type Commands = CounterCommand;
/// #     type Errors = CounterError;
/// #     type State = CounterState;
/// #
/// #     async fn handle_command(
/// #         &self,
/// #         _id: Uuid,
/// #         state: &CounterState,
/// #         command: CounterCommand,
/// #     ) -> Result<Vec<CounterEvent>, CounterError> {
/// #         match command {
/// #             CounterCommand::Increment { by } if state.value + by > 10 => {
/// #                 Err(CounterError::TooBig { value: state.value, by })
/// #             }
/// #             CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
/// #             CounterCommand::Reset if state.value == 0 => Ok(vec![]),
/// #             CounterCommand::Reset => Ok(vec![CounterEvent::Reset]),
/// #         }
/// #     }
/// #
/// #     fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
/// #         match event {
/// #             CounterEvent::Incremented { by } => state.value += by,
/// #             CounterEvent::Reset => state.value = 0,
/// #         }
/// #     }
/// # }
/// #
/// # /// How often each counter was incremented, and by how much in all.
/// # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// # struct CounterStats {
/// #     increments: u32,
/// #     total: u64,
/// # }
/// #
/// # impl View<Counter> for CounterStats {
/// #     const TABLE_NAME: &'static str = "counter_stats";
/// #     const VERSION: u64 = 1;
/// #
/// #     fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
/// #         if let CounterEvent::Incremented { by } = envelope.event {
/// #             self.increments += 1;
/// #             self.total += u64::from(by);
/// #         }
/// #         Ok(())
/// #     }
/// # }
/// use cqrs_testkit::AggregateFixture;
///
/// // In a plain #[test]:
/// fn increments() {
///     AggregateFixture::<Counter>::new()
///         .given([CounterEvent::Incremented { by: 3 }])
///         .when_blocking(CounterCommand::Increment { by: 4 })
///         .then_expect_events([CounterEvent::Incremented { by: 4 }]);
/// }
///
/// // In a #[tokio::test]:
/// async fn refuses_too_much() {
///     AggregateFixture::<Counter>::new()
///         .given([CounterEvent::Incremented { by: 8 }])
///         .when(CounterCommand::Increment { by: 4 })
///         .await
///         .then_expect_error_message("too big: 8 + 4 > 10");
/// }
/// # increments();
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(refuses_too_much());
/// ```
#[must_use = "a fixture does nothing until you call `given` or `given_no_previous_events`"]
pub struct AggregateFixture<A: Aggregate> {
    aggregate: A,
    aggregate_id: Uuid,
    description: Option<String>,
}

impl<A: Aggregate> Debug for AggregateFixture<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateFixture")
            .field("aggregate", &A::NAME)
            .field("aggregate_id", &self.aggregate_id)
            .finish()
    }
}

impl<A: Aggregate + Default> Default for AggregateFixture<A> {
    fn default() -> Self {
        Self::with_aggregate(A::default())
    }
}

impl<A: Aggregate + Default> AggregateFixture<A> {
    /// A fixture for `A::default()`.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<A: Aggregate> AggregateFixture<A> {
    /// A fixture for this aggregate value, for an aggregate that holds services (a clock, a
    /// price list): pass test doubles here.
    pub fn with_aggregate(aggregate: A) -> Self {
        AggregateFixture {
            aggregate,
            aggregate_id: Uuid::new_v4(),
            description: None,
        }
    }

    /// Runs the command against this aggregate id (random by default).
    pub fn with_aggregate_id(mut self, aggregate_id: Uuid) -> Self {
        self.aggregate_id = aggregate_id;
        self
    }

    /// A description of the case, printed in every failure message (the custom-message form
    /// of the assertions): `then_expect_events failed (overdraft is refused): …`.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The aggregate id commands run against.
    pub fn aggregate_id(&self) -> Uuid {
        self.aggregate_id
    }

    /// The aggregate's history: these events, in order, folded into the default state.
    pub fn given(self, events: impl IntoIterator<Item = A::Events>) -> Given<A> {
        let events: Vec<A::Events> = events.into_iter().collect();
        let mut state = A::State::default();
        for event in &events {
            self.aggregate.handle_event(&mut state, event);
        }
        Given {
            aggregate: self.aggregate,
            aggregate_id: self.aggregate_id,
            description: self.description,
            events,
            state,
        }
    }

    /// A new aggregate: no history, the default state.
    pub fn given_no_previous_events(self) -> Given<A> {
        self.given(Vec::new())
    }
}

/// The aggregate with its history; next, run a command with [`when`](Self::when) (async) or
/// [`when_blocking`](Self::when_blocking) (plain `#[test]`).
#[must_use = "nothing is tested until you call `when` (or `when_blocking`) and a `then_*` method"]
pub struct Given<A: Aggregate> {
    aggregate: A,
    aggregate_id: Uuid,
    description: Option<String>,
    events: Vec<A::Events>,
    state: A::State,
}

impl<A: Aggregate> Debug for Given<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Given")
            .field("aggregate", &A::NAME)
            .field("aggregate_id", &self.aggregate_id)
            .field("events", &self.events)
            .field("state", &self.state)
            .finish()
    }
}

impl<A: Aggregate> Given<A> {
    /// More history, after the events given so far.
    pub fn and(mut self, events: impl IntoIterator<Item = A::Events>) -> Self {
        for event in events {
            self.aggregate.handle_event(&mut self.state, &event);
            self.events.push(event);
        }
        self
    }

    /// The state the given events fold into: what the command will see.
    pub fn state(&self) -> &A::State {
        &self.state
    }

    /// Runs the command (`Aggregate::handle_command` on the given state). Await it in async
    /// tests; nothing is stored anywhere.
    pub async fn when(self, command: A::Commands) -> Then<A> {
        let shown = command.clone();
        let result = self
            .aggregate
            .handle_command(self.aggregate_id, &self.state, command)
            .await;
        let mut state = self.state;
        if let Ok(events) = &result {
            for event in events {
                self.aggregate.handle_event(&mut state, event);
            }
        }
        Then {
            aggregate_id: self.aggregate_id,
            description: self.description,
            given: self.events,
            command: shown,
            result,
            state,
        }
    }

    /// Runs the command like [`when`](Self::when), blocking, for plain `#[test]` functions:
    /// the command's future runs on a new current-thread Tokio runtime.
    ///
    /// # Panics
    /// When called inside a Tokio runtime (e.g. in `#[tokio::test]`): use
    /// `.when(command).await` there.
    #[track_caller]
    pub fn when_blocking(self, command: A::Commands) -> Then<A> {
        runtime::block_on("when", self.when(command))
    }
}

/// What a command did; assert on it with the `then_*` methods, which can be chained.
///
/// Events are compared by their stored form, the event name, version and JSON payload (so the
/// event type needs no `PartialEq`), and a failure names the first differing event and the
/// JSON path of the first differing field:
///
/// ```text
/// then_expect_events failed: the events differ
///   first difference: event #1 (MoneyWithdrawn v1): at `$.Withdrawn.amount`: expected 50, got 500
/// expected events:
///     1. Withdrawn { amount: 50 }
/// actual events:
///     1. Withdrawn { amount: 500 }
/// aggregate: bank_account 5a0c…
/// given:
///     1. Opened { owner: "alice" }
///     2. Deposited { amount: 1000 }
/// when:
///     Withdraw { amount: 500 }
/// ```
///
/// Every `then_*` method is `#[track_caller]`: the panic points at your test's line.
#[must_use = "nothing is checked until you call a `then_*` method"]
pub struct Then<A: Aggregate> {
    aggregate_id: Uuid,
    description: Option<String>,
    given: Vec<A::Events>,
    command: A::Commands,
    result: Result<Vec<A::Events>, A::Errors>,
    state: A::State,
}

impl<A: Aggregate> Debug for Then<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Then")
            .field("aggregate", &A::NAME)
            .field("aggregate_id", &self.aggregate_id)
            .field("given", &self.given)
            .field("command", &self.command)
            .field("result", &self.result)
            .field("state", &self.state)
            .finish()
    }
}

impl<A: Aggregate> Then<A> {
    /// The method's name, with the fixture's description if it has one.
    fn method(&self, name: &str) -> String {
        match &self.description {
            Some(description) => format!("{name} ({description})"),
            None => name.to_owned(),
        }
    }

    fn context(&self) -> String {
        format!(
            "aggregate: {} {}\ngiven:\n{}\nwhen:\n    {:?}",
            A::NAME,
            self.aggregate_id,
            report::list(&self.given),
            self.command
        )
    }

    /// Asserts that the command succeeded with exactly these events, in order.
    ///
    /// # Panics
    /// When the command failed or produced other events; the message shows the first
    /// differing event and field, both lists, the given events and the command.
    #[track_caller]
    pub fn then_expect_events(&self, expected: impl IntoIterator<Item = A::Events>) -> &Self {
        let expected: Vec<A::Events> = expected.into_iter().collect();
        outcome::expect_events(
            &self.method("then_expect_events"),
            &self.context(),
            &self.result,
            &expected,
        );
        self
    }

    /// Asserts that the command succeeded and changed nothing (no events).
    ///
    /// # Panics
    /// When the command failed or produced events.
    #[track_caller]
    pub fn then_expect_no_events(&self) -> &Self {
        outcome::expect_events(
            &self.method("then_expect_no_events"),
            &self.context(),
            &self.result,
            &[],
        );
        self
    }

    /// Asserts that the command failed with this error (compared with `PartialEq`).
    ///
    /// # Panics
    /// When the command succeeded or failed with another error.
    #[track_caller]
    pub fn then_expect_error(&self, expected: A::Errors) -> &Self
    where
        A::Errors: PartialEq,
    {
        outcome::expect_error(
            &self.method("then_expect_error"),
            &self.context(),
            &self.result,
            &expected,
        );
        self
    }

    /// Asserts that the command failed with an error whose `Display` text is exactly
    /// `expected`; for error types without `PartialEq`.
    ///
    /// # Panics
    /// When the command succeeded or failed with another message.
    #[track_caller]
    pub fn then_expect_error_message(&self, expected: &str) -> &Self {
        outcome::expect_error_message(
            &self.method("then_expect_error_message"),
            &self.context(),
            &self.result,
            expected,
        );
        self
    }

    /// Asserts that the command failed with an error for which `predicate` is true, e.g.
    /// `|e| matches!(e, MyError::Refused { .. })`.
    ///
    /// # Panics
    /// When the command succeeded or the predicate is false.
    #[track_caller]
    pub fn then_expect_error_matching(&self, predicate: impl FnOnce(&A::Errors) -> bool) -> &Self {
        outcome::expect_error_matching(
            &self.method("then_expect_error_matching"),
            &self.context(),
            &self.result,
            "the predicate",
            predicate,
        );
        self
    }

    /// Asserts on the state after the command: the given events and the command's events
    /// folded with `Aggregate::handle_event` (just the given events if the command failed).
    /// States are compared by their JSON form, so `State` needs no `PartialEq`; a failure
    /// names the first differing field.
    ///
    /// # Panics
    /// When the state differs.
    #[track_caller]
    pub fn then_expect_state(&self, expected: A::State) -> &Self {
        if let Some(difference) = report::first_json_difference(
            &report::to_json(&expected),
            &report::to_json(&self.state),
        ) {
            outcome::fail(
                &self.method("then_expect_state"),
                format_args!(
                    "the state differs\n  first difference: {difference}\n  expected state: {expected:?}\n  actual state:   {:?}\nresult of the command: {}",
                    self.state,
                    self.describe_result()
                ),
                &self.context(),
            );
        }
        self
    }

    /// Runs your own assertions on the state after the command (see
    /// [`then_expect_state`](Self::then_expect_state) for what that state is).
    pub fn then_verify_state(&self, check: impl FnOnce(&A::State)) -> &Self {
        check(&self.state);
        self
    }

    /// The state after the command.
    pub fn state(&self) -> &A::State {
        &self.state
    }

    /// The command's raw result: its events, or its error.
    pub fn result(&self) -> &Result<Vec<A::Events>, A::Errors> {
        &self.result
    }

    /// The command's raw result, by value.
    pub fn into_result(self) -> Result<Vec<A::Events>, A::Errors> {
        self.result
    }

    /// The events that were given.
    pub fn given_events(&self) -> &[A::Events] {
        &self.given
    }

    /// The command that ran.
    pub fn command(&self) -> &A::Commands {
        &self.command
    }

    fn describe_result(&self) -> String {
        match &self.result {
            Ok(events) => format!("events\n{}", report::list(events)),
            Err(error) => format!("error {}", report::error(error)),
        }
    }
}
