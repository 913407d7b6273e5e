//! `#[derive(DomainEvent)]` at run time: every shape round-trips through its stored form,
//! decoding is dispatched on (name, version), and serde attributes shape the payload but
//! never the stored name.

use cqrs::{
    CQRSError, DecodeError, DomainEvent, EventRepository, EventType, MemoryEventRepository,
    PersistableDomainEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

/// Every variant shape, explicit and default names and versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum Shapes {
    #[event(name = "UnitHappened", version = "1")]
    Unit,
    #[event(name = "NewtypeHappened", version = "2")]
    Newtype(u64),
    #[event(name = "TupleHappened")]
    Tuple(String, i32),
    #[event(version = "7")]
    Struct {
        owner: String,
        amount: u64,
    },
    Defaulted {
        note: Option<String>,
    },
    #[event(name = "bank.account-closed_v2", version = "4294967295")]
    Closed {},
    #[allow(non_camel_case_types)]
    r#type,
}

fn all_shapes() -> Vec<Shapes> {
    vec![
        Shapes::Unit,
        Shapes::Newtype(42),
        Shapes::Tuple("t".to_owned(), -3),
        Shapes::Struct {
            owner: "ada".to_owned(),
            amount: 10,
        },
        Shapes::Defaulted { note: None },
        Shapes::Closed {},
        Shapes::r#type,
    ]
}

fn stored<E: DomainEvent>(event: &E) -> PersistableDomainEvent {
    PersistableDomainEvent::new("test", Uuid::nil(), 1, event, json!(null)).unwrap()
}

fn decode_error<E: DomainEvent>(result: Result<cqrs::EventEnvelope<E>, CQRSError>) -> DecodeError {
    match result {
        Err(CQRSError::EventDecode(error)) => error.kind,
        Err(other) => panic!("expected a decode error, got {other:?}"),
        Ok(envelope) => panic!("expected a decode error, decoded {:?}", envelope.event),
    }
}

#[test]
fn names_and_versions_follow_the_attributes_and_defaults() {
    let expected = [
        ("UnitHappened", "1"),
        ("NewtypeHappened", "2"),
        ("TupleHappened", "1"),
        ("Struct", "7"),
        ("Defaulted", "1"),
        ("bank.account-closed_v2", "4294967295"),
        ("type", "1"),
    ];
    for (event, (name, version)) in all_shapes().iter().zip(expected) {
        assert_eq!(event.persisted_event_name(), name, "{event:?}");
        assert_eq!(event.persisted_event_version(), version, "{event:?}");
    }
}

#[test]
fn event_types_lists_every_pair_in_declaration_order() {
    assert_eq!(
        Shapes::EVENT_TYPES,
        &[
            EventType::new("UnitHappened", "1"),
            EventType::new("NewtypeHappened", "2"),
            EventType::new("TupleHappened", "1"),
            EventType::new("Struct", "7"),
            EventType::new("Defaulted", "1"),
            EventType::new("bank.account-closed_v2", "4294967295"),
            EventType::new("type", "1"),
        ]
    );
    // Every value the type can hold is listed.
    for event in all_shapes() {
        let pair = EventType::new(
            event.persisted_event_name(),
            event.persisted_event_version(),
        );
        assert!(Shapes::EVENT_TYPES.contains(&pair), "{pair:?}");
    }
}

#[test]
fn every_shape_round_trips_through_its_stored_form() {
    for event in all_shapes() {
        let row = stored(&event);
        assert_eq!(row.event_type, event.persisted_event_name());
        assert_eq!(row.event_version, event.persisted_event_version());
        assert_eq!(row.payload, serde_json::to_value(&event).unwrap());
        let back = row.decode::<Shapes>().unwrap();
        assert_eq!(back.event, event);
    }
}

#[tokio::test]
async fn every_shape_round_trips_through_the_memory_store() {
    let store = MemoryEventRepository::new();
    let id = Uuid::new_v4();
    let events = all_shapes();
    let rows = events
        .iter()
        .enumerate()
        .map(|(index, event)| {
            PersistableDomainEvent::new("shapes", id, index as i64 + 1, event, json!({"n": index}))
                .unwrap()
        })
        .collect();
    store.append(rows).await.unwrap();
    let loaded = store.load_events("shapes", id, 0).await.unwrap();
    let decoded: Vec<Shapes> = loaded
        .iter()
        .map(|row| row.decode::<Shapes>().unwrap().event)
        .collect();
    assert_eq!(decoded, events);
}

