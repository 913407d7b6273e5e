//! The workflow scenario: aggregates and process runners together on the in-memory store,
//! one command, the runners until nothing moves, then the workflow's history across
//! aggregates.

use std::collections::HashMap;
use std::fmt::{self, Debug};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs::{
    Aggregate, CQRSError, CQRSFramework, CommandContext, CommandRouter, EventRepository,
    ManualClock, MemoryEventRepository, MemoryProcessStore, PersistableDomainEvent, ProcessManager,
    ProcessProgress, ProcessRunner,
};
use uuid::Uuid;

use crate::runtime::{self, ready};
use crate::{outcome, report, Stored};

/// How many rounds of all runners [`WorkflowScenario::try_settle`] goes through before it
/// gives up: processes that keep each other busy would otherwise never stop.
const MAX_SETTLE_ROUNDS: usize = 100;

type Step<'a> = Pin<Box<dyn Future<Output = Result<ProcessProgress, CQRSError>> + Send + 'a>>;

/// A process runner of any process, as the scenario runs it.
trait Runner: Send + Sync {
    fn name(&self) -> &'static str;
    fn run_until_idle(&self) -> Step<'_>;
}

impl<P: ProcessManager> Runner for ProcessRunner<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn run_until_idle(&self) -> Step<'_> {
        Box::pin(ProcessRunner::run_until_idle(self))
    }
}

/// Runs aggregates and process managers together on a [`MemoryEventRepository`]: dispatch
/// one command, let every [`ProcessRunner`] work until none has anything left to do, move a
/// [`ManualClock`] shared by the runners, and assert on the whole workflow's history across
/// aggregates, found by its correlation id (a [`Workflow`]).
///
/// Build the frameworks of your aggregates on [`store`](Self::store), and add each process
/// with [`with_process`](Self::with_process) (a runner on the scenario's store, its
/// [`MemoryProcessStore`] and its clock), or a runner you configured with
/// [`with_runner`](Self::with_runner) (give it `.with_clock(scenario.clock().clone())`).
/// The clock starts at 2026-01-01T00:00:00Z.
///
/// ```
/// # use std::sync::Arc;
/// # use cqrs::doc::{Counter, CounterCommand, CounterEvent, CounterError};
/// # use cqrs::{Aggregate, CQRSError, CQRSFramework, CommandContext, CommandRouter, Effects, EventEnvelope};
/// # use cqrs::{PersistableDomainEvent, ProcessInput, ProcessManager, SendError};
/// # use uuid::Uuid;
/// # #[derive(Debug, Clone)]
/// # enum Input { Counter(CounterEvent) }
/// # impl ProcessInput for Input {
/// #     fn decode(event: &PersistableDomainEvent) -> Result<Vec<Self>, CQRSError> {
/// #         Ok(match event.aggregate_type.as_str() {
/// #             Counter::NAME => event.decode_all::<CounterEvent>()?.into_iter().map(|e| Input::Counter(e.event)).collect(),
/// #             _ => Vec::new(),
/// #         })
/// #     }
/// # }
/// /// Resets a counter that went past 8.
/// struct Resetter;
///
/// impl ProcessManager for Resetter {
///     const NAME: &'static str = "resetter";
///     type Input = Input;
///     type State = u64;
///     type Command = (Uuid, CounterCommand);
///
///     fn instance_id(event: &EventEnvelope<Input>) -> Option<String> {
///         Some(event.aggregate_id.to_string())
///     }
///
///     fn on_event(&self, total: &mut u64, event: &EventEnvelope<Input>, effects: &mut Effects<Self::Command>) {
///         match event.event {
///             Input::Counter(CounterEvent::Incremented { by }) => *total += by,
///             Input::Counter(CounterEvent::Reset) => *total = 0,
///         }
///         if *total > 8 {
///             effects.send((event.aggregate_id, CounterCommand::Reset));
///         }
///     }
/// }
///
/// struct Router(Arc<CQRSFramework<Counter>>);
///
/// #[cqrs::async_trait]
/// impl CommandRouter<(Uuid, CounterCommand)> for Router {
///     async fn send(&self, (id, command): (Uuid, CounterCommand), context: &CommandContext) -> Result<(), SendError> {
///         match self.0.dispatch_with_context(id, command, context).await {
///             Ok(_) => Ok(()),
///             Err(CounterError::Framework(error)) => Err(SendError::Failed(error)),
///             Err(refusal) => Err(SendError::Refused(refusal.to_string())),
///         }
///     }
/// }
///
/// use cqrs_testkit::{Happened, Stored, WorkflowScenario};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let scenario = WorkflowScenario::new();
/// let counters = Arc::new(CQRSFramework::<Counter>::new(scenario.store().clone()));
/// let scenario = scenario.with_process(Resetter, Router(Arc::clone(&counters)));
///
/// let id = Uuid::new_v4();
/// let workflow = scenario.when(&counters, id, CounterCommand::Increment { by: 9 }).await;
/// workflow
///     .then_expect_history([("counter", "Incremented"), ("counter", "Reset")])
///     .then_expect_history([
///         Happened::new("counter", "Incremented").on(id),
///         Happened::new("counter", "Reset").on(id).matching(Stored::any().at_sequence(2)),
///     ])
///     .then_expect_causation()
///     .then_expect_events_per_command(1);
/// # });
/// ```
#[must_use = "a scenario does nothing until you dispatch a command with `when`"]
pub struct WorkflowScenario {
    store: MemoryEventRepository,
    processes: MemoryProcessStore,
    clock: ManualClock,
    runners: Vec<Box<dyn Runner>>,
    description: Option<String>,
}

