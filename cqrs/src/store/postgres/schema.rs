//! The PostgreSQL schema: identifier validation, the DDL `migrate()` runs, and the SQL text
//! of every statement, prepared once per store handle.
//!
//! Why each table and constraint looks the way it does is in `docs/adr/0004-postgres-store.md`.

use std::fmt;

use crate::error::CQRSError;

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`); longer ones are truncated
/// silently, which could make two names collide.
const MAX_IDENTIFIER_LEN: usize = 63;

/// The store's own tables and function: a view may not use these names.
const RESERVED: &[&str] = &[
    "cqrs_events",
    "cqrs_snapshots",
    "cqrs_checkpoints",
    "cqrs_dead_letters",
    "cqrs_process_instances",
    "cqrs_process_checkpoints",
];

/// The schema used when none is configured.
pub(super) const DEFAULT_SCHEMA: &str = "public";

/// A schema or view table name that the PostgreSQL store refuses to splice into SQL.
///
/// It reaches callers as the source of a [`CQRSError::PersistenceError`]; downcast to
/// inspect it. Accepted names are 1 to 63 ASCII letters, digits and underscores, not
/// starting with a digit, not starting with `pg_` (reserved by PostgreSQL for schemas), and,
/// for a view table, not one of the store's own tables (`cqrs_events`, `cqrs_snapshots`,
/// `cqrs_checkpoints`, `cqrs_dead_letters`,
/// `cqrs_process_instances`, `cqrs_process_checkpoints`). A name is always double-quoted in SQL, so case is kept as written.
///
/// ```
/// use cqrs::InvalidIdentifier;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://localhost/db").unwrap();
/// let err = cqrs::PostgresEventRepository::from_pool(pool)
///     .with_schema("bad; DROP TABLE x")
///     .unwrap_err();
/// let cqrs::CQRSError::PersistenceError(source) = err else { panic!("{err:?}") };
/// let invalid = source.downcast_ref::<InvalidIdentifier>().unwrap();
/// assert_eq!(invalid.name, "bad; DROP TABLE x");
/// # });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidIdentifier {
    /// What the name was for: `"schema"` or `"view table"`.
    pub kind: &'static str,
    /// The refused name.
    pub name: String,
    /// Why it was refused.
    pub reason: &'static str,
}

impl fmt::Display for InvalidIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} name {:?} is not usable in PostgreSQL: {}",
            self.kind, self.name, self.reason
        )
    }
}

impl std::error::Error for InvalidIdentifier {}

impl From<InvalidIdentifier> for CQRSError {
    fn from(error: InvalidIdentifier) -> Self {
        CQRSError::persistence(error)
    }
}

/// Checks that `name` is a plain SQL identifier we may splice (double-quoted) into SQL.
pub(super) fn validate_identifier(kind: &'static str, name: &str) -> Result<(), InvalidIdentifier> {
    let refuse = |reason: &'static str| {
        Err(InvalidIdentifier {
            kind,
            name: name.to_owned(),
            reason,
        })
    };
    let Some(first) = name.chars().next() else {
        return refuse("it is empty");
    };
    if name.len() > MAX_IDENTIFIER_LEN {
        return refuse("it is longer than 63 bytes");
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        return refuse("it must start with an ASCII letter or an underscore");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return refuse("only ASCII letters, digits and underscores are allowed");
    }
    if name.to_ascii_lowercase().starts_with("pg_") {
        return refuse("names starting with `pg_` are reserved by PostgreSQL");
    }
    if kind == "view table" && RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
        return refuse("it is one of the event store's own tables");
    }
    Ok(())
}

/// Starts a transaction whose statements are each planned for their own arguments and the
/// tables as they are now, in the same round trip as the `BEGIN`. A pooled connection keeps
/// a generic plan of a statement it runs often; one made while a table was small may read
/// the whole table (a sequential scan, or a hash join over one) on every run once the table
/// is large. The transactions of view and process batches, whose `UPDATE ... FROM unnest(..)`
/// the planner may join either way, start with this.
pub(super) const CUSTOM_PLANS_TRANSACTION: &str =
    "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";

/// The columns every event query selects, in the order `decode_event` reads them.
const EVENT_COLUMNS: &str = "position, event_id, aggregate_type, aggregate_id, sequence, \
     event_type, event_version, payload, metadata, \"timestamp\", correlation_id, causation_id";

