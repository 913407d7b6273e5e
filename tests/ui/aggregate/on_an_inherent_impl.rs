#![allow(unused_imports)]

use cqrs::{Aggregate, CQRSError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    Happened,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct Error(#[from] CQRSError);

#[derive(Debug, Default)]
struct Thing;

#[cqrs::aggregate(name = "thing")]
impl Thing {
    fn new() -> Self {
        Thing
    }
}

fn main() {}
