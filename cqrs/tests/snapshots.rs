//! Snapshots the events do not confirm: a snapshot ahead of its stream (events removed, a
//! snapshot restored from elsewhere), at sequence 0 or below, or one that does not decode is
//! never decided on; the framework replays the history and repairs the row. A confirmed
//! snapshot costs one read of the events, and the event at its sequence is not decoded.

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DomainEvent, EventRepository, MemoryEventRepository,
    MemorySnapshotRepository, Payload, Snapshot, SnapshotPolicy, SnapshotRepository,
};
use cqrs_testkit::FaultyStore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum BookEvent {
    #[event(name = "Lent", version = "1")]
    Lent { to: String },
    #[event(name = "Returned", version = "1")]
    Returned,
}

#[derive(Debug, Clone)]
enum BookCommand {
    Lend(String),
    Return,
}

#[derive(Debug, thiserror::Error)]
enum BookError {
    #[error("already lent to {0}")]
    AlreadyLent(String),
    #[error("not lent")]
    NotLent,
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct BookState {
    lent_to: Option<String>,
}

#[derive(Default)]
struct Book;

impl Aggregate for Book {
    const NAME: &'static str = "book";
    type Events = BookEvent;
    type Commands = BookCommand;
    type Errors = BookError;
    type State = BookState;

    async fn handle_command(
        &self,
        _id: Uuid,
        state: &BookState,
        command: BookCommand,
    ) -> Result<Vec<BookEvent>, BookError> {
        match (command, &state.lent_to) {
            (BookCommand::Lend(_), Some(to)) => Err(BookError::AlreadyLent(to.clone())),
            (BookCommand::Lend(to), None) => Ok(vec![BookEvent::Lent { to }]),
            (BookCommand::Return, Some(_)) => Ok(vec![BookEvent::Returned]),
            (BookCommand::Return, None) => Err(BookError::NotLent),
        }
    }

