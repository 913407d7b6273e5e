//! The framework's errors: [`CQRSError`] and the pieces it carries.

use std::fmt;

use uuid::Uuid;

/// A boxed error from a storage driver or a network client.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the framework itself can fail with.
///
/// An aggregate's own error type converts from it (`Aggregate::Errors: From<CQRSError>`),
/// so [`CQRSFramework::dispatch`](crate::CQRSFramework::dispatch) returns the domain's error
/// type and a caller can still match the framework's variant inside it.
///
/// Each variant says what a caller should do about it under **Handling**.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CQRSError {
    /// Another writer appended to the aggregate first: the events this command decided on
    /// were based on a state that is no longer current, and none of them was stored.
    ///
    /// ### Handling
    /// Reload and run the command again, or let the framework do it with
    /// [`RetryPolicy`](crate::RetryPolicy). Nothing needs undoing.
    #[error(
        "concurrency conflict on {aggregate_type} {aggregate_id}: expected to append after \
         sequence {expected_sequence}, but another writer got there first"
    )]
    Conflict {
        /// The aggregate's type (`Aggregate::NAME`).
        aggregate_type: String,
        /// The aggregate's id.
        aggregate_id: Uuid,
        /// The sequence the writer believed was the last one.
        expected_sequence: i64,
    },

    /// A stored event could not be turned back into a domain event: its payload does not
    /// decode, or its (type, version) is not one the event type knows.
    ///
    /// ### Handling
    /// The store is intact and nothing was written. Deploy code that knows the event (or an
    /// upcaster for its version), or repair the named row.
    #[error(transparent)]
    EventDecode(Box<EventDecodeError>),

    /// An event, a piece of metadata, a snapshot or a view could not be serialized to JSON.
    ///
    /// ### Handling
    /// A bug in a `Serialize` implementation (a map with non-string keys, a failing custom
    /// serializer). Nothing was stored.
    #[error("could not serialize {what}: {source}")]
    Serialization {
        /// What was being serialized, e.g. `event Deposited of BankAccount`.
        what: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// A stored view or snapshot no longer deserializes into its Rust type.
    ///
    /// ### Handling
    /// For a snapshot the framework falls back to a full replay by itself; for a view, bump
    /// `View::VERSION` so it is rebuilt, or repair the row.
    #[error("could not deserialize {what}: {source}")]
    Deserialization {
        /// What was being deserialized, e.g. `view account_balance/42`.
        what: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// An append reused an event id that the store already holds for a different event (or
    /// only part of a batch was stored before, which a store never does).
    ///
    /// ### Handling
    /// A retried append must resend exactly the same events; a new append needs new ids.
    #[error("event id {event_id} is already stored for a different event")]
    DuplicateEventId {
        /// The event id that collided.
        event_id: Uuid,
    },

    /// The stored history of an aggregate has a hole or is out of order; or, as the outcome
    /// of an event in a [`PerAggregateProjection`](crate::PerAggregateProjection) batch, the
    /// event follows one of its aggregate that is not applied yet (not delivered, or failed).
    ///
    /// ### Handling
    /// From a store: it was modified outside the framework; repair it. The framework refuses
    /// to build state from an incomplete history. From a projection batch: deliver the event
    /// again after the missing one (a Lambda source does so by itself).
    #[error(
        "history of {aggregate_type} {aggregate_id} is broken: expected sequence \
         {expected_sequence}, found {found_sequence}"
    )]
    SequenceGap {
        /// The aggregate's type.
        aggregate_type: String,
        /// The aggregate's id.
        aggregate_id: Uuid,
        /// The sequence that should have come next.
        expected_sequence: i64,
        /// The sequence that was stored there instead.
        found_sequence: i64,
    },

    /// The caller handed a store something it must refuse: an empty batch, events of several
    /// aggregates in one append, sequences that are not contiguous or that skip ahead.
    ///
    /// ### Handling
    /// A bug in the caller; the framework's own dispatcher never does this.
    #[error("invalid append: {0}")]
    InvalidAppend(String),

    /// A view row changed since it was loaded: another projector wrote it.
    ///
    /// ### Handling
    /// Reload the view and apply the events again; the projection runner does this.
    #[error(
        "view {view}/{view_id} was changed by another writer (expected version {expected_version})"
    )]
    ViewConflict {
        /// The view's table name.
        view: String,
        /// The view instance's id.
        view_id: String,
        /// The version the writer loaded.
        expected_version: i64,
    },

    /// A view's `handle_event` refused an event.
    ///
    /// ### Handling
    /// Fix the view or the event; the projection stops at this event (nothing after it is
    /// applied) until it can be handled, or records it as a dead letter, per its
    /// `PoisonPolicy`.
    #[error(transparent)]
    ViewHandler(Box<ViewHandlerError>),

    /// A store refused events because of what they hold, not because of its state: a string
    /// with a NUL character (`"\u0000"`) in the payload, the metadata or a name, which
    /// PostgreSQL `text` and `jsonb` cannot store, or a payload that is not JSON (one read
    /// from a damaged row of another store). Nothing of the append was stored.
    ///
    /// ### Handling
    /// Do not retry: the same events are refused every time (the framework's
    /// [`RetryPolicy`](crate::RetryPolicy) retries only [`CQRSError::Conflict`]). Fix the data:
    /// strip or encode the character before it reaches the event, then run the command again.
    #[error(
        "events of {aggregate_type} {aggregate_id} from sequence {first_sequence} cannot be \
         stored: {reason}"
    )]
    Unstorable {
        /// The aggregate's type.
        aggregate_type: String,
        /// The aggregate's id.
        aggregate_id: Uuid,
        /// The sequence of the first event of the refused append.
        first_sequence: i64,
        /// What the store refused, in its own words.
        reason: String,
    },

    /// A row of the global stream that the store cannot turn into an event at all (its
    /// metadata is not JSON, its event id is not a UUID, its timestamp is out of range),
    /// returned by [`EventRepository::read_all`](crate::EventRepository::read_all) when it
    /// is the first row of the page asked for. The rows after it are still readable with
    /// `read_all(position, ..)`.
    ///
    /// ### Handling
    /// The store was modified outside the framework; repair the row at
    /// [`DamagedRow::position`]. A [`Projection`](crate::Projection) and the NATS relay treat
    /// it as a poison event at that position: under `PoisonPolicy::Stop` they stop with this
    /// error, under `PoisonPolicy::SkipAndRecord` they record a dead letter and read on.
    #[error(transparent)]
    DamagedRow(Box<DamagedRow>),

    /// The storage back end failed: a connection dropped, a server went away, a disk filled.
    ///
    /// ### Handling
    /// Usually transient. If it happened during an append the outcome is unknown; retrying the
    /// same append (same event ids) is safe, and the store reports success if the first try
    /// had in fact committed. Retrying the whole command is safe too: it reloads first.
    #[error("persistence error: {0}")]
    PersistenceError(#[source] BoxError),

    /// Waiting for something (a view to reach a position) took longer than allowed.
    ///
    /// ### Handling
    /// Try again later, or read the view as it is.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),

    /// A projection ended before it reached the position a caller was waiting for
    /// ([`ProjectionHandle::wait_for`](crate::projection::ProjectionHandle::wait_for)).
    ///
    /// ### Handling
    /// The projection's own error says why it ended
    /// ([`ProjectionHandle::wait`](crate::projection::ProjectionHandle::wait)): usually a
    /// poison event under `PoisonPolicy::Stop`. Fix it and start the projection again; the
    /// view is correct up to the position it reached.
    #[error(transparent)]
    ProjectionStopped(#[from] ProjectionStopped),

    /// A JetStream-fed projection ([`NatsProjection`](crate::NatsProjection)) has applied
    /// events beyond everything its stream holds: the stream lost its newest messages (a
    /// server that stopped before writing to disk what it had acknowledged), was deleted and
    /// recreated, or its relay has not published them yet (a view moved over from the
    /// store-fed projection). Waiting for the stream to deliver the next event could wait
    /// forever.
    ///
    /// ### Handling
    /// The view is correct up to its checkpoint. A running
    /// [`NatsRelay`](crate::NatsRelay) finds the same loss and publishes the missing events
    /// again; once the stream holds `checkpoint` the projection goes on (a running projection
    /// retries by itself and shows this error as its last error meanwhile). If no relay
    /// writes to the stream, rebuild the view from the store with
    /// [`Projection`](crate::Projection).
    #[error(
        "stream {stream} holds events up to position {holds}, but projection {projection} has \
         applied up to position {checkpoint}: the stream lost its newest messages, was \
         recreated, or its relay is behind"
    )]
    StreamBehind {
        /// The JetStream stream's name.
        stream: String,
        /// The projection's checkpoint name.
        projection: String,
        /// The global position of the last event the stream holds (0 when it holds none).
        holds: i64,
        /// The projection's checkpoint.
        checkpoint: i64,
    },

    /// A process instance kept answering refused commands with commands that were refused
    /// in turn, past the runner's limit of rounds for one event or deadline.
    ///
    /// ### Handling
    /// A defect of the process manager's `on_refused`: fix it so that a refusal ends in a
    /// decision that is not refused again (give up, complete). The runner stops on this
    /// error without moving its checkpoint; the commands that were applied stay applied and
    /// are recognised when the runner runs the event again.
    #[error(
        "process {process} instance {instance} was still sending commands after {rounds} \
         rounds of refusals for one event"
    )]
    ProcessLoop {
        /// The process manager's name.
        process: String,
        /// The instance's id.
        instance: String,
        /// How many rounds of refusals it went through.
        rounds: u32,
    },

    /// The store was built without a capability that the call needs: `read_all` on an event
    /// store that keeps no global order, say.
    ///
    /// ### Handling
    /// A configuration error, the same on every retry: use a store built with the
    /// capability, or feed the caller another way (a projection of a store without a global
    /// order is fed per aggregate, by `PerAggregateProjection` from DynamoDB Streams or SQS).
    ///
    /// ```
    /// let error = cqrs::CQRSError::Unsupported {
    ///     store: "DynamoDB table events".into(),
    ///     capability: "read_all (a global order)".into(),
    /// };
    /// assert!(error.to_string().contains("read_all"));
    /// ```
    #[error("{store} does not offer {capability}")]
    Unsupported {
        /// The store, as its messages name it.
        store: String,
        /// What it was asked for and does not offer.
        capability: String,
    },

    /// An application's own write statement (`SqliteEventRepository::execute_write`) broke
    /// a constraint of the database: a `UNIQUE` or `PRIMARY KEY` value already taken, a
    /// `CHECK`, `NOT NULL` or `FOREIGN KEY`, a trigger's `RAISE(ABORT, ...)`. The statement
    /// changed nothing; the writes committed beside it are not affected.
    ///
    /// ### Handling
    /// The same statement is refused again as long as the data is the same: read what is
    /// stored and decide (the key was taken by another request, say), or fix the statement.
    #[error("write refused by a constraint: {message}")]
    ConstraintViolation {
        /// The database's message, naming the constraint (`UNIQUE constraint failed:
        /// keys.id`).
        message: String,
    },
}

