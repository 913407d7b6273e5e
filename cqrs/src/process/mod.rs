//! Process managers: the contract, the runner, the stores of instances. The overview is on
//! [`ProcessManager`].

mod clock;
mod runner;
mod store;

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::CQRSError;
use crate::event::{EventEnvelope, PersistableDomainEvent};
use crate::framework::CommandContext;

pub use self::clock::{Clock, ManualClock, SystemClock};
pub use self::runner::{ProcessProgress, ProcessRunner};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) use self::store::{conflict, stored_next_due};
pub use self::store::{MemoryProcessStore, ProcessRow, ProcessStore};

/// The events a process manager reacts to, decoded from stored events of one or more
/// aggregate types.
///
/// Usually an enum with one variant per aggregate type, each holding that aggregate's event
/// type; [`ProcessInput::decode`] picks the variant by the stored event's aggregate type:
///
/// ```
/// # use cqrs::doc::{Counter, CounterEvent};
/// use cqrs::{Aggregate, CQRSError, PersistableDomainEvent, ProcessInput};
///
/// #[derive(Debug, Clone)]
/// enum Input {
///    Counter(CounterEvent),
/// }
///
/// impl ProcessInput for Input {
///    fn decode(event: &PersistableDomainEvent) -> Result<Vec<Self>, CQRSError> {
///        Ok(match event.aggregate_type.as_str() {
///            Counter::NAME => event.decode_all::<CounterEvent>()?.into_iter().map(|e| Input::Counter(e.event)).collect(),
///            _ => Vec::new(),
///        })
///    }
/// }
/// ```
pub trait ProcessInput: Debug + Clone + Send + Sync + Sized + 'static {
    /// The inputs a stored event stands for: none when the process does not react to it
    /// (another aggregate type), several when an upcast split it.
    ///
    /// # Errors
    /// [`CQRSError::EventDecode`] when the event belongs to a type the process reacts to but
    /// does not decode: the runner stops on it rather than skip it.
    fn decode(event: &PersistableDomainEvent) -> Result<Vec<Self>, CQRSError>;
}

/// A process manager: events that drive commands across aggregates.
///
/// A [`ProcessManager`] reacts to the events of one or more aggregate types. Each event it
/// cares about belongs to one *instance* (a transfer, an order's fulfilment), named by
/// [`ProcessManager::instance_id`]. The instance has a state of its own, and the manager's
/// decisions are pure: given the state and an event (or a refused command, or a deadline
/// that came), it changes the state and asks, through [`Effects`], for commands to be sent,
/// deadlines to be set or cancelled, and the instance to be completed.
///
/// A [`ProcessRunner`] carries the decisions out, exactly once in effect:
///
/// * it reads the event store in global order after its checkpoint;
/// * each command it sends gets an id derived from the instance and the event that caused it
///   ([`derived_command_id`](crate::derived_command_id)), and is dispatched with
///   [`CommandContext::once`](crate::CommandContext::once), so that a command sent again after
///   a crash (between its dispatch and the commit of the instance's state) is recognised by
///   its target and not applied twice;
/// * the instance's state, its deadlines and the checkpoint are committed together in one
///   [`ProcessStore::commit`], after the commands were dispatched: a crash before the commit
///   makes the runner decide again from the same state and the same event, which sends the
///   same commands under the same ids;
/// * a command its target refuses comes back to the manager as a [`Refused`], for it to
///   decide on (compensate, give up);
/// * a deadline is stored with the instance's state, fires once (its removal is committed
///   with the state the firing produced) and is gone once cancelled or once the instance
///   completes. Time comes from a [`Clock`], so tests move it by hand ([`ManualClock`]).
///
/// Correlation: every command of an instance carries the correlation id of the event that
/// started it, so the whole workflow's events share one correlation id; each event's
/// causation id is the id of the command that caused it.
///
/// The decision to keep an instance's state in a [`ProcessStore`] next to the checkpoint
/// (rather than event-sourcing it) is explained in `docs/adr/0017-process-managers.md`.
pub trait ProcessManager: Send + Sync + 'static {
    /// The process's name: the key of its checkpoint and of its instances in the
    /// [`ProcessStore`], and part of every command id it derives. Never change it once
    /// instances exist.
    const NAME: &'static str;

    /// The events it reacts to.
    type Input: ProcessInput;

    /// One instance's state. `Default` is the state of an instance no event reached yet.
    type State: Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The commands it sends, to aggregates of any type (a [`CommandRouter`] delivers them).
    type Command: Clone + Debug + Send + Sync + 'static;

    /// The instance an event belongs to, or `None` when it starts or continues none.
    fn instance_id(event: &EventEnvelope<Self::Input>) -> Option<String>;

    /// Decides on an event of the instance.
    fn on_event(
        &self,
        state: &mut Self::State,
        event: &EventEnvelope<Self::Input>,
        effects: &mut Effects<Self::Command>,
    );

    /// Decides on a command of the instance that its target refused. By default, nothing is
    /// done (the refusal is logged).
    fn on_refused(
        &self,
        state: &mut Self::State,
        refused: &Refused<Self::Command>,
        effects: &mut Effects<Self::Command>,
    ) {
        let _ = (state, effects);
        tracing::warn!(process = Self::NAME, command = ?refused.command, reason = %refused.reason, "command refused; the process does not handle refusals");
    }

    /// Decides on a deadline of the instance that came. By default, nothing is done.
    fn on_deadline(
        &self,
        state: &mut Self::State,
        deadline: &Deadline,
        effects: &mut Effects<Self::Command>,
    ) {
        let _ = (state, deadline, effects);
    }
}

