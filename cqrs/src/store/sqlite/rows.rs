//! Turning stored rows back into values, with a typed error for every way a row can be bad.

use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use crate::error::{CQRSError, DamagedRow, DecodeError, EventDecodeError};
use crate::event::{PersistableDomainEvent, RowNames};
use crate::payload::Payload;
use smol_str::SmolStr;

/// The columns every event query selects, in the order [`decode_event`] reads them.
pub(super) const EVENT_COLUMNS: &str = "position, event_id, aggregate_type, aggregate_id, \
     sequence, event_type, event_version, payload, metadata, timestamp, correlation_id, \
     causation_id";

/// A stored row that does not identify an event well enough to name it in an
/// [`EventDecodeError`] (its aggregate id is not a UUID, a column has the wrong type).
///
/// It reaches callers as the source of a [`CQRSError::PersistenceError`]. The row was
/// written outside the framework; repair it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRow {
    /// The table the row is in.
    pub table: &'static str,
    /// The row's key: the global position for an event, the aggregate for a snapshot.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for CorruptRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "corrupt row {} in {}: {}",
            self.key, self.table, self.problem
        )
    }
}

impl std::error::Error for CorruptRow {}

fn corrupt(table: &'static str, key: impl fmt::Display, problem: impl fmt::Display) -> CQRSError {
    CQRSError::persistence(CorruptRow {
        table,
        key: key.to_string(),
        problem: problem.to_string(),
    })
}

/// Microseconds since the Unix epoch, the stored form of every timestamp.
pub(super) fn to_micros(timestamp: DateTime<Utc>) -> i64 {
    timestamp.timestamp_micros()
}

/// The inverse of [`to_micros`], `None` when out of chrono's range.
pub(super) fn from_micros(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// A stored event row, read column by column without copying: a row from sqlx or one from
/// the event reader's own connections (`reader.rs`). Errors are the driver's message.
pub(super) trait EventRow {
    /// An `INTEGER` column.
    fn integer(&self, index: usize) -> Result<i64, String>;
    /// A `TEXT` column.
    fn text(&self, index: usize) -> Result<&str, String>;
    /// A nullable `TEXT` column: `None` for `NULL`.
    fn optional_text(&self, index: usize) -> Result<Option<&str>, String>;

    /// A `TEXT` column's bytes, not checked to be UTF-8: for values parsed from ASCII (a
    /// UUID) or compared with a name already checked.
    fn text_bytes(&self, index: usize) -> Result<&[u8], String> {
        self.text(index).map(str::as_bytes)
    }

    /// A nullable `TEXT` column's bytes, like [`text_bytes`](Self::text_bytes).
    fn optional_text_bytes(&self, index: usize) -> Result<Option<&[u8]>, String> {
        self.optional_text(index)
            .map(|text| text.map(str::as_bytes))
    }
}

impl EventRow for SqliteRow {
    fn integer(&self, index: usize) -> Result<i64, String> {
        self.try_get(index).map_err(|error| error.to_string())
    }

    fn text(&self, index: usize) -> Result<&str, String> {
        self.try_get(index).map_err(|error| error.to_string())
    }

    fn optional_text(&self, index: usize) -> Result<Option<&str>, String> {
        self.try_get(index).map_err(|error| error.to_string())
    }
}

fn corrupt_at(position: i64) -> impl Fn(String) -> CQRSError {
    move |error| corrupt("cqrs_events", format_args!("at position {position}"), error)
}

/// What a reader does with a payload that is not JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Payloads {
    /// Refuse it with an [`EventDecodeError`] (`load_events`: loading an aggregate fails).
    Checked,
    /// Keep the text as stored ([`Payload::from_stored_unchecked`]): the event fails to
    /// decode where it is used, a poison event of one projection (`read_all`).
    AsStored,
}

