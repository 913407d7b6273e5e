//! Derive macros for `cqrs`. Use them through the `cqrs` crate.
//!
//! Interim implementation: the full one (checks, defaults, errors on exact tokens) replaces it.
use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, LitStr};

/// Derives `cqrs::DomainEvent` from `#[event(name = "..", version = "..")]` on each variant.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn read(attrs: &[syn::Attribute], default_name: String) -> syn::Result<(String, String)> {
    let mut name = default_name;
    let mut version = "1".to_owned();
    for attr in attrs.iter().filter(|a| a.path().is_ident("event")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                name = meta.value()?.parse::<LitStr>()?.value();
            } else if meta.path.is_ident("version") {
                version = meta.value()?.parse::<LitStr>()?.value();
            } else {
                return Err(meta.error("expected `name` or `version`"));
            }
            Ok(())
        })?;
    }
    Ok((name, version))
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let ident = &input.ident;
    let (ig, tg, wc) = input.generics.split_for_impl();
    let mut arms_n = Vec::new();
    let mut arms_v = Vec::new();
    let mut types = Vec::new();
    match &input.data {
        Data::Enum(e) => {
            for v in &e.variants {
                let (n, ver) = read(&v.attrs, v.ident.to_string())?;
                let vi = &v.ident;
                arms_n.push(quote!(Self::#vi { .. } => #n));
                arms_v.push(quote!(Self::#vi { .. } => #ver));
                types.push(quote!(::cqrs::EventType::new(#n, #ver)));
            }
        }
        Data::Struct(_) => {
            let (n, ver) = read(&input.attrs, ident.to_string())?;
            arms_n.push(quote!(_ => #n));
            arms_v.push(quote!(_ => #ver));
            types.push(quote!(::cqrs::EventType::new(#n, #ver)));
        }
        Data::Union(_) => return Err(syn::Error::new_spanned(ident, "unions are not supported")),
    }
    Ok(quote! {
        #[automatically_derived]
        impl #ig ::cqrs::DomainEvent for #ident #tg #wc {
            const EVENT_TYPES: &'static [::cqrs::EventType] = &[#(#types),*];
            fn persisted_event_name(&self) -> &'static str { match self { #(#arms_n,)* } }
            fn persisted_event_version(&self) -> &'static str { match self { #(#arms_v,)* } }
        }
    })
}
