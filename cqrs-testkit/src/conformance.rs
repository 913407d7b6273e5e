//! The [`EventRepository`] conformance suite: run the store contract against any store.
//!
//! A store author implements [`StoreHarness`] for the store (how to get a fresh, empty store,
//! and how to damage a stored row behind the store's back) and calls
//! [`check_event_repository`] from a test. Every clause of the contract documented on
//! [`EventRepository`] has its own `check_*` function too, so a failing clause can be run
//! (and debugged) alone.
//!
//! A check panics on the first violation, with a message that starts with
//! ``store conformance check `NAME` failed:`` and says what was expected and what the store
//! did. An error from the store where none is allowed is a violation too.
//!
//! The checks use their own small event type and aggregate (aggregate type
//! `conformance_counter`), so they need nothing from the domain of the application.
//!
//! # Suites and harnesses
//!
//! | suite | harness trait | harnesses shipped here |
//! | --- | --- | --- |
//! | [`check_event_repository`] | [`StoreHarness`] | [`MemoryHarness`]; `SqliteHarness` (feature `sqlite`); `PostgresHarness` (feature `postgres`) |
//! | [`check_snapshot_repository`] | [`SnapshotHarness`] | [`MemorySnapshotHarness`]; `SqliteHarness`; `PostgresHarness` |
//! | [`check_view_repository`] | [`ViewHarness`] | [`MemoryViewHarness`]; `SqliteHarness`; `PostgresHarness` |
//! | [`check_checkpoint_repository`] | [`CheckpointHarness`] | [`MemoryCheckpointHarness`]; `SqliteHarness`; `PostgresHarness` |
//! | [`check_dead_letter_repository`] | [`DeadLetterHarness`] (on a [`ViewHarness`]) | [`MemoryViewHarness`]; `SqliteHarness`; `PostgresHarness` |
//!
//! A store of your own implements the harness traits (below); testing your application
//! against SQLite or PostgreSQL, enable the testkit's feature and use the harness as it is.
//!
//! # Example
//!
//! The in-memory store runs the suite like this; a SQL store's harness creates a database
//! file or schema per [`fresh`](StoreHarness::fresh) call and edits rows with SQL.
//!
//! ```
//! use cqrs_testkit::conformance::{check_event_repository, MemoryHarness};
//!
//! #[tokio::test(flavor = "multi_thread")]
//! async fn memory_store_conforms() {
//!     check_event_repository(&MemoryHarness).await;
//! }
//! # fn main() {}
//! ```
//!
//! A harness for another store:
//!
//! ```
//! use cqrs::{EventRepository, MemoryEventRepository};
//! use cqrs_testkit::conformance::StoreHarness;
//! use uuid::Uuid;
//!
//! /// Wraps the memory store to show the shape; a real harness talks to its database.
//! struct MyHarness;
//!
//! impl StoreHarness for MyHarness {
//!     type Store = MemoryEventRepository;
//!
//!     async fn fresh(&self) -> Self::Store {
//!         MemoryEventRepository::new()
//!     }
//!
//!     async fn corrupt_payload(&self, store: &Self::Store, aggregate_type: &str, aggregate_id: Uuid, sequence: i64, raw: &str) {
//!         // e.g. UPDATE events SET payload = $raw WHERE ...
//!         let raw = cqrs::Payload::from_stored_unchecked(raw);
//!         assert!(store.update_unchecked(aggregate_type, aggregate_id, sequence, |e| e.payload = raw));
//!     }
//!
//!     async fn set_event_type(&self, store: &Self::Store, aggregate_type: &str, aggregate_id: Uuid, sequence: i64, event_type: &str) {
//!         assert!(store.update_unchecked(aggregate_type, aggregate_id, sequence, |e| e.event_type = event_type.into()));
//!     }
//!
//!     async fn delete_event(&self, store: &Self::Store, aggregate_type: &str, aggregate_id: Uuid, sequence: i64) {
//!         assert!(store.remove_from_history_unchecked(aggregate_type, aggregate_id, sequence));
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! // Single clauses can be run on their own:
//! use cqrs_testkit::conformance::{check_corrupt_payload, check_round_trip, check_sequence_gap, check_unknown_event_type};
//! check_round_trip(&MyHarness).await;
//! check_corrupt_payload(&MyHarness).await;
//! check_unknown_event_type(&MyHarness).await;
//! check_sequence_gap(&MyHarness).await;
//! # });
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DecodeError, DomainEvent, EventRepository,
    MemoryEventRepository, Payload, PersistableDomainEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

mod checkpoints;
mod dead_letters;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
mod postgres;
mod processes;
mod snapshots;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
mod sqlite;
mod views;
pub use checkpoints::{
    check_checkpoint_missing, check_checkpoint_names_independent, check_checkpoint_repository,
    check_checkpoint_round_trip, check_checkpoint_save_replaces, CheckpointHarness,
    MemoryCheckpointHarness,
};
pub use dead_letters::{
    check_dead_letter_record_and_skip, check_dead_letter_record_replaces,
    check_dead_letter_repository, check_dead_letter_round_trip, DeadLetterHarness,
};
#[cfg(feature = "postgres")]
pub use postgres::PostgresHarness;
pub use processes::{
    check_process_checkpoint_never_back, check_process_concurrent_writers, check_process_due,
    check_process_list, check_process_optimistic_version, check_process_round_trip,
    check_process_store,
};
pub use snapshots::{
    check_concurrent_snapshot_repairs, check_delete_snapshot, check_snapshot_ahead_of_stream,
    check_snapshot_isolation, check_snapshot_newest_wins, check_snapshot_repository,
    check_snapshot_round_trip, check_undecodable_snapshot, MemorySnapshotHarness, SnapshotHarness,
};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteHarness;
pub use views::{
    check_view_checkpoint_never_goes_back, check_view_commit_with_checkpoint,
    check_view_list_order, check_view_load_many, check_view_missing_row,
    check_view_optimistic_version, check_view_repository, check_view_round_trip,
    check_view_version_activation, check_view_versions_kept_apart, MemoryViewDatabase,
    MemoryViewHarness, ViewHarness,
};

/// What the conformance suite needs to know about a store: how to get an empty one, and how
/// to damage its rows behind its back (to check that damage is reported, not hidden).
///
/// The damage methods are test hooks only: they bypass every check of the store and are
/// called on events the suite itself appended. If the row is not there, they panic.
pub trait StoreHarness: Send + Sync {
    /// The store under test.
    type Store: EventRepository + 'static;

    /// A new, empty store that no other test shares (own file / own schema).
    fn fresh(&self) -> impl Future<Output = Self::Store> + Send;

    /// Replaces the stored payload of one event with `raw` text, bypassing all checks, to
    /// simulate corruption. `raw` may be invalid JSON; a store whose column cannot hold
    /// invalid JSON stores something that no longer decodes instead (e.g. the JSON string of
    /// `raw`).
    fn corrupt_payload(
        &self,
        store: &Self::Store,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        raw: &str,
    ) -> impl Future<Output = ()> + Send;

    /// Overwrites the event_type of one stored event, bypassing all checks.
    fn set_event_type(
        &self,
        store: &Self::Store,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        event_type: &str,
    ) -> impl Future<Output = ()> + Send;

    /// Deletes one stored event, leaving a hole in the aggregate's history.
    fn delete_event(
        &self,
        store: &Self::Store,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
    ) -> impl Future<Output = ()> + Send;

    /// Whether the store keeps a global order (the default): `append` returns increasing
    /// positions from 1 and `read_all` pages through every event in position order.
    ///
    /// A store without one (`false`) gives every event position 0 (none) and answers
    /// `read_all` with [`CQRSError::Unsupported`]. [`check_event_repository`] then runs
    /// [`check_no_global_order`] instead of [`check_global_order`] and
    /// [`check_read_all_past_a_damaged_row`], and the other checks compare what each
    /// aggregate involved loads (`load_events`) where they would compare `read_all`, so
    /// "nothing else was stored" is checked per aggregate of the check, not store-wide.
    fn global_order(&self) -> bool {
        true
    }
}

/// The in-memory store's harness.
///
/// Corruption goes through [`MemoryEventRepository::update_unchecked`] (a corrupted payload
/// is stored as the text `raw`, JSON or not, as a damaged SQL row would be) and holes
/// through [`MemoryEventRepository::remove_from_history_unchecked`].
///
/// ```
/// use cqrs_testkit::conformance::{check_atomic_batch, check_conflict, MemoryHarness};
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// check_conflict(&MemoryHarness).await;
/// check_atomic_batch(&MemoryHarness).await;
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryHarness;

impl StoreHarness for MemoryHarness {
    type Store = MemoryEventRepository;

    async fn fresh(&self) -> MemoryEventRepository {
        MemoryEventRepository::new()
    }

