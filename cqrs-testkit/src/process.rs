//! The process-manager fixture: given inputs, when an input arrives, a command is refused or
//! time passes, then the commands sent, the state, the pending deadlines, completion.

use std::collections::HashMap;
use std::fmt::{self, Debug};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs::{
    derived_command_id, Aggregate, Deadline, Effects, EventEnvelope, ProcessManager, Refused,
};
use serde_json::Value;
use uuid::Uuid;

use crate::{outcome, report};

/// How many rounds of deadlines one [`ProcessGiven::when_time_passes`] fires before it gives
/// up: a process that keeps setting deadlines already due would otherwise never stop.
const MAX_DEADLINE_ROUNDS: usize = 64;

/// One input for a [`ProcessFixture`], in the envelope a runner would hand the process:
/// which aggregate it comes from, and (if you care) its event id, sequence, metadata,
/// correlation and causation ids. Make one with [`on`].
///
/// Unset fields are filled in by the fixture: a new random event id, the next sequence of
/// that aggregate in the fixture (1, 2, …), the next global position, `null` metadata, no
/// correlation or causation id, the fixture's current time as timestamp. The aggregate type
/// is empty unless set with [`of`](Self::of) or [`of_type`](Self::of_type): most process
/// managers tell inputs apart by their variant and never read it.
#[derive(Debug, Clone)]
pub struct ProcessEvent<I> {
    aggregate_type: String,
    aggregate_id: Uuid,
    input: I,
    event_id: Option<Uuid>,
    sequence: Option<i64>,
    metadata: Value,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
}

/// The input `input` as an event of the aggregate `aggregate_id`, for
/// [`ProcessFixture::given`] and [`ProcessGiven::when`]:
/// `on(transfer_id, SagaInput::Transfer(TransferEvent::Completed))`.
///
/// ```
/// # use cqrs::doc::{Counter, CounterEvent};
/// use cqrs_testkit::on;
///
/// let id = uuid::Uuid::new_v4();
/// let event = on(id, CounterEvent::Incremented { by: 1 }).of::<Counter>().at_sequence(3);
/// # let _ = event;
/// ```
pub fn on<I>(aggregate_id: Uuid, input: I) -> ProcessEvent<I> {
    ProcessEvent {
        aggregate_type: String::new(),
        aggregate_id,
        input,
        event_id: None,
        sequence: None,
        metadata: Value::Null,
        correlation_id: None,
        causation_id: None,
    }
}

impl<I> ProcessEvent<I> {
    /// Comes from an aggregate of type `A` (the envelope's aggregate type is `A::NAME`).
    #[must_use]
    pub fn of<A: Aggregate>(self) -> Self {
        self.of_type(A::NAME)
    }

    /// Comes from an aggregate of this type name.
    #[must_use]
    pub fn of_type(mut self, aggregate_type: impl Into<String>) -> Self {
        self.aggregate_type = aggregate_type.into();
        self
    }

    /// Carries this event id (the cause the process's command ids derive from).
    #[must_use]
    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.event_id = Some(event_id);
        self
    }

    /// Is at this sequence of its aggregate (later inputs of the aggregate follow it).
    #[must_use]
    pub fn at_sequence(mut self, sequence: i64) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// Carries this metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Belongs to the workflow `correlation_id`.
    #[must_use]
    pub fn correlated_with(mut self, correlation_id: Uuid) -> Self {
        self.correlation_id = Some(correlation_id);
        self
    }

    /// Was caused by the command `causation_id`.
    #[must_use]
    pub fn caused_by(mut self, causation_id: Uuid) -> Self {
        self.causation_id = Some(causation_id);
        self
    }
}

/// A command the process sent in a [`ProcessFixture`], with the id the runner would send it
/// under ([`derived_command_id`] of the process's name and instance, the event or deadline
/// that caused it, and its index among the commands of that cause).
#[derive(Debug, Clone, PartialEq)]
pub struct SentCommand<C> {
    /// The command.
    pub command: C,
    /// Its id.
    pub command_id: Uuid,
}

/// A sent command and where its id came from (a refusal's commands continue the index).
#[derive(Clone)]
struct Sent<C> {
    sent: SentCommand<C>,
    cause: Uuid,
}

