//! Compile-time behaviour of the derive macros: every `tests/ui/<topic>/*.rs` outside
//! `tests/ui/pass/` must fail to compile with the `.stderr` beside it; every file in
//! `tests/ui/pass/` must compile and run.
//!
//! Regenerate the expected output after a deliberate change with
//! `TRYBUILD=overwrite cargo test -p cqrs-tests --test derive_ui`, then read every changed
//! `.stderr`: each error must point at the offending token.

#[test]
fn derive_ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/event_*/*.rs");
    cases.compile_fail("ui/aggregate/*.rs");
    cases.compile_fail("ui/view/*.rs");
    cases.compile_fail("ui/process_input/*.rs");
}
