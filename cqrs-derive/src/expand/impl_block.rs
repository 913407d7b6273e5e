//! What the attribute macros placed on an `impl Trait for Type` block share: finding the
//! block, checking it implements the right trait, and inserting items into it.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::{ImplItem, ItemImpl, Type};

use crate::ctxt::Ctxt;
use crate::symbol::Symbol;

/// The `impl` block the attribute is on, if it is `impl <trait_name> for ...`; otherwise
/// the reason, at the offending token.
pub fn parse(cx: &mut Ctxt, attr: Symbol, trait_name: &str, item: TokenStream) -> Option<ItemImpl> {
    let example = format!("`#[{attr}(...)] impl {trait_name} for YourType {{ ... }}`");
    let item_impl = match syn::parse2::<ItemImpl>(item) {
        Ok(item_impl) => item_impl,
        Err(_) => {
            cx.syn_error(syn::Error::new(
                proc_macro2::Span::call_site(),
                format!("`#[{attr}]` goes on the `impl {trait_name} for ...` block: {example}"),
            ));
            return None;
        }
    };
    match &item_impl.trait_ {
        None => {
            cx.error_spanned_by(
                &item_impl.self_ty,
                format!(
                    "`#[{attr}]` goes on an `impl {trait_name} for ...` block, not on an inherent \
                     impl: {example}"
                ),
            );
            return None;
        }
        Some((_, path, _)) => {
            let is_trait = path
                .segments
                .last()
                .is_some_and(|segment| segment.ident == trait_name);
            if !is_trait {
                cx.error_spanned_by(
                    path,
                    format!(
                        "`#[{attr}]` goes on an `impl {trait_name} for ...` block, not on an impl \
                         of `{}`",
                        path.to_token_stream().to_string().replace(' ', "")
                    ),
                );
                return None;
            }
        }
    }
    Some(item_impl)
}

/// The `const <name>` the block already defines, if any.
pub fn find_const<'a>(item_impl: &'a ItemImpl, name: &str) -> Option<&'a syn::ImplItemConst> {
    item_impl.items.iter().find_map(|item| match item {
        ImplItem::Const(constant) if constant.ident == name => Some(constant),
        _ => None,
    })
}

/// Whether the block already defines `type <name>`.
pub fn has_type(item_impl: &ItemImpl, name: &str) -> bool {
    item_impl
        .items
        .iter()
        .any(|item| matches!(item, ImplItem::Type(ty) if ty.ident == name))
}

/// The implementing type's own name (`BankAccount` for `impl Aggregate for bank::BankAccount`).
pub fn self_ident(self_ty: &Type) -> Option<&syn::Ident> {
    match self_ty {
        Type::Path(path) if path.qself.is_none() => {
            path.path.segments.last().map(|segment| &segment.ident)
        }
        Type::Group(group) => self_ident(&group.elem),
        Type::Paren(paren) => self_ident(&paren.elem),
        _ => None,
    }
}

/// Whether `ty` mentions `Self` anywhere (then it cannot be copied out of the impl).
pub fn mentions_self(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|token| match token {
        proc_macro2::TokenTree::Ident(ident) => ident == "Self",
        proc_macro2::TokenTree::Group(group) => mentions_self(group.stream()),
        _ => false,
    })
}