/// Tests a [`ProcessManager`]'s decisions without a store, a runner or a runtime: start
/// here.
///
/// [`given`](Self::given) the inputs the instance already saw, then one step —
/// [`when`](ProcessGiven::when) an input arrives, [`when_refused`](ProcessGiven::when_refused)
/// a command it sent is refused, [`when_time_passes`](ProcessGiven::when_time_passes) — and
/// assert with the `then_*` methods of [`ProcessThen`] on the commands that step sent, the
/// state, the pending deadlines and completion. A [`ProcessThen`] takes further steps
/// (`.when(..)` again), so a whole conversation is one chain. Commands are compared with
/// `PartialEq`, which the process's command type must implement.
///
/// The fixture follows one instance, as the runner keeps one row per instance: the first
/// input for which [`ProcessManager::instance_id`] names an instance (or the one set with
/// [`for_instance`](Self::for_instance)). Inputs of no instance or of another instance are
/// ignored, and so is every input after the instance completed, as the runner would.
/// Deadlines are kept as the runner keeps them (set, replaced, cancelled, dropped on
/// completion) on a clock of the fixture's own that starts at 2026-01-01T00:00:00Z (see
/// [`starting_at`](Self::starting_at)) and moves only with `when_time_passes`; a deadline
/// that came fires once, in order of due time, unless a deadline fired before it cancels it.
///
/// ```
/// # use std::time::Duration;
/// # use cqrs::doc::{Counter, CounterCommand, CounterEvent};
/// # use cqrs::{CQRSError, Deadline, Effects, EventEnvelope, PersistableDomainEvent, ProcessInput, ProcessManager};
/// # use uuid::Uuid;
/// # #[derive(Debug, Clone)]
/// # enum Input { Counter(CounterEvent) }
/// # impl ProcessInput for Input {
/// #     fn decode(_: &PersistableDomainEvent) -> Result<Vec<Self>, CQRSError> { Ok(Vec::new()) }
/// # }
/// /// Resets a counter once it reached 8, and nudges it (+1) when it stood still for a minute.
/// struct Watchdog;
///
/// #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
/// struct Watched { counter: Uuid, total: u64 }
///
/// impl ProcessManager for Watchdog {
///     const NAME: &'static str = "watchdog";
///     type Input = Input;
///     type State = Watched;
///     type Command = (Uuid, CounterCommand);
///
///     fn instance_id(event: &EventEnvelope<Input>) -> Option<String> {
///         Some(event.aggregate_id.to_string())
///     }
///
///     fn on_event(&self, state: &mut Watched, event: &EventEnvelope<Input>, effects: &mut Effects<Self::Command>) {
///         let Input::Counter(CounterEvent::Incremented { by }) = event.event else { return };
///         state.counter = event.aggregate_id;
///         state.total += by;
///         if state.total >= 8 {
///             effects.send((state.counter, CounterCommand::Reset));
///             effects.complete();
///         } else {
///             effects.wake_in("nudge", Duration::from_secs(60));
///         }
///     }
///
///     fn on_deadline(&self, state: &mut Watched, _: &Deadline, effects: &mut Effects<Self::Command>) {
///         effects.send((state.counter, CounterCommand::Increment { by: 1 }));
///     }
/// }
///
/// use cqrs_testkit::{on, ProcessFixture};
///
/// let id = Uuid::new_v4();
/// ProcessFixture::new(Watchdog)
///     .given([on(id, Input::Counter(CounterEvent::Incremented { by: 3 }))])
///     .when(on(id, Input::Counter(CounterEvent::Incremented { by: 2 })))
///     .then_expect_no_commands()
///     .then_expect_deadlines([("nudge", Duration::from_secs(60))])
///     .when_time_passes(Duration::from_secs(60))
///     .then_expect_commands([(id, CounterCommand::Increment { by: 1 })])
///     .then_expect_no_deadlines()
///     .when(on(id, Input::Counter(CounterEvent::Incremented { by: 3 })))
///     .then_expect_commands([(id, CounterCommand::Reset)])
///     .then_expect_completed()
///     .then_verify_state(|state| assert_eq!(state.total, 8));
/// ```
#[must_use = "a fixture does nothing until you call `given` or `given_no_previous_events`"]
pub struct ProcessFixture<P: ProcessManager> {
    run: Run<P>,
}

impl<P: ProcessManager> Debug for ProcessFixture<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessFixture")
            .field("process", &P::NAME)
            .field("instance", &self.run.instance)
            .field("now", &self.run.now)
            .finish()
    }
}

