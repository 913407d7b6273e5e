//! The schema lock catches a deliberate incompatible change: a type with the same event
//! names but a changed field, checked against the payloads the first type recorded, fails
//! with a message naming the event and version.

use cqrs::DomainEvent;
use cqrs_testkit::schema_lock::{SchemaLock, SchemaProblem};
use serde::{Deserialize, Serialize};

mod before {
    use super::*;

    #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
    pub enum ShopEvent {
        #[event(name = "OrderPlaced")]
        Placed { items: u32 },
        #[event(name = "OrderShipped")]
        Shipped { carrier: String },
    }
}

mod after {
    use super::*;

    /// `OrderPlaced` changed its field without a new version.
    #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
    pub enum ShopEvent {
        #[event(name = "OrderPlaced")]
        Placed { lines: Vec<String> },
        #[event(name = "OrderShipped")]
        Shipped { carrier: String },
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cqrs-schema-lock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn an_incompatible_change_fails_naming_the_event_and_version() {
    let dir = temp_dir("incompatible");
    SchemaLock::<before::ShopEvent>::new(&dir)
        .samples([
            before::ShopEvent::Placed { items: 2 },
            before::ShopEvent::Shipped {
                carrier: "post".into(),
            },
        ])
        .record()
        .unwrap();
    SchemaLock::<before::ShopEvent>::new(&dir).check().unwrap();

    let error = SchemaLock::<after::ShopEvent>::new(&dir)
        .check()
        .unwrap_err();
    assert_eq!(error.problems.len(), 1, "{error}");
    assert!(matches!(
        &error.problems[0],
        SchemaProblem::NoLongerDecodes { event_type, event_version, .. }
            if event_type == "OrderPlaced" && event_version == "1"
    ));
    let message = error.to_string();
    assert!(
        message.contains("event `OrderPlaced` version 1"),
        "{message}"
    );

    // Re-recording the changed type does not paper over it.
    let error = SchemaLock::<after::ShopEvent>::new(&dir)
        .sample(after::ShopEvent::Placed { lines: vec![] })
        .record()
        .unwrap_err();
    assert!(error.to_string().contains("OrderPlaced"), "{error}");

    let result = std::panic::catch_unwind(|| SchemaLock::<after::ShopEvent>::new(&dir).assert());
    let panic = result.unwrap_err();
    let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("OrderPlaced"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_version_without_a_recorded_payload_fails() {
    let dir = temp_dir("missing");
    SchemaLock::<before::ShopEvent>::new(&dir)
        .sample(before::ShopEvent::Placed { items: 1 })
        .record()
        .unwrap();
    let error = SchemaLock::<before::ShopEvent>::new(&dir)
        .check()
        .unwrap_err();
    assert!(
        matches!(
            &error.problems[..],
            [SchemaProblem::NotRecorded { event_type, event_version }]
                if event_type == "OrderShipped" && event_version == "1"
        ),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
