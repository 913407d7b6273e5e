//! The in-memory view, checkpoint and dead-letter stores pass their conformance suites.

use cqrs_testkit::conformance::{
    check_checkpoint_repository, check_dead_letter_repository, check_view_repository,
    MemoryCheckpointHarness, MemoryViewHarness,
};

#[tokio::test(flavor = "multi_thread")]
async fn memory_view_store_conforms() {
    check_view_repository(&MemoryViewHarness).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_checkpoint_store_conforms() {
    check_checkpoint_repository(&MemoryCheckpointHarness).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_dead_letters_conform() {
    check_dead_letter_repository(&MemoryViewHarness).await;
}