impl CQRSError {
    /// Wraps a storage driver's error as [`CQRSError::PersistenceError`].
    pub fn persistence(error: impl Into<BoxError>) -> Self {
        CQRSError::PersistenceError(error.into())
    }

    /// True for [`CQRSError::Conflict`]: the command may succeed if run again on fresh state.
    ///
    /// ```
    /// # use cqrs::CQRSError;
    /// let err = CQRSError::Conflict {
    ///     aggregate_type: "account".into(),
    ///     aggregate_id: uuid::Uuid::nil(),
    ///     expected_sequence: 3,
    /// };
    /// assert!(err.is_conflict());
    /// ```
    pub fn is_conflict(&self) -> bool {
        matches!(self, CQRSError::Conflict { .. })
    }
}

/// Two errors are equal when they are the same variant with equal fields. Errors that a
/// variant wraps from a driver or from serde (`PersistenceError`, the `source` of
/// `Serialization` and `Deserialization`, a malformed payload) are compared by their message.
///
/// This is what lets a domain error that wraps the framework's derive `PartialEq`, so tests
/// compare whole errors, a typed conflict included:
///
/// ```
/// use cqrs::CQRSError;
///
/// #[derive(Debug, PartialEq, thiserror::Error)]
/// enum CartError {
///     #[error("the cart is empty")]
///     Empty,
///     #[error(transparent)]
///     Framework(#[from] CQRSError),
/// }
///
/// let conflict = |expected_sequence| CQRSError::Conflict {
///     aggregate_type: "cart".into(),
///     aggregate_id: uuid::Uuid::nil(),
///     expected_sequence,
/// };
/// assert_eq!(CartError::from(conflict(3)), CartError::Framework(conflict(3)));
/// assert_ne!(CartError::from(conflict(3)), CartError::Framework(conflict(4)));
/// assert_ne!(CartError::from(conflict(3)), CartError::Empty);
/// ```
impl PartialEq for CQRSError {
    fn eq(&self, other: &Self) -> bool {
        use CQRSError as E;
        match (self, other) {
            (
                E::Conflict {
                    aggregate_type: a_type,
                    aggregate_id: a_id,
                    expected_sequence: a_seq,
                },
                E::Conflict {
                    aggregate_type: b_type,
                    aggregate_id: b_id,
                    expected_sequence: b_seq,
                },
            ) => a_type == b_type && a_id == b_id && a_seq == b_seq,
            (E::EventDecode(a), E::EventDecode(b)) => a == b,
            (
                E::Serialization {
                    what: a_what,
                    source: a_source,
                },
                E::Serialization {
                    what: b_what,
                    source: b_source,
                },
            )
            | (
                E::Deserialization {
                    what: a_what,
                    source: a_source,
                },
                E::Deserialization {
                    what: b_what,
                    source: b_source,
                },
            ) => a_what == b_what && a_source.to_string() == b_source.to_string(),
            (E::DuplicateEventId { event_id: a }, E::DuplicateEventId { event_id: b }) => a == b,
            (
                E::SequenceGap {
                    aggregate_type: a_type,
                    aggregate_id: a_id,
                    expected_sequence: a_expected,
                    found_sequence: a_found,
                },
                E::SequenceGap {
                    aggregate_type: b_type,
                    aggregate_id: b_id,
                    expected_sequence: b_expected,
                    found_sequence: b_found,
                },
            ) => a_type == b_type && a_id == b_id && a_expected == b_expected && a_found == b_found,
            (E::InvalidAppend(a), E::InvalidAppend(b)) => a == b,
            (
                E::ViewConflict {
                    view: a_view,
                    view_id: a_id,
                    expected_version: a_version,
                },
                E::ViewConflict {
                    view: b_view,
                    view_id: b_id,
                    expected_version: b_version,
                },
            ) => a_view == b_view && a_id == b_id && a_version == b_version,
            (E::ViewHandler(a), E::ViewHandler(b)) => a == b,
            (
                E::Unstorable {
                    aggregate_type: a_type,
                    aggregate_id: a_id,
                    first_sequence: a_seq,
                    reason: a_reason,
                },
                E::Unstorable {
                    aggregate_type: b_type,
                    aggregate_id: b_id,
                    first_sequence: b_seq,
                    reason: b_reason,
                },
            ) => a_type == b_type && a_id == b_id && a_seq == b_seq && a_reason == b_reason,
            (E::DamagedRow(a), E::DamagedRow(b)) => a == b,
            (E::PersistenceError(a), E::PersistenceError(b)) => a.to_string() == b.to_string(),
            (E::Timeout(a), E::Timeout(b)) => a == b,
            (E::ProjectionStopped(a), E::ProjectionStopped(b)) => a.to_string() == b.to_string(),
            (
                E::StreamBehind {
                    stream: a_stream,
                    projection: a_projection,
                    holds: a_holds,
                    checkpoint: a_checkpoint,
                },
                E::StreamBehind {
                    stream: b_stream,
                    projection: b_projection,
                    holds: b_holds,
                    checkpoint: b_checkpoint,
                },
            ) => {
                a_stream == b_stream
                    && a_projection == b_projection
                    && a_holds == b_holds
                    && a_checkpoint == b_checkpoint
            }
            (
                E::ProcessLoop {
                    process: a_process,
                    instance: a_instance,
                    rounds: a_rounds,
                },
                E::ProcessLoop {
                    process: b_process,
                    instance: b_instance,
                    rounds: b_rounds,
                },
            ) => a_process == b_process && a_instance == b_instance && a_rounds == b_rounds,
            (
                E::Unsupported {
                    store: a_store,
                    capability: a_capability,
                },
                E::Unsupported {
                    store: b_store,
                    capability: b_capability,
                },
            ) => a_store == b_store && a_capability == b_capability,
            (
                E::ConstraintViolation { message: a_message },
                E::ConstraintViolation { message: b_message },
            ) => a_message == b_message,
            // Every variant is named here, so a new one cannot be forgotten above.
            (
                E::Conflict { .. }
                | E::EventDecode(_)
                | E::Serialization { .. }
                | E::Deserialization { .. }
                | E::DuplicateEventId { .. }
                | E::SequenceGap { .. }
                | E::InvalidAppend(_)
                | E::ViewConflict { .. }
                | E::ViewHandler(_)
                | E::Unstorable { .. }
                | E::DamagedRow(_)
                | E::PersistenceError(_)
                | E::Timeout(_)
                | E::ProjectionStopped(_)
                | E::StreamBehind { .. }
                | E::ProcessLoop { .. }
                | E::Unsupported { .. }
                | E::ConstraintViolation { .. },
                _,
            ) => false,
        }
    }
}

