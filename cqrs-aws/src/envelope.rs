//! The event envelope: a stored event as the JSON body of an SQS message or an SNS
//! notification, and back.
//!
//! The body is the JSON object of [`PersistableDomainEvent`] (the same body the NATS relay
//! of `cqrs` publishes), with the payload and the metadata embedded as JSON values:
//!
//! ```json
//! {
//!   "event_id": "5f0c…",
//!   "aggregate_type_id": "account:0d6e…",
//!   "aggregate_id": "0d6e…",
//!   "aggregate_type": "account",
//!   "sequence": 3,
//!   "position": 42,
//!   "event_type": "Deposited",
//!   "event_version": "1",
//!   "payload": {"amount": 10},
//!   "metadata": null,
//!   "timestamp": "2026-12-03T07:00:00.123456Z",
//!   "correlation_id": "9b1e…",
//!   "causation_id": "c47a…"
//! }
//! ```
//!
//! `correlation_id` and `causation_id` are there only when the event has them; an envelope
//! without them decodes with `None`.
//!
//! A publisher sends it with `MessageGroupId` = the aggregate's `aggregate_type_id` (order per
//! aggregate in a FIFO queue or topic) and `MessageDeduplicationId` = the event id.
//!
//! A row the store cannot read as an event ([`CQRSError::DamagedRow`]: an item an attribute
//! of which is missing or of the wrong type, or whose payload is not JSON) has a damaged
//! form of its own, [`encode_damaged_row`]: `{"damaged_row": {..}}` with what could be read
//! of it (the body the NATS relay of `cqrs` publishes for one). [`decode`] answers it with
//! that [`CQRSError::DamagedRow`], which a consumer hands to its projection as a poison event
//! of its aggregate ([`cqrs::PerAggregateProjection::apply_damaged`]).
//! [`decode`] also accepts the notification SNS delivers to an SQS subscription without raw
//! message delivery (`{"Type": "Notification", "Message": "<the envelope>", ..}`).
//!
//! ```
//! # use cqrs::doc::CounterEvent;
//! # fn run() -> Result<(), cqrs::CQRSError> {
//! let id = uuid::Uuid::new_v4();
//! let added = CounterEvent::Incremented { by: 2 };
//! let event = cqrs::PersistableDomainEvent::new("counter", id, 1, &added, serde_json::Value::Null)?;
//! let body = cqrs_aws::envelope::encode(&event)?;
//! assert_eq!(cqrs_aws::envelope::decode(&body)?, event);
//!
//! let notification = serde_json::json!({"Type": "Notification", "Message": body}).to_string();
//! assert_eq!(cqrs_aws::envelope::decode(&notification)?, event);
//! # Ok(())
//! # }
//! # run().unwrap();
//! ```

use cqrs::{CQRSError, DamagedRow, PersistableDomainEvent};
use serde::{Deserialize, Serialize};

/// The notification SNS delivers to an SQS subscription (without raw message delivery): the
/// published body is its `Message`.
#[derive(Deserialize)]
struct SnsNotification {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Message")]
    message: String,
}

/// The damaged form: a row the store could not read as an event.
#[derive(Serialize, Deserialize)]
struct DamagedRowBody {
    damaged_row: DamagedRow,
}

/// The damaged form of a row the store could not read as an event:
/// `{"damaged_row": {"position": .., "aggregate_type": .., "aggregate_id": .., "sequence": ..,
/// "problem": ..}}`, with `null` for what could not be read.
///
/// ```
/// let damage = cqrs::DamagedRow {
///     position: 7,
///     event_id: None,
///     aggregate_type: Some("counter".into()),
///     aggregate_id: Some(uuid::Uuid::nil()),
///     sequence: Some(2),
///     event_type: None,
///     event_version: None,
///     problem: "attribute `event_type` is missing".into(),
/// };
/// let body = cqrs_aws::envelope::encode_damaged_row(&damage)?;
/// match cqrs_aws::envelope::decode(&body) {
///     Err(cqrs::CQRSError::DamagedRow(back)) => assert_eq!(*back, damage),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), cqrs::CQRSError>(())
/// ```
///
/// # Errors
/// [`CQRSError::Serialization`] (not expected: the body is strings and numbers).
pub fn encode_damaged_row(damage: &DamagedRow) -> Result<String, CQRSError> {
    serde_json::to_string(&DamagedRowBody {
        damaged_row: damage.clone(),
    })
    .map_err(|source| CQRSError::Serialization {
        what: format!("the damaged row at position {}", damage.position),
        source,
    })
}

/// The envelope of `event`: its JSON body.
///
/// # Errors
/// [`CQRSError::Serialization`] when the event does not serialize (a payload that is not
/// JSON, read from a damaged item).
pub fn encode(event: &PersistableDomainEvent) -> Result<String, CQRSError> {
    serde_json::to_string(event).map_err(|source| CQRSError::Serialization {
        what: format!(
            "the envelope of event {} of {} {} (sequence {})",
            event.event_id, event.aggregate_type, event.aggregate_id, event.sequence
        ),
        source,
    })
}

/// The event in an envelope body, or in an SNS notification that carries one.
///
/// # Errors
/// [`CQRSError::DamagedRow`] for the damaged form ([`encode_damaged_row`]);
/// [`CQRSError::Deserialization`] when the body is neither (not JSON, a field missing or of
/// the wrong type, a payload that is not JSON).
pub fn decode(body: &str) -> Result<PersistableDomainEvent, CQRSError> {
    let source = match serde_json::from_str(body) {
        Ok(event) => return Ok(event),
        Err(source) => source,
    };
    // The rarer forms, tried once the common one failed.
    if let Ok(damaged) = serde_json::from_str::<DamagedRowBody>(body) {
        return Err(CQRSError::from(damaged.damaged_row));
    }
    if let Ok(notification) = serde_json::from_str::<SnsNotification>(body) {
        if notification.kind == "Notification" {
            if let Ok(damaged) = serde_json::from_str::<DamagedRowBody>(&notification.message) {
                return Err(CQRSError::from(damaged.damaged_row));
            }
            return serde_json::from_str(&notification.message).map_err(|source| {
                CQRSError::Deserialization {
                    what: "the event envelope in an SNS notification".to_owned(),
                    source,
                }
            });
        }
    }
    Err(CQRSError::Deserialization {
        what: "an event envelope".to_owned(),
        source,
    })
}