/// The SQL of every statement of one store handle, with the schema spliced in once.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) migrate: String,
    /// One statement, one round trip, in an implicit transaction: all events or none.
    ///
    /// `pg_current_xact_id()` in the WHERE clause assigns the transaction its id before the
    /// first row is projected, and so before the first `nextval` of `position`: a qual is
    /// evaluated before the row it filters is handed up to the INSERT, whose target list
    /// holds the identity default (for a volatile qual without columns PostgreSQL even makes
    /// it a one-time filter run before the scan). The gap-safety argument of `read_all`
    /// depends on this order; see ADR 0004. `$10` is the sequence the writer believes is the
    /// last: unless it is 0, it must be stored, otherwise no row is inserted (a batch that
    /// skips ahead). Rows are inserted in batch order, so positions grow with sequences.
    ///
    /// Each array is unnested from a scalar subquery, `unnest((SELECT $1::uuid[]), ..)`,
    /// so that the planner cannot see how long the arrays are: with the bare parameters, a
    /// custom plan counts the elements of the constant arrays, finds itself cheaper than
    /// the generic plan (which assumes ten), and PostgreSQL then plans the statement anew
    /// on every execution. Through the subqueries every plan assumes the same count, the
    /// connection keeps the generic plan after five executions, and a statement skips its
    /// planning (with the bare parameters, `pg_stat_statements` counted 0.24 ms of planning
    /// per group statement, as long as its execution; see ADR 0004).
    pub(super) append: String,
    /// [`append`](Self::append) for a batch of one event, with scalar parameters: the same
    /// statement shape and order of evaluation, without the arrays (the common case).
    pub(super) append_one: String,
    /// The appends of a group, each with its own aggregate and expected sequence (`$10`,
    /// per event): the same conditions and order of evaluation as
    /// [`append`](Self::append), plus one that leaves out an append whose first sequence is
    /// already stored (a stale writer, or an earlier attempt of the same append) instead of
    /// failing the whole statement. Each condition has the same value for every event of
    /// an append, so an append is stored whole or left out whole. Returns
    /// `(event_id, position)` per stored event.
    ///
    /// Both probes (the previous sequence stored, the first sequence not stored) are scalar
    /// subqueries (one row at most, by the unique key) rather than `EXISTS` / `NOT EXISTS`:
    /// a scalar subquery is always a per-row probe of the unique index, whatever the plan.
    /// An `EXISTS` beside an `OR` may become a hashed subplan, and a `NOT EXISTS` an anti
    /// join; both read the whole table when the planner takes it for small. A connection
    /// may keep a generic plan made while the table was empty for as long as it lives, so
    /// such a plan would read every stored event on every group.
    ///
    /// The arrays are unnested from scalar subqueries, as in [`append`](Self::append), so
    /// that a connection keeps one generic plan instead of planning every group anew.
    pub(super) append_group: String,
    pub(super) find_ids: String,
    pub(super) load_events: String,
    /// One command's events of one aggregate: one range of the partial index
    /// `cqrs_events_causation`.
    pub(super) events_caused_by: String,
    pub(super) event_sequence: String,
    /// `read_all`'s page as `COPY (SELECT ..) TO STDOUT (FORMAT binary)`, up to the bounds:
    /// [`read_all_copy`](Self::read_all_copy) appends the bounds (COPY takes no parameters).
    read_all_copy_head: String,
    pub(super) load_snapshot: String,
    pub(super) save_snapshot: String,
    pub(super) delete_snapshot: String,
    pub(super) load_checkpoint: String,
    pub(super) save_checkpoint: String,
    /// Moves a projection's checkpoint forward with its view changes; returns no row when
    /// the stored checkpoint is ahead (or equal while rows change): a stale projector.
    pub(super) advance_checkpoint: String,
}

impl Statements {
    /// The `COPY` of up to `limit` events after `after_position`, in position order. Both
    /// bounds are integers formatted here, so nothing from outside reaches the SQL text.
    pub(super) fn read_all_copy(&self, after_position: i64, limit: i64) -> String {
        format!(
            "{}{after_position} ORDER BY position LIMIT {limit}) TO STDOUT (FORMAT binary)",
            self.read_all_copy_head
        )
    }

