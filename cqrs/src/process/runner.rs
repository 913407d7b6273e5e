//! Running a process manager: read the store after the checkpoint, decide, send the
//! commands exactly once in effect, commit the instances with the checkpoint, fire the
//! deadlines that came.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use super::{
    Clock, CommandRouter, Deadline, Effects, ProcessInput, ProcessManager, ProcessRow,
    ProcessStore, Refused, SendError, SystemClock,
};
use crate::error::CQRSError;
use crate::event::{EventEnvelope, PersistableDomainEvent};
use crate::framework::{derived_command_id, CommandContext};
use crate::projection::{ProjectionHandle, Watched};
use crate::store::memory::MemoryDeadLetters;
use crate::store::EventRepository;
use crate::task::{backoff, is_transient, Shared, Stop};

/// How many rounds of refusals one event or deadline may go through (see
/// [`CQRSError::ProcessLoop`]).
const MAX_REFUSAL_ROUNDS: u32 = 16;

/// What one [`ProcessRunner::run_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessProgress {
    /// Events read (whether the process reacted to them or not).
    pub events: usize,
    /// Deadlines fired.
    pub deadlines: usize,
    /// Commands sent (accepted, refused, or recognised as already applied).
    pub commands: usize,
    /// The checkpoint after the step.
    pub position: i64,
}

impl ProcessProgress {
    /// True when the step found nothing to do.
    pub fn is_idle(&self) -> bool {
        self.events == 0 && self.deadlines == 0
    }
}

/// Runs a [`ProcessManager`] (see its docs for the guarantees): step by step with
/// [`run_once`](Self::run_once) / [`run_until_idle`](Self::run_until_idle), or on a task
/// with [`start`](Self::start).
///
/// The runner is meant to run once per process (like a projection): two runners of one
/// process do not apply a command twice (a command's id and `once` see to it, and the
/// instance rows are versioned), but they do duplicate work and retry conflicts.
pub struct ProcessRunner<P: ProcessManager> {
    manager: Arc<P>,
    events: Arc<dyn EventRepository>,
    store: Arc<dyn ProcessStore>,
    router: Arc<dyn CommandRouter<P::Command>>,
    clock: Arc<dyn Clock>,
    batch_size: usize,
    poll_interval: Duration,
    progress: watch::Sender<i64>,
    shared: Arc<Shared>,
}

impl<P: ProcessManager> fmt::Debug for ProcessRunner<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessRunner")
            .field("process", &P::NAME)
            .field("clock", &self.clock)
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

/// One instance as a step holds it: its row, its decoded state, and whether a decision
/// changed it.
struct Instance<S> {
    row: ProcessRow,
    state: S,
    touched: bool,
}

impl<P: ProcessManager> ProcessRunner<P> {
    /// A runner of `manager`, reading `events`, keeping instances in `store`, sending
    /// commands through `router`, on the system clock.
    pub fn new(
        manager: P,
        events: impl EventRepository + 'static,
        store: impl ProcessStore + 'static,
        router: impl CommandRouter<P::Command> + 'static,
    ) -> Self {
        ProcessRunner {
            manager: Arc::new(manager),
            events: Arc::new(events),
            store: Arc::new(store),
            router: Arc::new(router),
            clock: Arc::new(SystemClock),
            batch_size: 100,
            poll_interval: Duration::from_millis(200),
            progress: watch::channel(0).0,
            shared: Arc::new(Shared::default()),
        }
    }

    /// Takes the time from `clock` (a [`ManualClock`](super::ManualClock) in tests).
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Reads at most `batch_size` events per step (default 100).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How often a started runner looks for new events and due deadlines when the store
    /// does not notify it (default 200 ms).
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The process manager.
    pub fn manager(&self) -> &P {
        &self.manager
    }

