//! The [`ProcessStore`] conformance suite: where process managers keep their instances,
//! their deadlines and their checkpoint.
//!
//! A store author calls [`check_process_store`] with a function that makes a fresh, empty
//! store (a new file, a new schema). Every clause has its own `check_process_*` function
//! too. A check panics on the first violation with a message that starts with
//! ``store conformance check `NAME` failed:``.
//!
//! [`check_process_concurrent_writers`] spawns tasks with `tokio::spawn`: run the suite in a
//! multi-threaded Tokio runtime (`#[tokio::test(flavor = "multi_thread")]`) so the writers
//! really race.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use cqrs::{CQRSError, Deadline, ProcessRow, ProcessStore};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{fail, ok};

/// Runs every check of the [`ProcessStore`] contract, one after the other, each on a
/// fresh store from `make_store`; panics on the first violation with a message naming the
/// check.
///
/// The checks, in order: [`check_process_round_trip`],
/// [`check_process_optimistic_version`], [`check_process_concurrent_writers`],
/// [`check_process_checkpoint_never_back`], [`check_process_due`],
/// [`check_process_list`].
///
/// ```
/// use cqrs::MemoryProcessStore;
/// use cqrs_testkit::conformance::check_process_store;
///
/// #[tokio::test(flavor = "multi_thread")]
/// async fn memory_process_store_conforms() {
///     check_process_store(|| async { MemoryProcessStore::new() }).await;
/// }
/// # fn main() {
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// #     check_process_store(|| async { MemoryProcessStore::new() }).await;
/// # });
/// # }
/// ```
pub async fn check_process_store<S, F, Fut>(make_store: F)
where
    S: ProcessStore + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    check_process_round_trip(&make_store).await;
    check_process_optimistic_version(&make_store).await;
    check_process_concurrent_writers(&make_store).await;
    check_process_checkpoint_never_back(&make_store).await;
    check_process_due(&make_store).await;
    check_process_list(&make_store).await;
}

/// A time of whole microseconds (the precision every SQL store keeps), `seconds` after a
/// fixed instant.
fn at(seconds: i64) -> DateTime<Utc> {
    let base = DateTime::<Utc>::from_timestamp_micros(1_764_756_000_123_457).unwrap_or_default();
    base + Duration::seconds(seconds)
}

fn deadline(name: &str, due: DateTime<Utc>) -> Deadline {
    Deadline {
        name: name.to_owned(),
        due,
    }
}

/// A row not stored yet, with `state` and deadlines.
fn row(instance: &str, state: Value, deadlines: &[(&str, i64)]) -> ProcessRow {
    ProcessRow {
        state,
        deadlines: deadlines
            .iter()
            .map(|(name, seconds)| deadline(name, at(*seconds)))
            .collect(),
        ..ProcessRow::new(instance)
    }
}

