//! One set of poison, retry and crash cases, run against both sources of the projection
//! engine: the store-fed `Projection` and the JetStream-fed `NatsProjection` (events
//! published by a `NatsRelay`). Each case is written once, for a `Source`, and run for each.
//!
//! The events and the views live in one SQLite file, with the dead-letter sink on the same
//! database, so `SkipAndRecord` records exactly once. The NATS cases run when
//! `CQRS_NATS_URL` is set (e.g. `nats://127.0.0.1:4222`), each on a stream of its own.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use cqrs::{
    CQRSError, CQRSFramework, DeadLetter, EventEnvelope, HandlerRetry, MemoryCheckpointRepository,
    NatsProjection, NatsRelay, PoisonPolicy, Projection, ProjectionHandle, SqliteDeadLetters,
    SqliteEventRepository, SqliteViewRepository, View, ViewRepository,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod common;

use common::ledger::{Ledger, LedgerError, LedgerEvent};
use common::lost_commit::LostCommitAnswer;
use common::nats::{connect, nats_url, TestStream};

// ---------------------------------------------------------------------------------------
// The view: refuses an event it has already seen, and the events a test marks as failing.

/// Per event (aggregate id, sequence): how many more times it is refused (`u32::MAX`:
/// always), and how many times it was refused.
static FAILING: Mutex<Option<Failing>> = Mutex::new(None);

/// (aggregate id, sequence) → (refusals left, refusals made).
type Failing = HashMap<(Uuid, i64), (u32, u32)>;

fn failing<T>(f: impl FnOnce(&mut Failing) -> T) -> T {
    f(FAILING
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new))
}

/// Refuses the event `times` more times.
fn fail(id: Uuid, sequence: i64, times: u32) {
    failing(|map| map.entry((id, sequence)).or_default().0 = times);
}

/// True (and one failure spent) when the event is to be refused now.
fn refuse(id: Uuid, sequence: i64) -> bool {
    failing(|map| match map.get_mut(&(id, sequence)) {
        Some((left, refused)) if *left > 0 => {
            if *left != u32::MAX {
                *left -= 1;
            }
            *refused += 1;
            true
        }
        _ => false,
    })
}

/// How many times the event was refused.
fn refusals(id: Uuid, sequence: i64) -> u32 {
    failing(|map| map.get(&(id, sequence)).map_or(0, |(_, refused)| *refused))
}

/// Refuses an event it was handed before (by position), so applying one twice fails.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Balance {
    sum: u64,
    deposits: u64,
    last_position: i64,
}

impl View<Ledger> for Balance {
    const TABLE_NAME: &'static str = "source_balances";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        if refuse(envelope.aggregate_id, envelope.sequence) {
            let LedgerEvent::Deposited { amount } = envelope.event;
            return Err(LedgerError::Unlucky(amount));
        }
        if envelope.position <= self.last_position {
            return Err(LedgerError::OutOfOrder {
                last: self.last_position,
                got: envelope.position,
            });
        }
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.sum += amount;
        self.deposits += 1;
        self.last_position = envelope.position;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The two sources.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Store,
    Nats,
}

/// The store, the views' database, and for `Nats` a stream and a relay filling it.
struct Fixture {
    source: Source,
    path: PathBuf,
    store: SqliteEventRepository,
    nats: Option<(cqrs::async_nats::jetstream::Context, TestStream, NatsRelay)>,
}

impl Fixture {
    /// `None` when the source's server is not configured (the skip is reported).
    async fn new(source: Source) -> Option<Self> {
        let path = std::env::temp_dir().join(format!("cqrs-sources-{}.sqlite", Uuid::new_v4()));
        let store = SqliteEventRepository::open(&path).await.unwrap();
        let nats = match source {
            Source::Store => None,
            Source::Nats => {
                let url = nats_url()?;
                let jetstream = connect(&url).await;
                let stream = TestStream::new(&url);
                let relay = NatsRelay::new(
                    store.clone(),
                    MemoryCheckpointRepository::new(),
                    jetstream.clone(),
                    stream.config.clone(),
                );
                relay.ensure_stream().await.unwrap();
                Some((jetstream, stream, relay))
            }
        };
        Some(Fixture {
            source,
            path,
            store,
            nats,
        })
    }

