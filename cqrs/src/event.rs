//! Domain events and their stored form.

use std::cell::Cell;
use std::fmt::Debug;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use smol_str::SmolStr;
use uuid::Uuid;

use crate::error::{CQRSError, DecodeError, EventDecodeError, ViewHandlerError};
use crate::payload::Payload;

/// One (name, version) pair under which an event type is stored.
///
/// ```
/// let t = cqrs::EventType::new("Deposited", "1");
/// assert_eq!(t.name, "Deposited");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType {
    /// The stored event name (`PersistableDomainEvent::event_type`).
    pub name: &'static str,
    /// The stored event version (`PersistableDomainEvent::event_version`).
    pub version: &'static str,
}

impl EventType {
    /// A (name, version) pair.
    pub const fn new(name: &'static str, version: &'static str) -> Self {
        EventType { name, version }
    }
}

/// A fact that happened to an aggregate, as the domain sees it.
///
/// Every event is stored under a name and a version. The name is what readers of the store
/// see, so it must not change when the Rust type is renamed; the version changes when the
/// payload's shape does.
///
/// Write it with `#[derive(DomainEvent)]` (see [`macro@crate::DomainEvent`]), or by hand:
/// only the name and version are required; the payload is the event's serde form, and
/// decoding checks that the stored name and version match what the decoded value reports.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum AccountEvent {
///     Opened { owner: String },
///     Deposited { amount: u64 },
/// }
///
/// impl cqrs::DomainEvent for AccountEvent {
///     fn persisted_event_name(&self) -> &'static str {
///         match self {
///             AccountEvent::Opened { .. } => "AccountOpened",
///             AccountEvent::Deposited { .. } => "MoneyDeposited",
///         }
///     }
///     fn persisted_event_version(&self) -> &'static str {
///         "1"
///     }
/// }
///
/// use cqrs::DomainEvent;
/// let event = AccountEvent::Deposited { amount: 5 };
/// let payload = event.to_payload().unwrap();
/// let back = AccountEvent::decode("MoneyDeposited", "1", &payload).unwrap();
/// assert_eq!(back, event);
/// // Stored under another name: refused, not silently accepted.
/// assert!(AccountEvent::decode("AccountOpened", "1", &payload).is_err());
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a domain event",
    label = "this type does not implement `DomainEvent`",
    note = "add `#[derive(cqrs::DomainEvent, serde::Serialize, serde::Deserialize)]` to it, or implement `cqrs::DomainEvent` by hand"
)]
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static
{
    /// Every (name, version) pair this type writes or can read, for stores and tooling.
    ///
    /// The derive fills it in; a hand-written implementation may leave it empty.
    const EVENT_TYPES: &'static [EventType] = &[];

    /// The name this event is stored under.
    fn persisted_event_name(&self) -> &'static str;

    /// The version of this event's payload schema.
    fn persisted_event_version(&self) -> &'static str;

    /// The JSON payload stored for this event. By default, its serde form.
    ///
    /// # Errors
    /// The serializer's error, e.g. for a map with non-string keys.
    fn to_payload(&self) -> Result<Payload, serde_json::Error> {
        Payload::from_serialize(self)
    }

    /// Decodes a payload stored under `event_type` and `event_version`.
    ///
    /// The default deserializes the serde form and then checks that the value's own name and
    /// version are the stored ones, so a payload stored under the wrong name is refused.
    ///
    /// # Errors
    /// [`DecodeError::MalformedPayload`] when the payload does not deserialize,
    /// [`DecodeError::UnknownEventType`] when the name or version is not this type's.
    fn decode(
        event_type: &str,
        event_version: &str,
        payload: &Payload,
    ) -> Result<Self, DecodeError> {
        let event: Self = payload
            .deserialize()
            .map_err(DecodeError::MalformedPayload)?;
        if event.persisted_event_name() != event_type
            || event.persisted_event_version() != event_version
        {
            return Err(DecodeError::UnknownEventType);
        }
        Ok(event)
    }

    /// Decodes a stored payload into every event it stands for today: usually one, but an old
    /// version whose upcast step split it stands for several, and one that is now dropped
    /// stands for none.
    ///
    /// The framework folds history with this method, so an aggregate sees every event an old
    /// row became. The default is `vec![Self::decode(..)?]`; `#[derive(DomainEvent)]`
    /// overrides it when an `#[event(upcast(..))]` step can split or drop an event.
    ///
    /// ```
    /// # use cqrs::doc::CounterEvent;
    /// use cqrs::DomainEvent;
    ///
    /// let payload = cqrs::Payload::from_json(r#"{ "Incremented": { "by": 1 } }"#)?;
    /// assert_eq!(
    ///     CounterEvent::decode_all("Incremented", "1", &payload)?,
    ///     vec![CounterEvent::Incremented { by: 1 }]
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`DomainEvent::decode`], plus [`DecodeError::Upcast`] when an upcast step refuses.
    fn decode_all(
        event_type: &str,
        event_version: &str,
        payload: &Payload,
    ) -> Result<Vec<Self>, DecodeError> {
        Ok(vec![Self::decode(event_type, event_version, payload)?])
    }

    /// Turns a stored event back into a domain event.
    ///
    /// # Errors
    /// [`CQRSError::EventDecode`] naming the aggregate, sequence, event type and version.
    fn try_from_persisted(event: &PersistableDomainEvent) -> Result<Self, CQRSError> {
        Self::decode(&event.event_type, &event.event_version, &event.payload)
            .map_err(|kind| decode_error(event, kind))
    }

    /// Turns a stored event back into every domain event it stands for today
    /// ([`DomainEvent::decode_all`]): what folding a history should use.
    ///
    /// # Errors
    /// [`CQRSError::EventDecode`] naming the aggregate, sequence, event type and version.
    fn try_all_from_persisted(event: &PersistableDomainEvent) -> Result<Vec<Self>, CQRSError> {
        Self::decode_all(&event.event_type, &event.event_version, &event.payload)
            .map_err(|kind| decode_error(event, kind))
    }
}

