//! The view fixture: given events in their envelopes, then the view's state.

use std::fmt::{self, Debug};
use std::marker::PhantomData;

use chrono::Utc;
use cqrs::{Aggregate, EventEnvelope, View};
use serde_json::Value;
use uuid::Uuid;

use crate::{outcome, report};

/// An envelope for `event` as a store would hand it to a view: a new event id, the
/// aggregate type `A::NAME`, this aggregate id and sequence, position = sequence, `null`
/// metadata and the current time. Change any field before use (it is a plain struct).
///
/// ```
/// # use cqrs::{Aggregate, CQRSError, DomainEvent};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { #[event(name = "Incremented", version = "1")] Incremented { by: u32 } }
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent; type Commands = (); type Errors = CQRSError; type State = ();
/// #     async fn handle_command(&self, _: uuid::Uuid, _: &(), _: ()) -> Result<Vec<CounterEvent>, CQRSError> { Ok(vec![]) }
/// #     fn handle_event(&self, _: &mut (), _: &CounterEvent) {}
/// # }
/// let id = uuid::Uuid::new_v4();
/// let mut envelope = cqrs_testkit::envelope::<Counter>(id, 3, CounterEvent::Incremented { by: 1 });
/// envelope.metadata = serde_json::json!({ "user": "alice" });
/// assert_eq!((envelope.aggregate_type.as_str(), envelope.sequence), ("counter", 3));
/// ```
pub fn envelope<A: Aggregate>(
    aggregate_id: Uuid,
    sequence: i64,
    event: A::Events,
) -> EventEnvelope<A::Events> {
    EventEnvelope {
        event_id: Uuid::new_v4(),
        aggregate_type: A::NAME.into(),
        aggregate_id,
        sequence,
        position: sequence,
        event,
        metadata: Value::Null,
        timestamp: Utc::now(),
        correlation_id: None,
        causation_id: None,
    }
}

/// Tests a view's `handle_event` without a store or a projection.
///
/// [`given`](Self::given) events of one aggregate (wrapped in envelopes with sequences 1, 2,
/// … and this fixture's aggregate id), or [`given_envelopes`](Self::given_envelopes) with
/// every envelope field under your control (metadata, several aggregates). Each envelope
/// goes, in order, to the view instance `View::view_id` names, starting from
/// `V::default()`, exactly as a projection would apply them; envelopes whose `view_id` is
/// `None` are skipped, and the first error stops there.
///
/// ```
/// # use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # enum CounterEvent { #[event(name = "Incremented", version = "1")] Incremented { by: u32 } }
/// # #[derive(Default)] struct Counter;
/// # impl Aggregate for Counter {
/// #     const NAME: &'static str = "counter";
/// #     type Events = CounterEvent; type Commands = (); type Errors = CQRSError; type State = ();
/// #     async fn handle_command(&self, _: uuid::Uuid, _: &(), _: ()) -> Result<Vec<CounterEvent>, CQRSError> { Ok(vec![]) }
/// #     fn handle_event(&self, _: &mut (), _: &CounterEvent) {}
/// # }
/// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// struct Total {
///     total: u64,
///     last_sequence: i64,
/// }
///
/// impl View<Counter> for Total {
///     const TABLE_NAME: &'static str = "counter_total";
///     const VERSION: u64 = 1;
///     fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CQRSError> {
///         let CounterEvent::Incremented { by } = envelope.event;
///         self.total += u64::from(by);
///         self.last_sequence = envelope.sequence;
///         Ok(())
///     }
/// }
///
/// use cqrs_testkit::ViewFixture;
/// ViewFixture::<Counter, Total>::new()
///     .given([CounterEvent::Incremented { by: 2 }, CounterEvent::Incremented { by: 5 }])
///     .then_expect_view(Total { total: 7, last_sequence: 2 });
/// ```
#[must_use = "a fixture does nothing until you call `given`"]
pub struct ViewFixture<A: Aggregate, V: View<A>> {
    aggregate_id: Uuid,
    description: Option<String>,
    _marker: PhantomData<fn() -> (A, V)>,
}

impl<A: Aggregate, V: View<A>> Debug for ViewFixture<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewFixture")
            .field("aggregate", &A::NAME)
            .field("view", &V::TABLE_NAME)
            .field("aggregate_id", &self.aggregate_id)
            .finish()
    }
}

impl<A: Aggregate, V: View<A>> Default for ViewFixture<A, V> {
    fn default() -> Self {
        ViewFixture {
            aggregate_id: Uuid::new_v4(),
            description: None,
            _marker: PhantomData,
        }
    }
}

