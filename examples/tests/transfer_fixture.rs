//! The transfer saga through the testkit: its decisions with `ProcessFixture` (no store, no
//! runtime), and whole transfers with `WorkflowScenario` (the accounts, the transfers and the
//! saga's runner on the in-memory store), asserting on the history across aggregates.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cqrs::{CQRSFramework, CommandContext, RetryPolicy};
use cqrs_examples::transfer::{
    Account, AccountCommand, AccountError, AccountEvent, SagaCommand, SagaInput, SagaState,
    SagaStep, Transfer, TransferCommand, TransferEvent, TransferRouter, TransferSaga,
    CREDIT_DEADLINE, CREDIT_RETRY, CREDIT_TIMEOUT, RETRY_DEADLINE,
};
use cqrs_testkit::{on, Happened, ProcessEvent, ProcessFixture, Stored, WorkflowScenario};
use serde_json::json;
use uuid::Uuid;

/// One transfer of 30 from `from` to `to`, and its inputs as the saga sees them.
struct Case {
    transfer: Uuid,
    from: Uuid,
    to: Uuid,
}

const AMOUNT: u64 = 30;

impl Case {
    fn new() -> Self {
        Case {
            transfer: Uuid::new_v4(),
            from: Uuid::new_v4(),
            to: Uuid::new_v4(),
        }
    }

    fn requested(&self) -> ProcessEvent<SagaInput> {
        on(
            self.transfer,
            SagaInput::Transfer(TransferEvent::Requested {
                from: self.from,
                to: self.to,
                amount: AMOUNT,
            }),
        )
        .of::<Transfer>()
    }

    fn account(&self, account: Uuid, event: AccountEvent) -> ProcessEvent<SagaInput> {
        on(account, SagaInput::Account(event)).of::<Account>()
    }

    fn debited(&self) -> ProcessEvent<SagaInput> {
        self.account(
            self.from,
            AccountEvent::Debited {
                transfer: self.transfer,
                amount: AMOUNT,
            },
        )
    }

    fn credited(&self) -> ProcessEvent<SagaInput> {
        self.account(
            self.to,
            AccountEvent::Credited {
                transfer: self.transfer,
                amount: AMOUNT,
            },
        )
    }

    fn refunded(&self) -> ProcessEvent<SagaInput> {
        self.account(
            self.from,
            AccountEvent::Refunded {
                transfer: self.transfer,
                amount: AMOUNT,
            },
        )
    }

    fn debit(&self) -> SagaCommand {
        SagaCommand::Account(
            self.from,
            AccountCommand::Debit {
                transfer: self.transfer,
                amount: AMOUNT,
            },
        )
    }

    fn credit(&self) -> SagaCommand {
        SagaCommand::Account(
            self.to,
            AccountCommand::Credit {
                transfer: self.transfer,
                amount: AMOUNT,
            },
        )
    }

    fn refund(&self) -> SagaCommand {
        SagaCommand::Account(
            self.from,
            AccountCommand::Refund {
                transfer: self.transfer,
                amount: AMOUNT,
            },
        )
    }

    fn transfer(&self, command: TransferCommand) -> SagaCommand {
        SagaCommand::Transfer(self.transfer, command)
    }

    fn state(&self, step: SagaStep, credit_retries: u32) -> SagaState {
        SagaState {
            step,
            transfer: self.transfer,
            from: self.from,
            to: self.to,
            amount: AMOUNT,
            credit_retries,
        }
    }
}

fn frozen() -> String {
    AccountError::Frozen.to_string()
}