    /// Appends one deposit per amount to ledger `id` (sequences from 1), and for `Nats`
    /// relays them to the stream. Returns the events' positions.
    async fn deposit(&self, id: Uuid, amounts: Vec<u64>) -> Vec<i64> {
        let framework = CQRSFramework::<Ledger>::new(self.store.clone());
        let receipt = framework.dispatch(id, amounts).await.unwrap();
        let positions = receipt.positions;
        if let Some((_, _, relay)) = &self.nats {
            relay.catch_up().await.unwrap();
        }
        positions
    }

    fn views(&self) -> SqliteViewRepository<Balance> {
        self.store.views()
    }

    fn sink(&self) -> SqliteDeadLetters {
        SqliteDeadLetters::new(&self.store)
    }

    /// A projection of `Balance` from this fixture's source into `views`, under the given
    /// policy and retry, dead letters in the views' database. `consumer` names the durable
    /// consumer of a NATS projection (two projectors of one view need two).
    fn projection(
        &self,
        views: impl ViewRepository<Ledger, Balance> + 'static,
        policy: PoisonPolicy,
        retry: HandlerRetry,
        batch_size: usize,
        consumer: &str,
    ) -> Feed {
        match &self.nats {
            None => Feed::Store(
                Projection::new(self.store.clone(), views)
                    .with_poison_policy(policy)
                    .with_handler_retry(retry)
                    .with_dead_letters(self.sink())
                    .with_batch_size(batch_size),
            ),
            Some((jetstream, stream, _)) => Feed::Nats(Box::new(
                NatsProjection::new(jetstream.clone(), stream.config.clone(), views)
                    .with_durable_name(format!("{consumer}_{}", Uuid::new_v4().simple()))
                    .with_poison_policy(policy)
                    .with_handler_retry(retry)
                    .with_dead_letters(self.sink())
                    .with_batch_size(batch_size)
                    .with_fetch_wait(Duration::from_millis(100)),
            )),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

/// A projection fed by either source, through what both offer.
enum Feed {
    Store(Projection<Ledger, Balance>),
    Nats(Box<NatsProjection<Ledger, Balance>>),
}

impl Feed {
    async fn catch_up(&self) -> Result<i64, CQRSError> {
        match self {
            Feed::Store(projection) => projection.catch_up().await,
            Feed::Nats(projection) => projection.catch_up().await,
        }
    }

    async fn wait_for(&self, position: i64, timeout: Duration) -> Result<i64, CQRSError> {
        match self {
            Feed::Store(projection) => projection.wait_for(position, timeout).await,
            Feed::Nats(projection) => projection.wait_for(position, timeout).await,
        }
    }

    async fn position(&self) -> i64 {
        match self {
            Feed::Store(projection) => projection.position().await,
            Feed::Nats(projection) => projection.position().await,
        }
        .unwrap()
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        match self {
            Feed::Store(projection) => projection.dead_letters().await,
            Feed::Nats(projection) => projection.dead_letters().await,
        }
        .unwrap()
    }

    fn start(self) -> ProjectionHandle {
        match self {
            Feed::Store(projection) => projection.start(),
            Feed::Nats(projection) => (*projection).start(),
        }
    }
}

fn retry(attempts: u32, backoff: Duration) -> HandlerRetry {
    HandlerRetry {
        attempts,
        initial_backoff: backoff,
        max_backoff: backoff,
    }
}

async fn balance(fixture: &Fixture, id: Uuid) -> Option<Balance> {
    ViewRepository::<Ledger, Balance>::load(&fixture.views(), &id.to_string())
        .await
        .unwrap()
}

/// Runs `case` for the store-fed source, and for the JetStream-fed one when configured.
macro_rules! for_both_sources {
    ($($case:ident),* $(,)?) => {
        mod store_fed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(fixture) = super::Fixture::new(super::Source::Store).await {
                        super::$case(fixture).await;
                    }
                }
            )*
        }
        mod nats_fed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(fixture) = super::Fixture::new(super::Source::Nats).await {
                        super::$case(fixture).await;
                    }
                }
            )*
        }
    };
}

for_both_sources!(
    a_poison_event_stops_the_projection_just_before_it,
    a_poison_event_is_skipped_and_recorded_exactly_once,
    a_failing_handler_is_retried_before_the_policy_applies,
    a_stop_request_ends_the_wait_between_retries,
    a_commit_whose_answer_was_lost_is_not_applied_again,
    two_projectors_of_one_view_apply_each_event_once,
    wait_for_applies_the_events_that_arrive_while_it_waits,
);