    /// The statements for `schema`, which must have passed [`validate_identifier`].
    pub(super) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        Statements {
            migrate: migrate_ddl(schema),
            append: format!(
                "INSERT INTO {s}.cqrs_events AS e \
                     (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, \
                      payload, metadata, \"timestamp\", correlation_id, causation_id) \
                 SELECT u.event_id, $2, $3, u.seq, u.event_type, u.event_version, u.payload, \
                        u.metadata, u.ts, u.correlation_id, u.causation_id \
                 FROM unnest((SELECT $1::uuid[]), (SELECT $4::bigint[]), (SELECT $5::text[]), \
                             (SELECT $6::text[]), (SELECT $7::jsonb[]), (SELECT $8::jsonb[]), \
                             (SELECT $9::timestamptz[]), (SELECT $11::uuid[]), \
                             (SELECT $12::uuid[])) \
                      WITH ORDINALITY AS u(event_id, seq, event_type, event_version, payload, \
                                           metadata, ts, correlation_id, causation_id, ord) \
                 WHERE pg_current_xact_id() IS NOT NULL \
                   AND ($10 = 0 OR EXISTS (SELECT 1 FROM {s}.cqrs_events p \
                        WHERE p.aggregate_type = $2 AND p.aggregate_id = $3 AND p.sequence = $10)) \
                 ORDER BY u.ord \
                 RETURNING e.sequence, e.position"
            ),
            append_one: format!(
                "INSERT INTO {s}.cqrs_events AS e \
                     (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, \
                      payload, metadata, \"timestamp\", correlation_id, causation_id) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $11, $12 \
                 WHERE pg_current_xact_id() IS NOT NULL \
                   AND ($10 = 0 OR EXISTS (SELECT 1 FROM {s}.cqrs_events p \
                        WHERE p.aggregate_type = $2 AND p.aggregate_id = $3 AND p.sequence = $10)) \
                 RETURNING e.sequence, e.position"
            ),
            append_group: format!(
                "INSERT INTO {s}.cqrs_events AS e \
                     (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, \
                      payload, metadata, \"timestamp\", correlation_id, causation_id) \
                 SELECT u.event_id, u.aggregate_type, u.aggregate_id, u.seq, u.event_type, \
                        u.event_version, u.payload, u.metadata, u.ts, u.correlation_id, \
                        u.causation_id \
                 FROM unnest((SELECT $1::uuid[]), (SELECT $2::text[]), (SELECT $3::uuid[]), \
                             (SELECT $4::bigint[]), (SELECT $5::text[]), (SELECT $6::text[]), \
                             (SELECT $7::jsonb[]), (SELECT $8::jsonb[]), \
                             (SELECT $9::timestamptz[]), (SELECT $10::bigint[]), \
                             (SELECT $11::uuid[]), (SELECT $12::uuid[])) \
                      WITH ORDINALITY AS u(event_id, aggregate_type, aggregate_id, seq, \
                                           event_type, event_version, payload, metadata, ts, \
                                           expected, correlation_id, causation_id, ord) \
                 WHERE pg_current_xact_id() IS NOT NULL \
                   AND (u.expected = 0 OR (SELECT true FROM {s}.cqrs_events p \
                        WHERE p.aggregate_type = u.aggregate_type \
                          AND p.aggregate_id = u.aggregate_id AND p.sequence = u.expected)) \
                   AND (SELECT true FROM {s}.cqrs_events q \
                        WHERE q.aggregate_type = u.aggregate_type \
                          AND q.aggregate_id = u.aggregate_id \
                          AND q.sequence = u.expected + 1) IS NULL \
                 ORDER BY u.ord \
                 RETURNING e.event_id, e.position"
            ),
            find_ids: format!(
                "SELECT event_id, aggregate_type, aggregate_id, sequence, position \
                 FROM {s}.cqrs_events WHERE event_id = ANY($1)"
            ),
            load_events: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.cqrs_events \
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 \
                 ORDER BY sequence"
            ),
            events_caused_by: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.cqrs_events \
                 WHERE causation_id = $3 AND aggregate_type = $1 AND aggregate_id = $2 \
                 ORDER BY sequence"
            ),
            event_sequence: format!(
                "SELECT COALESCE(MAX(sequence), 0) FROM {s}.cqrs_events \
                 WHERE aggregate_type = $1 AND aggregate_id = $2"
            ),
            read_all_copy_head: format!(
                "COPY (SELECT {EVENT_COLUMNS} FROM {s}.cqrs_events WHERE position > "
            ),
            load_snapshot: format!(
                "SELECT sequence, state, \"timestamp\" FROM {s}.cqrs_snapshots \
                 WHERE aggregate_type = $1 AND aggregate_id = $2"
            ),
            save_snapshot: format!(
                "INSERT INTO {s}.cqrs_snapshots AS old \
                     (aggregate_type, aggregate_id, sequence, state, \"timestamp\") \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
                 SET sequence = EXCLUDED.sequence, state = EXCLUDED.state, \
                     \"timestamp\" = EXCLUDED.\"timestamp\" \
                 WHERE old.sequence <= EXCLUDED.sequence"
            ),
            delete_snapshot: format!(
                "DELETE FROM {s}.cqrs_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2"
            ),
            load_checkpoint: format!("SELECT position FROM {s}.cqrs_checkpoints WHERE name = $1"),
            save_checkpoint: format!(
                "INSERT INTO {s}.cqrs_checkpoints (name, position, updated_at) \
                 VALUES ($1, $2, now()) \
                 ON CONFLICT (name) DO UPDATE \
                 SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at"
            ),
            advance_checkpoint: format!(
                "INSERT INTO {s}.cqrs_checkpoints AS c (name, position, updated_at) \
                 VALUES ($1, $2, now()) \
                 ON CONFLICT (name) DO UPDATE \
                 SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at \
                 WHERE c.position < EXCLUDED.position OR (c.position = EXCLUDED.position AND $3) \
                 RETURNING c.position"
            ),
        }
    }
}

