//! The JetStream stream the relay writes and projections read: name, subjects, window.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;

use super::broker;

/// A subject token: NATS forbids whitespace, `*` and `>` in tokens (and `.` separates them).
/// Names written by the derives never contain those; a hand-written name that does is
/// published with `_` in their place.
pub(super) fn subject_token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    name.chars()
        .map(|c| {
            if c.is_whitespace() || c == '*' || c == '>' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// prefix of its subjects and its deduplication window.
///
/// Subjects are `<prefix>.<aggregate_type>.<event_type>`; the stream captures `<prefix>.>`.
///
/// ```
/// use std::time::Duration;
/// use cqrs::NatsStreamConfig;
/// let config = NatsStreamConfig::new("BANK_EVENTS", "bank").with_duplicate_window(Duration::from_secs(600));
/// assert_eq!(config.subjects(), "bank.>");
/// assert_eq!(config.aggregate_subjects("account"), "bank.account.>");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsStreamConfig {
    stream_name: String,
    subject_prefix: String,
    duplicate_window: Duration,
}

impl NatsStreamConfig {
    /// A stream named `stream_name` (no spaces, `.`, `*` or `>`) over the subjects under
    /// `subject_prefix`, with a 10-minute deduplication window.
    pub fn new(stream_name: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        NatsStreamConfig {
            stream_name: stream_name.into(),
            subject_prefix: subject_prefix.into(),
            duplicate_window: Duration::from_secs(600),
        }
    }

    /// How long the server remembers a `Nats-Msg-Id` to drop a republished event. A relay that
    /// crashed republishes its unacknowledged tail when it restarts: keep the window longer
    /// than the longest time a relay may stay down after a crash.
    #[must_use]
    pub fn with_duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// The subjects' prefix.
    pub fn subject_prefix(&self) -> &str {
        &self.subject_prefix
    }

    /// The deduplication window.
    pub fn duplicate_window(&self) -> Duration {
        self.duplicate_window
    }

    /// `<prefix>.>`: every subject of the stream.
    pub fn subjects(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }

    /// `<prefix>.<aggregate_type>.>`: the events of one aggregate type.
    pub fn aggregate_subjects(&self, aggregate_type: &str) -> String {
        format!(
            "{}.{}.>",
            self.subject_prefix,
            subject_token(aggregate_type)
        )
    }

    /// `<prefix>.<aggregate_type>.<event_type>`: where `event` is published.
    ///
    /// ```
    /// # use cqrs::doc::CounterEvent;
    /// let event = CounterEvent::Incremented { by: 5 };
    /// let stored = cqrs::PersistableDomainEvent::new(
    ///     "counter",
    ///     uuid::Uuid::new_v4(),
    ///     1,
    ///     &event,
    ///     serde_json::Value::Null,
    /// )?;
    /// let config = cqrs::NatsStreamConfig::new("EVENTS", "events");
    /// assert_eq!(config.subject_for(&stored), "events.counter.Incremented");
    /// # Ok::<(), cqrs::CQRSError>(())
    /// ```
    pub fn subject_for(&self, event: &PersistableDomainEvent) -> String {
        format!(
            "{}.{}.{}",
            self.subject_prefix,
            subject_token(&event.aggregate_type),
            subject_token(&event.event_type)
        )
    }

    /// Creates the stream if it does not exist; if it does, makes its subjects and
    /// deduplication window the configured ones and keeps every other setting (retention,
    /// replicas, limits) as the operator set it. Safe to call from several processes at once.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the server refuses or cannot be reached.
    pub async fn ensure_stream(&self, jetstream: &jetstream::Context) -> Result<(), CQRSError> {
        let wanted = stream::Config {
            name: self.stream_name.clone(),
            subjects: vec![self.subjects()],
            duplicate_window: self.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        // Two processes may race to create it: the loser sees "already in use" and retries.
        let mut attempt = 0;
        let mut stream = loop {
            match jetstream.get_or_create_stream(wanted.clone()).await {
                Ok(stream) => break stream,
                Err(_) if attempt == 0 => attempt += 1,
                Err(error) => return Err(broker(error)),
            }
        };
        let info = stream.info().await.map_err(broker)?;
        if info.config.subjects != wanted.subjects
            || info.config.duplicate_window != wanted.duplicate_window
        {
            let mut config = info.config.clone();
            config.subjects = wanted.subjects;
            config.duplicate_window = wanted.duplicate_window;
            jetstream.update_stream(&config).await.map_err(broker)?;
        }
        Ok(())
    }
}
