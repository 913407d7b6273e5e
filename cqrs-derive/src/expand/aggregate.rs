//! `#[aggregate(name = "...")]` on `impl Aggregate for X { ... }`.
//!
//! It writes `const NAME` from the attribute (default: the type's name) and, for each of
//! `type State`, `type Commands`, `type Events` and `type Errors` the block leaves out, reads
//! the type from `handle_command`'s signature:
//! `async fn (&self, id, state: &State, command: Commands) -> Result<Vec<Events>, Errors>`
//! (or `fn .. -> impl Future<Output = Result<Vec<Events>, Errors>> + Send`).

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::{FnArg, GenericArgument, ImplItem, ItemImpl, PathArguments, ReturnType, Signature, Type};

use crate::attr::{checked, Checked, KeyReader, Value};
use crate::ctxt::Ctxt;
use crate::expand::impl_block;
use crate::rules;
use crate::symbol::{AGGREGATE, AGGREGATE_KEYS, NAME};

/// The rewritten impl block, or the errors beside the best impl that can be given.
pub fn attribute(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut cx = Ctxt::new();
    let name = read_args(&mut cx, args);
    let Some(mut item_impl) = impl_block::parse(&mut cx, AGGREGATE, "Aggregate", item.clone())
    else {
        return with_errors(cx, item);
    };

    let name = match name {
        Value::Given(name) => Some(name.value),
        Value::Refused => None,
        Value::Absent => default_name(&mut cx, &item_impl),
    };
    if let Some(existing) = impl_block::find_const(&item_impl, "NAME") {
        cx.error_spanned_by(
            &existing.ident,
            "`NAME` is written by `#[aggregate]`: put the name in `#[aggregate(name = \"...\")]` \
             and remove this line",
        );
    } else {
        // When the name was refused, an empty one keeps the impl complete: the error above
        // already stops the build.
        let name = name.unwrap_or_default();
        item_impl.items.insert(
            0,
            syn::parse_quote!(const NAME: &'static ::cqrs::__private::core::primitive::str = #name;),
        );
    }
    infer_types(&mut cx, &mut item_impl);

    let item = item_impl.into_token_stream();
    with_errors(cx, item)
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

fn read_args(cx: &mut Ctxt, args: TokenStream) -> Value<Checked> {
    let mut name = Value::Absent;
    let mut reader = KeyReader::new(cx, AGGREGATE, AGGREGATE_KEYS);
    let parser = syn::meta::parser(|meta| {
        let Some(key) = reader.key(&meta)? else {
            return Ok(());
        };
        if key == NAME {
            name = Value::Refused;
            if let Some(lit) = reader.string(&meta, NAME, "bank_account")? {
                if let Some(value) = checked(reader.cx(), lit, rules::check_aggregate_name) {
                    name = Value::Given(value);
                }
            }
        }
        Ok(())
    });
    if let Err(error) = syn::parse::Parser::parse2(parser, args) {
        reader.cx().syn_error(error);
    }
    name
}

/// The type's own name, when it is a valid aggregate name.
fn default_name(cx: &mut Ctxt, item_impl: &ItemImpl) -> Option<String> {
    let Some(ident) = impl_block::self_ident(&item_impl.self_ty) else {
        cx.error_spanned_by(
            &item_impl.self_ty,
            "this type has no name to use as the aggregate name; give one with \
             `#[aggregate(name = \"...\")]`",
        );
        return None;
    };
    let default = syn::ext::IdentExt::unraw(ident).to_string();
    match rules::check_aggregate_name(&default) {
        Ok(()) => Some(default),
        Err(reason) => {
            cx.error_spanned_by(
                ident,
                format!(
                    "the aggregate name defaults to the type's name, and {reason}; give one \
                     with `#[aggregate(name = \"...\")]`"
                ),
            );
            None
        }
    }
}

/// Fills in the associated types the block leaves out from `handle_command`'s signature.
fn infer_types(cx: &mut Ctxt, item_impl: &mut ItemImpl) {
    let missing: Vec<&str> = ["State", "Commands", "Events", "Errors"]
        .into_iter()
        .filter(|name| !impl_block::has_type(item_impl, name))
        .collect();
    if missing.is_empty() {
        return;
    }
    let Some(sig) = item_impl.items.iter().find_map(|item| match item {
        ImplItem::Fn(method) if method.sig.ident == "handle_command" => Some(method.sig.clone()),
        _ => None,
    }) else {
        // Without `handle_command` the compiler reports every missing item itself.
        return;
    };
    let found = SignatureTypes::read(&sig);
    for name in missing {
        let (ty, at): (Option<&Type>, TokenStream) = match name {
            "State" => (found.state.as_ref(), found.state_at.clone()),
            "Commands" => (found.commands.as_ref(), found.commands_at.clone()),
            "Events" => (found.events.as_ref(), found.output_at.clone()),
            _ => (found.errors.as_ref(), found.output_at.clone()),
        };
        match ty {
            Some(ty) if !impl_block::mentions_self(ty.to_token_stream()) => {
                let ident = syn::Ident::new(name, proc_macro2::Span::call_site());
                item_impl
                    .items
                    .insert(1, syn::parse_quote!(type #ident = #ty;));
            }
            _ => cx.error_spanned_by(
                at,
                format!(
                    "`#[aggregate]` cannot read `{name}` from `handle_command`: write \
                     `async fn handle_command(&self, id: Uuid, state: &State, command: Commands) \
                     -> Result<Vec<Events>, Errors>` with concrete types (no `Self::..`, no \
                     alias of `Result`), or declare `type {name} = ...;` in the impl"
                ),
            ),
        }
    }
}

/// The types `handle_command`'s signature names, with the tokens to point at when one cannot
/// be read.
struct SignatureTypes {
    state: Option<Type>,
    state_at: TokenStream,
    commands: Option<Type>,
    commands_at: TokenStream,
    events: Option<Type>,
    errors: Option<Type>,
    output_at: TokenStream,
}

impl SignatureTypes {
    fn read(sig: &Signature) -> Self {
        let args: Vec<&Type> = sig
            .inputs
            .iter()
            .filter_map(|arg| match arg {
                FnArg::Typed(typed) => Some(&*typed.ty),
                FnArg::Receiver(_) => None,
            })
            .collect();
        let whole = sig.to_token_stream();
        let state_at = args
            .get(1)
            .map_or_else(|| whole.clone(), |ty| ty.to_token_stream());
        let commands_at = args
            .get(2)
            .map_or_else(|| whole.clone(), |ty| ty.to_token_stream());
        let state = match args.get(1) {
            Some(Type::Reference(reference)) if reference.mutability.is_none() => {
                Some((*reference.elem).clone())
            }
            _ => None,
        };
        let commands = args.get(2).map(|ty| (*ty).clone());
        let (output_at, output) = match &sig.output {
            ReturnType::Type(_, ty) => (ty.to_token_stream(), Some(&**ty)),
            ReturnType::Default => (sig.ident.to_token_stream(), None),
        };
        let mut events = None;
        let mut errors = None;
        // `async fn .. -> R`, or `fn .. -> impl Future<Output = R> + Send`.
        let result = if sig.asyncness.is_some() {
            output
        } else {
            output.and_then(future_output)
        };
        if let Some([ok, err]) = result.and_then(|ty| generic_args(ty, "Result")).as_deref() {
            errors = Some(err.clone());
            if let Some([event]) = generic_args(ok, "Vec").as_deref() {
                events = Some(event.clone());
            }
        }
        SignatureTypes {
            state,
            state_at,
            commands,
            commands_at,
            events,
            errors,
            output_at,
        }
    }
}

/// `R` in `impl Future<Output = R> + ..`.
fn future_output(ty: &Type) -> Option<&Type> {
    let Type::ImplTrait(impl_trait) = ty else {
        return None;
    };
    impl_trait.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let segment = bound.path.segments.last()?;
        if segment.ident != "Future" {
            return None;
        }
        let PathArguments::AngleBracketed(args) = &segment.arguments else {
            return None;
        };
        args.args.iter().find_map(|arg| match arg {
            GenericArgument::AssocType(assoc) if assoc.ident == "Output" => Some(&assoc.ty),
            _ => None,
        })
    })
}

/// The type arguments of `ty` when its last path segment is `wanted` (`Result<A, B>` ->
/// `[A, B]`).
fn generic_args(ty: &Type, wanted: &str) -> Option<Vec<Type>> {
    let Type::Path(path) = ty else {
        return None;
    };
    let segment = path.path.segments.last()?;
    if segment.ident != wanted {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &segment.arguments else {
        return None;
    };
    args.args
        .iter()
        .map(|arg| match arg {
            GenericArgument::Type(ty) => Some(ty.clone()),
            _ => None,
        })
        .collect()
}