impl Debug for WorkflowScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let runners: Vec<&str> = self.runners.iter().map(|r| r.name()).collect();
        f.debug_struct("WorkflowScenario")
            .field("events_stored", &self.store.len())
            .field("runners", &runners)
            .field("clock", &self.clock)
            .finish()
    }
}

impl Default for WorkflowScenario {
    fn default() -> Self {
        Self::on_store(MemoryEventRepository::new())
    }
}

impl WorkflowScenario {
    /// A scenario on a new, empty in-memory store, with no process yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scenario on an existing in-memory store.
    pub fn on_store(store: MemoryEventRepository) -> Self {
        let start = DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default();
        WorkflowScenario {
            store,
            processes: MemoryProcessStore::new(),
            clock: ManualClock::new(start),
            runners: Vec::new(),
            description: None,
        }
    }

    /// A description of the scenario, printed in every failure message of its workflows.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Runs `manager` on the scenario's store, process store and clock, sending its commands
    /// through `router`.
    pub fn with_process<P: ProcessManager>(
        self,
        manager: P,
        router: impl CommandRouter<P::Command> + 'static,
    ) -> Self {
        let runner =
            ProcessRunner::new(manager, self.store.clone(), self.processes.clone(), router)
                .with_clock(self.clock.clone());
        self.with_runner(runner)
    }

    /// Runs this runner too. It should read the scenario's [`store`](Self::store) and take
    /// its time from the scenario's [`clock`](Self::clock).
    pub fn with_runner<P: ProcessManager>(mut self, runner: ProcessRunner<P>) -> Self {
        self.runners.push(Box::new(runner));
        self
    }

    /// The event store (another handle to it): build your aggregates' frameworks on it.
    pub fn store(&self) -> &MemoryEventRepository {
        &self.store
    }

    /// Where the runners added with [`with_process`](Self::with_process) keep their
    /// instances.
    pub fn processes(&self) -> &MemoryProcessStore {
        &self.processes
    }

    /// The clock the runners share.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// Every event of every aggregate in the store, in global order.
    ///
    /// # Panics
    /// If the store fails.
    #[track_caller]
    pub fn history(&self) -> Vec<PersistableDomainEvent> {
        read_all(&self.store)
    }

