//! The [`ViewRepository`] conformance suite: the view store contract documented on
//! [`ViewRepository`] and in the projections decision record (rows and checkpoint committed
//! all or nothing, optimistic row versions, a checkpoint that never goes back, pages in id
//! byte order, the active-version marker, rows of two view versions kept apart).
//!
//! A store author implements [`ViewHarness`] (a fresh database, and a view store of any view
//! on it) and calls [`check_view_repository`]. Every clause has its own `check_*` function
//! too. A check panics on the first violation with a message that starts with
//! ``store conformance check `NAME` failed:``.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Mutex, PoisonError};

use cqrs::MemoryDeadLetters;
use cqrs::{
    Aggregate, CQRSError, Checkpoint, DomainEvent, EventEnvelope, MemoryViewRepository, View,
    ViewContext, ViewRepository,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{fail, ok};

/// What the view conformance suite needs to know about a view store: how to get a fresh
/// database, and a view store of any view type on it.
///
/// Two calls of [`views`](ViewHarness::views) on one database are two handles on the same
/// rows and checkpoints (for the same view type); the suite uses two view types with one
/// [`View::TABLE_NAME`] and two [`View::VERSION`]s to check that versions are kept apart.
///
/// ```
/// use cqrs::{Aggregate, MemoryViewRepository, View};
/// use cqrs_testkit::conformance::{check_view_round_trip, ViewHarness};
///
/// /// A store with a single view type, to show the shape (the memory store keeps one
/// /// repository per view type: see `MemoryViewHarness` for a complete harness).
/// struct MyHarness;
///
/// impl ViewHarness for MyHarness {
///     type Database = ();
///     const VERSIONS_SHARE_A_TABLE: bool = false;
///
///     async fn fresh(&self) {}
///
///     fn views<A: Aggregate, V: View<A>>(&self, _: &()) -> impl cqrs::ViewRepository<A, V> {
///         // A SQL harness returns e.g. `SqliteViewRepository::<V>::new(database)`.
///         MemoryViewRepository::<V>::new()
///     }
/// }
/// ```
pub trait ViewHarness: Send + Sync {
    /// One database of the store: a file, a schema, a map in memory.
    type Database: Send + Sync;

    /// True when the view stores of two [`View::VERSION`]s of one [`View::TABLE_NAME`] on one
    /// database share the table and its active-version marker (the SQL stores key rows by
    /// `(view_id, view_version)`); false when each view type is a store of its own (memory).
    const VERSIONS_SHARE_A_TABLE: bool;

    /// A new, empty database that no other test shares.
    fn fresh(&self) -> impl Future<Output = Self::Database> + Send;

    /// The store of view `V` (of aggregate `A`) on `database`.
    fn views<A: Aggregate, V: View<A>>(
        &self,
        database: &Self::Database,
    ) -> impl ViewRepository<A, V>;
}

/// One database of [`MemoryViewHarness`]: a [`MemoryViewRepository`] per view type, and a
/// [`MemoryDeadLetters`] sink.
#[derive(Debug, Default)]
pub struct MemoryViewDatabase {
    views: Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
    dead_letters: MemoryDeadLetters,
}

impl MemoryViewDatabase {
    /// The database's store of view `V` (the same rows on every call).
    ///
    /// # Panics
    /// Never in practice: the map holds a `MemoryViewRepository<V>` under `V`'s type id.
    pub fn views<V: Send + Sync + 'static>(&self) -> MemoryViewRepository<V> {
        let mut views = self.views.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = views
            .entry(TypeId::of::<V>())
            .or_insert_with(|| Box::new(MemoryViewRepository::<V>::new()));
        match entry.downcast_ref::<MemoryViewRepository<V>>() {
            Some(views) => views.clone(),
            None => panic!("MemoryViewDatabase: the store under a view's type id has another type"),
        }
    }

    /// The database's dead-letter sink (the same list on every call).
    pub fn dead_letters(&self) -> MemoryDeadLetters {
        self.dead_letters.clone()
    }
}

/// The in-memory view store's harness: [`MemoryViewRepository`], one per view type (so two
/// versions of a view are two stores), and [`MemoryDeadLetters`].
///
/// ```
/// use cqrs_testkit::conformance::{check_view_repository, MemoryViewHarness};
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// check_view_repository(&MemoryViewHarness).await;
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryViewHarness;

