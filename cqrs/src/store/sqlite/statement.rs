//! An application's own write statement, run by the writer in a group's transaction
//! ([`SqliteEventRepository::execute_write`](super::SqliteEventRepository::execute_write)):
//! the statement with its owned values, and the check that it is one data-changing
//! statement before it reaches the writer.

use std::fmt;

/// A value bound to a parameter of a [`SqliteWriteStatement`]: one of SQLite's five storage
/// classes, owned, so that the statement can wait in the writer's queue.
///
/// `From` conversions cover the usual Rust types; a `bool` is stored as the integer 0 or 1
/// (SQLite has no boolean type), and `None` as `NULL`.
///
/// ```
/// use cqrs::SqliteBindValue;
/// assert_eq!(SqliteBindValue::from("a"), SqliteBindValue::Text("a".into()));
/// assert_eq!(SqliteBindValue::from(true), SqliteBindValue::Integer(1));
/// assert_eq!(SqliteBindValue::from(None::<i64>), SqliteBindValue::Null);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum SqliteBindValue {
    /// `NULL`.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl From<i64> for SqliteBindValue {
    fn from(value: i64) -> Self {
        SqliteBindValue::Integer(value)
    }
}

impl From<i32> for SqliteBindValue {
    fn from(value: i32) -> Self {
        SqliteBindValue::Integer(i64::from(value))
    }
}

impl From<u32> for SqliteBindValue {
    fn from(value: u32) -> Self {
        SqliteBindValue::Integer(i64::from(value))
    }
}

impl From<bool> for SqliteBindValue {
    fn from(value: bool) -> Self {
        SqliteBindValue::Integer(i64::from(value))
    }
}

impl From<f64> for SqliteBindValue {
    fn from(value: f64) -> Self {
        SqliteBindValue::Real(value)
    }
}

impl From<String> for SqliteBindValue {
    fn from(value: String) -> Self {
        SqliteBindValue::Text(value)
    }
}

impl From<&str> for SqliteBindValue {
    fn from(value: &str) -> Self {
        SqliteBindValue::Text(value.to_owned())
    }
}

impl From<Vec<u8>> for SqliteBindValue {
    fn from(value: Vec<u8>) -> Self {
        SqliteBindValue::Blob(value)
    }
}

impl From<&[u8]> for SqliteBindValue {
    fn from(value: &[u8]) -> Self {
        SqliteBindValue::Blob(value.to_vec())
    }
}

impl<T: Into<SqliteBindValue>> From<Option<T>> for SqliteBindValue {
    fn from(value: Option<T>) -> Self {
        value.map_or(SqliteBindValue::Null, Into::into)
    }
}

/// One `INSERT`, `REPLACE`, `UPDATE` or `DELETE` (a `WITH` clause before it allowed) of the
/// application's own tables, with its bound values, for
/// [`SqliteEventRepository::execute_write`](super::SqliteEventRepository::execute_write).
///
/// Parameters are written `?` (one value each, in order), `?NNN` or `$NNN` (the `NNN`-th
/// value); the statement must use exactly as many values as are bound. Named parameters
/// (`:name`, `@name`, `$name`), a second statement after a `;`, and anything other than
/// the four statements above (transaction control, DDL, `PRAGMA`, `ATTACH`) are refused
/// before the statement reaches the writer.
///
/// ```
/// use cqrs::{SqliteBindValue, SqliteWriteStatement};
/// let statement = SqliteWriteStatement::new("UPDATE stock SET quantity = ? WHERE sku = ?")
///     .bind(3_i64)
///     .bind("book-1");
/// assert_eq!(statement.values(), [SqliteBindValue::Integer(3), "book-1".into()]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SqliteWriteStatement {
    sql: String,
    values: Vec<SqliteBindValue>,
}

impl SqliteWriteStatement {
    /// A statement without values yet.
    pub fn new(sql: impl Into<String>) -> Self {
        SqliteWriteStatement {
            sql: sql.into(),
            values: Vec::new(),
        }
    }