/// `row` as the store must give it back after `commits` commits: its version, its deadlines
/// earliest first.
fn stored(mut row: ProcessRow, version: i64) -> ProcessRow {
    row.version = version;
    row.deadlines.sort_by_key(|d| d.due);
    row
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

async fn commit<S: ProcessStore + ?Sized>(
    check: &str,
    store: &S,
    process: &str,
    rows: Vec<ProcessRow>,
    checkpoint: Option<i64>,
) {
    let what = format!(
        "commit of {process} rows {:?} with checkpoint {checkpoint:?}",
        instances(&rows)
    );
    ok(check, &what, store.commit(process, rows, checkpoint).await);
}

/// The `(view_id, expected_version)` of the [`CQRSError::ViewConflict`] the commit must be.
async fn commit_conflict<S: ProcessStore + ?Sized>(
    check: &str,
    store: &S,
    process: &str,
    rows: Vec<ProcessRow>,
    checkpoint: Option<i64>,
) -> (String, i64) {
    let what = format!(
        "commit of {process} rows {:?} (versions {:?}) with checkpoint {checkpoint:?}",
        instances(&rows),
        rows.iter().map(|r| r.version).collect::<Vec<_>>()
    );
    conflict_of(check, &what, store.commit(process, rows, checkpoint).await)
}

#[track_caller]
fn conflict_of(check: &str, what: &str, result: Result<(), CQRSError>) -> (String, i64) {
    match result {
        Err(CQRSError::ViewConflict {
            view_id,
            expected_version,
            ..
        }) => (view_id, expected_version),
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

fn instances(rows: &[ProcessRow]) -> Vec<&str> {
    rows.iter().map(|r| r.instance.as_str()).collect()
}

async fn load<S: ProcessStore + ?Sized>(
    check: &str,
    store: &S,
    process: &str,
    instance: &str,
) -> Option<ProcessRow> {
    ok(
        check,
        &format!("load({process:?}, {instance:?})"),
        store.load(process, instance).await,
    )
}

async fn expect_row<S: ProcessStore + ?Sized>(
    check: &str,
    store: &S,
    process: &str,
    instance: &str,
    expected: Option<&ProcessRow>,
) {
    let loaded = load(check, store, process, instance).await;
    expect_eq(
        check,
        &format!("load({process:?}, {instance:?})"),
        expected,
        loaded.as_ref(),
    );
}

async fn checkpoint<S: ProcessStore + ?Sized>(check: &str, store: &S, process: &str) -> i64 {
    ok(
        check,
        &format!("checkpoint({process:?})"),
        store.checkpoint(process).await,
    )
}

async fn due<S: ProcessStore + ?Sized>(
    check: &str,
    store: &S,
    process: &str,
    now: DateTime<Utc>,
    limit: usize,
) -> Vec<String> {
    let rows = ok(
        check,
        &format!("due({process:?}, {now}, {limit})"),
        store.due(process, now, limit).await,
    );
    rows.into_iter().map(|r| r.instance).collect()
}

async fn next_due<S: ProcessStore + ?Sized>(
    check: &str,
    store: &S,
    process: &str,
) -> Option<DateTime<Utc>> {
    ok(
        check,
        &format!("next_due({process:?})"),
        store.next_due(process).await,
    )
}

async fn list<S: ProcessStore + ?Sized>(
    check: &str,
    store: &S,
    process: &str,
    after: Option<&str>,
    limit: usize,
) -> Vec<ProcessRow> {
    ok(
        check,
        &format!("list({process:?}, {after:?}, {limit})"),
        store.list(process, after, limit).await,
    )
}

/// Every field of a row comes back as committed: JSON state (nested, unicode, quotes,
/// numbers beyond `f64`'s integers), the correlation id, deadlines at microsecond precision
/// (earliest first, whatever order they were given in), `finished`; the version is 1 after
/// the first commit and 2 after the next. An empty store has no rows, no checkpoint and
/// nothing due; processes are kept apart.
pub async fn check_process_round_trip<S, F, Fut>(make_store: F)
where
    S: ProcessStore + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    const CHECK: &str = "process_round_trip";
    let store = make_store().await;

    expect_row(CHECK, &store, "transfer", "t1", None).await;
    expect_eq(
        CHECK,
        "checkpoint of a new process",
        0,
        checkpoint(CHECK, &store, "transfer").await,
    );
    expect_eq(
        CHECK,
        "next_due of a new process",
        None,
        next_due(CHECK, &store, "transfer").await,
    );
    expect_eq(
        CHECK,
        "due of a new process",
        Vec::<String>::new(),
        due(CHECK, &store, "transfer", at(1_000), 10).await,
    );
    expect_eq(
        CHECK,
        "list of a new process",
        Vec::new(),
        list(CHECK, &store, "transfer", None, 10).await,
    );

    let state = json!({
        "step": "withdrawn",
        "amounts": [1, 2.5, -3],
        "big": 9_007_199_254_740_993_u64,
        "note": "it's \"quoted\", ünïcödé, 🦀",
        "nested": { "none": null, "yes": true, "empty": {} },
    });
    let mut first = row("t1", state, &[("refund", 30), ("remind", 5)]);
    first.correlation_id = Some(Uuid::new_v4());
    // A deadline one microsecond after another keeps its order and its time.
    first.deadlines.push(Deadline {
        name: "tick".to_owned(),
        due: at(5) + Duration::microseconds(1),
    });
    commit(CHECK, &store, "transfer", vec![first.clone()], None).await;
    let first = stored(first, 1);
    expect_row(CHECK, &store, "transfer", "t1", Some(&first)).await;
    expect_eq(
        CHECK,
        "the deadlines' times as loaded",
        vec![at(5), at(5) + Duration::microseconds(1), at(30)],
        load(CHECK, &store, "transfer", "t1")
            .await
            .map(|r| r.deadlines.iter().map(|d| d.due).collect())
            .unwrap_or_default(),
    );

    // The same instance id in another process is another instance.
    expect_row(CHECK, &store, "payment", "t1", None).await;
    let other = row("t1", json!("other"), &[]);
    commit(CHECK, &store, "payment", vec![other.clone()], Some(9)).await;
    expect_row(CHECK, &store, "payment", "t1", Some(&stored(other, 1))).await;
    expect_row(CHECK, &store, "transfer", "t1", Some(&first)).await;
    expect_eq(
        CHECK,
        "the checkpoint of a process another process moved",
        0,
        checkpoint(CHECK, &store, "transfer").await,
    );

    // The next commit: every field changed, version 2.
    let mut second = first.clone();
    second.state = json!({ "step": "done" });
    second.correlation_id = None;
    second.deadlines.clear();
    second.finished = true;
    commit(CHECK, &store, "transfer", vec![second.clone()], Some(4)).await;
    expect_row(CHECK, &store, "transfer", "t1", Some(&stored(second, 2))).await;

    // A row that is only its id (state null) round-trips too.
    let bare = ProcessRow::new("t2");
    commit(CHECK, &store, "transfer", vec![bare.clone()], None).await;
    expect_row(CHECK, &store, "transfer", "t2", Some(&stored(bare, 1))).await;
}

/// A commit whose row moved on since it was loaded is [`CQRSError::ViewConflict`] naming the
/// instance and the version it was loaded with, and writes nothing of the commit: not its
/// other rows, not its checkpoint. For a new row (two writers both loaded version 0), an
/// existing one, a version ahead of the stored one and an update of a row never stored.
pub async fn check_process_optimistic_version<S, F, Fut>(make_store: F)
where
    S: ProcessStore + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    const CHECK: &str = "process_optimistic_version";
    let store = make_store().await;
    let p = "order";

    // Two writers create the same instance: the second loses.
    let a = row("o1", json!({ "writer": "a" }), &[("ship", 10)]);
    let b = row("o1", json!({ "writer": "b" }), &[("ship", 20)]);
    commit(CHECK, &store, p, vec![a.clone()], Some(1)).await;
    expect_eq(
        CHECK,
        "the conflict of a second insert of o1",
        ("o1".to_owned(), 0),
        commit_conflict(CHECK, &store, p, vec![b], Some(2)).await,
    );
    let a = stored(a, 1);
    expect_row(CHECK, &store, p, "o1", Some(&a)).await;
    expect_eq(
        CHECK,
        "the checkpoint after a refused commit",
        1,
        checkpoint(CHECK, &store, p).await,
    );

    // Two writers update it: the stale one loses, and neither its new row nor its
    // checkpoint is written.
    let mut fresh = a.clone();
    fresh.state = json!({ "writer": "fresh" });
    let mut stale = a.clone();
    stale.state = json!({ "writer": "stale" });
    commit(CHECK, &store, p, vec![fresh.clone()], Some(3)).await;
    let extra = row("o2", json!("extra"), &[("ship", 1)]);
    expect_eq(
        CHECK,
        "the conflict of a stale update of o1",
        ("o1".to_owned(), 1),
        commit_conflict(CHECK, &store, p, vec![extra.clone(), stale], Some(4)).await,
    );
    let fresh = stored(fresh, 2);
    expect_row(CHECK, &store, p, "o1", Some(&fresh)).await;
    expect_row(CHECK, &store, p, "o2", None).await;
    expect_eq(
        CHECK,
        "the checkpoint after a refused commit",
        3,
        checkpoint(CHECK, &store, p).await,
    );
    expect_eq(
        CHECK,
        "next_due after a refused commit that set an earlier deadline",
        Some(at(10)),
        next_due(CHECK, &store, p).await,
    );

    // Without a checkpoint, a stale new row after a good one: still nothing written.
    let again = row("o1", json!("again"), &[]);
    expect_eq(
        CHECK,
        "the conflict of an insert of the stored o1 after a good row",
        ("o1".to_owned(), 0),
        commit_conflict(CHECK, &store, p, vec![extra.clone(), again], None).await,
    );
    expect_row(CHECK, &store, p, "o2", None).await;

    // A version ahead of the stored one, and an update of a row never stored.
    let mut ahead = fresh.clone();
    ahead.version = 5;
    expect_eq(
        CHECK,
        "the conflict of a version ahead of the stored one",
        ("o1".to_owned(), 5),
        commit_conflict(CHECK, &store, p, vec![ahead], None).await,
    );
    let mut ghost = row("o3", json!("ghost"), &[]);
    ghost.version = 1;
    expect_eq(
        CHECK,
        "the conflict of an update of a row never stored",
        ("o3".to_owned(), 1),
        commit_conflict(CHECK, &store, p, vec![ghost], None).await,
    );
    expect_row(CHECK, &store, p, "o3", None).await;
    expect_row(CHECK, &store, p, "o1", Some(&fresh)).await;

    // The loser reloads and wins.
    let mut retry = fresh.clone();
    retry.state = json!({ "writer": "retried" });
    commit(
        CHECK,
        &store,
        p,
        vec![retry.clone(), extra.clone()],
        Some(4),
    )
    .await;
    expect_row(CHECK, &store, p, "o1", Some(&stored(retry, 3))).await;
    expect_row(CHECK, &store, p, "o2", Some(&stored(extra, 1))).await;
    expect_eq(
        CHECK,
        "the checkpoint after the retry",
        4,
        checkpoint(CHECK, &store, p).await,
    );
}

/// Two writers that loaded the same version of an instance commit at the same time, each
/// with a row of its own and a checkpoint: exactly one wins, and the store holds all of the
/// winner's commit and nothing of the loser's. Repeated, for a new instance and for an
/// update.
pub async fn check_process_concurrent_writers<S, F, Fut>(make_store: F)
where
    S: ProcessStore + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    const CHECK: &str = "process_concurrent_writers";
    const ROUNDS: i64 = 8;
    let store = Arc::new(make_store().await);
    let p = "race";
    let mut shared = ProcessRow::new("shared");
    for round in 0..ROUNDS {
        let writers = ["a", "b"].map(|writer| {
            let mut mine = shared.clone();
            mine.state = json!({ "round": round, "writer": writer });
            mine.deadlines = vec![deadline(writer, at(round))];
            let own = row(&format!("{round}-{writer}"), json!(writer), &[]);
            let position = 10 * round + if writer == "a" { 1 } else { 2 };
            (mine, own, position)
        });
        let tasks = writers.clone().map(|(mine, own, position)| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.commit(p, vec![mine, own], Some(position)).await })
        });
        let mut results = Vec::new();
        for task in tasks {
            match task.await {
                Ok(result) => results.push(result),
                Err(error) => fail(CHECK, format_args!("a writer task panicked: {error}")),
            }
        }
        let won: Vec<usize> = (0..2).filter(|i| results[*i].is_ok()).collect();
        let &[winner] = won.as_slice() else {
            fail(
                CHECK,
                format_args!(
                    "round {round}: of two writers of version {} exactly one must win; \
                     the store answered {results:?}",
                    shared.version
                ),
            )
        };
        let loser = 1 - winner;
        let what = format!("round {round}: the losing writer's commit");
        conflict_of(CHECK, &what, results.swap_remove(loser));
        let (mine, own, position) = writers[winner].clone();
        let (_, lost, _) = &writers[loser];
        let mine = stored(mine, shared.version + 1);
        expect_row(CHECK, &*store, p, "shared", Some(&mine)).await;
        let own_id = own.instance.clone();
        expect_row(CHECK, &*store, p, &own_id, Some(&stored(own, 1))).await;
        expect_row(CHECK, &*store, p, &lost.instance, None).await;
        expect_eq(
            CHECK,
            &format!("round {round}: the checkpoint (the winner's)"),
            position,
            checkpoint(CHECK, &*store, p).await,
        );
        shared = mine;
    }
}

