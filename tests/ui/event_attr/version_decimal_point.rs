use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(version = "1.0")]
    Opened,
}

fn main() {}
