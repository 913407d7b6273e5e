//! The wire format: a stored event as a JetStream message body and headers, and back.

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use uuid::Uuid;

use crate::error::{CQRSError, DamagedRow};
use crate::event::PersistableDomainEvent;

use super::config::subject_token;
use super::NatsStreamConfig;

/// Header naming the event's aggregate type.
pub(super) const HEADER_AGGREGATE_TYPE: &str = "Cqrs-Aggregate-Type";
/// Header naming the event's aggregate id.
pub(super) const HEADER_AGGREGATE_ID: &str = "Cqrs-Aggregate-Id";
/// Header carrying the event's sequence within its aggregate.
pub(super) const HEADER_SEQUENCE: &str = "Cqrs-Sequence";
/// Header carrying the event's global position in the store.
pub(super) const HEADER_POSITION: &str = "Cqrs-Position";
/// Header carrying the stored event name.
pub(super) const HEADER_EVENT_TYPE: &str = "Cqrs-Event-Type";
/// Header carrying the stored event version.
pub(super) const HEADER_EVENT_VERSION: &str = "Cqrs-Event-Version";
/// Header carrying the event's correlation id, present when it has one.
pub(super) const HEADER_CORRELATION_ID: &str = "Cqrs-Correlation-Id";
/// Header carrying the event's causation id (the command), present when it has one.
pub(super) const HEADER_CAUSATION_ID: &str = "Cqrs-Causation-Id";

/// The body of an event whose stored payload is not JSON (a damaged row, see
/// [`Payload`](crate::Payload)): the event's fields with the payload as a JSON string of the
/// stored text, `payload_text`, in place of `payload`. [`decode_message`] turns it back into
/// the event as stored, which then fails to decode like the store's own row.
#[derive(Serialize, Deserialize)]
struct DamagedPayloadBody {
    event_id: Uuid,
    aggregate_type_id: SmolStr,
    aggregate_id: Uuid,
    aggregate_type: SmolStr,
    sequence: i64,
    position: i64,
    event_type: SmolStr,
    event_version: SmolStr,
    payload_text: String,
    metadata: serde_json::Value,
    timestamp: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    causation_id: Option<Uuid>,
}

/// The body of a message that stands for a row the store could not read as an event
/// ([`CQRSError::DamagedRow`]): `{"damaged_row": {..}}`.
#[derive(Serialize, Deserialize)]
struct DamagedRowBody {
    damaged_row: DamagedRow,
}

/// The JSON body and the headers of the message that carries `event`.
///
/// # Errors
/// [`CQRSError::Serialization`] when the event does not serialize.
pub(super) fn encode(event: &PersistableDomainEvent) -> Result<(Vec<u8>, HeaderMap), CQRSError> {
    let serialization = |source| CQRSError::Serialization {
        what: format!(
            "event {} of {} {} for NATS",
            event.event_type, event.aggregate_type, event.aggregate_id
        ),
        source,
    };
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        // A payload stored as text that is not JSON: published as stored, so the consumer
        // meets the same poison event as a reader of the store.
        Err(_) if !event.payload.is_valid_json() => serde_json::to_vec(&DamagedPayloadBody {
            event_id: event.event_id,
            aggregate_type_id: event.aggregate_type_id.clone(),
            aggregate_id: event.aggregate_id,
            aggregate_type: event.aggregate_type.clone(),
            sequence: event.sequence,
            position: event.position,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            payload_text: event.payload.as_str().to_owned(),
            metadata: event.metadata.clone(),
            timestamp: event.timestamp,
            correlation_id: event.correlation_id,
            causation_id: event.causation_id,
        })
        .map_err(serialization)?,
        Err(source) => return Err(serialization(source)),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        event.event_id.to_string(),
    );
    headers.insert(HEADER_AGGREGATE_TYPE, event.aggregate_type.as_str());
    headers.insert(HEADER_AGGREGATE_ID, event.aggregate_id.to_string());
    headers.insert(HEADER_SEQUENCE, event.sequence.to_string());
    headers.insert(HEADER_POSITION, event.position.to_string());
    headers.insert(HEADER_EVENT_TYPE, event.event_type.as_str());
    headers.insert(HEADER_EVENT_VERSION, event.event_version.as_str());
    if let Some(correlation_id) = event.correlation_id {
        headers.insert(HEADER_CORRELATION_ID, correlation_id.to_string());
    }
    if let Some(causation_id) = event.causation_id {
        headers.insert(HEADER_CAUSATION_ID, causation_id.to_string());
    }
    Ok((body, headers))
}