impl ViewHarness for MemoryViewHarness {
    type Database = MemoryViewDatabase;
    const VERSIONS_SHARE_A_TABLE: bool = false;

    async fn fresh(&self) -> MemoryViewDatabase {
        MemoryViewDatabase::default()
    }

    fn views<A: Aggregate, V: View<A>>(
        &self,
        database: &MemoryViewDatabase,
    ) -> impl ViewRepository<A, V> {
        database.views::<V>()
    }
}

/// Runs every check of the [`ViewRepository`] contract, one after the other, each on a fresh
/// database; panics on the first violation with a message naming the check.
///
/// The checks, in order: [`check_view_missing_row`], [`check_view_round_trip`],
/// [`check_view_optimistic_version`], [`check_view_commit_with_checkpoint`],
/// [`check_view_checkpoint_never_goes_back`], [`check_view_list_order`],
/// [`check_view_version_activation`], [`check_view_versions_kept_apart`],
/// [`check_view_load_many`].
///
/// ```
/// use cqrs_testkit::conformance::{check_view_repository, MemoryViewHarness};
///
/// #[tokio::test(flavor = "multi_thread")]
/// async fn memory_views_conform() {
///     check_view_repository(&MemoryViewHarness).await;
/// }
/// # fn main() {}
/// ```
pub async fn check_view_repository<H: ViewHarness>(harness: &H) {
    check_view_missing_row(harness).await;
    check_view_round_trip(harness).await;
    check_view_optimistic_version(harness).await;
    check_view_commit_with_checkpoint(harness).await;
    check_view_checkpoint_never_goes_back(harness).await;
    check_view_list_order(harness).await;
    check_view_version_activation(harness).await;
    check_view_versions_kept_apart(harness).await;
    check_view_load_many(harness).await;
}

// ---------------------------------------------------------------------------------------
// The suite's own aggregate and views. The views are only stored, never fed events.

/// The view table of both suite views.
const TABLE: &str = "conformance_tally";

/// The suite's event; never stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum TallyEvent {
    Counted,
}

impl DomainEvent for TallyEvent {
    const EVENT_TYPES: &'static [cqrs::EventType] =
        &[cqrs::EventType::new("ConformanceTallyCounted", "1")];

    fn persisted_event_name(&self) -> &'static str {
        "ConformanceTallyCounted"
    }

    fn persisted_event_version(&self) -> &'static str {
        "1"
    }
}

#[derive(Debug, Default)]
pub(crate) struct ConformanceTally;

impl Aggregate for ConformanceTally {
    const NAME: &'static str = "conformance_tally";
    type Events = TallyEvent;
    type Commands = ();
    type Errors = CQRSError;
    type State = ();

    async fn handle_command(&self, _: Uuid, _: &(), _: ()) -> Result<Vec<TallyEvent>, CQRSError> {
        Ok(Vec::new())
    }

    fn handle_event(&self, _: &mut (), _: &TallyEvent) {}
}

/// Version 1 of the suite's view, with text that exercises the store's encoding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TallyV1 {
    pub(crate) count: i64,
    pub(crate) note: String,
    pub(crate) tags: Vec<String>,
}

impl View<ConformanceTally> for TallyV1 {
    const TABLE_NAME: &'static str = TABLE;
    const VERSION: u64 = 1;

    fn handle_event(&mut self, _: &EventEnvelope<TallyEvent>) -> Result<(), CQRSError> {
        self.count += 1;
        Ok(())
    }
}

/// Version 2 of the same view (same table), with another shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct TallyV2 {
    total: u64,
}

impl View<ConformanceTally> for TallyV2 {
    const TABLE_NAME: &'static str = TABLE;
    const VERSION: u64 = 2;

    fn handle_event(&mut self, _: &EventEnvelope<TallyEvent>) -> Result<(), CQRSError> {
        self.total += 1;
        Ok(())
    }
}

pub(crate) fn tally(count: i64) -> TallyV1 {
    TallyV1 {
        count,
        note: format!("n°{count}: it's \"quoted\", ünïcödé, tab\there"),
        tags: vec!["a".to_owned(), "€".to_owned()],
    }
}

pub(crate) fn cp(name: &str, position: i64) -> Checkpoint {
    Checkpoint {
        name: name.to_owned(),
        position,
    }
}

async fn load<V: View<ConformanceTally>>(
    check: &str,
    views: &impl ViewRepository<ConformanceTally, V>,
    id: &str,
) -> Option<V> {
    ok(check, &format!("load({id:?})"), views.load(id).await)
}