/// The checkpoint starts at 0, moves forward or stays, and never goes back: a lower one is a
/// [`CQRSError::ViewConflict`] and nothing of its commit is written. A commit without a
/// checkpoint leaves it. Each process has its own.
pub async fn check_process_checkpoint_never_back<S, F, Fut>(make_store: F)
where
    S: ProcessStore + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    const CHECK: &str = "process_checkpoint_never_back";
    let store = make_store().await;
    let p = "billing";

    commit(CHECK, &store, p, Vec::new(), Some(5)).await;
    expect_eq(
        CHECK,
        "checkpoint after 5",
        5,
        checkpoint(CHECK, &store, p).await,
    );
    commit(CHECK, &store, p, Vec::new(), Some(5)).await;
    expect_eq(
        CHECK,
        "checkpoint after 5 again",
        5,
        checkpoint(CHECK, &store, p).await,
    );

    let early = row("b1", json!("early"), &[("bill", 1)]);
    let what = "a commit with checkpoint 3 after 5";
    conflict_of(
        CHECK,
        what,
        store.commit(p, vec![early.clone()], Some(3)).await,
    );
    expect_row(CHECK, &store, p, "b1", None).await;
    expect_eq(
        CHECK,
        "checkpoint after a refused lower one",
        5,
        checkpoint(CHECK, &store, p).await,
    );
    expect_eq(
        CHECK,
        "next_due after a refused commit",
        None,
        next_due(CHECK, &store, p).await,
    );

    commit(CHECK, &store, p, vec![early.clone()], None).await;
    expect_row(CHECK, &store, p, "b1", Some(&stored(early, 1))).await;
    expect_eq(
        CHECK,
        "checkpoint after a commit without one",
        5,
        checkpoint(CHECK, &store, p).await,
    );
    commit(CHECK, &store, p, Vec::new(), Some(7)).await;
    expect_eq(
        CHECK,
        "checkpoint after 7",
        7,
        checkpoint(CHECK, &store, p).await,
    );

    expect_eq(
        CHECK,
        "checkpoint of another process",
        0,
        checkpoint(CHECK, &store, "other").await,
    );
    commit(CHECK, &store, "other", Vec::new(), Some(2)).await;
    expect_eq(
        CHECK,
        "checkpoint of another process after 2",
        2,
        checkpoint(CHECK, &store, "other").await,
    );
    expect_eq(
        CHECK,
        "checkpoint after 7",
        7,
        checkpoint(CHECK, &store, p).await,
    );
}

