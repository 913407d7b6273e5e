//! What one command costs on DynamoDB as its stream grows: the requests a dispatch sends,
//! by operation, on an account with 10 and with 1,000 prior events, with the state cache
//! (the default), without it, and without it but with a snapshot every 100 events; each on
//! a store with a global order (the default) and on one
//! [`without_global_order`](DynamoDbEventRepository::without_global_order). Then what 8
//! writers appending at once to 8 accounts cost per command, with and without the global
//! order (whose counter item they all write).
//!
//! ```sh
//! python3 .ci/moto-single.py 5000 &
//! CQRS_DYNAMODB_ENDPOINT=http://127.0.0.1:5000 cargo run -p cqrs-aws --example dynamodb_requests
//! ```
//!
//! An interceptor on the SDK client counts the requests sent (by their `X-Amz-Target`), the
//! items the `TransactWriteItems` requests held and the items the `Query` answers returned,
//! so the figures are exact on any endpoint. The read
//! units of a strongly consistent `Query` grow with the bytes it returns (one unit per 4 KB of
//! items), so the items read are the part of a command's cost that can grow with its stream.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::{
    AfterDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextRef,
    BeforeTransmitInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::operation::query::QueryOutput;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsInput;
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
    /// The items of the `TransactWriteItems` requests (writes and condition checks).
    transaction_items: u64,
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

    fn read_before_serialization(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(input) = context.input().downcast_ref::<TransactWriteItemsInput>() {
            if let Ok(mut sent) = self.sent.lock() {
                sent.transaction_items += input.transact_items().len() as u64;
            }
        }
        Ok(())
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
    global_order: bool,
) -> Result<Sent, Box<dyn std::error::Error>> {
    let events = store(client, table, global_order);
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

/// The event store on `table`, with or without a global order.
fn store(client: &Client, table: &str, global_order: bool) -> DynamoDbEventRepository {
    let events = DynamoDbEventRepository::new(client.clone(), table);
    if global_order {
        events
    } else {
        events.without_global_order()
    }
}

/// What `writers` tasks cost, each dispatching `commands` deposits (state cache on) to an
/// account of its own, all at once.
async fn concurrent(
    client: &Client,
    counter: &RequestCounter,
    table: &str,
    global_order: bool,
    writers: usize,
    commands: usize,
) -> Result<Sent, Box<dyn std::error::Error>> {
    let framework = Arc::new(CQRSFramework::<BankAccount>::new(store(
        client,
        table,
        global_order,
    )));
    let ids: Vec<Uuid> = (0..writers).map(|_| Uuid::new_v4()).collect();
    for &id in &ids {
        let open = BankCommand::Open {
            owner: "Ada".into(),
        };
        framework.dispatch_new(id, open).await?;
    }
    counter.take();
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let framework = Arc::clone(&framework);
        tasks.spawn(async move {
            for _ in 0..commands {
                framework
                    .dispatch(id, BankCommand::Deposit { amount: 1 })
                    .await?;
            }
            Ok::<_, cqrs_examples::bank::BankError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(counter.take())
}

/// `sent` as one line: the requests by operation, the items queried, and the items per
/// transaction.
fn describe(sent: &Sent, commands: u64) -> String {
    let requests: Vec<String> = sent
        .requests
        .iter()
        .map(|(op, n)| format!("{n} {op}"))
        .collect();
    let transactions = sent
        .requests
        .get("TransactWriteItems")
        .copied()
        .unwrap_or(0);
    format!(
        "{} | {} | {:.2} | {}",
        requests.join(", "),
        sent.items_queried,
        sent.requests.values().sum::<u64>() as f64 / commands as f64,
        sent.transaction_items
            .checked_div(transactions)
            .unwrap_or(0)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
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
    println!(
        "global order | prior events | setup | requests of one deposit | items queried \
         | requests per command | items per transaction"
    );
    for global_order in [true, false] {
        // A table per mode: a table is written with a global order or without, never both.
        let table = format!("{table}_{global_order}");
        DynamoDbEventRepository::new(client.clone(), table.as_str())
            .ensure_table()
            .await?;
        for prior in [10u64, 1_000] {
            for setup in [
                Setup::StateCache,
                Setup::NoCache,
                Setup::NoCacheSnapshotsEvery100,
            ] {
                let sent = measure(&client, &counter, &table, setup, prior, global_order).await?;
                println!(
                    "{global_order} | {prior} | {setup:?} | {}",
                    describe(&sent, 1)
                );
            }
        }
    }
    let (writers, commands) = (8, 25);
    println!(
        "\n{writers} writers at once, {commands} deposits each on an account of its own \
         (state cache on)\nglobal order | requests | items queried | requests per command \
         | items per transaction"
    );
    for global_order in [true, false] {
        let table = format!("{table}_{global_order}");
        let sent = concurrent(&client, &counter, &table, global_order, writers, commands).await?;
        println!(
            "{global_order} | {}",
            describe(&sent, (writers * commands) as u64)
        );
    }
    Ok(())
}
