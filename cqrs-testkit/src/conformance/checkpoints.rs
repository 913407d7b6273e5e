//! The [`CheckpointRepository`] conformance suite: where a reader that is not a view (an
//! outbox relay, an integration) records how far it has read.
//!
//! A store author implements [`CheckpointHarness`] and calls [`check_checkpoint_repository`];
//! every clause has its own `check_*` function too. A check panics on the first violation
//! with a message that starts with ``store conformance check `NAME` failed:``.
//!
//! The contract is the trait's: a name never saved is at 0, and a save replaces what was
//! recorded under its name, whatever it was. Unlike a view store's checkpoint (which
//! [`check_view_checkpoint_never_goes_back`](super::check_view_checkpoint_never_goes_back)
//! covers), a checkpoint saved here may go back: a relay that is rewound to replay a range
//! saves a lower position.

use std::future::Future;

use cqrs::{Checkpoint, CheckpointRepository, MemoryCheckpointRepository};

use super::{fail, ok};

/// What the checkpoint conformance suite needs to know about a store: how to get an empty one.
///
/// ```
/// use cqrs::MemoryCheckpointRepository;
/// use cqrs_testkit::conformance::{check_checkpoint_repository, CheckpointHarness};
///
/// /// Wraps the memory store to show the shape; a SQL harness opens a new file or schema.
/// struct MyHarness;
///
/// impl CheckpointHarness for MyHarness {
///     type Checkpoints = MemoryCheckpointRepository;
///
///     async fn fresh(&self) -> MemoryCheckpointRepository {
///         MemoryCheckpointRepository::new()
///     }
/// }
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// check_checkpoint_repository(&MyHarness).await;
/// # });
/// ```
pub trait CheckpointHarness: Send + Sync {
    /// The checkpoint store under test.
    type Checkpoints: CheckpointRepository + 'static;

    /// A new, empty checkpoint store that no other test shares.
    fn fresh(&self) -> impl Future<Output = Self::Checkpoints> + Send;
}

/// The harness of [`MemoryCheckpointRepository`].
///
/// ```
/// use cqrs_testkit::conformance::{check_checkpoint_repository, MemoryCheckpointHarness};
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// check_checkpoint_repository(&MemoryCheckpointHarness).await;
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryCheckpointHarness;

impl CheckpointHarness for MemoryCheckpointHarness {
    type Checkpoints = MemoryCheckpointRepository;

    async fn fresh(&self) -> MemoryCheckpointRepository {
        MemoryCheckpointRepository::new()
    }
}

/// Runs every check of the [`CheckpointRepository`] contract, one after the other, each on a
/// fresh store; panics on the first violation with a message naming the check.
///
/// The checks, in order: [`check_checkpoint_missing`], [`check_checkpoint_round_trip`],
/// [`check_checkpoint_names_independent`], [`check_checkpoint_save_replaces`].
pub async fn check_checkpoint_repository<H: CheckpointHarness>(harness: &H) {
    check_checkpoint_missing(harness).await;
    check_checkpoint_round_trip(harness).await;
    check_checkpoint_names_independent(harness).await;
    check_checkpoint_save_replaces(harness).await;
}

async fn load<C: CheckpointRepository + ?Sized>(check: &str, checkpoints: &C, name: &str) -> i64 {
    ok(
        check,
        &format!("load_checkpoint({name:?})"),
        checkpoints.load_checkpoint(name).await,
    )
}

async fn save<C: CheckpointRepository + ?Sized>(
    check: &str,
    checkpoints: &C,
    name: &str,
    position: i64,
) {
    let checkpoint = Checkpoint {
        name: name.to_owned(),
        position,
    };
    ok(
        check,
        &format!("save_checkpoint({name:?}, {position})"),
        checkpoints.save_checkpoint(checkpoint).await,
    );
}

async fn expect<C: CheckpointRepository + ?Sized>(
    check: &str,
    checkpoints: &C,
    name: &str,
    expected: i64,
    when: &str,
) {
    let actual = load(check, checkpoints, name).await;
    if actual != expected {
        fail(
            check,
            format_args!(
                "load_checkpoint({name:?}) {when}: expected {expected}, the store has {actual}"
            ),
        );
    }
}

/// A name never saved is at 0.
pub async fn check_checkpoint_missing<H: CheckpointHarness>(harness: &H) {
    const CHECK: &str = "checkpoint_missing";
    let checkpoints = harness.fresh().await;
    expect(CHECK, &checkpoints, "relay", 0, "on a new store").await;
}

/// A saved position loads back exactly, up to `i64::MAX` (a position beyond what a float
/// holds exactly included), and the last save is the one loaded.
pub async fn check_checkpoint_round_trip<H: CheckpointHarness>(harness: &H) {
    const CHECK: &str = "checkpoint_round_trip";
    let checkpoints = harness.fresh().await;
    for position in [1, 42, 43, (1 << 53) + 1, i64::MAX] {
        save(CHECK, &checkpoints, "relay", position).await;
        expect(CHECK, &checkpoints, "relay", position, "after saving it").await;
    }
}

/// Names are independent and compared exactly: saving one changes no other, including names
/// that differ only in case, in a trailing space, or in a character a collation would fold.
pub async fn check_checkpoint_names_independent<H: CheckpointHarness>(harness: &H) {
    const CHECK: &str = "checkpoint_names_independent";
    let checkpoints = harness.fresh().await;
    let names = [
        "relay",
        "Relay",
        "relay ",
        "relay_v1",
        "relais",
        "relaïs",
        "it's \"quoted\"",
    ];
    for (i, name) in names.iter().enumerate() {
        save(CHECK, &checkpoints, name, 100 + i as i64).await;
    }
    for (i, name) in names.iter().enumerate() {
        expect(
            CHECK,
            &checkpoints,
            name,
            100 + i as i64,
            "after saving every name once",
        )
        .await;
    }
    save(CHECK, &checkpoints, "relay", 7).await;
    for (i, name) in names.iter().enumerate().skip(1) {
        expect(
            CHECK,
            &checkpoints,
            name,
            100 + i as i64,
            "after saving \"relay\" again",
        )
        .await;
    }
    expect(CHECK, &checkpoints, "never_saved", 0, "with others saved").await;
}

/// A save replaces the recorded position, whatever it was: a lower one too (the trait
/// promises a replacement, not a maximum), and the same one again.
pub async fn check_checkpoint_save_replaces<H: CheckpointHarness>(harness: &H) {
    const CHECK: &str = "checkpoint_save_replaces";
    let checkpoints = harness.fresh().await;
    save(CHECK, &checkpoints, "relay", 10).await;
    save(CHECK, &checkpoints, "relay", 4).await;
    expect(CHECK, &checkpoints, "relay", 4, "after saving 10 then 4").await;
    save(CHECK, &checkpoints, "relay", 4).await;
    expect(CHECK, &checkpoints, "relay", 4, "after saving 4 twice").await;
    save(CHECK, &checkpoints, "relay", 0).await;
    expect(CHECK, &checkpoints, "relay", 0, "after saving 0").await;
}