    /// Binds the next value.
    #[must_use]
    pub fn bind(mut self, value: impl Into<SqliteBindValue>) -> Self {
        self.values.push(value.into());
        self
    }

    /// The statement's text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The bound values, in order.
    pub fn values(&self) -> &[SqliteBindValue] {
        &self.values
    }

    /// The statement's text without a final `;` (and what follows it: spaces and comments),
    /// once [`check`] accepted it.
    pub(super) fn body(&self) -> &str {
        match statement_end(&self.sql) {
            Ok(Shape { end, .. }) => &self.sql[..end],
            Err(_) => &self.sql,
        }
    }
}

/// A [`SqliteWriteStatement`] the store refuses to run: not one data-changing statement, a
/// named parameter, or not as many values as parameters. It reaches the caller as the source
/// of a [`CQRSError::PersistenceError`](crate::CQRSError::PersistenceError); nothing was run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidStatement {
    /// The refused statement's text.
    pub sql: String,
    /// Why it was refused.
    pub reason: String,
}

impl fmt::Display for InvalidStatement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "write statement {:?} refused: {}", self.sql, self.reason)
    }
}

impl std::error::Error for InvalidStatement {}

/// SQLite's largest `?NNN` (`SQLITE_MAX_VARIABLE_NUMBER` of the bundled library).
const MAX_PARAMETER: usize = 32_766;

/// The statements an application may run through the writer.
const WRITES: [&str; 4] = ["INSERT", "REPLACE", "UPDATE", "DELETE"];

/// The words that begin a statement after a `WITH` clause.
const KINDS: [&str; 6] = ["INSERT", "REPLACE", "UPDATE", "DELETE", "SELECT", "VALUES"];

/// Checks that `statement` is one data-changing statement whose parameters match its
/// values, so that the writer can run it between a `SAVEPOINT` and a `RELEASE` of its own.
pub(super) fn check(statement: &SqliteWriteStatement) -> Result<(), InvalidStatement> {
    let refuse = |reason: String| InvalidStatement {
        sql: statement.sql.clone(),
        reason,
    };
    let shape = statement_end(&statement.sql).map_err(refuse)?;
    let first = shape.first_word.to_ascii_uppercase();
    // After a `WITH`, the statement is the first top-level word of a statement's kind (the
    // common table expressions' names, `AS` and `RECURSIVE` before it are not).
    let kind = if first == "WITH" {
        shape.main_word.to_ascii_uppercase()
    } else {
        first
    };
    if !WRITES.contains(&kind.as_str()) {
        let found = if kind.is_empty() {
            "a WITH clause alone"
        } else {
            &kind
        };
        return Err(refuse(format!(
            "it must be an INSERT, REPLACE, UPDATE or DELETE, not {found}"
        )));
    }
    let needed = shape.anonymous.max(shape.highest_numbered);
    if needed != statement.values.len() {
        return Err(refuse(format!(
            "it has {needed} parameters and {} values are bound",
            statement.values.len()
        )));
    }
    Ok(())
}

/// What [`statement_end`] found.
struct Shape<'a> {
    /// Where the statement's text ends: its length, or the offset of its final `;`.
    end: usize,
    /// Its first word (or other token), empty if none.
    first_word: &'a str,
    /// Its first word outside parentheses that begins a statement (`SELECT`, `INSERT`, ...),
    /// after the first word; empty if none.
    main_word: &'a str,
    /// How many `?` it holds.
    anonymous: usize,
    /// The highest `NNN` of its `?NNN` and `$NNN`, 0 if none.
    highest_numbered: usize,
}

