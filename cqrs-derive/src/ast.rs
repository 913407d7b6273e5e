//! The `DomainEvent` derive's input as a typed model: which events the type stores, under
//! which (name, version), with the tokens each came from so errors point at them.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::{Attribute, Data, DeriveInput, Fields, GenericParam, Generics, Ident};

use crate::attr::{self, EventAttrs, Upcast, Value};
use crate::ctxt::Ctxt;
use crate::rules;
use crate::symbol::EVENT;

/// The version of an event whose `#[event]` gives none.
pub const DEFAULT_VERSION: &str = "1";

/// A type deriving `DomainEvent`.
pub struct Input<'a> {
    pub ident: &'a Ident,
    pub generics: &'a Generics,
    pub shape: Shape<'a>,
}

/// An enum (one event per variant) or a struct (one event).
pub enum Shape<'a> {
    Enum(Vec<Variant<'a>>),
    Struct(Option<Event>),
}

/// One variant and the event it is stored as (`None` when its attribute was refused).
pub struct Variant<'a> {
    pub ident: &'a Ident,
    pub event: Option<Event>,
}

/// The stored (name, version) of one event.
#[derive(Clone)]
pub struct Event {
    pub name: String,
    pub version: String,
    /// Where the name was written: the `name = "..."` literal, or the variant/type ident
    /// it defaults to.
    pub name_span: Span,
    /// The `upcast(...)` steps that read its older versions, in declaration order.
    pub upcasts: Vec<Upcast>,
    /// An `upcast(...)` was refused (and reported), so the chain is incomplete.
    pub upcast_refused: bool,
}

impl Event {
    /// The name an older version was stored under: the step's `name`, or the event's.
    pub fn old_name<'e>(&'e self, step: &'e Upcast) -> &'e str {
        step.name.as_ref().map_or(&self.name, |name| &name.value)
    }
}

impl<'a> Input<'a> {
    /// Reads the input, recording every mistake in `cx`. `None` for a shape the derive cannot
    /// handle at all (a union, an enum without variants): no impl, not even a stub, is
    /// emitted for those.
    pub fn from_syn(cx: &mut Ctxt, input: &'a DeriveInput) -> Option<Self> {
        for param in &input.generics.params {
            if let GenericParam::Lifetime(lifetime) = param {
                cx.error_spanned_by(
                    &lifetime.lifetime,
                    "an event is decoded from an owned stored payload, so it cannot borrow: \
                     remove this lifetime parameter and own the data (`String`, not `&str`)",
                );
            }
        }
        let shape = match &input.data {
            Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`DomainEvent` cannot be derived for a union; use an enum (one variant per \
                     event) or a struct (one event)",
                );
                return None;
            }
            Data::Enum(data) => {
                for attr in event_attrs_in(&input.attrs) {
                    cx.error_spanned_by(
                        attr,
                        "on an enum, `#[event(...)]` goes on each variant, not on the enum",
                    );
                }
                if data.variants.is_empty() {
                    cx.error_spanned_by(
                        &input.ident,
                        "an event enum needs at least one variant: an enum without variants \
                         has no value to store",
                    );
                    return None;
                }
                let variants = data
                    .variants
                    .iter()
                    .map(|variant| {
                        reject_on_fields(cx, &variant.fields, "variant");
                        let attrs = attr::event_attrs(cx, &variant.attrs);
                        Variant {
                            ident: &variant.ident,
                            event: resolve(cx, attrs, &variant.ident, "variant"),
                        }
                    })
                    .collect();
                Shape::Enum(variants)
            }
            Data::Struct(data) => {
                reject_on_fields(cx, &data.fields, "struct");
                let attrs = attr::event_attrs(cx, &input.attrs);
                Shape::Struct(resolve(cx, attrs, &input.ident, "struct"))
            }
        };
        Some(Input {
            ident: &input.ident,
            generics: &input.generics,
            shape,
        })
    }

    /// Every event of the type with the variant that stores it (`None` for a struct), in
    /// declaration order. Events whose attribute was refused are left out.
    pub fn events(&self) -> Vec<(Option<&'a Ident>, &Event)> {
        match &self.shape {
            Shape::Enum(variants) => variants
                .iter()
                .filter_map(|variant| {
                    variant
                        .event
                        .as_ref()
                        .map(|event| (Some(variant.ident), event))
                })
                .collect(),
            Shape::Struct(event) => event.iter().map(|event| (None, event)).collect(),
        }
    }
}

fn event_attrs_in(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|attr| attr.path() == EVENT)
}

/// `#[event]` on a field is a mistake: it names the event, which is the variant or struct.
fn reject_on_fields(cx: &mut Ctxt, fields: &Fields, owner: &str) {
    for field in fields {
        for attr in event_attrs_in(&field.attrs) {
            cx.error_spanned_by(
                attr,
                format!("`#[event(...)]` goes on the {owner}, not on a field"),
            );
        }
    }
}

/// The event's (name, version) with the documented defaults: the ident, version "1".
fn resolve(cx: &mut Ctxt, attrs: EventAttrs, ident: &Ident, owner: &str) -> Option<Event> {
    let name = match attrs.name {
        Value::Given(name) => Some((name.value, name.lit.span())),
        Value::Refused => None,
        Value::Absent => {
            let default = ident.unraw().to_string();
            match rules::check_event_name(&default) {
                Ok(()) => Some((default, ident.span())),
                Err(reason) => {
                    cx.error_spanned_by(
                        ident,
                        format!(
                            "the event name defaults to the {owner}'s name, and {reason}; give \
                             one with `#[event(name = \"...\")]`"
                        ),
                    );
                    None
                }
            }
        }
    };
    let version = match attrs.version {
        Value::Given(version) => version.value,
        Value::Refused => return None,
        Value::Absent => DEFAULT_VERSION.to_owned(),
    };
    let (name, name_span) = name?;
    Some(Event {
        name,
        version,
        name_span,
        upcasts: attrs.upcasts,
        upcast_refused: attrs.upcast_refused,
    })
}
