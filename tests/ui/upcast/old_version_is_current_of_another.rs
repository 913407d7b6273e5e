use serde::{Deserialize, Serialize};

fn step(payload: serde_json::Value) -> Result<cqrs::Upcasted, cqrs::DecodeError> {
    Ok(cqrs::Upcasted::Payload(payload))
}

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "Opened")]
    Opened,
    // "Opened" version 1 is what the variant above writes today.
    #[event(version = "2", upcast(name = "Opened", from = "1", raw = step))]
    Reopened,
}

fn main() {}