/// Reads `sql` with SQLite's lexical rules (strings, quoted identifiers, comments,
/// parameters) far enough to find the end of its first statement, and refuses a second
/// statement, an unterminated string or comment, or a named parameter.
fn statement_end(sql: &str) -> Result<Shape<'_>, String> {
    let bytes = sql.as_bytes();
    let mut shape = Shape {
        end: sql.len(),
        first_word: "",
        main_word: "",
        anonymous: 0,
        highest_numbered: 0,
    };
    let mut ended = false;
    let mut depth = 0_usize;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        // After the `;`, only spaces and comments.
        let start = i;
        match c {
            b if b.is_ascii_whitespace() => i += 1,
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = bytes[i..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |offset| i + offset + 1);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let close = sql[i + 2..]
                    .find("*/")
                    .ok_or_else(|| "a /* comment is not closed".to_owned())?;
                i += 2 + close + 2;
            }
            _ if ended => {
                return Err("it holds more than one statement".to_owned());
            }
            b';' => {
                shape.end = i;
                ended = true;
                i += 1;
            }
            b'\'' | b'"' | b'`' => {
                i = closing(bytes, i, c, c)?;
            }
            b'[' => {
                i = closing(bytes, i, b'[', b']')?;
            }
            b'?' => {
                let digits = count_digits(&bytes[i + 1..]);
                if digits == 0 {
                    shape.anonymous += 1;
                } else {
                    let number = numbered(&sql[i + 1..i + 1 + digits])?;
                    shape.highest_numbered = shape.highest_numbered.max(number);
                }
                i += 1 + digits;
            }
            b'$' | b':' | b'@' | b'#' => {
                let digits = count_digits(&bytes[i + 1..]);
                let rest = identifier_len(&bytes[i + 1..]);
                if c == b'$' && digits > 0 && digits == rest {
                    let number = numbered(&sql[i + 1..i + 1 + digits])?;
                    shape.highest_numbered = shape.highest_numbered.max(number);
                    i += 1 + digits;
                } else if rest > 0 {
                    return Err(format!(
                        "named parameters such as {:?} are not supported; use ? or ?NNN",
                        &sql[i..i + 1 + rest]
                    ));
                } else {
                    i += 1;
                }
            }
            b if b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 => {
                i += identifier_len(&bytes[i..]);
                let word = &sql[start..i];
                if shape.first_word.is_empty() {
                    shape.first_word = word;
                } else if depth == 0
                    && shape.main_word.is_empty()
                    && KINDS.iter().any(|kind| kind.eq_ignore_ascii_case(word))
                {
                    shape.main_word = word;
                }
            }
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
        if shape.first_word.is_empty() && i > start && !c.is_ascii_whitespace() {
            // Something other than a word, a space or a comment came first.
            let comment = matches!(
                (c, bytes.get(start + 1)),
                (b'-', Some(b'-')) | (b'/', Some(b'*'))
            );
            if !comment {
                shape.first_word = &sql[start..i];
            }
        }
    }
    if shape.first_word.is_empty() {
        return Err("it is empty".to_owned());
    }
    Ok(shape)
}

/// The offset after the quote closing the one opened at `open` (a doubled closing quote
/// stands for itself inside).
fn closing(bytes: &[u8], open: usize, opening: u8, close: u8) -> Result<usize, String> {
    let mut i = open + 1;
    while i < bytes.len() {
        if bytes[i] == close {
            if opening != b'[' && bytes.get(i + 1) == Some(&close) {
                i += 2;
                continue;
            }
            return Ok(i + 1);
        }
        i += 1;
    }
    Err(format!("a {} is not closed", char::from(opening)))
}

fn count_digits(bytes: &[u8]) -> usize {
    bytes.iter().take_while(|b| b.is_ascii_digit()).count()
}

/// The length of the identifier characters at the start of `bytes` (SQLite allows `$` and
/// any non-ASCII character after the first).
fn identifier_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80)
        .count()
}

