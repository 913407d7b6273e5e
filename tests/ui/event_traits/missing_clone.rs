use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    Opened,
}

fn main() {}
