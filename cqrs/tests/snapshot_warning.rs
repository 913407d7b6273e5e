//! The warning logged when a snapshot is not used names the aggregate, the snapshot's
//! sequence and what the stream holds.
//!
//! Alone in its own test binary: `tracing` caches whether a callsite is wanted across
//! threads, so a scoped subscriber racing with other tests on other threads could find the
//! callsite already marked as unwanted.

use std::sync::{Arc, Mutex};

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DomainEvent, MemoryEventRepository,
    MemorySnapshotRepository, Snapshot, SnapshotPolicy, SnapshotRepository,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
enum TallyEvent {
    #[event(name = "Added", version = "1")]
    Added { by: u32 },
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct TallyError(#[from] CQRSError);

#[derive(Default)]
struct Tally;

impl Aggregate for Tally {
    const NAME: &'static str = "tally";
    type Events = TallyEvent;
    type Commands = u32;
    type Errors = TallyError;
    type State = u32;

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &u32,
        by: u32,
    ) -> Result<Vec<TallyEvent>, TallyError> {
        Ok(vec![TallyEvent::Added { by }])
    }

    fn handle_event(&self, state: &mut u32, event: &TallyEvent) {
        let TallyEvent::Added { by } = event;
        *state += by;
    }
}

/// An event's level and fields, as `(name, Debug text)`.
type LoggedEvent = (tracing::Level, Vec<(String, String)>);

/// A `tracing` subscriber that keeps every event's level and fields.
#[derive(Clone, Default)]
struct EventLog(Arc<Mutex<Vec<LoggedEvent>>>);

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl tracing::Subscriber for EventLog {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), fields.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread")]
async fn a_snapshot_ahead_of_its_stream_is_reported_with_both_sequences() {
    let log = EventLog::default();
    let _guard = tracing::subscriber::set_default(log.clone());
    tracing::callsite::rebuild_interest_cache();

    let store = MemoryEventRepository::new();
    let snapshots = MemorySnapshotRepository::new();
    let framework = CQRSFramework::<Tally>::new(store.clone())
        .with_snapshots(snapshots.clone(), SnapshotPolicy::Never);
    let id = Uuid::new_v4();
    for by in [1, 2, 3] {
        framework.dispatch(id, by).await.unwrap();
    }
    snapshots
        .save_snapshot(Snapshot {
            aggregate_type: Tally::NAME.to_owned(),
            aggregate_id: id,
            sequence: 10,
            state: serde_json::json!(1000),
            timestamp: chrono::Utc::now(),
        })
        .await
        .unwrap();
    assert_eq!(framework.load(id).await.unwrap(), 6);

    let logged = log.0.lock().unwrap().clone();
    let warnings: Vec<_> = logged
        .iter()
        .filter(|(level, _)| *level == tracing::Level::WARN)
        .map(|(_, fields)| fields.clone())
        .collect();
    assert_eq!(warnings.len(), 1, "{logged:?}");
    let field = |name: &str| {
        warnings[0]
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("aggregate_type").as_deref(), Some("\"tally\""));
    assert_eq!(field("aggregate_id"), Some(id.to_string()));
    assert_eq!(field("snapshot_sequence").as_deref(), Some("10"));
    assert_eq!(field("stream_sequence").as_deref(), Some("3"));
    let message = field("message").unwrap_or_default();
    assert!(
        message.contains("snapshot not used") && message.contains("no event at its sequence"),
        "{message}"
    );
}
