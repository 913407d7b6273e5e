//! The items the stores write, and reading them back without trusting the table.

use std::collections::HashMap;
use std::fmt;

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use cqrs::{CQRSError, DecodeError, EventDecodeError, Payload, PersistableDomainEvent};
use serde_json::Value;
use uuid::Uuid;

/// An item as the SDK returns it.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// The partition key attribute (a string).
pub(crate) const PK: &str = "pk";
/// The sort key attribute (a number).
pub(crate) const SK: &str = "sk";
/// What an item is: one of the `KIND_*` values (for Streams consumers and operators).
pub(crate) const KIND: &str = "kind";

pub(crate) const KIND_EVENT: &str = "event";
pub(crate) const KIND_POSITION: &str = "position";
pub(crate) const KIND_EVENT_ID: &str = "event_id";
pub(crate) const KIND_COUNTER: &str = "counter";
pub(crate) const KIND_SNAPSHOT: &str = "snapshot";

pub(crate) const EVENT_ID: &str = "event_id";
pub(crate) const AGGREGATE_TYPE: &str = "aggregate_type";
pub(crate) const AGGREGATE_ID: &str = "aggregate_id";
pub(crate) const SEQUENCE: &str = "sequence";
pub(crate) const POSITION: &str = "position";
pub(crate) const EVENT_TYPE: &str = "event_type";
pub(crate) const EVENT_VERSION: &str = "event_version";
pub(crate) const PAYLOAD: &str = "payload";
pub(crate) const METADATA: &str = "metadata";
pub(crate) const TIMESTAMP: &str = "timestamp";
/// The event's correlation id (a string), absent when it has none: items written before
/// events carried it have none, and read back with `None`.
pub(crate) const CORRELATION_ID: &str = "correlation_id";
/// The event's causation id (a string), absent when it has none (as [`CORRELATION_ID`]).
pub(crate) const CAUSATION_ID: &str = "causation_id";
pub(crate) const STATE: &str = "state";

/// The partition key of the global position counter (sort key 0).
pub(crate) const COUNTER_PK: &str = "$all";
/// How many positions one partition of the global order holds: position `p` is stored under
/// `$all#{(p - 1) / POSITIONS_PER_PARTITION}`.
pub(crate) const POSITIONS_PER_PARTITION: i64 = 100_000;

/// The partition key of the position copy of the event at `position`.
pub(crate) fn position_pk(position: i64) -> String {
    format!("{COUNTER_PK}#{}", position_partition(position))
}

/// The partition number of `position` (at least 1).
pub(crate) fn position_partition(position: i64) -> i64 {
    (position.max(1) - 1) / POSITIONS_PER_PARTITION
}

/// The partition key of the item that reserves an event id.
pub(crate) fn event_id_pk(event_id: Uuid) -> String {
    format!("$id#{}", event_id.hyphenated())
}

pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// The key of an item.
pub(crate) fn key(pk: impl Into<String>, sk: i64) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), n(sk))])
}

/// An item of the table that the store cannot read: an attribute is missing or of the
/// wrong type, or a value does not parse. It was written or edited outside the framework.
///
/// It reaches callers as the source of a [`CQRSError::PersistenceError`] when the item does
/// not identify an event well enough for an [`EventDecodeError`], and inside a
/// [`cqrs::DamagedRow`] when `read_all` meets it.
///
/// ```
/// let damage = cqrs_aws::DamagedItem {
///     table: "events".into(),
///     key: "account:42 / 3".into(),
///     problem: "attribute `sequence` is missing".into(),
/// };
/// assert!(damage.to_string().contains("account:42 / 3"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedItem {
    /// The table the item is in.
    pub table: String,
    /// The item's key, `pk / sk`.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for DamagedItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "damaged item {} in DynamoDB table {}: {}",
            self.key, self.table, self.problem
        )
    }
}

impl std::error::Error for DamagedItem {}

/// Typed access to an item's attributes: every miss is a message, never a panic.
pub(crate) struct Reader<'a>(pub(crate) &'a Item);

