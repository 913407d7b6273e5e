//! `cqrs-service-lambda`: the order service on AWS Lambda, on DynamoDB. The same router as
//! `cqrs-service` serves each API Gateway HTTP API (payload 2.0) event through
//! `lambda_http`.
//!
//! Configured by the environment:
//!
//! * `CQRS_DYNAMODB_ENDPOINT`: an emulator's URL (static test credentials); unset on AWS,
//!   where the region and credentials are the function's (`AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
//! * `CQRS_SERVICE_EVENTS_TABLE`, `CQRS_SERVICE_VIEWS_TABLE`: the tables (default
//!   `orders-events`, `orders-views`), created on the first start if they are missing.
//! * `CQRS_SERVICE_OPERATOR_TOKEN`: the operator pages' bearer token; without it they answer
//!   `404`.
//!
//! A query with a `Consistency-Token` catches the view up itself when it is behind
//! (`Config::inline_catch_up`): the projection's background task runs only while the
//! function handles a request. See `docs/adr/0018-service-on-lambda.md`.
//!
//! ```text
//! cargo lambda watch -p cqrs-service --features lambda --bin cqrs-service-lambda \
//!     --env-var CQRS_DYNAMODB_ENDPOINT=http://127.0.0.1:5000
//! curl -i 'localhost:9000/lambda-url/cqrs-service-lambda/orders?limit=10'
//! ```
//!
//! `.ci/lambda-http-roundtrip.sh` sends it API Gateway events with `cargo lambda invoke`.

use std::process::ExitCode;

use cqrs_service::{Config, Database, Service};

/// The value of `name`, or `None` when it is unset or empty.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// The service's configuration from the environment.
fn config() -> Config {
    let database = Database::DynamoDb {
        endpoint: var("CQRS_DYNAMODB_ENDPOINT"),
        events_table: var("CQRS_SERVICE_EVENTS_TABLE").unwrap_or_else(|| "orders-events".into()),
        views_table: var("CQRS_SERVICE_VIEWS_TABLE").unwrap_or_else(|| "orders-views".into()),
    };
    let mut config = Config::new(database).with_inline_catch_up(true);
    if let Some(token) = var("CQRS_SERVICE_OPERATOR_TOKEN") {
        config = config.with_operator_token(token);
    }
    config
}

/// mimalloc: a request allocates and frees many small buffers across the runtime's worker
/// threads, where it costs less CPU than the system's allocator (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // Lambda sends standard error to CloudWatch Logs, which adds its own time stamps.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .without_time()
        .with_writer(std::io::stderr)
        .init();
    let service = match Service::start(config()).await {
        Ok(service) => service,
        Err(error) => {
            eprintln!("cqrs-service-lambda: {error}");
            return ExitCode::FAILURE;
        }
    };
    match lambda_http::run(service.router()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cqrs-service-lambda: {error}");
            ExitCode::FAILURE
        }
    }
}