/// Decodes one row selected with [`EVENT_COLUMNS`].
///
/// A payload (with [`Payloads::Checked`]) or metadata that is not JSON, a bad event id or
/// timestamp: an [`EventDecodeError`] naming the aggregate and sequence. A row whose
/// aggregate id or sequence cannot be read: a [`CorruptRow`] naming its position.
pub(super) fn decode_event(
    row: &impl EventRow,
    names: &mut RowNames,
    payloads: Payloads,
) -> Result<PersistableDomainEvent, CQRSError> {
    let position: i64 = row
        .integer(0)
        .map_err(|error| corrupt("cqrs_events", "with an unreadable position", error))?;
    let at = corrupt_at(position);
    let at_ref = &at;
    let not_utf8 = |index: usize| {
        move |error: std::str::Utf8Error| at_ref(format!("column {index} is not UTF-8: {error}"))
    };
    let aggregate_type = names
        .aggregate_type_from_bytes(row.text_bytes(2).map_err(&at)?)
        .map_err(not_utf8(2))?;
    let raw_aggregate_id = row.text_bytes(3).map_err(&at)?;
    let aggregate_id = Uuid::try_parse_ascii(raw_aggregate_id).map_err(|error| {
        corrupt(
            "cqrs_events",
            format_args!("at position {position}"),
            format_args!(
                "aggregate_id {:?} is not a UUID: {error}",
                String::from_utf8_lossy(raw_aggregate_id)
            ),
        )
    })?;
    let sequence = row.integer(4).map_err(&at)?;
    let event_type = names
        .event_type_from_bytes(row.text_bytes(5).map_err(&at)?)
        .map_err(not_utf8(5))?;
    let event_version = names
        .event_version_from_bytes(row.text_bytes(6).map_err(&at)?)
        .map_err(not_utf8(6))?;
    let malformed = |problem: serde_json::Error| {
        CQRSError::from(EventDecodeError {
            aggregate_type: aggregate_type.to_string(),
            aggregate_id,
            sequence,
            event_type: event_type.to_string(),
            event_version: event_version.to_string(),
            kind: DecodeError::MalformedPayload(problem),
        })
    };
    let invalid = |what: String| malformed(<serde_json::Error as serde::de::Error>::custom(what));
    let uuid = |raw: &[u8], column: &str| {
        Uuid::try_parse_ascii(raw).map_err(|error| {
            invalid(format!(
                "{column} {:?} is not a UUID: {error}",
                String::from_utf8_lossy(raw)
            ))
        })
    };

    let event_id = uuid(row.text_bytes(1).map_err(&at)?, "event_id")?;
    let payload = row.text(7).map_err(&at)?;
    let payload = match payloads {
        Payloads::Checked => Payload::from_json(payload).map_err(&malformed)?,
        Payloads::AsStored => Payload::from_stored_unchecked(payload),
    };
    // Most events carry no metadata: `null` needs no parser.
    let metadata = match row.text_bytes(8).map_err(&at)? {
        b"null" => Value::Null,
        _ => serde_json::from_str(row.text(8).map_err(&at)?)
            .map_err(|error| invalid(format!("metadata is not JSON: {error}")))?,
    };
    let micros = row.integer(9).map_err(&at)?;
    let timestamp = from_micros(micros)
        .ok_or_else(|| invalid(format!("timestamp {micros} is out of range")))?;
    let optional_uuid = |index: usize, column: &str| -> Result<Option<Uuid>, CQRSError> {
        row.optional_text_bytes(index)
            .map_err(&at)?
            .map(|raw| uuid(raw, column))
            .transpose()
    };
    let correlation_id = optional_uuid(10, "correlation_id")?;
    let causation_id = optional_uuid(11, "causation_id")?;

    let (aggregate_type, aggregate_type_id) = names.aggregate(&aggregate_type, aggregate_id);
    Ok(PersistableDomainEvent {
        event_id,
        aggregate_type_id,
        aggregate_id,
        aggregate_type,
        sequence,
        position,
        event_type,
        event_version,
        payload,
        metadata,
        timestamp,
        correlation_id,
        causation_id,
    })
}

