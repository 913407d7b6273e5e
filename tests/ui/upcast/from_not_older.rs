use serde::{Deserialize, Serialize};

fn step(payload: serde_json::Value) -> Result<cqrs::Upcasted, cqrs::DecodeError> {
    Ok(cqrs::Upcasted::Payload(payload))
}

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(version = "2", upcast(from = "2", raw = step))]
    Happened,
}

fn main() {}