    /// One step: decides on the events after the checkpoint (up to the batch size), each
    /// committed with its instances and the checkpoint; when there were none (caught up),
    /// fires the deadlines that are due.
    ///
    /// # Errors
    /// A store or dispatch failure (nothing of the event in hand is committed; the next step
    /// decides on it again), [`CQRSError::EventDecode`] for an event of a type the process
    /// reacts to that does not decode, [`CQRSError::DamagedRow`], an instance state that no
    /// longer deserializes ([`CQRSError::Deserialization`]), [`CQRSError::ProcessLoop`].
    pub async fn run_once(&self) -> Result<ProcessProgress, CQRSError> {
        let mut progress = ProcessProgress {
            position: self.store.checkpoint(P::NAME).await?,
            ..ProcessProgress::default()
        };
        let page = self
            .events
            .read_all(progress.position, self.batch_size)
            .await?;
        // Events that change no instance move the checkpoint with the next commit, or with one
        // commit at the end of the page: a process that reacts to few of the store's events
        // does not write once per event. After a crash they are read again, to no effect.
        let mut uncommitted = None;
        for event in &page {
            match self.decide_on_event(event).await? {
                Some(sent) => {
                    progress.commands += sent;
                    uncommitted = None;
                }
                None => uncommitted = Some(event.position),
            }
            progress.events += 1;
            progress.position = event.position;
            self.progress.send_replace(event.position);
        }
        if let Some(position) = uncommitted {
            self.store
                .commit(P::NAME, Vec::new(), Some(position))
                .await?;
        }
        if page.is_empty() {
            self.shared.set_live();
            let now = self.clock.now();
            for row in self.store.due(P::NAME, now, self.batch_size).await? {
                let (fired, sent) = self.fire_deadlines(row, now).await?;
                progress.deadlines += fired;
                progress.commands += sent;
            }
        }
        Ok(progress)
    }

    /// Steps until a step finds nothing to do, and returns what all the steps did.
    ///
    /// # Errors
    /// As [`run_once`](Self::run_once).
    pub async fn run_until_idle(&self) -> Result<ProcessProgress, CQRSError> {
        let mut total = ProcessProgress::default();
        loop {
            let step = self.run_once().await?;
            total.events += step.events;
            total.deadlines += step.deadlines;
            total.commands += step.commands;
            total.position = step.position;
            if step.is_idle() {
                return Ok(total);
            }
        }
    }

    /// Decides on one stored event and commits the instances it changed with the
    /// checkpoint at its position. Returns how many commands were sent, or `None` when the
    /// event changed no instance (nothing is committed then).
    async fn decide_on_event(
        &self,
        event: &PersistableDomainEvent,
    ) -> Result<Option<usize>, CQRSError> {
        let inputs = P::Input::decode(event)?;
        let mut instances: Vec<Instance<P::State>> = Vec::new();
        let mut index = 0;
        let mut sent = 0;
        for input in inputs {
            let envelope = envelope_of(event, input);
            let Some(id) = P::instance_id(&envelope) else {
                continue;
            };
            let slot = match instances.iter().position(|i| i.row.instance == id) {
                Some(slot) => slot,
                None => {
                    let row = self
                        .store
                        .load(P::NAME, &id)
                        .await?
                        .unwrap_or_else(|| ProcessRow::new(id));
                    let state = state_of::<P>(&row)?;
                    instances.push(Instance {
                        row,
                        state,
                        touched: false,
                    });
                    instances.len() - 1
                }
            };
            let instance = &mut instances[slot];
            if instance.row.finished {
                continue;
            }
            instance.touched = true;
            instance
                .row
                .correlation_id
                .get_or_insert(event.correlation_id.unwrap_or(event.event_id));
            let mut effects = Effects::new(self.clock.now());
            self.manager
                .on_event(&mut instance.state, &envelope, &mut effects);
            sent += self
                .carry_out(instance, effects, event.event_id, &mut index)
                .await?;
        }
        let rows = instances
            .into_iter()
            .filter(|i| i.touched)
            .map(|i| row_with_state(i.row, &i.state))
            .collect::<Result<Vec<_>, _>>()?;
        if rows.is_empty() {
            return Ok(None);
        }
        self.store
            .commit(P::NAME, rows, Some(event.position))
            .await?;
        Ok(Some(sent))
    }