/// A wake-up call a process instance asked for: a name (one pending deadline per name and
/// instance) and the time it is due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    /// The deadline's name, chosen by the process ("refund").
    pub name: String,
    /// When it is due.
    pub due: DateTime<Utc>,
}

/// A command its target refused, handed back to the process that sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused<C> {
    /// The command.
    pub command: C,
    /// The id it was sent under.
    pub command_id: Uuid,
    /// The domain's reason, as its error renders.
    pub reason: String,
}

impl Deadline {
    /// The id a runner derives the commands of this deadline's firing from, for the
    /// instance `instance` of the process `process` (see
    /// [`derived_command_id`](crate::derived_command_id)): the same deadline of the same
    /// instance is the same cause on every run, so a firing repeated after a crash sends
    /// its commands under the same ids.
    ///
    /// ```
    /// let due = chrono::Utc::now();
    /// let deadline = cqrs::Deadline { name: "refund".into(), due };
    /// assert_eq!(deadline.cause("transfer", "t1"), deadline.cause("transfer", "t1"));
    /// assert_ne!(deadline.cause("transfer", "t1"), deadline.cause("transfer", "t2"));
    /// ```
    pub fn cause(&self, process: &str, instance: &str) -> Uuid {
        crate::framework::derived_command_id(
            &format!(
                "{process}/{instance}/deadline/{}@{}",
                self.name,
                self.due.timestamp_micros()
            ),
            Uuid::nil(),
            0,
        )
    }
}

/// What one decision asks for: commands to send, deadlines to set or cancel, completion.
///
/// ```
/// use std::time::Duration;
/// let now = chrono::Utc::now();
/// let mut effects = cqrs::Effects::<&str>::new(now);
/// effects.send("withdraw");
/// effects.wake_in("refund", Duration::from_secs(30));
/// assert_eq!(effects.commands(), ["withdraw"]);
/// assert_eq!(effects.deadlines()[0].due, now + chrono::Duration::seconds(30));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Effects<C> {
    now: DateTime<Utc>,
    commands: Vec<C>,
    deadlines: Vec<Deadline>,
    cancelled: Vec<String>,
    complete: bool,
}

impl<C> Effects<C> {
    /// No effects yet, decided at `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Effects {
            now,
            commands: Vec::new(),
            deadlines: Vec::new(),
            cancelled: Vec::new(),
            complete: false,
        }
    }

    /// The time of the decision (from the runner's [`Clock`]).
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Sends a command.
    pub fn send(&mut self, command: C) {
        self.commands.push(command);
    }

    /// Asks to be woken at `due` under `name`, replacing a pending deadline of that name.
    pub fn wake_at(&mut self, name: impl Into<String>, due: DateTime<Utc>) {
        let name = name.into();
        self.cancelled.retain(|n| *n != name);
        self.deadlines.retain(|d| d.name != name);
        self.deadlines.push(Deadline { name, due });
    }

    /// Asks to be woken `after` from now under `name` (see [`wake_at`](Self::wake_at)).
    pub fn wake_in(&mut self, name: impl Into<String>, after: Duration) {
        let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        let due = self
            .now
            .checked_add_signed(after)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.wake_at(name, due);
    }

    /// Cancels the pending deadline `name`, if any.
    pub fn cancel(&mut self, name: impl Into<String>) {
        let name = name.into();
        self.deadlines.retain(|d| d.name != name);
        self.cancelled.push(name);
    }

    /// Completes the instance: its pending deadlines are dropped, and later events for it
    /// are ignored. Its last state is kept.
    pub fn complete(&mut self) {
        self.complete = true;
    }

    /// The commands to send, in order.
    pub fn commands(&self) -> &[C] {
        &self.commands
    }

    /// The deadlines set.
    pub fn deadlines(&self) -> &[Deadline] {
        &self.deadlines
    }

    /// The names of the deadlines cancelled.
    pub fn cancelled(&self) -> &[String] {
        &self.cancelled
    }

    /// Whether the instance completes.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Takes the commands out, leaving none.
    pub(crate) fn take_commands(&mut self) -> Vec<C> {
        std::mem::take(&mut self.commands)
    }
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The target refused it (a domain error): handed back to the process as a
    /// [`Refused`].
    #[error("refused: {0}")]
    Refused(String),
    /// It could not be carried out (a store that failed, a conflict the retries did not
    /// resolve): the runner tries the event again later.
    #[error(transparent)]
    Failed(#[from] CQRSError),
}

/// Delivers a process's commands to their aggregates.
///
/// Implement it on a struct holding the [`CQRSFramework`](crate::CQRSFramework)s of the
/// target aggregates: match the command, dispatch it with
/// [`dispatch_with_context`](crate::CQRSFramework::dispatch_with_context) and the given
/// context (keep it: it carries the command's id, its correlation id and `once`), and say
/// whether the target refused it or the dispatch failed.
#[async_trait]
pub trait CommandRouter<C>: Send + Sync {
    /// Dispatches `command` under `context`.
    ///
    /// # Errors
    /// [`SendError::Refused`] for a domain refusal, [`SendError::Failed`] otherwise.
    async fn send(&self, command: C, context: &CommandContext) -> Result<(), SendError>;
}
