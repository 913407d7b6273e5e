//! `cargo bench -p cqrs-benches --bench nats`: what `sync_interval: always` costs the NATS
//! relay.
//!
//! Starts two JetStream servers from one `nats-server` binary (`CQRS_NATS_SERVER`, or
//! `nats-server` on the `PATH`; it must know `sync_interval`, which servers from 2.10 on do),
//! each with its own temporary store: one with the default sync (every two minutes), one
//! with `sync_interval: always`. Then, in the same run, it measures the relay publishing to
//! each: a batch of 256 events (pipelined, one `relay_once`), and a single event (one
//! publish and its acknowledgement). Skipped, with a message, when no such server starts.

use std::time::{Duration, Instant};

use cqrs::async_nats;
use cqrs::{MemoryCheckpointRepository, MemoryEventRepository, NatsRelay, NatsStreamConfig};
use cqrs_benches::{history, runtime};
use cqrs_tests::JetStreamServer;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use uuid::Uuid;

/// Events per batch in the batch benchmark (the relay's default batch size).
const BATCH: usize = 256;

/// The two settings compared: a name for the benchmark id, and whether every write syncs.
const SYNCS: [(&str, bool); 2] = [("default", false), ("always", true)];

fn relay_publish(c: &mut Criterion) {
    let binary = JetStreamServer::binary();
    let mut servers = Vec::new();
    for (name, always) in SYNCS {
        match JetStreamServer::start(&binary, always) {
            Ok(server) => servers.push((name, server)),
            Err(error) => {
                eprintln!(
                    "skipping nats benchmarks: {error}; set CQRS_NATS_SERVER to a nats-server \
                     2.10 or later to run them"
                );
                return;
            }
        }
    }
    let rt = runtime().expect("a Tokio runtime");
    let mut group = c.benchmark_group("nats_relay_sync");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (size, label) in [(BATCH, "batch_256"), (1, "single")] {
        group.throughput(Throughput::Elements(size as u64));
        for (name, server) in &servers {
            let relay = rt.block_on(relay_on(&server.url()));
            group.bench_with_input(BenchmarkId::new(label, name), &size, |b, &size| {
                b.to_async(&rt)
                    .iter_custom(|iters| publish(&relay.0, &relay.1, size, iters));
            });
        }
    }
    group.finish();
    drop(servers);
}

/// A relay from a fresh in-memory store to a fresh stream on the server at `url`.
async fn relay_on(url: &str) -> (MemoryEventRepository, NatsRelay) {
    let client = async_nats::connect(url).await.expect("connect nats");
    let jetstream = async_nats::jetstream::new(client);
    let tag = Uuid::new_v4().simple().to_string();
    let config = NatsStreamConfig::new(format!("BENCH_{tag}"), format!("bench_{tag}"));
    let store = MemoryEventRepository::new();
    let relay = NatsRelay::new(
        store.clone(),
        MemoryCheckpointRepository::new(),
        jetstream,
        config,
    )
    .with_batch_size(BATCH);
    relay.ensure_stream().await.expect("create the stream");
    (store, relay)
}

/// `iters` times: `size` new events appended (not timed), then published by one
/// `relay_once` (timed).
async fn publish(
    store: &MemoryEventRepository,
    relay: &NatsRelay,
    size: usize,
    iters: u64,
) -> Duration {
    let mut elapsed = Duration::ZERO;
    for _ in 0..iters {
        let events = history(Uuid::new_v4(), size).expect("events");
        cqrs::EventRepository::append(store, events)
            .await
            .expect("append");
        let started = Instant::now();
        let published = relay.relay_once().await.expect("publish");
        elapsed += started.elapsed();
        assert_eq!(published, size);
    }
    elapsed
}

criterion_group!(benches, relay_publish);
criterion_main!(benches);
