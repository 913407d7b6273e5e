//! The in-memory view, checkpoint and dead-letter stores pass their conformance suites.

use cqrs_testkit::conformance::{check_view_repository, MemoryViewHarness};

#[tokio::test(flavor = "multi_thread")]
async fn memory_view_store_conforms() {
    check_view_repository(&MemoryViewHarness).await;
}
