//! The [`DeadLetters`] conformance suite: where a projection records the poison events it
//! skips, and how a sink on the views' own database skips one exactly once.
//!
//! A store author implements [`DeadLetterHarness`] (on top of the store's [`ViewHarness`]:
//! the sink on a database, beside the views whose checkpoints it moves) and calls
//! [`check_dead_letter_repository`]. Every clause has its own `check_*` function too. A check panics on
//! the first violation with a message that starts with
//! ``store conformance check `NAME` failed:``.

use std::fmt::Debug;

use chrono::{DateTime, Utc};
use cqrs::ViewRepository;
use cqrs::{DeadLetter, DeadLetterSkip, DeadLetters, MemoryDeadLetters};
use uuid::Uuid;

use super::views::{checkpoint_of, cp, ConformanceTally, TallyV1};
use super::{fail, ok, MemoryViewDatabase, MemoryViewHarness, ViewHarness};

/// What the dead-letter conformance suite needs to know about a sink: the sink on a
/// database of the store's [`ViewHarness`].
///
/// [`DeadLetters::record_and_skip`] moves the checkpoint that the database's view stores
/// commit; the suite reads it back through a view store of the same database. A sink that
/// keeps the provided `record_and_skip` (it answers [`DeadLetterSkip::Unsupported`]) is
/// checked for writing nothing there.
///
/// ```
/// use cqrs::MemoryDeadLetters;
/// use cqrs_testkit::conformance::{check_dead_letter_repository, DeadLetterHarness, MemoryViewDatabase, ViewHarness};
///
/// /// Memory views with a sink of their own, to show the shape; a SQL harness returns the
/// /// sink on the database's file or schema.
/// struct MyHarness;
///
/// impl ViewHarness for MyHarness {
///     type Database = MemoryViewDatabase;
///     const VERSIONS_SHARE_A_TABLE: bool = false;
///
///     async fn fresh(&self) -> MemoryViewDatabase {
///         MemoryViewDatabase::default()
///     }
///
///     fn views<A: cqrs::Aggregate, V: cqrs::View<A>>(&self, database: &MemoryViewDatabase) -> impl cqrs::ViewRepository<A, V> {
///         database.views::<V>()
///     }
/// }
///
/// impl DeadLetterHarness for MyHarness {
///     type Sink = MemoryDeadLetters;
///
///     fn dead_letters(&self, database: &MemoryViewDatabase) -> MemoryDeadLetters {
///         database.dead_letters()
///     }
/// }
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// check_dead_letter_repository(&MyHarness).await;
/// # });
/// ```
pub trait DeadLetterHarness: ViewHarness {
    /// The sink under test.
    type Sink: DeadLetters + 'static;

    /// The sink on `database` (every call a handle on the same letters).
    fn dead_letters(&self, database: &Self::Database) -> Self::Sink;
}

impl DeadLetterHarness for MemoryViewHarness {
    type Sink = MemoryDeadLetters;

    fn dead_letters(&self, database: &MemoryViewDatabase) -> MemoryDeadLetters {
        database.dead_letters()
    }
}

/// Runs every check of the [`DeadLetters`] contract, one after the other, each on a fresh
/// database; panics on the first violation with a message naming the check.
///
/// The checks, in order: [`check_dead_letter_round_trip`],
/// [`check_dead_letter_record_replaces`], [`check_dead_letter_record_and_skip`].
///
/// ```
/// use cqrs_testkit::conformance::{check_dead_letter_repository, MemoryViewHarness};
///
/// #[tokio::test(flavor = "multi_thread")]
/// async fn memory_dead_letters_conform() {
///     check_dead_letter_repository(&MemoryViewHarness).await;
/// }
/// # fn main() {}
/// ```
pub async fn check_dead_letter_repository<H: DeadLetterHarness>(harness: &H) {
    check_dead_letter_round_trip(harness).await;
    check_dead_letter_record_replaces(harness).await;
    check_dead_letter_record_and_skip(harness).await;
}

/// A letter of `projection` at `position`, with text that exercises the sink's encoding
/// and a time of whole microseconds that differs per position.
fn letter(projection: &str, position: i64) -> DeadLetter {
    let micros = 1_709_210_096_123_456 + position * 1_000_001;
    DeadLetter {
        projection: projection.to_owned(),
        view: "conformance_tally".to_owned(),
        event_id: Uuid::new_v4(),
        aggregate_type: "conformance_tally".to_owned(),
        aggregate_id: Uuid::new_v4(),
        sequence: position / 2 + 1,
        position,
        event_type: "ConformanceTallyCounted".to_owned(),
        event_version: "1".to_owned(),
        error: format!("refused at {position}: it's got a 'quote', a \"double\" one, ünïcödé"),
        attempts: 3,
        recorded_at: DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default(),
    }
}

