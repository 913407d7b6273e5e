//! Stub impls emitted beside `compile_error!` so one mistake in an attribute does not cascade
//! into "trait not implemented" errors wherever the type is used (thiserror `fallback.rs`).

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

use crate::expand::domain_event::where_clause;

/// `impl DomainEvent` whose methods are never run: the crate does not compile anyway.
pub fn domain_event(input: &DeriveInput) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, _) = input.generics.split_for_impl();
    let where_clause = where_clause(input.ident.clone(), &input.generics);
    quote! {
        #[automatically_derived]
        impl #impl_generics ::cqrs::DomainEvent for #ident #ty_generics #where_clause {
            fn persisted_event_name(&self) -> &'static ::cqrs::__private::core::primitive::str {
                ::cqrs::__private::core::unreachable!()
            }
            fn persisted_event_version(&self) -> &'static ::cqrs::__private::core::primitive::str {
                ::cqrs::__private::core::unreachable!()
            }
        }
    }
}
