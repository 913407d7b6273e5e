//! Money transfers between accounts: two aggregates and the process manager between them.
//!
//! A [`Transfer`] records a request to move money from one [`Account`] to another. The
//! [`TransferSaga`] carries it out:
//!
//! 1. on `Requested`, it debits the source account;
//! 2. on `Debited`, it credits the target account and sets a deadline for the credit;
//! 3. on `Credited`, it cancels the deadline and completes the transfer.
//!
//! When the source refuses the debit (too little money, closed), the transfer fails with
//! nothing moved. When the target refuses the credit because it is closed, the saga refunds
//! the source. When the target is frozen, the saga tries the credit again every
//! [`CREDIT_RETRY`], until the [`CREDIT_TIMEOUT`] deadline refunds the source.
//!
//! Every event of one transfer shares the transfer request's correlation id; the causation
//! id of each event is the id of the command that caused it.

use std::sync::Arc;
use std::time::Duration;

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, CommandContext, CommandRouter, Deadline, DomainEvent,
    Effects, EventEnvelope, ProcessInput, ProcessManager, Refused, SendError,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How long the saga waits for a credit before it refunds the source.
pub const CREDIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the saga waits before it tries a credit to a frozen account again.
pub const CREDIT_RETRY: Duration = Duration::from_secs(5);

/// What can happen to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
pub enum AccountEvent {
    /// Opened with an initial balance.
    #[event(name = "AccountOpened", version = "1")]
    Opened {
        /// Initial balance in cents.
        initial: u64,
    },
    /// Closed: no more debits or credits, refunds still arrive.
    #[event(name = "AccountClosed", version = "1")]
    Closed,
    /// Frozen: credits are refused until it is unfrozen.
    #[event(name = "AccountFrozen", version = "1")]
    Frozen,
    /// Unfrozen.
    #[event(name = "AccountUnfrozen", version = "1")]
    Unfrozen,
    /// Money left for a transfer.
    #[event(name = "TransferDebited", version = "1")]
    Debited {
        /// The transfer.
        transfer: Uuid,
        /// Cents.
        amount: u64,
    },
    /// Money arrived from a transfer.
    #[event(name = "TransferCredited", version = "1")]
    Credited {
        /// The transfer.
        transfer: Uuid,
        /// Cents.
        amount: u64,
    },
    /// Money of a transfer that failed came back.
    #[event(name = "TransferRefunded", version = "1")]
    Refunded {
        /// The transfer.
        transfer: Uuid,
        /// Cents.
        amount: u64,
    },
}

/// What an account can be asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AccountCommand {
    /// Open with an initial balance.
    Open {
        /// Cents.
        initial: u64,
    },
    /// Close.
    Close,
    /// Freeze (credits are refused).
    Freeze,
    /// Unfreeze.
    Unfreeze,
    /// Take money out for a transfer.
    Debit {
        /// The transfer.
        transfer: Uuid,
        /// Cents.
        amount: u64,
    },
    /// Pay money in for a transfer.
    Credit {
        /// The transfer.
        transfer: Uuid,
        /// Cents.
        amount: u64,
    },
    /// Give back the money of a transfer that failed (accepted on a closed account too).
    Refund {
        /// The transfer.
        transfer: Uuid,
        /// Cents.
        amount: u64,
    },
}

/// Why an account refused a command.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Not opened.
    #[error("account not open")]
    NotOpen,
    /// Opened already.
    #[error("account already open")]
    AlreadyOpen,
    /// Closed.
    #[error("account closed")]
    Closed,
    /// Frozen.
    #[error("account frozen")]
    Frozen,
    /// Too little money.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Cents.
        balance: u64,
        /// Cents.
        requested: u64,
    },
    /// The framework failed.
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

/// An account's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountState {
    /// Opened.
    pub open: bool,
    /// Closed.
    pub closed: bool,
    /// Frozen.
    pub frozen: bool,
    /// Cents.
    pub balance: u64,
}

/// The account aggregate of the transfer example.
#[derive(Debug, Default)]
pub struct Account;

