//! `FaultyStore`: each scripted fault reaches the framework as a production store's would,
//! and what it leaves stored is what the fault says.

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, CommandContext, DomainEvent, EventRepository, RetryPolicy,
};
use cqrs_testkit::{Fault, FaultyStore};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
enum TallyEvent {
    #[event(name = "TallyCounted", version = "1")]
    Counted { by: u32 },
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct TallyError(#[from] CQRSError);

#[derive(Default)]
struct Tally;

impl Aggregate for Tally {
    const NAME: &'static str = "tally";
    type State = u32;
    type Commands = u32;
    type Events = TallyEvent;
    type Errors = TallyError;

    async fn handle_command(
        &self,
        _: Uuid,
        _: &u32,
        by: u32,
    ) -> Result<Vec<TallyEvent>, TallyError> {
        Ok(vec![TallyEvent::Counted { by }])
    }

    fn handle_event(&self, state: &mut u32, event: &TallyEvent) {
        let TallyEvent::Counted { by } = event;
        *state += by;
    }
}

fn persistence(error: &TallyError) -> bool {
    matches!(error.0, CQRSError::PersistenceError(_))
}

async fn stored(store: &FaultyStore, id: Uuid) -> usize {
    store
        .store()
        .load_events(Tally::NAME, id, 0)
        .await
        .map(|events| events.len())
        .unwrap_or(usize::MAX)
}

#[tokio::test]
async fn a_conflict_without_retries_reaches_the_caller_and_stores_nothing() {
    let store = FaultyStore::new();
    let tallies = CQRSFramework::<Tally>::new(store.clone());
    let id = Uuid::new_v4();
    store.fail_appends(1, Fault::Conflict);

    let error = tallies.dispatch(id, 1).await.unwrap_err();
    assert!(
        matches!(
            error.0,
            CQRSError::Conflict {
                expected_sequence: 0,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(stored(&store, id).await, 0);
    // The script is used up: the same command now commits.
    assert_eq!(
        tallies.dispatch(id, 1).await.map(|r| r.sequence).ok(),
        Some(1)
    );
}

#[tokio::test]
async fn conflicts_past_the_retry_policy_give_up() {
    let store = FaultyStore::new();
    let tallies = CQRSFramework::<Tally>::new(store.clone()).with_retry(RetryPolicy::attempts(2));
    let id = Uuid::new_v4();
    store.fail_every_append(Fault::Conflict);

    let error = tallies.dispatch(id, 1).await.unwrap_err();
    assert!(matches!(error.0, CQRSError::Conflict { .. }), "{error:?}");
    assert_eq!(store.calls().appends, 2);

    store.heal();
    let receipt = tallies.dispatch(id, 5).await.map_err(|e| e.to_string());
    assert_eq!(receipt.map(|r| (r.sequence, r.attempts)), Ok((1, 1)));
    assert_eq!(tallies.load(id).await.ok(), Some(5));
}

#[tokio::test]
async fn a_lost_answer_stores_the_events_but_reports_a_failure() {
    let store = FaultyStore::new();
    let tallies = CQRSFramework::<Tally>::new(store.clone());
    let id = Uuid::new_v4();
    store.fail_appends(1, Fault::LostAnswer);

    let error = tallies.dispatch(id, 3).await.unwrap_err();
    assert!(persistence(&error), "{error:?}");
    assert_eq!(stored(&store, id).await, 1);
    // Sent again without a context, the command runs again: counted twice.
    tallies
        .dispatch(id, 3)
        .await
        .map_err(|e| e.to_string())
        .unwrap();
    assert_eq!(tallies.load(id).await.ok(), Some(6));
}

#[tokio::test]
async fn a_command_sent_once_is_not_run_again_after_a_lost_answer() {
    let store = FaultyStore::new();
    let tallies = CQRSFramework::<Tally>::new(store.clone());
    let id = Uuid::new_v4();
    let context = CommandContext::new().once();
    store.fail_appends(1, Fault::LostAnswer);

    let error = tallies
        .dispatch_with_context(id, 3, &context)
        .await
        .unwrap_err();
    assert!(persistence(&error), "{error:?}");
    let again = tallies
        .dispatch_with_context(id, 3, &context)
        .await
        .map_err(|e| e.to_string())
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.sequence, 1);
    assert_eq!(stored(&store, id).await, 1);
    assert_eq!(tallies.load(id).await.ok(), Some(3));
}

#[tokio::test]
async fn an_unavailable_server_stores_nothing_until_it_is_back() {
    let store = FaultyStore::new();
    let tallies = CQRSFramework::<Tally>::new(store.clone());
    let id = Uuid::new_v4();
    store
        .fail_appends(2, Fault::Unavailable)
        .fail_appends(1, Fault::Conflict);

    for _ in 0..2 {
        let error = tallies.dispatch(id, 1).await.unwrap_err();
        assert!(persistence(&error), "{error:?}");
    }
    let error = tallies.dispatch(id, 1).await.unwrap_err();
    assert!(matches!(error.0, CQRSError::Conflict { .. }), "{error:?}");
    assert_eq!(stored(&store, id).await, 0);
    assert_eq!(
        tallies.dispatch(id, 1).await.map(|r| r.sequence).ok(),
        Some(1)
    );
    assert_eq!(store.calls().appends, 4);
}

#[tokio::test]
async fn failed_reads_reach_the_caller_and_the_next_read_succeeds() {
    let store = FaultyStore::new();
    let tallies = CQRSFramework::<Tally>::new(store.clone()).without_state_cache();
    let id = Uuid::new_v4();
    tallies
        .dispatch(id, 2)
        .await
        .map_err(|e| e.to_string())
        .unwrap();
    let before = store.calls();
    store.fail_reads(1);

    let error = tallies.dispatch(id, 2).await.unwrap_err();
    assert!(persistence(&error), "{error:?}");
    let after = store.calls();
    assert_eq!(after.reads(), before.reads() + 1);
    assert_eq!(
        after.fold_events,
        before.fold_events + 1,
        "the state is rebuilt by a fold"
    );
    assert_eq!(
        after.appends, 1,
        "a command whose state could not be read appends nothing"
    );
    assert_eq!(tallies.load(id).await.ok(), Some(2));
    assert!(store.read_all(0, 10).await.is_ok());
}

#[tokio::test]
async fn a_damaged_row_ends_pages_before_it_and_fails_the_pages_that_start_at_it() {
    let store = FaultyStore::new();
    let tallies = CQRSFramework::<Tally>::new(store.clone());
    for by in 1..=4 {
        tallies
            .dispatch(Uuid::new_v4(), by)
            .await
            .map_err(|e| e.to_string())
            .unwrap();
    }
    store.damage_row(3, 1);

    let positions = |page: Result<Vec<cqrs::PersistableDomainEvent>, CQRSError>| {
        page.map(|events| events.iter().map(|e| e.position).collect::<Vec<_>>())
    };
    assert_eq!(
        positions(store.read_all(0, 10).await).ok(),
        Some(vec![1, 2])
    );
    match store.read_all(2, 10).await {
        Err(CQRSError::DamagedRow(row)) => assert_eq!(row.position, 3),
        other => panic!("expected the damaged row at 3, got {other:?}"),
    }
    // One failing page was scripted: the row reads again.
    assert_eq!(
        positions(store.read_all(2, 10).await).ok(),
        Some(vec![3, 4])
    );
    // Every page was asked of the store, the failed one included.
    assert_eq!(store.calls().read_all, 3);
}

#[tokio::test]
async fn a_store_without_notifications_gives_no_receiver_until_healed() {
    let store = FaultyStore::new();
    assert!(store.subscribe().is_some());
    store.without_notifications();
    assert!(store.subscribe().is_none());
    store.heal();
    assert!(store.subscribe().is_some());
}
