//! Upcasting chains declared with `#[event(upcast(..))]`, decoded through the public API:
//! typed and raw steps, one step or several, renames, splits and dropped events.

use cqrs::{DecodeError, DomainEvent, EventType, Payload, UpcastEvent, Upcasted};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Version 1 of `Deposited`: no currency. Internally tagged, so the old payload is
/// `{"type": "Deposited", "amount": ..}`.
#[derive(Deserialize)]
struct DepositedV1 {
    amount: u64,
}

/// Version 2 of `Deposited`: a currency, no memo.
#[derive(Serialize, Deserialize)]
struct DepositedV2 {
    #[serde(rename = "type")]
    tag: String,
    amount: u64,
    currency: String,
}

fn deposited_v1_to_v2(old: DepositedV1) -> DepositedV2 {
    DepositedV2 {
        tag: "Deposited".into(),
        amount: old.amount,
        currency: "EUR".into(),
    }
}

fn deposited_v2_to_v3(old: DepositedV2) -> Ledger {
    Ledger::Deposited {
        amount: old.amount,
        currency: old.currency,
        memo: String::new(),
    }
}

/// `Credited` v1 was renamed: it is now a `Deposited` v2 (then goes on through its chain).
fn credited_is_deposited(mut payload: Value) -> Result<Upcasted, DecodeError> {
    payload["type"] = json!("Deposited");
    payload["currency"] = json!("USD");
    Ok(Upcasted::renamed("Deposited", "2", payload))
}

/// `Transfer` v1 became two events: a withdrawal and a deposit.
fn transfer_splits(payload: Value) -> Result<Upcasted, DecodeError> {
    let Some(amount) = payload["amount"].as_u64() else {
        return Err(DecodeError::Upcast("a transfer without an amount".into()));
    };
    Ok(Upcasted::split([
        UpcastEvent::new(
            "Withdrawn",
            "2",
            json!({"type": "Withdrawn", "amount": amount}),
        ),
        UpcastEvent::new(
            "Deposited",
            "1",
            json!({"type": "Deposited", "amount": amount}),
        ),
    ]))
}

/// `Audited` v1 no longer means anything.
fn audited_is_dropped(_payload: Value) -> Result<Upcasted, DecodeError> {
    Ok(Upcasted::dropped())
}

/// `Withdrawn` v1 stored cents as a string; a raw step rewrites the payload in place.
fn withdrawn_cents_as_number(mut payload: Value) -> Result<Upcasted, DecodeError> {
    let cents = payload["amount"]
        .as_str()
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or_else(|| {
            DecodeError::Upcast(format!("amount is not cents: {}", payload["amount"]))
        })?;
    payload["amount"] = json!(cents);
    Ok(Upcasted::Payload(payload))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(tag = "type")]
enum Ledger {
    #[event(
        version = "3",
        upcast(from = "1", to = "2", with = deposited_v1_to_v2),
        upcast(from = "2", with = deposited_v2_to_v3),
        upcast(name = "Credited", from = "1", raw = credited_is_deposited),
        upcast(name = "Transfer", from = "1", raw = transfer_splits),
        upcast(name = "Audited", from = "1", raw = audited_is_dropped)
    )]
    Deposited {
        amount: u64,
        currency: String,
        memo: String,
    },
    #[event(version = "2", upcast(from = "1", raw = withdrawn_cents_as_number))]
    Withdrawn { amount: u64 },
}

fn deposited(amount: u64, currency: &str) -> Ledger {
    Ledger::Deposited {
        amount,
        currency: currency.into(),
        memo: String::new(),
    }
}

#[test]
fn old_pairs_are_listed_as_readable_after_the_current_ones() {
    assert_eq!(
        Ledger::EVENT_TYPES,
        &[
            EventType::new("Deposited", "3"),
            EventType::new("Withdrawn", "2"),
            EventType::new("Deposited", "1"),
            EventType::new("Deposited", "2"),
            EventType::new("Credited", "1"),
            EventType::new("Transfer", "1"),
            EventType::new("Audited", "1"),
            EventType::new("Withdrawn", "1"),
        ]
    );
}

#[test]
fn a_v1_payload_runs_both_typed_steps() {
    let v1: Payload = json!({"type": "Deposited", "amount": 7}).into();
    assert_eq!(
        Ledger::decode("Deposited", "1", &v1).unwrap(),
        deposited(7, "EUR")
    );
    assert_eq!(
        Ledger::decode_all("Deposited", "1", &v1).unwrap(),
        vec![deposited(7, "EUR")]
    );
}

