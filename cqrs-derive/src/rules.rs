//! The documented rules for stored names, versions and table names.
//!
//! Each check returns the reason a value is refused, phrased for a compile error. The rules
//! are written out in `docs/adr/0002-derive-macros.md` and in the `cqrs` re-export docs.

/// Longest event or aggregate name accepted.
pub const MAX_NAME_LEN: usize = 128;
/// Longest view table name accepted: PostgreSQL truncates identifiers beyond 63 bytes.
pub const MAX_TABLE_LEN: usize = 63;

const EVENT_NAME_RULE: &str = "an event name starts with an ASCII letter and contains only \
     ASCII letters, digits, `_`, `-` and `.`, at most 128 characters";
const AGGREGATE_NAME_RULE: &str = "an aggregate name starts with an ASCII letter and contains \
     only ASCII letters, digits, `_` and `-`, at most 128 characters";
const EVENT_VERSION_RULE: &str = "a version is a whole number from 1 to 4294967295 written \
     in decimal without leading zeros, like \"1\" or \"2\"";
const TABLE_RULE: &str = "a table name starts with an ASCII letter or `_` and contains only \
     ASCII letters, digits and `_`, at most 63 characters";

/// What went wrong with an identifier: the first character that breaks the rule.
fn check_chars(
    what: &str,
    value: &str,
    max_len: usize,
    rule: &str,
    first_ok: impl Fn(char) -> bool,
    rest_ok: impl Fn(char) -> bool,
) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty; {rule}"));
    }
    if value.chars().count() > max_len {
        return Err(format!(
            "{what} is {} characters long, more than {max_len}; {rule}",
            value.chars().count()
        ));
    }
    for (index, c) in value.chars().enumerate() {
        let ok = if index == 0 { first_ok(c) } else { rest_ok(c) };
        if !ok {
            let shown = if c.is_whitespace() || c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            };
            let place = if index == 0 {
                "cannot start with".to_owned()
            } else {
                "cannot contain".to_owned()
            };
            return Err(format!(
                "`{value}` is not a valid {what}: it {place} `{shown}`; {rule}"
            ));
        }
    }
    Ok(())
}

/// An event's stored name (`PersistableDomainEvent::event_type`).
pub fn check_event_name(value: &str) -> Result<(), String> {
    check_chars(
        "event name",
        value,
        MAX_NAME_LEN,
        EVENT_NAME_RULE,
        |c| c.is_ascii_alphabetic(),
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'),
    )
}

/// An aggregate's stored type (`Aggregate::NAME`). No `:` (it separates the type from the id
/// in `aggregate_type_id`) and no `.` (a token separator in NATS subjects).
pub fn check_aggregate_name(value: &str) -> Result<(), String> {
    check_chars(
        "aggregate name",
        value,
        MAX_NAME_LEN,
        AGGREGATE_NAME_RULE,
        |c| c.is_ascii_alphabetic(),
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'),
    )
}

/// A view's table name: a plain SQL identifier, so stores can use it without quoting.
pub fn check_table_name(value: &str) -> Result<(), String> {
    check_chars(
        "table name",
        value,
        MAX_TABLE_LEN,
        TABLE_RULE,
        |c| c.is_ascii_alphabetic() || c == '_',
        |c| c.is_ascii_alphanumeric() || c == '_',
    )
}

/// An event's stored version (`PersistableDomainEvent::event_version`).
pub fn check_event_version(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!(
            "event version must not be empty; {EVENT_VERSION_RULE}"
        ));
    }
    let digits_only = value.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || value.starts_with('0') || value.parse::<u32>().is_err() {
        return Err(format!(
            "`{value}` is not a valid event version: {EVENT_VERSION_RULE}"
        ));
    }
    Ok(())
}

/// The default table name of a view: its type name in snake case (`BalanceView` ->
/// `balance_view`).
pub fn snake_case(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 4);
    let chars: Vec<char> = ident.chars().collect();
    for (index, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = index.checked_sub(1).and_then(|i| chars.get(i));
            let next = chars.get(index + 1);
            let boundary = match prev {
                None => false,
                Some(p) if *p == '_' => false,
                Some(p) if p.is_lowercase() || p.is_ascii_digit() => true,
                Some(_) => next.is_some_and(|n| n.is_lowercase()),
            };
            if boundary {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names() {
        assert!(check_event_name("AccountOpened").is_ok());
        assert!(check_event_name("bank.account-opened_v2").is_ok());
        assert!(check_event_name(&"a".repeat(128)).is_ok());
        assert!(check_event_name(&"a".repeat(129)).is_err());
        assert!(check_event_name("").is_err());
        assert!(check_event_name("1Opened").is_err());
        assert!(check_event_name("_Opened").is_err());
        assert!(check_event_name("Account Opened").is_err());
        assert!(check_event_name("Ünïcode").is_err());
        assert!(check_event_name("a:b").is_err());
    }

    #[test]
    fn aggregate_names() {
        assert!(check_aggregate_name("bank_account").is_ok());
        assert!(check_aggregate_name("bank-account2").is_ok());
        assert!(check_aggregate_name("bank.account").is_err());
        assert!(check_aggregate_name("bank:account").is_err());
        assert!(check_aggregate_name("").is_err());
    }

    #[test]
    fn versions() {
        for ok in ["1", "2", "10", "4294967295"] {
            assert!(check_event_version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "0",
            "01",
            "1.0",
            "v1",
            "-1",
            "+1",
            " 1",
            "4294967296",
            "１",
        ] {
            assert!(check_event_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tables() {
        assert!(check_table_name("account_balance").is_ok());
        assert!(check_table_name("_private").is_ok());
        assert!(check_table_name(&"t".repeat(63)).is_ok());
        assert!(check_table_name(&"t".repeat(64)).is_err());
        assert!(check_table_name("account-balance").is_err());
        assert!(check_table_name("1table").is_err());
        assert!(check_table_name("drop table;").is_err());
    }

    #[test]
    fn snake() {
        assert_eq!(snake_case("BalanceView"), "balance_view");
        assert_eq!(snake_case("HTTPLog"), "http_log");
        assert_eq!(snake_case("View2Go"), "view2_go");
        assert_eq!(snake_case("already_snake"), "already_snake");
        assert_eq!(snake_case("Total"), "total");
    }
}