    async fn corrupt_payload(
        &self,
        store: &MemoryEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        raw: &str,
    ) {
        let found = store.update_unchecked(aggregate_type, aggregate_id, sequence, |event| {
            event.payload = Payload::from_stored_unchecked(raw);
        });
        assert!(
            found,
            "MemoryHarness::corrupt_payload: no event {aggregate_type} {aggregate_id} #{sequence}"
        );
    }

    async fn set_event_type(
        &self,
        store: &MemoryEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        event_type: &str,
    ) {
        let found = store.update_unchecked(aggregate_type, aggregate_id, sequence, |event| {
            event.event_type = event_type.into();
        });
        assert!(
            found,
            "MemoryHarness::set_event_type: no event {aggregate_type} {aggregate_id} #{sequence}"
        );
    }

    async fn delete_event(
        &self,
        store: &MemoryEventRepository,
        aggregate_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
    ) {
        let found = store.remove_from_history_unchecked(aggregate_type, aggregate_id, sequence);
        assert!(
            found,
            "MemoryHarness::delete_event: no event {aggregate_type} {aggregate_id} #{sequence}"
        );
    }
}

/// Runs every check of the [`EventRepository`] contract, one after the other, each on a
/// fresh store; panics on the first violation with a message naming the check.
///
/// The checks, in order: [`check_round_trip`], [`check_event_sequence`],
/// [`check_load_after_sequence`], [`check_conflict`], [`check_atomic_batch`],
/// [`check_invalid_batches`], [`check_idempotent_retry`], [`check_duplicate_event_id`],
/// [`check_global_order`], [`check_subscribe`], [`check_concurrent_appends`],
/// [`check_corrupt_payload`], [`check_unknown_event_type`], [`check_sequence_gap`],
/// [`check_read_all_past_a_damaged_row`], [`check_dispatch_new`],
/// [`check_correlation_round_trip`], [`check_events_caused_by`].
///
/// On a store without a global order ([`StoreHarness::global_order`] false),
/// [`check_no_global_order`] replaces [`check_global_order`], and
/// [`check_read_all_past_a_damaged_row`] is skipped (it is about `read_all`); the others run,
/// comparing per aggregate where they would compare `read_all`.
///
/// [`check_concurrent_appends`] spawns tasks with `tokio::spawn` and [`check_subscribe`]
/// waits with a timeout, so this must run inside a Tokio runtime with the time driver
/// (`#[tokio::test]` has it); use a multi-threaded one
/// (`#[tokio::test(flavor = "multi_thread")]`) so the appends really race. Each check
/// calls [`StoreHarness::fresh`] for its own store.
pub async fn check_event_repository<H: StoreHarness>(harness: &H) {
    check_round_trip(harness).await;
    check_event_sequence(harness).await;
    check_load_after_sequence(harness).await;
    check_conflict(harness).await;
    check_atomic_batch(harness).await;
    check_invalid_batches(harness).await;
    check_idempotent_retry(harness).await;
    check_duplicate_event_id(harness).await;
    check_duplicate_id_within_batch(harness).await;
    if harness.global_order() {
        check_global_order(harness).await;
    } else {
        check_no_global_order(harness).await;
    }
    check_subscribe(harness).await;
    check_concurrent_appends(harness).await;
    check_corrupt_payload(harness).await;
    check_unknown_event_type(harness).await;
    check_sequence_gap(harness).await;
    if harness.global_order() {
        check_read_all_past_a_damaged_row(harness).await;
    }
    check_dispatch_new(harness).await;
    check_correlation_round_trip(harness).await;
    check_events_caused_by(harness).await;
}

// ---------------------------------------------------------------------------------------
// The suite's own domain: a tiny event type (hand-written `DomainEvent`, so it does not
// depend on the derive) and an aggregate for the checks that go through `CQRSFramework`.

/// The aggregate type every check writes under.
const AGGREGATE: &str = "conformance_counter";
/// A second aggregate type, to check that the type is part of an aggregate's key.
const OTHER_AGGREGATE: &str = "conformance_other";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ConformanceEvent {
    Created {
        name: String,
        tags: Vec<String>,
    },
    Counted {
        n: u64,
        note: Option<String>,
        detail: Value,
    },
}

impl DomainEvent for ConformanceEvent {
    const EVENT_TYPES: &'static [cqrs::EventType] = &[
        cqrs::EventType::new("ConformanceCreated", "1"),
        cqrs::EventType::new("ConformanceCounted", "2"),
    ];

    fn persisted_event_name(&self) -> &'static str {
        match self {
            ConformanceEvent::Created { .. } => "ConformanceCreated",
            ConformanceEvent::Counted { .. } => "ConformanceCounted",
        }
    }

    fn persisted_event_version(&self) -> &'static str {
        match self {
            ConformanceEvent::Created { .. } => "1",
            ConformanceEvent::Counted { .. } => "2",
        }
    }
}

#[derive(Debug, Default)]
struct ConformanceCounter;

impl Aggregate for ConformanceCounter {
    const NAME: &'static str = AGGREGATE;
    type Events = ConformanceEvent;
    /// Count `n`: one `Counted` event.
    type Commands = u64;
    type Errors = CQRSError;
    type State = u64;

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &u64,
        n: u64,
    ) -> Result<Vec<ConformanceEvent>, CQRSError> {
        Ok(vec![ConformanceEvent::Counted {
            n,
            note: None,
            detail: Value::Null,
        }])
    }

    fn handle_event(&self, state: &mut u64, event: &ConformanceEvent) {
        if let ConformanceEvent::Counted { n, .. } = event {
            *state += n;
        }
    }
}

/// The event stored at `sequence`: `Created` first, then `Counted`, with payloads that
/// exercise escaping, unicode, nesting, nulls and integers beyond `f64`'s exact range.
fn domain_event(sequence: i64) -> ConformanceEvent {
    if sequence == 1 {
        ConformanceEvent::Created {
            name: "Zoë \"the counter\" \\ №1 ✓".to_owned(),
            tags: vec!["a".to_owned(), String::new(), "line\nbreak\ttab".to_owned()],
        }
    } else {
        ConformanceEvent::Counted {
            n: sequence.unsigned_abs(),
            note: (sequence % 2 == 0).then(|| format!("even {sequence} — 日本語")),
            detail: json!({
                "exact": 9_007_199_254_740_993_u64,
                "negative": -42,
                "ratio": 2.5,
                "nested": { "list": [1, "two", null, { "deep": true }], "empty": {} },
                "absent": null,
            }),
        }
    }
}

/// A stored-form event for `aggregate_type`/`id` at `sequence`, with a fresh id, metadata
/// (an object, or `null` every third event), a timestamp with whole microseconds, and
/// fresh correlation and causation ids (no correlation id every fourth event, no causation
/// id every second), so that every check also sees both fields kept.
fn event(aggregate_type: &str, id: Uuid, sequence: i64) -> PersistableDomainEvent {
    let domain = domain_event(sequence);
    let payload = match domain.to_payload() {
        Ok(payload) => payload,
        Err(error) => panic!("conformance suite: its own event does not serialize: {error}"),
    };
    let metadata = if sequence % 3 == 0 {
        Value::Null
    } else {
        json!({ "correlation_id": Uuid::new_v4().to_string(), "user": "conformance", "attempt": sequence })
    };
    // 2024-02-29T12:34:56.123456Z plus `sequence` seconds and microseconds.
    let micros = 1_709_210_096_123_456 + sequence * 1_000_001;
    let timestamp = DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default();
    PersistableDomainEvent {
        event_id: Uuid::new_v4(),
        aggregate_type_id: PersistableDomainEvent::type_id_for(aggregate_type, id),
        aggregate_id: id,
        aggregate_type: aggregate_type.into(),
        sequence,
        position: 0,
        event_type: domain.persisted_event_name().into(),
        event_version: domain.persisted_event_version().into(),
        payload,
        metadata,
        timestamp,
        correlation_id: (sequence % 4 != 0).then(Uuid::new_v4),
        causation_id: (sequence % 2 == 1).then(Uuid::new_v4),
    }
}

/// Events `from..=to` of one aggregate.
fn batch(aggregate_type: &str, id: Uuid, from: i64, to: i64) -> Vec<PersistableDomainEvent> {
    (from..=to)
        .map(|seq| event(aggregate_type, id, seq))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reporting.

#[track_caller]
fn fail(check: &str, message: impl std::fmt::Display) -> ! {
    panic!("store conformance check `{check}` failed: {message}")
}

/// The store's result, or a failure naming the operation.
#[track_caller]
fn ok<T>(check: &str, what: &str, result: Result<T, CQRSError>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => fail(
            check,
            format_args!("{what} returned an error: {error} ({error:?})"),
        ),
    }
}

/// The error the store returned, or a failure saying that it succeeded.
#[track_caller]
fn err<T: Debug>(check: &str, what: &str, result: Result<T, CQRSError>) -> CQRSError {
    match result {
        Ok(value) => fail(
            check,
            format_args!("{what} succeeded with {value:?}, but must fail"),
        ),
        Err(error) => error,
    }
}

