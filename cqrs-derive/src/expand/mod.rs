//! Code generation, one module per macro.

pub mod aggregate;
pub mod domain_event;
pub mod impl_block;
pub mod process_input;
pub mod view;
