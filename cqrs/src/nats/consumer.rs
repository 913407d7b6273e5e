//! The JetStream-fed projection: a durable pull consumer, a thin source of the projection
//! engine.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::error::{CQRSError, DamagedRow};
use crate::event::PersistableDomainEvent;
use crate::projection::{Applied, Core, HandlerRetry, PoisonPolicy, Projection, ProjectionHandle};
use crate::store::{DeadLetter, DeadLetters, ViewRepository};
use crate::task::{backoff, is_transient, Stop};
use crate::view::View;

use super::codec::{decode_message, position_header};
use super::tail::stream_end;
use super::{broker, NatsStreamConfig};

/// A message whose body is not a [`PersistableDomainEvent`], terminated and passed over by a
/// [`NatsProjection`] under [`PoisonPolicy::SkipAndRecord`] (an event that decodes but cannot
/// be applied becomes a [`DeadLetter`] instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndecodableMessage {
    /// The message's subject.
    pub subject: String,
    /// The message's sequence in the stream.
    pub stream_sequence: u64,
    /// The decoding error, rendered.
    pub error: String,
}

/// Keeps one view up to date from a JetStream stream written by
/// [`NatsRelay`](super::NatsRelay): the same projection engine as the store-fed
/// [`Projection`], fed by a durable pull consumer instead of store reads.
///
/// It reads the events of aggregate type `A` (subjects `<prefix>.<A::NAME>.>`) and hands
/// each pulled batch to the engine, which applies the events to the view instances they
/// concern and commits the view changes together with the checkpoint (the global position of
/// the last event applied) in one [`ViewRepository::commit`]. Messages are acknowledged only
/// after that commit; one whose position is not above the checkpoint is acknowledged
/// without being applied. With a view store that commits atomically, every event affects the
/// view exactly once, however often messages are redelivered or the process dies.
///
/// Poison events behave as in [`Projection`]: a failing event is retried per
/// [`HandlerRetry`] (a stop request interrupts the wait), then handled per [`PoisonPolicy`],
/// the events before it committed first; under `SkipAndRecord` the dead letter is recorded
/// exactly once when the sink shares the view store's database
/// ([`DeadLetters::record_and_skip`]). A message the store's damaged row became is a poison
/// event at its position. A message that is not an event at all has no position: it is
/// terminated, and listed in [`undecodable`](Self::undecodable) under `SkipAndRecord`.
///
/// The checkpoint is the truth, not the consumer's acknowledgement floor: when the projection
/// starts (and after any failure) it recreates its durable consumer at the first stream
/// message after the checkpoint, and before a batch commits the engine checks that no other
/// projector moved the checkpoint. The checkpoint name defaults to
/// [`Projection::default_name`], the one the store-fed [`Projection`] uses, so a view can
/// move between the two sources without a rebuild.
///
/// When it (re)creates its consumer, the projection also reads the stream's newest event: a
/// checkpoint beyond it (the stream lost its newest messages in a server crash, or was
/// deleted and recreated, or its relay has not published them yet) is
/// [`CQRSError::StreamBehind`], not a wait for messages that may never come.
/// [`catch_up`](Self::catch_up) returns it; a running projection shows it as its last error
/// and tries again with a backoff until the relay has published those events again.
///
/// The stream must keep every message a view has not consumed yet (do not let retention
/// remove them); rebuild a view from the store with [`Projection`] otherwise.
pub struct NatsProjection<A: Aggregate, V: View<A>> {
    jetstream: jetstream::Context,
    stream: NatsStreamConfig,
    core: Core<A, V>,
    durable_name: String,
    batch_size: usize,
    ack_wait: Duration,
    fetch_wait: Duration,
    consumer: tokio::sync::Mutex<Option<ConsumerState>>,
    undecodable: Arc<Mutex<Vec<UndecodableMessage>>>,
    _marker: PhantomData<fn() -> (A, V)>,
}

impl<A: Aggregate, V: View<A>> fmt::Debug for NatsProjection<A, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsProjection")
            .field("name", &self.core.name)
            .field("durable_name", &self.durable_name)
            .field("stream", &self.stream)
            .field("batch_size", &self.batch_size)
            .field("poison", &self.core.poison)
            .field("retry", &self.core.retry)
            .finish_non_exhaustive()
    }
}

