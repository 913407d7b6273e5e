//! The snapshot conformance suite catches broken snapshot stores: each test runs one check
//! against a store with one deliberate flaw, and expects that check to fail.

use async_trait::async_trait;
use cqrs::{
    CQRSError, MemoryEventRepository, MemorySnapshotRepository, Snapshot, SnapshotRepository,
};
use cqrs_testkit::conformance::{self, MemorySnapshotHarness, SnapshotHarness};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Flaw {
    /// Every save replaces the stored snapshot, older or not.
    IgnoresNewestWins,
    /// `delete_snapshot` succeeds and removes nothing.
    DeleteDoesNothing,
    /// Keys snapshots by the aggregate id alone.
    KeyIgnoresType,
    /// None: the wrapper itself.
    None,
}

struct FlawedSnapshots {
    inner: MemorySnapshotRepository,
    flaw: Flaw,
}

impl FlawedSnapshots {
    /// The aggregate type the inner store keys the row under.
    fn key<'a>(&self, aggregate_type: &'a str) -> &'a str {
        if self.flaw == Flaw::KeyIgnoresType {
            "any"
        } else {
            aggregate_type
        }
    }

    /// Writes the row as this store lays it out, whatever is stored.
    async fn put(&self, mut snapshot: Snapshot) {
        snapshot.aggregate_type = self.key(&snapshot.aggregate_type).to_owned();
        MemorySnapshotHarness
            .put_snapshot_unchecked(&self.inner, snapshot)
            .await;
    }
}

#[async_trait]
impl SnapshotRepository for FlawedSnapshots {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<Snapshot>, CQRSError> {
        let snapshot = self
            .inner
            .load_snapshot(self.key(aggregate_type), aggregate_id)
            .await?;
        Ok(snapshot.map(|mut snapshot| {
            snapshot.aggregate_type = aggregate_type.to_owned();
            snapshot
        }))
    }

    async fn save_snapshot(&self, mut snapshot: Snapshot) -> Result<(), CQRSError> {
        if self.flaw == Flaw::IgnoresNewestWins {
            self.put(snapshot).await;
            return Ok(());
        }
        snapshot.aggregate_type = self.key(&snapshot.aggregate_type).to_owned();
        self.inner.save_snapshot(snapshot).await
    }

    async fn delete_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<(), CQRSError> {
        if self.flaw == Flaw::DeleteDoesNothing {
            return Ok(());
        }
        self.inner
            .delete_snapshot(self.key(aggregate_type), aggregate_id)
            .await
    }
}

struct FlawedHarness(Flaw);

impl SnapshotHarness for FlawedHarness {
    type Events = MemoryEventRepository;
    type Snapshots = FlawedSnapshots;

    async fn fresh(&self) -> (MemoryEventRepository, FlawedSnapshots) {
        let snapshots = FlawedSnapshots {
            inner: MemorySnapshotRepository::new(),
            flaw: self.0,
        };
        (MemoryEventRepository::new(), snapshots)
    }

    async fn put_snapshot_unchecked(&self, snapshots: &FlawedSnapshots, snapshot: Snapshot) {
        snapshots.put(snapshot).await;
    }
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `snapshot_newest_wins` failed: after saving sequence 10 over 20 (the older one must not replace the newer): load_snapshot(conformance_snapshotted "
)]
async fn an_older_snapshot_replacing_a_newer_one_is_caught() {
    conformance::check_snapshot_newest_wins(&FlawedHarness(Flaw::IgnoresNewestWins)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `delete_snapshot` failed: after deleting the snapshot at 10: load_snapshot(conformance_snapshotted "
)]
async fn a_delete_that_removes_nothing_is_caught() {
    conformance::check_delete_snapshot(&FlawedHarness(Flaw::DeleteDoesNothing)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `snapshot_ahead_of_stream` failed: after CQRSFramework::load with a snapshot at 10 and 3 events stored: the stored snapshot is Some((10, "
)]
async fn a_snapshot_left_ahead_of_its_stream_is_caught() {
    conformance::check_snapshot_ahead_of_stream(&FlawedHarness(Flaw::DeleteDoesNothing)).await;
}

#[tokio::test]
#[should_panic(
    expected = "store conformance check `snapshot_isolation` failed: after saving three aggregates' snapshots (same id, other type; same type, other id): load_snapshot(conformance_snapshotted "
)]
async fn a_key_without_the_type_is_caught() {
    conformance::check_snapshot_isolation(&FlawedHarness(Flaw::KeyIgnoresType)).await;
}

/// The wrapper itself, without a flaw, passes: the failures above come from the flaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wrapper_without_a_flaw_passes() {
    conformance::check_snapshot_repository(&FlawedHarness(Flaw::None)).await;
}