/// [`due`](ProcessStore::due) finds the unfinished instances with a deadline at or before a
/// time (at it included), earliest deadline first, at most `limit`, whole rows;
/// [`next_due`](ProcessStore::next_due) is the earliest deadline of an unfinished instance.
/// A finished instance is never due, even with deadlines left; an instance without deadlines
/// neither. Changing or finishing an instance moves both; processes are kept apart.
pub async fn check_process_due<S, F, Fut>(make_store: F)
where
    S: ProcessStore + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    const CHECK: &str = "process_due";
    let store = make_store().await;
    let p = "shipping";

    let a = row("a", json!("a"), &[("late", 3)]);
    let b = row("b", json!("b"), &[("slow", 10), ("soon", 1)]);
    let mut c = row("c", json!("c"), &[("never", -5)]);
    c.finished = true;
    let d = row("d", json!("d"), &[]);
    let e = row("e", json!("e"), &[("last", 5)]);
    commit(
        CHECK,
        &store,
        p,
        vec![a.clone(), b.clone(), c, d, e],
        Some(1),
    )
    .await;
    let other = row("x", json!("x"), &[("first", -100)]);
    commit(CHECK, &store, "elsewhere", vec![other], None).await;

    let ids = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    expect_eq(
        CHECK,
        "due before every deadline",
        ids(&[]),
        due(CHECK, &store, p, at(1) - Duration::microseconds(1), 10).await,
    );
    expect_eq(
        CHECK,
        "due at the first deadline exactly",
        ids(&["b"]),
        due(CHECK, &store, p, at(1), 10).await,
    );
    expect_eq(
        CHECK,
        "due after two deadlines, earliest first",
        ids(&["b", "a"]),
        due(CHECK, &store, p, at(4), 10).await,
    );
    expect_eq(
        CHECK,
        "due with limit 1",
        ids(&["b"]),
        due(CHECK, &store, p, at(4), 1).await,
    );
    expect_eq(
        CHECK,
        "due with limit 0",
        ids(&[]),
        due(CHECK, &store, p, at(4), 0).await,
    );
    expect_eq(
        CHECK,
        "due after every deadline (not the finished instance, not one without deadlines)",
        ids(&["b", "a", "e"]),
        due(CHECK, &store, p, at(1_000), 10).await,
    );
    let rows = ok(CHECK, "due(at(4))", store.due(p, at(4), 10).await);
    expect_eq(
        CHECK,
        "the rows due, whole",
        vec![stored(b.clone(), 1), stored(a.clone(), 1)],
        rows,
    );
    expect_eq(
        CHECK,
        "next_due",
        Some(at(1)),
        next_due(CHECK, &store, p).await,
    );
    expect_eq(
        CHECK,
        "next_due of another process",
        Some(at(-100)),
        next_due(CHECK, &store, "elsewhere").await,
    );
    expect_eq(
        CHECK,
        "next_due of a process without instances",
        None,
        next_due(CHECK, &store, "nowhere").await,
    );

    // b's first deadline fired: it is due again only at its second.
    let mut b = stored(b, 1);
    b.deadlines.retain(|d| d.name != "soon");
    commit(CHECK, &store, p, vec![b.clone()], None).await;
    expect_eq(
        CHECK,
        "next_due after the earliest deadline went",
        Some(at(3)),
        next_due(CHECK, &store, p).await,
    );
    expect_eq(
        CHECK,
        "due after the earliest deadline went",
        ids(&["a", "e", "b"]),
        due(CHECK, &store, p, at(1_000), 10).await,
    );

    // a finishes with its deadline still listed: it is due no more.
    let mut a = stored(a, 1);
    a.finished = true;
    commit(CHECK, &store, p, vec![a], Some(2)).await;
    expect_eq(
        CHECK,
        "next_due after the earliest instance finished",
        Some(at(5)),
        next_due(CHECK, &store, p).await,
    );
    expect_eq(
        CHECK,
        "due after an instance finished",
        ids(&["e", "b"]),
        due(CHECK, &store, p, at(1_000), 10).await,
    );
}