impl Reader<'_> {
    pub(crate) fn string(&self, name: &str) -> Result<&str, String> {
        match self.0.get(name) {
            Some(AttributeValue::S(value)) => Ok(value),
            Some(other) => Err(format!("attribute `{name}` is not a string: {other:?}")),
            None => Err(format!("attribute `{name}` is missing")),
        }
    }

    pub(crate) fn number(&self, name: &str) -> Result<i64, String> {
        match self.0.get(name) {
            Some(AttributeValue::N(value)) => value
                .parse()
                .map_err(|_| format!("attribute `{name}` is not a 64-bit integer: {value}")),
            Some(other) => Err(format!("attribute `{name}` is not a number: {other:?}")),
            None => Err(format!("attribute `{name}` is missing")),
        }
    }

    /// An optional UUID attribute: `None` when absent (or DynamoDB's `NULL`).
    pub(crate) fn optional_uuid(&self, name: &str) -> Result<Option<Uuid>, String> {
        match self.0.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(_) => self.uuid(name).map(Some),
        }
    }

    pub(crate) fn uuid(&self, name: &str) -> Result<Uuid, String> {
        let text = self.string(name)?;
        Uuid::parse_str(text)
            .map_err(|error| format!("attribute `{name}` {text:?} is not a UUID: {error}"))
    }

    /// The item's key as text, for messages; `?` for a part that cannot be read.
    pub(crate) fn key_text(&self) -> String {
        let pk = self.string(PK).unwrap_or("?");
        let sk = self
            .0
            .get(SK)
            .and_then(|v| v.as_n().ok())
            .map_or("?", String::as_str);
        format!("{pk} / {sk}")
    }
}

pub(crate) fn damaged(table: &str, item: &Item, problem: impl Into<String>) -> DamagedItem {
    DamagedItem {
        table: table.to_owned(),
        key: Reader(item).key_text(),
        problem: problem.into(),
    }
}

/// The attributes of a stored event (its stream item and its position copy hold the same).
/// The correlation and causation ids are attributes only when the event has them.
pub(crate) fn event_attributes(event: &PersistableDomainEvent, position: i64) -> Item {
    let metadata = event.metadata.to_string();
    let mut item = HashMap::from([
        (
            EVENT_ID.to_owned(),
            s(event.event_id.hyphenated().to_string()),
        ),
        (AGGREGATE_TYPE.to_owned(), s(event.aggregate_type.as_str())),
        (
            AGGREGATE_ID.to_owned(),
            s(event.aggregate_id.hyphenated().to_string()),
        ),
        (SEQUENCE.to_owned(), n(event.sequence)),
        (POSITION.to_owned(), n(position)),
        (EVENT_TYPE.to_owned(), s(event.event_type.as_str())),
        (EVENT_VERSION.to_owned(), s(event.event_version.as_str())),
        (PAYLOAD.to_owned(), s(event.payload.as_str())),
        (METADATA.to_owned(), s(metadata)),
        (TIMESTAMP.to_owned(), n(event.timestamp.timestamp_micros())),
    ]);
    for (name, id) in [
        (CORRELATION_ID, event.correlation_id),
        (CAUSATION_ID, event.causation_id),
    ] {
        if let Some(id) = id {
            item.insert(name.to_owned(), s(id.hyphenated().to_string()));
        }
    }
    item
}

/// How a payload that is not JSON is treated when an event item is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payloads {
    /// `load_events`: an [`EventDecodeError`] naming the event.
    Checked,
    /// `read_all`: returned as stored, a poison event where it is decoded.
    AsStored,
}

/// Reads an event item.
///
/// A payload (with [`Payloads::Checked`]) or metadata that is not JSON, a bad event id or
/// timestamp: an [`EventDecodeError`] naming the aggregate and sequence. An item whose
/// aggregate type, id, sequence or names cannot be read: a [`DamagedItem`] as a
/// [`CQRSError::PersistenceError`].
pub(crate) fn decode_event(
    table: &str,
    item: &Item,
    payloads: Payloads,
) -> Result<PersistableDomainEvent, CQRSError> {
    let r = Reader(item);
    let corrupt = |problem: String| CQRSError::persistence(damaged(table, item, problem));
    let position = r.number(POSITION).map_err(corrupt)?;
    let aggregate_type = r.string(AGGREGATE_TYPE).map_err(corrupt)?;
    let aggregate_id = r.uuid(AGGREGATE_ID).map_err(corrupt)?;
    let sequence = r.number(SEQUENCE).map_err(corrupt)?;
    let event_type = r.string(EVENT_TYPE).map_err(corrupt)?;
    let event_version = r.string(EVENT_VERSION).map_err(corrupt)?;
    let malformed = |problem: serde_json::Error| {
        CQRSError::from(EventDecodeError {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id,
            sequence,
            event_type: event_type.to_owned(),
            event_version: event_version.to_owned(),
            kind: DecodeError::MalformedPayload(problem),
        })
    };
    let invalid = |what: String| malformed(<serde_json::Error as serde::de::Error>::custom(what));

    let event_id = r.uuid(EVENT_ID).map_err(invalid)?;
    let payload = r.string(PAYLOAD).map_err(invalid)?;
    let payload = match payloads {
        Payloads::Checked => Payload::from_json(payload).map_err(malformed)?,
        Payloads::AsStored => Payload::from_stored_unchecked(payload),
    };
    let metadata: Value = serde_json::from_str(r.string(METADATA).map_err(invalid)?)
        .map_err(|error| invalid(format!("metadata is not JSON: {error}")))?;
    let micros = r.number(TIMESTAMP).map_err(invalid)?;
    let timestamp = DateTime::<Utc>::from_timestamp_micros(micros)
        .ok_or_else(|| invalid(format!("timestamp {micros} is out of range")))?;
    let correlation_id = r.optional_uuid(CORRELATION_ID).map_err(invalid)?;
    let causation_id = r.optional_uuid(CAUSATION_ID).map_err(invalid)?;
    Ok(PersistableDomainEvent {
        event_id,
        aggregate_type_id: PersistableDomainEvent::type_id_for(aggregate_type, aggregate_id),
        aggregate_id,
        aggregate_type: aggregate_type.into(),
        sequence,
        position,
        event_type: event_type.into(),
        event_version: event_version.into(),
        payload,
        metadata,
        timestamp,
        correlation_id,
        causation_id,
    })
}

