//! Running a fixture's future from a plain `#[test]`.

use std::future::Future;

/// Runs `future` to completion on a new current-thread Tokio runtime (with time and I/O
/// enabled), for the `*_blocking` methods of the fixtures.
///
/// It refuses, with a panic that says what to do instead, when the calling thread is already
/// inside a Tokio runtime (for example in a `#[tokio::test]`): blocking there would start a
/// runtime inside a runtime, or stall the one that is running. Use the `async` method and
/// `.await` it there.
#[track_caller]
pub(crate) fn block_on<F: Future>(method: &str, future: F) -> F::Output {
    if tokio::runtime::Handle::try_current().is_ok() {
        panic!(
            "`{method}_blocking` was called inside a Tokio runtime (e.g. a #[tokio::test]); \
             use `.{method}(..).await` there instead. `{method}_blocking` is for plain #[test] functions."
        );
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(future),
        Err(error) => panic!("could not build a Tokio runtime for `{method}_blocking`: {error}"),
    }
}

/// Completes `future` by polling it once: for the in-memory stores, whose operations never
/// wait. This is what lets the scenario's assertions be plain functions, usable from both
/// `#[test]` and `#[tokio::test]`.
///
/// # Panics
/// If the future is not ready at once (it waits on I/O, a timer or another task).
#[track_caller]
pub(crate) fn ready<F: Future>(what: &str, future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => {
            panic!("{what}: the in-memory store was expected to answer at once, but it waited")
        }
    }
}