impl<P: ProcessManager + Default> Default for ProcessFixture<P> {
    fn default() -> Self {
        Self::new(P::default())
    }
}

impl<P: ProcessManager> ProcessFixture<P> {
    /// A fixture for this process manager (with its services, if it holds any).
    pub fn new(manager: P) -> Self {
        let start = DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default();
        ProcessFixture {
            run: Run {
                manager: Arc::new(manager),
                description: None,
                instance: None,
                state: P::State::default(),
                deadlines: Vec::new(),
                completed: false,
                start,
                now: start,
                position: 0,
                sequences: HashMap::new(),
                sent: Vec::new(),
                next_index: HashMap::new(),
                history: Vec::new(),
            },
        }
    }

    /// Follows this instance from the start (by default, the first one an input names).
    pub fn for_instance(mut self, instance: impl Into<String>) -> Self {
        self.run.instance = Some(instance.into());
        self
    }

    /// Starts the fixture's clock at `start` (default 2026-01-01T00:00:00Z).
    pub fn starting_at(mut self, start: DateTime<Utc>) -> Self {
        self.run.start = start;
        self.run.now = start;
        self
    }

    /// A description of the case, printed in every failure message:
    /// `then_expect_commands (refused debit) failed: …`.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.run.description = Some(description.into());
        self
    }

    /// The inputs the instance already saw, decided on in order (the commands they sent are
    /// not asserted on, but a later [`when_refused`](ProcessGiven::when_refused) may refuse
    /// them).
    pub fn given(
        mut self,
        inputs: impl IntoIterator<Item = ProcessEvent<P::Input>>,
    ) -> ProcessGiven<P>
    where
        P::Command: PartialEq,
    {
        for input in inputs {
            self.run.event(input);
        }
        ProcessGiven { run: self.run }
    }

    /// No input yet: the instance's default state.
    pub fn given_no_previous_events(self) -> ProcessGiven<P>
    where
        P::Command: PartialEq,
    {
        self.given(Vec::new())
    }
}

/// The instance after the given inputs; next, one step: [`when`](Self::when),
/// [`when_refused`](Self::when_refused) or [`when_time_passes`](Self::when_time_passes).
#[must_use = "nothing is tested until you call a `when*` step and a `then_*` method"]
pub struct ProcessGiven<P: ProcessManager> {
    run: Run<P>,
}

impl<P: ProcessManager> Debug for ProcessGiven<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.run.fmt_fields(&mut f.debug_struct("ProcessGiven"))
    }
}

impl<P: ProcessManager> ProcessGiven<P>
where
    P::Command: PartialEq,
{
    /// More inputs, after those given so far.
    pub fn and(mut self, inputs: impl IntoIterator<Item = ProcessEvent<P::Input>>) -> Self {
        for input in inputs {
            self.run.event(input);
        }
        self
    }

    /// The state the given inputs folded into.
    pub fn state(&self) -> &P::State {
        &self.run.state
    }

    /// An input arrives: `ProcessManager::on_event`, if it belongs to the instance.
    pub fn when(mut self, input: ProcessEvent<P::Input>) -> ProcessThen<P> {
        let given = self.run.history.len();
        let commands = self.run.event(input);
        ProcessThen {
            run: self.run,
            given,
            commands,
        }
    }

    /// The target of `command`, which the process sent before, refuses it with `reason`
    /// (the domain error's message): `ProcessManager::on_refused`. As in the runner, a
    /// refusal is decided on even when the decision that sent the command completed the
    /// instance.
    ///
    /// # Panics
    /// When the process never sent `command` (the runner hands back only what was sent).
    #[track_caller]
    pub fn when_refused(
        mut self,
        command: P::Command,
        reason: impl Into<String>,
    ) -> ProcessThen<P> {
        let given = self.run.history.len();
        let commands = self.run.refused(command, reason.into());
        ProcessThen {
            run: self.run,
            given,
            commands,
        }
    }

    /// The clock moves on by `by`; the deadlines that came fire in order of due time
    /// (`ProcessManager::on_deadline`), each once, skipping those a deadline fired before
    /// cancelled, then those that came due through the firings, until none is due, as the
    /// runner's `run_until_idle` does.
    ///
    /// # Panics
    /// When deadlines keep coming due after 64 rounds.
    #[track_caller]
    pub fn when_time_passes(mut self, by: Duration) -> ProcessThen<P> {
        let given = self.run.history.len();
        let commands = self.run.time_passes(by);
        ProcessThen {
            run: self.run,
            given,
            commands,
        }
    }
}

