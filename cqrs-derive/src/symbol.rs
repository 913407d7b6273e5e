//! Attribute names and keys, spelled once (serde `internals/symbol.rs`).

use std::fmt;

use syn::{Ident, Path};

/// An attribute name or key the macros read.
#[derive(Copy, Clone, PartialEq, Eq)]
pub struct Symbol(pub &'static str);

/// `#[event(...)]`, the `DomainEvent` derive's helper attribute.
pub const EVENT: Symbol = Symbol("event");
/// `#[aggregate(...)]`.
pub const AGGREGATE: Symbol = Symbol("aggregate");
/// `#[view(...)]`.
pub const VIEW: Symbol = Symbol("view");

/// `name = "..."` in `#[event]` and `#[aggregate]`.
pub const NAME: Symbol = Symbol("name");
/// `version = "..."` in `#[event]`, `version = N` in `#[view]`.
pub const VERSION: Symbol = Symbol("version");
/// `table = "..."` in `#[view]`.
pub const TABLE: Symbol = Symbol("table");
/// `upcast(...)` in `#[event]`: one older version and the step that brings it up.
pub const UPCAST: Symbol = Symbol("upcast");
/// `from = "..."` in `upcast(...)`: the older version.
pub const FROM: Symbol = Symbol("from");
/// `to = "..."` in `upcast(...)`: the version the step produces (default: the current one).
pub const TO: Symbol = Symbol("to");
/// `with = path` in `upcast(...)`: a typed step, `fn(Old) -> New`.
pub const WITH: Symbol = Symbol("with");
/// `raw = path` in `upcast(...)`: a JSON step, `fn(Value) -> Result<Upcasted, DecodeError>`.
pub const RAW: Symbol = Symbol("raw");

/// The keys `#[event(...)]` accepts, in the order an error message lists them.
pub const EVENT_KEYS: &[Symbol] = &[NAME, VERSION, UPCAST];
/// The keys of `#[event(...)]` that may be given more than once.
pub const REPEATABLE_EVENT_KEYS: &[Symbol] = &[UPCAST];
/// The keys `upcast(...)` accepts.
pub const UPCAST_KEYS: &[Symbol] = &[FROM, TO, WITH, RAW, NAME];
/// The keys `#[aggregate(...)]` accepts.
pub const AGGREGATE_KEYS: &[Symbol] = &[NAME];
/// The keys `#[view(...)]` accepts.
pub const VIEW_KEYS: &[Symbol] = &[TABLE, VERSION];

impl PartialEq<Symbol> for Ident {
    fn eq(&self, word: &Symbol) -> bool {
        self == word.0
    }
}

impl PartialEq<Symbol> for &Ident {
    fn eq(&self, word: &Symbol) -> bool {
        *self == word.0
    }
}

impl PartialEq<Symbol> for Path {
    fn eq(&self, word: &Symbol) -> bool {
        self.is_ident(word.0)
    }
}

impl PartialEq<Symbol> for &Path {
    fn eq(&self, word: &Symbol) -> bool {
        self.is_ident(word.0)
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str(self.0)
    }
}

/// "`name` or `version`", "`table`, `version` or `x`": the keys for an error message.
pub fn list(keys: &[Symbol]) -> String {
    let quoted: Vec<String> = keys.iter().map(|key| format!("`{key}`")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}
