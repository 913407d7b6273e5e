//! Compile-time checks of `#[event(upcast(..))]` chains: every `tests/ui/upcast/*.rs` fails to
//! compile with the `.stderr` beside it (a gap, a duplicate step, a cycle, a missing target,
//! an old (name, version) claimed twice, malformed steps).
//!
//! Regenerate after a deliberate change with
//! `TRYBUILD=overwrite cargo test -p cqrs-tests --test upcast_ui`, then read every `.stderr`.

#[test]
fn upcast_ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/upcast/*.rs");
}
