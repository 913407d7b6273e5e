#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The derive macros emit `::cqrs::...` paths; this makes them resolve inside the crate too.
extern crate self as cqrs;

mod aggregate;
// A fixture for the crate's doc examples, not part of the API.
#[doc(hidden)]
pub mod doc;
mod error;
mod event;
mod framework;
mod ids;
mod json;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
mod nats;
mod payload;
mod process;
mod projection;
mod query;
mod store;
mod task;
mod view;

// The write side.
pub use crate::aggregate::Aggregate;
pub use crate::event::{
    DomainEvent, EventEnvelope, EventType, PersistableDomainEvent, UpcastEvent, Upcasted,
};
pub use crate::framework::{
    derived_command_id, CQRSFramework, CommandContext, DispatchReceipt, RetryPolicy,
    SnapshotPolicy, DEFAULT_STATE_CACHE_CAPACITY,
};
pub use crate::payload::Payload;
/// The string type of stored names (event types and versions, aggregate types): inline up to
/// 23 bytes, cloned in O(1), built from a `&'static str` without allocating.
pub use smol_str::SmolStr;

// Errors.
pub use crate::error::{
    BoxError, CQRSError, DamagedRow, DecodeError, EventDecodeError, ProjectionStopped,
    ViewHandlerError,
};

// The read side.
pub use crate::projection::{
    EventOutcome, HandlerRetry, PerAggregateProjection, PoisonPolicy, Projection, ProjectionHandle,
    SkipReason,
};
pub use crate::query::Query;

// Process managers.
pub use crate::process::{
    Clock, CommandRouter, Deadline, Effects, ManualClock, MemoryProcessStore, ProcessInput,
    ProcessManager, ProcessProgress, ProcessRow, ProcessRunner, ProcessStore, Refused, SendError,
    SystemClock,
};
pub use crate::view::View;

// Storage contracts, and the stores in memory.
pub use crate::store::memory::{
    MemoryCheckpointRepository, MemoryDeadLetters, MemoryEventRepository, MemorySnapshotRepository,
    MemoryViewRepository,
};
pub use crate::store::{
    active_version_marker, explain_refused_append, validate_batch, Checkpoint,
    CheckpointRepository, DeadLetter, DeadLetterSkip, DeadLetters, EventRepository, Snapshot,
    SnapshotRepository, StoredEventId, ViewContext, ViewRepository,
};
/// The attribute that the store traits ([`EventRepository`], [`SnapshotRepository`],
/// [`CheckpointRepository`], [`ViewRepository`], [`DeadLetters`]) are written with, re-exported
/// so that implementing one needs nothing beyond `cqrs`: put `#[cqrs::async_trait]` on the
/// `impl` block and write its methods as `async fn`. See [`EventRepository`] for a whole store.
pub use async_trait::async_trait;

// The stores behind features.
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use crate::nats::{
    NatsProjection, NatsRelay, NatsRelayHandle, NatsStreamConfig, UndecodableMessage,
};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::store::postgres::{
    GroupCommitCounts, InvalidIdentifier, PostgresDeadLetters, PostgresEventRepository,
    PostgresProcessStore, PostgresViewRepository,
};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use crate::store::sqlite::{
    CorruptRow, Durability, InvalidStatement, InvalidTableName, SqliteBindValue, SqliteDeadLetters,
    SqliteEventRepository, SqliteOptions, SqliteProcessStore, SqliteSnapshotRepository,
    SqliteViewRepository, SqliteWriteStatement, WriterError,
};
/// The async-nats crate the NATS relay and projection are built on, re-exported so that the
/// [`jetstream::Context`](async_nats::jetstream::Context) they take is built with the very
/// same version.
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
#[doc(no_inline)]
pub use async_nats;
/// The sqlx crate the SQL stores are built on, re-exported so that a pool for
/// [`SqliteEventRepository::from_pool`] or `PostgresEventRepository::from_pool` is built with
/// the very same version.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
#[doc(no_inline)]
pub use sqlx;

