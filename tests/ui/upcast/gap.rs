use serde::{Deserialize, Serialize};

fn step(payload: serde_json::Value) -> Result<cqrs::Upcasted, cqrs::DecodeError> {
    Ok(cqrs::Upcasted::Payload(payload))
}

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    // Version 2 has no step: stored v2 events would not decode.
    #[event(version = "3", upcast(from = "1", raw = step))]
    Happened,
}

fn main() {}
