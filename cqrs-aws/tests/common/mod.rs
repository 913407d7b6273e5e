//! The domain the Lambda and messaging suites share: a ledger of deposits.

use cqrs::{Aggregate, CQRSError, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What happened to a ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
pub enum LedgerEvent {
    Deposited { amount: u64 },
}

/// A ledger: every command is a deposit of its amount.
#[derive(Debug, Default)]
pub struct Ledger;

impl Aggregate for Ledger {
    const NAME: &'static str = "ledger";
    type Events = LedgerEvent;
    type Commands = u64;
    type Errors = CQRSError;
    type State = ();

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &(),
        amount: u64,
    ) -> Result<Vec<LedgerEvent>, CQRSError> {
        Ok(vec![LedgerEvent::Deposited { amount }])
    }

    fn handle_event(&self, _state: &mut (), _event: &LedgerEvent) {}
}