/// A new event's id and timestamp, from one reading of the clock.
///
/// The id is a UUID v7 of that same instant (milliseconds since the epoch, then bits
/// unique to this id, see `crate::ids`): ids of events appended one after the other grow, so a store's unique index on
/// `event_id` takes each new id near the last one instead of on a random page.
///
/// The timestamp is `Utc::now()`, reusing the calendar date of this thread's previous call
/// while the day is the same: turning a day number into a date is half of what `Utc::now`
/// costs.
fn stamp() -> (Uuid, DateTime<Utc>) {
    thread_local! {
        /// The last day number since the epoch this thread stamped, and its date.
        static DAY: Cell<Option<(u64, NaiveDate)>> = const { Cell::new(None) };
    }
    let Ok(since_epoch) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        // A clock before 1970: the id cannot carry it, and falls back to random.
        return (Uuid::new_v4(), Utc::now());
    };
    let (seconds, nanos) = (since_epoch.as_secs(), since_epoch.subsec_nanos());
    let id = crate::ids::v7_at(seconds * 1_000 + u64::from(nanos / 1_000_000));
    let day = seconds / 86_400;
    let date = match DAY.with(Cell::get) {
        Some((cached, date)) if cached == day => Some(date),
        _ => i64::try_from(seconds)
            .ok()
            .and_then(|seconds| DateTime::from_timestamp(seconds, 0))
            .map(|midnight| {
                let date = midnight.date_naive();
                DAY.with(|cell| cell.set(Some((day, date))));
                date
            }),
    };
    // Seconds since midnight are below 86,400 and nanoseconds below 10^9: always a time.
    let timestamp = match date.zip(NaiveTime::from_num_seconds_from_midnight_opt(
        (seconds % 86_400) as u32,
        nanos,
    )) {
        Some((date, time)) => NaiveDateTime::new(date, time).and_utc(),
        None => Utc::now(),
    };
    (id, timestamp)
}