/// The projection stopped before it reached the position a caller waits for.
///
/// [`ProjectionHandle::wait_for`](crate::ProjectionHandle::wait_for) returns it as
/// [`CQRSError::ProjectionStopped`]; the runner's own error is
/// [`ProjectionHandle::last_error`](crate::ProjectionHandle::last_error) or
/// [`ProjectionHandle::wait`](crate::ProjectionHandle::wait).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("projection {projection} stopped at position {reached} before reaching {wanted}")]
pub struct ProjectionStopped {
    /// The projection's checkpoint name.
    pub projection: String,
    /// The last position it applied.
    pub reached: i64,
    /// The position waited for.
    pub wanted: i64,
}

/// Why one stored event could not be decoded, with the event it came from.
///
/// It names the aggregate type, aggregate id, sequence, event type and version, so the row
/// can be found.
#[derive(Debug, PartialEq)]
pub struct EventDecodeError {
    /// The aggregate type of the stored event.
    pub aggregate_type: String,
    /// The aggregate id of the stored event.
    pub aggregate_id: Uuid,
    /// The sequence of the stored event within its aggregate.
    pub sequence: i64,
    /// The stored event type name.
    pub event_type: String,
    /// The stored event version.
    pub event_version: String,
    /// What went wrong.
    pub kind: DecodeError,
}

