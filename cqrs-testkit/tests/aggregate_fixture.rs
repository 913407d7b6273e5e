//! The aggregate fixture: passing expectations in both test styles, and failing ones with
//! the messages they must print.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::{Counter, CounterCommand, CounterError, CounterEvent, CounterState};
use cqrs_testkit::AggregateFixture;
use uuid::Uuid;

/// The panic message of `f`, which must panic.
fn panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

fn labelled(label: &str, tags: &[&str]) -> CounterEvent {
    CounterEvent::Labelled {
        label: label.to_owned(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
    }
}

// ---- passing, plain #[test] -----------------------------------------------------------

#[test]
fn events_state_and_result_in_a_plain_test() {
    let id = Uuid::new_v4();
    let fixture = AggregateFixture::<Counter>::new().with_aggregate_id(id);
    assert_eq!(fixture.aggregate_id(), id);
    let then = fixture
        .given([CounterEvent::Incremented { by: 3 }])
        .and([CounterEvent::Incremented { by: 2 }])
        .when_blocking(CounterCommand::Increment { by: 4 });
    then.then_expect_events([CounterEvent::Incremented { by: 4 }])
        .then_expect_state(CounterState {
            value: 9,
            label: None,
        })
        .then_verify_state(|state| assert_eq!(state.value, 9));
    assert_eq!(then.given_events().len(), 2);
    assert!(matches!(
        then.command(),
        CounterCommand::Increment { by: 4 }
    ));
    assert_eq!(then.state().value, 9);
    let events = then.into_result().unwrap();
    assert!(matches!(
        events.as_slice(),
        [CounterEvent::Incremented { by: 4 }]
    ));
}

#[test]
fn errors_in_a_plain_test() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 8 }])
        .when_blocking(CounterCommand::Increment { by: 3 })
        .then_expect_error(CounterError::TooBig { value: 8, by: 3 })
        .then_expect_error_message("too big: 8 + 3 > 10")
        .then_expect_error_matching(|e| matches!(e, CounterError::TooBig { value: 8, .. }))
        // The state is the given one: a refused command changes nothing.
        .then_expect_state(CounterState {
            value: 8,
            label: None,
        });
}

#[test]
fn no_previous_events_and_no_events() {
    let given = AggregateFixture::<Counter>::new().given_no_previous_events();
    assert_eq!(given.state().value, 0);
    given
        .when_blocking(CounterCommand::Reset)
        .then_expect_no_events()
        // An empty list works too, as do `Vec`s.
        .then_expect_events(vec![]);
    AggregateFixture::<Counter>::new()
        .given(vec![])
        .when_blocking(CounterCommand::Increment { by: 1 })
        .then_expect_events(vec![CounterEvent::Incremented { by: 1 }]);
}

// ---- passing, #[tokio::test] ----------------------------------------------------------

#[tokio::test]
async fn events_in_a_tokio_test() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 1 }])
        .when(CounterCommand::Label {
            label: "kitchen".into(),
            tags: vec!["a".into()],
        })
        .await
        .then_expect_events([labelled("kitchen", &["a"])])
        .then_expect_state(CounterState {
            value: 1,
            label: Some("kitchen".into()),
        });
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_in_a_multi_thread_tokio_test() {
    AggregateFixture::<Counter>::new()
        .given_no_previous_events()
        .when(CounterCommand::Increment { by: 11 })
        .await
        .then_expect_error_message("too big: 0 + 11 > 10");
}

#[tokio::test]
async fn when_blocking_inside_a_runtime_says_what_to_do() {
    let message = panic_message(|| {
        let _ = AggregateFixture::<Counter>::new()
            .given_no_previous_events()
            .when_blocking(CounterCommand::Reset);
    });
    assert!(
        message.contains("use `.when(..).await` there instead"),
        "{message}"
    );
}

// ---- failing: wrong event, wrong error, wrong state -----------------------------------

#[test]
#[should_panic(
    expected = "first difference: event #1 (CounterIncremented v1): at `$.Incremented.by`: expected 5, got 4"
)]
fn wrong_event_fails() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 3 }])
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_events([CounterEvent::Incremented { by: 5 }]);
}

#[test]
#[should_panic(
    expected = "first difference: event #1: expected a CounterReset v1, got a CounterIncremented v1"
)]
fn wrong_event_type_fails() {
    AggregateFixture::<Counter>::new()
        .given_no_previous_events()
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_events([CounterEvent::Reset]);
}