fn decode_error(event: &PersistableDomainEvent, kind: DecodeError) -> CQRSError {
    CQRSError::from(EventDecodeError {
        aggregate_type: event.aggregate_type.to_string(),
        aggregate_id: event.aggregate_id,
        sequence: event.sequence,
        event_type: event.event_type.to_string(),
        event_version: event.event_version.to_string(),
        kind,
    })
}

/// What a raw upcast step (`#[event(upcast(from = "1", raw = path))]`) makes of an old
/// payload.
///
/// A raw step is `fn(serde_json::Value) -> Result<Upcasted, cqrs::DecodeError>`. It either
/// rewrites the payload into the shape of the version its step goes to
/// ([`Upcasted::Payload`]), or replaces the stored event with other stored events
/// ([`Upcasted::Events`]): one under another name (a rename), several (a split), or none (an
/// event that is dropped). Those events are decoded in turn, through their own chains.
///
/// ```
/// use cqrs::{Upcasted, UpcastEvent};
/// use serde_json::json;
///
/// // A rename: the old row is read as a `MoneyDeposited` version 2.
/// let renamed = Upcasted::renamed("MoneyDeposited", "2", json!({ "amount": 5 }));
/// assert!(matches!(renamed, Upcasted::Events(ref events) if events.len() == 1));
/// // A dropped event: nothing is left of it.
/// assert!(matches!(Upcasted::dropped(), Upcasted::Events(ref events) if events.is_empty()));
/// # let _ = UpcastEvent::new("x", "1", json!(null));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Upcasted {
    /// The payload in the shape of the version the step goes to (its `to`, by default the
    /// current version).
    Payload(Value),
    /// Stored events that replace the old one, decoded in turn (possibly none).
    Events(Vec<UpcastEvent>),
}

impl Upcasted {
    /// The old event becomes one event stored under `name` and `version`.
    pub fn renamed(name: impl Into<String>, version: impl Into<String>, payload: Value) -> Self {
        Upcasted::Events(vec![UpcastEvent::new(name, version, payload)])
    }

    /// The old event becomes several events, in this order.
    pub fn split(events: impl IntoIterator<Item = UpcastEvent>) -> Self {
        Upcasted::Events(events.into_iter().collect())
    }

    /// The old event no longer means anything: it is skipped when read.
    pub fn dropped() -> Self {
        Upcasted::Events(Vec::new())
    }
}

/// One event a raw upcast step produces: a (name, version, payload) decoded as if it had been
/// stored that way.
#[derive(Debug, Clone, PartialEq)]
pub struct UpcastEvent {
    /// The event name to decode it under.
    pub name: String,
    /// The event version to decode it under.
    pub version: String,
    /// Its payload.
    pub payload: Value,
}

impl UpcastEvent {
    /// An event stored under `name` and `version` with `payload`.
    pub fn new(name: impl Into<String>, version: impl Into<String>, payload: Value) -> Self {
        UpcastEvent {
            name: name.into(),
            version: version.into(),
            payload,
        }
    }
}

/// An event as it is stored: the domain event's payload with everything needed to find,
/// order and deduplicate it.
///
/// The framework builds these in `dispatch`; stores persist and return them. `position` is
/// assigned by the store on append and is 0 before that.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistableDomainEvent {
    /// Unique id of this event, set once by the writer: a retried append carrying the same ids
    /// is recognised and not stored twice. The framework gives each new event a UUID v7 of its
    /// `timestamp`'s millisecond, so ids grow with time; stores accept any id.
    pub event_id: Uuid,
    /// `"{aggregate_type}:{aggregate_id}"`: one key naming the aggregate instance.
    pub aggregate_type_id: SmolStr,
    /// The aggregate instance's id.
    pub aggregate_id: Uuid,
    /// The aggregate's type (`Aggregate::NAME`).
    pub aggregate_type: SmolStr,
    /// 1-based position of this event within its aggregate's history.
    pub sequence: i64,
    /// Global position in commit order across all aggregates, assigned by the store
    /// (1-based; 0 until stored).
    pub position: i64,
    /// The stored event name (`DomainEvent::persisted_event_name`).
    pub event_type: SmolStr,
    /// The stored event version (`DomainEvent::persisted_event_version`).
    pub event_version: SmolStr,
    /// The event's JSON payload.
    pub payload: Payload,
    /// JSON metadata given to `dispatch_with_metadata` (`null` for `dispatch`).
    pub metadata: Value,
    /// When the event was created.
    pub timestamp: DateTime<Utc>,
    /// The workflow this event belongs to: the id of the first command or request of it
    /// ([`CommandContext::correlation_id`](crate::CommandContext::correlation_id)). `None`
    /// for an event dispatched without a context, and for events stored before stores had
    /// the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The command that caused this event
    /// ([`CommandContext::command_id`](crate::CommandContext::command_id)). All events of one
    /// command share it. `None` as for `correlation_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
}