/// The first field in which two stored events differ, if any.
fn first_difference(
    expected: &PersistableDomainEvent,
    actual: &PersistableDomainEvent,
) -> Option<String> {
    macro_rules! field {
        ($name:ident) => {
            if expected.$name != actual.$name {
                return Some(format!(
                    "field `{}` differs: expected {:?}, stored {:?}",
                    stringify!($name),
                    expected.$name,
                    actual.$name
                ));
            }
        };
    }
    field!(event_id);
    field!(aggregate_type_id);
    field!(aggregate_id);
    field!(aggregate_type);
    field!(sequence);
    field!(position);
    field!(event_type);
    field!(event_version);
    field!(payload);
    field!(metadata);
    field!(timestamp);
    field!(correlation_id);
    field!(causation_id);
    None
}

#[track_caller]
fn assert_same_events(
    check: &str,
    what: &str,
    expected: &[PersistableDomainEvent],
    actual: &[PersistableDomainEvent],
) {
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        if let Some(diff) = first_difference(e, a) {
            fail(
                check,
                format_args!(
                    "{what}: event {i} (sequence {}): {diff}\n  expected: {e:?}\n  stored:   {a:?}",
                    e.sequence
                ),
            );
        }
    }
    if expected.len() != actual.len() {
        fail(
            check,
            format_args!(
                "{what}: expected {} events (sequences {:?}), got {} (sequences {:?})",
                expected.len(),
                expected.iter().map(|e| e.sequence).collect::<Vec<_>>(),
                actual.len(),
                actual.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            ),
        );
    }
}

fn sequences(events: &[PersistableDomainEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence).collect()
}

async fn load_all<S: EventRepository + ?Sized>(
    check: &str,
    store: &S,
    aggregate_type: &str,
    id: Uuid,
) -> Vec<PersistableDomainEvent> {
    ok(
        check,
        "load_events",
        store.load_events(aggregate_type, id, 0).await,
    )
}

async fn read_everything<S: EventRepository + ?Sized>(
    check: &str,
    store: &S,
) -> Vec<PersistableDomainEvent> {
    ok(
        check,
        "read_all(0, 100000)",
        store.read_all(0, 100_000).await,
    )
}

/// Appends a batch that must succeed; returns it with the positions filled in.
async fn append_ok<S: EventRepository + ?Sized>(
    check: &str,
    store: &S,
    mut events: Vec<PersistableDomainEvent>,
) -> Vec<PersistableDomainEvent> {
    let what = format!(
        "append of {} {:?}",
        events.first().map_or("", |e| e.aggregate_type.as_str()),
        sequences(&events)
    );
    let positions = ok(check, &what, store.append(events.clone()).await);
    if positions.len() != events.len() {
        fail(
            check,
            format_args!(
                "{what} returned {} positions ({positions:?}) for {} events",
                positions.len(),
                events.len()
            ),
        );
    }
    for (event, position) in events.iter_mut().zip(positions) {
        event.position = position;
    }
    events
}

/// Fails unless the store holds exactly `expected` (in position order) in `read_all`; on a
/// store without a global order (`global` false), unless each aggregate of `expected` loads
/// exactly its events of `expected`, and `read_all` is [`CQRSError::Unsupported`].
async fn assert_store_holds<S: EventRepository + ?Sized>(
    global: bool,
    check: &str,
    store: &S,
    what: &str,
    expected: &[PersistableDomainEvent],
) {
    if !global {
        assert_read_all_unsupported(check, store).await;
        let mut aggregates: Vec<(&str, Uuid)> = Vec::new();
        for event in expected {
            let key = (event.aggregate_type.as_str(), event.aggregate_id);
            if !aggregates.contains(&key) {
                aggregates.push(key);
            }
        }
        for (aggregate_type, id) in aggregates {
            let mine: Vec<PersistableDomainEvent> = expected
                .iter()
                .filter(|e| e.aggregate_type == aggregate_type && e.aggregate_id == id)
                .cloned()
                .collect();
            let loaded = load_all(check, store, aggregate_type, id).await;
            assert_same_events(
                check,
                &format!("load_events of {aggregate_type} {id} after {what}"),
                &mine,
                &loaded,
            );
        }
        return;
    }
    let all = read_everything(check, store).await;
    assert_same_events(
        check,
        &format!("read_all after {what} (nothing may have been stored)"),
        expected,
        &all,
    );
}

/// Fails unless `read_all` answers [`CQRSError::Unsupported`]: a store without a global
/// order never returns a page that only looks like one.
async fn assert_read_all_unsupported<S: EventRepository + ?Sized>(check: &str, store: &S) {
    match store.read_all(0, 100).await {
        Err(CQRSError::Unsupported { .. }) => {}
        other => fail(
            check,
            format_args!(
                "read_all on a store without a global order must be CQRSError::Unsupported, got {:?}",
                other.map(|events| events.len())
            ),
        ),
    }
}

/// Fails unless every position in `positions` is 0: a store without a global order gives
/// its events none.
fn assert_no_positions(check: &str, what: &str, positions: &[i64]) {
    if positions.iter().any(|&p| p != 0) {
        fail(
            check,
            format_args!(
                "{what}: a store without a global order gives no positions (0), got {positions:?}"
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------
// The checks.

/// For a store without a global order ([`StoreHarness::global_order`] false): `append`
/// returns position 0 for every event, the events load with position 0, and `read_all` is
/// [`CQRSError::Unsupported`], on an empty store and on one with events of two aggregates.
pub async fn check_no_global_order<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "no_global_order";
    let store = harness.fresh().await;
    assert_read_all_unsupported(CHECK, &store).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let first = append_ok(CHECK, &store, batch(AGGREGATE, a, 1, 3)).await;
    let second = append_ok(CHECK, &store, batch(OTHER_AGGREGATE, b, 1, 2)).await;
    let positions: Vec<i64> = first.iter().chain(&second).map(|e| e.position).collect();
    assert_no_positions(CHECK, "append", &positions);
    let loaded = load_all(CHECK, &store, AGGREGATE, a).await;
    assert_same_events(CHECK, "load_events(after 0)", &first, &loaded);
    assert_read_all_unsupported(CHECK, &store).await;
}

/// Appending events and loading them back preserves every field: event id, aggregate type
/// and id, `aggregate_type_id`, sequence, event type and version, payload (unicode,
/// escapes, nesting, nulls, 64-bit integers), metadata (an object or `null`) and the
/// timestamp to the microsecond; `append` returns one increasing position (at least 1) per
/// event, and `load_events` and `read_all` report those positions.
pub async fn check_round_trip<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "round_trip";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();

    let unknown = load_all(CHECK, &store, AGGREGATE, id).await;
    if !unknown.is_empty() {
        fail(
            CHECK,
            format_args!(
                "load_events of an aggregate never written returned {} events",
                unknown.len()
            ),
        );
    }
    let global = harness.global_order();
    if global && !read_everything(CHECK, &store).await.is_empty() {
        fail(CHECK, "read_all on a fresh store returned events");
    }

    let first = append_ok(CHECK, &store, batch(AGGREGATE, id, 1, 3)).await;
    let second = append_ok(CHECK, &store, batch(AGGREGATE, id, 4, 4)).await;
    let expected: Vec<_> = first.into_iter().chain(second).collect();
    let positions: Vec<i64> = expected.iter().map(|e| e.position).collect();
    if !global {
        assert_no_positions(CHECK, "append", &positions);
    } else if positions[0] < 1 || positions.windows(2).any(|w| w[0] >= w[1]) {
        fail(
            CHECK,
            format_args!("positions must start at 1 or above and increase, got {positions:?}"),
        );
    }

    let loaded = load_all(CHECK, &store, AGGREGATE, id).await;
    assert_same_events(CHECK, "load_events(after 0)", &expected, &loaded);
    assert_store_holds(global, CHECK, &store, "two appends", &expected).await;

    for stored in &loaded {
        match stored.decode::<ConformanceEvent>() {
            Ok(envelope) if envelope.event == domain_event(stored.sequence) => {}
            Ok(envelope) => fail(
                CHECK,
                format_args!(
                    "sequence {} decodes to {:?}, expected {:?}",
                    stored.sequence,
                    envelope.event,
                    domain_event(stored.sequence)
                ),
            ),
            Err(error) => fail(
                CHECK,
                format_args!("a stored event does not decode: {error}"),
            ),
        }
    }
}

/// `event_sequence` is 0 for an aggregate with no events and the last sequence otherwise;
/// the aggregate type is part of the key (the same id under another type is another
/// aggregate).
pub async fn check_event_sequence<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "event_sequence";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();
    let seq = |t: &'static str| {
        let store = &store;
        async move { ok(CHECK, "event_sequence", store.event_sequence(t, id).await) }
    };

    if seq(AGGREGATE).await != 0 {
        fail(CHECK, "an aggregate with no events must have sequence 0");
    }
    append_ok(CHECK, &store, batch(AGGREGATE, id, 1, 2)).await;
    append_ok(CHECK, &store, batch(AGGREGATE, id, 3, 5)).await;
    let got = seq(AGGREGATE).await;
    if got != 5 {
        fail(
            CHECK,
            format_args!("after appending sequences 1..=5, event_sequence is {got}"),
        );
    }
    let other = seq(OTHER_AGGREGATE).await;
    if other != 0 {
        fail(
            CHECK,
            format_args!(
                "the same id under aggregate type {OTHER_AGGREGATE} has no events, but event_sequence is {other}"
            ),
        );
    }
    append_ok(CHECK, &store, batch(OTHER_AGGREGATE, id, 1, 1)).await;
    let (a, b) = (seq(AGGREGATE).await, seq(OTHER_AGGREGATE).await);
    if (a, b) != (5, 1) {
        fail(
            CHECK,
            format_args!(
                "two aggregate types with the same id: expected sequences (5, 1), got ({a}, {b})"
            ),
        );
    }
    let others = load_all(CHECK, &store, OTHER_AGGREGATE, id).await;
    if sequences(&others) != [1] || others.iter().any(|e| e.aggregate_type != OTHER_AGGREGATE) {
        fail(
            CHECK,
            format_args!(
                "load_events({OTHER_AGGREGATE}, id) must return only its own event, got {others:?}"
            ),
        );
    }
}

