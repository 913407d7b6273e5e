//! The projection runner on the in-memory store: live delivery, polling fallback, poison
//! policies, several runners on one view, several views, stop and restart, activation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DomainEvent, EventEnvelope, EventRepository,
    MemoryEventRepository, MemoryViewRepository, PoisonPolicy, Projection, View, ViewRepository,
};
use cqrs::{HandlerRetry, ProjectionStopped};
use cqrs_testkit::FaultyStore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum LedgerEvent {
    #[event(name = "Deposited", version = "1")]
    Deposited { amount: u64 },
}

#[derive(Debug, thiserror::Error)]
enum LedgerError {
    #[error("refused deposit of {0}")]
    Refused(u64),
    #[error("sequence {got} after {last}: an event applied twice or missed")]
    OutOfOrder { last: i64, got: i64 },
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

#[derive(Default)]
struct Ledger;

impl Aggregate for Ledger {
    const NAME: &'static str = "ledger";
    type Events = LedgerEvent;
    type Commands = Vec<u64>;
    type Errors = LedgerError;
    type State = ();

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &(),
        amounts: Vec<u64>,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        Ok(amounts
            .into_iter()
            .map(|amount| LedgerEvent::Deposited { amount })
            .collect())
    }

    fn handle_event(&self, _state: &mut (), _event: &LedgerEvent) {}
}

/// One row per ledger; refuses an event that is not the next in its ledger, so applying an
/// event twice (or missing one) fails the projection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Balance {
    sum: u64,
    events: u64,
    last_sequence: i64,
}

impl View<Ledger> for Balance {
    const TABLE_NAME: &'static str = "balance";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        if envelope.sequence != self.last_sequence + 1 {
            return Err(LedgerError::OutOfOrder {
                last: self.last_sequence,
                got: envelope.sequence,
            });
        }
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.sum += amount;
        self.events += 1;
        self.last_sequence = envelope.sequence;
        Ok(())
    }
}

/// A single row for all ledgers, trusting the projection: an event applied twice shows in
/// its sum and count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct GrandTotal {
    sum: u64,
    events: u64,
    last_position: i64,
}

impl View<Ledger> for GrandTotal {
    const TABLE_NAME: &'static str = "grand_total";
    const VERSION: u64 = 1;

    fn view_id(_envelope: &EventEnvelope<LedgerEvent>) -> Option<String> {
        Some("all".to_owned())
    }

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.sum += amount;
        self.events += 1;
        self.last_position = self.last_position.max(envelope.position);
        Ok(())
    }
}

static STOP_POISON_CALLS: AtomicUsize = AtomicUsize::new(0);
static SKIP_POISON_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Refuses deposits of 13 (counting the tries).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct NoThirteen {
    sum: u64,
}

impl View<Ledger> for NoThirteen {
    const TABLE_NAME: &'static str = "no_thirteen";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        let LedgerEvent::Deposited { amount } = envelope.event;
        if amount == 13 {
            STOP_POISON_CALLS.fetch_add(1, Ordering::SeqCst);
            return Err(LedgerError::Refused(amount));
        }
        self.sum += amount;
        Ok(())
    }
}

/// Refuses deposits of 666 (counting the tries).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct NoSixSixSix {
    sum: u64,
    events: u64,
}

impl View<Ledger> for NoSixSixSix {
    const TABLE_NAME: &'static str = "no_666";
    const VERSION: u64 = 1;

    fn view_id(_envelope: &EventEnvelope<LedgerEvent>) -> Option<String> {
        Some("all".to_owned())
    }

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        let LedgerEvent::Deposited { amount } = envelope.event;
        if amount == 666 {
            SKIP_POISON_CALLS.fetch_add(1, Ordering::SeqCst);
            return Err(LedgerError::Refused(amount));
        }
        self.sum += amount;
        self.events += 1;
        Ok(())
    }
}

fn quick_retry(attempts: u32) -> HandlerRetry {
    HandlerRetry {
        attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    }
}

async fn load<V: View<Ledger>>(views: &MemoryViewRepository<V>, id: &str) -> Option<V> {
    ViewRepository::<Ledger, V>::load(views, id).await.unwrap()
}