#[test]
fn a_v2_payload_runs_only_the_last_step() {
    let v2: Payload = json!({"type": "Deposited", "amount": 7, "currency": "CHF"}).into();
    assert_eq!(
        Ledger::decode("Deposited", "2", &v2).unwrap(),
        deposited(7, "CHF")
    );
}

#[test]
fn the_current_version_decodes_without_a_step_and_writes_the_current_version() {
    let event = Ledger::Deposited {
        amount: 1,
        currency: "EUR".into(),
        memo: "rent".into(),
    };
    assert_eq!(event.persisted_event_version(), "3");
    let payload = event.to_payload().unwrap();
    assert_eq!(Ledger::decode("Deposited", "3", &payload).unwrap(), event);
}

#[test]
fn a_raw_step_rewrites_the_payload_in_place() {
    let v1: Payload = json!({"type": "Withdrawn", "amount": "12"}).into();
    assert_eq!(
        Ledger::decode("Withdrawn", "1", &v1).unwrap(),
        Ledger::Withdrawn { amount: 12 }
    );
    let bad: Payload = json!({"type": "Withdrawn", "amount": "twelve"}).into();
    let error = Ledger::decode("Withdrawn", "1", &bad).unwrap_err();
    assert!(
        matches!(&error, DecodeError::Upcast(message) if message.contains("twelve")),
        "{error}"
    );
}

#[test]
fn a_renamed_event_goes_on_through_the_chain_of_its_new_name() {
    let old: Payload = json!({"type": "Credited", "amount": 3}).into();
    assert_eq!(
        Ledger::decode("Credited", "1", &old).unwrap(),
        deposited(3, "USD")
    );
}

#[test]
fn a_split_event_decodes_to_several_events_and_decode_refuses_it() {
    let old: Payload = json!({"amount": 4}).into();
    assert_eq!(
        Ledger::decode_all("Transfer", "1", &old).unwrap(),
        vec![Ledger::Withdrawn { amount: 4 }, deposited(4, "EUR")]
    );
    let error = Ledger::decode("Transfer", "1", &old).unwrap_err();
    assert!(
        matches!(&error, DecodeError::Upcast(message) if message.contains("2 events")),
        "{error}"
    );
}

#[test]
fn a_dropped_event_decodes_to_nothing() {
    assert_eq!(
        Ledger::decode_all("Audited", "1", &json!({"by": "x"}).into()).unwrap(),
        vec![]
    );
    assert!(matches!(
        Ledger::decode("Audited", "1", &json!({}).into()),
        Err(DecodeError::Upcast(_))
    ));
}

#[test]
fn a_malformed_old_payload_is_a_malformed_payload_error() {
    let old: Payload = json!({"type": "Deposited", "amount": "seven"}).into();
    assert!(matches!(
        Ledger::decode("Deposited", "1", &old),
        Err(DecodeError::MalformedPayload(_))
    ));
}

#[test]
fn an_unknown_version_is_still_unknown() {
    assert!(matches!(
        Ledger::decode("Deposited", "4", &json!({}).into()),
        Err(DecodeError::UnknownEventType)
    ));
    assert!(matches!(
        Ledger::decode_all("Credited", "2", &json!({}).into()),
        Err(DecodeError::UnknownEventType)
    ));
}

/// A raw step that emits the event it reads would loop; it is an error instead.
fn loops(payload: Value) -> Result<Upcasted, DecodeError> {
    Ok(Upcasted::renamed("Looping", "1", payload))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "Current", version = "2", upcast(name = "Looping", from = "1", raw = loops))]
struct Looped {
    n: u32,
}

#[test]
fn a_raw_step_that_leads_back_to_itself_is_an_error_not_an_overflow() {
    let error = Looped::decode_all("Looping", "1", &json!({"n": 1}).into()).unwrap_err();
    assert!(
        matches!(&error, DecodeError::Upcast(message) if message.contains("levels deep")),
        "{error}"
    );
}

/// A typed step to the current version that produces another variant is refused.
fn wrong_variant(old: DepositedV1) -> Mixed {
    Mixed::B { n: old.amount }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(tag = "type")]
enum Mixed {
    #[event(version = "2", upcast(from = "1", with = wrong_variant))]
    A {
        n: u64,
    },
    B {
        n: u64,
    },
}

#[test]
fn a_typed_step_that_produces_another_event_is_refused() {
    let error = Mixed::decode("A", "1", &json!({"amount": 1}).into()).unwrap_err();
    assert!(
        matches!(&error, DecodeError::Upcast(message) if message.contains("`A` version 2") && message.contains("`B` version 1")),
        "{error}"
    );
}
