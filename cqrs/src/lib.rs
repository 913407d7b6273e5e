#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod aggregate;
pub mod error;
pub mod event;
pub mod framework;
pub mod projection;
pub mod store;
pub mod view;

pub use crate::aggregate::Aggregate;
pub use crate::error::{BoxError, CQRSError, DecodeError, EventDecodeError};
pub use crate::event::{DomainEvent, EventEnvelope, EventType, PersistableDomainEvent};
pub use crate::framework::{CQRSFramework, DispatchReceipt, RetryPolicy, SnapshotPolicy};
pub use crate::projection::Projection;
pub use crate::store::memory::{MemoryEventRepository, MemorySnapshotRepository};
pub use crate::store::{EventRepository, Snapshot, SnapshotRepository};
// sqlite re-exports (owned by the sqlite store)
// postgres re-exports (owned by the postgres store)
pub use crate::view::{Checkpoint, MemoryViewRepository, Query, View, ViewContext, ViewRepository};

/// Derives [`DomainEvent`](trait@DomainEvent); see the crate `cqrs-derive` for the attributes.
pub use cqrs_derive::DomainEvent;

/// What the derive macros' generated code refers to. Not public API: it may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use ::core;
    pub use ::serde;
    pub use ::serde_json;
    pub use ::std;
    pub use ::uuid;
}
