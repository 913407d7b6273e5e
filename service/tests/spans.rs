//! The spans of a command, as a `tracing` subscriber sees them: request → command →
//! dispatch → append, with the request's id.
//!
//! A test binary of its own: the subscriber is the process's global one, which no other
//! test may set or race with.

use std::sync::{Arc, Mutex};

use cqrs_service::{Config, Database, Service};
use serde_json::json;
use tokio::sync::oneshot;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;
use uuid::Uuid;

/// A span's name and the id field it carries (`request_id` or `correlation_id`).
type Link = (String, Option<String>);

/// The id fields a span was created with.
#[derive(Default)]
struct Ids(Option<String>);

impl Visit for Ids {
    fn record_str(&mut self, field: &Field, value: &str) {
        if matches!(field.name(), "request_id" | "correlation_id") {
            self.0 = Some(value.to_owned());
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

/// Records, for each `append` span, the chain of spans it was opened in.
#[derive(Clone, Default)]
struct Appends(Arc<Mutex<Vec<Vec<Link>>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Appends {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut ids = Ids::default();
        attrs.record(&mut ids);
        let Some(span) = ctx.span(id) else { return };
        span.extensions_mut().insert(ids);
        if attrs.metadata().name() == "append" {
            let chain = span
                .scope()
                .map(|s| {
                    let ids = s.extensions().get::<Ids>().and_then(|ids| ids.0.clone());
                    (s.name().to_owned(), ids)
                })
                .collect();
            self.0.lock().expect("the record").push(chain);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_runs_in_the_command_and_request_spans() {
    let appends = Appends::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(appends.clone()))
        .expect("the only subscriber of this test binary");

    let path = std::env::temp_dir().join(format!("cqrs-spans-{}.sqlite", Uuid::new_v4()));
    let service = Service::start(Config::new(Database::Sqlite(path.clone())))
        .await
        .expect("start the service");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind an ephemeral port");
    let base = format!("http://{}", listener.local_addr().expect("local address"));
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(cqrs_service::serve(listener, service, async {
        let _ = stopped.await;
    }));
    let response = reqwest::Client::new()
        .post(format!("{base}/orders"))
        .header("x-request-id", "req-span")
        .json(&json!({
            "customer": "ada",
            "lines": [{ "sku": "book-1", "quantity": 1, "unit_price_cents": 100 }],
        }))
        .send()
        .await
        .expect("send the request");
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let _ = stop.send(());
    served
        .await
        .expect("the server task")
        .expect("the server ends cleanly");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }

    let chains = appends.0.lock().expect("the record").clone();
    let id = || Some("req-span".to_owned());
    assert_eq!(
        chains,
        vec![vec![
            ("append".to_owned(), None),
            ("dispatch_new".to_owned(), None),
            ("command".to_owned(), id()),
            ("request".to_owned(), id()),
        ]],
    );
}