    fn handle_event(&self, state: &mut BookState, event: &BookEvent) {
        state.lent_to = match event {
            BookEvent::Lent { to } => Some(to.clone()),
            BookEvent::Returned => None,
        };
    }
}

fn lent_to(who: &str) -> BookState {
    BookState {
        lent_to: Some(who.to_owned()),
    }
}

/// Stores `state` at `sequence` as the book's snapshot, whatever is stored (a restored
/// backup, a hand edit).
async fn put_snapshot(snapshots: &MemorySnapshotRepository, id: Uuid, sequence: i64, state: Value) {
    snapshots.delete_snapshot(Book::NAME, id).await.unwrap();
    snapshots
        .save_snapshot(Snapshot {
            aggregate_type: Book::NAME.to_owned(),
            aggregate_id: id,
            sequence,
            state,
            timestamp: chrono::Utc::now(),
        })
        .await
        .unwrap();
}

async fn stored_snapshot(
    snapshots: &MemorySnapshotRepository,
    id: Uuid,
) -> Option<(i64, BookState)> {
    let snapshot = snapshots.load_snapshot(Book::NAME, id).await.unwrap()?;
    Some((
        snapshot.sequence,
        serde_json::from_value(snapshot.state).unwrap(),
    ))
}

/// A framework with an empty state cache, reading (and never saving on its own) snapshots.
fn framework(
    store: &MemoryEventRepository,
    snapshots: &MemorySnapshotRepository,
) -> CQRSFramework<Book> {
    CQRSFramework::<Book>::new(store.clone())
        .with_snapshots(snapshots.clone(), SnapshotPolicy::Never)
}

#[tokio::test]
async fn a_snapshot_ahead_of_its_stream_is_not_decided_on_and_is_replaced() {
    let store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    let id = Uuid::new_v4();
    framework(&store, &snapshots)
        .dispatch(id, BookCommand::Lend("ada".into()))
        .await
        .unwrap();
    // Restored from another environment: "returned", at a sequence this stream never had.
    put_snapshot(&snapshots, id, 10, json!({ "lent_to": null })).await;

    assert_eq!(
        framework(&store, &snapshots).load(id).await.unwrap(),
        lent_to("ada")
    );
    assert_eq!(
        stored_snapshot(&snapshots, id).await,
        Some((1, lent_to("ada")))
    );

    // Again, and this time the first thing is a command decided on the state.
    put_snapshot(&snapshots, id, 10, json!({ "lent_to": null })).await;
    let framework = framework(&store, &snapshots);
    let receipt = framework.dispatch(id, BookCommand::Return).await.unwrap();
    assert_eq!(receipt.sequence, 2);
    assert_eq!(
        stored_snapshot(&snapshots, id).await,
        Some((1, lent_to("ada")))
    );
    // Not stuck: the next commands append after the true last sequence.
    let receipt = framework
        .dispatch(id, BookCommand::Lend("bob".into()))
        .await
        .unwrap();
    assert_eq!(receipt.sequence, 3);
    assert_eq!(framework.load(id).await.unwrap(), lent_to("bob"));
    assert_eq!(store.event_sequence(Book::NAME, id).await.unwrap(), 3);
}

#[tokio::test]
async fn a_snapshot_of_an_aggregate_without_events_is_removed() {
    let store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    let id = Uuid::new_v4();
    put_snapshot(
        &snapshots,
        id,
        5,
        serde_json::to_value(lent_to("eve")).unwrap(),
    )
    .await;
    let framework = framework(&store, &snapshots);
    assert_eq!(framework.load(id).await.unwrap(), BookState::default());
    assert_eq!(stored_snapshot(&snapshots, id).await, None);

    put_snapshot(
        &snapshots,
        id,
        5,
        serde_json::to_value(lent_to("eve")).unwrap(),
    )
    .await;
    let receipt = framework
        .dispatch(id, BookCommand::Lend("ada".into()))
        .await
        .unwrap();
    assert_eq!(receipt.sequence, 1);
    assert_eq!(stored_snapshot(&snapshots, id).await, None);
}

#[tokio::test]
async fn a_snapshot_at_sequence_zero_or_below_is_ignored_and_replaced() {
    let store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    for sequence in [0, -3] {
        let with_events = Uuid::new_v4();
        framework(&store, &snapshots)
            .dispatch(with_events, BookCommand::Lend("ada".into()))
            .await
            .unwrap();
        put_snapshot(
            &snapshots,
            with_events,
            sequence,
            json!({ "lent_to": "eve" }),
        )
        .await;
        assert_eq!(
            framework(&store, &snapshots)
                .load(with_events)
                .await
                .unwrap(),
            lent_to("ada"),
            "snapshot at {sequence}"
        );
        assert_eq!(
            stored_snapshot(&snapshots, with_events).await,
            Some((1, lent_to("ada")))
        );

        let without_events = Uuid::new_v4();
        put_snapshot(
            &snapshots,
            without_events,
            sequence,
            json!({ "lent_to": "eve" }),
        )
        .await;
        assert_eq!(
            framework(&store, &snapshots)
                .load(without_events)
                .await
                .unwrap(),
            BookState::default(),
            "snapshot at {sequence}"
        );
        assert_eq!(stored_snapshot(&snapshots, without_events).await, None);
    }
}

#[tokio::test]
async fn an_undecodable_snapshot_is_rewritten_in_place_or_replaced_when_ahead() {
    let store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    let id = Uuid::new_v4();
    let framework = framework(&store, &snapshots);
    framework
        .dispatch(id, BookCommand::Lend("ada".into()))
        .await
        .unwrap();
    framework.dispatch(id, BookCommand::Return).await.unwrap();

    // At the stream's own sequence: rewritten there.
    put_snapshot(&snapshots, id, 2, json!({ "lent_to": 42 })).await;
    assert_eq!(framework.load(id).await.unwrap(), BookState::default());
    assert_eq!(
        stored_snapshot(&snapshots, id).await,
        Some((2, BookState::default()))
    );

    // Ahead of it too: replaced all the same.
    put_snapshot(&snapshots, id, 9, json!({ "lent_to": 42 })).await;
    assert_eq!(framework.load(id).await.unwrap(), BookState::default());
    assert_eq!(
        stored_snapshot(&snapshots, id).await,
        Some((2, BookState::default()))
    );
}

/// The (folds, `load_events`, `event_sequence`) a store was asked for.
fn reads(store: &FaultyStore) -> (usize, usize, usize) {
    let calls = store.calls();
    (calls.fold_events, calls.load_events, calls.event_sequence)
}

#[tokio::test]
async fn a_confirmed_snapshot_costs_one_read_and_its_own_event_is_not_decoded() {
    let store = FaultyStore::new();
    let snapshots = MemorySnapshotRepository::new();
    let id = Uuid::new_v4();
    let writer = CQRSFramework::<Book>::new(store.clone())
        .with_snapshots(snapshots.clone(), SnapshotPolicy::every(3));
    writer
        .dispatch(id, BookCommand::Lend("ada".into()))
        .await
        .unwrap();
    writer.dispatch(id, BookCommand::Return).await.unwrap();
    writer
        .dispatch(id, BookCommand::Lend("bob".into()))
        .await
        .unwrap();
    assert_eq!(
        stored_snapshot(&snapshots, id).await,
        Some((3, lent_to("bob")))
    );

    // The event at the snapshot's sequence no longer decodes: the snapshot holds it, so a
    // load through the snapshot never decodes it, while a full replay fails on it.
    assert!(store.store().update_unchecked(Book::NAME, id, 3, |event| {
        event.payload = Payload::from_value(&json!("not a book event"));
    }));
    let without_snapshots = CQRSFramework::<Book>::new(store.clone()).without_state_cache();
    assert!(matches!(
        without_snapshots.load(id).await,
        Err(BookError::Framework(CQRSError::EventDecode(_)))
    ));

    let reader = CQRSFramework::<Book>::new(store.clone())
        .with_snapshots(snapshots.clone(), SnapshotPolicy::every(3))
        .without_state_cache();
    let before = reads(&store);
    assert_eq!(reader.load(id).await.unwrap(), lent_to("bob"));
    let after = reads(&store);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (1, 0, 0),
        "(folds, load_events, event_sequence) of one load through a confirmed snapshot"
    );