/// `load_events(type, id, after)` returns exactly the events with a sequence above `after`,
/// in order (`after` = 0, in the middle, at the end, beyond the end).
pub async fn check_load_after_sequence<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "load_after_sequence";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();
    let stored = append_ok(CHECK, &store, batch(AGGREGATE, id, 1, 5)).await;
    // Another aggregate's events interleaved must not show up.
    append_ok(CHECK, &store, batch(AGGREGATE, Uuid::new_v4(), 1, 2)).await;
    for after in [0, 1, 3, 4, 5, 9] {
        let loaded = ok(
            CHECK,
            "load_events",
            store.load_events(AGGREGATE, id, after).await,
        );
        let expected: Vec<_> = stored
            .iter()
            .filter(|e| e.sequence > after)
            .cloned()
            .collect();
        assert_same_events(
            CHECK,
            &format!("load_events(after_sequence = {after})"),
            &expected,
            &loaded,
        );
    }
}

/// An append whose first sequence is not one past the stored last one (another writer got
/// there first) is [`CQRSError::Conflict`] naming the aggregate and the expected sequence,
/// and stores nothing.
pub async fn check_conflict<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "conflict";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();
    let stored = append_ok(CHECK, &store, batch(AGGREGATE, id, 1, 2)).await;

    for (from, expected_sequence) in [(1, 0), (2, 1)] {
        let result = store.append(batch(AGGREGATE, id, from, from)).await;
        let error = err(
            CHECK,
            &format!("append at sequence {from} when 2 is stored"),
            result,
        );
        match &error {
            CQRSError::Conflict {
                aggregate_type,
                aggregate_id,
                expected_sequence: got,
            } if aggregate_type == AGGREGATE && *aggregate_id == id && *got == expected_sequence => {}
            other => fail(
                CHECK,
                format_args!(
                    "append at sequence {from} when 2 is stored: expected Conflict {{ aggregate_type: {AGGREGATE:?}, aggregate_id: {id}, expected_sequence: {expected_sequence} }}, got {other:?}"
                ),
            ),
        }
    }
    assert_store_holds(
        harness.global_order(),
        CHECK,
        &store,
        "conflicting appends",
        &stored,
    )
    .await;
    let seq = ok(
        CHECK,
        "event_sequence",
        store.event_sequence(AGGREGATE, id).await,
    );
    if seq != 2 {
        fail(
            CHECK,
            format_args!("event_sequence is {seq} after conflicting appends, expected 2"),
        );
    }
}

/// A multi-event append is all or nothing: a 3-event batch that conflicts stores none of its
/// events, and so does a 3-event batch whose last event reuses a stored id.
pub async fn check_atomic_batch<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "atomic_batch";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();
    let stored = append_ok(CHECK, &store, batch(AGGREGATE, id, 1, 2)).await;

    // Sequences 2..=4: the first collides, the other two would be new.
    let conflicting = batch(AGGREGATE, id, 2, 4);
    let error = err(
        CHECK,
        "3-event append starting at the stored sequence 2",
        store.append(conflicting).await,
    );
    if !error.is_conflict() {
        fail(
            CHECK,
            format_args!(
                "a 3-event batch starting at stored sequence 2 must be Conflict, got {error:?}"
            ),
        );
    }
    assert_store_holds(
        harness.global_order(),
        CHECK,
        &store,
        "a conflicting 3-event batch",
        &stored,
    )
    .await;

    // Sequences 3..=5 with the last id already stored for sequence 1.
    let mut reusing = batch(AGGREGATE, id, 3, 5);
    reusing[2].event_id = stored[0].event_id;
    let error = err(
        CHECK,
        "3-event append whose last event reuses a stored id",
        store.append(reusing).await,
    );
    if !matches!(error, CQRSError::DuplicateEventId { event_id } if event_id == stored[0].event_id)
    {
        fail(
            CHECK,
            format_args!(
                "a batch whose third event reuses stored id {} must be DuplicateEventId naming it, got {error:?}",
                stored[0].event_id
            ),
        );
    }
    assert_store_holds(
        harness.global_order(),
        CHECK,
        &store,
        "a 3-event batch with a duplicate id",
        &stored,
    )
    .await;

    // The aggregate is still writable where it was.
    let more = append_ok(CHECK, &store, batch(AGGREGATE, id, 3, 5)).await;
    let expected: Vec<_> = stored.into_iter().chain(more).collect();
    assert_same_events(
        CHECK,
        "load_events after refused batches and a good one",
        &expected,
        &load_all(CHECK, &store, AGGREGATE, id).await,
    );
}

/// Malformed batches are [`CQRSError::InvalidAppend`] and store nothing: an empty batch,
/// events of two aggregates, non-contiguous sequences, a sequence below 1, an
/// `aggregate_type_id` that does not name the aggregate, and a batch that skips ahead of the
/// stored history.
pub async fn check_invalid_batches<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "invalid_batches";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();
    let stored = append_ok(CHECK, &store, batch(AGGREGATE, id, 1, 1)).await;

    let mut mixed = batch(AGGREGATE, id, 2, 3);
    mixed[1] = event(AGGREGATE, Uuid::new_v4(), 3);
    let mut mixed_types = batch(AGGREGATE, id, 2, 3);
    mixed_types[1] = event(OTHER_AGGREGATE, id, 3);
    let mut gap = batch(AGGREGATE, id, 2, 3);
    gap[1].sequence = 4;
    let mut wrong_key = batch(AGGREGATE, id, 2, 2);
    wrong_key[0].aggregate_type_id = PersistableDomainEvent::type_id_for(AGGREGATE, Uuid::new_v4());
    let cases: Vec<(&str, Vec<PersistableDomainEvent>)> = vec![
        ("an empty batch", Vec::new()),
        ("events of two aggregate ids", mixed),
        ("events of two aggregate types", mixed_types),
        ("non-contiguous sequences 2, 4", gap),
        ("sequence 0", batch(AGGREGATE, Uuid::new_v4(), 0, 1)),
        ("an aggregate_type_id naming another aggregate", wrong_key),
        (
            "sequence 3 when only 1 is stored (skipping ahead)",
            batch(AGGREGATE, id, 3, 4),
        ),
        (
            "sequence 2 for an aggregate with no events (skipping ahead)",
            batch(AGGREGATE, Uuid::new_v4(), 2, 2),
        ),
    ];
    for (what, events) in cases {
        let error = err(
            CHECK,
            &format!("append of {what}"),
            store.append(events).await,
        );
        if !matches!(error, CQRSError::InvalidAppend(_)) {
            fail(
                CHECK,
                format_args!("append of {what} must be InvalidAppend, got {error:?}"),
            );
        }
        assert_store_holds(
            harness.global_order(),
            CHECK,
            &store,
            &format!("an append of {what}"),
            &stored,
        )
        .await;
    }
}

/// Appending a batch again with the same event ids, aggregate and sequences (a retry after
/// a lost reply) succeeds, returns the positions of the first time and stores nothing new,
/// also after other events were appended in between.
pub async fn check_idempotent_retry<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "idempotent_retry";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();
    let original = batch(AGGREGATE, id, 1, 2);
    let first = append_ok(CHECK, &store, original.clone()).await;
    let first_positions: Vec<i64> = first.iter().map(|e| e.position).collect();

    let again = ok(
        CHECK,
        "retried append of the same batch",
        store.append(original.clone()).await,
    );
    if again != first_positions {
        fail(
            CHECK,
            format_args!("a retried batch must return the first positions {first_positions:?}, got {again:?}"),
        );
    }
    assert_store_holds(
        harness.global_order(),
        CHECK,
        &store,
        "a retried batch",
        &first,
    )
    .await;

    // Others write; a late retry of the first batch still succeeds with the same positions.
    let other = append_ok(CHECK, &store, batch(AGGREGATE, Uuid::new_v4(), 1, 1)).await;
    let next = append_ok(CHECK, &store, batch(AGGREGATE, id, 3, 3)).await;
    let late = ok(
        CHECK,
        "retried append after later appends",
        store.append(original).await,
    );
    if late != first_positions {
        fail(
            CHECK,
            format_args!(
                "a batch retried after later appends must return the first positions {first_positions:?}, got {late:?}"
            ),
        );
    }
    let expected: Vec<_> = first.into_iter().chain(other).chain(next).collect();
    assert_store_holds(
        harness.global_order(),
        CHECK,
        &store,
        "a late retry",
        &expected,
    )
    .await;
}

