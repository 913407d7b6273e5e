//! A batch of SQS messages through the per-aggregate projection: what the Lambda SQS handler
//! and the SQS consumer share.

use std::collections::HashSet;

use cqrs::{
    Aggregate, CQRSError, EventOutcome, PerAggregateProjection, PersistableDomainEvent, View,
};

use crate::envelope;

/// One received message, as the batch needs it.
pub(crate) struct Delivered<'a> {
    /// The message body: an event envelope, or an SNS notification carrying one.
    pub(crate) body: &'a str,
    /// The message group, for a message of a FIFO queue; `None` otherwise.
    pub(crate) group: Option<&'a str>,
}

/// What became of one message.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Committed or skipped: done with, the message can go.
    Done(EventOutcome),
    /// Not applied: not an envelope, or an event the projection failed.
    Failed(CQRSError),
    /// A message after a failed one of its FIFO group: to be delivered again after it. Not
    /// applied when it follows a body that is not an envelope; applied (and skipped when
    /// delivered again) when it follows an event the projection failed, which its own
    /// aggregate's checkpoint keeps in order.
    HeldBack,
}

impl Verdict {
    /// True for [`Verdict::Done`].
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Verdict::Done(_))
    }
}

/// Decodes the messages' envelopes, applies their events through `projection`, and says
/// per message (in the batch's order) what became of it.
pub(crate) async fn apply<A: Aggregate, V: View<A>>(
    projection: &PerAggregateProjection<A, V>,
    messages: &[Delivered<'_>],
) -> Vec<Verdict> {
    // The groups of a FIFO queue that failed in this batch: their later messages are held
    // back, and not applied when the failure is known before the projection runs.
    let mut failed_groups: HashSet<&str> = HashSet::new();
    let read: Vec<Option<Result<PersistableDomainEvent, CQRSError>>> = messages
        .iter()
        .map(|message| {
            if message
                .group
                .is_some_and(|group| failed_groups.contains(group))
            {
                return None;
            }
            let read = envelope::decode(message.body);
            if let (Err(_), Some(group)) = (&read, message.group) {
                failed_groups.insert(group);
            }
            Some(read)
        })
        .collect();
    let events: Vec<PersistableDomainEvent> = read
        .iter()
        .filter_map(|read| read.as_ref()?.as_ref().ok().cloned())
        .collect();
    let mut outcomes = projection.apply(&events).await.into_iter();
    failed_groups.clear();
    let mut verdicts = Vec::with_capacity(messages.len());
    for (message, read) in messages.iter().zip(read) {
        let verdict = match read {
            None => Verdict::HeldBack,
            Some(Ok(_)) => match outcomes.next() {
                Some(EventOutcome::Failed(error)) => Verdict::Failed(error),
                Some(outcome) => Verdict::Done(outcome),
                // One outcome per event: not reached.
                None => Verdict::Failed(CQRSError::persistence(
                    "the projection gave no outcome for an event of the batch",
                )),
            },
            Some(Err(error)) => Verdict::Failed(error),
        };
        let held_back = message
            .group
            .is_some_and(|group| failed_groups.contains(group));
        let verdict = match verdict {
            Verdict::Done(_) if held_back => Verdict::HeldBack,
            verdict => verdict,
        };
        if !verdict.is_done() {
            if let Some(group) = message.group {
                failed_groups.insert(group);
            }
        }
        verdicts.push(verdict);
    }
    verdicts
}
