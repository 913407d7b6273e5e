use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Event {
    Opened,
}

fn store<E: cqrs::DomainEvent>(_event: &E) {}

fn main() {
    store(&Event::Opened);
}