/// The consumer a projection pulls from, and the delivery sequence it expects next.
struct ConsumerState {
    consumer: PullConsumer,
    next_delivery: u64,
}

/// Collects the messages of one pull request until the server ends it.
async fn drain<S>(mut batch: S, into: &mut Vec<jetstream::Message>) -> Result<(), CQRSError>
where
    S: futures_util::Stream<Item = Result<jetstream::Message, async_nats::Error>> + Unpin,
{
    while let Some(message) = batch.next().await {
        into.push(message.map_err(broker)?);
    }
    Ok(())
}

/// A pulled message, read.
enum Read {
    /// An event: its index in the batch's events.
    Event(usize),
    /// The message a damaged row of the store became.
    Damaged(DamagedRow),
    /// A body that is not an event (taken once it is reported).
    NotAnEvent(Option<CQRSError>),
}

/// A pulled batch: the messages, what each one is, and the events among them in order.
struct Pulled {
    messages: Vec<(jetstream::Message, Read)>,
    events: Vec<PersistableDomainEvent>,
}

impl Pulled {
    fn read(messages: Vec<jetstream::Message>) -> Self {
        let mut events = Vec::with_capacity(messages.len());
        let messages = messages
            .into_iter()
            .map(|message| {
                let stream_sequence = message.info().map_or(0, |info| info.stream_sequence);
                let read = match decode_message(&message.subject, stream_sequence, &message.payload)
                {
                    Ok(event) => {
                        events.push(event);
                        Read::Event(events.len() - 1)
                    }
                    Err(CQRSError::DamagedRow(damage)) => Read::Damaged(*damage),
                    Err(error) => Read::NotAnEvent(Some(error)),
                };
                (message, read)
            })
            .collect();
        Pulled { messages, events }
    }

    /// The global position of message `index`, if it has one.
    fn position(&self, index: usize) -> Option<i64> {
        match &self.messages[index].1 {
            Read::Event(event) => Some(self.events[*event].position),
            Read::Damaged(damage) => Some(damage.position),
            Read::NotAnEvent(_) => None,
        }
    }

    /// The run of events from message `start` on that the engine can take as one batch
    /// after `checkpoint`: consecutive event messages with growing positions. Returns the
    /// range of events and the index of the first message after the run.
    fn run_from(&self, start: usize, checkpoint: i64) -> (std::ops::Range<usize>, usize) {
        let Read::Event(first) = self.messages[start].1 else {
            return (0..0, start);
        };
        let mut last_position = checkpoint;
        let mut end = start;
        while let Some((_, Read::Event(event))) = self.messages.get(end) {
            let position = self.events[*event].position;
            if position <= last_position {
                break;
            }
            last_position = position;
            end += 1;
        }
        (first..first + (end - start), end)
    }
}

impl<A: Aggregate, V: View<A>> NatsProjection<A, V> {
    /// A projection of `V` from `stream` into `views`, checkpointed under
    /// [`Projection::default_name`], with a durable consumer of the same name, reading 256
    /// messages per batch, stopping on a poison message.
    pub fn new(
        jetstream: jetstream::Context,
        stream: NatsStreamConfig,
        views: impl ViewRepository<A, V> + 'static,
    ) -> Self {
        let name = Projection::<A, V>::default_name();
        NatsProjection {
            jetstream,
            stream,
            durable_name: name.clone(),
            core: Core::new(Arc::new(views), name),
            batch_size: 256,
            ack_wait: Duration::from_secs(30),
            fetch_wait: Duration::from_millis(500),
            consumer: tokio::sync::Mutex::new(None),
            undecodable: Arc::new(Mutex::new(Vec::new())),
            _marker: PhantomData,
        }
    }