#[test]
#[should_panic(expected = "event #2 is missing")]
fn missing_event_fails() {
    AggregateFixture::<Counter>::new()
        .given_no_previous_events()
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_events([CounterEvent::Incremented { by: 4 }, CounterEvent::Reset]);
}

#[tokio::test]
#[should_panic(expected = "event #1 was not expected")]
async fn unexpected_event_fails() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 4 }])
        .when(CounterCommand::Reset)
        .await
        .then_expect_no_events();
}

#[test]
#[should_panic(expected = "expected events, but the command failed")]
fn error_where_events_were_expected_fails() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 9 }])
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_events([CounterEvent::Incremented { by: 4 }]);
}

#[test]
#[should_panic(
    expected = "the command failed with another error\n  expected error: too big: 8 + 4 > 10"
)]
fn wrong_error_fails() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 9 }])
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_error(CounterError::TooBig { value: 8, by: 4 });
}

#[test]
#[should_panic(
    expected = "expected message: \"too big\"\n  actual message:   \"too big: 9 + 4 > 10\""
)]
fn wrong_error_message_fails() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 9 }])
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_error_message("too big");
}

#[tokio::test]
#[should_panic(expected = "expected the command to fail with error too big: 0 + 4 > 10")]
async fn success_where_an_error_was_expected_fails() {
    AggregateFixture::<Counter>::new()
        .given_no_previous_events()
        .when(CounterCommand::Increment { by: 4 })
        .await
        .then_expect_error(CounterError::TooBig { value: 0, by: 4 });
}

#[test]
#[should_panic(expected = "the error does not match the predicate")]
fn error_not_matching_the_predicate_fails() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 9 }])
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_error_matching(|e| matches!(e, CounterError::Framework(_)));
}

#[test]
#[should_panic(expected = "the state differs\n  first difference: at `$.value`: expected 7, got 9")]
fn wrong_state_fails() {
    AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 5 }])
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_state(CounterState {
            value: 7,
            label: None,
        });
}

// ---- the whole message -----------------------------------------------------------------

#[test]
fn a_failure_shows_given_command_expected_and_actual() {
    let id = Uuid::new_v4();
    let message = panic_message(|| {
        let _ = AggregateFixture::<Counter>::new()
            .with_aggregate_id(id)
            .given([CounterEvent::Incremented { by: 2 }, labelled("old", &[])])
            .when_blocking(CounterCommand::Label {
                label: "new".into(),
                tags: vec!["x".into(), "y".into()],
            })
            .then_expect_events([labelled("new", &["x", "z"])]);
    });
    let expected = format!(
        "then_expect_events failed: the events differ
  first difference: event #1 (CounterLabelled v2): at `$.Labelled.tags[1]`: expected \"z\", got \"y\"
expected events:
    1. Labelled {{ label: \"new\", tags: [\"x\", \"z\"] }}
actual events:
    1. Labelled {{ label: \"new\", tags: [\"x\", \"y\"] }}
aggregate: counter {id}
given:
    1. Incremented {{ by: 2 }}
    2. Labelled {{ label: \"old\", tags: [] }}
when:
    Label {{ label: \"new\", tags: [\"x\", \"y\"] }}"
    );
    assert_eq!(message, expected);
}

#[test]
fn a_wrong_state_shows_both_states_and_what_happened() {
    let message = panic_message(|| {
        let _ = AggregateFixture::<Counter>::new()
            .given_no_previous_events()
            .when_blocking(CounterCommand::Label {
                label: "a".into(),
                tags: vec![],
            })
            .then_expect_state(CounterState {
                value: 0,
                label: Some("b".into()),
            });
    });
    assert!(
        message.starts_with(
            "then_expect_state failed: the state differs\n  first difference: at `$.label`: expected \"b\", got \"a\"\n"
        ),
        "{message}"
    );
    assert!(message.contains("  expected state: CounterState { value: 0, label: Some(\"b\") }\n  actual state:   CounterState { value: 0, label: Some(\"a\") }"), "{message}");
    assert!(
        message.contains("given:\n    (none)\nwhen:\n    Label"),
        "{message}"
    );
}

#[test]
#[should_panic(
    expected = "then_expect_events (eight plus four is too much) failed: expected events, but the command failed"
)]
fn a_description_heads_the_message() {
    AggregateFixture::<Counter>::new()
        .with_description("eight plus four is too much")
        .given([CounterEvent::Incremented { by: 8 }])
        .when_blocking(CounterCommand::Increment { by: 4 })
        .then_expect_events([CounterEvent::Incremented { by: 4 }]);
}
