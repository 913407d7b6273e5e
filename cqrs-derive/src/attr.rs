//! Reading the macros' attributes: `#[event(...)]`, `#[aggregate(...)]`, `#[view(...)]`.
//!
//! Every attribute is a comma-separated list of `key = value`. A [`KeyReader`] reads one
//! list: it reports an unknown key (listing the valid ones), a repeated key or a value of the
//! wrong kind on the exact token, then skips it and carries on, so every mistake in an
//! attribute is reported. New keys (issue 7's upcasting chains) are one more arm in the
//! attribute's `match` and one more entry in its key list in `symbol.rs`.

use proc_macro2::TokenStream;
use syn::meta::ParseNestedMeta;
use syn::{Attribute, Expr, Lit, LitInt, LitStr, Token};

use crate::ctxt::Ctxt;
use crate::rules;
use crate::symbol::{self, Symbol, EVENT, EVENT_KEYS, NAME, VERSION};

/// Reads the keys of one attribute (possibly split over several `#[attr(..)]` lines).
pub struct KeyReader<'c> {
    cx: &'c mut Ctxt,
    attr: Symbol,
    keys: &'static [Symbol],
    seen: Vec<Symbol>,
}

impl<'c> KeyReader<'c> {
    pub fn new(cx: &'c mut Ctxt, attr: Symbol, keys: &'static [Symbol]) -> Self {
        KeyReader {
            cx,
            attr,
            keys,
            seen: Vec::new(),
        }
    }

    pub fn cx(&mut self) -> &mut Ctxt {
        self.cx
    }

    /// The known key `meta` names, the first time it appears. An unknown or repeated key is
    /// reported, its value skipped, and `None` returned.
    pub fn key(&mut self, meta: &ParseNestedMeta) -> syn::Result<Option<Symbol>> {
        let Some(key) = self.keys.iter().copied().find(|key| meta.path == *key) else {
            let shown = path_to_string(&meta.path);
            self.cx.syn_error(meta.error(format!(
                "unknown key `{shown}` in `#[{}]`; expected {}",
                self.attr,
                symbol::list(self.keys)
            )));
            skip_value(meta)?;
            return Ok(None);
        };
        if self.seen.contains(&key) {
            self.cx.syn_error(meta.error(format!(
                "duplicate key `{key}` in `#[{}]`; give it once",
                self.attr
            )));
            skip_value(meta)?;
            return Ok(None);
        }
        self.seen.push(key);
        Ok(Some(key))
    }

    /// The value of `key = <expr>`, or `None` (reported) when there is no `=`.
    fn value(
        &mut self,
        meta: &ParseNestedMeta,
        key: Symbol,
        example: &str,
    ) -> syn::Result<Option<Expr>> {
        if !meta.input.peek(Token![=]) {
            self.cx
                .syn_error(meta.error(format!("`{key}` takes a value: `{key} = {example}`")));
            skip_value(meta)?;
            return Ok(None);
        }
        Ok(Some(meta.value()?.parse::<Expr>()?))
    }

    /// `key = "..."`: the string literal, or `None` (reported) for any other value.
    pub fn string(
        &mut self,
        meta: &ParseNestedMeta,
        key: Symbol,
        example: &str,
    ) -> syn::Result<Option<LitStr>> {
        let Some(expr) = self.value(meta, key, &format!("\"{example}\""))? else {
            return Ok(None);
        };
        if let Expr::Lit(syn::ExprLit {
            lit: Lit::Str(lit), ..
        }) = &expr
        {
            return Ok(Some(lit.clone()));
        }
        let hint = match &expr {
            Expr::Lit(syn::ExprLit {
                lit: Lit::Int(int), ..
            }) => format!("\"{}\"", int.base10_digits()),
            _ => format!("\"{example}\""),
        };
        self.cx.error_spanned_by(
            &expr,
            format!("expected a string literal for `{key}`, like `{key} = {hint}`"),
        );
        Ok(None)
    }

    /// `key = N`: the integer literal, or `None` (reported) for any other value.
    pub fn int(
        &mut self,
        meta: &ParseNestedMeta,
        key: Symbol,
        example: &str,
    ) -> syn::Result<Option<LitInt>> {
        let Some(expr) = self.value(meta, key, example)? else {
            return Ok(None);
        };
        if let Expr::Lit(syn::ExprLit {
            lit: Lit::Int(lit), ..
        }) = &expr
        {
            return Ok(Some(lit.clone()));
        }
        let hint = match &expr {
            Expr::Lit(syn::ExprLit {
                lit: Lit::Str(text),
                ..
            }) => text.value(),
            _ => example.to_owned(),
        };
        self.cx.error_spanned_by(
            &expr,
            format!("expected an integer literal for `{key}`, like `{key} = {hint}`"),
        );
        Ok(None)
    }
}

/// Skips what follows an unknown or repeated key: `= expr`, `(...)` or nothing.
fn skip_value(meta: &ParseNestedMeta) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        content.parse::<TokenStream>()?;
    }
    Ok(())
}

fn path_to_string(path: &syn::Path) -> String {
    path.segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}

/// A string value that passed its rule, with the literal it was written as (for spans).
#[derive(Clone)]
pub struct Checked {
    pub value: String,
    pub lit: LitStr,
}

/// A key's value as read: left out, given but refused (already reported), or given.
#[derive(Clone, Default)]
pub enum Value<T> {
    #[default]
    Absent,
    Refused,
    Given(T),
}

impl<T> Value<T> {
    fn from_checked(value: Option<T>) -> Self {
        value.map_or(Value::Refused, Value::Given)
    }
}

/// What `#[event(...)]` said about one event (a variant, or a struct).
#[derive(Default)]
pub struct EventAttrs {
    /// `name = "..."`.
    pub name: Value<Checked>,
    /// `version = "..."`.
    pub version: Value<Checked>,
}

/// Reads every `#[event(...)]` in `attrs` (they are merged; a key may appear once overall).
pub fn event_attrs(cx: &mut Ctxt, attrs: &[Attribute]) -> EventAttrs {
    let mut out = EventAttrs::default();
    let mut reader = KeyReader::new(cx, EVENT, EVENT_KEYS);
    for attr in attrs.iter().filter(|attr| attr.path() == EVENT) {
        let result = attr.parse_nested_meta(|meta| {
            let Some(key) = reader.key(&meta)? else {
                return Ok(());
            };
            if key == NAME {
                out.name = Value::Refused;
                if let Some(lit) = reader.string(&meta, NAME, "AccountOpened")? {
                    out.name =
                        Value::from_checked(checked(reader.cx(), lit, rules::check_event_name));
                }
            } else if key == VERSION {
                out.version = Value::Refused;
                if let Some(lit) = reader.string(&meta, VERSION, "1")? {
                    out.version =
                        Value::from_checked(checked(reader.cx(), lit, rules::check_event_version));
                }
            }
            Ok(())
        });
        if let Err(error) = result {
            reader.cx().syn_error(error);
        }
    }
    out
}

/// The literal's value if it passes `rule`; otherwise the rule's reason, at the literal.
pub fn checked(
    cx: &mut Ctxt,
    lit: LitStr,
    rule: fn(&str) -> Result<(), String>,
) -> Option<Checked> {
    let value = lit.value();
    match rule(&value) {
        Ok(()) => Some(Checked { value, lit }),
        Err(reason) => {
            cx.error_spanned_by(&lit, reason);
            None
        }
    }
}
