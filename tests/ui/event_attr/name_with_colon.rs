use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "bank:AccountOpened")]
    Opened,
}

fn main() {}
