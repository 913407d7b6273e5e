//! The [`SnapshotRepository`] conformance suite: the snapshot store contract, and what the
//! framework does on that store with snapshots the events do not confirm.
//!
//! A store author implements [`SnapshotHarness`] (a fresh event store and snapshot store
//! pair, and a way to write a snapshot row behind the store's back) and calls
//! [`check_snapshot_repository`]. Every clause has its own `check_*` function too. A check
//! panics on the first violation with a message that starts with
//! ``store conformance check `NAME` failed:``.

use std::fmt::{Debug, Display};
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DomainEvent, EventRepository, MemoryEventRepository,
    MemorySnapshotRepository, Snapshot, SnapshotPolicy, SnapshotRepository,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

/// What the snapshot conformance suite needs to know about a store: how to get a fresh event
/// store with its snapshot store, and how to write a snapshot row behind the snapshot store's
/// back (a backup restored from another environment, a hand edit).
///
/// For a store that keeps events and snapshots in one database (SQLite, PostgreSQL), both
/// halves of [`fresh`](SnapshotHarness::fresh) are handles on the same new database.
///
/// ```
/// use cqrs::{MemoryEventRepository, MemorySnapshotRepository, Snapshot, SnapshotRepository};
/// use cqrs_testkit::conformance::{check_snapshot_repository, SnapshotHarness};
///
/// /// Wraps the memory stores to show the shape; a SQL harness writes the row with SQL.
/// struct MyHarness;
///
/// impl SnapshotHarness for MyHarness {
///     type Events = MemoryEventRepository;
///     type Snapshots = MemorySnapshotRepository;
///
///     async fn fresh(&self) -> (Self::Events, Self::Snapshots) {
///         (MemoryEventRepository::new(), MemorySnapshotRepository::new())
///     }
///
///     async fn put_snapshot_unchecked(&self, snapshots: &Self::Snapshots, snapshot: Snapshot) {
///         // e.g. INSERT ... ON CONFLICT DO UPDATE, with no condition on the sequence
///         snapshots.delete_snapshot(&snapshot.aggregate_type, snapshot.aggregate_id).await.unwrap();
///         snapshots.save_snapshot(snapshot).await.unwrap();
///     }
/// }
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// check_snapshot_repository(&MyHarness).await;
/// # });
/// ```
pub trait SnapshotHarness: Send + Sync {
    /// The event store the snapshots belong with.
    type Events: EventRepository + 'static;
    /// The snapshot store under test.
    type Snapshots: SnapshotRepository + 'static;

    /// A new, empty event store and its snapshot store, shared with no other test.
    fn fresh(&self) -> impl Future<Output = (Self::Events, Self::Snapshots)> + Send;

    /// Stores `snapshot` as its aggregate's snapshot whatever is stored (at any sequence,
    /// higher or lower), bypassing the store's "newest wins" rule: a row restored or edited
    /// behind the store's back. Panics if it cannot.
    fn put_snapshot_unchecked(
        &self,
        snapshots: &Self::Snapshots,
        snapshot: Snapshot,
    ) -> impl Future<Output = ()> + Send;
}

/// The in-memory stores' harness: [`MemoryEventRepository`] with a
/// [`MemorySnapshotRepository`]; a row is put behind the store's back with
/// [`delete_snapshot`](SnapshotRepository::delete_snapshot) and
/// [`save_snapshot`](SnapshotRepository::save_snapshot).
///
/// ```
/// use cqrs_testkit::conformance::{check_snapshot_ahead_of_stream, MemorySnapshotHarness};
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// check_snapshot_ahead_of_stream(&MemorySnapshotHarness).await;
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MemorySnapshotHarness;

impl SnapshotHarness for MemorySnapshotHarness {
    type Events = MemoryEventRepository;
    type Snapshots = MemorySnapshotRepository;

    async fn fresh(&self) -> (MemoryEventRepository, MemorySnapshotRepository) {
        (
            MemoryEventRepository::new(),
            MemorySnapshotRepository::new(),
        )
    }

    async fn put_snapshot_unchecked(
        &self,
        snapshots: &MemorySnapshotRepository,
        snapshot: Snapshot,
    ) {
        let key = format!("{} {}", snapshot.aggregate_type, snapshot.aggregate_id);
        if let Err(error) = snapshots
            .delete_snapshot(&snapshot.aggregate_type, snapshot.aggregate_id)
            .await
        {
            panic!("MemorySnapshotHarness::put_snapshot_unchecked: delete of {key}: {error}");
        }
        if let Err(error) = snapshots.save_snapshot(snapshot).await {
            panic!("MemorySnapshotHarness::put_snapshot_unchecked: save of {key}: {error}");
        }
    }
}

