//! The dispatcher's `tracing` spans, seen by a subscriber.
//!
//! Alone in its own test binary: `tracing` caches whether a span's callsite is wanted
//! across threads, so a scoped subscriber racing with other tests' dispatches on other
//! threads could find the callsite already marked as unwanted.

use std::sync::{Arc, Mutex};

use cqrs::{Aggregate, CQRSError, CQRSFramework, DomainEvent, MemoryEventRepository};
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TallyState {
    total: u32,
}

#[derive(Default)]
struct Tally;

impl Aggregate for Tally {
    const NAME: &'static str = "tally";
    type Events = TallyEvent;
    type Commands = Vec<u32>;
    type Errors = TallyError;
    type State = TallyState;

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &TallyState,
        adds: Vec<u32>,
    ) -> Result<Vec<TallyEvent>, TallyError> {
        Ok(adds
            .into_iter()
            .map(|by| TallyEvent::Added { by })
            .collect())
    }

    fn handle_event(&self, state: &mut TallyState, event: &TallyEvent) {
        let TallyEvent::Added { by } = event;
        state.total += by;
    }
}

/// A span's name and the fields recorded on it, as `(name, Debug text)`.
type LoggedSpan = (&'static str, Vec<(String, String)>);

/// A `tracing` subscriber that keeps each span's name and the fields recorded on it.
#[derive(Clone, Default)]
struct SpanLog(Arc<Mutex<Vec<LoggedSpan>>>);

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl tracing::Subscriber for SpanLog {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = Fields::default();
        span.record(&mut fields);
        let mut spans = self.0.lock().unwrap();
        spans.push((span.metadata().name(), fields.0));
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        self.0.lock().unwrap()[span.into_u64() as usize - 1]
            .1
            .extend(fields.0);
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn with_a_subscriber_each_dispatch_has_a_span_with_the_new_sequence() {
    let log = SpanLog::default();
    let _guard = tracing::dispatcher::set_default(&tracing::Dispatch::new(log.clone()));
    let framework = CQRSFramework::<Tally>::new(MemoryEventRepository::new());
    let id = Uuid::new_v4();
    framework.dispatch_new(id, vec![1]).await.unwrap();
    framework.dispatch(id, vec![2, 3]).await.unwrap();
    assert_eq!(framework.load(id).await.unwrap().total, 6);

    let field = |fields: &[(String, String)], name: &str| {
        fields
            .iter()
            .rev()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.clone())
    };
    let spans = log.0.lock().unwrap().clone();
    let ours: Vec<_> = spans
        .iter()
        .filter(|(name, _)| name.starts_with("dispatch"))
        .collect();
    assert_eq!(ours.len(), 2, "{spans:?}");
    for ((name, fields), (expected_name, sequence)) in
        ours.iter().zip([("dispatch_new", "1"), ("dispatch", "3")])
    {
        assert_eq!(*name, expected_name);
        assert_eq!(
            field(fields, "aggregate_type").as_deref(),
            Some("\"tally\"")
        );
        assert_eq!(field(fields, "aggregate_id"), Some(id.to_string()));
        assert_eq!(
            field(fields, "sequence").as_deref(),
            Some(sequence),
            "{fields:?}"
        );
    }
}