    /// Runs every runner until it is idle, again and again, until a whole round of them
    /// finds nothing to do (a runner's commands are events another runner reacts to).
    /// Returns what they did in all.
    ///
    /// # Errors
    /// The first error of a runner (see `ProcessRunner::run_once`).
    ///
    /// # Panics
    /// When the runners still find work after 100 rounds: processes that keep each other
    /// busy forever.
    pub async fn try_settle(&self) -> Result<ProcessProgress, CQRSError> {
        let mut total = ProcessProgress::default();
        for _ in 0..MAX_SETTLE_ROUNDS {
            let mut busy = false;
            for runner in &self.runners {
                let step = runner.run_until_idle().await?;
                busy |= !step.is_idle();
                total.events += step.events;
                total.deadlines += step.deadlines;
                total.commands += step.commands;
                total.position = total.position.max(step.position);
            }
            if !busy {
                return Ok(total);
            }
        }
        let runners: Vec<&str> = self.runners.iter().map(|r| r.name()).collect();
        panic!(
            "{}: the process runners {runners:?} still find work after {MAX_SETTLE_ROUNDS} rounds",
            self.method("settle")
        )
    }

    /// [`try_settle`](Self::try_settle), failing the test on an error.
    ///
    /// # Panics
    /// When a runner fails, or the runners never settle.
    pub async fn settle(&self) -> ProcessProgress {
        match self.try_settle().await {
            Ok(progress) => progress,
            Err(error) => panic!(
                "{}: the process runners failed: {}",
                self.method("settle"),
                report::error(&error)
            ),
        }
    }

    /// Dispatches `command` to `aggregate_id` through `framework` (built on the scenario's
    /// store) under a new [`CommandContext`], which starts a workflow, and
    /// [`settle`](Self::settle)s. The returned [`Workflow`] asserts on the events of that
    /// workflow.
    ///
    /// # Panics
    /// When a runner fails.
    pub async fn when<A: Aggregate>(
        &self,
        framework: &CQRSFramework<A>,
        aggregate_id: Uuid,
        command: A::Commands,
    ) -> Workflow {
        self.when_with_context(framework, aggregate_id, command, CommandContext::new())
            .await
    }

    /// [`when`](Self::when) under your context (a known id, metadata).
    ///
    /// # Panics
    /// When a runner fails.
    pub async fn when_with_context<A: Aggregate>(
        &self,
        framework: &CQRSFramework<A>,
        aggregate_id: Uuid,
        command: A::Commands,
        context: CommandContext,
    ) -> Workflow {
        let shown = format!("{} {aggregate_id}: {command:?}", A::NAME);
        let dispatch = framework
            .dispatch_with_context(aggregate_id, command, &context)
            .await
            .map(|_| ())
            .map_err(|error| report::error(&error));
        let progress = self.settle().await;
        Workflow {
            store: self.store.clone(),
            description: self.description.clone(),
            correlation_id: context.correlation_id(),
            command_id: context.command_id(),
            command: shown,
            dispatch,
            progress,
        }
    }

    /// [`when`](Self::when) for plain `#[test]` functions: runs on a new current-thread
    /// Tokio runtime.
    ///
    /// # Panics
    /// Inside a Tokio runtime (use `.when(..).await` there), or when a runner fails.
    #[track_caller]
    pub fn when_blocking<A: Aggregate>(
        &self,
        framework: &CQRSFramework<A>,
        aggregate_id: Uuid,
        command: A::Commands,
    ) -> Workflow {
        runtime::block_on("when", self.when(framework, aggregate_id, command))
    }

    /// Moves the clock on by `by` and [`settle`](Self::settle)s: the deadlines that came
    /// fire, and what they lead to runs its course.
    ///
    /// # Panics
    /// When a runner fails.
    pub async fn advance(&self, by: Duration) -> ProcessProgress {
        self.clock.advance(by);
        self.settle().await
    }

    /// [`advance`](Self::advance) for plain `#[test]` functions.
    ///
    /// # Panics
    /// Inside a Tokio runtime (use `.advance(..).await` there), or when a runner fails.
    #[track_caller]
    pub fn advance_blocking(&self, by: Duration) -> ProcessProgress {
        runtime::block_on("advance", self.advance(by))
    }

