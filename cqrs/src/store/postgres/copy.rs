//! Catch-up reads through `COPY (SELECT ..) TO STDOUT (FORMAT binary)`.
//!
//! A page of `read_all` is most of what a projection catching up costs. Through sqlx's
//! query path every row becomes a `PgRow` and every column a checked, typed `try_get`: on
//! this machine that cost the client more than the server spends producing the row, so the
//! client set the pace. Binary `COPY` sends the same columns in the same binary forms as
//! the query would, with no per-row protocol machinery on our side: the rows are parsed
//! here as they arrive, straight into events, while the server produces the rest.
//!
//! The format (PostgreSQL docs, "COPY", "Binary Format"): an 11-byte signature, a 32-bit
//! flags field, a 32-bit header-extension length and the extension; then per row a 16-bit
//! field count and per field a 32-bit length (-1 for NULL) and the bytes; a field count of
//! -1 ends the data. Every integer is big-endian.

use futures_util::stream::TryStreamExt;
use sqlx::postgres::{PgPool, PgPoolCopyExt};
use uuid::Uuid;

use crate::error::{CQRSError, DamagedRow};
use crate::event::{PersistableDomainEvent, RowNames};
use crate::payload::Payload;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Columns per row: `EVENT_COLUMNS`.
const COLUMNS: i16 = 12;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A page of `read_all` read with `COPY`: the events up to the first row that cannot be
/// decoded, and that row's damage.
pub(super) struct CopyPage {
    /// The events before the damaged row (all of them when there is none).
    pub(super) events: Vec<PersistableDomainEvent>,
    /// The first row that could not be decoded, if any.
    pub(super) damage: Option<DamagedRow>,
}

/// Runs `sql` (a [`Statements::read_all_copy`](super::schema::Statements::read_all_copy))
/// and decodes its rows up to the first one that cannot be decoded.
pub(super) async fn read_page(
    pool: &PgPool,
    sql: &str,
    expected: usize,
) -> Result<CopyPage, CQRSError> {
    let mut chunks = pool
        .copy_out_raw(sql)
        .await
        .map_err(CQRSError::persistence)?;
    let mut parser = Parser::new(expected);
    while let Some(chunk) = chunks.try_next().await.map_err(CQRSError::persistence)? {
        parser.feed(&chunk)?;
    }
    if !parser.finished || !parser.buffer.is_empty() {
        return Err(bad_data("the data ended before its trailer"));
    }
    Ok(CopyPage {
        events: parser.events,
        damage: parser.damage,
    })
}

fn bad_data(problem: impl std::fmt::Display) -> CQRSError {
    CQRSError::persistence(format!("reading cqrs_events with COPY: {problem}"))
}

struct Parser {
    /// Bytes of a row that is not complete yet.
    buffer: Vec<u8>,
    header_read: bool,
    finished: bool,
    events: Vec<PersistableDomainEvent>,
    names: RowNames,
    /// The first row that did not decode; the rows after it are read but not decoded.
    damage: Option<DamagedRow>,
}