#[cqrs::aggregate(name = "transfer_account")]
impl Aggregate for Account {
    async fn handle_command(
        &self,
        _id: Uuid,
        state: &AccountState,
        command: AccountCommand,
    ) -> Result<Vec<AccountEvent>, AccountError> {
        use AccountCommand as C;
        match command {
            C::Open { .. } if state.open => Err(AccountError::AlreadyOpen),
            C::Open { initial } => Ok(vec![AccountEvent::Opened { initial }]),
            _ if !state.open => Err(AccountError::NotOpen),
            C::Refund { transfer, amount } => Ok(vec![AccountEvent::Refunded { transfer, amount }]),
            _ if state.closed => Err(AccountError::Closed),
            C::Close => Ok(vec![AccountEvent::Closed]),
            C::Freeze => Ok(vec![AccountEvent::Frozen]),
            C::Unfreeze => Ok(vec![AccountEvent::Unfrozen]),
            C::Credit { .. } if state.frozen => Err(AccountError::Frozen),
            C::Credit { transfer, amount } => Ok(vec![AccountEvent::Credited { transfer, amount }]),
            C::Debit { amount, .. } if amount > state.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: state.balance,
                    requested: amount,
                })
            }
            C::Debit { transfer, amount } => Ok(vec![AccountEvent::Debited { transfer, amount }]),
        }
    }

    fn handle_event(&self, state: &mut AccountState, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { initial } => {
                state.open = true;
                state.balance = *initial;
            }
            AccountEvent::Closed => state.closed = true,
            AccountEvent::Frozen => state.frozen = true,
            AccountEvent::Unfrozen => state.frozen = false,
            AccountEvent::Debited { amount, .. } => {
                state.balance = state.balance.saturating_sub(*amount);
            }
            AccountEvent::Credited { amount, .. } | AccountEvent::Refunded { amount, .. } => {
                state.balance += amount;
            }
        }
    }
}

/// What can happen to a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
pub enum TransferEvent {
    /// Asked for.
    #[event(name = "TransferRequested", version = "1")]
    Requested {
        /// The account debited.
        from: Uuid,
        /// The account credited.
        to: Uuid,
        /// Cents.
        amount: u64,
    },
    /// The money arrived.
    #[event(name = "TransferCompleted", version = "1")]
    Completed,
    /// Nothing moved: the debit was refused.
    #[event(name = "TransferFailed", version = "1")]
    Failed {
        /// Why.
        reason: String,
    },
    /// The money went back to the source.
    #[event(name = "TransferReversed", version = "1")]
    Reversed {
        /// Why.
        reason: String,
    },
}

/// What a transfer can be asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TransferCommand {
    /// Ask for a transfer.
    Request {
        /// The account debited.
        from: Uuid,
        /// The account credited.
        to: Uuid,
        /// Cents.
        amount: u64,
    },
    /// Record that the money arrived.
    Complete,
    /// Record that nothing moved.
    Fail {
        /// Why.
        reason: String,
    },
    /// Record that the money went back.
    Reverse {
        /// Why.
        reason: String,
    },
}

/// Why a transfer refused a command.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Requested already.
    #[error("transfer already requested")]
    AlreadyRequested,
    /// Not requested.
    #[error("transfer not requested")]
    NotRequested,
    /// Completed, failed or reversed already.
    #[error("transfer already settled")]
    Settled,
    /// From and to are the same account, or the amount is zero.
    #[error("invalid transfer: {0}")]
    Invalid(&'static str),
    /// The framework failed.
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

/// Where a transfer stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferStatus {
    /// Not requested.
    #[default]
    None,
    /// Requested, not settled.
    Pending,
    /// The money arrived.
    Completed,
    /// Nothing moved.
    Failed,
    /// The money went back.
    Reversed,
}

/// A transfer's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferState {
    /// Where it stands.
    pub status: TransferStatus,
}

/// The transfer aggregate.
#[derive(Debug, Default)]
pub struct Transfer;

