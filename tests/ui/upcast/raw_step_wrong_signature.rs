use serde::{Deserialize, Serialize};

fn step(payload: serde_json::Value) -> serde_json::Value {
    payload
}

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(version = "2", upcast(from = "1", raw = step))]
    Happened,
}

fn main() {}
