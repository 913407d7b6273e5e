//! The schema: table definitions and the checks on names that go into SQL text.
//!
//! docs/adr/0003-sqlite-store.md explains every constraint.

use std::fmt;

use crate::error::CQRSError;

/// Creates every table the store needs; each statement is idempotent.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE IF NOT EXISTS cqrs_events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL UNIQUE,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence >= 1),
    event_type     TEXT    NOT NULL,
    event_version  TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    timestamp      INTEGER NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    UNIQUE (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE TRIGGER IF NOT EXISTS cqrs_events_no_gap
BEFORE INSERT ON cqrs_events
WHEN NEW.sequence > 1 AND NOT EXISTS (
    SELECT 1 FROM cqrs_events
    WHERE aggregate_type = NEW.aggregate_type
      AND aggregate_id = NEW.aggregate_id
      AND sequence = NEW.sequence - 1
)
BEGIN
    SELECT RAISE(ABORT, 'cqrs_sequence_gap');
END;

CREATE TABLE IF NOT EXISTS cqrs_snapshots (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence >= 0),
    state          TEXT    NOT NULL,
    timestamp      INTEGER NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS cqrs_checkpoints (
    name       TEXT    NOT NULL PRIMARY KEY,
    position   INTEGER NOT NULL CHECK (position >= 0),
    updated_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
"#;

/// Columns of `cqrs_events` that a table made by an older version of the store lacks, each
/// with the `ALTER TABLE` that adds it: [`migrate`](super::SqliteEventRepository::migrate)
/// adds those missing, and the rows already stored read back with `NULL` (`None`).
pub(super) const ADDED_EVENT_COLUMNS: [(&str, &str); 2] = [
    (
        "correlation_id",
        "ALTER TABLE cqrs_events ADD COLUMN correlation_id TEXT",
    ),
    (
        "causation_id",
        "ALTER TABLE cqrs_events ADD COLUMN causation_id TEXT",
    ),
];

/// The indexes on columns of [`ADDED_EVENT_COLUMNS`], created once the columns exist.
///
/// `events_caused_by` looks up one command's events of one aggregate, in sequence order.
/// The index holds the whole lookup key and then the sequence, so the query is one range of
/// it, already sorted: with the causation id alone, SQLite's planner (without statistics)
/// prefers the unique key of the aggregate, which reads the aggregate's whole history. It is
/// partial: events appended without a command context (`NULL`) cost it nothing.
pub(super) const ADDED_INDEXES: &str = "CREATE INDEX IF NOT EXISTS cqrs_events_causation \
     ON cqrs_events (causation_id, aggregate_type, aggregate_id, sequence) \
     WHERE causation_id IS NOT NULL";

/// The message of the trigger that refuses a sequence skipping ahead.
pub(super) const GAP_MARKER: &str = "cqrs_sequence_gap";

/// The store's own tables: a view may not take one of these names.
const RESERVED: [&str; 6] = [
    "cqrs_events",
    "cqrs_snapshots",
    "cqrs_checkpoints",
    "cqrs_dead_letters",
    "cqrs_process_instances",
    "cqrs_process_checkpoints",
];

/// Longest accepted view table name.
const MAX_IDENTIFIER_LEN: usize = 63;

/// `CREATE TABLE` for a view table, `name` already validated.
pub(super) fn view_table_ddl(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS \"{name}\" (
            view_id      TEXT    NOT NULL,
            view_version INTEGER NOT NULL,
            row_version  INTEGER NOT NULL CHECK (row_version >= 1),
            payload      TEXT    NOT NULL,
            updated_at   INTEGER NOT NULL,
            PRIMARY KEY (view_id, view_version)
        ) STRICT, WITHOUT ROWID"
    )
}

/// A view's `TABLE_NAME` that cannot be used as a SQLite table name.
///
/// It reaches callers as the source of a [`CQRSError::PersistenceError`]; downcast to
/// inspect it. Accepted names are 1 to 63 ASCII letters, digits and underscores, not
/// starting with a digit, not starting with `sqlite_` and not one of the store's own tables
/// (`cqrs_events`, `cqrs_snapshots`, `cqrs_checkpoints`, `cqrs_dead_letters`,
/// `cqrs_process_instances`, `cqrs_process_checkpoints`). The name is never spliced into SQL
/// unless it passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTableName {
    /// The refused name.
    pub name: String,
    /// Why it was refused.
    pub reason: &'static str,
}

impl fmt::Display for InvalidTableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "view table name {:?} is not usable in SQLite: {}",
            self.name, self.reason
        )
    }
}

impl std::error::Error for InvalidTableName {}

/// Checks that `name` is a plain SQL identifier we may splice into statements.
pub(super) fn validate_table_name(name: &str) -> Result<(), CQRSError> {
    let refuse = |reason: &'static str| {
        Err(CQRSError::persistence(InvalidTableName {
            name: name.to_owned(),
            reason,
        }))
    };
    let Some(first) = name.chars().next() else {
        return refuse("it is empty");
    };
    if name.len() > MAX_IDENTIFIER_LEN {
        return refuse("it is longer than 63 characters");
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        return refuse("it must start with an ASCII letter or an underscore");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return refuse("only ASCII letters, digits and underscores are allowed");
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("sqlite_") {
        return refuse("names starting with `sqlite_` are reserved by SQLite");
    }
    if RESERVED.contains(&lower.as_str()) {
        return refuse("it is one of the event store's own tables");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        for name in ["account_balance", "_private", "View2", "a"] {
            assert!(validate_table_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn refuses_what_could_inject_or_collide() {
        for name in [
            "",
            "1view",
            "balance; DROP TABLE cqrs_events",
            "bal\"ance",
            "bal ance",
            "sqlite_master",
            "CQRS_EVENTS",
            "cqrs_checkpoints",
            "cqrs_dead_letters",
            "Cqrs_Process_Instances",
            "cqrs_process_checkpoints",
            "vïew",
            &"x".repeat(64),
        ] {
            let err = validate_table_name(name).unwrap_err();
            let CQRSError::PersistenceError(source) = err else {
                panic!("wrong variant for {name:?}");
            };
            let invalid = source.downcast_ref::<InvalidTableName>().unwrap();
            assert_eq!(invalid.name, name);
        }
    }
}
