//! Prometheus metrics, kept per service and written in the text exposition format at
//! `GET /metrics`; and the event store wrapper that times appends and counts conflicts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs::{async_trait, CQRSError, EventRepository, PersistableDomainEvent};
use tracing::Instrument;
use uuid::Uuid;

/// The upper bounds of the append latency buckets, in seconds.
const APPEND_BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The service's counters and histograms. One per [`Service`](crate::Service), so two
/// services in one process (tests) count apart.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Commands dispatched, by command and outcome (`ok` or the problem's slug).
    commands: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Appends the store refused because the aggregate had moved on.
    conflicts: AtomicU64,
    /// Requests answered with the stored outcome of their idempotency key.
    idempotent_replays: AtomicU64,
    /// How long appends took.
    append_seconds: Histogram,
    /// Idempotency keys deleted after their retention.
    keys_pruned: AtomicU64,
}

impl Metrics {
    /// Counts a dispatched command and its outcome.
    pub(crate) fn command(&self, command: &'static str, outcome: &'static str) {
        // A poisoned lock only means a panic elsewhere while counting: the counts stand.
        let mut commands = self
            .commands
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *commands.entry((command, outcome)).or_default() += 1;
    }

    /// Counts a request answered from its idempotency key.
    pub(crate) fn idempotent_replay(&self) {
        self.idempotent_replays.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts idempotency keys deleted after their retention.
    pub(crate) fn keys_pruned(&self, keys: u64) {
        self.keys_pruned.fetch_add(keys, Ordering::Relaxed);
    }

    /// The metrics in Prometheus's text format, with the store's head and the view's
    /// position read at the scrape.
    pub(crate) fn render(&self, head: i64, view_position: i64) -> String {
        let mut out = String::with_capacity(2048);
        header(
            &mut out,
            "cqrs_service_commands_total",
            "counter",
            "Commands dispatched, by command and outcome (ok, or the problem type's slug).",
        );
        let commands = self
            .commands
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for ((command, outcome), count) in commands {
            let _ = writeln!(
                out,
                "cqrs_service_commands_total{{command=\"{command}\",outcome=\"{outcome}\"}} {count}"
            );
        }
        counter(
            &mut out,
            "cqrs_service_append_conflicts_total",
            "Appends refused because the aggregate had moved on; the framework retries them on the fresh state.",
            self.conflicts.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "cqrs_service_idempotent_replays_total",
            "Requests answered with the stored outcome of their Idempotency-Key, appending nothing.",
            self.idempotent_replays.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "cqrs_service_idempotency_keys_pruned_total",
            "Idempotency keys with a stored outcome deleted after their retention.",
            self.keys_pruned.load(Ordering::Relaxed),
        );
        self.append_seconds.render(
            &mut out,
            "cqrs_service_append_seconds",
            "How long an append to the event store took.",
        );
        gauge(
            &mut out,
            "cqrs_service_store_head_position",
            "The global position of the store's last event.",
            head,
        );
        gauge(
            &mut out,
            "cqrs_service_projection_position",
            "The global position the order view has reached.",
            view_position,
        );
        gauge(
            &mut out,
            "cqrs_service_projection_lag",
            "Events the order view is behind the store: head position minus view position.",
            head.saturating_sub(view_position).max(0),
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A histogram over [`APPEND_BUCKETS`]: a count per bucket (not cumulative until
/// rendered), the sum in nanoseconds, and the count.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; APPEND_BUCKETS.len()],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = APPEND_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        let mut cumulative = 0;
        for (bound, bucket) in APPEND_BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The event store as the service uses it: each append in an `append` span, timed, and
/// counted as a conflict when the aggregate had moved on.
pub(crate) struct MeteredEvents {
    pub(crate) inner: Arc<dyn EventRepository>,
    pub(crate) metrics: Arc<Metrics>,
}

#[async_trait]
impl EventRepository for MeteredEvents {
    async fn append(&self, events: Vec<PersistableDomainEvent>) -> Result<Vec<i64>, CQRSError> {
        let span = tracing::info_span!("append", events = events.len());
        let started = std::time::Instant::now();
        let appended = self.inner.append(events).instrument(span).await;
        self.metrics.append_seconds.observe(started.elapsed());
        if let Err(CQRSError::Conflict { .. }) = &appended {
            self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        appended
    }

    async fn load_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        self.inner
            .load_events(aggregate_type, aggregate_id, after_sequence)
            .await
    }

    async fn fold_events(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: i64,
        visit: &mut (dyn for<'e> FnMut(&'e PersistableDomainEvent) -> Result<(), CQRSError> + Send),
    ) -> Result<(), CQRSError> {
        self.inner
            .fold_events(aggregate_type, aggregate_id, after_sequence, visit)
            .await
    }

    /// The inner store's own lookup (an index on SQLite, PostgreSQL and DynamoDB), not the
    /// trait's default, which reads the aggregate's whole history.
    async fn events_caused_by(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        causation_id: Uuid,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        self.inner
            .events_caused_by(aggregate_type, aggregate_id, causation_id)
            .await
    }

    async fn event_sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<i64, CQRSError> {
        self.inner
            .event_sequence(aggregate_type, aggregate_id)
            .await
    }

    async fn read_all(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        self.inner.read_all(after_position, limit).await
    }

    fn subscribe(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        self.inner.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_metered_store_uses_the_inner_stores_causation_lookup() {
        // The SQL and DynamoDB stores look the command up in an index of their own; a
        // wrapper that left `events_caused_by` to the trait's default would read the whole
        // history with `load_events` instead. The faulty store counts which one it is asked.
        let inner = cqrs_testkit::FaultyStore::new();
        let metered = MeteredEvents {
            inner: Arc::new(inner.clone()),
            metrics: Arc::new(Metrics::default()),
        };
        let found = metered
            .events_caused_by("order", Uuid::new_v4(), Uuid::new_v4())
            .await
            .unwrap();
        assert!(found.is_empty());
        let calls = inner.calls();
        assert_eq!((calls.events_caused_by, calls.load_events), (1, 0));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        metrics.append_seconds.observe(Duration::from_micros(300));
        metrics.append_seconds.observe(Duration::from_millis(20));
        metrics.append_seconds.observe(Duration::from_secs(10));
        metrics.command("place", "ok");
        let text = metrics.render(5, 3);
        assert!(
            text.contains("cqrs_service_append_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("cqrs_service_append_seconds_bucket{le=\"0.025\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("cqrs_service_append_seconds_bucket{le=\"2.5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("cqrs_service_append_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("cqrs_service_append_seconds_count 3\n"),
            "{text}"
        );
        assert!(text.contains("cqrs_service_commands_total{command=\"place\",outcome=\"ok\"} 1\n"));
        assert!(text.contains("cqrs_service_projection_lag 2\n"), "{text}");
    }
}