impl PersistableDomainEvent {
    /// The `aggregate_type_id` key for an aggregate instance.
    ///
    /// ```
    /// let id = uuid::Uuid::nil();
    /// assert_eq!(
    ///     cqrs::PersistableDomainEvent::type_id_for("account", id),
    ///     "account:00000000-0000-0000-0000-000000000000"
    /// );
    /// ```
    pub fn type_id_for(aggregate_type: &str, aggregate_id: Uuid) -> SmolStr {
        // Written by hand, on the stack, so that the key costs one allocation (the shared
        // text): `format!` costs about ten times more on the dispatch path.
        let mut buffer = Uuid::encode_buffer();
        let id = aggregate_id.hyphenated().encode_lower(&mut buffer);
        let mut key = [0u8; 128];
        let length = aggregate_type.len() + 1 + id.len();
        if length > key.len() {
            return SmolStr::from(format!("{aggregate_type}:{id}"));
        }
        key[..aggregate_type.len()].copy_from_slice(aggregate_type.as_bytes());
        key[aggregate_type.len()] = b':';
        key[aggregate_type.len() + 1..length].copy_from_slice(id.as_bytes());
        // Both parts are UTF-8 and the separator is ASCII, so this never falls back.
        std::str::from_utf8(&key[..length]).map_or_else(
            |_| SmolStr::from(format!("{aggregate_type}:{id}")),
            SmolStr::new,
        )
    }

    /// Builds the stored form of `event`, serializing its payload.
    ///
    /// # Errors
    /// [`CQRSError::Serialization`] when the payload does not serialize.
    pub fn new<E: DomainEvent>(
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        event: &E,
        metadata: Value,
    ) -> Result<Self, CQRSError> {
        Self::for_aggregate(
            &SmolStr::new(aggregate_type),
            &Self::type_id_for(aggregate_type, aggregate_id),
            aggregate_id,
            sequence,
            event,
            metadata,
        )
    }

    /// [`PersistableDomainEvent::new`] with the aggregate's names already built, so that the
    /// events of one command share them.
    pub(crate) fn for_aggregate<E: DomainEvent>(
        aggregate_type: &SmolStr,
        aggregate_type_id: &SmolStr,
        aggregate_id: Uuid,
        sequence: i64,
        event: &E,
        metadata: Value,
    ) -> Result<Self, CQRSError> {
        let payload = Self::payload_of(aggregate_type, aggregate_id, event)?;
        Ok(Self::stored(
            aggregate_type,
            aggregate_type_id,
            aggregate_id,
            sequence,
            event,
            payload,
            metadata,
            (None, None),
        ))
    }

