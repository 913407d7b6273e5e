use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "Deposited", version = "1")]
    DepositedV1 { amount: u64 },
    #[event(name = "Deposited")]
    Deposited { amount: u64, currency: String },
}

fn main() {}
