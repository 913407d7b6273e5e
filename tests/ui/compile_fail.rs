//! Compile-time behaviour of the macros: every `<topic>/*.rs` in this crate outside `pass/`
//! must fail to compile with the `.stderr` beside it.
//!
//! All cases are checked by one `cargo check --keep-going` of trybuild's project (it does so
//! when no case must pass; the passing programs are test targets of this crate instead).
//!
//! Regenerate the expected output after a deliberate change with
//! `TRYBUILD=overwrite cargo test -p cqrs-ui-tests --test compile_fail`, then read every
//! changed `.stderr`: each error must point at the offending token.

#[test]
fn compile_fail() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("event_*/*.rs");
    cases.compile_fail("aggregate/*.rs");
    cases.compile_fail("view/*.rs");
    cases.compile_fail("process_input/*.rs");
    cases.compile_fail("upcast/*.rs");
}
