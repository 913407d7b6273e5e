//! Compile-time tests of the cqrs macros. The library is empty: the cases are in the topic
//! folders beside it (`README.md` lists them), run by `compile_fail.rs`, and the programs in
//! `pass/` are test targets of their own.
