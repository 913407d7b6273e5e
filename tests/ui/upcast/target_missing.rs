use serde::{Deserialize, Serialize};

fn step(payload: serde_json::Value) -> Result<cqrs::Upcasted, cqrs::DecodeError> {
    Ok(cqrs::Upcasted::Payload(payload))
}

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(version = "3", upcast(from = "1", to = "5", raw = step), upcast(from = "2", raw = step))]
    Happened,
}

fn main() {}
