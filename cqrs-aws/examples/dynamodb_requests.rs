//! What one command costs on DynamoDB as its stream grows: the requests a dispatch sends,
//! by operation, on an account with 10 and with 1,000 prior events, with the state cache
//! (the default), without it, and without it but with a snapshot every 100 events.
//!
//! ```sh
//! python3 .ci/moto-single.py 5000 &
//! CQRS_DYNAMODB_ENDPOINT=http://127.0.0.1:5000 cargo run -p cqrs-aws --example dynamodb_requests
//! ```
//!
//! An interceptor on the SDK client counts the requests sent (by their `X-Amz-Target`) and
//! the items the `Query` answers returned, so the figures are exact on any endpoint. The read
//! units of a strongly consistent `Query` grow with the bytes it returns (one unit per 4 KB of
//! items), so the items read are the part of a command's cost that can grow with its stream.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::{
    AfterDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::operation::query::QueryOutput;
use aws_sdk_dynamodb::Client;
use cqrs::{CQRSFramework, SnapshotPolicy};
use cqrs_aws::{DynamoDbEventRepository, DynamoDbSnapshotRepository};
use cqrs_examples::bank::{BankAccount, BankCommand};
use uuid::Uuid;

/// What a client sent: requests by operation, and the items its queries returned.
#[derive(Debug, Clone, Default)]
struct Sent {
    requests: BTreeMap<String, u64>,
    items_queried: u64,
}

/// Counts the requests a client sends, by operation, and the items its queries return.
#[derive(Debug, Clone, Default)]
struct RequestCounter {
    sent: Arc<Mutex<Sent>>,
}

impl RequestCounter {
    /// The counts so far, and zero them.
    fn take(&self) -> Sent {
        self.sent
            .lock()
            .map(|mut sent| std::mem::take(&mut *sent))
            .unwrap_or_default()
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = context
            .request()
            .headers()
            .get("x-amz-target")
            .and_then(|target| target.rsplit('.').next())
            .unwrap_or("unknown")
            .to_owned();
        if let Ok(mut sent) = self.sent.lock() {
            *sent.requests.entry(operation).or_default() += 1;
        }
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let queried = context
            .output_or_error()
            .ok()
            .and_then(|output| output.downcast_ref::<QueryOutput>())
            .map_or(0, |output| output.items().len() as u64);
        if let Ok(mut sent) = self.sent.lock() {
            sent.items_queried += queried;
        }
        Ok(())
    }
}

/// How a framework is configured for one measurement.
#[derive(Clone, Copy, Debug)]
enum Setup {
    StateCache,
    NoCache,
    NoCacheSnapshotsEvery100,
}

/// The requests of one deposit on an account with `prior` events, under `setup`.
async fn measure(
    client: &Client,
    counter: &RequestCounter,
    table: &str,
    setup: Setup,
    prior: u64,
) -> Result<Sent, Box<dyn std::error::Error>> {
    let events = DynamoDbEventRepository::new(client.clone(), table);
    let snapshots = || DynamoDbSnapshotRepository::new(client.clone(), table);
    // The history is written with the state cache, and a snapshot every 100 events: replaying
    // it on every command would cost what this program measures, a thousand times.
    let writer = CQRSFramework::<BankAccount>::new(events.clone())
        .with_snapshots(snapshots(), SnapshotPolicy::every(100));
    let id = Uuid::new_v4();
    writer
        .dispatch_new(
            id,
            BankCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await?;
    for _ in 1..prior {
        writer
            .dispatch(id, BankCommand::Deposit { amount: 1 })
            .await?;
    }
    let deposit = BankCommand::Deposit { amount: 1 };
    counter.take();
    match setup {
        // The writer's cache holds the account, as it does in a warm Lambda instance.
        Setup::StateCache => writer.dispatch(id, deposit).await?,
        Setup::NoCache => {
            CQRSFramework::<BankAccount>::new(events)
                .without_state_cache()
                .dispatch(id, deposit)
                .await?
        }
        Setup::NoCacheSnapshotsEvery100 => {
            CQRSFramework::<BankAccount>::new(events)
                .without_state_cache()
                .with_snapshots(snapshots(), SnapshotPolicy::every(100))
                .dispatch(id, deposit)
                .await?
        }
    };
    Ok(counter.take())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(endpoint) = std::env::var("CQRS_DYNAMODB_ENDPOINT") else {
        eprintln!("set CQRS_DYNAMODB_ENDPOINT to a DynamoDB endpoint (see .ci/moto-single.py)");
        std::process::exit(2);
    };
    let counter = RequestCounter::default();
    let base = cqrs_aws::local_client(&endpoint);
    let client = Client::from_conf(
        base.config()
            .to_builder()
            .interceptor(counter.clone())
            .build(),
    );
    let table = format!("requests_{}", Uuid::new_v4().simple());
    DynamoDbEventRepository::new(client.clone(), table.as_str())
        .ensure_table()
        .await?;
    println!("prior events | setup | requests of one deposit | items queried");
    for prior in [10u64, 1_000] {
        for setup in [
            Setup::StateCache,
            Setup::NoCache,
            Setup::NoCacheSnapshotsEvery100,
        ] {
            let sent = measure(&client, &counter, &table, setup, prior).await?;
            let requests: Vec<String> = sent
                .requests
                .iter()
                .map(|(op, n)| format!("{n} {op}"))
                .collect();
            println!(
                "{prior} | {setup:?} | {} | {}",
                requests.join(", "),
                sent.items_queried
            );
        }
    }
    Ok(())
}
