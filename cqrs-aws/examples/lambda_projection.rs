//! A projection Lambda: keeps a balance view up to date from the DynamoDB stream of the
//! event table, under `lambda_runtime`.
//!
//! Served locally by `cargo lambda` (PyPI `cargo-lambda`): its Lambda Runtime API, then the
//! function pointed at it, then one invocation with a stream batch.
//!
//! ```sh
//! # cargo lambda starts in a package with a binary target: any will do.
//! cargo new --bin /tmp/rt && (cd /tmp/rt && cargo lambda watch --only-lambda-apis -P 9000) &
//! AWS_LAMBDA_RUNTIME_API=http://127.0.0.1:9000/.rt AWS_LAMBDA_FUNCTION_NAME=_ \
//! AWS_LAMBDA_FUNCTION_VERSION=1 AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128 \
//!     cargo run -p cqrs-aws --features lambda --example lambda_projection &
//! cargo lambda invoke -P 9000 _ --data-file cqrs-aws/examples/lambda_projection_batch.json
//! # {"batchItemFailures":[{"itemIdentifier":"200"}]}
//! ```
//!
//! The batch (`lambda_projection_batch.json`) is a DynamoDB Streams event as Lambda hands it
//! to the function: a deposit, then an image that is not an event item and whose key names no
//! aggregate (its id is not a UUID). Under `SkipAndRecord` a damaged image whose key names
//! the aggregate and sequence becomes a dead letter; this one cannot, since nothing says
//! which checkpoint it could move, so the answer names it (`batchItemFailures`) and Lambda
//! delivers the shard again from it. The event
//! source mapping is configured with `FunctionResponseTypes: ReportBatchItemFailures`.
//! `EVENTS_TABLE` names the event table (default `events`).
//!
//! With `CQRS_DYNAMODB_ENDPOINT` set (the emulator's address; a deployment builds its client
//! from the environment with `aws_config` instead), the views, the per-aggregate checkpoints
//! and the dead letters live in the DynamoDB table `VIEWS_TABLE` (default `views`, created
//! if missing), committed together, and a gap in an aggregate's events is filled from the
//! event table: every instance of the function, cold or warm, shares them. Without it, they
//! live in the function's memory and each instance starts empty, enough to watch the handler
//! work.

use cqrs::{MemoryViewRepository, PerAggregateProjection, PoisonPolicy};
use cqrs_aws::lambda::lambda_runtime::{self, service_fn, LambdaEvent};
use cqrs_aws::lambda::DynamoDbStreamHandler;
use cqrs_aws::{DynamoDbEventRepository, DynamoDbViewRepository};

#[path = "shared/account.rs"]
mod account;

use account::{Account, Balance};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let table = std::env::var("EVENTS_TABLE").unwrap_or_else(|_| "events".to_owned());
    let projection = match std::env::var("CQRS_DYNAMODB_ENDPOINT") {
        Ok(endpoint) => {
            let client = cqrs_aws::local_client(&endpoint);
            let views_table = std::env::var("VIEWS_TABLE").unwrap_or_else(|_| "views".to_owned());
            let views = DynamoDbViewRepository::new(client.clone(), views_table);
            views.ensure_table().await?;
            let dead_letters = views.dead_letters();
            PerAggregateProjection::<Account, Balance>::new(views)
                .with_dead_letters(dead_letters)
                .with_event_store(DynamoDbEventRepository::new(client, table.clone()))
        }
        Err(_) => {
            PerAggregateProjection::<Account, Balance>::new(MemoryViewRepository::<Balance>::new())
        }
    }
    .with_poison_policy(PoisonPolicy::SkipAndRecord);
    let handler = DynamoDbStreamHandler::new(table, projection);
    lambda_runtime::run(service_fn(|event: LambdaEvent<_>| handler.handle(event))).await
}
