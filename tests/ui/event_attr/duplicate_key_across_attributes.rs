use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(version = "2")]
    #[event(version = "3")]
    Opened,
}

fn main() {}
