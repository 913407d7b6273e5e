//! The bank account example: open an account, deposit, withdraw, hit the overdraft rule,
//! project the balance view and query it.
//!
//! ```text
//! cargo run --example bank_account                 # in memory
//! ```

use std::process::ExitCode;
use std::time::Duration;

use cqrs::{CQRSFramework, MemoryEventRepository, MemoryViewRepository, Projection, Query};
use cqrs_examples::bank::{BalanceQuery, BalanceView, BankAccount, BankCommand, BankError};
use uuid::Uuid;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let events = MemoryEventRepository::new();
    let views = MemoryViewRepository::<BalanceView>::new();
    let framework = CQRSFramework::<BankAccount>::new(events.clone());
    let projection = Projection::<BankAccount, BalanceView>::new(events, views.clone());

    let account = Uuid::new_v4();
    println!("account {account}");
    let steps = [
        BankCommand::Open {
            owner: "Ada".into(),
        },
        BankCommand::Deposit { amount: 10_000 },
        BankCommand::Withdraw { amount: 2_500 },
        BankCommand::Withdraw { amount: 50_000 },
        BankCommand::Deposit { amount: 1_234 },
    ];
    let mut last_position = 0;
    for command in steps {
        print!("{command:?} -> ");
        match framework.dispatch(account, command).await {
            Ok(receipt) => {
                println!("ok, sequence {}", receipt.sequence);
                last_position = receipt.last_position().unwrap_or(last_position);
            }
            Err(refused @ BankError::Overdraft { .. }) => println!("refused: {refused}"),
            Err(other) => return Err(other.into()),
        }
    }

    projection
        .wait_for(last_position, Duration::from_secs(5))
        .await?;
    let view = BalanceQuery
        .query(&account, &views)
        .await?
        .ok_or("the balance view was not written")?;
    println!(
        "final balance of {}'s account: {}.{:02} after {} transactions",
        view.owner,
        view.balance / 100,
        view.balance % 100,
        view.transactions
    );
    Ok(())
}
