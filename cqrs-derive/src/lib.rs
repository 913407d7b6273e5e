//! Derive and attribute macros for `cqrs`. Use them through the `cqrs` crate, which
//! re-exports them with their documentation: `cqrs::DomainEvent`, `cqrs::aggregate` and
//! `cqrs::view`. The code they generate names only `::cqrs::...` paths, so a user's crate needs
//! `cqrs` (and `serde` for its own derives) and nothing from here.
//!
//! The crate is organised like `serde_derive` and `thiserror-impl`: `ast` reads the derive
//! input into a typed model, `attr` reads the attributes, `check` applies the rules that
//! span several attributes, `expand` generates code (one module per macro), and
//! `fallback` emits stub impls beside the errors. Every mistake is collected in a
//! `ctxt::Ctxt` and reported at once, each at its own token; the macros never panic.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

mod ast;
mod attr;
mod check;
mod ctxt;
mod expand;
mod fallback;
mod rules;
mod symbol;
#[cfg(test)]
mod tests;

/// Derives `cqrs::DomainEvent` for an enum (one event per variant) or a struct (one event).
///
/// Each event is stored under `#[event(name = "...", version = "...")]`; the name defaults to
/// the variant's (or struct's) name and the version to `"1"`. See `cqrs::DomainEvent` for the
/// rules and examples.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::domain_event::derive(&input).into()
}

/// Derives `cqrs::ProcessInput` for an enum with one variant per aggregate type a process
/// manager reacts to, each holding that aggregate's event type. See `cqrs::ProcessInput`.
#[proc_macro_derive(ProcessInput, attributes(input))]
pub fn derive_process_input(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::process_input::derive(&input).into()
}

/// Writes an aggregate's `NAME` (and the associated types `handle_command` already names) on
/// `impl Aggregate for X { ... }`. See `cqrs::aggregate`.
#[proc_macro_attribute]
pub fn aggregate(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::aggregate::attribute(args.into(), item.into()).into()
}

/// Writes a view's `TABLE_NAME` and `VERSION` on `impl View<A> for V { ... }`. See
/// `cqrs::view`.
#[proc_macro_attribute]
pub fn view(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::view::attribute(args.into(), item.into()).into()
}
