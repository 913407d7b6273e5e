//! NATS JetStream (feature `nats`): an outbox relay that publishes committed events, and a
//! projection fed from JetStream.
//!
//! * [`NatsRelay`] reads the store in global order from its own checkpoint (a
//!   [`CheckpointRepository`](crate::CheckpointRepository)) and publishes each event to a JetStream stream, on the subject
//!   `<prefix>.<aggregate_type>.<event_type>`, with `Nats-Msg-Id` set to the event id. It waits
//!   for the server's acknowledgement of every message of a batch before it saves the
//!   checkpoint, so a crash republishes at most the unacknowledged tail, which the server
//!   deduplicates. Every message but the first of a run also carries
//!   `Nats-Expected-Last-Msg-Id` (the previous event's id), so the stream holds the events in
//!   global order even when a publish fails half-way through a batch. On start and after
//!   any failure it compares the stream's newest event with its checkpoint and publishes
//!   again what a crashed server lost (see [`NatsRelay`], "After a broker crash").
//! * [`NatsProjection`] feeds a [`View`](crate::View) from that stream through a durable pull
//!   consumer. It is a source of the same projection engine as the store-fed
//!   [`Projection`](crate::Projection): each pulled batch is applied and committed with the
//!   checkpoint (the last event's global position) in one
//!   [`ViewRepository::commit`](crate::ViewRepository::commit), with the same retry, poison
//!   policy and dead letters, and the messages are acknowledged only after that commit. A
//!   message whose position is not above the checkpoint was already applied: it is
//!   acknowledged and not applied again. A checkpoint beyond the stream's newest event is
//!   [`CQRSError::StreamBehind`](crate::CQRSError::StreamBehind).
//!
//! Delivery is at least once; the effect on the view is exactly once (see
//! `docs/adr/0006-nats.md`).
//!
//! The wire format is documented on [`NatsRelay`].
//!
//! # Example
//!
//! ```no_run
//! # use cqrs::doc::{Counter, CounterTotal};
//! use cqrs::{
//!     MemoryCheckpointRepository, MemoryEventRepository, MemoryViewRepository, NatsProjection,
//!     NatsRelay, NatsStreamConfig,
//! };
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = cqrs::async_nats::connect("nats://127.0.0.1:4222").await?;
//! let jetstream = cqrs::async_nats::jetstream::new(client);
//! let stream = NatsStreamConfig::new("EVENTS", "events");
//!
//! // Publisher side: the relay runs beside the application.
//! let store = MemoryEventRepository::new();
//! let relay = NatsRelay::new(store.clone(), MemoryCheckpointRepository::new(), jetstream.clone(), stream.clone());
//! let relay = relay.start();
//!
//! // Consumer side, possibly in another service.
//! let views = MemoryViewRepository::<CounterTotal>::new();
//! let projection = NatsProjection::<Counter, CounterTotal>::new(jetstream, stream, views);
//! projection.catch_up().await?;
//!
//! relay.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod codec;
mod config;
mod consumer;
mod relay;
mod tail;

pub use config::NatsStreamConfig;
pub use consumer::{NatsProjection, UndecodableMessage};
pub use relay::{NatsRelay, NatsRelayHandle};

use crate::error::CQRSError;

/// A broker failure, as the error every caller of this module sees.
pub(crate) fn broker(error: impl Into<crate::error::BoxError>) -> CQRSError {
    CQRSError::persistence(error)
}