    /// Fires the deadlines of `row` due at `now`, in order, and commits the instance
    /// without them. Returns how many fired and how many commands were sent.
    async fn fire_deadlines(
        &self,
        row: ProcessRow,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(usize, usize), CQRSError> {
        // The deadlines due now, as found: each fires once, unless a deadline fired before it
        // cancels it (it is then gone from the row) or moves it.
        let mut due: Vec<Deadline> = row
            .deadlines
            .iter()
            .filter(|d| d.due <= now)
            .cloned()
            .collect();
        let state = state_of::<P>(&row)?;
        let mut instance = Instance {
            row,
            state,
            touched: true,
        };
        let mut sent = 0;
        let mut count = 0;
        while !instance.row.finished {
            let Some(at) = instance.row.deadlines.iter().position(|d| due.contains(d)) else {
                break;
            };
            let deadline = instance.row.deadlines.remove(at);
            due.retain(|d| *d != deadline);
            count += 1;
            let cause = deadline.cause(P::NAME, &instance.row.instance);
            let mut effects = Effects::new(now);
            self.manager
                .on_deadline(&mut instance.state, &deadline, &mut effects);
            let mut index = 0;
            sent += self
                .carry_out(&mut instance, effects, cause, &mut index)
                .await?;
        }
        let row = row_with_state(instance.row, &instance.state)?;
        self.store.commit(P::NAME, vec![row], None).await?;
        Ok((count, sent))
    }

    /// Applies a decision to the instance's row (deadlines, completion) and sends its
    /// commands, handing refusals back to the process until a round sends nothing that is
    /// refused. Command ids come from the instance, `cause` and the running `index`.
    async fn carry_out(
        &self,
        instance: &mut Instance<P::State>,
        mut effects: Effects<P::Command>,
        cause: Uuid,
        index: &mut u32,
    ) -> Result<usize, CQRSError> {
        let scope = format!("{}/{}", P::NAME, instance.row.instance);
        let correlation = instance.row.correlation_id.unwrap_or(cause);
        let mut sent = 0;
        for round in 0.. {
            if round > MAX_REFUSAL_ROUNDS {
                return Err(CQRSError::ProcessLoop {
                    process: P::NAME.to_owned(),
                    instance: instance.row.instance.clone(),
                    rounds: MAX_REFUSAL_ROUNDS,
                });
            }
            apply_schedule(&mut instance.row, &effects);
            let commands = effects.take_commands();
            let mut next = Effects::new(effects.now());
            let mut refused = false;
            for command in commands {
                let command_id = derived_command_id(&scope, cause, *index);
                *index += 1;
                let context = CommandContext::with_id(command_id)
                    .correlated_with(correlation)
                    .once();
                sent += 1;
                match self.router.send(command.clone(), &context).await {
                    Ok(()) => {}
                    Err(SendError::Refused(reason)) => {
                        refused = true;
                        tracing::debug!(process = P::NAME, instance = %instance.row.instance, %command_id, %reason, "command refused");
                        let refusal = Refused {
                            command,
                            command_id,
                            reason,
                        };
                        self.manager
                            .on_refused(&mut instance.state, &refusal, &mut next);
                    }
                    Err(SendError::Failed(error)) => return Err(error),
                }
            }
            if !refused {
                break;
            }
            effects = next;
        }
        Ok(sent)
    }

    /// Runs the process on a tokio task: steps while there is work, then waits for new
    /// events (the store's notification, or the poll interval) or the next deadline. Store
    /// and dispatch failures are retried with a backoff and shown as the handle's
    /// [`last_error`](ProjectionHandle::last_error); the errors of
    /// [`run_once`](Self::run_once) that a retry cannot mend end the task.
    ///
    /// The handle's position is the process's checkpoint. Dropping it stops the runner.
    #[must_use = "dropping the handle stops the process runner"]
    pub fn start(self) -> ProjectionHandle
    where
        P: ProcessManager,
    {
        let watched = Watched {
            name: P::NAME.to_owned(),
            position: self.progress.subscribe(),
            shared: Arc::clone(&self.shared),
            dead_letters: Arc::new(MemoryDeadLetters::default()),
        };
        ProjectionHandle::spawn(watched, |stop| {
            let span = tracing::info_span!("process", process = P::NAME);
            async move { self.follow(stop).await }.instrument(span)
        })
    }

    async fn follow(self, mut stop: Stop) -> Result<(), CQRSError> {
        let mut changes = self.events.subscribe();
        let mut failures: u32 = 0;
        loop {
            if stop.is_stopped() {
                return Ok(());
            }
            if let Some(rx) = changes.as_mut() {
                rx.borrow_and_update();
            }
            match self.run_once().await {
                Ok(step) => {
                    failures = 0;
                    self.shared.set_last_error(None);
                    if !step.is_idle() {
                        continue;
                    }
                }
                Err(error) if is_transient(&error) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(%error, retry_in = ?wait, "process runner failed; retrying");
                    self.shared.set_last_error(Some(error.to_string()));
                    if stop.sleep(wait).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(error) => return Err(error),
            }
            let mut wait = self.poll_interval;
            if let Ok(Some(due)) = self.store.next_due(P::NAME).await {
                let until = (due - self.clock.now()).to_std().unwrap_or(Duration::ZERO);
                wait = wait.min(until);
            }
            let woken = match changes.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { changes = None; },
                        () = tokio::time::sleep(wait) => {}
                        () = stop.stopped() => {}
                    }
                    !stop.is_stopped()
                }
                None => !stop.sleep(wait).await,
            };
            if !woken {
                return Ok(());
            }
        }
    }
}

