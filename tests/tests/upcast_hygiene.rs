//! The code generated for `upcast(..)` steps names only `::cqrs::...` paths: it compiles in a
//! module that shadows the prelude and common crate names, and still decodes old versions.

#![allow(dead_code, non_camel_case_types, unused_macros, clippy::all)]

use ::serde as real_serde;

mod hygiene {
    use super::real_serde;

    struct Result;
    struct Option;
    struct String;
    struct Vec;
    struct Box;
    struct Clone;
    struct Value;
    struct Upcasted;
    struct UpcastEvent;
    struct EventType;
    struct DecodeError;
    struct DomainEvent;
    struct Ok;
    struct Err;
    struct Some;
    struct None;
    mod serde {}
    mod serde_json {}
    mod core {}
    mod std {}
    mod cqrs {}
    macro_rules! vec {
        ($($t:tt)*) => {
            compile_error!("the caller's `vec!` was used")
        };
    }

    #[derive(real_serde::Deserialize)]
    pub struct OpenedV1 {
        owner: ::std::string::String,
    }

    pub fn opened_v1(old: OpenedV1) -> Event {
        Event::Opened {
            owner: old.owner,
            vip: false,
        }
    }

    pub fn closed_v1(
        _payload: ::serde_json::Value,
    ) -> ::std::result::Result<::cqrs::Upcasted, ::cqrs::DecodeError> {
        ::std::result::Result::Ok(::cqrs::Upcasted::dropped())
    }

    #[derive(
        ::std::fmt::Debug,
        ::std::clone::Clone,
        PartialEq,
        real_serde::Serialize,
        real_serde::Deserialize,
        ::cqrs::DomainEvent,
    )]
    #[serde(tag = "type")]
    pub enum Event {
        #[event(
            version = "2",
            upcast(from = "1", with = opened_v1),
            upcast(name = "Closed", from = "1", raw = closed_v1)
        )]
        Opened {
            owner: ::std::string::String,
            vip: bool,
        },
    }
}

#[test]
fn upcast_code_is_hygienic() {
    use cqrs::DomainEvent;
    let old: cqrs::Payload = serde_json::json!({"type": "Opened", "owner": "ada"}).into();
    assert_eq!(
        hygiene::Event::decode("Opened", "1", &old).unwrap(),
        hygiene::Event::Opened {
            owner: "ada".into(),
            vip: false
        }
    );
    assert!(hygiene::Event::decode_all("Closed", "1", &old)
        .unwrap()
        .is_empty());
}