impl<A: Aggregate, V: View<A>> ViewFixture<A, V> {
    /// A fixture with a random aggregate id for [`given`](Self::given).
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses this aggregate id for the envelopes [`given`](Self::given) builds.
    pub fn with_aggregate_id(mut self, aggregate_id: Uuid) -> Self {
        self.aggregate_id = aggregate_id;
        self
    }

    /// A description of the case, printed in every failure message (the custom-message form
    /// of the assertions).
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The aggregate id [`given`](Self::given) uses.
    pub fn aggregate_id(&self) -> Uuid {
        self.aggregate_id
    }

    /// Applies events of one aggregate, in envelopes made by [`envelope`] with sequences
    /// (and positions) 1, 2, ….
    pub fn given(self, events: impl IntoIterator<Item = A::Events>) -> ViewThen<A, V> {
        let id = self.aggregate_id;
        self.given_envelopes(
            events
                .into_iter()
                .zip(1..)
                .map(|(event, sequence)| envelope::<A>(id, sequence, event)),
        )
    }

    /// Applies these envelopes, in order, as a projection would.
    pub fn given_envelopes(
        self,
        envelopes: impl IntoIterator<Item = EventEnvelope<A::Events>>,
    ) -> ViewThen<A, V> {
        let given: Vec<EventEnvelope<A::Events>> = envelopes.into_iter().collect();
        let mut views: Vec<(String, V)> = Vec::new();
        let mut error = None;
        'events: for (index, envelope) in given.iter().enumerate() {
            for view_id in V::view_ids(envelope) {
                let slot = match views.iter().position(|(id, _)| *id == view_id) {
                    Some(slot) => slot,
                    None => {
                        views.push((view_id, V::default()));
                        views.len() - 1
                    }
                };
                let (view_id, view) = &mut views[slot];
                if let Err(e) = view.handle_event_for(view_id, envelope) {
                    error = Some((index, e));
                    break 'events;
                }
            }
        }
        ViewThen {
            description: self.description,
            given,
            views,
            error,
        }
    }

    /// No events: the view is `V::default()`.
    pub fn given_no_events(self) -> ViewThen<A, V> {
        self.given_envelopes(Vec::new())
    }
}

/// The views after the given events; assert with the `then_*` methods (chainable,
/// `#[track_caller]`).
///
/// Views are compared by their JSON form (a view is `Serialize`), so they need no
/// `PartialEq`; a failure names the first differing field and lists the given events.
#[must_use = "nothing is checked until you call a `then_*` method"]
pub struct ViewThen<A: Aggregate, V: View<A>> {
    description: Option<String>,
    given: Vec<EventEnvelope<A::Events>>,
    views: Vec<(String, V)>,
    error: Option<(usize, A::Errors)>,
}

impl<A: Aggregate, V: View<A>> Debug for ViewThen<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewThen")
            .field("view", &V::TABLE_NAME)
            .field("given", &self.given)
            .field("views", &self.views)
            .field("error", &self.error)
            .finish()
    }
}

impl<A: Aggregate, V: View<A>> ViewThen<A, V> {
    /// The method's name, with the fixture's description if it has one.
    fn method(&self, name: &str) -> String {
        match &self.description {
            Some(description) => format!("{name} ({description})"),
            None => name.to_owned(),
        }
    }

    fn context(&self) -> String {
        let events: Vec<String> = self
            .given
            .iter()
            .map(|e| {
                format!(
                    "{} {} #{} (position {}): {:?}{}",
                    e.aggregate_type,
                    e.aggregate_id,
                    e.sequence,
                    e.position,
                    e.event,
                    if e.metadata.is_null() {
                        String::new()
                    } else {
                        format!(" metadata {}", e.metadata)
                    }
                )
            })
            .collect();
        let events: Vec<DisplayAsDebug> = events.into_iter().map(DisplayAsDebug).collect();
        format!("view: {}\ngiven:\n{}", V::TABLE_NAME, report::list(&events))
    }

    #[track_caller]
    fn no_error(&self, method: &str) {
        if let Some((index, error)) = &self.error {
            outcome::fail(
                &self.method(method),
                format_args!(
                    "handle_event failed on given event #{}: {}",
                    index + 1,
                    report::error(error)
                ),
                &self.context(),
            );
        }
    }

    #[track_caller]
    fn compare(&self, method: &str, view_id: &str, expected: &V, actual: &V) {
        if let Some(difference) =
            report::first_json_difference(&report::to_json(expected), &report::to_json(actual))
        {
            outcome::fail(
                &self.method(method),
                format_args!(
                    "view {view_id:?} differs\n  first difference: {difference}\n  expected view: {expected:?}\n  actual view:   {actual:?}"
                ),
                &self.context(),
            );
        }
    }