    // The tail after the snapshot is folded as usual, still in one read per dispatch.
    let before = reads(&store);
    let receipt = reader.dispatch(id, BookCommand::Return).await.unwrap();
    assert_eq!(receipt.sequence, 4);
    assert_eq!(reader.load(id).await.unwrap(), BookState::default());
    let after = reads(&store);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (2, 0, 0)
    );
    assert_eq!(
        stored_snapshot(&snapshots, id).await,
        Some((3, lent_to("bob")))
    );
}

#[tokio::test]
async fn without_a_snapshot_store_a_load_is_one_read() {
    let store = FaultyStore::new();
    let id = Uuid::new_v4();
    let framework = CQRSFramework::<Book>::new(store.clone()).without_state_cache();
    framework
        .dispatch(id, BookCommand::Lend("ada".into()))
        .await
        .unwrap();
    let before = reads(&store);
    assert_eq!(framework.load(id).await.unwrap(), lent_to("ada"));
    let after = reads(&store);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (1, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loaders_repairing_the_same_snapshot_at_once_are_harmless() {
    let store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    let id = Uuid::new_v4();
    let writer = framework(&store, &snapshots);
    writer
        .dispatch(id, BookCommand::Lend("ada".into()))
        .await
        .unwrap();
    writer.dispatch(id, BookCommand::Return).await.unwrap();
    writer
        .dispatch(id, BookCommand::Lend("bob".into()))
        .await
        .unwrap();
    for round in 0..20 {
        put_snapshot(&snapshots, id, 10 + round, json!({ "lent_to": null })).await;
        let loaders: Vec<_> = (0..8)
            .map(|_| {
                let framework = framework(&store, &snapshots);
                tokio::spawn(async move { framework.load(id).await.unwrap() })
            })
            .collect();
        for loader in loaders {
            assert_eq!(loader.await.unwrap(), lent_to("bob"));
        }
        assert_eq!(
            stored_snapshot(&snapshots, id).await,
            Some((3, lent_to("bob")))
        );
    }
}
