//! Test support shared by several suites in this folder.

pub mod ledger;
pub mod nats;
