//! `#[derive(DomainEvent)]`.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{DeriveInput, Generics, Ident, WhereClause};

use crate::ast::{Input, Shape};
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
    let event_types = events.iter().map(|(_, event)| {
        let (name, version) = (&event.name, &event.version);
        quote!(::cqrs::EventType::new(#name, #version))
    });

    let (name_body, version_body, decode_body) = match &input.shape {
        Shape::Struct(_) => {
            let Some((_, event)) = events.first() else {
                return TokenStream::new();
            };
            let (name, version) = (&event.name, &event.version);
            let decode = quote! {
                match (#type_arg, #version_arg) {
                    (#name, #version) => {}
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
                #payload_arg: &::cqrs::__private::serde_json::Value,
            ) -> #result<Self, ::cqrs::DecodeError> {
                #decode_body
            }
        }
    }
}
