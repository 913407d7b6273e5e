//! Test support shared by several suites in this folder.

pub mod counter;
pub mod ledger;
pub mod lost_commit;
pub mod nats;
pub mod temp_db;