/// [`list`](ProcessStore::list) pages through a process's instances (finished or not) in
/// byte order of their ids, after a given id (stored or not), at most `limit` at a time,
/// whole rows; another process's instances are not listed.
pub async fn check_process_list<S, F, Fut>(make_store: F)
where
    S: ProcessStore + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    const CHECK: &str = "process_list";
    let store = make_store().await;
    let p = "fulfilment";

    let ids = ["b", "B", "a", "a0", "é", "10", "9", "a b"];
    let mut rows: Vec<ProcessRow> = ids
        .iter()
        .map(|id| row(id, json!({ "id": id }), &[]))
        .collect();
    rows[1].finished = true;
    commit(CHECK, &store, p, rows.clone(), None).await;
    commit(CHECK, &store, "other", vec![row("a1", json!(0), &[])], None).await;
    let mut expected: Vec<ProcessRow> = rows.into_iter().map(|r| stored(r, 1)).collect();
    expected.sort_by(|x, y| x.instance.as_bytes().cmp(y.instance.as_bytes()));

    expect_eq(
        CHECK,
        "list of every instance",
        expected.clone(),
        list(CHECK, &store, p, None, 100).await,
    );
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..=expected.len() {
        let page = list(CHECK, &store, p, after.as_deref(), 3).await;
        if page.len() > 3 {
            fail(
                CHECK,
                format_args!("a page of limit 3 had {} rows", page.len()),
            );
        }
        let Some(last) = page.last() else { break };
        after = Some(last.instance.clone());
        paged.extend(page);
    }
    expect_eq(CHECK, "the pages of 3, joined", expected.clone(), paged);

    let names = |rows: Vec<ProcessRow>| rows.into_iter().map(|r| r.instance).collect::<Vec<_>>();
    expect_eq(
        CHECK,
        "list after an id that is not stored",
        vec!["b".to_owned(), "é".to_owned()],
        names(list(CHECK, &store, p, Some("a00"), 100).await),
    );
    expect_eq(
        CHECK,
        "list after \"z\" (byte order puts é after it)",
        vec!["é".to_owned()],
        names(list(CHECK, &store, p, Some("z"), 100).await),
    );
    expect_eq(
        CHECK,
        "list after the last id",
        Vec::<String>::new(),
        names(list(CHECK, &store, p, Some("é"), 100).await),
    );
    expect_eq(
        CHECK,
        "list with limit 0",
        Vec::<String>::new(),
        names(list(CHECK, &store, p, None, 0).await),
    );
}