/// Runs every check of the [`SnapshotRepository`] contract, one after the other, each on a
/// fresh pair of stores; panics on the first violation with a message naming the check.
///
/// The checks, in order: [`check_snapshot_round_trip`], [`check_snapshot_newest_wins`],
/// [`check_snapshot_isolation`], [`check_delete_snapshot`], [`check_undecodable_snapshot`],
/// [`check_snapshot_ahead_of_stream`], [`check_concurrent_snapshot_repairs`].
///
/// [`check_concurrent_snapshot_repairs`] spawns tasks with `tokio::spawn`: run it inside a
/// multi-threaded Tokio runtime (`#[tokio::test(flavor = "multi_thread")]`) so the loaders
/// really race.
///
/// ```
/// use cqrs_testkit::conformance::{check_snapshot_repository, MemorySnapshotHarness};
///
/// #[tokio::test(flavor = "multi_thread")]
/// async fn memory_snapshots_conform() {
///     check_snapshot_repository(&MemorySnapshotHarness).await;
/// }
/// # fn main() {}
/// ```
pub async fn check_snapshot_repository<H: SnapshotHarness>(harness: &H) {
    check_snapshot_round_trip(harness).await;
    check_snapshot_newest_wins(harness).await;
    check_snapshot_isolation(harness).await;
    check_delete_snapshot(harness).await;
    check_undecodable_snapshot(harness).await;
    check_snapshot_ahead_of_stream(harness).await;
    check_concurrent_snapshot_repairs(harness).await;
}

// ---------------------------------------------------------------------------------------
// The suite's own domain: a book that is lent and returned, so that a command's outcome
// depends on the state it is decided on.

/// The aggregate type the framework checks write under.
const BOOK: &str = "conformance_book";
/// Aggregate types for the store-level checks.
const SNAPSHOTTED: &str = "conformance_snapshotted";
const OTHER_SNAPSHOTTED: &str = "conformance_snapshotted_other";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum BookEvent {
    Lent { to: String },
    Returned,
}

impl DomainEvent for BookEvent {
    const EVENT_TYPES: &'static [cqrs::EventType] = &[
        cqrs::EventType::new("ConformanceBookLent", "1"),
        cqrs::EventType::new("ConformanceBookReturned", "1"),
    ];

    fn persisted_event_name(&self) -> &'static str {
        match self {
            BookEvent::Lent { .. } => "ConformanceBookLent",
            BookEvent::Returned => "ConformanceBookReturned",
        }
    }

    fn persisted_event_version(&self) -> &'static str {
        "1"
    }
}

#[derive(Debug, Clone)]
enum BookCommand {
    Lend(String),
    Return,
}

/// The book's refusal, or a framework error.
#[derive(Debug)]
enum BookError {
    AlreadyLent(String),
    NotLent,
    Framework(CQRSError),
}

impl Display for BookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BookError::AlreadyLent(to) => write!(f, "the book is lent to {to}"),
            BookError::NotLent => f.write_str("the book is not lent"),
            BookError::Framework(error) => Display::fmt(error, f),
        }
    }
}

impl std::error::Error for BookError {}