/// The store's own answer: per-ledger sums and counts, and the grand total, from a replay.
async fn replay_sums(
    store: &impl EventRepository,
) -> (std::collections::HashMap<Uuid, (u64, u64)>, u64) {
    let mut per_ledger = std::collections::HashMap::new();
    let mut total = 0;
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 1000).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = last.position;
        for stored in &batch {
            let LedgerEvent::Deposited { amount } = stored.decode::<LedgerEvent>().unwrap().event;
            let entry = per_ledger.entry(stored.aggregate_id).or_insert((0, 0));
            entry.0 += amount;
            entry.1 += 1;
            total += amount;
        }
    }
    (per_ledger, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_appended_after_catch_up_reaches_the_view_by_notification() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let views = MemoryViewRepository::<Balance>::new();
    let id = Uuid::new_v4();
    framework.dispatch(id, vec![5, 6]).await.unwrap();

    // No polling at all: only the store's notification can wake the runner.
    let runner = Projection::<Ledger, Balance>::new(store.clone(), views.clone())
        .with_poll_interval(Duration::from_secs(3600))
        .with_safety_poll_interval(Duration::from_secs(3600))
        .start();
    assert_eq!(runner.wait_for(2, WAIT).await.unwrap(), 2);
    // Caught up (and its version activated) before the next append.
    tokio::time::timeout(WAIT, async {
        while !runner.is_live() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();

    let receipt = framework.dispatch(id, vec![7]).await.unwrap();
    let position = receipt.last_position().unwrap();
    let reached = runner
        .wait_for(position, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(reached >= position);
    let balance = load(&views, &id.to_string()).await.unwrap();
    assert_eq!((balance.sum, balance.events), (18, 3));
    assert_eq!(runner.last_error(), None);
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notifications_the_runner_polls() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let views = MemoryViewRepository::<Balance>::new();
    // A store that cannot notify: the runner polls.
    let deaf = FaultyStore::wrapping(store.clone());
    deaf.without_notifications();
    let runner = Projection::<Ledger, Balance>::new(deaf, views.clone())
        .with_poll_interval(Duration::from_millis(10))
        .start();
    let id = Uuid::new_v4();
    let receipt = framework.dispatch(id, vec![1, 2, 3]).await.unwrap();
    runner
        .wait_for(receipt.last_position().unwrap(), WAIT)
        .await
        .unwrap();
    assert_eq!(load(&views, &id.to_string()).await.unwrap().sum, 6);
    runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_under_stop_names_itself_after_the_retries_and_keeps_the_prefix() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let views = MemoryViewRepository::<NoThirteen>::new();
    let id = Uuid::new_v4();
    // One batch: 1, 2, then the poison 13, then 4.
    framework.dispatch(id, vec![1, 2, 13, 4]).await.unwrap();

    let runner = Projection::<Ledger, NoThirteen>::new(store.clone(), views.clone())
        .with_poison_policy(PoisonPolicy::Stop)
        .with_handler_retry(quick_retry(3))
        .start();
    let position_watch = runner.subscribe();
    // A reader waiting for a position past the poison event learns that the runner ended.
    let waited = runner.wait_for(4, WAIT).await.unwrap_err();
    match &waited {
        CQRSError::ProjectionStopped(ProjectionStopped {
            reached, wanted, ..
        }) => assert_eq!((*reached, *wanted), (2, 4)),
        other => panic!("expected ProjectionStopped, got {other:?}"),
    }
    let waiter_error = runner.last_error().unwrap();
    let ended = tokio::time::timeout(WAIT, runner.wait()).await.unwrap();
    match ended.unwrap_err() {
        CQRSError::ViewHandler(handler) => {
            let cqrs::ViewHandlerError {
                view,
                aggregate_type,
                aggregate_id,
                sequence,
                position,
                event_type,
                event_version,
                message,
            } = *handler;
            assert_eq!(view, "no_thirteen");
            assert_eq!(aggregate_type, "ledger");
            assert_eq!(aggregate_id, id);
            assert_eq!(sequence, 3);
            assert_eq!(position, 3);
            assert_eq!(
                (event_type.as_str(), event_version.as_str()),
                ("Deposited", "1")
            );
            assert_eq!(message, "refused deposit of 13");
        }
        other => panic!("expected ViewHandler, got {other:?}"),
    }
    assert_eq!(
        STOP_POISON_CALLS.load(Ordering::SeqCst),
        3,
        "three tries in all"
    );
    assert!(
        waiter_error.contains("refused deposit of 13"),
        "{waiter_error}"
    );
    // 1 and 2 were applied exactly once; the checkpoint stays right before the poison event.
    assert_eq!(load(&views, &id.to_string()).await.unwrap().sum, 3);
    let projection = Projection::<Ledger, NoThirteen>::new(store.clone(), views.clone());
    assert_eq!(projection.position().await.unwrap(), 2);
    assert_eq!(*position_watch.borrow(), 2);

    // catch_up reports the same event, and still applies nothing twice.
    let again = projection
        .with_handler_retry(HandlerRetry::none())
        .catch_up()
        .await
        .unwrap_err();
    assert!(
        matches!(&again, CQRSError::ViewHandler(h) if h.sequence == 3),
        "{again:?}"
    );
    assert_eq!(load(&views, &id.to_string()).await.unwrap().sum, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_under_skip_and_record_is_a_dead_letter_and_the_rest_applies() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let views = MemoryViewRepository::<NoSixSixSix>::new();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    framework.dispatch(a, vec![1, 2]).await.unwrap();
    framework.dispatch(b, vec![666]).await.unwrap();
    framework.dispatch(a, vec![4]).await.unwrap();

    let runner = Projection::<Ledger, NoSixSixSix>::new(store.clone(), views.clone())
        .with_poison_policy(PoisonPolicy::SkipAndRecord)
        .with_handler_retry(quick_retry(2))
        .start();
    runner.wait_for(4, WAIT).await.unwrap();
    let total = load(&views, "all").await.unwrap();
    assert_eq!((total.sum, total.events), (7, 3));
    assert_eq!(
        SKIP_POISON_CALLS.load(Ordering::SeqCst),
        2,
        "two tries in all"
    );

    let letters = runner.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.projection, "no_666_v1");
    assert_eq!(letter.view, "no_666");
    assert_eq!(
        (letter.aggregate_type.as_str(), letter.aggregate_id),
        ("ledger", b)
    );
    assert_eq!((letter.sequence, letter.position), (1, 3));
    assert_eq!(
        (letter.event_type.as_str(), letter.event_version.as_str()),
        ("Deposited", "1")
    );
    assert_eq!(letter.attempts, 2);
    assert!(
        letter.error.contains("refused deposit of 666"),
        "{}",
        letter.error
    );

    // The runner keeps going after the skip.
    let receipt = framework.dispatch(b, vec![10]).await.unwrap();
    runner
        .wait_for(receipt.last_position().unwrap(), WAIT)
        .await
        .unwrap();
    assert_eq!(load(&views, "all").await.unwrap().sum, 17);
    assert!(!runner.is_finished());
    runner.shutdown().await.unwrap();
}

async fn dawdle() {
    let pause = Uuid::new_v4().as_u128() % 1000;
    tokio::time::sleep(Duration::from_micros(pause as u64)).await;
}

/// A view store that dawdles between loading and committing, so that two projectors of one
/// view interleave.
struct Dawdling<V>(MemoryViewRepository<V>);

#[async_trait]
impl<V: View<Ledger>> ViewRepository<Ledger, V> for Dawdling<V> {
    async fn load(&self, view_id: &str) -> Result<Option<V>, CQRSError> {
        ViewRepository::<Ledger, V>::load(&self.0, view_id).await
    }
    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, V)>, CQRSError> {
        ViewRepository::<Ledger, V>::list(&self.0, after, limit).await
    }
    async fn load_for_update(&self, view_id: &str) -> Result<cqrs::ViewContext<V>, CQRSError> {
        dawdle().await;
        let context = ViewRepository::<Ledger, V>::load_for_update(&self.0, view_id).await;
        dawdle().await;
        context
    }
    async fn commit(
        &self,
        changes: Vec<cqrs::ViewContext<V>>,
        checkpoint: Option<cqrs::Checkpoint>,
    ) -> Result<(), CQRSError> {
        ViewRepository::<Ledger, V>::commit(&self.0, changes, checkpoint).await
    }
    async fn checkpoint(&self, name: &str) -> Result<i64, CQRSError> {
        ViewRepository::<Ledger, V>::checkpoint(&self.0, name).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_on_one_view_never_apply_an_event_twice() {
    let store = MemoryEventRepository::new();
    let framework = Arc::new(CQRSFramework::<Ledger>::new(store.clone()));
    let balances = MemoryViewRepository::<Balance>::new();
    let totals = MemoryViewRepository::<GrandTotal>::new();
    let runners = [
        Projection::<Ledger, Balance>::new(store.clone(), Dawdling(balances.clone()))
            .with_batch_size(7)
            .start(),
        Projection::<Ledger, Balance>::new(store.clone(), Dawdling(balances.clone()))
            .with_batch_size(13)
            .start(),
    ];
    let total_runners = [
        Projection::<Ledger, GrandTotal>::new(store.clone(), Dawdling(totals.clone()))
            .with_batch_size(5)
            .start(),
        Projection::<Ledger, GrandTotal>::new(store.clone(), Dawdling(totals.clone()))
            .with_batch_size(11)
            .start(),
    ];

    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let mut writers = Vec::new();
    for (w, id) in ids.iter().copied().enumerate() {
        let framework = Arc::clone(&framework);
        writers.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let amounts = vec![w as u64 + i, 1 + i % 3];
                framework.dispatch(id, amounts).await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let head = store
        .read_all(0, usize::MAX)
        .await
        .unwrap()
        .last()
        .unwrap()
        .position;
    assert_eq!(head, 8 * 40 * 2);
    for runner in runners.iter().chain(total_runners.iter()) {
        runner.wait_for(head, WAIT).await.unwrap();
        assert!(!runner.is_finished(), "{:?}", runner.last_error());
    }

    let (per_ledger, total) = replay_sums(&store).await;
    for id in &ids {
        let balance = load(&balances, &id.to_string()).await.unwrap();
        assert_eq!((balance.sum, balance.events), per_ledger[id], "ledger {id}");
    }
    let grand = load(&totals, "all").await.unwrap();
    assert_eq!(
        (grand.sum, grand.events, grand.last_position),
        (total, head as u64, head)
    );
    for runner in runners.into_iter().chain(total_runners) {
        runner.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_views_run_side_by_side_with_their_own_checkpoints() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let balances = MemoryViewRepository::<Balance>::new();
    let totals = MemoryViewRepository::<GrandTotal>::new();
    let balance_runner =
        Projection::<Ledger, Balance>::new(store.clone(), balances.clone()).start();
    let total_runner = Projection::<Ledger, GrandTotal>::new(store.clone(), totals.clone())
        .with_name("grand_total_reporting")
        .start();
    let id = Uuid::new_v4();
    let receipt = framework.dispatch(id, vec![3, 4]).await.unwrap();
    let position = receipt.last_position().unwrap();
    balance_runner.wait_for(position, WAIT).await.unwrap();
    total_runner.wait_for(position, WAIT).await.unwrap();
    assert_eq!(balance_runner.name(), "balance_v1");
    assert_eq!(total_runner.name(), "grand_total_reporting");
    let balance_checkpoint = ViewRepository::<Ledger, Balance>::checkpoint(&balances, "balance_v1");
    assert_eq!(balance_checkpoint.await.unwrap(), position);
    let total_checkpoint =
        ViewRepository::<Ledger, GrandTotal>::checkpoint(&totals, "grand_total_reporting");
    assert_eq!(total_checkpoint.await.unwrap(), position);
    assert_eq!(load(&balances, &id.to_string()).await.unwrap().sum, 7);
    assert_eq!(load(&totals, "all").await.unwrap().sum, 7);
    balance_runner.shutdown().await.unwrap();
    total_runner.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_runner_resumes_at_its_checkpoint() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let views = MemoryViewRepository::<Balance>::new();
    let id = Uuid::new_v4();
    let first = framework.dispatch(id, vec![1; 30]).await.unwrap();
    let runner = Projection::<Ledger, Balance>::new(store.clone(), views.clone())
        .with_batch_size(4)
        .start();
    runner
        .wait_for(first.last_position().unwrap(), WAIT)
        .await
        .unwrap();
    runner.shutdown().await.unwrap();

    let second = framework.dispatch(id, vec![2; 10]).await.unwrap();
    let restarted =
        Projection::<Ledger, Balance>::new(store.clone(), views.clone()).with_batch_size(4);
    assert_eq!(restarted.position().await.unwrap(), 30);
    let runner = restarted.start();
    runner
        .wait_for(second.last_position().unwrap(), WAIT)
        .await
        .unwrap();
    // The view refuses a repeated sequence, so a double apply would have stopped it.
    let balance = load(&views, &id.to_string()).await.unwrap();
    assert_eq!(
        (balance.sum, balance.events, balance.last_sequence),
        (50, 40, 40)
    );
    runner.shutdown().await.unwrap();
}

/// `finished` waits, through a shared reference, for the runner to end after `stop`; the
/// handle then says so, and nothing more is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_handle_waits_for_its_runner_to_end() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let views = MemoryViewRepository::<Balance>::new();
    let id = Uuid::new_v4();
    let first = framework.dispatch(id, vec![1; 30]).await.unwrap();
    let runner = Arc::new(
        Projection::<Ledger, Balance>::new(store.clone(), views.clone())
            .with_batch_size(4)
            .start(),
    );
    runner
        .wait_for(first.last_position().unwrap(), WAIT)
        .await
        .unwrap();
    assert!(!runner.is_finished());
    runner.stop();
    tokio::time::timeout(WAIT, runner.finished()).await.unwrap();
    assert!(runner.is_finished());
    framework.dispatch(id, vec![2; 10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(runner.position(), 30);
    assert_eq!(load(&views, &id.to_string()).await.unwrap().sum, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_when_its_shutdown_future_completes() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let views = MemoryViewRepository::<Balance>::new();
    let id = Uuid::new_v4();
    framework.dispatch(id, vec![9]).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let projection = Projection::<Ledger, Balance>::new(store.clone(), views.clone());
    let running = tokio::spawn(projection.run(async {
        let _ = rx.await;
    }));
    let waiter = Projection::<Ledger, Balance>::new(store.clone(), views.clone());
    // wait_for on a second projection object only reads: the checkpoint is the runner's.
    tokio::time::timeout(WAIT, async {
        while waiter.position().await.unwrap() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    tx.send(()).unwrap();
    tokio::time::timeout(WAIT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_on_a_handle_times_out_or_reports_a_stopped_runner() {
    let store = MemoryEventRepository::new();
    let views = MemoryViewRepository::<Balance>::new();
    let runner = Projection::<Ledger, Balance>::new(store.clone(), views.clone()).start();
    let error = runner
        .wait_for(1, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(error, CQRSError::Timeout(_)), "{error:?}");

    let watcher = runner.subscribe();
    runner.shutdown().await.unwrap();
    assert!(
        watcher.has_changed().is_err(),
        "the runner's position sender is gone"
    );
}

#[tokio::test]
async fn catching_up_activates_the_version_once_and_never_downgrades() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let views = MemoryViewRepository::<Balance>::new();
    framework.dispatch(Uuid::new_v4(), vec![1]).await.unwrap();
    let repo: &dyn ViewRepository<Ledger, Balance> = &views;
    assert_eq!(repo.active_version().await.unwrap(), None);
    assert!(repo.is_active_version().await.unwrap());
    Projection::<Ledger, Balance>::new(store.clone(), views.clone())
        .catch_up()
        .await
        .unwrap();
    assert_eq!(repo.active_version().await.unwrap(), Some(1));
    // A newer version activated elsewhere stays active.
    repo.activate_version(3).await.unwrap();
    repo.activate_version(1).await.unwrap();
    assert_eq!(repo.active_version().await.unwrap(), Some(3));
    assert!(!repo.is_active_version().await.unwrap());
}

#[tokio::test]
async fn the_memory_view_store_refuses_a_checkpoint_that_goes_back() {
    let views = MemoryViewRepository::<Balance>::new();
    let repo: &dyn ViewRepository<Ledger, Balance> = &views;
    let checkpoint = |position| {
        Some(cqrs::Checkpoint {
            name: "p".to_owned(),
            position,
        })
    };
    repo.commit(Vec::new(), checkpoint(10)).await.unwrap();
    let back = repo.commit(Vec::new(), checkpoint(7)).await.unwrap_err();
    assert!(matches!(back, CQRSError::ViewConflict { .. }), "{back:?}");
    // Equal without changes is an idempotent no-op; equal with changes is a replay.
    repo.commit(Vec::new(), checkpoint(10)).await.unwrap();
    let row = repo.load_for_update("x").await.unwrap();
    let replay = repo.commit(vec![row], checkpoint(10)).await.unwrap_err();
    assert!(
        matches!(replay, CQRSError::ViewConflict { .. }),
        "{replay:?}"
    );
    assert_eq!(repo.checkpoint("p").await.unwrap(), 10);
    assert_eq!(repo.load("x").await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------
// Damaged rows: a store that follows the `read_all` contract for a row it cannot read (the
// page ends before it; a page that starts with it is `DamagedRow`) and gives no change
// notification, so the runner cannot take a short page for the end.

/// Six deposits of 1..=6 on two ledgers, the third one damaged.
async fn damaged_store(pages: usize) -> (FaultyStore, Uuid) {
    let store = FaultyStore::new();
    let framework = CQRSFramework::<Ledger>::new(store.clone());
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, amount) in [(a, 1), (b, 2), (a, 3), (b, 4), (a, 5), (b, 6)] {
        framework.dispatch(id, vec![amount]).await.unwrap();
    }
    // Unreadable for the next `pages` pages that start at it, and no change notification,
    // so the runner cannot take a short page for the end.
    store.damage_row(3, pages).without_notifications();
    (store, a)
}

#[tokio::test]
async fn a_damaged_row_is_one_dead_letter_and_the_rest_applies() {
    let (store, a) = damaged_store(usize::MAX).await;
    let views = MemoryViewRepository::<GrandTotal>::new();
    let projection = Projection::<Ledger, GrandTotal>::new(store.clone(), views.clone())
        .with_poison_policy(PoisonPolicy::SkipAndRecord)
        .with_handler_retry(quick_retry(2));
    assert_eq!(projection.catch_up().await.unwrap(), 6);
    let total = load(&views, "all").await.unwrap();
    assert_eq!((total.sum, total.events), (1 + 2 + 4 + 5 + 6, 5));
    let letters = projection.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].position, letters[0].aggregate_id), (3, a));
    assert_eq!(letters[0].sequence, 2);
    assert_eq!(letters[0].attempts, 2);
    assert!(letters[0].error.contains("the row is damaged"));
}

#[tokio::test]
async fn a_damaged_row_stops_a_halting_projection_just_before_it() {
    let (store, _) = damaged_store(usize::MAX).await;
    let views = MemoryViewRepository::<GrandTotal>::new();
    let projection = Projection::<Ledger, GrandTotal>::new(store.clone(), views.clone())
        .with_handler_retry(HandlerRetry::none());
    for _ in 0..2 {
        match projection.catch_up().await.unwrap_err() {
            CQRSError::DamagedRow(row) => assert_eq!(row.position, 3),
            other => panic!("expected DamagedRow, got {other:?}"),
        }
        assert_eq!(projection.position().await.unwrap(), 2);
        let total = load(&views, "all").await.unwrap();
        assert_eq!((total.sum, total.events), (3, 2));
    }
}

#[tokio::test]
async fn a_damaged_row_repaired_before_the_retries_run_out_is_applied() {
    let (store, _) = damaged_store(1).await;
    let views = MemoryViewRepository::<GrandTotal>::new();
    let projection = Projection::<Ledger, GrandTotal>::new(store.clone(), views.clone())
        .with_handler_retry(quick_retry(3));
    assert_eq!(projection.catch_up().await.unwrap(), 6);
    let total = load(&views, "all").await.unwrap();
    assert_eq!((total.sum, total.events), (21, 6));
    assert!(projection.dead_letters().await.unwrap().is_empty());
}
