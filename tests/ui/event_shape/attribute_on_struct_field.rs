use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
struct PriceChanged {
    #[event(version = "2")]
    cents: u64,
}

fn main() {}
