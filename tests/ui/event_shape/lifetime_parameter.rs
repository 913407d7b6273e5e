use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event<'a> {
    Opened { owner: &'a str },
}

fn main() {}