#[test]
fn an_unknown_name_is_a_typed_error_without_reading_the_payload() {
    let mut row = stored(&Shapes::Unit);
    row.event_type = "NoSuchEvent".into();
    assert!(matches!(
        decode_error(row.decode::<Shapes>()),
        DecodeError::UnknownEventType
    ));
    // Even a payload that is not valid for any variant: the pair is checked first.
    assert!(matches!(
        Shapes::decode("NoSuchEvent", "1", &json!({"garbage": true}).into()),
        Err(DecodeError::UnknownEventType)
    ));
}

#[test]
fn an_unknown_version_is_a_typed_error() {
    let mut row = stored(&Shapes::Newtype(1));
    row.event_version = "3".into();
    assert!(matches!(
        decode_error(row.decode::<Shapes>()),
        DecodeError::UnknownEventType
    ));
    // A name is only known with its own version.
    assert!(matches!(
        Shapes::decode("NewtypeHappened", "1", &json!({"Newtype": 1}).into()),
        Err(DecodeError::UnknownEventType)
    ));
}

#[test]
fn the_decode_error_names_the_stored_row() {
    let mut row = stored(&Shapes::Unit);
    row.event_type = "Gone".into();
    let Err(CQRSError::EventDecode(error)) = row.decode::<Shapes>() else {
        panic!("expected a decode error");
    };
    assert_eq!(error.event_type, "Gone");
    assert_eq!(error.event_version, "1");
    assert_eq!(error.aggregate_type, "test");
}

#[test]
fn a_malformed_payload_under_a_known_pair_is_malformed_payload() {
    let result = Shapes::decode("Struct", "7", &json!({"Struct": {"owner": 5}}).into());
    assert!(
        matches!(result, Err(DecodeError::MalformedPayload(_))),
        "{result:?}"
    );
}

#[test]
fn a_payload_of_another_variant_is_refused() {
    let payload = Shapes::Newtype(9).to_payload().unwrap();
    let result = Shapes::decode("TupleHappened", "1", &payload);
    let Err(DecodeError::MalformedPayload(error)) = result else {
        panic!("expected MalformedPayload, got {result:?}");
    };
    let message = error.to_string();
    assert!(message.contains("TupleHappened"), "{message}");
    assert!(message.contains("NewtypeHappened"), "{message}");
}

/// serde renames and tags change the payload, not the stored name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
enum Tagged {
    #[event(name = "AccountOpened")]
    AccountOpened {
        owner: String,
    },
    #[serde(rename = "paid-in")]
    #[event(name = "MoneyDeposited", version = "2")]
    Deposited(u64),
    Frozen,
}

#[test]
fn serde_rename_and_tag_shape_the_payload_but_not_the_stored_name() {
    let opened = Tagged::AccountOpened {
        owner: "ada".to_owned(),
    };
    let row = stored(&opened);
    assert_eq!(row.event_type, "AccountOpened");
    assert_eq!(
        row.payload,
        json!({"type": "account-opened", "data": {"owner": "ada"}})
    );
    assert_eq!(row.decode::<Tagged>().unwrap().event, opened);

    let deposited = Tagged::Deposited(5);
    let row = stored(&deposited);
    assert_eq!(
        (row.event_type.as_str(), row.event_version.as_str()),
        ("MoneyDeposited", "2")
    );
    assert_eq!(row.payload, json!({"type": "paid-in", "data": 5}));
    assert_eq!(row.decode::<Tagged>().unwrap().event, deposited);

    // The default name is the Rust variant name, not serde's renamed one.
    let row = stored(&Tagged::Frozen);
    assert_eq!(row.event_type, "Frozen");
    assert_eq!(row.payload, json!({"type": "frozen"}));
    assert_eq!(row.decode::<Tagged>().unwrap().event, Tagged::Frozen);
}

/// Internally tagged, with container-level renames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(tag = "kind", rename_all = "SCREAMING_SNAKE_CASE")]
enum Internal {
    Opened {
        owner: String,
    },
    #[event(name = "Closed", version = "3")]
    ClosedForGood {
        reason: String,
    },
}

#[test]
fn internally_tagged_enums_round_trip() {
    let event = Internal::ClosedForGood {
        reason: "done".to_owned(),
    };
    let row = stored(&event);
    assert_eq!(
        (row.event_type.as_str(), row.event_version.as_str()),
        ("Closed", "3")
    );
    assert_eq!(
        row.payload,
        json!({"kind": "CLOSED_FOR_GOOD", "reason": "done"})
    );
    assert_eq!(row.decode::<Internal>().unwrap().event, event);
    assert_eq!(
        stored(&Internal::Opened { owner: "x".into() }).event_type,
        "Opened"
    );
}

