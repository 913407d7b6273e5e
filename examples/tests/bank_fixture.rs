//! The bank account domain tested with the testkit, in both test styles: plain `#[test]`
//! functions (`when_blocking`) and `#[tokio::test]` functions (`when(..).await`).

use cqrs_examples::bank::{
    AccountState, BalanceView, BankAccount, BankCommand, BankError, BankEvent,
};
use cqrs_testkit::{envelope, AggregateFixture, Scenario, Stored, ViewFixture};
use serde_json::json;
use uuid::Uuid;

fn opened() -> BankEvent {
    BankEvent::Opened {
        owner: "alice".into(),
    }
}

fn account() -> AggregateFixture<BankAccount> {
    AggregateFixture::new()
}

/// Plain `#[test]` functions: `when_blocking` runs the command on its own runtime.
mod plain {
    use super::*;

    #[test]
    fn opening_a_new_account() {
        account()
            .given_no_previous_events()
            .when_blocking(BankCommand::Open {
                owner: "alice".into(),
            })
            .then_expect_events([opened()])
            .then_expect_state(AccountState {
                open: true,
                balance: 0,
            });
    }

    #[test]
    fn opening_twice_is_refused() {
        account()
            .given([opened()])
            .when_blocking(BankCommand::Open {
                owner: "bob".into(),
            })
            .then_expect_error(BankError::AlreadyOpen)
            .then_expect_error_message("account already open");
    }

    #[test]
    fn depositing() {
        account()
            .given([opened(), BankEvent::deposited(100)])
            .when_blocking(BankCommand::Deposit { amount: 250 })
            .then_expect_events([BankEvent::deposited(250)])
            .then_expect_state(AccountState {
                open: true,
                balance: 350,
            });
    }

    #[test]
    fn nothing_before_opening() {
        for command in [
            BankCommand::Deposit { amount: 1 },
            BankCommand::Withdraw { amount: 1 },
        ] {
            account()
                .given_no_previous_events()
                .when_blocking(command)
                .then_expect_error(BankError::NotOpen);
        }
    }

    #[test]
    fn zero_amounts_are_refused() {
        for command in [
            BankCommand::Deposit { amount: 0 },
            BankCommand::Withdraw { amount: 0 },
        ] {
            account()
                .given([opened()])
                .when_blocking(command)
                .then_expect_error(BankError::ZeroAmount)
                .then_expect_error_message("amount must be more than zero");
        }
    }

    #[test]
    fn withdrawing_everything() {
        account()
            .given([opened(), BankEvent::deposited(300)])
            .when_blocking(BankCommand::Withdraw { amount: 300 })
            .then_expect_events([BankEvent::Withdrawn { amount: 300 }])
            .then_verify_state(|state| assert_eq!(state.balance, 0));
    }

    #[test]
    #[should_panic(
        expected = "first difference: event #1 (MoneyWithdrawn v1): at `$.Withdrawn.amount`: expected 50, got 500"
    )]
    fn a_wrong_expectation_names_the_field() {
        account()
            .given([opened(), BankEvent::deposited(1000)])
            .when_blocking(BankCommand::Withdraw { amount: 500 })
            .then_expect_events([BankEvent::Withdrawn { amount: 50 }]);
    }

    #[test]
    fn balance_view() {
        ViewFixture::<BankAccount, BalanceView>::new()
            .given([
                opened(),
                BankEvent::deposited(500),
                BankEvent::Withdrawn { amount: 200 },
            ])
            .then_expect_view(BalanceView {
                owner: "alice".into(),
                balance: 300,
                transactions: 2,
            });
    }

    #[test]
    fn balance_view_refuses_an_impossible_withdrawal() {
        let id = Uuid::new_v4();
        ViewFixture::<BankAccount, BalanceView>::new()
            .given_envelopes([
                envelope::<BankAccount>(id, 1, opened()),
                envelope::<BankAccount>(id, 2, BankEvent::Withdrawn { amount: 1 }),
            ])
            .then_expect_error(BankError::Overdraft {
                balance: 0,
                requested: 1,
            });
    }

    #[test]
    fn a_day_at_the_bank() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let bank = Scenario::<BankAccount>::new().given(alice, [opened()]);
        bank.when_with_metadata_blocking(
            alice,
            BankCommand::Deposit { amount: 1000 },
            &json!({ "teller": "t1" }),
        )
        .then_expect_stored([Stored::event(&BankEvent::deposited(1000))
            .at_sequence(2)
            .with_metadata(json!({ "teller": "t1" }))]);
        bank.when_blocking(
            bob,
            BankCommand::Open {
                owner: "bob".into(),
            },
        )
        .then_expect_events([BankEvent::Opened {
            owner: "bob".into(),
        }]);
        bank.when_blocking(bob, BankCommand::Withdraw { amount: 1 })
            .then_expect_error(BankError::Overdraft {
                balance: 0,
                requested: 1,
            });
        bank.when_blocking(alice, BankCommand::Withdraw { amount: 400 })
            .then_expect_events([BankEvent::Withdrawn { amount: 400 }]);

        bank.then_expect_stored(
            alice,
            [
                Stored::named("AccountOpened", "1").with_metadata(json!(null)),
                Stored::named("MoneyDeposited", "2"),
                Stored::named("MoneyWithdrawn", "1").with_metadata(json!(null)),
            ],
        )
        .then_expect_state(
            alice,
            AccountState {
                open: true,
                balance: 600,
            },
        )
        .then_expect_view(
            alice,
            BalanceView {
                owner: "alice".into(),
                balance: 600,
                transactions: 2,
            },
        )
        .then_expect_view(
            bob,
            BalanceView {
                owner: "bob".into(),
                balance: 0,
                transactions: 0,
            },
        );
    }
}

