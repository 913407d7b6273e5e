//! Retrying a dispatch: the [`RetryPolicy`] a framework is given, and the decision after
//! each try of one dispatch ([`Attempts::next`]) that applies it.

use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use crate::error::CQRSError;

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
    fn backoff(&self, attempt: u32) -> Duration {
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

/// Where the state a try decided on came from, which says how far its answer is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Read from the store for this try: a conflict is a race this caller lost.
    Store,
    /// Taken from the state cache: another writer may have moved the aggregate on since, so
    /// a conflict, or a refusal that the stored sequence shows was decided on a stale
    /// state, reloads it once without spending an attempt.
    Cache,
    /// The empty state that `dispatch_new` assumes without a read: an answer that no append
    /// checked (a refusal, or no change) is checked by one read.
    Empty,
}

/// How one try (decide on a state, append the events) ended.
pub(super) enum Outcome<R, Err> {
    /// The events were appended; `R` is the receipt.
    Appended(R),
    /// The command caused no events: nothing was appended.
    Unchanged(R),
    /// The domain refused the command.
    Refused(Err),
    /// The append, or building it, failed. A [`CQRSError::Conflict`] may be retried.
    Failed(CQRSError),
}

/// What a dispatch does after a try.
pub(super) enum Next<C, R, Err> {
    /// The dispatch is over, with this result.
    Return(Result<R, Err>),
    /// Reload the state and try `command` again, after sleeping `backoff` if there is one
    /// (there is none when a stale cached state is reloaded: no race was lost).
    Retry {
        command: C,
        backoff: Option<Duration>,
    },
}

/// One dispatch's tries under a [`RetryPolicy`]: which attempt is under way, whether the
/// free reload of a stale cached state is still left, and when the time is up.
#[derive(Debug)]
pub(super) struct Attempts<'p> {
    policy: &'p RetryPolicy,
    /// The attempt under way, from 1. A free reload does not count.
    attempt: u32,
    /// A cached state found stale is reloaded once without spending an attempt.
    stale_reload_left: bool,
    /// When no new attempt starts, for a policy with a deadline.
    deadline: Option<Instant>,
}

impl<'p> Attempts<'p> {
    /// The first attempt of a dispatch that starts now. The clock is read only for a policy
    /// with a deadline.
    pub(super) fn start(policy: &'p RetryPolicy) -> Self {
        Attempts {
            policy,
            attempt: 1,
            stale_reload_left: true,
            deadline: policy.deadline.map(|time| Instant::now() + time),
        }
    }

    /// The attempt under way, from 1: the receipt's [`attempts`](super::DispatchReceipt::attempts).
    pub(super) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether another try may follow the one about to start on a state from `source`. If
    /// not, that try is the last: it can take the command itself instead of a copy, and its
    /// outcome is final.
    pub(super) fn may_retry(&self, source: Source) -> bool {
        self.stale_reload(source) || (self.attempt < self.policy.max_attempts && !self.time_is_up())
    }

    /// Whether `outcome`, decided on a state from `source`, stands only if the stream is
    /// still at that state's sequence, to be checked with one read: no append checked it,
    /// and the state may be behind the stream (the empty state of `dispatch_new`, or a cached
    /// state not yet reloaded). If the stream has moved on, the try is to be treated as the
    /// [`CQRSError::Conflict`] that an append would have met.
    pub(super) fn must_confirm<R, Err>(&self, outcome: &Outcome<R, Err>, source: Source) -> bool {
        match outcome {
            Outcome::Unchanged(_) => source == Source::Empty,
            Outcome::Refused(_) => source == Source::Empty || self.stale_reload(source),
            Outcome::Appended(_) | Outcome::Failed(_) => false,
        }
    }

    /// Retry or return after a try on a state from `source` ended in `outcome`. `command` is
    /// the command for another try: `None` when this try took it (its [`may_retry`] was
    /// false), which makes every outcome final.
    ///
    /// Only a conflict is retried: once without spending an attempt when the state came from
    /// the cache (it was stale, no race was lost), otherwise while the policy has attempts
    /// and time left, after a random backoff that does not sleep past the deadline. An
    /// answer from the empty state of `dispatch_new` is never retried: it starts with no
    /// attempt to spare, and its conflict would meet the same history again.
    ///
    /// [`may_retry`]: Attempts::may_retry
    pub(super) fn next<C, R, Err: From<CQRSError>>(
        &mut self,
        outcome: Outcome<R, Err>,
        source: Source,
        command: Option<C>,
    ) -> Next<C, R, Err> {
        let conflict = match outcome {
            Outcome::Appended(receipt) | Outcome::Unchanged(receipt) => {
                return Next::Return(Ok(receipt))
            }
            Outcome::Refused(refusal) => return Next::Return(Err(refusal)),
            Outcome::Failed(conflict @ CQRSError::Conflict { .. }) => conflict,
            Outcome::Failed(error) => return Next::Return(Err(error.into())),
        };
        let Some(command) = command else {
            return Next::Return(Err(conflict.into()));
        };
        if self.stale_reload(source) {
            self.stale_reload_left = false;
            return Next::Retry {
                command,
                backoff: None,
            };
        }
        let time_left = self.time_left();
        if self.attempt >= self.policy.max_attempts || time_left == Some(Duration::ZERO) {
            tracing::debug!(attempts = self.attempt, "conflict, giving up");
            return Next::Return(Err(conflict.into()));
        }
        let backoff = self.policy.backoff(self.attempt);
        self.attempt += 1;
        Next::Retry {
            command,
            backoff: Some(time_left.map_or(backoff, |left| backoff.min(left))),
        }
    }

