#![allow(unused_imports)]

use serde::{Deserialize, Serialize};

#[derive(cqrs::DomainEvent)]
union Bits {
    int: u32,
    float: f32,
}

fn main() {}
