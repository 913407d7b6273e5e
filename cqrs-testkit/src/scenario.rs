//! The scenario fixture: a real `CQRSFramework` on in-memory stores, several commands, then
//! the stored envelopes and the views.

use std::fmt::{self, Debug, Display};

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DispatchReceipt, DomainEvent, EventEnvelope,
    EventRepository, HandlerRetry, MemoryEventRepository, MemoryViewRepository,
    PersistableDomainEvent, Projection, View, ViewRepository,
};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::runtime::{self, ready};
use crate::{outcome, report};

/// Runs commands through a real [`CQRSFramework`] on a [`MemoryEventRepository`], then
/// asserts on what was stored (sequence, event type, version, payload, metadata) and on views
/// built by a real [`Projection`].
///
/// * [`given`](Self::given) appends history for any number of aggregate instances.
/// * [`when`](Self::when) (async) or [`when_blocking`](Self::when_blocking) (plain `#[test]`)
///   dispatches a command, and returns a [`Dispatched`] to assert on that command's outcome
///   and the envelopes it stored.
/// * The `then_*` methods of the scenario assert on whole histories, states and views. They
///   are plain functions (the in-memory stores answer at once), usable in both test styles.
///
/// To test several aggregate types on one store, create a second scenario with
/// [`sharing_store`](Self::sharing_store).
///
/// ```
/// # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
/// # use serde::{Deserialize, Serialize};
/// # use uuid::Uuid;
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { #[event(name = "Incremented", version = "1")] Incremented { by: u32 } }
/// # #[derive(Debug, Clone)] enum CounterCommand { Increment { by: u32 } }
/// # #[derive(Debug, Clone, Default, Serialize, Deserialize)] struct CounterState { value: u32 }
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent; type Commands = CounterCommand; type Errors = CQRSError; type State = CounterState;
/// #     async fn handle_command(&self, _: Uuid, _: &CounterState, c: CounterCommand) -> Result<Vec<CounterEvent>, CQRSError> {
/// #         let CounterCommand::Increment { by } = c; Ok(vec![CounterEvent::Incremented { by }]) }
/// #     fn handle_event(&self, s: &mut CounterState, e: &CounterEvent) { let CounterEvent::Incremented { by } = e; s.value += by; }
/// # }
/// use cqrs_testkit::{Scenario, Stored};
/// use serde_json::json;
///
/// let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
/// let scenario = Scenario::<Counter>::new().given(a, [CounterEvent::Incremented { by: 1 }]);
/// scenario
///     .when_with_metadata_blocking(a, CounterCommand::Increment { by: 2 }, &json!({ "user": "alice" }))
///     .then_expect_stored([Stored::event(&CounterEvent::Incremented { by: 2 })
///         .at_sequence(2)
///         .with_metadata(json!({ "user": "alice" }))]);
/// scenario.when_blocking(b, CounterCommand::Increment { by: 5 });
///
/// scenario
///     .then_expect_stored(a, [
///         Stored::named("Incremented", "1").at_sequence(1).with_metadata(json!(null)),
///         Stored::named("Incremented", "1").at_sequence(2),
///     ])
///     .then_expect_state(b, CounterState { value: 5 });
/// ```
#[must_use = "a scenario does nothing until you run commands with `when`"]
pub struct Scenario<A: Aggregate> {
    store: MemoryEventRepository,
    framework: CQRSFramework<A>,
    description: Option<String>,
}

impl<A: Aggregate> Debug for Scenario<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scenario")
            .field("aggregate", &A::NAME)
            .field("events_stored", &self.store.len())
            .finish()
    }
}

impl<A: Aggregate + Default> Default for Scenario<A> {
    fn default() -> Self {
        Self::with_aggregate(A::default())
    }
}

impl<A: Aggregate + Default> Scenario<A> {
    /// A scenario for `A::default()` on a new, empty in-memory store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scenario for `A::default()` on an existing store, e.g. another scenario's
    /// [`store`](Self::store), to test several aggregate types (and their views) together.
    pub fn sharing_store(store: MemoryEventRepository) -> Self {
        Self::with_aggregate_on(A::default(), store)
    }
}