/// Decodes rows from the sqlx pool with [`decode_event`], in order.
pub(super) fn decode_events(rows: &[SqliteRow]) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
    let mut names = RowNames::default();
    rows.iter()
        .map(|row| decode_event(row, &mut names, Payloads::Checked))
        .collect()
}

/// Decodes a page of `read_all` from the sqlx pool with [`Page`].
pub(super) fn decode_page_rows(rows: &[SqliteRow]) -> Page {
    let mut page = Page::with_capacity(rows.len());
    for row in rows {
        if !page.push(row) {
            break;
        }
    }
    page
}

/// A page of `read_all` being decoded: the events up to the first damaged row.
///
/// A payload that is not JSON is kept as stored ([`Payloads::AsStored`]). A row that cannot
/// become an event at all ends the page before it; when it is the first row, the page is
/// [`CQRSError::DamagedRow`] naming its position instead, so a reader learns where it is and
/// treats it as one poison event, and the rows after it stay readable.
pub(super) struct Page {
    events: Vec<PersistableDomainEvent>,
    names: RowNames,
    damage: Option<CQRSError>,
    damaged_at: Option<i64>,
}

impl Page {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Page {
            events: Vec::with_capacity(capacity),
            names: RowNames::default(),
            damage: None,
            damaged_at: None,
        }
    }

    /// Decodes `row`; false when the page ends before it.
    pub(super) fn push(&mut self, row: &impl EventRow) -> bool {
        match decode_event(row, &mut self.names, Payloads::AsStored) {
            Ok(event) => {
                self.events.push(event);
                true
            }
            Err(error) => {
                self.damaged_at = row.integer(0).ok();
                if self.events.is_empty() {
                    self.damage = Some(damaged_row(row, error));
                }
                false
            }
        }
    }

    /// The events, or the damage of a page whose first row is damaged; and the position of
    /// the damaged row that ended the page, if one did (a committed position past the
    /// events, which tells a reader that more follows).
    pub(super) fn finish(self) -> (Result<Vec<PersistableDomainEvent>, CQRSError>, Option<i64>) {
        let events = match self.damage {
            Some(damage) => Err(damage),
            None => Ok(self.events),
        };
        (events, self.damaged_at)
    }
}

/// [`CQRSError::DamagedRow`] for a row that [`decode_event`] refused with `error`, with what
/// can be read of its identity; `error` itself when not even its position can be read.
fn damaged_row(row: &impl EventRow, error: CQRSError) -> CQRSError {
    let Ok(position) = row.integer(0) else {
        return error;
    };
    let problem = match &error {
        CQRSError::EventDecode(decode) => decode.kind.to_string(),
        CQRSError::PersistenceError(source) => source
            .downcast_ref::<CorruptRow>()
            .map_or_else(|| source.to_string(), |corrupt| corrupt.problem.clone()),
        other => other.to_string(),
    };
    let text = |index| row.text(index).ok().map(str::to_owned);
    let uuid = |index| row.text(index).ok().and_then(|t| Uuid::parse_str(t).ok());
    CQRSError::from(DamagedRow {
        position,
        event_id: uuid(1),
        aggregate_type: text(2),
        aggregate_id: uuid(3),
        sequence: row.integer(4).ok(),
        event_type: text(5),
        event_version: text(6),
        problem,
    })
}

/// `read_all`'s fast path on the sqlx pool (stores made by `from_pool`; the others read with
/// `reader.rs`): one page of events as a single JSON text built by SQLite, so
/// that sqlx moves one value instead of twelve per event (about twice the catch-up rate).
/// `json(payload)` fails the whole query on a payload that is not JSON; the caller then
/// reads the page row by row ([`Page`]), which keeps such a payload as stored.
pub(super) const PAGE_SQL: &str = "SELECT json_group_array(json_array(position, event_id, \
     aggregate_type, aggregate_id, sequence, event_type, event_version, json(payload), \
     json(metadata), timestamp, correlation_id, causation_id)) \
     FROM (SELECT * FROM cqrs_events WHERE position > ? ORDER BY position LIMIT ?)";