    /// [`for_aggregate`](Self::for_aggregate) with the correlation and causation ids, pushed
    /// onto `batch`: the event is built where it is stored, not moved there.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push_for_aggregate<E: DomainEvent>(
        batch: &mut Vec<Self>,
        aggregate_type: &SmolStr,
        aggregate_type_id: &SmolStr,
        aggregate_id: Uuid,
        sequence: i64,
        event: &E,
        metadata: Value,
        correlation_and_causation: (Option<Uuid>, Option<Uuid>),
    ) -> Result<(), CQRSError> {
        let payload = Self::payload_of(aggregate_type, aggregate_id, event)?;
        batch.push(Self::stored(
            aggregate_type,
            aggregate_type_id,
            aggregate_id,
            sequence,
            event,
            payload,
            metadata,
            correlation_and_causation,
        ));
        Ok(())
    }

    /// The payload of `event`, or the serialization error naming it.
    fn payload_of<E: DomainEvent>(
        aggregate_type: &SmolStr,
        aggregate_id: Uuid,
        event: &E,
    ) -> Result<Payload, CQRSError> {
        event
            .to_payload()
            .map_err(|source| CQRSError::Serialization {
                what: format!(
                    "event {} of {aggregate_type} {aggregate_id}",
                    event.persisted_event_name()
                ),
                source,
            })
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn stored<E: DomainEvent>(
        aggregate_type: &SmolStr,
        aggregate_type_id: &SmolStr,
        aggregate_id: Uuid,
        sequence: i64,
        event: &E,
        payload: Payload,
        metadata: Value,
        (correlation_id, causation_id): (Option<Uuid>, Option<Uuid>),
    ) -> Self {
        let (event_id, timestamp) = stamp();
        PersistableDomainEvent {
            event_id,
            aggregate_type_id: aggregate_type_id.clone(),
            aggregate_id,
            aggregate_type: aggregate_type.clone(),
            sequence,
            position: 0,
            event_type: SmolStr::new_static(event.persisted_event_name()),
            event_version: SmolStr::new_static(event.persisted_event_version()),
            payload,
            metadata,
            timestamp,
            correlation_id,
            causation_id,
        }
    }

    /// Decodes the payload into every event it stands for today (see
    /// [`DomainEvent::decode_all`]), each wrapped in this row's envelope. Use it where a
    /// history is folded or projected, so an old event that an upcast step split or dropped is
    /// applied as what it became.
    ///
    /// # Errors
    /// [`CQRSError::EventDecode`] naming the aggregate, sequence, event type and version.
    pub fn decode_all<E: DomainEvent>(&self) -> Result<Vec<EventEnvelope<E>>, CQRSError> {
        Ok(E::try_all_from_persisted(self)?
            .into_iter()
            .map(|event| EventEnvelope {
                event_id: self.event_id,
                aggregate_type: self.aggregate_type.clone(),
                aggregate_id: self.aggregate_id,
                sequence: self.sequence,
                position: self.position,
                event,
                metadata: self.metadata.clone(),
                timestamp: self.timestamp,
                correlation_id: self.correlation_id,
                causation_id: self.causation_id,
            })
            .collect())
    }

    /// Decodes the payload into `E` and wraps it with this event's envelope.
    ///
    /// # Errors
    /// [`CQRSError::EventDecode`] naming the aggregate, sequence, event type and version.
    pub fn decode<E: DomainEvent>(&self) -> Result<EventEnvelope<E>, CQRSError> {
        Ok(EventEnvelope {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            position: self.position,
            event: E::try_from_persisted(self)?,
            metadata: self.metadata.clone(),
            timestamp: self.timestamp,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
        })
    }
}

/// A decoded domain event with the envelope it was stored in: what views see.
#[derive(Debug, Clone, PartialEq)]
pub struct EventEnvelope<E> {
    /// The event's unique id.
    pub event_id: Uuid,
    /// The aggregate's type.
    pub aggregate_type: SmolStr,
    /// The aggregate instance's id.
    pub aggregate_id: Uuid,
    /// Position within the aggregate's history (1-based).
    pub sequence: i64,
    /// Global position in the store (1-based).
    pub position: i64,
    /// The domain event.
    pub event: E,
    /// The metadata stored with the event.
    pub metadata: Value,
    /// When the event was created.
    pub timestamp: DateTime<Utc>,
    /// The workflow the event belongs to (see [`PersistableDomainEvent::correlation_id`]).
    pub correlation_id: Option<Uuid>,
    /// The command that caused the event (see [`PersistableDomainEvent::causation_id`]).
    pub causation_id: Option<Uuid>,
}