impl<A: Aggregate> Scenario<A> {
    /// A scenario for this aggregate value (with its services) on a new, empty store.
    pub fn with_aggregate(aggregate: A) -> Self {
        Self::with_aggregate_on(aggregate, MemoryEventRepository::new())
    }

    /// A scenario for this aggregate value on an existing store.
    pub fn with_aggregate_on(aggregate: A, store: MemoryEventRepository) -> Self {
        Scenario {
            framework: CQRSFramework::with_aggregate(aggregate, store.clone()),
            store,
            description: None,
        }
    }

    /// Changes the framework's configuration, e.g.
    /// `.configure(|f| f.with_snapshots(MemorySnapshotRepository::new(), SnapshotPolicy::every(2)))`.
    pub fn configure(self, configure: impl FnOnce(CQRSFramework<A>) -> CQRSFramework<A>) -> Self {
        Scenario {
            framework: configure(self.framework),
            store: self.store,
            description: self.description,
        }
    }

    /// A description of the scenario, printed in every failure message (the custom-message
    /// form of the assertions).
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Appends these events to the aggregate's history (after what it already has), with
    /// `null` metadata, as if earlier commands had caused them.
    ///
    /// # Panics
    /// If the store refuses the append (an event that does not serialize).
    #[track_caller]
    pub fn given(self, aggregate_id: Uuid, events: impl IntoIterator<Item = A::Events>) -> Self {
        let last = ready("given", self.store.event_sequence(A::NAME, aggregate_id))
            .unwrap_or_else(|error| given_failed(aggregate_id, &error));
        let mut stored = Vec::new();
        for (event, sequence) in events.into_iter().zip(last + 1..) {
            match PersistableDomainEvent::new(A::NAME, aggregate_id, sequence, &event, Value::Null)
            {
                Ok(event) => stored.push(event),
                Err(error) => given_failed(aggregate_id, &error),
            }
        }
        if !stored.is_empty() {
            ready("given", self.store.append(stored))
                .unwrap_or_else(|error| given_failed(aggregate_id, &error));
        }
        self
    }

    /// The event store (another handle to it).
    pub fn store(&self) -> &MemoryEventRepository {
        &self.store
    }

    /// The framework commands run through.
    pub fn framework(&self) -> &CQRSFramework<A> {
        &self.framework
    }

    /// Dispatches a command (with `null` metadata) through the framework.
    pub async fn when(&self, aggregate_id: Uuid, command: A::Commands) -> Dispatched<A> {
        let before = self.history_lines(aggregate_id);
        let shown = command.clone();
        let result = self.framework.dispatch(aggregate_id, command).await;
        self.dispatched(aggregate_id, before, shown, None, result)
    }

    /// Dispatches a command with metadata, which is stored (as JSON) with each event.
    pub async fn when_with_metadata<M: Serialize + ?Sized>(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        metadata: &M,
    ) -> Dispatched<A> {
        let before = self.history_lines(aggregate_id);
        let shown = command.clone();
        let result = self
            .framework
            .dispatch_with_metadata(aggregate_id, command, metadata)
            .await;
        let metadata = Some(report::to_json(metadata));
        self.dispatched(aggregate_id, before, shown, metadata, result)
    }

    /// [`when`](Self::when) for plain `#[test]` functions: runs on a new current-thread
    /// Tokio runtime.
    ///
    /// # Panics
    /// Inside a Tokio runtime: use `.when(..).await` there.
    #[track_caller]
    pub fn when_blocking(&self, aggregate_id: Uuid, command: A::Commands) -> Dispatched<A> {
        runtime::block_on("when", self.when(aggregate_id, command))
    }