    /// Uses another checkpoint name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.core.name = name.into();
        self
    }

    /// Uses another durable consumer name (letters, digits, `-` and `_`).
    #[must_use]
    pub fn with_durable_name(mut self, name: impl Into<String>) -> Self {
        self.durable_name = name.into();
        self
    }

    /// Reads and commits up to `batch_size` messages at a time (default 256, at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// What to do with a poison event once the retries are spent (default
    /// [`PoisonPolicy::Stop`]), as for [`Projection::with_poison_policy`].
    #[must_use]
    pub fn with_poison_policy(mut self, policy: PoisonPolicy) -> Self {
        self.core.poison = policy;
        self
    }

    /// How often a failing event is tried, and the backoff between tries (default
    /// [`HandlerRetry::default`]: 3 tries, 100 ms then 200 ms), as for
    /// [`Projection::with_handler_retry`]. Keep the total wait well under the ack wait.
    #[must_use]
    pub fn with_handler_retry(mut self, retry: HandlerRetry) -> Self {
        self.core.set_retry(retry);
        self
    }

    /// Where [`PoisonPolicy::SkipAndRecord`] records skipped events (default: a
    /// [`MemoryDeadLetters`](crate::MemoryDeadLetters) owned by this projection), as for
    /// [`Projection::with_dead_letters`].
    #[must_use]
    pub fn with_dead_letters(mut self, sink: impl DeadLetters + 'static) -> Self {
        self.core.dead_letters = Arc::new(sink);
        self
    }

    /// How many loads of view rows a batch runs at once (default 8, at least 1), as for
    /// [`Projection::with_load_concurrency`].
    #[must_use]
    pub fn with_load_concurrency(mut self, loads: usize) -> Self {
        self.core.load_concurrency = loads.max(1);
        self
    }

    /// How long the server waits for an acknowledgement before redelivering (default 30 s).
    #[must_use]
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// How long the background projection waits for new messages in one pull (default
    /// 500 ms); a message that arrives meanwhile is delivered at once.
    #[must_use]
    pub fn with_fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The global position of the last event applied.
    ///
    /// # Errors
    /// The view store's error.
    pub async fn position(&self) -> Result<i64, CQRSError> {
        self.core.checkpoint().await
    }

    /// The events this projection skipped under [`PoisonPolicy::SkipAndRecord`], from its
    /// dead-letter sink.
    ///
    /// # Errors
    /// The sink's error.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, CQRSError> {
        self.core.dead_letters().await
    }

    /// The messages that were not events at all and were passed over under
    /// [`PoisonPolicy::SkipAndRecord`] by this instance, oldest first.
    pub fn undecodable(&self) -> Vec<UndecodableMessage> {
        self.undecodable_list().clone()
    }

    fn undecodable_list(&self) -> MutexGuard<'_, Vec<UndecodableMessage>> {
        self.undecodable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The global position in a stored message's `Cqrs-Position` header.
    async fn position_at(&self, stream: &stream::Stream, sequence: u64) -> Option<i64> {
        let message = stream.get_raw_message(sequence).await.ok()?;
        position_header(&message.headers)
    }

    /// The first stream sequence whose event is after `checkpoint`, or an earlier one (which
    /// is always safe: earlier events are acknowledged without being applied).
    async fn start_sequence(
        &self,
        stream: &mut stream::Stream,
        checkpoint: i64,
    ) -> Result<u64, CQRSError> {
        let state = stream.info().await.map_err(broker)?.state.clone();
        let first = state.first_sequence.max(1);
        if checkpoint <= 0 || state.messages == 0 {
            return Ok(first);
        }
        // The relay publishes in global order, so positions grow with stream sequences.
        let (mut low, mut high) = (first, state.last_sequence.saturating_add(1));
        while low < high {
            let middle = low + (high - low) / 2;
            match self.position_at(stream, middle).await {
                Some(position) if position > checkpoint => high = middle,
                Some(_) => low = middle + 1,
                // A deleted message or one without the header: start from the beginning.
                None => return Ok(first),
            }
        }
        Ok(low)
    }

    /// (Re)creates the durable consumer at the first message after the checkpoint.
    async fn open_consumer(&self) -> Result<PullConsumer, CQRSError> {
        let mut stream = self
            .jetstream
            .get_stream(&self.stream.stream_name())
            .await
            .map_err(broker)?;
        let checkpoint = self.core.checkpoint().await?;
        self.core.publish(checkpoint);
        // A stream that ends before the checkpoint would never deliver what comes next.
        let end = stream_end(&self.jetstream, &mut stream, &self.stream).await?;
        if end.position < checkpoint {
            return Err(CQRSError::StreamBehind {
                stream: self.stream.stream_name().to_owned(),
                projection: self.core.name.clone(),
                holds: end.position,
                checkpoint,
            });
        }
        let start_sequence = self.start_sequence(&mut stream, checkpoint).await?;
        // Absent the first time: nothing to delete.
        let _ = stream.delete_consumer(&self.durable_name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(self.durable_name.clone()),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.ack_wait,
                filter_subject: self.stream.aggregate_subjects(A::NAME),
                ..Default::default()
            })
            .await
            .map_err(broker)?;
        tracing::debug!(
            projection = %self.core.name,
            consumer = %self.durable_name,
            checkpoint,
            start_sequence,
            "NATS consumer positioned after the checkpoint"
        );
        Ok(consumer)
    }

    /// Pulls one batch and applies it; returns how many messages it handled. With `wait`,
    /// first waits up to that long for one message (a long poll that ends as soon as one
    /// arrives, or when a stop is asked), then takes what else is there without waiting.
    /// Every pull request is drained before the next one, so no delivery is left in flight.
    async fn pull_once(&self, wait: Option<Duration>, stop: &mut Stop) -> Result<usize, CQRSError> {
        let mut slot = self.consumer.lock().await;
        if slot.is_none() {
            *slot = Some(ConsumerState {
                consumer: self.open_consumer().await?,
                next_delivery: 1,
            });
        }
        let Some(state) = slot.as_mut() else {
            return Ok(0);
        };
        let result = self.pull_and_apply(state, wait, stop).await;
        if result.is_err() {
            // Reposition from the checkpoint next time: nothing after it is lost, and a
            // message that stopped the projection comes back first.
            *slot = None;
        }
        result
    }

    async fn pull_and_apply(
        &self,
        state: &mut ConsumerState,
        wait: Option<Duration>,
        stop: &mut Stop,
    ) -> Result<usize, CQRSError> {
        let mut messages = Vec::new();
        if let Some(wait) = wait {
            let batch = state
                .consumer
                .batch()
                .max_messages(1)
                .expires(wait)
                .messages()
                .await
                .map_err(broker)?;
            let mut interrupt = stop.clone();
            tokio::select! {
                drained = drain(batch, &mut messages) => drained?,
                // A delivery of the abandoned request is redelivered after the ack wait, or
                // at once to the consumer the next start recreates.
                () = interrupt.stopped() => return Ok(0),
            }
            if messages.is_empty() {
                return Ok(0);
            }
        }
        if self.batch_size > messages.len() {
            let batch = state
                .consumer
                .fetch()
                .max_messages(self.batch_size - messages.len())
                .messages()
                .await
                .map_err(broker)?;
            drain(batch, &mut messages).await?;
        }
        // Every delivery, redeliveries included, takes the consumer's next delivery sequence.
        // A hole means a delivery was lost (a reconnect): the messages after it must not be
        // applied before it, so stop there and reposition from the checkpoint.
        let mut gap = None;
        for (index, message) in messages.iter().enumerate() {
            let delivery = message.info().map_err(broker)?.consumer_sequence;
            if delivery != state.next_delivery {
                gap = Some((index, delivery));
                break;
            }
            state.next_delivery += 1;
        }
        if let Some((index, _)) = gap {
            messages.truncate(index);
        }
        let handled = self.apply_until(messages, stop).await?;
        match gap {
            Some((_, delivery)) => Err(CQRSError::persistence(format!(
                "JetStream consumer {} skipped deliveries {} to {}; repositioning it from the \
                 checkpoint",
                self.durable_name,
                state.next_delivery,
                delivery.saturating_sub(1)
            ))),
            None => Ok(handled),
        }
    }

    /// Applies every message the stream holds now; returns the new checkpoint position.
    /// Once caught up, the view's version is made the active one, as
    /// [`Projection::catch_up`] does.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] for a broker or store failure;
    /// [`CQRSError::StreamBehind`] when the checkpoint is beyond the stream's newest event
    /// (see [`NatsProjection`]); under
    /// [`PoisonPolicy::Stop`] (once the retries are spent), [`CQRSError::Deserialization`]
    /// for a body that is not an event, [`CQRSError::EventDecode`],
    /// [`CQRSError::ViewHandler`] or [`CQRSError::DamagedRow`] naming the event. Batches
    /// committed before the error stay committed; the checkpoint stays just before the
    /// poison event.
    pub async fn catch_up(&self) -> Result<i64, CQRSError> {
        while self.pull_once(None, &mut Stop::never()).await? > 0 {}
        self.core.caught_up().await?;
        self.position().await
    }

    /// Waits until the checkpoint reaches `position` (for reading your own writes), applying
    /// messages as they arrive, for at most `timeout`, as [`Projection::wait_for`] does. A
    /// running projection's [`ProjectionHandle::wait_for`] waits without pulling itself.
    ///
    /// # Errors
    /// [`CQRSError::Timeout`], or what [`catch_up`](Self::catch_up) returns.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> Result<i64, CQRSError> {
        let work = async {
            loop {
                let reached = self.catch_up().await?;
                if reached >= position {
                    return Ok(reached);
                }
                self.pull_once(Some(self.fetch_wait), &mut Stop::never())
                    .await?;
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| CQRSError::Timeout(timeout))?
    }

    /// Applies messages fetched from any consumer of the stream (the background runner and
    /// [`catch_up`](Self::catch_up) use it with their own), in order, through the projection
    /// engine, then acknowledges every message the checkpoint has passed. Returns how many
    /// messages were handled (acknowledged or terminated).
    ///
    /// # Errors
    /// As [`catch_up`](Self::catch_up). On an error, the messages before the failing one are
    /// committed and acknowledged; the ones from it on are left for redelivery.
    pub async fn apply_messages(
        &self,
        messages: Vec<jetstream::Message>,
    ) -> Result<usize, CQRSError> {
        self.apply_until(messages, &mut Stop::never()).await
    }

    async fn apply_until(
        &self,
        messages: Vec<jetstream::Message>,
        stop: &mut Stop,
    ) -> Result<usize, CQRSError> {
        if messages.is_empty() {
            return Ok(0);
        }
        let checkpoint = self.core.checkpoint().await?;
        self.core.publish(checkpoint);
        let span = tracing::debug_span!(
            "nats_projection_batch",
            projection = %self.core.name,
            view = V::TABLE_NAME,
            after = checkpoint,
            messages = messages.len(),
        );
        self.apply_pulled(Pulled::read(messages), checkpoint, stop)
            .instrument(span)
            .await
    }

    /// Feeds the pulled messages after `checkpoint` to the engine, run by run, then
    /// acknowledges what the checkpoint passed.
    async fn apply_pulled(
        &self,
        mut pulled: Pulled,
        mut checkpoint: i64,
        stop: &mut Stop,
    ) -> Result<usize, CQRSError> {
        let mut outcome = Ok(());
        let mut terminated = 0;
        let mut stale = 0;
        let mut next = 0;
        while next < pulled.messages.len() {
            if pulled
                .position(next)
                .is_some_and(|position| position <= checkpoint)
            {
                // Already applied: a redelivery, or a batch committed but not acknowledged.
                next += 1;
                continue;
            }
            let (applied, reached, after) = match &mut pulled.messages[next] {
                (message, Read::NotAnEvent(error)) => {
                    let error = error.take().unwrap_or_else(|| {
                        CQRSError::persistence("a NATS message that is not an event")
                    });
                    // It can never decode: terminate it whatever the policy.
                    tracing::error!(
                        projection = %self.core.name, subject = %message.subject, %error,
                        "NATS message is not an event; terminating it"
                    );
                    term(message).await;
                    terminated += 1;
                    if self.core.poison != PoisonPolicy::SkipAndRecord {
                        outcome = Err(error);
                        break;
                    }
                    self.undecodable_list().push(UndecodableMessage {
                        subject: message.subject.to_string(),
                        stream_sequence: message.info().map_or(0, |info| info.stream_sequence),
                        error: error.to_string(),
                    });
                    next += 1;
                    continue;
                }
                (_, Read::Damaged(damage)) => {
                    // Reading it again cannot help: the relay published what the store held.
                    let applied = self
                        .core
                        .handle_damaged_row(checkpoint, damage, None, stop)
                        .await;
                    (applied, damage.position, next + 1)
                }
                (_, Read::Event(_)) => {
                    let (events, after) = pulled.run_from(next, checkpoint);
                    let batch = &pulled.events[events];
                    let reached = batch.last().map_or(checkpoint, |event| event.position);
                    let applied = self.core.apply_batch(checkpoint, batch, stop).await;
                    (applied, reached, after)
                }
            };
            match applied {
                Ok(Applied::Committed) => {
                    stale = 0;
                    checkpoint = reached;
                    next = after;
                }
                Ok(Applied::Stale) => {
                    match self.core.resume_after_stale(checkpoint, &mut stale).await {
                        Ok(moved) => checkpoint = moved,
                        Err(error) => {
                            outcome = Err(error);
                            break;
                        }
                    }
                }
                Ok(Applied::Stopped) => break,
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            }
        }
        if outcome.is_err() {
            // The engine commits the events before a poison one on their own.
            if let Ok(stored) = self.core.checkpoint().await {
                checkpoint = checkpoint.max(stored);
            }
        }
        // Only now that the effect is committed; the rest is left unacknowledged and the
        // consumer is repositioned after an error.
        let mut handled = terminated;
        for index in 0..pulled.messages.len() {
            if pulled
                .position(index)
                .is_some_and(|position| position <= checkpoint)
            {
                pulled.messages[index].0.ack().await.map_err(broker)?;
                handled += 1;
            }
        }
        outcome.map(|()| handled)
    }

    /// Runs the projection in a background task and returns its handle, the same
    /// [`ProjectionHandle`] a store-fed [`Projection::start`] returns: catches up, then
    /// applies messages as they arrive (one pull waits up to `fetch_wait`). A broker or
    /// store failure, or a stream behind the checkpoint ([`CQRSError::StreamBehind`]), is
    /// retried with a backoff (up to 5 s) from the checkpoint and shown as the handle's
    /// [`last_error`](ProjectionHandle::last_error); a poison event under
    /// [`PoisonPolicy::Stop`] ends the task with its error, which
    /// [`ProjectionHandle::wait`] returns. Dropping the handle stops the projection.
    #[must_use = "dropping the handle stops the projection"]
    pub fn start(self) -> ProjectionHandle {
        ProjectionHandle::spawn(self.core.watch(), |stop| self.run_until(stop))
    }

    async fn run_until(self, mut stop: Stop) -> Result<(), CQRSError> {
        let span = tracing::info_span!(
            "nats_projection",
            projection = %self.core.name,
            view = V::TABLE_NAME,
            view_version = V::VERSION,
        );
        async {
            let mut failures: u32 = 0;
            loop {
                if stop.is_stopped() {
                    return Ok(());
                }
                let pulled = async {
                    let pulled = self.pull_once(Some(self.fetch_wait), &mut stop).await?;
                    if pulled == 0 {
                        self.core.caught_up().await?;
                    }
                    Ok(pulled)
                }
                .await;
                match pulled {
                    Ok(_) => failures = 0,
                    Err(error) if is_transient(&error) => {
                        failures = failures.saturating_add(1);
                        let wait = backoff(failures);
                        tracing::warn!(%error, retry_in = ?wait, "NATS projection failed; retrying");
                        self.core.shared.set_last_error(Some(error.to_string()));
                        if stop.sleep(wait).await {
                            return Ok(());
                        }
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        .instrument(span)
        .await
    }
}

async fn term(message: &jetstream::Message) {
    if let Err(error) = message.ack_with(AckKind::Term).await {
        tracing::warn!(%error, "could not terminate a NATS message; it will be redelivered");
    }
}