    /// Asserts that every event was applied and the one view instance they concern (or
    /// `V::default()` if none) equals `expected`.
    ///
    /// # Panics
    /// When `handle_event` failed, the events concern several view instances (use
    /// [`then_expect_view_for`](Self::then_expect_view_for)), or the view differs.
    #[track_caller]
    pub fn then_expect_view(&self, expected: V) -> &Self {
        self.no_error("then_expect_view");
        let (view_id, actual) = self.only_view("then_expect_view");
        self.compare("then_expect_view", &view_id, &expected, &actual);
        self
    }

    /// Asserts that every event was applied and the view instance `view_id` equals
    /// `expected` (an instance no event concerned is `V::default()`).
    ///
    /// # Panics
    /// When `handle_event` failed or the view differs.
    #[track_caller]
    pub fn then_expect_view_for(&self, view_id: &str, expected: V) -> &Self {
        self.no_error("then_expect_view_for");
        let actual = self.view_for(view_id).cloned().unwrap_or_default();
        self.compare("then_expect_view_for", view_id, &expected, &actual);
        self
    }

    /// Runs your own assertions on the one view instance (see
    /// [`then_expect_view`](Self::then_expect_view)).
    ///
    /// # Panics
    /// When `handle_event` failed or the events concern several view instances.
    #[track_caller]
    pub fn then_verify_view(&self, check: impl FnOnce(&V)) -> &Self {
        self.no_error("then_verify_view");
        check(&self.only_view("then_verify_view").1);
        self
    }

    /// Asserts that `handle_event` failed with this error on some given event.
    ///
    /// # Panics
    /// When every event was applied, or the error differs.
    #[track_caller]
    pub fn then_expect_error(&self, expected: A::Errors) -> &Self
    where
        A::Errors: PartialEq,
    {
        let (index, actual) = self.expect_failure("then_expect_error");
        if *actual != expected {
            outcome::fail(
                &self.method("then_expect_error"),
                format_args!(
                    "handle_event failed on given event #{} with another error\n  expected error: {}\n  actual error:   {}",
                    index + 1,
                    report::error(&expected),
                    report::error(actual)
                ),
                &self.context(),
            );
        }
        self
    }

    /// Asserts that `handle_event` failed on some given event with an error whose
    /// `Display` text is exactly `expected`.
    ///
    /// # Panics
    /// When every event was applied, or the message differs.
    #[track_caller]
    pub fn then_expect_error_message(&self, expected: &str) -> &Self {
        let (index, actual) = self.expect_failure("then_expect_error_message");
        let message = actual.to_string();
        if message != expected {
            outcome::fail(
                &self.method("then_expect_error_message"),
                format_args!(
                    "handle_event failed on given event #{} with another message\n  expected message: {expected:?}\n  actual message:   {message:?}",
                    index + 1
                ),
                &self.context(),
            );
        }
        self
    }

    #[track_caller]
    fn expect_failure(&self, method: &str) -> (usize, &A::Errors) {
        match &self.error {
            Some((index, error)) => (*index, error),
            None => outcome::fail(
                &self.method(method),
                "expected handle_event to fail, but every given event was applied",
                &self.context(),
            ),
        }
    }

    #[track_caller]
    fn only_view(&self, method: &str) -> (String, V) {
        match self.views.as_slice() {
            [] => ("(no event concerned a view)".to_owned(), V::default()),
            [(id, view)] => (id.clone(), view.clone()),
            many => outcome::fail(
                &self.method(method),
                format_args!(
                    "the events concern {} view instances ({:?}); use `then_expect_view_for(view_id, ..)`",
                    many.len(),
                    many.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>()
                ),
                &self.context(),
            ),
        }
    }

    /// The one view instance the events concern (`V::default()` if none).
    ///
    /// # Panics
    /// When the events concern several view instances.
    #[track_caller]
    pub fn view(&self) -> V {
        self.only_view("view").1
    }

    /// The view instance `view_id`, if any event concerned it.
    pub fn view_for(&self, view_id: &str) -> Option<&V> {
        self.views
            .iter()
            .find(|(id, _)| id == view_id)
            .map(|(_, view)| view)
    }

    /// Every view instance the events concern, with its id, in order of first event.
    pub fn views(&self) -> &[(String, V)] {
        &self.views
    }

    /// The error `handle_event` returned, with the index of the event it refused.
    pub fn error(&self) -> Option<(usize, &A::Errors)> {
        self.error.as_ref().map(|(index, error)| (*index, error))
    }
}

/// Prints a prepared line as is inside [`report::list`].
struct DisplayAsDebug(String);

impl Debug for DisplayAsDebug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
