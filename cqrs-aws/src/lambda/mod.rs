//! Lambda adapters: handlers that feed a view from the batches AWS Lambda hands a function,
//! through the projection engine of `cqrs` ([`PerAggregateProjection`](cqrs::PerAggregateProjection)).
//!
//! * [`DynamoDbStreamHandler`]: the table's stream (the events
//!   [`DynamoDbEventRepository`](crate::DynamoDbEventRepository) appends), answered with the first failed record's sequence number;
//! * [`SqsHandler`]: SQS messages whose bodies are event [`envelope`](crate::envelope)s
//!   (straight, or wrapped in an SNS notification), answered with the failed messages, and
//!   for a FIFO queue every later message of a failed message's group.
//!
//! Both keep one checkpoint per aggregate in the projection's view store, committed with the
//! view changes: a redelivered or replayed batch changes nothing, a record that leaves a gap
//! after its aggregate's checkpoint is filled from the event store (when the projection has
//! one) or failed so that Lambda delivers it again. Both answer with a partial batch response,
//! so the event source mapping needs `FunctionResponseTypes: ReportBatchItemFailures`. The
//! design: `docs/adr/0014-lambda-adapters.md`.
//!
//! In a function's `main`:
//!
//! ```no_run
//! # use cqrs::doc::{Counter, CounterTotal};
//! use cqrs::{MemoryViewRepository, PerAggregateProjection, PoisonPolicy};
//! use cqrs_aws::lambda::DynamoDbStreamHandler;
//! use lambda_runtime::{service_fn, LambdaEvent};
//!
//! # async fn run() -> Result<(), lambda_runtime::Error> {
//! // A view store that outlives the function: SQL, or DynamoDB.
//! let views = MemoryViewRepository::<CounterTotal>::new();
//! let projection = PerAggregateProjection::<Counter, CounterTotal>::new(views)
//!     .with_poison_policy(PoisonPolicy::SkipAndRecord);
//! let handler = DynamoDbStreamHandler::new("events", projection);
//! lambda_runtime::run(service_fn(|event: LambdaEvent<_>| handler.handle(event))).await
//! # }
//! ```

mod sqs;
mod streams;

pub use sqs::SqsHandler;
pub use streams::DynamoDbStreamHandler;

/// The event types the handlers take, re-exported so that a function names the very same
/// version.
#[doc(no_inline)]
pub use aws_lambda_events;
/// The Lambda runtime the handlers are written for, re-exported for the same reason.
#[doc(no_inline)]
pub use lambda_runtime;