/// The names of the last stored row decoded, handed out again while the next rows repeat
/// them: the events of one command come together, and a store's rows mostly name a few
/// event types, so most rows then build no name of their own (the `aggregate_type_id` of a
/// long aggregate name is an allocation; here it is a shared one).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[derive(Debug, Default)]
pub(crate) struct RowNames {
    aggregate_type: SmolStr,
    aggregate_id: Uuid,
    aggregate_type_id: SmolStr,
    event_type: SmolStr,
    event_version: SmolStr,
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl RowNames {
    #[cfg(feature = "postgres")]
    fn reuse(slot: &mut SmolStr, text: &str) -> SmolStr {
        if slot.as_str() != text {
            *slot = SmolStr::new(text);
        }
        slot.clone()
    }

    /// `(aggregate_type, aggregate_type_id)` of a row.
    pub(crate) fn aggregate(
        &mut self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> (SmolStr, SmolStr) {
        if self.aggregate_id != aggregate_id
            || self.aggregate_type.as_str() != aggregate_type
            || self.aggregate_type_id.is_empty()
        {
            self.aggregate_type = SmolStr::new(aggregate_type);
            self.aggregate_id = aggregate_id;
            self.aggregate_type_id =
                PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id);
        }
        (self.aggregate_type.clone(), self.aggregate_type_id.clone())
    }

    #[cfg(feature = "sqlite")]
    fn reuse_bytes(slot: &mut SmolStr, bytes: &[u8]) -> Result<SmolStr, std::str::Utf8Error> {
        if slot.as_bytes() != bytes {
            *slot = SmolStr::new(std::str::from_utf8(bytes)?);
        }
        Ok(slot.clone())
    }

    /// A row's aggregate type from the column's bytes: the last row's when they are the
    /// same (then already known to be UTF-8), otherwise checked. [`aggregate`](Self::aggregate)
    /// keeps it for the next row.
    #[cfg(feature = "sqlite")]
    pub(crate) fn aggregate_type_from_bytes(
        &self,
        bytes: &[u8],
    ) -> Result<SmolStr, std::str::Utf8Error> {
        if self.aggregate_type.as_bytes() == bytes {
            return Ok(self.aggregate_type.clone());
        }
        std::str::from_utf8(bytes).map(SmolStr::new)
    }

    /// A row's event type from the column's bytes, checked to be UTF-8 only when they are
    /// not the last row's.
    #[cfg(feature = "sqlite")]
    pub(crate) fn event_type_from_bytes(
        &mut self,
        bytes: &[u8],
    ) -> Result<SmolStr, std::str::Utf8Error> {
        Self::reuse_bytes(&mut self.event_type, bytes)
    }

    /// A row's event version from the column's bytes, like
    /// [`event_type_from_bytes`](Self::event_type_from_bytes).
    #[cfg(feature = "sqlite")]
    pub(crate) fn event_version_from_bytes(
        &mut self,
        bytes: &[u8],
    ) -> Result<SmolStr, std::str::Utf8Error> {
        Self::reuse_bytes(&mut self.event_version, bytes)
    }

    /// A row's event type.
    #[cfg(feature = "postgres")]
    pub(crate) fn event_type(&mut self, text: &str) -> SmolStr {
        Self::reuse(&mut self.event_type, text)
    }

    /// A row's event version.
    #[cfg(feature = "postgres")]
    pub(crate) fn event_version(&mut self, text: &str) -> SmolStr {
        Self::reuse(&mut self.event_version, text)
    }
}

#[cfg(all(test, any(feature = "sqlite", feature = "postgres")))]
mod row_names_tests {
    use super::*;