/// Derives [`DomainEvent`](trait@DomainEvent): each event's stored name and version, the list
/// of all of them ([`DomainEvent::EVENT_TYPES`]), and decoding dispatched on (name, version).
///
/// # Attributes
///
/// On an enum, one `#[event(...)]` per variant (unit, tuple and struct variants alike); on a
/// struct, one on the type. Every key is optional:
///
/// | key | meaning | default |
/// |-----|---------|---------|
/// | `name = "..."` | the name the event is stored under (`event_type`) | the variant's (struct's) name |
/// | `version = "..."` | the version of its payload's shape (`event_version`) | `"1"` |
/// | `upcast(from = "...", with = f)` | an older version, read through a step (repeatable; see below) | none |
///
/// * A **name** starts with an ASCII letter and contains only ASCII letters, digits, `_`, `-`
///   and `.`, at most 128 characters (`AccountOpened`, `bank.account-opened`).
/// * A **version** is a whole number from 1 to 4294967295 in decimal without leading zeros,
///   written as a string (`"1"`, `"2"`; not `"01"`, `"1.0"` or `2`).
/// * No two events of a type share a (name, version). The same name with two versions is
///   fine: that is how an old shape stays readable beside the new one.
///
/// Every broken rule is a compile error at the offending token, all reported at once.
///
/// # What is stored
///
/// The payload is the serde form of the whole value, so serde attributes (`rename_all`,
/// `tag`, `content`, field renames) shape the payload as usual. They never change the stored
/// **name**, which comes only from `#[event]`: renaming a variant in Rust, or in serde, does
/// not orphan the events already stored, as long as `#[event(name)]` keeps the old name.
///
/// # Decoding
///
/// [`DomainEvent::decode`] looks at the stored (name, version) first: a pair the type does
/// not list is [`DecodeError::UnknownEventType`] without touching the payload. A known pair
/// deserializes the payload, and the result must be the event named: a payload that is
/// malformed, or that decodes to a different variant, is [`DecodeError::MalformedPayload`].
///
/// # Requirements
///
/// The type also derives (or implements) `serde::Serialize`, `serde::Deserialize`, `Clone`
/// and `Debug`, is `Send + Sync`, and owns its data (no lifetime parameters). Generic types
/// work; the impl then requires those traits of the concrete type. The generated code names
/// only `::cqrs` paths, so the crate needs `cqrs` (and `serde` for its own derives).
///
/// # Example
///
/// ```
/// use cqrs::{DomainEvent, EventType};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// #[serde(tag = "kind", rename_all = "snake_case")]
/// enum AccountEvent {
///     #[event(name = "AccountOpened", version = "2")]
///     Opened { owner: String },
///     // Defaults: stored as "Deposited", version "1".
///     Deposited { amount: u64 },
///     #[event(name = "AccountClosed")]
///     Closed,
/// }
///
/// let event = AccountEvent::Opened { owner: "ada".into() };
/// assert_eq!(event.persisted_event_name(), "AccountOpened");
/// assert_eq!(event.persisted_event_version(), "2");
/// assert_eq!(
///     AccountEvent::EVENT_TYPES,
///     &[
///         EventType::new("AccountOpened", "2"),
///         EventType::new("Deposited", "1"),
///         EventType::new("AccountClosed", "1"),
///     ]
/// );
///
/// // serde shapes the payload; the stored name stays "AccountOpened".
/// let payload = event.to_payload()?;
/// assert_eq!(payload, serde_json::json!({ "kind": "opened", "owner": "ada" }));
/// assert_eq!(AccountEvent::decode("AccountOpened", "2", &payload)?, event);
///
/// // Unknown (name, version): a typed error, the payload is not even read.
/// assert!(matches!(
///     AccountEvent::decode("AccountOpened", "1", &payload),
///     Err(cqrs::DecodeError::UnknownEventType)
/// ));
/// // Stored as one event, decodes as another: refused.
/// assert!(matches!(
///     AccountEvent::decode("Deposited", "1", &payload),
///     Err(cqrs::DecodeError::MalformedPayload(_))
/// ));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// A struct is one event:
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use cqrs::DomainEvent;
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[event(name = "PriceChanged", version = "3")]
/// struct PriceChanged {
///     cents: u64,
/// }
///
/// assert_eq!(PriceChanged { cents: 5 }.persisted_event_version(), "3");
/// ```
///
/// # Upcasting older versions
///
/// Each older version an event can still read is one `upcast(...)` in its `#[event]`, with
/// the step that brings it up: `from = "N"` (the old version), `to = "M"` (optional, default
/// the current version), and either `with = f` — a typed step `fn(Old) -> New`, `Old`
/// deserialized from the old payload as stored — or `raw = f` — a JSON step
/// `fn(serde_json::Value) -> Result<`[`Upcasted`]`, DecodeError>` that rewrites the payload or
/// replaces the event by others (a rename, a split, a drop). `name = "..."` reads an old version
/// stored under another name. The old pairs are listed in [`DomainEvent::EVENT_TYPES`] after
/// the current ones, and a chain with a gap, a duplicate step, a cycle, a step to a version
/// that does not exist or an old pair read twice does not compile. Decoding an old row runs
/// its chain; [`DomainEvent::decode_all`] returns every event a split row became.
///
/// ```
/// use cqrs::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Deserialize)]
/// struct DepositedV1 {
///     amount: u64,
/// }
///
/// fn deposited_v1(old: DepositedV1) -> AccountEvent {
///     AccountEvent::Deposited { amount: old.amount, currency: "EUR".into() }
/// }
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// #[serde(tag = "type")]
/// enum AccountEvent {
///     #[event(version = "2", upcast(from = "1", with = deposited_v1))]
///     Deposited { amount: u64, currency: String },
/// }
///
/// let v1: cqrs::Payload = serde_json::json!({ "type": "Deposited", "amount": 5 }).into();
/// assert_eq!(
///     AccountEvent::decode("Deposited", "1", &v1)?,
///     AccountEvent::Deposited { amount: 5, currency: "EUR".into() }
/// );
/// # Ok::<(), cqrs::DecodeError>(())
/// ```
///
/// A mistake does not compile:
///
/// ```compile_fail
/// # use serde::{Deserialize, Serialize};
/// #[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
/// enum Event {
///     #[event(version = "1.0")] // error: a version is a whole number, like "1"
///     Happened,
/// }
/// ```
pub use cqrs_derive::DomainEvent;