/// Reusing a stored event id for a different event is [`CQRSError::DuplicateEventId`]
/// naming the id, and stores nothing: for the next event of the same aggregate, and for an
/// event of another aggregate. Resending a stored batch with an extra event, or a stored
/// event under another aggregate, is not a retry either: `DuplicateEventId`, nothing stored.
pub async fn check_duplicate_event_id<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "duplicate_event_id";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();
    let stored = append_ok(CHECK, &store, batch(AGGREGATE, id, 1, 1)).await;
    let reused = stored[0].event_id;

    let mut same_aggregate = event(AGGREGATE, id, 2);
    same_aggregate.event_id = reused;
    let mut other_aggregate = event(AGGREGATE, Uuid::new_v4(), 1);
    other_aggregate.event_id = reused;
    for (what, events, dup) in [
        (
            "the next event of the same aggregate",
            vec![same_aggregate],
            reused,
        ),
        (
            "the first event of another aggregate",
            vec![other_aggregate],
            reused,
        ),
    ] {
        let error = err(
            CHECK,
            &format!("append reusing a stored id for {what}"),
            store.append(events).await,
        );
        if !matches!(error, CQRSError::DuplicateEventId { event_id } if event_id == dup) {
            fail(
                CHECK,
                format_args!(
                    "reusing stored id {dup} for {what} must be DuplicateEventId naming it, got {error:?}"
                ),
            );
        }
        assert_store_holds(
            harness.global_order(),
            CHECK,
            &store,
            &format!("reusing an id for {what}"),
            &stored,
        )
        .await;
    }

    // A "retry" that is not the same batch: a stored batch with one more event, and a
    // stored event resent under the wrong aggregate type. Neither may store anything.
    let pair = append_ok(CHECK, &store, batch(AGGREGATE, id, 2, 3)).await;
    let stored: Vec<_> = stored.into_iter().chain(pair.iter().cloned()).collect();
    let mut longer: Vec<_> = pair
        .iter()
        .cloned()
        .map(|mut e| {
            e.position = 0;
            e
        })
        .collect();
    longer.push(event(AGGREGATE, id, 4));
    let mut moved = pair[0].clone();
    moved.position = 0;
    moved.aggregate_type = OTHER_AGGREGATE.into();
    moved.aggregate_type_id = PersistableDomainEvent::type_id_for(OTHER_AGGREGATE, id);
    moved.sequence = 1;
    for (what, events) in [
        ("a stored 2-event batch resent with a third event", longer),
        (
            "a stored event resent for another aggregate type",
            vec![moved],
        ),
    ] {
        let error = err(
            CHECK,
            &format!("append of {what}"),
            store.append(events).await,
        );
        if !matches!(error, CQRSError::DuplicateEventId { .. }) {
            fail(
                CHECK,
                format_args!("append of {what} must be DuplicateEventId, got {error:?}"),
            );
        }
        assert_store_holds(
            harness.global_order(),
            CHECK,
            &store,
            &format!("an append of {what}"),
            &stored,
        )
        .await;
    }
}

/// A batch in which two events share an id is refused ([`CQRSError::DuplicateEventId`] or
/// [`CQRSError::InvalidAppend`]) and stores nothing: event ids are unique in the whole store,
/// within one batch too (otherwise a retry of that batch could not be recognised).
pub async fn check_duplicate_id_within_batch<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "duplicate_id_within_batch";
    let store = harness.fresh().await;
    let stored = append_ok(CHECK, &store, batch(AGGREGATE, Uuid::new_v4(), 1, 1)).await;
    let mut within_batch = batch(AGGREGATE, Uuid::new_v4(), 1, 2);
    within_batch[1].event_id = within_batch[0].event_id;
    let within_id = within_batch[0].event_id;
    match store.append(within_batch).await {
        Ok(positions) => fail(
            CHECK,
            format_args!(
                "a batch in which two events share id {within_id} was stored at {positions:?}"
            ),
        ),
        Err(CQRSError::DuplicateEventId { .. } | CQRSError::InvalidAppend(_)) => {}
        Err(other) => fail(
            CHECK,
            format_args!(
                "a batch in which two events share an id must be DuplicateEventId or InvalidAppend, got {other:?}"
            ),
        ),
    }
    assert_store_holds(
        harness.global_order(),
        CHECK,
        &store,
        "a batch with an id twice",
        &stored,
    )
    .await;
}

/// Positions increase strictly in commit order across aggregates and aggregate types, and
/// `read_all(after, limit)` pages through the store returning every event exactly once, in
/// position order, at most `limit` at a time, and nothing after the last one.
pub async fn check_global_order<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "global_order";
    let store = harness.fresh().await;
    let ids = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    let mut committed = Vec::new();
    let mut next_sequence: HashMap<(&str, Uuid), i64> = HashMap::new();
    // Interleave appends of 1 to 3 events over three ids and two aggregate types.
    for round in 0..12usize {
        let aggregate_type = if round % 4 == 3 {
            OTHER_AGGREGATE
        } else {
            AGGREGATE
        };
        let id = ids[round % ids.len()];
        let size = (round % 3) as i64 + 1;
        let from = *next_sequence.entry((aggregate_type, id)).or_insert(1);
        next_sequence.insert((aggregate_type, id), from + size);
        committed.extend(
            append_ok(
                CHECK,
                &store,
                batch(aggregate_type, id, from, from + size - 1),
            )
            .await,
        );
    }
    let positions: Vec<i64> = committed.iter().map(|e| e.position).collect();
    if positions[0] < 1 || positions.windows(2).any(|w| w[0] >= w[1]) {
        fail(
            CHECK,
            format_args!(
                "positions must be at least 1 and increase in commit order, got {positions:?}"
            ),
        );
    }
    let all = read_everything(CHECK, &store).await;
    assert_same_events(CHECK, "read_all(0, ..)", &committed, &all);

    let last = positions[positions.len() - 1];
    for limit in [1usize, 2, 5, 7] {
        let mut paged = Vec::new();
        let mut after = 0;
        loop {
            let page = ok(CHECK, "read_all", store.read_all(after, limit).await);
            if page.len() > limit {
                fail(
                    CHECK,
                    format_args!("read_all({after}, {limit}) returned {} events", page.len()),
                );
            }
            let Some(tail) = page.last() else { break };
            if page[0].position <= after {
                fail(
                    CHECK,
                    format_args!(
                        "read_all({after}, {limit}) returned position {} which is not after {after}",
                        page[0].position
                    ),
                );
            }
            after = tail.position;
            paged.extend(page);
            if paged.len() > committed.len() {
                break;
            }
        }
        assert_same_events(
            CHECK,
            &format!("read_all paged {limit} at a time"),
            &committed,
            &paged,
        );
    }
    let past = ok(CHECK, "read_all", store.read_all(last, 10).await);
    if !past.is_empty() {
        fail(
            CHECK,
            format_args!(
                "read_all after the last position {last} returned {} events",
                past.len()
            ),
        );
    }
    let middle = positions[positions.len() / 2];
    let tail = ok(CHECK, "read_all", store.read_all(middle, 1000).await);
    let expected: Vec<_> = committed
        .iter()
        .filter(|e| e.position > middle)
        .cloned()
        .collect();
    assert_same_events(
        CHECK,
        &format!("read_all({middle}, 1000)"),
        &expected,
        &tail,
    );
}

/// If the store offers [`EventRepository::subscribe`], the receiver reaches the position
/// of an append (within 10 seconds). A store returning `None` passes.
pub async fn check_subscribe<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "subscribe";
    let store = harness.fresh().await;
    let Some(mut receiver) = store.subscribe() else {
        return;
    };
    let stored = append_ok(CHECK, &store, batch(AGGREGATE, Uuid::new_v4(), 1, 2)).await;
    let target = stored[1].position;
    let reached = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if *receiver.borrow_and_update() >= target {
                return true;
            }
            if receiver.changed().await.is_err() {
                return false;
            }
        }
    })
    .await;
    match reached {
        Ok(true) => {}
        Ok(false) => fail(
            CHECK,
            format_args!("the subscription closed before reaching position {target}"),
        ),
        Err(_) => fail(
            CHECK,
            format_args!(
                "the subscription did not reach position {target} within 10 s (it says {})",
                *receiver.borrow()
            ),
        ),
    }
}