impl fmt::Display for EventDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot decode event {} v{} of {} {} at sequence {}: {}",
            self.event_type,
            self.event_version,
            self.aggregate_type,
            self.aggregate_id,
            self.sequence,
            self.kind
        )
    }
}

impl std::error::Error for EventDecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

impl From<EventDecodeError> for CQRSError {
    fn from(error: EventDecodeError) -> Self {
        CQRSError::EventDecode(Box::new(error))
    }
}

/// A stored row of the global stream that cannot be read as an event: its position, what
/// could be read of its identity, and what is wrong with it.
///
/// It travels as [`CQRSError::DamagedRow`], and through NATS as a message of its own (its
/// serde form), so a consumer meets the same poison event as a store reader.
///
/// ```
/// let damage = cqrs::DamagedRow {
///     position: 7,
///     event_id: None,
///     aggregate_type: Some("account".into()),
///     aggregate_id: None,
///     sequence: Some(3),
///     event_type: Some("Deposited".into()),
///     event_version: Some("1".into()),
///     problem: "metadata is not JSON".into(),
/// };
/// assert!(cqrs::CQRSError::from(damage).to_string().contains("position 7"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error(
    "damaged row at position {position} of the event store ({}): {problem}",
    self.identity()
)]
pub struct DamagedRow {
    /// The row's global position.
    pub position: i64,
    /// The event id, when it could be read.
    pub event_id: Option<Uuid>,
    /// The aggregate type, when it could be read.
    pub aggregate_type: Option<String>,
    /// The aggregate id, when it could be read.
    pub aggregate_id: Option<Uuid>,
    /// The sequence within the aggregate, when it could be read.
    pub sequence: Option<i64>,
    /// The stored event type, when it could be read.
    pub event_type: Option<String>,
    /// The stored event version, when it could be read.
    pub event_version: Option<String>,
    /// What is wrong with the row.
    pub problem: String,
}