    /// [`when_with_metadata`](Self::when_with_metadata) for plain `#[test]` functions.
    ///
    /// # Panics
    /// Inside a Tokio runtime: use `.when_with_metadata(..).await` there.
    #[track_caller]
    pub fn when_with_metadata_blocking<M: Serialize + ?Sized>(
        &self,
        aggregate_id: Uuid,
        command: A::Commands,
        metadata: &M,
    ) -> Dispatched<A> {
        runtime::block_on(
            "when_with_metadata",
            self.when_with_metadata(aggregate_id, command, metadata),
        )
    }

    fn dispatched(
        &self,
        aggregate_id: Uuid,
        before: Vec<String>,
        command: A::Commands,
        metadata: Option<Value>,
        result: Result<DispatchReceipt<A::Events>, A::Errors>,
    ) -> Dispatched<A> {
        let stored = match &result {
            Ok(receipt) => {
                let after = receipt.sequence - receipt.events.len() as i64;
                ready("when", self.store.load_events(A::NAME, aggregate_id, after))
                    .map_err(|error| error.to_string())
            }
            Err(_) => Ok(Vec::new()),
        };
        Dispatched {
            description: self.description.clone(),
            aggregate_id,
            history: before,
            command,
            metadata,
            result,
            stored,
        }
    }

    fn history_lines(&self, aggregate_id: Uuid) -> Vec<String> {
        match ready("when", self.store.load_events(A::NAME, aggregate_id, 0)) {
            Ok(stored) => stored.iter().map(describe_stored::<A::Events>).collect(),
            Err(error) => vec![format!("<the history does not load: {error}>")],
        }
    }

    /// Every event stored for the aggregate, as stored.
    ///
    /// # Panics
    /// If the store fails.
    #[track_caller]
    pub fn stored_events(&self, aggregate_id: Uuid) -> Vec<PersistableDomainEvent> {
        match ready(
            "stored_events",
            self.store.load_events(A::NAME, aggregate_id, 0),
        ) {
            Ok(stored) => stored,
            Err(error) => panic!(
                "stored_events: loading {} {aggregate_id} failed: {}",
                A::NAME,
                report::error(&error)
            ),
        }
    }

    /// Every event stored for the aggregate, decoded, in their envelopes.
    ///
    /// # Panics
    /// If the store fails or an event does not decode.
    #[track_caller]
    pub fn events(&self, aggregate_id: Uuid) -> Vec<EventEnvelope<A::Events>> {
        self.stored_events(aggregate_id)
            .iter()
            .map(|stored| match stored.decode::<A::Events>() {
                Ok(envelope) => envelope,
                Err(error) => panic!("events: {}", report::error(&error)),
            })
            .collect()
    }

    /// Every event of every aggregate in the store, in global order.
    ///
    /// # Panics
    /// If the store fails.
    #[track_caller]
    pub fn all_events(&self) -> Vec<PersistableDomainEvent> {
        match ready("all_events", self.store.read_all(0, usize::MAX)) {
            Ok(all) => all,
            Err(error) => panic!("all_events: {}", report::error(&error)),
        }
    }

    /// The aggregate's state, loaded through the framework.
    ///
    /// # Panics
    /// If loading fails (an event that does not decode, a hole in the history).
    #[track_caller]
    pub fn state(&self, aggregate_id: Uuid) -> A::State {
        match ready("state", self.framework.load(aggregate_id)) {
            Ok(state) => state,
            Err(error) => panic!(
                "state: loading {} {aggregate_id} failed: {}",
                A::NAME,
                report::error(&error)
            ),
        }
    }

    /// The view instance `view_id` after a [`Projection`] of `V` has caught up from the first
    /// event into a fresh in-memory view store; `None` if no event concerned it.
    ///
    /// # Errors
    /// What the projection returns: an event that does not decode, or
    /// [`CQRSError::ViewHandler`] when the view refused an event.
    // The framework's own error type, as every `cqrs` API returns it.
    pub fn try_view<V: View<A>>(&self, view_id: impl Display) -> Result<Option<V>, CQRSError> {
        let views = MemoryViewRepository::<V>::new();
        // No handler retry: a refusal is reported at once (a retry would sleep, and the
        // in-memory stores are polled without a timer).
        let projection = Projection::<A, V>::new(self.store.clone(), views.clone())
            .with_handler_retry(HandlerRetry::none());
        ready("view", projection.catch_up())?;
        ready(
            "view",
            ViewRepository::<A, V>::load(&views, &view_id.to_string()),
        )
    }

