//! The scenario fixture: the real framework on in-memory stores.

mod common;

use common::{
    AllCounters, Counter, CounterCommand, CounterError, CounterEvent, CounterState, CounterStats,
};
use cqrs::{MemorySnapshotRepository, SnapshotPolicy};
use cqrs_testkit::{Scenario, Stored};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn several_commands_on_several_aggregates() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let scenario = Scenario::<Counter>::new().given(a, [CounterEvent::Incremented { by: 1 }]);

    let first = scenario
        .when_with_metadata(
            a,
            CounterCommand::Increment { by: 2 },
            &json!({ "user": "alice" }),
        )
        .await;
    first
        .then_expect_events([CounterEvent::Incremented { by: 2 }])
        .then_expect_stored([Stored::event(&CounterEvent::Incremented { by: 2 })
            .at_sequence(2)
            .with_metadata(json!({ "user": "alice" }))]);
    assert_eq!(first.receipt().sequence, 2);
    assert_eq!(first.stored().len(), 1);

    scenario
        .when(b, CounterCommand::Increment { by: 11 })
        .await
        .then_expect_error(CounterError::TooBig { value: 0, by: 11 })
        .then_expect_error_message("too big: 0 + 11 > 10");
    scenario
        .when(
            b,
            CounterCommand::Label {
                label: "b".into(),
                tags: vec!["t".into()],
            },
        )
        .await
        .then_expect_stored([Stored::named("CounterLabelled", "2")
            .at_sequence(1)
            .with_payload(json!({ "Labelled": { "label": "b", "tags": ["t"] } }))
            .with_metadata(json!(null))]);
    scenario
        .when(b, CounterCommand::Reset)
        .await
        .then_expect_no_events();

    scenario
        .then_expect_stored(
            a,
            [
                Stored::named("CounterIncremented", "1")
                    .at_sequence(1)
                    .with_metadata(json!(null)),
                Stored::event(&CounterEvent::Incremented { by: 2 })
                    .with_metadata(json!({ "user": "alice" })),
            ],
        )
        .then_expect_events(
            a,
            [
                CounterEvent::Incremented { by: 1 },
                CounterEvent::Incremented { by: 2 },
            ],
        )
        .then_expect_state(
            a,
            CounterState {
                value: 3,
                label: None,
            },
        )
        .then_expect_state(
            b,
            CounterState {
                value: 0,
                label: Some("b".into()),
            },
        )
        .then_expect_view(
            a,
            CounterStats {
                increments: 2,
                total: 3,
            },
        )
        .then_expect_view(
            b,
            CounterStats {
                increments: 0,
                total: 0,
            },
        )
        .then_expect_view("all", AllCounters { events: 3 });

    let all = scenario.all_events();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(scenario.events(a).len(), 2);
    assert_eq!(scenario.stored_events(b).len(), 1);
    assert_eq!(scenario.state(a).value, 3);
    assert!(scenario.view::<CounterStats>(Uuid::new_v4()).is_none());
}

#[test]
fn plain_test_style() {
    let id = Uuid::new_v4();
    let scenario = Scenario::<Counter>::new();
    scenario
        .when_blocking(id, CounterCommand::Increment { by: 4 })
        .then_expect_events([CounterEvent::Incremented { by: 4 }]);
    scenario
        .when_with_metadata_blocking(id, CounterCommand::Increment { by: 1 }, &json!({ "n": 2 }))
        .then_expect_stored([Stored::any()
            .at_sequence(2)
            .with_metadata(json!({ "n": 2 }))]);
    scenario.then_expect_state(
        id,
        CounterState {
            value: 5,
            label: None,
        },
    );
}

#[test]
fn configure_and_share_a_store() {
    let snapshots = MemorySnapshotRepository::new();
    let id = Uuid::new_v4();
    let scenario = Scenario::<Counter>::new().configure(|framework| {
        framework.with_snapshots(snapshots.clone(), SnapshotPolicy::every(2))
    });
    for _ in 0..3 {
        let _ = scenario.when_blocking(id, CounterCommand::Increment { by: 1 });
    }
    scenario.then_expect_state(
        id,
        CounterState {
            value: 3,
            label: None,
        },
    );
    // A second scenario on the same store sees the same events.
    let other = Scenario::<Counter>::sharing_store(scenario.store().clone());
    assert_eq!(other.stored_events(id).len(), 3);
    // Snapshots were saved through the configured framework (at sequence 2).
    let snapshot = block_on(cqrs::SnapshotRepository::load_snapshot(
        &snapshots, "counter", id,
    ));
    assert_eq!(snapshot.map(|s| s.sequence), Some(2));
}

fn block_on<T>(future: impl std::future::Future<Output = Result<T, cqrs::CQRSError>>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
        .unwrap()
}

#[test]
#[should_panic(
    expected = "stored event #1 (sequence 1) differs: metadata at `$.user`: expected \"bob\", got \"alice\""
)]
fn wrong_metadata_fails() {
    let scenario = Scenario::<Counter>::new();
    scenario
        .when_with_metadata_blocking(
            Uuid::new_v4(),
            CounterCommand::Reset,
            &json!({ "user": "alice" }),
        )
        .then_expect_no_events();
    let id = Uuid::new_v4();
    let _ = scenario
        .when_with_metadata_blocking(
            id,
            CounterCommand::Increment { by: 1 },
            &json!({ "user": "alice" }),
        )
        .then_expect_stored([Stored::any().with_metadata(json!({ "user": "bob" }))]);
}

