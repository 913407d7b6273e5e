use serde::{Deserialize, Serialize};

fn step(payload: serde_json::Value) -> Result<cqrs::Upcasted, cqrs::DecodeError> {
    Ok(cqrs::Upcasted::Payload(payload))
}

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    // No `from`; both kinds of step; a string for a path; an unknown key.
    #[event(version = "2", upcast(raw = step))]
    A,
    #[event(version = "2", upcast(from = "1", with = step, raw = step))]
    B,
    #[event(version = "2", upcast(from = "1", raw = "step"))]
    C,
    #[event(version = "2", upcast(from = "1", raw = step, via = step))]
    D,
    #[event(version = "2", upcast(from = "01", raw = step))]
    E,
}

fn main() {}
