use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(version = "01")]
    Opened,
}

fn main() {}