impl Parser {
    fn new(expected: usize) -> Self {
        Parser {
            buffer: Vec::new(),
            header_read: false,
            finished: false,
            events: Vec::with_capacity(expected.min(4096)),
            names: RowNames::default(),
            damage: None,
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), CQRSError> {
        if self.buffer.is_empty() {
            let used = self.parse(chunk)?;
            self.buffer.extend_from_slice(&chunk[used..]);
        } else {
            let mut data = std::mem::take(&mut self.buffer);
            data.extend_from_slice(chunk);
            let used = self.parse(&data)?;
            data.drain(..used);
            self.buffer = data;
        }
        Ok(())
    }

    /// Decodes every complete part of `data`; returns how many bytes it used.
    fn parse(&mut self, data: &[u8]) -> Result<usize, CQRSError> {
        let mut reader = Reader { data, at: 0 };
        if !self.header_read {
            let Some(signature) = reader.take(SIGNATURE.len()) else {
                return Ok(0);
            };
            if signature != SIGNATURE {
                return Err(bad_data("not binary COPY data"));
            }
            let (Some(_flags), Some(extension)) = (reader.i32(), reader.i32()) else {
                return Ok(0);
            };
            let extension = usize::try_from(extension)
                .map_err(|_| bad_data("a negative header extension length"))?;
            if reader.take(extension).is_none() {
                return Ok(0);
            }
            self.header_read = true;
        }
        loop {
            let start = reader.at;
            if self.finished {
                if reader.at < data.len() {
                    return Err(bad_data("data after the trailer"));
                }
                return Ok(reader.at);
            }
            let Some(fields) = reader.i16() else {
                return Ok(start);
            };
            if fields == -1 {
                self.finished = true;
                continue;
            }
            if fields != COLUMNS {
                return Err(bad_data(format!(
                    "a row of {fields} columns, not {COLUMNS}"
                )));
            }
            let Some(row) = row_fields(&mut reader)? else {
                return Ok(start);
            };
            if self.damage.is_some() {
                continue;
            }
            match decode_row(&row, &mut self.names)? {
                Ok(event) => self.events.push(event),
                Err(damage) => self.damage = Some(damage),
            }
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// The fields of one row (`None` for a NULL), or `Ok(None)` when the data ends inside it.
fn row_fields<'a>(reader: &mut Reader<'a>) -> Result<Option<Row<'a>>, CQRSError> {
    let mut row: Row<'a> = [None; COLUMNS as usize];
    for field in &mut row {
        let Some(length) = reader.i32() else {
            return Ok(None);
        };
        if length == -1 {
            continue;
        }
        let length = usize::try_from(length).map_err(|_| bad_data("a negative field length"))?;
        let Some(bytes) = reader.take(length) else {
            return Ok(None);
        };
        *field = Some(bytes);
    }
    Ok(Some(row))
}

/// The fields of a row in `EVENT_COLUMNS` order, `None` for a NULL.
type Row<'a> = [Option<&'a [u8]>; COLUMNS as usize];

fn int8(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

fn jsonb(bytes: &[u8]) -> Option<&str> {
    match bytes.split_first() {
        Some((1, rest)) => text(rest),
        _ => None,
    }
}

/// One row, in `EVENT_COLUMNS` order: the event, or the damage of a row that does not
/// decode (what could be read of it, naming the first field that could not). A row
/// without a readable position is an error of the whole read: it cannot be located.
fn decode_row(
    row: &Row<'_>,
    names: &mut RowNames,
) -> Result<Result<PersistableDomainEvent, DamagedRow>, CQRSError> {
    let position = row[0]
        .and_then(int8)
        .ok_or_else(|| bad_data("a row whose position is not an int8"))?;
    let uuid = |index: usize| row[index].and_then(|bytes| Uuid::from_slice(bytes).ok());
    let string = |index: usize| row[index].and_then(text);
    let damage = |what: &str| DamagedRow {
        position,
        event_id: uuid(1),
        aggregate_type: string(2).map(str::to_owned),
        aggregate_id: uuid(3),
        sequence: row[4].and_then(int8),
        event_type: string(5).map(str::to_owned),
        event_version: string(6).map(str::to_owned),
        problem: format!("{what} does not decode"),
    };
    let (Some(event_id), Some(aggregate_type), Some(aggregate_id), Some(sequence)) =
        (uuid(1), string(2), uuid(3), row[4].and_then(int8))
    else {
        let what = match (uuid(1), string(2), uuid(3)) {
            (None, _, _) => "event_id",
            (_, None, _) => "aggregate_type",
            (_, _, None) => "aggregate_id",
            _ => "sequence",
        };
        return Ok(Err(damage(what)));
    };
    let (Some(event_type), Some(event_version)) = (string(5), string(6)) else {
        let what = if string(5).is_none() {
            "event_type"
        } else {
            "event_version"
        };
        return Ok(Err(damage(what)));
    };
    let Some(payload) = row[7].and_then(jsonb) else {
        return Ok(Err(damage("payload")));
    };
    let metadata = match row[8].and_then(jsonb) {
        Some("null") => serde_json::Value::Null,
        Some(other) => match serde_json::from_str(other) {
            Ok(metadata) => metadata,
            Err(_) => return Ok(Err(damage("metadata"))),
        },
        None => return Ok(Err(damage("metadata"))),
    };
    let Some(timestamp) = row[9]
        .and_then(int8)
        .and_then(|micros| micros.checked_add(PG_EPOCH_MICROS))
        .and_then(chrono::DateTime::from_timestamp_micros)
    else {
        return Ok(Err(damage("timestamp")));
    };
    // NULL (an event without a command context, or stored before the columns existed) is
    // `None`; anything but 16 bytes is damage.
    let optional_uuid = |index: usize| match row[index] {
        None => Some(None),
        Some(bytes) => Uuid::from_slice(bytes).ok().map(Some),
    };
    let Some(correlation_id) = optional_uuid(10) else {
        return Ok(Err(damage("correlation_id")));
    };
    let Some(causation_id) = optional_uuid(11) else {
        return Ok(Err(damage("causation_id")));
    };
    let (aggregate_type, aggregate_type_id) = names.aggregate(aggregate_type, aggregate_id);
    Ok(Ok(PersistableDomainEvent {
        event_id,
        aggregate_type_id,
        aggregate_id,
        aggregate_type,
        sequence,
        position,
        event_type: names.event_type(event_type),
        event_version: names.event_version(event_version),
        // PostgreSQL checked the JSON when it stored it.
        payload: Payload::from_checked(payload),
        metadata,
        timestamp,
        correlation_id,
        causation_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    }

    /// Binary COPY data of `rows` events, as PostgreSQL writes it.
    fn copy_data(rows: i64) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        for position in 1..=rows {
            out.extend_from_slice(&COLUMNS.to_be_bytes());
            field(&mut out, &position.to_be_bytes());
            field(&mut out, Uuid::from_u128(position as u128).as_bytes());
            field(&mut out, b"account");
            field(&mut out, Uuid::from_u128(7).as_bytes());
            field(&mut out, &position.to_be_bytes());
            field(&mut out, b"Deposited");
            field(&mut out, b"1");
            field(&mut out, b"\x01{\"amount\": 5}");
            field(&mut out, b"\x01null");
            field(&mut out, &(position * 1_000_000).to_be_bytes());
            // No correlation id (NULL); the causation id of every other row.
            out.extend_from_slice(&(-1i32).to_be_bytes());
            if position % 2 == 0 {
                field(&mut out, Uuid::from_u128(99).as_bytes());
            } else {
                out.extend_from_slice(&(-1i32).to_be_bytes());
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn parse_in_chunks(
        data: &[u8],
        chunk: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        Ok(parse_page(data, chunk)?.events)
    }

    fn parse_page(data: &[u8], chunk: usize) -> Result<CopyPage, CQRSError> {
        let mut parser = Parser::new(0);
        for piece in data.chunks(chunk) {
            parser.feed(piece)?;
        }
        assert!(parser.finished && parser.buffer.is_empty());
        Ok(CopyPage {
            events: parser.events,
            damage: parser.damage,
        })
    }

    #[test]
    fn rows_split_anywhere_across_chunks_decode_the_same() {
        let data = copy_data(3);
        let whole = parse_in_chunks(&data, data.len()).unwrap();
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[2].position, 3);
        assert_eq!(whole[2].event_id, Uuid::from_u128(3));
        assert_eq!(
            whole[0].aggregate_type_id,
            PersistableDomainEvent::type_id_for("account", Uuid::from_u128(7))
        );
        assert_eq!(whole[1].payload, serde_json::json!({ "amount": 5 }));
        assert_eq!(whole[1].correlation_id, None);
        assert_eq!(whole[1].causation_id, Some(Uuid::from_u128(99)));
        assert_eq!(whole[2].causation_id, None);
        assert_eq!(
            whole[1].timestamp.timestamp_micros(),
            PG_EPOCH_MICROS + 2_000_000
        );
        for chunk in [1, 2, 3, 7, 50] {
            assert_eq!(
                parse_in_chunks(&data, chunk).unwrap(),
                whole,
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn a_bad_row_ends_the_page_and_is_named_by_its_position() {
        let mut data = copy_data(3);
        // The second row's payload loses its jsonb version byte.
        let at = data.windows(3).position(|w| w == b"\x01{\"").unwrap();
        let at = at
            + 1
            + data[at + 1..]
                .windows(3)
                .position(|w| w == b"\x01{\"")
                .unwrap();
        data[at] = 9;
        for chunk in [1, 7, data.len()] {
            let page = parse_page(&data, chunk).unwrap();
            assert_eq!(page.events.len(), 1, "the row before the damaged one");
            let damage = page.damage.unwrap();
            assert_eq!(damage.position, 2);
            assert_eq!(damage.sequence, Some(2));
            assert_eq!(damage.event_id, Some(Uuid::from_u128(2)));
            assert!(damage.problem.contains("payload"), "{damage}");
        }
        assert!(parse_in_chunks(b"not copy data at all", 64).is_err());
    }
}
