//! The macros' expansion functions on inputs no well-behaved user writes: they report errors
//! and never panic. (trybuild in `tests/ui/` pins the messages; this covers many more inputs.)

use proc_macro2::TokenStream;
use quote::quote;

use crate::expand;

fn derive(tokens: TokenStream) -> String {
    let input = syn::parse2(tokens).expect("test input is a valid item");
    expand::domain_event::derive(&input).to_string()
}

fn errors_in(expanded: &str) -> usize {
    expanded.matches("compile_error").count()
}

#[test]
fn a_valid_enum_expands_to_an_impl_without_errors() {
    let out = derive(quote! {
        enum E {
            #[event(name = "A", version = "2")]
            A,
            B(u8),
            C { x: u8 },
        }
    });
    assert_eq!(errors_in(&out), 0, "{out}");
    assert!(out.contains("automatically_derived"), "{out}");
    assert!(out.contains("\"A\""), "{out}");
    assert!(out.contains("\"2\""), "{out}");
}

#[test]
fn three_mistakes_give_three_errors_and_a_stub() {
    let out = derive(quote! {
        enum E {
            #[event(nme = "A")]
            A,
            #[event(version = "0")]
            B,
            #[event(name = "")]
            C,
        }
    });
    assert_eq!(errors_in(&out), 3, "{out}");
    assert!(
        out.contains("DomainEvent for E"),
        "stub impl missing: {out}"
    );
}

#[test]
fn upcast_steps_expand_to_decode_all_and_old_pairs() {
    let out = derive(quote! {
        enum E {
            #[event(version = "3", upcast(from = "1", to = "2", with = a), upcast(from = "2", raw = b))]
            A,
            #[event(upcast(name = "Gone", from = "4", raw = c))]
            B,
        }
    });
    assert_eq!(errors_in(&out), 0, "{out}");
    assert!(out.contains("fn decode_all"), "{out}");
    assert!(out.contains("\"Gone\""), "{out}");
}

#[test]
fn every_chain_mistake_is_reported_once() {
    for (input, expected) in [
        // gap
        (
            quote!(
                enum E {
                    #[event(version = "3", upcast(from = "1", raw = f))]
                    A,
                }
            ),
            1,
        ),
        // duplicate, cycle, missing target
        (
            quote!(
                enum E {
                    #[event(version = "2", upcast(from = "1", raw = f), upcast(from = "1", raw = f))]
                    A,
                }
            ),
            1,
        ),
        (
            quote!(
                enum E {
                    #[event(version = "4", upcast(from = "1", raw = f), upcast(from = "2", to = "3", raw = f), upcast(from = "3", to = "2", raw = f))]
                    A,
                }
            ),
            1,
        ),
        (
            quote!(
                enum E {
                    #[event(version = "2", upcast(from = "1", to = "9", raw = f))]
                    A,
                }
            ),
            1,
        ),
        // a self-loop is a cycle
        (
            quote!(
                enum E {
                    #[event(version = "3", upcast(from = "1", raw = f), upcast(from = "2", to = "2", raw = f))]
                    A,
                }
            ),
            1,
        ),
        // two events read the same old pair
        (
            quote!(
                enum E {
                    #[event(version = "2", upcast(name = "X", from = "1", raw = f))]
                    A,
                    #[event(upcast(name = "X", from = "1", raw = f))]
                    B,
                }
            ),
            1,
        ),
        // three malformed steps, three errors
        (
            quote!(
                enum E {
                    #[event(version = "2", upcast, upcast(from = 1, raw = f), upcast(from = "1", with = 3))]
                    A,
                }
            ),
            3,
        ),
    ] {
        let out = derive(input);
        assert_eq!(errors_in(&out), expected, "{out}");
    }
}

#[test]
fn unions_and_empty_enums_get_an_error_and_no_impl() {
    for input in [
        quote!(union U { a: u8 }),
        quote!(
            enum E {}
        ),
    ] {
        let out = derive(input);
        assert_eq!(errors_in(&out), 1, "{out}");
        assert!(!out.contains("DomainEvent for"), "{out}");
    }
}

