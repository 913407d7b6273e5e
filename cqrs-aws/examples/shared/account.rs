//! The account of `lambda_projection.rs` (only its name and events matter to a
//! projection) and its balance view; the Lambda tests include this file too, so the example's
//! batch is checked against the same domain.

use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
pub enum AccountEvent {
    Deposited { amount: i64 },
    Withdrawn { amount: i64 },
}

/// The account aggregate (only its name and events matter to a projection).
#[derive(Debug, Default)]
pub struct Account;

impl Aggregate for Account {
    const NAME: &'static str = "account";
    type Events = AccountEvent;
    type Commands = AccountEvent;
    type Errors = CQRSError;
    type State = ();

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &(),
        command: AccountEvent,
    ) -> Result<Vec<AccountEvent>, CQRSError> {
        Ok(vec![command])
    }

    fn handle_event(&self, _state: &mut (), _event: &AccountEvent) {}
}

/// An account's balance, one row per account.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Balance {
    /// Cents.
    pub balance: i64,
}

impl View<Account> for Balance {
    const TABLE_NAME: &'static str = "balances";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<AccountEvent>) -> Result<(), CQRSError> {
        match envelope.event {
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
        Ok(())
    }
}
