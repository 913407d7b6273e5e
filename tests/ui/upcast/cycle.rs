use serde::{Deserialize, Serialize};

fn step(payload: serde_json::Value) -> Result<cqrs::Upcasted, cqrs::DecodeError> {
    Ok(cqrs::Upcasted::Payload(payload))
}

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(
        version = "4",
        upcast(from = "1", raw = step),
        upcast(from = "2", to = "3", raw = step),
        upcast(from = "3", to = "2", raw = step)
    )]
    Happened,
}

fn main() {}