/// What one step did; assert with the `then_*` methods (chainable, `#[track_caller]`), and
/// go on with another step (`when`, `when_refused`, `when_time_passes`): the step becomes
/// part of what was given.
///
/// Commands are compared with `PartialEq`, states by their JSON form; a failure shows the
/// first difference, both lists, the inputs given and the step:
///
/// ```text
/// then_expect_commands failed: the commands differ
///   first difference: command #1: expected Account(…, Credit { transfer: …, amount: 30 }), got Account(…, Refund { transfer: …, amount: 30 })
/// expected commands:
///     1. Account(…, Credit { transfer: …, amount: 30 })
/// actual commands:
///     1. Account(…, Refund { transfer: …, amount: 30 })
/// process: transfer_saga, instance 5a0c…
/// time: start + 30s
/// given:
///     1. transfer 5a0c… #1: Transfer(Requested { … })
///     2. transfer_account 9e1f… #2: Account(Debited { … })
/// when:
///     time passes 30s: deadline "credit" (due start + 30s) fired
/// ```
#[must_use = "nothing is checked until you call a `then_*` method"]
pub struct ProcessThen<P: ProcessManager> {
    run: Run<P>,
    /// How many history lines come before this step.
    given: usize,
    commands: Vec<P::Command>,
}

impl<P: ProcessManager> Debug for ProcessThen<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.run.fmt_fields(
            f.debug_struct("ProcessThen")
                .field("commands", &self.commands),
        )
    }
}