/// The decoded event `input` in `event`'s envelope.
fn envelope_of<I>(event: &PersistableDomainEvent, input: I) -> EventEnvelope<I> {
    EventEnvelope {
        event_id: event.event_id,
        aggregate_type: event.aggregate_type.clone(),
        aggregate_id: event.aggregate_id,
        sequence: event.sequence,
        position: event.position,
        event: input,
        metadata: event.metadata.clone(),
        timestamp: event.timestamp,
        correlation_id: event.correlation_id,
        causation_id: event.causation_id,
    }
}

/// The state a row holds (`Default` for a row not stored yet).
fn state_of<P: ProcessManager>(row: &ProcessRow) -> Result<P::State, CQRSError> {
    if row.version == 0 && row.state.is_null() {
        return Ok(P::State::default());
    }
    serde_json::from_value(row.state.clone()).map_err(|source| CQRSError::Deserialization {
        what: format!("state of process {} instance {}", P::NAME, row.instance),
        source,
    })
}

/// `row` holding `state`.
fn row_with_state<S: serde::Serialize>(
    mut row: ProcessRow,
    state: &S,
) -> Result<ProcessRow, CQRSError> {
    row.state = serde_json::to_value(state).map_err(|source| CQRSError::Serialization {
        what: format!("state of process instance {}", row.instance),
        source,
    })?;
    Ok(row)
}

/// Applies a decision's deadlines and completion to the row.
fn apply_schedule<C>(row: &mut ProcessRow, effects: &Effects<C>) {
    for name in effects.cancelled() {
        row.deadlines.retain(|d| d.name != *name);
    }
    for deadline in effects.deadlines() {
        row.deadlines.retain(|d| d.name != deadline.name);
        row.deadlines.push(deadline.clone());
    }
    if effects.is_complete() {
        row.finished = true;
        row.deadlines.clear();
    }
    row.deadlines.sort_by_key(|d| d.due);
}