    /// [`try_view`](Self::try_view), failing the test on an error.
    ///
    /// # Panics
    /// If the projection fails.
    #[track_caller]
    pub fn view<V: View<A>>(&self, view_id: impl Display) -> Option<V> {
        match self.try_view::<V>(&view_id) {
            Ok(view) => view,
            Err(error) => panic!(
                "view: projecting {} failed: {}",
                V::TABLE_NAME,
                report::error(&error)
            ),
        }
    }

    /// The method's name, with the description if there is one.
    fn method(&self, name: &str) -> String {
        match &self.description {
            Some(description) => format!("{name} ({description})"),
            None => name.to_owned(),
        }
    }

    fn context(&self, aggregate_id: Uuid) -> String {
        let lines = self.history_lines(aggregate_id);
        format!(
            "aggregate: {} {aggregate_id}\nstored history:\n{}",
            A::NAME,
            report::list(&as_lines(&lines))
        )
    }

    /// Asserts that the aggregate's whole stored history decodes to exactly these events.
    ///
    /// # Panics
    /// When the history differs; the message names the first differing event and field.
    #[track_caller]
    pub fn then_expect_events(
        &self,
        aggregate_id: Uuid,
        expected: impl IntoIterator<Item = A::Events>,
    ) -> &Self {
        let expected: Vec<A::Events> = expected.into_iter().collect();
        let actual: Result<Vec<A::Events>, CQRSError> = self
            .stored_events(aggregate_id)
            .iter()
            .map(A::Events::try_from_persisted)
            .collect();
        outcome::expect_events(
            &self.method("then_expect_events"),
            &self.context(aggregate_id),
            &actual,
            &expected,
        );
        self
    }

    /// Asserts on the aggregate's whole stored history, one [`Stored`] per event, comparing
    /// only the fields each `Stored` sets; every stored event must be at the sequence that
    /// follows the one before (1, 2, 3, …).
    ///
    /// # Panics
    /// When the number of events or a set field differs.
    #[track_caller]
    pub fn then_expect_stored(
        &self,
        aggregate_id: Uuid,
        expected: impl IntoIterator<Item = Stored>,
    ) -> &Self {
        let expected: Vec<Stored> = expected.into_iter().collect();
        let stored = self.stored_events(aggregate_id);
        for (i, event) in stored.iter().enumerate() {
            if event.sequence != i as i64 + 1 {
                outcome::fail(
                    &self.method("then_expect_stored"),
                    format_args!(
                        "stored event #{} is at sequence {}, expected {}",
                        i + 1,
                        event.sequence,
                        i + 1
                    ),
                    &self.context(aggregate_id),
                );
            }
        }
        compare_stored(
            &self.method("then_expect_stored"),
            &expected,
            &stored,
            &self.context(aggregate_id),
        );
        self
    }

    /// Asserts on the aggregate's state, loaded through the framework (compared by JSON form).
    ///
    /// # Panics
    /// When loading fails or the state differs.
    #[track_caller]
    pub fn then_expect_state(&self, aggregate_id: Uuid, expected: A::State) -> &Self {
        let actual = self.state(aggregate_id);
        if let Some(difference) =
            report::first_json_difference(&report::to_json(&expected), &report::to_json(&actual))
        {
            outcome::fail(
                &self.method("then_expect_state"),
                format_args!(
                    "the state differs\n  first difference: {difference}\n  expected state: {expected:?}\n  actual state:   {actual:?}"
                ),
                &self.context(aggregate_id),
            );
        }
        self
    }

