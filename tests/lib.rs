//! Support shared by the cross-crate integration tests in `tests/`.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// The value of the environment variable `var` naming a server for a test suite, or `None`
/// when it is unset or empty.
///
/// When it is unset, says once per suite and process, on the real standard error (past the
/// test harness's output capture, so a plain `cargo test` shows it), which suite is skipped
/// and how to enable it.
///
/// ```
/// let url = cqrs_tests::server_url("CQRS_DOC_EXAMPLE_UNSET", "example", "x://y");
/// assert!(url.is_none());
/// ```
pub fn server_url(var: &str, suite: &str, example: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ => {
            static SAID: Mutex<Option<HashSet<String>>> = Mutex::new(None);
            let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
            if said
                .get_or_insert_with(HashSet::new)
                .insert(suite.to_owned())
            {
                // `eprintln!` is captured by libtest; a direct write is not.
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "note: skipping the {suite} suite: set {var}={example} to run it"
                );
            }
            None
        }
    }
}

/// JSON that a text-based store path could get wrong: escapes, non-ASCII, numbers at the
/// edges of their types, deep nesting, a payload large enough to be stored out of line, and
/// values that are not objects. The SQL stores' round-trip tests append these as payloads.
pub fn awkward_payloads() -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!({ "Added": { "by": 1 } }),
        json!({ "quote": "say \"hi\"\n\ttab \\ backslash", "unicode": "Zürich 東京 🚀" }),
        json!({ "big": u64::MAX, "negative": i64::MIN, "float": 0.1, "exp": 1e21, "small": -0.25 }),
        json!([[[[[[[[1, [2, [3, { "deep": null }]]]]]]]]]]),
        json!({ "long": "x".repeat(200_000) }),
        json!("just a string"),
        json!(null),
    ]
}

/// Appends one event per [`awkward_payloads`] entry to `store`, on the aggregate of
/// `template` (sequences from 1, fresh ids, each with its own metadata), and checks that
/// `read_all` and `load_events` give every one back with the same payload and metadata as
/// JSON, the same ids and key, and the timestamp to the microsecond. Returns what
/// `read_all` read.
///
/// # Panics
/// When the store loses or changes anything: it is a test's assertion.
pub async fn check_awkward_payloads(
    store: &dyn cqrs::EventRepository,
    template: &cqrs::PersistableDomainEvent,
) -> Vec<cqrs::PersistableDomainEvent> {
    let payloads = awkward_payloads();
    let events: Vec<cqrs::PersistableDomainEvent> = payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| {
            let mut event = template.clone();
            event.event_id = uuid::Uuid::new_v4();
            event.sequence = i as i64 + 1;
            event.payload = payload.into();
            event.metadata = serde_json::json!({ "n": i, "who": "tëst \"x\"" });
            event
        })
        .collect();
    store.append(events.clone()).await.unwrap();
    let read = store.read_all(0, 100).await.unwrap();
    let loaded = store
        .load_events(&template.aggregate_type, template.aggregate_id, 0)
        .await
        .unwrap();
    for stored in [&read, &loaded] {
        assert_eq!(stored.len(), payloads.len());
        for ((got, sent), payload) in stored.iter().zip(&events).zip(&payloads) {
            assert_eq!(
                got.payload, *payload,
                "payload of sequence {}",
                got.sequence
            );
            assert_eq!(got.metadata, sent.metadata);
            assert_eq!(got.event_id, sent.event_id);
            assert_eq!(got.aggregate_type_id, sent.aggregate_type_id);
            assert_eq!(
                got.timestamp.timestamp_micros(),
                sent.timestamp.timestamp_micros()
            );
        }
    }
    read
}