/// The message that stands for a row the store could not read as an event: its subject,
/// body and headers. The headers name what could be read of the row, always its position;
/// the message id is the event id when it could be read.
///
/// # Errors
/// [`CQRSError::Serialization`] (not expected: the body is plain strings and numbers).
pub(super) fn encode_damaged_row(
    stream: &NatsStreamConfig,
    damage: &DamagedRow,
) -> Result<(String, Vec<u8>, HeaderMap), CQRSError> {
    let body = serde_json::to_vec(&DamagedRowBody {
        damaged_row: damage.clone(),
    })
    .map_err(|source| CQRSError::Serialization {
        what: format!("damaged row at position {} for NATS", damage.position),
        source,
    })?;
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        damaged_row_message_id(damage),
    );
    if let Some(aggregate_type) = &damage.aggregate_type {
        headers.insert(HEADER_AGGREGATE_TYPE, aggregate_type.as_str());
    }
    if let Some(aggregate_id) = damage.aggregate_id {
        headers.insert(HEADER_AGGREGATE_ID, aggregate_id.to_string());
    }
    if let Some(sequence) = damage.sequence {
        headers.insert(HEADER_SEQUENCE, sequence.to_string());
    }
    headers.insert(HEADER_POSITION, damage.position.to_string());
    if let Some(event_type) = &damage.event_type {
        headers.insert(HEADER_EVENT_TYPE, event_type.as_str());
    }
    if let Some(event_version) = &damage.event_version {
        headers.insert(HEADER_EVENT_VERSION, event_version.as_str());
    }
    let subject = format!(
        "{}.{}.{}",
        stream.subject_prefix(),
        subject_token(damage.aggregate_type.as_deref().unwrap_or_default()),
        subject_token(damage.event_type.as_deref().unwrap_or_default())
    );
    Ok((subject, body, headers))
}

/// The global position a message's [`HEADER_POSITION`] header carries, when it has a
/// readable one (every message a relay publishes has).
pub(super) fn position_header(headers: &HeaderMap) -> Option<i64> {
    headers
        .get(HEADER_POSITION)
        .and_then(|value| value.as_str().parse().ok())
}

/// The `Nats-Msg-Id` of a damaged row's message: its event id when that could be read.
pub(super) fn damaged_row_message_id(damage: &DamagedRow) -> String {
    match damage.event_id {
        Some(event_id) => event_id.to_string(),
        None => format!("cqrs-damaged-row-{}", damage.position),
    }
}