// ---------------------------------------------------------------------------------------
// The cases.

async fn a_poison_event_stops_the_projection_just_before_it(fixture: Fixture) {
    let id = Uuid::new_v4();
    fail(id, 3, u32::MAX);
    let positions = fixture.deposit(id, vec![1, 2, 3, 4, 5]).await;
    let projection = fixture.projection(
        fixture.views(),
        PoisonPolicy::Stop,
        retry(2, Duration::from_millis(1)),
        100,
        "stop",
    );

    let error = projection.catch_up().await.unwrap_err();
    match &error {
        CQRSError::ViewHandler(handler) => {
            assert_eq!(handler.aggregate_id, id);
            assert_eq!(handler.sequence, 3);
            assert_eq!(handler.position, positions[2]);
        }
        other => panic!("{:?}: expected ViewHandler, got {other:?}", fixture.source),
    }
    // The events before it are committed; the checkpoint stays just before it.
    assert_eq!(projection.position().await, positions[1]);
    let before = balance(&fixture, id).await.unwrap();
    assert_eq!((before.sum, before.deposits), (3, 2));
    assert!(projection.dead_letters().await.is_empty());

    // Fixed: the next run resumes with that event, and applies each of the rest once.
    fail(id, 3, 0);
    assert_eq!(projection.catch_up().await.unwrap(), positions[4]);
    let after = balance(&fixture, id).await.unwrap();
    assert_eq!((after.sum, after.deposits), (15, 5));
}

async fn a_poison_event_is_skipped_and_recorded_exactly_once(fixture: Fixture) {
    let id = Uuid::new_v4();
    fail(id, 3, u32::MAX);
    let positions = fixture.deposit(id, vec![1, 2, 3, 4, 5]).await;
    let projection = fixture.projection(
        fixture.views(),
        PoisonPolicy::SkipAndRecord,
        retry(2, Duration::from_millis(1)),
        100,
        "skip",
    );

    assert_eq!(projection.catch_up().await.unwrap(), positions[4]);
    let view = balance(&fixture, id).await.unwrap();
    assert_eq!((view.sum, view.deposits), (12, 4));
    let letters = projection.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].aggregate_id, id);
    assert_eq!(letters[0].sequence, 3);
    assert_eq!(letters[0].position, positions[2]);
    assert_eq!(letters[0].attempts, 2);

    // A restart, and more events: nothing is recorded or applied twice.
    let restarted = fixture.projection(
        fixture.views(),
        PoisonPolicy::SkipAndRecord,
        retry(2, Duration::from_millis(1)),
        100,
        "skip",
    );
    let more = fixture.deposit(id, vec![6]).await;
    assert_eq!(restarted.catch_up().await.unwrap(), more[0]);
    let view = balance(&fixture, id).await.unwrap();
    assert_eq!((view.sum, view.deposits), (18, 5));
    assert_eq!(restarted.dead_letters().await.len(), 1);
}

async fn a_failing_handler_is_retried_before_the_policy_applies(fixture: Fixture) {
    let id = Uuid::new_v4();
    fail(id, 2, 2);
    let positions = fixture.deposit(id, vec![1, 2, 3]).await;
    let projection = fixture.projection(
        fixture.views(),
        PoisonPolicy::Stop,
        retry(3, Duration::from_millis(5)),
        100,
        "retry",
    );

    assert_eq!(projection.catch_up().await.unwrap(), positions[2]);
    assert_eq!(
        refusals(id, 2),
        2,
        "tried three times: twice refused, then applied"
    );
    let view = balance(&fixture, id).await.unwrap();
    assert_eq!((view.sum, view.deposits), (6, 3));
    assert!(projection.dead_letters().await.is_empty());
}

