//! The ledger domain the projection suites share: one aggregate of deposits, a balance view
//! in two versions (the second with a gate that holds its rebuild back), and a total over
//! every ledger. Each test binary that declares `mod common;` gets its own copy (and its
//! own statics).

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
pub enum LedgerEvent {
    #[event(name = "Deposited", version = "1")]
    Deposited { amount: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("sequence {got} after {last}: an event applied twice or missed")]
    OutOfOrder { last: i64, got: i64 },
    #[error("the gate is closed")]
    Gated,
    #[error("the view refuses the unlucky amount {0}")]
    Unlucky(u64),
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

#[derive(Default)]
pub struct Ledger;

impl Aggregate for Ledger {
    const NAME: &'static str = "ledger";
    type Events = LedgerEvent;
    type Commands = Vec<u64>;
    type Errors = LedgerError;
    type State = ();

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &(),
        amounts: Vec<u64>,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        Ok(amounts
            .into_iter()
            .map(|amount| LedgerEvent::Deposited { amount })
            .collect())
    }

    fn handle_event(&self, _state: &mut (), _event: &LedgerEvent) {}
}

/// Version 1 of the balance view: refuses an event that is not the next of its ledger, so a
/// double apply or a miss stops the projection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalanceV1 {
    pub sum: u64,
    pub last_sequence: i64,
}

impl View<Ledger> for BalanceV1 {
    const TABLE_NAME: &'static str = "balances";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        if envelope.sequence != self.last_sequence + 1 {
            return Err(LedgerError::OutOfOrder {
                last: self.last_sequence,
                got: envelope.sequence,
            });
        }
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.sum += amount;
        self.last_sequence = envelope.sequence;
        Ok(())
    }
}

/// While closed, version 2 refuses events past `GATE_AT`: its rebuild stays in progress.
pub static GATE_OPEN: AtomicBool = AtomicBool::new(false);
pub const GATE_AT: i64 = 150;

/// Version 2 of the same table: another shape (counts deposits and keeps the largest).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalanceV2 {
    pub total: u64,
    pub deposits: u64,
    pub largest: u64,
}

impl View<Ledger> for BalanceV2 {
    const TABLE_NAME: &'static str = "balances";
    const VERSION: u64 = 2;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        if envelope.position > GATE_AT && !GATE_OPEN.load(Ordering::SeqCst) {
            return Err(LedgerError::Gated);
        }
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.total += amount;
        self.deposits += 1;
        self.largest = self.largest.max(amount);
        Ok(())
    }
}

/// One row for every ledger, trusting the projection: a double apply shows in its count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GrandTotal {
    pub sum: u64,
    pub events: u64,
}

impl View<Ledger> for GrandTotal {
    const TABLE_NAME: &'static str = "grand_total";
    const VERSION: u64 = 1;

    fn view_id(_envelope: &EventEnvelope<LedgerEvent>) -> Option<String> {
        Some("all".to_owned())
    }

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.sum += amount;
        self.events += 1;
        Ok(())
    }
}