/// Derives [`ProcessInput`](trait@ProcessInput) for an enum with one variant per aggregate
/// type a process manager reacts to, each holding that aggregate's event type.
///
/// A variant's name is the aggregate type's path unless `#[input(aggregate = Path)]` names
/// another. `decode` picks the variant whose aggregate's `NAME` is the stored event's
/// aggregate type and decodes the payload with that aggregate's `Events` (upcasting
/// included); events of other aggregate types decode to nothing. A field that is not the
/// aggregate's event type is a type error at the field.
///
/// ```
/// # use cqrs::doc::{Counter, CounterCommand, CounterEvent};
/// use cqrs::{PersistableDomainEvent, ProcessInput};
///
/// #[derive(Debug, Clone, ProcessInput)]
/// enum Input {
///     // The variant's name is the aggregate type: `Counter`.
///     Counter(CounterEvent),
/// }
///
/// #[derive(Debug, Clone, ProcessInput)]
/// enum Named {
///     #[input(aggregate = Counter)]
///     Counting(CounterEvent),
/// }
///
/// let event = CounterEvent::Incremented { by: 2 };
/// let stored = PersistableDomainEvent::new("counter", uuid::Uuid::nil(), 1, &event, serde_json::Value::Null)?;
/// assert!(matches!(Input::decode(&stored)?.as_slice(), [Input::Counter(CounterEvent::Incremented { by: 2 })]));
///
/// let elsewhere = PersistableDomainEvent::new("ledger", uuid::Uuid::nil(), 1, &event, serde_json::Value::Null)?;
/// assert!(Input::decode(&elsewhere)?.is_empty());
/// assert_eq!(Named::decode(&stored)?.len(), 1);
/// # let _ = CounterCommand::Reset;
/// # Ok::<(), cqrs::CQRSError>(())
/// ```
///
/// A variant that does not hold one field does not compile:
///
/// ```compile_fail
/// # use cqrs::doc::Counter;
/// #[derive(Debug, Clone, cqrs::ProcessInput)]
/// enum Input {
///     Counter { event: cqrs::doc::CounterEvent }, // error: one unnamed field
/// }
/// ```
pub use cqrs_derive::ProcessInput;

