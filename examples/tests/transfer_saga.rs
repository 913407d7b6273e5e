//! The transfer saga on the in-memory store: completed, failed, refunded and retried
//! transfers; commands applied once across crashes between dispatch and commit; deadlines
//! that fire once and are cancelled by the event they wait for; correlation and causation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs::{
    CQRSError, CQRSFramework, CommandContext, CommandRouter, EventRepository, ManualClock,
    MemoryEventRepository, MemoryProcessStore, ProcessRunner, ProcessStore, RetryPolicy, SendError,
};
use cqrs_examples::transfer::{
    Account, AccountCommand, SagaCommand, SagaState, SagaStep, Transfer, TransferCommand,
    TransferRouter, TransferSaga, TransferStatus, CREDIT_RETRY, CREDIT_TIMEOUT,
};
use uuid::Uuid;

struct World {
    store: MemoryEventRepository,
    processes: MemoryProcessStore,
    router: TransferRouter,
    clock: ManualClock,
}

impl World {
    fn new() -> Self {
        let store = MemoryEventRepository::new();
        let retry = RetryPolicy::attempts(20);
        let router = TransferRouter {
            accounts: Arc::new(CQRSFramework::<Account>::new(store.clone()).with_retry(retry)),
            transfers: Arc::new(CQRSFramework::<Transfer>::new(store.clone()).with_retry(retry)),
        };
        World {
            store,
            processes: MemoryProcessStore::new(),
            router,
            clock: ManualClock::starting_now(),
        }
    }

    fn runner(&self) -> ProcessRunner<TransferSaga> {
        self.runner_with(self.router.clone())
    }

    fn runner_with(
        &self,
        router: impl CommandRouter<SagaCommand> + 'static,
    ) -> ProcessRunner<TransferSaga> {
        ProcessRunner::new(
            TransferSaga,
            self.store.clone(),
            self.processes.clone(),
            router,
        )
        .with_clock(self.clock.clone())
    }

    async fn open(&self, initial: u64) -> Uuid {
        let id = Uuid::new_v4();
        self.router
            .accounts
            .dispatch(id, AccountCommand::Open { initial })
            .await
            .unwrap();
        id
    }

    async fn account(&self, id: Uuid, command: AccountCommand) {
        self.router.accounts.dispatch(id, command).await.unwrap();
    }

    /// Requests a transfer under a context of its own; returns the transfer id and the
    /// request's command id (the workflow's correlation id).
    async fn request(&self, from: Uuid, to: Uuid, amount: u64) -> (Uuid, Uuid) {
        let id = Uuid::new_v4();
        let context = CommandContext::new();
        self.router
            .transfers
            .dispatch_with_context(id, TransferCommand::Request { from, to, amount }, &context)
            .await
            .unwrap();
        (id, context.command_id())
    }

    async fn balance(&self, id: Uuid) -> u64 {
        self.router.accounts.load(id).await.unwrap().balance
    }

    async fn status(&self, id: Uuid) -> TransferStatus {
        self.router.transfers.load(id).await.unwrap().status
    }

    async fn saga(&self, transfer: Uuid) -> SagaState {
        let row = self
            .processes
            .load("transfer_saga", &transfer.to_string())
            .await
            .unwrap()
            .expect("the saga has an instance for the transfer");
        serde_json::from_value(row.state).unwrap()
    }

    /// Every stored event.
    async fn history(&self) -> Vec<cqrs::PersistableDomainEvent> {
        self.store.read_all(0, usize::MAX).await.unwrap()
    }

    /// Fails when any command caused more events than one (every command of this domain
    /// causes exactly one event).
    async fn assert_no_command_applied_twice(&self) {
        let mut per_cause: HashMap<Uuid, usize> = HashMap::new();
        for event in self.history().await {
            if let Some(cause) = event.causation_id {
                *per_cause.entry(cause).or_default() += 1;
            }
        }
        let twice: Vec<_> = per_cause.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "commands applied more than once: {twice:?}"
        );
    }
}