    /// The workflow `correlation_id` (for one started some other way), to assert on.
    pub fn workflow(&self, correlation_id: Uuid) -> Workflow {
        Workflow {
            store: self.store.clone(),
            description: self.description.clone(),
            correlation_id,
            command_id: correlation_id,
            command: format!("(a command under {correlation_id})"),
            dispatch: Ok(()),
            progress: ProcessProgress::default(),
        }
    }

    fn method(&self, name: &str) -> String {
        with_description(name, self.description.as_deref())
    }
}

/// One event expected in a workflow's history: its aggregate type and event type, and
/// optionally the aggregate id and any field of a [`Stored`] matcher. A pair
/// `("transfer", "TransferRequested")` or a [`Stored`] (any aggregate) converts into one.
///
/// ```
/// use cqrs_testkit::{Happened, Stored};
/// use serde_json::json;
///
/// let id = uuid::Uuid::new_v4();
/// let expected = Happened::new("transfer", "TransferCompleted")
///     .on(id)
///     .matching(Stored::any().at_sequence(2).with_metadata(json!(null)));
/// let pair: Happened = ("transfer", "TransferRequested").into();
/// # let _ = (expected, pair);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Happened {
    aggregate_type: Option<String>,
    event_type: Option<String>,
    aggregate_id: Option<Uuid>,
    stored: Option<Stored>,
}

impl Happened {
    /// An event of this type stored by an aggregate of this type (any version, payload).
    pub fn new(aggregate_type: &str, event_type: &str) -> Self {
        Happened {
            aggregate_type: Some(aggregate_type.to_owned()),
            event_type: Some(event_type.to_owned()),
            ..Self::default()
        }
    }

    /// On this aggregate instance.
    #[must_use]
    pub fn on(mut self, aggregate_id: Uuid) -> Self {
        self.aggregate_id = Some(aggregate_id);
        self
    }

    /// Also matching `stored` (the fields it sets: event type and version, payload,
    /// sequence, metadata).
    #[must_use]
    pub fn matching(mut self, stored: Stored) -> Self {
        self.stored = Some(stored);
        self
    }

    /// The first expected field `event` does not match.
    fn difference(&self, event: &PersistableDomainEvent) -> Option<String> {
        if let Some(kind) = self
            .aggregate_type
            .as_ref()
            .filter(|t| **t != event.aggregate_type)
        {
            return Some(format!(
                "aggregate type: expected {kind:?}, stored {:?}",
                event.aggregate_type
            ));
        }
        if let Some(name) = self.event_type.as_ref().filter(|t| **t != event.event_type) {
            return Some(format!(
                "event type: expected {name:?}, stored {:?}",
                event.event_type
            ));
        }
        if let Some(id) = self.aggregate_id.filter(|id| *id != event.aggregate_id) {
            return Some(format!(
                "aggregate id: expected {id}, stored {}",
                event.aggregate_id
            ));
        }
        self.stored.as_ref().and_then(|s| s.difference(event))
    }

    fn describe(&self) -> String {
        let mut out = format!(
            "{} {}",
            self.aggregate_type.as_deref().unwrap_or("(any aggregate)"),
            self.event_type.as_deref().unwrap_or("(any event)")
        );
        if let Some(id) = self.aggregate_id {
            out.push_str(&format!(" on {id}"));
        }
        if let Some(stored) = &self.stored {
            out.push_str(&format!(" matching {stored:?}"));
        }
        out
    }
}

impl From<(&str, &str)> for Happened {
    fn from((aggregate_type, event_type): (&str, &str)) -> Self {
        Happened::new(aggregate_type, event_type)
    }
}

impl From<Stored> for Happened {
    fn from(stored: Stored) -> Self {
        Happened::default().matching(stored)
    }
}

/// A workflow started in a [`WorkflowScenario`]: the events that carry its correlation id,
/// read from the store when you assert (so they include what a later
/// [`advance`](WorkflowScenario::advance) caused). Assert with the `then_*` methods
/// (chainable, `#[track_caller]`).
#[must_use = "nothing is checked until you call a `then_*` method"]
pub struct Workflow {
    store: MemoryEventRepository,
    description: Option<String>,
    correlation_id: Uuid,
    command_id: Uuid,
    command: String,
    dispatch: Result<(), String>,
    progress: ProcessProgress,
}

