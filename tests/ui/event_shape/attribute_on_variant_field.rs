use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    Deposited {
        #[event(name = "amount")]
        amount: u64,
    },
}

fn main() {}