/// `#[tokio::test]` functions: `.when(..).await` on the test's own runtime.
mod tokio_style {
    use super::*;

    #[tokio::test]
    async fn withdrawing() {
        account()
            .given([opened(), BankEvent::deposited(500)])
            .when(BankCommand::Withdraw { amount: 200 })
            .await
            .then_expect_events([BankEvent::Withdrawn { amount: 200 }])
            .then_expect_state(AccountState {
                open: true,
                balance: 300,
            });
    }

    #[tokio::test]
    async fn overdraft_is_refused() {
        let then = account()
            .given([opened(), BankEvent::deposited(100)])
            .when(BankCommand::Withdraw { amount: 101 })
            .await;
        then.then_expect_error(BankError::Overdraft {
            balance: 100,
            requested: 101,
        })
        .then_expect_error_message("insufficient funds: balance 100, requested 101")
        .then_expect_error_matching(|e| matches!(e, BankError::Overdraft { .. }))
        .then_expect_state(AccountState {
            open: true,
            balance: 100,
        });
        assert!(then.result().is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn opening_on_a_multi_thread_runtime() {
        account()
            .given_no_previous_events()
            .when(BankCommand::Open {
                owner: "carol".into(),
            })
            .await
            .then_expect_events([BankEvent::Opened {
                owner: "carol".into(),
            }]);
    }

    #[tokio::test]
    #[should_panic(expected = "the command failed with another error")]
    async fn a_wrong_error_fails() {
        account()
            .given([opened()])
            .when(BankCommand::Withdraw { amount: 5 })
            .await
            .then_expect_error(BankError::NotOpen);
    }

    #[tokio::test]
    #[should_panic(
        expected = "the state differs\n  first difference: at `$.balance`: expected 5, got 0"
    )]
    async fn a_wrong_state_fails() {
        account()
            .given([opened()])
            .when(BankCommand::Open { owner: "x".into() })
            .await
            .then_expect_state(AccountState {
                open: true,
                balance: 5,
            });
    }

    #[tokio::test]
    async fn a_day_at_the_bank() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let bank = Scenario::<BankAccount>::new();
        for (id, owner) in [(alice, "alice"), (bob, "bob")] {
            bank.when(
                id,
                BankCommand::Open {
                    owner: owner.into(),
                },
            )
            .await
            .then_expect_stored([Stored::named("AccountOpened", "1").at_sequence(1)]);
        }
        let receipt = bank
            .when_with_metadata(
                bob,
                BankCommand::Deposit { amount: 70 },
                &json!({ "via": "atm" }),
            )
            .await
            .into_result()
            .unwrap();
        assert_eq!(receipt.sequence, 2);
        bank.when(alice, BankCommand::Deposit { amount: 0 })
            .await
            .then_expect_error(BankError::ZeroAmount);

        bank.then_expect_events(
            bob,
            [
                BankEvent::Opened {
                    owner: "bob".into(),
                },
                BankEvent::deposited(70),
            ],
        )
        .then_expect_stored(
            bob,
            [
                Stored::any(),
                Stored::event(&BankEvent::deposited(70)).with_metadata(json!({ "via": "atm" })),
            ],
        )
        .then_expect_view(
            bob,
            BalanceView {
                owner: "bob".into(),
                balance: 70,
                transactions: 1,
            },
        )
        .then_expect_state(
            alice,
            AccountState {
                open: true,
                balance: 0,
            },
        );
    }
}
