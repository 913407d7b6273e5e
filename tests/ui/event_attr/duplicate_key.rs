use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "Opened", version = "1", name = "Created")]
    Opened,
}

fn main() {}
