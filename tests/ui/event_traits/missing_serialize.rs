use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, cqrs::DomainEvent)]
enum Event {
    Opened,
}

fn main() {}