/// The whole schema, idempotent, run in one transaction under an advisory lock keyed by the
/// schema name so that two processes migrating at once do not race on the catalog.
fn migrate_ddl(schema: &str) -> String {
    let s = format!("\"{schema}\"");
    format!(
        r#"
SELECT pg_advisory_xact_lock(hashtextextended('cqrs migrate {schema}', 0));

CREATE SCHEMA IF NOT EXISTS {s};

CREATE TABLE IF NOT EXISTS {s}.cqrs_events (
    position        BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    event_id        UUID        NOT NULL,
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    UUID        NOT NULL,
    sequence        BIGINT      NOT NULL CHECK (sequence >= 1),
    event_type      TEXT        NOT NULL,
    event_version   TEXT        NOT NULL,
    payload         JSONB       NOT NULL,
    metadata        JSONB       NOT NULL,
    "timestamp"     TIMESTAMPTZ NOT NULL,
    transaction_id  XID8        NOT NULL DEFAULT pg_current_xact_id(),
    correlation_id  UUID,
    causation_id    UUID,
    CONSTRAINT cqrs_events_event_id_key UNIQUE (event_id),
    CONSTRAINT cqrs_events_aggregate_sequence_key UNIQUE (aggregate_type, aggregate_id, sequence)
);

-- A table made before events carried correlation and causation gains the columns (its
-- rows read back with NULL: None), and the index `events_caused_by` reads. The catalog is
-- looked at first so that a table already up to date is not locked: ALTER TABLE takes an
-- ACCESS EXCLUSIVE lock, and CREATE INDEX a SHARE lock, even when IF NOT EXISTS makes them
-- do nothing. The index holds the whole key of `events_caused_by` and then the sequence,
-- so that query is one range of it, already sorted; it is partial, so events appended
-- without a command context cost it nothing.
DO $cqrs$
BEGIN
    IF (SELECT count(*) FROM pg_attribute
        WHERE attrelid = '{s}.cqrs_events'::regclass
          AND attname IN ('correlation_id', 'causation_id') AND NOT attisdropped) < 2 THEN
        ALTER TABLE {s}.cqrs_events
            ADD COLUMN IF NOT EXISTS correlation_id UUID,
            ADD COLUMN IF NOT EXISTS causation_id UUID;
    END IF;
    IF to_regclass('{s}.cqrs_events_causation') IS NULL THEN
        CREATE INDEX IF NOT EXISTS cqrs_events_causation
            ON {s}.cqrs_events (causation_id, aggregate_type, aggregate_id, sequence)
            WHERE causation_id IS NOT NULL;
    END IF;
END
$cqrs$;

CREATE TABLE IF NOT EXISTS {s}.cqrs_snapshots (
    aggregate_type  TEXT        NOT NULL,
    aggregate_id    UUID        NOT NULL,
    sequence        BIGINT      NOT NULL CHECK (sequence >= 0),
    state           JSONB       NOT NULL,
    "timestamp"     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

CREATE TABLE IF NOT EXISTS {s}.cqrs_checkpoints (
    name        TEXT        PRIMARY KEY,
    position    BIGINT      NOT NULL CHECK (position >= 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
"#
    )
}

/// `CREATE TABLE` for a view table; both names already validated.
pub(super) fn view_table_ddl(schema: &str, table: &str) -> String {
    format!(
        r#"
SELECT pg_advisory_xact_lock(hashtextextended('cqrs migrate {schema}', 0));

CREATE TABLE IF NOT EXISTS "{schema}"."{table}" (
    view_id       TEXT        COLLATE "C" NOT NULL,
    view_version  BIGINT      NOT NULL,
    row_version   BIGINT      NOT NULL CHECK (row_version >= 1),
    payload       JSONB       NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (view_id, view_version)
);
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        for name in ["account_balance", "_private", "View2", "a", "t_0123abcd"] {
            assert!(validate_identifier("view table", name).is_ok(), "{name}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        let long = "x".repeat(64);
        for name in [
            "",
            "1abc",
            "a-b",
            "a b",
            "a\"b",
            "x; DROP TABLE cqrs_events",
            "pg_catalog",
            "cqrs_events",
            "CQRS_Snapshots",
            "cqrs_process_instances",
            "cqrs_process_checkpoints",
            "é",
            long.as_str(),
        ] {
            let error = validate_identifier("view table", name).unwrap_err();
            assert_eq!(error.name, name);
        }
        assert!(validate_identifier("schema", "cqrs_events").is_ok());
    }
}
