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

use cqrs::{CQRSError, PersistableDomainEvent};
use serde::Deserialize;

/// The notification SNS delivers to an SQS subscription (without raw message delivery): the
/// published body is its `Message`.
#[derive(Deserialize)]
struct SnsNotification {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Message")]
    message: String,
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
/// [`CQRSError::Deserialization`] when the body is neither (not JSON, a field missing or of
/// the wrong type, a payload that is not JSON).
pub fn decode(body: &str) -> Result<PersistableDomainEvent, CQRSError> {
    let source = match serde_json::from_str(body) {
        Ok(event) => return Ok(event),
        Err(source) => source,
    };
    if let Ok(notification) = serde_json::from_str::<SnsNotification>(body) {
        if notification.kind == "Notification" {
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