async fn for_update<V: View<ConformanceTally>>(
    check: &str,
    views: &impl ViewRepository<ConformanceTally, V>,
    id: &str,
) -> ViewContext<V> {
    ok(
        check,
        &format!("load_for_update({id:?})"),
        views.load_for_update(id).await,
    )
}

pub(crate) async fn checkpoint_of<V: View<ConformanceTally>>(
    check: &str,
    views: &impl ViewRepository<ConformanceTally, V>,
    name: &str,
) -> i64 {
    ok(
        check,
        &format!("checkpoint({name:?})"),
        views.checkpoint(name).await,
    )
}

async fn commit_ok<V: View<ConformanceTally>>(
    check: &str,
    views: &impl ViewRepository<ConformanceTally, V>,
    changes: Vec<ViewContext<V>>,
    checkpoint: Option<Checkpoint>,
) {
    let what = format!(
        "commit of rows {:?} with checkpoint {checkpoint:?}",
        ids(&changes)
    );
    ok(check, &what, views.commit(changes, checkpoint).await);
}

/// Commits and expects a [`CQRSError::ViewConflict`]; returns it as (view, view id, expected
/// version).
async fn commit_conflict<V: View<ConformanceTally>>(
    check: &str,
    views: &impl ViewRepository<ConformanceTally, V>,
    changes: Vec<ViewContext<V>>,
    checkpoint: Option<Checkpoint>,
) -> (String, String, i64) {
    let what = format!(
        "commit of rows {:?} with checkpoint {checkpoint:?}",
        ids(&changes)
    );
    match views.commit(changes, checkpoint).await {
        Err(CQRSError::ViewConflict {
            view,
            view_id,
            expected_version,
        }) => (view, view_id, expected_version),
        Ok(()) => fail(
            check,
            format_args!("{what} succeeded; expected ViewConflict"),
        ),
        Err(other) => fail(
            check,
            format_args!("{what} returned {other:?}; expected ViewConflict"),
        ),
    }
}

fn ids<V>(changes: &[ViewContext<V>]) -> Vec<&str> {
    changes.iter().map(|c| c.view_id.as_str()).collect()
}

#[track_caller]
fn expect_eq<T: PartialEq + Debug>(check: &str, what: &str, expected: T, actual: T) {
    if expected != actual {
        fail(
            check,
            format_args!("{what}: expected {expected:?}, the store has {actual:?}"),
        );
    }
}

/// The row `id` as loaded, with its version.
async fn expect_row<V: View<ConformanceTally> + PartialEq>(
    check: &str,
    views: &impl ViewRepository<ConformanceTally, V>,
    id: &str,
    expected: Option<(&V, i64)>,
) {
    let loaded = load(check, views, id).await;
    expect_eq(
        check,
        &format!("load({id:?})"),
        expected.map(|(view, _)| view),
        loaded.as_ref(),
    );
    let context = for_update(check, views, id).await;
    let (view, version) = match expected {
        Some((view, version)) => (view.clone(), version),
        None => (V::default(), 0),
    };
    expect_eq(
        check,
        &format!("load_for_update({id:?})"),
        (&view, version),
        (&context.view, context.version),
    );
}

// ---------------------------------------------------------------------------------------
// The checks.

/// A missing row: `load` is `None`, `load_for_update` is `V::default()` with version 0 (and
/// the id asked for), `list` is empty and a checkpoint never recorded is 0.
pub async fn check_view_missing_row<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_missing_row";
    let database = harness.fresh().await;
    let views = harness.views::<ConformanceTally, TallyV1>(&database);
    expect_eq(
        CHECK,
        "load(\"nobody\")",
        None,
        load(CHECK, &views, "nobody").await,
    );
    let context = for_update(CHECK, &views, "nobody").await;
    expect_eq(
        CHECK,
        "load_for_update(\"nobody\")",
        ViewContext {
            view_id: "nobody".to_owned(),
            view: TallyV1::default(),
            version: 0,
        },
        context,
    );
    let page = ok(CHECK, "list(None, 10)", views.list(None, 10).await);
    expect_eq(CHECK, "list(None, 10)", Vec::new(), page);
    expect_eq(
        CHECK,
        "checkpoint(\"never_written\")",
        0,
        checkpoint_of(CHECK, &views, "never_written").await,
    );
}