/// Decodes the body of a message published by the relay (see
/// [`NatsRelay::decode_message`](super::NatsRelay::decode_message)).
///
/// An event whose stored payload is not JSON comes back with that text as its payload
/// ([`Payload::from_stored_unchecked`](crate::Payload::from_stored_unchecked)), so decoding
/// it fails as it does from the store.
///
/// # Errors
/// [`CQRSError::DamagedRow`] for the message of a row the store could not read as an event;
/// [`CQRSError::Deserialization`] naming the subject and stream sequence when the body is not
/// a [`PersistableDomainEvent`].
pub(super) fn decode_message(
    subject: &str,
    stream_sequence: u64,
    body: &[u8],
) -> Result<PersistableDomainEvent, CQRSError> {
    let source = match serde_json::from_slice(body) {
        Ok(event) => return Ok(event),
        Err(source) => source,
    };
    // The bodies of damaged rows; rare, so only tried once the common form failed.
    if let Ok(damaged) = serde_json::from_slice::<DamagedPayloadBody>(body) {
        return Ok(PersistableDomainEvent {
            event_id: damaged.event_id,
            aggregate_type_id: damaged.aggregate_type_id,
            aggregate_id: damaged.aggregate_id,
            aggregate_type: damaged.aggregate_type,
            sequence: damaged.sequence,
            position: damaged.position,
            event_type: damaged.event_type,
            event_version: damaged.event_version,
            payload: crate::Payload::from_stored_unchecked(&damaged.payload_text),
            metadata: damaged.metadata,
            timestamp: damaged.timestamp,
            correlation_id: damaged.correlation_id,
            causation_id: damaged.causation_id,
        });
    }
    if let Ok(damaged) = serde_json::from_slice::<DamagedRowBody>(body) {
        return Err(CQRSError::from(damaged.damaged_row));
    }
    Err(CQRSError::Deserialization {
        what: format!("NATS message {stream_sequence} on {subject}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(event_type: &str) -> PersistableDomainEvent {
        PersistableDomainEvent {
            event_id: Uuid::new_v4(),
            aggregate_type_id: "account:00000000-0000-0000-0000-000000000000".into(),
            aggregate_id: Uuid::nil(),
            aggregate_type: "account".into(),
            sequence: 3,
            position: 42,
            event_type: event_type.into(),
            event_version: "2".into(),
            payload: serde_json::json!({ "amount": 5 }).into(),
            metadata: serde_json::Value::Null,
            timestamp: chrono::Utc::now(),
            correlation_id: None,
            causation_id: None,
        }
    }

    #[test]
    fn subjects_name_the_aggregate_type_and_event_and_never_a_wildcard() {
        let config = NatsStreamConfig::new("EVENTS", "events");
        assert_eq!(
            config.subject_for(&stored("Deposited")),
            "events.account.Deposited"
        );
        assert_eq!(
            config.subject_for(&stored("bank.deposited")),
            "events.account.bank.deposited"
        );
        assert_eq!(
            config.subject_for(&stored("Odd name>*")),
            "events.account.Odd_name__"
        );
        assert_eq!(config.subject_for(&stored("")), "events.account._");
    }

    #[test]
    fn the_body_is_the_stored_event_and_the_headers_repeat_its_identity() {
        let event = stored("Deposited");
        let (body, headers) = encode(&event).unwrap();
        assert_eq!(decode_message("s", 1, &body).unwrap(), event);
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned()),
            Some(event.event_id.to_string())
        );
        assert_eq!(header(HEADER_AGGREGATE_TYPE).as_deref(), Some("account"));
        assert_eq!(header(HEADER_AGGREGATE_ID), Some(Uuid::nil().to_string()));
        assert_eq!(header(HEADER_SEQUENCE).as_deref(), Some("3"));
        assert_eq!(header(HEADER_POSITION).as_deref(), Some("42"));
        assert_eq!(header(HEADER_EVENT_TYPE).as_deref(), Some("Deposited"));
        assert_eq!(header(HEADER_EVENT_VERSION).as_deref(), Some("2"));
        assert_eq!(header(HEADER_CORRELATION_ID), None);
        assert_eq!(header(HEADER_CAUSATION_ID), None);
    }

    #[test]
    fn correlation_and_causation_travel_in_the_body_and_the_headers() {
        let mut event = stored("Deposited");
        let (correlation, command) = (Uuid::new_v4(), Uuid::new_v4());
        event.correlation_id = Some(correlation);
        event.causation_id = Some(command);
        let (body, headers) = encode(&event).unwrap();
        let back = decode_message("s", 1, &body).unwrap();
        assert_eq!(
            (back.correlation_id, back.causation_id),
            (Some(correlation), Some(command))
        );
        assert_eq!(back, event);
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(header(HEADER_CORRELATION_ID), Some(correlation.to_string()));
        assert_eq!(header(HEADER_CAUSATION_ID), Some(command.to_string()));

        // One without the other, and on the body of a payload that is not JSON.
        event.correlation_id = None;
        event.payload = crate::Payload::from_stored_unchecked("{\"amount\": oops");
        let (body, headers) = encode(&event).unwrap();
        assert_eq!(decode_message("s", 1, &body).unwrap(), event);
        assert_eq!(headers.get(HEADER_CORRELATION_ID), None);
        assert_eq!(
            headers
                .get(HEADER_CAUSATION_ID)
                .map(|v| v.as_str().to_owned()),
            Some(command.to_string())
        );
    }

    #[test]
    fn a_payload_stored_as_text_that_is_not_json_travels_as_stored() {
        let mut event = stored("Deposited");
        event.payload = crate::Payload::from_stored_unchecked("{\"amount\": oops");
        let (body, headers) = encode(&event).unwrap();
        let back = decode_message("s", 1, &body).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.payload.as_str(), "{\"amount\": oops");
        assert_eq!(
            headers.get(HEADER_POSITION).map(|v| v.as_str().to_owned()),
            Some("42".to_owned())
        );
    }

    #[test]
    fn a_damaged_row_travels_as_a_message_of_its_own() {
        let config = NatsStreamConfig::new("EVENTS", "events");
        let damage = DamagedRow {
            position: 9,
            event_id: None,
            aggregate_type: Some("account".into()),
            aggregate_id: Some(Uuid::nil()),
            sequence: Some(2),
            event_type: Some("Deposited".into()),
            event_version: Some("1".into()),
            problem: "metadata is not JSON".into(),
        };
        let (subject, body, headers) = encode_damaged_row(&config, &damage).unwrap();
        assert_eq!(subject, "events.account.Deposited");
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(header(HEADER_POSITION).as_deref(), Some("9"));
        assert_eq!(
            headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned())
                .as_deref(),
            Some("cqrs-damaged-row-9")
        );
        match decode_message(&subject, 3, &body) {
            Err(CQRSError::DamagedRow(back)) => assert_eq!(*back, damage),
            other => panic!("expected DamagedRow, got {other:?}"),
        }
    }

    #[test]
    fn a_body_that_is_not_an_event_is_a_typed_error_naming_the_message() {
        let error = decode_message("events.account.Deposited", 7, b"not json").unwrap_err();
        match error {
            CQRSError::Deserialization { what, .. } => {
                assert_eq!(what, "NATS message 7 on events.account.Deposited");
            }
            other => panic!("expected Deserialization, got {other:?}"),
        }
    }
}