    #[test]
    fn row_names_follow_every_change_of_name() {
        let mut names = RowNames::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let first = names.aggregate("account", a);
        assert_eq!(first.1, PersistableDomainEvent::type_id_for("account", a));
        assert_eq!(names.aggregate("account", a), first);
        assert_eq!(
            names.aggregate("account", b).1,
            PersistableDomainEvent::type_id_for("account", b)
        );
        let other = names.aggregate("ledger", b);
        assert_eq!(other.0, "ledger");
        assert_eq!(other.1, PersistableDomainEvent::type_id_for("ledger", b));
        // The nil id is the starting state: the first row with it still gets its key.
        let nil = RowNames::default().aggregate("", Uuid::nil());
        assert_eq!(nil.1, PersistableDomainEvent::type_id_for("", Uuid::nil()));
        #[cfg(feature = "postgres")]
        {
            assert_eq!(names.event_type("Opened"), "Opened");
            assert_eq!(names.event_type("Opened"), "Opened");
            assert_eq!(names.event_type("Deposited"), "Deposited");
            assert_eq!(names.event_version("1"), "1");
            assert_eq!(names.event_version("2"), "2");
        }
        #[cfg(feature = "sqlite")]
        {
            assert_eq!(names.event_type_from_bytes(b"Opened"), Ok("Opened".into()));
            assert_eq!(names.event_type_from_bytes(b"Opened"), Ok("Opened".into()));
            assert_eq!(
                names.event_type_from_bytes(b"Deposited"),
                Ok("Deposited".into())
            );
            assert_eq!(names.event_version_from_bytes(b"2"), Ok("2".into()));
            assert!(names.event_type_from_bytes(b"\xff").is_err());
        }
    }
}

// Beside the event it is made from: `error` imports nothing above it.
impl ViewHandlerError {
    /// The error for `view` refusing `stored` with `message`, as a [`CQRSError`].
    ///
    /// ```
    /// # let stored = cqrs::PersistableDomainEvent {
    /// #     event_id: uuid::Uuid::nil(), aggregate_type_id: "a:00000000-0000-0000-0000-000000000000".into(),
    /// #     aggregate_id: uuid::Uuid::nil(), aggregate_type: "a".into(), sequence: 3, position: 9,
    /// #     event_type: "Deposited".into(), event_version: "1".into(), payload: serde_json::Value::Null.into(),
    /// #     metadata: serde_json::Value::Null, timestamp: chrono::Utc::now(),
    /// #     correlation_id: None, causation_id: None,
    /// # };
    /// let err = cqrs::ViewHandlerError::for_event("balance", &stored, "negative balance");
    /// assert!(err.to_string().contains("sequence 3, position 9"));
    /// ```
    pub fn for_event(
        view: &str,
        stored: &PersistableDomainEvent,
        message: impl std::fmt::Display,
    ) -> CQRSError {
        CQRSError::ViewHandler(Box::new(ViewHandlerError {
            view: view.to_owned(),
            aggregate_type: stored.aggregate_type.to_string(),
            aggregate_id: stored.aggregate_id,
            sequence: stored.sequence,
            position: stored.position,
            event_type: stored.event_type.to_string(),
            event_version: stored.event_version.to_string(),
            message: message.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::CounterEvent;

    #[test]
    fn new_events_get_v7_ids_of_their_own_timestamp_in_growing_order() {
        let aggregate = Uuid::new_v4();
        let events: Vec<PersistableDomainEvent> = (1..=200)
            .map(|sequence| {
                PersistableDomainEvent::new(
                    "counter",
                    aggregate,
                    sequence,
                    &CounterEvent::Incremented { by: 1 },
                    Value::Null,
                )
            })
            .collect::<Result<_, _>>()
            .unwrap();
        for event in &events {
            assert_eq!(event.event_id.get_version_num(), 7, "{}", event.event_id);
            let (seconds, nanos) = event.event_id.get_timestamp().unwrap().to_unix();
            let id_millis = seconds * 1000 + u64::from(nanos / 1_000_000);
            assert_eq!(
                i64::try_from(id_millis).unwrap(),
                event.timestamp.timestamp_millis(),
                "the id carries the event's own millisecond"
            );
        }
        for pair in events.windows(2) {
            // Within one millisecond the rest is random; across them, ids grow.
            let millis = |id: Uuid| id.as_u128() >> 80;
            assert!(millis(pair[0].event_id) <= millis(pair[1].event_id));
        }
        let distinct: std::collections::HashSet<Uuid> =
            events.iter().map(|event| event.event_id).collect();
        assert_eq!(distinct.len(), events.len());
    }
}
