//! The NATS server of the JetStream suites, and a stream of its own per test.

#![allow(dead_code)]

use cqrs::async_nats;
use cqrs::async_nats::jetstream;
use cqrs::NatsStreamConfig;
use uuid::Uuid;

/// The server's URL, or `None` (after saying why) when the suite is not configured.
pub fn nats_url() -> Option<String> {
    cqrs_tests::server_url("CQRS_NATS_URL", "nats (JetStream)", "nats://127.0.0.1:4222")
}

/// A JetStream context on the server at `url`.
pub async fn connect(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url)
        .await
        .unwrap_or_else(|error| panic!("CQRS_NATS_URL={url} is set but unreachable: {error}"));
    jetstream::new(client)
}

/// A stream of its own for one test, deleted (best effort) when dropped, even on a failure.
pub struct TestStream {
    url: String,
    pub config: NatsStreamConfig,
}

impl TestStream {
    pub fn new(url: &str) -> Self {
        let tag = Uuid::new_v4().simple().to_string();
        TestStream {
            url: url.to_owned(),
            config: NatsStreamConfig::new(format!("CQRS_TEST_{tag}"), format!("cqrs_test_{tag}")),
        }
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let url = self.url.clone();
        let name = self.config.stream_name().to_owned();
        // Drop cannot await; a thread with its own runtime can.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let client = async_nats::connect(url).await.ok()?;
                jetstream::new(client).delete_stream(name).await.ok()
            })
        })
        .join();
    }
}
