use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "Opened", versoin = "1")]
    Opened,
    #[event(version = "1.5")]
    Deposited { amount: u64 },
    #[event(name = "")]
    Closed(u8),
}

fn main() {}
