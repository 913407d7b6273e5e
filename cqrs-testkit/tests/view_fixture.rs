//! The view fixture.

mod common;

use common::{AllCounters, Counter, CounterError, CounterEvent, CounterStats};
use cqrs_testkit::{envelope, ViewFixture};
use uuid::Uuid;

fn labelled(label: &str) -> CounterEvent {
    CounterEvent::Labelled {
        label: label.to_owned(),
        tags: vec![],
    }
}

#[test]
fn applies_given_events_in_order() {
    let fixture = ViewFixture::<Counter, CounterStats>::new();
    let id = fixture.aggregate_id();
    let then = fixture.given([
        CounterEvent::Incremented { by: 2 },
        CounterEvent::Reset,
        CounterEvent::Incremented { by: 5 },
    ]);
    then.then_expect_view(CounterStats {
        increments: 2,
        total: 7,
    })
    .then_expect_view_for(
        &id.to_string(),
        CounterStats {
            increments: 2,
            total: 7,
        },
    )
    .then_verify_view(|view| assert_eq!(view.total, 7));
    assert_eq!(then.views().len(), 1);
    assert!(then.error().is_none());
}

#[test]
fn no_events_give_the_default_view() {
    ViewFixture::<Counter, CounterStats>::new()
        .given_no_events()
        .then_expect_view(CounterStats::default());
}

#[test]
fn envelopes_route_to_their_view_instances() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let then = ViewFixture::<Counter, CounterStats>::new().given_envelopes([
        envelope::<Counter>(a, 1, CounterEvent::Incremented { by: 1 }),
        envelope::<Counter>(b, 1, CounterEvent::Incremented { by: 9 }),
        envelope::<Counter>(a, 2, CounterEvent::Incremented { by: 2 }),
    ]);
    then.then_expect_view_for(
        &a.to_string(),
        CounterStats {
            increments: 2,
            total: 3,
        },
    )
    .then_expect_view_for(
        &b.to_string(),
        CounterStats {
            increments: 1,
            total: 9,
        },
    );
    // An instance no event concerned is the default.
    then.then_expect_view_for("nobody", CounterStats::default());
    assert!(then.view_for("nobody").is_none());
}

#[test]
fn a_custom_view_id_and_skipped_events() {
    ViewFixture::<Counter, AllCounters>::new()
        .given_envelopes([
            envelope::<Counter>(Uuid::new_v4(), 1, CounterEvent::Incremented { by: 1 }),
            envelope::<Counter>(Uuid::new_v4(), 1, CounterEvent::Reset),
            envelope::<Counter>(Uuid::new_v4(), 1, labelled("x")),
        ])
        .then_expect_view_for("all", AllCounters { events: 2 })
        .then_expect_view(AllCounters { events: 2 });
}

#[test]
fn a_refused_event_is_an_error() {
    let then = ViewFixture::<Counter, CounterStats>::new().given([
        CounterEvent::Incremented { by: 1 },
        labelled("much too long a label"),
        CounterEvent::Incremented { by: 1 },
    ]);
    then.then_expect_error(CounterError::Framework(
        "label too long: much too long a label".into(),
    ))
    .then_expect_error_message("framework: label too long: much too long a label");
    // It stopped at the refused event.
    assert_eq!(then.error().map(|(index, _)| index), Some(1));
    assert_eq!(then.view().increments, 1);
}

#[test]
#[should_panic(expected = "then_expect_view failed: view")]
fn wrong_view_fails() {
    ViewFixture::<Counter, CounterStats>::new()
        .given([CounterEvent::Incremented { by: 2 }])
        .then_expect_view(CounterStats {
            increments: 1,
            total: 3,
        });
}

#[test]
#[should_panic(expected = "differs\n  first difference: at `$.total`: expected 3, got 2")]
fn wrong_view_names_the_field() {
    ViewFixture::<Counter, CounterStats>::new()
        .given([CounterEvent::Incremented { by: 2 }])
        .then_expect_view(CounterStats {
            increments: 1,
            total: 3,
        });
}

#[test]
#[should_panic(expected = "handle_event failed on given event #2: framework: label too long")]
fn a_refused_event_fails_a_view_expectation() {
    ViewFixture::<Counter, CounterStats>::new()
        .given([
            CounterEvent::Incremented { by: 1 },
            labelled("much too long a label"),
        ])
        .then_expect_view(CounterStats {
            increments: 1,
            total: 1,
        });
}

#[test]
#[should_panic(expected = "expected handle_event to fail, but every given event was applied")]
fn missing_view_error_fails() {
    ViewFixture::<Counter, CounterStats>::new()
        .given([labelled("short")])
        .then_expect_error_message("label too long: short");
}

#[test]
#[should_panic(expected = "with another message\n  expected message: \"nope\"")]
fn wrong_view_error_fails() {
    ViewFixture::<Counter, CounterStats>::new()
        .given([labelled("much too long a label")])
        .then_expect_error_message("nope");
}

#[test]
#[should_panic(expected = "the events concern 2 view instances")]
fn several_instances_need_an_id() {
    ViewFixture::<Counter, CounterStats>::new()
        .given_envelopes([
            envelope::<Counter>(Uuid::new_v4(), 1, CounterEvent::Incremented { by: 1 }),
            envelope::<Counter>(Uuid::new_v4(), 1, CounterEvent::Incremented { by: 1 }),
        ])
        .then_expect_view(CounterStats::default());
}

#[test]
fn a_view_failure_lists_the_given_envelopes() {
    let id = Uuid::new_v4();
    let mut with_metadata = envelope::<Counter>(id, 1, CounterEvent::Incremented { by: 4 });
    with_metadata.metadata = serde_json::json!({ "user": "alice" });
    let payload = std::panic::catch_unwind(|| {
        ViewFixture::<Counter, CounterStats>::new()
            .given_envelopes([with_metadata.clone()])
            .then_expect_view(CounterStats::default());
    })
    .expect_err("must fail");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains(&format!(
            "view: counter_stats\ngiven:\n    1. counter {id} #1 (position 1): Incremented {{ by: 4 }} metadata {{\"user\":\"alice\"}}"
        )),
        "{message}"
    );
}

#[test]
#[should_panic(expected = "then_expect_view (stats count increments) failed: view")]
fn a_description_heads_the_view_message() {
    ViewFixture::<Counter, CounterStats>::new()
        .with_description("stats count increments")
        .given([CounterEvent::Incremented { by: 2 }])
        .then_expect_view(CounterStats::default());
}
