//! What the relay and the consumer add to the background runner of `cqrs` (the one behind
//! every handle there, so that theirs speak the same vocabulary).

use std::time::Duration;

pub(crate) use cqrs::__private::{backoff, Shared, Stop, Task};
use tokio::sync::watch;

/// Waits until a stop is asked, `wait` has passed, or (with `changes`) the store reports a
/// change; true when a stop was asked.
pub(crate) async fn pause(
    stop: &mut Stop,
    changes: &mut Option<watch::Receiver<i64>>,
    wait: Duration,
) -> bool {
    if stop.is_stopped() {
        return true;
    }
    let change = async {
        match changes.as_mut() {
            Some(rx) => {
                if let Ok(Err(_)) = tokio::time::timeout(wait, rx.changed()).await {
                    // The store is gone; poll from now on.
                    *changes = None;
                }
            }
            None => tokio::time::sleep(wait).await,
        }
    };
    let asked = tokio::select! {
        () = stop.stopped() => true,
        () = change => false,
    };
    asked || stop.is_stopped()
}