#[test]
fn the_happy_path_debits_credits_and_completes() {
    let case = Case::new();
    ProcessFixture::new(TransferSaga)
        .given_no_previous_events()
        .when(case.requested())
        .then_expect_commands([case.debit()])
        .then_expect_state(case.state(SagaStep::Debiting, 0))
        .then_expect_no_deadlines()
        .when(case.debited())
        .then_expect_commands([case.credit()])
        .then_expect_deadlines([(CREDIT_DEADLINE, CREDIT_TIMEOUT)])
        .then_expect_not_completed()
        .when(case.credited())
        .then_expect_commands([case.transfer(TransferCommand::Complete)])
        .then_expect_no_deadlines()
        .then_expect_completed()
        .then_expect_state(case.state(SagaStep::Done, 0))
        // Completed: a late input is ignored, as the runner ignores it.
        .when(case.refunded())
        .then_expect_no_commands()
        .then_expect_state(case.state(SagaStep::Done, 0));
}

#[test]
fn inputs_of_other_instances_and_of_no_instance_are_ignored() {
    let (case, other) = (Case::new(), Case::new());
    let then = ProcessFixture::new(TransferSaga)
        .given([case.requested()])
        .and([
            // No instance: an account event that is not about a transfer.
            case.account(case.from, AccountEvent::Opened { initial: 100 }),
        ])
        .when(other.debited());
    then.then_expect_no_commands()
        .then_expect_state(case.state(SagaStep::Debiting, 0));
    assert_eq!(then.instance(), Some(case.transfer.to_string().as_str()));
}

#[test]
fn a_refused_debit_fails_the_transfer() {
    let case = Case::new();
    let reason = "insufficient funds: balance 10, requested 30";
    ProcessFixture::new(TransferSaga)
        .given([case.requested()])
        .when_refused(case.debit(), reason)
        .then_expect_commands([case.transfer(TransferCommand::Fail {
            reason: reason.into(),
        })])
        .then_expect_completed()
        .then_expect_no_deadlines();
}

#[test]
fn a_credit_refused_by_a_closed_account_is_refunded() {
    let case = Case::new();
    ProcessFixture::new(TransferSaga)
        .given([case.requested(), case.debited()])
        .when_refused(case.credit(), AccountError::Closed.to_string())
        .then_expect_commands([case.refund()])
        .then_expect_state(case.state(SagaStep::Refunding, 0))
        .then_expect_no_deadlines()
        .then_expect_not_completed()
        .when(case.refunded())
        .then_expect_commands([case.transfer(TransferCommand::Reverse {
            reason: "the credit did not happen; the money went back".into(),
        })])
        .then_expect_completed();
}

#[test]
fn a_frozen_target_is_retried_until_it_takes_the_credit() {
    let case = Case::new();
    ProcessFixture::new(TransferSaga)
        .given([case.requested(), case.debited()])
        .when_refused(case.credit(), frozen())
        .then_expect_no_commands()
        .then_expect_deadlines([
            (RETRY_DEADLINE, CREDIT_RETRY),
            (CREDIT_DEADLINE, CREDIT_TIMEOUT),
        ])
        .then_verify_state(|state| assert_eq!(state.credit_retries, 1))
        // Not yet: nothing fires, the deadlines come nearer.
        .when_time_passes(CREDIT_RETRY - std::time::Duration::from_secs(1))
        .then_expect_no_commands()
        .then_expect_deadlines([
            (RETRY_DEADLINE, std::time::Duration::from_secs(1)),
            (
                CREDIT_DEADLINE,
                CREDIT_TIMEOUT - CREDIT_RETRY + std::time::Duration::from_secs(1),
            ),
        ])
        // The retry comes: the credit is sent again, once; the retry deadline is gone.
        .when_time_passes(std::time::Duration::from_secs(1))
        .then_expect_commands([case.credit()])
        .then_expect_deadlines([(CREDIT_DEADLINE, CREDIT_TIMEOUT - CREDIT_RETRY)])
        // Refused again: a second retry.
        .when_refused(case.credit(), frozen())
        .then_expect_no_commands()
        .then_expect_deadlines([
            (RETRY_DEADLINE, CREDIT_RETRY),
            (CREDIT_DEADLINE, CREDIT_TIMEOUT - CREDIT_RETRY),
        ])
        .when_time_passes(CREDIT_RETRY)
        .then_expect_commands([case.credit()])
        .then_verify_state(|state| assert_eq!(state.credit_retries, 2))
        // Thawed: the credit went through.
        .when(case.credited())
        .then_expect_commands([case.transfer(TransferCommand::Complete)])
        .then_expect_completed()
        .then_expect_no_deadlines()
        // The credit deadline was dropped with the completion: it never fires.
        .when_time_passes(CREDIT_TIMEOUT * 2)
        .then_expect_no_commands();
}