/// What one racing task did.
struct Appended {
    /// (event ids of a successful batch, its positions).
    batches: Vec<(Vec<Uuid>, Vec<i64>)>,
    conflicts: u32,
}

/// Concurrent writers: 8 tasks make 25 successful appends each to one aggregate (batches of
/// one or two events, reading `event_sequence` and retrying on conflicts), while 4 more
/// tasks append 25 times each to their own aggregates. Every failure must be a
/// [`CQRSError::Conflict`] (and the tasks with their own aggregate see none); afterwards
/// each sequence is stored exactly once, every batch is contiguous, the stored ids are
/// exactly the ids of the successful appends, and `read_all` holds them all once, in
/// increasing positions.
///
/// Uses `tokio::spawn`: run it on a multi-threaded runtime so the appends really race.
pub async fn check_concurrent_appends<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "concurrent_appends";
    const SHARED_TASKS: usize = 8;
    const OWN_TASKS: usize = 4;
    const APPENDS: usize = 25;
    let store = Arc::new(harness.fresh().await);
    let shared_id = Uuid::new_v4();

    let mut handles = Vec::new();
    for task in 0..SHARED_TASKS + OWN_TASKS {
        let store = Arc::clone(&store);
        let (id, size) = if task < SHARED_TASKS {
            (shared_id, task as i64 % 2 + 1)
        } else {
            (Uuid::new_v4(), 1)
        };
        handles.push((
            id,
            tokio::spawn(async move {
                let mut done = Appended {
                    batches: Vec::new(),
                    conflicts: 0,
                };
                while done.batches.len() < APPENDS {
                    let last = store
                        .event_sequence(AGGREGATE, id)
                        .await
                        .map_err(|e| format!("event_sequence failed: {e:?}"))?;
                    let events = batch(AGGREGATE, id, last + 1, last + size);
                    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                    match store.append(events).await {
                        Ok(positions) => done.batches.push((ids, positions)),
                        Err(CQRSError::Conflict { .. }) => {
                            done.conflicts += 1;
                            if done.conflicts > 100_000 {
                                return Err("no progress after 100000 conflicts".to_owned());
                            }
                            tokio::task::yield_now().await;
                        }
                        Err(other) => {
                            return Err(format!(
                            "append at sequence {} failed with {other:?}; only Conflict is allowed",
                            last + 1
                        ))
                        }
                    }
                }
                Ok::<_, String>(done)
            }),
        ));
    }

    let mut results: Vec<(Uuid, Appended)> = Vec::new();
    for (task, (id, handle)) in handles.into_iter().enumerate() {
        match handle.await {
            Ok(Ok(done)) => results.push((id, done)),
            Ok(Err(message)) => fail(CHECK, format_args!("task {task}: {message}")),
            Err(join) => fail(CHECK, format_args!("task {task} panicked: {join}")),
        }
    }

    let mut by_id: HashMap<Uuid, (i64, Vec<Uuid>)> = HashMap::new();
    let mut position_of: HashMap<Uuid, i64> = HashMap::new();
    for (task, (id, done)) in results.iter().enumerate() {
        if task >= SHARED_TASKS && done.conflicts > 0 {
            fail(
                CHECK,
                format_args!(
                    "a task that is the only writer of its aggregate got {} conflicts",
                    done.conflicts
                ),
            );
        }
        for (ids, positions) in &done.batches {
            let ordered = if harness.global_order() {
                !positions.windows(2).any(|w| w[0] >= w[1])
            } else {
                positions.iter().all(|&p| p == 0)
            };
            if positions.len() != ids.len() || !ordered {
                fail(
                    CHECK,
                    format_args!(
                        "append of {} events returned positions {positions:?}",
                        ids.len()
                    ),
                );
            }
            let entry = by_id.entry(*id).or_default();
            entry.0 += ids.len() as i64;
            entry.1.extend(ids);
            position_of.extend(ids.iter().copied().zip(positions.iter().copied()));
        }
    }

    let mut total = 0;
    for (id, (count, ids)) in &by_id {
        let stored = load_all(CHECK, store.as_ref(), AGGREGATE, *id).await;
        total += stored.len();
        let expected: Vec<i64> = (1..=*count).collect();
        if sequences(&stored) != expected {
            fail(
                CHECK,
                format_args!(
                    "aggregate {id}: {count} events were appended successfully, but the stored sequences are {:?}",
                    sequences(&stored)
                ),
            );
        }
        let stored_ids: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
        let appended: HashSet<Uuid> = ids.iter().copied().collect();
        if stored_ids != appended {
            fail(
                CHECK,
                format_args!(
                    "aggregate {id}: stored event ids differ from the successfully appended ones ({} stored that were not acknowledged, {} acknowledged that are not stored)",
                    stored_ids.difference(&appended).count(),
                    appended.difference(&stored_ids).count()
                ),
            );
        }
        for event in &stored {
            if position_of.get(&event.event_id) != Some(&event.position) {
                fail(
                    CHECK,
                    format_args!(
                        "aggregate {id} sequence {}: stored at position {}, but append returned {:?}",
                        event.sequence,
                        event.position,
                        position_of.get(&event.event_id)
                    ),
                );
            }
        }
    }
    // Each batch's events must be consecutive in its aggregate's history.
    for (id, done) in &results {
        let stored = load_all(CHECK, store.as_ref(), AGGREGATE, *id).await;
        let sequence_of: HashMap<Uuid, i64> =
            stored.iter().map(|e| (e.event_id, e.sequence)).collect();
        for (ids, _) in &done.batches {
            let seqs: Vec<Option<&i64>> = ids.iter().map(|i| sequence_of.get(i)).collect();
            if seqs.windows(2).any(|w| match (w[0], w[1]) {
                (Some(a), Some(b)) => *b != a + 1,
                _ => true,
            }) {
                fail(
                    CHECK,
                    format_args!("a batch was not stored contiguously: sequences {seqs:?}"),
                );
            }
        }
    }

    if !harness.global_order() {
        assert_read_all_unsupported(CHECK, store.as_ref()).await;
        return;
    }
    let all = read_everything(CHECK, store.as_ref()).await;
    if all.len() != total {
        fail(
            CHECK,
            format_args!(
                "read_all returned {} events, the aggregates hold {total}",
                all.len()
            ),
        );
    }
    if all.windows(2).any(|w| w[0].position >= w[1].position) {
        fail(CHECK, "read_all returned positions that do not increase");
    }
    let mut seen = BTreeMap::new();
    for event in &all {
        if seen.insert(event.event_id, event.position).is_some() {
            fail(
                CHECK,
                format_args!("read_all returned event {} twice", event.event_id),
            );
        }
        if position_of.get(&event.event_id) != Some(&event.position) {
            fail(
                CHECK,
                format_args!(
                    "read_all returned event {} at position {}, append returned {:?}",
                    event.event_id,
                    event.position,
                    position_of.get(&event.event_id)
                ),
            );
        }
    }
}

/// Checks that `error` is an [`CQRSError::EventDecode`] naming the event and with the
/// expected kind.
#[track_caller]
fn assert_decode_error(check: &str, what: &str, error: &CQRSError, damage: &Damage<'_>) {
    let Damage {
        id,
        sequence,
        event_type,
        event_version,
        kind_ok,
        kind_name,
    } = *damage;
    let CQRSError::EventDecode(decode) = error else {
        fail(
            check,
            format_args!("{what}: expected CQRSError::EventDecode, got {error:?}"),
        );
    };
    let named = decode.aggregate_type == AGGREGATE
        && decode.aggregate_id == id
        && decode.sequence == sequence
        && decode.event_type == event_type
        && decode.event_version == event_version;
    if !named {
        fail(
            check,
            format_args!(
                "{what}: the error must name {AGGREGATE} {id} sequence {sequence}, event {event_type} v{event_version}; it names {} {} sequence {}, event {} v{}",
                decode.aggregate_type,
                decode.aggregate_id,
                decode.sequence,
                decode.event_type,
                decode.event_version
            ),
        );
    }
    if !kind_ok(&decode.kind) {
        fail(
            check,
            format_args!(
                "{what}: expected a {kind_name} decode error, got {:?}",
                decode.kind
            ),
        );
    }
}

/// The damaged row and the decode error it must cause.
#[derive(Clone, Copy)]
struct Damage<'a> {
    id: Uuid,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    kind_ok: fn(&DecodeError) -> bool,
    kind_name: &'a str,
}