    /// Whether a state from `source` is a cached one that may still be reloaded for free.
    fn stale_reload(&self, source: Source) -> bool {
        source == Source::Cache && self.stale_reload_left
    }

    fn time_is_up(&self) -> bool {
        self.time_left() == Some(Duration::ZERO)
    }

    /// The time until the deadline, if the policy has one (the clock is read only then).
    fn time_left(&self) -> Option<Duration> {
        self.deadline
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::{Attempts, Next, Outcome, RetryPolicy, Source};
    use crate::error::CQRSError;

    type TestOutcome = Outcome<(), CQRSError>;

    fn conflict() -> TestOutcome {
        Outcome::Failed(CQRSError::Conflict {
            aggregate_type: "thing".to_owned(),
            aggregate_id: Uuid::nil(),
            expected_sequence: 1,
        })
    }

    fn refused() -> TestOutcome {
        Outcome::Refused(CQRSError::InvalidAppend("refused".into()))
    }

    /// `Some(backoff)` for a retry, `None` for a return.
    fn retry(next: Next<&str, (), CQRSError>) -> Option<Option<Duration>> {
        match next {
            Next::Retry { command, backoff } => {
                assert_eq!(command, "command", "the retry gets the command back");
                Some(backoff)
            }
            Next::Return(_) => None,
        }
    }

    #[tokio::test]
    async fn a_conflict_is_retried_while_attempts_are_left_after_a_backoff() {
        let policy = RetryPolicy::attempts(3).with_backoff(Duration::ZERO, Duration::ZERO);
        let mut attempts = Attempts::start(&policy);
        for attempt in 1..3 {
            assert_eq!(attempts.attempt(), attempt);
            assert!(attempts.may_retry(Source::Store));
            let next = attempts.next(conflict(), Source::Store, Some("command"));
            assert_eq!(retry(next), Some(Some(Duration::ZERO)));
        }
        assert_eq!(attempts.attempt(), 3);
        assert!(
            !attempts.may_retry(Source::Store),
            "the third attempt is the last"
        );
        let next = attempts.next(conflict(), Source::Store, None::<&str>);
        assert!(matches!(
            next,
            Next::Return(Err(CQRSError::Conflict { .. }))
        ));
    }

    #[tokio::test]
    async fn a_stale_cached_state_is_reloaded_once_without_spending_an_attempt() {
        let policy = RetryPolicy::none();
        let mut attempts = Attempts::start(&policy);
        assert!(attempts.may_retry(Source::Cache));
        assert!(!attempts.may_retry(Source::Store));
        let next = attempts.next(conflict(), Source::Cache, Some("command"));
        assert_eq!(retry(next), Some(None), "a free reload does not sleep");
        assert_eq!(attempts.attempt(), 1);
        // The free reload is spent: a cached state from a concurrent dispatch gets none.
        assert!(!attempts.may_retry(Source::Cache));
        assert!(!attempts.must_confirm(&refused(), Source::Cache));
    }

    #[tokio::test]
    async fn only_unchecked_answers_on_a_state_that_may_be_behind_are_confirmed() {
        let policy = RetryPolicy::attempts(5);
        let attempts = Attempts::start(&policy);
        let unchanged = || TestOutcome::Unchanged(());
        assert!(attempts.must_confirm(&refused(), Source::Empty));
        assert!(attempts.must_confirm(&unchanged(), Source::Empty));
        assert!(attempts.must_confirm(&refused(), Source::Cache));
        assert!(!attempts.must_confirm(&unchanged(), Source::Cache));
        assert!(!attempts.must_confirm(&refused(), Source::Store));
        assert!(!attempts.must_confirm(&unchanged(), Source::Store));
        assert!(!attempts.must_confirm(&TestOutcome::Appended(()), Source::Empty));
        assert!(!attempts.must_confirm(&conflict(), Source::Empty));
    }

    #[tokio::test]
    async fn a_refusal_or_another_failure_is_never_retried() {
        let policy = RetryPolicy::attempts(5);
        let mut attempts = Attempts::start(&policy);
        let next = attempts.next(refused(), Source::Cache, Some("command"));
        assert_eq!(retry(next), None);
        let failure = Outcome::Failed(CQRSError::Timeout(Duration::from_secs(1)));
        assert_eq!(
            retry(attempts.next(failure, Source::Store, Some("command"))),
            None
        );
        assert_eq!(attempts.attempt(), 1);
    }

    #[tokio::test]
    async fn an_attempt_that_starts_when_the_time_is_up_is_the_last() {
        let policy = RetryPolicy::within(Duration::ZERO);
        let mut attempts = Attempts::start(&policy);
        assert!(!attempts.may_retry(Source::Store));
        // A stale cached state is still reloaded: no attempt is spent on it.
        assert!(attempts.may_retry(Source::Cache));
        assert_eq!(
            retry(attempts.next(conflict(), Source::Cache, Some("command"))),
            Some(None)
        );
        let next = attempts.next(conflict(), Source::Store, None::<&str>);
        assert!(matches!(
            next,
            Next::Return(Err(CQRSError::Conflict { .. }))
        ));
    }

    #[tokio::test]
    async fn the_empty_state_of_dispatch_new_is_never_retried() {
        // `dispatch_new` runs with no retry, whatever the framework's policy.
        let mut attempts = Attempts::start(&super::super::NO_RETRY);
        assert!(!attempts.may_retry(Source::Empty));
        let next = attempts.next(conflict(), Source::Empty, None::<&str>);
        assert!(matches!(
            next,
            Next::Return(Err(CQRSError::Conflict { .. }))
        ));
    }
}