/// Committed rows load back equal (quotes, non-ASCII and tabs included), each commit adds
/// one to the row's version, and the id is any string (not only a UUID).
pub async fn check_view_round_trip<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_round_trip";
    let database = harness.fresh().await;
    let views = harness.views::<ConformanceTally, TallyV1>(&database);
    let uuid = Uuid::new_v4().to_string();
    let mut first = for_update(CHECK, &views, &uuid).await;
    first.view = tally(1);
    let mut other = for_update(CHECK, &views, "2026-12-02 daily").await;
    other.view = tally(7);
    commit_ok(CHECK, &views, vec![first, other], None).await;
    expect_row(CHECK, &views, &uuid, Some((&tally(1), 1))).await;
    expect_row(CHECK, &views, "2026-12-02 daily", Some((&tally(7), 1))).await;

    for version in 1..=3 {
        let mut row = for_update(CHECK, &views, &uuid).await;
        row.view = tally(10 + version);
        commit_ok(CHECK, &views, vec![row], None).await;
        expect_row(
            CHECK,
            &views,
            &uuid,
            Some((&tally(10 + version), version + 1)),
        )
        .await;
    }
    expect_row(CHECK, &views, "2026-12-02 daily", Some((&tally(7), 1))).await;
    // A second handle on the same database sees the same rows.
    let again = harness.views::<ConformanceTally, TallyV1>(&database);
    expect_row(CHECK, &again, &uuid, Some((&tally(13), 4))).await;
}

/// A commit with a stale row version is [`CQRSError::ViewConflict`] naming the view table,
/// the row and the version it was loaded with, and writes nothing of the commit: not the
/// other rows, not the checkpoint. For a new row (two writers both loaded version 0) and for
/// an existing one.
pub async fn check_view_optimistic_version<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_optimistic_version";
    let database = harness.fresh().await;
    let views = harness.views::<ConformanceTally, TallyV1>(&database);
    let name = "tally_projection";

    // Two writers create the same new row: the second loses.
    let (mut a, mut b) = (
        for_update(CHECK, &views, "v1").await,
        for_update(CHECK, &views, "v1").await,
    );
    a.view = tally(10);
    b.view = tally(20);
    commit_ok(CHECK, &views, vec![a], Some(cp(name, 1))).await;
    let conflict = commit_conflict(CHECK, &views, vec![b], Some(cp(name, 2))).await;
    expect_eq(
        CHECK,
        "the conflict of a second insert of row v1",
        (TABLE.to_owned(), "v1".to_owned(), 0),
        conflict,
    );
    expect_row(CHECK, &views, "v1", Some((&tally(10), 1))).await;
    expect_eq(
        CHECK,
        "the checkpoint after a refused commit",
        1,
        checkpoint_of(CHECK, &views, name).await,
    );

    // Two writers update the same row: the stale one loses, and neither its other (new)
    // row nor its checkpoint is written.
    let mut fresh = for_update(CHECK, &views, "v1").await;
    let mut stale = for_update(CHECK, &views, "v1").await;
    let mut other = for_update(CHECK, &views, "v2").await;
    fresh.view = tally(11);
    stale.view = tally(99);
    other.view = tally(5);
    commit_ok(CHECK, &views, vec![fresh], Some(cp(name, 3))).await;
    let conflict = commit_conflict(CHECK, &views, vec![other, stale], Some(cp(name, 4))).await;
    expect_eq(
        CHECK,
        "the conflict of a stale update of row v1",
        (TABLE.to_owned(), "v1".to_owned(), 1),
        conflict,
    );
    expect_row(CHECK, &views, "v1", Some((&tally(11), 2))).await;
    expect_row(CHECK, &views, "v2", None).await;
    expect_eq(
        CHECK,
        "the checkpoint after a refused commit",
        3,
        checkpoint_of(CHECK, &views, name).await,
    );

    // A row loaded at version 0 that another commit created meanwhile, in a batch after a
    // good row and without a checkpoint: still nothing written.
    let mut c = for_update(CHECK, &views, "c").await;
    c.view = tally(1);
    let stale_new = ViewContext {
        view_id: "v1".to_owned(),
        view: tally(98),
        version: 0,
    };
    let conflict = commit_conflict(CHECK, &views, vec![c, stale_new], None).await;
    expect_eq(
        CHECK,
        "the conflict of row v1 written at version 0",
        (TABLE.to_owned(), "v1".to_owned(), 0),
        conflict,
    );
    expect_row(CHECK, &views, "c", None).await;
    expect_row(CHECK, &views, "v1", Some((&tally(11), 2))).await;
}

