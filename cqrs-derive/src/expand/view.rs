//! `#[view(table = "...", version = N)]` on `impl View<A> for V { ... }`.
//!
//! It writes `const TABLE_NAME` (default: the view type's name in snake case) and
//! `const VERSION` (default 1); the block keeps `handle_event` and, if wanted, `view_id`.

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::{ItemImpl, LitInt};

use crate::attr::{checked, KeyReader, Value};
use crate::ctxt::Ctxt;
use crate::expand::impl_block;
use crate::rules;
use crate::symbol::{TABLE, VERSION, VIEW, VIEW_KEYS};

/// The rewritten impl block, or the errors beside the best impl that can be given.
pub fn attribute(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut cx = Ctxt::new();
    let (table, version) = read_args(&mut cx, args);
    let Some(mut item_impl) = impl_block::parse(&mut cx, VIEW, "View", item.clone()) else {
        return with_errors(cx, item);
    };

    let table = match table {
        Value::Given(table) => Some(table),
        Value::Refused => None,
        Value::Absent => default_table(&mut cx, &item_impl),
    };
    let version = match version {
        Value::Given(version) => Some(version),
        Value::Refused => None,
        Value::Absent => Some(1),
    };
    for (constant, key) in [("TABLE_NAME", TABLE), ("VERSION", VERSION)] {
        if let Some(existing) = impl_block::find_const(&item_impl, constant) {
            cx.error_spanned_by(
                &existing.ident,
                format!(
                    "`{constant}` is written by `#[view]`: put the value in `#[view({key} = ...)]` \
                     and remove this line"
                ),
            );
        }
    }
    if impl_block::find_const(&item_impl, "TABLE_NAME").is_none() {
        let table = table.unwrap_or_default();
        item_impl.items.insert(
            0,
            syn::parse_quote!(const TABLE_NAME: &'static ::cqrs::__private::core::primitive::str = #table;),
        );
    }
    if impl_block::find_const(&item_impl, "VERSION").is_none() {
        let version = version.unwrap_or(1);
        item_impl.items.insert(
            1,
            syn::parse_quote!(const VERSION: ::cqrs::__private::core::primitive::u64 = #version;),
        );
    }
    with_errors(cx, item_impl.into_token_stream())
}

fn with_errors(cx: Ctxt, item: TokenStream) -> TokenStream {
    match cx.check() {
        Ok(()) => item,
        Err(error) => {
            let error = error.to_compile_error();
            quote!(#error #item)
        }
    }
}

fn read_args(cx: &mut Ctxt, args: TokenStream) -> (Value<String>, Value<u64>) {
    let mut table = Value::Absent;
    let mut version = Value::Absent;
    let mut reader = KeyReader::new(cx, VIEW, VIEW_KEYS);
    let parser = syn::meta::parser(|meta| {
        let Some(key) = reader.key(&meta)? else {
            return Ok(());
        };
        if key == TABLE {
            table = Value::Refused;
            if let Some(lit) = reader.string(&meta, TABLE, "account_balance")? {
                if let Some(value) = checked(reader.cx(), lit, rules::check_table_name) {
                    table = Value::Given(value.value);
                }
            }
        } else if key == VERSION {
            version = Value::Refused;
            if let Some(lit) = reader.int(&meta, VERSION, "1")? {
                if let Some(value) = view_version(reader.cx(), &lit) {
                    version = Value::Given(value);
                }
            }
        }
        Ok(())
    });
    if let Err(error) = syn::parse::Parser::parse2(parser, args) {
        reader.cx().syn_error(error);
    }
    (table, version)
}

/// A view version is a `u64` from 1 up (the stored rows start at 0 = "never built").
fn view_version(cx: &mut Ctxt, lit: &LitInt) -> Option<u64> {
    let suffix_ok = matches!(lit.suffix(), "" | "u64");
    match lit.base10_parse::<u64>() {
        Ok(value) if value >= 1 && suffix_ok => Some(value),
        _ => {
            cx.error_spanned_by(
                lit,
                "a view version is a whole number from 1 to 18446744073709551615 (a `u64`); \
                 raise it when `handle_event` or the view's shape changes",
            );
            None
        }
    }
}

/// The view type's name in snake case, when it is a valid table name.
fn default_table(cx: &mut Ctxt, item_impl: &ItemImpl) -> Option<String> {
    let Some(ident) = impl_block::self_ident(&item_impl.self_ty) else {
        cx.error_spanned_by(
            &item_impl.self_ty,
            "this type has no name to use as the table name; give one with \
             `#[view(table = \"...\")]`",
        );
        return None;
    };
    let default = rules::snake_case(&syn::ext::IdentExt::unraw(ident).to_string());
    match rules::check_table_name(&default) {
        Ok(()) => Some(default),
        Err(reason) => {
            cx.error_spanned_by(
                ident,
                format!(
                    "the table name defaults to the type's name in snake case, and {reason}; \
                     give one with `#[view(table = \"...\")]`"
                ),
            );
            None
        }
    }
}