/// Writes an aggregate's [`Aggregate::NAME`] on its `impl Aggregate for ...` block, and the
/// associated types the block leaves out that `handle_command` already names.
///
/// ```text
/// #[cqrs::aggregate(name = "bank_account")]
/// impl Aggregate for BankAccount { async fn handle_command(..) .. fn handle_event(..) .. }
/// ```
///
/// * `name = "..."`: the aggregate type stored with every event; defaults to the type's name.
///   It starts with an ASCII letter and contains only ASCII letters, digits, `_` and `-`, at
///   most 128 characters (no `:`, which separates type and id in `aggregate_type_id`, and no
///   `.`, which separates NATS subject tokens). Never change it once events exist.
/// * `type State`, `type Commands`, `type Events` and `type Errors` may be left out: they are
///   read from `async fn handle_command(&self, id: Uuid, state: &State, command: Commands)
///   -> Result<Vec<Events>, Errors>` (or `fn .. -> impl Future<Output = Result<..>> + Send`)
///   when those are written as concrete types (not `Self::State`, not an alias of `Result`).
///   A type you declare yourself always wins; one that cannot be read is a compile error at
///   that spot in the signature, asking you to declare it.
/// * Writing `const NAME` in the block as well is a compile error: the name is written once.
///
/// `handle_command` stays an ordinary `async fn` in an ordinary impl.
///
/// ```
/// # use cqrs::doc::{CounterCommand, CounterError, CounterEvent, CounterState};
/// use cqrs::{Aggregate, DomainEvent};
/// use uuid::Uuid;
///
/// #[derive(Default)]
/// struct Counter;
///
/// #[cqrs::aggregate(name = "counter")]
/// impl Aggregate for Counter {
///     async fn handle_command(
///         &self,
///         _id: Uuid,
///         _state: &CounterState,
///         command: CounterCommand,
///     ) -> Result<Vec<CounterEvent>, CounterError> {
///         match command {
///             CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by }]),
///             CounterCommand::Reset => Ok(vec![CounterEvent::Reset]),
///         }
///     }
///
///     fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
///         match event {
///             CounterEvent::Incremented { by } => state.value += by,
///             CounterEvent::Reset => state.value = 0,
///         }
///     }
/// }
///
/// assert_eq!(Counter::NAME, "counter");
/// fn events_of<A: Aggregate>() -> &'static [cqrs::EventType] {
///     <A::Events as DomainEvent>::EVENT_TYPES
/// }
/// assert_eq!(events_of::<Counter>()[0].name, "Incremented");
/// ```
pub use cqrs_derive::aggregate;

/// Writes a view's [`View::TABLE_NAME`] and [`View::VERSION`] on its `impl View<A> for ...`
/// block, which keeps `handle_event` (and `view_id` if you override it).
///
/// * `table = "..."`: where the view is stored; defaults to the view type's name in snake case
///   (`BalanceView` -> `balance_view`). A plain SQL identifier: starts with an ASCII letter or
///   `_`, then ASCII letters, digits and `_`, at most 63 characters, so every store can use it
///   unquoted.
/// * `version = N`: the view's schema version, an integer from 1 (default 1). Raise it when
///   `handle_event` or the view's shape changes; the view is then rebuilt.
///
/// Writing `const TABLE_NAME` or `const VERSION` in the block as well is a compile error.
///
/// ```
/// # use cqrs::doc::{Counter, CounterError, CounterEvent};
/// # use serde::{Deserialize, Serialize};
/// use cqrs::{EventEnvelope, View};
///
/// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// struct CounterTotal {
///     total: u64,
/// }
///
/// #[cqrs::view(table = "counter_total", version = 2)]
/// impl View<Counter> for CounterTotal {
///     fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
///         match envelope.event {
///             CounterEvent::Incremented { by } => self.total += by,
///             CounterEvent::Reset => self.total = 0,
///         }
///         Ok(())
///     }
/// }
///
/// assert_eq!(<CounterTotal as View<Counter>>::TABLE_NAME, "counter_total");
/// assert_eq!(<CounterTotal as View<Counter>>::VERSION, 2);
/// ```
pub use cqrs_derive::view;