    /// Asserts on a view instance after a [`Projection`] caught up from the first event (see
    /// [`try_view`](Self::try_view)); views are compared by JSON form. A view no event
    /// concerned does not exist: expecting one fails.
    ///
    /// # Panics
    /// When the projection fails, the view does not exist, or it differs.
    #[track_caller]
    pub fn then_expect_view<V: View<A>>(&self, view_id: impl Display, expected: V) -> &Self {
        let view_id = view_id.to_string();
        let context = || {
            let all: Vec<String> = self
                .all_events()
                .iter()
                .map(describe_stored::<A::Events>)
                .collect();
            format!(
                "view: {}\nstore (global order):\n{}",
                V::TABLE_NAME,
                report::list(&as_lines(&all))
            )
        };
        match self.try_view::<V>(&view_id) {
            Ok(Some(actual)) => {
                if let Some(difference) = report::first_json_difference(
                    &report::to_json(&expected),
                    &report::to_json(&actual),
                ) {
                    outcome::fail(
                        &self.method("then_expect_view"),
                        format_args!(
                            "view {view_id:?} differs\n  first difference: {difference}\n  expected view: {expected:?}\n  actual view:   {actual:?}"
                        ),
                        &context(),
                    );
                }
            }
            Ok(None) => outcome::fail(
                &self.method("then_expect_view"),
                format_args!("no event concerned view {view_id:?}; expected {expected:?}"),
                &context(),
            ),
            Err(error) => outcome::fail(
                &self.method("then_expect_view"),
                format_args!("the projection failed: {}", report::error(&error)),
                &context(),
            ),
        }
        self
    }
}

#[track_caller]
fn given_failed(aggregate_id: Uuid, error: &CQRSError) -> ! {
    panic!(
        "given: appending the history of {aggregate_id} failed: {}",
        report::error(error)
    )
}

/// `#2 MoneyDeposited v1 {"Deposited":{"amount":5}} metadata {..}`, or the raw row.
fn describe_stored<E: DomainEvent>(stored: &PersistableDomainEvent) -> String {
    let shown = match E::try_from_persisted(stored) {
        Ok(event) => format!("{event:?}"),
        Err(error) => format!("<does not decode: {error}> payload {}", stored.payload),
    };
    let metadata = if stored.metadata.is_null() {
        String::new()
    } else {
        format!(" metadata {}", stored.metadata)
    };
    format!(
        "{} {} #{} {} v{}: {shown}{metadata}",
        stored.aggregate_type,
        stored.aggregate_id,
        stored.sequence,
        stored.event_type,
        stored.event_version
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

#[track_caller]
fn compare_stored(
    method: &str,
    expected: &[Stored],
    actual: &[PersistableDomainEvent],
    context: &str,
) {
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        if let Some(difference) = e.difference(a) {
            outcome::fail(
                method,
                format_args!(
                    "stored event #{} (sequence {}) differs: {difference}\n  expected: {e:?}\n  stored:   {} v{} payload {} metadata {}",
                    i + 1,
                    a.sequence,
                    a.event_type,
                    a.event_version,
                    a.payload,
                    a.metadata
                ),
                context,
            );
        }
    }
    if expected.len() != actual.len() {
        outcome::fail(
            method,
            format_args!(
                "expected {} stored events, found {}\n  expected: {expected:?}",
                expected.len(),
                actual.len()
            ),
            context,
        );
    }
}

/// What one stored event is expected to be; only the fields you set are compared.
///
/// ```
/// use cqrs_testkit::Stored;
/// use serde_json::json;
///
/// let expected = Stored::named("MoneyDeposited", "1")
///     .at_sequence(2)
///     .with_payload(json!({ "Deposited": { "amount": 500 } }))
///     .with_metadata(json!({ "user": "alice" }));
/// # let _ = expected;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stored {
    event_type: Option<String>,
    event_version: Option<String>,
    payload: Option<Value>,
    sequence: Option<i64>,
    metadata: Option<Value>,
}

impl Stored {
    /// Any event: compares nothing until you set a field.
    pub fn any() -> Self {
        Self::default()
    }

