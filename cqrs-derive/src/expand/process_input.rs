//! `#[derive(ProcessInput)]` on an enum with one variant per aggregate type a process
//! manager listens to.
//!
//! Each variant holds one field: the aggregate's event type. The variant's name is the
//! aggregate type's path unless `#[input(aggregate = Path)]` names another. The generated
//! `decode` picks the variant whose aggregate's `NAME` is the stored event's aggregate type
//! and decodes the payload with the aggregate's `Events` type (a field of another type is a
//! type error at the field).

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Meta, Path};

use crate::ctxt::Ctxt;

/// One variant: its name, its field's type and the aggregate it decodes from.
struct Variant<'a> {
    ident: &'a syn::Ident,
    field: &'a syn::Type,
    aggregate: Path,
}

/// The impl, or the errors beside a stub impl (so that a mistake is reported once, at its
/// token, and not again at every use of the type).
pub fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::new();
    let variants = read(&mut cx, input);
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let body = match &variants {
        Some(variants) if cx_is_clean(&cx) => {
            let arms = variants.iter().map(|v| {
                let ident = v.ident;
                let aggregate = &v.aggregate;
                let field = v.field;
                // The field must be the aggregate's event type: a mismatch is reported at
                // the field.
                let wrap = quote_spanned! {field.span()=> #name::#ident(envelope.event)};
                quote! {
                    if aggregate_type == <#aggregate as ::cqrs::Aggregate>::NAME {
                        return ::cqrs::__private::core::result::Result::Ok(
                            event
                                .decode_all::<<#aggregate as ::cqrs::Aggregate>::Events>()?
                                .into_iter()
                                .map(|envelope| #wrap)
                                .collect(),
                        );
                    }
                }
            });
            quote! {
                let aggregate_type = event.aggregate_type.as_str();
                #(#arms)*
                ::cqrs::__private::core::result::Result::Ok(::cqrs::__private::std::vec::Vec::new())
            }
        }
        _ => quote! {
            let _ = event;
            ::cqrs::__private::core::result::Result::Ok(::cqrs::__private::std::vec::Vec::new())
        },
    };
    let errors = match cx.check() {
        Ok(()) => TokenStream::new(),
        Err(error) => error.to_compile_error(),
    };
    quote! {
        #errors
        #[automatically_derived]
        impl #impl_generics ::cqrs::ProcessInput for #name #ty_generics #where_clause {
            fn decode(
                event: &::cqrs::PersistableDomainEvent,
            ) -> ::cqrs::__private::core::result::Result<
                ::cqrs::__private::std::vec::Vec<Self>,
                ::cqrs::CQRSError,
            > {
                #body
            }
        }
    }
}

fn cx_is_clean(cx: &Ctxt) -> bool {
    cx.is_empty()
}

fn read<'a>(cx: &mut Ctxt, input: &'a DeriveInput) -> Option<Vec<Variant<'a>>> {
    let Data::Enum(data) = &input.data else {
        cx.error_spanned_by(
            &input.ident,
            "`#[derive(ProcessInput)]` needs an enum with one variant per aggregate type, \
             each holding that aggregate's event type",
        );
        return None;
    };
    if data.variants.is_empty() {
        cx.error_spanned_by(
            &input.ident,
            "`#[derive(ProcessInput)]` needs at least one variant",
        );
        return None;
    }
    let mut variants = Vec::new();
    for variant in &data.variants {
        let field = match &variant.fields {
            Fields::Unnamed(fields) if fields.unnamed.len() == 1 => &fields.unnamed[0].ty,
            _ => {
                cx.error_spanned_by(
                    variant,
                    format!(
                        "variant `{}` must hold one field, the aggregate's event type: `{}(EventType)`",
                        variant.ident, variant.ident
                    ),
                );
                continue;
            }
        };
        let mut aggregate: Path = variant.ident.clone().into();
        for attr in &variant.attrs {
            if !attr.path().is_ident("input") {
                continue;
            }
            match &attr.meta {
                Meta::List(_) => {
                    let parsed = attr.parse_nested_meta(|meta| {
                        if meta.path.is_ident("aggregate") {
                            aggregate = meta.value()?.parse()?;
                            Ok(())
                        } else {
                            Err(meta.error(format!(
                                "unknown key `{}`: `#[input(aggregate = Path)]` is the only one",
                                meta.path.to_token_stream()
                            )))
                        }
                    });
                    if let Err(error) = parsed {
                        cx.syn_error(error);
                    }
                }
                other => cx.error_spanned_by(
                    other,
                    "write `#[input(aggregate = Path)]`, naming the aggregate type whose events this variant holds",
                ),
            }
        }
        variants.push(Variant {
            ident: &variant.ident,
            field,
            aggregate,
        });
    }
    Some(variants)
}