#[tokio::test]
async fn a_transfer_completes_and_its_events_share_one_correlation_id() {
    let world = World::new();
    let (a, b) = (world.open(100).await, world.open(0).await);
    let (transfer, request) = world.request(a, b, 30).await;

    let progress = world.runner().run_until_idle().await.unwrap();
    assert_eq!(progress.commands, 3, "debit, credit, complete");

    assert_eq!((world.balance(a).await, world.balance(b).await), (70, 30));
    assert_eq!(world.status(transfer).await, TransferStatus::Completed);
    assert_eq!(world.saga(transfer).await.step, SagaStep::Done);

    let workflow: Vec<_> = world
        .history()
        .await
        .into_iter()
        .filter(|e| e.correlation_id == Some(request))
        .collect();
    let names: Vec<_> = workflow.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        names,
        [
            "TransferRequested",
            "TransferDebited",
            "TransferCredited",
            "TransferCompleted"
        ]
    );
    // Each event names the command that caused it; the request's is the request itself.
    assert_eq!(workflow[0].causation_id, Some(request));
    let causes: std::collections::HashSet<_> =
        workflow.iter().map(|e| e.causation_id.unwrap()).collect();
    assert_eq!(causes.len(), 4);
    // The saga's commands have ids derived from the instance and the event that caused
    // them: the debit was caused by the request event.
    let debit_id = cqrs::derived_command_id(
        &format!("transfer_saga/{transfer}"),
        workflow[0].event_id,
        0,
    );
    assert_eq!(workflow[1].causation_id, Some(debit_id));
}

#[tokio::test]
async fn a_refused_debit_fails_the_transfer_with_nothing_moved() {
    let world = World::new();
    let (a, b) = (world.open(10).await, world.open(0).await);
    let (transfer, _) = world.request(a, b, 30).await;
    world.runner().run_until_idle().await.unwrap();
    assert_eq!((world.balance(a).await, world.balance(b).await), (10, 0));
    assert_eq!(world.status(transfer).await, TransferStatus::Failed);
}

#[tokio::test]
async fn a_credit_to_a_closed_account_is_refunded() {
    let world = World::new();
    let (a, b) = (world.open(100).await, world.open(0).await);
    world.account(b, AccountCommand::Close).await;
    let (transfer, _) = world.request(a, b, 30).await;
    world.runner().run_until_idle().await.unwrap();
    assert_eq!((world.balance(a).await, world.balance(b).await), (100, 0));
    assert_eq!(world.status(transfer).await, TransferStatus::Reversed);
}

#[tokio::test]
async fn a_frozen_target_is_retried_until_it_thaws() {
    let world = World::new();
    let (a, b) = (world.open(100).await, world.open(0).await);
    world.account(b, AccountCommand::Freeze).await;
    let (transfer, _) = world.request(a, b, 30).await;
    let runner = world.runner();
    runner.run_until_idle().await.unwrap();
    assert_eq!(world.saga(transfer).await.credit_retries, 1);

    // Not yet time to retry: nothing happens.
    world.clock.advance(CREDIT_RETRY / 2);
    assert_eq!(runner.run_until_idle().await.unwrap().deadlines, 0);
    // Time to retry, still frozen: refused again, a new retry is set.
    world.clock.advance(CREDIT_RETRY);
    assert_eq!(runner.run_until_idle().await.unwrap().deadlines, 1);
    assert_eq!(world.saga(transfer).await.credit_retries, 2);

    world.account(b, AccountCommand::Unfreeze).await;
    world.clock.advance(CREDIT_RETRY);
    runner.run_until_idle().await.unwrap();
    assert_eq!((world.balance(a).await, world.balance(b).await), (70, 30));
    assert_eq!(world.status(transfer).await, TransferStatus::Completed);
    // Completed: the credit deadline is gone with it and never fires.
    world.clock.advance(CREDIT_TIMEOUT * 2);
    assert_eq!(runner.run_until_idle().await.unwrap().deadlines, 0);
    assert_eq!(world.balance(a).await, 70);
}

#[tokio::test]
async fn the_credit_deadline_refunds_once_even_across_a_restart() {
    let world = World::new();
    let (a, b) = (world.open(100).await, world.open(0).await);
    world.account(b, AccountCommand::Freeze).await;
    let (transfer, _) = world.request(a, b, 30).await;
    world.runner().run_until_idle().await.unwrap();
    assert_eq!(world.balance(a).await, 70);

    // The deadline is stored with the instance: a new runner (a restart) fires it.
    world.clock.advance(CREDIT_TIMEOUT + Duration::from_secs(1));
    let fired = world.runner().run_until_idle().await.unwrap();
    // Both are due: the retry (at 5 s, refused again: still frozen), then the credit
    // deadline (at 30 s), which refunds and cancels the retry the first one set.
    assert_eq!(fired.deadlines, 2);
    assert_eq!((world.balance(a).await, world.balance(b).await), (100, 0));
    assert_eq!(world.status(transfer).await, TransferStatus::Reversed);

    // Later steps and later restarts fire nothing more.
    world.clock.advance(CREDIT_TIMEOUT * 3);
    assert_eq!(world.runner().run_until_idle().await.unwrap().deadlines, 0);
    assert_eq!(world.balance(a).await, 100);
    world.assert_no_command_applied_twice().await;
}