/// One name, two versions: the old shape stays readable beside the new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum Versioned {
    #[event(name = "Deposited", version = "1")]
    DepositedV1 { amount: u64 },
    #[event(name = "Deposited", version = "2")]
    Deposited { amount: u64, currency: String },
}

#[test]
fn one_name_with_two_versions_decodes_each_version_to_its_variant() {
    assert_eq!(
        Versioned::EVENT_TYPES,
        &[
            EventType::new("Deposited", "1"),
            EventType::new("Deposited", "2")
        ]
    );
    let old = Versioned::DepositedV1 { amount: 3 };
    let new = Versioned::Deposited {
        amount: 3,
        currency: "EUR".to_owned(),
    };
    assert_eq!(stored(&old).decode::<Versioned>().unwrap().event, old);
    assert_eq!(stored(&new).decode::<Versioned>().unwrap().event, new);
    // A v1 payload stored as v2 is refused.
    let mut row = stored(&old);
    row.event_version = "2".into();
    assert!(matches!(
        decode_error(row.decode::<Versioned>()),
        DecodeError::MalformedPayload(_)
    ));
}

/// A struct is one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "PriceChanged", version = "3")]
struct PriceChanged {
    cents: u64,
}

/// Defaults on a struct: its name, version "1".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
struct Pinged;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "Moved")]
struct Moved(i32, i32);

#[test]
fn structs_round_trip_and_check_their_pair() {
    let event = PriceChanged { cents: 99 };
    assert_eq!(
        PriceChanged::EVENT_TYPES,
        &[EventType::new("PriceChanged", "3")]
    );
    let row = stored(&event);
    assert_eq!(row.payload, json!({"cents": 99}));
    assert_eq!(row.decode::<PriceChanged>().unwrap().event, event);
    assert!(matches!(
        PriceChanged::decode("PriceChanged", "2", &row.payload),
        Err(DecodeError::UnknownEventType)
    ));
    assert!(matches!(
        PriceChanged::decode("PriceChanged", "3", &json!({"cents": "many"}).into()),
        Err(DecodeError::MalformedPayload(_))
    ));

    assert_eq!(Pinged::EVENT_TYPES, &[EventType::new("Pinged", "1")]);
    assert_eq!(stored(&Pinged).decode::<Pinged>().unwrap().event, Pinged);

    let moved = Moved(1, -1);
    assert_eq!(stored(&moved).event_type, "Moved");
    assert_eq!(stored(&moved).decode::<Moved>().unwrap().event, moved);
}

/// Generic events: the impl requires the traits of the concrete type. (`N` only shows that
/// const parameters pass through; serde has no impl for `[T; N]`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum Changed<T, const N: usize>
where
    T: Clone,
{
    #[event(name = "ValueSet", version = "2")]
    Set { value: T },
    #[event(name = "ValuesCleared")]
    Cleared(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "Wrapped")]
struct Wrapper<T> {
    inner: T,
}

#[test]
fn generic_events_round_trip() {
    let set = Changed::<String, 2>::Set {
        value: "v".to_owned(),
    };
    assert_eq!(stored(&set).event_type, "ValueSet");
    assert_eq!(
        stored(&set).decode::<Changed<String, 2>>().unwrap().event,
        set
    );
    let cleared = Changed::<u8, 2>::Cleared(vec![1, 2]);
    assert_eq!(
        stored(&cleared).decode::<Changed<u8, 2>>().unwrap().event,
        cleared
    );
    assert_eq!(Changed::<u8, 2>::EVENT_TYPES.len(), 2);

    let wrapped = Wrapper {
        inner: vec![1u8, 2],
    };
    assert_eq!(
        stored(&wrapped).decode::<Wrapper<Vec<u8>>>().unwrap().event,
        wrapped
    );
    assert_eq!(
        Wrapper::<u8>::EVENT_TYPES,
        &[EventType::new("Wrapped", "1")]
    );
}

#[test]
fn several_event_attributes_on_one_variant_are_merged() {
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
    enum Split {
        #[event(name = "Opened")]
        #[event(version = "5")]
        Opened,
    }
    assert_eq!(Split::EVENT_TYPES, &[EventType::new("Opened", "5")]);
}
