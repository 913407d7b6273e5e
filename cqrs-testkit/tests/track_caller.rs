//! A failing `then_*` reports the test's own line, not a line inside the testkit.
//!
//! Alone in its binary because it installs a panic hook (process-wide).

mod common;

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use common::{Counter, CounterCommand, CounterEvent, CounterStats};
use cqrs_testkit::{AggregateFixture, Scenario, ViewFixture};
use uuid::Uuid;

/// The file and line where `f` panicked.
fn panic_location(f: impl FnOnce()) -> (String, u32) {
    let seen = Arc::new(Mutex::new(None));
    let hook_seen = Arc::clone(&seen);
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if let Some(location) = info.location() {
            *hook_seen.lock().unwrap() = Some((location.file().to_owned(), location.line()));
        }
    }));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(previous);
    assert!(result.is_err(), "expected a panic");
    let location = seen.lock().unwrap().clone();
    location.expect("the panic had a location")
}

#[test]
fn failures_point_at_the_calling_line() {
    let then = AggregateFixture::<Counter>::new()
        .given([CounterEvent::Incremented { by: 1 }])
        .when_blocking(CounterCommand::Increment { by: 2 });

    let (file, line) = panic_location(|| {
        then.then_expect_events([CounterEvent::Reset]);
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));

    let (file, line) = panic_location(|| {
        then.then_expect_error_message("nope");
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));

    let (file, line) = panic_location(|| {
        then.then_expect_state(Default::default());
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));

    let view = ViewFixture::<Counter, CounterStats>::new().given([CounterEvent::Reset]);
    let (file, line) = panic_location(|| {
        view.then_expect_view(CounterStats {
            increments: 1,
            total: 0,
        });
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 5));

    let scenario = Scenario::<Counter>::new();
    let id = Uuid::new_v4();
    let (file, line) = panic_location(|| {
        scenario.then_expect_events(id, [CounterEvent::Reset]);
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));

    let (file, line) = panic_location(|| {
        let _ = scenario
            .when_blocking(id, CounterCommand::Reset)
            .then_expect_events([CounterEvent::Reset]);
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));
}