impl DamagedRow {
    /// What could be read of the row's identity, for messages.
    fn identity(&self) -> String {
        let unknown = |value: Option<String>| value.unwrap_or_else(|| "?".to_owned());
        format!(
            "event {} v{} of {} {} at sequence {}",
            unknown(self.event_type.clone()),
            unknown(self.event_version.clone()),
            unknown(self.aggregate_type.clone()),
            unknown(self.aggregate_id.map(|id| id.to_string())),
            unknown(self.sequence.map(|s| s.to_string())),
        )
    }
}

impl From<DamagedRow> for CQRSError {
    fn from(damage: DamagedRow) -> Self {
        CQRSError::DamagedRow(Box::new(damage))
    }
}

/// What went wrong decoding a payload, without the envelope's identity.
///
/// [`DomainEvent::decode`](crate::DomainEvent::decode) returns it;
/// [`DomainEvent::try_from_persisted`](crate::DomainEvent::try_from_persisted) adds the
/// aggregate, sequence, type and version around it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The event type and version are not among those the Rust type reads.
    #[error("unknown event type or version")]
    UnknownEventType,
    /// The payload is not valid for the event type and version it is stored under.
    #[error("malformed payload: {0}")]
    MalformedPayload(#[source] serde_json::Error),
    /// An upcaster refused to bring an old version up to date.
    #[error("upcast failed: {0}")]
    Upcast(String),
}

