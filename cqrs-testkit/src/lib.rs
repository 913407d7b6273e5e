//! Given/when/then fixtures for [`cqrs`] aggregates and views, a scenario fixture that runs
//! the real framework on in-memory stores, and a conformance suite for event stores.
//!
//! | What you test | Fixture | Needs |
//! |---|---|---|
//! | an aggregate's decisions | [`AggregateFixture`] → [`Given`] → [`Then`] | nothing but the aggregate |
//! | a view's `handle_event` | [`ViewFixture`] → [`ViewThen`] | nothing but the view |
//! | commands through `CQRSFramework`, stored envelopes, projected views | [`Scenario`] → [`Dispatched`] | in-memory stores (made for you) |
//! | a process manager's decisions: commands, state, deadlines, completion | [`ProcessFixture`] → [`ProcessGiven`] → [`ProcessThen`] | nothing but the process manager |
//! | a workflow across aggregates: commands, process runners, deadlines, correlation and causation | [`WorkflowScenario`] → [`Workflow`] | in-memory stores, your frameworks and routers |
//! | what your code does when the store fails: a lost race, a server gone, a lost answer | [`FaultyStore`] | in memory, or the store you wrap |
//! | an `EventRepository` implementation | [`conformance::check_event_repository`] | a [`conformance::StoreHarness`] |
//! | that every stored event version still decodes | [`schema_lock::SchemaLock`] | recorded payloads committed in your crate |
//!
//! # Both test styles, no nested runtimes
//!
//! Every step that runs a command exists twice:
//!
//! * `async`: `.when(command).await`, for `#[tokio::test]` (or any async context). It uses
//!   the runtime that is already running.
//! * blocking: `.when_blocking(command)`, for a plain `#[test]`. It builds a current-thread
//!   Tokio runtime for that one call. Called inside a running runtime it panics and tells you
//!   to use `.when(..).await` instead: it never starts a runtime inside a runtime.
//!
//! Everything else (the `given` steps, every `then_*` assertion, reading stores and views
//! in a [`Scenario`]) is a plain function, the same in both styles.
//!
//! # Failures point at your test
//!
//! Each stage ([`AggregateFixture`], [`Given`], [`Then`], …) is `#[must_use]`, so a chain
//! that forgets its assertion warns. Every `then_*` method is `#[track_caller]`, so a
//! failure is reported at the line of your test, and its message shows what was given, the
//! command, and expected against actual, starting with the first difference: the event
//! number and the JSON path of the first differing field. Events, states and views are
//! compared by their JSON form (they are all `Serialize`), so none of them needs
//! `PartialEq`; errors are compared with `PartialEq` ([`Then::then_expect_error`]), by
//! message ([`Then::then_expect_error_message`]) or with a predicate
//! ([`Then::then_expect_error_matching`]). `CQRSError` is `PartialEq`, so a domain error
//! that wraps it (`Framework(#[from] CQRSError)`, as below) derives `PartialEq` as well. Give a fixture a description with
//! `with_description("overdraft is refused")` and every failure message names it:
//! `then_expect_events (overdraft is refused) failed: …`.
//!
//! ```text
//! then_expect_events failed: the events differ
//!   first difference: event #1 (CounterIncremented v1): at `$.Incremented.by`: expected 4, got 5
//! expected events:
//!     1. Incremented { by: 4 }
//! actual events:
//!     1. Incremented { by: 5 }
//! aggregate: counter 0b5c0b3e-…
//! given:
//!     1. Incremented { by: 3 }
//! when:
//!     Increment { by: 5 }
//! ```
//!
//! # The aggregate fixture
//!
//! The examples below share this small domain: a counter that refuses to go above 10, and a
//! view of its statistics.
//!
//! ```
//! use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
//! use serde::{Deserialize, Serialize};
//! use uuid::Uuid;
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
//! enum CounterEvent {
//!     #[event(name = "CounterIncremented", version = "1")]
//!     Incremented { by: u32 },
//!     #[event(name = "CounterReset", version = "1")]
//!     Reset,
//! }
//!
//! #[derive(Debug, Clone)]
//! enum CounterCommand {
//!     Increment { by: u32 },
//!     Reset,
//! }
//!
//! #[derive(Debug, PartialEq, thiserror::Error)]
//! enum CounterError {
//!     #[error("too big: {value} + {by} > 10")]
//!     TooBig { value: u32, by: u32 },
//!     #[error(transparent)]
//!     Framework(#[from] CQRSError),
//! }
//!
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! struct CounterState {
//!     value: u32,
//! }
//!
//! #[derive(Default)]
//! struct Counter;
//!
//! impl Aggregate for Counter {
//!     const NAME: &'static str = "counter";
//!     type Events = CounterEvent;
//!     type Commands = CounterCommand;
//!     type Errors = CounterError;
//!     type State = CounterState;
//!
//!     async fn handle_command(
//!         &self,
//!         _id: Uuid,
//!         state: &CounterState,
//!         command: CounterCommand,
//!     ) -> Result<Vec<CounterEvent>, CounterError> {
//!         match command {
//!             CounterCommand::Increment { by } if state.value + by > 10 => {
//!                 Err(CounterError::TooBig { value: state.value, by })
//!             }
//!             CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
//!             CounterCommand::Reset if state.value == 0 => Ok(vec![]),
//!             CounterCommand::Reset => Ok(vec![CounterEvent::Reset]),
//!         }
//!     }
//!
//!     fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
//!         match event {
//!             CounterEvent::Incremented { by } => state.value += by,
//!             CounterEvent::Reset => state.value = 0,
//!         }
//!     }
//! }
//!
//! /// How often each counter was incremented, and by how much in all.
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! struct CounterStats {
//!     increments: u32,
//!     total: u64,
//! }
//!
//! impl View<Counter> for CounterStats {
//!     const TABLE_NAME: &'static str = "counter_stats";
//!     const VERSION: u64 = 1;
//!
//!     fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
//!         if let CounterEvent::Incremented { by } = envelope.event {
//!             self.increments += 1;
//!             self.total += u64::from(by);
//!         }
//!         Ok(())
//!     }
//! }
//!
//! use cqrs_testkit::AggregateFixture;
//!
//! // A plain #[test]:
//! fn increment_adds_to_the_value() {
//!     AggregateFixture::<Counter>::new()
//!         .given([CounterEvent::Incremented { by: 3 }])
//!         .when_blocking(CounterCommand::Increment { by: 4 })
//!         .then_expect_events([CounterEvent::Incremented { by: 4 }])
//!         .then_verify_state(|state| assert_eq!(state.value, 7));
//! }
//!
//! // A #[tokio::test]:
//! async fn increment_past_ten_is_refused() {
//!     let then = AggregateFixture::<Counter>::new()
//!         .given([CounterEvent::Incremented { by: 8 }])
//!         .when(CounterCommand::Increment { by: 4 })
//!         .await;
//!     then.then_expect_error(CounterError::TooBig { value: 8, by: 4 })
//!         .then_expect_error_message("too big: 8 + 4 > 10")
//!         .then_expect_error_matching(|e| matches!(e, CounterError::TooBig { .. }))
//!         // A refused command leaves the state as the given events made it.
//!         .then_expect_state(CounterState { value: 8 });
//!     // The raw result, for anything else.
//!     assert!(then.result().is_err());
//! }
//!
//! // Commands that change nothing, and the state the given events fold into.
//! fn reset_of_a_new_counter_changes_nothing() {
//!     let given = AggregateFixture::<Counter>::new().given_no_previous_events();
//!     assert_eq!(given.state().value, 0);
//!     given.when_blocking(CounterCommand::Reset).then_expect_no_events();
//! }
//! # increment_adds_to_the_value();
//! # reset_of_a_new_counter_changes_nothing();
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(increment_past_ten_is_refused());
//! ```
//!
//! # The view fixture
//!
//! Given events, in envelopes the fixture makes (sequences 1, 2, …) or that you make with
//! [`envelope`], the view's state after `View::handle_event`:
//!
//! ```
//! # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
//! # use serde::{Deserialize, Serialize};
//! # use uuid::Uuid;
//! #
//! # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
//! # enum CounterEvent {
//! #     #[event(name = "CounterIncremented", version = "1")]
//! #     Incremented { by: u32 },
//! #     #[event(name = "CounterReset", version = "1")]
//! #     Reset,
//! # }
//! #
//! # #[derive(Debug, Clone)]
//! # enum CounterCommand {
//! #     Increment { by: u32 },
//! #     Reset,
//! # }
//! #
//! # #[derive(Debug, PartialEq, thiserror::Error)]
//! # enum CounterError {
//! #     #[error("too big: {value} + {by} > 10")]
//! #     TooBig { value: u32, by: u32 },
//! #     #[error(transparent)]
//! #     Framework(#[from] CQRSError),
//! # }
//! #
//! # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! # struct CounterState {
//! #     value: u32,
//! # }
//! #
//! # #[derive(Default)]
//! # struct Counter;
//! #
//! # impl Aggregate for Counter {
//! #     const NAME: &'static str = "counter";
//! #     type Events = CounterEvent;
//! #     type Commands = CounterCommand;
//! #     type Errors = CounterError;
//! #     type State = CounterState;
//! #
//! #     async fn handle_command(
//! #         &self,
//! #         _id: Uuid,
//! #         state: &CounterState,
//! #         command: CounterCommand,
//! #     ) -> Result<Vec<CounterEvent>, CounterError> {
//! #         match command {
//! #             CounterCommand::Increment { by } if state.value + by > 10 => {
//! #                 Err(CounterError::TooBig { value: state.value, by })
//! #             }
//! #             CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
//! #             CounterCommand::Reset if state.value == 0 => Ok(vec![]),
//! #             CounterCommand::Reset => Ok(vec![CounterEvent::Reset]),
//! #         }
//! #     }
//! #
//! #     fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
//! #         match event {
//! #             CounterEvent::Incremented { by } => state.value += by,
//! #             CounterEvent::Reset => state.value = 0,
//! #         }
//! #     }
//! # }
//! #
//! # /// How often each counter was incremented, and by how much in all.
//! # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! # struct CounterStats {
//! #     increments: u32,
//! #     total: u64,
//! # }
//! #
//! # impl View<Counter> for CounterStats {
//! #     const TABLE_NAME: &'static str = "counter_stats";
//! #     const VERSION: u64 = 1;
//! #
//! #     fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
//! #         if let CounterEvent::Incremented { by } = envelope.event {
//! #             self.increments += 1;
//! #             self.total += u64::from(by);
//! #         }
//! #         Ok(())
//! #     }
//! # }
//! use cqrs_testkit::{envelope, ViewFixture};
//!
//! ViewFixture::<Counter, CounterStats>::new()
//!     .given([
//!         CounterEvent::Incremented { by: 2 },
//!         CounterEvent::Reset,
//!         CounterEvent::Incremented { by: 5 },
//!     ])
//!     .then_expect_view(CounterStats { increments: 2, total: 7 });
//!
//! // Events of two counters: one view instance each (the view id is the aggregate id).
//! let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
//! let then = ViewFixture::<Counter, CounterStats>::new().given_envelopes([
//!     envelope::<Counter>(a, 1, CounterEvent::Incremented { by: 1 }),
//!     envelope::<Counter>(b, 1, CounterEvent::Incremented { by: 9 }),
//!     envelope::<Counter>(a, 2, CounterEvent::Incremented { by: 2 }),
//! ]);
//! then.then_expect_view_for(&a.to_string(), CounterStats { increments: 2, total: 3 })
//!     .then_expect_view_for(&b.to_string(), CounterStats { increments: 1, total: 9 });
//! assert_eq!(then.views().len(), 2);
//! ```
//!
//! # The scenario fixture
//!
//! A real `CQRSFramework` on a `MemoryEventRepository`: several commands on several
//! aggregates, then the stored envelopes (sequence, event type, version, payload, metadata),
//! the states the framework loads, and views built by a real `Projection`:
//!
//! ```
//! # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
//! # use serde::{Deserialize, Serialize};
//! # use uuid::Uuid;
//! #
//! # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
//! # enum CounterEvent {
//! #     #[event(name = "CounterIncremented", version = "1")]
//! #     Incremented { by: u32 },
//! #     #[event(name = "CounterReset", version = "1")]
//! #     Reset,
//! # }
//! #
//! # #[derive(Debug, Clone)]
//! # enum CounterCommand {
//! #     Increment { by: u32 },
//! #     Reset,
//! # }
//! #
//! # #[derive(Debug, PartialEq, thiserror::Error)]
//! # enum CounterError {
//! #     #[error("too big: {value} + {by} > 10")]
//! #     TooBig { value: u32, by: u32 },
//! #     #[error(transparent)]
//! #     Framework(#[from] CQRSError),
//! # }
//! #
//! # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! # struct CounterState {
//! #     value: u32,
//! # }
//! #
//! # #[derive(Default)]
//! # struct Counter;
//! #
//! # impl Aggregate for Counter {
//! #     const NAME: &'static str = "counter";
//! #     type Events = CounterEvent;
//! #     type Commands = CounterCommand;
//! #     type Errors = CounterError;
//! #     type State = CounterState;
//! #
//! #     async fn handle_command(
//! #         &self,
//! #         _id: Uuid,
//! #         state: &CounterState,
//! #         command: CounterCommand,
//! #     ) -> Result<Vec<CounterEvent>, CounterError> {
//! #         match command {
//! #             CounterCommand::Increment { by } if state.value + by > 10 => {
//! #                 Err(CounterError::TooBig { value: state.value, by })
//! #             }
//! #             CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
//! #             CounterCommand::Reset if state.value == 0 => Ok(vec![]),
//! #             CounterCommand::Reset => Ok(vec![CounterEvent::Reset]),
//! #         }
//! #     }
//! #
//! #     fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
//! #         match event {
//! #             CounterEvent::Incremented { by } => state.value += by,
//! #             CounterEvent::Reset => state.value = 0,
//! #         }
//! #     }
//! # }
//! #
//! # /// How often each counter was incremented, and by how much in all.
//! # #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! # struct CounterStats {
//! #     increments: u32,
//! #     total: u64,
//! # }
//! #
//! # impl View<Counter> for CounterStats {
//! #     const TABLE_NAME: &'static str = "counter_stats";
//! #     const VERSION: u64 = 1;
//! #
//! #     fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
//! #         if let CounterEvent::Incremented { by } = envelope.event {
//! #             self.increments += 1;
//! #             self.total += u64::from(by);
//! #         }
//! #         Ok(())
//! #     }
//! # }
//! use cqrs_testkit::{Scenario, Stored};
//! use serde_json::json;
//!
//! # async fn scenario() {
//! let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
//! let scenario = Scenario::<Counter>::new().given(a, [CounterEvent::Incremented { by: 1 }]);
//!
//! scenario
//!     .when_with_metadata(a, CounterCommand::Increment { by: 2 }, &json!({ "user": "alice" }))
//!     .await
//!     .then_expect_events([CounterEvent::Incremented { by: 2 }])
//!     .then_expect_stored([Stored::event(&CounterEvent::Incremented { by: 2 })
//!         .at_sequence(2)
//!         .with_metadata(json!({ "user": "alice" }))]);
//! scenario
//!     .when(b, CounterCommand::Increment { by: 11 })
//!     .await
//!     .then_expect_error_message("too big: 0 + 11 > 10");
//! scenario.when(b, CounterCommand::Increment { by: 4 }).await;
//!
//! scenario
//!     .then_expect_stored(a, [
//!         Stored::named("CounterIncremented", "1").at_sequence(1).with_metadata(json!(null)),
//!         Stored::named("CounterIncremented", "1").at_sequence(2),
//!     ])
//!     .then_expect_events(b, [CounterEvent::Incremented { by: 4 }])
//!     .then_expect_state(a, CounterState { value: 3 })
//!     .then_expect_view(a, CounterStats { increments: 2, total: 3 })
//!     .then_expect_view(b, CounterStats { increments: 1, total: 4 });
//! assert_eq!(scenario.all_events().len(), 3);
//! # }
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(scenario());
//! ```
//!
//! In a plain `#[test]`, use `when_blocking` and `when_with_metadata_blocking`; the rest is
//! the same.
//!
//! # Process managers
//!
//! [`ProcessFixture`] tests a [`ProcessManager`](cqrs::ProcessManager)'s pure decisions:
//! given the inputs an instance saw, when one more arrives
//! ([`when`](ProcessGiven::when)), a command it sent is refused
//! ([`when_refused`](ProcessGiven::when_refused)) or time passes
//! ([`when_time_passes`](ProcessGiven::when_time_passes)), then the commands that step sent,
//! the state, the pending deadlines (name and time from now) and completion. Each input is
//! given with the aggregate it comes from, [`on(aggregate_id, input)`](on), so that
//! `ProcessManager::instance_id` routes it as the runner would; `.of::<A>()` sets the
//! aggregate type when the process reads it. A step's result takes the next step, so a whole
//! conversation is one chain:
//!
//! ```text
//! ProcessFixture::new(TransferSaga)
//!     .given([
//!         on(transfer, SagaInput::Transfer(requested)).of::<Transfer>(),
//!         on(from, SagaInput::Account(debited)).of::<Account>(),
//!     ])
//!     .when_refused(credit.clone(), "account frozen")
//!     .then_expect_no_commands()
//!     .then_expect_deadlines([(RETRY_DEADLINE, CREDIT_RETRY), (CREDIT_DEADLINE, CREDIT_TIMEOUT)])
//!     .when_time_passes(CREDIT_RETRY)
//!     .then_expect_commands([credit]);
//! ```
//!
//! [`WorkflowScenario`] runs the real thing on the in-memory store: your aggregates'
//! frameworks, one or more `ProcessRunner`s on a shared `ManualClock`; it dispatches one
//! command under a new `CommandContext`, runs every runner until none has anything to do, and
//! [`advance`](WorkflowScenario::advance)s the clock. The [`Workflow`] it returns asserts on
//! the events that carry the workflow's correlation id, across aggregates and in global
//! order ([`then_expect_history`](Workflow::then_expect_history)), and on their causation
//! links ([`then_expect_causation`](Workflow::then_expect_causation),
//! [`then_expect_events_per_command`](Workflow::then_expect_events_per_command)). Both are
//! used on the transfer saga in `examples/tests/transfer_fixture.rs`, and each type's docs
//! have a complete example.
//!
//! # The schema lock
//!
//! [`schema_lock::SchemaLock`] keeps a recorded payload of every (name, version) an event type
//! reads in a folder of your crate, and fails a test, naming the event and version, when one
//! of them no longer decodes: changing an event's shape without a new version and an
//! `#[event(upcast(..))]` step fails CI. Record with `CQRS_SCHEMA_LOCK=record cargo test`,
//! review the new files with `git diff`, commit them. See the module for the workflow.
//!
//! # The store conformance suite
//!
//! A store author checks a new [`EventRepository`](cqrs::EventRepository) against the whole
//! contract (appends and loads, expected-sequence conflicts, atomic batches, idempotent
//! retries, global order and paging, concurrent writers, damaged rows giving typed errors)
//! by implementing [`conformance::StoreHarness`] and calling
//! [`conformance::check_event_repository`]; see the [`conformance`] module.
//!
//! ```
//! use cqrs_testkit::conformance::{check_event_repository, MemoryHarness};
//!
//! #[tokio::test(flavor = "multi_thread")]
//! async fn memory_store_conforms() {
//!     check_event_repository(&MemoryHarness).await;
//! }
//! # fn main() {}
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod aggregate;
pub mod conformance;
mod faulty;
mod outcome;
mod process;
mod process_scenario;
mod report;
mod runtime;
mod scenario;
pub mod schema_lock;
mod view;

pub use crate::aggregate::{AggregateFixture, Given, Then};
pub use crate::faulty::{Calls, Fault, FaultyStore};
pub use crate::process::{
    on, ProcessEvent, ProcessFixture, ProcessGiven, ProcessThen, SentCommand,
};
pub use crate::process_scenario::{Happened, Workflow, WorkflowScenario};
pub use crate::scenario::{Dispatched, Scenario, Stored};
pub use crate::view::{envelope, ViewFixture, ViewThen};