/// The letter of a row the store could not read: nil ids and empty names.
fn damaged_letter(projection: &str, position: i64) -> DeadLetter {
    DeadLetter {
        event_id: Uuid::nil(),
        aggregate_type: String::new(),
        aggregate_id: Uuid::nil(),
        sequence: 0,
        event_type: String::new(),
        event_version: String::new(),
        ..letter(projection, position)
    }
}

async fn record<S: DeadLetters + ?Sized>(check: &str, sink: &S, letter: &DeadLetter) {
    let what = format!(
        "record of the letter of {} at {}",
        letter.projection, letter.position
    );
    ok(check, &what, sink.record(letter.clone()).await);
}

async fn list<S: DeadLetters + ?Sized>(check: &str, sink: &S, projection: &str) -> Vec<DeadLetter> {
    ok(
        check,
        &format!("list({projection:?})"),
        sink.list(projection).await,
    )
}

#[track_caller]
fn expect_eq<T: PartialEq + Debug>(check: &str, what: &str, expected: T, actual: T) {
    if expected != actual {
        fail(
            check,
            format_args!("{what}: expected {expected:?}, found {actual:?}"),
        );
    }
}

async fn skip<S: DeadLetters + ?Sized>(
    check: &str,
    sink: &S,
    letter: &DeadLetter,
    from: i64,
) -> DeadLetterSkip {
    let what = format!(
        "record_and_skip of the letter of {} at {} from {from}",
        letter.projection, letter.position
    );
    ok(check, &what, sink.record_and_skip(letter, from).await)
}

/// Recorded letters list back equal, field by field (a damaged row's nil ids and empty names
/// too), per projection name and in position order whatever the recording order; a
/// projection with none lists none.
pub async fn check_dead_letter_round_trip<H: DeadLetterHarness>(harness: &H) {
    const CHECK: &str = "dead_letter_round_trip";
    let database = harness.fresh().await;
    let sink = harness.dead_letters(&database);
    expect_eq(
        CHECK,
        "list(\"tally_v1\") of a new sink",
        Vec::new(),
        list(CHECK, &sink, "tally_v1").await,
    );
    let (late, early, damaged) = (
        letter("tally_v1", 30),
        letter("tally_v1", 10),
        damaged_letter("tally_v1", 20),
    );
    let other = letter("tally_v2", 15);
    for letter in [&late, &other, &early, &damaged] {
        record(CHECK, &sink, letter).await;
    }
    expect_eq(
        CHECK,
        "list(\"tally_v1\")",
        vec![early, damaged, late],
        list(CHECK, &sink, "tally_v1").await,
    );
    expect_eq(
        CHECK,
        "list(\"tally_v2\")",
        vec![other],
        list(CHECK, &sink, "tally_v2").await,
    );
    expect_eq(
        CHECK,
        "list(\"tally\") (a prefix of the names recorded)",
        Vec::new(),
        list(CHECK, &sink, "tally").await,
    );
    // Another handle on the same database sees the same letters.
    let again = harness.dead_letters(&database);
    expect_eq(
        CHECK,
        "list(\"tally_v2\") through another handle",
        1,
        list(CHECK, &again, "tally_v2").await.len(),
    );
}

/// A second record of the same (projection, position) replaces the first, never
/// duplicates it (a projection that crashed between the record and its checkpoint records
/// the letter again); the same position under another projection is another letter.
pub async fn check_dead_letter_record_replaces<H: DeadLetterHarness>(harness: &H) {
    const CHECK: &str = "dead_letter_record_replaces";
    let database = harness.fresh().await;
    let sink = harness.dead_letters(&database);
    let first = letter("tally_v1", 10);
    record(CHECK, &sink, &first).await;
    let again = DeadLetter {
        attempts: 5,
        error: "refused again".to_owned(),
        ..first.clone()
    };
    record(CHECK, &sink, &again).await;
    expect_eq(
        CHECK,
        "list(\"tally_v1\") after recording the letter at 10 twice",
        vec![again.clone()],
        list(CHECK, &sink, "tally_v1").await,
    );
    let elsewhere = letter("tally_v2", 10);
    record(CHECK, &sink, &elsewhere).await;
    expect_eq(
        CHECK,
        "list(\"tally_v1\") after a letter at 10 of tally_v2",
        vec![again],
        list(CHECK, &sink, "tally_v1").await,
    );
    expect_eq(
        CHECK,
        "list(\"tally_v2\")",
        vec![elsewhere],
        list(CHECK, &sink, "tally_v2").await,
    );
}