/// Rows and a checkpoint committed together are both there; a commit of a checkpoint alone
/// records it; checkpoint names are independent; a refused commit leaves both the rows and
/// the checkpoint as they were.
pub async fn check_view_commit_with_checkpoint<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_commit_with_checkpoint";
    let database = harness.fresh().await;
    let views = harness.views::<ConformanceTally, TallyV1>(&database);
    let (mut a, mut b) = (
        for_update(CHECK, &views, "a").await,
        for_update(CHECK, &views, "b").await,
    );
    a.view = tally(5);
    b.view = tally(7);
    commit_ok(CHECK, &views, vec![a, b], Some(cp("tally_v1", 10))).await;
    expect_row(CHECK, &views, "a", Some((&tally(5), 1))).await;
    expect_row(CHECK, &views, "b", Some((&tally(7), 1))).await;
    expect_eq(
        CHECK,
        "checkpoint(\"tally_v1\")",
        10,
        checkpoint_of(CHECK, &views, "tally_v1").await,
    );
    expect_eq(
        CHECK,
        "checkpoint(\"tally_v2\") (another name)",
        0,
        checkpoint_of(CHECK, &views, "tally_v2").await,
    );

    commit_ok(CHECK, &views, Vec::new(), Some(cp("tally_v2", 3))).await;
    expect_eq(
        CHECK,
        "checkpoint(\"tally_v2\") after a commit of it alone",
        3,
        checkpoint_of(CHECK, &views, "tally_v2").await,
    );
    expect_eq(
        CHECK,
        "checkpoint(\"tally_v1\") after a commit of another name",
        10,
        checkpoint_of(CHECK, &views, "tally_v1").await,
    );

    // A stale row: neither the new row nor the checkpoint.
    let mut c = for_update(CHECK, &views, "c").await;
    c.view = tally(1);
    let stale = ViewContext {
        view_id: "a".to_owned(),
        view: tally(99),
        version: 0,
    };
    commit_conflict(CHECK, &views, vec![c, stale], Some(cp("tally_v1", 20))).await;
    expect_row(CHECK, &views, "c", None).await;
    expect_row(CHECK, &views, "a", Some((&tally(5), 1))).await;
    expect_eq(
        CHECK,
        "checkpoint(\"tally_v1\") after a refused commit",
        10,
        checkpoint_of(CHECK, &views, "tally_v1").await,
    );
    // Rows without a checkpoint leave every checkpoint as it was.
    let mut a = for_update(CHECK, &views, "a").await;
    a.view = tally(6);
    commit_ok(CHECK, &views, vec![a], None).await;
    expect_eq(
        CHECK,
        "checkpoint(\"tally_v1\") after a commit without one",
        10,
        checkpoint_of(CHECK, &views, "tally_v1").await,
    );
}

/// A checkpoint never goes back: a commit with a lower position is refused with or without
/// rows, one with the same position is refused with row changes (a second projector
/// replaying applied events) and accepted without; the refused commits write nothing.
pub async fn check_view_checkpoint_never_goes_back<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_checkpoint_never_goes_back";
    let database = harness.fresh().await;
    let views = harness.views::<ConformanceTally, TallyV1>(&database);
    let name = "tally_v1";
    let mut first = for_update(CHECK, &views, "a").await;
    first.view = tally(5);
    commit_ok(CHECK, &views, vec![first], Some(cp(name, 10))).await;

    // Current row versions, but a checkpoint behind or equal: refused.
    for position in [4, 10] {
        let mut row = for_update(CHECK, &views, "a").await;
        row.view = tally(6);
        let mut new = for_update(CHECK, &views, "n").await;
        new.view = tally(1);
        commit_conflict(CHECK, &views, vec![row, new], Some(cp(name, position))).await;
        expect_row(CHECK, &views, "a", Some((&tally(5), 1))).await;
        expect_row(CHECK, &views, "n", None).await;
        expect_eq(
            CHECK,
            &format!("the checkpoint after a refused commit at {position}"),
            10,
            checkpoint_of(CHECK, &views, name).await,
        );
    }
    // Lower without rows: refused too.
    commit_conflict::<TallyV1>(CHECK, &views, Vec::new(), Some(cp(name, 9))).await;
    expect_eq(
        CHECK,
        "the checkpoint after a refused commit at 9 without rows",
        10,
        checkpoint_of(CHECK, &views, name).await,
    );
    // Equal without rows: a harmless no-op. Forward: fine.
    commit_ok::<TallyV1>(CHECK, &views, Vec::new(), Some(cp(name, 10))).await;
    expect_eq(
        CHECK,
        "the checkpoint after a commit at the same position without rows",
        10,
        checkpoint_of(CHECK, &views, name).await,
    );
    let mut row = for_update(CHECK, &views, "a").await;
    row.view = tally(6);
    commit_ok(CHECK, &views, vec![row], Some(cp(name, 11))).await;
    expect_row(CHECK, &views, "a", Some((&tally(6), 2))).await;
    expect_eq(
        CHECK,
        "the checkpoint after a commit forward",
        11,
        checkpoint_of(CHECK, &views, name).await,
    );
}