#[test]
fn a_target_that_stays_frozen_is_refunded_when_the_credit_deadline_comes() {
    let case = Case::new();
    ProcessFixture::new(TransferSaga)
        .given([case.requested(), case.debited()])
        .when_refused(case.credit(), frozen())
        // Both came: the retry (due first) sends the credit again, then the credit
        // deadline refunds and cancels whatever retry is left.
        .when_time_passes(CREDIT_TIMEOUT)
        .then_expect_commands([case.credit(), case.refund()])
        .then_expect_no_deadlines()
        .then_expect_state(case.state(SagaStep::Refunding, 1))
        .when(case.refunded())
        .then_expect_commands([case.transfer(TransferCommand::Reverse {
            reason: "the credit did not happen; the money went back".into(),
        })])
        .then_expect_completed();
}

#[test]
fn a_credit_deadline_due_before_the_retry_refunds_first() {
    let case = Case::new();
    let late = std::time::Duration::from_secs(26);
    ProcessFixture::new(TransferSaga)
        .given([case.requested(), case.debited()])
        .when_time_passes(late)
        .then_expect_no_commands()
        // Refused at 26 s: the retry is due at 31 s, after the credit deadline (30 s).
        .when_refused(case.credit(), frozen())
        .then_expect_deadlines([
            (CREDIT_DEADLINE, CREDIT_TIMEOUT - late),
            (RETRY_DEADLINE, CREDIT_RETRY),
        ])
        // Both are due by 36 s: the credit deadline fires first and its refund cancels the
        // retry, which then does not fire.
        .when_time_passes(std::time::Duration::from_secs(10))
        .then_expect_commands([case.refund()])
        .then_expect_no_deadlines();
}

#[test]
fn the_credit_deadline_is_cancelled_when_the_credit_comes_first() {
    let case = Case::new();
    ProcessFixture::new(TransferSaga)
        .given([case.requested(), case.debited()])
        .when(case.credited())
        .then_expect_commands([case.transfer(TransferCommand::Complete)])
        .then_expect_no_deadlines()
        .when_time_passes(CREDIT_TIMEOUT + CREDIT_RETRY)
        .then_expect_no_commands()
        .then_expect_state(case.state(SagaStep::Done, 0));
}

#[test]
fn commands_carry_the_ids_the_runner_derives() {
    let case = Case::new();
    let event_id = Uuid::new_v4();
    let then = ProcessFixture::new(TransferSaga)
        .given_no_previous_events()
        .when(case.requested().with_event_id(event_id));
    let sent = then.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].command, case.debit());
    assert_eq!(
        sent[0].command_id,
        cqrs::derived_command_id(&format!("transfer_saga/{}", case.transfer), event_id, 0)
    );
}

/// The text of the panic `f` raises.
fn panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("the assertion should fail");
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload
            .downcast::<&str>()
            .map(|s| (*s).to_owned())
            .unwrap_or_default(),
    }
}