#[cqrs::aggregate(name = "transfer")]
impl Aggregate for Transfer {
    async fn handle_command(
        &self,
        _id: Uuid,
        state: &TransferState,
        command: TransferCommand,
    ) -> Result<Vec<TransferEvent>, TransferError> {
        use TransferStatus as S;
        match (command, &state.status) {
            (TransferCommand::Request { from, to, amount }, S::None) => {
                if from == to {
                    return Err(TransferError::Invalid("from and to are the same account"));
                }
                if amount == 0 {
                    return Err(TransferError::Invalid("the amount is zero"));
                }
                Ok(vec![TransferEvent::Requested { from, to, amount }])
            }
            (TransferCommand::Request { .. }, _) => Err(TransferError::AlreadyRequested),
            (_, S::None) => Err(TransferError::NotRequested),
            (TransferCommand::Complete, S::Pending) => Ok(vec![TransferEvent::Completed]),
            (TransferCommand::Fail { reason }, S::Pending) => {
                Ok(vec![TransferEvent::Failed { reason }])
            }
            (TransferCommand::Reverse { reason }, S::Pending) => {
                Ok(vec![TransferEvent::Reversed { reason }])
            }
            (_, _) => Err(TransferError::Settled),
        }
    }

    fn handle_event(&self, state: &mut TransferState, event: &TransferEvent) {
        state.status = match event {
            TransferEvent::Requested { .. } => TransferStatus::Pending,
            TransferEvent::Completed => TransferStatus::Completed,
            TransferEvent::Failed { .. } => TransferStatus::Failed,
            TransferEvent::Reversed { .. } => TransferStatus::Reversed,
        };
    }
}

/// The events the saga reacts to: one variant per aggregate type, named after it (the
/// derive writes the decoding).
#[derive(Debug, Clone, PartialEq, ProcessInput)]
pub enum SagaInput {
    /// A transfer's event.
    Transfer(TransferEvent),
    /// An account's event.
    Account(AccountEvent),
}

/// The commands the saga sends.
#[derive(Debug, Clone, PartialEq)]
pub enum SagaCommand {
    /// To an account.
    Account(Uuid, AccountCommand),
    /// To a transfer.
    Transfer(Uuid, TransferCommand),
}

/// Where one transfer's saga stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SagaStep {
    /// No event yet.
    #[default]
    Started,
    /// The debit was sent.
    Debiting,
    /// The credit was sent (or is retried).
    Crediting,
    /// The refund was sent.
    Refunding,
    /// Settled.
    Done,
}

/// One transfer's saga state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaState {
    /// Where it stands.
    pub step: SagaStep,
    /// The transfer's id.
    pub transfer: Uuid,
    /// The account debited.
    pub from: Uuid,
    /// The account credited.
    pub to: Uuid,
    /// Cents.
    pub amount: u64,
    /// Credits refused because the target was frozen.
    pub credit_retries: u32,
}

/// The deadline after which a credit that has not happened is given up.
pub const CREDIT_DEADLINE: &str = "credit";
/// The deadline of the next try of a credit to a frozen account.
pub const RETRY_DEADLINE: &str = "retry-credit";

/// The process manager that carries out transfers.
#[derive(Debug, Default)]
pub struct TransferSaga;

impl TransferSaga {
    fn refund(state: &mut SagaState, effects: &mut Effects<SagaCommand>) {
        state.step = SagaStep::Refunding;
        effects.cancel(CREDIT_DEADLINE);
        effects.cancel(RETRY_DEADLINE);
        effects.send(SagaCommand::Account(
            state.from,
            AccountCommand::Refund {
                transfer: state.transfer,
                amount: state.amount,
            },
        ));
    }

    fn credit(state: &SagaState, effects: &mut Effects<SagaCommand>) {
        effects.send(SagaCommand::Account(
            state.to,
            AccountCommand::Credit {
                transfer: state.transfer,
                amount: state.amount,
            },
        ));
    }
}

impl ProcessManager for TransferSaga {
    const NAME: &'static str = "transfer_saga";
    type Input = SagaInput;
    type State = SagaState;
    type Command = SagaCommand;

    fn instance_id(event: &EventEnvelope<SagaInput>) -> Option<String> {
        match &event.event {
            SagaInput::Transfer(_) => Some(event.aggregate_id.to_string()),
            SagaInput::Account(
                AccountEvent::Debited { transfer, .. }
                | AccountEvent::Credited { transfer, .. }
                | AccountEvent::Refunded { transfer, .. },
            ) => Some(transfer.to_string()),
            SagaInput::Account(_) => None,
        }
    }