/// `list` returns rows in ascending byte order of the id's UTF-8 (not a collation's order:
/// `"B" < "a"`, `"a-b" < "a_b"`, `"Z" < "a" < "é"`), at most `limit` of them, starting after
/// `after` (an id that need not exist); paging with the last id of each page reads every row
/// once, and an empty page is the end.
pub async fn check_view_list_order<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_list_order";
    let database = harness.fresh().await;
    let views = harness.views::<ConformanceTally, TallyV1>(&database);
    let ids = [
        "b", "a", "B", "a_b", "a-b", "é", "Z", "ä", "10", "9", "a b", "ab", "A", "日本", "e",
    ];
    let mut changes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut row = for_update(CHECK, &views, id).await;
        row.view = tally(i as i64);
        changes.push(row);
    }
    commit_ok(CHECK, &views, changes, None).await;
    let mut sorted: Vec<&str> = ids.to_vec();
    sorted.sort_unstable(); // str's Ord is byte order.
    let value_of = |id: &str| {
        let index = ids.iter().position(|i| *i == id).unwrap_or_default();
        tally(index as i64)
    };

    let all = ok(CHECK, "list(None, 100)", views.list(None, 100).await);
    let expected: Vec<(String, TallyV1)> = sorted
        .iter()
        .map(|id| ((*id).to_owned(), value_of(id)))
        .collect();
    expect_eq(CHECK, "list(None, 100)", &expected, &all);

    for limit in [1, 4, 15] {
        let mut read = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let what = format!("list({after:?}, {limit})");
            let page = ok(CHECK, &what, views.list(after.as_deref(), limit).await);
            if page.len() > limit {
                fail(CHECK, format_args!("{what} returned {} rows", page.len()));
            }
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            read.extend(page);
            if read.len() > ids.len() {
                fail(
                    CHECK,
                    format_args!("paging by {limit} does not end: {read:?}"),
                );
            }
        }
        expect_eq(
            CHECK,
            &format!("every page of {limit}, in order"),
            &expected,
            &read,
        );
    }

    let page_ids = |page: Vec<(String, TallyV1)>| -> Vec<String> {
        page.into_iter().map(|(id, _)| id).collect()
    };
    for (after, expected) in [
        ("B", vec!["Z", "a", "a b"]),
        ("a-b", vec!["a_b", "ab", "b"]),
        ("a0", vec!["a_b", "ab", "b"]),
        ("e", vec!["ä", "é", "日本"]),
        ("日本", vec![]),
        ("", vec!["10", "9", "A"]),
    ] {
        let what = format!("list(Some({after:?}), 3)");
        let page = ok(CHECK, &what, views.list(Some(after), 3).await);
        expect_eq(
            CHECK,
            &what,
            expected.into_iter().map(str::to_owned).collect::<Vec<_>>(),
            page_ids(page),
        );
    }
    let page = ok(CHECK, "list(None, 0)", views.list(None, 0).await);
    expect_eq(CHECK, "list(None, 0)", Vec::<String>::new(), page_ids(page));
}