/// `record_and_skip`: a sink that keeps the provided implementation answers
/// [`DeadLetterSkip::Unsupported`] and writes nothing. A sink that supports it records the
/// letter and moves the view store's checkpoint from `from` to the letter's position in one
/// transaction, only if the checkpoint is still at `from` (a missing one counts as 0):
/// otherwise it answers [`DeadLetterSkip::Stale`] and writes nothing. So a retried skip of
/// the same letter is stale and records nothing twice, and a skip after the view store
/// moved the checkpoint is stale too.
pub async fn check_dead_letter_record_and_skip<H: DeadLetterHarness>(harness: &H) {
    const CHECK: &str = "dead_letter_record_and_skip";
    let database = harness.fresh().await;
    let sink = harness.dead_letters(&database);
    let views = harness.views::<ConformanceTally, TallyV1>(&database);
    let name = "tally_v1";
    let first = letter(name, 20);

    match skip(CHECK, &sink, &first, 7).await {
        DeadLetterSkip::Unsupported => {
            expect_eq(
                CHECK,
                "list after an Unsupported record_and_skip",
                Vec::new(),
                list(CHECK, &sink, name).await,
            );
            expect_eq(
                CHECK,
                "the checkpoint after an Unsupported record_and_skip",
                0,
                checkpoint_of(CHECK, &views, name).await,
            );
            return;
        }
        DeadLetterSkip::Stale => {}
        DeadLetterSkip::Committed => fail(
            CHECK,
            "record_and_skip from 7 committed, but no checkpoint was recorded (it is at 0)",
        ),
    }
    expect_eq(
        CHECK,
        "list after a stale record_and_skip",
        Vec::new(),
        list(CHECK, &sink, name).await,
    );
    expect_eq(
        CHECK,
        "the checkpoint after a stale record_and_skip",
        0,
        checkpoint_of(CHECK, &views, name).await,
    );

    // From 0 with no checkpoint: the letter and the checkpoint, together.
    expect_eq(
        CHECK,
        "record_and_skip of the letter at 20 from 0",
        DeadLetterSkip::Committed,
        skip(CHECK, &sink, &first, 0).await,
    );
    expect_eq(
        CHECK,
        "list after a committed record_and_skip",
        vec![first.clone()],
        list(CHECK, &sink, name).await,
    );
    expect_eq(
        CHECK,
        "the view store's checkpoint after a committed record_and_skip",
        20,
        checkpoint_of(CHECK, &views, name).await,
    );
    expect_eq(
        CHECK,
        "another name's checkpoint after a committed record_and_skip",
        0,
        checkpoint_of(CHECK, &views, "tally_v2").await,
    );

    // The same skip again (a retry after an unknown outcome): stale, nothing twice.
    expect_eq(
        CHECK,
        "a retried record_and_skip of the letter at 20 from 0",
        DeadLetterSkip::Stale,
        skip(CHECK, &sink, &first, 0).await,
    );
    expect_eq(
        CHECK,
        "list after a retried record_and_skip",
        vec![first.clone()],
        list(CHECK, &sink, name).await,
    );
    expect_eq(
        CHECK,
        "the checkpoint after a retried record_and_skip",
        20,
        checkpoint_of(CHECK, &views, name).await,
    );

    // Onwards from where it is.
    let second = letter(name, 25);
    expect_eq(
        CHECK,
        "record_and_skip of the letter at 25 from 20",
        DeadLetterSkip::Committed,
        skip(CHECK, &sink, &second, 20).await,
    );
    expect_eq(
        CHECK,
        "the checkpoint after the second committed record_and_skip",
        25,
        checkpoint_of(CHECK, &views, name).await,
    );

    // The view store moves the checkpoint (another projector): a skip from 25 is stale.
    ok(
        CHECK,
        "the view store's commit of the checkpoint at 30",
        views.commit(Vec::new(), Some(cp(name, 30))).await,
    );
    let third = letter(name, 35);
    expect_eq(
        CHECK,
        "record_and_skip of the letter at 35 from 25, the checkpoint being at 30",
        DeadLetterSkip::Stale,
        skip(CHECK, &sink, &third, 25).await,
    );
    expect_eq(
        CHECK,
        "list after a record_and_skip from a checkpoint that moved",
        vec![first.clone(), second.clone()],
        list(CHECK, &sink, name).await,
    );
    expect_eq(
        CHECK,
        "record_and_skip of the letter at 35 from 30",
        DeadLetterSkip::Committed,
        skip(CHECK, &sink, &third, 30).await,
    );
    expect_eq(
        CHECK,
        "list after three committed skips",
        vec![first, second, third],
        list(CHECK, &sink, name).await,
    );
    expect_eq(
        CHECK,
        "the checkpoint after three committed skips",
        35,
        checkpoint_of(CHECK, &views, name).await,
    );
}
