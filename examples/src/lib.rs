//! Domains shared by the runnable examples, their tests and the benchmarks.
#![warn(missing_docs)]

pub mod bank;
pub mod transfer;
