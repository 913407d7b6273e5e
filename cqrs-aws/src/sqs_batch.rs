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
///
/// A message in the damaged form ([`envelope::encode_damaged_row`]) is a poison event of its
/// aggregate: the messages before it are applied first, then it goes to
/// [`PerAggregateProjection::apply_damaged`] (a dead letter under `SkipAndRecord`, a failure
/// under `Stop`), then the messages after it.
pub(crate) async fn apply<A: Aggregate, V: View<A>>(
    projection: &PerAggregateProjection<A, V>,
    messages: &[Delivered<'_>],
) -> Vec<Verdict> {
    let mut read: Vec<Option<Result<PersistableDomainEvent, CQRSError>>> = messages
        .iter()
        .map(|message| Some(envelope::decode(message.body)))
        .collect();
    let mut verdicts = Vec::with_capacity(messages.len());
    // The FIFO groups that failed in an earlier part of the batch.
    let mut failed_groups: HashSet<&str> = HashSet::new();
    let mut start = 0;
    while start < messages.len() {
        let end = (start..messages.len())
            .find(|&index| matches!(read[index], Some(Err(CQRSError::DamagedRow(_)))))
            .unwrap_or(messages.len());
        verdicts.extend(
            apply_part(
                projection,
                &messages[start..end],
                &mut read[start..end],
                &mut failed_groups,
            )
            .await,
        );
        let Some(Some(Err(CQRSError::DamagedRow(damage)))) = read.get(end) else {
            break;
        };
        let group = messages[end].group;
        let verdict = if group.is_some_and(|group| failed_groups.contains(group)) {
            Verdict::HeldBack
        } else {
            match projection.apply_damaged(damage).await {
                EventOutcome::Failed(error) => Verdict::Failed(error),
                outcome => Verdict::Done(outcome),
            }
        };
        if let (false, Some(group)) = (verdict.is_done(), group) {
            failed_groups.insert(group);
        }
        verdicts.push(verdict);
        start = end + 1;
    }
    verdicts
}

/// [`apply`] on a part of the batch without damaged-form messages, after the groups
/// `failed_groups` failed (which it extends with its own).
async fn apply_part<'a, A: Aggregate, V: View<A>>(
    projection: &PerAggregateProjection<A, V>,
    messages: &[Delivered<'a>],
    decoded: &mut [Option<Result<PersistableDomainEvent, CQRSError>>],
    failed_groups: &mut HashSet<&'a str>,
) -> Vec<Verdict> {
    // The groups of a FIFO queue that failed: their later messages are held back, and not
    // applied when the failure is known before the projection runs.
    let before = failed_groups.clone();
    let mut read: Vec<Option<Result<PersistableDomainEvent, CQRSError>>> = Vec::new();
    for (message, decoded) in messages.iter().zip(decoded.iter_mut()) {
        if message
            .group
            .is_some_and(|group| failed_groups.contains(group))
        {
            read.push(None);
            continue;
        }
        let decoded = decoded.take();
        if let (Some(Err(_)), Some(group)) = (&decoded, message.group) {
            failed_groups.insert(group);
        }
        read.push(decoded);
    }
    let events: Vec<PersistableDomainEvent> = read
        .iter()
        .filter_map(|read| read.as_ref()?.as_ref().ok().cloned())
        .collect();
    let mut outcomes = projection.apply(&events).await.into_iter();
    *failed_groups = before;
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
