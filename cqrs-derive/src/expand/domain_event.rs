//! `#[derive(DomainEvent)]`.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{DeriveInput, Generics, Ident, WhereClause};

use crate::ast::{Event, Input, Shape};
use crate::attr::{StepKind, Upcast};
use crate::ctxt::Ctxt;
use crate::{check, fallback};

/// The impl, or the errors with a stub impl beside them.
pub fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::new();
    let parsed = Input::from_syn(&mut cx, input);
    if let Some(parsed) = &parsed {
        check::check(&mut cx, parsed);
    }
    match (cx.check(), parsed) {
        (Ok(()), Some(parsed)) => expand(&parsed),
        (Err(error), Some(_)) => {
            let stub = fallback::domain_event(input);
            let error = error.to_compile_error();
            quote!(#error #stub)
        }
        // A union or an empty enum: no impl can exist, so no stub either.
        (Err(error), None) => error.to_compile_error(),
        (Ok(()), None) => TokenStream::new(),
    }
}

/// The impl's where clause: the user's, plus, for a generic type, the bounds
/// `cqrs::DomainEvent` needs of `Self` (a non-generic type gets none, so a missing
/// `Serialize` is reported at the type itself).
pub fn where_clause(ident: Ident, generics: &Generics) -> Option<WhereClause> {
    let mut where_clause = generics.where_clause.clone();
    if !generics.params.is_empty() {
        let (_, ty_generics, _) = generics.split_for_impl();
        let predicate: syn::WherePredicate = syn::parse_quote! {
            #ident #ty_generics: ::cqrs::__private::serde::Serialize
                + ::cqrs::__private::serde::de::DeserializeOwned
                + ::cqrs::__private::core::clone::Clone
                + ::cqrs::__private::core::fmt::Debug
                + ::cqrs::__private::core::marker::Send
                + ::cqrs::__private::core::marker::Sync
                + 'static
        };
        where_clause
            .get_or_insert_with(|| syn::parse_quote!(where))
            .predicates
            .push(predicate);
    }
    where_clause
}