#[test]
fn a_wrong_command_names_the_difference_the_inputs_and_the_step() {
    let case = Case::new();
    let message = panic_message(|| {
        let _ = ProcessFixture::new(TransferSaga)
            .with_description("credit after debit")
            .given([case.requested()])
            .when(case.debited())
            .then_expect_commands([case.refund()]);
    });
    assert!(
        message.starts_with(
            "then_expect_commands (credit after debit) failed: the commands differ\n  first difference: command #1: expected Account("
        ),
        "{message}"
    );
    assert!(
        message.contains(&format!("got {:?}", case.credit())),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "process: transfer_saga, instance {}",
            case.transfer
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "given:\n    1. transfer {} #1: Transfer(Requested {{",
            case.transfer
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "when:\n    transfer_account {} #1: Account(Debited {{",
            case.from
        )),
        "{message}"
    );

    let message = panic_message(|| {
        let _ = ProcessFixture::new(TransferSaga)
            .given([case.requested()])
            .when(case.debited())
            .then_expect_no_commands();
    });
    assert!(
        message.contains("first difference: command #1 was not expected: Account("),
        "{message}"
    );
}

#[test]
fn wrong_deadlines_state_and_completion_are_reported() {
    let case = Case::new();
    let then = ProcessFixture::new(TransferSaga)
        .given([case.requested(), case.debited()])
        .when_refused(case.credit(), frozen())
        .when_time_passes(CREDIT_RETRY);

    let message = panic_message(|| {
        then.then_expect_deadlines([(CREDIT_DEADLINE, CREDIT_TIMEOUT)]);
    });
    assert!(
        message.starts_with(
            "then_expect_deadlines failed: the pending deadlines differ\n  expected: \"credit\" in 30s\n  actual:   \"credit\" in 25s"
        ),
        "{message}"
    );
    assert!(message.contains("time: start + 5s"), "{message}");
    assert!(
        message.contains(
            "when:\n    time passes 5s: deadline \"retry-credit\" (due start + 5s) fired"
        ),
        "{message}"
    );
    assert!(message.contains("    3. refused: Account("), "{message}");

    let message = panic_message(|| {
        then.then_expect_state(case.state(SagaStep::Done, 1));
    });
    assert!(
        message.contains("the state differs\n  first difference: at `$.step`: expected \"Done\", got \"Crediting\""),
        "{message}"
    );

    let message = panic_message(|| {
        then.then_expect_completed();
    });
    assert!(
        message.starts_with("then_expect_completed failed: the instance has not completed"),
        "{message}"
    );
}

#[test]
fn refusing_a_command_never_sent_is_a_test_error() {
    let case = Case::new();
    let message = panic_message(|| {
        let _ = ProcessFixture::new(TransferSaga)
            .given([case.requested()])
            .when_refused(case.credit(), "account closed");
    });
    assert!(
        message.starts_with("when_refused: the process never sent Account("),
        "{message}"
    );
    assert!(
        message.contains(&format!("commands sent so far:\n    1. {:?}", case.debit())),
        "{message}"
    );
}

/// Accounts, transfers and the saga's runner on one in-memory store.
fn world() -> (WorkflowScenario, TransferRouter) {
    let scenario = WorkflowScenario::new();
    let retry = RetryPolicy::attempts(20);
    let router = TransferRouter {
        accounts: Arc::new(
            CQRSFramework::<Account>::new(scenario.store().clone()).with_retry(retry),
        ),
        transfers: Arc::new(
            CQRSFramework::<Transfer>::new(scenario.store().clone()).with_retry(retry),
        ),
    };
    let scenario = scenario
        .with_description("transfer")
        .with_process(TransferSaga, router.clone());
    (scenario, router)
}

async fn open(router: &TransferRouter, initial: u64) -> Uuid {
    let id = Uuid::new_v4();
    router
        .accounts
        .dispatch(id, AccountCommand::Open { initial })
        .await
        .expect("the account opens");
    id
}

