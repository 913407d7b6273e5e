//! Domain events and their stored form.

use std::fmt::Debug;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{CQRSError, DecodeError, EventDecodeError};

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
    fn to_payload(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }

    /// Decodes a payload stored under `event_type` and `event_version`.
    ///
    /// The default deserializes the serde form and then checks that the value's own name and
    /// version are the stored ones, so a payload stored under the wrong name is refused.
    ///
    /// # Errors
    /// [`DecodeError::MalformedPayload`] when the payload does not deserialize,
    /// [`DecodeError::UnknownEventType`] when the name or version is not this type's.
    fn decode(event_type: &str, event_version: &str, payload: &Value) -> Result<Self, DecodeError> {
        let event = Self::deserialize(payload).map_err(DecodeError::MalformedPayload)?;
        if event.persisted_event_name() != event_type
            || event.persisted_event_version() != event_version
        {
            return Err(DecodeError::UnknownEventType);
        }
        Ok(event)
    }

    /// Turns a stored event back into a domain event.
    ///
    /// # Errors
    /// [`CQRSError::EventDecode`] naming the aggregate, sequence, event type and version.
    fn try_from_persisted(event: &PersistableDomainEvent) -> Result<Self, CQRSError> {
        Self::decode(&event.event_type, &event.event_version, &event.payload).map_err(|kind| {
            CQRSError::from(EventDecodeError {
                aggregate_type: event.aggregate_type.clone(),
                aggregate_id: event.aggregate_id,
                sequence: event.sequence,
                event_type: event.event_type.clone(),
                event_version: event.event_version.clone(),
                kind,
            })
        })
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
    /// is recognised and not stored twice.
    pub event_id: Uuid,
    /// `"{aggregate_type}:{aggregate_id}"`: one key naming the aggregate instance.
    pub aggregate_type_id: String,
    /// The aggregate instance's id.
    pub aggregate_id: Uuid,
    /// The aggregate's type (`Aggregate::NAME`).
    pub aggregate_type: String,
    /// 1-based position of this event within its aggregate's history.
    pub sequence: i64,
    /// Global position in commit order across all aggregates, assigned by the store
    /// (1-based; 0 until stored).
    pub position: i64,
    /// The stored event name (`DomainEvent::persisted_event_name`).
    pub event_type: String,
    /// The stored event version (`DomainEvent::persisted_event_version`).
    pub event_version: String,
    /// The event's JSON payload.
    pub payload: Value,
    /// JSON metadata given to `dispatch_with_metadata` (`null` for `dispatch`).
    pub metadata: Value,
    /// When the event was created.
    pub timestamp: DateTime<Utc>,
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
    pub fn type_id_for(aggregate_type: &str, aggregate_id: Uuid) -> String {
        format!("{aggregate_type}:{aggregate_id}")
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
        let payload = event
            .to_payload()
            .map_err(|source| CQRSError::Serialization {
                what: format!(
                    "event {} of {aggregate_type} {aggregate_id}",
                    event.persisted_event_name()
                ),
                source,
            })?;
        Ok(PersistableDomainEvent {
            event_id: Uuid::new_v4(),
            aggregate_type_id: Self::type_id_for(aggregate_type, aggregate_id),
            aggregate_id,
            aggregate_type: aggregate_type.to_owned(),
            sequence,
            position: 0,
            event_type: event.persisted_event_name().to_owned(),
            event_version: event.persisted_event_version().to_owned(),
            payload,
            metadata,
            timestamp: Utc::now(),
        })
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
        })
    }
}

/// A decoded domain event with the envelope it was stored in: what views see.
#[derive(Debug, Clone, PartialEq)]
pub struct EventEnvelope<E> {
    /// The event's unique id.
    pub event_id: Uuid,
    /// The aggregate's type.
    pub aggregate_type: String,
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
}
