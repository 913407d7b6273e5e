use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
#[event(version = "2")]
enum Event {
    Opened,
}

fn main() {}
