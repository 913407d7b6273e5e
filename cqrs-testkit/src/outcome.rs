//! Assertions on a command's outcome, shared by the aggregate fixture and the scenario.

use std::fmt::{Debug, Display};

use cqrs::DomainEvent;

use crate::report;

/// Fails with `message`, then the context (given events, command), as every `then_*` does.
#[track_caller]
pub(crate) fn fail(method: &str, message: impl Display, context: &str) -> ! {
    panic!("{method} failed: {message}\n{context}")
}

#[track_caller]
pub(crate) fn expect_events<E, Err>(
    method: &str,
    context: &str,
    result: &Result<Vec<E>, Err>,
    expected: &[E],
) where
    E: DomainEvent,
    Err: Display + Debug,
{
    match result {
        Ok(actual) => {
            if let Some(difference) = report::first_event_difference(expected, actual) {
                fail(
                    method,
                    format_args!(
                        "the events differ\n  first difference: {difference}\n\
                         expected events:\n{}\nactual events:\n{}",
                        report::list(expected),
                        report::list(actual)
                    ),
                    context,
                );
            }
        }
        Err(error) => fail(
            method,
            format_args!(
                "expected events, but the command failed\n  error: {}\nexpected events:\n{}",
                report::error(error),
                report::list(expected)
            ),
            context,
        ),
    }
}

/// The error, or a failure saying that the command succeeded (and with which events).
#[track_caller]
pub(crate) fn expect_failure<'r, E, Err>(
    method: &str,
    context: &str,
    result: &'r Result<Vec<E>, Err>,
    expected: &dyn Display,
) -> &'r Err
where
    E: DomainEvent,
{
    match result {
        Err(error) => error,
        Ok(events) => fail(
            method,
            format_args!(
                "expected the command to fail with {expected}, but it succeeded\nactual events:\n{}",
                report::list(events)
            ),
            context,
        ),
    }
}

#[track_caller]
pub(crate) fn expect_error<E, Err>(
    method: &str,
    context: &str,
    result: &Result<Vec<E>, Err>,
    expected: &Err,
) where
    E: DomainEvent,
    Err: Display + Debug + PartialEq,
{
    let wanted = format!("error {}", report::error(expected));
    let actual = expect_failure(method, context, result, &wanted);
    if actual != expected {
        fail(
            method,
            format_args!(
                "the command failed with another error\n  expected error: {}\n  actual error:   {}",
                report::error(expected),
                report::error(actual)
            ),
            context,
        );
    }
}

#[track_caller]
pub(crate) fn expect_error_message<E, Err>(
    method: &str,
    context: &str,
    result: &Result<Vec<E>, Err>,
    expected: &str,
) where
    E: DomainEvent,
    Err: Display + Debug,
{
    let wanted = format!("the message {expected:?}");
    let actual = expect_failure(method, context, result, &wanted);
    let message = actual.to_string();
    if message != expected {
        fail(
            method,
            format_args!(
                "the command failed with another message\n  expected message: {expected:?}\n  actual message:   {message:?}\n  actual error:     {actual:?}"
            ),
            context,
        );
    }
}

#[track_caller]
pub(crate) fn expect_error_matching<E, Err>(
    method: &str,
    context: &str,
    result: &Result<Vec<E>, Err>,
    description: &str,
    predicate: impl FnOnce(&Err) -> bool,
) where
    E: DomainEvent,
    Err: Display + Debug,
{
    let wanted = format!("an error matching {description}");
    let actual = expect_failure(method, context, result, &wanted);
    if !predicate(actual) {
        fail(
            method,
            format_args!(
                "the error does not match {description}\n  actual error: {}",
                report::error(actual)
            ),
            context,
        );
    }
}
