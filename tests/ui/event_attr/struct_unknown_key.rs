use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
#[event(name = "PriceChanged", aggregate = "price")]
struct PriceChanged {
    cents: u64,
}

fn main() {}