#[tokio::test]
async fn a_whole_transfer_is_one_workflow_across_three_aggregates() {
    let (scenario, router) = world();
    let (a, b) = (open(&router, 100).await, open(&router, 0).await);
    let transfer = Uuid::new_v4();

    let workflow = scenario
        .when(
            &router.transfers,
            transfer,
            TransferCommand::Request {
                from: a,
                to: b,
                amount: AMOUNT,
            },
        )
        .await;
    assert_eq!(workflow.dispatch_error(), None);
    assert_eq!(workflow.progress().commands, 3, "debit, credit, complete");
    // The accounts' openings carry no correlation id: not part of the workflow.
    workflow
        .then_expect_history([
            Happened::new("transfer", "TransferRequested").on(transfer),
            Happened::new("transfer_account", "TransferDebited")
                .on(a)
                .matching(Stored::any().at_sequence(2).with_payload(json!({
                    "Debited": { "transfer": transfer, "amount": AMOUNT }
                }))),
            Happened::new("transfer_account", "TransferCredited").on(b),
            Happened::new("transfer", "TransferCompleted").on(transfer),
        ])
        .then_expect_causation()
        .then_expect_events_per_command(1);
    assert_eq!(scenario.history().len(), 6);
}

#[tokio::test]
async fn a_frozen_target_thaws_and_the_workflow_completes_as_time_passes() {
    let (scenario, router) = world();
    let (a, b) = (open(&router, 100).await, open(&router, 0).await);
    router
        .accounts
        .dispatch(b, AccountCommand::Freeze)
        .await
        .expect("the account freezes");
    let transfer = Uuid::new_v4();
    let workflow = scenario
        .when(
            &router.transfers,
            transfer,
            TransferCommand::Request {
                from: a,
                to: b,
                amount: AMOUNT,
            },
        )
        .await;
    workflow.then_expect_history([
        ("transfer", "TransferRequested"),
        ("transfer_account", "TransferDebited"),
    ]);

    // The retry comes while still frozen: refused again, nothing stored.
    assert_eq!(scenario.advance(CREDIT_RETRY).await.deadlines, 1);
    workflow.then_expect_history([
        ("transfer", "TransferRequested"),
        ("transfer_account", "TransferDebited"),
    ]);

    router
        .accounts
        .dispatch(b, AccountCommand::Unfreeze)
        .await
        .expect("the account thaws");
    scenario.advance(CREDIT_RETRY).await;
    workflow
        .then_expect_history([
            ("transfer", "TransferRequested"),
            ("transfer_account", "TransferDebited"),
            ("transfer_account", "TransferCredited"),
            ("transfer", "TransferCompleted"),
        ])
        .then_expect_causation()
        .then_expect_events_per_command(1);

    // Completed: the credit deadline never fires.
    assert_eq!(scenario.advance(CREDIT_TIMEOUT * 2).await.deadlines, 0);
}

#[tokio::test]
async fn a_target_that_stays_frozen_is_refunded_by_the_deadline() {
    let (scenario, router) = world();
    let (a, b) = (open(&router, 100).await, open(&router, 0).await);
    router
        .accounts
        .dispatch(b, AccountCommand::Freeze)
        .await
        .expect("the account freezes");
    let transfer = Uuid::new_v4();
    let workflow = scenario
        .when(
            &router.transfers,
            transfer,
            TransferCommand::Request {
                from: a,
                to: b,
                amount: AMOUNT,
            },
        )
        .await;
    scenario.advance(CREDIT_TIMEOUT).await;
    workflow
        .then_expect_history([
            Happened::new("transfer", "TransferRequested"),
            Happened::new("transfer_account", "TransferDebited").on(a),
            Happened::new("transfer_account", "TransferRefunded").on(a),
            Happened::new("transfer", "TransferReversed").matching(Stored::any().with_payload(
                json!({ "Reversed": { "reason": "the credit did not happen; the money went back" } }),
            )),
        ])
        .then_expect_causation()
        .then_expect_events_per_command(1);

    // The fixture derives the refund's id as the runner did: from the instance and the
    // credit deadline (same start time, same due time).
    let case = Case {
        transfer,
        from: a,
        to: b,
    };
    let then = ProcessFixture::new(TransferSaga)
        .given([case.requested(), case.debited()])
        .when_refused(case.credit(), frozen())
        .when_time_passes(CREDIT_TIMEOUT);
    let refund = then.sent().into_iter().find(|s| s.command == case.refund());
    let refunded = workflow
        .events()
        .into_iter()
        .find(|e| e.event_type == "TransferRefunded");
    assert_eq!(
        refund.map(|s| s.command_id),
        refunded.and_then(|e| e.causation_id)
    );
}