fn numbered(digits: &str) -> Result<usize, String> {
    match digits.parse::<usize>() {
        Ok(number) if (1..=MAX_PARAMETER).contains(&number) => Ok(number),
        _ => Err(format!(
            "parameter number {digits} is not between 1 and {MAX_PARAMETER}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{check, SqliteWriteStatement};

    fn with_values(sql: &str, values: usize) -> SqliteWriteStatement {
        (0..values).fold(SqliteWriteStatement::new(sql), |statement, i| {
            statement.bind(i as i64)
        })
    }

    #[test]
    fn one_write_statement_with_matching_values_is_accepted() {
        for (sql, values, body) in [
            (
                "INSERT INTO t VALUES (?, ?)",
                2,
                "INSERT INTO t VALUES (?, ?)",
            ),
            (
                "insert into t values (?2, ?1);",
                2,
                "insert into t values (?2, ?1)",
            ),
            (
                "  -- a comment\n/* another */ UPDATE t SET a = $1 WHERE b = $2 ; -- end",
                2,
                "  -- a comment\n/* another */ UPDATE t SET a = $1 WHERE b = $2 ",
            ),
            (
                "DELETE FROM \"odd;name\" WHERE a = 'it''s; ?' AND [b;] = `c;`",
                0,
                "DELETE FROM \"odd;name\" WHERE a = 'it''s; ?' AND [b;] = `c;`",
            ),
            (
                "WITH RECURSIVE x(v) AS (SELECT ?) REPLACE INTO t$1 SELECT v FROM x",
                1,
                "WITH RECURSIVE x(v) AS (SELECT ?) REPLACE INTO t$1 SELECT v FROM x",
            ),
            ("UPDATE t SET a = ?3", 3, "UPDATE t SET a = ?3"),
        ] {
            let statement = with_values(sql, values);
            assert_eq!(check(&statement), Ok(()), "{sql}");
            assert_eq!(statement.body(), body);
        }
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        for (sql, values, reason) in [
            ("", 0, "empty"),
            ("  -- only a comment", 0, "empty"),
            (
                "INSERT INTO t VALUES (1); DELETE FROM t",
                0,
                "more than one",
            ),
            ("INSERT INTO t VALUES (1);; ", 0, "more than one"),
            ("COMMIT", 0, "not COMMIT"),
            ("rollback", 0, "not ROLLBACK"),
            ("CREATE TABLE t (a)", 0, "not CREATE"),
            ("PRAGMA synchronous = OFF", 0, "not PRAGMA"),
            ("SELECT 1", 0, "not SELECT"),
            ("(INSERT INTO t VALUES (1))", 0, "not ("),
            ("WITH x AS (DELETE FROM t) SELECT 1", 0, "not SELECT"),
            ("WITH x(v) AS (VALUES (1)) VALUES (2)", 0, "not VALUES"),
            ("WITH x", 0, "not a WITH clause alone"),
            ("INSERT INTO t VALUES ('open)", 0, "' is not closed"),
            ("INSERT INTO \"t VALUES (1)", 0, "\" is not closed"),
            ("INSERT INTO [t VALUES (1)", 0, "[ is not closed"),
            (
                "INSERT INTO t VALUES (1) /* open",
                0,
                "comment is not closed",
            ),
            (
                "INSERT INTO t VALUES (:a)",
                1,
                "named parameters such as \":a\"",
            ),
            (
                "INSERT INTO t VALUES (@a)",
                1,
                "named parameters such as \"@a\"",
            ),
            (
                "INSERT INTO t VALUES ($a)",
                1,
                "named parameters such as \"$a\"",
            ),
            (
                "INSERT INTO t VALUES ($1a)",
                1,
                "named parameters such as \"$1a\"",
            ),
            ("INSERT INTO t VALUES (?0)", 1, "not between 1 and 32766"),
            (
                "INSERT INTO t VALUES (?99999999999999999999999)",
                1,
                "not between",
            ),
            (
                "INSERT INTO t VALUES (?, ?)",
                1,
                "2 parameters and 1 values",
            ),
            ("INSERT INTO t VALUES (?2)", 1, "2 parameters and 1 values"),
            ("INSERT INTO t VALUES (?)", 2, "1 parameters and 2 values"),
        ] {
            let error = check(&with_values(sql, values)).unwrap_err();
            assert!(error.reason.contains(reason), "{sql}: {}", error.reason);
            assert_eq!(error.sql, sql);
        }
    }
}
