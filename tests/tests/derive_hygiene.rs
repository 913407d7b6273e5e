//! The derive and attribute macros' generated code names only `::cqrs::...` paths: it still
//! compiles in a module that shadows the prelude and common crate names.
//!
//! Like serde's, the generated code's local variables start with `__`; a caller's unit struct
//! or const with such a name would be matched by a pattern, so those names are reserved.

#![allow(dead_code, non_camel_case_types, clippy::all)]

use ::serde as real_serde;

mod hygiene {
    use super::real_serde;

    // Everything the generated code could wrongly pick up from the caller's scope.
    struct Result;
    struct Option;
    struct String;
    struct Vec;
    struct Box;
    struct Clone;
    struct Debug;
    struct Send;
    struct Sync;
    struct Value;
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
    mod uuid {}

    #[derive(
        ::std::fmt::Debug,
        ::std::clone::Clone,
        PartialEq,
        real_serde::Serialize,
        real_serde::Deserialize,
        ::cqrs::DomainEvent,
    )]
    pub enum Event {
        #[event(name = "Opened", version = "2")]
        Opened {
            owner: ::std::string::String,
        },
        Deposited(u64),
        Closed,
    }

    #[derive(
        ::std::fmt::Debug,
        ::std::clone::Clone,
        PartialEq,
        real_serde::Serialize,
        real_serde::Deserialize,
        ::cqrs::DomainEvent,
    )]
    #[event(name = "Single")]
    pub struct Single {
        pub value: u64,
    }

    #[derive(
        ::std::fmt::Debug,
        ::std::clone::Clone,
        PartialEq,
        real_serde::Serialize,
        real_serde::Deserialize,
        ::cqrs::DomainEvent,
    )]
    pub enum Generic<T> {
        Held(T),
    }

    #[derive(
        ::std::fmt::Debug, ::std::clone::Clone, real_serde::Serialize, real_serde::Deserialize,
    )]
    pub enum Command {
        Open,
    }

    #[derive(::std::fmt::Debug, ::std::default::Default)]
    pub struct Account;

    #[derive(
        ::std::fmt::Debug,
        ::std::default::Default,
        ::std::clone::Clone,
        real_serde::Serialize,
        real_serde::Deserialize,
    )]
    pub struct AccountView {
        pub opened: bool,
    }

    #[::cqrs::aggregate(name = "hygienic")]
    impl ::cqrs::Aggregate for Account {
        async fn handle_command(
            &self,
            _id: ::uuid::Uuid,
            _state: &(),
            _command: Command,
        ) -> ::std::result::Result<::std::vec::Vec<Event>, ::cqrs::CQRSError> {
            ::std::result::Result::Ok(::std::vec![Event::Closed])
        }

        fn handle_event(&self, _state: &mut (), _event: &Event) {}
    }

    #[::cqrs::view(table = "hygienic_view")]
    impl ::cqrs::View<Account> for AccountView {
        fn handle_event(
            &mut self,
            _envelope: &::cqrs::EventEnvelope<Event>,
        ) -> ::std::result::Result<(), ::cqrs::CQRSError> {
            self.opened = true;
            ::std::result::Result::Ok(())
        }
    }
}

#[test]
fn generated_code_compiles_and_works_under_shadowed_names() {
    use cqrs::{Aggregate, DomainEvent, View};
    use hygiene::{Account, AccountView, Event, Generic, Single};

    let event = Event::Opened {
        owner: "ada".to_owned(),
    };
    assert_eq!(event.persisted_event_name(), "Opened");
    assert_eq!(Event::Deposited(1).persisted_event_name(), "Deposited");
    let payload = event.to_payload().unwrap();
    assert_eq!(Event::decode("Opened", "2", &payload).unwrap(), event);
    assert!(Event::decode("Opened", "1", &payload).is_err());
    assert_eq!(Single::EVENT_TYPES, &[cqrs::EventType::new("Single", "1")]);
    assert_eq!(Generic::<u8>::Held(1).persisted_event_name(), "Held");
    assert_eq!(Account::NAME, "hygienic");
    assert_eq!(<AccountView as View<Account>>::TABLE_NAME, "hygienic_view");
    assert_eq!(<AccountView as View<Account>>::VERSION, 1);
}
