//! Support shared by the cross-crate integration tests in `tests/`.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// The value of the environment variable `var` naming a server for a test suite, or `None`
/// when it is unset or empty.
///
/// When it is unset, says once per suite and process, on the real standard error (past the
/// test harness's output capture, so a plain `cargo test` shows it), which suite is skipped
/// and how to enable it.
///
/// ```
/// let url = cqrs_tests::server_url("CQRS_DOC_EXAMPLE_UNSET", "example", "x://y");
/// assert!(url.is_none());
/// ```
pub fn server_url(var: &str, suite: &str, example: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ => {
            static SAID: Mutex<Option<HashSet<String>>> = Mutex::new(None);
            let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
            if said
                .get_or_insert_with(HashSet::new)
                .insert(suite.to_owned())
            {
                // `eprintln!` is captured by libtest; a direct write is not.
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "note: skipping the {suite} suite: set {var}={example} to run it"
                );
            }
            None
        }
    }
}