impl Debug for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workflow")
            .field("correlation_id", &self.correlation_id)
            .field("command_id", &self.command_id)
            .field("command", &self.command)
            .field("dispatch", &self.dispatch)
            .field("progress", &self.progress)
            .finish()
    }
}

impl Workflow {
    /// The workflow's correlation id.
    pub fn correlation_id(&self) -> Uuid {
        self.correlation_id
    }

    /// The id of the command that started it.
    pub fn command_id(&self) -> Uuid {
        self.command_id
    }

    /// The starting command's error (`Display` and `Debug`), if it was refused or failed.
    pub fn dispatch_error(&self) -> Option<&str> {
        self.dispatch.as_ref().err().map(String::as_str)
    }

    /// What the runners did right after the command.
    pub fn progress(&self) -> ProcessProgress {
        self.progress
    }

    /// The workflow's events (those with its correlation id), in global order.
    ///
    /// # Panics
    /// If the store fails.
    #[track_caller]
    pub fn events(&self) -> Vec<PersistableDomainEvent> {
        read_all(&self.store)
            .into_iter()
            .filter(|e| e.correlation_id == Some(self.correlation_id))
            .collect()
    }

    fn method(&self, name: &str) -> String {
        with_description(name, self.description.as_deref())
    }

    fn context(&self, events: &[PersistableDomainEvent]) -> String {
        let dispatch = match &self.dispatch {
            Ok(()) => String::new(),
            Err(error) => format!("\n  refused or failed: {error}"),
        };
        let lines: Vec<String> = events.iter().map(describe).collect();
        format!(
            "workflow: correlation {}\nstarted by:\n    command {}: {}{dispatch}\nworkflow history (global order):\n{}",
            self.correlation_id,
            self.command_id,
            self.command,
            report::list(&as_lines(&lines))
        )
    }

    /// Asserts that the workflow's events, in global order, are exactly these: a pair
    /// `(aggregate type, event type)`, a [`Happened`] or a [`Stored`] per event.
    ///
    /// # Panics
    /// When the number of events or an expected field differs.
    #[track_caller]
    pub fn then_expect_history<H: Into<Happened>>(
        &self,
        expected: impl IntoIterator<Item = H>,
    ) -> &Self {
        let expected: Vec<Happened> = expected.into_iter().map(Into::into).collect();
        let events = self.events();
        let method = self.method("then_expect_history");
        let shown: Vec<String> = expected.iter().map(Happened::describe).collect();
        for (i, (e, a)) in expected.iter().zip(&events).enumerate() {
            if let Some(difference) = e.difference(a) {
                outcome::fail(
                    &method,
                    format_args!(
                        "workflow event #{} differs: {difference}\n  expected: {}\n  stored:   {}\nexpected history:\n{}",
                        i + 1,
                        e.describe(),
                        describe(a),
                        report::list(&as_lines(&shown))
                    ),
                    &self.context(&events),
                );
            }
        }
        if expected.len() != events.len() {
            outcome::fail(
                &method,
                format_args!(
                    "expected {} workflow events, found {}\nexpected history:\n{}",
                    expected.len(),
                    events.len(),
                    report::list(&as_lines(&shown))
                ),
                &self.context(&events),
            );
        }
        self
    }

