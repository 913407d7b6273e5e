//! How fixtures describe events, states and their differences in failure messages.

use std::fmt::{Debug, Write as _};

use cqrs::DomainEvent;
use serde::Serialize;
use serde_json::Value;

/// A value's JSON form, or a note saying why it has none (a failure message must still be
/// printed when a `Serialize` impl fails).
pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> Value {
    serde_json::to_value(value)
        .unwrap_or_else(|error| Value::String(format!("<does not serialize: {error}>")))
}

/// The first place where two JSON values differ, as `at `path`: expected X, got Y`.
pub(crate) fn first_json_difference(expected: &Value, actual: &Value) -> Option<String> {
    let mut path = String::from("$");
    walk(&mut path, expected, actual)
}

fn walk(path: &mut String, expected: &Value, actual: &Value) -> Option<String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, e_value) in e {
                let len = path.len();
                let _ = write!(path, ".{key}");
                let found = match a.get(key) {
                    None => Some(format!(
                        "at `{path}`: expected {e_value}, but the field is missing"
                    )),
                    Some(a_value) => walk(path, e_value, a_value),
                };
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            a.iter()
                .find(|(key, _)| !e.contains_key(*key))
                .map(|(key, value)| {
                    format!("at `{path}.{key}`: unexpected field with value {value}")
                })
        }
        (Value::Array(e), Value::Array(a)) => {
            for (i, (e_item, a_item)) in e.iter().zip(a).enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                let found = walk(path, e_item, a_item);
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            (e.len() != a.len()).then(|| {
                format!(
                    "at `{path}`: expected {} elements, got {}",
                    e.len(),
                    a.len()
                )
            })
        }
        _ if expected == actual => None,
        _ => Some(format!("at `{path}`: expected {expected}, got {actual}")),
    }
}

/// `Name v1 {json}`: an event as it would be stored.
fn stored_form<E: DomainEvent>(event: &E) -> String {
    format!(
        "{} v{}",
        event.persisted_event_name(),
        event.persisted_event_version()
    )
}

/// The first difference between two event lists, compared by their stored form (name,
/// version, JSON payload), or `None` when they are the same.
pub(crate) fn first_event_difference<E: DomainEvent>(
    expected: &[E],
    actual: &[E],
) -> Option<String> {
    for i in 0..expected.len().max(actual.len()) {
        let n = i + 1;
        match (expected.get(i), actual.get(i)) {
            (Some(e), Some(a)) => {
                if e.persisted_event_name() != a.persisted_event_name()
                    || e.persisted_event_version() != a.persisted_event_version()
                {
                    return Some(format!(
                        "event #{n}: expected a {}, got a {}",
                        stored_form(e),
                        stored_form(a)
                    ));
                }
                if let Some(diff) = first_json_difference(&to_json(e), &to_json(a)) {
                    return Some(format!("event #{n} ({}): {diff}", stored_form(e)));
                }
            }
            (Some(e), None) => {
                return Some(format!(
                    "event #{n} is missing: expected {e:?}, but only {} event{} came out",
                    actual.len(),
                    if actual.len() == 1 { "" } else { "s" }
                ))
            }
            (None, Some(a)) => {
                return Some(format!(
                    "event #{n} was not expected: {a:?} (expected {} event{})",
                    expected.len(),
                    if expected.len() == 1 { "" } else { "s" }
                ))
            }
            (None, None) => {}
        }
    }
    None
}

/// A numbered list, one item per line, or `(none)`.
pub(crate) fn list<T: Debug>(items: &[T]) -> String {
    if items.is_empty() {
        return "    (none)".to_owned();
    }
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = write!(out, "    {}. {item:?}", i + 1);
    }
    out
}

/// An error with its `Display` and `Debug` forms.
pub(crate) fn error<E: std::fmt::Display + Debug>(error: &E) -> String {
    format!("{error} ({error:?})")
}

#[cfg(test)]
mod tests {
    use super::first_json_difference;
    use serde_json::json;

    #[test]
    fn names_the_first_differing_path() {
        let e = json!({"Withdrawn": {"amount": 50, "note": ["a", "b"]}});
        let a = json!({"Withdrawn": {"amount": 500, "note": ["a", "c"]}});
        assert_eq!(
            first_json_difference(&e, &a).as_deref(),
            Some("at `$.Withdrawn.amount`: expected 50, got 500")
        );
    }

    #[test]
    fn reports_missing_extra_and_length() {
        assert_eq!(
            first_json_difference(&json!({"a": 1}), &json!({})).as_deref(),
            Some("at `$.a`: expected 1, but the field is missing")
        );
        assert_eq!(
            first_json_difference(&json!({}), &json!({"b": true})).as_deref(),
            Some("at `$.b`: unexpected field with value true")
        );
        assert_eq!(
            first_json_difference(&json!([1]), &json!([1, 2])).as_deref(),
            Some("at `$`: expected 1 elements, got 2")
        );
        assert_eq!(
            first_json_difference(
                &json!({"x": [1, {"y": "z"}]}),
                &json!({"x": [1, {"y": "z"}]})
            ),
            None
        );
    }
}