    fn on_event(
        &self,
        state: &mut SagaState,
        event: &EventEnvelope<SagaInput>,
        effects: &mut Effects<SagaCommand>,
    ) {
        match &event.event {
            SagaInput::Transfer(TransferEvent::Requested { from, to, amount }) => {
                *state = SagaState {
                    step: SagaStep::Debiting,
                    transfer: event.aggregate_id,
                    from: *from,
                    to: *to,
                    amount: *amount,
                    credit_retries: 0,
                };
                effects.send(SagaCommand::Account(
                    *from,
                    AccountCommand::Debit {
                        transfer: event.aggregate_id,
                        amount: *amount,
                    },
                ));
            }
            SagaInput::Account(AccountEvent::Debited { .. })
                if state.step == SagaStep::Debiting =>
            {
                state.step = SagaStep::Crediting;
                effects.wake_in(CREDIT_DEADLINE, CREDIT_TIMEOUT);
                Self::credit(state, effects);
            }
            SagaInput::Account(AccountEvent::Credited { .. }) => {
                state.step = SagaStep::Done;
                effects.cancel(CREDIT_DEADLINE);
                effects.cancel(RETRY_DEADLINE);
                effects.send(SagaCommand::Transfer(
                    state.transfer,
                    TransferCommand::Complete,
                ));
                effects.complete();
            }
            SagaInput::Account(AccountEvent::Refunded { .. }) => {
                state.step = SagaStep::Done;
                effects.send(SagaCommand::Transfer(
                    state.transfer,
                    TransferCommand::Reverse {
                        reason: "the credit did not happen; the money went back".into(),
                    },
                ));
                effects.complete();
            }
            _ => {}
        }
    }

    fn on_refused(
        &self,
        state: &mut SagaState,
        refused: &Refused<SagaCommand>,
        effects: &mut Effects<SagaCommand>,
    ) {
        match &refused.command {
            SagaCommand::Account(_, AccountCommand::Debit { .. }) => {
                state.step = SagaStep::Done;
                effects.send(SagaCommand::Transfer(
                    state.transfer,
                    TransferCommand::Fail {
                        reason: refused.reason.clone(),
                    },
                ));
                effects.complete();
            }
            SagaCommand::Account(_, AccountCommand::Credit { .. })
                if refused.reason == AccountError::Frozen.to_string() =>
            {
                state.credit_retries += 1;
                effects.wake_in(RETRY_DEADLINE, CREDIT_RETRY);
            }
            SagaCommand::Account(_, AccountCommand::Credit { .. }) => Self::refund(state, effects),
            // A transfer that is settled already, a refund that cannot be made (the source
            // account never opened): nothing more this saga can do.
            _ => {
                state.step = SagaStep::Done;
                effects.complete();
            }
        }
    }

    fn on_deadline(
        &self,
        state: &mut SagaState,
        deadline: &Deadline,
        effects: &mut Effects<SagaCommand>,
    ) {
        if state.step != SagaStep::Crediting {
            return;
        }
        match deadline.name.as_str() {
            CREDIT_DEADLINE => Self::refund(state, effects),
            RETRY_DEADLINE => Self::credit(state, effects),
            _ => {}
        }
    }
}

/// Delivers the saga's commands to the account and transfer frameworks.
#[derive(Debug, Clone)]
pub struct TransferRouter {
    /// The accounts.
    pub accounts: Arc<CQRSFramework<Account>>,
    /// The transfers.
    pub transfers: Arc<CQRSFramework<Transfer>>,
}

#[cqrs::async_trait]
impl CommandRouter<SagaCommand> for TransferRouter {
    async fn send(&self, command: SagaCommand, context: &CommandContext) -> Result<(), SendError> {
        match command {
            SagaCommand::Account(id, command) => {
                match self
                    .accounts
                    .dispatch_with_context(id, command, context)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(AccountError::Framework(error)) => Err(SendError::Failed(error)),
                    Err(refusal) => Err(SendError::Refused(refusal.to_string())),
                }
            }
            SagaCommand::Transfer(id, command) => {
                match self
                    .transfers
                    .dispatch_with_context(id, command, context)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(TransferError::Framework(error)) => Err(SendError::Failed(error)),
                    Err(refusal) => Err(SendError::Refused(refusal.to_string())),
                }
            }
        }
    }
}