/// Shared by the two malformed-row checks: loading one damaged row of a 3-event history.
///
/// The store may return the row (then decoding it with `DomainEvent::try_from_persisted`
/// must fail) or fail `load_events` itself; either way the error is
/// [`CQRSError::EventDecode`] naming the row. The undamaged rows still decode, and
/// `CQRSFramework::load` fails with the same error.
async fn check_damaged_row<S: EventRepository + 'static>(
    check: &str,
    store: Arc<S>,
    damage: &Damage<'_>,
) {
    let id = damage.id;
    match store.load_events(AGGREGATE, id, 0).await {
        Ok(events) => {
            if sequences(&events) != [1, 2, 3] {
                fail(
                    check,
                    format_args!(
                        "load_events after damaging sequence 2 returned sequences {:?}, expected [1, 2, 3] (or an EventDecode error)",
                        sequences(&events)
                    ),
                );
            }
            for event in &events {
                let decoded = ConformanceEvent::try_from_persisted(event);
                match (event.sequence, decoded) {
                    (2, Ok(value)) => fail(
                        check,
                        format_args!("the damaged event at sequence 2 still decodes, to {value:?}"),
                    ),
                    (2, Err(error)) => assert_decode_error(
                        check,
                        "try_from_persisted of the damaged row",
                        &error,
                        damage,
                    ),
                    (_, Ok(value)) if value == domain_event(event.sequence) => {}
                    (seq, other) => fail(
                        check,
                        format_args!("the undamaged event at sequence {seq} decodes to {other:?}"),
                    ),
                }
            }
        }
        Err(error) => assert_decode_error(
            check,
            "load_events of a history with a damaged row",
            &error,
            damage,
        ),
    }

    let framework = CQRSFramework::<ConformanceCounter>::new(Arc::clone(&store));
    match framework.load(id).await {
        Ok(state) => fail(
            check,
            format_args!(
                "CQRSFramework::load of a history with a damaged row succeeded with state {state}"
            ),
        ),
        Err(error) => assert_decode_error(
            check,
            "CQRSFramework::load of a history with a damaged row",
            &error,
            damage,
        ),
    }
}

/// A stored payload that no longer decodes (invalid JSON, and valid JSON of the wrong shape)
/// gives [`CQRSError::EventDecode`] with a [`DecodeError::MalformedPayload`], naming the
/// aggregate type, id, sequence, event type and version, whether the store returns the row
/// (and `DomainEvent::try_from_persisted` fails) or fails `load_events` itself.
pub async fn check_corrupt_payload<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "corrupt_payload";
    for raw in [
        "{\"n\": 3, oops",
        "{\"Counted\": {\"n\": \"not a number\"}}",
    ] {
        let store = Arc::new(harness.fresh().await);
        let id = Uuid::new_v4();
        let stored = append_ok(CHECK, store.as_ref(), batch(AGGREGATE, id, 1, 3)).await;
        harness.corrupt_payload(&store, AGGREGATE, id, 2, raw).await;
        let damage = Damage {
            id,
            sequence: 2,
            event_type: &stored[1].event_type,
            event_version: &stored[1].event_version,
            kind_ok: |kind| matches!(kind, DecodeError::MalformedPayload(_)),
            kind_name: "MalformedPayload",
        };
        check_damaged_row(CHECK, store, &damage).await;
    }
}

/// A stored event whose type is not one the event type knows gives
/// [`CQRSError::EventDecode`] with [`DecodeError::UnknownEventType`], naming the aggregate
/// type, id, sequence, the stored (unknown) event type and the version.
pub async fn check_unknown_event_type<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "unknown_event_type";
    let store = Arc::new(harness.fresh().await);
    let id = Uuid::new_v4();
    let stored = append_ok(CHECK, store.as_ref(), batch(AGGREGATE, id, 1, 3)).await;
    harness
        .set_event_type(&store, AGGREGATE, id, 2, "NoSuchEvent")
        .await;
    let damage = Damage {
        id,
        sequence: 2,
        event_type: "NoSuchEvent",
        event_version: &stored[1].event_version,
        kind_ok: |kind| matches!(kind, DecodeError::UnknownEventType),
        kind_name: "UnknownEventType",
    };
    check_damaged_row(CHECK, store, &damage).await;
}

/// A damaged row in the middle of the global stream is one poison event, never a failed
/// read: with the payload of one event (of two aggregates' five) replaced by text that is
/// not JSON, reading the whole stream with `read_all` (in pages of 100 and of 2) returns
/// every undamaged event in order, and the damaged row either comes back as the event that
/// fails to decode with [`DecodeError::MalformedPayload`] naming it, or as
/// [`CQRSError::DamagedRow`] at its position when a page starts with it. `read_all(0, 100)`
/// itself returns the events before the damaged row.
pub async fn check_read_all_past_a_damaged_row<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "read_all_past_a_damaged_row";
    let store = harness.fresh().await;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let mut stored = Vec::new();
    // Positions in order: first#1, second#1, first#2 (damaged), second#2, first#3.
    for (id, sequence) in [(first, 1), (second, 1), (first, 2), (second, 2), (first, 3)] {
        stored.extend(append_ok(CHECK, &store, vec![event(AGGREGATE, id, sequence)]).await);
    }
    harness
        .corrupt_payload(&store, AGGREGATE, first, 2, "{\"n\": 3, oops")
        .await;
    let damaged = &stored[2];
    let damage = Damage {
        id: first,
        sequence: 2,
        event_type: &damaged.event_type,
        event_version: &damaged.event_version,
        kind_ok: |kind| matches!(kind, DecodeError::MalformedPayload(_)),
        kind_name: "MalformedPayload",
    };

    let head = ok(
        CHECK,
        "read_all(0, 100) of a stream with a damaged row",
        store.read_all(0, 100).await,
    );
    let before: Vec<i64> = stored[..2].iter().map(|e| e.position).collect();
    let got: Vec<i64> = head.iter().take(2).map(|e| e.position).collect();
    if got != before {
        fail(
            CHECK,
            format_args!(
                "read_all(0, 100) of a stream damaged at position {} returned positions {:?}: the events before it must come back",
                damaged.position,
                head.iter().map(|e| e.position).collect::<Vec<_>>()
            ),
        );
    }

    for limit in [100, 2] {
        let mut after = 0;
        let mut events = Vec::new();
        let mut reported = None;
        for _ in 0..=stored.len() * 2 {
            match store.read_all(after, limit).await {
                Ok(page) => {
                    let Some(last) = page.last() else { break };
                    after = last.position;
                    events.extend(page);
                }
                Err(CQRSError::DamagedRow(row)) if row.position > after => {
                    after = row.position;
                    reported = Some(row.position);
                }
                Err(error) => fail(
                    CHECK,
                    format_args!(
                        "read_all({after}, {limit}) of a stream damaged at position {}: a damaged row must be one poison event, not a failed read; got {error} ({error:?})",
                        damaged.position
                    ),
                ),
            }
        }
        let mut expected: Vec<PersistableDomainEvent> = stored.clone();
        match reported {
            Some(position) if position == damaged.position => {
                expected.remove(2);
            }
            Some(position) => fail(
                CHECK,
                format_args!(
                    "read_all(.., {limit}) reported a damaged row at position {position}, but the damaged row is at {}",
                    damaged.position
                ),
            ),
            None => {
                let Some(event) = events.iter().find(|e| e.position == damaged.position) else {
                    fail(
                        CHECK,
                        format_args!(
                            "reading the stream in pages of {limit} neither returned the damaged row at position {} nor reported it as CQRSError::DamagedRow: it was hidden",
                            damaged.position
                        ),
                    );
                };
                match ConformanceEvent::try_from_persisted(event) {
                    Ok(value) => fail(
                        CHECK,
                        format_args!("the damaged event read with read_all still decodes, to {value:?}"),
                    ),
                    Err(error) => assert_decode_error(
                        CHECK,
                        "try_from_persisted of the damaged row read with read_all",
                        &error,
                        &damage,
                    ),
                }
                expected[2] = event.clone();
            }
        }
        assert_same_events(
            CHECK,
            &format!("reading the stream in pages of {limit} past a damaged row"),
            &expected,
            &events,
        );
    }
}