impl<P: ProcessManager> ProcessThen<P>
where
    P::Command: PartialEq,
{
    fn method(&self, name: &str) -> String {
        match &self.run.description {
            Some(description) => format!("{name} ({description})"),
            None => name.to_owned(),
        }
    }

    fn context(&self) -> String {
        let given = as_lines(&self.run.history[..self.given]);
        let when = as_lines(&self.run.history[self.given..]);
        format!(
            "process: {}, instance {}\ntime: {}\ngiven:\n{}\nwhen:\n{}",
            P::NAME,
            self.run.instance.as_deref().unwrap_or("(none yet)"),
            self.run.since_start(self.run.now),
            report::list(&given),
            when.iter()
                .map(|line| format!("    {}", line.0))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    /// Another step, after this one (see [`ProcessGiven::when`]).
    pub fn when(&self, input: ProcessEvent<P::Input>) -> ProcessThen<P> {
        self.next().when(input)
    }

    /// Another step (see [`ProcessGiven::when_refused`]).
    ///
    /// # Panics
    /// When the process never sent `command`.
    #[track_caller]
    pub fn when_refused(&self, command: P::Command, reason: impl Into<String>) -> ProcessThen<P> {
        self.next().when_refused(command, reason)
    }

    /// Another step (see [`ProcessGiven::when_time_passes`]).
    ///
    /// # Panics
    /// When deadlines keep coming due after 64 rounds.
    #[track_caller]
    pub fn when_time_passes(&self, by: Duration) -> ProcessThen<P> {
        self.next().when_time_passes(by)
    }

    fn next(&self) -> ProcessGiven<P> {
        ProcessGiven {
            run: self.run.clone(),
        }
    }

    /// Asserts that the step sent exactly these commands, in order.
    ///
    /// # Panics
    /// When it sent others; the message shows the first difference and both lists.
    #[track_caller]
    pub fn then_expect_commands(&self, expected: impl IntoIterator<Item = P::Command>) -> &Self {
        let expected: Vec<P::Command> = expected.into_iter().collect();
        self.compare_commands("then_expect_commands", &expected);
        self
    }

    /// Asserts that the step sent no command.
    ///
    /// # Panics
    /// When it sent some.
    #[track_caller]
    pub fn then_expect_no_commands(&self) -> &Self {
        self.compare_commands("then_expect_no_commands", &[]);
        self
    }

    #[track_caller]
    fn compare_commands(&self, method: &str, expected: &[P::Command]) {
        let actual = &self.commands;
        let difference = (0..expected.len().max(actual.len())).find_map(|i| {
            let n = i + 1;
            match (expected.get(i), actual.get(i)) {
                (Some(e), Some(a)) if e != a => {
                    Some(format!("command #{n}: expected {e:?}, got {a:?}"))
                }
                (Some(e), None) => Some(format!(
                    "command #{n} is missing: expected {e:?}, but only {} were sent",
                    actual.len()
                )),
                (None, Some(a)) => Some(format!(
                    "command #{n} was not expected: {a:?} (expected {})",
                    expected.len()
                )),
                _ => None,
            }
        });
        if let Some(difference) = difference {
            outcome::fail(
                &self.method(method),
                format_args!(
                    "the commands differ\n  first difference: {difference}\nexpected commands:\n{}\nactual commands:\n{}",
                    report::list(expected),
                    report::list(actual)
                ),
                &self.context(),
            );
        }
    }

    /// Asserts on the instance's state after the step, compared by JSON form (the state
    /// needs no `PartialEq`); a failure names the first differing field.
    ///
    /// # Panics
    /// When the state differs.
    #[track_caller]
    pub fn then_expect_state(&self, expected: P::State) -> &Self {
        if let Some(difference) = report::first_json_difference(
            &report::to_json(&expected),
            &report::to_json(&self.run.state),
        ) {
            outcome::fail(
                &self.method("then_expect_state"),
                format_args!(
                    "the state differs\n  first difference: {difference}\n  expected state: {expected:?}\n  actual state:   {:?}\ncommands of the step:\n{}",
                    self.run.state,
                    report::list(&self.commands)
                ),
                &self.context(),
            );
        }
        self
    }

    /// Runs your own assertions on the state after the step.
    pub fn then_verify_state(&self, check: impl FnOnce(&P::State)) -> &Self {
        check(&self.run.state);
        self
    }

    /// Asserts that exactly these deadlines are pending, each as its name and how long from
    /// now it is due (in any order: both lists are compared earliest first).
    ///
    /// # Panics
    /// When the pending deadlines differ.
    #[track_caller]
    pub fn then_expect_deadlines<'a>(
        &self,
        expected: impl IntoIterator<Item = (&'a str, Duration)>,
    ) -> &Self {
        let mut expected: Vec<(String, Duration)> = expected
            .into_iter()
            .map(|(name, after)| (name.to_owned(), after))
            .collect();
        expected.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        self.compare_deadlines("then_expect_deadlines", &expected);
        self
    }

    /// Asserts that no deadline is pending.
    ///
    /// # Panics
    /// When one is.
    #[track_caller]
    pub fn then_expect_no_deadlines(&self) -> &Self {
        self.compare_deadlines("then_expect_no_deadlines", &[]);
        self
    }

    #[track_caller]
    fn compare_deadlines(&self, method: &str, expected: &[(String, Duration)]) {
        let actual = self.deadlines();
        if actual != expected {
            let show = |list: &[(String, Duration)]| {
                if list.is_empty() {
                    return "(none)".to_owned();
                }
                list.iter()
                    .map(|(name, after)| format!("{name:?} in {after:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            outcome::fail(
                &self.method(method),
                format_args!(
                    "the pending deadlines differ\n  expected: {}\n  actual:   {}",
                    show(expected),
                    show(&actual)
                ),
                &self.context(),
            );
        }
    }

    /// Asserts that the instance has completed (later inputs are ignored, no deadline is
    /// pending).
    ///
    /// # Panics
    /// When it has not.
    #[track_caller]
    pub fn then_expect_completed(&self) -> &Self {
        if !self.run.completed {
            outcome::fail(
                &self.method("then_expect_completed"),
                format_args!(
                    "the instance has not completed\n  state: {:?}\n  pending deadlines: {:?}",
                    self.run.state,
                    self.deadlines()
                ),
                &self.context(),
            );
        }
        self
    }

    /// Asserts that the instance has not completed.
    ///
    /// # Panics
    /// When it has.
    #[track_caller]
    pub fn then_expect_not_completed(&self) -> &Self {
        if self.run.completed {
            outcome::fail(
                &self.method("then_expect_not_completed"),
                format_args!("the instance has completed\n  state: {:?}", self.run.state),
                &self.context(),
            );
        }
        self
    }

    /// The commands the step sent, in order.
    pub fn commands(&self) -> &[P::Command] {
        &self.commands
    }

    /// Every command sent since the fixture began (given inputs included), with the id the
    /// runner would send it under.
    pub fn sent(&self) -> Vec<SentCommand<P::Command>> {
        self.run.sent.iter().map(|s| s.sent.clone()).collect()
    }

    /// The state after the step.
    pub fn state(&self) -> &P::State {
        &self.run.state
    }

    /// The pending deadlines: name, and how long from now each is due, earliest first.
    pub fn deadlines(&self) -> Vec<(String, Duration)> {
        let mut pending: Vec<(String, Duration)> = self
            .run
            .deadlines
            .iter()
            .map(|d| {
                let after = (d.due - self.run.now).to_std().unwrap_or(Duration::ZERO);
                (d.name.clone(), after)
            })
            .collect();
        pending.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        pending
    }

    /// Whether the instance has completed.
    pub fn is_completed(&self) -> bool {
        self.run.completed
    }

    /// The instance the fixture follows, once an input named one.
    pub fn instance(&self) -> Option<&str> {
        self.run.instance.as_deref()
    }

    /// The fixture's current time.
    pub fn now(&self) -> DateTime<Utc> {
        self.run.now
    }
}

/// The instance as the fixture holds it: what the runner keeps in the instance's row, plus
/// the history of steps for failure messages.
struct Run<P: ProcessManager> {
    manager: Arc<P>,
    description: Option<String>,
    instance: Option<String>,
    state: P::State,
    deadlines: Vec<Deadline>,
    completed: bool,
    start: DateTime<Utc>,
    now: DateTime<Utc>,
    position: i64,
    sequences: HashMap<(String, Uuid), i64>,
    sent: Vec<Sent<P::Command>>,
    next_index: HashMap<Uuid, u32>,
    /// One line per input, refusal or passing of time, in order.
    history: Vec<String>,
}

impl<P: ProcessManager> Clone for Run<P> {
    fn clone(&self) -> Self {
        Run {
            manager: Arc::clone(&self.manager),
            description: self.description.clone(),
            instance: self.instance.clone(),
            state: self.state.clone(),
            deadlines: self.deadlines.clone(),
            completed: self.completed,
            start: self.start,
            now: self.now,
            position: self.position,
            sequences: self.sequences.clone(),
            sent: self.sent.clone(),
            next_index: self.next_index.clone(),
            history: self.history.clone(),
        }
    }
}

impl<P: ProcessManager> Run<P> {
    fn fmt_fields(&self, f: &mut fmt::DebugStruct<'_, '_>) -> fmt::Result {
        f.field("process", &P::NAME)
            .field("instance", &self.instance)
            .field("state", &self.state)
            .field("deadlines", &self.deadlines)
            .field("completed", &self.completed)
            .field("now", &self.now)
            .finish()
    }

    /// `start`, `start + 5s`: a time as the fixture's clock shows it.
    fn since_start(&self, at: DateTime<Utc>) -> String {
        match (at - self.start).to_std() {
            Ok(Duration::ZERO) => "start".to_owned(),
            Ok(after) => format!("start + {after:?}"),
            Err(_) => format!("{at}"),
        }
    }

    fn scope(&self) -> String {
        format!("{}/{}", P::NAME, self.instance.as_deref().unwrap_or(""))
    }

    /// Decides on one input; returns the commands sent.
    fn event(&mut self, input: ProcessEvent<P::Input>) -> Vec<P::Command> {
        let key = (input.aggregate_type.clone(), input.aggregate_id);
        let sequence = input
            .sequence
            .unwrap_or_else(|| self.sequences.get(&key).copied().unwrap_or(0) + 1);
        self.sequences.insert(key, sequence);
        self.position += 1;
        let envelope = EventEnvelope {
            event_id: input.event_id.unwrap_or_else(Uuid::new_v4),
            aggregate_type: input.aggregate_type.into(),
            aggregate_id: input.aggregate_id,
            sequence,
            position: self.position,
            event: input.input,
            metadata: input.metadata,
            timestamp: self.now,
            correlation_id: input.correlation_id,
            causation_id: input.causation_id,
        };
        let source = if envelope.aggregate_type.is_empty() {
            "aggregate"
        } else {
            envelope.aggregate_type.as_str()
        };
        let line = format!(
            "{source} {} #{sequence}: {:?}",
            envelope.aggregate_id, envelope.event
        );
        let ignored = match (P::instance_id(&envelope), &self.instance) {
            (None, _) => Some("no instance".to_owned()),
            (Some(id), Some(followed)) if id != *followed => {
                Some(format!("instance {id}; the fixture follows {followed}"))
            }
            (Some(_), Some(_)) if self.completed => Some("the instance completed".to_owned()),
            (Some(id), _) => {
                self.instance = Some(id);
                None
            }
        };
        if let Some(why) = ignored {
            self.history.push(format!("{line} (ignored: {why})"));
            return Vec::new();
        }
        self.history.push(line);
        let mut effects = Effects::new(self.now);
        self.manager
            .on_event(&mut self.state, &envelope, &mut effects);
        self.carry_out(&effects, envelope.event_id)
    }

    /// Decides on a refusal of a command sent before; returns the commands sent.
    #[track_caller]
    fn refused(&mut self, command: P::Command, reason: String) -> Vec<P::Command>
    where
        P::Command: PartialEq,
    {
        let Some(sent) = self
            .sent
            .iter()
            .rev()
            .find(|s| s.sent.command == command)
            .cloned()
        else {
            let sent: Vec<&P::Command> = self.sent.iter().map(|s| &s.sent.command).collect();
            panic!(
                "when_refused: the process never sent {command:?}\ncommands sent so far:\n{}\nprocess: {}, instance {}\nsteps so far:\n{}",
                report::list(&sent),
                P::NAME,
                self.instance.as_deref().unwrap_or("(none yet)"),
                report::list(&as_lines(&self.history))
            );
        };
        self.history
            .push(format!("refused: {command:?}: {reason:?}"));
        let refusal = Refused {
            command,
            command_id: sent.sent.command_id,
            reason,
        };
        let mut effects = Effects::new(self.now);
        self.manager
            .on_refused(&mut self.state, &refusal, &mut effects);
        self.carry_out(&effects, sent.cause)
    }

    /// Moves the clock and fires the deadlines that came; returns the commands sent.
    #[track_caller]
    fn time_passes(&mut self, by: Duration) -> Vec<P::Command> {
        let by_chrono = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        self.now = self
            .now
            .checked_add_signed(by_chrono)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let mut fired = Vec::new();
        let mut commands = Vec::new();
        for round in 0.. {
            if round == MAX_DEADLINE_ROUNDS {
                panic!(
                    "when_time_passes: deadlines still come due after {MAX_DEADLINE_ROUNDS} rounds of firing: {:?}\nprocess: {}, instance {}",
                    self.deadlines,
                    P::NAME,
                    self.instance.as_deref().unwrap_or("(none yet)")
                );
            }
            let mut due: Vec<Deadline> = self
                .deadlines
                .iter()
                .filter(|d| d.due <= self.now)
                .cloned()
                .collect();
            if due.is_empty() || self.completed {
                break;
            }
            while !self.completed {
                let Some(at) = self.deadlines.iter().position(|d| due.contains(d)) else {
                    break;
                };
                let deadline = self.deadlines.remove(at);
                due.retain(|d| *d != deadline);
                fired.push(format!(
                    "deadline {:?} (due {}) fired",
                    deadline.name,
                    self.since_start(deadline.due)
                ));
                let cause = deadline.cause(P::NAME, self.instance.as_deref().unwrap_or(""));
                let mut effects = Effects::new(self.now);
                self.manager
                    .on_deadline(&mut self.state, &deadline, &mut effects);
                commands.extend(self.carry_out(&effects, cause));
            }
        }
        let what = if fired.is_empty() {
            "no deadline came".to_owned()
        } else {
            fired.join(", ")
        };
        self.history.push(format!("time passes {by:?}: {what}"));
        commands
    }

    /// Applies a decision's deadlines and completion as the runner does, and records its
    /// commands under the ids the runner would give them.
    fn carry_out(&mut self, effects: &Effects<P::Command>, cause: Uuid) -> Vec<P::Command> {
        for name in effects.cancelled() {
            self.deadlines.retain(|d| d.name != *name);
        }
        for deadline in effects.deadlines() {
            self.deadlines.retain(|d| d.name != deadline.name);
            self.deadlines.push(deadline.clone());
        }
        if effects.is_complete() {
            self.completed = true;
            self.deadlines.clear();
        }
        self.deadlines.sort_by_key(|d| d.due);
        let scope = self.scope();
        for command in effects.commands() {
            let index = self.next_index.entry(cause).or_insert(0);
            let command_id = derived_command_id(&scope, cause, *index);
            *index += 1;
            self.sent.push(Sent {
                sent: SentCommand {
                    command: command.clone(),
                    command_id,
                },
                cause,
            });
        }
        effects.commands().to_vec()
    }
}

/// Lines printed as they are by [`report::list`].
fn as_lines(lines: &[String]) -> Vec<Line<'_>> {
    lines.iter().map(|l| Line(l)).collect()
}

struct Line<'a>(&'a str);

impl Debug for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cqrs::{
        CQRSError, Deadline, Effects, EventEnvelope, PersistableDomainEvent, ProcessInput,
        ProcessManager,
    };
    use uuid::Uuid;

    use super::{on, ProcessFixture};

    /// Inputs named by a word; every input belongs to one instance.
    #[derive(Debug, Clone)]
    struct Word(&'static str);

    impl ProcessInput for Word {
        fn decode(_: &PersistableDomainEvent) -> Result<Vec<Self>, CQRSError> {
            Ok(Vec::new())
        }
    }

    /// "arm" sets deadlines `a` (1 s) and `b` (2 s); `a` cancels `b`; "loop" sets a deadline
    /// that sets itself again at once when it fires; "done" completes.
    #[derive(Default)]
    struct Alarms;

    impl ProcessManager for Alarms {
        const NAME: &'static str = "alarms";
        type Input = Word;
        type State = Vec<String>;
        type Command = String;

        fn instance_id(_: &EventEnvelope<Word>) -> Option<String> {
            Some("one".into())
        }

        fn on_event(
            &self,
            seen: &mut Vec<String>,
            event: &EventEnvelope<Word>,
            effects: &mut Effects<String>,
        ) {
            seen.push(event.event.0.to_owned());
            match event.event.0 {
                "arm" => {
                    effects.wake_in("a", Duration::from_secs(1));
                    effects.wake_in("b", Duration::from_secs(2));
                }
                "loop" => effects.wake_in("loop", Duration::ZERO),
                "done" => effects.complete(),
                _ => {}
            }
        }

        fn on_deadline(
            &self,
            _: &mut Vec<String>,
            deadline: &Deadline,
            effects: &mut Effects<String>,
        ) {
            effects.send(format!("{} fired", deadline.name));
            match deadline.name.as_str() {
                "a" => effects.cancel("b"),
                "loop" => effects.wake_in("loop", Duration::ZERO),
                _ => {}
            }
        }
    }

    fn word(word: &'static str) -> super::ProcessEvent<Word> {
        on(Uuid::nil(), Word(word))
    }

    #[test]
    fn a_deadline_cancelled_by_one_fired_before_it_does_not_fire() {
        ProcessFixture::new(Alarms)
            .given([word("arm")])
            .when_time_passes(Duration::from_secs(5))
            .then_expect_commands(["a fired".to_owned()])
            .then_expect_no_deadlines()
            .when_time_passes(Duration::from_secs(5))
            .then_expect_no_commands();
    }

    #[test]
    fn deadlines_fire_when_due_and_are_set_from_the_current_time() {
        ProcessFixture::new(Alarms)
            .given([word("arm")])
            .when_time_passes(Duration::from_millis(1500))
            .then_expect_commands(["a fired".to_owned()])
            .when(word("arm"))
            .then_expect_deadlines([("a", Duration::from_secs(1)), ("b", Duration::from_secs(2))]);
    }

    #[test]
    fn completion_drops_deadlines_and_ignores_later_inputs() {
        ProcessFixture::new(Alarms)
            .given([word("arm"), word("done")])
            .when(word("arm"))
            .then_expect_no_commands()
            .then_expect_no_deadlines()
            .then_expect_completed()
            .then_expect_state(vec!["arm".to_owned(), "done".to_owned()]);
    }

    #[test]
    #[should_panic(expected = "when_time_passes: deadlines still come due after 64 rounds")]
    fn deadlines_that_keep_coming_due_are_a_test_error() {
        let _ = ProcessFixture::new(Alarms)
            .given([word("loop")])
            .when_time_passes(Duration::from_secs(1));
    }

    #[test]
    #[should_panic(
        expected = "then_expect_not_completed (finished) failed: the instance has completed"
    )]
    fn a_completed_instance_fails_then_expect_not_completed() {
        let _ = ProcessFixture::new(Alarms)
            .with_description("finished")
            .given([word("done")])
            .when(word("x"))
            .then_expect_not_completed();
    }
}