#[test]
#[should_panic(expected = "differs: sequence: expected 1, stored 2")]
fn wrong_sequence_fails() {
    let id = Uuid::new_v4();
    Scenario::<Counter>::new()
        .given(id, [CounterEvent::Reset])
        .when_blocking(id, CounterCommand::Increment { by: 1 })
        .then_expect_stored([Stored::any().at_sequence(1)]);
}

#[test]
#[should_panic(expected = "differs: event version: expected \"1\", stored \"2\"")]
fn wrong_version_fails() {
    let id = Uuid::new_v4();
    Scenario::<Counter>::new()
        .given(
            id,
            [CounterEvent::Labelled {
                label: "x".into(),
                tags: vec![],
            }],
        )
        .then_expect_stored(id, [Stored::named("CounterLabelled", "1")]);
}

#[test]
#[should_panic(expected = "expected 2 stored events, found 1")]
fn missing_stored_event_fails() {
    let id = Uuid::new_v4();
    Scenario::<Counter>::new()
        .given(id, [CounterEvent::Reset])
        .then_expect_stored(id, [Stored::any(), Stored::any()]);
}

#[test]
#[should_panic(
    expected = "first difference: event #2 (CounterIncremented v1): at `$.Incremented.by`: expected 3, got 2"
)]
fn wrong_history_fails() {
    let id = Uuid::new_v4();
    let scenario = Scenario::<Counter>::new().given(id, [CounterEvent::Incremented { by: 1 }]);
    let _ = scenario.when_blocking(id, CounterCommand::Increment { by: 2 });
    scenario.then_expect_events(
        id,
        [
            CounterEvent::Incremented { by: 1 },
            CounterEvent::Incremented { by: 3 },
        ],
    );
}

#[test]
#[should_panic(expected = "the command failed with another error")]
fn wrong_error_fails() {
    let id = Uuid::new_v4();
    let _ = Scenario::<Counter>::new()
        .given(id, [CounterEvent::Incremented { by: 9 }])
        .when_blocking(id, CounterCommand::Increment { by: 2 })
        .then_expect_error(CounterError::TooBig { value: 0, by: 2 });
}

#[test]
#[should_panic(expected = "the state differs\n  first difference: at `$.value`: expected 2, got 1")]
fn wrong_state_fails() {
    let id = Uuid::new_v4();
    Scenario::<Counter>::new()
        .given(id, [CounterEvent::Incremented { by: 1 }])
        .then_expect_state(
            id,
            CounterState {
                value: 2,
                label: None,
            },
        );
}

#[test]
#[should_panic(
    expected = "view \"all\" differs\n  first difference: at `$.events`: expected 5, got 1"
)]
fn wrong_view_fails() {
    Scenario::<Counter>::new()
        .given(Uuid::new_v4(), [CounterEvent::Incremented { by: 1 }])
        .then_expect_view("all", AllCounters { events: 5 });
}

#[test]
#[should_panic(expected = "no event concerned view")]
fn missing_view_fails() {
    Scenario::<Counter>::new().then_expect_view(Uuid::new_v4(), CounterStats::default());
}

#[test]
#[should_panic(
    expected = "the projection failed: view counter_stats failed on event CounterLabelled v2"
)]
fn a_refusing_view_fails() {
    let id = Uuid::new_v4();
    Scenario::<Counter>::new()
        .given(
            id,
            [CounterEvent::Labelled {
                label: "far too long a label".into(),
                tags: vec![],
            }],
        )
        .then_expect_view(id, CounterStats::default());
}

#[test]
fn a_scenario_failure_shows_the_history_and_the_command() {
    let id = Uuid::new_v4();
    let scenario = Scenario::<Counter>::new().given(id, [CounterEvent::Incremented { by: 1 }]);
    let dispatched = scenario.when_with_metadata_blocking(
        id,
        CounterCommand::Increment { by: 2 },
        &json!({ "user": "alice" }),
    );
    let payload = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dispatched.then_expect_events([CounterEvent::Incremented { by: 3 }]);
    }))
    .expect_err("must fail");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    let expected_tail = format!(
        "aggregate: counter {id}\nstored history before the command:\n    1. counter {id} #1 CounterIncremented v1: Incremented {{ by: 1 }}\nwhen:\n    Increment {{ by: 2 }}\n    metadata {{\"user\":\"alice\"}}"
    );
    assert!(message.ends_with(&expected_tail), "{message}");
    assert!(
        message.starts_with("then_expect_events failed: the events differ\n  first difference: event #1 (CounterIncremented v1): at `$.Incremented.by`: expected 3, got 2"),
        "{message}"
    );
}

#[test]
#[should_panic(
    expected = "then_expect_error_message (b is refused) failed: expected the command to fail"
)]
fn a_description_heads_the_scenario_messages() {
    let scenario = Scenario::<Counter>::new().with_description("b is refused");
    scenario
        .when_blocking(Uuid::new_v4(), CounterCommand::Increment { by: 1 })
        .then_expect_error_message("too big");
}

#[test]
#[should_panic(expected = "then_expect_state (the state of a) failed: the state differs")]
fn a_description_heads_the_scenario_state_message() {
    Scenario::<Counter>::new()
        .with_description("the state of a")
        .then_expect_state(
            Uuid::new_v4(),
            CounterState {
                value: 1,
                label: None,
            },
        );
}
