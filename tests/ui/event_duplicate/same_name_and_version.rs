use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "MoneyDeposited", version = "1")]
    Deposited { amount: u64 },
    #[event(name = "MoneyWithdrawn", version = "1")]
    Withdrawn { amount: u64 },
    #[event(name = "MoneyDeposited", version = "1")]
    DepositedAgain { amount: u64 },
}

fn main() {}
