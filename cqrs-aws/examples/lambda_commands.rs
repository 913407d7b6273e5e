//! A command Lambda: takes a bank account command as its event, dispatches it on the DynamoDB
//! event store and answers with what was appended. Together with `lambda_projection.rs` (fed
//! by the table's stream) it is the serverless shape of the bank example: the write side in
//! one function, the read side in another.
//!
//! Served locally by `cargo lambda` (PyPI `cargo-lambda`) against the DynamoDB emulator:
//!
//! ```sh
//! python3 .ci/moto-single.py 5000 &
//! cargo new --bin /tmp/rt && (cd /tmp/rt && cargo lambda watch --only-lambda-apis -P 9001) &
//! CQRS_DYNAMODB_ENDPOINT=http://127.0.0.1:5000 \
//! AWS_LAMBDA_RUNTIME_API=http://127.0.0.1:9001/.rt AWS_LAMBDA_FUNCTION_NAME=_ \
//! AWS_LAMBDA_FUNCTION_VERSION=1 AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128 \
//!     cargo run -p cqrs-aws --features lambda --example lambda_commands &
//! cargo lambda invoke -P 9001 _ --data-ascii \
//!   '{"type":"open","account":"0d6e4a52-6f0e-4b8e-9d55-2f6f1d2a9c01","owner":"Ada"}'
//! # {"account":"0d6e4a52-…","sequence":1,"positions":[1],"events":["AccountOpened"]}
//! cargo lambda invoke -P 9001 _ --data-ascii \
//!   '{"type":"withdraw","account":"0d6e4a52-6f0e-4b8e-9d55-2f6f1d2a9c01","amount":500}'
//! # an error: insufficient funds: balance 0, requested 500
//! ```
//!
//! A deployment builds its client from the environment (`aws_config::load_from_env`); this
//! example, which does not depend on `aws-config`, takes the emulator's address from
//! `CQRS_DYNAMODB_ENDPOINT`. `EVENTS_TABLE` names the table (default `events`; created on
//! start if it is missing). A refused command (an overdraft, say) is the function's error,
//! which Lambda reports to the caller; nothing is appended.

use cqrs::{CQRSFramework, DomainEvent};
use cqrs_aws::lambda::lambda_runtime::{self, service_fn, LambdaEvent};
use cqrs_aws::DynamoDbEventRepository;
use cqrs_examples::bank::{BankAccount, BankCommand};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The function's event: one command for one account.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Open { account: Uuid, owner: String },
    Deposit { account: Uuid, amount: u64 },
    Withdraw { account: Uuid, amount: u64 },
}

/// The function's answer: what the command appended.
#[derive(Debug, Serialize)]
struct Response {
    account: Uuid,
    /// The account's last sequence after the command.
    sequence: i64,
    /// The global positions of the appended events.
    positions: Vec<i64>,
    /// The names of the appended events.
    events: Vec<String>,
}

async fn handle(
    framework: &CQRSFramework<BankAccount>,
    event: LambdaEvent<Request>,
) -> Result<Response, lambda_runtime::Error> {
    let (account, receipt) = match event.payload {
        Request::Open { account, owner } => (
            account,
            framework
                .dispatch_new(account, BankCommand::Open { owner })
                .await?,
        ),
        Request::Deposit { account, amount } => (
            account,
            framework
                .dispatch(account, BankCommand::Deposit { amount })
                .await?,
        ),
        Request::Withdraw { account, amount } => (
            account,
            framework
                .dispatch(account, BankCommand::Withdraw { amount })
                .await?,
        ),
    };
    Ok(Response {
        account,
        sequence: receipt.sequence,
        events: receipt
            .events
            .iter()
            .map(|event| event.persisted_event_name().to_string())
            .collect(),
        positions: receipt.positions,
    })
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let endpoint = std::env::var("CQRS_DYNAMODB_ENDPOINT")
        .map_err(|_| "set CQRS_DYNAMODB_ENDPOINT to the DynamoDB endpoint (the emulator's)")?;
    let table = std::env::var("EVENTS_TABLE").unwrap_or_else(|_| "events".to_owned());
    let events = DynamoDbEventRepository::new(cqrs_aws::local_client(&endpoint), table);
    events.ensure_table().await?;
    // One framework per instance: its state cache serves the instance's warm invocations.
    let framework = CQRSFramework::<BankAccount>::new(events);
    lambda_runtime::run(service_fn(|event| handle(&framework, event))).await
}