/// Same variant, and for a malformed payload the same message.
impl PartialEq for DecodeError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (DecodeError::UnknownEventType, DecodeError::UnknownEventType) => true,
            (DecodeError::MalformedPayload(a), DecodeError::MalformedPayload(b)) => {
                a.to_string() == b.to_string()
            }
            (DecodeError::Upcast(a), DecodeError::Upcast(b)) => a == b,
            (
                DecodeError::UnknownEventType
                | DecodeError::MalformedPayload(_)
                | DecodeError::Upcast(_),
                _,
            ) => false,
        }
    }
}

/// A view refused a stored event: which view, which event, and the handler's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "view {view} failed on event {event_type} v{event_version} of {aggregate_type} \
     {aggregate_id} (sequence {sequence}, position {position}): {message}"
)]
pub struct ViewHandlerError {
    /// The view's table name.
    pub view: String,
    /// The aggregate type of the event.
    pub aggregate_type: String,
    /// The aggregate id of the event.
    pub aggregate_id: Uuid,
    /// The event's sequence within its aggregate.
    pub sequence: i64,
    /// The event's global position.
    pub position: i64,
    /// The event's stored type name.
    pub event_type: String,
    /// The event's stored version.
    pub event_version: String,
    /// The handler's error, rendered.
    pub message: String,
}
