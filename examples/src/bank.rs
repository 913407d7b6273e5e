//! A bank account: open, deposit, withdraw, and a balance view.

use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, Query, View};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What can happen to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
pub enum BankEvent {
    /// The account was opened for `owner`.
    #[event(name = "AccountOpened", version = "1")]
    Opened {
        /// Who owns the account.
        owner: String,
    },
    /// Money was paid in.
    ///
    /// Version 1 had no currency; stored v1 events are read as version 2 in
    /// [`DEFAULT_CURRENCY`] by [`deposited_v1_to_v2`].
    #[event(
        name = "MoneyDeposited",
        version = "2",
        upcast(from = "1", with = deposited_v1_to_v2)
    )]
    Deposited {
        /// Amount in cents.
        amount: u64,
        /// ISO 4217 code of the currency, e.g. `"EUR"`.
        currency: String,
    },
    /// Money was taken out.
    #[event(name = "MoneyWithdrawn", version = "1")]
    Withdrawn {
        /// Amount in cents.
        amount: u64,
    },
}

/// The currency of deposits made before version 2 of `MoneyDeposited` recorded one, and of
/// every deposit made through [`BankCommand::Deposit`].
pub const DEFAULT_CURRENCY: &str = "EUR";

impl BankEvent {
    /// A deposit of `amount` cents in [`DEFAULT_CURRENCY`].
    ///
    /// ```
    /// use cqrs_examples::bank::BankEvent;
    /// assert_eq!(
    ///     BankEvent::deposited(5),
    ///     BankEvent::Deposited { amount: 5, currency: "EUR".into() }
    /// );
    /// ```
    pub fn deposited(amount: u64) -> Self {
        BankEvent::Deposited {
            amount,
            currency: DEFAULT_CURRENCY.to_owned(),
        }
    }
}

/// `MoneyDeposited` version 1 as it was stored: `{"Deposited": {"amount": 100}}` (serde's
/// default, externally tagged form of the enum, so the old shape is an enum too).
#[derive(Debug, Clone, Deserialize)]
pub enum MoneyDepositedV1 {
    /// A deposit without a currency.
    Deposited {
        /// Amount in cents.
        amount: u64,
    },
}

/// The upcast step from `MoneyDeposited` version 1 to version 2: the deposit was in
/// [`DEFAULT_CURRENCY`].
///
/// ```
/// use cqrs::DomainEvent;
/// use cqrs_examples::bank::BankEvent;
///
/// let v1: cqrs::Payload = serde_json::json!({ "Deposited": { "amount": 100 } }).into();
/// assert_eq!(BankEvent::decode("MoneyDeposited", "1", &v1)?, BankEvent::deposited(100));
/// # Ok::<(), cqrs::DecodeError>(())
/// ```
pub fn deposited_v1_to_v2(old: MoneyDepositedV1) -> BankEvent {
    let MoneyDepositedV1::Deposited { amount } = old;
    BankEvent::deposited(amount)
}

/// What a caller can ask an account to do.
#[derive(Debug, Clone, PartialEq)]
pub enum BankCommand {
    /// Open the account.
    Open {
        /// Who owns it.
        owner: String,
    },
    /// Pay money in (cents).
    Deposit {
        /// Amount in cents, more than zero.
        amount: u64,
    },
    /// Take money out (cents); refused if the balance is too low.
    Withdraw {
        /// Amount in cents, more than zero.
        amount: u64,
    },
}

/// Why an account refused a command.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// The account is already open.
    #[error("account already open")]
    AlreadyOpen,
    /// The account has not been opened.
    #[error("account not open")]
    NotOpen,
    /// Amounts must be positive.
    #[error("amount must be more than zero")]
    ZeroAmount,
    /// A withdrawal larger than the balance.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    Overdraft {
        /// The balance at the time.
        balance: u64,
        /// The amount asked for.
        requested: u64,
    },
    /// The framework failed (a conflict, the store).
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

impl PartialEq for BankError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (BankError::AlreadyOpen, BankError::AlreadyOpen)
            | (BankError::NotOpen, BankError::NotOpen)
            | (BankError::ZeroAmount, BankError::ZeroAmount) => true,
            (
                BankError::Overdraft { balance, requested },
                BankError::Overdraft {
                    balance: b,
                    requested: r,
                },
            ) => balance == b && requested == r,
            // Framework errors carry I/O details; compare them by their message.
            (BankError::Framework(a), BankError::Framework(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

/// The state an account's decisions are made on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountState {
    /// Whether the account was opened.
    pub open: bool,
    /// Balance in cents.
    pub balance: u64,
}

/// The bank account aggregate.
#[derive(Debug, Default)]
pub struct BankAccount;

// The attribute writes `NAME` and reads `State`, `Commands`, `Events` and `Errors` from
// `handle_command`'s signature.
#[cqrs::aggregate(name = "bank_account")]
impl Aggregate for BankAccount {
    async fn handle_command(
        &self,
        _id: Uuid,
        state: &AccountState,
        command: BankCommand,
    ) -> Result<Vec<BankEvent>, BankError> {
        match command {
            BankCommand::Open { .. } if state.open => Err(BankError::AlreadyOpen),
            BankCommand::Open { owner } => Ok(vec![BankEvent::Opened { owner }]),
            _ if !state.open => Err(BankError::NotOpen),
            BankCommand::Deposit { amount: 0 } | BankCommand::Withdraw { amount: 0 } => {
                Err(BankError::ZeroAmount)
            }
            BankCommand::Deposit { amount } => Ok(vec![BankEvent::deposited(amount)]),
            BankCommand::Withdraw { amount } if amount > state.balance => {
                Err(BankError::Overdraft {
                    balance: state.balance,
                    requested: amount,
                })
            }
            BankCommand::Withdraw { amount } => Ok(vec![BankEvent::Withdrawn { amount }]),
        }
    }

    fn handle_event(&self, state: &mut AccountState, event: &BankEvent) {
        match event {
            BankEvent::Opened { .. } => state.open = true,
            BankEvent::Deposited { amount, .. } => state.balance += amount,
            BankEvent::Withdrawn { amount } => state.balance -= amount,
        }
    }
}

/// The read model: an account's owner, balance and number of transactions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalanceView {
    /// The owner's name.
    pub owner: String,
    /// Balance in cents.
    pub balance: u64,
    /// Deposits and withdrawals so far.
    pub transactions: u64,
}

#[cqrs::view(table = "account_balance", version = 1)]
impl View<BankAccount> for BalanceView {
    fn handle_event(&mut self, envelope: &EventEnvelope<BankEvent>) -> Result<(), BankError> {
        match &envelope.event {
            BankEvent::Opened { owner } => self.owner.clone_from(owner),
            BankEvent::Deposited { amount, .. } => {
                self.balance += amount;
                self.transactions += 1;
            }
            BankEvent::Withdrawn { amount } => {
                self.balance = self
                    .balance
                    .checked_sub(*amount)
                    .ok_or(BankError::Overdraft {
                        balance: self.balance,
                        requested: *amount,
                    })?;
                self.transactions += 1;
            }
        }
        Ok(())
    }
}

/// Reads an account's balance view by the account id.
#[derive(Debug, Default)]
pub struct BalanceQuery;

impl Query<BankAccount, BalanceView> for BalanceQuery {}