async fn a_stop_request_ends_the_wait_between_retries(fixture: Fixture) {
    let id = Uuid::new_v4();
    fail(id, 2, u32::MAX);
    let positions = fixture.deposit(id, vec![1, 2, 3]).await;
    // Far longer than any bound below: a wait that a stop did not end would fail the test.
    let projection = fixture.projection(
        fixture.views(),
        PoisonPolicy::SkipAndRecord,
        retry(5, Duration::from_secs(600)),
        100,
        "stop_wait",
    );
    let handle = projection.start();
    handle
        .wait_for(positions[0], Duration::from_secs(30))
        .await
        .unwrap();
    // The first try of the failing event has happened: the runner is now in its retry wait.
    let tried = async {
        while refusals(id, 2) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), tried)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), handle.shutdown())
        .await
        .expect("a stop request ends the retry wait")
        .unwrap();
    // Stopped before the policy applied: nothing skipped, the checkpoint before the event.
    assert_eq!(refusals(id, 2), 1);
    let store_position = fixture.projection(
        fixture.views(),
        PoisonPolicy::Stop,
        HandlerRetry::none(),
        100,
        "stop_wait_check",
    );
    assert_eq!(store_position.position().await, positions[0]);
    assert!(store_position.dead_letters().await.is_empty());
}

async fn a_commit_whose_answer_was_lost_is_not_applied_again(fixture: Fixture) {
    let id = Uuid::new_v4();
    let positions = fixture.deposit(id, vec![1, 2, 3, 4, 5, 6]).await;
    // The second commit is written, then its answer is lost.
    let lossy = LostCommitAnswer::new(fixture.views(), 1);
    let projection = fixture.projection(lossy, PoisonPolicy::Stop, HandlerRetry::none(), 2, "lost");

    // Batch 1 commits; batch 2 commits but its answer is lost.
    let error = projection.catch_up().await.unwrap_err();
    assert!(matches!(error, CQRSError::PersistenceError(_)), "{error:?}");
    assert_eq!(projection.position().await, positions[3]);
    // The next run goes on from the checkpoint; the view refuses an event it has seen, so
    // applying batch 2 again would fail here.
    assert_eq!(projection.catch_up().await.unwrap(), positions[5]);
    let view = balance(&fixture, id).await.unwrap();
    assert_eq!((view.sum, view.deposits), (21, 6));
}

async fn two_projectors_of_one_view_apply_each_event_once(fixture: Fixture) {
    let ledgers = [Uuid::new_v4(), Uuid::new_v4()];
    let mut last = 0;
    for round in 1..=10_u64 {
        for id in ledgers {
            last = fixture.deposit(id, vec![round, round + 100]).await[1];
        }
    }
    let first = fixture.projection(
        fixture.views(),
        PoisonPolicy::Stop,
        HandlerRetry::none(),
        3,
        "first",
    );
    let second = fixture.projection(
        fixture.views(),
        PoisonPolicy::Stop,
        HandlerRetry::none(),
        3,
        "second",
    );

    // Both share the checkpoint: each batch that the other committed first is dropped and
    // redone from the moved checkpoint, never applied twice (the view would refuse it).
    let (a, b) = tokio::join!(first.catch_up(), second.catch_up());
    assert_eq!(a.unwrap(), last, "{:?}", fixture.source);
    assert_eq!(b.unwrap(), last, "{:?}", fixture.source);
    for id in ledgers {
        let view = balance(&fixture, id).await.unwrap();
        assert_eq!(view.deposits, 20);
        assert_eq!(view.sum, (1..=10).map(|round| 2 * round + 100).sum::<u64>());
    }
}

async fn wait_for_applies_the_events_that_arrive_while_it_waits(fixture: Fixture) {
    let id = Uuid::new_v4();
    let first = fixture.deposit(id, vec![1, 2, 3]).await;
    let projection = fixture.projection(
        fixture.views(),
        PoisonPolicy::Stop,
        HandlerRetry::none(),
        100,
        "wait",
    );
    // A fresh store numbers positions from 1 without gaps: the next two events are at
    // `first[2] + 1` and `first[2] + 2`.
    let target = first[2] + 2;
    let later = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fixture.deposit(id, vec![4, 5]).await
    };
    let (reached, more) = tokio::join!(projection.wait_for(target, Duration::from_secs(30)), later);
    assert_eq!(more, vec![target - 1, target]);
    assert_eq!(reached.unwrap(), target);
    let view = balance(&fixture, id).await.unwrap();
    assert_eq!((view.sum, view.deposits), (15, 5));
    // A position that never comes: a timeout, not a hang.
    let error = projection
        .wait_for(target + 1, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(error, CQRSError::Timeout(_)), "{error:?}");
}