/// The active-version marker: none at first (and the view's version counts as active);
/// `activate_version` sets it, never moves it back, and concurrent activations all succeed
/// and leave the highest; `is_active_version` is true only for the active version.
pub async fn check_view_version_activation<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_version_activation";
    let database = harness.fresh().await;
    let views = harness.views::<ConformanceTally, TallyV1>(&database);
    expect_eq(
        CHECK,
        "before any activation",
        (None, true),
        activation(CHECK, &views).await,
    );
    ok(
        CHECK,
        "activate_version(1)",
        views.activate_version(1).await,
    );
    expect_eq(
        CHECK,
        "after activate_version(1)",
        (Some(1), true),
        activation(CHECK, &views).await,
    );
    ok(
        CHECK,
        "activate_version(1) again",
        views.activate_version(1).await,
    );
    expect_eq(
        CHECK,
        "after activate_version(1) again",
        (Some(1), true),
        activation(CHECK, &views).await,
    );
    ok(
        CHECK,
        "activate_version(2)",
        views.activate_version(2).await,
    );
    expect_eq(
        CHECK,
        "after activate_version(2), on the store of version 1",
        (Some(2), false),
        activation(CHECK, &views).await,
    );
    ok(
        CHECK,
        "activate_version(1) after 2",
        views.activate_version(1).await,
    );
    expect_eq(
        CHECK,
        "after activate_version(1) once 2 was active (the marker never goes back)",
        (Some(2), false),
        activation(CHECK, &views).await,
    );

    // Concurrent activations, each on its own handle: all succeed, the highest stays.
    let handles: Vec<_> = (0..6)
        .map(|_| harness.views::<ConformanceTally, TallyV1>(&database))
        .collect();
    let results = join_all(
        handles
            .iter()
            .enumerate()
            .map(|(i, views)| views.activate_version(3 + (i as u64 % 2))),
    )
    .await;
    for (i, result) in results.into_iter().enumerate() {
        ok(
            CHECK,
            &format!("concurrent activate_version({})", 3 + (i % 2)),
            result,
        );
    }
    expect_eq(
        CHECK,
        "after concurrent activations of 3 and 4",
        (Some(4), false),
        activation(CHECK, &views).await,
    );
}

/// Rows of two [`View::VERSION`]s of one view table are kept apart: each version loads,
/// lists and versions its own rows. Where the versions share a table
/// ([`ViewHarness::VERSIONS_SHARE_A_TABLE`]), they also share the active-version marker, so
/// activating the new version makes the old one inactive.
pub async fn check_view_versions_kept_apart<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_versions_kept_apart";
    let database = harness.fresh().await;
    let v1 = harness.views::<ConformanceTally, TallyV1>(&database);
    let v2 = harness.views::<ConformanceTally, TallyV2>(&database);
    let mut old = for_update(CHECK, &v1, "shared").await;
    old.view = tally(1);
    let mut only_old = for_update(CHECK, &v1, "old_only").await;
    only_old.view = tally(2);
    commit_ok(
        CHECK,
        &v1,
        vec![old, only_old],
        Some(cp("conformance_tally_v1", 5)),
    )
    .await;

    // Version 2 sees none of version 1's rows: a new row at version 0.
    let new = for_update(CHECK, &v2, "shared").await;
    expect_eq(
        CHECK,
        "version 2's load_for_update of a row only version 1 has",
        (TallyV2::default(), 0),
        (new.view.clone(), new.version),
    );
    let mut new = new;
    new.view = TallyV2 { total: 40 };
    commit_ok(CHECK, &v2, vec![new], Some(cp("conformance_tally_v2", 2))).await;
    expect_row(CHECK, &v2, "shared", Some((&TallyV2 { total: 40 }, 1))).await;
    expect_row(CHECK, &v2, "old_only", None).await;
    expect_row(CHECK, &v1, "shared", Some((&tally(1), 1))).await;
    expect_row(CHECK, &v1, "old_only", Some((&tally(2), 1))).await;
    let listed = ok(CHECK, "version 2's list", v2.list(None, 10).await);
    expect_eq(
        CHECK,
        "version 2's list",
        vec![("shared".to_owned(), TallyV2 { total: 40 })],
        listed,
    );
    let listed: Vec<String> = ok(CHECK, "version 1's list", v1.list(None, 10).await)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    expect_eq(
        CHECK,
        "version 1's list",
        vec!["old_only".to_owned(), "shared".to_owned()],
        listed,
    );
    // Version 2 updating its row leaves version 1's row version alone, and the reverse.
    let mut again = for_update(CHECK, &v2, "shared").await;
    again.view.total = 41;
    commit_ok(CHECK, &v2, vec![again], None).await;
    expect_row(CHECK, &v1, "shared", Some((&tally(1), 1))).await;

    if H::VERSIONS_SHARE_A_TABLE {
        ok(
            CHECK,
            "version 2's activate_version(2)",
            v2.activate_version(2).await,
        );
        let seen = (
            ok(
                CHECK,
                "version 1's active_version()",
                v1.active_version().await,
            ),
            ok(
                CHECK,
                "version 1's is_active_version()",
                v1.is_active_version().await,
            ),
            ok(
                CHECK,
                "version 2's is_active_version()",
                v2.is_active_version().await,
            ),
        );
        expect_eq(
            CHECK,
            "(active version, version 1 active, version 2 active) once version 2 is activated",
            (Some(2), false, true),
            seen,
        );
    }
}