/// What `read_all` can say about an item it cannot return: a [`cqrs::DamagedRow`] at
/// `position` with what could be read of its identity.
pub(crate) fn damaged_row(table: &str, item: &Item, position: i64, error: &CQRSError) -> CQRSError {
    let r = Reader(item);
    let problem = match error {
        CQRSError::PersistenceError(source) => source.to_string(),
        other => format!("{other} (in DynamoDB table {table}, item {})", r.key_text()),
    };
    CQRSError::from(cqrs::DamagedRow {
        position,
        event_id: r.uuid(EVENT_ID).ok(),
        aggregate_type: r.string(AGGREGATE_TYPE).ok().map(str::to_owned),
        aggregate_id: r.uuid(AGGREGATE_ID).ok(),
        sequence: r.number(SEQUENCE).ok(),
        event_type: r.string(EVENT_TYPE).ok().map(str::to_owned),
        event_version: r.string(EVENT_VERSION).ok().map(str::to_owned),
        problem,
    })
}

// ---------------------------------------------------------------------------------------
// The read side: view rows, checkpoints and dead letters (in a view table).

pub(crate) const KIND_VIEW: &str = "view";
pub(crate) const KIND_CHECKPOINT: &str = "checkpoint";
pub(crate) const KIND_DEAD_LETTER: &str = "dead_letter";

pub(crate) const VIEW_TABLE: &str = "view_table";
pub(crate) const VIEW_VERSION: &str = "view_version";
pub(crate) const VIEW_ID: &str = "view_id";
pub(crate) const ROW_VERSION: &str = "row_version";
pub(crate) const UPDATED_AT: &str = "updated_at";
/// The partition key of the list index: `{table}#{version}` (the table's name escaped).
pub(crate) const VIEW_LIST: &str = "view_list";
/// The sort key of the list index: `#{view_id}`, so that an empty id is a key too and the
/// index orders ids by their UTF-8 bytes.
pub(crate) const VIEW_ORDER: &str = "view_order";
/// The name of the list index of a view table.
pub(crate) const VIEW_LIST_INDEX: &str = "view_list";

pub(crate) const NAME: &str = "name";
pub(crate) const PROJECTION: &str = "projection";
pub(crate) const VIEW_NAME: &str = "view";
pub(crate) const ERROR: &str = "error";
pub(crate) const ATTEMPTS: &str = "attempts";
pub(crate) const RECORDED_AT: &str = "recorded_at";

/// `text` with `%`, `#` and `:` percent-encoded: a part of a store key that holds no `:`
/// (so it never meets an aggregate's key) and no `#` (so the parts of a key stay apart).
pub(crate) fn escape_key_part(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '%' => escaped.push_str("%25"),
            '#' => escaped.push_str("%23"),
            ':' => escaped.push_str("%3A"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The partition key of the rows of view `table` with id `view_id` (one item per view
/// version, the version as sort key).
pub(crate) fn view_pk(table: &str, view_id: &str) -> String {
    format!(
        "$view#{}#{}",
        escape_key_part(table),
        escape_key_part(view_id)
    )
}

/// The list index's partition of version `version` of view `table`.
pub(crate) fn view_list_key(table: &str, version: i64) -> String {
    format!("{}#{version}", escape_key_part(table))
}

/// The list index's sort key of `view_id`.
pub(crate) fn view_order_key(view_id: &str) -> String {
    format!("#{view_id}")
}

/// The partition key of the checkpoint `name` (sort key 0).
pub(crate) fn checkpoint_pk(name: &str) -> String {
    format!("$checkpoint#{}", escape_key_part(name))
}

/// The partition key of the dead letters of projection `name` (sort key: the position).
pub(crate) fn dead_letter_pk(projection: &str) -> String {
    format!("$dead#{}", escape_key_part(projection))
}