    /// Asserts that the workflow's causation links hold:
    ///
    /// * it has events, and every one has a causation id (the command that caused it);
    /// * the first was caused by the command that started the workflow;
    /// * the events of one causation id were stored by one aggregate instance, one after the
    ///   other in its history: a command's events are one append, and a command run again on
    ///   another aggregate or after other events of its aggregate shows up here.
    ///
    /// A command whose second run directly follows its first on the same aggregate looks
    /// like one append; [`then_expect_events_per_command`](Self::then_expect_events_per_command)
    /// catches it when you know how many events each command causes.
    ///
    /// # Panics
    /// When a link does not hold.
    #[track_caller]
    pub fn then_expect_causation(&self) -> &Self {
        let events = self.events();
        let method = self.method("then_expect_causation");
        let fail =
            |message: String| -> ! { outcome::fail(&method, message, &self.context(&events)) };
        let Some(first) = events.first() else {
            fail("no event carries the workflow's correlation id".to_owned());
        };
        if let Some((i, event)) = events
            .iter()
            .enumerate()
            .find(|(_, e)| e.causation_id.is_none())
        {
            fail(format!(
                "workflow event #{} has no causation id: {}",
                i + 1,
                describe(event)
            ));
        }
        if first.causation_id != Some(self.command_id) {
            fail(format!(
                "the first workflow event was not caused by the starting command {}: {}",
                self.command_id,
                describe(first)
            ));
        }
        let mut last: HashMap<Uuid, &PersistableDomainEvent> = HashMap::new();
        for (i, event) in events.iter().enumerate() {
            let Some(cause) = event.causation_id else {
                continue;
            };
            if let Some(before) = last.get(&cause) {
                if before.aggregate_type != event.aggregate_type
                    || before.aggregate_id != event.aggregate_id
                {
                    fail(format!(
                        "command {cause} caused events on two aggregates: {} {} and (workflow event #{}) {} {}",
                        before.aggregate_type,
                        before.aggregate_id,
                        i + 1,
                        event.aggregate_type,
                        event.aggregate_id
                    ));
                }
                if event.sequence != before.sequence + 1 {
                    fail(format!(
                        "command {cause} caused events in two appends: sequence {} and (workflow event #{}) sequence {} of {} {}",
                        before.sequence,
                        i + 1,
                        event.sequence,
                        event.aggregate_type,
                        event.aggregate_id
                    ));
                }
            }
            last.insert(cause, event);
        }
        self
    }

    /// Asserts that every command of the workflow caused exactly `count` events (1 for a
    /// domain whose commands each record one event): a command applied twice shows up as
    /// twice as many.
    ///
    /// # Panics
    /// When a causation id has another number of events, or one has none.
    #[track_caller]
    pub fn then_expect_events_per_command(&self, count: usize) -> &Self {
        let events = self.events();
        let mut per_cause: Vec<(Option<Uuid>, usize)> = Vec::new();
        for event in &events {
            match per_cause.iter_mut().find(|(c, _)| *c == event.causation_id) {
                Some((_, n)) => *n += 1,
                None => per_cause.push((event.causation_id, 1)),
            }
        }
        let wrong: Vec<String> = per_cause
            .iter()
            .filter(|(_, n)| *n != count)
            .map(|(cause, n)| match cause {
                Some(cause) => format!("command {cause}: {n} events"),
                None => format!("no causation id: {n} events"),
            })
            .collect();
        if !wrong.is_empty() {
            outcome::fail(
                &self.method("then_expect_events_per_command"),
                format_args!(
                    "expected {count} event(s) per command\n{}",
                    report::list(&as_lines(&wrong))
                ),
                &self.context(&events),
            );
        }
        self
    }
}

fn with_description(name: &str, description: Option<&str>) -> String {
    match description {
        Some(description) => format!("{name} ({description})"),
        None => name.to_owned(),
    }
}

#[track_caller]
fn read_all(store: &MemoryEventRepository) -> Vec<PersistableDomainEvent> {
    match ready("history", store.read_all(0, usize::MAX)) {
        Ok(all) => all,
        Err(error) => panic!("reading the store failed: {}", report::error(&error)),
    }
}

/// `transfer 5a0c… #2 TransferCompleted v1 {"…"} caused by 1234…`.
fn describe(event: &PersistableDomainEvent) -> String {
    let cause = match event.causation_id {
        Some(cause) => format!(" caused by {cause}"),
        None => " (no causation id)".to_owned(),
    };
    format!(
        "{} {} #{} {} v{} {}{cause}",
        event.aggregate_type,
        event.aggregate_id,
        event.sequence,
        event.event_type,
        event.event_version,
        event.payload
    )
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