async fn activation<V: View<ConformanceTally>>(
    check: &str,
    views: &impl ViewRepository<ConformanceTally, V>,
) -> (Option<u64>, bool) {
    (
        ok(check, "active_version()", views.active_version().await),
        ok(
            check,
            "is_active_version()",
            views.is_active_version().await,
        ),
    )
}

/// Polls every future to completion concurrently on the current task.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// `load_many_for_update` answers each id as `load_for_update` does, in the order asked: a
/// stored row with its version, a missing one as `V::default()` at version 0, an id asked
/// twice twice, only the rows of the view's own [`View::VERSION`], ids with quotes and
/// non-ASCII text, and a few hundred ids at once.
pub async fn check_view_load_many<H: ViewHarness>(harness: &H) {
    const CHECK: &str = "view_load_many";
    let database = harness.fresh().await;
    let v1 = harness.views::<ConformanceTally, TallyV1>(&database);
    let v2 = harness.views::<ConformanceTally, TallyV2>(&database);
    let quoted = "it's \"b\", ünïcödé";
    let mut a = for_update(CHECK, &v1, "a").await;
    a.view = tally(1);
    let mut b = for_update(CHECK, &v1, quoted).await;
    b.view = tally(2);
    commit_ok(CHECK, &v1, vec![a, b], None).await;
    let mut a = for_update(CHECK, &v1, "a").await;
    a.view = tally(3);
    commit_ok(CHECK, &v1, vec![a], None).await;
    // Version 2's row of the same id must not answer for version 1.
    let mut other = for_update(CHECK, &v2, "missing").await;
    other.view = TallyV2 { total: 9 };
    commit_ok(CHECK, &v2, vec![other], None).await;

    let asked: Vec<String> = [quoted, "missing", "a", quoted]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let loaded = ok(
        CHECK,
        &format!("load_many_for_update({asked:?})"),
        v1.load_many_for_update(&asked).await,
    );
    let expected = vec![
        ViewContext {
            view_id: quoted.to_owned(),
            view: tally(2),
            version: 1,
        },
        ViewContext {
            view_id: "missing".to_owned(),
            view: TallyV1::default(),
            version: 0,
        },
        ViewContext {
            view_id: "a".to_owned(),
            view: tally(3),
            version: 2,
        },
        ViewContext {
            view_id: quoted.to_owned(),
            view: tally(2),
            version: 1,
        },
    ];
    expect_eq(
        CHECK,
        &format!("load_many_for_update({asked:?})"),
        expected,
        loaded,
    );
    let none = ok(
        CHECK,
        "load_many_for_update([])",
        v1.load_many_for_update(&[]).await,
    );
    expect_eq(CHECK, "load_many_for_update([])", 0, none.len());

    // Many ids: every 10th stored, in an order that is not the table's.
    let many: Vec<String> = (0..300).rev().map(|i| format!("row-{i:03}")).collect();
    let stored: Vec<ViewContext<TallyV1>> = many
        .iter()
        .step_by(10)
        .map(|id| ViewContext {
            view_id: id.clone(),
            view: tally(i64::try_from(id.len()).unwrap_or(0)),
            version: 0,
        })
        .collect();
    commit_ok(CHECK, &v1, stored, None).await;
    let loaded = ok(
        CHECK,
        "load_many_for_update of 300 ids",
        v1.load_many_for_update(&many).await,
    );
    let answered: Vec<(&str, i64)> = loaded
        .iter()
        .map(|context| (context.view_id.as_str(), context.version))
        .collect();
    let wanted: Vec<(&str, i64)> = many
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i64::from(i % 10 == 0)))
        .collect();
    expect_eq(
        CHECK,
        "load_many_for_update of 300 ids: (id, version) in the order asked",
        wanted,
        answered,
    );
}