fn expand(input: &Input) -> TokenStream {
    let ident = input.ident;
    let (impl_generics, ty_generics, _) = input.generics.split_for_impl();
    let where_clause = where_clause(ident.clone(), input.generics);
    let str_ty = quote!(::cqrs::__private::core::primitive::str);
    // Locals resolve at the macro's definition site (`mixed_site`), so they never mix with
    // the caller's variables. A caller's *item* named like one of them (a unit struct or a
    // const, which a pattern would match) would still clash: `__`-names are reserved, as
    // in serde.
    let local = |name: &str| Ident::new(name, Span::mixed_site());
    let (type_arg, version_arg, payload_arg) = (
        local("__event_type"),
        local("__event_version"),
        local("__payload"),
    );
    let (event_var, error_var, stored_var, decoded_var) = (
        local("__event"),
        local("__error"),
        local("__stored"),
        local("__decoded"),
    );
    let result = quote!(::cqrs::__private::core::result::Result);

    let events = input.events();
    let old_types = events.iter().flat_map(|(_, event)| {
        event.upcasts.iter().map(|step| {
            let (name, version) = (event.old_name(step), &step.from.value);
            quote!(::cqrs::EventType::new(#name, #version))
        })
    });
    let event_types = events
        .iter()
        .map(|(_, event)| {
            let (name, version) = (&event.name, &event.version);
            quote!(::cqrs::EventType::new(#name, #version))
        })
        .chain(old_types);
    // `decode` of an old (name, version): through `decode_all`, which runs the chain.
    let old_arms: Vec<TokenStream> = events
        .iter()
        .flat_map(|(_, event)| {
            event.upcasts.iter().map(|step| {
                let (name, version) = (event.old_name(step), &step.from.value);
                quote!((#name, #version))
            })
        })
        .collect();
    let decode_old = if old_arms.is_empty() {
        TokenStream::new()
    } else {
        quote! {
            #(#old_arms)|* => {
                let #decoded_var = <Self as ::cqrs::DomainEvent>::decode_all(#type_arg, #version_arg, #payload_arg)?;
                return match <[Self; 1] as ::cqrs::__private::core::convert::TryFrom<::cqrs::__private::std::vec::Vec<Self>>>::try_from(#decoded_var) {
                    #result::Ok([#event_var]) => #result::Ok(#event_var),
                    #result::Err(#decoded_var) => #result::Err(::cqrs::__private::not_one_event(#type_arg, #version_arg, #decoded_var.len())),
                };
            }
        }
    };
    let decode_all = decode_all(&events, &local, &result);

    let (name_body, version_body, decode_body) = match &input.shape {
        Shape::Struct(_) => {
            let Some((_, event)) = events.first() else {
                return TokenStream::new();
            };
            let (name, version) = (&event.name, &event.version);
            let decode = quote! {
                match (#type_arg, #version_arg) {
                    (#name, #version) => {}
                    #decode_old
                    _ => return #result::Err(::cqrs::DecodeError::UnknownEventType),
                }
                match ::cqrs::__private::deserialize_event::<Self>(#payload_arg) {
                    #result::Ok(#event_var) => #result::Ok(#event_var),
                    #result::Err(#error_var) => #result::Err(::cqrs::DecodeError::MalformedPayload(#error_var)),
                }
            };
            (quote!(#name), quote!(#version), decode)
        }
        Shape::Enum(_) => {
            let names = events.iter().map(|(variant, event)| {
                let name = &event.name;
                quote!(Self::#variant { .. } => #name,)
            });
            let versions = events.iter().map(|(variant, event)| {
                let version = &event.version;
                quote!(Self::#variant { .. } => #version,)
            });
            let stored = events.iter().map(|(_, event)| {
                let (name, version) = (&event.name, &event.version);
                quote!((#name, #version) => ::cqrs::EventType::new(#name, #version),)
            });
            let decoded = events.iter().map(|(variant, event)| {
                let (name, version) = (&event.name, &event.version);
                quote!(Self::#variant { .. } => ::cqrs::EventType::new(#name, #version),)
            });
            let decode = quote! {
                let #stored_var: ::cqrs::EventType = match (#type_arg, #version_arg) {
                    #(#stored)*
                    #decode_old
                    _ => return #result::Err(::cqrs::DecodeError::UnknownEventType),
                };
                let #event_var: Self =
                    match ::cqrs::__private::deserialize_event::<Self>(#payload_arg) {
                        #result::Ok(#event_var) => #event_var,
                        #result::Err(#error_var) => {
                            return #result::Err(::cqrs::DecodeError::MalformedPayload(#error_var));
                        }
                    };
                let #decoded_var: ::cqrs::EventType = match &#event_var {
                    #(#decoded)*
                };
                if #decoded_var != #stored_var {
                    return #result::Err(::cqrs::__private::variant_mismatch(#stored_var, #decoded_var));
                }
                #result::Ok(#event_var)
            };
            (
                quote!(match self { #(#names)* }),
                quote!(match self { #(#versions)* }),
                decode,
            )
        }
    };

    quote! {
        #[automatically_derived]
        impl #impl_generics ::cqrs::DomainEvent for #ident #ty_generics #where_clause {
            const EVENT_TYPES: &'static [::cqrs::EventType] = &[#(#event_types),*];

            fn persisted_event_name(&self) -> &'static #str_ty {
                #name_body
            }

            fn persisted_event_version(&self) -> &'static #str_ty {
                #version_body
            }

            fn decode(
                #type_arg: &#str_ty,
                #version_arg: &#str_ty,
                #payload_arg: &::cqrs::Payload,
            ) -> #result<Self, ::cqrs::DecodeError> {
                #decode_body
            }

            #decode_all
        }
    }
}

/// `decode_all` for a type with upcast steps (none otherwise: the trait's default is right).
/// Each old (name, version) enters its event's chain; the chain is a loop over versions that
/// the compile-time checks guarantee ends at the current version.
fn decode_all(
    events: &[(Option<&Ident>, &Event)],
    local: &dyn Fn(&str) -> Ident,
    result: &TokenStream,
) -> TokenStream {
    if events.iter().all(|(_, event)| event.upcasts.is_empty()) {
        return TokenStream::new();
    }
    let str_ty = quote!(::cqrs::__private::core::primitive::str);
    let vec = quote!(::cqrs::__private::std::vec::Vec);
    let (type_arg, version_arg, payload_arg) = (
        local("__event_type"),
        local("__event_version"),
        local("__payload"),
    );
    let (at, current_payload, events_var) = (local("__at"), local("__current"), local("__events"));
    let chains = events.iter().filter(|(_, event)| !event.upcasts.is_empty()).map(|(_, event)| {
        let (name, version) = (&event.name, &event.version);
        let step_body = |step: &Upcast| {
            let path = &step.path;
            let to = step.to.as_ref().map_or(version, |to| &to.value);
            match (step.kind, to == version) {
                (StepKind::Typed, true) => quote! {
                    return #result::Ok(::cqrs::__private::std::vec![
                        ::cqrs::__private::typed_last::<_, Self, _>(
                            &#current_payload,
                            #path,
                            ::cqrs::EventType::new(#name, #version),
                        )?
                    ]);
                },
                (StepKind::Typed, false) => quote! {
                    #current_payload = ::cqrs::__private::typed_step(&#current_payload, #path)?;
                    #to
                },
                (StepKind::Raw, _) => quote! {
                    match ::cqrs::__private::raw_step(
                        ::cqrs::__private::core::mem::take(&mut #current_payload),
                        #path,
                    )? {
                        ::cqrs::__private::RawOutcome::Next(#events_var) => {
                            #current_payload = #events_var;
                            #to
                        }
                        ::cqrs::__private::RawOutcome::Replaced(#events_var) => {
                            return ::cqrs::__private::redecode::<Self>(#events_var);
                        }
                    }
                },
            }
        };
        // The steps of the event's own name, keyed by version: where a step's `to` leads.
        let own = event
            .upcasts
            .iter()
            .filter(|step| event.old_name(step) == event.name)
            .map(|step| {
                let from = &step.from.value;
                let body = step_body(step);
                quote!(#from => { #body })
            })
            .collect::<Vec<_>>();
        let entries = event.upcasts.iter().map(|step| {
            let (old_name, from) = (event.old_name(step), &step.from.value);
            let body = step_body(step);
            quote! {
                (#old_name, #from) => {
                    let mut #current_payload: ::cqrs::__private::serde_json::Value =
                        ::cqrs::__private::payload_value(#payload_arg)?;
                    let mut #at: &#str_ty = { #body };
                    loop {
                        #at = match #at {
                            #(#own)*
                            _ => {
                                return #result::Ok(::cqrs::__private::std::vec![
                                    ::cqrs::__private::decode_value::<Self>(#name, #version, &#current_payload)?
                                ]);
                            }
                        };
                    }
                }
            }
        });
        quote!(#(#entries)*)
    });
    quote! {
        #[allow(
            unreachable_code,
            unused_mut,
            unused_assignments,
            clippy::never_loop,
            clippy::diverging_sub_expression
        )]
        fn decode_all(
            #type_arg: &#str_ty,
            #version_arg: &#str_ty,
            #payload_arg: &::cqrs::Payload,
        ) -> #result<#vec<Self>, ::cqrs::DecodeError> {
            match (#type_arg, #version_arg) {
                #(#chains)*
                _ => #result::Ok(::cqrs::__private::std::vec![
                    <Self as ::cqrs::DomainEvent>::decode(#type_arg, #version_arg, #payload_arg)?
                ]),
            }
        }
    }
}
