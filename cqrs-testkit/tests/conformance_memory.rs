//! The in-memory event store against the store conformance suite.

use cqrs_testkit::conformance::{self, MemoryHarness};

/// The whole suite, as a store author runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_meets_the_event_repository_contract() {
    conformance::check_event_repository(&MemoryHarness).await;
}

/// A batch naming one event id twice is refused before anything is stored.
#[tokio::test]
async fn memory_store_refuses_a_batch_with_an_id_twice() {
    conformance::check_duplicate_id_within_batch(&MemoryHarness).await;
}
