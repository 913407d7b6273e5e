//! Retrying a dispatch that lost a race: the [`RetryPolicy`].

use std::time::Duration;

use uuid::Uuid;

/// What to do when an append loses the race to another writer.
///
/// By default ([`RetryPolicy::none`]) the conflict is returned to the caller as
/// [`CQRSError::Conflict`]. With [`RetryPolicy::attempts`] the framework reloads the
/// aggregate, runs the command again on the fresh state and appends again, up to the given
/// number of attempts in all, sleeping a short random backoff between attempts. With
/// [`RetryPolicy::within`] it keeps trying until the command succeeds, the domain refuses it,
/// or the time is up: the form to use when "until it succeeds" is meant and the number of
/// attempts would be a guess.
///
/// Only a lost race is retried. A refusal by the domain and every other error return at once.
///
/// ```
/// use std::time::Duration;
/// let policy = cqrs::RetryPolicy::attempts(10).with_backoff(Duration::from_micros(200), Duration::from_millis(20));
/// assert_eq!(policy.max_attempts(), 10);
///
/// // As many attempts as fit in half a second.
/// let patient = cqrs::RetryPolicy::within(Duration::from_millis(500));
/// assert_eq!(patient.deadline(), Some(Duration::from_millis(500)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    deadline: Option<Duration>,
    base_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::none()
    }
}

impl RetryPolicy {
    /// No retry: a conflict is returned to the caller.
    pub const fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            deadline: None,
            base_backoff: Duration::from_micros(100),
            max_backoff: Duration::from_millis(50),
        }
    }

    /// Up to `max_attempts` attempts in all (at least 1), with the default backoff (random,
    /// from 100 µs doubling up to 50 ms).
    pub const fn attempts(max_attempts: u32) -> Self {
        let mut policy = Self::none();
        policy.max_attempts = if max_attempts == 0 { 1 } else { max_attempts };
        policy
    }

    /// Attempts until one succeeds or is refused by the domain, for as long as `time` allows:
    /// no backoff sleeps past `time` (counted from the dispatch's start), the attempt that
    /// starts when it is up is the last, and its conflict is returned. At least one attempt
    /// is always made. Combine with [`with_backoff`](RetryPolicy::with_backoff) to tune the
    /// sleeps between attempts.
    pub const fn within(time: Duration) -> Self {
        let mut policy = Self::none();
        policy.max_attempts = u32::MAX;
        policy.deadline = Some(time);
        policy
    }

    /// Sets the backoff: attempt `n` sleeps a random time up to `base * 2^n`, capped at `max`.
    pub const fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base_backoff = base;
        self.max_backoff = max;
        self
    }

    /// The number of attempts in all (`u32::MAX` for [`within`](RetryPolicy::within)).
    pub const fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The time after which no new attempt starts, if the policy has one.
    pub const fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The sleep after attempt `attempt` lost a race.
    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        // Full jitter: uniform in [0, ceiling]. A v4 UUID is 122 random bits, plenty here.
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        let random = (Uuid::new_v4().as_u128() & u128::from(u64::MAX)) as u64;
        Duration::from_nanos(random % (nanos + 1))
    }
}