impl From<CQRSError> for BookError {
    fn from(error: CQRSError) -> Self {
        BookError::Framework(error)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct BookState {
    lent_to: Option<String>,
    loans: u64,
}

#[derive(Debug, Default)]
struct ConformanceBook;

impl Aggregate for ConformanceBook {
    const NAME: &'static str = BOOK;
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
        match event {
            BookEvent::Lent { to } => {
                state.lent_to = Some(to.clone());
                state.loans += 1;
            }
            BookEvent::Returned => state.lent_to = None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reporting and helpers.

#[track_caller]
fn fail(check: &str, message: impl Display) -> ! {
    panic!("store conformance check `{check}` failed: {message}")
}

/// The result's value, or a failure naming the operation.
#[track_caller]
fn ok<T, E: Display + Debug>(check: &str, what: &str, result: Result<T, E>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => fail(
            check,
            format_args!("{what} returned an error: {error} ({error:?})"),
        ),
    }
}

/// A snapshot with a timestamp of whole microseconds that differs per sequence.
fn snapshot(aggregate_type: &str, id: Uuid, sequence: i64, state: Value) -> Snapshot {
    // 2024-02-29T12:34:56.123456Z plus `sequence` seconds and microseconds.
    let micros = 1_709_210_096_123_456 + sequence * 1_000_001;
    Snapshot {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: id,
        sequence,
        state,
        timestamp: DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default(),
    }
}

/// A state that exercises escaping, unicode, nesting, nulls and integers beyond `f64`'s
/// exact range, marked with `mark`.
fn rich_state(mark: i64) -> Value {
    json!({
        "mark": mark,
        "name": "Zoë \"the book\" \\ №1 ✓ 日本語",
        "lines": "line\nbreak\ttab",
        "exact": 9_007_199_254_740_993_u64,
        "negative": -42,
        "ratio": 2.5,
        "nested": { "list": [1, "two", null, { "deep": true }], "empty": {} },
        "absent": null,
    })
}

async fn load<S: SnapshotRepository + ?Sized>(
    check: &str,
    snapshots: &S,
    aggregate_type: &str,
    id: Uuid,
) -> Option<Snapshot> {
    ok(
        check,
        &format!("load_snapshot({aggregate_type} {id})"),
        snapshots.load_snapshot(aggregate_type, id).await,
    )
}

async fn save<S: SnapshotRepository + ?Sized>(check: &str, snapshots: &S, snapshot: Snapshot) {
    let what = format!(
        "save_snapshot({} {} at {})",
        snapshot.aggregate_type, snapshot.aggregate_id, snapshot.sequence
    );
    ok(check, &what, snapshots.save_snapshot(snapshot).await);
}

async fn delete<S: SnapshotRepository + ?Sized>(
    check: &str,
    snapshots: &S,
    aggregate_type: &str,
    id: Uuid,
) {
    ok(
        check,
        &format!("delete_snapshot({aggregate_type} {id})"),
        snapshots.delete_snapshot(aggregate_type, id).await,
    );
}

/// Fails unless the stored snapshot of the aggregate is exactly `expected`, field by field.
async fn assert_stored<S: SnapshotRepository + ?Sized>(
    check: &str,
    snapshots: &S,
    what: &str,
    aggregate_type: &str,
    id: Uuid,
    expected: Option<&Snapshot>,
) {
    let stored = load(check, snapshots, aggregate_type, id).await;
    let (expected, stored) = match (expected, stored) {
        (None, None) => return,
        (Some(expected), Some(stored)) => (expected, stored),
        (expected, stored) => fail(
            check,
            format_args!(
                "{what}: load_snapshot({aggregate_type} {id}) returned {stored:?}, expected {expected:?}"
            ),
        ),
    };
    macro_rules! field {
        ($name:ident) => {
            if expected.$name != stored.$name {
                fail(
                    check,
                    format_args!(
                        "{what}: load_snapshot({aggregate_type} {id}): field `{}` differs: expected {:?}, stored {:?}",
                        stringify!($name),
                        expected.$name,
                        stored.$name
                    ),
                );
            }
        };
    }
    field!(aggregate_type);
    field!(aggregate_id);
    field!(sequence);
    field!(state);
    field!(timestamp);
}

/// A framework for the book on the harness's stores, with no state cache (every dispatch
/// loads from the store) and snapshots saved as `policy` says.
fn book_framework<E, S>(
    events: &Arc<E>,
    snapshots: &Arc<S>,
    policy: SnapshotPolicy,
) -> CQRSFramework<ConformanceBook>
where
    E: EventRepository + 'static,
    S: SnapshotRepository + 'static,
{
    CQRSFramework::<ConformanceBook>::new(Arc::clone(events))
        .with_snapshots(Arc::clone(snapshots), policy)
        .without_state_cache()
}

/// Lends the book to ada, takes it back and lends it to bob: 3 events, the book with bob.
async fn lend_return_lend(check: &str, framework: &CQRSFramework<ConformanceBook>, id: Uuid) {
    for command in [
        BookCommand::Lend("ada".into()),
        BookCommand::Return,
        BookCommand::Lend("bob".into()),
    ] {
        let what = format!("dispatch {command:?} on a book with its true history");
        ok(check, &what, framework.dispatch(id, command).await);
    }
}

fn with_bob() -> BookState {
    BookState {
        lent_to: Some("bob".into()),
        loans: 2,
    }
}

fn book_snapshot(id: Uuid, sequence: i64, state: &BookState) -> Snapshot {
    let state = match serde_json::to_value(state) {
        Ok(state) => state,
        Err(error) => panic!("conformance suite: its own state does not serialize: {error}"),
    };
    snapshot(BOOK, id, sequence, state)
}

/// Fails unless the book's stored snapshot is at `sequence` and holds `state`.
async fn assert_book_snapshot<S: SnapshotRepository + ?Sized>(
    check: &str,
    snapshots: &S,
    what: &str,
    id: Uuid,
    expected: Option<(i64, &BookState)>,
) {
    let stored = load(check, snapshots, BOOK, id).await.map(|snapshot| {
        let state = serde_json::from_value::<BookState>(snapshot.state.clone());
        (snapshot.sequence, state.map_err(|_| snapshot.state))
    });
    let matches = match (&stored, expected) {
        (None, None) => true,
        (Some((sequence, Ok(state))), Some((expected_sequence, expected_state))) => {
            *sequence == expected_sequence && state == expected_state
        }
        _ => false,
    };
    if !matches {
        fail(
            check,
            format_args!(
                "{what}: the stored snapshot is {stored:?} (sequence, state), expected {expected:?}"
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------
// The checks.

/// `load_snapshot` of an aggregate with no snapshot is `None`; a saved snapshot loads back
/// exactly: aggregate type and id, sequence, state (unicode, escapes, nesting, nulls, 64-bit
/// integers) and the timestamp to the microsecond.
pub async fn check_snapshot_round_trip<H: SnapshotHarness>(harness: &H) {
    const CHECK: &str = "snapshot_round_trip";
    let (_events, snapshots) = harness.fresh().await;
    let id = Uuid::new_v4();
    assert_stored(CHECK, &snapshots, "before any save", SNAPSHOTTED, id, None).await;
    let saved = snapshot(SNAPSHOTTED, id, 7, rich_state(7));
    save(CHECK, &snapshots, saved.clone()).await;
    assert_stored(
        CHECK,
        &snapshots,
        "after a save",
        SNAPSHOTTED,
        id,
        Some(&saved),
    )
    .await;
}

/// A snapshot is stored unless one at a higher sequence is: saving an older snapshot keeps
/// the newer one (state and all), saving one at the same sequence replaces it (how a
/// snapshot that no longer decodes is rewritten), and a newer one replaces it.
pub async fn check_snapshot_newest_wins<H: SnapshotHarness>(harness: &H) {
    const CHECK: &str = "snapshot_newest_wins";
    let (_events, snapshots) = harness.fresh().await;
    let id = Uuid::new_v4();
    let newer = snapshot(SNAPSHOTTED, id, 20, rich_state(20));
    save(CHECK, &snapshots, newer.clone()).await;
    save(
        CHECK,
        &snapshots,
        snapshot(SNAPSHOTTED, id, 10, rich_state(10)),
    )
    .await;
    assert_stored(
        CHECK,
        &snapshots,
        "after saving sequence 10 over 20 (the older one must not replace the newer)",
        SNAPSHOTTED,
        id,
        Some(&newer),
    )
    .await;
    let mut same = snapshot(SNAPSHOTTED, id, 20, json!({ "rewritten": true }));
    same.timestamp = newer.timestamp + chrono::TimeDelta::microseconds(1);
    save(CHECK, &snapshots, same.clone()).await;
    assert_stored(
        CHECK,
        &snapshots,
        "after saving another snapshot at the same sequence 20 (it must replace it)",
        SNAPSHOTTED,
        id,
        Some(&same),
    )
    .await;
    let newest = snapshot(SNAPSHOTTED, id, 30, rich_state(30));
    save(CHECK, &snapshots, newest.clone()).await;
    assert_stored(
        CHECK,
        &snapshots,
        "after saving sequence 30 over 20",
        SNAPSHOTTED,
        id,
        Some(&newest),
    )
    .await;
}

/// An aggregate's snapshot is keyed by its type and id: the same id under another type and
/// another id under the same type keep their own snapshots through saves (higher and lower
/// sequences) and deletes of the others.
pub async fn check_snapshot_isolation<H: SnapshotHarness>(harness: &H) {
    const CHECK: &str = "snapshot_isolation";
    let (_events, snapshots) = harness.fresh().await;
    let id = Uuid::new_v4();
    let other_id = Uuid::new_v4();
    let mine = snapshot(SNAPSHOTTED, id, 5, rich_state(5));
    let same_id_other_type = snapshot(OTHER_SNAPSHOTTED, id, 6, rich_state(6));
    let same_type_other_id = snapshot(SNAPSHOTTED, other_id, 7, rich_state(7));
    for saved in [&mine, &same_id_other_type, &same_type_other_id] {
        save(CHECK, &snapshots, saved.clone()).await;
    }
    let all = [
        (SNAPSHOTTED, id, &mine),
        (OTHER_SNAPSHOTTED, id, &same_id_other_type),
        (SNAPSHOTTED, other_id, &same_type_other_id),
    ];
    for (aggregate_type, aggregate_id, expected) in all {
        let what =
            "after saving three aggregates' snapshots (same id, other type; same type, other id)";
        assert_stored(
            CHECK,
            &snapshots,
            what,
            aggregate_type,
            aggregate_id,
            Some(expected),
        )
        .await;
    }
    // A higher sequence on one aggregate does not hide a lower one on another.
    let replaced = snapshot(OTHER_SNAPSHOTTED, id, 100, rich_state(100));
    save(CHECK, &snapshots, replaced.clone()).await;
    let what = format!("after saving {OTHER_SNAPSHOTTED} {id} at 100");
    assert_stored(CHECK, &snapshots, &what, SNAPSHOTTED, id, Some(&mine)).await;
    assert_stored(
        CHECK,
        &snapshots,
        &what,
        OTHER_SNAPSHOTTED,
        id,
        Some(&replaced),
    )
    .await;
    assert_stored(
        CHECK,
        &snapshots,
        &what,
        SNAPSHOTTED,
        other_id,
        Some(&same_type_other_id),
    )
    .await;
    delete(CHECK, &snapshots, SNAPSHOTTED, id).await;
    let what = format!("after deleting {SNAPSHOTTED} {id}");
    assert_stored(CHECK, &snapshots, &what, SNAPSHOTTED, id, None).await;
    assert_stored(
        CHECK,
        &snapshots,
        &what,
        OTHER_SNAPSHOTTED,
        id,
        Some(&replaced),
    )
    .await;
    assert_stored(
        CHECK,
        &snapshots,
        &what,
        SNAPSHOTTED,
        other_id,
        Some(&same_type_other_id),
    )
    .await;
}

/// `delete_snapshot` removes the snapshot whatever its sequence, and forgets it: a snapshot
/// at a lower sequence can be saved afterwards. Deleting what is not there succeeds.
pub async fn check_delete_snapshot<H: SnapshotHarness>(harness: &H) {
    const CHECK: &str = "delete_snapshot";
    let (_events, snapshots) = harness.fresh().await;
    let id = Uuid::new_v4();
    delete(CHECK, &snapshots, SNAPSHOTTED, id).await;
    assert_stored(
        CHECK,
        &snapshots,
        "after deleting nothing",
        SNAPSHOTTED,
        id,
        None,
    )
    .await;
    save(
        CHECK,
        &snapshots,
        snapshot(SNAPSHOTTED, id, 10, rich_state(10)),
    )
    .await;
    delete(CHECK, &snapshots, SNAPSHOTTED, id).await;
    assert_stored(
        CHECK,
        &snapshots,
        "after deleting the snapshot at 10",
        SNAPSHOTTED,
        id,
        None,
    )
    .await;
    let lower = snapshot(SNAPSHOTTED, id, 3, rich_state(3));
    save(CHECK, &snapshots, lower.clone()).await;
    assert_stored(
        CHECK,
        &snapshots,
        "after deleting the snapshot at 10 and saving one at 3",
        SNAPSHOTTED,
        id,
        Some(&lower),
    )
    .await;
    delete(CHECK, &snapshots, SNAPSHOTTED, id).await;
    delete(CHECK, &snapshots, SNAPSHOTTED, id).await;
    assert_stored(
        CHECK,
        &snapshots,
        "after deleting twice",
        SNAPSHOTTED,
        id,
        None,
    )
    .await;
}

/// A snapshot whose state no longer decodes into the aggregate's state (the state type
/// changed) is not used: `CQRSFramework::load` replays the events, and the snapshot is
/// rewritten from the replay, at the stream's sequence, both when it was at that sequence
/// and when it was also ahead of the stream.
pub async fn check_undecodable_snapshot<H: SnapshotHarness>(harness: &H) {
    const CHECK: &str = "undecodable_snapshot";
    let (events, snapshots) = harness.fresh().await;
    let (events, snapshots) = (Arc::new(events), Arc::new(snapshots));
    let id = Uuid::new_v4();
    // The framework saves the snapshot at 3 itself.
    let writer = book_framework(&events, &snapshots, SnapshotPolicy::every(3));
    lend_return_lend(CHECK, &writer, id).await;
    assert_book_snapshot(
        CHECK,
        snapshots.as_ref(),
        "after 3 events with a snapshot every 3",
        id,
        Some((3, &with_bob())),
    )
    .await;
    for sequence in [3, 9] {
        let undecodable = snapshot(
            BOOK,
            id,
            sequence,
            json!({ "lent_to": 42, "loans": "many" }),
        );
        harness
            .put_snapshot_unchecked(&snapshots, undecodable)
            .await;
        let reader = book_framework(&events, &snapshots, SnapshotPolicy::Never);
        let what = format!(
            "CQRSFramework::load with an undecodable snapshot at {sequence} (3 events stored)"
        );
        let loaded = ok(CHECK, &what, reader.load(id).await);
        if loaded != with_bob() {
            fail(
                CHECK,
                format_args!(
                    "{what} returned {loaded:?}, expected the replay {:?}",
                    with_bob()
                ),
            );
        }
        assert_book_snapshot(
            CHECK,
            snapshots.as_ref(),
            &format!("after {what}"),
            id,
            Some((3, &with_bob())),
        )
        .await;
    }
}

/// A snapshot ahead of its stream (at 10 while the stream holds 3 events: events removed, a
/// backup restored from elsewhere) or at sequence 0 is not decided on: `CQRSFramework::load`
/// returns the replayed state; afterwards the stored snapshot is the replay at the stream's
/// sequence (no longer beyond it); a command decided on the true state succeeds and the
/// next ones go on from it; without events the snapshot is removed.
pub async fn check_snapshot_ahead_of_stream<H: SnapshotHarness>(harness: &H) {
    const CHECK: &str = "snapshot_ahead_of_stream";
    let (events, snapshots) = harness.fresh().await;
    let (events, snapshots) = (Arc::new(events), Arc::new(snapshots));
    // What the bad snapshots claim: the book returned, a state the events never produced.
    let returned = BookState {
        lent_to: None,
        loans: 7,
    };
    let id = Uuid::new_v4();
    lend_return_lend(
        CHECK,
        &book_framework(&events, &snapshots, SnapshotPolicy::Never),
        id,
    )
    .await;
    for sequence in [10, 0] {
        harness
            .put_snapshot_unchecked(&snapshots, book_snapshot(id, sequence, &returned))
            .await;
        let framework = book_framework(&events, &snapshots, SnapshotPolicy::Never);
        let what = format!("CQRSFramework::load with a snapshot at {sequence} and 3 events stored");
        let loaded = ok(CHECK, &what, framework.load(id).await);
        if loaded != with_bob() {
            fail(
                CHECK,
                format_args!(
                    "{what} returned {loaded:?}, expected the replay {:?} (the snapshot was decided on)",
                    with_bob()
                ),
            );
        }
        assert_book_snapshot(
            CHECK,
            snapshots.as_ref(),
            &format!("after {what}"),
            id,
            Some((3, &with_bob())),
        )
        .await;
    }

    // The first thing after the bad row is put back is a command decided on the state.
    harness
        .put_snapshot_unchecked(&snapshots, book_snapshot(id, 10, &returned))
        .await;
    let framework = book_framework(&events, &snapshots, SnapshotPolicy::Never);
    let what = "dispatch Return with a snapshot at 10 claiming the book is back (3 events stored, the book is with bob)";
    let receipt = ok(
        CHECK,
        what,
        framework.dispatch(id, BookCommand::Return).await,
    );
    if receipt.sequence != 4 {
        fail(
            CHECK,
            format_args!(
                "{what}: appended at sequence {}, expected 4",
                receipt.sequence
            ),
        );
    }
    let what = "dispatch Lend after it";
    let receipt = ok(
        CHECK,
        what,
        framework.dispatch(id, BookCommand::Lend("cy".into())).await,
    );
    if receipt.sequence != 5 {
        fail(
            CHECK,
            format_args!(
                "{what}: appended at sequence {}, expected 5",
                receipt.sequence
            ),
        );
    }
    let stream = ok(
        CHECK,
        "event_sequence",
        events.event_sequence(BOOK, id).await,
    );
    if stream != 5 {
        fail(
            CHECK,
            format_args!("after two dispatches the stream ends at {stream}, expected 5"),
        );
    }
    let stored = load(CHECK, snapshots.as_ref(), BOOK, id).await;
    if let Some(snapshot) = stored.filter(|snapshot| snapshot.sequence > stream) {
        fail(
            CHECK,
            format_args!(
                "after the dispatches the stored snapshot still claims sequence {} beyond the stream's {stream}",
                snapshot.sequence
            ),
        );
    }

    // No events at all: the snapshot is removed, and the first command starts at 1.
    let new_id = Uuid::new_v4();
    for sequence in [5, 0] {
        harness
            .put_snapshot_unchecked(&snapshots, book_snapshot(new_id, sequence, &with_bob()))
            .await;
        let framework = book_framework(&events, &snapshots, SnapshotPolicy::Never);
        let what = format!(
            "CQRSFramework::load of an aggregate without events with a snapshot at {sequence}"
        );
        let loaded = ok(CHECK, &what, framework.load(new_id).await);
        if loaded != BookState::default() {
            fail(
                CHECK,
                format_args!("{what} returned {loaded:?}, expected the empty state"),
            );
        }
        assert_book_snapshot(
            CHECK,
            snapshots.as_ref(),
            &format!("after {what}"),
            new_id,
            None,
        )
        .await;
    }
    harness
        .put_snapshot_unchecked(&snapshots, book_snapshot(new_id, 5, &with_bob()))
        .await;
    let framework = book_framework(&events, &snapshots, SnapshotPolicy::Never);
    let what =
        "dispatch Lend on an aggregate without events with a snapshot at 5 claiming it is lent";
    let receipt = ok(
        CHECK,
        what,
        framework
            .dispatch(new_id, BookCommand::Lend("dee".into()))
            .await,
    );
    if receipt.sequence != 1 {
        fail(
            CHECK,
            format_args!(
                "{what}: appended at sequence {}, expected 1",
                receipt.sequence
            ),
        );
    }
}

/// Loaders that find the same snapshot ahead of its stream at once, each replacing it, are
/// harmless: 8 concurrent `CQRSFramework::load`s (each on its own framework) all return the
/// replayed state, and the stored snapshot is then the replay at the stream's sequence.
pub async fn check_concurrent_snapshot_repairs<H: SnapshotHarness>(harness: &H) {
    const CHECK: &str = "concurrent_snapshot_repairs";
    const LOADERS: usize = 8;
    let (events, snapshots) = harness.fresh().await;
    let (events, snapshots) = (Arc::new(events), Arc::new(snapshots));
    let id = Uuid::new_v4();
    lend_return_lend(
        CHECK,
        &book_framework(&events, &snapshots, SnapshotPolicy::Never),
        id,
    )
    .await;
    let returned = BookState {
        lent_to: None,
        loans: 7,
    };
    for round in 0..5 {
        let sequence = 10 + round;
        harness
            .put_snapshot_unchecked(&snapshots, book_snapshot(id, sequence, &returned))
            .await;
        let loaders: Vec<_> = (0..LOADERS)
            .map(|_| {
                let framework = book_framework(&events, &snapshots, SnapshotPolicy::Never);
                tokio::spawn(async move { framework.load(id).await })
            })
            .collect();
        for loader in loaders {
            let what = format!("one of {LOADERS} concurrent loads with a snapshot at {sequence} and 3 events stored");
            let loaded = match loader.await {
                Ok(result) => ok(CHECK, &what, result),
                Err(join) => fail(CHECK, format_args!("{what}: the task failed: {join}")),
            };
            if loaded != with_bob() {
                fail(
                    CHECK,
                    format_args!(
                        "{what} returned {loaded:?}, expected the replay {:?}",
                        with_bob()
                    ),
                );
            }
        }
        assert_book_snapshot(
            CHECK,
            snapshots.as_ref(),
            &format!("after {LOADERS} concurrent loads with a snapshot at {sequence}"),
            id,
            Some((3, &with_bob())),
        )
        .await;
    }
}
