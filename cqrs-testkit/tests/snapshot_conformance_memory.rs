//! The in-memory snapshot store against the snapshot conformance suite.

use cqrs_testkit::conformance::{self, MemorySnapshotHarness};

/// The whole suite, as a store author runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_snapshot_store_meets_the_snapshot_repository_contract() {
    conformance::check_snapshot_repository(&MemorySnapshotHarness).await;
}
