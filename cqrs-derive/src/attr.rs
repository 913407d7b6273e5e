//! Reading the macros' attributes: `#[event(...)]`, `#[aggregate(...)]`, `#[view(...)]`.
//!
//! Every attribute is a comma-separated list of `key = value`. A [`KeyReader`] reads one
//! list: it reports an unknown key (listing the valid ones), a repeated key or a value of the
//! wrong kind on the exact token, then skips it and carries on, so every mistake in an
//! attribute is reported. Adding a key is one more arm in the attribute's `match` and one
//! more entry in its key list in `symbol.rs`; `upcast(...)` is read that way.

use proc_macro2::TokenStream;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ExprPath, Lit, LitInt, LitStr, Token};

use crate::ctxt::Ctxt;
use crate::rules;
use crate::symbol::{
    self, Symbol, EVENT, EVENT_KEYS, FROM, NAME, RAW, REPEATABLE_EVENT_KEYS, TO, UPCAST,
    UPCAST_KEYS, VERSION, WITH,
};

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
            let place = if self.attr == UPCAST {
                format!("`{}(...)`", self.attr)
            } else {
                format!("`#[{}]`", self.attr)
            };
            self.cx.syn_error(meta.error(format!(
                "unknown key `{shown}` in {place}; expected {}",
                symbol::list(self.keys)
            )));
            skip_value(meta)?;
            return Ok(None);
        };
        if self.seen.contains(&key) && !REPEATABLE_EVENT_KEYS.contains(&key) {
            let place = if self.attr == UPCAST {
                format!("`{}(...)`", self.attr)
            } else {
                format!("`#[{}]`", self.attr)
            };
            self.cx
                .syn_error(meta.error(format!("duplicate key `{key}` in {place}; give it once")));
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

    /// `key = path::to::function`: the path, or `None` (reported) for any other value.
    pub fn path(
        &mut self,
        meta: &ParseNestedMeta,
        key: Symbol,
        example: &str,
    ) -> syn::Result<Option<ExprPath>> {
        let Some(expr) = self.value(meta, key, example)? else {
            return Ok(None);
        };
        if let Expr::Path(path) = expr {
            return Ok(Some(path));
        }
        self.cx.error_spanned_by(
            &expr,
            format!("expected the path of a function for `{key}`, like `{key} = {example}`"),
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
    /// Every complete `upcast(...)`, in order.
    pub upcasts: Vec<Upcast>,
    /// Whether an `upcast(...)` was refused (already reported): the chain is then not
    /// checked as a whole, so a refused step does not also show up as a gap.
    pub upcast_refused: bool,
}

/// How a step brings an old payload up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// `with = path`: `fn(Old) -> New`, `Old` deserialized from the old payload.
    Typed,
    /// `raw = path`: `fn(Value) -> Result<Upcasted, DecodeError>`.
    Raw,
}

/// One `upcast(from = "...", to = "...", with | raw = path, name = "...")`.
#[derive(Clone)]
pub struct Upcast {
    /// `name = "..."`: the name the old version was stored under, if not the event's.
    pub name: Option<Checked>,
    /// `from = "..."`: the old version.
    pub from: Checked,
    /// `to = "..."`: the version the step produces; `None` for the current version.
    pub to: Option<Checked>,
    /// Typed or raw.
    pub kind: StepKind,
    /// The step function.
    pub path: ExprPath,
}

/// A value rule from `rules.rs`: the reason a value is refused.
type Rule = fn(&str) -> Result<(), String>;

/// Reads the inside of one `upcast(...)`; `None` (reported) when it is incomplete.
fn upcast(cx: &mut Ctxt, meta: &ParseNestedMeta) -> syn::Result<Option<Upcast>> {
    let span = meta.path.span();
    if !meta.input.peek(syn::token::Paren) {
        cx.syn_error(
            meta.error("`upcast` takes a list: `upcast(from = \"1\", with = path::to::step)`"),
        );
        skip_value(meta)?;
        return Ok(None);
    }
    let mut reader = KeyReader::new(cx, UPCAST, UPCAST_KEYS);
    let (mut name, mut from, mut to, mut step) = (None, None, None, None);
    let mut refused = false;
    meta.parse_nested_meta(|inner| {
        let Some(key) = reader.key(&inner)? else {
            refused = true;
            return Ok(());
        };
        if key == WITH || key == RAW {
            let example = if key == WITH {
                "upgrade_v1"
            } else {
                "rewrite_v1"
            };
            let Some(path) = reader.path(&inner, key, example)? else {
                refused = true;
                return Ok(());
            };
            if step.is_some() {
                reader.cx().error_spanned_by(
                    &path,
                    "an `upcast(...)` has one step: `with = ...` (typed) or `raw = ...` (JSON), \
                     not both",
                );
                refused = true;
                return Ok(());
            }
            let kind = if key == WITH {
                StepKind::Typed
            } else {
                StepKind::Raw
            };
            step = Some((kind, path));
            return Ok(());
        }
        let (rule, example): (Rule, _) = if key == NAME {
            (rules::check_event_name, "OldName")
        } else {
            (rules::check_event_version, "1")
        };
        let Some(lit) = reader.string(&inner, key, example)? else {
            refused = true;
            return Ok(());
        };
        let Some(value) = checked(reader.cx(), lit, rule) else {
            refused = true;
            return Ok(());
        };
        if key == NAME {
            name = Some(value);
        } else if key == FROM {
            from = Some(value);
        } else if key == TO {
            to = Some(value);
        }
        Ok(())
    })?;
    if refused {
        return Ok(None);
    }
    let Some(from) = from else {
        cx.syn_error(syn::Error::new(
            span,
            "this `upcast(...)` needs `from = \"...\"`: the older version it reads",
        ));
        return Ok(None);
    };
    let Some((kind, path)) = step else {
        cx.syn_error(syn::Error::new(
            span,
            "this `upcast(...)` needs a step: `with = path` (a typed `fn(Old) -> New`) or \
             `raw = path` (a `fn(Value) -> Result<Upcasted, DecodeError>`)",
        ));
        return Ok(None);
    };
    Ok(Some(Upcast {
        name,
        from,
        to,
        kind,
        path,
    }))
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
            } else if key == UPCAST {
                match upcast(reader.cx(), &meta)? {
                    Some(step) => out.upcasts.push(step),
                    None => out.upcast_refused = true,
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
pub fn checked(cx: &mut Ctxt, lit: LitStr, rule: Rule) -> Option<Checked> {
    let value = lit.value();
    match rule(&value) {
        Ok(()) => Some(Checked { value, lit }),
        Err(reason) => {
            cx.error_spanned_by(&lit, reason);
            None
        }
    }
}