type PageRow = (
    i64,
    String,
    SmolStr,
    String,
    i64,
    SmolStr,
    SmolStr,
    Payload,
    Value,
    i64,
    Option<String>,
    Option<String>,
);

/// A nullable UUID column of a [`PAGE_SQL`] row: `Some(None)` for `NULL`, `None` when the
/// text is not a UUID.
fn optional_uuid(raw: Option<&str>) -> Option<Option<Uuid>> {
    match raw {
        None => Some(None),
        Some(text) => Uuid::parse_str(text).ok().map(Some),
    }
}

/// Decodes a [`PAGE_SQL`] result; `None` when anything is off (the caller falls back to
/// [`decode_event`], which names the problem).
pub(super) fn decode_page(text: &str) -> Option<Vec<PersistableDomainEvent>> {
    let rows: Vec<PageRow> = serde_json::from_str(text).ok()?;
    let mut events = Vec::with_capacity(rows.len());
    let mut names = RowNames::default();
    for row in rows {
        let (position, event_id, aggregate_type, aggregate_id, sequence) =
            (row.0, row.1, row.2, row.3, row.4);
        let aggregate_id = Uuid::parse_str(&aggregate_id).ok()?;
        let (_, aggregate_type_id) = names.aggregate(&aggregate_type, aggregate_id);
        events.push(PersistableDomainEvent {
            event_id: Uuid::parse_str(&event_id).ok()?,
            aggregate_type_id,
            aggregate_id,
            aggregate_type,
            sequence,
            position,
            event_type: row.5,
            event_version: row.6,
            payload: row.7,
            metadata: row.8,
            timestamp: from_micros(row.9)?,
            correlation_id: optional_uuid(row.10.as_deref())?,
            causation_id: optional_uuid(row.11.as_deref())?,
        });
    }
    // The aggregate sees the subquery's rows in order; check rather than rely on it.
    if events.windows(2).any(|w| w[0].position >= w[1].position) {
        events.sort_by_key(|event| event.position);
    }
    Some(events)
}

/// A column of a snapshot row, or a [`CorruptRow`] naming the aggregate.
pub(super) fn snapshot_column<'r, T>(
    row: &'r SqliteRow,
    index: usize,
    aggregate_type: &str,
    aggregate_id: Uuid,
) -> Result<T, CQRSError>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get::<T, _>(index).map_err(|error| {
        corrupt(
            "cqrs_snapshots",
            format_args!("{aggregate_type} {aggregate_id}"),
            error,
        )
    })
}