/// A router that fails after its budget of successful sends, as if the process died right
/// after dispatching a command and before committing the instance.
struct Crashing {
    inner: TransferRouter,
    budget: AtomicUsize,
}

#[cqrs::async_trait]
impl CommandRouter<SagaCommand> for Crashing {
    async fn send(&self, command: SagaCommand, context: &CommandContext) -> Result<(), SendError> {
        let result = self.inner.send(command, context).await;
        if self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(SendError::Failed(CQRSError::persistence(
                "crashed after the dispatch",
            )));
        }
        result
    }
}

#[tokio::test]
async fn a_crash_between_dispatch_and_commit_applies_no_command_twice() {
    let world = World::new();
    let accounts = [
        world.open(100).await,
        world.open(100).await,
        world.open(100).await,
    ];
    world.account(accounts[2], AccountCommand::Close).await;
    let mut transfers = Vec::new();
    for (from, to) in [(0, 1), (1, 0), (0, 2), (1, 2), (0, 1)] {
        transfers.push(world.request(accounts[from], accounts[to], 40).await.0);
    }
    // Crash after every few sends, then restart with a fresh runner, until done.
    let mut crashes = 0;
    for budget in (0..).map(|i| i % 3) {
        let runner = world.runner_with(Crashing {
            inner: world.router.clone(),
            budget: AtomicUsize::new(budget),
        });
        match runner.run_until_idle().await {
            Ok(_) => break,
            Err(CQRSError::PersistenceError(_)) => crashes += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
        assert!(crashes < 100, "the runner makes no progress across crashes");
    }
    assert!(crashes >= 5, "only {crashes} crashes");

    world.assert_no_command_applied_twice().await;
    let mut total = 0;
    for account in accounts {
        total += world.balance(account).await;
    }
    assert_eq!(total, 300, "money was created or lost");
    for transfer in transfers {
        let status = world.status(transfer).await;
        assert!(
            matches!(
                status,
                TransferStatus::Completed | TransferStatus::Failed | TransferStatus::Reversed
            ),
            "transfer {transfer} is {status:?}"
        );
    }
}

/// A process store that counts its commits.
#[derive(Clone, Default)]
struct CountingStore {
    inner: MemoryProcessStore,
    commits: Arc<AtomicUsize>,
}

#[cqrs::async_trait]
impl ProcessStore for CountingStore {
    async fn load(
        &self,
        process: &str,
        instance: &str,
    ) -> Result<Option<cqrs::ProcessRow>, CQRSError> {
        self.inner.load(process, instance).await
    }
    async fn commit(
        &self,
        process: &str,
        rows: Vec<cqrs::ProcessRow>,
        checkpoint: Option<i64>,
    ) -> Result<(), CQRSError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(process, rows, checkpoint).await
    }
    async fn checkpoint(&self, process: &str) -> Result<i64, CQRSError> {
        self.inner.checkpoint(process).await
    }
    async fn due(
        &self,
        process: &str,
        now: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Vec<cqrs::ProcessRow>, CQRSError> {
        self.inner.due(process, now, limit).await
    }
    async fn next_due(
        &self,
        process: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, CQRSError> {
        self.inner.next_due(process).await
    }
    async fn list(
        &self,
        process: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<cqrs::ProcessRow>, CQRSError> {
        self.inner.list(process, after, limit).await
    }
}

#[tokio::test]
async fn events_that_change_no_instance_share_one_commit_per_page() {
    let world = World::new();
    for _ in 0..30 {
        world.open(10).await;
    }
    let processes = CountingStore::default();
    let runner = ProcessRunner::new(
        TransferSaga,
        world.store.clone(),
        processes.clone(),
        world.router.clone(),
    )
    .with_batch_size(100);
    let progress = runner.run_until_idle().await.unwrap();
    assert_eq!(progress.events, 30);
    assert_eq!(processes.commits.load(Ordering::SeqCst), 1);
    assert_eq!(processes.checkpoint("transfer_saga").await.unwrap(), 30);

    // A transfer among them: its decisions commit with their events, the rest once more.
    let (a, b) = (world.open(100).await, world.open(0).await);
    world.request(a, b, 5).await;
    world.open(1).await;
    runner.run_until_idle().await.unwrap();
    assert_eq!((world.balance(a).await, world.balance(b).await), (95, 5));
    let head = world.history().await.last().unwrap().position;
    assert_eq!(processes.checkpoint("transfer_saga").await.unwrap(), head);
}