    /// The stored form of this event: its event type, version and JSON payload.
    pub fn event<E: DomainEvent>(event: &E) -> Self {
        Stored {
            event_type: Some(event.persisted_event_name().to_owned()),
            event_version: Some(event.persisted_event_version().to_owned()),
            payload: Some(
                match event.to_payload().and_then(|payload| payload.to_value()) {
                    Ok(payload) => payload,
                    Err(error) => Value::String(format!("<does not serialize: {error}>")),
                },
            ),
            ..Self::default()
        }
    }

    /// An event stored under this type and version (any payload).
    pub fn named(event_type: &str, event_version: &str) -> Self {
        Stored {
            event_type: Some(event_type.to_owned()),
            event_version: Some(event_version.to_owned()),
            ..Self::default()
        }
    }

    /// Expects this sequence within the aggregate.
    pub fn at_sequence(mut self, sequence: i64) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// Expects this metadata (`json!(null)` for a plain `dispatch`).
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Expects this JSON payload.
    pub fn with_payload(mut self, payload: Value) -> Self {
        self.payload = Some(payload);
        self
    }

    /// The first set field that `stored` does not match.
    pub(crate) fn difference(&self, stored: &PersistableDomainEvent) -> Option<String> {
        if let Some(sequence) = self.sequence.filter(|s| *s != stored.sequence) {
            return Some(format!(
                "sequence: expected {sequence}, stored {}",
                stored.sequence
            ));
        }
        if let Some(event_type) = self
            .event_type
            .as_ref()
            .filter(|t| **t != stored.event_type)
        {
            return Some(format!(
                "event type: expected {event_type:?}, stored {:?}",
                stored.event_type
            ));
        }
        if let Some(version) = self
            .event_version
            .as_ref()
            .filter(|v| **v != stored.event_version)
        {
            return Some(format!(
                "event version: expected {version:?}, stored {:?}",
                stored.event_version
            ));
        }
        if let Some(payload) = &self.payload {
            let stored_payload = match stored.payload.to_value() {
                Ok(value) => value,
                Err(error) => return Some(format!("payload does not parse: {error}")),
            };
            if let Some(difference) = report::first_json_difference(payload, &stored_payload) {
                return Some(format!("payload {difference}"));
            }
        }
        if let Some(metadata) = &self.metadata {
            if let Some(difference) = report::first_json_difference(metadata, &stored.metadata) {
                return Some(format!("metadata {difference}"));
            }
        }
        None
    }
}

/// One command's outcome in a [`Scenario`]; assert with the `then_*` methods (chainable,
/// `#[track_caller]`), as on the aggregate fixture's [`Then`](crate::Then), plus
/// [`then_expect_stored`](Self::then_expect_stored) for the envelopes this command stored.
#[must_use = "nothing is checked until you call a `then_*` method"]
pub struct Dispatched<A: Aggregate> {
    description: Option<String>,
    aggregate_id: Uuid,
    history: Vec<String>,
    command: A::Commands,
    metadata: Option<Value>,
    result: Result<DispatchReceipt<A::Events>, A::Errors>,
    stored: Result<Vec<PersistableDomainEvent>, String>,
}

impl<A: Aggregate> Debug for Dispatched<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatched")
            .field("aggregate", &A::NAME)
            .field("aggregate_id", &self.aggregate_id)
            .field("command", &self.command)
            .field("result", &self.result)
            .finish()
    }
}

impl<A: Aggregate> Dispatched<A> {
    /// The method's name, with the description if there is one.
    fn method(&self, name: &str) -> String {
        match &self.description {
            Some(description) => format!("{name} ({description})"),
            None => name.to_owned(),
        }
    }

    fn context(&self) -> String {
        let metadata = match &self.metadata {
            Some(metadata) => format!("\n    metadata {metadata}"),
            None => String::new(),
        };
        format!(
            "aggregate: {} {}\nstored history before the command:\n{}\nwhen:\n    {:?}{metadata}",
            A::NAME,
            self.aggregate_id,
            report::list(&as_lines(&self.history)),
            self.command
        )
    }

    fn events(&self) -> Result<Vec<A::Events>, &A::Errors> {
        self.result.as_ref().map(|receipt| receipt.events.clone())
    }