/// A [`CorruptRow`] for a snapshot with an impossible timestamp.
pub(super) fn bad_snapshot_timestamp(
    aggregate_type: &str,
    aggregate_id: Uuid,
    micros: i64,
) -> CQRSError {
    corrupt(
        "cqrs_snapshots",
        format_args!("{aggregate_type} {aggregate_id}"),
        format_args!("timestamp {micros} is out of range"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored row as SQLite hands it over: integers, and `TEXT` bytes that need not be
    /// UTF-8.
    struct Stored(Vec<Option<Result<i64, Vec<u8>>>>);

    impl Stored {
        fn event(position: i64, event_type: &[u8], metadata: &[u8]) -> Self {
            let text = |bytes: &[u8]| Some(Err(bytes.to_vec()));
            Stored(vec![
                Some(Ok(position)),
                text(Uuid::from_u128(position as u128).to_string().as_bytes()),
                text(b"account"),
                text(Uuid::from_u128(7).to_string().as_bytes()),
                Some(Ok(position)),
                text(event_type),
                text(b"1"),
                text(br#"{"Added":1}"#),
                text(metadata),
                Some(Ok(1_700_000_000_000_000)),
                None,
                text(Uuid::from_u128(99).to_string().as_bytes()),
            ])
        }
    }

    impl EventRow for Stored {
        fn integer(&self, index: usize) -> Result<i64, String> {
            match &self.0[index] {
                Some(Ok(value)) => Ok(*value),
                _ => Err(format!("column {index} is not INTEGER")),
            }
        }

        fn text(&self, index: usize) -> Result<&str, String> {
            std::str::from_utf8(self.text_bytes(index)?).map_err(|error| error.to_string())
        }

        fn optional_text(&self, index: usize) -> Result<Option<&str>, String> {
            match &self.0[index] {
                None => Ok(None),
                Some(_) => self.text(index).map(Some),
            }
        }

        fn text_bytes(&self, index: usize) -> Result<&[u8], String> {
            match &self.0[index] {
                Some(Err(bytes)) => Ok(bytes),
                _ => Err(format!("column {index} is not TEXT")),
            }
        }

        fn optional_text_bytes(&self, index: usize) -> Result<Option<&[u8]>, String> {
            match &self.0[index] {
                None => Ok(None),
                Some(_) => self.text_bytes(index).map(Some),
            }
        }
    }

    fn decode(row: &Stored, names: &mut RowNames) -> Result<PersistableDomainEvent, CQRSError> {
        decode_event(row, names, Payloads::AsStored)
    }

    /// The names of the previous row are reused without a UTF-8 check only when the bytes
    /// are the same: a changed name that is not UTF-8 is still refused.
    #[test]
    fn repeated_names_are_reused_and_changed_ones_checked() {
        let mut names = RowNames::default();
        let first = decode(&Stored::event(1, b"Added", b"null"), &mut names).unwrap();
        let second = decode(&Stored::event(2, b"Added", b"null"), &mut names).unwrap();
        assert_eq!(second.event_type, "Added");
        assert_eq!(second.aggregate_type, "account");
        assert_eq!(second.aggregate_type_id, first.aggregate_type_id);
        assert_eq!(second.event_id, Uuid::from_u128(2));
        assert_eq!(second.correlation_id, None);
        assert_eq!(second.causation_id, Some(Uuid::from_u128(99)));

        let error = decode(&Stored::event(3, b"Add\xffed", b"null"), &mut names).unwrap_err();
        assert!(error.to_string().contains("not UTF-8"), "{error}");
        let renamed = decode(&Stored::event(4, b"Removed", b"null"), &mut names).unwrap();
        assert_eq!(renamed.event_type, "Removed");
    }

    /// `null` metadata skips the parser; any other text is parsed, and text that is not
    /// JSON is the event's decode error.
    #[test]
    fn metadata_is_null_parsed_or_refused() {
        let mut names = RowNames::default();
        let none = decode(&Stored::event(1, b"Added", b"null"), &mut names).unwrap();
        assert_eq!(none.metadata, Value::Null);
        let some = decode(
            &Stored::event(2, b"Added", br#"{"user":"ann"}"#),
            &mut names,
        )
        .unwrap();
        assert_eq!(some.metadata, serde_json::json!({ "user": "ann" }));
        let error = decode(&Stored::event(3, b"Added", b"nul"), &mut names).unwrap_err();
        assert!(matches!(error, CQRSError::EventDecode(_)), "{error}");
    }

    /// Ids are parsed from the column's bytes: bytes that are not a UUID (or not UTF-8)
    /// name the column.
    #[test]
    fn ids_that_are_not_uuids_are_named() {
        let mut names = RowNames::default();
        let mut row = Stored::event(1, b"Added", b"null");
        row.0[1] = Some(Err(b"\xff-not-an-id".to_vec()));
        let error = decode(&row, &mut names).unwrap_err();
        assert!(error.to_string().contains("event_id"), "{error}");
        let mut row = Stored::event(2, b"Added", b"null");
        row.0[3] = Some(Err(b"7".to_vec()));
        let error = decode(&row, &mut names).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("aggregate_id \"7\" is not a UUID"),
            "{error}"
        );
    }
}