/// `CQRSFramework::dispatch_new` on this store: of 8 concurrent `dispatch_new`s on one new
/// id exactly one appends, at sequence 1, and every other one gets
/// [`CQRSError::Conflict`] with `expected_sequence: 0` from the store's unique sequence (the
/// racing framework has no state cache); a second instance gets the same conflict; only the
/// winner's event is stored, and a plain `dispatch` goes on from it.
pub async fn check_dispatch_new<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "dispatch_new";
    const RACERS: u64 = 8;
    let store = Arc::new(harness.fresh().await);
    // No state cache: the store's unique sequence, not the cache, must decide every race.
    let framework = Arc::new(
        CQRSFramework::<ConformanceCounter>::new(Arc::clone(&store)).without_state_cache(),
    );
    let id = Uuid::new_v4();
    let handles: Vec<_> = (1..=RACERS)
        .map(|n| {
            let framework = Arc::clone(&framework);
            tokio::spawn(async move {
                framework
                    .dispatch_new(id, n)
                    .await
                    .map(|receipt| (n, receipt.sequence))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(Ok(won)) => winners.push(won),
            Ok(Err(CQRSError::Conflict {
                aggregate_id,
                expected_sequence: 0,
                ..
            })) if aggregate_id == id => {}
            Ok(Err(other)) => fail(
                CHECK,
                format_args!(
                    "a losing dispatch_new: expected Conflict {{ expected_sequence: 0 }} naming {id}, got {other:?}"
                ),
            ),
            Err(join) => fail(CHECK, format_args!("a dispatch_new task failed: {join}")),
        }
    }
    let [(won_n, 1)] = winners[..] else {
        fail(
            CHECK,
            format_args!(
                "{RACERS} concurrent dispatch_new on one id: expected one winner at sequence 1, got (n, sequence) {winners:?}"
            ),
        );
    };
    let cold = CQRSFramework::<ConformanceCounter>::new(Arc::clone(&store)).without_state_cache();
    match cold.dispatch_new(id, 100).await {
        Err(CQRSError::Conflict {
            expected_sequence: 0,
            ..
        }) => {}
        other => fail(
            CHECK,
            format_args!(
                "dispatch_new on a stored aggregate from a second instance: expected Conflict {{ expected_sequence: 0 }}, got {other:?}"
            ),
        ),
    }
    let stored = ok(
        CHECK,
        "load_events",
        store.load_events(AGGREGATE, id, 0).await,
    );
    if sequences(&stored) != [1] {
        fail(
            CHECK,
            format_args!(
                "after the race the store holds sequences {:?}, expected [1]",
                sequences(&stored)
            ),
        );
    }
    ok(
        CHECK,
        "dispatch after dispatch_new",
        cold.dispatch(id, 100).await,
    );
    let total = ok(CHECK, "CQRSFramework::load", cold.load(id).await);
    if total != won_n + 100 {
        fail(
            CHECK,
            format_args!("the aggregate folds to {total}, expected {}", won_n + 100),
        );
    }
}

/// A hole in a history (an event deleted behind the store's back) makes
/// `CQRSFramework::load` fail with [`CQRSError::SequenceGap`] naming the missing sequence
/// and the one found instead: for a hole in the middle and for a missing first event.
pub async fn check_sequence_gap<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "sequence_gap";
    let store = Arc::new(harness.fresh().await);
    for deleted in [3, 1] {
        let id = Uuid::new_v4();
        append_ok(CHECK, store.as_ref(), batch(AGGREGATE, id, 1, 5)).await;
        let framework = CQRSFramework::<ConformanceCounter>::new(Arc::clone(&store));
        let before = ok(CHECK, "CQRSFramework::load", framework.load(id).await);
        if before != 2 + 3 + 4 + 5 {
            fail(
                CHECK,
                format_args!("the intact history folds to {before}, expected 14"),
            );
        }
        harness.delete_event(&store, AGGREGATE, id, deleted).await;
        let loaded = ok(
            CHECK,
            "load_events",
            store.load_events(AGGREGATE, id, 0).await,
        );
        let expected: Vec<i64> = (1..=5).filter(|s| *s != deleted).collect();
        if sequences(&loaded) != expected {
            fail(
                CHECK,
                format_args!(
                    "after deleting sequence {deleted}, load_events returned sequences {:?}, expected {expected:?}",
                    sequences(&loaded)
                ),
            );
        }
        let error = err(
            CHECK,
            &format!("CQRSFramework::load with sequence {deleted} deleted"),
            framework.load(id).await,
        );
        match error {
            CQRSError::SequenceGap {
                aggregate_type,
                aggregate_id,
                expected_sequence,
                found_sequence,
            } if aggregate_type == AGGREGATE
                && aggregate_id == id
                && expected_sequence == deleted
                && found_sequence == deleted + 1 => {}
            other => fail(
                CHECK,
                format_args!(
                    "CQRSFramework::load with sequence {deleted} deleted: expected SequenceGap {{ expected_sequence: {deleted}, found_sequence: {} }} naming {AGGREGATE} {id}, got {other:?}",
                    deleted + 1
                ),
            ),
        }
    }
}

/// `correlation_id` and `causation_id` round-trip through `append`, `load_events` and
/// `read_all`: both set, one set, neither (`None` stays `None`), for a single event and
/// for a batch; all events of a batch sharing one command's ids keep them.
pub async fn check_correlation_round_trip<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "correlation_round_trip";
    let store = harness.fresh().await;
    let id = Uuid::new_v4();
    let (correlation, command) = (Uuid::new_v4(), Uuid::new_v4());
    let with = |sequence: i64, correlation_id: Option<Uuid>, causation_id: Option<Uuid>| {
        PersistableDomainEvent {
            correlation_id,
            causation_id,
            ..event(AGGREGATE, id, sequence)
        }
    };
    // One event alone, then a batch, then one event without either id.
    let single = append_ok(
        CHECK,
        &store,
        vec![with(1, Some(correlation), Some(command))],
    )
    .await;
    let batch = append_ok(
        CHECK,
        &store,
        vec![
            with(2, Some(correlation), Some(command)),
            with(3, Some(correlation), None),
            with(4, None, Some(command)),
            with(5, None, None),
        ],
    )
    .await;
    let bare = append_ok(CHECK, &store, vec![with(6, None, None)]).await;
    let expected: Vec<_> = single.into_iter().chain(batch).chain(bare).collect();

    let loaded = load_all(CHECK, &store, AGGREGATE, id).await;
    assert_same_events(CHECK, "load_events(after 0)", &expected, &loaded);
    assert_store_holds(
        harness.global_order(),
        CHECK,
        &store,
        "appends with and without correlation",
        &expected,
    )
    .await;
    for stored in &loaded {
        match stored.decode::<ConformanceEvent>() {
            Ok(envelope)
                if envelope.correlation_id == stored.correlation_id
                    && envelope.causation_id == stored.causation_id => {}
            Ok(envelope) => fail(
                CHECK,
                format_args!(
                    "sequence {} decodes with correlation {:?} and causation {:?}, stored {:?} and {:?}",
                    stored.sequence,
                    envelope.correlation_id,
                    envelope.causation_id,
                    stored.correlation_id,
                    stored.causation_id
                ),
            ),
            Err(error) => fail(
                CHECK,
                format_args!("a stored event does not decode: {error}"),
            ),
        }
    }
}

/// `events_caused_by` returns exactly the events of the aggregate whose causation id is
/// the one asked for, in sequence order, with every field as stored: not those of another
/// aggregate (another id, or the same id under another aggregate type) with the same
/// causation id, not those of another command, not those without one; empty for a
/// command that caused nothing.
pub async fn check_events_caused_by<H: StoreHarness>(harness: &H) {
    const CHECK: &str = "events_caused_by";
    let store = harness.fresh().await;
    let (id, other_id) = (Uuid::new_v4(), Uuid::new_v4());
    let (command, other_command) = (Uuid::new_v4(), Uuid::new_v4());
    let caused = |aggregate_type: &str, id: Uuid, sequence: i64, causation_id: Option<Uuid>| {
        PersistableDomainEvent {
            causation_id,
            ..event(aggregate_type, id, sequence)
        }
    };
    // Interleaved with the other aggregates' events, so that neither position nor
    // neighbourhood tells them apart.
    let first = append_ok(
        CHECK,
        &store,
        vec![
            caused(AGGREGATE, id, 1, Some(command)),
            caused(AGGREGATE, id, 2, Some(command)),
        ],
    )
    .await;
    let other_aggregate = append_ok(
        CHECK,
        &store,
        vec![caused(AGGREGATE, other_id, 1, Some(command))],
    )
    .await;
    let other_type = append_ok(
        CHECK,
        &store,
        vec![caused(OTHER_AGGREGATE, id, 1, Some(command))],
    )
    .await;
    let by_other_command = append_ok(
        CHECK,
        &store,
        vec![caused(AGGREGATE, id, 3, Some(other_command))],
    )
    .await;
    append_ok(CHECK, &store, vec![caused(AGGREGATE, id, 4, None)]).await;
    let later = append_ok(
        CHECK,
        &store,
        vec![
            caused(AGGREGATE, id, 5, Some(command)),
            caused(AGGREGATE, id, 6, Some(command)),
        ],
    )
    .await;

    let cases: [(&str, Uuid, Uuid, Vec<PersistableDomainEvent>); 5] = [
        (
            AGGREGATE,
            id,
            command,
            first.into_iter().chain(later).collect(),
        ),
        (AGGREGATE, id, other_command, by_other_command),
        (AGGREGATE, other_id, command, other_aggregate),
        (OTHER_AGGREGATE, id, command, other_type),
        (AGGREGATE, id, Uuid::new_v4(), Vec::new()),
    ];
    for (aggregate_type, aggregate_id, causation_id, expected) in cases {
        let what = format!("events_caused_by({aggregate_type}, {aggregate_id}, {causation_id})");
        let found = ok(
            CHECK,
            &what,
            store
                .events_caused_by(aggregate_type, aggregate_id, causation_id)
                .await,
        );
        assert_same_events(CHECK, &what, &expected, &found);
    }
}
