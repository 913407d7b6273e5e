use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "Opened", migrate(from = "1"))]
    Opened,
}

fn main() {}