/// What the derive macros' generated code refers to. Not public API: it may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use ::core;
    pub use ::serde;
    pub use ::serde_json;
    pub use ::std;
    pub use ::uuid;

    /// The background runner behind every handle (`ProjectionHandle`, `NatsRelayHandle`),
    /// for the runners of `cqrs-aws`: one vocabulary for background tasks.
    pub use crate::task::{backoff, Shared, Stop, Task};

    /// Deserializes a payload into `E`. Bounded by `DomainEvent` (not `Deserialize`) so a
    /// type that lacks `Deserialize` is reported once, at the type, not again at the call.
    ///
    /// # Errors
    /// The deserializer's error.
    pub fn deserialize_event<E: crate::DomainEvent>(
        payload: &crate::Payload,
    ) -> Result<E, serde_json::Error> {
        payload.deserialize::<E>()
    }

    /// The payload as a JSON tree, where an upcast chain starts.
    ///
    /// # Errors
    /// [`DecodeError::MalformedPayload`](crate::DecodeError::MalformedPayload).
    pub fn payload_value(
        payload: &crate::Payload,
    ) -> Result<serde_json::Value, crate::DecodeError> {
        payload
            .to_value()
            .map_err(crate::DecodeError::MalformedPayload)
    }

    /// Decodes the payload an upcast chain produced as the current version.
    ///
    /// # Errors
    /// What [`DomainEvent::decode`](crate::DomainEvent::decode) returns.
    pub fn decode_value<E: crate::DomainEvent>(
        event_type: &str,
        event_version: &str,
        payload: &serde_json::Value,
    ) -> Result<E, crate::DecodeError> {
        E::decode(
            event_type,
            event_version,
            &crate::Payload::from_value(payload),
        )
    }

    /// A typed upcast step that goes to an older, intermediate version: deserializes the old
    /// payload into the step's argument type, runs it, and serializes the result as the
    /// payload of the version it goes to.
    ///
    /// # Errors
    /// [`DecodeError::MalformedPayload`](crate::DecodeError::MalformedPayload) when the old
    /// payload does not deserialize, [`DecodeError::Upcast`](crate::DecodeError::Upcast) when
    /// the result does not serialize.
    pub fn typed_step<Old, New, F>(
        payload: &serde_json::Value,
        step: F,
    ) -> Result<serde_json::Value, crate::DecodeError>
    where
        Old: serde::de::DeserializeOwned,
        New: serde::Serialize,
        F: FnOnce(Old) -> New,
    {
        let old = Old::deserialize(payload).map_err(crate::DecodeError::MalformedPayload)?;
        serde_json::to_value(step(old))
            .map_err(|error| crate::DecodeError::Upcast(format!("step result: {error}")))
    }

    /// A typed upcast step that goes to the current version: deserializes the old payload,
    /// runs the step, and checks that it produced the event the chain belongs to.
    ///
    /// # Errors
    /// [`DecodeError::MalformedPayload`](crate::DecodeError::MalformedPayload) when the old
    /// payload does not deserialize, [`DecodeError::Upcast`](crate::DecodeError::Upcast) when
    /// the step produced another event.
    pub fn typed_last<Old, E, F>(
        payload: &serde_json::Value,
        step: F,
        expected: crate::EventType,
    ) -> Result<E, crate::DecodeError>
    where
        Old: serde::de::DeserializeOwned,
        E: crate::DomainEvent,
        F: FnOnce(Old) -> E,
    {
        let old = Old::deserialize(payload).map_err(crate::DecodeError::MalformedPayload)?;
        let event = step(old);
        let produced = crate::EventType::new(
            event.persisted_event_name(),
            event.persisted_event_version(),
        );
        if produced != expected {
            return Err(crate::DecodeError::Upcast(format!(
                "the step to event `{}` version {} produced event `{}` version {}",
                expected.name, expected.version, produced.name, produced.version
            )));
        }
        Ok(event)
    }

    /// What a raw step produced, in a form the generated code can match exhaustively
    /// ([`Upcasted`](crate::Upcasted) is `#[non_exhaustive]`).
    pub enum RawOutcome {
        /// The payload of the version the step goes to.
        Next(serde_json::Value),
        /// Events replacing the old one.
        Replaced(std::vec::Vec<crate::UpcastEvent>),
    }

    /// Runs a raw upcast step. The explicit `fn` type makes a step with the wrong signature
    /// an error at the path given in `raw = ...`.
    ///
    /// # Errors
    /// What the step returns.
    pub fn raw_step(
        payload: serde_json::Value,
        step: fn(serde_json::Value) -> Result<crate::Upcasted, crate::DecodeError>,
    ) -> Result<RawOutcome, crate::DecodeError> {
        match step(payload)? {
            crate::Upcasted::Payload(payload) => Ok(RawOutcome::Next(payload)),
            crate::Upcasted::Events(events) => Ok(RawOutcome::Replaced(events)),
        }
    }

    /// How deep events produced by raw steps may produce events in turn: a step that emits
    /// an event leading back to itself is an error, not a stack overflow.
    const MAX_REDECODE_DEPTH: u32 = 16;

    std::thread_local! {
        static REDECODE_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// Decodes the events a raw step replaced an old one with, each through its own chain.
    ///
    /// # Errors
    /// The first event's decoding error, or
    /// [`DecodeError::Upcast`](crate::DecodeError::Upcast) when raw steps keep producing
    /// events more than 16 levels deep.
    pub fn redecode<E: crate::DomainEvent>(
        events: std::vec::Vec<crate::UpcastEvent>,
    ) -> Result<std::vec::Vec<E>, crate::DecodeError> {
        let depth = REDECODE_DEPTH.with(|depth| depth.get());
        if depth >= MAX_REDECODE_DEPTH {
            return Err(crate::DecodeError::Upcast(format!(
                "raw upcast steps produced events more than {MAX_REDECODE_DEPTH} levels deep; \
                 a step probably emits an event that leads back to itself"
            )));
        }
        REDECODE_DEPTH.with(|cell| cell.set(depth + 1));
        let mut decoded = std::vec::Vec::new();
        let mut result = Ok(());
        for event in &events {
            let payload = crate::Payload::from_value(&event.payload);
            match E::decode_all(&event.name, &event.version, &payload) {
                Ok(more) => decoded.extend(more),
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        REDECODE_DEPTH.with(|cell| cell.set(depth));
        result.map(|()| decoded)
    }

    /// The error `decode` returns for an old event that an upcast step turned into a number
    /// of events other than one.
    pub fn not_one_event(
        event_type: &str,
        event_version: &str,
        count: usize,
    ) -> crate::DecodeError {
        crate::DecodeError::Upcast(format!(
            "event `{event_type}` version {event_version} is upcast to {count} events; read it \
             with `DomainEvent::decode_all`"
        ))
    }

    /// The error for a payload stored as one event that deserializes as another.
    pub fn variant_mismatch(
        stored: crate::EventType,
        decoded: crate::EventType,
    ) -> crate::DecodeError {
        crate::DecodeError::MalformedPayload(<serde_json::Error as serde::de::Error>::custom(
            format_args!(
                "the payload stored as event `{}` version {} decodes to event `{}` version {}",
                stored.name, stored.version, decoded.name, decoded.version
            ),
        ))
    }
}
