//! The bank events' schema lock: every (name, version) `BankEvent` reads has a recorded
//! payload in `examples/fixtures/bank_events/`, and each still decodes, the v1
//! `MoneyDeposited` (no currency) through its upcast step.
//!
//! After adding an event or a version: `CQRS_SCHEMA_LOCK=record cargo test -p cqrs-examples
//! --test schema_lock`, review the new files, commit them.

use cqrs::DomainEvent;
use cqrs_examples::bank::BankEvent;
use cqrs_testkit::schema_lock::{Recorded, SchemaLock};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/bank_events");

fn lock() -> SchemaLock<BankEvent> {
    SchemaLock::new(FIXTURES).samples([
        BankEvent::Opened {
            owner: "ada".into(),
        },
        BankEvent::Deposited {
            amount: 250,
            currency: "CHF".into(),
        },
        BankEvent::Withdrawn { amount: 40 },
    ])
}

#[test]
fn every_recorded_bank_event_still_decodes() {
    lock().assert();
}

#[test]
fn the_recorded_v1_deposit_decodes_as_v2_in_euros() {
    let text = std::fs::read_to_string(format!("{FIXTURES}/MoneyDeposited.v1.json")).unwrap();
    let recorded: Recorded = serde_json::from_str(&text).unwrap();
    assert_eq!(recorded.event_version, "1");
    assert!(recorded.payload["Deposited"].get("currency").is_none());
    let decoded = BankEvent::decode(
        &recorded.event_type,
        &recorded.event_version,
        &recorded.payload.clone().into(),
    )
    .unwrap();
    assert_eq!(
        decoded,
        BankEvent::Deposited {
            amount: 100,
            currency: "EUR".into()
        }
    );
    assert_eq!(decoded.persisted_event_version(), "2");
}
