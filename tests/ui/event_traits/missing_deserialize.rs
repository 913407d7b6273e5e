use serde::Serialize;

#[derive(Debug, Clone, Serialize, cqrs::DomainEvent)]
struct Opened {
    owner: String,
}

fn main() {}