    /// Asserts that the command succeeded with exactly these events.
    ///
    /// # Panics
    /// When it failed or caused other events.
    #[track_caller]
    pub fn then_expect_events(&self, expected: impl IntoIterator<Item = A::Events>) -> &Self {
        let expected: Vec<A::Events> = expected.into_iter().collect();
        outcome::expect_events(
            &self.method("then_expect_events"),
            &self.context(),
            &self.events(),
            &expected,
        );
        self
    }

    /// Asserts that the command succeeded without events.
    ///
    /// # Panics
    /// When it failed or caused events.
    #[track_caller]
    pub fn then_expect_no_events(&self) -> &Self {
        outcome::expect_events(
            &self.method("then_expect_no_events"),
            &self.context(),
            &self.events(),
            &[],
        );
        self
    }

    /// Asserts that the command failed with this error (`PartialEq`).
    ///
    /// # Panics
    /// When it succeeded or failed otherwise.
    #[track_caller]
    pub fn then_expect_error(&self, expected: A::Errors) -> &Self
    where
        A::Errors: PartialEq,
    {
        outcome::expect_error(
            &self.method("then_expect_error"),
            &self.context(),
            &self.events(),
            &&expected,
        );
        self
    }

    /// Asserts that the command failed with exactly this `Display` message.
    ///
    /// # Panics
    /// When it succeeded or failed with another message.
    #[track_caller]
    pub fn then_expect_error_message(&self, expected: &str) -> &Self {
        outcome::expect_error_message(
            &self.method("then_expect_error_message"),
            &self.context(),
            &self.events(),
            expected,
        );
        self
    }

    /// Asserts that the command failed with an error for which `predicate` is true.
    ///
    /// # Panics
    /// When it succeeded or the predicate is false.
    #[track_caller]
    pub fn then_expect_error_matching(&self, predicate: impl FnOnce(&A::Errors) -> bool) -> &Self {
        outcome::expect_error_matching(
            &self.method("then_expect_error_matching"),
            &self.context(),
            &self.events(),
            "the predicate",
            |error: &&A::Errors| predicate(error),
        );
        self
    }

    /// Asserts on the envelopes this command stored, one [`Stored`] per event, comparing
    /// only the fields each sets.
    ///
    /// # Panics
    /// When the command failed, or the stored events differ.
    #[track_caller]
    pub fn then_expect_stored(&self, expected: impl IntoIterator<Item = Stored>) -> &Self {
        let expected: Vec<Stored> = expected.into_iter().collect();
        let stored = match (&self.result, &self.stored) {
            (Err(error), _) => outcome::fail(
                &self.method("then_expect_stored"),
                format_args!("the command failed: {}", report::error(error)),
                &self.context(),
            ),
            (Ok(_), Err(error)) => outcome::fail(
                &self.method("then_expect_stored"),
                format_args!("reading the stored events failed: {error}"),
                &self.context(),
            ),
            (Ok(_), Ok(stored)) => stored,
        };
        compare_stored(
            &self.method("then_expect_stored"),
            &expected,
            stored,
            &self.context(),
        );
        self
    }

    /// The events this command stored, as stored (empty if it failed).
    pub fn stored(&self) -> &[PersistableDomainEvent] {
        self.stored.as_deref().unwrap_or(&[])
    }

    /// The dispatch's raw result: the receipt (events, sequence, positions, attempts) or the
    /// error.
    pub fn result(&self) -> &Result<DispatchReceipt<A::Events>, A::Errors> {
        &self.result
    }

    /// The raw result, by value.
    pub fn into_result(self) -> Result<DispatchReceipt<A::Events>, A::Errors> {
        self.result
    }

    /// The receipt of a successful dispatch.
    ///
    /// # Panics
    /// When the command failed.
    #[track_caller]
    pub fn receipt(&self) -> &DispatchReceipt<A::Events> {
        match &self.result {
            Ok(receipt) => receipt,
            Err(error) => outcome::fail(
                &self.method("receipt"),
                format_args!("the command failed: {}", report::error(error)),
                &self.context(),
            ),
        }
    }
}
