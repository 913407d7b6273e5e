use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "Opened", version = 2)]
    Opened,
}

fn main() {}