#[tokio::test]
async fn a_wrong_history_names_the_first_differing_event() {
    let (scenario, router) = world();
    let (a, b) = (open(&router, 10).await, open(&router, 0).await);
    let workflow = scenario
        .when(
            &router.transfers,
            Uuid::new_v4(),
            TransferCommand::Request {
                from: a,
                to: b,
                amount: AMOUNT,
            },
        )
        .await;
    // Too little money: the debit is refused, the transfer fails.
    workflow.then_expect_history([
        ("transfer", "TransferRequested"),
        ("transfer", "TransferFailed"),
    ]);
    let message = panic_message(|| {
        workflow.then_expect_history([
            ("transfer", "TransferRequested"),
            ("transfer_account", "TransferDebited"),
        ]);
    });
    assert!(
        message.starts_with(
            "then_expect_history (transfer) failed: workflow event #2 differs: aggregate type: expected \"transfer_account\", stored \"transfer\""
        ),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "workflow: correlation {}",
            workflow.correlation_id()
        )),
        "{message}"
    );
    assert!(message.contains("TransferFailed v1"), "{message}");

    let message = panic_message(|| {
        workflow.then_expect_history([("transfer", "TransferRequested")]);
    });
    assert!(
        message.contains("expected 1 workflow events, found 2"),
        "{message}"
    );
}

#[tokio::test]
async fn a_command_that_took_effect_twice_breaks_the_causation_checks() {
    let (scenario, router) = world();
    let (a, b) = (open(&router, 100).await, open(&router, 100).await);
    // One command id on two aggregates: what a rerun of a command on the wrong target, or
    // an id reused by mistake, leaves behind.
    let context = CommandContext::new();
    let workflow = scenario
        .when_with_context(&router.accounts, a, AccountCommand::Freeze, context.clone())
        .await;
    router
        .accounts
        .dispatch_with_context(b, AccountCommand::Freeze, &context)
        .await
        .expect("the account freezes");
    let message = panic_message(|| {
        workflow.then_expect_causation();
    });
    assert!(
        message.contains(&format!(
            "command {} caused events on two aggregates",
            context.command_id()
        )),
        "{message}"
    );

    // The same command applied again on one aggregate after another command: two appends.
    let context = CommandContext::new();
    let workflow = scenario
        .when_with_context(
            &router.accounts,
            a,
            AccountCommand::Unfreeze,
            context.clone(),
        )
        .await;
    router
        .accounts
        .dispatch(a, AccountCommand::Freeze)
        .await
        .expect("the account freezes");
    router
        .accounts
        .dispatch_with_context(a, AccountCommand::Unfreeze, &context)
        .await
        .expect("the account thaws");
    let message = panic_message(|| {
        workflow.then_expect_causation();
    });
    assert!(
        message.contains(&format!(
            "command {} caused events in two appends: sequence 3 and (workflow event #2) sequence 5",
            context.command_id()
        )),
        "{message}"
    );

    // The same command applied twice on one aggregate (no `once`): two events of one cause.
    let context = CommandContext::new();
    let workflow = scenario
        .when_with_context(
            &router.accounts,
            a,
            AccountCommand::Unfreeze,
            context.clone(),
        )
        .await;
    router
        .accounts
        .dispatch_with_context(a, AccountCommand::Freeze, &context)
        .await
        .expect("the account freezes");
    let message = panic_message(|| {
        workflow.then_expect_events_per_command(1);
    });
    assert!(
        message.contains(&format!(
            "expected 1 event(s) per command\n    1. command {}: 2 events",
            context.command_id()
        )),
        "{message}"
    );
}