#[test]
fn odd_derive_inputs_never_panic() {
    let inputs = [
        quote!(
            struct S;
        ),
        quote!(
            struct S(u8, u8);
        ),
        quote!(
            struct S<'a, T: 'a, const N: usize>(&'a T);
        ),
        quote!(
            #[event]
            struct S;
        ),
        quote!(
            #[event = "x"]
            struct S;
        ),
        quote!(
            #[event()]
            struct S;
        ),
        quote!(
            #[event(,)]
            struct S;
        ),
        quote!(
            #[event(name = "a" version = "1")]
            struct S;
        ),
        quote!(
            #[event(name = "a",, version = "1")]
            struct S;
        ),
        quote!(
            #[event(name = concat!("a", "b"))]
            struct S;
        ),
        quote!(
            #[event(name = b"bytes")]
            struct S;
        ),
        quote!(
            #[event(name = 'c')]
            struct S;
        ),
        quote!(
            #[event(name = -1)]
            struct S;
        ),
        quote!(
            #[event(version = 1.0)]
            struct S;
        ),
        quote!(
            #[event(version = "99999999999999999999999")]
            struct S;
        ),
        quote!(
            #[event(name = "\u{0}")]
            struct S;
        ),
        quote!(
            #[event(name = "é")]
            struct S;
        ),
        quote!(
            #[event(a::b::c = 1)]
            struct S;
        ),
        quote!(
            #[event(name(x))]
            struct S;
        ),
        quote!(
            #[event(name = "a", name = "b", name = "c")]
            struct S;
        ),
        quote!(
            #[event(unknown(nested(deeply = [1, 2, 3])))]
            struct S;
        ),
        quote!(
            struct r#type;
        ),
        quote!(
            enum E {
                #[event(name = "A")]
                A,
                #[event(name = "A")]
                B,
                #[event(name = "A")]
                C,
            }
        ),
        quote!(
            enum E {
                A = 1,
                B = 2,
            }
        ),
        quote!(
            enum E
            where
                Self: Sized,
            {
                A,
            }
        ),
        quote!(
            enum E<T>
            where
                T: Clone,
            {
                A(T),
            }
        ),
        quote!(
            pub(crate) enum E {
                #[doc = "x"]
                #[event(version = "3")]
                A {
                    #[event]
                    x: u8,
                },
            }
        ),
    ];
    for input in inputs {
        let _ = derive(input);
    }
}

#[test]
fn attribute_macros_never_panic() {
    let args = [
        quote!(),
        quote!(name = "ok"),
        quote!(name),
        quote!(name = ),
        quote!(= "x"),
        quote!(name = "a" name = "b"),
        quote!(name = 5),
        quote!(table = "t", version = 18446744073709551616),
        quote!(table = "t", version = -1),
        quote!(table = "t", version = 1u8),
        quote!(version = 1.5),
        quote!(x(y(z))),
        quote!("just a string"),
    ];
    let items = [
        quote!(impl Aggregate for X { fn handle_event(&self) {} }),
        quote!(
            impl<T> cqrs::Aggregate for X<T>
            where
                T: Send,
            {
                async fn handle_command(&self, id: Uuid, state: &S, c: C) -> Result<Vec<E>, Er> {
                    todo!()
                }
            }
        ),
        quote!(impl Aggregate for X {
            async fn handle_command(&self) -> Result<Vec<E>, Er> { todo!() }
        }),
        quote!(impl Aggregate for X {
            fn handle_command(&self, id: Uuid, state: &mut S, c: C) -> impl Future<Output = ()> { todo!() }
        }),
        quote!(impl Aggregate for X { async fn handle_command(self) -> Result { todo!() } }),
        quote!(impl Aggregate for X {
            async fn handle_command(&self, id: _, state: &impl Tr, c: dyn Fn() -> u8)
                -> Result<Vec<!>, <T as Tr>::E> { todo!() }
        }),
        quote!(impl Aggregate for X {
            async fn handle_command(&self, id: Uuid, state: &'a [u8], c: fn(u8) -> u8)
                -> Result<Vec<E>, Er, Extra> { todo!() }
        }),
        quote!(impl Aggregate for [u8; 4] {}),
        quote!(impl Aggregate for (A, B) {}),
        quote!(impl View<A> for V { const TABLE_NAME: &str = ""; const VERSION: u64 = 0; }),
        quote!(impl View<A> for ÜberView {}),
        quote!(impl X {}),
        quote!(impl !Aggregate for X {}),
        quote!(
            struct X;
        ),
        quote!(
            fn f() {}
        ),
        quote!(),
        quote!(not even an item),
    ];
    for arg in &args {
        for item in &items {
            let _ = expand::aggregate::attribute(arg.clone(), item.clone());
            let _ = expand::view::attribute(arg.clone(), item.clone());
        }
    }
}

#[test]
fn the_aggregate_attribute_reads_a_future_returning_handler() {
    let out = expand::aggregate::attribute(
        quote!(),
        quote!(impl Aggregate for Tab {
            fn handle_command(&self, id: Uuid, state: &TabState, command: TabCommand)
                -> impl Future<Output = Result<Vec<TabEvent>, TabError>> + Send { async { todo!() } }
        }),
    )
    .to_string();
    assert_eq!(errors_in(&out), 0, "{out}");
    assert!(out.contains("\"Tab\""), "{out}");
    assert!(out.contains("type Events = TabEvent"), "{out}");
    assert!(out.contains("type Errors = TabError"), "{out}");
}

#[test]
fn the_aggregate_attribute_reads_the_associated_types() {
    let out = expand::aggregate::attribute(
        quote!(name = "tab"),
        quote!(impl Aggregate for Tab {
            async fn handle_command(&self, id: Uuid, state: &TabState, command: TabCommand)
                -> Result<Vec<TabEvent>, TabError> { todo!() }
            fn handle_event(&self, state: &mut TabState, event: &TabEvent) {}
        }),
    )
    .to_string();
    assert_eq!(errors_in(&out), 0, "{out}");
    for expected in [
        "const NAME",
        "\"tab\"",
        "type State = TabState",
        "type Commands = TabCommand",
        "type Events = TabEvent",
        "type Errors = TabError",
    ] {
        assert!(out.contains(expected), "{expected} missing from {out}");
    }
}
