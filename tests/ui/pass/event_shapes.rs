// Every shape the derive accepts, written as the docs show; decodes what it stores.
use cqrs::{DomainEvent, EventType};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, cqrs::DomainEvent)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
enum AccountEvent {
    #[event(name = "AccountOpened", version = "1")]
    Opened {
        owner: String,
    },
    #[event(name = "MoneyDeposited", version = "2")]
    Deposited(u64),
    #[event(name = "bank.account-closed")]
    Closed,
    Frozen(String, u32),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, cqrs::DomainEvent)]
#[event(name = "PriceChanged", version = "10")]
struct PriceChanged {
    cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, cqrs::DomainEvent)]
struct Tick;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, cqrs::DomainEvent)]
enum Generic<T: Clone, const N: usize> {
    #[event(name = "Held")]
    Held(Vec<T>),
}

fn round_trip<E: DomainEvent + PartialEq>(event: E) {
    let row = cqrs::PersistableDomainEvent::new(
        "t",
        uuid::Uuid::nil(),
        1,
        &event,
        serde_json::Value::Null,
    )
    .unwrap();
    assert_eq!(row.decode::<E>().unwrap().event, event);
}

fn main() {
    assert_eq!(
        AccountEvent::EVENT_TYPES,
        &[
            EventType::new("AccountOpened", "1"),
            EventType::new("MoneyDeposited", "2"),
            EventType::new("bank.account-closed", "1"),
            EventType::new("Frozen", "1"),
        ]
    );
    round_trip(AccountEvent::Opened {
        owner: "ada".into(),
    });
    round_trip(AccountEvent::Deposited(5));
    round_trip(AccountEvent::Closed);
    round_trip(AccountEvent::Frozen("why".into(), 2));
    round_trip(PriceChanged { cents: 1 });
    round_trip(Tick);
    round_trip(Generic::<u8, 2>::Held(vec![1, 2]));
    assert_eq!(Tick::EVENT_TYPES, &[EventType::new("Tick", "1")]);
}
