//! Poison events: what a projection does with an event its view cannot apply.

use std::time::Duration;

/// What a projection does with a poison event: an event its view still refuses (or that does
/// not decode, or a row the store cannot read as an event, [`CQRSError::DamagedRow`](crate::CQRSError::DamagedRow)) after
/// the [`HandlerRetry`] attempts.
///
/// Chosen per projection with [`Projection::with_poison_policy`](crate::Projection::with_poison_policy).
/// Neither policy skips silently: `Stop` fails, `SkipAndRecord` writes a [`DeadLetter`](crate::DeadLetter) and
/// logs it with `tracing::error!`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PoisonPolicy {
    /// Stop the projection with the handler's error ([`CQRSError::ViewHandler`](crate::CQRSError::ViewHandler), naming the
    /// view, aggregate, sequence, position, event type and version). The events before the
    /// poison one are committed; the checkpoint stays just before it, so a restart (after a
    /// fix) resumes with that event.
    #[default]
    Stop,
    /// Record the event in the projection's [`DeadLetters`](crate::DeadLetters) sink, log it, and move the
    /// checkpoint past it. The view never sees the event; the dead letter says which one to
    /// repair or replay.
    SkipAndRecord,
}

/// How often a failing event is tried before the [`PoisonPolicy`] applies, and how long to
/// wait between tries (doubling from `initial_backoff` up to `max_backoff`).
///
/// ```
/// use std::time::Duration;
/// let retry = cqrs::HandlerRetry {
///     attempts: 5,
///     initial_backoff: Duration::from_millis(10),
///     max_backoff: Duration::from_secs(1),
/// };
/// assert_eq!(retry.backoff(1), Duration::from_millis(10));
/// assert_eq!(retry.backoff(3), Duration::from_millis(40));
/// assert_eq!(retry.backoff(30), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerRetry {
    /// Tries in all, the first one included (at least 1).
    pub attempts: u32,
    /// The wait before the second try.
    pub initial_backoff: Duration,
    /// The longest wait between two tries.
    pub max_backoff: Duration,
}

impl HandlerRetry {
    /// A single try: the policy applies at the first failure.
    pub const fn none() -> Self {
        HandlerRetry {
            attempts: 1,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        }
    }

    /// The wait after the `failures`-th failed try (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

impl Default for HandlerRetry {
    /// Three tries, waiting 100 ms then 200 ms (at most 5 s).
    fn default() -> Self {
        HandlerRetry {
            attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}
